//! Graceful shutdown seen from clients: a server stopped under pipelined write load has
//! acknowledged every write it applied, and one stopped with idle connections closes them at
//! once and releases its ports.

mod common;

use std::collections::HashSet;
use std::net::TcpListener;
use std::time::{Duration, Instant};

use common::{
    is_disconnect, put_request, start_server, start_server_with, test_config, wait_until,
    RawConnection,
};
use tessera_protocol::codec::{self, FrameBuffer};
use tessera_protocol::{ErrorCode, Request, Response};

/// Longest a graceful shutdown may take in these tests; every connection answers within it.
const SHUTDOWN_DURATION_MAX: Duration = Duration::from_secs(3);

/// Longest a stopped server's ports may stay bound. Not zero: `listener_release.rs` shows a
/// listener still accepting for a few milliseconds after `shutdown` returns.
const PORT_RELEASE_TIMEOUT: Duration = Duration::from_secs(1);

/// Requests each writer keeps in flight.
const WINDOW_SIZE: u64 = 32;

/// A writer gives up on its own after this long; the server should have closed it long before.
const WRITER_DURATION_MAX: Duration = Duration::from_secs(10);

/// What one writer saw before its connection closed.
#[derive(Debug, Default)]
struct WriterReport {
    /// Requests written (or attempted) on the connection.
    sent_count: u64,
    /// `Put { applied: true }` replies.
    applied_count: u64,
    /// `ShuttingDown` refusals: the server says these were not applied.
    shutting_down_count: u64,
    /// Any other reply, described.
    other_replies: Vec<String>,
    /// Replies whose request id was never sent, or was already answered.
    unexpected_ids: Vec<u64>,
    /// How the writer stopped: `None` if the server closed the connection, as it must.
    failure: Option<String>,
}

/// Pipelines puts of unique keys to `address`, a window at a time, until the server closes the
/// connection, and reports every reply it received.
fn shutdown_writer(address: &str, writer_index: usize) -> WriterReport {
    let mut report = WriterReport::default();
    let mut connection = RawConnection::open(address);
    let mut outstanding: HashSet<u64> = HashSet::new();
    let started = Instant::now();
    let mut request_id = 0_u64;
    loop {
        if started.elapsed() > WRITER_DURATION_MAX {
            report.failure = Some("the server never closed the connection".to_owned());
            return report;
        }
        for _ in 0..WINDOW_SIZE {
            request_id += 1;
            let key = format!("shutdown-{writer_index}-{request_id}");
            connection.queue(request_id, &put_request(key.as_bytes(), b"acknowledged?"));
            outstanding.insert(request_id);
        }
        report.sent_count += WINDOW_SIZE;
        // A failed write means the server closed; what it answered is still readable.
        let is_sent = connection.flush().is_ok();
        while !is_sent || !outstanding.is_empty() {
            let (reply_id, response) = match connection.receive() {
                Ok(Some(reply)) => reply,
                Ok(None) => return report,
                Err(io_error) if is_disconnect(&io_error) => return report,
                Err(io_error) => {
                    report.failure = Some(format!("read failed: {io_error}"));
                    return report;
                }
            };
            if !outstanding.remove(&reply_id) {
                report.unexpected_ids.push(reply_id);
            }
            match response {
                Response::Put { applied: true, .. } => report.applied_count += 1,
                Response::Error(error) if error.code == ErrorCode::ShuttingDown => {
                    report.shutting_down_count += 1;
                }
                other => report.other_replies.push(format!("{reply_id}: {other:?}")),
            }
        }
    }
}

#[test]
fn shutdown_under_load_acknowledges_every_applied_write() {
    let core_count = 2;
    let writer_count = 6;
    let server = start_server(core_count);
    let addresses = server.addresses();
    let (summaries, shutdown_duration, reports) = std::thread::scope(|scope| {
        // Writers send to a core regardless of the key's owner, so half of the writes are in
        // flight between cores when the server stops.
        let writers: Vec<_> = (0..writer_count)
            .map(|writer_index| {
                let address = &addresses[writer_index % core_count];
                scope.spawn(move || shutdown_writer(address, writer_index))
            })
            .collect();
        std::thread::sleep(Duration::from_millis(200));
        let started = Instant::now();
        let summaries = server.shutdown();
        let shutdown_duration = started.elapsed();
        let reports: Vec<WriterReport> = writers
            .into_iter()
            .map(|writer| writer.join().expect("writer thread"))
            .collect();
        (summaries, shutdown_duration, reports)
    });
    let summaries = summaries.expect("shutdown succeeds");
    assert!(
        shutdown_duration < SHUTDOWN_DURATION_MAX,
        "shutdown took {shutdown_duration:?}"
    );
    for (writer_index, report) in reports.iter().enumerate() {
        assert_eq!(report.failure, None, "writer {writer_index}: {report:?}");
        assert!(
            report.unexpected_ids.is_empty(),
            "writer {writer_index}: {report:?}"
        );
        assert!(
            report.other_replies.is_empty(),
            "writer {writer_index}: {report:?}"
        );
        assert!(
            report.applied_count > 0,
            "writer {writer_index} never got a write in"
        );
    }
    let applied_count: u64 = reports.iter().map(|report| report.applied_count).sum();
    let shutting_down_count: u64 = reports
        .iter()
        .map(|report| report.shutting_down_count)
        .sum();
    let sent_count: u64 = reports.iter().map(|report| report.sent_count).sum();
    let revision_sum: u64 = summaries.iter().map(|summary| summary.revision).sum();
    let key_count_sum: usize = summaries.iter().map(|summary| summary.key_count).sum();
    eprintln!(
        "sent {sent_count}, applied and acknowledged {applied_count}, refused while shutting \
         down {shutting_down_count}, shutdown took {shutdown_duration:?}"
    );
    assert_eq!(summaries.len(), core_count);
    // Each put is of a new key, so each applied one adds exactly one revision and one key: the
    // server applied exactly the writes it acknowledged, and none of the refused ones.
    assert_eq!(revision_sum, applied_count, "summaries: {summaries:?}");
    assert_eq!(
        key_count_sum as u64, applied_count,
        "summaries: {summaries:?}"
    );
    assert!(applied_count + shutting_down_count <= sent_count);
}

/// Whether a listener can bind `address` within [`PORT_RELEASE_TIMEOUT`].
fn is_released(address: &str) -> bool {
    wait_until(PORT_RELEASE_TIMEOUT, || TcpListener::bind(address).is_ok())
}

#[test]
fn shutdown_with_idle_connections_is_prompt_and_releases_the_ports() {
    let server = start_server_with(tessera_server::Config {
        shutdown_timeout_ms: 5_000,
        ..test_config(2)
    });
    let addresses = server.addresses();
    let mut connections: Vec<RawConnection> = Vec::new();
    for address in &addresses {
        let mut used = RawConnection::open(address);
        used.assert_serving(format!("idle-{address}").as_bytes());
        connections.push(used);
        connections.push(RawConnection::open(address));
        // Half a header: the server holds an incomplete frame when it stops.
        let mut partial = RawConnection::open(address);
        let mut frame = FrameBuffer::new();
        codec::encode_request(&mut frame, 1, &Request::Ping).unwrap();
        partial.send_raw(&frame[..16]).expect("send half a header");
        connections.push(partial);
    }
    let mut observer = RawConnection::open(&addresses[0]);
    let expected_count = connections.len() as u64 + 1;
    let is_accepted = wait_until(Duration::from_secs(2), || {
        observer.stats().connection_count == expected_count
    });
    assert!(is_accepted, "not every connection was accepted");
    connections.push(observer);

    let started = Instant::now();
    server.shutdown().expect("shutdown succeeds");
    let shutdown_duration = started.elapsed();
    assert!(
        shutdown_duration < Duration::from_secs(1),
        "idle connections held shutdown for {shutdown_duration:?}"
    );
    for mut connection in connections {
        match connection.receive() {
            Ok(None) => {}
            other => panic!("an idle connection should see end of file, got {other:?}"),
        }
    }
    // The ports are free again (soon: see `listener_release.rs` for why not at once).
    for address in &addresses {
        assert!(
            is_released(address),
            "{address} is still bound after shutdown"
        );
    }
}

#[test]
fn dropping_a_running_server_closes_connections_and_ports() {
    // Dropping a running server stops it too: its connections close and its ports free.
    let server = start_server(2);
    let addresses = server.addresses();
    let mut connection = RawConnection::open(&addresses[1]);
    connection.assert_serving(b"before-drop");
    drop(server);
    connection.expect_closed();
    for address in &addresses {
        assert!(
            is_released(address),
            "{address} is still bound after the drop"
        );
    }
}
