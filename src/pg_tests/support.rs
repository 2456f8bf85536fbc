//! Helpers for the in-database tests.

use pgrx::prelude::*;
use pgrx::JsonB;

use crate::processor::Counts;

pub fn sql_i64(q: &str) -> i64 {
    Spi::get_one::<i64>(q).unwrap().unwrap()
}

pub fn sql_json(q: &str) -> serde_json::Value {
    Spi::get_one::<JsonB>(q).unwrap().unwrap().0
}

pub fn sql_text(q: &str) -> Option<String> {
    Spi::get_one::<String>(q).unwrap()
}

pub fn run(q: &str) {
    Spi::run(q).unwrap_or_else(|e| panic!("{q}: {e}"));
}

/// Runs a statement that should fail; returns its SQLSTATE and message. The
/// failed statement is rolled back to a savepoint so the test can go on.
pub fn sql_error(statement: &str) -> Option<(PgSqlErrorCode, String)> {
    sql_error_as("", statement)
}

/// As `sql_error`, as `role` (empty: the current role).
pub fn sql_error_as(role: &str, statement: &str) -> Option<(PgSqlErrorCode, String)> {
    let statement = statement.to_string();
    let role = role.to_string();
    error_of(move || {
        if !role.is_empty() {
            Spi::run(&format!("SET LOCAL ROLE {role}")).unwrap();
        }
        Spi::run(&statement).unwrap();
    })
}

/// The error `f` raises, if any: code and message. As `sql_error`.
pub fn error_of(f: impl FnOnce() + std::panic::UnwindSafe) -> Option<(PgSqlErrorCode, String)> {
    // As PL/pgSQL's exception blocks do: a subtransaction around the statement,
    // rolled back whatever happens, with memory context and resource owner restored.
    let (context, owner) = unsafe { (pg_sys::CurrentMemoryContext, pg_sys::CurrentResourceOwner) };
    unsafe {
        pg_sys::BeginInternalSubTransaction(std::ptr::null());
        pg_sys::MemoryContextSwitchTo(context);
    }
    let result = PgTryBuilder::new(|| {
        f();
        None
    })
    .catch_others(|e| match e {
        pg_sys::panic::CaughtError::PostgresError(r) => Some((r.sql_error_code(), r.message().to_string())),
        other => Some((PgSqlErrorCode::ERRCODE_INTERNAL_ERROR, format!("{other:?}"))),
    })
    .execute();
    unsafe {
        pg_sys::MemoryContextSwitchTo(context);
        pg_sys::RollbackAndReleaseCurrentSubTransaction();
        pg_sys::MemoryContextSwitchTo(context);
        pg_sys::CurrentResourceOwner = owner;
    }
    result
}

/// The message of the error a statement raises.
pub fn error_message(statement: &str) -> String {
    sql_error(statement)
        .unwrap_or_else(|| panic!("no error from {statement}"))
        .1
}

/// Runs a batch stream (`meter.run_stream`) and returns its session's counts.
pub fn process(stream: &str) -> Counts {
    let row = Spi::get_three_with_args::<i64, i64, i64>(
        "SELECT (s).records_metered, (s).records_duplicate, (s).records_rejected FROM meter.run_stream($1) s",
        &[stream.into()],
    )
    .unwrap();
    Counts {
        metered: row.0.unwrap(),
        duplicates: row.1.unwrap(),
        rejected: row.2.unwrap(),
    }
}

/// Counts as `process` returns them: metered, duplicates, rejected.
pub fn counts(metered: i64, duplicates: i64, rejected: i64) -> Counts {
    Counts {
        metered,
        duplicates,
        rejected,
    }
}

/// Every row of a query as JSON (for comparing tables before and after).
pub fn snapshot(query: &str) -> serde_json::Value {
    sql_json(&format!(
        "SELECT coalesce(jsonb_agg(to_jsonb(t) ORDER BY to_jsonb(t)::text), '[]') FROM ({query}) t"
    ))
}

/// The rows of a query as a JSON array, in the query's order.
pub fn rows(query: &str) -> serde_json::Value {
    sql_json(&format!(
        "SELECT coalesce(jsonb_agg(to_jsonb(t)), '[]') FROM ({query}) t"
    ))
}
