//! One multiplexed, pipelined connection to one server core.
//!
//! Any number of tasks may call [`Connection::call`] at once: each request gets a fresh
//! request id, its frame is queued to a writer task that sends everything queued in one write,
//! and a reader task completes each caller's reply by request id. The number of requests in
//! flight is bounded by a semaphore; callers beyond it wait.
//!
//! A broken connection fails every request in flight as `Disconnected` (indeterminate: they
//! were sent) and is replaced by a new one on the next call.
//!
//! Health: a connection that cannot connect, or whose peer stops answering (requests
//! outstanding or watches open, a ping sent, and nothing received for `liveness_timeout`), marks its node
//! down (the health is shared by the connections to the node's cores). While down every call fails at once with [`ClientError::Unavailable`] (nothing
//! sent), and a background probe reconnects with jittered exponential backoff; once the node
//! answers a ping it is up again and the client is told to refresh its topology.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tessera_protocol::codec::{self, FrameBuffer};
use tessera_protocol::limits::FRAME_HEADER_SIZE;
use tessera_protocol::{ErrorCode, Request, Response, ShardStamp};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, watch, Notify, Semaphore};

use crate::error::{ClientError, Result};

/// Settings that shape a connection.
#[derive(Debug, Clone)]
pub(crate) struct ConnectionSettings {
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    pub inflight_max: usize,
    pub watch_buffer_bytes_max: usize,
    /// A connection with requests outstanding that receives nothing (a ping included) for
    /// this long is closed and its node marked down.
    pub liveness_timeout: Duration,
    /// First wait of the background probe of a node marked down; doubled per failure.
    pub reconnect_backoff_base: Duration,
    /// Longest wait between probes.
    pub reconnect_backoff_max: Duration,
    /// Notified when a node marked down answers again (the topology may have changed).
    pub recovered: Arc<Notify>,
}

/// Whether a connection's node answers, shared with its background probe.
#[derive(Debug, Default)]
pub(crate) struct Health {
    /// Set while the node is marked down: since when, and why.
    down: Option<(Instant, String)>,
    /// Failed attempts in a row (connects and probes).
    failures: u32,
}

/// One node's health, shared by the connections to its cores: one of them failing marks the
/// node down for all, and one probe brings it back.
pub(crate) type SharedHealth = Arc<Mutex<Health>>;

fn lock_health(health: &Mutex<Health>) -> MutexGuard<'_, Health> {
    health.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Bytes the writer gathers from the queue into one write at most.
const WRITE_BATCH_BYTES_MAX: usize = 1024 * 1024;

/// Bytes read per call when no large frame is being received.
const READ_BUFFER_SIZE: usize = 64 * 1024;

/// A response and the shard state it reflects.
pub(crate) type Stamped = (Option<ShardStamp>, Response);

type ReplySender = oneshot::Sender<Result<Stamped>>;

/// Where the reader hands a watch's pushed messages, with their sizes. At most
/// `ConnectionSettings::watch_buffer_bytes_max` bytes (archived size) wait for the stream's
/// reader, and always one message; past it the stream is ended as overflowed (the caller
/// reports its watch as lagging), so a consumer that stops reading never stalls the
/// connection's other requests or grows the client's memory.
struct StreamSender {
    sender: mpsc::UnboundedSender<(Response, usize)>,
    queued: Arc<AtomicUsize>,
    queued_max: usize,
    overflowed: Arc<AtomicBool>,
}

#[derive(Default)]
struct Pending {
    replies: HashMap<u64, ReplySender>,
    /// Open watch streams by the request id of their `Watch`.
    streams: HashMap<u64, StreamSender>,
    is_closed: bool,
}

/// The live part of a connection; replaced whole when the socket breaks.
struct Link {
    outbound: mpsc::UnboundedSender<FrameBuffer>,
    pending: Mutex<Pending>,
    inflight: Semaphore,
    /// Becomes true once the link is dead; the reader and writer tasks watch it.
    closed: watch::Sender<bool>,
    next_request_id: AtomicU64,
    /// Replies received so far; a request that times out with no reply received meanwhile
    /// marks the connection silent.
    reply_count: AtomicU64,
    /// When the link was made; the two stamps below count milliseconds from it.
    started: Instant,
    /// The last sign of life: a frame received, or a request sent while none was outstanding.
    progress_ms: AtomicU64,
    /// When the liveness check last sent a ping (0: never).
    ping_ms: AtomicU64,
}

impl Link {
    fn pending(&self) -> MutexGuard<'_, Pending> {
        // Critical sections are single map operations, so a poisoned lock is still consistent.
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn is_closed(&self) -> bool {
        self.pending().is_closed
    }

    fn elapsed_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn made_progress(&self) {
        self.progress_ms.store(self.elapsed_ms(), Ordering::Relaxed);
    }

    /// Marks the link dead and fails every request in flight with `error`.
    fn close(&self, error: &ClientError) {
        let replies = {
            let mut pending = self.pending();
            pending.is_closed = true;
            // Dropping the senders ends each stream as disconnected.
            pending.streams.clear();
            std::mem::take(&mut pending.replies)
        };
        for (_, reply) in replies {
            let _ = reply.send(Err(error.clone()));
        }
        self.closed.send_replace(true);
        self.inflight.close();
    }
}

/// A connection to one core, connected lazily and reconnected after a failure.
pub(crate) struct Connection {
    address: String,
    settings: ConnectionSettings,
    link: tokio::sync::Mutex<Option<Arc<Link>>>,
    health: SharedHealth,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Connection")
            .field("address", &self.address)
            .finish_non_exhaustive()
    }
}

impl Connection {
    /// A connection to `address` whose node's health is `health`.
    pub(crate) fn new(address: String, settings: ConnectionSettings, health: SharedHealth) -> Self {
        Self {
            address,
            settings,
            link: tokio::sync::Mutex::new(None),
            health,
        }
    }

    /// Why and since when the node is marked down, if it is.
    pub(crate) fn down(&self) -> Option<(Duration, String)> {
        lock_health(&self.health)
            .down
            .as_ref()
            .map(|(since, reason)| (since.elapsed(), reason.clone()))
    }

    fn unavailable(&self) -> Option<ClientError> {
        self.down()
            .map(|(down_for, reason)| ClientError::Unavailable {
                address: self.address.clone(),
                reason,
                down_for,
            })
    }

    /// Marks the node down (if it is not already) and starts the background probe that
    /// marks it up again.
    fn mark_down(&self, reason: String) {
        mark_down(&self.health, &self.address, &self.settings, reason);
    }

    pub(crate) fn address(&self) -> &str {
        &self.address
    }

    /// Sends `request` and waits for its reply and the shard state it reflects.
    pub(crate) async fn call(&self, request: &Request) -> Result<Stamped> {
        self.call_with_stream(request, false)
            .await
            .map(|(stamped, _)| stamped)
    }

    /// Sends a `Watch` and waits for its first reply; the messages pushed after it arrive
    /// on the returned stream (which is `None` unless the reply is `Watching`).
    pub(crate) async fn open_stream(
        &self,
        request: &Request,
    ) -> Result<(Response, Option<RemoteStream>)> {
        self.call_with_stream(request, true)
            .await
            .map(|((_, response), stream)| (response, stream))
    }

    async fn call_with_stream(
        &self,
        request: &Request,
        wants_stream: bool,
    ) -> Result<(Stamped, Option<RemoteStream>)> {
        let link = self.link().await?;
        let Ok(_permit) = link.inflight.acquire().await else {
            return Err(self.disconnected());
        };
        let request_id = link.next_request_id.fetch_add(1, Ordering::Relaxed);
        let mut frame = FrameBuffer::new();
        codec::encode_request(&mut frame, request_id, request).map_err(ClientError::Encode)?;
        let (reply_sender, reply) = oneshot::channel();
        let mut stream = None;
        {
            let mut pending = link.pending();
            if pending.is_closed {
                // Nothing was sent on this link; the caller may retry.
                return Err(self.not_sent("connection closed before sending"));
            }
            if pending.replies.is_empty() {
                // The liveness check measures silence from the first outstanding request.
                link.made_progress();
            }
            pending.replies.insert(request_id, reply_sender);
            if wants_stream {
                // Registered before sending: pushes may follow the first reply at once.
                let (sender, receiver) = mpsc::unbounded_channel();
                let overflowed = Arc::new(AtomicBool::new(false));
                let queued = Arc::new(AtomicUsize::new(0));
                pending.streams.insert(
                    request_id,
                    StreamSender {
                        sender,
                        queued: queued.clone(),
                        queued_max: self.settings.watch_buffer_bytes_max,
                        overflowed: overflowed.clone(),
                    },
                );
                stream = Some(RemoteStream {
                    link: link.clone(),
                    watch_id: request_id,
                    receiver,
                    queued,
                    overflowed,
                });
            }
        }
        let replies_before = link.reply_count.load(Ordering::Relaxed);
        if link.outbound.send(frame).is_err() {
            link.pending().replies.remove(&request_id);
            return Err(self.not_sent("connection writer stopped before sending"));
        }
        // A lock request may wait in line on the server for as long as it asked.
        let request_timeout = self.settings.request_timeout
            + match request {
                Request::Lock { wait_ms, .. } => Duration::from_millis(u64::from(*wait_ms)),
                _ => Duration::ZERO,
            };
        match tokio::time::timeout(request_timeout, reply).await {
            Ok(Ok(result)) => {
                let (stamp, response) = result?;
                let is_open = matches!(response, Response::Watching(_));
                Ok(((stamp, response), stream.filter(|_| is_open)))
            }
            Ok(Err(_)) => Err(self.disconnected()),
            Err(_) => {
                link.pending().replies.remove(&request_id);
                let timeout = ClientError::Timeout {
                    address: self.address.clone(),
                    timeout: request_timeout,
                };
                if link.reply_count.load(Ordering::Relaxed) == replies_before {
                    // Not one reply on this connection for a whole request timeout: the peer
                    // is gone or stuck (a crashed host, a partition). TCP may take many
                    // minutes to notice, so drop the link; the next call connects again. (A
                    // node is marked down only by a failed connect or by the liveness check,
                    // whose ping tells a stuck node from a slow request.)
                    tracing::debug!(address = %self.address, "silent connection; closing");
                    link.close(&timeout);
                }
                Err(timeout)
            }
        }
    }

    fn disconnected(&self) -> ClientError {
        ClientError::Disconnected {
            address: self.address.clone(),
        }
    }

    fn not_sent(&self, reason: &str) -> ClientError {
        ClientError::Connect {
            address: self.address.clone(),
            reason: reason.to_owned(),
        }
    }

    /// The live link, connecting if there is none or the last one broke; fails at once while
    /// the node is marked down.
    async fn link(&self) -> Result<Arc<Link>> {
        if let Some(unavailable) = self.unavailable() {
            return Err(unavailable);
        }
        let mut slot = self.link.lock().await;
        if let Some(link) = slot.as_ref() {
            if !link.is_closed() {
                return Ok(link.clone());
            }
        }
        // Callers that queued behind a failed attempt do not try again.
        if let Some(unavailable) = self.unavailable() {
            return Err(unavailable);
        }
        let stream = match connect(&self.address, self.settings.connect_timeout).await {
            Ok(stream) => stream,
            Err(reason) => {
                self.mark_down(reason.clone());
                return Err(self.not_sent(&reason));
            }
        };
        lock_health(&self.health).failures = 0;
        stream
            .set_nodelay(true)
            .map_err(|io_error| self.not_sent(&io_error.to_string()))?;
        // Keepalive lets the kernel notice a peer that vanished without closing.
        let _ = socket2::SockRef::from(&stream).set_keepalive(true);
        let (reader, writer) = stream.into_split();
        let (outbound, queued) = mpsc::unbounded_channel();
        let link = Arc::new(Link {
            outbound,
            pending: Mutex::new(Pending::default()),
            inflight: Semaphore::new(self.settings.inflight_max),
            closed: watch::Sender::new(false),
            // Request id 0 is reserved for replies about the connection itself.
            next_request_id: AtomicU64::new(1),
            reply_count: AtomicU64::new(0),
            started: Instant::now(),
            progress_ms: AtomicU64::new(0),
            ping_ms: AtomicU64::new(0),
        });
        tokio::spawn(check_liveness(
            Arc::downgrade(&link),
            self.health.clone(),
            self.address.clone(),
            self.settings.clone(),
        ));
        tokio::spawn(write_loop(
            link.clone(),
            writer,
            queued,
            self.address.clone(),
        ));
        tokio::spawn(read_loop(link.clone(), reader, self.address.clone()));
        *slot = Some(link.clone());
        Ok(link)
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        if let Some(link) = self.link.get_mut().take() {
            link.close(&ClientError::ShutDown);
        }
    }
}

async fn write_loop(
    link: Arc<Link>,
    mut writer: OwnedWriteHalf,
    mut queued: mpsc::UnboundedReceiver<FrameBuffer>,
    address: String,
) {
    let mut batch = Vec::with_capacity(READ_BUFFER_SIZE);
    let mut closed = link.closed.subscribe();
    loop {
        let first = tokio::select! {
            frame = queued.recv() => frame,
            _ = closed.wait_for(|&is_closed| is_closed) => None,
        };
        let Some(first) = first else { break };
        batch.extend_from_slice(&first);
        while batch.len() < WRITE_BATCH_BYTES_MAX {
            match queued.try_recv() {
                Ok(frame) => batch.extend_from_slice(&frame),
                Err(_) => break,
            }
        }
        if let Err(io_error) = writer.write_all(&batch).await {
            tracing::debug!(%address, %io_error, "write failed");
            link.close(&ClientError::Disconnected {
                address: address.clone(),
            });
            break;
        }
        batch.clear();
    }
    let _ = writer.shutdown().await;
}

async fn read_loop(link: Arc<Link>, mut reader: OwnedReadHalf, address: String) {
    let error = match read_replies(&link, &mut reader, &address).await {
        Ok(()) => ClientError::Disconnected {
            address: address.clone(),
        },
        Err(error) => error,
    };
    tracing::debug!(%address, %error, "connection closed");
    link.close(&error);
}

async fn read_replies(link: &Link, reader: &mut OwnedReadHalf, address: &str) -> Result<()> {
    let mut buffer = FrameBuffer::with_capacity(READ_BUFFER_SIZE);
    buffer.resize(READ_BUFFER_SIZE, 0);
    let mut filled = 0;
    let mut closed = link.closed.subscribe();
    loop {
        let mut offset = 0;
        loop {
            let frame = codec::decode_frame(&buffer[offset..filled]).map_err(|frame_error| {
                ClientError::Protocol {
                    address: address.to_owned(),
                    error: frame_error.error,
                }
            })?;
            let Some(frame) = frame else { break };
            offset += frame.frame_size;
            let (stamp, response) =
                codec::decode_reply(frame.body).map_err(|error| ClientError::Protocol {
                    address: address.to_owned(),
                    error,
                })?;
            let request_id = frame.header.request_id;
            link.reply_count.fetch_add(1, Ordering::Relaxed);
            link.made_progress();
            if request_id == 0 {
                // A message about the connection itself (such as the connection limit).
                return Err(match response {
                    Response::Error(reply) => ClientError::Server {
                        code: reply.code,
                        message: reply.message,
                    },
                    other => ClientError::UnexpectedReply(format!("{other:?} for request id 0")),
                });
            }
            let mut pending = link.pending();
            if let Some(reply) = pending.replies.remove(&request_id) {
                drop(pending);
                // The caller may have timed out and gone; that is fine.
                let _ = reply.send(Ok((stamp, response)));
            } else if let Some(stream) = pending.streams.get(&request_id) {
                let is_last = matches!(response, Response::WatchCancelled(_));
                let size = frame.body.len();
                let queued = stream.queued.load(Ordering::Relaxed);
                if queued > 0 && queued + size > stream.queued_max {
                    stream.overflowed.store(true, Ordering::Relaxed);
                    pending.streams.remove(&request_id);
                } else {
                    stream.queued.fetch_add(size, Ordering::Relaxed);
                    // A reader that has gone is noticed when its stream is dropped.
                    let is_gone = stream.sender.send((response, size)).is_err();
                    if is_last || is_gone {
                        pending.streams.remove(&request_id);
                    }
                }
            }
        }
        buffer.copy_within(offset..filled, 0);
        filled -= offset;
        let needed = codec::frame_size_needed(&buffer[..filled]).unwrap_or(FRAME_HEADER_SIZE);
        if needed > buffer.len() {
            buffer.resize(needed, 0);
        } else if buffer.len() > READ_BUFFER_SIZE && filled <= READ_BUFFER_SIZE {
            buffer.resize(READ_BUFFER_SIZE, 0);
        }
        let read_size = tokio::select! {
            read = reader.read(&mut buffer[filled..]) => read.map_err(|_| ClientError::Disconnected {
                address: address.to_owned(),
            })?,
            _ = closed.wait_for(|&is_closed| is_closed) => return Ok(()),
        };
        if read_size == 0 {
            return Ok(());
        }
        filled += read_size;
    }
}

/// Opens a TCP connection within `timeout`; the error says why not.
async fn connect(address: &str, timeout: Duration) -> std::result::Result<TcpStream, String> {
    match tokio::time::timeout(timeout, TcpStream::connect(address)).await {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(io_error)) => Err(io_error.to_string()),
        Err(_) => Err(format!("connect timed out after {timeout:?}")),
    }
}

/// Marks `health` down for `reason` and, unless it already was, starts the probe.
fn mark_down(health: &SharedHealth, address: &str, settings: &ConnectionSettings, reason: String) {
    {
        let mut state = lock_health(health);
        state.failures = state.failures.saturating_add(1);
        if state.down.is_some() {
            return;
        }
        tracing::warn!(%address, %reason, "node marked down");
        state.down = Some((Instant::now(), reason));
    }
    tokio::spawn(probe(
        Arc::downgrade(health),
        address.to_owned(),
        settings.clone(),
    ));
}

/// Probes a node marked down until it answers a ping, then marks it up. Ends early if the
/// connection is dropped.
async fn probe(
    health: std::sync::Weak<Mutex<Health>>,
    address: String,
    settings: ConnectionSettings,
) {
    loop {
        let failures = match health.upgrade() {
            Some(health) => lock_health(&health).failures,
            None => return,
        };
        tokio::time::sleep(crate::jittered_backoff(
            failures.saturating_sub(1),
            settings.reconnect_backoff_base,
            settings.reconnect_backoff_max,
        ))
        .await;
        let Some(health) = health.upgrade() else {
            return;
        };
        // A throwaway connection of its own, so the probe shares no state with callers.
        let answered = match connect(&address, settings.connect_timeout).await {
            Ok(stream) => ping_once(stream, settings.liveness_timeout).await,
            Err(reason) => Err(reason),
        };
        let mut state = lock_health(&health);
        match answered {
            Ok(()) => {
                let down_for = state.down.take().map(|(since, _)| since.elapsed());
                state.failures = 0;
                drop(state);
                tracing::info!(%address, ?down_for, "node answers again");
                settings.recovered.notify_one();
                return;
            }
            Err(reason) => {
                state.failures = state.failures.saturating_add(1);
                tracing::debug!(%address, %reason, failures = state.failures, "probe failed");
            }
        }
    }
}

/// Sends one ping on `stream` and waits up to `timeout` for its answer.
async fn ping_once(mut stream: TcpStream, timeout: Duration) -> std::result::Result<(), String> {
    let mut frame = FrameBuffer::new();
    codec::encode_request(&mut frame, 1, &Request::Ping).map_err(|error| error.to_string())?;
    let exchange = async {
        stream
            .write_all(&frame)
            .await
            .map_err(|error| error.to_string())?;
        let mut received = vec![0_u8; READ_BUFFER_SIZE];
        let mut filled = 0;
        loop {
            let read = stream
                .read(&mut received[filled..])
                .await
                .map_err(|error| error.to_string())?;
            if read == 0 {
                return Err("closed before answering the ping".to_owned());
            }
            filled += read;
            match codec::decode_frame(&received[..filled]) {
                Ok(Some(frame)) => {
                    return match codec::decode_reply(frame.body) {
                        Ok((_, Response::Pong { .. })) => Ok(()),
                        Ok((_, other)) => Err(format!("answered the ping with {other:?}")),
                        Err(error) => Err(error.to_string()),
                    };
                }
                Ok(None) if filled < received.len() => {}
                Ok(None) => return Err("the ping's answer is too large".to_owned()),
                Err(error) => return Err(error.error.to_string()),
            }
        }
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| format!("no answer to a ping within {timeout:?}"))?
}

/// While the link lives and has work (requests outstanding, or watch streams open): with
/// nothing received for half the liveness timeout, sends a ping; if that ping goes unanswered
/// for half the timeout more, with nothing received for the whole timeout, closes the link
/// (its requests fail as timed out, its streams end and their watches reopen) and marks the
/// node down.
async fn check_liveness(
    link: std::sync::Weak<Link>,
    health: SharedHealth,
    address: String,
    settings: ConnectionSettings,
) {
    let timeout = settings.liveness_timeout;
    let timeout_ms = u64::try_from(timeout.as_millis())
        .unwrap_or(u64::MAX)
        .max(4);
    loop {
        tokio::time::sleep(timeout / 4).await;
        let Some(link) = link.upgrade() else { return };
        if link.is_closed() {
            return;
        }
        let has_work = {
            let pending = link.pending();
            !pending.replies.is_empty() || !pending.streams.is_empty()
        };
        if !has_work {
            continue;
        }
        let now = link.elapsed_ms();
        let progress = link.progress_ms.load(Ordering::Relaxed);
        let silent_ms = now.saturating_sub(progress);
        let pinged = link.ping_ms.load(Ordering::Relaxed);
        // A ping sent after the last frame received is still unanswered.
        let is_ping_unanswered = pinged > progress;
        if is_ping_unanswered
            && silent_ms >= timeout_ms
            && now.saturating_sub(pinged) >= timeout_ms / 2
        {
            tracing::debug!(%address, silent_ms, "no answer, not even to a ping; closing");
            // Down first, so a caller woken by the close does not connect again.
            mark_down(
                &health,
                &address,
                &settings,
                format!("no answer, not even to a ping, within {timeout:?}"),
            );
            link.close(&ClientError::Timeout {
                address: address.clone(),
                timeout,
            });
            return;
        }
        if silent_ms >= timeout_ms / 2 && !is_ping_unanswered {
            link.ping_ms.store(now.max(1), Ordering::Relaxed);
            let request_id = link.next_request_id.fetch_add(1, Ordering::Relaxed);
            let mut frame = FrameBuffer::new();
            if codec::encode_request(&mut frame, request_id, &Request::Ping).is_ok() {
                // Its answer goes to an id nobody waits for; receiving it is what counts.
                let _ = link.outbound.send(frame);
            }
        }
    }
}

/// A server error carried as a [`ClientError`].
pub(crate) fn server_error(code: ErrorCode, message: String) -> ClientError {
    ClientError::Server { code, message }
}

/// The messages a server pushes for one watch opened on a connection.
pub(crate) struct RemoteStream {
    link: Arc<Link>,
    watch_id: u64,
    receiver: mpsc::UnboundedReceiver<(Response, usize)>,
    queued: Arc<AtomicUsize>,
    overflowed: Arc<AtomicBool>,
}

impl std::fmt::Debug for RemoteStream {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("RemoteStream")
            .field("watch_id", &self.watch_id)
            .finish_non_exhaustive()
    }
}

/// How a stream's next message turned out.
#[derive(Debug)]
pub(crate) enum StreamNext {
    /// A pushed message.
    Message(Response),
    /// The reader fell behind and the stream was ended (the watch lags).
    Overflowed,
    /// The connection closed (or the server ended the stream after its cancellation).
    Closed,
}

impl RemoteStream {
    pub(crate) async fn next(&mut self) -> StreamNext {
        match self.receiver.recv().await {
            Some((response, size)) => {
                self.queued.fetch_sub(size, Ordering::Relaxed);
                StreamNext::Message(response)
            }
            None if self.overflowed.load(Ordering::Relaxed) => StreamNext::Overflowed,
            None => StreamNext::Closed,
        }
    }

    /// Asks the server for a progress notification on this stream.
    pub(crate) fn request_progress(&self) {
        self.send_on_link(&Request::WatchProgress {
            watch_id: self.watch_id,
        });
    }

    /// Sends `request` on the stream's own connection without waiting for its answer (a
    /// watch id means nothing on another connection).
    fn send_on_link(&self, request: &Request) {
        if self.link.is_closed() {
            return;
        }
        let request_id = self.link.next_request_id.fetch_add(1, Ordering::Relaxed);
        let mut frame = FrameBuffer::new();
        if codec::encode_request(&mut frame, request_id, request).is_ok() {
            // An answer to an id nobody waits for is dropped by the reader.
            let _ = self.link.outbound.send(frame);
        }
    }
}

impl Drop for RemoteStream {
    fn drop(&mut self) {
        self.link.pending().streams.remove(&self.watch_id);
        // Also after an overflow, which removed the stream on this side only. After the
        // server's own cancellation the answer is `existed: false`; nothing else can hold the
        // id, which is never reused on this connection.
        self.send_on_link(&Request::Unwatch {
            watch_id: self.watch_id,
        });
    }
}
