-- The flushed meter record (SPEC §8): exactly UE's fields, in camelCase. A flush
-- builds the same record in Rust (src/flushed_record.rs) from the row it reads;
-- a pg_test holds the two to the same text.

-- meter.iso_utc(timestamptz), UTC ISO-8601 with milliseconds as JavaScript's
-- Date.toISOString(), is in Rust (src/api.rs): to_char() was most of a flush's cost.

CREATE FUNCTION meter.record_json(m meter.meters, t meter.meter_types, s meter.streams) RETURNS jsonb
LANGUAGE sql STABLE PARALLEL SAFE
RETURN pg_catalog.jsonb_build_object(
    'id', m.id,
    'userId', m.user_id,
    'meterTypeId', t.id,
    'meterTypeName', t.name,
    'timezone', m.timezone,
    'meterKey', s.meter_key,
    'value', m.value,
    'unit', m.unit,
    'createdAt', meter.iso_utc(m.created_at),
    'updatedAt', meter.iso_utc(m.updated_at),
    'periodStart', meter.iso_utc(m.period_start),
    'periodEnd', meter.iso_utc(m.period_end),
    'groups', m.groups,
    'carryFirst', m.carry_first,
    'carryLast', m.carry_last,
    'deleteOnReset', m.delete_on_reset,
    'meterMetaData', pg_catalog.jsonb_build_object(
        'firstMatchedAt', meter.iso_utc(m.first_record_at),
        'lastMatchedAt', meter.iso_utc(m.last_record_at),
        'recordCount', m.record_count));

CREATE FUNCTION meter.meter_record(meter_id bigint) RETURNS jsonb
LANGUAGE sql STABLE
BEGIN ATOMIC
    SELECT meter.record_json(m, t, s)
      FROM meter.meters m
      JOIN meter.meter_types t ON t.id = m.meter_type_id
      JOIN meter.streams s ON s.id = m.stream_id
     WHERE m.id = meter_record.meter_id;
END;
COMMENT ON FUNCTION meter.meter_record(bigint) IS 'The JSON record a flush of this meter would send now (UE''s Meter Inspector).';

-- UE's Meter Inspector: every meter with the record a flush would send now.
CREATE VIEW meter.inspector AS
SELECT m.id,
       s.name AS stream,
       t.name AS meter_type,
       m.user_id,
       m.value,
       m.unit,
       m.period_start,
       m.period_end,
       m.record_count,
       m.updated_at,
       meter.record_json(m, t, s) AS record
  FROM meter.meters m
  JOIN meter.meter_types t ON t.id = m.meter_type_id
  JOIN meter.streams s ON s.id = m.stream_id;
