-- Benchmark data and baselines (bench/bench.sh). Deterministic: the same
-- :records, :users give the same records.
\set ON_ERROR_STOP 1
SET client_min_messages = warning;
-- bench.bare_flush reads a table bench.sh creates later.
SET check_function_bodies = off;
DROP SCHEMA IF EXISTS bench CASCADE;
CREATE SCHEMA bench;

-- 3 meter types (count of calls, sum of bytes, peak concurrency), grouped by
-- region, carrying the last plan; every record has an id.
CREATE TABLE bench.records AS
SELECT i, jsonb_build_object(
           'id', 'r' || i,
           'userId', 'user-' || lpad(((i * 7919) % :users)::text, 6, '0'),
           'kind', (ARRAY['call', 'xfer', 'conc'])[1 + (i * 31) % 3],
           'region', (ARRAY['eu', 'us', 'apac', 'latam'])[1 + (i * 17) % 4],
           'plan', (ARRAY['free', 'pro', 'team'])[1 + (i / 1000) % 3],
           'value', ((i * 104729) % 100000) / 100.0,
           'timestamp', to_char((timestamptz '2026-01-01 00:00:00Z' + i * interval '1 millisecond') AT TIME ZONE 'UTC',
                                'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"')
       ) AS record
  FROM generate_series(1::bigint, :records) i;
ALTER TABLE bench.records ADD PRIMARY KEY (i);

SELECT meter.create_meter_type('calls', 'increment', '@monthly', unit => 'calls');
SELECT meter.create_meter_type('bytes', 'sum', '@monthly', unit => 'bytes');
SELECT meter.create_meter_type('peak', 'max', '@monthly', unit => 'sessions');
SELECT meter.create_stream('bench', '[
  {"name": "calls", "meter_type": "calls", "conditions": [{"field": "kind", "op": "eq", "value": "call"}], "group_by": ["region"], "carry_last": ["plan"]},
  {"name": "bytes", "meter_type": "bytes", "conditions": [{"field": "kind", "op": "eq", "value": "xfer"}], "group_by": ["region"], "carry_last": ["plan"]},
  {"name": "peak",  "meter_type": "peak",  "conditions": [{"field": "kind", "op": "eq", "value": "conc"}], "group_by": ["region"], "carry_last": ["plan"]}
]');
SELECT meter.create_stream('bench_ingest', (SELECT guiding_rules FROM meter.streams WHERE name = 'bench'));
SELECT meter.create_stream('bench_realtime', (SELECT guiding_rules FROM meter.streams WHERE name = 'bench'),
                           mode => 'realtime', auto_create_meters => true);

-- Every user has its three meters, as provisioned by API.
INSERT INTO meter.meters (stream_id, meter_type_id, user_id, value, aggregation, unit, timezone, period_start, period_end)
SELECT s.id, t.id, 'user-' || lpad(u::text, 6, '0'),
       CASE WHEN t.aggregation = 'max' THEN NULL ELSE 0 END, t.aggregation, t.unit, t.timezone,
       now(), meter.next_period_end(t.reset_schedule, t.timezone, now())
  FROM meter.streams s, meter.meter_types t, generate_series(0, :users - 1) u
 WHERE s.name = 'bench';

-- ---- baseline 1: hand-written set-based SQL --------------------------------
-- The same job as a run: consume the inbox, count each id once, aggregate per
-- meter and per region group (count / sum / max), keep the last plan, upsert.
CREATE TABLE bench.inbox (seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, record jsonb NOT NULL);
CREATE TABLE bench.seen (id text PRIMARY KEY);
CREATE TABLE bench.meters (user_id text, kind text, value numeric, carry_last jsonb, record_count bigint NOT NULL DEFAULT 0,
                           PRIMARY KEY (user_id, kind));
CREATE TABLE bench.meter_groups (user_id text, kind text, region text, value numeric, PRIMARY KEY (user_id, kind, region));
INSERT INTO bench.meters (user_id, kind, value)
SELECT 'user-' || lpad(u::text, 6, '0'), k, CASE WHEN k = 'conc' THEN NULL ELSE 0 END
  FROM generate_series(0, :users - 1) u, unnest(ARRAY['call', 'xfer', 'conc']) k;

CREATE FUNCTION bench.set_based() RETURNS bigint LANGUAGE sql AS $$
WITH consumed AS (DELETE FROM bench.inbox RETURNING seq, record),
fresh AS (INSERT INTO bench.seen (id) SELECT record->>'id' FROM consumed ON CONFLICT DO NOTHING RETURNING id),
rows AS (SELECT c.seq, c.record->>'userId' AS user_id, c.record->>'kind' AS kind, c.record->>'region' AS region,
                c.record->>'plan' AS plan, (c.record->>'value')::numeric AS value
           FROM consumed c JOIN fresh f ON f.id = c.record->>'id'),
per_group AS (SELECT user_id, kind, region,
                     CASE kind WHEN 'call' THEN count(*)::numeric WHEN 'xfer' THEN sum(value) ELSE max(value) END AS v
                FROM rows GROUP BY 1, 2, 3),
groups_written AS (
    INSERT INTO bench.meter_groups AS g SELECT * FROM per_group
    ON CONFLICT (user_id, kind, region) DO UPDATE
       SET value = CASE g.kind WHEN 'conc' THEN greatest(g.value, EXCLUDED.value) ELSE g.value + EXCLUDED.value END
    RETURNING 1),
per_meter AS (SELECT user_id, kind,
                     CASE kind WHEN 'call' THEN count(*)::numeric WHEN 'xfer' THEN sum(value) ELSE max(value) END AS v,
                     (array_agg(plan ORDER BY seq DESC))[1] AS last_plan, count(*) AS n
                FROM rows GROUP BY 1, 2),
meters_written AS (
    INSERT INTO bench.meters AS m SELECT user_id, kind, v, jsonb_build_object('plan', last_plan), n FROM per_meter
    ON CONFLICT (user_id, kind) DO UPDATE
       SET value = CASE m.kind WHEN 'conc' THEN greatest(m.value, EXCLUDED.value) ELSE coalesce(m.value, 0) + EXCLUDED.value END,
           carry_last = EXCLUDED.carry_last, record_count = m.record_count + EXCLUDED.record_count
    RETURNING 1)
SELECT (SELECT count(*) FROM meters_written) + (SELECT count(*) FROM groups_written)
$$;

-- ---- baseline 2: a per-row trigger upsert ------------------------------------
CREATE TABLE bench.trigger_inbox (record jsonb NOT NULL);
CREATE FUNCTION bench.upsert_row() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    v numeric := CASE NEW.record->>'kind' WHEN 'call' THEN 1 ELSE (NEW.record->>'value')::numeric END;
BEGIN
    INSERT INTO bench.seen (id) VALUES (NEW.record->>'id') ON CONFLICT DO NOTHING;
    IF NOT FOUND THEN RETURN NULL; END IF;
    INSERT INTO bench.meter_groups AS g VALUES (NEW.record->>'userId', NEW.record->>'kind', NEW.record->>'region', v)
    ON CONFLICT (user_id, kind, region) DO UPDATE
       SET value = CASE g.kind WHEN 'conc' THEN greatest(g.value, EXCLUDED.value) ELSE g.value + EXCLUDED.value END;
    INSERT INTO bench.meters AS m VALUES (NEW.record->>'userId', NEW.record->>'kind', v,
                                          jsonb_build_object('plan', NEW.record->>'plan'), 1)
    ON CONFLICT (user_id, kind) DO UPDATE
       SET value = CASE m.kind WHEN 'conc' THEN greatest(m.value, EXCLUDED.value) ELSE coalesce(m.value, 0) + EXCLUDED.value END,
           carry_last = EXCLUDED.carry_last, record_count = m.record_count + 1;
    RETURN NULL;
END
$$;
CREATE TRIGGER upsert_row BEFORE INSERT ON bench.trigger_inbox FOR EACH ROW EXECUTE FUNCTION bench.upsert_row();

-- ---- baseline 3: COPY into a plain jsonb table -------------------------------
CREATE TABLE bench.copy_target (record jsonb NOT NULL);

-- ---- baseline 4: a bare period-end flush ---------------------------------------
-- The meters both flushes take: n meters of stream bench_flush, each with two
-- region groups and a carried plan, whose period ended a day ago.
CREATE FUNCTION bench.add_flush_meters(n bigint) RETURNS void LANGUAGE sql AS $$
INSERT INTO meter.meters (stream_id, meter_type_id, user_id, value, groups, carry_last, record_count, aggregation,
                          unit, timezone, period_start, period_end, first_record_at, last_record_at)
SELECT s.id, t.id, 'flush-' || i, i % 1000,
       jsonb_build_array(jsonb_build_object('key', 'region=eu', 'fields', jsonb_build_object('region', 'eu'), 'value', i % 600),
                         jsonb_build_object('key', 'region=us', 'fields', jsonb_build_object('region', 'us'), 'value', i % 400)),
       jsonb_build_object('plan', 'pro'), 7, t.aggregation, t.unit, t.timezone,
       now() - interval '32 days', now() - interval '1 day', now() - interval '20 days', now() - interval '2 days'
  FROM meter.streams s, meter.meter_types t, generate_series(1, n) i
 WHERE s.name = 'bench_flush' AND t.name = 'bytes'
$$;
CREATE TABLE bench.flush_outbox (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, meter_id bigint, record jsonb);
CREATE FUNCTION bench.bare_flush() RETURNS bigint LANGUAGE sql AS $$
WITH due AS (SELECT * FROM bench.flush_meters WHERE period_end <= now()),
written AS (INSERT INTO bench.flush_outbox (meter_id, record) SELECT due.id, to_jsonb(due) FROM due RETURNING 1),
reset AS (UPDATE bench.flush_meters m SET value = 0, groups = '[]', carry_last = '{}', record_count = 0,
                                          period_start = m.period_end, period_end = m.period_end + interval '1 month'
            FROM due WHERE m.id = due.id RETURNING 1)
SELECT (SELECT count(*) FROM written) + (SELECT count(*) FROM reset)
$$;

-- ---- baseline 5: a plain single-row INSERT (realtime latency) ------------------
CREATE TABLE bench.plain_insert (record jsonb NOT NULL);

ANALYZE;
