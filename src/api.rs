//! The SQL API: thin `#[pg_extern]`s that convert arguments and call the domain.
//! Functions that write run as their owner with a pinned `search_path`; what each
//! role may call is granted in `sql/grants.sql`.

use pgrx::datum::TimestampWithTimeZone;
use pgrx::prelude::*;
use pgrx::JsonB;

use crate::catalog::{self, MeterTypeSpec};
use crate::convert::{to_timestamp, to_timestamptz};
use crate::errors::{MeterError, SqlResult};
use crate::schedule::{parse_timezone, Schedule};
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
fn create_stream(name: &str, meter_key: default!(Option<&str>, "NULL")) -> SqlResult<i64> {
    Ok(catalog::create_stream(name, meter_key)?)
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
