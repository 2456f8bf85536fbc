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
    // Civil time from the millisecond count (floored: before 1970 too), with
    // the proleptic Gregorian calendar's 400-year cycles (H. Hinnant's
    // civil_from_days): a flush prints six of these per meter, and going through
    // a civil DateTime and format! was a visible part of it.
    let millis = t.as_nanosecond().div_euclid(1_000_000) as i64;
    let (days, of_day) = (millis.div_euclid(86_400_000), millis.rem_euclid(86_400_000));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let shifted_month = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * shifted_month + 2) / 5 + 1;
    let month = if shifted_month < 10 {
        shifted_month + 3
    } else {
        shifted_month - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    if !(0..=9999).contains(&year) {
        return iso_utc_formatted(jiff::tz::TimeZone::UTC.to_datetime(t));
    }
    let digits = |out: &mut [u8], value: i64| {
        let mut value = value;
        for byte in out.iter_mut().rev() {
            *byte = b'0' + (value % 10) as u8;
            value /= 10;
        }
    };
    let mut text = *b"0000-00-00T00:00:00.000Z";
    digits(&mut text[0..4], year);
    digits(&mut text[5..7], month);
    digits(&mut text[8..10], day);
    digits(&mut text[11..13], of_day / 3_600_000);
    digits(&mut text[14..16], of_day / 60_000 % 60);
    digits(&mut text[17..19], of_day / 1000 % 60);
    digits(&mut text[20..23], of_day % 1000);
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
        for (at, text) in [
            ("1969-12-31T23:59:59.9995Z", "1969-12-31T23:59:59.999Z"),
            ("2000-02-29T12:00:00Z", "2000-02-29T12:00:00.000Z"),
            ("1900-03-01T00:00:00Z", "1900-03-01T00:00:00.000Z"),
            ("1600-02-29T23:59:59.999Z", "1600-02-29T23:59:59.999Z"),
        ] {
            assert_eq!(iso_utc(at.parse().unwrap()), text);
        }
        // The arithmetic gives what jiff's civil time and format! give, over the
        // whole range, before 1970 and around leap days included.
        let (min, max) = (Timestamp::MIN.as_second(), Timestamp::MAX.as_second());
        for i in 0..100_000i64 {
            let second = min + (max - min) / 100_000 * i;
            let t = Timestamp::new(second, (i as i32 * 7919) % 1_000_000_000).unwrap();
            let dt = jiff::tz::TimeZone::UTC.to_datetime(t);
            assert_eq!(iso_utc(t), iso_utc_formatted(dt), "{t}");
        }
    }

    proptest::proptest! {
        #[test]
        fn iso_utc_is_the_civil_time_jiff_gives(
            second in Timestamp::MIN.as_second()..Timestamp::MAX.as_second(),
            nanosecond in -999_999_999i32..=999_999_999,
        ) {
            if let Ok(t) = Timestamp::new(second, nanosecond) {
                let dt = jiff::tz::TimeZone::UTC.to_datetime(t);
                proptest::prop_assert_eq!(iso_utc(t), iso_utc_formatted(dt));
            }
        }
    }
}
