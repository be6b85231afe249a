//! `lifeboat recover`: recovery from the replica store alone, for the day the site is lost.
//! It needs no cluster, no state folder and no source host: the store and its credentials.
//! It lists the VMs the store holds and their points, and fails a VM over to a point into a
//! folder, every disk verified against the digest the point recorded.
//!
//! A local folder store is opened read-only: a look, or a failover beside a daemon that still
//! replicates into the same folder, changes nothing and repairs nothing.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use lifeboat_engine::Progress;
use lifeboat_engine::replicator::{
    DiskFormat, Output, PointChoice, choose_point, materialise_point,
};
use lifeboat_standalone::cli;
use lifeboat_store::azure::{AzureStore, AzureStoreOptions, Credentials};
use lifeboat_store::local::LocalStore;
use lifeboat_store::{ReplicaStore, VmKey};

/// The environment variable that holds an Azure storage account key.
const KEY_VAR: &str = "AZURE_STORAGE_KEY";
/// The environment variable that holds an Azure SAS token.
const SAS_VAR: &str = "AZURE_STORAGE_SAS_TOKEN";

/// Recover from the replica store alone: list its VMs and points, fail a VM over.
#[derive(Debug, Args)]
pub struct RecoverArgs {
    #[command(flatten)]
    store: StoreArgs,
    #[command(subcommand)]
    command: RecoverCommand,
}

/// Which store.
#[derive(Debug, Args)]
struct StoreArgs {
    /// A local folder store: the `local` target's path (on a shared file system, or a copy).
    #[arg(long, value_name = "PATH", global = true, conflicts_with = "azure")]
    store: Option<PathBuf>,
    /// An Azure Blob Storage container, `https://ACCOUNT.blob.core.windows.net/CONTAINER`
    /// (Azurite: `http://127.0.0.1:10000/devstoreaccount1/CONTAINER`). The credentials come
    /// from AZURE_STORAGE_KEY (the account key) or AZURE_STORAGE_SAS_TOKEN.
    #[arg(long, value_name = "URL", global = true)]
    azure: Option<String>,
}

#[derive(Debug, Subcommand)]
enum RecoverCommand {
    /// The VMs the store holds: hypervisor, node, disks, points and the newest point.
    List,
    /// A VM's definition as its agent last applied it: its ProtectedVM and ReplicationPolicy,
    /// as YAML documents that `kubectl apply -f` (or a standalone manifests folder) takes at
    /// the recovery site.
    Definition {
        /// The VM: NAME or NAMESPACE/NAME.
        vm: String,
    },
    /// A VM's recovery points, oldest first.
    Points {
        /// The VM: NAME or NAMESPACE/NAME.
        vm: String,
    },
    /// Fail a VM over to a point: fence its old primary (the replica moves to a new epoch),
    /// then materialise the point as image files (raw or qcow2) in a folder, each verified
    /// against the point's digest, or, on Azure, copy it into new page blobs.
    Failover {
        /// The VM: NAME or NAMESPACE/NAME.
        vm: String,
        /// The point: `latest` (default), `latest-app-consistent`, `not-after:TIME` (the newest
        /// point at or before an RFC 3339 time, such as not-after:2026-12-06T20:00:00Z), or a
        /// point's name.
        #[arg(long, default_value = "latest")]
        point: lifeboat_core::PointChoice,
        /// The folder the disks are written to (`<vm>-recovered-<disk>.img`, or `.qcow2`).
        #[arg(long, value_name = "DIR", required_unless_present = "into_blobs")]
        to: Option<PathBuf>,
        /// The disks' format with --to: `raw`, or `qcow2` (through qemu-nbd; each disk gets a
        /// dirty bitmap of the recovered VM's writes, for a re-protect that sends only those).
        #[arg(long, value_name = "FORMAT", default_value = "raw", requires = "to")]
        format: DiskFormat,
        /// Azure: copy the point's disks into new page blobs instead,
        /// `recovered/<namespace>/<vm>/LABEL/<disk>.vhd` in the same container (server-side
        /// copies, fixed VHDs: the source of a managed disk, `az disk create --source URL`).
        #[arg(long, value_name = "LABEL", conflicts_with = "to", requires = "azure")]
        into_blobs: Option<String>,
    },
}

/// Run `lifeboat recover`.
///
/// # Errors
///
/// The store cannot be opened or read, no such VM or point, or a disk fails its digest.
pub async fn recover(args: RecoverArgs) -> Result<ExitCode> {
    let store = open(&args.store)?;
    match args.command {
        RecoverCommand::List => list(store.as_ref()).await,
        RecoverCommand::Definition { vm } => {
            let key = vm_key(&vm)?;
            let definition = stored_definition(store.as_ref(), &key)
                .await?
                .with_context(|| format!("{} holds no definition of VM {key}", store.describe()))?;
            let items = definition
                .get("items")
                .and_then(serde_json::Value::as_array)
                .cloned()
                .unwrap_or_default();
            for item in items {
                print!(
                    "---\n{}",
                    serde_saphyr::to_string(&item).context("render the definition as YAML")?
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        RecoverCommand::Points { vm } => {
            let key = vm_key(&vm)?;
            let manifest = store
                .manifest(&key)
                .await?
                .with_context(|| format!("{} holds no VM {key}", store.describe()))?;
            print!("{}", cli::points_table(&manifest.points));
            Ok(ExitCode::SUCCESS)
        }
        RecoverCommand::Failover {
            vm,
            point,
            to,
            format,
            into_blobs,
        } => {
            let key = vm_key(&vm)?;
            let choice = lifeboat_engine::jobs::engine_point(Some(&point));
            match (to, into_blobs, &args.store.azure) {
                (Some(to), _, _) => {
                    failover(store.as_ref(), &key, &choice, Output { dir: &to, format }).await
                }
                (None, Some(label), Some(url)) => {
                    let (account_url, container) = split_container_url(url)?;
                    let azure = azure_from_env(account_url, container)?;
                    failover_into_blobs(&azure, &key, &choice, &label).await
                }
                _ => bail!("say where to: --to DIR, or --into-blobs LABEL with --azure"),
            }
        }
    }
}

fn open(args: &StoreArgs) -> Result<Arc<dyn ReplicaStore>> {
    match (&args.store, &args.azure) {
        (Some(path), _) => {
            if !path.is_dir() {
                bail!("--store {}: no such folder", path.display());
            }
            Ok(Arc::new(LocalStore::open_read_only(path)?))
        }
        (None, Some(url)) => {
            let (account_url, container) = split_container_url(url)?;
            let azure =
                azure_from_env(account_url, container).with_context(|| format!("--azure {url}"))?;
            Ok(Arc::new(azure))
        }
        (None, None) => bail!("say which store: --store PATH or --azure URL"),
    }
}

/// The Azure store of `container` at `account_url`, with the credentials of this shell's
/// environment (`AZURE_STORAGE_KEY`, else `AZURE_STORAGE_SAS_TOKEN`).
///
/// # Errors
///
/// Neither variable is set, or the URL is not one.
pub fn azure_from_env(account_url: &str, container: &str) -> Result<AzureStore> {
    let credentials = match (std::env::var(KEY_VAR), std::env::var(SAS_VAR)) {
        (Ok(key), _) => Credentials::AccountKey {
            account: lifeboat_agent::stores::account_name(account_url),
            key,
        },
        (_, Ok(token)) => Credentials::Sas { token },
        _ => bail!(
            "reading Azure Blob needs credentials: set {KEY_VAR} (the account key) or {SAS_VAR}"
        ),
    };
    Ok(AzureStore::new(
        account_url,
        container,
        credentials,
        AzureStoreOptions::default(),
    )?)
}

/// `https://ACCOUNT.blob.core.windows.net/CONTAINER` as its account URL and container.
fn split_container_url(url: &str) -> Result<(&str, &str)> {
    url.trim_end_matches('/')
        .rsplit_once('/')
        .filter(|(account, _)| account.contains("://"))
        .with_context(|| {
            format!("--azure {url:?}: expected https://ACCOUNT.blob.core.windows.net/CONTAINER")
        })
}

/// The replica store a policy names, as this machine reaches it: a local target's folder
/// (read-only; on a cluster, a share mounted here too), or its Azure container with the
/// credentials of [`azure_from_env`].
///
/// # Errors
///
/// The folder is not here, or no credentials are set.
pub fn policy_store(target: &lifeboat_api::policy::ReplicaTarget) -> Result<Arc<dyn ReplicaStore>> {
    match (&target.local, &target.azure_blob) {
        (Some(local), _) => {
            let path = std::path::Path::new(&local.path);
            if !path.is_dir() {
                bail!("the replica folder {} is not mounted here", path.display());
            }
            Ok(Arc::new(LocalStore::open_read_only(path)?))
        }
        (None, Some(azure)) => Ok(Arc::new(azure_from_env(
            &azure.account_url,
            &azure.container,
        )?)),
        (None, None) => bail!("the policy names no target"),
    }
}

fn vm_key(arg: &str) -> Result<VmKey> {
    let (namespace, name) = cli::parse_vm(arg, "default");
    Ok(VmKey::new(&namespace, &name)?)
}

async fn list(store: &dyn ReplicaStore) -> Result<ExitCode> {
    let vms = store.list_vms().await?;
    if vms.is_empty() {
        eprintln!("{} holds no VM", store.describe());
        return Ok(ExitCode::SUCCESS);
    }
    let header = [
        "NAMESPACE",
        "NAME",
        "HYPERVISOR",
        "NODE",
        "DISKS",
        "POINTS",
        "NEWEST",
    ];
    let mut rows = vec![header.map(String::from).to_vec()];
    for key in vms {
        // NB: a VM deleted between the listing and this read is not an error.
        let Some(manifest) = store.manifest(&key).await? else {
            continue;
        };
        let disks: Vec<String> = manifest
            .disks
            .iter()
            .map(|d| format!("{} ({})", d.name, cli::human_bytes(d.size_bytes)))
            .collect();
        let definition = stored_definition(store, &key).await?;
        let spec = definition
            .as_ref()
            .and_then(|d| d.pointer("/items/0/spec"))
            .cloned()
            .unwrap_or_default();
        let hypervisor = spec
            .get("hypervisor")
            .and_then(serde_json::Value::as_object)
            .and_then(|h| h.keys().next().cloned())
            .unwrap_or_else(|| "-".to_owned());
        let node = spec
            .get("nodeName")
            .and_then(serde_json::Value::as_str)
            .unwrap_or("-")
            .to_owned();
        rows.push(vec![
            key.namespace().to_owned(),
            key.name().to_owned(),
            hypervisor,
            node,
            disks.join(", "),
            manifest.points.len().to_string(),
            manifest
                .latest()
                .map_or_else(|| "-".to_owned(), |p| p.id.clone()),
        ]);
    }
    print!("{}", cli::render(&rows));
    Ok(ExitCode::SUCCESS)
}

/// The VM's definition, parsed (`None`: none stored).
async fn stored_definition(
    store: &dyn ReplicaStore,
    key: &VmKey,
) -> Result<Option<serde_json::Value>> {
    let Some(bytes) = store.definition(key).await? else {
        return Ok(None);
    };
    let value = serde_json::from_slice(&bytes)
        .with_context(|| format!("the definition of VM {key} in {}", store.describe()))?;
    Ok(Some(value))
}

/// Move `key`'s replica to a new epoch held by this command: its old primary's agent, if it
/// is only cut off and comes back, is refused by the store from then on (it is fenced).
async fn fence(store: &dyn ReplicaStore, key: &VmKey) -> Result<()> {
    let holder = format!(
        "lifeboat recover on {}",
        std::env::var("HOSTNAME").unwrap_or_else(|_| "this host".into())
    );
    let now = std::time::SystemTime::now();
    let epoch = store
        .fence(key, &holder, lifeboat_engine::replicator::unix_ms(now))
        .await
        .with_context(|| format!("fencing VM {key}'s old primary"))?;
    eprintln!(
        "VM {key} moved to epoch {} ({holder}): its old primary writes nothing more",
        epoch.number
    );
    Ok(())
}

async fn failover_into_blobs(
    store: &AzureStore,
    key: &VmKey,
    choice: &PointChoice,
    label: &str,
) -> Result<ExitCode> {
    let point = choose_point(store, key, choice).await?;
    eprintln!(
        "recovering VM {key} at point {} into new page blobs of {}",
        point.id,
        store.describe()
    );
    let started = Instant::now();
    fence(store, key).await?;
    let made = store
        .recover_point_to_blobs(key, &point, label)
        .await
        .with_context(|| format!("recovering VM {key} into page blobs"))?;
    for (disk, url) in &made {
        println!("disk {disk}: {url}");
    }
    eprintln!(
        "VM {key} recovered at point {} into {} page blob(s) in {:.1} s (server-side copies of the point's snapshots)",
        point.id,
        made.len(),
        started.elapsed().as_secs_f64()
    );
    Ok(ExitCode::SUCCESS)
}

async fn failover(
    store: &dyn ReplicaStore,
    key: &VmKey,
    choice: &PointChoice,
    to: Output<'_>,
) -> Result<ExitCode> {
    let point = choose_point(store, key, choice).await?;
    eprintln!(
        "recovering VM {key} at point {} from {}",
        point.id,
        store.describe()
    );
    let bar = std::io::stderr().is_terminal().then(crate::ui::bytes_bar);
    let progress = |p: &Progress| {
        if let Some(bar) = &bar {
            bar.set_prefix(format!("disk {}", p.disk));
            bar.set_length(p.bytes_total);
            bar.set_position(p.bytes_done);
        }
    };
    let started = Instant::now();
    fence(store, key).await?;
    let report = materialise_point(store, key, point, to, "recovered", &progress).await;
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    let report = report.with_context(|| format!("recovering VM {key}"))?;
    for disk in &report.disks {
        println!(
            "disk {}: {} ({}, digest verified)",
            disk.name,
            disk.path.display(),
            cli::human_bytes(disk.size_bytes)
        );
    }
    eprintln!(
        "VM {key} recovered at point {} into {}: {} read in {:.1} s",
        report.point.id,
        to.dir.display(),
        cli::human_bytes(report.bytes_read),
        started.elapsed().as_secs_f64()
    );
    Ok(ExitCode::SUCCESS)
}
