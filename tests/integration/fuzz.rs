//! Bad input (SPEC §10): random and adversarial JSON to `ingest`, `preview`,
//! `create_stream` rules and `create_meter_type`. Every call ends in a result or a
//! clear error (never an internal error, a panic or a lost backend), and every
//! record sent is accounted for: queued records = metered + rejected + duplicates.
//!
//! Deterministic: a fixed seed, so a failure reproduces.

use postgres::Client;
use serde_json::{json, Map, Value};

use crate::support::{fresh_database, unverified_meters};

const CASES: usize = 400;

/// xorshift64*: small, seedable, good enough to pick test inputs.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn pick<'a>(&mut self, items: &'a [&'a str]) -> &'a str {
        items[self.below(items.len())]
    }
}

const NASTY_STRINGS: &[&str] = &[
    "",
    "acme",
    "'; DROP TABLE meter.meters; --",
    "\" OR 1=1 --",
    "NaN",
    "Infinity",
    "-Infinity",
    "1e400",
    "-0",
    "0.1",
    "99999999999999999999999999999999999999.000000000000000000001",
    "2026-13-45T99:99:99Z",
    "1970-01-01T00:00:00Z",
    "9999-12-31T23:59:59Z",
    "\u{feff}bom",
    "é\u{301}",
    "💥",
    "a\"b\\c",
    "$1",
    "%s%n",
    "\u{7f}\u{1}",
    "meter_flushed\"; NOTIFY x; --",
];
const NASTY_NUMBERS: &[&str] = &[
    "0",
    "-1",
    "1e308",
    "1e-400",
    "123456789012345678901234567890123456789012345678901234567890",
    "-0.000000000000000000000000000001",
    "1.5",
    "4102444800000",
    "-62135596800000",
];
const KEYS: &[&str] = &[
    "userId",
    "value",
    "timestamp",
    "id",
    "region",
    "kind",
    "a.b",
    "",
    "userId ",
];

fn value(rng: &mut Rng, depth: usize) -> Value {
    match rng.below(if depth > 4 { 5 } else { 8 }) {
        0 => Value::Null,
        1 => Value::Bool(rng.below(2) == 0),
        2 => serde_json::from_str(rng.pick(NASTY_NUMBERS)).unwrap(),
        3 | 4 => Value::String(rng.pick(NASTY_STRINGS).to_string()),
        5 => Value::Array((0..rng.below(4)).map(|_| value(rng, depth + 1)).collect()),
        _ => record(rng, depth + 1),
    }
}

fn record(rng: &mut Rng, depth: usize) -> Value {
    let mut object = Map::new();
    // Mostly plausible records, so the metering paths are exercised too.
    if rng.below(4) > 0 {
        object.insert("userId".into(), json!(format!("user-{}", rng.below(20))));
    }
    if rng.below(3) > 0 {
        object.insert("value".into(), json!(rng.below(100)));
    }
    if rng.below(3) == 0 {
        object.insert("id".into(), json!(rng.below(200).to_string()));
    }
    for _ in 0..rng.below(4) {
        object.insert(rng.pick(KEYS).to_string(), value(rng, depth));
    }
    Value::Object(object)
}

/// A payload for ingest/preview: an object, an array, or something that is not a
/// record at all; sometimes not even JSON.
fn payload(rng: &mut Rng) -> String {
    match rng.below(12) {
        // A deep array (not a record), then a record with a deep field no rule
        // reads, which its run rejects (a sum of text) and must store intact.
        0 => {
            let deep = "[".repeat(5000) + &"]".repeat(5000);
            format!(r#"[{deep}, {{"userId": "deep", "value": "many", "region": "eu", "x": {deep}}}]"#)
        }
        1 => json!({"userId": "big", "value": 1, "blob": "x".repeat(1 << 20)}).to_string(),
        2 => "{\"userId\": \"u\", \"value\": 1".to_string(),
        3 => "{\"userId\": \"\\ud800\", \"value\": 1}".to_string(),
        4 => value(rng, 0).to_string(),
        5 | 6 => Value::Array((0..rng.below(50)).map(|_| record(rng, 0)).collect()).to_string(),
        _ => record(rng, 0).to_string(),
    }
}

/// Runs a statement with one text argument; an error must be a clear one.
fn call(db: &mut Client, statement: &str, arg: &str, what: &str) -> Option<postgres::Row> {
    match db.query_one(statement, &[&arg]) {
        Ok(row) => Some(row),
        Err(e) => {
            let Some(db_error) = e.as_db_error() else {
                panic!("{what}: the backend was lost ({e}) on {}", &arg[..arg.len().min(200)])
            };
            let code = db_error.code().code();
            assert!(
                !code.starts_with("XX") && !code.starts_with("58"),
                "{what}: internal error {code} {} on {}",
                db_error.message(),
                &arg[..arg.len().min(200)]
            );
            assert!(!db_error.message().is_empty());
            None
        }
    }
}

#[test]
fn random_and_adversarial_input_ends_in_results_or_clear_errors_and_loses_nothing() {
    let mut db = fresh_database("it_fuzz");
    db.batch_execute(
        r#"SELECT meter.create_meter_type('calls', 'sum', '@daily');
           SELECT meter.create_meter_type('last', 'latest', '0 * * * *', 'Asia/Kolkata');
           SELECT meter.create_stream('fz', '[{"name": "eu", "meter_type": "calls", "conditions": [{"field": "region", "op": "eq", "value": "eu"}]},
                                              {"name": "rest", "meter_type": "last", "group_by": ["region"]}]',
                                      auto_create_meters => true);"#,
    )
    .unwrap();
    let mut rng = Rng(0x5eed_1234_abcd_0001);
    let (mut queued, mut rejected_at_ingest, mut errors) = (0i64, 0i64, 0usize);
    for case in 0..CASES {
        let input = payload(&mut rng);
        if let Some(row) = call(
            &mut db,
            "SELECT accepted, duplicates, rejected FROM meter.ingest('fz', $1::text::jsonb)",
            &input,
            "ingest",
        ) {
            let (accepted, duplicates, rejected): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
            queued += accepted + duplicates;
            rejected_at_ingest += rejected;
        } else {
            errors += 1;
        }
        call(
            &mut db,
            "SELECT count(*) FROM meter.preview('fz', $1::text::jsonb)",
            &input,
            "preview",
        );
        // Configuration with random JSON: refused clearly or accepted.
        let rules = Value::Array((0..1 + rng.below(3)).map(|_| value(&mut rng, 2)).collect()).to_string();
        if call(
            &mut db,
            "SELECT meter.create_stream('fz_rules_' || md5($1), $1::jsonb)",
            &rules,
            "create_stream",
        )
        .is_some()
        {
            db.execute("SELECT meter.drop_stream('fz_rules_' || md5($1))", &[&rules])
                .unwrap();
        }
        let settings = [
            rng.pick(NASTY_STRINGS),
            rng.pick(&["sum", "max", "bogus", "latest"]),
            rng.pick(NASTY_STRINGS),
        ];
        let type_args = serde_json::to_string(&settings).unwrap();
        if call(
            &mut db,
            "SELECT meter.create_meter_type('fz_type_' || $1::jsonb->>0 || md5($1), ($1::jsonb->>1),
                                            ($1::jsonb->>2), ($1::jsonb->>0))",
            &type_args,
            "create_meter_type",
        )
        .is_some()
        {
            db.execute(
                "SELECT meter.drop_meter_type('fz_type_' || $1::jsonb->>0 || md5($1))",
                &[&type_args],
            )
            .unwrap();
        }
        if case % 50 == 49 {
            db.execute("SELECT meter.run_stream('fz')", &[]).unwrap();
        }
        let alive: i32 = db.query_one("SELECT 1", &[]).unwrap().get(0);
        assert_eq!(alive, 1);
    }
    db.execute("SELECT meter.run_stream('fz')", &[]).unwrap();
    let row = db
        .query_one(
            "SELECT coalesce(sum(records_processed), 0)::bigint, coalesce(sum(records_metered), 0)::bigint,
                    coalesce(sum(records_rejected), 0)::bigint, coalesce(sum(records_duplicate), 0)::bigint,
                    (SELECT count(*) FROM meter.usage), (SELECT count(*) FROM meter.rejected WHERE session_id IS NULL)
               FROM meter.sessions",
            &[],
        )
        .unwrap();
    let (processed, metered, rejected, duplicate, pending, rejected_unsessioned): (i64, i64, i64, i64, i64, i64) =
        (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4), row.get(5));
    assert_eq!(pending, 0);
    assert_eq!(processed, queued, "every queued record was processed");
    assert_eq!(metered + rejected + duplicate, processed);
    assert_eq!(
        rejected_unsessioned, rejected_at_ingest,
        "every record refused at ingest is in meter.rejected"
    );
    assert!(
        metered > 100 && rejected > 0 && errors > 10,
        "the inputs must reach every path: {metered} {rejected} {errors}"
    );
    assert_eq!(unverified_meters(&mut db), 0);
    eprintln!("fuzz: {CASES} cases, {queued} records queued, {metered} metered, {rejected} rejected, {duplicate} duplicates, {errors} refused calls");
}
