//! Bug (fixed): a connection still busy when the graceful shutdown timeout expires is not closed
//! cleanly.
//!
//! Found while writing the shutdown tests. A client pipelines requests but never reads its
//! replies, so the server's reply writes back up and its connection task blocks in
//! `write_all`, which (at commit b5e78e7) is not raced against any signal. At shutdown,
//! `run_core` waits at the connection gate for `shutdown_timeout_ms`, logs "connections still
//! open after the shutdown timeout; closing", and returns. Nothing closes the connection: the
//! task is detached, glommio's `LocalExecutor` has no `Drop` that cancels tasks, and the core
//! thread exits with the task and its socket leaked. `Server::shutdown` returns `Ok`, yet the
//! client can read the replies already in the kernel buffers and then waits forever for end
//! of file. The binary's process exit hides this; embedded servers (and tests) leak a socket
//! and a task per such shutdown.
//!
//! A first fix (an `abort` signal fired after the timeout, then `gate.close()` again) turns the
//! leak into a core panic. The timed-out `gate.close()` future was dropped, leaving glommio's
//! gate in `Closing` with the receiving end of its channel gone; the second `close()` returns
//! `Err(Closed)` at once without waiting; and when the aborted task drops its `Pass`,
//! `GateInner::notify_closed` unwraps a send on the closed channel and panics, so `shutdown`
//! returns `Err(CorePanicked)`. `gate.close()` must be awaited to completion, exactly once,
//! with the timeout firing the abort beside it rather than replacing it.
//!
//! The fix does exactly that (`run_core` in `server.rs`). This test checks that `shutdown`
//! returns `Ok` within the timeout and the client's connection ends.

mod common;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use common::{is_disconnect, start_server_with, test_config, RawConnection};
use tessera_protocol::codec::{self, FrameBuffer};
use tessera_protocol::Request;

#[test]
fn connections_still_busy_at_the_shutdown_timeout_are_closed() {
    let shutdown_timeout = Duration::from_millis(300);
    let server = start_server_with(tessera_server::Config {
        shutdown_timeout_ms: u64::try_from(shutdown_timeout.as_millis()).unwrap(),
        ..test_config(2)
    });
    let mut connection = RawConnection::open(&server.addresses()[0]);
    connection.assert_serving(b"before-the-flood");
    let mut pings = FrameBuffer::new();
    for request_id in 100..2148 {
        codec::encode_request(&mut pings, request_id, &Request::Ping).unwrap();
    }
    // Send without reading until the server pushes back: its replies fill both socket buffers,
    // its connection task blocks writing them, and it stops reading.
    let mut stream = connection.stream();
    stream
        .set_write_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut sent_size = 0_usize;
    while stream.write_all(&pings).is_ok() {
        sent_size += pings.len();
        assert!(sent_size < 1 << 30, "the server never pushed back");
    }

    let started = Instant::now();
    server.shutdown().expect("shutdown succeeds");
    let shutdown_duration = started.elapsed();
    assert!(
        shutdown_duration < shutdown_timeout + Duration::from_secs(1),
        "shutdown took {shutdown_duration:?}"
    );

    // The server is gone: whatever it had written may still be read, then the connection must
    // end. Silence for a second means the socket was left open.
    stream
        .set_read_timeout(Some(Duration::from_secs(1)))
        .unwrap();
    let mut received_size = 0_usize;
    let mut buffer = vec![0_u8; 1 << 16];
    let outcome = loop {
        match stream.read(&mut buffer) {
            Ok(0) => break Ok(()),
            Ok(read_size) => received_size += read_size,
            Err(io_error) if is_disconnect(&io_error) => break Ok(()),
            Err(io_error) => break Err(io_error),
        }
    };
    assert!(
        outcome.is_ok(),
        "Server::shutdown returned after {shutdown_duration:?}, but the connection was left \
         open: {sent_size} bytes of requests sent, {received_size} bytes of replies read, then \
         {outcome:?}"
    );
}
