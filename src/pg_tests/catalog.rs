//! Meter types, meters, meter records and privileges.

use pgrx::prelude::*;

#[pg_schema]
mod tests {
    use crate::pg_tests::support::*;
    use pgrx::prelude::*;

    fn setup_meter() -> i64 {
        Spi::run("SELECT meter.create_meter_type('api-calls', 'sum', '@monthly', 'Europe/Stockholm', unit => 'calls')")
            .unwrap();
        Spi::run("SELECT meter.create_stream('api')").unwrap();
        sql_i64("SELECT meter.create_meter('api', 'api-calls', 'customer-1')")
    }

    // ---- meter types: validation ------------------------------------------------

    #[pg_test(
        error = "aggregation \"avg\" is not supported: use one of sum, increment, min, max, latest, unique_count"
    )]
    fn unknown_aggregation_is_refused() {
        Spi::run("SELECT meter.create_meter_type('t', aggregation => 'avg')").unwrap();
    }

    #[pg_test(
        error = "reset_schedule \"@fortnightly\" is not a known preset: use one of @hourly, @daily, @weekly, @monthly, @yearly, @never"
    )]
    fn unknown_preset_is_refused() {
        Spi::run("SELECT meter.create_meter_type('t', reset_schedule => '@fortnightly')").unwrap();
    }

    #[pg_test(
        error = "reset_schedule \"0 0 * *\" has 4 fields: a cron expression has exactly 5 (minute hour day month weekday)"
    )]
    fn short_cron_is_refused() {
        Spi::run("SELECT meter.create_meter_type('t', reset_schedule => '0 0 * *')").unwrap();
    }

    #[pg_test(error = "reset_schedule \"0 0 30 2 *\" never fires: no date matches it")]
    fn impossible_cron_is_refused() {
        Spi::run("SELECT meter.create_meter_type('t', reset_schedule => '0 0 30 2 *')").unwrap();
    }

    #[pg_test]
    fn malformed_cron_names_the_field() {
        let (code, message) =
            sql_error("SELECT meter.create_meter_type('t', reset_schedule => '61 * * * *')").expect("an error");
        assert_eq!(code, PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE);
        assert!(
            message.starts_with("reset_schedule \"61 * * * *\" is not a valid cron expression"),
            "{message}"
        );
    }

    #[pg_test(
        error = "timezone \"Mars/Olympus\" is not a known IANA timezone (for example Europe/Stockholm, America/New_York, UTC)"
    )]
    fn unknown_timezone_is_refused() {
        Spi::run("SELECT meter.create_meter_type('t', timezone => 'Mars/Olympus')").unwrap();
    }

    #[pg_test(error = "active_to (2026-01-01T00:00:00Z) must be later than active_from (2026-02-01T00:00:00Z)")]
    fn inverted_active_window_is_refused() {
        Spi::run("SELECT meter.create_meter_type('t', active_from => '2026-02-01Z', active_to => '2026-01-01Z')")
            .unwrap();
    }

    #[pg_test(error = "meter type \"api-calls\" already exists")]
    fn duplicate_meter_type_is_refused() {
        Spi::run("SELECT meter.create_meter_type('api-calls')").unwrap();
        Spi::run("SELECT meter.create_meter_type('api-calls')").unwrap();
    }

    #[pg_test(error = "name must not be empty")]
    fn empty_name_is_refused() {
        Spi::run("SELECT meter.create_meter_type('  ')").unwrap();
    }

    #[pg_test]
    fn meter_type_defaults_and_normalisation() {
        Spi::run("SELECT meter.create_meter_type('storage', aggregation => 'MAX')").unwrap();
        let row = sql_text(
            "SELECT concat_ws('|', unit, aggregation, reset_schedule, timezone, coalesce(active_from::text, '-'), category)
               FROM meter.meter_types WHERE name = 'storage'",
        );
        assert_eq!(row.as_deref(), Some("unit|max|@monthly|UTC|-|DEFAULT"));
    }

    #[pg_test]
    fn alter_meter_type_changes_only_what_is_given() {
        Spi::run("SELECT meter.create_meter_type('api-calls', 'sum', '@daily', 'Europe/Stockholm', unit => 'calls', active_to => '2030-01-01Z')").unwrap();
        Spi::run("SELECT meter.alter_meter_type('api-calls', unit => 'requests', reset_schedule => '0 6 * * *')")
            .unwrap();
        let row = sql_text(
            "SELECT concat_ws('|', name, unit, aggregation, reset_schedule, timezone, active_to IS NOT NULL)
               FROM meter.meter_types WHERE name = 'api-calls'",
        );
        assert_eq!(
            row.as_deref(),
            Some("api-calls|requests|sum|0 6 * * *|Europe/Stockholm|t")
        );
        // 'infinity' clears the bound.
        Spi::run("SELECT meter.alter_meter_type('api-calls', new_name => 'requests', active_to => 'infinity')")
            .unwrap();
        assert_eq!(
            sql_text("SELECT concat_ws('|', name, active_to IS NULL) FROM meter.meter_types").as_deref(),
            Some("requests|t")
        );
    }

    #[pg_test(
        error = "timezone \"Nowhere\" is not a known IANA timezone (for example Europe/Stockholm, America/New_York, UTC)"
    )]
    fn alter_meter_type_validates() {
        Spi::run("SELECT meter.create_meter_type('api-calls')").unwrap();
        Spi::run("SELECT meter.alter_meter_type('api-calls', timezone => 'Nowhere')").unwrap();
    }

    #[pg_test(error = "meter type \"ghost\" does not exist")]
    fn alter_unknown_meter_type() {
        Spi::run("SELECT meter.alter_meter_type('ghost', unit => 'x')").unwrap();
    }

    #[pg_test(error = "meter type \"api-calls\" has 1 meter(s): delete them first or pass cascade => true")]
    fn drop_meter_type_with_meters_needs_cascade() {
        setup_meter();
        Spi::run("SELECT meter.drop_meter_type('api-calls')").unwrap();
    }

    #[pg_test]
    fn drop_meter_type_cascade_removes_meters() {
        setup_meter();
        Spi::run("SELECT meter.drop_meter_type('api-calls', cascade => true)").unwrap();
        assert_eq!(sql_i64("SELECT count(*) FROM meter.meters"), 0);
        assert_eq!(sql_i64("SELECT count(*) FROM meter.meter_types"), 0);
    }

    // ---- meters ---------------------------------------------------------------------

    #[pg_test]
    fn a_new_meter_gets_its_first_period_from_the_type() {
        let id = setup_meter();
        let (start_is_now, end) = Spi::get_two_with_args::<bool, String>(
            "SELECT period_start = now(), (period_end AT TIME ZONE 'Europe/Stockholm')::text FROM meter.meters WHERE id = $1",
            &[id.into()],
        )
        .unwrap();
        assert_eq!(start_is_now, Some(true));
        // Midnight of the first of next month, Stockholm time.
        let expected =
            sql_text("SELECT (date_trunc('month', now() AT TIME ZONE 'Europe/Stockholm') + interval '1 month')::text");
        assert_eq!(end, expected);
        assert_eq!(sql_text("SELECT value::text FROM meter.meters").as_deref(), Some("0"));
    }

    #[pg_test]
    fn a_meter_of_a_future_type_starts_at_active_from() {
        Spi::run("SELECT meter.create_meter_type('peak', 'max', '@daily', 'America/New_York', active_from => '2100-03-14 09:30:00-04')").unwrap();
        Spi::run("SELECT meter.create_stream('s')").unwrap();
        let id = sql_i64("SELECT meter.create_meter('s', 'peak', 'u1')");
        let row = Spi::get_three_with_args::<String, String, bool>(
            "SELECT meter.iso_utc(period_start), meter.iso_utc(period_end), value IS NULL FROM meter.meters WHERE id = $1",
            &[id.into()],
        )
        .unwrap();
        assert_eq!(
            row,
            (
                Some("2100-03-14T13:30:00.000Z".into()),
                Some("2100-03-15T04:00:00.000Z".into()),
                Some(true)
            )
        );
    }

    #[pg_test(error = "user \"customer-1\" already has a meter of type \"api-calls\" in stream \"api\" (meter 1)")]
    fn duplicate_meter_is_refused() {
        Spi::run("ALTER TABLE meter.meters ALTER COLUMN id RESTART WITH 1").unwrap();
        setup_meter();
        Spi::run("SELECT meter.create_meter('api', 'api-calls', 'customer-1')").unwrap();
    }

    #[pg_test(error = "meter type \"old\" is no longer active: its active_to (2001-01-01T00:00:00Z) has passed")]
    fn meter_of_an_expired_type_is_refused() {
        Spi::run("SELECT meter.create_meter_type('old', active_to => '2001-01-01Z')").unwrap();
        Spi::run("SELECT meter.create_stream('s')").unwrap();
        Spi::run("SELECT meter.create_meter('s', 'old', 'u')").unwrap();
    }

    #[pg_test(error = "stream \"nope\" does not exist")]
    fn meter_in_unknown_stream_is_refused() {
        Spi::run("SELECT meter.create_meter_type('t')").unwrap();
        Spi::run("SELECT meter.create_meter('nope', 't', 'u')").unwrap();
    }

    #[pg_test]
    fn update_and_delete_meter() {
        let id = setup_meter();
        let record = sql_json(&format!("SELECT meter.update_meter({id}, delete_on_reset => true)"));
        assert_eq!(record["deleteOnReset"], serde_json::json!(true));
        Spi::run(&format!("SELECT meter.delete_meter({id})")).unwrap();
        assert_eq!(sql_i64("SELECT count(*) FROM meter.meters"), 0);
    }

    #[pg_test(error = "meter 424242 does not exist")]
    fn update_unknown_meter() {
        Spi::run("SELECT meter.update_meter(424242, true)").unwrap();
    }

    // ---- meter record ----------------------------------------------------------

    #[pg_test]
    fn meter_record_has_exactly_ues_fields() {
        let id = setup_meter();
        let record = sql_json(&format!("SELECT meter.meter_record({id})"));
        let mut keys: Vec<&str> = record.as_object().unwrap().keys().map(String::as_str).collect();
        keys.sort();
        let mut expected = vec![
            "id",
            "userId",
            "meterTypeId",
            "meterTypeName",
            "timezone",
            "meterKey",
            "value",
            "unit",
            "createdAt",
            "updatedAt",
            "periodStart",
            "periodEnd",
            "groups",
            "carryFirst",
            "carryLast",
            "deleteOnReset",
            "meterMetaData",
        ];
        expected.sort();
        assert_eq!(keys, expected);
        let type_id = sql_i64("SELECT id FROM meter.meter_types WHERE name = 'api-calls'");
        assert_eq!(record["id"], serde_json::json!(id));
        assert_eq!(record["userId"], "customer-1");
        assert_eq!(record["meterTypeId"], serde_json::json!(type_id));
        assert_eq!(record["meterTypeName"], "api-calls");
        assert_eq!(record["timezone"], "Europe/Stockholm");
        assert_eq!(record["meterKey"], "api");
        assert_eq!(record["value"], serde_json::json!(0));
        assert_eq!(record["unit"], "calls");
        assert_eq!(record["groups"], serde_json::json!([]));
        assert_eq!(record["carryFirst"], serde_json::json!({}));
        assert_eq!(record["carryLast"], serde_json::json!({}));
        assert_eq!(record["deleteOnReset"], serde_json::json!(false));
        assert_eq!(
            record["meterMetaData"],
            serde_json::json!({"firstMatchedAt": null, "lastMatchedAt": null, "recordCount": 0})
        );
        let period_end = sql_text(&format!(
            "SELECT meter.iso_utc(period_end) FROM meter.meters WHERE id = {id}"
        ))
        .unwrap();
        assert_eq!(record["periodEnd"], serde_json::json!(period_end));
        assert!(
            period_end.ends_with("T23:00:00.000Z") || period_end.ends_with("T22:00:00.000Z"),
            "{period_end}"
        );
        let inspector = sql_json(&format!("SELECT record FROM meter.inspector WHERE id = {id}"));
        assert_eq!(inspector, record);
    }

    #[pg_test]
    fn next_period_end_from_sql() {
        let end = sql_text(
            "SELECT meter.iso_utc(meter.next_period_end('@daily', 'Europe/Stockholm', '2026-03-29 00:00:00+01'))",
        );
        assert_eq!(end.as_deref(), Some("2026-03-29T22:00:00.000Z"));
        assert_eq!(
            sql_text("SELECT meter.next_period_end('@never', 'UTC', now())::text"),
            None
        );
    }

    // ---- privileges ---------------------------------------------------------------

    #[pg_test]
    fn meter_reader_cannot_write() {
        let id = setup_meter();
        let err = sql_error_as(
            "meter_reader",
            &format!("UPDATE meter.meters SET value = 1 WHERE id = {id}"),
        )
        .map(|e| e.1);
        assert_eq!(err.as_deref(), Some("permission denied for table meters"));
    }

    #[pg_test]
    fn meter_reader_cannot_configure() {
        let err = sql_error_as("meter_reader", "SELECT meter.create_meter_type('x')").map(|e| e.1);
        assert_eq!(err.as_deref(), Some("permission denied for function create_meter_type"));
    }

    #[pg_test]
    fn meter_reader_can_read() {
        let id = setup_meter();
        Spi::run("SET LOCAL ROLE meter_reader").unwrap();
        assert_eq!(sql_i64("SELECT count(*) FROM meter.inspector"), 1);
        assert!(sql_json(&format!("SELECT meter.meter_record({id})")).is_object());
        Spi::run("RESET ROLE").unwrap();
    }

    #[pg_test]
    fn public_gets_nothing() {
        let granted = sql_i64(
            "SELECT count(*) FROM information_schema.role_table_grants WHERE table_schema = 'meter' AND grantee = 'PUBLIC'",
        ) + sql_i64(
            "SELECT count(*) FROM pg_proc p, aclexplode(coalesce(p.proacl, acldefault('f', p.proowner))) a
              WHERE p.pronamespace = 'meter'::regnamespace AND a.grantee = 0",
        );
        assert_eq!(granted, 0);
    }

    #[pg_test]
    fn admin_can_configure() {
        Spi::run("SET LOCAL ROLE meter_admin").unwrap();
        Spi::run("SELECT meter.create_meter_type('by-admin')").unwrap();
        Spi::run("RESET ROLE").unwrap();
        assert_eq!(
            sql_i64("SELECT count(*) FROM meter.meter_types WHERE name = 'by-admin'"),
            1
        );
    }
}
