//! The admin endpoint: a small HTTP server on the admin port (`Config::admin_port`) for
//! Prometheus and load balancers.
//!
//! - `GET /metrics`: every core's metrics in the Prometheus (`OpenMetrics`) text format
//!   (`docs/metrics.md`).
//! - `GET /health`: `200 ok` when every core answered a probe within [`PROBE_TIMEOUT`];
//!   `503` naming the cores that did not, and `503 shutting down` once the server stops.
//! - anything else: `404`.
//!
//! It runs on a thread of its own, never on a core's executor, so a scrape cannot stall a
//! core's requests, and a stalled core cannot hang a scrape: each core is asked through its
//! inbox ([`CoreMessage::Metrics`], pushed past the inbox's bound so a full inbox does not
//! refuse it) and a core that does not answer within [`PROBE_TIMEOUT`] is reported down
//! (`tessera_core_up{core="N"} 0`).
//!
//! **Limits:** one request at a time, one request per connection (`Connection: close`), a
//! request head of at most [`REQUEST_BYTES_MAX`] bytes, reads and writes that give up after
//! [`IO_TIMEOUT`], and at most one probe in flight per core (a core that has not answered the
//! last one is not sent another, so a stuck core's inbox does not fill with probes).

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::cluster::heartbeat::ClusterHealth;
use crate::config::Config;
use crate::core::{CoreInboxes, CoreMessage};
use crate::error::StartError;
use crate::metrics::{CoreReport, CoreSnapshot, Scrape};

/// How long a scrape or a health check waits for the cores' answers.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// Longest request head (request line and headers) the endpoint reads.
pub const REQUEST_BYTES_MAX: usize = 8 * 1024;

/// How long a read or a write on an admin connection may block.
pub const IO_TIMEOUT: Duration = Duration::from_secs(1);

/// How often the accept loop looks at the stop flag while no connection arrives.
const STOP_POLL_INTERVAL_MS: i32 = 200;

/// The running admin endpoint. Dropping it stops it.
#[derive(Debug)]
pub struct AdminServer {
    address: SocketAddr,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

#[derive(Debug, Default)]
struct Shared {
    /// The thread must return.
    stop: AtomicBool,
    /// The server is stopping: `/health` answers 503.
    is_shutting_down: AtomicBool,
}

/// What the endpoint reports about the instance besides its cores.
#[derive(Debug)]
struct Instance {
    node_id: u32,
    epoch: u64,
    connection_count: Arc<AtomicUsize>,
    connection_count_max: u64,
    health: Arc<ClusterHealth>,
}

impl AdminServer {
    /// Binds the admin port and starts the endpoint's thread.
    ///
    /// # Errors
    /// The port cannot be bound, or the thread cannot be spawned.
    pub fn start(
        config: &Config,
        inboxes: CoreInboxes,
        connection_count: Arc<AtomicUsize>,
        health: Arc<ClusterHealth>,
        epoch: u64,
    ) -> Result<Self, StartError> {
        let address_text = crate::cluster::format_address(&config.host, config.admin_port());
        let bind_error = |source| StartError::Bind {
            core_id: u16::MAX,
            address: address_text.clone(),
            source,
        };
        let listener =
            TcpListener::bind((config.host.as_str(), config.admin_port())).map_err(bind_error)?;
        listener.set_nonblocking(true).map_err(bind_error)?;
        let address = listener.local_addr().map_err(bind_error)?;
        let shared = Arc::new(Shared::default());
        let instance = Instance {
            node_id: config.node_id,
            epoch,
            connection_count,
            connection_count_max: config.connection_count_max as u64,
            health,
        };
        let probes = Probes::new(inboxes, PROBE_TIMEOUT);
        let thread_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name("tessera-admin".to_owned())
            .spawn(move || serve(&listener, &thread_shared, probes, &instance))
            .map_err(bind_error)?;
        tracing::info!(%address, "admin endpoint ready");
        Ok(Self {
            address,
            shared,
            thread: Some(thread),
        })
    }

    /// The address the endpoint listens on (the real port when 0 was asked for).
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// From now on `/health` answers 503: the server is stopping.
    pub fn begin_shutdown(&self) {
        self.shared.is_shutting_down.store(true, Ordering::Relaxed);
    }

    /// Stops the thread and waits for it: at most the request it is serving (bounded by
    /// [`PROBE_TIMEOUT`] and [`IO_TIMEOUT`]) plus one poll interval.
    pub fn stop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        let Some(thread) = self.thread.take() else {
            return;
        };
        // A connection wakes the accept loop at once; without it the poll interval does.
        let _ = TcpStream::connect_timeout(&reachable(self.address), IO_TIMEOUT);
        if thread.join().is_err() {
            tracing::error!("the admin endpoint's thread panicked");
        }
    }
}

impl Drop for AdminServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// An address to connect to for `address` (a wildcard address is reached on loopback).
fn reachable(address: SocketAddr) -> SocketAddr {
    match address.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), address.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), address.port())
        }
        _ => address,
    }
}

/// Asks cores for their metrics, at most one question in flight per core.
#[derive(Debug)]
pub struct Probes {
    inboxes: CoreInboxes,
    /// Per core, the answer still owed to an earlier probe.
    pending: Vec<Option<mpsc::Receiver<CoreSnapshot>>>,
    timeout: Duration,
}

impl Probes {
    /// Probes for `inboxes`' cores, each waited for at most `timeout` per gather.
    pub fn new(inboxes: CoreInboxes, timeout: Duration) -> Self {
        let pending = (0..inboxes.len()).map(|_| None).collect();
        Self {
            inboxes,
            pending,
            timeout,
        }
    }

    /// Asks every core for a snapshot and waits for the answers until the timeout. A core
    /// whose inbox is closed, or that does not answer in time, has no snapshot. A core
    /// still owing the answer to an earlier probe is not asked again; that answer is used
    /// if it arrives now.
    pub fn gather(&mut self) -> Vec<CoreReport> {
        for (pending, inbox) in self.pending.iter_mut().zip(self.inboxes.iter()) {
            if pending.is_none() {
                let (reply, answer) = mpsc::channel();
                if inbox.push_control(CoreMessage::Metrics { reply }).is_ok() {
                    *pending = Some(answer);
                }
            }
        }
        let deadline = Instant::now() + self.timeout;
        let mut reports = Vec::with_capacity(self.inboxes.len());
        for (core_index, (pending, inbox)) in
            self.pending.iter_mut().zip(self.inboxes.iter()).enumerate()
        {
            let snapshot = match pending {
                Some(answer) => {
                    let wait = deadline.saturating_duration_since(Instant::now());
                    match answer.recv_timeout(wait) {
                        Ok(snapshot) => {
                            *pending = None;
                            Some(snapshot)
                        }
                        Err(mpsc::RecvTimeoutError::Timeout) => None,
                        Err(mpsc::RecvTimeoutError::Disconnected) => {
                            // The core dropped the probe unanswered (it stopped).
                            *pending = None;
                            None
                        }
                    }
                }
                None => None,
            };
            reports.push(CoreReport {
                core_id: u16::try_from(core_index).unwrap_or(u16::MAX),
                inbox_depth: inbox.len(),
                inbox_capacity: inbox.capacity(),
                snapshot,
            });
        }
        reports
    }
}

/// Serves admin requests one at a time until the stop flag is set.
fn serve(listener: &TcpListener, shared: &Shared, mut probes: Probes, instance: &Instance) {
    while !shared.stop.load(Ordering::Relaxed) {
        if !wait_readable(listener, STOP_POLL_INTERVAL_MS) {
            continue;
        }
        if shared.stop.load(Ordering::Relaxed) {
            break;
        }
        match listener.accept() {
            Ok((stream, _)) => {
                if let Err(io_error) = answer(stream, shared, &mut probes, instance) {
                    tracing::debug!(%io_error, "admin request failed");
                }
            }
            Err(io_error) if io_error.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(io_error) => {
                // Out of descriptors, say: do not spin on it.
                tracing::warn!(%io_error, "admin endpoint cannot accept");
                std::thread::sleep(Duration::from_millis(u64::from(
                    STOP_POLL_INTERVAL_MS.unsigned_abs(),
                )));
            }
        }
    }
}

/// Whether `listener` has a connection waiting, after waiting at most `timeout_ms`.
fn wait_readable(listener: &TcpListener, timeout_ms: i32) -> bool {
    let mut poll_fd = libc::pollfd {
        fd: listener.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for an open descriptor this function borrows.
    let ready = unsafe { libc::poll(&raw mut poll_fd, 1, timeout_ms) };
    ready > 0
}

/// An HTTP answer.
struct Answer {
    status: &'static str,
    content_type: &'static str,
    body: String,
}

impl Answer {
    fn text(status: &'static str, body: impl Into<String>) -> Self {
        Self {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.into(),
        }
    }
}

/// Reads one request from `stream` and answers it.
fn answer(
    mut stream: TcpStream,
    shared: &Shared,
    probes: &mut Probes,
    instance: &Instance,
) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let answer = match read_head(&mut stream)? {
        Some(head) => route(&head, shared, probes, instance),
        None => Answer::text("431 Request Header Fields Too Large", "request too large\n"),
    };
    let head = format!(
        "HTTP/1.1 {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        answer.status,
        answer.content_type,
        answer.body.len()
    );
    stream.write_all(head.as_bytes())?;
    stream.write_all(answer.body.as_bytes())?;
    stream.flush()?;
    // Closing with unread bytes (a refused head's rest, a body) would reset the connection
    // and could destroy the answer before the client read it: say we are done, then read
    // what the client still sends, a bounded amount, until it closes.
    stream.shutdown(std::net::Shutdown::Write)?;
    let mut discard = [0; 4096];
    let mut discarded = 0;
    while discarded < DISCARD_BYTES_MAX {
        match stream.read(&mut discard) {
            Ok(0) | Err(_) => break,
            Ok(read) => discarded += read,
        }
    }
    Ok(())
}

/// Most bytes read and dropped after an answer, waiting for the client to close.
const DISCARD_BYTES_MAX: usize = 64 * 1024;

/// Reads the request head (up to the blank line); `None` if it passes
/// [`REQUEST_BYTES_MAX`].
fn read_head(stream: &mut TcpStream) -> std::io::Result<Option<String>> {
    let mut head = vec![0; REQUEST_BYTES_MAX];
    let mut filled = 0;
    loop {
        if head[..filled]
            .windows(4)
            .any(|window| window == b"\r\n\r\n")
        {
            head.truncate(filled);
            return Ok(Some(String::from_utf8_lossy(&head).into_owned()));
        }
        if filled == head.len() {
            return Ok(None);
        }
        let read = stream.read(&mut head[filled..])?;
        if read == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        filled += read;
    }
}

/// The answer to the request whose head is `head`.
fn route(head: &str, shared: &Shared, probes: &mut Probes, instance: &Instance) -> Answer {
    let mut request_line = head.lines().next().unwrap_or_default().split(' ');
    let method = request_line.next().unwrap_or_default();
    let target = request_line.next().unwrap_or_default();
    let path = target.split('?').next().unwrap_or_default();
    match (method, path) {
        ("GET", "/metrics") => {
            let scrape = Scrape {
                node_id: instance.node_id,
                connection_count: instance.connection_count.load(Ordering::Relaxed) as u64,
                connection_count_max: instance.connection_count_max,
                cores: probes.gather(),
                nodes: instance.health.snapshot(instance.epoch),
            };
            match crate::metrics::encode(scrape) {
                Ok(body) => Answer {
                    status: "200 OK",
                    content_type: crate::metrics::CONTENT_TYPE,
                    body,
                },
                Err(_) => Answer::text("500 Internal Server Error", "cannot encode metrics\n"),
            }
        }
        ("GET", "/health") => {
            if shared.is_shutting_down.load(Ordering::Relaxed) {
                return Answer::text("503 Service Unavailable", "shutting down\n");
            }
            health(&probes.gather(), probes.timeout)
        }
        _ => Answer::text("404 Not Found", "not found: GET /metrics or GET /health\n"),
    }
}

/// `200 ok` if every core answered, else `503` with one line per core that did not.
fn health(reports: &[CoreReport], timeout: Duration) -> Answer {
    let failing: Vec<String> = reports
        .iter()
        .filter(|report| report.snapshot.is_none())
        .map(|report| {
            format!(
                "core {} did not answer within {} ms (inbox depth {})\n",
                report.core_id,
                timeout.as_millis(),
                report.inbox_depth
            )
        })
        .collect();
    if failing.is_empty() {
        Answer::text("200 OK", "ok\n")
    } else {
        Answer::text("503 Service Unavailable", failing.concat())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inbox::Inbox;

    /// Core 0 is served by a thread that answers probes; core 1's inbox is never drained, as
    /// a core stuck in a long batch would leave it.
    #[test]
    fn a_core_that_does_not_answer_is_reported_without_hanging_the_scrape() {
        let inboxes: CoreInboxes = vec![Arc::new(Inbox::new(4)), Arc::new(Inbox::new(4))].into();
        let answering = inboxes[0].clone();
        let core = std::thread::spawn(move || {
            futures_lite::future::block_on(async {
                let mut batch = std::collections::VecDeque::new();
                while answering.receive_batch(&mut batch).await {
                    for message in batch.drain(..) {
                        if let CoreMessage::Metrics { reply } = message {
                            let _ = reply.send(test_snapshot(0));
                        }
                    }
                }
            });
        });
        let mut probes = Probes::new(inboxes.clone(), Duration::from_millis(50));
        for _ in 0..3 {
            let reports = probes.gather();
            assert_eq!(reports.len(), 2);
            assert!(reports[0].snapshot.is_some(), "{reports:?}");
            assert!(reports[1].snapshot.is_none(), "{reports:?}");
            let answer = health(&reports, Duration::from_millis(50));
            assert_eq!(answer.status, "503 Service Unavailable");
            assert!(
                answer.body.contains("core 1 did not answer"),
                "{}",
                answer.body
            );
            assert!(!answer.body.contains("core 0"), "{}", answer.body);
        }
        // One probe stays in the stuck core's inbox, however many scrapes asked.
        assert_eq!(inboxes[1].len(), 1);
        inboxes[0].close();
        core.join().unwrap();
        // A closed inbox takes no probe: the core is down at once.
        let reports = probes.gather();
        assert!(reports[0].snapshot.is_none());
    }

    #[test]
    fn health_is_ok_when_every_core_answered() {
        let reports = [CoreReport {
            core_id: 0,
            inbox_depth: 0,
            inbox_capacity: 4,
            snapshot: Some(test_snapshot(0)),
        }];
        let answer = health(&reports, PROBE_TIMEOUT);
        assert_eq!(answer.status, "200 OK");
        assert_eq!(answer.body, "ok\n");
    }

    fn test_snapshot(core_id: u16) -> CoreSnapshot {
        CoreSnapshot {
            core_id,
            requests: Box::default(),
            connections_open: 0,
            connections_accepted: 0,
            inbox_messages: 0,
            key_count: 0,
            memory_bytes: 0,
            memory_bytes_max: 0,
            revision: 0,
            expired_count: 0,
            refused_full_count: 0,
            timer_count: 0,
            expiry_lag_ms: crate::metrics::Histogram::default(),
            watcher_count: 0,
            watch_queued_bytes: 0,
            watch_lagged_count: 0,
            log: None,
        }
    }
}
