//! Runs, sessions, flushing and the batch scan semantics.

use pgrx::prelude::*;

#[pg_schema]
mod tests {
    use crate::pg_tests::support::*;
    use pgrx::prelude::*;
    use serde_json::json;

    /// The planner settings flushes and ingests change for their statements.
    const PLANNER: [&str; 4] = [
        "enable_seqscan",
        "enable_hashjoin",
        "enable_mergejoin",
        "plan_cache_mode",
    ];

    fn planner_settings() -> [String; 4] {
        PLANNER.map(|name| sql_text(&format!("SELECT current_setting('{name}')")).unwrap())
    }

    #[pg_test]
    fn planner_settings_changed_for_a_statement_come_back_after_an_error() {
        let before = planner_settings();
        assert_eq!(before[0], "on");
        let error = error_of(|| {
            crate::sql::with_generic_plans(|| {
                crate::sql::by_index_lookups(|| {
                    assert_eq!(planner_settings(), ["off", "off", "off", "force_generic_plan"]);
                    Spi::run("SELECT 1 / 0").unwrap();
                })
            })
        });
        assert_eq!(
            error.map(|(code, _)| code),
            Some(PgSqlErrorCode::ERRCODE_DIVISION_BY_ZERO)
        );
        assert_eq!(planner_settings(), before);
    }

    #[pg_test]
    fn text_arrays_built_in_one_allocation_equal_postgresqls_own() {
        let many: Vec<Option<&str>> = (0..19)
            .map(|i| (i % 3 != 1).then_some(["x", "", "ünïcödé"][i % 3]))
            .collect();
        let cases: [Vec<Option<&str>>; 6] = [
            vec![],
            vec![Some("a")],
            vec![Some(""), Some("a\"b,{c} d"), Some("NULL")],
            vec![None],
            vec![Some("abc"), None, Some("de")],
            many,
        ];
        for case in cases {
            let ours = crate::sql::text_array(case.iter().copied());
            let theirs: Vec<Option<String>> = case.iter().map(|v| v.map(str::to_string)).collect();
            let same = Spi::get_one_with_args::<bool>(
                "SELECT $1 IS NOT DISTINCT FROM $2 AND array_ndims($1) IS NOT DISTINCT FROM array_ndims($2)
                        AND array_send($1) = array_send($2) AND $1::text = $2::text",
                // SAFETY: a text[] built just now in the current memory context.
                &[
                    unsafe { pgrx::datum::DatumWithOid::new(ours, pg_sys::TEXTARRAYOID) },
                    theirs.into(),
                ],
            )
            .unwrap();
            assert_eq!(same, Some(true), "{case:?}");
        }
    }

    #[pg_test]
    fn our_statements_are_never_jit_compiled() {
        // JIT on for everything, as a session with `jit_above_cost = 0` has it.
        Spi::run("SET LOCAL jit = on; SET LOCAL jit_above_cost = 0").unwrap();
        let inside = crate::sql::strings("SELECT current_setting('jit')", &[]).unwrap();
        assert_eq!(inside, ["off"]);
        assert_eq!(sql_text("SELECT current_setting('jit')").as_deref(), Some("on"));
    }

    /// A daily sum meter type, a stream that auto-creates meters, one meter.
    fn daily(flush_by: &str) -> i64 {
        run("SELECT meter.create_meter_type('calls', 'sum', '@daily', 'Europe/Stockholm', unit => 'calls')");
        run(&format!(
            r#"SELECT meter.create_stream('s', '[{{"name": "all", "meter_type": "calls", "group_by": ["region"]}}]',
                                          flush_by => '{flush_by}', auto_create_meters => true)"#
        ));
        sql_i64("SELECT meter.create_meter('s', 'calls', 'acme')")
    }

    fn ingest(records: serde_json::Value) {
        Spi::run_with_args("SELECT meter.ingest('s', $1)", &[pgrx::JsonB(records).into()]).unwrap();
    }

    fn events(session: i64) -> String {
        sql_text(&format!(
            "SELECT string_agg(previous_status || '>' || status, ' ' ORDER BY id) FROM meter.session_events WHERE session_id = {session}"
        ))
        .unwrap_or_default()
    }

    /// Moves a meter's current period into the past, as if its end had passed.
    fn expire(meter: i64, days_ago: i32) {
        run(&format!(
            "UPDATE meter.meters SET period_start = now() - interval '{} days', period_end = now() - interval '{days_ago} days'
              WHERE id = {meter}",
            days_ago + 1
        ));
    }

    #[pg_test]
    fn a_normal_run_goes_through_every_status_and_returns_its_session() {
        daily("period_end");
        ingest(json!([{"userId": "acme", "value": 2}, {"userId": "acme", "value": "x"}]));
        let (status, metered, rejected) = Spi::get_three::<String, i64, i64>(
            "SELECT status, records_metered, records_rejected FROM meter.run_stream('s')",
        )
        .unwrap();
        assert_eq!(
            (status.as_deref(), metered, rejected),
            (Some("COMPLETED"), Some(1), Some(1))
        );
        let session = sql_i64("SELECT max(id) FROM meter.sessions");
        assert_eq!(
            events(session),
            "NEVER_RUN>INITIALIZING INITIALIZING>RUNNING RUNNING>USAGE_PUSHING USAGE_PUSHING>PUSH_COMPLETED PUSH_COMPLETED>COMPLETED"
        );
        assert_eq!(
            sql_i64(&format!(
                "SELECT count(*) FROM meter.sessions WHERE id = {session} AND ended_at IS NOT NULL"
            )),
            1
        );
        // The rejected record names its session; the audit too.
        assert_eq!(
            sql_i64(&format!(
                "SELECT count(*) FROM meter.rejected WHERE session_id = {session}"
            )),
            1
        );
        assert_eq!(
            sql_i64(&format!(
                "SELECT count(*) FROM meter.usage_audit WHERE session_id = {session}"
            )),
            1
        );
        assert_eq!(
            sql_text("SELECT status || ' ' || session_id FROM meter.stream_status WHERE stream = 's'"),
            Some(format!("COMPLETED {session}"))
        );
        assert_eq!(
            sql_text(&format!("SELECT done || '/' || pending || '/' || percent FROM meter.session_progress WHERE session_id = {session}")).as_deref(),
            Some("2/0/100.0")
        );
    }

    #[pg_test]
    fn a_stream_that_never_ran_says_so() {
        daily("period_end");
        assert_eq!(
            sql_text("SELECT status FROM meter.stream_status").as_deref(),
            Some("NEVER_RUN")
        );
    }

    #[pg_test]
    fn expired_meters_are_flushed_before_new_usage_is_applied() {
        let meter = daily("period_end");
        ingest(json!({"userId": "acme", "value": 5, "region": "eu"}));
        process("s");
        expire(meter, 1);
        let old_end = sql_text(&format!(
            "SELECT meter.iso_utc(period_end) FROM meter.meters WHERE id = {meter}"
        ))
        .unwrap();
        ingest(json!({"userId": "acme", "value": 7, "region": "us"}));
        process("s");
        // The old period went out with its own usage only...
        let record = sql_json("SELECT record FROM meter.flushed ORDER BY id DESC LIMIT 1");
        assert_eq!(record["value"], json!(5));
        assert_eq!(
            record["groups"],
            json!([{"key": "region=eu", "fields": {"region": "eu"}, "value": 5}])
        );
        assert_eq!(record["periodEnd"], json!(old_end));
        // ... and the new usage landed in the new period, which starts at the old end.
        let (value, start, end_in_future) = Spi::get_three::<String, String, bool>(&format!(
            "SELECT value::text, meter.iso_utc(period_start), period_end > now() FROM meter.meters WHERE id = {meter}"
        ))
        .unwrap();
        assert_eq!(
            (value.as_deref(), start, end_in_future),
            (Some("7"), Some(old_end), Some(true))
        );
        assert_eq!(sql_i64("SELECT count(*) FROM meter.flushed"), 1);
    }

    #[pg_test]
    fn a_late_run_merges_the_periods_it_missed() {
        let meter = daily("period_end");
        expire(meter, 3);
        let old_end = sql_text(&format!("SELECT period_end::text FROM meter.meters WHERE id = {meter}")).unwrap();
        process("s");
        assert_eq!(sql_i64("SELECT count(*) FROM meter.flushed"), 1);
        let (start, end) = Spi::get_two::<String, String>(&format!(
            "SELECT period_start::text, (period_end AT TIME ZONE 'Europe/Stockholm')::text FROM meter.meters WHERE id = {meter}"
        ))
        .unwrap();
        assert_eq!(start, Some(old_end));
        // One merged period, ending at the next local midnight after now.
        assert_eq!(
            end,
            sql_text("SELECT (date_trunc('day', now() AT TIME ZONE 'Europe/Stockholm') + interval '1 day')::text")
        );
    }

    #[pg_test]
    fn a_meter_without_usage_is_flushed_with_its_reset_value() {
        run("SELECT meter.create_meter_type('peak', 'max', '@daily')");
        let meter = daily("period_end");
        run("SELECT meter.create_meter('s', 'peak', 'acme')");
        run("UPDATE meter.meters SET period_start = now() - interval '2 days', period_end = now() - interval '1 day'");
        process("s");
        let values = rows("SELECT meter_id, record->'value' AS value, record->'meterMetaData'->'recordCount' AS n FROM meter.flushed ORDER BY meter_id");
        assert_eq!(
            values,
            json!([{"meter_id": meter, "value": 0, "n": 0}, {"meter_id": meter + 1, "value": null, "n": 0}])
        );
    }

    #[pg_test]
    fn after_active_to_only_updated_meters_are_flushed_and_none_gets_a_new_period() {
        let used = daily("period_end");
        let idle = sql_i64("SELECT meter.create_meter('s', 'calls', 'globex')");
        ingest(json!({"userId": "acme", "value": 3}));
        process("s");
        // The type stopped being active before the period ended.
        run("UPDATE meter.meter_types SET active_to = now() - interval '1 hour'");
        run("UPDATE meter.meters SET period_start = now() - interval '2 days', period_end = now() - interval '10 minutes'");
        process("s");
        assert_eq!(
            sql_text("SELECT string_agg(meter_id::text, ',') FROM meter.flushed").unwrap(),
            used.to_string()
        );
        let closed = rows("SELECT id, closed_at IS NOT NULL AS closed, period_end FROM meter.meters ORDER BY id");
        assert_eq!(
            closed,
            json!([{"id": used, "closed": true, "period_end": null}, {"id": idle, "closed": true, "period_end": null}])
        );
        // A closed meter is never flushed again.
        process("s");
        assert_eq!(sql_i64("SELECT count(*) FROM meter.flushed"), 1);
    }

    #[pg_test]
    fn delete_on_reset_meters_are_deleted_after_their_flush() {
        let meter = daily("period_end");
        run(&format!("SELECT meter.update_meter({meter}, delete_on_reset => true)"));
        ingest(json!({"userId": "acme", "value": 4}));
        process("s");
        expire(meter, 1);
        process("s");
        let record = sql_json("SELECT record FROM meter.flushed");
        assert_eq!(
            (record["value"].clone(), record["deleteOnReset"].clone()),
            (json!(4), json!(true))
        );
        assert_eq!(sql_i64("SELECT count(*) FROM meter.meters"), 0);
    }

    #[pg_test]
    fn flush_by_stream_execution_flushes_every_meter_at_the_run() {
        let meter = daily("stream_execution");
        ingest(json!({"userId": "acme", "value": 9}));
        process("s");
        let session = sql_i64("SELECT max(id) FROM meter.sessions");
        let (record, flushed_at) = Spi::get_two::<pgrx::JsonB, String>(&format!(
            "SELECT f.record, meter.iso_utc(s.as_of) FROM meter.flushed f JOIN meter.sessions s ON s.id = f.session_id WHERE s.id = {session}"
        ))
        .unwrap();
        let record = record.unwrap().0;
        assert_eq!(record["value"], json!(9));
        // The period ends at the flush, and the next one starts there.
        assert_eq!(record["periodEnd"], json!(flushed_at.clone().unwrap()));
        assert_eq!(
            sql_text(&format!(
                "SELECT meter.iso_utc(period_start) || ' ' || value FROM meter.meters WHERE id = {meter}"
            )),
            Some(format!("{} 0", flushed_at.unwrap()))
        );
    }

    #[pg_test]
    fn the_closing_flush_of_a_one_transaction_run_starts_over_after_the_initial_scan() {
        // The initial scan flushes globex (the later id); the closing flush of every
        // meter is another pass and must not continue after globex.
        let acme = daily("stream_execution");
        let globex = sql_i64("SELECT meter.create_meter('s', 'calls', 'globex')");
        assert!(globex > acme);
        expire(globex, 1);
        process("s");
        let session = sql_i64("SELECT max(id) FROM meter.sessions");
        assert_eq!(
            sql_text(&format!(
                "SELECT string_agg(f.user_id, ',' ORDER BY f.id) FROM meter.flushed f WHERE f.session_id = {session}"
            ))
            .as_deref(),
            Some("globex,acme,globex")
        );
        assert_eq!(
            sql_i64(&format!(
                "SELECT count(*) FROM meter.meters m JOIN meter.sessions s ON s.id = {session}
                  WHERE m.period_start = s.as_of"
            )),
            2
        );
    }

    /// A flush resets a meter to its type as it is now (SPEC §2): aggregation,
    /// unit, timezone and reset value; a unique_count meter forgets the values it
    /// counted, so the next period counts them again.
    #[pg_test]
    fn a_flush_forgets_counted_values_and_starts_the_next_period_with_the_types_settings() {
        run("SELECT meter.create_meter_type('devices', 'unique_count', '@daily', unit => 'devices')");
        run("SELECT meter.create_meter_type('peak', 'max', '@daily', unit => 'bytes')");
        run(r#"SELECT meter.create_stream('s', '[
                 {"name": "devices", "meter_type": "devices", "conditions": [{"field": "kind", "op": "eq", "value": "device"}]},
                 {"name": "peak", "meter_type": "peak"}]', auto_create_meters => true)"#);
        ingest(json!([
            {"userId": "acme", "kind": "device", "value": "phone"},
            {"userId": "acme", "kind": "device", "value": "laptop"},
            {"userId": "acme", "value": 5}
        ]));
        process("s");
        run("SELECT meter.alter_meter_type('devices', unit => 'gadgets', timezone => 'Asia/Tokyo')");
        run("SELECT meter.alter_meter_type('peak', aggregation => 'sum')");
        run("UPDATE meter.meters SET period_start = now() - interval '2 days', period_end = now() - interval '1 day'");
        process("s");
        let flushed = rows(
            "SELECT record->>'meterTypeName' AS type, record->'value' AS v, record->>'unit' AS unit
               FROM meter.flushed ORDER BY 1",
        );
        assert_eq!(
            flushed,
            json!([{"type": "devices", "v": 2, "unit": "devices"}, {"type": "peak", "v": 5, "unit": "bytes"}])
        );
        let reset = rows(
            "SELECT t.name AS type, m.value AS v, m.aggregation AS a, m.unit, m.timezone AS tz
               FROM meter.meters m JOIN meter.meter_types t ON t.id = m.meter_type_id ORDER BY 1",
        );
        assert_eq!(
            reset,
            json!([
                {"type": "devices", "v": 0, "a": "unique_count", "unit": "gadgets", "tz": "Asia/Tokyo"},
                {"type": "peak", "v": 0, "a": "sum", "unit": "bytes", "tz": "UTC"}
            ])
        );
        assert_eq!(sql_i64("SELECT count(*) FROM meter.meter_distinct"), 0);
        ingest(json!([{"userId": "acme", "kind": "device", "value": "phone"}]));
        process("s");
        assert_eq!(
            sql_json("SELECT to_jsonb(value) FROM meter.meters m JOIN meter.meter_types t ON t.id = m.meter_type_id WHERE t.name = 'devices'"),
            json!(1)
        );
    }

    /// A carried value nests as deep as jsonb's parser allowed. Reading it into
    /// the record recurses once per level: past PostgreSQL's stack limit that is an
    /// ERROR (54001), as everywhere else, never a crashed backend.
    #[pg_test]
    fn a_record_nested_past_the_stack_limit_fails_the_flush_with_an_error() {
        let meter = daily("period_end");
        run("SET max_stack_depth = '6MB'");
        run(&format!(
            "UPDATE meter.meters SET carry_last = jsonb_build_object('deep', (repeat('[', 15000) || repeat(']', 15000))::jsonb)
              WHERE id = {meter}"
        ));
        expire(meter, 1);
        run("SET max_stack_depth = '100kB'");
        let error = error_of(|| {
            process("s");
        });
        run("RESET max_stack_depth");
        assert_eq!(
            error.map(|(code, _)| code),
            Some(PgSqlErrorCode::ERRCODE_STATEMENT_TOO_COMPLEX)
        );
    }

    /// The flush builds its records in Rust (src/flushed_record.rs); the inspector's
    /// `meter.meter_record` builds them in SQL. Over every kind of value a record
    /// holds, the two must print the same JSON.
    #[pg_test]
    fn a_flushed_record_is_the_inspectors_record_of_the_meter_it_flushed() {
        run("SELECT meter.create_meter_type('calls', 'sum', '@daily', 'Europe/Stockholm', unit => 'calls \"EU\" ✓\\')");
        run("SELECT meter.create_meter_type('peak', 'max', '@monthly', 'America/New_York', unit => 'sessions')");
        run(r#"SELECT meter.create_stream('s', '[
                 {"name": "peak", "meter_type": "peak", "conditions": [{"field": "kind", "op": "eq", "value": "peak"}]},
                 {"name": "calls", "meter_type": "calls", "group_by": ["region"], "carry_first": ["plan"], "carry_last": ["plan", "tier"]}]',
               meter_key => 'key "with" quotes', auto_create_meters => true)"#);
        // As SQL text: serde_json would round the wide number to a double.
        run(r#"SELECT meter.ingest('s', '[
                 {"userId": "acme", "value": 1.50, "region": "eu-ö", "plan": "pro", "tier": {"n": [1, 2.5, null]}},
                 {"userId": "acme", "value": 12345678901234567890.123456789, "region": "us\n\"x\""},
                 {"userId": "ünïcode\\user\t\u0001", "value": -0.000001, "plan": null},
                 {"userId": "acme", "value": 1e-30},
                 {"userId": "acme", "value": 7, "kind": "peak"}]')"#);
        process("s");
        // A meter that never had usage: null times, a null value (max); and one
        // whose value was set to NaN by hand, which JSON has no number for.
        run("SELECT meter.create_meter('s', 'peak', 'idle')");
        run("SELECT meter.create_meter('s', 'calls', 'idle')");
        run("UPDATE meter.meters m SET value = 'NaN' FROM meter.meter_types t WHERE t.id = m.meter_type_id AND m.user_id = 'idle' AND t.name = 'calls'");
        run("UPDATE meter.meters SET period_start = now() - interval '40 days', period_end = now() - interval '1 day'");
        run("CREATE TEMP TABLE inspected AS SELECT id, meter.meter_record(id) AS record FROM meter.meters");
        // The doorbell's text is written in Rust too: the same as jsonb_out's.
        let mut texts = Vec::new();
        crate::sql::for_each_row(
            &format!(
                "SELECT t.name, s.meter_key, i.record::text, m.*
                   FROM (SELECT period_end AS end_at, {}, stream_id AS of_stream FROM meter.meters) m
                   JOIN meter.meter_types t ON t.id = m.meter_type_id
                   JOIN meter.streams s ON s.id = m.of_stream JOIN inspected i ON i.id = m.id",
                crate::flushed_record::COLUMNS
            ),
            &[],
            |values, nulls| {
                // SAFETY: a row of the query above: three texts, a timestamptz, then COLUMNS.
                unsafe {
                    let text = |i: usize| String::from_datum(values[i], nulls[i]).unwrap();
                    let record = crate::flushed_record::MeterRecord::read(values, nulls, 4);
                    let period_end = crate::convert::from_pg_micros(values[3].value() as i64).unwrap();
                    let context = crate::flushed_record::RecordContext {
                        meter_type_name: &text(0),
                        meter_key: &text(1),
                        period_end: &crate::convert::iso_utc(period_end),
                    };
                    let mut written = Vec::new();
                    record.write_text(&context, None, &mut written);
                    let built = crate::flushed_record::jsonb_text(record.to_jsonb(&context));
                    texts.push((
                        text(2),
                        String::from_utf8(written).unwrap(),
                        String::from_utf8(built).unwrap(),
                    ));
                }
                Ok(())
            },
        )
        .unwrap();
        assert_eq!(texts.len(), 5);
        for (inspected, written, built) in &texts {
            assert_eq!(written, inspected);
            assert_eq!(built, inspected);
        }
        process("s");
        let compared = rows(
            "SELECT count(*) AS flushed, count(*) FILTER (WHERE f.record::text = i.record::text) AS same
               FROM meter.flushed f JOIN inspected i ON i.id = f.meter_id",
        );
        assert_eq!(rows("SELECT reason FROM meter.rejected"), json!([]));
        assert_eq!(compared, json!([{"flushed": 5, "same": 5}]));
        assert_eq!(
            sql_json("SELECT jsonb_agg(record->'value' ORDER BY record->>'meterTypeName') FROM meter.flushed WHERE user_id = 'idle'"),
            json!(["NaN", null])
        );
        let acme = sql_json(
            "SELECT jsonb_build_array(record->'value', jsonb_array_length(record->'groups'), record->'carryFirst',
                                      record->'carryLast', record->'meterKey', record->'unit')
               FROM meter.flushed WHERE user_id = 'acme' AND record->>'meterTypeName' = 'calls'",
        );
        assert_eq!(
            acme.to_string(),
            r#"[12345678901234567891.623456789000000000000000000001,3,{"plan":"pro"},{"plan":"pro","tier":{"n":[1,2.5,null]}},"key \"with\" quotes","calls \"EU\" ✓\\"]"#
        );
    }

    #[pg_test]
    fn the_flushed_record_has_exactly_ues_keys_and_a_session() {
        let meter = daily("period_end");
        ingest(json!({"userId": "acme", "value": 1}));
        process("s");
        expire(meter, 1);
        process("s");
        let record = sql_json("SELECT record FROM meter.flushed");
        let mut keys: Vec<String> = record.as_object().unwrap().keys().cloned().collect();
        keys.sort();
        assert_eq!(
            keys,
            [
                "carryFirst",
                "carryLast",
                "createdAt",
                "deleteOnReset",
                "groups",
                "id",
                "meterKey",
                "meterMetaData",
                "meterTypeId",
                "meterTypeName",
                "periodEnd",
                "periodStart",
                "timezone",
                "unit",
                "updatedAt",
                "userId",
                "value"
            ]
        );
        assert_eq!(
            sql_i64("SELECT count(*) FROM meter.flushed WHERE session_id IS NOT NULL AND user_id = 'acme'"),
            1
        );
    }

    fn everything() -> serde_json::Value {
        snapshot(
            "SELECT 'meters' AS t, to_jsonb(m) AS row FROM meter.meters m
             UNION ALL SELECT 'usage', to_jsonb(u) FROM meter.usage u
             UNION ALL SELECT 'rejected', to_jsonb(r) FROM meter.rejected r
             UNION ALL SELECT 'audit', to_jsonb(a) FROM meter.usage_audit a
             UNION ALL SELECT 'dedupe', to_jsonb(d) FROM meter.metered_ids d
             UNION ALL SELECT 'flushed', to_jsonb(f) FROM meter.flushed f",
        )
    }

    #[pg_test]
    fn a_debug_run_reports_and_changes_nothing() {
        let meter = daily("period_end");
        expire(meter, 1);
        ingest(
            json!([{"userId": "acme", "value": 1, "id": "a"}, {"userId": "acme", "value": 1, "id": "a"}, {"userId": "newbie", "value": 2}]),
        );
        ingest(json!({"userId": "acme", "value": 1, "id": "a"}));
        // Chunks of one record: a DEBUG run reads whole inbox rows (the first holds three).
        run("SET LOCAL meter_ext.chunk_size = 1");
        let before = everything();
        let (status, report) = Spi::get_two::<String, pgrx::JsonB>(
            "SELECT status, report FROM meter.run_stream('s', run_type => 'DEBUG')",
        )
        .unwrap();
        assert_eq!(everything(), before);
        assert_eq!(status.as_deref(), Some("TESTING_PASSED"));
        let report = report.unwrap().0;
        assert_eq!(
            (
                report["records"].clone(),
                report["metered"].clone(),
                report["duplicates"].clone(),
                report["metersDue"].clone(),
                report["metersCreated"].clone()
            ),
            (json!(4), json!(2), json!(2), json!(1), json!(1))
        );
        assert_eq!(report["byRule"], json!({"all": 2}));
        let session = sql_i64("SELECT max(id) FROM meter.sessions");
        assert_eq!(events(session), "NEVER_RUN>TESTING TESTING>TESTING_PASSED");

        ingest(json!({"userId": "acme", "value": "nope"}));
        let (status, report) =
            Spi::get_two::<String, pgrx::JsonB>("SELECT status, report FROM meter.run_stream('s', 'DEBUG')").unwrap();
        assert_eq!(status.as_deref(), Some("TESTING_FAILED"));
        assert_eq!(report.unwrap().0["rejections"], json!({"invalid_value": 1}));
    }

    #[pg_test]
    fn a_debug_run_counts_ids_metered_before_as_duplicates() {
        daily("period_end");
        ingest(json!({"userId": "acme", "value": 1, "id": "a"}));
        assert_eq!(process("s").metered, 1);
        // "0" and "b" lie around the metered "a": the ids are looked up one by one.
        ingest(json!([
            {"userId": "acme", "value": 1, "id": "0"},
            {"userId": "acme", "value": 1, "id": "a"},
            {"userId": "acme", "value": 1, "id": "b"}
        ]));
        let report = Spi::get_one::<pgrx::JsonB>("SELECT report FROM meter.run_stream('s', run_type => 'DEBUG')")
            .unwrap()
            .unwrap()
            .0;
        assert_eq!(
            (report["metered"].clone(), report["duplicates"].clone()),
            (json!(2), json!(1))
        );
        assert_eq!(process("s"), counts(2, 1, 0));
    }

    #[pg_test]
    fn a_stale_working_session_is_failed_by_the_next_run() {
        daily("period_end");
        run(
            "INSERT INTO meter.sessions (stream_id, run_type, status, backend_pid, backend_start)
             SELECT id, 'NORMAL', 'RUNNING', 999999, now() FROM meter.streams",
        );
        let stale = sql_i64("SELECT max(id) FROM meter.sessions");
        ingest(json!({"userId": "acme", "value": 1}));
        assert_eq!(process("s"), counts(1, 0, 0));
        assert_eq!(
            sql_text(&format!(
                "SELECT status || ': ' || error FROM meter.sessions WHERE id = {stale}"
            ))
            .as_deref(),
            Some("FAILED: its backend (pid 999999) ended before the run finished")
        );
        assert_eq!(events(stale), "RUNNING>FAILED");
    }

    #[pg_test]
    fn pause_resume_and_cancel_follow_the_state_machine() {
        daily("period_end");
        let session = sql_i64("SELECT meter._run_begin('s', 'NORMAL', false, true)");
        assert_eq!(
            sql_text(&format!("SELECT meter._run_step({session})")).as_deref(),
            Some("more")
        );
        assert_eq!(sql_i64("SELECT meter.pause('s')"), session);
        assert_eq!(
            sql_text(&format!("SELECT meter._run_step({session})")).as_deref(),
            Some("paused")
        );
        assert_eq!(
            error_message("SELECT meter.pause('s')"),
            format!("session {session} cannot go from PAUSED to PAUSED (a NORMAL session in PAUSED can go to RUNNING, FAILED, CANCELED)")
        );
        assert_eq!(sql_i64("SELECT meter.resume('s')"), session);
        run(&format!("SELECT meter.cancel({session})"));
        assert_eq!(
            sql_text(&format!("SELECT meter._run_step({session})")).as_deref(),
            Some("done")
        );
        assert_eq!(
            events(session),
            "NEVER_RUN>INITIALIZING INITIALIZING>RUNNING RUNNING>PAUSED PAUSED>RUNNING RUNNING>CANCELED"
        );
        assert_eq!(
            error_message(&format!("SELECT meter.cancel({session})")),
            format!("session {session} cannot go from CANCELED to CANCELED: CANCELED is final")
        );
        assert_eq!(
            error_message("SELECT meter.resume('s')"),
            "stream \"s\" has no working session to pause or resume"
        );
        assert_eq!(
            error_message("SELECT meter.cancel(424242)"),
            "session 424242 does not exist"
        );
    }

    #[pg_test]
    fn run_arguments_are_checked() {
        daily("period_end");
        assert_eq!(
            error_message("SELECT meter.run_stream('s', 'FAST')"),
            "run_type \"FAST\" is not supported: use NORMAL or DEBUG"
        );
        assert_eq!(
            error_message("SELECT meter.run_stream('nope')"),
            "stream \"nope\" does not exist"
        );
        run("SELECT meter.create_stream('rt', mode => 'realtime')");
        assert_eq!(
            error_message("SELECT meter.run_stream('rt')"),
            "stream \"rt\" is realtime: its records are metered as they arrive, and its meters are flushed by meter.scan_once()"
        );
    }

    #[pg_test]
    fn notification_rules_are_validated() {
        daily("period_end");
        let id = sql_i64(
            "SELECT meter.notify_on('ops_alerts', statuses => ARRAY['failed', 'TESTING_FAILED'], stream => 's')",
        );
        assert_eq!(
            sql_text(&format!(
                "SELECT array_to_string(statuses, ',') FROM meter.notification_rules WHERE id = {id}"
            ))
            .as_deref(),
            Some("FAILED,TESTING_FAILED")
        );
        assert_eq!(
            error_message("SELECT meter.notify_on('x', statuses => ARRAY['BROKEN'])"),
            "statuses: \"BROKEN\" is not a session status: use one of NEVER_RUN, TESTING, TESTING_PASSED, TESTING_FAILED, INITIALIZING, RUNNING, PAUSED, USAGE_PUSHING, PUSH_COMPLETED, CONSUME_COMPLETED, COMPLETED, FAILED, CANCELED"
        );
        assert_eq!(
            error_message("SELECT meter.notify_on('x', run_types => ARRAY['FAST'])"),
            "run_types: run_type \"FAST\" is not supported: use NORMAL or DEBUG"
        );
        assert_eq!(
            error_message(&format!("SELECT meter.notify_on('{}')", "c".repeat(64))),
            format!(
                "channel \"{}\" must be 1 to 63 bytes long (a LISTEN channel name)",
                "c".repeat(64)
            )
        );
        assert_eq!(
            error_message("SELECT meter.notify_on('x', statuses => ARRAY[]::text[])"),
            "statuses must not be empty: pass NULL to match any"
        );
        assert_eq!(
            error_message("SELECT meter.notify_on('x', stream => 'nope')"),
            "stream \"nope\" does not exist"
        );
        run(&format!("SELECT meter.drop_notification_rule({id})"));
        assert_eq!(
            error_message(&format!("SELECT meter.drop_notification_rule({id})")),
            format!("notification rule {id} does not exist")
        );
    }

    #[pg_test]
    fn a_realtime_ingest_flushes_the_users_expired_meters_first() {
        let meter = daily("period_end");
        run("SELECT meter.alter_stream('s', mode => 'realtime')");
        ingest(json!({"userId": "acme", "value": 5}));
        expire(meter, 1);
        ingest(json!({"userId": "acme", "value": 6}));
        assert_eq!(
            sql_text("SELECT (record->'value')::text FROM meter.flushed").as_deref(),
            Some("5")
        );
        assert_eq!(
            sql_text(&format!("SELECT value::text FROM meter.meters WHERE id = {meter}")).as_deref(),
            Some("6")
        );
    }
}
