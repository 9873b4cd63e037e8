//! Cron schedules as CronJobs use them: five fields (minute, hour, day of
//! month, month, day of week) with `*`, `?`, lists, ranges, steps and
//! month/day names, the `@hourly`-style macros, and standard cron's rule
//! that a restricted day-of-month and day-of-week match when either does.
//! Times are evaluated in an IANA time zone (the system's tzdb).

use jiff::{Timestamp, tz::TimeZone};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid schedule {schedule:?}: {reason}")]
pub struct ScheduleError {
    pub schedule: String,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schedule {
    minutes: u64,
    hours: u64,
    days: u64,
    months: u64,
    weekdays: u64,
    dom_star: bool,
    dow_star: bool,
}

const MONTHS: [&str; 12] = [
    "JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC",
];
const DAYS: [&str; 7] = ["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"];

fn value(s: &str, names: &[&str], offset: u32) -> Option<u32> {
    s.parse().ok().or_else(|| {
        names
            .iter()
            .position(|n| n.eq_ignore_ascii_case(s))
            .map(|i| i as u32 + offset)
    })
}

/// A field as a bit set over `lo..=hi`.
fn field(spec: &str, lo: u32, hi: u32, names: &[&str], offset: u32) -> Result<u64, String> {
    let mut bits = 0u64;
    for part in spec.split(',') {
        let (range, step) = match part.split_once('/') {
            Some((r, s)) => (
                r,
                s.parse::<u32>()
                    .map_err(|_| format!("bad step in {part:?}"))?,
            ),
            None => (part, 1),
        };
        if step == 0 {
            return Err(format!("step 0 in {part:?}"));
        }
        let (a, b) = if range == "*" || range == "?" {
            (lo, hi)
        } else if let Some((a, b)) = range.split_once('-') {
            let a = value(a, names, offset).ok_or_else(|| format!("bad value {a:?}"))?;
            let b = value(b, names, offset).ok_or_else(|| format!("bad value {b:?}"))?;
            (a, b)
        } else {
            let a = value(range, names, offset).ok_or_else(|| format!("bad value {range:?}"))?;
            // "5/15" means from 5 to the end, every 15.
            (a, if part.contains('/') { hi } else { a })
        };
        if a < lo || b > hi || a > b {
            return Err(format!("{part:?} is outside {lo}-{hi}"));
        }
        let mut v = a;
        while v <= b {
            bits |= 1 << v;
            v += step;
        }
    }
    Ok(bits)
}

impl Schedule {
    pub fn parse(schedule: &str) -> Result<Self, ScheduleError> {
        let err = |reason: String| ScheduleError {
            schedule: schedule.to_owned(),
            reason,
        };
        let expanded = match schedule.trim() {
            "@yearly" | "@annually" => "0 0 1 1 *",
            "@monthly" => "0 0 1 * *",
            "@weekly" => "0 0 * * 0",
            "@daily" | "@midnight" => "0 0 * * *",
            "@hourly" => "0 * * * *",
            other => other,
        };
        let f: Vec<&str> = expanded.split_whitespace().collect();
        if f.len() != 5 {
            return Err(err(format!("expected 5 fields, found {}", f.len())));
        }
        let mut weekdays = field(f[4], 0, 7, &DAYS, 0).map_err(err)?;
        if weekdays & (1 << 7) != 0 {
            weekdays |= 1; // 7 is Sunday too
        }
        Ok(Self {
            minutes: field(f[0], 0, 59, &[], 0).map_err(err)?,
            hours: field(f[1], 0, 23, &[], 0).map_err(err)?,
            days: field(f[2], 1, 31, &[], 0).map_err(err)?,
            months: field(f[3], 1, 12, &MONTHS, 1).map_err(err)?,
            weekdays,
            dom_star: f[2] == "*" || f[2] == "?",
            dow_star: f[4] == "*" || f[4] == "?",
        })
    }

    /// Whether the minute starting at `t` is a scheduled time in `tz`.
    pub fn matches(&self, t: Timestamp, tz: &TimeZone) -> bool {
        let z = t.to_zoned(tz.clone());
        let bit = |set: u64, v: i8| v >= 0 && set & (1 << v) != 0;
        let dom = bit(self.days, z.day());
        let dow = bit(self.weekdays, z.weekday().to_sunday_zero_offset());
        let day = match (self.dom_star, self.dow_star) {
            (false, false) => dom || dow,
            _ => dom && dow,
        };
        bit(self.minutes, z.minute())
            && bit(self.hours, z.hour())
            && bit(self.months, z.month())
            && day
    }

    /// The latest scheduled time in `(after, now]`, looking back at most a
    /// day (older missed times are not run, as a controller that was down
    /// would skip them too).
    pub fn latest(&self, after: i64, now: i64, tz: &TimeZone) -> Option<i64> {
        let mut m = now - now.rem_euclid(60);
        let stop = after.max(now - 86_400);
        while m > stop {
            if Timestamp::from_second(m).is_ok_and(|t| self.matches(t, tz)) {
                return Some(m);
            }
            m -= 60;
        }
        None
    }

    /// The next scheduled time after `now`, within a year.
    pub fn next(&self, now: i64, tz: &TimeZone) -> Option<i64> {
        let mut m = now - now.rem_euclid(60) + 60;
        for _ in 0..(366 * 24 * 60) {
            if Timestamp::from_second(m).is_ok_and(|t| self.matches(t, tz)) {
                return Some(m);
            }
            m += 60;
        }
        None
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn ts(s: &str) -> i64 {
        s.parse::<Timestamp>().unwrap().as_second()
    }

    #[test]
    fn fields_lists_ranges_steps_names() {
        let s = Schedule::parse("*/15 9-17 * JAN,jul MON-FRI").unwrap();
        let utc = TimeZone::UTC;
        let at = |d: &str| Timestamp::from_second(ts(d)).unwrap();
        // Monday 2024-07-01.
        assert!(s.matches(at("2024-07-01T09:30:00Z"), &utc));
        assert!(!s.matches(at("2024-07-01T09:31:00Z"), &utc));
        assert!(!s.matches(at("2024-07-06T09:30:00Z"), &utc)); // Saturday
        assert!(Schedule::parse("61 * * * *").is_err());
        assert!(Schedule::parse("* * *").is_err());
        assert_eq!(
            Schedule::parse("@hourly").unwrap(),
            Schedule::parse("0 * * * *").unwrap()
        );
    }

    #[test]
    fn day_of_month_or_day_of_week() {
        // The 13th, or any Friday.
        let s = Schedule::parse("0 0 13 * 5").unwrap();
        let utc = TimeZone::UTC;
        let at = |d: &str| Timestamp::from_second(ts(d)).unwrap();
        assert!(s.matches(at("2024-02-13T00:00:00Z"), &utc)); // a Tuesday
        assert!(s.matches(at("2024-02-16T00:00:00Z"), &utc)); // a Friday
        assert!(!s.matches(at("2024-02-14T00:00:00Z"), &utc));
    }

    #[test]
    fn latest_and_next_respect_the_time_zone() {
        let s = Schedule::parse("30 2 * * *").unwrap();
        let berlin = TimeZone::get("Europe/Berlin").unwrap();
        // 02:30 in Berlin (winter, UTC+1) is 01:30 UTC.
        let now = ts("2024-01-10T12:00:00Z");
        assert_eq!(s.latest(0, now, &berlin), Some(ts("2024-01-10T01:30:00Z")));
        assert_eq!(s.next(now, &berlin), Some(ts("2024-01-11T01:30:00Z")));
        assert_eq!(s.latest(ts("2024-01-10T01:30:00Z"), now, &berlin), None);
        assert_eq!(
            s.latest(0, now, &TimeZone::UTC),
            Some(ts("2024-01-10T02:30:00Z"))
        );
    }
}
