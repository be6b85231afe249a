//! Replica stores by policy target, opened once and shared by every VM that uses the target.
//! Credentials come from a [`SecretSource`] (Kubernetes Secrets in a cluster, Secret
//! manifests or the environment in standalone mode); they are never read from a resource's
//! spec and never logged.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use lifeboat_api::common::SecretKeyReference;
use lifeboat_api::policy::ReplicaTarget;
use lifeboat_store::azure::{AzureStore, AzureStoreOptions, Credentials};
use lifeboat_store::local::LocalStore;
use lifeboat_store::{ReplicaStore, StoreError};

/// Where credentials come from.
pub trait SecretSource: Send + Sync {
    /// The value of `reference` (a Secret key) in `namespace`.
    ///
    /// # Errors
    ///
    /// A message naming the Secret and key (never the value).
    fn secret_value(
        &self,
        namespace: &str,
        reference: &SecretKeyReference,
    ) -> Result<String, String>;
}

/// Open stores by target. A store is shared by every VM that uses its target and the same
/// credentials; when a target's credentials change (a rotated account key or SAS), the next
/// [`StoreCache::store`] opens a new store with them, so a caller that compares the store it
/// holds ([`Arc::ptr_eq`]) learns that it should reopen.
#[derive(Default)]
pub struct StoreCache {
    stores: Mutex<HashMap<String, Entry>>,
    /// Open local stores read-only: for the tools that only look, beside a running daemon
    /// that holds the VMs (a writing open would wait for its lock, and repair nothing).
    read_only: bool,
}

struct Entry {
    /// A hash of the credentials the store was opened with (never the credentials).
    credentials: u64,
    store: Arc<dyn ReplicaStore>,
}

impl std::fmt::Debug for StoreCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let keys: Vec<String> = self
            .stores
            .lock()
            .map(|s| s.keys().cloned().collect())
            .unwrap_or_default();
        f.debug_struct("StoreCache")
            .field("targets", &keys)
            .finish()
    }
}

fn access_denied(what: String) -> StoreError {
    StoreError::AccessDenied {
        store: "Azure Blob Storage".into(),
        action: "read credentials".into(),
        detail: what,
    }
}

/// What a target's store is opened from.
enum Opening<'a> {
    /// A folder.
    Local(&'a str),
    /// A container, with the credentials read for it.
    Azure(&'a lifeboat_api::policy::AzureBlobTarget, CredentialSource),
}

/// Where an Azure target's credentials come from, read from the Secrets but not yet used.
#[derive(Hash)]
enum CredentialSource {
    AccountKey { account: String, key: String },
    Sas(String),
    Identity(Option<String>),
}

impl CredentialSource {
    fn read(
        namespace: &str,
        azure: &lifeboat_api::policy::AzureBlobTarget,
        secrets: &dyn SecretSource,
    ) -> Result<CredentialSource, StoreError> {
        let c = &azure.credentials;
        if let Some(reference) = &c.account_key_secret_ref {
            Ok(CredentialSource::AccountKey {
                account: account_name(&azure.account_url),
                key: secrets
                    .secret_value(namespace, reference)
                    .map_err(access_denied)?,
            })
        } else if let Some(reference) = &c.sas_secret_ref {
            Ok(CredentialSource::Sas(
                secrets
                    .secret_value(namespace, reference)
                    .map_err(access_denied)?,
            ))
        } else if let Some(identity) = &c.workload_identity {
            Ok(CredentialSource::Identity(identity.client_id.clone()))
        } else {
            Err(access_denied(
                "the policy's azureBlob target has no credentials".into(),
            ))
        }
    }

    fn fingerprint(&self) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        self.hash(&mut hasher);
        hasher.finish()
    }

    fn open(self) -> Result<Credentials, StoreError> {
        Ok(match self {
            CredentialSource::AccountKey { account, key } => {
                Credentials::AccountKey { account, key }
            }
            CredentialSource::Sas(token) => Credentials::Sas { token },
            CredentialSource::Identity(client_id) => {
                // NB: the policy's clientId goes to either credential; for workload identity
                // it wins over the webhook's AZURE_CLIENT_ID.
                if std::env::var_os("AZURE_FEDERATED_TOKEN_FILE").is_some() {
                    Credentials::workload_identity(client_id)?
                } else {
                    Credentials::managed_identity(client_id)?
                }
            }
        })
    }
}

impl StoreCache {
    /// A cache whose local stores are opened read-only ([`LocalStore::open_read_only`]):
    /// for tools that list points beside a running daemon. Azure stores are as usual (a
    /// reader never changes a blob).
    pub fn read_only() -> StoreCache {
        StoreCache {
            read_only: true,
            ..StoreCache::default()
        }
    }

    /// The store of `target` for a policy in `namespace`, opened on first use and again
    /// when the target's credentials changed.
    ///
    /// # Errors
    ///
    /// The target cannot be opened (a folder that cannot be created, credentials missing).
    pub fn store(
        &self,
        namespace: &str,
        target: &ReplicaTarget,
        upload_concurrency: usize,
        secrets: &dyn SecretSource,
    ) -> Result<Arc<dyn ReplicaStore>, StoreError> {
        let (key, opening) = match (&target.local, &target.azure_blob) {
            (Some(local), _) => (format!("local:{}", local.path), Opening::Local(&local.path)),
            (None, Some(azure)) => (
                format!(
                    "azure:{}:{}:{namespace}",
                    azure.account_url, azure.container
                ),
                Opening::Azure(azure, CredentialSource::read(namespace, azure, secrets)?),
            ),
            (None, None) => {
                return Err(StoreError::InvalidRequest {
                    what: "the policy's target has neither local nor azureBlob".into(),
                });
            }
        };
        let fingerprint = match &opening {
            Opening::Local(_) => 0,
            Opening::Azure(_, credentials) => credentials.fingerprint(),
        };
        let mut stores = self.stores.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(entry) = stores.get(&key)
            && entry.credentials == fingerprint
        {
            return Ok(entry.store.clone());
        }
        let store: Arc<dyn ReplicaStore> = match opening {
            Opening::Local(path) if self.read_only => Arc::new(LocalStore::open_read_only(path)?),
            Opening::Local(path) => Arc::new(LocalStore::open(path)?),
            Opening::Azure(azure, credentials) => {
                let options = AzureStoreOptions {
                    upload_concurrency: upload_concurrency.clamp(1, 32),
                    ..AzureStoreOptions::default()
                };
                Arc::new(AzureStore::new(
                    &azure.account_url,
                    &azure.container,
                    credentials.open()?,
                    options,
                )?)
            }
        };
        if stores.contains_key(&key) {
            tracing::info!(target = %key, "the target's credentials changed: opening its store again");
        }
        stores.insert(
            key,
            Entry {
                credentials: fingerprint,
                store: store.clone(),
            },
        );
        Ok(store)
    }
}

/// The storage account's name from its blob endpoint: the first label of the host
/// (`https://acct.blob.core.windows.net`), or the first path segment for path-style
/// endpoints such as Azurite's (`http://127.0.0.1:10000/devstoreaccount1`).
pub fn account_name(account_url: &str) -> String {
    let rest = account_url
        .split_once("://")
        .map(|(_, r)| r)
        .unwrap_or(account_url);
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    let first_path = path.split('/').find(|s| !s.is_empty());
    let host_name = host.split(':').next().unwrap_or(host);
    let is_ip_or_local = host_name.parse::<std::net::IpAddr>().is_ok() || host_name == "localhost";
    match (is_ip_or_local, first_path) {
        (true, Some(account)) => account.to_owned(),
        _ => host_name.split('.').next().unwrap_or(host_name).to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Secrets held in memory, changed by the test as a rotation would.
    struct RotatingSecrets(Mutex<String>);

    impl SecretSource for RotatingSecrets {
        fn secret_value(&self, _: &str, _: &SecretKeyReference) -> Result<String, String> {
            Ok(self.0.lock().unwrap_or_else(|e| e.into_inner()).clone())
        }
    }

    #[test]
    fn a_rotated_key_opens_the_store_again_and_the_same_key_shares_it() {
        let target: ReplicaTarget = serde_json::from_value(serde_json::json!({
            "azureBlob": {
                "accountUrl": "http://127.0.0.1:10000/devstoreaccount1",
                "container": "replicas",
                "credentials": {"accountKeySecretRef": {"name": "storage", "key": "accountKey"}}
            }
        }))
        .unwrap_or_else(|e| panic!("{e}"));
        let cache = StoreCache::default();
        let secrets = RotatingSecrets(Mutex::new("a2V5LW9uZQ==".into()));
        let open = |cache: &StoreCache| {
            cache
                .store("ns", &target, 4, &secrets)
                .unwrap_or_else(|e| panic!("{e}"))
        };
        let first = open(&cache);
        assert!(Arc::ptr_eq(&first, &open(&cache)), "same key, same store");
        *secrets.0.lock().unwrap_or_else(|e| e.into_inner()) = "a2V5LXR3bw==".into();
        let rotated = open(&cache);
        assert!(
            !Arc::ptr_eq(&first, &rotated),
            "a rotated key opens a new store"
        );
        assert!(Arc::ptr_eq(&rotated, &open(&cache)));

        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let local: ReplicaTarget = serde_json::from_value(serde_json::json!({
            "local": {"path": dir.path()}
        }))
        .unwrap_or_else(|e| panic!("{e}"));
        let a = cache
            .store("ns", &local, 4, &secrets)
            .unwrap_or_else(|e| panic!("{e}"));
        let b = cache
            .store("ns", &local, 4, &secrets)
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(Arc::ptr_eq(&a, &b));
    }

    #[test]
    fn account_names_from_both_url_styles() {
        assert_eq!(
            account_name("https://mystorageacct.blob.core.windows.net"),
            "mystorageacct"
        );
        assert_eq!(
            account_name("https://mystorageacct.blob.core.windows.net/"),
            "mystorageacct"
        );
        assert_eq!(
            account_name("http://127.0.0.1:10000/devstoreaccount1"),
            "devstoreaccount1"
        );
        assert_eq!(
            account_name("http://localhost:10000/devstoreaccount1/"),
            "devstoreaccount1"
        );
    }
}
