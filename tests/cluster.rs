//! The operator against a real cluster, where one is at hand: run only when `KUBECONFIG` is
//! set (skipped, with a message, elsewhere). It installs the CRDs, runs the operator in this
//! process on a fresh namespace, plays the node agent with the scripted double, and checks a
//! VM through protection, a test failover and deletion; then it deletes the namespace.
//!
//! ```sh
//! KUBECONFIG=~/.kube/config cargo test -p lifeboat-tests --test cluster -- --nocapture
//! ```

use std::time::Duration;

use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use lifeboat_api::{ProtectedVM, ProtectionPhase, ReplicationPolicy};
use lifeboat_operator::{Config, Operator};
use lifeboat_tests::agent::ScriptedAgent;
use lifeboat_tests::eventually;
use serde_json::json;

fn skip() -> bool {
    if std::env::var_os("KUBECONFIG").is_none() {
        eprintln!("skipped: KUBECONFIG is not set; these tests need a real cluster");
        return true;
    }
    false
}

async fn install_crds(client: &Client) -> anyhow::Result<()> {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in lifeboat_api::crds() {
        let name = crd.name_any();
        crds.patch(
            &name,
            &PatchParams::apply("lifeboat-tests").force(),
            &Patch::Apply(&crd),
        )
        .await?;
        eventually(60, &format!("CRD {name} established"), || {
            let crds = crds.clone();
            let name = name.clone();
            async move {
                crds.get(&name).await.ok().filter(|c| {
                    c.status
                        .as_ref()
                        .and_then(|s| s.conditions.as_ref())
                        .is_some_and(|cs| {
                            cs.iter()
                                .any(|c| c.type_ == "Established" && c.status == "True")
                        })
                })
            }
        })
        .await;
    }
    Ok(())
}

#[tokio::test]
async fn a_vm_is_protected_failed_over_in_test_and_disabled_on_a_real_cluster() -> anyhow::Result<()>
{
    if skip() {
        return Ok(());
    }
    lifeboat_operator::install_crypto_provider();
    let client = Client::try_default().await?;
    install_crds(&client).await?;
    let suffix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() % 1_000_000)
        .unwrap_or(0);
    let ns = format!("lifeboat-e2e-{suffix}");
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": ns}}))?,
        )
        .await?;

    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let operator = Operator::new(
        client.clone(),
        Config {
            namespace: Some(ns.clone()),
            lease_namespace: ns.clone(),
            ..Config::default()
        },
    );
    let running = tokio::spawn(operator.run(async move {
        let _ = stopped.await;
    }));
    let agent = ScriptedAgent::start(client.clone(), &ns, &ns, "lifeboat-test-node");

    let policies: Api<ReplicationPolicy> = Api::namespaced(client.clone(), &ns);
    policies
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "apiVersion": "lifeboat.io/v1alpha1", "kind": "ReplicationPolicy",
                "metadata": {"name": "gold"},
                "spec": {"target": {"local": {"path": "/var/lib/lifeboat/replicas", "shared": true}}}
            }))?,
        )
        .await?;
    let vms: Api<ProtectedVM> = Api::namespaced(client.clone(), &ns);
    vms.create(
        &PostParams::default(),
        &serde_json::from_value(json!({
            "apiVersion": "lifeboat.io/v1alpha1", "kind": "ProtectedVM",
            "metadata": {"name": "web"},
            "spec": {"vmName": "web", "nodeName": "lifeboat-test-node",
                     "hypervisor": {"qemu": {"qmpSocket": "/run/web.qmp"}},
                     "disks": [{"name": "os", "path": "/vm/web.qcow2", "blockNode": "os0"}],
                     "policyRef": {"name": "gold"}}
        }))?,
    )
    .await?;
    let phase = |want: ProtectionPhase| {
        let vms = vms.clone();
        async move {
            eventually(60, &format!("web {want:?}"), || {
                let vms = vms.clone();
                async move {
                    vms.get("web")
                        .await
                        .ok()
                        .filter(|vm| vm.status.as_ref().is_some_and(|s| s.phase == want))
                }
            })
            .await
        }
    };
    phase(ProtectionPhase::Protected).await;
    vms.patch(
        "web",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"requests": {"testFailover": {"token": "t1"}}}})),
    )
    .await?;
    eventually(60, "test failover handled", || async {
        vms.get("web").await.ok().filter(|vm| {
            vm.status
                .as_ref()
                .is_some_and(|s| s.handled_requests.test_failover.as_deref() == Some("t1"))
        })
    })
    .await;
    vms.delete("web", &DeleteParams::default()).await?;
    eventually(60, "web deleted", || async {
        matches!(vms.get_opt("web").await, Ok(None)).then_some(())
    })
    .await;
    assert!(agent.claims() >= 4);

    let _ = stop.send(());
    let _ = tokio::time::timeout(Duration::from_secs(10), running).await;
    namespaces.delete(&ns, &DeleteParams::default()).await?;
    Ok(())
}
