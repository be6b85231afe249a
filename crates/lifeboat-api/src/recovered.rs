//! A recovered VM's definition: a ProtectedVM's `spec.recoveredVm.template` rendered with the
//! disks a (test) failover wrote and the recovery settings (name, network).
//!
//! Templates are MiniJinja (Jinja2 syntax). An undefined value is an error, not an empty
//! string, so that a misspelt disk name (`disk.rot.location`) fails the render with its name
//! instead of writing a definition that points nowhere. [`check`] compiles a template without
//! rendering it: manifests are refused for a template that does not parse.

use std::collections::BTreeMap;

use kube::ResourceExt;
use minijinja::{Environment, UndefinedBehavior};
use serde::Serialize;
use serde_json::Value;

use crate::ProtectedVM;
use crate::protected_vm::FailoverResult;

/// The template's name in errors: the field it comes from.
pub const TEMPLATE_FIELD: &str = "spec.recoveredVm.template";

/// A rendered definition.
#[derive(Clone, Debug, PartialEq)]
pub struct Rendered {
    /// The recovered VM's name.
    pub name: String,
    /// The network it joins, if one is set.
    pub network: Option<String>,
    /// For a test failover (removed at its cleanup).
    pub test: bool,
    /// The rendered text.
    pub text: String,
    /// The text as a Kubernetes object, when it is one (a mapping with `apiVersion`, `kind` and
    /// `metadata.name`): what is applied on a cluster.
    pub object: Option<Value>,
}

/// One disk as a template sees it.
#[derive(Clone, Debug, Serialize)]
struct TemplateDisk {
    name: String,
    location: String,
    /// `qcow2`, `vhd` (an Azure page blob: a fixed VHD) or `raw`.
    format: &'static str,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Context<'a> {
    name: &'a str,
    network: Option<&'a str>,
    namespace: String,
    vm: String,
    vm_name: &'a str,
    action: &'static str,
    test: bool,
    node: &'a str,
    recovery_point: BTreeMap<&'static str, String>,
    disks: Vec<TemplateDisk>,
    disk: BTreeMap<String, TemplateDisk>,
}

/// The format a disk's location says it has.
pub fn disk_format(location: &str) -> &'static str {
    if location.ends_with(".qcow2") {
        "qcow2"
    } else if location.starts_with("https://") || location.starts_with("http://") {
        "vhd"
    } else {
        "raw"
    }
}

/// The recovered VM's name: `spec.recoveredVm.name` or the ProtectedVM's, with `-test` after
/// it for a test failover's.
pub fn recovered_name(vm: &ProtectedVM, test: bool) -> String {
    let base = vm
        .spec
        .recovered_vm
        .as_ref()
        .and_then(|r| r.name.clone())
        .unwrap_or_else(|| vm.name_any());
    if test { format!("{base}-test") } else { base }
}

/// The network the recovered VM joins: a test failover's `testNetwork`, else `network`.
pub fn recovered_network(vm: &ProtectedVM, test: bool) -> Option<String> {
    let spec = vm.spec.recovered_vm.as_ref()?;
    if test {
        spec.test_network.clone().or_else(|| spec.network.clone())
    } else {
        spec.network.clone()
    }
}

fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    env.set_keep_trailing_newline(true);
    env
}

fn describe(error: &minijinja::Error) -> String {
    let mut text = match error.line() {
        Some(line) => format!("{TEMPLATE_FIELD}, line {line}: {}", error.kind()),
        None => format!("{TEMPLATE_FIELD}: {}", error.kind()),
    };
    if let Some(detail) = error.detail() {
        text.push_str(": ");
        text.push_str(detail);
    }
    text
}

/// Whether `template` parses.
///
/// # Errors
///
/// Why not, naming the field and the line.
pub fn check(template: &str) -> Result<(), String> {
    environment()
        .template_from_named_str(TEMPLATE_FIELD, template)
        .map(|_| ())
        .map_err(|e| describe(&e))
}

/// Render the VM's template (an empty text when it has none) for the disks of `result`.
///
/// # Errors
///
/// The template does not parse, or uses a value that is not there (naming it and the line).
pub fn render(vm: &ProtectedVM, result: &FailoverResult, test: bool) -> Result<Rendered, String> {
    let name = recovered_name(vm, test);
    let network = recovered_network(vm, test);
    let disks: Vec<TemplateDisk> = result
        .disks
        .iter()
        .map(|d| TemplateDisk {
            name: d.name.clone(),
            location: d.location.clone(),
            format: disk_format(&d.location),
        })
        .collect();
    let mut recovery_point = BTreeMap::new();
    if let Some(point) = &result.recovery_point {
        recovery_point.insert("name", point.name.clone());
        recovery_point.insert("time", point.time.0.to_string());
    }
    let context = Context {
        name: &name,
        network: network.as_deref(),
        namespace: vm.namespace().unwrap_or_default(),
        vm: vm.name_any(),
        vm_name: &vm.spec.vm_name,
        action: if test { "TestFailover" } else { "Failover" },
        test,
        node: result.node.as_deref().unwrap_or(&vm.spec.node_name),
        recovery_point,
        disk: disks.iter().map(|d| (d.name.clone(), d.clone())).collect(),
        disks,
    };
    let template = vm
        .spec
        .recovered_vm
        .as_ref()
        .and_then(|r| r.template.as_deref())
        .unwrap_or_default();
    let env = environment();
    let text = env
        .template_from_named_str(TEMPLATE_FIELD, template)
        .and_then(|t| t.render(&context))
        .map_err(|e| describe(&e))?;
    Ok(Rendered {
        object: kubernetes_object(&text),
        name,
        network,
        test,
        text,
    })
}

/// `text` as a Kubernetes object, if it is one.
fn kubernetes_object(text: &str) -> Option<Value> {
    let value: Value = serde_saphyr::from_str(text).ok()?;
    let is_text = |pointer: &str| value.pointer(pointer).is_some_and(Value::is_string);
    (is_text("/apiVersion") && is_text("/kind") && is_text("/metadata/name")).then_some(value)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is the test failure report
mod tests {
    use super::*;
    use crate::protected_vm::MaterialisedDisk;

    fn vm(template: &str) -> ProtectedVM {
        let manifest = format!(
            r#"
apiVersion: lifeboat.io/v1alpha1
kind: ProtectedVM
metadata: {{name: web-01, namespace: shop}}
spec:
  vmName: web-01
  nodeName: node-a
  hypervisor: {{qemu: {{qmpSocket: /run/web-01.qmp}}}}
  disks: [{{name: root, path: /vm/root.qcow2, blockNode: root}}, {{name: data, path: /vm/data.qcow2, blockNode: data}}]
  policyRef: {{name: gold}}
  recoveredVm:
    network: prod-net
    testNetwork: isolated-net
    template: {template:?}
"#
        );
        match crate::manifest::parse("vm.yaml", &manifest).unwrap().pop() {
            Some(crate::manifest::Resource::Vm(vm)) => vm,
            other => panic!("not a VM: {other:?}"),
        }
    }

    fn result() -> FailoverResult {
        FailoverResult {
            disks: vec![
                MaterialisedDisk {
                    name: "root".into(),
                    location: "/failover/shop/web-01/t1/root.qcow2".into(),
                },
                MaterialisedDisk {
                    name: "data".into(),
                    location: "/failover/shop/web-01/t1/data.img".into(),
                },
            ],
            node: Some("node-b".into()),
            ..FailoverResult::default()
        }
    }

    #[test]
    fn a_kubevirt_template_renders_to_an_object_that_names_the_disks() {
        let template = "apiVersion: kubevirt.io/v1\nkind: VirtualMachine\nmetadata:\n  name: {{ name }}\nspec:\n  template:\n    spec:\n      networks: [{name: net, multus: {networkName: {{ network }}}}]\n      volumes:\n{% for d in disks %}      - name: {{ d.name }}\n        hostDisk: {path: {{ d.location }}, type: Disk}\n{% endfor %}";
        let rendered = render(&vm(template), &result(), true).unwrap();
        assert_eq!(rendered.name, "web-01-test");
        assert_eq!(rendered.network.as_deref(), Some("isolated-net"));
        let object = rendered.object.unwrap();
        assert_eq!(object["metadata"]["name"], "web-01-test");
        assert_eq!(
            object["spec"]["template"]["spec"]["networks"][0]["multus"]["networkName"],
            "isolated-net"
        );
        let volumes = &object["spec"]["template"]["spec"]["volumes"];
        assert_eq!(
            volumes[0]["hostDisk"]["path"],
            "/failover/shop/web-01/t1/root.qcow2"
        );
        assert_eq!(
            volumes[1]["hostDisk"]["path"],
            "/failover/shop/web-01/t1/data.img"
        );
    }

    #[test]
    fn a_domain_xml_is_text_with_each_disk_by_name_and_format() {
        let template = "<domain><name>{{ name }}</name><source network='{{ network }}'/>\
            <disk><driver type='{{ disk.root.format }}'/><source file='{{ disk.root.location }}'/></disk>\
            <disk><driver type='{{ disk.data.format }}'/><source file='{{ disk.data.location }}'/></disk>\
            <!-- {{ action }} on {{ node }} --></domain>";
        let rendered = render(&vm(template), &result(), false).unwrap();
        assert!(rendered.object.is_none());
        assert_eq!(
            rendered.text,
            "<domain><name>web-01</name><source network='prod-net'/>\
            <disk><driver type='qcow2'/><source file='/failover/shop/web-01/t1/root.qcow2'/></disk>\
            <disk><driver type='raw'/><source file='/failover/shop/web-01/t1/data.img'/></disk>\
            <!-- Failover on node-b --></domain>"
        );
    }

    #[test]
    fn a_misspelt_disk_fails_the_render_naming_the_field_and_the_line() {
        let error = render(&vm("a\n{{ disk.rot.location }}"), &result(), false).unwrap_err();
        assert!(
            error.starts_with("spec.recoveredVm.template, line 2: "),
            "{error}"
        );
        assert!(error.contains("undefined"), "{error}");
    }

    #[test]
    fn a_template_that_does_not_parse_is_refused_with_the_manifest() {
        assert!(check("{{ name }}").is_ok());
        let error = check("ok\n{% for d in disks %}").unwrap_err();
        assert!(
            error.starts_with("spec.recoveredVm.template, line 2: "),
            "{error}"
        );
        let manifest = "apiVersion: lifeboat.io/v1alpha1\nkind: ProtectedVM\nmetadata: {name: a}\nspec:\n  vmName: a\n  nodeName: node-a\n  hypervisor: {qemu: {qmpSocket: /q}}\n  disks: [{name: root, path: /r, blockNode: root}]\n  policyRef: {name: p}\n  recoveredVm: {template: \"{{ name \"}\n";
        let refused = crate::manifest::parse("a.yaml", manifest).unwrap_err();
        assert!(
            refused
                .problems()
                .iter()
                .any(|p| p.starts_with("spec.recoveredVm.template, line 1")),
            "{refused}"
        );
    }
}
