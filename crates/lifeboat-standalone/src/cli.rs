//! What the `lifeboat` command shows and asks in standalone mode: a `kubectl get pvm`-like
//! table, recovery points, and requests (resync, failover, cleanup, commit) written for the
//! daemon and waited on, telling a progress display (the binary's) about the job.

pub mod plan;

use std::path::Path;
use std::time::SystemTime;

use lifeboat_agent::StoreCache;
use lifeboat_api::protected_vm::Requests;
use lifeboat_api::{ProtectedVM, ReplicationJob, ReplicationPolicy};
use lifeboat_control::mapping::{self, system_time};
use lifeboat_core::format_duration;
use lifeboat_store::VmKey;

pub use lifeboat_control::requests::{
    Action, NoProgress, Progress, Resources, WaitError, apply_request, check_action, handled,
    new_token, point_arg, point_choice, selector, wait, words,
};

use crate::daemon::{JOB_KIND, POLICY_KIND, VM_KIND};
use crate::db::Db;
use crate::requests;

/// A VM named on the command line: `NAME` or `NAMESPACE/NAME`.
pub fn parse_vm(arg: &str, default_namespace: &str) -> (String, String) {
    match arg.split_once('/') {
        Some((ns, name)) => (ns.to_owned(), name.to_owned()),
        None => (default_namespace.to_owned(), arg.to_owned()),
    }
}

fn age(time: Option<SystemTime>, now: SystemTime) -> String {
    match time {
        Some(t) => format!(
            "{} ago",
            format_duration(now.duration_since(t).unwrap_or_default())
        ),
        None => "-".to_owned(),
    }
}

/// Bytes for people: `512 B`, `3.2 MiB`, `1.5 GiB`.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// The VMs the daemon knows.
///
/// # Errors
///
/// The embedded store cannot be read.
pub fn vms(state_dir: &Path) -> Result<Vec<ProtectedVM>, String> {
    Db::new(state_dir).list(VM_KIND).map_err(|e| e.to_string())
}

/// Which columns a table has: `wide` adds details, `namespaces` the NAMESPACE column (for a
/// list across namespaces, as `kubectl get -A`).
#[derive(Clone, Copy, Debug, Default)]
pub struct Columns {
    /// `-o wide`.
    pub wide: bool,
    /// `-A`: the first column is the namespace.
    pub namespaces: bool,
}

/// Rows as aligned columns, three spaces apart, no trailing blanks.
pub fn render(rows: &[Vec<String>]) -> String {
    let Some(first) = rows.first() else {
        return String::new();
    };
    let widths: Vec<usize> = (0..first.len())
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    rows.iter()
        .map(|r| {
            r.iter()
                .zip(&widths)
                .map(|(cell, w)| format!("{cell:<w$}"))
                .collect::<Vec<_>>()
                .join("   ")
                .trim_end()
                .to_owned()
                + "\n"
        })
        .collect()
}

/// The `lifeboat status` table: what `kubectl get pvm` shows, plus the pending log.
pub fn status_table(vms: &[ProtectedVM], now: SystemTime, columns: Columns) -> String {
    let mut header = vec![
        "NAME",
        "PHASE",
        "HEALTH",
        "RPO",
        "LAST SYNC",
        "PENDING LOG",
        "POINTS",
    ];
    if columns.namespaces {
        header.insert(0, "NAMESPACE");
    }
    if columns.wide {
        header.extend(["REASON", "DIRECTION", "IN STEP", "NODE", "POLICY", "JOB"]);
    }
    let mut rows = vec![header.into_iter().map(String::from).collect::<Vec<_>>()];
    for vm in vms {
        let status = vm.status.clone().unwrap_or_default();
        // NB: the node of the VM that replicates (or last replicated): the recovery site's
        // once re-protected in reverse.
        let node = match (&status.direction, &vm.spec.recovery_site) {
            (lifeboat_api::protected_vm::ReplicationDirection::Reverse, Some(site)) => {
                site.node_name.clone()
            }
            _ => vm.spec.node_name.clone(),
        };
        let mut row = vec![
            vm.metadata.name.clone().unwrap_or_default(),
            words(&status.phase),
            words(&status.health),
            status.rpo.clone().unwrap_or_else(|| "-".into()),
            age(
                status.last_successful_cycle_time.as_ref().map(system_time),
                now,
            ),
            human_bytes(status.pending_log_bytes),
            status.recovery_points.count.to_string(),
        ];
        if columns.namespaces {
            row.insert(0, vm.metadata.namespace.clone().unwrap_or_default());
        }
        if columns.wide {
            row.extend([
                status.health_reason.clone().unwrap_or_else(|| "-".into()),
                words(&status.direction),
                // NB: `kubectl get pvm -o wide` shows the point's age as well.
                age(
                    status.original_disks_in_step_time.as_ref().map(system_time),
                    now,
                ),
                node,
                vm.spec.policy_ref.name.clone(),
                status
                    .current_job
                    .as_ref()
                    .map(|j| j.name.clone())
                    .unwrap_or_else(|| "-".into()),
            ]);
        }
        rows.push(row);
    }
    render(&rows)
}

/// The jobs the daemon keeps (running and finished), oldest first.
///
/// # Errors
///
/// The embedded store cannot be read.
pub fn jobs(state_dir: &Path) -> Result<Vec<ReplicationJob>, String> {
    Db::new(state_dir).list(JOB_KIND).map_err(|e| e.to_string())
}

/// When a job started (else when it was created).
pub fn job_start(job: &ReplicationJob) -> Option<SystemTime> {
    job.status
        .as_ref()
        .and_then(|s| s.start_time.as_ref())
        .map(system_time)
}

/// The `lifeboat jobs` table: NAME VM TYPE PHASE PROGRESS STARTED DURATION, as
/// `kubectl get rjob` shows them, with the duration so far for a running job.
pub fn jobs_table(jobs: &[ReplicationJob], now: SystemTime, columns: Columns) -> String {
    let mut header = vec![
        "NAME", "VM", "TYPE", "PHASE", "PROGRESS", "STARTED", "DURATION",
    ];
    if columns.namespaces {
        header.insert(0, "NAMESPACE");
    }
    if columns.wide {
        header.extend(["NODE", "BYTES", "MESSAGE"]);
    }
    let mut rows = vec![header.into_iter().map(String::from).collect::<Vec<_>>()];
    for job in jobs {
        let status = job.status.clone().unwrap_or_default();
        let started = job_start(job);
        let ended = status.completion_time.as_ref().map(system_time);
        let duration = match (started, ended) {
            (Some(start), Some(end)) => {
                format_duration(end.duration_since(start).unwrap_or_default())
            }
            (Some(start), None) => format_duration(now.duration_since(start).unwrap_or_default()),
            _ => "-".into(),
        };
        // NB: a Failback job that keeps the original disks in step runs every copy interval
        // while the VM replicates in reverse; it fails nothing back.
        let in_step = lifeboat_core::vm::keeps_in_step(
            mapping::job_kind(job.spec.job_type),
            &mapping::params(&job.spec.parameters),
        );
        let kind = match in_step {
            true => format!("{} (in step)", words(&job.spec.job_type)),
            false => words(&job.spec.job_type),
        };
        let mut row = vec![
            job.metadata.name.clone().unwrap_or_default(),
            job.spec.vm_ref.name.clone(),
            kind,
            words(&status.phase),
            format!("{}%", status.progress.percent),
            age(started, now),
            duration,
        ];
        if columns.namespaces {
            row.insert(0, job.metadata.namespace.clone().unwrap_or_default());
        }
        if columns.wide {
            let message = status
                .error
                .as_ref()
                .map(|e| format!("{}: {}", e.reason, e.message))
                .or_else(|| status.progress.message.clone())
                .unwrap_or_else(|| "-".into());
            row.extend([
                job.spec.node_name.clone(),
                format!(
                    "{} / {}",
                    human_bytes(status.progress.bytes_done),
                    human_bytes(status.progress.bytes_total)
                ),
                message.replace('\n', " "),
            ]);
        }
        rows.push(row);
    }
    render(&rows)
}

/// The recovery points of a VM, newest last, from its replica store.
///
/// # Errors
///
/// The VM or its policy is unknown, or the store cannot be read.
pub async fn points(
    state_dir: &Path,
    namespace: &str,
    name: &str,
) -> Result<Vec<lifeboat_store::RecoveryPoint>, String> {
    let db = Db::new(state_dir);
    let vm: ProtectedVM = db
        .get(VM_KIND, namespace, name)
        .map_err(|e| e.to_string())?
        .ok_or_else(|| {
            format!(
                "no ProtectedVM {namespace}/{name} in {}",
                state_dir.display()
            )
        })?;
    let policy: ReplicationPolicy = db
        .get(POLICY_KIND, namespace, &vm.spec.policy_ref.name)
        .map_err(|e| e.to_string())?
        .ok_or_else(|| {
            format!(
                "ProtectedVM {namespace}/{name}: its ReplicationPolicy {} is unknown",
                vm.spec.policy_ref.name
            )
        })?;
    struct NoSecrets;
    impl lifeboat_agent::SecretSource for NoSecrets {
        fn secret_value(
            &self,
            namespace: &str,
            reference: &lifeboat_api::common::SecretKeyReference,
        ) -> Result<String, String> {
            std::env::var(format!(
                "LIFEBOAT_SECRET_{}_{}",
                reference.name.to_uppercase().replace('-', "_"),
                reference.key.to_uppercase()
            ))
            .map_err(|_| {
                format!(
                    "Secret {namespace}/{} key {} is needed to read the Azure target",
                    reference.name, reference.key
                )
            })
        }
    }
    // NB: read-only: the daemon holds the VM's local store, and a look must change nothing.
    let store = StoreCache::read_only()
        .store(namespace, &policy.spec.target, 4, &NoSecrets)
        .map_err(|e| e.to_string())?;
    let key = VmKey::new(namespace, name).map_err(|e| e.to_string())?;
    let manifest = store.manifest(&key).await.map_err(|e| e.to_string())?;
    Ok(manifest.map(|m| m.points).unwrap_or_default())
}

/// The points table.
pub fn points_table(points: &[lifeboat_store::RecoveryPoint]) -> String {
    let header = ["POINT", "CONSISTENCY", "CYCLE", "WRITTEN BY", "DISKS"];
    let mut rows = vec![header.map(String::from).to_vec()];
    for p in points {
        let consistency = match p.consistency {
            lifeboat_store::Consistency::AppConsistent => "AppConsistent",
            lifeboat_store::Consistency::CrashConsistent => "CrashConsistent",
        };
        // NB: a disk's size and the start of its digest (the block map's fingerprint): enough
        // to tell points apart and to compare with a materialised disk's.
        let disks: Vec<String> = p
            .disks
            .iter()
            .map(|d| {
                let short: String = d.digest.fingerprint.chars().take(12).collect();
                format!(
                    "{}={} {}:{short}",
                    d.name,
                    human_bytes(d.size_bytes),
                    d.digest.algorithm
                )
            })
            .collect();
        let by = if p.written_by.is_empty() {
            "-"
        } else {
            p.written_by.as_str()
        };
        rows.push(vec![
            p.id.clone(),
            consistency.to_owned(),
            p.cycle.to_string(),
            by.to_owned(),
            disks.join(", "),
        ]);
    }
    render(&rows)
}

/// Write the request for `action` on a VM for the daemon using `state_dir`; returns its token.
///
/// # Errors
///
/// The VM is unknown to the daemon, or the request cannot be written.
pub fn request(
    state_dir: &Path,
    namespace: &str,
    name: &str,
    action: &Action,
) -> Result<String, String> {
    let Some(vm) = Db::new(state_dir)
        .get::<ProtectedVM>(VM_KIND, namespace, name)
        .map_err(|e| e.to_string())?
    else {
        return Err(format!(
            "no ProtectedVM {namespace}/{name} is known to the daemon using {} (is `lifeboat standalone` running on it?)",
            state_dir.display()
        ));
    };
    check_action(&vm, action)?;
    let token = new_token();
    requests::write(state_dir, namespace, name, |r: &mut Requests| {
        apply_request(r, action, &token)
    })?;
    Ok(token)
}

/// The standalone daemon's embedded store as [`Resources`].
#[derive(Debug)]
pub struct Embedded(pub Db);

#[async_trait::async_trait]
impl Resources for Embedded {
    async fn vm(&self, namespace: &str, name: &str) -> Result<Option<ProtectedVM>, String> {
        self.0
            .get(VM_KIND, namespace, name)
            .map_err(|e| e.to_string())
    }
    async fn job(&self, namespace: &str, name: &str) -> Result<Option<ReplicationJob>, String> {
        self.0
            .get(JOB_KIND, namespace, name)
            .map_err(|e| e.to_string())
    }
}
