//! Embedded mode: the server's shards run inside the caller's process, one glommio executor
//! per core, with no network and no server to start. Requests travel as archived bodies
//! through each core's inbox, exactly the bytes a network request would carry, so embedded
//! and remote mode share validation, routing checks and apply.

use std::sync::Arc;

use futures_channel::oneshot;
use tessera_protocol::codec::{self, FrameBuffer};
use tessera_protocol::{ErrorCode, Request, Response};
use tessera_server::core::{CoreInboxes, CoreRequest};
use tessera_server::inbox::PushError;
use tessera_server::Server;

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

    pub(crate) async fn call(&self, request: &Request) -> Result<Response> {
        let mut body = FrameBuffer::new();
        codec::encode_request_body(&mut body, request).map_err(ClientError::Encode)?;
        let inbox = self
            .inboxes
            .get(usize::from(self.core_id))
            .ok_or(ClientError::ShutDown)?;
        let (reply, receiver) = oneshot::channel();
        match inbox.push(CoreRequest { body, reply }) {
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
        codec::decode_response(&body).map_err(|error| ClientError::Protocol {
            address: self.address.clone(),
            error,
        })
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
