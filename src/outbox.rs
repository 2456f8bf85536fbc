//! Downstream consumers of the outbox (SPEC §8): registration, acknowledgements,
//! and the sessions that complete once every consumer has acknowledged them.
//!
//! Reading is `meter.read_flushed` (sql/consumers.sql). Flush ids commit in order
//! (see `locks::outbox`), so acknowledging flush id N never skips a record.

use crate::catalog;
use crate::errors::{MeterError, Result};
use crate::session::Status;
use crate::sessions;
use crate::sql;

/// Registers `name` as a consumer of a stream's flushed records: from the oldest
/// record still in the outbox, or (`from_beginning` false) only those flushed from now on.
pub fn register(name: &str, stream: &str, from_beginning: bool) -> Result<i64> {
    if name.trim().is_empty() {
        return Err(MeterError::InvalidParameter("consumer name must not be empty".into()));
    }
    let stream_id = catalog::stream_id(stream)?
        .ok_or_else(|| MeterError::NotFound(format!("stream \"{stream}\" does not exist")))?;
    let id = sql::one::<i64>(
        "INSERT INTO meter.consumers (name, stream_id, acked_flush_id)
         SELECT $1, $2, CASE WHEN $3 THEN 0 ELSE coalesce((SELECT max(id) FROM meter.flushed), 0) END
         ON CONFLICT (name, stream_id) DO NOTHING
         RETURNING id",
        &[name.into(), stream_id.into(), from_beginning.into()],
    )?;
    id.ok_or_else(|| {
        MeterError::AlreadyExists(format!(
            "consumer \"{name}\" is already registered for stream \"{stream}\""
        ))
    })
}

/// Removes a consumer from a stream; sessions no longer wait for it.
pub fn unregister(name: &str, stream: &str) -> Result<()> {
    let stream_id = sql::one::<i64>(
        "DELETE FROM meter.consumers c USING meter.streams st
          WHERE c.stream_id = st.id AND c.name = $1 AND st.name = $2 RETURNING st.id",
        &[name.into(), stream.into()],
    )?
    .ok_or_else(|| MeterError::NotFound(format!("consumer \"{name}\" is not registered for stream \"{stream}\"")))?;
    settle_stream(stream_id)
}

/// Acknowledges every record of the consumer's streams up to `up_to` (acks only
/// move forward). Returns how many records this acknowledged.
pub fn ack(name: &str, up_to: i64) -> Result<i64> {
    if sql::one::<i64>("SELECT count(*) FROM meter.consumers WHERE name = $1", &[name.into()])?.unwrap_or(0) == 0 {
        return Err(MeterError::NotFound(format!("consumer \"{name}\" is not registered")));
    }
    let last = sql::one::<i64>("SELECT coalesce(max(id), 0) FROM meter.flushed", &[])?.unwrap_or(0);
    if up_to > last {
        return Err(MeterError::InvalidParameter(format!(
            "up_to_flush_id {up_to} is beyond the last flushed record ({last}): acknowledge the flushId you processed"
        )));
    }
    let acked = sql::one::<i64>(
        "WITH moved AS (
             UPDATE meter.consumers c
                SET acked_flush_id = $2, last_ack_at = now()
               FROM meter.consumers old
              WHERE old.id = c.id AND c.name = $1 AND c.acked_flush_id < $2
             RETURNING c.stream_id, old.acked_flush_id AS before)
         SELECT count(f.id) FROM moved m JOIN meter.flushed f ON f.stream_id = m.stream_id AND f.id > m.before AND f.id <= $2",
        &[name.into(), up_to.into()],
    )?
    .unwrap_or(0);
    for stream_id in sql::strings(
        "SELECT stream_id::text FROM meter.consumers WHERE name = $1",
        &[name.into()],
    )? {
        settle_stream(stream_id.parse().unwrap_or_default())?;
    }
    Ok(acked)
}

/// `settle`'s statement, with `$by_last_flush_id` (a `WHEN` branch, or nothing on
/// a 0.1.0 schema, which lacks the column) before the outbox is read.
macro_rules! settle_query {
    ($by_last_flush_id:literal) => {
        concat!(
            "SELECT CASE
                        WHEN NOT EXISTS (SELECT FROM meter.consumers c WHERE c.stream_id = s.stream_id) THEN 'none'
                        WHEN s.meters_flushed + (SELECT coalesce(sum(k.meters_flushed), 0)
                                                   FROM meter.session_counters k WHERE k.session_id = s.id) = 0
                        THEN 'consumed' ",
            $by_last_flush_id,
            " WHEN NOT EXISTS (
                             SELECT FROM meter.flushed f
                              WHERE f.session_id = s.id AND f.stream_id <= s.stream_id
                                AND (f.stream_id, f.id) > (s.stream_id, (SELECT min(c.acked_flush_id) FROM meter.consumers c
                                                                          WHERE c.stream_id = s.stream_id)))
                        THEN 'consumed'
                        ELSE 'waiting'
                    END
               FROM meter.sessions s WHERE s.id = $1 AND s.status = 'PUSH_COMPLETED'"
        )
    };
}

/// A session whose push completed: COMPLETED when the stream has no consumer;
/// CONSUME_COMPLETED then COMPLETED once every consumer has acknowledged all its
/// records; otherwise it waits in PUSH_COMPLETED.
///
/// A session that flushed nothing (its counts say so) is consumed at once. One
/// that did is consumed once the slowest consumer's acknowledgement reaches its
/// newest flush id (`meter.sessions.last_flush_id`): one comparison, whatever the
/// backlog, so a consumer catching up on a long outbox is not slowed by the
/// sessions waiting for it. A session that flushed only before 0.2.0 has no such
/// id; for it, "all its records" is asked as "none of them past the slowest
/// consumer's acknowledgement", along the stream's outbox index `(stream_id, id)`
/// from that point: the row comparison starts the scan there, and fits that index
/// only.
pub fn settle(session_id: i64) -> Result<()> {
    let query = if sessions::has_last_flush_id()? {
        settle_query!(
            "WHEN s.last_flush_id IS NOT NULL
             THEN CASE WHEN s.last_flush_id <= (SELECT min(c.acked_flush_id) FROM meter.consumers c
                                                 WHERE c.stream_id = s.stream_id)
                       THEN 'consumed' ELSE 'waiting' END"
        )
    } else {
        settle_query!("")
    };
    let state = sql::by_index_lookups(|| sql::one::<String>(query, &[session_id.into()]))?;
    match state.as_deref() {
        Some("none") => {
            sessions::transition(session_id, Status::Completed, None)?;
        }
        Some("consumed") => {
            sessions::transition(session_id, Status::ConsumeCompleted, None)?;
            sessions::transition(session_id, Status::Completed, None)?;
        }
        _ => {}
    }
    Ok(())
}

/// Settles every session of the stream that waits for its consumers.
fn settle_stream(stream_id: i64) -> Result<()> {
    let waiting = sql::strings(
        "SELECT id::text FROM meter.sessions WHERE stream_id = $1 AND status = 'PUSH_COMPLETED' ORDER BY id",
        &[stream_id.into()],
    )?;
    for id in waiting {
        settle(id.parse().unwrap_or_default())?;
    }
    Ok(())
}
