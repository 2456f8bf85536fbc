# meter_ext — usage metering inside PostgreSQL 15.
#
#   make run    build, install, start a local cluster with a demo, print how to connect
#   make test   every test layer: unit and property tests, #[pg_test]s, integration tests
#   make stop   stop the local cluster
#
# Both `run` and `test` install what they need (apt packages, cargo-pgrx) when missing.

PG_CONFIG   := /usr/lib/postgresql/15/bin/pg_config
RUN_DIR     := $(CURDIR)/.run/cluster
RUN_PORT    ?= 28815
RUN_DB      := meter_demo
PSQL_RUN    := psql -h localhost -p $(RUN_PORT) -U postgres
export CARGO_TERM_COLOR ?= never

.PHONY: run stop test setup install unit-test pg-test integration-test clean

setup:
	@scripts/setup.sh

install: setup
	cargo pgrx install --release --pg-config $(PG_CONFIG)

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

test: setup unit-test pg-test integration-test

# Pure-Rust domain logic with its property tests (no Postgres needed).
unit-test:
	cargo test --lib --features pg15 -- --skip pg_tests

# #[pg_test]s, each inside a rolled-back transaction of a temporary cluster.
pg-test:
	@dir=$$(mktemp -d /tmp/meter_ext_pgtest.XXXXXX) && chown postgres: $$dir && \
	  cargo pgrx test pg15 pg_tests --runas postgres --pgdata $$dir/pgdata; status=$$?; \
	  sudo -u postgres /usr/lib/postgresql/15/bin/pg_ctl -D $$dir/pgdata -m immediate stop >/dev/null 2>&1; \
	  rm -rf $$dir; exit $$status

# Against a real cluster with meter_ext and pg_cron preloaded: commits, NOTIFY,
# the background worker, pg_cron, crashes and concurrency.
integration-test: install
	@scripts/integration.sh

clean: stop
	cargo clean
	rm -rf .run
