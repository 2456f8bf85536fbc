//! The background worker (SPEC §9): every `meter_ext.scan_interval` it calls
//! `meter.scan_once()` in `meter_ext.database`. Registered only when meter_ext is
//! in `shared_preload_libraries`; restarted 10 s after it exits for any reason
//! but a server shutdown.

use std::time::Duration;

use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder, BgWorkerStartTime, SignalWakeFlags};
use pgrx::prelude::*;

use crate::gucs;

const WORKER_TYPE: &str = "meter_ext scan worker";

/// From `_PG_init`: registers the worker when preloading, and only then.
pub fn register() {
    if !unsafe { pg_sys::process_shared_preload_libraries_in_progress } {
        return;
    }
    BackgroundWorkerBuilder::new(WORKER_TYPE)
        .set_type(WORKER_TYPE)
        .set_library("meter_ext")
        .set_function("meter_ext_scan_worker_main")
        .enable_spi_access()
        .set_start_time(BgWorkerStartTime::RecoveryFinished)
        .set_restart_time(Some(Duration::from_secs(10)))
        .load();
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn meter_ext_scan_worker_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let database = gucs::database();
    BackgroundWorker::connect_worker_to_spi(Some(&database), None);
    log!(
        "{WORKER_TYPE} started: scanning database \"{database}\" every {}s",
        gucs::scan_interval().as_secs()
    );
    let mut waiting_for_extension = false;
    while BackgroundWorker::wait_latch(Some(gucs::scan_interval())) {
        if BackgroundWorker::sighup_received() {
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
            if gucs::database() != database {
                log!(
                    "{WORKER_TYPE}: meter_ext.database changed; restarting to connect to \"{}\"",
                    gucs::database()
                );
                unsafe { pg_sys::proc_exit(1) };
            }
        }
        if !gucs::WORKER_ENABLED.get() {
            continue;
        }
        let installed = BackgroundWorker::transaction(|| {
            let installed =
                Spi::get_one::<bool>("SELECT EXISTS (SELECT FROM pg_catalog.pg_extension WHERE extname = 'meter_ext')")
                    .ok()
                    .flatten()
                    .unwrap_or(false);
            if installed {
                unsafe {
                    pg_sys::pgstat_report_activity(
                        pg_sys::BackendState::STATE_RUNNING,
                        c"SELECT meter.scan_once()".as_ptr(),
                    );
                }
                Spi::run("SELECT count(*) FROM meter.scan_once()")
                    .expect("meter.scan_once() reports per-stream errors itself");
                unsafe { pg_sys::pgstat_report_activity(pg_sys::BackendState::STATE_IDLE, std::ptr::null()) };
            }
            installed
        });
        // Said once, not at every scan: the worker waits quietly for CREATE EXTENSION.
        if !installed && !waiting_for_extension {
            log!("{WORKER_TYPE}: meter_ext is not installed in database \"{database}\" yet; waiting for CREATE EXTENSION");
        }
        waiting_for_extension = !installed;
    }
    // SIGTERM: from a shutdown (the worker is not restarted) or pg_terminate_backend
    // (it is, after 10 s: exit code 1 asks for that).
    log!("{WORKER_TYPE} stopping");
    unsafe { pg_sys::proc_exit(1) };
}
