-- Privileges (SPEC §10): nothing to PUBLIC; readers select, writers ingest and run,
-- admins configure. Writing functions are SECURITY DEFINER with a pinned search_path.

-- The data in these tables is the user's: pg_dump dumps it (and each stream's
-- inbox partition, created after the extension, is dumped as a table of its own).
DO $dump$
DECLARE
    relation text;
BEGIN
    -- One statement per table: each call updates the extension's catalog row.
    FOR relation IN
        SELECT c.relname FROM pg_catalog.pg_class c
         WHERE c.relnamespace = 'meter'::regnamespace AND c.relkind IN ('r', 'p', 'S')
         ORDER BY c.relname
    LOOP
        PERFORM pg_catalog.pg_extension_config_dump(pg_catalog.format('meter.%I', relation)::regclass, '');
    END LOOP;
END
$dump$;

REVOKE ALL ON ALL TABLES IN SCHEMA meter FROM PUBLIC;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA meter FROM PUBLIC;
REVOKE EXECUTE ON ALL ROUTINES IN SCHEMA meter FROM PUBLIC;

GRANT USAGE ON SCHEMA meter TO meter_reader, meter_writer, meter_admin;

-- Readers: every table and view, and the functions that only read.
GRANT SELECT ON ALL TABLES IN SCHEMA meter TO meter_reader;
GRANT EXECUTE ON FUNCTION
    meter.iso_utc(timestamptz),
    meter.record_json(meter.meters, meter.meter_types, meter.streams),
    meter.meter_record(bigint),
    meter.next_period_end(text, text, timestamptz),
    meter.session_event_payload(meter.sessions, meter.streams, text),
    meter.audited_value(bigint),
    meter.verify_meters(text),
    meter.audit_of(text, text),
    meter.usage_report(text, timestamptz, timestamptz)
TO meter_reader;

-- Writers: send usage (by function, or plain INSERT / COPY into meter.usage),
-- preview it, fix and reprocess rejected records.
GRANT INSERT ON meter.usage TO meter_writer;
GRANT USAGE ON SEQUENCE meter.usage_id_seq TO meter_writer;
GRANT UPDATE (record) ON meter.rejected TO meter_writer;
GRANT EXECUTE ON FUNCTION
    meter.ingest,
    meter.preview,
    meter.reprocess_rejected,
    meter.run_stream,
    meter._run_begin,
    meter._run_step,
    meter._run_to_end,
    meter._run_fail,
    meter.pause,
    meter.resume,
    meter.cancel,
    meter.read_flushed,
    meter.ack_flushed,
    meter.stop,
    meter.scan_once,
    meter._scan_stream,
    meter._fold_session_counters
TO meter_writer;
GRANT EXECUTE ON PROCEDURE meter.execute_stream TO meter_writer;

-- Admins: configuration.
GRANT EXECUTE ON FUNCTION
    meter.create_meter_type,
    meter.alter_meter_type,
    meter.drop_meter_type,
    meter.create_stream,
    meter.alter_stream,
    meter.drop_stream,
    meter.create_meter,
    meter.update_meter,
    meter.delete_meter,
    meter.notify_on,
    meter.drop_notification_rule,
    meter.register_consumer,
    meter.unregister_consumer,
    meter.purge
TO meter_admin;
