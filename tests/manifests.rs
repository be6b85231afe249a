//! The manifests people apply: every example validates against the generated CRD schemas, and
//! every deliberately broken manifest under `tests/manifests/broken/` is rejected with a message
//! that names the file and the bad field. Each broken file says what it expects in
//! `# expect: ...` lines at its top.

use lifeboat_api::manifest::{self, Resource};
use lifeboat_api::{ProtectedVM, ReplicationPolicy};
use lifeboat_tests::{workspace_root, yaml_files};
use serde_json::{Value, json};

fn read(path: &std::path::Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

#[test]
fn every_example_validates() {
    let files = yaml_files("examples");
    assert!(
        files.len() >= 4,
        "expected the four kinds of example, found {files:?}"
    );
    let mut kinds = Vec::new();
    for path in &files {
        let resources = manifest::parse(&path.display().to_string(), &read(path))
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(
            !resources.is_empty(),
            "{} holds no resource",
            path.display()
        );
        kinds.extend(resources.iter().map(Resource::kind));
    }
    assert!(kinds.contains(&"ReplicationPolicy") && kinds.contains(&"ProtectedVM"));
}

#[test]
fn examples_cover_both_targets_and_both_hypervisors() {
    let mut local = false;
    let mut azure_secret = false;
    let mut qemu = false;
    let mut hyperv = false;
    for path in yaml_files("examples") {
        for resource in manifest::parse("example", &read(&path)).unwrap_or_else(|e| panic!("{e}")) {
            match resource {
                Resource::Policy(p) => {
                    local |= p.spec.target.local.is_some();
                    azure_secret |= p
                        .spec
                        .target
                        .azure_blob
                        .as_ref()
                        .is_some_and(|a| a.credentials.account_key_secret_ref.is_some());
                }
                Resource::Vm(vm) => {
                    qemu |= vm.spec.hypervisor.qemu.is_some();
                    hyperv |= vm.spec.hypervisor.hyperv.is_some();
                }
                Resource::Job(_) | Resource::Plan(_) => {}
            }
        }
    }
    assert!(
        local && azure_secret && qemu && hyperv,
        "local {local}, azure+secret {azure_secret}, qemu {qemu}, hyperv {hyperv}"
    );
}

#[test]
fn schema_defaults_fill_what_a_manifest_leaves_out() {
    let text = "apiVersion: lifeboat.io/v1alpha1\nkind: ReplicationPolicy\nmetadata: {name: p}\nspec:\n  target: {local: {path: /r}}\n";
    let resources = manifest::parse("inline", text).unwrap_or_else(|e| panic!("{e}"));
    let Some(Resource::Policy(policy)) = resources.first() else {
        panic!("expected a policy, got {resources:?}")
    };
    assert_eq!(
        policy.spec.copy_frequency,
        lifeboat_api::CopyFrequency::Minutes5
    );
    assert_eq!(policy.spec.recovery_point_retention_hours, 24);
    assert_eq!(policy.spec.upload_concurrency, 4);
    assert_eq!(policy.spec.resync.log_size_threshold_percent, 50);
    assert_eq!(policy.spec.resync.block_size_bytes, 65536);
}

#[test]
fn every_broken_manifest_is_rejected_naming_file_and_field() {
    let files = yaml_files("tests/manifests/broken");
    assert!(
        files.len() >= 10,
        "expected the broken manifests, found {}",
        files.len()
    );
    for path in files {
        let text = read(&path);
        let expected: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# expect: "))
            .collect();
        assert!(
            !expected.is_empty(),
            "{} has no `# expect:` line",
            path.display()
        );
        let source = path
            .strip_prefix(workspace_root())
            .unwrap_or(&path)
            .display()
            .to_string();
        match manifest::parse(&source, &text) {
            Ok(resources) => panic!("{source} was accepted: {resources:?}"),
            Err(error) => {
                let message = error.to_string();
                assert!(
                    message.starts_with(&source),
                    "the message does not name the file: {message}"
                );
                for want in expected {
                    assert!(
                        message.contains(want),
                        "{source}: expected {want:?} in:\n{message}"
                    );
                }
            }
        }
    }
}

fn example(file: &str) -> Value {
    let path = workspace_root().join("examples").join(file);
    let docs: Vec<Value> =
        serde_saphyr::from_multiple(&read(&path)).unwrap_or_else(|e| panic!("{e}"));
    docs.into_iter().next().unwrap_or(Value::Null)
}

fn update_problems(old: &Value, new: &Value) -> Vec<String> {
    match manifest::check_update("update", 1, old, new) {
        Ok(_) => Vec::new(),
        Err(e) => e.problems().to_vec(),
    }
}

#[test]
fn immutable_fields_cannot_change_on_update() {
    let policy = example("policy-azure-blob.yaml");
    assert_eq!(update_problems(&policy, &policy), Vec::<String>::new());

    let mut moved = policy.clone();
    moved["spec"]["target"]["azureBlob"]["container"] = json!("elsewhere");
    assert_eq!(
        update_problems(&policy, &moved),
        ["spec.target.azureBlob.container: container is immutable"]
    );

    let mut to_local = policy.clone();
    to_local["spec"]["target"] = json!({"local": {"path": "/r"}});
    let problems = update_problems(&policy, &to_local);
    assert!(
        problems
            .iter()
            .any(|p| p.contains("the kind of target cannot change")),
        "{problems:?}"
    );

    // A mutable field may change.
    let mut faster = policy.clone();
    faster["spec"]["copyFrequency"] = json!("5m");
    assert_eq!(update_problems(&policy, &faster), Vec::<String>::new());

    let vm = example("protectedvm-qemu.yaml");
    let mut repathed = vm.clone();
    repathed["spec"]["disks"][0]["path"] = json!("/elsewhere.qcow2");
    assert_eq!(
        update_problems(&vm, &repathed),
        ["spec.disks[0].path: a disk's path is immutable: add a new disk instead"]
    );
    let mut renamed = vm.clone();
    renamed["spec"]["vmName"] = json!("web-02");
    assert_eq!(
        update_problems(&vm, &renamed),
        ["spec.vmName: vmName is immutable"]
    );

    // Adding a disk is an ordinary change; the recovery site must name it too.
    let mut grown = vm.clone();
    if let Some(disks) = grown["spec"]["disks"].as_array_mut() {
        disks.push(
            json!({"name": "logs", "path": "/images/logs.qcow2", "blockNode": "libvirt-4-format"}),
        );
    }
    assert_eq!(
        update_problems(&vm, &grown),
        ["spec: spec.recoverySite.disks must name every protected disk of spec.disks"]
    );
    if let Some(disks) = grown["spec"]["recoverySite"]["disks"].as_array_mut() {
        disks
            .push(json!({"name": "logs", "path": "/srv/failover/logs.qcow2", "blockNode": "logs"}));
    }
    assert_eq!(update_problems(&vm, &grown), Vec::<String>::new());
}

#[test]
fn a_job_spec_never_changes() {
    let job = json!({
        "apiVersion": "lifeboat.io/v1alpha1", "kind": "ReplicationJob",
        "metadata": {"name": "web-01-resync-1"},
        "spec": {"vmRef": {"name": "web-01"}, "nodeName": "kvm-node-3", "type": "Resynchronize",
                 "parameters": {"resyncReason": "Requested", "requestToken": "t1"}}
    });
    assert_eq!(update_problems(&job, &job), Vec::<String>::new());
    let mut other = job.clone();
    other["spec"]["type"] = json!("Failover");
    assert_eq!(
        update_problems(&job, &other),
        ["spec: a job's spec is immutable"]
    );
}

#[test]
fn the_generated_crds_carry_what_kubectl_shows() {
    use kube::CustomResourceExt;
    let pvm = ProtectedVM::crd();
    assert_eq!(
        pvm.spec.names.short_names.as_deref(),
        Some(&["pvm".to_owned()][..])
    );
    assert_eq!(
        pvm.spec.names.categories.as_deref(),
        Some(&["lifeboat".to_owned()][..])
    );
    let version = &pvm.spec.versions[0];
    assert!(
        version
            .subresources
            .as_ref()
            .is_some_and(|s| s.status.is_some())
    );
    let columns: Vec<&str> = version
        .additional_printer_columns
        .iter()
        .flatten()
        .filter(|c| c.priority.unwrap_or(0) == 0)
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(columns, ["Phase", "Health", "RPO", "Last Sync", "Age"]);
    assert_eq!(
        ReplicationPolicy::crd().spec.names.short_names.as_deref(),
        Some(&["rpol".to_owned()][..])
    );
    assert_eq!(
        lifeboat_api::ReplicationJob::crd()
            .spec
            .names
            .short_names
            .as_deref(),
        Some(&["rjob".to_owned()][..])
    );
}
