//! One multiplexed, pipelined connection to one server core.
//!
//! Any number of tasks may call [`Connection::call`] at once: each request gets a fresh
//! request id, its frame is queued to a writer task that sends everything queued in one write,
//! and a reader task completes each caller's reply by request id. The number of requests in
//! flight is bounded by a semaphore; callers beyond it wait.
//!
//! A broken connection fails every request in flight as `Disconnected` (indeterminate: they
//! were sent) and is replaced by a new one on the next call.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tessera_protocol::codec::{self, FrameBuffer};
use tessera_protocol::limits::FRAME_HEADER_SIZE;
use tessera_protocol::{ErrorCode, Request, Response, ShardStamp};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, watch, Semaphore};

use crate::error::{ClientError, Result};

/// Settings that shape a connection.
#[derive(Debug, Clone)]
pub(crate) struct ConnectionSettings {
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    pub inflight_max: usize,
    pub watch_buffer_bytes_max: usize,
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
}

impl Link {
    fn pending(&self) -> MutexGuard<'_, Pending> {
        // Critical sections are single map operations, so a poisoned lock is still consistent.
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn is_closed(&self) -> bool {
        self.pending().is_closed
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
    pub(crate) fn new(address: String, settings: ConnectionSettings) -> Self {
        Self {
            address,
            settings,
            link: tokio::sync::Mutex::new(None),
        }
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
                    // minutes to notice, so drop the link and let the next call reconnect.
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

    /// The live link, connecting if there is none or the last one broke.
    async fn link(&self) -> Result<Arc<Link>> {
        let mut slot = self.link.lock().await;
        if let Some(link) = slot.as_ref() {
            if !link.is_closed() {
                return Ok(link.clone());
            }
        }
        let stream = tokio::time::timeout(
            self.settings.connect_timeout,
            TcpStream::connect(&self.address),
        )
        .await
        .map_err(|_| {
            self.not_sent(&format!(
                "connect timed out after {:?}",
                self.settings.connect_timeout
            ))
        })?
        .map_err(|io_error| self.not_sent(&io_error.to_string()))?;
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
        });
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
