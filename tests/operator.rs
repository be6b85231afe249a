//! End to end: the operator's real Controllers against the test API server fixture, with the
//! scripted agent double playing the node agents. Every test starts its own server on a free
//! loopback port, so they run in parallel; each takes well under a few seconds.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use lifeboat_api::common::ErrorClass;
use lifeboat_api::job::{JobPhase, JobType};
use lifeboat_api::{Health, ProtectedVM, ProtectionPhase, ReplicationJob, ReplicationPolicy};
use lifeboat_core::{Clock, ManualClock};
use lifeboat_operator::{Config, Metrics, Operator};
use lifeboat_tests::agent::{Ending, ScriptedAgent, healthy_report};
use lifeboat_tests::apiserver::TestApiServer;
use lifeboat_tests::eventually;
use serde_json::json;

const NS: &str = "e2e";
const LEASES: &str = "lifeboat-system";

/// The server, a client, and an operator running against them.
struct Cluster {
    server: TestApiServer,
    client: Client,
    metrics: Arc<Metrics>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    operator: tokio::task::JoinHandle<lifeboat_operator::Result<()>>,
    clock: Option<ManualClock>,
}

impl Cluster {
    async fn start(clock: Option<ManualClock>) -> Self {
        Self::start_with(clock, |c| c).await
    }

    async fn start_with(
        clock: Option<ManualClock>,
        configure: impl FnOnce(Config) -> Config,
    ) -> Self {
        lifeboat_operator::install_crypto_provider();
        let server = TestApiServer::start().await;
        let client = server.client(NS);
        let (metrics, stop, operator) = run_operator(&client, clock.clone(), configure);
        Self {
            server,
            client,
            metrics,
            stop: Some(stop),
            operator,
            clock,
        }
    }

    fn vms(&self) -> Api<ProtectedVM> {
        Api::namespaced(self.client.clone(), NS)
    }

    fn jobs(&self) -> Api<ReplicationJob> {
        Api::namespaced(self.client.clone(), NS)
    }

    fn policies(&self) -> Api<ReplicationPolicy> {
        Api::namespaced(self.client.clone(), NS)
    }

    fn agent(&self, node: &str) -> ScriptedAgent {
        match self.clock.clone() {
            Some(clock) => ScriptedAgent::start_with_clock(
                self.client.clone(),
                NS,
                LEASES,
                node,
                Arc::new(move || clock.now()),
            ),
            None => ScriptedAgent::start(self.client.clone(), NS, LEASES, node),
        }
    }

    async fn create_policy(&self, frequency: &str) {
        let policy: ReplicationPolicy = serde_json::from_value(json!({
            "apiVersion": "lifeboat.io/v1alpha1", "kind": "ReplicationPolicy",
            "metadata": {"name": "gold"},
            "spec": {"copyFrequency": frequency, "target": {"local": {"path": "/replicas", "shared": true}}}
        }))
        .unwrap_or_else(|e| panic!("{e}"));
        self.policies()
            .create(&PostParams::default(), &policy)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }

    async fn create_vm(&self, name: &str, node: &str) {
        let vm: ProtectedVM = serde_json::from_value(json!({
            "apiVersion": "lifeboat.io/v1alpha1", "kind": "ProtectedVM",
            "metadata": {"name": name},
            "spec": {
                "vmName": name, "nodeName": node,
                "hypervisor": {"qemu": {"qmpSocket": format!("/run/{name}.qmp")}},
                "disks": [{"name": "os", "path": format!("/vm/{name}.qcow2"), "blockNode": "os0"}],
                "policyRef": {"name": "gold"}
            }
        }))
        .unwrap_or_else(|e| panic!("{e}"));
        self.vms()
            .create(&PostParams::default(), &vm)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }

    /// Wait until VM `name` satisfies `check`, and return it.
    async fn vm_until(
        &self,
        name: &str,
        what: &str,
        check: impl Fn(&ProtectedVM) -> bool,
    ) -> ProtectedVM {
        let vms = self.vms();
        let wait = eventually(10, what, || {
            let vms = vms.clone();
            let check = &check;
            async move {
                vms.get_opt(name)
                    .await
                    .ok()
                    .flatten()
                    .filter(|vm| check(vm))
            }
        });
        match tokio::time::timeout(Duration::from_secs(10), wait).await {
            Ok(vm) => vm,
            Err(_) => {
                // Say what there was instead, for whoever reads the failure.
                let vm = self.server.object("protectedvms", NS, name);
                let jobs = self.jobs().list(&ListParams::default()).await.map(|l| {
                    l.items
                        .iter()
                        .map(|j| (j.name_any(), j.status.clone()))
                        .collect::<Vec<_>>()
                });
                panic!("timed out waiting for {what}\nVM: {vm:#?}\njobs: {jobs:#?}");
            }
        }
    }

    async fn phase(&self, name: &str, phase: ProtectionPhase) -> ProtectedVM {
        self.vm_until(name, &format!("{name} {phase:?}"), |vm| {
            vm.status.as_ref().is_some_and(|s| s.phase == phase)
        })
        .await
    }

    async fn request(&self, name: &str, requests: serde_json::Value) {
        self.vms()
            .patch(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"requests": requests}})),
            )
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }

    /// Touch the VM so that the operator looks at it now (its clock may have moved).
    async fn poke(&self, name: &str, n: u32) {
        self.vms()
            .patch(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"annotations": {"test/poke": n.to_string()}}})),
            )
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }

    async fn event_reasons(&self) -> Vec<String> {
        let events: Api<Event> = Api::namespaced(self.client.clone(), NS);
        events
            .list(&ListParams::default())
            .await
            .map(|l| l.items.into_iter().filter_map(|e| e.reason).collect())
            .unwrap_or_default()
    }

    /// Stop the operator (the server stays up).
    async fn halt(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let result = tokio::time::timeout(Duration::from_secs(5), &mut self.operator).await;
        assert!(
            matches!(result, Ok(Ok(Ok(())))),
            "the operator stops cleanly: {result:?}"
        );
    }

    async fn stop(mut self) {
        self.halt().await;
    }
}

fn run_operator(
    client: &Client,
    clock: Option<ManualClock>,
    configure: impl FnOnce(Config) -> Config,
) -> (
    Arc<Metrics>,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<lifeboat_operator::Result<()>>,
) {
    let config = configure(Config {
        namespace: Some(NS.into()),
        lease_namespace: LEASES.into(),
        job_retention: Duration::from_secs(3600),
        ..Config::default()
    });
    let mut operator = Operator::new(client.clone(), config);
    if let Some(clock) = clock {
        operator = operator.with_clock(Arc::new(clock));
    }
    let metrics = operator.metrics();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(operator.run(async move {
        let _ = stopped.await;
    }));
    (metrics, stop, task)
}

fn condition(vm: &ProtectedVM, type_: &str) -> Option<(String, String)> {
    vm.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.clone(), c.reason.clone()))
}

#[tokio::test]
async fn a_vm_goes_through_its_whole_life_cycle() {
    let cluster = Cluster::start(None).await;
    let agent = cluster.agent("node-1");
    cluster.create_policy("5m").await;
    cluster.create_vm("web", "node-1").await;

    let vm = cluster.phase("web", ProtectionPhase::Protected).await;
    assert!(
        vm.finalizers()
            .contains(&"lifeboat.io/disable-protection".to_owned())
    );
    let status = vm.status.clone().unwrap_or_default();
    assert_eq!(status.health, Health::Normal);
    assert!(status.rpo.is_some() && status.next_cycle_time.is_some());
    assert!(status.agent.is_some(), "the agent reported");
    assert_eq!(
        status.recovery_points.count, 1,
        "mirrored from the agent's report"
    );
    assert_eq!(
        condition(&vm, "InitialReplicationComplete"),
        Some(("True".into(), "InitialReplicationComplete".into()))
    );
    assert_eq!(
        condition(&vm, "Replicating"),
        Some(("True".into(), "DeltaReplication".into()))
    );
    let jobs = cluster
        .jobs()
        .list(&ListParams::default())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut names: Vec<(String, Option<JobPhase>)> = jobs
        .items
        .iter()
        .map(|j| (j.name_any(), j.status.as_ref().map(|s| s.phase)))
        .collect();
    names.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        names,
        [
            ("web-enable-1".to_owned(), Some(JobPhase::Succeeded)),
            ("web-finalize-2".to_owned(), Some(JobPhase::Succeeded))
        ]
    );
    let policy = eventually(10, "the policy counts its VM", || async {
        cluster
            .policies()
            .get("gold")
            .await
            .ok()
            .filter(|p| p.status.as_ref().is_some_and(|s| s.protected_vms == 1))
    })
    .await;
    assert!(
        policy
            .finalizers()
            .contains(&"lifeboat.io/policy-in-use".to_owned())
    );

    // A test failover, then its cleanup.
    cluster
        .request("web", json!({"testFailover": {"token": "t1"}}))
        .await;
    let vm = cluster
        .vm_until("web", "test failover done", |vm| {
            vm.status
                .as_ref()
                .is_some_and(|s| s.handled_requests.test_failover.as_deref() == Some("t1"))
        })
        .await;
    assert_eq!(
        condition(&vm, "TestFailoverSucceeded").map(|c| c.0),
        Some("True".into())
    );
    let disks = vm
        .status
        .and_then(|s| s.test_failover)
        .map(|t| t.disks)
        .unwrap_or_default();
    assert_eq!(
        disks.first().map(|d| d.location.as_str()),
        Some("/failover/web-t1/os.img")
    );
    cluster
        .request("web", json!({"cleanupTestFailover": "c1"}))
        .await;
    cluster
        .vm_until("web", "cleanup done", |vm| {
            vm.status.as_ref().is_some_and(|s| {
                s.handled_requests.cleanup_test_failover.as_deref() == Some("c1")
                    && s.test_failover.is_none()
            })
        })
        .await;

    // A planned failover, then commit, asked for together: commit waits for the failover.
    cluster
        .request(
            "web",
            json!({"failover": {"token": "f1", "type": "Planned"}, "commit": "k1"}),
        )
        .await;
    let vm = cluster
        .phase("web", ProtectionPhase::FailoverCommitted)
        .await;
    let status = vm.status.clone().unwrap_or_default();
    assert_eq!(status.handled_requests.failover.as_deref(), Some("f1"));
    assert_eq!(status.handled_requests.commit.as_deref(), Some("k1"));
    assert!(status.failover.is_some_and(|f| f.verified));
    assert_eq!(
        condition(&vm, "FailedOver"),
        Some(("True".into(), "FailoverCommitted".into()))
    );

    // The policy cannot go while the VM uses it.
    cluster
        .policies()
        .delete("gold", &DeleteParams::default())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let policy = eventually(10, "deletion blocked", || async {
        cluster.policies().get("gold").await.ok().filter(|p| {
            p.status.as_ref().is_some_and(|s| {
                s.conditions
                    .iter()
                    .any(|c| c.type_ == "DeletionBlocked" && c.status == "True")
            })
        })
    })
    .await;
    assert!(policy.metadata.deletion_timestamp.is_some());

    // Deleting the VM disables protection on its node, then lets both go.
    cluster
        .vms()
        .delete("web", &DeleteParams::default())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    eventually(10, "the VM is gone", || async {
        matches!(cluster.vms().get_opt("web").await, Ok(None)).then_some(())
    })
    .await;
    eventually(10, "the policy is gone", || async {
        matches!(cluster.policies().get_opt("gold").await, Ok(None)).then_some(())
    })
    .await;
    assert!(
        agent.claims() >= 7,
        "enable, finalize, test failover, cleanup, failover, commit, disable"
    );

    let reasons = cluster.event_reasons().await;
    for reason in [
        "JobCreated",
        "JobStarted",
        "JobSucceeded",
        "DeletionBlocked",
    ] {
        assert!(
            reasons.iter().any(|r| r == reason),
            "{reason} missing from {reasons:?}"
        );
    }
    cluster.stop().await;
}

#[tokio::test]
async fn the_operator_and_the_agent_write_disjoint_fields() {
    let cluster = Cluster::start(None).await;
    let agent = cluster.agent("node-1");
    cluster.create_policy("5m").await;
    cluster.create_vm("web", "node-1").await;
    cluster.phase("web", ProtectionPhase::Protected).await;
    // A later cycle: the agent's report moves, the operator follows with one write.
    let before = cluster
        .server
        .writes_by("protectedvms", "status", "lifeboat-operator");
    let at =
        k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now());
    let mut report = healthy_report(at);
    report.pending_log_bytes = 4096;
    agent
        .report("web", &report)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let vm = cluster
        .vm_until("web", "the operator mirrors the report", |vm| {
            vm.status
                .as_ref()
                .is_some_and(|s| s.pending_log_bytes == 4096)
        })
        .await;
    assert_eq!(
        vm.status.as_ref().map(|s| s.phase),
        Some(ProtectionPhase::Protected),
        "the report removed nothing of the operator's"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after = cluster
        .server
        .writes_by("protectedvms", "status", "lifeboat-operator");
    assert_eq!(after - before, 1, "one operator write for one report");

    let object = cluster
        .server
        .object("protectedvms", NS, "web")
        .unwrap_or_default();
    let managed = object["metadata"]["managedFields"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let fields_of = |manager: &str| -> Vec<String> {
        managed
            .iter()
            .filter(|m| m["manager"] == manager && m["subresource"] == "status")
            .flat_map(|m| {
                m["fieldsV1"]["f:status"]
                    .as_object()
                    .map(|o| o.keys().cloned().collect::<Vec<_>>())
                    .unwrap_or_default()
            })
            .collect()
    };
    assert_eq!(fields_of("lifeboat-agent"), ["f:agent"]);
    let operator = fields_of("lifeboat-operator");
    assert!(
        operator.contains(&"f:phase".to_owned()) && !operator.contains(&"f:agent".to_owned()),
        "{operator:?}"
    );
    cluster.stop().await;
}

#[tokio::test]
async fn two_agents_on_one_node_never_both_claim_a_job() {
    let cluster = Cluster::start(None).await;
    let a = cluster.agent("node-1");
    let b = cluster.agent("node-1");
    cluster.create_policy("5m").await;
    for i in 0..6 {
        cluster.create_vm(&format!("vm{i}"), "node-1").await;
    }
    for i in 0..6 {
        cluster
            .phase(&format!("vm{i}"), ProtectionPhase::Protected)
            .await;
    }
    let jobs = cluster
        .jobs()
        .list(&ListParams::default())
        .await
        .map(|l| l.items.len())
        .unwrap_or(0);
    assert_eq!(jobs, 12);
    assert_eq!(
        a.claims() + b.claims(),
        12,
        "every job claimed exactly once"
    );
    cluster.stop().await;
}

#[tokio::test]
async fn a_policy_change_reaches_every_vm_that_uses_it() {
    let cluster = Cluster::start(None).await;
    let _agent = cluster.agent("node-1");
    cluster.create_policy("5m").await;
    for i in 0..20 {
        cluster.create_vm(&format!("vm{i}"), "node-1").await;
    }
    for i in 0..20 {
        cluster
            .phase(&format!("vm{i}"), ProtectionPhase::Protected)
            .await;
    }
    let generation = cluster
        .policies()
        .patch(
            "gold",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"copyFrequency": "30s", "rpoThresholdMinutes": 5}})),
        )
        .await
        .ok()
        .and_then(|p| p.metadata.generation);
    for i in 0..20 {
        let vm = cluster
            .vm_until(&format!("vm{i}"), "the new policy generation", |vm| {
                vm.status.as_ref().and_then(|s| s.policy_generation) == generation
            })
            .await;
        let status = vm.status.unwrap_or_default();
        let (last, next) = (status.last_successful_cycle_time, status.next_cycle_time);
        let gap = next
            .zip(last)
            .map(|(n, l)| n.0.as_second() - l.0.as_second());
        assert_eq!(gap, Some(30), "the next cycle follows the new frequency");
    }
    cluster.stop().await;
}

fn manual_clock() -> ManualClock {
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    ManualClock::new(SystemTime::UNIX_EPOCH + Duration::from_secs(now))
}

#[tokio::test]
async fn a_failed_job_is_retried_at_the_backoff_and_not_before() {
    let clock = manual_clock();
    let cluster = Cluster::start(Some(clock.clone())).await;
    let agent = cluster.agent("node-1");
    agent.script(
        JobType::EnableProtection,
        Ending::Fail(ErrorClass::Recoverable, "StoreUnreachable".into()),
    );
    cluster.create_policy("5m").await;
    cluster.create_vm("web", "node-1").await;
    let vm = cluster
        .vm_until("web", "the failure taken in", |vm| {
            vm.status
                .as_ref()
                .and_then(|s| s.last_error.as_ref())
                .is_some_and(|e| e.reason == "StoreUnreachable")
        })
        .await;
    let error = vm
        .status
        .and_then(|s| s.last_error)
        .unwrap_or_else(|| panic!("no error"));
    let (first_seen, retry_at) = (
        error.first_seen_time.map(|t| t.0.as_second()).unwrap_or(0),
        error.next_retry_time.map(|t| t.0.as_second()).unwrap_or(0),
    );
    assert_eq!(
        retry_at - first_seen,
        6 * 60,
        "5-minute interval + 1 minute"
    );
    // A minute early: nothing.
    clock.advance(Duration::from_secs(5 * 60));
    cluster.poke("web", 1).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        cluster
            .jobs()
            .get_opt("web-enable-2")
            .await
            .ok()
            .flatten()
            .is_none(),
        "no retry before its time"
    );
    // Due: the second attempt runs, succeeds, and protection goes on. (The agent beats on
    // while time goes by: its next heartbeat is seen at the new time.)
    clock.advance(Duration::from_secs(2 * 60));
    tokio::time::sleep(Duration::from_millis(700)).await;
    cluster.poke("web", 2).await;
    let vm = cluster.phase("web", ProtectionPhase::Protected).await;
    assert!(vm.status.is_some_and(|s| s.last_error.is_none()));
    assert!(
        cluster
            .event_reasons()
            .await
            .iter()
            .any(|r| r == "JobFailed")
    );
    cluster.stop().await;
}

#[tokio::test]
async fn a_non_recoverable_failure_is_critical_until_someone_asks_for_a_retry() {
    let cluster = Cluster::start(None).await;
    let agent = cluster.agent("node-1");
    agent.script(
        JobType::EnableProtection,
        Ending::Fail(ErrorClass::NonRecoverable, "VmNotFound".into()),
    );
    cluster.create_policy("5m").await;
    cluster.create_vm("web", "node-1").await;
    let vm = cluster
        .vm_until("web", "Critical", |vm| {
            vm.status
                .as_ref()
                .is_some_and(|s| s.health == Health::Critical)
        })
        .await;
    assert_eq!(
        vm.status
            .as_ref()
            .and_then(|s| s.health_reason.clone())
            .as_deref(),
        Some("NonRecoverableError")
    );
    assert_eq!(
        condition(&vm, "Protected"),
        Some(("False".into(), "VmNotFound".into()))
    );
    cluster.request("web", json!({"retry": "fixed-it"})).await;
    let vm = cluster.phase("web", ProtectionPhase::Protected).await;
    assert_eq!(vm.status.map(|s| s.health), Some(Health::Normal));
    let reasons = cluster.event_reasons().await;
    assert!(
        reasons.iter().any(|r| r == "HealthCritical")
            && reasons.iter().any(|r| r == "HealthNormal"),
        "{reasons:?}"
    );
    cluster.stop().await;
}

#[tokio::test]
async fn a_quiet_agent_turns_its_vms_warning_then_critical() {
    let clock = manual_clock();
    let cluster = Cluster::start(Some(clock.clone())).await;
    let agent = cluster.agent("node-1");
    cluster.create_policy("5m").await;
    cluster.create_vm("web", "node-1").await;
    cluster.phase("web", ProtectionPhase::Protected).await;
    agent.set_heartbeat(false);
    let heard = clock.now();
    clock.set(heard + Duration::from_secs(11 * 60));
    cluster.poke("web", 1).await;
    let vm = cluster
        .vm_until("web", "AgentQuiet", |vm| {
            vm.status.as_ref().and_then(|s| s.health_reason.as_deref()) == Some("AgentQuiet")
        })
        .await;
    assert_eq!(vm.status.as_ref().map(|s| s.health), Some(Health::Warning));
    assert_eq!(
        condition(&vm, "Replicating"),
        Some(("Unknown".into(), "AgentQuiet".into()))
    );
    clock.set(heard + Duration::from_secs(31 * 60));
    cluster.poke("web", 2).await;
    cluster
        .vm_until("web", "AgentLost", |vm| {
            vm.status.as_ref().is_some_and(|s| {
                s.health == Health::Critical && s.health_reason.as_deref() == Some("AgentLost")
            })
        })
        .await;
    let reasons = cluster.event_reasons().await;
    assert!(
        reasons.iter().any(|r| r == "HealthWarning")
            && reasons.iter().any(|r| r == "HealthCritical")
    );
    cluster.stop().await;
}

#[tokio::test]
async fn finished_jobs_are_deleted_after_their_retention() {
    let cluster = Cluster::start_with(None, |c| Config {
        job_retention: Duration::from_secs(1),
        ..c
    })
    .await;
    let _agent = cluster.agent("node-1");
    cluster.create_policy("5m").await;
    cluster.create_vm("web", "node-1").await;
    cluster.phase("web", ProtectionPhase::Protected).await;
    eventually(10, "the finished jobs are gone", || async {
        (cluster.server.count("replicationjobs") == 0).then_some(())
    })
    .await;
    cluster.stop().await;
}

#[tokio::test]
async fn only_the_leader_reconciles_and_a_standby_takes_over() {
    lifeboat_operator::install_crypto_provider();
    let server = TestApiServer::start().await;
    let client = server.client(NS);
    let elected = |identity: &'static str| {
        move |c: Config| Config {
            leader_election: true,
            identity: identity.into(),
            lease_duration: Duration::from_secs(2),
            ..c
        }
    };
    let (first_metrics, first_stop, first) = run_operator(&client, None, elected("first"));
    eventually(10, "a leader", || async {
        first_metrics
            .encode()
            .ok()
            .filter(|m| m.contains("lifeboat_leader 1"))
    })
    .await;
    let (second_metrics, second_stop, second) = run_operator(&client, None, elected("second"));
    let mut cluster = Cluster {
        server,
        client: client.clone(),
        metrics: Arc::clone(&first_metrics),
        stop: Some(first_stop),
        operator: first,
        clock: None,
    };
    let _agent = cluster.agent("node-1");
    cluster.create_policy("5m").await;
    cluster.create_vm("web", "node-1").await;
    cluster.phase("web", ProtectionPhase::Protected).await;
    assert!(
        second_metrics
            .encode()
            .is_ok_and(|m| m.contains("lifeboat_leader 0")),
        "the standby waits"
    );
    assert!(cluster.metrics.status_writes("ProtectedVM") > 0);
    assert_eq!(
        second_metrics.status_writes("ProtectedVM"),
        0,
        "the standby wrote nothing"
    );
    // The leader goes; the standby leads once the Lease expires.
    cluster.halt().await;
    eventually(10, "the standby leads", || async {
        second_metrics
            .encode()
            .ok()
            .filter(|m| m.contains("lifeboat_leader 1"))
    })
    .await;
    let vms: Api<ProtectedVM> = Api::namespaced(client.clone(), NS);
    let vm: ProtectedVM = serde_json::from_value(json!({
        "apiVersion": "lifeboat.io/v1alpha1", "kind": "ProtectedVM", "metadata": {"name": "db"},
        "spec": {"vmName": "db", "nodeName": "node-1", "hypervisor": {"hyperv": {}},
                 "disks": [{"name": "os", "path": "/d"}], "policyRef": {"name": "gold"}}
    }))
    .unwrap_or_else(|e| panic!("{e}"));
    vms.create(&PostParams::default(), &vm)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    eventually(10, "the new leader protects", || async {
        vms.get_opt("db").await.ok().flatten().filter(|vm| {
            vm.status
                .as_ref()
                .is_some_and(|s| s.phase == ProtectionPhase::Protected)
        })
    })
    .await;
    let _ = second_stop.send(());
    let _ = tokio::time::timeout(Duration::from_secs(5), second).await;
}

#[tokio::test]
async fn metrics_and_health_are_served() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("{e}"));
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    let cluster = Cluster::start_with(None, |c| Config {
        metrics_addr: Some(addr),
        ..c
    })
    .await;
    let _agent = cluster.agent("node-1");
    cluster.create_policy("5m").await;
    cluster.create_vm("web", "node-1").await;
    cluster.phase("web", ProtectionPhase::Protected).await;
    let get = |path: &'static str| async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
        let request = format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await.ok()?;
        Some(answer)
    };
    assert!(
        get("/healthz")
            .await
            .is_some_and(|a| a.starts_with("HTTP/1.1 200"))
    );
    assert!(
        get("/readyz")
            .await
            .is_some_and(|a| a.starts_with("HTTP/1.1 200"))
    );
    let metrics = get("/metrics").await.unwrap_or_default();
    for series in [
        "lifeboat_vm_rpo_seconds{namespace=\"e2e\",vm=\"web\"}",
        "lifeboat_vm_health{namespace=\"e2e\",vm=\"web\",state=\"Normal\"} 1",
        "lifeboat_vm_health{namespace=\"e2e\",vm=\"web\",state=\"Critical\"} 0",
        "lifeboat_vm_cycles_total{namespace=\"e2e\",vm=\"web\",outcome=\"succeeded\"} 100",
        "lifeboat_vm_replicated_bytes_total{namespace=\"e2e\",vm=\"web\"}",
        "lifeboat_vm_resync_required{namespace=\"e2e\",vm=\"web\"} 0",
        "lifeboat_job_duration_seconds_count{type=\"EnableProtection\",outcome=\"succeeded\"} 1",
        "lifeboat_jobs_finished_total{type=\"EnableProtection\",outcome=\"succeeded\"} 1",
        "lifeboat_build_info{version=",
        "lifeboat_jobs_created_total{type=\"FinalizeProtection\"} 1",
    ] {
        assert!(metrics.contains(series), "{series} missing from\n{metrics}");
    }
    cluster.stop().await;
}
