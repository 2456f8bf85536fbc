//! Advisory locks: their keys in one place.
//!
//! All are transaction-scoped: released at commit or rollback, and by a backend
//! that dies.

use crate::errors::Result;
use crate::sql;

/// meter_ext's advisory lock namespace ("metr"), the first of the two keys.
pub const NAMESPACE: i32 = 0x6d65_7472;
/// Second key of the outbox lock; streams use their id (from 1, `id_key`).
const OUTBOX: i64 = 0;

/// The second key (an int4) of a row's lock, in SQL over the row's `id` (`id_key`
/// in Rust): its low 31 bits, which is the id itself below 2^31. Ids 2^31 apart
/// share a lock, which only makes one wait for the other; a plain `id::int` would
/// fail every call past 2^31 with "integer out of range". A macro, so that
/// statements can `concat!` it into a literal.
macro_rules! id_key_sql {
    () => {
        "(id & 2147483647)::int"
    };
}
pub(crate) use id_key_sql;
/// The same, for `format!`.
pub const ID_KEY_SQL: &str = id_key_sql!();

fn id_key(id: i64) -> i32 {
    (id & 0x7fff_ffff) as i32
}

/// The settings a transaction meters or flushes by: a stream's (rules, fields)
/// or a meter type's (aggregation, schedule). Readers share-lock them for the
/// transaction as they read them (`read_shared`, from `catalog::load_stream` and
/// `catalog::load_types`);
/// `alter_*` and `drop_*` lock them exclusively before they change them. A change
/// so waits for the transactions using the old settings, and those that read
/// after it see the new ones.
///
/// Advisory locks, not `FOR SHARE` on the rows: that wrote the row (a heap page
/// and WAL) on every ingest, and concurrent ingests made a MultiXact each, which
/// every table of the database must later be vacuumed for.
#[derive(Debug, Clone, Copy)]
pub enum Settings {
    Stream,
    MeterType,
}

impl Settings {
    /// The first key of the settings' locks; the second is the stream's or type's id.
    pub fn key(self) -> i32 {
        match self {
            Settings::Stream => 0x6d65_7473,    // "mets"
            Settings::MeterType => 0x6d65_7474, // "mett"
        }
    }
}

/// Reads settings share-locked. `read` runs one statement that returns each row
/// with its id and `pg_try_advisory_xact_lock_shared(settings.key(), id_key_sql!())`
/// (whether the lock was had without waiting). If a change holds some row's lock,
/// this waits for it and reads again: the first read may predate the change. (A
/// change that commits between the statement's start and its lock, microseconds,
/// is not seen: the reader counts as having read before it.)
pub fn read_shared<T>(settings: Settings, mut read: impl FnMut() -> Result<Vec<(i64, bool, T)>>) -> Result<Vec<T>> {
    loop {
        let rows = read()?;
        let mut changing: Vec<i64> = rows
            .iter()
            .filter(|(_, locked, _)| !locked)
            .map(|(id, ..)| *id)
            .collect();
        if changing.is_empty() {
            return Ok(rows.into_iter().map(|(.., row)| row).collect());
        }
        changing.sort_unstable();
        share(settings, &changing)?;
    }
}

/// Share-locks these settings (`ids`, ascending), waiting for any change under way.
fn share(settings: Settings, ids: &[i64]) -> Result<()> {
    let keys: Vec<i32> = ids.iter().map(|id| id_key(*id)).collect();
    sql::execute(
        "SELECT pg_catalog.pg_advisory_xact_lock_shared($1, key) FROM pg_catalog.unnest($2::int[]) AS key",
        &[settings.key().into(), keys.into()],
    )?;
    Ok(())
}

/// Locks these settings for a change: waits for the transactions using them.
pub fn change(settings: Settings, id: i64) -> Result<()> {
    sql::execute(
        "SELECT pg_catalog.pg_advisory_xact_lock($1, $2)",
        &[settings.key().into(), id_key(id).into()],
    )?;
    Ok(())
}

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
    let query = format!("SELECT coalesce(pg_catalog.{function}($1, $2)::text, 'true')");
    Ok(sql::one::<String>(&query, &[NAMESPACE.into(), id_key(key).into()])?.as_deref() == Some("true"))
}

/// A backend (other than this one) holding a stream's lock, for error messages.
pub fn stream_holder(stream_id: i64) -> Result<Option<i32>> {
    sql::one::<i32>(
        "SELECT pid FROM pg_catalog.pg_locks
          WHERE locktype = 'advisory' AND classid = $1::oid AND objid = $2::oid AND objsubid = 2 AND granted
            AND pid <> pg_catalog.pg_backend_pid() LIMIT 1",
        &[(NAMESPACE as i64).into(), (id_key(stream_id) as i64).into()],
    )
}
