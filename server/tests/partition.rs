//! A network partition between two nodes, each in a Linux network namespace of its own
//! joined by one veth pair: when the link is cut, each node's failure detector reports the
//! other down within the configured failure timeout, and up again when it is restored.
//!
//! It needs root (or `CAP_NET_ADMIN`) and the `ip` tool; without them it says so on stderr
//! and passes, since nothing else can stand in for a real partition. The namespaces, the
//! veth pair and the two `tessera-server` processes are removed whatever happens.
//!
//! The measured detection time (from the cut to the first handshake that reports the peer
//! down) is printed, for the figures in `docs/benchmarks.md`.

mod common;

use std::fmt::Write as _;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tessera_protocol::{NodeHealth, NodeState, Request, Response, PROTOCOL_VERSION};

use common::RawConnection;

/// The detector's settings: short by default, so the test is quick; the environment can set
/// others (`PARTITION_HEARTBEAT_INTERVAL_MS`, `PARTITION_FAILURE_TIMEOUT_MS`), e.g. the
/// server's defaults (250 and 1500) to measure their detection time.
fn detector_setting(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}

fn heartbeat_interval_ms() -> u64 {
    detector_setting("PARTITION_HEARTBEAT_INTERVAL_MS", 100)
}

fn failure_timeout_ms() -> u64 {
    detector_setting("PARTITION_FAILURE_TIMEOUT_MS", 500)
}
/// Client port of both nodes: each namespace has its own port space.
const PORT: u16 = 7000;

/// Runs `ip` with `arguments`; the error is its stderr.
fn ip(arguments: &[&str]) -> Result<(), String> {
    let output = Command::new("ip")
        .args(arguments)
        .output()
        .map_err(|error| format!("cannot run ip: {error}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            arguments.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

/// Two namespaces joined by a veth pair, and the servers started in them; all removed on
/// drop.
struct Partitionable {
    namespaces: [String; 2],
    links: [String; 2],
    addresses: [String; 2],
    servers: Vec<Child>,
    directory: std::path::PathBuf,
}

impl Partitionable {
    fn create() -> Result<Self, String> {
        let tag = std::process::id() % 100_000;
        let subnet = 1 + tag % 250;
        let created = Self {
            namespaces: [format!("tessera-a-{tag}"), format!("tessera-b-{tag}")],
            links: [format!("tsa{tag}"), format!("tsb{tag}")],
            addresses: [format!("10.213.{subnet}.1"), format!("10.213.{subnet}.2")],
            servers: Vec::new(),
            directory: std::env::temp_dir().join(format!("tessera-partition-{tag}")),
        };
        for namespace in &created.namespaces {
            ip(&["netns", "add", namespace])?;
        }
        let [link_a, link_b] = &created.links;
        ip(&[
            "link", "add", link_a, "type", "veth", "peer", "name", link_b,
        ])?;
        for index in 0..2 {
            let (namespace, link) = (&created.namespaces[index], &created.links[index]);
            ip(&["link", "set", link, "netns", namespace])?;
            let address = format!("{}/24", created.addresses[index]);
            ip(&["-n", namespace, "addr", "add", &address, "dev", link])?;
            ip(&["-n", namespace, "link", "set", link, "up"])?;
            ip(&["-n", namespace, "link", "set", "lo", "up"])?;
        }
        std::fs::create_dir_all(&created.directory).map_err(|error| error.to_string())?;
        Ok(created)
    }

    fn cluster_table(&self) -> String {
        let mut table = format!(
            "[cluster]\nepoch = 1\nheartbeat_interval_ms = {}\nfailure_timeout_ms = {}\n",
            heartbeat_interval_ms(),
            failure_timeout_ms()
        );
        for (index, address) in self.addresses.iter().enumerate() {
            let _ = write!(
                table,
                "\n[[cluster.nodes]]\nid = {}\nname = \"node-{}\"\nhost = \"{address}\"\n\
                 port = {PORT}\ncores = 1\n",
                index + 1,
                index + 1
            );
        }
        table
    }

    /// Starts node `index + 1` in its namespace.
    fn start_server(&mut self, index: usize) {
        let config = format!(
            "name = \"node-{}\"\nnode_id = {}\nhost = \"{}\"\nport = {PORT}\ncores = 1\n\
             durability = \"memory\"\nmemory_bytes_max = 67108864\n\n{}",
            index + 1,
            index + 1,
            self.addresses[index],
            self.cluster_table()
        );
        let path = self.directory.join(format!("node-{}.toml", index + 1));
        std::fs::write(&path, config).expect("write the config");
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &self.namespaces[index]])
            .arg(env!("CARGO_BIN_EXE_tessera-server"))
            .arg("--config")
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("TESSERA_") {
                command.env_remove(name);
            }
        }
        self.servers
            .push(command.spawn().expect("the server starts"));
    }

    /// Node `index + 1`'s view of every node, asked inside its namespace; `None` until it
    /// answers.
    fn health(&self, index: usize) -> Option<Vec<NodeHealth>> {
        let namespace = format!("/var/run/netns/{}", self.namespaces[index]);
        let address = format!("{}:{PORT}", self.addresses[index]);
        std::thread::spawn(move || {
            let handle = File::open(&namespace).expect("the namespace exists");
            // SAFETY: a valid namespace descriptor; only this short-lived thread moves.
            let entered = unsafe { libc::setns(handle.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(entered, 0, "setns: {}", std::io::Error::last_os_error());
            let mut connection = RawConnection::try_open(&address).ok()?;
            let reply = connection.call(&Request::Hello {
                protocol_version: PROTOCOL_VERSION,
                client_name: "partition-test".to_owned(),
            });
            match reply {
                Response::Hello { health, .. } => Some(health),
                other => panic!("Hello answered with {other:?}"),
            }
        })
        .join()
        .expect("the query thread")
    }

    /// The state node `observer + 1` reports of node `subject + 1`.
    fn state(&self, observer: usize, subject: usize) -> Option<NodeState> {
        let health = self.health(observer)?;
        Some(health[subject].state)
    }

    /// Polls until node `observer + 1` reports `state` of `subject + 1`; the time it took.
    fn wait_for(&self, observer: usize, subject: usize, state: NodeState) -> Duration {
        let started = Instant::now();
        while self.state(observer, subject) != Some(state) {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "node {} never reported node {} {state:?}",
                observer + 1,
                subject + 1
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        started.elapsed()
    }

    fn set_link(&self, index: usize, state: &str) {
        ip(&[
            "-n",
            &self.namespaces[index],
            "link",
            "set",
            &self.links[index],
            state,
        ])
        .expect("the link changes");
    }
}

impl Drop for Partitionable {
    fn drop(&mut self) {
        for server in &mut self.servers {
            let _ = server.kill();
            let _ = server.wait();
        }
        // Removing a namespace removes the veth end in it, and with it its peer.
        for namespace in &self.namespaces {
            let _ = ip(&["netns", "del", namespace]);
        }
        let _ = std::fs::remove_dir_all(&self.directory);
    }
}

#[test]
fn a_node_cut_off_is_reported_down_within_the_failure_timeout() {
    let mut partition = match Partitionable::create() {
        Ok(partition) => partition,
        Err(reason) => {
            eprintln!("skipped: network namespaces are not available here ({reason})");
            return;
        }
    };
    partition.start_server(0);
    partition.start_server(1);
    partition.wait_for(0, 1, NodeState::Up);
    partition.wait_for(1, 0, NodeState::Up);

    partition.set_link(0, "down");
    let cut = Instant::now();
    let detected_by_a = partition.wait_for(0, 1, NodeState::Down);
    let detected_by_b = partition.wait_for(1, 0, NodeState::Down).max(cut.elapsed());
    eprintln!(
        "partition detected after {} ms by node 1 and {} ms by node 2 (failure timeout \
         {} ms, heartbeats every {} ms)",
        detected_by_a.as_millis(),
        detected_by_b.as_millis(),
        failure_timeout_ms(),
        heartbeat_interval_ms()
    );
    // The last heartbeat arrived at most one interval before the cut, so on an idle machine
    // the cut is seen between `timeout - interval` and `timeout` after it. The bounds leave
    // room for a loaded one (CI runs many tests at once): within the timeout and a second,
    // and never in less than half the timeout (that would be a detector that does not wait).
    let earliest = Duration::from_millis(failure_timeout_ms() / 2);
    let latest = Duration::from_millis(failure_timeout_ms() + 1000);
    for detected in [detected_by_a, detected_by_b] {
        assert!(
            detected >= earliest && detected <= latest,
            "detected after {detected:?}, outside {earliest:?}..={latest:?}"
        );
    }
    // Still cut: it stays down.
    std::thread::sleep(Duration::from_millis(failure_timeout_ms()));
    assert_eq!(partition.state(0, 1), Some(NodeState::Down));

    partition.set_link(0, "up");
    let healed = partition.wait_for(0, 1, NodeState::Up);
    partition.wait_for(1, 0, NodeState::Up);
    assert!(
        healed < Duration::from_secs(3),
        "up again {healed:?} after the link returned"
    );
    let health = partition.health(0).expect("node 1 answers");
    assert_eq!(health[1].restarts, 0, "a partition is not a restart");
}
