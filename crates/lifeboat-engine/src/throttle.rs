//! Upload bandwidth limits, per host as ASR applies them.
//!
//! The limit is set from outside (the policy's work-hours and off-hours limits are calendar
//! matters the caller decides); the engine takes bytes from the bucket before each upload.
//!
//! Each VM's engine has its own [`Throttle`], and every throttle of one agent (one node's
//! agent process, one standalone daemon) draws from one [`SharedBandwidth`], a token bucket
//! handed to each VM's throttle with [`Throttle::share`]:
//!
//! ```text
//!  VM a: Throttle ─┐ set_limit(a's policy limit now)
//!  VM b: Throttle ─┼──> SharedBandwidth: one bucket at the smallest limit in force
//!  VM c: Throttle ─┘     take(bytes): one reservation per VM at a time, in arrival order
//! ```
//!
//! - The host's total never exceeds the limit (plus a burst of at most one second of bytes
//!   after a quiet spell), however many VMs upload.
//! - The rate is the smallest limit in force among the VMs sharing the bucket: VMs under
//!   different policies on one host are held to the strictest policy's current limit (a
//!   limit protects the host's uplink, so no policy's limit is exceeded); a VM whose policy
//!   sets no limit adds none. When a VM leaves (its engine is dropped) its limit goes with it.
//! - Fairness: a VM has at most one reservation waiting in the bucket (its concurrent uploads
//!   queue behind each other first), and reservations are served in arrival order, so
//!   backlogged VMs take turns, one upload piece (at most one Put Page, 4 MiB) each: a VM
//!   with more uploads in flight does not get a larger share, and an idle VM leaves its share
//!   to the others.
//!
//! A throttle that shares nothing has a bucket of its own (a VM alone).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// The upload bandwidth of one host (one agent), shared by every VM's [`Throttle`].
#[derive(Debug)]
pub struct SharedBandwidth {
    inner: Mutex<Bucket>,
}

#[derive(Debug)]
struct Bucket {
    /// Each member's limit in bytes per second (None or 0: unlimited).
    limits: BTreeMap<u64, Option<u64>>,
    next_member: u64,
    available: f64,
    updated: Instant,
}

impl Default for SharedBandwidth {
    fn default() -> Self {
        Self::starting_at(Instant::now())
    }
}

impl SharedBandwidth {
    /// An empty bucket, with no member and no limit.
    pub fn new() -> Self {
        Self::default()
    }

    fn starting_at(now: Instant) -> Self {
        SharedBandwidth {
            inner: Mutex::new(Bucket {
                limits: BTreeMap::new(),
                next_member: 0,
                available: 0.0,
                updated: now,
            }),
        }
    }

    fn bucket(&self) -> std::sync::MutexGuard<'_, Bucket> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The limit in force, bytes per second: the smallest of the members' (None: unlimited).
    pub fn limit(&self) -> Option<u64> {
        self.bucket().rate()
    }

    /// How many throttles draw from the bucket.
    pub fn members(&self) -> usize {
        self.bucket().limits.len()
    }

    fn join(&self, limit: Option<u64>) -> u64 {
        let mut bucket = self.bucket();
        let id = bucket.next_member;
        bucket.next_member += 1;
        bucket.limits.insert(id, limit);
        id
    }

    fn leave(&self, id: u64) -> Option<u64> {
        self.bucket().limits.remove(&id).flatten()
    }

    fn set_limit(&self, id: u64, limit: Option<u64>) {
        self.bucket().limits.insert(id, limit);
    }

    /// How long to wait before sending `bytes`, taking them from the bucket. The bucket holds
    /// at most one second of bytes, so a burst after a quiet spell stays bounded.
    fn reserve(&self, bytes: u64, now: Instant) -> Duration {
        let mut bucket = self.bucket();
        let Some(rate) = bucket.rate() else {
            return Duration::ZERO;
        };
        let rate = rate as f64;
        let elapsed = now.saturating_duration_since(bucket.updated).as_secs_f64();
        bucket.available = (bucket.available + elapsed * rate).min(rate);
        bucket.updated = now;
        bucket.available -= bytes as f64;
        if bucket.available >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-bucket.available / rate)
        }
    }
}

impl Bucket {
    fn rate(&self) -> Option<u64> {
        self.limits
            .values()
            .filter_map(|l| l.filter(|r| *r > 0))
            .min()
    }
}

/// One VM's upload throttle: its policy's limit, drawn from its host's bucket.
#[derive(Debug)]
pub struct Throttle {
    member: Mutex<(Arc<SharedBandwidth>, u64)>,
    /// One reservation of this VM waits in the bucket at a time.
    turn: tokio::sync::Mutex<()>,
}

impl Default for Throttle {
    fn default() -> Self {
        Throttle::new(None)
    }
}

impl Drop for Throttle {
    fn drop(&mut self) {
        let member = self
            .member
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner);
        member.0.leave(member.1);
    }
}

impl Throttle {
    /// A throttle at `limit_bytes_per_second` (None: unlimited), with a bucket of its own.
    pub fn new(limit_bytes_per_second: Option<u64>) -> Throttle {
        Self::in_bucket(Arc::new(SharedBandwidth::new()), limit_bytes_per_second)
    }

    /// A throttle at `limit_bytes_per_second` drawing from the host's `bucket`.
    pub fn sharing(bucket: &Arc<SharedBandwidth>, limit_bytes_per_second: Option<u64>) -> Throttle {
        Self::in_bucket(Arc::clone(bucket), limit_bytes_per_second)
    }

    fn in_bucket(bucket: Arc<SharedBandwidth>, limit: Option<u64>) -> Throttle {
        let id = bucket.join(limit);
        Throttle {
            member: Mutex::new((bucket, id)),
            turn: tokio::sync::Mutex::new(()),
        }
    }

    /// A throttle at `mbps` megabits per second (None: unlimited).
    pub fn from_mbps(mbps: Option<u32>) -> Throttle {
        Throttle::new(mbps.map(|m| u64::from(m) * 1_000_000 / 8))
    }

    /// Draw from the host's `bucket` from now on (with the limit set so far), leaving the
    /// bucket used until now.
    pub fn share(&self, bucket: &Arc<SharedBandwidth>) {
        let mut member = self.member.lock().unwrap_or_else(PoisonError::into_inner);
        if Arc::ptr_eq(&member.0, bucket) {
            return;
        }
        let limit = member.0.leave(member.1);
        let id = bucket.join(limit);
        *member = (Arc::clone(bucket), id);
    }

    /// The bucket this throttle draws from.
    pub fn bucket(&self) -> Arc<SharedBandwidth> {
        Arc::clone(&self.member.lock().unwrap_or_else(PoisonError::into_inner).0)
    }

    /// Change this VM's limit (at the start or end of work hours); the bucket runs at the
    /// smallest limit of its VMs.
    pub fn set_limit(&self, limit_bytes_per_second: Option<u64>) {
        let member = self.member.lock().unwrap_or_else(PoisonError::into_inner);
        member.0.set_limit(member.1, limit_bytes_per_second);
    }

    fn reserve(&self, bytes: u64, now: Instant) -> Duration {
        let bucket = self.bucket();
        bucket.reserve(bytes, now)
    }

    /// Wait until `bytes` may be sent. Concurrent calls of one throttle queue behind each
    /// other, so that a VM has one reservation in its host's bucket at a time.
    pub async fn take(&self, bytes: u64) {
        let _turn = self.turn.lock().await;
        let wait = self.reserve(bytes, Instant::now());
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bucket_paces_to_the_limit() {
        let t0 = Instant::now();
        let throttle = Throttle::sharing(&Arc::new(SharedBandwidth::starting_at(t0)), Some(1_000));
        // The bucket starts empty: 500 bytes wait half a second, the next 500 another half.
        assert_eq!(throttle.reserve(500, t0), Duration::from_millis(500));
        assert_eq!(throttle.reserve(500, t0), Duration::from_secs(1));
        // Two seconds later the debt is paid and the bucket refilled (capped at one second).
        assert_eq!(
            throttle.reserve(1_000, t0 + Duration::from_secs(3)),
            Duration::ZERO
        );
        throttle.set_limit(None);
        assert_eq!(throttle.reserve(u64::MAX, t0), Duration::ZERO);
        assert_eq!(Throttle::from_mbps(Some(8)).reserve(0, t0), Duration::ZERO);
    }

    #[test]
    fn the_host_runs_at_the_smallest_limit_in_force() {
        let host = Arc::new(SharedBandwidth::new());
        let a = Throttle::sharing(&host, Some(1_000_000));
        assert_eq!(host.limit(), Some(1_000_000));
        let b = Throttle::new(Some(250_000));
        // A throttle keeps its limit when it joins the host.
        b.share(&host);
        b.share(&host);
        assert_eq!((host.members(), host.limit()), (2, Some(250_000)));
        // No limit (None, or 0) adds none.
        let c = Throttle::sharing(&host, None);
        c.set_limit(Some(0));
        assert_eq!(host.limit(), Some(250_000));
        // Work hours end for b's policy: its off-hours limit is higher than a's.
        b.set_limit(Some(2_000_000));
        assert_eq!(host.limit(), Some(1_000_000));
        // A VM leaving takes its limit along.
        drop(a);
        assert_eq!((host.members(), host.limit()), (2, Some(2_000_000)));
        drop(b);
        drop(c);
        assert_eq!((host.members(), host.limit()), (0, None));
    }

    /// VMs that each upload `piece` bytes at a time, the next as soon as the throttle lets
    /// the last one go (one reservation per VM at a time, as `take` guarantees), for
    /// `seconds` of a manual clock: the bytes each VM was let send.
    fn simulate(limit: u64, pieces: &[u64], seconds: u64) -> Vec<u64> {
        let t0 = Instant::now();
        let host = Arc::new(SharedBandwidth::starting_at(t0));
        let vms: Vec<Throttle> = pieces
            .iter()
            .map(|_| Throttle::sharing(&host, Some(limit)))
            .collect();
        let end = t0 + Duration::from_secs(seconds);
        let mut ready = vec![t0; vms.len()];
        let mut sent = vec![0; vms.len()];
        // The VM whose next request comes first (ties: in order).
        while let Some((i, now)) = ready.iter().copied().enumerate().min_by_key(|(_, t)| *t) {
            let granted = now + vms[i].reserve(pieces[i], now);
            if granted > end {
                break;
            }
            sent[i] += pieces[i];
            ready[i] = granted;
        }
        sent
    }

    #[test]
    fn vms_share_the_hosts_limit_fairly() {
        // 1 MB/s shared by three VMs uploading 64 KB pieces for a minute.
        let sent = simulate(1_000_000, &[64_000; 3], 60);
        let total: u64 = sent.iter().sum();
        // The host's total is the limit, not three times it (the bucket starts empty).
        assert!(total <= 60 * 1_000_000, "{sent:?}");
        assert!(total >= 60 * 1_000_000 - 3 * 64_000, "{sent:?}");
        // Each VM gets a third, within one piece.
        for s in &sent {
            assert!(s.abs_diff(total / 3) <= 64_000, "{sent:?}");
        }
        // A VM alone gets the whole limit.
        let alone = simulate(1_000_000, &[64_000], 60)[0];
        assert!(alone >= 60 * 1_000_000 - 64_000, "{alone}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_vm_with_more_uploads_in_flight_gets_no_larger_share() {
        // 200 kB/s for half a second: VM a uploads on four tasks, VM b on one.
        let host = Arc::new(SharedBandwidth::new());
        let a = Arc::new(Throttle::sharing(&host, Some(200_000)));
        let b = Arc::new(Throttle::sharing(&host, Some(200_000)));
        let sent = Arc::new(Mutex::new([0u64; 2]));
        let started = Instant::now();
        let deadline = started + Duration::from_millis(500);
        let mut tasks = tokio::task::JoinSet::new();
        for (vm, throttle) in [(0, &a), (0, &a), (0, &a), (0, &a), (1, &b)] {
            let (throttle, sent) = (Arc::clone(throttle), Arc::clone(&sent));
            tasks.spawn(async move {
                loop {
                    throttle.take(5_000).await;
                    if Instant::now() > deadline {
                        break;
                    }
                    sent.lock().unwrap_or_else(PoisonError::into_inner)[vm] += 5_000;
                }
            });
        }
        while tasks.join_next().await.is_some() {}
        let [a_sent, b_sent] = *sent.lock().unwrap_or_else(PoisonError::into_inner);
        let elapsed = deadline.duration_since(started).as_secs_f64();
        // The total stays within the limit (the bucket starts empty)...
        assert!(
            (a_sent + b_sent) as f64 <= 200_000.0 * elapsed + 10_000.0,
            "{a_sent} + {b_sent}"
        );
        // ...and the two VMs share it, although a has four uploads waiting to b's one.
        assert!(a_sent.abs_diff(b_sent) <= 10_000, "{a_sent} vs {b_sent}");
        assert!(b_sent >= 20_000, "{a_sent} vs {b_sent}");
    }
}
