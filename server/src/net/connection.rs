//! One client connection: pipelined requests read in batches, answered by request id, and
//! written back once per batch.
//!
//! The loop is: decode every complete frame in the read buffer (up to the in-flight and
//! write-buffer limits), answer local requests at once, dispatch requests owned by other cores
//! and wait for their replies, write everything in one call, then read again. Replies may be
//! out of request order; clients match them by request id.
//!
//! **Invariants**
//! - The read buffer is 16-byte aligned and frames are removed from its front only whole, so
//!   every body is aligned when validated in place.
//! - It never grows beyond one maximal frame (`FRAME_SIZE_MAX`): a header announcing more is
//!   refused before the body is read.
//! - An invalid frame is answered (with its request id when the header was intact) and closes
//!   this connection only.
//! - Every request read from the socket is answered before the connection closes, including
//!   during shutdown (requests read after the stop signal get `ShuttingDown`, unapplied).

use std::rc::Rc;

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;
use tessera_protocol::codec::{self, FrameBuffer};
use tessera_protocol::limits::{FRAME_HEADER_SIZE, FRAME_SIZE_MAX};
use tessera_protocol::{ErrorCode, FrameKind, Response};

use crate::core::{error, CoreContext, PendingReply, Reply, Route};

/// Bytes read per call when no large frame is being received.
const READ_BUFFER_SIZE: usize = 64 * 1024;

/// Serves one connection until the peer closes it, it misbehaves, or the core stops.
pub async fn serve(context: Rc<CoreContext>, mut stream: TcpStream) {
    let peer = stream
        .peer_addr()
        .map(|address| address.to_string())
        .unwrap_or_default();
    if let Err(option_error) = stream.set_nodelay(true) {
        tracing::debug!(%option_error, %peer, "cannot set TCP_NODELAY");
    }
    tracing::debug!(%peer, "connection opened");
    let mut connection = Connection::new();
    let outcome = connection.run(&context, &mut stream).await;
    match outcome {
        Ok(reason) => tracing::debug!(%peer, reason, "connection closed"),
        Err(io_error) => tracing::debug!(%peer, %io_error, "connection failed"),
    }
}

struct Connection {
    /// Received bytes; `[0, filled)` is data. Its length is its usable capacity.
    read_buffer: FrameBuffer,
    filled: usize,
    /// Encoded replies waiting to be written.
    write_buffer: FrameBuffer,
    /// Replies from other cores for requests of the current batch.
    pending: Vec<(u64, PendingReply)>,
}

/// What processing the buffered frames decided.
enum Next {
    /// Read more bytes.
    Read,
    /// Complete frames remain (a limit paused processing); process again without reading.
    Process,
    /// Close after writing what is buffered.
    Close(&'static str),
}

impl Connection {
    fn new() -> Self {
        let mut read_buffer = FrameBuffer::with_capacity(READ_BUFFER_SIZE);
        read_buffer.resize(READ_BUFFER_SIZE, 0);
        Self {
            read_buffer,
            filled: 0,
            write_buffer: FrameBuffer::with_capacity(READ_BUFFER_SIZE),
            pending: Vec::new(),
        }
    }

    async fn run(
        &mut self,
        context: &CoreContext,
        stream: &mut TcpStream,
    ) -> std::io::Result<&'static str> {
        loop {
            let next = self.process(context);
            for (request_id, pending) in std::mem::take(&mut self.pending) {
                let Some(reply) = context.abort.unless_fired(pending).await else {
                    return Ok("aborted");
                };
                self.encode_reply(request_id, &reply);
            }
            if !self.flush(context, stream).await? {
                return Ok("aborted");
            }
            match next {
                Next::Close(reason) => return Ok(reason),
                Next::Process => continue,
                Next::Read => {}
            }
            if context.stop.is_fired() {
                // Answer whatever already sits in the socket with ShuttingDown, so those
                // clients learn their requests were not applied, then close.
                return self.drain_for_shutdown(context, stream).await;
            }
            self.make_room();
            let read = context
                .stop
                .unless_fired(stream.read(&mut self.read_buffer[self.filled..]));
            match read.await {
                // Stopped while waiting: the next pass reads nothing new and drains.
                None => {}
                Some(Ok(0)) => return Ok("peer closed"),
                Some(Ok(read_size)) => self.filled += read_size,
                Some(Err(io_error)) => return Err(io_error),
            }
        }
    }

    /// Writes the buffered replies; `false` if the core aborted first (a client that stopped
    /// reading while the server shut down).
    async fn flush(
        &mut self,
        context: &CoreContext,
        stream: &mut TcpStream,
    ) -> std::io::Result<bool> {
        if self.write_buffer.is_empty() {
            return Ok(true);
        }
        let written = context
            .abort
            .unless_fired(stream.write_all(&self.write_buffer))
            .await;
        match written {
            None => Ok(false),
            Some(written) => {
                written?;
                self.write_buffer.clear();
                Ok(true)
            }
        }
    }

    /// Answers or dispatches every complete frame in the read buffer, within the limits.
    fn process(&mut self, context: &CoreContext) -> Next {
        let now_ms = crate::clock::now_unix_ms();
        let is_stopping = context.stop.is_fired();
        let mut offset = 0;
        let mut handled_count = 0;
        let next = loop {
            if handled_count >= context.config.connection_inflight_max
                || self.write_buffer.len() >= context.config.connection_write_buffer_bytes_max
            {
                break Next::Process;
            }
            let frame = match codec::decode_frame(&self.read_buffer[offset..self.filled]) {
                Ok(Some(frame)) => frame,
                Ok(None) => break Next::Read,
                Err(frame_error) => {
                    tracing::debug!(%frame_error, "closing connection on an invalid frame");
                    let response = error(frame_error.error.code(), frame_error.error.to_string());
                    self.encode_reply(
                        frame_error.request_id.unwrap_or(0),
                        &Reply::Response(response),
                    );
                    break Next::Close("invalid frame");
                }
            };
            debug_assert_eq!(offset % tessera_protocol::limits::FRAME_ALIGNMENT, 0);
            offset += frame.frame_size;
            handled_count += 1;
            let request_id = frame.header.request_id;
            if frame.header.frame_kind() != Some(FrameKind::Request) {
                let response = error(ErrorCode::BadFrame, "clients may only send request frames");
                self.encode_reply(request_id, &Reply::Response(response));
                break Next::Close("response frame from a client");
            }
            let request = match codec::access_request(frame.body) {
                Ok(request) => request,
                Err(protocol_error) => {
                    tracing::debug!(%protocol_error, "closing connection on an invalid body");
                    let response = error(protocol_error.code(), protocol_error.to_string());
                    self.encode_reply(request_id, &Reply::Response(response));
                    break Next::Close("invalid body");
                }
            };
            if let Err(request_error) = codec::check_request(request) {
                let response = error(request_error.code(), request_error.to_string());
                self.encode_reply(request_id, &Reply::Response(response));
                continue;
            }
            if is_stopping {
                let response = error(ErrorCode::ShuttingDown, "server is shutting down");
                self.encode_reply(request_id, &Reply::Response(response));
                continue;
            }
            match context.route(request) {
                Route::Here => {
                    let response = context.respond_here(now_ms, request);
                    self.encode_reply(request_id, &Reply::Response(response));
                }
                Route::Core(core_id) => {
                    self.pending
                        .push((request_id, context.forward(core_id, frame.body)));
                }
                Route::Split => {
                    self.pending
                        .push((request_id, context.split(now_ms, request)));
                }
                Route::Elsewhere(location, slot) => {
                    let response = context.wrong_shard(location, slot);
                    self.encode_reply(request_id, &Reply::Response(response));
                }
            }
        };
        self.consume(offset);
        next
    }

    /// Frames one reply. A reply over the frame limit is replaced by a `TooLarge` error.
    fn encode_reply(&mut self, request_id: u64, reply: &Reply) {
        let encoded = match reply {
            Reply::Body(body) => codec::encode_frame_with_body(
                &mut self.write_buffer,
                FrameKind::Response,
                request_id,
                body,
            ),
            Reply::Response(response) => {
                codec::encode_response(&mut self.write_buffer, request_id, response)
            }
        };
        if let Err(protocol_error) = encoded {
            let refusal: Response = error(
                protocol_error.code(),
                format!("reply refused: {protocol_error}"),
            );
            // An error reply is small; it always fits in a frame.
            let refused = codec::encode_response(&mut self.write_buffer, request_id, &refusal);
            debug_assert!(refused.is_ok());
        }
    }

    /// Removes `size` processed bytes from the front, keeping the rest aligned at offset 0.
    fn consume(&mut self, size: usize) {
        assert!(
            size <= self.filled,
            "consume {size} of {} bytes",
            self.filled
        );
        self.read_buffer.copy_within(size..self.filled, 0);
        self.filled -= size;
    }

    /// Makes sure the next read has room: grows the buffer to hold the frame being received
    /// (up to one maximal frame), and shrinks it back once a large frame is gone.
    fn make_room(&mut self) {
        let needed = match codec::frame_size_needed(&self.read_buffer[..self.filled]) {
            Some(frame_size) => frame_size.max(READ_BUFFER_SIZE),
            None => READ_BUFFER_SIZE,
        };
        assert!(
            needed <= FRAME_SIZE_MAX.max(READ_BUFFER_SIZE),
            "needed={needed}"
        );
        if needed > self.read_buffer.len() {
            self.read_buffer.resize(needed, 0);
        } else if self.read_buffer.len() > READ_BUFFER_SIZE && self.filled <= READ_BUFFER_SIZE {
            self.read_buffer.resize(READ_BUFFER_SIZE, 0);
            self.read_buffer.shrink_to_fit();
        }
        debug_assert!(self.read_buffer.len() > self.filled || self.filled < FRAME_HEADER_SIZE);
    }

    /// On shutdown: reads whatever is already available without waiting, answers those
    /// requests with `ShuttingDown`, and closes.
    async fn drain_for_shutdown(
        &mut self,
        context: &CoreContext,
        stream: &mut TcpStream,
    ) -> std::io::Result<&'static str> {
        loop {
            self.make_room();
            // Polled first, the read returns data already in the socket; otherwise the ready
            // future wins and the read is dropped, which is safe for glommio sockets.
            let read = futures_lite::future::or(
                async { Some(stream.read(&mut self.read_buffer[self.filled..]).await) },
                async { None },
            );
            match read.await {
                Some(Ok(read_size)) if read_size > 0 => self.filled += read_size,
                _ => return Ok("server stopping"),
            }
            let next = self.process(context);
            debug_assert!(
                self.pending.is_empty(),
                "nothing is dispatched while stopping"
            );
            if !self.flush(context, stream).await? {
                return Ok("aborted");
            }
            if let Next::Close(reason) = next {
                return Ok(reason);
            }
        }
    }
}
