//! The QEMU/KVM backend: change tracking with QEMU's persistent dirty bitmaps, point-in-time
//! views by image fleecing, data over NBD. The sequence is the one in
//! `docs/qemu-tracking.md`, run here over QMP with a native NBD client.
//!
//! ```text
//!            start_tracking                open_view(c)  (one QMP transaction, all disks)
//!   disk0 ── lifeboat-0 (recording) ──────── add lifeboat-c, disable lifeboat-p,
//!                                            blockdev-backup sync=none disk0 → lbf-c-0
//!
//!   guest writes ──> disk0 ──copy-before-write──> lbf-c-0 (qcow2 overlay, backing = disk0)
//!                      │                             │
//!                      └ lifeboat-c records          └ NBD export lbx-c-0 with bitmap
//!                                                      lifeboat-p (frozen): the view
//!
//!   close(Commit):  export-del, job-cancel, blockdev-del, rm overlay, remove lifeboat-p
//!   close(Abandon): the same, then merge lifeboat-p into lifeboat-c and remove it
//! ```
//!
//! Names: bitmaps `lifeboat-<cycle>` (the cycle whose view froze it is the next one), seed
//! bitmaps `lifeboat-since-<point>` (the writes since a recovery point: see `view`), fleece
//! nodes `lbf-<cycle>-<i>`, backup jobs `lbj-<cycle>-<i>`, exports `lbx-<cycle>-<i>` (`i`: the
//! disk's index in the view; QEMU caps node names at 31 characters). Anything with these
//! names that no open view of this process owns is a crashed agent's leftover: the next
//! [`QemuHypervisor::tracking`] or `open_view` removes it and merges every frozen bitmap into
//! the running one, so nothing is lost (a half-committed cycle is shipped again).
//!
//! # Tracking state that QEMU cannot report
//! A bitmap added at runtime reaches the qcow2 only when QEMU closes the image cleanly: after
//! a `kill -9` a bitmap stored earlier comes back `inconsistent`, but one added since simply
//! vanishes. So `start_tracking` records the disks it tracks in `<work_dir>/<vm>.tracking.json`,
//! and a tracked disk found without any bitmap is [`Tracking::Lost`], not `Absent`.

// NB: unix sockets (QMP, NBD) and /proc: the backend of Linux nodes only.
#![cfg(unix)]

mod discover;
pub use lifeboat_nbd as nbd;
pub mod qmp;
mod stop;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
mod view;

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is the test failure report
mod tests;

use async_trait::async_trait;
use lifeboat_engine::backend::{
    BackendError, DiskInfo, DiskRef, Hypervisor, Quiesce, SEED_BITMAP_PREFIX, Stopped, Tracking,
    TrackingDurability, View, seed_bitmap_name,
};
use lifeboat_engine::stamp;
use qmp::{GuestAgent, QmpClient, QmpError};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;
use view::{QemuView, ViewDisk};

/// The prefix of the dirty bitmaps this backend owns.
pub const BITMAP_PREFIX: &str = "lifeboat-";
/// The prefix of fleece overlay node names.
pub const FLEECE_NODE_PREFIX: &str = "lbf-";
/// The prefix of backup job ids.
pub const JOB_PREFIX: &str = "lbj-";
/// The prefix of the jobs that format fleece overlays (`blockdev-create`).
pub const CREATE_JOB_PREFIX: &str = "lbc-";
/// The prefix of NBD export ids and names.
pub const EXPORT_PREFIX: &str = "lbx-";
/// The NBD meta context prefix of QEMU dirty bitmaps.
pub const DIRTY_BITMAP_CONTEXT_PREFIX: &str = "qemu:dirty-bitmap:";
/// The longest unix socket path (`sun_path` holds 108 bytes with the NUL).
const MAX_SOCKET_PATH_BYTES: usize = 107;
/// How often teardown polls QEMU for an export or a job to be gone.
const POLL_INTERVAL: Duration = Duration::from_millis(10);

/// The name of the bitmap that starts recording at `cycle`.
pub fn bitmap_name(cycle: u64) -> String {
    format!("{BITMAP_PREFIX}{cycle}")
}

/// The cycle of a bitmap this backend owns.
pub fn bitmap_cycle(name: &str) -> Option<u64> {
    name.strip_prefix(BITMAP_PREFIX)?.parse().ok()
}

/// Settings of a [`QemuHypervisor`] beyond the VM, its QMP socket and a work directory.
#[derive(Clone, Debug)]
pub struct QemuOptions {
    /// The host side of the VM's QEMU guest agent socket; without it views are
    /// crash-consistent only.
    pub guest_agent_socket: Option<PathBuf>,
    /// The unix socket of the NBD server QEMU already runs, if it runs one (QEMU runs at
    /// most one, and QMP cannot tell its address). Without it the backend starts its own on
    /// `<work_dir>/<vm>.nbd.sock` and stops it when its view closes, or, when QEMU already
    /// runs one, finds its unix socket through `/proc` (QEMU's pid from the QMP socket).
    pub nbd_server_socket: Option<PathBuf>,
    /// The limit on each QMP command.
    pub qmp_timeout: Duration,
    /// The limit on each guest agent command (a freeze flushes the guest's file systems).
    pub guest_agent_timeout: Duration,
    /// The limit on each NBD reply.
    pub nbd_timeout: Duration,
}

impl Default for QemuOptions {
    fn default() -> Self {
        Self {
            guest_agent_socket: None,
            nbd_server_socket: None,
            qmp_timeout: Duration::from_secs(30),
            guest_agent_timeout: Duration::from_secs(60),
            nbd_timeout: Duration::from_secs(60),
        }
    }
}

/// One QEMU VM reached over QMP: the [`Hypervisor`] of the `qemu` backend.
///
/// # Assumptions
/// - Only this process drives this VM's `lifeboat-*` bitmaps and `lb*-` nodes.
/// - `work_dir` is persistent, local, writable by the agent and readable and writable by QEMU
///   (fleece overlays live there), and holds one VM's files (names start with the VM's name).
/// - The QMP socket is this backend's own monitor (QEMU serves one client per monitor; under
///   libvirt add a second `-qmp` monitor).
pub struct QemuHypervisor {
    inner: Arc<Inner>,
}

impl fmt::Debug for QemuHypervisor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QemuHypervisor")
            .field("vm", &self.inner.vm)
            .field("qmp", &self.inner.qmp.socket())
            .field("work_dir", &self.inner.work_dir)
            .finish_non_exhaustive()
    }
}

/// What the hypervisor and its views share.
#[derive(Debug)]
struct Inner {
    vm: String,
    qmp: QmpClient,
    work_dir: PathBuf,
    options: QemuOptions,
    guest_agent: Option<GuestAgent>,
    /// Serialises whole operations (open, close, tracking changes) on the VM.
    ops: tokio::sync::Mutex<()>,
    /// The cycle of the view this process has open, if any.
    open_view: StdMutex<Option<u64>>,
}

/// A block node as `query-named-block-nodes` describes it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct NodeInfo {
    name: String,
    size_bytes: u64,
    bitmaps: Vec<BitmapInfo>,
    /// The block driver (`qcow2`, `raw`, `file`, `host_device`, ...).
    driver: String,
    /// The file or device it opens (shared by a format node and its protocol node).
    filename: String,
    read_only: bool,
    /// qcow2's `compat` (`0.10` is v2, which cannot store bitmaps).
    qcow2_compat: Option<String>,
}

/// Drivers of protocol nodes: their offsets are the host file's, not the guest's.
const PROTOCOL_DRIVERS: &[&str] = &[
    "file",
    "host_device",
    "host_cdrom",
    "nbd",
    "iscsi",
    "rbd",
    "nfs",
    "ssh",
    "http",
    "https",
    "null-co",
    "null-aio",
];

/// Whether `node`'s changes can be tracked, and whether the tracking outlives QEMU (pure).
///
/// # Errors
///
/// What to do instead, when tracking this node would record the wrong offsets: a protocol
/// node (the file) under a format node other than raw (qcow2 writes its own clusters there,
/// at host offsets; the guest's disk is the format node above).
fn tracking_durability(node: &NodeInfo, all: &[NodeInfo]) -> Result<TrackingDurability, String> {
    let driver = node.driver.as_str();
    if PROTOCOL_DRIVERS.contains(&driver)
        && let Some(format) = all.iter().find(|n| {
            n.name != node.name
                && n.filename == node.filename
                && !n.filename.is_empty()
                && n.driver != "raw"
                && !PROTOCOL_DRIVERS.contains(&n.driver.as_str())
        })
    {
        return Err(format!(
            "block node {:?} is the {driver} under {} node {:?} ({}): its offsets are the image \
             file's, not the guest's; set the disk's QEMU node to {:?}, the node the guest writes through",
            node.name, format.driver, format.name, node.filename, format.name
        ));
    }
    if driver != "qcow2" {
        return Ok(TrackingDurability::InMemory(format!(
            "a {driver} disk cannot store a dirty bitmap: tracking lives in QEMU's memory, and \
             a restart of QEMU (or a migration) costs a resync of this disk, which sends only the \
             blocks that differ"
        )));
    }
    if node.read_only {
        return Ok(TrackingDurability::InMemory(
            "the qcow2 image is open read-only, so its bitmaps cannot be stored".into(),
        ));
    }
    if node.qcow2_compat.as_deref() == Some("0.10") {
        return Ok(TrackingDurability::InMemory(format!(
            "qcow2 v2 (compat 0.10) cannot store bitmaps: `qemu-img amend -o compat=1.1 {}` \
             while the VM is off makes tracking survive restarts",
            node.filename
        )));
    }
    Ok(TrackingDurability::Persistent)
}

/// A dirty bitmap of a node.
#[derive(Clone, Debug, PartialEq, Eq)]
struct BitmapInfo {
    name: String,
    recording: bool,
    inconsistent: bool,
}

/// What a node's `lifeboat-*` bitmaps say.
#[derive(Clone, Debug, PartialEq, Eq)]
enum BitmapState {
    /// None.
    Absent,
    /// One recording bitmap (the running epoch) and frozen ones to fold into it (a view's,
    /// or a crashed agent's leftovers).
    Active { active: u64, frozen: Vec<u64> },
    /// The bitmaps cannot be trusted.
    Lost(String),
}

/// Classify a node's bitmaps (pure).
fn classify(node: &str, bitmaps: &[BitmapInfo]) -> BitmapState {
    let mut ours: Vec<(u64, &BitmapInfo)> = bitmaps
        .iter()
        .filter_map(|b| bitmap_cycle(&b.name).map(|c| (c, b)))
        .collect();
    ours.sort_by_key(|(c, _)| *c);
    if ours.is_empty() {
        return BitmapState::Absent;
    }
    if let Some((_, b)) = ours.iter().find(|(_, b)| b.inconsistent) {
        return BitmapState::Lost(format!(
            "dirty bitmap {} on node {node:?} is inconsistent: QEMU stopped without saving it (killed or crashed)",
            b.name
        ));
    }
    let Some(&(active, _)) = ours.iter().rev().find(|(_, b)| b.recording) else {
        let names: Vec<&str> = ours.iter().map(|(_, b)| b.name.as_str()).collect();
        return BitmapState::Lost(format!(
            "no lifeboat bitmap on node {node:?} is recording ({})",
            names.join(", ")
        ));
    };
    let frozen = ours
        .iter()
        .map(|(c, _)| *c)
        .filter(|c| *c != active)
        .collect();
    BitmapState::Active { active, frozen }
}

fn parse_nodes(value: &Value) -> Vec<NodeInfo> {
    let Some(list) = value.as_array() else {
        return Vec::new();
    };
    list.iter()
        .filter_map(|n| {
            let name = n.get("node-name")?.as_str()?.to_owned();
            let size_bytes = n
                .get("image")
                .and_then(|i| i.get("virtual-size"))
                .and_then(Value::as_u64)
                .unwrap_or(0);
            let flag = |b: &Value, k: &str| b.get(k).and_then(Value::as_bool).unwrap_or(false);
            let text = |k: &str| {
                n.get(k)
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned()
            };
            let qcow2_compat = n
                .pointer("/image/format-specific/data/compat")
                .and_then(Value::as_str)
                .map(str::to_owned);
            let bitmaps = n
                .get("dirty-bitmaps")
                .and_then(Value::as_array)
                .map(|bs| {
                    bs.iter()
                        .filter_map(|b| {
                            Some(BitmapInfo {
                                name: b.get("name")?.as_str()?.to_owned(),
                                recording: flag(b, "recording"),
                                inconsistent: flag(b, "inconsistent"),
                            })
                        })
                        .collect()
                })
                .unwrap_or_default();
            Some(NodeInfo {
                name,
                size_bytes,
                bitmaps,
                driver: text("drv"),
                filename: text("file"),
                read_only: flag(n, "ro"),
                qcow2_compat,
            })
        })
        .collect()
}

/// A file-name-safe form of the VM's name.
fn file_stem(vm: &str) -> String {
    vm.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

impl QemuHypervisor {
    /// The VM `vm_name` whose QMP monitor listens on `qmp_socket_path`; fleece overlays, the
    /// NBD socket and the tracking record go to `work_dir`. Default [`QemuOptions`]: no guest
    /// agent (views are crash-consistent), an NBD server of its own.
    pub fn new(
        vm_name: impl Into<String>,
        qmp_socket_path: impl Into<PathBuf>,
        work_dir: impl Into<PathBuf>,
    ) -> Self {
        Self::with_options(vm_name, qmp_socket_path, work_dir, QemuOptions::default())
    }

    /// Like [`QemuHypervisor::new`], with every setting.
    pub fn with_options(
        vm_name: impl Into<String>,
        qmp_socket_path: impl Into<PathBuf>,
        work_dir: impl Into<PathBuf>,
        options: QemuOptions,
    ) -> Self {
        let guest_agent = options
            .guest_agent_socket
            .as_ref()
            .map(|s| GuestAgent::new(s.clone(), options.guest_agent_timeout));
        Self {
            inner: Arc::new(Inner {
                vm: vm_name.into(),
                qmp: QmpClient::new(qmp_socket_path, options.qmp_timeout),
                work_dir: work_dir.into(),
                guest_agent,
                options,
                ops: tokio::sync::Mutex::new(()),
                open_view: StdMutex::new(None),
            }),
        }
    }
}

/// A disk of the VM resolved to its block node.
#[derive(Clone, Debug)]
struct Resolved {
    disk: String,
    node: String,
    size_bytes: u64,
    state: BitmapState,
    format: String,
    durability: TrackingDurability,
    /// The node's seed bitmap ([`seed_bitmap_name`]) that still records and can be trusted,
    /// if it has one.
    seed: Option<String>,
    /// Every seed bitmap of the node, trusted or not.
    seeds: Vec<String>,
    /// The host file of a raw node (a `raw` format node or a `file` node, named by a plain
    /// file name): where a reflinked twin ([`lifeboat_engine::twin`]) may record its writes.
    raw_file: Option<PathBuf>,
}

impl Resolved {
    fn info(&self) -> DiskInfo {
        DiskInfo {
            name: self.disk.clone(),
            size_bytes: self.size_bytes,
            format: self.format.clone(),
            durability: self.durability.clone(),
        }
    }
}

/// Whether seed bitmap `seed` of the node whose file is `filename` is one [`arm_seed`] added
/// and has not checked yet (its stamp still beside the file: an agent that stopped, or a QMP
/// command that failed, between the two): not to be trusted until it is checked. Looks at the
/// folder only for a node with a seed bitmap, rare outside a re-protect's first view.
fn unchecked_arming(filename: &str, seed: &str) -> bool {
    let Some(point) = seed.strip_prefix(SEED_BITMAP_PREFIX) else {
        return false;
    };
    if filename.is_empty() || filename.starts_with("json:") {
        return false;
    }
    // NB: a folder that cannot be read is taken to hold the stamp.
    stamp::beside(Path::new(filename))
        .map_or(true, |stamps| stamps.iter().any(|s| s.point == point))
}

/// For each point the raw file of `r` has a reflinked twin of ([`lifeboat_engine::twin`]), the
/// ranges written since; none for a disk that is not a raw file of the disk's size (a raw node
/// with an offset or a size of its own: its file's offsets are not the guest's), and none
/// (compared in full) when a map cannot be read.
async fn twin_changes(inner: &Inner, r: &Resolved) -> Vec<(String, Vec<std::ops::Range<u64>>)> {
    let Some(file) = r.raw_file.clone() else {
        return Vec::new();
    };
    let size = r.size_bytes;
    let found = tokio::task::spawn_blocking(move || {
        use lifeboat_engine::twin;
        if std::fs::metadata(&file).map(|m| m.len()).ok() != Some(size) {
            return Ok(Vec::new());
        }
        let mut found = Vec::new();
        for point in twin::points(&file)? {
            if let Some(changed) = twin::changed_since(&file, &point)? {
                found.push((point, changed));
            }
        }
        Ok::<_, std::io::Error>(found)
    })
    .await;
    let why = match found {
        Ok(Ok(found)) => return found,
        Ok(Err(e)) => e.to_string(),
        Err(e) => e.to_string(),
    };
    tracing::warn!(vm = %inner.vm, disk = %r.disk, error = %why, "the raw image's twin cannot be compared: a re-protect compares the disk in full");
    Vec::new()
}

impl Inner {
    /// Run a QMP command; map its failure to the backend's error.
    async fn qmp(
        &self,
        command: &str,
        args: Value,
        disk: Option<(&str, &str)>,
    ) -> Result<Value, BackendError> {
        self.qmp
            .execute(command, args)
            .await
            .map_err(|e| e.into_backend(&self.vm, command, disk))
    }

    /// Add bitmap `name` to the node of disk `r`, `persistent` (stored in a qcow2 image) or
    /// not (kept while this QEMU runs).
    async fn add_bitmap(
        &self,
        r: &Resolved,
        name: &str,
        persistent: bool,
    ) -> Result<(), BackendError> {
        let args = json!({ "node": r.node, "name": name, "persistent": persistent });
        let ctx = Some((r.disk.as_str(), r.node.as_str()));
        self.qmp("block-dirty-bitmap-add", args, ctx)
            .await
            .map(drop)
    }

    /// Remove bitmap `name` from the node of disk `r`.
    async fn remove_bitmap(&self, r: &Resolved, name: &str) -> Result<(), BackendError> {
        let args = json!({ "node": r.node, "name": name });
        let ctx = Some((r.disk.as_str(), r.node.as_str()));
        self.qmp("block-dirty-bitmap-remove", args, ctx)
            .await
            .map(drop)
    }

    /// Run a QMP command; keep the raw error for callers that tolerate some.
    async fn qmp_raw(&self, command: &str, args: Value) -> Result<Value, QmpError> {
        self.qmp.execute(command, args).await
    }

    fn permanent(&self, action: &str, detail: impl Into<String>) -> BackendError {
        BackendError::Permanent {
            vm: self.vm.clone(),
            action: action.to_owned(),
            detail: detail.into(),
        }
    }

    fn open_cycle(&self) -> Option<u64> {
        *self.open_view.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set_open_cycle(&self, cycle: Option<u64>) {
        *self.open_view.lock().unwrap_or_else(|p| p.into_inner()) = cycle;
    }

    fn refuse_if_open(&self, action: &str) -> Result<(), BackendError> {
        match self.open_cycle() {
            Some(c) => Err(self.permanent(
                action,
                format!("the view of cycle {c} is still open: close it first"),
            )),
            None => Ok(()),
        }
    }

    async fn nodes(&self) -> Result<Vec<NodeInfo>, BackendError> {
        Ok(parse_nodes(
            &self
                .qmp("query-named-block-nodes", json!({ "flat": true }), None)
                .await?,
        ))
    }

    /// Find each disk's node; a disk without a node name or whose node is missing is
    /// [`BackendError::DiskNotFound`], a node whose changes cannot be tracked as the guest's
    /// is [`BackendError::Permanent`] naming the node to use instead.
    async fn resolve(&self, disks: &[DiskRef]) -> Result<Vec<Resolved>, BackendError> {
        let nodes = self.nodes().await?;
        disks
            .iter()
            .map(|d| {
                let node = d
                    .node
                    .as_deref()
                    .ok_or_else(|| BackendError::DiskNotFound {
                        vm: self.vm.clone(),
                        disk: d.name.clone(),
                        detail: format!("no QEMU block node name given for image {}", d.path),
                    })?;
                let info = nodes.iter().find(|n| n.name == node).ok_or_else(|| {
                    BackendError::DiskNotFound {
                        vm: self.vm.clone(),
                        disk: d.name.clone(),
                        detail: format!(
                            "QEMU (QMP {}) has no block node {node:?} (image {})",
                            self.qmp.socket().display(),
                            d.path
                        ),
                    }
                })?;
                let durability = tracking_durability(info, &nodes).map_err(|detail| {
                    self.permanent(&format!("track the changes of disk {:?}", d.name), detail)
                })?;
                Ok(Resolved {
                    disk: d.name.clone(),
                    node: node.to_owned(),
                    size_bytes: info.size_bytes,
                    state: classify(node, &info.bitmaps),
                    format: info.driver.clone(),
                    durability,
                    seed: info
                        .bitmaps
                        .iter()
                        .find(|b| {
                            b.name.starts_with(SEED_BITMAP_PREFIX)
                                && b.recording
                                && !b.inconsistent
                                && !unchecked_arming(&info.filename, &b.name)
                        })
                        .map(|b| b.name.clone()),
                    seeds: info
                        .bitmaps
                        .iter()
                        .filter(|b| b.name.starts_with(SEED_BITMAP_PREFIX))
                        .map(|b| b.name.clone())
                        .collect(),
                    // NB: a `json:` name means options beyond the file (an offset, say):
                    // the file's offsets may not be the guest's.
                    raw_file: (matches!(info.driver.as_str(), "raw" | "file")
                        && !info.filename.is_empty()
                        && !info.filename.starts_with("json:"))
                    .then(|| PathBuf::from(&info.filename)),
                })
            })
            .collect()
    }

    fn fleece_path(&self, fleece_node: &str) -> PathBuf {
        self.work_dir
            .join(format!("{}.{fleece_node}.qcow2", file_stem(&self.vm)))
    }

    fn nbd_socket_path(&self) -> PathBuf {
        self.work_dir
            .join(format!("{}.nbd.sock", file_stem(&self.vm)))
    }

    fn tracking_record_path(&self) -> PathBuf {
        self.work_dir
            .join(format!("{}.tracking.json", file_stem(&self.vm)))
    }

    /// The disks `start_tracking` recorded (name → node).
    async fn tracked(&self) -> Result<BTreeMap<String, String>, BackendError> {
        let path = self.tracking_record_path();
        match tokio::fs::read(&path).await {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                self.permanent(
                    "read the tracking record",
                    format!("{}: {e}", path.display()),
                )
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
            Err(e) => Err(self.permanent(
                "read the tracking record",
                format!("{}: {e}", path.display()),
            )),
        }
    }

    async fn write_tracked(&self, tracked: &BTreeMap<String, String>) -> Result<(), BackendError> {
        let path = self.tracking_record_path();
        let tmp = path.with_extension("json.tmp");
        let fail = |e: std::io::Error| {
            self.permanent(
                "write the tracking record",
                format!("{}: {e}", path.display()),
            )
        };
        let bytes =
            serde_json::to_vec_pretty(tracked).map_err(|e| fail(std::io::Error::other(e)))?;
        tokio::fs::create_dir_all(&self.work_dir)
            .await
            .map_err(fail)?;
        tokio::fs::write(&tmp, bytes).await.map_err(fail)?;
        tokio::fs::rename(&tmp, &path).await.map_err(fail)
    }

    /// Wait for job `id` (one QEMU keeps until it is dismissed) to conclude, then dismiss it:
    /// `Ok(None)` when it succeeded, `Ok(Some(why))` with QEMU's words when the job failed.
    ///
    /// # Errors
    ///
    /// QMP failures as [`QmpError::into_backend`] maps them (a timeout is transient), a job
    /// that does not conclude within the QMP timeout (transient: slow storage under the work
    /// directory, a busy QEMU), and one that is gone before it concluded (permanent).
    async fn wait_job_concluded(
        &self,
        id: &str,
        disk: Option<(&str, &str)>,
    ) -> Result<Option<String>, BackendError> {
        let deadline = tokio::time::Instant::now() + self.options.qmp_timeout;
        // NB: formatting an empty overlay takes QEMU about a millisecond: ask again soon,
        // then at the usual interval.
        let mut pause = Duration::from_millis(1);
        loop {
            let jobs = self.qmp("query-jobs", Value::Null, disk).await?;
            let job = jobs
                .as_array()
                .and_then(|l| {
                    l.iter()
                        .find(|j| j.get("id").and_then(Value::as_str) == Some(id))
                })
                .cloned();
            let Some(job) = job else {
                return Err(self.permanent(
                    &format!("wait for job {id}"),
                    "the job is gone before it concluded",
                ));
            };
            if job.get("status").and_then(Value::as_str) == Some("concluded") {
                let _ = self.qmp_raw("job-dismiss", json!({ "id": id })).await;
                return Ok(job.get("error").and_then(Value::as_str).map(str::to_owned));
            }
            if tokio::time::Instant::now() >= deadline {
                // NB: left to finish; the next sweep dismisses it once it has concluded.
                return Err(BackendError::Transient {
                    vm: self.vm.clone(),
                    action: format!("wait for job {id}"),
                    detail: format!("not concluded after {:?}", self.options.qmp_timeout),
                });
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(POLL_INTERVAL);
        }
    }

    /// Poll until `present` says no, or give up after the QMP timeout.
    async fn wait_gone(&self, query: &str, key: &str, id: &str) -> Result<(), BackendError> {
        let deadline = tokio::time::Instant::now() + self.options.qmp_timeout;
        loop {
            let list = self.qmp(query, Value::Null, None).await?;
            let present = list.as_array().is_some_and(|l| {
                l.iter()
                    .any(|e| e.get(key).and_then(Value::as_str) == Some(id))
            });
            if !present {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(BackendError::Transient {
                    vm: self.vm.clone(),
                    action: format!("wait for {id} to leave {query}"),
                    detail: format!("still there after {:?}", self.options.qmp_timeout),
                });
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// Delete an NBD export and wait until QEMU let go of it (tolerates a missing one).
    async fn delete_export(&self, id: &str, hard: bool) -> Result<(), BackendError> {
        let args = if hard {
            json!({ "id": id, "mode": "hard" })
        } else {
            json!({ "id": id })
        };
        match self.qmp_raw("block-export-del", args).await {
            Ok(_) => {}
            // NB: an export already shutting down refuses a second delete; wait for it.
            Err(e) if e.desc().contains("not found") || e.desc().contains("shutting down") => {}
            Err(e) => {
                return Err(e.into_backend(&self.vm, &format!("block-export-del {id}"), None));
            }
        }
        self.wait_gone("query-block-exports", "id", id).await
    }

    /// Cancel a backup job and wait until it is gone (tolerates a missing one).
    async fn cancel_job(&self, id: &str) -> Result<(), BackendError> {
        match self
            .qmp_raw("block-job-cancel", json!({ "device": id, "force": true }))
            .await
        {
            Ok(_) => {}
            // NB: QEMU 10 answers DeviceNotActive "Block job 'x' not found".
            Err(e)
                if e.is_missing_node()
                    || e.desc().contains("not found")
                    || e.desc().contains("No active block job") => {}
            Err(e) => {
                return Err(e.into_backend(&self.vm, &format!("block-job-cancel {id}"), None));
            }
        }
        self.wait_gone("query-block-jobs", "device", id).await
    }

    /// Delete a fleece node and its overlay file (tolerates missing ones).
    async fn delete_fleece(&self, node: &str) -> Result<(), BackendError> {
        match self
            .qmp_raw("blockdev-del", json!({ "node-name": node }))
            .await
        {
            Ok(_) => {}
            Err(e) if e.is_missing_node() => {}
            Err(e) => return Err(e.into_backend(&self.vm, &format!("blockdev-del {node}"), None)),
        }
        remove_file_if_any(&self.fleece_path(node))
            .await
            .map_err(|e| self.permanent("remove the fleece overlay", e))
    }

    /// Remove a crashed agent's exports, jobs, fleece nodes and overlays, then fold frozen
    /// bitmaps into the running ones. Does nothing while this process has a view open.
    async fn sweep_leftovers(&self, disks: &mut [Resolved]) -> Result<(), BackendError> {
        if self.open_cycle().is_some() {
            return Ok(());
        }
        let exports = self.qmp("query-block-exports", Value::Null, None).await?;
        for id in ids_with_prefix(&exports, "id", EXPORT_PREFIX) {
            tracing::warn!(vm = %self.vm, export = %id, "removing a leftover NBD export of an earlier run");
            self.delete_export(&id, true).await?;
        }
        let jobs = self.qmp("query-block-jobs", Value::Null, None).await?;
        for id in ids_with_prefix(&jobs, "device", JOB_PREFIX) {
            tracing::warn!(vm = %self.vm, job = %id, "cancelling a leftover backup job of an earlier run");
            self.cancel_job(&id).await?;
        }
        // A job that formatted an overlay and was not dismissed (a crash while waiting for
        // it): concluded, or about to be; dismissing one still running fails, and it is
        // dismissed at the next sweep.
        let jobs = self.qmp("query-jobs", Value::Null, None).await?;
        for id in ids_with_prefix(&jobs, "id", CREATE_JOB_PREFIX) {
            tracing::warn!(vm = %self.vm, job = %id, "dismissing a leftover overlay job of an earlier run");
            let _ = self.qmp_raw("job-dismiss", json!({ "id": id })).await;
        }
        for node in self
            .nodes()
            .await?
            .into_iter()
            .filter(|n| n.name.starts_with(FLEECE_NODE_PREFIX))
        {
            tracing::warn!(vm = %self.vm, node = %node.name, "deleting a leftover fleece node of an earlier run");
            self.delete_fleece(&node.name).await?;
        }
        self.remove_stale_overlays().await?;
        let mut actions = Vec::new();
        for d in disks.iter() {
            if let BitmapState::Active { active, frozen } = &d.state {
                for f in frozen {
                    tracing::warn!(vm = %self.vm, disk = %d.disk, node = %d.node, bitmap = %bitmap_name(*f),
                        "folding a frozen bitmap of an earlier run into the running one");
                    actions.extend(merge_and_remove(&d.node, *f, *active));
                }
            }
        }
        if !actions.is_empty() {
            self.qmp("transaction", json!({ "actions": actions }), None)
                .await?;
            for d in disks.iter_mut() {
                if let BitmapState::Active { frozen, .. } = &mut d.state {
                    frozen.clear();
                }
            }
        }
        Ok(())
    }

    /// Delete overlay files of this VM that no node uses (a crash between the overlay's
    /// creation and `blockdev-add`).
    async fn remove_stale_overlays(&self) -> Result<(), BackendError> {
        let prefix = format!("{}.{FLEECE_NODE_PREFIX}", file_stem(&self.vm));
        let mut dir = match tokio::fs::read_dir(&self.work_dir).await {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => {
                return Err(self.permanent(
                    "list the work directory",
                    format!("{}: {e}", self.work_dir.display()),
                ));
            }
        };
        let fail = |e: std::io::Error| {
            self.permanent(
                "list the work directory",
                format!("{}: {e}", self.work_dir.display()),
            )
        };
        while let Some(entry) = dir.next_entry().await.map_err(fail)? {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with(&prefix) && name.ends_with(".qcow2") {
                remove_file_if_any(&entry.path())
                    .await
                    .map_err(|e| self.permanent("remove a stale overlay", e))?;
            }
        }
        Ok(())
    }

    /// The NBD server to export views on, and whether this call started it.
    async fn ensure_nbd_server(&self) -> Result<(PathBuf, bool), BackendError> {
        if let Some(p) = &self.options.nbd_server_socket {
            return Ok((p.clone(), false));
        }
        let path = self.nbd_socket_path();
        if path.as_os_str().len() > MAX_SOCKET_PATH_BYTES {
            return Err(self.permanent(
                "start the NBD server",
                format!("socket path {} is longer than {MAX_SOCKET_PATH_BYTES} bytes: use a shorter work_dir", path.display()),
            ));
        }
        let args = json!({ "addr": { "type": "unix", "data": { "path": path } } });
        match self.qmp_raw("nbd-server-start", args).await {
            Ok(_) => Ok((path, true)),
            // NB: QEMU runs one NBD server and QMP cannot tell where it listens. One on our
            // own path is ours (an earlier view's that a crash left running: stop it when
            // idle); another one is looked for through /proc (see `discover`).
            Err(e) if e.desc().contains("already running") && path.exists() => Ok((path, true)),
            Err(e) if e.desc().contains("already running") => match self.discover_nbd_server().await {
                Ok(found) => {
                    tracing::info!(vm = %self.vm, socket = %found.display(), "exporting views on QEMU's running NBD server");
                    Ok((found, false))
                }
                Err(why) => Err(self.permanent(
                    "start the NBD server",
                    format!(
                        "QEMU already runs an NBD server that Lifeboat did not start and QMP cannot tell its \
                         address ({why}): give its unix socket as QemuOptions::nbd_server_socket"
                    ),
                )),
            },
            Err(e) => Err(e.into_backend(&self.vm, "nbd-server-start", None)),
        }
    }

    /// The unix socket of the NBD server QEMU runs, found through `/proc`.
    async fn discover_nbd_server(&self) -> Result<PathBuf, String> {
        let pid = self
            .qmp
            .peer_pid()
            .ok_or("the QMP socket does not tell QEMU's pid")?;
        let probe = self.options.nbd_timeout.min(Duration::from_secs(1));
        discover::nbd_server_of(pid, self.qmp.socket(), probe)
            .await?
            .ok_or_else(|| {
                format!("no listening unix socket of QEMU (pid {pid}) greets as an NBD server")
            })
    }

    /// Stop the NBD server this backend started, once no export is left on it.
    async fn stop_nbd_server_if_idle(&self) -> Result<(), BackendError> {
        let exports = self.qmp("query-block-exports", Value::Null, None).await?;
        let nbd_exports = exports.as_array().is_some_and(|l| {
            l.iter()
                .any(|e| e.get("type").and_then(Value::as_str) == Some("nbd"))
        });
        if !nbd_exports {
            match self.qmp_raw("nbd-server-stop", Value::Null).await {
                Ok(_) => {}
                Err(e) if e.desc().contains("not running") => {}
                Err(e) => return Err(e.into_backend(&self.vm, "nbd-server-stop", None)),
            }
        }
        Ok(())
    }
}

async fn remove_file_if_any(path: &Path) -> Result<(), String> {
    match tokio::fs::remove_file(path).await {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

fn ids_with_prefix(list: &Value, key: &str, prefix: &str) -> Vec<String> {
    list.as_array()
        .map(|l| {
            l.iter()
                .filter_map(|e| e.get(key).and_then(Value::as_str))
                .filter(|id| id.starts_with(prefix))
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

/// Transaction actions that fold bitmap `from` into `into` and remove `from`.
fn merge_and_remove(node: &str, from: u64, into: u64) -> [Value; 2] {
    [
        json!({ "type": "block-dirty-bitmap-merge",
                "data": { "node": node, "target": bitmap_name(into), "bitmaps": [bitmap_name(from)] } }),
        json!({ "type": "block-dirty-bitmap-remove", "data": { "node": node, "name": bitmap_name(from) } }),
    ]
}

#[async_trait]
impl Hypervisor for QemuHypervisor {
    fn vm(&self) -> &str {
        &self.inner.vm
    }

    async fn inspect(&self, disks: &[DiskRef]) -> Result<Vec<DiskInfo>, BackendError> {
        Ok(self
            .inner
            .resolve(disks)
            .await?
            .into_iter()
            .map(|r| r.info())
            .collect())
    }

    async fn tracking(&self, disks: &[DiskRef]) -> Result<Vec<Tracking>, BackendError> {
        let inner = &self.inner;
        let _ops = inner.ops.lock().await;
        let mut resolved = inner.resolve(disks).await?;
        inner.sweep_leftovers(&mut resolved).await?;
        let tracked = inner.tracked().await?;
        Ok(resolved
            .into_iter()
            .map(|r| match r.state {
                BitmapState::Active { .. } => Tracking::Active,
                BitmapState::Lost(why) => Tracking::Lost(why),
                BitmapState::Absent if tracked.contains_key(&r.disk) => {
                    Tracking::Lost(match &r.durability {
                        TrackingDurability::InMemory(_) => format!(
                            "node {:?} ({}) has no lifeboat bitmap although tracking was started: \
                             its bitmap lived in QEMU's memory, and QEMU restarted (or crashed, or \
                             the VM migrated) since",
                            r.node, r.format
                        ),
                        TrackingDurability::Persistent => format!(
                            "node {:?} has no lifeboat bitmap although tracking was started: QEMU \
                             stopped without saving it (killed or crashed) or the disk was replaced",
                            r.node
                        ),
                    })
                }
                BitmapState::Absent => Tracking::Absent,
            })
            .collect())
    }

    async fn start_tracking(&self, disks: &[DiskRef]) -> Result<(), BackendError> {
        let inner = &self.inner;
        let _ops = inner.ops.lock().await;
        inner.refuse_if_open("start tracking")?;
        let mut resolved = inner.resolve(disks).await?;
        inner.sweep_leftovers(&mut resolved).await?;
        let mut actions = Vec::new();
        for r in &resolved {
            match &r.state {
                BitmapState::Active { .. } => continue,
                BitmapState::Absent => {}
                BitmapState::Lost(why) => {
                    tracing::warn!(vm = %inner.vm, disk = %r.disk, node = %r.node, reason = %why,
                        "tracking was lost: removing the old bitmaps and starting anew");
                    remove_lifeboat_bitmaps(inner, r).await?;
                }
            }
            if let TrackingDurability::InMemory(why) = &r.durability {
                tracing::info!(vm = %inner.vm, disk = %r.disk, node = %r.node, format = %r.format,
                    "tracking in QEMU's memory only: {why}");
            }
            actions.push(json!({ "type": "block-dirty-bitmap-add",
                "data": { "node": r.node, "name": bitmap_name(0),
                          "persistent": r.durability.survives_restart() } }));
        }
        if !actions.is_empty() {
            inner
                .qmp("transaction", json!({ "actions": actions }), None)
                .await?;
        }
        let mut tracked = inner.tracked().await?;
        let before = tracked.clone();
        for r in &resolved {
            tracked.insert(r.disk.clone(), r.node.clone());
        }
        if tracked != before {
            inner.write_tracked(&tracked).await?;
        }
        Ok(())
    }

    async fn open_view(
        &self,
        disks: &[DiskRef],
        cycle: u64,
        quiesce: Quiesce,
    ) -> Result<Box<dyn View>, BackendError> {
        let inner = &self.inner;
        let _ops = inner.ops.lock().await;
        inner.refuse_if_open("open a view")?;
        let mut resolved = inner.resolve(disks).await?;
        inner.sweep_leftovers(&mut resolved).await?;
        let mut parts = Vec::with_capacity(resolved.len());
        for (i, r) in resolved.iter().enumerate() {
            let active = match &r.state {
                BitmapState::Active { active, .. } => *active,
                BitmapState::Absent => {
                    return Err(inner.permanent(
                        "open a view",
                        format!(
                            "disk {:?} (node {:?}) is not tracked: start tracking first",
                            r.disk, r.node
                        ),
                    ));
                }
                BitmapState::Lost(why) => {
                    return Err(inner.permanent(
                        "open a view",
                        format!(
                            "tracking of disk {:?} is lost ({why}): start tracking anew and resync",
                            r.disk
                        ),
                    ));
                }
            };
            if active == cycle {
                return Err(inner.permanent(
                    "open a view",
                    format!(
                        "bitmap {} on node {:?} (disk {:?}) already records the running epoch: \
                         give open_view a new cycle number",
                        bitmap_name(cycle),
                        r.node,
                        r.disk
                    ),
                ));
            }
            let fleece_node = format!("{FLEECE_NODE_PREFIX}{cycle}-{i}");
            let mut part = ViewDisk::new(
                r,
                active,
                cycle,
                inner.fleece_path(&fleece_node),
                fleece_node,
                format!("{JOB_PREFIX}{cycle}-{i}"),
                format!("{EXPORT_PREFIX}{cycle}-{i}"),
            );
            // NB: before the cut, with the bitmap it freezes recording already: see
            // `ViewDisk::twin_changes`.
            part.twin_changes = twin_changes(inner, r).await;
            parts.push(part);
        }
        inner.set_open_cycle(Some(cycle));
        let mut view = QemuView::new(Arc::clone(inner), cycle, parts);
        match view.open(quiesce).await {
            Ok(()) => Ok(Box::new(view)),
            Err(e) => {
                tracing::warn!(vm = %inner.vm, cycle, error = %e, "opening the view failed: rolling back");
                if let Err(undo) = view
                    .finish(lifeboat_engine::backend::CloseView::Abandon)
                    .await
                {
                    tracing::error!(vm = %inner.vm, cycle, error = %undo,
                        "rolling back the view failed: the next tracking() or open_view() sweeps what is left");
                }
                Err(e)
            }
        }
    }

    async fn stop_tracking(&self, disks: &[DiskRef]) -> Result<(), BackendError> {
        let inner = &self.inner;
        let _ops = inner.ops.lock().await;
        inner.refuse_if_open("stop tracking")?;
        let mut resolved = inner.resolve(disks).await?;
        inner.sweep_leftovers(&mut resolved).await?;
        for r in &resolved {
            remove_lifeboat_bitmaps(inner, r).await?;
        }
        let mut tracked = inner.tracked().await?;
        let before = tracked.len();
        for r in &resolved {
            tracked.remove(&r.disk);
        }
        if tracked.len() != before {
            inner.write_tracked(&tracked).await?;
        }
        Ok(())
    }

    async fn stop_vm(&self, disks: &[DiskRef], grace: Duration) -> Result<Stopped, BackendError> {
        let _ops = self.inner.ops.lock().await;
        self.inner.stop_vm(disks, grace).await
    }

    /// A persistent, recording seed bitmap on every disk whose tracking survives a restart
    /// (a writable qcow2 v3); older seeds removed first. QEMU writes it into the image when it
    /// closes it cleanly; killed, QEMU leaves no such bitmap (or an inconsistent one), and
    /// whoever reads it next compares the whole disk instead.
    async fn mark_point(&self, disks: &[DiskRef], point: &str) -> Result<bool, BackendError> {
        let inner = &self.inner;
        let _ops = inner.ops.lock().await;
        inner.refuse_if_open("mark a recovery point")?;
        let resolved = inner.resolve(disks).await?;
        let name = seed_bitmap_name(point);
        let mut all = true;
        for r in &resolved {
            for old in &r.seeds {
                inner.remove_bitmap(r, old).await?;
            }
            if !r.durability.survives_restart() {
                all = false;
                continue;
            }
            inner.add_bitmap(r, &name, true).await?;
        }
        Ok(all)
    }

    /// A non-persistent seed bitmap on each raw file node whose file still has the stamp a
    /// failover or failback kept beside it (`arm_seed`): QEMU records the guest's writes
    /// from the bitmap's creation on, and the stamp, checked again after it, says nothing
    /// wrote the file before. A stamp is used once (removed when armed, and when the file no
    /// longer matches it); the bitmap lives as long as this QEMU process.
    async fn arm_seeds(&self, disks: &[DiskRef]) -> Result<Vec<String>, BackendError> {
        // NB: QMP only when a disk's file has a stamp beside it and QEMU listens: most looks
        // find neither, and a VM not started yet (no socket, or one an old QEMU left behind)
        // would cost the client's retries of a refused connection.
        let paths: Vec<PathBuf> = disks.iter().map(|d| PathBuf::from(&d.path)).collect();
        let stamped = tokio::task::spawn_blocking(move || {
            paths.iter().any(|p| {
                std::fs::metadata(p).is_ok_and(|m| m.is_file())
                    && stamp::beside(p).is_ok_and(|s| !s.is_empty())
            })
        })
        .await
        .unwrap_or(false);
        if !stamped {
            return Ok(Vec::new());
        }
        // NB: a connection of this client's own stands for QEMU's answer; a probe beside it
        // would only wait in QEMU's queue of one monitor client at a time.
        if !self.inner.qmp.connected().await
            && tokio::net::UnixStream::connect(self.inner.qmp.socket())
                .await
                .is_err()
        {
            return Ok(Vec::new());
        }
        let inner = &self.inner;
        let _ops = inner.ops.lock().await;
        if inner.open_cycle().is_some() {
            return Ok(Vec::new());
        }
        let mut armed = Vec::new();
        for r in inner.resolve(disks).await? {
            let Some(file) = r.raw_file.clone() else {
                continue;
            };
            if arm_seed(inner, &r, &file).await? {
                armed.push(r.disk.clone());
            }
        }
        Ok(armed)
    }
}

/// [`QemuHypervisor::arm_seeds`] for one raw node `r` whose file is `file`: whether a seed
/// bitmap records now, checked.
///
/// Each stamp beside the file is used once: when the file still matches it, a seed bitmap for
/// its point is added (unless one was added before and not checked: an agent that stopped,
/// or a command that failed, in between), the file is checked against it again, and the
/// stamp is removed; a bitmap whose check failed is removed first. Until its stamp is gone a
/// bitmap is not trusted ([`unchecked_arming`]).
async fn arm_seed(inner: &Inner, r: &Resolved, file: &Path) -> Result<bool, BackendError> {
    let owned = file.to_owned();
    let stamps = tokio::task::spawn_blocking(move || stamp::beside(&owned).unwrap_or_default())
        .await
        .unwrap_or_default();
    let mut armed = false;
    for kept in stamps {
        let name = seed_bitmap_name(&kept.point);
        // NB: a file of another length than the node's has offsets that are not the guest's.
        let holds = || async {
            kept.len == r.size_bytes && stamp_of(file, &kept.point).await.as_ref() == Some(&kept)
        };
        let added = r.seeds.contains(&name);
        if !added && (armed || r.seed.is_some() || !holds().await) {
            if !armed && r.seed.is_none() {
                tracing::info!(vm = %inner.vm, disk = %r.disk, point = %kept.point, "the raw image was written before its VM's writes could be recorded: a re-protect from the point compares the whole disk");
            }
            forget_stamp(inner, r, file, &kept.point);
            continue;
        }
        if !added {
            inner.add_bitmap(r, &name, false).await?;
        }
        if !armed && holds().await {
            tracing::info!(vm = %inner.vm, disk = %r.disk, point = %kept.point, "the VM's writes since the point are recorded: a re-protect from it reads only those");
            forget_stamp(inner, r, file, &kept.point);
            armed = true;
            continue;
        }
        // NB: written before the bitmap recorded, or as it began to: it may have missed the
        // first writes.
        inner.remove_bitmap(r, &name).await?;
        tracing::info!(vm = %inner.vm, disk = %r.disk, point = %kept.point, "the raw image was written as its VM's writes began to be recorded: a re-protect from the point compares the whole disk");
        forget_stamp(inner, r, file, &kept.point);
    }
    Ok(armed)
}

/// The stamp of the file at `file` for `point` now ([`stamp::FileStamp::of`]).
async fn stamp_of(file: &Path, point: &str) -> Option<stamp::FileStamp> {
    let (file, point) = (file.to_owned(), point.to_owned());
    tokio::task::spawn_blocking(move || stamp::FileStamp::of(&file, &point))
        .await
        .ok()
        .flatten()
}

fn forget_stamp(inner: &Inner, r: &Resolved, file: &Path, point: &str) {
    if let Err(e) = stamp::forget(file, point) {
        tracing::warn!(vm = %inner.vm, disk = %r.disk, error = %e, "the raw image's stamp was not removed");
    }
}

/// Remove every `lifeboat-*` bitmap of a disk (tolerates ones already gone).
async fn remove_lifeboat_bitmaps(inner: &Inner, r: &Resolved) -> Result<(), BackendError> {
    let nodes = inner.nodes().await?;
    let names: Vec<String> = nodes
        .iter()
        .filter(|n| n.name == r.node)
        .flat_map(|n| n.bitmaps.iter())
        .filter(|b| bitmap_cycle(&b.name).is_some())
        .map(|b| b.name.clone())
        .collect();
    for name in names {
        match inner
            .qmp_raw(
                "block-dirty-bitmap-remove",
                json!({ "node": r.node, "name": name }),
            )
            .await
        {
            Ok(_) => {}
            Err(e) if e.is_missing_bitmap() => {}
            Err(e) => {
                return Err(e.into_backend(
                    &inner.vm,
                    "block-dirty-bitmap-remove",
                    Some((&r.disk, &r.node)),
                ));
            }
        }
    }
    Ok(())
}
