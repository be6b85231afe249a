//! Requests from the command line to a running daemon: `lifeboat resync VM` and friends write
//! a request token into `<state>/requests/<namespace>/<vm>.json`; the daemon merges it into
//! the VM's `spec.requests` (a field set on the command line wins over the manifest's) and
//! echoes the token in `status.handledRequests` once the action is done, exactly as a GitOps
//! change of the manifest would.

use std::path::{Path, PathBuf};

use lifeboat_api::protected_vm::Requests;

fn path(state_dir: &Path, namespace: &str, name: &str) -> PathBuf {
    state_dir
        .join("requests")
        .join(namespace)
        .join(format!("{name}.json"))
}

/// The command line's requests for a VM (none when there is no file or it does not parse).
pub fn read(state_dir: &Path, namespace: &str, name: &str) -> Option<Requests> {
    let bytes = std::fs::read(path(state_dir, namespace, name)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Record a request: `edit` changes the VM's request file.
///
/// # Errors
///
/// The file cannot be written.
pub fn write(
    state_dir: &Path,
    namespace: &str,
    name: &str,
    edit: impl FnOnce(&mut Requests),
) -> Result<(), String> {
    let mut requests = read(state_dir, namespace, name).unwrap_or_default();
    edit(&mut requests);
    let file = path(state_dir, namespace, name);
    let bytes = serde_json::to_vec_pretty(&requests).map_err(|e| e.to_string())?;
    lifeboat_store::files::write_atomic(&file, &bytes)
        .map_err(|e| format!("{} {}: {}", e.action, e.path.display(), e.source))
}

/// The manifest's requests with the command line's on top.
pub fn merged(manifest: Option<Requests>, cli: Option<Requests>) -> Option<Requests> {
    match (manifest, cli) {
        (m, None) => m,
        (None, c) => c,
        (Some(m), Some(c)) => Some(Requests {
            resync: c.resync.or(m.resync),
            test_failover: c.test_failover.or(m.test_failover),
            cleanup_test_failover: c.cleanup_test_failover.or(m.cleanup_test_failover),
            failover: c.failover.or(m.failover),
            commit: c.commit.or(m.commit),
            reprotect: c.reprotect.or(m.reprotect),
            retry: c.retry.or(m.retry),
        }),
    }
}
