//! Getting usage records in (`ingest`, plain INSERT/COPY), reading them back in
//! chunks for a run, and sending rejected records back.

use std::collections::HashSet;

use pgrx::prelude::*;
use serde_json::Value;

use crate::catalog::{Stream, StreamMode};
use crate::convert::{to_timestamptz, transaction_now};
use crate::errors::{MeterError, Result};
use crate::gucs;
use crate::processor::{insert_rejected, Input, Outcome};
use crate::record::{extract, Clock};
use crate::sql;

/// `ingest`'s answer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Ingested {
    pub accepted: i64,
    pub duplicates: i64,
    pub rejected: i64,
}

/// An object, or an array of objects (anything else inside the array is a
/// rejected record, not an error: the caller's other records still count).
pub fn records_of(records: Value) -> Result<Vec<Value>> {
    match records {
        Value::Array(items) => Ok(items),
        Value::Object(_) => Ok(vec![records]),
        other => Err(MeterError::InvalidParameter(format!(
            "records must be a JSON object or an array of objects, not {}",
            match other {
                Value::Null => "null",
                Value::Bool(_) => "a boolean",
                Value::Number(_) => "a number",
                _ => "a string",
            }
        ))),
    }
}

/// `meter.ingest`: a realtime stream meters the records now (see `realtime`); a
/// batch stream checks what it can without rules and queues the rest in the inbox
/// for its next run.
pub fn ingest(stream: &Stream, records: Vec<Value>) -> Result<Ingested> {
    match stream.mode {
        StreamMode::Realtime => crate::realtime::ingest(stream, records),
        StreamMode::Batch => queue(stream, records),
    }
}

/// Queues records for a batch run. Records that can never be metered (not an
/// object, no user id, bad timestamp…) are rejected now; records whose id was
/// already metered are reported as duplicates, and queued anyway so that the run
/// counts them in its session.
pub fn queue(stream: &Stream, records: Vec<Value>) -> Result<Ingested> {
    let clock = Clock {
        now: transaction_now(),
        future_tolerance: gucs::future_tolerance(),
    };
    let mut result = Ingested::default();
    let mut queued: Vec<String> = Vec::with_capacity(records.len());
    let mut ids_in_batch: HashSet<String> = HashSet::new();
    let mut repeated = 0i64;
    let mut rejected: Vec<(Value, Outcome)> = Vec::new();
    for record in records {
        match extract(&record, &stream.fields, &clock) {
            Ok(extracted) => {
                if let Some(id) = extracted.record_id {
                    if !ids_in_batch.insert(id) {
                        repeated += 1;
                    }
                }
                queued.push(record.to_string());
            }
            Err(rejection) => {
                let outcome = Outcome::Rejected {
                    code: rejection.code(),
                    reason: rejection.to_string(),
                    rule: None,
                };
                rejected.push((record, outcome));
            }
        }
    }
    let already_metered = if ids_in_batch.is_empty() {
        0
    } else {
        let forget_before = to_timestamptz(clock.now - gucs::dedupe_retention());
        sql::one::<i64>(
            "SELECT count(*) FROM meter.dedupe_keys WHERE stream_id = $1 AND record_id = ANY($2) AND seen_at >= $3",
            &[
                stream.id.into(),
                ids_in_batch.into_iter().collect::<Vec<_>>().into(),
                forget_before.into(),
            ],
        )?
        .unwrap_or(0)
    };
    result.duplicates = repeated + already_metered;
    result.accepted = queued.len() as i64 - result.duplicates;
    result.rejected = rejected.len() as i64;
    insert_rejected(&stream.name, None, rejected.iter().map(|(r, o)| (r, o)))?;
    if !queued.is_empty() {
        sql::execute(
            "INSERT INTO meter.usage (stream, record) SELECT $1, r::jsonb FROM unnest($2::text[]) AS r",
            &[stream.name.as_str().into(), queued.into()],
        )?;
    }
    Ok(result)
}

/// Takes the next chunk of a stream's pending records out of the inbox, oldest
/// first. The rows are deleted in the caller's transaction: if it rolls back,
/// they are pending again.
pub fn take_chunk(stream: &str, limit: i64) -> Result<Vec<Input>> {
    read_chunk(
        "DELETE FROM meter.usage
          WHERE (stream, id) IN (SELECT stream, id FROM meter.usage WHERE stream = $1 ORDER BY id LIMIT $2)
         RETURNING id, record::text",
        &[stream.into(), limit.into()],
    )
}

/// Reads pending records after `after_id` without taking them (DEBUG runs).
pub fn peek_chunk(stream: &str, after_id: i64, limit: i64) -> Result<Vec<Input>> {
    read_chunk(
        "SELECT id, record::text FROM meter.usage WHERE stream = $1 AND id > $3 ORDER BY id LIMIT $2",
        &[stream.into(), limit.into(), after_id.into()],
    )
}

fn read_chunk(query: &str, args: &[pgrx::datum::DatumWithOid]) -> Result<Vec<Input>> {
    let mut inputs = Spi::connect_mut(|client| -> Result<Vec<Input>> {
        let rows = client.update(query, None, args)?;
        let mut inputs = Vec::with_capacity(rows.len());
        for row in rows {
            let text = row.get::<String>(2)?.unwrap_or_default();
            inputs.push(Input {
                usage_id: row.get::<i64>(1)?,
                // jsonb always prints valid JSON.
                record: serde_json::from_str(&text).unwrap_or(Value::Null),
            });
        }
        Ok(inputs)
    })?;
    inputs.sort_by_key(|i| i.usage_id);
    Ok(inputs)
}

pub fn has_pending(stream: &str) -> Result<bool> {
    Ok(sql::one::<bool>(
        "SELECT EXISTS (SELECT FROM meter.usage WHERE stream = $1)",
        &[stream.into()],
    )?
    .unwrap_or(false))
}

/// Sends rejected records (as they are now: fix them first with UPDATE) back to
/// their stream's inbox. Each is reprocessed once; returns how many were sent.
pub fn reprocess_rejected(ids: &[i64]) -> Result<i64> {
    let unknown = sql::strings(
        "SELECT wanted.id::text FROM unnest($1::bigint[]) AS wanted(id)
          WHERE NOT EXISTS (SELECT FROM meter.rejected r WHERE r.id = wanted.id) ORDER BY wanted.id",
        &[ids.to_vec().into()],
    )?;
    if !unknown.is_empty() {
        return Err(MeterError::NotFound(format!(
            "rejected record(s) {} do not exist",
            unknown.join(", ")
        )));
    }
    let sent = sql::one::<i64>(
        "WITH picked AS (
             UPDATE meter.rejected SET reprocessed_at = now()
              WHERE id = ANY($1) AND reprocessed_at IS NULL
             RETURNING id, stream, record),
         queued AS (
             INSERT INTO meter.usage (stream, record) SELECT stream, record FROM picked ORDER BY id RETURNING 1)
         SELECT count(*) FROM queued",
        &[ids.to_vec().into()],
    )?;
    Ok(sent.unwrap_or(0))
}
