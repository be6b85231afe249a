//! The agent's benchmarks (DESIGN.md §6, issues 5, 14 and 17), on a real `qemu-storage-daemon`
//! (QSD) playing the VM's block layer and the real local folder store.
//!
//! ```text
//!   cargo bench -p lifeboat-agent --bench agent --
//!         [--parts tracking,copy,recovery,recovery-azure,resync,churn,churn-azure,roundtrip]
//!         [--dir PATH]
//!         tracking: [--disk-mib 2048] [--hot-mib 256] [--run-secs 100] [--interval-secs 30]
//!                   [--rounds 3] [--depth 16] [--request-kib 64]
//!         copy, recovery, recovery-azure, resync, roundtrip: [--image-mib 4096] [--runs 5]
//!                   [--steps lifeboat,cp] [--warm] [--no-verify] [--python PATH]
//!         roundtrip: [--formats raw,qcow2]
//!         churn, churn-azure: [--churn-rates 50,100,150,200] [--churn-secs 180]
//!                   [--churn-disk-mib 16384] [--churn-interval-secs 15]
//!         [--keep]
//! ```
//!
//! (or `LIFEBOAT_BENCH_<OPTION>` environment variables, e.g. `LIFEBOAT_BENCH_RUN_SECS`).
//! Files go to `--dir` (default `/var/tmp/lifeboat-agent-bench-<pid>`: a disk, not tmpfs),
//! deleted at the end unless `--keep` (with the same `--dir`, a kept image is reused).
//! Results are printed as Markdown tables. Without `--bench` (as `cargo test --all-targets`
//! runs it) it makes a smoke run of a few seconds on tiny images instead. Needs Debian's
//! qemu-utils 10 (`qemu-storage-daemon`, `qemu-img`) and root to drop the page cache.
//!
//! # `tracking`: what change tracking costs the guest
//!
//! The guest is `qemu-img bench -w` (sequential 64 KiB writes, 16 in flight, a non-zero
//! pattern) through QSD's writable NBD export of a qcow2 disk, confined to a "hot" window at
//! the start of the disk (a `raw` layer with `offset`/`size` over the NBD export), so that
//! every cycle finds that window dirty: the busiest guest the agent can face. Runs alternate,
//! unprotected then protected in odd rounds and the other way round in even ones, so that
//! load from other work on the machine hits both kinds alike; every run does the same number
//! of requests (calibrated once to last about `--run-secs` unprotected).
//!
//! - Unprotected: the export with no Lifeboat bitmap and no agent work.
//! - Protected: before the timed part (not timed), the engine is opened on a fresh store,
//!   enabled (persistent dirty bitmap), copies the disk and finalizes; during the timed part
//!   it runs a cycle every `--interval-secs` (`Replicator::run_cycle`: one QMP transaction,
//!   a fleecing view, the dirty extents read over NBD into a sealed HRL, applied to the store
//!   with its undo segments, a recovery point cut), in this process, on the same two cores.
//!   Afterwards protection is disabled and the replica deleted (not timed).
//!
//! The figure is the guest's write throughput as `qemu-img bench` reports it ("Run completed
//! in"): the same export, the same requests, the same window, the only difference being
//! whether Lifeboat protects the disk. The cost measured is everything protection adds:
//! QEMU's bitmap, copy-before-write while a view is open, and the agent's CPU and I/O.
//!
//! # `copy`: initial replication against `cp --sparse=always` + `sync`
//!
//! A `--image-mib` image, half data: 1 MiB extents of random data at a random half of the
//! 1 MiB slots (seeded; neighbouring extents merge into longer runs, as in a real disk), the
//! rest never written. It is built once as a raw sparse file (`source.raw`: holes where
//! nothing was written) and converted to qcow2 (`qemu-img convert`, which allocates only the
//! data clusters) for QSD to serve. Steps, alternating which goes first:
//!
//! - Lifeboat: `Replicator::open` on an empty store folder, `enable`, `initial_copy` (the
//!   view opened over QMP, the allocated extents read over NBD, written to the store's sparse
//!   replica file, block map and cursor stored, everything fsynced): timed from the open to
//!   the end of `initial_copy`, so the replica is durable.
//! - Peer: `cp --sparse=always source.raw DEST` followed by `sync DEST DEST_DIR` (fsync of
//!   the copy and of its folder: the same durability, without flushing unrelated dirty data
//!   of other processes on the machine, which a bare `sync` would charge to the peer).
//!
//! Both read the same 2 GiB of data (Lifeboat through qcow2 and NBD, which is how it reaches
//! a VM's disk; `cp` straight from the raw file), skip the same holes, write the same bytes
//! into a sparse file and make them durable. Before each step everything is synced and, as
//! root, the page cache dropped (`echo 3 > /proc/sys/vm/drop_caches`) so that both read from
//! the disk; `--warm` keeps the cache. Both results are compared with the source (`cmp`) in
//! the first run.
//!
//! # `recovery`: a failover from the replica store alone against `cp --sparse=always` + `sync`
//!
//! The same image, protected once (not timed): the engine enables, copies and runs the
//! finalize cycle, which cuts the first point; the VM is then gone. Steps, alternating:
//!
//! - Lifeboat: `lifeboat_engine::replicator::fail_over_from_store`, what a recovery node's
//!   agent runs for a lost VM (and `lifeboat recover failover`, by the same functions): a fresh
//!   read-only handle on the store, the point chosen, the replica fenced (a new epoch
//!   written), every data range of the point read, written to a sparse image and hashed, the
//!   image fsynced and its digest compared with the point's. Timed from the handle's opening
//!   to the verified, durable disk.
//! - Peer: `cp --sparse=always` of the replica's own file (the same bytes) and `sync`.
//!
//! # `recovery-azure`: the same failover from Azure Blob (a real Azurite) against the SDK
//!
//! The image protected once into Azurite (keeping its data on disk) by the engine with the
//! Azure store.
//! Steps, alternating: Lifeboat's `fail_over_from_store` on a fresh `AzureStore` handle (the
//! page ranges of the point's snapshot read, written sparse, hashed, fsynced, verified), and
//! Azure's Python SDK downloading the same page blob into a file, fsynced (`--python`: an
//! interpreter that imports `azure.storage.blob`; skipped, and said, when none does).
//!
//! # `resync`: the agent's resync against rsync, nbdcopy and cat
//!
//! The same half-data image as a raw file, served by QSD with a writable guest export, so
//! that rsync compares the very file the VM's disk is. Protected once (not timed). Before
//! each resync 1 % of the 64 KiB blocks are rewritten through the export with `qemu-io`, at
//! random or in runs of 16 adjacent blocks. Steps, alternating which goes first:
//!
//! - Lifeboat: `Replicator::resync`, what the agent's Resynchronize job and `lifeboat resync`
//!   run (tracking restarted, a fleecing view over QMP, its allocated ranges read over NBD
//!   and hashed, compared with the stored block map, the differing blocks written to the
//!   store, a point cut), once with the stored map and once with the map files deleted (the
//!   replica then re-hashed first). Each gets its own fresh 1 % of changes; the bytes sent
//!   must be exactly the changed blocks.
//! - Peer: `rsync --inplace --no-whole-file --ignore-times disk.raw COPY` + `sync COPY`, its
//!   copy kept in step with the disk, so each run sees the same changes Lifeboat saw.
//! - Floors: `nbdcopy` of the guest export to `null:` (the fastest reader of an NBD export;
//!   it skips holes by block status, as Lifeboat does), `cat` of the disk, and of the disk
//!   and rsync's copy (what rsync reads).
//!
//! # `churn`, `churn-azure`: RPO under churn
//!
//! For each rate: a fresh sparse raw disk, protected (not timed), then `--churn-secs` of
//! random 64 KiB writes through the guest export (`qemu-io`, one at a time, throttled by a
//! QEMU throttle group to the rate) while `Replicator::run_cycle` runs every
//! `--churn-interval-secs`, or at once when the previous cycle ran late. A rate holds when
//! every cycle cut a point and the RPO (the age of the latest point, from when its cycle
//! began to when the next one lands) stayed under twice the interval. `churn-azure` does the
//! same into Azurite keeping its data on disk.
//!
//! # `roundtrip`: re-protect and failback against a full copy
//!
//! Twice (or once, with `--formats raw` or `--formats qcow2`): on raw disks, then on qcow2
//! disks (the failover writes qcow2 with a seed bitmap, the planned failover marks A's disk,
//! so re-protect and failback read only the changed blocks).
//! Per run, on the `--image-mib` half-data image: site A (QSD on a sparse copy) protected,
//! its initial copy timed (the full copy of the disk the hops are measured against); 1 % of
//! the 64 KiB blocks rewritten on A, a planned failover (A stopped, shipped, materialised);
//! site B (QSD on the failover's disk; a raw one armed as the agent arms it when the VM starts,
//! before the guest writes), 1 % rewritten, re-protect B timed; 1 % more on B, a
//! cycle of B (a point) and the job that keeps A's disk in step with it while B runs (a
//! Failback job with `presync` and no request), each timed; 1 % more on B, the failback timed
//! in its two jobs (the Failover job that stops and ships B, the Failback job that brings A's
//! disk to the final point: B is down for both); A again (armed as B was), 1 % rewritten,
//! re-protect A timed. Every hop runs the job
//! the agent runs (`lifeboat_engine::run_job`), the page cache dropped first, and asserts that
//! the bytes it moved equal the blocks that changed since its seed.

// A bench reports a failed setup by panicking: unwrap and expect are its error reports.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use lifeboat_engine::backend::DiskRef;
use lifeboat_engine::replicator::DiskFormat;
use lifeboat_engine::{Progress, Replicator, Report, Settings};
use lifeboat_qemu::QemuHypervisor;
use lifeboat_store::VmKey;
use lifeboat_store::local::LocalStore;
use lifeboat_store::testing::Azurite;

const MIB: u64 = 1024 * 1024;

/// A small seeded generator (SplitMix64): the image must be the same from run to run, and
/// random enough that nothing compresses or reads as zeros.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn fill(&mut self, buffer: &mut [u8]) {
        for word in buffer.chunks_mut(8) {
            let bytes = self.next().to_le_bytes();
            word.copy_from_slice(&bytes[..word.len()]);
        }
    }

    /// Fisher-Yates.
    fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            items.swap(i, (self.next() % (i as u64 + 1)) as usize);
        }
    }
}
const DISK: &str = "disk0";

struct Config {
    parts: Vec<String>,
    dir: PathBuf,
    disk_mib: u64,
    hot_mib: u64,
    run_secs: u64,
    interval_secs: u64,
    rounds: usize,
    depth: u32,
    request_kib: u64,
    image_mib: u64,
    runs: usize,
    steps: Vec<String>,
    warm: bool,
    verify: bool,
    keep: bool,
    /// The Python with `azure-storage-blob`, for the `recovery-azure` peer.
    python: String,
    churn_rates: Vec<u64>,
    churn_secs: u64,
    churn_disk_mib: u64,
    churn_interval_secs: u64,
    /// The disk formats of the `roundtrip` part: `raw`, `qcow2` or both.
    formats: Vec<DiskFormat>,
}

/// The settings of a smoke run: what `cargo test --all-targets` gets (it runs this binary
/// without `--bench`), a few seconds on tiny images in a folder of its own, page cache kept.
fn smoke_config() -> Config {
    Config {
        parts: vec![
            "tracking".into(),
            "copy".into(),
            "recovery".into(),
            "recovery-azure".into(),
            "resync".into(),
            "churn".into(),
            "churn-azure".into(),
            "roundtrip".into(),
        ],
        dir: PathBuf::from(format!(
            "/var/tmp/lifeboat-agent-bench-smoke-{}",
            std::process::id()
        )),
        disk_mib: 256,
        hot_mib: 16,
        run_secs: 2,
        interval_secs: 1,
        rounds: 1,
        depth: 4,
        request_kib: 64,
        image_mib: 64,
        runs: 1,
        steps: vec!["lifeboat".into(), "cp".into()],
        warm: true,
        verify: true,
        keep: false,
        python: "python3".into(),
        churn_rates: vec![5],
        churn_secs: 3,
        churn_disk_mib: 256,
        churn_interval_secs: 1,
        formats: vec![DiskFormat::Raw, DiskFormat::Qcow2],
    }
}

fn config() -> Config {
    if !std::env::args().any(|a| a == "--bench") {
        return smoke_config();
    }
    let env = |name: &str, default: &str| {
        std::env::var(format!("LIFEBOAT_BENCH_{name}")).unwrap_or_else(|_| default.to_owned())
    };
    // NB: a folder per process by default: a daemon of another run that goes away unlinks
    // its socket paths, which must not be ours.
    let dir = format!("/var/tmp/lifeboat-agent-bench-{}", std::process::id());
    let mut values: Vec<(&str, String)> = [
        ("parts", "tracking,copy"),
        ("dir", &dir),
        ("disk-mib", "2048"),
        ("hot-mib", "256"),
        ("run-secs", "100"),
        ("interval-secs", "30"),
        ("rounds", "3"),
        ("depth", "16"),
        ("request-kib", "64"),
        ("image-mib", "4096"),
        ("runs", "5"),
        ("steps", "lifeboat,cp"),
        ("python", "python3"),
        ("churn-rates", "50,100,150,200"),
        ("churn-secs", "180"),
        ("churn-disk-mib", "16384"),
        ("churn-interval-secs", "15"),
        ("formats", "raw,qcow2"),
    ]
    .into_iter()
    .map(|(k, d)| (k, env(&k.to_uppercase().replace('-', "_"), d)))
    .collect();
    let mut warm = env("WARM", "") == "1";
    let mut keep = env("KEEP", "") == "1";
    let mut verify = env("NO_VERIFY", "") != "1";
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--warm" => warm = true,
            "--keep" => keep = true,
            "--no-verify" => verify = false,
            _ => {
                // `cargo bench` passes `--bench`: ignore what is not ours.
                if let Some(slot) = values
                    .iter_mut()
                    .find(|(k, _)| arg.strip_prefix("--") == Some(*k))
                {
                    slot.1 = args.next().unwrap_or_else(|| panic!("{arg} needs a value"));
                }
            }
        }
    }
    let get = |k: &str| {
        values
            .iter()
            .find(|(name, _)| *name == k)
            .map(|(_, v)| v.clone())
            .unwrap()
    };
    let num = |k: &str| -> u64 {
        get(k)
            .parse()
            .unwrap_or_else(|e| panic!("--{k} {}: {e}", get(k)))
    };
    Config {
        parts: get("parts").split(',').map(str::to_owned).collect(),
        dir: PathBuf::from(get("dir")),
        disk_mib: num("disk-mib"),
        hot_mib: num("hot-mib"),
        run_secs: num("run-secs"),
        interval_secs: num("interval-secs").max(1),
        rounds: (num("rounds") as usize).max(1),
        depth: num("depth") as u32,
        request_kib: num("request-kib").max(4),
        image_mib: num("image-mib"),
        runs: (num("runs") as usize).max(1),
        steps: get("steps").split(',').map(str::to_owned).collect(),
        warm,
        verify,
        keep,
        python: get("python"),
        churn_rates: get("churn-rates")
            .split(',')
            .map(|r| {
                r.parse()
                    .unwrap_or_else(|e| panic!("--churn-rates {r}: {e}"))
            })
            .collect(),
        churn_secs: num("churn-secs").max(1),
        churn_disk_mib: num("churn-disk-mib"),
        churn_interval_secs: num("churn-interval-secs").max(1),
        formats: get("formats")
            .split(',')
            .map(|f| f.parse().unwrap_or_else(|e| panic!("--formats {f}: {e}")))
            .collect(),
    }
}

// ---------------------------------------------------------------------------------------
// Measuring helpers.

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|t| t.split_whitespace().next().map(str::to_owned))
        .unwrap_or_default()
}

/// CPU seconds of a process from `/proc/<pid>/stat` (clock ticks of 10 ms): its own
/// (utime + stime) and its waited-for children's (cutime + cstime).
fn cpu_of(pid: &str) -> (f64, f64) {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return (0.0, 0.0);
    };
    let fields: Vec<u64> = stat
        .rsplit_once(") ")
        .map(|(_, rest)| rest)
        .unwrap_or_default()
        .split_whitespace()
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    // `fields[0]` is field 3 of stat(5); utime, stime, cutime, cstime are fields 14-17.
    let at = |i: usize| fields.get(i).copied().unwrap_or(0) as f64 / 100.0;
    (at(11) + at(12), at(13) + at(14))
}

/// Bytes a process made the block devices read and write, from `/proc/<pid>/io`
/// (`read_bytes`, `write_bytes`: what reached storage, not what the page cache served).
fn io_of(pid: &str) -> (u64, u64) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/io")).unwrap_or_default();
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    (field("read_bytes:"), field("write_bytes:"))
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

fn mean(values: &[f64]) -> f64 {
    values.iter().sum::<f64>() / values.len().max(1) as f64
}

fn mb(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / 1e6)
}

fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Sync everything, then (unless `warm`) drop the page cache. Returns whether it was dropped.
fn settle(warm: bool) -> bool {
    run("sync", &[]);
    !warm && std::fs::write("/proc/sys/vm/drop_caches", "3").is_ok()
}

/// Bytes a file occupies on disk.
fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path)
        .map(|m| m.blocks() * 512)
        .unwrap_or(0)
}

fn remove_dir(path: &Path) {
    match std::fs::remove_dir_all(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => panic!("remove {}: {e}", path.display()),
    }
}

// ---------------------------------------------------------------------------------------
// The VM's block layer.

/// A command that the kernel kills when this process dies (util-linux `setpriv
/// --pdeathsig`), so that an interrupted bench leaves no daemon behind. Spawn it from the
/// main thread: the signal follows the thread that forked.
fn guarded(program: &str) -> Command {
    if Path::new("/usr/bin/setpriv").exists() {
        let mut command = Command::new("/usr/bin/setpriv");
        command.args(["--pdeathsig", "KILL", program]);
        command
    } else {
        Command::new(program)
    }
}

/// A qemu-storage-daemon serving one disk (node `disk0`) with QMP and, if asked, a
/// writable NBD export `guest` for the guest; stopped by its process id when dropped.
struct Qsd {
    child: Child,
    qmp: PathBuf,
    nbd: Option<PathBuf>,
}

impl Qsd {
    /// `image` is raw if its name ends in `.raw` or `.img` (a raw failover's), qcow2
    /// otherwise.
    fn start(dir: &Path, image: &Path, guest_export: bool) -> Qsd {
        let format = if image.extension().is_some_and(|e| e == "raw" || e == "img") {
            "raw"
        } else {
            "qcow2"
        };
        let qmp = dir.join("qmp.sock");
        let nbd = dir.join("guest-nbd.sock");
        let _ = std::fs::remove_file(&qmp);
        let _ = std::fs::remove_file(&nbd);
        let mut args = vec![
            "--blockdev".to_owned(),
            format!(
                "driver=file,node-name={DISK}-file,filename={}",
                image.display()
            ),
            "--blockdev".to_owned(),
            format!("driver={format},node-name={DISK},file={DISK}-file"),
        ];
        if guest_export {
            args.push("--nbd-server".into());
            args.push(format!("addr.type=unix,addr.path={}", nbd.display()));
            args.push("--export".into());
            args.push(format!(
                "type=nbd,id=guest,node-name={DISK},name=guest,writable=on"
            ));
        }
        args.push("--chardev".into());
        args.push(format!(
            "socket,path={},server=on,wait=off,id=qmp0",
            qmp.display()
        ));
        args.push("--monitor".into());
        args.push("chardev=qmp0".into());
        let child = guarded("qemu-storage-daemon")
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start qemu-storage-daemon (qemu-utils): {e}"));
        let deadline = Instant::now() + Duration::from_secs(10);
        while !(qmp.exists() && (!guest_export || nbd.exists())) {
            assert!(
                Instant::now() < deadline,
                "qemu-storage-daemon did not open its sockets"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Qsd {
            child,
            qmp,
            nbd: guest_export.then_some(nbd),
        }
    }

    fn pid(&self) -> String {
        self.child.id().to_string()
    }

    /// Stop it cleanly (SIGTERM), as a host shuts a VM down: a qcow2 image's persistent
    /// bitmaps are written when the daemon closes it (dropped, it is killed).
    fn stop(self) {
        run("kill", &["-TERM", &self.pid()]);
        let mut me = self;
        let status = me.child.wait().unwrap();
        assert!(status.success(), "qemu-storage-daemon exited with {status}");
    }

    fn disks(&self, image: &Path) -> Vec<DiskRef> {
        vec![DiskRef {
            name: DISK.to_owned(),
            path: image.display().to_string(),
            node: Some(DISK.to_owned()),
        }]
    }
}

impl Drop for Qsd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An engine on a fresh store and state folder under `dir`.
async fn open_engine(
    name: &str,
    qsd: &Qsd,
    image: &Path,
    dir: &Path,
    settings: Settings,
) -> Replicator {
    let store = Arc::new(LocalStore::open(dir.join("store")).unwrap());
    open_engine_on(name, qsd, image, dir, settings, store).await
}

/// [`open_engine`] on any store.
async fn open_engine_on(
    name: &str,
    qsd: &Qsd,
    image: &Path,
    dir: &Path,
    settings: Settings,
    store: Arc<dyn lifeboat_store::ReplicaStore>,
) -> Replicator {
    let vm = VmKey::new("bench", name).unwrap();
    let hypervisor = Arc::new(QemuHypervisor::new(name, &qsd.qmp, dir.join("qemu")));
    Replicator::open(
        vm,
        qsd.disks(image),
        dir.join("agent"),
        hypervisor,
        store,
        settings,
    )
    .await
    .unwrap_or_else(|e| panic!("open the engine: {e}"))
}

fn no_progress(_: &Progress) {}

/// Arm the disk of the VM `qsd` serves on `image` (its QMP socket in `dir`'s name `name`), as
/// the agent does once the VM started on disks a failover or a failback left at a point, before
/// its guest writes: `lifeboat_engine::replicator::arm_seeds`, the call of the agent's
/// `vm_worker::arm_started_vm`. Not timed: the agent does it in the background, within a tick
/// of the VM's start. Whether a disk was armed (a raw one with its stamp beside it).
async fn arm(name: &str, qsd: &Qsd, image: &Path, dir: &Path) -> bool {
    let vm = VmKey::new("bench", name).unwrap();
    let hypervisor = QemuHypervisor::new(name, &qsd.qmp, dir.join("qemu"));
    !lifeboat_engine::replicator::arm_seeds(&hypervisor, &vm, &qsd.disks(image))
        .await
        .is_empty()
}

// ---------------------------------------------------------------------------------------
// Part 1: change tracking cost.

struct GuestRun {
    protected: bool,
    seconds: f64,
    load_before: String,
    load_after: String,
    guest_cpu: f64,
    qsd_cpu: f64,
    agent_cpu: f64,
    cycles: Vec<CycleRecord>,
}

struct CycleRecord {
    started: Duration,
    took: Duration,
    report: Result<Report, String>,
}

/// `qemu-img bench` writing `count` requests into the hot window; the seconds it reports.
async fn guest_bench(config: &Config, socket: &Path, count: u64) -> f64 {
    let opts = format!(
        "driver=raw,offset=0,size={},file.driver=nbd,file.server.type=unix,file.server.path={},file.export=guest",
        config.hot_mib * MIB,
        socket.display()
    );
    let out = tokio::process::Command::from(guarded("qemu-img"))
        .args(["bench", "-w", "-t", "none", "--pattern", "90"])
        .args(["-c", &count.to_string()])
        .args(["-s", &format!("{}k", config.request_kib)])
        .args(["-d", &config.depth.to_string()])
        .args(["--image-opts", &opts])
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "qemu-img bench failed: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text.lines()
        .find_map(|l| l.strip_prefix("Run completed in "))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("unexpected qemu-img bench output: {text}"))
}

async fn guest_run(
    config: &Config,
    qsd: &Qsd,
    image: &Path,
    work: &Path,
    count: u64,
    protected: bool,
    round: usize,
) -> GuestRun {
    let socket = qsd.nbd.clone().unwrap();
    run("sync", &[]);
    let engine = if protected {
        let dir = work.join(format!("protect-{round}"));
        remove_dir(&dir);
        let settings = Settings {
            copy_interval: Duration::from_secs(config.interval_secs),
            ..Settings::default()
        };
        let mut engine = open_engine(&format!("track-{round}"), qsd, image, &dir, settings).await;
        engine.enable().await.unwrap();
        engine.initial_copy(&no_progress).await.unwrap();
        let finalize = engine.run_cycle(SystemTime::now()).await.unwrap();
        assert!(finalize.point.is_some(), "the finalize cycle cut no point");
        run("sync", &[]);
        Some((engine, dir))
    } else {
        None
    };
    let load_before = load_average();
    let (qsd_before, _) = cpu_of(&qsd.pid());
    let (self_before, children_before) = cpu_of("self");
    let interval = Duration::from_secs(config.interval_secs);
    let (stop, mut stopped) = tokio::sync::watch::channel(false);
    let cycles = engine.map(|(mut engine, dir)| {
        tokio::spawn(async move {
            let start = tokio::time::Instant::now();
            let mut records = Vec::new();
            for k in 1u32.. {
                tokio::select! {
                    _ = tokio::time::sleep_until(start + interval * k) => {}
                    _ = stopped.changed() => break,
                }
                let began = tokio::time::Instant::now();
                let report = engine
                    .run_cycle(SystemTime::now())
                    .await
                    .map_err(|e| e.to_string());
                records.push(CycleRecord {
                    started: began - start,
                    took: began.elapsed(),
                    report,
                });
            }
            (engine, dir, records)
        })
    });
    let seconds = guest_bench(config, &socket, count).await;
    let load_after = load_average();
    let _ = stop.send(true);
    let (qsd_after, _) = cpu_of(&qsd.pid());
    let (self_after, children_after) = cpu_of("self");
    let mut records = Vec::new();
    if let Some(task) = cycles {
        let (mut engine, dir, done) = task.await.unwrap();
        records = done;
        engine.disable(true).await.unwrap();
        remove_dir(&dir);
    }
    GuestRun {
        protected,
        seconds,
        load_before,
        load_after,
        guest_cpu: children_after - children_before,
        qsd_cpu: qsd_after - qsd_before,
        agent_cpu: self_after - self_before,
        cycles: records,
    }
}

async fn tracking_part(config: &Config) {
    let work = config.dir.join("tracking");
    remove_dir(&work);
    std::fs::create_dir_all(&work).unwrap();
    let image = work.join("guest.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            image.to_str().unwrap(),
            &format!("{}M", config.disk_mib),
        ],
    );
    let qsd = Qsd::start(&work, &image, true);
    let socket = qsd.nbd.clone().unwrap();
    let request = config.request_kib * 1024;
    let window = config.hot_mib * MIB;
    // Allocate the window's clusters (the first writes to a qcow2 cost more), then calibrate.
    guest_bench(config, &socket, window / request).await;
    // NB: the faster of two probes, so that a burst of other work during one of them does
    // not make every run shorter than asked (and leave it with fewer cycles).
    let first = (4 * window / request).max(1024);
    let first_secs = guest_bench(config, &socket, first).await;
    let probe = ((first as f64 / first_secs) * 3.0) as u64;
    let probe_secs = guest_bench(config, &socket, probe)
        .await
        .min(probe as f64 * first_secs / first as f64);
    let count = ((probe as f64 / probe_secs) * config.run_secs as f64) as u64;
    println!(
        "\n### Change tracking cost: {} MiB qcow2 disk, guest writes to its first {} MiB, \
         {} KiB requests, {} in flight, a cycle every {} s\n",
        config.disk_mib, config.hot_mib, config.request_kib, config.depth, config.interval_secs
    );
    println!(
        "calibration: {probe} requests in {probe_secs:.3} s ({:.0} MB/s); each run writes {count} requests ({} MB)\n",
        (probe * request) as f64 / probe_secs / 1e6,
        mb(count * request)
    );
    println!(
        "| round | run | MB/s | seconds | load before → after | CPU s guest / QSD / agent | cycles (start s: took s, read MB, shipped MB) |"
    );
    println!("|---|---|---|---|---|---|---|");
    let mut runs = Vec::new();
    for round in 1..=config.rounds {
        let order = if round % 2 == 1 {
            [false, true]
        } else {
            [true, false]
        };
        for protected in order {
            let r = guest_run(config, &qsd, &image, &work, count, protected, round).await;
            let cycles: Vec<String> = r
                .cycles
                .iter()
                .map(|c| match &c.report {
                    Ok(report) => format!(
                        "{:.0}: {:.2}, {}, {}{}",
                        c.started.as_secs_f64(),
                        c.took.as_secs_f64(),
                        mb(report.bytes_read),
                        mb(report.bytes_sent),
                        if report.resync_required.is_some() {
                            " RESYNC"
                        } else {
                            ""
                        }
                    ),
                    Err(e) => format!("{:.0}: failed: {e}", c.started.as_secs_f64()),
                })
                .collect();
            println!(
                "| {round} | {} | {:.0} | {:.2} | {} → {} | {:.1} / {:.1} / {:.1} | {} |",
                if r.protected {
                    "protected"
                } else {
                    "unprotected"
                },
                (count * request) as f64 / r.seconds / 1e6,
                r.seconds,
                r.load_before,
                r.load_after,
                r.guest_cpu,
                r.qsd_cpu,
                r.agent_cpu,
                if cycles.is_empty() {
                    "–".to_owned()
                } else {
                    cycles.join("; ")
                }
            );
            runs.push(r);
        }
    }
    let rate = |r: &GuestRun| (count * request) as f64 / r.seconds / 1e6;
    let unprotected: Vec<f64> = runs.iter().filter(|r| !r.protected).map(rate).collect();
    let protected: Vec<f64> = runs.iter().filter(|r| r.protected).map(rate).collect();
    let paired: Vec<f64> = runs
        .chunks(2)
        .map(|pair| {
            let (p, u): (Vec<&GuestRun>, Vec<&GuestRun>) = pair.iter().partition(|r| r.protected);
            rate(p[0]) / rate(u[0])
        })
        .collect();
    let cycles: Vec<&CycleRecord> = runs.iter().flat_map(|r| r.cycles.iter()).collect();
    let ok: Vec<&Report> = cycles
        .iter()
        .filter_map(|c| c.report.as_ref().ok())
        .collect();
    let took: Vec<f64> = cycles.iter().map(|c| c.took.as_secs_f64()).collect();
    println!(
        "\nmedian MB/s: unprotected {:.0}, protected {:.0}; protected/unprotected: ratio of medians {:.3}, \
         mean of the rounds' ratios {:.3} ({}); cycles: {} ({} failed, {} asked for a resync), \
         median {:.2} s (min {:.2}, max {:.2}), median read {} MB, median shipped {} MB per cycle",
        median(&unprotected),
        median(&protected),
        median(&protected) / median(&unprotected),
        mean(&paired),
        paired
            .iter()
            .map(|p| format!("{p:.3}"))
            .collect::<Vec<_>>()
            .join(", "),
        cycles.len(),
        cycles.len() - ok.len(),
        ok.iter().filter(|r| r.resync_required.is_some()).count(),
        median(&took),
        took.iter().copied().fold(f64::INFINITY, f64::min),
        took.iter().copied().fold(0.0, f64::max),
        mb(median(&ok.iter().map(|r| r.bytes_read as f64).collect::<Vec<_>>()) as u64),
        mb(median(&ok.iter().map(|r| r.bytes_sent as f64).collect::<Vec<_>>()) as u64),
    );
    drop(qsd);
    if !config.keep {
        remove_dir(&work);
    }
}

// ---------------------------------------------------------------------------------------
// Part 2: initial replication against cp --sparse=always + sync.

/// Build `source.raw` (sparse, half 1 MiB extents of random data) and `source.qcow2` from
/// it, unless `--keep` left them from an earlier run of the same size. Returns the data
/// bytes, the number of data runs and of holes.
fn build_image(config: &Config, dir: &Path, qcow2_too: bool) -> (u64, usize, usize) {
    use std::os::unix::fs::FileExt;
    let raw = dir.join("source.raw");
    let qcow2 = dir.join("source.qcow2");
    let slots = config.image_mib as usize;
    let mut chosen: Vec<usize> = (0..slots).collect();
    let mut rng = SplitMix(5);
    rng.shuffle(&mut chosen);
    chosen.truncate(slots / 2);
    chosen.sort_unstable();
    let runs = chosen
        .iter()
        .enumerate()
        .filter(|(i, s)| *i == 0 || chosen[i - 1] + 1 != **s)
        .count();
    let data_bytes = chosen.len() as u64 * MIB;
    let stamp = dir.join(format!("built-{}-splitmix-5", config.image_mib));
    if !(stamp.exists() && raw.exists()) {
        let _ = std::fs::remove_file(&stamp);
        let _ = std::fs::remove_file(&qcow2);
        let _ = std::fs::remove_file(&raw);
        let file = std::fs::File::create(&raw).unwrap();
        file.set_len(config.image_mib * MIB).unwrap();
        let mut buffer = vec![0u8; MIB as usize];
        for slot in &chosen {
            rng.fill(&mut buffer);
            file.write_all_at(&buffer, *slot as u64 * MIB).unwrap();
        }
        file.sync_all().unwrap();
        std::fs::write(&stamp, b"").unwrap();
    }
    if qcow2_too && !qcow2.exists() {
        run(
            "qemu-img",
            &[
                "convert",
                "-q",
                "-f",
                "raw",
                "-O",
                "qcow2",
                raw.to_str().unwrap(),
                qcow2.to_str().unwrap(),
            ],
        );
    }
    let holes = chosen.windows(2).filter(|w| w[0] + 1 != w[1]).count()
        + usize::from(chosen.first() != Some(&0))
        + usize::from(chosen.last() != Some(&(slots - 1)));
    (data_bytes, runs, holes)
}

struct CopyRun {
    seconds: f64,
    /// Lifeboat: open+enable; cp: the cp itself.
    first: f64,
    /// Lifeboat: initial_copy until the last progress report; cp: the sync.
    second: f64,
    /// Lifeboat: from the last progress report to the end (flush, view closed).
    third: f64,
    cpu: f64,
    qsd_cpu: f64,
    written: u64,
    allocated: u64,
    load: String,
    dropped: bool,
}

async fn lifeboat_copy(config: &Config, qsd: &Qsd, dir: &Path, verify: bool) -> CopyRun {
    let work = dir.join("lifeboat");
    remove_dir(&work);
    let dropped = settle(config.warm);
    let load = load_average();
    let image = dir.join("source.qcow2");
    let (qsd_before, _) = cpu_of(&qsd.pid());
    let (cpu_before, _) = cpu_of("self");
    let started = Instant::now();
    let mut engine = open_engine("copy", qsd, &image, &work, Settings::default()).await;
    engine.enable().await.unwrap();
    let enabled = started.elapsed();
    let last = Mutex::new(started);
    let sink = |_: &Progress| *last.lock().unwrap() = Instant::now();
    let report = engine.initial_copy(&sink).await.unwrap();
    let seconds = started.elapsed();
    let last = *last.lock().unwrap() - started;
    let (cpu_after, _) = cpu_of("self");
    let (qsd_after, _) = cpu_of(&qsd.pid());
    let replica = work
        .join("store/bench/copy/disks")
        .join(format!("{DISK}.img"));
    let allocated = allocated(&replica);
    if verify {
        run(
            "cmp",
            &[
                dir.join("source.raw").to_str().unwrap(),
                replica.to_str().unwrap(),
            ],
        );
    }
    engine.disable(true).await.unwrap();
    remove_dir(&work);
    CopyRun {
        seconds: seconds.as_secs_f64(),
        first: enabled.as_secs_f64(),
        second: (last - enabled).as_secs_f64(),
        third: (seconds - last).as_secs_f64(),
        cpu: cpu_after - cpu_before,
        qsd_cpu: qsd_after - qsd_before,
        written: report.bytes_sent,
        allocated,
        load,
        dropped,
    }
}

fn cp_copy(config: &Config, dir: &Path, verify: bool) -> CopyRun {
    let out = dir.join("cp");
    remove_dir(&out);
    std::fs::create_dir_all(&out).unwrap();
    let dest = out.join(format!("{DISK}.img"));
    let dropped = settle(config.warm);
    let load = load_average();
    let (_, children_before) = cpu_of("self");
    let started = Instant::now();
    run(
        "cp",
        &[
            "--sparse=always",
            dir.join("source.raw").to_str().unwrap(),
            dest.to_str().unwrap(),
        ],
    );
    let copied = started.elapsed();
    run("sync", &[dest.to_str().unwrap(), out.to_str().unwrap()]);
    let seconds = started.elapsed();
    let (_, children_after) = cpu_of("self");
    let allocated = allocated(&dest);
    if verify {
        run(
            "cmp",
            &[
                dir.join("source.raw").to_str().unwrap(),
                dest.to_str().unwrap(),
            ],
        );
    }
    remove_dir(&out);
    CopyRun {
        seconds: seconds.as_secs_f64(),
        first: copied.as_secs_f64(),
        second: (seconds - copied).as_secs_f64(),
        third: 0.0,
        // cp's and sync's CPU (children waited for); cmp runs after the reading.
        cpu: children_after - children_before,
        qsd_cpu: 0.0,
        written: 0,
        allocated,
        load,
        dropped,
    }
}

async fn copy_part(config: &Config) {
    let dir = config.dir.join("copy");
    std::fs::create_dir_all(&dir).unwrap();
    // The raw image, the qcow2 and one copy at a time each hold the data (half the image),
    // plus room for everyone else on the machine.
    let needed = 3 * config.image_mib * MIB / 2 + 1024 * MIB;
    let kept = ["source.raw", "source.qcow2"]
        .iter()
        .map(|f| allocated(&dir.join(f)))
        .sum::<u64>();
    let free = lifeboat_engine::space::free_space_bytes(&dir).unwrap() + kept;
    assert!(
        free >= needed,
        "{} has {} MB free (counting a kept image), the copy part needs {} MB: free some \
         space or pass a smaller --image-mib",
        dir.display(),
        mb(free),
        mb(needed)
    );
    let (data_bytes, data_runs, holes) = build_image(config, &dir, true);
    let qsd = Qsd::start(&dir, &dir.join("source.qcow2"), false);
    println!(
        "\n### Initial replication: {} MiB image, {} MB of data in {} runs of 1 MiB extents, {} holes\n",
        config.image_mib,
        mb(data_bytes),
        data_runs,
        holes
    );
    println!(
        "| run | step | seconds | phases s | CPU s (QSD) | data sent MB | allocated MB | load | cache |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    let mut lifeboat = Vec::new();
    let mut peer = Vec::new();
    for i in 1..=config.runs {
        let verify = i == 1 && config.verify;
        let mut steps = Vec::new();
        for lifeboat_first in [i % 2 == 1, i % 2 == 0] {
            let step = if lifeboat_first { "lifeboat" } else { "cp" };
            if !config.steps.iter().any(|s| s == step) {
                continue;
            }
            if lifeboat_first {
                let r = lifeboat_copy(config, &qsd, &dir, verify).await;
                steps.push(("Lifeboat", r));
            } else {
                steps.push(("cp + sync", cp_copy(config, &dir, verify)));
            }
        }
        for (name, r) in steps {
            let phases = if name == "Lifeboat" {
                format!(
                    "open+enable {:.2}, copy {:.2}, flush+close {:.2}",
                    r.first, r.second, r.third
                )
            } else {
                format!("cp {:.2}, sync {:.2}", r.first, r.second)
            };
            println!(
                "| {i} | {name} | {:.2} | {phases} | {:.2} ({:.2}) | {} | {} | {} | {} |",
                r.seconds,
                r.cpu,
                r.qsd_cpu,
                if name == "Lifeboat" {
                    mb(r.written)
                } else {
                    "–".into()
                },
                mb(r.allocated),
                r.load,
                if r.dropped { "dropped" } else { "warm" }
            );
            if name == "Lifeboat" {
                lifeboat.push(r.seconds);
            } else {
                peer.push(r.seconds);
            }
        }
    }
    let (l, p) = (median(&lifeboat), median(&peer));
    println!(
        "\nmedian seconds: Lifeboat {l:.2}, cp + sync {p:.2}; Lifeboat / peer {:.3} (target ≤ 1.25)",
        l / p
    );
    drop(qsd);
    if !config.keep {
        remove_dir(&dir);
    }
}

// ---------------------------------------------------------------------------------------
// Recovery: a failover from the replica store alone.

/// One timed recovery: seconds, and the CPU seconds of this process (Lifeboat) or of its
/// children (cp, sync).
struct RecoveryRun {
    seconds: f64,
    cpu: f64,
    load: String,
    dropped: bool,
}

/// What a recovery node's agent (and `lifeboat recover failover`) runs, through the same
/// function: a fresh read-only handle on the store (another node's view), the point chosen,
/// the replica fenced, every disk materialised into `out` and verified against its digest.
async fn lifeboat_recovery(
    config: &Config,
    root: &Path,
    vm: &VmKey,
    out: &Path,
    verify: Option<&Path>,
) -> RecoveryRun {
    remove_dir(out);
    let dropped = settle(config.warm);
    let load = load_average();
    let (cpu_before, _) = cpu_of("self");
    let started = Instant::now();
    let store = LocalStore::open_read_only(root).unwrap();
    let (_, report) = lifeboat_engine::replicator::fail_over_from_store(
        &store,
        vm,
        &lifeboat_engine::replicator::PointChoice::Latest,
        "bench",
        std::time::SystemTime::now(),
        lifeboat_engine::replicator::Output::raw(out),
        &no_progress,
    )
    .await
    .unwrap_or_else(|e| panic!("recover: {e}"));
    let seconds = started.elapsed().as_secs_f64();
    let (cpu_after, _) = cpu_of("self");
    if let Some(source) = verify {
        let disk = report.disks.first().unwrap();
        run(
            "cmp",
            &[source.to_str().unwrap(), disk.path.to_str().unwrap()],
        );
    }
    remove_dir(out);
    RecoveryRun {
        seconds,
        cpu: cpu_after - cpu_before,
        load,
        dropped,
    }
}

/// The peer: `cp --sparse=always` of the replica's file (the same bytes) and `sync`.
fn cp_recovery(config: &Config, replica: &Path, out: &Path) -> RecoveryRun {
    remove_dir(out);
    std::fs::create_dir_all(out).unwrap();
    let dest = out.join(format!("{DISK}.img"));
    let dropped = settle(config.warm);
    let load = load_average();
    let (_, before) = cpu_of("self");
    let started = Instant::now();
    run(
        "cp",
        &[
            "--sparse=always",
            replica.to_str().unwrap(),
            dest.to_str().unwrap(),
        ],
    );
    run("sync", &[dest.to_str().unwrap(), out.to_str().unwrap()]);
    let seconds = started.elapsed().as_secs_f64();
    let (_, after) = cpu_of("self");
    remove_dir(out);
    RecoveryRun {
        seconds,
        cpu: after - before,
        load,
        dropped,
    }
}

async fn recovery_part(config: &Config) {
    let dir = config.dir.join("recovery");
    std::fs::create_dir_all(&dir).unwrap();
    let (data_bytes, data_runs, holes) = build_image(config, &dir, true);
    let qsd = Qsd::start(&dir, &dir.join("source.qcow2"), false);
    // The replica, with its first point (the finalize cycle), as the VM's agent left it.
    let work = dir.join("protected");
    remove_dir(&work);
    let mut engine = open_engine(
        "recovery",
        &qsd,
        &dir.join("source.qcow2"),
        &work,
        Settings::default(),
    )
    .await;
    engine.enable().await.unwrap();
    engine.initial_copy(&no_progress).await.unwrap();
    let cycle = engine
        .run_cycle(std::time::SystemTime::now())
        .await
        .unwrap();
    assert!(cycle.point.is_some(), "the finalize cycle cuts a point");
    drop(engine);
    drop(qsd);
    let vm = VmKey::new("bench", "recovery").unwrap();
    let root = work.join("store");
    let replica = root
        .join("bench/recovery/disks")
        .join(format!("{DISK}.img"));
    println!(
        "\n### Recovery from the store: {} MiB image, {} MB of data in {} runs of 1 MiB extents, {} holes\n",
        config.image_mib,
        mb(data_bytes),
        data_runs,
        holes
    );
    println!("| run | step | seconds | CPU s | load | cache |");
    println!("|---|---|---|---|---|---|");
    let (mut lifeboat, mut peer) = (Vec::new(), Vec::new());
    let out = dir.join("out");
    for i in 1..=config.runs {
        let verify = (i == 1 && config.verify).then(|| dir.join("source.raw"));
        for lifeboat_first in [i % 2 == 1, i % 2 == 0] {
            let (name, r) = if lifeboat_first {
                if !config.steps.iter().any(|s| s == "lifeboat") {
                    continue;
                }
                let r = lifeboat_recovery(config, &root, &vm, &out, verify.as_deref()).await;
                lifeboat.push(r.seconds);
                ("Lifeboat", r)
            } else {
                if !config.steps.iter().any(|s| s == "cp") {
                    continue;
                }
                let r = cp_recovery(config, &replica, &out);
                peer.push(r.seconds);
                ("cp + sync", r)
            };
            println!(
                "| {i} | {name} | {:.2} | {:.2} | {} | {} |",
                r.seconds,
                r.cpu,
                r.load,
                if r.dropped { "dropped" } else { "warm" }
            );
        }
    }
    let (l, p) = (median(&lifeboat), median(&peer));
    println!(
        "\nmedian seconds: Lifeboat {l:.2}, cp + sync {p:.2}; Lifeboat / peer {:.3} (target ≤ 1.25)",
        l / p
    );
    if !config.keep {
        remove_dir(&dir);
    }
}

// ---------------------------------------------------------------------------------------
// Recovery from Azure Blob (Azurite): the same failover against the Azure SDK's download.

/// The peer: Azure's Python SDK (`azure-storage-blob`) downloads the page blob of the disk
/// (`download_blob(max_concurrency=4).readinto`, which asks for the page ranges and does not
/// fetch the empty ones) into a file, fsynced. The interpreter is `--python` (a venv with the
/// package: `python3 -m venv V && V/bin/pip install azure-storage-blob`).
const SDK_DOWNLOAD: &str = r#"
import os, sys
from azure.storage.blob import BlobClient
url, key, container, blob, out = sys.argv[1:6]
client = BlobClient(url, container, blob, credential={"account_name": "devstoreaccount1", "account_key": key})
with open(out, "wb") as f:
    client.download_blob(max_concurrency=4).readinto(f)
    f.flush()
    os.fsync(f.fileno())
"#;

fn sdk_available(python: &str) -> bool {
    Command::new(python)
        .args(["-c", "import azure.storage.blob"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

async fn azure_recovery_part(config: &Config) {
    let dir = config.dir.join("recovery-azure");
    std::fs::create_dir_all(&dir).unwrap();
    let (data_bytes, data_runs, holes) = build_image(config, &dir, true);
    let qsd = Qsd::start(&dir, &dir.join("source.qcow2"), false);
    // NB: on disk: in memory, Azurite refuses a page blob past 512 MB of extents.
    let data = dir.join("azurite");
    remove_dir(&data);
    std::fs::create_dir_all(&data).unwrap();
    let azurite = Azurite::start_on(lifeboat_store::testing::free_port(), Some(&data));
    let options = lifeboat_store::azure::AzureStoreOptions::default();
    let open_store = || async {
        lifeboat_store::testing::shared_key_store(&azurite, "replicas", options.clone()).await
    };
    // The replica in Azurite, with its first point, as the VM's agent left it.
    let work = dir.join("protected");
    remove_dir(&work);
    let name = "recovery";
    let mut engine = open_engine_on(
        name,
        &qsd,
        &dir.join("source.qcow2"),
        &work,
        Settings::default(),
        Arc::new(open_store().await),
    )
    .await;
    engine.enable().await.unwrap();
    engine.initial_copy(&no_progress).await.unwrap();
    let cycle = engine.run_cycle(SystemTime::now()).await.unwrap();
    assert!(cycle.point.is_some(), "the finalize cycle cuts a point");
    drop(engine);
    drop(qsd);
    let vm = VmKey::new("bench", name).unwrap();
    let python = config.python.clone();
    let sdk = sdk_available(&python);
    println!(
        "\n### Recovery from Azure Blob (Azurite): {} MiB image, {} MB of data in {} runs of 1 MiB extents, {} holes\n",
        config.image_mib,
        mb(data_bytes),
        data_runs,
        holes
    );
    if !sdk {
        println!("(the SDK peer is skipped: {python} cannot import azure.storage.blob)\n");
    }
    println!("| run | step | seconds | CPU s | load | cache |");
    println!("|---|---|---|---|---|---|");
    let (mut lifeboat, mut peer) = (Vec::new(), Vec::new());
    let out = dir.join("out");
    for i in 1..=config.runs {
        let verify = i == 1 && config.verify;
        for lifeboat_first in [i % 2 == 1, i % 2 == 0] {
            remove_dir(&out);
            std::fs::create_dir_all(&out).unwrap();
            let dropped = settle(config.warm);
            let load = load_average();
            let (name, seconds, cpu) = if lifeboat_first {
                if !config.steps.iter().any(|s| s == "lifeboat") {
                    continue;
                }
                let (cpu_before, _) = cpu_of("self");
                let started = Instant::now();
                // NB: a fresh handle: the recovery node has nothing but the account.
                let store = open_store().await;
                let (_, report) = lifeboat_engine::replicator::fail_over_from_store(
                    &store,
                    &vm,
                    &lifeboat_engine::replicator::PointChoice::Latest,
                    "bench",
                    SystemTime::now(),
                    lifeboat_engine::replicator::Output::raw(&out),
                    &no_progress,
                )
                .await
                .unwrap_or_else(|e| panic!("recover: {e}"));
                let seconds = started.elapsed().as_secs_f64();
                let (cpu_after, _) = cpu_of("self");
                if verify {
                    let disk = report.disks.first().unwrap();
                    let source = dir.join("source.raw");
                    run(
                        "cmp",
                        &[source.to_str().unwrap(), disk.path.to_str().unwrap()],
                    );
                }
                lifeboat.push(seconds);
                ("Lifeboat", seconds, cpu_after - cpu_before)
            } else {
                if !sdk {
                    continue;
                }
                let dest = out.join(format!("{DISK}.vhd"));
                let (_, before) = cpu_of("self");
                let started = Instant::now();
                run(
                    &python,
                    &[
                        "-c",
                        SDK_DOWNLOAD,
                        &azurite.account_url(),
                        lifeboat_store::testing::DEV_KEY,
                        "replicas",
                        &format!("bench/{name}/disks/{DISK}.vhd"),
                        dest.to_str().unwrap(),
                    ],
                );
                let seconds = started.elapsed().as_secs_f64();
                let (_, after) = cpu_of("self");
                if verify {
                    // NB: the blob is the disk and a 512-byte VHD footer.
                    let source = dir.join("source.raw");
                    let size = std::fs::metadata(&source).unwrap().len().to_string();
                    let (s, d) = (source.to_str().unwrap(), dest.to_str().unwrap());
                    run("cmp", &["-n", &size, s, d]);
                }
                peer.push(seconds);
                ("SDK download", seconds, after - before)
            };
            println!(
                "| {i} | {name} | {seconds:.2} | {cpu:.2} | {load} | {} |",
                if dropped { "dropped" } else { "warm" }
            );
        }
    }
    remove_dir(&out);
    if peer.is_empty() {
        println!("\nmedian seconds: Lifeboat {:.2}", median(&lifeboat));
    } else {
        let (l, p) = (median(&lifeboat), median(&peer));
        println!(
            "\nmedian seconds: Lifeboat {l:.2}, SDK download {p:.2}; Lifeboat / peer {:.3}",
            l / p
        );
    }
    if !config.keep {
        remove_dir(&dir);
    }
}

// ---------------------------------------------------------------------------------------
// Guest writes for the resync and churn parts.

/// Write 64 KiB at each of `offsets` (pattern byte `pattern`) through the guest's NBD export
/// with `writers` `qemu-io` processes, each one request at a time over its own connection
/// (a guest with that many writes in flight), together at most `rate` bytes a second (a QEMU
/// throttle group per process between `qemu-io` and the export) when given. Returns the
/// seconds it took.
fn guest_writes(
    socket: &Path,
    offsets: Vec<u64>,
    pattern: u8,
    rate: Option<u64>,
    writers: usize,
) -> f64 {
    use std::io::Write;
    let nbd = format!(
        "file.driver=nbd,file.server.type=unix,file.server.path={},file.export=guest",
        socket.display()
    );
    let started = Instant::now();
    let mut children = Vec::new();
    let mut feeders = Vec::new();
    for w in 0..writers.max(1) {
        let mut command = guarded("qemu-io");
        match rate {
            Some(rate) => command.args([
                "--object".to_owned(),
                format!(
                    "throttle-group,id=churn,x-bps-write={}",
                    rate / writers.max(1) as u64
                ),
                "--image-opts".to_owned(),
                format!("driver=throttle,throttle-group=churn,{nbd}"),
            ]),
            None => command.args(["--image-opts".to_owned(), format!("driver=raw,{nbd}")]),
        };
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start qemu-io (qemu-utils): {e}"));
        let mut stdin = std::io::BufWriter::new(child.stdin.take().unwrap());
        let mine: Vec<u64> = offsets
            .iter()
            .skip(w)
            .step_by(writers.max(1))
            .copied()
            .collect();
        feeders.push(std::thread::spawn(move || {
            for offset in mine {
                writeln!(stdin, "write -P {pattern} {offset} 64k").unwrap();
            }
            writeln!(stdin, "flush").unwrap();
            stdin.flush().unwrap();
        }));
        children.push(child);
    }
    for feeder in feeders {
        feeder.join().unwrap();
    }
    for mut child in children {
        let status = child.wait().unwrap();
        assert!(status.success(), "qemu-io failed: {status}");
    }
    started.elapsed().as_secs_f64()
}

// ---------------------------------------------------------------------------------------
// Resync: the agent's own, against rsync and the read floors.

const BLOCK: u64 = 64 * 1024;

/// `count` (a multiple of 16) distinct 64 KiB blocks of `blocks`, at random or
/// (`clustered`) in runs of 16 adjacent blocks; their byte offsets, sorted.
fn changed_blocks(rng: &mut SplitMix, blocks: u64, count: u64, clustered: bool) -> Vec<u64> {
    let run = if clustered { 16 } else { 1 };
    let mut slots: Vec<u64> = (0..blocks / run).collect();
    rng.shuffle(&mut slots);
    let mut offsets: Vec<u64> = slots[..(count / run) as usize]
        .iter()
        .flat_map(|s| (s * run..(s + 1) * run).map(|b| b * BLOCK))
        .collect();
    offsets.sort_unstable();
    offsets
}

/// One timed step of the resync part.
struct Step {
    seconds: f64,
    cpu: f64,
    qsd_cpu: f64,
    read: u64,
    sent: u64,
    /// Lifeboat: where the time went.
    phases: String,
    load: String,
    dropped: bool,
}

/// Time `work` (a program run to the end, or the engine), with its CPU: this process's or,
/// for programs, its children's.
async fn timed<F: std::future::Future<Output = (u64, u64)>>(
    config: &Config,
    qsd: &Qsd,
    work: impl FnOnce() -> F,
) -> Step {
    let dropped = settle(config.warm);
    let load = load_average();
    let (qsd_before, _) = cpu_of(&qsd.pid());
    let (self_before, children_before) = cpu_of("self");
    let started = Instant::now();
    let (read, sent) = work().await;
    let seconds = started.elapsed().as_secs_f64();
    let (self_after, children_after) = cpu_of("self");
    let (qsd_after, _) = cpu_of(&qsd.pid());
    Step {
        seconds,
        cpu: self_after - self_before + children_after - children_before,
        qsd_cpu: qsd_after - qsd_before,
        read,
        sent,
        phases: String::new(),
        load,
        dropped,
    }
}

async fn resync_part(config: &Config) {
    let dir = config.dir.join("resync");
    std::fs::create_dir_all(&dir).unwrap();
    // The built image, the served disk, the replica and rsync's copy each hold half the
    // image, and a few percent more as the changes land in holes.
    let needed = 2 * config.image_mib * MIB + 1024 * MIB;
    let free = lifeboat_engine::space::free_space_bytes(&dir).unwrap()
        + allocated(&dir.join("source.raw"));
    assert!(
        free >= needed,
        "{} has {} MB free, the resync part needs {} MB: pass a smaller --image-mib",
        dir.display(),
        mb(free),
        mb(needed)
    );
    let (data_bytes, data_runs, holes) = build_image(config, &dir, false);
    let disk = dir.join("disk.raw");
    let rsync_dest = dir.join("rsync").join(format!("{DISK}.img"));
    std::fs::create_dir_all(rsync_dest.parent().unwrap()).unwrap();
    for copy in [&disk, &rsync_dest] {
        let source = dir.join("source.raw");
        run(
            "cp",
            &[
                "--sparse=always",
                source.to_str().unwrap(),
                copy.to_str().unwrap(),
            ],
        );
    }
    let qsd = Qsd::start(&dir, &disk, true);
    let socket = qsd.nbd.clone().unwrap();
    // Protected once, not timed: enable, initial copy, the finalize cycle's point.
    let work = dir.join("lifeboat");
    remove_dir(&work);
    let mut engine = open_engine("resync", &qsd, &disk, &work, Settings::default()).await;
    engine.enable().await.unwrap();
    engine.initial_copy(&no_progress).await.unwrap();
    let finalize = engine.run_cycle(SystemTime::now()).await.unwrap();
    assert!(finalize.point.is_some(), "the finalize cycle cut no point");
    let replica = work
        .join("store/bench/resync/disks")
        .join(format!("{DISK}.img"));
    let maps = work.join("store/bench/resync/maps");
    let blocks = config.image_mib * MIB / BLOCK;
    // 1 % of the blocks, in whole runs of 16 for the clustered pattern.
    let changed = (blocks / 100).div_ceil(16) * 16;
    let nbd_uri = format!("nbd+unix:///guest?socket={}", socket.display());
    println!(
        "\n### Resync: {} MiB raw disk served by QSD, {} MB of data in {} runs of 1 MiB extents, \
         {} holes; {changed} of its {blocks} 64 KiB blocks ({} MB) changed before each resync\n",
        config.image_mib,
        mb(data_bytes),
        data_runs,
        holes,
        mb(changed * BLOCK)
    );
    println!(
        "| changes | run | step | seconds | phases s | CPU s (QSD) | read MB | sent MB | load | cache |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    let mut rng = SplitMix(17);
    let mut pattern = 0u8;
    let mut summary = Vec::new();
    for clustered in [false, true] {
        let changes = if clustered { "clustered" } else { "random" };
        let mut times: std::collections::BTreeMap<&str, Vec<f64>> = Default::default();
        for i in 1..=config.runs {
            let verify = i == 1 && config.verify;
            let mut rows = Vec::new();
            for with_map in [true, false] {
                pattern = pattern % 250 + 1;
                let offsets = changed_blocks(&mut rng, blocks, changed, clustered);
                assert_eq!(offsets.len() as u64, changed);
                guest_writes(&socket, offsets, pattern, None, 1);
                let lifeboat = if with_map {
                    "Lifeboat resync, stored map"
                } else {
                    "Lifeboat resync, map re-hashed"
                };
                for lifeboat_first in [i % 2 == 1, i % 2 == 0] {
                    if lifeboat_first {
                        if !with_map {
                            remove_dir(&maps);
                        }
                        // When the source was hashed (progress reached the disk's size)
                        // and when the differing blocks were sent (twice its size).
                        let marks = Mutex::new((Instant::now(), None, None));
                        let sink = |p: &Progress| {
                            let mut marks = marks.lock().unwrap();
                            if p.bytes_done >= p.bytes_total && marks.2.is_none() {
                                marks.2 = Some(Instant::now());
                            } else if p.bytes_done >= p.bytes_total / 2 && marks.1.is_none() {
                                marks.1 = Some(Instant::now());
                            }
                        };
                        let mut step = timed(config, &qsd, || async {
                            marks.lock().unwrap().0 = Instant::now();
                            let report = engine
                                .resync(SystemTime::now(), &sink)
                                .await
                                .unwrap_or_else(|e| panic!("resync: {e}"));
                            (report.bytes_read, report.bytes_sent)
                        })
                        .await;
                        let (began, hashed, sent) = *marks.lock().unwrap();
                        let (hashed, sent) = (hashed.unwrap(), sent.unwrap());
                        step.phases = format!(
                            "to hashed {:.2}, sent {:.2}, point {:.2}",
                            (hashed - began).as_secs_f64(),
                            (sent - hashed).as_secs_f64(),
                            step.seconds - (sent - began).as_secs_f64()
                        );
                        assert_eq!(
                            step.sent,
                            changed * BLOCK,
                            "the resync sent other bytes than the changed blocks"
                        );
                        if verify {
                            run("cmp", &[disk.to_str().unwrap(), replica.to_str().unwrap()]);
                        }
                        rows.push((lifeboat, step));
                    } else {
                        let step = timed(config, &qsd, || async {
                            run(
                                "rsync",
                                &[
                                    "--inplace",
                                    "--no-whole-file",
                                    // NB: without it rsync skips a file whose size and
                                    // mtime match, which a disk written within the same
                                    // second as its copy can.
                                    "--ignore-times",
                                    disk.to_str().unwrap(),
                                    rsync_dest.to_str().unwrap(),
                                ],
                            );
                            run("sync", &[rsync_dest.to_str().unwrap()]);
                            (0, 0)
                        })
                        .await;
                        if verify {
                            run(
                                "cmp",
                                &[disk.to_str().unwrap(), rsync_dest.to_str().unwrap()],
                            );
                        }
                        rows.push(("rsync --inplace --no-whole-file -I + sync", step));
                    }
                }
            }
            let floors: [(&str, Vec<&str>); 3] = [
                ("nbdcopy export → null:", vec!["nbdcopy", &nbd_uri, "null:"]),
                ("cat disk", vec!["cat", disk.to_str().unwrap()]),
                (
                    "cat disk + rsync's copy",
                    vec!["cat", disk.to_str().unwrap(), rsync_dest.to_str().unwrap()],
                ),
            ];
            for (name, argv) in floors {
                let step = timed(config, &qsd, || async {
                    let status = Command::new(argv[0])
                        .args(&argv[1..])
                        .stdout(Stdio::null())
                        .status()
                        .unwrap_or_else(|e| panic!("cannot run {}: {e}", argv[0]));
                    assert!(status.success(), "{argv:?} failed: {status}");
                    (0, 0)
                })
                .await;
                rows.push((name, step));
            }
            for (name, r) in rows {
                println!(
                    "| {changes} | {i} | {name} | {:.2} | {} | {:.2} ({:.2}) | {} | {} | {} | {} |",
                    r.seconds,
                    if r.phases.is_empty() {
                        "–"
                    } else {
                        &r.phases
                    },
                    r.cpu,
                    r.qsd_cpu,
                    if r.read > 0 { mb(r.read) } else { "–".into() },
                    if name.starts_with("Lifeboat") {
                        mb(r.sent)
                    } else {
                        "–".into()
                    },
                    r.load,
                    if r.dropped { "dropped" } else { "warm" }
                );
                times.entry(name).or_default().push(r.seconds);
            }
        }
        summary.push((changes, times));
    }
    for (changes, times) in summary {
        let m = |name: &str| median(times.get(name).map_or(&[][..], |v| v));
        let (with_map, rehashed) = (
            m("Lifeboat resync, stored map"),
            m("Lifeboat resync, map re-hashed"),
        );
        let (rsync, nbd) = (
            m("rsync --inplace --no-whole-file -I + sync"),
            m("nbdcopy export → null:"),
        );
        println!(
            "\n{changes} changes, median seconds: Lifeboat stored map {with_map:.2}, map re-hashed \
             {rehashed:.2}, rsync {rsync:.2}, nbdcopy {nbd:.2}, cat disk {:.2}, cat both {:.2}; \
             stored map / nbdcopy {:.3} (target ≤ 1.25), stored map / rsync {:.3}, \
             re-hashed / rsync {:.3} (targets < 1)",
            m("cat disk"),
            m("cat disk + rsync's copy"),
            with_map / nbd,
            with_map / rsync,
            rehashed / rsync
        );
    }
    engine.disable(true).await.unwrap();
    drop(qsd);
    if !config.keep {
        remove_dir(&dir);
    }
}

// ---------------------------------------------------------------------------------------
// RPO under churn.

struct ChurnCycle {
    began: Duration,
    took: Duration,
    report: Result<Report, String>,
}

/// One rate: a fresh sparse raw disk, protected (not timed), then `--churn-secs` of random
/// 64 KiB guest writes at `rate` MB/s while a cycle runs every `--churn-interval-secs` (at
/// once when the previous one ran late). Returns the guest's MB/s when every cycle cut a
/// point and the RPO stayed under twice the interval.
async fn churn_rate(
    config: &Config,
    dir: &Path,
    azure: Option<&Azurite>,
    rate_mb: u64,
) -> Option<f64> {
    remove_dir(dir);
    std::fs::create_dir_all(dir).unwrap();
    let disk = dir.join("disk.raw");
    let size = config.churn_disk_mib * MIB;
    std::fs::File::create(&disk).unwrap().set_len(size).unwrap();
    let qsd = Qsd::start(dir, &disk, true);
    let socket = qsd.nbd.clone().unwrap();
    let interval = Duration::from_secs(config.churn_interval_secs);
    let settings = Settings {
        copy_interval: interval,
        // Only the latest points: the undo data of a day of churn would fill the disk.
        retention: interval * 2,
        ..Settings::default()
    };
    let work = dir.join("lifeboat");
    let name = format!("churn-{rate_mb}");
    let mut engine = match azure {
        Some(azurite) => {
            let store = lifeboat_store::testing::shared_key_store(
                azurite,
                "replicas",
                lifeboat_store::azure::AzureStoreOptions::default(),
            )
            .await;
            open_engine_on(&name, &qsd, &disk, &work, settings, Arc::new(store)).await
        }
        None => open_engine(&name, &qsd, &disk, &work, settings).await,
    };
    engine.enable().await.unwrap();
    engine.initial_copy(&no_progress).await.unwrap();
    let finalize = engine.run_cycle(SystemTime::now()).await.unwrap();
    assert!(finalize.point.is_some(), "the finalize cycle cut no point");
    let requests = rate_mb * 1_000_000 * config.churn_secs / BLOCK;
    let mut rng = SplitMix(rate_mb);
    let offsets: Vec<u64> = (0..requests)
        .map(|_| rng.next() % (size / BLOCK) * BLOCK)
        .collect();
    let load_before = load_average();
    let (qsd_before, _) = cpu_of(&qsd.pid());
    let (self_before, children_before) = cpu_of("self");
    let (io_before, qsd_io_before) = (io_of("self"), io_of(&qsd.pid()));
    let start = tokio::time::Instant::now();
    let guest = {
        let socket = socket.clone();
        tokio::task::spawn_blocking(move || {
            guest_writes(&socket, offsets, 0x5a, Some(rate_mb * 1_000_000), 4)
        })
    };
    let mut cycles = Vec::new();
    let mut next = start + interval;
    while !guest.is_finished() {
        tokio::time::sleep_until(next).await;
        let began = tokio::time::Instant::now();
        let report = engine
            .run_cycle(SystemTime::now())
            .await
            .map_err(|e| e.to_string());
        cycles.push(ChurnCycle {
            began: began - start,
            took: began.elapsed(),
            report,
        });
        next = (began + interval).max(tokio::time::Instant::now());
    }
    let guest_secs = guest.await.unwrap();
    let (self_after, children_after) = cpu_of("self");
    let (qsd_after, _) = cpu_of(&qsd.pid());
    let (io_after, qsd_io_after) = (io_of("self"), io_of(&qsd.pid()));
    let load_after = load_average();
    // The RPO just before point k lands is the age of point k-1: from when its cycle began
    // (its view is the VM as of then) to when cycle k ends. Point 0 is the finalize cycle's.
    let mut captured = Duration::ZERO;
    let mut worst = Duration::ZERO;
    let mut all_cut = true;
    for c in &cycles {
        worst = worst.max(c.began + c.took - captured);
        match &c.report {
            Ok(r) if r.point.is_some() && r.resync_required.is_none() => captured = c.began,
            _ => all_cut = false,
        }
    }
    let took: Vec<f64> = cycles.iter().map(|c| c.took.as_secs_f64()).collect();
    let ok: Vec<&Report> = cycles
        .iter()
        .filter_map(|c| c.report.as_ref().ok())
        .collect();
    let shipped: u64 = ok.iter().map(|r| r.bytes_sent).sum();
    let written = requests * BLOCK;
    let passed = all_cut && worst < interval * 2;
    println!(
        "| {rate_mb} | {:.0} | {} | {} | {:.2} / {:.2} | {:.2} | {} | {:.1} | {} | {} → {} | {:.0} / {:.0} / {:.0} | {:.1} / {:.1} ({:.1} / {:.1}) | {} |",
        written as f64 / guest_secs / 1e6,
        cycles.len(),
        cycles.len()
            - ok.iter()
                .filter(|r| r.point.is_some() && r.resync_required.is_none())
                .count(),
        median(&took),
        took.iter().copied().fold(0.0, f64::max),
        worst.as_secs_f64(),
        mb(shipped / ok.len().max(1) as u64),
        (self_after - self_before) / guest_secs,
        if passed { "yes" } else { "NO" },
        load_before,
        load_after,
        100.0 * (children_after - children_before) / guest_secs,
        100.0 * (qsd_after - qsd_before) / guest_secs,
        100.0 * (self_after - self_before) / guest_secs,
        (io_after.0 - io_before.0) as f64 / 1e9,
        (io_after.1 - io_before.1) as f64 / 1e9,
        (qsd_io_after.0 - qsd_io_before.0) as f64 / 1e9,
        (qsd_io_after.1 - qsd_io_before.1) as f64 / 1e9,
        cycles
            .iter()
            .map(|c| match &c.report {
                Ok(r) => format!(
                    "{:.0}: {:.1}{}",
                    c.began.as_secs_f64(),
                    c.took.as_secs_f64(),
                    if r.resync_required.is_some() {
                        " RESYNC"
                    } else {
                        ""
                    }
                ),
                Err(e) => format!("{:.0}: failed: {e}", c.began.as_secs_f64()),
            })
            .collect::<Vec<_>>()
            .join("; ")
    );
    engine.disable(true).await.unwrap();
    drop(qsd);
    remove_dir(dir);
    passed.then_some(written as f64 / guest_secs / 1e6)
}

async fn churn_part(config: &Config, azure: bool) {
    let dir = config.dir.join(if azure { "churn-azure" } else { "churn" });
    let azurite = azure.then(|| {
        std::fs::create_dir_all(&dir).unwrap();
        let data = dir.join("azurite");
        std::fs::create_dir_all(&data).unwrap();
        Azurite::start_on(lifeboat_store::testing::free_port(), Some(&data))
    });
    println!(
        "\n### RPO under churn ({}): {} MiB raw disk, random 64 KiB guest writes for {} s at each \
         rate, a cycle every {} s (RPO target < {} s)\n",
        if azure {
            "Azure Blob, Azurite on disk"
        } else {
            "local store"
        },
        config.churn_disk_mib,
        config.churn_secs,
        config.churn_interval_secs,
        2 * config.churn_interval_secs
    );
    println!(
        "| asked MB/s | guest MB/s | cycles | cycles without a point | cycle s median / max | worst RPO s | \
         shipped MB per cycle | agent CPU s/s | every cycle, RPO < 2× | load | CPU % guest / QSD / agent | device GB read / written: agent (QSD) | cycles (start s: took s) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    let mut highest: Option<(u64, f64)> = None;
    for rate in &config.churn_rates {
        if let Some(guest) = churn_rate(config, &dir.join("rate"), azurite.as_ref(), *rate).await
            && highest.is_none_or(|(_, best)| guest > best)
        {
            highest = Some((*rate, guest));
        }
    }
    println!(
        "\nhighest guest write rate that held: {}",
        highest.map_or("none of those tried".to_owned(), |(asked, guest)| format!(
            "{guest:.0} MB/s (asked {asked} MB/s of the throttle)"
        ))
    );
    drop(azurite);
    if !config.keep {
        remove_dir(&dir);
    }
}

// ---------------------------------------------------------------------------------------
// The round trip: failover, re-protect, failback, re-protect, through the agent's jobs.

/// One hop's figures.
struct Hop {
    seconds: f64,
    /// Bytes sent to the store (re-protect) or written onto the original disk (failback).
    bytes: u64,
    /// The blocks that changed since the hop's seed, in bytes: what it must move at least.
    changed: u64,
    /// Bytes of the running side's disk read (re-protect): the whole disk's data when it is
    /// compared in full, the changed blocks when a seed names them.
    read: u64,
}

/// Run one job of the agent's on `engine`, timed after the page cache is dropped.
async fn timed_job(
    config: &Config,
    engine: &mut Replicator,
    kind: lifeboat_core::JobKind,
    params: lifeboat_core::JobParams,
    dirs: &lifeboat_engine::JobDirs,
) -> (f64, lifeboat_engine::JobResult) {
    settle(config.warm);
    let started = Instant::now();
    let result =
        lifeboat_engine::run_job(engine, kind, &params, dirs, SystemTime::now(), &no_progress)
            .await
            .unwrap_or_else(|e| panic!("{} job: {e}", kind.as_str()));
    (started.elapsed().as_secs_f64(), result)
}

/// One site of the round trip: its VM's daemon and disk, its agent's folder and name.
struct Site<'a> {
    qsd: &'a Qsd,
    disk: &'a Path,
    dir: &'a Path,
    writer: &'a str,
}

/// Open `site`'s engine as its agent does and time a re-protect from `point`, whose seed
/// differs from the disk in `changed` bytes of blocks.
async fn reprotect_hop(
    config: &Config,
    site: &Site<'_>,
    store: Arc<dyn lifeboat_store::ReplicaStore>,
    point: String,
    changed: u64,
    dirs: &lifeboat_engine::JobDirs,
) -> (Replicator, Hop) {
    let mut engine = open_engine_on(
        "roundtrip",
        site.qsd,
        site.disk,
        site.dir,
        Settings::default(),
        store,
    )
    .await;
    engine.set_writer(site.writer);
    let (seconds, result) = timed_job(
        config,
        &mut engine,
        lifeboat_core::JobKind::Reprotect,
        lifeboat_core::JobParams {
            point: Some(lifeboat_core::PointChoice::Named(point)),
            ..lifeboat_core::JobParams::default()
        },
        dirs,
    )
    .await;
    let hop = Hop {
        seconds,
        bytes: result.report.bytes_sent,
        changed,
        read: result.report.bytes_read,
    };
    (engine, hop)
}

async fn roundtrip_part(config: &Config) {
    for format in config.formats.clone() {
        roundtrip_runs(config, format).await;
    }
}

async fn roundtrip_runs(config: &Config, format: DiskFormat) {
    use lifeboat_core::{FailoverKind, JobKind, JobParams, PointChoice as Choice};
    let dir = config.dir.join("roundtrip");
    std::fs::create_dir_all(&dir).unwrap();
    // The built image, site A's disk, the replica, the failover's disk (site B's).
    let needed = 3 * (config.image_mib * MIB / 2) + 1024 * MIB;
    let free = lifeboat_engine::space::free_space_bytes(&dir).unwrap()
        + allocated(&dir.join("source.raw"));
    assert!(
        free >= needed,
        "{} has {} MB free, the roundtrip part needs {} MB: pass a smaller --image-mib",
        dir.display(),
        mb(free),
        mb(needed)
    );
    let (data_bytes, _, _) = build_image(config, &dir, false);
    let blocks = config.image_mib * MIB / BLOCK;
    // 1 % of the blocks, a whole number of 16 (as `changed_blocks` picks them).
    let changed = (blocks / 100).max(1).div_ceil(16) * 16;
    println!(
        "\n### Round trip: {} MiB {format} disk, {} MB of data; {changed} of its {blocks} 64 KiB \
         blocks ({} MB) rewritten on the running side before each hop\n",
        config.image_mib,
        mb(data_bytes),
        mb(changed * BLOCK)
    );
    println!(
        "| run | full copy s (MB) | planned failover s | re-protect B s (MB sent / changed; MB read) | \
         while B runs: B's cycle + A kept in step s (MB written on A / changed; MB read of A) | \
         failback s: stop, ship + A's disk (MB written on A / changed; MB read of A) | re-protect A s (MB sent / changed; MB read) |"
    );
    println!("|---|---|---|---|---|---|---|");
    let mut rng = SplitMix(23);
    let mut ratios: Vec<(f64, f64, f64, f64)> = Vec::new();
    for run_no in 1..=config.runs {
        let a_dir = dir.join("a");
        let b_dir = dir.join("b");
        for d in [&a_dir, &b_dir, &dir.join("store"), &dir.join("failover")] {
            remove_dir(d);
        }
        std::fs::create_dir_all(&a_dir).unwrap();
        std::fs::create_dir_all(&b_dir).unwrap();
        // NB: the bench's daemon takes a name ending in .raw for raw, anything else for qcow2.
        let ext = if format == DiskFormat::Raw {
            "raw"
        } else {
            "qcow2"
        };
        let a_disk = a_dir.join(format!("disk.{ext}"));
        let source = dir.join("source.raw");
        let (source, a_path) = (source.to_str().unwrap(), a_disk.to_str().unwrap());
        match format {
            // NB: a copy of its own, not sharing the built image's space (cp clones by
            // default where the file system can): A's writes are not copy-on-write.
            DiskFormat::Raw => run(
                "cp",
                &["--sparse=always", "--reflink=never", source, a_path],
            ),
            DiskFormat::Qcow2 => run(
                "qemu-img",
                &[
                    "convert",
                    "-f",
                    "raw",
                    "-O",
                    "qcow2",
                    "-o",
                    "compat=1.1",
                    source,
                    a_path,
                ],
            ),
        };
        // One store object for both sites' engines, as the standalone daemon has.
        let store: Arc<dyn lifeboat_store::ReplicaStore> =
            Arc::new(LocalStore::open(dir.join("store")).unwrap());
        let dirs = lifeboat_engine::JobDirs {
            failover_dir: dir.join("failover"),
            original_disks: Vec::new(),
            failover_format: format,
            seed_dir: None,
        };
        // Site A protected: the initial copy is the full copy the hops are measured against.
        let qsd_a = Qsd::start(&a_dir, &a_disk, true);
        let mut a = open_engine_on(
            "roundtrip",
            &qsd_a,
            &a_disk,
            &a_dir,
            Settings::default(),
            store.clone(),
        )
        .await;
        a.set_writer("node a");
        settle(config.warm);
        let started = Instant::now();
        a.enable().await.unwrap();
        let copy = a.initial_copy(&no_progress).await.unwrap();
        let full = started.elapsed().as_secs_f64();
        a.run_cycle(SystemTime::now()).await.unwrap();
        let mut pattern = (run_no as u8).wrapping_mul(40);
        let mut rewrite = |socket: &Path, count: u64| -> Vec<u64> {
            pattern = pattern % 250 + 1;
            let offsets = changed_blocks(&mut rng, blocks, count, false);
            guest_writes(socket, offsets.clone(), pattern, None, 1);
            offsets
        };
        // 1 % on A, then a planned failover (A stopped, shipped, materialised).
        rewrite(qsd_a.nbd.as_ref().unwrap(), changed);
        let (failover_s, failover) = timed_job(
            config,
            &mut a,
            JobKind::Failover,
            JobParams {
                failover: Some(FailoverKind::Planned),
                point: Some(Choice::Latest),
                ..JobParams::default()
            },
            &dirs,
        )
        .await;
        let report = failover.failover.unwrap();
        let p = report.point.id.clone();
        qsd_a.stop();
        // B runs on the failover's disk where it was written (with its twin, on a file system
        // that clones); 1 % on B; re-protect B.
        let b_disk = report.disks[0].path.clone();
        let qsd_b = Qsd::start(&b_dir, &b_disk, true);
        let raw = format == DiskFormat::Raw;
        assert_eq!(
            arm("roundtrip", &qsd_b, &b_disk, &b_dir).await,
            raw,
            "B's raw disk armed"
        );
        let b_first = rewrite(qsd_b.nbd.as_ref().unwrap(), changed);
        let site_b = Site {
            qsd: &qsd_b,
            disk: &b_disk,
            dir: &b_dir,
            writer: "node b",
        };
        let (mut b, reprotect_b) = reprotect_hop(
            config,
            &site_b,
            store.clone(),
            p,
            b_first.len() as u64 * BLOCK,
            &dirs,
        )
        .await;
        // 1 % more on B, which a cycle of B ships (a point, as B's agent cuts every copy
        // interval), and A's disk is kept in step with that point while B runs (the job the
        // operator creates for it, no request). Then 1 % more on B, and the failback: B
        // stopped and shipped, A's disk brought to the final point.
        let b_second = rewrite(qsd_b.nbd.as_ref().unwrap(), changed);
        let originals = lifeboat_engine::JobDirs {
            original_disks: qsd_b.disks(&a_disk),
            ..dirs.clone()
        };
        settle(config.warm);
        let started = Instant::now();
        let cycle = b.run_cycle(SystemTime::now()).await.unwrap();
        let cycle_s = started.elapsed().as_secs_f64();
        assert_eq!(
            cycle.bytes_sent,
            b_second.len() as u64 * BLOCK,
            "B's cycle sent other bytes than B's second 1 %"
        );
        let (in_step_s, kept) = timed_job(
            config,
            &mut a,
            JobKind::Failback,
            JobParams {
                point: Some(Choice::Latest),
                presync: true,
                ..JobParams::default()
            },
            &originals,
        )
        .await;
        let kept = kept.failover.unwrap();
        let b_changed: std::collections::BTreeSet<u64> =
            b_first.iter().chain(&b_second).copied().collect();
        let in_step = Hop {
            seconds: in_step_s,
            bytes: kept.bytes_read,
            changed: b_changed.len() as u64 * BLOCK,
            read: kept.compared_bytes,
        };
        let b_third = rewrite(qsd_b.nbd.as_ref().unwrap(), changed);
        let (ship_s, shipped) = timed_job(
            config,
            &mut b,
            JobKind::Failover,
            JobParams {
                failover: Some(FailoverKind::Planned),
                point: Some(Choice::Latest),
                to_primary: true,
                ..JobParams::default()
            },
            &dirs,
        )
        .await;
        let q = shipped.point.unwrap().id;
        let (restore_s, restored) = timed_job(
            config,
            &mut a,
            JobKind::Failback,
            JobParams {
                point: Some(Choice::Named(q.clone())),
                ..JobParams::default()
            },
            &originals,
        )
        .await;
        let restored = restored.failover.unwrap();
        let failback = Hop {
            seconds: ship_s + restore_s,
            bytes: restored.bytes_read,
            changed: b_third.len() as u64 * BLOCK,
            read: restored.compared_bytes,
        };
        qsd_b.stop();
        if config.verify {
            run(
                "qemu-img",
                &[
                    "compare",
                    "-q",
                    a_disk.to_str().unwrap(),
                    b_disk.to_str().unwrap(),
                ],
            );
        }
        // A runs again on its own disk; 1 % on A; re-protect A.
        let qsd_a = Qsd::start(&a_dir, &a_disk, true);
        assert_eq!(
            arm("roundtrip", &qsd_a, &a_disk, &a_dir).await,
            raw,
            "A's raw disk armed"
        );
        let a_changes = rewrite(qsd_a.nbd.as_ref().unwrap(), changed);
        drop(a);
        let site_a = Site {
            qsd: &qsd_a,
            disk: &a_disk,
            dir: &a_dir,
            writer: "node a",
        };
        let (mut a, reprotect_a) = reprotect_hop(
            config,
            &site_a,
            store.clone(),
            q,
            a_changes.len() as u64 * BLOCK,
            &dirs,
        )
        .await;
        for (what, hop) in [
            ("re-protect B", &reprotect_b),
            ("A kept in step", &in_step),
            ("failback", &failback),
            ("re-protect A", &reprotect_a),
        ] {
            assert_eq!(
                hop.bytes, hop.changed,
                "{what} moved other bytes than the changed blocks"
            );
        }
        println!(
            "| {run_no} | {full:.2} ({}) | {failover_s:.2} | {:.2} ({} / {}; {}) | {cycle_s:.2} + {:.2} ({} / {}; {}) | {ship_s:.2} + {restore_s:.2} ({} / {}; {}) | {:.2} ({} / {}; {}) |",
            mb(copy.bytes_sent),
            reprotect_b.seconds,
            mb(reprotect_b.bytes),
            mb(reprotect_b.changed),
            mb(reprotect_b.read),
            in_step.seconds,
            mb(in_step.bytes),
            mb(in_step.changed),
            mb(in_step.read),
            mb(failback.bytes),
            mb(failback.changed),
            mb(failback.read),
            reprotect_a.seconds,
            mb(reprotect_a.bytes),
            mb(reprotect_a.changed),
            mb(reprotect_a.read),
        );
        ratios.push((
            reprotect_b.seconds / full,
            in_step.seconds / full,
            failback.seconds / full,
            reprotect_a.seconds / full,
        ));
        a.disable(true).await.unwrap();
        drop(qsd_a);
    }
    let m = |pick: fn(&(f64, f64, f64, f64)) -> f64| {
        median(&ratios.iter().map(pick).collect::<Vec<_>>())
    };
    println!(
        "\n{format}: median time / full copy: re-protect B {:.3}, A kept in step {:.3} (while \
         B runs), failback {:.3} (B down: stop, ship, A's disk), re-protect A {:.3} (target ≤ \
         0.1); bytes moved = changed blocks in every hop (asserted)",
        m(|r| r.0),
        m(|r| r.1),
        m(|r| r.2),
        m(|r| r.3)
    );
    if !config.keep {
        remove_dir(&dir);
    }
}

fn main() {
    let config = config();
    println!(
        "nproc {}, load average {}, {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        load_average(),
        run("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"]).trim()
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        if config.parts.iter().any(|p| p == "tracking") {
            tracking_part(&config).await;
        }
        if config.parts.iter().any(|p| p == "copy") {
            copy_part(&config).await;
        }
        if config.parts.iter().any(|p| p == "recovery") {
            recovery_part(&config).await;
        }
        if config.parts.iter().any(|p| p == "recovery-azure") {
            azure_recovery_part(&config).await;
        }
        if config.parts.iter().any(|p| p == "resync") {
            resync_part(&config).await;
        }
        if config.parts.iter().any(|p| p == "churn") {
            churn_part(&config, false).await;
        }
        if config.parts.iter().any(|p| p == "churn-azure") {
            churn_part(&config, true).await;
        }
        if config.parts.iter().any(|p| p == "roundtrip") {
            roundtrip_part(&config).await;
        }
    });
    if !config.keep {
        // Only when empty: the folder may be shared with other files.
        let _ = std::fs::remove_dir(&config.dir);
    }
}
