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

//!
//! Ids a batch run claims in ordered runs are kept as ranges instead
//! (`meter.dedupe_ranges`): a row per run of ids, found by its first and last id.
//! An id counts as seen when either table holds it.
use crate::errors::Result;
use crate::sql;
use pgrx::datum::DatumWithOid;
use pgrx::prelude::*;
use rustc_hash::FxHashSet as HashSet;
use std::ops::Range;

/// Runs the lookups of `f` by the index, from plans cached per backend: a plan
/// made while the table (`dedupe_keys`, `dedupe_ranges`) was small would
/// otherwise scan it, and keep scanning it as it grows, until something made
/// PostgreSQL plan again.
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
/// memory. Then the ids in ranges, looked up by halves (`in_ranges_by_halves`):
/// the stretches over budget are read all the same (a preview, a DEBUG run), or
/// (`ranges_within_budget`, for `ingest`, whose count the run makes again) left
/// to the run.
pub fn metered_among(
    stream_id: i64,
    ids: &[String],
    forget_before: TimestampWithTimeZone,
    chunk_len: usize,
    ranges_within_budget: bool,
) -> Result<Vec<String>> {
    let mut metered = Vec::new();
    for chunk in ids.chunks(chunk_len.max(1)) {
        let chunk: Vec<&str> = chunk.iter().map(String::as_str).collect();
        metered.extend(sql::in_chunk_context(|| {
            known_among(stream_id, &chunk, || chunk.clone().into(), forget_before)
        })?);
    }
    if ranges_exist()? {
        let mut ids: Vec<&str> = ids.iter().map(String::as_str).collect();
        let mut in_ranges_found: HashSet<String> = HashSet::default();
        for run in same_length_runs(&mut ids, |id| id) {
            for part in run.chunks(chunk_len.max(1)) {
                let found = sql::in_chunk_context(|| -> Result<Vec<String>> {
                    let mut looked_up = in_ranges_by_halves(stream_id, part, forget_before)?;
                    if ranges_within_budget {
                        // The crowded stretches are left to the run.
                        return Ok(looked_up.found);
                    }
                    for (first, last) in looked_up.crowded {
                        let stretch: Vec<&str> =
                            part.iter().copied().filter(|id| *id >= first && *id <= last).collect();
                        if let InRanges::Found(found) = in_ranges(stream_id, &stretch, forget_before, false)? {
                            looked_up.found.extend(found);
                        }
                    }
                    Ok(looked_up.found)
                })?;
                in_ranges_found.extend(found);
            }
        }
        if !in_ranges_found.is_empty() {
            let per_id: HashSet<&str> = metered.iter().map(String::as_str).collect();
            let more: Vec<String> = in_ranges_found
                .into_iter()
                .filter(|id| !per_id.contains(id.as_str()))
                .collect();
            metered.extend(more);
        }
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

/// A run of ids becomes a range from this many ids on; fewer are claimed one by
/// one. Every range so holds at least this many.
pub const RANGE_MIN_IDS: usize = 64;
/// A run becomes a range only while the ranges it overlaps hold at most this many
/// ids per id of it: a lookup reads every id of the ranges it overlaps, so ranges
/// of random ids (each overlapping all others) stop at a few.
const RANGE_OVERLAP_PER_ID: usize = 2;
/// A lookup reads the ranges it overlaps while they hold at most this many ids
/// per id looked up (counting at least `RANGE_MIN_IDS`). Past that, it halves its
/// ids (`in_ranges_by_halves`); ranges a single id would still read too much of
/// (random ids after ordered ones, say) a run turns into rows of
/// `meter.dedupe_keys`, once, and looks its ids up there.
const RANGE_READ_PER_ID: usize = 4;

/// `items` sorted by the length of their `id`, then by `id` (byte order), and
/// cut into runs of one length. Ids of one length sort as their numbers do
/// (counters, sequences), so a run's first and last id are close: the ids
/// "r90001" … "r100000" span from "r100000" to "r99999", past every id to come
/// from "r100001" to "r999999"; as runs "r90001" … "r99999" and "r100000", little.
pub fn same_length_runs<'s, T>(items: &'s mut [T], id: impl Fn(&T) -> &str + 's) -> impl Iterator<Item = &'s [T]> {
    items.sort_unstable_by(|a, b| (id(a).len(), id(a)).cmp(&(id(b).len(), id(b))));
    let items: &'s [T] = items;
    items.chunk_by(move |a, b| id(a).len() == id(b).len())
}

thread_local! {
    /// The extension (its oid) whose schema was seen to have `meter.dedupe_ranges`.
    static HAS_RANGES: std::cell::Cell<pg_sys::Oid> = const { std::cell::Cell::new(pg_sys::InvalidOid) };
}

/// Whether this database has `meter.dedupe_ranges` (0.2.0 on; a 0.1.0 schema keeps
/// every id a row). Remembered once true, for this installation: realtime calls
/// ask on every call.
pub fn ranges_exist() -> Result<bool> {
    sql::true_for_installation(&HAS_RANGES, || {
        Ok(sql::one::<bool>("SELECT pg_catalog.to_regclass('meter.dedupe_ranges') IS NOT NULL", &[])?.unwrap_or(false))
    })
}

/// How many ids the stream's ranges overlapping `first..=last` hold, counted up
/// to past `most`: over `most / RANGE_MIN_IDS` ranges hold more than `most`.
fn ids_in_overlapping(stream_id: i64, first: &str, last: &str, most: usize) -> Result<usize> {
    let held = by_index(|| {
        sql::one::<i64>(
            "SELECT coalesce(sum(id_count), 0)::bigint FROM (
                 SELECT id_count FROM meter.dedupe_ranges
                  WHERE stream_id = $1 AND last_id >= $2 AND first_id <= $3 LIMIT $4) r",
            &[
                stream_id.into(),
                first.into(),
                last.into(),
                ((most / RANGE_MIN_IDS) as i64 + 1).into(),
            ],
        )
    })?;
    Ok(held.unwrap_or(0) as usize)
}

/// How many ids a lookup of `ids` may read in ranges.
fn read_budget(ids: usize) -> usize {
    ids.max(RANGE_MIN_IDS) * RANGE_READ_PER_ID
}

/// What the ranges say of a run of ids.
#[derive(Debug, PartialEq)]
pub enum InRanges {
    /// The ids of the run held by ranges seen at or after the time asked.
    Found(Vec<String>),
    /// The ranges the run overlaps hold more ids than the lookup may read.
    TooMany,
}

/// Which of `run` (sorted, distinct) the stream's ranges seen at or after `since`
/// hold; `TooMany` when the ranges the run overlaps hold more than its budget
/// (`RANGE_READ_PER_ID` per id) and `within_budget` is set.
pub fn in_ranges(stream_id: i64, run: &[&str], since: TimestampWithTimeZone, within_budget: bool) -> Result<InRanges> {
    let (Some(first), Some(last)) = (run.first(), run.last()) else {
        return Ok(InRanges::Found(Vec::new()));
    };
    let budget = read_budget(run.len());
    let held = ids_in_overlapping(stream_id, first, last, budget)?;
    if held == 0 {
        return Ok(InRanges::Found(Vec::new()));
    }
    if within_budget && held > budget {
        return Ok(InRanges::TooMany);
    }
    let wanted: HashSet<&str> = run.iter().copied().collect();
    let mut found = Vec::new();
    by_index(|| {
        sql::for_each_row(
            "SELECT record_ids FROM meter.dedupe_ranges
              WHERE stream_id = $1 AND last_id >= $2 AND first_id <= $3 AND seen_at >= $4",
            &[stream_id.into(), (*first).into(), (*last).into(), since.into()],
            |values, nulls| {
                // SAFETY: a text[] column of the row just read.
                let ids = unsafe { pgrx::Array::<&str>::from_datum(values[0], nulls[0]) };
                for id in ids.iter().flat_map(|ids| ids.iter().flatten()) {
                    if id >= *first && id <= *last && wanted.contains(id) {
                        found.push(id.to_string());
                    }
                }
                Ok(())
            },
        )
    })?;
    Ok(InRanges::Found(found))
}

/// Range lookups a run of ids may take while halving it (`in_ranges_by_halves`):
/// enough to single out a few stray ids among thousands (two per halving).
const HALVING_LOOKUPS: usize = 64;

/// Which of `run` (sorted, distinct, of one length) the stream's ranges seen at or
/// after `since` hold, looked up as a whole when the ranges its span overlaps are
/// within its budget, else by halves, and so on: an id far from the others (a
/// stray random id among ordered ones) then stretches only its own part's span
/// over the ranges between.
pub fn in_ranges_by_halves<'a>(stream_id: i64, run: &[&'a str], since: TimestampWithTimeZone) -> Result<ByHalves<'a>> {
    fn halves<'a>(
        stream_id: i64,
        part: &[&'a str],
        since: TimestampWithTimeZone,
        lookups_left: &mut usize,
        found: &mut Vec<String>,
        crowded: &mut Vec<(&'a str, &'a str)>,
    ) -> Result<()> {
        if part.is_empty() {
            return Ok(());
        }
        *lookups_left = lookups_left.saturating_sub(1);
        match in_ranges(stream_id, part, since, true)? {
            InRanges::Found(ids) => found.extend(ids),
            InRanges::TooMany if part.len() > 1 && *lookups_left > 0 => {
                let (low, high) = part.split_at(part.len() / 2);
                halves(stream_id, low, since, lookups_left, found, crowded)?;
                halves(stream_id, high, since, lookups_left, found, crowded)?;
            }
            InRanges::TooMany => crowded.push((part[0], part[part.len() - 1])),
        }
        Ok(())
    }
    let (mut found, mut crowded, mut lookups_left) = (Vec::new(), Vec::new(), HALVING_LOOKUPS);
    halves(stream_id, run, since, &mut lookups_left, &mut found, &mut crowded)?;
    Ok(ByHalves { found, crowded })
}

/// What `in_ranges_by_halves` found.
pub struct ByHalves<'a> {
    /// The ids ranges hold.
    pub found: Vec<String>,
    /// The stretches (first and last id) still over budget, not looked up: single
    /// ids inside large ranges, or what was left when `HALVING_LOOKUPS` ran out.
    pub crowded: Vec<(&'a str, &'a str)>,
}

/// Turns the stream's ranges overlapping `first..=last` (every range when `None`)
/// into rows of `meter.dedupe_keys`, each id with its newest claim.
pub fn ranges_to_keys(stream_id: i64, span: Option<(&str, &str)>) -> Result<usize> {
    let (first, last) = span.map_or((None, None), |(first, last)| (Some(first), Some(last)));
    sql::execute(
        "WITH gone AS (
             DELETE FROM meter.dedupe_ranges
              WHERE stream_id = $1 AND ($2::text IS NULL OR (last_id >= $2 AND first_id <= $3))
             RETURNING seen_at, record_ids, meter_ids)
         INSERT INTO meter.dedupe_keys AS k (stream_id, record_id, seen_at, meter_id)
         SELECT DISTINCT ON (c.id) $1, c.id, g.seen_at, c.meter
           FROM gone g CROSS JOIN LATERAL unnest(g.record_ids, g.meter_ids) AS c(id, meter)
          ORDER BY c.id, g.seen_at DESC
         ON CONFLICT (stream_id, record_id) DO UPDATE SET seen_at = EXCLUDED.seen_at, meter_id = EXCLUDED.meter_id
          WHERE k.seen_at < EXCLUDED.seen_at",
        &[stream_id.into(), first.into(), last.into()],
    )
}

/// The parts of `run` (sorted, distinct, of one length, new to the stream) to
/// claim as ranges, as positions in it, in order: the whole run when it is long
/// enough and the ranges its span overlaps hold at most `RANGE_OVERLAP_PER_ID`
/// ids per id of it, else its halves that are, and so on down to `RANGE_MIN_IDS`
/// ids (a stray id then keeps only its own part from becoming a range). A part
/// whose span overlaps no fewer ids than its whole's is not halved further:
/// random ids overlap every range however few they are. What no part takes is
/// claimed as rows.
pub fn parts_to_claim_as_ranges(stream_id: i64, run: &[&str]) -> Result<Vec<Range<usize>>> {
    fn halves(
        stream_id: i64,
        run: &[&str],
        part: Range<usize>,
        whole_overlaps: usize,
        lookups_left: &mut usize,
        parts: &mut Vec<Range<usize>>,
    ) -> Result<()> {
        if part.len() < RANGE_MIN_IDS || *lookups_left == 0 {
            return Ok(());
        }
        *lookups_left -= 1;
        let most = part.len() * RANGE_OVERLAP_PER_ID;
        let overlaps = ids_in_overlapping(stream_id, run[part.start], run[part.end - 1], most)?;
        if overlaps <= most {
            parts.push(part);
        } else if overlaps < whole_overlaps {
            let middle = part.start + part.len() / 2;
            halves(stream_id, run, part.start..middle, overlaps, lookups_left, parts)?;
            halves(stream_id, run, middle..part.end, overlaps, lookups_left, parts)?;
        }
        Ok(())
    }
    let (mut parts, mut lookups_left) = (Vec::new(), HALVING_LOOKUPS);
    halves(stream_id, run, 0..run.len(), usize::MAX, &mut lookups_left, &mut parts)?;
    Ok(parts)
}

/// Claims `run` (sorted, distinct, new to the stream) as one range, `at` the time
/// given, each id's record gone to its meter in `meter_ids`.
pub fn claim_range(stream_id: i64, run: &[&str], meter_ids: Vec<Option<i64>>, at: TimestampWithTimeZone) -> Result<()> {
    let (Some(first), Some(last)) = (run.first(), run.last()) else {
        return Ok(());
    };
    let record_ids = sql::text_array(run.iter().map(|id| Some(*id)));
    sql::execute(
        "INSERT INTO meter.dedupe_ranges (stream_id, first_id, last_id, seen_at, id_count, record_ids, meter_ids)
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
        &[
            stream_id.into(),
            (*first).into(),
            (*last).into(),
            at.into(),
            (run.len() as i32).into(),
            // SAFETY: a text[] built just now in the current memory context.
            unsafe { DatumWithOid::new(record_ids, pg_sys::TEXTARRAYOID) },
            meter_ids.into(),
        ],
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{bounds, same_length_runs};
    use proptest::prelude::*;

    #[test]
    fn runs_are_ids_of_one_length_in_byte_order() {
        let mut ids = ["r100000", "r99999", "r90001", "r9", "r100001", "r10", "r99"];
        let runs: Vec<Vec<&str>> = same_length_runs(&mut ids, |id| id).map(<[&str]>::to_vec).collect();
        assert_eq!(
            runs,
            [
                vec!["r9"],
                vec!["r10", "r99"],
                vec!["r90001", "r99999"],
                vec!["r100000", "r100001"]
            ]
        );
        assert_eq!(same_length_runs(&mut [] as &mut [&str], |id| id).count(), 0);
    }

    proptest! {
        #[test]
        fn runs_hold_every_id_once_grouped_by_length(ids in proptest::collection::vec("[a-c0-9]{0,4}", 0..40)) {
            let mut sorted: Vec<&str> = ids.iter().map(String::as_str).collect();
            let runs: Vec<Vec<&str>> = same_length_runs(&mut sorted, |id| id).map(<[&str]>::to_vec).collect();
            let mut all: Vec<&str> = runs.concat();
            let mut expected: Vec<&str> = ids.iter().map(String::as_str).collect();
            all.sort_unstable();
            expected.sort_unstable();
            prop_assert_eq!(all, expected);
            for run in &runs {
                prop_assert!(run.windows(2).all(|w| w[0].len() == w[1].len() && w[0] <= w[1]));
            }
            prop_assert!(runs.windows(2).all(|w| w[0][0].len() < w[1][0].len()));
        }
    }

    #[test]
    fn bounds_are_byte_order_extremes() {
        assert_eq!(bounds([]), None);
        assert_eq!(bounds(["r5"]), Some(("r5", "r5")));
        // Byte order, as the index's "C" collation: "r10" sorts before "r9", "Z" before "a".
        assert_eq!(bounds(["r9", "r10", "a", "Z", "r100"]), Some(("Z", "r9")));
        assert_eq!(bounds(["é", "e", "f"]), Some(("e", "é")));
    }
}
