//! Size accounting for the rule "resynchronize when the logs awaiting shipment reach N % of
//! the disk's size".
//!
//! ```text
//! pending logs:  [log 1][log 2][log 3]        sum = pending bytes
//! disk:          [..........................] size
//! resync when:   pending * 100 >= size * N     (exact, in u128: no rounding, no overflow)
//! ```

/// The default threshold: half the disk.
pub const DEFAULT_RESYNC_THRESHOLD_PERCENT: u32 = 50;

/// Total size of pending logs. Summed in u128 so that no number of logs can overflow it.
pub fn pending_log_bytes<I: IntoIterator<Item = u64>>(log_sizes_bytes: I) -> u128 {
    log_sizes_bytes.into_iter().map(u128::from).sum()
}

/// The threshold, in percent of the disk's size, at which pending logs force a resync.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResyncThreshold {
    percent: u32,
}

impl Default for ResyncThreshold {
    fn default() -> Self {
        Self::new(DEFAULT_RESYNC_THRESHOLD_PERCENT)
    }
}

impl ResyncThreshold {
    /// A threshold of `percent` % of the disk's size. 0 is reached by anything (resync at
    /// every check); values above 100 are allowed (logs larger than the disk).
    pub fn new(percent: u32) -> Self {
        Self { percent }
    }

    /// The threshold in percent.
    pub fn percent(&self) -> u32 {
        self.percent
    }

    /// Whether `pending_bytes` reaches the threshold for a disk of `disk_size_bytes`:
    /// `pending * 100 >= disk * percent`, exactly. Reaching it counts (">=").
    pub fn is_reached(&self, pending_bytes: u128, disk_size_bytes: u64) -> bool {
        // NB: 2^128 > (2^64 * 2^32), so neither product can overflow... except pending * 100
        // for absurd pending values; saturating keeps the comparison right there too.
        pending_bytes.saturating_mul(100) >= u128::from(disk_size_bytes) * u128::from(self.percent)
    }

    /// Whether the pending logs of the given sizes reach the threshold.
    pub fn is_reached_by_logs<I: IntoIterator<Item = u64>>(
        &self,
        log_sizes_bytes: I,
        disk_size_bytes: u64,
    ) -> bool {
        self.is_reached(pending_log_bytes(log_sizes_bytes), disk_size_bytes)
    }

    /// The smallest pending size that reaches the threshold (`ceil(disk * percent / 100)`).
    pub fn limit_bytes(&self, disk_size_bytes: u64) -> u128 {
        (u128::from(disk_size_bytes) * u128::from(self.percent)).div_ceil(100)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is the test failure report
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn boundaries_at_fifty_percent() {
        let t = ResyncThreshold::default();
        assert_eq!(t.percent(), 50);
        assert!(!t.is_reached(499, 1000));
        assert!(t.is_reached(500, 1000));
        assert!(t.is_reached(501, 1000));
        // Odd sizes: 50 % of 1001 is 500.5, so 500 is below and 501 reaches it.
        assert!(!t.is_reached(500, 1001));
        assert!(t.is_reached(501, 1001));
        assert_eq!(t.limit_bytes(1001), 501);
    }

    #[test]
    fn sums_logs_without_overflow() {
        assert_eq!(
            pending_log_bytes([u64::MAX, u64::MAX]),
            2 * u128::from(u64::MAX)
        );
        let t = ResyncThreshold::new(100);
        assert!(t.is_reached_by_logs([u64::MAX, 1], u64::MAX));
        assert!(!t.is_reached_by_logs([u64::MAX - 1], u64::MAX));
        assert!(t.is_reached_by_logs([300, 200], 500));
        assert!(!t.is_reached_by_logs([], 1));
    }

    #[test]
    fn edge_thresholds_and_disks() {
        assert!(ResyncThreshold::new(0).is_reached(0, 1 << 40));
        assert!(ResyncThreshold::new(50).is_reached(0, 0));
        let t = ResyncThreshold::new(200);
        assert!(!t.is_reached(1999, 1000));
        assert!(t.is_reached(2000, 1000));
        assert!(ResyncThreshold::new(u32::MAX).is_reached(u128::MAX, u64::MAX));
    }

    proptest! {
        #[test]
        fn limit_is_the_first_size_that_reaches(disk in 0u64..1 << 50, percent in 0u32..400) {
            let t = ResyncThreshold::new(percent);
            let limit = t.limit_bytes(disk);
            prop_assert!(t.is_reached(limit, disk));
            if limit > 0 {
                prop_assert!(!t.is_reached(limit - 1, disk));
            }
        }
    }
}
