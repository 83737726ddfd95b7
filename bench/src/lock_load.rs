//! `--workload lock`: lock acquire/release pairs per second, through a client library on tokio.
//!
//! `--contenders` sessions each hold a lease of their own, granted before the measured window
//! and kept alive in the background while the session lives. For the window every session
//! loops: lock its lock name (waiting in line up to [`LOCK_WAIT`]), then unlock it with the
//! grant. With `--lock-names one` every session contends on one name; with `per-session` each
//! has its own, so nobody waits for anybody. A completed pair is the figure of the run; the
//! latency from asking for the lock to holding it goes into the `lock` histogram, that of the
//! unlock call into `unlock`, and that of the whole pair into `pair`.
//!
//! Two checks run on every grant, in and after the window ([`Checks`]). The tokens a lock
//! hands out must grow strictly in the order the sessions observe their grants (a grant is
//! observed after the previous holder's unlock was sent, so a correct lock never breaks this:
//! each break is a `token_violations`). And no two sessions may hold one lock at once: a
//! holder counter per lock name goes up once a grant arrives and down just before the unlock
//! is sent, and a grant that finds it above zero is an `overlaps`. A holder yields to the
//! scheduler once while it holds, so a session granted the same lock at the same moment gets
//! to run (on any worker) and be seen; an overlap that starts and ends inside one unlock's
//! round trip is not. Both counts must be 0.
//!
//! The window ends for new pairs only: a session finishes the pair it is in (so every lock is
//! released and every grant checked) but a pair that ends after the deadline is not counted.
//! A wait that ends without the lock is counted apart (`lock_timeouts`), as is an unlock the
//! target refused (the grant was no longer the holder's); failed calls are errors. Every
//! lease is revoked after the window (outside it), so a shared server is left as it was.
//!
//! The targets ([`LockTarget`]) are Tessera, through `Client::lease`, `Client::lock` and
//! `Client::unlock` (one shared client, remote or embedded), and with the `etcd` feature
//! etcd (`etcd_load`), whose v3 lock service is the `Lock`/`Unlock` RPCs.

use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use futures_util::stream::{self, StreamExt};
use tessera_client::{Client, Lease, LockGrant};

use crate::report::{self, Recorder};
use crate::setup::{self, SETUP_CONCURRENCY};
use crate::workload::Op;

/// How long one lock call waits in line before it gives up.
pub const LOCK_WAIT: Duration = Duration::from_secs(10);

/// Most contenders one run opens: each is a session with a lease (and, for etcd, a client
/// and connection), and a Tessera shard holds 100 000 waiters by default.
pub const CONTENDER_COUNT_MAX: usize = 10_000;

/// Prefix of every lock name: outside the benchmark's key space (`workload::KEY_PREFIX`),
/// so etcd's lock keys (`name/lease`) are never read, written or watched by other workloads.
pub const LOCK_PREFIX: &str = "tessera-bench:lock:";

/// How often a session adds its interval tally to the shared [`Progress`].
const PROGRESS_INTERVAL: Duration = Duration::from_millis(250);

/// Which lock names the sessions use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum LockNames {
    /// Every session contends on one lock.
    One,
    /// Each session has a lock of its own (uncontended).
    PerSession,
}

impl LockNames {
    /// The name used in reports and JSON.
    pub fn name(self) -> &'static str {
        match self {
            Self::One => "one",
            Self::PerSession => "per-session",
        }
    }
}

/// One session of a target: its lease and whatever it needs to lock with it. It belongs to
/// one task, which locks and unlocks through it in turn.
pub trait LockSession: Send + Sized + 'static {
    /// What unlocking a grant needs (Tessera's token, etcd's ownership key).
    type Grant: Send;

    /// Locks `name` for this session's lease, waiting in line up to `wait`. `Ok(None)` when
    /// the wait ended without the lock; otherwise the grant's fencing token and the grant.
    fn lock(
        &mut self,
        name: &[u8],
        wait: Duration,
    ) -> impl Future<Output = Result<Option<(u64, Self::Grant)>, String>> + Send;

    /// Releases the grant; `true` if it was still the holder's.
    fn unlock(
        &mut self,
        name: &[u8],
        grant: Self::Grant,
    ) -> impl Future<Output = Result<bool, String>> + Send;
}

/// A target with leases and locks.
pub trait LockTarget {
    /// One contender.
    type Session: LockSession;

    /// Opens session `session_index`: grants its lease of `ttl`, kept alive while the
    /// session lives.
    fn open(
        &self,
        session_index: usize,
        ttl: Duration,
    ) -> impl Future<Output = Result<Self::Session, String>>;

    /// Ends the session's lease now (releasing whatever it still holds).
    fn close(&self, session: Self::Session) -> impl Future<Output = Result<(), String>>;
}

/// The shape of a lock run, checked against itself.
#[derive(Debug, Clone)]
pub struct LockPlan {
    /// Sessions, each with its own lease.
    pub contender_count: usize,
    /// Which names they lock.
    pub names: LockNames,
    /// TTL of every session's lease.
    pub ttl: Duration,
}

impl LockPlan {
    /// Checks the settings against each other.
    ///
    /// # Errors
    /// A message naming the setting that is out of range.
    pub fn new(contender_count: usize, names: LockNames, ttl: Duration) -> Result<Self, String> {
        if !(1..=CONTENDER_COUNT_MAX).contains(&contender_count) {
            return Err(format!(
                "--contenders {contender_count} must be between 1 and {CONTENDER_COUNT_MAX}"
            ));
        }
        if ttl < Duration::from_secs(1) {
            return Err(format!(
                "--lease-ttl-secs {} must be at least 1 (etcd counts TTLs in whole seconds)",
                ttl.as_secs_f64()
            ));
        }
        Ok(Self {
            contender_count,
            names,
            ttl,
        })
    }

    /// Distinct lock names of the run.
    pub fn lock_count(&self) -> usize {
        match self.names {
            LockNames::One => 1,
            LockNames::PerSession => self.contender_count,
        }
    }

    /// The lock session `session_index` contends on, in `0..lock_count()`.
    pub fn lock_of(&self, session_index: usize) -> usize {
        assert!(
            session_index < self.contender_count,
            "session_index={session_index} contender_count={}",
            self.contender_count
        );
        match self.names {
            LockNames::One => 0,
            LockNames::PerSession => session_index,
        }
    }

    /// The name of lock `lock_index`.
    pub fn name(&self, lock_index: usize) -> Vec<u8> {
        assert!(
            lock_index < self.lock_count(),
            "lock_index={lock_index} lock_count={}",
            self.lock_count()
        );
        format!("{LOCK_PREFIX}{lock_index:05}").into_bytes()
    }
}

/// What the sessions saw of each lock, shared by all of them.
#[derive(Debug)]
pub struct Checks {
    /// Sessions that hold each lock as far as they know: from a grant's arrival to just
    /// before its unlock is sent.
    holder_counts: Vec<AtomicUsize>,
    /// The largest token each lock was observed to grant.
    last_tokens: Vec<AtomicU64>,
}

/// What [`Checks::granted`] found wrong with a grant.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Findings {
    /// Another session held the lock when this grant arrived.
    pub is_overlap: bool,
    /// The token was not above every token the lock was observed to grant before.
    pub is_token_violation: bool,
}

impl Checks {
    /// Checks for `lock_count` locks, none held, no token seen.
    pub fn new(lock_count: usize) -> Self {
        Self {
            holder_counts: (0..lock_count).map(|_| AtomicUsize::new(0)).collect(),
            last_tokens: (0..lock_count).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// A session now holds lock `lock_index` with `token`.
    pub fn granted(&self, lock_index: usize, token: u64) -> Findings {
        let holder_count_before = self.holder_counts[lock_index].fetch_add(1, Ordering::SeqCst);
        let token_before = self.last_tokens[lock_index].fetch_max(token, Ordering::SeqCst);
        Findings {
            is_overlap: holder_count_before > 0,
            is_token_violation: token <= token_before,
        }
    }

    /// A session that held lock `lock_index` is about to unlock it.
    pub fn releasing(&self, lock_index: usize) {
        let holder_count_before = self.holder_counts[lock_index].fetch_sub(1, Ordering::SeqCst);
        assert!(
            holder_count_before > 0,
            "lock_index={lock_index}: released more often than granted"
        );
    }
}

/// Pairs, their latencies and what the checks found, over some span of a run.
#[derive(Debug, Clone, Default)]
pub struct Tally {
    /// [`Op::Lock`] (ask to grant), [`Op::Unlock`] and [`Op::LockPair`] (ask to unlocked) of
    /// every pair that ended within the window, and failed calls as errors.
    pub record: Recorder,
    /// Lock calls whose wait ended without the lock (in or after the window).
    pub lock_timeout_count: u64,
    /// Unlocks the target refused: the grant was no longer the holder's.
    pub unlock_refused_count: u64,
    /// Grants that arrived while another session held the lock (in or after the window).
    pub overlap_count: u64,
    /// Grants whose token did not grow (in or after the window).
    pub token_violation_count: u64,
    /// Grants checked after the window, by pairs that were not counted.
    pub drained_pair_count: u64,
    /// The reason of the first failed call.
    pub first_error: Option<String>,
}

impl Tally {
    /// An empty tally whose histograms exist and are in memory, so that the first pairs of
    /// the window do not pay for them (about 3 ms per session otherwise, which delayed the
    /// 50th session's first lock by 100 ms).
    fn prepared() -> Self {
        let mut tally = Self::default();
        tally.record.prepare(&[Op::Lock, Op::Unlock, Op::LockPair]);
        tally
    }

    fn error(&mut self, op: Op, latency: Duration, error: String) {
        self.record.record(op, latency, true);
        if self.first_error.is_none() {
            self.first_error = Some(error);
        }
    }

    fn merge(&mut self, other: &Tally) {
        self.record.merge(&other.record);
        self.lock_timeout_count += other.lock_timeout_count;
        self.unlock_refused_count += other.unlock_refused_count;
        self.overlap_count += other.overlap_count;
        self.token_violation_count += other.token_violation_count;
        self.drained_pair_count += other.drained_pair_count;
        if self.first_error.is_none() {
            self.first_error.clone_from(&other.first_error);
        }
    }

    fn reset(&mut self) {
        self.record.reset();
        self.lock_timeout_count = 0;
        self.unlock_refused_count = 0;
        self.overlap_count = 0;
        self.token_violation_count = 0;
        self.drained_pair_count = 0;
        self.first_error = None;
    }

    /// Pairs completed within the window.
    pub fn pair_count(&self) -> u64 {
        self.record.op(Op::LockPair).count()
    }
}

/// The tally of the current progress interval: the sessions merge theirs into it, the
/// reporter swaps it out once a second.
///
/// Sessions do not send copies of their tallies (as the other workloads' sessions send
/// their records): a copy of three histograms is about 660 KiB of fresh memory, and 50
/// sessions sending four a second doubled the contended run's acquire p99 (10 → 23 ms),
/// since the allocations and page faults land on the worker that hands the lock over.
/// Merging into one tally allocates nothing.
#[derive(Debug)]
pub struct Progress {
    interval: Mutex<Tally>,
}

impl Default for Progress {
    fn default() -> Self {
        Self {
            interval: Mutex::new(Tally::prepared()),
        }
    }
}

impl Progress {
    fn interval(&self) -> std::sync::MutexGuard<'_, Tally> {
        self.interval.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn add(&self, part: &Tally) {
        self.interval().merge(part);
    }

    /// Hands out the interval so far, leaving `spare` (emptied) in its place.
    fn swap(&self, spare: &mut Tally) {
        spare.reset();
        std::mem::swap(&mut *self.interval(), spare);
    }
}

/// Sessions opened, with their lease each.
pub struct Opened<S> {
    /// Session `i` at index `i`.
    pub sessions: Vec<S>,
    /// Time from the first lease grant to the last session ready.
    pub elapsed: Duration,
}

/// Opens `plan.contender_count` sessions through `target`.
///
/// # Errors
/// A session could not be opened (the first failure).
pub fn open<T: LockTarget>(
    runtime: &tokio::runtime::Runtime,
    target: &T,
    plan: &LockPlan,
) -> Result<Opened<T::Session>, String> {
    let started = Instant::now();
    runtime.block_on(async {
        let mut sessions: Vec<Option<T::Session>> =
            (0..plan.contender_count).map(|_| None).collect();
        let mut opening = stream::iter(0..plan.contender_count)
            .map(|session_index| async move {
                (session_index, target.open(session_index, plan.ttl).await)
            })
            .buffer_unordered(SETUP_CONCURRENCY);
        while let Some((session_index, outcome)) = opening.next().await {
            let session = outcome.map_err(|error| {
                format!(
                    "session {session_index} of {}: {error}",
                    plan.contender_count
                )
            })?;
            sessions[session_index] = Some(session);
        }
        drop(opening);
        let sessions: Vec<T::Session> = sessions.into_iter().flatten().collect();
        assert_eq!(sessions.len(), plan.contender_count, "every session opened");
        Ok(Opened {
            sessions,
            elapsed: started.elapsed(),
        })
    })
}

/// Closes `sessions` (after the window), revoking their leases; returns how many closings
/// failed, and the first failure's reason.
pub fn close<T: LockTarget>(
    runtime: &tokio::runtime::Runtime,
    target: &T,
    sessions: Vec<T::Session>,
) -> (usize, Option<String>) {
    setup::count_failures(
        runtime,
        sessions.into_iter().map(|session| target.close(session)),
    )
}

/// Runs every session's pairs for `duration` on `runtime`; returns the sessions (to close),
/// the merged tally and the window.
///
/// # Errors
/// A session task failed.
pub fn run<S: LockSession>(
    runtime: &tokio::runtime::Runtime,
    plan: &LockPlan,
    sessions: Vec<S>,
    duration: Duration,
    progress: Option<&Arc<Progress>>,
) -> Result<(Vec<S>, Tally, Duration), String> {
    assert_eq!(sessions.len(), plan.contender_count);
    let checks = Arc::new(Checks::new(plan.lock_count()));
    // Everything a contender needs is made before the window opens.
    let contenders: Vec<Contender<S>> = sessions
        .into_iter()
        .enumerate()
        .map(|(session_index, session)| {
            let lock_index = plan.lock_of(session_index);
            Contender {
                session,
                name: plan.name(lock_index),
                lock_index,
                checks: checks.clone(),
                progress: progress.cloned(),
                total: Tally::prepared(),
                recent: Tally::prepared(),
            }
        })
        .collect();
    let started = Instant::now();
    let deadline = started + duration;
    let tasks: Vec<_> = contenders
        .into_iter()
        .map(|contender| runtime.spawn(contender.run(deadline)))
        .collect();
    let mut total = Tally::default();
    let mut sessions = Vec::with_capacity(tasks.len());
    runtime.block_on(async {
        for task in tasks {
            let (session, tally) = task
                .await
                .map_err(|join_error| format!("a lock session failed: {join_error}"))?;
            total.merge(&tally);
            sessions.push(session);
        }
        Ok::<_, String>(())
    })?;
    Ok((sessions, total, deadline.min(Instant::now()) - started))
}

/// One session's loop and what it reports to.
struct Contender<S> {
    session: S,
    name: Vec<u8>,
    lock_index: usize,
    checks: Arc<Checks>,
    progress: Option<Arc<Progress>>,
    /// The whole window.
    total: Tally,
    /// Since the last progress report.
    recent: Tally,
}

impl<S: LockSession> Contender<S> {
    /// Pairs until the deadline (the last one finished, not counted); returns the session
    /// and its tally.
    async fn run(mut self, deadline: Instant) -> (S, Tally) {
        let mut next_progress = Instant::now() + PROGRESS_INTERVAL;
        loop {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            if now >= next_progress {
                if let Some(progress) = &self.progress {
                    progress.add(&self.recent);
                }
                self.recent.reset();
                next_progress += PROGRESS_INTERVAL;
            }
            self.pair(deadline).await;
        }
        if let Some(progress) = &self.progress {
            progress.add(&self.recent);
        }
        (self.session, self.total)
    }

    /// One lock and unlock, recorded into both tallies if it ended by `deadline`.
    async fn pair(&mut self, deadline: Instant) {
        let started = Instant::now();
        let outcome = self.session.lock(&self.name, LOCK_WAIT).await;
        let acquired = Instant::now();
        let (token, grant) = match outcome {
            Ok(Some(granted)) => granted,
            Ok(None) => {
                for tally in [&mut self.total, &mut self.recent] {
                    tally.lock_timeout_count += 1;
                }
                return;
            }
            Err(error) => {
                if acquired <= deadline {
                    self.total
                        .error(Op::Lock, acquired - started, error.clone());
                    self.recent.error(Op::Lock, acquired - started, error);
                }
                return;
            }
        };
        let findings = self.checks.granted(self.lock_index, token);
        // While it holds, the session lets every other ready task run once, so that a
        // session granted the same lock now would be seen holding it.
        tokio::task::yield_now().await;
        self.checks.releasing(self.lock_index);
        let unlock_started = Instant::now();
        let released = self.session.unlock(&self.name, grant).await;
        let ended = Instant::now();
        let is_counted = ended <= deadline;
        for tally in [&mut self.total, &mut self.recent] {
            tally.overlap_count += u64::from(findings.is_overlap);
            tally.token_violation_count += u64::from(findings.is_token_violation);
            if !is_counted {
                tally.drained_pair_count += 1;
                continue;
            }
            tally.record.record(Op::Lock, acquired - started, false);
            match &released {
                Ok(true) => {
                    tally
                        .record
                        .record(Op::Unlock, ended - unlock_started, false);
                    tally.record.record(Op::LockPair, ended - started, false);
                }
                Ok(false) => {
                    tally.unlock_refused_count += 1;
                    tally.error(
                        Op::Unlock,
                        ended - unlock_started,
                        format!("unlock of token {token} refused: no longer the holder"),
                    );
                }
                Err(error) => tally.error(Op::Unlock, ended - unlock_started, error.clone()),
            }
        }
    }
}

/// Prints one progress line per second from `progress` until `done` is dropped.
pub fn report_progress(progress: &Progress, done: &mpsc::Receiver<()>, is_quiet: bool) {
    let started = Instant::now();
    let mut interval = Tally::prepared();
    let mut interval_started = started;
    let mut pair_total = 0_u64;
    loop {
        let next_line = interval_started + Duration::from_secs(1);
        match done.recv_timeout(next_line.saturating_duration_since(Instant::now())) {
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => return,
        }
        let now = Instant::now();
        progress.swap(&mut interval);
        pair_total += interval.pair_count();
        if !is_quiet {
            let length = now - interval_started;
            let acquire = interval.record.op(Op::Lock);
            let acquire = report::Summary::of(&acquire.histogram, 0, length);
            eprintln!(
                "[{:>5.1}s] {:>9.0} pairs/s (overall {:>9.0})  acquire p50 {:>8.1} µs  \
                 p99 {:>8.1} µs  errors {}  timeouts {}  overlaps {}  token violations {}",
                (now - started).as_secs_f64(),
                report::per_second(interval.pair_count(), length),
                report::per_second(pair_total, now - started),
                acquire.p50_us,
                acquire.p99_us,
                interval.record.error_count(),
                interval.lock_timeout_count,
                interval.overlap_count,
                interval.token_violation_count
            );
        }
        interval_started = now;
    }
}

/// Tessera's locks through one shared [`Client`], as an application's tasks would share it.
pub struct TesseraLocks {
    client: Client,
}

impl TesseraLocks {
    /// Locks through `client` (remote or embedded).
    pub fn new(client: Client) -> Self {
        Self { client }
    }
}

impl LockTarget for TesseraLocks {
    type Session = TesseraLockSession;

    async fn open(
        &self,
        _session_index: usize,
        ttl: Duration,
    ) -> Result<TesseraLockSession, String> {
        let lease = self
            .client
            .lease(ttl)
            .await
            .map_err(|error| format!("lease: {error}"))?;
        Ok(TesseraLockSession {
            client: self.client.clone(),
            lease,
        })
    }

    async fn close(&self, session: TesseraLockSession) -> Result<(), String> {
        let TesseraLockSession { client, lease } = session;
        let id = lease.id();
        match lease.revoke(&client).await {
            Ok(true) => Ok(()),
            Ok(false) => Err(format!("lease {id} had ended before it was revoked")),
            Err(error) => Err(format!("revoke lease {id}: {error}")),
        }
    }
}

/// A Tessera contender: its lease, renewed by the client's keeper while this lives.
pub struct TesseraLockSession {
    client: Client,
    lease: Lease,
}

impl LockSession for TesseraLockSession {
    type Grant = LockGrant;

    async fn lock(
        &mut self,
        name: &[u8],
        wait: Duration,
    ) -> Result<Option<(u64, LockGrant)>, String> {
        match self.client.lock(name, self.lease.id(), wait).await {
            Ok(Some(grant)) => Ok(Some((grant.token, grant))),
            Ok(None) => Ok(None),
            Err(error) => Err(error.to_string()),
        }
    }

    async fn unlock(&mut self, name: &[u8], grant: LockGrant) -> Result<bool, String> {
        self.client
            .unlock(name, grant.token)
            .await
            .map_err(|error| error.to_string())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::Mutex;

    use super::*;

    fn runtime(worker_count: usize) -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(worker_count)
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn plans_name_one_lock_or_one_per_session() {
        let one = LockPlan::new(50, LockNames::One, Duration::from_secs(60)).unwrap();
        assert_eq!(one.lock_count(), 1);
        assert!((0..50).all(|session_index| one.lock_of(session_index) == 0));
        assert_eq!(one.name(0), b"tessera-bench:lock:00000");
        let own = LockPlan::new(50, LockNames::PerSession, Duration::from_secs(60)).unwrap();
        assert_eq!(own.lock_count(), 50);
        assert_eq!(own.lock_of(49), 49);
        assert_eq!(own.name(49), b"tessera-bench:lock:00049");
        assert!(!LOCK_PREFIX
            .as_bytes()
            .starts_with(crate::workload::KEY_PREFIX));
        assert!(LockPlan::new(0, LockNames::One, Duration::from_secs(60)).is_err());
        assert!(LockPlan::new(
            CONTENDER_COUNT_MAX + 1,
            LockNames::One,
            Duration::from_secs(60)
        )
        .is_err());
        assert!(LockPlan::new(1, LockNames::One, Duration::from_millis(999)).is_err());
    }

    #[test]
    fn checks_see_overlaps_and_tokens_that_do_not_grow() {
        let checks = Checks::new(2);
        assert_eq!(checks.granted(0, 5), Findings::default());
        // A second holder of lock 0 before the first releases it, with a smaller token.
        assert_eq!(
            checks.granted(0, 4),
            Findings {
                is_overlap: true,
                is_token_violation: true
            }
        );
        checks.releasing(0);
        checks.releasing(0);
        // Lock 1 is independent of lock 0.
        assert_eq!(checks.granted(1, 1), Findings::default());
        checks.releasing(1);
        assert_eq!(
            checks.granted(0, 5),
            Findings {
                is_overlap: false,
                is_token_violation: true
            },
            "the same token twice"
        );
        checks.releasing(0);
        assert_eq!(checks.granted(0, 6), Findings::default());
        checks.releasing(0);
    }

    /// Locks in memory, first come first served, with a token per grant from one counter.
    /// With `is_broken` a lock is granted to whoever asks, held or not.
    #[derive(Default)]
    struct FakeLocks {
        is_broken: bool,
        state: Arc<Mutex<FakeState>>,
    }

    #[derive(Default)]
    struct FakeState {
        next_token: u64,
        holders: HashMap<Vec<u8>, (usize, u64)>,
        waiters: HashMap<Vec<u8>, Vec<tokio::sync::oneshot::Sender<u64>>>,
        leases_open: usize,
    }

    struct FakeSession {
        session_index: usize,
        is_broken: bool,
        state: Arc<Mutex<FakeState>>,
    }

    impl LockTarget for FakeLocks {
        type Session = FakeSession;

        async fn open(&self, session_index: usize, _ttl: Duration) -> Result<FakeSession, String> {
            self.state.lock().unwrap().leases_open += 1;
            Ok(FakeSession {
                session_index,
                is_broken: self.is_broken,
                state: self.state.clone(),
            })
        }

        async fn close(&self, _session: FakeSession) -> Result<(), String> {
            self.state.lock().unwrap().leases_open -= 1;
            Ok(())
        }
    }

    impl LockSession for FakeSession {
        type Grant = u64;

        async fn lock(
            &mut self,
            name: &[u8],
            wait: Duration,
        ) -> Result<Option<(u64, u64)>, String> {
            let waiting = {
                let mut state = self.state.lock().unwrap();
                if self.is_broken || !state.holders.contains_key(name) {
                    state.next_token += 1;
                    let token = state.next_token;
                    state
                        .holders
                        .insert(name.to_vec(), (self.session_index, token));
                    return Ok(Some((token, token)));
                }
                let (sender, receiver) = tokio::sync::oneshot::channel();
                state.waiters.entry(name.to_vec()).or_default().push(sender);
                receiver
            };
            match tokio::time::timeout(wait, waiting).await {
                Ok(Ok(token)) => {
                    let mut state = self.state.lock().unwrap();
                    state
                        .holders
                        .insert(name.to_vec(), (self.session_index, token));
                    Ok(Some((token, token)))
                }
                Ok(Err(_)) => Err("the fake dropped a waiter".to_owned()),
                Err(_) => Ok(None),
            }
        }

        async fn unlock(&mut self, name: &[u8], token: u64) -> Result<bool, String> {
            tokio::task::yield_now().await;
            let mut state = self.state.lock().unwrap();
            if state.holders.get(name).map(|&(_, held)| held) != Some(token) {
                return Ok(false);
            }
            state.holders.remove(name);
            // The first waiter still waiting gets the lock; its holder entry is written
            // here, so nobody else takes the lock before the waiter runs.
            while let Some(next) = state
                .waiters
                .get_mut(name)
                .and_then(|line| (!line.is_empty()).then(|| line.remove(0)))
            {
                state.next_token += 1;
                let token = state.next_token;
                if next.send(token).is_ok() {
                    state.holders.insert(name.to_vec(), (usize::MAX, token));
                    break;
                }
            }
            Ok(true)
        }
    }

    fn run_fake(names: LockNames, is_broken: bool) -> (Tally, Arc<Mutex<FakeState>>) {
        let runtime = runtime(2);
        let target = FakeLocks {
            is_broken,
            ..FakeLocks::default()
        };
        let plan = LockPlan::new(8, names, Duration::from_secs(60)).unwrap();
        let opened = open(&runtime, &target, &plan).unwrap();
        assert_eq!(opened.sessions.len(), 8);
        assert_eq!(target.state.lock().unwrap().leases_open, 8);
        let (sessions, tally, elapsed) = run(
            &runtime,
            &plan,
            opened.sessions,
            Duration::from_millis(200),
            None,
        )
        .unwrap();
        assert!(elapsed <= Duration::from_millis(200));
        assert_eq!(sessions.len(), 8);
        assert_eq!(close(&runtime, &target, sessions).0, 0);
        assert_eq!(target.state.lock().unwrap().leases_open, 0);
        (tally, target.state.clone())
    }

    #[test]
    fn contenders_take_turns_and_every_lock_ends_released() {
        for names in [LockNames::One, LockNames::PerSession] {
            let (tally, state) = run_fake(names, false);
            assert_eq!(tally.record.error_count(), 0, "{:?}", tally.first_error);
            assert_eq!(tally.overlap_count, 0, "{names:?}");
            assert_eq!(tally.token_violation_count, 0, "{names:?}");
            assert_eq!(tally.lock_timeout_count, 0);
            assert!(
                tally.pair_count() > 100,
                "{names:?}: {}",
                tally.pair_count()
            );
            assert_eq!(tally.record.op(Op::Lock).count(), tally.pair_count());
            assert_eq!(tally.record.op(Op::Unlock).count(), tally.pair_count());
            assert!(
                state.lock().unwrap().holders.is_empty(),
                "{names:?}: the last pairs finish after the window"
            );
        }
    }

    #[test]
    fn a_lock_that_grants_twice_is_caught() {
        let (tally, _) = run_fake(LockNames::One, true);
        assert!(tally.overlap_count > 0, "{tally:?}");
        assert!(
            tally.unlock_refused_count > 0,
            "a holder that lost its grant to another is refused"
        );
    }

    #[test]
    fn embedded_tessera_hands_one_lock_over_in_order() {
        let client = Client::embedded(tessera_client::EmbeddedConfig {
            cores: 2,
            durability: tessera_server::config::Durability::Memory,
            ..tessera_client::EmbeddedConfig::default()
        })
        .unwrap();
        let runtime = runtime(2);
        let target = TesseraLocks::new(client.clone());
        for names in [LockNames::One, LockNames::PerSession] {
            let plan = LockPlan::new(6, names, Duration::from_secs(60)).unwrap();
            let opened = open(&runtime, &target, &plan).unwrap();
            let (sessions, tally, _) = run(
                &runtime,
                &plan,
                opened.sessions,
                Duration::from_millis(300),
                None,
            )
            .unwrap();
            assert_eq!(tally.record.error_count(), 0, "{:?}", tally.first_error);
            assert_eq!(tally.overlap_count, 0, "{names:?}");
            assert_eq!(tally.token_violation_count, 0, "{names:?}");
            assert_eq!(tally.lock_timeout_count, 0, "{names:?}");
            assert!(tally.pair_count() > 6, "{names:?}: {}", tally.pair_count());
            assert_eq!(close(&runtime, &target, sessions).0, 0);
        }
        assert!(runtime.block_on(client.leases()).unwrap().is_empty());
        client.shutdown();
    }
}
