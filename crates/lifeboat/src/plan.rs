//! `lifeboat plan`: run a RecoveryPlan (test failover, failover, cleanup, commit), let it past
//! a gate, retry it from its failed step, show the plans and their VMs. The standalone daemon
//! (or, on a cluster, the operator) runs the plan; this writes the request (a request file,
//! or the plan's `spec.requests`) and follows the run, a line per step and per VM.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use anyhow::{Result, bail};
use clap::{Args, Subcommand};
use lifeboat_api::plan::{PlanPhase, RecoveryPlan, VmOutcome};
use lifeboat_standalone::cli::plan::{self as cli_plan, PlanAsk, PlanSource};
use lifeboat_standalone::cli::{self, WaitError, words};

use crate::cluster_cli::Cluster;
use crate::exit::{self, Exit};
use crate::local::{Mode, Target};
use crate::ui::{self, Format, OutputArgs};

/// The plan's resource name, as `kubectl get -o name` prints it.
const PLAN_RESOURCE: &str = "recoveryplan.lifeboat.io";

/// `lifeboat plan ...`.
#[derive(Subcommand, Debug)]
pub enum PlanCommand {
    /// Test failover of every VM of the plan, group by group (gates, hooks); replication goes
    /// on.
    #[command(after_help = exit::HELP)]
    TestFailover {
        #[command(flatten)]
        request: PlanArgs,
        /// Each VM's point: `latest` (default), `latest-app-consistent`, or `not-after:TIME`
        /// (each VM's newest point at or before an RFC 3339 time).
        #[arg(long, value_parser = cli::point_arg)]
        point: Option<String>,
    },
    /// Fail every VM of the plan over, group by group (gates, hooks).
    #[command(after_help = exit::HELP)]
    Failover {
        #[command(flatten)]
        request: PlanArgs,
        /// Planned: each source ships everything pending, then stops.
        #[arg(long, conflicts_with = "unplanned")]
        planned: bool,
        /// Unplanned: the sources are gone; use the point rule (asks for confirmation).
        #[arg(long)]
        unplanned: bool,
        /// Each VM's point (unplanned): `latest` (default), `latest-app-consistent`, or
        /// `not-after:TIME`.
        #[arg(long, value_parser = cli::point_arg, conflicts_with = "planned")]
        point: Option<String>,
    },
    /// Remove the test failovers of every VM of the plan.
    #[command(after_help = exit::HELP)]
    Cleanup(PlanArgs),
    /// Commit the failovers of every VM of the plan (asks for confirmation).
    #[command(after_help = exit::HELP)]
    Commit(PlanArgs),
    /// Let a run waiting at a gate go on.
    #[command(after_help = exit::HELP)]
    Proceed(PlanArgs),
    /// Run the failed run again from the step that failed (the steps done are not redone).
    #[command(after_help = exit::HELP)]
    Retry(PlanArgs),
    /// The plans (phase, action, step, recovery time), or one plan's VMs group by group.
    #[command(after_help = exit::HELP)]
    Status {
        /// One plan: its VMs.
        plan: Option<String>,
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        output: OutputArgs,
    },
}

/// A request on one plan.
#[derive(Args, Debug)]
pub struct PlanArgs {
    /// The plan: NAME or NAMESPACE/NAME.
    pub plan: String,
    /// Return once the request is recorded, without following the run.
    #[arg(long)]
    pub no_wait: bool,
    /// Give up following the run after this many seconds (exit status 4; the run goes on).
    #[arg(long, default_value_t = 86_400)]
    pub timeout_seconds: u64,
    /// Do not ask for confirmation (commit, unplanned failover): required without a terminal.
    #[arg(long, short = 'y')]
    pub yes: bool,
    #[command(flatten)]
    pub target: Target,
    #[command(flatten)]
    pub output: OutputArgs,
}

/// Run a `lifeboat plan` command.
pub async fn plan(command: PlanCommand) -> Result<ExitCode> {
    let (request, ask) = match command {
        PlanCommand::Status {
            plan,
            target,
            output,
        } => return status(&target, &output, plan.as_deref()).await,
        PlanCommand::TestFailover { request, point } => (request, PlanAsk::TestFailover(point)),
        PlanCommand::Failover {
            request,
            planned,
            unplanned,
            point,
        } => {
            if !planned && !unplanned {
                bail!("say which failover: --planned or --unplanned");
            }
            (request, PlanAsk::Failover { planned, point })
        }
        PlanCommand::Cleanup(request) => (request, PlanAsk::Cleanup),
        PlanCommand::Commit(request) => (request, PlanAsk::Commit),
        PlanCommand::Proceed(request) => (request, PlanAsk::Proceed),
        PlanCommand::Retry(request) => (request, PlanAsk::Retry),
    };
    ask_plan(request, ask).await
}

/// Where a plan is asked and read: a standalone state folder, or a cluster.
enum Place {
    Folder(cli_plan::StateFolder),
    Cluster(Cluster),
}

impl Place {
    async fn of(target: &Target) -> Result<(Place, String)> {
        Ok(match target.mode() {
            Mode::Standalone(dir) => (
                Place::Folder(cli_plan::StateFolder(target.folder(&dir)?.to_owned())),
                target.namespace_or("default"),
            ),
            Mode::Cluster => {
                let cluster =
                    Cluster::connect(target.kubeconfig.as_deref(), target.context.as_deref())
                        .await?;
                let ns = target.namespace_or(&cluster.namespace);
                (Place::Cluster(cluster), ns)
            }
        })
    }

    fn source(&self) -> &dyn PlanSource {
        match self {
            Place::Folder(folder) => folder,
            Place::Cluster(cluster) => cluster,
        }
    }

    async fn plans(&self, namespace: &str) -> Result<Vec<RecoveryPlan>> {
        match self {
            Place::Folder(cli_plan::StateFolder(dir)) => {
                let mut plans = cli_plan::plans(dir).map_err(anyhow::Error::msg)?;
                plans.retain(|p| p.metadata.namespace.as_deref() == Some(namespace));
                Ok(plans)
            }
            Place::Cluster(cluster) => cluster.plans(namespace).await,
        }
    }

    async fn request(&self, namespace: &str, name: &str, ask: &PlanAsk) -> Result<String> {
        match self {
            Place::Folder(cli_plan::StateFolder(dir)) => {
                cli_plan::request(dir, namespace, name, ask).map_err(anyhow::Error::msg)
            }
            Place::Cluster(cluster) => cluster.plan_request(namespace, name, ask).await,
        }
    }

    /// Where nothing was found, for an empty listing.
    fn scope(&self, namespace: &str) -> String {
        match self {
            Place::Folder(cli_plan::StateFolder(dir)) => format!(
                "in namespace {namespace} of {} (is `lifeboat standalone` running on it?)",
                dir.display()
            ),
            Place::Cluster(_) => format!("in namespace {namespace}"),
        }
    }
}

async fn status(target: &Target, output: &OutputArgs, name: Option<&str>) -> Result<ExitCode> {
    let (place, ns) = Place::of(target).await?;
    if let Some(name) = name {
        let (ns, name) = cli::parse_vm(name, &ns);
        let plan = place
            .source()
            .plan(&ns, &name)
            .await
            .map_err(anyhow::Error::msg)?;
        match output.format() {
            Format::Json | Format::Yaml => output.print_object(&plan)?,
            Format::Name => println!("{PLAN_RESOURCE}/{name}"),
            Format::Table | Format::Wide => {
                print!(
                    "{}",
                    cli_plan::plans_table(std::slice::from_ref(&plan), SystemTime::now())
                );
                println!();
                print!("{}", cli_plan::vms_table(&plan));
                if let Some(failure) = plan.status.as_ref().and_then(|s| s.failure.as_ref()) {
                    println!("\nstopped at {}: {}", failure.step, failure.message);
                }
            }
        }
        return Ok(ExitCode::SUCCESS);
    }
    let plans = place.plans(&ns).await?;
    match output.format() {
        Format::Json | Format::Yaml => output.print_list(&plans)?,
        Format::Name => {
            for plan in &plans {
                println!(
                    "{PLAN_RESOURCE}/{}",
                    plan.metadata.name.as_deref().unwrap_or_default()
                );
            }
        }
        Format::Table | Format::Wide if plans.is_empty() => {
            eprintln!("No RecoveryPlan {}", place.scope(&ns))
        }
        Format::Table | Format::Wide => {
            print!("{}", cli_plan::plans_table(&plans, SystemTime::now()))
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn confirm(request: &PlanArgs, ask: &PlanAsk, ns: &str, name: &str) -> Result<()> {
    let question = match ask {
        PlanAsk::Commit => format!(
            "Commit the failover of every VM of the plan {ns}/{name}? Every other recovery point is deleted; this cannot be undone."
        ),
        PlanAsk::Failover { planned: false, .. } => format!(
            "Run the {ask} of every VM of the plan {ns}/{name}? What was written after each VM's point is not on the replica."
        ),
        _ => return Ok(()),
    };
    ui::confirm(
        &format!("{ask} of the plan {ns}/{name}"),
        &question,
        request.yes,
    )
}

/// What a followed run has said so far, so that each step and each VM's end is said once.
#[derive(Default)]
struct Narrator {
    step: Option<String>,
    vms: BTreeMap<String, VmOutcome>,
}

impl Narrator {
    /// The lines the plan's new status adds.
    fn lines(&mut self, plan: &RecoveryPlan) -> Vec<String> {
        let Some(status) = &plan.status else {
            return Vec::new();
        };
        let mut lines = Vec::new();
        for vm in &status.vms {
            if self.vms.get(&vm.name) == Some(&vm.outcome) {
                continue;
            }
            self.vms.insert(vm.name.clone(), vm.outcome);
            let took = match (&vm.start_time, &vm.completion_time) {
                (Some(a), Some(b)) => format!(" in {:.1}s", b.0.duration_since(a.0).as_secs_f64()),
                _ => String::new(),
            };
            match vm.outcome {
                VmOutcome::Succeeded => lines.push(format!(
                    "  {}/{}: done{took}{}",
                    vm.group,
                    vm.name,
                    vm.recovery_point
                        .as_ref()
                        .map(|p| format!(", point {p}"))
                        .unwrap_or_default()
                )),
                VmOutcome::Failed => lines.push(format!(
                    "  {}/{}: failed{took}: {}",
                    vm.group,
                    vm.name,
                    vm.message.clone().unwrap_or_default()
                )),
                VmOutcome::Pending | VmOutcome::Running => {}
            }
        }
        if status.progression != self.step {
            self.step.clone_from(&status.progression);
            if let Some(step) = &status.progression {
                let name = plan.metadata.name.as_deref().unwrap_or_default();
                lines.push(match status.phase {
                    PlanPhase::WaitingForGate => {
                        format!("{step} (go on with `lifeboat plan proceed {name}`)")
                    }
                    _ => step.clone(),
                });
            }
        }
        lines
    }
}

async fn ask_plan(request: PlanArgs, ask: PlanAsk) -> Result<ExitCode> {
    let (place, ns) = Place::of(&request.target).await?;
    let (ns, name) = cli::parse_vm(&request.plan, &ns);
    confirm(&request, &ask, &ns, &name)?;
    let token = place.request(&ns, &name, &ask).await?;
    if request.no_wait {
        match request.output.format() {
            Format::Name => println!("{PLAN_RESOURCE}/{name}"),
            Format::Json | Format::Yaml => request.output.print_object(
                &serde_json::json!({"namespace": ns, "name": name, "action": ask.to_string(), "token": token}),
            )?,
            Format::Table | Format::Wide => {
                println!("requested the {ask} of the plan {ns}/{name} (token {token})")
            }
        }
        return Ok(ExitCode::SUCCESS);
    }
    eprintln!("{ask} of the plan {ns}/{name} (token {token})");
    let mut narrator = Narrator::default();
    let mut say = |plan: &RecoveryPlan| {
        for line in narrator.lines(plan) {
            eprintln!("{line}");
        }
    };
    let plan = cli_plan::wait(
        place.source(),
        &ns,
        &name,
        &ask,
        &token,
        Duration::from_secs(request.timeout_seconds),
        &mut say,
    )
    .await
    .map_err(|error| {
        let code = match &error {
            WaitError::Failed(_) => exit::JOB_FAILED,
            WaitError::Timeout(_) => exit::TIMEOUT,
            WaitError::Source(_) if matches!(place, Place::Cluster(_)) => exit::API,
            WaitError::Source(_) => exit::ERROR,
        };
        Exit::with(code, format!("the {ask} of the plan {ns}/{name}: {error}"))
    })?;
    let status = plan.status.clone().unwrap_or_default();
    match request.output.format() {
        Format::Json | Format::Yaml => request.output.print_object(&status)?,
        Format::Name => println!("{PLAN_RESOURCE}/{name}"),
        Format::Table | Format::Wide if ask == PlanAsk::Proceed => {
            println!(
                "the plan {ns}/{name} went past its gate ({})",
                words(&status.phase)
            )
        }
        Format::Table | Format::Wide => {
            println!(
                "the {ask} of the plan {ns}/{name} is done{}",
                status
                    .recovery_time_seconds
                    .map(|s| format!(" in {s:.1}s"))
                    .unwrap_or_default()
            );
            print!("{}", cli_plan::vms_table(&plan));
        }
    }
    Ok(ExitCode::SUCCESS)
}
