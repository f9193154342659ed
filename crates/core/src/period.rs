//! Usage periods: where the current hour, day or month begins and when it resets, in UTC.
//! The one place both the sidecar and the control plane compute period boundaries; pure
//! arithmetic, no clock reads (callers pass `now`).

use time::{Date, Month, OffsetDateTime, Time};

use crate::model::Period;

/// The window of a period that contains `now`: its start and, unless the period never
/// resets, the instant it resets. Unix seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub start: i64,
    pub reset_at: Option<i64>,
}

impl Period {
    pub fn window(self, now: i64) -> Window {
        match self {
            Period::Hour => {
                let start = now - now.rem_euclid(3600);
                Window { start, reset_at: Some(start + 3600) }
            }
            Period::Day => {
                let start = now - now.rem_euclid(86_400);
                Window { start, reset_at: Some(start + 86_400) }
            }
            Period::Month => month_window(now),
            Period::Never => Window { start: 0, reset_at: None },
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Period::Hour => "hour",
            Period::Day => "day",
            Period::Month => "month",
            Period::Never => "never",
        }
    }

    pub fn parse(text: &str) -> Option<Period> {
        match text {
            "hour" => Some(Period::Hour),
            "day" => Some(Period::Day),
            "month" => Some(Period::Month),
            "never" => Some(Period::Never),
            _ => None,
        }
    }
}

impl ArchivedPeriod {
    pub fn to_native(self) -> Period {
        match self {
            ArchivedPeriod::Hour => Period::Hour,
            ArchivedPeriod::Day => Period::Day,
            ArchivedPeriod::Month => Period::Month,
            ArchivedPeriod::Never => Period::Never,
        }
    }
}

use crate::model::ArchivedPeriod;

fn month_window(now: i64) -> Window {
    // Timestamps outside the range `time` supports (about ±9999 years) cannot come from a
    // real clock; fall back to a window that never resets rather than panic.
    let Ok(moment) = OffsetDateTime::from_unix_timestamp(now) else {
        return Window { start: 0, reset_at: None };
    };
    let (year, month) = (moment.year(), moment.month());
    let start = first_of_month(year, month);
    let (next_year, next_month) = if month == Month::December { (year + 1, Month::January) } else { (year, month.next()) };
    let reset_at = first_of_month(next_year, next_month);
    match (start, reset_at) {
        (Some(start), reset_at) => Window { start, reset_at },
        (None, _) => Window { start: 0, reset_at: None },
    }
}

fn first_of_month(year: i32, month: Month) -> Option<i64> {
    let date = Date::from_calendar_date(year, month, 1).ok()?;
    Some(date.with_time(Time::MIDNIGHT).assume_utc().unix_timestamp())
}

/// Unix seconds shown as RFC 3339 in UTC, e.g. `2026-12-01T00:00:00Z`. Answers carry up to
/// two timestamps per decision, so this writes the fixed layout straight into the output (as
/// `Display` and as a serde string) without an intermediate `String` or `time`'s general
/// formatter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rfc3339(pub i64);

impl std::fmt::Display for Rfc3339 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match OffsetDateTime::from_unix_timestamp(self.0) {
            Ok(moment) if (0..=9999).contains(&moment.year()) => {
                let (date, clock) = (moment.date(), moment.time());
                write!(
                    f,
                    "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
                    date.year(),
                    u8::from(date.month()),
                    date.day(),
                    clock.hour(),
                    clock.minute(),
                    clock.second()
                )
            }
            _ => write!(f, "{}", self.0),
        }
    }
}

impl serde::Serialize for Rfc3339 {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// Formats unix seconds as RFC 3339 in UTC, e.g. `2026-12-01T00:00:00Z`.
pub fn format_rfc3339(unix_seconds: i64) -> String {
    Rfc3339(unix_seconds).to_string()
}

/// Parses an RFC 3339 timestamp into unix seconds.
pub fn parse_rfc3339(text: &str) -> Option<i64> {
    OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339).ok().map(|moment| moment.unix_timestamp())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn month_window_spans_the_calendar_month() {
        let now = parse_rfc3339("2026-12-15T10:30:00Z").unwrap();
        let window = Period::Month.window(now);
        assert_eq!(format_rfc3339(window.start), "2026-12-01T00:00:00Z");
        assert_eq!(format_rfc3339(window.reset_at.unwrap()), "2027-01-01T00:00:00Z");
    }

    #[test]
    fn formats_and_parses_rfc3339() {
        for text in ["1970-01-01T00:00:00Z", "2026-02-28T23:59:59Z", "2099-12-31T00:00:01Z"] {
            assert_eq!(format_rfc3339(parse_rfc3339(text).unwrap()), text);
        }
    }

    #[test]
    fn hour_and_day_windows_align_to_utc() {
        let now = parse_rfc3339("2026-02-28T23:59:59Z").unwrap();
        assert_eq!(format_rfc3339(Period::Hour.window(now).start), "2026-02-28T23:00:00Z");
        assert_eq!(format_rfc3339(Period::Day.window(now).reset_at.unwrap()), "2026-03-01T00:00:00Z");
        assert_eq!(Period::Never.window(now), Window { start: 0, reset_at: None });
    }
}
