//! The engine on a qemu-storage-daemon, as the engine tests open it: the disks the harness
//! serves, a QEMU hypervisor on its QMP socket, a state folder, and a whole replica disk read
//! back from the store.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use lifeboat_engine::backend::{DiskInfo, DiskRef, Hypervisor};
use lifeboat_engine::state::EnginePhase;
use lifeboat_engine::{Progress, Replicator, Settings};
use lifeboat_qemu::QemuHypervisor;
use lifeboat_qemu::testing::Qsd;
use lifeboat_store::{At, ReplicaStore, VmKey};

/// The name of the VM the tests protect.
pub const VM: &str = "vm1";

/// How much of a replica disk one store read asks for.
const READ: u64 = 4 * 1024 * 1024;

/// The key of the VM the tests protect.
pub fn vm() -> VmKey {
    VmKey::new("tests", VM).unwrap_or_else(|e| panic!("vm key: {e}"))
}

/// A copy interval of 30 s, the rest the defaults.
pub fn settings() -> Settings {
    Settings {
        copy_interval: Duration::from_secs(30),
        ..Settings::default()
    }
}

pub fn no_progress(_: &Progress) {}

/// The engine's disks: one per disk of `qsd`, at its image (as the harness stores it), each
/// served by the node `node` names for it.
pub fn disk_refs(qsd: &Qsd, node: impl Fn(&str) -> String) -> Vec<DiskRef> {
    qsd.specs
        .iter()
        .map(|spec| DiskRef {
            name: spec.name.clone(),
            path: qsd.image(&spec.name).display().to_string(),
            node: Some(node(&spec.name)),
        })
        .collect()
}

/// The engine's disks, each served by the node the guest writes through.
pub fn disks(qsd: &Qsd) -> Vec<DiskRef> {
    disk_refs(qsd, str::to_owned)
}

/// The QEMU hypervisor of the VM on `qsd`'s QMP socket, its work folder under `dir`.
pub fn qemu(qsd: &Qsd, dir: &Path) -> QemuHypervisor {
    QemuHypervisor::new(VM, &qsd.qmp, dir.join("qemu-work"))
}

/// The engine of the VM over `disks`, its state folder under `dir` (the same folder each
/// time: opening again is the agent restarting).
pub async fn open_engine(
    dir: &Path,
    disks: Vec<DiskRef>,
    hypervisor: Arc<dyn Hypervisor>,
    store: Arc<dyn ReplicaStore>,
    settings: Settings,
) -> Replicator {
    Replicator::open(vm(), disks, dir.join("agent"), hypervisor, store, settings)
        .await
        .unwrap_or_else(|e| panic!("open: {e}"))
}

/// Enable, copy and finalize (what enable said of the disks): the first point is cut.
pub async fn protect(engine: &mut Replicator) -> Vec<DiskInfo> {
    let infos = engine
        .enable()
        .await
        .unwrap_or_else(|e| panic!("enable: {e}"));
    engine
        .initial_copy(&no_progress)
        .await
        .unwrap_or_else(|e| panic!("copy: {e}"));
    finalize(engine).await;
    infos
}

/// The cycle after the initial copy: it cuts the first point and the VM is protected.
pub async fn finalize(engine: &mut Replicator) {
    let report = engine
        .run_cycle(SystemTime::now())
        .await
        .unwrap_or_else(|e| panic!("finalize: {e}"));
    assert!(report.point.is_some(), "finalize cut the first point");
    assert_eq!(engine.state().phase, EnginePhase::Protected);
}

/// A whole disk of `size` bytes of the replica, live or at a point.
pub async fn replica(
    store: &dyn ReplicaStore,
    vm: &VmKey,
    disk: &str,
    size: u64,
    at: &At,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(size as usize);
    let mut offset = 0;
    while offset < size {
        let len = READ.min(size - offset);
        out.extend_from_slice(
            &store
                .read(vm, disk, at, offset, len)
                .await
                .unwrap_or_else(|e| panic!("read replica {disk}: {e}")),
        );
        offset += len;
    }
    out
}
