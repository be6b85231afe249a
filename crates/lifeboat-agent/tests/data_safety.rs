//! No silent corruption (issue 16), end to end: the engine on a real qemu-storage-daemon and
//! the real local store, wrapped in test doubles that lose what the store contract does not
//! promise to keep. Every check compares a recovery point with the source, byte for byte.

// A failed unwrap is the test failure report.
#![allow(clippy::unwrap_used)]

mod support;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::SystemTime;

use lifeboat_engine::Replicator;
use lifeboat_engine::replicator::{Output, PointChoice};
use lifeboat_sim::store::SimStore;
use lifeboat_sim::world::World;
use lifeboat_store::local::LocalStore;
use lifeboat_store::{At, MAX_WRITE_BYTES, ReplicaStore, VmKey};
use support::Qsd;
use support::engine::{self, no_progress, replica, settings};
use support::faults::FaultInjectingStore;

const MIB: u64 = 1024 * 1024;

/// The engine on `qsd`, on the QEMU hypervisor as it is.
async fn open_engine(qsd: &Qsd, dir: &Path, store: Arc<dyn ReplicaStore>) -> Replicator {
    let hypervisor = Arc::new(engine::qemu(qsd, dir));
    engine::open_engine(dir, engine::disks(qsd), hypervisor, store, settings()).await
}

/// Every disk of the latest point equals the source as it is now (the guest is idle).
async fn assert_latest_point_equals_source(qsd: &Qsd, store: &dyn ReplicaStore, vm: &VmKey) {
    let manifest = store.manifest(vm).await.unwrap().unwrap();
    let point = manifest.latest().unwrap().clone();
    for (disk, size) in &qsd.disks {
        support::assert_same(
            &format!("disk {disk} at point {} (cycle {})", point.id, point.cycle),
            &replica(store, vm, disk, *size, &At::Point(point.id.clone())).await,
            &qsd.read_disk(disk),
        );
    }
}

/// Defect 1: a checkpoint of the initial copy (the block map and the cursor) must only claim
/// data the store made durable. The store dies on the first write of disk 2, right after
/// disk 1's end-of-disk checkpoint, then loses power; the agent restarts and resumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_power_cut_after_a_copy_checkpoint_loses_nothing_it_claims() {
    let dir = tempfile::tempdir().unwrap();
    let qsd = Qsd::start(dir.path(), &[("root", 32 * MIB), ("data", 32 * MIB)]);
    // Every byte non-zero, so the copy writes whole disks in Put Page sized pieces.
    qsd.guest_writes("root", &[(0, 16 * MIB, 0x51), (16 * MIB, 16 * MIB, 0x52)]);
    qsd.guest_writes("data", &[(0, 16 * MIB, 0x53), (16 * MIB, 16 * MIB, 0x54)]);
    // The simulation's store durability layer, with no fault of its own: what a power cut
    // may lose is what was never flushed.
    let store = Arc::new(FaultInjectingStore::new(SimStore::new(
        Arc::new(LocalStore::open(dir.path().join("store")).unwrap()),
        Arc::new(World::new(0)),
    )));
    let mut engine = open_engine(&qsd, dir.path(), store.clone()).await;
    let vm = engine.vm().clone();
    engine
        .enable()
        .await
        .unwrap_or_else(|e| panic!("enable: {e}"));

    // Disk 1 takes 32 MiB / 4 MiB writes; the next one, disk 2's first, fails.
    store
        .writes_left
        .store(32 * MIB / MAX_WRITE_BYTES, Ordering::SeqCst);
    let error = engine
        .initial_copy(&no_progress)
        .await
        .expect_err("the copy fails when the store goes away");
    eprintln!("the copy stopped: {error}");
    let cursor = engine.state().copy.clone().expect("a cursor was saved");
    assert_eq!(
        (cursor.disk_index, cursor.offset),
        (1, 0),
        "the copy stopped at the start of disk 2, after disk 1's checkpoint"
    );

    // The power goes: what the store never made durable is gone. The engine's own state
    // file was fsync'd: it survives.
    store.down.store(false, Ordering::SeqCst);
    store.writes_left.store(u64::MAX, Ordering::SeqCst);
    let lost = store.inner.lose_unflushed().await.unwrap();
    eprintln!("the power cut undid {lost} bytes of unflushed writes");
    drop(engine);

    // The agent restarts and resumes the copy from its cursor.
    let mut engine = open_engine(&qsd, dir.path(), store.clone()).await;
    let report = engine
        .initial_copy(&no_progress)
        .await
        .unwrap_or_else(|e| panic!("resumed copy: {e}"));
    eprintln!(
        "resumed copy: {} bytes sent, {} zeroed",
        report.bytes_sent, report.bytes_zeroed
    );
    assert!(
        report.bytes_sent < 64 * MIB,
        "the resumed copy did not send disk 1 again: {report:?}"
    );
    engine::finalize(&mut engine).await;
    assert_latest_point_equals_source(&qsd, store.as_ref(), &vm).await;
}

/// Defect 7: enabling protection again after a disable that kept the replica must not keep
/// the replica's stale data where the source now reads as zeros.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enabling_again_over_a_kept_replica_leaves_no_stale_data() {
    let dir = tempfile::tempdir().unwrap();
    let qsd = Qsd::start(dir.path(), &[("root", 64 * MIB)]);
    qsd.guest_write("root", 0, 8 * MIB, 0x42);
    let store = Arc::new(LocalStore::open(dir.path().join("store")).unwrap());
    let mut engine = open_engine(&qsd, dir.path(), store.clone()).await;
    let vm = engine.vm().clone();
    engine.enable().await.unwrap();
    let first = engine.initial_copy(&no_progress).await.unwrap();
    eprintln!(
        "first copy (new replica): {} bytes sent, {} zeroed",
        first.bytes_sent, first.bytes_zeroed
    );
    assert_eq!(
        (first.bytes_sent, first.bytes_zeroed),
        (8 * MIB, 0),
        "a new replica: only the data is sent, nothing zeroed"
    );
    engine.run_cycle(SystemTime::now()).await.unwrap();
    assert_latest_point_equals_source(&qsd, store.as_ref(), &vm).await;

    // Protection off, the replica kept; the guest zeroes what the replica holds.
    engine.disable(false).await.unwrap();
    qsd.guest_write("root", 0, 8 * MIB, 0x00);

    engine.enable().await.unwrap();
    let again = engine.initial_copy(&no_progress).await.unwrap();
    eprintln!(
        "copy into the kept replica: {} bytes sent, {} zeroed",
        again.bytes_sent, again.bytes_zeroed
    );
    let report = engine.run_cycle(SystemTime::now()).await.unwrap();
    assert!(report.point.is_some(), "finalize cut a point");
    assert_latest_point_equals_source(&qsd, store.as_ref(), &vm).await;

    // A test failover of the new point passes its digest check and equals the source.
    let out = dir.path().join("test-failover");
    let failover = engine
        .materialise(
            &PointChoice::Latest,
            Output::raw(&out),
            "test",
            &no_progress,
        )
        .await
        .unwrap_or_else(|e| panic!("test failover: {e}"));
    for disk in &failover.disks {
        support::assert_same(
            &format!("test failover disk {}", disk.name),
            &std::fs::read(&disk.path).unwrap(),
            &qsd.read_disk(&disk.name),
        );
    }
}

/// The fix for defect 7 costs nothing in the common case: a fresh copy into a new replica
/// still skips zeros, written (allocated) or never written, and sends only the data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_copy_into_a_new_replica_sends_no_zeros() {
    let dir = tempfile::tempdir().unwrap();
    let qsd = Qsd::start(dir.path(), &[("root", 64 * MIB), ("data", 32 * MIB)]);
    qsd.guest_writes(
        "root",
        &[
            (0, 4 * MIB, 0x61),
            (8 * MIB, 8 * MIB, 0x00),
            (40 * MIB, 4 * MIB, 0x62),
        ],
    );
    qsd.guest_writes("data", &[(MIB, MIB, 0x63), (4 * MIB, 4 * MIB, 0x00)]);
    let store = Arc::new(LocalStore::open(dir.path().join("store")).unwrap());
    let mut engine = open_engine(&qsd, dir.path(), store.clone()).await;
    let vm = engine.vm().clone();
    engine.enable().await.unwrap();
    let report = engine.initial_copy(&no_progress).await.unwrap();
    eprintln!(
        "fresh copy: {} bytes sent, {} zeroed, {} read",
        report.bytes_sent, report.bytes_zeroed, report.bytes_read
    );
    assert_eq!(report.bytes_zeroed, 0, "no zero range sent: {report:?}");
    assert_eq!(report.bytes_sent, 9 * MIB, "only the data sent: {report:?}");
    engine.run_cycle(SystemTime::now()).await.unwrap();
    assert_latest_point_equals_source(&qsd, store.as_ref(), &vm).await;
}
