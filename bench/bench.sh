#!/usr/bin/env bash
# meter_ext benchmark: each workload against a plain-SQL baseline measured in the
# same run, on the same cluster (SPEC §11). Prints one table.
#
#   bench/bench.sh            full run (RECORDS=1000000 USERS=10000 FLUSH_METERS=1000000 MEM_RECORDS=5000000)
#   bench/bench.sh --check    small run asserting the same meter values as the baseline (make test)
#   STRESS=1 bench/bench.sh   also the random-id workloads (ids looked up one by one; 5 more minutes)
#
# Sizes are overridable through those variables. TRIGGER_RECORDS is the subset the
# per-row trigger is timed on, scaled to RECORDS: the last that many records, its tables
# holding what the records before them made. ROUNDS sets how many times the batch
# workloads run, INGEST_ROUNDS and FLUSH_ROUNDS the others (each side keeps its
# best). PORT picks the cluster's port.
set -euo pipefail
cd "$(dirname "$0")/.."

CHECK=""
[ "${1:-}" = "--check" ] && CHECK=1
if [ "$CHECK" ]; then
    RECORDS=${RECORDS:-20000} USERS=${USERS:-500} FLUSH_METERS=${FLUSH_METERS:-3000}
    MEM_RECORDS=${MEM_RECORDS:-0} TRIGGER_RECORDS=${TRIGGER_RECORDS:-2000} REALTIME_SECONDS=${REALTIME_SECONDS:-0}
    ROUNDS=${ROUNDS:-1} INGEST_ROUNDS=${INGEST_ROUNDS:-1} FLUSH_ROUNDS=${FLUSH_ROUNDS:-1} STRESS=${STRESS:-1}
else
    RECORDS=${RECORDS:-1000000} USERS=${USERS:-10000} FLUSH_METERS=${FLUSH_METERS:-1000000}
    MEM_RECORDS=${MEM_RECORDS:-5000000} TRIGGER_RECORDS=${TRIGGER_RECORDS:-100000} REALTIME_SECONDS=${REALTIME_SECONDS:-15}
    # Each side's best of this many rounds. An ingest round takes 15 s, and COPY's
    # time varies most from round to round; a flush round takes two minutes on a slow
    # 2-core machine, its setup included: two keep the whole run within 15 minutes.
    ROUNDS=${ROUNDS:-3} INGEST_ROUNDS=${INGEST_ROUNDS:-5} FLUSH_ROUNDS=${FLUSH_ROUNDS:-2} STRESS=${STRESS:-0}
fi
[ "$TRIGGER_RECORDS" -le "$RECORDS" ] || TRIGGER_RECORDS=$RECORDS
INGEST_BATCH=${INGEST_BATCH:-1000}
CHUNK_SIZE=${CHUNK_SIZE:-10000}

started=$(date +%s)
# Progress goes to stderr with the minutes and seconds since the start.
say() { local s=$(($(date +%s) - started)); printf '==> [%02d:%02d] %s\n' $((s / 60)) $((s % 60)) "$*" >&2; }
dir=$(mktemp -d /tmp/meter_ext_bench.XXXXXX)
chown postgres: "$dir"
port=${PORT:-$((40000 + RANDOM % 10000))}
cleanup() {
    scripts/cluster.sh stop "$dir" >/dev/null 2>&1 || true
    [ "${KEEP_CLUSTER:-}" ] || rm -rf "$dir"
}
trap cleanup EXIT
scripts/cluster.sh start "$dir" "$port" bench
# Same settings for meter_ext and the baselines; sized for a 2-core CI machine.
cat <<CONF | sudo -u postgres tee -a "$dir/data/meter_ext_dev.conf" >/dev/null
shared_buffers = '1GB'
max_wal_size = '8GB'
checkpoint_timeout = '30min'
synchronous_commit = off
work_mem = '64MB'
meter_ext.worker_enabled = off
# Every table is vacuumed and analyzed between workloads instead: an autovacuum
# in the middle of a timed workload would charge one side for it.
autovacuum = off
CONF
scripts/cluster.sh stop "$dir" >/dev/null
sudo -u postgres /usr/lib/postgresql/15/bin/pg_ctl -D "$dir/data" -l "$dir/postgres.log" -w start >/dev/null

PSQL=(psql -h localhost -p "$port" -U postgres -X -q -v ON_ERROR_STOP=1)
"${PSQL[@]}" -d postgres -c "CREATE DATABASE bench" >/dev/null
sql() { "${PSQL[@]}" -d bench -At -c "$1"; }
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", b - a }'; }
least() { awk -v a="$1" -v b="$2" 'BEGIN { print (a == "" || b + 0 < a + 0) ? b : a }'; }
vacuum() { "${PSQL[@]}" -d bench -c "VACUUM ANALYZE $1" >/dev/null; }
# Before each timed workload, either side's: the pages the setup (and the workload
# before) dirtied are written now, not by whichever workload comes next.
settle() { sql "CHECKPOINT" >/dev/null; }

say "generating ${RECORDS} records for ${USERS} users (${FLUSH_METERS} meters for the flush)"
"${PSQL[@]}" -d bench -c "CREATE EXTENSION meter_ext" >/dev/null
"${PSQL[@]}" -d bench -v records="$RECORDS" -v users="$USERS" -f bench/setup.sql >/dev/null
sql "ALTER DATABASE bench SET meter_ext.chunk_size = $CHUNK_SIZE" >/dev/null

rows=()
row() { # workload, ours (s), baseline (s), baseline name, records, target time ratio (ours/baseline at most)
    rows+=("$(awk -v w="$1" -v o="$2" -v b="$3" -v n="$4" -v r="$5" -v t="$6" 'BEGIN {
        ratio = o / b
        printf "| %-34s | %8.2f s | %8.2f s | %-26s | %6.2f× | ≤ %.2f× %s | %10.0f |", w, o, b, n, ratio, t, (ratio <= t ? "✓" : "✗"), r / o }')")
}

# ---- batch processing ----------------------------------------------------------
# The inbox as meter.ingest leaves it after calls of $INGEST_BATCH records: one row
# per call. fill_inbox_single: a row per record, as plain INSERT / COPY of objects.
# The arrays are built once (aggregating them again took 3.5 s of each fill).
sql "CREATE TABLE bench.batches AS
     SELECT (i - 1) / $INGEST_BATCH AS n, jsonb_agg(record ORDER BY i) AS batch FROM bench.records GROUP BY 1" >/dev/null
fill_inbox() {
    sql "INSERT INTO meter.usage (stream, record) SELECT 'bench', batch FROM bench.batches ORDER BY n" >/dev/null
    vacuum meter.usage
}
fill_inbox_single() { sql "INSERT INTO meter.usage (stream, record) SELECT 'bench', record FROM bench.records ORDER BY i" >/dev/null; vacuum meter.usage; }
reset_meters() {
    sql "UPDATE meter.meters SET value = CASE WHEN aggregation = 'max' THEN NULL ELSE 0 END, groups = '[]',
               carry_first = '{}', carry_last = '{}', record_count = 0, first_record_at = NULL, last_record_at = NULL;
         TRUNCATE meter.dedupe_keys, meter.dedupe_ranges, meter.usage_audit_batches, meter.rejected" >/dev/null
    vacuum meter.meters
}
reset_baseline() {
    sql "TRUNCATE bench.seen, bench.meter_groups;
         UPDATE bench.meters SET value = CASE WHEN kind = 'conc' THEN NULL ELSE 0 END, carry_last = NULL, record_count = 0" >/dev/null
    vacuum bench.meters
}
# bench --check: the stream's meters equal the set-based baseline's (value, groups and
# carried plan of every meter) and their audit. $1 names the records.
check_meters() {
    mismatches=$(sql "
        WITH ours AS (
            SELECT m.user_id, CASE t.name WHEN 'calls' THEN 'call' WHEN 'bytes' THEN 'xfer' ELSE 'conc' END AS kind,
                   m.value, m.carry_last, m.groups
              FROM meter.meters m JOIN meter.meter_types t ON t.id = m.meter_type_id
              JOIN meter.streams s ON s.id = m.stream_id WHERE s.name = 'bench'),
        theirs AS (
            SELECT b.user_id, b.kind, b.value, coalesce(b.carry_last, '{}') AS carry_last,
                   coalesce((SELECT jsonb_agg(jsonb_build_object('key', 'region=' || g.region,
                                                                 'fields', jsonb_build_object('region', g.region),
                                                                 'value', g.value) ORDER BY 'region=' || g.region)
                               FROM bench.meter_groups g WHERE g.user_id = b.user_id AND g.kind = b.kind), '[]') AS groups
              FROM bench.meters b)
        SELECT count(*) FROM ours FULL JOIN theirs USING (user_id, kind)
         WHERE ours.value IS DISTINCT FROM theirs.value OR ours.carry_last IS DISTINCT FROM theirs.carry_last
            OR ours.groups IS DISTINCT FROM theirs.groups")
    checked=$(sql "SELECT count(*) FROM meter.meters m JOIN meter.streams s ON s.id = m.stream_id WHERE s.name = 'bench' AND m.record_count > 0")
    verified=$(sql "SELECT count(*) FROM meter.verify_meters('bench') WHERE NOT matches")
    if [ "$mismatches" != 0 ] || [ "$verified" != 0 ] || [ "$checked" = 0 ]; then
        echo "bench --check ($1): $mismatches meter(s) differ from the set-based baseline, $verified from their audit (of $checked)" >&2
        exit 1
    fi
    echo "bench --check ($1): all $checked metered meters equal the set-based baseline and their audit" >&2
}
# Each side's best of $ROUNDS rounds: on a shared machine one run of either can be
# 20% slower than the next.
baseline="" ours_audit="" ours_plain="" ours_single=""
for round in $(seq "$ROUNDS"); do
    say "batch processing, round $round of $ROUNDS"
    [ "$round" = 1 ] || reset_baseline
    sql "INSERT INTO bench.inbox (record) SELECT record FROM bench.records ORDER BY i" >/dev/null
    vacuum bench.inbox
    settle
    t0=$(now); sql "SELECT bench.set_based()" >/dev/null; t1=$(now)
    baseline=$(least "$baseline" "$(elapsed "$t0" "$t1")")
    # What the trigger baseline must make too (bench --check).
    [ "$CHECK" ] && [ "$round" = 1 ] && sql "CREATE TABLE bench.expected_meters AS TABLE bench.meters;
                                             CREATE TABLE bench.expected_groups AS TABLE bench.meter_groups" >/dev/null

    [ "$round" = 1 ] || reset_meters
    fill_inbox
    settle
    t0=$(now); sql "SELECT status FROM meter.run_stream('bench')" >/dev/null; t1=$(now)
    ours_audit=$(least "$ours_audit" "$(elapsed "$t0" "$t1")")
    [ "$CHECK" ] && [ "$round" = 1 ] && check_meters "benchmark ids"
    reset_meters
    fill_inbox
    sql "SELECT meter.alter_stream('bench', audit => false)" >/dev/null
    settle
    t0=$(now); sql "SELECT status FROM meter.run_stream('bench')" >/dev/null; t1=$(now)
    ours_plain=$(least "$ours_plain" "$(elapsed "$t0" "$t1")")
    sql "SELECT meter.alter_stream('bench', audit => true)" >/dev/null
    reset_meters
    fill_inbox_single
    settle
    t0=$(now); sql "SELECT status FROM meter.run_stream('bench')" >/dev/null; t1=$(now)
    ours_single=$(least "$ours_single" "$(elapsed "$t0" "$t1")")
done

# ---- the per-row trigger, on a subset ---------------------------------------------
# Timed on the last $TRIGGER_RECORDS records and scaled to $RECORDS, its tables first
# holding what the records before them made (loaded by the set-based upsert, which
# makes the same meters, groups and seen ids, untimed), then vacuumed: as many rows as
# in the middle of a run, without the old row versions a run of the trigger itself
# leaves (over every record, TRIGGER_RECORDS=$RECORDS, those made it 1.35-1.55x
# slower). On the first records, into empty groups, it ran faster still.
say "per-row trigger on the last $TRIGGER_RECORDS records"
reset_baseline
sql "INSERT INTO bench.inbox (record) SELECT record FROM bench.records WHERE i <= $RECORDS - $TRIGGER_RECORDS ORDER BY i;
     SELECT bench.set_based()" >/dev/null
vacuum "bench.meters, bench.meter_groups, bench.seen, bench.inbox"
settle
t0=$(now); sql "INSERT INTO bench.trigger_inbox SELECT record FROM bench.records WHERE i > $RECORDS - $TRIGGER_RECORDS" >/dev/null; t1=$(now)
trigger=$(awk -v s="$(elapsed "$t0" "$t1")" 'BEGIN { printf "%.3f", s * '"$RECORDS"' / '"$TRIGGER_RECORDS"' }')
trigger_name="per-row trigger (scaled)"
[ "$TRIGGER_RECORDS" = "$RECORDS" ] && trigger_name="per-row trigger"
if [ "$CHECK" ]; then
    # The trigger, after the set-based upsert of the records before, made every meter
    # and group the set-based upsert made of all the records.
    differ=$(sql "SELECT (SELECT count(*) FROM (TABLE bench.meters EXCEPT TABLE bench.expected_meters) d)
                       + (SELECT count(*) FROM (TABLE bench.expected_meters EXCEPT TABLE bench.meters) d)
                       + (SELECT count(*) FROM (TABLE bench.meter_groups EXCEPT TABLE bench.expected_groups) d)
                       + (SELECT count(*) FROM (TABLE bench.expected_groups EXCEPT TABLE bench.meter_groups) d)")
    [ "$differ" = 0 ] || { echo "bench --check: the trigger baseline differs from the set-based one in $differ rows" >&2; exit 1; }
    echo "bench --check: the trigger baseline made the set-based baseline's meters and groups" >&2
fi

# ---- batch processing of random ids -------------------------------------------------
# The same records with random ids (UUIDs, from md5: the same every run), run by a
# stream that already metered 3 × $RECORDS other random ids, against the baseline
# whose table of seen ids holds the same. Every id is then looked up and inserted
# apart, on both sides. One round each: the setup takes longer than the runs.
# STRESS=1 only (and in bench --check): it adds five minutes.
if [ "$STRESS" = 1 ]; then
    say "batch processing of random ids, $((3 * RECORDS)) ids metered"
    sql "CREATE TABLE bench.random_ids AS
         SELECT i, record || jsonb_build_object('id', md5('record' || i)::uuid::text) AS record FROM bench.records;
         CREATE TABLE bench.random_metered AS SELECT md5('metered' || n)::uuid::text AS id FROM generate_series(1, 3 * $RECORDS) n" >/dev/null
    reset_baseline
    sql "INSERT INTO bench.seen (id) SELECT id FROM bench.random_metered;
         INSERT INTO bench.inbox (record) SELECT record FROM bench.random_ids ORDER BY i" >/dev/null
    vacuum "bench.seen, bench.inbox"
    settle
    t0=$(now); sql "SELECT bench.set_based()" >/dev/null; t1=$(now)
    random_baseline=$(elapsed "$t0" "$t1")
    reset_meters
    sql "INSERT INTO meter.dedupe_keys (stream_id, record_id, seen_at)
         SELECT s.id, m.id, now() FROM meter.streams s, bench.random_metered m WHERE s.name = 'bench';
         INSERT INTO meter.usage (stream, record)
         SELECT 'bench', jsonb_agg(record ORDER BY i) FROM bench.random_ids GROUP BY (i - 1) / $INGEST_BATCH ORDER BY 1" >/dev/null
    vacuum "meter.dedupe_keys, meter.usage"
    settle
    t0=$(now); sql "SELECT status FROM meter.run_stream('bench')" >/dev/null; t1=$(now)
    random_ours=$(elapsed "$t0" "$t1")
    [ "$CHECK" ] && check_meters "random ids"
    reset_meters
    reset_baseline
fi

row "batch run_stream, with audit" "$ours_audit" "$baseline" "set-based SQL upsert" "$RECORDS" 1.0
row "batch run_stream, without audit" "$ours_plain" "$baseline" "set-based SQL upsert" "$RECORDS" 1.0
row "batch run_stream, with audit" "$ours_audit" "$trigger" "$trigger_name" "$RECORDS" 0.1
row "  the same, a record per inbox row" "$ours_single" "$baseline" "set-based SQL upsert" "$RECORDS" 1.0
[ "$STRESS" = 1 ] && row "  the same, random ids (1 round)" "$random_ours" "$random_baseline" "set-based, random ids" "$RECORDS" 1.0

# ---- ingest ----------------------------------------------------------------------
# One client (bench/ingest.py, psycopg 3) sends the same records both ways: COPY
# through the COPY protocol, and meter.ingest with each array bound as a parameter,
# as applications call it. Each side keeps its best of $INGEST_ROUNDS.
say "ingest"
ndjson="$dir/records.ndjson"
sql "COPY (SELECT record FROM bench.records ORDER BY i) TO STDOUT" >"$ndjson"
copy="" ingest=""
for round in $(seq "$INGEST_ROUNDS"); do
    sql "TRUNCATE bench.copy_target" >/dev/null
    sql "DELETE FROM meter.usage WHERE stream = 'bench_ingest'" >/dev/null
    vacuum "bench.copy_target, meter.usage"
    settle
    copy=$(least "$copy" "$(bench/ingest.py "$port" "$ndjson" copy)")
    settle
    read -r seconds accepted < <(bench/ingest.py "$port" "$ndjson" ingest bench_ingest "$INGEST_BATCH")
    ingest=$(least "$ingest" "$seconds")
    [ "$accepted" = "$RECORDS" ] || { echo "ingest accepted $accepted of $RECORDS records" >&2; exit 1; }
done
queued=$(sql "SELECT sum(records) FROM meter.usage WHERE stream = 'bench_ingest'")
[ "$queued" = "$RECORDS" ] || { echo "ingest queued $queued of $RECORDS records" >&2; exit 1; }
row "ingest, arrays of $INGEST_BATCH" "$ingest" "$copy" "COPY into a jsonb table" "$RECORDS" 1.25
sql "DELETE FROM meter.usage WHERE stream = 'bench_ingest'" >/dev/null

# ---- ingest of random ids ----------------------------------------------------------
# The same records with random ids (UUIDs, from md5: the same every run), into a
# stream that already metered 3 × $RECORDS other random ids. No stretch of the index
# answers for a call's ids, so each is looked up: once as shipped, once with
# meter_ext.ingest_checks_metered_ids off (ids left to the run).
# STRESS=1 only (and in bench --check).
if [ "$STRESS" = 1 ]; then
    say "ingest of random ids, $((3 * RECORDS)) ids metered"
    sql "SELECT meter.create_stream('bench_uuid', (SELECT guiding_rules FROM meter.streams WHERE name = 'bench'))" >/dev/null
    sql "INSERT INTO meter.dedupe_keys (stream_id, record_id, seen_at)
         SELECT s.id, m.id, now() FROM meter.streams s, bench.random_metered m WHERE s.name = 'bench_uuid'" >/dev/null
    vacuum meter.dedupe_keys
    uuids="$dir/uuids.ndjson"
    sql "COPY (SELECT record FROM bench.random_ids ORDER BY i) TO STDOUT" >"$uuids"
    ucopy="" uchecked="" uunchecked=""
    # Best of two rounds (not $ROUNDS): this part would otherwise take a minute and a half.
    for round in $(seq $((ROUNDS < 2 ? ROUNDS : 2))); do
        sql "TRUNCATE bench.copy_target" >/dev/null
        vacuum bench.copy_target
        settle
        ucopy=$(least "$ucopy" "$(bench/ingest.py "$port" "$uuids" copy)")
        for checks in on off; do
            sql "DELETE FROM meter.usage WHERE stream = 'bench_uuid'" >/dev/null
            vacuum meter.usage
            settle
            read -r seconds accepted < <(PGOPTIONS="-c meter_ext.ingest_checks_metered_ids=$checks" \
                bench/ingest.py "$port" "$uuids" ingest bench_uuid "$INGEST_BATCH")
            [ "$accepted" = "$RECORDS" ] || { echo "ingest accepted $accepted of $RECORDS random ids" >&2; exit 1; }
            if [ "$checks" = on ]; then uchecked=$(least "$uchecked" "$seconds"); else uunchecked=$(least "$uunchecked" "$seconds"); fi
        done
    done
    row "ingest, random ids" "$uchecked" "$ucopy" "COPY into a jsonb table" "$RECORDS" 1.25
    row "  the same, ids left to the run" "$uunchecked" "$ucopy" "COPY into a jsonb table" "$RECORDS" 1.25
    # Only bench_uuid has ids now: emptying the table beats deleting 3 × $RECORDS rows.
    sql "TRUNCATE meter.dedupe_keys; SELECT meter.drop_stream('bench_uuid', cascade => true)" >/dev/null
    vacuum "meter.usage, bench.copy_target"
fi

# ---- period-end flush ------------------------------------------------------------
sql "SELECT meter.create_stream('bench_flush', (SELECT guiding_rules FROM meter.streams WHERE name = 'bench'))" >/dev/null
# Each round flushes a fresh set of due meters, both ways; each side keeps its best.
# The meters are built once and copied back for each later round, their foreign
# keys unchecked (session_replication_role): they were checked when built, and
# building them again took 23 s of each round.
sql "SELECT bench.add_flush_meters($FLUSH_METERS)" >/dev/null
sql "CREATE TABLE bench.flush_template AS
     SELECT m.* FROM meter.meters m JOIN meter.streams s ON s.id = m.stream_id WHERE s.name = 'bench_flush'" >/dev/null
bare="" flush=""
for round in $(seq "$FLUSH_ROUNDS"); do
    say "period-end flush of $FLUSH_METERS meters, round $round of $FLUSH_ROUNDS"
    if [ "$round" -gt 1 ]; then
        sql "SET client_min_messages = warning;
             DELETE FROM meter.meters m USING meter.streams s WHERE s.id = m.stream_id AND s.name = 'bench_flush';
             TRUNCATE meter.flushed; DROP TABLE IF EXISTS bench.flush_meters; TRUNCATE bench.flush_outbox;
             SET session_replication_role = replica;
             INSERT INTO meter.meters SELECT * FROM bench.flush_template" >/dev/null
    fi
    sql "CREATE TABLE bench.flush_meters AS SELECT * FROM bench.flush_template" >/dev/null
    sql "ALTER TABLE bench.flush_meters ADD PRIMARY KEY (id)" >/dev/null
    vacuum "meter.meters, meter.flushed, bench.flush_meters, bench.flush_outbox"
    settle
    t0=$(now); sql "SELECT bench.bare_flush()" >/dev/null; t1=$(now)
    bare=$(least "$bare" "$(elapsed "$t0" "$t1")")
    settle
    t0=$(now); sql "SELECT status FROM meter.run_stream('bench_flush')" >/dev/null; t1=$(now)
    flush=$(least "$flush" "$(elapsed "$t0" "$t1")")
    flushed=$(sql "SELECT count(*) FROM meter.flushed f JOIN meter.streams s ON s.id = f.stream_id WHERE s.name = 'bench_flush'")
    [ "$flushed" = "$FLUSH_METERS" ] || { echo "flushed $flushed of $FLUSH_METERS meters" >&2; exit 1; }
done
row "period-end flush (run_stream)" "$flush" "$bare" "UPDATE + INSERT to_jsonb" "$FLUSH_METERS" 1.5

# ---- realtime single-record ingest, 2 clients --------------------------------------
realtime_rows=()
if [ "$REALTIME_SECONDS" -gt 0 ]; then
    say "realtime ingest, 2 clients, ${REALTIME_SECONDS}s each"
    cat >"$dir/realtime.pgbench" <<'PGB'
\set u random(0, 9999)
\set id random(1, 1000000000000)
SELECT count(*) FROM meter.ingest('bench_realtime', jsonb_build_object('id', :id, 'userId', 'user-' || :u, 'kind', 'call', 'region', 'eu', 'plan', 'pro', 'value', 1));
PGB
    cat >"$dir/insert.pgbench" <<'PGB'
\set u random(0, 9999)
\set id random(1, 1000000000000)
INSERT INTO bench.plain_insert VALUES (jsonb_build_object('id', :id, 'userId', 'user-' || :u, 'kind', 'call', 'region', 'eu', 'plan', 'pro', 'value', 1));
PGB
    pgbench_run() { # script name -> "calls/s p50_ms p99_ms"
        (cd "$dir" && sudo -u postgres pgbench -h localhost -p "$port" -U postgres -n -c 2 -j 2 -T "$REALTIME_SECONDS" \
            -f "$1.pgbench" -l --log-prefix="$1" bench >/dev/null 2>&1)
        cat "$dir/$1".* | awk '{print $3}' | sort -n | awk -v s="$REALTIME_SECONDS" '
            { v[NR] = $1 } END { printf "%.0f %.3f %.3f", NR / s, v[int(NR * 0.5)] / 1000, v[int(NR * 0.99)] / 1000 }'
    }
    read -r ours_rate ours_p50 ours_p99 <<<"$(pgbench_run realtime)"
    read -r plain_rate plain_p50 plain_p99 <<<"$(pgbench_run insert)"
    realtime_rows+=("| realtime ingest, 1 record per call | $ours_rate | $ours_p50 ms | $ours_p99 ms |")
    realtime_rows+=("| plain single-row INSERT (baseline) | $plain_rate | $plain_p50 ms | $plain_p99 ms |")
fi

# ---- memory of a run -----------------------------------------------------------------
memory_rows=()
if [ "$MEM_RECORDS" -gt 0 ]; then
    # The records again and again, each copy with ids of its own: every record is
    # new, as in a run over fresh usage. Each record's copies follow it (r1, r1.1,
    # …, r2, …), as these runs have always had them: copy after copy, a chunk of
    # 1 000 records meets five times the users, and the run took over 5 minutes, not 1.
    # In arrays of $INGEST_BATCH, built once.
    sql "CREATE TABLE bench.big_batches AS
         SELECT (n - 1) / $INGEST_BATCH AS n, jsonb_agg(record ORDER BY n) AS batch
           FROM (SELECT row_number() OVER (ORDER BY i, k) AS n,
                        CASE WHEN k = 0 THEN record ELSE record || jsonb_build_object('id', (record->>'id') || '.' || k) END
                          AS record
                   FROM bench.records, generate_series(0, ($MEM_RECORDS - 1) / $RECORDS) k
                  WHERE (k * $RECORDS + i) <= $MEM_RECORDS) b
          GROUP BY 1" >/dev/null
    for chunk in 1000 ${MEM_CHUNK:-20000}; do
        say "peak memory of a $MEM_RECORDS-record run, chunk_size $chunk"
        sql "TRUNCATE meter.dedupe_keys, meter.dedupe_ranges, meter.usage_audit_batches" >/dev/null
        sql "INSERT INTO meter.usage (stream, record) SELECT 'bench', batch FROM bench.big_batches ORDER BY n" >/dev/null
        vacuum meter.usage
        PGAPPNAME=meter_bench_memory "${PSQL[@]}" -d bench >/dev/null <<SQL &
SET meter_ext.chunk_size = $chunk;
CALL meter.execute_stream('bench');
SQL
        runner=$!
        pid=""
        while [ -z "$pid" ] && kill -0 "$runner" 2>/dev/null; do
            pid=$(sql "SELECT pid FROM pg_stat_activity WHERE application_name = 'meter_bench_memory'")
            sleep 0.05
        done
        peak=0 start=0
        while kill -0 "$runner" 2>/dev/null; do
            kb=$(awk '/^RssAnon/ {print $2}' "/proc/$pid/status" 2>/dev/null || echo 0)
            [ "$start" = 0 ] && start=${kb:-0}
            [ "${kb:-0}" -gt "$peak" ] && peak=$kb
            sleep 0.02
        done
        wait "$runner"
        memory_rows+=("| $MEM_RECORDS | $chunk | $((start / 1024)) MiB | $((peak / 1024)) MiB |")
    done
fi

# ---- the table -------------------------------------------------------------------------
{
    echo "meter_ext benchmark — $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2 / 1048576}' /proc/meminfo), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
    echo "PostgreSQL $(sql 'SHOW server_version'), $RECORDS records, $USERS users, 3 meter types, group by region, carry last; chunk_size $CHUNK_SIZE; best of $ROUNDS batch, $INGEST_ROUNDS ingest and $FLUSH_ROUNDS flush round(s)"
    echo
    echo "| workload                           |       ours |   baseline | baseline                   |   time  | target (SPEC §11) | records/s  |"
    echo "|------------------------------------|------------|------------|----------------------------|---------|-------------------|------------|"
    printf '%s\n' "${rows[@]}"
    if ((${#realtime_rows[@]})); then
        echo
        echo "| realtime, 2 clients, ${REALTIME_SECONDS}s | calls/s | p50 | p99 |"
        echo "|---|---|---|---|"
        printf '%s\n' "${realtime_rows[@]}"
    fi
    if ((${#memory_rows[@]})); then
        echo
        echo "| run of (records) | chunk_size | backend private memory at start | peak |"
        echo "|---|---|---|---|"
        printf '%s\n' "${memory_rows[@]}"
    fi
    echo
    s=$(($(date +%s) - started))
    echo "The whole benchmark, data generation included, took $((s / 60)) min $((s % 60)) s."
} | tee "${RESULTS:-/dev/null}"
