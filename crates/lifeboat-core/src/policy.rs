//! The ReplicationPolicy decision: which fields the CRD schema could not check are unusable
//! (a time zone it does not know, token credentials over plain HTTP), whether the target
//! answers, how many VMs use the policy, and whether it may be deleted.
//!
//! ```text
//!  spec ──check──> settings for the VMs (or the field that is wrong)
//!  + probe result, VMs using it, deleting? ──> Ready, DeletionBlocked, protectedVMs, finalizer
//! ```

use std::time::{Duration, SystemTime};

use crate::conditions::{ObservedCondition, PolicyConditionFacts, set_verdicts};
use crate::model::PolicySettings;
use crate::window::{DailyWindow, WindowSpec};

/// How often to probe a remote target again.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(5 * 60);
/// How often to look again while deletion waits for VMs.
pub const DELETION_RECHECK: Duration = Duration::from_secs(30);

/// The policy's spec, as the decisions need it.
#[derive(Clone, Debug, PartialEq)]
pub struct PolicySpec {
    /// `metadata.generation`.
    pub generation: Option<i64>,
    /// The copy interval.
    pub copy_interval: Duration,
    /// The RPO threshold.
    pub rpo_threshold: Duration,
    /// Automatic resync.
    pub resync_automatic: bool,
    /// The resync window.
    pub resync_window: Option<WindowSpec>,
    /// The resync log threshold, percent.
    pub log_threshold_percent: u32,
    /// The initial replication start time.
    pub initial_replication_start: Option<SystemTime>,
    /// The bandwidth work hours.
    pub work_hours: Option<WindowSpec>,
    /// The Azure account URL, for an Azure target.
    pub account_url: Option<String>,
    /// Whether the Azure credentials are tokens (workload or managed identity).
    pub token_credentials: bool,
    /// A local target not marked shared, on a cluster: its replica would die with the node.
    pub unshared_local_in_cluster: bool,
}

/// A field the schema let through that cannot be used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldProblem {
    /// A stable CamelCase condition reason naming the field.
    pub reason: &'static str,
    /// The message, starting with the field's path.
    pub message: String,
}

/// Check what the CRD schema cannot, and turn the spec into the settings VMs decide with.
/// Settings are returned even for an invalid policy (with `blocking_problem` set), so that
/// VMs already protected keep their health rules.
pub fn check_policy(spec: &PolicySpec) -> (PolicySettings, Option<FieldProblem>) {
    let mut problem = None;
    let mut window = |w: Option<&WindowSpec>, field: &str, reason: &'static str| {
        w.and_then(|w| match DailyWindow::parse(w) {
            Ok(parsed) => Some(parsed),
            Err(e) => {
                problem.get_or_insert(FieldProblem {
                    reason,
                    message: format!("{field}: {e}"),
                });
                None
            }
        })
    };
    let resync_window = window(
        spec.resync_window.as_ref(),
        "spec.resync.window",
        "InvalidResyncWindow",
    );
    window(
        spec.work_hours.as_ref(),
        "spec.bandwidth.workHours",
        "InvalidWorkHours",
    );
    if spec.token_credentials
        && spec
            .account_url
            .as_deref()
            .is_some_and(|u| u.starts_with("http://"))
    {
        problem.get_or_insert(FieldProblem {
            reason: "InsecureAccountUrl",
            message: "spec.target.azureBlob.accountUrl: token credentials (workload identity) \
                      are only sent over https"
                .into(),
        });
    }
    if spec.unshared_local_in_cluster {
        problem.get_or_insert(FieldProblem {
            reason: "LocalTargetNotShared",
            message: "spec.target.local: on a cluster the replica must survive the VM's node: \
                      use a share every node mounts at the same path (NFS, CephFS) and mark it \
                      shared: true, or replicate to azureBlob"
                .into(),
        });
    }
    let settings = PolicySettings {
        generation: spec.generation,
        copy_interval: spec.copy_interval,
        rpo_threshold: spec.rpo_threshold,
        resync_automatic: spec.resync_automatic,
        resync_window,
        log_threshold_percent: spec.log_threshold_percent,
        initial_replication_start: spec.initial_replication_start,
        blocking_problem: problem.as_ref().map(|p| p.message.clone()),
    };
    (settings, problem)
}

/// The operator's decisions about a policy, as its status holds them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PolicyState {
    /// The generation decided for.
    pub observed_generation: Option<i64>,
    /// Ready and DeletionBlocked.
    pub conditions: Vec<ObservedCondition>,
    /// How many VMs use the policy.
    pub protected_vms: u32,
}

/// What a policy's decision is made from.
#[derive(Clone, Debug)]
pub struct PolicyInput<'a> {
    /// The time of the decision.
    pub now: SystemTime,
    /// The spec.
    pub spec: &'a PolicySpec,
    /// Whether the policy is being deleted.
    pub deleting: bool,
    /// The last decisions.
    pub state: &'a PolicyState,
    /// The target's probe: `None` for a local target, `Err` with why it does not answer.
    pub reachable: Option<Result<(), String>>,
    /// The names of the VMs using the policy, sorted.
    pub users: &'a [String],
}

/// The decision.
#[derive(Clone, Debug, PartialEq)]
pub struct PolicyDecision {
    /// The new status.
    pub state: PolicyState,
    /// Whether it differs from the input's.
    pub changed: bool,
    /// The finalizer may go: deleting, and no VM uses the policy.
    pub release_finalizer: bool,
    /// Deletion just became blocked: say so in an event.
    pub deletion_blocked: bool,
    /// When to look again.
    pub requeue_after: Duration,
}

/// Decide a policy's status.
pub fn decide_policy(input: &PolicyInput<'_>) -> PolicyDecision {
    let (_, problem) = check_policy(input.spec);
    let mut state = input.state.clone();
    let facts = PolicyConditionFacts {
        invalid: problem.as_ref().map(|p| (p.reason, p.message.as_str())),
        reachable: input
            .reachable
            .as_ref()
            .map(|r| r.as_ref().map(|_| ()).map_err(String::as_str)),
        deleting: input.deleting,
        users: input.users,
    };
    let verdicts = crate::conditions::policy_verdicts(&facts);
    let blocked_now = verdicts[1].1.status == crate::ConditionStatus::True;
    let was_blocked = state.conditions.iter().any(|c| {
        c.type_ == crate::conditions::types::DELETION_BLOCKED
            && c.status == crate::ConditionStatus::True
    });
    set_verdicts(
        &mut state.conditions,
        verdicts,
        input.spec.generation,
        input.now,
    );
    state.observed_generation = input.spec.generation;
    state.protected_vms = u32::try_from(input.users.len()).unwrap_or(u32::MAX);
    let requeue_after = if blocked_now {
        DELETION_RECHECK
    } else if input.reachable.is_some() {
        PROBE_INTERVAL
    } else {
        crate::vm::MAX_REQUEUE
    };
    PolicyDecision {
        changed: state != *input.state,
        release_finalizer: input.deleting && input.users.is_empty(),
        deletion_blocked: blocked_now && !was_blocked,
        state,
        requeue_after,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ConditionStatus;

    fn spec() -> PolicySpec {
        PolicySpec {
            generation: Some(1),
            copy_interval: Duration::from_secs(300),
            rpo_threshold: Duration::from_secs(1800),
            resync_automatic: true,
            resync_window: None,
            log_threshold_percent: 50,
            initial_replication_start: None,
            work_hours: None,
            account_url: None,
            token_credentials: false,
            unshared_local_in_cluster: false,
        }
    }

    fn ready(d: &PolicyDecision) -> (ConditionStatus, String) {
        let c = d.state.conditions.iter().find(|c| c.type_ == "Ready");
        c.map(|c| (c.status, c.reason.clone()))
            .unwrap_or((ConditionStatus::Unknown, String::new()))
    }

    fn decide(spec: &PolicySpec, deleting: bool, users: &[String]) -> PolicyDecision {
        decide_policy(&PolicyInput {
            now: SystemTime::UNIX_EPOCH,
            spec,
            deleting,
            state: &PolicyState::default(),
            reachable: None,
            users,
        })
    }

    #[test]
    fn a_bad_field_is_named_in_the_ready_condition() {
        let bad_zone = PolicySpec {
            resync_window: Some(WindowSpec {
                start: "22:00".into(),
                end: "06:00".into(),
                days: vec![],
                time_zone: Some("Europe/Atlantis".into()),
            }),
            ..spec()
        };
        let d = decide(&bad_zone, false, &[]);
        assert_eq!(
            ready(&d),
            (ConditionStatus::False, "InvalidResyncWindow".into())
        );
        let (settings, problem) = check_policy(&bad_zone);
        assert!(settings.blocking_problem.is_some());
        assert!(problem.is_some_and(|p| {
            p.message
                .starts_with("spec.resync.window: unknown time zone")
        }));
        let insecure = PolicySpec {
            account_url: Some("http://blob.example".into()),
            token_credentials: true,
            ..spec()
        };
        assert_eq!(
            ready(&decide(&insecure, false, &[])),
            (ConditionStatus::False, "InsecureAccountUrl".into())
        );
        let node_local = PolicySpec {
            unshared_local_in_cluster: true,
            ..spec()
        };
        let (settings, problem) = check_policy(&node_local);
        assert!(settings.blocking_problem.is_some(), "new protection waits");
        assert!(problem.is_some_and(|p| p.reason == "LocalTargetNotShared"
            && p.message.starts_with("spec.target.local:")
            && p.message.contains("shared: true")));
        assert_eq!(
            ready(&decide(&spec(), false, &[])),
            (ConditionStatus::True, "Ready".into())
        );
    }

    #[test]
    fn an_unreachable_target_is_not_ready_but_does_not_block() {
        let s = spec();
        let d = decide_policy(&PolicyInput {
            now: SystemTime::UNIX_EPOCH,
            spec: &s,
            deleting: false,
            state: &PolicyState::default(),
            reachable: Some(Err("connect refused".into())),
            users: &[],
        });
        assert_eq!(
            ready(&d),
            (ConditionStatus::False, "TargetUnreachable".into())
        );
        assert!(check_policy(&s).0.blocking_problem.is_none());
        assert_eq!(d.requeue_after, PROBE_INTERVAL);
    }

    #[test]
    fn deletion_waits_for_the_vms_that_use_it() {
        let users = vec!["web".to_owned()];
        let blocked = decide(&spec(), true, &users);
        assert!(!blocked.release_finalizer && blocked.deletion_blocked);
        assert_eq!(blocked.state.protected_vms, 1);
        // Deciding again from the blocked state: no new event, no change.
        let again = decide_policy(&PolicyInput {
            now: SystemTime::UNIX_EPOCH + Duration::from_secs(30),
            spec: &spec(),
            deleting: true,
            state: &blocked.state,
            reachable: None,
            users: &users,
        });
        assert!(!again.deletion_blocked && !again.changed);
        let free = decide(&spec(), true, &[]);
        assert!(free.release_finalizer);
    }
}
