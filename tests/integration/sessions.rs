//! Runs and their Meter Session Status Change events, seen from a separate
//! listening connection: live from CALL execute_stream, at commit from run_stream;
//! pause, resume and cancel from another connection; a killed run; concurrent
//! ingest; notification rules.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use postgres::Client;
use serde_json::{json, Value};

use crate::support::{connect, fresh_database, Listener};

/// A daily sum meter type and a stream 's' whose rule auto-creates meters.
fn setup(db: &mut Client) {
    db.batch_execute(
        r#"SELECT meter.create_meter_type('calls', 'sum', '@daily');
           SELECT meter.create_stream('s', '[{"name": "all", "meter_type": "calls"}]', auto_create_meters => true);"#,
    )
    .unwrap();
}

/// Queues `n` records with ids `from..from+n`, each worth 1, for user `u`.
fn queue(db: &mut Client, from: i64, n: i64) {
    db.execute(
        "INSERT INTO meter.usage (stream, record)
         SELECT 's', jsonb_build_object('userId', 'u', 'id', i, 'value', 1) FROM generate_series($1::bigint, $2::bigint) i",
        &[&from, &(from + n - 1)],
    )
    .unwrap();
}

fn statuses(events: &[(String, Value)]) -> Vec<String> {
    events
        .iter()
        .map(|(_, p)| {
            format!(
                "{}>{}",
                p["sessionPreviousStatus"].as_str().unwrap(),
                p["sessionStatus"].as_str().unwrap()
            )
        })
        .collect()
}

fn metered_total(db: &mut Client) -> i64 {
    db.query_one("SELECT coalesce(sum(value), 0)::bigint FROM meter.meters", &[])
        .unwrap()
        .get(0)
}

fn pending(db: &mut Client) -> i64 {
    db.query_one("SELECT count(*) FROM meter.usage", &[]).unwrap().get(0)
}

/// Runs `CALL meter.execute_stream('s')` on its own connection with the given chunk
/// size; the flag turns true when the CALL returns.
fn execute_in_background(
    database: &'static str,
    chunk_size: i64,
    run_type: &'static str,
) -> (thread::JoinHandle<Result<(), String>>, Arc<AtomicBool>) {
    let returned = Arc::new(AtomicBool::new(false));
    let flag = returned.clone();
    let handle = thread::spawn(move || {
        let mut runner = connect(database);
        runner
            .batch_execute(&format!("SET meter_ext.chunk_size = {chunk_size}"))
            .unwrap();
        let result = runner
            .batch_execute(&format!("CALL meter.execute_stream('s', run_type => '{run_type}')"))
            .map_err(|e| e.as_db_error().map_or(e.to_string(), |d| d.message().to_string()));
        flag.store(true, Ordering::SeqCst);
        result
    });
    (handle, returned)
}

#[test]
fn a_normal_run_announces_every_status_live() {
    let mut db = fresh_database("it_sessions_normal");
    setup(&mut db);
    queue(&mut db, 1, 400);
    let mut listener = Listener::new("it_sessions_normal", &["meter_session_status"]);
    let (runner, returned) = execute_in_background("it_sessions_normal", 1, "NORMAL");
    // RUNNING arrives while the CALL is still going: events are live.
    let early = listener.until(
        |events| events.iter().any(|(_, p)| p["sessionStatus"] == "RUNNING"),
        Duration::from_secs(30),
    );
    assert!(
        !returned.load(Ordering::SeqCst),
        "RUNNING arrived only after the CALL returned"
    );
    let rest = listener.until(
        |events| events.iter().any(|(_, p)| p["sessionStatus"] == "COMPLETED"),
        Duration::from_secs(120),
    );
    runner.join().unwrap().unwrap();
    let events: Vec<(String, Value)> = early.into_iter().chain(rest).collect();
    assert_eq!(
        statuses(&events),
        [
            "NEVER_RUN>INITIALIZING",
            "INITIALIZING>RUNNING",
            "RUNNING>USAGE_PUSHING",
            "USAGE_PUSHING>PUSH_COMPLETED",
            "PUSH_COMPLETED>COMPLETED"
        ]
    );
    let session: i64 = db.query_one("SELECT max(id) FROM meter.sessions", &[]).unwrap().get(0);
    let stream: i64 = db.query_one("SELECT id FROM meter.streams", &[]).unwrap().get(0);
    let (first, last) = (&events[0].1, &events[4].1);
    let mut keys: Vec<&String> = first.as_object().unwrap().keys().collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "meterId",
            "meterName",
            "sessionEndTime",
            "sessionId",
            "sessionPreviousStatus",
            "sessionRunType",
            "sessionStartTime",
            "sessionStatus",
            "streamId",
            "streamName"
        ]
    );
    assert_eq!(
        (
            first["meterId"].clone(),
            first["meterName"].clone(),
            first["streamId"].clone(),
            first["streamName"].clone()
        ),
        (json!(stream), json!("s"), json!(stream), json!("s"))
    );
    assert_eq!(
        (first["sessionId"].clone(), first["sessionRunType"].clone()),
        (json!(session), json!("NORMAL"))
    );
    assert!(first["sessionStartTime"].as_str().unwrap().ends_with('Z'));
    assert_eq!(first["sessionEndTime"], Value::Null);
    assert!(last["sessionEndTime"].is_string());
    assert_eq!(metered_total(&mut db), 400);
    let chunks: i64 = db
        .query_one("SELECT chunks FROM meter.sessions WHERE id = $1", &[&session])
        .unwrap()
        .get(0);
    assert_eq!(chunks, 400);
}

#[test]
fn run_stream_events_arrive_at_commit() {
    let mut db = fresh_database("it_sessions_commit");
    setup(&mut db);
    queue(&mut db, 1, 3);
    let mut listener = Listener::new("it_sessions_commit", &["meter_session_status"]);
    let mut tx = db.transaction().unwrap();
    let status: String = tx
        .query_one("SELECT status FROM meter.run_stream('s')", &[])
        .unwrap()
        .get(0);
    assert_eq!(status, "COMPLETED");
    assert!(
        listener.until(|_| false, Duration::from_millis(500)).is_empty(),
        "nothing before commit"
    );
    tx.commit().unwrap();
    let events = listener.until(|e| e.len() == 5, Duration::from_secs(10));
    assert_eq!(statuses(&events).last().unwrap(), "PUSH_COMPLETED>COMPLETED");
}

#[test]
fn debug_runs_pass_or_fail_and_change_nothing() {
    let mut db = fresh_database("it_sessions_debug");
    setup(&mut db);
    queue(&mut db, 1, 5);
    let mut listener = Listener::new("it_sessions_debug", &["meter_session_status"]);
    let (runner, _) = execute_in_background("it_sessions_debug", 2, "DEBUG");
    runner.join().unwrap().unwrap();
    let passed = listener.until(|e| e.len() == 2, Duration::from_secs(10));
    assert_eq!(statuses(&passed), ["NEVER_RUN>TESTING", "TESTING>TESTING_PASSED"]);
    assert_eq!(passed[1].1["sessionRunType"], "DEBUG");
    db.batch_execute(r#"INSERT INTO meter.usage (stream, record) VALUES ('s', '{"value": 1}')"#)
        .unwrap();
    let (runner, _) = execute_in_background("it_sessions_debug", 2, "DEBUG");
    runner.join().unwrap().unwrap();
    let failed = listener.until(|e| e.len() == 2, Duration::from_secs(10));
    assert_eq!(statuses(&failed), ["NEVER_RUN>TESTING", "TESTING>TESTING_FAILED"]);
    assert_eq!(pending(&mut db), 6);
    assert_eq!(metered_total(&mut db), 0);
}

#[test]
fn cancel_from_another_connection_stops_the_run_at_the_next_chunk() {
    let mut db = fresh_database("it_sessions_cancel");
    setup(&mut db);
    queue(&mut db, 1, 3000);
    let mut listener = Listener::new("it_sessions_cancel", &["meter_session_status"]);
    let (runner, _) = execute_in_background("it_sessions_cancel", 1, "NORMAL");
    let events = listener.until(
        |e| e.iter().any(|(_, p)| p["sessionStatus"] == "RUNNING"),
        Duration::from_secs(30),
    );
    let session = events[0].1["sessionId"].as_i64().unwrap();
    db.execute("SELECT meter.cancel($1)", &[&session]).unwrap();
    runner.join().unwrap().unwrap();
    let events = listener.until(|e| !e.is_empty(), Duration::from_secs(10));
    assert_eq!(statuses(&events), ["RUNNING>CANCELED"]);
    // What the run committed stays; the rest waits for the next run.
    let metered = metered_total(&mut db);
    assert!(metered < 3000, "the cancel stopped the run early ({metered})");
    assert_eq!(metered + pending(&mut db), 3000);
    db.query_one("SELECT meter.run_stream('s')", &[]).unwrap();
    assert_eq!(metered_total(&mut db), 3000);
}

#[test]
fn pause_and_resume_during_execute_stream() {
    let mut db = fresh_database("it_sessions_pause");
    setup(&mut db);
    queue(&mut db, 1, 1500);
    let mut listener = Listener::new("it_sessions_pause", &["meter_session_status"]);
    let (runner, returned) = execute_in_background("it_sessions_pause", 1, "NORMAL");
    listener.until(
        |e| e.iter().any(|(_, p)| p["sessionStatus"] == "RUNNING"),
        Duration::from_secs(30),
    );
    db.query_one("SELECT meter.pause('s')", &[]).unwrap();
    let paused = listener.until(|e| !e.is_empty(), Duration::from_secs(10));
    assert_eq!(statuses(&paused), ["RUNNING>PAUSED"]);
    // Paused: at most the chunk in flight finishes, then nothing moves.
    thread::sleep(Duration::from_millis(400));
    let done_at_pause = metered_total(&mut db);
    thread::sleep(Duration::from_millis(800));
    assert_eq!(metered_total(&mut db), done_at_pause);
    assert!(!returned.load(Ordering::SeqCst));
    db.query_one("SELECT meter.resume('s')", &[]).unwrap();
    let rest = listener.until(
        |e| e.iter().any(|(_, p)| p["sessionStatus"] == "COMPLETED"),
        Duration::from_secs(120),
    );
    runner.join().unwrap().unwrap();
    assert_eq!(
        statuses(&rest),
        [
            "PAUSED>RUNNING",
            "RUNNING>USAGE_PUSHING",
            "USAGE_PUSHING>PUSH_COMPLETED",
            "PUSH_COMPLETED>COMPLETED"
        ]
    );
    assert_eq!(metered_total(&mut db), 1500);
}

#[test]
fn a_second_run_is_refused_while_one_works_or_waits_for_it() {
    let mut db = fresh_database("it_sessions_busy");
    setup(&mut db);
    queue(&mut db, 1, 1500);
    let mut listener = Listener::new("it_sessions_busy", &["meter_session_status"]);
    let (runner, _) = execute_in_background("it_sessions_busy", 1, "NORMAL");
    let events = listener.until(
        |e| e.iter().any(|(_, p)| p["sessionStatus"] == "RUNNING"),
        Duration::from_secs(30),
    );
    let session = events[0].1["sessionId"].as_i64().unwrap();
    let err = db.query_one("SELECT meter.run_stream('s')", &[]).unwrap_err();
    let db_err = err.as_db_error().unwrap();
    assert_eq!(db_err.code().code(), "55P03");
    assert!(
        db_err.message().starts_with(&format!(
            "stream \"s\" is already being run by session {session} (RUNNING, backend pid "
        )),
        "{}",
        db_err.message()
    );
    // With wait => true the second run starts when the first has finished.
    queue(&mut db, 5001, 10);
    let status: String = db
        .query_one("SELECT status FROM meter.run_stream('s', wait => true)", &[])
        .unwrap()
        .get(0);
    assert_eq!(status, "COMPLETED");
    runner.join().unwrap().unwrap();
    assert_eq!(metered_total(&mut db), 1510);
}

#[test]
fn a_killed_run_keeps_its_committed_chunks_and_the_next_run_finishes_the_rest() {
    let mut db = fresh_database("it_sessions_killed");
    setup(&mut db);
    queue(&mut db, 1, 2000);
    let mut listener = Listener::new("it_sessions_killed", &["meter_session_status"]);
    let (runner, _) = execute_in_background("it_sessions_killed", 1, "NORMAL");
    let events = listener.until(
        |e| e.iter().any(|(_, p)| p["sessionStatus"] == "RUNNING"),
        Duration::from_secs(30),
    );
    let session = events[0].1["sessionId"].as_i64().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while metered_total(&mut db) < 50 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
    }
    let killed: bool = db
        .query_one(
            "SELECT pg_terminate_backend(backend_pid) FROM meter.sessions WHERE id = $1",
            &[&session],
        )
        .unwrap()
        .get(0);
    assert!(killed);
    assert!(runner.join().unwrap().is_err());
    // Every committed chunk is metered exactly once; the rest is still pending.
    let metered = metered_total(&mut db);
    let audited: i64 = db
        .query_one("SELECT count(*) FROM meter.usage_audit", &[])
        .unwrap()
        .get(0);
    assert!(metered >= 50 && metered < 2000, "{metered}");
    assert_eq!(audited, metered);
    assert_eq!(metered + pending(&mut db), 2000);
    // The next run fails the old session and meters the rest: totals equal a clean run's.
    let status: String = db
        .query_one("SELECT status FROM meter.run_stream('s')", &[])
        .unwrap()
        .get(0);
    assert_eq!(status, "COMPLETED");
    let old: (String, String) = db
        .query_one("SELECT status, error FROM meter.sessions WHERE id = $1", &[&session])
        .map(|r| (r.get(0), r.get(1)))
        .unwrap();
    assert_eq!(old.0, "FAILED");
    assert!(old.1.starts_with("its backend (pid "), "{}", old.1);
    assert_eq!(metered_total(&mut db), 2000);
    let distinct: i64 = db
        .query_one("SELECT count(DISTINCT record_id) FROM meter.usage_audit", &[])
        .unwrap()
        .get(0);
    assert_eq!(distinct, 2000);
}

#[test]
fn records_ingested_during_a_run_are_metered_exactly_once() {
    let mut db = fresh_database("it_sessions_concurrent");
    setup(&mut db);
    queue(&mut db, 1, 1000);
    let (runner, returned) = execute_in_background("it_sessions_concurrent", 5, "NORMAL");
    let mut writer = connect("it_sessions_concurrent");
    let mut next = 1001;
    while next <= 1500 {
        let batch: Vec<Value> = (next..next + 10)
            .map(|i| json!({"userId": "u", "id": i, "value": 1}))
            .collect();
        writer
            .execute("SELECT meter.ingest('s', $1)", &[&Value::Array(batch)])
            .unwrap();
        next += 10;
    }
    runner.join().unwrap().unwrap();
    assert!(returned.load(Ordering::SeqCst));
    db.query_one("SELECT meter.run_stream('s')", &[]).unwrap();
    assert_eq!(metered_total(&mut db), 1500);
    assert_eq!(pending(&mut db), 0);
    let audited: i64 = db
        .query_one("SELECT count(DISTINCT record_id) FROM meter.usage_audit", &[])
        .unwrap()
        .get(0);
    assert_eq!(audited, 1500);
}

#[test]
fn a_notification_rule_sees_only_failures() {
    let mut db = fresh_database("it_sessions_rules");
    setup(&mut db);
    db.batch_execute("SELECT meter.notify_on('ops_failures', statuses => ARRAY['FAILED', 'TESTING_FAILED'])")
        .unwrap();
    let mut listener = Listener::new("it_sessions_rules", &["ops_failures"]);
    queue(&mut db, 1, 3);
    db.query_one("SELECT meter.run_stream('s')", &[]).unwrap();
    // A run whose backend vanished is failed by the next run.
    db.batch_execute(
        "INSERT INTO meter.sessions (stream_id, run_type, status, backend_pid, backend_start)
         SELECT id, 'NORMAL', 'RUNNING', 999999, now() FROM meter.streams",
    )
    .unwrap();
    db.query_one("SELECT meter.run_stream('s')", &[]).unwrap();
    let events = listener.until(|_| false, Duration::from_secs(2));
    assert_eq!(statuses(&events), ["RUNNING>FAILED"]);
    assert!(events.iter().all(|(channel, _)| channel == "ops_failures"));
}
