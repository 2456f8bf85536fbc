//! Running a stream (SPEC §6): a session moves through its phases one step at a
//! time. `meter.run_stream` takes every step in the caller's transaction;
//! `CALL meter.execute_stream` commits after each, so listeners see each status
//! change live and pause / cancel from another connection take effect between
//! steps.
//!
//! A NORMAL batch run: scan (flush every meter whose period ended), process the
//! pending records chunk by chunk, then the closing scan (flush_by period_end) or
//! flush every meter (flush_by stream_execution). A DEBUG run does the same
//! reading and changes nothing.

use std::collections::BTreeMap;

use serde_json::json;

use crate::catalog::{self, FlushBy, Stream, StreamMode};
use crate::convert::clock_now;
use crate::errors::{MeterError, Result};
use crate::flush::{self, Position, Scope};
use crate::gucs;
use crate::inbox;
use crate::locks;
use crate::outbox;
use crate::processor::{Counts, Mode, Outcome, Processor};
use crate::session::{RunType, Status};
use crate::sessions::{self, Session};
use crate::sql;

/// What a step left to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    More,
    Paused,
    Done,
}

impl Step {
    pub fn name(self) -> &'static str {
        match self {
            Step::More => "more",
            Step::Paused => "paused",
            Step::Done => "done",
        }
    }
}

fn pause_briefly() -> Result<()> {
    sql::execute("SELECT pg_catalog.pg_sleep(0.2)", &[])?;
    Ok(())
}

/// Starts a session. A NORMAL run refuses (or with `wait`, waits for) another
/// working run of the stream; a working run whose backend went away is marked
/// FAILED first.
pub fn begin(stream_name: &str, run_type: RunType, wait: bool, chunked: bool) -> Result<i64> {
    let stream = catalog::load_stream(stream_name)?;
    if stream.mode == StreamMode::Realtime && run_type == RunType::Normal {
        return Err(MeterError::WrongState(format!(
            "stream \"{}\" is realtime: its records are metered as they arrive, and its meters are flushed by meter.scan_once()",
            stream.name
        )));
    }
    if run_type == RunType::Debug {
        let id = sessions::create(&stream, run_type, chunked, clock_now())?;
        return Ok(id.expect("DEBUG sessions never conflict"));
    }
    loop {
        if let Some((id, status, pid, alive)) = sessions::working_run(stream.id)? {
            if !alive {
                // Read again under the session's row lock: the run may have ended
                // after this statement's snapshot was taken (its backend is idle
                // because it is done), and then there is nothing to fail.
                if !sessions::load(id, true)?.status.is_working() {
                    continue;
                }
                let pid = pid.map_or("unknown".to_string(), |p| p.to_string());
                sessions::transition(
                    id,
                    Status::Failed,
                    Some(&format!("its backend (pid {pid}) ended before the run finished")),
                )?;
                continue;
            }
            if wait {
                pause_briefly()?;
                continue;
            }
            return Err(MeterError::Busy(format!(
                "stream \"{}\" is already being run by session {id} ({status}, backend pid {}): wait for it, pass wait => true, or meter.cancel({id})",
                stream.name,
                pid.unwrap_or_default()
            )));
        }
        if !locks::stream(stream.id, false)? {
            if wait {
                pause_briefly()?;
                continue;
            }
            return Err(MeterError::Busy(format!(
                "stream \"{}\" is being run by another transaction (backend pid {}) that has not committed yet",
                stream.name,
                locks::stream_holder(stream.id)?.map_or("unknown".to_string(), |p| p.to_string())
            )));
        }
        match sessions::create(&stream, run_type, chunked, clock_now())? {
            Some(id) => return Ok(id),
            // A run committed between the check and the lock; it holds the stream.
            None => {
                return Err(MeterError::Busy(format!(
                    "stream \"{}\" started another run just now: retry when it has finished",
                    stream.name
                )))
            }
        }
    }
}

/// Takes the next step of a session.
pub fn step(id: i64) -> Result<Step> {
    // Each step of `execute_stream` commits, so earlier flushes leave nothing in its way.
    let mut from_start = Position::START;
    step_from(id, &mut from_start)
}

/// Takes the next step of a session; a flushing step starts at `flushed_to` and
/// moves it on (see `flush::Position`).
fn step_from(id: i64, flushed_to: &mut Position) -> Result<Step> {
    let session = sessions::load(id, false)?;
    match session.status {
        status if status.is_final() => return Ok(Step::Done),
        Status::Paused => {
            pause_briefly()?;
            return Ok(Step::Paused);
        }
        _ => {}
    }
    let stream = catalog::load_stream(&session.stream_name)?;
    if session.run_type == RunType::Debug {
        return debug(&session, &stream);
    }
    locks::stream(stream.id, true)?;
    let limit = gucs::chunk_size();
    match (session.status, session.phase.as_str()) {
        (Status::Initializing, _) => {
            sessions::transition(id, Status::Running, None)?;
            Ok(Step::More)
        }
        (Status::Running, "initial_scan") => {
            let flushed = flush::flush(
                stream.id,
                Some(id),
                Scope::Due {
                    as_of: session.as_of,
                    users: None,
                },
                limit,
                *flushed_to,
            )?;
            *flushed_to = flushed.next;
            sessions::count(id, Counts::default(), Some(&flushed))?;
            if flushed.meters < limit {
                sessions::set_phase(id, "process")?;
                // The closing flush is another pass: a later as_of, maybe another scope.
                *flushed_to = Position::START;
            }
            Ok(Step::More)
        }
        (Status::Running, _) => {
            let chunk = inbox::take_chunk(&stream.name, session.inbox_position, limit, &stream.projection())?;
            if chunk.inputs.is_empty() {
                start_closing(id)?;
                return Ok(Step::More);
            }
            let mut processor = Processor::new(&stream, Mode::Apply, Some(id), session.as_of)?.holding_stream()?;
            let counts = Counts::of(&processor.process(&chunk.inputs)?);
            sessions::count(id, counts, None)?;
            sessions::set_inbox_position(id, chunk.after)?;
            Ok(Step::More)
        }
        (Status::UsagePushing, _) => {
            let scope = match stream.flush_by {
                FlushBy::PeriodEnd => Scope::Due {
                    as_of: session.as_of,
                    users: None,
                },
                FlushBy::StreamExecution => Scope::All { at: session.as_of },
            };
            let flushed = flush::flush(stream.id, Some(id), scope, limit, *flushed_to)?;
            *flushed_to = flushed.next;
            sessions::count(id, Counts::default(), Some(&flushed))?;
            if flushed.meters == limit {
                return Ok(Step::More);
            }
            sessions::transition(id, Status::PushCompleted, None)?;
            outbox::settle(id)?;
            Ok(Step::Done)
        }
        (status, phase) => Err(MeterError::WrongState(format!(
            "session {id} has nothing to do in {status} ({phase})"
        ))),
    }
}

/// Every step in the caller's transaction (`run_stream`). The processing phase
/// keeps the meters it changes in memory (locked) across chunks and writes each
/// back once, instead of once per chunk.
pub fn to_end(id: i64) -> Result<()> {
    // Flushing steps of one pass continue where the previous one stopped.
    let mut flushed_to = Position::START;
    loop {
        let session = sessions::load(id, false)?;
        if session.run_type == RunType::Normal && session.status == Status::Running && session.phase == "process" {
            process_all(&session)?;
            continue;
        }
        match sql::in_chunk_context(|| step_from(id, &mut flushed_to))? {
            Step::Done => return Ok(()),
            Step::More => {}
            // A run in one transaction cannot be paused by others: they do not see it.
            Step::Paused => return Err(MeterError::WrongState(format!("session {id} is paused"))),
        }
    }
}

/// The processing phase of a one-transaction run: every pending record, chunk by
/// chunk, then on to the closing phase.
fn process_all(session: &Session) -> Result<()> {
    let stream = catalog::load_stream(&session.stream_name)?;
    let mut processor = Processor::new(&stream, Mode::Apply, Some(session.id), session.as_of)?
        .keep_meters()
        .holding_stream()?;
    let projection = stream.projection();
    let mut after = session.inbox_position;
    loop {
        let chunk = sql::in_chunk_context(|| inbox::take_chunk(&stream.name, after, gucs::chunk_size(), &projection))?;
        if chunk.inputs.is_empty() {
            break;
        }
        after = chunk.after;
        let counts = sql::in_chunk_context(|| processor.process(&chunk.inputs))?;
        sessions::count(session.id, Counts::of(&counts), None)?;
    }
    // The meters and audit rows kept across chunks, written once.
    sql::in_chunk_context(|| processor.finish())?;
    start_closing(session.id)
}

/// Processing is over: USAGE_PUSHING, and the closing scan runs by a fresh clock.
fn start_closing(id: i64) -> Result<()> {
    sessions::transition(id, Status::UsagePushing, None)?;
    sql::execute(
        "UPDATE meter.sessions SET phase = 'closing', as_of = clock_timestamp() WHERE id = $1",
        &[id.into()],
    )?;
    Ok(())
}

/// Marks a session FAILED after an error (unless it already ended).
pub fn fail(id: i64, message: &str) -> Result<()> {
    let session = sessions::load(id, true)?;
    if !session.status.is_final() {
        sessions::transition(id, Status::Failed, Some(message))?;
    }
    Ok(())
}

/// A DEBUG run: everything a NORMAL run would read, nothing written; ends
/// TESTING_PASSED when nothing would be rejected, TESTING_FAILED otherwise.
fn debug(session: &Session, stream: &Stream) -> Result<Step> {
    let limit = gucs::chunk_size();
    let mut processor = Processor::new(stream, Mode::Simulate, Some(session.id), session.as_of)?;
    let mut counts = Counts::default();
    let mut by_rule: BTreeMap<String, i64> = BTreeMap::new();
    let mut rejections: BTreeMap<&'static str, i64> = BTreeMap::new();
    let mut examples = Vec::new();
    let mut new_meters = std::collections::HashSet::new();
    let projection = stream.projection();
    let mut after = 0i64;
    loop {
        let inbox::Chunk {
            inputs: chunk,
            after: next,
        } = inbox::peek_chunk(&stream.name, after, limit, &projection)?;
        if chunk.is_empty() {
            break;
        }
        after = next;
        let outcomes = processor.process(&chunk)?;
        for (input, outcome) in chunk.iter().zip(&outcomes) {
            match outcome {
                Outcome::Metered {
                    rule,
                    new_meter,
                    meter_type,
                    user_id,
                    ..
                } => {
                    *by_rule.entry(rule.to_string()).or_default() += 1;
                    if *new_meter {
                        new_meters.insert((meter_type.to_string(), user_id.clone()));
                    }
                }
                Outcome::Rejected { code, reason, rule } => {
                    *rejections.entry(code).or_default() += 1;
                    if examples.len() < 10 {
                        examples.push(json!({"usageId": input.usage_id, "code": code, "reason": reason, "rule": rule}));
                    }
                }
                Outcome::Duplicate { .. } => {}
            }
        }
        counts.add(Counts::of(&outcomes));
    }
    let due = flush::count_due(stream.id, session.as_of)?;
    let report = json!({
        "records": counts.total(),
        "metered": counts.metered,
        "duplicates": counts.duplicates,
        "rejected": counts.rejected,
        "metersDue": due,
        "metersCreated": new_meters.len(),
        "byRule": by_rule,
        "rejections": rejections,
        "rejectedExamples": examples,
    });
    sql::execute(
        "UPDATE meter.sessions SET report = $2::text::jsonb WHERE id = $1",
        &[session.id.into(), report.to_string().into()],
    )?;
    sessions::count(session.id, counts, None)?;
    let verdict = if counts.rejected == 0 {
        Status::TestingPassed
    } else {
        Status::TestingFailed
    };
    sessions::transition(session.id, verdict, None)?;
    Ok(Step::Done)
}

/// Pauses a stream's working run: it stops at the next chunk until resumed.
pub fn pause(stream: &str) -> Result<i64> {
    let id = sessions::working_session_of(stream)?;
    sessions::transition(id, Status::Paused, None)?;
    Ok(id)
}

pub fn resume(stream: &str) -> Result<i64> {
    let id = sessions::working_session_of(stream)?;
    sessions::transition(id, Status::Running, None)?;
    Ok(id)
}

/// Cancels a session: its run stops at the next chunk; what it committed stays.
pub fn cancel(id: i64) -> Result<()> {
    sessions::transition(id, Status::Canceled, None)?;
    Ok(())
}
