//! Real-time streams (SPEC §6, §9): records are metered in the transaction that
//! ingests them, under one long session per stream (INITIALIZING → RUNNING,
//! PAUSED while paused, COMPLETED when stopped). While paused, records wait in
//! the inbox; they are metered on resume, oldest first. Period ends are flushed by
//! `meter.scan_once()`, which the background worker or pg_cron calls.

use jiff::Timestamp;

use crate::catalog::Stream;
use crate::convert::transaction_now;
use crate::errors::{MeterError, Result};
use crate::flush::{self, Flushed, Position, Scope};
use crate::gucs;
use crate::inbox::{self, Batch, Ingested};
use crate::locks;
use crate::processor::{Counts, Input, Mode, Processor};
use crate::session::{RunType, Status};
use crate::sessions;
use crate::sql;

/// The stream's working session, started (INITIALIZING → RUNNING) if it has none.
pub fn session(stream: &Stream) -> Result<(i64, Status)> {
    loop {
        if let Some((id, status)) = working(stream.id)? {
            return Ok((id, status));
        }
        // Two first ingests may race: the loser's insert waits for the winner's
        // commit, conflicts, and finds the winner's session on the next loop.
        if let Some(id) = sessions::create(stream, RunType::Normal, false, transaction_now())? {
            sessions::transition(id, Status::Running, None)?;
            return Ok((id, Status::Running));
        }
    }
}

fn working(stream_id: i64) -> Result<Option<(i64, Status)>> {
    let row = sql::one::<String>(
        "SELECT id || ' ' || status FROM meter.sessions
          WHERE stream_id = $1 AND run_type = 'NORMAL' AND status IN ('INITIALIZING', 'RUNNING', 'PAUSED')
          ORDER BY id DESC LIMIT 1",
        &[stream_id.into()],
    )?;
    Ok(row.and_then(|text| {
        let (id, status) = text.split_once(' ')?;
        Some((id.parse().ok()?, status.parse().ok()?))
    }))
}

/// `meter.ingest` on a realtime stream.
pub fn ingest(stream: &Stream, batch: &Batch) -> Result<Ingested> {
    let (session_id, status) = session(stream)?;
    if status == Status::Paused {
        return inbox::queue(stream, batch);
    }
    let now = transaction_now();
    let counts = meter(stream, session_id, now, Some(batch))?;
    Ok(Ingested {
        accepted: counts.metered,
        duplicates: counts.duplicates,
        rejected: counts.rejected,
    })
}

/// Meters records now: first whatever waits in the inbox (queued while paused),
/// then `inputs`, each user's expired meters flushed first so usage lands in the
/// current period. Counts go to the session's per-backend counters.
/// `batch`, if any, is metered in chunks of `meter_ext.chunk_size` records too, so
/// a large array holds only one chunk's records in Rust at a time.
fn meter(stream: &Stream, session_id: i64, now: Timestamp, batch: Option<&Batch>) -> Result<Counts> {
    let mut processor = Processor::new(stream, Mode::Apply, Some(session_id), now)?;
    let projection = stream.projection();
    let mut counts = Counts::default();
    let mut flushed = 0;
    // Each chunk's PostgreSQL allocations are freed after it.
    let mut meter_chunk = |inputs: &[Input]| {
        sql::in_chunk_context(|| -> Result<()> {
            flushed += flush_users(stream, session_id, now, inputs)?;
            counts.add(Counts::of(&processor.process(inputs)?));
            Ok(())
        })
    };
    let mut after = 0;
    loop {
        // A generic plan: the check runs on every call and usually finds nothing,
        // and planning it took longer than the rest of the call's statements.
        let waiting = sql::in_chunk_context(|| {
            sql::with_generic_plans(|| inbox::take_chunk(&stream.name, after, gucs::chunk_size(), &projection))
        })?;
        if waiting.inputs.is_empty() {
            break;
        }
        after = waiting.after;
        meter_chunk(&waiting.inputs)?;
    }
    for inputs in batch.into_iter().flat_map(|b| b.inputs(gucs::chunk_len(), &projection)) {
        meter_chunk(&inputs)?;
    }
    sessions::count_concurrently(session_id, counts, flushed)?;
    Ok(counts)
}

fn flush_users(stream: &Stream, session_id: i64, now: Timestamp, inputs: &[Input]) -> Result<i64> {
    let users: Vec<String> = inputs
        .iter()
        .filter_map(|i| i.view().get(&stream.fields.user_id))
        .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_string))
        .collect();
    if users.is_empty() {
        return Ok(0);
    }
    let Flushed { records, .. } = flush::flush(
        stream.id,
        Some(session_id),
        Scope::Due {
            as_of: now,
            users: Some(&users),
        },
        i64::MAX,
        Position::START,
    )?;
    Ok(records)
}

/// Resumes a paused realtime stream and meters what waited, oldest first.
pub fn resume(stream: &Stream) -> Result<i64> {
    let id = sessions::working_session_of(&stream.name)?;
    sessions::transition(id, Status::Running, None)?;
    meter(stream, id, transaction_now(), None)?;
    Ok(id)
}

/// `meter.stop`: completes the stream's session. The next ingest starts a new one.
pub fn stop(stream: &Stream) -> Result<i64> {
    let Some((id, _)) = working(stream.id)? else {
        return Err(MeterError::WrongState(format!(
            "stream \"{}\" has no running session to stop",
            stream.name
        )));
    };
    sessions::transition(id, Status::Completed, None)?;
    Ok(id)
}

/// What one scan of a realtime stream did.
#[derive(Debug, Default, Clone, Copy)]
pub struct Scanned {
    pub flushed: i64,
    pub metered: i64,
}

/// One scan of a realtime stream: flush every meter whose period ended, meter
/// what waits in the inbox if the stream is running. Skipped (zeros) while another
/// scan holds the stream. Never flushes a meter twice: flushing takes each meter's
/// row lock and re-checks its period end.
pub fn scan(stream: &Stream) -> Result<Scanned> {
    if !locks::stream(stream.id, false)? {
        return Ok(Scanned::default());
    }
    let now = transaction_now();
    // A stream nobody has used gets no session from a scan: only work does that.
    let current = working(stream.id)?;
    let mut flushed = 0;
    let mut flushed_to = Position::START;
    loop {
        let batch = flush::flush(
            stream.id,
            current.map(|c| c.0),
            Scope::Due {
                as_of: now,
                users: None,
            },
            gucs::chunk_size(),
            flushed_to,
        )?;
        flushed_to = batch.next;
        flushed += batch.records;
        if batch.meters < gucs::chunk_size() {
            break;
        }
    }
    if let Some((id, _)) = current {
        sessions::count_concurrently(id, Counts::default(), flushed)?;
    }
    let paused = current.is_some_and(|(_, status)| status == Status::Paused);
    let metered = if !paused && inbox::has_pending(&stream.name)? {
        let (id, _) = session(stream)?;
        meter(stream, id, now, None)?.metered
    } else {
        0
    };
    Ok(Scanned { flushed, metered })
}
