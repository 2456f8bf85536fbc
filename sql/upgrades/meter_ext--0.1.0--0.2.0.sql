-- meter_ext 0.1.0 -> 0.2.0 (ALTER EXTENSION meter_ext UPDATE). What changed:
--   * meter.usage_report(stream, from_time, to_time): period-by-period totals.
--   * meter_ext.notify_queue_limit (a setting, no schema).
--   * meters_due also indexes the meter id: flushes take due meters in (period_end, id) order.
--   * meter.usage rows may hold a batch (an array of records): meter.ingest queues
--     each call as one row; the generated column `records` counts a row's records,
--     and the record column is lz4-compressed. Pending counts sum it.
--   * meter.sessions.last_flush_id: the newest flushId of a run's records, which
--     settles a session waiting for its consumers.
--   * meter.dedupe_ranges: record ids a batch run claimed together, a row per run
--     of ordered ids; meter.audit_of finds a record through either table, and the
--     view meter.metered_ids lists the ids of both.
-- tests/integration/upgrade.rs checks that an updated database has exactly the
-- schema of a fresh 0.2.0 install.
\echo Use "ALTER EXTENSION meter_ext UPDATE TO '0.2.0'" to load this file. \quit

-- Before the views over meter.sessions are made again below.
ALTER TABLE meter.sessions ADD COLUMN last_flush_id bigint;

DROP INDEX meter.meters_due;
CREATE INDEX meters_due ON meter.meters (stream_id, period_end, id) WHERE closed_at IS NULL;

CREATE FUNCTION meter.usage_report(
    stream    text,
    from_time timestamptz DEFAULT '-infinity',
    to_time   timestamptz DEFAULT 'infinity'
) RETURNS TABLE (period_start timestamptz, period_end timestamptz, user_id text, meter_type text, unit text,
                 value numeric, records bigint, state text)
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
BEGIN
    IF NOT EXISTS (SELECT FROM meter.streams s WHERE s.name = usage_report.stream) THEN
        RAISE EXCEPTION 'stream "%" does not exist', usage_report.stream USING ERRCODE = 'undefined_object';
    END IF;
    RETURN QUERY
    SELECT r.period_start, r.period_end, r.user_id, r.meter_type, r.unit, r.value, r.records, r.state
      FROM (SELECT (f.record ->> 'periodStart')::timestamptz AS period_start,
                   (f.record ->> 'periodEnd')::timestamptz AS period_end,
                   f.user_id,
                   f.record ->> 'meterTypeName' AS meter_type,
                   f.record ->> 'unit' AS unit,
                   (f.record ->> 'value')::numeric AS value,
                   (f.record #>> '{meterMetaData,recordCount}')::bigint AS records,
                   'flushed' AS state
              FROM meter.flushed f
              JOIN meter.streams s ON s.id = f.stream_id
             WHERE s.name = usage_report.stream
            UNION ALL
            SELECT m.period_start, m.period_end, m.user_id, t.name, m.unit, m.value, m.record_count, 'open'
              FROM meter.meters m
              JOIN meter.meter_types t ON t.id = m.meter_type_id
              JOIN meter.streams s ON s.id = m.stream_id
             WHERE s.name = usage_report.stream AND m.closed_at IS NULL) r
     WHERE r.period_start < usage_report.to_time
       AND coalesce(r.period_end, 'infinity'::timestamptz) > usage_report.from_time
     ORDER BY r.period_start, r.user_id, r.meter_type, r.period_end;
END
$$;
COMMENT ON FUNCTION meter.usage_report(text, timestamptz, timestamptz) IS
    'Totals per period, user and meter type of a stream: flushed periods (from the outbox) and open ones.';
REVOKE EXECUTE ON FUNCTION meter.usage_report(text, timestamptz, timestamptz) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION meter.usage_report(text, timestamptz, timestamptz) TO meter_reader;

-- Inbox rows holding a batch of records (see sql/usage.sql).
ALTER TABLE meter.usage ADD COLUMN records integer NOT NULL GENERATED ALWAYS AS (
    CASE WHEN jsonb_typeof(record) = 'array' THEN jsonb_array_length(record) ELSE 1 END) STORED;
-- SET COMPRESSION does not recurse: the streams' partitions are set one by one,
-- as new ones are made (LIKE meter.usage INCLUDING COMPRESSION).
DO $$
DECLARE
    inbox regclass;
BEGIN
    ALTER TABLE meter.usage ALTER COLUMN record SET COMPRESSION lz4;
    FOR inbox IN SELECT inhrelid::regclass FROM pg_catalog.pg_inherits WHERE inhparent = 'meter.usage'::regclass LOOP
        EXECUTE pg_catalog.format('ALTER TABLE %s ALTER COLUMN record SET COMPRESSION lz4', inbox);
    END LOOP;
EXCEPTION WHEN feature_not_supported THEN
    NULL;  -- a server built without lz4 keeps pglz
END
$$;
COMMENT ON TABLE meter.usage IS
    'Pending usage records per stream: a record (object) or a batch (array of objects) per row. INSERT/COPY (stream, record) works as well as meter.ingest.';

-- Pending counts are records, not inbox rows.
CREATE OR REPLACE VIEW meter.stream_status AS
SELECT st.id AS stream_id,
       st.name AS stream,
       st.mode,
       coalesce(last.status, 'NEVER_RUN') AS status,
       last.id AS session_id,
       last.run_type,
       last.started_at,
       last.ended_at,
       (SELECT coalesce(sum(u.records), 0) FROM meter.usage u WHERE u.stream = st.name) AS pending
  FROM meter.streams st
  LEFT JOIN LATERAL (
       SELECT s.* FROM meter.sessions s WHERE s.stream_id = st.id ORDER BY s.id DESC LIMIT 1) last ON true;

CREATE OR REPLACE VIEW meter.session_progress AS
SELECT s.id AS session_id,
       st.name AS stream,
       s.run_type,
       s.status,
       s.records_processed + c.processed AS done,
       p.pending,
       CASE WHEN s.records_processed + c.processed + p.pending = 0 THEN 100.0
            ELSE round(100.0 * (s.records_processed + c.processed)
                       / (s.records_processed + c.processed + p.pending), 1) END AS percent,
       s.records_metered + c.metered AS metered,
       s.records_duplicate + c.duplicates AS duplicates,
       s.records_rejected + c.rejected AS rejected,
       s.meters_flushed + c.flushed AS flushed,
       s.started_at,
       coalesce(s.ended_at, clock_timestamp()) - s.started_at AS elapsed
  FROM meter.sessions s
  JOIN meter.streams st ON st.id = s.stream_id
  CROSS JOIN LATERAL (
       SELECT coalesce(sum(k.records_processed), 0) AS processed, coalesce(sum(k.records_metered), 0) AS metered,
              coalesce(sum(k.records_duplicate), 0) AS duplicates, coalesce(sum(k.records_rejected), 0) AS rejected,
              coalesce(sum(k.meters_flushed), 0) AS flushed
         FROM meter.session_counters k WHERE k.session_id = s.id) c
  CROSS JOIN LATERAL (
       SELECT CASE WHEN s.status IN ('INITIALIZING', 'RUNNING', 'PAUSED', 'TESTING')
                   THEN (SELECT coalesce(sum(u.records), 0) FROM meter.usage u WHERE u.stream = st.name) ELSE 0 END AS pending) p;

-- Fewer index entries per flushed meter: meters are not looked up by type but to
-- drop one, and the outbox finds a session's records through a BRIN index.
DROP INDEX meter.meters_type;
DROP INDEX meter.flushed_session;
CREATE INDEX flushed_session ON meter.flushed USING brin (session_id);

-- Record ids a batch run claimed together, one row per run of ids: a chunk's new
-- ids of one length, sorted, when few ids claimed before lie between its first and
-- last (ordered ids: sequences, ULIDs, counters). An index entry per id cost a
-- third of a run; a range costs one. Ids not claimed this way (random
-- ids, realtime streams, small chunks) are rows of meter.dedupe_keys. An id counts
-- as seen when either table holds it.
CREATE TABLE meter.dedupe_ranges (
    stream_id  bigint NOT NULL,
    first_id   text COLLATE "C" NOT NULL,
    last_id    text COLLATE "C" NOT NULL,
    seen_at    timestamptz NOT NULL,
    id_count   integer NOT NULL,          -- cardinality(record_ids), without reading them
    record_ids text[] COLLATE "C" NOT NULL, -- sorted (byte order), distinct
    meter_ids  bigint[] NOT NULL          -- where each record went, as in meter.dedupe_keys
);
-- Lookups count the ids of the ranges they overlap from the index alone.
CREATE INDEX dedupe_ranges_last ON meter.dedupe_ranges (stream_id, last_id) INCLUDE (first_id, id_count);
DO $$
BEGIN
    ALTER TABLE meter.dedupe_ranges ALTER COLUMN record_ids SET COMPRESSION lz4;
EXCEPTION WHEN feature_not_supported THEN
    NULL;  -- a server built without lz4 keeps pglz
END
$$;
SELECT pg_catalog.pg_extension_config_dump('meter.dedupe_ranges', '');
REVOKE ALL ON meter.dedupe_ranges FROM PUBLIC;
GRANT SELECT ON meter.dedupe_ranges TO meter_reader;
-- Every record id a stream metered, whichever table holds it.
CREATE VIEW meter.metered_ids AS
SELECT k.stream_id, k.record_id, k.seen_at, k.meter_id
  FROM meter.dedupe_keys k
 UNION ALL
SELECT r.stream_id, c.record_id, r.seen_at, c.meter_id
  FROM meter.dedupe_ranges r
 CROSS JOIN LATERAL unnest(r.record_ids, r.meter_ids) AS c(record_id, meter_id);
COMMENT ON VIEW meter.metered_ids IS
    'Record ids metered per stream (meter.dedupe_keys and the ranges of meter.dedupe_ranges), with when and into which meter.';
REVOKE ALL ON meter.metered_ids FROM PUBLIC;
GRANT SELECT ON meter.metered_ids TO meter_reader;

-- Where a record went: its audit row(s), found through the id it was deduplicated
-- by (its newest claim: a row of meter.dedupe_keys, or its place in a range).
CREATE OR REPLACE FUNCTION meter.audit_of(stream text, record_id text) RETURNS SETOF meter.usage_audit
LANGUAGE sql STABLE
BEGIN ATOMIC
    SELECT a.*
      FROM meter.streams s
     CROSS JOIN LATERAL (
           SELECT c.meter_id
             FROM (SELECT k.meter_id, k.seen_at FROM meter.dedupe_keys k
                    WHERE k.stream_id = s.id AND k.record_id = audit_of.record_id
                   UNION ALL
                   SELECT r.meter_ids[p.n], r.seen_at FROM meter.dedupe_ranges r
                    CROSS JOIN LATERAL pg_catalog.array_position(r.record_ids, audit_of.record_id) AS p(n)
                    WHERE r.stream_id = s.id AND r.last_id >= audit_of.record_id
                      AND r.first_id <= audit_of.record_id AND p.n IS NOT NULL) c
            ORDER BY c.seen_at DESC LIMIT 1) k
      JOIN meter.usage_audit a ON a.meter_id = k.meter_id AND a.stream_id = s.id AND a.record_id = audit_of.record_id
     WHERE s.name = audit_of.stream;
END;
