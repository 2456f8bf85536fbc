//! Retention (`meter.purge`): what may go, in bounded batches. Nothing that is
//! still needed goes: unacknowledged flushed records, the audit of a meter's
//! current period, ids still inside the dedupe window, rejected records not yet
//! reprocessed.

use pgrx::datum::Interval;

use crate::dedupe;
use crate::errors::{MeterError, Result};
use crate::gucs;
use crate::sql;

/// Deletes in batches of `batch_size` rows until none is left; returns
/// (what, how many) per kind.
pub fn purge(older_than: Interval, batch_size: i64) -> Result<Vec<(&'static str, i64)>> {
    if batch_size < 1 {
        return Err(MeterError::InvalidParameter("batch_size must be at least 1".into()));
    }
    let cutoff = sql::one::<pgrx::datum::TimestampWithTimeZone>("SELECT now() - $1", &[older_than.into()])?
        .expect("now() minus an interval is a timestamp");
    let retention = gucs::dedupe_retention().as_secs();
    let kinds: [(&str, &str, Vec<pgrx::datum::DatumWithOid>); 4] = [
        (
            // Flushed records every consumer of their stream has acknowledged
            // (with no consumer, any old enough record).
            "flushed",
            "DELETE FROM meter.flushed WHERE id IN (
                 SELECT f.id FROM meter.flushed f
                  WHERE f.flushed_at < $1
                    AND NOT EXISTS (SELECT FROM meter.consumers c WHERE c.stream_id = f.stream_id AND c.acked_flush_id < f.id)
                  ORDER BY f.id LIMIT $2)",
            vec![cutoff.into(), batch_size.into()],
        ),
        (
            // Audit rows of periods that are over (the current period's rows verify the meter).
            "usage_audit",
            "DELETE FROM meter.usage_audit_batches WHERE ctid = ANY (ARRAY(
                 SELECT a.ctid FROM meter.usage_audit_batches a
                  WHERE a.processed_at < $1
                    AND NOT EXISTS (SELECT FROM meter.meters m WHERE m.id = a.meter_id AND m.period_start = a.period_start)
                  LIMIT $2))",
            vec![cutoff.into(), batch_size.into()],
        ),
        (
            // Record ids outside meter_ext.dedupe_retention: they would not count as duplicates anyway.
            "dedupe_keys",
            "DELETE FROM meter.dedupe_keys WHERE ctid = ANY (ARRAY(
                 SELECT ctid FROM meter.dedupe_keys WHERE seen_at < now() - make_interval(secs => $1) LIMIT $2))",
            vec![(retention as f64).into(), batch_size.into()],
        ),
        (
            // Rejected records already sent back for reprocessing.
            "rejected",
            "DELETE FROM meter.rejected WHERE id IN (
                 SELECT id FROM meter.rejected WHERE reprocessed_at < $1 ORDER BY id LIMIT $2)",
            vec![cutoff.into(), batch_size.into()],
        ),
    ];
    let mut purged = Vec::new();
    for (kind, query, args) in kinds {
        let mut total = 0i64;
        loop {
            let n = sql::execute(query, &args)? as i64;
            total += n;
            if n < batch_size {
                break;
            }
        }
        if kind == "dedupe_keys" {
            total += purge_ranges(retention, batch_size)?;
        }
        purged.push((kind, total));
    }
    Ok(purged)
}

/// Deletes the ranges of record ids (`meter.dedupe_ranges`) claimed before
/// `meter_ext.dedupe_retention` (`retention` seconds), `batch_size` ranges at a
/// time; returns how many ids they held.
fn purge_ranges(retention: i64, batch_size: i64) -> Result<i64> {
    if !dedupe::ranges_exist()? {
        return Ok(0);
    }
    let mut ids = 0;
    loop {
        let [ranges, held] = sql::one::<Vec<i64>>(
            "WITH gone AS (
                 DELETE FROM meter.dedupe_ranges WHERE ctid = ANY (ARRAY(
                     SELECT ctid FROM meter.dedupe_ranges WHERE seen_at < now() - make_interval(secs => $1) LIMIT $2))
                 RETURNING id_count)
             SELECT ARRAY[count(*), coalesce(sum(id_count), 0)]::bigint[] FROM gone",
            &[(retention as f64).into(), batch_size.into()],
        )?
        .and_then(|counts| <[i64; 2]>::try_from(counts).ok())
        .expect("an aggregate returns one row of two counts");
        ids += held;
        if ranges < batch_size {
            return Ok(ids);
        }
    }
}
