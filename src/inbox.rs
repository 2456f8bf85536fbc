//! Getting usage records in (`ingest`, plain INSERT/COPY), reading them back in
//! chunks for a run, and sending rejected records back.

use std::collections::HashSet;

use pgrx::prelude::*;

use crate::catalog::{Stream, StreamMode};
use crate::convert::{to_timestamptz, transaction_now};
use crate::errors::{MeterError, Result};
use crate::gucs;
use crate::jsonb::{self, Container, Node, Projection};
use crate::processor::Input;
use crate::record::{extract, Clock};
use crate::sql;

/// `ingest`'s answer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Ingested {
    pub accepted: i64,
    pub duplicates: i64,
    pub rejected: i64,
}

/// The `records` argument of `ingest`: one object, or an array of them, as the
/// binary jsonb PostgreSQL parsed it. Anything but an object inside the array is a
/// rejected record, not an error: the caller's other records still count. The
/// bytes are read in place (detoasted once, never copied), and records are walked
/// one at a time, so a large array costs little more than PostgreSQL's own copy.
pub struct Batch<'a> {
    /// The argument, detoasted, for the statements that insert its elements (the
    /// original may be a toast pointer each statement would detoast again).
    datum: pg_sys::Datum,
    bytes: &'a [u8],
}

impl<'a> Batch<'a> {
    /// # Safety
    /// `datum` must be a valid jsonb datum that outlives the `Batch`.
    pub unsafe fn new(datum: pg_sys::Datum) -> Result<Batch<'a>> {
        let bytes = jsonb::datum_slice(datum);
        let batch = Batch {
            datum: pg_sys::Datum::from(bytes.as_ptr()),
            bytes,
        };
        let root = batch.root();
        if root.is_scalar() {
            let found = match root.elements().next() {
                Some(Node::Bool(_)) => "a boolean",
                Some(Node::Number(_)) => "a number",
                Some(Node::String(_)) => "a string",
                _ => "null",
            };
            return Err(MeterError::InvalidParameter(format!(
                "records must be a JSON object or an array of objects, not {found}"
            )));
        }
        Ok(batch)
    }

    fn root(&self) -> Container<'a> {
        Container::from_varlena(self.bytes).expect("a jsonb datum has a root container")
    }

    /// The records, in order, without materializing them.
    fn elements(&self) -> impl Iterator<Item = Node<'a>> {
        let root = self.root();
        let single = root.is_object().then_some(Node::Container(root));
        single.into_iter().chain(root.elements())
    }

    /// Every record as the processor takes it, in chunks of at most `size` (at
    /// least 1): the fields `projection` names, as a run reads them from the inbox,
    /// and the record as received (binary), which a rejection keeps intact.
    pub fn inputs<'p>(&'p self, size: usize, projection: &'p Projection) -> impl Iterator<Item = Vec<Input>> + 'p {
        let mut inputs = self.elements().map(|node| match node {
            Node::Container(c) if !c.is_scalar() => Input::projected(None, c.to_varlena(), projection),
            scalar => Input::new(jsonb::to_value(scalar)),
        });
        std::iter::from_fn(move || {
            let chunk: Vec<Input> = inputs.by_ref().take(size.max(1)).collect();
            (!chunk.is_empty()).then_some(chunk)
        })
    }
}

/// `meter.ingest`: a realtime stream meters the records now (see `realtime`); a
/// batch stream checks what it can without rules and queues the rest in the inbox
/// for its next run.
pub fn ingest(stream: &Stream, batch: &Batch) -> Result<Ingested> {
    match stream.mode {
        StreamMode::Realtime => crate::realtime::ingest(stream, batch),
        StreamMode::Batch => queue(stream, batch),
    }
}

/// The elements of `$2` (the batch) with their positions, whether it is an object
/// or an array.
const ELEMENTS: &str =
    "jsonb_array_elements(CASE WHEN jsonb_typeof($2) = 'object' THEN jsonb_build_array($2) ELSE $2 END)
                        WITH ORDINALITY AS e(record, n)";

/// Queues records for a batch run. Records that can never be metered (not an
/// object, no user id, bad timestamp…) are rejected now; records whose id was
/// already metered are reported as duplicates, and queued anyway so that the run
/// counts them in its session. The records go to the inbox as PostgreSQL parsed
/// them: only the fields checked here are read.
pub fn queue(stream: &Stream, batch: &Batch) -> Result<Ingested> {
    let clock = Clock {
        now: transaction_now(),
        future_tolerance: gucs::future_tolerance(),
    };
    let fields = &stream.fields;
    let checked = Projection::of([&fields.user_id, &fields.timestamp, &fields.id]);
    let mut ids_in_batch: HashSet<String> = HashSet::new();
    let (mut queued, mut repeated) = (0i64, 0i64);
    let (mut rejected_at, mut codes, mut reasons) = (Vec::new(), Vec::new(), Vec::new());
    for (index, node) in batch.elements().enumerate() {
        let record = match node {
            Node::Container(c) if c.is_object() && !c.is_scalar() => checked.apply(c),
            // Rejected as not an object; stored from the argument, intact.
            other => Ok(jsonb::shallow_value(other)),
        };
        let outcome = record.and_then(|record| extract(&record, fields, &clock).map(|extracted| extracted.record_id));
        match outcome {
            Ok(record_id) => {
                queued += 1;
                if let Some(id) = record_id {
                    if !ids_in_batch.insert(id) {
                        repeated += 1;
                    }
                }
            }
            Err(rejection) => {
                rejected_at.push(index as i64 + 1);
                codes.push(rejection.code().to_string());
                reasons.push(rejection.to_string());
            }
        }
    }
    // Checked a chunk of ids at a time, each chunk's arguments freed after it: a
    // single query with every id of a large array costs far more memory.
    let forget_before = to_timestamptz(clock.now - gucs::dedupe_retention());
    let ids: Vec<String> = ids_in_batch.into_iter().collect();
    let mut already_metered = 0;
    for chunk in ids.chunks(gucs::chunk_len()) {
        already_metered += sql::in_chunk_context(|| {
            sql::one::<i64>(
                "SELECT count(*) FROM meter.dedupe_keys WHERE stream_id = $1 AND record_id = ANY($2) AND seen_at >= $3",
                &[stream.id.into(), chunk.to_vec().into(), forget_before.into()],
            )
        })?
        .unwrap_or(0);
    }
    let rejected = rejected_at.len() as i64;
    // Generic plans: a custom plan would copy the whole argument into each plan.
    sql::with_generic_plans(|| -> Result<()> {
        let raw = || jsonb::RawJsonb(batch.datum);
        if !rejected_at.is_empty() {
            sql::execute(
                &format!(
                    "INSERT INTO meter.rejected (stream, record, code, reason)
                     SELECT $1, e.record, r.code, r.reason
                       FROM {ELEMENTS} JOIN unnest($3::bigint[], $4::text[], $5::text[]) AS r(n, code, reason) USING (n)"
                ),
                &[
                    stream.name.as_str().into(),
                    raw().into(),
                    rejected_at.clone().into(),
                    codes.into(),
                    reasons.into(),
                ],
            )?;
        }
        if queued > 0 {
            sql::execute(
                &format!(
                    "INSERT INTO meter.usage (stream, record) SELECT $1, e.record FROM {ELEMENTS} WHERE e.n <> ALL ($3)"
                ),
                &[stream.name.as_str().into(), raw().into(), rejected_at.into()],
            )?;
        }
        Ok(())
    })?;
    let duplicates = repeated + already_metered;
    Ok(Ingested {
        accepted: queued - duplicates,
        duplicates,
        rejected,
    })
}

/// Takes the next chunk of a stream's pending records out of the inbox, oldest
/// first, keeping only the fields `projection` names (see `jsonb`). The rows are
/// deleted in the caller's transaction: if it rolls back, they are pending again.
/// Only ids after `after` (the last id the caller took) are read: the index
/// entries of rows taken earlier in the same transaction are still there, and
/// skipping them keeps every chunk's read short. A row that commits late with a
/// smaller id is taken by the next run.
pub fn take_chunk(stream: &str, after: i64, limit: i64, projection: &Projection) -> Result<Vec<Input>> {
    read_chunk(
        "WITH next AS (SELECT id FROM meter.usage WHERE stream = $1 AND id > $3 ORDER BY id LIMIT $2)
         DELETE FROM meter.usage u WHERE u.stream = $1 AND u.id > $3 AND u.id <= (SELECT max(id) FROM next)
         RETURNING u.id, u.record",
        &[stream.into(), limit.into(), after.into()],
        projection,
    )
}

/// The last inbox id of a chunk (or `after` for an empty one).
pub fn last_id(chunk: &[Input], after: i64) -> i64 {
    chunk.iter().filter_map(|i| i.usage_id).max().unwrap_or(after)
}

/// Reads pending records after `after_id` without taking them (DEBUG runs).
pub fn peek_chunk(stream: &str, after_id: i64, limit: i64, projection: &Projection) -> Result<Vec<Input>> {
    read_chunk(
        "SELECT id, record FROM meter.usage WHERE stream = $1 AND id > $3 ORDER BY id LIMIT $2",
        &[stream.into(), limit.into(), after_id.into()],
        projection,
    )
}

fn read_chunk(query: &str, args: &[pgrx::datum::DatumWithOid], projection: &Projection) -> Result<Vec<Input>> {
    let mut inputs = Spi::connect_mut(|client| -> Result<Vec<Input>> {
        let rows = sql::run(client, query, args)?;
        let mut inputs = Vec::with_capacity(rows.len());
        for row in rows {
            let Some(datum) = row.get::<jsonb::RawJsonb>(2)? else {
                continue;
            };
            // SAFETY: column 2 is a non-null jsonb.
            let stored = unsafe { jsonb::datum_bytes(datum.0) };
            inputs.push(Input::projected(row.get::<i64>(1)?, stored, projection));
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
