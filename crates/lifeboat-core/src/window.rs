//! Daily windows of wall-clock time in an IANA time zone: the policy's resync window (ASR
//! schedules automatic resyncs outside business hours) and its work hours.
//!
//! ```text
//!   start 22:00, end 06:00, days [Friday]          (an end before the start spans midnight)
//!   Fri 21:59  no     Fri 22:00  yes     Sat 05:59  yes     Sat 06:00  no     Sat 22:00  no
//! ```
//!
//! `days` are the days a window *opens* on; a window that spans midnight goes on into the
//! next day. Times are wall-clock times in the window's zone, so a window follows daylight
//! saving time; an opening that falls into a skipped hour opens at the first instant after it.

use jiff::Timestamp;
use jiff::civil::{Date, Time};
use jiff::tz::{Disambiguation, TimeZone};
use std::time::SystemTime;

/// A window as a resource spells it: `HH:MM` times, days, a time zone name.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WindowSpec {
    /// `HH:MM`, 24-hour clock.
    pub start: String,
    /// `HH:MM`; before `start` to span midnight.
    pub end: String,
    /// The days (0 = Monday ... 6 = Sunday) the window opens on. Empty: every day.
    pub days: Vec<u8>,
    /// An IANA time zone name. `None`: UTC.
    pub time_zone: Option<String>,
}

/// Why a window was refused; each names the part that is wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WindowError {
    /// `start` or `end` is not `HH:MM`.
    BadTime(String),
    /// The time zone is not in the IANA database.
    UnknownTimeZone(String),
    /// A day index is not 0-6.
    BadDay(u8),
}

impl std::fmt::Display for WindowError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::BadTime(t) => write!(f, "{t:?} is not a time of day as HH:MM"),
            Self::UnknownTimeZone(z) => write!(f, "unknown time zone {z:?}"),
            Self::BadDay(d) => write!(f, "day {d} is not a day of the week"),
        }
    }
}

/// A checked daily window.
#[derive(Clone, Debug, PartialEq)]
pub struct DailyWindow {
    start_minute: u16,
    end_minute: u16,
    /// Bit `d` set: the window opens on day `d` (0 = Monday).
    days: u8,
    zone: TimeZone,
}

fn minute_of_day(text: &str) -> Result<u16, WindowError> {
    let bad = || WindowError::BadTime(text.to_owned());
    let (h, m) = text.split_once(':').ok_or_else(bad)?;
    let (h, m): (u16, u16) = (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
    if h > 23 || m > 59 || text.len() != 5 {
        return Err(bad());
    }
    Ok(h * 60 + m)
}

impl DailyWindow {
    /// Check a window.
    ///
    /// # Errors
    ///
    /// The first part of `spec` that is wrong.
    pub fn parse(spec: &WindowSpec) -> Result<Self, WindowError> {
        let start_minute = minute_of_day(&spec.start)?;
        let end_minute = minute_of_day(&spec.end)?;
        let mut days = 0u8;
        for &day in &spec.days {
            if day > 6 {
                return Err(WindowError::BadDay(day));
            }
            days |= 1 << day;
        }
        let zone = match spec.time_zone.as_deref() {
            None => TimeZone::UTC,
            Some(name) => {
                TimeZone::get(name).map_err(|_| WindowError::UnknownTimeZone(name.to_owned()))?
            }
        };
        Ok(Self {
            start_minute,
            end_minute,
            days: if days == 0 { 0x7f } else { days },
            zone,
        })
    }

    fn opens_on(&self, date: Date) -> bool {
        let day = date.weekday().to_monday_zero_offset();
        self.days & (1 << day) != 0
    }

    /// Whether `now` is inside the window.
    pub fn contains(&self, now: SystemTime) -> bool {
        let Ok(ts) = Timestamp::try_from(now) else {
            return false;
        };
        let local = ts.to_zoned(self.zone.clone());
        let minute =
            u16::from(local.hour().unsigned_abs()) * 60 + u16::from(local.minute().unsigned_abs());
        let today = local.date();
        if self.start_minute < self.end_minute {
            self.opens_on(today) && (self.start_minute..self.end_minute).contains(&minute)
        } else {
            (minute >= self.start_minute && self.opens_on(today))
                || (minute < self.end_minute && today.yesterday().is_ok_and(|d| self.opens_on(d)))
        }
    }

    /// The next time the window opens strictly after `now` (within the coming eight days).
    pub fn next_opening(&self, now: SystemTime) -> Option<SystemTime> {
        let ts = Timestamp::try_from(now).ok()?;
        let today = ts.to_zoned(self.zone.clone()).date();
        let start = Time::new(
            i8::try_from(self.start_minute / 60).ok()?,
            i8::try_from(self.start_minute % 60).ok()?,
            0,
            0,
        )
        .ok()?;
        (0..=8)
            .filter_map(|offset| today.checked_add(jiff::Span::new().days(offset)).ok())
            .filter(|date| self.opens_on(*date))
            .filter_map(|date| {
                self.zone
                    .to_ambiguous_zoned(date.to_datetime(start))
                    .disambiguate(Disambiguation::Compatible)
                    .ok()
            })
            .map(|zoned| SystemTime::from(zoned.timestamp()))
            .find(|at| *at > now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(rfc3339: &str) -> SystemTime {
        SystemTime::from(
            rfc3339
                .parse::<Timestamp>()
                .unwrap_or_else(|e| panic!("{e}")),
        )
    }

    fn window(start: &str, end: &str, days: &[u8], zone: Option<&str>) -> DailyWindow {
        DailyWindow::parse(&WindowSpec {
            start: start.into(),
            end: end.into(),
            days: days.to_vec(),
            time_zone: zone.map(Into::into),
        })
        .unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn a_window_within_a_day() {
        let w = window("09:00", "17:00", &[], None);
        assert!(!w.contains(at("2025-03-03T08:59:59Z")));
        assert!(w.contains(at("2025-03-03T09:00:00Z")));
        assert!(w.contains(at("2025-03-03T16:59:59Z")));
        assert!(!w.contains(at("2025-03-03T17:00:00Z")));
        assert_eq!(
            w.next_opening(at("2025-03-03T09:00:00Z")),
            Some(at("2025-03-04T09:00:00Z"))
        );
    }

    #[test]
    fn a_window_across_midnight_on_its_day_only() {
        // 2025-03-07 is a Friday (day 4).
        let w = window("22:00", "06:00", &[4], None);
        assert!(!w.contains(at("2025-03-07T21:59:00Z")));
        assert!(w.contains(at("2025-03-07T22:00:00Z")));
        assert!(w.contains(at("2025-03-08T05:59:00Z")), "Saturday morning");
        assert!(!w.contains(at("2025-03-08T06:00:00Z")));
        assert!(!w.contains(at("2025-03-08T22:30:00Z")), "not on Saturday");
        assert!(
            !w.contains(at("2025-03-07T05:00:00Z")),
            "Thursday did not open it"
        );
        assert_eq!(
            w.next_opening(at("2025-03-08T01:00:00Z")),
            Some(at("2025-03-14T22:00:00Z"))
        );
    }

    #[test]
    fn a_window_in_a_time_zone_follows_daylight_saving() {
        let w = window("01:00", "05:00", &[], Some("Europe/Paris"));
        // Winter: UTC+1, so 01:00 Paris is 00:00 UTC.
        assert!(w.contains(at("2025-01-15T00:30:00Z")));
        // Summer: UTC+2, so 01:00 Paris is 23:00 UTC the day before.
        assert!(w.contains(at("2025-07-14T23:30:00Z")));
        assert!(!w.contains(at("2025-07-15T03:30:00Z")));
        assert_eq!(
            w.next_opening(at("2025-07-15T12:00:00Z")),
            Some(at("2025-07-15T23:00:00Z"))
        );
    }

    #[test]
    fn bad_windows_name_what_is_wrong() {
        let spec = |start: &str, zone: Option<&str>| WindowSpec {
            start: start.into(),
            end: "05:00".into(),
            days: vec![],
            time_zone: zone.map(Into::into),
        };
        assert_eq!(
            DailyWindow::parse(&spec("01:00", Some("Mars/Olympus"))),
            Err(WindowError::UnknownTimeZone("Mars/Olympus".into()))
        );
        assert_eq!(
            DailyWindow::parse(&spec("25:00", None)),
            Err(WindowError::BadTime("25:00".into()))
        );
    }
}
