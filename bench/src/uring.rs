//! The network load generator: one `io_uring` per load thread driving many connections.
//!
//! A load generator that costs as much per operation as the server it drives measures
//! itself. This one batches: every pass of the loop generates the requests the completed
//! replies made room for, queues one send and one receive per connection that needs them, and
//! submits them all with a single `io_uring_enter`, which also waits for the next completions.
//! With 50 connections that is a handful of system calls per 50 operations, where a
//! conventional client pays two per operation.
//!
//! **Sessions.** A session is what `--connections` counts: one logical client with at most
//! `pipeline` requests in flight. Against Redis or a single-core server a session is one TCP
//! connection. Against Tessera a session holds one connection per core, as the smart client
//! does, and sends each request on the connection of the core that owns its key.
//!
//! **Closed and open loop.** In the closed loop a session sends a new request as soon as one
//! of its replies arrives. In the open loop each session has a schedule of intended send times
//! (`--rate` spread evenly over the sessions); a request's latency is measured from its
//! intended time, not from when it was actually sent, so a stall that delays sending shows up
//! in the percentiles instead of hiding (coordinated omission).
//!
//! **Memory safety.** A buffer handed to the kernel is neither touched nor moved until its
//! completion arrives: each connection has at most one send and one receive in flight, and
//! `pending` (where new requests go) is separate from `sending` (what the kernel reads). At the
//! end the sockets are shut down and every completion is collected before buffers are freed.

use std::collections::VecDeque;
use std::io;
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use io_uring::{opcode, types, IoUring};
use tessera_protocol::codec::FrameBuffer;

use crate::report::Recorder;
use crate::wire::Wire;
use crate::workload::{KeyPlan, Op, WorkloadSpec};

/// Receive buffer per connection once warm; grown for a reply that needs more.
const RECEIVE_BUFFER_SIZE: usize = 64 * 1024;

/// How often a thread hands its interval record to the progress reporter.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(250);

/// Longest the end of a run waits for the kernel to return buffers.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Where a request goes: the index of the connection within its session.
pub trait Router: Send + Sync {
    /// Connections per session.
    fn route_count(&self) -> usize;
    /// The connection (within a session) that serves `key`.
    fn route(&self, key: &[u8]) -> usize;
}

/// What one load thread does.
#[derive(Debug)]
pub struct ThreadLoad {
    /// Sessions this thread runs.
    pub session_count: usize,
    /// Requests in flight per session, at most.
    pub pipeline: usize,
    /// Intended operations per second per session (open loop); `None` for the closed loop.
    pub rate_per_session: Option<f64>,
    /// Which keys to ask for.
    pub keys: KeyPlan,
    /// Operations this thread issues at most.
    pub operation_count_max: Option<u64>,
    /// How long to run; `None` runs until the keys or the operation count run out.
    pub duration: Option<Duration>,
}

/// What a load thread measured.
#[derive(Debug)]
pub struct ThreadOutcome {
    /// Every reply received in the measured window.
    pub record: Recorder,
    /// From the first send to the end of the window.
    pub elapsed: Duration,
}

#[derive(Debug)]
struct InFlight {
    request_id: u64,
    op: Op,
    /// When the request was (closed loop) or should have been (open loop) sent.
    started: Instant,
}

#[derive(Debug)]
struct Connection {
    stream: TcpStream,
    session: usize,
    /// Requests encoded since the last send was queued.
    pending: FrameBuffer,
    /// Bytes handed to the kernel; `[sent..]` is still to go.
    sending: FrameBuffer,
    sent: usize,
    is_sending: bool,
    /// Received bytes; `[..filled]` is data. Its length is the space a receive may use.
    receive: FrameBuffer,
    filled: usize,
    is_receiving: bool,
    /// Requests sent on this connection and not yet answered, in send order.
    in_flight: VecDeque<InFlight>,
    next_request_id: u64,
}

#[derive(Debug)]
struct Session {
    /// Indices of this session's connections, one per route.
    first_connection: usize,
    outstanding: usize,
    /// Open loop: intended time of the next request.
    next_due: Instant,
}

/// Token kinds in a completion's user data (low bit).
const TOKEN_SEND: u64 = 0;
const TOKEN_RECEIVE: u64 = 1;

/// Opens `session_count * route_count` connections to `addresses` (one address per route).
///
/// # Errors
/// A connection cannot be made.
pub fn connect_all(addresses: &[String], session_count: usize) -> Result<Vec<TcpStream>, String> {
    let mut streams = Vec::with_capacity(addresses.len() * session_count);
    for _ in 0..session_count {
        for address in addresses {
            let stream = TcpStream::connect(address)
                .map_err(|error| format!("cannot connect to {address}: {error}"))?;
            stream
                .set_nodelay(true)
                .map_err(|error| format!("{address}: TCP_NODELAY: {error}"))?;
            // Non-blocking, so the kernel polls a socket with no data instead of parking a
            // worker thread on it.
            stream
                .set_nonblocking(true)
                .map_err(|error| format!("{address}: non-blocking: {error}"))?;
            streams.push(stream);
        }
    }
    Ok(streams)
}

/// Runs one load thread over `streams` (as returned by [`connect_all`]) until its load is
/// done, sending interval records to `progress` along the way.
///
/// # Errors
/// A connection fails or a reply is malformed.
pub fn run_thread(
    streams: Vec<TcpStream>,
    router: &dyn Router,
    wire: &mut dyn Wire,
    spec: &WorkloadSpec,
    mut load: ThreadLoad,
    progress: Option<&mpsc::Sender<Recorder>>,
) -> Result<ThreadOutcome, String> {
    let route_count = router.route_count();
    assert_eq!(
        streams.len(),
        load.session_count * route_count,
        "streams={} sessions={} routes={route_count}",
        streams.len(),
        load.session_count
    );
    assert!(load.pipeline > 0, "pipeline must be positive");
    let entries = u32::try_from((2 * streams.len() + 8).next_power_of_two())
        .map_err(|_| "too many connections for one ring".to_owned())?;
    let mut ring = new_ring(entries)?;
    let mut engine = Engine::new(streams, route_count, &load);
    let outcome = engine.run(&mut ring, router, wire, spec, &mut load, progress);
    engine.drain(&mut ring);
    outcome
}

struct Engine {
    connections: Vec<Connection>,
    sessions: Vec<Session>,
    /// Submissions the kernel has not completed yet.
    in_kernel_count: usize,
    key: Vec<u8>,
    value: Vec<u8>,
    total: Recorder,
    interval: Recorder,
    issued_count: u64,
    /// Reused for the completions of one pass.
    completions: Vec<(u64, i32)>,
}

impl Engine {
    fn new(streams: Vec<TcpStream>, route_count: usize, load: &ThreadLoad) -> Self {
        let connections = streams
            .into_iter()
            .enumerate()
            .map(|(index, stream)| {
                let mut receive = FrameBuffer::with_capacity(RECEIVE_BUFFER_SIZE);
                receive.resize(RECEIVE_BUFFER_SIZE, 0);
                Connection {
                    stream,
                    session: index / route_count,
                    pending: FrameBuffer::with_capacity(4096),
                    sending: FrameBuffer::with_capacity(4096),
                    sent: 0,
                    is_sending: false,
                    receive,
                    filled: 0,
                    is_receiving: false,
                    in_flight: VecDeque::with_capacity(load.pipeline),
                    next_request_id: 1,
                }
            })
            .collect();
        let start = Instant::now();
        let sessions = (0..load.session_count)
            .map(|index| Session {
                first_connection: index * route_count,
                outstanding: 0,
                next_due: start,
            })
            .collect();
        Self {
            connections,
            sessions,
            in_kernel_count: 0,
            key: Vec::new(),
            value: Vec::new(),
            total: Recorder::new(),
            interval: Recorder::new(),
            issued_count: 0,
            completions: Vec::with_capacity(1024),
        }
    }

    fn run(
        &mut self,
        ring: &mut IoUring,
        router: &dyn Router,
        wire: &mut dyn Wire,
        spec: &WorkloadSpec,
        load: &mut ThreadLoad,
        progress: Option<&mpsc::Sender<Recorder>>,
    ) -> Result<ThreadOutcome, String> {
        self.value = spec.value();
        let interval = load
            .rate_per_session
            .map(|rate| Duration::from_secs_f64(1.0 / rate.max(1e-9)));
        let started = Instant::now();
        let session_count = self.sessions.len();
        for (index, session) in self.sessions.iter_mut().enumerate() {
            session.next_due = started + stagger(load.rate_per_session, index, session_count);
        }
        let deadline = load.duration.map(|duration| started + duration);
        let mut next_progress = started + PROGRESS_INTERVAL;
        let mut is_exhausted = false;
        loop {
            let now = Instant::now();
            if deadline.is_some_and(|deadline| now >= deadline) {
                break;
            }
            if now >= next_progress {
                if let Some(progress) = progress {
                    let _ = progress.send(self.interval.clone());
                }
                self.interval.reset();
                next_progress += PROGRESS_INTERVAL;
            }
            if !is_exhausted {
                is_exhausted = self.issue(now, interval, router, wire, spec, load)?;
            }
            let outstanding: usize = self
                .sessions
                .iter()
                .map(|session| session.outstanding)
                .sum();
            if is_exhausted && outstanding == 0 {
                break;
            }
            self.queue_io(ring)?;
            let mut wake_at = next_progress;
            if let Some(deadline) = deadline {
                wake_at = wake_at.min(deadline);
            }
            if interval.is_some() && !is_exhausted {
                if let Some(due) = self
                    .sessions
                    .iter()
                    .filter(|session| session.outstanding < load.pipeline)
                    .map(|session| session.next_due)
                    .min()
                {
                    wake_at = wake_at.min(due);
                }
            }
            submit_and_wait(ring, wake_at.saturating_duration_since(Instant::now()))?;
            let now = Instant::now();
            self.complete(ring, now, wire)?;
        }
        if let Some(progress) = progress {
            let _ = progress.send(self.interval.clone());
        }
        let elapsed = match deadline {
            Some(deadline) => deadline.min(Instant::now()) - started,
            None => started.elapsed(),
        };
        Ok(ThreadOutcome {
            record: std::mem::take(&mut self.total),
            elapsed,
        })
    }

    /// Fills every session's window (closed loop) or sends what is due (open loop). Returns
    /// whether the thread has nothing more to issue.
    fn issue(
        &mut self,
        now: Instant,
        interval: Option<Duration>,
        router: &dyn Router,
        wire: &mut dyn Wire,
        spec: &WorkloadSpec,
        load: &mut ThreadLoad,
    ) -> Result<bool, String> {
        for session_index in 0..self.sessions.len() {
            loop {
                let session = &self.sessions[session_index];
                if session.outstanding >= load.pipeline {
                    break;
                }
                if interval.is_some() && session.next_due > now {
                    break;
                }
                if load
                    .operation_count_max
                    .is_some_and(|count_max| self.issued_count >= count_max)
                {
                    return Ok(true);
                }
                let Some((op, key_index)) = load.keys.next() else {
                    return Ok(true);
                };
                spec.write_key(key_index, &mut self.key);
                let route = router.route(&self.key);
                let session = &mut self.sessions[session_index];
                let started = match interval {
                    Some(interval) => {
                        let due = session.next_due;
                        session.next_due += interval;
                        due
                    }
                    None => now,
                };
                session.outstanding += 1;
                let connection = &mut self.connections[session.first_connection + route];
                let request_id = connection.next_request_id;
                connection.next_request_id += 1;
                wire.encode(
                    op,
                    &self.key,
                    &self.value,
                    request_id,
                    &mut connection.pending,
                )?;
                connection.in_flight.push_back(InFlight {
                    request_id,
                    op,
                    started,
                });
                self.issued_count += 1;
            }
        }
        Ok(false)
    }

    /// Queues a send for every connection with bytes to send and none in flight, and a
    /// receive for every connection without one.
    fn queue_io(&mut self, ring: &mut IoUring) -> Result<(), String> {
        for (index, connection) in self.connections.iter_mut().enumerate() {
            let fd = types::Fd(connection.stream.as_raw_fd());
            let token = (index as u64) << 1;
            if !connection.is_sending {
                if connection.sent == connection.sending.len() && !connection.pending.is_empty() {
                    std::mem::swap(&mut connection.pending, &mut connection.sending);
                    connection.pending.clear();
                    connection.sent = 0;
                }
                if connection.sent < connection.sending.len() {
                    let rest = &connection.sending[connection.sent..];
                    let length = u32::try_from(rest.len()).unwrap_or(u32::MAX);
                    let entry = opcode::Send::new(fd, rest.as_ptr(), length)
                        .build()
                        .user_data(token | TOKEN_SEND);
                    push(ring, &entry)?;
                    connection.is_sending = true;
                    self.in_kernel_count += 1;
                }
            }
            if !connection.is_receiving {
                let space = &mut connection.receive[connection.filled..];
                let length = u32::try_from(space.len()).unwrap_or(u32::MAX);
                let entry = opcode::Recv::new(fd, space.as_mut_ptr(), length)
                    .build()
                    .user_data(token | TOKEN_RECEIVE);
                push(ring, &entry)?;
                connection.is_receiving = true;
                self.in_kernel_count += 1;
            }
        }
        Ok(())
    }

    /// Handles every completion the kernel has posted.
    fn complete(
        &mut self,
        ring: &mut IoUring,
        now: Instant,
        wire: &dyn Wire,
    ) -> Result<(), String> {
        let mut completions = std::mem::take(&mut self.completions);
        completions.clear();
        completions.extend(
            ring.completion()
                .map(|entry| (entry.user_data(), entry.result())),
        );
        let outcome = self.complete_each(&completions, now, wire);
        self.completions = completions;
        outcome
    }

    fn complete_each(
        &mut self,
        completions: &[(u64, i32)],
        now: Instant,
        wire: &dyn Wire,
    ) -> Result<(), String> {
        for &(token, result) in completions {
            self.in_kernel_count -= 1;
            let index = usize::try_from(token >> 1).unwrap_or(usize::MAX);
            let connection = &mut self.connections[index];
            let size = usize::try_from(result).map_err(|_| {
                let error = io::Error::from_raw_os_error(-result);
                format!("connection {index}: {error}")
            })?;
            if token & 1 == TOKEN_SEND {
                connection.is_sending = false;
                connection.sent += size;
                if connection.sent == connection.sending.len() {
                    connection.sending.clear();
                    connection.sent = 0;
                }
                continue;
            }
            connection.is_receiving = false;
            if size == 0 {
                return Err(format!(
                    "connection {index}: the server closed the connection"
                ));
            }
            connection.filled += size;
            let mut offset = 0;
            while let Some(reply) = wire.decode(&connection.receive[offset..connection.filled])? {
                offset += reply.size;
                let position = match reply.request_id {
                    Some(request_id) => connection
                        .in_flight
                        .iter()
                        .position(|request| request.request_id == request_id)
                        .ok_or_else(|| {
                            format!("connection {index}: reply to unknown request {request_id}")
                        })?,
                    None => 0,
                };
                let request = connection
                    .in_flight
                    .remove(position)
                    .ok_or_else(|| format!("connection {index}: a reply nobody asked for"))?;
                let latency = now.saturating_duration_since(request.started);
                self.total.record(request.op, latency, reply.is_error);
                self.interval.record(request.op, latency, reply.is_error);
                self.sessions[connection.session].outstanding -= 1;
            }
            connection.receive.copy_within(offset..connection.filled, 0);
            connection.filled -= offset;
            let needed = wire
                .reply_size_needed(&connection.receive[..connection.filled])
                .unwrap_or(0)
                .max(connection.filled + 1);
            if needed > connection.receive.len() {
                connection.receive.resize(needed.next_power_of_two(), 0);
            }
        }
        Ok(())
    }

    /// Ends the run safely: shuts every socket down so pending operations complete, and waits
    /// until the kernel has returned every buffer.
    fn drain(&mut self, ring: &mut IoUring) {
        for connection in &self.connections {
            let _ = connection.stream.shutdown(std::net::Shutdown::Both);
        }
        let give_up_at = Instant::now() + DRAIN_TIMEOUT;
        while self.in_kernel_count > 0 && Instant::now() < give_up_at {
            if submit_and_wait(ring, Duration::from_millis(100)).is_err() {
                break;
            }
            let completed = ring.completion().count();
            self.in_kernel_count = self.in_kernel_count.saturating_sub(completed);
        }
        if self.in_kernel_count > 0 {
            // The kernel still holds buffers; freeing them could let it write into freed
            // memory. Leak them instead (this happens only when a run ends in a broken state).
            for connection in self.connections.drain(..) {
                std::mem::forget(connection);
            }
        }
    }
}

/// Open loop: spreads the sessions' first sends over one interval so they do not all fire at
/// once.
fn stagger(rate_per_session: Option<f64>, index: usize, session_count: usize) -> Duration {
    match rate_per_session {
        #[allow(clippy::cast_precision_loss, reason = "small counts")]
        Some(rate) => {
            Duration::from_secs_f64(index as f64 / (session_count as f64 * rate.max(1e-9)))
        }
        None => Duration::ZERO,
    }
}

/// A ring that runs its completion work only when this thread asks for completions
/// (`DEFER_TASKRUN`, single issuer). Without it every completion makes the kernel interrupt
/// this thread, wherever it runs, and the peer's `send` pays for that interrupt; measured here,
/// that costs both sides several microseconds per message. Falls back to a plain ring on
/// kernels before 6.1.
fn new_ring(entries: u32) -> Result<IoUring, String> {
    let deferred = IoUring::builder()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .build(entries);
    match deferred {
        Ok(ring) => Ok(ring),
        Err(_) => IoUring::new(entries).map_err(|error| format!("io_uring: {error}")),
    }
}

fn push(ring: &mut IoUring, entry: &io_uring::squeue::Entry) -> Result<(), String> {
    // SAFETY: every buffer an entry points to lives in a connection that is neither dropped
    // nor resized until the entry's completion has been reaped (see the module docs).
    unsafe { ring.submission().push(entry) }
        .map_err(|_| "submission queue full (a bug: it is sized for every connection)".to_owned())
}

/// Submits everything queued and waits for at least one completion or `timeout`.
fn submit_and_wait(ring: &mut IoUring, timeout: Duration) -> Result<(), String> {
    let timespec = types::Timespec::from(timeout.max(Duration::from_micros(1)));
    let arguments = types::SubmitArgs::new().timespec(&timespec);
    match ring.submitter().submit_with_args(1, &arguments) {
        Ok(_) => Ok(()),
        Err(error) if matches!(error.raw_os_error(), Some(libc::ETIME | libc::EINTR)) => Ok(()),
        Err(error) => Err(format!("io_uring_enter: {error}")),
    }
}
