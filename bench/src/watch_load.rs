//! Watchers and the timed writer of the watch workloads, on the public client API.
//!
//! Each watcher is a task following one [`tessera_client::Watch`] on the key prefix; it
//! counts the events it receives and, in `watch-latency`, records each event's put-to-event
//! latency. The writer of `watch-latency` stamps every value with its send time (nanoseconds
//! since the run's epoch, little-endian, in the value's first 8 bytes), so a watcher needs no
//! shared map of sends: latency is its receive time less the stamp, on the same monotonic
//! clock of this process. A watch that ends with an error (a lagging watcher is cancelled by
//! the server or by the client's bounded buffer) is counted and opened again from now, so
//! the number of watchers stays what was asked for.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use hdrhistogram::Histogram;
use tessera_client::{Client, ClientError, KeyRange, WatchMessage, WatchOptions};
use tokio::task::JoinHandle;

use crate::report::{Recorder, LATENCY_NS_MAX};
use crate::workload::{Op, WorkloadSpec};

/// Longest wait for every watch to be open on the server before the window starts.
const OPEN_TIMEOUT: Duration = Duration::from_secs(20);

/// Longest wait, after the writer stops, for the events of its last puts.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Wait after a watch could not be opened before the next attempt.
const REOPEN_BACKOFF: Duration = Duration::from_millis(50);

/// How often the writer hands its interval record to the progress reporter.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(250);

/// Bytes of the send-time stamp at the start of every value `watch-latency` writes.
pub const STAMP_SIZE: usize = 8;

/// What the watchers share: their counters and, when latency is measured, one histogram.
#[derive(Debug)]
struct Shared {
    /// Events received, per watcher.
    event_counts: Vec<AtomicU64>,
    /// Put-to-event latency in nanoseconds, when values carry send stamps.
    latency: Option<Mutex<Histogram<u64>>>,
    /// The zero of the send stamps.
    epoch: Instant,
    /// Watches cancelled as lagging.
    lagged_count: AtomicU64,
    /// Watches that failed to open or ended with another error.
    error_count: AtomicU64,
}

/// Watchers following the prefix in the background until [`Watchers::stop`].
#[derive(Debug)]
pub struct Watchers {
    shared: Arc<Shared>,
    tasks: Vec<JoinHandle<()>>,
    /// Watchers the server's cores held once every watch was open.
    pub server_watcher_count: u64,
}

/// What the watchers had received at one moment, since they were opened.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Events, per watcher.
    event_counts: Vec<u64>,
    /// Watches cancelled as lagging.
    lagged: u64,
    /// Watches that failed to open or ended with another error.
    errors: u64,
}

/// What the watchers received between two snapshots.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Events, all watchers together.
    pub events: u64,
    /// Fewest events of one watcher.
    pub events_per_watcher_min: u64,
    /// Most events of one watcher.
    pub events_per_watcher_max: u64,
    /// Watches cancelled as lagging.
    pub lagged: u64,
    /// Watches that failed to open or ended with another error.
    pub errors: u64,
}

impl Snapshot {
    /// What was received after `earlier` (a snapshot of the same watchers) up to `self`.
    pub fn since(&self, earlier: &Snapshot) -> Counts {
        assert!(
            earlier.event_counts.is_empty()
                || earlier.event_counts.len() == self.event_counts.len()
        );
        let window = |index: usize| {
            let before = earlier.event_counts.get(index).copied().unwrap_or(0);
            self.event_counts[index] - before
        };
        let per_watcher: Vec<u64> = (0..self.event_counts.len()).map(window).collect();
        Counts {
            events: per_watcher.iter().sum(),
            events_per_watcher_min: per_watcher.iter().copied().min().unwrap_or(0),
            events_per_watcher_max: per_watcher.iter().copied().max().unwrap_or(0),
            lagged: self.lagged - earlier.lagged,
            errors: self.errors - earlier.errors,
        }
    }
}

impl Watchers {
    /// Opens `watcher_count` watches on `prefix`, watch `i` through `clients[i /
    /// watchers_per_client]`, and waits until the server holds all of them. With
    /// `epoch`, values carry send stamps and each event's latency is recorded.
    ///
    /// # Errors
    /// Not every watch was open on the server within [`OPEN_TIMEOUT`].
    pub fn open(
        runtime: &tokio::runtime::Runtime,
        clients: &[Client],
        watchers_per_client: usize,
        watcher_count: usize,
        prefix: &[u8],
        epoch: Option<Instant>,
    ) -> Result<Self, String> {
        assert!(watchers_per_client > 0);
        assert!(clients.len() * watchers_per_client >= watcher_count);
        let shared = Arc::new(Shared {
            event_counts: (0..watcher_count).map(|_| AtomicU64::new(0)).collect(),
            latency: epoch.map(|_| {
                // Bounds 1 ns..=60 s with 3 significant digits are valid hdrhistogram arguments.
                Mutex::new(
                    Histogram::new_with_bounds(1, LATENCY_NS_MAX, 3)
                        .unwrap_or_else(|_| unreachable!("constant histogram bounds are valid")),
                )
            }),
            epoch: epoch.unwrap_or_else(Instant::now),
            lagged_count: AtomicU64::new(0),
            error_count: AtomicU64::new(0),
        });
        let range = KeyRange::prefix(prefix);
        let tasks = (0..watcher_count)
            .map(|index| {
                let client = clients[index / watchers_per_client].clone();
                runtime.spawn(follow(client, range.clone(), index, shared.clone()))
            })
            .collect();
        let mut watchers = Self {
            shared,
            tasks,
            server_watcher_count: 0,
        };
        // A prefix is watched on every core: one server watcher per watch and core.
        let core_count = clients[0]
            .topology()
            .nodes
            .iter()
            .map(|node| node.cores.len())
            .sum::<usize>();
        let expected = (watcher_count * core_count) as u64;
        let started = Instant::now();
        loop {
            let held = runtime.block_on(server_watcher_count(&clients[0]))?;
            watchers.server_watcher_count = held;
            if held >= expected {
                return Ok(watchers);
            }
            if started.elapsed() > OPEN_TIMEOUT {
                let errors = watchers.snapshot().errors;
                watchers.stop();
                return Err(format!(
                    "only {held} of {expected} server watchers ({watcher_count} watches on \
                     {core_count} cores) were open after {OPEN_TIMEOUT:?}; {errors} watch errors"
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// What the watchers have received so far.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            event_counts: self
                .shared
                .event_counts
                .iter()
                .map(|count| count.load(Ordering::Relaxed))
                .collect(),
            lagged: self.shared.lagged_count.load(Ordering::Relaxed),
            errors: self.shared.error_count.load(Ordering::Relaxed),
        }
    }

    /// Events received so far, all watchers together.
    pub fn event_count(&self) -> u64 {
        self.shared
            .event_counts
            .iter()
            .map(|count| count.load(Ordering::Relaxed))
            .sum()
    }

    /// Waits until the watchers hold `events_expected` events together, at most `timeout`.
    pub fn wait_for(&self, events_expected: u64, timeout: Duration) {
        let started = Instant::now();
        while self.event_count() < events_expected && started.elapsed() < timeout {
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The put-to-event latencies recorded so far (`None` without send stamps).
    pub fn latency(&self) -> Option<Histogram<u64>> {
        self.shared.latency.as_ref().map(|histogram| {
            histogram.lock().map_or_else(
                |poisoned| poisoned.into_inner().clone(),
                |histogram| histogram.clone(),
            )
        })
    }

    /// Ends every watch (its task and, with it, its stream on the server).
    pub fn stop(&mut self) {
        for task in self.tasks.drain(..) {
            task.abort();
        }
    }
}

impl Drop for Watchers {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Watchers on all of `client`'s cores together.
///
/// # Errors
/// A core did not answer.
pub async fn server_watcher_count(client: &Client) -> Result<u64, String> {
    let stats = client
        .stats()
        .await
        .map_err(|error| format!("cannot read the cores' stats: {error}"))?;
    Ok(stats.iter().map(|core| core.watcher_count).sum())
}

/// One watcher: follows `range`, opening the watch again (from now) whenever it ends.
async fn follow(client: Client, range: KeyRange, index: usize, shared: Arc<Shared>) {
    loop {
        let mut watch = match client.watch(&range, WatchOptions::new().puts_only()).await {
            Ok(watch) => watch,
            Err(error) => {
                tracing::debug!(%error, index, "cannot open a watch");
                shared.error_count.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(REOPEN_BACKOFF).await;
                continue;
            }
        };
        while let Some(message) = watch.next().await {
            match message {
                Ok(WatchMessage::Events { events, .. }) => {
                    let received_ns = nanos(shared.epoch.elapsed());
                    shared.event_counts[index].fetch_add(events.len() as u64, Ordering::Relaxed);
                    if let Some(latency) = &shared.latency {
                        let mut latency = latency
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner);
                        for event in &events {
                            if let Some(sent_ns) = stamp_of(&event.value) {
                                let latency_ns = received_ns.saturating_sub(sent_ns);
                                latency.saturating_record(latency_ns.clamp(1, LATENCY_NS_MAX));
                            }
                        }
                    }
                }
                Ok(_) => {}
                Err(ClientError::Lagged { .. }) => {
                    shared.lagged_count.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                Err(error) => {
                    tracing::debug!(%error, index, "a watch ended");
                    shared.error_count.fetch_add(1, Ordering::Relaxed);
                    break;
                }
            }
        }
    }
}

fn nanos(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

/// The send stamp at the start of `value`, if it is long enough to hold one.
fn stamp_of(value: &[u8]) -> Option<u64> {
    let stamp: [u8; STAMP_SIZE] = value.get(..STAMP_SIZE)?.try_into().ok()?;
    Some(u64::from_le_bytes(stamp))
}

/// What the writer of `watch-latency` did.
#[derive(Debug)]
pub struct Written {
    /// Put latency (acknowledgement), as operation `set`.
    pub record: Recorder,
    /// The writer's window.
    pub elapsed: Duration,
    /// Puts acknowledged without error: each should reach every watcher.
    pub put_ok_count: u64,
}

/// Puts keys of `spec` in order (wrapping at the key count) at `rate` per second for
/// `duration`, one at a time, each value stamped with its send time since `epoch`. A put
/// that cannot start on time starts at once; none are sent in a burst to catch up.
pub async fn write_stamped(
    client: Client,
    spec: WorkloadSpec,
    rate: f64,
    duration: Duration,
    epoch: Instant,
    progress: Option<mpsc::Sender<Recorder>>,
) -> Written {
    assert!(spec.value_size >= STAMP_SIZE);
    assert!(rate > 0.0);
    let interval = Duration::from_secs_f64(1.0 / rate);
    let mut value = spec.value();
    let mut key = Vec::with_capacity(spec.key_size);
    let mut total = Recorder::new();
    let mut recent = Recorder::new();
    let mut put_ok_count = 0;
    let started = Instant::now();
    let deadline = started + duration;
    let mut next_due = started;
    let mut next_progress = started + PROGRESS_INTERVAL;
    let mut sequence = 0_u64;
    loop {
        tokio::time::sleep_until(next_due.into()).await;
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
        next_due = (next_due + interval).max(now);
        spec.write_key(sequence % spec.key_count, &mut key);
        sequence += 1;
        let sent = Instant::now();
        value[..STAMP_SIZE].copy_from_slice(&nanos(sent - epoch).to_le_bytes());
        let outcome = client.put(&key, &value).await;
        let latency = sent.elapsed();
        if let Err(error) = &outcome {
            tracing::debug!(%error, "put failed");
        }
        put_ok_count += u64::from(outcome.is_ok());
        total.record(Op::Set, latency, outcome.is_err());
        recent.record(Op::Set, latency, outcome.is_err());
    }
    if let Some(progress) = &progress {
        let _ = progress.send(recent);
    }
    Written {
        record: total,
        elapsed: started.elapsed().min(duration),
        put_ok_count,
    }
}

/// Prints one line per second with the watchers' events per second, until `done`.
pub fn report_progress(watchers: &Watchers, done: &mpsc::Receiver<()>, is_quiet: bool) {
    let started = Instant::now();
    let mut before = watchers.snapshot();
    let mut before_at = started;
    loop {
        match done.recv_timeout(Duration::from_secs(1)) {
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => return,
        }
        let now = Instant::now();
        let snapshot = watchers.snapshot();
        if !is_quiet {
            let window = snapshot.since(&before);
            eprintln!(
                "[{:>5.1}s] watch {:>10.0} events/s  lagged {}  errors {}",
                (now - started).as_secs_f64(),
                crate::report::per_second(window.events, now - before_at),
                snapshot.lagged,
                snapshot.errors
            );
        }
        before = snapshot;
        before_at = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_round_trip_through_values() {
        let mut value = vec![b'a'; 32];
        value[..STAMP_SIZE].copy_from_slice(&123_456_789_u64.to_le_bytes());
        assert_eq!(stamp_of(&value), Some(123_456_789));
        assert_eq!(stamp_of(b"short"), None);
    }

    #[test]
    fn windows_subtract_snapshots_watcher_by_watcher() {
        let earlier = Snapshot {
            event_counts: vec![10, 0, 4],
            lagged: 1,
            errors: 0,
        };
        let later = Snapshot {
            event_counts: vec![15, 9, 4],
            lagged: 3,
            errors: 1,
        };
        let window = later.since(&earlier);
        assert_eq!(
            window,
            Counts {
                events: 14,
                events_per_watcher_min: 0,
                events_per_watcher_max: 9,
                lagged: 2,
                errors: 1,
            }
        );
        assert_eq!(later.since(&Snapshot::default()).events, 28);
    }
}
