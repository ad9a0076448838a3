//! Cron expressions as crontab(5) writes them, in UTC: parsing, and the times they
//! name before and after an instant. No I/O; the schedule controller decides with it.
//!
//! Small enough to keep here rather than add a crate: five fields of numbers,
//! ranges, steps and lists, plus the `@daily`-like macros. The day fields follow
//! classic cron: when both are restricted (neither starts with `*`) a day matches if
//! either matches, otherwise both must.

use k8s_openapi::jiff::Timestamp;
use k8s_openapi::jiff::civil::{Date, DateTime};
use k8s_openapi::jiff::tz::TimeZone;

/// How far ahead (and back) a time is looked for: 9 years of days covers the longest
/// wait for a February 29th (2096 to 2104) on any weekday.
const HORIZON_DAYS: u32 = 9 * 366;

/// A parsed cron expression: the allowed values of each field as bit sets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cron {
    minutes: u64,
    hours: u32,
    days: u32,
    months: u16,
    weekdays: u8,
    /// Both day fields are restricted: either may match.
    days_either: bool,
}

/// Why an expression is not a schedule; the message names the field and the value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CronError {
    /// `minute`, `hour`, `day of month`, `month`, `day of week`, or `schedule`.
    pub field: &'static str,
    /// What is wrong with it.
    pub problem: String,
}

impl std::fmt::Display for CronError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.problem)
    }
}

impl std::error::Error for CronError {}

/// One field's name and range.
struct Field {
    name: &'static str,
    min: u32,
    max: u32,
}

const FIELDS: [Field; 5] = [
    Field {
        name: "minute",
        min: 0,
        max: 59,
    },
    Field {
        name: "hour",
        min: 0,
        max: 23,
    },
    Field {
        name: "day of month",
        min: 1,
        max: 31,
    },
    Field {
        name: "month",
        min: 1,
        max: 12,
    },
    // 7 is Sunday as well as 0.
    Field {
        name: "day of week",
        min: 0,
        max: 7,
    },
];

/// The values of one field as a bit set (bit n for value n).
fn parse_field(text: &str, field: &Field) -> Result<u64, CronError> {
    let err = |problem: String| CronError {
        field: field.name,
        problem,
    };
    let number = |s: &str| {
        s.parse::<u32>()
            .map_err(|_| err(format!("{s:?} is not a number")))
            .and_then(|n| {
                if (field.min..=field.max).contains(&n) {
                    Ok(n)
                } else {
                    Err(err(format!("{n} is out of range {}-{}", field.min, field.max)))
                }
            })
    };
    let mut bits = 0u64;
    for item in text.split(',') {
        let (range, step) = match item.split_once('/') {
            Some((range, step)) => {
                let step = step
                    .parse::<u32>()
                    .ok()
                    .filter(|s| *s > 0)
                    .ok_or_else(|| err(format!("step {step:?} is not a positive number")))?;
                (range, Some(step))
            }
            None => (item, None),
        };
        let (low, high) = match range.split_once('-') {
            _ if range == "*" => (field.min, field.max),
            Some((a, b)) => (number(a)?, number(b)?),
            // `5/15` is from 5 to the end, as in Vixie cron.
            None if step.is_some() => (number(range)?, field.max),
            None => {
                let n = number(range)?;
                (n, n)
            }
        };
        if low > high {
            return Err(err(format!("range {low}-{high} runs backwards")));
        }
        let step = step.unwrap_or(1) as usize;
        for value in (low..=high).step_by(step) {
            bits |= 1 << value;
        }
    }
    Ok(bits)
}

/// What a macro stands for.
fn expand(text: &str) -> Option<&'static str> {
    Some(match text {
        "@yearly" | "@annually" => "0 0 1 1 *",
        "@monthly" => "0 0 1 * *",
        "@weekly" => "0 0 * * 0",
        "@daily" | "@midnight" => "0 0 * * *",
        "@hourly" => "0 * * * *",
        _ => return None,
    })
}

impl std::str::FromStr for Cron {
    type Err = CronError;

    fn from_str(text: &str) -> Result<Self, CronError> {
        let text = text.trim();
        let text = if text.starts_with('@') {
            expand(text).ok_or_else(|| CronError {
                field: "schedule",
                problem: format!(
                    "{text:?} is not one of @yearly, @annually, @monthly, @weekly, @daily, @midnight, @hourly"
                ),
            })?
        } else {
            text
        };
        let parts: Vec<&str> = text.split_whitespace().collect();
        let [minute, hour, day, month, weekday] = parts.as_slice() else {
            return Err(CronError {
                field: "schedule",
                problem: format!(
                    "{} fields where 5 are needed (minute hour day-of-month month day-of-week)",
                    parts.len()
                ),
            });
        };
        let [f_minute, f_hour, f_day, f_month, f_weekday] = &FIELDS;
        let weekdays = parse_field(weekday, f_weekday)?;
        Ok(Self {
            minutes: parse_field(minute, f_minute)?,
            hours: parse_field(hour, f_hour)? as u32,
            days: parse_field(day, f_day)? as u32,
            months: parse_field(month, f_month)? as u16,
            // Sunday is 0 and 7.
            weekdays: ((weekdays | (weekdays >> 7)) & 0x7f) as u8,
            days_either: !day.starts_with('*') && !weekday.starts_with('*'),
        })
    }
}

impl Cron {
    fn day_matches(&self, date: Date) -> bool {
        if self.months & (1 << date.month()) == 0 {
            return false;
        }
        let by_day = self.days & (1 << date.day()) != 0;
        let by_weekday = self.weekdays & (1 << date.weekday().to_sunday_zero_offset()) != 0;
        if self.days_either {
            by_day || by_weekday
        } else {
            by_day && by_weekday
        }
    }

    /// The first (hour, minute) of a matching day at or after `hour:minute`.
    fn first_time_from(&self, hour: i8, minute: i8) -> Option<(i8, i8)> {
        (hour..24).filter(|h| self.hours & (1 << h) != 0).find_map(|h| {
            let from = if h == hour { minute } else { 0 };
            let left = self.minutes >> from;
            (left != 0).then(|| (h, from + left.trailing_zeros() as i8))
        })
    }

    /// The last (hour, minute) of a matching day at or before `hour:minute`.
    fn last_time_upto(&self, hour: i8, minute: i8) -> Option<(i8, i8)> {
        (0..=hour).rev().filter(|h| self.hours & (1 << h) != 0).find_map(|h| {
            let upto = if h == hour { minute } else { 59 };
            let below = self.minutes & (u64::MAX >> (63 - upto));
            (below != 0).then(|| (h, 63 - below.leading_zeros() as i8))
        })
    }

    /// The first time the schedule names strictly after `after`; `None` if none is
    /// within nine years (`0 0 30 2 *`, February 30th, never comes).
    pub fn next_after(&self, after: Timestamp) -> Option<Timestamp> {
        let start = utc(floor_minute(after)
            .checked_add(k8s_openapi::jiff::SignedDuration::from_mins(1))
            .ok()?);
        let (mut date, mut hour, mut minute) = (start.date(), start.hour(), start.minute());
        for _ in 0..HORIZON_DAYS {
            if self.day_matches(date)
                && let Some((h, m)) = self.first_time_from(hour, minute)
            {
                return TimeZone::UTC.to_timestamp(date.at(h, m, 0, 0)).ok();
            }
            date = date.tomorrow().ok()?;
            (hour, minute) = (0, 0);
        }
        None
    }

    /// The last time the schedule names at or before `at`; `None` if none is within
    /// nine years before it.
    pub fn latest_at_or_before(&self, at: Timestamp) -> Option<Timestamp> {
        let end = utc(floor_minute(at));
        let (mut date, mut hour, mut minute) = (end.date(), end.hour(), end.minute());
        for _ in 0..HORIZON_DAYS {
            if self.day_matches(date)
                && let Some((h, m)) = self.last_time_upto(hour, minute)
            {
                return TimeZone::UTC.to_timestamp(date.at(h, m, 0, 0)).ok();
            }
            date = date.yesterday().ok()?;
            (hour, minute) = (23, 59);
        }
        None
    }
}

fn floor_minute(t: Timestamp) -> Timestamp {
    Timestamp::from_second(t.as_second().div_euclid(60) * 60).unwrap_or(t)
}

fn utc(t: Timestamp) -> DateTime {
    TimeZone::UTC.to_datetime(t)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn at(text: &str) -> Timestamp {
        text.parse().unwrap()
    }

    fn cron(text: &str) -> Cron {
        text.parse().unwrap()
    }

    #[test]
    fn the_next_time_follows_the_fields() {
        let table = [
            // every minute: the next whole minute, never the instant itself
            ("* * * * *", "2026-03-01T10:00:00Z", "2026-03-01T10:01:00Z"),
            ("* * * * *", "2026-03-01T10:00:59.9Z", "2026-03-01T10:01:00Z"),
            // steps and ranges
            ("*/15 * * * *", "2026-03-01T10:14:00Z", "2026-03-01T10:15:00Z"),
            ("*/15 * * * *", "2026-03-01T10:45:00Z", "2026-03-01T11:00:00Z"),
            ("10-20/5 * * * *", "2026-03-01T10:16:00Z", "2026-03-01T10:20:00Z"),
            ("10-20/5 * * * *", "2026-03-01T10:20:00Z", "2026-03-01T11:10:00Z"),
            ("5/20 * * * *", "2026-03-01T10:46:00Z", "2026-03-01T11:05:00Z"),
            // lists, hours, the day rolling over
            ("0,30 9,17 * * *", "2026-03-01T17:30:00Z", "2026-03-02T09:00:00Z"),
            ("0 0 * * *", "2026-12-31T23:59:00Z", "2027-01-01T00:00:00Z"),
            // end of month: the 31st skips the months without one
            ("0 0 31 * *", "2026-04-01T00:00:00Z", "2026-05-31T00:00:00Z"),
            ("0 12 30 * *", "2026-01-30T12:00:00Z", "2026-03-30T12:00:00Z"),
            // Feb 29: the next leap year, and across 2100 (not one) to 2104
            ("0 0 29 2 *", "2026-03-01T00:00:00Z", "2028-02-29T00:00:00Z"),
            ("0 0 29 2 *", "2096-03-01T00:00:00Z", "2104-02-29T00:00:00Z"),
            // both day fields restricted: either matches (1st of the month or a Monday)
            ("0 0 1 * 1", "2026-03-01T00:00:00Z", "2026-03-02T00:00:00Z"),
            ("0 0 1 * 1", "2026-03-30T00:00:00Z", "2026-04-01T00:00:00Z"),
            ("0 0 13 * 5", "2026-01-01T00:00:00Z", "2026-01-02T00:00:00Z"),
            // one starts with `*` (even with a step): both must, a Friday that is the
            // 1st, 11th, 21st or 31st
            ("0 0 */10 * 5", "2026-01-01T00:00:00Z", "2026-05-01T00:00:00Z"),
            ("0 0 13 * *", "2026-01-01T00:00:00Z", "2026-01-13T00:00:00Z"),
            // Sunday as 7 and as 0; months
            ("0 0 * * 7", "2026-03-02T00:00:00Z", "2026-03-08T00:00:00Z"),
            ("0 0 * * 0", "2026-03-02T00:00:00Z", "2026-03-08T00:00:00Z"),
            ("0 0 1 6-8 *", "2026-03-02T00:00:00Z", "2026-06-01T00:00:00Z"),
            // macros
            ("@hourly", "2026-03-01T10:00:00Z", "2026-03-01T11:00:00Z"),
            ("@weekly", "2026-03-01T00:00:00Z", "2026-03-08T00:00:00Z"),
            ("@yearly", "2026-03-01T00:00:00Z", "2027-01-01T00:00:00Z"),
        ];
        for (expr, after, next) in table {
            assert_eq!(cron(expr).next_after(at(after)), Some(at(next)), "{expr} after {after}");
        }
    }

    #[test]
    fn the_latest_time_at_or_before_an_instant() {
        let table = [
            ("* * * * *", "2026-03-01T10:00:30Z", "2026-03-01T10:00:00Z"),
            ("*/15 * * * *", "2026-03-01T10:14:00Z", "2026-03-01T10:00:00Z"),
            ("*/15 * * * *", "2026-03-01T10:15:00Z", "2026-03-01T10:15:00Z"),
            ("0 9 * * *", "2026-03-01T08:59:00Z", "2026-02-28T09:00:00Z"),
            ("0 0 31 * *", "2026-05-01T00:00:00Z", "2026-03-31T00:00:00Z"),
            ("0 0 29 2 *", "2027-01-01T00:00:00Z", "2024-02-29T00:00:00Z"),
            ("0 0 1 * 1", "2026-03-31T00:00:00Z", "2026-03-30T00:00:00Z"),
        ];
        for (expr, before, latest) in table {
            assert_eq!(
                cron(expr).latest_at_or_before(at(before)),
                Some(at(latest)),
                "{expr} before {before}"
            );
        }
    }

    #[test]
    fn a_date_that_never_comes_has_no_time() {
        assert_eq!(cron("0 0 30 2 *").next_after(at("2026-01-01T00:00:00Z")), None);
        assert_eq!(
            cron("0 0 31 4,6,9,11 *").latest_at_or_before(at("2026-01-01T00:00:00Z")),
            None
        );
    }

    #[test]
    fn bad_fields_are_named() {
        let table = [
            ("60 * * * *", "minute: 60 is out of range 0-59"),
            ("* 24 * * *", "hour: 24 is out of range 0-23"),
            ("* * 0 * *", "day of month: 0 is out of range 1-31"),
            ("* * * 13 *", "month: 13 is out of range 1-12"),
            ("* * * * 8", "day of week: 8 is out of range 0-7"),
            ("*/0 * * * *", "minute: step \"0\" is not a positive number"),
            ("30-10 * * * *", "minute: range 30-10 runs backwards"),
            ("x * * * *", "minute: \"x\" is not a number"),
            ("* * * *", "schedule: 4 fields where 5 are needed"),
            ("0 0 * * * *", "schedule: 6 fields where 5 are needed"),
            ("@often", "schedule: \"@often\" is not one of"),
        ];
        for (expr, message) in table {
            let error = expr.parse::<Cron>().unwrap_err().to_string();
            assert!(error.starts_with(message), "{expr}: {error}");
        }
    }
}
