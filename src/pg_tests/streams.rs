//! Streams and their guiding rules: creation, validation, changes.

use pgrx::prelude::*;

#[pg_schema]
mod tests {
    use crate::pg_tests::support::*;
    use pgrx::prelude::*;

    fn types() {
        run("SELECT meter.create_meter_type('api-calls', 'increment', '@monthly')");
        run("SELECT meter.create_meter_type('storage', 'max', '@daily')");
    }

    fn create(args: &str) -> String {
        error_message(&format!("SELECT meter.create_stream({args})"))
    }

    #[pg_test]
    fn a_stream_with_defaults() {
        types();
        run("SELECT meter.create_stream('api', '[{\"name\": \"all\", \"meter_type\": \"api-calls\"}]')");
        let row = sql_text(
            "SELECT concat_ws('|', meter_key, mode, flush_by, user_id_field, value_field, timestamp_field, id_field,
                              auto_create_meters, audit, jsonb_array_length(guiding_rules))
               FROM meter.streams WHERE name = 'api'",
        );
        assert_eq!(
            row.as_deref(),
            Some("api|batch|period_end|userId|value|timestamp|id|f|t|1")
        );
    }

    #[pg_test]
    fn stream_validation_errors_name_the_field() {
        types();
        assert_eq!(
            create("'rt', mode => 'realtime', flush_by => 'stream_execution'"),
            "flush_by \"stream_execution\" is not allowed for a realtime stream: a realtime stream flushes at period end"
        );
        assert_eq!(
            create("'s', mode => 'streaming'"),
            "mode \"streaming\" is not supported: use batch or realtime"
        );
        assert_eq!(
            create("'s', flush_by => 'daily'"),
            "flush_by \"daily\" is not supported: use period_end or stream_execution"
        );
        assert_eq!(
            create("'s', user_id_field => 'account..id'"),
            "user_id_field: field path \"account..id\" has an empty segment"
        );
        assert_eq!(create("''"), "name must not be empty");
        run("SELECT meter.create_stream('taken')");
        assert_eq!(create("'taken'"), "stream \"taken\" already exists");
        assert_eq!(
            create("'other', meter_key => 'taken'"),
            "meter_key \"taken\" is already used by stream \"taken\""
        );
    }

    #[pg_test]
    fn rule_validation_errors_name_the_rule_and_key() {
        types();
        let cases = [
            (r#"{"name": "all"}"#, "guiding_rules: must be a JSON array of rules"),
            (
                r#"[{"name": "a", "meter_type": "api-calls", "groupBy": ["region"]}]"#,
                "guiding_rules: rule #1 \"a\": unknown key \"groupBy\" (known keys: name, conditions, relation, meter_type, group_by, carry_first, carry_last)",
            ),
            (
                r#"[{"name": "a", "meter_type": "bandwidth"}]"#,
                "guiding_rules: rule #1 \"a\": key \"meter_type\": meter type \"bandwidth\" does not exist",
            ),
            (
                r#"[{"name": "a", "meter_type": "api-calls", "conditions": [{"field": "x", "op": "regex", "value": "."}]}]"#,
                "guiding_rules: rule #1 \"a\": condition #1: unknown op \"regex\" (use one of eq, ne, in, exists, prefix)",
            ),
            (
                r#"[{"name": "a", "meter_type": "api-calls"}, {"name": "a", "meter_type": "storage"}]"#,
                "guiding_rules: rule #2 \"a\": duplicate rule name: names must be unique within a stream",
            ),
        ];
        for (rules, expected) in cases {
            assert_eq!(create(&format!("'s', guiding_rules => '{rules}'")), expected);
        }
        let many: Vec<String> = (0..101)
            .map(|i| format!(r#"{{"name": "r{i}", "meter_type": "storage"}}"#))
            .collect();
        assert_eq!(
            create(&format!("'s', guiding_rules => '[{}]'", many.join(","))),
            "guiding_rules: has 101 rules; a stream has at most 100"
        );
        let (code, _) = sql_error("SELECT meter.create_stream('s', guiding_rules => '[1]')").unwrap();
        assert_eq!(code, PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE);
    }

    #[pg_test]
    fn alter_stream_changes_what_is_given_and_validates() {
        types();
        run("SELECT meter.create_stream('api', '[{\"name\": \"all\", \"meter_type\": \"api-calls\"}]', auto_create_meters => true)");
        run("SELECT meter.alter_stream('api', flush_by => 'stream_execution', audit => false)");
        assert_eq!(
            sql_text("SELECT concat_ws('|', flush_by, audit, auto_create_meters, guiding_rules->0->>'name') FROM meter.streams").as_deref(),
            Some("stream_execution|f|t|all")
        );
        assert_eq!(
            error_message("SELECT meter.alter_stream('api', mode => 'realtime')"),
            "flush_by \"stream_execution\" is not allowed for a realtime stream: a realtime stream flushes at period end"
        );
        assert_eq!(
            error_message(
                "SELECT meter.alter_stream('api', guiding_rules => '[{\"name\": \"x\", \"meter_type\": \"nope\"}]')"
            ),
            "guiding_rules: rule #1 \"x\": key \"meter_type\": meter type \"nope\" does not exist"
        );
        assert_eq!(
            error_message("SELECT meter.alter_stream('ghost', audit => true)"),
            "stream \"ghost\" does not exist"
        );
    }

    #[pg_test]
    fn a_meter_type_named_by_rules_cannot_be_dropped() {
        types();
        run("SELECT meter.create_stream('api', '[{\"name\": \"all\", \"meter_type\": \"api-calls\"}]')");
        assert_eq!(
            error_message("SELECT meter.drop_meter_type('api-calls', cascade => true)"),
            "meter type \"api-calls\" is used by the guiding rules of stream \"api\": change those rules first"
        );
        run("SELECT meter.drop_meter_type('storage')");
    }

    #[pg_test]
    fn drop_stream_needs_cascade_when_it_has_meters_or_pending_records() {
        types();
        run("SELECT meter.create_stream('api', '[{\"name\": \"all\", \"meter_type\": \"api-calls\"}]')");
        run("SELECT meter.create_meter('api', 'api-calls', 'u1')");
        run("INSERT INTO meter.usage (stream, record) VALUES ('api', '{\"userId\": \"u1\"}')");
        assert_eq!(
            error_message("SELECT meter.drop_stream('api')"),
            "stream \"api\" has 1 meter(s) and 1 pending record(s): pass cascade => true to drop them too"
        );
        run("SELECT meter.drop_stream('api', cascade => true)");
        assert_eq!(
            sql_i64("SELECT (SELECT count(*) FROM meter.meters) + (SELECT count(*) FROM meter.usage)"),
            0
        );
    }

    #[pg_test]
    fn plain_insert_into_an_unknown_stream_is_refused() {
        let (code, message) =
            sql_error("INSERT INTO meter.usage (stream, record) VALUES ('nope', '{\"userId\": \"u\"}')").unwrap();
        assert_eq!(code, PgSqlErrorCode::ERRCODE_CHECK_VIOLATION);
        assert_eq!(message, "no partition of relation \"usage\" found for row");
    }
}
