//! The [`ReplicaStore`] operations of [`AzureStore`]: disks as page blobs (a fixed VHD each),
//! reads and writes as Get Blob ranges and Put Page, recovery points as blob snapshots named
//! by the manifest, and the block maps as block blobs (see the module docs of [`super`] for
//! the layout, and for the order of writes that keeps the manifest truthful after a crash).

use super::pipeline::Target;
use super::{
    AzureStore, Condition, definition_blob, disk_blob, lock, manifest_blob, map_blob, vhd,
};
use crate::manifest::point_id;
use crate::{
    At, Manifest, ManifestDisk, NewPoint, PointDisk, RecoveryPoint, ReplicaStore, StoreError,
    VmKey, check_disk_name, check_disk_size, check_range, merge_ranges,
};
use async_trait::async_trait;
use azure_storage_blob::models::{
    BlobClientCreateSnapshotResultHeaders as _, BlobClientDownloadOptions, HttpRange,
    PageBlobClientListPageRangesOptions,
};
use bytes::Bytes;
use futures::TryStreamExt as _;
use std::num::NonZero;
use std::ops::Range;

#[async_trait]
impl ReplicaStore for AzureStore {
    fn describe(&self) -> String {
        format!(
            "Azure Blob container {:?} of account {:?}",
            self.container, self.account
        )
    }

    async fn check_writable(&self) -> Result<(), StoreError> {
        // NB: one probe blob per call: the VMs of one agent check the store at once.
        static PROBES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = PROBES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let name = format!(".lifeboat-probe/{nanos:x}-{n}");
        self.put_small_blob(
            &name,
            Bytes::from_static(b"lifeboat"),
            "write a probe blob",
            Condition::None,
        )
        .await?;
        self.delete_blob(&name, None).await
    }

    async fn create_disk(&self, vm: &VmKey, disk: &str, size_bytes: u64) -> Result<(), StoreError> {
        check_disk_name(disk)?;
        check_disk_size(disk, size_bytes)?;
        let state = self.vm_state(vm);
        let mut cache = state.manifest.lock().await;
        let mut manifest = self
            .fetch_for_change(vm)
            .await?
            .unwrap_or_else(|| Manifest::new(&vm.to_string()));
        if let Some(existing) = manifest.disk(disk) {
            *cache = Some(manifest.clone());
            if existing.size_bytes == size_bytes {
                return Ok(());
            }
            return Err(StoreError::InvalidRequest {
                what: format!(
                    "{} exists with {} bytes, not {size_bytes}",
                    Self::what_disk(vm, disk),
                    existing.size_bytes
                ),
            });
        }
        let target = Target {
            action: "create",
            what: Self::what_disk(vm, disk),
        };
        let client = self.blob_client(&disk_blob(vm, disk))?;
        client
            .page_blob_client()
            .create(vhd::blob_size_bytes(size_bytes), None)
            .await
            .map_err(|e| self.classify(&target, e))?;
        self.write_footer(&client, size_bytes, &target).await?;
        manifest.disks.push(ManifestDisk {
            name: disk.to_owned(),
            size_bytes,
        });
        self.store_manifest(vm, &manifest).await?;
        *cache = Some(manifest);
        Ok(())
    }

    async fn resize_disk(&self, vm: &VmKey, disk: &str, size_bytes: u64) -> Result<(), StoreError> {
        check_disk_name(disk)?;
        check_disk_size(disk, size_bytes)?;
        let state = self.vm_state(vm);
        let mut cache = state.manifest.lock().await;
        let mut manifest = self
            .fetch_for_change(vm)
            .await?
            .ok_or_else(|| self.not_found(format!("VM {vm}")))?;
        let Some(old) = manifest.disks.iter().position(|d| d.name == disk) else {
            return Err(self.not_found(Self::what_disk(vm, disk)));
        };
        let old_size = manifest.disks[old].size_bytes;
        if old_size != size_bytes {
            let target = Target {
                action: "resize",
                what: Self::what_disk(vm, disk),
            };
            let client = self.blob_client(&disk_blob(vm, disk))?;
            let page = client.page_blob_client();
            page.resize(vhd::blob_size_bytes(size_bytes), None)
                .await
                .map_err(|e| self.classify(&target, e))?;
            // Everything past the smaller size up to the new footer must read as zeros: the
            // old footer (when growing) and old data (when shrinking, then growing again).
            let keep = old_size.min(size_bytes);
            let data_end = vhd::data_size_bytes(size_bytes);
            if keep < data_end {
                page.clear_pages(HttpRange::new(keep, data_end - keep), None)
                    .await
                    .map_err(|e| self.classify(&target, e))?;
            }
            self.write_footer(&client, size_bytes, &target).await?;
            manifest.disks[old].size_bytes = size_bytes;
            self.store_manifest(vm, &manifest).await?;
        }
        *cache = Some(manifest);
        Ok(())
    }

    async fn delete_disk(&self, vm: &VmKey, disk: &str) -> Result<(), StoreError> {
        check_disk_name(disk)?;
        let state = self.vm_state(vm);
        let mut cache = state.manifest.lock().await;
        let Some(mut manifest) = self.fetch_for_change(vm).await? else {
            *cache = None;
            return Ok(());
        };
        // NB: the manifest first, then the blobs: a crash in between leaves unreferenced
        // blobs (a retry cleans them), never a manifest naming a disk that is gone.
        if manifest.disk(disk).is_some() {
            manifest.disks.retain(|d| d.name != disk);
            self.store_manifest(vm, &manifest).await?;
        }
        *cache = Some(manifest.clone());
        drop(cache);
        self.retire_disk_blob(vm, disk, &manifest).await?;
        self.delete_blob(&map_blob(vm, disk), None).await
    }

    async fn write(
        &self,
        vm: &VmKey,
        disk: &str,
        offset: u64,
        data: Bytes,
    ) -> Result<(), StoreError> {
        let state = self.vm_state(vm);
        let size = self.live_size(vm, disk, &state).await?;
        let len = u64::try_from(data.len()).unwrap_or(u64::MAX);
        check_range(disk, offset, len, size, true)?;
        self.check_epoch(vm, &state).await?;
        if len == 0 {
            return Ok(());
        }
        let target = Target {
            action: "write",
            what: format!("{offset}+{len} of {}", Self::what_disk(vm, disk)),
        };
        let client = self.blob_client(&disk_blob(vm, disk))?;
        let _permit = self.permit(&state).await;
        client
            .page_blob_client()
            .upload_pages(data.into(), len, HttpRange::new(offset, len), None)
            .await
            .map_err(|e| self.classify(&target, e))?;
        Ok(())
    }

    async fn zero(&self, vm: &VmKey, disk: &str, offset: u64, len: u64) -> Result<(), StoreError> {
        let state = self.vm_state(vm);
        let size = self.live_size(vm, disk, &state).await?;
        check_range(disk, offset, len, size, false)?;
        if len == 0 {
            return Ok(());
        }
        self.check_epoch(vm, &state).await?;
        let target = Target {
            action: "zero",
            what: format!("{offset}+{len} of {}", Self::what_disk(vm, disk)),
        };
        let client = self.blob_client(&disk_blob(vm, disk))?;
        let _permit = self.permit(&state).await;
        client
            .page_blob_client()
            .clear_pages(HttpRange::new(offset, len), None)
            .await
            .map_err(|e| self.classify(&target, e))?;
        Ok(())
    }

    async fn read(
        &self,
        vm: &VmKey,
        disk: &str,
        at: &At,
        offset: u64,
        len: u64,
    ) -> Result<Bytes, StoreError> {
        let state = self.vm_state(vm);
        let (snapshot, size) = match at {
            At::Live => (None, self.live_size(vm, disk, &state).await?),
            At::Point(id) => {
                let (snapshot, size) = self.point_disk(vm, disk, id, &state).await?;
                (Some(snapshot), size)
            }
        };
        check_range(disk, offset, len, size, false)?;
        if len == 0 {
            return Ok(Bytes::new());
        }
        let target = Target {
            action: "read",
            what: format!("{offset}+{len} of {}", Self::what_disk(vm, disk)),
        };
        let want = usize::try_from(len).map_err(|_| StoreError::InvalidRequest {
            what: format!("a read of {len} bytes does not fit in memory"),
        })?;
        let mut buffer = vec![0u8; want];
        let client = self.blob_client(&disk_blob(vm, disk))?;
        let options = BlobClientDownloadOptions {
            range: Some(HttpRange::new(offset, len)),
            snapshot,
            parallel: Some(NonZero::<usize>::MIN),
            partition_size: NonZero::new(want),
            ..Default::default()
        };
        let _permit = self.permit(&state).await;
        let got = client
            .download_into(&mut buffer, Some(options))
            .await
            .map_err(|e| self.classify(&target, e))?;
        if got.len != want {
            return Err(StoreError::Corrupt {
                path: format!("{}/{}", self.container, disk_blob(vm, disk)),
                detail: format!(
                    "asked for {want} bytes at {offset}, the service sent {}",
                    got.len
                ),
            });
        }
        Ok(Bytes::from(buffer))
    }

    async fn data_ranges(
        &self,
        vm: &VmKey,
        disk: &str,
        at: &At,
    ) -> Result<Vec<Range<u64>>, StoreError> {
        let state = self.vm_state(vm);
        let (snapshot, size) = match at {
            At::Live => (None, self.live_size(vm, disk, &state).await?),
            At::Point(id) => {
                let (snapshot, size) = self.point_disk(vm, disk, id, &state).await?;
                (Some(snapshot), size)
            }
        };
        let target = Target {
            action: "list the page ranges of",
            what: Self::what_disk(vm, disk),
        };
        let client = self.blob_client(&disk_blob(vm, disk))?;
        let options = PageBlobClientListPageRangesOptions {
            snapshot,
            range: Some(HttpRange::new(0, size)),
            ..Default::default()
        };
        let _permit = self.permit(&state).await;
        let mut pages = client
            .page_blob_client()
            .list_page_ranges(Some(options))
            .map_err(|e| self.classify(&target, e))?;
        let mut ranges: Vec<Range<u64>> = Vec::new();
        while let Some(page) = pages
            .try_next()
            .await
            .map_err(|e| self.classify(&target, e))?
        {
            let list = page.into_model().map_err(|e| self.classify(&target, e))?;
            for r in list.page_ranges {
                let (Some(start), Some(end)) = (r.start, r.end) else {
                    continue;
                };
                let start = u64::try_from(start).unwrap_or(0);
                // The service's ends are inclusive; the footer lies past `size`.
                let end = u64::try_from(end).unwrap_or(0).saturating_add(1).min(size);
                if start < end {
                    ranges.push(start..end);
                }
            }
        }
        Ok(merge_ranges(ranges))
    }

    async fn flush(&self, _vm: &VmKey) -> Result<(), StoreError> {
        // NB: the service acknowledges a Put Page once it is durable (replicated within the
        // account), so there is nothing left to flush.
        Ok(())
    }

    async fn cut_point(&self, vm: &VmKey, point: NewPoint) -> Result<RecoveryPoint, StoreError> {
        let state = self.vm_state(vm);
        let mut cache = state.manifest.lock().await;
        let mut manifest = self
            .fetch_for_change(vm)
            .await?
            .ok_or_else(|| self.not_found(format!("VM {vm}")))?;
        let id = point_id(point.time_unix_ms, point.cycle);
        if let Some(existing) = manifest.point(&id) {
            let existing = crate::existing_point(existing, &point, &vm.to_string());
            *cache = Some(manifest);
            return existing;
        }
        if let Some(missing) = manifest
            .disks
            .iter()
            .find(|d| !point.digests.contains_key(&d.name))
        {
            return Err(StoreError::InvalidRequest {
                what: format!(
                    "recovery point {id} of VM {vm} has no digest for disk {:?}",
                    missing.name
                ),
            });
        }
        // Snapshot every disk first; only then name the snapshots in the manifest.
        let mut disks = Vec::with_capacity(manifest.disks.len());
        for d in &manifest.disks {
            let target = Target {
                action: "snapshot",
                what: Self::what_disk(vm, &d.name),
            };
            let name = disk_blob(vm, &d.name);
            let snapshot = async {
                let response = self
                    .blob_client(&name)?
                    .create_snapshot(None)
                    .await
                    .map_err(|e| self.classify(&target, e))?;
                response
                    .snapshot()
                    .ok()
                    .flatten()
                    .ok_or_else(|| StoreError::Corrupt {
                        path: format!("{}/{name}", self.container),
                        detail: "the service created a snapshot but did not say which".to_owned(),
                    })
            }
            .await;
            match snapshot {
                Ok(snapshot) => disks.push(PointDisk {
                    name: d.name.clone(),
                    size_bytes: d.size_bytes,
                    digest: point.digests.get(&d.name).cloned().ok_or_else(|| {
                        StoreError::InvalidRequest {
                            what: format!("no digest for disk {:?}", d.name),
                        }
                    })?,
                    store_ref: snapshot,
                }),
                Err(e) => {
                    // Best effort: these snapshots are named by no manifest.
                    for done in &disks {
                        let _ = self
                            .delete_blob(&disk_blob(vm, &done.name), Some(&done.store_ref))
                            .await;
                    }
                    return Err(e);
                }
            }
        }
        let new = RecoveryPoint {
            id,
            time_unix_ms: point.time_unix_ms,
            cycle: point.cycle,
            consistency: point.consistency,
            disks,
            written_by: point.written_by.clone(),
        };
        manifest.points.push(new.clone());
        manifest.points.sort_by(|a, b| {
            a.time_unix_ms
                .cmp(&b.time_unix_ms)
                .then_with(|| a.id.cmp(&b.id))
        });
        // NB: when this write fails we cannot tell whether the service applied it (a timeout
        // after the upload), so the snapshots stay: at worst orphans, never a manifest that
        // names a snapshot we deleted.
        *cache = None;
        self.store_manifest(vm, &manifest).await?;
        *cache = Some(manifest);
        Ok(new)
    }

    async fn delete_point(&self, vm: &VmKey, point_id: &str) -> Result<(), StoreError> {
        let state = self.vm_state(vm);
        let mut cache = state.manifest.lock().await;
        let Some(mut manifest) = self.fetch_for_change(vm).await? else {
            *cache = None;
            return Ok(());
        };
        let Some(at) = manifest.points.iter().position(|p| p.id == point_id) else {
            *cache = Some(manifest);
            return Ok(());
        };
        // NB: the manifest entry goes first, then the snapshots. The other order would leave,
        // after a crash in between, a manifest naming snapshots that no longer exist (a point
        // that cannot be failed over to); this order leaves at worst orphan snapshots, which
        // cost space but lie to nobody (`delete_vm` removes them).
        let point = manifest.points.remove(at);
        *cache = None;
        self.store_manifest(vm, &manifest).await?;
        *cache = Some(manifest.clone());
        drop(cache);
        for d in &point.disks {
            self.delete_blob(&disk_blob(vm, &d.name), Some(&d.store_ref))
                .await?;
            if manifest.disk(&d.name).is_none() {
                self.retire_disk_blob(vm, &d.name, &manifest).await?;
            }
        }
        Ok(())
    }

    async fn revert_to_latest_point(&self, vm: &VmKey) -> Result<(), StoreError> {
        let state = self.vm_state(vm);
        let mut cache = state.manifest.lock().await;
        let Some(mut manifest) = self.fetch_for_change(vm).await? else {
            *cache = None;
            return Ok(());
        };
        let Some(latest) = manifest.latest().cloned() else {
            *cache = Some(manifest);
            return Ok(());
        };
        let mut changed = false;
        for pd in &latest.disks {
            let Some(live) = manifest.disks.iter_mut().find(|d| d.name == pd.name) else {
                continue;
            };
            let target = Target {
                action: "revert to the latest point",
                what: Self::what_disk(vm, &pd.name),
            };
            // NB: Copy Blob from the point's snapshot onto its base blob ("promote a
            // snapshot"): works on Azure and Azurite, needs no diff API, and brings back the
            // point's size and footer too.
            self.restore_snapshot(&disk_blob(vm, &pd.name), &pd.store_ref, &target)
                .await?;
            if live.size_bytes != pd.size_bytes {
                live.size_bytes = pd.size_bytes;
                changed = true;
            }
        }
        if changed {
            *cache = None;
            self.store_manifest(vm, &manifest).await?;
        }
        *cache = Some(manifest);
        Ok(())
    }

    async fn manifest(&self, vm: &VmKey) -> Result<Option<Manifest>, StoreError> {
        let state = self.vm_state(vm);
        let mut cache = state.manifest.lock().await;
        let fetched = self.fetch_manifest(vm).await?;
        cache.clone_from(&fetched);
        Ok(fetched)
    }

    async fn put_block_map(
        &self,
        vm: &VmKey,
        disk: &str,
        encoded: Bytes,
    ) -> Result<(), StoreError> {
        check_disk_name(disk)?;
        let state = self.vm_state(vm);
        self.live_size(vm, disk, &state).await?;
        self.check_epoch(vm, &state).await?;
        self.put_small_blob(
            &map_blob(vm, disk),
            encoded,
            "write the block map",
            Condition::None,
        )
        .await
    }

    async fn block_map(&self, vm: &VmKey, disk: &str) -> Result<Option<Bytes>, StoreError> {
        check_disk_name(disk)?;
        self.download_small(&map_blob(vm, disk), "read the block map")
            .await
    }

    async fn put_definition(&self, vm: &VmKey, encoded: Bytes) -> Result<(), StoreError> {
        let Some(manifest) = self.manifest(vm).await? else {
            return Err(self.not_found(format!("VM {vm}")));
        };
        self.held.check(vm, &manifest.epoch)?;
        self.put_small_blob(
            &definition_blob(vm),
            encoded,
            "write the VM's definition",
            Condition::None,
        )
        .await
    }

    async fn definition(&self, vm: &VmKey) -> Result<Option<Bytes>, StoreError> {
        self.download_small(&definition_blob(vm), "read the VM's definition")
            .await
    }

    async fn list_vms(&self) -> Result<Vec<VmKey>, StoreError> {
        let mut vms: Vec<VmKey> = self
            .list_names("")
            .await?
            .iter()
            .filter_map(|name| {
                let mut parts = name.split('/');
                match (parts.next(), parts.next(), parts.next(), parts.next()) {
                    (Some(namespace), Some(vm), Some("manifest.json"), None) => {
                        VmKey::new(namespace, vm).ok()
                    }
                    _ => None,
                }
            })
            .collect();
        vms.sort();
        Ok(vms)
    }

    fn hold_epoch(&self, vm: &VmKey, epoch: u64) {
        self.held.hold(vm, epoch);
    }

    async fn epoch(&self, vm: &VmKey) -> Result<crate::Epoch, StoreError> {
        Ok(self
            .fetch_manifest(vm)
            .await?
            .map(|m| m.epoch)
            .unwrap_or_default())
    }

    async fn fence(
        &self,
        vm: &VmKey,
        holder: &str,
        now_unix_ms: u64,
    ) -> Result<crate::Epoch, StoreError> {
        let state = self.vm_state(vm);
        let mut cache = state.manifest.lock().await;
        *cache = None;
        let (manifest, etag) = self.fetch_manifest_tagged(vm).await?;
        let mut manifest = manifest.ok_or_else(|| self.not_found(format!("VM {vm}")))?;
        manifest.epoch = manifest.epoch.next(holder, now_unix_ms);
        // NB: conditional on what was read: a writer's manifest update in between makes this
        // fail (StoreConflict, recoverable), and the fence is tried again on top of it.
        let condition = etag.map_or(Condition::Absent, Condition::Match);
        self.put_small_blob(
            &manifest_blob(vm),
            manifest.to_json().into(),
            "fence the VM (write the manifest with a new epoch)",
            condition,
        )
        .await?;
        self.held.hold(vm, manifest.epoch.number);
        *lock(&state.epoch_checked) = Some(std::time::Instant::now());
        let epoch = manifest.epoch.clone();
        *cache = Some(manifest);
        Ok(epoch)
    }

    async fn delete_vm(&self, vm: &VmKey) -> Result<(), StoreError> {
        let state = self.vm_state(vm);
        let mut cache = state.manifest.lock().await;
        if let Some(manifest) = self.fetch_manifest(vm).await? {
            self.held.check(vm, &manifest.epoch)?;
        }
        *cache = None;
        // NB: the manifest first: once it is gone the VM reads as absent; the blobs under its
        // prefix are then deleted (a retry after a crash lists and deletes what is left).
        self.delete_blob(&manifest_blob(vm), None).await?;
        let prefix = format!("{}/{}/", vm.namespace(), vm.name());
        for name in self.list_names(&prefix).await? {
            self.delete_blob(&name, None).await?;
        }
        Ok(())
    }
}
