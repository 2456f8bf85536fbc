//! Plans cached per backend outlive the table sizes they were made for. A
//! connection that called `ingest` while `meter.dedupe_keys` was empty keeps its
//! plans as the table grows (until an ANALYZE or DDL makes PostgreSQL plan
//! again): its record-id lookups must still go by the index, or each call reads
//! every id the stream ever metered. So must its lookups of `meter.dedupe_ranges`.

use postgres::Client;

use crate::support::{connect, fresh_database};

/// Sequential and index scans of `table` so far, this backend's included.
fn scans(db: &mut Client, table: &str) -> (i64, i64) {
    db.batch_execute("SELECT pg_stat_force_next_flush()").unwrap();
    let row = db
        .query_one(
            "SELECT seq_scan, coalesce(idx_scan, 0) FROM pg_stat_user_tables WHERE relid = $1::text::regclass",
            &[&table],
        )
        .unwrap();
    (row.get(0), row.get(1))
}

fn ingest(db: &mut Client, ids: impl Iterator<Item = String>) -> (i64, i64, i64) {
    let records: Vec<serde_json::Value> = ids
        .map(|id| serde_json::json!({"id": id, "userId": "acme", "value": 1}))
        .collect();
    let row = db
        .query_one(
            "SELECT accepted, duplicates, rejected FROM meter.ingest('s', $1)",
            &[&serde_json::Value::Array(records)],
        )
        .unwrap();
    (row.get(0), row.get(1), row.get(2))
}

#[test]
fn record_id_lookups_planned_on_an_empty_table_go_by_its_index_once_it_grew() {
    let mut db = fresh_database("meter_plans");
    db.batch_execute(
        r#"SELECT meter.create_meter_type('calls', 'sum');
           SELECT meter.create_stream('s', '[{"name": "all", "meter_type": "calls"}]', auto_create_meters => true);
           -- No ANALYZE behind the test's back: it would make the backend plan again.
           ALTER TABLE meter.dedupe_keys SET (autovacuum_enabled = off);
           -- Known empty, as a VACUUM ANALYZE of a new installation leaves it.
           ANALYZE meter.dedupe_keys;"#,
    )
    .unwrap();
    // This backend plans its lookups now, on an empty table, then on one of a
    // hundred ids (new ids among them are looked up one by one).
    assert_eq!(ingest(&mut db, (1..=100).map(|i| format!("a{i}"))), (100, 0, 0));
    db.batch_execute("SELECT meter.run_stream('s')").unwrap();
    assert_eq!(ingest(&mut db, (1..=100).map(|i| format!("a{i}y"))), (100, 0, 0));
    // Another connection meters 100 000 more ids, interleaving the next batches'.
    connect("meter_plans")
        .batch_execute(
            "INSERT INTO meter.dedupe_keys (stream_id, record_id, seen_at)
             SELECT s.id, 'a' || i || 'x', now() FROM meter.streams s, generate_series(1, 100000) i WHERE s.name = 's'",
        )
        .unwrap();
    let before = scans(&mut db, "meter.dedupe_keys");
    assert_eq!(ingest(&mut db, (1..=100).map(|i| format!("a{i}z"))), (100, 0, 0));
    assert_eq!(ingest(&mut db, (1..=100).map(|i| format!("a{i}x"))), (0, 100, 0));
    let after = scans(&mut db, "meter.dedupe_keys");
    assert_eq!(after.0, before.0, "sequential scans of meter.dedupe_keys");
    assert!(
        after.1 > before.1,
        "index scans of meter.dedupe_keys: {before:?} → {after:?}"
    );
}

#[test]
fn range_lookups_planned_on_an_empty_table_go_by_its_index_once_it_grew() {
    let mut db = fresh_database("meter_plans_ranges");
    db.batch_execute(
        r#"SELECT meter.create_meter_type('calls', 'sum');
           SELECT meter.create_stream('s', '[{"name": "all", "meter_type": "calls"}]', auto_create_meters => true);
           ALTER TABLE meter.dedupe_ranges SET (autovacuum_enabled = off);
           ANALYZE meter.dedupe_ranges;"#,
    )
    .unwrap();
    // This backend plans its range lookups on an empty table, then on one range,
    // more times than PostgreSQL plans a statement afresh before it may keep one
    // generic plan (five).
    assert_eq!(ingest(&mut db, (1..=100).map(|i| format!("b{i:04}"))), (100, 0, 0));
    db.batch_execute("SELECT meter.run_stream('s')").unwrap();
    for _ in 0..8 {
        assert_eq!(ingest(&mut db, (1..=100).map(|i| format!("b{i:04}"))), (0, 100, 0));
    }
    // Another connection claims 20 000 more ranges (two ids each).
    connect("meter_plans_ranges")
        .batch_execute(
            "INSERT INTO meter.dedupe_ranges (stream_id, first_id, last_id, seen_at, id_count, record_ids, meter_ids)
             SELECT s.id, 'd' || lpad(i::text, 6, '0') || '-0', 'd' || lpad(i::text, 6, '0') || '-9', now(), 2,
                    ARRAY['d' || lpad(i::text, 6, '0') || '-0', 'd' || lpad(i::text, 6, '0') || '-9'], ARRAY[NULL, NULL]::bigint[]
               FROM meter.streams s, generate_series(1, 20000) i WHERE s.name = 's'",
        )
        .unwrap();
    let before = scans(&mut db, "meter.dedupe_ranges");
    assert_eq!(ingest(&mut db, (1..=100).map(|i| format!("d{i:06}-0"))), (0, 100, 0));
    assert_eq!(ingest(&mut db, (1..=100).map(|i| format!("d{i:06}-5"))), (100, 0, 0));
    let after = scans(&mut db, "meter.dedupe_ranges");
    assert_eq!(after.0, before.0, "sequential scans of meter.dedupe_ranges");
    assert!(
        after.1 > before.1,
        "index scans of meter.dedupe_ranges: {before:?} → {after:?}"
    );
}
