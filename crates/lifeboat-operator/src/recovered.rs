//! Recovered VMs on a cluster: [`lifeboat_control::recovery`] over the Kubernetes API. A
//! rendered definition that is a Kubernetes object (a KubeVirt VirtualMachine, ...) is applied
//! in the ProtectedVM's namespace by server-side apply; any other text (a libvirt domain) is
//! kept in a ConfigMap of the recovered VM's name, key `definition`, where a hook's Job can
//! mount it. A test failover's object is owned by the ProtectedVM (and so goes with it); the
//! hook is a Job owned by the ProtectedVM.
//!
//! The object's resource is its kind in lower case and plural (`VirtualMachine` →
//! `virtualmachines`), as `kubectl` names all but a few irregular kinds; it must be
//! namespaced, and the operator needs the rights to it (the chart's `recoveredVmKinds`).

use async_trait::async_trait;
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::{Client, Resource, ResourceExt};
use lifeboat_api::ProtectedVM;
use lifeboat_api::contract::{LABEL_VM, OPERATOR_FIELD_MANAGER, is_label_value};
use lifeboat_api::plan::PlanHook;
use lifeboat_api::protected_vm::FailoverResult;
use lifeboat_api::recovered::Rendered;
use lifeboat_control::recovery::RecoveryDriver;
use serde_json::{Value, json};

use crate::hook::{self, HookJob};

/// The key of a ConfigMap that holds a definition that is not a Kubernetes object.
pub const DEFINITION_KEY: &str = "definition";

/// The cluster's [`RecoveryDriver`].
#[derive(Clone)]
pub struct KubeRecovery {
    /// The client.
    pub client: Client,
}

impl std::fmt::Debug for KubeRecovery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeRecovery").finish_non_exhaustive()
    }
}

/// What is applied for `rendered`: its object, or a ConfigMap holding its text, in the VM's
/// namespace, labelled with the VM, owned by it for a test failover.
///
/// # Errors
///
/// The object names another namespace.
pub fn placed_object(vm: &ProtectedVM, rendered: &Rendered) -> Result<Value, String> {
    let namespace = vm.namespace().unwrap_or_default();
    let mut object = rendered.object.clone().unwrap_or_else(|| {
        json!({
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": rendered.name},
            "data": {DEFINITION_KEY: rendered.text},
        })
    });
    let Some(metadata) = object.get_mut("metadata").and_then(Value::as_object_mut) else {
        return Err("the rendered object has no metadata".into());
    };
    match metadata.get("namespace").and_then(Value::as_str) {
        Some(other) if other != namespace => {
            return Err(format!(
                "the rendered object names namespace {other:?}: a recovered VM goes in its ProtectedVM's, {namespace:?}"
            ));
        }
        _ => {
            metadata.insert("namespace".into(), json!(namespace));
        }
    }
    let labels = metadata.entry("labels").or_insert(json!({}));
    if let Some(labels) = labels.as_object_mut() {
        let name = vm.name_any();
        if is_label_value(&name) {
            labels.insert(LABEL_VM.into(), json!(name));
        }
        labels.insert("app.kubernetes.io/managed-by".into(), json!("lifeboat"));
    }
    if rendered.test
        && let Some(owner) = vm.owner_ref(&())
    {
        metadata.insert("ownerReferences".into(), json!([owner]));
    }
    Ok(object)
}

/// `<apiVersion> <kind> <namespace>/<name>`, as status says where a definition went.
fn definition_of(object: &Value) -> Option<String> {
    let text = |pointer: &str| object.pointer(pointer).and_then(Value::as_str);
    Some(format!(
        "{} {} {}/{}",
        text("/apiVersion")?,
        text("/kind")?,
        text("/metadata/namespace")?,
        text("/metadata/name")?
    ))
}

/// The API of the objects of `api_version` and `kind` in `namespace`, and the name in
/// `definition` (as [`definition_of`] wrote it).
fn api_of(client: &Client, definition: &str) -> Option<(Api<DynamicObject>, String)> {
    let mut words = definition.split(' ');
    let (api_version, kind, at) = (words.next()?, words.next()?, words.next()?);
    let (namespace, name) = at.split_once('/')?;
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    let resource = ApiResource::from_gvk(&GroupVersionKind::gvk(group, version, kind));
    Some((
        Api::namespaced_with(client.clone(), namespace, &resource),
        name.to_owned(),
    ))
}

#[async_trait]
impl RecoveryDriver for KubeRecovery {
    async fn place(
        &self,
        vm: &ProtectedVM,
        _result: &FailoverResult,
        rendered: &Rendered,
    ) -> Result<String, String> {
        let object = placed_object(vm, rendered)?;
        let definition = definition_of(&object)
            .ok_or("the rendered object has no apiVersion, kind or metadata.name")?;
        let (api, name) = api_of(&self.client, &definition)
            .ok_or_else(|| format!("cannot address {definition}"))?;
        let params = PatchParams::apply(OPERATOR_FIELD_MANAGER).force();
        api.patch(&name, &params, &Patch::Apply(&object))
            .await
            .map_err(|e| format!("apply {definition}: {e}"))?;
        Ok(definition)
    }

    async fn remove(&self, _vm: &ProtectedVM, definition: &str) -> Result<(), String> {
        let (api, name) = api_of(&self.client, definition)
            .ok_or_else(|| format!("cannot address {definition}"))?;
        match api.delete(&name, &DeleteParams::background()).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
            Err(e) => Err(format!("delete {definition}: {e}")),
        }
    }

    async fn hook(
        &self,
        vm: &ProtectedVM,
        hook: &PlanHook,
        env: &[(String, String)],
    ) -> Result<(), String> {
        let value = |key: &str| hook::env_value(env, key);
        let name = vm.name_any();
        let at = HookJob {
            namespace: vm.namespace().unwrap_or_default(),
            name: hook::job_name(
                &name,
                (
                    value("LIFEBOAT_TOKEN"),
                    value("LIFEBOAT_ACTION"),
                    "recoveredVm",
                    &hook.name,
                ),
            ),
            owner: vm
                .controller_owner_ref(&())
                .ok_or("the ProtectedVM has no uid")?,
            labels: if is_label_value(&name) {
                [(LABEL_VM.to_owned(), name)].into()
            } else {
                Default::default()
            },
        };
        hook::run(&self.client, &at, hook, env).await
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is the test failure report
mod tests {
    use super::*;

    fn vm() -> ProtectedVM {
        let mut vm = ProtectedVM::new(
            "db-01",
            serde_json::from_value(json!({
                "vmName": "db-01", "nodeName": "n",
                "hypervisor": {"qemu": {"qmpSocket": "/q"}},
                "disks": [{"name": "root", "path": "/r", "blockNode": "root"}],
                "policyRef": {"name": "p"}
            }))
            .unwrap(),
        );
        vm.metadata.namespace = Some("shop".into());
        vm.metadata.uid = Some("u-1".into());
        vm
    }

    fn rendered(object: Option<Value>, test: bool) -> Rendered {
        Rendered {
            name: "db-01-test".into(),
            network: None,
            test,
            text: "<domain/>".into(),
            object,
        }
    }

    #[test]
    fn text_goes_in_a_config_map_owned_by_the_vm_for_a_test_failover() {
        let object = placed_object(&vm(), &rendered(None, true)).unwrap();
        assert_eq!(object["kind"], "ConfigMap");
        assert_eq!(object["data"][DEFINITION_KEY], "<domain/>");
        assert_eq!(object["metadata"]["namespace"], "shop");
        assert_eq!(object["metadata"]["labels"][LABEL_VM], "db-01");
        assert_eq!(object["metadata"]["ownerReferences"][0]["uid"], "u-1");
        assert_eq!(
            definition_of(&object).as_deref(),
            Some("v1 ConfigMap shop/db-01-test")
        );
        // A failover's outlives the ProtectedVM.
        let kept = placed_object(&vm(), &rendered(None, false)).unwrap();
        assert!(kept["metadata"].get("ownerReferences").is_none());
    }

    #[test]
    fn an_object_stays_in_the_vms_namespace() {
        let object = json!({"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
                            "metadata": {"name": "db-01-test", "namespace": "other"}});
        let refused = placed_object(&vm(), &rendered(Some(object), true)).unwrap_err();
        assert!(refused.contains("\"other\""), "{refused}");
        let object = json!({"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
                            "metadata": {"name": "db-01-test"}});
        let placed = placed_object(&vm(), &rendered(Some(object), true)).unwrap();
        assert_eq!(
            definition_of(&placed).as_deref(),
            Some("kubevirt.io/v1 VirtualMachine shop/db-01-test")
        );
    }
}
