# meter_ext — usage metering inside PostgreSQL 15.
#
#   make run    build, install, start a local cluster with a demo, print how to connect
#   make test   every test layer: unit and property tests, #[pg_test]s, integration tests
#   make stop   stop the local cluster
#   make bench  the benchmark against plain-SQL baselines (BENCHMARKS.md)
#
# Both `run` and `test` install what they need (apt packages, cargo-pgrx) when missing.

PG_CONFIG   := /usr/lib/postgresql/15/bin/pg_config
RUN_DIR     := $(CURDIR)/.run/cluster
RUN_PORT    ?= 28815
RUN_DB      := meter_demo
PSQL_RUN    := psql -h localhost -p $(RUN_PORT) -U postgres
export CARGO_TERM_COLOR ?= never

.PHONY: run stop test setup install examples-setup unit-test pg-test integration-test bench bench-check clean

setup:
	@scripts/setup.sh

# The current version, plus the first release and the upgrade scripts from it.
install: setup
	cargo pgrx install --release --pg-config $(PG_CONFIG)
	install -m 644 sql/upgrades/*.sql $$($(PG_CONFIG) --sharedir)/extension/

run: install
	@scripts/cluster.sh start $(RUN_DIR) $(RUN_PORT) $(RUN_DB)
	@$(PSQL_RUN) -d postgres -qX -c "SET client_min_messages = warning" -c "DROP DATABASE IF EXISTS $(RUN_DB) WITH (FORCE)" -c "CREATE DATABASE $(RUN_DB)"
	@$(PSQL_RUN) -d $(RUN_DB) -qX -v ON_ERROR_STOP=1 -f scripts/demo.sql
	@echo
	@echo "meter_ext is running. Connect with:"
	@echo "    $(PSQL_RUN) $(RUN_DB)"
	@echo "Stop the cluster with: make stop"

stop:
	@scripts/cluster.sh stop $(RUN_DIR)

test: setup unit-test pg-test integration-test bench-check

# Pure-Rust domain logic with its property tests (no Postgres needed).
unit-test:
	cargo test --lib --features pg15 -- --skip pg_tests

# #[pg_test]s, each inside a rolled-back transaction of a temporary cluster. One at
# a time: tests create streams (DDL) in transactions held open to the end.
pg-test:
	@dir=$$(mktemp -d /tmp/meter_ext_pgtest.XXXXXX) && chown postgres: $$dir && \
	  RUST_TEST_THREADS=1 cargo pgrx test pg15 pg_tests --runas postgres --pgdata $$dir/pgdata; status=$$?; \
	  sudo -u postgres /usr/lib/postgresql/15/bin/pg_ctl -D $$dir/pgdata -m immediate stop >/dev/null 2>&1; \
	  rm -rf $$dir; exit $$status

# Against a real cluster with meter_ext and pg_cron preloaded: commits, NOTIFY,
# the background worker, pg_cron, crashes and concurrency.
integration-test: install examples-setup
	@scripts/integration.sh

# psycopg 3 and node-postgres for the client examples the integration tests run.
examples-setup:
	@scripts/examples-setup.sh

# The benchmark (SPEC §11): every workload against a plain-SQL baseline in one run.
bench: install examples-setup
	@mkdir -p .bench
	RESULTS=.bench/results.md bench/bench.sh

# The benchmark at 20 000 records, asserting the same meters as the baseline.
bench-check: install examples-setup
	bench/bench.sh --check

clean: stop
	cargo clean
	rm -rf .run
