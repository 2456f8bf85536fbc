//! pg_cron (preloaded, minute granularity) runs a stream: the schedule the README
//! recommends works as written.

use std::thread;
use std::time::{Duration, Instant};

use crate::support::{fresh_database, SHARED_DATABASE_LOCK, WORKER_DATABASE};

/// pg_cron runs jobs in `cron.database_name`, which the test cluster sets to meter_test.
#[test]
fn a_pg_cron_job_runs_execute_stream_to_completion() {
    let _serial = SHARED_DATABASE_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let mut db = fresh_database(WORKER_DATABASE);
    db.batch_execute(
        r#"CREATE EXTENSION IF NOT EXISTS pg_cron;
           SELECT meter.create_meter_type('calls', 'sum', '@daily');
           SELECT meter.create_stream('cron-fed', '[{"name": "all", "meter_type": "calls"}]', auto_create_meters => true);
           SELECT meter.ingest('cron-fed', '[{"userId": "u", "value": 2}, {"userId": "u", "value": 3}]');
           SELECT cron.schedule('meter-cron-fed', '* * * * *', $$CALL meter.execute_stream('cron-fed')$$);"#,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(150);
    let status = loop {
        let row = db
            .query_opt(
                "SELECT status FROM meter.stream_status WHERE stream = 'cron-fed' AND status = 'COMPLETED'",
                &[],
            )
            .unwrap();
        if let Some(row) = row {
            break row.get::<_, String>(0);
        }
        assert!(Instant::now() < deadline, "pg_cron did not complete a run within 150 s");
        thread::sleep(Duration::from_millis(500));
    };
    db.batch_execute("SELECT cron.unschedule('meter-cron-fed')").unwrap();
    assert_eq!(status, "COMPLETED");
    let value: String = db
        .query_one("SELECT value::text FROM meter.meters", &[])
        .unwrap()
        .get(0);
    assert_eq!(value, "5");
    let job_ok: bool = db
        .query_one(
            "SELECT bool_and(status = 'succeeded') FROM cron.job_run_details WHERE command LIKE '%cron-fed%'",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(job_ok);
}
