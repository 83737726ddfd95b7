//! What only an embedded client does: it owns its shards, so `shutdown()` stops them, after
//! which every clone's calls fail with `ShutDown`, and calls in flight end without hanging.
//! (Everything an embedded client shares with a remote one is in `behaviour.rs`.)

#![cfg(feature = "embedded")]

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{test_config, within, CALL_TIMEOUT, CORE_COUNT};
use tessera_client::{Client, ClientError, Entry, ErrorCode};

fn start_embedded() -> Client {
    Client::embedded(test_config(CORE_COUNT)).expect("the embedded shards start")
}

/// Checks that `result` failed because the client was shut down.
fn assert_shut_down<T: std::fmt::Debug>(what: &str, result: Result<T, ClientError>) {
    match result {
        Err(error @ ClientError::ShutDown) => {
            assert!(!error.is_retryable(), "{what}: {error:?}");
            assert!(!error.is_indeterminate(), "{what}: {error:?}");
        }
        other => panic!("{what}: expected ShutDown, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_topology_names_in_process_cores() {
    let client = start_embedded();
    let topology = client.topology();
    assert_eq!(topology.nodes.len(), 1);
    let addresses: Vec<&str> = topology.nodes[0]
        .cores
        .iter()
        .map(|core| core.address.as_str())
        .collect();
    assert_eq!(addresses, ["embedded:0", "embedded:1"]);
    client.refresh_topology().await.unwrap();
    assert_eq!(
        client.topology(),
        topology,
        "an embedded topology never changes"
    );
    client.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_after_shutdown_fail_on_every_clone() {
    let client = start_embedded();
    let clone = client.clone();
    client.put("shutdown:key", "v").await.unwrap();
    client.shutdown();
    assert_shut_down("get", client.get("shutdown:key").await);
    assert_shut_down("put on a clone", clone.put("shutdown:key", "w").await);
    assert_shut_down("mget on a clone", clone.mget(&["a", "b", "c"]).await);
    assert_shut_down("ping", client.ping().await);
    assert_shut_down("stats", client.stats().await);
    // Shutting down twice is harmless.
    clone.shutdown();
    assert_shut_down(
        "get after a second shutdown",
        clone.get("shutdown:key").await,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_in_flight_at_shutdown_end() {
    const WRITER_COUNT: usize = 4;
    let client = start_embedded();
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
    let stopping = tokio::task::spawn_blocking(move || client.shutdown());
    within(CALL_TIMEOUT, "the embedded shutdown", stopping)
        .await
        .unwrap();
    for writer in writers {
        let error = within(CALL_TIMEOUT, "a writer to see the shutdown", writer)
            .await
            .expect("the writer does not panic");
        match &error {
            ClientError::ShutDown
            | ClientError::Server {
                code: ErrorCode::ShuttingDown,
                ..
            } => {}
            other => panic!("unexpected error at shutdown: {other:?}"),
        }
    }
}

/// The entries of `keys`, failing the test if one is missing.
async fn entries_of(client: &Client, keys: &[&str]) -> Vec<Entry> {
    let entries = within(CALL_TIMEOUT, "an mget", client.mget(keys))
        .await
        .unwrap();
    keys.iter()
        .zip(entries)
        .map(|(key, entry)| entry.unwrap_or_else(|| panic!("{key} was written")))
        .collect()
}

/// With a data directory an embedded client is as durable as a server: what it wrote is
/// there after it is shut down and opened again (through a snapshot and the log after it),
/// with each key's create and mod revisions and count of writes; revisions continue, and the
/// counter kept counting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_mode_with_a_data_directory_keeps_its_data_across_restarts() {
    let data_dir =
        std::env::temp_dir().join(format!("tessera-embedded-durable-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data_dir);
    let config = || {
        let mut config = test_config(CORE_COUNT);
        config.durability = tessera_server::config::Durability::Sync;
        config.data_dir = data_dir.clone();
        // Small enough that the writes below take snapshots and truncate the log.
        config.snapshot_log_bytes = 64 * 1024;
        config.segment_bytes_max = 1024 * 1024;
        config
    };
    let value = vec![b'v'; 512];
    let client = Client::embedded(config()).expect("the embedded shards start");
    // Written twice before the bulk of the writes, so a snapshot holds it.
    for round in ["first", "second"] {
        within(CALL_TIMEOUT, "a call", client.put("early", round))
            .await
            .unwrap();
    }
    for index in 0..2000 {
        within(
            CALL_TIMEOUT,
            "a call",
            client.put(format!("key-{index}"), &value),
        )
        .await
        .unwrap();
    }
    within(CALL_TIMEOUT, "a call", client.add("counter", 5))
        .await
        .unwrap();
    let revision_before = within(CALL_TIMEOUT, "a call", client.put("last", "one"))
        .await
        .unwrap()
        .mod_revision;
    let kept_keys = ["early", "counter", "last"];
    let entries_before = entries_of(&client, &kept_keys).await;
    assert_eq!(entries_before[0].version, 2, "{entries_before:?}");
    assert!(
        entries_before[0].create_revision < entries_before[0].mod_revision,
        "{entries_before:?}"
    );
    assert_eq!(entries_before[1].version, 1, "{entries_before:?}");
    assert_eq!(entries_before[2].mod_revision, revision_before);
    client.shutdown();
    drop(client);
    let snapshot_count = (0..CORE_COUNT)
        .flat_map(|core| std::fs::read_dir(data_dir.join(format!("core-{core}"))).unwrap())
        .filter(|entry| {
            entry
                .as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .ends_with(".snap")
        })
        .count();
    assert!(snapshot_count >= CORE_COUNT, "{snapshot_count} snapshots");

    let client = Client::embedded(config()).expect("the embedded shards start again");
    assert_eq!(
        entries_of(&client, &kept_keys).await,
        entries_before,
        "the keys keep their revisions and versions"
    );
    for index in 0..2000 {
        let entry = within(CALL_TIMEOUT, "a call", client.get(format!("key-{index}")))
            .await
            .unwrap();
        assert_eq!(
            entry.map(|entry| entry.value),
            Some(value.clone()),
            "key-{index}"
        );
    }
    assert_eq!(
        within(CALL_TIMEOUT, "a call", client.add("counter", 1))
            .await
            .unwrap(),
        6
    );
    let revision_after = within(CALL_TIMEOUT, "a call", client.put("last", "two"))
        .await
        .unwrap()
        .mod_revision;
    assert!(
        revision_after > revision_before,
        "{revision_after} after {revision_before}"
    );
    let entries_after = entries_of(&client, &kept_keys[1..]).await;
    for (after, before) in entries_after.iter().zip(&entries_before[1..]) {
        assert_eq!(after.create_revision, before.create_revision, "{after:?}");
        assert_eq!(
            after.version, 2,
            "one more write after the restart: {after:?}"
        );
    }
    client.shutdown();
    drop(client);
    let _ = std::fs::remove_dir_all(&data_dir);
}
