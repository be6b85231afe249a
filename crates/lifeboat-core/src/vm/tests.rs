//! The VM decision over whole life cycles, with a controllable clock: a small world holds the
//! jobs and the agent's facts, a scripted agent acts on the jobs, and every step feeds the
//! decision's own output back in, as the operator does with status.

use super::*;
use crate::window::WindowSpec;
use proptest::prelude::*;
use std::collections::BTreeMap;

const T0: SystemTime = SystemTime::UNIX_EPOCH;
const MIN: Duration = Duration::from_secs(60);
const INTERVAL: Duration = Duration::from_secs(300);

fn at(secs: u64) -> SystemTime {
    T0 + Duration::from_secs(secs)
}

fn policy() -> PolicySettings {
    PolicySettings {
        generation: Some(1),
        copy_interval: INTERVAL,
        rpo_threshold: Duration::from_secs(1800),
        resync_automatic: true,
        resync_window: None,
        log_threshold_percent: 50,
        initial_replication_start: None,
        blocking_problem: None,
    }
}

fn error(class: ErrorClass, reason: &str) -> ErrorReport {
    ErrorReport {
        class,
        reason: reason.into(),
        message: format!("{reason} happened"),
        retry_count: 0,
        next_retry_time: None,
        first_seen_time: None,
    }
}

/// The API server, the agent and the clock, as far as one VM's decisions see them.
struct World {
    now: SystemTime,
    spec: VmSpec,
    state: VmState,
    policy: Option<PolicySettings>,
    agent: Option<AgentFacts>,
    jobs: BTreeMap<String, JobFacts>,
    kinds: BTreeMap<String, JobKind>,
    heartbeat: Option<SystemTime>,
    /// The recovery nodes and their agents' heartbeats.
    recovery: Vec<(String, Option<SystemTime>)>,
    /// Each job's node: `None` for the VM's own.
    nodes: BTreeMap<String, Option<String>>,
    /// Where the last failover's and test failover's disks are (heartbeats filled in at
    /// each decision).
    failover: Option<Materialised>,
    test_failover: Option<Materialised>,
    /// What the job that ended last materialised, until a decision takes it in.
    result: Option<(JobKind, Option<Materialised>)>,
    finalizer: bool,
    last: Option<VmDecision>,
}

impl World {
    fn new() -> Self {
        Self {
            now: at(1_000_000),
            spec: VmSpec {
                name: "web".into(),
                generation: 1,
                created: at(1_000_000),
                deleting: false,
                protect: true,
                delete_replica: false,
                requests: Requests::default(),
                recovery_site: None,
            },
            state: VmState::default(),
            policy: Some(policy()),
            agent: None,
            jobs: BTreeMap::new(),
            kinds: BTreeMap::new(),
            heartbeat: Some(at(1_000_000)),
            recovery: Vec::new(),
            nodes: BTreeMap::new(),
            failover: None,
            test_failover: None,
            result: None,
            finalizer: true,
            last: None,
        }
    }

    fn observation(&self) -> JobObservation {
        match &self.state.job {
            Some(record) if !record.state.is_finished() => self
                .jobs
                .get(&record.name)
                .cloned()
                .map_or(JobObservation::Missing, JobObservation::Found),
            _ => JobObservation::NotLookedUp,
        }
    }

    fn decide(&self) -> VmDecision {
        let with_beat = |m: &Option<Materialised>| {
            m.clone().map(|m| Materialised {
                heartbeat: self.beat_of(m.node.as_deref()),
                ..m
            })
        };
        let (failover, test_failover) = (with_beat(&self.failover), with_beat(&self.test_failover));
        decide_vm(&VmInput {
            now: self.now,
            spec: &self.spec,
            state: &self.state,
            policy: self.policy.as_ref(),
            agent: self.agent.as_ref(),
            job: &self.observation(),
            heartbeat: self.replicating_beat(),
            primary_heartbeat: self.heartbeat,
            job_heartbeat: self.job_heartbeat(),
            recovery: &self.recovery,
            failover: failover.as_ref(),
            test_failover: test_failover.as_ref(),
        })
    }

    /// The heartbeat of the agent that replicates the VM: in reverse, the recovery site's
    /// node's when it is one of `recovery`, else (and forward) the VM's own.
    fn replicating_beat(&self) -> Option<SystemTime> {
        match &self.spec.recovery_site {
            Some(site) if self.state.reverse && self.recovery.iter().any(|(n, _)| n == site) => {
                self.beat_of(Some(site))
            }
            _ => self.heartbeat,
        }
    }

    /// The heartbeat of the current job's node's agent.
    fn job_heartbeat(&self) -> Option<SystemTime> {
        let record = self.state.job.as_ref()?;
        self.beat_of(self.nodes.get(&record.name).cloned().flatten().as_deref())
    }

    /// The heartbeat of a node's agent: `None` for the VM's own.
    fn beat_of(&self, node: Option<&str>) -> Option<SystemTime> {
        match node {
            None => self.heartbeat,
            Some(node) => self
                .recovery
                .iter()
                .find(|(n, _)| n == node)
                .and_then(|(_, beat)| *beat),
        }
    }

    /// One reconcile: decide, then do what the operator does with the decision.
    fn step(&mut self) -> VmDecision {
        let d = self.decide();
        match (d.results, self.result.take()) {
            (ResultChange::FailoverFromJob | ResultChange::FailbackFromJob, Some((_, disks))) => {
                self.failover = disks
            }
            (ResultChange::TestFailoverFromJob, Some((_, disks))) => self.test_failover = disks,
            (_, kept) => self.result = kept,
        }
        if let Some((name, error)) = &d.fail_job
            && let Some(job) = self.jobs.get_mut(name)
        {
            job.state = JobState::Failed;
            job.error = Some(error.clone());
            job.completion_time = Some(self.now);
        }
        if let Some(job) = &d.create_job {
            assert!(
                self.active_jobs().is_empty()
                    || d.delete_job
                        .as_ref()
                        .is_some_and(|n| self.active_jobs() == [n.clone()]),
                "one job at a time: {:?} while {:?} runs",
                job.name,
                self.active_jobs()
            );
            assert!(!self.jobs.contains_key(&job.name), "names are unique");
            self.jobs.insert(
                job.name.clone(),
                JobFacts {
                    name: job.name.clone(),
                    state: JobState::Pending,
                    copying: false,
                    start_time: None,
                    completion_time: None,
                    error: None,
                    point_time: None,
                },
            );
            self.kinds.insert(job.name.clone(), job.kind);
            self.nodes.insert(job.name.clone(), job.node.clone());
        }
        if let Some(name) = &d.delete_job {
            self.jobs.remove(name);
        }
        if d.release_finalizer {
            self.finalizer = false;
        }
        self.state = d.state.clone();
        self.last = Some(d.clone());
        d
    }

    fn active_jobs(&self) -> Vec<String> {
        self.jobs
            .values()
            .filter(|j| !j.state.is_finished())
            .map(|j| j.name.clone())
            .collect()
    }

    fn current(&self) -> (String, JobKind) {
        let record = self
            .state
            .job
            .as_ref()
            .unwrap_or_else(|| panic!("no current job"));
        (record.name.clone(), record.kind)
    }

    fn phase(&self) -> Phase {
        self.state.phase
    }

    fn condition(&self, type_: &str) -> (crate::ConditionStatus, String) {
        self.state
            .conditions
            .iter()
            .find(|c| c.type_ == type_)
            .map(|c| (c.status, c.reason.clone()))
            .unwrap_or_else(|| panic!("no condition {type_}"))
    }

    fn advance(&mut self, by: Duration) {
        self.now += by;
        self.heartbeat = Some(self.now);
    }

    // ---- the scripted agent ----

    fn claim(&mut self) -> String {
        let (name, _) = self.current();
        let now = self.now;
        let job = self
            .jobs
            .get_mut(&name)
            .unwrap_or_else(|| panic!("{name} missing"));
        assert_eq!(job.state, JobState::Pending);
        job.state = JobState::Running;
        job.start_time = Some(now);
        name
    }

    fn end(&mut self, outcome: Result<(), ErrorReport>) {
        let (name, kind) = self.current();
        let now = self.now;
        let job = self
            .jobs
            .get_mut(&name)
            .unwrap_or_else(|| panic!("{name} missing"));
        if job.state == JobState::Pending {
            job.start_time = Some(now);
        }
        job.completion_time = Some(now);
        match outcome {
            Ok(()) => {
                job.state = JobState::Succeeded;
                let disks = Some(Materialised {
                    node: self.nodes.get(&name).cloned().flatten(),
                    heartbeat: None,
                    point: Some(format!("point-of-{name}")),
                });
                // NB: as the shell does, the results reach status with the decision that
                // took the job's end in (see `step`).
                self.result = Some((kind, disks));
                if matches!(kind, JobKind::FinalizeProtection | JobKind::Resynchronize) {
                    // The first point (or the first after a resync) and a clean report.
                    self.agent = Some(AgentFacts {
                        report_time: Some(now),
                        last_cycle_start: Some(now),
                        last_successful_cycle: Some(now),
                        latest_point: Some(now),
                        cycles_succeeded_last_hour: 12,
                        disks: vec![DiskFacts {
                            name: "os".into(),
                            size_bytes: 100,
                            pending_log_bytes: 0,
                        }],
                        ..AgentFacts::default()
                    });
                }
            }
            Err(e) => {
                job.state = JobState::Failed;
                job.error = Some(e);
            }
        }
    }

    /// The current job claimed, run and succeeded: the decision that took its end in.
    fn run_current_job(&mut self) -> VmDecision {
        self.claim();
        self.step();
        self.end(Ok(()));
        self.step()
    }

    fn cycle(&mut self) {
        let now = self.now;
        let agent = self.agent.get_or_insert_with(AgentFacts::default);
        agent.report_time = Some(now);
        agent.last_cycle_start = Some(now);
        agent.last_successful_cycle = Some(now);
        agent.latest_point = Some(now);
        agent.last_error = None;
    }

    /// Failed over (planned, `f1`) and re-protected (`r1`) from node-b: protected in reverse.
    fn protected_in_reverse() -> Self {
        let mut w = Self::protected();
        w.spec.recovery_site = Some("node-b".into());
        w.spec.requests.failover = planned("f1");
        w.step();
        w.run_current_job();
        w.spec.requests.reprotect = Some("r1".into());
        w.step();
        w.run_current_job();
        w
    }

    fn protected() -> Self {
        let mut w = Self::new();
        w.step();
        w.run_current_job(); // enable -> finalize created
        w.run_current_job(); // finalize -> protected
        assert_eq!(w.phase(), Phase::Protected);
        w
    }

    fn notices(&self) -> Vec<&'static str> {
        self.last
            .as_ref()
            .map_or(vec![], |d| d.notices.iter().map(|n| n.reason).collect())
    }
}

#[test]
fn the_whole_life_cycle() {
    let mut w = World::new();
    let d = w.step();
    assert_eq!(w.phase(), Phase::EnablingProtection);
    assert_eq!(
        d.create_job.as_ref().map(|j| j.name.as_str()),
        Some("web-enable-1")
    );
    assert_eq!(w.notices(), ["JobCreated"]);
    assert_eq!(
        w.condition("Protected"),
        (crate::ConditionStatus::False, "EnablingProtection".into())
    );

    w.claim();
    w.step();
    assert_eq!(w.notices(), ["JobStarted"]);
    if let Some(j) = w.jobs.get_mut("web-enable-1") {
        j.copying = true;
    }
    w.step();
    assert_eq!(w.phase(), Phase::InitialReplication);
    w.end(Ok(()));
    let d = w.step();
    assert_eq!(w.notices(), ["JobSucceeded", "JobCreated"]);
    assert_eq!(
        d.create_job.map(|j| j.kind),
        Some(JobKind::FinalizeProtection)
    );
    assert_eq!(w.phase(), Phase::FinalizingProtection);
    assert_eq!(
        d.finished_job.map(|f| f.kind),
        Some(JobKind::EnableProtection)
    );

    w.run_current_job();
    assert_eq!(w.phase(), Phase::Protected);
    assert_eq!(w.condition("Protected").0, crate::ConditionStatus::True);
    assert_eq!(
        w.condition("InitialReplicationComplete").0,
        crate::ConditionStatus::True
    );
    assert_eq!(
        w.condition("Replicating"),
        (crate::ConditionStatus::True, "DeltaReplication".into())
    );
    assert_eq!(w.state.health, Some(Health::Normal));
    assert_eq!(w.state.rpo, Some(Duration::ZERO));
    assert_eq!(w.state.next_cycle, Some(w.now + INTERVAL));

    // Test failover, then its cleanup.
    w.spec.requests.test_failover = Some(TestFailoverAsk {
        token: "t1".into(),
        point: PointChoice::LatestAppConsistent,
    });
    let d = w.step();
    let job = d
        .create_job
        .unwrap_or_else(|| panic!("no test failover job"));
    assert_eq!(job.params.point, Some(PointChoice::LatestAppConsistent));
    assert_eq!(job.params.request_token.as_deref(), Some("t1"));
    assert_eq!(
        w.state.handled.test_failover, None,
        "not handled before it ran"
    );
    assert_eq!(
        w.condition("TestFailoverSucceeded").1,
        "TestFailoverInProgress"
    );
    w.run_current_job();
    assert_eq!(w.state.handled.test_failover.as_deref(), Some("t1"));
    assert_eq!(
        w.last.as_ref().map(|d| d.results),
        Some(ResultChange::TestFailoverFromJob)
    );
    assert_eq!(
        w.condition("TestFailoverSucceeded").0,
        crate::ConditionStatus::True
    );
    w.spec.requests.cleanup_test_failover = Some("c1".into());
    w.step();
    w.run_current_job();
    assert_eq!(w.state.handled.cleanup_test_failover.as_deref(), Some("c1"));
    assert_eq!(
        w.condition("TestFailoverSucceeded"),
        (crate::ConditionStatus::False, "CleanedUp".into())
    );
    assert!(!w.state.test_failover_exists);

    // Planned failover, then commit.
    w.spec.requests.failover = planned("f1");
    let d = w.step();
    assert_eq!(
        d.create_job.map(|j| j.params.failover),
        Some(Some(FailoverKind::Planned))
    );
    assert_eq!(w.phase(), Phase::FailingOver);
    w.run_current_job();
    assert_eq!(w.phase(), Phase::FailedOver);
    assert_eq!(w.condition("FailedOver").0, crate::ConditionStatus::True);
    assert_eq!(w.condition("Replicating").1, "FailedOver");
    w.spec.requests.commit = Some("k1".into());
    w.step();
    w.run_current_job();
    assert_eq!(w.phase(), Phase::FailoverCommitted);
    assert_eq!(w.state.handled.commit.as_deref(), Some("k1"));

    // Delete: disable protection, then let the finalizer go.
    w.spec.deleting = true;
    let d = w.step();
    assert_eq!(
        d.create_job.map(|j| j.kind),
        Some(JobKind::DisableProtection)
    );
    assert!(w.finalizer);
    w.run_current_job();
    assert_eq!(w.phase(), Phase::Disabled);
    assert!(!w.finalizer);
}

#[test]
fn failover_reprotect_failback_reprotect_is_one_cycle_of_jobs_and_tokens() {
    let mut w = World::protected();
    w.spec.requests.reprotect = Some("r0".into());
    w.step();
    assert_eq!(w.state.handled.reprotect.as_deref(), Some("r0"));
    assert!(w.notices().contains(&reasons::REQUEST_REJECTED));
    assert!(w.state.job.as_ref().is_some_and(|j| j.state.is_finished()));

    // Fail over (planned), then re-protect: refused until the recovery site is named.
    w.spec.requests.failover = planned("f1");
    w.step();
    w.run_current_job();
    assert_eq!(w.phase(), Phase::FailedOver);
    let p = w
        .failover
        .as_ref()
        .and_then(|f| f.point.clone())
        .expect("present");
    w.spec.requests.reprotect = Some("r1".into());
    w.step();
    assert_eq!(w.state.handled.reprotect.as_deref(), Some("r1"));
    assert_eq!(w.phase(), Phase::FailedOver);
    w.spec.recovery_site = Some("node-b".into());
    w.spec.requests.reprotect = Some("r2".into());
    let d = w.step();
    let job = d.create_job.expect("present");
    assert_eq!(job.kind, JobKind::Reprotect);
    assert_eq!(
        job.node.as_deref(),
        Some("node-b"),
        "the recovered VM's node"
    );
    assert_eq!(job.params.point, Some(PointChoice::Named(p)));
    assert_eq!(w.phase(), Phase::Reprotecting);
    assert!(w.state.reverse);
    w.run_current_job();
    assert_eq!(w.phase(), Phase::Protected);
    assert_eq!(w.state.handled.reprotect.as_deref(), Some("r2"));
    assert!(w.state.reverse);

    // Replicating in reverse: the VM's jobs go to the recovery site's node.
    w.spec.requests.resync = Some("s1".into());
    let d = w.step();
    assert_eq!(d.create_job.and_then(|j| j.node).as_deref(), Some("node-b"));
    w.run_current_job();
    assert_eq!(w.phase(), Phase::Protected);

    // Fail back: a fresh point of the running recovered VM, the original disks at the primary
    // brought to it while the VM runs, then stop and ship at the recovery site, then the last
    // changes onto the original disks.
    w.spec.requests.failover = planned("f2");
    let d = w.step();
    let job = d.create_job.expect("present");
    assert_eq!(
        (job.kind, job.params.to_primary, job.params.presync),
        (JobKind::Failover, true, true)
    );
    assert_eq!(job.node.as_deref(), Some("node-b"));
    assert_eq!(w.phase(), Phase::FailingBack);
    let d = w.run_current_job();
    assert_eq!(w.phase(), Phase::FailingBack);
    assert_eq!(w.state.handled.failover.as_deref(), Some("f1"));
    assert_eq!(d.results, ResultChange::Keep, "no failback result yet");
    let job = d.create_job.expect("present");
    assert_eq!(
        (job.kind, job.params.to_primary, job.params.presync),
        (JobKind::Failback, false, true)
    );
    assert_eq!(job.node, None, "the primary site's node");
    assert_eq!(w.phase(), Phase::FailingBack);
    let d = w.run_current_job();
    assert_eq!(w.phase(), Phase::FailingBack);
    assert_eq!(w.state.handled.failover.as_deref(), Some("f1"));
    let job = d.create_job.expect("present");
    assert_eq!((job.kind, job.params.to_primary), (JobKind::Failover, true));
    assert!(!job.params.presync);
    assert_eq!(job.params.failover, Some(FailoverKind::Planned));
    assert_eq!(job.node.as_deref(), Some("node-b"));
    assert_eq!(w.phase(), Phase::FailingBack);
    let d = w.run_current_job();
    assert_eq!(w.phase(), Phase::FailingBack);
    assert_eq!(
        w.state.handled.failover.as_deref(),
        Some("f1"),
        "not echoed yet"
    );
    let job = d.create_job.expect("present");
    assert_eq!(job.kind, JobKind::Failback);
    assert_eq!(
        job.node, None,
        "the primary site's node holds the original disks"
    );
    assert_eq!(job.params.request_token.as_deref(), Some("f2"));
    // The point the failback's Failover job chose (a planned one: the newest).
    assert_eq!(job.params.point, Some(PointChoice::Latest));
    w.run_current_job();
    assert_eq!(w.phase(), Phase::FailedBack);
    assert_eq!(w.state.handled.failover.as_deref(), Some("f2"));

    // Re-protect forward, from the failback's point, on the primary's node.
    w.spec.requests.reprotect = Some("r3".into());
    let d = w.step();
    let job = d.create_job.expect("present");
    assert_eq!((job.kind, job.node), (JobKind::Reprotect, None));
    assert!(!w.state.reverse);
    w.run_current_job();
    assert_eq!(w.phase(), Phase::Protected);
    assert_eq!(w.state.handled.reprotect.as_deref(), Some("r3"));
}

#[test]
fn an_unplanned_failback_to_a_named_point_restores_that_point() {
    let mut w = World::protected_in_reverse();
    assert_eq!((w.phase(), w.state.reverse), (Phase::Protected, true));
    let older = PointChoice::Named("before-the-ransomware".into());
    w.spec.requests.failover = Some(FailoverAsk {
        token: "f2".into(),
        kind: FailoverKind::Unplanned,
        point: older.clone(),
    });
    let d = w.step();
    let job = d.create_job.expect("the failback's failover");
    assert_eq!(
        job.node.as_deref(),
        Some("node-b"),
        "not store-only: {job:?}"
    );
    let d = w.run_current_job();
    let job = d.create_job.expect("the failback");
    assert_eq!(
        (job.kind, job.params.point),
        (JobKind::Failback, Some(older))
    );
}

/// A VM protected in reverse whose recovered VM's node (node-b) has just been lost: its
/// agent's last heartbeat is `JOB_AGENT_LOST` old, the primary site's agent lives.
fn reverse_with_node_b_lost(w: &mut World) {
    let died = w.now;
    w.advance(JOB_AGENT_LOST);
    w.recovery = vec![("node-b".into(), Some(died))];
}

/// A failover (or failback) request of `kind` to the latest point.
fn failover_ask(token: &str, kind: FailoverKind) -> Option<FailoverAsk> {
    Some(FailoverAsk {
        token: token.into(),
        kind,
        point: PointChoice::Latest,
    })
}

fn planned(token: &str) -> Option<FailoverAsk> {
    failover_ask(token, FailoverKind::Planned)
}

fn unplanned(token: &str) -> Option<FailoverAsk> {
    failover_ask(token, FailoverKind::Unplanned)
}

/// Run the failback's last two jobs (its Failover, its Failback): the VM is home, `token`
/// answered.
fn failed_back_by(w: &mut World, token: &str) {
    w.run_current_job();
    w.run_current_job();
    assert_eq!(w.phase(), Phase::FailedBack);
    assert_eq!(w.state.handled.failover.as_deref(), Some(token));
}

#[test]
fn with_the_recovered_vms_node_lost_an_unplanned_failback_runs_at_the_primary_site() {
    let mut w = World::protected_in_reverse();
    w.recovery = vec![("node-b".into(), Some(w.now))];
    reverse_with_node_b_lost(&mut w);
    w.spec.requests.failover = unplanned("f2");
    let d = w.step();
    let job = d.create_job.expect("the failback's failover");
    assert_eq!(
        (job.kind, job.params.to_primary, job.node.as_deref()),
        (JobKind::Failover, true, None),
        "at the primary site's node: {job:?}"
    );
    assert!(
        d.notices
            .iter()
            .any(|n| n.reason == "JobRelocated" && n.note.contains("primary site")),
        "{:?}",
        d.notices
    );
    let d = w.run_current_job();
    let job = d.create_job.expect("the failback");
    assert_eq!((job.kind, job.node.as_deref()), (JobKind::Failback, None));
    w.run_current_job();
    assert_eq!(w.phase(), Phase::FailedBack);
    assert_eq!(w.state.handled.failover.as_deref(), Some("f2"));

    // While node-b's agent lives, the same request runs there (its engine replicates).
    let mut w = World::protected_in_reverse();
    w.recovery = vec![("node-b".into(), Some(w.now))];
    w.spec.requests.failover = unplanned("f2");
    let job = w.step().create_job.expect("the failback's failover");
    assert_eq!(job.node.as_deref(), Some("node-b"));
    // Node-b dies before its agent claims it: it goes home, at once.
    reverse_with_node_b_lost(&mut w);
    let d = w.step();
    let job = d.create_job.expect("taken from the lost agent");
    assert_eq!(
        (job.kind, job.attempt, job.node.as_deref()),
        (JobKind::Failover, 2, None)
    );
    assert!(w.notices().contains(&"JobFailed"), "{:?}", w.notices());
    // And with every agent silent, it is not taken from one to the other.
    w.now += JOB_AGENT_LOST;
    assert!(w.step().create_job.is_none());
}

#[test]
fn a_planned_failback_stranded_on_a_lost_node_gives_way_to_an_unplanned_one() {
    let mut w = failback_asked();
    w.recovery = vec![("node-b".into(), Some(w.now))];
    // The original disks' first step done, the recovered VM's stop waits for node-b.
    let d = w.run_current_job();
    let stop = d.create_job.expect("the stop");
    assert_eq!(
        (stop.kind, stop.params.to_primary, stop.node.as_deref()),
        (JobKind::Failover, true, Some("node-b"))
    );
    reverse_with_node_b_lost(&mut w);
    // A planned step is never taken from its node: it waits.
    assert!(w.step().create_job.is_none());
    assert_eq!(w.phase(), Phase::FailingBack);
    // Until an unplanned failback is asked: the unclaimed step is withdrawn and the
    // unplanned one runs at the primary site.
    w.spec.requests.failover = unplanned("f3");
    let d = w.step();
    assert_eq!(d.delete_job.as_deref(), Some(stop.name.as_str()));
    let job = d.create_job.expect("the unplanned failback's failover");
    assert_eq!(
        (job.kind, job.params.failover, job.node.as_deref()),
        (JobKind::Failover, Some(FailoverKind::Unplanned), None)
    );
    assert!(w.notices().contains(&"JobWithdrawn"), "{:?}", w.notices());
    failed_back_by(&mut w, "f3");

    // A planned step whose agent lives is not withdrawn: the unplanned request waits.
    let mut w = World::protected_in_reverse();
    w.recovery = vec![("node-b".into(), Some(w.now))];
    w.spec.requests.failover = planned("f2");
    w.step();
    w.spec.requests.failover = unplanned("f3");
    let d = w.step();
    assert!(d.create_job.is_none() && d.delete_job.is_none(), "{d:?}");
}

#[test]
fn a_planned_failback_step_taken_from_a_lost_agent_gives_way_at_once_to_an_unplanned_one() {
    let mut w = failback_asked();
    w.recovery = vec![("node-b".into(), Some(w.now))];
    w.run_current_job();
    // Node-b's agent claims the stop, then its node dies: the step is taken from it, and its
    // retry (on node-b: it must stop the recovered VM there) waits for the backoff.
    w.claim();
    w.step();
    reverse_with_node_b_lost(&mut w);
    assert!(w.step().create_job.is_none());
    assert_eq!(
        w.state.job.as_ref().map(|j| j.state),
        Some(JobState::Failed)
    );
    // An unplanned failback asked now does not wait for it.
    w.spec.requests.failover = unplanned("f3");
    let d = w.step();
    let job = d.create_job.expect("the unplanned failback's failover");
    assert_eq!(
        (job.kind, job.params.failover, job.node.as_deref()),
        (JobKind::Failover, Some(FailoverKind::Unplanned), None)
    );
    failed_back_by(&mut w, "f3");
}

/// The recovered VM's node dies while it is re-protected in reverse: the re-protect, taken
/// from the lost agent, would be retried there for ever; an unplanned failback asked now
/// replaces it and brings the VM home from the replica's points.
#[test]
fn a_reprotect_stranded_on_a_lost_node_gives_way_to_an_unplanned_failback() {
    let mut w = World::protected();
    w.spec.recovery_site = Some("node-b".into());
    w.recovery = vec![("node-b".into(), Some(w.now))];
    w.spec.requests.failover = planned("f1");
    w.step();
    w.run_current_job();
    w.spec.requests.reprotect = Some("r1".into());
    let job = w.step().create_job.expect("the re-protect");
    assert_eq!(
        (job.kind, job.node.as_deref()),
        (JobKind::Reprotect, Some("node-b"))
    );
    w.claim();
    w.step();
    reverse_with_node_b_lost(&mut w);
    assert!(
        w.step().create_job.is_none(),
        "its retry waits for the backoff"
    );
    assert_eq!(w.phase(), Phase::Reprotecting);
    w.spec.requests.failover = unplanned("f2");
    let d = w.step();
    let job = d.create_job.expect("the unplanned failback's failover");
    assert_eq!(
        (job.kind, job.params.to_primary, job.node.as_deref()),
        (JobKind::Failover, true, None)
    );
    assert_eq!(
        w.state.handled.reprotect.as_deref(),
        Some("r1"),
        "the re-protect's request is answered"
    );
    failed_back_by(&mut w, "f2");
}

#[test]
fn a_stranded_planned_step_is_not_withdrawn_for_an_unplanned_request_that_cannot_start() {
    let mut w = World::protected_in_reverse();
    w.recovery = vec![("node-b".into(), Some(w.now))];
    w.spec.requests.failover = planned("f2");
    w.step();
    reverse_with_node_b_lost(&mut w);
    // No recovery point known: the unplanned request would be rejected, so the planned
    // step stays (withdrawn, it would be retried for a request nobody makes any more).
    if let Some(agent) = w.agent.as_mut() {
        agent.latest_point = None;
    }
    w.spec.requests.failover = unplanned("f3");
    let d = w.step();
    assert!(d.create_job.is_none() && d.delete_job.is_none(), "{d:?}");
}

/// A VM protected in reverse (failed over, re-protected from node-b), with a planned
/// failback asked as `f2`: its first job created.
fn failback_asked() -> World {
    let mut w = World::protected_in_reverse();
    w.spec.requests.failover = planned("f2");
    w.step();
    // The fresh point of the running recovered VM; then the original disks' first step.
    let d = w.run_current_job();
    let job = d.create_job.expect("the failback's first step");
    assert_eq!((job.kind, job.params.presync), (JobKind::Failback, true));
    w
}

/// A VM protected in reverse whose recovered VM's node (node-b) lives, one copy interval on,
/// with a new point cut there.
fn reverse_with_a_new_point() -> World {
    let mut w = World::protected_in_reverse();
    next_reverse_cycle(&mut w, INTERVAL);
    w
}

/// `by` later, both sites' agents alive, a cycle of the recovered VM cut a point.
fn next_reverse_cycle(w: &mut World, by: Duration) {
    w.advance(by);
    w.recovery = vec![("node-b".into(), Some(w.now))];
    w.cycle();
}

/// One reconcile, which creates a job keeping the original disks in step: on the primary
/// site's node, no request, the phase unchanged.
fn step_keeps_in_step(w: &mut World) -> NewJob {
    let job = w
        .step()
        .create_job
        .expect("a job keeping the original disks in step");
    assert!(keeps_in_step(job.kind, &job.params), "{job:?}");
    assert_eq!(
        (
            job.kind,
            job.params.presync,
            job.params.request_token.as_deref()
        ),
        (JobKind::Failback, true, None)
    );
    assert_eq!(
        job.node, None,
        "the primary site's node holds the original disks"
    );
    assert_eq!((w.phase(), w.state.reverse), (Phase::Protected, true));
    job
}

#[test]
fn replicating_in_reverse_keeps_the_original_disks_in_step_and_a_failback_then_stops_at_once() {
    let mut w = reverse_with_a_new_point();
    step_keeps_in_step(&mut w);
    // Routine: no JobCreated, JobStarted or JobSucceeded events every copy interval.
    assert!(w.notices().is_empty(), "{:?}", w.notices());
    let started = w.now;
    w.claim();
    w.step();
    assert!(w.notices().is_empty(), "{:?}", w.notices());
    w.end(Ok(()));
    let d = w.step();
    assert!(d.create_job.is_none(), "{:?}", d.create_job);
    assert!(w.notices().is_empty(), "{:?}", w.notices());
    assert_eq!(
        (w.phase(), w.state.original_in_step),
        (Phase::Protected, Some(started))
    );
    assert_eq!(
        w.state.handled.failover.as_deref(),
        Some("f1"),
        "no request answered"
    );
    assert_eq!(
        d.results,
        ResultChange::Keep,
        "status.failover still names the failover's disks"
    );
    assert_eq!(w.condition("Ready").0, crate::ConditionStatus::True);
    // Nothing new: nothing to do. A new point within the copy interval: not yet.
    assert!(w.step().create_job.is_none());
    next_reverse_cycle(&mut w, INTERVAL / 2);
    assert!(w.step().create_job.is_none());
    next_reverse_cycle(&mut w, INTERVAL / 2);
    step_keeps_in_step(&mut w);
    w.run_current_job();

    // A planned failback now: the original disks are a cycle behind at most, so no fresh
    // point first; the recovered VM is stopped and its last changes shipped, at once.
    next_reverse_cycle(&mut w, INTERVAL / 2);
    w.spec.requests.failover = planned("f2");
    let d = w.step();
    let job = d.create_job.expect("the failback's Failover");
    assert_eq!(
        (
            job.kind,
            job.params.to_primary,
            job.params.presync,
            job.node.as_deref()
        ),
        (JobKind::Failover, true, false, Some("node-b"))
    );
    assert_eq!(w.phase(), Phase::FailingBack);
    assert_eq!(
        w.state.original_in_step, None,
        "the failback overwrites them"
    );
    failed_back_by(&mut w, "f2");

    // Re-protected forward: the original disks are the VM's own again, nothing to keep.
    w.spec.requests.reprotect = Some("r2".into());
    w.step();
    w.run_current_job();
    assert_eq!((w.phase(), w.state.reverse), (Phase::Protected, false));
    assert_eq!(w.state.original_in_step, None);
    next_reverse_cycle(&mut w, INTERVAL);
    assert!(w.step().create_job.is_none());
}

#[test]
fn original_disks_left_behind_get_a_fresh_point_first_in_a_planned_failback() {
    let mut w = reverse_with_a_new_point();
    w.step();
    w.run_current_job();
    // The primary site's agent goes silent: nothing is kept in step meanwhile.
    let beat = w.now;
    w.now += 3 * INTERVAL;
    w.recovery = vec![("node-b".into(), Some(w.now))];
    w.heartbeat = Some(beat);
    w.cycle();
    assert!(w.step().create_job.is_none(), "not on a lost agent");
    w.heartbeat = Some(w.now);
    w.spec.requests.failover = planned("f2");
    let job = w.step().create_job.expect("the failback's first step");
    assert_eq!(
        (job.kind, job.params.to_primary, job.params.presync),
        (JobKind::Failover, true, true),
        "the original disks are three intervals behind"
    );

    // In step a moment ago, but the recovered VM's cycles fail: what it has not shipped may
    // be large, so it is shipped while the VM runs.
    let mut w = reverse_with_a_new_point();
    w.step();
    w.run_current_job();
    w.advance(MIN);
    w.recovery = vec![("node-b".into(), Some(w.now))];
    if let Some(agent) = w.agent.as_mut() {
        agent.last_error = Some(error(ErrorClass::Recoverable, "StoreUnavailable"));
    }
    w.spec.requests.failover = planned("f2");
    let job = w.step().create_job.expect("the failback's first step");
    assert_eq!(
        (job.kind, job.params.presync),
        (JobKind::Failover, true),
        "cycles failing"
    );
}

#[test]
fn a_failed_attempt_to_keep_the_original_disks_in_step_blocks_nothing() {
    let mut w = reverse_with_a_new_point();
    w.step();
    w.run_current_job();
    assert!(w.state.original_in_step.is_some());
    next_reverse_cycle(&mut w, INTERVAL);
    w.step();
    w.claim();
    w.step();
    w.end(Err(error(ErrorClass::Recoverable, "StoreUnavailable")));
    let d = w.step();
    assert!(d.create_job.is_none());
    assert_eq!(
        (w.phase(), w.state.original_in_step),
        (Phase::Protected, None),
        "a failed one may have left the disks between two points"
    );
    let retry = w.state.last_error.as_ref().and_then(|e| e.next_retry_time);
    assert!(
        retry.is_some_and(|t| t > w.now && t <= w.now + IN_STEP_RETRY),
        "{retry:?}"
    );
    assert_eq!(
        w.state.handled.failover.as_deref(),
        Some("f1"),
        "no request touched"
    );
    assert_eq!(
        w.state.last_error.as_ref().map(|e| e.reason.as_str()),
        Some("StoreUnavailable"),
        "the failure shows"
    );
    // A request goes first; the next attempt waits for the retry time.
    w.spec.requests.resync = Some("s1".into());
    let job = w.step().create_job.expect("the resync");
    assert_eq!(job.kind, JobKind::Resynchronize);
    w.run_current_job();
    next_reverse_cycle(&mut w, INTERVAL);
    step_keeps_in_step(&mut w);

    // One an administrator must mend (the disks held open): shown, not critical (the VM
    // replicates), and tried again after `IN_STEP_RETRY`, or at once on a retry token.
    w.claim();
    w.step();
    w.end(Err(error(ErrorClass::NonRecoverable, "NotReady")));
    w.step();
    assert_ne!(
        w.state.health,
        Some(Health::Critical),
        "{}",
        w.state.health_reason
    );
    assert_eq!(
        w.state.last_error.as_ref().map(|e| e.reason.as_str()),
        Some("NotReady")
    );
    assert!(w.notices().contains(&"JobFailed"));
    next_reverse_cycle(&mut w, IN_STEP_RETRY - MIN);
    assert!(w.step().create_job.is_none());
    w.spec.requests.retry = Some("t1".into());
    let job = step_keeps_in_step(&mut w);
    assert_eq!(job.attempt, 2);
    w.claim();
    w.step();
    w.end(Err(error(ErrorClass::NonRecoverable, "NotReady")));
    w.step();
    next_reverse_cycle(&mut w, IN_STEP_RETRY);
    assert_eq!(step_keeps_in_step(&mut w).attempt, 3);
    w.run_current_job();
    assert!(w.state.original_in_step.is_some(), "healed");
    assert_eq!(
        w.state.health,
        Some(Health::Normal),
        "{}",
        w.state.health_reason
    );
}

#[test]
fn a_resync_failed_for_good_keeps_its_record_over_the_original_disks() {
    let mut w = reverse_with_a_new_point();
    w.spec.requests.resync = Some("s1".into());
    let job = w.step().create_job.expect("the resync");
    assert_eq!(job.kind, JobKind::Resynchronize);
    w.claim();
    w.step();
    w.end(Err(error(ErrorClass::NonRecoverable, "DiskNotFound")));
    w.step();
    // Its record keeps the automatic resync from starting again: nothing replaces it.
    for _ in 0..3 {
        next_reverse_cycle(&mut w, INTERVAL);
        assert!(w.step().create_job.is_none(), "{:?}", w.state.job);
    }
    w.spec.requests.retry = Some("t1".into());
    let job = w.step().create_job.expect("the resync, retried");
    assert_eq!((job.kind, job.attempt), (JobKind::Resynchronize, 2));
}

#[test]
fn an_unclaimed_job_keeping_the_original_disks_in_step_gives_way() {
    // To a failback asked meanwhile.
    let mut w = reverse_with_a_new_point();
    let kept = step_keeps_in_step(&mut w);
    w.spec.requests.failover = unplanned("f2");
    let d = w.step();
    assert_eq!(d.delete_job.as_deref(), Some(kept.name.as_str()));
    let job = d.create_job.expect("the failback's Failover");
    assert_eq!((job.kind, job.params.to_primary), (JobKind::Failover, true));
    assert!(w.notices().contains(&"JobWithdrawn"), "{:?}", w.notices());

    // To the primary site's agent lost: withdrawn, and none started while it is.
    let mut w = reverse_with_a_new_point();
    let kept = step_keeps_in_step(&mut w);
    let beat = w.now;
    w.now += JOB_AGENT_LOST;
    w.heartbeat = Some(beat);
    w.recovery = vec![("node-b".into(), Some(w.now))];
    let d = w.step();
    assert_eq!(d.delete_job.as_deref(), Some(kept.name.as_str()));
    assert!(d.create_job.is_none(), "{:?}", d.create_job);
    assert_eq!(w.phase(), Phase::Protected);
}

#[test]
fn a_failback_whose_original_disks_cannot_be_written_leaves_the_recovered_vm_replicating() {
    let mut w = failback_asked();
    w.claim();
    w.step();
    w.end(Err(error(ErrorClass::NonRecoverable, "NotReady")));
    let d = w.step();
    assert!(d.create_job.is_none(), "{:?}", d.create_job);
    assert_eq!((w.phase(), w.state.reverse), (Phase::Protected, true));
    assert_eq!(w.state.handled.failover.as_deref(), Some("f2"));
    assert_eq!(
        w.condition("FailedOver"),
        (crate::ConditionStatus::False, "NotReady".into())
    );
    // The failed failback's record does not stop the original disks being kept in step.
    next_reverse_cycle(&mut w, INTERVAL);
    step_keeps_in_step(&mut w);
}

#[test]
fn a_failback_that_failed_for_good_is_not_started_again_by_a_spec_change() {
    let mut w = failback_asked();
    w.claim();
    w.step();
    w.end(Err(error(ErrorClass::NonRecoverable, "NotReady")));
    w.step();
    assert_eq!(w.state.handled.failover.as_deref(), Some("f2"));
    // Someone edits the spec (asks for a resync): the resync runs, the failback does not.
    w.spec.generation += 1;
    w.spec.requests.resync = Some("s1".into());
    let d = w.step();
    let job = d.create_job.expect("the resync");
    assert_eq!(job.kind, JobKind::Resynchronize, "{job:?}");
    assert_eq!((w.phase(), w.state.reverse), (Phase::Resynchronizing, true));
}

#[test]
fn a_failback_first_step_that_failed_is_retried_before_the_recovered_vm_is_stopped() {
    let mut w = failback_asked();
    w.claim();
    w.step();
    w.end(Err(error(ErrorClass::Recoverable, "StoreUnavailable")));
    w.step();
    assert_eq!(w.phase(), Phase::FailingBack);
    w.advance(Duration::from_secs(3600));
    let d = w.step();
    let job = d.create_job.expect("the retry");
    assert_eq!(
        (job.kind, job.params.presync, job.attempt),
        (JobKind::Failback, true, 2)
    );
    let d = w.run_current_job();
    let job = d.create_job.expect("the failover");
    assert_eq!((job.kind, job.params.to_primary), (JobKind::Failover, true));
}

#[test]
fn a_planned_failover_that_cannot_stop_the_source_fails_and_protection_goes_on() {
    let mut w = World::protected();
    w.spec.requests.failover = planned("f1");
    w.step();
    w.claim();
    w.step();
    w.end(Err(error(ErrorClass::NonRecoverable, "SourceNotStopped")));
    w.step();
    assert_eq!(w.phase(), Phase::Protected);
    assert_eq!(w.state.handled.failover.as_deref(), Some("f1"));
    assert_eq!(
        w.condition("FailedOver"),
        (crate::ConditionStatus::False, "SourceNotStopped".into())
    );
    assert_eq!(w.condition("Replicating").0, crate::ConditionStatus::True);
}

#[test]
fn every_row_of_the_retry_table_for_a_failed_job() {
    let mut w = World::new();
    w.step();
    let started = w.now;
    // 5-minute interval: retries 6, 7, 9, 13, 15, then 35 minutes after each failure.
    let expected = [6u64, 7, 9, 13, 15, 35, 35, 35];
    for (n, minutes) in expected.into_iter().enumerate() {
        let failure = error(ErrorClass::Recoverable, "StoreUnreachable");
        w.claim();
        w.end(Err(failure));
        let failed_at = w.now;
        let d = w.step();
        assert!(d.create_job.is_none(), "no retry at once");
        assert_eq!(
            d.requeue_after,
            (MIN * u32::try_from(minutes).unwrap_or(0)).min(MAX_REQUEUE),
            "failure {}",
            n + 1
        );
        let e = w
            .state
            .last_error
            .clone()
            .unwrap_or_else(|| panic!("no error"));
        assert_eq!(e.retry_count, u32::try_from(n).unwrap_or(0));
        assert_eq!(
            e.next_retry_time,
            Some(failed_at + MIN * u32::try_from(minutes).unwrap_or(0))
        );
        assert_eq!(e.first_seen_time, Some(started), "first seen stays");
        // A second before the retry time: still nothing.
        w.advance(MIN * u32::try_from(minutes).unwrap_or(0) - Duration::from_secs(1));
        assert!(w.step().create_job.is_none());
        w.advance(Duration::from_secs(1));
        let d = w.step();
        let job = d.create_job.unwrap_or_else(|| panic!("retry {}", n + 1));
        assert_eq!(job.kind, JobKind::EnableProtection);
        assert_eq!(job.attempt, u32::try_from(n).unwrap_or(0) + 2);
        assert!(
            w.state.last_error.is_some(),
            "the error shows while retrying"
        );
    }
    w.run_current_job();
    assert_eq!(w.state.last_error, None, "success clears the error");
}

#[test]
fn the_agents_retry_time_is_honoured_but_never_sooner_than_the_backoff() {
    let mut w = World::new();
    w.step();
    w.claim();
    let later = w.now + Duration::from_secs(3600);
    w.end(Err(ErrorReport {
        next_retry_time: Some(later),
        ..error(ErrorClass::Recoverable, "LowDiskSpace")
    }));
    w.step();
    assert_eq!(
        w.state.last_error.as_ref().and_then(|e| e.next_retry_time),
        Some(later)
    );
    w.advance(Duration::from_secs(3599));
    assert!(w.step().create_job.is_none());
    w.advance(Duration::from_secs(1));
    assert!(w.step().create_job.is_some());
    // An agent asking for an immediate retry gets the backoff.
    w.claim();
    let now = w.now;
    w.end(Err(ErrorReport {
        next_retry_time: Some(now),
        ..error(ErrorClass::Recoverable, "LowDiskSpace")
    }));
    let d = w.step();
    assert!(d.create_job.is_none());
    assert_eq!(
        d.requeue_after,
        INTERVAL + 2 * MIN,
        "second failure: interval + 2 min"
    );
}

#[test]
fn a_non_recoverable_failure_waits_for_a_change_or_a_retry_request() {
    let mut w = World::new();
    w.step();
    w.claim();
    w.end(Err(error(ErrorClass::NonRecoverable, "VmNotFound")));
    let d = w.step();
    assert_eq!(w.state.health, Some(Health::Critical));
    assert_eq!(w.state.health_reason, "NonRecoverableError");
    assert_eq!(
        w.condition("Protected"),
        (crate::ConditionStatus::False, "VmNotFound".into())
    );
    assert!(
        d.notices
            .iter()
            .any(|n| n.reason == "HealthCritical" && n.warning)
    );
    for _ in 0..5 {
        w.advance(Duration::from_secs(24 * 3600));
        assert!(w.step().create_job.is_none(), "no retry, ever");
    }
    // An administrator fixed the VM and asks for a retry.
    w.spec.requests.retry = Some("r1".into());
    let d = w.step();
    assert_eq!(d.create_job.map(|j| j.attempt), Some(2));
    assert_eq!(w.state.handled.retry.as_deref(), Some("r1"));
    w.claim();
    w.end(Err(error(ErrorClass::NonRecoverable, "VmNotFound")));
    w.step();
    // A spec change is a reason to try again too.
    w.spec.generation = 2;
    assert!(w.step().create_job.is_some());
}

#[test]
fn a_recoverable_failover_failure_is_retried_at_the_backoff_with_the_next_attempt() {
    let mut w = World::protected();
    w.spec.requests.failover = unplanned("f1");
    let d = w.step();
    assert_eq!(
        d.create_job.map(|j| (j.kind, j.attempt)),
        Some((JobKind::Failover, 1))
    );
    w.claim();
    w.end(Err(error(ErrorClass::Recoverable, "StoreUnreachable")));
    let failed_at = w.now;
    let d = w.step();
    assert!(
        d.create_job.is_none(),
        "no retry at once: {:?}",
        d.create_job.map(|j| (j.name, j.attempt))
    );
    assert_eq!(w.phase(), Phase::FailingOver);
    assert_eq!(w.state.handled.failover, None, "the request is not over");
    // 5-minute interval: the first retry 6 minutes after the failure, never sooner.
    let retry_at = failed_at + 6 * MIN;
    assert_eq!(
        w.state.last_error.as_ref().and_then(|e| e.next_retry_time),
        Some(retry_at)
    );
    assert_eq!(d.requeue_after, 6 * MIN);
    w.advance(6 * MIN - Duration::from_secs(1));
    assert!(
        w.step().create_job.is_none(),
        "still nothing a second before"
    );
    w.advance(Duration::from_secs(1));
    let job = w
        .step()
        .create_job
        .unwrap_or_else(|| panic!("the retry is due"));
    assert_eq!((job.kind, job.attempt), (JobKind::Failover, 2));
    assert_eq!(job.params.request_token.as_deref(), Some("f1"));
    assert_eq!(
        w.state.last_error.as_ref().map(|e| e.retry_count),
        Some(0),
        "the error shows while retrying"
    );
    w.run_current_job();
    assert_eq!(w.phase(), Phase::FailedOver);
    assert_eq!(w.state.handled.failover.as_deref(), Some("f1"));
}

#[test]
fn an_unplanned_failover_goes_to_a_recovery_node_and_never_waits_behind_a_lost_agent() {
    let mut w = World::protected();
    w.recovery = vec![("node-b".into(), Some(w.now))];
    // The VM's agent claims a resync, then its node dies.
    w.spec.requests.resync = Some("r1".into());
    w.step();
    assert_eq!(w.current().1, JobKind::Resynchronize);
    assert_eq!(
        w.nodes.get(&w.current().0),
        Some(&None),
        "a resync runs at home"
    );
    let held = w.claim();
    w.step();
    let died = w.now;
    w.now += JOB_AGENT_LOST - Duration::from_secs(1);
    w.recovery[0].1 = Some(w.now);
    w.spec.requests.failover = unplanned("f1");
    assert!(
        w.step().create_job.is_none(),
        "a second short of the bound it waits"
    );
    w.now = died + JOB_AGENT_LOST;
    w.recovery[0].1 = Some(w.now);
    let d = w.step();
    let job = d
        .create_job
        .unwrap_or_else(|| panic!("the failover starts"));
    assert_eq!(job.kind, JobKind::Failover);
    assert_eq!(job.node.as_deref(), Some("node-b"), "on the recovery node");
    assert!(w.notices().contains(&"JobRelocated"), "{:?}", w.notices());
    let taken = &w.state.job;
    assert_ne!(taken.as_ref().map(|j| j.name.as_str()), Some(held.as_str()));
    // The resync it took over says why in the request's events.
    assert!(
        d.notices
            .iter()
            .any(|n| n.reason == "JobFailed" && n.note.contains("AgentLost")),
        "{:?}",
        d.notices
    );
    w.run_current_job();
    assert_eq!(w.phase(), Phase::FailedOver);
    assert_eq!(w.state.handled.failover.as_deref(), Some("f1"));
}

#[test]
fn a_store_only_job_left_by_a_lost_recovery_agent_moves_on_and_others_stay_home() {
    let mut w = World::protected();
    let start = w.now;
    // The VM's agent is lost; two recovery nodes, the first one alive for now.
    w.recovery = vec![
        ("node-b".into(), Some(start)),
        ("node-c".into(), Some(start)),
    ];
    w.now = start + JOB_AGENT_LOST;
    w.recovery[0].1 = Some(w.now);
    w.recovery[1].1 = Some(w.now);
    w.spec.requests.test_failover = Some(TestFailoverAsk {
        token: "t1".into(),
        point: PointChoice::Latest,
    });
    let job = w
        .step()
        .create_job
        .unwrap_or_else(|| panic!("a test failover"));
    assert_eq!(job.node.as_deref(), Some("node-b"));
    w.claim();
    w.step();
    // node-b dies while it runs: the job moves to node-c at once.
    let b_died = w.now;
    w.now += JOB_AGENT_LOST;
    w.recovery[1].1 = Some(w.now);
    let job = w.step().create_job.unwrap_or_else(|| panic!("moved on"));
    assert_eq!((job.node.as_deref(), job.attempt), (Some("node-c"), 2));
    assert!(b_died < w.now);
    w.run_current_job();
    assert_eq!(w.state.handled.test_failover.as_deref(), Some("t1"));
    // A planned failover needs the source: it stays with the VM's node, however silent.
    w.spec.requests.failover = planned("f1");
    let job = w
        .step()
        .create_job
        .unwrap_or_else(|| panic!("a planned failover"));
    assert_eq!(job.node, None);
    // Unclaimed at home, it is not taken away (it has nowhere better to go).
    w.now += JOB_AGENT_LOST;
    w.recovery[1].1 = Some(w.now);
    assert!(w.step().create_job.is_none());
    assert_eq!(w.current().1, JobKind::Failover);
    // An unplanned failover asked now replaces it: withdrawn, the new one on node-c.
    let planned = w.current().0;
    w.spec.requests.failover = unplanned("f2");
    let d = w.step();
    assert_eq!(d.delete_job.as_deref(), Some(planned.as_str()));
    let job = d
        .create_job
        .unwrap_or_else(|| panic!("the unplanned failover"));
    assert_eq!(
        (job.kind, job.node.as_deref()),
        (JobKind::Failover, Some("node-c"))
    );
    w.run_current_job();
    assert_eq!(w.phase(), Phase::FailedOver);
    assert_eq!(w.state.handled.failover.as_deref(), Some("f2"));
}

#[test]
fn commit_and_cleanup_follow_the_disks_they_are_about() {
    let mut w = World::protected();
    let start = w.now;
    w.recovery = vec![
        ("node-b".into(), Some(start)),
        ("node-c".into(), Some(start)),
    ];
    // The VM's agent is lost: a test failover and then a failover run on node-b.
    w.now = start + JOB_AGENT_LOST;
    w.recovery[0].1 = Some(w.now);
    w.recovery[1].1 = Some(w.now);
    w.spec.requests.test_failover = Some(TestFailoverAsk {
        token: "t1".into(),
        point: PointChoice::Latest,
    });
    let job = w
        .step()
        .create_job
        .unwrap_or_else(|| panic!("a test failover"));
    assert_eq!(job.node.as_deref(), Some("node-b"));
    w.run_current_job();
    w.spec.requests.failover = unplanned("f1");
    let job = w.step().create_job.unwrap_or_else(|| panic!("a failover"));
    assert_eq!(job.node.as_deref(), Some("node-b"));
    w.run_current_job();
    assert_eq!(w.phase(), Phase::FailedOver);

    // The VM's agent comes back (fenced): the cleanup still goes where the test disks are.
    w.heartbeat = Some(w.now);
    w.spec.requests.cleanup_test_failover = Some("c1".into());
    let d = w.step();
    let job = d.create_job.unwrap_or_else(|| panic!("a cleanup"));
    assert_eq!(
        (job.kind, job.node.as_deref()),
        (JobKind::CleanupTestFailover, Some("node-b"))
    );
    assert!(
        d.notices
            .iter()
            .any(|n| n.reason == "JobRelocated" && n.note.contains("holds the disks")),
        "{:?}",
        d.notices
    );
    w.run_current_job();
    assert_eq!(w.state.handled.cleanup_test_failover.as_deref(), Some("c1"));

    // node-b dies before the commit: it goes to the next live recovery node, never to the
    // VM's own, and names the point the failover kept.
    let b_died = w.now;
    w.now = b_died + JOB_AGENT_LOST;
    w.heartbeat = Some(w.now);
    w.recovery[1].1 = Some(w.now);
    w.spec.requests.commit = Some("k1".into());
    let job = w.step().create_job.unwrap_or_else(|| panic!("a commit"));
    let kept = w.failover.as_ref().and_then(|f| f.point.clone());
    assert_eq!(
        (job.kind, job.node.as_deref(), job.params.point),
        (
            JobKind::Commit,
            Some("node-c"),
            kept.map(PointChoice::Named)
        )
    );
    w.run_current_job();
    assert_eq!(w.phase(), Phase::FailoverCommitted);
}

#[test]
fn a_commit_waits_for_the_node_with_the_disks_when_no_agent_can_take_it() {
    let mut w = World::protected();
    w.recovery = vec![("node-b".into(), Some(w.now))];
    w.now += JOB_AGENT_LOST;
    w.recovery[0].1 = Some(w.now);
    w.spec.requests.failover = unplanned("f1");
    w.step();
    w.run_current_job();
    // Every agent is silent now: the commit waits on node-b, not at the fenced VM's node.
    w.now += JOB_AGENT_LOST;
    w.spec.requests.commit = Some("k1".into());
    let job = w.step().create_job.unwrap_or_else(|| panic!("a commit"));
    assert_eq!(job.node.as_deref(), Some("node-b"));
    // And a commit of a failover made at home stays at home while the VM's agent lives.
    let mut w = World::protected();
    w.spec.requests.failover = unplanned("f1");
    w.step();
    w.run_current_job();
    w.spec.requests.commit = Some("k1".into());
    let job = w.step().create_job.unwrap_or_else(|| panic!("a commit"));
    assert_eq!(job.node, None);
}

#[test]
fn requests_that_cannot_run_are_rejected_and_echoed() {
    let mut w = World::new();
    w.policy = None; // stuck in Pending
    w.spec.requests.failover = unplanned("f1");
    w.spec.requests.commit = Some("k1".into());
    let d = w.step();
    assert_eq!(w.state.handled.failover.as_deref(), Some("f1"));
    assert_eq!(w.state.handled.commit.as_deref(), Some("k1"));
    assert_eq!(
        w.condition("FailedOver"),
        (crate::ConditionStatus::False, "NoRecoveryPoint".into())
    );
    assert_eq!(
        d.notices
            .iter()
            .filter(|n| n.reason == "RequestRejected")
            .count(),
        2
    );
    assert_eq!(w.condition("Protected").1, "PolicyNotFound");
    assert_eq!(d.requeue_after, MIN);

    let mut w = World::protected();
    w.cycle();
    w.spec.requests.test_failover = Some(TestFailoverAsk {
        token: "t1".into(),
        point: PointChoice::Latest,
    });
    w.step();
    w.run_current_job();
    w.spec.requests.test_failover = Some(TestFailoverAsk {
        token: "t2".into(),
        point: PointChoice::Latest,
    });
    w.step();
    assert_eq!(w.state.handled.test_failover.as_deref(), Some("t2"));
    assert!(w.notices().contains(&"RequestRejected"));
    assert_eq!(
        w.condition("TestFailoverSucceeded").1,
        "TestFailoverSucceeded",
        "the first one still stands"
    );
    assert!(
        w.state.test_failover_exists,
        "the first test failover's disks stay"
    );
}

#[test]
fn requests_wait_while_a_job_runs() {
    let mut w = World::protected();
    w.spec.requests.resync = Some("r1".into());
    w.step();
    let resync = w.claim();
    w.spec.requests.failover = unplanned("f1");
    assert!(w.step().create_job.is_none(), "one job at a time");
    assert_eq!(w.state.handled.failover, None);
    w.end(Ok(()));
    let d = w.step();
    assert_eq!(w.state.handled.resync.as_deref(), Some("r1"));
    assert_eq!(
        d.create_job.map(|j| j.kind),
        Some(JobKind::Failover),
        "then the failover, after {resync}"
    );
}

#[test]
fn tracking_lost_starts_an_automatic_resync_and_stale_facts_do_not_repeat_it() {
    let mut w = World::protected();
    w.advance(MIN);
    let lost_at = w.now;
    if let Some(a) = w.agent.as_mut() {
        a.tracking_lost = Some((ResyncReason::TrackingLost, lost_at));
        a.report_time = Some(lost_at);
    }
    let d = w.step();
    assert_eq!(
        w.condition("ResyncRequired"),
        (crate::ConditionStatus::True, "TrackingLost".into())
    );
    let job = d.create_job.unwrap_or_else(|| panic!("no resync"));
    assert_eq!(job.params.resync_reason, Some(ResyncReason::TrackingLost));
    assert_eq!(w.phase(), Phase::Resynchronizing);
    assert_eq!(
        w.condition("Resynchronizing"),
        (crate::ConditionStatus::True, "TrackingLost".into())
    );
    assert_eq!(w.condition("Replicating").1, "Resynchronizing");
    w.claim();
    w.step();
    w.advance(MIN);
    // The agent still shows the old flag when the job ends: it predates the resync.
    let stale = w.agent.clone();
    w.end(Ok(()));
    w.agent = stale;
    let d = w.step();
    assert_eq!(w.phase(), Phase::Protected);
    assert!(d.create_job.is_none());
    assert_eq!(
        w.condition("ResyncRequired").0,
        crate::ConditionStatus::False
    );
}

#[test]
fn a_resync_that_cannot_run_is_critical() {
    let lost = |w: &mut World| {
        let now = w.now;
        if let Some(a) = w.agent.as_mut() {
            a.tracking_lost = Some((ResyncReason::CorruptLog, now));
        }
    };
    // Manual mode: Critical until someone asks.
    let mut w = World::protected();
    if let Some(p) = w.policy.as_mut() {
        p.resync_automatic = false;
    }
    w.advance(MIN);
    lost(&mut w);
    assert!(w.step().create_job.is_none());
    assert_eq!(
        (w.state.health, w.state.health_reason.as_str()),
        (Some(Health::Critical), "ResyncBlocked")
    );
    w.spec.requests.resync = Some("now".into());
    let d = w.step();
    assert_eq!(
        d.create_job.map(|j| j.params.resync_reason),
        Some(Some(ResyncReason::Requested))
    );
    assert_eq!(w.state.health, Some(Health::Normal), "it can run now");

    // Automatic, outside the window: Critical, and a look again when the window opens.
    let mut w = World::protected();
    let hour = (w.now.duration_since(T0).unwrap_or_default().as_secs() / 3600) % 24;
    let window = crate::window::DailyWindow::parse(&WindowSpec {
        start: format!("{:02}:00", (hour + 2) % 24),
        end: format!("{:02}:00", (hour + 3) % 24),
        days: vec![],
        time_zone: None,
    })
    .unwrap_or_else(|e| panic!("{e}"));
    let opening = window.next_opening(w.now);
    if let Some(p) = w.policy.as_mut() {
        p.resync_window = Some(window);
    }
    w.advance(MIN);
    lost(&mut w);
    let d = w.step();
    assert!(d.create_job.is_none());
    assert_eq!(w.state.health_reason, "ResyncBlocked");
    let opening = opening.unwrap_or_else(|| panic!("no opening"));
    assert!(
        w.now + d.requeue_after <= opening,
        "looks again by the opening"
    );
    w.now = opening;
    w.heartbeat = Some(opening);
    assert_eq!(
        w.step().create_job.map(|j| j.kind),
        Some(JobKind::Resynchronize)
    );
}

#[test]
fn pending_logs_over_the_threshold_ask_for_a_resync() {
    let mut w = World::protected();
    w.advance(MIN);
    w.cycle();
    if let Some(a) = w.agent.as_mut() {
        a.disks[0].pending_log_bytes = 49;
    }
    assert!(w.step().create_job.is_none());
    if let Some(a) = w.agent.as_mut() {
        a.disks[0].pending_log_bytes = 50;
    }
    let d = w.step();
    assert_eq!(
        d.create_job.map(|j| j.params.resync_reason),
        Some(Some(ResyncReason::LogThresholdReached))
    );
}

#[test]
fn health_follows_the_agent_the_cycles_and_the_rpo() {
    let mut w = World::protected();
    w.cycle();
    w.step();
    assert_eq!(w.state.health_reason, "Healthy");
    // The agent goes silent: Warning after 10 minutes, Critical after 30.
    let silent_from = w.now;
    w.now += Duration::from_secs(600);
    w.step();
    assert_eq!(
        (w.state.health, w.state.health_reason.as_str()),
        (Some(Health::Warning), "AgentQuiet")
    );
    assert_eq!(
        w.condition("Replicating"),
        (crate::ConditionStatus::Unknown, "AgentQuiet".into())
    );
    assert!(w.notices().contains(&"HealthWarning"));
    w.now = silent_from + Duration::from_secs(1800);
    w.step();
    assert_eq!(
        (w.state.health, w.state.health_reason.as_str()),
        (Some(Health::Critical), "AgentLost")
    );
    // It comes back and replicates: Normal again.
    w.heartbeat = Some(w.now);
    w.cycle();
    w.step();
    assert_eq!(w.state.health_reason, "Healthy");
    assert!(w.notices().contains(&"HealthNormal"));
    // Alive, but the cycles fail: the RPO grows past the threshold.
    let last_point = w.now;
    w.advance(Duration::from_secs(1801));
    if let Some(a) = w.agent.as_mut() {
        a.report_time = Some(w.now);
        a.last_error = Some(error(ErrorClass::Recoverable, "StoreUnreachable"));
    }
    w.step();
    assert_eq!(w.state.health_reason, "RpoOverThreshold");
    assert_eq!(
        w.condition("Replicating"),
        (crate::ConditionStatus::False, "StoreUnreachable".into())
    );
    assert_eq!(
        w.state.last_error.as_ref().map(|e| e.reason.as_str()),
        Some("StoreUnreachable")
    );
    assert_eq!(
        w.state.rpo,
        Some(w.now.duration_since(last_point).unwrap_or_default())
    );
}

#[test]
fn more_than_a_fifth_of_the_hours_cycles_missed_is_a_warning() {
    let mut w = World::protected();
    w.advance(Duration::from_secs(3600));
    w.cycle();
    if let Some(a) = w.agent.as_mut() {
        a.cycles_succeeded_last_hour = 10; // of 12 due
    }
    w.step();
    assert_eq!(w.state.health_reason, "Healthy");
    if let Some(a) = w.agent.as_mut() {
        a.cycles_succeeded_last_hour = 9;
    }
    w.step();
    assert_eq!(w.state.health_reason, "CyclesMissed");
}

#[test]
fn at_most_one_status_write_per_cycle() {
    let mut w = World::protected();
    let mut writes = 0;
    for _ in 0..20 {
        // A cycle report, then the echo of the operator's own write, then a timer.
        w.advance(INTERVAL);
        w.cycle();
        for _ in 0..3 {
            if w.step().changed {
                writes += 1;
            }
        }
    }
    assert_eq!(writes, 20);
    // The agent is silent: the RPO alone is rewritten once per interval, not every reconcile.
    let mut writes = 0;
    for _ in 0..12 {
        w.now += INTERVAL / 2;
        if w.step().changed {
            writes += 1;
        }
    }
    assert!(writes <= 7, "{writes} writes in 6 intervals");
}

#[test]
fn disabling_withdraws_an_unclaimed_job_and_waits_for_a_running_one() {
    let mut w = World::new();
    w.step();
    w.spec.protect = false;
    let d = w.step();
    assert_eq!(d.delete_job.as_deref(), Some("web-enable-1"));
    assert!(
        d.create_job.is_none(),
        "nothing ran on the node: nothing to disable"
    );
    assert_eq!(w.phase(), Phase::Disabled);
    // Protection wanted again.
    w.spec.protect = true;
    assert_eq!(
        w.step().create_job.map(|j| j.name),
        Some("web-enable-2".into())
    );

    let mut w = World::protected();
    w.spec.requests.resync = Some("r".into());
    w.step();
    w.claim();
    w.spec.deleting = true;
    let d = w.step();
    assert!(d.create_job.is_none() && d.delete_job.is_none());
    assert_eq!(w.condition("Protected").1, "WaitingForJob");
    assert_eq!(d.requeue_after, Duration::from_secs(30));
    w.end(Ok(()));
    assert_eq!(
        w.step().create_job.map(|j| j.kind),
        Some(JobKind::DisableProtection)
    );
    w.run_current_job();
    assert!(!w.finalizer);

    // A VM deleted before anything was created lets go at once.
    let mut w = World::new();
    w.policy = None;
    w.step();
    w.spec.deleting = true;
    assert!(w.step().release_finalizer);
}

#[test]
fn initial_replication_waits_for_its_start_time_and_a_usable_policy() {
    let mut w = World::new();
    let start = w.now + Duration::from_secs(7200);
    if let Some(p) = w.policy.as_mut() {
        p.initial_replication_start = Some(start);
    }
    let d = w.step();
    assert!(d.create_job.is_none());
    assert_eq!(w.condition("Protected").1, "WaitingForStartTime");
    assert_eq!(d.requeue_after, MAX_REQUEUE);
    w.now = start;
    assert!(w.step().create_job.is_some());

    let mut w = World::new();
    if let Some(p) = w.policy.as_mut() {
        p.blocking_problem = Some("spec.resync.window: unknown time zone".into());
    }
    assert!(w.step().create_job.is_none());
    assert_eq!(w.condition("Protected").1, "PolicyNotReady");
}

#[test]
fn a_job_deleted_under_the_operator_is_a_recoverable_failure() {
    let mut w = World::new();
    w.step();
    w.jobs.clear();
    let d = w.step();
    assert_eq!(
        w.state.last_error.as_ref().map(|e| e.reason.as_str()),
        Some("JobDeleted")
    );
    assert_eq!(d.requeue_after, INTERVAL + MIN);
}

#[test]
fn job_names_are_short_enough_and_distinct() {
    assert_eq!(
        job_name("web", JobKind::TestFailover, 3),
        "web-testfailover-3"
    );
    let long = "v".repeat(253);
    let a = job_name(&long, JobKind::DisableProtection, 12);
    assert!(a.len() <= 253, "{}", a.len());
    assert_ne!(
        a,
        job_name(
            &format!("{}w", "v".repeat(252)),
            JobKind::DisableProtection,
            12
        )
    );
}

// ---- properties over random life cycles ----

#[derive(Clone, Debug)]
enum Act {
    Wait(u64),
    Claim,
    Succeed,
    Fail(bool),
    Cycle,
    Silence(u64),
    TrackingLost,
    AskResync,
    AskTestFailover,
    AskCleanup,
    AskFailover,
    AskCommit,
    AskReprotect,
    AskRetry,
    Toggle,
    Delete,
}

fn act() -> impl Strategy<Value = Act> {
    prop_oneof![
        (1u64..4000).prop_map(Act::Wait),
        Just(Act::Claim),
        Just(Act::Succeed),
        Just(Act::Succeed),
        any::<bool>().prop_map(Act::Fail),
        Just(Act::Cycle),
        (1u64..4000).prop_map(Act::Silence),
        Just(Act::TrackingLost),
        Just(Act::AskResync),
        Just(Act::AskTestFailover),
        Just(Act::AskCleanup),
        Just(Act::AskFailover),
        Just(Act::AskCommit),
        Just(Act::AskReprotect),
        Just(Act::AskRetry),
        Just(Act::Toggle),
        Just(Act::Delete),
    ]
}

fn apply(w: &mut World, act: &Act, tokens: &mut u32) {
    let active = w
        .state
        .job
        .as_ref()
        .filter(|j| !j.state.is_finished())
        .map(|j| j.name.clone())
        .filter(|n| w.jobs.contains_key(n));
    let mut token = || {
        *tokens += 1;
        format!("t{tokens}")
    };
    match act {
        Act::Wait(s) => w.advance(Duration::from_secs(*s)),
        Act::Silence(s) => w.now += Duration::from_secs(*s),
        Act::Claim => {
            if let Some(job) = active.and_then(|n| w.jobs.get_mut(&n))
                && job.state == JobState::Pending
            {
                job.state = JobState::Running;
                job.start_time = Some(w.now);
            }
        }
        Act::Succeed if active.is_some() => w.end(Ok(())),
        Act::Fail(recoverable) if active.is_some() => {
            let class = if *recoverable {
                ErrorClass::Recoverable
            } else {
                ErrorClass::NonRecoverable
            };
            w.end(Err(error(class, "Boom")));
        }
        Act::Succeed | Act::Fail(_) => {}
        Act::Cycle => {
            if w.state.phase == Phase::Protected {
                w.cycle();
            }
        }
        Act::TrackingLost => {
            let now = w.now;
            if let Some(a) = w.agent.as_mut() {
                a.tracking_lost = Some((ResyncReason::TrackingLost, now));
                a.report_time = Some(now);
            }
        }
        Act::AskResync => w.spec.requests.resync = Some(token()),
        Act::AskTestFailover => {
            w.spec.requests.test_failover = Some(TestFailoverAsk {
                token: token(),
                point: PointChoice::Latest,
            });
        }
        Act::AskCleanup => w.spec.requests.cleanup_test_failover = Some(token()),
        Act::AskFailover => {
            w.spec.requests.failover = Some(FailoverAsk {
                token: token(),
                kind: FailoverKind::Unplanned,
                point: PointChoice::Latest,
            });
        }
        Act::AskCommit => w.spec.requests.commit = Some(token()),
        Act::AskReprotect => w.spec.requests.reprotect = Some(token()),
        Act::AskRetry => w.spec.requests.retry = Some(token()),
        Act::Toggle => {
            w.spec.protect = !w.spec.protect;
            w.spec.generation += 1;
        }
        Act::Delete => w.spec.deleting = true,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Whatever happens: one job at a time (checked in `step`), requeues within bounds, no
    /// retry before its time, tokens echoed only once asked, decisions idempotent.
    #[test]
    fn random_life_cycles_keep_the_guarantees(acts in prop::collection::vec(act(), 1..60)) {
        let mut w = World::new();
        // Re-protect can run: the recovered VM is named.
        w.spec.recovery_site = Some("node-b".into());
        let mut tokens = 0;
        let mut asked: Vec<String> = Vec::new();
        w.step();
        for act in &acts {
            apply(&mut w, act, &mut tokens);
            let r = &w.spec.requests;
            asked.extend(
                [r.resync.clone(), r.test_failover.as_ref().map(|a| a.token.clone()),
                 r.cleanup_test_failover.clone(), r.failover.as_ref().map(|a| a.token.clone()),
                 r.commit.clone(), r.reprotect.clone(), r.retry.clone()].into_iter().flatten());
            let before = w.state.clone();
            let d = w.step();
            prop_assert!(d.requeue_after >= MIN_REQUEUE && d.requeue_after <= MAX_REQUEUE);
            if let Some(job) = &d.create_job {
                // A retry comes no sooner than the failed attempt's retry time, unless asked.
                if let Some(previous) = before.job.as_ref().filter(|p| p.kind == job.kind && job.attempt > 1)
                    && let Some(e) = &previous.error
                    && before.handled.retry == w.state.handled.retry
                    && before.observed_generation == Some(w.spec.generation)
                {
                    prop_assert_eq!(e.class, ErrorClass::Recoverable);
                    prop_assert!(e.next_retry_time.is_none_or(|t| t <= w.now), "{:?} retried early", job);
                }
            }
            let h = &w.state.handled;
            for token in [&h.resync, &h.test_failover, &h.cleanup_test_failover, &h.failover, &h.commit, &h.reprotect, &h.retry].into_iter().flatten() {
                prop_assert!(asked.contains(token), "{} echoed but never asked", token);
            }
            // Idempotence: the same facts at the same time decide nothing new.
            let again = w.decide();
            prop_assert!(again.create_job.is_none(), "{:?}", again.create_job);
            prop_assert!(!again.changed, "{:?}\n{:?}", w.state, again.state);
            prop_assert!(again.notices.is_empty(), "{:?}", again.notices);
        }
        // With a cooperative agent, a deleted VM lets go of its finalizer.
        w.spec.deleting = true;
        for n in 0..12 {
            w.advance(Duration::from_secs(3600));
            // An administrator, after a non-recoverable failure.
            w.spec.requests.retry = Some(format!("admin-{n}"));
            w.step();
            if w.state.job.as_ref().is_some_and(|j| !j.state.is_finished()) && !w.active_jobs().is_empty() {
                w.end(Ok(()));
            }
        }
        w.step();
        prop_assert!(!w.finalizer, "stuck in {:?} with {:?}", w.state.phase, w.state.job);
    }
}
