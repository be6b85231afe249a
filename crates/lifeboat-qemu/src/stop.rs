//! Stopping a VM for a planned failover: nothing may reach its disks after the stop, and the
//! disks must stay readable over QMP and NBD for the last view.
//!
//! ```text
//!  QEMU (system emulator)   system_powerdown ─ query-status until "shutdown" (≤ grace) ─ stop
//!  qemu-storage-daemon      no guest CPUs (system_powerdown is CommandNotFound): every export
//!                           of a disk's node that is not Lifeboat's (lbx-*) is deleted, mode
//!                           hard: the guest's connections are dropped with it
//! ```
//!
//! QEMU must run with `-no-shutdown` (libvirt's default) so that a guest that shuts down
//! leaves QEMU, and its QMP socket, in place: a QEMU that exits takes the in-memory bitmaps
//! with it, and the stop then fails with the reason (the VM stays protected; its disks are
//! resynchronized when it comes back).

use std::time::{Duration, Instant};

use lifeboat_engine::backend::{BackendError, DiskRef, Stopped};
use serde_json::{Value, json};

use crate::{EXPORT_PREFIX, Inner};

/// How often the guest's state (or the closing exports) is looked at while waiting.
const POLL: Duration = Duration::from_millis(100);
/// How long deleted exports may take to go (their connections are dropped at once).
const EXPORT_GONE: Duration = Duration::from_secs(10);

impl Inner {
    pub(crate) async fn stop_vm(
        &self,
        disks: &[DiskRef],
        grace: Duration,
    ) -> Result<Stopped, BackendError> {
        match self.qmp_raw("system_powerdown", Value::Null).await {
            Ok(_) => self.wait_then_pause(grace).await,
            Err(e) if e.class() == Some("CommandNotFound") => self.close_guest_exports(disks).await,
            Err(e) => Err(e.into_backend(&self.vm, "system_powerdown", None)),
        }
    }

    /// The guest was asked to shut down: wait for it up to `grace`, then pause it (both
    /// leave QEMU running and its disks readable).
    async fn wait_then_pause(&self, grace: Duration) -> Result<Stopped, BackendError> {
        let deadline = Instant::now() + grace;
        let mut shut_down = false;
        loop {
            let status = self
                .qmp_raw("query-status", Value::Null)
                .await
                .map_err(|e| {
                    let mut error = e.into_backend(&self.vm, "query-status", None);
                    if let BackendError::VmNotFound { detail, .. } = &mut error {
                        detail.push_str(
                        " (QEMU exited when the guest shut down: run it with -no-shutdown, so that \
                         the last changes can be read before the failover)",
                    );
                    }
                    error
                })?;
            let state = status.get("status").and_then(Value::as_str).unwrap_or("");
            if state == "shutdown" {
                shut_down = true;
                break;
            }
            if Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(POLL).await;
        }
        // NB: `stop` after a shutdown too: a guest reset (`-no-reboot` absent) must not start
        // writing again while the last view is read.
        self.qmp("stop", Value::Null, None).await?;
        Ok(if shut_down {
            Stopped::GuestShutDown
        } else {
            Stopped::Paused
        })
    }

    /// A storage daemon: close every export of the VM's disks that is not Lifeboat's own.
    async fn close_guest_exports(&self, disks: &[DiskRef]) -> Result<Stopped, BackendError> {
        let resolved = self.resolve(disks).await?;
        let guest = |exports: &Value| -> Vec<String> {
            exports
                .as_array()
                .map(|l| {
                    l.iter()
                        .filter(|e| {
                            e.get("node-name")
                                .and_then(Value::as_str)
                                .is_some_and(|n| resolved.iter().any(|r| r.node == n))
                        })
                        .filter_map(|e| e.get("id").and_then(Value::as_str))
                        .filter(|id| !id.starts_with(EXPORT_PREFIX))
                        .map(str::to_owned)
                        .collect()
                })
                .unwrap_or_default()
        };
        let closed = guest(&self.qmp("query-block-exports", Value::Null, None).await?);
        for id in &closed {
            match self
                .qmp_raw("block-export-del", json!({ "id": id, "mode": "hard" }))
                .await
            {
                Ok(_) => {}
                // NB: already being deleted (an earlier attempt): waited for below.
                Err(e) if e.desc().contains("already") || e.desc().contains("not found") => {}
                Err(e) => return Err(e.into_backend(&self.vm, "block-export-del", None)),
            }
        }
        let deadline = Instant::now() + EXPORT_GONE;
        loop {
            let left = guest(&self.qmp("query-block-exports", Value::Null, None).await?);
            if left.is_empty() {
                return Ok(Stopped::Detached { closed });
            }
            if Instant::now() >= deadline {
                return Err(BackendError::Transient {
                    vm: self.vm.clone(),
                    action: "close the guest's exports".into(),
                    detail: format!(
                        "export(s) {} still open {}s after block-export-del",
                        left.join(", "),
                        EXPORT_GONE.as_secs()
                    ),
                });
            }
            tokio::time::sleep(POLL).await;
        }
    }
}
