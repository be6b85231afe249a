//! A TEST DOUBLE of the Job controller and the kubelet, which cannot run here: hook Jobs
//! (a recovery plan's, a recovered VM's) run as local processes.

// A failed unwrap is the failure report of the test the double serves.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::batch::v1::Job;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::{Client, ResourceExt};
use serde_json::json;

/// A TEST DOUBLE of the Job controller and the kubelet: each Job of the namespace without a
/// finished condition has its first container's command run here, once, in `dir`, with the
/// container's environment; the Job then gets Complete, or Failed with the command's last
/// line of standard error as its message. The Jobs it ran, by name, in order.
#[allow(missing_debug_implementations)] // a task handle and a log
pub struct LocalJobRunner {
    ran: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for LocalJobRunner {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl LocalJobRunner {
    /// Run the Jobs of `namespace` in `dir` until dropped.
    pub fn start(client: Client, namespace: &str, dir: PathBuf) -> LocalJobRunner {
        let namespace = namespace.to_owned();
        let ran = Arc::new(Mutex::new(Vec::new()));
        let record = Arc::clone(&ran);
        let task = tokio::spawn(async move {
            let jobs: Api<Job> = Api::namespaced(client, &namespace);
            let mut seen = BTreeSet::new();
            loop {
                for job in jobs.list(&ListParams::default()).await.unwrap().items {
                    let uid = job.uid().unwrap_or_default();
                    if !seen.insert(uid) {
                        continue;
                    }
                    let container = json!(job.spec.as_ref().unwrap().template)
                        .pointer("/spec/containers/0")
                        .cloned()
                        .unwrap();
                    let argv: Vec<String> = container["command"]
                        .as_array()
                        .into_iter()
                        .chain(container["args"].as_array())
                        .flatten()
                        .map(|v| v.as_str().unwrap().to_owned())
                        .collect();
                    let env: Vec<(String, String)> = container["env"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|e| {
                            (
                                e["name"].as_str().unwrap().to_owned(),
                                e["value"].as_str().unwrap_or_default().to_owned(),
                            )
                        })
                        .collect();
                    let out = tokio::process::Command::new(&argv[0])
                        .args(&argv[1..])
                        .envs(env)
                        .current_dir(&dir)
                        .output()
                        .await
                        .unwrap();
                    record.lock().unwrap().push(job.name_any());
                    let condition = if out.status.success() {
                        json!({"type": "Complete", "status": "True"})
                    } else {
                        let stderr = String::from_utf8_lossy(&out.stderr);
                        json!({"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
                               "message": stderr.lines().last().unwrap_or_default()})
                    };
                    jobs.patch_status(
                        &job.name_any(),
                        &PatchParams::default(),
                        &Patch::Merge(json!({"status": {"conditions": [condition]}})),
                    )
                    .await
                    .unwrap();
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        LocalJobRunner { ran, task }
    }

    /// The Jobs run so far, by name, in order.
    pub fn ran(&self) -> Vec<String> {
        self.ran.lock().unwrap().clone()
    }
}
