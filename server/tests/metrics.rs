//! The admin endpoint seen from the network: `/metrics` reports what the cores did (requests
//! and errors by op, latency histograms, keys, memory, connections, inbox), `/health` answers
//! 200 while every core answers, anything else is 404, and the endpoint stops with the
//! server. Each test starts its own server with the admin endpoint on a free port.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use common::{
    expect_error, get_request, keys_owned_by, put_request, route_table, start_server,
    start_server_with, test_config, wait_until, RawConnection, TestDir,
};
use tessera_protocol::{ErrorCode, Put, Request, Response};

/// An HTTP answer: status code and body.
#[derive(Debug)]
struct HttpAnswer {
    status: u16,
    head: String,
    body: String,
}

/// Sends `request` (a whole HTTP request) to `address` and reads the answer to the end.
fn http(address: SocketAddr, request: &str) -> HttpAnswer {
    let mut stream = TcpStream::connect(address).expect("connect to the admin endpoint");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream.write_all(request.as_bytes()).unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    let (head, body) = answer
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no end of head in {answer:?}"));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"));
    HttpAnswer {
        status,
        head: head.to_owned(),
        body: body.to_owned(),
    }
}

fn get(address: SocketAddr, path: &str) -> HttpAnswer {
    http(
        address,
        &format!("GET {path} HTTP/1.1\r\nHost: tessera\r\n\r\n"),
    )
}

/// The value of the series named exactly `series` (name and labels as written), if present.
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        let (name, value) = line.rsplit_once(' ')?;
        (name == series).then(|| value.parse().expect("a number"))
    })
}

fn require(text: &str, series: &str) -> f64 {
    value(text, series).unwrap_or_else(|| panic!("{series} missing from:\n{text}"))
}

/// The value of a counter or an integer gauge.
fn count(text: &str, series: &str) -> u64 {
    let value = require(text, series);
    assert!(value.fract() == 0.0 && value >= 0.0, "{series} = {value}");
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let count = value as u64;
    count
}

#[test]
fn metrics_report_requests_errors_and_store_per_core() {
    let server = start_server(2);
    let admin = server
        .admin_address()
        .expect("network mode has an admin endpoint");
    assert_ne!(admin.port(), 0);
    let routes = route_table(&server);
    let addresses = server.addresses();
    let keys = keys_owned_by(&routes, 0, "metrics", 5);
    let mut core0 = RawConnection::open(&addresses[0]);
    for key in &keys {
        core0.put(key, b"value");
    }
    for key in &keys[..3] {
        assert!(core0.get(key).is_some());
    }
    expect_error(
        &core0.call(&put_request(b"", b"value")),
        ErrorCode::InvalidArgument,
    );
    // A get for a key of core 1 sent to core 0 is forwarded; it counts where it arrived.
    let foreign = keys_owned_by(&routes, 1, "metrics", 1);
    assert!(matches!(
        core0.call(&get_request(&foreign[0])),
        Response::Value(None)
    ));

    let answer = get(admin, "/metrics");
    assert_eq!(answer.status, 200, "{answer:?}");
    assert!(
        answer
            .head
            .contains("Content-Type: application/openmetrics-text"),
        "{}",
        answer.head
    );
    let text = &answer.body;
    assert_eq!(count(text, "tessera_core_up{core=\"0\"}"), 1);
    assert_eq!(count(text, "tessera_core_up{core=\"1\"}"), 1);
    // A cluster of one: the node itself, always up.
    assert_eq!(count(text, "tessera_peer_up{node=\"1\"}"), 1);
    assert_eq!(
        count(text, "tessera_peer_last_heard_seconds{node=\"1\"}"),
        0
    );
    // Five puts applied plus the refused one, four gets (one of them forwarded).
    assert_eq!(
        count(text, "tessera_requests_total{core=\"0\",op=\"put\"}"),
        6
    );
    assert_eq!(
        count(text, "tessera_requests_total{core=\"0\",op=\"get\"}"),
        4
    );
    assert_eq!(
        count(
            text,
            "tessera_request_errors_total{core=\"0\",op=\"put\",code=\"invalid_argument\"}"
        ),
        1
    );
    assert_eq!(
        value(text, "tessera_requests_total{core=\"1\",op=\"put\"}"),
        None
    );
    assert_eq!(
        count(
            text,
            "tessera_request_duration_seconds_count{core=\"0\",op=\"put\"}"
        ),
        6
    );
    assert_eq!(
        count(
            text,
            "tessera_request_duration_seconds_bucket{le=\"+Inf\",core=\"0\",op=\"get\"}"
        ),
        4
    );
    assert!(
        require(
            text,
            "tessera_request_duration_seconds_sum{core=\"0\",op=\"get\"}"
        ) > 0.0
    );
    assert_eq!(count(text, "tessera_keys{core=\"0\"}"), 5);
    assert_eq!(count(text, "tessera_keys{core=\"1\"}"), 0);
    assert!(count(text, "tessera_memory_used_bytes{core=\"0\"}") > 0);
    assert_eq!(
        count(text, "tessera_memory_budget_bytes{core=\"0\"}"),
        common::TEST_MEMORY_BYTES_MAX / 2
    );
    assert_eq!(count(text, "tessera_connections{core=\"0\"}"), 1);
    assert_eq!(count(text, "tessera_node_connections"), 1);
    // Core 1 took the forwarded get from its inbox, and one probe per scrape.
    assert!(count(text, "tessera_inbox_messages_total{core=\"1\"}") >= 1);
    assert_eq!(count(text, "tessera_inbox_depth{core=\"0\"}"), 0);
    assert_eq!(count(text, "tessera_watchers{core=\"0\"}"), 0);
    assert_eq!(
        count(text, "tessera_expiry_lag_seconds_count{core=\"0\"}"),
        0
    );
    assert!(text.ends_with("# EOF\n"), "{text}");
    server.shutdown().expect("shutdown");
}

#[test]
fn health_is_ok_unknown_paths_are_404_and_the_endpoint_stops_with_the_server() {
    let server = start_server(2);
    let admin = server
        .admin_address()
        .expect("network mode has an admin endpoint");
    let health = get(admin, "/health");
    assert_eq!(health.status, 200, "{health:?}");
    assert_eq!(health.body, "ok\n");
    assert_eq!(get(admin, "/nope").status, 404);
    assert_eq!(
        http(admin, "POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n").status,
        404
    );
    let oversized = format!(
        "GET /metrics HTTP/1.1\r\nX-Padding: {}\r\n\r\n",
        "a".repeat(9000)
    );
    assert_eq!(http(admin, &oversized).status, 431);
    // Still serving after the refusals.
    assert_eq!(get(admin, "/metrics?name=x").status, 200);
    server.shutdown().expect("shutdown");
    assert!(
        TcpStream::connect_timeout(&admin, Duration::from_secs(1)).is_err(),
        "the admin endpoint still listens after shutdown"
    );
}

/// With a log, every acknowledged put was synced: the log's counters and histograms account
/// for each record. A key whose TTL passes is reclaimed by the wheel and its lag counted.
#[test]
fn metrics_report_the_log_and_the_expiry_wheel() {
    let data_dir = TestDir::new("log");
    let server = start_server_with(tessera_server::Config {
        durability: tessera_server::config::Durability::Sync,
        data_dir: data_dir.0.clone(),
        ..test_config(1)
    });
    let admin = server
        .admin_address()
        .expect("network mode has an admin endpoint");
    let mut connection = RawConnection::open(&server.addresses()[0]);
    for index in 0..4 {
        connection.put(format!("logged-{index}").as_bytes(), b"value");
    }
    let expiring = Request::Put(Box::new(Put {
        ttl_ms: Some(20),
        ..Put::new(b"expiring".to_vec(), b"value".to_vec())
    }));
    assert!(matches!(
        connection.call(&expiring),
        Response::Put { applied: true, .. }
    ));
    let mut text = String::new();
    let is_reclaimed = wait_until(Duration::from_secs(5), || {
        text = get(admin, "/metrics").body;
        value(&text, "tessera_expired_keys_total{core=\"0\"}").is_some_and(|expired| expired >= 1.0)
    });
    assert!(is_reclaimed, "the wheel never reclaimed the key:\n{text}");
    assert_eq!(count(&text, "tessera_expired_keys_total{core=\"0\"}"), 1);
    assert_eq!(
        count(&text, "tessera_expiry_lag_seconds_count{core=\"0\"}"),
        1
    );
    assert_eq!(count(&text, "tessera_ttl_timers{core=\"0\"}"), 0);
    // The expiry's record may still be on its way to the disk; the five puts' are there.
    let records = count(&text, "tessera_log_records_total{core=\"0\"}");
    assert!((5..=6).contains(&records), "records={records}");
    let syncs = count(&text, "tessera_log_syncs_total{core=\"0\"}");
    assert!((1..=records).contains(&syncs), "syncs={syncs}");
    assert_eq!(
        count(
            &text,
            "tessera_log_flush_duration_seconds_count{core=\"0\"}"
        ),
        syncs
    );
    assert_eq!(
        count(&text, "tessera_log_sync_records_count{core=\"0\"}"),
        syncs
    );
    assert_eq!(
        count(&text, "tessera_log_sync_records_sum{core=\"0\"}"),
        records
    );
    assert_eq!(
        count(&text, "tessera_log_written_bytes_total{core=\"0\"}"),
        count(&text, "tessera_log_sync_bytes_sum{core=\"0\"}")
    );
    server.shutdown().expect("shutdown");
}
