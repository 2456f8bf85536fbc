//! Limits: a very large `ingest` array is handled within bounded memory: `ingest`
//! reads its argument in place and meters one chunk of records at a time, so it
//! needs little beyond the argument itself. (Parsing JSON text into jsonb costs
//! PostgreSQL far more than that, whoever receives it: the array is parsed and
//! stored beforehand here, so that the measure is of `ingest` alone.)

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::support::{connect, fresh_database};

const RECORDS: usize = 200_000;

/// The records as JSON text: about 120 bytes each, 40 users, ids unique.
fn payload() -> String {
    let mut text = String::with_capacity(RECORDS * 130);
    text.push('[');
    for i in 0..RECORDS {
        if i > 0 {
            text.push(',');
        }
        text.push_str(&format!(
            r#"{{"id": "r{i}", "userId": "user-{}", "value": {}, "region": "{}", "note": "{}"}}"#,
            i % 40,
            i % 7,
            if i % 3 == 0 { "eu" } else { "us" },
            "x".repeat(32)
        ));
    }
    text.push(']');
    text
}

fn rss_anon_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|l| l.starts_with("RssAnon:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kib| kib.parse().ok())
        })
        .unwrap_or(0)
}

/// Runs `query` on a new connection and returns the backend's peak private
/// memory growth during the call, in bytes, and the row it returned.
fn peak_growth(database: &str, query: &str) -> (u64, postgres::Row) {
    let mut db = connect(database);
    db.batch_execute("SET meter_ext.chunk_size = 1000").unwrap();
    let pid: i32 = db.query_one("SELECT pg_backend_pid()", &[]).unwrap().get(0);
    let start = rss_anon_kib(pid);
    let running = Arc::new(AtomicBool::new(true));
    let sampler = {
        let running = running.clone();
        std::thread::spawn(move || {
            let mut peak = 0;
            while running.load(Ordering::Relaxed) {
                peak = peak.max(rss_anon_kib(pid));
                std::thread::sleep(Duration::from_millis(2));
            }
            peak.max(rss_anon_kib(pid))
        })
    };
    let row = db.query_one(query, &[]).unwrap();
    running.store(false, Ordering::Relaxed);
    let peak = sampler.join().unwrap();
    (peak.saturating_sub(start) * 1024, row)
}

#[test]
fn a_very_large_ingest_array_stays_within_bounded_memory() {
    let mut db = fresh_database("it_limits_large_ingest");
    db.batch_execute(
        r#"SELECT meter.create_meter_type('calls', 'sum', '@monthly');
           SELECT meter.create_stream('queued', '[{"name": "all", "meter_type": "calls", "group_by": ["region"]}]',
                                      auto_create_meters => true);
           SELECT meter.create_stream('live', '[{"name": "all", "meter_type": "calls", "group_by": ["region"]}]',
                                      mode => 'realtime', auto_create_meters => true);"#,
    )
    .unwrap();
    let text = payload();
    db.execute("CREATE TABLE big_array AS SELECT $1::text::jsonb AS records", &[&text])
        .unwrap();
    let size = text.len() as u64;
    let expected_total: i64 = (0..RECORDS as i64).map(|i| i % 7).sum();

    for stream in ["queued", "live"] {
        let (growth, row) = peak_growth(
            "it_limits_large_ingest",
            &format!("SELECT r.* FROM big_array, meter.ingest('{stream}', records) r"),
        );
        let counts: (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
        assert_eq!(counts, (RECORDS as i64, 0, 0), "{stream}: every record accepted");
        println!("{stream}: {} MiB array, peak growth {} MiB", size >> 20, growth >> 20);
        // The detoasted argument (about the text's size), one chunk of records and
        // the statements' working memory. Every record parsed in Rust at once, a
        // query with every id, or copies of the argument go well past three times
        // the array (before chunking: 5 and 6 times).
        assert!(
            growth < 3 * size,
            "{stream}: the backend grew by {} MiB for a {} MiB array",
            growth >> 20,
            size >> 20
        );
    }

    db.batch_execute("SELECT meter.run_stream('queued')").unwrap();
    for stream in ["queued", "live"] {
        let total: i64 = db
            .query_one(
                "SELECT sum(value)::bigint FROM meter.meters m JOIN meter.streams s ON s.id = m.stream_id
                  WHERE s.name = $1",
                &[&stream],
            )
            .unwrap()
            .get(0);
        assert_eq!(total, expected_total, "{stream}: metered total");
    }
}

/// A flush of many meters in one transaction (`run_stream`, or a scan at a month's
/// end): PostgreSQL holds each notification in memory until the transaction
/// commits, about 1 kB per record. Past `meter_ext.notify_record_limit` records the
/// doorbell rings once per chunk, so the backend's memory stays bounded.
#[test]
fn a_large_flush_in_one_transaction_stays_within_bounded_memory() {
    const METERS: i64 = 100_000;
    let mut db = fresh_database("it_limits_large_flush");
    db.batch_execute(
        r#"SELECT meter.create_meter_type('calls', 'sum', '@daily');
           SELECT meter.create_stream('s', '[{"name": "all", "meter_type": "calls", "group_by": ["region"]}]');"#,
    )
    .unwrap();
    let due_meters = format!(
        "INSERT INTO meter.meters (stream_id, meter_type_id, user_id, value, groups, carry_last, record_count,
                                   aggregation, unit, timezone, period_start, period_end)
         SELECT s.id, t.id, 'user-' || i, i % 1000,
                jsonb_build_array(jsonb_build_object('key', 'region=eu', 'fields', jsonb_build_object('region', 'eu'),
                                                     'value', i % 600)),
                jsonb_build_object('plan', 'pro'), 7, t.aggregation, t.unit, t.timezone,
                now() - interval '2 days', now() - interval '1 day'
           FROM meter.streams s, meter.meter_types t, generate_series(1, {METERS}) i
          WHERE s.name = 's' AND t.name = 'calls'"
    );
    let mut flush = |limit: i32| {
        // The setting for peak_growth's new connection.
        db.batch_execute(&format!(
            "ALTER DATABASE it_limits_large_flush SET meter_ext.notify_record_limit = {limit};
             TRUNCATE meter.flushed; DELETE FROM meter.meters; {due_meters}"
        ))
        .unwrap();
        db.batch_execute("VACUUM ANALYZE meter.meters").unwrap();
        let (growth, row) = peak_growth(
            "it_limits_large_flush",
            "SELECT meters_flushed FROM meter.run_stream('s')",
        );
        assert_eq!(row.get::<_, i64>(0), METERS);
        growth
    };
    let bounded = flush(10_000);
    let one_by_one = flush(i32::MAX);
    println!(
        "flush of {METERS} meters: peak growth {} MiB, {} MiB announcing every record",
        bounded >> 20,
        one_by_one >> 20
    );
    assert!(bounded < 48 << 20, "the backend grew by {} MiB", bounded >> 20);
    // What the limit saves: the notifications of 90 000 records.
    assert!(
        one_by_one > bounded + (60 << 20),
        "{} MiB with every record announced, {} MiB bounded",
        one_by_one >> 20,
        bounded >> 20
    );
}
