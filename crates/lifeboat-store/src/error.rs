//! The store's one error type. Every variant says whether retrying can help
//! ([`StoreError::is_recoverable`]), following ASR's two classes, and none carries a
//! credential.

use std::path::PathBuf;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The request breaks a rule of the store (alignment, size, names): a caller's bug or bad
    /// input, never retried.
    #[error("invalid store request: {what}")]
    InvalidRequest {
        /// What is wrong, naming the disk or VM.
        what: String,
    },
    /// The VM, disk or point does not exist.
    #[error("{what} not found in {store}")]
    NotFound {
        /// What was looked for, e.g. `disk "root" of VM ns/web-01`.
        what: String,
        /// The store, as [`crate::ReplicaStore::describe`] says.
        store: String,
    },
    /// A file operation of the local store failed.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was being done, e.g. `write replica disk`.
        action: &'static str,
        /// The file or folder.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Stored state failed its own checks (a manifest that does not parse, an undo record
    /// whose checksum fails): an administrator must look.
    #[error("corrupt replica state in {path}: {detail}")]
    Corrupt {
        /// The file or blob.
        path: String,
        /// What is wrong.
        detail: String,
    },
    /// The remote store could not be reached or answered with a transient failure (timeout,
    /// throttling, 5xx).
    #[error("store {store} unreachable while trying to {action}: {detail}")]
    Unreachable {
        /// The store.
        store: String,
        /// What was being done.
        action: String,
        /// The cause, without credentials.
        detail: String,
    },
    /// The store refused our identity or our rights (a wrong key, an expired SAS, a missing
    /// role assignment).
    #[error("store {store} refused access while trying to {action}: {detail}")]
    AccessDenied {
        /// The store (account and container, never the key).
        store: String,
        /// What was being done.
        action: String,
        /// The service's reason, without credentials.
        detail: String,
    },
    /// The VM's replica moved to a newer epoch (a failover fenced this writer): this writer
    /// must never change it again.
    #[error(
        "VM {vm} is fenced: this writer holds epoch {held}, the replica is at epoch {current} (taken by {holder}); it changes nothing more"
    )]
    Fenced {
        /// The VM.
        vm: String,
        /// The epoch this writer holds.
        held: u64,
        /// The replica's epoch.
        current: u64,
        /// Who took it.
        holder: String,
    },
    /// Another writer changed what this one was updating (the manifest, read then written
    /// conditionally), at the same epoch: read again and retry.
    #[error("{what} in {store} changed while it was being updated; read it again and retry")]
    Conflict {
        /// What changed.
        what: String,
        /// The store.
        store: String,
    },
}

impl StoreError {
    /// Whether retrying later can succeed: network trouble, throttling, a full disk. Bad
    /// requests, missing objects, corrupt state and refused credentials need a person.
    pub fn is_recoverable(&self) -> bool {
        match self {
            Self::Unreachable { .. } | Self::Conflict { .. } => true,
            Self::Io { source, .. } => is_transient_io(source),
            Self::InvalidRequest { .. }
            | Self::NotFound { .. }
            | Self::Corrupt { .. }
            | Self::AccessDenied { .. }
            | Self::Fenced { .. } => false,
        }
    }

    /// A stable CamelCase word for conditions, events and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::InvalidRequest { .. } => "InvalidStoreRequest",
            Self::NotFound { .. } => "ReplicaNotFound",
            Self::Io { source, .. } if source.kind() == std::io::ErrorKind::StorageFull => {
                "LowDiskSpace"
            }
            Self::Io { source, .. } if source.kind() == std::io::ErrorKind::PermissionDenied => {
                "StoreAccessDenied"
            }
            Self::Io { .. } => "StoreIoError",
            Self::Corrupt { .. } => "InvalidReplicaState",
            Self::Unreachable { .. } => "StoreUnreachable",
            Self::AccessDenied { .. } => "StoreAccessDenied",
            Self::Fenced { .. } => "Fenced",
            Self::Conflict { .. } => "StoreConflict",
        }
    }

    pub(crate) fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> StoreError {
        let path = path.into();
        move |source| StoreError::Io {
            action,
            path,
            source,
        }
    }
}

/// Local I/O errors that can clear by themselves: a full disk or quota, an interrupted call,
/// a busy resource, memory pressure.
fn is_transient_io(error: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        error.kind(),
        StorageFull
            | QuotaExceeded
            | Interrupted
            | WouldBlock
            | TimedOut
            | ResourceBusy
            | OutOfMemory
    )
}
