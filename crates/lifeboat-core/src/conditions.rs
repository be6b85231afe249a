//! Conditions, set in one place: a condition's `lastTransitionTime` moves only when its status
//! really changes, so that `kubectl describe` and alerting see real transitions and not every
//! reconcile. Reasons are stable CamelCase words.

use std::time::SystemTime;

/// True, False or Unknown.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ConditionStatus {
    /// The condition holds.
    True,
    /// It does not.
    False,
    /// Not known (the agent has not reported).
    Unknown,
}

/// A condition as the core decides it; the operator turns it into a Kubernetes `Condition`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObservedCondition {
    /// `Protected`, `Replicating`, `ResyncRequired`, ...
    pub type_: String,
    /// True, False or Unknown.
    pub status: ConditionStatus,
    /// A stable CamelCase reason.
    pub reason: String,
    /// For people.
    pub message: String,
    /// When the status last changed.
    pub last_transition_time: SystemTime,
    /// The generation the condition was decided for.
    pub observed_generation: Option<i64>,
}

/// Set (or add) the condition `type_` in `conditions`, keeping its `lastTransitionTime` unless
/// its status changes. Returns whether anything changed, so that callers skip no-op writes.
pub fn set_condition(
    conditions: &mut Vec<ObservedCondition>,
    type_: &str,
    status: ConditionStatus,
    reason: &str,
    message: &str,
    observed_generation: Option<i64>,
    now: SystemTime,
) -> bool {
    let fresh = ObservedCondition {
        type_: type_.to_owned(),
        status,
        reason: reason.to_owned(),
        message: message.to_owned(),
        last_transition_time: now,
        observed_generation,
    };
    match conditions.iter_mut().find(|c| c.type_ == type_) {
        None => {
            conditions.push(fresh);
            true
        }
        Some(existing) => {
            let transition = if existing.status == status {
                existing.last_transition_time
            } else {
                now
            };
            let updated = ObservedCondition {
                last_transition_time: transition,
                ..fresh
            };
            let changed = *existing != updated;
            *existing = updated;
            changed
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn transition_time_moves_only_on_a_status_change() {
        let t = |s| SystemTime::UNIX_EPOCH + Duration::from_secs(s);
        let mut c = Vec::new();
        assert!(set_condition(
            &mut c,
            "Replicating",
            ConditionStatus::True,
            "CycleSucceeded",
            "ok",
            Some(1),
            t(10)
        ));
        assert!(
            !set_condition(
                &mut c,
                "Replicating",
                ConditionStatus::True,
                "CycleSucceeded",
                "ok",
                Some(1),
                t(20)
            ),
            "nothing changed"
        );
        assert_eq!(c[0].last_transition_time, t(10));
        assert!(set_condition(
            &mut c,
            "Replicating",
            ConditionStatus::True,
            "CycleSucceeded",
            "2 disks",
            Some(2),
            t(30)
        ));
        assert_eq!(
            c[0].last_transition_time,
            t(10),
            "a new message is not a transition"
        );
        assert!(set_condition(
            &mut c,
            "Replicating",
            ConditionStatus::False,
            "StoreUnreachable",
            "down",
            Some(2),
            t(40)
        ));
        assert_eq!(c[0].last_transition_time, t(40));
        assert!(set_condition(
            &mut c,
            "ResyncRequired",
            ConditionStatus::False,
            "TrackingIntact",
            "",
            Some(2),
            t(40)
        ));
        assert_eq!(c.len(), 2);
    }
}
