//! What the tools show and ask on the terminal: output formats (`-o`), the progress bar of a
//! job being waited on, and the confirmation of destructive requests.

use std::io::{BufRead, IsTerminal};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;

use lifeboat_api::ReplicationJob;
use lifeboat_standalone::cli::{self, Progress};

use crate::exit::{self, Exit};

/// `-o`: how a result is printed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Aligned columns.
    #[default]
    Table,
    /// More columns.
    Wide,
    /// JSON (a list is a `kind: List` with `items`, as kubectl prints it).
    Json,
    /// YAML (likewise).
    Yaml,
    /// `KIND.GROUP/NAME` lines, as `kubectl get -o name`.
    Name,
}

/// The output options of a tool.
#[derive(Args, Debug, Clone)]
pub struct OutputArgs {
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value = "table")]
    pub output: Format,
    /// The former `--json`: a plain JSON array for lists (prefer `-o json`).
    #[arg(long, hide = true)]
    pub json: bool,
}

impl OutputArgs {
    /// The format in force (`--json` is `-o json`).
    pub fn format(&self) -> Format {
        if self.json { Format::Json } else { self.output }
    }

    /// The table's columns.
    pub fn columns(&self, all_namespaces: bool) -> cli::Columns {
        cli::Columns {
            wide: self.format() == Format::Wide,
            namespaces: all_namespaces,
        }
    }

    /// Print one object (or a value) as JSON or YAML.
    pub fn print_object<T: Serialize>(&self, value: &T) -> Result<()> {
        match self.format() {
            Format::Yaml => print!("{}", serde_saphyr::to_string(value).context("render YAML")?),
            _ => println!("{}", serde_json::to_string_pretty(value)?),
        }
        Ok(())
    }

    /// Print a list as JSON or YAML: a `kind: List`, or the plain array of `--json`.
    pub fn print_list<T: Serialize>(&self, items: &[T]) -> Result<()> {
        if self.json {
            println!("{}", serde_json::to_string_pretty(items)?);
            return Ok(());
        }
        let list = serde_json::json!({
            "apiVersion": "v1",
            "kind": "List",
            "metadata": {},
            "items": items,
        });
        self.print_object(&list)
    }
}

/// The resource name a `-o name` line starts with.
pub const VM_RESOURCE: &str = "protectedvm.lifeboat.io";
/// Likewise for jobs.
pub const JOB_RESOURCE: &str = "replicationjob.lifeboat.io";

/// The progress of the job a tool waits on, as a bar on standard error: bytes copied of the
/// total, throughput and ETA measured from the job's own start (`status.startTime`), as wide as
/// the terminal. Hidden unless both standard output and standard error are terminals.
#[derive(Debug)]
pub struct Bar {
    shown: bool,
    bar: Option<ProgressBar>,
}

impl Bar {
    /// A bar, drawn only on a terminal.
    pub fn new() -> Bar {
        Bar {
            shown: std::io::stdout().is_terminal() && std::io::stderr().is_terminal(),
            bar: None,
        }
    }
}

/// A bar of bytes on standard error, as wide as the terminal: `PREFIX [===> ] done/total  MSG`.
pub fn bytes_bar() -> ProgressBar {
    let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template(
            "{prefix} [{wide_bar}] {binary_bytes}/{binary_total_bytes}  {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar
}

/// `rate` and `eta` of `done` of `total` bytes after `elapsed`.
pub fn rate_and_eta(done: u64, total: u64, elapsed: Duration) -> (u64, Option<Duration>) {
    let seconds = elapsed.as_secs_f64();
    if seconds < 0.5 || done == 0 {
        return (0, None);
    }
    let rate = done as f64 / seconds;
    let eta = (total > done).then(|| Duration::from_secs_f64((total - done) as f64 / rate));
    (rate as u64, eta.or(Some(Duration::ZERO)))
}

impl Progress for Bar {
    fn job(&mut self, job: &ReplicationJob) {
        if !self.shown {
            return;
        }
        let Some(status) = job.status.as_ref() else {
            return;
        };
        let bar = self.bar.get_or_insert_with(bytes_bar);
        let p = &status.progress;
        bar.set_length(p.bytes_total);
        bar.set_position(p.bytes_done);
        bar.set_prefix(format!(
            "{} {}",
            cli::words(&job.spec.job_type),
            cli::words(&status.phase)
        ));
        let elapsed = cli::job_start(job)
            .and_then(|start| SystemTime::now().duration_since(start).ok())
            .unwrap_or_default();
        let (rate, eta) = rate_and_eta(p.bytes_done, p.bytes_total, elapsed);
        let eta = eta
            .map(lifeboat_core::format_duration)
            .unwrap_or_else(|| "-".into());
        bar.set_message(format!(
            "{:>3}%  {}/s  ETA {eta}",
            p.percent,
            cli::human_bytes(rate)
        ));
    }

    fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}

/// Ask `question` (y/N) on the terminal, unless `yes`. Without a terminal and without `--yes`,
/// refuse: a script must say `--yes`.
///
/// # Errors
///
/// Not confirmed ([`exit::NOT_CONFIRMED`]).
pub fn confirm(what: &str, question: &str, yes: bool) -> Result<()> {
    if yes {
        return Ok(());
    }
    if !std::io::stdin().is_terminal() {
        return Err(Exit::with(
            exit::NOT_CONFIRMED,
            format!(
                "refusing the {what} without confirmation: standard input is not a terminal; pass --yes to confirm"
            ),
        ));
    }
    eprint!("{question} [y/N] ");
    let mut answer = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut answer)
        .context("read the answer")?;
    match answer.trim().to_lowercase().as_str() {
        "y" | "yes" => Ok(()),
        _ => Err(Exit::with(
            exit::NOT_CONFIRMED,
            format!("the {what} was not confirmed: nothing was requested"),
        )),
    }
}
