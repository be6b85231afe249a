//! Recovery point objective: how much would be lost if the site went now, measured from the
//! latest durable recovery point.

use std::time::{Duration, SystemTime};

/// The RPO at `now`: the age of the latest durable point, or `None` before the first point.
/// A point stamped after `now` (clock skew between nodes) counts as zero, not as negative.
pub fn rpo(latest_point: Option<SystemTime>, now: SystemTime) -> Option<Duration> {
    latest_point.map(|at| now.duration_since(at).unwrap_or_default())
}

/// A time as RFC 3339 in UTC (`2025-03-03T09:00:00Z`), for messages.
pub fn format_rfc3339(at: SystemTime) -> String {
    jiff::Timestamp::try_from(at).map_or_else(|_| format!("{at:?}"), |t| t.to_string())
}

/// A duration the way `kubectl` prints ages: `45s`, `2m30s`, `1h5m`, `3d4h`.
pub fn format_duration(duration: Duration) -> String {
    let s = duration.as_secs();
    let (d, h, m, sec) = (s / 86_400, s % 86_400 / 3600, s % 3600 / 60, s % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{sec}s"),
        (0, 0, _) if sec == 0 => format!("{m}m"),
        (0, 0, _) => format!("{m}m{sec}s"),
        (0, _, 0) => format!("{h}h"),
        (0, _, _) => format!("{h}h{m}m"),
        (_, 0, _) => format!("{d}d"),
        _ => format!("{d}d{h}h"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rpo_is_the_age_of_the_latest_point() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        assert_eq!(rpo(None, t0), None);
        assert_eq!(
            rpo(Some(t0), t0 + Duration::from_secs(150)),
            Some(Duration::from_secs(150))
        );
        assert_eq!(
            rpo(Some(t0 + Duration::from_secs(5)), t0),
            Some(Duration::ZERO),
            "skew is not negative"
        );
    }

    #[test]
    fn durations_print_like_kubectl_ages() {
        let cases = [
            (0, "0s"),
            (45, "45s"),
            (60, "1m"),
            (150, "2m30s"),
            (3600, "1h"),
            (3900, "1h5m"),
            (86_400, "1d"),
            (3 * 86_400 + 4 * 3600 + 60, "3d4h"),
        ];
        for (secs, text) in cases {
            assert_eq!(format_duration(Duration::from_secs(secs)), text);
        }
    }
}
