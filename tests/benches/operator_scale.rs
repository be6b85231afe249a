//! The operator at scale: N ProtectedVMs across M nodes, agents reporting every copy interval,
//! against the test API server fixture. The operator runs in a process of its own (this
//! binary, re-run in the operator role), so that its resident memory and CPU time are its
//! own; the API server and the agent fleet run here.
//!
//! ```sh
//! cargo bench -p lifeboat-tests --bench operator_scale -- --vms 5000 --nodes 50 --interval 30 --steady 120
//! ```
//!
//! Phases: protect every VM (each goes through EnableProtection and FinalizeProtection jobs
//! that the fleet claims and completes at once), then a steady state in which every VM's agent
//! reports once per interval (spread evenly), then a policy change, timed until every VM's
//! status shows the new policy generation. Printed: the operator's RSS (now and peak), its CPU
//! time over the steady state, status writes per report, and the propagation time.
//!
//! The fleet is a stand-in for the agents (see tests/support/agent.rs for the contract it
//! plays); it watches jobs instead of polling, so that it keeps up with thousands of VMs.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use lifeboat_api::contract::{
    AGENT_FIELD_MANAGER, HEARTBEAT_LABEL, HEARTBEAT_LABEL_VALUE, OPERATOR_FIELD_MANAGER,
    agent_lease_name, agent_report_apply, claim_job_patch, is_claimable,
};
use lifeboat_api::job::JobType;
use lifeboat_api::{ProtectedVM, ProtectionPhase, ReplicationJob, ReplicationPolicy};
use lifeboat_tests::agent::healthy_report;
use lifeboat_tests::apiserver::TestApiServer;
use serde_json::json;

const NS: &str = "bench";
const ROLE: &str = "LIFEBOAT_BENCH_ROLE";
const SERVER: &str = "LIFEBOAT_BENCH_SERVER";

#[derive(Clone, Copy, Debug)]
struct Args {
    vms: usize,
    nodes: usize,
    interval: u64,
    steady: u64,
}

fn args() -> Result<Args> {
    let mut a = Args {
        vms: 5000,
        nodes: 50,
        interval: 30,
        steady: 120,
    };
    // NB: `cargo test --all-targets` runs this binary too, without `--bench`: then a smoke run
    // of a few VMs checks that the benchmark still works, in seconds.
    if !std::env::args().any(|a| a == "--bench") {
        a = Args {
            vms: 20,
            nodes: 2,
            interval: 1,
            steady: 1,
        };
    }
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || -> Result<u64> {
            it.next()
                .with_context(|| format!("{flag} needs a value"))?
                .parse()
                .with_context(|| format!("{flag} needs a number"))
        };
        match flag.as_str() {
            "--vms" => a.vms = usize::try_from(value()?)?,
            "--nodes" => a.nodes = usize::try_from(value()?)?,
            "--interval" => a.interval = value()?,
            "--steady" => a.steady = value()?,
            "--bench" => {}
            other => bail!(
                "unknown argument {other}: --vms N --nodes N --interval SECONDS --steady SECONDS"
            ),
        }
    }
    Ok(a)
}

fn main() -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    if std::env::var(ROLE).as_deref() == Ok("operator") {
        return runtime.block_on(operator());
    }
    runtime.block_on(bench(args()?))
}

/// The operator role: connect to the server, run until killed.
async fn operator() -> Result<()> {
    lifeboat_operator::install_crypto_provider();
    let url = std::env::var(SERVER).context("no server URL")?;
    let mut config = kube::Config::new(url.parse()?);
    config.default_namespace = NS.into();
    let client = Client::try_from(config)?;
    let operator = lifeboat_operator::Operator::new(
        client,
        lifeboat_operator::Config {
            namespace: Some(NS.into()),
            lease_namespace: NS.into(),
            leader_election: false,
            ..lifeboat_operator::Config::default()
        },
    );
    operator.run(futures::future::pending()).await?;
    Ok(())
}

/// RSS now and at its peak (kB), and CPU seconds so far, of process `pid`.
fn usage(pid: u32) -> Result<(u64, u64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb = |key: &str| {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) start at field 3.
    let after = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .unwrap_or_default();
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // NB: utime and stime are fields 14 and 15, in USER_HZ (100 on Linux).
    let cpu = (ticks(11) + ticks(12)) as f64 / 100.0;
    Ok((kb("VmRSS:"), kb("VmHWM:"), cpu))
}

#[derive(Default)]
struct Seen {
    phase: HashMap<String, (ProtectionPhase, Option<i64>)>,
}

async fn bench(a: Args) -> Result<()> {
    let server = TestApiServer::start().await;
    let client = server.client(NS);
    println!(
        "operator_scale: {} VMs on {} nodes, reports every {} s, steady state {} s",
        a.vms, a.nodes, a.interval, a.steady
    );
    let mut child = std::process::Command::new(std::env::current_exe()?)
        .env(ROLE, "operator")
        .env(SERVER, server.url())
        .env("RUST_LOG", "warn")
        .spawn()
        .context("start the operator process")?;
    let pid = child.id();
    let result = run(&a, &server, &client, pid).await;
    // NB: the child by its own pid, nothing broader.
    let _ = child.kill();
    let _ = child.wait();
    result
}

async fn run(a: &Args, server: &TestApiServer, client: &Client, pid: u32) -> Result<()> {
    let policies: Api<ReplicationPolicy> = Api::namespaced(client.clone(), NS);
    let vms: Api<ProtectedVM> = Api::namespaced(client.clone(), NS);
    let leases: Api<Lease> = Api::namespaced(client.clone(), NS);
    let reports = Arc::new(AtomicU64::new(0));

    // The fleet: heartbeats, jobs, and (later) reports.
    let nodes: Vec<String> = (0..a.nodes).map(|i| format!("node-{i:02}")).collect();
    let beat_nodes = nodes.clone();
    let beats = tokio::spawn(async move {
        loop {
            for node in &beat_nodes {
                let name = agent_lease_name(node);
                let body = json!({
                    "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                    "metadata": {"name": name, "labels": {HEARTBEAT_LABEL: HEARTBEAT_LABEL_VALUE}},
                    "spec": {"holderIdentity": node, "leaseDurationSeconds": 40,
                             "renewTime": MicroTime(Timestamp::now())}
                });
                let _ = leases
                    .patch(
                        &name,
                        &PatchParams::apply(AGENT_FIELD_MANAGER).force(),
                        &Patch::Apply(&body),
                    )
                    .await;
            }
            tokio::time::sleep(Duration::from_secs(10)).await;
        }
    });
    let fleet_client = client.clone();
    let fleet_reports = Arc::clone(&reports);
    let fleet = tokio::spawn(async move {
        let jobs: Api<ReplicationJob> = Api::namespaced(fleet_client.clone(), NS);
        let stream = watcher(jobs.clone(), watcher::Config::default()).applied_objects();
        futures::pin_mut!(stream);
        while let Ok(Some(job)) = stream.try_next().await {
            if !is_claimable(&job, &job.spec.node_name) {
                continue;
            }
            let (jobs, client, reports) = (
                jobs.clone(),
                fleet_client.clone(),
                Arc::clone(&fleet_reports),
            );
            tokio::spawn(async move {
                let _ = run_job(&jobs, &client, &job, &reports).await;
            });
        }
    });

    // Protect every VM.
    let started = Instant::now();
    policies
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "apiVersion": "lifeboat.io/v1alpha1", "kind": "ReplicationPolicy",
                "metadata": {"name": "gold"},
                "spec": {"copyFrequency": if a.interval <= 30 { "30s" } else { "5m" },
                         "target": {"local": {"path": "/replicas", "shared": true}}}
            }))?,
        )
        .await?;
    let seen = Arc::new(Mutex::new(Seen::default()));
    let watch_seen = Arc::clone(&seen);
    let vm_watch = tokio::spawn(async move {
        let stream = watcher(vms.clone(), watcher::Config::default()).applied_objects();
        futures::pin_mut!(stream);
        while let Ok(Some(vm)) = stream.try_next().await {
            let status = vm.status.as_ref();
            let entry = (
                status.map(|s| s.phase).unwrap_or_default(),
                status.and_then(|s| s.policy_generation),
            );
            let mut seen = watch_seen.lock().unwrap_or_else(PoisonError::into_inner);
            seen.phase.insert(vm.name_any(), entry);
        }
    });
    let vms: Api<ProtectedVM> = Api::namespaced(client.clone(), NS);
    futures::stream::iter(0..a.vms)
        .map(|i| {
            let vms = vms.clone();
            let node = nodes[i % nodes.len()].clone();
            async move {
                let name = format!("vm-{i:05}");
                let vm: ProtectedVM = serde_json::from_value(json!({
                    "apiVersion": "lifeboat.io/v1alpha1", "kind": "ProtectedVM",
                    "metadata": {"name": name},
                    "spec": {"vmName": name, "nodeName": node,
                             "hypervisor": {"qemu": {"qmpSocket": format!("/run/{name}.qmp")}},
                             "disks": [{"name": "os", "path": format!("/vm/{name}.qcow2"), "blockNode": "os0"}],
                             "policyRef": {"name": "gold"}}
                }))?;
                vms.create(&PostParams::default(), &vm).await?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(32)
        .try_collect::<Vec<()>>()
        .await?;
    let count = |phase: ProtectionPhase, generation: Option<i64>| {
        let seen = seen.lock().unwrap_or_else(PoisonError::into_inner);
        seen.phase
            .values()
            .filter(|(p, g)| *p == phase && generation.is_none_or(|want| *g == Some(want)))
            .count()
    };
    loop {
        let protected = count(ProtectionPhase::Protected, None);
        if protected == a.vms {
            break;
        }
        if started.elapsed() > Duration::from_secs(1800) {
            bail!(
                "only {protected} of {} VMs protected after 30 minutes",
                a.vms
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let setup = started.elapsed();
    println!(
        "protected {} VMs in {:.1} s ({} jobs)",
        a.vms,
        setup.as_secs_f64(),
        server.count("replicationjobs")
    );

    // Steady state: every VM reports once per interval, spread evenly.
    let names: Vec<String> = (0..a.vms).map(|i| format!("vm-{i:05}")).collect();
    let report_client = client.clone();
    let report_count = Arc::clone(&reports);
    let interval = a.interval;
    let reporter = tokio::spawn(async move {
        let gap = Duration::from_secs(interval) / u32::try_from(names.len().max(1)).unwrap_or(1);
        let mut tick = tokio::time::interval(gap);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        let permits = Arc::new(tokio::sync::Semaphore::new(64));
        for name in names.iter().cycle() {
            tick.tick().await;
            let (client, count, name) = (
                report_client.clone(),
                Arc::clone(&report_count),
                name.clone(),
            );
            let Ok(permit) = Arc::clone(&permits).acquire_owned().await else {
                return;
            };
            tokio::spawn(async move {
                if report(&client, &name).await.is_ok() {
                    count.fetch_add(1, Ordering::Relaxed);
                }
                drop(permit);
            });
        }
    });
    // A first full interval to settle, then the measured window.
    tokio::time::sleep(Duration::from_secs(a.interval)).await;
    let (_, _, cpu_before) = usage(pid)?;
    let writes_before = server.writes_by("protectedvms", "status", OPERATOR_FIELD_MANAGER);
    let reports_before = reports.load(Ordering::Relaxed);
    let window = Instant::now();
    let mut peak_rss = 0;
    while window.elapsed() < Duration::from_secs(a.steady) {
        tokio::time::sleep(Duration::from_secs(a.steady.clamp(1, 5))).await;
        peak_rss = peak_rss.max(usage(pid)?.0);
    }
    let seconds = window.elapsed().as_secs_f64();
    let (rss, hwm, cpu_after) = usage(pid)?;
    let writes = server.writes_by("protectedvms", "status", OPERATOR_FIELD_MANAGER) - writes_before;
    let sent = reports.load(Ordering::Relaxed) - reports_before;
    let cycles = seconds / a.interval as f64;
    println!("steady state over {seconds:.0} s ({cycles:.1} cycles):");
    println!(
        "  operator RSS now {:.1} MiB, peak in the window {:.1} MiB, peak since start {:.1} MiB",
        rss as f64 / 1024.0,
        peak_rss as f64 / 1024.0,
        hwm as f64 / 1024.0
    );
    println!(
        "  operator CPU {:.1} s = {:.1} % of one core",
        cpu_after - cpu_before,
        (cpu_after - cpu_before) / seconds * 100.0
    );
    println!(
        "  agent reports {sent} ({:.0}/s); operator status writes {writes} = {:.2} per report, {:.2} per VM per cycle",
        sent as f64 / seconds,
        writes as f64 / sent.max(1) as f64,
        writes as f64 / a.vms as f64 / cycles
    );

    // A policy change, until every VM shows it.
    let changed = Instant::now();
    let policy = policies
        .patch(
            "gold",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"rpoThresholdMinutes": 45}})),
        )
        .await?;
    let generation = policy.metadata.generation;
    loop {
        let shown = count(ProtectionPhase::Protected, generation);
        if shown == a.vms {
            break;
        }
        if changed.elapsed() > Duration::from_secs(600) {
            bail!(
                "only {shown} of {} VMs show the policy change after 10 minutes",
                a.vms
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "  policy change shown by all {} VMs in {:.2} s",
        a.vms,
        changed.elapsed().as_secs_f64()
    );
    let writes = server.writes();
    for (key, n) in writes.iter().filter(|(k, _)| k.manager != "delete") {
        println!(
            "  writes {}/{} by {}: {n}",
            key.plural,
            if key.subresource.is_empty() {
                "-"
            } else {
                &key.subresource
            },
            key.manager
        );
    }
    reporter.abort();
    fleet.abort();
    beats.abort();
    vm_watch.abort();
    Ok(())
}

async fn report(client: &Client, name: &str) -> Result<()> {
    let vms: Api<ProtectedVM> = Api::namespaced(client.clone(), NS);
    let mut object = ProtectedVM::new(
        name,
        serde_json::from_value(json!({
            "vmName": name, "nodeName": "-", "hypervisor": {"hyperv": {}}, "disks": [], "policyRef": {"name": "-"}
        }))?,
    );
    object.metadata.namespace = Some(NS.into());
    let body = agent_report_apply(&object, &healthy_report(Time(Timestamp::now())));
    vms.patch_status(
        name,
        &PatchParams::apply(AGENT_FIELD_MANAGER),
        &Patch::Apply(&body),
    )
    .await?;
    Ok(())
}

async fn run_job(
    jobs: &Api<ReplicationJob>,
    client: &Client,
    job: &ReplicationJob,
    reports: &AtomicU64,
) -> Result<()> {
    let params = PatchParams {
        field_manager: Some(AGENT_FIELD_MANAGER.into()),
        ..PatchParams::default()
    };
    let now = Time(Timestamp::now());
    let Some(claim) = claim_job_patch(job, &format!("{}/fleet", job.spec.node_name), &now) else {
        return Ok(());
    };
    jobs.patch_status(&job.name_any(), &params, &Patch::Merge(&claim))
        .await?;
    if matches!(
        job.spec.job_type,
        JobType::FinalizeProtection | JobType::Resynchronize
    ) {
        report(client, &job.spec.vm_ref.name).await?;
        reports.fetch_add(1, Ordering::Relaxed);
    }
    let done = json!({"status": {"phase": "Succeeded", "completionTime": Time(Timestamp::now()), "progress": {"percent": 100}}});
    jobs.patch_status(&job.name_any(), &params, &Patch::Merge(&done))
        .await?;
    Ok(())
}
