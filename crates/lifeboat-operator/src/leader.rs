//! Leader election over a coordination.k8s.io Lease, so that of several operator replicas
//! only one reconciles. The decision is `lifeboat_core::lease::decide_lease`; this module
//! reads and writes the Lease, every write guarded by the resourceVersion it read.
//!
//! ```text
//!  standby: try every renew period ──(decide: Create/Acquire, write wins)──> leading
//!  leading: renew every renew period ──(no renewal for a whole lease duration)──> lost: exit
//! ```
//!
//! # Caveats
//!
//! A replica that loses the Lease stops (the process exits with an error and is restarted)
//! rather than trying to wind down half-done work: with leases of 15 s and renewals every
//! 5 s, another replica may lead 15 s after the last renewal, and the controllers' work is
//! idempotent, so a reconcile cut short is simply done again by the new leader.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use kube::{Client, ResourceExt};
use lifeboat_api::contract::OPERATOR_FIELD_MANAGER;
use lifeboat_core::Clock;
use lifeboat_core::lease::{LeaseDecision, LeaseState, decide_lease};

use crate::error::{Error, Result};

/// Where this replica stands after one round.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Standing {
    /// It holds the Lease.
    Leading,
    /// Another replica does, until about this time.
    Standby(SystemTime),
}

/// Leader election for one replica.
#[derive(Clone)]
pub struct LeaderElection {
    api: Api<Lease>,
    name: String,
    namespace: String,
    identity: String,
    /// How long a Lease holds without renewal.
    pub lease_duration: Duration,
    /// How often the holder renews (and a standby tries).
    pub renew_period: Duration,
    clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for LeaderElection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaderElection")
            .field("lease", &format!("{}/{}", self.namespace, self.name))
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

fn micro(t: SystemTime) -> MicroTime {
    MicroTime(Timestamp::try_from(t).unwrap_or(Timestamp::UNIX_EPOCH))
}

impl LeaderElection {
    /// Election on Lease `namespace/name` for the replica `identity`.
    pub fn new(
        client: Client,
        namespace: &str,
        name: &str,
        identity: &str,
        clock: Arc<dyn Clock>,
    ) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            name: name.to_owned(),
            namespace: namespace.to_owned(),
            identity: identity.to_owned(),
            lease_duration: Duration::from_secs(15),
            renew_period: Duration::from_secs(5),
            clock,
        }
    }

    fn qualified(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    fn lease_error(&self, action: &'static str) -> impl FnOnce(kube::Error) -> Error + '_ {
        move |source| Error::Lease {
            action,
            name: self.qualified(),
            source,
        }
    }

    fn spec(&self, now: SystemTime, acquired: Option<MicroTime>, transitions: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: i32::try_from(self.lease_duration.as_secs()).ok(),
            acquire_time: acquired.or_else(|| Some(micro(now))),
            renew_time: Some(micro(now)),
            lease_transitions: Some(transitions),
            ..LeaseSpec::default()
        }
    }

    /// One round: create, renew or take over the Lease if this replica may.
    ///
    /// # Errors
    ///
    /// An API error other than losing a race (409), which is a standby.
    pub async fn try_lead(&self) -> Result<Standing> {
        let now = self.clock.now();
        let current = self
            .api
            .get_opt(&self.name)
            .await
            .map_err(self.lease_error("get"))?;
        let state = current
            .as_ref()
            .and_then(|l| l.spec.as_ref())
            .map(|s| LeaseState {
                holder: s.holder_identity.clone(),
                renewed: s
                    .renew_time
                    .as_ref()
                    .or(s.acquire_time.as_ref())
                    .map(|t| SystemTime::from(t.0)),
                duration: Duration::from_secs(
                    u64::try_from(s.lease_duration_seconds.unwrap_or(15)).unwrap_or(15),
                ),
            });
        let state = match (&current, state) {
            (Some(_), None) => Some(LeaseState {
                holder: None,
                renewed: None,
                duration: self.lease_duration,
            }),
            (_, state) => state,
        };
        let lost_race = |e: &kube::Error| matches!(e, kube::Error::Api(s) if s.is_conflict() || s.is_already_exists());
        let params = PostParams {
            field_manager: Some(OPERATOR_FIELD_MANAGER.into()),
            ..PostParams::default()
        };
        let standby = Standing::Standby(now + self.renew_period);
        match decide_lease(state.as_ref(), &self.identity, now) {
            LeaseDecision::WaitUntil(until) => Ok(Standing::Standby(until)),
            LeaseDecision::Create => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.name.clone()),
                        namespace: Some(self.namespace.clone()),
                        ..ObjectMeta::default()
                    },
                    spec: Some(self.spec(now, None, 0)),
                };
                match self.api.create(&params, &lease).await {
                    Ok(_) => Ok(Standing::Leading),
                    Err(e) if lost_race(&e) => Ok(standby),
                    Err(e) => Err(self.lease_error("create")(e)),
                }
            }
            decision @ (LeaseDecision::Renew | LeaseDecision::Acquire) => {
                let Some(mut lease) = current else {
                    return Ok(standby);
                };
                let old = lease.spec.clone().unwrap_or_default();
                lease.spec = Some(if decision == LeaseDecision::Renew {
                    self.spec(now, old.acquire_time, old.lease_transitions.unwrap_or(0))
                } else {
                    self.spec(now, None, old.lease_transitions.unwrap_or(0) + 1)
                });
                // NB: replace carries the resourceVersion read above: of two replicas taking
                // over the same expired Lease, the API server lets one through.
                match self.api.replace(&lease.name_any(), &params, &lease).await {
                    Ok(_) => Ok(Standing::Leading),
                    Err(e) if lost_race(&e) => Ok(standby),
                    Err(e) => Err(self.lease_error("update")(e)),
                }
            }
        }
    }

    /// Wait until this replica leads.
    pub async fn acquire(&self) {
        loop {
            let wait = match self.try_lead().await {
                Ok(Standing::Leading) => {
                    tracing::info!(lease = %self.qualified(), identity = %self.identity, "leading");
                    return;
                }
                Ok(Standing::Standby(until)) => until
                    .duration_since(self.clock.now())
                    .unwrap_or_default()
                    .clamp(Duration::from_millis(200), self.renew_period),
                Err(error) => {
                    tracing::warn!(error = %error.report(), "leader election");
                    self.renew_period
                }
            };
            tokio::time::sleep(wait).await;
        }
    }

    /// Renew the Lease for as long as possible; returns when leadership is lost.
    pub async fn keep(&self) -> Error {
        let mut renewed = self.clock.now();
        loop {
            tokio::time::sleep(self.renew_period).await;
            match self.try_lead().await {
                Ok(Standing::Leading) => renewed = self.clock.now(),
                Ok(Standing::Standby(_)) => {
                    return Error::LeadershipLost {
                        name: self.qualified(),
                        seconds: self
                            .clock
                            .now()
                            .duration_since(renewed)
                            .unwrap_or_default()
                            .as_secs(),
                    };
                }
                Err(error) => {
                    let since = self.clock.now().duration_since(renewed).unwrap_or_default();
                    tracing::warn!(error = %error.report(), "could not renew the leader Lease");
                    if since >= self.lease_duration {
                        return Error::LeadershipLost {
                            name: self.qualified(),
                            seconds: since.as_secs(),
                        };
                    }
                }
            }
        }
    }
}
