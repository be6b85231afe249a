//! The cluster agent's errors: one variant per action that failed, each with what a reader
//! needs to find the object, a metric label, and whether trying again can help.

use std::net::SocketAddr;

/// A cluster agent error.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// No Kubernetes client could be made (no kubeconfig, no in-cluster service account).
    #[error("connect to the Kubernetes API: {source}")]
    ConnectApi {
        /// The client error.
        #[source]
        source: kube::Error,
    },
    /// The health endpoint could not listen.
    #[error("listen on {addr} for health checks and metrics: {source}")]
    BindHealth {
        /// The address.
        addr: SocketAddr,
        /// The socket error.
        #[source]
        source: std::io::Error,
    },
    /// The node name is empty.
    #[error("the agent needs its node's name (set NODE_NAME from spec.nodeName)")]
    NoNodeName,
    /// Claiming a job failed for another reason than losing the race to another agent.
    #[error("claim ReplicationJob {job}: {source}")]
    ClaimJob {
        /// `namespace/name`.
        job: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// Reading the ProtectedVM of a job sent here from another node failed.
    #[error("read ProtectedVM {vm}: {source}")]
    GetVm {
        /// `namespace/name`.
        vm: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// Writing a job's status (its steps, progress or end) failed.
    #[error("write the status of ReplicationJob {job}: {source}")]
    WriteJobStatus {
        /// `namespace/name`.
        job: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// Applying a VM's `status.agent` failed.
    #[error("apply status.agent of ProtectedVM {vm}: {source}")]
    ApplyReport {
        /// `namespace/name`.
        vm: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// Reading, creating or renewing the heartbeat Lease failed.
    #[error("{action} the heartbeat Lease {lease}: {source}")]
    RenewLease {
        /// get, create or update.
        action: &'static str,
        /// `namespace/name`.
        lease: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// Reading a credentials Secret failed (the value is never part of an error).
    #[error("read Secret {secret}: {source}")]
    ReadSecret {
        /// `namespace/name`.
        secret: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// Turning a value into JSON failed.
    #[error("serialize {what}: {source}")]
    Serialize {
        /// What was serialized.
        what: &'static str,
        /// The serde error.
        #[source]
        source: serde_json::Error,
    },
}

/// Whether an API error can go away by itself (conflicts, throttling, server and network
/// trouble) rather than needing someone to change something (forbidden, invalid, not found).
pub fn api_error_is_recoverable(error: &kube::Error) -> bool {
    match error {
        kube::Error::Api(status) => {
            status.is_conflict() || status.code == 429 || status.code >= 500 || status.code == 0
        }
        _ => true,
    }
}

/// Whether an API error says the object is gone.
pub(crate) fn is_not_found(error: &kube::Error) -> bool {
    matches!(error, kube::Error::Api(s) if s.is_not_found())
}

/// Whether an API error says the write lost a race (the object changed since it was read).
pub(crate) fn is_conflict(error: &kube::Error) -> bool {
    matches!(error, kube::Error::Api(s) if s.is_conflict())
}

impl ClusterError {
    /// A short label for the `action` dimension of the error metric.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::ConnectApi { .. } => "connect_api",
            Self::BindHealth { .. } => "bind_health",
            Self::NoNodeName => "no_node_name",
            Self::ClaimJob { .. } => "claim_job",
            Self::GetVm { .. } => "get_vm",
            Self::WriteJobStatus { .. } => "write_job_status",
            Self::ApplyReport { .. } => "apply_report",
            Self::RenewLease { .. } => "renew_lease",
            Self::ReadSecret { .. } => "read_secret",
            Self::Serialize { .. } => "serialize",
        }
    }

    /// Whether trying again (later, with backoff) can succeed without anyone changing
    /// anything.
    pub fn is_recoverable(&self) -> bool {
        match self {
            Self::ConnectApi { source }
            | Self::ClaimJob { source, .. }
            | Self::GetVm { source, .. }
            | Self::WriteJobStatus { source, .. }
            | Self::ApplyReport { source, .. }
            | Self::RenewLease { source, .. }
            | Self::ReadSecret { source, .. } => api_error_is_recoverable(source),
            Self::BindHealth { .. } | Self::NoNodeName | Self::Serialize { .. } => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::core::Status;

    fn api(code: u16, reason: &str) -> kube::Error {
        kube::Error::Api(Status::failure("x", reason).with_code(code).boxed())
    }

    #[test]
    fn server_trouble_is_recoverable_bad_requests_are_not() {
        let apply = |source| ClusterError::ApplyReport {
            vm: "ns/web".into(),
            source,
        };
        assert!(apply(api(503, "ServiceUnavailable")).is_recoverable());
        assert!(apply(api(429, "TooManyRequests")).is_recoverable());
        assert!(apply(api(409, "Conflict")).is_recoverable());
        assert!(!apply(api(403, "Forbidden")).is_recoverable());
        assert!(!apply(api(422, "Invalid")).is_recoverable());
        assert_eq!(apply(api(500, "x")).metric_label(), "apply_report");
        assert!(!ClusterError::NoNodeName.is_recoverable());
    }
}
