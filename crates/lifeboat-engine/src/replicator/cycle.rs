//! One replication cycle: freeze every disk at one instant, write and seal one HRL log per
//! disk, record the cycle, then ship every pending cycle in order (apply, cut a point,
//! prune, delete the logs).
//!
//! ```text
//!  open_view ─> write+seal logs ─> record pending ─> close(Commit) ─> threshold? ─> ship
//!     │ error (writing, deleting the written logs, recording)                        │
//!     └─> close(Abandon), always: the changes stay tracked for the next cycle        │
//!  ship: applying=true ─> apply logs ─> flush ─> cut point ─> store maps ─> prune ─> drop logs
//! ```
//!
//! The last cycle of a stopped VM (a planned failover's) writes no log: nothing writes to the
//! disks any more, so its view stays open while the changes go straight to the store.
//!
//! ```text
//!  open_view ─> applying=true ─> view to store ─> flush ─> cut point ─> save ─> close(Commit)
//!     └─> on an error, close(Abandon): the changes stay tracked, the replica is applied again
//! ```

use std::collections::BTreeMap;
use std::time::{Instant, SystemTime};

use lifeboat_blockmap::BlockMap;
use lifeboat_hrl::ResyncThreshold;
use lifeboat_store::{At, Consistency};

use super::logs;
use super::maps::{self, TAG_COPY, TAG_RESYNC};
use super::{Replicator, Report, unix_ms};
use crate::backend::{CloseView, Quiesce, Tracking, View};
use crate::error::EngineError;
use crate::state::{EnginePhase, PendingCycle};

impl Replicator {
    /// Run one cycle at `now`. The first cycle after the initial copy is ASR's "finalize
    /// protection": it ships what changed during the copy and cuts the first point.
    ///
    /// When the cycle finds that the VM needs a resync (tracking lost, the pending logs
    /// over the policy's threshold, a corrupt log), it marks it and returns a report with
    /// `resync_required` set.
    ///
    /// # Errors
    ///
    /// Hypervisor, log or store failures. The logs already sealed stay pending and are
    /// shipped by the next cycle.
    pub async fn run_cycle(&mut self, now: SystemTime) -> Result<Report, EngineError> {
        let started = Instant::now();
        let mut report = Report::default();
        if let Some(reason) = self.tracking_lost().await? {
            return self.resync_needed(report, &reason);
        }
        let time_unix_ms = unix_ms(now);
        let quiesce = self.quiesce_at(time_unix_ms);
        let cycle = self.next_cycle();
        self.save()?;
        let view = self
            .hypervisor
            .open_view(&self.disks, cycle, quiesce)
            .await?;
        let mut written = Vec::new();
        let mut failure = None;
        for info in view.disks().to_vec() {
            match logs::write_log(
                self.fs.as_ref(),
                &self.dir,
                view.as_ref(),
                &info.name,
                info.size_bytes,
                self.settings.block_size_bytes,
                time_unix_ms,
            )
            .await
            {
                Ok((log, bytes)) => {
                    report.bytes_read += bytes;
                    written.push(log);
                }
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        if let Some(e) = failure {
            // NB: the view is closed whatever else fails: the changes it froze go back to the
            // tracking for the next cycle. A log file that cannot be deleted is named by no
            // recorded cycle: the next open removes it.
            if let Err(close) = view.close(CloseView::Abandon).await {
                tracing::warn!(vm = %self.vm, cycle, error = %close, "closing the view failed");
            }
            if let Err(delete) = logs::delete_files(self.fs.as_ref(), &written) {
                tracing::warn!(vm = %self.vm, cycle, error = %delete, "deleting an unrecorded log failed");
            }
            return Err(e);
        }
        let app_consistent = view.quiesced() == Quiesce::Application;
        let sizes: Vec<(String, u64)> = view
            .disks()
            .iter()
            .map(|d| (d.name.clone(), d.size_bytes))
            .collect();
        self.state.pending.push(PendingCycle {
            cycle,
            time_unix_ms,
            app_consistent,
            logs: written,
        });
        if let Err(e) = self.save() {
            // NB: the logs may not be recorded: the view is abandoned, so that the changes
            // stay tracked. The cycle stays pending in memory (saved with the next state, else
            // its logs are removed at the next open): shipping its changes twice is harmless.
            if let Err(close) = view.close(CloseView::Abandon).await {
                tracing::warn!(vm = %self.vm, cycle, error = %close, "closing the view failed");
            }
            return Err(e);
        }
        if let Err(close) = view.close(CloseView::Commit).await {
            // NB: the logs are recorded; a view left open is cleaned up by the next
            // open_view, which folds its changes back: they are shipped twice, harmlessly.
            report
                .warnings
                .push(format!("closing the view of cycle {cycle}: {close}"));
        }

        let threshold = ResyncThreshold::new(self.settings.log_threshold_percent);
        // NB: the sizes come from the view, not the store: the check must work while the
        // store is unreachable, which is when logs pile up.
        for info in &sizes {
            let pending = self
                .state
                .pending
                .iter()
                .flat_map(|c| c.logs.iter())
                .filter(|l| l.disk == info.0)
                .map(|l| l.size_bytes);
            if threshold.is_reached_by_logs(pending, info.1) {
                let reason = format!(
                    "LogThresholdReached: the pending logs of disk {:?} reached {} % of its size",
                    info.0,
                    threshold.percent()
                );
                self.drop_pending_for_resync(&mut report, &reason).await?;
                return self.resync_needed(report, &reason);
            }
        }
        let mut shipped = self.ship(&mut report).await;
        if let Err(EngineError::CorruptLog { path, source }) = &shipped {
            let reason = format!("CorruptLog: {}: {source}", path.display());
            self.drop_pending_for_resync(&mut report, &reason).await?;
            shipped = Ok(());
            report = self.resync_needed(report, &reason)?;
        }
        shipped?;
        report.duration = started.elapsed();
        Ok(report)
    }

    /// Drop the pending logs a resync supersedes. A cycle left half applied (a store failure
    /// or a corrupt log in the middle of shipping) left the live replica ahead of the latest
    /// point, where the stored block map no longer describes it: it is put back to the latest
    /// point now if the store answers. If it does not (logs pile up while the store is away,
    /// which is when the threshold is reached), `applying` stays set and the resync puts it
    /// back before it trusts the map.
    ///
    /// NB: the phase turns ResyncRequired in the same save that forgets the cycles: their
    /// views are committed, so from then on only a resync brings their changes.
    async fn drop_pending_for_resync(
        &mut self,
        report: &mut Report,
        reason: &str,
    ) -> Result<(), EngineError> {
        self.state.phase = EnginePhase::ResyncRequired {
            reason: reason.to_owned(),
        };
        if self.state.applying {
            match self.store.revert_to_latest_point(&self.vm).await {
                Ok(()) => {
                    self.state.applying = false;
                    self.save()?;
                }
                Err(e) => report.warnings.push(format!(
                    "putting the live replica back to the latest point (the resync will): {e}"
                )),
            }
        }
        self.drop_pending()
    }

    /// What every cycle checks first: the phase allows one, and every disk's tracking holds;
    /// the reason a resync is needed when a disk's does not.
    async fn tracking_lost(&self) -> Result<Option<String>, EngineError> {
        match &self.state.phase {
            EnginePhase::Copied | EnginePhase::Protected => {}
            EnginePhase::ResyncRequired { reason } => {
                return Err(EngineError::NotReady {
                    what: format!("VM {} needs a resync first ({reason})", self.vm),
                });
            }
            other => {
                return Err(EngineError::NotReady {
                    what: format!("VM {} cannot replicate while {other:?}", self.vm),
                });
            }
        }
        let tracking = self.hypervisor.tracking(&self.disks).await?;
        Ok(self
            .disks
            .iter()
            .zip(&tracking)
            .find_map(|(d, t)| match t {
                Tracking::Lost(why) => Some((d.name.clone(), why.clone())),
                Tracking::Absent => {
                    Some((d.name.clone(), "no change tracking on the disk".to_owned()))
                }
                Tracking::Active => None,
            })
            .map(|(disk, why)| format!("{}: disk {disk:?}: {why}", super::resync::TRACKING_LOST)))
    }

    /// Whether a cycle at `time_unix_ms` quiesces the guest: the policy's app-consistent
    /// frequency is due.
    fn quiesce_at(&self, time_unix_ms: u64) -> Quiesce {
        match (
            self.settings.app_consistent_every,
            self.state.last_app_consistent_unix_ms,
        ) {
            (Some(every), Some(last))
                if time_unix_ms.saturating_sub(last) >= every.as_millis() as u64 =>
            {
                Quiesce::Application
            }
            (Some(_), None) => Quiesce::Application,
            _ => Quiesce::None,
        }
    }

    /// A cycle shipped straight from its view: as [`Replicator::run_cycle`], but the frozen
    /// changes go from the view to the store, not through a log that would only be written,
    /// synced and read back. For the cycles that need the store now and are not run again on
    /// a schedule: the last one of a VM its hypervisor stopped (a planned failover's; nothing
    /// writes to the disks any more), and the one a planned failback runs before the stop (a
    /// fresh point of the running VM: what the guest writes while the view is open is copied
    /// into the view's overlay first, as in any cycle; the view stays open for as long as
    /// shipping takes, a fraction of a second for a copy interval's changes to a local store,
    /// as long as the store takes otherwise, the guest's writes paying the copy meanwhile;
    /// a store that fails ends it, the view abandoned, and the failback's step is retried).
    /// While cycles
    /// are still pending (their logs written before), this is [`Replicator::run_cycle`]: they
    /// ship first, and this one is logged as well.
    ///
    /// Nothing is lost on a failure or a crash: the view is committed only once the point is
    /// cut and saved (before, it is abandoned, or a crash leaves it open and the next view
    /// folds its changes back), and the live replica is marked `applying` while it is ahead
    /// of the latest point (put back to it at the next open, or simply written again: the
    /// next attempt ships every block this one did, whole).
    pub(super) async fn run_direct_cycle(
        &mut self,
        now: SystemTime,
    ) -> Result<Report, EngineError> {
        if !self.state.pending.is_empty() {
            return self.run_cycle(now).await;
        }
        let started = Instant::now();
        let report = Report::default();
        if let Some(reason) = self.tracking_lost().await? {
            return self.resync_needed(report, &reason);
        }
        let time_unix_ms = unix_ms(now);
        let quiesce = self.quiesce_at(time_unix_ms);
        let cycle = self.next_cycle();
        self.save()?;
        let view = self
            .hypervisor
            .open_view(&self.disks, cycle, quiesce)
            .await?;
        match self
            .ship_view(view.as_ref(), cycle, time_unix_ms, report)
            .await
        {
            Ok(mut report) => {
                if let Err(close) = view.close(CloseView::Commit).await {
                    // NB: the point holds the changes; a view left open is cleaned up by the
                    // next open_view, which folds them back: shipped twice, harmlessly.
                    report
                        .warnings
                        .push(format!("closing the view of cycle {cycle}: {close}"));
                }
                report.duration = started.elapsed();
                Ok(report)
            }
            Err(e) => {
                if let Err(close) = view.close(CloseView::Abandon).await {
                    tracing::warn!(vm = %self.vm, cycle, error = %close, "closing the view failed");
                }
                Err(e)
            }
        }
    }

    /// Ship what `view` froze straight to the store and cut cycle `cycle`'s point.
    async fn ship_view(
        &mut self,
        view: &dyn View,
        cycle: u64,
        time_unix_ms: u64,
        mut report: Report,
    ) -> Result<Report, EngineError> {
        let mut maps = self.current_maps().await?;
        self.state.applying = true;
        self.save()?;
        let mut uploader = self.uploader();
        let mut shipped = Ok(());
        for info in view.disks().to_vec() {
            let Some(map) = maps.get_mut(&info.name) else {
                shipped = Err(no_replica(&info.name));
                break;
            };
            match logs::ship_changes(
                view,
                &info.name,
                info.size_bytes,
                self.settings.block_size_bytes,
                map,
                &mut uploader,
            )
            .await
            {
                Ok(bytes) => report.bytes_read += bytes,
                Err(e) => {
                    shipped = Err(e);
                    break;
                }
            }
        }
        let finished = uploader.finish().await;
        shipped?;
        finished?;
        report.bytes_sent += uploader.bytes_sent;
        let app_consistent = view.quiesced() == Quiesce::Application;
        let point = self
            .cut_cycle_point(&maps, time_unix_ms, cycle, app_consistent, &mut report)
            .await?;
        self.state.applying = false;
        self.state.phase = EnginePhase::Protected;
        self.save()?;
        report.point = Some(point);
        Ok(report)
    }

    /// Cut the point of cycle `cycle` (the live replica holds it, `maps` describe it) and
    /// prune by retention; `last_app_consistent_unix_ms` follows an app-consistent one (the
    /// caller saves the state).
    async fn cut_cycle_point(
        &mut self,
        maps: &BTreeMap<String, BlockMap>,
        time_unix_ms: u64,
        cycle: u64,
        app_consistent: bool,
        report: &mut Report,
    ) -> Result<lifeboat_store::RecoveryPoint, EngineError> {
        let consistency = if app_consistent {
            Consistency::AppConsistent
        } else {
            Consistency::CrashConsistent
        };
        let point = self
            .cut_point_with_maps(maps, time_unix_ms, cycle, consistency)
            .await?;
        let now_ms = unix_ms(SystemTime::now()).max(time_unix_ms);
        report.pruned.extend(
            self.store
                .prune(&self.vm, self.settings.retention.as_millis() as u64, now_ms)
                .await?,
        );
        if app_consistent {
            self.state.last_app_consistent_unix_ms = Some(time_unix_ms);
        }
        Ok(point)
    }

    fn resync_needed(&mut self, mut report: Report, reason: &str) -> Result<Report, EngineError> {
        tracing::warn!(vm = %self.vm, reason, "resync required");
        self.set_phase(EnginePhase::ResyncRequired {
            reason: reason.to_owned(),
        })?;
        report.resync_required = Some(reason.to_owned());
        Ok(report)
    }

    /// The block maps of the latest point (or of the finished copy), rebuilt from the replica
    /// when the stored one cannot be trusted.
    pub(super) async fn current_maps(&self) -> Result<BTreeMap<String, BlockMap>, EngineError> {
        let manifest = self.store.manifest(&self.vm).await?;
        let latest = manifest
            .as_ref()
            .and_then(|m| m.latest())
            .map(|p| p.id.clone());
        let mut trusted: Vec<&str> = Vec::new();
        if let Some(id) = &latest {
            trusted.push(id);
        }
        if self.state.phase == EnginePhase::Copied {
            // NB: after a copy the maps the copy stored describe the live replica, even when
            // a point of an earlier protection exists (the replica was kept at disable).
            trusted.push(TAG_COPY);
        }
        if self.state.resync_cycle.is_some() {
            trusted.push(TAG_RESYNC);
        }
        let mut out = BTreeMap::new();
        for (disk, size) in manifest
            .map(|m| {
                m.disks
                    .into_iter()
                    .map(|d| (d.name, d.size_bytes))
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default()
        {
            let block = self.settings.block_size_bytes;
            let map = match maps::load_trusted(
                self.store.as_ref(),
                &self.vm,
                &disk,
                size,
                block,
                &trusted,
            )
            .await?
            {
                Some(map) => map,
                None => {
                    tracing::info!(vm = %self.vm, disk, "the stored block map does not describe the replica: re-hashing it");
                    maps::hash_replica(self.store.as_ref(), &self.vm, &disk, &At::Live, size, block)
                        .await?
                }
            };
            out.insert(disk, map);
        }
        Ok(out)
    }

    /// Apply every pending cycle, oldest first, each ending in a recovery point.
    async fn ship(&mut self, report: &mut Report) -> Result<(), EngineError> {
        if self.state.pending.is_empty() {
            return Ok(());
        }
        let mut maps = self.current_maps().await?;
        while let Some(cycle) = self.state.pending.first().cloned() {
            self.state.applying = true;
            self.save()?;
            let mut uploader = self.uploader();
            let mut applied = Ok(());
            for log in &cycle.logs {
                let Some(map) = maps.get_mut(&log.disk) else {
                    applied = Err(no_replica(&log.disk));
                    break;
                };
                if let Err(e) = logs::apply_log(self.fs.as_ref(), log, map, &mut uploader).await {
                    applied = Err(e);
                    break;
                }
            }
            let finished = uploader.finish().await;
            applied?;
            finished?;
            report.bytes_sent += uploader.bytes_sent;
            let point = self
                .cut_cycle_point(
                    &maps,
                    cycle.time_unix_ms,
                    cycle.cycle,
                    cycle.app_consistent,
                    report,
                )
                .await?;
            self.state.pending.remove(0);
            self.state.applying = false;
            self.state.phase = EnginePhase::Protected;
            self.save()?;
            logs::delete_files(self.fs.as_ref(), &cycle.logs)?;
            report.point = Some(point);
        }
        Ok(())
    }
}

/// A disk a cycle changed that has no replica in the store.
fn no_replica(disk: &str) -> EngineError {
    EngineError::NotReady {
        what: format!("disk {disk:?} has no replica in the store"),
    }
}
