//! meter_ext: usage metering inside PostgreSQL (see README.md and SPEC).
//!
//! Pure domain logic (no Postgres): `schedule`, `aggregate`.
//! Postgres layer: `catalog` (SPI persistence), `api` (the SQL functions).

use pgrx::prelude::*;

pgrx::pg_module_magic!(name, version);

/// Rust's allocations (parsed records, meter state) use mimalloc; PostgreSQL's own
/// memory is untouched (palloc).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

pub mod aggregate;
pub mod record;
pub mod rules;
pub mod schedule;
pub mod session;

mod api;
mod append;
mod audit;
mod catalog;
mod convert;
mod dedupe;
mod errors;
mod flush;
mod flushed_record;
mod gucs;
mod inbox;
mod jsonb;
mod locks;
mod outbox;
mod processor;
mod realtime;
mod retention;
mod run;
mod sessions;
mod sql;
mod worker;

// Hand-written DDL, in dependency order; grants last.
extension_sql_file!("../sql/schema.sql", name = "schema", bootstrap);
extension_sql_file!(
    "../sql/meter_record.sql",
    name = "meter_record",
    requires = ["schema", api::iso_utc]
);
extension_sql_file!("../sql/usage.sql", name = "usage", requires = ["schema"]);
extension_sql_file!(
    "../sql/sessions.sql",
    name = "sessions",
    requires = ["meter_record", "usage"]
);
extension_sql_file!("../sql/consumers.sql", name = "consumers", requires = ["sessions"]);
extension_sql_file!("../sql/audit.sql", name = "audit", requires = ["usage"]);
extension_sql_file!(
    "../sql/realtime.sql",
    name = "realtime",
    requires = ["sessions", api::scan_stream, api::fold_session_counters]
);
extension_sql_file!(
    "../sql/runs.sql",
    name = "runs",
    requires = [
        "sessions",
        api::run_begin,
        api::run_to_end,
        api::run_step,
        api::run_fail
    ]
);
extension_sql_file!("../sql/report.sql", name = "report", requires = ["sessions"]);
extension_sql_file!("../sql/grants.sql", name = "grants", finalize);

#[cfg(any(test, feature = "pg_test"))]
mod pg_tests;

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    gucs::init();
    // Only when preloaded (shared_preload_libraries): the periodic scan.
    worker::register();
}

/// Required by `cargo pgrx test`.
#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    #[must_use]
    pub fn postgresql_conf_options() -> Vec<&'static str> {
        vec![]
    }
}
