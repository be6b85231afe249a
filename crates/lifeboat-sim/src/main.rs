//! `lifeboat-sim`: run the power-cut simulation over a range of seeds, or for a time
//! budget, and report what it found. A failing seed is printed with its trace; run it again
//! with `--seed N --trace` to replay it exactly.
//!
//! ```text
//! cargo run --release -p lifeboat-sim -- --minutes 60          # a long run
//! cargo run --release -p lifeboat-sim -- --seed 1234 --trace   # replay one schedule
//! cargo run --release -p lifeboat-sim -- --sweeps                # every sweep
//! ```

use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;

use lifeboat_sim::{Options, Outcome, SWEEPS, run, sweep};

/// Explore schedules of the replication engine under faults, crashes and power cuts.
#[derive(Debug, Parser)]
#[command(name = "lifeboat-sim", version)]
struct Args {
    /// Run only this seed.
    #[arg(long)]
    seed: Option<u64>,
    /// The first seed of the range.
    #[arg(long, default_value_t = 0)]
    from: u64,
    /// How many seeds (without --minutes).
    #[arg(long, default_value_t = 200)]
    count: u64,
    /// Run seeds from --from on until this many minutes have passed (instead of --count).
    #[arg(long)]
    minutes: Option<f64>,
    /// Steps per schedule.
    #[arg(long, default_value_t = 40)]
    steps: usize,
    /// Print the trace of every schedule, not only of failing ones.
    #[arg(long)]
    trace: bool,
    /// Run every sweep (an operation interrupted at each of its calls in turn) instead of
    /// random schedules.
    #[arg(long, conflicts_with_all = ["seed", "minutes"])]
    sweeps: bool,
}

/// Every sweep in turn; the violations of the failing ones, then one line per sweep.
fn run_sweeps() -> ExitCode {
    let mut lines = Vec::new();
    let mut failed = false;
    for (target, how) in SWEEPS {
        let outcome = match sweep(target, how) {
            Ok(outcome) => outcome,
            Err(e) => {
                eprintln!("{target:?}, {how:?}: the simulation itself failed: {e:#}");
                return ExitCode::from(2);
            }
        };
        for v in &outcome.violations {
            println!("{v}");
        }
        lines.push(if outcome.broken_calls.is_empty() {
            format!(
                "{target:?}, {how:?}: {} calls, no invariant broken",
                outcome.calls
            )
        } else {
            failed = true;
            format!(
                "{target:?}, {how:?}: {} calls, broken when interrupted at calls {:?}",
                outcome.calls, outcome.broken_calls
            )
        });
    }
    for line in lines {
        println!("{line}");
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.sweeps {
        return run_sweeps();
    }
    let started = Instant::now();
    let budget = args.minutes.map(|m| Duration::from_secs_f64(m * 60.0));
    let mut total = Outcome::default();
    let mut schedules = 0u64;
    let mut failing = Vec::new();
    let mut seed = args.seed.unwrap_or(args.from);
    loop {
        let done = match (args.seed, budget) {
            (Some(_), _) => schedules == 1,
            (None, Some(budget)) => started.elapsed() >= budget,
            (None, None) => schedules == args.count,
        };
        if done {
            break;
        }
        let options = Options {
            steps: args.steps,
            ..Options::new(seed)
        };
        let outcome = match run(options) {
            Ok(outcome) => outcome,
            Err(e) => {
                eprintln!("seed {seed}: the simulation itself failed: {e:#}");
                return ExitCode::from(2);
            }
        };
        if args.trace || !outcome.violations.is_empty() {
            for line in &outcome.trace {
                println!("seed {seed}: {line}");
            }
        }
        if !outcome.violations.is_empty() {
            failing.push(seed);
        }
        total.steps += outcome.steps;
        total.power_cuts += outcome.power_cuts;
        total.crashes += outcome.crashes;
        total.states_lost += outcome.states_lost;
        total.faults += outcome.faults;
        total.calls += outcome.calls;
        total.points_checked += outcome.points_checked;
        total.failovers_checked += outcome.failovers_checked;
        for (op, n) in outcome.operations {
            *total.operations.entry(op).or_default() += n;
        }
        total.violations.extend(
            outcome
                .violations
                .into_iter()
                .map(|v| format!("seed {seed}: {v}")),
        );
        schedules += 1;
        seed += 1;
    }
    println!(
        "{schedules} schedules, {} steps, {} power cuts, {} agent crashes, {} state folders lost, \
         {} injected faults in {} calls, {} point checks, {} failovers checked, in {:.0} s",
        total.steps,
        total.power_cuts,
        total.crashes,
        total.states_lost,
        total.faults,
        total.calls,
        total.points_checked,
        total.failovers_checked,
        started.elapsed().as_secs_f64()
    );
    let ops: Vec<String> = total
        .operations
        .iter()
        .map(|(op, n)| format!("{op} {n}"))
        .collect();
    println!("operations: {}", ops.join(", "));
    if failing.is_empty() {
        println!("no invariant broken");
        ExitCode::SUCCESS
    } else {
        for v in &total.violations {
            println!("{v}");
        }
        println!("failing seeds: {failing:?}");
        ExitCode::FAILURE
    }
}
