//! A point-in-time view of a QEMU VM's disks: per disk a fleece overlay fed by a
//! copy-before-write backup job, exported read-only over NBD together with the frozen bitmap.
//!
//! ```text
//!  open:   blockdev-create overlay ─> blockdev-add lbf ─> [fsfreeze] ─> transaction ─> [thaw]
//!          ─> nbd-server-start (unless running) ─> block-export-add lbx (+ bitmap) ─> NBD connect
//!  read:   NBD READ / BLOCK_STATUS(base:allocation | qemu:dirty-bitmap:lifeboat-p) on lbx
//!  close:  NBD DISC ─> block-export-del ─> block-job-cancel ─> blockdev-del ─> rm overlay
//!          ─> transaction [remove lifeboat-p]                      (Commit)
//!          ─> transaction [merge lifeboat-p into lifeboat-c, remove] (Abandon)
//! ```
//!
//! A disk with a recording seed bitmap (`lifeboat-since-<point>`: a failover's qcow2 output,
//! or a stopped source a planned failover marked) has it disabled in the same transaction and
//! exported beside the frozen bitmap, so that a re-protect from that point reads only the
//! blocks written since ([`View::changed_since`]); the view removes it when it closes. A raw
//! disk has no bitmap to keep across a restart: its file's reflinked twin, when the failover
//! left one ([`lifeboat_engine::twin`]), names those blocks instead, read just before the cut
//! while the disk's dirty bitmap records, and joined with the blocks the bitmap froze.

use super::nbd::{self, NbdClient, NbdError};
use super::qmp::GuestAgent;
use super::{
    CREATE_JOB_PREFIX, DIRTY_BITMAP_CONTEXT_PREFIX, Inner, Resolved, bitmap_name, merge_and_remove,
};
use async_trait::async_trait;
use bytes::Bytes;
use lifeboat_engine::backend::{
    BackendError, CloseView, DiskInfo, Quiesce, View, merge_ranges, union_ranges,
};
use serde_json::{Value, json};
use std::fmt;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;

/// One disk of a view and the QEMU objects that make it.
pub(super) struct ViewDisk {
    pub(super) disk: String,
    pub(super) node: String,
    pub(super) size_bytes: u64,
    /// What the view says of the disk.
    pub(super) info: DiskInfo,
    /// The cycle of the bitmap this view froze.
    pub(super) frozen_cycle: u64,
    /// The bitmap frozen by this view (`lifeboat-<previous cycle>`).
    pub(super) frozen: String,
    /// The bitmap recording since this view (`lifeboat-<cycle>`).
    pub(super) active: String,
    pub(super) fleece_path: PathBuf,
    pub(super) fleece_node: String,
    pub(super) job: String,
    pub(super) export: String,
    /// The seed bitmap ([`lifeboat_engine::backend::seed_bitmap_name`]) this view froze and
    /// exports: the disk's writes from its point until the view. Removed when the view closes.
    pub(super) seed: Option<String>,
    /// For each point the raw file has a reflinked twin of: the ranges written since, as its
    /// extent maps said just before this view froze the bitmap (which recorded from before
    /// then).
    pub(super) twin_changes: Vec<(String, Vec<Range<u64>>)>,
    conn: tokio::sync::Mutex<Option<NbdClient>>,
}

impl fmt::Debug for ViewDisk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ViewDisk")
            .field("disk", &self.disk)
            .field("node", &self.node)
            .field("frozen", &self.frozen)
            .field("export", &self.export)
            .finish_non_exhaustive()
    }
}

impl ViewDisk {
    pub(super) fn new(
        r: &Resolved,
        frozen_cycle: u64,
        cycle: u64,
        fleece_path: PathBuf,
        fleece_node: String,
        job: String,
        export: String,
    ) -> Self {
        Self {
            disk: r.disk.clone(),
            node: r.node.clone(),
            size_bytes: r.size_bytes,
            info: r.info(),
            frozen_cycle,
            frozen: bitmap_name(frozen_cycle),
            active: bitmap_name(cycle),
            fleece_path,
            fleece_node,
            job,
            export,
            seed: r.seed.clone(),
            twin_changes: Vec::new(),
            conn: tokio::sync::Mutex::new(None),
        }
    }

    fn bitmap_context(&self) -> String {
        format!("{DIRTY_BITMAP_CONTEXT_PREFIX}{}", self.frozen)
    }

    fn seed_context(&self) -> Option<String> {
        self.seed
            .as_ref()
            .map(|s| format!("{DIRTY_BITMAP_CONTEXT_PREFIX}{s}"))
    }

    /// The dirty ranges of bitmap context `context`.
    fn dirty(extents: Vec<nbd::Extent>) -> Vec<Range<u64>> {
        merge_ranges(
            extents
                .into_iter()
                .filter(|e| e.flags & nbd::NBD_STATE_DIRTY != 0)
                .map(|e| e.range),
        )
    }

    fn ctx(&self) -> Option<(&str, &str)> {
        Some((&self.disk, &self.node))
    }
}

/// The [`View`] of the `qemu` backend.
pub(super) struct QemuView {
    inner: Arc<Inner>,
    cycle: u64,
    quiesced: Quiesce,
    disks: Vec<DiskInfo>,
    pub(super) parts: Vec<ViewDisk>,
    nbd_socket: Option<PathBuf>,
    started_server: bool,
    /// Whether the transaction ran: the bitmaps changed and closing must settle them.
    cut: bool,
    closed: bool,
}

impl fmt::Debug for QemuView {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QemuView")
            .field("vm", &self.inner.vm)
            .field("cycle", &self.cycle)
            .field("quiesced", &self.quiesced)
            .field("parts", &self.parts)
            .field("nbd_socket", &self.nbd_socket)
            .finish_non_exhaustive()
    }
}

impl QemuView {
    pub(super) fn new(inner: Arc<Inner>, cycle: u64, parts: Vec<ViewDisk>) -> Self {
        let disks = parts.iter().map(|p| p.info.clone()).collect();
        Self {
            inner,
            cycle,
            quiesced: Quiesce::None,
            disks,
            parts,
            nbd_socket: None,
            started_server: false,
            cut: false,
            closed: false,
        }
    }

    /// Build the view in QEMU. On error the caller tears down what was built.
    pub(super) async fn open(&mut self, quiesce: Quiesce) -> Result<(), BackendError> {
        let inner = Arc::clone(&self.inner);
        for p in &self.parts {
            self.create_overlay(p).await?;
        }
        for p in &self.parts {
            let args = json!({
                "driver": "qcow2",
                "node-name": p.fleece_node,
                "file": { "driver": "file", "filename": p.fleece_path },
                "backing": p.node,
            });
            inner.qmp("blockdev-add", args, p.ctx()).await?;
        }

        let mut actions = Vec::with_capacity(self.parts.len() * 3);
        for p in &self.parts {
            // NB: the new epoch's bitmap is as durable as the disk allows (a raw disk's lives
            // in QEMU's memory: a persistent one is refused).
            actions.push(json!({ "type": "block-dirty-bitmap-add",
                "data": { "node": p.node, "name": p.active,
                          "persistent": p.info.durability.survives_restart() } }));
            actions.push(json!({ "type": "block-dirty-bitmap-disable",
                "data": { "node": p.node, "name": p.frozen } }));
            // NB: a seed stops recording at the cut, in the same transaction: it then holds
            // exactly the writes from its point until this view (and an enabled bitmap
            // cannot be exported read-only).
            if let Some(seed) = &p.seed {
                actions.push(json!({ "type": "block-dirty-bitmap-disable",
                    "data": { "node": p.node, "name": seed } }));
            }
            actions.push(json!({ "type": "blockdev-backup",
                "data": { "device": p.node, "target": p.fleece_node, "sync": "none", "job-id": p.job } }));
        }
        let agent = match (quiesce, &inner.guest_agent) {
            (Quiesce::Application, Some(agent)) => Some(agent.clone()),
            (Quiesce::Application, None) => {
                tracing::info!(vm = %inner.vm, cycle = self.cycle,
                    "no guest agent socket configured: the view is crash-consistent");
                None
            }
            (Quiesce::None, _) => None,
        };
        // NB: freeze, cut and thaw run in a task of their own, so that a caller who gives up
        // (a timeout, a cancelled cycle) cannot leave the guest frozen or the cut half-known.
        let task = tokio::spawn(cut(Arc::clone(&inner), actions, agent));
        let outcome = task
            .await
            .map_err(|e| inner.permanent("cut the view", format!("the cut task failed: {e}")))?;
        self.cut = outcome.cut.is_ok();
        if outcome.quiesced {
            self.quiesced = Quiesce::Application;
        }
        outcome.cut?;
        outcome.thaw?;

        let (socket, started) = inner.ensure_nbd_server().await?;
        self.nbd_socket = Some(socket);
        self.started_server = started;
        for p in &self.parts {
            let mut bitmaps = vec![json!({ "node": p.node, "name": p.frozen })];
            if let Some(seed) = &p.seed {
                bitmaps.push(json!({ "node": p.node, "name": seed }));
            }
            let args = json!({
                "type": "nbd",
                "id": p.export,
                "node-name": p.fleece_node,
                "name": p.export,
                "writable": false,
                "bitmaps": bitmaps,
            });
            inner.qmp("block-export-add", args, p.ctx()).await?;
        }
        for p in &self.parts {
            let client = self.connect(p).await?;
            if client.size() < p.size_bytes {
                return Err(inner.permanent(
                    "open a view",
                    format!(
                        "export {} of disk {:?} has {} bytes, less than the disk's {}",
                        p.export,
                        p.disk,
                        client.size(),
                        p.size_bytes
                    ),
                ));
            }
            *p.conn.lock().await = Some(client);
        }
        Ok(())
    }

    async fn create_overlay(&self, p: &ViewDisk) -> Result<(), BackendError> {
        let inner = &self.inner;
        super::remove_file_if_any(&p.fleece_path)
            .await
            .map_err(|e| inner.permanent("remove a stale overlay", e))?;
        tokio::fs::create_dir_all(&inner.work_dir)
            .await
            .map_err(|e| {
                inner.permanent(
                    "create the work directory",
                    format!("{}: {e}", inner.work_dir.display()),
                )
            })?;
        // NB: QEMU formats the overlay itself (a `blockdev-create` job), where a `qemu-img`
        // process per disk and view cost a program start (tens of milliseconds when it is
        // not in the page cache). Its `file` driver opens, never creates: the file first.
        tokio::fs::File::create(&p.fleece_path).await.map_err(|e| {
            inner.permanent(
                "create the fleece overlay",
                format!("{}: {e}", p.fleece_path.display()),
            )
        })?;
        // NB: a job an earlier attempt left (same cycle, same id) was dismissed by the sweep
        // that opening a view starts with.
        let job = format!("{CREATE_JOB_PREFIX}{}", p.fleece_node);
        let args = json!({
            "job-id": job,
            "options": {
                "driver": "qcow2",
                "file": { "driver": "file", "filename": p.fleece_path },
                "size": p.size_bytes,
            },
        });
        inner.qmp("blockdev-create", args, p.ctx()).await?;
        if let Some(why) = inner.wait_job_concluded(&job, p.ctx()).await? {
            return Err(inner.permanent(
                "create the fleece overlay",
                format!(
                    "formatting {} for disk {:?} (node {:?}) failed: {why}",
                    p.fleece_path.display(),
                    p.disk,
                    p.node
                ),
            ));
        }
        Ok(())
    }

    async fn connect(&self, p: &ViewDisk) -> Result<NbdClient, BackendError> {
        let Some(socket) = &self.nbd_socket else {
            return Err(self
                .inner
                .permanent("connect to the view", "the view has no NBD server"));
        };
        let mut contexts = vec![nbd::BASE_ALLOCATION.to_owned(), p.bitmap_context()];
        contexts.extend(p.seed_context());
        NbdClient::connect_unix(socket, &p.export, &contexts, self.inner.options.nbd_timeout)
            .await
            .map_err(|e| self.nbd_error(p, "connect", e))
    }

    fn nbd_error(&self, p: &ViewDisk, action: &str, e: NbdError) -> BackendError {
        let vm = self.inner.vm.clone();
        let socket = self
            .nbd_socket
            .as_ref()
            .map_or_else(String::new, |s| s.display().to_string());
        let action = format!(
            "NBD {action} of disk {:?} (node {:?}, export {} on {socket})",
            p.disk, p.node, p.export
        );
        let detail = e.to_string();
        match e {
            NbdError::Connect { .. } => BackendError::VmNotFound {
                vm,
                detail: format!("{action}: {detail}"),
            },
            NbdError::Io(_) | NbdError::Timeout(_) => {
                BackendError::Transient { vm, action, detail }
            }
            NbdError::Command {
                errno: 12 | 108, ..
            } => BackendError::Transient { vm, action, detail },
            _ => BackendError::Permanent { vm, action, detail },
        }
    }

    fn part(&self, disk: &str) -> Result<&ViewDisk, BackendError> {
        self.parts
            .iter()
            .find(|p| p.disk == disk)
            .ok_or_else(|| BackendError::DiskNotFound {
                vm: self.inner.vm.clone(),
                disk: disk.to_owned(),
                detail: format!("not in the view of cycle {}", self.cycle),
            })
    }

    /// The disk's connection, reconnected if an earlier failure broke it.
    async fn connection<'a>(
        &self,
        p: &'a ViewDisk,
    ) -> Result<tokio::sync::MutexGuard<'a, Option<NbdClient>>, BackendError> {
        if self.closed {
            return Err(self.inner.permanent(
                "read the view",
                format!("the view of cycle {} is closed", self.cycle),
            ));
        }
        let mut guard = p.conn.lock().await;
        if guard.as_ref().is_none_or(NbdClient::is_broken) {
            *guard = Some(self.connect(p).await?);
        }
        Ok(guard)
    }

    async fn block_status(
        &self,
        p: &ViewDisk,
        context: &str,
    ) -> Result<Vec<nbd::Extent>, BackendError> {
        let mut guard = self.connection(p).await?;
        let Some(client) = guard.as_mut() else {
            return Err(self.inner.permanent("read the view", "no NBD connection"));
        };
        client
            .block_status(context, 0, p.size_bytes)
            .await
            .map_err(|e| self.nbd_error(p, "block status", e))
    }

    /// Tear down what `open` built, tolerating pieces that were never built.
    ///
    /// # Guarantees
    /// The frozen bitmap is removed (Commit) or folded back (Abandon) only after its export,
    /// job and fleece node are gone; if any of those fails, the bitmaps stay as they are and
    /// the next sweep folds the frozen bitmap back, as Abandon would.
    pub(super) async fn teardown(&mut self, how: CloseView) -> Result<(), BackendError> {
        let inner = Arc::clone(&self.inner);
        for p in &self.parts {
            if let Some(client) = p.conn.lock().await.take()
                && let Err(e) = client.disconnect().await
            {
                tracing::debug!(vm = %inner.vm, export = %p.export, error = %e, "NBD disconnect failed");
            }
        }
        let mut first_error: Option<BackendError> = None;
        let mut keep = |r: Result<(), BackendError>| match r {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(vm = %inner.vm, cycle = self.cycle, error = %e, "closing the view");
                first_error.get_or_insert(e);
                false
            }
        };
        let mut clean = true;
        for p in &self.parts {
            let soft = inner.delete_export(&p.export, false).await;
            // NB: a client we do not know of (another process on a shared NBD server) keeps a
            // soft-deleted export alive; force it.
            let r = match soft {
                Ok(()) => Ok(()),
                Err(_) => inner.delete_export(&p.export, true).await,
            };
            clean &= keep(r);
        }
        for p in &self.parts {
            clean &= keep(inner.cancel_job(&p.job).await);
        }
        for p in &self.parts {
            clean &= keep(inner.delete_fleece(&p.fleece_node).await);
        }
        if self.cut && clean {
            let mut actions = Vec::new();
            for p in &self.parts {
                // NB: used or not, a seed this view froze records nothing any more.
                if let Some(seed) = &p.seed {
                    actions.push(json!({ "type": "block-dirty-bitmap-remove",
                        "data": { "node": p.node, "name": seed } }));
                }
                match how {
                    CloseView::Commit => actions.push(json!({ "type": "block-dirty-bitmap-remove",
                        "data": { "node": p.node, "name": p.frozen } })),
                    CloseView::Abandon => {
                        actions.extend(merge_and_remove(&p.node, p.frozen_cycle, self.cycle))
                    }
                }
            }
            if !actions.is_empty() {
                let r = inner
                    .qmp("transaction", json!({ "actions": actions }), None)
                    .await
                    .map(|_| ());
                if keep(r) {
                    self.cut = false;
                }
            }
        } else if self.cut {
            tracing::warn!(vm = %inner.vm, cycle = self.cycle,
                "the view was not fully torn down: its frozen bitmaps stay until the next sweep folds them back");
        }
        if self.started_server {
            let r = inner.stop_nbd_server_if_idle().await;
            if keep(r) {
                self.started_server = false;
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Tear down and mark the view closed (the VM may open another).
    pub(super) async fn finish(&mut self, how: CloseView) -> Result<(), BackendError> {
        let r = self.teardown(how).await;
        self.closed = true;
        self.inner.set_open_cycle(None);
        r
    }
}

impl Drop for QemuView {
    fn drop(&mut self) {
        if !self.closed {
            // NB: no async teardown in drop; what is left in QEMU is swept by the next
            // tracking() or open_view(), which folds the frozen bitmaps back (as Abandon).
            tracing::warn!(vm = %self.inner.vm, cycle = self.cycle,
                "a view was dropped without close: the next tracking() or open_view() cleans up and keeps its changes");
            self.inner.set_open_cycle(None);
        }
    }
}

/// What [`cut`] did.
struct CutOutcome {
    /// Whether the guest's file systems were frozen for the transaction.
    quiesced: bool,
    /// The transaction's result.
    cut: Result<(), BackendError>,
    /// The thaw's result (Ok when there was nothing to thaw).
    thaw: Result<(), BackendError>,
}

/// Freeze the guest (with an agent), run the cut transaction, thaw (whatever happened).
async fn cut(inner: Arc<Inner>, actions: Vec<Value>, agent: Option<GuestAgent>) -> CutOutcome {
    let mut quiesced = false;
    if let Some(agent) = &agent {
        match agent.execute("guest-fsfreeze-freeze", Value::Null).await {
            Ok(n) => {
                tracing::debug!(vm = %inner.vm, frozen = %n, "guest file systems frozen");
                quiesced = true;
            }
            Err(e) => tracing::warn!(vm = %inner.vm, error = %e,
                "the guest could not be frozen: the view is crash-consistent"),
        }
    }
    let cut = inner
        .qmp("transaction", json!({ "actions": actions }), None)
        .await
        .map(|_| ());
    let mut thaw = Ok(());
    // NB: thaw even when the freeze reported failure: it may have frozen some file systems.
    if let Some(agent) = &agent {
        let mut last = None;
        for _ in 0..3 {
            match agent.execute("guest-fsfreeze-thaw", Value::Null).await {
                Ok(_) => {
                    last = None;
                    break;
                }
                Err(e) => last = Some(e),
            }
        }
        if let Some(e) = last {
            tracing::error!(vm = %inner.vm, socket = %agent.socket().display(), error = %e,
                "thawing the guest failed: its file systems may still be frozen");
            thaw = Err(inner.permanent(
                "guest-fsfreeze-thaw",
                format!(
                    "guest agent {}: {e}; the guest may still be frozen",
                    agent.socket().display()
                ),
            ));
        }
    }
    CutOutcome {
        quiesced,
        cut,
        thaw,
    }
}

#[async_trait]
impl View for QemuView {
    fn cycle(&self) -> u64 {
        self.cycle
    }

    fn quiesced(&self) -> Quiesce {
        self.quiesced
    }

    fn disks(&self) -> &[DiskInfo] {
        &self.disks
    }

    async fn changed_extents(&self, disk: &str) -> Result<Vec<Range<u64>>, BackendError> {
        let p = self.part(disk)?;
        let extents = self.block_status(p, &p.bitmap_context()).await?;
        Ok(ViewDisk::dirty(extents))
    }

    async fn changed_since(
        &self,
        disk: &str,
        point: &str,
    ) -> Result<Option<Vec<Range<u64>>>, BackendError> {
        let p = self.part(disk)?;
        let wanted = lifeboat_engine::backend::seed_bitmap_name(point);
        if let Some(context) = p
            .seed_context()
            .filter(|_| p.seed.as_ref() == Some(&wanted))
        {
            let extents = self.block_status(p, &context).await?;
            return Ok(Some(ViewDisk::dirty(extents)));
        }
        let Some((_, since_twin)) = p.twin_changes.iter().find(|(at, _)| at == point) else {
            return Ok(None);
        };
        // NB: the twin's ranges were read before the cut, while the frozen bitmap recorded:
        // what the guest wrote after they were read (a range written before and punched back
        // to a hole after, say) is in the bitmap.
        let mut changed = since_twin.clone();
        changed.extend(ViewDisk::dirty(
            self.block_status(p, &p.bitmap_context()).await?,
        ));
        Ok(Some(union_ranges(changed)))
    }

    async fn allocated_extents(&self, disk: &str) -> Result<Vec<Range<u64>>, BackendError> {
        let p = self.part(disk)?;
        let extents = self.block_status(p, nbd::BASE_ALLOCATION).await?;
        // NB: a hole without the zero flag may read as non-zero (the spec says so), so only
        // the zero flag makes a range skippable.
        Ok(merge_ranges(
            extents
                .into_iter()
                .filter(|e| e.flags & nbd::NBD_STATE_ZERO == 0)
                .map(|e| e.range),
        ))
    }

    async fn read(&self, disk: &str, offset: u64, len: u64) -> Result<Bytes, BackendError> {
        let mut data = self.read_many(disk, &[(offset, len)]).await?;
        data.pop()
            .ok_or_else(|| self.inner.permanent("read the view", "no data"))
    }

    async fn read_many(
        &self,
        disk: &str,
        pieces: &[(u64, u64)],
    ) -> Result<Vec<Bytes>, BackendError> {
        let p = self.part(disk)?;
        for &(offset, len) in pieces {
            if offset.checked_add(len).is_none_or(|end| end > p.size_bytes) {
                return Err(self.inner.permanent(
                    "read the view",
                    format!(
                        "{offset}+{len} is past the end {} of disk {:?}",
                        p.size_bytes, p.disk
                    ),
                ));
            }
        }
        let mut guard = self.connection(p).await?;
        let Some(client) = guard.as_mut() else {
            return Err(self.inner.permanent("read the view", "no NBD connection"));
        };
        client
            .read_many(pieces)
            .await
            .map_err(|e| self.nbd_error(p, "read", e))
    }

    async fn close(mut self: Box<Self>, how: CloseView) -> Result<(), BackendError> {
        let inner = Arc::clone(&self.inner);
        let _ops = inner.ops.lock().await;
        self.finish(how).await
    }
}
