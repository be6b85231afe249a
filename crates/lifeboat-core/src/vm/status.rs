//! The status and the rest of the decision, from what the passes decided: the error shown,
//! the health (with an event when it changes), the next cycle, the conditions, the RPO
//! (rewritten alone only once it moved by a copy interval), whether anything changed, the
//! cycles missed and when to look again.

use std::time::{Duration, SystemTime};

use crate::conditions::{VmConditionFacts, set_verdicts, types};
use crate::health::{Health, HealthInputs, decide_health, next_health_change};
use crate::model::{JobKind, JobState, Phase};
use crate::retry::ErrorClass;
use crate::rpo::rpo;

use super::{DEFAULT_RPO_THRESHOLD, MAX_REQUEUE, MIN_REQUEUE, Pass, VmDecision, reasons};

impl Pass<'_> {
    fn replicating_since(&self) -> Option<SystemTime> {
        if self.state.phase != Phase::Protected {
            return None;
        }
        // NB: derived, not stored: delta replication (re)starts when the first point is cut
        // (InitialReplicationComplete turns True) and after every resync.
        let initial = self
            .state
            .conditions
            .iter()
            .find(|c| c.type_ == types::INITIAL_REPLICATION_COMPLETE)
            .filter(|c| c.status == crate::ConditionStatus::True)
            .map(|c| c.last_transition_time);
        initial.max(self.state.last_resync).or(Some(self.now))
    }

    pub(super) fn conclude(mut self) -> VmDecision {
        let input = self.input;
        let now = self.now;
        let policy = input.policy;
        let rpo_threshold = policy.map_or(DEFAULT_RPO_THRESHOLD, |p| p.rpo_threshold);
        let agent = input.agent;
        let phase = self.state.phase;

        let resync_required = self.resync_required();
        let record = self.state.job.clone();
        let active = record.as_ref().filter(|j| !j.state.is_finished());
        let resync_blocked = record.as_ref().is_some_and(|j| {
            j.kind == JobKind::Resynchronize
                && j.state == JobState::Failed
                && j.error
                    .as_ref()
                    .is_some_and(|e| e.class == ErrorClass::NonRecoverable)
        });
        let resync_can_run = active.is_some_and(|j| j.kind == JobKind::Resynchronize)
            || self.ask_resync().is_some()
            || (!resync_blocked
                && policy.is_some_and(|p| {
                    p.resync_automatic && p.resync_window.as_ref().is_none_or(|w| w.contains(now))
                }));
        let job_error = record.as_ref().and_then(|j| j.error.clone());
        let cycle_error = agent
            .and_then(|a| a.last_error.clone())
            .filter(|_| phase == Phase::Protected);
        self.state.last_error = job_error.clone().or_else(|| cycle_error.clone());
        // NB: a job keeping the original disks in step that failed for good leaves the VM
        // replicating, and is tried again later: a warning, not a critical health.
        let in_step = record
            .as_ref()
            .is_some_and(|j| super::keeps_in_step(j.kind, &j.params));
        let job_class = job_error.as_ref().map(|e| {
            if in_step {
                ErrorClass::Recoverable
            } else {
                e.class
            }
        });
        let worst_class = [job_class, cycle_error.as_ref().map(|e| e.class)]
            .into_iter()
            .flatten()
            .max_by_key(|c| matches!(c, ErrorClass::NonRecoverable));

        // A sign of life: the Lease or a report; before either, the clock starts at creation.
        let heartbeat = phase.needs_agent().then(|| {
            input
                .heartbeat
                .max(agent.and_then(|a| a.report_time))
                .unwrap_or(input.spec.created)
        });
        let replicating_since = self.replicating_since();
        let cycles_due = replicating_since.map_or(0, |since| {
            let window = now
                .duration_since(since)
                .unwrap_or_default()
                .min(Duration::from_secs(3600));
            u32::try_from(window.as_secs() / self.interval.as_secs().max(1)).unwrap_or(u32::MAX)
        });
        let succeeded = agent.map_or(0, |a| a.cycles_succeeded_last_hour);
        let health_inputs = HealthInputs {
            now,
            copy_interval: self.interval,
            rpo_threshold,
            replicating_since,
            last_successful_cycle: agent.and_then(|a| a.last_successful_cycle),
            latest_point: agent.and_then(|a| a.latest_point),
            cycles_due_last_hour: cycles_due,
            cycles_missed_last_hour: cycles_due.saturating_sub(succeeded),
            last_error: worst_class,
            resync_required: resync_required.is_some(),
            resync_can_run,
            agent_heartbeat: heartbeat,
        };
        let health = decide_health(&health_inputs);
        if self.state.health.is_some_and(|h| h != health.health)
            || (self.state.health.is_none() && health.health != Health::Normal)
        {
            let (warning, reason) = match health.health {
                Health::Normal => (false, reasons::HEALTH_NORMAL),
                Health::Warning => (true, reasons::HEALTH_WARNING),
                Health::Critical => (true, reasons::HEALTH_CRITICAL),
            };
            self.notice(
                warning,
                reason,
                format!("{}: {}", health.reason, health.message),
            );
        }
        // NB: a message that only counts minutes (silent for 3m, 4m, ...) is not news: it is
        // rewritten when the health or its reason changes, so that a quiet VM costs no writes.
        if self.state.health != Some(health.health) || self.state.health_reason != health.reason {
            self.state.health_message = health.message.clone();
        }
        self.state.health = Some(health.health);
        self.state.health_reason = health.reason.to_owned();

        self.state.next_cycle = (phase == Phase::Protected)
            .then(|| {
                cycle_error
                    .as_ref()
                    .and_then(|e| e.next_retry_time)
                    .or_else(|| {
                        agent
                            .and_then(|a| a.last_cycle_start.or(a.last_successful_cycle))
                            .map(|t| t + self.interval)
                    })
            })
            .flatten();
        self.state.policy_generation = policy.and_then(|p| p.generation);
        self.state.observed_generation = Some(input.spec.generation);

        let agent_silent =
            matches!(health.reason, "AgentQuiet" | "AgentLost").then_some(health.reason);
        let waiting = self.waiting.as_ref().map(|(r, m)| (*r, m.as_str()));
        let facts = VmConditionFacts {
            phase,
            waiting,
            current_job: record.as_ref().map(|j| (j.kind, j.state)),
            failback_presync: record.as_ref().is_some_and(|j| j.params.presync),
            job_error: job_error.as_ref(),
            cycle_error: cycle_error.as_ref(),
            agent_error: agent.and_then(|a| a.last_error.as_ref()),
            agent_silent,
            resync_required,
            resync_reason: active
                .filter(|j| j.kind == JobKind::Resynchronize)
                .and_then(|j| j.params.resync_reason),
            test_failover_exists: self.state.test_failover_exists,
            test_failover_outcome: self.test_failover_outcome.clone(),
            failover_outcome: self.failover_outcome.clone(),
            health: health.health,
            health_reason: health.reason,
            // NB: the stored message, which is rewritten only when the health or its reason
            // changes: a Ready message that counted minutes would cost a write every pass.
            health_message: &self.state.health_message,
        };
        let verdicts = crate::conditions::vm_verdicts(&facts, &self.state.conditions);
        set_verdicts(
            &mut self.state.conditions,
            verdicts,
            Some(input.spec.generation),
            now,
        );

        // RPO: rewritten with everything else, or alone once it moved by a copy interval, so
        // that a VM costs at most one status write per cycle.
        let fresh_rpo = rpo(agent.and_then(|a| a.latest_point), now);
        let previous_rpo = input.state.rpo;
        self.state.rpo = previous_rpo;
        let rest_changed = self.state != *input.state;
        let rpo_moved = match (previous_rpo, fresh_rpo) {
            (Some(a), Some(b)) => a.abs_diff(b) >= self.interval,
            (a, b) => a != b,
        };
        if rest_changed || rpo_moved {
            self.state.rpo = fresh_rpo;
        }
        let changed = self.state != *input.state;

        // When to look again.
        if let Some(next) = next_health_change(&health_inputs) {
            self.wake.push(next);
        }
        if let Some(next_cycle) = self.state.next_cycle {
            // A report is due one interval after the last; look half an interval later.
            self.wake.push(next_cycle.max(now) + self.interval / 2);
        }
        if let Some(error) = &cycle_error
            && let Some(at) = error.next_retry_time
        {
            self.wake.push(at + self.interval / 2);
        }
        let requeue_after = self
            .wake
            .iter()
            .filter_map(|t| t.duration_since(now).ok())
            .min()
            .unwrap_or(MAX_REQUEUE)
            .clamp(MIN_REQUEUE, MAX_REQUEUE);

        VmDecision {
            state: self.state,
            changed,
            create_job: self.create,
            delete_job: self.delete,
            fail_job: self.fail,
            notices: self.notices,
            finished_job: self.finished,
            results: self.results,
            release_finalizer: self.release,
            requeue_after,
            cycles_missed_last_hour: health_inputs.cycles_missed_last_hour,
        }
    }
}
