//! A core's accept loop and the server-wide connection limit (mini-redis `Listener`).
//!
//! Each core has its own listening socket on `port + core_id`, bound by the main thread before
//! the cores start (so port 0 works and the topology is known up front), so the smart client
//! chooses the core, not the kernel.
//!
//! Accepted sockets go to the core's connection task (`connection.rs`), which serves them all
//! over the core's socket ring. Refusals run as tasks entered through a [`Gate`], like the
//! connection task itself: on stop the accept loop returns, and the core waits at the gate
//! until every connection has answered what it read and closed. Without the gate, tasks
//! detached from a finished executor keep their sockets open and peers hang (FINDINGS.md).

use std::os::fd::{AsRawFd, BorrowedFd};
use std::rc::Rc;

use futures_lite::AsyncWriteExt;
use glommio::net::TcpListener;
use glommio::sync::Gate;
use tessera_protocol::codec::{self, FrameBuffer};
use tessera_protocol::ErrorCode;

use crate::core::{error, CoreContext};
use crate::net::connection::{Accepted, ConnectionSlot, Handoff};

/// Accepts connections until the core's stop signal fires and hands each to the core's
/// connection task; refuses those over the server-wide limit.
pub async fn accept_loop(
    context: Rc<CoreContext>,
    listener: TcpListener,
    gate: Rc<Gate>,
    handoff: Handoff,
) {
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
        let (slot, count) = ConnectionSlot::acquire(&context);
        if count > context.config.connection_count_max {
            let connection_count_max = context.config.connection_count_max;
            let refusal = gate.spawn(async move {
                let _slot = slot;
                refuse(stream, connection_count_max).await;
            });
            // A glommio task is cancelled when its handle drops; the gate still tracks a
            // detached task, which is what shutdown waits on.
            match refusal {
                Ok(task) => {
                    task.detach();
                }
                Err(spawn_error) => {
                    tracing::error!(%spawn_error, "cannot spawn a refusal task");
                }
            }
            continue;
        }
        if let Err(option_error) = stream.set_nodelay(true) {
            tracing::debug!(%option_error, "cannot set TCP_NODELAY");
        }
        let peer = stream
            .peer_addr()
            .map(|address| address.to_string())
            .unwrap_or_default();
        // The connection task does its own I/O on the socket (net/ring.rs); it takes a
        // descriptor of its own, and glommio's stream closes the original when dropped.
        // SAFETY: the stream's descriptor stays open for the duration of this borrow.
        let borrowed = unsafe { BorrowedFd::borrow_raw(stream.as_raw_fd()) };
        match borrowed.try_clone_to_owned() {
            Ok(fd) => handoff.push(Accepted { fd, peer, slot }),
            Err(dup_error) => tracing::warn!(%dup_error, %peer, "cannot take the socket over"),
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
