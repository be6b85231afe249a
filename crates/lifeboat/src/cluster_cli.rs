//! The operator's everyday tools against a cluster: the same commands as in standalone mode,
//! acting through the resources. A request is a new token in the VM's `spec.requests` (a
//! merge patch, exactly what a GitOps change would do); the tool then waits until
//! `status.handledRequests` echoes it, showing the job's progress.

use anyhow::{Context, Result};
use kube::Client;
use kube::api::{Api, ListParams, Patch, PatchParams};
use std::time::SystemTime;

use lifeboat_api::protected_vm::Requests;
use lifeboat_api::{ProtectedVM, ReplicationJob};
use lifeboat_standalone::cli::{self, Action, Resources};

/// The cluster's resources, through the current kubeconfig context (or in-cluster config).
pub struct Cluster {
    client: Client,
}

impl Cluster {
    /// Connect with the default configuration (KUBECONFIG, ~/.kube/config, or in-cluster).
    ///
    /// # Errors
    ///
    /// No usable configuration, or the API server cannot be reached.
    pub async fn connect() -> Result<Cluster> {
        let client = Client::try_default()
            .await
            .context("connect to the cluster (KUBECONFIG or in-cluster config)")?;
        Ok(Cluster { client })
    }

    /// The ProtectedVMs of `namespace`, or of every namespace.
    ///
    /// # Errors
    ///
    /// The list call failed.
    pub async fn vms(&self, namespace: Option<&str>) -> Result<Vec<ProtectedVM>> {
        let api: Api<ProtectedVM> = match namespace {
            Some(ns) => Api::namespaced(self.client.clone(), ns),
            None => Api::all(self.client.clone()),
        };
        Ok(api
            .list(&ListParams::default())
            .await
            .context("list ProtectedVMs")?
            .items)
    }

    /// Ask for `action` on a VM by a new request token in its spec; returns the token.
    ///
    /// # Errors
    ///
    /// The patch was refused (RBAC, validation, a missing VM).
    pub async fn request(&self, namespace: &str, name: &str, action: &Action) -> Result<String> {
        let token = cli::new_token();
        let mut requests = Requests::default();
        cli::apply_request(&mut requests, action, &token);
        let patch = serde_json::json!({ "spec": { "requests": requests } });
        let api: Api<ProtectedVM> = Api::namespaced(self.client.clone(), namespace);
        api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .with_context(|| format!("set spec.requests of ProtectedVM {namespace}/{name}"))?;
        Ok(token)
    }
}

#[async_trait::async_trait]
impl Resources for Cluster {
    async fn vm(&self, namespace: &str, name: &str) -> Result<Option<ProtectedVM>, String> {
        let api: Api<ProtectedVM> = Api::namespaced(self.client.clone(), namespace);
        api.get_opt(name)
            .await
            .map_err(|e| format!("get ProtectedVM {namespace}/{name}: {e}"))
    }

    async fn job(&self, namespace: &str, name: &str) -> Result<Option<ReplicationJob>, String> {
        let api: Api<ReplicationJob> = Api::namespaced(self.client.clone(), namespace);
        api.get_opt(name)
            .await
            .map_err(|e| format!("get ReplicationJob {namespace}/{name}: {e}"))
    }
}

/// A VM's recovery points as its status summarises them (the full list lives in the replica
/// store, which the cluster's agents reach; `lifeboat points` in standalone mode reads it).
pub fn points_summary(vm: &ProtectedVM) -> String {
    let points = vm.status.clone().unwrap_or_default().recovery_points;
    let line = |what: &str, p: &Option<lifeboat_api::protected_vm::RecoveryPointRef>| match p {
        Some(p) => format!(
            "{what:<22} {} ({:?}, {})\n",
            p.name, p.consistency, p.time.0
        ),
        None => format!("{what:<22} -\n"),
    };
    let mut out = format!("{:<22} {}\n", "points kept", points.count);
    out.push_str(&line("latest", &points.latest));
    out.push_str(&line(
        "latest app-consistent",
        &points.latest_app_consistent,
    ));
    out.push_str(&line("oldest", &points.oldest));
    out
}

/// The status table of the cluster's VMs.
pub fn status_table(vms: &[ProtectedVM]) -> String {
    cli::status_table(vms, SystemTime::now())
}
