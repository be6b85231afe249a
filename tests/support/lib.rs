//! Helpers shared by Lifeboat's cross-crate tests (under `tests/`), and two test fixtures:
//! [`apiserver`], a small Kubernetes API server, and [`agent`], a scripted stand-in for the
//! node agent. Neither is shipped: this package is `publish = false` and nothing but tests and
//! benchmarks depend on it.

pub mod agent;
pub mod apiserver;
pub mod jobs;
pub mod requests;
pub mod site;

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

/// As [`eventually`], and when time runs out, the panic message has what `explain` says of
/// the state things were left in.
///
/// # Panics
///
/// When time runs out, with `what` and the explanation in the message.
pub async fn eventually_or_explain<T, F, Fut, E, EFut>(
    seconds: u64,
    what: &str,
    check: F,
    explain: E,
) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
    E: FnOnce() -> EFut,
    EFut: std::future::Future<Output = String>,
{
    let limit = std::time::Duration::from_secs(seconds);
    match tokio::time::timeout(limit, eventually(seconds + 1, what, check)).await {
        Ok(value) => value,
        Err(_) => panic!(
            "timed out after {seconds}s waiting for {what}; {}",
            explain().await
        ),
    }
}

/// A plan run's VMs, from its status: each group's VMs started once the group before it had
/// ended, and the VMs of a group together (each asked before any of the others was done).
///
/// # Panics
///
/// When a VM has no times in `status`, or the run broke either rule.
pub fn assert_groups_in_order_and_together(
    status: &lifeboat_api::plan::RecoveryPlanStatus,
    groups: &[&[&str]],
) {
    let span = |vm: &str| {
        let v = status
            .vms
            .iter()
            .find(|v| v.name == vm)
            .unwrap_or_else(|| panic!("no VM {vm} in the plan's status"));
        match (&v.start_time, &v.completion_time) {
            (Some(start), Some(end)) => (start.0, end.0),
            _ => panic!("{vm} has no start or completion time: {v:?}"),
        }
    };
    let ends = |group: &[&str]| group.iter().map(|v| span(v).1).collect::<Vec<_>>();
    let starts = |group: &[&str]| group.iter().map(|v| span(v).0).collect::<Vec<_>>();
    for pair in groups.windows(2) {
        let ended = ends(pair[0]).into_iter().max();
        let started = starts(pair[1]).into_iter().min();
        assert!(
            ended <= started,
            "{:?} started before {:?} ended",
            pair[1],
            pair[0]
        );
    }
    for group in groups.iter().filter(|g| g.len() > 1) {
        let last_start = starts(group).into_iter().max();
        let first_end = ends(group).into_iter().min();
        assert!(last_start < first_end, "{group:?} ran one after the other");
    }
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    #[should_panic(expected = "waiting for nothing; it was left like this")]
    async fn a_wait_that_runs_out_says_what_explain_says() {
        super::eventually_or_explain(
            1,
            "nothing",
            || async { None::<()> },
            || async { "it was left like this".to_owned() },
        )
        .await;
    }
}
