//! Every `meter_ext.*` setting, registered once from `_PG_init`.

use std::ffi::CString;

use jiff::SignedDuration;
use pgrx::{GucContext, GucFlags, GucRegistry, GucSetting};

/// How far in the future a record's timestamp may be (clock skew), in seconds.
pub static FUTURE_TOLERANCE: GucSetting<i32> = GucSetting::<i32>::new(300);
/// How long a record id is remembered for deduplication, in seconds.
pub static DEDUPE_RETENTION: GucSetting<i32> = GucSetting::<i32>::new(35 * 24 * 3600);
/// Records per chunk of a run (and per commit of `CALL meter.execute_stream`).
pub static CHUNK_SIZE: GucSetting<i32> = GucSetting::<i32>::new(10_000);
/// Percent of the NOTIFY queue in use at which flushes stop announcing each record
/// and ring the `meter_flushed` doorbell once per chunk instead.
pub static NOTIFY_QUEUE_LIMIT: GucSetting<i32> = GucSetting::<i32>::new(50);
/// Flushed records a transaction announces one by one (`meter_ext.notify_record_limit`).
pub static NOTIFY_RECORD_LIMIT: GucSetting<i32> = GucSetting::<i32>::new(10_000);
/// Whether `meter.ingest` into a batch stream looks its record ids up among those
/// already metered (`meter_ext.ingest_checks_metered_ids`).
pub static INGEST_CHECKS_METERED_IDS: GucSetting<bool> = GucSetting::<bool>::new(true);

/// The database the background worker scans (it connects to one).
pub static DATABASE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(Some(c"postgres"));
/// Seconds between the worker's scans of realtime streams.
pub static SCAN_INTERVAL: GucSetting<i32> = GucSetting::<i32>::new(60);
/// Whether the background worker scans at all.
pub static WORKER_ENABLED: GucSetting<bool> = GucSetting::<bool>::new(true);

pub fn init() {
    GucRegistry::define_string_guc(
        c"meter_ext.database",
        c"The database whose realtime streams the background worker scans.",
        c"The worker connects to this database; after a change and a reload it restarts and connects anew.",
        &DATABASE,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"meter_ext.scan_interval",
        c"Time between the background worker's scans of realtime streams for meters whose period ended.",
        c"Accepts units: '60s', '1min'. Reloadable.",
        &SCAN_INTERVAL,
        1,
        86_400,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_bool_guc(
        c"meter_ext.worker_enabled",
        c"Whether the background worker scans realtime streams.",
        c"Off: the worker stays idle (meter.scan_once() still works, from pg_cron for example). Reloadable.",
        &WORKER_ENABLED,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"meter_ext.future_tolerance",
        c"How far in the future a usage record's timestamp may be before it is rejected.",
        c"Covers clock skew between producers and the database. Accepts units: '5min', '30s'.",
        &FUTURE_TOLERANCE,
        0,
        i32::MAX,
        GucContext::Userset,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"meter_ext.dedupe_retention",
        c"How long a record id is remembered: a record with a seen id counts once within this window.",
        c"Accepts units: '35d', '72h'. Older ids are forgotten and purged by meter.purge().",
        &DEDUPE_RETENTION,
        0,
        i32::MAX,
        GucContext::Userset,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"meter_ext.chunk_size",
        c"Usage records processed per chunk of a stream run.",
        c"CALL meter.execute_stream commits after each chunk; a run's memory is bounded by it.",
        &CHUNK_SIZE,
        1,
        10_000_000,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"meter_ext.notify_queue_limit",
        c"Percent of the NOTIFY queue in use at which flushes announce one summary per chunk instead of each record.",
        c"The outbox (meter.flushed) always holds every record; a slow listener must not make commits fail on a full queue.",
        &NOTIFY_QUEUE_LIMIT,
        0,
        100,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"meter_ext.notify_record_limit",
        c"Flushed records a transaction announces one by one on meter_flushed; past them, each chunk rings once with its range of flush ids.",
        c"PostgreSQL holds a transaction's notifications in memory until it commits, about 1 kB per record: a flush of a million meters in one transaction held a gigabyte. The outbox (meter.flushed) always holds every record.",
        &NOTIFY_RECORD_LIMIT,
        0,
        i32::MAX,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_bool_guc(
        c"meter_ext.ingest_checks_metered_ids",
        c"Whether meter.ingest into a batch stream looks each record id up among the ids already metered, to report those duplicates at once.",
        c"Off: ingest reports only ids repeated within the call; the run still counts every duplicate once, so meters are the same either way. Each lookup is an index descent: with random ids (UUIDs) and millions of ids metered, most of ingest's time.",
        &INGEST_CHECKS_METERED_IDS,
        GucContext::Userset,
        GucFlags::default(),
    );
    unsafe {
        let prefix = CString::new("meter_ext").unwrap();
        pgrx::pg_sys::MarkGUCPrefixReserved(prefix.as_ptr());
    }
}

pub fn future_tolerance() -> SignedDuration {
    SignedDuration::from_secs(FUTURE_TOLERANCE.get() as i64)
}

pub fn dedupe_retention() -> SignedDuration {
    SignedDuration::from_secs(DEDUPE_RETENTION.get() as i64)
}

pub fn ingest_checks_metered_ids() -> bool {
    INGEST_CHECKS_METERED_IDS.get()
}

pub fn chunk_size() -> i64 {
    CHUNK_SIZE.get() as i64
}

/// `chunk_size` as a length (the setting is at least 1).
pub fn chunk_len() -> usize {
    CHUNK_SIZE.get() as usize
}

pub fn database() -> String {
    DATABASE
        .get()
        .map(|c| c.to_string_lossy().into_owned())
        .unwrap_or_else(|| "postgres".into())
}

pub fn scan_interval() -> std::time::Duration {
    std::time::Duration::from_secs(SCAN_INTERVAL.get().max(1) as u64)
}
