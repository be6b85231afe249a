//! The standalone subcommands: the daemon, and the operator's everyday tools against its
//! state folder (`status`, `points`, `resync`, `failover`, `cleanup`, `commit`).

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use lifeboat_standalone::cli::{self, Action};
use lifeboat_standalone::{Daemon, Options};

use crate::cluster_cli::Cluster;

/// Where standalone keeps its state.
#[derive(Args, Debug, Clone)]
pub struct StateArgs {
    /// The state folder: embedded store, change logs, requests.
    #[arg(long, env = "LIFEBOAT_STATE_DIR", default_value = "/var/lib/lifeboat")]
    pub state_dir: PathBuf,
    /// The namespace of VMs named without one.
    #[arg(long, short = 'n', default_value = "default")]
    pub namespace: String,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Act on a cluster through its resources (current kubeconfig context) instead of a
    /// standalone state folder.
    #[arg(long)]
    pub cluster: bool,
}

/// `lifeboat standalone`.
#[derive(Args, Debug)]
pub struct StandaloneArgs {
    /// The folder of ReplicationPolicy, ProtectedVM (and Secret) manifests, read again when a
    /// file changes.
    #[arg(long, short = 'f')]
    pub manifests: PathBuf,
    /// Where (test) failover disks are written. Default: `<state-dir>/failover`.
    #[arg(long)]
    pub failover_dir: Option<PathBuf>,
    /// How often the daemon looks at everything, in seconds.
    #[arg(long, default_value_t = 1)]
    pub tick_seconds: u64,
    #[command(flatten)]
    pub state: StateArgs,
}

/// The operator's everyday tools.
#[derive(Subcommand, Debug)]
pub enum Tool {
    /// The protected VMs, like `kubectl get pvm`: phase, health, RPO, last sync, pending log.
    Status {
        #[command(flatten)]
        state: StateArgs,
    },
    /// A VM's recovery points.
    Points {
        /// The VM: NAME or NAMESPACE/NAME.
        vm: String,
        #[command(flatten)]
        state: StateArgs,
    },
    /// Resynchronize a VM now, outside the policy's window.
    Resync(RequestArgs),
    /// Fail a VM over (or test a failover) to a recovery point.
    Failover {
        #[command(flatten)]
        request: RequestArgs,
        /// A test failover: the disks are materialised under a separate name, protection goes on.
        #[arg(long, conflicts_with_all = ["planned", "unplanned"])]
        test: bool,
        /// Planned: ship everything pending first, then stop protection.
        #[arg(long, conflicts_with = "unplanned")]
        planned: bool,
        /// Unplanned: the source is gone; use the chosen point.
        #[arg(long)]
        unplanned: bool,
        /// The point: `latest` (default), `latest-app-consistent`, or a point's name.
        #[arg(long)]
        point: Option<String>,
    },
    /// Remove a VM's test failover disks.
    Cleanup(RequestArgs),
    /// Commit a failover: drop the other recovery points.
    Commit(RequestArgs),
    /// Retry what failed now, instead of at the next retry time (after fixing the cause of a
    /// non-recoverable error, say).
    Retry(RequestArgs),
}

/// A request on one VM.
#[derive(Args, Debug)]
pub struct RequestArgs {
    /// The VM: NAME or NAMESPACE/NAME.
    pub vm: String,
    /// Return once the request is recorded, without waiting for it to be handled.
    #[arg(long)]
    pub no_wait: bool,
    /// Give up waiting after this many seconds.
    #[arg(long, default_value_t = 3600)]
    pub timeout_seconds: u64,
    #[command(flatten)]
    pub state: StateArgs,
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
        Tool::Status { state } if state.cluster => {
            let cluster = Cluster::connect().await?;
            let vms = cluster.vms(None).await?;
            if state.json {
                println!("{}", serde_json::to_string_pretty(&vms)?);
            } else {
                print!("{}", crate::cluster_cli::status_table(&vms));
            }
            Ok(ExitCode::SUCCESS)
        }
        Tool::Points { vm, state } if state.cluster => {
            let (ns, name) = cli::parse_vm(&vm, &state.namespace);
            let cluster = Cluster::connect().await?;
            let found = cli::Resources::vm(&cluster, &ns, &name)
                .await
                .map_err(anyhow::Error::msg)?;
            let Some(found) = found else {
                bail!("no ProtectedVM {ns}/{name}")
            };
            if state.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(
                        &found.status.unwrap_or_default().recovery_points
                    )?
                );
            } else {
                print!("{}", crate::cluster_cli::points_summary(&found));
            }
            Ok(ExitCode::SUCCESS)
        }
        Tool::Status { state } => {
            let vms = cli::vms(&state.state_dir).map_err(anyhow::Error::msg)?;
            if state.json {
                println!("{}", serde_json::to_string_pretty(&vms)?);
            } else if vms.is_empty() {
                println!(
                    "No ProtectedVM in {} (is `lifeboat standalone` running on it?)",
                    state.state_dir.display()
                );
            } else {
                print!("{}", cli::status_table(&vms, SystemTime::now()));
            }
            Ok(ExitCode::SUCCESS)
        }
        Tool::Points { vm, state } => {
            let (ns, name) = cli::parse_vm(&vm, &state.namespace);
            let points = cli::points(&state.state_dir, &ns, &name)
                .await
                .map_err(anyhow::Error::msg)?;
            if state.json {
                println!("{}", serde_json::to_string_pretty(&points_json(&points))?);
            } else {
                print!("{}", cli::points_table(&points));
            }
            Ok(ExitCode::SUCCESS)
        }
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
        Tool::Retry(request) => ask(request, Action::Retry).await,
    }
}

fn points_json(points: &[lifeboat_store::RecoveryPoint]) -> serde_json::Value {
    serde_json::to_value(points).unwrap_or_default()
}

async fn ask(request: RequestArgs, action: Action) -> Result<ExitCode> {
    let (ns, name) = cli::parse_vm(&request.vm, &request.state.namespace);
    let (resources, token): (Box<dyn cli::Resources>, String) = if request.state.cluster {
        let cluster = Cluster::connect().await?;
        let token = cluster.request(&ns, &name, &action).await?;
        (Box::new(cluster), token)
    } else {
        let token = cli::request(&request.state.state_dir, &ns, &name, &action)
            .map_err(anyhow::Error::msg)?;
        (
            Box::new(cli::Embedded(lifeboat_standalone::db::Db::new(
                &request.state.state_dir,
            ))),
            token,
        )
    };
    if request.no_wait {
        println!("requested the {action} of {ns}/{name} (token {token})");
        return Ok(ExitCode::SUCCESS);
    }
    let vm = cli::wait(
        resources.as_ref(),
        &ns,
        &name,
        &action,
        &token,
        Duration::from_secs(request.timeout_seconds),
    )
    .await
    .map_err(anyhow::Error::msg)
    .with_context(|| format!("the {action} of {ns}/{name}"))?;
    let status = vm.status.unwrap_or_default();
    if request.state.json {
        println!("{}", serde_json::to_string_pretty(&status)?);
        return Ok(ExitCode::SUCCESS);
    }
    let result = match action {
        Action::TestFailover(_) => status.test_failover,
        Action::Failover { .. } => status.failover,
        _ => None,
    };
    println!(
        "the {action} of {ns}/{name} is done (phase {}, health {})",
        words(&status.phase),
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
    }
    Ok(ExitCode::SUCCESS)
}

/// An API enum as its manifests spell it (`Protected`, `CrashConsistent`), not Rust's Debug.
fn words<T: serde::Serialize>(value: &T) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(word)) => word,
        Ok(other) => other.to_string(),
        Err(_) => "unknown".into(),
    }
}
