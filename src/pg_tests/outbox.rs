//! Consumers of the outbox, sessions completing on acknowledgement, the audit
//! re-derivation and retention.

use pgrx::prelude::*;

#[pg_schema]
mod tests {
    use crate::pg_tests::support::*;
    use pgrx::prelude::*;
    use serde_json::json;

    fn stream_with_expired_meters(users: &[&str]) {
        run("SELECT meter.create_meter_type('calls', 'sum', '@daily')");
        run(
            r#"SELECT meter.create_stream('s', '[{"name": "all", "meter_type": "calls"}]', auto_create_meters => true)"#,
        );
        for user in users {
            run(&format!("SELECT meter.create_meter('s', 'calls', '{user}')"));
        }
        run("UPDATE meter.meters SET period_start = now() - interval '2 days', period_end = now() - interval '1 day'");
    }

    fn last_session() -> i64 {
        sql_i64("SELECT max(id) FROM meter.sessions")
    }

    fn status(session: i64) -> String {
        sql_text(&format!("SELECT status FROM meter.sessions WHERE id = {session}")).unwrap()
    }

    fn read(consumer: &str, n: i32) -> Vec<i64> {
        rows(&format!("SELECT flush_id FROM meter.read_flushed('{consumer}', {n})"))
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["flush_id"].as_i64().unwrap())
            .collect()
    }

    #[pg_test]
    fn a_session_waits_for_every_consumer_then_completes() {
        stream_with_expired_meters(&["a", "b"]);
        run("SELECT meter.register_consumer('billing', 's')");
        run("SELECT meter.register_consumer('analytics', 's')");
        process("s");
        let session = last_session();
        assert_eq!(status(session), "PUSH_COMPLETED");
        let ids = read("billing", 10);
        assert_eq!(ids.len(), 2);
        assert_eq!(sql_i64(&format!("SELECT meter.ack_flushed('billing', {})", ids[1])), 2);
        assert_eq!(status(session), "PUSH_COMPLETED", "one consumer is not enough");
        assert_eq!(
            sql_i64(&format!("SELECT meter.ack_flushed('analytics', {})", ids[0])),
            1
        );
        assert_eq!(status(session), "PUSH_COMPLETED");
        assert_eq!(
            sql_i64(&format!("SELECT meter.ack_flushed('analytics', {})", ids[1])),
            1
        );
        assert_eq!(status(session), "COMPLETED");
        assert_eq!(
            sql_text(&format!(
                "SELECT string_agg(previous_status || '>' || status, ' ' ORDER BY id) FROM meter.session_events
                  WHERE session_id = {session} AND id > (SELECT min(id) + 3 FROM meter.session_events WHERE session_id = {session})"
            ))
            .as_deref(),
            Some("PUSH_COMPLETED>CONSUME_COMPLETED CONSUME_COMPLETED>COMPLETED")
        );
        // A waiting session does not hold the stream: the next run starts.
        assert_eq!(
            sql_text("SELECT status FROM meter.run_stream('s')").as_deref(),
            Some("COMPLETED")
        );
    }

    #[pg_test]
    fn a_session_that_flushed_nothing_is_consumed_at_once() {
        stream_with_expired_meters(&[]);
        run("SELECT meter.register_consumer('billing', 's')");
        process("s");
        assert_eq!(status(last_session()), "COMPLETED");
        assert_eq!(
            sql_text(&format!(
                "SELECT string_agg(status, ',' ORDER BY id) FROM meter.session_events WHERE session_id = {}",
                last_session()
            ))
            .as_deref(),
            Some("INITIALIZING,RUNNING,USAGE_PUSHING,PUSH_COMPLETED,CONSUME_COMPLETED,COMPLETED")
        );
    }

    /// Rows of `meter.flushed` read so far by this transaction.
    fn outbox_rows_read() -> i64 {
        sql_i64(
            "SELECT coalesce(seq_tup_read, 0) + coalesce(idx_tup_fetch, 0)
               FROM pg_stat_xact_user_tables WHERE relid = 'meter.flushed'::regclass",
        )
    }

    /// Users u0 … u299 with expired meters, consumer `billing`, and the run that
    /// flushed them (waiting for the consumer): the users and the session.
    fn a_run_of_300_meters_for_a_consumer() -> (Vec<String>, i64) {
        let users: Vec<String> = (0..300).map(|i| format!("u{i}")).collect();
        stream_with_expired_meters(&users.iter().map(String::as_str).collect::<Vec<_>>());
        run("SELECT meter.register_consumer('billing', 's')");
        process("s");
        (users, last_session())
    }

    #[pg_test]
    fn settling_a_session_reads_only_what_consumers_have_not_acknowledged() {
        let (users, flushed) = a_run_of_300_meters_for_a_consumer();
        run("SELECT meter.ack_flushed('billing', (SELECT max(id) FROM meter.flushed))");
        assert_eq!(status(flushed), "COMPLETED");

        // The next run flushes nothing (the meters rolled over): settling it must not
        // read the 300 acknowledged records, nor anything of the outbox.
        let before = outbox_rows_read();
        process("s");
        assert_eq!(status(last_session()), "COMPLETED");
        assert_eq!(outbox_rows_read() - before, 0);

        // A waiting session is still told apart: one more record, not acknowledged.
        run("UPDATE meter.meters SET period_end = now() - interval '1 second' WHERE user_id = 'u7'");
        process("s");
        let waiting = last_session();
        assert_eq!(status(waiting), "PUSH_COMPLETED");
        let ids = read("billing", 10);
        assert_eq!(ids.len(), 1);
        run(&format!("SELECT meter.ack_flushed('billing', {})", ids[0] - 1));
        assert_eq!(status(waiting), "PUSH_COMPLETED");

        // Another stream flushes 300 records after it. Settling the waiting session
        // on its acknowledgement reads this stream's records past the ack (none),
        // not the other stream's.
        run(
            r#"SELECT meter.create_stream('t', '[{"name": "all", "meter_type": "calls"}]', auto_create_meters => true)"#,
        );
        for user in &users {
            run(&format!("SELECT meter.create_meter('t', 'calls', '{user}')"));
        }
        run(
            "UPDATE meter.meters m SET period_start = now() - interval '2 days', period_end = now() - interval '1 day'
               FROM meter.streams st WHERE st.id = m.stream_id AND st.name = 't'",
        );
        process("t");
        assert_eq!(sql_i64("SELECT count(*) FROM meter.flushed"), 301 + 300);
        let before = outbox_rows_read();
        run(&format!("SELECT meter.ack_flushed('billing', {})", ids[0]));
        assert_eq!(status(waiting), "COMPLETED");
        // The ack itself reads the last flush id and counts the one record acknowledged.
        let read = outbox_rows_read() - before;
        assert!(read <= 3, "settling read {read} outbox rows");
    }

    #[pg_test]
    fn a_session_waiting_behind_another_settles_without_reading_its_records() {
        let (_, first) = a_run_of_300_meters_for_a_consumer();
        run("UPDATE meter.meters SET period_end = now() - interval '1 second' WHERE user_id IN ('u7', 'u8')");
        process("s");
        let second = last_session();
        let ids = read("billing", 1000);
        assert_eq!(ids.len(), 302);
        // Each run knows the newest flush id of its records.
        let last_flush_id = |session: i64| {
            sql_i64(&format!(
                "SELECT last_flush_id FROM meter.sessions WHERE id = {session}"
            ))
        };
        assert_eq!((last_flush_id(first), last_flush_id(second)), (ids[299], ids[301]));

        // Acknowledging the first run's records one page at a time: each ack checks
        // both waiting sessions without reading the first one's records past the
        // ack, where the second session's check used to walk them all.
        for page in [0, 99, 199, 298] {
            let before = outbox_rows_read();
            run(&format!("SELECT meter.ack_flushed('billing', {})", ids[page]));
            let read = outbox_rows_read() - before;
            assert!(read <= 101, "an ack up to record {page} read {read} outbox rows");
            assert_eq!(
                (status(first), status(second)),
                ("PUSH_COMPLETED".into(), "PUSH_COMPLETED".into())
            );
        }
        run(&format!("SELECT meter.ack_flushed('billing', {})", ids[299]));
        assert_eq!(
            (status(first), status(second)),
            ("COMPLETED".into(), "PUSH_COMPLETED".into())
        );
        run(&format!("SELECT meter.ack_flushed('billing', {})", ids[300]));
        assert_eq!(status(second), "PUSH_COMPLETED");
        run(&format!("SELECT meter.ack_flushed('billing', {})", ids[301]));
        assert_eq!(status(second), "COMPLETED");
    }

    #[pg_test]
    fn a_session_that_flushed_before_0_2_0_settles_by_reading_the_outbox() {
        stream_with_expired_meters(&["a", "b"]);
        run("SELECT meter.register_consumer('billing', 's')");
        process("s");
        let session = last_session();
        // What a run of 0.1.0 left: no newest flush id.
        run(&format!(
            "UPDATE meter.sessions SET last_flush_id = NULL WHERE id = {session}"
        ));
        let ids = read("billing", 10);
        run(&format!("SELECT meter.ack_flushed('billing', {})", ids[0]));
        assert_eq!(status(session), "PUSH_COMPLETED");
        run(&format!("SELECT meter.ack_flushed('billing', {})", ids[1]));
        assert_eq!(status(session), "COMPLETED");
    }

    #[pg_test]
    fn reading_repeats_until_acknowledged_and_acks_only_move_forward() {
        stream_with_expired_meters(&["a", "b", "c"]);
        run("SELECT meter.register_consumer('billing', 's')");
        process("s");
        let first = read("billing", 2);
        assert_eq!(read("billing", 2), first, "unacknowledged records come again");
        run(&format!("SELECT meter.ack_flushed('billing', {})", first[0]));
        let next = read("billing", 5);
        assert_eq!(next.len(), 2);
        assert_eq!(next[0], first[1]);
        assert_eq!(
            sql_i64(&format!("SELECT meter.ack_flushed('billing', {})", first[0])),
            0,
            "going back is a no-op"
        );
        assert_eq!(
            sql_i64("SELECT acked_flush_id FROM meter.consumers WHERE name = 'billing'"),
            first[0]
        );
        let record = rows("SELECT stream, record->>'userId' AS user FROM meter.read_flushed('billing', 1)");
        assert_eq!(record, json!([{"stream": "s", "user": "b"}]));
        assert_eq!(sql_i64("SELECT unacked FROM meter.consumer_lag"), 2);
    }

    #[pg_test]
    fn consumer_errors_name_the_problem() {
        stream_with_expired_meters(&["a"]);
        run("SELECT meter.register_consumer('billing', 's')");
        assert_eq!(
            error_message("SELECT meter.register_consumer('billing', 's')"),
            "consumer \"billing\" is already registered for stream \"s\""
        );
        assert_eq!(
            error_message("SELECT meter.register_consumer('billing', 'nope')"),
            "stream \"nope\" does not exist"
        );
        assert_eq!(
            error_message("SELECT meter.register_consumer(' ', 's')"),
            "consumer name must not be empty"
        );
        assert_eq!(
            error_message("SELECT * FROM meter.read_flushed('ghost')"),
            "consumer \"ghost\" is not registered"
        );
        assert_eq!(
            error_message("SELECT * FROM meter.read_flushed('billing', 0)"),
            "max_records must be at least 1"
        );
        assert_eq!(
            error_message("SELECT meter.ack_flushed('ghost', 1)"),
            "consumer \"ghost\" is not registered"
        );
        assert_eq!(
            error_message("SELECT meter.ack_flushed('billing', 999999)"),
            "up_to_flush_id 999999 is beyond the last flushed record (0): acknowledge the flushId you processed"
        );
        assert_eq!(
            error_message("SELECT meter.unregister_consumer('billing', 'x')"),
            "consumer \"billing\" is not registered for stream \"x\""
        );
        run("SELECT meter.unregister_consumer('billing', 's')");
    }

    #[pg_test]
    fn a_late_consumer_can_start_from_now() {
        stream_with_expired_meters(&["a"]);
        process("s");
        run("SELECT meter.register_consumer('late', 's', from_beginning => false)");
        run("SELECT meter.register_consumer('full', 's')");
        assert_eq!(read("late", 10).len(), 0);
        assert_eq!(read("full", 10).len(), 1);
    }

    #[pg_test]
    fn unregistering_the_last_consumer_completes_waiting_sessions() {
        stream_with_expired_meters(&["a"]);
        run("SELECT meter.register_consumer('billing', 's')");
        process("s");
        assert_eq!(status(last_session()), "PUSH_COMPLETED");
        run("SELECT meter.unregister_consumer('billing', 's')");
        assert_eq!(status(last_session()), "COMPLETED");
    }

    #[pg_test]
    fn a_record_over_8000_bytes_is_kept_whole_in_the_outbox() {
        run("SELECT meter.create_meter_type('calls', 'sum', '@daily')");
        run(
            r#"SELECT meter.create_stream('s', '[{"name": "all", "meter_type": "calls", "group_by": ["endpoint"]}]', auto_create_meters => true)"#,
        );
        run("INSERT INTO meter.usage (stream, record)
             SELECT 's', jsonb_build_object('userId', 'big', 'value', 1, 'endpoint', '/api/v1/resource/' || i) FROM generate_series(1, 500) i");
        process("s");
        run("UPDATE meter.meters SET period_start = now() - interval '2 days', period_end = now() - interval '1 day'");
        process("s");
        let (groups, bytes) = Spi::get_two::<i32, i32>(
            "SELECT jsonb_array_length(record->'groups'), octet_length(record::text) FROM meter.flushed",
        )
        .unwrap();
        assert_eq!(groups, Some(500));
        assert!(bytes.unwrap() > 8000, "{bytes:?}");
    }

    /// A deterministic pseudo-random sequence, so a failure reproduces.
    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self, n: u64) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (self.0 >> 33) % n
        }
    }

    #[pg_test]
    fn the_audit_re_derives_every_meter_after_runs_over_random_data() {
        for (name, aggregation) in [
            ("s", "sum"),
            ("i", "increment"),
            ("lo", "min"),
            ("hi", "max"),
            ("l", "latest"),
            ("u", "unique_count"),
        ] {
            run(&format!(
                "SELECT meter.create_meter_type('{name}', '{aggregation}', '@daily')"
            ));
        }
        run(r#"SELECT meter.create_stream('rnd', '[
                 {"name": "s", "meter_type": "s", "conditions": [{"field": "k", "op": "eq", "value": 0}], "group_by": ["g"]},
                 {"name": "i", "meter_type": "i", "conditions": [{"field": "k", "op": "eq", "value": 1}]},
                 {"name": "lo", "meter_type": "lo", "conditions": [{"field": "k", "op": "eq", "value": 2}], "group_by": ["g"]},
                 {"name": "hi", "meter_type": "hi", "conditions": [{"field": "k", "op": "eq", "value": 3}]},
                 {"name": "l", "meter_type": "l", "conditions": [{"field": "k", "op": "eq", "value": 4}], "group_by": ["g"]},
                 {"name": "u", "meter_type": "u", "conditions": [{"field": "k", "op": "eq", "value": 5}], "group_by": ["g"]}
               ]', auto_create_meters => true)"#);
        run("SET LOCAL meter_ext.chunk_size = 37");
        let mut rng = Lcg(42);
        for round in 0..4 {
            let records: Vec<serde_json::Value> = (0..300)
                .map(|n| {
                    let value = format!("{}.{:02}", rng.next(2000) as i64 - 1000, rng.next(100));
                    let region = ["eu", "us", "apac"][rng.next(3) as usize];
                    json!({
                        "userId": format!("user-{}", rng.next(7)),
                        "id": format!("r{}", rng.next(900)),   // some repeat: duplicates
                        "k": rng.next(6),
                        "g": region,
                        "value": if rng.next(10) == 0 { json!("junk") } else { json!(value) },
                        "timestamp": format!("2026-01-01T00:{:02}:{:02}Z", rng.next(60), (round * 300 + n) % 60),
                    })
                })
                .collect();
            Spi::run_with_args(
                "SELECT meter.ingest('rnd', $1)",
                &[pgrx::JsonB(serde_json::Value::Array(records)).into()],
            )
            .unwrap();
            process("rnd");
            if round == 1 {
                // A period boundary in the middle: later audit rows belong to the new periods.
                run("UPDATE meter.meters SET period_start = now() - interval '2 days', period_end = now() - interval '1 day'");
            }
        }
        assert_eq!(sql_i64("SELECT count(DISTINCT aggregation) FROM meter.meters"), 6);
        let mismatches = rows("SELECT * FROM meter.verify_meters('rnd') WHERE NOT matches");
        assert_eq!(mismatches, json!([]));
        assert!(sql_i64("SELECT count(*) FROM meter.verify_meters() WHERE value IS NOT NULL AND value <> 0") > 20);
    }

    #[pg_test]
    fn purge_removes_only_what_retention_allows() {
        stream_with_expired_meters(&["a", "b"]);
        run("SELECT meter.register_consumer('billing', 's')");
        Spi::run("SELECT meter.ingest('s', '[{\"userId\": \"a\", \"value\": 1, \"id\": \"x\"}, {\"userId\": \"a\", \"value\": \"bad\"}]')").unwrap();
        process("s");
        let first = read("billing", 1)[0];
        run(&format!("SELECT meter.ack_flushed('billing', {first})"));
        run("UPDATE meter.flushed SET flushed_at = now() - interval '100 days'");
        run("UPDATE meter.usage_audit_batches SET processed_at = now() - interval '100 days'");
        run("UPDATE meter.dedupe_keys SET seen_at = now() - interval '100 days'");
        let rejected = sql_i64("SELECT id FROM meter.rejected");
        run(&format!("SELECT meter.reprocess_rejected(ARRAY[{rejected}])"));
        run("UPDATE meter.rejected SET reprocessed_at = now() - interval '100 days'");
        let purged = rows("SELECT kind, purged FROM meter.purge(interval '30 days', batch_size => 1)");
        assert_eq!(
            purged,
            json!([
                {"kind": "flushed", "purged": 1},     // the acknowledged one; the other waits for billing
                {"kind": "usage_audit", "purged": 0}, // the audit of the meters' current period stays
                {"kind": "dedupe_keys", "purged": 1},
                {"kind": "rejected", "purged": 1}
            ])
        );
        assert_eq!(sql_i64("SELECT count(*) FROM meter.flushed"), 1);
        // Once the period is over, its audit can go.
        run("UPDATE meter.meters SET period_start = now()");
        assert_eq!(
            sql_i64("SELECT purged FROM meter.purge(interval '30 days') WHERE kind = 'usage_audit'"),
            1
        );
        assert_eq!(
            error_message("SELECT * FROM meter.purge(interval '1 day', 0)"),
            "batch_size must be at least 1"
        );
    }

    #[pg_test]
    fn usage_report_lists_flushed_and_open_periods_per_user() {
        stream_with_expired_meters(&["a", "b"]);
        run("UPDATE meter.meters SET value = 5, record_count = 2 WHERE user_id = 'a'");
        process("s");
        run(r#"SELECT meter.ingest('s', '{"userId": "a", "value": 7}')"#);
        process("s");
        let report = rows("SELECT user_id, meter_type, value::text, records, state FROM meter.usage_report('s')");
        assert_eq!(
            report,
            json!([
                {"user_id": "a", "meter_type": "calls", "value": "5", "records": 2, "state": "flushed"},
                {"user_id": "b", "meter_type": "calls", "value": "0", "records": 0, "state": "flushed"},
                {"user_id": "a", "meter_type": "calls", "value": "7", "records": 1, "state": "open"},
                {"user_id": "b", "meter_type": "calls", "value": "0", "records": 0, "state": "open"},
            ])
        );
        // The window keeps the periods that overlap it.
        assert_eq!(
            sql_i64("SELECT count(*) FROM meter.usage_report('s', now() - interval '36 hours', now() - interval '30 hours')"),
            2
        );
        assert_eq!(
            sql_i64("SELECT count(*) FROM meter.usage_report('s', now() + interval '2 days')"),
            0
        );
        let (code, message) = sql_error("SELECT count(*) FROM meter.usage_report('nope')").expect("an error");
        assert_eq!(code, PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT);
        assert_eq!(message, r#"stream "nope" does not exist"#);
    }
}
