//! Reset schedules (SPEC §3): when a meter's period ends.
//!
//! Pure Rust, no Postgres. A schedule is a 5-field cron expression or a preset,
//! evaluated on the wall clock of an IANA timezone. croner does the parsing and the
//! calendar matching on *civil* (wall-clock) times; this module owns the mapping
//! from wall-clock times to instants, because SPEC §3 fixes the DST rules for every
//! pattern alike: a local time inside a spring-forward gap fires at the first
//! instant after the gap, and a local time repeated by a fall-back fires once, at
//! its first occurrence.
//!
//! Timezones come from the system tz database (jiff reads /usr/share/zoneinfo), the
//! same data PostgreSQL's `AT TIME ZONE` uses on Debian, so periods agree with SQL.

use croner::parser::{CronParser, Seconds, Year};
use croner::Cron;
use jiff::civil::DateTime;
use jiff::tz::{AmbiguousOffset, TimeZone};
use jiff::{SignedDuration, Timestamp};

/// The presets SPEC §3 names, with the cron expression each stands for.
pub const PRESETS: &[(&str, Option<&str>)] = &[
    ("@hourly", Some("0 * * * *")),
    ("@daily", Some("0 0 * * *")),
    ("@weekly", Some("0 0 * * 0")),
    ("@monthly", Some("0 0 1 * *")),
    ("@yearly", Some("0 0 1 1 *")),
    ("@never", None),
];

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScheduleError {
    #[error("reset_schedule is empty: give a 5-field cron expression (minute hour day month weekday) or one of @hourly, @daily, @weekly, @monthly, @yearly, @never")]
    Empty,
    #[error(
        "reset_schedule \"{0}\" is not a known preset: use one of @hourly, @daily, @weekly, @monthly, @yearly, @never"
    )]
    UnknownPreset(String),
    #[error("reset_schedule \"{expr}\" has {fields} fields: a cron expression has exactly 5 (minute hour day month weekday)")]
    FieldCount { expr: String, fields: usize },
    #[error("reset_schedule \"{expr}\" is not a valid cron expression: {reason}")]
    Invalid { expr: String, reason: String },
    #[error("reset_schedule \"{0}\" never fires: no date matches it")]
    NeverFires(String),
    #[error("timezone \"{0}\" is not a known IANA timezone (for example Europe/Stockholm, America/New_York, UTC)")]
    UnknownTimezone(String),
}

/// A parsed reset schedule.
#[derive(Debug, Clone)]
pub struct Schedule {
    /// `None` for `@never`: the period never ends.
    cron: Option<Cron>,
}

/// How far ahead the next occurrence is searched. Any satisfiable 5-field pattern
/// fires within 28 years (the Gregorian weekday/leap cycle).
const SEARCH_HORIZON_DAYS: i64 = 366 * 29;

/// Schedules a backend parsed before, by expression: a parse takes about as long
/// as a whole realtime `ingest` call's other work, and every call loads its meter
/// types. Bounded: emptied when it holds `MAX_CACHED_SCHEDULES`.
const MAX_CACHED_SCHEDULES: usize = 1024;

thread_local! {
    static PARSED: std::cell::RefCell<std::collections::HashMap<String, Schedule>> = Default::default();
}

impl Schedule {
    /// `parse`, remembered per expression (parsing is a pure function of it).
    pub fn parse_cached(expr: &str) -> Result<Schedule, ScheduleError> {
        if let Some(schedule) = PARSED.with(|parsed| parsed.borrow().get(expr).cloned()) {
            return Ok(schedule);
        }
        let schedule = Schedule::parse(expr)?;
        PARSED.with(|parsed| {
            let mut parsed = parsed.borrow_mut();
            if parsed.len() >= MAX_CACHED_SCHEDULES {
                parsed.clear();
            }
            parsed.insert(expr.to_string(), schedule.clone());
        });
        Ok(schedule)
    }

    /// Parses a 5-field cron expression or a preset (case-insensitive).
    pub fn parse(expr: &str) -> Result<Schedule, ScheduleError> {
        let trimmed = expr.trim();
        if trimmed.is_empty() {
            return Err(ScheduleError::Empty);
        }
        let cron_text = if trimmed.starts_with('@') {
            let lower = trimmed.to_ascii_lowercase();
            match PRESETS.iter().find(|(name, _)| *name == lower) {
                Some((_, Some(text))) => *text,
                Some((_, None)) => return Ok(Schedule { cron: None }),
                None => return Err(ScheduleError::UnknownPreset(trimmed.to_string())),
            }
        } else {
            trimmed
        };
        let fields = cron_text.split_whitespace().count();
        if fields != 5 {
            return Err(ScheduleError::FieldCount {
                expr: trimmed.to_string(),
                fields,
            });
        }
        let cron = CronParser::builder()
            .seconds(Seconds::Disallowed)
            .year(Year::Disallowed)
            .build()
            .parse(cron_text)
            .map_err(|e| ScheduleError::Invalid {
                expr: trimmed.to_string(),
                reason: e.to_string(),
            })?;
        let schedule = Schedule { cron: Some(cron) };
        // A pattern such as "0 0 30 2 *" parses but names no real date.
        let probe = Timestamp::from_second(978_307_200).expect("2001-01-01 is a valid instant");
        if schedule.next_after(&TimeZone::UTC, probe).is_none() {
            return Err(ScheduleError::NeverFires(trimmed.to_string()));
        }
        Ok(schedule)
    }

    pub fn is_never(&self) -> bool {
        self.cron.is_none()
    }

    /// The first occurrence strictly after `after`, or `None` for `@never`.
    pub fn next_after(&self, tz: &TimeZone, after: Timestamp) -> Option<Timestamp> {
        let cron = self.cron.as_ref()?;
        // Candidates are wall-clock times strictly after `after`'s wall clock; every
        // earlier wall-clock time maps to an instant at or before `after`. The reverse
        // does not hold inside a fall-back overlap, hence the instant check below.
        let mut cursor = truncate_to_second(tz.to_datetime(after));
        let horizon = cursor
            .checked_add(SignedDuration::from_hours(24 * SEARCH_HORIZON_DAYS))
            .ok()?;
        loop {
            let local = cron.find_next_occurrence(&cursor, false).ok()?;
            if local > horizon {
                return None;
            }
            let instant = resolve_local(tz, local)?;
            if instant > after {
                return Some(instant);
            }
            cursor = local;
        }
    }
}

/// Looks up an IANA timezone name in the system tz database.
pub fn parse_timezone(name: &str) -> Result<TimeZone, ScheduleError> {
    let trimmed = name.trim();
    if trimmed.is_empty() {
        return Err(ScheduleError::UnknownTimezone(name.to_string()));
    }
    TimeZone::get(trimmed).map_err(|_| ScheduleError::UnknownTimezone(name.to_string()))
}

/// The instant a wall-clock time stands for under SPEC §3's DST rules; `None`
/// only outside the representable range.
pub fn resolve_local(tz: &TimeZone, local: DateTime) -> Option<Timestamp> {
    let ambiguous = tz.to_ambiguous_timestamp(local);
    match ambiguous.offset() {
        AmbiguousOffset::Unambiguous { offset } => offset.to_timestamp(local).ok(),
        // Fall back: the first occurrence.
        AmbiguousOffset::Fold { before, .. } => before.to_timestamp(local).ok(),
        // Spring forward: the first instant after the gap.
        AmbiguousOffset::Gap { .. } => first_instant_at_or_after(tz, local),
    }
}

/// The earliest instant whose wall clock is at or after `local`. Around a gap the
/// wall clock only moves forward, so a binary search over whole seconds finds the
/// transition instant (transitions fall on whole seconds).
fn first_instant_at_or_after(tz: &TimeZone, local: DateTime) -> Option<Timestamp> {
    let as_utc = TimeZone::UTC.to_timestamp(local).ok()?.as_second();
    // Real offsets lie within ±26 hours, so the answer lies in this window.
    let (mut lo, mut hi) = (as_utc - 26 * 3600, as_utc + 26 * 3600);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        let wall = tz.to_datetime(Timestamp::from_second(mid).ok()?);
        if wall >= local {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    Timestamp::from_second(lo).ok()
}

fn truncate_to_second(t: DateTime) -> DateTime {
    t.with().subsec_nanosecond(0).build().unwrap_or(t)
}

/// A metering period: `end` is `None` when the schedule never fires (`@never`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Period {
    pub start: Timestamp,
    pub end: Option<Timestamp>,
}

/// A meter's first period (SPEC §3): it starts when the meter is created, or at
/// the meter type's `active_from` if that is later, and ends at the next
/// occurrence strictly after its start.
pub fn first_period(schedule: &Schedule, tz: &TimeZone, created: Timestamp, active_from: Option<Timestamp>) -> Period {
    let start = active_from.map_or(created, |from| from.max(created));
    Period {
        start,
        end: schedule.next_after(tz, start),
    }
}

/// The period after a flush at period end: it starts where the old one ended and
/// ends at the nearest occurrence after `now`, so a stream run less often than its
/// schedule merges the periods it missed (as UE does).
pub fn period_after_period_end(schedule: &Schedule, tz: &TimeZone, old_end: Timestamp, now: Timestamp) -> Period {
    Period {
        start: old_end,
        end: schedule.next_after(tz, old_end.max(now)),
    }
}

/// The period after a flush by stream execution: it starts at the flush.
pub fn period_after_flush_at(schedule: &Schedule, tz: &TimeZone, flushed_at: Timestamp) -> Period {
    Period {
        start: flushed_at,
        end: schedule.next_after(tz, flushed_at),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn utc(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn tz(name: &str) -> TimeZone {
        parse_timezone(name).unwrap()
    }

    fn next(expr: &str, zone: &str, after: &str) -> Option<Timestamp> {
        Schedule::parse(expr).unwrap().next_after(&tz(zone), utc(after))
    }

    fn hours(a: Timestamp, b: Timestamp) -> i64 {
        b.duration_since(a).as_hours()
    }

    #[test]
    fn a_cached_parse_is_the_parse() {
        let zone = tz("Europe/Stockholm");
        let after = utc("2026-03-29T00:30:00Z");
        for _ in 0..2 {
            for expr in ["@monthly", "*/15 9-17 * * mon-fri", "@never", "0 0 1 1 *"] {
                let cached = Schedule::parse_cached(expr).unwrap();
                assert_eq!(
                    cached.next_after(&zone, after),
                    next(expr, "Europe/Stockholm", "2026-03-29T00:30:00Z"),
                    "{expr}"
                );
                assert_eq!(cached.is_never(), expr == "@never");
            }
            // Errors are not remembered as schedules.
            assert!(Schedule::parse_cached("61 * * * *").is_err());
            assert_eq!(
                Schedule::parse_cached("@fortnightly").unwrap_err(),
                ScheduleError::UnknownPreset("@fortnightly".into())
            );
        }
    }

    #[test]
    fn presets_and_cron_parse() {
        for (name, _) in PRESETS {
            assert!(Schedule::parse(name).is_ok(), "{name}");
        }
        assert!(Schedule::parse("@Monthly").is_ok());
        assert!(Schedule::parse("*/15 9-17 * * mon-fri").is_ok());
        assert!(Schedule::parse("0 0 L * *").is_ok());
    }

    #[test]
    fn bad_schedules_name_the_problem() {
        assert_eq!(Schedule::parse("  ").unwrap_err(), ScheduleError::Empty);
        assert_eq!(
            Schedule::parse("@fortnightly").unwrap_err(),
            ScheduleError::UnknownPreset("@fortnightly".into())
        );
        assert_eq!(
            Schedule::parse("0 0 * *").unwrap_err(),
            ScheduleError::FieldCount {
                expr: "0 0 * *".into(),
                fields: 4
            }
        );
        assert!(matches!(
            Schedule::parse("0 0 * * * *"),
            Err(ScheduleError::FieldCount { fields: 6, .. })
        ));
        assert!(matches!(
            Schedule::parse("61 0 * * *"),
            Err(ScheduleError::Invalid { .. })
        ));
        assert!(matches!(
            Schedule::parse("0 0 32 * *"),
            Err(ScheduleError::Invalid { .. })
        ));
        assert!(matches!(
            Schedule::parse("x y z w v"),
            Err(ScheduleError::Invalid { .. })
        ));
        assert_eq!(
            Schedule::parse("0 0 30 2 *").unwrap_err(),
            ScheduleError::NeverFires("0 0 30 2 *".into())
        );
        let msg = Schedule::parse("0 0 * *").unwrap_err().to_string();
        assert!(msg.contains("reset_schedule") && msg.contains("exactly 5"), "{msg}");
    }

    #[test]
    fn unknown_timezones_are_refused() {
        assert!(parse_timezone("Europe/Stockholm").is_ok());
        assert!(parse_timezone("UTC").is_ok());
        assert!(parse_timezone("").is_err());
        let err = parse_timezone("Mars/Olympus").unwrap_err();
        assert_eq!(
            err.to_string(),
            "timezone \"Mars/Olympus\" is not a known IANA timezone (for example Europe/Stockholm, America/New_York, UTC)"
        );
    }

    #[test]
    fn never_has_no_end() {
        assert_eq!(next("@never", "UTC", "2026-01-01T00:00:00Z"), None);
        assert!(Schedule::parse("@never").unwrap().is_never());
    }

    #[test]
    fn next_is_strictly_after() {
        assert_eq!(
            next("@daily", "UTC", "2026-03-01T00:00:00Z"),
            Some(utc("2026-03-02T00:00:00Z"))
        );
        assert_eq!(
            next("@daily", "UTC", "2026-02-28T23:59:59.999Z"),
            Some(utc("2026-03-01T00:00:00Z"))
        );
        assert_eq!(
            next("@hourly", "UTC", "2026-03-01T10:00:00.5Z"),
            Some(utc("2026-03-01T11:00:00Z"))
        );
    }

    #[test]
    fn stockholm_daily_periods_are_23_and_25_hours_on_dst_days() {
        // 2026-03-29: clocks go 02:00 -> 03:00; 2026-10-25: 03:00 -> 02:00.
        let spring_start = next("@daily", "Europe/Stockholm", "2026-03-28T12:00:00Z").unwrap();
        assert_eq!(spring_start, utc("2026-03-28T23:00:00Z")); // local midnight, CET
        let spring_end = next("@daily", "Europe/Stockholm", &spring_start.to_string()).unwrap();
        assert_eq!(spring_end, utc("2026-03-29T22:00:00Z")); // local midnight, CEST
        assert_eq!(hours(spring_start, spring_end), 23);

        let fall_start = next("@daily", "Europe/Stockholm", "2026-10-24T12:00:00Z").unwrap();
        let fall_end = next("@daily", "Europe/Stockholm", &fall_start.to_string()).unwrap();
        assert_eq!(fall_start, utc("2026-10-24T22:00:00Z"));
        assert_eq!(fall_end, utc("2026-10-25T23:00:00Z"));
        assert_eq!(hours(fall_start, fall_end), 25);
    }

    #[test]
    fn new_york_daily_periods_are_23_and_25_hours_on_dst_days() {
        // 2026-03-08 spring forward, 2026-11-01 fall back.
        let a = next("@daily", "America/New_York", "2026-03-07T12:00:00Z").unwrap();
        let b = next("@daily", "America/New_York", &a.to_string()).unwrap();
        assert_eq!((a, hours(a, b)), (utc("2026-03-08T05:00:00Z"), 23));
        let c = next("@daily", "America/New_York", "2026-10-31T12:00:00Z").unwrap();
        let d = next("@daily", "America/New_York", &c.to_string()).unwrap();
        assert_eq!((c, hours(c, d)), (utc("2026-11-01T04:00:00Z"), 25));
    }

    #[test]
    fn a_time_in_the_spring_gap_fires_when_the_gap_ends() {
        // 02:30 does not exist in Stockholm on 2026-03-29; the gap ends at 03:00 CEST = 01:00Z.
        assert_eq!(
            next("30 2 * * *", "Europe/Stockholm", "2026-03-28T12:00:00Z"),
            Some(utc("2026-03-29T01:00:00Z"))
        );
        // ... and the next day it is 02:30 CEST again.
        assert_eq!(
            next("30 2 * * *", "Europe/Stockholm", "2026-03-29T01:00:00Z"),
            Some(utc("2026-03-30T00:30:00Z"))
        );
        // Every hour at :30: 02:30 maps to 03:00, then 03:30 follows.
        assert_eq!(
            next("30 * * * *", "Europe/Stockholm", "2026-03-29T00:30:00Z"),
            Some(utc("2026-03-29T01:00:00Z"))
        );
        assert_eq!(
            next("30 * * * *", "Europe/Stockholm", "2026-03-29T01:00:00Z"),
            Some(utc("2026-03-29T01:30:00Z"))
        );
        // New York: 02:00 does not exist on 2026-03-08; the gap ends at 03:00 EDT = 07:00Z.
        assert_eq!(
            next("0 2 * * *", "America/New_York", "2026-03-07T12:00:00Z"),
            Some(utc("2026-03-08T07:00:00Z"))
        );
    }

    #[test]
    fn a_repeated_time_fires_once_at_its_first_occurrence() {
        // 02:30 happens twice in Stockholm on 2026-10-25: 00:30Z (CEST) and 01:30Z (CET).
        assert_eq!(
            next("30 2 * * *", "Europe/Stockholm", "2026-10-24T12:00:00Z"),
            Some(utc("2026-10-25T00:30:00Z"))
        );
        assert_eq!(
            next("30 2 * * *", "Europe/Stockholm", "2026-10-25T00:30:00Z"),
            Some(utc("2026-10-26T01:30:00Z"))
        );
        // Hourly: the 02:00 hour repeats, but 02:00 fires once; that period is 2 hours long.
        let at_two = next("@hourly", "Europe/Stockholm", "2026-10-24T23:30:00Z").unwrap();
        assert_eq!(at_two, utc("2026-10-25T00:00:00Z"));
        assert_eq!(
            next("@hourly", "Europe/Stockholm", &at_two.to_string()),
            Some(utc("2026-10-25T02:00:00Z"))
        );
        // Starting inside the second half of the overlap still moves forward.
        assert_eq!(
            next("@hourly", "Europe/Stockholm", "2026-10-25T01:15:00Z"),
            Some(utc("2026-10-25T02:00:00Z"))
        );
    }

    fn chain(expr: &str, zone: &str, from: &str, n: usize) -> Vec<String> {
        let schedule = Schedule::parse(expr).unwrap();
        let mut t = utc(from);
        (0..n)
            .map(|_| {
                t = schedule.next_after(&tz(zone), t).unwrap();
                t.strftime("%Y-%m-%d").to_string()
            })
            .collect()
    }

    #[test]
    fn monthly_on_day_31_skips_short_months() {
        assert_eq!(
            chain("0 0 31 * *", "UTC", "2026-01-01T00:00:00Z", 7),
            [
                "2026-01-31",
                "2026-03-31",
                "2026-05-31",
                "2026-07-31",
                "2026-08-31",
                "2026-10-31",
                "2026-12-31"
            ]
        );
    }

    #[test]
    fn last_day_of_month_with_l() {
        assert_eq!(
            chain("0 0 L * *", "UTC", "2027-12-31T12:00:00Z", 3),
            ["2028-01-31", "2028-02-29", "2028-03-31"]
        );
        // Local time of the zone, not UTC.
        assert_eq!(
            next("0 0 L * *", "Asia/Tokyo", "2026-02-01T00:00:00Z"),
            Some(utc("2026-02-27T15:00:00Z"))
        );
    }

    #[test]
    fn yearly_on_february_29_waits_for_a_leap_year() {
        assert_eq!(
            next("0 0 29 2 *", "UTC", "2025-01-01T00:00:00Z"),
            Some(utc("2028-02-29T00:00:00Z"))
        );
        assert_eq!(
            next("0 0 29 2 *", "UTC", "2028-02-29T00:00:00Z"),
            Some(utc("2032-02-29T00:00:00Z"))
        );
        assert_eq!(
            next("0 0 29 2 *", "Europe/Stockholm", "2025-01-01T00:00:00Z"),
            Some(utc("2028-02-28T23:00:00Z"))
        );
    }

    #[test]
    fn far_future_dst_follows_the_zone_rules() {
        // The system tz database's POSIX rule keeps DST going after the explicit
        // transitions end, as PostgreSQL does: 2100-03-14 is New York's DST start.
        assert_eq!(
            next("@daily", "America/New_York", "2100-03-14T13:30:00Z"),
            Some(utc("2100-03-15T04:00:00Z"))
        );
    }

    #[test]
    fn first_period_starts_at_creation_or_active_from() {
        let s = Schedule::parse("@monthly").unwrap();
        let z = tz("Europe/Stockholm");
        let created = utc("2026-11-22T10:00:00Z");
        assert_eq!(
            first_period(&s, &z, created, None),
            Period {
                start: created,
                end: Some(utc("2026-11-30T23:00:00Z"))
            }
        );
        let from = utc("2027-01-15T00:00:00Z");
        assert_eq!(
            first_period(&s, &z, created, Some(from)),
            Period {
                start: from,
                end: Some(utc("2027-01-31T23:00:00Z"))
            }
        );
        // An active_from in the past does not move the start back.
        assert_eq!(
            first_period(&s, &z, created, Some(utc("2020-01-01T00:00:00Z"))).start,
            created
        );
        let never = Schedule::parse("@never").unwrap();
        assert_eq!(
            first_period(&never, &z, created, None),
            Period {
                start: created,
                end: None
            }
        );
    }

    #[test]
    fn a_late_flush_merges_missed_periods() {
        let s = Schedule::parse("@daily").unwrap();
        let z = TimeZone::UTC;
        let on_time = period_after_period_end(&s, &z, utc("2026-05-02T00:00:00Z"), utc("2026-05-02T00:00:30Z"));
        assert_eq!(
            on_time,
            Period {
                start: utc("2026-05-02T00:00:00Z"),
                end: Some(utc("2026-05-03T00:00:00Z"))
            }
        );
        // Three days late: one period from the old end to the next midnight after now.
        let late = period_after_period_end(&s, &z, utc("2026-05-02T00:00:00Z"), utc("2026-05-05T13:00:00Z"));
        assert_eq!(
            late,
            Period {
                start: utc("2026-05-02T00:00:00Z"),
                end: Some(utc("2026-05-06T00:00:00Z"))
            }
        );
        // Flush by stream execution: the period starts at the flush.
        let at = utc("2026-05-05T13:00:00Z");
        assert_eq!(
            period_after_flush_at(&s, &z, at),
            Period {
                start: at,
                end: Some(utc("2026-05-06T00:00:00Z"))
            }
        );
    }

    // ---- property tests -------------------------------------------------------

    const ZONES: &[&str] = &[
        "UTC",
        "Europe/Stockholm",
        "America/New_York",
        "Australia/Sydney",
        "Asia/Kolkata",
        "Australia/Lord_Howe",
        "America/Santiago",
        "Pacific/Chatham",
        "Europe/London",
        "Asia/Tokyo",
    ];
    const PATTERNS: &[&str] = &[
        "@hourly",
        "@daily",
        "30 2 * * *",
        "0 2 * * *",
        "15 */3 * * *",
        "*/20 * * * *",
        "45 1 * * 0",
        "@weekly",
        "@monthly",
        "@yearly",
        "0 0 31 * *",
        "0 0 L * *",
        "0 3 1,15 * *",
        "0 0 29 2 *",
    ];
    /// PATTERNS[..FREQUENT] fire at least daily, so brute force over a period stays cheap.
    const FREQUENT: usize = 6;

    fn civil_minute_floor(t: DateTime) -> DateTime {
        t.with().second(0).subsec_nanosecond(0).build().unwrap()
    }

    /// Independent oracle for "is `t` an occurrence?", from SPEC §3's wording: the
    /// wall clock matches and this is its first occurrence, or `t` ends a
    /// spring-forward gap that contains a matching wall-clock minute.
    fn is_occurrence(cron: &Cron, zone: &TimeZone, t: Timestamp) -> bool {
        let local = zone.to_datetime(t);
        let first = match zone.to_ambiguous_timestamp(local).offset() {
            AmbiguousOffset::Unambiguous { offset } | AmbiguousOffset::Fold { before: offset, .. } => {
                offset.to_timestamp(local).unwrap() == t
            }
            AmbiguousOffset::Gap { .. } => false,
        };
        if first && cron.is_time_matching(&local).unwrap() {
            return true;
        }
        let before = zone.to_datetime(t - SignedDuration::from_secs(1));
        if local.duration_since(before) > SignedDuration::from_secs(1) {
            // The wall-clock times strictly between `before` and `local` were skipped.
            let mut m = civil_minute_floor(before) + SignedDuration::from_mins(1);
            while m < local {
                if cron.is_time_matching(&m).unwrap() {
                    return true;
                }
                m += SignedDuration::from_mins(1);
            }
        }
        false
    }

    /// Instants at which `zone` changes its UTC offset, 2000..2040: where DST bugs live.
    fn transitions(zone: &TimeZone) -> Vec<i64> {
        let offset = |s: i64| zone.to_offset(Timestamp::from_second(s).unwrap());
        let mut found = vec![];
        let (mut s, end, step) = (946_684_800i64, 2_208_988_800i64, 6 * 3600);
        while s < end {
            if offset(s) != offset(s + step) {
                let (mut lo, mut hi) = (s, s + step);
                while hi - lo > 1 {
                    let mid = (lo + hi) / 2;
                    if offset(mid) == offset(s) {
                        lo = mid
                    } else {
                        hi = mid
                    }
                }
                found.push(hi);
            }
            s += step;
        }
        found
    }

    fn near_transition(zone: usize, pick: usize, offset_secs: i64) -> i64 {
        use std::sync::OnceLock;
        static CACHE: OnceLock<Vec<Vec<i64>>> = OnceLock::new();
        let all = CACHE.get_or_init(|| ZONES.iter().map(|z| transitions(&tz(z))).collect());
        match all[zone].as_slice() {
            [] => 1_700_000_000 + offset_secs,
            list => list[pick % list.len()] + offset_secs,
        }
    }

    /// Asserts `next_after` from `after` is an occurrence, and (for frequent
    /// patterns) that no occurrence lies between `after` and it.
    fn check_next(pattern: &str, zone_name: &str, after: Timestamp) -> Result<(), TestCaseError> {
        let zone = tz(zone_name);
        let schedule = Schedule::parse(pattern).unwrap();
        let cron = schedule.cron.clone().unwrap();
        let n = schedule.next_after(&zone, after).unwrap();
        prop_assert!(n > after);
        prop_assert!(
            is_occurrence(&cron, &zone, n),
            "{pattern} in {zone_name} after {after}: {n} is not an occurrence"
        );
        if n.duration_since(after) <= SignedDuration::from_hours(72) {
            let mut t = Timestamp::from_second(after.as_second() - after.as_second().rem_euclid(60) + 60).unwrap();
            while t < n {
                prop_assert!(
                    !is_occurrence(&cron, &zone, t),
                    "{pattern} in {zone_name}: missed {t} between {after} and {n}"
                );
                t += SignedDuration::from_mins(1);
            }
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(500))]

        #[test]
        fn next_is_an_occurrence_and_nothing_is_skipped_near_dst_transitions(
            zone in 0..ZONES.len(),
            pattern in 0..PATTERNS.len(),
            pick in 0usize..1000,
            offset in -2 * 86_400i64..2 * 86_400i64,
            subsecond in prop_oneof![Just(0i32), 0..1_000_000_000i32],
        ) {
            let secs = near_transition(zone, pick, offset);
            let after = Timestamp::new(secs, subsecond).unwrap();
            check_next(PATTERNS[pattern], ZONES[zone], after)?;
        }

        #[test]
        fn next_is_an_occurrence_anywhere(
            zone in 0..ZONES.len(),
            pattern in 0..PATTERNS.len(),
            secs in 946_684_800i64..4_102_444_800i64, // 2000..2100
        ) {
            check_next(PATTERNS[pattern], ZONES[zone], Timestamp::from_second(secs).unwrap())?;
        }

        #[test]
        fn periods_chain_without_gaps(
            zone in 0..ZONES.len(),
            pattern in 0..FREQUENT,
            secs in 946_684_800i64..2_208_988_800i64,
        ) {
            // Each period starts where the previous ended; ends strictly increase.
            let z = tz(ZONES[zone]);
            let schedule = Schedule::parse(PATTERNS[pattern]).unwrap();
            let mut period = first_period(&schedule, &z, Timestamp::from_second(secs).unwrap(), None);
            for _ in 0..30 {
                let end = period.end.unwrap();
                let next = period_after_period_end(&schedule, &z, end, end);
                prop_assert_eq!(next.start, end);
                prop_assert!(next.end.unwrap() > end);
                period = next;
            }
        }

        #[test]
        fn parse_never_panics(expr in "\\PC{0,40}") {
            let _ = Schedule::parse(&expr);
        }
    }
}
