//! What the client's integration tests share: servers started in-process on free loopback
//! ports, the configuration of embedded clients, a scripted fake server ([`fake_server`]) for
//! failures a real one never shows, and time limits that turn a hang into a failure.
//!
//! Every test server uses a small, fixed memory budget, so the tests do not depend on the
//! host's RAM. Each test binary uses a different subset of these helpers.

#![allow(
    dead_code,
    reason = "each test binary uses a different subset of the helpers"
)]

pub mod fake_server;

use std::future::Future;
use std::hash::{BuildHasher, RandomState};
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::Duration;

use tessera_protocol::{SlotRange, Topology};
use tessera_server::{Config, Server};

/// Generates, for each `scenario => config`, a test against a server started with `config()`
/// (`remote::<scenario>`) and, with the `embedded` feature, one against embedded shards with
/// the same configuration (`embedded::<scenario>`). Without `=> config`, every scenario runs
/// with [`test_config`] of [`CORE_COUNT`] cores. A scenario is an `async fn(&Client)`; the
/// invoking file declares `#[macro_use] mod common;`.
#[allow(
    unused_macros,
    reason = "each test binary uses a different subset of the helpers"
)]
macro_rules! scenarios {
    ($($scenario:ident),+ $(,)?) => {
        /// The configuration of every scenario in this file.
        fn scenario_config() -> tessera_server::Config {
            common::test_config(common::CORE_COUNT)
        }

        scenarios!($($scenario => scenario_config),+);
    };
    ($($scenario:ident => $config:ident),+ $(,)?) => {
        /// Scenarios against a two-core server on loopback.
        mod remote {
            use super::common::{self, within, CALL_TIMEOUT, SCENARIO_TIMEOUT};

            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    let server = tessera_server::Server::start(super::$config())
                        .unwrap_or_else(|error| panic!("test server did not start: {error}"));
                    let connect = tessera_client::Client::connect(server.addresses());
                    let client = within(CALL_TIMEOUT, "connect", connect)
                        .await
                        .expect("the test server accepts the handshake");
                    let scenario = super::$scenario(&client);
                    within(SCENARIO_TIMEOUT, stringify!($scenario), scenario).await;
                    // Close the connections first, so the server has nothing to wait for.
                    drop(client);
                    common::stop_server(server);
                }
            )+
        }

        /// Scenarios against two cores embedded in the test process.
        #[cfg(feature = "embedded")]
        mod embedded {
            use super::common::{within, SCENARIO_TIMEOUT};

            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    let client = tessera_client::Client::embedded(super::$config())
                        .expect("the embedded shards start");
                    let scenario = super::$scenario(&client);
                    within(SCENARIO_TIMEOUT, stringify!($scenario), scenario).await;
                    client.shutdown();
                }
            )+
        }
    };
}

/// Cores of every test server and embedded client: enough that keys spread over two shards.
pub const CORE_COUNT: usize = 2;

/// Longest one client call (or one group of calls a test awaits together) may take before
/// the test fails. Generous, because tests run in parallel on small machines.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(20);

/// Longest one whole scenario may take, sleeps and all.
pub const SCENARIO_TIMEOUT: Duration = Duration::from_secs(60);

/// Memory budget of test servers: small and fixed.
pub const TEST_MEMORY_BYTES_MAX: u64 = 256 * 1024 * 1024;

/// A server configuration with `core_count` cores, each on a free loopback port.
pub fn test_config(core_count: usize) -> Config {
    Config {
        cores: core_count,
        port: 0,
        memory_bytes_max: TEST_MEMORY_BYTES_MAX,
        // In memory unless a test says otherwise: the durable tests give each server a
        // directory of its own.
        durability: tessera_server::config::Durability::Memory,
        ..Config::default()
    }
}

/// Starts a server with `core_count` cores on free loopback ports.
pub fn start_server(core_count: usize) -> Server {
    Server::start(test_config(core_count))
        .unwrap_or_else(|start_error| panic!("test server did not start: {start_error}"))
}

/// Stops `server` and checks that every core stopped cleanly.
pub fn stop_server(server: Server) {
    let summaries = server
        .shutdown()
        .unwrap_or_else(|server_error| panic!("test server stopped abnormally: {server_error}"));
    assert_eq!(summaries.len(), CORE_COUNT, "summaries={summaries:?}");
}

/// Awaits `future`, failing the test with `what` if it takes longer than `limit`.
pub async fn within<F: Future>(limit: Duration, what: &str, future: F) -> F::Output {
    tokio::time::timeout(limit, future)
        .await
        .unwrap_or_else(|elapsed| panic!("{what} did not finish within {limit:?} ({elapsed})"))
}

/// A loopback address with nothing listening on it: a port the OS just handed out and took
/// back. Another process could claim it in between, which is unlikely enough for a test.
pub fn unused_address() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free loopback port");
    let address = listener
        .local_addr()
        .expect("a bound listener has an address");
    drop(listener);
    address.to_string()
}

/// Runs the blocking `work` on its own thread, failing the test with `what` if it takes
/// longer than `limit`. A hung thread is left behind; the failing test ends the process.
pub fn on_thread_within<T, F>(limit: Duration, what: &str, work: F) -> T
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let (sender, receiver) = mpsc::channel();
    let thread = std::thread::spawn(move || {
        let _ = sender.send(work());
    });
    match receiver.recv_timeout(limit) {
        Ok(output) => {
            thread
                .join()
                .expect("the thread sent its result, so it did not panic");
            output
        }
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("{what} did not finish within {limit:?}"),
        Err(mpsc::RecvTimeoutError::Disconnected) => match thread.join() {
            Ok(()) => unreachable!("the thread ended without sending its result"),
            Err(panic) => std::panic::resume_unwind(panic),
        },
    }
}

/// The slot range of every core of a single-node topology, in core order.
pub fn core_slot_ranges(topology: &Topology) -> Vec<SlotRange> {
    assert_eq!(topology.nodes.len(), 1, "test clusters are one node");
    topology.nodes[0]
        .cores
        .iter()
        .map(|core| core.slots)
        .collect()
}

/// The core (index in topology order) that owns `key` in a single-node topology.
pub fn core_of_key(topology: &Topology, key: &[u8]) -> usize {
    let slot = tessera_protocol::slot_for_key(key);
    let ranges = core_slot_ranges(topology);
    let owners: Vec<usize> = ranges
        .iter()
        .enumerate()
        .filter(|(_, range)| range.contains(slot))
        .map(|(core_index, _)| core_index)
        .collect();
    assert_eq!(
        owners.len(),
        1,
        "slot {slot} owners={owners:?} ranges={ranges:?}"
    );
    owners[0]
}

/// A directory of the test's own, removed when dropped.
pub struct TestDir(pub PathBuf);

impl TestDir {
    pub fn new(name: &str) -> Self {
        let path = std::env::temp_dir().join(format!(
            "tessera-test-{name}-{}-{}",
            std::process::id(),
            RandomState::new().hash_one(0_u8)
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create the test directory");
        Self(path)
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A port `base` such that `base` and `base + 1` are free now: a server's core `i` listens on
/// `port + i`, so a restart on the same ports needs them consecutive, and port 0 (any free
/// port per core) does not give that. Another process could take them in between, which is
/// unlikely enough for a test.
pub fn free_port_pair() -> u16 {
    free_port_run("127.0.0.1", 2)
}

/// A port `base` such that `base..base + count` are free on `host` now, for TCP and UDP.
pub fn free_port_run(host: &str, count: u16) -> u16 {
    let random = RandomState::new();
    for attempt in 0..1000_u32 {
        // Below the usual ephemeral range, where the OS hands out ports of its own.
        let offset = u16::try_from(random.hash_one(attempt) % 12_000).expect("fits");
        let base = 20_000 + offset;
        let held: Vec<_> = (base..base + count)
            .map(|port| {
                (
                    std::net::TcpListener::bind((host, port)),
                    std::net::UdpSocket::bind((host, port)),
                )
            })
            .collect();
        if held.iter().all(|(tcp, udp)| tcp.is_ok() && udp.is_ok()) {
            return base;
        }
    }
    panic!("no {count} consecutive free ports found on {host}");
}

/// A server with `sync` durability and a data directory of its own, which stops and starts
/// again on the same ports.
pub struct DurableServer {
    data_dir: TestDir,
    port: u16,
    base: Config,
    server: Option<Server>,
}

impl DurableServer {
    /// Starts a server of configuration `base` with `sync` durability in a directory of
    /// its own.
    pub async fn start(name: &str, base: Config) -> Self {
        let mut durable = Self {
            data_dir: TestDir::new(name),
            port: free_port_pair(),
            base,
            server: None,
        };
        durable.server = Some(durable.start_again().await);
        durable
    }

    fn config(&self) -> Config {
        Config {
            port: self.port,
            durability: tessera_server::config::Durability::Sync,
            data_dir: self.data_dir.0.clone(),
            shutdown_timeout_ms: 1_000,
            ..self.base.clone()
        }
    }

    async fn start_again(&self) -> Server {
        let config = self.config();
        tokio::task::spawn_blocking(move || Server::start(config))
            .await
            .expect("the start did not panic")
            .unwrap_or_else(|error| panic!("the durable server did not start: {error}"))
    }

    pub fn addresses(&self) -> Vec<String> {
        self.server.as_ref().expect("running").addresses()
    }

    /// Stops the server cleanly and starts it again on the same ports and data.
    pub async fn restart(&mut self) {
        let addresses = self.addresses();
        let server = self.server.take().expect("running");
        tokio::task::spawn_blocking(move || stop_server(server))
            .await
            .expect("the server stopped cleanly");
        self.server = Some(self.start_again().await);
        assert_eq!(self.addresses(), addresses, "the same ports");
    }

    pub async fn stop(mut self) {
        let server = self.server.take().expect("running");
        tokio::task::spawn_blocking(move || stop_server(server))
            .await
            .expect("the server stopped cleanly");
    }
}
