#!/usr/bin/env bash
# Counts the instructions of one flush or one batch run under callgrind, on a
# cluster kept by a benchmark run (KEEP_CLUSTER=1 bench/bench.sh). On a shared
# machine the same run's time moves by a third; its instruction count does not,
# so compare builds with this, and confirm with the benchmark.
#
#   bench/callgrind.sh DIR flush [METERS]    # a period-end flush of METERS meters (20000)
#   bench/callgrind.sh DIR batch [RECORDS]   # run_stream over RECORDS records, audit on (20000)
#
# The backend runs in single-user mode (valgrind cannot join a running
# postmaster); the cluster is stopped for it and started again afterwards. The
# profile is left in DIR/callgrind.out: `callgrind_annotate --inclusive=yes` it.
set -euo pipefail

dir=${1:?usage: bench/callgrind.sh DIR flush|batch [N]}
workload=${2:?usage: bench/callgrind.sh DIR flush|batch [N]}
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
        -c "TRUNCATE meter.dedupe_keys, meter.usage_audit_batches, meter.rejected, meter.usage" \
        -c "SELECT meter.alter_stream('bench', audit => true)" \
        -c "INSERT INTO meter.usage (stream, record) SELECT 'bench', record FROM bench.records WHERE i <= $size ORDER BY i"
    statement="SELECT status FROM meter.run_stream('bench')"
    ;;
*) echo "unknown workload $workload (flush or batch)" >&2; exit 2 ;;
esac
sql -c "VACUUM FULL meter.meters" -c "VACUUM ANALYZE" -c "CHECKPOINT"
ctl stop
out="$dir/callgrind.out"
echo "$statement" | sudo -u postgres valgrind --tool=callgrind --callgrind-out-file="$out" \
    "$bin/postgres" --single -D "$dir/data" -c shared_preload_libraries=meter_ext bench >"$dir/callgrind.log" 2>&1 || true
grep -q 'status = "COMPLETED"' "$dir/callgrind.log" ||
    { echo "the $workload did not complete: $dir/callgrind.log" >&2; ctl start; exit 1; }
ctl start
echo "$workload of $size: $(sed -n 's/.*Collected : //p' "$dir/callgrind.log") instructions (profile: $out)"
