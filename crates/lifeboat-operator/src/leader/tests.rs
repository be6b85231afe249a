//! The election against a mocked API server (kube-rs's `tower-test` pattern, as in
//! `vm/tests.rs`) that keeps one Lease and can hang or fail calls, on tokio's paused clock:
//! seconds pass only as the code under test waits, so the timings are exact.

use super::*;
use http::{Method, Request, Response, StatusCode};
use kube::client::Body;
use serde_json::{Value, json};
use tokio::task::JoinHandle;
use tower_test::mock;

type Handle = mock::Handle<Request<Body>, Response<Body>>;

const NOW: u64 = 1_750_000_000;
const HOUR: i64 = 3600;

/// A wall clock that reads `base` plus the (paused, virtual) tokio time since it was made:
/// replicas with different `base`s have skewed clocks that run at the same rate.
#[derive(Debug)]
struct SkewedClock {
    base: SystemTime,
    start: Instant,
}

impl SkewedClock {
    fn shared(offset_from_now: i64) -> Arc<dyn Clock> {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(NOW);
        let skew = Duration::from_secs(offset_from_now.unsigned_abs());
        let base = if offset_from_now >= 0 {
            now + skew
        } else {
            now - skew
        };
        Arc::new(Self {
            base,
            start: Instant::now(),
        })
    }
}

impl Clock for SkewedClock {
    fn now(&self) -> SystemTime {
        self.base + self.start.elapsed()
    }
}

/// The API server's state: one Lease, and what to do with the next calls.
#[derive(Debug, Default)]
struct Server {
    lease: Option<Value>,
    version: u64,
    /// Method of every call received.
    calls: Vec<Method>,
    /// Calls to leave unanswered (never answered, never dropped).
    hang: u32,
    /// Calls to answer 500.
    fail: u32,
    /// When the other replica (see [`holder`]) last renewed.
    renewed_by_other: Option<Instant>,
}

type Shared = Arc<Mutex<Server>>;

fn lock(server: &Shared) -> std::sync::MutexGuard<'_, Server> {
    server.lock().unwrap_or_else(PoisonError::into_inner)
}

fn status(code: u16, reason: &str) -> (StatusCode, Value) {
    (
        StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
               "reason": reason, "code": code, "message": reason}),
    )
}

impl Server {
    /// Store `lease` as a new version.
    fn store(&mut self, mut lease: Value) -> Value {
        self.version += 1;
        lease["metadata"]["resourceVersion"] = json!(self.version.to_string());
        self.lease = Some(lease.clone());
        lease
    }

    fn answer(&mut self, method: &Method, body: Value) -> (StatusCode, Value) {
        if self.fail > 0 {
            self.fail -= 1;
            return status(500, "InternalError");
        }
        match (method, &self.lease) {
            (&Method::GET, Some(lease)) => (StatusCode::OK, lease.clone()),
            (&Method::GET, None) => status(404, "NotFound"),
            (&Method::POST, Some(_)) => status(409, "AlreadyExists"),
            (&Method::POST, None) => (StatusCode::CREATED, self.store(body)),
            (&Method::PUT, Some(lease))
                if body["metadata"]["resourceVersion"] == lease["metadata"]["resourceVersion"] =>
            {
                (StatusCode::OK, self.store(body))
            }
            (&Method::PUT, _) => status(409, "Conflict"),
            _ => status(405, "MethodNotAllowed"),
        }
    }
}

/// Serve `handle` from `server` until the client goes away.
fn serve(mut handle: Handle, server: Shared) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut hung = Vec::new();
        while let Some((request, respond)) = handle.next_request().await {
            let method = request.method().clone();
            let bytes = request
                .into_body()
                .collect_bytes()
                .await
                .unwrap_or_default();
            let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            let (code, body) = {
                let mut server = lock(&server);
                server.calls.push(method.clone());
                if server.hang > 0 {
                    server.hang -= 1;
                    hung.push(respond);
                    continue;
                }
                server.answer(&method, body)
            };
            let response = Response::builder()
                .status(code)
                .body(Body::from(serde_json::to_vec(&body).unwrap_or_default()))
                .unwrap_or_else(|e| panic!("{e}"));
            respond.send_response(response);
        }
    })
}

/// The election of `identity`, with `clock`, against `server`.
fn election(identity: &str, clock: Arc<dyn Clock>, server: &Shared) -> LeaderElection {
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    serve(handle, Arc::clone(server));
    LeaderElection::new(
        Client::new(service, "default"),
        "lifeboat-system",
        "lifeboat-operator",
        identity,
        clock,
    )
}

/// Another replica that holds the Lease and renews it every 2 s, writing its own clock.
fn holder(server: &Shared, clock: Arc<dyn Clock>) -> JoinHandle<()> {
    let server = Arc::clone(server);
    tokio::spawn(async move {
        loop {
            let now = serde_json::to_value(micro(clock.now())).unwrap_or_default();
            {
                let mut server = lock(&server);
                let lease = server.lease.clone().unwrap_or_else(|| {
                    json!({
                        "apiVersion": "coordination.k8s.io/v1",
                        "kind": "Lease",
                        "metadata": {"name": "lifeboat-operator", "namespace": "lifeboat-system"},
                        "spec": {"holderIdentity": "other", "leaseDurationSeconds": 15,
                                 "acquireTime": now, "leaseTransitions": 0}
                    })
                });
                let mut lease = lease;
                lease["spec"]["holderIdentity"] = json!("other");
                lease["spec"]["renewTime"] = now;
                server.store(lease);
                server.renewed_by_other = Some(Instant::now());
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    })
}

fn writes(server: &Shared) -> usize {
    lock(server)
        .calls
        .iter()
        .filter(|m| **m != Method::GET)
        .count()
}

#[tokio::test]
async fn the_timings_are_client_gos() {
    let mut e = election("me", SkewedClock::shared(0), &Shared::default());
    assert_eq!(
        (e.lease_duration, e.renew_deadline, e.retry_period),
        (
            Duration::from_secs(15),
            Duration::from_secs(10),
            Duration::from_secs(2)
        )
    );
    e.set_lease_duration(Duration::from_secs(30));
    assert_eq!(
        (e.renew_deadline, e.retry_period),
        (Duration::from_secs(20), Duration::from_secs(4))
    );
}

#[tokio::test(start_paused = true)]
async fn a_leader_whose_api_server_stops_answering_gives_up_within_the_renew_deadline() {
    let server = Shared::default();
    let me = election("me", SkewedClock::shared(0), &server);
    me.acquire().await;
    let led = Instant::now();
    assert_eq!(lock(&server).calls, [Method::GET, Method::POST]);

    lock(&server).hang = u32::MAX;
    let lost = tokio::time::timeout(me.lease_duration, me.keep())
        .await
        .unwrap_or_else(|_| panic!("still leading after a lease duration without renewing"));
    let after = led.elapsed();
    assert!(
        matches!(lost, Error::LeadershipLost { seconds: 10, .. }),
        "{lost:?}"
    );
    assert_eq!(
        after, me.renew_deadline,
        "gave up exactly at the renew deadline"
    );
    assert!(after < me.lease_duration);
    // Renewed at 2 s (timed out at 7 s, half the deadline) and retried at 9 s (cut at 10 s).
    assert_eq!(lock(&server).calls.len(), 4);
}

/// A leader whose API server hangs `hang` calls and fails `fail` after its first renewal is
/// due: it must still lead a minute later.
async fn leader_survives(hang: u32, fail: u32) {
    let server = Shared::default();
    let me = election("me", SkewedClock::shared(0), &server);
    me.acquire().await;
    {
        let mut server = lock(&server);
        server.hang = hang;
        server.fail = fail;
    }
    let kept = tokio::time::timeout(Duration::from_secs(60), me.keep()).await;
    assert!(kept.is_err(), "lost: {kept:?}");
    assert!(writes(&server) >= 20, "renewing: {:?}", lock(&server).calls);
}

#[tokio::test(start_paused = true)]
async fn a_hung_call_times_out_in_time_for_a_retry() {
    // The read at 2 s times out at 7 s (half the renew deadline); the retry at 9 s renews.
    leader_survives(1, 0).await;
}

#[tokio::test(start_paused = true)]
async fn failed_renewals_are_retried_every_retry_period() {
    // The reads at 2 s and 4 s fail; the one at 6 s renews.
    leader_survives(0, 2).await;
}

#[tokio::test(start_paused = true)]
async fn a_leader_gives_up_at_once_when_another_holds_the_lease() {
    let server = Shared::default();
    let me = election("me", SkewedClock::shared(0), &server);
    me.acquire().await;
    let led = Instant::now();
    let other = holder(&server, SkewedClock::shared(0));
    let lost = me.keep().await;
    other.abort();
    assert!(matches!(lost, Error::LeadershipLost { .. }), "{lost:?}");
    assert_eq!(led.elapsed(), me.retry_period, "at the first renewal");
}

/// A standby whose clock is `skew` from the holder's: it must not take over while the holder
/// renews, and must take over a lease duration after it sees the last renewal.
async fn standby_with_a_skewed_clock(skew: i64) {
    let server = Shared::default();
    let other = holder(&server, SkewedClock::shared(0));
    let me = election("me", SkewedClock::shared(skew), &server);

    // NB: 121 s, so that the holder's last renewal (at 120 s) does not race its end.
    let waited = tokio::time::timeout(Duration::from_secs(121), me.acquire()).await;
    assert!(waited.is_err(), "took over a Lease being renewed");
    assert_eq!(writes(&server), 0, "{:?}", lock(&server).calls);

    other.abort();
    let last = lock(&server)
        .renewed_by_other
        .unwrap_or_else(|| panic!("the holder never renewed"));
    assert_eq!(last.elapsed(), Duration::from_secs(1));
    tokio::time::timeout(Duration::from_secs(60), me.acquire())
        .await
        .unwrap_or_else(|_| panic!("a Lease no longer renewed blocked a standby"));
    let after = last.elapsed();
    assert!(
        after >= me.lease_duration && after <= me.lease_duration + me.retry_period,
        "took over {after:?} after the last renewal"
    );
    let lease = lock(&server).lease.clone().unwrap_or_default();
    assert_eq!(lease["spec"]["holderIdentity"], "me");
    assert_eq!(lease["spec"]["leaseTransitions"], 1);
}

#[tokio::test(start_paused = true)]
async fn a_standby_whose_clock_is_an_hour_ahead_does_not_take_over_a_renewed_lease() {
    standby_with_a_skewed_clock(HOUR).await;
}

#[tokio::test(start_paused = true)]
async fn a_holder_whose_clock_is_an_hour_ahead_does_not_block_a_standby_once_it_stops() {
    standby_with_a_skewed_clock(-HOUR).await;
}
