//! Getting usage records in (`ingest`, plain INSERT/COPY), reading them back in
//! chunks for a run, and sending rejected records back.

use pgrx::prelude::*;

use crate::catalog::{Stream, StreamMode};
use crate::convert::{to_timestamptz, transaction_now};
use crate::dedupe;
use crate::errors::{MeterError, Result};
use crate::gucs;
use crate::jsonb::{self, Container, Node, Projection};
use crate::processor::Input;
use crate::record::{extract, Clock, FieldMap, FoundFields, Rejection};
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
        let mut inputs = self.elements().map(|node| element_input(None, node, projection));
        std::iter::from_fn(move || {
            let chunk: Vec<Input> = inputs.by_ref().take(size.max(1)).collect();
            (!chunk.is_empty()).then_some(chunk)
        })
    }
}

/// One record of an array (an `ingest` argument or an inbox row) as the processor
/// takes it: an object is read through `projection` and kept in its binary form;
/// anything else is rejected by the rules as not an object.
fn element_input(usage_id: Option<i64>, node: Node, projection: &Projection) -> Input {
    let mut input = match node {
        Node::Container(c) if !c.is_scalar() => Input::projected(None, c.to_varlena(), projection),
        scalar => Input::new(jsonb::to_value(scalar)),
    };
    input.usage_id = usage_id;
    input
}

/// The record id of an object record that has every field a record needs, or why
/// it will never be metered: the run's checks (`FoundFields::check`) of its user
/// id, id and timestamp, read in place from its jsonb bytes (building serde values
/// of them cost a third of `ingest`'s own work). A record with an array or object
/// at one of them is read through `projection` instead, which judges its nesting
/// as a run would.
pub(crate) fn check_object(
    object: Container,
    fields: &FieldMap,
    projection: &Projection,
    clock: &Clock,
) -> std::result::Result<Option<String>, Rejection> {
    let [user_id, id, timestamp] = [&fields.user_id, &fields.id, &fields.timestamp]
        .map(|path| jsonb::node_at(object, path).filter(|node| !matches!(node, Node::Null)));
    if [user_id, id, timestamp]
        .iter()
        .flatten()
        .any(|node| matches!(node, Node::Container(_)))
    {
        let record = projection.apply(object)?;
        return extract(&record, fields, clock).map(|extracted| extracted.record_id);
    }
    let found = FoundFields { user_id, id, timestamp };
    found
        .check(fields, clock)
        .map(|checked| checked.record_id.map(std::borrow::Cow::into_owned))
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

/// At most this many records share an inbox row: a run reads a row's records at
/// once, so larger arrays are queued as several rows.
const RECORDS_PER_ROW: usize = 1000;

/// The elements of `$2` (the batch) with their positions, whether it is an object
/// or an array.
const ELEMENTS: &str =
    "jsonb_array_elements(CASE WHEN jsonb_typeof($2) = 'object' THEN jsonb_build_array($2) ELSE $2 END)
                        WITH ORDINALITY AS e(record, n)";

/// Queues records for a batch run. Records that can never be metered (not an
/// object, no user id, bad timestamp…) are rejected now; records whose id was
/// already metered are reported as duplicates (unless
/// `meter_ext.ingest_checks_metered_ids` is off), and queued anyway so that the
/// run counts them in its session. The records go to the inbox as PostgreSQL parsed
/// them: only the fields checked here are read.
pub fn queue(stream: &Stream, batch: &Batch) -> Result<Ingested> {
    let clock = Clock {
        now: transaction_now(),
        future_tolerance: gucs::future_tolerance(),
    };
    let fields = &stream.fields;
    let checked = Projection::of([&fields.user_id, &fields.timestamp, &fields.id]);
    let mut ids: Vec<String> = Vec::new();
    let mut queued = 0i64;
    let (mut rejected_at, mut codes, mut reasons) = (Vec::new(), Vec::new(), Vec::new());
    for (index, node) in batch.elements().enumerate() {
        let outcome = match node {
            Node::Container(c) if c.is_object() && !c.is_scalar() => check_object(c, fields, &checked, &clock),
            // Rejected as not an object; stored from the argument, intact.
            other => extract(&jsonb::shallow_value(other), fields, &clock).map(|extracted| extracted.record_id),
        };
        match outcome {
            Ok(record_id) => {
                queued += 1;
                ids.extend(record_id);
            }
            Err(rejection) => {
                rejected_at.push(index as i64 + 1);
                codes.push(rejection.code().to_string());
                reasons.push(rejection.to_string());
            }
        }
    }
    // Sorted in the index's order ("C"), distinct: an id repeated within the call
    // counts once.
    ids.sort_unstable();
    let with_repeats = ids.len();
    ids.dedup();
    let repeated = (with_repeats - ids.len()) as i64;
    let already_metered = if gucs::ingest_checks_metered_ids() {
        let forget_before = to_timestamptz(clock.now - gucs::dedupe_retention());
        dedupe::metered_among(stream.id, &ids, forget_before, gucs::chunk_len(), true)?.len() as i64
    } else {
        // Left to the run, which counts them all the same.
        0
    };
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
        if queued > 0 && rejected_at.is_empty() && queued as usize <= RECORDS_PER_ROW {
            // The usual call: the argument as it is, one inbox row.
            sql::execute(
                "INSERT INTO meter.usage (stream, record) VALUES ($1, $2)",
                &[stream.name.as_str().into(), raw().into()],
            )?;
        } else if queued > 0 {
            sql::execute(
                &format!(
                    "INSERT INTO meter.usage (stream, record)
                     SELECT $1, jsonb_agg(e.record ORDER BY e.n) FROM {ELEMENTS} WHERE e.n <> ALL ($3)
                      GROUP BY (e.n - 1) / $4 ORDER BY (e.n - 1) / $4"
                ),
                &[
                    stream.name.as_str().into(),
                    raw().into(),
                    rejected_at.into(),
                    (RECORDS_PER_ROW as i64).into(),
                ],
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

/// A chunk of pending records, in arrival order, and the inbox position the next
/// chunk starts after.
pub struct Chunk {
    pub inputs: Vec<Input>,
    pub after: i64,
}

/// Takes the next chunk of a stream's pending records out of the inbox, oldest
/// first, keeping only the fields `projection` names (see `jsonb`): `limit` records,
/// fewer at the end. The rows are deleted in the caller's transaction: if it rolls
/// back, they are pending again. A row whose records reach past `limit` is split:
/// the rest of its batch goes back under the same id, first in line.
///
/// Only ids after `after` (where the caller's last chunk ended) are read: the index
/// entries of rows taken earlier in the same transaction are still there, and
/// skipping them keeps every chunk's read short. A row that commits late with a
/// smaller id is taken by the next run.
pub fn take_chunk(stream: &str, after: i64, limit: i64, projection: &Projection) -> Result<Chunk> {
    let Some(upto) = rows_for(stream, after, limit)? else {
        return Ok(Chunk {
            inputs: Vec::new(),
            after,
        });
    };
    let mut rows = Vec::new();
    sql::for_each_row(
        "DELETE FROM meter.usage u WHERE u.stream = $1 AND u.id > $2 AND u.id <= $3
         RETURNING u.id, u.record, u.received_at",
        &[stream.into(), after.into(), upto.into()],
        |values, _| {
            // SAFETY: the columns are a non-null bigint, jsonb and timestamptz.
            let row = unsafe { (values[0].value() as i64, jsonb::datum_bytes(values[1]), values[2]) };
            rows.push(row);
            Ok(())
        },
    )?;
    rows.sort_by_key(|row| row.0);
    // Sized for the chunk, within reason: a huge chunk_size grows it as before.
    let mut inputs = Vec::with_capacity(limit.clamp(0, 100_000) as usize);
    let mut next = upto;
    for (id, stored, received_at) in rows {
        let room = (limit as usize).saturating_sub(inputs.len());
        if let Some((batch, taken)) = row_inputs(id, stored, projection, room, &mut inputs) {
            put_back(stream, id, batch, taken, received_at)?;
            next = next.min(id - 1);
        }
    }
    Ok(Chunk { inputs, after: next })
}

/// Reads the next chunk of pending records without taking them (DEBUG runs):
/// whole rows, so a chunk may run past `limit` by the rest of its last batch.
pub fn peek_chunk(stream: &str, after: i64, limit: i64, projection: &Projection) -> Result<Chunk> {
    let Some(upto) = rows_for(stream, after, limit)? else {
        return Ok(Chunk {
            inputs: Vec::new(),
            after,
        });
    };
    let mut inputs = Vec::new();
    sql::for_each_row(
        "SELECT id, record FROM meter.usage WHERE stream = $1 AND id > $2 AND id <= $3 ORDER BY id",
        &[stream.into(), after.into(), upto.into()],
        |values, _| {
            // SAFETY: the columns are a non-null bigint and jsonb.
            let (id, stored) = unsafe { (values[0].value() as i64, jsonb::datum_bytes(values[1])) };
            let _whole = row_inputs(id, stored, projection, usize::MAX, &mut inputs);
            Ok(())
        },
    )?;
    Ok(Chunk { inputs, after: upto })
}

/// The id of the last inbox row after `after` that the next `limit` records need,
/// or `None` when nothing is pending. Rows are looked up a few at a time, as many
/// as the records per row seen so far suggest: a row may hold one record or a
/// thousand, and reading far ahead of the chunk would cost more than the chunk.
fn rows_for(stream: &str, after: i64, limit: i64) -> Result<Option<i64>> {
    let (mut last, mut rows, mut records) = (None, 0i64, 0i64);
    let mut fetch = limit.min(16);
    loop {
        let mut fetched = 0;
        let mut enough = false;
        sql::for_each_row(
            "SELECT id, record FROM meter.usage WHERE stream = $1 AND id > $2 ORDER BY id LIMIT $3",
            &[stream.into(), last.unwrap_or(after).into(), fetch.into()],
            |values, _| {
                if !enough {
                    last = Some(values[0].value() as i64);
                    // SAFETY: a non-null jsonb column.
                    records += unsafe { jsonb::records_in(values[1]) } as i64;
                    rows += 1;
                    enough = records >= limit;
                }
                fetched += 1;
                Ok(())
            },
        )?;
        if enough || fetched < fetch {
            return Ok(last);
        }
        let per_row = (records / rows).max(1);
        fetch = ((limit - records) / per_row + 1).min(limit);
    }
}

/// Appends an inbox row's records to `inputs`: the row's object, or the elements
/// of its batch, in order. Takes at most `room` of them; returns the rest of the
/// batch's elements (from the first not taken) and how many there are, when some
/// are left.
fn row_inputs(
    id: i64,
    stored: Vec<u8>,
    projection: &Projection,
    room: usize,
    inputs: &mut Vec<Input>,
) -> Option<(Vec<u8>, usize)> {
    let count = match Container::from_varlena(&stored).filter(|root| !root.is_object() && !root.is_scalar()) {
        Some(batch) => {
            inputs.extend(
                batch
                    .elements()
                    .take(room)
                    .map(|node| element_input(Some(id), node, projection)),
            );
            batch.len()
        }
        None => {
            inputs.push(Input::projected(Some(id), stored, projection));
            return None;
        }
    };
    (count > room).then_some((stored, room))
}

/// Puts the records of a split batch from the `taken`-th on back in the inbox,
/// under the row's id and arrival time, to be taken first by the next chunk.
fn put_back(stream: &str, id: i64, stored: Vec<u8>, taken: usize, received_at: pg_sys::Datum) -> Result<()> {
    // SAFETY: a non-null timestamptz of the row just deleted.
    let received_at = unsafe { pgrx::datum::TimestampWithTimeZone::from_datum(received_at, false) };
    sql::with_generic_plans(|| {
        sql::execute(
            "INSERT INTO meter.usage (id, stream, record, received_at)
             SELECT $1, $2, jsonb_agg(e.record ORDER BY e.n), $5
               FROM jsonb_array_elements($3) WITH ORDINALITY AS e(record, n) WHERE e.n > $4",
            &[
                id.into(),
                stream.into(),
                jsonb::RawJsonb(pg_sys::Datum::from(stored.as_ptr())).into(),
                (taken as i64).into(),
                received_at.into(),
            ],
        )
    })?;
    Ok(())
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
