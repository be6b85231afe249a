//! A VM in memory with the change tracking the [`Hypervisor`] contract describes, and the
//! reference model the checks compare against: what each view showed, by cycle.
//!
//! The guest writes through [`SimVm::guest_write`] and [`SimVm::guest_discard`]; tracking
//! marks 4 KiB granules. A power cut of the node makes every disk's tracking
//! [`Tracking::Lost`] (a bitmap that was not saved cleanly is not trusted) and forgets an
//! open view; the disks keep what the guest wrote (the source is the truth either way).

use async_trait::async_trait;
use bytes::Bytes;
use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;
use std::sync::{Arc, Mutex};

use lifeboat_engine::backend::{
    BackendError, CloseView, DiskInfo, DiskRef, Hypervisor, Quiesce, Stopped, Tracking,
    TrackingDurability, View,
};

use crate::world::{Fault, World};

/// The tracking granule.
pub const GRANULE_BYTES: u64 = 4096;

#[derive(Debug)]
struct Disk {
    name: String,
    data: Vec<u8>,
    allocated: BTreeSet<u64>,
    dirty: BTreeSet<u64>,
    tracking: Tracking,
}

#[derive(Debug, Default)]
struct VmState {
    disks: Vec<Disk>,
    /// The open view's cycle and what it froze, disk by disk.
    frozen: Option<(u64, Vec<BTreeSet<u64>>)>,
    /// What each view showed: cycle, then disk contents in order.
    seen: BTreeMap<u64, Arc<Vec<Vec<u8>>>>,
    /// Cycle numbers a view was opened with twice (the engine must never reuse one).
    reused_cycles: Vec<u64>,
}

/// The simulated VM and its hypervisor.
#[derive(Debug, Clone)]
pub struct SimVm {
    state: Arc<Mutex<VmState>>,
    world: Arc<World>,
}

fn injected(action: &str) -> BackendError {
    BackendError::Transient {
        vm: "sim".into(),
        action: action.into(),
        detail: "injected failure".into(),
    }
}

fn granules(offset: u64, len: u64) -> Range<u64> {
    offset / GRANULE_BYTES..(offset + len).div_ceil(GRANULE_BYTES)
}

fn to_ranges(set: &BTreeSet<u64>, size: u64) -> Vec<Range<u64>> {
    let mut out: Vec<Range<u64>> = Vec::new();
    for &g in set {
        let start = g * GRANULE_BYTES;
        let end = (start + GRANULE_BYTES).min(size);
        match out.last_mut() {
            Some(last) if last.end == start => last.end = end,
            _ => out.push(start..end),
        }
    }
    out
}

impl SimVm {
    /// A VM with disks of the given names and sizes, all zeros.
    pub fn new(world: Arc<World>, disks: &[(&str, u64)]) -> SimVm {
        let disks = disks
            .iter()
            .map(|(name, size)| Disk {
                name: (*name).to_owned(),
                data: vec![0; *size as usize],
                allocated: BTreeSet::new(),
                dirty: BTreeSet::new(),
                tracking: Tracking::Absent,
            })
            .collect();
        SimVm {
            state: Arc::new(Mutex::new(VmState {
                disks,
                ..VmState::default()
            })),
            world,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VmState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn call(&self, action: &str) -> Result<bool, BackendError> {
        match self.world.call(action) {
            Fault::None => Ok(false),
            Fault::Before => Err(injected(action)),
            Fault::After => Ok(true),
        }
    }

    /// The disk refs the engine is given.
    pub fn disk_refs(&self) -> Vec<DiskRef> {
        self.lock()
            .disks
            .iter()
            .map(|d| DiskRef {
                name: d.name.clone(),
                path: format!("/sim/{}.img", d.name),
                node: None,
            })
            .collect()
    }

    /// The guest writes `data` at `offset` of disk `index`.
    pub fn guest_write(&self, index: usize, offset: u64, data: &[u8]) {
        let mut state = self.lock();
        let disk = &mut state.disks[index];
        disk.data[offset as usize..offset as usize + data.len()].copy_from_slice(data);
        for g in granules(offset, data.len() as u64) {
            disk.allocated.insert(g);
            disk.dirty.insert(g);
        }
    }

    /// The guest discards `len` bytes at `offset` of disk `index`: they read as zeros and
    /// whole granules are no longer allocated.
    pub fn guest_discard(&self, index: usize, offset: u64, len: u64) {
        let mut state = self.lock();
        let disk = &mut state.disks[index];
        disk.data[offset as usize..(offset + len) as usize].fill(0);
        for g in granules(offset, len) {
            let whole = g * GRANULE_BYTES >= offset && (g + 1) * GRANULE_BYTES <= offset + len;
            if whole {
                disk.allocated.remove(&g);
            }
            disk.dirty.insert(g);
        }
    }

    /// The guest writes back what `len` bytes at `offset` of disk `index` held in a view:
    /// `back` views before the newest (0: the newest). False if there is no such view.
    pub fn guest_restore(&self, index: usize, offset: u64, len: u64, back: usize) -> bool {
        let data = {
            let state = self.lock();
            let Some(view) = state.seen.values().rev().nth(back) else {
                return false;
            };
            view[index][offset as usize..(offset + len) as usize].to_vec()
        };
        self.guest_write(index, offset, &data);
        true
    }

    /// The disks as they are now.
    pub fn contents(&self) -> Vec<Vec<u8>> {
        self.lock().disks.iter().map(|d| d.data.clone()).collect()
    }

    /// The disk names, in order.
    pub fn names(&self) -> Vec<String> {
        self.lock().disks.iter().map(|d| d.name.clone()).collect()
    }

    /// What the view of `cycle` showed, disk by disk.
    pub fn seen(&self, cycle: u64) -> Option<Arc<Vec<Vec<u8>>>> {
        self.lock().seen.get(&cycle).cloned()
    }

    /// Forget what views before `cycle` showed (no point refers to them any more).
    pub fn forget_before(&self, cycle: u64) {
        let mut state = self.lock();
        state.seen = state.seen.split_off(&cycle);
    }

    /// Forget every view: the agent that numbered them is gone with its state, and a new
    /// one numbers its cycles from 1 again.
    pub fn forget_all_views(&self) {
        let mut state = self.lock();
        state.seen.clear();
        state.reused_cycles.clear();
    }

    /// Cycle numbers a view was opened with twice.
    pub fn reused_cycles(&self) -> Vec<u64> {
        self.lock().reused_cycles.clone()
    }

    /// The node lost power: tracking is no longer trusted, the open view is gone.
    pub fn power_cut(&self) {
        let mut state = self.lock();
        state.frozen = None;
        for disk in &mut state.disks {
            if disk.tracking == Tracking::Active {
                disk.tracking = Tracking::Lost(
                    "the node lost power: the dirty bitmap was not saved cleanly".into(),
                );
            }
        }
    }

    fn infos(state: &VmState) -> Vec<DiskInfo> {
        state
            .disks
            .iter()
            .map(|d| DiskInfo {
                name: d.name.clone(),
                size_bytes: d.data.len() as u64,
                format: "raw".into(),
                durability: TrackingDurability::Persistent,
            })
            .collect()
    }

    /// Put a view's frozen changes back into the running epoch.
    fn fold_back(state: &mut VmState) {
        if let Some((_, frozen)) = state.frozen.take() {
            for (disk, set) in state.disks.iter_mut().zip(frozen) {
                disk.dirty.extend(set);
            }
        }
    }
}

#[async_trait]
impl Hypervisor for SimVm {
    fn vm(&self) -> &str {
        "sim"
    }

    async fn inspect(&self, _disks: &[DiskRef]) -> Result<Vec<DiskInfo>, BackendError> {
        self.call("inspect").and_then(|after| {
            if after {
                Err(injected("inspect"))
            } else {
                Ok(())
            }
        })?;
        Ok(Self::infos(&self.lock()))
    }

    async fn tracking(&self, _disks: &[DiskRef]) -> Result<Vec<Tracking>, BackendError> {
        self.call("tracking").and_then(|after| {
            if after {
                Err(injected("tracking"))
            } else {
                Ok(())
            }
        })?;
        Ok(self
            .lock()
            .disks
            .iter()
            .map(|d| d.tracking.clone())
            .collect())
    }

    async fn start_tracking(&self, _disks: &[DiskRef]) -> Result<(), BackendError> {
        let after = self.call("start tracking")?;
        let mut state = self.lock();
        for disk in &mut state.disks {
            if disk.tracking != Tracking::Active {
                disk.tracking = Tracking::Active;
                disk.dirty.clear();
            }
        }
        if after {
            return Err(injected("start tracking"));
        }
        Ok(())
    }

    async fn open_view(
        &self,
        _disks: &[DiskRef],
        cycle: u64,
        quiesce: Quiesce,
    ) -> Result<Box<dyn View>, BackendError> {
        let after = self.call("open view")?;
        let mut state = self.lock();
        // A view left open is cleaned up by the next one: its changes go back.
        Self::fold_back(&mut state);
        let frozen: Vec<BTreeSet<u64>> = state
            .disks
            .iter_mut()
            .map(|d| std::mem::take(&mut d.dirty))
            .collect();
        let changed = state
            .disks
            .iter()
            .zip(&frozen)
            .map(|(d, set)| to_ranges(set, d.data.len() as u64))
            .collect();
        let allocated = state
            .disks
            .iter()
            .map(|d| to_ranges(&d.allocated, d.data.len() as u64))
            .collect();
        let lost: Vec<bool> = state
            .disks
            .iter()
            .map(|d| d.tracking != Tracking::Active)
            .collect();
        state.frozen = Some((cycle, frozen));
        let snapshot = Arc::new(state.disks.iter().map(|d| d.data.clone()).collect());
        if state.seen.insert(cycle, Arc::clone(&snapshot)).is_some() {
            state.reused_cycles.push(cycle);
        }
        let view = SimView {
            vm: self.clone(),
            cycle,
            quiesce,
            infos: Self::infos(&state),
            snapshot,
            changed,
            allocated,
            lost,
        };
        if after {
            return Err(injected("open view"));
        }
        Ok(Box::new(view))
    }

    async fn stop_tracking(&self, _disks: &[DiskRef]) -> Result<(), BackendError> {
        let after = self.call("stop tracking")?;
        let mut state = self.lock();
        state.frozen = None;
        for disk in &mut state.disks {
            disk.tracking = Tracking::Absent;
            disk.dirty.clear();
        }
        if after {
            return Err(injected("stop tracking"));
        }
        Ok(())
    }

    async fn stop_vm(
        &self,
        _disks: &[DiskRef],
        _grace: std::time::Duration,
    ) -> Result<Stopped, BackendError> {
        // NB: the explorer's guest writes only when a schedule says so, and its schedules
        // run the VM again after a failover: the stop is a point where faults strike, not a
        // state of the simulated VM.
        let after = self.call("stop vm")?;
        if after {
            return Err(injected("stop vm"));
        }
        Ok(Stopped::GuestShutDown)
    }
}

/// A view of the simulated VM.
#[derive(Debug)]
struct SimView {
    vm: SimVm,
    cycle: u64,
    quiesce: Quiesce,
    infos: Vec<DiskInfo>,
    snapshot: Arc<Vec<Vec<u8>>>,
    changed: Vec<Vec<Range<u64>>>,
    allocated: Vec<Vec<Range<u64>>>,
    lost: Vec<bool>,
}

impl SimView {
    fn index(&self, disk: &str) -> Result<usize, BackendError> {
        self.infos
            .iter()
            .position(|d| d.name == disk)
            .ok_or_else(|| BackendError::DiskNotFound {
                vm: "sim".into(),
                disk: disk.into(),
                detail: "not in the view".into(),
            })
    }
}

#[async_trait]
impl View for SimView {
    fn cycle(&self) -> u64 {
        self.cycle
    }

    fn quiesced(&self) -> Quiesce {
        self.quiesce
    }

    fn disks(&self) -> &[DiskInfo] {
        &self.infos
    }

    async fn changed_extents(&self, disk: &str) -> Result<Vec<Range<u64>>, BackendError> {
        let index = self.index(disk)?;
        if self.lost[index] {
            // NB: a disk whose tracking is not active vouches for nothing; the engine checks
            // tracking before it asks, so asking here is the engine's bug.
            return Err(BackendError::Permanent {
                vm: "sim".into(),
                action: format!("changed extents of {disk}"),
                detail: "tracking is not active".into(),
            });
        }
        self.vm.call("changed extents").and_then(|after| {
            if after {
                Err(injected("changed extents"))
            } else {
                Ok(())
            }
        })?;
        Ok(self.changed[index].clone())
    }

    async fn allocated_extents(&self, disk: &str) -> Result<Vec<Range<u64>>, BackendError> {
        let index = self.index(disk)?;
        self.vm.call("allocated extents").and_then(|after| {
            if after {
                Err(injected("allocated extents"))
            } else {
                Ok(())
            }
        })?;
        Ok(self.allocated[index].clone())
    }

    async fn read(&self, disk: &str, offset: u64, len: u64) -> Result<Bytes, BackendError> {
        let index = self.index(disk)?;
        self.vm
            .call("read")
            .and_then(|after| if after { Err(injected("read")) } else { Ok(()) })?;
        let data = &self.snapshot[index];
        Ok(Bytes::copy_from_slice(
            &data[offset as usize..(offset + len) as usize],
        ))
    }

    async fn close(self: Box<Self>, how: CloseView) -> Result<(), BackendError> {
        let after = self.vm.call("close view")?;
        let mut state = self.vm.lock();
        if state.frozen.as_ref().map(|(c, _)| *c) == Some(self.cycle) {
            match how {
                CloseView::Commit => state.frozen = None,
                CloseView::Abandon => SimVm::fold_back(&mut state),
            }
        }
        if after {
            return Err(injected("close view"));
        }
        Ok(())
    }
}
