//! Configured limits seen from clients: a refusal names its reason, applies nothing, and
//! leaves the connection usable. Each test runs a server with one limit set very low.

mod common;

use common::{
    expect_error, get_request, keys_owned_by, put_request, route_table, start_server_with,
    test_config, RawConnection,
};
use tessera_protocol::{Delete, ErrorCode, Request, Response};
use tessera_server::Config;

#[test]
fn a_full_inbox_refuses_forwards_with_overloaded_and_applies_none_of_them() {
    let server = start_server_with(Config {
        inbox_capacity: 1,
        ..test_config(2)
    });
    let addresses = server.addresses();
    let keys = keys_owned_by(&route_table(&server), 1, "overloaded", 256);
    // Sent to core 0 in one pipeline: every put is forwarded to core 1 through its inbox,
    // which holds one request at a time.
    let mut connection = RawConnection::open(&addresses[0]);
    let puts: Vec<Request> = keys.iter().map(|key| put_request(key, b"maybe")).collect();
    let responses = connection.call_many(&puts, puts.len());
    let mut applied_keys = Vec::new();
    let mut refused_keys = Vec::new();
    for (key, response) in keys.iter().zip(&responses) {
        match response {
            Response::Put { applied: true, .. } => applied_keys.push(key.clone()),
            Response::Error(error) if error.code == ErrorCode::Overloaded => {
                refused_keys.push(key.clone());
            }
            other => panic!("put {key:?}: {other:?}"),
        }
    }
    assert!(
        !refused_keys.is_empty(),
        "256 forwards never filled an inbox of 1"
    );
    let mut owner = RawConnection::open(&addresses[1]);
    let stats = owner.stats();
    assert_eq!(stats.revision, applied_keys.len() as u64);
    assert_eq!(stats.key_count, applied_keys.len() as u64);
    for key in &refused_keys {
        assert_eq!(owner.get(key), None, "refused put of {key:?} was applied");
    }
    // The refusal is transient: one at a time, the same puts go through.
    for key in &refused_keys[..refused_keys.len().min(8)] {
        connection.put(key, b"retried");
    }
    server.shutdown().expect("shutdown");
}

#[test]
fn a_full_store_refuses_writes_with_store_full_and_still_serves_reads() {
    // 1 MiB per core, the smallest budget the configuration allows.
    let server = start_server_with(Config {
        memory_bytes_max: 2 * 1024 * 1024,
        ..test_config(2)
    });
    let keys = keys_owned_by(&route_table(&server), 0, "full", 64);
    let mut connection = RawConnection::open(&server.addresses()[0]);
    let value = vec![b'x'; 64 * 1024];
    let mut written_keys = Vec::new();
    let mut refusal = None;
    for key in &keys {
        match connection.call(&put_request(key, &value)) {
            Response::Put { applied: true, .. } => written_keys.push(key.clone()),
            Response::Error(error) => {
                refusal = Some((key.clone(), error));
                break;
            }
            other => panic!("put {key:?}: {other:?}"),
        }
    }
    let (refused_key, error) = refusal.expect("64 values of 64 KiB fit in a 1 MiB budget");
    assert_eq!(error.code, ErrorCode::StoreFull, "{error:?}");
    assert!(!written_keys.is_empty());
    assert_eq!(
        connection.get(&refused_key),
        None,
        "the refused put was applied"
    );
    let stats = connection.stats();
    assert_eq!(stats.key_count, written_keys.len() as u64);
    assert!(stats.memory_bytes <= stats.memory_bytes_max, "{stats:?}");
    for key in &written_keys {
        assert_eq!(connection.get(key).expect("still there").value, value);
    }
    // Deleting makes room again.
    let delete = Request::Delete(Box::new(Delete::new(written_keys[0].clone())));
    assert!(matches!(
        connection.call(&delete),
        Response::Delete { deleted: true, .. }
    ));
    connection.put(&refused_key, &value);
    server.shutdown().expect("shutdown");
}

#[test]
fn low_in_flight_and_write_buffer_limits_still_answer_every_request() {
    let server = start_server_with(Config {
        connection_inflight_max: 3,
        connection_write_buffer_bytes_max: 64 * 1024,
        ..test_config(2)
    });
    let addresses = server.addresses();
    let large_value = vec![b'L'; 100 * 1024];
    let mut setup = RawConnection::open(&addresses[0]);
    setup.put(b"large", &large_value);
    // Each reply to a get of "large" alone overflows the write buffer limit, and the pipeline
    // is far deeper than the in-flight limit; both only pace the connection.
    let mut connection = RawConnection::open(&addresses[1]);
    let requests: Vec<Request> = (0..200)
        .map(|index| match index % 3 {
            0 => get_request(b"large"),
            1 => put_request(format!("small-{index}").as_bytes(), b"small"),
            _ => Request::Ping,
        })
        .collect();
    let responses = connection.call_many(&requests, requests.len());
    for (index, response) in responses.iter().enumerate() {
        match (index % 3, response) {
            (0, Response::Value(Some(entry))) => assert!(entry.value == large_value),
            (1, Response::Put { applied: true, .. }) | (2, Response::Pong { .. }) => {}
            (_, other) => panic!("request {index}: {other:?}"),
        }
    }
    expect_error(
        &connection.call(&get_request(b"")),
        ErrorCode::InvalidArgument,
    );
    server.shutdown().expect("shutdown");
}
