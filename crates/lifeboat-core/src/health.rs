//! Health of a protected VM, by the rules ASR applies:
//!
//! | health   | when (first match wins)                                                  | reason |
//! |----------|--------------------------------------------------------------------------|--------|
//! | Critical | the last error is non-recoverable                                        | `NonRecoverableError` |
//! | Critical | a resync is required and cannot run                                      | `ResyncBlocked` |
//! | Critical | the node's agent has been silent for 6 copy intervals (at least 15 min)  | `AgentLost` |
//! | Warning  | the agent has been silent for 2 copy intervals (at least 2 minutes)      | `AgentQuiet` |
//! | Warning  | no successful cycle for over an hour                                     | `NoRecentCycle` |
//! | Warning  | the RPO exceeds the policy's threshold                                   | `RpoOverThreshold` |
//! | Warning  | more than 20 % of the cycles of the last hour were missed                | `CyclesMissed` |
//! | Normal   | otherwise                                                                | `Healthy` |
//!
//! The cycle rules apply only once delta replication has started (`replicating_since`), so a
//! VM in initial replication is not Warning for lacking cycles it was never due to run.

use std::time::{Duration, SystemTime};

use crate::retry::ErrorClass;
use crate::rpo::{format_duration, rpo};

/// Normal, Warning or Critical.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Health {
    /// Replicating within the policy's targets.
    Normal,
    /// Replicating, but behind or at risk.
    Warning,
    /// Not replicating until someone acts.
    Critical,
}

/// Silence of the agent that makes a VM Warning: two copy intervals, at least this.
const AGENT_QUIET_MIN: Duration = Duration::from_secs(2 * 60);
/// Silence of the agent that makes a VM Critical: six copy intervals, at least this.
const AGENT_LOST_MIN: Duration = Duration::from_secs(15 * 60);
/// "No successful cycle for over an hour."
const NO_CYCLE_WARNING_AFTER: Duration = Duration::from_secs(3600);
/// "More than 20 % of the cycles in the last hour were missed."
const MISSED_CYCLES_WARNING_PERCENT: u64 = 20;

/// What health is decided from.
#[derive(Clone, Debug, PartialEq)]
pub struct HealthInputs {
    /// The time of the decision.
    pub now: SystemTime,
    /// The policy's copy interval.
    pub copy_interval: Duration,
    /// The policy's RPO threshold.
    pub rpo_threshold: Duration,
    /// When delta replication started (after finalize protection), if it has.
    pub replicating_since: Option<SystemTime>,
    /// When the last cycle succeeded.
    pub last_successful_cycle: Option<SystemTime>,
    /// The time the latest durable recovery point captures.
    pub latest_point: Option<SystemTime>,
    /// Cycles due in the last hour.
    pub cycles_due_last_hour: u32,
    /// Of those, how many were missed (failed or never ran).
    pub cycles_missed_last_hour: u32,
    /// The class of the last error, while it stands.
    pub last_error: Option<ErrorClass>,
    /// Whether a resync is required.
    pub resync_required: bool,
    /// Whether that resync can run (manual mode without a request, or outside the window,
    /// cannot).
    pub resync_can_run: bool,
    /// The agent's last heartbeat.
    pub agent_heartbeat: Option<SystemTime>,
}

/// Health, with a stable reason and a message for people.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthDecision {
    /// Normal, Warning or Critical.
    pub health: Health,
    /// A stable CamelCase reason.
    pub reason: &'static str,
    /// What it means, for a human.
    pub message: String,
}

/// How long the agent may be silent before a VM turns Warning (`AgentQuiet`).
pub fn agent_quiet_after(copy_interval: Duration) -> Duration {
    (copy_interval * 2).max(AGENT_QUIET_MIN)
}

/// How long the agent may be silent before a VM turns Critical (`AgentLost`).
pub fn agent_lost_after(copy_interval: Duration) -> Duration {
    (copy_interval * 6).max(AGENT_LOST_MIN)
}

/// The earliest time after `inputs.now` at which a rule that depends on time alone (agent
/// silence, no recent cycle, RPO over threshold) may change the decision, if nothing else
/// happens meanwhile: the operator looks again then, instead of polling.
pub fn next_health_change(inputs: &HealthInputs) -> Option<SystemTime> {
    let now = inputs.now;
    let mut times = Vec::with_capacity(4);
    if let Some(heartbeat) = inputs.agent_heartbeat {
        times.push(heartbeat + agent_quiet_after(inputs.copy_interval));
        times.push(heartbeat + agent_lost_after(inputs.copy_interval));
    }
    if let Some(since) = inputs.replicating_since {
        let last = inputs.last_successful_cycle.unwrap_or(since).max(since);
        // NB: the rules say "over", so the decision changes just after the threshold.
        times.push(last + NO_CYCLE_WARNING_AFTER + Duration::from_secs(1));
        if let Some(point) = inputs.latest_point {
            times.push(point + inputs.rpo_threshold + Duration::from_secs(1));
        }
    }
    times.into_iter().filter(|t| *t > now).min()
}

fn age(since: SystemTime, now: SystemTime) -> Duration {
    now.duration_since(since).unwrap_or_default()
}

/// Decide a VM's health.
pub fn decide_health(inputs: &HealthInputs) -> HealthDecision {
    let decision = |health, reason, message: String| HealthDecision {
        health,
        reason,
        message,
    };
    let now = inputs.now;
    if inputs.last_error == Some(ErrorClass::NonRecoverable) {
        return decision(
            Health::Critical,
            "NonRecoverableError",
            "replication stopped on an error that needs an administrator".into(),
        );
    }
    if inputs.resync_required && !inputs.resync_can_run {
        return decision(
            Health::Critical,
            "ResyncBlocked",
            "a resynchronization is required and cannot run yet".into(),
        );
    }
    if let Some(heartbeat) = inputs.agent_heartbeat {
        let silent = age(heartbeat, now);
        if silent >= agent_lost_after(inputs.copy_interval) {
            return decision(
                Health::Critical,
                "AgentLost",
                format!(
                    "the node's agent has been silent for {}",
                    format_duration(silent)
                ),
            );
        }
        if silent >= agent_quiet_after(inputs.copy_interval) {
            return decision(
                Health::Warning,
                "AgentQuiet",
                format!(
                    "the node's agent has been silent for {}",
                    format_duration(silent)
                ),
            );
        }
    }
    if let Some(since) = inputs.replicating_since {
        let last = inputs.last_successful_cycle.unwrap_or(since).max(since);
        if age(last, now) > NO_CYCLE_WARNING_AFTER {
            return decision(
                Health::Warning,
                "NoRecentCycle",
                format!(
                    "no successful cycle for {}",
                    format_duration(age(last, now))
                ),
            );
        }
        if let Some(rpo) = rpo(inputs.latest_point, now).filter(|rpo| *rpo > inputs.rpo_threshold) {
            return decision(
                Health::Warning,
                "RpoOverThreshold",
                format!(
                    "RPO {} exceeds the policy's {}",
                    format_duration(rpo),
                    format_duration(inputs.rpo_threshold)
                ),
            );
        }
        let (due, missed) = (
            u64::from(inputs.cycles_due_last_hour),
            u64::from(inputs.cycles_missed_last_hour),
        );
        if due > 0 && missed * 100 > due * MISSED_CYCLES_WARNING_PERCENT {
            return decision(
                Health::Warning,
                "CyclesMissed",
                format!("{missed} of the last hour's {due} cycles were missed"),
            );
        }
    }
    decision(
        Health::Normal,
        "Healthy",
        "replicating within the policy's targets".into(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: SystemTime = SystemTime::UNIX_EPOCH;
    fn at(secs: u64) -> SystemTime {
        T0 + Duration::from_secs(secs)
    }

    /// A VM replicating every 5 minutes for two hours, healthy at 7200 s.
    fn healthy() -> HealthInputs {
        HealthInputs {
            now: at(7200),
            copy_interval: Duration::from_secs(300),
            rpo_threshold: Duration::from_secs(1800),
            replicating_since: Some(at(0)),
            last_successful_cycle: Some(at(7100)),
            latest_point: Some(at(7100)),
            cycles_due_last_hour: 12,
            cycles_missed_last_hour: 0,
            last_error: None,
            resync_required: false,
            resync_can_run: true,
            agent_heartbeat: Some(at(7190)),
        }
    }

    fn reason(inputs: HealthInputs) -> (Health, &'static str) {
        let d = decide_health(&inputs);
        (d.health, d.reason)
    }

    #[test]
    fn each_rule_in_order() {
        assert_eq!(reason(healthy()), (Health::Normal, "Healthy"));
        assert_eq!(
            reason(HealthInputs {
                last_error: Some(ErrorClass::NonRecoverable),
                ..healthy()
            }),
            (Health::Critical, "NonRecoverableError")
        );
        assert_eq!(
            reason(HealthInputs {
                last_error: Some(ErrorClass::Recoverable),
                ..healthy()
            }),
            (Health::Normal, "Healthy")
        );
        assert_eq!(
            reason(HealthInputs {
                resync_required: true,
                resync_can_run: false,
                ..healthy()
            }),
            (Health::Critical, "ResyncBlocked")
        );
        assert_eq!(
            reason(HealthInputs {
                resync_required: true,
                ..healthy()
            }),
            (Health::Normal, "Healthy")
        );
        // 5-minute interval: quiet after 10 minutes of silence, lost after 30.
        let silent = |secs: u64| HealthInputs {
            agent_heartbeat: Some(at(7200 - secs)),
            ..healthy()
        };
        assert_eq!(reason(silent(1800)), (Health::Critical, "AgentLost"));
        assert_eq!(reason(silent(1799)), (Health::Warning, "AgentQuiet"));
        assert_eq!(reason(silent(600)), (Health::Warning, "AgentQuiet"));
        assert_eq!(reason(silent(599)).1, "Healthy");
        // 30-second interval: the floors apply (2 and 15 minutes).
        let fast = |secs: u64| HealthInputs {
            copy_interval: Duration::from_secs(30),
            ..silent(secs)
        };
        assert_eq!(reason(fast(119)).1, "Healthy");
        assert_eq!(reason(fast(120)).1, "AgentQuiet");
        assert_eq!(reason(fast(900)).1, "AgentLost");
        assert_eq!(
            reason(HealthInputs {
                last_successful_cycle: Some(at(7200 - 3601)),
                latest_point: Some(at(7200 - 3601)),
                ..healthy()
            }),
            (Health::Warning, "NoRecentCycle")
        );
        assert_eq!(
            reason(HealthInputs {
                latest_point: Some(at(7200 - 1801)),
                ..healthy()
            }),
            (Health::Warning, "RpoOverThreshold")
        );
        assert_eq!(
            reason(HealthInputs {
                latest_point: Some(at(7200 - 1800)),
                ..healthy()
            })
            .1,
            "Healthy"
        );
    }

    #[test]
    fn missed_cycles_warn_above_twenty_percent() {
        assert_eq!(
            reason(HealthInputs {
                cycles_missed_last_hour: 2,
                ..healthy()
            })
            .1,
            "Healthy"
        );
        assert_eq!(
            reason(HealthInputs {
                cycles_missed_last_hour: 3,
                ..healthy()
            }),
            (Health::Warning, "CyclesMissed")
        );
        // 1 of 5 is exactly 20 %: not more than 20 %.
        assert_eq!(
            reason(HealthInputs {
                cycles_due_last_hour: 5,
                cycles_missed_last_hour: 1,
                ..healthy()
            })
            .1,
            "Healthy"
        );
        assert_eq!(
            reason(HealthInputs {
                cycles_due_last_hour: 0,
                cycles_missed_last_hour: 0,
                ..healthy()
            })
            .1,
            "Healthy"
        );
    }

    #[test]
    fn the_next_change_is_the_first_threshold_ahead() {
        // Heartbeat at 7190: quiet at 7790, lost at 8990; last cycle and point at 7100: no
        // recent cycle after 10701, RPO over 30 minutes after 8901.
        assert_eq!(next_health_change(&healthy()), Some(at(7790)));
        let silent = HealthInputs {
            agent_heartbeat: Some(at(6000)),
            ..healthy()
        };
        assert_eq!(next_health_change(&silent), Some(at(7800)), "lost next");
        let no_agent = HealthInputs {
            agent_heartbeat: None,
            ..healthy()
        };
        assert_eq!(next_health_change(&no_agent), Some(at(8901)));
        // Every time-driven rule flips at its time and not before.
        for inputs in [healthy(), silent, no_agent] {
            if let Some(change) = next_health_change(&inputs) {
                let before = decide_health(&HealthInputs {
                    now: change - Duration::from_secs(1),
                    ..inputs.clone()
                });
                let after = decide_health(&HealthInputs {
                    now: change,
                    ..inputs.clone()
                });
                assert_eq!(before.reason, decide_health(&inputs).reason);
                assert_ne!(before.reason, after.reason, "{change:?}");
            }
        }
    }

    #[test]
    fn a_vm_in_initial_replication_is_not_blamed_for_cycles() {
        let copying = HealthInputs {
            replicating_since: None,
            last_successful_cycle: None,
            latest_point: None,
            cycles_due_last_hour: 0,
            ..healthy()
        };
        assert_eq!(reason(copying), (Health::Normal, "Healthy"));
        // Just started replicating, no cycle yet: the hour counts from the start.
        let started = HealthInputs {
            replicating_since: Some(at(7000)),
            last_successful_cycle: None,
            latest_point: Some(at(7000)),
            ..healthy()
        };
        assert_eq!(reason(started).1, "Healthy");
    }
}
