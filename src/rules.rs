//! Guiding rules (SPEC §4): which meter type a record goes to.
//!
//! Pure Rust, no Postgres. A stream's rules are an ordered JSON array; they are
//! validated when written and evaluated in order, a rule falling through when the
//! record's user cannot be metered by it.

use std::collections::HashSet;
use std::fmt;

use bigdecimal::BigDecimal;
use serde_json::{Map, Value};

use crate::record::{FieldPath, RecordRef, Rejection};

pub const MAX_RULES: usize = 100;
const RULE_KEYS: &[&str] = &[
    "name",
    "conditions",
    "relation",
    "meter_type",
    "group_by",
    "carry_first",
    "carry_last",
];
const CONDITION_KEYS: &[&str] = &["field", "op", "value"];
const OPERATORS: &str = "eq, ne, in, exists, prefix";

#[derive(Debug, Clone, PartialEq)]
pub enum Operator {
    Eq(Scalar),
    Ne(Scalar),
    In(Vec<Scalar>),
    /// `true`: the field is present and not null; `false`: it is absent or null.
    Exists(bool),
    Prefix(String),
}

/// A typed constant: UE's `eq` is exact and typed (string, number, boolean).
#[derive(Debug, Clone, PartialEq)]
pub enum Scalar {
    String(String),
    Number(BigDecimal),
    Bool(bool),
}

impl Scalar {
    fn from_json(v: &Value) -> Option<Scalar> {
        match v {
            Value::String(s) => Some(Scalar::String(s.clone())),
            Value::Bool(b) => Some(Scalar::Bool(*b)),
            Value::Number(n) => n.as_str().parse().ok().map(Scalar::Number),
            _ => None,
        }
    }

    /// Equal when of the same JSON type and value; numbers compare by value (1 = 1.0).
    fn matches(&self, v: &Value) -> bool {
        match (self, v) {
            (Scalar::String(a), Value::String(b)) => a == b,
            (Scalar::Bool(a), Value::Bool(b)) => a == b,
            (Scalar::Number(a), Value::Number(b)) => b.as_str().parse::<BigDecimal>().is_ok_and(|b| *a == b),
            _ => false,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Condition {
    pub field: FieldPath,
    pub op: Operator,
}

impl Condition {
    pub fn holds<'a>(&self, record: impl Into<RecordRef<'a>>) -> bool {
        let found = record.into().get(&self.field);
        match &self.op {
            Operator::Eq(s) => found.is_some_and(|v| s.matches(v)),
            Operator::Ne(s) => !found.is_some_and(|v| s.matches(v)),
            Operator::In(set) => found.is_some_and(|v| set.iter().any(|s| s.matches(v))),
            Operator::Exists(wanted) => found.is_some() == *wanted,
            Operator::Prefix(p) => found.and_then(Value::as_str).is_some_and(|s| s.starts_with(p.as_str())),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Relation {
    And,
    Or,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    pub name: String,
    pub conditions: Vec<Condition>,
    pub relation: Relation,
    pub meter_type: String,
    pub group_by: Vec<FieldPath>,
    pub carry_first: Vec<FieldPath>,
    pub carry_last: Vec<FieldPath>,
}

impl Rule {
    /// No conditions always match.
    pub fn conditions_hold<'a>(&self, record: impl Into<RecordRef<'a>>) -> bool {
        let record = record.into();
        match self.relation {
            Relation::And => self.conditions.iter().all(|c| c.holds(record)),
            Relation::Or => self.conditions.is_empty() || self.conditions.iter().any(|c| c.holds(record)),
        }
    }
}

/// A validation error, naming the rule (by name or position) and the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleError {
    pub rule: Option<String>,
    pub message: String,
}

impl fmt::Display for RuleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.rule {
            Some(rule) => write!(f, "guiding_rules: {rule}: {}", self.message),
            None => write!(f, "guiding_rules: {}", self.message),
        }
    }
}

impl std::error::Error for RuleError {}

/// A stream's validated, ordered rules.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RuleSet {
    pub rules: Vec<Rule>,
}

/// Why a rule did not take a record it matched (the caller decides, as it knows
/// the meters and meter types).
pub type Refusal = Rejection;

/// The outcome of evaluating a record against the rules.
#[derive(Debug, PartialEq)]
pub enum Decision<'r> {
    Taken(&'r Rule),
    /// Rejected, with the last rule whose conditions held (if any).
    Rejected {
        rejection: Rejection,
        last_rule: Option<&'r str>,
    },
}

impl RuleSet {
    /// Parses and validates `guiding_rules`. `meter_type_exists` answers whether a
    /// meter type of that name exists.
    pub fn parse(json: &Value, meter_type_exists: &dyn Fn(&str) -> bool) -> Result<RuleSet, RuleError> {
        let top = |message: String| RuleError { rule: None, message };
        let Value::Array(items) = json else {
            return Err(top("must be a JSON array of rules".into()));
        };
        if items.len() > MAX_RULES {
            return Err(top(format!(
                "has {} rules; a stream has at most {MAX_RULES}",
                items.len()
            )));
        }
        let mut names = HashSet::new();
        let mut rules = Vec::with_capacity(items.len());
        for (index, item) in items.iter().enumerate() {
            let rule = parse_rule(index, item, meter_type_exists)?;
            if !names.insert(rule.name.clone()) {
                return Err(RuleError {
                    rule: Some(format!("rule #{} \"{}\"", index + 1, rule.name)),
                    message: "duplicate rule name: names must be unique within a stream".into(),
                });
            }
            rules.push(rule);
        }
        Ok(RuleSet { rules })
    }

    /// The position of `rule`, one of this set's, among the rules.
    pub fn index_of(&self, rule: &Rule) -> Option<usize> {
        self.rules.iter().position(|r| std::ptr::eq(r, rule))
    }

    pub fn meter_types(&self) -> impl Iterator<Item = &str> {
        self.rules.iter().map(|r| r.meter_type.as_str())
    }

    /// Evaluates the rules in order. `try_take` is asked about every rule whose
    /// conditions hold; an `Err` makes the record fall through to the next rule,
    /// and the last such refusal becomes the rejection reason.
    pub fn evaluate<'r, 'v>(
        &'r self,
        record: impl Into<RecordRef<'v>>,
        mut try_take: impl FnMut(&'r Rule) -> Result<(), Refusal>,
    ) -> Decision<'r> {
        let record = record.into();
        if self.rules.is_empty() {
            return Decision::Rejected {
                rejection: Rejection::NoRules,
                last_rule: None,
            };
        }
        let mut last: Option<(Refusal, &'r str)> = None;
        for rule in &self.rules {
            if !rule.conditions_hold(record) {
                continue;
            }
            match try_take(rule) {
                Ok(()) => return Decision::Taken(rule),
                Err(refusal) => last = Some((refusal, rule.name.as_str())),
            }
        }
        match last {
            Some((rejection, rule)) => Decision::Rejected {
                rejection,
                last_rule: Some(rule),
            },
            None => Decision::Rejected {
                rejection: Rejection::NoRuleMatched,
                last_rule: None,
            },
        }
    }
}

fn parse_rule(index: usize, item: &Value, meter_type_exists: &dyn Fn(&str) -> bool) -> Result<Rule, RuleError> {
    let position = format!("rule #{}", index + 1);
    let Value::Object(obj) = item else {
        return Err(RuleError {
            rule: Some(position),
            message: "must be a JSON object".into(),
        });
    };
    // Name the rule by its name once known, by position before.
    let name = match obj.get("name") {
        Some(Value::String(s)) if !s.trim().is_empty() => s.clone(),
        Some(_) => return Err(err(&position, "key \"name\" must be a non-empty string")),
        None => return Err(err(&position, "key \"name\" is missing")),
    };
    let label = format!("rule #{} \"{name}\"", index + 1);
    for key in obj.keys() {
        if !RULE_KEYS.contains(&key.as_str()) {
            return Err(err(
                &label,
                &format!("unknown key \"{key}\" (known keys: {})", RULE_KEYS.join(", ")),
            ));
        }
    }
    let meter_type = match obj.get("meter_type") {
        Some(Value::String(s)) if !s.trim().is_empty() => s.clone(),
        Some(_) => return Err(err(&label, "key \"meter_type\" must be a non-empty string")),
        None => return Err(err(&label, "key \"meter_type\" is missing")),
    };
    if !meter_type_exists(&meter_type) {
        return Err(err(
            &label,
            &format!("key \"meter_type\": meter type \"{meter_type}\" does not exist"),
        ));
    }
    let relation = match obj.get("relation") {
        None => Relation::And,
        Some(Value::String(s)) if s == "and" => Relation::And,
        Some(Value::String(s)) if s == "or" => Relation::Or,
        Some(other) => {
            return Err(err(
                &label,
                &format!("key \"relation\" is {other}: use \"and\" or \"or\""),
            ))
        }
    };
    let conditions = match obj.get("conditions") {
        None => vec![],
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, c)| parse_condition(&label, i, c))
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(err(&label, "key \"conditions\" must be an array")),
    };
    Ok(Rule {
        name,
        conditions,
        relation,
        meter_type,
        group_by: field_list(&label, obj, "group_by")?,
        carry_first: field_list(&label, obj, "carry_first")?,
        carry_last: field_list(&label, obj, "carry_last")?,
    })
}

fn err(label: &str, message: &str) -> RuleError {
    RuleError {
        rule: Some(label.to_string()),
        message: message.to_string(),
    }
}

fn field_list(label: &str, obj: &Map<String, Value>, key: &str) -> Result<Vec<FieldPath>, RuleError> {
    let Some(value) = obj.get(key) else { return Ok(vec![]) };
    let bad = || {
        err(
            label,
            &format!("key \"{key}\" must be an array of field paths (strings)"),
        )
    };
    let Value::Array(items) = value else { return Err(bad()) };
    let mut seen = HashSet::new();
    items
        .iter()
        .map(|item| {
            let text = item.as_str().ok_or_else(bad)?;
            let path = FieldPath::parse(text).map_err(|e| err(label, &format!("key \"{key}\": {e}")))?;
            if !seen.insert(text.to_string()) {
                return Err(err(label, &format!("key \"{key}\" lists \"{text}\" twice")));
            }
            Ok(path)
        })
        .collect()
}

fn parse_condition(label: &str, index: usize, item: &Value) -> Result<Condition, RuleError> {
    let at = format!("condition #{}", index + 1);
    let fail = |message: String| err(label, &format!("{at}: {message}"));
    let Value::Object(obj) = item else {
        return Err(fail("must be a JSON object".into()));
    };
    for key in obj.keys() {
        if !CONDITION_KEYS.contains(&key.as_str()) {
            return Err(fail(format!(
                "unknown key \"{key}\" (known keys: {})",
                CONDITION_KEYS.join(", ")
            )));
        }
    }
    let field = match obj.get("field") {
        Some(Value::String(s)) => FieldPath::parse(s).map_err(|e| fail(format!("key \"field\": {e}")))?,
        Some(_) => return Err(fail("key \"field\" must be a string".into())),
        None => return Err(fail("key \"field\" is missing".into())),
    };
    let op = match obj.get("op") {
        Some(Value::String(s)) => s.as_str(),
        Some(_) => return Err(fail(format!("key \"op\" must be a string, one of {OPERATORS}"))),
        None => return Err(fail("key \"op\" is missing".into())),
    };
    let value = obj.get("value");
    let scalar = |v: Option<&Value>| -> Result<Scalar, RuleError> {
        let v = v.ok_or_else(|| fail(format!("key \"value\" is missing (op \"{op}\" compares with it)")))?;
        Scalar::from_json(v).ok_or_else(|| {
            fail(format!(
                "key \"value\" is {v}: op \"{op}\" takes a string, number or boolean"
            ))
        })
    };
    let op = match op {
        "eq" => Operator::Eq(scalar(value)?),
        "ne" => Operator::Ne(scalar(value)?),
        "in" => match value {
            Some(Value::Array(items)) if !items.is_empty() => {
                Operator::In(items.iter().map(|v| scalar(Some(v))).collect::<Result<_, _>>()?)
            }
            _ => return Err(fail("key \"value\" must be a non-empty array for op \"in\"".into())),
        },
        "exists" => match value {
            None => Operator::Exists(true),
            Some(Value::Bool(b)) => Operator::Exists(*b),
            Some(_) => return Err(fail("key \"value\" must be true or false for op \"exists\"".into())),
        },
        "prefix" => match value {
            Some(Value::String(s)) => Operator::Prefix(s.clone()),
            _ => return Err(fail("key \"value\" must be a string for op \"prefix\"".into())),
        },
        other => return Err(fail(format!("unknown op \"{other}\" (use one of {OPERATORS})"))),
    };
    Ok(Condition { field, op })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn known(name: &str) -> bool {
        ["api-calls", "storage", "eu-calls"].contains(&name)
    }

    fn parse(v: Value) -> Result<RuleSet, String> {
        RuleSet::parse(&v, &known).map_err(|e| e.to_string())
    }

    fn spec_rule() -> Value {
        json!({"name": "eu-api-calls",
               "conditions": [{"field": "service", "op": "eq", "value": "api"},
                              {"field": "region", "op": "in", "value": ["eu", "uk"]}],
               "relation": "and",
               "meter_type": "api-calls",
               "group_by": ["region", "plan"],
               "carry_first": ["plan"],
               "carry_last": ["sessionId", "device.os"]})
    }

    #[test]
    fn the_spec_example_parses() {
        let set = parse(json!([spec_rule()])).unwrap();
        let rule = &set.rules[0];
        assert_eq!(rule.name, "eu-api-calls");
        assert_eq!(rule.conditions.len(), 2);
        assert_eq!(
            rule.group_by.iter().map(FieldPath::as_str).collect::<Vec<_>>(),
            ["region", "plan"]
        );
        assert_eq!(rule.carry_last[1].as_str(), "device.os");
        assert!(rule.conditions_hold(&json!({"service": "api", "region": "uk"})));
        assert!(!rule.conditions_hold(&json!({"service": "api", "region": "us"})));
        assert!(!rule.conditions_hold(&json!({"service": "API", "region": "eu"})));
    }

    #[test]
    fn validation_errors_name_the_rule_and_key() {
        let cases = [
            (json!({}), "guiding_rules: must be a JSON array of rules"),
            (json!([1]), "guiding_rules: rule #1: must be a JSON object"),
            (json!([{"meter_type": "storage"}]), "guiding_rules: rule #1: key \"name\" is missing"),
            (
                json!([{"name": "a", "meter_type": "storage", "groupBy": ["x"]}]),
                "guiding_rules: rule #1 \"a\": unknown key \"groupBy\" (known keys: name, conditions, relation, meter_type, group_by, carry_first, carry_last)",
            ),
            (json!([{"name": "a"}]), "guiding_rules: rule #1 \"a\": key \"meter_type\" is missing"),
            (
                json!([{"name": "a", "meter_type": "nope"}]),
                "guiding_rules: rule #1 \"a\": key \"meter_type\": meter type \"nope\" does not exist",
            ),
            (
                json!([{"name": "a", "meter_type": "storage", "conditions": [{"field": "x", "op": "like", "value": "y"}]}]),
                "guiding_rules: rule #1 \"a\": condition #1: unknown op \"like\" (use one of eq, ne, in, exists, prefix)",
            ),
            (
                json!([{"name": "a", "meter_type": "storage", "conditions": [{"field": "x", "op": "eq"}]}]),
                "guiding_rules: rule #1 \"a\": condition #1: key \"value\" is missing (op \"eq\" compares with it)",
            ),
            (
                json!([{"name": "a", "meter_type": "storage", "conditions": [{"field": "x", "op": "eq", "value": {"a": 1}}]}]),
                "guiding_rules: rule #1 \"a\": condition #1: key \"value\" is {\"a\":1}: op \"eq\" takes a string, number or boolean",
            ),
            (
                json!([{"name": "a", "meter_type": "storage", "conditions": [{"field": "x", "op": "in", "value": []}]}]),
                "guiding_rules: rule #1 \"a\": condition #1: key \"value\" must be a non-empty array for op \"in\"",
            ),
            (
                json!([{"name": "a", "meter_type": "storage", "conditions": [{"field": "x", "op": "eq", "value": 1, "negate": true}]}]),
                "guiding_rules: rule #1 \"a\": condition #1: unknown key \"negate\" (known keys: field, op, value)",
            ),
            (
                json!([{"name": "a", "meter_type": "storage", "relation": "xor"}]),
                "guiding_rules: rule #1 \"a\": key \"relation\" is \"xor\": use \"and\" or \"or\"",
            ),
            (
                json!([{"name": "a", "meter_type": "storage", "group_by": "region"}]),
                "guiding_rules: rule #1 \"a\": key \"group_by\" must be an array of field paths (strings)",
            ),
            (
                json!([{"name": "a", "meter_type": "storage"}, {"name": "a", "meter_type": "api-calls"}]),
                "guiding_rules: rule #2 \"a\": duplicate rule name: names must be unique within a stream",
            ),
        ];
        for (input, expected) in cases {
            assert_eq!(parse(input.clone()).unwrap_err(), expected, "{input}");
        }
        let too_many: Vec<Value> = (0..101)
            .map(|i| json!({"name": format!("r{i}"), "meter_type": "storage"}))
            .collect();
        assert_eq!(
            parse(Value::Array(too_many)).unwrap_err(),
            "guiding_rules: has 101 rules; a stream has at most 100"
        );
    }

    #[test]
    fn operators_are_typed_and_exact() {
        let c = |op: Value| -> Condition {
            let rules = parse(json!([{"name": "r", "meter_type": "storage", "conditions": [op]}])).unwrap();
            rules.rules[0].conditions[0].clone()
        };
        let eq5 = c(json!({"field": "n", "op": "eq", "value": 5}));
        assert!(eq5.holds(&json!({"n": 5})));
        assert!(eq5.holds(&serde_json::from_str::<Value>(r#"{"n": 5.0}"#).unwrap()));
        assert!(!eq5.holds(&json!({"n": "5"})));
        let eq_true = c(json!({"field": "flag", "op": "eq", "value": true}));
        assert!(eq_true.holds(&json!({"flag": true})) && !eq_true.holds(&json!({"flag": "true"})));
        let ne = c(json!({"field": "plan", "op": "ne", "value": "free"}));
        assert!(ne.holds(&json!({"plan": "pro"})) && ne.holds(&json!({})) && !ne.holds(&json!({"plan": "free"})));
        let exists = c(json!({"field": "device.os", "op": "exists"}));
        assert!(exists.holds(&json!({"device": {"os": "ios"}})));
        assert!(!exists.holds(&json!({"device": {"os": null}})) && !exists.holds(&json!({"device": "x"})));
        let absent = c(json!({"field": "debug", "op": "exists", "value": false}));
        assert!(absent.holds(&json!({})) && !absent.holds(&json!({"debug": 1})));
        let prefix = c(json!({"field": "path", "op": "prefix", "value": "/v2/"}));
        assert!(prefix.holds(&json!({"path": "/v2/users"})) && !prefix.holds(&json!({"path": "/V2/users"})));
    }

    #[test]
    fn or_relation_and_empty_conditions() {
        let set = parse(json!([
            {"name": "either", "meter_type": "storage", "relation": "or",
             "conditions": [{"field": "a", "op": "exists"}, {"field": "b", "op": "exists"}]},
            {"name": "always", "meter_type": "api-calls"}
        ]))
        .unwrap();
        assert!(set.rules[0].conditions_hold(&json!({"b": 1})));
        assert!(!set.rules[0].conditions_hold(&json!({"c": 1})));
        assert!(set.rules[1].conditions_hold(&json!({})));
    }

    #[test]
    fn evaluation_falls_through_and_reports_the_last_rule() {
        let set = parse(json!([
            {"name": "eu", "meter_type": "eu-calls", "conditions": [{"field": "region", "op": "eq", "value": "eu"}]},
            {"name": "all", "meter_type": "api-calls"}
        ]))
        .unwrap();
        // The user has only an api-calls meter: the eu rule falls through.
        let decision = set.evaluate(&json!({"region": "eu"}), |rule| {
            if rule.meter_type == "api-calls" {
                Ok(())
            } else {
                Err(Rejection::NoMeter {
                    user_id: "u".into(),
                    meter_type: rule.meter_type.clone(),
                    rule: rule.name.clone(),
                })
            }
        });
        assert_eq!(decision, Decision::Taken(&set.rules[1]));
        // No meters at all: rejected with the last rule whose conditions held.
        let decision = set.evaluate(&json!({"region": "eu"}), |rule| {
            Err(Rejection::NoMeter {
                user_id: "u".into(),
                meter_type: rule.meter_type.clone(),
                rule: rule.name.clone(),
            })
        });
        match decision {
            Decision::Rejected { rejection, last_rule } => {
                assert_eq!(last_rule, Some("all"));
                assert_eq!(rejection.code(), "no_meter");
            }
            other => panic!("{other:?}"),
        }
        // Nothing matches.
        let only_eu = parse(json!([{"name": "eu", "meter_type": "eu-calls", "conditions": [{"field": "region", "op": "eq", "value": "eu"}]}])).unwrap();
        assert_eq!(
            only_eu.evaluate(&json!({"region": "us"}), |_| Ok(())),
            Decision::Rejected {
                rejection: Rejection::NoRuleMatched,
                last_rule: None
            }
        );
        assert_eq!(
            RuleSet::default().evaluate(&json!({}), |_| Ok(())),
            Decision::Rejected {
                rejection: Rejection::NoRules,
                last_rule: None
            }
        );
    }

    fn arbitrary_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|n| json!(n)),
            "[a-z0-9 .]{0,8}".prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 32, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::btree_map("[a-z]{1,6}", inner, 0..6)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #[test]
        fn parsing_arbitrary_rules_never_panics(rules in arbitrary_json()) {
            let _ = RuleSet::parse(&rules, &known);
            let _ = RuleSet::parse(&Value::Array(vec![rules]), &|_| true);
        }

        #[test]
        fn evaluating_arbitrary_records_never_panics(record in arbitrary_json(), field in "[a-z]{1,3}(\\.[a-z]{1,3})?") {
            let set = parse(json!([
                {"name": "a", "meter_type": "storage", "conditions": [{"field": field.clone(), "op": "eq", "value": 1}]},
                {"name": "b", "meter_type": "storage", "relation": "or", "conditions": [
                    {"field": field.clone(), "op": "in", "value": ["x", 2, true]},
                    {"field": field.clone(), "op": "prefix", "value": "a"},
                    {"field": field.clone(), "op": "exists"},
                    {"field": field, "op": "ne", "value": "z"}]}
            ])).unwrap();
            let _ = set.evaluate(&record, |_| Ok(()));
        }
    }
}
