-- The `make run` demo: a meter type, a stream, a meter and its period.
\pset footer off
CREATE EXTENSION meter_ext;

\echo
\echo '== A monthly meter type in Stockholm time, and a stream'
SELECT meter.create_meter_type('api-calls', aggregation => 'sum', reset_schedule => '@monthly',
                               timezone => 'Europe/Stockholm', unit => 'calls') AS meter_type_id;
SELECT meter.create_stream('api-gateway') AS stream_id;

\echo '== A meter for customer acme: its first period ends at the next local month start'
SELECT meter.create_meter('api-gateway', 'api-calls', 'acme') AS meter_id;
SELECT id, stream, meter_type, user_id, value, unit,
       period_start AT TIME ZONE 'Europe/Stockholm' AS period_start_local,
       period_end AT TIME ZONE 'Europe/Stockholm' AS period_end_local
  FROM meter.inspector;

\echo '== The record a flush would send now (UE field names)'
SELECT jsonb_pretty(meter.meter_record(1)) AS meter_record;

\echo '== Reset schedules follow the zone''s DST rules: a daily period is 23 h on the spring-forward day'
SELECT meter.next_period_end('@daily', 'Europe/Stockholm', '2026-03-28 23:00:00Z') -
       '2026-03-28 23:00:00Z'::timestamptz AS spring_forward_day_length;
