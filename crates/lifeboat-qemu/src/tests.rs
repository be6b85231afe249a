//! Tests of the `qemu` backend: the NBD wire parsers fed hostile bytes, the NBD client
//! against scripted servers, and the whole backend against a real `qemu-storage-daemon` (QSD)
//! with `qemu-io` writing as the guest.
//!
//! ```text
//!  test ──QemuHypervisor──QMP──> QSD: file+qcow2 node per disk, NBD server, export "diskN"
//!    └──qemu-io nbd+unix:///diskN──────^ (the guest's writes)
//! ```

use super::nbd::*;
use super::*;
use bytes::{BufMut, Bytes};
use lifeboat_engine::backend::{CloseView, Hypervisor, Quiesce, Tracking, View};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

const MIB: u64 = 1 << 20;
const KIB: u64 = 1 << 10;

// ---------------------------------------------------------------------------------------------
// A real qemu-storage-daemon.
// ---------------------------------------------------------------------------------------------

/// A QSD playing a VM's block layer, killed on drop.
struct Qsd {
    dir: PathBuf,
    disks: Vec<(String, u64)>,
    child: Option<Child>,
    qmp: PathBuf,
    /// The NBD server the guest writes through (None: QSD runs no NBD server).
    nbd: Option<PathBuf>,
}

fn require(tool: &str) {
    let found = Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    assert!(
        found.is_ok_and(|s| s.success()),
        "{tool} is missing: these tests need qemu-utils (qemu-storage-daemon, qemu-img, qemu-io) on PATH"
    );
}

impl Qsd {
    fn start(dir: &Path, disks: &[(&str, u64)]) -> Self {
        Self::start_with(dir, disks, true)
    }

    fn start_with(dir: &Path, disks: &[(&str, u64)], guest_nbd: bool) -> Self {
        for tool in ["qemu-storage-daemon", "qemu-img", "qemu-io"] {
            require(tool);
        }
        for (name, size) in disks {
            let path = dir.join(format!("{name}.qcow2"));
            let out = Command::new("qemu-img")
                .args(["create", "-q", "-f", "qcow2"])
                .arg(&path)
                .arg(size.to_string())
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "qemu-img create: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let mut qsd = Self {
            dir: dir.to_owned(),
            disks: disks.iter().map(|(n, s)| ((*n).to_owned(), *s)).collect(),
            child: None,
            qmp: dir.join("qmp.sock"),
            nbd: guest_nbd.then(|| dir.join("nbd.sock")),
        };
        qsd.spawn();
        qsd
    }

    fn spawn(&mut self) {
        let _ = std::fs::remove_file(&self.qmp);
        let mut cmd = Command::new("qemu-storage-daemon");
        for (name, _) in &self.disks {
            let path = self.dir.join(format!("{name}.qcow2"));
            cmd.arg("--blockdev").arg(format!(
                "driver=file,node-name=file-{name},filename={}",
                path.display()
            ));
            cmd.arg("--blockdev")
                .arg(format!("driver=qcow2,node-name={name},file=file-{name}"));
        }
        if let Some(nbd) = &self.nbd {
            let _ = std::fs::remove_file(nbd);
            cmd.arg("--nbd-server")
                .arg(format!("addr.type=unix,addr.path={}", nbd.display()));
            for (name, _) in &self.disks {
                cmd.arg("--export").arg(format!(
                    "type=nbd,id=guest-{name},node-name={name},name={name},writable=on"
                ));
            }
        }
        cmd.arg("--chardev")
            .arg(format!(
                "socket,path={},server=on,wait=off,id=qmp0",
                self.qmp.display()
            ))
            .arg("--monitor")
            .arg("chardev=qmp0")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        self.child = Some(cmd.spawn().expect("spawn qemu-storage-daemon"));
        let deadline = Instant::now() + Duration::from_secs(10);
        while !(self.qmp.exists() && self.nbd.as_ref().is_none_or(|n| n.exists())) {
            assert!(
                Instant::now() < deadline,
                "qemu-storage-daemon did not create its sockets in 10 s"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// `kill -9`: QEMU saves no bitmap.
    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    /// A clean stop (SIGTERM): QEMU stores its persistent bitmaps.
    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let status = Command::new("kill")
                .arg("-TERM")
                .arg(c.id().to_string())
                .status()
                .unwrap();
            assert!(status.success());
            c.wait().unwrap();
        }
    }

    /// The guest writes: `qemu-io` commands (`write -P 0x55 1M 64k`) on one disk.
    async fn guest(&self, disk: &str, commands: &[&str]) {
        let nbd = self
            .nbd
            .as_ref()
            .expect("this QSD has no NBD server for the guest");
        let mut cmd = tokio::process::Command::new("qemu-io");
        cmd.args([
            "-f",
            "raw",
            &format!("nbd+unix:///{disk}?socket={}", nbd.display()),
        ]);
        for c in commands {
            cmd.args(["-c", c]);
        }
        let out = cmd.output().await.unwrap();
        assert!(
            out.status.success(),
            "qemu-io {commands:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn disk_refs(&self) -> Vec<DiskRef> {
        self.disks
            .iter()
            .map(|(name, _)| DiskRef {
                name: format!("vol-{name}"),
                path: self.dir.join(format!("{name}.qcow2")).display().to_string(),
                node: Some(name.clone()),
            })
            .collect()
    }

    fn hypervisor(&self) -> QemuHypervisor {
        self.hypervisor_with(QemuOptions::default())
    }

    fn hypervisor_with(&self, options: QemuOptions) -> QemuHypervisor {
        let options = QemuOptions {
            nbd_server_socket: options.nbd_server_socket.or(self.nbd.clone()),
            ..options
        };
        QemuHypervisor::with_options("vm1", &self.qmp, self.dir.join("work"), options)
    }
}

impl Drop for Qsd {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The lifeboat bitmaps of a node: (name, recording).
async fn bitmaps(hv: &QemuHypervisor, node: &str) -> Vec<(String, bool)> {
    let nodes = hv.inner.nodes().await.unwrap();
    let mut out: Vec<(String, bool)> = nodes
        .iter()
        .filter(|n| n.name == node)
        .flat_map(|n| n.bitmaps.iter())
        .filter(|b| b.name.starts_with(BITMAP_PREFIX))
        .map(|b| (b.name.clone(), b.recording))
        .collect();
    out.sort();
    out
}

async fn ids(hv: &QemuHypervisor, query: &str, key: &str) -> Vec<String> {
    let v = hv.inner.qmp(query, Value::Null, None).await.unwrap();
    let mut ids: Vec<String> = v
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e.get(key).and_then(Value::as_str).map(str::to_owned))
        .collect();
    ids.sort();
    ids
}

fn range(start: u64, len: u64) -> std::ops::Range<u64> {
    start..start + len
}

async fn open(hv: &QemuHypervisor, disks: &[DiskRef], cycle: u64) -> Box<dyn View> {
    hv.open_view(disks, cycle, Quiesce::None)
        .await
        .unwrap_or_else(|e| panic!("open_view({cycle}): {e}"))
}

// ---------------------------------------------------------------------------------------------
// The backend against QSD.
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn inspect_reports_sizes_and_missing_disks() {
    let tmp = tempfile::tempdir().unwrap();
    let qsd = Qsd::start(tmp.path(), &[("disk0", 64 * MIB), ("disk1", 32 * MIB)]);
    let hv = qsd.hypervisor();
    let disks = qsd.disk_refs();
    let info = hv.inspect(&disks).await.unwrap();
    assert_eq!(
        info,
        vec![
            DiskInfo {
                name: "vol-disk0".into(),
                size_bytes: 64 * MIB,
                format: "qcow2".into(),
                durability: TrackingDurability::Persistent,
            },
            DiskInfo {
                name: "vol-disk1".into(),
                size_bytes: 32 * MIB,
                format: "qcow2".into(),
                durability: TrackingDurability::Persistent,
            }
        ]
    );

    let missing = DiskRef {
        name: "data".into(),
        path: "/images/data.qcow2".into(),
        node: Some("nope".into()),
    };
    match hv.inspect(&[disks[0].clone(), missing]).await {
        Err(BackendError::DiskNotFound { vm, disk, detail }) => {
            assert_eq!((vm.as_str(), disk.as_str()), ("vm1", "data"));
            assert!(detail.contains("\"nope\""), "{detail}");
        }
        other => panic!("expected DiskNotFound, got {other:?}"),
    }
    let unnamed = DiskRef {
        name: "data".into(),
        path: "/images/data.qcow2".into(),
        node: None,
    };
    assert!(matches!(
        hv.inspect(&[unnamed]).await,
        Err(BackendError::DiskNotFound { .. })
    ));

    let gone = QemuHypervisor::new(
        "vm2",
        tmp.path().join("no-such.sock"),
        tmp.path().join("work2"),
    );
    match gone.inspect(&disks).await {
        Err(BackendError::VmNotFound { vm, detail }) => {
            assert_eq!(vm, "vm2");
            assert!(detail.contains("no-such.sock"), "{detail}");
        }
        other => panic!("expected VmNotFound, got {other:?}"),
    }
}

#[tokio::test]
async fn tracking_goes_absent_active_absent() {
    let tmp = tempfile::tempdir().unwrap();
    let qsd = Qsd::start(tmp.path(), &[("disk0", 16 * MIB)]);
    let hv = qsd.hypervisor();
    let disks = qsd.disk_refs();
    assert_eq!(hv.tracking(&disks).await.unwrap(), vec![Tracking::Absent]);
    hv.start_tracking(&disks).await.unwrap();
    assert_eq!(hv.tracking(&disks).await.unwrap(), vec![Tracking::Active]);
    hv.start_tracking(&disks).await.unwrap();
    assert_eq!(
        bitmaps(&hv, "disk0").await,
        vec![("lifeboat-0".to_owned(), true)]
    );
    // A view cannot reuse the running epoch's number.
    let err = hv.open_view(&disks, 0, Quiesce::None).await.unwrap_err();
    assert!(err.to_string().contains("lifeboat-0"), "{err}");
    hv.stop_tracking(&disks).await.unwrap();
    assert_eq!(bitmaps(&hv, "disk0").await, vec![]);
    assert_eq!(hv.tracking(&disks).await.unwrap(), vec![Tracking::Absent]);
}

#[tokio::test]
async fn view_ships_exactly_the_writes_and_is_frozen() {
    let tmp = tempfile::tempdir().unwrap();
    let qsd = Qsd::start(tmp.path(), &[("disk0", 64 * MIB)]);
    let hv = qsd.hypervisor();
    let disks = qsd.disk_refs();
    hv.start_tracking(&disks).await.unwrap();
    qsd.guest("disk0", &["write -P 0x55 1M 64k", "write -P 0x55 10M 128k"])
        .await;

    let view = open(&hv, &disks, 1).await;
    assert_eq!(view.cycle(), 1);
    assert_eq!(view.quiesced(), Quiesce::None);
    assert_eq!(
        view.disks(),
        &[DiskInfo {
            name: "vol-disk0".into(),
            size_bytes: 64 * MIB,
            format: "qcow2".into(),
            durability: TrackingDurability::Persistent,
        }]
    );
    let changed = view.changed_extents("vol-disk0").await.unwrap();
    assert_eq!(
        changed,
        vec![range(MIB, 64 * KIB), range(10 * MIB, 128 * KIB)]
    );
    let data = view.read("vol-disk0", MIB, 64 * KIB).await.unwrap();
    assert!(data.iter().all(|b| *b == 0x55));
    let around = view
        .read("vol-disk0", 10 * MIB - 4 * KIB, 136 * KIB)
        .await
        .unwrap();
    assert!(around[..4096].iter().all(|b| *b == 0));
    assert!(around[4096..4096 + 128 * 1024].iter().all(|b| *b == 0x55));
    assert!(around[4096 + 128 * 1024..].iter().all(|b| *b == 0));
    assert_eq!(
        bitmaps(&hv, "disk0").await,
        vec![("lifeboat-0".into(), false), ("lifeboat-1".into(), true)]
    );

    // The guest writes after the cut: copy-before-write keeps the view as it was.
    qsd.guest("disk0", &["write -P 0x66 1M 4k"]).await;
    let data = view.read("vol-disk0", MIB, 64 * KIB).await.unwrap();
    assert!(
        data.iter().all(|b| *b == 0x55),
        "the view changed under a guest write"
    );
    assert!(
        view.read("vol-disk0", 64 * MIB - 512, 1024).await.is_err(),
        "a read past the end"
    );
    assert!(matches!(
        view.read("nope", 0, 1).await,
        Err(BackendError::DiskNotFound { .. })
    ));
    view.close(CloseView::Commit).await.unwrap();

    assert_eq!(
        bitmaps(&hv, "disk0").await,
        vec![("lifeboat-1".into(), true)]
    );
    assert_eq!(
        ids(&hv, "query-block-exports", "id").await,
        vec!["guest-disk0".to_owned()]
    );
    assert_eq!(
        ids(&hv, "query-block-jobs", "device").await,
        Vec::<String>::new()
    );
    assert!(!hv.inner.fleece_path("lbf-1-0").exists());

    let view = open(&hv, &disks, 2).await;
    // NB: the bitmap's granularity is 64 KiB: a 4 KiB write dirties the whole granule.
    assert_eq!(
        view.changed_extents("vol-disk0").await.unwrap(),
        vec![range(MIB, 64 * KIB)]
    );
    let data = view.read("vol-disk0", MIB, 8 * KIB).await.unwrap();
    assert!(data[..4096].iter().all(|b| *b == 0x66) && data[4096..].iter().all(|b| *b == 0x55));
    view.close(CloseView::Commit).await.unwrap();

    let view = open(&hv, &disks, 3).await;
    assert_eq!(view.changed_extents("vol-disk0").await.unwrap(), vec![]);
    view.close(CloseView::Commit).await.unwrap();
}

#[tokio::test]
async fn abandon_keeps_the_changes_for_the_next_view() {
    let tmp = tempfile::tempdir().unwrap();
    let qsd = Qsd::start(tmp.path(), &[("disk0", 32 * MIB)]);
    let hv = qsd.hypervisor();
    let disks = qsd.disk_refs();
    hv.start_tracking(&disks).await.unwrap();
    qsd.guest("disk0", &["write -P 0x11 2M 64k"]).await;
    let view = open(&hv, &disks, 1).await;
    qsd.guest("disk0", &["write -P 0x22 20M 64k"]).await;
    view.close(CloseView::Abandon).await.unwrap();
    assert_eq!(
        bitmaps(&hv, "disk0").await,
        vec![("lifeboat-1".into(), true)]
    );

    let view = open(&hv, &disks, 2).await;
    assert_eq!(
        view.changed_extents("vol-disk0").await.unwrap(),
        vec![range(2 * MIB, 64 * KIB), range(20 * MIB, 64 * KIB)]
    );
    assert!(
        view.read("vol-disk0", 20 * MIB, 64 * KIB)
            .await
            .unwrap()
            .iter()
            .all(|b| *b == 0x22)
    );
    view.close(CloseView::Commit).await.unwrap();
    let view = open(&hv, &disks, 3).await;
    assert_eq!(view.changed_extents("vol-disk0").await.unwrap(), vec![]);
    view.close(CloseView::Commit).await.unwrap();
}

#[tokio::test]
async fn two_disks_are_cut_together() {
    let tmp = tempfile::tempdir().unwrap();
    let qsd = Qsd::start(tmp.path(), &[("disk0", 16 * MIB), ("disk1", 8 * MIB)]);
    let hv = qsd.hypervisor();
    let disks = qsd.disk_refs();
    hv.start_tracking(&disks).await.unwrap();
    assert_eq!(
        hv.tracking(&disks).await.unwrap(),
        vec![Tracking::Active, Tracking::Active]
    );
    qsd.guest("disk0", &["write -P 0xa0 0 64k"]).await;
    qsd.guest("disk1", &["write -P 0xa1 4M 192k"]).await;

    let view = open(&hv, &disks, 7).await;
    for node in ["disk0", "disk1"] {
        assert_eq!(
            bitmaps(&hv, node).await,
            vec![("lifeboat-0".into(), false), ("lifeboat-7".into(), true)]
        );
    }
    assert_eq!(
        view.changed_extents("vol-disk0").await.unwrap(),
        vec![range(0, 64 * KIB)]
    );
    assert_eq!(
        view.changed_extents("vol-disk1").await.unwrap(),
        vec![range(4 * MIB, 192 * KIB)]
    );
    assert!(
        view.read("vol-disk1", 4 * MIB, 192 * KIB)
            .await
            .unwrap()
            .iter()
            .all(|b| *b == 0xa1)
    );
    // A big read: several requests in flight, over written and unwritten space.
    let whole = view.read("vol-disk0", 0, 16 * MIB).await.unwrap();
    assert_eq!(whole.len() as u64, 16 * MIB);
    assert!(whole[..65536].iter().all(|b| *b == 0xa0) && whole[65536..].iter().all(|b| *b == 0));
    view.close(CloseView::Commit).await.unwrap();
    for node in ["disk0", "disk1"] {
        assert_eq!(bitmaps(&hv, node).await, vec![("lifeboat-7".into(), true)]);
    }
}

#[tokio::test]
async fn allocated_extents_skip_unwritten_and_zeroed_space() {
    let tmp = tempfile::tempdir().unwrap();
    let qsd = Qsd::start(tmp.path(), &[("disk0", 64 * MIB)]);
    let hv = qsd.hypervisor();
    let disks = qsd.disk_refs();
    hv.start_tracking(&disks).await.unwrap();
    qsd.guest(
        "disk0",
        &[
            "write -P 0x01 2M 64k",
            "write -P 0x02 40M 192k",
            "write -z 50M 64k",
        ],
    )
    .await;
    let view = open(&hv, &disks, 1).await;
    assert_eq!(
        view.allocated_extents("vol-disk0").await.unwrap(),
        vec![range(2 * MIB, 64 * KIB), range(40 * MIB, 192 * KIB)]
    );
    // The zeroed range was written, so it is a change; it is just not data.
    assert_eq!(
        view.changed_extents("vol-disk0").await.unwrap(),
        vec![
            range(2 * MIB, 64 * KIB),
            range(40 * MIB, 192 * KIB),
            range(50 * MIB, 64 * KIB)
        ]
    );
    view.close(CloseView::Commit).await.unwrap();
}

#[tokio::test]
async fn a_killed_qemu_loses_tracking() {
    let tmp = tempfile::tempdir().unwrap();
    let mut qsd = Qsd::start(tmp.path(), &[("disk0", 16 * MIB)]);
    let hv = qsd.hypervisor();
    let disks = qsd.disk_refs();

    // A bitmap added at runtime is not in the image until QEMU closes it: kill -9 loses it.
    hv.start_tracking(&disks).await.unwrap();
    qsd.kill9();
    qsd.spawn();
    match &hv.tracking(&disks).await.unwrap()[..] {
        [Tracking::Lost(why)] => assert!(why.contains("no lifeboat bitmap"), "{why}"),
        other => panic!("expected Lost, got {other:?}"),
    }

    // Stored by a clean stop, then loaded (and marked in-use): kill -9 leaves it inconsistent.
    hv.start_tracking(&disks).await.unwrap();
    qsd.stop();
    qsd.spawn();
    assert_eq!(hv.tracking(&disks).await.unwrap(), vec![Tracking::Active]);
    qsd.guest("disk0", &["write -P 0x55 1M 64k"]).await;
    qsd.kill9();
    qsd.spawn();
    match &hv.tracking(&disks).await.unwrap()[..] {
        [Tracking::Lost(why)] => assert!(why.contains("inconsistent"), "{why}"),
        other => panic!("expected Lost, got {other:?}"),
    }
    assert!(
        hv.open_view(&disks, 1, Quiesce::None).await.is_err(),
        "a view over lost tracking"
    );
    hv.start_tracking(&disks).await.unwrap();
    assert_eq!(hv.tracking(&disks).await.unwrap(), vec![Tracking::Active]);
    assert_eq!(
        bitmaps(&hv, "disk0").await,
        vec![("lifeboat-0".into(), true)]
    );
}

#[tokio::test]
async fn a_crashed_agents_leftovers_are_swept_and_nothing_is_lost() {
    let tmp = tempfile::tempdir().unwrap();
    let qsd = Qsd::start(tmp.path(), &[("disk0", 16 * MIB)]);
    let disks = qsd.disk_refs();
    {
        let hv = qsd.hypervisor();
        hv.start_tracking(&disks).await.unwrap();
        qsd.guest("disk0", &["write -P 0x31 1M 64k"]).await;
        let view = open(&hv, &disks, 1).await;
        qsd.guest("disk0", &["write -P 0x32 3M 64k"]).await;
        // The agent dies: no close; the export, job, fleece node and both bitmaps stay.
        drop(view);
        assert_eq!(
            ids(&hv, "query-block-exports", "id").await,
            vec!["guest-disk0".to_owned(), "lbx-1-0".to_owned()]
        );
    }
    let hv = qsd.hypervisor();
    assert_eq!(hv.tracking(&disks).await.unwrap(), vec![Tracking::Active]);
    assert_eq!(
        ids(&hv, "query-block-exports", "id").await,
        vec!["guest-disk0".to_owned()]
    );
    assert_eq!(
        ids(&hv, "query-block-jobs", "device").await,
        Vec::<String>::new()
    );
    assert!(
        hv.inner
            .nodes()
            .await
            .unwrap()
            .iter()
            .all(|n| !n.name.starts_with(FLEECE_NODE_PREFIX))
    );
    assert!(!hv.inner.fleece_path("lbf-1-0").exists());
    assert_eq!(
        bitmaps(&hv, "disk0").await,
        vec![("lifeboat-1".into(), true)]
    );

    let view = open(&hv, &disks, 2).await;
    assert_eq!(
        view.changed_extents("vol-disk0").await.unwrap(),
        vec![range(MIB, 64 * KIB), range(3 * MIB, 64 * KIB)]
    );
    view.close(CloseView::Commit).await.unwrap();
}

/// A job that formats an overlay and fails is reported with QEMU's words and dismissed; one
/// an earlier run left behind is dismissed by the next sweep.
#[tokio::test]
async fn a_failed_overlay_job_is_reported_and_dismissed() {
    let tmp = tempfile::tempdir().unwrap();
    let qsd = Qsd::start(tmp.path(), &[("disk0", 8 * MIB)]);
    let hv = qsd.hypervisor();
    let path = tmp.path().join("bad.qcow2");
    std::fs::File::create(&path).unwrap();
    let create = |job: &str, cluster_size: u64| {
        let args = serde_json::json!({
            "job-id": job,
            "options": {
                "driver": "qcow2",
                "file": { "driver": "file", "filename": path },
                "size": MIB,
                "cluster-size": cluster_size,
            },
        });
        let hv = hv.inner.clone();
        async move { hv.qmp("blockdev-create", args, None).await.unwrap() }
    };
    create("lbc-bad", 1000).await;
    let why = hv
        .inner
        .wait_job_concluded("lbc-bad", None)
        .await
        .unwrap()
        .expect("the job failed");
    assert!(why.to_lowercase().contains("cluster size"), "{why}");
    let jobs = hv.inner.qmp("query-jobs", Value::Null, None).await.unwrap();
    assert_eq!(jobs, serde_json::json!([]), "the job is dismissed");
    create("lbc-good", 65_536).await;
    let done = hv.inner.wait_job_concluded("lbc-good", None).await.unwrap();
    assert_eq!(done, None, "a job that succeeded");
    let gone = hv
        .inner
        .wait_job_concluded("lbc-none", None)
        .await
        .unwrap_err();
    assert!(
        matches!(&gone, BackendError::Permanent { detail, .. } if detail.contains("gone")),
        "{gone:?}"
    );

    create("lbc-left", 65_536).await;
    for _ in 0..500 {
        let jobs = hv.inner.qmp("query-jobs", Value::Null, None).await.unwrap();
        if jobs[0]["status"] == "concluded" {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    hv.start_tracking(&qsd.disk_refs()).await.unwrap();
    let jobs = hv.inner.qmp("query-jobs", Value::Null, None).await.unwrap();
    assert_eq!(
        jobs,
        serde_json::json!([]),
        "the sweep dismissed the leftover job"
    );
}

#[tokio::test]
async fn a_failed_open_rolls_back_and_loses_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let qsd = Qsd::start(tmp.path(), &[("disk0", 16 * MIB), ("disk1", 8 * MIB)]);
    let disks = qsd.disk_refs();
    let leftovers = |hv: &QemuHypervisor| {
        let hv = hv.inner.clone();
        async move {
            let nodes = hv.nodes().await.unwrap();
            let fleece = nodes
                .iter()
                .filter(|n| n.name.starts_with(FLEECE_NODE_PREFIX))
                .count();
            let jobs = hv.qmp("query-block-jobs", Value::Null, None).await.unwrap();
            let exports = hv
                .qmp("query-block-exports", Value::Null, None)
                .await
                .unwrap();
            (
                fleece,
                jobs.as_array().unwrap().len(),
                exports.as_array().unwrap().len(),
            )
        }
    };
    {
        // Before anything is made: an overlay's name is taken by something that is not an
        // overlay (a folder), which the view does not remove.
        let hv = qsd.hypervisor();
        hv.start_tracking(&disks).await.unwrap();
        qsd.guest("disk0", &["write -P 0x41 1M 64k"]).await;
        let taken = hv.inner.fleece_path("lbf-1-1");
        std::fs::create_dir_all(&taken).unwrap();
        let err = hv.open_view(&disks, 1, Quiesce::None).await.unwrap_err();
        assert!(err.to_string().contains("stale overlay"), "{err}");
        assert_eq!(leftovers(&hv).await, (0, 0, 2));
        std::fs::remove_dir(&taken).unwrap();
        assert_eq!(
            bitmaps(&hv, "disk0").await,
            vec![("lifeboat-0".into(), true)]
        );
    }
    {
        // After the cut: the view's NBD server cannot be reached.
        let bogus = tmp.path().join("bogus.sock");
        let hv = qsd.hypervisor_with(QemuOptions {
            nbd_server_socket: Some(bogus),
            ..QemuOptions::default()
        });
        let err = hv.open_view(&disks, 2, Quiesce::None).await.unwrap_err();
        assert!(err.to_string().contains("bogus.sock"), "{err}");
        assert_eq!(leftovers(&hv).await, (0, 0, 2));
        for node in ["disk0", "disk1"] {
            assert_eq!(bitmaps(&hv, node).await, vec![("lifeboat-2".into(), true)]);
        }
        assert!(!hv.inner.fleece_path("lbf-2-0").exists());
    }
    let hv = qsd.hypervisor();
    let view = open(&hv, &disks, 3).await;
    assert_eq!(
        view.changed_extents("vol-disk0").await.unwrap(),
        vec![range(MIB, 64 * KIB)]
    );
    view.close(CloseView::Commit).await.unwrap();
}

#[tokio::test]
async fn without_a_configured_server_the_backend_runs_its_own() {
    let tmp = tempfile::tempdir().unwrap();
    let qsd = Qsd::start_with(tmp.path(), &[("disk0", 8 * MIB)], false);
    let hv = qsd.hypervisor();
    let disks = qsd.disk_refs();
    hv.start_tracking(&disks).await.unwrap();
    for cycle in 1..=2 {
        let view = open(&hv, &disks, cycle).await;
        assert!(hv.inner.nbd_socket_path().exists());
        assert_eq!(view.changed_extents("vol-disk0").await.unwrap(), vec![]);
        assert_eq!(view.allocated_extents("vol-disk0").await.unwrap(), vec![]);
        assert!(
            view.read("vol-disk0", 0, 8 * MIB)
                .await
                .unwrap()
                .iter()
                .all(|b| *b == 0)
        );
        view.close(CloseView::Commit).await.unwrap();
        let stopped = hv
            .inner
            .qmp_raw("nbd-server-stop", Value::Null)
            .await
            .unwrap_err();
        assert!(stopped.desc().contains("not running"), "{stopped}");
    }
}

#[tokio::test]
async fn a_running_nbd_server_is_found_and_reused() {
    let tmp = tempfile::tempdir().unwrap();
    let qsd = Qsd::start(tmp.path(), &[("disk0", 8 * MIB)]);
    // What the engine does: no NBD socket configured, while QSD runs one for the guest.
    let hv = QemuHypervisor::new("vm1", &qsd.qmp, tmp.path().join("work"));
    let disks = qsd.disk_refs();
    hv.start_tracking(&disks).await.unwrap();
    qsd.guest("disk0", &["write -P 0x77 1M 64k"]).await;
    let view = open(&hv, &disks, 1).await;
    assert_eq!(
        view.changed_extents("vol-disk0").await.unwrap(),
        vec![range(MIB, 64 * KIB)]
    );
    assert!(
        view.read("vol-disk0", MIB, 64 * KIB)
            .await
            .unwrap()
            .iter()
            .all(|b| *b == 0x77)
    );
    view.close(CloseView::Commit).await.unwrap();
    assert!(!hv.inner.nbd_socket_path().exists(), "no server of its own");
    // The guest's server keeps running.
    qsd.guest("disk0", &["read -P 0x77 1M 64k"]).await;
}

fn node(name: &str, driver: &str, filename: &str) -> NodeInfo {
    NodeInfo {
        name: name.into(),
        driver: driver.into(),
        filename: filename.into(),
        ..NodeInfo::default()
    }
}

#[test]
fn which_disks_keep_their_tracking_across_a_restart() {
    let qcow2 = NodeInfo {
        qcow2_compat: Some("1.1".into()),
        ..node("vm-root", "qcow2", "/vm/root.qcow2")
    };
    let file_under_qcow2 = node("vm-root-file", "file", "/vm/root.qcow2");
    let raw = node("vm-data", "raw", "/vm/data.img");
    let file_under_raw = node("vm-data-file", "file", "/vm/data.img");
    let device = node("vm-lv", "host_device", "/dev/vg0/lv");
    let v2 = NodeInfo {
        qcow2_compat: Some("0.10".into()),
        ..node("vm-old", "qcow2", "/vm/old.qcow2")
    };
    let read_only = NodeInfo {
        read_only: true,
        ..qcow2.clone()
    };
    let all = [
        qcow2.clone(),
        file_under_qcow2.clone(),
        raw.clone(),
        file_under_raw.clone(),
        device.clone(),
        v2.clone(),
    ];
    let in_memory = |n: &NodeInfo| match tracking_durability(n, &all) {
        Ok(TrackingDurability::InMemory(why)) => why,
        other => panic!("{}: {other:?}", n.name),
    };
    assert_eq!(
        tracking_durability(&qcow2, &all),
        Ok(TrackingDurability::Persistent)
    );
    assert!(in_memory(&raw).contains("a raw disk cannot store a dirty bitmap"));
    assert!(in_memory(&file_under_raw).contains("a file disk"));
    assert!(in_memory(&device).contains("a host_device disk"));
    assert!(in_memory(&v2).contains("qemu-img amend -o compat=1.1 /vm/old.qcow2"));
    assert!(in_memory(&read_only).contains("read-only"));
    // The file under a qcow2 image holds qcow2's clusters at host offsets: refused, naming
    // the node to use.
    let refused = tracking_durability(&file_under_qcow2, &all).unwrap_err();
    assert!(refused.contains("\"vm-root\""), "{refused}");
}

#[test]
fn proc_net_unix_parsing() {
    use std::os::unix::ffi::OsStrExt;
    let table = "\
Num       RefCount Protocol Flags    Type St Inode Path
0000000000000000: 00000002 00000000 00010000 0001 01 23456 /run/vm1/nbd.sock
0000000000000000: 00000002 00000000 00010000 0001 01 23457 @abstract
0000000000000000: 00000003 00000000 00000000 0001 03 23458 /run/vm1/nbd.sock
0000000000000000: 00000002 00000000 00010000 0002 01 23459 /run/dgram.sock
0000000000000000: 00000002 00000000 00010000 0001 01 23460
garbage
";
    assert_eq!(
        discover::listening_unix_sockets(table.as_bytes()),
        vec![(23456, PathBuf::from("/run/vm1/nbd.sock"))]
    );
    // A path with spaces and a byte that is not UTF-8 (Latin-1 "é"), and a padded inode.
    let mut table = b"Num       RefCount Protocol Flags    Type St Inode Path\n".to_vec();
    table.extend_from_slice(
        b"0000000000000000: 00000002 00000000 00010000 0001 01   789 /srv/my VMs/caf\xe9 1/nbd.sock\n",
    );
    assert_eq!(
        discover::listening_unix_sockets(&table),
        vec![(
            789,
            PathBuf::from(std::ffi::OsStr::from_bytes(
                b"/srv/my VMs/caf\xe9 1/nbd.sock"
            ))
        )]
    );
    assert_eq!(discover::socket_inode("socket:[23456]"), Some(23456));
    assert_eq!(discover::socket_inode("pipe:[1]"), None);
    assert_eq!(discover::socket_inode("/dev/null"), None);
}

/// A fake QEMU guest agent: answers sync, freeze and thaw, and logs what it was asked.
async fn fake_guest_agent(path: PathBuf, fail_freeze: bool) -> Arc<Mutex<Vec<String>>> {
    let log = Arc::new(Mutex::new(Vec::new()));
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    let seen = Arc::clone(&log);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (r, mut w) = stream.into_split();
            let mut lines = BufReader::new(r).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let msg: Value = serde_json::from_str(&line).unwrap();
                let cmd = msg["execute"].as_str().unwrap().to_owned();
                let mut reply = match cmd.as_str() {
                    "guest-sync-delimited" => {
                        let mut out = vec![0xFF];
                        out.extend(serde_json::to_vec(&json!({ "return": msg["arguments"]["id"] })).unwrap());
                        out
                    }
                    "guest-fsfreeze-freeze" if fail_freeze => {
                        serde_json::to_vec(&json!({ "error": { "class": "GenericError", "desc": "fsfreeze is broken" } }))
                            .unwrap()
                    }
                    _ => serde_json::to_vec(&json!({ "return": 1 })).unwrap(),
                };
                if cmd != "guest-sync-delimited" {
                    seen.lock().unwrap().push(cmd);
                }
                reply.push(b'\n');
                w.write_all(&reply).await.unwrap();
            }
        }
    });
    log
}

#[tokio::test]
async fn application_consistency_freezes_and_always_thaws() {
    let tmp = tempfile::tempdir().unwrap();
    let qsd = Qsd::start(tmp.path(), &[("disk0", 8 * MIB)]);
    let disks = qsd.disk_refs();
    {
        // No agent configured: crash-consistent, said so.
        let hv = qsd.hypervisor();
        hv.start_tracking(&disks).await.unwrap();
        let view = hv.open_view(&disks, 1, Quiesce::Application).await.unwrap();
        assert_eq!(view.quiesced(), Quiesce::None);
        view.close(CloseView::Commit).await.unwrap();
    }
    {
        let socket = tmp.path().join("qga.sock");
        let log = fake_guest_agent(socket.clone(), false).await;
        let hv = qsd.hypervisor_with(QemuOptions {
            guest_agent_socket: Some(socket),
            ..QemuOptions::default()
        });
        let view = hv.open_view(&disks, 2, Quiesce::Application).await.unwrap();
        assert_eq!(view.quiesced(), Quiesce::Application);
        assert_eq!(
            *log.lock().unwrap(),
            vec!["guest-fsfreeze-freeze", "guest-fsfreeze-thaw"]
        );
        view.close(CloseView::Commit).await.unwrap();
        let view = hv.open_view(&disks, 3, Quiesce::None).await.unwrap();
        assert_eq!(view.quiesced(), Quiesce::None);
        assert_eq!(
            log.lock().unwrap().len(),
            2,
            "no freeze when none was asked for"
        );
        view.close(CloseView::Commit).await.unwrap();
    }
    {
        let socket = tmp.path().join("qga-broken.sock");
        let log = fake_guest_agent(socket.clone(), true).await;
        let hv = qsd.hypervisor_with(QemuOptions {
            guest_agent_socket: Some(socket),
            ..QemuOptions::default()
        });
        let view = hv.open_view(&disks, 4, Quiesce::Application).await.unwrap();
        assert_eq!(
            view.quiesced(),
            Quiesce::None,
            "a failed freeze gives a crash-consistent view"
        );
        assert_eq!(
            *log.lock().unwrap(),
            vec!["guest-fsfreeze-freeze", "guest-fsfreeze-thaw"]
        );
        view.close(CloseView::Commit).await.unwrap();
    }
}

// ---------------------------------------------------------------------------------------------
// NBD wire parsers, fed hostile bytes.
// ---------------------------------------------------------------------------------------------

fn greeting(init: u64, opts: u64, flags: u16) -> [u8; GREETING_BYTES] {
    let mut out = [0u8; GREETING_BYTES];
    let mut b = &mut out[..];
    b.put_u64(init);
    b.put_u64(opts);
    b.put_u16(flags);
    out
}

fn is_protocol<T: std::fmt::Debug>(r: Result<T, NbdError>, needle: &str) {
    match r {
        Err(NbdError::Protocol(m)) => {
            assert!(m.contains(needle), "{m:?} does not mention {needle:?}")
        }
        other => panic!("expected a protocol error about {needle:?}, got {other:?}"),
    }
}

#[test]
fn greeting_parser_refuses_what_is_not_fixed_newstyle() {
    assert_eq!(
        parse_greeting(&greeting(NBD_INIT_MAGIC, NBD_OPTS_MAGIC, 3)).unwrap(),
        3
    );
    is_protocol(
        parse_greeting(&greeting(0x1234, NBD_OPTS_MAGIC, 3)),
        "NBDMAGIC",
    );
    is_protocol(
        parse_greeting(&greeting(NBD_INIT_MAGIC, NBD_OLDSTYLE_MAGIC, 3)),
        "oldstyle",
    );
    is_protocol(parse_greeting(&greeting(NBD_INIT_MAGIC, 7, 3)), "IHAVEOPT");
    is_protocol(
        parse_greeting(&greeting(NBD_INIT_MAGIC, NBD_OPTS_MAGIC, 0)),
        "fixed newstyle",
    );
}

fn option_header(magic: u64, option: u32, reply: u32, len: u32) -> [u8; OPTION_REPLY_HEADER_BYTES] {
    let mut out = [0u8; OPTION_REPLY_HEADER_BYTES];
    let mut b = &mut out[..];
    b.put_u64(magic);
    b.put_u32(option);
    b.put_u32(reply);
    b.put_u32(len);
    out
}

#[test]
fn option_reply_parser_checks_every_field() {
    let h = parse_option_reply_header(
        &option_header(NBD_REP_MAGIC, NBD_OPT_GO, NBD_REP_ACK, 0),
        NBD_OPT_GO,
    )
    .unwrap();
    assert_eq!(parse_option_reply(h, &[]).unwrap(), OptionReply::Ack);
    is_protocol(
        parse_option_reply_header(&option_header(1, NBD_OPT_GO, NBD_REP_ACK, 0), NBD_OPT_GO),
        "magic",
    );
    is_protocol(
        parse_option_reply_header(&option_header(NBD_REP_MAGIC, 9, NBD_REP_ACK, 0), NBD_OPT_GO),
        "option 9",
    );
    is_protocol(
        parse_option_reply_header(
            &option_header(NBD_REP_MAGIC, NBD_OPT_GO, NBD_REP_INFO, u32::MAX),
            NBD_OPT_GO,
        ),
        "accepted",
    );
    let hdr = |reply, len| OptionReplyHeader { reply, len };
    is_protocol(parse_option_reply(hdr(NBD_REP_ACK, 1), &[0]), "payload");
    is_protocol(
        parse_option_reply(hdr(NBD_REP_ACK, 2), &[0]),
        "length differs",
    );
    is_protocol(
        parse_option_reply(hdr(NBD_REP_META_CONTEXT, 4), &[0, 0, 0, 1]),
        "too short",
    );
    let mut ctx = vec![0, 0, 0, 7];
    ctx.extend_from_slice(b"base:allocation");
    assert_eq!(
        parse_option_reply(hdr(NBD_REP_META_CONTEXT, ctx.len() as u32), &ctx).unwrap(),
        OptionReply::MetaContext {
            id: 7,
            name: "base:allocation".into()
        }
    );
    is_protocol(
        parse_option_reply(hdr(NBD_REP_META_CONTEXT, 5), &[0, 0, 0, 1, 0xff]),
        "UTF-8",
    );
    is_protocol(
        parse_option_reply(hdr(NBD_REP_INFO, 1), &[0]),
        "without a type",
    );
    is_protocol(
        parse_option_reply(hdr(NBD_REP_INFO, 4), &[0, 0, 0, 0]),
        "NBD_INFO_EXPORT",
    );
    let mut export = vec![0, 0];
    export.extend_from_slice(&(64 * MIB).to_be_bytes());
    export.extend_from_slice(&[0, 3]);
    assert_eq!(
        parse_option_reply(hdr(NBD_REP_INFO, 12), &export).unwrap(),
        OptionReply::Info(Info::Export {
            size: 64 * MIB,
            flags: 3
        })
    );
    let mut bs = vec![0, 3];
    for v in [3u32, 4096, 1 << 25] {
        bs.extend_from_slice(&v.to_be_bytes());
    }
    is_protocol(
        parse_option_reply(hdr(NBD_REP_INFO, 14), &bs),
        "inconsistent",
    );
    assert_eq!(
        parse_option_reply(hdr(NBD_REP_INFO, 3), &[0, 9, 1]).unwrap(),
        OptionReply::Info(Info::Other(9))
    );
    assert_eq!(
        parse_option_reply(hdr(0x8000_0006, 4), b"nope").unwrap(),
        OptionReply::Error {
            reply: 0x8000_0006,
            message: "nope".into()
        }
    );
    is_protocol(parse_option_reply(hdr(77, 0), &[]), "unknown option reply");
}

const READ: Request = Request {
    command: NBD_CMD_READ,
    offset: 4096,
    len: 8192,
};
const STATUS: Request = Request {
    command: NBD_CMD_BLOCK_STATUS,
    offset: 65536,
    len: 131072,
};

fn chunk(ty: u16, flags: u16, payload: &[u8]) -> (ChunkHeader, Bytes) {
    (
        ChunkHeader {
            flags,
            ty,
            handle: 1,
            len: payload.len() as u32,
        },
        Bytes::copy_from_slice(payload),
    )
}

fn be(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

fn parse(ty: u16, flags: u16, payload: &[u8], req: &Request) -> Result<Chunk, NbdError> {
    let (h, p) = chunk(ty, flags, payload);
    parse_chunk(&h, p, req)
}

#[test]
fn chunk_parser_keeps_data_and_holes_inside_the_request() {
    let data = be(&[&4096u64.to_be_bytes(), &[7u8; 16]]);
    assert_eq!(
        parse(NBD_REPLY_TYPE_OFFSET_DATA, 0, &data, &READ).unwrap(),
        Chunk::Data {
            offset: 4096,
            data: Bytes::from(vec![7u8; 16])
        }
    );
    is_protocol(
        parse(
            NBD_REPLY_TYPE_OFFSET_DATA,
            0,
            &be(&[&0u64.to_be_bytes(), &[1]]),
            &READ,
        ),
        "outside",
    );
    is_protocol(
        parse(
            NBD_REPLY_TYPE_OFFSET_DATA,
            0,
            &be(&[&12288u64.to_be_bytes(), &[1]]),
            &READ,
        ),
        "outside",
    );
    is_protocol(
        parse(
            NBD_REPLY_TYPE_OFFSET_DATA,
            0,
            &be(&[&u64::MAX.to_be_bytes(), &[1]]),
            &READ,
        ),
        "overflows",
    );
    is_protocol(
        parse(NBD_REPLY_TYPE_OFFSET_DATA, 0, &4096u64.to_be_bytes(), &READ),
        "no data",
    );
    is_protocol(
        parse(NBD_REPLY_TYPE_OFFSET_DATA, 0, &[0; 4], &READ),
        "shorter",
    );
    is_protocol(
        parse(NBD_REPLY_TYPE_OFFSET_DATA, 0, &data, &STATUS),
        "in reply to block status",
    );
    assert!(check_data_chunk(&READ, 8192 + 8, 4096).is_ok());
    is_protocol(check_data_chunk(&READ, 8192 + 9, 4096), "outside");

    let hole = |off: u64, len: u32| be(&[&off.to_be_bytes(), &len.to_be_bytes()]);
    assert_eq!(
        parse(NBD_REPLY_TYPE_OFFSET_HOLE, 0, &hole(8192, 4096), &READ).unwrap(),
        Chunk::Hole(8192..12288)
    );
    is_protocol(
        parse(NBD_REPLY_TYPE_OFFSET_HOLE, 0, &hole(8192, 4097), &READ),
        "outside",
    );
    is_protocol(
        parse(NBD_REPLY_TYPE_OFFSET_HOLE, 0, &hole(8192, 0), &READ),
        "length 0",
    );
    is_protocol(
        parse(NBD_REPLY_TYPE_OFFSET_HOLE, 0, &hole(u64::MAX, 2), &READ),
        "overflows",
    );
    is_protocol(
        parse(NBD_REPLY_TYPE_OFFSET_HOLE, 0, &[0; 11], &READ),
        "not 12",
    );
    is_protocol(
        parse(NBD_REPLY_TYPE_OFFSET_HOLE, 0, &hole(8192, 1), &STATUS),
        "in reply to block status",
    );

    assert_eq!(
        parse(NBD_REPLY_TYPE_NONE, NBD_REPLY_FLAG_DONE, &[], &READ).unwrap(),
        Chunk::None
    );
    is_protocol(parse(NBD_REPLY_TYPE_NONE, 0, &[], &READ), "final");
    is_protocol(
        parse(NBD_REPLY_TYPE_NONE, NBD_REPLY_FLAG_DONE, &[1], &READ),
        "empty",
    );
    is_protocol(parse(9, 0, &[], &READ), "unknown chunk type 9");
    let (h, _) = chunk(NBD_REPLY_TYPE_OFFSET_DATA, 0, &data);
    is_protocol(
        parse_chunk(&h, Bytes::from_static(&[0; 3]), &READ),
        "length differs",
    );
}

#[test]
fn chunk_parser_checks_block_status_and_errors() {
    let status = |ctx: u32, descs: &[(u32, u32)]| {
        let mut out = ctx.to_be_bytes().to_vec();
        for (len, flags) in descs {
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(&flags.to_be_bytes());
        }
        out
    };
    assert_eq!(
        parse(
            NBD_REPLY_TYPE_BLOCK_STATUS,
            0,
            &status(2, &[(4096, 1), (200_000, 0)]),
            &STATUS
        )
        .unwrap(),
        Chunk::Status {
            context: 2,
            extents: vec![
                Extent {
                    range: 65536..69632,
                    flags: 1
                },
                Extent {
                    range: 69632..269_632,
                    flags: 0
                }
            ]
        }
    );
    is_protocol(
        parse(
            NBD_REPLY_TYPE_BLOCK_STATUS,
            0,
            &status(2, &[(0, 1)]),
            &STATUS,
        ),
        "length 0",
    );
    is_protocol(
        parse(
            NBD_REPLY_TYPE_BLOCK_STATUS,
            0,
            &status(2, &[(131072, 1), (1, 0)]),
            &STATUS,
        ),
        "after the end",
    );
    is_protocol(
        parse(NBD_REPLY_TYPE_BLOCK_STATUS, 0, &status(2, &[]), &STATUS),
        "whole descriptors",
    );
    is_protocol(
        parse(NBD_REPLY_TYPE_BLOCK_STATUS, 0, &[0; 15], &STATUS),
        "whole descriptors",
    );
    is_protocol(
        parse(NBD_REPLY_TYPE_BLOCK_STATUS, 0, &status(2, &[(1, 0)]), &READ),
        "in reply to read",
    );

    let error = |errno: u32, msg: &[u8], declared: u16| {
        be(&[&errno.to_be_bytes(), &declared.to_be_bytes(), msg])
    };
    assert_eq!(
        parse(
            NBD_REPLY_TYPE_ERROR,
            NBD_REPLY_FLAG_DONE,
            &error(5, b"bad sector", 10),
            &READ
        )
        .unwrap(),
        Chunk::Error {
            errno: 5,
            message: "bad sector".into(),
            offset: None
        }
    );
    is_protocol(
        parse(NBD_REPLY_TYPE_ERROR, 0, &error(5, b"bad", 300), &READ),
        "runs past",
    );
    is_protocol(
        parse(NBD_REPLY_TYPE_ERROR, 0, &error(0, b"", 0), &READ),
        "error number 0",
    );
    is_protocol(
        parse(NBD_REPLY_TYPE_ERROR, 0, &[0, 0, 0, 5, 0], &READ),
        "shorter",
    );
    let with_offset = |off: u64| be(&[&error(5, b"x", 1), &off.to_be_bytes()]);
    assert_eq!(
        parse(NBD_REPLY_TYPE_ERROR_OFFSET, 0, &with_offset(5000), &READ).unwrap(),
        Chunk::Error {
            errno: 5,
            message: "x".into(),
            offset: Some(5000)
        }
    );
    is_protocol(
        parse(NBD_REPLY_TYPE_ERROR_OFFSET, 0, &with_offset(1), &READ),
        "outside",
    );
    is_protocol(
        parse(NBD_REPLY_TYPE_ERROR_OFFSET, 0, &error(5, b"x", 1), &READ),
        "shorter",
    );
    // Unknown error types are errors of the request, even when their payload is garbage.
    match parse(NBD_REPLY_TYPE_ERROR_BIT | 40, 0, &[1], &READ).unwrap() {
        Chunk::Error {
            errno: 5, message, ..
        } => assert!(message.contains("unknown error chunk type")),
        other => panic!("{other:?}"),
    }
}

#[test]
fn read_assembly_insists_on_exact_coverage() {
    let data = |off: u64, n: usize| Chunk::Data {
        offset: off,
        data: Bytes::from(vec![9u8; n]),
    };
    let mut ok = ReadAssembly::new(READ);
    ok.push(Chunk::Hole(8192..12288)).unwrap();
    ok.push(data(4096, 4096)).unwrap();
    ok.push(Chunk::None).unwrap();
    let bytes = ok.finish().unwrap();
    assert!(bytes[..4096].iter().all(|b| *b == 9) && bytes[4096..].iter().all(|b| *b == 0));

    let mut gap = ReadAssembly::new(READ);
    gap.push(data(4096, 1000)).unwrap();
    gap.push(Chunk::Hole(6000..12288)).unwrap();
    is_protocol(gap.finish(), "gap");
    let mut overlap = ReadAssembly::new(READ);
    overlap.push(data(4096, 4097)).unwrap();
    overlap.push(Chunk::Hole(8192..12288)).unwrap();
    is_protocol(overlap.finish(), "overlap");
    let mut short = ReadAssembly::new(READ);
    short.push(data(4096, 4096)).unwrap();
    is_protocol(short.finish(), "short");
    let mut failed = ReadAssembly::new(READ);
    failed
        .push(Chunk::Error {
            errno: 5,
            message: "disk on fire".into(),
            offset: None,
        })
        .unwrap();
    match failed.finish() {
        Err(NbdError::Command {
            errno: 5, message, ..
        }) => assert_eq!(message, "disk on fire"),
        other => panic!("{other:?}"),
    }
    let mut wrong = ReadAssembly::new(READ);
    is_protocol(
        wrong.push(Chunk::Status {
            context: 1,
            extents: vec![],
        }),
        "BLOCK_STATUS",
    );
}

#[test]
fn status_assembly_takes_one_chunk_of_the_wanted_context() {
    let ext = |r: std::ops::Range<u64>, flags| Extent { range: r, flags };
    let mut s = StatusAssembly::new(STATUS, 2, vec![1, 2]);
    s.push(Chunk::Status {
        context: 1,
        extents: vec![ext(65536..196_608, 0)],
    })
    .unwrap();
    s.push(Chunk::Status {
        context: 2,
        extents: vec![ext(65536..70000, 1), ext(70000..900_000, 0)],
    })
    .unwrap();
    assert_eq!(
        s.finish().unwrap(),
        vec![ext(65536..70000, 1), ext(70000..196_608, 0)]
    );

    let mut unknown = StatusAssembly::new(STATUS, 2, vec![1, 2]);
    is_protocol(
        unknown.push(Chunk::Status {
            context: 3,
            extents: vec![],
        }),
        "never negotiated",
    );
    let mut twice = StatusAssembly::new(STATUS, 2, vec![2]);
    twice
        .push(Chunk::Status {
            context: 2,
            extents: vec![ext(65536..65537, 0)],
        })
        .unwrap();
    is_protocol(
        twice.push(Chunk::Status {
            context: 2,
            extents: vec![ext(65536..65537, 0)],
        }),
        "two",
    );
    let missing = StatusAssembly::new(STATUS, 2, vec![1, 2]);
    is_protocol(missing.finish(), "without context 2");
    let mut wrong = StatusAssembly::new(STATUS, 2, vec![2]);
    is_protocol(wrong.push(Chunk::Hole(65536..65537)), "read data chunk");
    assert_eq!(
        coalesce(vec![ext(0..1, 1), ext(1..5, 1), ext(5..6, 0)]),
        vec![ext(0..5, 1), ext(5..6, 0)]
    );
}

// ---------------------------------------------------------------------------------------------
// The NBD client against scripted servers.
// ---------------------------------------------------------------------------------------------

fn option_reply(option: u32, reply: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = option_header(NBD_REP_MAGIC, option, reply, payload.len() as u32).to_vec();
    out.extend_from_slice(payload);
    out
}

fn chunk_bytes(flags: u16, ty: u16, handle: u64, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    out.put_u32(NBD_STRUCTURED_REPLY_MAGIC);
    out.put_u16(flags);
    out.put_u16(ty);
    out.put_u64(handle);
    out.put_u32(payload.len() as u32);
    out.extend_from_slice(payload);
    out
}

/// A server that runs the handshake for `export` of `size` bytes with meta context
/// `base:allocation` (id 5), then hands the stream to the test.
async fn scripted_handshake(server: &mut tokio::io::DuplexStream, size: u64) {
    server
        .write_all(&greeting(
            NBD_INIT_MAGIC,
            NBD_OPTS_MAGIC,
            NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES,
        ))
        .await
        .unwrap();
    let mut flags = [0u8; 4];
    server.read_exact(&mut flags).await.unwrap();
    assert_eq!(
        u32::from_be_bytes(flags),
        NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES
    );
    for _ in 0..3 {
        let mut head = [0u8; 16];
        server.read_exact(&mut head).await.unwrap();
        let option = u32::from_be_bytes(head[8..12].try_into().unwrap());
        let len = u32::from_be_bytes(head[12..16].try_into().unwrap());
        let mut data = vec![0u8; len as usize];
        server.read_exact(&mut data).await.unwrap();
        let mut reply = Vec::new();
        match option {
            NBD_OPT_STRUCTURED_REPLY => {}
            NBD_OPT_SET_META_CONTEXT => {
                let mut ctx = 5u32.to_be_bytes().to_vec();
                ctx.extend_from_slice(BASE_ALLOCATION.as_bytes());
                reply.extend(option_reply(option, NBD_REP_META_CONTEXT, &ctx));
            }
            NBD_OPT_GO => {
                let mut info = vec![0, 0];
                info.extend_from_slice(&size.to_be_bytes());
                info.extend_from_slice(&[0, 3]);
                reply.extend(option_reply(option, NBD_REP_INFO, &info));
                reply.extend(option_reply(option, NBD_REP_INFO, &[0, 1, b'x']));
            }
            other => panic!("unexpected option {other}"),
        }
        reply.extend(option_reply(option, NBD_REP_ACK, &[]));
        server.write_all(&reply).await.unwrap();
    }
}

/// The next request the client sent, and its handle.
async fn read_request(server: &mut tokio::io::DuplexStream) -> (Request, u64) {
    let mut req = [0u8; REQUEST_BYTES];
    server.read_exact(&mut req).await.unwrap();
    let mut b = &req[..];
    use bytes::Buf;
    assert_eq!(b.get_u32(), NBD_REQUEST_MAGIC);
    let _flags = b.get_u16();
    let command = b.get_u16();
    let handle = b.get_u64();
    let offset = b.get_u64();
    let len = b.get_u32();
    (
        Request {
            command,
            offset,
            len,
        },
        handle,
    )
}

async fn client_for(size: u64) -> (NbdClient<tokio::io::DuplexStream>, tokio::io::DuplexStream) {
    let (client, mut server) = tokio::io::duplex(1 << 20);
    let contexts = [BASE_ALLOCATION.to_owned()];
    let (c, ()) = tokio::join!(
        NbdClient::handshake(client, "exp", &contexts, Duration::from_secs(5)),
        scripted_handshake(&mut server, size)
    );
    (c.unwrap(), server)
}

#[tokio::test]
async fn client_matches_out_of_order_replies_by_handle() {
    let (mut client, mut server) = client_for(MIB).await;
    assert_eq!(client.size(), MIB);
    assert_eq!(client.context_id(BASE_ALLOCATION), Some(5));
    client.set_read_request_bytes(4096);
    let server_side = async move {
        let mut reqs = Vec::new();
        for _ in 0..3 {
            reqs.push(read_request(&mut server).await);
        }
        // Answer in reverse order; the middle one as a hole, the others as data.
        for (i, r) in reqs.iter().enumerate().rev() {
            let &(r, handle) = r;
            let mut payload = r.offset.to_be_bytes().to_vec();
            if i == 1 {
                payload.extend_from_slice(&r.len.to_be_bytes());
                server
                    .write_all(&chunk_bytes(
                        NBD_REPLY_FLAG_DONE,
                        NBD_REPLY_TYPE_OFFSET_HOLE,
                        handle,
                        &payload,
                    ))
                    .await
                    .unwrap();
            } else {
                payload.extend(vec![i as u8 + 1; r.len as usize]);
                server
                    .write_all(&chunk_bytes(
                        0,
                        NBD_REPLY_TYPE_OFFSET_DATA,
                        handle,
                        &payload,
                    ))
                    .await
                    .unwrap();
                server
                    .write_all(&chunk_bytes(
                        NBD_REPLY_FLAG_DONE,
                        NBD_REPLY_TYPE_NONE,
                        handle,
                        &[],
                    ))
                    .await
                    .unwrap();
            }
        }
        server
    };
    let (data, _server) = tokio::join!(client.read(8192, 10000), server_side);
    let data = data.unwrap();
    assert_eq!(data.len(), 10000);
    assert!(data[..4096].iter().all(|b| *b == 1));
    assert!(data[4096..8192].iter().all(|b| *b == 0));
    assert!(data[8192..].iter().all(|b| *b == 3));
    assert!(!client.is_broken());
}

#[tokio::test]
async fn client_refuses_hostile_replies_without_panicking() {
    // A chunk for a handle never sent.
    let (mut client, mut server) = client_for(MIB).await;
    let hostile = async move {
        read_request(&mut server).await;
        server
            .write_all(&chunk_bytes(
                NBD_REPLY_FLAG_DONE,
                NBD_REPLY_TYPE_NONE,
                999,
                &[],
            ))
            .await
            .unwrap();
        server
    };
    let (r, _s) = tokio::join!(client.read(0, 512), hostile);
    is_protocol(r, "unknown handle 999");
    assert!(client.is_broken());
    is_protocol(client.read(0, 512).await, "reconnect");

    // A block status chunk claiming 4 GiB of descriptors: refused before allocating.
    let (mut client, mut server) = client_for(MIB).await;
    let hostile = async move {
        let (_, handle) = read_request(&mut server).await;
        let mut bytes = chunk_bytes(
            NBD_REPLY_FLAG_DONE,
            NBD_REPLY_TYPE_BLOCK_STATUS,
            handle,
            &[],
        );
        let n = bytes.len();
        bytes[n - 4..].copy_from_slice(&u32::MAX.to_be_bytes());
        server.write_all(&bytes).await.unwrap();
        server
    };
    let (r, _s) = tokio::join!(client.block_status(BASE_ALLOCATION, 0, MIB), hostile);
    is_protocol(r, "larger than any valid reply");

    // Garbage instead of a reply magic.
    let (mut client, mut server) = client_for(MIB).await;
    let hostile = async move {
        read_request(&mut server).await;
        server.write_all(&[0xde, 0xad, 0xbe, 0xef]).await.unwrap();
        server
    };
    let (r, _s) = tokio::join!(client.read(0, 512), hostile);
    is_protocol(r, "neither simple nor structured");

    // The server hangs up mid-reply.
    let (mut client, mut server) = client_for(MIB).await;
    let hostile = async move {
        let (_, handle) = read_request(&mut server).await;
        let mut payload = 0u64.to_be_bytes().to_vec();
        payload.extend(vec![0u8; 100]);
        let bytes = chunk_bytes(
            NBD_REPLY_FLAG_DONE,
            NBD_REPLY_TYPE_OFFSET_DATA,
            handle,
            &payload,
        );
        server.write_all(&bytes[..bytes.len() - 50]).await.unwrap();
        drop(server);
    };
    let (r, ()) = tokio::join!(client.read(0, 512), hostile);
    assert!(matches!(r, Err(NbdError::Io(_))), "{r:?}");

    // A server error is reported and the connection stays usable.
    let (mut client, mut server) = client_for(MIB).await;
    let erring = async move {
        let (_, handle) = read_request(&mut server).await;
        let payload = be(&[&5u32.to_be_bytes(), &2u16.to_be_bytes(), b"io"]);
        server
            .write_all(&chunk_bytes(
                NBD_REPLY_FLAG_DONE,
                NBD_REPLY_TYPE_ERROR,
                handle,
                &payload,
            ))
            .await
            .unwrap();
        server
    };
    let (r, _s) = tokio::join!(client.read(0, 512), erring);
    assert!(
        matches!(r, Err(NbdError::Command { errno: 5, .. })),
        "{r:?}"
    );
    assert!(!client.is_broken());

    // Requests the export cannot serve never reach the server.
    let (mut client, _server) = client_for(MIB).await;
    assert!(matches!(
        client.read(MIB - 1, 2).await,
        Err(NbdError::Invalid(_))
    ));
    assert!(matches!(
        client.read(u64::MAX, 2).await,
        Err(NbdError::Invalid(_))
    ));
    assert!(matches!(
        client.block_status("qemu:dirty-bitmap:x", 0, 1).await,
        Err(NbdError::Invalid(_))
    ));
}

#[tokio::test]
async fn handshake_reports_refusals_and_lies() {
    // The server refuses the export.
    let (client, mut server) = tokio::io::duplex(1 << 16);
    let script = async move {
        server
            .write_all(&greeting(
                NBD_INIT_MAGIC,
                NBD_OPTS_MAGIC,
                NBD_FLAG_FIXED_NEWSTYLE,
            ))
            .await
            .unwrap();
        let mut buf = [0u8; 4 + 16];
        server.read_exact(&mut buf).await.unwrap();
        server
            .write_all(&option_reply(NBD_OPT_STRUCTURED_REPLY, NBD_REP_ACK, &[]))
            .await
            .unwrap();
        let mut head = [0u8; 16];
        server.read_exact(&mut head).await.unwrap();
        let len = u32::from_be_bytes(head[12..16].try_into().unwrap());
        let mut data = vec![0u8; len as usize];
        server.read_exact(&mut data).await.unwrap();
        server
            .write_all(&option_reply(NBD_OPT_GO, 0x8000_0006, b"no such export"))
            .await
            .unwrap();
        server
    };
    let (r, _s) = tokio::join!(
        NbdClient::handshake(client, "exp", &[], Duration::from_secs(5)),
        script
    );
    match r {
        Err(NbdError::Refused {
            option,
            reply,
            message,
        }) => {
            assert_eq!(
                (option, reply.as_str(), message.as_str()),
                ("NBD_OPT_GO", "NBD_REP_ERR_UNKNOWN", "no such export")
            );
        }
        other => panic!("{other:?}"),
    }

    // The server selects a context nobody asked for.
    let (client, mut server) = tokio::io::duplex(1 << 16);
    let script = async move {
        server
            .write_all(&greeting(
                NBD_INIT_MAGIC,
                NBD_OPTS_MAGIC,
                NBD_FLAG_FIXED_NEWSTYLE,
            ))
            .await
            .unwrap();
        let mut buf = [0u8; 4 + 16];
        server.read_exact(&mut buf).await.unwrap();
        server
            .write_all(&option_reply(NBD_OPT_STRUCTURED_REPLY, NBD_REP_ACK, &[]))
            .await
            .unwrap();
        let mut head = [0u8; 16];
        server.read_exact(&mut head).await.unwrap();
        let len = u32::from_be_bytes(head[12..16].try_into().unwrap());
        let mut data = vec![0u8; len as usize];
        server.read_exact(&mut data).await.unwrap();
        let mut ctx = 1u32.to_be_bytes().to_vec();
        ctx.extend_from_slice(b"qemu:allocation-depth");
        server
            .write_all(&option_reply(
                NBD_OPT_SET_META_CONTEXT,
                NBD_REP_META_CONTEXT,
                &ctx,
            ))
            .await
            .unwrap();
        server
    };
    let contexts = [BASE_ALLOCATION.to_owned()];
    let (r, _s) = tokio::join!(
        NbdClient::handshake(client, "exp", &contexts, Duration::from_secs(5)),
        script
    );
    is_protocol(r, "not asked for");

    // A server that never answers.
    let (client, _server) = tokio::io::duplex(1 << 16);
    let r = NbdClient::handshake(client, "exp", &[], Duration::from_millis(50)).await;
    assert!(matches!(r, Err(NbdError::Timeout(_))), "{r:?}");
}

#[test]
fn bitmap_classification() {
    let bm = |name: &str, recording, inconsistent| BitmapInfo {
        name: name.into(),
        recording,
        inconsistent,
    };
    assert_eq!(
        classify("n", &[bm("other", true, false)]),
        BitmapState::Absent
    );
    assert_eq!(
        classify("n", &[bm("lifeboat-3", true, false)]),
        BitmapState::Active {
            active: 3,
            frozen: vec![]
        }
    );
    assert_eq!(
        classify(
            "n",
            &[
                bm("lifeboat-3", false, false),
                bm("lifeboat-4", true, false)
            ]
        ),
        BitmapState::Active {
            active: 4,
            frozen: vec![3]
        }
    );
    assert!(
        matches!(classify("n", &[bm("lifeboat-3", false, true)]), BitmapState::Lost(w) if w.contains("inconsistent"))
    );
    assert!(
        matches!(classify("n", &[bm("lifeboat-3", false, false)]), BitmapState::Lost(w) if w.contains("recording"))
    );
    assert_eq!(bitmap_cycle("lifeboat-12"), Some(12));
    assert_eq!(bitmap_cycle("lifeboat-x"), None);
    assert_eq!(file_stem("ns/vm 1"), "ns_vm_1");
}

#[test]
fn qmp_errors_map_to_backend_errors() {
    let cmd = |class: &str, desc: &str| qmp::QmpError::Command {
        command: "blockdev-del".into(),
        class: class.into(),
        desc: desc.into(),
    };
    let disk = Some(("data", "drive0"));
    assert!(matches!(
        cmd(
            "GenericError",
            "Failed to find node with node-name='drive0'"
        )
        .into_backend("vm", "x", disk),
        BackendError::DiskNotFound { .. }
    ));
    assert!(matches!(
        cmd("GenericError", "Node 'drive0' not found").into_backend("vm", "x", disk),
        BackendError::DiskNotFound { .. }
    ));
    assert!(matches!(
        cmd(
            "GenericError",
            "Bitmap 'lifeboat-1' is currently in use by another operation and cannot be used"
        )
        .into_backend("vm", "x", disk),
        BackendError::Transient { .. }
    ));
    assert!(matches!(
        cmd("GenericError", "Dirty bitmap 'x' not found").into_backend("vm", "x", disk),
        BackendError::Permanent { .. }
    ));
    let timeout = qmp::QmpError::Timeout {
        command: "x".into(),
        socket: "/q".into(),
        timeout: Duration::from_secs(1),
    };
    assert!(timeout.into_backend("vm", "x", None).is_recoverable());
}

#[tokio::test]
#[ignore = "a measurement, not a test: cargo test -p lifeboat-agent --release qemu::tests::read_throughput -- --ignored --nocapture"]
async fn read_throughput() {
    let tmp = tempfile::tempdir().unwrap();
    let size = 512 * MIB;
    let qsd = Qsd::start(tmp.path(), &[("disk0", size)]);
    let hv = qsd.hypervisor();
    let disks = qsd.disk_refs();
    hv.start_tracking(&disks).await.unwrap();
    let writes: Vec<String> = (0..size / (32 * MIB))
        .map(|i| format!("write -P {} {}M 32M", i + 1, i * 32))
        .collect();
    let writes: Vec<&str> = writes.iter().map(String::as_str).collect();
    qsd.guest("disk0", &writes).await;
    let view = open(&hv, &disks, 1).await;
    let socket = qsd.nbd.clone().unwrap();
    for (request, window) in [
        (32 << 20, 1),
        (4 << 20, 4),
        (DEFAULT_READ_REQUEST_BYTES, DEFAULT_WINDOW),
        (512 << 10, 16),
    ] {
        let mut c = NbdClient::connect_unix(&socket, "lbx-1-0", &[], Duration::from_secs(30))
            .await
            .unwrap();
        c.set_read_request_bytes(request);
        c.set_window(window);
        let t = Instant::now();
        for chunk in 0..size / (64 * MIB) {
            let data = c.read(chunk * 64 * MIB, 64 * MIB).await.unwrap();
            assert_eq!(data[0], (chunk * 2 + 1) as u8);
        }
        let secs = t.elapsed().as_secs_f64();
        println!(
            "request {:>5} KiB window {window:>2}: {:>6.0} MiB/s",
            request >> 10,
            (size >> 20) as f64 / secs
        );
    }
    view.close(CloseView::Commit).await.unwrap();
}

/// A QMP server stand-in that greets each connection `greetings` times, then answers every
/// command with `{"return": {}}` and its id.
async fn fake_qmp(listener: tokio::net::UnixListener, greetings: usize) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            return;
        };
        tokio::spawn(async move {
            let (r, mut w) = stream.into_split();
            let greeting = b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n";
            for _ in 0..greetings {
                w.write_all(greeting).await.unwrap();
            }
            let mut lines = BufReader::new(r).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let request: serde_json::Value = serde_json::from_str(&line).unwrap();
                let mut reply =
                    serde_json::to_vec(&serde_json::json!({"return": {}, "id": request["id"]}))
                        .unwrap();
                reply.push(b'\n');
                w.write_all(&reply).await.unwrap();
            }
        });
    }
}

#[tokio::test]
async fn a_monitor_that_greets_twice_listens_late_or_drops_a_client_is_still_reached() {
    let tmp = tempfile::tempdir().unwrap();
    // Greeted twice, as QEMU 10 may greet a connection queued behind another client.
    let twice = tmp.path().join("twice.sock");
    tokio::spawn(fake_qmp(tokio::net::UnixListener::bind(&twice).unwrap(), 2));
    let client = qmp::QmpClient::new(&twice, Duration::from_secs(10));
    client
        .execute("query-status", serde_json::Value::Null)
        .await
        .unwrap();

    // Bound but not listening yet (refused), listening 300 ms later.
    let late = tmp.path().join("late.sock");
    let bound = std::os::unix::net::UnixListener::bind(&late).unwrap();
    drop(bound);
    let path = late.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let _ = std::fs::remove_file(&path);
        fake_qmp(tokio::net::UnixListener::bind(&path).unwrap(), 1).await;
    });
    let client = qmp::QmpClient::new(&late, Duration::from_secs(10));
    client
        .execute("query-status", serde_json::Value::Null)
        .await
        .unwrap();

    // The first connection closed before its greeting (a monitor letting another client
    // go), the next one served.
    let closing = tmp.path().join("closing.sock");
    let listener = tokio::net::UnixListener::bind(&closing).unwrap();
    tokio::spawn(async move {
        let (first, _) = listener.accept().await.unwrap();
        drop(first);
        fake_qmp(listener, 1).await;
    });
    let client = qmp::QmpClient::new(&closing, Duration::from_secs(10));
    client
        .execute("query-status", serde_json::Value::Null)
        .await
        .unwrap();

    // A socket nobody listens on stays refused: reported as such within seconds, not
    // after the command's timeout.
    let gone = tmp.path().join("gone.sock");
    drop(std::os::unix::net::UnixListener::bind(&gone).unwrap());
    let client = qmp::QmpClient::new(&gone, Duration::from_secs(30));
    let started = Instant::now();
    match client
        .execute("query-status", serde_json::Value::Null)
        .await
    {
        Err(qmp::QmpError::Connect { source, .. }) => {
            assert_eq!(source.kind(), std::io::ErrorKind::ConnectionRefused);
        }
        other => panic!("expected a refused connection, got {other:?}"),
    }
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
}

/// A seed bitmap is not trusted while the stamp of its point is still beside the raw file: an
/// arming cut short between the bitmap's add and the check of the file after it. Other points'
/// stamps, other bitmaps and other nodes' files do not count.
#[test]
fn a_seed_bitmap_whose_stamp_remains_beside_its_file_is_unchecked() {
    use lifeboat_engine::stamp::{self, FileStamp};
    let tmp = tempfile::tempdir().unwrap();
    let image = tmp.path().join("root.img");
    std::fs::write(&image, vec![0u8; 4096]).unwrap();
    let name = image.to_str().unwrap();
    assert!(
        !unchecked_arming(name, "lifeboat-since-p1"),
        "no stamp: checked"
    );
    stamp::keep_beside(&image, &FileStamp::of(&image, "p1").unwrap()).unwrap();
    assert!(unchecked_arming(name, "lifeboat-since-p1"));
    assert!(
        !unchecked_arming(name, "lifeboat-since-p2"),
        "another point's bitmap"
    );
    assert!(!unchecked_arming(name, "lifeboat-7"), "a cycle's bitmap");
    assert!(
        !unchecked_arming("", "lifeboat-since-p1"),
        "a node without a file"
    );
    assert!(
        !unchecked_arming("json:{\"driver\":\"raw\"}", "lifeboat-since-p1"),
        "a node whose file is not named plainly has no stamp beside it"
    );
    stamp::forget(&image, "p1").unwrap();
    assert!(
        !unchecked_arming(name, "lifeboat-since-p1"),
        "checked once its stamp is used"
    );
}
