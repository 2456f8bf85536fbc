//! Flushing meters (SPEC §8): each meter's record goes to the outbox
//! `meter.flushed` (and rings the `meter_flushed` doorbell) in the same statement
//! that resets it and starts its next period.
//!
//! Rust decides, per meter, what happens (`plan`); one set-based statement per
//! batch of meters does it.

use std::collections::HashMap;

use jiff::Timestamp;
use pgrx::datum::TimestampWithTimeZone;
use pgrx::prelude::*;

use crate::catalog::{self, MeterTypeSettings};
use crate::convert::{to_timestamp, to_timestamptz};
use crate::errors::Result;
use crate::locks;
use crate::schedule::{period_after_flush_at, period_after_period_end, Period};
use crate::sql;

/// The channel each flushed record is announced on.
pub const FLUSHED_CHANNEL: &str = "meter_flushed";

/// Which meters a flush takes.
#[derive(Debug, Clone, Copy)]
pub enum Scope<'a> {
    /// Meters whose period ended by `as_of` (optionally only these users'): the
    /// next period runs from the old end to the first occurrence after `as_of`.
    Due {
        as_of: Timestamp,
        users: Option<&'a [String]>,
    },
    /// Every meter of the stream (flush by stream execution): the period ends at
    /// `at`, and the next one starts there.
    All { at: Timestamp },
}

/// What a flush did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Flushed {
    /// Meters taken (reset, closed or deleted).
    pub meters: i64,
    /// Records written to the outbox.
    pub records: i64,
    /// Where the next flush of the same pass starts.
    pub next: Position,
}

/// Where a pass of flushes (one scope, one transaction) has got to: just after
/// the last meter taken, in the scope's order (period end then id, or id). A
/// flushed meter's old index entries stay visible to its own transaction, so a
/// pass that started from the beginning each time would walk every meter it had
/// already flushed: quadratic over a million meters in one `run_stream`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Position {
    period_end: Option<Timestamp>,
    id: i64,
}

impl Position {
    /// Before every meter.
    pub const START: Position = Position {
        period_end: None,
        id: 0,
    };
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    /// Reset and start the next period.
    Roll,
    /// The meter type's active_to has passed: no next period.
    Close,
    /// delete_on_reset: gone after its flush.
    Delete,
}

impl Action {
    fn name(self) -> &'static str {
        match self {
            Action::Roll => "roll",
            Action::Close => "close",
            Action::Delete => "delete",
        }
    }
}

/// A meter a flush takes, as read before deciding.
struct Candidate {
    id: i64,
    type_id: i64,
    period_end: Option<Timestamp>,
    has_usage: bool,
    delete_on_reset: bool,
}

/// What happens to one meter (SPEC §8): flushed at period end even without
/// usage; once its type's active_to has passed, flushed only if it was updated in
/// the period, and closed; deleted after its flush when delete_on_reset.
fn plan(
    candidate: &Candidate,
    settings: &MeterTypeSettings,
    scope: Scope,
    periods: &mut HashMap<(i64, Timestamp), Period>,
) -> (Timestamp, bool, Action, Option<Period>) {
    let end = match scope {
        Scope::Due { as_of, .. } => candidate.period_end.unwrap_or(as_of),
        Scope::All { at } => at,
    };
    if settings.active_to.is_some_and(|to| to <= end) {
        return (end, candidate.has_usage, Action::Close, None);
    }
    if candidate.delete_on_reset {
        return (end, true, Action::Delete, None);
    }
    let period = *periods.entry((settings.id, end)).or_insert_with(|| match scope {
        Scope::Due { as_of, .. } => period_after_period_end(&settings.schedule, &settings.tz, end, as_of),
        Scope::All { at } => period_after_flush_at(&settings.schedule, &settings.tz, at),
    });
    (end, true, Action::Roll, Some(period))
}

/// Flushes up to `limit` meters of the stream; call again while it returns `limit`
/// meters. Meters locked by someone else (a realtime ingest) are skipped when
/// flushing due meters: they are flushed by that ingest or the next scan.
pub fn flush(stream_id: i64, session_id: Option<i64>, scope: Scope, limit: i64, after: Position) -> Result<Flushed> {
    let candidates = select(stream_id, scope, limit, after)?;
    let Some(last) = candidates.last() else {
        return Ok(Flushed {
            next: after,
            ..Flushed::default()
        });
    };
    let next = Position {
        period_end: last.period_end,
        id: last.id,
    };
    let mut type_ids: Vec<i64> = candidates.iter().map(|c| c.type_id).collect();
    type_ids.sort_unstable();
    type_ids.dedup();
    let types = catalog::load_meter_types_by_id(&type_ids)?;
    let mut periods = HashMap::new();
    let mut columns = Columns::default();
    for candidate in &candidates {
        let (end, emit, action, period) = plan(candidate, &types[&candidate.type_id], scope, &mut periods);
        columns.ids.push(candidate.id);
        columns.record_ends.push(to_timestamptz(end));
        columns.emit.push(emit);
        columns.actions.push(action.name().to_string());
        columns.new_starts.push(to_timestamptz(period.map_or(end, |p| p.start)));
        columns.new_ends.push(period.and_then(|p| p.end).map(to_timestamptz));
    }
    locks::outbox()?;
    let records = apply(session_id, columns)?;
    Ok(Flushed {
        meters: candidates.len() as i64,
        records,
        next,
    })
}

fn select(stream_id: i64, scope: Scope, limit: i64, after: Position) -> Result<Vec<Candidate>> {
    let after_end = after
        .period_end
        .map_or_else(TimestampWithTimeZone::negative_infinity, to_timestamptz);
    let (query, args): (&str, Vec<pgrx::datum::DatumWithOid>) = match scope {
        Scope::Due { as_of, users } => (
            "SELECT id, meter_type_id, period_end, record_count > 0, delete_on_reset
               FROM meter.meters
              WHERE stream_id = $1 AND closed_at IS NULL AND period_end <= $2
                AND (period_end, id) > ($5, $6)
                AND ($4::text[] IS NULL OR user_id = ANY ($4))
              ORDER BY period_end, id LIMIT $3   -- the meters_due index order
              FOR UPDATE SKIP LOCKED",
            vec![
                stream_id.into(),
                to_timestamptz(as_of).into(),
                limit.into(),
                users.map(|u| u.to_vec()).into(),
                after_end.into(),
                after.id.into(),
            ],
        ),
        Scope::All { at } => (
            "SELECT id, meter_type_id, period_end, record_count > 0, delete_on_reset
               FROM meter.meters
              WHERE stream_id = $1 AND closed_at IS NULL AND period_start < $2 AND id > $4
              ORDER BY id LIMIT $3
              FOR UPDATE",
            vec![
                stream_id.into(),
                to_timestamptz(at).into(),
                limit.into(),
                after.id.into(),
            ],
        ),
    };
    Spi::connect_mut(|client| {
        let rows = sql::run(client, query, &args)?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            out.push(Candidate {
                id: r.get::<i64>(1)?.unwrap(),
                type_id: r.get::<i64>(2)?.unwrap(),
                period_end: r.get::<TimestampWithTimeZone>(3)?.and_then(to_timestamp),
                has_usage: r.get::<bool>(4)?.unwrap(),
                delete_on_reset: r.get::<bool>(5)?.unwrap(),
            });
        }
        Ok(out)
    })
}

#[derive(Default)]
struct Columns {
    ids: Vec<i64>,
    record_ends: Vec<TimestampWithTimeZone>,
    emit: Vec<bool>,
    actions: Vec<String>,
    new_starts: Vec<TimestampWithTimeZone>,
    new_ends: Vec<Option<TimestampWithTimeZone>>,
}

/// One statement: write the outbox records (with the period end the flush gives
/// them), ring the doorbell, then reset, close or delete the meters. All its
/// parts see the meters as they were before it.
const APPLY: &str = "WITH plan AS (
             SELECT * FROM unnest($1::bigint[], $2::timestamptz[], $3::boolean[], $4::text[], $5::timestamptz[],
                                  $6::timestamptz[])
                 AS p(id, record_end, emit, action, new_start, new_end)),
         outbox AS (
             INSERT INTO meter.flushed (stream_id, session_id, meter_id, user_id, record)
             SELECT m.stream_id, $7, m.id, m.user_id,
                    -- The period end this flush gives the record, when it is not the
                    -- meter's own (a flush by stream execution, a meter without an end):
                    -- merging it in decodes and re-encodes the record, so only then.
                    CASE WHEN m.period_end IS NOT DISTINCT FROM p.record_end THEN meter.record_json(m, t, s)
                         ELSE meter.record_json(m, t, s)
                              || pg_catalog.jsonb_build_object('periodEnd', meter.iso_utc(p.record_end)) END
               FROM plan p
               JOIN meter.meters m ON m.id = p.id
               JOIN meter.meter_types t ON t.id = m.meter_type_id
               JOIN meter.streams s ON s.id = m.stream_id
              WHERE p.emit
              ORDER BY m.id
             RETURNING id, meter_id, record),
         queue AS (
             SELECT pg_catalog.pg_notification_queue_usage() * 100 >= $9 AS is_full),
         doorbell AS (
             SELECT pg_catalog.pg_notify($8, CASE WHEN pg_catalog.octet_length(full_payload) < 8000 THEN full_payload
                    ELSE pg_catalog.jsonb_build_object('flushId', o.id, 'meterId', o.meter_id, 'truncated', true)::text END)
               -- The record's text with flushId put first: the same JSON as merging it
               -- into the jsonb, without decoding and re-encoding every record again.
               -- (substr from the second character copies the rest without counting
               -- characters, as left(…, -1) would.)
               FROM (SELECT o.*, '{\"flushId\": ' || o.id || ', ' || pg_catalog.substr(o.record::text, 2) AS full_payload
                       FROM outbox o ORDER BY o.id) o
              WHERE NOT (SELECT is_full FROM queue)
             UNION ALL
             -- Under queue pressure: one doorbell for the chunk, naming its flush ids.
             SELECT pg_catalog.pg_notify($8, pg_catalog.jsonb_build_object(
                        'flushIds', pg_catalog.jsonb_build_array(min(o.id), max(o.id)), 'count', count(*),
                        'queuePressure', true)::text)
               FROM outbox o
             HAVING count(*) > 0 AND (SELECT is_full FROM queue)),
         deleted AS (
             DELETE FROM meter.meters m USING plan p
              WHERE m.id = p.id AND p.action = 'delete' RETURNING m.id),
         forgotten AS (
             DELETE FROM meter.meter_distinct d USING plan p
              WHERE d.meter_id = p.id AND p.action <> 'delete'),
         reset AS (
             UPDATE meter.meters m
                SET value = CASE WHEN t.aggregation IN ('sum', 'increment', 'unique_count') THEN 0 END,
                    groups = '[]', carry_first = '{}', carry_last = '{}', aggregation_state = NULL,
                    first_record_at = NULL, last_record_at = NULL, record_count = 0,
                    aggregation = t.aggregation, unit = t.unit, timezone = t.timezone,
                    period_start = p.new_start, period_end = p.new_end,
                    closed_at = CASE WHEN p.action = 'close' THEN pg_catalog.now() END,
                    updated_at = pg_catalog.now()
               FROM plan p, meter.meter_types t
              WHERE m.id = p.id AND p.action <> 'delete' AND t.id = m.meter_type_id
             RETURNING m.id)
         SELECT (SELECT count(*) FROM outbox) + 0 * (SELECT count(*) FROM doorbell)
              + 0 * (SELECT count(*) FROM deleted) + 0 * (SELECT count(*) FROM reset)";

/// Runs `APPLY` for one chunk's plan. It finds the chunk's meters by index
/// (`by_index_lookups`): left to itself, the planner scans the whole table for
/// every chunk, which is quadratic over a million-meter flush.
fn apply(session_id: Option<i64>, c: Columns) -> Result<i64> {
    let args = [
        c.ids.into(),
        c.record_ends.into(),
        c.emit.into(),
        c.actions.into(),
        c.new_starts.into(),
        c.new_ends.into(),
        session_id.into(),
        FLUSHED_CHANNEL.into(),
        crate::gucs::NOTIFY_QUEUE_LIMIT.get().into(),
    ];
    let records = sql::by_index_lookups(|| sql::one::<i64>(APPLY, &args))?;
    Ok(records.unwrap_or(0))
}

/// How many meters of the stream a flush would take now (DEBUG runs report it).
pub fn count_due(stream_id: i64, as_of: Timestamp) -> Result<i64> {
    Ok(sql::one::<i64>(
        "SELECT count(*) FROM meter.meters WHERE stream_id = $1 AND closed_at IS NULL AND period_end <= $2",
        &[stream_id.into(), to_timestamptz(as_of).into()],
    )?
    .unwrap_or(0))
}
