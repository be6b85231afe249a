//! Where "now" comes from. Every decision in this crate takes `now` as an argument; the
//! shells (the operator, standalone mode, the tests, the benchmark) read it from a [`Clock`],
//! so that a test can stop time, or move it by hours, without sleeping.

use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

/// A source of the current time.
pub trait Clock: fmt::Debug + Send + Sync {
    /// The current time.
    fn now(&self) -> SystemTime;
}

/// The system's wall clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// A clock that moves only when told to: for tests. Clones share the same time.
#[derive(Clone, Debug)]
pub struct ManualClock(Arc<Mutex<SystemTime>>);

impl ManualClock {
    /// A clock stopped at `start`.
    pub fn new(start: SystemTime) -> Self {
        Self(Arc::new(Mutex::new(start)))
    }

    /// Move the clock forward by `by`.
    pub fn advance(&self, by: Duration) {
        let mut now = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        *now += by;
    }

    /// Set the clock to `to`.
    pub fn set(&self, to: SystemTime) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = to;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> SystemTime {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The system's clock moved forward by every [`JumpingClock::jump`]: for tests where real
/// processes keep real time (an agent renewing its Lease) while the one reading this clock
/// sees hours go by. Clones share the jumps.
#[derive(Clone, Debug, Default)]
pub struct JumpingClock(Arc<Mutex<Duration>>);

impl JumpingClock {
    /// Move the clock forward by `by`, for good.
    pub fn jump(&self, by: Duration) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) += by;
    }
}

impl Clock for JumpingClock {
    fn now(&self) -> SystemTime {
        SystemTime::now() + *self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manual_clock_moves_only_when_told_and_clones_share_it() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(100);
        let clock = ManualClock::new(t0);
        let other = clock.clone();
        assert_eq!(clock.now(), t0);
        other.advance(Duration::from_secs(5));
        assert_eq!(clock.now(), t0 + Duration::from_secs(5));
        clock.set(t0);
        assert_eq!(other.now(), t0);
    }
}
