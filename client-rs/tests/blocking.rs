//! The synchronous [`BlockingClient`]: the same calls as the async client, each blocking the
//! calling thread, against a remote server and (with the `embedded` feature) embedded shards.
//!
//! These are plain `#[test]`s: a blocking client drives its own runtime and cannot be used
//! from inside another one. Each test runs its work on a thread with a deadline, so a hang
//! fails the test instead of stalling the run.

mod common;

use std::time::Duration;

use common::{
    on_thread_within, start_server, stop_server, unused_address, CORE_COUNT, SCENARIO_TIMEOUT,
};
use tessera_client::{BlockingClient, ClientError, DeleteOptions, PutOptions, TtlState};

/// Put, get, TTL, batches, ping and stats through a blocking client.
fn short_scenario(client: &BlockingClient) {
    assert_eq!(client.get("blocking:key").unwrap(), None);
    let written = client.put("blocking:key", "value").unwrap();
    assert!(written.applied);
    let entry = client.get("blocking:key").unwrap().expect("just written");
    assert_eq!(entry.value, b"value");
    assert_eq!(entry.mod_revision, written.mod_revision);
    assert_eq!(entry.create_revision, written.mod_revision);
    assert_eq!(entry.version, 1);
    assert!(client.exists("blocking:key").unwrap());
    assert_eq!(client.ttl("blocking:key").unwrap(), TtlState::Persistent);

    let refused = client
        .put_with(
            "blocking:key",
            "other",
            PutOptions::new().if_absent().return_previous(),
        )
        .unwrap();
    assert!(!refused.applied);
    assert_eq!(refused.previous, Some(entry));

    client
        .put_with(
            "blocking:brief",
            "v",
            PutOptions::new().ttl(Duration::from_millis(300)),
        )
        .unwrap();
    match client.ttl("blocking:brief").unwrap() {
        TtlState::Expiring { remaining_ms, .. } => {
            assert!(
                remaining_ms > 0 && remaining_ms <= 300,
                "remaining_ms={remaining_ms}"
            );
        }
        other => panic!("expected an expiring key, got {other:?}"),
    }
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(client.get("blocking:brief").unwrap(), None);
    assert_eq!(client.ttl("blocking:brief").unwrap(), TtlState::Missing);

    assert!(client
        .expire("blocking:key", Duration::from_secs(60))
        .unwrap());
    assert!(client.persist("blocking:key").unwrap());

    let keys: Vec<String> = (0..100)
        .map(|index| format!("blocking:batch:{index}"))
        .collect();
    let entries: Vec<(&String, &String)> = keys.iter().map(|key| (key, key)).collect();
    assert_eq!(client.mput(&entries).unwrap().len(), keys.len());
    let values = client.mget(&keys).unwrap();
    for (key, value) in keys.iter().zip(values) {
        assert_eq!(value.expect("written by mput").value, key.as_bytes());
    }
    let key_count: u64 = client
        .stats()
        .unwrap()
        .iter()
        .map(|core| core.key_count)
        .sum();
    assert_eq!(key_count, 101, "100 batch keys and blocking:key");
    assert!(client
        .mdelete(&keys)
        .unwrap()
        .iter()
        .all(|&deleted| deleted));

    let outcome = client
        .delete_with("blocking:key", DeleteOptions::new().return_previous())
        .unwrap();
    assert!(outcome.deleted);
    let removed = outcome.previous.expect("asked for the removed entry");
    assert_eq!(removed.create_revision, written.mod_revision, "{removed:?}");
    assert!(removed.mod_revision > written.mod_revision, "{removed:?}");
    assert_eq!(
        removed.version, 3,
        "a put, an expire and a persist: {removed:?}"
    );
    assert!(!client.delete("blocking:key").unwrap());
    assert_eq!(client.ping().unwrap().len(), CORE_COUNT);
    assert_eq!(client.topology().nodes[0].cores.len(), CORE_COUNT);
    client.refresh_topology().unwrap();
}

#[test]
fn blocking_remote_client() {
    let server = start_server(CORE_COUNT);
    let addresses = server.addresses();
    on_thread_within(
        SCENARIO_TIMEOUT,
        "the blocking remote scenario",
        move || {
            let client =
                BlockingClient::connect(addresses).expect("the server accepts the handshake");
            short_scenario(&client);
        },
    );
    stop_server(server);
}

#[test]
fn blocking_connect_to_nothing_is_retryable() {
    let address = unused_address();
    let result = on_thread_within(SCENARIO_TIMEOUT, "a blocking connect", move || {
        BlockingClient::connect([address])
    });
    match result {
        Err(error @ ClientError::Connect { .. }) => assert!(error.is_retryable()),
        other => panic!("expected a Connect error, got {other:?}"),
    }
}

#[cfg(feature = "embedded")]
#[test]
fn blocking_embedded_client() {
    on_thread_within(SCENARIO_TIMEOUT, "the blocking embedded scenario", || {
        let client = BlockingClient::embedded(common::test_config(CORE_COUNT))
            .expect("the embedded shards start");
        short_scenario(&client);
        client.shutdown();
        match client.get("blocking:key") {
            Err(ClientError::ShutDown) => {}
            other => panic!("expected ShutDown after shutdown(), got {other:?}"),
        }
    });
}

/// A lease held through a blocking client is renewed while the caller does nothing, and its
/// lock and fenced writes work the same as through the async client.
#[test]
fn blocking_leases_are_renewed_between_calls() {
    let server = start_server(CORE_COUNT);
    let addresses = server.addresses();
    on_thread_within(SCENARIO_TIMEOUT, "blocking leases", move || {
        let client = BlockingClient::connect(addresses).expect("connect");
        let lease = client.lease(Duration::from_millis(300)).expect("grant");
        client
            .put_with("{b}leased", "v", PutOptions::new().lease(lease.id()))
            .expect("put");
        let grant = client
            .lock("{b}lock", lease.id(), Duration::ZERO)
            .expect("lock")
            .expect("free");
        // No call for several TTLs: only the background renewal keeps the lease.
        std::thread::sleep(Duration::from_millis(1_200));
        assert!(lease.is_alive());
        assert!(client.get("{b}leased").expect("get").is_some());
        assert!(client
            .put_fenced("{b}data", "x", "{b}lock", grant.token)
            .expect("fenced put"));
        let info = client.lease_info(lease.id()).expect("info").expect("alive");
        assert_eq!(info.keys, vec![b"{b}leased".to_vec()]);
        assert!(client.leases().expect("list").contains(&lease.id()));
        drop(lease);
        std::thread::sleep(Duration::from_millis(700));
        assert_eq!(client.get("{b}leased").expect("get"), None);
        assert!(
            !client.unlock("{b}lock", grant.token).expect("unlock"),
            "released"
        );
    });
    stop_server(server);
}
