-- The `make run` demo: a day in the life of a small API platform's metering.
--
-- Customers call an API in two regions (EU, US) and store data. API calls are billed
-- per calendar month in Stockholm time; storage per hour, by the peak GB stored, in
-- New York time. One stream meters both, run from pg_cron every five minutes.
\set ON_ERROR_STOP 1
\pset footer off
SET client_min_messages = warning;
CREATE EXTENSION meter_ext;
CREATE EXTENSION pg_cron;

\echo
\echo '== 1. Two meter types: API calls (monthly, Europe/Stockholm) and storage (hourly peak, America/New_York)'
SELECT meter.create_meter_type('api-calls', aggregation => 'increment', reset_schedule => '@monthly',
                               timezone => 'Europe/Stockholm', unit => 'calls') AS api_calls,
       meter.create_meter_type('storage', aggregation => 'max', reset_schedule => '@hourly',
                               timezone => 'America/New_York', unit => 'GB') AS storage;

\echo '== 2. One stream, two guiding rules: API calls broken down by region, storage by peak GB'
SELECT meter.create_stream('platform', '[
  {"name": "api", "meter_type": "api-calls", "group_by": ["region"], "carry_last": ["plan"],
   "conditions": [{"field": "kind", "op": "eq", "value": "api"}]},
  {"name": "storage", "meter_type": "storage",
   "conditions": [{"field": "kind", "op": "eq", "value": "storage"}]}
]', auto_create_meters => true) AS stream_id;

\echo '== 3. A day of synthetic usage: 4 customers, API calls every few minutes, storage readings hourly'
WITH customers(user_id, plan, home) AS (
       VALUES ('acme', 'pro', 'eu'), ('globex', 'basic', 'us'), ('initech', 'pro', 'us'), ('umbrella', 'enterprise', 'eu')),
     calls AS (
       SELECT jsonb_build_object('id', 'call-' || c.user_id || '-' || n, 'userId', c.user_id, 'kind', 'api',
                                 'region', CASE WHEN n % 5 = 0 THEN CASE c.home WHEN 'eu' THEN 'us' ELSE 'eu' END ELSE c.home END,
                                 'plan', c.plan, 'timestamp', now() - interval '1 day' + n * interval '3 minutes') AS record
         FROM customers c, generate_series(1, 480) n
        WHERE (n + length(c.user_id)) % 7 <> 0),
     storage AS (
       SELECT jsonb_build_object('id', 'gb-' || c.user_id || '-' || h, 'userId', c.user_id, 'kind', 'storage',
                                 'value', round((10 + length(c.user_id) * h * 0.75)::numeric, 2),
                                 'timestamp', now() - interval '1 day' + h * interval '1 hour') AS record
         FROM customers c, generate_series(1, 24) h)
SELECT * FROM meter.ingest('platform', (SELECT jsonb_agg(record) FROM (SELECT record FROM calls UNION ALL SELECT record FROM storage) r));

\echo '== 4. Run the stream (pg_cron does this every five minutes from now on)'
SELECT id AS session_id, status, records_processed, records_metered, meters_flushed,
       round(extract(epoch FROM ended_at - started_at) * 1000) AS ms
  FROM meter.run_stream('platform');

\echo '== 5. The session''s status changes, as listeners on meter_session_status received them'
SELECT to_char(at, 'HH24:MI:SS.MS') AS at, previous_status, status FROM meter.session_events ORDER BY id;

\echo '== 6. The meters: API calls this month, storage this hour (local period ends)'
SELECT i.user_id, i.meter_type, i.value, i.unit,
       (SELECT string_agg(g->>'key' || ': ' || (g->>'value'), ', ') FROM jsonb_array_elements(i.record->'groups') g) AS by_region,
       i.record->'carryLast'->>'plan' AS plan,
       to_char(i.period_end AT TIME ZONE (i.record->>'timezone'), 'YYYY-MM-DD HH24:MI') || ' ' || (i.record->>'timezone') AS period_ends_local
  FROM meter.inspector i ORDER BY i.meter_type, i.user_id;

\echo '== 7. An hour later: the storage periods end, the next run flushes them (here: ended now, for the demo)'
UPDATE meter.meters m SET period_end = now() FROM meter.meter_types t
 WHERE t.id = m.meter_type_id AND t.name = 'storage';
SELECT id AS session_id, status, meters_flushed FROM meter.run_stream('platform');
\echo 'The flushed record for acme, as billing receives it (and as meter_flushed announced it):'
\pset format unaligned
\pset tuples_only on
SELECT jsonb_pretty(record) FROM meter.flushed WHERE user_id = 'acme' ORDER BY id LIMIT 1;
\pset format aligned
\pset tuples_only off

\echo '== 8. Next scheduled period ends, in each meter type''s zone'
SELECT t.name AS meter_type, t.reset_schedule, t.timezone,
       to_char(meter.next_period_end(t.reset_schedule, t.timezone, now()) AT TIME ZONE t.timezone, 'YYYY-MM-DD HH24:MI') AS next_end_local,
       meter.next_period_end(t.reset_schedule, t.timezone, now()) AS next_end_utc
  FROM meter.meter_types t ORDER BY t.name;

\echo '== 9. Runs scheduled with pg_cron'
SELECT cron.schedule('meter-platform', '*/5 * * * *', $$CALL meter.execute_stream('platform')$$) AS cron_job;

\echo
\echo 'Explore further (in psql):'
\echo '    SELECT * FROM meter.stream_status;'
\echo '    SELECT session_id, status, done, pending, percent FROM meter.session_progress;'
\echo '    SELECT * FROM meter.usage_report(''platform'') WHERE user_id = ''acme'';'
\echo '    SELECT meter_id, rule, value FROM meter.audit_of(''platform'', ''call-acme-2'');'
\echo '    LISTEN meter_session_status;  CALL meter.execute_stream(''platform'');'
\echo '    SELECT * FROM meter.preview(''platform'', ''{"userId": "acme", "kind": "api", "region": "eu"}'');'
