//! Concurrency (SPEC §10): writers ingest into a batch and a realtime stream while
//! two runners race on the batch stream, the scan runs and a consumer reads and
//! acknowledges. Totals are exact, nothing deadlocks, and two runs of one stream
//! never interleave (the loser gets 55P03 naming the running session).

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::thread;

use postgres::Client;

use crate::support::{connect, fresh_database, unverified_meters};

const DB: &str = "it_concurrency";
const WRITERS: i64 = 4;
const BATCHES_PER_WRITER: i64 = 40;
const BATCH: i64 = 50;

/// Runs `statement`, retrying the errors PostgreSQL asks callers to retry; returns
/// the SQLSTATE of any other error.
fn run(db: &mut Client, statement: &str) -> Result<(), String> {
    loop {
        match db.batch_execute(statement) {
            Ok(()) => return Ok(()),
            Err(e) => match e.code().map(|c| c.code()) {
                Some("40001") | Some("40P01") => continue,
                Some(code) => return Err(format!("{code}: {}", e.as_db_error().unwrap().message())),
                None => panic!("{statement}: {e}"),
            },
        }
    }
}

#[test]
fn writers_runs_scans_and_consumers_together_keep_exact_totals() {
    let mut db = fresh_database(DB);
    db.batch_execute(
        r#"SELECT meter.create_meter_type('calls', 'sum', '@yearly');
           SELECT meter.create_stream('batch', '[{"name": "all", "meter_type": "calls"}]', auto_create_meters => true);
           SELECT meter.create_stream('live', '[{"name": "all", "meter_type": "calls"}]', mode => 'realtime',
                                      auto_create_meters => true);
           SELECT meter.register_consumer('billing', 'batch');"#,
    )
    .unwrap();

    let writing = Arc::new(AtomicI64::new(WRITERS));
    let refused = Arc::new(AtomicI64::new(0));
    let mut workers = Vec::new();
    for writer in 0..WRITERS {
        let writing = writing.clone();
        workers.push(thread::spawn(move || {
            let mut db = connect(DB);
            for batch in 0..BATCHES_PER_WRITER {
                let first = (writer * BATCHES_PER_WRITER + batch) * BATCH;
                for stream in ["batch", "live"] {
                    let records = format!(
                        "(SELECT jsonb_agg(jsonb_build_object('id', i, 'userId', 'user-' || i % 37, 'value', i % 5))
                            FROM generate_series({first}, {} ) i)",
                        first + BATCH - 1
                    );
                    run(&mut db, &format!("SELECT meter.ingest('{stream}', {records})")).unwrap();
                }
            }
            writing.fetch_sub(1, Ordering::SeqCst);
        }));
    }
    // Two runners on the same batch stream: each run is whole or refused.
    for _ in 0..2 {
        let (writing, refused) = (writing.clone(), refused.clone());
        workers.push(thread::spawn(move || {
            let mut db = connect(DB);
            db.batch_execute("SET meter_ext.chunk_size = 300").unwrap();
            while writing.load(Ordering::SeqCst) > 0 {
                match run(&mut db, "CALL meter.execute_stream('batch')") {
                    Ok(()) => {}
                    // Refused: another run holds the stream (by session, by backend,
                    // or started between this run's check and its lock).
                    Err(e) if e.starts_with("55P03: stream \"batch\" ") => {
                        refused.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(e) => panic!("execute_stream: {e}"),
                }
            }
        }));
    }
    // The scan and a consumer, until the writers are done.
    for role in ["scan", "consume"] {
        let writing = writing.clone();
        workers.push(thread::spawn(move || {
            let mut db = connect(DB);
            while writing.load(Ordering::SeqCst) > 0 {
                let statement = if role == "scan" {
                    "SELECT meter.scan_once()"
                } else {
                    "SELECT meter.ack_flushed('billing', max(flush_id)) FROM meter.read_flushed('billing', 100)
                      HAVING count(*) > 0"
                };
                run(&mut db, statement).unwrap_or_else(|e| panic!("{role}: {e}"));
            }
        }));
    }
    for worker in workers {
        worker.join().unwrap();
    }

    db.batch_execute("CALL meter.execute_stream('batch')").unwrap();
    let sent = WRITERS * BATCHES_PER_WRITER * BATCH;
    for stream in ["batch", "live"] {
        let row = db
            .query_one(
                "SELECT count(*), coalesce(sum(value), 0)::bigint, (SELECT count(*) FROM meter.metered_ids k
                                                                    JOIN meter.streams s ON s.id = k.stream_id
                                                                   WHERE s.name = $1)
                   FROM meter.meters m JOIN meter.streams s ON s.id = m.stream_id WHERE s.name = $1",
                &[&stream],
            )
            .unwrap();
        let (meters, total, ids): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
        let expected: i64 = (0..sent).map(|i| i % 5).sum();
        assert_eq!((meters, total, ids), (37, expected, sent), "{stream}");
    }
    let pending: i64 = db.query_one("SELECT count(*) FROM meter.usage", &[]).unwrap().get(0);
    assert_eq!(pending, 0);
    // Runs never interleaved: each session's events are contiguous in time.
    let overlapping: i64 = db
        .query_one(
            "WITH runs AS (SELECT s.id, min(e.at) AS started, min(e.at) FILTER (WHERE e.status IN
                                  ('PUSH_COMPLETED', 'COMPLETED', 'FAILED', 'CANCELED')) AS ended
                             FROM meter.sessions s JOIN meter.session_events e ON e.session_id = s.id
                             JOIN meter.streams st ON st.id = s.stream_id
                            WHERE st.name = 'batch' GROUP BY s.id)
             SELECT count(*) FROM runs a JOIN runs b ON a.id < b.id
              WHERE b.started < a.ended",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(overlapping, 0);
    assert_eq!(unverified_meters(&mut db), 0);
    eprintln!(
        "concurrency: {sent} records per stream from {WRITERS} writers, {} refused concurrent runs",
        refused.load(Ordering::SeqCst)
    );
}

/// Waits until a backend of `database` waits for an advisory lock (a settings lock).
fn until_waiting_for_advisory_lock(db: &mut Client, database: &str) {
    for _ in 0..200 {
        let waiting: i64 = db
            .query_one(
                "SELECT count(*) FROM pg_stat_activity
                  WHERE datname = $1 AND wait_event_type = 'Lock' AND wait_event = 'advisory'",
                &[&database],
            )
            .unwrap()
            .get(0);
        if waiting > 0 {
            return;
        }
        thread::sleep(std::time::Duration::from_millis(50));
    }
    panic!("no backend of {database} came to wait for a settings lock");
}

/// Settings locks (`locks::Settings`): a change waits for the ingests using the
/// old settings, and an ingest that waited for a change meters by the new ones.
#[test]
fn settings_changes_and_ingests_wait_for_each_other() {
    const SETTINGS_DB: &str = "it_settings_locks";
    let mut db = fresh_database(SETTINGS_DB);
    db.batch_execute(
        r#"SELECT meter.create_meter_type('calls', 'sum', '@yearly');
           SELECT meter.create_stream('live', '[{"name": "all", "meter_type": "calls"}]', mode => 'realtime',
                                      auto_create_meters => true);"#,
    )
    .unwrap();
    let ingest = |db: &mut Client, value: i64| -> (i64, i64) {
        let row = db
            .query_one(
                "SELECT accepted, rejected FROM meter.ingest('live', jsonb_build_object('userId', 'u', 'value', $1::bigint))",
                &[&value],
            )
            .unwrap();
        (row.get(0), row.get(1))
    };

    // The first ingest creates the meter and the session.
    let mut writer = connect(SETTINGS_DB);
    assert_eq!(ingest(&mut writer, 10), (1, 0));

    // An open ingest holds the stream's settings, without writing their rows
    // (FOR SHARE would: a MultiXact per row once ingests overlap). A change
    // waits for its commit.
    writer.batch_execute("BEGIN").unwrap();
    assert_eq!(ingest(&mut writer, 1), (1, 0));
    let written: i64 = writer
        .query_one(
            "SELECT (SELECT count(*) FROM meter.streams WHERE xmax::text::bigint = txid_current() % 4294967296)
                  + (SELECT count(*) FROM meter.meter_types WHERE xmax::text::bigint = txid_current() % 4294967296)",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(written, 0, "the ingest wrote no settings row");
    let changer = thread::spawn(|| {
        connect(SETTINGS_DB)
            .batch_execute(
                r#"SELECT meter.alter_stream('live', guiding_rules => '[{"name": "big", "meter_type": "calls",
                       "conditions": [{"field": "kind", "op": "eq", "value": "big"}]}]')"#,
            )
            .unwrap();
    });
    until_waiting_for_advisory_lock(&mut db, SETTINGS_DB);
    assert!(!changer.is_finished(), "the change waits for the open ingest");
    writer.batch_execute("COMMIT").unwrap();
    changer.join().unwrap();
    assert_eq!(
        ingest(&mut writer, 2),
        (0, 1),
        "the new rules take only records of kind big"
    );

    // An open change holds them: an ingest waits, then meters by the new rules.
    db.batch_execute(
        r#"BEGIN;
           SELECT meter.alter_stream('live', guiding_rules => '[{"name": "all", "meter_type": "calls"}]');"#,
    )
    .unwrap();
    let waiting = thread::spawn(move || ingest(&mut writer, 3));
    let mut observer = connect(SETTINGS_DB);
    until_waiting_for_advisory_lock(&mut observer, SETTINGS_DB);
    db.batch_execute("COMMIT").unwrap();
    assert_eq!(
        waiting.join().unwrap(),
        (1, 0),
        "read again after the change: value 3 is taken"
    );

    // The same for a meter type's settings.
    db.batch_execute("BEGIN; SELECT meter.alter_meter_type('calls', active_from => '2100-01-01');")
        .unwrap();
    let waiting = thread::spawn(move || ingest(&mut connect(SETTINGS_DB), 4));
    until_waiting_for_advisory_lock(&mut observer, SETTINGS_DB);
    db.batch_execute("COMMIT").unwrap();
    assert_eq!(waiting.join().unwrap(), (0, 1), "not active yet when the ingest runs");

    let value: String = db
        .query_one("SELECT value::text FROM meter.meters", &[])
        .unwrap()
        .get(0);
    assert_eq!(value, "14", "values 10, 1 and 3 metered, 2 and 4 rejected");

    // An ingest waiting for a drop reads again and finds no stream: a clear error.
    db.batch_execute("BEGIN; SELECT meter.drop_stream('live', cascade => true);")
        .unwrap();
    let waiting = thread::spawn(|| {
        connect(SETTINGS_DB)
            .query(
                "SELECT * FROM meter.ingest('live', '{\"userId\": \"u\", \"value\": 5}')",
                &[],
            )
            .unwrap_err()
    });
    until_waiting_for_advisory_lock(&mut observer, SETTINGS_DB);
    db.batch_execute("COMMIT").unwrap();
    let error = waiting.join().unwrap();
    let error = error.as_db_error().expect("a database error");
    assert_eq!(error.code().code(), "42704");
    assert_eq!(error.message(), "stream \"live\" does not exist");
}
