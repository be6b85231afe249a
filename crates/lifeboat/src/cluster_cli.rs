//! The operator's everyday tools against a cluster: the same commands as in standalone mode,
//! acting through the resources. A request is a new token in the VM's `spec.requests` (a
//! merge patch, exactly what a GitOps change would do); the tool then waits until
//! `status.handledRequests` echoes it, showing the job's progress.

use anyhow::{Context, Result};
use k8s_openapi::api::apps::v1::Deployment;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use std::path::Path;

use lifeboat_api::plan::{PlanRequests, RecoveryPlan};
use lifeboat_api::{ProtectedVM, ReplicationJob};
use lifeboat_operator::plan::ApiResources;
use lifeboat_standalone::cli::plan::{self as cli_plan, PlanAsk, PlanSource};
use lifeboat_standalone::cli::{self, Action};

use crate::exit::Exit;

/// The labels of the chart's operator Deployment (charts/lifeboat/templates/_helpers.tpl):
/// `part-of` is `lifeboat` whatever `nameOverride` says, `component` names the role.
pub const OPERATOR_SELECTOR: &str =
    "app.kubernetes.io/part-of=lifeboat,app.kubernetes.io/component=operator";

/// The cluster's resources, through a kubeconfig context (or in-cluster config).
pub struct Cluster {
    client: Client,
    /// The context's namespace (`default` when it has none; the pod's, in a cluster).
    pub namespace: String,
}

impl Cluster {
    /// Connect with `kubeconfig` (else KUBECONFIG, ~/.kube/config, or in-cluster config) and
    /// its `context` (else the current one).
    ///
    /// # Errors
    ///
    /// No usable configuration ([`crate::exit::API`]).
    pub async fn connect(kubeconfig: Option<&Path>, context: Option<&str>) -> Result<Cluster> {
        lifeboat_operator::install_crypto_provider();
        let options = KubeConfigOptions {
            context: context.map(str::to_owned),
            ..KubeConfigOptions::default()
        };
        let config = match kubeconfig {
            Some(path) => {
                let file = Kubeconfig::read_from(path)
                    .map_err(|e| Exit::api(format!("read {}: {e}", path.display())))?;
                Config::from_custom_kubeconfig(file, &options)
                    .await
                    .map_err(|e| Exit::api(format!("kubeconfig {}: {e}", path.display())))?
            }
            None if context.is_some() => Config::from_kubeconfig(&options)
                .await
                .map_err(|e| Exit::api(format!("kubeconfig: {e}")))?,
            None => Config::infer().await.map_err(|e| {
                Exit::api(format!(
                    "no cluster configuration (KUBECONFIG, ~/.kube/config or in-cluster): {e}"
                ))
            })?,
        };
        let namespace = config.default_namespace.clone();
        let client = Client::try_from(config)
            .map_err(|e| Exit::api(format!("a client for the cluster: {e}")))?;
        Ok(Cluster { client, namespace })
    }

    /// The ReplicationPolicy `namespace/name`, if it exists.
    ///
    /// # Errors
    ///
    /// The get call failed.
    pub async fn policy(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<Option<lifeboat_api::ReplicationPolicy>> {
        Api::<lifeboat_api::ReplicationPolicy>::namespaced(self.client.clone(), namespace)
            .get_opt(name)
            .await
            .map_err(|e| Exit::api(format!("get ReplicationPolicy {namespace}/{name}: {e}")))
    }

    /// The recovery plans of `namespace`, by name.
    ///
    /// # Errors
    ///
    /// The API server refused the list.
    pub async fn plans(&self, namespace: &str) -> Result<Vec<RecoveryPlan>> {
        let api: Api<RecoveryPlan> = Api::namespaced(self.client.clone(), namespace);
        let mut plans = api
            .list(&ListParams::default())
            .await
            .context("list RecoveryPlans")?
            .items;
        plans.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
        Ok(plans)
    }

    /// Ask `ask` of a plan: its `spec.requests` field set with a fresh token (checked first,
    /// as standalone does); returns the token.
    ///
    /// # Errors
    ///
    /// The plan cannot be read or patched, or cannot be asked that now.
    pub async fn plan_request(&self, namespace: &str, name: &str, ask: &PlanAsk) -> Result<String> {
        let plan = PlanSource::plan(self, namespace, name)
            .await
            .map_err(anyhow::Error::msg)?;
        cli_plan::check(&plan, ask).map_err(anyhow::Error::msg)?;
        let token = cli::new_token();
        let mut requests = PlanRequests::default();
        cli_plan::apply(&mut requests, ask, &token);
        let patch = serde_json::json!({ "spec": { "requests": requests } });
        let api: Api<RecoveryPlan> = Api::namespaced(self.client.clone(), namespace);
        api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .with_context(|| format!("set spec.requests of RecoveryPlan {namespace}/{name}"))?;
        Ok(token)
    }

    /// The ProtectedVMs of `namespace`, or of every namespace, by namespace and name.
    ///
    /// # Errors
    ///
    /// The list call failed.
    pub async fn vms(&self, namespace: Option<&str>) -> Result<Vec<ProtectedVM>> {
        let api: Api<ProtectedVM> = match namespace {
            Some(ns) => Api::namespaced(self.client.clone(), ns),
            None => Api::all(self.client.clone()),
        };
        let mut vms = api
            .list(&ListParams::default())
            .await
            .context("list ProtectedVMs")?
            .items;
        vms.sort_by(|a, b| {
            (&a.metadata.namespace, &a.metadata.name)
                .cmp(&(&b.metadata.namespace, &b.metadata.name))
        });
        Ok(vms)
    }

    /// The ReplicationJobs of `namespace`, or of every namespace.
    ///
    /// # Errors
    ///
    /// The list call failed.
    pub async fn jobs(&self, namespace: Option<&str>) -> Result<Vec<ReplicationJob>> {
        let api: Api<ReplicationJob> = match namespace {
            Some(ns) => Api::namespaced(self.client.clone(), ns),
            None => Api::all(self.client.clone()),
        };
        Ok(api
            .list(&ListParams::default())
            .await
            .context("list ReplicationJobs")?
            .items)
    }

    /// Ask for `action` on a VM by a new request token in its spec; returns the token.
    ///
    /// # Errors
    ///
    /// The patch was refused (RBAC, validation, a missing VM).
    pub async fn request(&self, namespace: &str, name: &str, action: &Action) -> Result<String> {
        let api: Api<ProtectedVM> = Api::namespaced(self.client.clone(), namespace);
        if matches!(action, Action::Reprotect | Action::Failback { .. }) {
            let vm = api
                .get(name)
                .await
                .with_context(|| format!("read ProtectedVM {namespace}/{name}"))?;
            cli::check_action(&vm, action).map_err(anyhow::Error::msg)?;
        }
        lifeboat_operator::plan::ask_vm(&self.client, namespace, name, action)
            .await
            .with_context(|| format!("set spec.requests of ProtectedVM {namespace}/{name}"))
    }

    /// The operator's version: the `app.kubernetes.io/version` label of the chart's operator
    /// Deployment, with where it was found (`namespace/name`).
    ///
    /// # Errors
    ///
    /// No such Deployment is visible, or the API server refused the list (the reason).
    pub async fn operator_version(&self) -> Result<(String, String), String> {
        let params = ListParams::default().labels(OPERATOR_SELECTOR);
        let all: Api<Deployment> = Api::all(self.client.clone());
        let found = match all.list_metadata(&params).await {
            Ok(list) => list.items,
            // Without the right to list Deployments cluster-wide: the chart's usual namespace,
            // then the context's.
            Err(all_error) => {
                let mut found = Vec::new();
                for ns in ["lifeboat-system", self.namespace.as_str()] {
                    let api: Api<Deployment> = Api::namespaced(self.client.clone(), ns);
                    if let Ok(list) = api.list_metadata(&params).await {
                        found.extend(list.items);
                    }
                }
                if found.is_empty() {
                    return Err(format!("cannot list Deployments: {all_error}"));
                }
                found
            }
        };
        let Some(deployment) = found.first() else {
            return Err(format!(
                "no Deployment labelled {OPERATOR_SELECTOR} is visible"
            ));
        };
        let labels = deployment.metadata.labels.clone().unwrap_or_default();
        let at = format!(
            "{}/{}",
            deployment.metadata.namespace.clone().unwrap_or_default(),
            deployment.metadata.name.clone().unwrap_or_default()
        );
        match labels.get("app.kubernetes.io/version") {
            Some(version) => Ok((version.clone(), at)),
            None => Err(format!(
                "the Deployment {at} has no app.kubernetes.io/version label"
            )),
        }
    }
}

impl Cluster {
    /// The cluster as the [`cli::Resources`] a request is waited on in.
    pub fn resources(&self) -> ApiResources {
        ApiResources(self.client.clone())
    }
}

#[async_trait::async_trait]
impl PlanSource for Cluster {
    async fn plan(&self, namespace: &str, name: &str) -> Result<RecoveryPlan, String> {
        let api: Api<RecoveryPlan> = Api::namespaced(self.client.clone(), namespace);
        api.get_opt(name)
            .await
            .map_err(|e| format!("get RecoveryPlan {namespace}/{name}: {e}"))?
            .ok_or_else(|| format!("no RecoveryPlan {namespace}/{name}"))
    }
}

/// A VM's recovery points as its status summarises them: what `lifeboat points` shows on a
/// cluster when this machine cannot read the replica store (which has every point).
pub fn points_summary(vm: &ProtectedVM) -> String {
    let points = vm.status.clone().unwrap_or_default().recovery_points;
    let line = |what: &str, p: &Option<lifeboat_api::protected_vm::RecoveryPointRef>| match p {
        Some(p) => format!(
            "{what:<22} {} ({}, {})\n",
            p.name,
            cli::words(&p.consistency),
            p.time.0
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

/// The names of the points a VM's status summarises (latest, latest app-consistent, oldest).
pub fn point_names(vm: &ProtectedVM) -> Vec<String> {
    let points = vm.status.clone().unwrap_or_default().recovery_points;
    let mut names: Vec<String> = [points.oldest, points.latest_app_consistent, points.latest]
        .into_iter()
        .flatten()
        .map(|p| p.name)
        .collect();
    names.sort();
    names.dedup();
    names
}
