//! The server seen from the network: handshake and topology, where keys land, the forwarding
//! slow path, pipelining and request ids, TTL expiry, invalid input, and the connection limit.
//! Every test starts its own server on free loopback ports and speaks raw frames to it.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::{
    expect_error, get_request, hello_request, keys_owned_by, owner_core, put_request, route_table,
    start_server, start_server_with, test_config, wait_until, RawConnection,
};
use tessera_protocol::codec::{self, FrameBuffer};
use tessera_protocol::limits::{
    BATCH_COUNT_MAX, FRAME_BODY_SIZE_MAX, FRAME_HEADER_SIZE, KEY_SIZE_MAX, VALUE_SIZE_MAX,
};
use tessera_protocol::{
    Delete, ErrorCode, FrameHeader, FrameKind, Put, PutEntry, Request, Response, TtlState,
    PROTOCOL_VERSION, SLOT_COUNT,
};

/// How long the server may take to notice a closed connection and release its slot.
const CONNECTION_RELEASE_TIMEOUT: Duration = Duration::from_secs(2);

#[test]
fn handshake_returns_every_core_with_its_address_and_slots() {
    let server = start_server(3);
    let addresses = server.addresses();
    assert_eq!(addresses.len(), 3);
    for (core_index, address) in addresses.iter().enumerate() {
        let mut connection = RawConnection::open(address);
        let Response::Hello {
            protocol_version,
            node_id,
            server_name,
            topology,
            health,
        } = connection.call(&hello_request())
        else {
            panic!("core {core_index} did not answer the handshake with Hello");
        };
        assert_eq!(protocol_version, PROTOCOL_VERSION);
        assert_eq!(node_id, 1);
        assert_eq!(server_name, "tessera");
        assert!(topology.epoch >= 1, "epoch={}", topology.epoch);
        assert_eq!(&topology, server.topology());
        assert_eq!(topology.nodes.len(), 1);
        assert_eq!(health.len(), 1);
        assert_eq!(health[0].state, tessera_protocol::NodeState::Up);
        let cores = &topology.nodes[0].cores;
        assert_eq!(cores.len(), 3);
        let mut slot_next = 0;
        for (index, core) in cores.iter().enumerate() {
            assert_eq!(usize::from(core.core_id), index);
            assert_eq!(core.address, addresses[index]);
            assert!(!core.address.ends_with(":0"), "address={}", core.address);
            assert_eq!(
                core.slots.start, slot_next,
                "core {index} slots {}",
                core.slots
            );
            assert!(
                core.slots.start < core.slots.end,
                "core {index} slots {}",
                core.slots
            );
            slot_next = core.slots.end;
        }
        assert_eq!(slot_next, SLOT_COUNT);
    }
    // Each advertised address reaches the core it names.
    for (core_index, address) in addresses.iter().enumerate() {
        let mut connection = RawConnection::open(address);
        match connection.call(&Request::Ping) {
            Response::Pong { node_id, core_id } => {
                assert_eq!(node_id, 1);
                assert_eq!(usize::from(core_id), core_index);
            }
            other => panic!("ping to core {core_index}: {other:?}"),
        }
    }
    server.shutdown().expect("shutdown");
}

#[test]
fn handshake_in_another_version_is_refused_without_closing() {
    let server = start_server(2);
    let mut connection = RawConnection::open(&server.addresses()[0]);
    let response = connection.call(&Request::Hello {
        protocol_version: PROTOCOL_VERSION + 1,
        client_name: "from-the-future".to_owned(),
    });
    expect_error(&response, ErrorCode::UnsupportedVersion);
    assert!(matches!(
        connection.call(&hello_request()),
        Response::Hello { .. }
    ));
    server.shutdown().expect("shutdown");
}

#[test]
fn keys_land_on_the_core_the_topology_names() {
    let core_count = 3;
    let server = start_server(core_count);
    let routes = route_table(&server);
    let addresses = server.addresses();
    let mut keys_by_core: Vec<Vec<Vec<u8>>> = vec![Vec::new(); core_count];
    for key_index in 0..2000 {
        let key = format!("placement-{key_index}").into_bytes();
        keys_by_core[owner_core(&routes, &key)].push(key);
    }
    for (core_index, keys) in keys_by_core.iter().enumerate() {
        assert!(!keys.is_empty(), "core {core_index} owns none of 2000 keys");
        let mut connection = RawConnection::open(&addresses[core_index]);
        let puts: Vec<Request> = keys.iter().map(|key| put_request(key, key)).collect();
        for (key, response) in keys.iter().zip(connection.call_many(&puts, 64)) {
            assert!(
                matches!(response, Response::Put { applied: true, .. }),
                "put {key:?} on core {core_index}: {response:?}"
            );
        }
    }
    for (core_index, keys) in keys_by_core.iter().enumerate() {
        let mut connection = RawConnection::open(&addresses[core_index]);
        let stats = connection.stats();
        assert_eq!(usize::from(stats.core_id), core_index);
        assert_eq!(stats.key_count, keys.len() as u64, "core {core_index}");
        // A fresh shard's revision counts exactly the puts it applied.
        assert_eq!(stats.revision, keys.len() as u64, "core {core_index}");
        let gets: Vec<Request> = keys.iter().map(|key| get_request(key)).collect();
        for (key, response) in keys.iter().zip(connection.call_many(&gets, 64)) {
            match response {
                Response::Value(Some(entry)) => assert_eq!(&entry.value, key),
                other => panic!("get {key:?} from core {core_index}: {other:?}"),
            }
        }
    }
    server.shutdown().expect("shutdown");
}

/// `count` keys named `prefix-N` owned by each core, in core order.
fn keys_per_core(
    routes: &tessera_protocol::RouteTable,
    core_count: usize,
    prefix: &str,
    count: usize,
) -> Vec<Vec<Vec<u8>>> {
    (0..core_count)
        .map(|core_index| keys_owned_by(routes, core_index, prefix, count))
        .collect()
}

#[test]
fn requests_sent_to_the_wrong_core_are_forwarded_to_the_owner() {
    let core_count = 3;
    let server = start_server(core_count);
    let routes = route_table(&server);
    let addresses = server.addresses();
    let keys_by_core = keys_per_core(&routes, core_count, "forwarded", 4);
    // Every request goes to core 0, which owns none of these keys.
    let mut connection = RawConnection::open(&addresses[0]);
    let mut mutation_count_by_core = vec![0_u64; core_count];
    let mut kept_count_by_core = vec![0_u64; core_count];
    for core_index in 1..core_count {
        for (key_index, key) in keys_by_core[core_index].iter().enumerate() {
            let value = format!("value {key_index} on core {core_index}").into_bytes();
            let created = connection.put(key, &value);
            let entry = connection.get(key).expect("written");
            assert_eq!(entry.value, value);
            assert_eq!(entry.create_revision, created);
            assert_eq!(entry.mod_revision, created);
            assert_eq!(entry.version, 1);
            assert_eq!(
                connection.call(&Request::Exists { key: key.clone() }),
                Response::Exists { exists: true }
            );
            assert_eq!(
                connection.call(&Request::Ttl { key: key.clone() }),
                Response::Ttl(TtlState::Persistent)
            );
            let expire = Request::Expire {
                key: key.clone(),
                ttl_ms: 60_000,
            };
            let expired_at = match connection.call(&expire) {
                Response::Expiry {
                    applied: true,
                    mod_revision,
                } => mod_revision,
                other => panic!("expire {key:?}: {other:?}"),
            };
            assert!(expired_at > created, "{expired_at} after {created}");
            let entry = connection.get(key).expect("still there");
            assert_eq!(
                (entry.create_revision, entry.mod_revision, entry.version),
                (created, expired_at, 2),
                "an expire is a write of the same key"
            );
            match connection.call(&Request::Ttl { key: key.clone() }) {
                Response::Ttl(TtlState::Expiring { remaining_ms, .. }) => {
                    assert!(remaining_ms > 0 && remaining_ms <= 60_000, "{remaining_ms}");
                }
                other => panic!("ttl of {key:?}: {other:?}"),
            }
            mutation_count_by_core[core_index] += 2;
            if key_index % 2 == 1 {
                kept_count_by_core[core_index] += 1;
                continue;
            }
            let delete = Request::Delete(Box::new(Delete {
                return_previous: true,
                ..Delete::new(key.clone())
            }));
            match connection.call(&delete) {
                Response::Delete {
                    deleted: true,
                    version: 0,
                    previous: Some(previous),
                } => {
                    assert_eq!(previous.value, value);
                    assert_eq!(previous, entry, "the removed entry, revisions and all");
                }
                other => panic!("delete {key:?}: {other:?}"),
            }
            mutation_count_by_core[core_index] += 1;
            assert_eq!(connection.get(key), None);
            assert_eq!(
                connection.call(&Request::Exists { key: key.clone() }),
                Response::Exists { exists: false }
            );
            assert_eq!(
                connection.call(&Request::Ttl { key: key.clone() }),
                Response::Ttl(TtlState::Missing)
            );
        }
    }
    // The data lives on the owners; core 0 applied none of it.
    for (core_index, address) in addresses.iter().enumerate() {
        let stats = RawConnection::open(address).stats();
        assert_eq!(
            stats.key_count, kept_count_by_core[core_index],
            "core {core_index}"
        );
        assert_eq!(
            stats.revision, mutation_count_by_core[core_index],
            "core {core_index}"
        );
    }
    server.shutdown().expect("shutdown");
}

fn batch_value_of(key: &[u8]) -> Vec<u8> {
    [b"v:", key].concat()
}

/// The values one `MultiGet` sent to `address` returns, in request order.
fn multi_get(address: &str, keys: &[Vec<u8>]) -> Vec<Option<Vec<u8>>> {
    let read = Request::MultiGet {
        keys: keys.to_vec(),
    };
    match RawConnection::open(address).call(&read) {
        Response::Values(values) => values
            .into_iter()
            .map(|entry| entry.map(|entry| entry.value))
            .collect(),
        other => panic!("multi-get of {} keys from {address}: {other:?}", keys.len()),
    }
}

/// Each core's `key_count`, in core order.
fn key_counts(addresses: &[String]) -> Vec<u64> {
    addresses
        .iter()
        .map(|address| RawConnection::open(address).stats().key_count)
        .collect()
}

#[test]
fn batches_spanning_cores_answer_in_request_order() {
    let core_count = 3;
    let server = start_server(core_count);
    let routes = route_table(&server);
    let addresses = server.addresses();
    let keys_by_core = keys_per_core(&routes, core_count, "batch", 5);
    // Interleave the owners so that every part of the split is scattered through the batch.
    let keys: Vec<Vec<u8>> = (0..5)
        .flat_map(|index| keys_by_core.iter().map(move |keys| keys[index].clone()))
        .collect();
    let entries = keys
        .iter()
        .map(|key| PutEntry {
            key: key.clone(),
            value: batch_value_of(key),
            ttl_ms: None,
            fields: Vec::new(),
        })
        .collect();
    let mut connection = RawConnection::open(&addresses[1]);
    let Response::MultiPut { mod_revisions } = connection.call(&Request::MultiPut { entries })
    else {
        panic!("a multi-put spanning cores failed");
    };
    assert_eq!(mod_revisions.len(), keys.len());
    // Each owner applies its part at one revision, and the mod revision of every entry is the
    // one its owner reports for that key. Every key is new: created there, one write.
    for (key, mod_revision) in keys.iter().zip(&mod_revisions) {
        let owner = owner_core(&routes, key);
        let entry = RawConnection::open(&addresses[owner])
            .get(key)
            .expect("written");
        assert_eq!(entry.value, batch_value_of(key));
        assert_eq!(
            (entry.create_revision, entry.mod_revision, entry.version),
            (*mod_revision, *mod_revision, 1),
            "key {key:?} on core {owner}"
        );
    }
    for (core_index, address) in addresses.iter().enumerate() {
        let stats = RawConnection::open(address).stats();
        assert_eq!(stats.key_count, 5, "core {core_index}");
        assert_eq!(
            stats.revision, 1,
            "core {core_index} applied its part as one batch"
        );
    }

    // Reads in a different order, with missing keys between present ones.
    let mut read_keys: Vec<Vec<u8>> = Vec::new();
    for (index, key) in keys.iter().rev().enumerate() {
        read_keys.push(key.clone());
        if index % 4 == 0 {
            read_keys.push(format!("missing-{index}").into_bytes());
        }
    }
    let expected: Vec<Option<Vec<u8>>> = read_keys
        .iter()
        .map(|key| (!key.starts_with(b"missing-")).then(|| batch_value_of(key)))
        .collect();
    assert_eq!(multi_get(&addresses[2], &read_keys), expected);

    // Deletes every third key, mixed with keys that do not exist.
    let delete_keys: Vec<Vec<u8>> = keys
        .iter()
        .step_by(3)
        .flat_map(|key| [key.clone(), [b"gone-", key.as_slice()].concat()])
        .collect();
    let delete = Request::MultiDelete {
        keys: delete_keys.clone(),
    };
    let Response::MultiDelete { deleted } = connection.call(&delete) else {
        panic!("a multi-delete spanning cores failed");
    };
    let expected: Vec<bool> = delete_keys
        .iter()
        .map(|key| !key.starts_with(b"gone-"))
        .collect();
    assert_eq!(deleted, expected);
    let mut remaining_by_core = vec![0_u64; core_count];
    for key in keys
        .iter()
        .skip(1)
        .step_by(3)
        .chain(keys.iter().skip(2).step_by(3))
    {
        remaining_by_core[owner_core(&routes, key)] += 1;
    }
    assert_eq!(key_counts(&addresses), remaining_by_core);

    // A batch whose keys all live on one other core is forwarded whole.
    let expected: Vec<Option<Vec<u8>>> = keys_by_core[2]
        .iter()
        .map(|key| {
            let is_deleted = delete_keys.contains(key);
            (!is_deleted).then(|| batch_value_of(key))
        })
        .collect();
    assert_eq!(multi_get(&addresses[0], &keys_by_core[2]), expected);
    server.shutdown().expect("shutdown");
}

/// What a pipelined request expects back.
enum Expected {
    Put,
    Value(Option<Vec<u8>>),
}

/// One client thread of the pipelining test: `window_count` windows of 64 requests on one
/// connection, half puts of new keys and half gets of the previous window's keys, interleaved.
fn pipeline_client(address: &str, client_index: u64, window_count: u64) -> u64 {
    let mut connection = RawConnection::open(address);
    let key_of = |key_index: u64| format!("pipelined-{client_index}-{key_index}").into_bytes();
    let value_of = |key_index: u64| {
        let length = usize::try_from(key_index % 7 + 1).unwrap();
        format!("{client_index}:{key_index};")
            .repeat(length)
            .into_bytes()
    };
    let mut replied_count = 0;
    for window in 0..window_count {
        let mut expected: HashMap<u64, Expected> = HashMap::new();
        for position in 0..32 {
            let key_index = window * 32 + position;
            // Ids are unique on this connection but neither dense nor in order.
            let put_id = (client_index << 40) | ((key_index * 2 + 1) * 7919);
            connection.queue(
                put_id,
                &put_request(&key_of(key_index), &value_of(key_index)),
            );
            expected.insert(put_id, Expected::Put);
            let get_id = (client_index << 40) | ((key_index * 2 + 2) * 7919);
            let get_value = if window == 0 {
                connection.queue(get_id, &get_request(&key_of(1_000_000 + position)));
                None
            } else {
                let read_index = key_index - 32;
                connection.queue(get_id, &get_request(&key_of(read_index)));
                Some(value_of(read_index))
            };
            expected.insert(get_id, Expected::Value(get_value));
        }
        connection.flush().expect("send a window");
        for _ in 0..64 {
            let (request_id, response) = connection.reply();
            let Some(expectation) = expected.remove(&request_id) else {
                panic!("client {client_index}: unknown or repeated reply id {request_id}");
            };
            match (expectation, response) {
                (Expected::Put, Response::Put { applied: true, .. }) => {}
                (Expected::Value(value), Response::Value(entry)) => {
                    assert_eq!(entry.map(|entry| entry.value), value, "reply {request_id}");
                }
                (_, other) => panic!("client {client_index} reply {request_id}: {other:?}"),
            }
            replied_count += 1;
        }
        assert!(expected.is_empty());
    }
    replied_count
}

#[test]
fn pipelined_replies_match_their_request_ids() {
    let core_count = 2;
    let client_count = 8;
    let window_count = 32;
    let server = start_server(core_count);
    let addresses = server.addresses();
    let replied_count: u64 = std::thread::scope(|scope| {
        let clients: Vec<_> = (0..client_count)
            .map(|client_index| {
                let address = &addresses[client_index % core_count];
                let client_index = client_index as u64;
                scope.spawn(move || pipeline_client(address, client_index, window_count))
            })
            .collect();
        clients
            .into_iter()
            .map(|client| client.join().expect("client thread"))
            .sum()
    });
    assert_eq!(replied_count, client_count as u64 * window_count * 64);
    let key_count: u64 = addresses
        .iter()
        .map(|address| RawConnection::open(address).stats().key_count)
        .sum();
    assert_eq!(key_count, client_count as u64 * window_count * 32);
    server.shutdown().expect("shutdown");
}

/// One malformed input and the refusal the server must send before closing.
struct Attack {
    name: &'static str,
    bytes: Vec<u8>,
    request_id: u64,
    code: ErrorCode,
}

/// A frame around an archived `Ping` body whose header is changed by `change` after
/// construction (so its header checksum is still correct).
fn ping_frame_with_header(request_id: u64, change: impl FnOnce(&mut FrameHeader)) -> Vec<u8> {
    let mut body = FrameBuffer::new();
    codec::encode_request_body(&mut body, &Request::Ping).unwrap();
    let body_size = u32::try_from(body.len()).unwrap();
    let mut header = FrameHeader::new(
        FrameKind::Request,
        request_id,
        body_size,
        crc32fast::hash(&body),
    );
    change(&mut header);
    common::frame_bytes(&header, &body)
}

/// Bytes from a fixed xorshift sequence that do not validate as an archived request.
fn invalid_request_body() -> Vec<u8> {
    let mut state = 0x9E37_79B9_7F4A_7C15_u64;
    let bytes: Vec<u8> = (0..96)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state.to_le_bytes()[0]
        })
        .collect();
    let mut aligned = FrameBuffer::new();
    aligned.extend_from_slice(&bytes);
    assert!(
        codec::access_request(&aligned).is_err(),
        "the test body must be invalid"
    );
    bytes
}

fn attacks() -> Vec<Attack> {
    let mut corrupt_body = FrameBuffer::new();
    codec::encode_request(&mut corrupt_body, 21, &put_request(b"key", b"value")).unwrap();
    corrupt_body[FRAME_HEADER_SIZE + 1] ^= 0x40;

    let body_size_over = u32::try_from(FRAME_BODY_SIZE_MAX + 16).unwrap();
    let oversized_header = FrameHeader::new(FrameKind::Request, 22, body_size_over, 0);

    let invalid_body = invalid_request_body();
    let invalid_body_header = FrameHeader::new(
        FrameKind::Request,
        24,
        u32::try_from(invalid_body.len()).unwrap(),
        crc32fast::hash(&invalid_body),
    );

    let mut response_frame = FrameBuffer::new();
    let pong = Response::Pong {
        node_id: 1,
        core_id: 0,
    };
    codec::encode_response(&mut response_frame, 25, &pong).unwrap();

    vec![
        Attack {
            name: "garbage bytes (bad magic)",
            bytes: b"GET / HTTP/1.1\r\nHost: tessera\r\n\r\n".repeat(2),
            request_id: 0,
            code: ErrorCode::BadFrame,
        },
        Attack {
            name: "corrupted body checksum",
            bytes: corrupt_body.to_vec(),
            request_id: 21,
            code: ErrorCode::BadFrame,
        },
        Attack {
            name: "header announcing a body over FRAME_BODY_SIZE_MAX",
            bytes: oversized_header.to_bytes().to_vec(),
            request_id: 22,
            code: ErrorCode::TooLarge,
        },
        Attack {
            name: "protocol version 2",
            bytes: ping_frame_with_header(23, |header| header.version = 2),
            request_id: 23,
            code: ErrorCode::UnsupportedVersion,
        },
        Attack {
            name: "checksummed body that is not an archived request",
            bytes: common::frame_bytes(&invalid_body_header, &invalid_body),
            request_id: 24,
            code: ErrorCode::BadFrame,
        },
        Attack {
            name: "response frame from a client",
            bytes: response_frame.to_vec(),
            request_id: 25,
            code: ErrorCode::BadFrame,
        },
        Attack {
            name: "unknown frame kind",
            bytes: ping_frame_with_header(26, |header| header.kind = 3),
            request_id: 26,
            code: ErrorCode::BadFrame,
        },
        Attack {
            name: "flags set",
            bytes: ping_frame_with_header(27, |header| header.flags = 1),
            request_id: 27,
            code: ErrorCode::BadFrame,
        },
    ]
}

#[test]
fn a_bad_frame_closes_only_its_own_connection() {
    let server = start_server(2);
    let addresses = server.addresses();
    let mut healthy = RawConnection::open(&addresses[0]);
    healthy.assert_serving(b"healthy-before");
    for (attack_index, attack) in attacks().into_iter().enumerate() {
        let name = attack.name;
        let mut attacker = RawConnection::open(&addresses[attack_index % 2]);
        // The attacker is served normally until it misbehaves.
        assert!(
            matches!(attacker.call(&Request::Ping), Response::Pong { .. }),
            "{name}"
        );
        attacker.send_raw(&attack.bytes).expect("send the attack");
        let (request_id, response) = attacker.reply();
        assert_eq!(request_id, attack.request_id, "{name}: {response:?}");
        expect_error(&response, attack.code);
        attacker.expect_closed();
        healthy.assert_serving(format!("healthy-after-{attack_index}").as_bytes());
        // The closed connection gives its slot back: only the healthy one remains.
        let is_released = wait_until(CONNECTION_RELEASE_TIMEOUT, || {
            healthy.stats().connection_count == 1
        });
        assert!(
            is_released,
            "{name}: the attacker's connection is still counted"
        );
    }
    server.shutdown().expect("shutdown");
}

#[test]
fn invalid_arguments_are_refused_and_the_connection_stays_open() {
    let server = start_server(2);
    let mut connection = RawConnection::open(&server.addresses()[0]);
    let empty_key = connection.call(&put_request(b"", b"value"));
    expect_error(&empty_key, ErrorCode::InvalidArgument);
    expect_error(
        &connection.call(&get_request(b"")),
        ErrorCode::InvalidArgument,
    );
    connection.assert_serving(b"after-empty-key");

    let value_over = vec![7_u8; VALUE_SIZE_MAX + 1];
    let too_large = connection.call(&put_request(b"big", &value_over));
    expect_error(&too_large, ErrorCode::TooLarge);
    assert_eq!(connection.get(b"big"), None, "a refused put is not applied");
    connection.assert_serving(b"after-large-value");

    let key_over = vec![b'k'; KEY_SIZE_MAX + 1];
    expect_error(
        &connection.call(&get_request(&key_over)),
        ErrorCode::TooLarge,
    );
    let zero_ttl = Request::Expire {
        key: b"after-empty-key".to_vec(),
        ttl_ms: 0,
    };
    expect_error(&connection.call(&zero_ttl), ErrorCode::InvalidArgument);
    let batch_over = Request::MultiGet {
        keys: (0..=BATCH_COUNT_MAX)
            .map(|index| index.to_le_bytes().to_vec())
            .collect(),
    };
    expect_error(&connection.call(&batch_over), ErrorCode::TooLarge);

    // Refusals in the middle of a pipeline answer only their own request.
    let requests = [
        put_request(b"pipelined", b"one"),
        put_request(b"", b"refused"),
        get_request(b"pipelined"),
        put_request(b"big", &value_over),
        Request::Ping,
    ];
    let responses = connection.call_many(&requests, requests.len());
    assert!(matches!(responses[0], Response::Put { applied: true, .. }));
    expect_error(&responses[1], ErrorCode::InvalidArgument);
    assert!(matches!(&responses[2], Response::Value(Some(entry)) if entry.value == b"one"));
    expect_error(&responses[3], ErrorCode::TooLarge);
    assert!(matches!(responses[4], Response::Pong { .. }));
    server.shutdown().expect("shutdown");
}

#[test]
fn frames_split_across_many_writes_are_reassembled() {
    let server = start_server(2);
    let mut connection = RawConnection::open(&server.addresses()[1]);
    let mut bytes = FrameBuffer::new();
    codec::encode_request(&mut bytes, 1, &put_request(b"trickled", b"byte by byte")).unwrap();
    codec::encode_request(&mut bytes, 2, &get_request(b"trickled")).unwrap();
    codec::encode_request(&mut bytes, 3, &Request::Ping).unwrap();
    for byte in bytes.iter() {
        connection
            .send_raw(std::slice::from_ref(byte))
            .expect("send one byte");
    }
    let mut replies: Vec<(u64, Response)> = (0..3).map(|_| connection.reply()).collect();
    replies.sort_by_key(|(request_id, _)| *request_id);
    assert!(matches!(
        replies[0],
        (1, Response::Put { applied: true, .. })
    ));
    assert!(
        matches!(&replies[1], (2, Response::Value(Some(entry))) if entry.value == b"byte by byte")
    );
    assert!(matches!(replies[2], (3, Response::Pong { .. })));
    server.shutdown().expect("shutdown");
}

#[test]
fn values_of_the_maximum_size_round_trip() {
    let server = start_server(2);
    let routes = route_table(&server);
    let addresses = server.addresses();
    let value: Vec<u8> = (0..VALUE_SIZE_MAX)
        .map(|index| u8::try_from(index % 251).unwrap())
        .collect();
    let key = b"largest-value";
    // Once to the owner and once through the other core, so forwarding carries it too.
    let owner = owner_core(&routes, key);
    for (write_count, address) in (1..).zip([&addresses[owner], &addresses[1 - owner]]) {
        let mut connection = RawConnection::open(address);
        let mod_revision = connection.put(key, &value);
        let entry = connection.get(key).expect("written");
        assert_eq!(entry.mod_revision, mod_revision);
        assert_eq!(entry.version, write_count);
        assert!(entry.value == value, "the value read back differs");
        connection.assert_serving(b"after-large-value");
    }
    server.shutdown().expect("shutdown");
}

#[test]
fn connections_over_the_limit_are_refused_with_overloaded() {
    let server = start_server_with(tessera_server::Config {
        connection_count_max: 2,
        ..test_config(2)
    });
    let addresses = server.addresses();
    let mut first = RawConnection::open(&addresses[0]);
    let mut second = RawConnection::open(&addresses[1]);
    // Answered, so both are accepted and counted before the third arrives.
    assert!(matches!(first.call(&Request::Ping), Response::Pong { .. }));
    assert!(matches!(second.call(&Request::Ping), Response::Pong { .. }));

    // The limit is server-wide: a third connection is refused on either core.
    for address in &addresses {
        let mut refused = RawConnection::open(address);
        let (request_id, response) = refused.reply();
        assert_eq!(
            request_id, 0,
            "a refusal is about the connection, not a request"
        );
        expect_error(&response, ErrorCode::Overloaded);
        refused.expect_closed();
    }
    assert!(matches!(first.call(&Request::Ping), Response::Pong { .. }));

    drop(first);
    let is_released = wait_until(CONNECTION_RELEASE_TIMEOUT, || {
        second.stats().connection_count == 1
    });
    assert!(
        is_released,
        "closing a connection does not release its slot"
    );
    let mut replacement = RawConnection::open(&addresses[0]);
    replacement.assert_serving(b"replacement");
    server.shutdown().expect("shutdown");
}

#[test]
fn keys_with_a_ttl_expire_and_are_reclaimed_by_their_owner() {
    let server = start_server(2);
    let routes = route_table(&server);
    let addresses = server.addresses();
    let key = b"expiring";
    let owner = owner_core(&routes, key);
    // Written through the other core, so the TTL travels with a forwarded request.
    let mut connection = RawConnection::open(&addresses[1 - owner]);
    let put = Request::Put(Box::new(Put {
        ttl_ms: Some(50),
        ..Put::new(key.to_vec(), b"short-lived".to_vec())
    }));
    assert!(matches!(
        connection.call(&put),
        Response::Put { applied: true, .. }
    ));
    let entry = connection.get(key).expect("not expired yet");
    assert!(entry.expires_at_ms.is_some(), "{entry:?}");
    let mut owner_connection = RawConnection::open(&addresses[owner]);
    let is_reclaimed = wait_until(Duration::from_secs(2), || {
        owner_connection.stats().expired_count == 1
    });
    assert!(is_reclaimed, "the owner's tick never reclaimed the key");
    let stats = owner_connection.stats();
    assert_eq!(stats.key_count, 0);
    assert_eq!(
        stats.revision, 2,
        "the put and the reclaim are both mutations"
    );
    assert_eq!(connection.get(key), None);
    server.shutdown().expect("shutdown");
}

#[test]
fn request_ids_are_echoed_unchanged() {
    let server = start_server(2);
    let mut connection = RawConnection::open(&server.addresses()[0]);
    let request_ids = [u64::MAX, 1 << 63, 0x0123_4567_89AB_CDEF, 7, 7 + (1 << 32)];
    for request_id in request_ids {
        connection.queue(request_id, &Request::Ping);
    }
    connection.flush().expect("send");
    let mut replied_ids: Vec<u64> = request_ids.iter().map(|_| connection.reply().0).collect();
    replied_ids.sort_unstable();
    let mut expected = request_ids.to_vec();
    expected.sort_unstable();
    assert_eq!(replied_ids, expected);
    server.shutdown().expect("shutdown");
}
