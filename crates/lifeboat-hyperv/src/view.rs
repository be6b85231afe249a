//! A point-in-time view of a Hyper-V VM's disks: one recovery checkpoint, its frozen images.
//!
//! ```text
//!  open:    (checkpoint taken by the hypervisor) ─> per disk: frozen image, its size, RCT id
//!           and data write GUID ─> QueryChangesVirtualDisk since the base ─> untracked write?
//!  read:    the frozen image attached read-only, reads widened to whole sectors
//!  close:   detach ─> Commit: ConvertToReferencePoint, the new base, old bases destroyed
//!                  ─> Abandon: DestroySnapshot, the base stays
//! ```

use async_trait::async_trait;
use bytes::Bytes;
use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;
use std::sync::{Arc, Mutex as StdMutex};

use super::host::{CheckpointRef, DiskReader, ErrorClass, VmRef};
use super::record::{self, DiskBase, Record};
use super::{HostFile, Inner, vhdx};
use lifeboat_engine::backend::{BackendError, CloseView, DiskInfo, DiskRef, Quiesce, View};

/// One disk of a view.
pub(crate) struct ViewPart {
    disk: String,
    path: String,
    /// The checkpoint's image of the disk (frozen while the checkpoint exists).
    frozen: String,
    size_bytes: u64,
    sector_bytes: u32,
    /// The frozen image's RCT id: the disk's id in the reference point a Commit makes.
    rct_id: String,
    virtual_disk_id: String,
    data_write_guid: Option<String>,
    /// The ranges changed since the base.
    changed: Vec<Range<u64>>,
    reader: StdMutex<Option<Arc<dyn DiskReader>>>,
}

impl fmt::Debug for ViewPart {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ViewPart")
            .field("disk", &self.disk)
            .field("frozen", &self.frozen)
            .field("size_bytes", &self.size_bytes)
            .field("rct_id", &self.rct_id)
            .finish_non_exhaustive()
    }
}

/// The window of whole sectors that covers `offset..offset + len`: its start and length.
pub(crate) fn sector_window(offset: u64, len: u64, sector: u64, size: u64) -> (u64, u64) {
    let sector = sector.max(1);
    let start = offset / sector * sector;
    let end = (offset + len).div_ceil(sector) * sector;
    (start, end.min(size.div_ceil(sector) * sector) - start)
}

/// Describe each disk in the checkpoint, with its changes since its base. A disk written
/// behind RCT's back is recorded as lost and fails the view as recoverable (the next
/// `tracking()` reports the loss, and the engine resynchronizes).
pub(super) async fn build_parts(
    inner: &Arc<Inner>,
    record: &mut Record,
    checkpoint: &CheckpointRef,
    disks: &[DiskRef],
) -> Result<Vec<ViewPart>, BackendError> {
    let frozen = inner.frozen_images(checkpoint, disks).await?;
    let mut parts = Vec::with_capacity(disks.len());
    for (d, image) in disks.iter().zip(frozen) {
        let Some(base) = record.disks.get(&d.name).cloned() else {
            return Err(inner.permanent("open a view", format!("disk {:?} is not tracked", d.name)));
        };
        let info = {
            let image = image.clone();
            inner
                .call(move |h| h.disk_info(&image))
                .await
                .map_err(|e| {
                    inner.error(
                        &format!("inspect the checkpoint image of disk {:?}", d.name),
                        e,
                    )
                })?
        };
        let rct_id = info
            .change_tracking
            .as_ref()
            .map(|c| c.most_recent_id.clone())
            .ok_or_else(|| {
                inner.permanent(
                    "open a view",
                    format!(
                        "image {image} of disk {:?} has no Resilient Change Tracking",
                        d.name
                    ),
                )
            })?;
        let changed = {
            let image = image.clone();
            let base_rct = base.rct_id.clone();
            let size = info.virtual_size_bytes;
            inner
                .call(move |h| h.query_changes(&image, &base_rct, 0..size))
                .await
        };
        let changed = match changed {
            Ok(c) => c,
            Err(e) if e.class() == ErrorClass::TrackingLost => {
                return Err(lost(inner, record, &d.name, e.to_string()).await);
            }
            Err(e) => {
                return Err(inner.error(&format!("query the changes of disk {:?}", d.name), e));
            }
        };
        let guid = inner.data_write_guid(&image).await;
        if let Some(why) =
            record::untracked_write(&d.name, &base, &image, guid.as_deref(), !changed.is_empty())
        {
            return Err(lost(inner, record, &d.name, why).await);
        }
        parts.push(ViewPart {
            disk: d.name.clone(),
            path: d.path.clone(),
            frozen: image,
            size_bytes: info.virtual_size_bytes,
            sector_bytes: info.logical_sector_bytes.max(512),
            rct_id,
            virtual_disk_id: info.virtual_disk_id,
            data_write_guid: guid,
            changed,
            reader: StdMutex::new(None),
        });
    }
    Ok(parts)
}

/// Record that a disk's tracking is lost, and the error that fails the view.
async fn lost(inner: &Inner, record: &mut Record, disk: &str, why: String) -> BackendError {
    tracing::warn!(vm = %inner.vm, disk, reason = %why, "tracking lost: the disk needs a resync");
    record.lost.insert(disk.to_owned(), why.clone());
    if let Err(e) = inner.save(record).await {
        return e;
    }
    BackendError::Transient {
        vm: inner.vm.clone(),
        action: "open a view".to_owned(),
        detail: format!("tracking of disk {disk:?} is lost ({why}): the next cycle resynchronizes"),
    }
}

/// The [`View`] of the `hyperv` backend.
pub(crate) struct HyperVView {
    inner: Arc<Inner>,
    vm: VmRef,
    cycle: u64,
    quiesced: Quiesce,
    checkpoint: CheckpointRef,
    disks: Vec<DiskInfo>,
    parts: Vec<ViewPart>,
    closed: bool,
}

impl fmt::Debug for HyperVView {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HyperVView")
            .field("vm", &self.inner.vm)
            .field("cycle", &self.cycle)
            .field("quiesced", &self.quiesced)
            .field("checkpoint", &self.checkpoint.instance_id)
            .field("parts", &self.parts)
            .finish_non_exhaustive()
    }
}

impl HyperVView {
    pub(super) fn new(
        inner: Arc<Inner>,
        vm: VmRef,
        cycle: u64,
        quiesced: Quiesce,
        checkpoint: CheckpointRef,
        parts: Vec<ViewPart>,
    ) -> Self {
        let disks = parts
            .iter()
            .map(|p| crate::disk_info(p.disk.clone(), p.size_bytes))
            .collect();
        HyperVView {
            inner,
            vm,
            cycle,
            quiesced,
            checkpoint,
            disks,
            parts,
            closed: false,
        }
    }

    fn part(&self, disk: &str) -> Result<&ViewPart, BackendError> {
        if self.closed {
            return Err(self.inner.permanent(
                "read the view",
                format!("the view of cycle {} is closed", self.cycle),
            ));
        }
        self.parts
            .iter()
            .find(|p| p.disk == disk)
            .ok_or_else(|| BackendError::DiskNotFound {
                vm: self.inner.vm.clone(),
                disk: disk.to_owned(),
                detail: format!("not in the view of cycle {}", self.cycle),
            })
    }

    /// The disk's reader, attaching its frozen image on first use.
    async fn reader(&self, p: &ViewPart) -> Result<Arc<dyn DiskReader>, BackendError> {
        if let Some(r) = p.reader.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            return Ok(Arc::clone(r));
        }
        let image = p.frozen.clone();
        let reader: Arc<dyn DiskReader> = self
            .inner
            .call(move |h| h.open_for_read(&image))
            .await
            .map_err(|e| {
                self.inner.error(
                    &format!("attach the checkpoint image of disk {:?}", p.disk),
                    e,
                )
            })?
            .into();
        let mut slot = p.reader.lock().unwrap_or_else(|e| e.into_inner());
        Ok(Arc::clone(slot.get_or_insert(reader)))
    }

    /// End the view: detach, then convert (Commit) or destroy (Abandon) the checkpoint.
    async fn finish(&mut self, how: CloseView) -> Result<(), BackendError> {
        for p in &self.parts {
            p.reader.lock().unwrap_or_else(|e| e.into_inner()).take();
        }
        let inner = Arc::clone(&self.inner);
        let mut record = inner.load().await?;
        let result = match how {
            CloseView::Commit => {
                let bases: BTreeMap<String, DiskBase> = self
                    .parts
                    .iter()
                    .map(|p| {
                        (
                            p.disk.clone(),
                            DiskBase {
                                path: p.path.clone(),
                                reference_point: String::new(),
                                rct_id: p.rct_id.clone(),
                                frozen_path: p.frozen.clone(),
                                data_write_guid: p.data_write_guid.clone(),
                                cycle: self.cycle,
                            },
                        )
                    })
                    .collect();
                let pairs: Vec<(String, String, String)> = self
                    .parts
                    .iter()
                    .map(|p| (p.disk.clone(), p.rct_id.clone(), p.virtual_disk_id.clone()))
                    .collect();
                inner
                    .convert(
                        &self.vm,
                        &mut record,
                        &self.checkpoint,
                        self.cycle,
                        bases,
                        &pairs,
                    )
                    .await
            }
            CloseView::Abandon => {
                let r = inner.destroy_checkpoint(self.checkpoint.clone()).await;
                if r.is_ok() {
                    record.intent = None;
                    inner.save(&record).await?;
                }
                r
            }
        };
        self.closed = true;
        inner.set_open_cycle(None);
        result
    }
}

impl Drop for HyperVView {
    fn drop(&mut self) {
        if !self.closed {
            // NB: no async teardown in drop; the checkpoint is recorded as the intent, so the
            // next tracking() or open_view() destroys it (as Abandon would).
            tracing::warn!(vm = %self.inner.vm, cycle = self.cycle,
                "a view was dropped without close: the next tracking() or open_view() removes its checkpoint");
            self.inner.set_open_cycle(None);
        }
    }
}

#[async_trait]
impl View for HyperVView {
    fn cycle(&self) -> u64 {
        self.cycle
    }

    fn quiesced(&self) -> Quiesce {
        self.quiesced
    }

    fn disks(&self) -> &[DiskInfo] {
        &self.disks
    }

    async fn changed_extents(&self, disk: &str) -> Result<Vec<Range<u64>>, BackendError> {
        Ok(self.part(disk)?.changed.clone())
    }

    async fn allocated_extents(&self, disk: &str) -> Result<Vec<Range<u64>>, BackendError> {
        let p = self.part(disk)?;
        let image = p.frozen.clone();
        let walked = self
            .inner
            .call(move |h| {
                let mut chain = Vec::new();
                let mut current = image;
                for _ in 0..64 {
                    let file = HostFile {
                        host: h,
                        path: &current,
                    };
                    let layout = vhdx::read_layout(&file);
                    let states = layout
                        .as_ref()
                        .map_err(Clone::clone)
                        .and_then(|l| vhdx::read_block_states(&file, l));
                    let (layout, states) = match (layout, states) {
                        (Ok(l), Ok(s)) => (l, s),
                        (Err(e), _) | (_, Err(e)) => return Ok(Err(format!("{current}: {e}"))),
                    };
                    let has_parent = layout.has_parent;
                    chain.push((layout, states));
                    if !has_parent {
                        return Ok(vhdx::allocated_ranges(&chain).map_err(|e| e.to_string()));
                    }
                    match h.disk_info(&current)?.parent_path {
                        Some(parent) => current = parent,
                        None => return Ok(Err(format!("{current}: its parent is not known"))),
                    }
                }
                Ok(Err(
                    "the differencing chain is deeper than 64 images".to_owned()
                ))
            })
            .await
            .map_err(|e| {
                self.inner
                    .error(&format!("inspect the images of disk {disk:?}"), e)
            })?;
        match walked {
            Ok(ranges) => Ok(ranges
                .into_iter()
                .map(|r| r.start..r.end.min(p.size_bytes))
                .filter(|r| !r.is_empty())
                .collect()),
            Err(why) => {
                // NB: without an allocation table to trust, every byte may hold data.
                tracing::info!(vm = %self.inner.vm, disk, reason = %why,
                    "no block allocation table to trust: copying the whole disk");
                Ok(std::iter::once(0..p.size_bytes)
                    .filter(|r| !r.is_empty())
                    .collect())
            }
        }
    }

    async fn read(&self, disk: &str, offset: u64, len: u64) -> Result<Bytes, BackendError> {
        let p = self.part(disk)?;
        if offset.checked_add(len).is_none_or(|end| end > p.size_bytes) {
            return Err(self.inner.permanent(
                "read the view",
                format!(
                    "{offset}+{len} is past the end {} of disk {:?}",
                    p.size_bytes, p.disk
                ),
            ));
        }
        let reader = self.reader(p).await?;
        let sector = u64::from(reader.sector_bytes().max(p.sector_bytes));
        let (start, window) = sector_window(offset, len, sector, reader.size_bytes());
        let skip = (offset - start) as usize;
        let bytes = self
            .inner
            .call(move |_| {
                let mut buf = vec![0u8; window as usize];
                reader.read_at(start, &mut buf)?;
                Ok(buf)
            })
            .await
            .map_err(|e| {
                self.inner
                    .error(&format!("read disk {disk:?} of the view"), e)
            })?;
        Ok(Bytes::from(bytes).slice(skip..skip + len as usize))
    }

    async fn close(mut self: Box<Self>, how: CloseView) -> Result<(), BackendError> {
        let inner = Arc::clone(&self.inner);
        let _ops = inner.ops.lock().await;
        self.finish(how).await
    }
}

#[cfg(test)]
mod tests {
    use super::sector_window;

    #[test]
    fn reads_widen_to_whole_sectors_within_the_disk() {
        assert_eq!(sector_window(0, 4096, 512, 1 << 20), (0, 4096));
        assert_eq!(sector_window(100, 10, 512, 1 << 20), (0, 512));
        assert_eq!(sector_window(1000, 100, 512, 1 << 20), (512, 1024));
        assert_eq!(sector_window(5000, 3000, 4096, 1 << 20), (4096, 4096));
        // A size that is not a whole number of sectors still reads its last sector whole.
        assert_eq!(sector_window(1000, 24, 512, 1024 + 100), (512, 512));
        assert_eq!(sector_window(1100, 24, 512, 1024 + 100), (1024, 512));
    }
}
