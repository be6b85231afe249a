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

use std::time::{Duration, SystemTime};

/// The Lease as read from the API server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseState {
    /// `spec.holderIdentity`.
    pub holder: Option<String>,
    /// `spec.renewTime` (or `acquireTime` when never renewed).
    pub renewed: Option<SystemTime>,
    /// `spec.leaseDurationSeconds`.
    pub duration: Duration,
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
    /// Another replica holds it: try again at this time.
    WaitUntil(SystemTime),
}

/// Decide what `me` does with `lease` at `now`.
pub fn decide_lease(lease: Option<&LeaseState>, me: &str, now: SystemTime) -> LeaseDecision {
    let Some(lease) = lease else {
        return LeaseDecision::Create;
    };
    match lease.holder.as_deref() {
        Some(holder) if holder == me => LeaseDecision::Renew,
        None | Some("") => LeaseDecision::Acquire,
        Some(_) => match lease.renewed.map(|at| at + lease.duration) {
            Some(expiry) if expiry > now => LeaseDecision::WaitUntil(expiry),
            _ => LeaseDecision::Acquire,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_case() {
        let t = |s| SystemTime::UNIX_EPOCH + Duration::from_secs(s);
        let held = |holder: &str, renewed| LeaseState {
            holder: Some(holder.into()),
            renewed: Some(t(renewed)),
            duration: Duration::from_secs(15),
        };
        assert_eq!(decide_lease(None, "a", t(100)), LeaseDecision::Create);
        assert_eq!(
            decide_lease(Some(&held("a", 90)), "a", t(100)),
            LeaseDecision::Renew
        );
        assert_eq!(
            decide_lease(Some(&held("b", 90)), "a", t(100)),
            LeaseDecision::WaitUntil(t(105))
        );
        assert_eq!(
            decide_lease(Some(&held("b", 85)), "a", t(100)),
            LeaseDecision::Acquire,
            "expired exactly now"
        );
        assert_eq!(
            decide_lease(Some(&held("", 99)), "a", t(100)),
            LeaseDecision::Acquire,
            "released"
        );
        let never_renewed = LeaseState {
            renewed: None,
            ..held("b", 0)
        };
        assert_eq!(
            decide_lease(Some(&never_renewed), "a", t(100)),
            LeaseDecision::Acquire
        );
    }
}
