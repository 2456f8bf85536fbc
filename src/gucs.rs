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

pub fn init() {
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

pub fn chunk_size() -> i64 {
    CHUNK_SIZE.get() as i64
}
