//! Protection not wanted (disabled, or the VM deleted): wait for a running job, withdraw an
//! unclaimed one, run (and retry) the DisableProtection job, and release the finalizer once
//! a deleted VM is disabled.

use std::time::Duration;

use crate::model::{JobKind, JobParams, JobState, Phase};

use super::Pass;

/// How often to look again while disabling waits for a running job.
const DISABLE_RECHECK: Duration = Duration::from_secs(30);

impl Pass<'_> {
    pub(super) fn disable(&mut self) {
        self.state.original_in_step = None;
        let record = self.state.job.clone();
        if let Some(record) = record.filter(|j| !j.state.is_finished()) {
            if record.kind == JobKind::DisableProtection {
                return;
            }
            if record.state != JobState::Pending {
                self.waiting = Some((
                    "WaitingForJob",
                    format!(
                        "disabling waits for {} job {} to end",
                        record.kind.as_str(),
                        record.name
                    ),
                ));
                self.wake.push(self.now + DISABLE_RECHECK);
                return;
            }
            // NB: an unclaimed job did nothing yet: withdraw it instead of waiting for it.
            let nothing_on_node = record.kind == JobKind::EnableProtection && record.attempt == 1;
            self.withdraw(record, false, "protection is being disabled");
            if nothing_on_node {
                self.state.phase = Phase::Disabled;
            }
        }
        match self.state.phase {
            Phase::Pending | Phase::Disabled => self.state.phase = Phase::Disabled,
            _ => {
                let disable_failed = self.state.job.as_ref().is_some_and(|j| {
                    j.kind == JobKind::DisableProtection && j.state == JobState::Failed
                });
                if !disable_failed || self.retry_failed().is_none() {
                    self.start_job(
                        JobKind::DisableProtection,
                        JobParams {
                            delete_replica: self.input.spec.delete_replica,
                            ..JobParams::default()
                        },
                        1,
                    );
                }
            }
        }
        if self.state.phase == Phase::Disabled && self.input.spec.deleting {
            self.release = true;
        }
    }
}
