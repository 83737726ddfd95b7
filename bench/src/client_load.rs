//! Load through an async client library on tokio: the path an application takes. It drives
//! the public `tessera_client::Client` API (the embedded mode, `--embedded`, with shards in
//! this process, and with `--driver client` a remote cluster) and, with the `etcd` feature,
//! etcd through `etcd-client` (see `etcd_load`).
//!
//! Each session is a task keeping up to `pipeline` calls in flight through its own
//! [`Caller`]; sessions are spread over the runtime's worker threads. Closed and open loop work
//! as in the network driver: in the open loop latency counts from the intended send time.

use std::future::Future;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use futures_util::stream::{FuturesUnordered, StreamExt};
use tessera_client::Client;

use crate::report::Recorder;
use crate::workload::{KeyPlan, Op, OpStream, WorkloadSpec};

/// How often a session hands its interval record to the progress reporter.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(250);

/// What every session does.
#[derive(Debug, Clone)]
pub struct ClientLoad {
    /// Sessions (tasks).
    pub session_count: usize,
    /// Calls in flight per session, at most.
    pub pipeline: usize,
    /// Intended operations per second per session (open loop).
    pub rate_per_session: Option<f64>,
    /// Operations per session at most.
    pub operation_count_max: Option<u64>,
    /// How long to run.
    pub duration: Option<Duration>,
}

/// How a session issues one operation: the library that is being measured.
pub trait Caller: Clone + Send + Sync + 'static {
    /// Issues `op` on `key` (writing `value` for a set). An error reply and a failed call are
    /// both `Err`.
    fn call<'call>(
        &'call self,
        op: Op,
        key: &'call [u8],
        value: &'call [u8],
    ) -> impl Future<Output = Result<(), ()>> + Send + 'call;
}

impl Caller for Client {
    async fn call(&self, op: Op, key: &[u8], value: &[u8]) -> Result<(), ()> {
        let outcome = match op {
            Op::Get => self.get(key).await.map(drop),
            Op::Set => self.put(key, value).await.map(drop),
            Op::Delete => self.delete(key).await.map(drop),
            Op::Incr => self.add(key, 1).await.map(drop),
            // The lease and lock workloads call through `lease_load` and `lock_load`, never
            // through a session.
            Op::Keepalive | Op::Lock | Op::Unlock | Op::LockPair | Op::Query => return Err(()),
        };
        outcome.map_err(|error| tracing::debug!(%error, "call failed"))
    }
}

/// Runs `load` on `runtime` and returns the merged record and the window. Session `i` calls
/// through `callers[i % callers.len()]` (a clone of it): one caller shared by all sessions,
/// or one per session.
///
/// With `preload`, the sessions instead write every key once (keys dealt round-robin) and
/// stop.
///
/// # Errors
/// A session could not be set up.
pub fn run<C: Caller>(
    runtime: &tokio::runtime::Runtime,
    callers: &[C],
    spec: &WorkloadSpec,
    load: &ClientLoad,
    preload: bool,
    progress: Option<&mpsc::Sender<Recorder>>,
) -> Result<(Recorder, Duration), String> {
    if callers.is_empty() {
        return Err("no client to run the sessions with".to_owned());
    }
    let started = Instant::now();
    let deadline = load.duration.map(|duration| started + duration);
    let mut sessions = Vec::with_capacity(load.session_count);
    for session_index in 0..load.session_count {
        let keys = if preload {
            KeyPlan::Sequential {
                next: session_index as u64,
                step: load.session_count as u64,
                end: spec.key_count,
            }
        } else {
            KeyPlan::Random(OpStream::new(spec, 1_000 + session_index as u64)?)
        };
        let session = Session {
            caller: callers[session_index % callers.len()].clone(),
            spec: spec.clone(),
            load: load.clone(),
            keys,
            deadline,
            progress: progress.cloned(),
            stagger: stagger(load, session_index),
        };
        sessions.push(runtime.spawn(session.run()));
    }
    let mut total = Recorder::new();
    runtime.block_on(async {
        for session in sessions {
            match session.await {
                Ok(record) => total.merge(&record),
                Err(join_error) => return Err(format!("a load session failed: {join_error}")),
            }
        }
        Ok(())
    })?;
    let elapsed = match deadline {
        Some(deadline) => deadline.min(Instant::now()) - started,
        None => started.elapsed(),
    };
    Ok((total, elapsed))
}

fn stagger(load: &ClientLoad, session_index: usize) -> Duration {
    match load.rate_per_session {
        #[allow(clippy::cast_precision_loss, reason = "small counts")]
        Some(rate) => Duration::from_secs_f64(
            session_index as f64 / (load.session_count as f64 * rate.max(1e-9)),
        ),
        None => Duration::ZERO,
    }
}

struct Session<C> {
    caller: C,
    spec: WorkloadSpec,
    load: ClientLoad,
    keys: KeyPlan,
    deadline: Option<Instant>,
    progress: Option<mpsc::Sender<Recorder>>,
    stagger: Duration,
}

impl<C: Caller> Session<C> {
    async fn run(mut self) -> Recorder {
        let value = self.spec.value();
        let interval = self
            .load
            .rate_per_session
            .map(|rate| Duration::from_secs_f64(1.0 / rate.max(1e-9)));
        let mut total = Recorder::new();
        let mut recent = Recorder::new();
        let mut in_flight = FuturesUnordered::new();
        let mut issued_count = 0_u64;
        let mut is_exhausted = false;
        let mut next_due = Instant::now() + self.stagger;
        let mut next_progress = Instant::now() + PROGRESS_INTERVAL;
        loop {
            let now = Instant::now();
            if self.deadline.is_some_and(|deadline| now >= deadline) {
                break;
            }
            if now >= next_progress {
                if let Some(progress) = &self.progress {
                    let _ = progress.send(recent.clone());
                }
                recent.reset();
                next_progress += PROGRESS_INTERVAL;
            }
            while !is_exhausted
                && in_flight.len() < self.load.pipeline
                && (interval.is_none() || next_due <= now)
            {
                let next = if self
                    .load
                    .operation_count_max
                    .is_some_and(|count_max| issued_count >= count_max)
                {
                    None
                } else {
                    self.keys.next()
                };
                let Some((op, key_index)) = next else {
                    is_exhausted = true;
                    break;
                };
                let mut key = Vec::with_capacity(self.spec.key_size);
                self.spec.write_key(key_index, &mut key);
                let started = match interval {
                    Some(interval) => {
                        let due = next_due;
                        next_due += interval;
                        due
                    }
                    None => now,
                };
                issued_count += 1;
                let caller = &self.caller;
                let value = &value;
                in_flight.push(async move {
                    let is_error = caller.call(op, &key, value).await.is_err();
                    (op, started, is_error)
                });
            }
            if is_exhausted && in_flight.is_empty() {
                break;
            }
            let mut wake_at = next_progress;
            if let Some(deadline) = self.deadline {
                wake_at = wake_at.min(deadline);
            }
            if interval.is_some() && !is_exhausted && in_flight.len() < self.load.pipeline {
                wake_at = wake_at.min(next_due);
            }
            let sleep = tokio::time::sleep_until(wake_at.into());
            tokio::select! {
                done = in_flight.next(), if !in_flight.is_empty() => {
                    if let Some((op, started, is_error)) = done {
                        let latency = started.elapsed();
                        total.record(op, latency, is_error);
                        recent.record(op, latency, is_error);
                    }
                }
                () = sleep => {}
            }
        }
        if let Some(progress) = &self.progress {
            let _ = progress.send(recent);
        }
        total
    }
}
