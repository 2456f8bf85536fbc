//! Crash safety (SPEC §10): the whole server is killed (`pg_ctl stop -m immediate`,
//! no shutdown checkpoint) in the middle of `CALL meter.execute_stream` and of
//! realtime ingest load; after the restart, meter totals equal what the input says —
//! nothing lost, nothing counted twice — and the interrupted session ends FAILED.
//!
//! Each test kills its own cluster, started beside the shared one.

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use postgres::{Client, NoTls};

use crate::support::unverified_meters;

const PGBIN: &str = "/usr/lib/postgresql/15/bin";

struct Cluster {
    dir: PathBuf,
    port: u16,
    database: &'static str,
}

impl Cluster {
    fn start(name: &str, database: &'static str, port_offset: u16) -> Cluster {
        let dir = std::env::temp_dir().join(format!("meter_ext_{name}_{}", std::process::id()));
        let port = crate::support::port() + port_offset;
        let cluster = Cluster { dir, port, database };
        cluster.script("start");
        let mut admin = cluster.connect("postgres");
        admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS {database}"))
            .unwrap();
        admin.batch_execute(&format!("CREATE DATABASE {database}")).unwrap();
        cluster
            .connect(database)
            .batch_execute("CREATE EXTENSION meter_ext")
            .unwrap();
        cluster
    }

    fn script(&self, command: &str) {
        let mut run = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/cluster.sh"));
        run.arg(command).arg(&self.dir);
        if command == "start" {
            run.arg(self.port.to_string()).arg(self.database);
        }
        let status = run.status().expect("scripts/cluster.sh runs");
        assert!(status.success(), "cluster.sh {command} failed");
    }

    /// Kills every server process at once, as a power cut would (WAL recovery on start).
    fn crash(&self) {
        let status = Command::new("sudo")
            .args(["-u", "postgres", &format!("{PGBIN}/pg_ctl"), "-D"])
            .arg(self.dir.join("data"))
            .args(["-m", "immediate", "-w", "stop"])
            .status()
            .unwrap();
        assert!(status.success(), "pg_ctl stop -m immediate");
    }

    fn connect(&self, database: &str) -> Client {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match Client::connect(
                &format!("host=localhost port={} user=postgres dbname={database}", self.port),
                NoTls,
            ) {
                Ok(client) => return client,
                Err(e) if Instant::now() > deadline => panic!("connecting to the crash cluster: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.script("stop");
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Meters whose value differs from the sum of the input records per user (the
/// input is kept in `expected_input`, outside the extension).
fn wrong_totals(db: &mut Client) -> Vec<String> {
    db.query(
        "WITH expected AS (SELECT record->>'userId' AS user_id, sum((record->>'value')::numeric) AS value
                             FROM expected_input GROUP BY 1)
         SELECT coalesce(e.user_id, m.user_id) || ': expected ' || coalesce(e.value::text, 'nothing')
                || ', metered ' || coalesce(m.value::text, 'nothing')
           FROM expected e FULL JOIN meter.meters m USING (user_id)
          WHERE e.value IS DISTINCT FROM m.value",
        &[],
    )
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

fn setup(db: &mut Client, mode: &str, records: i64) {
    db.batch_execute(&format!(
        r#"SELECT meter.create_meter_type('calls', 'sum', '@yearly');
           SELECT meter.create_stream('s', '[{{"name": "all", "meter_type": "calls"}}]', mode => '{mode}',
                                      auto_create_meters => true);
           CREATE TABLE expected_input AS
           SELECT i, jsonb_build_object('id', i, 'userId', 'user-' || i % 500, 'value', (i % 7) || '.25') AS record
             FROM generate_series(1, {records}) i;"#
    ))
    .unwrap();
}

#[test]
fn a_server_crash_during_execute_stream_loses_nothing_and_counts_nothing_twice() {
    let cluster = Cluster::start("crash_batch", "crash_batch", 1000);
    let mut db = cluster.connect("crash_batch");
    setup(&mut db, "batch", 200_000);
    db.batch_execute("INSERT INTO meter.usage (stream, record) SELECT 's', record FROM expected_input ORDER BY i")
        .unwrap();

    let mut runner = cluster.connect("crash_batch");
    let run = std::thread::spawn(move || {
        runner
            .batch_execute("SET meter_ext.chunk_size = 2000")
            .and_then(|_| runner.batch_execute("CALL meter.execute_stream('s')"))
            .err()
            .map(|e| e.to_string())
    });
    // Kill the server once some chunks have committed, and before the run ends.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let done: i64 = db
            .query_one("SELECT coalesce(max(records_processed), 0) FROM meter.sessions", &[])
            .unwrap()
            .get(0);
        if done >= 4000 {
            break;
        }
        assert!(Instant::now() < deadline, "the run made no progress");
        std::thread::sleep(Duration::from_millis(20));
    }
    cluster.crash();
    assert!(run.join().unwrap().is_some(), "the run was cut off by the crash");

    cluster.script("start");
    let mut db = cluster.connect("crash_batch");
    let (processed, pending): (i64, i64) = {
        let row = db
            .query_one(
                "SELECT (SELECT records_processed FROM meter.sessions), (SELECT count(*) FROM meter.usage)",
                &[],
            )
            .unwrap();
        (row.get(0), row.get(1))
    };
    assert!(
        processed > 0 && pending > 0,
        "crashed mid-run: {processed} processed, {pending} pending"
    );
    assert_eq!(
        processed + pending,
        200_000,
        "every record is metered or still in the inbox"
    );

    db.batch_execute("CALL meter.execute_stream('s')").unwrap();
    let statuses: Vec<String> = db
        .query("SELECT status FROM meter.sessions ORDER BY id", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(statuses, ["FAILED", "COMPLETED"]);
    assert_eq!(wrong_totals(&mut db), Vec::<String>::new());
    assert_eq!(unverified_meters(&mut db), 0);
}

#[test]
fn a_server_crash_under_realtime_load_loses_no_acknowledged_record() {
    let cluster = Cluster::start("crash_realtime", "crash_realtime", 1001);
    let mut db = cluster.connect("crash_realtime");
    let records = 40_000;
    setup(&mut db, "realtime", records);

    // Two clients send one record per call; the server dies under them.
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..2)
        .map(|client| {
            let mut conn = cluster.connect("crash_realtime");
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut acknowledged = Vec::new();
                for i in (1 + client..=records).step_by(2) {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    match conn.query_one(
                        "SELECT accepted FROM meter.ingest('s', (SELECT record FROM expected_input WHERE i = $1::bigint))",
                        &[&i],
                    ) {
                        Ok(_) => acknowledged.push(i),
                        Err(_) => break,
                    }
                }
                acknowledged
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(1500));
    cluster.crash();
    stop.store(true, Ordering::Relaxed);
    let acknowledged: Vec<i64> = clients.into_iter().flat_map(|c| c.join().unwrap()).collect();
    assert!(
        acknowledged.len() > 100,
        "only {} calls before the crash",
        acknowledged.len()
    );

    cluster.script("start");
    let mut db = cluster.connect("crash_realtime");
    // Every call that returned was committed: its record is in the audit.
    let audited: i64 = db
        .query_one(
            "SELECT count(*) FROM meter.usage_audit WHERE record_id::bigint = ANY ($1)",
            &[&acknowledged],
        )
        .unwrap()
        .get(0);
    assert_eq!(audited, acknowledged.len() as i64);

    // A client that retries everything it sent (it cannot know what the crash cut
    // off) gets duplicates for what was metered and the rest metered now.
    let row = db
        .query_one(
            "SELECT accepted, duplicates, rejected
               FROM meter.ingest('s', (SELECT jsonb_agg(record ORDER BY i) FROM expected_input))",
            &[],
        )
        .unwrap();
    let (accepted, duplicates, rejected): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
    assert_eq!(rejected, 0);
    assert!(duplicates >= acknowledged.len() as i64);
    assert_eq!(accepted + duplicates, records);
    assert_eq!(wrong_totals(&mut db), Vec::<String>::new());
}
