//! The operator's errors: one variant per action that failed, each with what a reader needs
//! to find the object, a metric label, and whether trying again can help.

use std::net::SocketAddr;

/// An operator error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Writing a resource's status failed.
    #[error("apply the status of {kind} {name}")]
    ApplyStatus {
        /// The resource's kind.
        kind: &'static str,
        /// `namespace/name`.
        name: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// Creating a ReplicationJob failed.
    #[error("create ReplicationJob {name}")]
    CreateJob {
        /// `namespace/name`.
        name: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// Every name tried for a new job belongs to another VM's job.
    #[error(
        "create a job for ProtectedVM {vm}: job names up to {last} are taken by other VMs' jobs"
    )]
    JobNameTaken {
        /// `namespace/name` of the VM.
        vm: String,
        /// The last name tried.
        last: String,
    },
    /// Reading a ReplicationJob failed.
    #[error("get ReplicationJob {name}")]
    GetJob {
        /// `namespace/name`.
        name: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// Deleting a ReplicationJob failed.
    #[error("delete ReplicationJob {name}")]
    DeleteJob {
        /// `namespace/name`.
        name: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// Marking a ReplicationJob taken from a lost agent Failed.
    #[error("mark ReplicationJob {name} failed (its agent is lost)")]
    FailJob {
        /// `namespace/name`.
        name: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// Adding or removing a finalizer failed.
    #[error("update the finalizers of {kind} {name}")]
    PatchFinalizers {
        /// The resource's kind.
        kind: &'static str,
        /// `namespace/name`.
        name: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// A namespaced resource came without a namespace.
    #[error("{kind} {name} has no namespace")]
    MissingNamespace {
        /// The resource's kind.
        kind: &'static str,
        /// Its name.
        name: String,
    },
    /// Turning a value into JSON failed.
    #[error("serialize {what}")]
    Serialize {
        /// What was serialized.
        what: &'static str,
        /// The serde error.
        #[source]
        source: serde_json::Error,
    },
    /// No Kubernetes client could be made (no kubeconfig, no in-cluster service account).
    #[error("connect to the Kubernetes API")]
    ConnectApi {
        /// The client error.
        #[source]
        source: kube::Error,
    },
    /// The metrics and health endpoint could not listen.
    #[error("listen on {addr} for metrics and health checks")]
    BindMetrics {
        /// The address.
        addr: SocketAddr,
        /// The socket error.
        #[source]
        source: std::io::Error,
    },
    /// Reading or writing the leader election Lease failed.
    #[error("{action} the leader Lease {name}")]
    Lease {
        /// get, create or update.
        action: &'static str,
        /// `namespace/name`.
        name: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// A call on the leader election Lease got no answer in time.
    #[error("{action} the leader Lease {name}: no answer within {after:?}")]
    LeaseTimeout {
        /// get, create or update.
        action: &'static str,
        /// `namespace/name`.
        name: String,
        /// How long it waited.
        after: std::time::Duration,
    },
    /// This replica could not renew its Lease in time: another may lead now.
    #[error("lost the leader Lease {name}: not renewed for {seconds}s")]
    LeadershipLost {
        /// `namespace/name`.
        name: String,
        /// Seconds since the last renewal.
        seconds: u64,
    },
    /// A shared watch stream could not be subscribed to.
    #[error("subscribe to the shared {kind} stream")]
    Subscribe {
        /// The watched kind.
        kind: &'static str,
    },
}

/// A Result with the operator's error.
pub type Result<T, E = Error> = std::result::Result<T, E>;

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

impl Error {
    /// The failure to add or remove a finalizer of `kind` `name` (`namespace/name`), for
    /// `map_err`.
    pub fn patch_finalizers(kind: &'static str, name: &str) -> impl FnOnce(kube::Error) -> Error {
        let name = name.to_owned();
        move |source| Error::PatchFinalizers { kind, name, source }
    }

    /// The message with every cause after it (`a: b: c`), for logs, which print one line.
    pub fn report(&self) -> String {
        let mut text = self.to_string();
        let mut cause = std::error::Error::source(self);
        while let Some(e) = cause {
            text.push_str(": ");
            text.push_str(&e.to_string());
            cause = e.source();
        }
        text
    }

    /// A short label for the `error` dimension of the reconcile error metric.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::ApplyStatus { .. } => "apply_status",
            Self::CreateJob { .. } => "create_job",
            Self::JobNameTaken { .. } => "job_name_taken",
            Self::GetJob { .. } => "get_job",
            Self::DeleteJob { .. } => "delete_job",
            Self::FailJob { .. } => "fail_job",
            Self::PatchFinalizers { .. } => "patch_finalizers",
            Self::MissingNamespace { .. } => "missing_namespace",
            Self::Serialize { .. } => "serialize",
            Self::ConnectApi { .. } => "connect_api",
            Self::BindMetrics { .. } => "bind_metrics",
            Self::Lease { .. } => "lease",
            Self::LeaseTimeout { .. } => "lease_timeout",
            Self::LeadershipLost { .. } => "leadership_lost",
            Self::Subscribe { .. } => "subscribe",
        }
    }

    /// Whether trying again (later) can succeed without anyone changing anything.
    pub fn is_recoverable(&self) -> bool {
        match self {
            Self::ApplyStatus { source, .. }
            | Self::CreateJob { source, .. }
            | Self::GetJob { source, .. }
            | Self::DeleteJob { source, .. }
            | Self::FailJob { source, .. }
            | Self::PatchFinalizers { source, .. }
            | Self::Lease { source, .. }
            | Self::ConnectApi { source } => api_error_is_recoverable(source),
            Self::LeaseTimeout { .. } | Self::LeadershipLost { .. } => true,
            Self::JobNameTaken { .. }
            | Self::MissingNamespace { .. }
            | Self::Serialize { .. }
            | Self::BindMetrics { .. }
            | Self::Subscribe { .. } => false,
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
    fn conflicts_and_server_trouble_are_recoverable_bad_requests_are_not() {
        let status = |source| Error::ApplyStatus {
            kind: "ProtectedVM",
            name: "ns/web".into(),
            source,
        };
        assert!(status(api(409, "Conflict")).is_recoverable());
        assert!(status(api(503, "ServiceUnavailable")).is_recoverable());
        assert!(status(api(429, "TooManyRequests")).is_recoverable());
        assert!(!status(api(422, "Invalid")).is_recoverable());
        assert!(!status(api(403, "Forbidden")).is_recoverable());
        assert_eq!(status(api(409, "Conflict")).metric_label(), "apply_status");
        assert!(
            !Error::MissingNamespace {
                kind: "ProtectedVM",
                name: "web".into()
            }
            .is_recoverable()
        );
    }
}
