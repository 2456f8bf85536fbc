//! Stored sessions: creating them, changing their status (checked by `session`,
//! recorded in `meter.session_events`, announced on LISTEN channels), and telling
//! a live run from one whose backend went away.

use jiff::Timestamp;
use pgrx::datum::TimestampWithTimeZone;
use pgrx::prelude::*;

use crate::catalog::{Stream, StreamMode};
use crate::convert::{to_timestamp, to_timestamptz};
use crate::errors::{MeterError, Result};
use crate::flush::Flushed;
use crate::processor::Counts;
use crate::session::{check_transition, RunType, SessionKind, Status};
use crate::sql;

/// The channel every status change is announced on.
pub const STATUS_CHANNEL: &str = "meter_session_status";

/// A stored session, as a run needs it.
#[derive(Debug, Clone)]
pub struct Session {
    pub id: i64,
    pub stream_name: String,
    pub run_type: RunType,
    pub kind: SessionKind,
    pub status: Status,
    pub phase: String,
    pub as_of: Timestamp,
    /// The last inbox id a chunked run took.
    pub inbox_position: i64,
}

fn kind_of(mode: StreamMode) -> SessionKind {
    match mode {
        StreamMode::Batch => SessionKind::Batch,
        StreamMode::Realtime => SessionKind::Realtime,
    }
}

/// Loads a session; `lock` takes its row lock for a status change.
pub fn load(id: i64, lock: bool) -> Result<Session> {
    let lock = if lock { "FOR UPDATE OF s" } else { "" };
    let query = format!(
        "SELECT s.id, s.stream_id, st.name, s.run_type, st.mode, s.status, s.phase, s.as_of, s.inbox_position
           FROM meter.sessions s JOIN meter.streams st ON st.id = s.stream_id
          WHERE s.id = $1 {lock}"
    );
    let row = Spi::connect_mut(|client| -> Result<_> {
        let table = sql::run(client, &query, &[id.into()])?;
        if table.is_empty() {
            return Ok(None);
        }
        let r = table.first();
        Ok(Some((
            r.get::<i64>(1)?.unwrap(),
            r.get::<i64>(2)?.unwrap(),
            r.get::<String>(3)?.unwrap(),
            r.get::<String>(4)?.unwrap(),
            r.get::<String>(5)?.unwrap(),
            r.get::<String>(6)?.unwrap(),
            r.get::<String>(7)?.unwrap(),
            r.get::<TimestampWithTimeZone>(8)?.and_then(to_timestamp).unwrap(),
            r.get::<i64>(9)?.unwrap_or(0),
        )))
    })?;
    let Some((id, _stream_id, stream_name, run_type, mode, status, phase, as_of, inbox_position)) = row else {
        return Err(MeterError::NotFound(format!("session {id} does not exist")));
    };
    Ok(Session {
        id,
        stream_name,
        run_type: run_type
            .parse()
            .map_err(|e: crate::session::UnknownRunType| MeterError::InvalidParameter(e.to_string()))?,
        kind: if mode == "realtime" {
            SessionKind::Realtime
        } else {
            SessionKind::Batch
        },
        status: status
            .parse()
            .map_err(|e: crate::session::UnknownStatus| MeterError::InvalidParameter(e.to_string()))?,
        phase,
        as_of,
        inbox_position,
    })
}

/// Starts a session in its run type's first status. Returns `None` when another
/// working NORMAL run of the stream holds it (the partial unique index decides).
pub fn create(stream: &Stream, run_type: RunType, chunked: bool, as_of: Timestamp) -> Result<Option<i64>> {
    let first = run_type.first_status();
    let id = sql::one::<i64>(
        "INSERT INTO meter.sessions (stream_id, run_type, status, as_of, chunked, backend_pid, backend_start)
         VALUES ($1, $2, $3, $4, $5, pg_catalog.pg_backend_pid(),
                 (SELECT a.backend_start FROM pg_catalog.pg_stat_activity a WHERE a.pid = pg_catalog.pg_backend_pid()))
         ON CONFLICT (stream_id) WHERE run_type = 'NORMAL' AND status IN ('INITIALIZING', 'RUNNING', 'PAUSED', 'USAGE_PUSHING')
         DO NOTHING
         RETURNING id",
        &[stream.id.into(), run_type.name().into(), first.name().into(), to_timestamptz(as_of).into(), chunked.into()],
    )?;
    if let Some(id) = id {
        check_transition(id, run_type, kind_of(stream.mode), Status::NeverRun, first)
            .map_err(|e| MeterError::WrongState(e.to_string()))?;
        announce(id, Status::NeverRun)?;
    }
    Ok(id)
}

/// Moves a session to `to`, if its state machine allows it: the one place a
/// status changes. Records the event and announces it (delivered on commit).
pub fn transition(id: i64, to: Status, error: Option<&str>) -> Result<Session> {
    let session = load(id, true)?;
    check_transition(id, session.run_type, session.kind, session.status, to)
        .map_err(|e| MeterError::WrongState(e.to_string()))?;
    sql::execute(
        "UPDATE meter.sessions
            SET status = $2,
                ended_at = CASE WHEN $3 THEN clock_timestamp() END,
                error = coalesce($4, error),
                phase = CASE WHEN $3 THEN 'done' ELSE phase END,
                updated_at = clock_timestamp()
          WHERE id = $1",
        &[id.into(), to.name().into(), to.is_final().into(), error.into()],
    )?;
    announce(id, session.status)?;
    Ok(Session { status: to, ..session })
}

/// Records the session's current status as an event and sends the Meter Session
/// Status Change payload on `meter_session_status` and on every matching
/// notification rule's channel.
fn announce(id: i64, previous: Status) -> Result<()> {
    sql::execute(
        "WITH s AS (
             SELECT s, st, meter.session_event_payload(s, st, $2)::text AS payload
               FROM meter.sessions s JOIN meter.streams st ON st.id = s.stream_id WHERE s.id = $1),
         event AS (
             INSERT INTO meter.session_events (session_id, stream_id, status, previous_status)
             SELECT (s).id, (s).stream_id, (s).status, $2 FROM s),
         channels AS (
             SELECT $3::text AS channel
             UNION
             SELECT r.channel FROM meter.notification_rules r, s
              WHERE (r.stream_id IS NULL OR r.stream_id = (s.st).id)
                AND (r.statuses IS NULL OR (s.s).status = ANY (r.statuses))
                AND (r.previous_statuses IS NULL OR $2 = ANY (r.previous_statuses))
                AND (r.run_types IS NULL OR (s.s).run_type = ANY (r.run_types)))
         SELECT count(pg_catalog.pg_notify(c.channel, s.payload)) FROM channels c, s",
        &[id.into(), previous.name().into(), STATUS_CHANNEL.into()],
    )?;
    Ok(())
}

/// The UPDATE of `count`, with `$extra` set too.
macro_rules! count_query {
    ($extra:literal) => {
        concat!(
            "UPDATE meter.sessions
                SET records_processed = records_processed + $2, records_metered = records_metered + $3,
                    records_duplicate = records_duplicate + $4, records_rejected = records_rejected + $5,
                    meters_flushed = meters_flushed + $6, chunks = chunks + ($2 > 0)::int, updated_at = clock_timestamp()",
            $extra,
            " WHERE id = $1"
        )
    };
}

/// Adds a chunk's outcomes to the session's counters (progress is visible once the
/// chunk commits), and what a flush wrote: how many records, and the newest flush
/// id among them (see `has_last_flush_id`), in the same UPDATE.
pub fn count(id: i64, counts: Counts, flushed: Option<&Flushed>) -> Result<()> {
    let mut args: Vec<pgrx::datum::DatumWithOid> = vec![
        id.into(),
        counts.total().into(),
        counts.metered.into(),
        counts.duplicates.into(),
        counts.rejected.into(),
        flushed.map_or(0, |f| f.records).into(),
    ];
    let query = match flushed.and_then(|f| f.last_flush_id) {
        Some(last) if has_last_flush_id()? => {
            args.push(last.into());
            count_query!(", last_flush_id = greatest(last_flush_id, $7)")
        }
        _ => count_query!(""),
    };
    sql::execute(query, &args)?;
    Ok(())
}

/// Adds a realtime ingest's counts to this backend's counter row of the session,
/// so that concurrent ingests do not queue on the session's row.
pub fn count_concurrently(id: i64, counts: Counts, flushed: i64) -> Result<()> {
    if counts.total() == 0 && flushed == 0 {
        return Ok(());
    }
    sql::execute(
        "INSERT INTO meter.session_counters AS c
                (session_id, slot, records_processed, records_metered, records_duplicate, records_rejected, meters_flushed)
         VALUES ($1, pg_catalog.pg_backend_pid() % 64, $2, $3, $4, $5, $6)
         ON CONFLICT (session_id, slot) DO UPDATE
            SET records_processed = c.records_processed + EXCLUDED.records_processed,
                records_metered = c.records_metered + EXCLUDED.records_metered,
                records_duplicate = c.records_duplicate + EXCLUDED.records_duplicate,
                records_rejected = c.records_rejected + EXCLUDED.records_rejected,
                meters_flushed = c.meters_flushed + EXCLUDED.meters_flushed",
        &[
            id.into(),
            counts.total().into(),
            counts.metered.into(),
            counts.duplicates.into(),
            counts.rejected.into(),
            flushed.into(),
        ],
    )?;
    Ok(())
}

/// Moves the realtime counters into their sessions' rows.
pub fn fold_counters() -> Result<()> {
    sql::execute(
        "WITH taken AS (DELETE FROM meter.session_counters RETURNING *),
              summed AS (
                  SELECT session_id, sum(records_processed) AS p, sum(records_metered) AS m,
                         sum(records_duplicate) AS d, sum(records_rejected) AS r, sum(meters_flushed) AS f
                    FROM taken GROUP BY session_id)
         UPDATE meter.sessions s
            SET records_processed = s.records_processed + x.p, records_metered = s.records_metered + x.m,
                records_duplicate = s.records_duplicate + x.d, records_rejected = s.records_rejected + x.r,
                meters_flushed = s.meters_flushed + x.f, updated_at = clock_timestamp()
           FROM summed x WHERE s.id = x.session_id",
        &[],
    )?;
    Ok(())
}

thread_local! {
    /// The extension (its oid) whose meter.sessions was seen to have last_flush_id.
    static HAS_LAST_FLUSH_ID: std::cell::Cell<pg_sys::Oid> = const { std::cell::Cell::new(pg_sys::InvalidOid) };
}

/// Whether this database's meter.sessions has `last_flush_id` (0.2.0 on), the
/// newest flush id of a batch run's records, which `count` records and
/// `outbox::settle` compares with the consumers' acknowledgements (realtime
/// sessions never wait for consumers: they complete when stopped). A 0.1.0 schema
/// keeps working with this library until `ALTER EXTENSION meter_ext UPDATE`, its
/// sessions settled by reading the outbox. Remembered once true, for this
/// installation of the extension (dropped and created again, it is asked again).
pub fn has_last_flush_id() -> Result<bool> {
    sql::true_for_installation(&HAS_LAST_FLUSH_ID, || {
        Ok(sql::one::<bool>(
            "SELECT EXISTS (SELECT FROM pg_catalog.pg_attribute
                             WHERE attrelid = 'meter.sessions'::pg_catalog.regclass
                               AND attname = 'last_flush_id' AND NOT attisdropped)",
            &[],
        )?
        .unwrap_or(false))
    })
}

pub fn set_inbox_position(id: i64, position: i64) -> Result<()> {
    sql::execute(
        "UPDATE meter.sessions SET inbox_position = $2 WHERE id = $1",
        &[id.into(), position.into()],
    )?;
    Ok(())
}

pub fn set_phase(id: i64, phase: &str) -> Result<()> {
    sql::execute(
        "UPDATE meter.sessions SET phase = $2 WHERE id = $1",
        &[id.into(), phase.into()],
    )?;
    Ok(())
}

/// The stream's working NORMAL batch run, if one is visible: (session, status, pid, alive).
/// A run is alive while its backend exists and is not idle (a CALL stays active
/// from start to end); a run started by this very backend is not (this backend
/// is starting another).
pub fn working_run(stream_id: i64) -> Result<Option<(i64, Status, Option<i32>, bool)>> {
    let row = Spi::connect_mut(|client| -> Result<_> {
        let table = sql::run(client, "SELECT s.id, s.status, s.backend_pid,
                    s.backend_pid IS DISTINCT FROM pg_catalog.pg_backend_pid() AND EXISTS (
                        SELECT FROM pg_catalog.pg_stat_activity a
                         WHERE a.pid = s.backend_pid AND a.backend_start = s.backend_start
                           AND a.state IS DISTINCT FROM 'idle' AND a.state IS DISTINCT FROM 'idle in transaction (aborted)')
               FROM meter.sessions s JOIN meter.streams st ON st.id = s.stream_id
              WHERE s.stream_id = $1 AND st.mode = 'batch' AND s.run_type = 'NORMAL'
                AND s.status IN ('INITIALIZING', 'RUNNING', 'PAUSED', 'USAGE_PUSHING')", &[stream_id.into()])?;
        if table.is_empty() {
            return Ok(None);
        }
        let r = table.first();
        Ok(Some((
            r.get::<i64>(1)?.unwrap(),
            r.get::<String>(2)?.unwrap(),
            r.get::<i32>(3)?,
            r.get::<bool>(4)?.unwrap(),
        )))
    })?;
    Ok(match row {
        Some((id, status, pid, alive)) => Some((id, status.parse().unwrap_or(Status::Running), pid, alive)),
        None => None,
    })
}

/// The working session of a stream that pause/resume act on (batch or realtime).
pub fn working_session_of(stream: &str) -> Result<i64> {
    sql::one::<i64>(
        "SELECT s.id FROM meter.sessions s JOIN meter.streams st ON st.id = s.stream_id
          WHERE st.name = $1 AND s.run_type = 'NORMAL' AND s.status IN ('INITIALIZING', 'RUNNING', 'PAUSED', 'USAGE_PUSHING')
          ORDER BY s.id DESC LIMIT 1",
        &[stream.into()],
    )?
    .ok_or_else(|| MeterError::WrongState(format!("stream \"{stream}\" has no working session to pause or resume")))
}
/// Validates and stores a notification rule (SPEC §7).
pub fn create_notification_rule(
    channel: &str,
    statuses: Option<Vec<String>>,
    previous_statuses: Option<Vec<String>>,
    run_types: Option<Vec<String>>,
    stream: Option<&str>,
) -> Result<i64> {
    if channel.is_empty() || channel.len() > 63 {
        return Err(MeterError::InvalidParameter(format!(
            "channel \"{channel}\" must be 1 to 63 bytes long (a LISTEN channel name)"
        )));
    }
    let statuses = normalise(statuses, "statuses", |s| {
        s.parse::<Status>()
            .map(|s| s.name().to_string())
            .map_err(|e| e.to_string())
    })?;
    let previous = normalise(previous_statuses, "previous_statuses", |s| {
        s.parse::<Status>()
            .map(|s| s.name().to_string())
            .map_err(|e| e.to_string())
    })?;
    let run_types = normalise(run_types, "run_types", |s| {
        s.parse::<RunType>()
            .map(|r| r.name().to_string())
            .map_err(|e| e.to_string())
    })?;
    let stream_id = match stream {
        None => None,
        Some(name) => Some(
            crate::catalog::stream_id(name)?
                .ok_or_else(|| MeterError::NotFound(format!("stream \"{name}\" does not exist")))?,
        ),
    };
    let id = sql::one::<i64>(
        "INSERT INTO meter.notification_rules (channel, statuses, previous_statuses, run_types, stream_id)
         VALUES ($1, $2, $3, $4, $5) RETURNING id",
        &[
            channel.into(),
            statuses.into(),
            previous.into(),
            run_types.into(),
            stream_id.into(),
        ],
    )?;
    Ok(id.expect("INSERT RETURNING yields a row"))
}

fn normalise(
    values: Option<Vec<String>>,
    field: &str,
    parse: impl Fn(&str) -> std::result::Result<String, String>,
) -> Result<Option<Vec<String>>> {
    let Some(values) = values else { return Ok(None) };
    if values.is_empty() {
        return Err(MeterError::InvalidParameter(format!(
            "{field} must not be empty: pass NULL to match any"
        )));
    }
    values
        .iter()
        .map(|v| parse(v).map_err(|e| MeterError::InvalidParameter(format!("{field}: {e}"))))
        .collect::<Result<Vec<_>>>()
        .map(Some)
}

pub fn drop_notification_rule(id: i64) -> Result<()> {
    sql::one::<i64>(
        "DELETE FROM meter.notification_rules WHERE id = $1 RETURNING id",
        &[id.into()],
    )?
    .map(|_| ())
    .ok_or_else(|| MeterError::NotFound(format!("notification rule {id} does not exist")))
}
