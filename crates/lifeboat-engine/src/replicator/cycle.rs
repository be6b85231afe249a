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

use std::collections::BTreeMap;
use std::time::{Instant, SystemTime};

use lifeboat_blockmap::BlockMap;
use lifeboat_hrl::ResyncThreshold;
use lifeboat_store::{At, Consistency};

use super::logs;
use super::maps::{self, TAG_COPY, TAG_RESYNC};
use super::upload::Uploader;
use super::{Replicator, Report, unix_ms};
use crate::backend::{CloseView, Quiesce, Tracking};
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
        let started = Instant::now();
        let mut report = Report::default();
        let tracking = self.hypervisor.tracking(&self.disks).await?;
        if let Some((disk, why)) = self.disks.iter().zip(&tracking).find_map(|(d, t)| match t {
            Tracking::Lost(why) => Some((d.name.clone(), why.clone())),
            Tracking::Absent => Some((d.name.clone(), "no change tracking on the disk".to_owned())),
            Tracking::Active => None,
        }) {
            return self.resync_needed(
                report,
                &format!("{}: disk {disk:?}: {why}", super::resync::TRACKING_LOST),
            );
        }

        let time_unix_ms = unix_ms(now);
        let quiesce = match (
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
        };
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
            let mut uploader = Uploader::new(
                self.store.clone(),
                self.vm.clone(),
                self.throttle.clone(),
                self.settings.upload_concurrency,
            );
            let mut applied = Ok(());
            for log in &cycle.logs {
                let Some(map) = maps.get_mut(&log.disk) else {
                    applied = Err(EngineError::NotReady {
                        what: format!("disk {:?} has no replica in the store", log.disk),
                    });
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
            let consistency = if cycle.app_consistent {
                Consistency::AppConsistent
            } else {
                Consistency::CrashConsistent
            };
            let point = self
                .cut_point_with_maps(&maps, cycle.time_unix_ms, cycle.cycle, consistency)
                .await?;
            let now_ms = unix_ms(SystemTime::now()).max(cycle.time_unix_ms);
            report.pruned.extend(
                self.store
                    .prune(&self.vm, self.settings.retention.as_millis() as u64, now_ms)
                    .await?,
            );
            self.state.pending.remove(0);
            self.state.applying = false;
            if cycle.app_consistent {
                self.state.last_app_consistent_unix_ms = Some(cycle.time_unix_ms);
            }
            self.state.phase = EnginePhase::Protected;
            self.save()?;
            logs::delete_files(self.fs.as_ref(), &cycle.logs)?;
            report.point = Some(point);
        }
        Ok(())
    }
}
