//! The extension installs into a preloaded cluster and its catalog works end to end.

use crate::support::{connect, fresh_database};

#[test]
fn creates_meter_types_and_meters_with_periods() {
    let mut db = fresh_database("it_install");
    db.batch_execute(
        "SELECT meter.create_meter_type('storage', 'max', '@daily', 'America/New_York', unit => 'GB');
         SELECT meter.create_stream('s3');",
    )
    .unwrap();
    let id: i64 = db
        .query_one("SELECT meter.create_meter('s3', 'storage', 'acme')", &[])
        .unwrap()
        .get(0);
    let row = db
        .query_one(
            "SELECT (period_end AT TIME ZONE 'America/New_York')::time::text,
                    period_end > now() AND period_end <= now() + interval '25 hours',
                    meter.meter_record($1)
               FROM meter.meters WHERE id = $1",
            &[&id],
        )
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "00:00:00");
    assert!(row.get::<_, bool>(1));
    let record: serde_json::Value = row.get(2);
    assert_eq!(record["userId"], "acme");
    assert_eq!(record["unit"], "GB");
    assert_eq!(record["value"], serde_json::Value::Null); // max starts empty
}

#[test]
fn roles_survive_drop_and_recreate() {
    let mut db = fresh_database("it_roles");
    db.batch_execute("DROP EXTENSION meter_ext; CREATE EXTENSION meter_ext;")
        .unwrap();
    let roles: i64 = db
        .query_one(
            "SELECT count(*) FROM pg_roles WHERE rolname IN ('meter_admin', 'meter_writer', 'meter_reader')",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(roles, 3);
    let writer_reads: bool = db
        .query_one("SELECT pg_has_role('meter_writer', 'meter_reader', 'MEMBER')", &[])
        .unwrap()
        .get(0);
    assert!(writer_reads);
}

#[test]
fn preloaded_libraries_are_meter_ext_and_pg_cron() {
    let mut db = connect("postgres");
    let preload: String = db.query_one("SHOW shared_preload_libraries", &[]).unwrap().get(0);
    assert_eq!(preload, "meter_ext, pg_cron");
}
