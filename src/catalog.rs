//! Meter types, streams and meters: validation in plain Rust, persistence by SPI.

use std::collections::HashMap;

use jiff::tz::TimeZone;
use jiff::Timestamp;
use pgrx::datum::TimestampWithTimeZone;
use pgrx::prelude::*;

use crate::aggregate::Aggregation;
use crate::convert::{to_timestamp, to_timestamptz, transaction_now};
use crate::dedupe;
use crate::errors::{MeterError, Result};
use crate::locks::{self, id_key_sql, Settings, ID_KEY_SQL};
use crate::record::FieldMap;
use crate::record::FieldPath;
use crate::rules::RuleSet;
use crate::schedule::{first_period, parse_timezone, Schedule};
use crate::sql;

/// A meter type as the meter processor and meter creation need it.
#[derive(Debug, Clone)]
pub struct MeterTypeSettings {
    pub id: i64,
    pub name: String,
    pub aggregation: Aggregation,
    pub unit: String,
    pub schedule: Schedule,
    pub timezone: String,
    pub tz: TimeZone,
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
    if let Some(id) = meter_type_id(name)? {
        locks::change(Settings::MeterType, id)?;
    }
    let row = Spi::connect_mut(|client| -> Result<_> {
        let table = sql::run(
            client,
            "SELECT id, unit, aggregation, reset_schedule, timezone, active_from, active_to, category
               FROM meter.meter_types WHERE name = $1 FOR UPDATE",
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
    locks::change(Settings::MeterType, id)?;
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

/// The stream whose guiding rules name this meter type, if any.
fn stream_using_meter_type(name: &str) -> Result<Option<String>> {
    sql::one::<String>(
        "SELECT name FROM meter.streams
          WHERE guiding_rules @> pg_catalog.jsonb_build_array(pg_catalog.jsonb_build_object('meter_type', $1::text))
          ORDER BY name LIMIT 1",
        &[name.into()],
    )
}

pub fn meter_type_id(name: &str) -> Result<Option<i64>> {
    Ok(sql::one::<i64>(
        "SELECT id FROM meter.meter_types WHERE name = $1",
        &[name.into()],
    )?)
}

pub fn load_meter_type(name: &str) -> Result<MeterTypeSettings> {
    load_meter_types(&[name.to_string()])?
        .remove(name)
        .ok_or_else(|| MeterError::NotFound(format!("meter type \"{name}\" does not exist")))
}

/// The named meter types (those that exist), their settings share-locked
/// against changes (`locks::Settings`) until the transaction ends.
pub fn load_meter_types(names: &[String]) -> Result<HashMap<String, MeterTypeSettings>> {
    Ok(load_types("name = ANY($1)", || names.to_vec().into())?
        .into_iter()
        .map(|t| (t.name.clone(), t))
        .collect())
}

/// The meter types with these ids, share-locked.
pub fn load_meter_types_by_id(ids: &[i64]) -> Result<HashMap<i64, MeterTypeSettings>> {
    Ok(load_types("id = ANY($1)", || ids.to_vec().into())?
        .into_iter()
        .map(|t| (t.id, t))
        .collect())
}

fn load_types(
    condition: &'static str,
    arg: impl Fn() -> pgrx::datum::DatumWithOid<'static>,
) -> Result<Vec<MeterTypeSettings>> {
    let query = format!(
        "SELECT id, name, aggregation, unit, reset_schedule, timezone, active_from, active_to,
                pg_catalog.pg_try_advisory_xact_lock_shared($2, {ID_KEY_SQL})
           FROM meter.meter_types WHERE {condition}"
    );
    let rows = locks::read_shared(Settings::MeterType, || {
        Spi::connect_mut(|client| -> Result<Vec<_>> {
            let table = sql::run(client, &query, &[arg(), Settings::MeterType.key().into()])?;
            let mut rows = Vec::with_capacity(table.len());
            for r in table {
                let id = r.get::<i64>(1)?.unwrap();
                rows.push((
                    id,
                    r.get::<bool>(9)?.unwrap(),
                    (
                        id,
                        r.get::<String>(2)?.unwrap(),
                        r.get::<String>(3)?.unwrap(),
                        r.get::<String>(4)?.unwrap(),
                        r.get::<String>(5)?.unwrap(),
                        r.get::<String>(6)?.unwrap(),
                        r.get::<TimestampWithTimeZone>(7)?,
                        r.get::<TimestampWithTimeZone>(8)?,
                    ),
                ));
            }
            Ok(rows)
        })
    })?;
    let mut types = Vec::with_capacity(rows.len());
    for (id, name, aggregation, unit, schedule, timezone, active_from, active_to) in rows {
        let settings = MeterTypeSettings {
            id,
            name: name.clone(),
            aggregation: aggregation
                .parse()
                .map_err(|e: crate::aggregate::UnknownAggregation| MeterError::InvalidParameter(e.to_string()))?,
            unit,
            schedule: Schedule::parse_cached(&schedule)?,
            tz: parse_timezone(&timezone)?,
            timezone,
            active_from: active_from.and_then(to_timestamp),
            active_to: active_to.and_then(to_timestamp),
        };
        types.push(settings);
    }
    Ok(types)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamMode {
    Batch,
    Realtime,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlushBy {
    PeriodEnd,
    StreamExecution,
}

/// A stream, with its meter processor's rules and field mapping parsed.
#[derive(Debug, Clone)]
pub struct Stream {
    pub id: i64,
    pub name: String,
    pub mode: StreamMode,
    pub flush_by: FlushBy,
    pub rules: RuleSet,
    pub fields: FieldMap,
    pub auto_create_meters: bool,
    pub audit: bool,
}

impl Stream {
    /// Every field path processing reads: the field mapping and what the rules
    /// test, group by and carry.
    pub fn projection(&self) -> crate::jsonb::Projection {
        let mapped = [
            &self.fields.user_id,
            &self.fields.value,
            &self.fields.timestamp,
            &self.fields.id,
        ];
        let ruled = self.rules.rules.iter().flat_map(|r| {
            r.conditions
                .iter()
                .map(|c| &c.field)
                .chain(&r.group_by)
                .chain(&r.carry_first)
                .chain(&r.carry_last)
        });
        crate::jsonb::Projection::of(mapped.into_iter().chain(ruled))
    }
}

/// Every setting of a stream, as stored (after defaults are applied).
pub struct StreamSpec {
    pub name: String,
    pub meter_key: String,
    pub mode: String,
    pub flush_by: String,
    pub guiding_rules: serde_json::Value,
    pub user_id_field: String,
    pub value_field: String,
    pub timestamp_field: String,
    pub id_field: String,
    pub auto_create_meters: bool,
    pub audit: bool,
}

impl StreamSpec {
    fn validate(&mut self) -> Result<()> {
        self.name = required_name("name", &self.name)?;
        self.meter_key = required_name("meter_key", &self.meter_key)?;
        let mode = parse_mode(&self.mode)?;
        let flush_by = parse_flush_by(&self.flush_by)?;
        if mode == StreamMode::Realtime && flush_by == FlushBy::StreamExecution {
            return Err(MeterError::InvalidParameter(
                "flush_by \"stream_execution\" is not allowed for a realtime stream: a realtime stream flushes at period end"
                    .into(),
            ));
        }
        self.mode = self.mode.trim().to_ascii_lowercase();
        self.flush_by = self.flush_by.trim().to_ascii_lowercase();
        for (field, path) in [
            ("user_id_field", &self.user_id_field),
            ("value_field", &self.value_field),
            ("timestamp_field", &self.timestamp_field),
            ("id_field", &self.id_field),
        ] {
            FieldPath::parse(path).map_err(|e| MeterError::InvalidParameter(format!("{field}: {e}")))?;
        }
        let known = meter_type_names()?;
        RuleSet::parse(&self.guiding_rules, &|name| known.contains(name))
            .map_err(|e| MeterError::InvalidParameter(e.to_string()))?;
        Ok(())
    }
}

fn parse_mode(text: &str) -> Result<StreamMode> {
    match text.trim().to_ascii_lowercase().as_str() {
        "batch" => Ok(StreamMode::Batch),
        "realtime" => Ok(StreamMode::Realtime),
        _ => Err(MeterError::InvalidParameter(format!(
            "mode \"{text}\" is not supported: use batch or realtime"
        ))),
    }
}

fn parse_flush_by(text: &str) -> Result<FlushBy> {
    match text.trim().to_ascii_lowercase().as_str() {
        "period_end" => Ok(FlushBy::PeriodEnd),
        "stream_execution" => Ok(FlushBy::StreamExecution),
        _ => Err(MeterError::InvalidParameter(format!(
            "flush_by \"{text}\" is not supported: use period_end or stream_execution"
        ))),
    }
}

fn meter_type_names() -> Result<std::collections::HashSet<String>> {
    Spi::connect_mut(|client| {
        let mut names = std::collections::HashSet::new();
        for row in sql::run(client, "SELECT name FROM meter.meter_types", &[])? {
            names.insert(row.get::<String>(1)?.unwrap_or_default());
        }
        Ok(names)
    })
}

pub fn create_stream(mut spec: StreamSpec) -> Result<i64> {
    spec.validate()?;
    if stream_id(&spec.name)?.is_some() {
        return Err(MeterError::AlreadyExists(format!(
            "stream \"{}\" already exists",
            spec.name
        )));
    }
    check_meter_key_free(&spec.meter_key, None)?;
    let id = sql::one::<i64>(
        "INSERT INTO meter.streams (name, meter_key, mode, flush_by, guiding_rules, user_id_field, value_field,
                                    timestamp_field, id_field, auto_create_meters, audit)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) RETURNING id",
        &spec_args(&spec),
    )?;
    let id = id.expect("INSERT RETURNING yields a row");
    // The stream's own inbox partition, created apart and then attached: attaching
    // only takes a SHARE UPDATE EXCLUSIVE lock on meter.usage, so ingestion into
    // other streams and running streams go on (CREATE TABLE ... PARTITION OF would
    // wait for them, and make everyone else wait behind it).
    let ddl = sql::one::<String>(
        "SELECT pg_catalog.format('CREATE TABLE meter.%1$I (LIKE meter.usage INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING GENERATED INCLUDING COMPRESSION);
                                   ALTER TABLE meter.usage ATTACH PARTITION meter.%1$I FOR VALUES IN (%2$L)', $1, $2)",
        &[inbox_partition(id).into(), spec.name.as_str().into()],
    )?
    .expect("format() returns text");
    Spi::run(&ddl)?;
    Ok(id)
}

fn spec_args(spec: &StreamSpec) -> Vec<pgrx::datum::DatumWithOid<'static>> {
    vec![
        spec.name.clone().into(),
        spec.meter_key.clone().into(),
        spec.mode.clone().into(),
        spec.flush_by.clone().into(),
        pgrx::JsonB(spec.guiding_rules.clone()).into(),
        spec.user_id_field.clone().into(),
        spec.value_field.clone().into(),
        spec.timestamp_field.clone().into(),
        spec.id_field.clone().into(),
        spec.auto_create_meters.into(),
        spec.audit.into(),
    ]
}

fn check_meter_key_free(meter_key: &str, except_stream: Option<i64>) -> Result<()> {
    if let Some(other) = sql::one::<String>(
        "SELECT name FROM meter.streams WHERE meter_key = $1 AND id IS DISTINCT FROM $2",
        &[meter_key.into(), except_stream.into()],
    )? {
        return Err(MeterError::AlreadyExists(format!(
            "meter_key \"{meter_key}\" is already used by stream \"{other}\""
        )));
    }
    Ok(())
}

/// Changes a stream. `None` leaves a setting as it is. New rules apply to records
/// processed from now on.
pub fn alter_stream(name: &str, change: impl FnOnce(&mut StreamSpec)) -> Result<i64> {
    let Some(id) = stream_id(name)? else {
        return Err(MeterError::NotFound(format!("stream \"{name}\" does not exist")));
    };
    locks::change(Settings::Stream, id)?;
    let mut spec = Spi::connect_mut(|client| -> Result<StreamSpec> {
        let row = sql::run(
            client,
            "SELECT name, meter_key, mode, flush_by, guiding_rules, user_id_field, value_field, timestamp_field,
                        id_field, auto_create_meters, audit
                   FROM meter.streams WHERE id = $1 FOR UPDATE",
            &[id.into()],
        )?
        .first();
        Ok(StreamSpec {
            name: row.get::<String>(1)?.unwrap(),
            meter_key: row.get::<String>(2)?.unwrap(),
            mode: row.get::<String>(3)?.unwrap(),
            flush_by: row.get::<String>(4)?.unwrap(),
            guiding_rules: row.get::<pgrx::JsonB>(5)?.unwrap().0,
            user_id_field: row.get::<String>(6)?.unwrap(),
            value_field: row.get::<String>(7)?.unwrap(),
            timestamp_field: row.get::<String>(8)?.unwrap(),
            id_field: row.get::<String>(9)?.unwrap(),
            auto_create_meters: row.get::<bool>(10)?.unwrap(),
            audit: row.get::<bool>(11)?.unwrap(),
        })
    })?;
    let was_realtime = spec.mode == "realtime";
    change(&mut spec);
    spec.validate()?;
    check_meter_key_free(&spec.meter_key, Some(id))?;
    if spec.mode == "realtime" && !was_realtime && dedupe::ranges_exist()? {
        // Realtime transactions claim ids concurrently, through the unique index:
        // the ids batch runs claimed as ranges become rows it holds.
        dedupe::ranges_to_keys(id, None)?;
    }
    let mut args = spec_args(&spec);
    args.push(id.into());
    sql::execute(
        "UPDATE meter.streams
            SET meter_key = $2, mode = $3, flush_by = $4, guiding_rules = $5, user_id_field = $6, value_field = $7,
                timestamp_field = $8, id_field = $9, auto_create_meters = $10, audit = $11, updated_at = now()
          WHERE id = $12",
        &args,
    )?;
    Ok(id)
}

/// Drops a stream. With pending records or meters it needs `cascade`, which drops
/// them too; rejected records and the audit are kept.
pub fn drop_stream(name: &str, cascade: bool) -> Result<()> {
    let Some(id) = stream_id(name)? else {
        return Err(MeterError::NotFound(format!("stream \"{name}\" does not exist")));
    };
    locks::change(Settings::Stream, id)?;
    let pending = sql::one::<i64>(
        "SELECT coalesce(sum(records), 0) FROM meter.usage WHERE stream = $1",
        &[name.into()],
    )?
    .unwrap_or(0);
    let meters = sql::one::<i64>("SELECT count(*) FROM meter.meters WHERE stream_id = $1", &[id.into()])?.unwrap_or(0);
    if (pending > 0 || meters > 0) && !cascade {
        return Err(MeterError::InUse(format!(
            "stream \"{name}\" has {meters} meter(s) and {pending} pending record(s): pass cascade => true to drop them too"
        )));
    }
    let ddl = sql::one::<String>(
        "SELECT pg_catalog.format('DROP TABLE IF EXISTS meter.%I', $1)",
        &[inbox_partition(id).into()],
    )?
    .expect("format() returns text");
    Spi::run(&ddl)?;
    sql::execute("DELETE FROM meter.dedupe_keys WHERE stream_id = $1", &[id.into()])?;
    if dedupe::ranges_exist()? {
        sql::execute("DELETE FROM meter.dedupe_ranges WHERE stream_id = $1", &[id.into()])?;
    }
    sql::execute("DELETE FROM meter.streams WHERE id = $1", &[id.into()])?;
    Ok(())
}

/// The name of a stream's partition of `meter.usage`.
fn inbox_partition(stream_id: i64) -> String {
    format!("usage_{stream_id}")
}

pub fn stream_id(name: &str) -> Result<Option<i64>> {
    sql::one::<i64>("SELECT id FROM meter.streams WHERE name = $1", &[name.into()])
}

/// Loads a stream for processing, its settings share-locked against changes
/// (`locks::Settings`) until the transaction ends.
pub fn load_stream(name: &str) -> Result<Stream> {
    let row = locks::read_shared(Settings::Stream, || {
        Spi::connect_mut(|client| -> Result<_> {
            let table = sql::run(
                client,
                concat!(
                    "SELECT id, name, mode, flush_by, guiding_rules, user_id_field, value_field, timestamp_field,
                            id_field, auto_create_meters, audit, pg_catalog.pg_try_advisory_xact_lock_shared($2, ",
                    id_key_sql!(),
                    ")
                       FROM meter.streams WHERE name = $1"
                ),
                &[name.into(), Settings::Stream.key().into()],
            )?;
            let mut rows = Vec::with_capacity(1);
            if let Some(row) = table.into_iter().next() {
                let id = row.get::<i64>(1)?.unwrap();
                rows.push((
                    id,
                    row.get::<bool>(12)?.unwrap(),
                    (
                        id,
                        row.get::<String>(2)?.unwrap(),
                        row.get::<String>(3)?.unwrap(),
                        row.get::<String>(4)?.unwrap(),
                        row.get::<pgrx::JsonB>(5)?.unwrap().0,
                        [
                            row.get::<String>(6)?.unwrap(),
                            row.get::<String>(7)?.unwrap(),
                            row.get::<String>(8)?.unwrap(),
                            row.get::<String>(9)?.unwrap(),
                        ],
                        row.get::<bool>(10)?.unwrap(),
                        row.get::<bool>(11)?.unwrap(),
                    ),
                ));
            }
            Ok(rows)
        })
    })?
    .pop();
    let Some((id, name, mode, flush_by, rules, fields, auto_create_meters, audit)) = row else {
        return Err(MeterError::NotFound(format!("stream \"{name}\" does not exist")));
    };
    let path = |text: &str| FieldPath::parse(text).map_err(MeterError::InvalidParameter);
    Ok(Stream {
        id,
        name,
        mode: parse_mode(&mode)?,
        flush_by: parse_flush_by(&flush_by)?,
        // Validated when written; meter types named by rules cannot be dropped.
        rules: RuleSet::parse(&rules, &|_| true).map_err(|e| MeterError::InvalidParameter(e.to_string()))?,
        fields: FieldMap {
            user_id: path(&fields[0])?,
            value: path(&fields[1])?,
            timestamp: path(&fields[2])?,
            id: path(&fields[3])?,
        },
        auto_create_meters,
        audit,
    })
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
    let created = insert_meters(
        stream_id,
        &[NewMeter {
            settings: &settings,
            user_id: &user_id,
            delete_on_reset,
        }],
        now,
    )?;
    created.first().copied().ok_or_else(|| {
        MeterError::AlreadyExists(format!(
            "user \"{user_id}\" already has a meter of type \"{meter_type}\" in stream \"{stream}\""
        ))
    })
}

/// A meter to create: by `create_meter`, or by a stream that auto-creates meters.
pub struct NewMeter<'a> {
    pub settings: &'a MeterTypeSettings,
    pub user_id: &'a str,
    pub delete_on_reset: bool,
}

/// Inserts meters in their first period (from `now`, or the type's `active_from`
/// if later). A meter that already exists is left alone; returns the new ids.
pub fn insert_meters(stream_id: i64, meters: &[NewMeter], now: Timestamp) -> Result<Vec<i64>> {
    let mut columns: (
        Vec<i64>,
        Vec<String>,
        Vec<Option<String>>,
        Vec<bool>,
        Vec<String>,
        Vec<String>,
        Vec<String>,
    ) = Default::default();
    let (mut starts, mut ends) = (Vec::new(), Vec::new());
    for m in meters {
        let period = first_period(&m.settings.schedule, &m.settings.tz, now, m.settings.active_from);
        columns.0.push(m.settings.id);
        columns.1.push(m.user_id.to_string());
        columns
            .2
            .push(m.settings.aggregation.reset_value().map(|v| v.to_string()));
        columns.3.push(m.delete_on_reset);
        columns.4.push(m.settings.aggregation.name().to_string());
        columns.5.push(m.settings.unit.clone());
        columns.6.push(m.settings.timezone.clone());
        starts.push(to_timestamptz(period.start));
        ends.push(period.end.map(to_timestamptz));
    }
    Spi::connect_mut(|client| {
        let rows = sql::run(
            client,
            // created_at and updated_at are the transaction's now(), as every later
            // update's: `now` (a run's as_of) is later than that, and a meter would
            // seem updated before it was created.
            "INSERT INTO meter.meters (stream_id, meter_type_id, user_id, value, delete_on_reset, aggregation, unit,
                                       timezone, period_start, period_end)
             SELECT $1, n.*
               FROM unnest($2::bigint[], $3::text[], $4::numeric[], $5::boolean[], $6::text[], $7::text[],
                           $8::text[], $9::timestamptz[], $10::timestamptz[]) AS n
             ON CONFLICT (stream_id, user_id, meter_type_id) DO NOTHING
             RETURNING id",
            &[
                stream_id.into(),
                columns.0.into(),
                columns.1.into(),
                columns.2.into(),
                columns.3.into(),
                columns.4.into(),
                columns.5.into(),
                columns.6.into(),
                starts.into(),
                ends.into(),
            ],
        )?;
        let mut ids = Vec::with_capacity(rows.len());
        for row in rows {
            ids.push(row.get::<i64>(1)?.unwrap());
        }
        Ok(ids)
    })
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
