//! Leader election over a coordination.k8s.io Lease, decided here and carried out by the
//! operator: of several replicas, only the one holding an unexpired Lease reconciles.
//!
//! ```text
//!   no Lease ──────────────> Create (we hold it)
//!   held by us ────────────> Renew
//!   free, or expired ──────> Acquire (take it over, bump leaseTransitions)
//!   held by another, fresh > Wait until it would expire
//! ```
//!
//! Writes are guarded by the Lease's resourceVersion, so that of two replicas acting on the
//! same expired Lease only one wins.
//!
//! # Guarantees
//!
//! Expiry is judged as client-go judges it (its `observedTime`): a Lease held by another
//! replica expires a lease duration after *this* replica first saw its current record
//! (holder, renew time as written, duration), never from the `renewTime` the holder wrote.
//! The holder's clock therefore does not matter: one an hour behind is not taken over
//! while it keeps renewing (each renewal is a new record, seen anew), and one an hour
//! ahead does not block forever once it stops (its last record is seen, then ages on this
//! replica's clock). [`observe`] keeps that record and its time; [`decide_lease`] reads it.
//!
//! # Caveats
//!
//! - A replica that starts, or first sees a record, only learns its age from then on: a
//!   Lease abandoned long ago still takes one lease duration to be taken over.
//! - Only this replica's clock *rate* matters, not its offset; a clock stepped backwards
//!   waits longer, one stepped forwards may take a Lease over early by the step.

use std::time::{Duration, SystemTime};

/// The Lease as read from the API server. Two reads are the same record (no renewal in
/// between) exactly when they are equal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseState {
    /// `spec.holderIdentity`.
    pub holder: Option<String>,
    /// `spec.renewTime` (or `acquireTime` when never renewed), on the holder's clock: it
    /// tells records apart and is never compared with this replica's clock.
    pub renewed: Option<SystemTime>,
    /// `spec.leaseDurationSeconds`.
    pub duration: Duration,
}

/// A Lease record and the time, on this replica's clock, it was first seen.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Observed {
    /// The record.
    pub lease: LeaseState,
    /// When this replica first read it.
    pub at: SystemTime,
}

/// What to do with the Lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeaseDecision {
    /// There is none: create it, held by us.
    Create,
    /// We hold it: renew it.
    Renew,
    /// It is free or expired: take it over.
    Acquire,
    /// Another replica holds it: try again at this time (this replica's clock).
    WaitUntil(SystemTime),
}

/// The observation after reading `current` at `now`: `previous`'s time when the record is
/// unchanged, `now` when it is new; `None` when there is no Lease.
pub fn observe(
    previous: Option<&Observed>,
    current: Option<LeaseState>,
    now: SystemTime,
) -> Option<Observed> {
    let lease = current?;
    let at = match previous {
        Some(seen) if seen.lease == lease => seen.at,
        _ => now,
    };
    Some(Observed { lease, at })
}

/// Decide what `me` does at `now` with the Lease as last observed (see [`observe`]).
pub fn decide_lease(observed: Option<&Observed>, me: &str, now: SystemTime) -> LeaseDecision {
    let Some(Observed { lease, at }) = observed else {
        return LeaseDecision::Create;
    };
    match lease.holder.as_deref() {
        Some(holder) if holder == me => LeaseDecision::Renew,
        None | Some("") => LeaseDecision::Acquire,
        Some(_) => {
            let expiry = *at + lease.duration;
            if now >= expiry {
                LeaseDecision::Acquire
            } else {
                LeaseDecision::WaitUntil(expiry)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DURATION: Duration = Duration::from_secs(15);

    fn t(s: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(s)
    }

    fn held(holder: &str, renewed: SystemTime) -> LeaseState {
        LeaseState {
            holder: Some(holder.into()),
            renewed: Some(renewed),
            duration: DURATION,
        }
    }

    /// Observe `lease` at `now` after `previous`, then decide for `a`.
    fn step(
        previous: Option<Observed>,
        lease: LeaseState,
        now: SystemTime,
    ) -> (Option<Observed>, LeaseDecision) {
        let seen = observe(previous.as_ref(), Some(lease), now);
        let decision = decide_lease(seen.as_ref(), "a", now);
        (seen, decision)
    }

    #[test]
    fn every_case() {
        let seen = |lease, at| Some(Observed { lease, at });
        assert_eq!(decide_lease(None, "a", t(100)), LeaseDecision::Create);
        assert_eq!(
            decide_lease(seen(held("a", t(90)), t(90)).as_ref(), "a", t(100)),
            LeaseDecision::Renew
        );
        assert_eq!(
            decide_lease(seen(held("b", t(90)), t(90)).as_ref(), "a", t(100)),
            LeaseDecision::WaitUntil(t(105))
        );
        assert_eq!(
            decide_lease(seen(held("b", t(85)), t(85)).as_ref(), "a", t(100)),
            LeaseDecision::Acquire,
            "expired exactly now"
        );
        assert_eq!(
            decide_lease(seen(held("", t(99)), t(99)).as_ref(), "a", t(100)),
            LeaseDecision::Acquire,
            "released"
        );
        let never_renewed = LeaseState {
            renewed: None,
            ..held("b", t(0))
        };
        assert_eq!(
            decide_lease(seen(never_renewed.clone(), t(100)).as_ref(), "a", t(100)),
            LeaseDecision::WaitUntil(t(115)),
            "a holder without a renew time still gets a lease duration from when it was seen"
        );
        assert_eq!(
            decide_lease(seen(never_renewed, t(85)).as_ref(), "a", t(100)),
            LeaseDecision::Acquire
        );
    }

    #[test]
    fn an_observation_keeps_its_time_until_the_record_changes() {
        let first = observe(None, Some(held("b", t(50))), t(100));
        assert_eq!(first.as_ref().map(|o| o.at), Some(t(100)));
        let same = observe(first.as_ref(), Some(held("b", t(50))), t(110));
        assert_eq!(same.as_ref().map(|o| o.at), Some(t(100)), "same record");
        let renewed = observe(same.as_ref(), Some(held("b", t(52))), t(112));
        assert_eq!(renewed.as_ref().map(|o| o.at), Some(t(112)), "renewed");
        let taken = observe(renewed.as_ref(), Some(held("c", t(52))), t(113));
        assert_eq!(taken.as_ref().map(|o| o.at), Some(t(113)), "new holder");
        let longer = LeaseState {
            duration: Duration::from_secs(60),
            ..held("c", t(52))
        };
        let longer = observe(taken.as_ref(), Some(longer), t(114));
        assert_eq!(longer.as_ref().map(|o| o.at), Some(t(114)), "new duration");
        assert_eq!(observe(longer.as_ref(), None, t(115)), None, "deleted");
    }

    #[test]
    fn a_holder_whose_clock_is_an_hour_behind_is_not_taken_over_while_it_renews() {
        // The holder's clock reads an hour less than ours; it renews every 2 s.
        let behind = |s: u64| t(s - 3600);
        let mut seen = None;
        for now in (10_000..10_060).step_by(2) {
            let (next, decision) = step(seen, held("b", behind(now)), t(now));
            assert_eq!(
                decision,
                LeaseDecision::WaitUntil(t(now) + DURATION),
                "at {now}, its renewTime an hour old"
            );
            seen = next;
        }
        // It stops: its last record ages on our clock and expires a lease duration after
        // we first saw it, not before.
        let last = behind(10_058);
        let (seen, decision) = step(seen, held("b", last), t(10_072));
        assert_eq!(decision, LeaseDecision::WaitUntil(t(10_073)));
        let (_, decision) = step(seen, held("b", last), t(10_073));
        assert_eq!(decision, LeaseDecision::Acquire);
    }

    #[test]
    fn a_holder_whose_clock_is_an_hour_ahead_does_not_block_once_it_stops() {
        let ahead = |s: u64| t(s + 3600);
        let mut seen = None;
        for now in (10_000..10_010).step_by(2) {
            let (next, decision) = step(seen, held("b", ahead(now)), t(now));
            assert_eq!(decision, LeaseDecision::WaitUntil(t(now) + DURATION));
            seen = next;
        }
        // Its last renewal (written as 10_008 + 1 h) was seen at 10_008: it expires at
        // 10_023, not an hour later.
        let last = held("b", ahead(10_008));
        let (seen, decision) = step(seen, last.clone(), t(10_022));
        assert_eq!(decision, LeaseDecision::WaitUntil(t(10_023)));
        let (_, decision) = step(seen, last, t(10_023));
        assert_eq!(decision, LeaseDecision::Acquire);
    }

    #[test]
    fn a_standby_that_starts_late_gives_an_old_record_a_whole_duration() {
        // Written an hour ago, on any clock: this replica has not seen it age.
        let (seen, decision) = step(None, held("b", t(6_400)), t(10_000));
        assert_eq!(decision, LeaseDecision::WaitUntil(t(10_015)));
        let (_, decision) = step(seen, held("b", t(6_400)), t(10_015));
        assert_eq!(decision, LeaseDecision::Acquire);
    }
}
