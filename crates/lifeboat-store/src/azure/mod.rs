//! The replica store on Azure Blob Storage, through the official `azure_storage_blob` crate.
//!
//! ```text
//!   container
//!   └── <namespace>/<vm>/
//!       ├── manifest.json        block blob, replaced whole by one Put Blob (atomic)
//!       ├── disks/<disk>.vhd     page blob: the live replica as a fixed VHD (data, footer)
//!       │     └── snapshots      one per recovery point (`store_ref` = snapshot timestamp)
//!       ├── maps/<disk>.map      block blob: the live replica's block map
//!       └── definition.json      block blob: the VM's definition as the agent applied it
//! ```
//!
//! Reads and writes address the virtual disk; the VHD footer sits past the data (see [`vhd`])
//! and is never exposed. Azure's limits (512-byte pages, 4 MiB per Put Page, 8 TiB per blob)
//! are checked here, because Azurite does not.
//!
//! # Authentication
//!
//! [`Credentials`]: an account key (Shared Key, signed by [`shared_key::SharedKeyPolicy`], a
//! pipeline policy of ours because the official crate signs with Entra tokens only), a SAS
//! token (appended to every URL), or an `azure_identity` token credential (workload or managed
//! identity; the SDK refuses those on plain-http URLs). No credential is ever formatted into
//! a `Debug`, a log line or an error.
//!
//! # Errors
//!
//! Throttling (429, 503), timeouts, other 5xx and connection failures are retried by the
//! SDK's retry policy (exponential, see [`AzureStoreOptions`]) and, when retries run out,
//! surface as the recoverable [`StoreError::Unreachable`]. 401/403 are
//! [`StoreError::AccessDenied`] naming the account; a missing container, blob or account is
//! [`StoreError::NotFound`]; neither is retried.
//!
//! # Caveats
//!
//! Each VM's manifest is read-modified-written under a per-store lock: one store (one agent)
//! owns a VM at a time, as the operator guarantees. Disk sizes for the hot path (write, read)
//! come from a cached manifest that this store refreshes whenever it reads or writes it.
//!
//! # Files
//!
//! - `mod.rs` (here): the [`AzureStore`] type, its construction, the per-VM state (request
//!   slots, cached manifest), the manifest's reads and writes, and the blob primitives the
//!   store is built from (footers, snapshot copies, deletes, listings).
//! - `pipeline.rs`: [`Credentials`], [`AzureStoreOptions`], the HTTP pipeline built from
//!   them (policies, retries, transport), the clients and URLs, and the mapping of errors.
//! - `store.rs`: the [`ReplicaStore`] operations over page blobs and their snapshots.
//! - [`shared_key`]: the Shared Key signature and SAS tokens; [`vhd`]: the fixed VHD footer.
//! - `tests.rs`, `token_tests.rs`: the tests, against Azurite (Shared Key and SAS; bearer
//!   tokens over https).

pub mod shared_key;
pub mod vhd;

mod pipeline;
mod store;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod token_tests;

use crate::{Manifest, ReplicaStore, StoreError, VmKey, check_disk_name};
use azure_core::http::{ClientOptions, Etag, Url};
use azure_storage_blob::BlobClient;
use azure_storage_blob::models::{
    BlobClientDeleteOptions, BlobClientGetPropertiesResultHeaders as _,
    BlobClientStartCopyFromUrlResultHeaders as _, BlobClientUploadOptions,
    BlobContainerClientListBlobsOptions, CopyStatus, DeleteSnapshotsOptionType, HttpRange,
};
use bytes::Bytes;
use futures::TryStreamExt as _;
use pipeline::{Pipeline, Target, error_code};
use std::collections::HashMap;
use std::fmt;
use std::num::NonZero;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;

pub use pipeline::{AzureStoreOptions, Credentials, MAX_UPLOAD_CONCURRENCY};
pub use shared_key::{AccountKey, AccountSasGrant, account_sas, container_sas};

/// Per-VM state: the bound on requests in flight, the cached manifest (whose lock also
/// serialises the VM's manifest updates), the ETag of the manifest last read for a change
/// (the next manifest write is conditional on it), and when this store last saw the VM at the
/// epoch it holds.
#[derive(Debug)]
struct VmState {
    permits: Semaphore,
    manifest: tokio::sync::Mutex<Option<Manifest>>,
    etag: Mutex<Option<Etag>>,
    epoch_checked: Mutex<Option<Instant>>,
}

/// How long a data write trusts the last look at the VM's epoch. Manifest writes (points,
/// disks) are always conditional; data writes to the live blob look at most this often, so a
/// writer fenced while it writes pages stops within this time, never having changed a point
/// (snapshots are immutable) or the manifest.
const EPOCH_RECHECK: Duration = Duration::from_secs(1);

/// The replica store on an Azure Blob Storage container (see the module docs).
pub struct AzureStore {
    /// `scheme://host[:port]/[account/]container`, without any query.
    container_url: String,
    account: String,
    container: String,
    /// The SAS token's query, appended to every URL.
    sas: Option<String>,
    /// The https-only rule of the SDK for token credentials.
    uses_token: bool,
    client_options: ClientOptions,
    /// Strings that must never appear in a message: the key, the SAS and its signature.
    secrets: Vec<String>,
    upload_concurrency: usize,
    vms: Mutex<HashMap<VmKey, Arc<VmState>>>,
    held: crate::fence::Held,
}

impl fmt::Debug for AzureStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AzureStore")
            .field("container_url", &self.container_url)
            .field("account", &self.account)
            .field("container", &self.container)
            .field(
                "auth",
                &if self.sas.is_some() {
                    "sas"
                } else if self.uses_token {
                    "token"
                } else {
                    "shared key"
                },
            )
            .field("upload_concurrency", &self.upload_concurrency)
            .finish_non_exhaustive()
    }
}

impl AzureStore {
    /// A store on `container` of the account at `account_url` (`https://ACCOUNT.blob.core.windows.net`,
    /// or Azurite's path-style `http://127.0.0.1:PORT/devstoreaccount1`).
    ///
    /// # Errors
    ///
    /// [`StoreError::InvalidRequest`] for a bad URL, container name, concurrency or a token
    /// credential on plain http; [`StoreError::AccessDenied`] for a key that is not base64.
    pub fn new(
        account_url: &str,
        container: &str,
        credentials: Credentials,
        options: AzureStoreOptions,
    ) -> Result<AzureStore, StoreError> {
        let invalid = |what: String| StoreError::InvalidRequest { what };
        if !(1..=MAX_UPLOAD_CONCURRENCY).contains(&options.upload_concurrency) {
            return Err(invalid(format!(
                "upload concurrency {} is outside 1..={MAX_UPLOAD_CONCURRENCY}",
                options.upload_concurrency
            )));
        }
        if !crate::is_dns_name(container) || container.contains('.') || container.len() < 3 {
            return Err(invalid(format!(
                "container name {container:?} is not a valid Azure container name"
            )));
        }
        let base = Url::parse(account_url)
            .map_err(|e| invalid(format!("account URL {account_url:?}: {e}")))?;
        if base.query().is_some() {
            return Err(invalid(
                "the account URL carries a query: pass a SAS as Credentials::Sas".to_owned(),
            ));
        }
        let container_url = format!("{}/{container}", base.as_str().trim_end_matches('/'));
        let Pipeline {
            account,
            sas,
            uses_token,
            client_options,
            secrets,
        } = Pipeline::new(&base, credentials, &options)?;
        Ok(AzureStore {
            container_url,
            account,
            container: container.to_owned(),
            sas,
            uses_token,
            client_options,
            secrets,
            upload_concurrency: options.upload_concurrency,
            vms: Mutex::new(HashMap::new()),
            held: crate::fence::Held::default(),
        })
    }

    /// Create the container if it does not exist (for setup and tests; the replication path
    /// expects it to exist and reports a missing one as [`StoreError::NotFound`]).
    ///
    /// # Errors
    ///
    /// As the other calls, classified.
    pub async fn ensure_container(&self) -> Result<(), StoreError> {
        let target = Target {
            action: "create the container",
            what: self.container_what(),
        };
        let client = self.container_client(&target)?;
        match client.create(None).await {
            Ok(_) => Ok(()),
            Err(e) if error_code(&e).as_deref() == Some("ContainerAlreadyExists") => Ok(()),
            Err(e) => Err(self.classify(&target, e)),
        }
    }

    fn vm_state(&self, vm: &VmKey) -> Arc<VmState> {
        let mut vms = self
            .vms
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        vms.entry(vm.clone())
            .or_insert_with(|| {
                Arc::new(VmState {
                    permits: Semaphore::new(self.upload_concurrency),
                    manifest: tokio::sync::Mutex::new(None),
                    etag: Mutex::new(None),
                    epoch_checked: Mutex::new(None),
                })
            })
            .clone()
    }

    /// Take one of the VM's request slots (held until the permit drops).
    async fn permit<'a>(&self, state: &'a VmState) -> Option<tokio::sync::SemaphorePermit<'a>> {
        // NB: the semaphore is never closed, so `acquire` cannot fail.
        state.permits.acquire().await.ok()
    }

    fn what_disk(vm: &VmKey, disk: &str) -> String {
        format!("disk {disk:?} of VM {vm}")
    }

    fn not_found(&self, what: String) -> StoreError {
        StoreError::NotFound {
            what,
            store: self.describe(),
        }
    }

    // ---- manifests ----

    /// The whole of a small blob (a manifest, a block map); `None` when it is absent.
    pub(super) async fn download_small(
        &self,
        name: &str,
        action: &'static str,
    ) -> Result<Option<Bytes>, StoreError> {
        let target = Target {
            action,
            what: format!("blob {name:?}"),
        };
        let client = self.blob_client(name)?;
        let response = match client.download(None).await {
            Ok(response) => response,
            Err(e) if error_code(&e).as_deref() == Some("BlobNotFound") => return Ok(None),
            Err(e) => return Err(self.classify(&target, e)),
        };
        let bytes = response
            .body
            .collect()
            .await
            .map_err(|e| self.classify(&target, e))?;
        Ok(Some(bytes))
    }

    /// Fetch the manifest from the service (None when the blob is absent).
    async fn fetch_manifest(&self, vm: &VmKey) -> Result<Option<Manifest>, StoreError> {
        Ok(self.fetch_manifest_tagged(vm).await?.0)
    }

    /// Fetch the manifest for a change (callers hold the manifest lock until they wrote it),
    /// remembering its ETag for the conditional write that follows; refused with
    /// [`StoreError::Fenced`] when the VM is at another epoch than the one this store holds.
    async fn fetch_for_change(&self, vm: &VmKey) -> Result<Option<Manifest>, StoreError> {
        let (manifest, etag) = self.fetch_manifest_tagged(vm).await?;
        *lock(&self.vm_state(vm).etag) = etag;
        if let Some(m) = &manifest {
            self.held.check(vm, &m.epoch)?;
            *lock(&self.vm_state(vm).epoch_checked) = Some(Instant::now());
        }
        Ok(manifest)
    }

    /// Before a data write: refused when the VM moved to another epoch, looked up at most
    /// once per [`EPOCH_RECHECK`].
    async fn check_epoch(&self, vm: &VmKey, state: &VmState) -> Result<(), StoreError> {
        if self.held.get(vm).is_none() {
            return Ok(());
        }
        let fresh = lock(&state.epoch_checked).is_some_and(|at| at.elapsed() < EPOCH_RECHECK);
        if fresh {
            return Ok(());
        }
        if let (Some(manifest), _) = self.fetch_manifest_tagged(vm).await? {
            self.held.check(vm, &manifest.epoch)?;
        }
        *lock(&state.epoch_checked) = Some(Instant::now());
        Ok(())
    }

    /// The manifest and its ETag, as the service has them now.
    async fn fetch_manifest_tagged(
        &self,
        vm: &VmKey,
    ) -> Result<(Option<Manifest>, Option<Etag>), StoreError> {
        let name = manifest_blob(vm);
        let target = Target {
            action: "read the manifest",
            what: format!("blob {name:?}"),
        };
        let client = self.blob_client(&name)?;
        let response = match client.download(None).await {
            Ok(response) => response,
            Err(e) if error_code(&e).as_deref() == Some("BlobNotFound") => return Ok((None, None)),
            Err(e) => return Err(self.classify(&target, e)),
        };
        let etag = response.properties.etag.clone();
        let bytes = response
            .body
            .collect()
            .await
            .map_err(|e| self.classify(&target, e))?;
        let manifest = Manifest::from_json(&bytes).map_err(|detail| StoreError::Corrupt {
            path: format!("{}/{name}", self.container),
            detail,
        })?;
        if manifest.vm != vm.to_string() {
            return Err(StoreError::Corrupt {
                path: format!("{}/{name}", self.container),
                detail: format!("the manifest is for VM {}, not {vm}", manifest.vm),
            });
        }
        Ok((Some(manifest), etag))
    }

    /// Replace the manifest with one Put Blob (atomic on the service), conditional on the
    /// ETag of the manifest read for this change (none: only if no manifest exists), so that
    /// of two writers racing one wins; the loser reads again and learns whether it was
    /// fenced ([`StoreError::Fenced`]) or raced at its own epoch ([`StoreError::Conflict`]).
    async fn store_manifest(&self, vm: &VmKey, manifest: &Manifest) -> Result<(), StoreError> {
        let name = manifest_blob(vm);
        let json = manifest.to_json();
        self.held.check(vm, &manifest.epoch)?;
        let state = self.vm_state(vm);
        let condition = match lock(&state.etag).take() {
            Some(etag) => Condition::Match(etag),
            None => Condition::Absent,
        };
        match self
            .put_small_blob(&name, json.into(), "write the manifest", condition)
            .await
        {
            Err(StoreError::Conflict { what, store }) => {
                if let (Some(now), _) = self.fetch_manifest_tagged(vm).await? {
                    self.held.check(vm, &now.epoch)?;
                }
                Err(StoreError::Conflict { what, store })
            }
            other => other,
        }
    }

    async fn put_small_blob(
        &self,
        name: &str,
        body: Bytes,
        action: &str,
        condition: Condition,
    ) -> Result<(), StoreError> {
        let target = Target {
            action,
            what: format!("blob {name:?}"),
        };
        let client = self.blob_client(name)?;
        // NB: one partition as large as the body: the SDK then sends a single Put Blob, which
        // the service applies atomically (no staged blocks a crash could leave half-done).
        let size = NonZero::new(u64::try_from(body.len()).unwrap_or(u64::MAX).max(1))
            .unwrap_or(NonZero::<u64>::MIN);
        let mut options = BlobClientUploadOptions {
            partition_size: Some(size),
            ..Default::default()
        };
        match condition {
            Condition::None => {}
            Condition::Match(etag) => options.if_match = Some(etag),
            Condition::Absent => options.if_none_match = Some(Etag::from("*")),
        }
        match client.upload(body.into(), Some(options)).await {
            Ok(_) => Ok(()),
            Err(e)
                if matches!(
                    error_code(&e).as_deref(),
                    Some("ConditionNotMet" | "BlobAlreadyExists")
                ) =>
            {
                Err(StoreError::Conflict {
                    what: format!("blob {name:?}"),
                    store: self.describe(),
                })
            }
            Err(e) => Err(self.classify(&target, e)),
        }
    }

    /// The manifest, from the cache or the service; `NotFound` when the VM has none.
    async fn cached_manifest(&self, vm: &VmKey, state: &VmState) -> Result<Manifest, StoreError> {
        let mut cached = state.manifest.lock().await;
        if let Some(m) = cached.as_ref() {
            return Ok(m.clone());
        }
        let fetched = self
            .fetch_manifest(vm)
            .await?
            .ok_or_else(|| self.not_found(format!("VM {vm}")))?;
        *cached = Some(fetched.clone());
        Ok(fetched)
    }

    /// The live size of a disk, from the cached manifest.
    async fn live_size(&self, vm: &VmKey, disk: &str, state: &VmState) -> Result<u64, StoreError> {
        check_disk_name(disk)?;
        let manifest = self.cached_manifest(vm, state).await?;
        manifest
            .disk(disk)
            .map(|d| d.size_bytes)
            .ok_or_else(|| self.not_found(Self::what_disk(vm, disk)))
    }

    /// The snapshot and size of a disk at a point (refreshing the cache once when the point
    /// is not in it).
    async fn point_disk(
        &self,
        vm: &VmKey,
        disk: &str,
        id: &str,
        state: &VmState,
    ) -> Result<(String, u64), StoreError> {
        check_disk_name(disk)?;
        let find = |m: &Manifest| {
            m.point(id).map(|p| {
                p.disks
                    .iter()
                    .find(|d| d.name == disk)
                    .map(|d| (d.store_ref.clone(), d.size_bytes))
            })
        };
        let manifest = self.cached_manifest(vm, state).await?;
        let found = match find(&manifest) {
            Some(found) => found,
            None => {
                let fresh = self
                    .fetch_manifest(vm)
                    .await?
                    .ok_or_else(|| self.not_found(format!("VM {vm}")))?;
                let found = find(&fresh);
                *state.manifest.lock().await = Some(fresh);
                found.ok_or_else(|| self.not_found(format!("recovery point {id:?} of VM {vm}")))?
            }
        };
        found.ok_or_else(|| {
            self.not_found(format!("disk {disk:?} at recovery point {id:?} of VM {vm}"))
        })
    }

    // ---- blobs ----

    /// Delete a blob (and its snapshots), or one snapshot; absent is fine.
    async fn delete_blob(&self, name: &str, snapshot: Option<&str>) -> Result<(), StoreError> {
        let target = Target {
            action: "delete",
            what: format!("blob {name:?}"),
        };
        let client = self.blob_client(name)?;
        let options = BlobClientDeleteOptions {
            delete_snapshots: if snapshot.is_none() {
                Some(DeleteSnapshotsOptionType::Include)
            } else {
                None
            },
            snapshot: snapshot.map(str::to_owned),
            ..Default::default()
        };
        match client.delete(Some(options)).await {
            Ok(_) => Ok(()),
            Err(e) if error_code(&e).as_deref() == Some("BlobNotFound") => Ok(()),
            Err(e) => Err(self.classify(&target, e)),
        }
    }

    /// Write the VHD footer for a disk of `size_bytes` at the end of its data.
    async fn write_footer(
        &self,
        client: &BlobClient,
        size_bytes: u64,
        target: &Target<'_>,
    ) -> Result<(), StoreError> {
        let data = vhd::data_size_bytes(size_bytes);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let id = twox_hash::XxHash3_128::oneshot(
            format!("{}/{}/{now}", self.container_url, target.what).as_bytes(),
        );
        let footer = vhd::footer(data, now, id.to_be_bytes());
        client
            .page_blob_client()
            .upload_pages(
                Bytes::copy_from_slice(&footer).into(),
                vhd::FOOTER_SIZE_BYTES,
                HttpRange::new(data, vhd::FOOTER_SIZE_BYTES),
                None,
            )
            .await
            .map_err(|e| self.classify(target, e))?;
        Ok(())
    }

    /// Copy a snapshot over its base blob and wait for the copy to finish, at most
    /// [`RESTORE_DEADLINE`].
    ///
    /// # Errors
    ///
    /// The recoverable [`StoreError::Unreachable`], naming the blob, when the copy failed or
    /// was aborted, when the service's copy status is missing or unreadable (never taken for
    /// a success), or when the copy is still pending at the deadline.
    async fn restore_snapshot(
        &self,
        name: &str,
        snapshot: &str,
        target: &Target<'_>,
    ) -> Result<(), StoreError> {
        self.copy_snapshot(name, snapshot, name, target).await
    }

    /// Copy snapshot `snapshot` of blob `source` onto blob `name` (created or replaced),
    /// server-side, and wait for the copy to finish (as [`AzureStore::restore_snapshot`]).
    async fn copy_snapshot(
        &self,
        source: &str,
        snapshot: &str,
        name: &str,
        target: &Target<'_>,
    ) -> Result<(), StoreError> {
        let client = self.blob_client(name)?;
        let source = self.snapshot_source_url(source, snapshot)?;
        let started = client
            .start_copy_from_url(source, None)
            .await
            .map_err(|e| self.classify(target, e))?;
        let first = copy_state(started.copy_status(), None);
        let failed = |detail: String| StoreError::Unreachable {
            store: self.describe(),
            action: format!("{} {} (blob {name})", target.action, target.what),
            detail,
        };
        // NB: within one account a copy is usually done when the call returns; on a busy
        // account it may stay pending for a while: poll with a growing delay, up to a deadline.
        let polled = wait_for_copy(first, RESTORE_DEADLINE, || async {
            let props = client
                .get_properties(None)
                .await
                .map_err(|e| self.classify(target, e))?;
            Ok(copy_state(
                props.copy_status(),
                props.copy_status_description().ok().flatten(),
            ))
        })
        .await?;
        polled.map_err(failed)
    }

    /// Recover `point` of `vm` into new page blobs, `recovered/<namespace>/<vm>/<label>/<disk>.vhd`
    /// in the store's container: server-side copies of the point's snapshots, so nothing
    /// travels through this machine. Each is a fixed VHD (data, then the footer), which Azure
    /// takes as the source of a managed disk (`az disk create --source URL`). They live outside
    /// the VM's prefix: deleting the VM's replica leaves them. Returns each disk's name and URL
    /// (without credentials).
    ///
    /// # Errors
    ///
    /// As the other calls; a copy that failed or did not finish is recoverable.
    pub async fn recover_point_to_blobs(
        &self,
        vm: &VmKey,
        point: &crate::RecoveryPoint,
        label: &str,
    ) -> Result<Vec<(String, String)>, StoreError> {
        if !crate::is_dns_name(label) {
            return Err(StoreError::InvalidRequest {
                what: format!("recovery label {label:?}: lowercase letters, digits and hyphens"),
            });
        }
        let mut made = Vec::with_capacity(point.disks.len());
        for disk in &point.disks {
            let name = recovered_blob(vm, label, &disk.name);
            let target = Target {
                action: "recover into a new blob",
                what: format!("{} at point {}", Self::what_disk(vm, &disk.name), point.id),
            };
            self.copy_snapshot(&disk_blob(vm, &disk.name), &disk.store_ref, &name, &target)
                .await?;
            made.push((disk.name.clone(), format!("{}/{name}", self.container_url)));
        }
        Ok(made)
    }

    /// List every blob name under a prefix.
    async fn list_names(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        let target = Target {
            action: "list",
            what: format!("blobs under {prefix:?}"),
        };
        let client = self.container_client(&target)?;
        let options = BlobContainerClientListBlobsOptions {
            // NB: no empty `prefix=` in the query: it is signed as an empty value and the
            // service then refuses the signature (403).
            prefix: (!prefix.is_empty()).then(|| prefix.to_owned()),
            ..Default::default()
        };
        let mut pager = client
            .list_blobs(Some(options))
            .map_err(|e| self.classify(&target, e))?;
        let mut names = Vec::new();
        while let Some(item) = pager
            .try_next()
            .await
            .map_err(|e| self.classify(&target, e))?
        {
            if let Some(name) = item.name {
                names.push(name);
            }
        }
        Ok(names)
    }

    /// Clean up a disk blob no longer in the manifest: delete it with its snapshots when no
    /// point needs it, or else empty it (the points' snapshots keep their data).
    async fn retire_disk_blob(
        &self,
        vm: &VmKey,
        disk: &str,
        manifest: &Manifest,
    ) -> Result<(), StoreError> {
        let name = disk_blob(vm, disk);
        let needed = manifest
            .points
            .iter()
            .any(|p| p.disks.iter().any(|d| d.name == disk));
        if !needed {
            return self.delete_blob(&name, None).await;
        }
        let target = Target {
            action: "empty the deleted disk",
            what: Self::what_disk(vm, disk),
        };
        let client = self.blob_client(&name)?;
        match client.page_blob_client().resize(0, None).await {
            Ok(_) => Ok(()),
            Err(e) if error_code(&e).as_deref() == Some("BlobNotFound") => Ok(()),
            Err(e) => Err(self.classify(&target, e)),
        }
    }
}

/// Blob names: `<namespace>/<vm>/disks/<disk>.vhd`.
fn disk_blob(vm: &VmKey, disk: &str) -> String {
    format!("{}/{}/disks/{disk}.vhd", vm.namespace(), vm.name())
}

/// What a small blob's upload is conditional on.
enum Condition {
    /// Nothing: replace whatever is there.
    None,
    /// The blob still has this ETag.
    Match(Etag),
    /// No blob of that name exists.
    Absent,
}

/// A std mutex's guard, poisoned or not (the values behind these are plain data).
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// `recovered/<namespace>/<vm>/<label>/<disk>.vhd`: a disk recovered into a blob of its own.
pub fn recovered_blob(vm: &VmKey, label: &str, disk: &str) -> String {
    format!(
        "recovered/{}/{}/{label}/{disk}.vhd",
        vm.namespace(),
        vm.name()
    )
}

/// `<namespace>/<vm>/manifest.json`.
fn manifest_blob(vm: &VmKey) -> String {
    format!("{}/{}/manifest.json", vm.namespace(), vm.name())
}

fn definition_blob(vm: &VmKey) -> String {
    format!("{}/{}/definition.json", vm.namespace(), vm.name())
}

/// `<namespace>/<vm>/maps/<disk>.map`.
fn map_blob(vm: &VmKey, disk: &str) -> String {
    format!("{}/{}/maps/{disk}.map", vm.namespace(), vm.name())
}

/// How long a revert waits for a copy from a snapshot that stays pending: then it fails,
/// recoverably, and is tried again later (the blob is left as the copy leaves it; a revert
/// always starts a new copy).
const RESTORE_DEADLINE: Duration = Duration::from_secs(15 * 60);

/// Where a copy stands, from the service's `x-ms-copy-status`: `Ok(true)` done, `Ok(false)`
/// pending, `Err` why it did not succeed. A status that is missing or does not parse is an
/// error, never a success.
fn copy_state<E: fmt::Display>(
    status: Result<Option<CopyStatus>, E>,
    description: Option<String>,
) -> Result<bool, String> {
    let why = description.map(|d| format!(": {d}")).unwrap_or_default();
    match status {
        Ok(Some(CopyStatus::Success)) => Ok(true),
        Ok(Some(CopyStatus::Pending)) => Ok(false),
        Ok(Some(other)) => Err(format!(
            "the copy from the snapshot ended as {other:?}{why}"
        )),
        Ok(None) => Err("the service did not say how the copy from the snapshot ended".into()),
        Err(e) => Err(format!(
            "the copy from the snapshot has a status that cannot be read: {e}"
        )),
    }
}

/// Wait until a copy that started as `first` is done: `poll` reads its state again, with a
/// growing delay, until it is no longer pending or `deadline` has passed. The outer error is
/// `poll`'s own (the request failed); the inner one says why the copy did not succeed.
async fn wait_for_copy<F, Fut>(
    first: Result<bool, String>,
    deadline: Duration,
    mut poll: F,
) -> Result<Result<(), String>, StoreError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Result<bool, String>, StoreError>>,
{
    let until = tokio::time::Instant::now() + deadline;
    let mut state = first;
    let mut delay = Duration::from_millis(50);
    loop {
        match state {
            Ok(true) => return Ok(Ok(())),
            Err(why) => return Ok(Err(why)),
            Ok(false) => {}
        }
        let now = tokio::time::Instant::now();
        if now >= until {
            return Ok(Err(format!(
                "timed out: the copy from the snapshot was still pending after {} s",
                deadline.as_secs_f64()
            )));
        }
        tokio::time::sleep(delay.min(until - now)).await;
        delay = (delay * 2).min(Duration::from_secs(5));
        state = poll().await?;
    }
}
