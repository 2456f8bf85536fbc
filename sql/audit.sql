-- Verifying meters against their usage audit (SPEC §2): the audit has one row per
-- record the meter processor output, so a meter's current value can be derived
-- from the rows of its current period.

CREATE FUNCTION meter.audited_value(meter_id bigint) RETURNS numeric
LANGUAGE sql STABLE
BEGIN ATOMIC
    SELECT CASE m.aggregation
               WHEN 'sum' THEN coalesce(sum(a.value), 0)
               WHEN 'unique_count' THEN coalesce(sum(a.value), 0)
               WHEN 'increment' THEN count(a.value)
               WHEN 'min' THEN min(a.value)
               WHEN 'max' THEN max(a.value)
               -- The record with the greatest timestamp; ties go to the one processed later.
               WHEN 'latest' THEN (pg_catalog.array_agg(a.value ORDER BY a.record_at DESC, a.batch_id DESC, a.position DESC))[1]
           END
      FROM meter.meters m
      LEFT JOIN meter.usage_audit a ON a.meter_id = m.id AND a.period_start = m.period_start
     WHERE m.id = audited_value.meter_id
     GROUP BY m.id, m.aggregation;
END;
COMMENT ON FUNCTION meter.audited_value(bigint) IS
    'A meter''s current value re-derived from the usage audit of its current period.';

-- Every meter (of a stream, or all) with its value next to the audited one.
CREATE FUNCTION meter.verify_meters(stream text DEFAULT NULL)
RETURNS TABLE (meter_id bigint, stream text, user_id text, value numeric, audited_value numeric, matches boolean)
LANGUAGE sql STABLE
BEGIN ATOMIC
    SELECT m.id, st.name, m.user_id, m.value, meter.audited_value(m.id),
           m.value IS NOT DISTINCT FROM meter.audited_value(m.id)
      FROM meter.meters m
      JOIN meter.streams st ON st.id = m.stream_id
     WHERE verify_meters.stream IS NULL OR st.name = verify_meters.stream
     ORDER BY m.id;
END;

-- Where a record went: its audit row(s), found through the id it was deduplicated
-- by (its newest claim: a row of meter.dedupe_keys, or its place in a range).
CREATE FUNCTION meter.audit_of(stream text, record_id text) RETURNS SETOF meter.usage_audit
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
