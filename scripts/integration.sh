#!/usr/bin/env bash
# Runs the integration tests (tests/integration) against a throwaway cluster with
# meter_ext and pg_cron preloaded. The installed meter_ext must be current
# (`make integration-test` installs it first).
set -euo pipefail
cd "$(dirname "$0")/.."

dir=$(mktemp -d /tmp/meter_ext_it.XXXXXX)
chown postgres: "$dir"
port=${METER_TEST_PORT:-}
if [ -z "$port" ]; then
    # A free port: nothing answers on it.
    for _ in $(seq 50); do
        port=$((30000 + RANDOM % 10000))
        (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null || break
    done
fi
cleanup() {
    scripts/cluster.sh stop "$dir" || true
    [ "${KEEP_CLUSTER:-}" ] || rm -rf "$dir"
}
trap cleanup EXIT

scripts/cluster.sh start "$dir" "$port" meter_test
echo "==> integration tests against localhost:$port (log: $dir/postgres.log)"
METER_TEST_PORT=$port METER_TEST_DIR=$dir \
    cargo test --features integration --test integration -- --test-threads="${TEST_THREADS:-2}" "$@"
