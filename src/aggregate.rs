//! Aggregations (SPEC §5): how a meter folds usage into its value, its groups and
//! its carried fields over one period.
//!
//! Pure Rust, no Postgres. Values are exact decimals. `unique_count` needs to know
//! whether a value was already seen this period; that memory lives outside (a
//! table, in the database) behind the `SeenValues` trait.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::str::FromStr;

use bigdecimal::BigDecimal;
use jiff::Timestamp;
use serde_json::Value;

use crate::record::{describe, parse_decimal, FieldPath, RecordRef, Rejection};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Aggregation {
    Sum,
    Increment,
    Min,
    Max,
    Latest,
    UniqueCount,
}

pub const AGGREGATION_NAMES: &str = "sum, increment, min, max, latest, unique_count";

impl Aggregation {
    pub fn name(self) -> &'static str {
        match self {
            Aggregation::Sum => "sum",
            Aggregation::Increment => "increment",
            Aggregation::Min => "min",
            Aggregation::Max => "max",
            Aggregation::Latest => "latest",
            Aggregation::UniqueCount => "unique_count",
        }
    }

    /// Whether a meter's value is 0 at the start of a period (otherwise null:
    /// min, max and latest have no value until a record arrives).
    pub fn resets_to_zero(self) -> bool {
        matches!(
            self,
            Aggregation::Sum | Aggregation::Increment | Aggregation::UniqueCount
        )
    }

    pub fn reset_value(self) -> Option<BigDecimal> {
        self.resets_to_zero().then(BigDecimal::default)
    }

    /// Whether records must carry a value (`increment` counts records instead).
    pub fn needs_value(self) -> bool {
        !matches!(self, Aggregation::Increment)
    }
}

impl fmt::Display for Aggregation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("aggregation \"{0}\" is not supported: use one of {AGGREGATION_NAMES}")]
pub struct UnknownAggregation(pub String);

impl FromStr for Aggregation {
    type Err = UnknownAggregation;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s.trim().to_ascii_lowercase().as_str() {
            "sum" => Aggregation::Sum,
            "increment" => Aggregation::Increment,
            "min" => Aggregation::Min,
            "max" => Aggregation::Max,
            "latest" => Aggregation::Latest,
            "unique_count" => Aggregation::UniqueCount,
            _ => return Err(UnknownAggregation(s.to_string())),
        })
    }
}

/// What one record adds to a meter.
#[derive(Debug, Clone, PartialEq)]
pub enum Contribution {
    /// sum, min, max, latest: the record's value.
    Amount(BigDecimal),
    /// increment: one more record.
    One,
    /// unique_count: the value's identity (normalised text).
    Distinct(String),
}

impl Contribution {
    /// What a record's value field contributes to a meter of `aggregation`, or
    /// why it cannot (SPEC §5: increment needs no value; the others need one).
    pub fn from_value(
        aggregation: Aggregation,
        value: Option<&Value>,
        field: &FieldPath,
        meter_type: &str,
    ) -> Result<Contribution, Rejection> {
        let missing = || Rejection::MissingValue {
            field: field.as_str().to_string(),
            meter_type: meter_type.to_string(),
            aggregation: aggregation.name(),
        };
        match aggregation {
            Aggregation::Increment => Ok(Contribution::One),
            Aggregation::UniqueCount => {
                let v = value.ok_or_else(missing)?;
                Contribution::distinct_key(v)
                    .map(Contribution::Distinct)
                    .ok_or_else(|| Rejection::InvalidDistinctValue {
                        field: field.as_str().to_string(),
                        found: describe(v),
                    })
            }
            _ => parse_decimal(value.ok_or_else(missing)?, field).map(Contribution::Amount),
        }
    }

    /// The identity `unique_count` counts: numbers by value (1 = 1.0), strings as they are.
    pub fn distinct_key(v: &Value) -> Option<String> {
        match v {
            Value::Number(n) => n
                .as_str()
                .parse::<BigDecimal>()
                .ok()
                .map(|d| format!("n:{}", d.normalized())),
            Value::String(s) => Some(format!("s:{s}")),
            Value::Bool(b) => Some(format!("b:{b}")),
            _ => None,
        }
    }
}

/// Remembers which values `unique_count` has seen in a meter's period, per group
/// (`""` is the meter total).
pub trait SeenValues {
    /// True the first time this value is seen for this group in the period.
    fn first_sighting(&mut self, group_key: &str, value_key: &str) -> bool;
}

impl SeenValues for HashSet<(String, String)> {
    fn first_sighting(&mut self, group_key: &str, value_key: &str) -> bool {
        self.insert((group_key.to_string(), value_key.to_string()))
    }
}

/// The group a record falls in: `{"key": "region=eu|plan=pro", "fields": {...}}`.
/// It borrows the record's fields: most records fall in a group their meter
/// already has, and only a new group needs them copied (`fields`).
#[derive(Debug, Clone)]
pub struct GroupRef<'a> {
    pub key: String,
    record: RecordRef<'a>,
    group_by: &'a [FieldPath],
}

impl<'a> GroupRef<'a> {
    /// The group of `record` by `group_by`; `None` when the rule does not group.
    /// A missing field groups as null. `|`, `=` and `\` in values are escaped so
    /// different field values never share a key.
    pub fn of(record: impl Into<RecordRef<'a>>, group_by: &'a [FieldPath]) -> Option<GroupRef<'a>> {
        if group_by.is_empty() {
            return None;
        }
        let record = record.into();
        let mut key = String::with_capacity(32);
        for (i, path) in group_by.iter().enumerate() {
            let value = record.get(path);
            if i > 0 {
                key.push('|');
            }
            key.push_str(path.as_str());
            key.push('=');
            let printed;
            let text = match value {
                None | Some(Value::Null) => "",
                Some(Value::String(s)) => s,
                Some(other) => {
                    printed = other.to_string();
                    &printed
                }
            };
            for c in text.chars() {
                if matches!(c, '|' | '=' | '\\') {
                    key.push('\\');
                }
                key.push(c);
            }
        }
        Some(GroupRef { key, record, group_by })
    }

    /// The group's fields as stored: each path with its value (null when missing),
    /// in key order, each path once.
    pub fn fields(&self) -> Fields {
        let mut fields: Fields = self
            .group_by
            .iter()
            .map(|path| (path.to_string(), self.record.get(path).cloned().unwrap_or(Value::Null)))
            .collect();
        fields.sort_by(|a, b| a.0.cmp(&b.0));
        fields.dedup_by(|a, b| a.0 == b.0);
        fields
    }
}

/// A group's fields, in key order: a JSON object's pairs. Kept as a vector, not a
/// map: a meter holds a few groups of a field or two, and a map's smallest node
/// took about 600 bytes for each.
pub type Fields = Vec<(String, Value)>;

/// Where `key` is in `fields` (`Err`: where it would go).
fn field_position(fields: &Fields, key: &str) -> Result<usize, usize> {
    fields.binary_search_by(|(k, _)| k.as_str().cmp(key))
}

/// A meter's groups by key, in key order: a sorted vector while there are few (a
/// tree's smallest node holds eleven groups, and most meters have a handful), a
/// tree once there are many (an insert into the vector moves the groups after it).
#[derive(Debug, Clone)]
pub enum Groups {
    Few(Vec<(String, GroupState)>),
    Many(BTreeMap<String, GroupState>),
}

/// Past this many groups, a meter keeps them in a tree.
const FEW_GROUPS: usize = 32;

impl Default for Groups {
    fn default() -> Self {
        Groups::Few(Vec::new())
    }
}

impl PartialEq for Groups {
    fn eq(&self, other: &Groups) -> bool {
        self.len() == other.len() && self.iter().eq(other.iter())
    }
}

impl Groups {
    pub fn new() -> Groups {
        Groups::default()
    }

    pub fn len(&self) -> usize {
        match self {
            Groups::Few(groups) => groups.len(),
            Groups::Many(groups) => groups.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn get(&self, key: &str) -> Option<&GroupState> {
        match self {
            Groups::Few(groups) => groups
                .binary_search_by(|(k, _)| k.as_str().cmp(key))
                .ok()
                .map(|at| &groups[at].1),
            Groups::Many(groups) => groups.get(key),
        }
    }

    pub fn get_mut(&mut self, key: &str) -> Option<&mut GroupState> {
        match self {
            Groups::Few(groups) => groups
                .binary_search_by(|(k, _)| k.as_str().cmp(key))
                .ok()
                .map(|at| &mut groups[at].1),
            Groups::Many(groups) => groups.get_mut(key),
        }
    }

    pub fn contains_key(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    /// The group of `key`, made by `new` if there is none: one search where a
    /// lookup then an insert took two.
    pub fn get_or_insert_with(&mut self, key: &str, new: impl FnOnce() -> GroupState) -> &mut GroupState {
        let search = |groups: &[(String, GroupState)]| groups.binary_search_by(|(k, _)| k.as_str().cmp(key));
        if let Groups::Few(groups) = self {
            if groups.len() >= FEW_GROUPS && search(groups).is_err() {
                *self = Groups::Many(std::mem::take(groups).into_iter().collect());
            }
        }
        match self {
            Groups::Few(groups) => match search(groups) {
                Ok(at) => &mut groups[at].1,
                Err(at) => {
                    groups.insert(at, (key.to_string(), new()));
                    &mut groups[at].1
                }
            },
            Groups::Many(groups) => {
                if !groups.contains_key(key) {
                    groups.insert(key.to_string(), new());
                }
                groups.get_mut(key).expect("inserted if missing")
            }
        }
    }

    /// Adds a group, or replaces the one of that key.
    pub fn insert(&mut self, key: String, state: GroupState) {
        match self {
            Groups::Few(groups) => match groups.binary_search_by(|(k, _)| k.as_str().cmp(&key)) {
                Ok(at) => groups[at].1 = state,
                Err(_) if groups.len() >= FEW_GROUPS => {
                    let mut many: BTreeMap<String, GroupState> = std::mem::take(groups).into_iter().collect();
                    many.insert(key, state);
                    *self = Groups::Many(many);
                }
                Err(at) => groups.insert(at, (key, state)),
            },
            Groups::Many(groups) => {
                groups.insert(key, state);
            }
        }
    }

    /// The groups in key order.
    pub fn iter(&self) -> Box<dyn Iterator<Item = (&String, &GroupState)> + '_> {
        match self {
            Groups::Few(groups) => Box::new(groups.iter().map(|(k, g)| (k, g))),
            Groups::Many(groups) => Box::new(groups.iter()),
        }
    }

    pub fn values_mut(&mut self) -> Box<dyn Iterator<Item = &mut GroupState> + '_> {
        match self {
            Groups::Few(groups) => Box::new(groups.iter_mut().map(|(_, g)| g)),
            Groups::Many(groups) => Box::new(groups.values_mut()),
        }
    }
}

impl std::ops::Index<&str> for Groups {
    type Output = GroupState;

    fn index(&self, key: &str) -> &GroupState {
        self.get(key).expect("a group of that key")
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct GroupState {
    pub fields: Fields,
    pub value: Option<BigDecimal>,
    /// `latest` only: the time of the record that set `value`.
    pub latest_at: Option<Timestamp>,
}

/// One record's usage, as the meter processor applies it.
#[derive(Debug, Clone)]
pub struct Usage<'a> {
    pub contribution: Contribution,
    /// The record's time (its timestamp, or the processing time).
    pub at: Timestamp,
    pub group: Option<GroupRef<'a>>,
    pub carry_first: &'a [(&'a str, &'a Value)],
    pub carry_last: &'a [(&'a str, &'a Value)],
}

/// A meter's state for its current period.
#[derive(Debug, Clone, PartialEq)]
pub struct MeterState {
    pub aggregation: Aggregation,
    pub value: Option<BigDecimal>,
    /// `latest` only: the time of the record that set `value`.
    pub latest_at: Option<Timestamp>,
    pub groups: Groups,
    pub carry_first: Fields,
    pub carry_last: Fields,
    pub first_record_at: Option<Timestamp>,
    pub last_record_at: Option<Timestamp>,
    pub record_count: i64,
}

impl MeterState {
    /// The state at the start of a period (SPEC §5 reset values).
    pub fn reset(aggregation: Aggregation) -> MeterState {
        MeterState {
            aggregation,
            value: aggregation.reset_value(),
            latest_at: None,
            groups: Groups::new(),
            carry_first: Fields::new(),
            carry_last: Fields::new(),
            first_record_at: None,
            last_record_at: None,
            record_count: 0,
        }
    }

    /// Applies one record; returns the amount it added to the meter's value (for
    /// the audit: the value for sum/min/max/latest, 1 for increment, 1 or 0 for
    /// unique_count).
    pub fn apply(&mut self, usage: &Usage, seen: &mut dyn SeenValues) -> BigDecimal {
        let aggregation = self.aggregation;
        let applied = match fold(
            aggregation,
            &mut self.value,
            &mut self.latest_at,
            &usage.contribution,
            usage.at,
            "",
            seen,
        ) {
            Applied::Amount => match &usage.contribution {
                Contribution::Amount(v) => v.clone(),
                _ => BigDecimal::from(0),
            },
            Applied::One => BigDecimal::from(1),
            Applied::Zero => BigDecimal::from(0),
        };
        if let Some(group) = &usage.group {
            let state = self.groups.get_or_insert_with(&group.key, || GroupState {
                fields: group.fields(),
                value: aggregation.reset_value(),
                latest_at: None,
            });
            fold(
                aggregation,
                &mut state.value,
                &mut state.latest_at,
                &usage.contribution,
                usage.at,
                &group.key,
                seen,
            );
        }
        for (field, value) in usage.carry_first {
            if let Err(at) = field_position(&self.carry_first, field) {
                self.carry_first.insert(at, (field.to_string(), (*value).clone()));
            }
        }
        for (field, value) in usage.carry_last {
            match field_position(&self.carry_last, field) {
                // Most records carry what the last one did: nothing to copy.
                Ok(at) if self.carry_last[at].1 == **value => {}
                Ok(at) => self.carry_last[at].1 = (*value).clone(),
                Err(at) => self.carry_last.insert(at, (field.to_string(), (*value).clone())),
            }
        }
        self.first_record_at = Some(self.first_record_at.map_or(usage.at, |t| t.min(usage.at)));
        self.last_record_at = Some(self.last_record_at.map_or(usage.at, |t| t.max(usage.at)));
        self.record_count += 1;
        applied
    }
}

/// What a record added to a value (see `MeterState::apply`), without building it:
/// a group's fold does not need it.
enum Applied {
    /// The contribution's amount.
    Amount,
    One,
    Zero,
}

fn fold(
    aggregation: Aggregation,
    value: &mut Option<BigDecimal>,
    latest_at: &mut Option<Timestamp>,
    contribution: &Contribution,
    at: Timestamp,
    group_key: &str,
    seen: &mut dyn SeenValues,
) -> Applied {
    // Added in place: most values are kept, and the addition reuses their digits.
    let add_one = |value: &mut Option<BigDecimal>| match value {
        Some(current) => *current += 1u32,
        None => *value = Some(BigDecimal::from(1)),
    };
    match (aggregation, contribution) {
        (Aggregation::Sum, Contribution::Amount(v)) => {
            match value {
                Some(current) => *current += v,
                None => *value = Some(v.clone()),
            }
            Applied::Amount
        }
        (Aggregation::Increment, _) => {
            add_one(value);
            Applied::One
        }
        (Aggregation::Min, Contribution::Amount(v)) => {
            if value.as_ref().is_none_or(|current| v < current) {
                *value = Some(v.clone());
            }
            Applied::Amount
        }
        (Aggregation::Max, Contribution::Amount(v)) => {
            if value.as_ref().is_none_or(|current| v > current) {
                *value = Some(v.clone());
            }
            Applied::Amount
        }
        (Aggregation::Latest, Contribution::Amount(v)) => {
            // Ties go to the record processed later.
            if latest_at.is_none_or(|t| at >= t) {
                *value = Some(v.clone());
                *latest_at = Some(at);
            }
            Applied::Amount
        }
        (Aggregation::UniqueCount, Contribution::Distinct(key)) => {
            if seen.first_sighting(group_key, key) {
                add_one(value);
                Applied::One
            } else {
                Applied::Zero
            }
        }
        // The processor builds the contribution from the aggregation, so other
        // pairs do not occur; they change nothing.
        _ => Applied::Zero,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn at(secs: i64) -> Timestamp {
        Timestamp::from_second(1_780_000_000 + secs).unwrap()
    }

    fn amount(v: &str) -> Contribution {
        Contribution::Amount(v.parse().unwrap())
    }

    fn usage(contribution: Contribution, secs: i64) -> Usage<'static> {
        Usage {
            contribution,
            at: at(secs),
            group: None,
            carry_first: &[],
            carry_last: &[],
        }
    }

    fn run(aggregation: Aggregation, usages: &[Usage]) -> MeterState {
        let mut state = MeterState::reset(aggregation);
        let mut seen = HashSet::new();
        for u in usages {
            state.apply(u, &mut seen);
        }
        state
    }

    fn value(state: &MeterState) -> Option<String> {
        state.value.as_ref().map(|v| v.normalized().to_string())
    }

    #[test]
    fn contributions_follow_the_aggregation() {
        let field = FieldPath::parse("value").unwrap();
        let c = |aggregation, v: Option<Value>| {
            Contribution::from_value(aggregation, v.as_ref(), &field, "t").map_err(|r| r.to_string())
        };
        assert_eq!(c(Aggregation::Increment, None), Ok(Contribution::One));
        assert_eq!(c(Aggregation::Increment, Some(json!("junk"))), Ok(Contribution::One));
        assert_eq!(c(Aggregation::Sum, Some(json!("2.5"))), Ok(amount("2.5")));
        assert_eq!(
            c(Aggregation::Max, None),
            Err("value field \"value\" is missing, and meter type \"t\" (max) needs one".into())
        );
        assert_eq!(
            c(Aggregation::Sum, Some(json!("abc"))),
            Err("value field \"value\" is \"abc\": use a JSON number or a numeric string".into())
        );
        assert_eq!(
            c(Aggregation::UniqueCount, Some(json!("device-1"))),
            Ok(Contribution::Distinct("s:device-1".into()))
        );
        assert_eq!(
            c(Aggregation::UniqueCount, Some(json!({"a": 1}))),
            Err("value field \"value\" is an object: unique_count counts strings, numbers and booleans".into())
        );
    }

    #[test]
    fn reset_values() {
        for (aggregation, expected) in [
            (Aggregation::Sum, Some("0")),
            (Aggregation::Increment, Some("0")),
            (Aggregation::UniqueCount, Some("0")),
            (Aggregation::Min, None),
            (Aggregation::Max, None),
            (Aggregation::Latest, None),
        ] {
            assert_eq!(
                value(&MeterState::reset(aggregation)).as_deref(),
                expected,
                "{aggregation}"
            );
        }
    }

    #[test]
    fn each_aggregation_folds_its_way() {
        let amounts = [("5", 3), ("2.5", 1), ("9", 2), ("-1", 0)];
        let usages: Vec<Usage> = amounts.iter().map(|(v, t)| usage(amount(v), *t)).collect();
        assert_eq!(value(&run(Aggregation::Sum, &usages)).as_deref(), Some("15.5"));
        assert_eq!(value(&run(Aggregation::Min, &usages)).as_deref(), Some("-1"));
        assert_eq!(value(&run(Aggregation::Max, &usages)).as_deref(), Some("9"));
        // latest: the record with the greatest timestamp (t=3), not the last processed.
        assert_eq!(value(&run(Aggregation::Latest, &usages)).as_deref(), Some("5"));
        let ones: Vec<Usage> = (0..4).map(|t| usage(Contribution::One, t)).collect();
        assert_eq!(value(&run(Aggregation::Increment, &ones)).as_deref(), Some("4"));
        let distinct: Vec<Usage> = [json!("a"), json!("b"), json!("a"), json!(1), json!(1.0)]
            .iter()
            .map(|v| usage(Contribution::Distinct(Contribution::distinct_key(v).unwrap()), 0))
            .collect();
        assert_eq!(value(&run(Aggregation::UniqueCount, &distinct)).as_deref(), Some("3"));
    }

    #[test]
    fn groups_carry_and_metadata() {
        let record = json!({"region": "eu", "plan": "pro", "sessionId": "s1", "device": {"os": "ios"}});
        let record2 = json!({"region": "us", "plan": "free", "sessionId": "s2"});
        let group_by = [FieldPath::parse("region").unwrap(), FieldPath::parse("plan").unwrap()];
        let first = GroupRef::of(&record, &group_by).unwrap();
        assert_eq!(first.key, "region=eu|plan=pro");
        assert_eq!(
            first.fields(),
            vec![("plan".to_string(), json!("pro")), ("region".to_string(), json!("eu"))]
        );
        let mut state = MeterState::reset(Aggregation::Sum);
        let mut seen = HashSet::new();
        let os = json!("ios");
        let (s1, s2) = (json!("s1"), json!("s2"));
        let (pro, free) = (json!("pro"), json!("free"));
        state.apply(
            &Usage {
                contribution: amount("10"),
                at: at(5),
                group: Some(first.clone()),
                carry_first: &[("plan", &pro)],
                carry_last: &[("sessionId", &s1), ("device.os", &os)],
            },
            &mut seen,
        );
        state.apply(
            &Usage {
                contribution: amount("2"),
                at: at(1),
                group: GroupRef::of(&record2, &group_by),
                carry_first: &[("plan", &free)],
                carry_last: &[("sessionId", &s2)],
            },
            &mut seen,
        );
        state.apply(
            &Usage {
                contribution: amount("1"),
                at: at(9),
                group: Some(first),
                carry_first: &[],
                carry_last: &[],
            },
            &mut seen,
        );
        assert_eq!(value(&state).as_deref(), Some("13"));
        let groups: Vec<(String, String)> = state
            .groups
            .iter()
            .map(|(k, g)| (k.clone(), g.value.as_ref().unwrap().to_string()))
            .collect();
        assert_eq!(
            groups,
            [
                ("region=eu|plan=pro".to_string(), "11".to_string()),
                ("region=us|plan=free".into(), "2".into())
            ]
        );
        let object = |fields: &Fields| Value::Object(fields.iter().cloned().collect());
        assert_eq!(object(&state.carry_first), json!({"plan": "pro"}));
        assert_eq!(
            object(&state.carry_last),
            json!({"sessionId": "s2", "device.os": "ios"})
        );
        // In key order, as a JSON object has them.
        assert_eq!(state.carry_last[0].0, "device.os");
        assert_eq!(
            (state.first_record_at, state.last_record_at, state.record_count),
            (Some(at(1)), Some(at(9)), 3)
        );
    }

    #[test]
    fn group_keys_escape_separators_and_missing_fields_are_null() {
        let group_by = [FieldPath::parse("a").unwrap(), FieldPath::parse("b").unwrap()];
        let record = json!({"a": "x|b=y"});
        let tricky = GroupRef::of(&record, &group_by).unwrap();
        assert_eq!(tricky.key, "a=x\\|b\\=y|b=");
        assert_eq!(tricky.fields()[1], ("b".to_string(), Value::Null));
        assert_ne!(
            tricky.key,
            GroupRef::of(&json!({"a": "x", "b": "y|b="}), &group_by).unwrap().key
        );
        assert!(GroupRef::of(&json!({"a": 1}), &[]).is_none());
    }

    #[test]
    fn unique_count_counts_per_group_too() {
        let group_by = [FieldPath::parse("region").unwrap()];
        let mut state = MeterState::reset(Aggregation::UniqueCount);
        let mut seen = HashSet::new();
        for (region, device) in [("eu", "d1"), ("eu", "d1"), ("us", "d1"), ("eu", "d2")] {
            let record = json!({"region": region});
            let applied = state.apply(
                &Usage {
                    contribution: Contribution::Distinct(device.to_string()),
                    at: at(0),
                    group: GroupRef::of(&record, &group_by),
                    carry_first: &[],
                    carry_last: &[],
                },
                &mut seen,
            );
            assert!(applied == BigDecimal::from(0) || applied == BigDecimal::from(1));
        }
        assert_eq!(value(&state).as_deref(), Some("2")); // d1, d2
        assert_eq!(state.groups["region=eu"].value, Some(BigDecimal::from(2)));
        assert_eq!(state.groups["region=us"].value, Some(BigDecimal::from(1)));
    }

    #[test]
    fn a_million_tenths_sum_exactly() {
        let tenth: BigDecimal = "0.1".parse().unwrap();
        let mut state = MeterState::reset(Aggregation::Sum);
        let mut seen = HashSet::new();
        let u = Usage {
            contribution: Contribution::Amount(tenth),
            at: at(0),
            group: None,
            carry_first: &[],
            carry_last: &[],
        };
        for _ in 0..1_000_000 {
            state.apply(&u, &mut seen);
        }
        assert_eq!(state.value.unwrap().normalized(), BigDecimal::from(100_000));
    }

    fn decimal() -> impl Strategy<Value = String> {
        (-1_000_000i64..1_000_000, 0u32..6).prop_map(|(n, scale)| BigDecimal::new(n.into(), scale as i64).to_string())
    }

    proptest! {
        /// Groups answer as a tree of the same inserts would, on both sides of
        /// the switch from a vector to a tree.
        #[test]
        fn groups_behave_as_a_sorted_map(inserts in prop::collection::vec((0u32..80, 0i64..1000), 0..200)) {
            let mut groups = Groups::new();
            let mut model: BTreeMap<String, GroupState> = BTreeMap::new();
            let state = |v: i64| GroupState { fields: vec![], value: Some(BigDecimal::from(v)), latest_at: None };
            for (key, value) in inserts {
                let key = format!("k={key}");
                if value % 3 == 0 {
                    if let Some(group) = groups.get_mut(&key) {
                        group.value = Some(BigDecimal::from(value));
                    }
                    if let Some(group) = model.get_mut(&key) {
                        group.value = Some(BigDecimal::from(value));
                    }
                } else if value % 3 == 1 {
                    // Kept if there, made if not; then changed in place.
                    let group = groups.get_or_insert_with(&key, || state(value));
                    group.latest_at = Some(at(value));
                    model.entry(key).or_insert_with(|| state(value)).latest_at = Some(at(value));
                } else {
                    groups.insert(key.clone(), state(value));
                    model.insert(key, state(value));
                }
                prop_assert_eq!(groups.len(), model.len());
            }
            prop_assert!(groups.iter().eq(model.iter()));
            prop_assert_eq!(matches!(groups, Groups::Many(_)), model.len() > FEW_GROUPS);
            for (key, group) in &model {
                prop_assert_eq!(&groups[key.as_str()], group);
            }
            prop_assert!(!groups.contains_key("absent"));
        }

        #[test]
        fn order_does_not_matter_for_order_free_aggregations(
            values in prop::collection::vec((decimal(), 0i64..1000, 0usize..4), 1..60),
            seed in any::<u64>(),
        ) {
            let group_by = [FieldPath::parse("g").unwrap()];
            let make = |aggregation: Aggregation, items: &[(String, i64, usize)]| {
                let records: Vec<Value> = items.iter().map(|(_, _, g)| json!({"g": g})).collect();
                let usages: Vec<Usage> = items.iter().zip(&records).map(|((v, t, _), r)| Usage {
                    contribution: match aggregation {
                        Aggregation::Increment => Contribution::One,
                        Aggregation::UniqueCount => Contribution::Distinct(v.clone()),
                        _ => amount(v),
                    },
                    at: at(*t),
                    group: GroupRef::of(r, &group_by),
                    carry_first: &[],
                    carry_last: &[],
                }).collect();
                let mut state = run(aggregation, &usages);
                // Normalise scale so 1.50 and 1.5 compare equal.
                state.value = state.value.map(|v| v.normalized());
                for g in state.groups.values_mut() { g.value = g.value.take().map(|v| v.normalized()); }
                state
            };
            let mut shuffled = values.clone();
            // Deterministic shuffle from the seed.
            let mut s = seed;
            for i in (1..shuffled.len()).rev() {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                shuffled.swap(i, (s >> 33) as usize % (i + 1));
            }
            for aggregation in [Aggregation::Sum, Aggregation::Increment, Aggregation::Min, Aggregation::Max, Aggregation::UniqueCount] {
                prop_assert_eq!(make(aggregation, &values), make(aggregation, &shuffled), "{}", aggregation);
            }
        }

        #[test]
        fn latest_takes_the_greatest_timestamp(
            values in prop::collection::vec((decimal(), 0i64..1_000_000), 1..60),
        ) {
            let mut distinct = values.clone();
            distinct.sort_by_key(|(_, t)| *t);
            distinct.dedup_by_key(|(_, t)| *t);
            let usages: Vec<Usage> = distinct.iter().rev().map(|(v, t)| usage(amount(v), *t)).collect();
            let state = run(Aggregation::Latest, &usages);
            let (expected, _) = distinct.last().unwrap();
            prop_assert_eq!(state.value, Some(expected.parse::<BigDecimal>().unwrap()));
        }
    }

    #[test]
    fn names_round_trip() {
        for name in AGGREGATION_NAMES.split(", ") {
            assert_eq!(name.parse::<Aggregation>().unwrap().name(), name);
        }
        assert_eq!("SUM".parse::<Aggregation>().unwrap(), Aggregation::Sum);
        assert_eq!(
            "avg".parse::<Aggregation>().unwrap_err().to_string(),
            "aggregation \"avg\" is not supported: use one of sum, increment, min, max, latest, unique_count"
        );
    }
}
