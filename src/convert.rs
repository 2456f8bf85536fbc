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
    let dt = jiff::tz::TimeZone::UTC.to_datetime(t);
    let year = dt.year();
    if !(0..=9999).contains(&year) {
        return iso_utc_formatted(dt);
    }
    // Digit by digit: a flush prints six of these per meter, and `format!` was
    // a visible part of it.
    let digits = |out: &mut [u8], value: i32| {
        let mut value = value;
        for byte in out.iter_mut().rev() {
            *byte = b'0' + (value % 10) as u8;
            value /= 10;
        }
    };
    let mut text = *b"0000-00-00T00:00:00.000Z";
    digits(&mut text[0..4], year.into());
    digits(&mut text[5..7], dt.month().into());
    digits(&mut text[8..10], dt.day().into());
    digits(&mut text[11..13], dt.hour().into());
    digits(&mut text[14..16], dt.minute().into());
    digits(&mut text[17..19], dt.second().into());
    digits(&mut text[20..23], dt.subsec_nanosecond() / 1_000_000);
    String::from_utf8(text.to_vec()).expect("ASCII digits")
}

fn iso_utc_formatted(dt: jiff::civil::DateTime) -> String {
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        dt.year(),
        dt.month(),
        dt.day(),
        dt.hour(),
        dt.minute(),
        dt.second(),
        dt.subsec_nanosecond() / 1_000_000
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iso_utc_keeps_milliseconds_and_pads_every_field() {
        let t: Timestamp = "2026-11-30T23:00:00.123456789Z".parse().unwrap();
        assert_eq!(iso_utc(t), "2026-11-30T23:00:00.123Z");
        let early: Timestamp = "0005-01-02T03:04:05.000007Z".parse().unwrap();
        assert_eq!(iso_utc(early), "0005-01-02T03:04:05.000Z");
        let last: Timestamp = "9999-12-30T21:59:59.999999Z".parse().unwrap();
        assert_eq!(iso_utc(last), "9999-12-30T21:59:59.999Z");
        // Digit by digit is what format! prints, over the whole range.
        let (min, max) = (Timestamp::MIN.as_second(), Timestamp::MAX.as_second());
        for i in 0..100_000i64 {
            let second = min + (max - min) / 100_000 * i;
            let t = Timestamp::new(second, (i as i32 * 7919) % 1_000_000_000).unwrap();
            let dt = jiff::tz::TimeZone::UTC.to_datetime(t);
            assert_eq!(iso_utc(t), iso_utc_formatted(dt), "{t}");
        }
    }
}
