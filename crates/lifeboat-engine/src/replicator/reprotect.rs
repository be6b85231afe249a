//! The way back after a failover: re-protect (replicate from where the VM runs now into the
//! replica it was recovered from) and fail back (bring the original disks to the newest point,
//! writing only the blocks that differ). Neither sends a whole disk when the other side still
//! holds most of it.
//!
//! ```text
//!  protect A→replica ── failover (point P) ──> B runs on P's disks
//!  re-protect B:   fence, drop the points after P, live replica = P,
//!                  resync B against P's block map: send the blocks B changed since P
//!  fail back:      stop B, ship, point Q (fail_over_to_primary), then on A's site
//!                  restore_onto(A's disks, Q): hash A's disks, write the blocks that differ
//!                  from Q (B's writes, and whatever an unplanned failover lost at A)
//!  re-protect A:   as for B, from Q: A equals Q, so only what A wrote since is sent
//! ```
//!
//! Both directions replicate into the same replica (one history of points, one store), each
//! under its own epoch: re-protect fences the store, so the site left behind cannot write to
//! it again.
//!
//! # Resuming
//!
//! Re-protect saves its phase (a resync "from point P") before it changes the store; a
//! resumed attempt drops the later points and puts the live replica back to P again (both
//! idempotent) until the resync has started, then resumes the resync from its saved map.
//! A restore can run again from the start: what it already wrote now matches and is skipped.

use std::path::Path;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use lifeboat_blockmap::{BlockMap, HashAlgorithm, RangeOp, plan_resync};
use lifeboat_store::local::{PositionalIo, data_ranges};
use lifeboat_store::{At, MAX_WRITE_BYTES, ReplicaStore, VmKey};

use super::failover::{FailoverReport, MaterialisedDisk, PointChoice, choose_point, verify_digest};
use super::{Progress, ProgressSink, Replicator, Report, maps, throughput, unix_ms};
use crate::backend::DiskRef;
use crate::error::EngineError;
use crate::state::{AgentState, DiskRecord, EnginePhase};

/// How the phase of a re-protect's resync starts its reason.
pub(crate) const REPROTECT: &str = "Reprotect";

/// The point a re-protect in `phase` started from, if it is one.
fn reprotecting_from(phase: &EnginePhase) -> Option<&str> {
    match phase {
        EnginePhase::ResyncRequired { reason } => reason
            .strip_prefix(REPROTECT)
            .and_then(|r| r.strip_prefix(" from point ")),
        _ => None,
    }
}

impl Replicator {
    /// Re-protect: protect the VM where it runs now (the recovered VM after a failover, the
    /// original after a failback) into the replica it was recovered from, seeded by the point
    /// `from_point` it started from. The replica is taken for this engine (a new epoch), the
    /// points after `from_point` (an older point's failover leaves the old site's later
    /// history) are dropped, the live replica is put back to `from_point`, and a resync
    /// compares every disk with that point's block map and sends only the blocks that differ.
    /// Delta cycles follow as for any protected VM.
    ///
    /// Idempotent, and resumable after a crash (see the module's notes). An engine that is
    /// protected already has nothing to do.
    ///
    /// # Errors
    ///
    /// No such point, a disk of the VM here whose size is not the point's, hypervisor and
    /// store failures (the saved state keeps what was done).
    pub async fn reprotect(
        &mut self,
        from_point: &str,
        now: SystemTime,
        progress: ProgressSink<'_>,
    ) -> Result<Report, EngineError> {
        if reprotecting_from(&self.state.phase) != Some(from_point) {
            // NB: protected already counts only while this engine still holds the replica (a
            // re-protect whose job ended unseen); an engine left Protected, or half way
            // through anything, by a site that was failed away from holds a dead epoch.
            let holds = self.store.epoch(&self.vm).await?.number == self.state.epoch;
            if self.state.phase == EnginePhase::Protected && holds {
                return Ok(Report::default());
            }
            self.take_replica(from_point, now).await?;
        }
        if self.state.resync_cycle.is_none() {
            // NB: not once the resync has started: it writes the live replica past the point.
            self.rewind_replica(from_point).await?;
        }
        self.resync(now, progress).await
    }

    /// Check the VM here against the point, fence the store for this engine and record the
    /// re-protect (its resync) before anything in the store changes.
    async fn take_replica(&mut self, from_point: &str, now: SystemTime) -> Result<(), EngineError> {
        let infos = self.check_source_and_store().await?;
        let point = choose_point(
            self.store.as_ref(),
            &self.vm,
            &PointChoice::Named(from_point.to_owned()),
        )
        .await?;
        for info in &infos {
            match point.disks.iter().find(|d| d.name == info.name) {
                Some(pd) if pd.size_bytes == info.size_bytes => {}
                Some(pd) => {
                    return Err(EngineError::NotReady {
                        what: format!(
                            "disk {:?} of VM {} is {} bytes here and {} bytes at point {from_point}: \
                             re-protect seeds each disk from the point it was recovered from",
                            info.name, self.vm, info.size_bytes, pd.size_bytes
                        ),
                    });
                }
                None => {
                    return Err(EngineError::NotReady {
                        what: format!(
                            "disk {:?} of VM {} has no replica at point {from_point}",
                            info.name, self.vm
                        ),
                    });
                }
            }
        }
        super::check_log_space(
            self.fs.as_ref(),
            &self.dir,
            &infos,
            self.settings.log_threshold_percent,
        )?;
        let epoch = self
            .store
            .fence(&self.vm, &self.writer, unix_ms(now))
            .await?;
        let logs: Vec<crate::state::PendingLog> =
            self.state.pending.drain(..).flat_map(|c| c.logs).collect();
        self.state = AgentState {
            phase: EnginePhase::ResyncRequired {
                reason: format!("{REPROTECT} from point {from_point}"),
            },
            epoch: epoch.number,
            last_cycle: self.state.last_cycle,
            disks: infos.iter().map(DiskRecord::from).collect(),
            ..AgentState::default()
        };
        self.save()?;
        super::logs::delete_files(self.fs.as_ref(), &logs)
    }

    /// Make the live replica equal `from_point`: drop the points after it, then put the live
    /// disks back to the latest point (now `from_point`). Idempotent.
    async fn rewind_replica(&mut self, from_point: &str) -> Result<(), EngineError> {
        let manifest = self.store.manifest(&self.vm).await?;
        let later: Vec<String> = manifest
            .map(|m| {
                m.points
                    .into_iter()
                    .map(|p| p.id)
                    .skip_while(|id| id != from_point)
                    .skip(1)
                    .collect()
            })
            .unwrap_or_default();
        for id in &later {
            tracing::info!(vm = %self.vm, point = %id, from = %from_point, "re-protect drops a point of the site left behind");
            self.store.delete_point(&self.vm, id).await?;
        }
        self.store.revert_to_latest_point(&self.vm).await?;
        // NB: a map the old site left tagged otherwise (an interrupted copy or resync there)
        // describes nothing now; one tagged `resync` would be trusted by this re-protect's
        // own resumption. It is replaced by bytes no map decodes from: re-hashed when needed.
        let disks: Vec<String> = self.disks.iter().map(|d| d.name.clone()).collect();
        for disk in disks {
            let stale = self
                .store
                .block_map(&self.vm, &disk)
                .await?
                .is_some_and(|bytes| maps::decode(&bytes).is_none_or(|(tag, _)| tag != from_point));
            if stale {
                self.store
                    .put_block_map(&self.vm, &disk, bytes::Bytes::from_static(b"stale"))
                    .await?;
            }
        }
        Ok(())
    }
}

/// Bring the original disks `targets` (raw image files or block devices at the site the VM
/// returns to) to `point_id` of `vm`: each is hashed block by block and compared with the
/// point's block map, and only the blocks that differ are read from the store and written
/// (the recovered VM's writes, and whatever an unplanned failover lost at this site). A disk
/// whose image is gone is created and filled: the one case that copies a whole disk. Every
/// disk is verified against the point's digest at the end.
///
/// Needs only the store and the images: the agent of the site the VM returns to runs it (the
/// Failback job), with the source VM stopped.
///
/// # Errors
///
/// No such point, a disk of the point without an original disk, an image that is not raw (a
/// qcow2 one: convert it or fail back to new disks), I/O and store failures, or
/// [`EngineError::DigestMismatch`].
pub async fn restore_onto(
    store: &dyn ReplicaStore,
    vm: &VmKey,
    point_id: &str,
    targets: &[DiskRef],
    progress: ProgressSink<'_>,
) -> Result<FailoverReport, EngineError> {
    let point = choose_point(store, vm, &PointChoice::Named(point_id.to_owned())).await?;
    let mut report = FailoverReport {
        point: point.clone(),
        disks: Vec::new(),
        bytes_read: 0,
        source_stopped: None,
    };
    for pd in &point.disks {
        let target =
            targets
                .iter()
                .find(|t| t.name == pd.name)
                .ok_or_else(|| EngineError::NotReady {
                    what: format!(
                        "disk {:?} of point {point_id} has no original disk to fail back onto",
                        pd.name
                    ),
                })?;
        report.bytes_read += restore_disk(store, vm, &point, pd, target, progress).await?;
        report.disks.push(MaterialisedDisk {
            name: pd.name.clone(),
            path: target.path.clone().into(),
            size_bytes: pd.size_bytes,
        });
    }
    Ok(report)
}

/// The format of an image whose first bytes are `head`, when it is one whose data is not laid
/// out raw (writing raw blocks into it would corrupt it); None for raw data (and a fixed VHD,
/// raw data with a footer at its end).
fn image_format(head: &[u8; 8]) -> Option<&'static str> {
    match head {
        [b'Q', b'F', b'I', 0xfb, ..] => Some("qcow2"),
        b"vhdxfile" => Some("VHDX"),
        // NB: a dynamic or differencing VHD starts with a copy of its footer.
        b"conectix" => Some("dynamic VHD"),
        [b'K', b'D', b'M', b'V', ..] => Some("VMDK"),
        _ => None,
    }
}

/// Another process that has `path` open (its pid and program), found through `/proc/*/fd`:
/// a hypervisor still holding the original disk (a QEMU paused by the failover, say) would
/// run on, or resume, over blocks rewritten under it. Linux only; elsewhere, and for processes
/// this agent may not inspect, nothing is found.
fn held_open_by(path: &Path) -> Option<(u32, String)> {
    #[cfg(target_os = "linux")]
    {
        let target = std::fs::canonicalize(path).ok()?;
        let me = std::process::id();
        for entry in std::fs::read_dir("/proc").ok()?.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            if pid == me {
                continue;
            }
            let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
                continue;
            };
            if fds
                .flatten()
                .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|l| l == target))
            {
                let program = std::fs::read_to_string(entry.path().join("comm"))
                    .map(|c| c.trim().to_owned())
                    .unwrap_or_default();
                return Some((pid, program));
            }
        }
        None
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = path;
        None
    }
}

/// Open (or create) an original disk's image for writing in place; refuse formats that are
/// not raw, and an image another process holds open.
fn open_target(path: &Path, disk: &str, size: u64) -> Result<std::fs::File, EngineError> {
    if let Some((pid, program)) = held_open_by(path) {
        return Err(EngineError::NotReady {
            what: format!(
                "disk {disk:?}: {} is open by process {pid} ({program}): power the VM at the \
                 site it returns to off (its hypervisor process gone) before the failback writes \
                 its disks, and start it fresh afterwards",
                path.display()
            ),
        });
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(EngineError::state("open original disk", path))?;
    let len = file
        .metadata()
        .map_err(EngineError::state("inspect original disk", path))?
        .len();
    let mut head = [0u8; 8];
    if len >= 8
        && file.read_exact_at(&mut head, 0).is_ok()
        && let Some(format) = image_format(&head)
    {
        return Err(EngineError::NotReady {
            what: format!(
                "disk {disk:?}: {} is a {format} image; failback writes raw images (a fixed VHD \
                 too: its data is raw) and block devices in place (convert it with qemu-img, or \
                 fail back to new disks)",
                path.display()
            ),
        });
    }
    // NB: a block device reports 0 here and has its size; a raw file shorter than the disk
    // (a new one) grows, sparse.
    if file
        .metadata()
        .map_err(EngineError::state("inspect original disk", path))?
        .is_file()
        && len < size
    {
        file.set_len(size)
            .map_err(EngineError::state("size original disk", path))?;
    }
    Ok(file)
}

async fn restore_disk(
    store: &dyn ReplicaStore,
    vm: &VmKey,
    point: &lifeboat_store::RecoveryPoint,
    pd: &lifeboat_store::PointDisk,
    target: &DiskRef,
    progress: ProgressSink<'_>,
) -> Result<u64, EngineError> {
    let path = Path::new(&target.path);
    let map_error = |source| EngineError::BlockMap {
        disk: pd.name.clone(),
        source,
    };
    let block_size = pd.digest.block_size_bytes;
    let block = u64::from(block_size);
    let size = pd.size_bytes;
    let file = Arc::new(open_target(path, &pd.name, size)?);
    let started = Instant::now();
    // What the point holds: its stored map when it describes this point, else the point read
    // from the store.
    let want = match maps::load_trusted(store, vm, &pd.name, size, block_size, &[&point.id]).await?
    {
        Some(map) => map,
        None => {
            maps::hash_replica(
                store,
                vm,
                &pd.name,
                &At::Point(point.id.clone()),
                size,
                block_size,
            )
            .await?
        }
    };
    // What the original disk holds now.
    let mut have =
        BlockMap::new_zeroed(HashAlgorithm::default(), block_size, size).map_err(map_error)?;
    let chunk = (MAX_WRITE_BYTES / block).max(1) * block;
    let report = |done: u64, read: u64| {
        progress(&Progress {
            operation: "Failback",
            disk: pd.name.clone(),
            bytes_done: done,
            bytes_total: size,
            throughput_bytes_per_second: throughput(read, started),
        });
    };
    // NB: a block device, or a file system that does not tell, is read whole; the holes of a
    // sparse image are zeros and are not read.
    let ranges = maps::align(
        &data_ranges(&file, size)
            .map_err(EngineError::state("find data in original disk", path))?,
        block,
        size,
    );
    maps::hash_ranges(
        &mut have,
        &pd.name,
        &ranges,
        super::VIEW_CHUNK_BYTES / block * block,
        |offset, len| {
            let file = Arc::clone(&file);
            async move {
                tokio::task::spawn_blocking(move || {
                    let mut buf = vec![0u8; len as usize];
                    file.read_exact_at(&mut buf, offset)
                        .map(|()| bytes::Bytes::from(buf))
                })
                .await
                .map_err(|e| EngineError::NotReady {
                    what: format!("reading the original disk was cancelled: {e}"),
                })?
                .map_err(EngineError::state("read original disk", path))
            }
        },
        |done| report(done / 2, 0),
    )
    .await?;
    let plan = plan_resync(&want, &have).map_err(map_error)?;
    let mut read = 0;
    let zeros = vec![0u8; chunk as usize];
    for range in plan.ranges() {
        let mut offset = range.offset_bytes;
        let end = range.offset_bytes + range.len_bytes;
        while offset < end {
            let len = chunk.min(end - offset);
            match range.op {
                RangeOp::Copy => {
                    let at = At::Point(point.id.clone());
                    let data = store.read(vm, &pd.name, &at, offset, len).await?;
                    file.write_all_at(&data, offset)
                        .map_err(EngineError::state("write original disk", path))?;
                    have.update_range(offset, &data).map_err(map_error)?;
                    read += len;
                }
                RangeOp::Zero => {
                    let data = &zeros[..len as usize];
                    file.write_all_at(data, offset)
                        .map_err(EngineError::state("write original disk", path))?;
                    have.update_range(offset, data).map_err(map_error)?;
                }
            }
            offset += len;
            report(size / 2 + offset / 2, read);
        }
    }
    file.sync_all()
        .map_err(EngineError::state("sync original disk", path))?;
    report(size, read);
    verify_digest(&have, point, pd, |got| {
        format!("the original disk reads as {got} after the failback")
    })?;
    tracing::info!(vm = %vm, disk = %pd.name, path = %path.display(), written = read, zeroed = plan.zero_bytes(), "original disk brought to the point");
    Ok(read)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_that_are_not_raw_data_are_named_and_raw_data_is_not() {
        assert_eq!(image_format(b"QFI\xfb\0\0\0\x03"), Some("qcow2"));
        assert_eq!(image_format(b"vhdxfile"), Some("VHDX"));
        assert_eq!(image_format(b"conectix"), Some("dynamic VHD"));
        assert_eq!(image_format(b"KDMV\x01\0\0\0"), Some("VMDK"));
        assert_eq!(image_format(&[0; 8]), None);
        assert_eq!(
            image_format(b"\xebc\x90MSWIN"),
            None,
            "a boot sector is data"
        );
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_failback_onto_a_disk_another_process_holds_open_is_refused() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = dir.path().join("root.img");
        std::fs::write(&path, vec![0u8; 4096]).unwrap_or_else(|e| panic!("{e}"));
        let ready = dir.path().join("ready");
        let mut holder = std::process::Command::new("bash")
            .arg("-c")
            .arg(format!(
                "exec 3<>'{}'; touch '{}'; sleep 30",
                path.display(),
                ready.display()
            ))
            .spawn()
            .unwrap_or_else(|e| panic!("{e}"));
        while !ready.exists() {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let refused = open_target(&path, "root", 4096).map(drop);
        let _ = holder.kill();
        let _ = holder.wait();
        let Err(EngineError::NotReady { what }) = refused else {
            panic!("{refused:?}");
        };
        assert!(
            what.contains(&format!("process {}", holder.id())) && what.contains("power the VM"),
            "{what}"
        );
        assert!(
            open_target(&path, "root", 4096).is_ok(),
            "free once it is closed"
        );
    }

    #[tokio::test]
    async fn a_failback_onto_a_qcow2_image_is_refused_and_leaves_it_alone() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = dir.path().join("root.qcow2");
        let image = b"QFI\xfb\0\0\0\x03 and the rest of a qcow2 header".to_vec();
        std::fs::write(&path, &image).unwrap_or_else(|e| panic!("{e}"));
        let refused = open_target(&path, "root", 1 << 20).map(drop);
        let Err(EngineError::NotReady { what }) = refused else {
            panic!("{refused:?}");
        };
        assert!(
            what.contains("qcow2") && what.contains("root.qcow2"),
            "{what}"
        );
        assert_eq!(std::fs::read(&path).unwrap_or_default(), image);
    }
}
