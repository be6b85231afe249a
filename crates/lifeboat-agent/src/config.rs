//! From the resources to the engine's configuration: which disks, which hypervisor, which
//! settings. Every problem names the resource and the field.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use lifeboat_api::protected_vm::{RecoveryDiskFormat, ReplicationDirection};
use lifeboat_api::{ProtectedVM, ReplicationPolicy};
use lifeboat_core::window::{DailyWindow, WindowSpec};
use lifeboat_engine::Settings;
use lifeboat_engine::backend::{DiskRef, Hypervisor};
use lifeboat_engine::replicator::DiskFormat;
use lifeboat_store::VmKey;

/// Why a VM cannot be configured.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A field cannot be used as it is.
    #[error("{kind} {namespace}/{name}: {field}: {problem}")]
    Field {
        /// The resource's kind.
        kind: &'static str,
        /// Its namespace.
        namespace: String,
        /// Its name.
        name: String,
        /// The field, e.g. `spec.hypervisor`.
        field: &'static str,
        /// What is wrong.
        problem: String,
    },
}

/// How to reach the VM's hypervisor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HypervisorConfig {
    /// QEMU over its QMP socket.
    Qemu {
        /// The QMP socket.
        qmp_socket: PathBuf,
        /// The guest agent's socket, for app-consistent points.
        guest_agent_socket: Option<PathBuf>,
    },
    /// A Hyper-V VM by name or id.
    HyperV {
        /// The VM's id, when given.
        vm_id: Option<String>,
    },
}

/// Everything the engine needs to protect one VM.
#[derive(Clone, Debug, PartialEq)]
pub struct VmConfig {
    /// The VM's key in the replica store.
    pub key: VmKey,
    /// The VM's name on its hypervisor.
    pub vm_name: String,
    /// The protected (not excluded) disks.
    pub disks: Vec<DiskRef>,
    /// The hypervisor connection.
    pub hypervisor: HypervisorConfig,
    /// The policy's settings.
    pub settings: Settings,
    /// Upload limits in Mbit/s: (work hours, off hours).
    pub bandwidth_mbps: (Option<u32>, Option<u32>),
    /// The work hours the bandwidth limits switch on (`None`: every hour is an off hour).
    pub work_hours: Option<WindowSpec>,
    /// The policy's generation the settings come from.
    pub policy_generation: Option<i64>,
    /// What the store keeps of the VM beside its replica ([`definition`]).
    pub definition: bytes::Bytes,
    /// Who writes the replica, in the store's records (`node <name>`).
    pub writer: String,
    /// Which site's VM this is: the primary (`spec`), or the recovered VM at the recovery site
    /// (`spec.recoverySite`), which replicates while the VM's direction is Reverse.
    pub site: Site,
    /// The node the VM of that site runs on.
    pub node: String,
    /// The VM's disks at the primary site (`spec.disks`, not excluded), which a failback
    /// brings to its point whichever site replicates.
    pub original_disks: Vec<DiskRef>,
    /// The format failovers write the recovered VM's disks in (`spec.recoverySite.diskFormat`).
    pub failover_format: DiskFormat,
}

/// The format failovers of `vm` write its disks in: `spec.recoverySite.diskFormat`, raw
/// without one.
pub fn failover_format(vm: &ProtectedVM) -> DiskFormat {
    match vm.spec.recovery_site.as_ref().and_then(|r| r.disk_format) {
        Some(RecoveryDiskFormat::Qcow2) => DiskFormat::Qcow2,
        Some(RecoveryDiskFormat::Raw) | None => DiskFormat::Raw,
    }
}

/// Which site's VM an engine replicates.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Site {
    /// The primary site: `spec.nodeName`, `spec.hypervisor`, `spec.disks`.
    #[default]
    Primary,
    /// The recovery site: `spec.recoverySite`.
    Recovery,
}

impl VmConfig {
    /// The upload limit in force at `now`, in bytes per second (`None`: unlimited): the
    /// policy's work-hours limit inside its work hours, its off-hours limit outside them.
    ///
    /// NB: a work-hours window that does not parse counts as no work hours (the operator's
    /// policy check reports it on the policy's Ready condition).
    pub fn upload_limit_bytes_per_second(&self, now: SystemTime) -> Option<u64> {
        let working = self
            .work_hours
            .as_ref()
            .and_then(|w| DailyWindow::parse(w).ok())
            .is_some_and(|w| w.contains(now));
        let (work, off) = self.bandwidth_mbps;
        let mbps = if working { work } else { off };
        mbps.map(|m| u64::from(m) * 1_000_000 / 8)
    }

    /// Where a failback's Failback jobs find and keep the original disks' seed when this
    /// site's engine runs them: for the recovered VM's engine (standalone mode, or one node
    /// that hosts both sites), the primary site's state folder under `state_dir`; for the
    /// primary's own engine, its own folder (None).
    pub fn seed_dir(&self, state_dir: &Path) -> Option<PathBuf> {
        (self.site == Site::Recovery)
            .then(|| crate::vm_worker::vm_state_dir(state_dir, &self.key, Site::Primary))
    }
}

/// The engine's configuration for `vm` under `policy`.
///
/// # Errors
///
/// A field that cannot be used (a name that is not a store key, no hypervisor).
pub fn vm_config(vm: &ProtectedVM, policy: &ReplicationPolicy) -> Result<VmConfig, ConfigError> {
    vm_config_on(vm, policy, None)
}

/// [`vm_config`] for the agent of `node`: the primary site's VM on `spec.nodeName`, the
/// recovered VM on `spec.recoverySite.nodeName`, whichever way the VM replicates (a failback's
/// Failback job runs on the primary's node while the recovered VM still replicates). Without
/// a node (standalone, one machine for both sites), or one that hosts both: the site the
/// VM replicates from.
///
/// # Errors
///
/// As [`vm_config`].
pub fn vm_config_on(
    vm: &ProtectedVM,
    policy: &ReplicationPolicy,
    node: Option<&str>,
) -> Result<VmConfig, ConfigError> {
    let reverse = vm
        .status
        .as_ref()
        .is_some_and(|s| s.direction == ReplicationDirection::Reverse);
    let spec = &vm.spec;
    let recovery_here = match (&spec.recovery_site, node) {
        (Some(r), Some(node)) if r.node_name != spec.node_name => r.node_name == node,
        (Some(_), _) => reverse,
        (None, _) => false,
    };
    let site = if recovery_here {
        Site::Recovery
    } else {
        Site::Primary
    };
    vm_config_at(vm, policy, site)
}

/// [`vm_config`] for the VM of `site`: the recovered VM (`spec.recoverySite`) when asked for
/// and the VM has one, else the primary's.
///
/// # Errors
///
/// As [`vm_config`].
pub fn vm_config_at(
    vm: &ProtectedVM,
    policy: &ReplicationPolicy,
    site: Site,
) -> Result<VmConfig, ConfigError> {
    let namespace = vm
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".to_owned());
    let name = vm.metadata.name.clone().unwrap_or_default();
    let field = |field: &'static str, problem: String| ConfigError::Field {
        kind: "ProtectedVM",
        namespace: namespace.clone(),
        name: name.clone(),
        field,
        problem,
    };
    let key = VmKey::new(&namespace, &name).map_err(|e| field("metadata.name", e.to_string()))?;
    let spec = &vm.spec;
    let original_disks: Vec<DiskRef> = spec
        .disks
        .iter()
        .filter(|d| !d.excluded)
        .map(|d| DiskRef {
            name: d.name.clone(),
            path: d.path.clone(),
            node: d.block_node.clone(),
        })
        .collect();
    let recovery_here = site == Site::Recovery;
    let (site, node, vm_name, hypervisor_spec, disks, hypervisor_field) = match &spec.recovery_site
    {
        Some(r) if recovery_here => {
            let mut disks = Vec::new();
            for d in &original_disks {
                let Some(found) = r.disks.iter().find(|rd| rd.name == d.name) else {
                    return Err(field(
                        "spec.recoverySite.disks",
                        format!(
                            "no disk named {:?}: the recovered VM needs every protected disk",
                            d.name
                        ),
                    ));
                };
                disks.push(DiskRef {
                    name: found.name.clone(),
                    path: found.path.clone(),
                    node: found.block_node.clone(),
                });
            }
            (
                Site::Recovery,
                r.node_name.clone(),
                r.vm_name.clone().unwrap_or_else(|| spec.vm_name.clone()),
                &r.hypervisor,
                disks,
                "spec.recoverySite.hypervisor",
            )
        }
        _ => (
            Site::Primary,
            spec.node_name.clone(),
            spec.vm_name.clone(),
            &spec.hypervisor,
            original_disks.clone(),
            "spec.hypervisor",
        ),
    };
    let hypervisor = match (&hypervisor_spec.qemu, &hypervisor_spec.hyperv) {
        (Some(q), None) => HypervisorConfig::Qemu {
            qmp_socket: PathBuf::from(&q.qmp_socket),
            guest_agent_socket: q.guest_agent_socket.as_ref().map(PathBuf::from),
        },
        (None, Some(h)) => HypervisorConfig::HyperV {
            vm_id: h.vm_id.clone(),
        },
        _ => {
            return Err(field(
                hypervisor_field,
                "exactly one of qemu and hyperv must be set".into(),
            ));
        }
    };
    let p = &policy.spec;
    let settings = Settings {
        copy_interval: p.copy_frequency.interval(),
        retention: Duration::from_secs(u64::from(p.recovery_point_retention_hours) * 3600),
        app_consistent_every: p
            .app_consistent_frequency_hours
            .map(|h| Duration::from_secs(u64::from(h) * 3600)),
        log_threshold_percent: p.resync.log_size_threshold_percent,
        block_size_bytes: p.resync.block_size_bytes,
        upload_concurrency: p.upload_concurrency as usize,
        ..Settings::default()
    };
    let bandwidth_mbps = p
        .bandwidth
        .as_ref()
        .map(|b| (b.work_hours_mbps, b.off_hours_mbps))
        .unwrap_or((None, None));
    Ok(VmConfig {
        key,
        vm_name,
        disks,
        hypervisor,
        settings,
        bandwidth_mbps,
        work_hours: lifeboat_control::mapping::policy_spec(policy).work_hours,
        policy_generation: policy.metadata.generation,
        definition: definition(vm, policy),
        writer: format!("node {node}"),
        site,
        node,
        original_disks,
        failover_format: failover_format(vm),
    })
}

/// The VM's definition as the store keeps it beside the replica: its ProtectedVM and its
/// ReplicationPolicy as applied (name, namespace, labels and spec; no status), as a
/// Kubernetes `List` that `kubectl apply -f` takes at a recovery site. JSON.
pub fn definition(vm: &ProtectedVM, policy: &ReplicationPolicy) -> bytes::Bytes {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    let meta = |m: &ObjectMeta| ObjectMeta {
        name: m.name.clone(),
        namespace: m.namespace.clone(),
        labels: m.labels.clone(),
        ..ObjectMeta::default()
    };
    let mut vm_applied = ProtectedVM::new("", vm.spec.clone());
    vm_applied.metadata = meta(&vm.metadata);
    let mut policy_applied = ReplicationPolicy::new("", policy.spec.clone());
    policy_applied.metadata = meta(&policy.metadata);
    let list = serde_json::json!({
        "apiVersion": "v1",
        "kind": "List",
        "items": [vm_applied, policy_applied],
    });
    // NB: serialising plain API types to a Value cannot fail.
    bytes::Bytes::from(serde_json::to_vec_pretty(&list).unwrap_or_default())
}

/// The hypervisor connection of a configured VM; its work files go under `work_dir`.
///
/// # Errors
///
/// The VM's hypervisor is not available on this operating system.
pub fn hypervisor(config: &VmConfig, work_dir: &Path) -> Result<Arc<dyn Hypervisor>, ConfigError> {
    let unavailable = |what: &str| ConfigError::Field {
        kind: "ProtectedVM",
        namespace: config.key.namespace().to_owned(),
        name: config.key.name().to_owned(),
        field: "spec.hypervisor",
        problem: format!(
            "{what} VMs are not supported by an agent on {}",
            std::env::consts::OS
        ),
    };
    match &config.hypervisor {
        #[cfg(unix)]
        HypervisorConfig::Qemu {
            qmp_socket,
            guest_agent_socket,
        } => {
            let options = lifeboat_qemu::QemuOptions {
                guest_agent_socket: guest_agent_socket.clone(),
                ..Default::default()
            };
            Ok(Arc::new(lifeboat_qemu::QemuHypervisor::with_options(
                config.vm_name.clone(),
                qmp_socket.clone(),
                work_dir.to_path_buf(),
                options,
            )))
        }
        #[cfg(not(unix))]
        HypervisorConfig::Qemu { .. } => Err(unavailable("qemu")),
        // NB: the VM's GUID finds it even when names repeat on the host; else its name.
        #[cfg(windows)]
        HypervisorConfig::HyperV { vm_id } => Ok(Arc::new(lifeboat_hyperv::HyperVHypervisor::new(
            vm_id.clone().unwrap_or_else(|| config.vm_name.clone()),
            work_dir.to_path_buf(),
        ))),
        #[cfg(not(windows))]
        HypervisorConfig::HyperV { .. } => Err(unavailable("hyperv")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(work_hours: Option<WindowSpec>) -> VmConfig {
        VmConfig {
            key: VmKey::new("ns", "web").unwrap_or_else(|e| panic!("{e}")),
            vm_name: "web".into(),
            disks: Vec::new(),
            hypervisor: HypervisorConfig::HyperV { vm_id: None },
            settings: Settings::default(),
            bandwidth_mbps: (Some(8), Some(80)),
            work_hours,
            policy_generation: None,
            definition: bytes::Bytes::new(),
            writer: String::new(),
            site: Site::Primary,
            node: String::new(),
            original_disks: Vec::new(),
            failover_format: DiskFormat::Raw,
        }
    }

    #[test]
    fn the_upload_limit_follows_the_work_hours() {
        // 2025-06-16 was a Monday; 10:00 and 20:00 UTC.
        let monday_10 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_750_068_000);
        let monday_20 = monday_10 + Duration::from_secs(10 * 3600);
        let hours = WindowSpec {
            start: "09:00".into(),
            end: "17:00".into(),
            days: vec![0, 1, 2, 3, 4],
            time_zone: None,
        };
        let c = config(Some(hours));
        assert_eq!(c.upload_limit_bytes_per_second(monday_10), Some(1_000_000));
        assert_eq!(c.upload_limit_bytes_per_second(monday_20), Some(10_000_000));
        assert_eq!(
            config(None).upload_limit_bytes_per_second(monday_10),
            Some(10_000_000)
        );
    }

    #[test]
    fn the_recovered_vms_engine_keeps_the_original_disks_seed_in_the_primarys_folder() {
        let state = Path::new("/var/lib/lifeboat");
        assert_eq!(
            config(None).seed_dir(state),
            None,
            "the primary's own folder"
        );
        let recovered = VmConfig {
            site: Site::Recovery,
            ..config(None)
        };
        assert_eq!(
            recovered.seed_dir(state),
            Some(crate::vm_worker::vm_state_dir(
                state,
                &recovered.key,
                Site::Primary
            ))
        );
        assert_ne!(
            recovered.seed_dir(state),
            Some(crate::vm_worker::vm_state_dir(
                state,
                &recovered.key,
                Site::Recovery
            ))
        );
    }
}
