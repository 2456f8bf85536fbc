//! Every API call as the first statement of its own transaction (autocommit), as
//! clients make them: a function that only works after an earlier write in the
//! same transaction fails here. And COPY into the inbox.

use std::io::Write;

use crate::support::fresh_database;

#[test]
fn each_call_in_autocommit() {
    let mut db = fresh_database("it_api_autocommit");
    for statement in [
        "SELECT meter.create_meter_type('calls', 'sum', '@daily')",
        "SELECT meter.alter_meter_type('calls', unit => 'requests')",
        r#"SELECT meter.create_stream('s', '[{"name": "all", "meter_type": "calls"}]')"#,
        "SELECT meter.alter_stream('s', auto_create_meters => true)",
        "SELECT meter.create_meter('s', 'calls', 'u1')",
        r#"SELECT * FROM meter.preview('s', '{"userId": "u1", "value": 1}')"#,
        r#"SELECT * FROM meter.ingest('s', '[{"userId": "u1", "value": 1}, {"userId": "u2", "value": 2}]')"#,
        "SELECT meter.update_meter(1, true)",
        "SELECT meter.meter_record(1)",
        "SELECT * FROM meter.inspector",
    ] {
        db.batch_execute(statement)
            .unwrap_or_else(|e| panic!("{statement}: {e}"));
    }
    let preview = db
        .query_one(
            r#"SELECT outcome, rule, meter_id FROM meter.preview('s', '{"userId": "u1", "value": 1}')"#,
            &[],
        )
        .unwrap();
    assert_eq!(preview.get::<_, String>(0), "metered");
    assert_eq!(preview.get::<_, Option<i64>>(2), Some(1));
}

#[test]
fn copy_fills_the_inbox_and_checks_stream_names() {
    let mut db = fresh_database("it_api_copy");
    db.batch_execute("SELECT meter.create_stream('s')").unwrap();
    let mut writer = db.copy_in("COPY meter.usage (stream, record) FROM STDIN").unwrap();
    for i in 0..100 {
        writeln!(writer, "s\t{{\"userId\": \"u{}\", \"id\": {i}, \"value\": {i}}}", i % 7).unwrap();
    }
    writer.finish().unwrap();
    let pending: i64 = db
        .query_one("SELECT count(*) FROM meter.usage WHERE stream = 's'", &[])
        .unwrap()
        .get(0);
    assert_eq!(pending, 100);

    let mut writer = db.copy_in("COPY meter.usage (stream, record) FROM STDIN").unwrap();
    writeln!(writer, "typo\t{{\"userId\": \"u\"}}").unwrap();
    let err = writer.finish().unwrap_err();
    let db_err = err.as_db_error().unwrap();
    assert_eq!(db_err.message(), "no partition of relation \"usage\" found for row");
    assert_eq!(
        db_err.detail(),
        Some("Partition key of the failing row contains (stream) = (typo).")
    );
}
