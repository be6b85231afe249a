//! No silent corruption (issue 16), defect 2: a cycle whose apply failed halfway leaves the
//! live replica ahead of the latest point, and the block map stored beside it (which
//! describes the latest point) no longer describes it. A resync that follows in the same
//! process (no restart, so no revert at open) must not trust that map as it stands.
//!
//! The engine runs on a real qemu-storage-daemon and the real local store, wrapped so that
//! the store goes down after a few writes. In every scenario the half-applied data differs
//! from the source's final content: the guest writes over the same blocks again (zeros, the
//! content the old point and its map hold) before the resync, so a resync that trusts the
//! stale map sees nothing to send and leaves the half-applied data in the new point.

// A failed unwrap is the test failure report.
#![allow(clippy::unwrap_used)]

mod support;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::SystemTime;

use lifeboat_engine::replicator::PointChoice;
use lifeboat_engine::state::EnginePhase;
use lifeboat_engine::{Replicator, Settings};
use lifeboat_store::local::LocalStore;
use lifeboat_store::{At, ReplicaStore, VmKey};
use support::Qsd;
use support::engine::{self, no_progress, replica, settings};
use support::faults::FaultInjectingStore;

const MIB: u64 = 1024 * 1024;

struct Rig {
    _dir: tempfile::TempDir,
    qsd: Qsd,
    store: Arc<FaultInjectingStore<LocalStore>>,
    engine: Replicator,
    vm: VmKey,
}

async fn open_engine(
    qsd: &Qsd,
    dir: &Path,
    store: Arc<FaultInjectingStore<LocalStore>>,
    settings: Settings,
) -> Replicator {
    let hypervisor = Arc::new(engine::qemu(qsd, dir));
    engine::open_engine(dir, engine::disks(qsd), hypervisor, store, settings).await
}

/// The disks (the first one 32 MiB, "root"), protected (copied and finalized: one point),
/// applying one store write at a time so that "the store dies after N writes" is exact.
async fn protected(disks: &[(&str, u64)], threshold_percent: u32) -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let qsd = Qsd::start(dir.path(), disks);
    qsd.guest_write("root", 20 * MIB, MIB, 0x17);
    let store = Arc::new(FaultInjectingStore::new(
        LocalStore::open(dir.path().join("store")).unwrap(),
    ));
    let settings = Settings {
        upload_concurrency: 1,
        log_threshold_percent: threshold_percent,
        ..settings()
    };
    let mut engine = open_engine(&qsd, dir.path(), store.clone(), settings).await;
    let vm = engine.vm().clone();
    engine::protect(&mut engine).await;
    Rig {
        _dir: dir,
        qsd,
        store,
        engine,
        vm,
    }
}

impl Rig {
    /// After a cycle shipped straight from its view (no log) failed with `error` as the store
    /// went down half way: the failure is recoverable, the live replica marked as being
    /// written, no log kept, no point cut after `before`. The store is then back.
    async fn half_shipped_straight(&self, error: &lifeboat_engine::EngineError, before: &str) {
        eprintln!("the cycle failed half way: {error}");
        assert!(error.is_recoverable(), "{error}");
        assert!(
            self.engine.state().applying,
            "the changes were being shipped"
        );
        assert!(
            self.engine.state().pending.is_empty(),
            "no log was written: the changes stay with the view"
        );
        self.store.down.store(false, Ordering::SeqCst);
        self.store.writes_left.store(u64::MAX, Ordering::SeqCst);
        assert_eq!(self.latest().await, before, "no point was cut");
    }

    /// The agent restarts: the engine is opened again on the same folder and store.
    async fn restart(&mut self) {
        let dir = self._dir.path().to_owned();
        let settings = Settings {
            upload_concurrency: 1,
            ..settings()
        };
        self.engine = open_engine(&self.qsd, &dir, self.store.clone(), settings).await;
    }

    async fn latest(&self) -> String {
        let manifest = self.store.manifest(&self.vm).await.unwrap().unwrap();
        manifest.latest().unwrap().id.clone()
    }

    async fn replica(&self, at: &At) -> Vec<u8> {
        self.replica_of("root", at).await
    }

    async fn replica_of(&self, disk: &str, at: &At) -> Vec<u8> {
        let size = self.qsd.spec(disk).size;
        replica(self.store.as_ref(), &self.vm, disk, size, at).await
    }

    /// The guest writes 6 MiB of 0x41 at the start of the disk; the cycle that ships them
    /// fails after 3 of its 6 store writes (one per 1 MiB log entry): the live replica holds
    /// half of them, the latest point none. The store is then back.
    async fn half_apply_a_cycle(&mut self) {
        self.qsd.guest_write("root", 0, 6 * MIB, 0x41);
        self.store.writes_left.store(3, Ordering::SeqCst);
        let error = self
            .engine
            .run_cycle(SystemTime::now())
            .await
            .expect_err("the store went down while applying");
        eprintln!("the cycle failed halfway: {error}");
        assert!(error.is_recoverable(), "{error}");
        assert!(self.engine.state().applying, "a cycle was being applied");
        assert_eq!(self.engine.state().pending.len(), 1, "its log is kept");
        self.store.down.store(false, Ordering::SeqCst);
        self.store.writes_left.store(u64::MAX, Ordering::SeqCst);
        let live = self.replica(&At::Live).await;
        let half = live[..6 * MIB as usize]
            .chunks(MIB as usize)
            .filter(|c| c.iter().all(|&b| b == 0x41))
            .count();
        eprintln!("the live replica holds {half} MiB of the cycle's 6 MiB");
        assert!(
            half > 0 && half < 6,
            "the live replica is half applied: {half} MiB"
        );
    }

    /// The latest point, and the live replica, equal the source as it is now, on every disk.
    async fn assert_replica_equals_source(&self, what: &str) {
        let point = self.latest().await;
        for (disk, _) in &self.qsd.disks {
            let source = self.qsd.read_disk(disk);
            support::assert_same(
                &format!("{what}: disk {disk} at point {point}"),
                &self.replica_of(disk, &At::Point(point.clone())).await,
                &source,
            );
            support::assert_same(
                &format!("{what}: disk {disk}, the live replica"),
                &self.replica_of(disk, &At::Live).await,
                &source,
            );
        }
    }
}

/// The logs pass the threshold in the same process after a half-applied cycle: the resync
/// that follows compares the source with a map that describes the replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resync_after_a_half_applied_cycle_and_the_threshold_equals_the_source() {
    // 25 % of 32 MiB: 8 MiB of logs. The first cycle's 6 MiB log is under it, the second
    // cycle's 6 MiB brings the total over it.
    let mut rig = protected(&[("root", 32 * MIB)], 25).await;
    rig.half_apply_a_cycle().await;

    // The guest writes zeros over the same blocks: what the old point (and its map) holds.
    // The store is away again while the next cycle seals its log: the logs pass the
    // threshold, and the live replica cannot be put back yet.
    rig.qsd.guest_write("root", 0, 6 * MIB, 0x00);
    rig.store.down.store(true, Ordering::SeqCst);
    let report = rig.engine.run_cycle(SystemTime::now()).await.unwrap();
    assert!(
        report
            .resync_required
            .as_deref()
            .unwrap_or_default()
            .starts_with("LogThresholdReached"),
        "{report:?}"
    );
    eprintln!("threshold cycle warnings: {:?}", report.warnings);
    assert!(
        rig.engine.state().pending.is_empty(),
        "the logs are dropped"
    );
    rig.store.down.store(false, Ordering::SeqCst);

    let report = rig
        .engine
        .resync(SystemTime::now(), &no_progress)
        .await
        .unwrap_or_else(|e| panic!("resync: {e}"));
    eprintln!(
        "resync: {} bytes sent, {} zeroed, {} read",
        report.bytes_sent, report.bytes_zeroed, report.bytes_read
    );
    assert_eq!(rig.engine.state().phase, EnginePhase::Protected);
    assert!(!rig.engine.state().applying);
    rig.assert_replica_equals_source("after the resync").await;
    rig.engine.run_cycle(SystemTime::now()).await.unwrap();
    rig.assert_replica_equals_source("after the next cycle")
        .await;
}

/// A resync asked for directly while the failed cycle is still marked as being applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resync_requested_after_a_half_applied_cycle_equals_the_source() {
    let mut rig = protected(&[("root", 32 * MIB)], 50).await;
    rig.half_apply_a_cycle().await;
    rig.qsd.guest_write("root", 0, 6 * MIB, 0x00);
    rig.engine.require_resync("requested by the test").unwrap();
    let report = rig
        .engine
        .resync(SystemTime::now(), &no_progress)
        .await
        .unwrap_or_else(|e| panic!("resync: {e}"));
    eprintln!(
        "resync: {} bytes sent, {} zeroed, {} read",
        report.bytes_sent, report.bytes_zeroed, report.bytes_read
    );
    assert!(rig.engine.state().pending.is_empty());
    assert!(!rig.engine.state().applying);
    rig.assert_replica_equals_source("after the resync").await;
}

/// A cycle found to hold a corrupt log after another disk's log of it was applied: the live
/// replica is put back to the latest point at once (the resync would otherwise trust a map
/// that does not describe it), and the resync brings it to the source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_log_found_while_applying_puts_the_live_replica_back() {
    let mut rig = protected(&[("root", 32 * MIB), ("data", 16 * MIB)], 50).await;
    let before = rig.latest().await;
    // The cycle's logs are sealed while the store is away; the second disk's is damaged.
    // When the store is back, the first disk's log applies, the second fails its checks.
    rig.store.down.store(true, Ordering::SeqCst);
    rig.qsd.guest_write("root", 0, 4 * MIB, 0x51);
    rig.qsd.guest_write("data", 0, MIB, 0x52);
    assert!(rig.engine.run_cycle(SystemTime::now()).await.is_err());
    assert_eq!(rig.engine.state().pending.len(), 1);
    let log = rig.engine.state().pending[0].logs[1].clone();
    assert_eq!(log.disk, "data");
    let mut bytes = std::fs::read(&log.path).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x5A;
    std::fs::write(&log.path, &bytes).unwrap();
    rig.store.down.store(false, Ordering::SeqCst);
    // The guest puts back what the point holds: the half-applied data differs from it.
    rig.qsd.guest_write("root", 0, 4 * MIB, 0x00);

    let report = rig.engine.run_cycle(SystemTime::now()).await.unwrap();
    let reason = report.resync_required.clone().unwrap_or_default();
    assert!(reason.starts_with("CorruptLog"), "{report:?}");
    assert_eq!(
        rig.latest().await,
        before,
        "nothing of the cycle became a point"
    );
    support::assert_same(
        "the live replica after the corrupt log",
        &rig.replica(&At::Live).await,
        &rig.replica(&At::Point(before)).await,
    );
    rig.engine
        .resync(SystemTime::now(), &no_progress)
        .await
        .unwrap_or_else(|e| panic!("resync: {e}"));
    rig.assert_replica_equals_source("after the resync").await;
}

/// A planned failover ships the stopped VM's last writes straight from its view to the store
/// (no log, `Replicator::run_direct_cycle`). The store goes down half way through them: the
/// failover fails, recoverable, the VM is not failed over and the latest point is the old
/// one, while the live replica is half applied. Asked again once the store is back, in the
/// same process (`restart` false) or after the agent restarts (the engine opened again,
/// which puts the live replica back to the latest point), the failover's point holds every
/// write the guest made before the stop.
async fn planned_failover_after_a_half_shipped_last_cycle(restart: bool) {
    let mut rig = protected(&[("root", 32 * MIB)], 50).await;
    let before = rig.latest().await;
    rig.qsd.guest_write("root", 0, 6 * MIB, 0x41);
    rig.qsd.guest_write("root", 12 * MIB, 64 * 1024, 0x42);
    let source = rig.qsd.read_disk("root");
    rig.store.writes_left.store(3, Ordering::SeqCst);
    let error = rig
        .engine
        .fail_over_to_primary(true, &PointChoice::Latest, SystemTime::now())
        .await
        .expect_err("the store went down while shipping");
    assert_eq!(rig.engine.state().phase, EnginePhase::Protected);
    rig.half_shipped_straight(&error, &before).await;
    let live = rig.replica(&At::Live).await;
    let half = live[..6 * MIB as usize]
        .chunks(MIB as usize)
        .filter(|c| c.iter().all(|&b| b == 0x41))
        .count();
    assert!(
        half > 0 && half < 6,
        "the live replica is half applied: {half} MiB"
    );

    if restart {
        rig.restart().await;
        support::assert_same(
            "the live replica once the agent restarted",
            &rig.replica(&At::Live).await,
            &rig.replica(&At::Point(before.clone())).await,
        );
    }
    let report = rig
        .engine
        .fail_over_to_primary(true, &PointChoice::Latest, SystemTime::now())
        .await
        .unwrap_or_else(|e| panic!("the planned failover asked again: {e}"));
    assert_ne!(report.point.id, before);
    assert_eq!(rig.latest().await, report.point.id);
    assert_eq!(
        rig.engine.state().phase,
        EnginePhase::FailedOver {
            point: report.point.id.clone()
        }
    );
    assert!(!rig.engine.state().applying);
    support::assert_same(
        "the failover's point",
        &rig.replica(&At::Point(report.point.id.clone())).await,
        &source,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_planned_failover_whose_last_writes_half_shipped_loses_nothing_asked_again() {
    planned_failover_after_a_half_shipped_last_cycle(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_planned_failover_whose_last_writes_half_shipped_loses_nothing_after_a_restart() {
    planned_failover_after_a_half_shipped_last_cycle(true).await;
}

/// A planned failback's fresh point is shipped straight from the running VM's view (no log,
/// `Replicator::ship_before_stop`). The store goes down half way through: the step fails,
/// recoverable, with no point cut and no log written, the live replica half applied; the
/// guest writes on (over some of those blocks and elsewhere). Asked again once the store is
/// back (in the same process, or after the agent restarts), the fresh point equals the disk:
/// the abandoned view's changes came back into tracking, none was lost. What is simulated is
/// a store outage, not a crash: the restart opens the engine again in this process after the
/// failed step ended cleanly (QEMU and the page cache untouched); nothing is claimed about a
/// SIGKILL mid-ship or a power cut.
async fn fresh_point_after_a_half_shipped_running_cycle(restart: bool) {
    let mut rig = protected(&[("root", 32 * MIB)], 50).await;
    let before = rig.latest().await;
    rig.qsd.guest_write("root", 0, 6 * MIB, 0x41);
    rig.store.writes_left.store(3, Ordering::SeqCst);
    let error = rig
        .engine
        .ship_before_stop(SystemTime::now())
        .await
        .expect_err("the store went down while shipping");
    rig.half_shipped_straight(&error, &before).await;
    // The VM runs on: it rewrites part of what was half shipped, and writes elsewhere.
    rig.qsd.guest_write("root", 2 * MIB, MIB, 0x43);
    rig.qsd.guest_write("root", 16 * MIB, 64 * 1024, 0x44);
    if restart {
        rig.restart().await;
    }
    let report = rig
        .engine
        .ship_before_stop(SystemTime::now())
        .await
        .unwrap_or_else(|e| panic!("the failback's first step asked again: {e}"));
    let point = report.point.expect("a fresh point").id;
    assert_ne!(point, before);
    assert!(!rig.engine.state().applying);
    assert_eq!(rig.engine.state().phase, EnginePhase::Protected);
    support::assert_same(
        "the fresh point",
        &rig.replica(&At::Point(point)).await,
        &rig.qsd.read_disk("root"),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_point_half_shipped_from_the_running_vm_loses_nothing_asked_again() {
    fresh_point_after_a_half_shipped_running_cycle(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_point_half_shipped_from_the_running_vm_loses_nothing_after_a_restart() {
    fresh_point_after_a_half_shipped_running_cycle(true).await;
}
