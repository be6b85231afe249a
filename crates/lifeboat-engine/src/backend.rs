//! The seam between the agent's replication engine and a hypervisor: one trait per role, one
//! implementation per hypervisor (`qemu` over QMP and NBD; `hyperv` over WMI and RCT).
//!
//! ```text
//!  engine ──open_view(cycle)──> Hypervisor ──> View (all disks frozen at one instant)
//!    │                                          ├─ changed_extents(disk)   since the last cycle
//!    │                                          ├─ allocated_extents(disk) for a full copy
//!    │                                          ├─ read(disk, offset, len)
//!    └─────────────── close(Commit | Abandon) ──┘
//! ```
//!
//! # Guarantees every implementation gives
//!
//! - `open_view` starts a new tracking epoch and freezes the previous one atomically for all
//!   the VM's disks, so a recovery point is consistent across disks.
//! - `close(Commit)` forgets the frozen epoch's changes (they are safe in a sealed log);
//!   `close(Abandon)` folds them back into the running epoch, so that a failed cycle loses
//!   nothing and the next cycle ships them.
//! - A tracking epoch the hypervisor cannot vouch for (a bitmap left inconsistent by a crash,
//!   a disk modified while tracking was off) is reported as [`Tracking::Lost`], never papered
//!   over: the engine resynchronizes.

use async_trait::async_trait;
use bytes::Bytes;
use std::fmt;
use std::ops::Range;
use std::time::Duration;

/// One disk of a VM as the agent sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskRef {
    /// The disk's name in the ProtectedVM (a DNS label).
    pub name: String,
    /// The image path on the node.
    pub path: String,
    /// The hypervisor's handle for the disk (the QEMU block node name; unused on Hyper-V).
    pub node: Option<String>,
}

/// What the hypervisor says of a disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskInfo {
    /// The disk's name.
    pub name: String,
    /// Its virtual size.
    pub size_bytes: u64,
    /// Its image format as the hypervisor names it (`qcow2`, `raw`, `host_device`, `vhdx`).
    pub format: String,
    /// Whether its change tracking outlives the hypervisor process.
    pub durability: TrackingDurability,
}

/// Whether a disk's change tracking outlives the hypervisor process: said up front, at the
/// prerequisite check, and in the VM's status, because it decides what a restart costs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TrackingDurability {
    /// Kept across a clean restart of the hypervisor (a qcow2 persistent dirty bitmap,
    /// Hyper-V's RCT). A crash still makes it untrustworthy, and a resync follows.
    Persistent,
    /// Held in the hypervisor's memory only (the reason says why, and what would make it
    /// persistent): any restart, crash or migration loses it, the backend reports
    /// [`Tracking::Lost`], and the disk is resynchronized, sending only the blocks that differ.
    InMemory(String),
}

impl TrackingDurability {
    /// Whether the tracking survives a clean restart of the hypervisor.
    pub fn survives_restart(&self) -> bool {
        matches!(self, TrackingDurability::Persistent)
    }
}

/// Whether changes to a disk are being tracked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Tracking {
    /// No tracking set up yet.
    Absent,
    /// Every change since the last committed view is known.
    Active,
    /// Changes may have been missed; the reason says why. The disk needs a resync.
    Lost(String),
}

/// Whether an application-consistent view was asked for and obtained.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Quiesce {
    /// Crash-consistent: as if the VM lost power.
    None,
    /// Ask the guest to quiesce (QEMU guest agent fsfreeze; VSS through a Hyper-V checkpoint).
    Application,
}

/// How a view ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseView {
    /// The view's changes are safely recorded: forget them.
    Commit,
    /// The cycle failed: keep the view's changes for the next cycle.
    Abandon,
}

/// Why a backend call failed.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The VM or its hypervisor endpoint is gone: non-recoverable until someone acts.
    #[error("VM {vm} not found: {detail}")]
    VmNotFound {
        /// The VM.
        vm: String,
        /// What was tried.
        detail: String,
    },
    /// A disk the ProtectedVM names is not attached to the VM, or its image is missing.
    #[error("disk {disk:?} of VM {vm} not found: {detail}")]
    DiskNotFound {
        /// The VM.
        vm: String,
        /// The disk's name.
        disk: String,
        /// What was found instead.
        detail: String,
    },
    /// The hypervisor refused or failed a command that may work later (busy, a transient
    /// socket error).
    #[error("{action} on VM {vm} failed: {detail}")]
    Transient {
        /// The VM.
        vm: String,
        /// What was being done.
        action: String,
        /// The hypervisor's answer.
        detail: String,
    },
    /// The hypervisor failed a command in a way retrying cannot fix (a broken disk chain, an
    /// unsupported image format, access denied).
    #[error("{action} on VM {vm} failed: {detail}")]
    Permanent {
        /// The VM.
        vm: String,
        /// What was being done.
        action: String,
        /// The hypervisor's answer.
        detail: String,
    },
}

impl BackendError {
    /// Whether retrying later can help.
    pub fn is_recoverable(&self) -> bool {
        matches!(self, Self::Transient { .. })
    }

    /// A stable CamelCase reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::VmNotFound { .. } => "VmNotFound",
            Self::DiskNotFound { .. } => "DiskNotFound",
            Self::Transient { .. } => "HypervisorBusy",
            Self::Permanent { .. } => "HypervisorError",
        }
    }
}

/// A point-in-time view of every tracked disk of one VM.
#[async_trait]
pub trait View: Send + Sync + fmt::Debug {
    /// The view's cycle number (the one `open_view` was given).
    fn cycle(&self) -> u64;

    /// Whether the view is application-consistent.
    fn quiesced(&self) -> Quiesce;

    /// The disks in the view, with their sizes.
    fn disks(&self) -> &[DiskInfo];

    /// The ranges of `disk` changed since the previous committed view, sorted and disjoint.
    async fn changed_extents(&self, disk: &str) -> Result<Vec<Range<u64>>, BackendError>;

    /// The ranges of `disk` that may hold data (allocated), sorted and disjoint; the rest
    /// reads as zeros. For a full copy.
    async fn allocated_extents(&self, disk: &str) -> Result<Vec<Range<u64>>, BackendError>;

    /// Read `len` bytes at `offset` of `disk` as of the view.
    async fn read(&self, disk: &str, offset: u64, len: u64) -> Result<Bytes, BackendError>;

    /// Read each of `pieces` (`(offset, len)`) of `disk` as of the view: their data, in order.
    /// A hypervisor whose reads can be in flight together (NBD) overrides this, so that
    /// scattered blocks (a cycle's, a re-protect's) cost about one round trip per batch
    /// rather than one each; by default, one [`View::read`] after another.
    async fn read_many(
        &self,
        disk: &str,
        pieces: &[(u64, u64)],
    ) -> Result<Vec<Bytes>, BackendError> {
        let mut out = Vec::with_capacity(pieces.len());
        for &(offset, len) in pieces {
            out.push(self.read(disk, offset, len).await?);
        }
        Ok(out)
    }

    /// The ranges of `disk` written since recovery point `point`, when the disk carries a
    /// record of them that held until this view (a [`seed_bitmap_name`] bitmap: a failover's
    /// qcow2 output, or a source marked by [`Hypervisor::mark_point`]); None when it has no
    /// such record, or one that cannot be trusted. Sorted and disjoint. A re-protect from
    /// `point` sends these blocks instead of comparing the whole disk.
    async fn changed_since(
        &self,
        disk: &str,
        point: &str,
    ) -> Result<Option<Vec<Range<u64>>>, BackendError> {
        let _ = (disk, point);
        Ok(None)
    }

    /// End the view: commit its changes as shipped, or abandon them to the next cycle.
    async fn close(self: Box<Self>, how: CloseView) -> Result<(), BackendError>;
}

/// The name of the dirty bitmap that records a disk's writes since recovery point `point`:
/// made (enabled, persistent) on a qcow2 failover disk before the recovered VM first runs, and
/// on a planned failover's stopped source disks; read by the re-protect and the failback that
/// start from `point`.
pub fn seed_bitmap_name(point: &str) -> String {
    format!("{SEED_BITMAP_PREFIX}{point}")
}

/// The prefix of [`seed_bitmap_name`]s.
pub const SEED_BITMAP_PREFIX: &str = "lifeboat-since-";

/// Merge touching or overlapping ranges of a list in any order: [`merge_ranges`], sorted
/// first (ranges joined from several sources).
pub fn union_ranges(mut ranges: Vec<Range<u64>>) -> Vec<Range<u64>> {
    ranges.sort_by_key(|r| r.start);
    merge_ranges(ranges)
}

/// Merge touching or overlapping ranges of a list sorted by start (a view's extents, a
/// disk's changed ranges).
pub fn merge_ranges(sorted: impl IntoIterator<Item = Range<u64>>) -> Vec<Range<u64>> {
    let mut out: Vec<Range<u64>> = Vec::new();
    for r in sorted {
        match out.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => out.push(r),
        }
    }
    out
}

/// One VM's hypervisor connection.
#[async_trait]
pub trait Hypervisor: Send + Sync + fmt::Debug {
    /// The VM's name, for messages.
    fn vm(&self) -> &str;

    /// Check the VM is reachable and its disks exist; return their sizes.
    async fn inspect(&self, disks: &[DiskRef]) -> Result<Vec<DiskInfo>, BackendError>;

    /// The tracking state of each disk, in the order given.
    async fn tracking(&self, disks: &[DiskRef]) -> Result<Vec<Tracking>, BackendError>;

    /// Start tracking every disk (idempotent; a disk whose tracking was lost starts anew).
    async fn start_tracking(&self, disks: &[DiskRef]) -> Result<(), BackendError>;

    /// Open a view of all `disks` at one instant, freezing the changes tracked so far.
    async fn open_view(
        &self,
        disks: &[DiskRef],
        cycle: u64,
        quiesce: Quiesce,
    ) -> Result<Box<dyn View>, BackendError>;

    /// Stop tracking and remove what tracking left on the disks (bitmaps, reference points).
    async fn stop_tracking(&self, disks: &[DiskRef]) -> Result<(), BackendError>;

    /// Stop the VM so that no write reaches `disks` any more, keeping them readable through
    /// the hypervisor for a last view (a planned failover's first step): ask the guest to
    /// shut down, wait up to `grace` for it, then stop it outright. Idempotent: a VM already
    /// stopped stays stopped. An error means the VM may still be writing.
    async fn stop_vm(&self, disks: &[DiskRef], grace: Duration) -> Result<Stopped, BackendError>;

    /// Start recording, on each disk that can keep the record across a restart of the
    /// hypervisor, the writes made from now on as writes since recovery point `point` (a
    /// [`seed_bitmap_name`] bitmap), dropping older such records. A planned failover calls it
    /// with the source stopped and equal to `point`, so that the failback that returns to these
    /// disks writes only what changed. Whether every disk keeps one; the default keeps none.
    async fn mark_point(&self, disks: &[DiskRef], point: &str) -> Result<bool, BackendError> {
        let _ = (disks, point);
        Ok(false)
    }

    /// On each disk whose image file a failover or a failback left at a recovery point (its
    /// [`crate::stamp`] kept beside it) and which nothing has written since, start recording
    /// the VM's writes as writes since that point (a [`seed_bitmap_name`] bitmap, kept while
    /// the hypervisor process runs), so that the re-protect from that point reads only them;
    /// check the stamp again once it records, and use each stamp once. The disks armed; the
    /// default arms none. The agent calls it every tick while the VM does not replicate: the
    /// sooner after the VM starts, the likelier the guest has not written yet.
    async fn arm_seeds(&self, disks: &[DiskRef]) -> Result<Vec<String>, BackendError> {
        let _ = disks;
        Ok(Vec::new())
    }
}

/// How a VM was stopped, for the failover's report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Stopped {
    /// The guest shut down within the grace period.
    GuestShutDown,
    /// The guest did not shut down in time (or has no way to be asked): it was paused, its
    /// memory kept, and nothing more reaches the disks.
    Paused,
    /// The hypervisor runs no guest (a `qemu-storage-daemon` serving the disks to a VM
    /// elsewhere): every way in to the disks that is not Lifeboat's own was closed.
    Detached {
        /// What was closed (the export ids).
        closed: Vec<String>,
    },
}

impl fmt::Display for Stopped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Stopped::GuestShutDown => f.write_str("the guest shut down"),
            Stopped::Paused => f.write_str("the guest was paused (it did not shut down in time)"),
            Stopped::Detached { closed } if closed.is_empty() => {
                f.write_str("no guest export was left open")
            }
            Stopped::Detached { closed } => {
                write!(f, "the guest's exports were closed ({})", closed.join(", "))
            }
        }
    }
}
