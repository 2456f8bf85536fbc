//! Usage records (SPEC §5): extracting and validating the fields a stream maps.
//!
//! Pure Rust, no Postgres. A record is a JSON object; its user id, value,
//! timestamp and id are found by dotted paths (the stream's field mapping).
//! Numbers stay exact: serde_json keeps their text and values become `BigDecimal`.

use std::borrow::Cow;
use std::cell::RefCell;
use std::fmt;
use std::rc::Rc;
use std::str::FromStr;

use bigdecimal::BigDecimal;
use jiff::{SignedDuration, Timestamp};
use serde_json::Value;

/// The largest exponent PostgreSQL's `numeric` stores: 131072 digits before the
/// decimal point and 16383 after. Values outside are rejected, not rounded.
const MAX_INTEGER_DIGITS: i64 = 131_072;
const MAX_FRACTION_DIGITS: i64 = 16_383;
/// Longest text accepted for a user id or record id.
pub const MAX_ID_LEN: usize = 1024;

/// A dotted path into a record, e.g. `device.os`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct FieldPath {
    text: String,
    parts: Vec<String>,
    /// The same for every path of the same text (in this backend): a projected
    /// record finds a path's value by it, without comparing texts.
    id: u32,
}

thread_local! {
    /// Path texts and their ids, for `FieldPath::id`.
    static PATH_IDS: RefCell<std::collections::HashMap<String, u32>> = RefCell::default();
}

fn path_id(text: &str) -> u32 {
    PATH_IDS.with(|ids| {
        let mut ids = ids.borrow_mut();
        if let Some(&id) = ids.get(text) {
            return id;
        }
        let id = ids.len() as u32;
        ids.insert(text.to_string(), id);
        id
    })
}

impl FieldPath {
    pub fn parse(text: &str) -> Result<FieldPath, String> {
        if text.is_empty() {
            return Err("a field path must not be empty".into());
        }
        let parts: Vec<String> = text.split('.').map(str::to_string).collect();
        if parts.iter().any(String::is_empty) {
            return Err(format!("field path \"{text}\" has an empty segment"));
        }
        Ok(FieldPath {
            text: text.to_string(),
            parts,
            id: path_id(text),
        })
    }

    pub fn id(&self) -> u32 {
        self.id
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The keys from the record's root, in order.
    pub fn parts(&self) -> impl Iterator<Item = &str> {
        self.parts.iter().map(String::as_str)
    }

    /// The value at this path; `None` when any segment is missing or not an object.
    /// JSON `null` counts as missing.
    pub fn get<'a>(&self, record: &'a Value) -> Option<&'a Value> {
        let mut node = record;
        for part in &self.parts {
            node = node.as_object()?.get(part)?;
        }
        (!node.is_null()).then_some(node)
    }
}

impl fmt::Display for FieldPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// The fields a stream reads of one record (see `jsonb::Projection`): the value
/// at each path, by the slot the projection gave the path. A record read this way
/// costs no map of keys.
#[derive(Debug, Clone)]
pub struct Projected {
    values: Vec<Option<Value>>,
    /// Slot by path id; `NO_SLOT` for paths not read.
    slots: Rc<[u32]>,
}

pub const NO_SLOT: u32 = u32::MAX;

impl Projected {
    /// `values[slot]`: the value at the path of that slot (`None`: missing or null).
    pub fn new(values: Vec<Option<Value>>, slots: Rc<[u32]>) -> Projected {
        Projected { values, slots }
    }

    fn get(&self, path: &FieldPath) -> Option<&Value> {
        let slot = *self.slots.get(path.id() as usize)?;
        self.values.get(slot as usize)?.as_ref()
    }
}

/// A record as processing reads it: whole, or the fields a projection read.
#[derive(Debug, Clone, Copy)]
pub enum RecordRef<'a> {
    Whole(&'a Value),
    /// Always an object's fields (a record that is not an object is read whole).
    Projected(&'a Projected),
}

impl<'a> RecordRef<'a> {
    /// The value at `path`; `None` when missing or null (see `FieldPath::get`).
    pub fn get(self, path: &FieldPath) -> Option<&'a Value> {
        match self {
            RecordRef::Whole(value) => path.get(value),
            RecordRef::Projected(projected) => projected.get(path),
        }
    }
}

impl<'a> From<&'a Value> for RecordRef<'a> {
    fn from(value: &'a Value) -> Self {
        RecordRef::Whole(value)
    }
}

impl<'a> From<&'a Projected> for RecordRef<'a> {
    fn from(projected: &'a Projected) -> Self {
        RecordRef::Projected(projected)
    }
}

/// A stream's field mapping (SPEC §2).
#[derive(Debug, Clone)]
pub struct FieldMap {
    pub user_id: FieldPath,
    pub value: FieldPath,
    pub timestamp: FieldPath,
    pub id: FieldPath,
}

impl Default for FieldMap {
    fn default() -> Self {
        FieldMap {
            user_id: FieldPath::parse("userId").unwrap(),
            value: FieldPath::parse("value").unwrap(),
            timestamp: FieldPath::parse("timestamp").unwrap(),
            id: FieldPath::parse("id").unwrap(),
        }
    }
}

/// Why a record cannot be metered. `code()` is stable for queries; `Display` is
/// the reason stored with the rejected record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejection {
    NotAnObject {
        found: &'static str,
    },
    MissingUserId {
        field: String,
    },
    InvalidUserId {
        field: String,
        reason: String,
    },
    InvalidRecordId {
        field: String,
        reason: String,
    },
    InvalidTimestamp {
        field: String,
        found: String,
    },
    FutureTimestamp {
        timestamp: Timestamp,
        limit: Timestamp,
    },
    MissingValue {
        field: String,
        meter_type: String,
        aggregation: &'static str,
    },
    InvalidValue {
        field: String,
        found: String,
    },
    InvalidDistinctValue {
        field: String,
        found: String,
    },
    ValueOutOfRange {
        field: String,
    },
    BeforeActiveFrom {
        at: Timestamp,
        meter_type: String,
        active_from: Timestamp,
    },
    AfterActiveTo {
        at: Timestamp,
        meter_type: String,
        active_to: Timestamp,
    },
    NoMeter {
        user_id: String,
        meter_type: String,
        rule: String,
    },
    MeterClosed {
        meter_id: i64,
        meter_type: String,
    },
    NoRuleMatched,
    NoRules,
    /// A field the stream reads nests deeper than `jsonb::MAX_READ_DEPTH` levels.
    TooDeep {
        field: String,
        limit: usize,
    },
}

impl Rejection {
    pub fn code(&self) -> &'static str {
        match self {
            Rejection::NotAnObject { .. } => "not_an_object",
            Rejection::MissingUserId { .. } => "missing_user_id",
            Rejection::InvalidUserId { .. } => "invalid_user_id",
            Rejection::InvalidRecordId { .. } => "invalid_record_id",
            Rejection::InvalidTimestamp { .. } => "invalid_timestamp",
            Rejection::FutureTimestamp { .. } => "future_timestamp",
            Rejection::MissingValue { .. } => "missing_value",
            Rejection::InvalidValue { .. } | Rejection::InvalidDistinctValue { .. } => "invalid_value",
            Rejection::ValueOutOfRange { .. } => "value_out_of_range",
            Rejection::BeforeActiveFrom { .. } => "before_active_from",
            Rejection::AfterActiveTo { .. } => "after_active_to",
            Rejection::NoMeter { .. } => "no_meter",
            Rejection::MeterClosed { .. } => "meter_closed",
            Rejection::NoRuleMatched => "no_rule_matched",
            Rejection::NoRules => "no_rules",
            Rejection::TooDeep { .. } => "too_deep",
        }
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rejection::NotAnObject { found } => write!(f, "record is {found}, not a JSON object"),
            Rejection::MissingUserId { field } => write!(f, "user id field \"{field}\" is missing"),
            Rejection::InvalidUserId { field, reason } => write!(f, "user id field \"{field}\" {reason}"),
            Rejection::InvalidRecordId { field, reason } => write!(f, "id field \"{field}\" {reason}"),
            Rejection::InvalidTimestamp { field, found } => write!(
                f,
                "timestamp field \"{field}\" is {found}: use an ISO-8601 time (2026-01-31T12:00:00Z) or Unix milliseconds"
            ),
            Rejection::FutureTimestamp { timestamp, limit } => write!(
                f,
                "timestamp {timestamp} is in the future (later than {limit}, the limit set by meter_ext.future_tolerance)"
            ),
            Rejection::MissingValue { field, meter_type, aggregation } => write!(
                f,
                "value field \"{field}\" is missing, and meter type \"{meter_type}\" ({aggregation}) needs one"
            ),
            Rejection::InvalidValue { field, found } => {
                write!(f, "value field \"{field}\" is {found}: use a JSON number or a numeric string")
            }
            Rejection::InvalidDistinctValue { field, found } => {
                write!(f, "value field \"{field}\" is {found}: unique_count counts strings, numbers and booleans")
            }
            Rejection::ValueOutOfRange { field } => {
                write!(f, "value field \"{field}\" is outside the range of PostgreSQL numeric")
            }
            Rejection::BeforeActiveFrom { at, meter_type, active_from } => {
                write!(f, "record time {at} is before meter type \"{meter_type}\" becomes active ({active_from})")
            }
            Rejection::AfterActiveTo { at, meter_type, active_to } => {
                write!(f, "record time {at} is after meter type \"{meter_type}\" stopped being active ({active_to})")
            }
            Rejection::NoMeter { user_id, meter_type, rule } => write!(
                f,
                "user \"{user_id}\" has no meter of type \"{meter_type}\" in this stream (rule \"{rule}\"; auto_create_meters is off)"
            ),
            Rejection::MeterClosed { meter_id, meter_type } => write!(
                f,
                "meter {meter_id} is closed: meter type \"{meter_type}\" passed its active_to and the meter's last period was flushed"
            ),
            Rejection::NoRuleMatched => write!(f, "no guiding rule matched the record"),
            Rejection::NoRules => write!(f, "the stream has no guiding rules"),
            Rejection::TooDeep { field, limit } => {
                write!(f, "field \"{field}\" nests deeper than {limit} levels of arrays and objects")
            }
        }
    }
}

/// The checks that depend on the moment of processing.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    pub now: Timestamp,
    pub future_tolerance: SignedDuration,
}

impl Clock {
    /// Refuses a timestamp past now by more than the tolerance.
    fn not_future(&self, t: Timestamp) -> Result<(), Rejection> {
        let limit = self.now.checked_add(self.future_tolerance).unwrap_or(Timestamp::MAX);
        if t > limit {
            return Err(Rejection::FutureTimestamp { timestamp: t, limit });
        }
        Ok(())
    }
}

/// A record's mapped fields, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct Extracted<'a> {
    pub user_id: String,
    pub record_id: Option<String>,
    /// The record's own time, if it has one.
    pub timestamp: Option<Timestamp>,
    /// The raw value field; what it must be depends on the meter type's aggregation.
    pub value: Option<&'a Value>,
}

impl Extracted<'_> {
    /// The time the record counts at: its timestamp, or the processing time.
    pub fn at(&self, clock: &Clock) -> Timestamp {
        self.timestamp.unwrap_or(clock.now)
    }
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Describes a bad field value for a rejection reason, without echoing huge input.
pub fn describe(v: &Value) -> String {
    match v {
        Value::String(s) if s.chars().count() <= 40 => format!("\"{s}\""),
        Value::String(_) => "a long string".into(),
        Value::Number(n) if n.as_str().len() <= 40 => n.to_string(),
        other => json_kind(other).to_string(),
    }
}

/// Text of an id-like field (user id, record id): a non-empty string or a number.
fn id_text<V: FieldValue>(v: &V) -> Result<Cow<'_, str>, String> {
    let text = v
        .id_text()
        .ok_or_else(|| format!("is {}: use a string or a number", json_kind(&v.shown())))?;
    check_id(&text)?;
    Ok(text)
}

/// Why `text` cannot be an id (user id, record id), if it cannot.
fn check_id(text: &str) -> Result<(), String> {
    if text.trim().is_empty() {
        return Err("is empty".into());
    }
    if text.len() > MAX_ID_LEN {
        return Err(format!("is longer than {MAX_ID_LEN} bytes"));
    }
    if text.contains('\0') {
        return Err("contains a NUL character".into());
    }
    Ok(())
}

/// Checks the fields every record needs, whatever rule later takes it.
pub fn extract<'a>(
    record: impl Into<RecordRef<'a>>,
    fields: &FieldMap,
    clock: &Clock,
) -> Result<Extracted<'a>, Rejection> {
    let record = record.into();
    if let RecordRef::Whole(value) = record {
        if !value.is_object() {
            return Err(Rejection::NotAnObject {
                found: json_kind(value),
            });
        }
    }
    let found = FoundFields {
        user_id: record.get(&fields.user_id),
        id: record.get(&fields.id),
        timestamp: record.get(&fields.timestamp),
    };
    let checked = found.check(fields, clock)?;
    Ok(Extracted {
        user_id: checked.user_id.into_owned(),
        record_id: checked.record_id.map(Cow::into_owned),
        timestamp: checked.timestamp,
        value: record.get(&fields.value),
    })
}

/// A field's value as the record checks read it: a serde value, or (`jsonb::Node`)
/// a value read in place from a record's jsonb bytes, which `ingest` checks
/// without building serde values of them.
pub trait FieldValue {
    /// A string's text, or a number's JSON text; `None` for anything else.
    fn id_text(&self) -> Option<Cow<'_, str>>;
    /// `parse_timestamp` of the value.
    fn timestamp(&self) -> Option<Timestamp>;
    /// The value as a rejection's reason shows it (`describe`, `json_kind`).
    fn shown(&self) -> Cow<'_, Value>;
}

impl FieldValue for &Value {
    fn id_text(&self) -> Option<Cow<'_, str>> {
        match self {
            Value::String(s) => Some(Cow::Borrowed(s)),
            Value::Number(n) => Some(Cow::Owned(n.to_string())),
            _ => None,
        }
    }

    fn timestamp(&self) -> Option<Timestamp> {
        parse_timestamp(self)
    }

    fn shown(&self) -> Cow<'_, Value> {
        Cow::Borrowed(self)
    }
}

/// What an object record holds at its user id, id and timestamp paths (`None`:
/// missing or null), however it was read.
pub struct FoundFields<V> {
    pub user_id: Option<V>,
    pub id: Option<V>,
    pub timestamp: Option<V>,
}

/// The fields every record needs, checked (the ids borrowed from the record
/// where it holds them as strings).
pub struct CheckedFields<'v> {
    pub user_id: Cow<'v, str>,
    pub record_id: Option<Cow<'v, str>>,
    pub timestamp: Option<Timestamp>,
}

impl<V: FieldValue> FoundFields<V> {
    /// `extract`'s checks, in its order: user id, id, timestamp, not in the future.
    pub fn check(&self, fields: &FieldMap, clock: &Clock) -> Result<CheckedFields<'_>, Rejection> {
        let user_field = || fields.user_id.as_str().to_string();
        let user_id = match &self.user_id {
            None => return Err(Rejection::MissingUserId { field: user_field() }),
            Some(v) => id_text(v).map_err(|reason| Rejection::InvalidUserId {
                field: user_field(),
                reason,
            })?,
        };
        let record_id = match &self.id {
            None => None,
            Some(v) => Some(id_text(v).map_err(|reason| Rejection::InvalidRecordId {
                field: fields.id.as_str().to_string(),
                reason,
            })?),
        };
        let timestamp = match &self.timestamp {
            None => None,
            Some(v) => Some(v.timestamp().ok_or_else(|| Rejection::InvalidTimestamp {
                field: fields.timestamp.as_str().to_string(),
                found: describe(&v.shown()),
            })?),
        };
        if let Some(t) = timestamp {
            clock.not_future(t)?;
        }
        Ok(CheckedFields {
            user_id,
            record_id,
            timestamp,
        })
    }
}

/// ISO-8601 text (with an offset, or UTC when it has none) or Unix milliseconds
/// (a JSON number or a string of digits).
pub fn parse_timestamp(v: &Value) -> Option<Timestamp> {
    match v {
        Value::Number(n) => unix_millis(n.as_str()),
        Value::String(s) => parse_timestamp_text(s),
        _ => None,
    }
}

/// `parse_timestamp` of a JSON string.
pub fn parse_timestamp_text(s: &str) -> Option<Timestamp> {
    let s = s.trim();
    if let Ok(t) = Timestamp::from_str(s) {
        return Some(t);
    }
    if let Ok(dt) = jiff::civil::DateTime::from_str(s) {
        return dt.to_zoned(jiff::tz::TimeZone::UTC).ok().map(|z| z.timestamp());
    }
    if s.bytes().all(|b| b.is_ascii_digit()) && !s.is_empty() {
        return unix_millis(s);
    }
    None
}

fn unix_millis(text: &str) -> Option<Timestamp> {
    let millis = BigDecimal::from_str(text).ok()?;
    if millis.digits() as i64 - millis.fractional_digit_count() > 16 {
        return None; // beyond year ±300000: not a Unix time
    }
    let micros = (millis * BigDecimal::from(1000)).with_scale(0);
    let micros: i64 = micros.to_string().parse().ok()?;
    Timestamp::from_microsecond(micros).ok()
}

/// Parses an exact decimal from a JSON number or a numeric string, refusing NaN,
/// infinities and anything PostgreSQL's `numeric` could not store.
pub fn parse_decimal(v: &Value, field: &FieldPath) -> Result<BigDecimal, Rejection> {
    let invalid = || Rejection::InvalidValue {
        field: field.as_str().to_string(),
        found: describe(v),
    };
    let text = match v {
        Value::Number(n) => n.as_str().to_string(),
        Value::String(s) => s.trim().to_string(),
        _ => return Err(invalid()),
    };
    let plausible = !text.is_empty()
        && text.len() <= 200_000
        && text
            .bytes()
            .all(|b| b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'+' | b'e' | b'E'))
        && text.bytes().any(|b| b.is_ascii_digit());
    if !plausible {
        return Err(invalid());
    }
    let (mantissa_len, exponent) = split_exponent(&text).ok_or_else(invalid)?;
    // Check the magnitude before building the number, so "1e999999999" costs nothing.
    let (int_digits, frac_digits) = mantissa_len;
    let integer_digits = int_digits as i64 + exponent;
    let fraction_digits = frac_digits as i64 - exponent;
    if integer_digits > MAX_INTEGER_DIGITS || fraction_digits > MAX_FRACTION_DIGITS {
        return Err(Rejection::ValueOutOfRange {
            field: field.as_str().to_string(),
        });
    }
    BigDecimal::from_str(&text).map_err(|_| invalid())
}

/// Digits before and after the point in the mantissa, and the exponent.
fn split_exponent(text: &str) -> Option<((usize, usize), i64)> {
    let (mantissa, exponent) = match text.find(['e', 'E']) {
        Some(i) => (&text[..i], text[i + 1..].parse::<i64>().ok()?),
        None => (text, 0),
    };
    let mantissa = mantissa.strip_prefix(['-', '+']).unwrap_or(mantissa);
    let (int_part, frac_part) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    if !int_part.bytes().chain(frac_part.bytes()).all(|b| b.is_ascii_digit()) || int_part.len() + frac_part.len() == 0 {
        return None;
    }
    Some(((int_part.trim_start_matches('0').len(), frac_part.len()), exponent))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn clock() -> Clock {
        Clock {
            now: "2026-06-01T12:00:00Z".parse().unwrap(),
            future_tolerance: SignedDuration::from_mins(5),
        }
    }

    fn ex(record: Value) -> Result<(String, Option<String>, Option<String>), String> {
        // Leak to keep the borrow simple in tests.
        let record: &'static Value = Box::leak(Box::new(record));
        extract(record, &FieldMap::default(), &clock())
            .map(|e| (e.user_id, e.record_id, e.timestamp.map(|t| t.to_string())))
            .map_err(|r| format!("{}: {r}", r.code()))
    }

    #[test]
    fn extracts_user_id_record_id_and_timestamp() {
        assert_eq!(
            ex(json!({"userId": "acme", "id": 7, "timestamp": "2026-06-01T10:00:00+02:00", "value": 1})),
            Ok(("acme".into(), Some("7".into()), Some("2026-06-01T08:00:00Z".into())))
        );
        assert_eq!(ex(json!({"userId": 42})), Ok(("42".into(), None, None)));
        assert_eq!(
            ex(json!({"userId": "u", "timestamp": 1_780_000_000_000u64})),
            Ok(("u".into(), None, Some("2026-05-28T20:26:40Z".into())))
        );
        assert_eq!(
            ex(json!({"userId": "u", "timestamp": "2026-05-31 23:00:00"})),
            Ok(("u".into(), None, Some("2026-05-31T23:00:00Z".into())))
        );
    }

    #[test]
    fn every_record_level_rejection_has_a_code_and_reason() {
        assert_eq!(
            ex(json!([1, 2])),
            Err("not_an_object: record is an array, not a JSON object".into())
        );
        assert_eq!(
            ex(json!({"value": 1})),
            Err("missing_user_id: user id field \"userId\" is missing".into())
        );
        assert_eq!(
            ex(json!({"userId": null})),
            Err("missing_user_id: user id field \"userId\" is missing".into())
        );
        assert_eq!(
            ex(json!({"userId": "  "})),
            Err("invalid_user_id: user id field \"userId\" is empty".into())
        );
        assert_eq!(
            ex(json!({"userId": {"a": 1}})),
            Err("invalid_user_id: user id field \"userId\" is an object: use a string or a number".into())
        );
        assert_eq!(
            ex(json!({"userId": "u", "id": true})),
            Err("invalid_record_id: id field \"id\" is a boolean: use a string or a number".into())
        );
        assert_eq!(
            ex(json!({"userId": "u", "timestamp": "yesterday"})),
            Err("invalid_timestamp: timestamp field \"timestamp\" is \"yesterday\": use an ISO-8601 time (2026-01-31T12:00:00Z) or Unix milliseconds".into())
        );
        assert_eq!(
            ex(json!({"userId": "u", "timestamp": "2026-06-01T12:06:00Z"})),
            Err("future_timestamp: timestamp 2026-06-01T12:06:00Z is in the future (later than 2026-06-01T12:05:00Z, the limit set by meter_ext.future_tolerance)".into())
        );
        // Within tolerance is fine.
        assert!(ex(json!({"userId": "u", "timestamp": "2026-06-01T12:04:59Z"})).is_ok());
    }

    #[test]
    fn dotted_paths_reach_into_objects() {
        let fields = FieldMap {
            user_id: FieldPath::parse("account.id").unwrap(),
            value: FieldPath::parse("usage.bytes").unwrap(),
            ..FieldMap::default()
        };
        let record = json!({"account": {"id": "acme"}, "usage": {"bytes": "1024"}});
        let e = extract(&record, &fields, &clock()).unwrap();
        assert_eq!(e.user_id, "acme");
        assert_eq!(e.value, Some(&json!("1024")));
        assert!(FieldPath::parse("a..b").is_err());
        assert!(FieldPath::parse("").is_err());
    }

    fn dec(v: Value) -> Result<String, String> {
        parse_decimal(&v, &FieldPath::parse("value").unwrap())
            .map(|d| d.to_plain_string())
            .map_err(|r| r.code().into())
    }

    #[test]
    fn values_are_exact_decimals() {
        let n: Value = serde_json::from_str("0.10000000000000000000000000001").unwrap();
        assert_eq!(dec(n), Ok("0.10000000000000000000000000001".into()));
        assert_eq!(dec(json!("12.50")), Ok("12.50".into()));
        assert_eq!(dec(json!(" -3 ")), Ok("-3".into()));
        assert_eq!(dec(serde_json::from_str("1e3").unwrap()), Ok("1000".into()));
        for bad in [
            json!("NaN"),
            json!("Infinity"),
            json!("-inf"),
            json!("1,5"),
            json!(""),
            json!(true),
            json!([1]),
            json!("0x10"),
            json!("1e"),
        ] {
            assert_eq!(dec(bad.clone()), Err("invalid_value".into()), "{bad}");
        }
        assert_eq!(
            dec(serde_json::from_str("1e999999999").unwrap()),
            Err("value_out_of_range".into())
        );
        assert_eq!(dec(json!("1e-20000")), Err("value_out_of_range".into()));
        assert_eq!(dec(json!("1e131071")).map(|s| s.len()), Ok(131_072));
    }

    proptest! {
        #[test]
        fn extraction_never_panics(text in "\\PC{0,80}") {
            if let Ok(v) = serde_json::from_str::<Value>(&text) {
                let _ = extract(&v, &FieldMap::default(), &clock());
                let _ = parse_decimal(&v, &FieldPath::parse("value").unwrap());
                let _ = parse_timestamp(&v);
            }
        }

        #[test]
        fn decimal_strings_round_trip(int in "-?[0-9]{1,30}", frac in "[0-9]{0,30}") {
            let text = if frac.is_empty() { int.clone() } else { format!("{int}.{frac}") };
            let parsed = parse_decimal(&Value::String(text.clone()), &FieldPath::parse("v").unwrap()).unwrap();
            prop_assert_eq!(parsed, BigDecimal::from_str(&text).unwrap());
        }
    }
}
