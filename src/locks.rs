//! Advisory locks: their keys in one place.
//!
//! All are transaction-scoped: released at commit or rollback, and by a backend
//! that dies.

use crate::errors::Result;
use crate::sql;

/// meter_ext's advisory lock namespace ("metr"), the first of the two keys.
pub const NAMESPACE: i32 = 0x6d65_7472;
/// Second key of the outbox lock; streams use their id (from 1).
const OUTBOX: i64 = 0;

/// The lock a transaction holds while it runs (or scans) a stream.
pub fn stream(stream_id: i64, wait: bool) -> Result<bool> {
    take(stream_id, wait)
}

/// Taken by every transaction that writes flushed records, before it allocates
/// their flush ids: such transactions commit one at a time, in flush-id order, so a
/// consumer that has seen flush id N will never later find a smaller one.
pub fn outbox() -> Result<()> {
    take(OUTBOX, true).map(|_| ())
}

fn take(key: i64, wait: bool) -> Result<bool> {
    let function = if wait {
        "pg_advisory_xact_lock"
    } else {
        "pg_try_advisory_xact_lock"
    };
    let query = format!("SELECT coalesce(pg_catalog.{function}($1, $2::int)::text, 'true')");
    Ok(sql::one::<String>(&query, &[NAMESPACE.into(), key.into()])?.as_deref() == Some("true"))
}

/// A backend (other than this one) holding a stream's lock, for error messages.
pub fn stream_holder(stream_id: i64) -> Result<Option<i32>> {
    sql::one::<i32>(
        "SELECT pid FROM pg_catalog.pg_locks
          WHERE locktype = 'advisory' AND classid = $1::oid AND objid = $2::oid AND objsubid = 2 AND granted
            AND pid <> pg_catalog.pg_backend_pid() LIMIT 1",
        &[(NAMESPACE as i64).into(), stream_id.into()],
    )
}
