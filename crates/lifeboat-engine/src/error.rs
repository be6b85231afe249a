//! The agent's one error type. Every variant knows its ASR class (recoverable or not) and a
//! stable reason; none carries a credential.

use std::path::PathBuf;

use crate::backend::BackendError;
use lifeboat_blockmap::ResyncError;
use lifeboat_hrl::HrlError;
use lifeboat_store::StoreError;

/// Why an agent operation failed.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The hypervisor failed.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// The replica store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Writing a change log failed (a full disk, an I/O error).
    #[error("write change log {path}: {source}")]
    WriteLog {
        /// The log file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: HrlError,
    },
    /// A change log failed its checks: its changes cannot be trusted and the VM needs a
    /// resync.
    #[error("change log {path} cannot be trusted: {source}")]
    CorruptLog {
        /// The log file.
        path: PathBuf,
        /// What the reader found.
        #[source]
        source: HrlError,
    },
    /// Building or comparing block maps failed.
    #[error("block map of disk {disk:?}: {source}")]
    BlockMap {
        /// The disk.
        disk: String,
        /// The cause.
        #[source]
        source: ResyncError,
    },
    /// The agent's own state folder failed.
    #[error("{action} {path}: {source}")]
    State {
        /// What was being done.
        action: &'static str,
        /// The file or folder.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The agent's state file does not parse.
    #[error("agent state {path} is corrupt: {detail}")]
    CorruptState {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// The operation cannot run in the VM's current state (e.g. a cycle before initial
    /// replication, a failover without a point).
    #[error("{what}")]
    NotReady {
        /// What is missing.
        what: String,
    },
    /// A planned failover could not stop its source VM: nothing was failed over, and the VM
    /// stays protected (an unplanned failover does not need the source).
    #[error(
        "the source VM {vm} could not be stopped, so a planned failover cannot promise to lose nothing: {source}"
    )]
    SourceNotStopped {
        /// The VM.
        vm: String,
        /// The hypervisor's error.
        #[source]
        source: BackendError,
    },
    /// A replica does not match its manifest's digest: the replica state is invalid.
    #[error("disk {disk:?} at recovery point {point} does not match its digest: {detail}")]
    DigestMismatch {
        /// The disk.
        disk: String,
        /// The point.
        point: String,
        /// The two fingerprints.
        detail: String,
    },
}

impl EngineError {
    /// Whether retrying later can help (ASR's recoverable class).
    pub fn is_recoverable(&self) -> bool {
        match self {
            Self::Backend(e) => e.is_recoverable(),
            Self::Store(e) => e.is_recoverable(),
            Self::WriteLog { .. } | Self::State { .. } => true,
            // A corrupt log is handled by a resync, which is retried as such.
            Self::CorruptLog { .. } => true,
            Self::BlockMap { .. }
            | Self::CorruptState { .. }
            | Self::NotReady { .. }
            | Self::SourceNotStopped { .. }
            | Self::DigestMismatch { .. } => false,
        }
    }

    /// A stable CamelCase reason for conditions, events and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Backend(e) => e.reason(),
            Self::Store(e) => e.reason(),
            Self::WriteLog { .. } => "LogWriteFailed",
            Self::CorruptLog { .. } => "CorruptLog",
            Self::BlockMap { .. } => "BlockMapError",
            Self::State { .. } => "AgentStateIoError",
            Self::CorruptState { .. } => "InvalidAgentState",
            Self::NotReady { .. } => "NotReady",
            Self::SourceNotStopped { .. } => "SourceNotStopped",
            Self::DigestMismatch { .. } => "InvalidReplicaState",
        }
    }

    pub(crate) fn state(
        action: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> EngineError {
        let path = path.into();
        move |source| EngineError::State {
            action,
            path,
            source,
        }
    }
}
