-- The two ways to run a stream (SPEC §6); both are what pg_cron calls.

-- Atomic, in the caller's transaction: if it fails, nothing changed and no
-- session is left behind. Its status events are delivered when the caller commits.
CREATE FUNCTION meter.run_stream(stream text, run_type text DEFAULT 'NORMAL', wait boolean DEFAULT false)
RETURNS meter.sessions
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    session_id bigint;
    result meter.sessions;
BEGIN
    session_id := meter._run_begin(stream, run_type, wait, false);
    PERFORM meter._run_to_end(session_id);
    SELECT * INTO result FROM meter.sessions WHERE id = session_id;
    RETURN result;
END
$$;

-- In chunks of meter_ext.chunk_size, committing after each: listeners see every
-- status change live, progress shows in meter.session_progress, and pause/cancel
-- from another connection take effect at the next chunk. Must be CALLed outside
-- an explicit transaction block. A failure marks the session FAILED, then raises.
-- (No SET clause: a procedure with one cannot commit; every name is qualified.)
CREATE PROCEDURE meter.execute_stream(stream text, run_type text DEFAULT 'NORMAL', wait boolean DEFAULT false)
LANGUAGE plpgsql
AS $$
DECLARE
    session_id bigint;
    step text;
    failure text;
    failure_state text;
BEGIN
    session_id := meter._run_begin(stream, run_type, wait, true);
    COMMIT;
    LOOP
        BEGIN
            step := meter._run_step(session_id);
        EXCEPTION WHEN OTHERS OR query_canceled THEN
            GET STACKED DIAGNOSTICS failure = MESSAGE_TEXT, failure_state = RETURNED_SQLSTATE;
        END;
        IF failure IS NOT NULL THEN
            PERFORM meter._run_fail(session_id, failure);
            COMMIT;
            RAISE EXCEPTION 'stream run failed (session %): %', session_id, failure USING ERRCODE = failure_state;
        END IF;
        COMMIT;
        EXIT WHEN step = 'done';
    END LOOP;
END
$$;
