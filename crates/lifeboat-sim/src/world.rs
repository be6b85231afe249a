//! What every simulated component asks before it acts: whether this call fails, and how,
//! and whether the power goes out now. One seeded stream decides, in call order, so a
//! schedule replays exactly from its seed.

use std::sync::Mutex;

use crate::rng::Rng;

/// How one call goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// It takes effect and succeeds.
    None,
    /// It fails before it takes effect.
    Before,
    /// It takes effect, then fails (the caller cannot tell it happened).
    After,
}

#[derive(Debug)]
struct State {
    rng: Rng,
    calls: u64,
    cut_at: Option<u64>,
    power_out: bool,
    fault_per_mille: u64,
    hot_spot: Option<(&'static str, u64)>,
    faults: u64,
}

/// The fault plan shared by the simulated file system, store and hypervisor.
#[derive(Debug)]
pub struct World {
    state: Mutex<State>,
}

impl World {
    /// A world whose faults come from `seed`.
    pub fn new(seed: u64) -> World {
        World {
            state: Mutex::new(State {
                rng: Rng::new(seed ^ 0x5EED_FA17),
                calls: 0,
                cut_at: None,
                power_out: false,
                fault_per_mille: 0,
                hot_spot: None,
                faults: 0,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// How call `what` goes. Once the power is out every call fails before it acts. With
    /// `LIFEBOAT_SIM_CALLS` set, every call and its fate goes to standard error.
    pub fn call(&self, what: &str) -> Fault {
        let fault = self.decide(what);
        if std::env::var_os("LIFEBOAT_SIM_CALLS").is_some() {
            eprintln!("call {}: {what} -> {fault:?}", self.calls());
        }
        fault
    }

    fn decide(&self, what: &str) -> Fault {
        let mut s = self.lock();
        s.calls += 1;
        if s.power_out {
            return Fault::Before;
        }
        if s.cut_at == Some(s.calls) {
            s.power_out = true;
            s.cut_at = None;
            // NB: the call the power cut interrupts may or may not have taken effect.
            return if s.rng.chance(500) {
                Fault::After
            } else {
                Fault::Before
            };
        }
        let rate = match s.hot_spot {
            Some((name, hot)) if s.fault_per_mille > 0 && name == what => hot,
            _ => s.fault_per_mille,
        };
        if rate > 0 && s.rng.chance(rate) {
            s.faults += 1;
            return if s.rng.chance(500) {
                Fault::After
            } else {
                Fault::Before
            };
        }
        Fault::None
    }

    /// Fail this share of calls (per mille) from now on; 0 stops the faults.
    pub fn set_fault_rate(&self, per_mille: u64) {
        self.lock().fault_per_mille = per_mille;
    }

    /// Fail calls named `what` at `per_mille` instead of the common rate, while faults are
    /// on (FoundationDB's "buggify": a schedule that stresses one kind of call reaches the
    /// rare paths behind it, such as a point cut whose answer was lost).
    pub fn set_hot_spot(&self, what: &'static str, per_mille: u64) {
        self.lock().hot_spot = Some((what, per_mille));
    }

    /// Cut the power at the `after`-th call from now (1: the next call).
    pub fn schedule_power_cut(&self, after: u64) {
        let mut s = self.lock();
        s.cut_at = Some(s.calls + after.max(1));
    }

    /// Forget a power cut scheduled and not reached.
    pub fn cancel_power_cut(&self) {
        self.lock().cut_at = None;
    }

    /// Whether the power is out (a cut was reached and not yet recovered from).
    pub fn power_out(&self) -> bool {
        self.lock().power_out
    }

    /// The power is back (the simulation applied the cut to every component).
    pub fn power_on(&self) {
        self.lock().power_out = false;
    }

    /// Calls made so far.
    pub fn calls(&self) -> u64 {
        self.lock().calls
    }

    /// Faults injected so far (power cuts not counted).
    pub fn faults(&self) -> u64 {
        self.lock().faults
    }

    /// A number from the world's stream (for choices the components make at a cut).
    pub fn below(&self, n: u64) -> u64 {
        self.lock().rng.below(n)
    }
}
