//! The replica store on Azure Blob Storage, through the official `azure_storage_blob` crate.
//!
//! ```text
//!   container
//!   └── <namespace>/<vm>/
//!       ├── manifest.json        block blob, replaced whole by one Put Blob (atomic)
//!       ├── disks/<disk>.vhd     page blob: the live replica as a fixed VHD (data, footer)
//!       │     └── snapshots      one per recovery point (`store_ref` = snapshot timestamp)
//!       └── maps/<disk>.map      block blob: the live replica's block map
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

pub mod shared_key;
pub mod vhd;

#[cfg(test)]
mod tests;

use crate::manifest::point_id;
use crate::{
    At, Manifest, ManifestDisk, NewPoint, PointDisk, RecoveryPoint, ReplicaStore, StoreError,
    VmKey, check_disk_name, check_disk_size, check_range,
};
use async_trait::async_trait;
use azure_core::credentials::TokenCredential;
use azure_core::error::ErrorKind;
use azure_core::http::policies::auth::BearerTokenAuthorizationPolicy;
use azure_core::http::policies::{Policy, PolicyResult};
use azure_core::http::{
    ClientOptions, Context, ExponentialRetryOptions, HttpClientOptions, Request, RetryOptions,
    Transport, Url, new_http_client,
};
use azure_storage_blob::models::{
    BlobClientCreateSnapshotResultHeaders as _, BlobClientDeleteOptions, BlobClientDownloadOptions,
    BlobClientGetPropertiesResultHeaders as _, BlobClientStartCopyFromUrlResultHeaders as _,
    BlobClientUploadOptions, BlobContainerClientListBlobsOptions, CopyStatus,
    DeleteSnapshotsOptionType, HttpRange, PageBlobClientListPageRangesOptions,
};
use azure_storage_blob::{
    BlobClient, BlobClientOptions, BlobContainerClient, BlobContainerClientOptions,
};
use bytes::Bytes;
use futures::TryStreamExt as _;
use std::collections::HashMap;
use std::fmt;
use std::num::NonZero;
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Semaphore;

pub use shared_key::{AccountKey, AccountSasGrant, account_sas, container_sas};

/// The most requests in flight per VM that [`AzureStoreOptions::upload_concurrency`] allows
/// (ASR's "upload threads per VM" maximum).
pub const MAX_UPLOAD_CONCURRENCY: usize = 32;

/// How the store proves who it is. Built by the caller from the environment or a Kubernetes
/// Secret; `Debug` never shows a key, a token or a SAS.
#[derive(Clone)]
pub enum Credentials {
    /// A storage account key (base64, as the portal shows it): Shared Key authorization.
    AccountKey {
        /// The storage account's name.
        account: String,
        /// The key, base64.
        key: String,
    },
    /// A SAS token (the query string, with or without the leading `?`), appended to every URL.
    Sas {
        /// The token.
        token: String,
    },
    /// An Entra ID token credential: workload identity, managed identity, or any other
    /// `azure_identity` credential. Needs an `https` account URL.
    TokenCredential(Arc<dyn TokenCredential>),
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Credentials::AccountKey { account, .. } => f
                .debug_struct("AccountKey")
                .field("account", account)
                .field("key", &"<redacted>")
                .finish(),
            Credentials::Sas { .. } => f.debug_struct("Sas").field("token", &"<redacted>").finish(),
            Credentials::TokenCredential(_) => f.write_str("TokenCredential(..)"),
        }
    }
}

impl Credentials {
    /// Kubernetes workload identity (the `AZURE_CLIENT_ID`, `AZURE_TENANT_ID` and
    /// `AZURE_FEDERATED_TOKEN_FILE` variables that the webhook injects).
    ///
    /// # Errors
    ///
    /// [`StoreError::AccessDenied`] when the environment lacks what workload identity needs.
    pub fn workload_identity() -> Result<Credentials, StoreError> {
        let credential = azure_identity::WorkloadIdentityCredential::new(None).map_err(|e| {
            StoreError::AccessDenied {
                store: "Azure Blob Storage".to_owned(),
                action: "set up workload identity".to_owned(),
                detail: e.to_string(),
            }
        })?;
        Ok(Credentials::TokenCredential(credential))
    }

    /// The managed identity of the node (system-assigned), or the user-assigned one with
    /// `client_id`.
    ///
    /// # Errors
    ///
    /// [`StoreError::AccessDenied`] when no managed identity source can be set up.
    pub fn managed_identity(client_id: Option<String>) -> Result<Credentials, StoreError> {
        let options = azure_identity::ManagedIdentityCredentialOptions {
            user_assigned_id: client_id.map(azure_identity::UserAssignedId::ClientId),
            ..Default::default()
        };
        let credential =
            azure_identity::ManagedIdentityCredential::new(Some(options)).map_err(|e| {
                StoreError::AccessDenied {
                    store: "Azure Blob Storage".to_owned(),
                    action: "set up managed identity".to_owned(),
                    detail: e.to_string(),
                }
            })?;
        Ok(Credentials::TokenCredential(credential))
    }
}

/// Tuning of an [`AzureStore`].
#[derive(Clone, Debug)]
pub struct AzureStoreOptions {
    /// Requests in flight per VM, 1 to [`MAX_UPLOAD_CONCURRENCY`] (the policy's upload
    /// concurrency; ASR's default is 4).
    pub upload_concurrency: usize,
    /// Retries of a request that failed transiently (429, 5xx, timeout, connection) before
    /// the store reports [`StoreError::Unreachable`].
    pub max_retries: u32,
    /// The first retry's delay; it doubles up to [`AzureStoreOptions::max_retry_delay`].
    pub initial_retry_delay: Duration,
    /// The longest delay between retries.
    pub max_retry_delay: Duration,
    /// How long one try may wait for the response's headers.
    pub request_timeout: Duration,
}

impl Default for AzureStoreOptions {
    fn default() -> Self {
        AzureStoreOptions {
            upload_concurrency: 4,
            max_retries: 5,
            initial_retry_delay: Duration::from_millis(800),
            max_retry_delay: Duration::from_secs(30),
            request_timeout: Duration::from_secs(60),
        }
    }
}

/// Per-VM state: the bound on requests in flight, and the cached manifest (whose lock also
/// serialises the VM's manifest updates).
#[derive(Debug)]
struct VmState {
    permits: Semaphore,
    manifest: tokio::sync::Mutex<Option<Manifest>>,
}

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

/// Bounds each try of a request, so that a stalled connection becomes a retryable I/O error.
#[derive(Debug)]
struct TimeoutPolicy {
    timeout: Duration,
}

#[async_trait]
impl Policy for TimeoutPolicy {
    async fn send(
        &self,
        ctx: &Context,
        request: &mut Request,
        next: &[Arc<dyn Policy>],
    ) -> PolicyResult {
        let Some((first, rest)) = next.split_first() else {
            return Err(azure_core::Error::with_message(
                ErrorKind::Other,
                "timeout policy is the last in the pipeline",
            ));
        };
        match tokio::time::timeout(self.timeout, first.send(ctx, request, rest)).await {
            Ok(result) => result,
            Err(_) => Err(azure_core::Error::with_message(
                ErrorKind::Io,
                format!("no response within {} s", self.timeout.as_secs_f32()),
            )),
        }
    }
}

/// NB: the struct update keeps this compiling when the SDK adds fields (as the SDK itself
/// does for the same options).
#[allow(clippy::needless_update)]
fn http_client_options() -> HttpClientOptions {
    HttpClientOptions {
        automatic_decompression: false,
        ..Default::default()
    }
}

fn to_core_duration(d: Duration) -> azure_core::time::Duration {
    azure_core::time::Duration::milliseconds(i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// What a page-blob or block-blob call is about, for error messages.
struct Target<'a> {
    action: &'a str,
    what: String,
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
        let account_from_url = account_name_from_url(&base);
        let container_url = format!("{}/{container}", base.as_str().trim_end_matches('/'));

        let mut per_try: Vec<Arc<dyn Policy>> = vec![Arc::new(TimeoutPolicy {
            timeout: options.request_timeout,
        })];
        let mut secrets = Vec::new();
        let mut sas = None;
        let mut uses_token = false;
        let account = match credentials {
            Credentials::AccountKey { account, key } => {
                let parsed =
                    AccountKey::new(&account, &key).map_err(|detail| StoreError::AccessDenied {
                        store: format!("account {account}"),
                        action: "read the account key".to_owned(),
                        detail,
                    })?;
                secrets.push(key);
                per_try.push(Arc::new(shared_key::SharedKeyPolicy::new(parsed)));
                account
            }
            Credentials::Sas { token } => {
                let token = token.trim_start_matches('?').to_owned();
                if let Some(sig) = token.split('&').find_map(|p| p.strip_prefix("sig=")) {
                    secrets.push(sig.to_owned());
                }
                secrets.push(token.clone());
                sas = Some(token);
                account_from_url
            }
            Credentials::TokenCredential(credential) => {
                if base.scheme() != "https" {
                    return Err(invalid(format!(
                        "a token credential needs an https account URL, not {:?}",
                        base.as_str()
                    )));
                }
                uses_token = true;
                per_try.push(Arc::new(BearerTokenAuthorizationPolicy::new(
                    credential,
                    vec!["https://storage.azure.com/.default"],
                )));
                account_from_url
            }
        };

        let client_options = ClientOptions {
            per_try_policies: per_try,
            retry: RetryOptions::exponential(ExponentialRetryOptions {
                initial_delay: to_core_duration(options.initial_retry_delay),
                max_retries: options.max_retries,
                max_total_elapsed: to_core_duration(
                    options.max_retry_delay * options.max_retries.max(1) + options.request_timeout,
                ),
                max_delay: to_core_duration(options.max_retry_delay),
            }),
            // NB: one transport (one connection pool) for every client this store makes;
            // storage wants automatic decompression off (ranged downloads).
            transport: Some(Transport::new(new_http_client(Some(http_client_options())))),
            ..Default::default()
        };
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
        })
    }

    /// Create the container if it does not exist (for setup and tests; the replication path
    /// expects it to exist and reports a missing one as [`StoreError::NotFound`]).
    ///
    /// # Errors
    ///
    /// As the other calls, classified.
    pub async fn ensure_container(&self) -> Result<(), StoreError> {
        let url = self.url_with_sas(&self.container_url)?;
        let client = BlobContainerClient::new(
            url,
            None,
            Some(BlobContainerClientOptions {
                client_options: self.client_options.clone(),
                ..Default::default()
            }),
        )
        .map_err(|e| {
            self.classify(
                &Target {
                    action: "create the container",
                    what: self.container_what(),
                },
                e,
            )
        })?;
        match client.create(None).await {
            Ok(_) => Ok(()),
            Err(e) if error_code(&e).as_deref() == Some("ContainerAlreadyExists") => Ok(()),
            Err(e) => Err(self.classify(
                &Target {
                    action: "create the container",
                    what: self.container_what(),
                },
                e,
            )),
        }
    }

    fn container_what(&self) -> String {
        format!("container {:?}", self.container)
    }

    fn url_with_sas(&self, base: &str) -> Result<Url, StoreError> {
        let text = match &self.sas {
            Some(sas) => format!("{base}?{sas}"),
            None => base.to_owned(),
        };
        Url::parse(&text).map_err(|_| StoreError::InvalidRequest {
            what: format!("bad blob URL for {base}"),
        })
    }

    fn blob_client(&self, name: &str) -> Result<BlobClient, StoreError> {
        let url = self.url_with_sas(&format!("{}/{name}", self.container_url))?;
        BlobClient::new(
            url,
            None,
            Some(BlobClientOptions {
                client_options: self.client_options.clone(),
                ..Default::default()
            }),
        )
        .map_err(|e| {
            self.classify(
                &Target {
                    action: "open blob",
                    what: format!("blob {name:?}"),
                },
                e,
            )
        })
    }

    /// The URL a copy reads a snapshot from (same account: Shared Key and tokens authorise it
    /// through the destination request; a SAS must ride along).
    fn snapshot_source_url(&self, name: &str, snapshot: &str) -> Result<String, StoreError> {
        let mut url = self.url_with_sas(&format!("{}/{name}", self.container_url))?;
        url.query_pairs_mut().append_pair("snapshot", snapshot);
        Ok(url.to_string())
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
                })
            })
            .clone()
    }

    /// Take one of the VM's request slots (held until the permit drops).
    async fn permit<'a>(&self, state: &'a VmState) -> Option<tokio::sync::SemaphorePermit<'a>> {
        // NB: the semaphore is never closed, so `acquire` cannot fail.
        state.permits.acquire().await.ok()
    }

    /// Map an SDK error onto [`StoreError`], with no credential in it.
    fn classify(&self, target: &Target<'_>, error: azure_core::Error) -> StoreError {
        let store = self.describe();
        let action = format!("{} {}", target.action, target.what);
        match error.kind() {
            ErrorKind::HttpResponse {
                status, error_code, ..
            } => {
                let code = u16::from(*status);
                let error_code = error_code.clone().unwrap_or_default();
                let detail = self.redact(format!("HTTP {code} {error_code}").trim_end().to_owned());
                match code {
                    401 | 403 => StoreError::AccessDenied {
                        store,
                        action,
                        detail,
                    },
                    404 => {
                        let what = match error_code.as_str() {
                            "ContainerNotFound" => self.container_what(),
                            _ => target.what.clone(),
                        };
                        StoreError::NotFound { what, store }
                    }
                    408 | 429 | 500..=599 => StoreError::Unreachable {
                        store,
                        action,
                        detail,
                    },
                    _ => StoreError::InvalidRequest {
                        what: format!("{action} in {store}: {detail}"),
                    },
                }
            }
            ErrorKind::Io | ErrorKind::Connection => StoreError::Unreachable {
                store,
                action,
                detail: self.redact(error_chain(&error)),
            },
            ErrorKind::Credential => StoreError::AccessDenied {
                store,
                action,
                detail: self.redact(error_chain(&error)),
            },
            ErrorKind::DataConversion => StoreError::Corrupt {
                path: format!("{store}: {}", target.what),
                detail: self.redact(error_chain(&error)),
            },
            _ => StoreError::InvalidRequest {
                what: self.redact(format!("{action} in {store}: {}", error_chain(&error))),
            },
        }
    }

    /// Remove every secret, and any `sig=` value, from a message.
    fn redact(&self, mut text: String) -> String {
        for secret in &self.secrets {
            if !secret.is_empty() {
                text = text.replace(secret.as_str(), "<redacted>");
            }
        }
        let mut out = String::with_capacity(text.len());
        let mut rest = text.as_str();
        while let Some(at) = rest.find("sig=") {
            out.push_str(&rest[..at + 4]);
            out.push_str("<redacted>");
            let tail = &rest[at + 4..];
            let end = tail
                .find(|c: char| c == '&' || c == ')' || c == '"' || c.is_whitespace())
                .unwrap_or(tail.len());
            rest = &tail[end..];
        }
        out.push_str(rest);
        out
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

    /// Fetch the manifest from the service (None when the blob is absent).
    async fn fetch_manifest(&self, vm: &VmKey) -> Result<Option<Manifest>, StoreError> {
        let name = manifest_blob(vm);
        let target = Target {
            action: "read the manifest",
            what: format!("blob {name:?}"),
        };
        let client = self.blob_client(&name)?;
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
        Ok(Some(manifest))
    }

    /// Replace the manifest with one Put Blob (atomic on the service).
    async fn store_manifest(&self, vm: &VmKey, manifest: &Manifest) -> Result<(), StoreError> {
        let name = manifest_blob(vm);
        let json = manifest.to_json();
        self.put_small_blob(&name, json.into(), "write the manifest")
            .await
    }

    async fn put_small_blob(
        &self,
        name: &str,
        body: Bytes,
        action: &str,
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
        let options = BlobClientUploadOptions {
            partition_size: Some(size),
            ..Default::default()
        };
        client
            .upload(body.into(), Some(options))
            .await
            .map_err(|e| self.classify(&target, e))?;
        Ok(())
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
        let id = xxhash_rust::xxh3::xxh3_128(
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

    /// Copy a snapshot over its base blob and wait for the copy to finish.
    async fn restore_snapshot(
        &self,
        name: &str,
        snapshot: &str,
        target: &Target<'_>,
    ) -> Result<(), StoreError> {
        let client = self.blob_client(name)?;
        let source = self.snapshot_source_url(name, snapshot)?;
        let started = client
            .start_copy_from_url(source, None)
            .await
            .map_err(|e| self.classify(target, e))?;
        let mut status = started.copy_status().ok().flatten();
        let mut delay = Duration::from_millis(50);
        // NB: within one account a copy is usually done when the call returns; on a busy
        // account it may stay pending for a while: poll with a growing delay.
        while status == Some(CopyStatus::Pending) {
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(5));
            let props = client
                .get_properties(None)
                .await
                .map_err(|e| self.classify(target, e))?;
            status = props.copy_status().ok().flatten();
        }
        match status {
            None | Some(CopyStatus::Success) => Ok(()),
            Some(other) => Err(StoreError::Unreachable {
                store: self.describe(),
                action: format!("{} {}", target.action, target.what),
                detail: format!("copy from the snapshot ended as {other:?}"),
            }),
        }
    }

    /// List every blob name under a prefix.
    async fn list_names(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        let target = Target {
            action: "list",
            what: format!("blobs under {prefix:?}"),
        };
        let client = BlobContainerClient::new(
            self.url_with_sas(&self.container_url)?,
            None,
            Some(BlobContainerClientOptions {
                client_options: self.client_options.clone(),
                ..Default::default()
            }),
        )
        .map_err(|e| self.classify(&target, e))?;
        let options = BlobContainerClientListBlobsOptions {
            prefix: Some(prefix.to_owned()),
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

#[async_trait]
impl ReplicaStore for AzureStore {
    fn describe(&self) -> String {
        format!(
            "Azure Blob container {:?} of account {:?}",
            self.container, self.account
        )
    }

    async fn check_writable(&self) -> Result<(), StoreError> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let name = format!(".lifeboat-probe/{nanos:x}");
        self.put_small_blob(&name, Bytes::from_static(b"lifeboat"), "write a probe blob")
            .await?;
        self.delete_blob(&name, None).await
    }

    async fn create_disk(&self, vm: &VmKey, disk: &str, size_bytes: u64) -> Result<(), StoreError> {
        check_disk_name(disk)?;
        check_disk_size(disk, size_bytes)?;
        let state = self.vm_state(vm);
        let mut cache = state.manifest.lock().await;
        let mut manifest = self
            .fetch_manifest(vm)
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
            .fetch_manifest(vm)
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
        let Some(mut manifest) = self.fetch_manifest(vm).await? else {
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
            .fetch_manifest(vm)
            .await?
            .ok_or_else(|| self.not_found(format!("VM {vm}")))?;
        let id = point_id(point.time_unix_ms, point.cycle);
        if let Some(existing) = manifest.point(&id) {
            let existing = existing.clone();
            *cache = Some(manifest);
            return Ok(existing);
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
        let Some(mut manifest) = self.fetch_manifest(vm).await? else {
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
        let Some(mut manifest) = self.fetch_manifest(vm).await? else {
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
        self.put_small_blob(&map_blob(vm, disk), encoded, "write the block map")
            .await
    }

    async fn block_map(&self, vm: &VmKey, disk: &str) -> Result<Option<Bytes>, StoreError> {
        check_disk_name(disk)?;
        let name = map_blob(vm, disk);
        let target = Target {
            action: "read the block map",
            what: format!("blob {name:?}"),
        };
        let client = self.blob_client(&name)?;
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

    async fn delete_vm(&self, vm: &VmKey) -> Result<(), StoreError> {
        let state = self.vm_state(vm);
        let mut cache = state.manifest.lock().await;
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

/// Blob names: `<namespace>/<vm>/disks/<disk>.vhd`.
fn disk_blob(vm: &VmKey, disk: &str) -> String {
    format!("{}/{}/disks/{disk}.vhd", vm.namespace(), vm.name())
}

/// `<namespace>/<vm>/manifest.json`.
fn manifest_blob(vm: &VmKey) -> String {
    format!("{}/{}/manifest.json", vm.namespace(), vm.name())
}

/// `<namespace>/<vm>/maps/<disk>.map`.
fn map_blob(vm: &VmKey, disk: &str) -> String {
    format!("{}/{}/maps/{disk}.map", vm.namespace(), vm.name())
}

/// The storage error code of a failed response (`BlobNotFound`, ...).
fn error_code(error: &azure_core::Error) -> Option<String> {
    match error.kind() {
        ErrorKind::HttpResponse { error_code, .. } => error_code.clone(),
        _ => None,
    }
}

/// An error and its sources, one line.
fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let more = cause.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = cause.source();
    }
    text
}

/// The account of an account URL: the first host label (`acct.blob.core.windows.net`), or
/// the first path segment of a path-style URL (`http://127.0.0.1:10000/devstoreaccount1`).
fn account_name_from_url(url: &Url) -> String {
    let host = url.host_str().unwrap_or_default();
    let is_ip =
        host.parse::<std::net::IpAddr>().is_ok() || host.starts_with('[') || host == "localhost";
    if is_ip {
        url.path_segments()
            .and_then(|mut s| s.next())
            .unwrap_or_default()
            .to_owned()
    } else {
        host.split('.').next().unwrap_or_default().to_owned()
    }
}

/// Sort ranges and merge the overlapping or touching ones.
fn merge_ranges(mut ranges: Vec<Range<u64>>) -> Vec<Range<u64>> {
    ranges.sort_by_key(|r| r.start);
    let mut out: Vec<Range<u64>> = Vec::with_capacity(ranges.len());
    for r in ranges {
        match out.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => out.push(r),
        }
    }
    out
}
