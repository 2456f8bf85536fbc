//! Ingest, the meter processor, rejected records, deduplication and preview.

use pgrx::prelude::*;

#[pg_schema]
mod tests {
    use crate::pg_tests::support::*;
    use pgrx::prelude::*;
    use serde_json::json;

    /// Two meter types and a stream whose first rule (EU traffic) falls through to
    /// the second (all traffic) for users without an EU meter.
    fn eu_and_all(auto_create: bool) {
        run("SELECT meter.create_meter_type('eu-calls', 'sum', '@monthly', 'Europe/Stockholm')");
        run("SELECT meter.create_meter_type('all-calls', 'sum', '@monthly', 'UTC')");
        run(&format!(
            r#"SELECT meter.create_stream('api', '[
                {{"name": "eu", "meter_type": "eu-calls", "conditions": [{{"field": "region", "op": "in", "value": ["eu", "uk"]}}],
                  "group_by": ["plan"], "carry_last": ["device.os"]}},
                {{"name": "all", "meter_type": "all-calls"}}
              ]', auto_create_meters => {auto_create})"#
        ));
    }

    fn ingest(stream: &str, records: serde_json::Value) -> (i64, i64, i64) {
        let row = Spi::get_three_with_args::<i64, i64, i64>(
            "SELECT accepted, duplicates, rejected FROM meter.ingest($1, $2)",
            &[stream.into(), pgrx::JsonB(records).into()],
        )
        .unwrap();
        (row.0.unwrap(), row.1.unwrap(), row.2.unwrap())
    }

    fn value_of(user: &str, meter_type: &str) -> Option<String> {
        sql_text(&format!(
            "SELECT m.value::text FROM meter.meters m JOIN meter.meter_types t ON t.id = m.meter_type_id
              WHERE m.user_id = '{user}' AND t.name = '{meter_type}'"
        ))
    }

    #[pg_test]
    fn records_fall_through_to_the_next_rule_without_a_meter() {
        eu_and_all(false);
        run("SELECT meter.create_meter('api', 'all-calls', 'acme')");
        run("SELECT meter.create_meter('api', 'eu-calls', 'globex')");
        run("SELECT meter.create_meter('api', 'all-calls', 'globex')");
        assert_eq!(
            ingest(
                "api",
                json!([
                    {"userId": "acme", "region": "eu", "value": 5},
                    {"userId": "globex", "region": "uk", "value": 7, "plan": "pro", "device": {"os": "ios"}},
                    {"userId": "globex", "region": "us", "value": 1}
                ])
            ),
            (3, 0, 0)
        );
        assert_eq!(process("api"), counts(3, 0, 0));
        assert_eq!(value_of("acme", "all-calls").as_deref(), Some("5"));
        assert_eq!(value_of("globex", "eu-calls").as_deref(), Some("7"));
        assert_eq!(value_of("globex", "all-calls").as_deref(), Some("1"));
        let record = sql_json("SELECT meter.meter_record(id) FROM meter.meters WHERE user_id = 'globex' AND value = 7");
        assert_eq!(
            record["groups"],
            json!([{"key": "plan=pro", "fields": {"plan": "pro"}, "value": 7}])
        );
        assert_eq!(record["carryLast"], json!({"device.os": "ios"}));
        assert_eq!(record["meterMetaData"]["recordCount"], json!(1));
        // Every metered record has an audit row naming its rule.
        assert_eq!(
            sql_text(
                "SELECT string_agg(rule || ':' || user_id || ':' || value, ',' ORDER BY value) FROM meter.usage_audit"
            )
            .as_deref(),
            Some("all:globex:1,all:acme:5,eu:globex:7")
        );
        assert_eq!(sql_i64("SELECT count(*) FROM meter.usage"), 0);
    }

    #[pg_test]
    fn the_audit_of_more_meters_than_one_insert_takes_keeps_every_record() {
        run("SELECT meter.create_meter_type('calls', 'sum')");
        run(
            r#"SELECT meter.create_stream('s', '[{"name": "all", "meter_type": "calls"}]', auto_create_meters => true)"#,
        );
        // 2 500 meters (one statement writes 1 000 meters' rows), two records each.
        run(
            r#"SELECT meter.ingest('s', jsonb_agg(jsonb_build_object('id', 'r' || i, 'userId', 'u' || i % 2500, 'value', i)))
                 FROM generate_series(1, 5000) i"#,
        );
        assert_eq!(process("s").metered, 5000);
        assert_eq!(
            rows(
                "SELECT count(*) AS records, count(DISTINCT meter_id) AS meters, count(DISTINCT batch_id) AS batches,
                        sum(value)::text AS total
                   FROM meter.usage_audit"
            ),
            json!([{"records": 5000, "meters": 2500, "batches": 2500, "total": "12502500"}])
        );
        assert_eq!(
            sql_i64("SELECT count(*) FROM meter.verify_meters('s') WHERE NOT matches"),
            0
        );
    }

    #[pg_test]
    fn the_audit_keeps_each_records_exact_amount_time_id_and_rule() {
        eu_and_all(true);
        // Ids that array text would have to quote, amounts past i64 and past 15
        // digits, a time with microseconds, a record without an id; amounts of
        // 64-bit digits at several scales, down to i64's minimum.
        run(r#"SELECT meter.ingest('api', jsonb_build_array(
                   jsonb_build_object('id', 'a"b\c,{d} e', 'userId', 'acme', 'value', 0.1,
                                      'timestamp', to_char((now() - interval '0.000007 s') AT TIME ZONE 'UTC',
                                                           'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')),
                   jsonb_build_object('id', 'NULL', 'userId', 'acme', 'value', 123456789012345678901234567890.000000001),
                   jsonb_build_object('id', 'big', 'userId', 'acme', 'value', 9223372036854775808),
                   jsonb_build_object('userId', 'acme', 'value', -7),
                   jsonb_build_object('id', 'zeros', 'userId', 'acme', 'value', 47.2900000000000000),
                   jsonb_build_object('id', 'tiny', 'userId', 'acme', 'value', -0.000000000000000000001),
                   jsonb_build_object('id', 'i64-min', 'userId', 'acme', 'value', -92233720368547758.08)))"#);
        assert_eq!(process("api").metered, 7);
        assert_eq!(
            rows(
                "SELECT record_id, rule, value::text, record_at = now() - interval '0.000007 s' AS exact_time,
                        usage_id IS NOT NULL AS from_inbox
                   FROM meter.usage_audit ORDER BY batch_id, position"
            ),
            json!([
                {"record_id": "a\"b\\c,{d} e", "rule": "all", "value": "0.1", "exact_time": true, "from_inbox": true},
                {"record_id": "NULL", "rule": "all", "value": "123456789012345678901234567890.000000001",
                 "exact_time": false, "from_inbox": true},
                {"record_id": "big", "rule": "all", "value": "9223372036854775808", "exact_time": false, "from_inbox": true},
                {"record_id": null, "rule": "all", "value": "-7", "exact_time": false, "from_inbox": true},
                // Digits and scale kept as received: trailing zeros stay.
                {"record_id": "zeros", "rule": "all", "value": "47.2900000000000000", "exact_time": false,
                 "from_inbox": true},
                {"record_id": "tiny", "rule": "all", "value": "-0.000000000000000000001", "exact_time": false,
                 "from_inbox": true},
                {"record_id": "i64-min", "rule": "all", "value": "-92233720368547758.08", "exact_time": false,
                 "from_inbox": true},
            ])
        );
        assert_eq!(
            sql_i64("SELECT count(*) FROM meter.verify_meters('api') WHERE NOT matches"),
            0
        );
    }

    /// A run over ids `a b a c b d` in chunks of two: the second `a` and `b` come
    /// in later chunks than the first, and are found among the claims appended.
    fn run_with_ids_repeated_across_chunks() {
        dedupe_stream();
        run("SET LOCAL meter_ext.chunk_size = 2");
        run(
            r#"SELECT meter.ingest('s', '[{"id": "a", "userId": "u", "value": 1}, {"id": "b", "userId": "u", "value": 2},
                                         {"id": "a", "userId": "u", "value": 4}, {"id": "c", "userId": "v", "value": 8},
                                         {"id": "b", "userId": "u", "value": 16}, {"userId": "v", "value": 32}]')"#,
        );
        assert_eq!(process("s"), counts(4, 2, 0));
        assert_eq!(value_of("u", "calls").as_deref(), Some("3"));
        assert_eq!(value_of("v", "calls").as_deref(), Some("40"));
    }

    #[pg_test]
    fn claims_and_audit_rows_are_appended_with_what_an_insert_would_give_them() {
        run_with_ids_repeated_across_chunks();
        // Each id once, at the run's time, with the meter its record went to.
        assert_eq!(
            rows(
                "SELECT k.record_id, k.seen_at BETWEEN now() AND clock_timestamp() AS at_run_time, m.user_id
                   FROM meter.dedupe_keys k JOIN meter.meters m ON m.id = k.meter_id ORDER BY 1"
            ),
            json!([
                {"record_id": "a", "at_run_time": true, "user_id": "u"},
                {"record_id": "b", "at_run_time": true, "user_id": "u"},
                {"record_id": "c", "at_run_time": true, "user_id": "v"}
            ])
        );
        // Audit rows get ids from the table's identity and the transaction's time,
        // as the column defaults give an INSERT's rows; the next INSERT's id follows.
        assert_eq!(
            rows(
                "SELECT user_id, record_ids, processed_at = now() AS at_run_time,
                        id = (SELECT max(id) FROM meter.usage_audit_batches) - count(*) OVER () + row_number() OVER (ORDER BY id)
                          AS from_the_sequence
                   FROM meter.usage_audit_batches ORDER BY id"
            ),
            json!([
                {"user_id": "u", "record_ids": ["a", "b"], "at_run_time": true, "from_the_sequence": true},
                {"user_id": "v", "record_ids": ["c", null], "at_run_time": true, "from_the_sequence": true}
            ])
        );
        let last = sql_i64("SELECT max(id) FROM meter.usage_audit_batches");
        run("INSERT INTO meter.usage_audit_batches (stream_id, meter_id, user_id, period_start, usage_ids, record_ids, rules, amounts, record_ats)
             VALUES (0, 0, 'x', now(), '{}', '{}', '{}', '{}', '{}')");
        assert_eq!(sql_i64("SELECT max(id) FROM meter.usage_audit_batches"), last + 1);
    }

    #[pg_test]
    fn a_check_constraint_an_operator_put_on_the_claims_holds() {
        run("ALTER TABLE meter.dedupe_keys ADD CONSTRAINT no_c CHECK (record_id <> 'c')");
        let error = error_of(run_with_ids_repeated_across_chunks);
        assert_eq!(
            error.map(|(code, message)| (code, message.contains("no_c"))),
            Some((PgSqlErrorCode::ERRCODE_CHECK_VIOLATION, true))
        );
    }

    #[pg_test]
    fn claims_and_audit_rows_fire_triggers_on_their_tables() {
        // A trigger an operator put on them: the rows then go through an INSERT.
        run("CREATE TABLE public.written (tab text)");
        run(
            "CREATE FUNCTION public.note_row() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN INSERT INTO public.written (tab) VALUES (TG_TABLE_NAME); RETURN NULL; END $$",
        );
        run("CREATE TRIGGER noted AFTER INSERT ON meter.dedupe_keys FOR EACH ROW EXECUTE FUNCTION public.note_row()");
        run("CREATE TRIGGER noted AFTER INSERT ON meter.usage_audit_batches FOR EACH ROW EXECUTE FUNCTION public.note_row()");
        run_with_ids_repeated_across_chunks();
        assert_eq!(
            rows("SELECT tab, count(*) AS n FROM public.written GROUP BY tab ORDER BY tab"),
            json!([{"tab": "dedupe_keys", "n": 3}, {"tab": "usage_audit_batches", "n": 2}])
        );
        assert_eq!(
            sql_text(
                "SELECT string_agg(coalesce(record_id, '-'), ',' ORDER BY batch_id, position) FROM meter.usage_audit"
            )
            .as_deref(),
            Some("a,b,c,-")
        );
    }

    #[pg_test]
    fn auto_creation_makes_the_first_matching_rules_meter() {
        eu_and_all(true);
        ingest(
            "api",
            json!([{"userId": "new-eu", "region": "eu", "value": 2}, {"userId": "new-us", "value": 3}]),
        );
        assert_eq!(process("api").metered, 2);
        assert_eq!(value_of("new-eu", "eu-calls").as_deref(), Some("2"));
        assert_eq!(value_of("new-us", "all-calls").as_deref(), Some("3"));
        assert_eq!(sql_i64("SELECT count(*) FROM meter.meters"), 2);
        // Created and updated by the same transaction, in that order.
        assert_eq!(
            sql_i64("SELECT count(*) FROM meter.meters WHERE updated_at <> created_at"),
            0
        );
        // The new meter's period follows its type: the next local month start.
        assert_eq!(
            sql_text(
                "SELECT (period_end AT TIME ZONE 'Europe/Stockholm')::text FROM meter.meters WHERE user_id = 'new-eu'"
            ),
            sql_text("SELECT (date_trunc('month', now() AT TIME ZONE 'Europe/Stockholm') + interval '1 month')::text")
        );
    }

    #[pg_test]
    fn every_rejection_lands_in_rejected_with_the_record_intact() {
        run("SELECT meter.create_meter_type('calls', 'sum')");
        run("SELECT meter.create_meter_type('devices', 'unique_count')");
        run("SELECT meter.create_meter_type('past', 'sum', active_from => '2020-01-01Z', active_to => '2021-01-01Z')");
        run("SELECT meter.create_meter_type('future', 'sum', active_from => '2090-01-01Z')");
        run(r#"SELECT meter.create_stream('s', '[
                 {"name": "devices", "meter_type": "devices", "conditions": [{"field": "kind", "op": "eq", "value": "device"}]},
                 {"name": "old", "meter_type": "past", "conditions": [{"field": "kind", "op": "eq", "value": "old"}]},
                 {"name": "new", "meter_type": "future", "conditions": [{"field": "kind", "op": "eq", "value": "new"}]},
                 {"name": "calls", "meter_type": "calls", "conditions": [{"field": "kind", "op": "eq", "value": "call"}]}
               ]')"#);
        run("SELECT meter.create_stream('empty')");
        for (user, meter_type) in [("u", "calls"), ("u", "devices")] {
            run(&format!("SELECT meter.create_meter('s', '{meter_type}', '{user}')"));
        }
        let cases = [
            (json!([1, 2]), "not_an_object", None),
            (json!({"value": 1}), "missing_user_id", None),
            (json!({"userId": ""}), "invalid_user_id", None),
            (json!({"userId": "u", "id": {"x": 1}}), "invalid_record_id", None),
            (json!({"userId": "u", "timestamp": "soon"}), "invalid_timestamp", None),
            (
                json!({"userId": "u", "timestamp": "2999-01-01T00:00:00Z"}),
                "future_timestamp",
                None,
            ),
            (json!({"userId": "u", "kind": "call"}), "missing_value", Some("calls")),
            (
                json!({"userId": "u", "kind": "call", "value": "12abc"}),
                "invalid_value",
                Some("calls"),
            ),
            (
                json!({"userId": "u", "kind": "device", "value": [1]}),
                "invalid_value",
                Some("devices"),
            ),
            (
                json!({"userId": "u", "kind": "call", "value": "1e400000"}),
                "value_out_of_range",
                Some("calls"),
            ),
            (
                json!({"userId": "u", "kind": "new", "value": 1}),
                "before_active_from",
                Some("new"),
            ),
            (
                json!({"userId": "u", "kind": "old", "value": 1}),
                "after_active_to",
                Some("old"),
            ),
            (
                json!({"userId": "nobody", "kind": "call", "value": 1}),
                "no_meter",
                Some("calls"),
            ),
            (
                json!({"userId": "u", "kind": "other", "value": 1}),
                "no_rule_matched",
                None,
            ),
        ];
        let records: Vec<serde_json::Value> = cases.iter().map(|(r, _, _)| r.clone()).collect();
        let (accepted, duplicates, rejected_at_ingest) = ingest("s", serde_json::Value::Array(records));
        // Record-level problems are caught at ingest; the rest when rules run.
        assert_eq!((accepted, duplicates, rejected_at_ingest), (8, 0, 6));
        assert_eq!(process("s"), counts(0, 0, 8));
        ingest("empty", json!({"userId": "u", "value": 1}));
        assert_eq!(process("empty").rejected, 1);

        for (record, code, rule) in cases {
            let row = Spi::get_three_with_args::<String, String, String>(
                "SELECT code, reason, rule FROM meter.rejected WHERE record = $1 AND stream = 's'",
                &[pgrx::JsonB(record.clone()).into()],
            )
            .unwrap();
            assert_eq!(row.0.as_deref(), Some(code), "{record}");
            assert!(!row.1.unwrap_or_default().is_empty(), "{record} has a reason");
            assert_eq!(row.2.as_deref(), rule, "{record}");
        }
        assert_eq!(
            sql_text("SELECT code FROM meter.rejected WHERE stream = 'empty'").as_deref(),
            Some("no_rules")
        );
        assert_eq!(
            sql_text("SELECT reason FROM meter.rejected WHERE code = 'no_meter'").as_deref(),
            Some("user \"nobody\" has no meter of type \"calls\" in this stream (rule \"calls\"; auto_create_meters is off)")
        );
        // Nothing was lost: all 15 records are rejected, none metered.
        assert_eq!(sql_i64("SELECT count(*) FROM meter.rejected"), 15);
        assert_eq!(sql_i64("SELECT count(*) FROM meter.usage_audit"), 0);
    }

    /// A record nested as deep as PostgreSQL's parser allows, in a field no rule
    /// reads, is metered or rejected like any other, and a rejection keeps it
    /// intact. Nested too deep in a field the stream reads, it is rejected
    /// (`too_deep`, naming the field). Neither fails the run or the call: one
    /// such record used to fail every run of its stream.
    #[pg_test]
    fn deeply_nested_records_are_metered_or_rejected_and_never_fail_a_run() {
        run("SELECT meter.create_meter_type('calls', 'sum')");
        let rules = r#"[{"name": "calls", "meter_type": "calls", "conditions": [{"field": "kind", "op": "eq", "value": "call"}],
                         "carry_last": ["plan"]}]"#;
        run(&format!(
            "SELECT meter.create_stream('batch', '{rules}', auto_create_meters => true)"
        ));
        run(&format!(
            "SELECT meter.create_stream('rt', '{rules}', auto_create_meters => true, mode => 'realtime')"
        ));
        let nested = |depth: usize| format!("{}{}", "[".repeat(depth), "]".repeat(depth));
        // Built by PostgreSQL: serde_json's parser stops at 128 levels.
        let record = |fields: String| format!("'{{\"userId\": \"u\", {fields}}}'::jsonb");
        let deep = nested(5000);
        let records = [
            (record(format!(r#""kind": "call", "value": 1, "x": {deep}"#)), None),
            (
                record(format!(r#""kind": "other", "value": 1, "x": {deep}"#)),
                Some("no_rule_matched"),
            ),
            // The record and its plan make 64 levels: the most a read field may reach.
            (
                record(format!(r#""kind": "call", "value": 2, "plan": {}"#, nested(63))),
                None,
            ),
            (
                record(format!(r#""kind": "call", "value": 4, "plan": {}"#, nested(64))),
                Some("too_deep"),
            ),
            (format!("'{{\"userId\": {}}}'::jsonb", nested(70)), Some("too_deep")),
        ];
        let array = format!(
            "jsonb_build_array({})",
            records.iter().map(|(r, _)| r.as_str()).collect::<Vec<_>>().join(", ")
        );
        let ingest = |stream: &str| {
            let row = Spi::get_three::<i64, i64, i64>(&format!(
                "SELECT accepted, duplicates, rejected FROM meter.ingest('{stream}', {array})"
            ))
            .unwrap();
            (row.0.unwrap(), row.1.unwrap(), row.2.unwrap())
        };
        // A batch stream checks the user id at ingest; the rest is rejected by the run.
        assert_eq!(ingest("batch"), (4, 0, 1));
        assert_eq!(process("batch"), counts(2, 0, 2));
        assert_eq!(ingest("rt"), (2, 0, 3));
        for stream in ["batch", "rt"] {
            assert_eq!(
                sql_text(&format!(
                    "SELECT m.value::text FROM meter.meters m JOIN meter.streams s ON s.id = m.stream_id
                      WHERE s.name = '{stream}' AND m.user_id = 'u'"
                ))
                .as_deref(),
                Some("3"),
                "{stream}"
            );
            assert_eq!(
                sql_i64(&format!(
                    "SELECT jsonb_array_length(m.carry_last -> 'plan') FROM meter.meters m
                       JOIN meter.streams s ON s.id = m.stream_id WHERE s.name = '{stream}'"
                )),
                1,
                "{stream}: the deepest plan allowed is carried"
            );
            for (record, code) in &records {
                let stored = sql_text(&format!(
                    "SELECT min(code) FROM meter.rejected WHERE stream = '{stream}' AND record = {record}"
                ));
                assert_eq!(stored.as_deref(), *code, "{stream}: {}", &record[..60]);
            }
            assert_eq!(
                sql_text(&format!(
                    "SELECT string_agg(reason, '; ' ORDER BY reason) FROM meter.rejected
                      WHERE stream = '{stream}' AND code = 'too_deep'"
                ))
                .as_deref(),
                Some(
                    "field \"plan\" nests deeper than 64 levels of arrays and objects; \
                     field \"userId\" nests deeper than 64 levels of arrays and objects"
                ),
                "{stream}"
            );
        }
    }

    #[pg_test]
    fn a_closed_meter_rejects_late_records() {
        run("SELECT meter.create_meter_type('calls', 'sum')");
        run(
            r#"SELECT meter.create_stream('s', '[{"name": "all", "meter_type": "calls"}]', auto_create_meters => true)"#,
        );
        let id = sql_i64("SELECT meter.create_meter('s', 'calls', 'u')");
        run(&format!("UPDATE meter.meters SET closed_at = now() WHERE id = {id}"));
        ingest("s", json!({"userId": "u", "value": 1}));
        process("s");
        assert_eq!(
            sql_text("SELECT code FROM meter.rejected").as_deref(),
            Some("meter_closed")
        );
    }

    #[pg_test]
    fn a_non_object_batch_is_an_error() {
        run("SELECT meter.create_stream('s')");
        let (code, message) = sql_error("SELECT * FROM meter.ingest('s', '42')").unwrap();
        assert_eq!(code, PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE);
        assert_eq!(
            message,
            "records must be a JSON object or an array of objects, not a number"
        );
        assert_eq!(
            error_message("SELECT * FROM meter.ingest('nope', '{}')"),
            "stream \"nope\" does not exist"
        );
    }

    /// `ingest` reads the fields a record needs in place when they are scalars,
    /// and through the stream's projection otherwise: either way it rejects what a
    /// run over the same records (sent by plain INSERT) rejects, with the same
    /// code and reason, and lets the rest through.
    #[pg_test]
    fn ingest_rejects_what_a_run_rejects_on_nested_paths() {
        run("SELECT meter.create_meter_type('calls', 'sum')");
        for stream in ["by_ingest", "by_insert"] {
            run(&format!(
                r#"SELECT meter.create_stream('{stream}', '[{{"name": "all", "meter_type": "calls"}}]',
                     user_id_field => 'who.id', id_field => 'meta.id', timestamp_field => 'meta.at',
                     auto_create_meters => true)"#
            ));
        }
        let records = json!([
            {"who": {"id": "u1"}, "meta": {"id": "a", "at": "2026-01-01T00:00:00Z"}, "value": 1},
            {"who": {"id": 42}, "meta": {"id": 7, "at": 1767225600000u64}, "value": 1},
            {"who": {"id": "u1"}, "meta": null, "value": 1},
            {"who": {"id": "u1"}, "meta": "not an object", "value": 1},
            {"who": {"id": "u1"}, "meta": {"id": null, "at": null}, "value": 1},
            {"who": {"id": null}, "value": 1},
            {"who": "u1", "value": 1},
            {"who": {"id": {"nested": "object"}}, "value": 1},
            {"who": {"id": ["a", "b"]}, "value": 1},
            {"who": {"id": true}, "value": 1},
            {"who": {"id": ""}, "value": 1},
            {"who": {"id": "u1"}, "meta": {"id": {"x": 1}}, "value": 1},
            {"who": {"id": "u1"}, "meta": {"at": "yesterday"}, "value": 1},
            {"who": {"id": "u1"}, "meta": {"at": "2999-01-01T00:00:00Z"}, "value": 1},
            {"who": {"id": "u1"}, "meta": {"at": {"iso": "2026-01-01"}}, "value": 1}
        ]);
        let (accepted, duplicates, rejected) = ingest("by_ingest", records.clone());
        assert_eq!((accepted, duplicates), (5, 0));
        assert_eq!(rejected, 10);
        for record in records.as_array().unwrap() {
            Spi::run_with_args(
                "INSERT INTO meter.usage (stream, record) VALUES ('by_insert', $1)",
                &[pgrx::JsonB(record.clone()).into()],
            )
            .unwrap();
        }
        assert_eq!(process("by_insert").rejected, 10);
        // A future timestamp's reason names the limit: now (the call's, the run's) plus the tolerance.
        let rejections = |stream: &str| {
            sql_text(&format!(
                "SELECT string_agg(record::text || ' ' || code || ': '
                                   || CASE code WHEN 'future_timestamp' THEN '' ELSE reason END, E'\n' ORDER BY record::text)
                   FROM meter.rejected WHERE stream = '{stream}'"
            ))
        };
        let by_ingest = rejections("by_ingest");
        assert_eq!(by_ingest, rejections("by_insert"));
        let by_ingest = by_ingest.unwrap();
        for code in [
            "missing_user_id",
            "invalid_user_id",
            "invalid_record_id",
            "invalid_timestamp",
            "future_timestamp",
        ] {
            assert!(by_ingest.contains(code), "{code} in {by_ingest}");
        }
    }

    fn dedupe_stream() {
        run("SELECT meter.create_meter_type('calls', 'sum')");
        run(
            r#"SELECT meter.create_stream('s', '[{"name": "all", "meter_type": "calls"}]', auto_create_meters => true)"#,
        );
    }

    #[pg_test]
    fn duplicates_by_ingest_count_once() {
        dedupe_stream();
        assert_eq!(
            ingest(
                "s",
                json!([{"userId": "u", "id": "a", "value": 1}, {"userId": "u", "id": "a", "value": 1}])
            ),
            (1, 1, 0)
        );
        assert_eq!(process("s"), counts(1, 1, 0));
        // Seen before: ingest says so, and the run counts it as a duplicate again.
        assert_eq!(ingest("s", json!({"userId": "u", "id": "a", "value": 1})), (0, 1, 0));
        assert_eq!(process("s"), counts(0, 1, 0));
        assert_eq!(value_of("u", "calls").as_deref(), Some("1"));
        // Metered ids are looked up one by one only when one lies between the
        // batch's smallest and largest id ("C" order): each case counts right.
        let record = |id: &str| json!({"userId": "u", "id": id, "value": 1});
        assert_eq!(ingest("s", json!([record("b"), record("c")])), (2, 0, 0), "above 'a'");
        assert_eq!(ingest("s", json!([record("0"), record("B")])), (2, 0, 0), "below 'a'");
        assert_eq!(ingest("s", json!([record("0"), record("b")])), (2, 0, 0), "around 'a'");
        assert_eq!(
            ingest("s", json!([record("0"), record("a"), record("z")])),
            (2, 1, 0),
            "'a' itself"
        );
        assert_eq!(process("s"), counts(5, 4, 0));
        assert_eq!(value_of("u", "calls").as_deref(), Some("6"));
        // Numbers and strings are the same id text.
        ingest(
            "s",
            json!([{"userId": "u", "id": 7, "value": 10}, {"userId": "u", "id": "7", "value": 10}]),
        );
        assert_eq!(process("s").duplicates, 1);
        assert_eq!(value_of("u", "calls").as_deref(), Some("16"));
    }

    #[pg_test]
    fn ingest_can_leave_metered_ids_to_the_run() {
        dedupe_stream();
        let record = |id: &str| json!({"userId": "u", "id": id, "value": 1});
        ingest("s", record("a"));
        process("s");
        run("SET LOCAL meter_ext.ingest_checks_metered_ids = off");
        let scans = dedupe_index_scans();
        assert_eq!(
            ingest("s", json!([record("a"), record("a"), record("b")])),
            (2, 1, 0),
            "only the id repeated within the call is reported"
        );
        assert_eq!(dedupe_index_scans(), scans, "no metered id looked up");
        // The run counts the metered id as a duplicate all the same.
        assert_eq!(process("s"), counts(1, 2, 0));
        assert_eq!(value_of("u", "calls").as_deref(), Some("2"));
        run("RESET meter_ext.ingest_checks_metered_ids");
        assert_eq!(ingest("s", record("b")), (0, 1, 0), "on again: looked up");
    }

    /// Index scans of meter.dedupe_keys so far in this transaction.
    fn dedupe_index_scans() -> i64 {
        sql_i64(
            "SELECT coalesce(idx_scan, 0) FROM pg_stat_xact_user_tables
              WHERE relid = 'meter.dedupe_keys'::regclass",
        )
    }

    #[pg_test]
    fn known_record_ids_are_found_by_one_range_scan_or_one_by_one_alike() {
        use crate::dedupe::{keys_between, known_among};
        use pgrx::datum::TimestampWithTimeZone;
        dedupe_stream();
        // Keys k0001 … k1000, contiguous in "C" order; every tenth expired.
        run("INSERT INTO meter.dedupe_keys (stream_id, record_id, seen_at)
             SELECT s.id, 'k' || lpad(i::text, 4, '0'),
                    CASE WHEN i % 10 = 0 THEN now() - interval '400 days' ELSE now() END
               FROM meter.streams s, generate_series(1, 1000) i WHERE s.name = 's'");
        let stream_id = sql_i64("SELECT id FROM meter.streams WHERE name = 's'");
        let all = TimestampWithTimeZone::negative_infinity();
        let recent = Spi::get_one::<TimestampWithTimeZone>("SELECT now() - interval '1 day'")
            .unwrap()
            .unwrap();
        let known = |ids: &[&str], since| {
            let mut found = known_among(stream_id, ids, || ids.to_vec().into(), since).unwrap();
            found.sort();
            found
        };

        // 24 ids between k0005 and k0010, whose stretch holds 6 keys: a quarter
        // key per id, read in one scan.
        let mut near: Vec<String> = ["k0005", "k0006", "k0010"].map(String::from).to_vec();
        near.extend((0..21).map(|i| format!("k0007-{i:02}")));
        let near: Vec<&str> = near.iter().map(String::as_str).collect();
        let scans = dedupe_index_scans();
        assert_eq!(known(&near, all), ["k0005", "k0006", "k0010"]);
        assert_eq!(dedupe_index_scans() - scans, 1, "one range scan");
        assert_eq!(known(&near, recent), ["k0005", "k0006"], "k0010 expired");
        // One id fewer, and the stretch holds more than a quarter key per id.
        assert_eq!(keys_between(stream_id, "k0005", "k0010", all, 23 / 4).unwrap(), None);
        let scans = dedupe_index_scans();
        assert_eq!(known(&near[..23], all), ["k0005", "k0006", "k0010"]);
        assert_eq!(dedupe_index_scans() - scans, 1 + 23, "the scan, then a lookup per id");

        // Ids far apart: the stretch holds the whole stream, so each is looked up.
        let far = ["k0001", "k0501", "k0990", "k0999", "k1001", "j"];
        assert_eq!(keys_between(stream_id, "j", "k1001", all, 1).unwrap(), None);
        assert_eq!(known(&far, all), ["k0001", "k0501", "k0990", "k0999"]);
        assert_eq!(known(&far, recent), ["k0001", "k0501", "k0999"], "k0990 expired");
        // Ids beyond every key, and none at all.
        assert_eq!(known(&["l1", "l2", "l3", "l4"], all), Vec::<String>::new());
        assert_eq!(known(&[], all), Vec::<String>::new());
    }

    #[pg_test]
    fn duplicates_by_insert_and_across_both_paths_count_once() {
        dedupe_stream();
        run(r#"INSERT INTO meter.usage (stream, record) VALUES
                 ('s', '{"userId": "u", "id": "x", "value": 2}'),
                 ('s', '{"userId": "u", "id": "x", "value": 2}')"#);
        assert_eq!(process("s"), counts(1, 1, 0));
        ingest("s", json!({"userId": "u", "id": "x", "value": 2}));
        run(r#"INSERT INTO meter.usage (stream, record) VALUES ('s', '{"userId": "u", "id": "y", "value": 3}')"#);
        ingest("s", json!({"userId": "u", "id": "y", "value": 3}));
        assert_eq!(process("s"), counts(1, 2, 0));
        assert_eq!(value_of("u", "calls").as_deref(), Some("5"));
        assert_eq!(sql_i64("SELECT count(*) FROM meter.dedupe_keys"), 2);
    }

    #[pg_test]
    fn ids_older_than_the_retention_are_forgotten() {
        dedupe_stream();
        ingest("s", json!({"userId": "u", "id": "old", "value": 1}));
        process("s");
        run("UPDATE meter.dedupe_keys SET seen_at = now() - interval '36 days'");
        ingest("s", json!({"userId": "u", "id": "old", "value": 1}));
        assert_eq!(process("s").metered, 1);
        run("SET LOCAL meter_ext.dedupe_retention = '40d'");
        ingest("s", json!({"userId": "u", "id": "old", "value": 1}));
        assert_eq!(process("s").duplicates, 1);
        assert_eq!(value_of("u", "calls").as_deref(), Some("2"));
    }

    #[pg_test]
    fn a_run_claims_new_and_expired_ids_and_skips_live_ones_in_one_chunk() {
        dedupe_stream();
        ingest(
            "s",
            json!([{"userId": "u", "id": "expired", "value": 1}, {"userId": "u", "id": "live", "value": 1}]),
        );
        process("s");
        run("UPDATE meter.dedupe_keys SET seen_at = now() - interval '36 days', meter_id = NULL WHERE record_id = 'expired'");
        ingest(
            "s",
            json!([
                {"userId": "u", "id": "live", "value": 1},
                {"userId": "u", "id": "expired", "value": 1},
                {"userId": "u", "id": "new", "value": 1},
                {"userId": "u", "id": "new", "value": 1}
            ]),
        );
        assert_eq!(process("s"), counts(2, 2, 0));
        assert_eq!(value_of("u", "calls").as_deref(), Some("4"));
        // The expired id is claimed again: now, by the meter it went to.
        assert_eq!(
            sql_i64(
                "SELECT count(*) FROM meter.dedupe_keys k JOIN meter.meters m ON m.id = k.meter_id
                  WHERE k.seen_at > now() - interval '1 day' AND m.user_id = 'u' AND k.record_id IN ('expired', 'new')"
            ),
            2
        );
        assert_eq!(sql_i64("SELECT count(*) FROM meter.dedupe_keys"), 3);
    }

    /// Ingests a record of user `u` for each id `ids` (an SQL set of text) gives;
    /// returns (accepted, duplicates, rejected).
    fn ingest_ids(ids: &str) -> (i64, i64, i64) {
        let row = Spi::get_three::<i64, i64, i64>(&format!(
            "SELECT accepted, duplicates, rejected FROM meter.ingest('s',
                 (SELECT jsonb_agg(jsonb_build_object('userId', 'u', 'id', id, 'value', 1)) FROM ({ids}) AS ids(id)))"
        ))
        .unwrap();
        (row.0.unwrap(), row.1.unwrap(), row.2.unwrap())
    }

    /// The stream's ranges as (first_id, last_id, id_count), and its rows of ids.
    fn claims() -> (serde_json::Value, i64) {
        (
            rows("SELECT first_id, last_id, id_count FROM meter.dedupe_ranges ORDER BY first_id, seen_at"),
            sql_i64("SELECT count(*) FROM meter.dedupe_keys"),
        )
    }

    #[pg_test]
    fn ordered_ids_are_claimed_as_ranges_and_count_once_whichever_way_they_return() {
        dedupe_stream();
        // r1 … r150: runs of one length each, r10 … r99 long enough for a range.
        let ids = "SELECT 'r' || i FROM generate_series(1, 150) i";
        assert_eq!(ingest_ids(ids), (150, 0, 0));
        assert_eq!(process("s"), counts(150, 0, 0));
        assert_eq!(
            claims(),
            (json!([{"first_id": "r10", "last_id": "r99", "id_count": 90}]), 60)
        );
        assert_eq!(
            sql_text(
                "SELECT (meter_ids = array_fill((SELECT id FROM meter.meters), ARRAY[90]))::text FROM meter.dedupe_ranges"
            )
            .as_deref(),
            Some("true"),
            "each id with the meter its record went to"
        );
        // Sent again: ingest reports them, a preview and the run count them as seen.
        assert_eq!(ingest_ids(ids), (0, 150, 0));
        assert_eq!(
            sql_text(
                "SELECT string_agg(DISTINCT outcome, ',') FROM meter.preview('s',
                     (SELECT jsonb_agg(jsonb_build_object('userId', 'u', 'id', 'r' || i, 'value', 1)) FROM generate_series(5, 60) i))"
            )
            .as_deref(),
            Some("duplicate")
        );
        assert_eq!(process("s"), counts(0, 150, 0));
        assert_eq!(value_of("u", "calls").as_deref(), Some("150"));
        // New ids beside them: r151 … r300, a range of their own.
        assert_eq!(
            ingest_ids("SELECT 'r' || i FROM generate_series(140, 300) i"),
            (150, 11, 0)
        );
        assert_eq!(process("s"), counts(150, 11, 0));
        assert_eq!(
            claims(),
            (
                json!([
                    {"first_id": "r10", "last_id": "r99", "id_count": 90},
                    {"first_id": "r151", "last_id": "r300", "id_count": 150}
                ]),
                60
            )
        );
        // audit_of finds a record through its range as through its row.
        for id in ["r50", "r200", "r5", "r300"] {
            assert_eq!(
                sql_text(&format!(
                    "SELECT string_agg(record_id || ':' || user_id, ',') FROM meter.audit_of('s', '{id}')"
                )),
                Some(format!("{id}:u")),
                "{id}"
            );
        }
        assert_eq!(sql_i64("SELECT count(*) FROM meter.audit_of('s', 'r301')"), 0);
    }

    #[pg_test]
    fn ranged_ids_past_the_retention_count_again_and_are_purged() {
        dedupe_stream();
        let ids = "SELECT 'r' || i FROM generate_series(10, 99) i";
        ingest_ids(ids);
        process("s");
        run("UPDATE meter.dedupe_ranges SET seen_at = now() - interval '36 days'");
        assert_eq!(ingest_ids(ids), (90, 0, 0));
        assert_eq!(process("s"), counts(90, 0, 0));
        assert_eq!(value_of("u", "calls").as_deref(), Some("180"));
        // Claimed again as a range of their own; audit_of finds the record metered
        // twice into its meter.
        assert_eq!(sql_i64("SELECT count(*) FROM meter.dedupe_ranges"), 2);
        assert_eq!(sql_i64("SELECT count(*) FROM meter.audit_of('s', 'r42')"), 2);
        // The expired range goes with meter.purge, its ids counted among the keys.
        assert_eq!(
            sql_i64("SELECT purged FROM meter.purge(interval '1 day') WHERE kind = 'dedupe_keys'"),
            90
        );
        assert_eq!(
            claims(),
            (json!([{"first_id": "r10", "last_id": "r99", "id_count": 90}]), 0)
        );
        assert_eq!(process("s"), counts(0, 0, 0));
        assert_eq!(ingest_ids(ids), (0, 90, 0));
        // Dropping the stream drops its ranges.
        run("SELECT meter.drop_stream('s', cascade => true)");
        assert_eq!(claims(), (json!([]), 0));
    }

    #[pg_test]
    fn random_ids_are_claimed_as_rows_after_a_few_ranges() {
        dedupe_stream();
        run("SET LOCAL meter_ext.chunk_size = 100");
        // 600 ids in random order, each chunk's spanning nearly all of them.
        ingest_ids("SELECT md5('x' || i) FROM generate_series(1, 600) i");
        assert_eq!(process("s"), counts(600, 0, 0));
        let (ranges, rows) = claims();
        let ranges = ranges.as_array().map_or(0, Vec::len);
        assert!((1..=3).contains(&ranges), "{ranges} ranges");
        assert_eq!(rows, 600 - 100 * ranges as i64);
        assert_eq!(
            ingest_ids("SELECT md5('x' || i) FROM generate_series(1, 600) i"),
            (0, 600, 0)
        );
        assert_eq!(process("s"), counts(0, 600, 0));
    }

    /// Ten ranges of 400 even ids each: k00000 … k00798, k00800 … k01598, …
    fn ten_ranges_of_400() {
        dedupe_stream();
        run("SET LOCAL meter_ext.chunk_size = 400");
        ingest_ids("SELECT 'k' || lpad((2 * i)::text, 5, '0') FROM generate_series(0, 3999) i");
        assert_eq!(process("s"), counts(4000, 0, 0));
        assert_eq!(sql_i64("SELECT count(*) FROM meter.dedupe_ranges"), 10);
    }

    #[pg_test]
    fn ranges_a_lookup_would_read_too_much_of_become_rows() {
        ten_ranges_of_400();
        // An odd id inside each range, and one even: each id alone would read a
        // range of 400 ids, over its budget (256), so ingest leaves them to the run.
        let across = "SELECT 'k' || lpad((800 * i + 1)::text, 5, '0') FROM generate_series(0, 9) i
                      UNION ALL SELECT 'k00000'";
        assert_eq!(ingest_ids(across), (11, 0, 0));
        // A preview reads them all the same, and finds it.
        assert_eq!(
            sql_i64(&format!(
                "SELECT count(*) FILTER (WHERE outcome = 'duplicate') FROM meter.preview('s',
                     (SELECT jsonb_agg(jsonb_build_object('userId', 'u', 'id', id, 'value', 1)) FROM ({across}) AS ids(id)))"
            )),
            1
        );
        // The run turns those ranges into rows, and finds the even one there.
        assert_eq!(process("s"), counts(10, 1, 0));
        assert_eq!(claims(), (json!([]), 4010));
        assert_eq!(sql_i64("SELECT count(*) FROM meter.audit_of('s', 'k04000')"), 1);
        assert_eq!(ingest_ids(across), (0, 11, 0));
        assert_eq!(value_of("u", "calls").as_deref(), Some("4010"));
    }

    #[pg_test]
    fn a_stray_id_among_ordered_ones_keeps_the_other_ranges() {
        ten_ranges_of_400();
        // 300 new ids past the ranges, and one inside the first: the run's span
        // covers every range, its halves do not.
        let ids = "SELECT 'k' || lpad((8000 + 2 * i)::text, 5, '0') FROM generate_series(0, 299) i
                   UNION ALL SELECT 'k00001'";
        assert_eq!(ingest_ids(ids), (301, 0, 0));
        assert_eq!(process("s"), counts(301, 0, 0));
        // Only the first range became rows; most new ids became ranges.
        assert_eq!(
            sql_i64("SELECT count(*) FROM meter.dedupe_ranges WHERE first_id >= 'k00800' AND last_id <= 'k07998'"),
            9
        );
        assert_eq!(
            sql_i64("SELECT count(*) FROM meter.dedupe_ranges WHERE first_id = 'k00000'"),
            0
        );
        assert!(
            sql_i64("SELECT coalesce(sum(id_count), 0) FROM meter.dedupe_ranges WHERE first_id >= 'k08000'") >= 200
        );
        assert_eq!(sql_i64("SELECT count(*) FROM meter.metered_ids"), 4301);
        assert_eq!(sql_i64("SELECT count(DISTINCT record_id) FROM meter.metered_ids"), 4301);
        assert_eq!(ingest_ids(ids), (0, 301, 0));
        assert_eq!(process("s"), counts(0, 301, 0));
        assert_eq!(value_of("u", "calls").as_deref(), Some("4301"));
    }

    #[pg_test]
    fn a_stream_turned_realtime_has_its_ranges_turned_into_rows() {
        dedupe_stream();
        ingest_ids("SELECT 'r' || i FROM generate_series(10, 99) i");
        process("s");
        assert_eq!(sql_i64("SELECT count(*) FROM meter.dedupe_ranges"), 1);
        // Realtime transactions claim ids through the unique index of
        // meter.dedupe_keys: the ranged ids become rows it holds.
        run("SELECT meter.alter_stream('s', mode => 'realtime')");
        assert_eq!(claims(), (json!([]), 90));
        assert_eq!(
            sql_i64(
                "SELECT count(*) FROM meter.dedupe_keys k JOIN meter.meters m ON m.id = k.meter_id
                  WHERE m.user_id = 'u' AND k.seen_at BETWEEN now() AND clock_timestamp()"
            ),
            90,
            "each with its time and meter"
        );
        assert_eq!(
            ingest_ids("SELECT 'r' || i FROM generate_series(90, 110) i"),
            (11, 10, 0)
        );
        assert_eq!(value_of("u", "calls").as_deref(), Some("101"));
    }

    #[pg_test]
    fn a_rejected_record_does_not_claim_its_id() {
        dedupe_stream();
        ingest("s", json!({"userId": "u", "id": "r1", "value": "bad"}));
        assert_eq!(process("s").rejected, 1);
        ingest("s", json!({"userId": "u", "id": "r1", "value": 4}));
        assert_eq!(process("s").metered, 1);
    }

    #[pg_test]
    fn fixed_rejected_records_are_reprocessed_once() {
        dedupe_stream();
        ingest("s", json!({"userId": "u", "id": "r1", "value": "4,5"}));
        process("s");
        let id = sql_i64("SELECT id FROM meter.rejected");
        run(&format!(
            "UPDATE meter.rejected SET record = jsonb_set(record, '{{value}}', '4.5') WHERE id = {id}"
        ));
        assert_eq!(sql_i64(&format!("SELECT meter.reprocess_rejected(ARRAY[{id}])")), 1);
        assert_eq!(sql_i64(&format!("SELECT meter.reprocess_rejected(ARRAY[{id}])")), 0);
        assert_eq!(process("s").metered, 1);
        assert_eq!(value_of("u", "calls").as_deref(), Some("4.5"));
        assert_eq!(
            sql_i64("SELECT count(*) FROM meter.rejected WHERE reprocessed_at IS NOT NULL"),
            1
        );
        assert_eq!(
            error_message("SELECT meter.reprocess_rejected(ARRAY[424242])"),
            "rejected record(s) 424242 do not exist"
        );
    }

    #[pg_test]
    fn state_survives_across_chunks() {
        run("SELECT meter.create_meter_type('peak', 'max')");
        run("SELECT meter.create_meter_type('last', 'latest')");
        run("SELECT meter.create_meter_type('devices', 'unique_count')");
        run(r#"SELECT meter.create_stream('s', '[
                 {"name": "peak", "meter_type": "peak", "conditions": [{"field": "m", "op": "eq", "value": "peak"}], "group_by": ["region"], "carry_first": ["plan"], "carry_last": ["plan"]},
                 {"name": "last", "meter_type": "last", "conditions": [{"field": "m", "op": "eq", "value": "last"}], "group_by": ["region"]},
                 {"name": "devices", "meter_type": "devices", "conditions": [{"field": "m", "op": "eq", "value": "dev"}], "group_by": ["region"]}
               ]', auto_create_meters => true)"#);
        run("SET LOCAL meter_ext.chunk_size = 2");
        ingest(
            "s",
            json!([
                {"userId": "u", "m": "peak", "value": 3, "region": "eu", "plan": "free"},
                {"userId": "u", "m": "last", "value": 1, "region": "eu", "timestamp": "2026-01-01T00:00:03Z"},
                {"userId": "u", "m": "dev", "value": "d1", "region": "eu"},
                {"userId": "u", "m": "peak", "value": "9.5", "region": "us", "plan": "pro"},
                {"userId": "u", "m": "last", "value": 2, "region": "eu", "timestamp": "2026-01-01T00:00:01Z"},
                {"userId": "u", "m": "dev", "value": "d1", "region": "us"},
                {"userId": "u", "m": "peak", "value": 4, "region": "eu", "plan": "team"},
                {"userId": "u", "m": "dev", "value": "d2", "region": "eu"},
                {"userId": "u", "m": "dev", "value": "d1", "region": "eu"}
            ]),
        );
        assert_eq!(process("s").metered, 9);
        let peak = sql_json("SELECT meter.meter_record(m.id) FROM meter.meters m JOIN meter.meter_types t ON t.id = m.meter_type_id WHERE t.name = 'peak'");
        assert_eq!(peak["value"], json!(9.5));
        assert_eq!(
            peak["groups"],
            json!([{"key": "region=eu", "fields": {"region": "eu"}, "value": 4}, {"key": "region=us", "fields": {"region": "us"}, "value": 9.5}])
        );
        assert_eq!(
            (peak["carryFirst"].clone(), peak["carryLast"].clone()),
            (json!({"plan": "free"}), json!({"plan": "team"}))
        );
        // latest: the record with the greatest timestamp, though processed first.
        assert_eq!(value_of("u", "last").as_deref(), Some("1"));
        let devices = sql_json("SELECT meter.meter_record(m.id) FROM meter.meters m JOIN meter.meter_types t ON t.id = m.meter_type_id WHERE t.name = 'devices'");
        assert_eq!(devices["value"], json!(2));
        assert_eq!(devices["groups"][0]["value"], json!(2)); // eu: d1, d2
        assert_eq!(devices["groups"][1]["value"], json!(1)); // us: d1
        assert_eq!(devices["meterMetaData"]["recordCount"], json!(4));
    }

    #[pg_test]
    fn an_ingest_call_is_one_inbox_row_and_chunks_split_it_in_arrival_order() {
        dedupe_stream();
        let records = |from: i32, to: i32| {
            json!((from..=to)
                .map(|i| json!({"userId": "u", "id": format!("r{i}"), "value": i}))
                .collect::<Vec<_>>())
        };
        assert_eq!(ingest("s", records(1, 5)), (5, 0, 0));
        run(r#"INSERT INTO meter.usage (stream, record) VALUES ('s', '{"userId": "u", "id": "r6", "value": 6}')"#);
        assert_eq!(ingest("s", records(7, 8)), (2, 0, 0));
        assert_eq!(
            sql_text("SELECT string_agg(records::text, ',' ORDER BY id) FROM meter.usage").as_deref(),
            Some("5,1,2")
        );
        assert_eq!(sql_i64("SELECT pending FROM meter.stream_status"), 8);
        // Chunks of two records: the five-record row is taken two, two and one at a
        // time, the rest put back first in line each time.
        run("SET LOCAL meter_ext.chunk_size = 2");
        assert_eq!(process("s").metered, 8);
        assert_eq!(sql_i64("SELECT count(*) FROM meter.usage"), 0);
        assert_eq!(value_of("u", "calls").as_deref(), Some("36"));
        assert_eq!(
            sql_text("SELECT string_agg(record_id, ',' ORDER BY batch_id, position) FROM meter.usage_audit").as_deref(),
            Some("r1,r2,r3,r4,r5,r6,r7,r8")
        );
        // A batch's records share their inbox row's id.
        assert_eq!(
            sql_text(
                "SELECT string_agg(n::text, ',' ORDER BY first) FROM (
                   SELECT usage_id, count(*) AS n, min(batch_id * 1000000 + position) AS first
                     FROM meter.usage_audit GROUP BY usage_id) u"
            )
            .as_deref(),
            Some("5,1,2")
        );
    }

    #[pg_test]
    fn large_or_partly_rejected_calls_queue_rows_of_at_most_a_thousand() {
        dedupe_stream();
        let records: Vec<_> = (1..=2500)
            .map(|i| match i {
                1200 => json!({"value": i}),
                _ => json!({"userId": format!("u{}", i % 3), "value": 1}),
            })
            .collect();
        assert_eq!(ingest("s", json!(records)), (2499, 0, 1));
        assert_eq!(
            sql_text("SELECT string_agg(records::text, ',' ORDER BY id) FROM meter.usage").as_deref(),
            Some("1000,999,500")
        );
        assert_eq!(
            sql_text("SELECT code FROM meter.rejected").as_deref(),
            Some("missing_user_id")
        );
        let partly = json!([{"userId": "u0", "value": 1}, {"value": 1}, {"userId": "u1", "value": 1}]);
        assert_eq!(ingest("s", partly), (2, 0, 1));
        assert_eq!(sql_i64("SELECT records FROM meter.usage ORDER BY id DESC LIMIT 1"), 2);
        assert_eq!(process("s").metered, 2501);
        assert_eq!(sql_i64("SELECT sum(value)::bigint FROM meter.meters"), 2501);
    }

    #[pg_test]
    fn a_plain_insert_of_an_array_is_a_batch_of_records() {
        dedupe_stream();
        run(r#"INSERT INTO meter.usage (stream, record)
               VALUES ('s', '[{"userId": "u", "value": 1}, 5, {"userId": "u", "value": 2}]'), ('s', '[]')"#);
        assert_eq!(sql_i64("SELECT pending FROM meter.stream_status"), 3);
        let counts = process("s");
        assert_eq!((counts.metered, counts.rejected), (2, 1));
        assert_eq!(value_of("u", "calls").as_deref(), Some("3"));
        assert_eq!(
            sql_text("SELECT code || ' ' || record::text FROM meter.rejected").as_deref(),
            Some("not_an_object 5")
        );
        assert_eq!(sql_i64("SELECT count(*) FROM meter.usage"), 0);
    }

    #[pg_test]
    fn a_realtime_stream_meters_in_the_ingesting_transaction() {
        dedupe_stream();
        run("SELECT meter.alter_stream('s', mode => 'realtime')");
        assert_eq!(
            ingest(
                "s",
                json!([{"userId": "u", "id": 1, "value": 2}, {"userId": "u", "id": 1, "value": 2}])
            ),
            (1, 1, 0)
        );
        assert_eq!(value_of("u", "calls").as_deref(), Some("2"));
        assert_eq!(sql_i64("SELECT count(*) FROM meter.usage"), 0);
    }

    fn everything() -> serde_json::Value {
        snapshot(
            "SELECT 'meters' AS t, to_jsonb(m) AS row FROM meter.meters m
             UNION ALL SELECT 'usage', to_jsonb(u) FROM meter.usage u
             UNION ALL SELECT 'rejected', to_jsonb(r) FROM meter.rejected r
             UNION ALL SELECT 'audit', to_jsonb(a) FROM meter.usage_audit a
             UNION ALL SELECT 'dedupe', to_jsonb(d) FROM meter.dedupe_keys d
             UNION ALL SELECT 'distinct', to_jsonb(x) FROM meter.meter_distinct x",
        )
    }

    #[pg_test]
    fn preview_matches_processing_and_changes_nothing() {
        eu_and_all(false);
        run("SELECT meter.create_meter_type('devices', 'unique_count')");
        run(r#"SELECT meter.alter_stream('api', guiding_rules => '[
                 {"name": "devices", "meter_type": "devices", "conditions": [{"field": "device", "op": "exists"}]},
                 {"name": "eu", "meter_type": "eu-calls", "conditions": [{"field": "region", "op": "in", "value": ["eu", "uk"]}]},
                 {"name": "all", "meter_type": "all-calls"}]')"#);
        run("SELECT meter.create_meter('api', 'all-calls', 'acme')");
        run("SELECT meter.create_meter('api', 'eu-calls', 'acme')");
        run("SELECT meter.create_meter('api', 'devices', 'acme')");
        // Some history: an id already metered, a device already seen.
        ingest(
            "api",
            json!([{"userId": "acme", "id": "seen", "value": 1}, {"userId": "acme", "device": "d1", "value": "d1"}]),
        );
        process("api");
        let records = json!([
            {"userId": "acme", "region": "eu", "value": 5},
            {"userId": "acme", "region": "us", "value": "2.50"},
            {"userId": "acme", "id": "seen", "value": 1},
            {"userId": "acme", "id": "twice", "value": 1},
            {"userId": "acme", "id": "twice", "value": 1},
            {"userId": "acme", "device": "x", "value": "d1"},
            {"userId": "acme", "device": "x", "value": "d2"},
            {"userId": "acme", "device": "x", "value": "d2"},
            {"userId": "zed", "value": 1},
            {"value": 1},
            "junk"
        ]);
        let before = everything();
        let preview = rows(&format!(
            "SELECT n, outcome, rule, meter_id, value FROM meter.preview('api', '{}') ORDER BY n",
            records.to_string().replace('\'', "''")
        ));
        assert_eq!(everything(), before, "preview changed nothing");

        ingest("api", records.clone());
        process("api");
        // What processing did, per record, in the same shape: audit rows for
        // metered records, the dedupe count for duplicates, rejected rows.
        let outcomes: Vec<(String, Option<String>, Option<String>)> = preview
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r["outcome"].as_str().unwrap().to_string(),
                    r["rule"].as_str().map(str::to_string),
                    r["value"].as_f64().map(|v| v.to_string()),
                )
            })
            .collect();
        assert_eq!(
            outcomes,
            vec![
                ("metered".into(), Some("eu".into()), Some("5".into())),
                ("metered".into(), Some("all".into()), Some("2.5".into())),
                ("duplicate".into(), Some("all".into()), None),
                ("metered".into(), Some("all".into()), Some("1".into())),
                ("duplicate".into(), Some("all".into()), None),
                ("metered".into(), Some("devices".into()), Some("0".into())), // d1 was seen
                ("metered".into(), Some("devices".into()), Some("1".into())),
                ("metered".into(), Some("devices".into()), Some("0".into())),
                ("rejected".into(), Some("all".into()), None),
                ("rejected".into(), None, None),
                ("rejected".into(), None, None),
            ]
        );
        let applied = snapshot(
            "SELECT rule, value FROM meter.usage_audit WHERE session_id = (SELECT max(id) FROM meter.sessions)",
        );
        let expected: Vec<serde_json::Value> = preview
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["outcome"] == "metered")
            .map(|r| json!({"rule": r["rule"], "value": r["value"]}))
            .collect();
        let mut applied: Vec<serde_json::Value> = applied.as_array().unwrap().clone();
        let mut expected_sorted = expected.clone();
        applied.sort_by_key(|v| v.to_string());
        expected_sorted.sort_by_key(|v| v.to_string());
        assert_eq!(applied, expected_sorted);
        assert_eq!(value_of("acme", "all-calls").as_deref(), Some("4.50")); // 1 + 2.50 + 1
        assert_eq!(value_of("acme", "devices").as_deref(), Some("2"));
        assert_eq!(sql_i64("SELECT count(*) FROM meter.rejected"), 3);
    }
}
