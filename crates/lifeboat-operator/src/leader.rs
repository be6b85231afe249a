//! Leader election over a coordination.k8s.io Lease, so that of several operator replicas
//! only one reconciles. The decision is `lifeboat_core::lease::decide_lease`; this module
//! reads and writes the Lease, every write guarded by the resourceVersion it read. The
//! timings and their meaning are client-go's (`leaderelection`): a lease duration (15 s),
//! a renew deadline shorter than it (10 s) and a retry period (2 s).
//!
//! ```text
//!  standby: read every retry period; a foreign record unchanged for a lease duration
//!           since this replica first saw it ──(Acquire, write wins)──> leading
//!  leading: renew every retry period, retrying failures ──(no successful renewal for a
//!           renew deadline, or another holder)──> lost: `keep` returns, controllers stop
//! ```
//!
//! # Guarantees
//!
//! - Expiry is judged from this replica's observation (see `lifeboat_core::lease`), not from
//!   the `renewTime` the holder wrote: clock offsets between replicas do not matter.
//! - A leader gives up when it has not renewed within the renew deadline of the start of its
//!   last successful attempt. A standby can see that renewal no earlier than that start, and
//!   waits a whole lease duration from seeing it: the leader stops `lease_duration -
//!   renew_deadline` (5 s) before anyone else may lead.
//! - Every API call is bounded, by half the renew deadline (as client-go's HTTP timeout,
//!   at least 1 s) and by the time left to the renew deadline: a hung API server cannot hold
//!   the loop, and a leader that cannot reach it reports the loss on time.
//!
//! # Caveats
//!
//! - The 5 s margin absorbs how much faster this replica's clock may run than others' and
//!   how long the controllers take to stop; it does not cover a process frozen (paused VM,
//!   long GC-like stall) for longer than that. Deadlines use the monotonic clock; lease
//!   expiry uses the injected wall `Clock`, which should not be stepped.
//! - A replica that loses the Lease stops (the process exits with an error and is
//!   restarted) rather than trying to wind down half-done work; requests already sent may
//!   still land, which is safe because the controllers' work is idempotent.
//! - A standby that starts, or first sees a record, waits a whole lease duration from then,
//!   however old the record is. There is no jitter on the retry period.
//! - `renew_deadline < lease_duration` and `retry_period < renew_deadline` are the
//!   caller's to keep; [`LeaderElection::set_lease_duration`] keeps them.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use kube::{Client, ResourceExt};
use lifeboat_api::contract::OPERATOR_FIELD_MANAGER;
use lifeboat_core::Clock;
use lifeboat_core::lease::{LeaseDecision, LeaseState, Observed, decide_lease, observe};
use tokio::time::Instant;

use crate::error::{Error, Result};

#[cfg(test)]
mod tests;

/// Where this replica stands after one round.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Standing {
    /// It holds the Lease.
    Leading,
    /// Another replica does, until about this time (this replica's clock).
    Standby(SystemTime),
    /// Another replica wrote the Lease between our read and our write: read it again.
    Contended,
}

/// Leader election for one replica.
#[derive(Clone)]
pub struct LeaderElection {
    api: Api<Lease>,
    name: String,
    namespace: String,
    identity: String,
    /// How long a Lease holds without renewal, judged by those who wait for it.
    pub lease_duration: Duration,
    /// How long the leader goes without a successful renewal before it gives up: shorter
    /// than `lease_duration`.
    pub renew_deadline: Duration,
    /// How often the leader renews, a standby reads, and a failed call is retried.
    pub retry_period: Duration,
    clock: Arc<dyn Clock>,
    /// The Lease record as last read, and when it was first seen.
    observed: Arc<Mutex<Option<Observed>>>,
    /// When the last successful attempt (read and write) began.
    renewed: Arc<Mutex<Option<Instant>>>,
}

impl std::fmt::Debug for LeaderElection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaderElection")
            .field("lease", &format!("{}/{}", self.namespace, self.name))
            .field("identity", &self.identity)
            .field("lease_duration", &self.lease_duration)
            .field("renew_deadline", &self.renew_deadline)
            .field("retry_period", &self.retry_period)
            .finish_non_exhaustive()
    }
}

fn micro(t: SystemTime) -> MicroTime {
    MicroTime(Timestamp::try_from(t).unwrap_or(Timestamp::UNIX_EPOCH))
}

impl LeaderElection {
    /// Election on Lease `namespace/name` for the replica `identity`, with client-go's
    /// timings: lease 15 s, renew deadline 10 s, retry period 2 s.
    pub fn new(
        client: Client,
        namespace: &str,
        name: &str,
        identity: &str,
        clock: Arc<dyn Clock>,
    ) -> Self {
        let mut election = Self {
            api: Api::namespaced(client, namespace),
            name: name.to_owned(),
            namespace: namespace.to_owned(),
            identity: identity.to_owned(),
            lease_duration: Duration::ZERO,
            renew_deadline: Duration::ZERO,
            retry_period: Duration::ZERO,
            clock,
            observed: Arc::default(),
            renewed: Arc::default(),
        };
        election.set_lease_duration(Duration::from_secs(15));
        election
    }

    /// Set the lease duration, and the renew deadline and retry period in client-go's
    /// proportions (15 : 10 : 2).
    pub fn set_lease_duration(&mut self, lease_duration: Duration) {
        self.lease_duration = lease_duration;
        self.renew_deadline = lease_duration * 2 / 3;
        self.retry_period = lease_duration * 2 / 15;
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

    fn last_renewed(&self) -> Option<Instant> {
        *self.renewed.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// One API call, given at most half the renew deadline (at least 1 s, as client-go's
    /// HTTP timeout) and no later than `deadline`.
    async fn call<T>(
        &self,
        action: &'static str,
        deadline: Instant,
        request: impl Future<Output = kube::Result<T>>,
    ) -> Result<kube::Result<T>> {
        let started = Instant::now();
        let limit = deadline.min(started + (self.renew_deadline / 2).max(Duration::from_secs(1)));
        tokio::time::timeout_at(limit, request)
            .await
            .map_err(|_| Error::LeaseTimeout {
                action,
                name: self.qualified(),
                after: limit.saturating_duration_since(started),
            })
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

    /// One round: create, renew or take over the Lease if this replica may, every call
    /// ending by `deadline`. On success, the round's start is the last renewal.
    ///
    /// # Errors
    ///
    /// An API error other than losing a race (409, which is [`Standing::Contended`]), or
    /// no answer in time.
    pub async fn try_lead(&self, deadline: Instant) -> Result<Standing> {
        let started = Instant::now();
        let current = self
            .call("get", deadline, self.api.get_opt(&self.name))
            .await?
            .map_err(self.lease_error("get"))?;
        let now = self.clock.now();
        let state = current.as_ref().map(|lease| match &lease.spec {
            Some(s) => LeaseState {
                holder: s.holder_identity.clone(),
                renewed: s
                    .renew_time
                    .as_ref()
                    .or(s.acquire_time.as_ref())
                    .map(|t| SystemTime::from(t.0)),
                duration: Duration::from_secs(
                    u64::try_from(s.lease_duration_seconds.unwrap_or(15)).unwrap_or(15),
                ),
            },
            None => LeaseState {
                holder: None,
                renewed: None,
                duration: self.lease_duration,
            },
        });
        let seen = {
            let mut observed = self.observed.lock().unwrap_or_else(PoisonError::into_inner);
            *observed = observe(observed.as_ref(), state, now);
            observed.clone()
        };
        let lost_race = |e: &kube::Error| matches!(e, kube::Error::Api(s) if s.is_conflict() || s.is_already_exists());
        let params = PostParams {
            field_manager: Some(OPERATOR_FIELD_MANAGER.into()),
            ..PostParams::default()
        };
        let written = match decide_lease(seen.as_ref(), &self.identity, now) {
            LeaseDecision::WaitUntil(until) => return Ok(Standing::Standby(until)),
            LeaseDecision::Create => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.name.clone()),
                        namespace: Some(self.namespace.clone()),
                        ..ObjectMeta::default()
                    },
                    spec: Some(self.spec(now, None, 0)),
                };
                self.call("create", deadline, self.api.create(&params, &lease))
                    .await?
                    .map_err(|e| (e, "create"))
            }
            decision @ (LeaseDecision::Renew | LeaseDecision::Acquire) => {
                let Some(mut lease) = current else {
                    return Ok(Standing::Contended);
                };
                let old = lease.spec.clone().unwrap_or_default();
                lease.spec = Some(if decision == LeaseDecision::Renew {
                    self.spec(now, old.acquire_time, old.lease_transitions.unwrap_or(0))
                } else {
                    self.spec(now, None, old.lease_transitions.unwrap_or(0) + 1)
                });
                // NB: replace carries the resourceVersion read above: of two replicas taking
                // over the same expired Lease, the API server lets one through.
                let name = lease.name_any();
                self.call("update", deadline, self.api.replace(&name, &params, &lease))
                    .await?
                    .map_err(|e| (e, "update"))
            }
        };
        match written {
            Ok(_) => {
                *self.renewed.lock().unwrap_or_else(PoisonError::into_inner) = Some(started);
                Ok(Standing::Leading)
            }
            Err((e, _)) if lost_race(&e) => Ok(Standing::Contended),
            Err((e, action)) => Err(self.lease_error(action)(e)),
        }
    }

    /// Wait until this replica leads.
    pub async fn acquire(&self) {
        loop {
            let started = Instant::now();
            let wait = match self.try_lead(started + self.renew_deadline).await {
                Ok(Standing::Leading) => {
                    tracing::info!(lease = %self.qualified(), identity = %self.identity, "leading");
                    return;
                }
                Ok(Standing::Standby(until)) => until
                    .duration_since(self.clock.now())
                    .unwrap_or_default()
                    .min(self.retry_period),
                Ok(Standing::Contended) => self.retry_period,
                Err(error) => {
                    tracing::warn!(error = %error.report(), "leader election");
                    self.retry_period
                }
            };
            tokio::time::sleep(wait).await;
        }
    }

    /// Renew the Lease for as long as possible; returns when leadership is lost: another
    /// replica holds the Lease, or no renewal succeeded within the renew deadline.
    pub async fn keep(&self) -> Error {
        let lost = |since: Duration| Error::LeadershipLost {
            name: self.qualified(),
            seconds: since.as_secs(),
        };
        let mut next = Instant::now() + self.retry_period;
        loop {
            let Some(renewed) = self.last_renewed() else {
                return lost(Duration::ZERO);
            };
            let deadline = renewed + self.renew_deadline;
            tokio::time::sleep_until(next.min(deadline)).await;
            let started = Instant::now();
            if started >= deadline {
                return lost(started - renewed);
            }
            match self.try_lead(deadline).await {
                Ok(Standing::Leading) => {}
                Ok(Standing::Standby(_)) => return lost(Instant::now() - renewed),
                Ok(Standing::Contended) => {
                    tracing::debug!(lease = %self.qualified(), "the leader Lease changed under us");
                }
                Err(error) => {
                    tracing::warn!(error = %error.report(), "could not renew the leader Lease");
                }
            }
            next = Instant::now() + self.retry_period;
        }
    }
}
