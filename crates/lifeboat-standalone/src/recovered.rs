//! Recovered VMs in standalone mode: the VM a (test) failover brings up on its disks
//! (`spec.recoveredVm`), carried out by [`lifeboat_control::recovery`] over `FolderDriver`:
//! the rendered definition is a file beside the disks, the hook a process in the manifests
//! folder.
//!
//! ```text
//!  every tick, per VM:  a recovery finished? ──> its recoveredVm into the VM's record
//!                       one running?         ──> the VM's pass waits (its cycles go on)
//!                       one needed?          ──> task: recovery::carry_out(FolderDriver)
//! ```
//!
//! The task alone does the work and the daemon alone writes the record, at the start of a
//! pass, so that the two never write the same record at once. A daemon stopped mid-way
//! finds nothing recorded and does the work again: a hook must be safe to run twice.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use lifeboat_api::ProtectedVM;
use lifeboat_api::plan::PlanHook;
use lifeboat_api::protected_vm::{FailoverResult, RecoveredVm};
use lifeboat_api::recovered::Rendered;
use lifeboat_control::recovery::{self, RecoveryDriver, Work};

use crate::daemon::VM_KIND;
use crate::db::{Db, DbError};
use crate::folder::Key;

/// The recoveries going on, by VM.
#[derive(Debug, Default)]
pub struct Recoveries {
    running: BTreeMap<Key, Running>,
}

#[derive(Debug)]
struct Running {
    work: Work,
    task: tokio::task::JoinHandle<Option<RecoveredVm>>,
}

impl Recoveries {
    /// Take in the VM's finished recovery (into `vm` and its record), start the one it needs;
    /// whether one is running now (the VM's pass then waits: a cleanup must not remove the
    /// disks under a hook, nor a new job change the result being brought up).
    ///
    /// # Errors
    ///
    /// The embedded store failed.
    pub async fn step(
        &mut self,
        db: &Db,
        key: &Key,
        vm: &mut ProtectedVM,
        manifests: &Path,
        now: SystemTime,
        wake: &Arc<tokio::sync::Notify>,
    ) -> Result<bool, DbError> {
        if self.running.get(key).is_some_and(|r| !r.task.is_finished()) {
            return Ok(true);
        }
        if let Some(Running { work, task }) = self.running.remove(key)
            // NB: finished: the join is immediate. An aborted or panicked task did nothing
            // that counts, and the work is found needed again below.
            && let Ok(Some(recovered)) = task.await
        {
            if let Some(status) = vm.status.as_mut() {
                recovery::record(status, work, recovered);
            }
            db.put(VM_KIND, &key.0, &key.1, &*vm)?;
        }
        let Some(work) = recovery::pending(vm) else {
            return Ok(false);
        };
        let driver = FolderDriver {
            manifests: manifests.to_owned(),
        };
        let vm = vm.clone();
        let wake = Arc::clone(wake);
        let task = tokio::spawn(async move {
            let done = recovery::carry_out(&driver, &vm, work, now).await;
            wake.notify_one();
            done
        });
        self.running.insert(key.clone(), Running { work, task });
        Ok(true)
    }

    /// Stop every recovery (the daemon stops); each is done again by the next daemon.
    pub fn abort(&mut self) {
        for running in self.running.values() {
            running.task.abort();
        }
    }
}

/// Files and processes.
struct FolderDriver {
    manifests: PathBuf,
}

/// The file a rendered definition goes to: beside the first disk, named after the recovered
/// VM, with the extension its text says.
fn definition_path(result: &FailoverResult, rendered: &Rendered) -> Result<PathBuf, String> {
    let dir = result
        .disks
        .first()
        .and_then(|d| Path::new(&d.location).parent())
        .ok_or("the failover wrote no disk to put it beside")?;
    let extension = if rendered.object.is_some() {
        "yaml"
    } else if rendered.text.trim_start().starts_with('<') {
        "xml"
    } else {
        "txt"
    };
    Ok(dir.join(format!("{}.{extension}", rendered.name)))
}

#[async_trait]
impl RecoveryDriver for FolderDriver {
    async fn place(
        &self,
        _vm: &ProtectedVM,
        result: &FailoverResult,
        rendered: &Rendered,
    ) -> Result<String, String> {
        let path = definition_path(result, rendered)?;
        let partial = path.with_extension("partial");
        let write = || -> std::io::Result<()> {
            std::fs::write(&partial, &rendered.text)?;
            std::fs::File::open(&partial)?.sync_all()?;
            std::fs::rename(&partial, &path)
        };
        write().map_err(|e| format!("write {}: {e}", path.display()))?;
        Ok(path.display().to_string())
    }

    async fn remove(&self, _vm: &ProtectedVM, definition: &str) -> Result<(), String> {
        match std::fs::remove_file(definition) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e.to_string()),
        }
    }

    async fn hook(
        &self,
        _vm: &ProtectedVM,
        hook: &PlanHook,
        env: &[(String, String)],
    ) -> Result<(), String> {
        crate::plans::run_hook(&self.manifests, hook, env).await
    }
}
