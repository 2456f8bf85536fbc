-- The period-end scan of realtime streams (SPEC §9). The background worker calls
-- it every meter_ext.scan_interval; without the worker, pg_cron can.

CREATE FUNCTION meter.scan_once()
RETURNS TABLE (stream text, flushed bigint, metered bigint, error text)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    s record;
    r record;
BEGIN
    FOR s IN SELECT st.id, st.name FROM meter.streams st WHERE st.mode = 'realtime' ORDER BY st.id LOOP
        -- One stream's failure is reported and does not stop the others.
        BEGIN
            SELECT * INTO r FROM meter._scan_stream(s.id);
            stream := s.name; flushed := r.flushed; metered := r.metered; error := NULL;
        EXCEPTION WHEN OTHERS THEN
            stream := s.name; flushed := 0; metered := 0; error := SQLERRM;
            RAISE WARNING 'meter_ext: scan of stream "%" failed: %', s.name, SQLERRM;
        END;
        RETURN NEXT;
    END LOOP;
    PERFORM meter._fold_session_counters();
END
$$;
COMMENT ON FUNCTION meter.scan_once() IS
    'Flushes realtime streams'' meters whose period ended, and meters what waited while they were paused.';

-- Said once, when the extension is created: without preloading there is no worker.
DO $$
BEGIN
    IF NOT 'meter_ext' = ANY (pg_catalog.string_to_array(
               pg_catalog.replace(pg_catalog.current_setting('shared_preload_libraries'), ' ', ''), ',')) THEN
        RAISE NOTICE 'meter_ext is not in shared_preload_libraries: realtime streams are not scanned automatically'
            USING HINT = 'Schedule SELECT meter.scan_once() with pg_cron, or preload meter_ext to get its background worker.';
    END IF;
END
$$;
