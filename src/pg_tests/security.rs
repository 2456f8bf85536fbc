//! Privileges and search_path safety (SPEC §10): what each role may do, and that a
//! hostile search_path cannot reach into meter_ext's own queries.

use pgrx::prelude::*;

#[pg_schema]
mod tests {
    use crate::pg_tests::support::*;
    use pgrx::prelude::*;

    fn batch_stream() {
        run("SELECT meter.create_meter_type('calls', 'sum', '@monthly', 'Europe/Paris')");
        run(
            r#"SELECT meter.create_stream('gw', '[{"name": "all", "meter_type": "calls"}]', auto_create_meters => true)"#,
        );
    }

    fn denied(role: &str, statement: &str) -> String {
        match sql_error_as(role, statement) {
            Some((code, message)) => {
                assert_eq!(
                    code,
                    PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
                    "{statement}: {message}"
                );
                message
            }
            None => panic!("{role} could run: {statement}"),
        }
    }

    #[pg_test]
    fn meter_reader_cannot_send_usage_or_run_streams() {
        batch_stream();
        for (statement, message) in [
            (
                r#"SELECT meter.ingest('gw', '{"userId": "u", "value": 1}')"#,
                "permission denied for function ingest",
            ),
            (
                r#"INSERT INTO meter.usage (stream, record) VALUES ('gw', '{"userId": "u"}')"#,
                "permission denied for table usage",
            ),
            (
                "SELECT meter.run_stream('gw')",
                "permission denied for function run_stream",
            ),
            (
                "CALL meter.execute_stream('gw')",
                "permission denied for procedure execute_stream",
            ),
            ("SELECT meter.scan_once()", "permission denied for function scan_once"),
            (
                "SELECT meter.ack_flushed('c', 1)",
                "permission denied for function ack_flushed",
            ),
        ] {
            assert_eq!(denied("meter_reader", statement), message);
        }
    }

    #[pg_test]
    fn meter_writer_sends_and_runs_but_cannot_configure() {
        batch_stream();
        run("SET LOCAL ROLE meter_writer");
        run(r#"SELECT meter.ingest('gw', '{"userId": "u", "value": 2}')"#);
        run("SELECT meter.run_stream('gw')");
        run("RESET ROLE");
        assert_eq!(sql_text("SELECT value::text FROM meter.meters").as_deref(), Some("2"));
        for (statement, message) in [
            (
                "SELECT meter.create_meter_type('x')",
                "permission denied for function create_meter_type",
            ),
            (
                "SELECT meter.alter_stream('gw', audit => false)",
                "permission denied for function alter_stream",
            ),
            (
                "SELECT meter.drop_stream('gw')",
                "permission denied for function drop_stream",
            ),
            (
                "SELECT meter.register_consumer('billing', 'gw')",
                "permission denied for function register_consumer",
            ),
            (
                "SELECT meter.purge(interval '1 day')",
                "permission denied for function purge",
            ),
            (
                "UPDATE meter.meters SET value = 0",
                "permission denied for table meters",
            ),
            (
                "UPDATE meter.streams SET audit = false",
                "permission denied for table streams",
            ),
            ("DELETE FROM meter.flushed", "permission denied for table flushed"),
        ] {
            assert_eq!(denied("meter_writer", statement), message);
        }
    }

    #[pg_test]
    fn every_security_definer_function_pins_its_search_path() {
        let definers = sql_i64("SELECT count(*) FROM pg_proc WHERE pronamespace = 'meter'::regnamespace AND prosecdef");
        assert!(
            definers >= 20,
            "only {definers} SECURITY DEFINER functions: the test would prove little"
        );
        let unpinned = sql_text(
            "SELECT string_agg(proname, ', ') FROM pg_proc
              WHERE pronamespace = 'meter'::regnamespace AND prosecdef
                AND NOT coalesce(proconfig @> ARRAY['search_path=pg_catalog, pg_temp'], false)",
        );
        assert_eq!(unpinned, None, "SECURITY DEFINER without a pinned search_path");
    }

    /// Lookalikes of functions and operators meter_ext's queries use, put first on
    /// the search_path: any of them being called raises, so a run that completes
    /// with the right values never resolved a name through the caller's path.
    #[pg_test]
    fn a_hostile_search_path_changes_nothing() {
        batch_stream();
        run("CREATE SCHEMA hostile");
        run("CREATE FUNCTION hostile.hijacked() RETURNS void LANGUAGE plpgsql AS $$BEGIN RAISE EXCEPTION 'hijacked'; END$$");
        for signature in [
            "now() RETURNS timestamptz",
            "clock_timestamp() RETURNS timestamptz",
            "format(text, VARIADIC text[]) RETURNS text",
            "jsonb_array_elements(jsonb) RETURNS SETOF jsonb",
            "jsonb_build_object(VARIADIC text[]) RETURNS jsonb",
            "to_jsonb(anyelement) RETURNS jsonb",
            "unnest(anyarray) RETURNS SETOF anyelement",
            "lower(text) RETURNS text",
            "pg_notify(text, text) RETURNS void",
            "pg_advisory_xact_lock(bigint) RETURNS void",
            "meter_record(bigint) RETURNS jsonb",
            "iso_utc(timestamptz) RETURNS text",
            "ingest(text, jsonb) RETURNS void",
            "next_period_end(text, text, timestamptz) RETURNS timestamptz",
        ] {
            let body = if signature.contains("SETOF") || signature.ends_with("void") {
                "BEGIN PERFORM hostile.hijacked(); END"
            } else {
                "BEGIN PERFORM hostile.hijacked(); RETURN NULL; END"
            };
            run(&format!(
                "CREATE FUNCTION hostile.{signature} LANGUAGE plpgsql AS $$ {body} $$"
            ));
        }
        run(
            "CREATE FUNCTION hostile.text_eq(text, text) RETURNS boolean LANGUAGE plpgsql AS
             $$BEGIN PERFORM hostile.hijacked(); RETURN false; END$$",
        );
        run("CREATE OPERATOR hostile.= (LEFTARG = text, RIGHTARG = text, FUNCTION = hostile.text_eq)");
        run(
            "CREATE FUNCTION hostile.numeric_add(numeric, numeric) RETURNS numeric LANGUAGE plpgsql AS
             $$BEGIN PERFORM hostile.hijacked(); RETURN 0; END$$",
        );
        run("CREATE OPERATOR hostile.+ (LEFTARG = numeric, RIGHTARG = numeric, FUNCTION = hostile.numeric_add)");
        run("GRANT USAGE ON SCHEMA hostile TO PUBLIC");

        // The lookalikes work where they are meant to be reached...
        assert!(sql_error("SET LOCAL search_path = hostile, pg_catalog; SELECT 'a'::text = 'a'::text").is_some());
        // ...and nowhere inside meter_ext, as a writer or as the owner.
        run("SET LOCAL search_path = hostile, pg_catalog, meter, public");
        run("SET LOCAL ROLE meter_writer");
        run(
            r#"SELECT meter.ingest('gw', '[{"userId": "acme", "value": 2, "id": "a"}, {"userId": "acme", "value": "0.5"}]')"#,
        );
        run("SELECT meter.run_stream('gw')");
        run("RESET ROLE");
        run("SET LOCAL search_path = hostile, pg_catalog, meter, public");
        let id = sql_i64("SELECT id FROM meter.meters");
        assert_eq!(sql_text("SELECT value::text FROM meter.meters").as_deref(), Some("2.5"));
        assert_eq!(
            sql_json(&format!("SELECT meter.meter_record({id})"))["value"].to_string(),
            "2.5"
        );
        assert_eq!(sql_i64("SELECT count(*) FROM meter.inspector"), 1);
        assert_eq!(
            sql_i64("SELECT count(*) FROM meter.verify_meters('gw') WHERE matches"),
            1
        );
        assert_eq!(sql_i64("SELECT count(*) FROM meter.audit_of('gw', 'a')"), 1);
        assert!(sql_text("SELECT meter.next_period_end('@daily', 'UTC', '2026-01-01')::text").is_some());
        run("RESET search_path");
    }
}
