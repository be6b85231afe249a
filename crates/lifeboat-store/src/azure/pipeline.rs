//! How the Azure store reaches the service: the credentials, the HTTP pipeline built from
//! them, the clients and URLs that pipeline serves, and the mapping of its errors.
//!
//! ```text
//!   Credentials ──► Pipeline::new ──► ClientOptions (shared by every client of one store)
//!     AccountKey      per try:  TimeoutPolicy, then SharedKeyPolicy (Shared Key signature)
//!     Sas             per try:  TimeoutPolicy; the token rides on every URL (url_with_sas)
//!     TokenCredential per try:  TimeoutPolicy, then BearerTokenAuthorizationPolicy (https only)
//!                     retry:    exponential, from AzureStoreOptions
//!                     transport: one connection pool, automatic decompression off
//! ```
//!
//! The credentials, and how the service's errors map onto [`StoreError`], are described in
//! the [module docs](super). No credential is ever formatted into a `Debug`, a log line or an
//! error: the pipeline keeps the secrets it was given, and [`AzureStore::classify`] redacts
//! them from every message.

use super::AzureStore;
use super::shared_key::{self, AccountKey};
use crate::{ReplicaStore as _, StoreError};
use async_trait::async_trait;
use azure_core::credentials::TokenCredential;
use azure_core::error::ErrorKind;
use azure_core::http::policies::auth::BearerTokenAuthorizationPolicy;
use azure_core::http::policies::{Policy, PolicyResult};
use azure_core::http::{
    ClientOptions, Context, ExponentialRetryOptions, HttpClientOptions, Request, RetryOptions,
    Transport, Url, new_http_client,
};
use azure_storage_blob::{
    BlobClient, BlobClientOptions, BlobContainerClient, BlobContainerClientOptions,
};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

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
    /// Kubernetes workload identity: the service account token in `AZURE_FEDERATED_TOKEN_FILE`
    /// exchanged in the tenant `AZURE_TENANT_ID` (the variables that the webhook injects) for
    /// a token of the Entra application `client_id`.
    ///
    /// `client_id` (the policy's `clientId`) wins over the environment's `AZURE_CLIENT_ID`,
    /// which counts only when `client_id` is `None`: one agent can then serve policies that
    /// name different identities federated with its service account.
    ///
    /// # Errors
    ///
    /// [`StoreError::AccessDenied`] when the environment lacks what workload identity needs
    /// (a tenant, a readable token file, a client id from `client_id` or the environment).
    pub fn workload_identity(client_id: Option<String>) -> Result<Credentials, StoreError> {
        Credentials::workload_identity_with(client_id, ClientOptions::default())
    }

    /// [`Credentials::workload_identity`] whose token requests go through `client_options`
    /// (the tests give it a transport that records them).
    pub(super) fn workload_identity_with(
        client_id: Option<String>,
        client_options: ClientOptions,
    ) -> Result<Credentials, StoreError> {
        let options = azure_identity::WorkloadIdentityCredentialOptions {
            client_id,
            credential_options: azure_identity::ClientAssertionCredentialOptions { client_options },
            ..Default::default()
        };
        let credential =
            azure_identity::WorkloadIdentityCredential::new(Some(options)).map_err(|e| {
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
pub(super) struct Target<'a> {
    pub(super) action: &'a str,
    pub(super) what: String,
}

/// What [`AzureStore::new`] builds from the credentials and options: the account, how
/// requests authenticate, the pipeline's client options, and the secrets to redact.
pub(super) struct Pipeline {
    pub(super) account: String,
    /// The SAS token's query, appended to every URL.
    pub(super) sas: Option<String>,
    /// The https-only rule of the SDK for token credentials.
    pub(super) uses_token: bool,
    pub(super) client_options: ClientOptions,
    /// Strings that must never appear in a message: the key, the SAS and its signature.
    pub(super) secrets: Vec<String>,
}

impl Pipeline {
    /// The pipeline for the account at `base` (an account URL without a query).
    ///
    /// # Errors
    ///
    /// [`StoreError::InvalidRequest`] for a token credential on plain http;
    /// [`StoreError::AccessDenied`] for a key that is not base64.
    pub(super) fn new(
        base: &Url,
        credentials: Credentials,
        options: &AzureStoreOptions,
    ) -> Result<Pipeline, StoreError> {
        let account_from_url = account_name_from_url(base);
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
                    return Err(StoreError::InvalidRequest {
                        what: format!(
                            "a token credential needs an https account URL, not {:?}",
                            base.as_str()
                        ),
                    });
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
        Ok(Pipeline {
            account,
            sas,
            uses_token,
            client_options,
            secrets,
        })
    }
}

impl AzureStore {
    pub(super) fn container_what(&self) -> String {
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

    pub(super) fn blob_client(&self, name: &str) -> Result<BlobClient, StoreError> {
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
    pub(super) fn snapshot_source_url(
        &self,
        name: &str,
        snapshot: &str,
    ) -> Result<String, StoreError> {
        let mut url = self.url_with_sas(&format!("{}/{name}", self.container_url))?;
        url.query_pairs_mut().append_pair("snapshot", snapshot);
        Ok(url.to_string())
    }

    /// A client of the store's container.
    pub(super) fn container_client(
        &self,
        target: &Target<'_>,
    ) -> Result<BlobContainerClient, StoreError> {
        BlobContainerClient::new(
            self.url_with_sas(&self.container_url)?,
            None,
            Some(BlobContainerClientOptions {
                client_options: self.client_options.clone(),
                ..Default::default()
            }),
        )
        .map_err(|e| self.classify(target, e))
    }

    /// Map an SDK error onto [`StoreError`], with no credential in it.
    pub(super) fn classify(&self, target: &Target<'_>, error: azure_core::Error) -> StoreError {
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
    pub(super) fn redact(&self, mut text: String) -> String {
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
}

/// The storage error code of a failed response (`BlobNotFound`, ...).
pub(super) fn error_code(error: &azure_core::Error) -> Option<String> {
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
pub(super) fn account_name_from_url(url: &Url) -> String {
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
