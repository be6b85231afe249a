//! The `lifeboat` command: one binary for every role (operator, agent, standalone) and for the
//! operator's everyday tools. Subcommands arrive with the pieces they drive; today:
//!
//! ```text
//! lifeboat validate FILE...   check manifests as `kubectl apply` would, offline
//! lifeboat crds               print the CustomResourceDefinitions (pipe to kubectl apply -f -)
//! lifeboat operator           run the control plane (in a cluster, or with a kubeconfig)
//! lifeboat agent              run the node agent of one VM host (a DaemonSet pod)
//! lifeboat standalone         the operator and the agent in one process, no cluster
//! lifeboat status | jobs | points | resync | failover | cleanup | commit | retry | version
//!                             the everyday tools (a cluster when a kubeconfig is found, else
//!                             a standalone state folder; also as `kubectl lifeboat`)
//! lifeboat plan ACTION PLAN   run a RecoveryPlan: test-failover, failover, cleanup, commit,
//!                             proceed (past a gate), retry (from the failed step), status
//! lifeboat completion SHELL   shell completions (bash, zsh, fish, ...)
//! ```

mod cluster_cli;
mod exit;
mod local;
mod plan;
mod recover;
mod ui;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "lifeboat",
    version,
    disable_version_flag = true,
    about = "Disaster-recovery replication for virtual machines",
    after_help = exit::HELP,
    subcommand_required = false,
    arg_required_else_help = true
)]
struct Cli {
    /// Print the client's version and, on a cluster, the operator's (as `lifeboat version`).
    #[arg(short = 'V', long)]
    version: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Check ReplicationPolicy, ProtectedVM, ReplicationJob and RecoveryPlan manifests against
    /// the CRD schemas (types, enums, ranges, required and unknown fields, CEL rules), without a
    /// cluster.
    Validate {
        /// Manifest files (YAML, one or more documents each).
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Print Lifeboat's CustomResourceDefinitions as YAML.
    Crds,
    /// Run the operator: turn ReplicationPolicies and ProtectedVMs into ReplicationJobs for the
    /// node agents, and write status, conditions, events and metrics.
    Operator(OperatorArgs),
    /// Run the node agent: claim the ReplicationJobs of this node, replicate its protected VMs,
    /// report facts in status.agent and renew its heartbeat Lease.
    Agent(AgentArgs),
    /// Run Lifeboat on this machine without a cluster: manifests from a folder, state in an
    /// embedded store, replicas in the local folder store by default.
    Standalone(local::StandaloneArgs),
    #[command(flatten)]
    Tool(local::Tool),
    /// Recover from the replica store alone, with nothing of the lost site: list the VMs
    /// and points a store holds, fail a VM over to a point into a folder.
    Recover(recover::RecoverArgs),
    /// Print a shell completion script: `source <(lifeboat completion bash)`, or into
    /// ~/.local/share/bash-completion/completions/lifeboat (zsh: a file on $fpath named
    /// _lifeboat; fish: ~/.config/fish/completions/lifeboat.fish).
    Completion {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

#[derive(Args)]
struct AgentArgs {
    /// The node this agent runs on (the pod's spec.nodeName, from the downward API).
    #[arg(long, env = "NODE_NAME")]
    node_name: String,
    /// The agent pod's name: jobs are claimed as `<node>/<pod>`.
    #[arg(long, env = "POD_NAME", default_value = "lifeboat-agent")]
    pod_name: String,
    /// Watch this namespace only. Without it: every namespace.
    #[arg(long)]
    namespace: Option<String>,
    /// The operator's namespace, where the heartbeat Lease lives.
    #[arg(long, env = "POD_NAMESPACE", default_value = "lifeboat-system")]
    lease_namespace: String,
    /// Engine state and change logs (a hostPath: it must outlive the pod).
    #[arg(long, default_value = "/var/lib/lifeboat")]
    state_dir: PathBuf,
    /// Where (test) failover disks are materialised.
    #[arg(long, default_value = "/var/lib/lifeboat/failover")]
    failover_dir: PathBuf,
    /// Serve /healthz, /readyz and /metrics on this address.
    #[arg(long, default_value = "0.0.0.0:8081")]
    health_addr: SocketAddr,
    /// How long a running job or cycle may finish after SIGTERM before it is abandoned
    /// (set the pod's terminationGracePeriodSeconds above it).
    #[arg(long, default_value = "20s", value_parser = parse_duration)]
    shutdown_grace: Duration,
    /// Log lines as text or JSON (the level comes from RUST_LOG, default info).
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormat,
}

#[derive(Clone, Copy, ValueEnum)]
enum Switch {
    On,
    Off,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Args)]
struct OperatorArgs {
    /// Watch this namespace only. Without it: every namespace.
    #[arg(long)]
    namespace: Option<String>,
    /// Serve /metrics, /healthz and /readyz on this address.
    #[arg(long, default_value = "0.0.0.0:8080")]
    metrics_addr: SocketAddr,
    /// Elect a leader among replicas with a Lease, so that only one acts.
    #[arg(long, value_enum, default_value = "on")]
    leader_election: Switch,
    /// The leader election Lease's name.
    #[arg(long, default_value = "lifeboat-operator")]
    lease_name: String,
    /// The namespace of the leader election Lease and of the agents' heartbeat Leases
    /// [default: $POD_NAMESPACE, else lifeboat-system].
    #[arg(long)]
    lease_namespace: Option<String>,
    /// This replica's identity in the election [default: $POD_NAME, else the host name].
    #[arg(long)]
    identity: Option<String>,
    /// How long finished ReplicationJobs are kept, e.g. 90m, 24h, 7d.
    #[arg(long, default_value = "24h", value_parser = parse_duration)]
    job_retention: Duration,
    /// Reconciles of each resource that may run at once.
    #[arg(long, default_value_t = 16)]
    concurrency: u16,
    /// Log lines as text or JSON (the level comes from RUST_LOG, default info).
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormat,
}

/// `90s`, `15m`, `24h`, `7d`, or seconds.
fn parse_duration(text: &str) -> Result<Duration> {
    let (number, unit) = text.split_at(
        text.find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len()),
    );
    let n: u64 = number
        .parse()
        .with_context(|| format!("{text:?} is not a duration like 24h"))?;
    let seconds = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        other => bail!("unknown unit {other:?} in {text:?}: use s, m, h or d"),
    };
    Ok(Duration::from_secs(n * seconds))
}

/// Log lines to standard error, at the level RUST_LOG says (info by default), in colour only
/// on a terminal (a log redirected to a file holds no escape codes).
fn init_logs(format: LogFormat) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => logs.json().init(),
        LogFormat::Text => logs.init(),
    }
}

/// Run `work` on a multi-threaded runtime.
fn block_on<T>(work: impl std::future::Future<Output = Result<T>>) -> Result<T> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start the async runtime")?
        .block_on(work)
}

fn agent(args: AgentArgs) -> Result<ExitCode> {
    init_logs(args.log_format);
    let mut options = lifeboat_agent::cluster::AgentOptions::new(&args.node_name);
    options.pod_name = args.pod_name;
    options.namespace = args.namespace;
    options.lease_namespace = args.lease_namespace;
    options.state_dir = args.state_dir;
    options.failover_dir = args.failover_dir;
    options.health_addr = Some(args.health_addr);
    options.timing.shutdown_grace = args.shutdown_grace;
    block_on(async { lifeboat_agent::cluster::run(options).await.context("agent") })?;
    Ok(ExitCode::SUCCESS)
}

fn operator(args: OperatorArgs) -> Result<ExitCode> {
    init_logs(args.log_format);
    let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let config = lifeboat_operator::Config {
        namespace: args.namespace,
        metrics_addr: Some(args.metrics_addr),
        leader_election: matches!(args.leader_election, Switch::On),
        lease_name: args.lease_name,
        lease_namespace: args
            .lease_namespace
            .or_else(|| env("POD_NAMESPACE"))
            .unwrap_or_else(|| "lifeboat-system".into()),
        identity: args
            .identity
            .or_else(|| env("POD_NAME"))
            .or_else(|| env("HOSTNAME"))
            .unwrap_or_else(|| "lifeboat-operator".into()),
        job_retention: args.job_retention,
        concurrency: args.concurrency,
        ..lifeboat_operator::Config::default()
    };
    block_on(async { lifeboat_operator::run(config).await.context("operator") })?;
    Ok(ExitCode::SUCCESS)
}

/// The name the binary was called by: `kubectl-lifeboat` makes it a kubectl plugin.
fn invoked_as() -> String {
    std::env::args_os()
        .next()
        .map(PathBuf::from)
        .and_then(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "lifeboat".into())
}

fn main() -> ExitCode {
    use clap::{CommandFactory, FromArgMatches};
    let plugin = invoked_as() == "kubectl-lifeboat";
    local::KUBECTL_PLUGIN.store(plugin, std::sync::atomic::Ordering::Relaxed);
    let mut command = Cli::command();
    if plugin {
        command = command.bin_name("kubectl lifeboat");
    }
    let cli = match Cli::from_arg_matches(&command.get_matches()) {
        Ok(cli) => cli,
        Err(error) => error.exit(),
    };
    match run(cli, plugin) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            exit::code(&error)
        }
    }
}

fn run(cli: Cli, plugin: bool) -> Result<ExitCode> {
    let Some(command) = cli.command else {
        // `--version` alone (clap asks for a subcommand otherwise).
        return block_on(local::version(&local::Target::default()));
    };
    if cli.version {
        return block_on(local::version(&local::Target::default()));
    }
    match command {
        Command::Completion { shell } => {
            use clap::CommandFactory;
            let name = if plugin {
                "kubectl-lifeboat"
            } else {
                "lifeboat"
            };
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), name, &mut script);
            // NB: a closed pipe (`| head`) is not an error worth a panic.
            let _ = std::io::Write::write_all(&mut std::io::stdout(), &script);
            Ok(ExitCode::SUCCESS)
        }
        Command::Validate { files } => validate(&files),
        Command::Crds => {
            for crd in lifeboat_api::crds() {
                print!(
                    "---\n{}",
                    serde_saphyr::to_string(&crd).context("render a CRD as YAML")?
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Operator(args) => operator(args),
        Command::Agent(args) => agent(args),
        Command::Standalone(args) => {
            init_logs(LogFormat::Text);
            block_on(local::standalone(args))
        }
        Command::Tool(tool) => block_on(local::tool(tool)),
        Command::Recover(args) => block_on(recover::recover(args)),
    }
}

fn validate(files: &[PathBuf]) -> Result<ExitCode> {
    let mut failed = 0;
    for file in files {
        let name = file.display().to_string();
        let text = std::fs::read_to_string(file).with_context(|| format!("read {name}"))?;
        match lifeboat_api::manifest::parse(&name, &text) {
            Ok(resources) => {
                for resource in resources {
                    println!(
                        "{name}: {} \"{}\" is valid",
                        resource.kind(),
                        resource.name()
                    );
                }
            }
            Err(error) => {
                failed += 1;
                eprintln!("{error}");
            }
        }
    }
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
