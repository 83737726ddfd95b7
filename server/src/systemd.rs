//! Notifications to the service manager (systemd units of `Type=notify`): `READY=1` once the
//! server serves, `STOPPING=1` when it starts to stop, and `WATCHDOG=1` pings while every
//! core makes progress.
//!
//! Without `NOTIFY_SOCKET` in the environment (not under systemd) every notification is a
//! no-op. The watchdog runs only when systemd asks for one (`WatchdogSec=`, which sets
//! `WATCHDOG_USEC` and `WATCHDOG_PID`).
//!
//! **Invariant:** a watchdog ping is sent only if every core's progress counter
//! ([`crate::server::CoreProgress`]) advanced since the previous ping: one stuck core stops
//! the pings, and systemd restarts the service once `WatchdogSec` passes without one.

use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use sd_notify::NotifyState;

use crate::server::CoreProgress;

/// Tells the service manager the server is ready, with a status line for `systemctl
/// status`. Failing to notify is logged, not fatal: the server itself is fine.
pub fn notify_ready(status: &str) {
    notify(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// Tells the service manager the server is stopping.
pub fn notify_stopping() {
    notify(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
}

fn notify(states: &[NotifyState<'_>]) {
    if let Err(error) = sd_notify::notify(false, states) {
        tracing::warn!(%error, "cannot notify the service manager");
    }
}

/// The interval systemd expects watchdog pings within, if it asked for them.
pub fn watchdog_interval() -> Option<Duration> {
    let mut usec = 0;
    (sd_notify::watchdog_enabled(false, &mut usec) && usec > 0).then(|| Duration::from_micros(usec))
}

/// Which cores made no progress between two readings of their counters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProgressCheck {
    /// The counters when the last ping was sent.
    last: Vec<u64>,
}

impl ProgressCheck {
    /// Starts from the counters as they are now.
    pub fn new(current: Vec<u64>) -> Self {
        Self { last: current }
    }

    /// The cores whose counter did not advance since the last recorded reading.
    pub fn stalled_cores(&self, current: &[u64]) -> Vec<usize> {
        assert_eq!(
            current.len(),
            self.last.len(),
            "the core count does not change while the server runs"
        );
        (0..current.len())
            .filter(|&core| current[core] <= self.last[core])
            .collect()
    }

    /// Records `current` as the reading of the last ping.
    pub fn record(&mut self, current: Vec<u64>) {
        self.last = current;
    }
}

fn read(progress: &CoreProgress) -> Vec<u64> {
    progress
        .iter()
        .map(|count| count.load(Ordering::Relaxed))
        .collect()
}

/// The thread that pings the watchdog. Dropping it stops the pings.
#[derive(Debug)]
pub struct Watchdog {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Watchdog {
    /// Starts pinging at half the interval systemd asked for, if it asked.
    ///
    /// # Errors
    /// The thread cannot be spawned.
    pub fn start_if_enabled(progress: CoreProgress, tick_ms: u64) -> std::io::Result<Option<Self>> {
        let Some(interval) = watchdog_interval() else {
            return Ok(None);
        };
        let check_interval = interval / 2;
        if check_interval < Duration::from_millis(tick_ms.saturating_mul(2)) {
            tracing::warn!(
                ?interval,
                tick_ms,
                "the watchdog interval is shorter than four ticks: cores may miss a ping \
                 without being stuck; raise WatchdogSec="
            );
        }
        tracing::info!(?interval, "systemd watchdog enabled");
        Self::start(progress, check_interval, || {
            notify(&[NotifyState::Watchdog]);
        })
        .map(Some)
    }

    /// Calls `ping` every `check_interval` in which every core's counter advanced since the
    /// last ping (a core that advanced over several intervals counts).
    ///
    /// # Errors
    /// The thread cannot be spawned.
    pub fn start(
        progress: CoreProgress,
        check_interval: Duration,
        mut ping: impl FnMut() + Send + 'static,
    ) -> std::io::Result<Self> {
        let (stop, stopped) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("tessera-watchdog".to_owned())
            .spawn(move || {
                let mut check = ProgressCheck::new(read(&progress));
                let mut reported_stall = false;
                while let Err(mpsc::RecvTimeoutError::Timeout) =
                    stopped.recv_timeout(check_interval)
                {
                    let current = read(&progress);
                    let stalled = check.stalled_cores(&current);
                    if stalled.is_empty() {
                        ping();
                        check.record(current);
                        reported_stall = false;
                    } else if !reported_stall {
                        tracing::error!(
                            ?stalled,
                            "cores made no progress since the last watchdog ping; not pinging, \
                             so the service manager restarts the server"
                        );
                        reported_stall = true;
                    }
                }
            })?;
        Ok(Self {
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, AtomicUsize};
    use std::sync::Arc;
    use std::time::Instant;

    use super::*;

    #[test]
    fn a_core_that_did_not_advance_is_stalled() {
        let mut check = ProgressCheck::new(vec![5, 5, 5]);
        assert_eq!(check.stalled_cores(&[6, 5, 9]), vec![1]);
        assert_eq!(check.stalled_cores(&[6, 6, 6]), Vec::<usize>::new());
        check.record(vec![6, 6, 6]);
        assert_eq!(check.stalled_cores(&[6, 7, 7]), vec![0]);
    }

    fn wait_until(condition: impl Fn() -> bool) -> bool {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if condition() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        false
    }

    #[test]
    fn pings_stop_while_a_core_is_stuck_and_resume_when_it_moves() {
        let progress: CoreProgress = (0..2).map(|_| AtomicU64::new(0)).collect();
        let pings = Arc::new(AtomicUsize::new(0));
        let counted = pings.clone();
        let watchdog = Watchdog::start(progress.clone(), Duration::from_millis(5), move || {
            counted.fetch_add(1, Ordering::SeqCst);
        })
        .unwrap();
        // Neither core moves: no ping, however long.
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(pings.load(Ordering::SeqCst), 0);
        // Only core 0 moves: still none.
        for _ in 0..10 {
            progress[0].fetch_add(1, Ordering::Relaxed);
            std::thread::sleep(Duration::from_millis(6));
        }
        assert_eq!(pings.load(Ordering::SeqCst), 0);
        // Both move: pings.
        progress[1].fetch_add(1, Ordering::Relaxed);
        assert!(wait_until(|| pings.load(Ordering::SeqCst) >= 1));
        drop(watchdog);
        let after_stop = pings.load(Ordering::SeqCst);
        progress[0].fetch_add(1, Ordering::Relaxed);
        progress[1].fetch_add(1, Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(
            pings.load(Ordering::SeqCst),
            after_stop,
            "no ping after drop"
        );
    }
}
