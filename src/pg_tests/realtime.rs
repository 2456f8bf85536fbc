//! Realtime streams: the long session, pause and resume, stop, scans.

use pgrx::prelude::*;

#[pg_schema]
mod tests {
    use crate::pg_tests::support::*;
    use pgrx::prelude::*;
    use serde_json::json;

    fn realtime() {
        run("SELECT meter.create_meter_type('calls', 'latest', '@daily')");
        run(
            r#"SELECT meter.create_stream('rt', '[{"name": "all", "meter_type": "calls"}]', mode => 'realtime',
                                          auto_create_meters => true)"#,
        );
    }

    fn ingest(records: serde_json::Value) -> (i64, i64, i64) {
        let row = Spi::get_three_with_args::<i64, i64, i64>(
            "SELECT * FROM meter.ingest('rt', $1)",
            &[pgrx::JsonB(records).into()],
        )
        .unwrap();
        (row.0.unwrap(), row.1.unwrap(), row.2.unwrap())
    }

    fn statuses() -> String {
        sql_text("SELECT string_agg(status, ',' ORDER BY id) FROM meter.session_events").unwrap_or_default()
    }

    fn value() -> Option<String> {
        sql_text("SELECT value::text FROM meter.meters")
    }

    /// That the rows are not written is checked against a real cluster
    /// (tests/integration/concurrency.rs): here, creating the meter and the session
    /// key-share-locks both rows anyway (their foreign keys).
    #[pg_test]
    fn ingest_share_locks_the_settings_it_meters_by() {
        realtime();
        assert_eq!(ingest(json!({"userId": "u", "value": 1})), (1, 0, 0));
        // Held until the transaction ends.
        assert_eq!(
            sql_text(
                "SELECT string_agg(pg_catalog.to_hex(l.classid::int) || ' ' || l.mode, ', ' ORDER BY l.classid)
                   FROM pg_locks l
                  WHERE l.locktype = 'advisory' AND l.pid = pg_backend_pid() AND l.objsubid = 2
                    AND l.objid::bigint IN ((SELECT id FROM meter.streams WHERE name = 'rt'),
                                            (SELECT id FROM meter.meter_types WHERE name = 'calls'))
                    AND l.classid::bigint IN (x'6d657473'::int, x'6d657474'::int)"
            )
            .as_deref(),
            Some("6d657473 ShareLock, 6d657474 ShareLock")
        );
    }

    #[pg_test]
    fn ids_past_2_31_lock_by_their_low_31_bits() {
        run("ALTER TABLE meter.meter_types ALTER COLUMN id RESTART WITH 3000000000");
        run("ALTER TABLE meter.streams ALTER COLUMN id RESTART WITH 6000000000");
        realtime();
        // The stream's and the meter type's settings locks, and (a scan) the run lock.
        assert_eq!(ingest(json!({"userId": "u", "value": 5})), (1, 0, 0));
        assert_eq!(value().as_deref(), Some("5"));
        run("SELECT meter._scan_stream(id) FROM meter.streams WHERE name = 'rt'");
        let locks = || {
            sql_text(
                "SELECT string_agg(pg_catalog.to_hex(l.classid::int) || ' ' || l.objid || ' ' || l.mode, ', '
                                   ORDER BY l.classid, l.mode)
                   FROM pg_locks l
                  WHERE l.locktype = 'advisory' AND l.pid = pg_backend_pid() AND l.objsubid = 2
                    AND l.classid::bigint IN (x'6d657472'::int, x'6d657473'::int, x'6d657474'::int)",
            )
        };
        // 6000000000 - 2 * 2^31 and 3000000000 - 2^31.
        assert_eq!(
            locks().as_deref(),
            Some("6d657472 1705032704 ExclusiveLock, 6d657473 1705032704 ShareLock, 6d657474 852516352 ShareLock")
        );
        run("SELECT meter.alter_meter_type('calls', unit => 'calls')");
        run("SELECT meter.alter_stream('rt', audit => false)");
        assert_eq!(
            locks().as_deref(),
            Some(
                "6d657472 1705032704 ExclusiveLock, 6d657473 1705032704 ExclusiveLock, \
                 6d657473 1705032704 ShareLock, 6d657474 852516352 ExclusiveLock, 6d657474 852516352 ShareLock"
            )
        );
        assert_eq!(ingest(json!({"userId": "u", "value": 7})), (1, 0, 0));
        assert_eq!(value().as_deref(), Some("7"));
    }

    #[pg_test]
    fn an_ingest_reads_only_its_users_meters_however_many_are_due() {
        realtime();
        for user in (0..300).map(|i| format!("other{i}")).chain(["u".to_string()]) {
            run(&format!("SELECT meter.create_meter('rt', 'calls', '{user}')"));
        }
        // Statistics from before the others' periods ended (a month's end, the
        // scan not run yet): few meters due, as far as the planner knows.
        run("ANALYZE meter.meters");
        run(
            "UPDATE meter.meters SET period_start = now() - interval '2 days', period_end = now() - interval '1 day'
              WHERE user_id <> 'u'",
        );
        let meter_rows_read = || {
            sql_i64(
                "SELECT coalesce(seq_tup_read, 0) + coalesce(idx_tup_fetch, 0)
                   FROM pg_stat_xact_user_tables WHERE relid = 'meter.meters'::regclass",
            )
        };
        let before = meter_rows_read();
        assert_eq!(ingest(json!({"userId": "u", "value": 1})), (1, 0, 0));
        // The due check, the load and the update of u's meter: not the 300 due meters.
        let read = meter_rows_read() - before;
        assert!(read <= 5, "one ingest read {read} meter rows");
    }

    #[pg_test]
    fn the_first_ingest_starts_one_long_session() {
        realtime();
        assert_eq!(
            sql_text("SELECT status FROM meter.stream_status").as_deref(),
            Some("NEVER_RUN")
        );
        assert_eq!(ingest(json!({"userId": "u", "value": 1})), (1, 0, 0));
        assert_eq!(
            ingest(json!([{"userId": "u", "value": 2}, {"userId": "u", "value": "x"}])),
            (1, 0, 1)
        );
        assert_eq!(sql_i64("SELECT count(*) FROM meter.sessions"), 1);
        assert_eq!(statuses(), "INITIALIZING,RUNNING");
        let session = sql_i64("SELECT id FROM meter.sessions");
        assert_eq!(
            sql_i64(&format!(
                "SELECT count(*) FROM meter.usage_audit WHERE session_id = {session}"
            )),
            2
        );
        // Counted per backend, folded by the scan; the progress view adds both.
        assert_eq!(
            sql_text("SELECT done || ' ' || metered || ' ' || rejected FROM meter.session_progress").as_deref(),
            Some("3 2 1")
        );
        run("SELECT count(*) FROM meter.scan_once()");
        assert_eq!(sql_i64("SELECT records_processed FROM meter.sessions"), 3);
        assert_eq!(sql_i64("SELECT count(*) FROM meter.session_counters"), 0);
        assert_eq!(
            sql_text("SELECT done::text FROM meter.session_progress").as_deref(),
            Some("3")
        );
    }

    #[pg_test]
    fn a_large_array_is_metered_in_chunks_as_one_call() {
        realtime();
        run("SET LOCAL meter_ext.chunk_size = 2");
        // Seven records over four chunks: a duplicate id in a later chunk, a
        // rejection in the middle, and `latest` taking the last value in order.
        let records = json!([
            {"id": "a", "userId": "u", "value": 1},
            {"id": "b", "userId": "u", "value": 2},
            {"id": "a", "userId": "u", "value": 9},
            {"id": "c", "userId": "u", "value": "x"},
            {"id": "d", "userId": "v", "value": 4},
            {"id": "e", "userId": "u", "value": 5},
            "not an object"
        ]);
        assert_eq!(ingest(records), (4, 1, 2));
        assert_eq!(
            sql_text("SELECT string_agg(user_id || '=' || value, ',' ORDER BY user_id) FROM meter.meters").as_deref(),
            Some("u=5,v=4")
        );
        assert_eq!(sql_i64("SELECT count(*) FROM meter.rejected"), 2);
        assert_eq!(sql_i64("SELECT count(*) FROM meter.usage_audit"), 4);
    }

    #[pg_test]
    fn deeply_nested_input_is_metered_or_rejected_never_a_crash() {
        realtime();
        run(r#"SELECT meter.create_stream('b', '[{"name": "all", "meter_type": "calls"}]')"#);
        let deep = "repeat('[', 10000) || repeat(']', 10000)";
        // A batch stream rejects it (not an object) without reading inside it, and
        // keeps it intact.
        assert_eq!(
            sql_text(&format!(
                r#"SELECT format('%s %s %s', accepted, duplicates, rejected)
                     FROM meter.ingest('b', ('[{{"userId": "u", "value": 1}}, ' || {deep} || ']')::jsonb)"#
            ))
            .as_deref(),
            Some("1 0 1")
        );
        assert_eq!(sql_i64("SELECT length(record::text) FROM meter.rejected"), 20000);
        // A realtime stream reads only the fields its rules need, as a run does:
        // the record is metered, however deep its other fields nest.
        assert_eq!(
            sql_text(&format!(
                r#"SELECT format('%s %s %s', accepted, duplicates, rejected)
                     FROM meter.ingest('rt', ('{{"userId": "u", "value": 1, "deep": ' || {deep} || '}}')::jsonb)"#
            ))
            .as_deref(),
            Some("1 0 0")
        );
        assert_eq!(value().as_deref(), Some("1"));
    }

    #[pg_test]
    fn paused_records_wait_and_are_metered_in_order_on_resume() {
        realtime();
        ingest(json!({"userId": "u", "value": 1, "timestamp": "2026-01-01T00:00:00Z"}));
        run("SELECT meter.pause('rt')");
        // Same timestamps: `latest` keeps the one processed last, so order shows.
        assert_eq!(
            ingest(
                json!([{"userId": "u", "value": 7, "timestamp": "2026-01-01T00:00:09Z"}, {"userId": "u", "value": 8, "timestamp": "2026-01-01T00:00:09Z"}])
            ),
            (2, 0, 0)
        );
        assert_eq!(value().as_deref(), Some("1"), "nothing metered while paused");
        assert_eq!(
            sql_text("SELECT count(*) || ' ' || sum(records) FROM meter.usage").as_deref(),
            Some("1 2")
        );
        run("SELECT meter.resume('rt')");
        assert_eq!(value().as_deref(), Some("8"));
        assert_eq!(sql_i64("SELECT count(*) FROM meter.usage"), 0);
        assert_eq!(statuses(), "INITIALIZING,RUNNING,PAUSED,RUNNING");
        assert_eq!(
            error_message("SELECT meter.resume('rt')"),
            format!("session {} cannot go from RUNNING to RUNNING (a NORMAL session in RUNNING can go to PAUSED, COMPLETED, FAILED, CANCELED)", sql_i64("SELECT id FROM meter.sessions"))
        );
    }

    #[pg_test]
    fn stop_completes_the_session_and_the_next_ingest_starts_another() {
        realtime();
        ingest(json!({"userId": "u", "value": 1}));
        run("SELECT meter.stop('rt')");
        assert_eq!(
            sql_text("SELECT status FROM meter.stream_status").as_deref(),
            Some("COMPLETED")
        );
        assert_eq!(
            error_message("SELECT meter.stop('rt')"),
            "stream \"rt\" has no running session to stop"
        );
        ingest(json!({"userId": "u", "value": 2}));
        assert_eq!(sql_i64("SELECT count(*) FROM meter.sessions"), 2);
        assert_eq!(value().as_deref(), Some("2"));
        run("SELECT meter.create_stream('batch')");
        assert_eq!(
            error_message("SELECT meter.stop('batch')"),
            "stream \"batch\" is a batch stream: its runs end by themselves (cancel one with meter.cancel)"
        );
    }

    #[pg_test]
    fn scan_once_flushes_expired_realtime_meters_and_leaves_batch_streams_alone() {
        realtime();
        ingest(json!({"userId": "u", "value": 4}));
        run("SELECT meter.create_stream('batch', '[{\"name\": \"all\", \"meter_type\": \"calls\"}]', auto_create_meters => true)");
        run("SELECT meter.create_meter('batch', 'calls', 'b')");
        run("UPDATE meter.meters SET period_start = now() - interval '2 days', period_end = now() - interval '1 day'");
        let scanned = rows("SELECT stream, flushed, metered, error FROM meter.scan_once()");
        assert_eq!(
            scanned,
            json!([{"stream": "rt", "flushed": 1, "metered": 0, "error": null}])
        );
        assert_eq!(
            sql_text("SELECT string_agg(user_id, ',') FROM meter.flushed").as_deref(),
            Some("u")
        );
        // A second scan finds nothing due.
        assert_eq!(rows("SELECT flushed FROM meter.scan_once()"), json!([{"flushed": 0}]));
        assert_eq!(
            sql_i64("SELECT count(*) FROM meter.flushed WHERE session_id IS NOT NULL"),
            1
        );
    }

    #[pg_test]
    fn a_scan_does_not_start_a_session_for_an_idle_stream() {
        realtime();
        run("SELECT count(*) FROM meter.scan_once()");
        assert_eq!(sql_i64("SELECT count(*) FROM meter.sessions"), 0);
    }

    #[pg_test]
    fn a_scan_meters_what_waits_for_a_running_stream() {
        realtime();
        ingest(json!({"userId": "u", "value": 1}));
        run("INSERT INTO meter.usage (stream, record) VALUES ('rt', '{\"userId\": \"u\", \"value\": 5}')");
        assert_eq!(rows("SELECT metered FROM meter.scan_once()"), json!([{"metered": 1}]));
        assert_eq!(value().as_deref(), Some("5"));
    }
}
