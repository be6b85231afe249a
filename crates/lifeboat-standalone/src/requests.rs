//! Requests from the command line to a running daemon: `lifeboat resync VM` and friends write
//! a request token into `<state>/requests/<namespace>/<vm>.json`; the daemon merges it into
//! the VM's `spec.requests` (a field set on the command line wins over the manifest's) and
//! echoes the token in `status.handledRequests` once the action is done, exactly as a GitOps
//! change of the manifest would. A RecoveryPlan's requests (`lifeboat plan ...`) go the same
//! way through `<state>/plan-requests/<namespace>/<plan>.json`.

use std::path::{Path, PathBuf};

use lifeboat_api::plan::PlanRequests;
use lifeboat_api::protected_vm::Requests;
use serde::Serialize;
use serde::de::DeserializeOwned;

/// The requests of one kind of resource, and the folder they are kept in.
pub trait Kind: Serialize + DeserializeOwned + Default {
    /// The folder under the state folder.
    const FOLDER: &'static str;
}

impl Kind for Requests {
    const FOLDER: &'static str = "requests";
}

impl Kind for PlanRequests {
    const FOLDER: &'static str = "plan-requests";
}

fn path<T: Kind>(state_dir: &Path, namespace: &str, name: &str) -> PathBuf {
    state_dir
        .join(T::FOLDER)
        .join(namespace)
        .join(format!("{name}.json"))
}

/// The command line's requests for a VM or a plan (none when there is no file or it does not
/// parse).
pub fn read<T: Kind>(state_dir: &Path, namespace: &str, name: &str) -> Option<T> {
    let bytes = std::fs::read(path::<T>(state_dir, namespace, name)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Record a request: `edit` changes the VM's (or plan's) request file.
///
/// # Errors
///
/// The file cannot be written.
pub fn write<T: Kind>(
    state_dir: &Path,
    namespace: &str,
    name: &str,
    edit: impl FnOnce(&mut T),
) -> Result<(), String> {
    let mut requests: T = read(state_dir, namespace, name).unwrap_or_default();
    edit(&mut requests);
    let file = path::<T>(state_dir, namespace, name);
    let bytes = serde_json::to_vec_pretty(&requests).map_err(|e| e.to_string())?;
    lifeboat_store::files::write_atomic(&file, &bytes)
        .map_err(|e| format!("{} {}: {}", e.action, e.path.display(), e.source))?;
    ring(state_dir);
    Ok(())
}

/// The file the command line rewrites after it writes a request: the daemon reads it between
/// ticks and answers at once when its text changed.
pub fn doorbell(state_dir: &Path) -> PathBuf {
    state_dir.join("doorbell")
}

/// Ring the daemon's doorbell. A bell that cannot ring costs the request only the wait for
/// the daemon's next tick.
pub fn ring(state_dir: &Path) {
    let bell = doorbell(state_dir);
    // NB: a new text every time (the time and this process), so that two rings never read
    // as one; a modification time can be too coarse to tell.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    if let Err(e) = std::fs::write(&bell, format!("{now} {}\n", std::process::id())) {
        tracing::debug!(path = %bell.display(), error = %e, "ring the daemon's doorbell");
    }
}

/// What the doorbell says now (compared with what it said before: rung in between).
pub fn rung(bell: &Path) -> Option<String> {
    std::fs::read_to_string(bell).ok()
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

/// A plan manifest's requests with the command line's on top.
pub fn merged_plan(
    manifest: Option<PlanRequests>,
    cli: Option<PlanRequests>,
) -> Option<PlanRequests> {
    match (manifest, cli) {
        (m, None) => m,
        (None, c) => c,
        (Some(m), Some(c)) => Some(PlanRequests {
            test_failover: c.test_failover.or(m.test_failover),
            cleanup_test_failover: c.cleanup_test_failover.or(m.cleanup_test_failover),
            failover: c.failover.or(m.failover),
            commit: c.commit.or(m.commit),
            proceed: c.proceed.or(m.proceed),
            retry: c.retry.or(m.retry),
        }),
    }
}
