//! A core's accept loop and the server-wide connection limit (mini-redis `Listener`).
//!
//! Each core has its own listening socket on `port + core_id`, bound by the main thread before
//! the cores start (so port 0 works and the topology is known up front), so the smart client
//! chooses the core, not the kernel.
//!
//! Connections run as tasks entered through a [`Gate`]: on stop the accept loop returns, and
//! the core waits at the gate until every connection has answered what it read and closed.
//! Without the gate, tasks detached from a finished executor keep their sockets open and
//! peers hang (see FINDINGS.md).

use std::rc::Rc;
use std::sync::atomic::Ordering;

use futures_lite::AsyncWriteExt;
use glommio::net::TcpListener;
use glommio::sync::Gate;
use tessera_protocol::codec::{self, FrameBuffer};
use tessera_protocol::ErrorCode;

use crate::core::{error, CoreContext};
use crate::net::connection;

/// Decrements the server-wide connection count when a connection ends, however it ends.
struct ConnectionSlot {
    context: Rc<CoreContext>,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.context
            .connection_count
            .fetch_sub(1, Ordering::Relaxed);
    }
}

/// Accepts connections until the core's stop signal fires, serving each in its own task.
pub async fn accept_loop(context: Rc<CoreContext>, listener: TcpListener, gate: Rc<Gate>) {
    loop {
        let Some(accepted) = context.stop.unless_fired(listener.accept()).await else {
            return;
        };
        let stream = match accepted {
            Ok(stream) => stream,
            Err(accept_error) => {
                // Running out of descriptors or a connection reset before accept: log and go
                // on, a listener must not die of one bad accept. Back off briefly so a full
                // descriptor table does not spin the core.
                tracing::warn!(%accept_error, "accept failed");
                glommio::timer::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        let count = context.connection_count.fetch_add(1, Ordering::Relaxed) + 1;
        let slot = ConnectionSlot {
            context: context.clone(),
        };
        let connection_context = context.clone();
        let spawned = gate.spawn(async move {
            let _slot = slot;
            if count > connection_context.config.connection_count_max {
                refuse(stream, connection_context.config.connection_count_max).await;
                return;
            }
            connection::serve(connection_context, stream).await;
        });
        // A glommio task is cancelled when its handle drops; the gate still tracks a detached
        // task, which is what shutdown waits on.
        match spawned {
            Ok(task) => {
                task.detach();
            }
            Err(spawn_error) => {
                // The gate closes only after this loop returns, so this is unexpected; the
                // connection is dropped (closed) and the server carries on.
                tracing::error!(%spawn_error, "cannot spawn a connection task");
            }
        }
    }
}

/// Tells a client over the connection limit why it is refused, then closes.
async fn refuse(mut stream: glommio::net::TcpStream, connection_count_max: usize) {
    let response = error(
        ErrorCode::Overloaded,
        format!("connection limit reached ({connection_count_max} connections)"),
    );
    let mut out = FrameBuffer::new();
    // Request id 0 is reserved for messages about the connection itself.
    if codec::encode_response(&mut out, 0, &response).is_ok() {
        let _ = stream.write_all(&out).await;
    }
    tracing::warn!(connection_count_max, "refused a connection over the limit");
}
