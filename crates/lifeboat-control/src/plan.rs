//! Running a `RecoveryPlan`: which request a plan has pending, and the run itself, step by
//! step, over a [`PlanDriver`] (the standalone daemon's drives the embedded store and runs
//! commands).
//!
//! ```text
//!  every action:   for each group, in order (cleanup: in reverse order):
//!                    gate (test failover and failover only: waits for `proceed`)
//!                    -> before hooks -> the group's VMs in parallel -> after hooks
//! ```
//!
//! Hooks run for every action, with the action in `LIFEBOAT_ACTION`, so that a hook that
//! started something for a test failover stops it at its cleanup. Every step done is saved in
//! `status.completedSteps` before the next starts, so that a run stopped by a failure (or by
//! the process that ran it going away) resumes where it stopped and does not run a hook or
//! fail a VM over twice.

use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use lifeboat_api::common::RecoveryPointSelector;
use lifeboat_api::plan::{
    DrillStatus, PlanAction, PlanFailure, PlanGroup, PlanHook, PlanPhase, PlanVmStatus,
    RecoveryPlanSpec, RecoveryPlanStatus, VmOutcome,
};
use lifeboat_api::protected_vm::{FailoverType, ProtectedVMStatus};

use crate::mapping::api_time;
use crate::requests::Action;

/// What a plan's VM is asked to do.
#[derive(Clone, Debug, PartialEq)]
pub enum VmRequest {
    /// Test failover to the plan's point rule.
    TestFailover(RecoveryPointSelector),
    /// Remove the test failover.
    Cleanup,
    /// Fail over, planned or not, to the plan's point rule.
    Failover {
        /// Planned: ship what is pending, stop the source, take the latest point.
        planned: bool,
        /// The point rule (unplanned).
        point: RecoveryPointSelector,
    },
    /// Commit the failover.
    Commit,
}

impl VmRequest {
    /// The VM's action for this request, as `lifeboat failover` and friends ask it.
    pub fn action(&self) -> Action {
        let rule = |selector| Some(crate::mapping::point(selector).arg());
        match self {
            VmRequest::TestFailover(selector) => Action::TestFailover(rule(selector)),
            VmRequest::Cleanup => Action::Cleanup,
            VmRequest::Failover { planned, point } => Action::Failover {
                planned: *planned,
                point: (!planned).then(|| rule(point)).flatten(),
            },
            VmRequest::Commit => Action::Commit,
        }
    }
}

/// A run the plan asks for: its action, token, and the point rule of its VMs.
#[derive(Clone, Debug, PartialEq)]
pub struct Run {
    /// What each VM is asked.
    pub request: VmRequest,
    /// The request's token.
    pub token: String,
    /// A retry of the failed run (this is the retry's token, the run keeps its own).
    pub retry: Option<String>,
    /// A scheduled drill: the test failover (no gates), then its cleanup.
    pub drill: bool,
}

impl Run {
    /// The action, as status says it.
    pub fn action(&self) -> PlanAction {
        if self.drill {
            return PlanAction::Drill;
        }
        match self.request {
            VmRequest::TestFailover(_) => PlanAction::TestFailover,
            VmRequest::Cleanup => PlanAction::CleanupTestFailover,
            VmRequest::Failover { planned: true, .. } => PlanAction::PlannedFailover,
            VmRequest::Failover { planned: false, .. } => PlanAction::UnplannedFailover,
            VmRequest::Commit => PlanAction::Commit,
        }
    }

    /// Whether the groups' gates hold this run (test failover and failover; not cleanup or
    /// commit, which undo or seal what a gated run did, nor a drill, which nobody attends).
    fn gated(&self) -> bool {
        !self.drill
            && matches!(
                self.request,
                VmRequest::TestFailover(_) | VmRequest::Failover { .. }
            )
    }
}

/// When the plan's next drill is due: one interval after the last drill started, or after
/// the plan was `created`; none without `spec.drill`.
pub fn next_drill(
    spec: &RecoveryPlanSpec,
    status: Option<&RecoveryPlanStatus>,
    created: SystemTime,
) -> Option<SystemTime> {
    let interval = Duration::from_secs(u64::from(spec.drill.as_ref()?.interval_hours) * 3600);
    let last = status
        .and_then(|s| s.last_drill.as_ref())
        .map_or(created, |d| crate::mapping::system_time(&d.start_time));
    Some(last + interval)
}

/// The request of `spec` not yet handled, if any, as a run, else a drill that is due at
/// `now`; a failed run is not started again with its own token (a `retry` does that).
pub fn pending(
    spec: &RecoveryPlanSpec,
    status: Option<&RecoveryPlanStatus>,
    created: SystemTime,
    now: SystemTime,
) -> Option<Run> {
    let due = next_drill(spec, status, created);
    let status = status.cloned().unwrap_or_default();
    let drill = |token: String, retry: Option<String>| Run {
        request: VmRequest::TestFailover(RecoveryPointSelector::default()),
        token,
        retry,
        drill: true,
    };
    let going = matches!(status.phase, PlanPhase::Running | PlanPhase::WaitingForGate);
    if going
        && status.action == Some(PlanAction::Drill)
        && let Some(token) = &status.token
    {
        return Some(drill(token.clone(), None));
    }
    let requests = spec.requests.clone().unwrap_or_default();
    let handled = &status.handled_requests;
    let new = |token: Option<&String>, done: &Option<String>| -> Option<String> {
        token
            .filter(|t| {
                Some(*t) != done.as_ref()
                    && !(status.phase == PlanPhase::Failed && status.token.as_ref() == Some(*t))
            })
            .cloned()
    };
    if let Some(retry) = requests.retry.as_ref()
        && Some(retry) != handled.retry.as_ref()
        && status.phase == PlanPhase::Failed
        && let (Some(action), Some(token)) = (status.action, status.token.clone())
    {
        let request = match action {
            PlanAction::Drill => return Some(drill(token, Some(retry.clone()))),
            PlanAction::TestFailover => VmRequest::TestFailover(
                requests
                    .test_failover
                    .map(|r| r.recovery_point)
                    .unwrap_or_default(),
            ),
            PlanAction::CleanupTestFailover => VmRequest::Cleanup,
            PlanAction::PlannedFailover | PlanAction::UnplannedFailover => VmRequest::Failover {
                planned: action == PlanAction::PlannedFailover,
                point: requests
                    .failover
                    .and_then(|r| r.recovery_point)
                    .unwrap_or_default(),
            },
            PlanAction::Commit => VmRequest::Commit,
        };
        return Some(Run {
            request,
            token,
            retry: Some(retry.clone()),
            drill: false,
        });
    }
    let run = |request, token| Run {
        request,
        token,
        retry: None,
        drill: false,
    };
    if let Some(r) = &requests.failover
        && let Some(token) = new(Some(&r.token), &handled.failover)
    {
        let request = VmRequest::Failover {
            planned: r.failover_type == FailoverType::Planned,
            point: r.recovery_point.clone().unwrap_or_default(),
        };
        return Some(run(request, token));
    }
    if let Some(r) = &requests.test_failover
        && let Some(token) = new(Some(&r.token), &handled.test_failover)
    {
        return Some(run(
            VmRequest::TestFailover(r.recovery_point.clone()),
            token,
        ));
    }
    if let Some(token) = new(
        requests.cleanup_test_failover.as_ref(),
        &handled.cleanup_test_failover,
    ) {
        return Some(run(VmRequest::Cleanup, token));
    }
    if let Some(token) = new(requests.commit.as_ref(), &handled.commit) {
        return Some(run(VmRequest::Commit, token));
    }
    match due {
        Some(due) if now >= due && !going => {
            let seconds = now
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs();
            Some(drill(format!("drill-{seconds}"), None))
        }
        _ => None,
    }
}

/// What carries a run out: the requests to VMs, the hooks, the plan's spec as it now is,
/// and its status.
#[async_trait]
pub trait PlanDriver: Send + Sync {
    /// Ask the VM `name` (in the plan's namespace) for `request` and wait until it is handled;
    /// the VM's status as it then is.
    async fn vm(&self, name: &str, request: &VmRequest) -> Result<ProtectedVMStatus, String>;
    /// Run `hook` with `env` added to its environment, to its end.
    async fn hook(&self, hook: &PlanHook, env: &[(String, String)]) -> Result<(), String>;
    /// The plan's spec now (a gate waits for a `proceed` request in it).
    async fn spec(&self) -> RecoveryPlanSpec;
    /// Save the plan's status.
    async fn save(&self, status: &RecoveryPlanStatus) -> Result<(), String>;
}

/// The runs going on, by plan (namespace, name): each a task of its own, told the plan's spec
/// as it changes (a gate waits for its `proceed` request in it). Every run is aborted when
/// this is dropped (the daemon stops, the operator loses leadership); each resumes at its
/// steps done under the next process.
#[derive(Default)]
pub struct Runs {
    running: std::collections::BTreeMap<(String, String), Running>,
}

struct Running {
    spec: tokio::sync::watch::Sender<RecoveryPlanSpec>,
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for Runs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runs")
            .field("running", &self.running.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Runs {
    /// Tell the run of the plan `key` its spec; false when none is going on (a finished one
    /// is forgotten).
    pub fn tell(&mut self, key: &(String, String), spec: &RecoveryPlanSpec) -> bool {
        self.running.retain(|_, run| !run.task.is_finished());
        match self.running.get(key) {
            Some(run) => {
                run.spec.send_replace(spec.clone());
                true
            }
            None => false,
        }
    }

    /// Start `run` of the plan `key` from its `spec` and `status`, over the driver
    /// `driver_for` makes from the spec's receiver.
    pub fn start<D: PlanDriver + 'static>(
        &mut self,
        key: (String, String),
        spec: RecoveryPlanSpec,
        status: Option<RecoveryPlanStatus>,
        run: Run,
        driver_for: impl FnOnce(tokio::sync::watch::Receiver<RecoveryPlanSpec>) -> D,
    ) {
        let (namespace, name) = key.clone();
        tracing::info!(plan = %format!("{namespace}/{name}"), action = ?run.action(), token = %run.token, "recovery plan run starts");
        let (sender, receiver) = tokio::sync::watch::channel(spec.clone());
        let driver = driver_for(receiver);
        let task = tokio::spawn(async move {
            let status = self::run(&driver, &namespace, &name, &spec, status, run).await;
            tracing::info!(plan = %format!("{namespace}/{name}"), phase = ?status.phase, failure = ?status.failure, "recovery plan run ended");
        });
        self.running.insert(key, Running { spec: sender, task });
    }

    /// Stop the run of the plan `key` (the plan is gone).
    pub fn stop(&mut self, key: &(String, String)) {
        if let Some(run) = self.running.remove(key) {
            run.task.abort();
        }
    }
}

impl Drop for Runs {
    fn drop(&mut self) {
        for (_, run) in std::mem::take(&mut self.running) {
            run.task.abort();
        }
    }
}

/// How long a plan waits for one VM's request to be handled (a failover of a large disk).
pub const VM_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// Wait, for at most [`VM_TIMEOUT`], until `resources` say the VM handled `token` for
/// `action` (a driver's [`PlanDriver::vm`], once it asked); the VM's status then.
///
/// # Errors
///
/// The VM's job failed (its reason), the wait timed out, or the VM could not be read.
pub async fn wait_for_vm(
    resources: &dyn crate::requests::Resources,
    namespace: &str,
    name: &str,
    action: &Action,
    token: &str,
) -> Result<ProtectedVMStatus, String> {
    let vm = crate::requests::wait(
        resources,
        namespace,
        name,
        action,
        token,
        VM_TIMEOUT,
        &mut crate::requests::NoProgress,
    )
    .await
    .map_err(|e| e.to_string())?;
    Ok(vm.status.unwrap_or_default())
}

/// How often a gate looks for its `proceed` request.
const GATE_POLL: Duration = Duration::from_millis(250);

/// To the microsecond (the VMs of a group are told apart by their times in a test).
fn micro(t: SystemTime) -> MicroTime {
    MicroTime(Timestamp::try_from(t).unwrap_or(Timestamp::UNIX_EPOCH))
}

/// A name as a part of an environment variable's: upper case, `_` for anything else.
pub fn env_name(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect()
}

/// The plan's run, with its status as it goes.
struct Runner<'a> {
    driver: &'a dyn PlanDriver,
    name: String,
    namespace: String,
    run: Run,
    /// What the VMs are asked in this part of the run (a drill's second part: cleanup).
    request: VmRequest,
    status: RecoveryPlanStatus,
}

/// A step failed: its id, and why.
type StepError = (String, String);

/// The `Succeeded` condition for the status's phase.
fn set_succeeded(status: &mut RecoveryPlanStatus, now: SystemTime) {
    use lifeboat_core::conditions::{ConditionStatus, set_condition};
    let (value, message) = match status.phase {
        PlanPhase::Succeeded => (ConditionStatus::True, "the last run finished".to_owned()),
        PlanPhase::Failed => (
            ConditionStatus::False,
            status
                .failure
                .as_ref()
                .map(|f| format!("{}: {}", f.step, f.message))
                .unwrap_or_default(),
        ),
        _ => (
            ConditionStatus::Unknown,
            status.progression.clone().unwrap_or_default(),
        ),
    };
    let mut conditions = crate::mapping::conditions(&status.conditions);
    let reason = format!("{:?}", status.phase);
    set_condition(
        &mut conditions,
        "Succeeded",
        value,
        &reason,
        &message,
        None,
        now,
    );
    status.conditions = crate::mapping::api_conditions(&conditions);
}

impl Runner<'_> {
    async fn save(&mut self) {
        set_succeeded(
            &mut self.status,
            crate::mapping::whole_seconds(SystemTime::now()),
        );
        if let Err(e) = self.driver.save(&self.status).await {
            tracing::warn!(plan = %self.name, "save the plan's status: {e}");
        }
    }

    /// The action this part of the run is to hooks: a drill tests failover, then cleans up.
    fn action(&self) -> PlanAction {
        match (self.run.drill, &self.request) {
            (true, VmRequest::Cleanup) => PlanAction::CleanupTestFailover,
            (true, _) => PlanAction::TestFailover,
            (false, _) => self.run.action(),
        }
    }

    /// In a drill's second part, its cleanup: its steps are named `cleanup/...`, and the
    /// VMs' outcomes in status stay the test failover's.
    fn drill_cleanup(&self) -> bool {
        self.run.drill && self.request == VmRequest::Cleanup
    }

    fn step(&self, step: String) -> String {
        if self.drill_cleanup() {
            format!("cleanup/{step}")
        } else {
            step
        }
    }

    fn done(&self, step: &str) -> bool {
        self.status.completed_steps.iter().any(|s| s == step)
    }

    async fn complete(&mut self, step: String) {
        self.status.completed_steps.push(step);
        self.save().await;
    }

    async fn at(&mut self, progression: String, phase: PlanPhase) {
        self.status.progression = Some(progression);
        self.status.phase = phase;
        self.save().await;
    }

    fn env(&self, group: &PlanGroup, stage: &str) -> Vec<(String, String)> {
        let mut env = vec![
            ("LIFEBOAT_PLAN".to_owned(), self.name.clone()),
            ("LIFEBOAT_NAMESPACE".to_owned(), self.namespace.clone()),
            ("LIFEBOAT_ACTION".to_owned(), format!("{:?}", self.action())),
            (
                "LIFEBOAT_DRILL".to_owned(),
                if self.run.drill { "1" } else { "0" }.to_owned(),
            ),
            ("LIFEBOAT_TOKEN".to_owned(), self.run.token.clone()),
            ("LIFEBOAT_GROUP".to_owned(), group.name.clone()),
            ("LIFEBOAT_STAGE".to_owned(), stage.to_owned()),
            ("LIFEBOAT_VMS".to_owned(), group.vms.join(" ")),
            (
                "LIFEBOAT_RESULTS".to_owned(),
                serde_json::to_string(&self.status.vms).unwrap_or_default(),
            ),
        ];
        for vm in &self.status.vms {
            env.extend(crate::recovery::disk_env(&vm.name, &vm.disks));
            if let Some(definition) = &vm.recovered_vm {
                env.push((
                    format!("LIFEBOAT_RECOVERED_{}", env_name(&vm.name)),
                    definition.clone(),
                ));
            }
        }
        env
    }

    async fn hooks(&mut self, group: &PlanGroup, stage: &str) -> Result<(), StepError> {
        let hooks = if stage == "before" {
            &group.before
        } else {
            &group.after
        };
        for hook in hooks {
            let step = self.step(format!("{}/{stage}/{}", group.name, hook.name));
            if self.done(&step) {
                continue;
            }
            self.at(
                format!("{}: {stage} hook {}", group.name, hook.name),
                PlanPhase::Running,
            )
            .await;
            let env = self.env(group, stage);
            self.driver
                .hook(hook, &env)
                .await
                .map_err(|e| (step.clone(), format!("hook {}: {e}", hook.name)))?;
            self.complete(step).await;
        }
        Ok(())
    }

    async fn gate(&mut self, group: &PlanGroup) -> Result<(), StepError> {
        let Some(gate) = &group.gate else {
            return Ok(());
        };
        let step = self.step(format!("{}/gate", group.name));
        if self.done(&step) {
            return Ok(());
        }
        self.at(
            format!("{}: waiting at the gate: {}", group.name, gate.message),
            PlanPhase::WaitingForGate,
        )
        .await;
        loop {
            let proceed = self.driver.spec().await.requests.and_then(|r| r.proceed);
            if let Some(token) = proceed
                && Some(&token) != self.status.handled_requests.proceed.as_ref()
            {
                self.status.handled_requests.proceed = Some(token);
                self.status.phase = PlanPhase::Running;
                self.complete(step).await;
                return Ok(());
            }
            tokio::time::sleep(GATE_POLL).await;
        }
    }

    /// The VMs of `group` in parallel; every one ends (done or failed) before the first
    /// failure is returned.
    async fn vms(&mut self, group: &PlanGroup) -> Result<(), StepError> {
        let todo: Vec<String> = group
            .vms
            .iter()
            .filter(|vm| !self.done(&self.step(format!("{}/vm/{vm}", group.name))))
            .cloned()
            .collect();
        if todo.is_empty() {
            return Ok(());
        }
        let record = !self.drill_cleanup();
        let what = if record { "" } else { "cleanup of " };
        self.status.progression = Some(format!("{}: {what}{} VM(s)", group.name, todo.len()));
        self.status.phase = PlanPhase::Running;
        let started = SystemTime::now();
        for vm in self
            .status
            .vms
            .iter_mut()
            .filter(|v| record && todo.contains(&v.name))
        {
            vm.outcome = VmOutcome::Running;
            vm.message = None;
            vm.start_time = Some(micro(started));
            vm.completion_time = None;
        }
        self.save().await;
        let request = self.request.clone();
        let driver = self.driver;
        let outcomes = futures::future::join_all(todo.iter().map(|name| {
            let request = request.clone();
            async move {
                let result = driver.vm(name, &request).await;
                (name.clone(), result, SystemTime::now())
            }
        }))
        .await;
        let mut first_failure = None;
        for (name, result, ended) in outcomes {
            let step = self.step(format!("{}/vm/{name}", group.name));
            if !record {
                match result {
                    Ok(_) => self.status.completed_steps.push(step),
                    Err(message) => {
                        first_failure
                            .get_or_insert((step, format!("ProtectedVM {name}: {message}")));
                    }
                }
                continue;
            }
            let Some(entry) = self.status.vms.iter_mut().find(|v| v.name == name) else {
                continue;
            };
            entry.completion_time = Some(micro(ended));
            match result {
                Ok(status) => {
                    entry.outcome = VmOutcome::Succeeded;
                    let result = match request {
                        VmRequest::TestFailover(_) => status.test_failover,
                        VmRequest::Failover { .. } | VmRequest::Commit => status.failover,
                        VmRequest::Cleanup => None,
                    };
                    entry.recovery_point = result
                        .as_ref()
                        .and_then(|r| r.recovery_point.as_ref())
                        .map(|p| p.name.clone());
                    entry.verified = result.as_ref().map(|r| r.verified);
                    // NB: a failback's result keeps the failover's VM, which it takes down.
                    entry.recovered_vm = result
                        .as_ref()
                        .filter(|r| !r.failback)
                        .and_then(|r| r.recovered_vm.as_ref())
                        .map(|up| up.definition.clone().unwrap_or_else(|| up.name.clone()));
                    entry.disks = result.map(|r| r.disks).unwrap_or_default();
                    self.status.completed_steps.push(step);
                }
                Err(message) => {
                    entry.outcome = VmOutcome::Failed;
                    entry.message = Some(message.clone());
                    first_failure.get_or_insert((step, format!("ProtectedVM {name}: {message}")));
                }
            }
        }
        self.save().await;
        first_failure.map_or(Ok(()), Err)
    }

    /// Every group, in order (a cleanup: in reverse), to the first failure.
    async fn groups(&mut self, spec: &RecoveryPlanSpec) -> Result<(), StepError> {
        let mut groups: Vec<&PlanGroup> = spec.groups.iter().collect();
        if self.request == VmRequest::Cleanup {
            groups.reverse();
        }
        for group in groups {
            self.group(group).await?;
        }
        Ok(())
    }

    async fn group(&mut self, group: &PlanGroup) -> Result<(), StepError> {
        if self.run.gated() {
            self.gate(group).await?;
        }
        self.hooks(group, "before").await?;
        self.vms(group).await?;
        self.hooks(group, "after").await
    }
}

/// The VMs of a run, each pending, in the plan's order.
fn fresh_vms(spec: &RecoveryPlanSpec) -> Vec<PlanVmStatus> {
    spec.groups
        .iter()
        .flat_map(|g| {
            g.vms.iter().map(|vm| PlanVmStatus {
                name: vm.clone(),
                group: g.name.clone(),
                ..PlanVmStatus::default()
            })
        })
        .collect()
}

/// Carry `run` out on the plan `namespace/name` as `spec` has it, from its status `previous`
/// (a retry, or a run whose process stopped mid-run, resumes from the steps it has done).
/// Returns the final status, saved.
pub async fn run(
    driver: &dyn PlanDriver,
    namespace: &str,
    name: &str,
    spec: &RecoveryPlanSpec,
    previous: Option<RecoveryPlanStatus>,
    run: Run,
) -> RecoveryPlanStatus {
    let mut status = previous.unwrap_or_default();
    let now = SystemTime::now();
    // NB: a run found running is one whose process stopped mid-run: it goes on from its
    // steps done, as a retry does. A drill retried is a new drill (the failed one cleaned
    // up after itself: its steps done prove nothing any more).
    let resumed = (run.retry.is_some() && !run.drill)
        || (matches!(status.phase, PlanPhase::Running | PlanPhase::WaitingForGate)
            && status.token.as_ref() == Some(&run.token)
            && status.action == Some(run.action()));
    let started = match (resumed, &status.start_time) {
        (true, Some(first)) => crate::mapping::system_time(first),
        _ => now,
    };
    if let Some(retry) = &run.retry {
        status.handled_requests.retry = Some(retry.clone());
    }
    if resumed {
        status.failure = None;
    } else {
        status.completed_steps.clear();
        status.vms = fresh_vms(spec);
        status.start_time = Some(api_time(now));
        status.failure = None;
    }
    status.action = Some(run.action());
    status.token = Some(run.token.clone());
    status.completion_time = None;
    status.recovery_time_seconds = None;
    status.phase = PlanPhase::Running;
    let mut runner = Runner {
        driver,
        name: name.to_owned(),
        namespace: namespace.to_owned(),
        request: run.request.clone(),
        run,
        status,
    };
    runner.save().await;
    let mut outcome = runner.groups(spec).await;
    let ended = SystemTime::now();
    let recovery_time = ended
        .duration_since(started)
        .unwrap_or_default()
        .as_secs_f64();
    if runner.run.drill {
        outcome = outcome.and_then(|()| verified(&runner.status));
        // NB: a drill cleans up whatever it made, whether or not it went well.
        runner.request = VmRequest::Cleanup;
        let cleanup = runner.groups(spec).await;
        let finished = SystemTime::now();
        let succeeded = outcome.is_ok() && cleanup.is_ok();
        let message = match (&outcome, &cleanup) {
            (Err((step, why)), _) | (Ok(()), Err((step, why))) => Some(format!("{step}: {why}")),
            (Ok(()), Ok(())) => None,
        };
        let status = &mut runner.status;
        status.last_drill = Some(DrillStatus {
            start_time: api_time(started),
            completion_time: Some(api_time(finished)),
            succeeded,
            recovery_time_seconds: outcome.is_ok().then_some(recovery_time),
            message,
        });
        status.next_drill_time = next_drill(spec, Some(status), started).map(api_time);
        outcome = outcome.and(cleanup);
    }
    let ended = SystemTime::now();
    let status = &mut runner.status;
    status.completion_time = Some(api_time(ended));
    match outcome {
        Ok(()) => {
            status.phase = PlanPhase::Succeeded;
            status.progression = Some("done".to_owned());
            status.recovery_time_seconds = Some(recovery_time);
            let token = Some(runner.run.token.clone());
            let handled = &mut status.handled_requests;
            match (runner.run.drill, &runner.run.request) {
                (true, _) => {}
                (false, VmRequest::TestFailover(_)) => handled.test_failover = token,
                (false, VmRequest::Cleanup) => handled.cleanup_test_failover = token,
                (false, VmRequest::Failover { .. }) => handled.failover = token,
                (false, VmRequest::Commit) => handled.commit = token,
            }
        }
        Err((step, message)) => {
            status.phase = PlanPhase::Failed;
            status.progression = Some(format!("failed at {step}"));
            status.failure = Some(PlanFailure { step, message });
        }
    }
    runner.save().await;
    runner.status
}

/// Every VM of the run recovered with its disks read back equal to its point's digests.
fn verified(status: &RecoveryPlanStatus) -> Result<(), StepError> {
    match status
        .vms
        .iter()
        .find(|v| v.outcome != VmOutcome::Succeeded || v.verified != Some(true))
    {
        None => Ok(()),
        Some(vm) => Err((
            "verify".to_owned(),
            format!(
                "ProtectedVM {}: its test failover was not verified against its point's digests",
                vm.name
            ),
        )),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is the test failure report
mod tests;
