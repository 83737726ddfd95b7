//! A cluster of three nodes with two cores each, in this process, on 127.0.0.1, 127.0.0.2 and
//! 127.0.0.3: keys land on the node and core that own them, a changed topology is followed
//! through `WrongShard` without an error reaching the caller, a stopped (or silent) node
//! fails only its own keys, fast and typed, until it returns, the nodes' failure detectors
//! report it, and scans and watches span every node.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tessera_client::{
    Client, ClientConfig, ClientError, KeyRange, NodeState, ScanOptions, WatchMessage, WatchOptions,
};
use tessera_protocol::RouteTable;
use tessera_server::config::{ClusterConfig, ClusterNode, Durability};
use tessera_server::{Config, Server};

use common::{free_port_run, within, CALL_TIMEOUT, TEST_MEMORY_BYTES_MAX};

const NODE_COUNT: u32 = 3;
const CORES_PER_NODE: usize = 2;
/// The detectors' timeout: short, so the tests see a node go down quickly.
const FAILURE_TIMEOUT_MS: u64 = 600;

/// Three nodes on their own loopback addresses, each startable and stoppable.
struct Cluster {
    configs: Vec<Config>,
    servers: Vec<Option<Server>>,
}

impl Cluster {
    /// Nodes 1..=3 on 127.0.0.1..=3, slots assigned in `order` (node ids), at `epoch`.
    fn start(epoch: u64) -> Self {
        let hosts: Vec<String> = (1..=NODE_COUNT).map(|id| format!("127.0.0.{id}")).collect();
        let ports: Vec<(u16, u16)> = hosts
            .iter()
            .map(|host| {
                let cores = u16::try_from(CORES_PER_NODE).expect("fits");
                (free_port_run(host, cores), free_port_run(host, 1))
            })
            .collect();
        let nodes = (1..=NODE_COUNT)
            .zip(&hosts)
            .zip(&ports)
            .map(|((id, host), &(port, peer_port))| ClusterNode {
                id,
                name: format!("node-{id}"),
                host: host.clone(),
                port,
                cores: CORES_PER_NODE,
                peer_port: Some(peer_port),
                admin_port: None,
            })
            .collect::<Vec<_>>();
        let cluster = ClusterConfig {
            epoch,
            heartbeat_interval_ms: 100,
            failure_timeout_ms: FAILURE_TIMEOUT_MS,
            nodes,
        };
        let configs = cluster
            .nodes
            .iter()
            .map(|node| Config {
                name: node.name.clone(),
                node_id: node.id,
                host: node.host.clone(),
                port: node.port,
                cores: CORES_PER_NODE,
                peer_port: node.peer_port,
                admin_port: Some(0),
                cluster: Some(cluster.clone()),
                memory_bytes_max: TEST_MEMORY_BYTES_MAX,
                durability: Durability::Memory,
                shutdown_timeout_ms: 1_000,
                ..Config::default()
            })
            .collect();
        let mut started = Self {
            configs,
            servers: Vec::new(),
        };
        started.servers = (0..started.configs.len())
            .map(|index| Some(started.start_node(index)))
            .collect();
        started
    }

    fn start_node(&self, index: usize) -> Server {
        Server::start(self.configs[index].clone())
            .unwrap_or_else(|error| panic!("node {} did not start: {error}", index + 1))
    }

    fn stop(&mut self, index: usize) {
        if let Some(server) = self.servers[index].take() {
            common::stop_server(server);
        }
    }

    fn restart(&mut self, index: usize) {
        self.stop(index);
        self.servers[index] = Some(self.start_node(index));
    }

    /// Stops every node and starts it again with the cluster's slots assigned in `order`
    /// at `epoch`.
    fn reassign(&mut self, epoch: u64, order: &[u32]) {
        for index in 0..self.servers.len() {
            self.stop(index);
        }
        for config in &mut self.configs {
            let cluster = config.cluster.as_mut().expect("a cluster");
            cluster.epoch = epoch;
            cluster.nodes.sort_by_key(|node| {
                order
                    .iter()
                    .position(|&id| id == node.id)
                    .expect("every node is ordered")
            });
        }
        self.servers = (0..self.configs.len())
            .map(|index| Some(self.start_node(index)))
            .collect();
    }

    fn first_address(&self) -> String {
        let config = &self.configs[0];
        format!("{}:{}", config.host, config.port)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for server in self.servers.iter_mut().filter_map(Option::take) {
            let _ = server.shutdown();
        }
    }
}

/// Runs `change` on a blocking thread (servers start and stop synchronously).
async fn change(
    mut cluster: Cluster,
    change: impl FnOnce(&mut Cluster) + Send + 'static,
) -> Cluster {
    tokio::task::spawn_blocking(move || {
        change(&mut cluster);
        cluster
    })
    .await
    .expect("the change did not panic")
}

/// The body of `GET /metrics` from an admin endpoint.
fn scrape_metrics(address: std::net::SocketAddr) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(address).expect("connect to the admin port");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("a timeout");
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: tessera\r\nConnection: close\r\n\r\n")
        .expect("send the request");
    let mut answer = String::new();
    stream.read_to_string(&mut answer).expect("read the answer");
    answer
}

/// A client of short timeouts, bootstrapped from node 1 only.
async fn connect(cluster: &Cluster) -> Client {
    let mut config = ClientConfig::new([cluster.first_address()]);
    config.connect_timeout = Duration::from_secs(1);
    config.request_timeout = Duration::from_secs(5);
    config.liveness_timeout = Duration::from_millis(500);
    config.reconnect_backoff_base = Duration::from_millis(20);
    config.reconnect_backoff_max = Duration::from_millis(300);
    within(CALL_TIMEOUT, "connect", Client::connect_with(config))
        .await
        .expect("the cluster accepts the handshake")
}

/// Keys `prefix{i}` for `0..count`, grouped by the node id that owns them.
fn keys_by_node(client: &Client, prefix: &str, count: usize) -> Vec<(u32, String)> {
    let topology = client.topology();
    let routes = RouteTable::new(&topology).expect("a valid topology");
    (0..count)
        .map(|index| {
            let key = format!("{prefix}{index}");
            let owner = routes.owner_of_key(key.as_bytes());
            let node_id = topology
                .node(owner)
                .expect("the owner is in the topology")
                .node_id;
            (node_id, key)
        })
        .collect()
}

/// Polls `check` every 20 ms until it holds, failing after `limit`; returns the time taken.
async fn eventually(limit: Duration, what: &str, mut check: impl AsyncFnMut() -> bool) -> Duration {
    let started = Instant::now();
    while !check().await {
        assert!(started.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_land_on_the_node_and_core_that_own_them() {
    let cluster = tokio::task::spawn_blocking(|| Cluster::start(1))
        .await
        .expect("started");
    let client = connect(&cluster).await;
    let topology = client.topology();
    assert_eq!(topology.nodes.len(), 3, "node 1 serves the whole cluster");
    assert_eq!(topology.shard_count(), 6);
    let routes = RouteTable::new(&topology).expect("valid");
    let mut expected_per_core = std::collections::HashMap::new();
    for index in 0..300 {
        let key = format!("user:{index}");
        client.put(&key, "v").await.expect("put");
        let (entry, shard) = client.get_with_revision(&key).await.expect("get");
        assert!(entry.is_some());
        let owner = routes.owner_of_key(key.as_bytes());
        let node_id = topology.node(owner).expect("in the topology").node_id;
        assert_eq!(
            (shard.node_id, shard.core_id),
            (node_id, owner.core_index),
            "{key} answered by the node and core the route table names"
        );
        *expected_per_core
            .entry((node_id, owner.core_index))
            .or_insert(0_u64) += 1;
    }
    let core_stats = client.stats().await.expect("every core answers");
    assert_eq!(core_stats.len(), 6);
    for core in &core_stats {
        assert_eq!(
            core.key_count,
            expected_per_core
                .get(&(core.node_id, core.core_id))
                .copied()
                .unwrap_or(0),
            "node {} core {} holds exactly its keys",
            core.node_id,
            core.core_id
        );
    }
    // Every node hears every other.
    eventually(Duration::from_secs(10), "all nodes up", async || {
        let status = client.cluster_status().await.expect("status");
        status.nodes.iter().all(|node| {
            node.state == NodeState::Up
                && node.seen_by.len() == 2
                && node
                    .seen_by
                    .iter()
                    .all(|(_, seen)| seen.state == NodeState::Up)
        })
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_topology_is_followed_without_errors() {
    let cluster = tokio::task::spawn_blocking(|| Cluster::start(1))
        .await
        .expect("started");
    let client = connect(&cluster).await;
    let before = keys_by_node(&client, "moving:", 200);
    for (_, key) in &before {
        client.put(key, "epoch 1").await.expect("put");
    }
    // Every slot moves: node 3's slots come first now, then node 1's, then node 2's.
    let cluster = change(cluster, |cluster| cluster.reassign(2, &[3, 1, 2])).await;
    // Let the client's readers see the old connections close.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(client.topology().epoch, 1, "the client has not looked yet");
    for (_, key) in &before {
        client
            .put(key, "epoch 2")
            .await
            .unwrap_or_else(|error| panic!("put {key} after the change: {error}"));
        let entry = client.get(key).await.expect("get").expect("just written");
        assert_eq!(entry.value, b"epoch 2");
    }
    assert_eq!(client.topology().epoch, 2, "followed WrongShard to epoch 2");
    let after = keys_by_node(&client, "moving:", 200);
    let moved = before
        .iter()
        .zip(&after)
        .filter(|((old, _), (new, _))| old != new)
        .count();
    assert!(moved > 100, "most keys changed node ({moved} of 200)");
    // Batches are split by the new owners too.
    let keys: Vec<&str> = before.iter().map(|(_, key)| key.as_str()).collect();
    let values = client.mget(&keys).await.expect("mget");
    assert!(values.iter().all(Option::is_some));
    drop(cluster);
}

/// Puts every key of `keys` and returns how many failed, checking every failure is typed as
/// a node failure and quick.
async fn put_all(client: &Client, keys: &[(u32, String)], down: Option<u32>) -> usize {
    let mut failed = 0;
    for (node_id, key) in keys {
        let started = Instant::now();
        match client.put(key, "x").await {
            Ok(_) => assert_ne!(Some(*node_id), down, "{key} on the stopped node succeeded"),
            Err(error) => {
                assert_eq!(Some(*node_id), down, "{key} on a live node failed: {error}");
                assert!(error.is_node_failure(), "{key}: {error:?}");
                assert!(
                    started.elapsed() < Duration::from_secs(3),
                    "{key} failed after {:?}, not fast",
                    started.elapsed()
                );
                failed += 1;
            }
        }
    }
    failed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_node_fails_only_its_keys_and_recovers() {
    let cluster = tokio::task::spawn_blocking(|| Cluster::start(1))
        .await
        .expect("started");
    let client = connect(&cluster).await;
    let keys = keys_by_node(&client, "k", 90);
    assert_eq!(put_all(&client, &keys, None).await, 0);
    let cluster = change(cluster, |cluster| cluster.stop(2)).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let on_node_3 = keys.iter().filter(|(node_id, _)| *node_id == 3).count();
    assert!(on_node_3 > 10);
    assert_eq!(put_all(&client, &keys, Some(3)).await, on_node_3);
    // Once marked down, its keys fail at once with `Unavailable`.
    let (_, key) = keys.iter().find(|(node_id, _)| *node_id == 3).expect("one");
    let error = client.put(key, "x").await.expect_err("node 3 is down");
    assert!(
        matches!(error, ClientError::Unavailable { .. }),
        "{error:?}"
    );
    assert!(error.is_retryable(), "nothing was sent");
    // The other nodes' detectors report it down.
    let detected = eventually(
        Duration::from_secs(10),
        "node 3 reported down",
        async || {
            let status = client.cluster_status().await.expect("status");
            status.nodes[2].state == NodeState::Down
                && status.nodes[2]
                    .seen_by
                    .iter()
                    .all(|(_, seen)| seen.state == NodeState::Down)
        },
    )
    .await;
    assert!(detected < Duration::from_secs(5), "{detected:?}");
    // Node 1's metrics say so too, for alerting.
    let admin = cluster.servers[0]
        .as_ref()
        .and_then(Server::admin_address)
        .expect("node 1 serves metrics");
    let metrics = scrape_metrics(admin);
    assert!(
        metrics.contains("tessera_peer_up{node=\"3\"} 0"),
        "{metrics}"
    );
    assert!(
        metrics.contains("tessera_peer_up{node=\"2\"} 1"),
        "{metrics}"
    );
    let cluster = change(cluster, |cluster| cluster.restart(2)).await;
    // Every key of the node works again, whichever core it is on.
    eventually(
        Duration::from_secs(10),
        "node 3's keys work again",
        async || {
            for (_, key) in keys.iter().filter(|(node_id, _)| *node_id == 3) {
                if client.put(key, "back").await.is_err() {
                    return false;
                }
            }
            true
        },
    )
    .await;
    assert_eq!(put_all(&client, &keys, None).await, 0);
    eventually(Duration::from_secs(10), "node 3 reported up", async || {
        let status = client.cluster_status().await.expect("status");
        status.nodes.iter().all(|node| node.state == NodeState::Up)
    })
    .await;
    drop(cluster);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_node_is_marked_down_instead_of_hanging() {
    let cluster = tokio::task::spawn_blocking(|| Cluster::start(1))
        .await
        .expect("started");
    let client = connect(&cluster).await;
    let keys = keys_by_node(&client, "s", 60);
    assert_eq!(put_all(&client, &keys, None).await, 0);
    // Node 3 stops, and something takes its ports that accepts connections and never
    // answers: a hung process, a host behind a black hole.
    let config = cluster.configs[2].clone();
    let cluster = change(cluster, |cluster| cluster.stop(2)).await;
    let silent: Vec<std::net::TcpListener> = (0..CORES_PER_NODE)
        .map(|core| {
            let port = config.port + u16::try_from(core).expect("fits");
            std::net::TcpListener::bind((config.host.as_str(), port)).expect("bind the silent port")
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (_, key) = keys.iter().find(|(node_id, _)| *node_id == 3).expect("one");
    let started = Instant::now();
    let first = client.put(key, "x").await.expect_err("nobody answers");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "the first request gave up after {:?} (liveness timeout 500 ms, request timeout 5 s)",
        started.elapsed()
    );
    assert!(first.is_indeterminate(), "it was sent: {first:?}");
    let started = Instant::now();
    let second = client.put(key, "x").await.expect_err("still down");
    assert!(
        matches!(second, ClientError::Unavailable { .. }),
        "{second:?}"
    );
    assert!(
        started.elapsed() < Duration::from_millis(100),
        "{:?}",
        started.elapsed()
    );
    // The node is down for every one of its cores, not only the one that went silent.
    let topology = client.topology();
    let routes = RouteTable::new(&topology).expect("valid");
    let first_core = routes.owner_of_key(key.as_bytes()).core_index;
    let (_, other_core_key) = keys
        .iter()
        .find(|(node_id, other)| {
            *node_id == 3 && routes.owner_of_key(other.as_bytes()).core_index != first_core
        })
        .expect("a key on node 3's other core");
    let started = Instant::now();
    let other = client.put(other_core_key, "x").await.expect_err("down");
    assert!(
        matches!(other, ClientError::Unavailable { .. }),
        "{other:?}"
    );
    assert!(
        started.elapsed() < Duration::from_millis(100),
        "{:?}",
        started.elapsed()
    );
    // Keys of the other nodes are untouched.
    for (_, key) in keys.iter().filter(|(node_id, _)| *node_id != 3) {
        client.put(key, "y").await.expect("a live node");
    }
    drop(silent);
    let cluster = change(cluster, |cluster| cluster.restart(2)).await;
    eventually(
        Duration::from_secs(10),
        "node 3 answers again",
        async || client.put(key, "back").await.is_ok(),
    )
    .await;
    drop(cluster);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scans_and_watches_span_every_node() {
    let cluster = tokio::task::spawn_blocking(|| Cluster::start(1))
        .await
        .expect("started");
    let client = connect(&cluster).await;
    let keys = keys_by_node(&client, "span:", 120);
    let nodes: BTreeSet<u32> = keys.iter().map(|(node_id, _)| *node_id).collect();
    assert_eq!(nodes.len(), 3, "the keys cover every node");
    let mut watch = client
        .watch(&KeyRange::prefix("span:"), WatchOptions::new())
        .await
        .expect("watch");
    for (_, key) in &keys {
        client.put(key, "v").await.expect("put");
    }
    let scanned = client
        .scan(
            &KeyRange::prefix("span:"),
            ScanOptions::default().limit(1000),
        )
        .await
        .expect("scan");
    let scanned_keys: Vec<String> = scanned
        .items
        .iter()
        .map(|item| String::from_utf8(item.key.clone()).expect("text"))
        .collect();
    let mut expected: Vec<String> = keys.iter().map(|(_, key)| key.clone()).collect();
    expected.sort();
    assert_eq!(
        scanned_keys, expected,
        "every node's keys, merged in key order"
    );
    assert_eq!(
        scanned.revisions.len(),
        6,
        "one revision per core of every node"
    );
    let (count, _) = client
        .count(&KeyRange::prefix("span:"))
        .await
        .expect("count");
    assert_eq!(count, 120);
    let mut seen = BTreeSet::new();
    let mut from_nodes = BTreeSet::new();
    while seen.len() < keys.len() {
        let message = within(CALL_TIMEOUT, "watch events", watch.next())
            .await
            .expect("the watch goes on")
            .expect("no error");
        if let WatchMessage::Events { shard, events } = message {
            from_nodes.insert(shard.node_id);
            for event in events {
                seen.insert(String::from_utf8(event.key).expect("text"));
            }
        }
    }
    assert_eq!(from_nodes, nodes, "events came from every node");
    drop(cluster);
}

/// Runs `tessera cluster status` (with `extra` arguments) against node 1, with a deadline.
fn cluster_status_command(cluster: &Cluster, extra: &[&str]) -> (i32, String) {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_tessera"))
        .env_remove("TESSERA_ENDPOINTS")
        .args([
            "--endpoints",
            &cluster.first_address(),
            "--timeout-ms",
            "2000",
        ])
        .args(extra)
        .args(["cluster", "status"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .expect("the tessera binary starts");
    let deadline = Instant::now() + CALL_TIMEOUT;
    while child.try_wait().expect("pollable").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("tessera cluster status did not exit within {CALL_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let output = child.wait_with_output().expect("its output");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8(output.stdout).expect("text"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_lists_every_node_with_its_state() {
    let mut cluster = tokio::task::spawn_blocking(|| Cluster::start(7))
        .await
        .expect("started");
    let client = connect(&cluster).await;
    eventually(Duration::from_secs(10), "all nodes up", async || {
        let status = client.cluster_status().await.expect("status");
        status.nodes.iter().all(|node| {
            node.seen_by
                .iter()
                .all(|(_, seen)| seen.state == NodeState::Up)
        })
    })
    .await;
    let (code, text) = cluster_status_command(&cluster, &[]);
    assert_eq!(code, 0, "every node is up:\n{text}");
    assert!(text.starts_with("epoch 7\n"), "{text}");
    for id in 1..=3 {
        let line = text
            .lines()
            .find(|line| line.starts_with(&format!("{id} ")))
            .unwrap_or_else(|| panic!("node {id} is listed:\n{text}"));
        assert!(line.contains(&format!("node-{id}")), "{line}");
        assert!(line.contains(" up "), "{line}");
    }
    cluster = change(cluster, |cluster| cluster.stop(1)).await;
    eventually(
        Duration::from_secs(10),
        "node 2 reported down",
        async || {
            let status = client.cluster_status().await.expect("status");
            status.nodes[1].state == NodeState::Down
        },
    )
    .await;
    let (code, text) = cluster_status_command(&cluster, &["-o", "json"]);
    assert_eq!(code, 1, "a node is down:\n{text}");
    let status: serde_json::Value = serde_json::from_str(&text).expect("one JSON value");
    let nodes = status["nodes"].as_array().expect("nodes");
    assert_eq!(nodes[1]["state"], "down", "{text}");
    assert_eq!(nodes[1]["answered"], false, "{text}");
    assert_eq!(nodes[0]["state"], "up", "{text}");
    let seen_by_node_1 = nodes[1]["seen_by"]
        .as_array()
        .expect("views")
        .iter()
        .find(|view| view["observer"] == 1)
        .expect("node 1's view of node 2");
    assert_eq!(seen_by_node_1["state"], "down");
    drop(cluster);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_are_tried_in_order_and_the_topology_is_refreshed_in_the_background() {
    let cluster = tokio::task::spawn_blocking(|| Cluster::start(1))
        .await
        .expect("started");
    let node_2 = format!("{}:{}", cluster.configs[1].host, cluster.configs[1].port);
    // The first endpoint is down: the handshake goes to the next one.
    let mut config = ClientConfig::new([common::unused_address(), node_2]);
    config.connect_timeout = Duration::from_secs(1);
    config.topology_refresh_interval = Some(Duration::from_millis(100));
    let client = within(CALL_TIMEOUT, "connect", Client::connect_with(config))
        .await
        .expect("the second endpoint answers");
    assert_eq!(client.topology().epoch, 1);
    assert_eq!(client.topology().nodes.len(), 3);
    let cluster = change(cluster, |cluster| cluster.reassign(5, &[2, 3, 1])).await;
    // Without a request of its own, the client learns the new assignment.
    eventually(Duration::from_secs(10), "epoch 5 learned", async || {
        client.topology().epoch == 5
    })
    .await;
    assert_eq!(client.topology().nodes[0].node_id, 2);
    drop(cluster);
}

/// A TCP proxy from `listen` to `target` that can freeze: once frozen it forwards nothing,
/// in either direction, on any connection, and keeps every socket open (a host gone silent
/// without closing anything).
struct FreezingProxy {
    frozen: std::sync::Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl FreezingProxy {
    async fn start(listen: String, target: String) -> Self {
        use std::sync::atomic::{AtomicBool, Ordering};
        let listener = tokio::net::TcpListener::bind(&listen)
            .await
            .expect("bind the proxy");
        let frozen = std::sync::Arc::new(AtomicBool::new(false));
        let task_frozen = frozen.clone();
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((inbound, _)) = listener.accept().await {
                let Ok(outbound) = tokio::net::TcpStream::connect(&target).await else {
                    continue;
                };
                let (in_read, in_write) = inbound.into_split();
                let (out_read, out_write) = outbound.into_split();
                for (mut from, mut to, frozen) in [
                    (
                        Box::new(in_read) as Box<dyn tokio::io::AsyncRead + Send + Unpin>,
                        Box::new(out_write) as Box<dyn tokio::io::AsyncWrite + Send + Unpin>,
                        task_frozen.clone(),
                    ),
                    (Box::new(out_read), Box::new(in_write), task_frozen.clone()),
                ] {
                    held.push(tokio::spawn(async move {
                        use tokio::io::{AsyncReadExt, AsyncWriteExt};
                        let mut buffer = vec![0_u8; 64 * 1024];
                        loop {
                            let Ok(read) = from.read(&mut buffer).await else {
                                return;
                            };
                            if read == 0 {
                                return;
                            }
                            // Frozen: what arrives is dropped and nothing closes.
                            while frozen.load(Ordering::Relaxed) {
                                tokio::time::sleep(Duration::from_millis(50)).await;
                            }
                            if to.write_all(&buffer[..read]).await.is_err() {
                                return;
                            }
                        }
                    }));
                }
            }
            drop(held);
        });
        Self { frozen, task }
    }

    fn freeze(&self) {
        self.frozen
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Drop for FreezingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_on_a_node_that_goes_silent_ends_instead_of_hanging() {
    let cluster = tokio::task::spawn_blocking(|| Cluster::start(1))
        .await
        .expect("started");
    // Node 3 moves behind proxies: it listens on 127.0.0.4 and is reached (as the topology
    // says) at 127.0.0.3, where the proxies forward to it.
    let cluster = change(cluster, |cluster| {
        cluster.stop(2);
        cluster.configs[2].advertise_host = Some("127.0.0.3".to_owned());
        cluster.configs[2].host = "127.0.0.4".to_owned();
        cluster.restart(2);
    })
    .await;
    let port = cluster.configs[2].port;
    let mut proxies = Vec::new();
    for core in 0..u16::try_from(CORES_PER_NODE).expect("fits") {
        proxies.push(
            FreezingProxy::start(
                format!("127.0.0.3:{}", port + core),
                format!("127.0.0.4:{}", port + core),
            )
            .await,
        );
    }
    let client = connect(&cluster).await;
    let keys = keys_by_node(&client, "w:", 60);
    let (_, key) = keys.iter().find(|(node_id, _)| *node_id == 3).expect("one");
    let mut options = WatchOptions::new();
    options.resume_attempts_max = 2;
    let mut watch = client
        .watch(&KeyRange::prefix("w:"), options)
        .await
        .expect("watch");
    client.put(key, "v").await.expect("put");
    loop {
        let message = within(CALL_TIMEOUT, "the event", watch.next())
            .await
            .expect("the watch goes on")
            .expect("no error");
        if matches!(message, WatchMessage::Events { shard, .. } if shard.node_id == 3) {
            break;
        }
    }
    // Node 3 goes silent without closing anything, and nothing else is asked of it: only the
    // watch's connection can notice.
    for proxy in &proxies {
        proxy.freeze();
    }
    let started = Instant::now();
    let ended = loop {
        match within(CALL_TIMEOUT, "the watch to notice", watch.next()).await {
            Some(Ok(_)) => {}
            Some(Err(error)) => break error,
            None => panic!("the stream ended without an error"),
        }
    };
    assert!(ended.is_node_failure(), "{ended:?}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "noticed after {:?} (liveness timeout 500 ms, 2 reopen attempts)",
        started.elapsed()
    );
    drop(proxies);
    drop(cluster);
}
