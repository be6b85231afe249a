//! The `lifeboat` command: one binary for every role (operator, agent, standalone) and for the
//! operator's everyday tools. Subcommands arrive with the pieces they drive; today:
//!
//! ```text
//! lifeboat validate FILE...   check manifests as `kubectl apply` would, offline
//! lifeboat crds               print the CustomResourceDefinitions (pipe to kubectl apply -f -)
//! ```

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "lifeboat",
    version,
    about = "Disaster-recovery replication for virtual machines"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check ReplicationPolicy, ProtectedVM and ReplicationJob manifests against the CRD schemas
    /// (types, enums, ranges, required and unknown fields, CEL rules), without a cluster.
    Validate {
        /// Manifest files (YAML, one or more documents each).
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Print Lifeboat's CustomResourceDefinitions as YAML.
    Crds,
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
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
