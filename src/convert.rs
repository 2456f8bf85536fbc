//! Conversions between Postgres datums and the plain-Rust domain types.

use jiff::Timestamp;
use pgrx::datum::TimestampWithTimeZone;
use pgrx::pg_sys;

/// Microseconds between the Unix epoch and Postgres' epoch (2000-01-01).
const PG_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;

/// A finite `timestamptz` as an instant; `None` for ±infinity.
pub fn to_timestamp(ts: TimestampWithTimeZone) -> Option<Timestamp> {
    if !ts.is_finite() {
        return None;
    }
    let pg_micros: pg_sys::TimestampTz = ts.into();
    from_pg_micros(pg_micros)
}

pub fn from_pg_micros(pg_micros: i64) -> Option<Timestamp> {
    Timestamp::from_microsecond(pg_micros.checked_add(PG_EPOCH_OFFSET_MICROS)?).ok()
}

/// An instant as a `timestamptz` (sub-microsecond digits are dropped).
pub fn to_timestamptz(t: Timestamp) -> TimestampWithTimeZone {
    let pg_micros = t.as_microsecond() - PG_EPOCH_OFFSET_MICROS;
    TimestampWithTimeZone::try_from(pg_micros).unwrap_or_else(|_| {
        if pg_micros > 0 {
            TimestampWithTimeZone::positive_infinity()
        } else {
            TimestampWithTimeZone::negative_infinity()
        }
    })
}

/// The current transaction's start time, Postgres' `now()`.
pub fn transaction_now() -> Timestamp {
    let pg_micros = unsafe { pg_sys::GetCurrentTransactionStartTimestamp() };
    from_pg_micros(pg_micros).expect("now() is a finite instant")
}

/// The wall clock now, Postgres' `clock_timestamp()`.
pub fn clock_now() -> Timestamp {
    let pg_micros = unsafe { pg_sys::GetCurrentTimestamp() };
    from_pg_micros(pg_micros).expect("the clock is a finite instant")
}

/// UTC ISO-8601 with milliseconds (`2026-11-30T23:00:00.000Z`).
pub fn iso_utc(t: Timestamp) -> String {
    let mut out = String::with_capacity(24);
    write_utc(&mut out, t, 'T', 3, "Z");
    out
}

/// Appends a `timestamptz` literal PostgreSQL reads back exactly, whatever its
/// DateStyle: `2026-11-30 23:00:00.123456+00`.
pub fn write_timestamptz_literal(out: &mut String, t: Timestamp) {
    write_utc(out, t, ' ', 6, "+00");
}

/// Appends `t` in UTC as `YYYY-MM-DD<separator>HH:MM:SS.<fraction><zone>`, the
/// fraction with `digits` digits (3: milliseconds, 6: microseconds).
fn write_utc(out: &mut String, t: Timestamp, separator: char, digits: u32, zone: &str) {
    use std::fmt::Write;
    let dt = jiff::tz::TimeZone::UTC.to_datetime(t);
    let fraction = dt.subsec_nanosecond() / 10i32.pow(9 - digits);
    write!(
        out,
        "{:04}-{:02}-{:02}{separator}{:02}:{:02}:{:02}.{fraction:0width$}{zone}",
        dt.year(),
        dt.month(),
        dt.day(),
        dt.hour(),
        dt.minute(),
        dt.second(),
        width = digits as usize
    )
    .expect("writing to a String cannot fail");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_texts_keep_their_precision_and_pad_every_field() {
        let t: Timestamp = "2026-11-30T23:00:00.123456789Z".parse().unwrap();
        assert_eq!(iso_utc(t), "2026-11-30T23:00:00.123Z");
        let mut literal = String::from("x");
        write_timestamptz_literal(&mut literal, t);
        assert_eq!(literal, "x2026-11-30 23:00:00.123456+00");
        let early: Timestamp = "0005-01-02T03:04:05.000007Z".parse().unwrap();
        assert_eq!(iso_utc(early), "0005-01-02T03:04:05.000Z");
        let mut literal = String::new();
        write_timestamptz_literal(&mut literal, early);
        assert_eq!(literal, "0005-01-02 03:04:05.000007+00");
    }
}
