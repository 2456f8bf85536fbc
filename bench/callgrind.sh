#!/usr/bin/env bash
# Counts the instructions of one flush or one batch run under callgrind, on a
# cluster kept by a benchmark run (KEEP_CLUSTER=1 bench/bench.sh). On a shared
# machine the same run's time moves by a third; its instruction count does not,
# so compare builds with this, and confirm with the benchmark.
#
#   bench/callgrind.sh DIR flush [METERS]    # a period-end flush of METERS meters (20000)
#   bench/callgrind.sh DIR batch [RECORDS]   # run_stream over RECORDS records, audit on (20000)
#   bench/callgrind.sh DIR ingest [RECORDS]  # ingest of RECORDS records in the benchmark's arrays
#   bench/callgrind.sh DIR copy [RECORDS]    # COPY of the same records into a jsonb table
#
# ingest reads its statements from the file the benchmark wrote (DIR/ingest.sql);
# a single-user backend reads its input a character at a time (getc), which a
# client's statements do not cost: leave that out when comparing with copy.
#
# The backend runs in single-user mode (valgrind cannot join a running
# postmaster); the cluster is stopped for it and started again afterwards. The
# profile is left in DIR/callgrind.out: `callgrind_annotate --inclusive=yes` it.
set -euo pipefail

usage="usage: bench/callgrind.sh DIR flush|batch|ingest|copy [N]"
dir=${1:?$usage}
workload=${2:?$usage}
size=${3:-20000}
bin=$(pg_config --bindir 2>/dev/null || echo /usr/lib/postgresql/15/bin)
port=$(sed -n "s/^port = //p" "$dir/data/meter_ext_dev.conf" | tail -1)
command -v valgrind >/dev/null || { apt-get update -qq && apt-get install -y -qq valgrind >/dev/null; }

ctl() { sudo -u postgres "$bin/pg_ctl" -D "$dir/data" -l "$dir/postgres.log" -w "$@" >/dev/null; }
sql() { psql -X -q -h localhost -p "$port" -U postgres -d bench -v ON_ERROR_STOP=1 "$@" >/dev/null; }

ctl status >/dev/null 2>&1 || ctl start
case "$workload" in
flush)
    sql -c "TRUNCATE meter.flushed" \
        -c "DELETE FROM meter.meters m USING meter.streams s WHERE s.id = m.stream_id AND s.name = 'bench_flush'" \
        -c "SELECT bench.add_flush_meters($size)"
    statement="SELECT status FROM meter.run_stream('bench_flush')"
    ;;
batch)
    sql -c "UPDATE meter.meters SET value = CASE WHEN aggregation = 'max' THEN NULL ELSE 0 END, groups = '[]',
                   carry_first = '{}', carry_last = '{}', record_count = 0, first_record_at = NULL, last_record_at = NULL" \
        -c "TRUNCATE meter.dedupe_keys, meter.dedupe_ranges, meter.usage_audit_batches, meter.rejected, meter.usage" \
        -c "SELECT meter.alter_stream('bench', audit => true)" \
        -c "INSERT INTO meter.usage (stream, record) SELECT 'bench', record FROM bench.records WHERE i <= $size ORDER BY i"
    statement="SELECT status FROM meter.run_stream('bench')"
    ;;
ingest)
    [ -f "$dir/ingest.sql" ] || { echo "no $dir/ingest.sql: run the benchmark with KEEP_CLUSTER=1 first" >&2; exit 1; }
    sql -c "DELETE FROM meter.usage WHERE stream = 'bench_ingest'"
    batch=$(awk -F'},{' 'NR == 1 { print NF; exit }' "$dir/ingest.sql")
    statement=$(head -n $(((size + batch - 1) / batch)) "$dir/ingest.sql")
    ;;
copy)
    [ -f "$dir/records.ndjson" ] || { echo "no $dir/records.ndjson: run the benchmark with KEEP_CLUSTER=1 first" >&2; exit 1; }
    # Where the server (user postgres) can read it.
    records=$(mktemp /tmp/meter_ext_copy.XXXXXX)
    trap 'rm -f "$records"' EXIT
    head -n "$size" "$dir/records.ndjson" >"$records"
    chmod a+r "$records"
    sql -c "TRUNCATE bench.copy_target"
    statement="COPY bench.copy_target (record) FROM '$records'"
    ;;
*) echo "unknown workload $workload (flush, batch, ingest or copy)" >&2; exit 2 ;;
esac
sql -c "VACUUM FULL meter.meters" -c "VACUUM ANALYZE" -c "CHECKPOINT"
ctl stop
out="$dir/callgrind.out"
echo "$statement" | sudo -u postgres valgrind --tool=callgrind --callgrind-out-file="$out" \
    "$bin/postgres" --single -D "$dir/data" -c shared_preload_libraries=meter_ext bench >"$dir/callgrind.log" 2>&1 || true
case "$workload" in
ingest | copy) done_pattern='backend>' ;;
*) done_pattern='status = "COMPLETED"' ;;
esac
! grep -q ERROR "$dir/callgrind.log" && grep -q "$done_pattern" "$dir/callgrind.log" ||
    { echo "the $workload did not complete: $dir/callgrind.log" >&2; ctl start; exit 1; }
ctl start
echo "$workload of $size: $(sed -n 's/.*Collected : //p' "$dir/callgrind.log") instructions (profile: $out)"
