//! End to end: the engine on a real qemu-storage-daemon (the VM's block layer, written to by
//! qemu-io as the guest) and the real local store. Every check compares a recovery point
//! with what the source's point-in-time view held, byte for byte.

// A failed unwrap is the test failure report.
#![allow(clippy::unwrap_used)]

mod support;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::SystemTime;

use lifeboat_engine::replicator::{Output, PointChoice};
use lifeboat_engine::state::EnginePhase;
use lifeboat_engine::{Replicator, Settings};
use lifeboat_store::local::LocalStore;
use lifeboat_store::{At, ReplicaStore, VmKey};
use support::Qsd;
use support::engine::{self, no_progress, settings};
use support::faults::{FaultInjectingStore, Recorded, RecordingHypervisor};

const MIB: u64 = 1024 * 1024;

struct Rig {
    _dir: tempfile::TempDir,
    qsd: Qsd,
    store: Arc<FaultInjectingStore<LocalStore>>,
    recorded: Recorded,
    engine: Replicator,
    vm: VmKey,
}

/// The engine on `qsd`, its hypervisor recording what each view shows.
async fn open_engine(
    qsd: &Qsd,
    dir: &Path,
    store: Arc<FaultInjectingStore<LocalStore>>,
    recorded: Recorded,
    settings: Settings,
) -> Replicator {
    let hypervisor = Arc::new(RecordingHypervisor {
        inner: engine::qemu(qsd, dir),
        recorded,
    });
    engine::open_engine(dir, engine::disks(qsd), hypervisor, store, settings).await
}

async fn rig(disk_sizes: &[(&str, u64)], settings: Settings) -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let qsd = Qsd::start(dir.path(), disk_sizes);
    let store = Arc::new(FaultInjectingStore::new(
        LocalStore::open(dir.path().join("store")).unwrap(),
    ));
    let recorded = Recorded::default();
    let engine = open_engine(&qsd, dir.path(), store.clone(), recorded.clone(), settings).await;
    let vm = engine.vm().clone();
    Rig {
        _dir: dir,
        qsd,
        store,
        recorded,
        engine,
        vm,
    }
}

impl Rig {
    async fn replica(&self, disk: &str, at: &At) -> Vec<u8> {
        let size = self.qsd.spec(disk).size;
        engine::replica(self.store.as_ref(), &self.vm, disk, size, at).await
    }

    /// The latest point equals what the view of its cycle showed, on every disk.
    async fn assert_latest_point_matches_its_view(&self) {
        let manifest = self.store.manifest(&self.vm).await.unwrap().unwrap();
        let point = manifest.latest().unwrap().clone();
        let seen = self
            .recorded
            .lock()
            .unwrap()
            .get(&point.cycle)
            .cloned()
            .unwrap_or_else(|| panic!("no view recorded for cycle {}", point.cycle));
        for (disk, bytes) in &seen {
            let replica = self.replica(disk, &At::Point(point.id.clone())).await;
            support::assert_same(
                &format!("disk {disk} at point {} (cycle {})", point.id, point.cycle),
                &replica,
                bytes,
            );
        }
    }

    async fn protect(&mut self) {
        engine::protect(&mut self.engine).await;
        self.assert_latest_point_matches_its_view().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_disks_under_load_every_point_equals_its_view() {
    let mut rig = rig(&[("root", 64 * MIB), ("data", 32 * MIB)], settings()).await;
    rig.qsd
        .guest_writes("root", &[(0, MIB, 0x11), (10 * MIB, 3 * MIB, 0x12)]);
    rig.qsd.guest_write("data", 4 * MIB, 512 * 1024, 0x13);
    rig.protect().await;

    // A guest writes all the time while cycles run.
    let nbd = rig.qsd.nbd.clone();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let disk = if i.is_multiple_of(3) { "data" } else { "root" };
                let size = if disk == "data" { 32 * MIB } else { 64 * MIB };
                let offset = (i * 7_340_033) % (size - 256 * 1024) / 4096 * 4096;
                let uri = format!("nbd+unix:///{disk}?socket={}", nbd.display());
                let _ = std::process::Command::new("qemu-io")
                    .args([
                        "-f",
                        "raw",
                        &uri,
                        "-c",
                        &format!("write -P {:#04x} {offset} 65536", (i % 250) as u8 + 1),
                    ])
                    .output();
                i += 1;
            }
            i
        })
    };
    for _ in 0..4 {
        let report = rig
            .engine
            .run_cycle(SystemTime::now())
            .await
            .unwrap_or_else(|e| panic!("cycle: {e}"));
        assert!(report.point.is_some());
        assert_eq!(report.resync_required, None);
        rig.assert_latest_point_matches_its_view().await;
    }
    stop.store(true, Ordering::SeqCst);
    let writes = load.join().unwrap();
    assert!(writes > 0, "the load ran");

    // One more cycle after the load: the replica equals the disk as it is now.
    rig.engine.run_cycle(SystemTime::now()).await.unwrap();
    for (disk, _) in rig.qsd.disks.clone() {
        let live = rig.qsd.read_disk(&disk);
        let manifest = rig.store.manifest(&rig.vm).await.unwrap().unwrap();
        let latest = manifest.latest().unwrap().id.clone();
        support::assert_same(
            &format!("disk {disk} after the load"),
            &rig.replica(&disk, &At::Point(latest)).await,
            &live,
        );
    }

    // Test failover of an older point: the files equal that point's view.
    let manifest = rig.store.manifest(&rig.vm).await.unwrap().unwrap();
    let older = manifest.points[manifest.points.len() - 3].clone();
    let out = rig._dir.path().join("test-failover");
    let report = rig
        .engine
        .materialise(
            &PointChoice::Named(older.id.clone()),
            Output::raw(&out),
            "test",
            &no_progress,
        )
        .await
        .unwrap();
    let seen = rig
        .recorded
        .lock()
        .unwrap()
        .get(&older.cycle)
        .cloned()
        .unwrap();
    for disk in &report.disks {
        support::assert_same(
            &format!("test failover disk {}", disk.name),
            &std::fs::read(&disk.path).unwrap(),
            &seen[&disk.name],
        );
    }
    rig.engine
        .remove_materialised(&out, "test", &["root".into(), "data".into()])
        .unwrap();
    assert!(!report.disks[0].path.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_over_the_threshold_force_a_resync_that_restores_equality() {
    let mut rig = rig(
        &[("root", 32 * MIB)],
        Settings {
            log_threshold_percent: 5,
            ..settings()
        },
    )
    .await;
    rig.protect().await;
    // The store goes away: cycles keep sealing logs, which pile up.
    rig.store.down.store(true, Ordering::SeqCst);
    rig.qsd.guest_write("root", 0, MIB, 0x21);
    let error = rig.engine.run_cycle(SystemTime::now()).await.err().unwrap();
    assert!(
        error.is_recoverable(),
        "an unreachable store is recoverable: {error}"
    );
    assert_eq!(
        rig.engine.state().pending.len(),
        1,
        "the sealed log is kept"
    );
    rig.qsd.guest_write("root", 2 * MIB, MIB, 0x22);
    let report = rig.engine.run_cycle(SystemTime::now()).await.unwrap();
    assert!(
        report
            .resync_required
            .as_deref()
            .unwrap_or_default()
            .starts_with("LogThresholdReached"),
        "{report:?}"
    );
    assert!(matches!(
        rig.engine.state().phase,
        EnginePhase::ResyncRequired { .. }
    ));
    assert!(
        rig.engine.state().pending.is_empty(),
        "superseded logs are dropped"
    );

    rig.store.down.store(false, Ordering::SeqCst);
    let report = rig
        .engine
        .resync(SystemTime::now(), &no_progress)
        .await
        .unwrap_or_else(|e| panic!("resync: {e}"));
    assert!(
        report.bytes_sent >= 2 * MIB && report.bytes_sent < 8 * MIB,
        "only the changed blocks are sent: {report:?}"
    );
    rig.assert_latest_point_matches_its_view().await;
    assert_eq!(rig.engine.state().phase, EnginePhase::Protected);
    rig.engine.run_cycle(SystemTime::now()).await.unwrap();
    rig.assert_latest_point_matches_its_view().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_log_is_detected_and_never_reaches_the_replica() {
    let mut rig = rig(&[("root", 32 * MIB)], settings()).await;
    rig.protect().await;
    let before = rig
        .store
        .manifest(&rig.vm)
        .await
        .unwrap()
        .unwrap()
        .latest()
        .unwrap()
        .clone();
    rig.store.down.store(true, Ordering::SeqCst);
    rig.qsd.guest_write("root", 5 * MIB, 256 * 1024, 0x31);
    assert!(rig.engine.run_cycle(SystemTime::now()).await.is_err());
    // Damage the data of the sealed log on disk.
    let log = rig.engine.state().pending[0].logs[0].path.clone();
    let mut bytes = std::fs::read(&log).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x5A;
    std::fs::write(&log, &bytes).unwrap();
    rig.store.down.store(false, Ordering::SeqCst);

    let report = rig.engine.run_cycle(SystemTime::now()).await.unwrap();
    let reason = report.resync_required.clone().unwrap_or_default();
    assert!(reason.starts_with("CorruptLog"), "{report:?}");
    // Nothing of the damaged log became a point, and the live replica was put back to the
    // latest point (the cycle was being applied; partial_apply.rs checks the live replica
    // where another disk's log of the cycle had already been applied).
    let manifest = rig.store.manifest(&rig.vm).await.unwrap().unwrap();
    assert_eq!(manifest.latest().unwrap().id, before.id);
    rig.engine
        .resync(SystemTime::now(), &no_progress)
        .await
        .unwrap();
    rig.assert_latest_point_matches_its_view().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_while_applying_is_undone_and_applied_again() {
    let mut rig = rig(
        &[("root", 32 * MIB)],
        Settings {
            upload_concurrency: 1,
            ..settings()
        },
    )
    .await;
    rig.protect().await;
    rig.qsd
        .guest_writes("root", &[(0, 4 * MIB, 0x41), (16 * MIB, 8 * MIB, 0x42)]);
    // The store dies after a few writes of the cycle: the live replica is half applied.
    rig.store.writes_left.store(3, Ordering::SeqCst);
    assert!(rig.engine.run_cycle(SystemTime::now()).await.is_err());
    assert!(rig.engine.state().applying);
    let recorded = rig.recorded.clone();
    let dir = rig._dir.path().to_path_buf();
    // The agent restarts (a new engine on the same folders) and the store is back.
    rig.store.down.store(false, Ordering::SeqCst);
    rig.store.writes_left.store(u64::MAX, Ordering::SeqCst);
    rig.engine = open_engine(&rig.qsd, &dir, rig.store.clone(), recorded, settings()).await;
    let manifest = rig.store.manifest(&rig.vm).await.unwrap().unwrap();
    let latest = manifest.latest().unwrap().id.clone();
    let point = rig.replica("root", &At::Point(latest)).await;
    support::assert_same(
        "the live replica after revert",
        &rig.replica("root", &At::Live).await,
        &point,
    );
    let report = rig.engine.run_cycle(SystemTime::now()).await.unwrap();
    assert!(report.point.is_some());
    rig.assert_latest_point_matches_its_view().await;
    let manifest = rig.store.manifest(&rig.vm).await.unwrap().unwrap();
    let n = manifest.points.len();
    assert!(
        n >= 3,
        "the pending cycle and the new one each cut a point: {n}"
    );
}

/// The source VM is gone for good (its host lost: the daemon killed, its socket refusing):
/// disabling still succeeds, keeping or deleting the replica, so that a ProtectedVM's
/// finalizer lets go instead of holding the object on `VmNotFound` forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disable_succeeds_when_the_source_vm_is_gone() {
    for delete_replica in [false, true] {
        let mut rig = rig(&[("root", 4 * MIB)], settings()).await;
        rig.protect().await;
        rig.qsd.kill();
        let left = rig.engine.disable(delete_replica).await.unwrap();
        assert_eq!(rig.engine.state().phase, EnginePhase::Disabled);
        assert!(
            left.len() == 1 && left[0].starts_with("change tracking was not stopped on the source"),
            "what was left on the source is said: {left:?}"
        );
        let manifest = rig.store.manifest(&rig.vm).await.unwrap();
        assert_eq!(
            manifest.is_none(),
            delete_replica,
            "delete_replica {delete_replica}"
        );
    }
}
