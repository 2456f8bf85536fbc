-- Period-by-period totals (since 0.2.0): every flushed period still in the outbox
-- and every meter's open period, per user and meter type, ready to plot or to
-- export with \copy. Flushed rows removed by meter.purge are no longer reported.
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
