//! When to try again after a failed cycle or job, as ASR does for Hyper-V replication:
//! recoverable errors are retried after the replication interval plus a backoff of 1, 2, 4, 8
//! and 10 minutes, then every 30 minutes; non-recoverable errors are not retried until the
//! resource changes or an operator asks.

use std::time::{Duration, SystemTime};

/// Whether an error clears by itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorClass {
    /// Network, store unreachable, low disk space, low memory.
    Recoverable,
    /// Broken disk chain, invalid replica state, authentication or authorization failure, VM
    /// not found.
    NonRecoverable,
}

/// The backoffs after the 1st, 2nd, ... consecutive failure, before the steady 30 minutes.
const BACKOFF_MINUTES: [u64; 5] = [1, 2, 4, 8, 10];
/// The steady retry period once the backoffs are used up.
const STEADY_RETRY: Duration = Duration::from_secs(30 * 60);

/// What to do after a failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RetryDecision {
    /// Try again at this time.
    RetryAt(SystemTime),
    /// Do not retry: an administrator must act (health turns Critical).
    GiveUp,
}

/// The retry after the `failures`-th consecutive failure (1 for the first) of class `class`,
/// which happened at `failed_at`, for a VM replicating every `copy_interval`.
///
/// # Guarantees
///
/// For recoverable errors the delay never shrinks as `failures` grows, is at least
/// `copy_interval + 1 minute`, and at most `copy_interval + 30 minutes`: no hot loop, and
/// no VM forgotten.
pub fn next_retry(
    class: ErrorClass,
    failures: u32,
    failed_at: SystemTime,
    copy_interval: Duration,
) -> RetryDecision {
    match class {
        ErrorClass::NonRecoverable => RetryDecision::GiveUp,
        ErrorClass::Recoverable => {
            let index = failures.max(1) as usize - 1;
            let backoff = BACKOFF_MINUTES
                .get(index)
                .map(|m| Duration::from_secs(m * 60))
                .unwrap_or(STEADY_RETRY);
            RetryDecision::RetryAt(failed_at + copy_interval + backoff)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const T0: SystemTime = SystemTime::UNIX_EPOCH;
    const FIVE_MIN: Duration = Duration::from_secs(300);

    fn minutes_after(decision: RetryDecision) -> u64 {
        match decision {
            RetryDecision::RetryAt(at) => {
                at.duration_since(T0).map(|d| d.as_secs() / 60).unwrap_or(0)
            }
            RetryDecision::GiveUp => u64::MAX,
        }
    }

    #[test]
    fn the_asr_schedule_after_the_replication_interval() {
        let schedule: Vec<u64> = (1..=8)
            .map(|n| minutes_after(next_retry(ErrorClass::Recoverable, n, T0, FIVE_MIN)))
            .collect();
        // 5-minute interval + 1, 2, 4, 8, 10, then 30 every time.
        assert_eq!(schedule, [6, 7, 9, 13, 15, 35, 35, 35]);
        assert_eq!(
            minutes_after(next_retry(ErrorClass::Recoverable, 0, T0, FIVE_MIN)),
            6,
            "0 counts as the first"
        );
    }

    #[test]
    fn non_recoverable_errors_are_not_retried() {
        assert_eq!(
            next_retry(ErrorClass::NonRecoverable, 1, T0, FIVE_MIN),
            RetryDecision::GiveUp
        );
    }

    proptest! {
        #[test]
        fn backoff_is_bounded_and_never_shrinks(failures in 1u32..1000, interval_s in prop::sample::select(vec![30u64, 300, 900])) {
            let interval = Duration::from_secs(interval_s);
            let delay = |n| match next_retry(ErrorClass::Recoverable, n, T0, interval) {
                RetryDecision::RetryAt(at) => at.duration_since(T0).unwrap_or_default(),
                RetryDecision::GiveUp => Duration::MAX,
            };
            prop_assert!(delay(failures) >= interval + Duration::from_secs(60));
            prop_assert!(delay(failures) <= interval + STEADY_RETRY);
            prop_assert!(delay(failures + 1) >= delay(failures));
        }
    }
}
