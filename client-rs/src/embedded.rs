//! Embedded mode: the server's shards run inside the caller's process, one glommio executor
//! per core, with no network and no server to start. Requests travel as archived bodies
//! through each core's inbox, exactly the bytes a network request would carry, so embedded
//! and remote mode share validation, routing checks and apply.

use std::sync::Arc;

use futures_channel::oneshot;
use tessera_protocol::codec::{self, FrameBuffer};
use tessera_protocol::{ErrorCode, Request, Response};
use tessera_server::core::{CoreInboxes, CoreMessage, CoreRequest};
use tessera_server::inbox::PushError;
use tessera_server::watch_stream::{self, WatchReceiver};
use tessera_server::Server;

use crate::connection::{Stamped, StreamNext};

use crate::error::{ClientError, Result};

/// The in-process server; stopped when the last client clone is dropped.
#[derive(Debug)]
pub(crate) struct EmbeddedHost {
    server: std::sync::Mutex<Option<Server>>,
}

impl EmbeddedHost {
    pub(crate) fn new(server: Server) -> Self {
        Self {
            server: std::sync::Mutex::new(Some(server)),
        }
    }

    pub(crate) fn shutdown(&self) {
        let server = self
            .server
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(server) = server {
            if let Err(error) = server.shutdown() {
                tracing::error!(%error, "embedded server stopped abnormally");
            }
        }
    }
}

impl Drop for EmbeddedHost {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// One in-process core.
#[derive(Debug)]
pub(crate) struct EmbeddedCore {
    address: String,
    core_id: u16,
    inboxes: CoreInboxes,
}

impl EmbeddedCore {
    pub(crate) fn new(address: String, core_id: u16, inboxes: CoreInboxes) -> Self {
        Self {
            address,
            core_id,
            inboxes,
        }
    }

    pub(crate) fn address(&self) -> &str {
        &self.address
    }

    pub(crate) async fn call(&self, request: &Request) -> Result<Stamped> {
        self.call_with_sink(request, None).await
    }

    /// Sends a `Watch` with a channel for its messages; the stream is `None` unless the
    /// reply is `Watching`.
    pub(crate) async fn open_stream(
        &self,
        request: &Request,
    ) -> Result<(Response, Option<EmbeddedStream>)> {
        let (sink, receiver) = watch_stream::channel();
        let (_, response) = self.call_with_sink(request, Some(sink)).await?;
        let stream = match &response {
            Response::Watching(watching) => Some(EmbeddedStream {
                receiver,
                watch_id: watching.watch_id,
                core: Self {
                    address: self.address.clone(),
                    core_id: self.core_id,
                    inboxes: self.inboxes.clone(),
                },
            }),
            _ => None,
        };
        Ok((response, stream))
    }

    async fn call_with_sink(
        &self,
        request: &Request,
        stream: Option<watch_stream::WatchSink>,
    ) -> Result<Stamped> {
        let mut body = FrameBuffer::new();
        codec::encode_request_body(&mut body, request).map_err(ClientError::Encode)?;
        let inbox = self
            .inboxes
            .get(usize::from(self.core_id))
            .ok_or(ClientError::ShutDown)?;
        let (reply, receiver) = oneshot::channel();
        match inbox.push(CoreMessage::Request(CoreRequest {
            body,
            reply,
            stream,
        })) {
            Ok(()) => {}
            Err(PushError::Full(_)) => {
                return Err(ClientError::Server {
                    code: ErrorCode::Overloaded,
                    message: format!(
                        "core {} inbox is full ({} requests)",
                        self.core_id,
                        inbox.capacity()
                    ),
                })
            }
            Err(PushError::Closed(_)) => return Err(ClientError::ShutDown),
        }
        let body = receiver.await.map_err(|_| ClientError::ShutDown)?;
        codec::decode_reply(&body).map_err(|error| ClientError::Protocol {
            address: self.address.clone(),
            error,
        })
    }
}

/// The messages an in-process core pushes for one watch. Dropping it ends the watch (the
/// core notices its channel closed at its next pump, within a tick).
#[derive(Debug)]
pub(crate) struct EmbeddedStream {
    receiver: WatchReceiver,
    watch_id: u64,
    core: EmbeddedCore,
}

impl EmbeddedStream {
    pub(crate) async fn next(&mut self) -> StreamNext {
        let Some(body) = self.receiver.next().await else {
            return StreamNext::Closed;
        };
        match codec::decode_response(&body) {
            Ok(response) => StreamNext::Message(response),
            Err(error) => {
                tracing::error!(%error, "undecodable watch message from an in-process core");
                StreamNext::Closed
            }
        }
    }

    /// Asks the core for a progress notification on this stream.
    pub(crate) fn request_progress(&self) {
        let request = Request::WatchProgress {
            watch_id: self.watch_id,
        };
        let mut body = FrameBuffer::new();
        if codec::encode_request_body(&mut body, &request).is_err() {
            return;
        }
        if let Some(inbox) = self.core.inboxes.get(usize::from(self.core.core_id)) {
            let (reply, _) = oneshot::channel();
            // A full inbox drops the request: progress comes with the next interval.
            let _ = inbox.push(CoreMessage::Request(CoreRequest {
                body,
                reply,
                stream: None,
            }));
        }
    }
}

/// Starts the shards in-process and returns the host and their inboxes.
pub(crate) fn start(
    config: tessera_server::Config,
) -> Result<(Arc<EmbeddedHost>, tessera_protocol::Topology, CoreInboxes)> {
    let server = Server::start_with_mode(config, tessera_server::Mode::Embedded)
        .map_err(|error| ClientError::Topology(format!("cannot start embedded server: {error}")))?;
    let topology = server.topology().clone();
    let inboxes = server.inboxes();
    Ok((Arc::new(EmbeddedHost::new(server)), topology, inboxes))
}
