//! Looking up record ids already metered (`meter.dedupe_keys`) without a lookup
//! per id where one range lookup answers for them all.
//!
//! Each id checked is a descent of the (stream_id, record_id) index, the largest
//! part of `ingest`'s own work and of a run's claims. But ids are often ordered
//! (sequences, ULIDs, time-prefixed ids) and a stream's new records carry new ids:
//! then no metered id lies between a batch's smallest and largest id, and one
//! descent shows it. Where metered ids do lie in between (random ids), that one
//! extra descent per batch is all it costs.

use crate::errors::Result;
use crate::sql;
use pgrx::datum::DatumWithOid;
use pgrx::prelude::*;

/// Whether `stream_id` has any id in `lowest..=highest` (in the index's "C" order,
/// which is Rust's byte order of `str`), expired ones included.
pub fn any_between(stream_id: i64, lowest: &str, highest: &str) -> Result<bool> {
    let found = by_index(|| {
        sql::one::<bool>(
            "SELECT EXISTS (SELECT FROM meter.dedupe_keys
                             WHERE stream_id = $1 AND record_id BETWEEN $2 AND $3)",
            &[stream_id.into(), lowest.into(), highest.into()],
        )
    })?;
    Ok(found.unwrap_or(true))
}

/// Runs the lookups of `f` by the index, from plans cached per backend: a plan
/// made while the table was small would otherwise scan it, and keep scanning it
/// as it grows, until something made PostgreSQL plan again.
fn by_index<R>(f: impl FnOnce() -> R) -> R {
    sql::by_index_lookups(|| sql::with_generic_plans(f))
}

/// The smallest and largest of `ids`, by byte order (none when empty).
pub fn bounds<'a>(ids: impl IntoIterator<Item = &'a str>) -> Option<(&'a str, &'a str)> {
    ids.into_iter().fold(None, |bounds, id| match bounds {
        None => Some((id, id)),
        Some((low, high)) => Some((low.min(id), high.max(id))),
    })
}

/// Which of `ids` (distinct) `stream_id` metered at or after `forget_before`,
/// checked a chunk of ids at a time (see `known_among`), each chunk's arguments
/// freed after it: a single query with every id of a large array costs far more
/// memory.
pub fn metered_among(
    stream_id: i64,
    ids: &[String],
    forget_before: TimestampWithTimeZone,
    chunk_len: usize,
) -> Result<Vec<String>> {
    let mut metered = Vec::new();
    for chunk in ids.chunks(chunk_len.max(1)) {
        let range = bounds(chunk.iter().map(String::as_str));
        metered.extend(sql::in_chunk_context(|| {
            known_among(stream_id, range, chunk.to_vec().into(), forget_before)
        })?);
    }
    Ok(metered)
}

/// Which of `ids` (a text[] of distinct ids whose extremes are `range`)
/// `stream_id` saw at or after `since`: nothing is looked up per id unless some id
/// of the stream lies in `range` (`any_between`). Each id is then one lookup in the
/// index (a subplan per id, which OFFSET 0 keeps one): with `= ANY(ids)` instead,
/// the planner could price reading the stream's every key below a thousand
/// lookups, which for a stream with months of ids is ruinous.
pub fn known_among(
    stream_id: i64,
    range: Option<(&str, &str)>,
    ids: DatumWithOid,
    since: TimestampWithTimeZone,
) -> Result<Vec<String>> {
    let Some((lowest, highest)) = range else {
        return Ok(Vec::new());
    };
    if !any_between(stream_id, lowest, highest)? {
        return Ok(Vec::new());
    }
    by_index(|| {
        sql::strings(
            "SELECT c.id FROM pg_catalog.unnest($2::text[]) AS c(id)
              WHERE EXISTS (SELECT FROM meter.dedupe_keys k
                             WHERE k.stream_id = $1 AND k.record_id = c.id AND k.seen_at >= $3 OFFSET 0)",
            &[stream_id.into(), ids, since.into()],
        )
    })
}

#[cfg(test)]
mod tests {
    use super::bounds;

    #[test]
    fn bounds_are_byte_order_extremes() {
        assert_eq!(bounds([]), None);
        assert_eq!(bounds(["r5"]), Some(("r5", "r5")));
        // Byte order, as the index's "C" collation: "r10" sorts before "r9", "Z" before "a".
        assert_eq!(bounds(["r9", "r10", "a", "Z", "r100"]), Some(("Z", "r9")));
        assert_eq!(bounds(["é", "e", "f"]), Some(("e", "é")));
    }
}
