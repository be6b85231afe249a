//! `ProtectedVM` (short name `pvm`): one virtual machine under protection.
//!
//! The spec names the VM, the node that hosts it, how to reach its hypervisor, its disks and
//! its policy, and carries requests (resync, test failover, failover, commit, cleanup) as
//! tokens: a new token value asks for the action once, and `status.handledRequests` echoes the
//! token back when the action was handled.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{ErrorStatus, Health, RecoveryPointSelector, RequestToken};
use crate::job::{JobParameters, JobPhase, JobType, ResyncReason};
use crate::policy::PolicyReference;

/// The desired state of a protected VM.
// NB: each `printcolumn(...)` repeats the same keys, which clippy takes for duplicates.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[kube(
    group = "lifeboat.io",
    version = "v1alpha1",
    kind = "ProtectedVM",
    plural = "protectedvms",
    namespaced,
    status = "ProtectedVMStatus",
    shortname = "pvm",
    category = "lifeboat",
    derive = "PartialEq",
    cel,
    doc = "A virtual machine whose disks Lifeboat replicates, with its recovery points and failover state.",
    selectable = ".spec.nodeName",
    selectable = ".spec.recoverySite.nodeName",
    printcolumn(
        name = "Phase",
        type_ = "string",
        json_path = ".status.phase",
        description = "Where the VM is in its protection life cycle"
    ),
    printcolumn(
        name = "Health",
        type_ = "string",
        json_path = ".status.health",
        description = "Normal, Warning or Critical"
    ),
    printcolumn(
        name = "Direction",
        type_ = "string",
        json_path = ".status.direction",
        priority = 1,
        description = "Forward (from the primary site) or Reverse (from the recovery site)"
    ),
    printcolumn(
        name = "In Step",
        type_ = "date",
        json_path = ".status.originalDisksInStepTime",
        priority = 1,
        description = "Replicating in reverse: the age of the point the original disks hold"
    ),
    printcolumn(
        name = "RPO",
        type_ = "string",
        json_path = ".status.rpo",
        description = "Age of the latest durable recovery point"
    ),
    printcolumn(
        name = "Last Sync",
        type_ = "date",
        json_path = ".status.lastSuccessfulCycleTime",
        description = "When the last replication cycle succeeded"
    ),
    printcolumn(
        name = "Reason",
        type_ = "string",
        json_path = ".status.healthReason",
        priority = 1,
        description = "Why the health is what it is"
    ),
    printcolumn(
        name = "Node",
        type_ = "string",
        json_path = ".spec.nodeName",
        priority = 1,
        description = "The node that hosts the VM"
    ),
    printcolumn(
        name = "Policy",
        type_ = "string",
        json_path = ".spec.policyRef.name",
        priority = 1,
        description = "The ReplicationPolicy in use"
    ),
    printcolumn(
        name = "Pending",
        type_ = "integer",
        json_path = ".status.pendingLogBytes",
        priority = 1,
        description = "Bytes of change logs awaiting shipment"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "!has(self.hypervisor.qemu) || self.disks.all(d, has(d.blockNode))",
     "message": "every disk of a qemu VM needs a blockNode (the QEMU block node name)"},
    {"rule": "self.disks.exists(d, !has(d.excluded) || !d.excluded)",
     "message": "at least one disk must not be excluded"},
    {"rule": "!has(self.recoverySite) || self.disks.all(d, (has(d.excluded) && d.excluded) || self.recoverySite.disks.exists(r, r.name == d.name))",
     "message": "spec.recoverySite.disks must name every protected disk of spec.disks"}
]))]
pub struct ProtectedVMSpec {
    /// The VM's name on its hypervisor.
    #[schemars(length(min = 1, max = 253))]
    #[schemars(extend("x-kubernetes-validations" = [
        {"rule": "self == oldSelf", "message": "vmName is immutable"}
    ]))]
    pub vm_name: String,
    /// The node that hosts the VM; the agent on that node does the work.
    #[schemars(length(min = 1, max = 253))]
    pub node_name: String,
    /// How to reach the hypervisor: exactly one backend.
    pub hypervisor: HypervisorSpec,
    /// The VM's disks. Disks are identified by name; a disk's path and block node cannot
    /// change once set.
    #[schemars(length(min = 1, max = 64))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub disks: Vec<DiskSpec>,
    /// The ReplicationPolicy (same namespace).
    pub policy_ref: PolicyReference,
    /// Enabled to protect the VM, Disabled to stop protecting it.
    #[serde(default)]
    pub protection: ProtectionState,
    /// When disabling protection, also delete the replica and its recovery points.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub delete_replica_on_disable: bool,
    /// Nodes whose agents may run the VM's store-only jobs (unplanned failover, test
    /// failover, and the commit and cleanup that follow them) when the agent of `nodeName` is
    /// lost, in order of preference. Recovery needs the replica store only: pick nodes outside
    /// the VM's failure domain. Tried before `recoveryNodeSelector` and the policy's.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub recovery_node_names: Vec<String>,
    /// Labels a recovery node must all carry (a `matchLabels`, e.g.
    /// `topology.kubernetes.io/zone: b`): the matching nodes, by name, come after
    /// `recoveryNodeNames`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 16))]
    pub recovery_node_selector: BTreeMap<String, String>,
    /// Where the VM runs after a failover (the recovered VM, started on the failover's disks):
    /// what re-protect replicates from, back into the same replica, and what a failback stops.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovery_site: Option<RecoverySiteSpec>,
    /// The VM a failover or a test failover brings up on the disks it wrote: its definition,
    /// rendered from a template, and a hook that gets the disks' locations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovered_vm: Option<RecoveredVmSpec>,
    /// Actions asked for by setting a new token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests: Option<Requests>,
}

/// The recovered VM at the recovery site: its node, how to reach its hypervisor and its disks,
/// named as the protected VM's are (a disk of the recovered VM replicates into the replica of
/// the disk of the same name).
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "!has(self.hypervisor.qemu) || self.disks.all(d, has(d.blockNode))",
     "message": "every disk of a qemu VM needs a blockNode (the QEMU block node name)"},
    {"rule": "!has(self.diskFormat) || self.diskFormat != 'qcow2' || has(self.hypervisor.qemu)",
     "message": "diskFormat qcow2 is for a recovery site whose hypervisor is qemu"}
]))]
pub struct RecoverySiteSpec {
    /// The node the recovered VM runs on; its agent replicates it in reverse.
    #[schemars(length(min = 1, max = 253))]
    pub node_name: String,
    /// The recovered VM's name on its hypervisor. Absent: `vmName`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub vm_name: Option<String>,
    /// How to reach the recovered VM's hypervisor: exactly one backend.
    pub hypervisor: HypervisorSpec,
    /// The recovered VM's disks (typically the failover's images), by the protected disks'
    /// names.
    #[schemars(length(min = 1, max = 64))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub disks: Vec<RecoverySiteDisk>,
    /// The format a failover writes the recovered VM's disks in. `raw` (the default): any
    /// hypervisor boots it (Hyper-V and Azure as a fixed VHD's data). `qcow2` (qemu only): each
    /// disk also carries a persistent dirty bitmap of the recovered VM's writes since the point,
    /// so that re-protect sends those blocks without reading the rest of the disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_format: Option<RecoveryDiskFormat>,
}

/// The VM a (test) failover brings up on the disks it wrote.
///
/// After the disks are written and verified, the `template` is rendered with the disks'
/// locations and the settings below, and placed: on a cluster, applied as the Kubernetes
/// object it describes (a KubeVirt VirtualMachine, ...; the operator needs the rights to
/// create it, see the chart's `recoveredVmKinds`); standalone, and on a cluster when it is not
/// a Kubernetes object (a libvirt domain XML), written as a file beside the disks. Then the
/// `hook` runs, with the environment of a plan's hook for this one VM (`LIFEBOAT_VMS`,
/// `LIFEBOAT_DISKS_<VM>`, `LIFEBOAT_DISK_<VM>_<DISK>`, `LIFEBOAT_ACTION`, ...) and
/// `LIFEBOAT_RECOVERED_NAME`, `LIFEBOAT_NETWORK`, `LIFEBOAT_DEFINITION` (where the rendered
/// template went). At the cleanup of a test failover, the hook runs again
/// (`LIFEBOAT_ACTION=CleanupTestFailover`) and the rendered definition is removed, before the
/// disks are.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "has(self.template) || has(self.hook)",
     "message": "a recoveredVm needs a template, a hook, or both"}
]))]
pub struct RecoveredVmSpec {
    /// The recovered VM's name (a Kubernetes object's, a domain's). Absent: the ProtectedVM's
    /// name; a test failover's gets `-test` after it, as Azure Site Recovery's does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 58))]
    pub name: Option<String>,
    /// The network the recovered VM joins after a failover (a Multus network attachment, a
    /// libvirt network, a bridge: the template says how it is used).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub network: Option<String>,
    /// The network of a test failover's VM: an isolated one, so that it cannot reach the
    /// production VM's peers. Absent: `network`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub test_network: Option<String>,
    /// The recovered VM's definition as a MiniJinja (Jinja2) template. It sees `name`,
    /// `network`, `namespace`, `vm` (the ProtectedVM's name), `vmName` (its name on the
    /// hypervisor), `action` (`Failover` or
    /// `TestFailover`), `test` (true for a test failover), `node` (where the disks are),
    /// `recoveryPoint` (`name`, `time`), `disks` (a list of `name`, `location`, `format`) and
    /// `disk` (the same, by disk name: `disk.root.location`). A value it uses that is not
    /// there fails the render, naming it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 65536))]
    pub template: Option<String>,
    /// Run after the template is placed, and again before its definition is removed (at the
    /// cleanup of a test failover, `LIFEBOAT_ACTION=CleanupTestFailover`, and at a failback,
    /// `Failback`); a failed hook is reported in status, the disks stay.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hook: Option<crate::plan::PlanHook>,
}

/// The format of the disks a failover writes.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum RecoveryDiskFormat {
    /// Raw images, sparse.
    #[default]
    Raw,
    /// qcow2 v3 images with a seed bitmap (QEMU/KVM).
    Qcow2,
}

/// One disk of the recovered VM.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RecoverySiteDisk {
    /// The protected disk it recovers (a name in `spec.disks`).
    #[schemars(
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"),
        length(min = 1, max = 63)
    )]
    pub name: String,
    /// The disk image on the recovery node.
    #[schemars(length(min = 1, max = 4096))]
    pub path: String,
    /// The QEMU block node name of the disk (qemu only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        regex(pattern = r"^[A-Za-z][A-Za-z0-9_.+-]*$"),
        length(min = 1, max = 127)
    )]
    pub block_node: Option<String>,
}

impl ProtectedVM {
    /// The node whose VM replicates (or last replicated): the recovery site's once the VM
    /// replicates in reverse, else `spec.nodeName`. Its agent reports the VM's facts.
    pub fn active_node(&self) -> &str {
        match (&self.spec.recovery_site, self.status.as_ref()) {
            (Some(site), Some(status)) if status.direction == ReplicationDirection::Reverse => {
                &site.node_name
            }
            _ => &self.spec.node_name,
        }
    }

    /// Whether the agent of `node` has work for the VM: it hosts the VM, or its recovered
    /// VM (`spec.recoverySite`).
    pub fn on_node(&self, node: &str) -> bool {
        self.spec.node_name == node
            || self
                .spec
                .recovery_site
                .as_ref()
                .is_some_and(|s| s.node_name == node)
    }
}

/// Which way the VM replicates.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq, Hash)]
pub enum ReplicationDirection {
    /// From the primary site (`spec.nodeName`, `spec.disks`).
    #[default]
    Forward,
    /// From the recovery site (`spec.recoverySite`), after a failover and a re-protect.
    Reverse,
}

/// The hypervisor backend and its connection details: exactly one of `qemu` and `hyperv`.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "has(self.qemu) != has(self.hyperv)",
     "message": "exactly one of qemu and hyperv must be set"},
    {"rule": "has(self.qemu) == has(oldSelf.qemu)",
     "message": "the hypervisor kind cannot change once the VM is protected"}
]))]
pub struct HypervisorSpec {
    /// A QEMU/KVM VM on a Linux node, reached over its QMP socket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qemu: Option<QemuSpec>,
    /// A Hyper-V VM on a Windows node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hyperv: Option<HyperVSpec>,
}

/// How to reach a QEMU VM.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct QemuSpec {
    /// Absolute path of the VM's QMP unix socket on the node.
    #[schemars(regex(pattern = r"^/"), length(min = 2, max = 4096))]
    pub qmp_socket: String,
    /// Absolute path of the QEMU guest agent's socket, for application-consistent points
    /// (filesystem freeze). Absent: crash-consistent points only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^/"), length(min = 2, max = 4096))]
    pub guest_agent_socket: Option<String>,
}

/// How to find a Hyper-V VM.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HyperVSpec {
    /// The VM's GUID (`Msvm_ComputerSystem.Name`), when names are not unique on the host.
    /// Absent: the VM is found by `vmName`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9a-fA-F]{8}-([0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}$"))]
    pub vm_id: Option<String>,
}

/// One virtual disk of the VM.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DiskSpec {
    /// The disk's name within the VM: a DNS label, used to name its replica.
    #[schemars(
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"),
        length(min = 1, max = 63)
    )]
    pub name: String,
    /// The disk image on the node (qcow2, raw or VHDX).
    #[schemars(length(min = 1, max = 4096))]
    #[schemars(extend("x-kubernetes-validations" = [
        {"rule": "self == oldSelf", "message": "a disk's path is immutable: add a new disk instead"}
    ]))]
    pub path: String,
    /// The QEMU block node name of the disk (qemu only), e.g. `drive-virtio-disk0`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        regex(pattern = r"^[A-Za-z][A-Za-z0-9_.+-]*$"),
        length(min = 1, max = 127)
    )]
    #[schemars(extend("x-kubernetes-validations" = [
        {"rule": "self == oldSelf", "message": "a disk's blockNode is immutable"}
    ]))]
    pub block_node: Option<String>,
    /// Leave this disk out of replication (a scratch or page-file disk).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub excluded: bool,
}

/// Whether the VM should be protected.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq, Hash)]
pub enum ProtectionState {
    /// Protect the VM.
    #[default]
    Enabled,
    /// Stop protecting the VM (tracking stops, bitmaps are removed).
    Disabled,
}

/// Actions asked for by token. Set a new token value to ask again.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Requests {
    /// Resynchronize now, outside the policy's window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub resync: Option<RequestToken>,
    /// Materialise a recovery point as a separately named disk set, for a test.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_failover: Option<TestFailoverRequest>,
    /// Remove the disks of the last test failover.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub cleanup_test_failover: Option<RequestToken>,
    /// Fail the VM over to a recovery point.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failover: Option<FailoverRequest>,
    /// After a failover, drop the other recovery points.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub commit: Option<RequestToken>,
    /// After a failover, replicate the recovered VM (`spec.recoverySite`) back into the
    /// replica, sending only the blocks that differ from the point it started from; after a
    /// failback, protect the VM on its original disks again the same way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub reprotect: Option<RequestToken>,
    /// Retry the operation that failed now: after a non-recoverable error (once its cause is
    /// fixed), or to skip what is left of a recoverable error's backoff.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub retry: Option<RequestToken>,
}

/// A test failover request.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TestFailoverRequest {
    /// The request token.
    #[schemars(length(min = 1, max = 63))]
    pub token: RequestToken,
    /// Which point to materialise. Absent: the latest.
    #[serde(default)]
    pub recovery_point: RecoveryPointSelector,
}

/// Planned or unplanned failover.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq, Hash)]
pub enum FailoverType {
    /// Ship everything pending first (the source is still up), then stop protection.
    Planned,
    /// Use the latest durable point (the source is gone).
    #[default]
    Unplanned,
}

/// A failover request.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "self.type != 'Planned' || !has(self.recoveryPoint) || self.recoveryPoint.kind == 'Latest'",
     "message": "a planned failover always uses the latest point, after shipping what is pending"}
]))]
pub struct FailoverRequest {
    /// The request token.
    #[schemars(length(min = 1, max = 63))]
    pub token: RequestToken,
    /// Planned or Unplanned.
    #[serde(rename = "type", default)]
    pub failover_type: FailoverType,
    /// Which point to fail over to. Absent: the latest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovery_point: Option<RecoveryPointSelector>,
}

/// Where the VM is in its protection life cycle.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq, Hash)]
pub enum ProtectionPhase {
    /// Accepted; protection not started yet.
    #[default]
    Pending,
    /// Prerequisites checked, replica disks created.
    EnablingProtection,
    /// Disks being copied from a point-in-time view.
    InitialReplication,
    /// Changes made during the copy being shipped; the first point being cut.
    FinalizingProtection,
    /// Delta replication every copy interval.
    Protected,
    /// Comparing block checksums and sending the blocks that differ.
    Resynchronizing,
    /// A failover is running.
    FailingOver,
    /// Failed over to a recovery point; not replicating.
    FailedOver,
    /// Failover committed; the other points are gone.
    FailoverCommitted,
    /// Re-protect runs: the blocks that differ from the point the VM started from are sent.
    Reprotecting,
    /// A failback runs: the recovered VM is stopped and its last changes shipped, then the
    /// original disks are brought to that point.
    FailingBack,
    /// Back on the original disks at the primary site; not replicating until re-protected.
    FailedBack,
    /// Protection being removed.
    DisablingProtection,
    /// Not protected.
    Disabled,
}

/// Progress of one disk's copy (initial replication or resync).
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DiskProgress {
    /// The disk's name.
    pub name: String,
    /// Bytes copied (or compared, during a resync).
    #[serde(default)]
    pub bytes_done: u64,
    /// Bytes to go through in all.
    #[serde(default)]
    pub bytes_total: u64,
    /// Recent throughput.
    #[serde(default)]
    pub throughput_bytes_per_second: u64,
    /// The disk's size (agent reports; the resync threshold is a percent of it).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub size_bytes: u64,
    /// Bytes of this disk's change logs written and not yet shipped (agent reports).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub pending_log_bytes: u64,
    /// The disk's image format as the hypervisor names it (`qcow2`, `raw`, `host_device`,
    /// `vhdx`), found by the prerequisite check of EnableProtection (agent reports).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
    /// Whether the disk's change tracking survives a clean restart of the hypervisor (a qcow2
    /// persistent dirty bitmap, Hyper-V's RCT). When false, tracking lives in the hypervisor's
    /// memory only: a restart, crash or migration of the hypervisor costs a resync of this
    /// disk (agent reports).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracking_survives_restart: Option<bool>,
    /// Why the disk's tracking does not survive a restart, and what would make it, when it
    /// does not (agent reports).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracking_note: Option<String>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// Consistency of a recovery point.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq, Hash)]
pub enum Consistency {
    /// As if the VM lost power at that instant.
    #[default]
    CrashConsistent,
    /// The guest's filesystems (and VSS writers on Windows) were quiesced.
    AppConsistent,
}

/// One recovery point, as status shows it.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RecoveryPointRef {
    /// The point's name.
    pub name: String,
    /// The instant the point captures.
    pub time: Time,
    /// Crash- or app-consistent.
    pub consistency: Consistency,
}

/// A summary of the VM's recovery points.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RecoveryPointsSummary {
    /// The newest point.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latest: Option<RecoveryPointRef>,
    /// The newest app-consistent point.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latest_app_consistent: Option<RecoveryPointRef>,
    /// The oldest point kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oldest: Option<RecoveryPointRef>,
    /// How many points are kept.
    #[serde(default)]
    pub count: u32,
}

/// The tokens of the requests that were handled.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HandledRequests {
    /// The last resync token handled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resync: Option<RequestToken>,
    /// The last test failover token handled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_failover: Option<RequestToken>,
    /// The last cleanup token handled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cleanup_test_failover: Option<RequestToken>,
    /// The last failover token handled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failover: Option<RequestToken>,
    /// The last commit token handled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit: Option<RequestToken>,
    /// The last re-protect token handled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reprotect: Option<RequestToken>,
    /// The last retry token handled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RequestToken>,
}

/// Disks materialised by a (test) failover.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct FailoverResult {
    /// The recovery point used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovery_point: Option<RecoveryPointRef>,
    /// Where each disk was materialised (a file path or a blob URL), by disk name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<MaterialisedDisk>,
    /// Whether every disk matched the manifest's digest.
    #[serde(default)]
    pub verified: bool,
    /// The node whose folder holds the disks (the agent's that ran the job: the VM's own, or
    /// a recovery node when the VM's agent was lost).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// The VM brought up on the disks (`spec.recoveredVm`): its definition and its hook. In
    /// a failback's result: the failover's recovered VM, which a planned failback takes down
    /// once it is done (it stopped that VM first).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovered_vm: Option<RecoveredVm>,
    /// The result is a failback's (the VM returns to the primary site's original disks):
    /// nothing is brought up; once a planned failback is done (the recovered VM stopped, its
    /// last writes on the original disks), the failover's recovered VM is taken down. An
    /// unplanned one leaves it alone: its site may be lost, or it may still run.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub failback: bool,
}

/// The VM a (test) failover brought up on its disks (written by the operator, or the
/// standalone daemon).
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RecoveredVm {
    /// Its name.
    pub name: String,
    /// Where its rendered definition went: `<apiVersion> <kind> <namespace>/<name>` for an
    /// object applied on the cluster, else the file's path on `node`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub definition: Option<String>,
    /// Whether the definition was placed and the hook succeeded.
    #[serde(default)]
    pub succeeded: bool,
    /// What failed (rendering, placing, the hook), or what the hook's undo at cleanup said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// When it was brought up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<Time>,
    /// Its definition was removed and its hook undone (the cleanup of a test failover is
    /// under way, or the VM failed back).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub removed: bool,
    /// The `retry` request token there was when it was brought up: a new one brings up again
    /// a VM that did not come up (after the template or the hook was fixed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_token: Option<RequestToken>,
    /// The node it was brought up for (where the failover's disks are): its hook's
    /// `LIFEBOAT_NODE` when it is taken down.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

/// One materialised disk.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MaterialisedDisk {
    /// The disk's name.
    pub name: String,
    /// Where it is.
    pub location: String,
}

/// What Lifeboat observed of a protected VM.
///
/// # Ownership
///
/// Two writers share this status by server-side apply, each under its own field manager
/// (`lifeboat_api::contract`): the node's agent owns `agent` and nothing else; the operator owns
/// every other field. The agent reports facts; the operator decides, from those facts, the
/// policy and the time, everything else (and mirrors the facts people read in `kubectl get`).
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ProtectedVMStatus {
    /// The generation the status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The generation of the ReplicationPolicy the status was decided with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_generation: Option<i64>,
    /// Where the VM is in its life cycle.
    #[serde(default)]
    pub phase: ProtectionPhase,
    /// Which way the VM replicates (or last replicated): Forward from the primary site,
    /// Reverse from the recovery site.
    #[serde(default)]
    pub direction: ReplicationDirection,
    /// Normal, Warning or Critical.
    #[serde(default)]
    pub health: Health,
    /// Why: a stable CamelCase word (`Healthy`, `AgentQuiet`, `RpoOverThreshold`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_reason: Option<String>,
    /// The same, for a human.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_message: Option<String>,
    /// Age of the latest durable recovery point, e.g. `2m30s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rpo: Option<String>,
    /// The same, in seconds, for machines.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rpo_seconds: Option<u64>,
    /// When the last replication cycle succeeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_successful_cycle_time: Option<Time>,
    /// How long the last cycle took, in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_cycle_duration_seconds: Option<f64>,
    /// When the next cycle is due.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_cycle_time: Option<Time>,
    /// Bytes of change logs written and not yet shipped.
    #[serde(default)]
    pub pending_log_bytes: u64,
    /// Per-disk copy progress (initial replication, resync).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<DiskProgress>,
    /// The recovery points kept.
    #[serde(default)]
    pub recovery_points: RecoveryPointsSummary,
    /// The last error, until a step succeeds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<ErrorStatus>,
    /// Request tokens handled.
    #[serde(default)]
    pub handled_requests: HandledRequests,
    /// The job the VM is waiting on, or the last one it ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_job: Option<JobReference>,
    /// When the last resynchronization completed (the agent's facts older than this no longer
    /// ask for one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_resync_time: Option<Time>,
    /// Replicating in reverse: the original disks at the primary site hold every recovery
    /// point cut before this time. Lifeboat keeps them in step with the points (a Failback
    /// job with `presync` and no request), so that a planned failback has only the changes
    /// made since to move, with the recovered VM stopped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original_disks_in_step_time: Option<Time>,
    /// The disks of the current test failover, if one exists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_failover: Option<FailoverResult>,
    /// The disks of the failover, once failed over (after a failback: the original disks it
    /// brought to its point).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failover: Option<FailoverResult>,
    /// Protected, InitialReplicationComplete, Replicating, ResyncRequired, Resynchronizing,
    /// TestFailoverSucceeded, FailedOver, and Ready (True when Protected and Normal, for
    /// `kubectl wait --for=condition=Ready`). A list-map keyed by `type`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// What the node's agent last reported: facts only, written by the agent alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<AgentReport>,
}

/// The job a VM is waiting on, or the last one it ran (written by the operator).
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct JobReference {
    /// The ReplicationJob's name.
    pub name: String,
    /// Its operation.
    #[serde(rename = "type")]
    pub job_type: JobType,
    /// Its phase, as the operator last took it in.
    #[serde(default)]
    pub phase: JobPhase,
    /// The VM's job counter when the job was created: job names end with it.
    #[serde(default)]
    pub sequence: u32,
    /// 1 for the first try of an operation, 2 for its first retry, ...
    #[serde(default)]
    pub attempt: u32,
    /// The job's parameters, kept so that a retry asks for the same thing.
    #[serde(default)]
    pub parameters: JobParameters,
    /// The error of the operation's last failed attempt, until the operation succeeds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<ErrorStatus>,
}

/// What the node's agent reports about a VM: facts, no decisions. The agent writes this by
/// server-side apply under its own field manager, at most once per cycle.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AgentReport {
    /// When the agent wrote this report. A report is a sign of life of the agent for this VM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report_time: Option<Time>,
    /// The generation of the ReplicationPolicy the agent replicates with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_generation: Option<i64>,
    /// When the last cycle started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_cycle_start_time: Option<Time>,
    /// When the last cycle that succeeded ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_successful_cycle_time: Option<Time>,
    /// How long the last cycle took, in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_cycle_duration_seconds: Option<f64>,
    /// Cycle counts.
    #[serde(default)]
    pub cycles: CycleStatistics,
    /// Bytes of change logs written and not yet shipped, all disks together.
    #[serde(default)]
    pub pending_log_bytes: u64,
    /// Per-disk facts: size, pending log bytes, copy progress.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<DiskProgress>,
    /// The recovery points kept in the replica store.
    #[serde(default)]
    pub recovery_points: RecoveryPointsSummary,
    /// The last cycle error, until a cycle succeeds (class, reason, retry count, next retry).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<ErrorStatus>,
    /// Set when change tracking can no longer be trusted and only a resync can continue.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracking_lost: Option<TrackingLost>,
}

/// Cycle counts reported by the agent.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CycleStatistics {
    /// Cycles that succeeded in the hour before the report.
    #[serde(default)]
    pub succeeded_last_hour: u32,
    /// Cycles that failed in the hour before the report.
    #[serde(default)]
    pub failed_last_hour: u32,
    /// Cycles that succeeded since the agent started protecting the VM.
    #[serde(default)]
    pub succeeded_total: u64,
    /// Cycles that failed since then.
    #[serde(default)]
    pub failed_total: u64,
    /// Bytes shipped to the replica store since then.
    #[serde(default)]
    pub bytes_shipped_total: u64,
}

/// Change tracking lost: delta replication cannot continue without a resync.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TrackingLost {
    /// TrackingLost (a bitmap left inconsistent, a disk changed while untracked) or CorruptLog.
    pub reason: ResyncReason,
    /// When the agent found out.
    pub time: Time,
    /// What happened, for a human.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}
