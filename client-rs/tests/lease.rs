//! Leases through the client, run against a server on loopback (`remote::*`) and embedded
//! shards (`embedded::*`): keys attached on the lease's home shard and on the other one,
//! deleted together when the lease is revoked or expires; background renewal; the lease's
//! state and the keys attached to it.
//!
//! Which shard is a lease's home comes from its id (`LeaseId`), which shard owns a key from
//! the topology (`common::core_of_key`); the keys are picked so that both shards hold some.

#[macro_use]
mod common;

use std::time::Duration;

use common::core_of_key;
use tessera_client::{AddOptions, Client, ClientError, ErrorCode, PutOptions};
use tessera_protocol::LeaseId;

scenarios!(
    revoking_deletes_attached_keys_on_every_shard,
    an_unrenewed_lease_expires_with_its_keys,
    a_kept_lease_outlives_its_ttl,
    a_dead_lease_is_refused,
    a_put_without_the_lease_detaches_the_key,
);

/// `count` keys with `prefix`, at least one on each of the two shards.
fn keys_on_both_shards(client: &Client, prefix: &str, count: usize) -> Vec<String> {
    let topology = client.topology();
    let keys: Vec<String> = (0..count).map(|index| format!("{prefix}{index}")).collect();
    let cores: std::collections::BTreeSet<usize> = keys
        .iter()
        .map(|key| core_of_key(&topology, key.as_bytes()))
        .collect();
    assert_eq!(cores.len(), 2, "keys {keys:?} land on one shard only");
    keys
}

async fn revoking_deletes_attached_keys_on_every_shard(client: &Client) {
    let lease = client.lease(Duration::from_secs(30)).await.unwrap();
    let home = LeaseId(lease.id()).core_id();
    let keys = keys_on_both_shards(client, "revoke/", 8);
    for key in &keys {
        client
            .put_with(key, "v", PutOptions::new().lease(lease.id()))
            .await
            .unwrap();
    }
    client.put("revoke/unleased", "stays").await.unwrap();
    let info = client.lease_info(lease.id()).await.unwrap().expect("alive");
    let mut expected: Vec<Vec<u8>> = keys.iter().map(|key| key.as_bytes().to_vec()).collect();
    expected.sort();
    assert_eq!(info.keys, expected, "home core {home}");
    assert!(client.leases().await.unwrap().contains(&lease.id()));
    assert!(lease.revoke(client).await.unwrap());
    for key in &keys {
        assert_eq!(
            client.get(key).await.unwrap(),
            None,
            "{key} outlived its lease"
        );
    }
    assert!(client.get("revoke/unleased").await.unwrap().is_some());
    assert_eq!(client.lease_info(info.id).await.unwrap(), None);
    assert!(
        !client.revoke_lease(info.id).await.unwrap(),
        "revoked twice"
    );
}

async fn an_unrenewed_lease_expires_with_its_keys(client: &Client) {
    let id = client
        .grant_lease(Duration::from_millis(300))
        .await
        .unwrap();
    let keys = keys_on_both_shards(client, "expire/", 8);
    for key in &keys {
        client
            .put_with(key, "v", PutOptions::new().lease(id))
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    for key in &keys {
        assert_eq!(
            client.get(key).await.unwrap(),
            None,
            "{key} outlived its lease"
        );
    }
    assert_eq!(client.keepalive(&[id]).await.unwrap(), vec![None]);
}

async fn a_kept_lease_outlives_its_ttl(client: &Client) {
    let lease = client.lease(Duration::from_millis(300)).await.unwrap();
    let keys = keys_on_both_shards(client, "kept/", 8);
    for key in &keys {
        client
            .put_with(key, "v", PutOptions::new().lease(lease.id()))
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    assert!(lease.is_alive());
    for key in &keys {
        assert!(client.get(key).await.unwrap().is_some(), "{key} lost");
    }
    let id = lease.id();
    drop(lease);
    tokio::time::sleep(Duration::from_millis(800)).await;
    for key in &keys {
        assert_eq!(
            client.get(key).await.unwrap(),
            None,
            "{key} outlived its lease"
        );
    }
    assert_eq!(client.lease_info(id).await.unwrap(), None);
}

async fn a_dead_lease_is_refused(client: &Client) {
    let id = client.grant_lease(Duration::from_secs(30)).await.unwrap();
    assert!(client.revoke_lease(id).await.unwrap());
    for key in keys_on_both_shards(client, "dead/", 8) {
        let refused = client
            .put_with(&key, "v", PutOptions::new().lease(id))
            .await;
        assert!(
            matches!(
                &refused,
                Err(ClientError::Server {
                    code: ErrorCode::LeaseNotFound,
                    ..
                })
            ),
            "{key}: {refused:?}"
        );
        assert_eq!(client.get(&key).await.unwrap(), None);
    }
}

async fn a_put_without_the_lease_detaches_the_key(client: &Client) {
    let lease = client.lease(Duration::from_secs(30)).await.unwrap();
    let keys = keys_on_both_shards(client, "detach/", 8);
    for key in &keys {
        client
            .put_with(key, "leased", PutOptions::new().lease(lease.id()))
            .await
            .unwrap();
        client.put(key, "free").await.unwrap();
    }
    let info = client.lease_info(lease.id()).await.unwrap().expect("alive");
    assert!(info.keys.is_empty(), "{:?}", info.keys);
    assert!(lease.revoke(client).await.unwrap());
    for key in &keys {
        assert_eq!(
            client.get(key).await.unwrap().map(|entry| entry.value),
            Some(b"free".to_vec())
        );
    }
}

/// A durable server restarted: the lease comes back with its full TTL (not its deadline),
/// its keys on both shards come back attached, and revoking it then deletes them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_leases_come_back_after_a_restart() {
    common::within(
        common::SCENARIO_TIMEOUT,
        "leases across a restart",
        leases_across_a_restart(),
    )
    .await;
}

async fn leases_across_a_restart() {
    let config = common::test_config(common::CORE_COUNT);
    let mut server = common::DurableServer::start("lease-restart", config).await;
    let client = Client::connect(server.addresses()).await.unwrap();
    // A TTL shorter than the test: it survives only because the restart grants it again.
    let ttl = Duration::from_millis(1_500);
    let id = client.grant_lease(ttl).await.unwrap();
    let keys = keys_on_both_shards(&client, "restart/", 8);
    for key in &keys {
        client
            .put_with(key, "v", PutOptions::new().lease(id))
            .await
            .unwrap();
    }
    // A counter in a fixed window: its value and its window's end survive too.
    let window = AddOptions::new().max(10).ttl(Duration::from_secs(60));
    client
        .add_with("restart/counter", 3, window.clone())
        .await
        .unwrap();
    let counted = client
        .get("restart/counter")
        .await
        .unwrap()
        .expect("counted");
    tokio::time::sleep(Duration::from_secs(1)).await;
    server.restart().await;
    let recounted = client.get("restart/counter").await.unwrap().expect("kept");
    assert_eq!(recounted, counted, "value, revisions and expiry come back");
    assert_eq!(
        client
            .add_with("restart/counter", 8, window)
            .await
            .map_err(|error| error.code()),
        Err(Some(ErrorCode::OutOfRange)),
        "the bound still holds"
    );
    let info = client
        .lease_info(id)
        .await
        .unwrap()
        .expect("the lease came back");
    assert_eq!(info.ttl, ttl);
    assert!(
        info.remaining > Duration::from_secs(1),
        "a full TTL again, {:?} left",
        info.remaining
    );
    assert_eq!(info.keys.len(), keys.len());
    let next = client.grant_lease(ttl).await.unwrap();
    assert_ne!(next, id, "ids are not reused after a restart");
    assert!(client.revoke_lease(id).await.unwrap());
    for key in &keys {
        assert_eq!(
            client.get(key).await.unwrap(),
            None,
            "{key} outlived its lease"
        );
    }
    drop(client);
    server.stop().await;
}
