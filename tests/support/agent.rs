//! A scripted stand-in for the node agent: a TEST DOUBLE, not the agent. It speaks the
//! agent's side of the contract (docs/agent-contract.md) through the API and nothing else:
//! heartbeats its Lease, claims the jobs of its node with a resourceVersion-guarded status
//! update, ends each job as its script says (succeed by default), and writes `status.agent`
//! reports by server-side apply as `lifeboat-agent`. The control plane is what the tests put
//! under test; this double only plays the other side of the conversation.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::{Client, ResourceExt};
use lifeboat_api::common::{ErrorClass, ErrorStatus};
use lifeboat_api::contract::{
    AGENT_FIELD_MANAGER, HEARTBEAT_LABEL, HEARTBEAT_LABEL_VALUE, agent_lease_name,
    agent_report_apply, claim_job_patch, is_claimable,
};
use lifeboat_api::job::{JobType, StepState};
use lifeboat_api::protected_vm::{
    AgentReport, Consistency, CycleStatistics, DiskProgress, FailoverResult, MaterialisedDisk,
    RecoveryPointRef, RecoveryPointsSummary,
};
use lifeboat_api::{ProtectedVM, ReplicationJob};
use serde_json::json;

/// How the double ends a job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ending {
    /// Succeeded.
    Succeed,
    /// Failed with this class and reason.
    Fail(ErrorClass, String),
}

#[derive(Debug, Default)]
struct Script {
    endings: HashMap<JobType, VecDeque<Ending>>,
}

/// The double for the agent on one node.
pub struct ScriptedAgent {
    client: Client,
    namespace: String,
    node: String,
    script: Arc<Mutex<Script>>,
    heartbeat: Arc<AtomicBool>,
    claims: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for ScriptedAgent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScriptedAgent")
            .field("node", &self.node)
            .field("namespace", &self.namespace)
            .finish_non_exhaustive()
    }
}

impl Drop for ScriptedAgent {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn now() -> Time {
    Time(Timestamp::now())
}

/// A report of a healthy VM at `at`: a cycle just succeeded and cut a point.
pub fn healthy_report(at: Time) -> AgentReport {
    let point = RecoveryPointRef {
        name: format!("rp-{}", at.0.as_second()),
        time: at.clone(),
        consistency: Consistency::CrashConsistent,
    };
    AgentReport {
        report_time: Some(at.clone()),
        policy_generation: None,
        last_cycle_start_time: Some(at.clone()),
        last_successful_cycle_time: Some(at),
        last_cycle_duration_seconds: Some(0.5),
        cycles: CycleStatistics {
            succeeded_last_hour: 12,
            failed_last_hour: 0,
            succeeded_total: 100,
            failed_total: 0,
            bytes_shipped_total: 1 << 20,
        },
        pending_log_bytes: 0,
        disks: vec![DiskProgress {
            name: "os".into(),
            size_bytes: 1 << 30,
            ..DiskProgress::default()
        }],
        recovery_points: RecoveryPointsSummary {
            latest: Some(point.clone()),
            latest_app_consistent: None,
            oldest: Some(point),
            count: 1,
        },
        last_error: None,
        tracking_lost: None,
    }
}

impl ScriptedAgent {
    /// Start the double for `node`: jobs and VMs in `namespace`, its Lease in `lease_namespace`.
    pub fn start(client: Client, namespace: &str, lease_namespace: &str, node: &str) -> Self {
        Self::start_with_clock(
            client,
            namespace,
            lease_namespace,
            node,
            Arc::new(std::time::SystemTime::now),
        )
    }

    /// [`ScriptedAgent::start`], its heartbeats stamped with `clock` (the operator's, when a
    /// test moves time: an agent that keeps beating must not look silent when time jumps).
    pub fn start_with_clock(
        client: Client,
        namespace: &str,
        lease_namespace: &str,
        node: &str,
        clock: Arc<dyn Fn() -> std::time::SystemTime + Send + Sync>,
    ) -> Self {
        let script = Arc::new(Mutex::new(Script::default()));
        let heartbeat = Arc::new(AtomicBool::new(true));
        let claims = Arc::new(AtomicU64::new(0));
        let worker = Worker {
            client: client.clone(),
            namespace: namespace.to_owned(),
            lease_namespace: lease_namespace.to_owned(),
            node: node.to_owned(),
            script: Arc::clone(&script),
            heartbeat: Arc::clone(&heartbeat),
            claims: Arc::clone(&claims),
            clock,
        };
        let task = tokio::spawn(worker.run());
        Self {
            client,
            namespace: namespace.to_owned(),
            node: node.to_owned(),
            script,
            heartbeat,
            claims,
            task,
        }
    }

    /// End the next job of `job_type` this way (then the next one, ...; then succeed).
    pub fn script(&self, job_type: JobType, ending: Ending) {
        let mut script = self.script.lock().unwrap_or_else(PoisonError::into_inner);
        script
            .endings
            .entry(job_type)
            .or_default()
            .push_back(ending);
    }

    /// Stop (false) or resume (true) heartbeating.
    pub fn set_heartbeat(&self, on: bool) {
        self.heartbeat.store(on, Ordering::Relaxed);
    }

    /// How many jobs this double claimed.
    pub fn claims(&self) -> u64 {
        self.claims.load(Ordering::Relaxed)
    }

    /// The node.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Write a report on VM `vm` (server-side apply of `status.agent`).
    pub async fn report(&self, vm: &str, report: &AgentReport) -> Result<(), kube::Error> {
        report_on(&self.client, &self.namespace, vm, report).await
    }
}

async fn report_on(
    client: &Client,
    namespace: &str,
    vm: &str,
    report: &AgentReport,
) -> Result<(), kube::Error> {
    let api: Api<ProtectedVM> = Api::namespaced(client.clone(), namespace);
    let mut object = ProtectedVM::new(vm, serde_json::from_value(json!({
        "vmName": vm, "nodeName": "-", "hypervisor": {"hyperv": {}}, "disks": [], "policyRef": {"name": "-"}
    })).unwrap_or_else(|e| panic!("{e}")));
    object.metadata.namespace = Some(namespace.to_owned());
    let body = agent_report_apply(&object, report);
    api.patch_status(
        vm,
        &PatchParams::apply(AGENT_FIELD_MANAGER),
        &Patch::Apply(&body),
    )
    .await
    .map(|_| ())
}

struct Worker {
    client: Client,
    namespace: String,
    lease_namespace: String,
    node: String,
    script: Arc<Mutex<Script>>,
    heartbeat: Arc<AtomicBool>,
    claims: Arc<AtomicU64>,
    clock: Arc<dyn Fn() -> std::time::SystemTime + Send + Sync>,
}

impl Worker {
    async fn run(self) {
        let mut ticks = 0u64;
        loop {
            if ticks.is_multiple_of(10) && self.heartbeat.load(Ordering::Relaxed) {
                let _ = self.beat().await;
            }
            ticks += 1;
            let _ = self.work().await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn beat(&self) -> Result<(), kube::Error> {
        let leases: Api<Lease> = Api::namespaced(self.client.clone(), &self.lease_namespace);
        let name = agent_lease_name(&self.node);
        let body = json!({
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": name, "labels": {HEARTBEAT_LABEL: HEARTBEAT_LABEL_VALUE}},
            "spec": {"holderIdentity": self.node, "leaseDurationSeconds": 40,
                     "renewTime": k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(
                         Timestamp::try_from((self.clock)()).unwrap_or_else(|_| Timestamp::now()))}
        });
        leases
            .patch(
                &name,
                &PatchParams::apply(AGENT_FIELD_MANAGER).force(),
                &Patch::Apply(&body),
            )
            .await
            .map(|_| ())
    }

    fn ending(&self, job_type: JobType) -> Ending {
        let mut script = self.script.lock().unwrap_or_else(PoisonError::into_inner);
        script
            .endings
            .get_mut(&job_type)
            .and_then(VecDeque::pop_front)
            .unwrap_or(Ending::Succeed)
    }

    async fn work(&self) -> Result<(), kube::Error> {
        let jobs: Api<ReplicationJob> = Api::namespaced(self.client.clone(), &self.namespace);
        let list = jobs
            .list(&ListParams::default().fields(&format!("spec.nodeName={}", self.node)))
            .await?;
        for job in list
            .items
            .into_iter()
            .filter(|j| is_claimable(j, &self.node))
        {
            let Some(claim) =
                claim_job_patch(&job, &format!("{}/scripted-agent", self.node), &now())
            else {
                continue;
            };
            let status_params = PatchParams {
                field_manager: Some(AGENT_FIELD_MANAGER.into()),
                ..PatchParams::default()
            };
            match jobs
                .patch_status(&job.name_any(), &status_params, &Patch::Merge(&claim))
                .await
            {
                Ok(_) => {
                    self.claims.fetch_add(1, Ordering::Relaxed);
                }
                Err(kube::Error::Api(s)) if s.is_conflict() => continue,
                Err(e) => return Err(e),
            }
            self.run_job(&jobs, &job, &status_params).await?;
        }
        Ok(())
    }

    async fn run_job(
        &self,
        jobs: &Api<ReplicationJob>,
        job: &ReplicationJob,
        params: &PatchParams,
    ) -> Result<(), kube::Error> {
        let name = job.name_any();
        let job_type = job.spec.job_type;
        if job_type == JobType::EnableProtection {
            let copying = json!({"status": {
                "steps": [
                    {"name": "PrerequisitesCheck", "state": StepState::Succeeded},
                    {"name": "CreateReplicaDisks", "state": StepState::Succeeded},
                    {"name": "InitialReplication", "state": StepState::InProgress},
                ],
                "progress": {"percent": 50, "bytesDone": 512, "bytesTotal": 1024},
            }});
            jobs.patch_status(&name, params, &Patch::Merge(&copying))
                .await?;
        }
        let finished = now();
        let body =
            match self.ending(job_type) {
                Ending::Succeed => {
                    let token = job
                        .spec
                        .parameters
                        .request_token
                        .clone()
                        .unwrap_or_default();
                    let result = matches!(job_type, JobType::TestFailover | JobType::Failover)
                        .then(|| FailoverResult {
                            recovery_point: None,
                            disks: vec![MaterialisedDisk {
                                name: "os".into(),
                                location: format!(
                                    "/failover/{}-{token}/os.img",
                                    job.spec.vm_ref.name
                                ),
                            }],
                            verified: true,
                            node: Some(self.node.clone()),
                            ..FailoverResult::default()
                        });
                    json!({"status": {
                        "phase": "Succeeded", "completionTime": finished,
                        "progress": {"percent": 100}, "result": result,
                    }})
                }
                Ending::Fail(class, reason) => json!({"status": {
                    "phase": "Failed", "completionTime": finished,
                    "error": ErrorStatus {
                        class, reason: reason.clone(), message: format!("scripted: {reason}"),
                        retry_count: 0, next_retry_time: None, first_seen_time: None,
                    },
                }}),
            };
        let succeeded = body
            .pointer("/status/phase")
            .is_some_and(|p| p == "Succeeded");
        // A first point after finalize protection or a resync: report it, as the agent would.
        if succeeded
            && matches!(
                job_type,
                JobType::FinalizeProtection | JobType::Resynchronize
            )
        {
            report_on(
                &self.client,
                &self.namespace,
                &job.spec.vm_ref.name,
                &healthy_report(finished),
            )
            .await?;
        }
        jobs.patch_status(&name, params, &Patch::Merge(&body))
            .await
            .map(|_| ())
    }
}
