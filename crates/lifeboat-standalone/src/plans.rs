//! Recovery plans in standalone mode: the daemon keeps each plan of the folder in the
//! embedded store (its spec with the command line's requests on top, and its status), and
//! runs the request a plan has pending as a task of its own, so that replication goes on
//! while a plan waits at a gate or runs a long hook.
//!
//! ```text
//!  every tick, per plan:  folder spec + <state>/plan-requests ──> db (spec, generation)
//!                         pending request? ──> task: lifeboat_control::plan::run over
//!                                                    DaemonDriver
//!                         task running?    ──> the spec sent to it (a gate's `proceed`)
//!  DaemonDriver: a VM's request written as `lifeboat failover` writes it, and waited on;
//!                a hook run as a process in the manifests folder; status into the db
//! ```
//!
//! The task alone writes a running plan's record. A daemon that stops mid-run finds the run
//! in the store when it starts again and resumes it at the step it was at (a VM whose request
//! was out is asked again).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use lifeboat_api::plan::{
    PlanHook, PlanRequests, RecoveryPlan, RecoveryPlanSpec, RecoveryPlanStatus,
};
use lifeboat_api::protected_vm::ProtectedVMStatus;
use lifeboat_control::mapping::system_time;
use lifeboat_control::plan::{self, PlanDriver, VmRequest};
use tokio::sync::watch;

use crate::cli::{self, Embedded};
use crate::daemon::record;
use crate::db::{Db, DbError};
use crate::folder::Key;
use crate::requests;

/// The db's kind of plans.
pub const PLAN_KIND: &str = "RecoveryPlan";

/// The lines of a failed hook's output kept in its error.
const OUTPUT_LINES: usize = 5;

/// The plans' runs.
#[derive(Debug, Default)]
pub struct Plans {
    runs: plan::Runs,
}

impl Plans {
    /// One pass: bring the db's plans in step with the folder's, start the runs asked for,
    /// tell the running ones their spec.
    ///
    /// # Errors
    ///
    /// The embedded store failed.
    pub fn step(
        &mut self,
        state_dir: &Path,
        manifests_dir: &Path,
        manifests: &BTreeMap<Key, RecoveryPlan>,
        now: SystemTime,
    ) -> Result<(), DbError> {
        let db = Db::new(state_dir);
        for (key, manifest) in manifests {
            let mut spec = manifest.spec.clone();
            spec.requests = requests::merged_plan(
                spec.requests.take(),
                requests::read::<PlanRequests>(state_dir, &key.0, &key.1),
            );
            if self.runs.tell(key, &spec) {
                continue;
            }
            let stored: Option<RecoveryPlan> = db.get(PLAN_KIND, &key.0, &key.1)?;
            let plan = record(stored.clone(), manifest, spec, |p| &mut p.spec, now);
            if stored.as_ref() != Some(&plan) {
                db.put(PLAN_KIND, &key.0, &key.1, &plan)?;
            }
            let created = plan
                .metadata
                .creation_timestamp
                .as_ref()
                .map_or(now, system_time);
            let Some(run) = plan::pending(&plan.spec, plan.status.as_ref(), created, now) else {
                continue;
            };
            let driver_for = |spec| DaemonDriver {
                state_dir: state_dir.to_owned(),
                manifests_dir: manifests_dir.to_owned(),
                namespace: key.0.clone(),
                name: key.1.clone(),
                spec,
            };
            self.runs
                .start(key.clone(), plan.spec, plan.status, run, driver_for);
        }
        for stored in db.list::<RecoveryPlan>(PLAN_KIND)? {
            let key = crate::folder::key_of(&stored);
            if !manifests.contains_key(&key) {
                self.runs.stop(&key);
                db.delete(PLAN_KIND, &key.0, &key.1)?;
            }
        }
        Ok(())
    }

    /// Stop every run (the daemon stops; each resumes when it starts again).
    pub fn abort(&mut self) {
        self.runs = plan::Runs::default();
    }
}

/// The standalone [`PlanDriver`]: VMs through the request files and the embedded store,
/// hooks as processes.
struct DaemonDriver {
    state_dir: PathBuf,
    manifests_dir: PathBuf,
    namespace: String,
    name: String,
    spec: watch::Receiver<RecoveryPlanSpec>,
}

#[async_trait]
impl PlanDriver for DaemonDriver {
    async fn vm(&self, name: &str, request: &VmRequest) -> Result<ProtectedVMStatus, String> {
        let action = request.action();
        let token = cli::request(&self.state_dir, &self.namespace, name, &action)?;
        plan::wait_for_vm(
            &Embedded(Db::new(&self.state_dir)),
            &self.namespace,
            name,
            &action,
            &token,
        )
        .await
    }

    async fn hook(&self, hook: &PlanHook, env: &[(String, String)]) -> Result<(), String> {
        run_hook(&self.manifests_dir, hook, env).await
    }

    async fn spec(&self) -> RecoveryPlanSpec {
        self.spec.borrow().clone()
    }

    async fn save(&self, status: &RecoveryPlanStatus) -> Result<(), String> {
        let db = Db::new(&self.state_dir);
        let Some(mut plan) = db
            .get::<RecoveryPlan>(PLAN_KIND, &self.namespace, &self.name)
            .map_err(|e| e.to_string())?
        else {
            return Err(format!(
                "RecoveryPlan {}/{} is gone from the store",
                self.namespace, self.name
            ));
        };
        plan.status = Some(status.clone());
        db.put(PLAN_KIND, &self.namespace, &self.name, &plan)
            .map_err(|e| e.to_string())
    }
}

/// Run a hook in `dir` with `env`, to its end or its timeout (then it is killed). Its output
/// goes to the log; a failure's message ends with its last lines of standard error.
pub(crate) async fn run_hook(
    dir: &Path,
    hook: &PlanHook,
    env: &[(String, String)],
) -> Result<(), String> {
    let Some((program, args)) = hook.command.split_first() else {
        return Err(
            "it has no command: standalone mode runs a hook's command (its job is for a cluster)"
                .into(),
        );
    };
    let child = tokio::process::Command::new(program)
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot start {program:?} (in {}): {e}", dir.display()))?;
    let limit = Duration::from_secs(u64::from(hook.timeout_seconds));
    let output = match tokio::time::timeout(limit, child.wait_with_output()).await {
        Ok(output) => output.map_err(|e| format!("wait for {program:?}: {e}"))?,
        Err(_) => {
            return Err(format!(
                "killed after its timeout of {}s",
                hook.timeout_seconds
            ));
        }
    };
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    for line in stdout.lines().chain(stderr.lines()) {
        tracing::info!(hook = %hook.name, "{line}");
    }
    if output.status.success() {
        return Ok(());
    }
    let tail: Vec<&str> = stderr.lines().rev().take(OUTPUT_LINES).collect();
    let tail: Vec<&str> = tail.into_iter().rev().collect();
    Err(if tail.is_empty() {
        format!("{program} {}", output.status)
    } else {
        format!("{program} {}: {}", output.status, tail.join(" / "))
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is the test failure report
mod tests {
    use super::*;

    fn hook(command: &[&str], timeout_seconds: u32) -> PlanHook {
        PlanHook {
            name: "h".into(),
            command: command.iter().map(|s| (*s).to_owned()).collect(),
            timeout_seconds,
            job: None,
        }
    }

    #[tokio::test]
    async fn a_hook_runs_in_the_folder_with_its_environment() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let env = [("LIFEBOAT_GROUP".to_owned(), "db".to_owned())];
        let h = hook(&["sh", "-c", "echo \"$LIFEBOAT_GROUP\" > seen"], 10);
        assert_eq!(run_hook(dir.path(), &h, &env).await, Ok(()));
        let seen = std::fs::read_to_string(dir.path().join("seen")).unwrap_or_default();
        assert_eq!(seen, "db\n");
    }

    #[tokio::test]
    async fn a_failed_hook_says_its_status_and_last_words() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let h = hook(
            &["sh", "-c", "echo one >&2; echo 'no database' >&2; exit 3"],
            10,
        );
        let error = run_hook(dir.path(), &h, &[]).await.unwrap_err();
        assert!(error.contains("exit status: 3"), "{error}");
        assert!(error.ends_with("one / no database"), "{error}");
        let missing = hook(&["./no-such-script"], 10);
        let error = run_hook(dir.path(), &missing, &[]).await.unwrap_err();
        assert!(
            error.contains("cannot start \"./no-such-script\""),
            "{error}"
        );
        let slow = hook(&["sleep", "30"], 1);
        let error = run_hook(dir.path(), &slow, &[]).await.unwrap_err();
        assert_eq!(error, "killed after its timeout of 1s");
    }
}
