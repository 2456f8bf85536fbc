//! Looking up record ids already metered (`meter.dedupe_keys`) without a lookup
//! per id where one range scan answers for them all.
//!
//! Each id looked up alone is a descent of the (stream_id, record_id) index, the
//! largest part of `ingest`'s own work and of a run's claims. But a chunk's ids
//! usually lie in a narrow stretch of the index: ordered ids (sequences, ULIDs,
//! time-prefixed ids) have no metered id between a chunk's smallest and largest,
//! and counters without padding ("r500001" … "r501000") about one for every ten
//! ids ("r50001", "r5001", …). Reading that stretch once costs a fraction of the
//! descents. Where it holds more than a quarter as many keys as the chunk has ids
//! (random ids such as UUIDs), the scan stops there and the ids are looked up one
//! by one.

use crate::errors::Result;
use crate::sql;
use pgrx::datum::DatumWithOid;
use pgrx::prelude::*;
use rustc_hash::FxHashSet as HashSet;

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
        let chunk: Vec<&str> = chunk.iter().map(String::as_str).collect();
        metered.extend(sql::in_chunk_context(|| {
            known_among(stream_id, &chunk, || chunk.clone().into(), forget_before)
        })?);
    }
    Ok(metered)
}

/// How many ids of the chunk each key read by the range scan must answer for,
/// at least, before the scan gives way to a lookup per id. A key read in passing
/// costs a fifth to a half of a descent (the heap fetch for its time): at a
/// quarter key per id, a chunk of random ids spends at most an eighth more than
/// its lookups on the scan.
const KEYS_PER_ID_SCANNED: usize = 4;

/// Which of `ids` (distinct) `stream_id` saw at or after `since`. The stream's
/// keys between the smallest and largest id are read in one range scan; only
/// when that stretch holds more than `ids.len() / KEYS_PER_ID_SCANNED` keys is
/// each id looked up in the index (`ids_array()`, the same ids as a text[]).
pub fn known_among<'a>(
    stream_id: i64,
    ids: &[&str],
    ids_array: impl FnOnce() -> DatumWithOid<'a>,
    since: TimestampWithTimeZone,
) -> Result<Vec<String>> {
    let Some((lowest, highest)) = bounds(ids.iter().copied()) else {
        return Ok(Vec::new());
    };
    let most = (ids.len() / KEYS_PER_ID_SCANNED).max(1) as i64;
    if let Some(in_stretch) = keys_between(stream_id, lowest, highest, since, most)? {
        if in_stretch.is_empty() {
            return Ok(in_stretch);
        }
        let wanted: HashSet<&str> = ids.iter().copied().collect();
        return Ok(in_stretch
            .into_iter()
            .filter(|key| wanted.contains(key.as_str()))
            .collect());
    }
    each_known(stream_id, ids_array(), since)
}

/// The ids `stream_id` saw at or after `since` among its keys `lowest..=highest`
/// (in the index's "C" order, which is Rust's byte order of `str`), or `None` when
/// that stretch holds more than `most` keys, expired ones included.
pub fn keys_between(
    stream_id: i64,
    lowest: &str,
    highest: &str,
    since: TimestampWithTimeZone,
    most: i64,
) -> Result<Option<Vec<String>>> {
    by_index(|| {
        sql::one::<Vec<String>>(
            "SELECT CASE WHEN count(*) <= $4
                         THEN coalesce(array_agg(k.record_id) FILTER (WHERE k.seen_at >= $5), '{}') END
               FROM (SELECT record_id, seen_at FROM meter.dedupe_keys
                      WHERE stream_id = $1 AND record_id BETWEEN $2 AND $3
                      LIMIT $4 + 1) k",
            &[
                stream_id.into(),
                lowest.into(),
                highest.into(),
                most.into(),
                since.into(),
            ],
        )
    })
}

/// Which of `ids` (a text[] of distinct ids) `stream_id` saw at or after `since`,
/// each looked up in the index (a subplan per id, which OFFSET 0 keeps one): with
/// `= ANY(ids)` instead, the planner could price reading the stream's every key
/// below a thousand lookups, which for a stream with months of ids is ruinous.
fn each_known(stream_id: i64, ids: DatumWithOid<'_>, since: TimestampWithTimeZone) -> Result<Vec<String>> {
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
