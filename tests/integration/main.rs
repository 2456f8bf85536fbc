//! Integration tests against a real cluster with meter_ext and pg_cron preloaded
//! (run them with `make integration-test`).

mod support;

mod api;
mod cron;
mod install;
mod outbox;
mod sessions;
mod worker;
