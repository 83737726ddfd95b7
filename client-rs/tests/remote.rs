//! How the remote client fails: nothing listening, a server that stops, a server that never
//! answers, and (through a scripted fake server) replies a healthy server never sends.
//!
//! Each failure must surface as an error within a bounded time, never as a hang, and each
//! error must say what the caller may do next: `is_retryable()` when the request certainly
//! had no effect, `is_indeterminate()` when it was sent and may have applied.
//!
//! `silent_connection_is_replaced` and
//! `requests_in_flight_when_a_bad_frame_arrives_are_indeterminate` guard gaps these tests
//! found in the client when they were written; their docs tell the story.

mod common;

use std::net::TcpListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::fake_server::{FakeServer, Reply};
use common::{start_server, stop_server, unused_address, within, CALL_TIMEOUT, CORE_COUNT};
use tessera_client::{Client, ClientConfig, ClientError, Entry, ErrorCode};
use tessera_protocol::{ErrorReply, Request, Response};

/// Settings with short limits, so that failures show up quickly.
fn quick_config(endpoints: Vec<String>, request_timeout: Duration) -> ClientConfig {
    let mut config = ClientConfig::new(endpoints);
    config.connect_timeout = Duration::from_secs(2);
    config.request_timeout = request_timeout;
    config
}

/// Connects through `addresses` with default settings.
async fn connect(addresses: Vec<String>) -> Client {
    within(CALL_TIMEOUT, "connect", Client::connect(addresses))
        .await
        .expect("the server accepts the handshake")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connecting_to_nothing_is_retryable() {
    let address = unused_address();
    let result = within(CALL_TIMEOUT, "connect", Client::connect([address.clone()])).await;
    let error = result.expect_err("nothing listens there");
    assert!(error.is_retryable(), "{error:?}");
    assert!(!error.is_indeterminate(), "{error:?}");
    assert_eq!(error.code(), None);
    match &error {
        ClientError::Connect {
            address: failed, ..
        } => assert_eq!(failed, &address),
        other => panic!("expected a Connect error, got {other:?}"),
    }
    assert!(
        error.to_string().contains(&address),
        "the message names the address: {error}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connecting_without_endpoints_is_an_error() {
    let result = Client::connect(Vec::<String>::new()).await;
    match result {
        Err(ClientError::Topology(_)) => {}
        other => panic!("expected a Topology error, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_skips_dead_endpoints() {
    let server = start_server(CORE_COUNT);
    let endpoints = vec![unused_address(), server.addresses()[1].clone()];
    let client = connect(endpoints).await;
    // Asking one core is enough to learn every core.
    let addresses: Vec<String> = client.topology().nodes[0]
        .cores
        .iter()
        .map(|core| core.address.clone())
        .collect();
    assert_eq!(addresses, server.addresses());
    for index in 0..20 {
        let key = format!("dead-endpoint:{index}");
        client.put(&key, "v").await.unwrap();
        assert_eq!(client.get(&key).await.unwrap().unwrap().value, b"v");
    }
    drop(client);
    stop_server(server);
}

/// The handshake is a request like any other: a listener that accepts and never answers
/// makes `connect_with` fail after the request timeout, not hang.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_listener_fails_the_handshake_in_time() {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a free loopback port");
    let address = listener.local_addr().unwrap().to_string();
    // Accept, then hold the socket open without reading or writing, until the test is done.
    let (release, released) = std::sync::mpsc::channel::<()>();
    let holder = std::thread::spawn(move || {
        let accepted = listener.accept();
        let _ = released.recv_timeout(CALL_TIMEOUT);
        drop(accepted);
    });
    let request_timeout = Duration::from_millis(100);
    let started = Instant::now();
    let connect = Client::connect_with(quick_config(vec![address.clone()], request_timeout));
    let result = within(Duration::from_secs(2), "connect_with", connect).await;
    let elapsed = started.elapsed();
    let error = result.expect_err("the listener never answers the handshake");
    match &error {
        ClientError::Timeout {
            address: failed,
            timeout,
        } => {
            assert_eq!(failed, &address);
            assert_eq!(*timeout, request_timeout);
        }
        other => panic!("expected a Timeout error, got {other:?}"),
    }
    assert!(error.is_indeterminate(), "{error:?}");
    assert!(!error.is_retryable(), "{error:?}");
    assert!(elapsed >= request_timeout, "elapsed={elapsed:?}");
    release.send(()).unwrap();
    holder.join().unwrap();
}

/// Requests in flight while the server stops fail (retryable when the server refused them,
/// indeterminate when the connection broke under them), and later requests fail to connect.
///
/// A request may also time out. A writer that reconnects while a core is stopping can have
/// its connection accepted by the core's last, abandoned `accept` (a server bug, related to
/// the one in `server/tests/listener_release.rs`): the accepted descriptor outlives the core,
/// so the connection is neither answered nor closed. Seen in about one run in six, with the
/// server's end still `ESTABLISHED`, its receive queue full of our requests, after
/// `Server::shutdown` had returned. For the client a timeout is the right, indeterminate
/// answer to that silence, so it is accepted here; the short request timeout keeps the test
/// quick when it happens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_fail_when_the_server_stops() {
    const WRITER_COUNT: usize = 4;
    let server = start_server(CORE_COUNT);
    let config = quick_config(server.addresses(), Duration::from_secs(2));
    let client = within(CALL_TIMEOUT, "connect", Client::connect_with(config))
        .await
        .expect("the server accepts the handshake");
    assert_eq!(client.ping().await.unwrap().len(), CORE_COUNT);

    // Writers keep requests in flight on both cores until the server stops.
    let written_count = Arc::new(AtomicUsize::new(0));
    let mut writers = Vec::with_capacity(WRITER_COUNT);
    for writer_index in 0..WRITER_COUNT {
        let client = client.clone();
        let written_count = written_count.clone();
        writers.push(tokio::spawn(async move {
            for operation_index in 0_u64.. {
                let key = format!("stopping:{writer_index}:{operation_index}");
                if let Err(error) = client.put(&key, "v").await {
                    return error;
                }
                written_count.fetch_add(1, Ordering::Relaxed);
            }
            unreachable!("the loop ends only with an error")
        }));
    }
    while written_count.load(Ordering::Relaxed) < 100 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let stopping = tokio::task::spawn_blocking(move || stop_server(server));
    within(CALL_TIMEOUT, "server shutdown", stopping)
        .await
        .expect("the server stops cleanly");

    for writer in writers {
        let error = within(CALL_TIMEOUT, "a writer to see the stop", writer)
            .await
            .expect("the writer does not panic");
        assert!(
            error.is_retryable() || error.is_indeterminate(),
            "a failure while stopping must be classified: {error:?}"
        );
        match &error {
            ClientError::Server {
                code: ErrorCode::ShuttingDown,
                ..
            }
            | ClientError::Connect { .. }
            | ClientError::Unavailable { .. } => assert!(error.is_retryable(), "{error:?}"),
            ClientError::Disconnected { .. } | ClientError::Timeout { .. } => {
                assert!(error.is_indeterminate(), "{error:?}");
            }
            other => panic!("unexpected error while the server stops: {other:?}"),
        }
    }

    // Once the client has seen the connections close, a new request cannot connect, and the
    // error says nothing was sent. Until then it may still find a dying connection. On the
    // leaked connection described above it times out instead, and keeps timing out: the
    // client never replaces a connection that only stays silent (see
    // `silent_connection_is_replaced`).
    let deadline = Instant::now() + CALL_TIMEOUT;
    loop {
        let result = within(CALL_TIMEOUT, "a get after the stop", client.get("after")).await;
        match result {
            Err(error @ (ClientError::Connect { .. } | ClientError::Unavailable { .. })) => {
                assert!(error.is_retryable(), "{error:?}");
                assert!(!error.is_indeterminate(), "{error:?}");
                break;
            }
            Err(error @ ClientError::Timeout { .. }) => {
                assert!(error.is_indeterminate(), "{error:?}");
                break;
            }
            Err(error @ ClientError::Disconnected { .. }) => {
                assert!(error.is_indeterminate(), "{error:?}");
            }
            other => panic!("a request to a stopped server must fail: {other:?}"),
        }
        assert!(
            Instant::now() < deadline,
            "the client kept a dead connection"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let ping = within(CALL_TIMEOUT, "a ping after the stop", client.ping()).await;
    let error = ping.expect_err("no core answers");
    assert!(
        error.is_retryable() || error.is_indeterminate(),
        "{error:?}"
    );
}

/// A server over its connection limit refuses the handshake with `Overloaded`, which is
/// retryable: the refused connection applied nothing.
///
/// The refusal can also surface as `Disconnected` (indeterminate), about one run in twenty:
/// the server writes the refusal and closes without reading the client's Hello, so the close
/// is a reset; when the reset reaches the client before its writer has sent the Hello, the
/// failed write closes the connection as `Disconnected` and the refusal frame waiting in the
/// receive buffer is never read. When the reset comes before the writer has even started, the
/// handshake fails as `Connect` (retryable: nothing was sent). All three are accepted here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_limit_refusal_is_retryable() {
    // Room for the first client's two core connections and one filler connection.
    let connection_count_max = CORE_COUNT + 1;
    let server = tessera_server::Server::start(tessera_server::Config {
        connection_count_max,
        ..common::test_config(CORE_COUNT)
    })
    .expect("the test server starts");
    let first = connect(server.addresses()).await;
    first.ping().await.unwrap();
    // Fill the last slot, then wait until the server counts exactly the first client's
    // connections and the filler (its count drops the handshake's connection a little late).
    let filler = std::net::TcpStream::connect(server.addresses()[0].as_str()).unwrap();
    let deadline = Instant::now() + CALL_TIMEOUT;
    loop {
        let stats = first.stats().await.unwrap();
        if stats[0].connection_count == connection_count_max as u64 {
            break;
        }
        assert!(Instant::now() < deadline, "stats={stats:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let refused = within(CALL_TIMEOUT, "connect", Client::connect(server.addresses())).await;
    let error = refused.expect_err("the server is at its connection limit");
    match &error {
        ClientError::Server {
            code: ErrorCode::Overloaded,
            ..
        } => {
            assert!(error.is_retryable(), "{error:?}");
            assert!(!error.is_indeterminate(), "{error:?}");
        }
        ClientError::Disconnected { .. } => assert!(error.is_indeterminate(), "{error:?}"),
        ClientError::Connect { .. } => assert!(error.is_retryable(), "{error:?}"),
        other => panic!("expected an Overloaded refusal, got {other:?}"),
    }
    // The refusal did not disturb the connections already open.
    first.put("limit:after", "v").await.unwrap();
    drop(filler);
    drop(first);
    stop_server(server);
}

// ---------------------------------------------------------------------------------------
// Against the scripted fake server.

fn is_get(request: &Request) -> bool {
    matches!(request, Request::Get { .. })
}

fn is_hello(request: &Request) -> bool {
    matches!(request, Request::Hello { .. })
}

fn wrong_shard() -> Reply {
    Reply::Response(Response::Error(ErrorReply::new(
        ErrorCode::WrongShard,
        "slot moved",
    )))
}

/// A request the server never answers times out as indeterminate, and so does the next one:
/// a late reply to the first is never taken for the second's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unanswered_request_times_out() {
    let fake = FakeServer::start(|_, _| Reply::Nothing).await;
    let request_timeout = Duration::from_millis(200);
    let config = quick_config(vec![fake.address().to_owned()], request_timeout);
    let client = within(CALL_TIMEOUT, "connect", Client::connect_with(config))
        .await
        .expect("the fake server answers the handshake");
    for attempt in 0..2 {
        let started = Instant::now();
        let result = within(CALL_TIMEOUT, "an unanswered get", client.get("k")).await;
        let elapsed = started.elapsed();
        let error = result.expect_err("the fake server never answers");
        match &error {
            ClientError::Timeout { timeout, .. } => assert_eq!(*timeout, request_timeout),
            other => panic!("attempt {attempt}: expected a Timeout error, got {other:?}"),
        }
        assert!(error.is_indeterminate(), "{error:?}");
        assert!(!error.is_retryable(), "{error:?}");
        assert!(elapsed >= request_timeout, "elapsed={elapsed:?}");
    }
    assert_eq!(fake.received_count(is_get), 2);
}

/// A connection whose requests time out is not trusted forever. Here the server never
/// answers on the client's first core connection but answers on any later one, as when a
/// peer vanished without closing (a crashed host, a partition, the leaked descriptor in
/// `requests_fail_when_the_server_stops`) and the address is served again. Within a few
/// requests after the first timeout, the client must have moved to a new connection.
///
/// The bug this guards: only a read error or end of stream closed a connection, never a
/// timeout, so every request timed out on the silent connection until the kernel gives up on it: never,
/// while the peer's kernel still acknowledges (the leaked descriptor), or after TCP's
/// retransmission limit (about 15 minutes by default) when the peer host is gone. Keepalive
/// does not help: it only probes idle connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connection_is_replaced() {
    const ATTEMPT_COUNT: usize = 5;
    // Connection 0 is the handshake's; connection 1 is the first connection to the core.
    let fake = FakeServer::start(|connection_index, request| match request {
        Request::Get { .. } if connection_index == 1 => Reply::Nothing,
        Request::Get { .. } => Reply::Response(Response::Value(None)),
        _ => Reply::Nothing,
    })
    .await;
    let request_timeout = Duration::from_millis(200);
    let config = quick_config(vec![fake.address().to_owned()], request_timeout);
    let client = within(CALL_TIMEOUT, "connect", Client::connect_with(config))
        .await
        .unwrap();
    let first = within(CALL_TIMEOUT, "the first get", client.get("k")).await;
    assert!(
        matches!(first, Err(ClientError::Timeout { .. })),
        "the first connection is silent: {first:?}"
    );
    let mut outcomes = Vec::with_capacity(ATTEMPT_COUNT);
    for _ in 0..ATTEMPT_COUNT {
        let outcome = within(CALL_TIMEOUT, "a get after a timeout", client.get("k")).await;
        let is_answered = outcome.is_ok();
        outcomes.push(outcome);
        if is_answered {
            break;
        }
    }
    assert!(
        outcomes.last().is_some_and(Result::is_ok),
        "{ATTEMPT_COUNT} requests after a timeout all went to the silent connection: \
         {outcomes:?}"
    );
}

/// `WrongShard` makes the client refresh the topology and send the request again; once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_shard_refreshes_and_retries() {
    let get_count = Arc::new(AtomicUsize::new(0));
    let script_get_count = get_count.clone();
    let fake = FakeServer::start(move |_, request| match request {
        Request::Get { .. } if script_get_count.fetch_add(1, Ordering::Relaxed) == 0 => {
            wrong_shard()
        }
        Request::Get { .. } => Reply::Response(Response::Value(Some(Entry {
            value: b"found".to_vec(),
            create_revision: 7,
            mod_revision: 9,
            version: 2,
            expires_at_ms: None,
            fields: Vec::new(),
        }))),
        _ => Reply::Nothing,
    })
    .await;
    let client = connect(vec![fake.address().to_owned()]).await;
    let entry = within(CALL_TIMEOUT, "a redirected get", client.get("k")).await;
    assert_eq!(entry.unwrap().unwrap().value, b"found");
    assert_eq!(fake.received_count(is_get), 2);
    assert_eq!(
        fake.received_count(is_hello),
        2,
        "one handshake to connect, one to refresh"
    );
}

/// A server that answers `WrongShard` forever gets a bounded number of retries, then the
/// caller gets the `WrongShard` error, which is retryable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endless_wrong_shard_is_bounded() {
    let fake = FakeServer::start(|_, request| match request {
        Request::Get { .. } | Request::MultiGet { .. } => wrong_shard(),
        _ => Reply::Nothing,
    })
    .await;
    let mut config = quick_config(vec![fake.address().to_owned()], Duration::from_secs(5));
    config.wrong_shard_retry_max = 3;
    let client = within(CALL_TIMEOUT, "connect", Client::connect_with(config))
        .await
        .unwrap();

    let error = within(CALL_TIMEOUT, "an endlessly redirected get", client.get("k"))
        .await
        .expect_err("the fake server always redirects");
    assert_eq!(error.code(), Some(ErrorCode::WrongShard), "{error:?}");
    assert!(error.is_retryable(), "{error:?}");
    assert_eq!(fake.received_count(is_get), 4, "one try and three retries");

    let error = within(
        CALL_TIMEOUT,
        "an endlessly redirected mget",
        client.mget(&["a", "b"]),
    )
    .await
    .expect_err("the fake server always redirects");
    assert_eq!(error.code(), Some(ErrorCode::WrongShard), "{error:?}");
    assert_eq!(
        fake.received_count(|request| matches!(request, Request::MultiGet { .. })),
        4,
        "one try and three retries"
    );
}

/// A reply of the wrong kind is reported as such, not mistaken for an answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reply_of_the_wrong_kind_is_unexpected() {
    let fake = FakeServer::start(|_, _| {
        Reply::Response(Response::Pong {
            node_id: 1,
            core_id: 0,
        })
    })
    .await;
    let client = connect(vec![fake.address().to_owned()]).await;
    let result = within(CALL_TIMEOUT, "a get answered with a pong", client.get("k")).await;
    match result {
        Err(ClientError::UnexpectedReply(_)) => {}
        other => panic!("expected an UnexpectedReply error, got {other:?}"),
    }
}

/// Bytes that are not a frame fail the request with a protocol error, and the next request
/// gets a new connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_reply_is_a_protocol_error() {
    let fake = FakeServer::start(|_, request| match request {
        Request::Get { .. } => Reply::RawBytes(vec![0xAB; 64]),
        _ => Reply::Response(Response::Exists { exists: true }),
    })
    .await;
    let client = connect(vec![fake.address().to_owned()]).await;
    let result = within(CALL_TIMEOUT, "a get answered with garbage", client.get("k")).await;
    match &result {
        Err(ClientError::Protocol { address, .. }) => assert_eq!(address, fake.address()),
        other => panic!("expected a Protocol error, got {other:?}"),
    }
    let exists = within(CALL_TIMEOUT, "exists after garbage", client.exists("k")).await;
    assert!(exists.unwrap(), "the client reconnects after a bad frame");
}

/// A bad frame closes the connection, and fails every request in flight on it. Those were
/// sent, and the server may have applied them, so their errors must be indeterminate, even
/// though the bad frame answered a different request.
///
/// The bug this guards: the reader closed the connection with the `Protocol` error it hit,
/// and every request in flight got that same error, which was neither indeterminate nor
/// retryable, so a caller was told nothing about whether its put was applied. A protocol
/// error from the server is now indeterminate; encoding failures have their own variant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_in_flight_when_a_bad_frame_arrives_are_indeterminate() {
    let fake = FakeServer::start(|_, request| match request {
        Request::Put(_) => Reply::Nothing,
        _ => Reply::RawBytes(vec![0xAB; 64]),
    })
    .await;
    let client = connect(vec![fake.address().to_owned()]).await;
    let in_flight = tokio::spawn({
        let client = client.clone();
        async move { client.put("k", "v").await }
    });
    let deadline = Instant::now() + CALL_TIMEOUT;
    while fake.received_count(|request| matches!(request, Request::Put(_))) == 0 {
        assert!(
            Instant::now() < deadline,
            "the put never reached the server"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let garbage = within(CALL_TIMEOUT, "a get answered with garbage", client.get("k")).await;
    assert!(
        matches!(garbage, Err(ClientError::Protocol { .. })),
        "{garbage:?}"
    );
    let put = within(CALL_TIMEOUT, "the put in flight", in_flight)
        .await
        .unwrap();
    let error = put.expect_err("the connection closed under the put");
    assert!(
        error.is_indeterminate(),
        "a put in flight when its connection broke may have applied: {error:?}"
    );
}

/// A connection closed after the request was sent fails it as indeterminate; the next
/// request reconnects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_connection_is_indeterminate() {
    let fake = FakeServer::start(|_, request| match request {
        Request::Put(_) => Reply::Close,
        _ => Reply::Response(Response::Value(None)),
    })
    .await;
    let client = connect(vec![fake.address().to_owned()]).await;
    let result = within(
        CALL_TIMEOUT,
        "a put whose connection closes",
        client.put("k", "v"),
    )
    .await;
    let error = result.expect_err("the connection closes instead of answering");
    match &error {
        ClientError::Disconnected { address } => assert_eq!(address, fake.address()),
        other => panic!("expected a Disconnected error, got {other:?}"),
    }
    assert!(error.is_indeterminate(), "{error:?}");
    assert!(!error.is_retryable(), "{error:?}");
    let value = within(CALL_TIMEOUT, "a get after the close", client.get("k")).await;
    assert_eq!(value.unwrap(), None, "the client reconnects");
}
