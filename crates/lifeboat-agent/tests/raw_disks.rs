//! End to end: the disks KVM users actually have (raw image files, block devices) on a real
//! qemu-storage-daemon, beside qcow2. Their change tracking lives in QEMU's memory only: a
//! restart of QEMU loses it, the engine notices (never a silently missed write) and
//! resynchronizes that disk alone, sending only the blocks that differ. A qcow2 disk keeps its
//! bitmap across a clean restart, but not across a crash (SIGKILL). Every check compares the
//! replica with the disk as the guest sees it, byte for byte.

// A failed unwrap is the test failure report.
#![allow(clippy::unwrap_used)]

mod support;

use std::sync::Arc;
use std::time::SystemTime;

use lifeboat_engine::backend::{DiskInfo, DiskRef, Hypervisor, Tracking, TrackingDurability};
use lifeboat_engine::replicator::{Output, PointChoice};
use lifeboat_engine::state::EnginePhase;
use lifeboat_engine::{Replicator, Report};
use lifeboat_qemu::QemuHypervisor;
use lifeboat_qemu::testing::{DiskSpec, LoopDevice};
use lifeboat_store::local::LocalStore;
use lifeboat_store::{At, ReplicaStore, VmKey};
use support::engine::{self, disk_refs, no_progress, settings};
use support::{Qsd, assert_same};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
/// The engine's block (the default settings'): what a resync compares and sends.
const BLOCK: u64 = 64 * KIB;

struct Rig {
    // NB: dropped in this order: the daemon stops before its folder goes.
    qsd: Qsd,
    engine: Replicator,
    hypervisor: Arc<QemuHypervisor>,
    store: Arc<LocalStore>,
    disks: Vec<DiskRef>,
    vm: VmKey,
    dir: tempfile::TempDir,
}

/// The rig with the engine's disks each served by the node `node` names for it.
async fn rig_with_nodes(specs: &[DiskSpec], node: impl Fn(&str) -> String) -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let qsd = Qsd::start_with(dir.path(), specs);
    let store = Arc::new(LocalStore::open(dir.path().join("store")).unwrap());
    let hypervisor = Arc::new(engine::qemu(&qsd, dir.path()));
    let disks = disk_refs(&qsd, node);
    let engine = engine::open_engine(
        dir.path(),
        disks.clone(),
        hypervisor.clone(),
        store.clone(),
        settings(),
    )
    .await;
    let vm = engine.vm().clone();
    Rig {
        qsd,
        engine,
        hypervisor,
        store,
        disks,
        vm,
        dir,
    }
}

async fn rig(specs: &[DiskSpec]) -> Rig {
    rig_with_nodes(specs, str::to_owned).await
}

fn info<'a>(infos: &'a [DiskInfo], disk: &str) -> &'a DiskInfo {
    infos
        .iter()
        .find(|i| i.name == disk)
        .unwrap_or_else(|| panic!("enable said nothing of disk {disk:?}: {infos:?}"))
}

fn assert_in_memory(infos: &[DiskInfo], disk: &str, format: &str) {
    let info = info(infos, disk);
    assert_eq!(info.format, format, "format of disk {disk:?}: {info:?}");
    match &info.durability {
        TrackingDurability::InMemory(why) => assert!(
            why.contains(format) && why.contains("resync"),
            "disk {disk:?}: the reason names the format and what a restart costs: {why}"
        ),
        TrackingDurability::Persistent => {
            panic!("a {format} disk cannot store a bitmap, yet {disk:?} is Persistent: {info:?}")
        }
    }
}

fn assert_persistent(infos: &[DiskInfo], disk: &str) {
    let info = info(infos, disk);
    assert_eq!(info.format, "qcow2", "format of disk {disk:?}: {info:?}");
    assert_eq!(
        info.durability,
        TrackingDurability::Persistent,
        "a writable qcow2 v3 keeps a persistent bitmap: {info:?}"
    );
}

impl Rig {
    fn size(&self, disk: &str) -> u64 {
        self.qsd.spec(disk).size
    }

    async fn replica(&self, disk: &str, at: &At) -> Vec<u8> {
        engine::replica(self.store.as_ref(), &self.vm, disk, self.size(disk), at).await
    }

    /// The latest point and the live replica equal every disk as the guest sees it now
    /// (no guest writes since the last cycle or resync).
    async fn assert_replica_equals_source(&self, when: &str) {
        let manifest = self.store.manifest(&self.vm).await.unwrap().unwrap();
        let latest = manifest.latest().unwrap().id.clone();
        for (disk, _) in &self.qsd.disks {
            let source = self.qsd.read_disk(disk);
            assert_same(
                &format!("{when}: disk {disk} at the latest point {latest}"),
                &self.replica(disk, &At::Point(latest.clone())).await,
                &source,
            );
            assert_same(
                &format!("{when}: disk {disk}, live replica"),
                &self.replica(disk, &At::Live).await,
                &source,
            );
        }
    }

    async fn tracking(&self) -> Vec<Tracking> {
        self.hypervisor
            .tracking(&self.disks)
            .await
            .unwrap_or_else(|e| panic!("tracking: {e}"))
    }

    /// Enable, copy and finalize: the first point equals the source.
    async fn protect(&mut self) -> Vec<DiskInfo> {
        let infos = engine::protect(&mut self.engine).await;
        self.assert_replica_equals_source("after the initial copy")
            .await;
        infos
    }

    /// A cycle that ships the changes and cuts a point.
    async fn cycle(&mut self, when: &str) -> Report {
        let report = self
            .engine
            .run_cycle(SystemTime::now())
            .await
            .unwrap_or_else(|e| panic!("cycle {when}: {e}"));
        assert_eq!(report.resync_required, None, "cycle {when}: {report:?}");
        assert!(report.point.is_some(), "cycle {when} cut a point");
        report
    }

    /// After QEMU restarted: the next cycle finds the tracking lost and asks for a resync
    /// naming `lost_disk`.
    async fn cycle_requires_resync(&mut self, lost_disk: &str) -> String {
        let report = self
            .engine
            .run_cycle(SystemTime::now())
            .await
            .unwrap_or_else(|e| panic!("cycle after the restart: {e}"));
        let reason = report.resync_required.clone().unwrap_or_else(|| {
            panic!("a cycle after tracking was lost must require a resync: {report:?}")
        });
        assert!(
            reason.starts_with("TrackingLost") && reason.contains(&format!("{lost_disk:?}")),
            "the reason names the lost tracking and disk {lost_disk:?}: {reason}"
        );
        assert!(report.point.is_none(), "no point from a lost tracking");
        assert!(
            matches!(
                self.engine.state().phase,
                EnginePhase::ResyncRequired { .. }
            ),
            "{:?}",
            self.engine.state().phase
        );
        // Nothing ships until the resync ran.
        let refused = self.engine.run_cycle(SystemTime::now()).await;
        assert!(refused.is_err(), "a cycle before the resync: {refused:?}");
        reason
    }

    async fn resync(&mut self) -> Report {
        let report = self
            .engine
            .resync(SystemTime::now(), &no_progress)
            .await
            .unwrap_or_else(|e| panic!("resync: {e}"));
        assert!(report.point.is_some(), "the resync cut a point");
        assert_eq!(self.engine.state().phase, EnginePhase::Protected);
        report
    }

    /// Write one block at each offset (block aligned, all different), returning how many.
    fn write_blocks(&self, disk: &str, offsets: &[u64], pattern: u8) -> u64 {
        let writes: Vec<(u64, u64, u8)> = offsets
            .iter()
            .map(|&offset| {
                assert!(offset.is_multiple_of(BLOCK) && offset + BLOCK <= self.size(disk));
                (offset, BLOCK, pattern)
            })
            .collect();
        self.qsd.guest_writes(disk, &writes);
        offsets.len() as u64
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raw_image_is_protected_and_a_restart_of_qemu_costs_a_resync_of_that_disk_only() {
    let size = 64 * MIB;
    let mut rig = rig(&[
        DiskSpec::qcow2("root", size),
        DiskSpec::raw_file("data", size),
    ])
    .await;
    // The guest filled its raw data disk (so that reading it in full costs its size) and
    // wrote here and there on its system disk.
    rig.qsd.guest_write("data", 0, size, 0x5a);
    rig.qsd
        .guest_writes("root", &[(0, MIB, 0x11), (20 * MIB, 2 * MIB, 0x12)]);

    let infos = rig.protect().await;
    assert_persistent(&infos, "root");
    assert_in_memory(&infos, "data", "raw");
    let records = &rig.engine.state().disks;
    assert!(
        records
            .iter()
            .any(|r| r.name == "data" && r.format == "raw" && !r.tracking_survives_restart),
        "the state keeps what enable said of the raw disk: {records:?}"
    );

    // The guest writes on both; cycles ship it.
    rig.qsd
        .guest_writes("root", &[(5 * MIB, 300 * KIB, 0x21), (40 * MIB, MIB, 0x22)]);
    rig.qsd
        .guest_writes("data", &[(MIB, 2 * MIB, 0x23), (50 * MIB, 128 * KIB, 0x24)]);
    let shipped = rig.cycle("after the first writes").await;
    assert!(
        shipped.bytes_read < 8 * MIB,
        "a cycle reads only the changes, on the raw disk too: {shipped:?}"
    );
    rig.assert_replica_equals_source("after a cycle").await;
    rig.qsd.guest_write("data", 60 * MIB, 64 * KIB, 0x25);
    rig.cycle("after more writes").await;
    rig.assert_replica_equals_source("after the second cycle")
        .await;

    // Test failover: the materialised disks equal the source.
    let out = rig.dir.path().join("test-failover");
    let failover = rig
        .engine
        .materialise(
            &PointChoice::Latest,
            Output::raw(&out),
            "test",
            &no_progress,
        )
        .await
        .unwrap_or_else(|e| panic!("materialise: {e}"));
    assert_eq!(failover.disks.len(), 2, "{failover:?}");
    for disk in &failover.disks {
        assert_same(
            &format!("test failover disk {}", disk.name),
            &std::fs::read(&disk.path).unwrap(),
            &rig.qsd.read_disk(&disk.name),
        );
    }
    rig.engine
        .remove_materialised(&out, "test", &["root".into(), "data".into()])
        .unwrap();

    // A few blocks change on each disk, then QEMU restarts cleanly on the same images.
    let changed = rig.write_blocks("root", &[3 * MIB, 30 * MIB, size - BLOCK], 0x31)
        + rig.write_blocks(
            "data",
            &[MIB + BLOCK, 17 * MIB, 40 * MIB, size - BLOCK],
            0x32,
        );
    let guest_saw: Vec<Vec<u8>> = ["root", "data"]
        .iter()
        .map(|d| rig.qsd.read_disk(d))
        .collect();
    rig.qsd.stop();
    // Stopped cleanly, the images hold what the guest wrote (read from the files now).
    for (disk, saw) in ["root", "data"].iter().zip(&guest_saw) {
        assert_same(
            &format!("disk {disk} on its image after the clean stop"),
            &rig.qsd.read_disk(disk),
            saw,
        );
    }
    rig.qsd.start_again();
    let tracking = rig.tracking().await;
    assert_eq!(
        tracking[0],
        Tracking::Active,
        "the qcow2 disk's persistent bitmap survives a clean restart: {tracking:?}"
    );
    assert!(
        matches!(&tracking[1], Tracking::Lost(_)),
        "the raw disk's in-memory bitmap is gone with QEMU: {tracking:?}"
    );

    let reason = rig.cycle_requires_resync("data").await;
    let report = rig.resync().await;
    eprintln!(
        "raw + qcow2 after a clean restart: {reason}\n  resync: compared in full {:?}, read {} bytes, \
         sent {} bytes, zeroed {}; {changed} changed blocks of {BLOCK} = {} bytes; disks of {size} bytes each",
        report.disks_compared_in_full,
        report.bytes_read,
        report.bytes_sent,
        report.bytes_zeroed,
        changed * BLOCK
    );
    assert_eq!(
        report.disks_compared_in_full,
        vec!["data".to_owned()],
        "only the disk whose tracking was lost is compared in full: {report:?}"
    );
    assert!(
        report.bytes_read >= size,
        "the raw disk (fully allocated) is read in full: {report:?}"
    );
    assert!(
        report.bytes_read < size + 4 * MIB,
        "the qcow2 disk costs only its changed blocks, not its {size} bytes: {report:?}"
    );
    assert!(
        report.bytes_sent <= changed * BLOCK,
        "only the changed blocks are sent ({changed} of {BLOCK}): {report:?}"
    );
    assert_eq!(
        report.bytes_sent,
        changed * BLOCK,
        "every changed block differs from the replica, so each is sent: {report:?}"
    );
    rig.assert_replica_equals_source("after the resync").await;
    assert_eq!(
        rig.tracking().await,
        vec![Tracking::Active, Tracking::Active]
    );

    // Cycles resume.
    rig.write_blocks("root", &[7 * MIB], 0x41);
    rig.write_blocks("data", &[9 * MIB, 33 * MIB], 0x42);
    let report = rig.cycle("after the resync").await;
    assert!(report.bytes_read < 4 * MIB, "{report:?}");
    rig.assert_replica_equals_source("after a cycle following the resync")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_loop_block_device_is_protected() {
    let size = 64 * MIB;
    // NB: declared before the rig, so dropped after it: the daemon lets go of the device
    // before it is detached, and the backing file outlives both.
    let backing = tempfile::tempdir().unwrap();
    let file = backing.path().join("lv.img");
    std::fs::File::create(&file)
        .and_then(|f| f.set_len(size))
        .unwrap();
    let device = match LoopDevice::attach(&file) {
        Ok(device) => device,
        Err(why) => {
            eprintln!("SKIPPED a_loop_block_device_is_protected: no loop device here ({why})");
            return;
        }
    };
    let mut rig = rig(&[DiskSpec::device("lv", &device.device)]).await;
    assert_eq!(rig.size("lv"), size, "the loop device's size");
    rig.qsd
        .guest_writes("lv", &[(0, 2 * MIB, 0x51), (30 * MIB, 4 * MIB, 0x52)]);

    let infos = rig.protect().await;
    assert_in_memory(&infos, "lv", "host_device");
    assert_eq!(info(&infos, "lv").size_bytes, size);

    rig.qsd
        .guest_writes("lv", &[(MIB, 512 * KIB, 0x53), (60 * MIB, 64 * KIB, 0x54)]);
    rig.cycle("on the device").await;
    rig.assert_replica_equals_source("block device after a cycle")
        .await;

    let changed = rig.write_blocks("lv", &[4 * MIB, 31 * MIB + BLOCK, 50 * MIB], 0x55);
    rig.qsd.restart_clean();
    let tracking = rig.tracking().await;
    assert!(
        matches!(&tracking[0], Tracking::Lost(_)),
        "a block device's in-memory bitmap is gone with QEMU: {tracking:?}"
    );
    let reason = rig.cycle_requires_resync("lv").await;
    let report = rig.resync().await;
    eprintln!(
        "block device after a clean restart: {reason}\n  resync: compared in full {:?}, read {} bytes, \
         sent {} bytes, zeroed {}; {changed} changed blocks of {BLOCK} = {} bytes; device of {size} bytes",
        report.disks_compared_in_full,
        report.bytes_read,
        report.bytes_sent,
        report.bytes_zeroed,
        changed * BLOCK
    );
    assert_eq!(report.disks_compared_in_full, vec!["lv".to_owned()]);
    assert!(
        report.bytes_sent <= changed * BLOCK,
        "only the changed blocks are sent ({changed} of {BLOCK}): {report:?}"
    );
    assert_eq!(report.bytes_sent, changed * BLOCK, "{report:?}");
    rig.assert_replica_equals_source("block device after the resync")
        .await;

    rig.write_blocks("lv", &[8 * MIB], 0x56);
    rig.cycle("on the device after the resync").await;
    rig.assert_replica_equals_source("block device, cycles resumed")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qcow2_disk_after_sigkill_is_resynchronized_never_silently_missed() {
    let size = 32 * MIB;
    let mut rig = rig(&[DiskSpec::qcow2("root", size)]).await;
    rig.qsd.guest_write("root", 0, 4 * MIB, 0x61);
    let infos = rig.protect().await;
    assert_persistent(&infos, "root");
    rig.qsd.guest_write("root", 8 * MIB, MIB, 0x62);
    rig.cycle("before the crash").await;
    rig.assert_replica_equals_source("before the crash").await;

    // Writes just before QEMU is killed: the bitmap recording them never reaches the image.
    let changed = rig.write_blocks("root", &[MIB, 10 * MIB, 20 * MIB], 0x63);
    rig.qsd.restart();
    let tracking = rig.tracking().await;
    assert!(
        matches!(&tracking[0], Tracking::Lost(_)),
        "after SIGKILL the qcow2 bitmap cannot be trusted: {tracking:?}"
    );
    let reason = rig.cycle_requires_resync("root").await;
    let report = rig.resync().await;
    eprintln!(
        "qcow2 after SIGKILL: {reason}\n  resync: compared in full {:?}, read {} bytes, sent {} bytes; \
         {changed} changed blocks of {BLOCK}",
        report.disks_compared_in_full, report.bytes_read, report.bytes_sent
    );
    assert_eq!(report.disks_compared_in_full, vec!["root".to_owned()]);
    assert_eq!(
        report.bytes_sent,
        changed * BLOCK,
        "the writes made just before the kill are sent, and only they: {report:?}"
    );
    rig.assert_replica_equals_source("after the resync following SIGKILL")
        .await;

    // A bitmap that was stored in the image (a clean restart) and then loaded comes back
    // `inconsistent` after a SIGKILL.
    rig.qsd.restart_clean();
    assert_eq!(
        rig.tracking().await,
        vec![Tracking::Active],
        "a clean restart keeps the qcow2 bitmap"
    );
    let changed = rig.write_blocks("root", &[2 * MIB, 25 * MIB], 0x64);
    rig.qsd.restart();
    let tracking = rig.tracking().await;
    match &tracking[0] {
        Tracking::Lost(why) => assert!(
            why.contains("inconsistent"),
            "a stored bitmap after SIGKILL is inconsistent: {why}"
        ),
        other => panic!("after SIGKILL the qcow2 bitmap cannot be trusted: {other:?}"),
    }
    rig.cycle_requires_resync("root").await;
    let report = rig.resync().await;
    eprintln!(
        "qcow2 after a clean restart then SIGKILL: resync read {} bytes, sent {} bytes; {changed} changed blocks",
        report.bytes_read, report.bytes_sent
    );
    assert_eq!(report.disks_compared_in_full, vec!["root".to_owned()]);
    assert_eq!(report.bytes_sent, changed * BLOCK, "{report:?}");
    rig.assert_replica_equals_source("after the resync following the second SIGKILL")
        .await;
    rig.write_blocks("root", &[3 * MIB], 0x65);
    rig.cycle("after the second resync").await;
    rig.assert_replica_equals_source("cycles resumed").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_file_node_under_a_qcow2_image_is_refused_with_the_node_to_use() {
    let mut rig = rig_with_nodes(&[DiskSpec::qcow2("root", 16 * MIB)], |disk| {
        format!("{disk}-file")
    })
    .await;
    let error = rig
        .engine
        .enable()
        .await
        .expect_err("enable on the file node under a qcow2 image must fail");
    let message = error.to_string();
    eprintln!("refused: {message}");
    assert!(
        !error.is_recoverable(),
        "retrying cannot fix the wrong node: {message}"
    );
    assert!(
        message.contains("\"root-file\"") && message.contains("\"root\""),
        "the error names the node given and the qcow2 node to use: {message}"
    );
    assert!(
        message.contains("set the disk's QEMU node to \"root\""),
        "the error says which node to use: {message}"
    );
    assert!(
        !matches!(
            rig.engine.state().phase,
            EnginePhase::Enabled | EnginePhase::Protected
        ),
        "{:?}",
        rig.engine.state().phase
    );
    // Nothing was tracked on the refused node, and the node named works.
    let on_the_file = rig.hypervisor.tracking(&rig.disks).await;
    assert!(
        on_the_file.is_err(),
        "tracking on the file node is refused as well: {on_the_file:?}"
    );
    let disks = engine::disks(&rig.qsd);
    rig.engine.set_disks(disks.clone());
    rig.disks = disks;
    let infos = rig
        .engine
        .enable()
        .await
        .unwrap_or_else(|e| panic!("enable on the node the error named: {e}"));
    assert_persistent(&infos, "root");
    assert_eq!(rig.tracking().await, vec![Tracking::Active]);
}

/// The contract of a raw image's reflinked twin (`lifeboat_engine::twin`) on a file system
/// that clones (XFS, loop-mounted): every write made since the twin is named, a buffered one
/// still in the page cache, a hole punched and a write into a hole among them; what nobody
/// wrote is not.
#[test]
fn a_raw_images_twin_names_every_write_since_it_was_made() {
    use lifeboat_engine::twin;
    use std::os::unix::fs::FileExt;
    let folder = match lifeboat_qemu::testing::ReflinkFolder::mount(512 * MIB) {
        Ok(folder) => folder,
        Err(why) => {
            eprintln!(
                "SKIPPED a_raw_images_twin_names_every_write_since_it_was_made: no XFS folder \
                 here ({why})"
            );
            return;
        }
    };
    let image = folder.path.join("vm-failover-root.img");
    let file = std::fs::File::create(&image).unwrap();
    file.set_len(16 * MIB).unwrap();
    // Data in 0..8 MiB, a hole after it.
    let data: Vec<u8> = (0..8 * MIB).map(|i| (i * 7 % 251) as u8).collect();
    file.write_all_at(&data, 0).unwrap();
    file.sync_all().unwrap();
    assert!(twin::make(&image, "p1").unwrap(), "XFS clones the image");
    assert_eq!(twin::changed_since(&image, "p1").unwrap(), Some(Vec::new()));
    assert_eq!(
        twin::changed_since(&image, "p0").unwrap(),
        None,
        "no twin for p0"
    );

    // Buffered, unflushed writes: one across a page boundary in the data, one into the hole.
    file.write_all_at(&[0xaa; 4096], MIB + 100).unwrap();
    file.write_all_at(&[0xbb; 8192], 12 * MIB).unwrap();
    let page = 4096;
    let changed = twin::changed_since(&image, "p1").unwrap().unwrap();
    let named = |start: u64, end: u64, changed: &[std::ops::Range<u64>]| {
        changed.iter().any(|c| c.start <= start && end <= c.end)
    };
    assert!(
        named(MIB, MIB + 2 * page, &changed) && named(12 * MIB, 12 * MIB + 8192, &changed),
        "the writes still in the page cache are named: {changed:?}"
    );
    // A hole punched where the twin has data.
    let punched = std::process::Command::new("fallocate")
        .args(["--punch-hole", "--offset", "5242880", "--length", "65536"])
        .arg(&image)
        .status()
        .unwrap();
    assert!(punched.success());
    let changed = twin::changed_since(&image, "p1").unwrap().unwrap();
    let written = [
        MIB..MIB + 2 * page,
        5 * MIB..5 * MIB + 64 * KIB,
        12 * MIB..12 * MIB + 8192,
    ];
    for w in &written {
        assert!(
            named(w.start, w.end, &changed),
            "the write {w:?} is named: {changed:?}"
        );
    }
    let named: u64 = changed.iter().map(|c| c.end - c.start).sum();
    assert!(
        named <= 3 * BLOCK,
        "nothing but the writes is named ({named} bytes): {changed:?}"
    );
    // A second twin replaces the first.
    assert!(twin::make(&image, "p2").unwrap());
    assert_eq!(twin::changed_since(&image, "p2").unwrap(), Some(Vec::new()));
    assert_eq!(twin::changed_since(&image, "p1").unwrap(), None);
    assert_eq!(twin::remove_all(&image).unwrap(), 1);
}
