//! Helpers shared by Lifeboat's cross-crate tests (under `tests/`), and two test fixtures:
//! [`apiserver`], a small Kubernetes API server, and [`agent`], a scripted stand-in for the
//! node agent. Neither is shipped: this package is `publish = false` and nothing but tests and
//! benchmarks depend on it.

pub mod agent;
pub mod apiserver;
pub mod requests;

use std::path::{Path, PathBuf};

/// The workspace's root folder.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(".."))
}

/// The `.yaml` files of a folder under the workspace, sorted by name.
pub fn yaml_files(folder: &str) -> Vec<PathBuf> {
    let dir = workspace_root().join(folder);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "yaml"))
        .collect();
    files.sort();
    files
}

/// Poll `check` every 20 ms until it returns `Some`, for at most `seconds`.
///
/// # Panics
///
/// When time runs out, with `what` in the message.
pub async fn eventually<T, F, Fut>(seconds: u64, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(seconds);
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {seconds}s waiting for {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}
