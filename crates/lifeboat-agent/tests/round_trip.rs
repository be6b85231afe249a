//! The whole recovery life cycle on real qemu-storage-daemon VMs and the real local store, run
//! through the jobs the agents run (`lifeboat_engine::run_job`): protect A, planned failover
//! (A stopped first), run the recovered VM B on the failover's disks, re-protect B (only the
//! blocks B changed are sent), fail back onto A's original disks (only the blocks that differ
//! are written), re-protect A. At every hop the disks equal the source byte for byte, and the
//! bytes sent are asserted against the blocks that changed.

// A failed unwrap is the test failure report.
#![allow(clippy::unwrap_used)]

mod support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::SystemTime;

use lifeboat_core::{FailoverKind, JobKind, JobParams, PointChoice as CorePoint};
use lifeboat_engine::backend::DiskRef;
use lifeboat_engine::replicator::DiskFormat;
use lifeboat_engine::state::EnginePhase;
use lifeboat_engine::{EngineError, JobDirs, JobResult, Replicator, run_job};
use lifeboat_qemu::testing::{DiskSpec, ReflinkFolder};
use lifeboat_store::local::LocalStore;
use lifeboat_store::{At, ReplicaStore};
use std::sync::atomic::Ordering;
use support::Qsd;
use support::engine::{self, no_progress, settings};
use support::faults::FaultInjectingStore;

const MIB: u64 = 1024 * 1024;
const BLOCK: u64 = 64 * 1024;
const SIZE: u64 = 8 * MIB;
const DISKS: [&str; 2] = ["root", "data"];

/// A guest write: offset, length, pattern.
type Write = (u64, u64, u8);

/// The bytes of the whole blocks `writes` touch: what a block-level copy of them must send.
fn block_bytes<'a>(writes: impl IntoIterator<Item = &'a Write>) -> u64 {
    let blocks: BTreeSet<u64> = writes
        .into_iter()
        .flat_map(|(offset, len, _)| offset / BLOCK..(offset + len).div_ceil(BLOCK))
        .collect();
    blocks.len() as u64 * BLOCK
}

/// `count` writes of 4 KiB, each in its own block, from block `first` on, every `step`-th.
fn scattered(first: u64, count: u64, step: u64, pattern: u8) -> Vec<Write> {
    (0..count)
        .map(|i| ((first + i * step) * BLOCK + 512, 4096, pattern))
        .collect()
}

struct Site {
    qsd: Qsd,
    engine: Replicator,
}

fn raw_disks() -> Vec<DiskSpec> {
    DISKS.iter().map(|d| DiskSpec::raw_file(d, SIZE)).collect()
}

/// The store as a site's agent opens it: its own instance of the shared folder (each agent
/// holds its own epoch of the replica, as on two nodes).
fn store_at(root: &Path) -> Arc<dyn ReplicaStore> {
    Arc::new(LocalStore::open(root.join("store")).unwrap())
}

/// [`store_at`] for a site taking over from one whose engine was just dropped: the old
/// instance's VM lock goes with its last task (an upload may still be ending), so the new one
/// waits for it, up to 10 s, as a new agent process would find it free.
async fn store_taking_over(root: &Path) -> Arc<dyn ReplicaStore> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let store = store_at(root);
        match store.manifest(&engine::vm()).await {
            Ok(_) => return store,
            Err(e) if e.to_string().contains("held by another") => {
                assert!(std::time::Instant::now() < deadline, "{e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            Err(e) => panic!("{e}"),
        }
    }
}

async fn open_site(dir: &Path, qsd: Qsd, store: Arc<dyn ReplicaStore>, writer: &str) -> Site {
    let hypervisor = Arc::new(engine::qemu(&qsd, dir));
    let mut engine =
        engine::open_engine(dir, engine::disks(&qsd), hypervisor, store, settings()).await;
    engine.set_writer(writer);
    Site { qsd, engine }
}

fn original_disks(site: &Site) -> Vec<DiskRef> {
    engine::disks(&site.qsd)
}

async fn job(
    engine: &mut Replicator,
    kind: JobKind,
    params: JobParams,
    dirs: &JobDirs,
) -> Result<JobResult, EngineError> {
    run_job(engine, kind, &params, dirs, SystemTime::now(), &no_progress).await
}

fn named(point: &str) -> Option<CorePoint> {
    Some(CorePoint::Named(point.to_owned()))
}

/// The jobs' folders under `tmp`, failovers writing `format`.
fn job_dirs(tmp: &Path, format: DiskFormat) -> JobDirs {
    JobDirs {
        failover_dir: tmp.join("failover"),
        original_disks: Vec::new(),
        failover_format: format,
        seed_dir: None,
    }
}

/// A planned failover of the site `engine` runs; `to_primary`: the first half of a failback.
async fn planned_failover(
    engine: &mut Replicator,
    to_primary: bool,
    dirs: &JobDirs,
) -> Result<JobResult, EngineError> {
    let params = JobParams {
        failover: Some(FailoverKind::Planned),
        point: Some(CorePoint::Latest),
        to_primary,
        ..JobParams::default()
    };
    job(engine, JobKind::Failover, params, dirs).await
}

/// Re-protect the site `engine` runs from `point`.
async fn reprotect_from(engine: &mut Replicator, point: &str, dirs: &JobDirs) -> JobResult {
    let params = JobParams {
        point: named(point),
        ..JobParams::default()
    };
    job(engine, JobKind::Reprotect, params, dirs).await.unwrap()
}

/// Fail back onto `originals` to `point`.
async fn fail_back_to(
    engine: &mut Replicator,
    point: &str,
    originals: Vec<DiskRef>,
    dirs: &JobDirs,
) -> JobResult {
    let params = JobParams {
        point: named(point),
        ..JobParams::default()
    };
    let dirs = JobDirs {
        original_disks: originals,
        ..dirs.clone()
    };
    job(engine, JobKind::Failback, params, &dirs).await.unwrap()
}

async fn latest_point(store: &dyn ReplicaStore) -> String {
    let manifest = store.manifest(&engine::vm()).await.unwrap().unwrap();
    manifest.latest().unwrap().id.clone()
}

async fn assert_point_equals(store: &dyn ReplicaStore, point: &str, what: &str, disks: &[Vec<u8>]) {
    for (disk, want) in DISKS.iter().zip(disks) {
        let got = engine::replica(
            store,
            &engine::vm(),
            disk,
            SIZE,
            &At::Point(point.to_owned()),
        )
        .await;
        support::assert_same(&format!("{what}: disk {disk} at {point}"), &got, want);
    }
}

fn read_all(qsd: &Qsd) -> Vec<Vec<u8>> {
    DISKS.iter().map(|d| qsd.read_disk(d)).collect()
}

fn read_files(paths: &[PathBuf]) -> Vec<Vec<u8>> {
    paths.iter().map(|p| std::fs::read(p).unwrap()).collect()
}

/// Whether a guest write through the daemon's export of `disk` still reaches the disk.
fn guest_can_write(qsd: &Qsd, disk: &str) -> bool {
    Command::new("qemu-io")
        .args([
            "-f",
            "raw",
            &format!("nbd+unix:///{disk}?socket={}", qsd.nbd.display()),
            "-c",
            "write -P 0x77 0 4096",
        ])
        .output()
        .map(|o| o.status.success() && !String::from_utf8_lossy(&o.stderr).contains("error"))
        .unwrap_or(false)
}

/// Start the recovered VM's daemon (its sockets in `dir`) on the failover's images: where
/// they were written (`in_place`, as a user runs the recovered VM on the failover's output),
/// or moved into `dir` first.
fn start_recovered(dir: &Path, failover: &JobResult, in_place: bool) -> Qsd {
    std::fs::create_dir_all(dir).unwrap();
    let disks = &failover.failover.as_ref().unwrap().disks;
    if in_place {
        let specs: Vec<DiskSpec> = disks
            .iter()
            .map(|d| DiskSpec::raw_file_at(&d.name, &d.path))
            .collect();
        return Qsd::start_with(dir, &specs);
    }
    for disk in disks {
        std::fs::rename(&disk.path, dir.join(format!("{}.img", disk.name))).unwrap();
    }
    Qsd::start_with(dir, &raw_disks())
}

/// The files in the folders of `images` whose names contain `infix`.
fn beside(images: &[PathBuf], infix: &str) -> Vec<String> {
    let folders: BTreeSet<&Path> = images.iter().filter_map(|i| i.parent()).collect();
    let mut found: Vec<String> = folders
        .into_iter()
        .flat_map(|f| std::fs::read_dir(f).unwrap())
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(infix))
        .collect();
    found.sort();
    found
}

/// Add a seed bitmap for `point` to block node `node` of the QEMU at QMP socket `qmp`, as an
/// agent arming it does before it checks the file's stamp again (no other QMP client may be
/// connected: QEMU serves one at a time).
fn add_unchecked_seed(qmp: &Path, node: &str, point: &str) {
    use std::io::{BufRead, BufReader, Write};
    let mut stream = std::os::unix::net::UnixStream::connect(qmp).unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let name = lifeboat_engine::backend::seed_bitmap_name(point);
    let commands = [
        serde_json::json!({"execute": "qmp_capabilities"}),
        serde_json::json!({"execute": "block-dirty-bitmap-add",
            "arguments": {"node": node, "name": name, "persistent": false}}),
    ];
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    for command in commands {
        writeln!(stream, "{command}").unwrap();
        loop {
            line.clear();
            reader.read_line(&mut line).unwrap();
            let reply: serde_json::Value = serde_json::from_str(&line).unwrap();
            if reply.get("event").is_none() {
                assert!(reply.get("return").is_some(), "{command}: {reply}");
                break;
            }
        }
    }
}

/// The reflinked twins (`lifeboat_engine::twin`) in the folders of `images`.
fn twins_beside(images: &[PathBuf]) -> Vec<String> {
    beside(images, ".lifeboat-since-")
}

/// The stamps (`lifeboat_engine::stamp`) in the folders of `images`.
fn stamps_beside(images: &[PathBuf]) -> Vec<String> {
    beside(images, ".lifeboat-stamp-")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_planned_round_trip_loses_nothing_and_sends_only_the_changed_blocks() {
    planned_round_trip(false, false, None).await;
}

/// On a file system that clones files (XFS, loop-mounted), the failover leaves a reflinked
/// twin beside each raw image it writes, and the failback beside each of A's: each re-protect
/// then reads only the blocks written since its point, found from the two files' extent
/// maps, not the whole disk; the twins go when it ends, and the round trip still ends byte
/// for byte equal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_file_system_that_clones_each_raw_re_protect_reads_only_the_changed_blocks() {
    planned_round_trip_on_xfs(
        "on_a_file_system_that_clones_each_raw_re_protect_reads_only_the_changed_blocks",
        false,
    )
    .await;
}

/// [`planned_round_trip`] in a loop-mounted XFS folder (root and xfsprogs), or the test
/// `test` says why it was skipped.
async fn planned_round_trip_on_xfs(test: &str, a_written_after_first_step: bool) {
    match ReflinkFolder::mount(512 * MIB) {
        Ok(folder) => {
            planned_round_trip(a_written_after_first_step, false, Some(&folder.path)).await;
        }
        Err(why) => eprintln!("SKIPPED {test}: no XFS folder here ({why})"),
    }
}

/// The failback's Failback jobs run on B's engine, as the standalone daemon runs every job of
/// a VM on the engine of the site it replicates from, with A's state folder as `seed_dir`:
/// the planned failover's seed of A's disks is found there, and neither job reads them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failback_run_by_the_recovered_vms_engine_uses_the_original_disks_seed() {
    planned_round_trip(false, true, None).await;
}

/// A's raw image written after the failback's first step (as if A's VM had been started by
/// hand): its stamp no longer holds, so the failback's last step compares A's disk in full and
/// overwrites that write too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raw_original_disk_written_after_the_failback_began_is_compared_in_full() {
    planned_round_trip(true, false, None).await;
}

/// As `a_raw_original_disk_written_after_the_failback_began_is_compared_in_full`, on a file
/// system that clones files: A's twin (of the point the failback's first step brought it to)
/// names the stray write, so the last step overwrites it without reading A's disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_file_system_that_clones_a_write_behind_lifeboats_back_is_named_by_the_twin() {
    planned_round_trip_on_xfs(
        "on_a_file_system_that_clones_a_write_behind_lifeboats_back_is_named_by_the_twin",
        true,
    )
    .await;
}

/// The block A's root image is written at, behind Lifeboat's back, in
/// `a_raw_original_disk_written_after_the_failback_began_is_compared_in_full`: one that holds
/// data at the point (A's first write), so that the failback reads it back from the store.
const A_STRAY_BLOCK: u64 = 5;

/// A re-protect sent exactly the blocks `writes` (`what`) touched, of `images`, read only
/// those blocks and compared no disk in full (the seed bitmaps the agent armed before the VM
/// wrote, or the twins where the file system clones), and removed the twins and stamps.
fn assert_reprotected(result: &JobResult, writes: &[Write], images: &[PathBuf], what: &str) {
    let report = &result.report;
    assert_eq!(
        report.bytes_sent,
        block_bytes(writes),
        "re-protect sends exactly the blocks of {what}"
    );
    assert!(
        report.disks_compared_in_full.is_empty() && report.bytes_read == block_bytes(writes),
        "the seed bitmaps (or twins) name {what}: only those blocks are read ({} bytes read, \
         {} changed): {report:?}",
        report.bytes_read,
        block_bytes(writes),
    );
    assert_eq!(
        (twins_beside(images), stamps_beside(images)),
        (Vec::new(), Vec::new()),
        "the re-protect removes its twins and stamps"
    );
}

/// Arm the raw disks of the VM `site` runs, as its agent does every tick while the VM does not
/// replicate (`Replicator::arm_seeds`), before its guest writes: each records its writes since
/// the point its stamp names, and the stamp is used up.
async fn arm_before_the_guest_writes(site: &Site, images: &[PathBuf]) {
    let mut armed = site.engine.arm_seeds().await;
    armed.sort();
    let mut want: Vec<String> = DISKS.iter().map(|d| (*d).to_owned()).collect();
    want.sort();
    assert_eq!(
        armed, want,
        "each raw disk records its writes since the point"
    );
    assert_eq!(
        stamps_beside(images),
        Vec::<String>::new(),
        "each stamp is used once"
    );
    assert!(site.engine.arm_seeds().await.is_empty(), "armed once");
}

/// The planned round trip on raw images; `clones`: its folders on a file system that clones
/// files (the recovered VM runs on the failover's images where they were written).
async fn planned_round_trip(a_written_after_first_step: bool, on_b: bool, clones: Option<&Path>) {
    let tmp = match clones {
        Some(folder) => tempfile::tempdir_in(folder).unwrap(),
        None => tempfile::tempdir().unwrap(),
    };
    let dirs = job_dirs(tmp.path(), DiskFormat::Raw);

    // Protect A; a cycle ships some writes; more writes come after it, unshipped.
    let a_dir = tmp.path().join("site-a");
    std::fs::create_dir_all(&a_dir).unwrap();
    let qsd_a = Qsd::start_with(&a_dir, &raw_disks());
    qsd_a.guest_writes("root", &[(0, MIB, 0x11)]);
    qsd_a.guest_writes("data", &[(3 * MIB, MIB, 0x12)]);
    let mut a = open_site(&a_dir, qsd_a, store_at(tmp.path()), "node a").await;
    engine::protect(&mut a.engine).await;
    a.qsd.guest_writes("root", &scattered(20, 5, 3, 0x13));
    a.engine.run_cycle(SystemTime::now()).await.unwrap();
    a.qsd.guest_writes("data", &scattered(40, 4, 2, 0x14));

    // Planned failover: A is stopped first, so every write made before it is in the point.
    let before = read_all(&a.qsd);
    let failover = planned_failover(&mut a.engine, false, &dirs).await.unwrap();
    let report = failover.failover.as_ref().unwrap();
    assert!(
        report
            .source_stopped
            .as_deref()
            .unwrap_or("")
            .contains("exports were closed"),
        "{:?}",
        report.source_stopped
    );
    for disk in DISKS {
        assert!(
            !guest_can_write(&a.qsd, disk),
            "the guest of the stopped VM A can still write {disk}"
        );
    }
    let p = report.point.id.clone();
    let images: Vec<PathBuf> = report.disks.iter().map(|d| d.path.clone()).collect();
    let failed_over = read_files(&images);
    for (disk, (got, want)) in DISKS.iter().zip(failed_over.iter().zip(&before)) {
        support::assert_same(&format!("failover disk {disk}"), got, want);
    }
    if clones.is_some() {
        let a_images: Vec<PathBuf> = engine::disks(&a.qsd)
            .iter()
            .map(|d| d.path.clone().into())
            .collect();
        assert_eq!(
            twins_beside(&a_images).len(),
            DISKS.len(),
            "the planned failover leaves a twin of each of A's stopped raw images"
        );
    }
    // Site A goes down (its agent too: the local store admits one writer process).
    let Site {
        mut qsd, engine, ..
    } = a;
    qsd.stop();
    drop(engine);

    // B runs on the failover's disks; its agent arms them before the guest writes; B
    // writes; re-protect reads and sends only what B changed.
    let b_dir = tmp.path().join("site-b");
    assert_eq!(
        stamps_beside(&images).len(),
        DISKS.len(),
        "a stamp per failover image"
    );
    let qsd_b = start_recovered(&b_dir, &failover, true);
    let mut b = open_site(&b_dir, qsd_b, store_taking_over(tmp.path()).await, "node b").await;
    arm_before_the_guest_writes(&b, &images).await;
    let b_writes: Vec<Write> = scattered(2, 6, 7, 0x21);
    b.qsd.guest_writes("root", &b_writes);
    if clones.is_some() {
        assert_eq!(
            twins_beside(&images).len(),
            DISKS.len(),
            "a twin per failover image"
        );
        // A failover run again while B runs on its disks refuses, and removes nothing.
        let reader = LocalStore::open_read_only(tmp.path().join("store")).unwrap();
        let point = reader
            .manifest(&engine::vm())
            .await
            .unwrap()
            .unwrap()
            .point(&p)
            .unwrap()
            .clone();
        let again = lifeboat_engine::replicator::materialise_point(
            &reader,
            &engine::vm(),
            point,
            lifeboat_engine::replicator::Output::raw(&dirs.failover_dir),
            lifeboat_engine::replicator::FAILOVER_LABEL,
            &no_progress,
        )
        .await;
        let refused = again.map(drop).unwrap_err().to_string();
        assert!(refused.contains("is open by process"), "{refused}");
        assert!(
            images.iter().all(|i| i.exists()),
            "B's disks are still there"
        );
        assert_eq!(twins_beside(&images).len(), DISKS.len());
    }
    let reprotect = reprotect_from(&mut b.engine, &p, &dirs).await;
    assert_reprotected(
        &reprotect,
        &b_writes,
        &images,
        "B's writes since the failover",
    );
    assert_eq!(b.engine.state().phase, EnginePhase::Protected);
    let q1 = reprotect.point.as_ref().unwrap().id.clone();
    let b_store = b.engine.store().clone();
    assert_point_equals(b_store.as_ref(), &q1, "after re-protect", &read_all(&b.qsd)).await;
    drop(b_store);

    // Delta cycles in reverse, then writes that no cycle shipped.
    b.qsd.guest_writes("data", &scattered(70, 3, 5, 0x22));
    let cycle = b.engine.run_cycle(SystemTime::now()).await.unwrap();
    assert!(cycle.point.is_some());
    b.qsd.guest_writes("root", &scattered(100, 2, 1, 0x23));

    // Fail back, first steps, while B runs on: a cycle of B cuts a fresh point (B's Failover
    // job with `presync`), then A's original disks are brought to it (A's agent reads the
    // store B holds: a read-only handle of the folder, whose live block maps stop describing
    // the fresh point once each disk's was read, as if B had cut the next one meanwhile).
    let early = JobParams {
        failover: Some(FailoverKind::Planned),
        point: Some(CorePoint::Latest),
        presync: true,
        ..JobParams::default()
    };
    let fresh = job(
        &mut b.engine,
        JobKind::Failover,
        JobParams {
            to_primary: true,
            ..early.clone()
        },
        &dirs,
    )
    .await
    .unwrap();
    let fresh = fresh.point.unwrap().id;
    let a_originals = engine::disks(&qsd);
    let a_dirs = JobDirs {
        original_disks: a_originals.clone(),
        seed_dir: on_b.then(|| a_dir.join("agent")),
        ..dirs.clone()
    };
    let (first, qsd) = if on_b {
        let first = job(&mut b.engine, JobKind::Failback, early, &a_dirs).await;
        (first.unwrap(), qsd)
    } else {
        let reader = Arc::new(FaultInjectingStore::new(
            LocalStore::open_read_only(tmp.path().join("store")).unwrap(),
        ));
        let mut a = open_site(&a_dir, qsd, reader.clone(), "node a").await;
        // NB: and the job first chooses the point as if just before B cut the fresh one,
        // whose maps the store's live ones are: it chooses again (reading the first map
        // twice), never hashing the point it first chose from the store.
        reader.hide_newest.store(1, Ordering::SeqCst);
        reader
            .maps_left
            .store(DISKS.len() as u64 + 1, Ordering::SeqCst);
        let first = job(&mut a.engine, JobKind::Failback, early, &a_dirs).await;
        assert_eq!(
            reader.ranges_listed.load(Ordering::SeqCst),
            0,
            "no disk of the point hashed from the store"
        );
        let Site { qsd, engine, .. } = a;
        drop(engine);
        (first.unwrap(), qsd)
    };
    let shipped_before: Vec<Write> = b_writes
        .iter()
        .copied()
        .chain(scattered(70, 3, 5, 0x22))
        .chain(scattered(100, 2, 1, 0x23))
        .collect();
    assert_eq!(
        first.failover.as_ref().unwrap().bytes_read,
        block_bytes(&shipped_before),
        "the first step writes the blocks B changed up to the fresh point"
    );
    assert_eq!(first.point.as_ref().unwrap().id, fresh);
    assert_eq!(
        first.failover.as_ref().unwrap().compared_bytes,
        0,
        "A's raw images are unchanged since the planned failover stopped A (their stamps): not read"
    );
    // NB: the probe writes 4 KiB at offset 0 of B's root: one of B's last changes.
    assert!(guest_can_write(&b.qsd, "root"), "B runs on");
    let mut stray = Vec::new();
    if a_written_after_first_step {
        use std::os::unix::fs::FileExt;
        let root = std::fs::OpenOptions::new()
            .write(true)
            .open(&a_originals[0].path)
            .unwrap();
        root.write_all_at(&[0x5a; 4096], A_STRAY_BLOCK * BLOCK)
            .unwrap();
        stray.push((A_STRAY_BLOCK * BLOCK, 4096, 0x5a));
    }
    b.qsd.guest_writes("data", &scattered(110, 2, 4, 0x24));
    let b_final = read_all(&b.qsd);

    // Fail back: B stopped and shipped, then A's original disks brought to the point.
    let shipped = planned_failover(&mut b.engine, true, &dirs).await.unwrap();
    let q = shipped.point.as_ref().unwrap().id.clone();
    assert!(shipped.failover.as_ref().unwrap().disks.is_empty());
    for disk in DISKS {
        assert!(!guest_can_write(&b.qsd, disk), "B can still write {disk}");
    }
    let a_images: Vec<PathBuf> = a_originals.iter().map(|d| PathBuf::from(&d.path)).collect();
    let on_b_restored = if on_b {
        Some(fail_back_to(&mut b.engine, &q, a_originals.clone(), &a_dirs).await)
    } else {
        None
    };
    let Site {
        qsd: mut qsd_b,
        engine,
        ..
    } = b;
    drop(engine);
    // A's agent is back (A's VM is not running yet: its disks are brought to the point first).
    let mut a = open_site(&a_dir, qsd, store_taking_over(tmp.path()).await, "node a").await;
    let restored = match on_b_restored {
        Some(restored) => restored,
        None => fail_back_to(&mut a.engine, &q, a_originals, &dirs).await,
    };
    let restored = restored.failover.as_ref().unwrap();
    let last_b_writes: Vec<Write> = scattered(110, 2, 4, 0x24)
        .into_iter()
        .chain([(0, 4096, 0x77)])
        .chain(stray)
        .collect();
    assert_eq!(
        restored.bytes_read,
        block_bytes(&last_b_writes),
        "the last step writes the blocks B changed since the first (and A's stray write)"
    );
    assert_eq!(
        restored.compared_bytes > 0,
        a_written_after_first_step && clones.is_none(),
        "A's disk is read only when its stamp no longer holds (its twin, where it has one, \
         names the write instead)"
    );
    let a_now = read_files(&a_images);
    for (disk, (got, want)) in DISKS.iter().zip(a_now.iter().zip(&b_final)) {
        support::assert_same(&format!("A's disk {disk} after failback"), got, want);
    }
    assert_point_equals(a.engine.store().as_ref(), &q, "failback point", &b_final).await;
    qsd_b.stop();

    // A runs again on its own disks; re-protect forward sends nothing (A equals the point).
    if clones.is_some() {
        assert_eq!(
            twins_beside(&images),
            Vec::<String>::new(),
            "the failback's stop leaves no twin beside B's disks: nothing returns to them"
        );
        assert_eq!(
            twins_beside(&a_images).len(),
            DISKS.len(),
            "a twin per original image"
        );
    }
    a.qsd.start_again();
    arm_before_the_guest_writes(&a, &a_images).await;
    let a_writes: Vec<Write> = scattered(30, 3, 2, 0x30);
    a.qsd.guest_writes("data", &a_writes);
    let forward = reprotect_from(&mut a.engine, &q, &dirs).await;
    assert_reprotected(
        &forward,
        &a_writes,
        &a_images,
        "A's writes since the failback",
    );
    a.qsd.guest_writes("root", &scattered(9, 2, 2, 0x31));
    a.engine.run_cycle(SystemTime::now()).await.unwrap();
    let store = a.engine.store().clone();
    let last = latest_point(store.as_ref()).await;
    assert_point_equals(store.as_ref(), &last, "forward again", &read_all(&a.qsd)).await;
}

fn qcow2_disks() -> Vec<DiskSpec> {
    DISKS.iter().map(|d| DiskSpec::qcow2(d, SIZE)).collect()
}

/// The persistent bitmaps `qemu-img info` lists for the qcow2 image at `path`.
fn stored_bitmaps(path: &Path) -> Vec<String> {
    let out = Command::new("qemu-img")
        .args(["info", "--output=json", "-f", "qcow2"])
        .arg(path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    info.pointer("/format-specific/data/bitmaps")
        .and_then(serde_json::Value::as_array)
        .map(|list| {
            list.iter()
                .filter_map(|b| b.get("name")?.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qcow2_round_trip_reads_and_writes_only_the_changed_blocks() {
    qcow2_round_trip(false).await;
}

/// A's daemon killed after the planned failover (a process crash: the seed bitmap added at
/// the failover never reaches A's images): the failback compares A's disks in full instead,
/// and the round trip still ends byte-identical.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qcow2_failback_whose_seed_was_lost_compares_the_whole_disk() {
    qcow2_round_trip(true).await;
}

async fn qcow2_round_trip(a_crashes: bool) {
    let tmp = tempfile::tempdir().unwrap();
    let dirs = job_dirs(tmp.path(), DiskFormat::Qcow2);
    let a_dir = tmp.path().join("site-a");
    std::fs::create_dir_all(&a_dir).unwrap();
    let qsd_a = Qsd::start_with(&a_dir, &qcow2_disks());
    qsd_a.guest_writes("root", &[(0, 2 * MIB, 0x61)]);
    qsd_a.guest_writes("data", &[(MIB, 3 * MIB, 0x62)]);
    let mut a = open_site(&a_dir, qsd_a, store_at(tmp.path()), "node a").await;
    engine::protect(&mut a.engine).await;
    a.qsd.guest_writes("data", &scattered(60, 3, 4, 0x63));
    let before = read_all(&a.qsd);

    // Planned failover into qcow2 images, each with a seed bitmap for its point; A's own
    // disks get one too (stopped, equal to the point).
    let failover = planned_failover(&mut a.engine, false, &dirs).await.unwrap();
    let report = failover.failover.as_ref().unwrap();
    let p = report.point.id.clone();
    let seed_p = lifeboat_engine::backend::seed_bitmap_name(&p);
    for (disk, image) in DISKS.iter().zip(&report.disks) {
        assert_eq!(image.path.extension().unwrap(), "qcow2", "{image:?}");
        assert_eq!(
            stored_bitmaps(&image.path),
            std::slice::from_ref(&seed_p),
            "failover disk {disk}"
        );
    }
    let Site {
        mut qsd, engine, ..
    } = a;
    drop(engine);
    if a_crashes {
        qsd.kill();
        for disk in DISKS {
            assert!(
                stored_bitmaps(&qsd.image(disk)).is_empty(),
                "A's disk {disk}"
            );
        }
    } else {
        // A clean stop: the daemon writes the seed bitmap into A's images.
        qsd.stop();
        for disk in DISKS {
            assert_eq!(
                stored_bitmaps(&qsd.image(disk)),
                std::slice::from_ref(&seed_p),
                "A's disk {disk} after the failover"
            );
        }
    }

    // B runs on the qcow2 images and writes; re-protect reads and sends only those blocks.
    let b_dir = tmp.path().join("site-b");
    std::fs::create_dir_all(&b_dir).unwrap();
    for disk in &report.disks {
        std::fs::rename(&disk.path, b_dir.join(format!("{}.qcow2", disk.name))).unwrap();
    }
    let qsd_b = Qsd::start_with(&b_dir, &qcow2_disks());
    for (disk, want) in DISKS.iter().zip(&before) {
        support::assert_same(
            &format!("failover disk {disk}"),
            &qsd_b.read_disk(disk),
            want,
        );
    }
    let b_writes = scattered(5, 4, 9, 0x71);
    qsd_b.guest_writes("root", &b_writes);
    let mut b = open_site(&b_dir, qsd_b, store_taking_over(tmp.path()).await, "node b").await;
    let reprotect = reprotect_from(&mut b.engine, &p, &dirs).await;
    assert_eq!(reprotect.report.bytes_sent, block_bytes(&b_writes));
    // (Each once: compared with the point's map and sent in the same pass.)
    assert_eq!(
        reprotect.report.bytes_read,
        block_bytes(&b_writes),
        "re-protect reads only the blocks the seed bitmap marks, once"
    );
    assert!(
        reprotect.report.disks_compared_in_full.is_empty(),
        "{:?}",
        reprotect.report.disks_compared_in_full
    );
    let q1 = reprotect.point.as_ref().unwrap().id.clone();
    assert_point_equals(
        b.engine.store().as_ref(),
        &q1,
        "after re-protect",
        &read_all(&b.qsd),
    )
    .await;
    b.qsd.guest_writes("data", &scattered(80, 2, 6, 0x72));
    b.engine.run_cycle(SystemTime::now()).await.unwrap();
    let b_late = scattered(110, 2, 1, 0x73);
    b.qsd.guest_writes("root", &b_late);
    let b_final = read_all(&b.qsd);

    // Fail back onto A's qcow2 disks: their seed holds, so they are not read at all.
    let shipped = planned_failover(&mut b.engine, true, &dirs).await.unwrap();
    let q = shipped.point.as_ref().unwrap().id.clone();
    let Site {
        qsd: mut qsd_b,
        engine,
        ..
    } = b;
    drop(engine);
    qsd_b.stop();
    let mut a = open_site(&a_dir, qsd, store_taking_over(tmp.path()).await, "node a").await;
    let a_originals = original_disks(&a);
    let restored = fail_back_to(&mut a.engine, &q, a_originals, &dirs).await;
    let all_b_writes: Vec<Write> = b_writes
        .iter()
        .copied()
        .chain(scattered(80, 2, 6, 0x72))
        .chain(b_late.iter().copied())
        .collect();
    let restored = restored.failover.unwrap();
    assert_eq!(
        restored.bytes_read,
        block_bytes(&all_b_writes),
        "failback writes exactly the blocks B changed"
    );
    if a_crashes {
        assert!(
            restored.compared_bytes > 0,
            "A's disks were compared in full"
        );
    } else {
        assert_eq!(restored.compared_bytes, 0, "A's disks were not read");
    }
    for (disk, want) in DISKS.iter().zip(&b_final) {
        support::assert_same(
            &format!("A's disk {disk} after failback"),
            &a.qsd.read_disk(disk),
            want,
        );
        assert_eq!(
            stored_bitmaps(&a.qsd.image(disk)),
            [lifeboat_engine::backend::seed_bitmap_name(&q)],
            "A's disk {disk} records its writes since the failback's point"
        );
    }

    // A runs again and writes; re-protect forward reads and sends only those blocks.
    a.qsd.start_again();
    let a_writes = scattered(30, 3, 2, 0x74);
    a.qsd.guest_writes("data", &a_writes);
    let forward = reprotect_from(&mut a.engine, &q, &dirs).await;
    assert_eq!(forward.report.bytes_sent, block_bytes(&a_writes));
    assert_eq!(forward.report.bytes_read, block_bytes(&a_writes));
    let store = a.engine.store().clone();
    let last = latest_point(store.as_ref()).await;
    assert_point_equals(store.as_ref(), &last, "A forward again", &read_all(&a.qsd)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_an_unplanned_failover_the_lost_writes_are_overwritten_from_the_recovered_vm() {
    let tmp = tempfile::tempdir().unwrap();
    let dirs = job_dirs(tmp.path(), DiskFormat::Raw);
    let a_dir = tmp.path().join("site-a");
    std::fs::create_dir_all(&a_dir).unwrap();
    let qsd_a = Qsd::start_with(&a_dir, &raw_disks());
    qsd_a.guest_writes("root", &[(MIB, 2 * MIB, 0x41)]);
    let mut a = open_site(&a_dir, qsd_a, store_at(tmp.path()), "node a").await;
    engine::protect(&mut a.engine).await;
    // Written at A and never shipped: the site is lost before the next cycle.
    // (Over data the point holds, so that the failback reads them back from the replica.)
    let lost: Vec<Write> = scattered(20, 4, 3, 0x42);
    a.qsd.guest_writes("root", &lost);
    // The site is lost: the VM and its agent.
    let Site {
        mut qsd, engine, ..
    } = a;
    qsd.kill();
    drop(engine);

    // Unplanned failover from the store alone, as a recovery node runs it.
    let b_store = store_taking_over(tmp.path()).await;
    let failover = lifeboat_engine::run_store_job(
        b_store.as_ref(),
        &engine::vm(),
        JobKind::Failover,
        &JobParams {
            failover: Some(FailoverKind::Unplanned),
            point: Some(CorePoint::Latest),
            ..JobParams::default()
        },
        &dirs,
        "node b",
        SystemTime::now(),
        &no_progress,
    )
    .await
    .unwrap();
    let p = failover.point.as_ref().unwrap().id.clone();
    // B runs on the failover's disks and its guest writes before B's agent looks: the stamp
    // of the disk it wrote no longer holds, so that disk is compared in full (never a write
    // missed); the other disk, unwritten, is armed.
    let b_dir = tmp.path().join("site-b");
    let images: Vec<PathBuf> = failover
        .failover
        .as_ref()
        .unwrap()
        .disks
        .iter()
        .map(|d| d.path.clone())
        .collect();
    let qsd_b = start_recovered(&b_dir, &failover, true);
    let b_writes = scattered(10, 5, 2, 0x43);
    qsd_b.guest_writes("data", &b_writes);
    // An arming of that disk cut short after its bitmap was added (the agent stopped before
    // its check): the bitmap, which missed the writes before it, is never trusted.
    add_unchecked_seed(&qsd_b.qmp, "data", &p);
    let mut b = open_site(&b_dir, qsd_b, b_store, "node b").await;
    assert_eq!(
        b.engine.arm_seeds().await,
        vec!["root".to_owned()],
        "only the unwritten disk is armed"
    );
    assert_eq!(
        stamps_beside(&images),
        Vec::<String>::new(),
        "the stamp that no longer holds is dropped"
    );
    // NB: where the temporary folder's file system clones, the twin names B's writes.
    let twinned = !twins_beside(&images).is_empty();
    let reprotect = reprotect_from(&mut b.engine, &p, &dirs).await;
    assert_eq!(reprotect.report.bytes_sent, block_bytes(&b_writes));
    let in_full = if twinned {
        vec![]
    } else {
        vec!["data".to_owned()]
    };
    assert_eq!(
        reprotect.report.disks_compared_in_full, in_full,
        "{:?}",
        reprotect.report
    );

    // Fail back: the blocks A lost and the blocks B wrote are what differs, and all of it.
    let shipped = planned_failover(&mut b.engine, true, &dirs).await.unwrap();
    let q = shipped.point.as_ref().unwrap().id.clone();
    let Site {
        qsd: mut qsd_b,
        engine,
        ..
    } = b;
    drop(engine);
    qsd_b.stop();
    let b_final = read_all(&qsd_b);
    // The old primary's agent comes back: fenced, its engine can no longer cut a point.
    qsd.start_again();
    let mut a = open_site(&a_dir, qsd, store_taking_over(tmp.path()).await, "node a").await;
    // (Its raw disks lost their tracking with their daemon: what it would do is a resync.)
    let cycle = a.engine.run_cycle(SystemTime::now()).await.unwrap();
    assert!(cycle.resync_required.is_some(), "{cycle:?}");
    a.engine.require_resync("TrackingLost").unwrap();
    let fenced = a.engine.resync(SystemTime::now(), &no_progress).await;
    assert!(
        matches!(
            &fenced,
            Err(EngineError::Store(
                lifeboat_store::StoreError::Fenced { .. }
            ))
        ),
        "the old primary still writes the replica: {fenced:?}"
    );
    a.qsd.kill();
    let a_originals = original_disks(&a);
    let restored = fail_back_to(&mut a.engine, &q, a_originals.clone(), &dirs).await;
    assert_eq!(
        restored.failover.as_ref().unwrap().bytes_read,
        block_bytes(lost.iter().chain(&b_writes)),
        "the failback writes the lost blocks and B's, nothing else"
    );
    let paths: Vec<PathBuf> = a_originals.iter().map(|d| PathBuf::from(&d.path)).collect();
    for (disk, (got, want)) in DISKS.iter().zip(read_files(&paths).iter().zip(&b_final)) {
        support::assert_same(&format!("A's disk {disk}"), got, want);
    }

    // Re-protect A: its engine was left by the lost site in the middle of things (a resync
    // refused as fenced, under a dead epoch); re-protect takes the replica back, A equals the
    // failback's point, so nothing is sent, and A's cycles write again.
    a.qsd.start_again();
    let forward = reprotect_from(&mut a.engine, &q, &dirs).await;
    assert_eq!(forward.report.bytes_sent, 0);
    a.qsd.guest_writes("data", &scattered(90, 2, 3, 0x44));
    let cycle = a.engine.run_cycle(SystemTime::now()).await.unwrap();
    let point = cycle.point.unwrap().id;
    assert_point_equals(
        a.engine.store().as_ref(),
        &point,
        "A forward after an unplanned round trip",
        &read_all(&a.qsd),
    )
    .await;
}

/// The recovered VM's node is lost for good while B replicates in reverse: the unplanned
/// failback's Failover runs at the primary site from the store, as A's agent runs it when
/// the operator sends it there. A's own engine refuses it: it failed over to the old point on
/// the way out, and answering with that point would bring A's disks back to it, losing all
/// that B shipped. A's disks end at B's last shipped point; the replica's new epoch is A's
/// (B's engine, should its node come back, is fenced).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_recovered_vms_node_lost_the_failback_runs_at_the_primary_site_from_the_store() {
    let tmp = tempfile::tempdir().unwrap();
    let dirs = job_dirs(tmp.path(), DiskFormat::Raw);
    let a_dir = tmp.path().join("site-a");
    std::fs::create_dir_all(&a_dir).unwrap();
    let qsd_a = Qsd::start_with(&a_dir, &raw_disks());
    qsd_a.guest_writes("root", &[(0, MIB, 0x51)]);
    let mut a = open_site(&a_dir, qsd_a, store_at(tmp.path()), "node a").await;
    engine::protect(&mut a.engine).await;
    let failover = planned_failover(&mut a.engine, false, &dirs).await.unwrap();
    let p = failover.point.as_ref().unwrap().id.clone();
    let Site {
        mut qsd, engine, ..
    } = a;
    qsd.stop();
    drop(engine);

    // B runs and replicates in reverse, ships a cycle, writes more; then its node is lost.
    let b_dir = tmp.path().join("site-b");
    let qsd_b = start_recovered(&b_dir, &failover, false);
    qsd_b.guest_writes("root", &scattered(2, 6, 7, 0x52));
    let mut b = open_site(&b_dir, qsd_b, store_taking_over(tmp.path()).await, "node b").await;
    reprotect_from(&mut b.engine, &p, &dirs).await;
    b.qsd.guest_writes("data", &scattered(70, 3, 5, 0x53));
    let cycle = b.engine.run_cycle(SystemTime::now()).await.unwrap();
    let q = cycle.point.unwrap().id;
    let shipped = read_all(&b.qsd);
    b.qsd.guest_writes("root", &scattered(100, 2, 1, 0x54));
    let Site {
        qsd: mut qsd_b,
        engine,
        ..
    } = b;
    // NB: the node's loss: its daemon killed (SIGKILL) and its engine dropped; nothing of B
    // is read again, so no claim rests on what a crash or power cut keeps there.
    qsd_b.kill();
    drop(engine);

    // A's agent. Its engine says no; the store path chooses B's last point and fences B out.
    qsd.start_again();
    let mut a = open_site(&a_dir, qsd, store_taking_over(tmp.path()).await, "node a").await;
    a.qsd.kill();
    let unplanned = JobParams {
        failover: Some(FailoverKind::Unplanned),
        point: Some(CorePoint::Latest),
        to_primary: true,
        ..JobParams::default()
    };
    let refused = job(&mut a.engine, JobKind::Failover, unplanned.clone(), &dirs).await;
    assert!(
        matches!(&refused, Err(EngineError::NotReady { what }) if what.contains("does not replicate it")),
        "{refused:?}"
    );
    let chosen = lifeboat_engine::run_store_job(
        a.engine.store().as_ref(),
        &engine::vm(),
        JobKind::Failover,
        &unplanned,
        &dirs,
        "node a",
        SystemTime::now(),
        &no_progress,
    )
    .await
    .unwrap();
    assert_eq!(
        chosen.point.as_ref().map(|p| p.id.as_str()),
        Some(q.as_str())
    );
    assert!(
        chosen.failover.as_ref().unwrap().disks.is_empty(),
        "no disk written"
    );
    let epoch = a.engine.store().epoch(&engine::vm()).await.unwrap();
    assert_eq!(epoch.holder, "node a");
    let a_originals = original_disks(&a);
    fail_back_to(&mut a.engine, &q, a_originals.clone(), &dirs).await;
    let paths: Vec<PathBuf> = a_originals.iter().map(|d| PathBuf::from(&d.path)).collect();
    for (disk, (got, want)) in DISKS.iter().zip(read_files(&paths).iter().zip(&shipped)) {
        support::assert_same(&format!("A's disk {disk}"), got, want);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_planned_failover_whose_source_cannot_be_stopped_fails_and_protection_goes_on() {
    let tmp = tempfile::tempdir().unwrap();
    let store = store_at(tmp.path());
    let dirs = job_dirs(tmp.path(), DiskFormat::Raw);
    let a_dir = tmp.path().join("site-a");
    std::fs::create_dir_all(&a_dir).unwrap();
    let qsd = Qsd::start_with(&a_dir, &raw_disks());
    let mut a = open_site(&a_dir, qsd, store.clone(), "node a").await;
    engine::protect(&mut a.engine).await;
    let points_before = store.manifest(&engine::vm()).await.unwrap().unwrap().points;

    // The VM's QMP socket cannot be reached (moved away) while its guest keeps writing.
    // (A new agent process: the old one's open QMP connection would still work.)
    let away = a_dir.join("qmp.sock.away");
    std::fs::rename(&a.qsd.qmp, &away).unwrap();
    let Site { qsd, engine, .. } = a;
    drop(engine);
    let mut a = open_site(&a_dir, qsd, store.clone(), "node a").await;
    a.qsd.guest_writes("root", &scattered(30, 3, 1, 0x51));
    let refused = planned_failover(&mut a.engine, false, &dirs)
        .await
        .unwrap_err();
    assert_eq!(refused.reason(), "SourceNotStopped", "{refused}");
    assert!(!refused.is_recoverable(), "{refused}");
    assert!(
        refused.to_string().contains("could not be stopped"),
        "{refused}"
    );
    assert_eq!(a.engine.state().phase, EnginePhase::Protected);
    let points_after = store.manifest(&engine::vm()).await.unwrap().unwrap().points;
    assert_eq!(points_before, points_after, "nothing was failed over");
    assert_eq!(
        store.epoch(&engine::vm()).await.unwrap().number,
        a.engine.state().epoch
    );

    // Reachable again: protection goes on, and the writes made meanwhile are shipped.
    std::fs::rename(&away, &a.qsd.qmp).unwrap();
    assert!(guest_can_write(&a.qsd, "data"));
    let report = a.engine.run_cycle(SystemTime::now()).await.unwrap();
    let point = report.point.unwrap().id;
    assert_point_equals(
        store.as_ref(),
        &point,
        "after the refused failover",
        &read_all(&a.qsd),
    )
    .await;
}
