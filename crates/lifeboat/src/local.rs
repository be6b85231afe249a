//! The standalone subcommands: the daemon, and the operator's everyday tools, against its
//! state folder or a cluster (`status`, `jobs`, `points`, `resync`, `failover`, `cleanup`,
//! `commit`, `retry`, `plan`, `version`).

use anyhow::{Context as _, Result, bail};
use clap::{Args, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use lifeboat_api::{ProtectedVM, ReplicationJob};
use lifeboat_standalone::cli::{self, Action, WaitError, words};
use lifeboat_standalone::{Daemon, Options};

use crate::cluster_cli::Cluster;
use crate::exit::{self, Exit};
use crate::ui::{self, Format, OutputArgs};

/// The default state folder of standalone mode.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/lifeboat";

/// Set when the binary runs as `kubectl-lifeboat`: cluster mode unless told otherwise.
pub static KUBECTL_PLUGIN: AtomicBool = AtomicBool::new(false);

/// Where `lifeboat standalone` keeps its state.
#[derive(Args, Debug, Clone)]
pub struct DaemonState {
    /// The state folder: embedded store, change logs, requests.
    #[arg(long, env = "LIFEBOAT_STATE_DIR", default_value = DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    /// The namespace of manifests that name none.
    #[arg(long, short = 'n', default_value = "default")]
    pub namespace: String,
}

/// `lifeboat standalone`.
#[derive(Args, Debug)]
pub struct StandaloneArgs {
    /// The folder of ReplicationPolicy, ProtectedVM, RecoveryPlan (and Secret) manifests,
    /// read again when a file changes.
    #[arg(long, short = 'f')]
    pub manifests: PathBuf,
    /// Where (test) failover disks are written. Default: `<state-dir>/failover`.
    #[arg(long)]
    pub failover_dir: Option<PathBuf>,
    /// How often the daemon looks at everything, in seconds.
    #[arg(long, default_value_t = 1)]
    pub tick_seconds: u64,
    #[command(flatten)]
    pub state: DaemonState,
}

/// What the tools act on: a standalone state folder, or a cluster.
#[derive(Args, Debug, Clone, Default)]
pub struct Target {
    /// Standalone: the daemon's state folder [default: /var/lib/lifeboat]. Giving it selects
    /// standalone mode.
    #[arg(long, env = "LIFEBOAT_STATE_DIR", value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Act on a cluster, through its resources (the default when a kubeconfig is found).
    #[arg(long, conflicts_with = "standalone")]
    pub cluster: bool,
    /// Act on a standalone daemon's state folder.
    #[arg(long)]
    pub standalone: bool,
    /// The kubeconfig file [default: KUBECONFIG, else ~/.kube/config, else in-cluster].
    #[arg(long, value_name = "PATH")]
    pub kubeconfig: Option<PathBuf>,
    /// The kubeconfig context [default: the current one].
    #[arg(long, value_name = "NAME")]
    pub context: Option<String>,
    /// The namespace [default: the context's; standalone: default].
    #[arg(long, short = 'n')]
    pub namespace: Option<String>,
}

/// Standalone on a state folder, or a cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// The daemon's state folder.
    Standalone(PathBuf),
    /// The cluster of the kubeconfig.
    Cluster,
}

/// Whether a cluster configuration is at hand: `--kubeconfig`, `--context`, KUBECONFIG,
/// ~/.kube/config, or a pod's service account.
fn kubeconfig_found(target: &Target) -> bool {
    let set = |name: &str| std::env::var_os(name).is_some_and(|v| !v.is_empty());
    let home = std::env::var_os("HOME")
        .or_else(|| std::env::var_os("USERPROFILE"))
        .map(PathBuf::from);
    target.kubeconfig.is_some()
        || target.context.is_some()
        || set("KUBECONFIG")
        || home.is_some_and(|h| h.join(".kube").join("config").is_file())
        || (set("KUBERNETES_SERVICE_HOST")
            && std::path::Path::new("/var/run/secrets/kubernetes.io/serviceaccount/token")
                .is_file())
}

impl Target {
    /// The mode rule: `--cluster` or `--standalone` decide; else a state folder given means
    /// standalone, a kubeconfig found (or running as `kubectl-lifeboat`) means cluster, and
    /// standalone on the default folder is the rest.
    pub fn mode(&self) -> Mode {
        let folder = || {
            Mode::Standalone(
                self.state_dir
                    .clone()
                    .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR)),
            )
        };
        if self.cluster {
            Mode::Cluster
        } else if self.standalone || self.state_dir.is_some() {
            folder()
        } else if KUBECTL_PLUGIN.load(Ordering::Relaxed) || kubeconfig_found(self) {
            Mode::Cluster
        } else {
            folder()
        }
    }

    /// The standalone state folder. The default one must exist: else neither mode has
    /// anything to act on (one given may not exist yet: the daemon creates it).
    pub(crate) fn folder<'a>(&self, dir: &'a std::path::Path) -> Result<&'a std::path::Path> {
        if self.state_dir.is_none() && !dir.is_dir() {
            bail!(
                "no standalone state folder at {} and no kubeconfig found: give --state-dir DIR (standalone), or --kubeconfig PATH / KUBECONFIG (cluster)",
                dir.display()
            );
        }
        Ok(dir)
    }

    async fn connect(&self) -> Result<Cluster> {
        Cluster::connect(self.kubeconfig.as_deref(), self.context.as_deref()).await
    }

    /// The namespace asked for, else `default_namespace`.
    pub(crate) fn namespace_or(&self, default_namespace: &str) -> String {
        self.namespace
            .clone()
            .unwrap_or_else(|| default_namespace.to_owned())
    }
}

/// The operator's everyday tools.
#[derive(Subcommand, Debug)]
pub enum Tool {
    /// The protected VMs, like `kubectl get pvm`: phase, health, RPO, last sync, pending log.
    #[command(after_help = exit::HELP)]
    Status {
        /// Every namespace.
        #[arg(short = 'A', long)]
        all_namespaces: bool,
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// The replication jobs (running and kept), like `kubectl get rjob`: type, phase,
    /// progress, start and duration.
    #[command(after_help = exit::HELP)]
    Jobs {
        /// Only the jobs of this VM.
        vm: Option<String>,
        /// Every namespace.
        #[arg(short = 'A', long)]
        all_namespaces: bool,
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// A VM's recovery points.
    #[command(after_help = exit::HELP)]
    Points {
        /// The VM: NAME or NAMESPACE/NAME.
        vm: String,
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Resynchronize a VM now, outside the policy's window.
    #[command(after_help = exit::HELP)]
    Resync(RequestArgs),
    /// Fail a VM over (or test a failover) to a recovery point.
    #[command(after_help = exit::HELP)]
    Failover {
        #[command(flatten)]
        request: RequestArgs,
        /// A test failover: the disks are materialised under a separate name, protection goes on.
        #[arg(long, conflicts_with_all = ["planned", "unplanned"])]
        test: bool,
        /// Planned: ship everything pending first, then stop protection.
        #[arg(long, conflicts_with = "unplanned")]
        planned: bool,
        /// Unplanned: the source is gone; use the chosen point (asks for confirmation).
        #[arg(long)]
        unplanned: bool,
        /// The point: `latest` (default), `latest-app-consistent`, `not-after:TIME` (the newest
        /// point at or before an RFC 3339 time, such as not-after:2026-12-06T20:00:00Z), or a
        /// point's name.
        #[arg(long, value_parser = lifeboat_standalone::cli::point_arg)]
        point: Option<String>,
    },
    /// Remove a VM's test failover disks.
    #[command(after_help = exit::HELP)]
    Cleanup(RequestArgs),
    /// Commit a failover: drop the other recovery points (asks for confirmation).
    #[command(after_help = exit::HELP)]
    Commit(RequestArgs),
    /// Re-protect after a failover (the recovered VM in `spec.recoverySite` replicates back
    /// into the replica) or after a failback (the VM on its original disks replicates again):
    /// only the blocks that differ from the point it started from are sent.
    #[command(after_help = exit::HELP)]
    Reprotect(RequestArgs),
    /// Fail back a VM that replicates in reverse: while the recovered VM runs, cut a fresh
    /// point of it and bring the primary site's original disks to it; then stop it, ship what
    /// it wrote meanwhile, and bring the original disks to that last point (each time only the
    /// blocks that differ). `--unplanned`, the recovered VM's site lost: from a point of the
    /// replica, run at the primary site (asks for confirmation).
    #[command(after_help = exit::HELP)]
    Failback {
        #[command(flatten)]
        request: RequestArgs,
        /// Unplanned: the recovered VM's site is gone; bring the original disks to the chosen
        /// point, run by the primary site's agent. Replaces a planned failback that waits for
        /// the lost node.
        #[arg(long)]
        unplanned: bool,
        /// The point of an unplanned failback: `latest` (default), `latest-app-consistent`,
        /// `not-after:TIME`, or a point's name.
        #[arg(long, requires = "unplanned", value_parser = lifeboat_standalone::cli::point_arg)]
        point: Option<String>,
    },
    /// Retry what failed now, instead of at the next retry time (after fixing the cause of a
    /// non-recoverable error, say).
    #[command(after_help = exit::HELP)]
    Retry(RequestArgs),
    /// Recovery plans: many VMs recovered in order, group by group, with hooks and manual
    /// gates (test-failover, failover, cleanup, commit, proceed, retry, status).
    #[command(subcommand)]
    Plan(crate::plan::PlanCommand),
    /// This client's version and, on a cluster, the operator's.
    Version {
        #[command(flatten)]
        target: Target,
    },
}

/// A request on one VM.
#[derive(Args, Debug)]
pub struct RequestArgs {
    /// The VM: NAME or NAMESPACE/NAME.
    pub vm: String,
    /// Return once the request is recorded, without waiting for it to be handled.
    #[arg(long)]
    pub no_wait: bool,
    /// Give up waiting after this many seconds (exit status 4).
    #[arg(long, default_value_t = 3600)]
    pub timeout_seconds: u64,
    /// Do not ask for confirmation (commit, unplanned failover): required without a terminal.
    #[arg(long, short = 'y')]
    pub yes: bool,
    #[command(flatten)]
    pub target: Target,
    #[command(flatten)]
    pub output: OutputArgs,
}

/// Run the daemon until Ctrl-C or SIGTERM.
pub async fn standalone(args: StandaloneArgs) -> Result<ExitCode> {
    let state_dir = args.state.state_dir;
    let options = Options {
        failover_dir: args
            .failover_dir
            .unwrap_or_else(|| state_dir.join("failover")),
        manifests: args.manifests,
        state_dir,
        default_namespace: args.state.namespace,
        tick: Duration::from_secs(args.tick_seconds.max(1)),
    };
    let daemon = Daemon::open(options.clone())?;
    for error in daemon.manifest_errors() {
        eprintln!("error: {error}");
    }
    tracing::info!(manifests = %options.manifests.display(), state = %options.state_dir.display(), "lifeboat standalone started");
    daemon.run(shutdown_signal()).await?;
    tracing::info!("lifeboat standalone stopped");
    Ok(ExitCode::SUCCESS)
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

/// Run one of the tools.
pub async fn tool(tool: Tool) -> Result<ExitCode> {
    match tool {
        Tool::Status {
            all_namespaces,
            target,
            output,
        } => status(&target, &output, all_namespaces).await,
        Tool::Jobs {
            vm,
            all_namespaces,
            target,
            output,
        } => jobs(&target, &output, all_namespaces, vm.as_deref()).await,
        Tool::Points { vm, target, output } => points(&target, &output, &vm).await,
        Tool::Resync(request) => ask(request, Action::Resync).await,
        Tool::Failover {
            request,
            test,
            planned,
            unplanned,
            point,
        } => {
            let action = match (test, planned, unplanned) {
                (true, _, _) => Action::TestFailover(point),
                (_, true, _) => {
                    if point.is_some() {
                        bail!(
                            "a planned failover always uses the latest point (after shipping what is pending): drop --point"
                        );
                    }
                    Action::Failover {
                        planned: true,
                        point: None,
                    }
                }
                (_, _, true) => Action::Failover {
                    planned: false,
                    point,
                },
                _ => bail!("say which failover: --test, --planned or --unplanned"),
            };
            ask(request, action).await
        }
        Tool::Cleanup(request) => ask(request, Action::Cleanup).await,
        Tool::Commit(request) => ask(request, Action::Commit).await,
        Tool::Reprotect(request) => ask(request, Action::Reprotect).await,
        Tool::Failback {
            request,
            unplanned,
            point,
        } => {
            let action = Action::Failback {
                planned: !unplanned,
                point,
            };
            ask(request, action).await
        }
        Tool::Retry(request) => ask(request, Action::Retry).await,
        Tool::Plan(command) => crate::plan::plan(command).await,
        Tool::Version { target } => version(&target).await,
    }
}

async fn status(target: &Target, output: &OutputArgs, all: bool) -> Result<ExitCode> {
    let (vms, namespace, place) = match target.mode() {
        Mode::Cluster => {
            let cluster = target.connect().await?;
            let ns = target.namespace_or(&cluster.namespace);
            let vms = cluster.vms((!all).then_some(ns.as_str())).await?;
            (vms, ns, String::new())
        }
        Mode::Standalone(dir) => {
            let ns = target.namespace_or("default");
            let mut vms: Vec<ProtectedVM> =
                cli::vms(target.folder(&dir)?).map_err(anyhow::Error::msg)?;
            vms.retain(|vm| all || vm.metadata.namespace.as_deref() == Some(ns.as_str()));
            let place = format!(
                " of {} (is `lifeboat standalone` running on it?)",
                dir.display()
            );
            (vms, ns, place)
        }
    };
    let scope = if all {
        format!("in any namespace{place}")
    } else {
        format!("in namespace {namespace}{place}")
    };
    print_listing(output, &vms, ui::VM_RESOURCE, "ProtectedVM", &scope, || {
        cli::status_table(&vms, SystemTime::now(), output.columns(all))
    })
}

/// A listing as `-o` asks: json or yaml as a kubectl `List`, `name` as RESOURCE/NAME lines,
/// or a table; an empty table is a line on standard error naming where nothing was found.
fn print_listing<K: kube::Resource + serde::Serialize>(
    output: &OutputArgs,
    items: &[K],
    resource: &str,
    kind: &str,
    scope: &str,
    table: impl FnOnce() -> String,
) -> Result<ExitCode> {
    match output.format() {
        Format::Json | Format::Yaml => output.print_list(items)?,
        Format::Name => {
            for item in items {
                println!(
                    "{resource}/{}",
                    item.meta().name.as_deref().unwrap_or_default()
                );
            }
        }
        Format::Table | Format::Wide if items.is_empty() => eprintln!("No {kind} {scope}"),
        Format::Table | Format::Wide => print!("{}", table()),
    }
    Ok(ExitCode::SUCCESS)
}

async fn jobs(
    target: &Target,
    output: &OutputArgs,
    all: bool,
    vm: Option<&str>,
) -> Result<ExitCode> {
    let (mut jobs, namespace) = match target.mode() {
        Mode::Cluster => {
            let cluster = target.connect().await?;
            let ns = target.namespace_or(&cluster.namespace);
            (cluster.jobs((!all).then_some(ns.as_str())).await?, ns)
        }
        Mode::Standalone(dir) => {
            let ns = target.namespace_or("default");
            let mut jobs: Vec<ReplicationJob> =
                cli::jobs(target.folder(&dir)?).map_err(anyhow::Error::msg)?;
            jobs.retain(|j| all || j.metadata.namespace.as_deref() == Some(ns.as_str()));
            (jobs, ns)
        }
    };
    if let Some(vm) = vm {
        jobs.retain(|j| j.spec.vm_ref.name == vm);
    }
    jobs.sort_by_key(|j| {
        (
            j.metadata.namespace.clone(),
            cli::job_start(j).or_else(|| {
                j.metadata
                    .creation_timestamp
                    .as_ref()
                    .map(lifeboat_control::mapping::system_time)
            }),
            j.metadata.name.clone(),
        )
    });
    let scope = if all {
        "in any namespace".to_owned()
    } else {
        format!("in namespace {namespace}")
    };
    print_listing(
        output,
        &jobs,
        ui::JOB_RESOURCE,
        "ReplicationJob",
        &scope,
        || cli::jobs_table(&jobs, SystemTime::now(), output.columns(all)),
    )
}

async fn points(target: &Target, output: &OutputArgs, vm: &str) -> Result<ExitCode> {
    match target.mode() {
        Mode::Cluster => {
            let cluster = target.connect().await?;
            let (ns, name) = cli::parse_vm(vm, &target.namespace_or(&cluster.namespace));
            let found = cli::Resources::vm(&cluster.resources(), &ns, &name)
                .await
                .map_err(Exit::api)?;
            let Some(found) = found else {
                bail!("no ProtectedVM {ns}/{name}")
            };
            // NB: every point lives in the replica store; read it when this machine reaches
            // it, else fall back to the summary the VM's status holds.
            match store_points(&cluster, &found, &ns, &name).await {
                Ok(points) => {
                    print_points(output, &points)?;
                    return Ok(ExitCode::SUCCESS);
                }
                Err(why) => eprintln!(
                    "the status's summary only: the replica store has every point, and {why:#}"
                ),
            }
            match output.format() {
                Format::Json | Format::Yaml => output
                    .print_object(&found.status.clone().unwrap_or_default().recovery_points)?,
                Format::Name => {
                    for point in crate::cluster_cli::point_names(&found) {
                        println!("{point}");
                    }
                }
                Format::Table | Format::Wide => {
                    print!("{}", crate::cluster_cli::points_summary(&found))
                }
            }
        }
        Mode::Standalone(dir) => {
            let (ns, name) = cli::parse_vm(vm, &target.namespace_or("default"));
            let points = cli::points(target.folder(&dir)?, &ns, &name)
                .await
                .map_err(anyhow::Error::msg)?;
            print_points(output, &points)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_points(output: &OutputArgs, points: &[lifeboat_store::RecoveryPoint]) -> Result<()> {
    match output.format() {
        Format::Json | Format::Yaml => output.print_object(&points)?,
        Format::Name => {
            for point in points {
                println!("{}", point.id);
            }
        }
        Format::Table | Format::Wide => print!("{}", cli::points_table(points)),
    }
    Ok(())
}

/// Every point of a cluster's VM, read from the replica store its policy names.
async fn store_points(
    cluster: &crate::cluster_cli::Cluster,
    vm: &lifeboat_api::ProtectedVM,
    ns: &str,
    name: &str,
) -> Result<Vec<lifeboat_store::RecoveryPoint>> {
    let policy = cluster
        .policy(ns, &vm.spec.policy_ref.name)
        .await?
        .with_context(|| {
            format!(
                "ReplicationPolicy {ns}/{} not found",
                vm.spec.policy_ref.name
            )
        })?;
    let store = crate::recover::policy_store(&policy.spec.target)?;
    let key = lifeboat_store::VmKey::new(ns, name)?;
    let manifest = store
        .manifest(&key)
        .await?
        .with_context(|| format!("{} holds no replica of {key} yet", store.describe()))?;
    Ok(manifest.points)
}

/// Ask on the terminal before what cannot be undone.
fn confirm(request: &RequestArgs, action: &Action, ns: &str, name: &str) -> Result<()> {
    match action {
        Action::Commit => ui::confirm(
            &format!("{action} of {ns}/{name}"),
            &format!(
                "Commit the failover of {ns}/{name}? Every other recovery point is deleted; this cannot be undone."
            ),
            request.yes,
        ),
        Action::Failover { planned: false, .. } | Action::Failback { planned: false, .. } => {
            ui::confirm(
                &format!("{action} of {ns}/{name}"),
                &format!(
                    "Run the {action} of {ns}/{name}? What was written after that point is not on the replica."
                ),
                request.yes,
            )
        }
        _ => Ok(()),
    }
}

async fn ask(request: RequestArgs, action: Action) -> Result<ExitCode> {
    let mode = request.target.mode();
    let (resources, ns, name, token): (Box<dyn cli::Resources>, String, String, String) =
        match &mode {
            Mode::Cluster => {
                let cluster = request.target.connect().await?;
                let (ns, name) = cli::parse_vm(
                    &request.vm,
                    &request.target.namespace_or(&cluster.namespace),
                );
                confirm(&request, &action, &ns, &name)?;
                let token = cluster.request(&ns, &name, &action).await?;
                (Box::new(cluster.resources()), ns, name, token)
            }
            Mode::Standalone(dir) => {
                let (ns, name) =
                    cli::parse_vm(&request.vm, &request.target.namespace_or("default"));
                confirm(&request, &action, &ns, &name)?;
                let token = cli::request(dir, &ns, &name, &action).map_err(anyhow::Error::msg)?;
                let db = lifeboat_standalone::db::Db::new(dir);
                (Box::new(cli::Embedded(db)), ns, name, token)
            }
        };
    if request.no_wait {
        match request.output.format() {
            Format::Name => println!("{}/{name}", ui::VM_RESOURCE),
            Format::Json | Format::Yaml => request.output.print_object(
                &serde_json::json!({"namespace": ns, "name": name, "action": action.to_string(), "token": token}),
            )?,
            Format::Table | Format::Wide => {
                println!("requested the {action} of {ns}/{name} (token {token})")
            }
        }
        return Ok(ExitCode::SUCCESS);
    }
    let mut bar = ui::Bar::new();
    let vm = cli::wait(
        resources.as_ref(),
        &ns,
        &name,
        &action,
        &token,
        Duration::from_secs(request.timeout_seconds),
        &mut bar,
    )
    .await
    .map_err(|error| {
        let code = match (&error, &mode) {
            (WaitError::Failed(_), _) => exit::JOB_FAILED,
            (WaitError::Timeout(_), _) => exit::TIMEOUT,
            (WaitError::Source(_), Mode::Cluster) => exit::API,
            (WaitError::Source(_), Mode::Standalone(_)) => exit::ERROR,
        };
        Exit::with(code, format!("the {action} of {ns}/{name}: {error}"))
    })?;
    let status = vm.status.clone().unwrap_or_default();
    match request.output.format() {
        Format::Json | Format::Yaml => {
            request.output.print_object(&status)?;
            return Ok(ExitCode::SUCCESS);
        }
        Format::Name => {
            println!("{}/{name}", ui::VM_RESOURCE);
            return Ok(ExitCode::SUCCESS);
        }
        Format::Table | Format::Wide => {}
    }
    let result = match action {
        Action::TestFailover(_) => status.test_failover,
        Action::Failover { .. } | Action::Failback { .. } => status.failover,
        _ => None,
    };
    println!(
        "the {action} of {ns}/{name} is done (phase {}, direction {}, health {})",
        words(&status.phase),
        words(&status.direction),
        words(&status.health)
    );
    if let Some(result) = result {
        if let Some(point) = result.recovery_point {
            println!(
                "recovery point {} ({})",
                point.name,
                words(&point.consistency)
            );
        }
        for disk in result.disks {
            println!("  disk {}: {}", disk.name, disk.location);
        }
        if let Some(up) = result.recovered_vm.filter(|_| !result.failback) {
            println!(
                "recovered VM {}: {}",
                up.name,
                up.definition
                    .as_deref()
                    .unwrap_or("no definition (spec.recoveredVm has no template)")
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `lifeboat version` (and `--version`): the client's, and on a cluster the operator's (the
/// `app.kubernetes.io/version` label of the chart's operator Deployment).
pub async fn version(target: &Target) -> Result<ExitCode> {
    println!("client: lifeboat {}", env!("CARGO_PKG_VERSION"));
    match target.mode() {
        Mode::Standalone(dir) => println!(
            "operator: none (standalone mode: `lifeboat standalone` on {} is this binary)",
            dir.display()
        ),
        Mode::Cluster => {
            let found = tokio::time::timeout(Duration::from_secs(10), async {
                let cluster = target.connect().await.map_err(|e| format!("{e:#}"))?;
                cluster.operator_version().await
            })
            .await
            .unwrap_or_else(|_| Err("the API server did not answer within 10s".into()));
            match found {
                Ok((version, at)) => println!("operator: {version} (Deployment {at})"),
                Err(reason) => println!("operator: unknown ({reason})"),
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
