//! `--workload lease-keepalive`: lease renewals per second, through a client library on tokio.
//!
//! `--leases` leases are granted before the measured window, all with one long TTL. Session
//! `i` of `--connections` owns a contiguous slice of them (the slices cover every lease
//! exactly once) cut into batches of `--batch` ids; for the window it renews its batches in
//! turn, one keepalive call per batch, with up to `--pipeline` calls in flight. A call's
//! latency goes into the `keepalive` histogram; the leases it renewed and those it found
//! ended are counted apart, so the figure of the run is renewed lease ids per second, and
//! calls per second sit beside it.
//!
//! The targets ([`LeaseTarget`]) are Tessera, through `Client::grant_lease` and
//! `Client::keepalive` (one request per home core per call, however many ids; remote or
//! embedded), and with the `etcd` feature etcd (`etcd_load`), whose keepalive is one stream
//! message per lease. A batch ([`LeaseBatch`]) is owned by one task and moved into its call
//! and back, so a target may keep per-lease state (etcd's streams) in it without locks.
//!
//! A lease a call finds ended is dropped from its batch: it is counted lost once, and never
//! asked for again. A failed call counts as an error and renews nothing; its batch is tried
//! again in its turn. Every lease is revoked after the window (outside it), so a shared
//! server is left as it was.

use std::collections::VecDeque;
use std::future::Future;
use std::ops::Range;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use futures_util::stream::{self, FuturesUnordered, StreamExt};
use tessera_client::Client;

use crate::report::{self, Recorder};
use crate::setup::{self, SETUP_CONCURRENCY};
use crate::workload::Op;

/// Most leases one run grants: the bench holds every id (and, for etcd, a stream per lease),
/// and a Tessera shard holds 100 000 by default.
pub const LEASE_COUNT_MAX: usize = 10_000_000;

/// How often a session hands its interval tally to the progress reporter.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(250);

/// What one keepalive call found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Renewal {
    /// Leases the target renewed.
    pub renewed_count: u64,
    /// Leases the target no longer had (expired or revoked); the batch has dropped them.
    pub lost_count: u64,
}

/// The leases one call renews. It belongs to one session, which moves it into each call
/// and gets it back with the outcome.
pub trait LeaseBatch: Send + Sized + 'static {
    /// Leases still in the batch.
    fn lease_count(&self) -> usize;

    /// Renews every lease of the batch in one call and removes those the target no longer
    /// has. `Err` (with the reason) when the call failed: nothing counts as renewed.
    fn keepalive(self) -> impl Future<Output = (Self, Result<Renewal, String>)> + Send;
}

/// A target that grants and renews leases. Lease ids are the target's own, as `u64`.
pub trait LeaseTarget {
    /// The leases of one call.
    type Batch: LeaseBatch;

    /// Grants one lease of `ttl` for session `session_index`.
    fn grant(
        &self,
        session_index: usize,
        ttl: Duration,
    ) -> impl Future<Output = Result<u64, String>>;

    /// The batch of session `session_index` that renews `ids` (which it was granted).
    fn batch(
        &self,
        session_index: usize,
        ids: Vec<u64>,
    ) -> impl Future<Output = Result<Self::Batch, String>>;

    /// Ends lease `id` of session `session_index` now.
    fn revoke(&self, session_index: usize, id: u64) -> impl Future<Output = Result<(), String>>;
}

/// The shape of a lease run, checked against itself.
#[derive(Debug, Clone)]
pub struct LeasePlan {
    /// Leases granted before the window.
    pub lease_count: usize,
    /// Ids per keepalive call asked for (`--batch`); a session whose slice is smaller
    /// renews its whole slice per call ([`LeasePlan::batch_size`]).
    pub batch_size_asked: usize,
    /// Sessions (tasks), each owning a slice of the leases.
    pub session_count: usize,
    /// Keepalive calls in flight per session, at most.
    pub pipeline: usize,
    /// TTL of every lease.
    pub ttl: Duration,
}

impl LeasePlan {
    /// Checks the settings against each other.
    ///
    /// # Errors
    /// A message naming the setting that is out of range.
    pub fn new(
        lease_count: usize,
        batch_size_asked: usize,
        session_count: usize,
        pipeline: usize,
        ttl: Duration,
    ) -> Result<Self, String> {
        if !(1..=LEASE_COUNT_MAX).contains(&lease_count) {
            return Err(format!(
                "--leases {lease_count} must be between 1 and {LEASE_COUNT_MAX}"
            ));
        }
        if batch_size_asked == 0 {
            return Err("--batch must be at least 1".to_owned());
        }
        if session_count > lease_count {
            return Err(format!(
                "--connections {session_count} is more than --leases {lease_count}: every \
                 session needs a lease of its own"
            ));
        }
        if ttl < Duration::from_secs(1) {
            return Err(format!(
                "--lease-ttl-secs {} must be at least 1 (etcd counts TTLs in whole seconds)",
                ttl.as_secs_f64()
            ));
        }
        assert!(session_count > 0, "callers check --connections first");
        assert!(pipeline > 0, "callers check --pipeline first");
        Ok(Self {
            lease_count,
            batch_size_asked,
            session_count,
            pipeline,
            ttl,
        })
    }

    /// Indices of the leases session `session_index` owns: contiguous, and together every
    /// lease exactly once.
    pub fn slice_of(&self, session_index: usize) -> Range<usize> {
        assert!(
            session_index < self.session_count,
            "session_index={session_index} session_count={}",
            self.session_count
        );
        let start = session_index * self.lease_count / self.session_count;
        let end = (session_index + 1) * self.lease_count / self.session_count;
        start..end
    }

    /// Ids per keepalive call: `--batch`, or the largest slice when that is smaller.
    pub fn batch_size(&self) -> usize {
        self.batch_size_asked
            .min(self.lease_count.div_ceil(self.session_count))
    }
}

/// Leases granted, and cut into each session's batches.
pub struct Granted<B> {
    /// Each session's batches, in lease order.
    pub sessions: Vec<Vec<B>>,
    /// Every lease, with the session it belongs to.
    pub leases: Vec<(usize, u64)>,
    /// Time from the first grant to the last batch ready.
    pub elapsed: Duration,
}

/// Grants `plan.lease_count` leases through `target` and cuts them into batches.
///
/// # Errors
/// A grant or a batch failed (the first failure).
pub fn grant<T: LeaseTarget>(
    runtime: &tokio::runtime::Runtime,
    target: &T,
    plan: &LeasePlan,
) -> Result<Granted<T::Batch>, String> {
    let started = Instant::now();
    let owners: Vec<(usize, usize)> = (0..plan.session_count)
        .flat_map(|session_index| {
            plan.slice_of(session_index)
                .map(move |lease_index| (session_index, lease_index))
        })
        .collect();
    assert_eq!(owners.len(), plan.lease_count);
    runtime.block_on(async {
        let mut ids = vec![0_u64; plan.lease_count];
        let mut grants = stream::iter(owners.iter().copied())
            .map(|(session_index, lease_index)| async move {
                (lease_index, target.grant(session_index, plan.ttl).await)
            })
            .buffer_unordered(SETUP_CONCURRENCY);
        while let Some((lease_index, outcome)) = grants.next().await {
            ids[lease_index] = outcome
                .map_err(|error| format!("grant {lease_index} of {}: {error}", plan.lease_count))?;
        }
        drop(grants);
        let batch_size = plan.batch_size();
        let cuts: Vec<(usize, usize, Vec<u64>)> = (0..plan.session_count)
            .flat_map(|session_index| {
                ids[plan.slice_of(session_index)]
                    .chunks(batch_size)
                    .enumerate()
                    .map(move |(batch_index, chunk)| (session_index, batch_index, chunk.to_vec()))
                    .collect::<Vec<_>>()
            })
            .collect();
        let mut sessions: Vec<Vec<Option<T::Batch>>> = (0..plan.session_count)
            .map(|session_index| {
                let batch_count = plan.slice_of(session_index).len().div_ceil(batch_size);
                (0..batch_count).map(|_| None).collect()
            })
            .collect();
        let mut batches = stream::iter(cuts)
            .map(|(session_index, batch_index, chunk)| async move {
                let outcome = target.batch(session_index, chunk).await;
                (session_index, batch_index, outcome)
            })
            .buffer_unordered(SETUP_CONCURRENCY);
        while let Some((session_index, batch_index, outcome)) = batches.next().await {
            let batch = outcome.map_err(|error| {
                format!("batch {batch_index} of session {session_index}: {error}")
            })?;
            sessions[session_index][batch_index] = Some(batch);
        }
        drop(batches);
        let sessions: Vec<Vec<T::Batch>> = sessions
            .into_iter()
            .map(|batches| batches.into_iter().flatten().collect())
            .collect();
        let held: usize = sessions.iter().flatten().map(LeaseBatch::lease_count).sum();
        assert_eq!(
            held, plan.lease_count,
            "every granted lease is in one batch"
        );
        let leases = owners
            .iter()
            .map(|&(session_index, lease_index)| (session_index, ids[lease_index]))
            .collect();
        Ok(Granted {
            sessions,
            leases,
            elapsed: started.elapsed(),
        })
    })
}

/// Revokes `leases` (after the window); returns how many revocations failed, and the first
/// failure's reason.
pub fn revoke<T: LeaseTarget>(
    runtime: &tokio::runtime::Runtime,
    target: &T,
    leases: &[(usize, u64)],
) -> (usize, Option<String>) {
    setup::count_failures(
        runtime,
        leases
            .iter()
            .map(|&(session_index, id)| target.revoke(session_index, id)),
    )
}

/// Calls, their latencies and what they renewed, over some span of a run.
#[derive(Debug, Clone, Default)]
pub struct Tally {
    /// One entry per keepalive call ([`Op::Keepalive`]); failed calls are errors.
    pub record: Recorder,
    /// Leases renewed.
    pub renewed_count: u64,
    /// Leases found ended.
    pub lost_count: u64,
    /// The reason of the first failed call.
    pub first_error: Option<String>,
}

impl Tally {
    fn record(&mut self, latency: Duration, outcome: &Result<Renewal, String>) {
        self.record.record(Op::Keepalive, latency, outcome.is_err());
        match outcome {
            Ok(renewal) => {
                self.renewed_count += renewal.renewed_count;
                self.lost_count += renewal.lost_count;
            }
            Err(error) => {
                if self.first_error.is_none() {
                    self.first_error = Some(error.clone());
                }
            }
        }
    }

    fn merge(&mut self, other: &Tally) {
        self.record.merge(&other.record);
        self.renewed_count += other.renewed_count;
        self.lost_count += other.lost_count;
        if self.first_error.is_none() {
            self.first_error.clone_from(&other.first_error);
        }
    }

    fn reset(&mut self) {
        self.record.reset();
        self.renewed_count = 0;
        self.lost_count = 0;
        self.first_error = None;
    }
}

/// Runs every session's batches for `duration` on `runtime`; returns the merged tally and
/// the window. Calls still in flight at the end are dropped, not counted.
///
/// # Errors
/// A session task failed.
pub fn run<B: LeaseBatch>(
    runtime: &tokio::runtime::Runtime,
    sessions: Vec<Vec<B>>,
    pipeline: usize,
    duration: Duration,
    progress: Option<&mpsc::Sender<Tally>>,
) -> Result<(Tally, Duration), String> {
    let started = Instant::now();
    let deadline = started + duration;
    let tasks: Vec<_> = sessions
        .into_iter()
        .map(|batches| runtime.spawn(run_session(batches, pipeline, deadline, progress.cloned())))
        .collect();
    let mut total = Tally::default();
    runtime.block_on(async {
        for task in tasks {
            let tally = task
                .await
                .map_err(|join_error| format!("a lease session failed: {join_error}"))?;
            total.merge(&tally);
        }
        Ok::<_, String>(())
    })?;
    Ok((total, deadline.min(Instant::now()) - started))
}

/// One session: its batches in turn, up to `pipeline` calls in flight, until `deadline`.
async fn run_session<B: LeaseBatch>(
    batches: Vec<B>,
    pipeline: usize,
    deadline: Instant,
    progress: Option<mpsc::Sender<Tally>>,
) -> Tally {
    let mut idle: VecDeque<B> = batches.into();
    let mut in_flight = FuturesUnordered::new();
    let mut total = Tally::default();
    let mut recent = Tally::default();
    let mut next_progress = Instant::now() + PROGRESS_INTERVAL;
    loop {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        if now >= next_progress {
            if let Some(progress) = &progress {
                let _ = progress.send(recent.clone());
            }
            recent.reset();
            next_progress += PROGRESS_INTERVAL;
        }
        while in_flight.len() < pipeline {
            let Some(batch) = idle.pop_front() else { break };
            in_flight.push(async move {
                let started = Instant::now();
                let (batch, outcome) = batch.keepalive().await;
                (batch, started.elapsed(), outcome)
            });
        }
        let sleep = tokio::time::sleep_until(next_progress.min(deadline).into());
        tokio::select! {
            done = in_flight.next(), if !in_flight.is_empty() => {
                if let Some((batch, latency, outcome)) = done {
                    total.record(latency, &outcome);
                    recent.record(latency, &outcome);
                    // A batch whose every lease ended has nothing left to renew.
                    if batch.lease_count() > 0 {
                        idle.push_back(batch);
                    }
                }
            }
            () = sleep => {}
        }
    }
    if let Some(progress) = &progress {
        let _ = progress.send(recent);
    }
    total
}

/// Prints one progress line per second until every sender is gone.
pub fn report_progress(progress: &mpsc::Receiver<Tally>, is_quiet: bool) {
    let started = Instant::now();
    let mut interval = Tally::default();
    let mut interval_started = started;
    let mut renewed_total = 0_u64;
    loop {
        let next_line = interval_started + Duration::from_secs(1);
        match progress.recv_timeout(next_line.saturating_duration_since(Instant::now())) {
            Ok(part) => {
                renewed_total += part.renewed_count;
                interval.merge(&part);
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        }
        let now = Instant::now();
        if now >= next_line {
            if !is_quiet {
                let length = now - interval_started;
                let calls = report::Summary::of(
                    &interval.record.combined(),
                    interval.record.error_count(),
                    length,
                );
                eprintln!(
                    "[{:>5.1}s] {:>10.0} leases renewed/s (overall {:>10.0})  {:>8.0} calls/s  \
                     p50 {:>8.1} µs  p99 {:>8.1} µs  errors {}  lost {}",
                    (now - started).as_secs_f64(),
                    report::per_second(interval.renewed_count, length),
                    report::per_second(renewed_total, now - started),
                    calls.ops_per_sec,
                    calls.p50_us,
                    calls.p99_us,
                    calls.errors,
                    interval.lost_count
                );
            }
            interval.reset();
            interval_started = now;
        }
    }
}

/// Tessera's leases through one shared [`Client`], as an application's tasks would share it.
pub struct TesseraLeases {
    client: Client,
}

impl TesseraLeases {
    /// Leases through `client` (remote or embedded).
    pub fn new(client: Client) -> Self {
        Self { client }
    }
}

impl LeaseTarget for TesseraLeases {
    type Batch = TesseraBatch;

    async fn grant(&self, _session_index: usize, ttl: Duration) -> Result<u64, String> {
        self.client
            .grant_lease(ttl)
            .await
            .map_err(|error| error.to_string())
    }

    async fn batch(&self, _session_index: usize, ids: Vec<u64>) -> Result<TesseraBatch, String> {
        Ok(TesseraBatch {
            client: self.client.clone(),
            ids,
        })
    }

    async fn revoke(&self, _session_index: usize, id: u64) -> Result<(), String> {
        self.client
            .revoke_lease(id)
            .await
            .map(drop)
            .map_err(|error| error.to_string())
    }
}

/// Tessera lease ids renewed by one `Client::keepalive` call.
pub struct TesseraBatch {
    client: Client,
    ids: Vec<u64>,
}

impl LeaseBatch for TesseraBatch {
    fn lease_count(&self) -> usize {
        self.ids.len()
    }

    async fn keepalive(mut self) -> (Self, Result<Renewal, String>) {
        let outcome = match self.client.keepalive(&self.ids).await {
            Ok(ttls) if ttls.len() == self.ids.len() => {
                let asked_count = self.ids.len();
                self.ids = self
                    .ids
                    .iter()
                    .zip(&ttls)
                    .filter(|(_, ttl)| ttl.is_some())
                    .map(|(id, _)| *id)
                    .collect();
                let renewed_count = self.ids.len();
                Ok(Renewal {
                    renewed_count: renewed_count as u64,
                    lost_count: (asked_count - renewed_count) as u64,
                })
            }
            Ok(ttls) => Err(format!(
                "keepalive of {} ids answered {} ttls",
                self.ids.len(),
                ttls.len()
            )),
            Err(error) => Err(error.to_string()),
        };
        (self, outcome)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::sync::{Arc, Mutex};

    use super::*;

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn slices_cover_every_lease_once_and_batches_fit_them() {
        for (lease_count, session_count) in [(10_000, 50), (10, 3), (7, 7), (1, 1)] {
            let plan = LeasePlan::new(
                lease_count,
                1_000,
                session_count,
                1,
                Duration::from_secs(60),
            )
            .unwrap();
            let mut next = 0;
            for session_index in 0..session_count {
                let slice = plan.slice_of(session_index);
                assert_eq!(slice.start, next, "{lease_count}/{session_count}");
                assert!(!slice.is_empty());
                next = slice.end;
            }
            assert_eq!(next, lease_count);
        }
        let plan = LeasePlan::new(10_000, 1_000, 50, 1, Duration::from_secs(60)).unwrap();
        assert_eq!(plan.batch_size(), 200, "a slice of 200 is one call");
        let plan = LeasePlan::new(10_000, 1_000, 10, 1, Duration::from_secs(60)).unwrap();
        assert_eq!(plan.batch_size(), 1_000);
        assert!(LeasePlan::new(5, 1, 6, 1, Duration::from_secs(60)).is_err());
        assert!(LeasePlan::new(5, 0, 1, 1, Duration::from_secs(60)).is_err());
        assert!(LeasePlan::new(0, 1, 1, 1, Duration::from_secs(60)).is_err());
        assert!(LeasePlan::new(5, 1, 1, 1, Duration::from_millis(500)).is_err());
    }

    /// A target in memory: ids from 1, and every id divisible by `LOST_EVERY` has ended by
    /// its first keepalive.
    #[derive(Default)]
    struct FakeTarget {
        next_id: Mutex<u64>,
        revoked: Mutex<HashSet<u64>>,
        calls: Arc<Mutex<Vec<usize>>>,
    }

    const LOST_EVERY: u64 = 7;

    struct FakeBatch {
        ids: Vec<u64>,
        calls: Arc<Mutex<Vec<usize>>>,
    }

    impl LeaseTarget for FakeTarget {
        type Batch = FakeBatch;

        async fn grant(&self, _session_index: usize, _ttl: Duration) -> Result<u64, String> {
            let mut next_id = self.next_id.lock().unwrap();
            *next_id += 1;
            Ok(*next_id)
        }

        async fn batch(&self, _session_index: usize, ids: Vec<u64>) -> Result<FakeBatch, String> {
            Ok(FakeBatch {
                ids,
                calls: self.calls.clone(),
            })
        }

        async fn revoke(&self, _session_index: usize, id: u64) -> Result<(), String> {
            assert!(
                self.revoked.lock().unwrap().insert(id),
                "revoked twice: {id}"
            );
            Ok(())
        }
    }

    impl LeaseBatch for FakeBatch {
        fn lease_count(&self) -> usize {
            self.ids.len()
        }

        async fn keepalive(mut self) -> (Self, Result<Renewal, String>) {
            self.calls.lock().unwrap().push(self.ids.len());
            tokio::time::sleep(Duration::from_millis(1)).await;
            let asked_count = self.ids.len() as u64;
            self.ids.retain(|id| id % LOST_EVERY != 0);
            let renewed_count = self.ids.len() as u64;
            (
                self,
                Ok(Renewal {
                    renewed_count,
                    lost_count: asked_count - renewed_count,
                }),
            )
        }
    }

    #[test]
    fn sessions_renew_their_batches_and_count_each_lost_lease_once() {
        let runtime = runtime();
        let target = FakeTarget::default();
        let plan = LeasePlan::new(100, 8, 3, 2, Duration::from_secs(60)).unwrap();
        let granted = grant(&runtime, &target, &plan).unwrap();
        assert_eq!(granted.sessions.len(), 3);
        assert_eq!(granted.leases.len(), 100);
        let ids: HashSet<u64> = granted.leases.iter().map(|&(_, id)| id).collect();
        assert_eq!(ids.len(), 100, "ids are distinct");
        for batches in &granted.sessions {
            assert!(batches.iter().all(|batch| batch.lease_count() <= 8));
        }
        let (tally, elapsed) = run(
            &runtime,
            granted.sessions,
            plan.pipeline,
            Duration::from_millis(300),
            None,
        )
        .unwrap();
        assert!(elapsed <= Duration::from_millis(300));
        let lost_expected = (1..=100).filter(|id| id % LOST_EVERY == 0).count() as u64;
        assert_eq!(tally.lost_count, lost_expected);
        assert_eq!(tally.record.error_count(), 0);
        let calls = target.calls.lock().unwrap().len() as u64;
        assert!(
            calls >= tally.record.count(),
            "calls in flight at the end are dropped"
        );
        assert!(
            tally.record.op(Op::Keepalive).count() > 13,
            "every batch more than once"
        );
        assert!(tally.renewed_count > 100 - lost_expected);
        let (failed_count, _) = revoke(&runtime, &target, &granted.leases);
        assert_eq!(failed_count, 0);
        assert_eq!(target.revoked.lock().unwrap().len(), 100);
    }

    #[test]
    fn embedded_tessera_renews_every_lease() {
        let client = Client::embedded(tessera_client::EmbeddedConfig {
            cores: 2,
            durability: tessera_server::config::Durability::Memory,
            ..tessera_client::EmbeddedConfig::default()
        })
        .unwrap();
        let runtime = runtime();
        let target = TesseraLeases::new(client.clone());
        let plan = LeasePlan::new(200, 50, 2, 1, Duration::from_secs(60)).unwrap();
        let granted = grant(&runtime, &target, &plan).unwrap();
        let (tally, _) = run(
            &runtime,
            granted.sessions,
            plan.pipeline,
            Duration::from_millis(200),
            None,
        )
        .unwrap();
        assert_eq!(tally.record.error_count(), 0, "{:?}", tally.first_error);
        assert_eq!(tally.lost_count, 0);
        assert!(
            tally.renewed_count >= 200,
            "renewed {}",
            tally.renewed_count
        );
        assert_eq!(
            tally.renewed_count % 50,
            0,
            "every call renews a whole batch"
        );
        assert_eq!(revoke(&runtime, &target, &granted.leases).0, 0);
        assert!(runtime.block_on(client.leases()).unwrap().is_empty());
        client.shutdown();
    }
}
