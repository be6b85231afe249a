//! Upload bandwidth limits and per-VM upload concurrency.
//!
//! The limit is set from outside (the policy's work-hours and off-hours limits are calendar
//! matters the caller decides); the engine takes bytes from the bucket before each upload.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A token bucket of bytes per second; no limit when unset.
#[derive(Debug)]
pub struct Throttle {
    inner: Mutex<Bucket>,
}

#[derive(Debug)]
struct Bucket {
    limit_bytes_per_second: Option<u64>,
    available: f64,
    updated: Instant,
}

impl Default for Throttle {
    fn default() -> Self {
        Throttle::new(None)
    }
}

impl Throttle {
    /// A throttle at `limit_bytes_per_second` (None: unlimited).
    pub fn new(limit_bytes_per_second: Option<u64>) -> Throttle {
        Self::starting_at(limit_bytes_per_second, Instant::now())
    }

    fn starting_at(limit_bytes_per_second: Option<u64>, now: Instant) -> Throttle {
        Throttle {
            inner: Mutex::new(Bucket {
                limit_bytes_per_second,
                available: 0.0,
                updated: now,
            }),
        }
    }

    /// A throttle at `mbps` megabits per second (None: unlimited).
    pub fn from_mbps(mbps: Option<u32>) -> Throttle {
        Throttle::new(mbps.map(|m| u64::from(m) * 1_000_000 / 8))
    }

    /// Change the limit (at the start or end of work hours).
    pub fn set_limit(&self, limit_bytes_per_second: Option<u64>) {
        let mut bucket = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        bucket.limit_bytes_per_second = limit_bytes_per_second;
    }

    /// How long to wait before sending `bytes`, taking them from the bucket. The bucket holds
    /// at most one second of bytes, so a burst after a quiet spell stays bounded.
    fn reserve(&self, bytes: u64, now: Instant) -> Duration {
        let mut bucket = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let Some(rate) = bucket.limit_bytes_per_second.filter(|r| *r > 0) else {
            return Duration::ZERO;
        };
        let rate = rate as f64;
        let elapsed = now.saturating_duration_since(bucket.updated).as_secs_f64();
        bucket.available = (bucket.available + elapsed * rate).min(rate);
        bucket.updated = now;
        bucket.available -= bytes as f64;
        if bucket.available >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-bucket.available / rate)
        }
    }

    /// Wait until `bytes` may be sent.
    pub async fn take(&self, bytes: u64) {
        let wait = self.reserve(bytes, Instant::now());
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bucket_paces_to_the_limit() {
        let t0 = Instant::now();
        let throttle = Throttle::starting_at(Some(1_000), t0);
        // The bucket starts empty: 500 bytes wait half a second, the next 500 another half.
        assert_eq!(throttle.reserve(500, t0), Duration::from_millis(500));
        assert_eq!(throttle.reserve(500, t0), Duration::from_secs(1));
        // Two seconds later the debt is paid and the bucket refilled (capped at one second).
        assert_eq!(
            throttle.reserve(1_000, t0 + Duration::from_secs(3)),
            Duration::ZERO
        );
        throttle.set_limit(None);
        assert_eq!(throttle.reserve(u64::MAX, t0), Duration::ZERO);
        assert_eq!(Throttle::from_mbps(Some(8)).reserve(0, t0), Duration::ZERO);
    }
}
