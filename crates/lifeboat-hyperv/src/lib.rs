//! The Hyper-V backend (Windows nodes): a recovery checkpoint per cycle, Resilient Change
//! Tracking (RCT) for the changes, reference points to count them from.
//!
//! ```text
//!  start_tracking   recovery checkpoint ─> ConvertToReferencePoint ─> R0: each disk's base
//!                   (RCT id of the disk in R0)
//!  open_view(c)     recovery checkpoint Cc (VSS in the guest for Quiesce::Application):
//!                   the VM now writes to new .avhdx files, the checkpoint's images are frozen
//!     changed       QueryChangesVirtualDisk(frozen image, RCT id of the base) ─> ranges
//!     allocated     the frozen chain's VHDX block allocation tables
//!     read          the frozen image attached read-only (AttachVirtualDisk, no drive letter)
//!  close(Commit)    ConvertToReferencePoint(Cc) ─> Rc becomes every disk's base;
//!                   DestroyReferencePoint(the old base)
//!  close(Abandon)   DestroySnapshot(Cc): the base stays, its changes are shipped next cycle
//! ```
//!
//! NB: a reference point is made when the view *commits*, not when it opens: converting a
//! checkpoint merges its differencing disks away, and the view reads from them until it ends.
//!
//! Layers: [`host::HyperVHost`] is the seam (plain Rust); [`wmi::WmiHost`] implements it over
//! two smaller traits that `sys.rs`, the only Windows-only and only `unsafe` module, implements
//! with COM/WMI and virtdisk.dll. Everything above `sys.rs` is built and tested on Linux.
//!
//! # Tracking Hyper-V cannot vouch for
//! Each disk's tracking is [`Tracking::Lost`] (the engine resynchronizes) when its base
//! reference point no longer exists, RCT is off for its image, the base's RCT id is refused
//! (`ERROR_VHD_INVALID_CHANGE_TRACKING_ID` and kin), or the frozen image's VHDX data write GUID
//! changed while RCT reports no change since the base (a write RCT did not see). The last is
//! found while opening a view: the view fails as recoverable and the next `tracking()` reports
//! the loss.
//!
//! # Crash safety
//! `<work_dir>/<vm>.hyperv.json` records each disk's base and the operation under way. After a
//! crash the next call sweeps: a view's checkpoint is destroyed (as by Abandon), a conversion
//! that completed is adopted, and reference points no disk counts from are destroyed.

pub mod host;
mod record;
#[cfg(windows)]
pub mod sys;
pub mod vhdx;
mod view;
pub mod wmi;

#[cfg(test)]
mod fake;
#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is the test failure report
mod tests;

use async_trait::async_trait;
use std::collections::BTreeSet;
use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use host::{CheckpointRef, Consistency, ErrorClass, HostError, HyperVHost, ReferencePoint, VmRef};
use lifeboat_engine::backend::{
    BackendError, DiskInfo, DiskRef, Hypervisor, Quiesce, Stopped, Tracking, TrackingDurability,
    View,
};
use record::{DiskBase, Intent, Record};
use view::HyperVView;

/// Settings of a [`HyperVHypervisor`].
#[derive(Clone, Debug)]
pub struct HyperVOptions {
    /// How far before a view's intent a leftover recovery checkpoint may have been created and
    /// still count as this backend's (host and agent clocks, WMI's rounding).
    pub sweep_slack: Duration,
    /// How much of a disk `tracking()` asks RCT about to check that the base's RCT id is still
    /// valid.
    pub probe_bytes: u64,
}

impl Default for HyperVOptions {
    fn default() -> Self {
        HyperVOptions {
            sweep_slack: Duration::from_secs(60),
            probe_bytes: 1024 * 1024,
        }
    }
}

/// One Hyper-V VM: the [`Hypervisor`] of the `hyperv` backend.
///
/// # Assumptions
/// - Only this process takes this VM's recovery checkpoints while a view is being opened
///   (other backup products may keep reference points of their own: they are left alone).
/// - `work_dir` is persistent and local, and holds this VM's record.
/// - The ProtectedVM names each disk by an image path of the VM's disk: the image the VM
///   writes to, or one of its parents (user checkpoints add children).
pub struct HyperVHypervisor {
    inner: Arc<Inner>,
}

impl fmt::Debug for HyperVHypervisor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HyperVHypervisor")
            .field("vm", &self.inner.vm)
            .field("work_dir", &self.inner.work_dir)
            .finish_non_exhaustive()
    }
}

/// What the hypervisor and its views share.
#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) vm: String,
    pub(crate) host: Arc<dyn HyperVHost>,
    work_dir: PathBuf,
    options: HyperVOptions,
    /// Serialises whole operations (open, close, tracking changes) on the VM.
    pub(crate) ops: tokio::sync::Mutex<()>,
    /// The cycle of the view this process has open, if any.
    open_view: StdMutex<Option<u64>>,
}

impl HyperVHypervisor {
    /// The VM named `vm_name` on this Windows host, through WMI and virtdisk.dll; its record
    /// goes to `work_dir`.
    #[cfg(windows)]
    pub fn new(vm_name: impl Into<String>, work_dir: impl Into<PathBuf>) -> Self {
        Self::with_host(
            vm_name,
            Arc::new(sys::host(wmi::WmiHostOptions::default())),
            work_dir,
            HyperVOptions::default(),
        )
    }

    /// The VM named `vm_name` reached through `host`.
    pub fn with_host(
        vm_name: impl Into<String>,
        host: Arc<dyn HyperVHost>,
        work_dir: impl Into<PathBuf>,
        options: HyperVOptions,
    ) -> Self {
        HyperVHypervisor {
            inner: Arc::new(Inner {
                vm: vm_name.into(),
                host,
                work_dir: work_dir.into(),
                options,
                ops: tokio::sync::Mutex::new(()),
                open_view: StdMutex::new(None),
            }),
        }
    }
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

/// Milliseconds since the Unix epoch, now.
fn now_unix_ms() -> u64 {
    lifeboat_engine::replicator::unix_ms(std::time::SystemTime::now())
}

/// A disk of the VM: what the ProtectedVM names, and the image the VM writes to now.
#[derive(Clone, Debug)]
struct Resolved {
    disk: DiskRef,
    leaf: String,
}

impl Inner {
    /// Run a host call on the blocking pool.
    pub(crate) async fn call<T, F>(&self, f: F) -> Result<T, HostError>
    where
        T: Send + 'static,
        F: FnOnce(&dyn HyperVHost) -> Result<T, HostError> + Send + 'static,
    {
        let host = Arc::clone(&self.host);
        tokio::task::spawn_blocking(move || f(host.as_ref()))
            .await
            .map_err(|e| HostError::Unexpected {
                action: "run a host call".to_owned(),
                detail: format!("the blocking task failed: {e}"),
            })?
    }

    /// The backend error for a host failure while doing `action`.
    pub(crate) fn error(&self, action: &str, e: HostError) -> BackendError {
        let vm = self.vm.clone();
        let detail = e.to_string();
        match e.class() {
            ErrorClass::VmNotFound => BackendError::VmNotFound { vm, detail },
            class if class.is_recoverable() => BackendError::Transient {
                vm,
                action: action.to_owned(),
                detail,
            },
            _ => BackendError::Permanent {
                vm,
                action: action.to_owned(),
                detail,
            },
        }
    }

    pub(crate) fn permanent(&self, action: &str, detail: impl Into<String>) -> BackendError {
        BackendError::Permanent {
            vm: self.vm.clone(),
            action: action.to_owned(),
            detail: detail.into(),
        }
    }

    fn open_cycle(&self) -> Option<u64> {
        *self.open_view.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn set_open_cycle(&self, cycle: Option<u64>) {
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

    fn record_path(&self) -> PathBuf {
        self.work_dir
            .join(format!("{}.hyperv.json", file_stem(&self.vm)))
    }

    pub(crate) async fn load(&self) -> Result<Record, BackendError> {
        let path = self.record_path();
        match tokio::fs::read(&path).await {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                self.permanent(
                    "read the Hyper-V tracking record",
                    format!("{}: {e}", path.display()),
                )
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Record::default()),
            Err(e) => Err(self.permanent(
                "read the Hyper-V tracking record",
                format!("{}: {e}", path.display()),
            )),
        }
    }

    pub(crate) async fn save(&self, record: &Record) -> Result<(), BackendError> {
        let path = self.record_path();
        let tmp = path.with_extension("json.tmp");
        let fail = |e: String| BackendError::Transient {
            vm: self.vm.clone(),
            action: "write the Hyper-V tracking record".to_owned(),
            detail: format!("{}: {e}", path.display()),
        };
        let bytes = serde_json::to_vec_pretty(record).map_err(|e| fail(e.to_string()))?;
        tokio::fs::create_dir_all(&self.work_dir)
            .await
            .map_err(|e| fail(e.to_string()))?;
        tokio::fs::write(&tmp, bytes)
            .await
            .map_err(|e| fail(e.to_string()))?;
        tokio::fs::rename(&tmp, &path)
            .await
            .map_err(|e| fail(e.to_string()))
    }

    pub(crate) async fn find_vm(&self) -> Result<VmRef, BackendError> {
        let name = self.vm.clone();
        self.call(move |h| h.find_vm(&name))
            .await
            .map_err(|e| self.error("find the VM", e))
    }

    pub(crate) async fn reference_points(
        &self,
        vm: &VmRef,
    ) -> Result<Vec<ReferencePoint>, BackendError> {
        let vm = vm.clone();
        self.call(move |h| h.reference_points(&vm))
            .await
            .map_err(|e| self.error("list the VM's reference points", e))
    }

    /// Clean up what an earlier run left (see [`record::plan_sweep`]); nothing while this
    /// process has a view open.
    async fn sweep(&self, vm: &VmRef, record: &mut Record) -> Result<(), BackendError> {
        if self.open_cycle().is_some() {
            return Ok(());
        }
        if record.intent.is_none() && record.reference_points.len() <= 1 {
            // NB: the common case costs one listing less.
            let referenced = record.referenced();
            if record
                .reference_points
                .iter()
                .all(|r| referenced.contains(r))
            {
                return Ok(());
            }
        }
        let checkpoints = {
            let vm = vm.clone();
            self.call(move |h| h.checkpoints(&vm))
                .await
                .map_err(|e| self.error("list the VM's checkpoints", e))?
        };
        let reference_points = self.reference_points(vm).await?;
        let slack = self.options.sweep_slack.as_millis() as u64;
        let plan = record::plan_sweep(record, &checkpoints, &reference_points, slack);
        for warning in &plan.warnings {
            tracing::warn!(vm = %self.vm, "{warning}");
        }
        if plan.is_empty() && record.intent.is_none() {
            return Ok(());
        }
        for checkpoint in plan.destroy_checkpoints.clone() {
            self.destroy_checkpoint(checkpoint).await?;
        }
        if let Some((id, bases)) = &plan.adopt {
            tracing::warn!(vm = %self.vm, reference_point = %id,
                "adopting the reference point a conversion made before the agent stopped");
            record.adopt(id, bases);
        }
        record.intent = None;
        for id in &plan.forget_reference_points {
            record.reference_points.remove(id);
        }
        self.save(record).await?;
        self.destroy_reference_points(record, plan.destroy_reference_points)
            .await
    }

    /// Destroy a checkpoint (tolerates one already gone).
    pub(crate) async fn destroy_checkpoint(
        &self,
        checkpoint: CheckpointRef,
    ) -> Result<(), BackendError> {
        match self.call(move |h| h.destroy_checkpoint(&checkpoint)).await {
            Ok(()) => Ok(()),
            Err(e) if e.class() == ErrorClass::Gone => Ok(()),
            Err(e) => Err(self.error("destroy a recovery checkpoint", e)),
        }
    }

    /// Destroy reference points of this backend and forget them (tolerates ones gone).
    pub(crate) async fn destroy_reference_points(
        &self,
        record: &mut Record,
        doomed: Vec<host::ReferencePointRef>,
    ) -> Result<(), BackendError> {
        for rp in doomed {
            let id = rp.instance_id.clone();
            match self.call(move |h| h.destroy_reference_point(&rp)).await {
                Ok(()) => {}
                Err(e) if e.class() == ErrorClass::Gone => {}
                Err(e) => {
                    // NB: the record keeps it; the next sweep tries again.
                    tracing::warn!(vm = %self.vm, reference_point = %id, error = %e,
                        "destroying an old reference point failed");
                    continue;
                }
            }
            record.reference_points.remove(&id);
            self.save(record).await?;
        }
        Ok(())
    }

    /// Destroy this backend's reference points that no disk counts from.
    pub(crate) async fn destroy_unreferenced(
        &self,
        vm: &VmRef,
        record: &mut Record,
    ) -> Result<(), BackendError> {
        let referenced = record.referenced();
        if record
            .reference_points
            .iter()
            .all(|r| referenced.contains(r))
        {
            return Ok(());
        }
        let listed = self.reference_points(vm).await?;
        let mut doomed = Vec::new();
        for id in record.reference_points.clone() {
            if referenced.contains(&id) {
                continue;
            }
            match listed.iter().find(|r| r.reference_point.instance_id == id) {
                Some(r) => doomed.push(r.reference_point.clone()),
                None => {
                    record.reference_points.remove(&id);
                }
            }
        }
        self.destroy_reference_points(record, doomed).await
    }

    /// Find the image the VM writes to for each disk: the VM's disk whose chain (the image
    /// and its parents) contains the image the ProtectedVM names.
    async fn resolve(&self, vm: &VmRef, disks: &[DiskRef]) -> Result<Vec<Resolved>, BackendError> {
        let leaves = {
            let vm = vm.clone();
            self.call(move |h| h.vm_disks(&vm))
                .await
                .map_err(|e| self.error("list the VM's disks", e))?
        };
        let mut out = Vec::with_capacity(disks.len());
        for d in disks {
            let found = self
                .find_in_chains(&leaves, &d.path)
                .await
                .map_err(|e| self.error(&format!("resolve disk {:?}", d.name), e))?;
            let leaf = found.ok_or_else(|| BackendError::DiskNotFound {
                vm: self.vm.clone(),
                disk: d.name.clone(),
                detail: format!(
                    "no disk of the VM is or descends from {} (its disks: {})",
                    d.path,
                    leaves.join(", ")
                ),
            })?;
            out.push(Resolved {
                disk: d.clone(),
                leaf,
            });
        }
        Ok(out)
    }

    /// The image among `images` whose chain contains `target`.
    pub(crate) async fn find_in_chains(
        &self,
        images: &[String],
        target: &str,
    ) -> Result<Option<String>, HostError> {
        if let Some(hit) = images.iter().find(|p| record::same_path(p, target)) {
            return Ok(Some(hit.clone()));
        }
        let images = images.to_vec();
        let target = target.to_owned();
        self.call(move |h| {
            for image in &images {
                let mut current = image.clone();
                for _ in 0..64 {
                    let Some(parent) = h.disk_info(&current)?.parent_path else {
                        break;
                    };
                    if record::same_path(&parent, &target) {
                        return Ok(Some(image.clone()));
                    }
                    current = parent;
                }
            }
            Ok(None)
        })
        .await
    }

    /// Take a recovery checkpoint, falling back to a crash-consistent one when the guest
    /// cannot quiesce; the checkpoint and whether it is application-consistent.
    async fn checkpoint(
        &self,
        vm: &VmRef,
        quiesce: Quiesce,
    ) -> Result<(CheckpointRef, Quiesce), BackendError> {
        if quiesce == Quiesce::Application {
            let vm = vm.clone();
            match self
                .call(move |h| h.create_recovery_checkpoint(&vm, Consistency::Application))
                .await
            {
                Ok(c) => return Ok((c, Quiesce::Application)),
                Err(e)
                    if matches!(
                        e.class(),
                        ErrorClass::Failed | ErrorClass::Busy | ErrorClass::Unsupported
                    ) =>
                {
                    tracing::warn!(vm = %self.vm, error = %e,
                        "an application-consistent checkpoint failed (VSS in the guest): taking a crash-consistent one");
                }
                Err(e) => return Err(self.error("take an application-consistent checkpoint", e)),
            }
        }
        let vm = vm.clone();
        self.call(move |h| h.create_recovery_checkpoint(&vm, Consistency::Crash))
            .await
            .map(|c| (c, Quiesce::None))
            .map_err(|e| self.error("take a recovery checkpoint", e))
    }

    /// The data write GUID of a VHDX image, when it can be read.
    pub(crate) async fn data_write_guid(&self, path: &str) -> Option<String> {
        let p = path.to_owned();
        let read = self
            .call(move |h| {
                let bytes = HostFile { host: h, path: &p };
                Ok(vhdx::read_current_header(&bytes))
            })
            .await;
        match read {
            Ok(Ok(header)) => Some(header.data_write_guid.to_string()),
            Ok(Err(e)) => {
                tracing::debug!(vm = %self.vm, image = %path, error = %e, "no VHDX data write GUID");
                None
            }
            Err(e) => {
                tracing::debug!(vm = %self.vm, image = %path, error = %e, "no VHDX data write GUID");
                None
            }
        }
    }

    /// Give `disks` a new base: a crash-consistent recovery checkpoint converted to a
    /// reference point at once.
    async fn new_base(
        &self,
        vm: &VmRef,
        record: &mut Record,
        disks: &[Resolved],
    ) -> Result<(), BackendError> {
        let started = now_unix_ms();
        record.intent = Some(Intent::Checkpoint {
            cycle: 0,
            started_unix_ms: started,
            checkpoint: None,
        });
        self.save(record).await?;
        let (checkpoint, _) = self.checkpoint(vm, Quiesce::None).await?;
        record.intent = Some(Intent::Checkpoint {
            cycle: 0,
            started_unix_ms: started,
            checkpoint: Some(checkpoint.instance_id.clone()),
        });
        self.save(record).await?;
        let result = self.base_from(vm, record, &checkpoint, disks, 0).await;
        if result.is_err() && matches!(record.intent, Some(Intent::Checkpoint { .. })) {
            if let Err(e) = self.destroy_checkpoint(checkpoint).await {
                tracing::warn!(vm = %self.vm, error = %e, "removing the checkpoint failed: the next sweep does");
            } else {
                record.intent = None;
                self.save(record).await?;
            }
        }
        result
    }

    /// The frozen image of each disk in a checkpoint.
    pub(crate) async fn frozen_images(
        &self,
        checkpoint: &CheckpointRef,
        disks: &[DiskRef],
    ) -> Result<Vec<String>, BackendError> {
        let images = {
            let c = checkpoint.clone();
            self.call(move |h| h.checkpoint_disks(&c))
                .await
                .map_err(|e| self.error("list the checkpoint's disks", e))?
        };
        let mut out = Vec::with_capacity(disks.len());
        for d in disks {
            let found = self.find_in_chains(&images, &d.path).await.map_err(|e| {
                self.error(&format!("resolve disk {:?} in the checkpoint", d.name), e)
            })?;
            out.push(found.ok_or_else(|| BackendError::DiskNotFound {
                vm: self.vm.clone(),
                disk: d.name.clone(),
                detail: format!(
                    "checkpoint {} has no image that is or descends from {} (it has: {})",
                    checkpoint.instance_id,
                    d.path,
                    images.join(", ")
                ),
            })?);
        }
        Ok(out)
    }

    /// Convert `checkpoint` into the base of `disks` (their RCT ids read from the frozen
    /// images first), then destroy the reference points no disk counts from.
    async fn base_from(
        &self,
        vm: &VmRef,
        record: &mut Record,
        checkpoint: &CheckpointRef,
        disks: &[Resolved],
        cycle: u64,
    ) -> Result<(), BackendError> {
        let refs: Vec<DiskRef> = disks.iter().map(|r| r.disk.clone()).collect();
        let frozen = self.frozen_images(checkpoint, &refs).await?;
        let mut parts = Vec::with_capacity(disks.len());
        for (d, image) in refs.iter().zip(frozen) {
            let info = {
                let image = image.clone();
                self.call(move |h| h.disk_info(&image)).await.map_err(|e| {
                    self.error(
                        &format!("inspect the checkpoint image of disk {:?}", d.name),
                        e,
                    )
                })?
            };
            let rct = info.change_tracking.clone().ok_or_else(|| {
                self.permanent(
                    "start tracking",
                    format!("image {image} of disk {:?} has no Resilient Change Tracking (a VHD, not a VHDX?)", d.name),
                )
            })?;
            let guid = self.data_write_guid(&image).await;
            parts.push((
                d.clone(),
                image,
                rct.most_recent_id,
                info.virtual_disk_id,
                guid,
            ));
        }
        let bases = parts
            .iter()
            .map(|(d, image, rct_id, _, guid)| {
                (
                    d.name.clone(),
                    DiskBase {
                        path: d.path.clone(),
                        reference_point: String::new(),
                        rct_id: rct_id.clone(),
                        frozen_path: image.clone(),
                        data_write_guid: guid.clone(),
                        cycle,
                    },
                )
            })
            .collect();
        let pairs: Vec<(String, String, String)> = parts
            .into_iter()
            .map(|(d, _, rct, vdid, _)| (d.name, rct, vdid))
            .collect();
        self.convert(vm, record, checkpoint, cycle, bases, &pairs)
            .await
    }

    /// `ConvertToReferencePoint` with its intent recorded, the bases adopted, the old
    /// reference points destroyed. `pairs`: (disk, RCT id of its frozen image, virtual disk id).
    pub(crate) async fn convert(
        &self,
        vm: &VmRef,
        record: &mut Record,
        checkpoint: &CheckpointRef,
        cycle: u64,
        mut bases: std::collections::BTreeMap<String, DiskBase>,
        pairs: &[(String, String, String)],
    ) -> Result<(), BackendError> {
        let known: Vec<String> = self
            .reference_points(vm)
            .await?
            .into_iter()
            .map(|r| r.reference_point.instance_id)
            .collect();
        record.intent = Some(Intent::Convert {
            cycle,
            checkpoint: checkpoint.instance_id.clone(),
            known_reference_points: known,
            bases: bases.clone(),
        });
        self.save(record).await?;
        let rp = {
            let c = checkpoint.clone();
            self.call(move |h| h.convert_to_reference_point(&c))
                .await
                .map_err(|e| self.error("convert the checkpoint to a reference point", e))?
        };
        let id = rp.reference_point.instance_id.clone();
        // The reference point is ours from here on, whatever follows.
        record.reference_points.insert(id.clone());
        for (disk, frozen_rct, vdid) in pairs {
            match record::pair_rct_id(disk, frozen_rct, vdid, &rp) {
                Ok(rct) => {
                    if let Some(b) = bases.get_mut(disk) {
                        if rct != *frozen_rct {
                            tracing::warn!(vm = %self.vm, disk, frozen = %frozen_rct, listed = %rct,
                                "the reference point lists another RCT id than the frozen image had: using its own");
                        }
                        b.rct_id = rct;
                    }
                }
                Err(why) => {
                    record.intent = None;
                    self.save(record).await?;
                    return Err(self.permanent("adopt the new reference point", why));
                }
            }
        }
        record.adopt(&id, &bases);
        record.intent = None;
        self.save(record).await?;
        self.destroy_unreferenced(vm, record).await
    }

    /// Assess each disk's tracking against the host.
    async fn assess(
        &self,
        vm: &VmRef,
        record: &Record,
        resolved: &[Resolved],
    ) -> Result<Vec<Tracking>, BackendError> {
        let listed: BTreeSet<String> = self
            .reference_points(vm)
            .await?
            .into_iter()
            .map(|r| r.reference_point.instance_id)
            .collect();
        let mut out = Vec::with_capacity(resolved.len());
        for r in resolved {
            let name = r.disk.name.clone();
            let first = record::assess_disk(&name, record, &listed, None, None);
            if first != Tracking::Active {
                out.push(first);
                continue;
            }
            let Some(base) = record.disks.get(&name) else {
                out.push(Tracking::Absent);
                continue;
            };
            let leaf = r.leaf.clone();
            let rct_id = base.rct_id.clone();
            let probe_bytes = self.options.probe_bytes;
            let observed = self
                .call(move |h| {
                    let info = h.disk_info(&leaf)?;
                    let enabled = info.change_tracking.as_ref().map(|c| c.enabled);
                    let len = probe_bytes.min(info.virtual_size_bytes);
                    let probe = match h.query_changes(&leaf, &rct_id, 0..len) {
                        Ok(_) => None,
                        Err(e) if e.class() == ErrorClass::TrackingLost => Some(e.to_string()),
                        Err(e) => return Err(e),
                    };
                    Ok((enabled, probe))
                })
                .await
                .map_err(|e| self.error(&format!("check the tracking of disk {name:?}"), e))?;
            out.push(record::assess_disk(
                &name,
                record,
                &listed,
                observed.0,
                observed.1.as_deref(),
            ));
        }
        Ok(out)
    }
}

/// A host's image file as [`vhdx::FileBytes`].
pub(crate) struct HostFile<'a> {
    pub(crate) host: &'a dyn HyperVHost,
    pub(crate) path: &'a str,
}

impl vhdx::FileBytes for HostFile<'_> {
    fn read_at(&self, offset: u64, len: usize) -> Result<Vec<u8>, String> {
        self.host
            .read_file_at(self.path, offset, len)
            .map_err(|e| e.to_string())
    }
}

/// What the backend says of a disk: a VHDX whose Resilient Change Tracking is kept by Hyper-V
/// across restarts of the host.
fn disk_info(name: String, size_bytes: u64) -> DiskInfo {
    DiskInfo {
        name,
        size_bytes,
        format: "vhdx".into(),
        durability: TrackingDurability::Persistent,
    }
}

#[async_trait]
impl Hypervisor for HyperVHypervisor {
    fn vm(&self) -> &str {
        &self.inner.vm
    }

    async fn inspect(&self, disks: &[DiskRef]) -> Result<Vec<DiskInfo>, BackendError> {
        let inner = &self.inner;
        let vm = inner.find_vm().await?;
        let mut out = Vec::with_capacity(disks.len());
        for r in inner.resolve(&vm, disks).await? {
            let leaf = r.leaf.clone();
            let info = inner
                .call(move |h| h.disk_info(&leaf))
                .await
                .map_err(|e| inner.error(&format!("inspect disk {:?}", r.disk.name), e))?;
            out.push(disk_info(r.disk.name, info.virtual_size_bytes));
        }
        Ok(out)
    }

    async fn tracking(&self, disks: &[DiskRef]) -> Result<Vec<Tracking>, BackendError> {
        let inner = &self.inner;
        let _ops = inner.ops.lock().await;
        let vm = inner.find_vm().await?;
        let mut record = inner.load().await?;
        inner.sweep(&vm, &mut record).await?;
        let resolved = inner.resolve(&vm, disks).await?;
        inner.assess(&vm, &record, &resolved).await
    }

    async fn start_tracking(&self, disks: &[DiskRef]) -> Result<(), BackendError> {
        let inner = &self.inner;
        let _ops = inner.ops.lock().await;
        inner.refuse_if_open("start tracking")?;
        let vm = inner.find_vm().await?;
        let mut record = inner.load().await?;
        inner.sweep(&vm, &mut record).await?;
        let resolved = inner.resolve(&vm, disks).await?;
        let tracking = inner.assess(&vm, &record, &resolved).await?;
        let mut needing = Vec::new();
        for (r, t) in resolved.into_iter().zip(tracking) {
            match t {
                Tracking::Active => {}
                Tracking::Absent => needing.push(r),
                Tracking::Lost(why) => {
                    tracing::warn!(vm = %inner.vm, disk = %r.disk.name, reason = %why,
                        "tracking was lost: counting changes from a new reference point");
                    needing.push(r);
                }
            }
        }
        if needing.is_empty() {
            return Ok(());
        }
        inner.new_base(&vm, &mut record, &needing).await
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
        let vm = inner.find_vm().await?;
        let mut record = inner.load().await?;
        inner.sweep(&vm, &mut record).await?;
        for d in disks {
            if let Some(why) = record.lost.get(&d.name) {
                return Err(inner.permanent(
                    "open a view",
                    format!(
                        "tracking of disk {:?} is lost ({why}): start tracking anew and resync",
                        d.name
                    ),
                ));
            }
            if !record.disks.contains_key(&d.name) {
                return Err(inner.permanent(
                    "open a view",
                    format!(
                        "disk {:?} ({}) is not tracked: start tracking first",
                        d.name, d.path
                    ),
                ));
            }
        }
        let started = now_unix_ms();
        record.intent = Some(Intent::Checkpoint {
            cycle,
            started_unix_ms: started,
            checkpoint: None,
        });
        inner.save(&record).await?;
        inner.set_open_cycle(Some(cycle));
        let opened = match inner.checkpoint(&vm, quiesce).await {
            Ok(c) => c,
            Err(e) => {
                inner.set_open_cycle(None);
                record.intent = None;
                inner.save(&record).await?;
                return Err(e);
            }
        };
        let (checkpoint, quiesced) = opened;
        record.intent = Some(Intent::Checkpoint {
            cycle,
            started_unix_ms: started,
            checkpoint: Some(checkpoint.instance_id.clone()),
        });
        inner.save(&record).await?;
        match view::build_parts(inner, &mut record, &checkpoint, disks).await {
            Ok(parts) => Ok(Box::new(HyperVView::new(
                Arc::clone(inner),
                vm,
                cycle,
                quiesced,
                checkpoint,
                parts,
            ))),
            Err(e) => {
                tracing::warn!(vm = %inner.vm, cycle, error = %e, "opening the view failed: removing its checkpoint");
                match inner.destroy_checkpoint(checkpoint).await {
                    Ok(()) => {
                        record.intent = None;
                        inner.save(&record).await?;
                    }
                    Err(undo) => tracing::error!(vm = %inner.vm, cycle, error = %undo,
                        "removing the checkpoint failed: the next tracking() or open_view() sweeps it"),
                }
                inner.set_open_cycle(None);
                Err(e)
            }
        }
    }

    async fn stop_tracking(&self, disks: &[DiskRef]) -> Result<(), BackendError> {
        let inner = &self.inner;
        let _ops = inner.ops.lock().await;
        inner.refuse_if_open("stop tracking")?;
        let vm = inner.find_vm().await?;
        let mut record = inner.load().await?;
        inner.sweep(&vm, &mut record).await?;
        for d in disks {
            record.disks.remove(&d.name);
            record.lost.remove(&d.name);
        }
        inner.save(&record).await?;
        inner.destroy_unreferenced(&vm, &mut record).await
    }

    async fn stop_vm(
        &self,
        _disks: &[DiskRef],
        grace: std::time::Duration,
    ) -> Result<Stopped, BackendError> {
        let inner = &self.inner;
        let _ops = inner.ops.lock().await;
        let vm = inner.find_vm().await?;
        let shut_down = inner
            .call(move |host| host.stop_vm(&vm, grace))
            .await
            .map_err(|e| inner.error("stop the VM", e))?;
        Ok(if shut_down {
            Stopped::GuestShutDown
        } else {
            Stopped::Paused
        })
    }
}
