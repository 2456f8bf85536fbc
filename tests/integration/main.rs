//! Integration tests against a real cluster with meter_ext and pg_cron preloaded
//! (run them with `make integration-test`).

mod support;

mod api;
mod concurrency;
mod crash;
mod cron;
mod examples;
mod fuzz;
mod install;
mod limits;
mod outbox;
mod plans;
mod readme;
mod sessions;
mod upgrade;
mod worker;
