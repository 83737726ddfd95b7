//! Watches through the client, remote and embedded.

mod common;

use std::time::Duration;

use common::{within, CALL_TIMEOUT};
use futures_util::StreamExt;
use tessera_client::{Client, EventKind, KeyRange, WatchMessage, WatchOptions};

macro_rules! scenarios {
    ($($scenario:ident),+ $(,)?) => {
        mod remote {
            use super::common::{self, within, CALL_TIMEOUT, CORE_COUNT, SCENARIO_TIMEOUT};
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    let server = common::start_server(CORE_COUNT);
                    let connect = tessera_client::Client::connect(server.addresses());
                    let client = within(CALL_TIMEOUT, "connect", connect).await.expect("connect");
                    within(SCENARIO_TIMEOUT, stringify!($scenario), super::$scenario(&client)).await;
                    drop(client);
                    common::stop_server(server);
                }
            )+
        }
        #[cfg(feature = "embedded")]
        mod embedded {
            use super::common::{self, within, CORE_COUNT, SCENARIO_TIMEOUT};
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    let client = tessera_client::Client::embedded(common::test_config(CORE_COUNT))
                        .expect("the embedded shards start");
                    within(SCENARIO_TIMEOUT, stringify!($scenario), super::$scenario(&client)).await;
                    client.shutdown();
                }
            )+
        }
    };
}

scenarios!(prefix_watch_sees_puts_and_deletes);

async fn next(watch: &mut tessera_client::Watch) -> WatchMessage {
    within(CALL_TIMEOUT, "watch message", watch.next())
        .await
        .expect("the stream goes on")
        .expect("no error")
}

async fn prefix_watch_sees_puts_and_deletes(client: &Client) {
    client.put("w/0", "before").await.unwrap();
    let mut watch = client
        .watch(
            &KeyRange::prefix("w/"),
            WatchOptions::new().snapshot().previous(),
        )
        .await
        .unwrap();
    let mut snapshot_keys = Vec::new();
    for _ in 0..2 {
        match next(&mut watch).await {
            WatchMessage::Snapshot { items, .. } => {
                snapshot_keys.extend(items.into_iter().map(|item| item.key));
            }
            other => panic!("expected snapshots first, got {other:?}"),
        }
    }
    assert_eq!(snapshot_keys, vec![b"w/0".to_vec()]);
    client.put("w/1", "one").await.unwrap();
    client.put("x/1", "outside").await.unwrap();
    client.delete("w/0").await.unwrap();
    let mut seen = Vec::new();
    while seen.len() < 2 {
        match next(&mut watch).await {
            WatchMessage::Events { events, .. } => {
                for event in events {
                    seen.push((
                        String::from_utf8(event.key).unwrap(),
                        event.kind,
                        event.previous,
                    ));
                }
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    seen.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(seen[0].0, "w/0");
    assert_eq!(seen[0].1, EventKind::Deleted);
    assert_eq!(seen[0].2.as_deref(), Some(&b"before"[..]));
    assert_eq!(seen[1].0, "w/1");
    assert!(matches!(seen[1].1, EventKind::Put { version: 1, .. }));
    watch.request_progress();
    let mut progress = 0;
    while progress < 2 {
        if let WatchMessage::Progress(_) = next(&mut watch).await {
            progress += 1;
        }
    }
    let _ = Duration::ZERO;
}
