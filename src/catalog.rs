//! Meter types, streams and meters: validation in plain Rust, persistence by SPI.

use jiff::Timestamp;
use pgrx::datum::TimestampWithTimeZone;
use pgrx::prelude::*;

use crate::aggregate::Aggregation;
use crate::convert::{to_timestamp, to_timestamptz, transaction_now};
use crate::errors::{MeterError, Result};
use crate::schedule::{first_period, parse_timezone, Schedule};
use crate::sql;

/// The settings of a meter type a meter needs to start a period.
pub struct MeterTypeSettings {
    pub id: i64,
    pub aggregation: Aggregation,
    pub unit: String,
    pub schedule: Schedule,
    pub timezone: String,
    pub active_from: Option<Timestamp>,
    pub active_to: Option<Timestamp>,
}

/// Arguments of `create_meter_type` / `alter_meter_type` after defaults are applied.
pub struct MeterTypeSpec {
    pub name: String,
    pub unit: String,
    pub aggregation: String,
    pub reset_schedule: String,
    pub timezone: String,
    pub active_from: Option<TimestampWithTimeZone>,
    pub active_to: Option<TimestampWithTimeZone>,
    pub category: String,
}

impl MeterTypeSpec {
    /// Checks every field, naming the first bad one.
    fn validate(&mut self) -> Result<()> {
        self.name = required_name("name", &self.name)?;
        self.unit = required_name("unit", &self.unit)?;
        self.category = required_name("category", &self.category)?;
        let aggregation: Aggregation = self
            .aggregation
            .parse()
            .map_err(|e: crate::aggregate::UnknownAggregation| MeterError::InvalidParameter(e.to_string()))?;
        self.aggregation = aggregation.name().to_string();
        Schedule::parse(&self.reset_schedule)?;
        self.reset_schedule = self.reset_schedule.trim().to_string();
        self.timezone = parse_timezone(&self.timezone)?
            .iana_name()
            .unwrap_or(self.timezone.trim())
            .to_string();
        // ±infinity means "no bound" and is stored as NULL.
        self.active_from = self.active_from.filter(|t| t.is_finite());
        self.active_to = self.active_to.filter(|t| t.is_finite());
        if let (Some(from), Some(to)) = (self.active_from, self.active_to) {
            if to <= from {
                return Err(MeterError::InvalidParameter(format!(
                    "active_to ({}) must be later than active_from ({})",
                    to_timestamp(to).map(|t| t.to_string()).unwrap_or_default(),
                    to_timestamp(from).map(|t| t.to_string()).unwrap_or_default()
                )));
            }
        }
        Ok(())
    }
}

fn required_name(field: &str, value: &str) -> Result<String> {
    let trimmed = value.trim();
    if trimmed.is_empty() {
        return Err(MeterError::InvalidParameter(format!("{field} must not be empty")));
    }
    Ok(trimmed.to_string())
}

pub fn create_meter_type(mut spec: MeterTypeSpec) -> Result<i64> {
    spec.validate()?;
    if meter_type_id(&spec.name)?.is_some() {
        return Err(MeterError::AlreadyExists(format!(
            "meter type \"{}\" already exists",
            spec.name
        )));
    }
    let id = sql::one::<i64>(
        "INSERT INTO meter.meter_types (name, unit, aggregation, reset_schedule, timezone, active_from, active_to, category)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING id",
        &[
            spec.name.as_str().into(),
            spec.unit.as_str().into(),
            spec.aggregation.as_str().into(),
            spec.reset_schedule.as_str().into(),
            spec.timezone.as_str().into(),
            spec.active_from.into(),
            spec.active_to.into(),
            spec.category.as_str().into(),
        ],
    )?;
    Ok(id.expect("INSERT RETURNING yields a row"))
}

/// Changes a meter type. `None` leaves a field as it is; ±infinity clears an
/// active bound. Existing meters see the change from their next period.
#[allow(clippy::too_many_arguments)]
pub fn alter_meter_type(
    name: &str,
    new_name: Option<&str>,
    unit: Option<&str>,
    aggregation: Option<&str>,
    reset_schedule: Option<&str>,
    timezone: Option<&str>,
    active_from: Option<TimestampWithTimeZone>,
    active_to: Option<TimestampWithTimeZone>,
    category: Option<&str>,
) -> Result<i64> {
    let row = Spi::connect(|client| -> Result<_> {
        let table = client.select(
            "SELECT id, unit, aggregation, reset_schedule, timezone, active_from, active_to, category
               FROM meter.meter_types WHERE name = $1 FOR UPDATE",
            Some(1),
            &[name.into()],
        )?;
        let Some(r) = table.into_iter().next() else {
            return Ok(None);
        };
        Ok(Some((
            r.get::<i64>(1)?.unwrap(),
            MeterTypeSpec {
                name: new_name.unwrap_or(name).to_string(),
                unit: unit.map(str::to_string).unwrap_or(r.get::<String>(2)?.unwrap()),
                aggregation: aggregation.map(str::to_string).unwrap_or(r.get::<String>(3)?.unwrap()),
                reset_schedule: reset_schedule
                    .map(str::to_string)
                    .unwrap_or(r.get::<String>(4)?.unwrap()),
                timezone: timezone.map(str::to_string).unwrap_or(r.get::<String>(5)?.unwrap()),
                active_from: active_from.or(r.get::<TimestampWithTimeZone>(6)?),
                active_to: active_to.or(r.get::<TimestampWithTimeZone>(7)?),
                category: category.map(str::to_string).unwrap_or(r.get::<String>(8)?.unwrap()),
            },
        )))
    })?;
    let Some((id, mut spec)) = row else {
        return Err(MeterError::NotFound(format!("meter type \"{name}\" does not exist")));
    };
    spec.validate()?;
    if spec.name != name && meter_type_id(&spec.name)?.is_some() {
        return Err(MeterError::AlreadyExists(format!(
            "meter type \"{}\" already exists",
            spec.name
        )));
    }
    sql::execute(
        "UPDATE meter.meter_types
            SET name = $2, unit = $3, aggregation = $4, reset_schedule = $5, timezone = $6,
                active_from = $7, active_to = $8, category = $9, updated_at = now()
          WHERE id = $1",
        &[
            id.into(),
            spec.name.as_str().into(),
            spec.unit.as_str().into(),
            spec.aggregation.as_str().into(),
            spec.reset_schedule.as_str().into(),
            spec.timezone.as_str().into(),
            spec.active_from.into(),
            spec.active_to.into(),
            spec.category.as_str().into(),
        ],
    )?;
    Ok(id)
}

/// Drops a meter type. Its meters go too only with `cascade`; a stream whose
/// guiding rules name it always blocks the drop.
pub fn drop_meter_type(name: &str, cascade: bool) -> Result<()> {
    let Some(id) = meter_type_id(name)? else {
        return Err(MeterError::NotFound(format!("meter type \"{name}\" does not exist")));
    };
    if let Some(stream) = stream_using_meter_type(name)? {
        return Err(MeterError::InUse(format!(
            "meter type \"{name}\" is used by the guiding rules of stream \"{stream}\": change those rules first"
        )));
    }
    let meters = sql::one::<i64>(
        "SELECT count(*) FROM meter.meters WHERE meter_type_id = $1",
        &[id.into()],
    )?
    .unwrap_or(0);
    if meters > 0 && !cascade {
        return Err(MeterError::InUse(format!(
            "meter type \"{name}\" has {meters} meter(s): delete them first or pass cascade => true"
        )));
    }
    sql::execute("DELETE FROM meter.meters WHERE meter_type_id = $1", &[id.into()])?;
    sql::execute("DELETE FROM meter.meter_types WHERE id = $1", &[id.into()])?;
    Ok(())
}

/// The stream whose guiding rules name this meter type, if any. Streams exist
/// with rules from the next migration on; until then nothing can reference a type.
fn stream_using_meter_type(_name: &str) -> Result<Option<String>> {
    Ok(None)
}

pub fn meter_type_id(name: &str) -> Result<Option<i64>> {
    Ok(sql::one::<i64>(
        "SELECT id FROM meter.meter_types WHERE name = $1",
        &[name.into()],
    )?)
}

pub fn load_meter_type(name: &str) -> Result<MeterTypeSettings> {
    let row = Spi::connect(|client| -> Result<_> {
        let table = client.select(
            "SELECT id, aggregation, unit, reset_schedule, timezone, active_from, active_to
               FROM meter.meter_types WHERE name = $1 FOR SHARE",
            Some(1),
            &[name.into()],
        )?;
        let Some(r) = table.into_iter().next() else {
            return Ok(None);
        };
        Ok(Some((
            r.get::<i64>(1)?.unwrap(),
            r.get::<String>(2)?.unwrap(),
            r.get::<String>(3)?.unwrap(),
            r.get::<String>(4)?.unwrap(),
            r.get::<String>(5)?.unwrap(),
            r.get::<TimestampWithTimeZone>(6)?,
            r.get::<TimestampWithTimeZone>(7)?,
        )))
    })?;
    let Some((id, aggregation, unit, schedule, timezone, active_from, active_to)) = row else {
        return Err(MeterError::NotFound(format!("meter type \"{name}\" does not exist")));
    };
    Ok(MeterTypeSettings {
        id,
        aggregation: aggregation
            .parse()
            .map_err(|e: crate::aggregate::UnknownAggregation| MeterError::InvalidParameter(e.to_string()))?,
        unit,
        schedule: Schedule::parse(&schedule)?,
        timezone,
        active_from: active_from.and_then(to_timestamp),
        active_to: active_to.and_then(to_timestamp),
    })
}

pub fn create_stream(name: &str, meter_key: Option<&str>) -> Result<i64> {
    let name = required_name("name", name)?;
    let meter_key = required_name("meter_key", meter_key.unwrap_or(&name))?;
    if stream_id(&name)?.is_some() {
        return Err(MeterError::AlreadyExists(format!("stream \"{name}\" already exists")));
    }
    if let Some(other) = sql::one::<String>(
        "SELECT name FROM meter.streams WHERE meter_key = $1",
        &[meter_key.as_str().into()],
    )? {
        return Err(MeterError::AlreadyExists(format!(
            "meter_key \"{meter_key}\" is already used by stream \"{other}\""
        )));
    }
    let id = sql::one::<i64>(
        "INSERT INTO meter.streams (name, meter_key) VALUES ($1, $2) RETURNING id",
        &[name.as_str().into(), meter_key.as_str().into()],
    )?;
    Ok(id.expect("INSERT RETURNING yields a row"))
}

pub fn stream_id(name: &str) -> Result<Option<i64>> {
    Ok(sql::one::<i64>(
        "SELECT id FROM meter.streams WHERE name = $1",
        &[name.into()],
    )?)
}

/// Creates a meter (UE provisions meters by API). Its first period follows its
/// type's schedule and timezone from now, or from `active_from` if later.
pub fn create_meter(stream: &str, meter_type: &str, user_id: &str, delete_on_reset: bool) -> Result<i64> {
    let user_id = required_name("user_id", user_id)?;
    let Some(stream_id) = stream_id(stream)? else {
        return Err(MeterError::NotFound(format!("stream \"{stream}\" does not exist")));
    };
    let settings = load_meter_type(meter_type)?;
    let now = transaction_now();
    if let Some(to) = settings.active_to {
        if to <= now {
            return Err(MeterError::WrongState(format!(
                "meter type \"{meter_type}\" is no longer active: its active_to ({}) has passed",
                to
            )));
        }
    }
    if let Some(existing) = sql::one::<i64>(
        "SELECT id FROM meter.meters WHERE stream_id = $1 AND meter_type_id = $2 AND user_id = $3",
        &[stream_id.into(), settings.id.into(), user_id.as_str().into()],
    )? {
        return Err(MeterError::AlreadyExists(format!(
            "user \"{user_id}\" already has a meter of type \"{meter_type}\" in stream \"{stream}\" (meter {existing})"
        )));
    }
    let tz = parse_timezone(&settings.timezone)?;
    let period = first_period(&settings.schedule, &tz, now, settings.active_from);
    let value_at_reset: Option<i64> = settings.aggregation.resets_to_zero().then_some(0);
    let id = sql::one::<i64>(
        "INSERT INTO meter.meters (stream_id, meter_type_id, user_id, value, delete_on_reset, aggregation, unit, timezone,
                                   period_start, period_end)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) RETURNING id",
        &[
            stream_id.into(),
            settings.id.into(),
            user_id.as_str().into(),
            value_at_reset.into(),
            delete_on_reset.into(),
            settings.aggregation.name().into(),
            settings.unit.as_str().into(),
            settings.timezone.as_str().into(),
            to_timestamptz(period.start).into(),
            period.end.map(to_timestamptz).into(),
        ],
    )?;
    Ok(id.expect("INSERT RETURNING yields a row"))
}

/// UE's update meter API: today the one mutable field is `delete_on_reset`.
pub fn update_meter(id: i64, delete_on_reset: bool) -> Result<()> {
    let updated = sql::one::<i64>(
        "UPDATE meter.meters SET delete_on_reset = $2, updated_at = now() WHERE id = $1 RETURNING id",
        &[id.into(), delete_on_reset.into()],
    )?;
    updated
        .map(|_| ())
        .ok_or_else(|| MeterError::NotFound(format!("meter {id} does not exist")))
}

pub fn delete_meter(id: i64) -> Result<()> {
    let deleted = sql::one::<i64>("DELETE FROM meter.meters WHERE id = $1 RETURNING id", &[id.into()])?;
    deleted
        .map(|_| ())
        .ok_or_else(|| MeterError::NotFound(format!("meter {id} does not exist")))
}
