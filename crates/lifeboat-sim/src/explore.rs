//! The schedule explorer: the real [`Replicator`] over the simulated VM, store and state
//! file system, driven through copy, cycles with guest writes (data, zeros, discards),
//! resyncs, disable and enable, test, planned and unplanned failovers, with faults, agent
//! crashes and power cuts at points the seed picks; after every step and every recovery it
//! checks the invariants a recovery point owes its user.
//!
//! # Invariants
//!
//! 1. Every point's content equals what the source held at the point's instant (the view of
//!    its cycle), disk by disk. A point whose digest matches wrong content is reported as the
//!    worst case: it vouches for wrong data.
//! 2. Nothing acknowledged is lost: every point the engine reported cut is still there until
//!    retention, a commit or a deletion removes it, whatever power cuts happened since.
//! 3. A cycle number is never used for two views.
//! 4. No wedge: once the faults stop, the VM gets back to Protected with a point equal to the
//!    source.
//! 5. Every (test) failover's disks equal the source at the chosen point.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use lifeboat_blockmap::{BlockMap, HashAlgorithm};
use lifeboat_engine::replicator::{Output, PointChoice, disk_digest};
use lifeboat_engine::state::{AgentState, EnginePhase};
use lifeboat_engine::{EngineError, Replicator, Report, Settings};
use lifeboat_store::local::LocalStore;
use lifeboat_store::{At, RecoveryPoint, ReplicaStore, VmKey};

use crate::fs::SimFs;
use crate::rng::Rng;
use crate::store::SimStore;
use crate::vm::SimVm;
use crate::world::World;

/// What one schedule does.
#[derive(Clone, Debug)]
pub struct Options {
    /// The seed: the same seed replays the same schedule.
    pub seed: u64,
    /// Steps (one engine operation each, with guest writes before it).
    pub steps: usize,
    /// Chance per step of a power cut during the step's operation, per mille.
    pub power_cut_per_mille: u64,
    /// Chance per step of an agent crash (the process dies; the node keeps its power).
    pub crash_per_mille: u64,
    /// The highest share of calls that fail, per mille (each step picks up to this).
    pub max_fault_per_mille: u64,
    /// Chance per step that the node's state folder is lost, per mille.
    pub lose_state_per_mille: u64,
}

impl Options {
    /// The defaults for `seed`.
    pub fn new(seed: u64) -> Options {
        Options {
            seed,
            steps: 40,
            power_cut_per_mille: 150,
            crash_per_mille: 50,
            max_fault_per_mille: 15,
            lose_state_per_mille: 10,
        }
    }
}

/// What a schedule did and found.
#[derive(Clone, Debug, Default)]
pub struct Outcome {
    /// The seed.
    pub seed: u64,
    /// Steps run.
    pub steps: usize,
    /// Power cuts applied.
    pub power_cuts: u64,
    /// Agent crashes.
    pub crashes: u64,
    /// State folders lost.
    pub states_lost: u64,
    /// Faults injected into calls.
    pub faults: u64,
    /// Calls the components answered.
    pub calls: u64,
    /// Points whose content was checked (a point counts once per check).
    pub points_checked: u64,
    /// Failovers (test or real) checked.
    pub failovers_checked: u64,
    /// Operations run, by name.
    pub operations: BTreeMap<&'static str, u64>,
    /// Broken invariants, each with the step it was seen at.
    pub violations: Vec<String>,
    /// What happened, step by step (for a failing seed).
    pub trace: Vec<String>,
}

/// The disks of the simulated VM.
const DISKS: [(&str, u64); 2] = [("root", 1024 * 1024), ("data", 512 * 1024)];
/// The simulated time between steps.
const STEP: Duration = Duration::from_secs(30);
const STATE_DIR: &str = "/var/lib/lifeboat/vms/sim";
/// The engine's block size here (its maps hash blocks of this size).
const BLOCK_BYTES: u32 = 16 * 1024;

fn settings() -> Settings {
    Settings {
        copy_interval: STEP,
        retention: Duration::from_secs(180),
        app_consistent_every: Some(Duration::from_secs(120)),
        log_threshold_percent: 30,
        block_size_bytes: BLOCK_BYTES,
        // NB: one store call at a time, so that calls reach the world in one order and a
        // seed replays exactly.
        upload_concurrency: 1,
        checkpoint_bytes: 64 * 1024,
        ..Settings::default()
    }
}

struct Rig {
    options: Options,
    rng: Rng,
    world: Arc<World>,
    fs: SimFs,
    vm: SimVm,
    key: VmKey,
    store_root: tempfile::TempDir,
    failover_dir: tempfile::TempDir,
    store: Arc<SimStore>,
    engine: Option<Replicator>,
    clock: SystemTime,
    /// Points the engine reported cut and not reported deleted: id → time.
    acknowledged: BTreeMap<String, u64>,
    /// Points checked against the source, with each disk's digest as read then (a point's
    /// content never changes after).
    checked: BTreeMap<String, Vec<lifeboat_store::DiskDigest>>,
    outcome: Outcome,
    step: usize,
}

/// Run one schedule.
///
/// # Errors
///
/// The rig itself failed (a temporary folder, the runtime): not a finding.
pub fn run(options: Options) -> anyhow::Result<Outcome> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()?;
    runtime.block_on(run_async(options))
}

/// The calls a schedule may stress: those that end a step of the data path, where a lost
/// answer or a cut leaves the most to recover.
const HOT_SPOTS: [&str; 13] = [
    "write",
    "cut point",
    "flush",
    "put block map",
    "delete point",
    "revert",
    "write atomic",
    "sync",
    "sync folder",
    "remove",
    "close view",
    "open view",
    "start tracking",
];

async fn run_async(options: Options) -> anyhow::Result<Outcome> {
    let mut rig = Rig::new(options)?;
    // Half the schedules stress one kind of call.
    let pick = rig.rng.below(2 * HOT_SPOTS.len() as u64) as usize;
    if let Some(hot) = HOT_SPOTS.get(pick) {
        rig.world.set_hot_spot(hot, 150);
        rig.trace(format!("hot spot: {hot} calls fail at 15 %"));
    }
    for step in 0..rig.options.steps {
        rig.step = step;
        rig.step_once().await;
        rig.outcome.steps += 1;
    }
    rig.liveness().await;
    rig.outcome.faults = rig.world.faults();
    rig.outcome.calls = rig.world.calls();
    Ok(rig.outcome)
}

/// The operation a [`sweep`] interrupts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// The initial copy of two disks holding data.
    InitialCopy,
    /// A delta cycle of a protected VM.
    Cycle,
    /// A resync of a protected VM whose source changed.
    Resync,
    /// A delta cycle; after the interruption a resync is asked for instead of the cycle
    /// going on (a half-applied cycle's logs are then dropped, and the live replica is ahead
    /// of the latest point's map).
    CycleThenResync,
}

/// How a [`sweep`] interrupts it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Interruption {
    /// Everything fails from the chosen call to the end of the operation; the same engine
    /// then goes on (a store or hypervisor outage).
    Outage,
    /// The agent process dies at the chosen call (SIGKILL: nothing written is lost) and
    /// starts again.
    Crash,
    /// The node loses power at the chosen call: what was not durable is dropped or torn,
    /// tracking is lost, the agent starts again.
    PowerCut,
}

/// What a [`sweep`] saw.
#[derive(Clone, Debug, Default)]
pub struct SweepOutcome {
    /// The calls the uninterrupted operation made (the sweep interrupted each).
    pub calls: u64,
    /// Bytes the uninterrupted operation sent.
    pub full_bytes_sent: u64,
    /// For each interrupted call: the bytes the resumed operation sent (None: nothing was
    /// left to resume, or the phase asked for another operation).
    pub resumed_bytes_sent: Vec<(u64, Option<u64>)>,
    /// Broken invariants, with the call interrupted.
    pub violations: Vec<String>,
    /// The interrupted calls after which an invariant broke.
    pub broken_calls: Vec<u64>,
}

/// Every sweep worth running: each target with each interruption, but a cycle cut by power
/// and then resynced, which is the cycle cut by power (a power cut loses tracking, and the
/// engine resyncs anyway).
pub const SWEEPS: [(Target, Interruption); 11] = [
    (Target::InitialCopy, Interruption::Outage),
    (Target::InitialCopy, Interruption::Crash),
    (Target::InitialCopy, Interruption::PowerCut),
    (Target::Cycle, Interruption::Outage),
    (Target::Cycle, Interruption::Crash),
    (Target::Cycle, Interruption::PowerCut),
    (Target::CycleThenResync, Interruption::Outage),
    (Target::CycleThenResync, Interruption::Crash),
    (Target::Resync, Interruption::Outage),
    (Target::Resync, Interruption::Crash),
    (Target::Resync, Interruption::PowerCut),
];

/// Interrupt `target` at every one of its calls in turn, `how`, then let the VM recover
/// with a guest write in between, and check every invariant of [`run`] each time.
///
/// # Errors
///
/// The rig itself failed.
pub fn sweep(target: Target, how: Interruption) -> anyhow::Result<SweepOutcome> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()?;
    runtime.block_on(async {
        let mut outcome = SweepOutcome::default();
        let mut rig = Rig::quiet()?;
        rig.setup(target).await;
        let before = rig.world.calls();
        let full = rig.run_target(target).await;
        outcome.calls = rig.world.calls() - before;
        outcome.full_bytes_sent = match full {
            Ok(bytes) => bytes,
            Err(e) => anyhow::bail!("{target:?} fails without interruption: {e}"),
        };
        for call in 1..=outcome.calls {
            let mut rig = Rig::quiet()?;
            rig.setup(target).await;
            rig.world.schedule_power_cut(call);
            let interrupted = rig.run_target(target).await;
            rig.trace(format!(
                "{target:?} interrupted ({how:?}) at call {call}: {interrupted:?}"
            ));
            match how {
                Interruption::Outage => rig.world.power_on(),
                Interruption::Crash => {
                    rig.world.power_on();
                    rig.crash().await;
                }
                Interruption::PowerCut => rig.power_cut().await,
            }
            rig.vm.guest_write(0, 8192, &[0x5A; 4096]);
            if target != Target::InitialCopy {
                // The guest puts back what the blocks the cycle changes held at the latest
                // point: a cycle left half applied must not leave them as it wrote them.
                rig.vm.guest_restore(0, 96 * 1024, 48 * 1024, 1);
                rig.vm.guest_restore(1, 288 * 1024, 112 * 1024, 1);
            }
            let resumed = match (target, rig.phase()) {
                (Target::InitialCopy, EnginePhase::Enabled)
                | (Target::Resync, EnginePhase::ResyncRequired { .. }) => {
                    rig.run_target(target).await.ok()
                }
                (
                    Target::CycleThenResync,
                    EnginePhase::Protected | EnginePhase::ResyncRequired { .. },
                ) => {
                    let _ = rig.operate("require_resync").await;
                    rig.run_target(Target::Resync).await.ok()
                }
                _ => None,
            };
            outcome.resumed_bytes_sent.push((call, resumed));
            rig.liveness().await;
            outcome.violations.extend(
                rig.outcome
                    .violations
                    .iter()
                    .map(|v| format!("{target:?}, {how:?} at call {call}: {v}")),
            );
            if !rig.outcome.violations.is_empty() {
                outcome.broken_calls.push(call);
                outcome
                    .violations
                    .extend(rig.outcome.trace.iter().map(|t| format!("  {t}")));
            }
        }
        Ok(outcome)
    })
}

impl Rig {
    fn new(options: Options) -> anyhow::Result<Rig> {
        let world = Arc::new(World::new(options.seed));
        let store_root = tempfile::tempdir()?;
        let store = Arc::new(SimStore::new(
            Arc::new(LocalStore::open(store_root.path())?),
            world.clone(),
        ));
        Ok(Rig {
            rng: Rng::new(options.seed),
            fs: SimFs::new(world.clone()),
            vm: SimVm::new(world.clone(), &DISKS),
            key: VmKey::new("sim", "vm")?,
            store_root,
            failover_dir: tempfile::tempdir()?,
            store,
            engine: None,
            // NB: far past the wall clock, which the engine's retention takes when it is
            // later than a cycle's instant: the schedule must not depend on today's date.
            clock: SystemTime::UNIX_EPOCH + Duration::from_secs(4_000_000_000),
            acknowledged: BTreeMap::new(),
            checked: Default::default(),
            outcome: Outcome {
                seed: options.seed,
                ..Outcome::default()
            },
            step: 0,
            world,
            options,
        })
    }

    /// A rig whose world injects nothing by itself (a sweep interrupts it).
    fn quiet() -> anyhow::Result<Rig> {
        Rig::new(Options {
            power_cut_per_mille: 0,
            crash_per_mille: 0,
            max_fault_per_mille: 0,
            lose_state_per_mille: 0,
            ..Options::new(0)
        })
    }

    /// Bring the VM to where `target` runs, with data on its disks.
    async fn setup(&mut self, target: Target) {
        let fill = |rig: &mut Rig, disk: usize, offset: u64, len: usize| {
            let mut data = vec![0u8; len];
            rig.rng.fill(&mut data);
            rig.vm.guest_write(disk, offset, &data);
        };
        fill(self, 0, 0, 384 * 1024);
        fill(self, 0, 640 * 1024, 128 * 1024);
        fill(self, 1, 64 * 1024, 256 * 1024);
        self.open_engine().await;
        let ok = |r: Result<String, EngineError>| r.is_ok();
        let mut ready = ok(self.operate("enable").await);
        if target != Target::InitialCopy {
            ready &= ok(self.operate("initial_copy").await);
            self.clock += STEP;
            ready &= ok(self.operate("cycle").await);
            fill(self, 0, 100 * 1024, 40 * 1024);
            fill(self, 1, 300 * 1024, 100 * 1024);
            self.vm.guest_discard(0, 700 * 1024, 32 * 1024);
            self.clock += STEP;
        }
        if target == Target::Resync {
            ready &= ok(self.operate("require_resync").await);
        }
        if !ready {
            self.violation(format!(
                "the setup of {target:?} failed: {:?}",
                self.outcome.trace
            ));
        }
    }

    /// Run `target`; the bytes it sent.
    async fn run_target(&mut self, target: Target) -> Result<u64, EngineError> {
        let now = self.clock;
        let quiet = |_: &lifeboat_engine::Progress| {};
        let Some(engine) = self.engine.as_mut() else {
            return Err(EngineError::NotReady {
                what: "the engine is not open".into(),
            });
        };
        let report = match target {
            Target::InitialCopy => engine.initial_copy(&quiet).await,
            Target::Cycle | Target::CycleThenResync => engine.run_cycle(now).await,
            Target::Resync => engine.resync(now, &quiet).await,
        };
        match report {
            Ok(report) => {
                let sent = report.bytes_sent;
                self.acknowledge(Ok(report))?;
                Ok(sent)
            }
            Err(e) => Err(e),
        }
    }

    fn trace(&mut self, line: String) {
        if std::env::var_os("LIFEBOAT_SIM_CALLS").is_some() {
            eprintln!("step {}: {line}", self.step);
        }
        self.outcome
            .trace
            .push(format!("step {}: {line}", self.step));
    }

    /// No wedge, step by step: an operation the agent runs for its phase (not one a user
    /// asks for, which may be refused) fails only when a fault hit one of its calls. Anything
    /// else fails again at every retry, after any number of them: the agent's retry would
    /// repeat the error, and the VM stays Critical until something unrelated (a resync forced
    /// by the log threshold) happens to clear it.
    fn failed_unprovoked(&mut self, op: &str, result: &Result<String, EngineError>) {
        let agents = ["enable", "initial_copy", "cycle", "resync"];
        if let (true, Err(e)) = (agents.contains(&op), result) {
            self.violation(format!("{op} failed with no fault injected: {e}"));
        }
    }

    fn violation(&mut self, what: String) {
        let line = format!("step {}: {what}", self.step);
        self.outcome.trace.push(format!("VIOLATION {line}"));
        self.outcome.violations.push(line);
    }

    fn now_ms(&self) -> u64 {
        lifeboat_engine::replicator::unix_ms(self.clock)
    }

    /// Open the engine as a restarted agent does, retrying through faults (and power cuts
    /// that hit the opening itself).
    async fn open_engine(&mut self) {
        for _ in 0..50 {
            let result = Replicator::open_on(
                Arc::new(self.fs.clone()),
                self.key.clone(),
                self.vm.disk_refs(),
                PathBuf::from(STATE_DIR),
                Arc::new(self.vm.clone()),
                self.store.clone() as Arc<dyn ReplicaStore>,
                settings(),
            )
            .await;
            match result {
                Ok(engine) => {
                    self.engine = Some(engine);
                    return;
                }
                Err(e) => {
                    self.trace(format!("open failed: {e}"));
                    if self.world.power_out() {
                        self.power_cut().await;
                    } else if !e.is_recoverable() {
                        self.violation(format!("the engine cannot open: {e}"));
                        return;
                    }
                }
            }
        }
        self.violation("the engine did not open in 50 attempts".into());
    }

    /// Drop the engine and wait until nothing holds the store any more (the upload tasks an
    /// abandoned operation spawned end at the runtime's next turn), as a process that exits
    /// releases its store and its locks.
    async fn stop_engine(&mut self) {
        self.engine = None;
        self.store.quiesce().await;
        for _ in 0..1000 {
            if Arc::strong_count(&self.store) == 1 {
                return;
            }
            tokio::task::yield_now().await;
        }
        self.violation("the store is still held after the engine stopped".into());
    }

    /// The agent process dies; the node keeps its power (SIGKILL: the page cache, the
    /// store's accepted writes and the VM survive).
    async fn crash(&mut self) {
        self.stop_engine().await;
        self.outcome.crashes += 1;
        self.trace("agent crash".into());
        self.open_engine().await;
    }

    /// The node's state folder is lost (the node was replaced; the agent starts on an empty
    /// folder beside the same store and VM): what the folder knew (pending logs, the
    /// `applying` mark, cursors) is gone, and nothing in the store may be trusted for it.
    async fn lose_state(&mut self) {
        self.stop_engine().await;
        // Every point listed now is verified against the views of the agent that is gone.
        self.check_points(true).await;
        self.fs = SimFs::new(self.world.clone());
        self.vm.forget_all_views();
        self.outcome.states_lost += 1;
        self.trace("the node's state folder is lost".into());
        self.open_engine().await;
    }

    /// The node loses power: the state folder keeps what was synced, the store what was
    /// flushed, the VM's tracking is lost; then the agent starts again on a store opened
    /// afresh (its crash recovery runs).
    async fn power_cut(&mut self) {
        self.stop_engine().await;
        self.world.cancel_power_cut();
        let restored = match self.store.power_cut().await {
            Ok(bytes) => bytes,
            Err(e) => {
                self.violation(format!(
                    "the simulated power cut could not undo writes: {e}"
                ));
                0
            }
        };
        self.fs.power_cut();
        self.vm.power_cut();
        self.world.power_on();
        self.outcome.power_cuts += 1;
        self.trace(format!(
            "power cut: {restored} bytes of unflushed writes lost"
        ));
        match LocalStore::open(self.store_root.path()) {
            Ok(store) => {
                self.store = Arc::new(SimStore::new(Arc::new(store), self.world.clone()));
            }
            Err(e) => self.violation(format!("the local store does not open after a cut: {e}")),
        }
        self.check_points(true).await;
        Box::pin(self.open_engine()).await;
    }

    fn guest_io(&mut self) {
        let sizes: Vec<u64> = DISKS.iter().map(|d| d.1).collect();
        for _ in 0..self.rng.below(5) {
            let index = self.rng.below(sizes.len() as u64) as usize;
            let sectors = sizes[index] / 512;
            let len = 512 * (1 + self.rng.below(64)).min(sectors);
            let offset = 512 * self.rng.below(sectors - len / 512 + 1);
            let what = match self.rng.below(10) {
                0 => {
                    self.vm.guest_discard(index, offset, len);
                    "discard"
                }
                2 => {
                    // The guest puts back what whole blocks held at one of the last views
                    // (a file restored, a page rewritten as it was): their hashes equal that
                    // point's map again, whatever the replica holds.
                    let block = u64::from(BLOCK_BYTES);
                    let blocks = sizes[index] / block;
                    let first = self.rng.below(blocks);
                    let count = (1 + self.rng.below(4)).min(blocks - first);
                    let (offset, len) = (first * block, count * block);
                    let back = self.rng.below(3) as usize;
                    if !self.vm.guest_restore(index, offset, len, back) {
                        continue;
                    }
                    self.trace(format!(
                        "guest: restore of the view {back} before the newest on {} at \
                         {offset}..{}",
                        DISKS[index].0,
                        offset + len
                    ));
                    continue;
                }
                1 => {
                    self.vm.guest_write(index, offset, &vec![0u8; len as usize]);
                    "zeros"
                }
                _ => {
                    let mut data = vec![0u8; len as usize];
                    self.rng.fill(&mut data);
                    self.vm.guest_write(index, offset, &data);
                    "data"
                }
            };
            self.trace(format!(
                "guest: {what} on {} at {offset}..{}",
                DISKS[index].0,
                offset + len
            ));
        }
    }

    async fn step_once(&mut self) {
        self.guest_io();
        let fault = self.rng.below(self.options.max_fault_per_mille + 1);
        // Now and then a storm: the store (and everything) fails most calls for a step.
        let fault = if self.rng.chance(30) { 600 } else { fault };
        self.world.set_fault_rate(fault);
        if self.rng.chance(self.options.power_cut_per_mille) {
            let after = 1 + self.rng.below(120);
            self.world.schedule_power_cut(after);
        }
        if self.engine.is_none() {
            self.open_engine().await;
        }
        let op = self.pick();
        *self.outcome.operations.entry(op).or_default() += 1;
        let faults = self.world.faults();
        let result = self.operate(op).await;
        match &result {
            Ok(line) => self.trace(format!("{op}: {line}")),
            Err(e) => self.trace(format!("{op} failed ({}): {e}", e.reason())),
        }
        if !self.world.power_out() && self.world.faults() == faults {
            self.failed_unprovoked(op, &result);
        }
        self.world.set_fault_rate(0);
        if self.world.power_out() {
            self.power_cut().await;
        } else {
            self.world.cancel_power_cut();
            if self.rng.chance(self.options.crash_per_mille) {
                self.crash().await;
            } else if self.rng.chance(self.options.lose_state_per_mille) {
                self.lose_state().await;
            }
        }
        self.check_points(false).await;
        self.clock += STEP;
    }

    fn phase(&self) -> EnginePhase {
        self.engine
            .as_ref()
            .map(|e| e.state().phase.clone())
            .unwrap_or_default()
    }

    /// What the agent would do now, with now and then something a user asks for.
    fn pick(&mut self) -> &'static str {
        let phase = self.phase();
        let roll = self.rng.below(100);
        match phase {
            EnginePhase::New | EnginePhase::Disabled => "enable",
            EnginePhase::Enabled => "initial_copy",
            EnginePhase::FailedOver { .. } => match roll {
                0..30 => "commit",
                // The failover's job runs again (its agent stopped before it ended).
                30..50 => "retry_failover",
                _ => "disable",
            },
            EnginePhase::ResyncRequired { .. } => "resync",
            EnginePhase::Copied | EnginePhase::Protected => match roll {
                0..5 => "require_resync",
                5..9 => "disable",
                9..17 => "test_failover",
                17..19 => "planned_failover",
                19..21 => "unplanned_failover",
                _ => "cycle",
            },
        }
    }

    async fn operate(&mut self, op: &'static str) -> Result<String, EngineError> {
        let now = self.clock;
        let quiet = |_: &lifeboat_engine::Progress| {};
        let delete = self.rng.chance(300);
        let Some(engine) = self.engine.as_mut() else {
            return Err(EngineError::NotReady {
                what: "the engine is not open".into(),
            });
        };
        match op {
            "enable" => engine.enable().await.map(|_| "enabled".into()),
            "initial_copy" => {
                let report = engine.initial_copy(&quiet).await?;
                Ok(summary(&report))
            }
            "cycle" => {
                let report = engine.run_cycle(now).await;
                self.acknowledge(report)
            }
            "resync" => {
                let report = engine.resync(now, &quiet).await;
                self.acknowledge(report)
            }
            "require_resync" => engine
                .require_resync("requested by the simulation")
                .map(|()| "resync requested".into()),
            "disable" => {
                if delete {
                    self.acknowledged.clear();
                }
                engine
                    .disable(delete)
                    .await
                    .map(|_| format!("disabled (replica deleted: {delete})"))
            }
            "commit" => {
                // NB: a commit that fails may have deleted some of the others already.
                if let EnginePhase::FailedOver { point } = &engine.state().phase {
                    self.acknowledged.retain(|id, _| id == point);
                }
                let ids = engine.commit().await?;
                for id in &ids {
                    self.acknowledged.remove(id);
                }
                Ok(format!("committed, {} points deleted", ids.len()))
            }
            "test_failover" | "planned_failover" | "unplanned_failover" | "retry_failover" => {
                let before = match &engine.state().phase {
                    EnginePhase::FailedOver { point } => Some(point.clone()),
                    _ => None,
                };
                let dir = self.failover_dir.path().to_path_buf();
                let report = match op {
                    "test_failover" => {
                        engine
                            .materialise(&PointChoice::Latest, Output::raw(&dir), "test", &quiet)
                            .await?
                    }
                    _ => {
                        engine
                            .failover(
                                op == "planned_failover" || (op == "retry_failover" && delete),
                                &PointChoice::Latest,
                                Output::raw(&dir),
                                now,
                                &quiet,
                            )
                            .await?
                    }
                };
                let label = if op == "test_failover" {
                    "test"
                } else {
                    "failover"
                };
                if let Some(before) = before
                    && before != report.point.id
                {
                    self.violation(format!(
                        "a failover retried after it was done went to {}, not {before}",
                        report.point.id
                    ));
                }
                let names: Vec<String> = report.disks.iter().map(|d| d.name.clone()).collect();
                self.check_failover(&dir, label, &report.point).await;
                if let Some(engine) = self.engine.as_ref() {
                    engine.remove_materialised(&dir, label, &names)?;
                }
                if op != "test_failover" {
                    // NB: a planned failover's last cycle may have pruned points.
                    self.forget_unlisted().await;
                }
                Ok(format!("{op} to {}", report.point.id))
            }
            other => Err(EngineError::NotReady {
                what: format!("unknown operation {other}"),
            }),
        }
    }

    fn acknowledge(&mut self, report: Result<Report, EngineError>) -> Result<String, EngineError> {
        let report = report?;
        if let Some(point) = &report.point {
            self.acknowledged
                .insert(point.id.clone(), point.time_unix_ms);
        }
        for id in &report.pruned {
            self.acknowledged.remove(id);
        }
        Ok(summary(&report))
    }

    async fn forget_unlisted(&mut self) {
        let listed: Vec<String> = match self.store.inner().manifest(&self.key).await {
            Ok(Some(m)) => m.points.into_iter().map(|p| p.id).collect(),
            _ => Vec::new(),
        };
        self.acknowledged.retain(|id, _| listed.contains(id));
    }

    /// The failover's files equal the source at the point's cycle: compared with the view
    /// of that cycle, or with the digests the point had when it was verified against it.
    async fn check_failover(&mut self, dir: &Path, label: &str, point: &RecoveryPoint) {
        self.outcome.failovers_checked += 1;
        self.check_points(false).await;
        let verified = self.checked.get(&point.id).cloned();
        let seen = self.vm.seen(point.cycle);
        for (index, disk) in point.disks.iter().enumerate() {
            let name = &disk.name;
            let path = lifeboat_engine::replicator::disk_image_path(
                dir,
                self.key.name(),
                label,
                name,
                lifeboat_engine::replicator::DiskFormat::Raw,
            );
            let bytes = match std::fs::read(&path) {
                Ok(bytes) => bytes,
                Err(e) => {
                    self.violation(format!("{label} disk {name} unreadable: {e}"));
                    continue;
                }
            };
            let source = self.vm.names().iter().position(|n| n == name);
            // NB: the verified digests first: after a lost state folder, a view of the same
            // cycle number may be another agent's.
            let wrong = match (&verified, &seen, source) {
                (Some(verified), _, _) => {
                    (verified.get(index) != digest_of(&bytes, &disk.digest).as_ref()).then_some(0)
                }
                (_, Some(seen), Some(source)) => {
                    (bytes != seen[source]).then(|| first_difference(&bytes, &seen[source]))
                }
                _ => {
                    self.violation(format!(
                        "{label} to point {} that was never verified",
                        point.id
                    ));
                    continue;
                }
            };
            if let Some(at) = wrong {
                self.violation(format!(
                    "{label} disk {name} differs from the source at cycle {} (from byte {at})",
                    point.cycle
                ));
            }
        }
    }

    /// Invariants 1 to 3. `all`: check every point again (after a recovery), else only the
    /// new ones.
    async fn check_points(&mut self, all: bool) {
        for cycle in self.vm.reused_cycles() {
            self.violation(format!("cycle {cycle} was used for two views"));
        }
        let store = self.store.inner().clone();
        let manifest = match store.manifest(&self.key).await {
            Ok(m) => m,
            Err(e) => {
                self.violation(format!("the manifest cannot be read: {e}"));
                return;
            }
        };
        let points = manifest.map(|m| m.points).unwrap_or_default();
        let retention = settings().retention.as_millis() as u64;
        // Retention may delete a point older than the cutoff, and only while a newer point
        // stays (the latest is always kept); anything else missing was lost.
        let newest_listed = points.iter().map(|p| p.time_unix_ms).max();
        let cutoff = self.now_ms().saturating_sub(retention);
        let lost: Vec<String> = self
            .acknowledged
            .iter()
            .filter(|(id, time)| {
                let prunable = **time < cutoff && newest_listed.is_some_and(|t| t > **time);
                !prunable && !points.iter().any(|p| &p.id == *id)
            })
            .map(|(id, _)| id.clone())
            .collect();
        for id in lost {
            self.violation(format!("acknowledged point {id} is gone"));
            self.acknowledged.remove(&id);
        }
        for point in &points {
            if !all && self.checked.contains_key(&point.id) {
                continue;
            }
            self.outcome.points_checked += 1;
            let verified = self.checked.get(&point.id).cloned();
            let seen = self.vm.seen(point.cycle);
            if verified.is_none() && seen.is_none() {
                self.violation(format!(
                    "point {} of cycle {} that no view showed",
                    point.id, point.cycle
                ));
                continue;
            }
            let mut fingerprints = Vec::new();
            for disk in &point.disks {
                let Some(index) = self.vm.names().iter().position(|n| *n == disk.name) else {
                    continue;
                };
                let content = match read_point(
                    store.as_ref(),
                    &self.key,
                    &point.id,
                    &disk.name,
                    disk.size_bytes,
                )
                .await
                {
                    Ok(c) => c,
                    Err(e) => {
                        self.violation(format!(
                            "point {} disk {} unreadable: {e}",
                            point.id, disk.name
                        ));
                        continue;
                    }
                };
                let digest = digest_of(&content, &disk.digest);
                if let Some(verified) = &verified {
                    // Checked against the source once: a point never changes after.
                    if verified.get(fingerprints.len()) != digest.as_ref() {
                        self.violation(format!(
                            "point {} disk {} changed since it was verified",
                            point.id, disk.name
                        ));
                    }
                } else if let Some(seen) = &seen
                    && content != seen[index]
                {
                    let at = first_difference(&content, &seen[index]);
                    let vouches = digest.as_ref() == Some(&disk.digest);
                    self.violation(format!(
                        "point {} disk {} differs from the source at cycle {} from byte {at}{}",
                        point.id,
                        disk.name,
                        point.cycle,
                        if vouches {
                            ", and its digest VOUCHES FOR THE WRONG DATA"
                        } else {
                            " (its digest does not match: a failover would refuse it)"
                        }
                    ));
                } else if digest.as_ref() != Some(&disk.digest) {
                    self.violation(format!(
                        "point {} disk {}: right data, wrong digest",
                        point.id, disk.name
                    ));
                }
                fingerprints.extend(digest);
            }
            if verified.is_none() {
                self.checked.insert(point.id.clone(), fingerprints);
            }
        }
        // Every listed point is verified now: only the views of cycles the engine may still
        // cut a point from are needed.
        // NB: of the state in memory and of the state a restart would find.
        let durable: Option<AgentState> = self
            .fs
            .durable_file(&AgentState::path(Path::new(STATE_DIR)))
            .and_then(|bytes| serde_json::from_slice(&bytes).ok());
        let states = self.engine.as_ref().map(Replicator::state).into_iter();
        let keep = states
            .chain(durable.as_ref())
            .map(|state| {
                let mut keep = state.last_cycle;
                keep = state.pending.iter().map(|c| c.cycle).fold(keep, u64::min);
                keep = state.resync_cycle.map_or(keep, |c| keep.min(c));
                state.copy.as_ref().map_or(keep, |c| keep.min(c.cycle))
            })
            .min();
        if let Some(keep) = keep {
            self.vm.forget_before(keep);
        }
    }

    /// Invariant 4: with the faults gone, the VM gets back to Protected and its newest
    /// point equals the source.
    async fn liveness(&mut self) {
        self.step = self.options.steps;
        self.world.set_fault_rate(0);
        self.world.cancel_power_cut();
        if self.engine.is_none() {
            self.open_engine().await;
        }
        let mut last = String::new();
        for _ in 0..12 {
            let op = match self.phase() {
                EnginePhase::New | EnginePhase::Disabled => "enable",
                EnginePhase::Enabled => "initial_copy",
                EnginePhase::FailedOver { .. } => "disable",
                EnginePhase::ResyncRequired { .. } => "resync",
                EnginePhase::Copied | EnginePhase::Protected => "cycle",
            };
            let result = self.operate(op).await;
            self.failed_unprovoked(op, &result);
            last = match result {
                Ok(line) => format!("{op}: {line}"),
                Err(e) => format!("{op} failed: {e}"),
            };
            self.trace(format!("(no faults) {last}"));
            self.clock += STEP;
            if op == "cycle" && self.phase() == EnginePhase::Protected && !last.contains("failed") {
                break;
            }
        }
        self.check_points(true).await;
        let source = self.vm.contents();
        let newest = match self.store.inner().manifest(&self.key).await {
            Ok(Some(m)) => m.points.last().cloned(),
            _ => None,
        };
        match (self.phase(), newest) {
            (EnginePhase::Protected, Some(point)) => {
                if self.vm.seen(point.cycle).as_deref() != Some(&source) {
                    self.violation(format!(
                        "the newest point {} is not the source as it is now (last: {last})",
                        point.id
                    ));
                }
            }
            (phase, _) => self.violation(format!(
                "wedged: faults stopped 12 steps ago and the VM is {phase:?} (last: {last})"
            )),
        }
    }
}

fn summary(report: &Report) -> String {
    let mut line = format!(
        "sent {} zeroed {} read {}",
        report.bytes_sent, report.bytes_zeroed, report.bytes_read
    );
    if let Some(point) = &report.point {
        line.push_str(&format!(", point {}", point.id));
    }
    if let Some(why) = &report.resync_required {
        line.push_str(&format!(", resync required: {why}"));
    }
    line
}

fn first_difference(a: &[u8], b: &[u8]) -> usize {
    let at = a
        .iter()
        .zip(b)
        .position(|(x, y)| x != y)
        .unwrap_or(a.len().min(b.len()));
    if std::env::var_os("LIFEBOAT_SIM_CALLS").is_some() {
        let last = a.iter().zip(b).rposition(|(x, y)| x != y).unwrap_or(at);
        eprintln!(
            "difference {at}..={last}: got {:02x?} want {:02x?}",
            &a[at..(at + 8).min(a.len())],
            &b[at..(at + 8).min(b.len())]
        );
    }
    at
}

async fn read_point(
    store: &dyn ReplicaStore,
    key: &VmKey,
    id: &str,
    disk: &str,
    size: u64,
) -> Result<Vec<u8>, lifeboat_store::StoreError> {
    let mut out = Vec::with_capacity(size as usize);
    let mut offset = 0;
    while offset < size {
        let len = (4 << 20).min(size - offset);
        out.extend_from_slice(
            &store
                .read(key, disk, &At::Point(id.to_owned()), offset, len)
                .await?,
        );
        offset += len;
    }
    Ok(out)
}

/// The digest `content` would have under the point's algorithm and block size.
fn digest_of(
    content: &[u8],
    like: &lifeboat_store::DiskDigest,
) -> Option<lifeboat_store::DiskDigest> {
    let algorithm = HashAlgorithm::ALL
        .into_iter()
        .find(|a| a.name() == like.algorithm)?;
    let mut map =
        BlockMap::new_zeroed(algorithm, like.block_size_bytes, content.len() as u64).ok()?;
    map.update_range(0, content).ok()?;
    Some(disk_digest(&map))
}
