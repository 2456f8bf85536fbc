//! In-database tests (`cargo pgrx test`): each runs in a transaction that is rolled back.

mod catalog;
mod jsonb;
mod outbox;
mod processing;
mod realtime;
mod runs;
mod security;
mod streams;
pub mod support;
