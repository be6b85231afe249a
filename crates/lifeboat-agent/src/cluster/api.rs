//! Every call the agent makes to the API server, in one place, so that the RBAC rules and
//! the tests can be read off it. Bodies come from `lifeboat_api::contract` where the contract
//! fixes them.
//!
//! | call | verb | resource |
//! |---|---|---|
//! | [`NodeApi::claim_job`] | patch (merge, resourceVersion-guarded) | `replicationjobs/status` |
//! | [`NodeApi::write_job_status`] | patch (merge) | `replicationjobs/status` |
//! | [`NodeApi::apply_report`] | patch (server-side apply, forced) | `protectedvms/status` |
//! | [`NodeApi::secrets_for`] | get | `secrets` (only those a policy names) |
//! | [`Heartbeat::beat`] | get, create, update | `leases` (coordination.k8s.io) |
//!
//! All writes carry the agent's field manager, `lifeboat-agent`.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use lifeboat_api::common::SecretKeyReference;
use lifeboat_api::contract::{
    AGENT_FIELD_MANAGER, HEARTBEAT_LABEL, HEARTBEAT_LABEL_VALUE, agent_lease_name,
    agent_report_apply, claim_job_patch,
};
use lifeboat_api::job::ReplicationJobStatus;
use lifeboat_api::policy::ReplicaTarget;
use lifeboat_api::protected_vm::AgentReport;
use lifeboat_api::{ProtectedVM, ReplicationJob};
use lifeboat_control::mapping::api_time;
use serde_json::json;

use super::error::{ClusterError, api_error_is_recoverable, is_conflict, is_not_found};
use crate::stores::SecretSource;

/// How a claim ended.
#[derive(Clone, Debug, PartialEq)]
pub enum Claim {
    /// This agent holds the job now (the job as the API server returned it).
    Won(Box<ReplicationJob>),
    /// Another agent claimed it first, or the job changed since it was read (409 Conflict).
    Lost,
}

/// The agent's calls on ReplicationJobs, ProtectedVMs and Secrets.
#[derive(Clone)]
pub struct NodeApi {
    client: Client,
}

impl std::fmt::Debug for NodeApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeApi").finish_non_exhaustive()
    }
}

fn qualified<K: ResourceExt>(obj: &K) -> String {
    format!("{}/{}", obj.namespace().unwrap_or_default(), obj.name_any())
}

fn merge_params() -> PatchParams {
    PatchParams {
        field_manager: Some(AGENT_FIELD_MANAGER.into()),
        ..PatchParams::default()
    }
}

impl NodeApi {
    /// Calls over `client`.
    pub fn new(client: Client) -> Self {
        Self { client }
    }

    fn jobs(&self, namespace: &str) -> Api<ReplicationJob> {
        Api::namespaced(self.client.clone(), namespace)
    }

    /// The ProtectedVM `namespace/name` (for a job sent here for a VM of another node).
    ///
    /// # Errors
    ///
    /// `GetVm` for any API error.
    pub async fn get_vm(&self, namespace: &str, name: &str) -> Result<ProtectedVM, ClusterError> {
        Api::<ProtectedVM>::namespaced(self.client.clone(), namespace)
            .get(name)
            .await
            .map_err(|source| ClusterError::GetVm {
                vm: format!("{namespace}/{name}"),
                source,
            })
    }

    /// Claim `job` for `claimer` (`node/pod`) at `now`, with the contract's merge patch on the
    /// status subresource, guarded by the resourceVersion the agent saw.
    ///
    /// # Guarantees
    ///
    /// Of two agents racing for the same version of a job, the API server lets exactly one
    /// through; the other gets [`Claim::Lost`].
    ///
    /// # Errors
    ///
    /// `ClaimJob` for any API error but a conflict.
    pub async fn claim_job(
        &self,
        job: &ReplicationJob,
        claimer: &str,
        now: SystemTime,
    ) -> Result<Claim, ClusterError> {
        let namespace = job.namespace().unwrap_or_default();
        // NB: a job without a resourceVersion was never read from an API server; claiming it
        // unguarded could run it twice, so it counts as lost.
        let Some(patch) = claim_job_patch(job, claimer, &api_time(now)) else {
            return Ok(Claim::Lost);
        };
        match self
            .jobs(&namespace)
            .patch_status(&job.name_any(), &merge_params(), &Patch::Merge(&patch))
            .await
        {
            Ok(claimed) => Ok(Claim::Won(Box::new(claimed))),
            Err(e) if is_conflict(&e) || is_not_found(&e) => Ok(Claim::Lost),
            Err(source) => Err(ClusterError::ClaimJob {
                job: qualified(job),
                source,
            }),
        }
    }

    /// Write `status` as the status of the job `namespace/name` (a merge patch of the status
    /// subresource). With `guard`, only over that resourceVersion.
    ///
    /// # Errors
    ///
    /// `WriteJobStatus` for any API error (a 404 says the job was deleted; a 409, with a
    /// guard, that it changed).
    pub async fn write_job_status(
        &self,
        namespace: &str,
        name: &str,
        status: &ReplicationJobStatus,
        guard: Option<&str>,
    ) -> Result<ReplicationJob, ClusterError> {
        let body = match guard {
            Some(version) => {
                json!({ "metadata": { "resourceVersion": version }, "status": status })
            }
            None => json!({ "status": status }),
        };
        self.jobs(namespace)
            .patch_status(name, &merge_params(), &Patch::Merge(&body))
            .await
            .map_err(|source| ClusterError::WriteJobStatus {
                job: format!("{namespace}/{name}"),
                source,
            })
    }

    /// Apply `report` as `status.agent` of `vm` by server-side apply under the agent's field
    /// manager.
    ///
    /// NB: forced: the agent is the only writer of `status.agent` by contract, so a conflict
    /// there can only be a stale owner (an older agent's manager name) to take over from.
    ///
    /// # Errors
    ///
    /// `ApplyReport` for any API error.
    pub async fn apply_report(
        &self,
        vm: &ProtectedVM,
        report: &AgentReport,
    ) -> Result<(), ClusterError> {
        let namespace = vm.namespace().unwrap_or_default();
        let api: Api<ProtectedVM> = Api::namespaced(self.client.clone(), &namespace);
        api.patch_status(
            &vm.name_any(),
            &PatchParams::apply(AGENT_FIELD_MANAGER).force(),
            &Patch::Apply(agent_report_apply(vm, report)),
        )
        .await
        .map(|_| ())
        .map_err(|source| ClusterError::ApplyReport {
            vm: qualified(vm),
            source,
        })
    }

    /// The credentials Secrets that `target` names, read from `namespace`.
    ///
    /// A Secret that does not exist or cannot be read is not an error here: the store that
    /// needs it fails to open with a message naming it (and an administrator must act).
    ///
    /// # Errors
    ///
    /// `ReadSecret` when the API server could not answer (try again later).
    pub async fn secrets_for(
        &self,
        namespace: &str,
        target: &ReplicaTarget,
    ) -> Result<FetchedSecrets, ClusterError> {
        let mut fetched = FetchedSecrets::default();
        let Some(azure) = &target.azure_blob else {
            return Ok(fetched);
        };
        let references = [
            azure.credentials.account_key_secret_ref.as_ref(),
            azure.credentials.sas_secret_ref.as_ref(),
        ];
        let api: Api<Secret> = Api::namespaced(self.client.clone(), namespace);
        for reference in references.into_iter().flatten() {
            let qualified = format!("{namespace}/{}", reference.name);
            let value = match api.get_opt(&reference.name).await {
                Ok(Some(secret)) => secret_key(&secret, reference)
                    .ok_or_else(|| format!("Secret {qualified} has no key {:?}", reference.key)),
                Ok(None) => Err(format!("Secret {qualified} not found")),
                Err(source) if api_error_is_recoverable(&source) => {
                    return Err(ClusterError::ReadSecret {
                        secret: qualified,
                        source,
                    });
                }
                Err(source) => Err(format!(
                    "Secret {qualified} cannot be read by the agent: {source}"
                )),
            };
            fetched
                .values
                .insert((reference.name.clone(), reference.key.clone()), value);
        }
        Ok(fetched)
    }
}

fn secret_key(secret: &Secret, reference: &SecretKeyReference) -> Option<String> {
    if let Some(bytes) = secret.data.as_ref().and_then(|d| d.get(&reference.key)) {
        return String::from_utf8(bytes.0.clone())
            .ok()
            .map(|s| s.trim_end().to_owned());
    }
    secret
        .string_data
        .as_ref()
        .and_then(|d| d.get(&reference.key))
        .map(|s| s.trim_end().to_owned())
}

/// Secret values read ahead of opening a store (the store is opened synchronously; reading a
/// Secret is not). Its `Debug` shows the keys, never a value.
#[derive(Default)]
pub struct FetchedSecrets {
    values: BTreeMap<(String, String), Result<String, String>>,
}

impl std::fmt::Debug for FetchedSecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FetchedSecrets")
            .field("keys", &self.values.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl SecretSource for FetchedSecrets {
    fn secret_value(
        &self,
        namespace: &str,
        reference: &SecretKeyReference,
    ) -> Result<String, String> {
        self.values
            .get(&(reference.name.clone(), reference.key.clone()))
            .cloned()
            .unwrap_or_else(|| {
                Err(format!(
                    "Secret {namespace}/{} was not read by the agent",
                    reference.name
                ))
            })
    }
}

fn micro(t: SystemTime) -> MicroTime {
    MicroTime(Timestamp::try_from(t).unwrap_or(Timestamp::UNIX_EPOCH))
}

/// The agent's heartbeat: the Lease `lifeboat-agent-<node>` in the operator's namespace,
/// created once and renewed every beat. The operator reads its renew time as the agent's
/// sign of life (a VM's health turns `AgentQuiet`, then `AgentLost`, without it).
pub struct Heartbeat {
    api: Api<Lease>,
    namespace: String,
    name: String,
    node: String,
    /// How long the Lease says it holds (informational: the operator judges by copy
    /// intervals).
    pub lease_duration: Duration,
    lease: Option<Lease>,
}

impl std::fmt::Debug for Heartbeat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Heartbeat")
            .field("lease", &format!("{}/{}", self.namespace, self.name))
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

impl Heartbeat {
    /// The heartbeat of the agent on `node`, in `namespace`.
    pub fn new(client: Client, namespace: &str, node: &str) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            namespace: namespace.to_owned(),
            name: agent_lease_name(node),
            node: node.to_owned(),
            lease_duration: Duration::from_secs(40),
            lease: None,
        }
    }

    fn error(&self, action: &'static str) -> impl FnOnce(kube::Error) -> ClusterError + '_ {
        move |source| ClusterError::RenewLease {
            action,
            lease: format!("{}/{}", self.namespace, self.name),
            source,
        }
    }

    fn stamp(&self, lease: &mut Lease, now: SystemTime) {
        // NB: left out, the server keeps the managed fields as they are.
        lease.metadata.managed_fields = None;
        lease
            .labels_mut()
            .insert(HEARTBEAT_LABEL.into(), HEARTBEAT_LABEL_VALUE.into());
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        if spec.holder_identity.as_deref() != Some(self.node.as_str()) {
            spec.holder_identity = Some(self.node.clone());
            spec.acquire_time = Some(micro(now));
        }
        spec.acquire_time.get_or_insert_with(|| micro(now));
        spec.renew_time = Some(micro(now));
        spec.lease_duration_seconds = i32::try_from(self.lease_duration.as_secs()).ok();
    }

    /// One beat at `now`: create the Lease if it does not exist, renew it otherwise.
    ///
    /// NB: the renewal is an update carrying the resourceVersion of the Lease this agent last
    /// wrote, so the agent needs only get, create and update on Leases; when someone else
    /// changed the Lease (409) or deleted it (404), the next beat reads it again.
    ///
    /// # Errors
    ///
    /// `RenewLease` naming the step (get, create, update) that failed.
    pub async fn beat(&mut self, now: SystemTime) -> Result<(), ClusterError> {
        let current = match self.lease.take() {
            Some(lease) => Some(lease),
            None => self
                .api
                .get_opt(&self.name)
                .await
                .map_err(self.error("get"))?,
        };
        let params = PostParams {
            field_manager: Some(AGENT_FIELD_MANAGER.into()),
            ..PostParams::default()
        };
        match current {
            None => {
                let mut lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.name.clone()),
                        namespace: Some(self.namespace.clone()),
                        ..ObjectMeta::default()
                    },
                    spec: None,
                };
                self.stamp(&mut lease, now);
                let created = self
                    .api
                    .create(&params, &lease)
                    .await
                    .map_err(self.error("create"))?;
                self.lease = Some(created);
            }
            Some(mut lease) => {
                self.stamp(&mut lease, now);
                let renewed = self
                    .api
                    .replace(&self.name, &params, &lease)
                    .await
                    .map_err(self.error("update"))?;
                self.lease = Some(renewed);
            }
        }
        Ok(())
    }
}
