//! Flushing meters (SPEC §8): each meter's record goes to the outbox
//! `meter.flushed` in the same statement that resets it and starts its next
//! period, and rings the `meter_flushed` doorbell in the same transaction.
//!
//! Rust reads the meters, decides what happens to each (`plan`) and builds their
//! records (`flushed_record`); one set-based statement per batch of meters does it.

use std::collections::HashMap;

use jiff::Timestamp;
use pgrx::datum::TimestampWithTimeZone;
use pgrx::prelude::*;

use crate::catalog::{self, MeterTypeSettings};
use crate::convert::{from_pg_micros, iso_utc, to_timestamptz};
use crate::errors::Result;
use crate::flushed_record::{MeterRecord, RecordContext, COLUMNS};
use crate::gucs;
use crate::locks;
use crate::schedule::{period_after_flush_at, period_after_period_end, Period};
use crate::sql;

/// The channel each flushed record is announced on.
const FLUSHED_CHANNEL: &std::ffi::CStr = c"meter_flushed";

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
    /// The newest flush id among them.
    pub last_flush_id: Option<i64>,
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
    period_end: Option<Timestamp>,
    /// Its period counts distinct values (rows in `meter.meter_distinct`).
    counts_distinct: bool,
    record: MeterRecord,
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
        return (end, candidate.record.record_count > 0, Action::Close, None);
    }
    if candidate.record.delete_on_reset {
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
    // The records are palloc'd: one chunk's worth at a time.
    sql::in_chunk_context(|| flush_chunk(stream_id, session_id, scope, limit, after))
}

fn flush_chunk(stream_id: i64, session_id: Option<i64>, scope: Scope, limit: i64, after: Position) -> Result<Flushed> {
    let candidates = select(stream_id, scope, limit, after)?;
    let Some(last) = candidates.last() else {
        return Ok(Flushed {
            next: after,
            ..Flushed::default()
        });
    };
    let next = Position {
        period_end: last.period_end,
        id: last.record.id,
    };
    let mut type_ids: Vec<i64> = candidates.iter().map(|c| c.record.meter_type_id).collect();
    type_ids.sort_unstable();
    type_ids.dedup();
    let types = catalog::load_meter_types_by_id(&type_ids)?;
    let meter_key = sql::one::<String>("SELECT meter_key FROM meter.streams WHERE id = $1", &[stream_id.into()])?
        .unwrap_or_default();
    let mut periods = HashMap::new();
    let mut columns = Columns::default();
    // The records written, by meter: meter id, candidate, period end (ISO-8601). The plan
    // goes in meter order, which the outbox takes as it is.
    let mut records = Vec::new();
    let mut in_meter_order: Vec<usize> = (0..candidates.len()).collect();
    in_meter_order.sort_unstable_by_key(|&index| candidates[index].record.id);
    for index in in_meter_order {
        let candidate = &candidates[index];
        let settings = &types[&candidate.record.meter_type_id];
        let (end, emit, action, period) = plan(candidate, settings, scope, &mut periods);
        let period_end = emit.then(|| iso_utc(end));
        let record = period_end.as_deref().map(|period_end| {
            candidate.record.to_jsonb(&RecordContext {
                meter_type_name: &settings.name,
                meter_key: &meter_key,
                period_end,
            })
        });
        if let Some(period_end) = period_end {
            records.push((candidate.record.id, index, period_end));
        }
        columns.ids.push(candidate.record.id);
        columns.user_ids.push(candidate.record.user_id.as_str());
        columns.records.push(record.map(pg_sys::Datum::from));
        columns.actions.push(action.name());
        columns.new_starts.push(to_timestamptz(period.map_or(end, |p| p.start)));
        columns.new_ends.push(period.and_then(|p| p.end).map(to_timestamptz));
        if candidate.counts_distinct && action != Action::Delete {
            columns.distinct_counted.push(candidate.record.id);
        }
    }
    locks::outbox()?;
    let written = apply(stream_id, session_id, columns)?;
    ring_doorbell(&written, |meter_id, first, out| {
        let at = records
            .binary_search_by_key(&meter_id, |(id, ..)| *id)
            .expect("every record written was built for a meter of the chunk");
        let (_, index, ref period_end) = records[at];
        let record = &candidates[index].record;
        let context = RecordContext {
            meter_type_name: &types[&record.meter_type_id].name,
            meter_key: &meter_key,
            period_end,
        };
        record.write_text(&context, Some(first), out);
    });
    Ok(Flushed {
        meters: candidates.len() as i64,
        records: written.flush_ids.len() as i64,
        last_flush_id: written.flush_ids.last().copied(),
        next,
    })
}

fn select(stream_id: i64, scope: Scope, limit: i64, after: Position) -> Result<Vec<Candidate>> {
    let after_end = after
        .period_end
        .map_or_else(TimestampWithTimeZone::negative_infinity, to_timestamptz);
    let (query, args): (String, Vec<pgrx::datum::DatumWithOid>) = match scope {
        Scope::Due { as_of, users: None } => (
            format!(
                "SELECT period_end, aggregation = 'unique_count', {COLUMNS}
                   FROM meter.meters
                  WHERE stream_id = $1 AND closed_at IS NULL AND period_end <= $2 AND (period_end, id) > ($4, $5)
                  ORDER BY period_end, id LIMIT $3   -- the meters_due index order
                  FOR UPDATE SKIP LOCKED"
            ),
            vec![
                stream_id.into(),
                to_timestamptz(as_of).into(),
                limit.into(),
                after_end.into(),
                after.id.into(),
            ],
        ),
        // The users' meters (a realtime call's), looked up by user and kept here
        // if due. With `period_end <= $2` in the query, the planner would go by
        // the meters_due index when it believes few meters are due, and read
        // every due meter of the stream, all of them at a month's end.
        Scope::Due { users: Some(users), .. } => (
            format!(
                "SELECT period_end, aggregation = 'unique_count', {COLUMNS}
                   FROM meter.meters
                  WHERE stream_id = $1 AND user_id = ANY ($2) AND closed_at IS NULL
                  ORDER BY period_end, id
                  FOR UPDATE SKIP LOCKED"
            ),
            vec![stream_id.into(), users.to_vec().into()],
        ),
        Scope::All { at } => (
            format!(
                "SELECT period_end, aggregation = 'unique_count', {COLUMNS}
                   FROM meter.meters
                  WHERE stream_id = $1 AND closed_at IS NULL AND period_start < $2 AND id > $4
                  ORDER BY id LIMIT $3
                  FOR UPDATE"
            ),
            vec![
                stream_id.into(),
                to_timestamptz(at).into(),
                limit.into(),
                after.id.into(),
            ],
        ),
    };
    let mut candidates = Vec::new();
    let mut read = || {
        sql::for_each_row(&query, &args, |values, nulls| {
            // SAFETY: a row of the query above: the period end, a boolean, then COLUMNS.
            candidates.push(Candidate {
                period_end: (!nulls[0]).then(|| from_pg_micros(values[0].value() as i64)).flatten(),
                counts_distinct: !nulls[1] && values[1].value() != 0,
                record: unsafe { MeterRecord::read(values, nulls, 2) },
            });
            Ok(())
        })
    };
    match scope {
        Scope::Due { as_of, users: Some(_) } => {
            sql::with_generic_lookups(read)?;
            let due = |c: &Candidate| c.period_end.is_some_and(|end| end <= as_of);
            candidates.retain(|c| due(c) && (c.period_end, c.record.id) > (after.period_end, after.id));
            candidates.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
        }
        _ => read()?,
    }
    Ok(candidates)
}

/// The plan of a chunk, one entry per meter.
#[derive(Default)]
struct Columns<'a> {
    ids: Vec<i64>,
    user_ids: Vec<&'a str>,
    /// The record to write, when the meter is flushed (not only closed).
    records: Vec<Option<pg_sys::Datum>>,
    actions: Vec<&'static str>,
    new_starts: Vec<TimestampWithTimeZone>,
    new_ends: Vec<Option<TimestampWithTimeZone>>,
    /// The meters whose distinct values are forgotten (deleted meters lose
    /// theirs with them).
    distinct_counted: Vec<i64>,
}

/// One statement: write the outbox records, then reset, close or delete the
/// meters. All its parts see the meters as they were before it. It returns the
/// flush ids it gave, with their meters, and whether the notification queue is
/// under pressure.
const APPLY: &str = "WITH plan AS (
             SELECT * FROM unnest($1::bigint[], $4::text[], $5::timestamptz[], $6::timestamptz[])
                 AS p(id, action, new_start, new_end)),
         outbox AS (
             -- In the arrays' order (meter order); unnested in the select list, the
             -- records are not copied into a tuplestore on the way.
             INSERT INTO meter.flushed (stream_id, session_id, meter_id, user_id, record)
             SELECT $7, $8, r.id, r.user_id, r.record
               FROM (SELECT pg_catalog.unnest($1::bigint[]) AS id, pg_catalog.unnest($2::text[]) AS user_id,
                            pg_catalog.unnest($3::jsonb[]) AS record) r
              WHERE r.record IS NOT NULL
             RETURNING id, meter_id),
         deleted AS (
             DELETE FROM meter.meters m USING plan p
              WHERE m.id = p.id AND p.action = 'delete'),
         forgotten AS (
             DELETE FROM meter.meter_distinct d WHERE d.meter_id = ANY ($10::bigint[])),
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
              WHERE m.id = p.id AND p.action <> 'delete' AND t.id = m.meter_type_id)
         SELECT coalesce(pg_catalog.array_agg(o.id ORDER BY o.id), '{}'),
                coalesce(pg_catalog.array_agg(o.meter_id ORDER BY o.id), '{}'),
                pg_catalog.pg_notification_queue_usage() * 100 >= $9
           FROM outbox o";

/// What `APPLY` wrote: flush ids in order, with the meter of each.
struct Written {
    flush_ids: Vec<i64>,
    meter_ids: Vec<i64>,
    queue_pressure: bool,
}

/// Runs `APPLY` for one chunk's plan. It finds the chunk's meters by index
/// (`by_index_lookups`): left to itself, the planner scans the whole table for
/// every chunk, which is quadratic over a million-meter flush.
fn apply(stream_id: i64, session_id: Option<i64>, c: Columns) -> Result<Written> {
    let records = sql::ElementType::of(pg_sys::JSONBOID).array_of(c.records, &mut sql::ArrayBuffers::default());
    let args = [
        c.ids.into(),
        c.user_ids.into(),
        // SAFETY: a jsonb[] just built in the current memory context.
        unsafe { pgrx::datum::DatumWithOid::new(records, pg_sys::JSONBARRAYOID) },
        c.actions.into(),
        c.new_starts.into(),
        c.new_ends.into(),
        stream_id.into(),
        session_id.into(),
        crate::gucs::NOTIFY_QUEUE_LIMIT.get().into(),
        c.distinct_counted.into(),
    ];
    sql::by_index_lookups(|| {
        Spi::connect_mut(|client| {
            let row = sql::run(client, APPLY, &args)?.first();
            Ok(Written {
                flush_ids: row.get::<Vec<i64>>(1)?.unwrap_or_default(),
                meter_ids: row.get::<Vec<i64>>(2)?.unwrap_or_default(),
                queue_pressure: row.get::<bool>(3)?.unwrap_or(false),
            })
        })
    })
}

/// Rings the `meter_flushed` doorbell for each record written, in flush-id order:
/// the record's JSON with its flushId put first (the same JSON as merging it in),
/// which `write_record(meter_id, first_field, out)` writes. A record too long for
/// a notification rings with its ids only. The chunk rings once, naming its flush
/// ids, under queue pressure, or when its records would take the transaction past
/// `meter_ext.notify_record_limit` records announced one by one.
fn ring_doorbell(written: &Written, write_record: impl Fn(i64, &[u8], &mut Vec<u8>)) {
    let (Some(first), Some(last)) = (written.flush_ids.first(), written.flush_ids.last()) else {
        return;
    };
    let count = written.flush_ids.len();
    let summary = if written.queue_pressure {
        Some("queuePressure")
    } else if !announce_one_by_one(count, gucs::NOTIFY_RECORD_LIMIT.get()) {
        Some("recordLimit")
    } else {
        None
    };
    if let Some(reason) = summary {
        return notify(
            &mut format!("{{\"count\": {count}, \"flushIds\": [{first}, {last}], \"{reason}\": true}}").into_bytes(),
        );
    }
    let mut payload = Vec::new();
    for (flush_id, meter_id) in written.flush_ids.iter().zip(&written.meter_ids) {
        payload.clear();
        write_record(*meter_id, format!("\"flushId\": {flush_id}").as_bytes(), &mut payload);
        if payload.len() >= NOTIFY_PAYLOAD_LIMIT {
            payload.clear();
            payload.extend_from_slice(
                format!("{{\"flushId\": {flush_id}, \"meterId\": {meter_id}, \"truncated\": true}}").as_bytes(),
            );
        }
        notify(&mut payload);
    }
}

thread_local! {
    /// Records announced one by one so far, and the local id of the transaction
    /// that announced them.
    static ANNOUNCED: std::cell::Cell<(pg_sys::LocalTransactionId, usize)> = const { std::cell::Cell::new((0, 0)) };
}

/// Whether `count` more records may be announced one by one in this transaction,
/// which then counts them: not if they would take it past `limit`. PostgreSQL
/// holds every notification of a transaction in memory until it commits.
fn announce_one_by_one(count: usize, limit: i32) -> bool {
    // SAFETY: this backend's own PGPROC, set up before any SQL runs.
    let transaction = unsafe { (*pg_sys::MyProc).lxid };
    let (announced_in, announced) = ANNOUNCED.get();
    let announced = if announced_in == transaction { announced } else { 0 };
    let within = announced + count <= usize::try_from(limit).unwrap_or(0);
    if within {
        ANNOUNCED.set((transaction, announced + count));
    }
    within
}

/// NOTIFY payloads must be shorter than this many bytes.
const NOTIFY_PAYLOAD_LIMIT: usize = 8000;

/// NOTIFY meter_flushed with `payload`, as `pg_notify` does without its two
/// copies through text.
fn notify(payload: &mut Vec<u8>) {
    payload.push(0);
    // SAFETY: NUL-terminated strings; Async_Notify copies them (and raises an
    // ERROR, not a crash, for a payload too long).
    unsafe {
        pgrx::pg_sys::ffi::pg_guard_ffi_boundary(|| Async_Notify(FLUSHED_CHANNEL.as_ptr(), payload.as_ptr().cast()))
    };
    payload.pop();
}

unsafe extern "C-unwind" {
    /// commands/async.h, which pgrx does not bind.
    fn Async_Notify(channel: *const std::ffi::c_char, payload: *const std::ffi::c_char);
}

/// How many meters of the stream a flush would take now (DEBUG runs report it).
pub fn count_due(stream_id: i64, as_of: Timestamp) -> Result<i64> {
    Ok(sql::one::<i64>(
        "SELECT count(*) FROM meter.meters WHERE stream_id = $1 AND closed_at IS NULL AND period_end <= $2",
        &[stream_id.into(), to_timestamptz(as_of).into()],
    )?
    .unwrap_or(0))
}
