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

/// Open stores by target.
#[derive(Default)]
pub struct StoreCache {
    stores: Mutex<HashMap<String, Arc<dyn ReplicaStore>>>,
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

impl StoreCache {
    /// The store of `target` for a policy in `namespace`, opened on first use.
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
        let key = match (&target.local, &target.azure_blob) {
            (Some(local), _) => format!("local:{}", local.path),
            (None, Some(azure)) => format!(
                "azure:{}:{}:{namespace}",
                azure.account_url, azure.container
            ),
            (None, None) => {
                return Err(StoreError::InvalidRequest {
                    what: "the policy's target has neither local nor azureBlob".into(),
                });
            }
        };
        let mut stores = self.stores.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(store) = stores.get(&key) {
            return Ok(store.clone());
        }
        let store: Arc<dyn ReplicaStore> = match (&target.local, &target.azure_blob) {
            (Some(local), _) => Arc::new(LocalStore::open(&local.path)?),
            (None, Some(azure)) => {
                let c = &azure.credentials;
                let credentials = if let Some(reference) = &c.account_key_secret_ref {
                    let key = secrets
                        .secret_value(namespace, reference)
                        .map_err(access_denied)?;
                    let account = account_name(&azure.account_url);
                    Credentials::AccountKey { account, key }
                } else if let Some(reference) = &c.sas_secret_ref {
                    Credentials::Sas {
                        token: secrets
                            .secret_value(namespace, reference)
                            .map_err(access_denied)?,
                    }
                } else if let Some(identity) = &c.workload_identity {
                    if std::env::var_os("AZURE_FEDERATED_TOKEN_FILE").is_some() {
                        Credentials::workload_identity()?
                    } else {
                        Credentials::managed_identity(identity.client_id.clone())?
                    }
                } else {
                    return Err(access_denied(
                        "the policy's azureBlob target has no credentials".into(),
                    ));
                };
                let options = AzureStoreOptions {
                    upload_concurrency: upload_concurrency.clamp(1, 32),
                    ..AzureStoreOptions::default()
                };
                Arc::new(AzureStore::new(
                    &azure.account_url,
                    &azure.container,
                    credentials,
                    options,
                )?)
            }
            (None, None) => return unreachable_target(),
        };
        stores.insert(key, store.clone());
        Ok(store)
    }
}

fn unreachable_target() -> Result<Arc<dyn ReplicaStore>, StoreError> {
    Err(StoreError::InvalidRequest {
        what: "the policy's target has neither local nor azureBlob".into(),
    })
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
