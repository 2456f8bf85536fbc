//! The background worker in a cluster with meter_ext preloaded: it flushes
//! realtime meters on its own, follows a reloaded scan_interval, comes back after
//! pg_terminate_backend, and never flushes a meter twice alongside scan_once().

use std::thread;
use std::time::{Duration, Instant};

use postgres::Client;
use serde_json::json;

use crate::support::{connect, fresh_database, Listener, SHARED_DATABASE_LOCK, WORKER_DATABASE};

/// A fresh worker database with a realtime stream, the worker connected to it and
/// scanning every `interval_secs`.
fn setup(interval_secs: u32) -> Client {
    let mut db = fresh_database(WORKER_DATABASE);
    set_interval(&mut db, interval_secs);
    db.batch_execute(
        r#"SELECT meter.create_meter_type('calls', 'sum', '@daily');
           SELECT meter.create_stream('rt', '[{"name": "all", "meter_type": "calls"}]', mode => 'realtime',
                                      auto_create_meters => true);"#,
    )
    .unwrap();
    worker_pid(&mut db, Duration::from_secs(30));
    db
}

fn set_interval(db: &mut Client, secs: u32) {
    // Separate statements: ALTER SYSTEM refuses to run in a (multi-statement) transaction.
    db.batch_execute(&format!("ALTER SYSTEM SET meter_ext.scan_interval = '{secs}s'"))
        .unwrap();
    db.batch_execute("SELECT pg_reload_conf()").unwrap();
}

/// The worker's pid once it is connected to the worker database.
fn worker_pid(db: &mut Client, within: Duration) -> i32 {
    let deadline = Instant::now() + within;
    loop {
        let row = db
            .query_opt(
                "SELECT pid FROM pg_stat_activity WHERE backend_type = 'meter_ext scan worker' AND datname = $1",
                &[&WORKER_DATABASE],
            )
            .unwrap();
        if let Some(row) = row {
            return row.get(0);
        }
        assert!(
            Instant::now() < deadline,
            "the worker did not connect within {within:?}"
        );
        thread::sleep(Duration::from_millis(200));
    }
}

/// Ends the period of every meter at `seconds` from now.
fn end_periods_in(db: &mut Client, seconds: f64) {
    db.execute(
        "UPDATE meter.meters SET period_start = now() - interval '1 hour',
                                 period_end = clock_timestamp() + make_interval(secs => $1)",
        &[&seconds],
    )
    .unwrap();
}

#[test]
fn the_worker_flushes_a_realtime_meter_within_two_intervals() {
    let _serial = SHARED_DATABASE_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let mut db = setup(1);
    db.batch_execute(r#"SELECT meter.ingest('rt', '{"userId": "u", "value": 3}')"#)
        .unwrap();
    let mut listener = Listener::new(WORKER_DATABASE, &["meter_flushed"]);
    end_periods_in(&mut db, 1.0);
    let ended = Instant::now() + Duration::from_secs(1);
    let flushed = listener.until(|p| !p.is_empty(), Duration::from_secs(10));
    let latency = Instant::now().saturating_duration_since(ended);
    assert_eq!(flushed.len(), 1, "the worker flushed nothing");
    assert_eq!(
        (flushed[0].1["userId"].clone(), flushed[0].1["value"].clone()),
        (json!("u"), json!(3))
    );
    assert!(
        latency <= Duration::from_millis(2500),
        "flushed {latency:?} after the period ended"
    );
    // It shows itself in pg_stat_activity.
    let kind: String = db
        .query_one(
            "SELECT backend_type FROM pg_stat_activity WHERE backend_type LIKE 'meter_ext%'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(kind, "meter_ext scan worker");
}

#[test]
fn a_reloaded_scan_interval_takes_effect() {
    let _serial = SHARED_DATABASE_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let mut db = setup(30);
    db.batch_execute(r#"SELECT meter.ingest('rt', '{"userId": "u", "value": 1}')"#)
        .unwrap();
    // Let the reload's wake-up scan pass, then end the period.
    thread::sleep(Duration::from_secs(2));
    end_periods_in(&mut db, 0.0);
    let mut listener = Listener::new(WORKER_DATABASE, &["meter_flushed"]);
    assert!(
        listener.until(|p| !p.is_empty(), Duration::from_secs(5)).is_empty(),
        "a 30 s interval flushed within 5 s"
    );
    set_interval(&mut db, 1);
    assert_eq!(
        listener.until(|p| !p.is_empty(), Duration::from_secs(4)).len(),
        1,
        "the 1 s interval was not used"
    );
}

#[test]
fn the_worker_comes_back_after_pg_terminate_backend() {
    let _serial = SHARED_DATABASE_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let mut db = setup(1);
    let before = worker_pid(&mut db, Duration::from_secs(5));
    let killed: bool = db
        .query_one("SELECT pg_terminate_backend($1)", &[&before])
        .unwrap()
        .get(0);
    assert!(killed);
    let deadline = Instant::now() + Duration::from_secs(30);
    let after = loop {
        let pid = worker_pid(&mut db, Duration::from_secs(30));
        if pid != before {
            break pid;
        }
        assert!(Instant::now() < deadline, "the worker was not restarted");
        thread::sleep(Duration::from_millis(200));
    };
    assert_ne!(after, before);
    // And it works again.
    db.batch_execute(r#"SELECT meter.ingest('rt', '{"userId": "v", "value": 2}')"#)
        .unwrap();
    let mut listener = Listener::new(WORKER_DATABASE, &["meter_flushed"]);
    end_periods_in(&mut db, 0.5);
    assert_eq!(listener.until(|p| !p.is_empty(), Duration::from_secs(6)).len(), 1);
}

#[test]
fn the_worker_and_concurrent_scans_never_flush_a_meter_twice() {
    let _serial = SHARED_DATABASE_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let mut db = setup(1);
    let users: Vec<serde_json::Value> = (0..100)
        .map(|i| json!({"userId": format!("u{i}"), "value": 1}))
        .collect();
    db.execute("SELECT meter.ingest('rt', $1)", &[&serde_json::Value::Array(users)])
        .unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let scanners: Vec<_> = (0..2)
        .map(|_| {
            let stop = stop.clone();
            thread::spawn(move || {
                let mut client = connect(WORKER_DATABASE);
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    client.batch_execute("SELECT count(*) FROM meter.scan_once()").unwrap();
                }
            })
        })
        .collect();
    let rounds = 5;
    for _ in 0..rounds {
        end_periods_in(&mut db, 0.0);
        let deadline = Instant::now() + Duration::from_secs(20);
        while db
            .query_one("SELECT count(*) FROM meter.meters WHERE period_end <= now()", &[])
            .unwrap()
            .get::<_, i64>(0)
            > 0
        {
            assert!(Instant::now() < deadline, "meters were not flushed");
            thread::sleep(Duration::from_millis(50));
        }
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    for scanner in scanners {
        scanner.join().unwrap();
    }
    let (total, distinct): (i64, i64) = db
        .query_one(
            "SELECT count(*), count(DISTINCT (meter_id, record->>'periodEnd')) FROM meter.flushed",
            &[],
        )
        .map(|r| (r.get(0), r.get(1)))
        .unwrap();
    assert_eq!(distinct, total, "a meter period was flushed twice");
    assert_eq!(total, 100 * rounds);
}
