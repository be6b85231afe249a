//! The test API server fixture does what the end-to-end tests rely on: resourceVersion
//! conflicts, generation, the status subresource, server-side apply ownership, watches that
//! resume, finalizers and owner references.

use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams};
use lifeboat_api::ProtectedVM;
use lifeboat_tests::apiserver::TestApiServer;
use serde_json::json;

fn vm(name: &str) -> ProtectedVM {
    serde_json::from_value(json!({
        "apiVersion": "lifeboat.io/v1alpha1", "kind": "ProtectedVM",
        "metadata": {"name": name},
        "spec": {"vmName": name, "nodeName": "n1", "hypervisor": {"hyperv": {}},
                 "disks": [{"name": "os", "path": "/d"}], "policyRef": {"name": "p"}},
        "status": {"phase": "Protected"}
    }))
    .unwrap_or_else(|e| panic!("{e}"))
}

async fn setup() -> (TestApiServer, Api<ProtectedVM>) {
    let server = TestApiServer::start().await;
    let api = Api::namespaced(server.client("t"), "t");
    (server, api)
}

fn conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.is_conflict())
}

#[tokio::test]
async fn create_sets_metadata_drops_status_and_refuses_a_second_create() {
    let (_server, api) = setup().await;
    let created = api
        .create(&PostParams::default(), &vm("a"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(created.metadata.generation, Some(1));
    assert!(created.metadata.uid.is_some() && created.metadata.creation_timestamp.is_some());
    assert!(
        created.status.is_none(),
        "status is the status subresource's"
    );
    let again = api.create(&PostParams::default(), &vm("a")).await;
    assert!(matches!(again, Err(kube::Error::Api(s)) if s.is_already_exists()));
}

#[tokio::test]
async fn stale_resource_versions_conflict() {
    let (_server, api) = setup().await;
    let created = api
        .create(&PostParams::default(), &vm("a"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut first = created.clone();
    first.spec.node_name = "n2".into();
    api.replace("a", &PostParams::default(), &first)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut stale = created.clone();
    stale.spec.node_name = "n3".into();
    let refused = api.replace("a", &PostParams::default(), &stale).await;
    assert!(refused.as_ref().is_err_and(conflict), "{refused:?}");
    let guarded = json!({"metadata": {"resourceVersion": created.resource_version()}, "status": {"phase": "Disabled"}});
    let refused = api
        .patch_status("a", &PatchParams::default(), &Patch::Merge(&guarded))
        .await;
    assert!(refused.as_ref().is_err_and(conflict));
}

#[tokio::test]
async fn generation_counts_spec_changes_only() {
    let (_server, api) = setup().await;
    api.create(&PostParams::default(), &vm("a"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let spec = api
        .patch(
            "a",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"nodeName": "n2"}})),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(spec.metadata.generation, Some(2));
    let labels = api
        .patch(
            "a",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"x": "y"}}})),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(labels.metadata.generation, Some(2));
    let status = api
        .patch_status(
            "a",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"status": {"phase": "Protected"}, "spec": {"nodeName": "ignored"}}),
            ),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(status.metadata.generation, Some(2));
    assert_eq!(
        status.spec.node_name, "n2",
        "status writes change status only"
    );
    let main = api
        .patch(
            "a",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"phase": "Disabled"}})),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        main.status.map(|s| s.phase),
        Some(lifeboat_api::ProtectionPhase::Protected),
        "the main endpoint ignores status"
    );
}

#[tokio::test]
async fn server_side_apply_keeps_each_managers_fields() {
    let (server, api) = setup().await;
    api.create(&PostParams::default(), &vm("a"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let apply = |manager: &'static str, force: bool| {
        let mut p = PatchParams::apply(manager);
        p.force = force;
        p
    };
    let body = |status: serde_json::Value| json!({"apiVersion": "lifeboat.io/v1alpha1", "kind": "ProtectedVM", "status": status});
    api.patch_status(
        "a",
        &apply("operator", true),
        &Patch::Apply(body(json!({"phase": "Protected", "rpo": "1m"}))),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    api.patch_status(
        "a",
        &apply("agent", false),
        &Patch::Apply(body(json!({"agent": {"pendingLogBytes": 5}}))),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    // The operator stops applying rpo: it goes; the agent's field stays.
    let after = api
        .patch_status(
            "a",
            &apply("operator", true),
            &Patch::Apply(body(json!({"phase": "Protected"}))),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let status = after.status.unwrap_or_default();
    assert_eq!(status.rpo, None);
    assert_eq!(status.agent.map(|a| a.pending_log_bytes), Some(5));
    // The agent may not take the operator's field without force.
    let taken = api
        .patch_status(
            "a",
            &apply("agent", false),
            &Patch::Apply(body(json!({"phase": "Disabled"}))),
        )
        .await;
    assert!(taken.as_ref().is_err_and(conflict), "{taken:?}");
    let object = server.object("protectedvms", "t", "a").unwrap_or_default();
    let managers: Vec<&str> = object["metadata"]["managedFields"]
        .as_array()
        .map(|m| m.iter().filter_map(|e| e["manager"].as_str()).collect())
        .unwrap_or_default();
    assert!(
        managers.contains(&"operator") && managers.contains(&"agent"),
        "{managers:?}"
    );
    assert_eq!(server.writes_by("protectedvms", "status", "operator"), 2);
}

#[tokio::test]
async fn watches_resume_from_a_resource_version() {
    let (_server, api) = setup().await;
    let a = api
        .create(&PostParams::default(), &vm("a"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    api.create(&PostParams::default(), &vm("b"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let from = a.resource_version().unwrap_or_default();
    let stream = api
        .watch(&WatchParams::default().timeout(2), &from)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let names: Vec<String> = stream
        .take(1)
        .try_filter_map(|e| async move {
            Ok(match e {
                WatchEvent::Added(o) | WatchEvent::Modified(o) => Some(o.name_any()),
                _ => None,
            })
        })
        .try_collect()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(names, ["b"], "only what came after");
}

#[tokio::test]
async fn finalizers_hold_deletion_and_owners_cascade() {
    let (server, api) = setup().await;
    let mut held = vm("a");
    held.metadata.finalizers = Some(vec!["x/y".into()]);
    let owner = api
        .create(&PostParams::default(), &held)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut child = vm("b");
    child.metadata.owner_references = Some(vec![
        k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
            api_version: "lifeboat.io/v1alpha1".into(),
            kind: "ProtectedVM".into(),
            name: "a".into(),
            uid: owner.uid().unwrap_or_default(),
            ..Default::default()
        },
    ]);
    api.create(&PostParams::default(), &child)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    api.delete("a", &DeleteParams::default())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let deleting = api.get("a").await.unwrap_or_else(|e| panic!("{e}"));
    assert!(deleting.metadata.deletion_timestamp.is_some());
    assert_eq!(deleting.metadata.generation, Some(2));
    api.patch(
        "a",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"finalizers": []}})),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(
        server.count("protectedvms"),
        0,
        "the owner went, and its dependent with it"
    );
}
