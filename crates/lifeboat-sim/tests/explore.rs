//! The power-cut simulation in CI: a bounded budget of seeded schedules through the real
//! engine and local store, every invariant checked (see `lifeboat_sim::explore`). A failure
//! prints the seed and its trace; replay it with
//! `cargo run -p lifeboat-sim -- --seed N --trace`.
//!
//! The budget is `LIFEBOAT_SIM_SECONDS` (default 60) of schedules from seed 0 on; a long run
//! is `cargo run --release -p lifeboat-sim -- --minutes 60`.

use std::time::{Duration, Instant};

use lifeboat_sim::{Interruption, Options, Outcome, SweepOutcome, Target, run};

fn explore(seed: u64) -> Outcome {
    run(Options::new(seed)).unwrap_or_else(|e| panic!("seed {seed}: the rig failed: {e:#}"))
}

fn assert_clean(outcome: &Outcome) {
    assert!(
        outcome.violations.is_empty(),
        "seed {} broke an invariant:\n{}\n\ntrace:\n{}",
        outcome.seed,
        outcome.violations.join("\n"),
        outcome.trace.join("\n")
    );
}

#[test]
fn schedules_within_the_budget_break_no_invariant() {
    let budget = std::env::var("LIFEBOAT_SIM_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .map_or(Duration::from_secs(60), Duration::from_secs);
    let started = Instant::now();
    let (mut schedules, mut cuts, mut crashes, mut faults, mut points) = (0, 0, 0, 0, 0);
    let mut seed = 0;
    while started.elapsed() < budget || schedules < 10 {
        let outcome = explore(seed);
        assert_clean(&outcome);
        schedules += 1;
        cuts += outcome.power_cuts;
        crashes += outcome.crashes;
        faults += outcome.faults;
        points += outcome.points_checked;
        seed += 1;
    }
    eprintln!(
        "{schedules} schedules: {cuts} power cuts, {crashes} agent crashes, {faults} faults, \
         {points} point checks"
    );
    // NB: a schedule that never cuts the power or checks a point would pass vacuously.
    assert!(cuts > 0 && crashes > 0 && faults > 0 && points > 0);
}

#[test]
fn a_seed_replays_exactly() {
    let (a, b) = (explore(8), explore(8));
    assert_eq!(a.trace, b.trace);
    assert_eq!(a.calls, b.calls);
    assert_ne!(explore(9).trace, a.trace);
}

/// Every call of `target` interrupted in turn, `how`: no invariant breaks.
fn sweep(target: Target, how: Interruption) -> SweepOutcome {
    let outcome = lifeboat_sim::sweep(target, how)
        .unwrap_or_else(|e| panic!("{target:?}, {how:?}: the rig failed: {e:#}"));
    assert!(
        outcome.calls > 10,
        "{target:?} made {} calls",
        outcome.calls
    );
    assert!(
        outcome.violations.is_empty(),
        "{}",
        outcome.violations.join("\n")
    );
    outcome
}

/// The bytes the resumed operations sent when interrupted in the last quarter of their
/// calls: each is below what the whole operation sends.
fn assert_resumes_send_less(outcome: &SweepOutcome, what: &str) {
    let late: Vec<(u64, u64)> = outcome
        .resumed_bytes_sent
        .iter()
        .filter(|(call, _)| *call > outcome.calls * 3 / 4)
        .filter_map(|(call, sent)| sent.map(|s| (*call, s)))
        .collect();
    assert!(
        !late.is_empty(),
        "{what}: nothing resumed late: {outcome:?}"
    );
    for (call, sent) in &late {
        assert!(
            *sent < outcome.full_bytes_sent,
            "{what} interrupted at call {call} of {} re-sent {sent} bytes, the whole one sends {}",
            outcome.calls,
            outcome.full_bytes_sent
        );
    }
    eprintln!(
        "{what}: {} calls, whole {} bytes; resumed late: {late:?}",
        outcome.calls, outcome.full_bytes_sent
    );
}

#[test]
fn an_initial_copy_interrupted_at_any_call_ends_right() {
    sweep(Target::InitialCopy, Interruption::Outage);
    sweep(Target::InitialCopy, Interruption::PowerCut);
    let crashed = sweep(Target::InitialCopy, Interruption::Crash);
    assert_resumes_send_less(&crashed, "an initial copy resumed after an agent crash");
}

#[test]
fn a_cycle_interrupted_at_any_call_ends_right() {
    sweep(Target::Cycle, Interruption::Outage);
    sweep(Target::Cycle, Interruption::Crash);
    sweep(Target::Cycle, Interruption::PowerCut);
    sweep(Target::CycleThenResync, Interruption::Outage);
    sweep(Target::CycleThenResync, Interruption::Crash);
}

#[test]
fn a_resync_interrupted_at_any_call_ends_right_and_resumes() {
    sweep(Target::Resync, Interruption::Outage);
    sweep(Target::Resync, Interruption::Crash);
    let cut = sweep(Target::Resync, Interruption::PowerCut);
    assert_resumes_send_less(&cut, "a resync resumed after a power cut");
}
