//! The SQL API: thin `#[pg_extern]`s that convert arguments and call the domain.
//! Functions that write run as their owner with a pinned `search_path`; what each
//! role may call is granted in `sql/grants.sql`.

use pgrx::datum::{Interval, TimestampWithTimeZone};
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;
use pgrx::{AnyNumeric, JsonB};

use crate::catalog::{self, MeterTypeSpec, StreamMode, StreamSpec};
use crate::convert::{self, to_timestamp, to_timestamptz, transaction_now};
use crate::errors::{MeterError, SqlResult};
use crate::inbox;
use crate::jsonb::RawJsonb;
use crate::outbox;
use crate::processor::{Input, Mode, Outcome, Processor};
use crate::realtime;
use crate::retention;
use crate::run;
use crate::schedule::{parse_timezone, Schedule};
use crate::session::RunType;
use crate::sessions;
use crate::sql;

#[pg_extern(security_definer)]
#[search_path(pg_catalog, pg_temp)]
#[allow(clippy::too_many_arguments)]
fn create_meter_type(
    name: &str,
    aggregation: default!(&str, "'sum'"),
    reset_schedule: default!(&str, "'@monthly'"),
    timezone: default!(&str, "'UTC'"),
    unit: default!(&str, "'unit'"),
    active_from: default!(Option<TimestampWithTimeZone>, "NULL"),
    active_to: default!(Option<TimestampWithTimeZone>, "NULL"),
    category: default!(&str, "'DEFAULT'"),
) -> SqlResult<i64> {
    Ok(catalog::create_meter_type(MeterTypeSpec {
        name: name.to_string(),
        unit: unit.to_string(),
        aggregation: aggregation.to_string(),
        reset_schedule: reset_schedule.to_string(),
        timezone: timezone.to_string(),
        active_from,
        active_to,
        category: category.to_string(),
    })?)
}

#[pg_extern(security_definer)]
#[search_path(pg_catalog, pg_temp)]
#[allow(clippy::too_many_arguments)]
fn alter_meter_type(
    name: &str,
    new_name: default!(Option<&str>, "NULL"),
    unit: default!(Option<&str>, "NULL"),
    aggregation: default!(Option<&str>, "NULL"),
    reset_schedule: default!(Option<&str>, "NULL"),
    timezone: default!(Option<&str>, "NULL"),
    active_from: default!(Option<TimestampWithTimeZone>, "NULL"),
    active_to: default!(Option<TimestampWithTimeZone>, "NULL"),
    category: default!(Option<&str>, "NULL"),
) -> SqlResult<i64> {
    Ok(catalog::alter_meter_type(
        name,
        new_name,
        unit,
        aggregation,
        reset_schedule,
        timezone,
        active_from,
        active_to,
        category,
    )?)
}

#[pg_extern(security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn drop_meter_type(name: &str, cascade: default!(bool, "false")) -> SqlResult<()> {
    Ok(catalog::drop_meter_type(name, cascade)?)
}

#[pg_extern(security_definer)]
#[search_path(pg_catalog, pg_temp)]
#[allow(clippy::too_many_arguments)]
fn create_stream(
    name: &str,
    guiding_rules: default!(JsonB, "'[]'"),
    mode: default!(&str, "'batch'"),
    flush_by: default!(&str, "'period_end'"),
    meter_key: default!(Option<&str>, "NULL"),
    user_id_field: default!(&str, "'userId'"),
    value_field: default!(&str, "'value'"),
    timestamp_field: default!(&str, "'timestamp'"),
    id_field: default!(&str, "'id'"),
    auto_create_meters: default!(bool, "false"),
    audit: default!(bool, "true"),
) -> SqlResult<i64> {
    Ok(catalog::create_stream(StreamSpec {
        name: name.to_string(),
        meter_key: meter_key.unwrap_or(name).to_string(),
        mode: mode.to_string(),
        flush_by: flush_by.to_string(),
        guiding_rules: guiding_rules.0,
        user_id_field: user_id_field.to_string(),
        value_field: value_field.to_string(),
        timestamp_field: timestamp_field.to_string(),
        id_field: id_field.to_string(),
        auto_create_meters,
        audit,
    })?)
}

/// Changes a stream; NULL leaves a setting as it is.
#[pg_extern(security_definer)]
#[search_path(pg_catalog, pg_temp)]
#[allow(clippy::too_many_arguments)]
fn alter_stream(
    name: &str,
    guiding_rules: default!(Option<JsonB>, "NULL"),
    mode: default!(Option<&str>, "NULL"),
    flush_by: default!(Option<&str>, "NULL"),
    meter_key: default!(Option<&str>, "NULL"),
    user_id_field: default!(Option<&str>, "NULL"),
    value_field: default!(Option<&str>, "NULL"),
    timestamp_field: default!(Option<&str>, "NULL"),
    id_field: default!(Option<&str>, "NULL"),
    auto_create_meters: default!(Option<bool>, "NULL"),
    audit: default!(Option<bool>, "NULL"),
) -> SqlResult<i64> {
    Ok(catalog::alter_stream(name, |spec| {
        let set = |target: &mut String, value: Option<&str>| {
            if let Some(v) = value {
                *target = v.to_string();
            }
        };
        if let Some(rules) = guiding_rules {
            spec.guiding_rules = rules.0;
        }
        set(&mut spec.mode, mode);
        set(&mut spec.flush_by, flush_by);
        set(&mut spec.meter_key, meter_key);
        set(&mut spec.user_id_field, user_id_field);
        set(&mut spec.value_field, value_field);
        set(&mut spec.timestamp_field, timestamp_field);
        set(&mut spec.id_field, id_field);
        spec.auto_create_meters = auto_create_meters.unwrap_or(spec.auto_create_meters);
        spec.audit = audit.unwrap_or(spec.audit);
    })?)
}

#[pg_extern(security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn drop_stream(name: &str, cascade: default!(bool, "false")) -> SqlResult<()> {
    Ok(catalog::drop_stream(name, cascade)?)
}

/// Sends usage records to a stream: one JSON object or an array of them.
#[pg_extern(security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn ingest(
    stream: &str,
    records: RawJsonb,
) -> Result<TableIterator<'static, (name!(accepted, i64), name!(duplicates, i64), name!(rejected, i64))>, ErrorReport> {
    let stream = catalog::load_stream(stream)?;
    // SAFETY: the argument datum lives for the whole call.
    let batch = unsafe { inbox::Batch::new(records.0) }?;
    let result = inbox::ingest(&stream, &batch)?;
    Ok(TableIterator::once((
        result.accepted,
        result.duplicates,
        result.rejected,
    )))
}

/// What each record would do if processed now, without changing anything.
#[pg_extern(security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn preview(
    stream: &str,
    records: RawJsonb,
) -> Result<
    TableIterator<
        'static,
        (
            name!(n, i32),
            name!(outcome, String),
            name!(rule, Option<String>),
            name!(meter_id, Option<i64>),
            name!(meter_type, Option<String>),
            name!(user_id, Option<String>),
            name!(value, Option<AnyNumeric>),
            name!(new_meter, bool),
            name!(reason, Option<String>),
        ),
    >,
    ErrorReport,
> {
    let stream = catalog::load_stream(stream)?;
    // SAFETY: the argument datum lives for the whole call.
    let projection = stream.projection();
    let inputs: Vec<Input> = unsafe { inbox::Batch::new(records.0) }?
        .inputs(usize::MAX, &projection)
        .flatten()
        .collect();
    let mut processor = Processor::new(&stream, Mode::Simulate, None, transaction_now())?;
    let outcomes = processor.process(&inputs)?;
    let rows: Vec<_> = outcomes
        .into_iter()
        .enumerate()
        .map(|(i, outcome)| {
            let n = i as i32 + 1;
            match outcome {
                Outcome::Metered {
                    rule,
                    meter_id,
                    meter_type,
                    user_id,
                    value,
                    new_meter,
                } => (
                    n,
                    "metered".to_string(),
                    Some(rule.to_string()),
                    meter_id,
                    Some(meter_type.to_string()),
                    Some(user_id),
                    AnyNumeric::try_from(value.to_plain_string().as_str()).ok(),
                    new_meter,
                    None,
                ),
                Outcome::Duplicate {
                    record_id,
                    rule,
                    user_id,
                } => (
                    n,
                    "duplicate".to_string(),
                    Some(rule.to_string()),
                    None,
                    None,
                    Some(user_id),
                    None,
                    false,
                    Some(format!("record id \"{record_id}\" was already metered")),
                ),
                Outcome::Rejected { code, reason, rule } => (
                    n,
                    "rejected".to_string(),
                    rule,
                    None,
                    None,
                    None,
                    None,
                    false,
                    Some(format!("{code}: {reason}")),
                ),
            }
        })
        .collect();
    Ok(TableIterator::new(rows))
}

/// Sends rejected records back to their stream's inbox (fix them first).
#[pg_extern(security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn reprocess_rejected(ids: Vec<i64>) -> SqlResult<i64> {
    Ok(inbox::reprocess_rejected(&ids)?)
}

#[pg_extern(security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn create_meter(
    stream: &str,
    meter_type: &str,
    user_id: &str,
    delete_on_reset: default!(bool, "false"),
) -> SqlResult<i64> {
    Ok(catalog::create_meter(stream, meter_type, user_id, delete_on_reset)?)
}

/// UE's update meter API; returns the meter's record as it stands after the change.
#[pg_extern(security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn update_meter(id: i64, delete_on_reset: bool) -> SqlResult<JsonB> {
    catalog::update_meter(id, delete_on_reset)?;
    let record = sql::one::<JsonB>("SELECT meter.meter_record($1)", &[id.into()])?;
    Ok(record.expect("the meter was just updated"))
}

#[pg_extern(security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn delete_meter(id: i64) -> SqlResult<()> {
    Ok(catalog::delete_meter(id)?)
}

/// The end of a period that starts at `after`: the schedule's first occurrence
/// strictly after it, in `timezone`; NULL for `@never`.
#[pg_extern(immutable, parallel_safe)]
fn next_period_end(
    schedule: &str,
    timezone: &str,
    after: TimestampWithTimeZone,
) -> SqlResult<Option<TimestampWithTimeZone>> {
    let parsed = Schedule::parse(schedule).map_err(MeterError::from)?;
    let tz = parse_timezone(timezone).map_err(MeterError::from)?;
    let Some(after) = to_timestamp(after) else {
        return Err(MeterError::InvalidParameter("after must be a finite timestamp".into()).into());
    };
    Ok(parsed.next_after(&tz, after).map(to_timestamptz))
}

// ---- runs and sessions ------------------------------------------------------
// meter.run_stream and CALL meter.execute_stream (sql/runs.sql) drive these steps.

fn run_type(text: &str) -> Result<RunType, MeterError> {
    text.parse()
        .map_err(|e: crate::session::UnknownRunType| MeterError::InvalidParameter(e.to_string()))
}

/// Starts a session of the stream; returns its id.
#[pg_extern(name = "_run_begin", security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn run_begin(stream: &str, run_type_name: &str, wait: bool, chunked: bool) -> SqlResult<i64> {
    Ok(run::begin(stream, run_type(run_type_name)?, wait, chunked)?)
}

/// Takes the session's next step: 'more', 'paused' or 'done'.
#[pg_extern(name = "_run_step", security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn run_step(session_id: i64) -> SqlResult<&'static str> {
    Ok(sql::with_fresh_plans(|| run::step(session_id))?.name())
}

/// Takes every remaining step of the session in this transaction.
#[pg_extern(name = "_run_to_end", security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn run_to_end(session_id: i64) -> SqlResult<()> {
    Ok(sql::with_fresh_plans(|| run::to_end(session_id))?)
}

/// Marks the session FAILED with the error that stopped it.
#[pg_extern(name = "_run_fail", security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn run_fail(session_id: i64, message: &str) -> SqlResult<()> {
    Ok(run::fail(session_id, message)?)
}

/// Pauses the stream's working session at its next chunk; returns the session id.
#[pg_extern(security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn pause(stream: &str) -> SqlResult<i64> {
    Ok(run::pause(stream)?)
}

/// Resumes the stream's paused session; returns the session id. A realtime
/// stream meters what waited while it was paused.
#[pg_extern(security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn resume(stream: &str) -> SqlResult<i64> {
    let loaded = catalog::load_stream(stream)?;
    Ok(match loaded.mode {
        StreamMode::Realtime => realtime::resume(&loaded)?,
        StreamMode::Batch => run::resume(stream)?,
    })
}

/// Completes a realtime stream's session; its next ingest starts a new one.
#[pg_extern(security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn stop(stream: &str) -> SqlResult<i64> {
    let loaded = catalog::load_stream(stream)?;
    if loaded.mode == StreamMode::Batch {
        return Err(MeterError::WrongState(format!(
            "stream \"{stream}\" is a batch stream: its runs end by themselves (cancel one with meter.cancel)"
        ))
        .into());
    }
    Ok(realtime::stop(&loaded)?)
}

/// One scan of one realtime stream: (records flushed, records metered).
/// meter.scan_once() (sql/realtime.sql) calls it for every realtime stream.
#[pg_extern(name = "_scan_stream", security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn scan_stream(
    stream_id: i64,
) -> Result<TableIterator<'static, (name!(flushed, i64), name!(metered, i64))>, ErrorReport> {
    let name = sql::one::<String>("SELECT name FROM meter.streams WHERE id = $1", &[stream_id.into()])?
        .ok_or_else(|| MeterError::NotFound(format!("stream {stream_id} does not exist")))?;
    let scanned = sql::with_fresh_plans(|| realtime::scan(&catalog::load_stream(&name)?))?;
    Ok(TableIterator::once((scanned.flushed, scanned.metered)))
}

/// Folds realtime sessions' per-backend counters into meter.sessions.
#[pg_extern(name = "_fold_session_counters", security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn fold_session_counters() -> SqlResult<()> {
    Ok(sessions::fold_counters()?)
}

/// Cancels a session; its run stops at the next chunk.
#[pg_extern(security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn cancel(session_id: i64) -> SqlResult<()> {
    Ok(run::cancel(session_id)?)
}

/// Sends every status change matching the filters (NULL: any) on `channel` too.
#[pg_extern(security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn notify_on(
    channel: &str,
    statuses: default!(Option<Vec<String>>, "NULL"),
    previous_statuses: default!(Option<Vec<String>>, "NULL"),
    run_types: default!(Option<Vec<String>>, "NULL"),
    stream: default!(Option<&str>, "NULL"),
) -> SqlResult<i64> {
    Ok(sessions::create_notification_rule(
        channel,
        statuses,
        previous_statuses,
        run_types,
        stream,
    )?)
}

#[pg_extern(security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn drop_notification_rule(id: i64) -> SqlResult<()> {
    Ok(sessions::drop_notification_rule(id)?)
}

// ---- downstream ----------------------------------------------------------------

/// Registers a consumer of a stream's flushed records (read with meter.read_flushed).
#[pg_extern(security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn register_consumer(name: &str, stream: &str, from_beginning: default!(bool, "true")) -> SqlResult<i64> {
    Ok(outbox::register(name, stream, from_beginning)?)
}

#[pg_extern(security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn unregister_consumer(name: &str, stream: &str) -> SqlResult<()> {
    Ok(outbox::unregister(name, stream)?)
}

/// Acknowledges every flushed record up to this flush id; returns how many it acknowledged.
#[pg_extern(security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn ack_flushed(consumer: &str, up_to_flush_id: i64) -> SqlResult<i64> {
    Ok(outbox::ack(consumer, up_to_flush_id)?)
}

/// Removes what retention allows, in batches: acknowledged outbox records, the
/// audit of finished periods, expired dedupe ids, reprocessed rejected records.
#[pg_extern(security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn purge(
    older_than: Interval,
    batch_size: default!(i64, "10000"),
) -> Result<TableIterator<'static, (name!(kind, &'static str), name!(purged, i64))>, ErrorReport> {
    Ok(TableIterator::new(retention::purge(older_than, batch_size)?))
}

/// UTC ISO-8601 with milliseconds, as JavaScript's `Date.toISOString()`:
/// `2026-11-30T23:00:00.000Z`. NULL for ±infinity.
#[pg_extern(immutable, parallel_safe, strict)]
fn iso_utc(ts: TimestampWithTimeZone) -> Option<String> {
    to_timestamp(ts).map(convert::iso_utc)
}
