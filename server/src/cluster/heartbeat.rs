//! The failure detector: every node sends a small heartbeat datagram to every other node's
//! peer port each `heartbeat_interval_ms`, and reports a node down once nothing arrived from
//! it for `failure_timeout_ms`.
//!
//! One thread (`tessera-peer`) sends and receives; it wakes once per interval and per
//! datagram, never touches a shard, and shares with the cores only [`ClusterHealth`], whose
//! atomics the cores read when they answer a handshake. A heartbeat carries the sender's
//! node id, its topology epoch and a start stamp (a new one means the node restarted); its
//! layout is in `docs/protocol.md`, "Heartbeats".
//!
//! Heartbeats are unauthenticated, like the client protocol: the peer port belongs on a
//! network only the cluster's nodes reach.

use std::net::{SocketAddr, ToSocketAddrs, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tessera_protocol::{NodeHealth, NodeState};

use super::{format_address, ClusterConfig};

/// The heartbeat datagram's first bytes.
pub const HEARTBEAT_MAGIC: [u8; 4] = *b"TSHB";
/// The heartbeat layout's version.
pub const HEARTBEAT_VERSION: u16 = 1;
/// Bytes of a heartbeat: magic, version, flags, node id, reserved, epoch, start stamp, CRC.
pub const HEARTBEAT_SIZE: usize = 36;

/// One heartbeat's content.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heartbeat {
    /// The sender.
    pub node_id: u32,
    /// The sender's topology epoch.
    pub epoch: u64,
    /// When the sender started (Unix ms); a new value means it restarted.
    pub started_ms: u64,
}

impl Heartbeat {
    /// The datagram, little-endian, CRC32 of the first 32 bytes at the end.
    pub fn encode(&self) -> [u8; HEARTBEAT_SIZE] {
        let mut bytes = [0_u8; HEARTBEAT_SIZE];
        bytes[0..4].copy_from_slice(&HEARTBEAT_MAGIC);
        bytes[4..6].copy_from_slice(&HEARTBEAT_VERSION.to_le_bytes());
        // 6..8 flags, 12..16 reserved: zero.
        bytes[8..12].copy_from_slice(&self.node_id.to_le_bytes());
        bytes[16..24].copy_from_slice(&self.epoch.to_le_bytes());
        bytes[24..32].copy_from_slice(&self.started_ms.to_le_bytes());
        let crc = crc32fast::hash(&bytes[..32]);
        bytes[32..36].copy_from_slice(&crc.to_le_bytes());
        bytes
    }

    /// Reads a datagram; `None` unless it is a whole heartbeat of this version with a valid
    /// checksum.
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        if bytes.len() != HEARTBEAT_SIZE || bytes[0..4] != HEARTBEAT_MAGIC {
            return None;
        }
        let u16_at = |at: usize| u16::from_le_bytes([bytes[at], bytes[at + 1]]);
        let u32_at = |at: usize| {
            let mut word = [0_u8; 4];
            word.copy_from_slice(&bytes[at..at + 4]);
            u32::from_le_bytes(word)
        };
        let u64_at = |at: usize| {
            let mut word = [0_u8; 8];
            word.copy_from_slice(&bytes[at..at + 8]);
            u64::from_le_bytes(word)
        };
        if u16_at(4) != HEARTBEAT_VERSION || crc32fast::hash(&bytes[..32]) != u32_at(32) {
            return None;
        }
        Some(Self {
            node_id: u32_at(8),
            epoch: u64_at(16),
            started_ms: u64_at(24),
        })
    }
}

/// What this node knows of one node.
#[derive(Debug, Default)]
struct NodeTrack {
    node_id: u32,
    /// Milliseconds after `ClusterHealth::started` (plus one) of its last heartbeat; 0: never.
    last_heard: AtomicU64,
    epoch: AtomicU64,
    started_ms: AtomicU64,
    restarts: AtomicU64,
}

/// Every node's health as this node's detector sees it. Written by the peer thread, read by
/// the cores when they answer a handshake; a node reads itself as up.
#[derive(Debug)]
pub struct ClusterHealth {
    started: Instant,
    own_node_id: u32,
    failure_timeout_ms: u64,
    nodes: Box<[NodeTrack]>,
}

impl ClusterHealth {
    /// Health for `cluster` as node `own_node_id` sees it, with nothing heard yet.
    pub fn new(cluster: &ClusterConfig, own_node_id: u32) -> Self {
        Self {
            started: Instant::now(),
            own_node_id,
            failure_timeout_ms: cluster.failure_timeout_ms,
            nodes: cluster
                .nodes
                .iter()
                .map(|node| NodeTrack {
                    node_id: node.id,
                    ..NodeTrack::default()
                })
                .collect(),
        }
    }

    fn elapsed_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Records a heartbeat; `false` if it names no node of the cluster (or this one).
    pub fn heard(&self, heartbeat: &Heartbeat) -> bool {
        if heartbeat.node_id == self.own_node_id {
            return false;
        }
        let Some(track) = self
            .nodes
            .iter()
            .find(|track| track.node_id == heartbeat.node_id)
        else {
            return false;
        };
        let previous_start = track
            .started_ms
            .swap(heartbeat.started_ms, Ordering::Relaxed);
        if previous_start != 0 && previous_start != heartbeat.started_ms {
            track.restarts.fetch_add(1, Ordering::Relaxed);
            tracing::info!(node_id = heartbeat.node_id, "peer restarted");
        }
        let previous_epoch = track.epoch.swap(heartbeat.epoch, Ordering::Relaxed);
        if previous_epoch != heartbeat.epoch {
            tracing::info!(
                node_id = heartbeat.node_id,
                epoch = heartbeat.epoch,
                "peer's topology epoch"
            );
        }
        let was = track
            .last_heard
            .swap(self.elapsed_ms() + 1, Ordering::Relaxed);
        if was == 0 || self.state_of(was) == NodeState::Down {
            tracing::info!(node_id = heartbeat.node_id, "peer is up");
        }
        true
    }

    fn state_of(&self, last_heard: u64) -> NodeState {
        let now = self.elapsed_ms();
        if last_heard == 0 {
            if now < self.failure_timeout_ms {
                NodeState::Unknown
            } else {
                NodeState::Down
            }
        } else if now.saturating_sub(last_heard - 1) <= self.failure_timeout_ms {
            NodeState::Up
        } else {
            NodeState::Down
        }
    }

    /// Every node's health, in cluster order.
    pub fn snapshot(&self, own_epoch: u64) -> Vec<NodeHealth> {
        let now = self.elapsed_ms();
        self.nodes
            .iter()
            .map(|track| {
                if track.node_id == self.own_node_id {
                    return NodeHealth {
                        node_id: track.node_id,
                        state: NodeState::Up,
                        last_heard_ms: Some(0),
                        epoch: own_epoch,
                        restarts: 0,
                    };
                }
                let last_heard = track.last_heard.load(Ordering::Relaxed);
                NodeHealth {
                    node_id: track.node_id,
                    state: self.state_of(last_heard),
                    last_heard_ms: (last_heard != 0).then(|| now.saturating_sub(last_heard - 1)),
                    epoch: track.epoch.load(Ordering::Relaxed),
                    restarts: track.restarts.load(Ordering::Relaxed),
                }
            })
            .collect()
    }

    /// Logs the nodes that went down since the last call (`reported` remembers them).
    fn report_down(&self, reported: &mut [bool]) {
        for (track, was_down) in self.nodes.iter().zip(reported.iter_mut()) {
            if track.node_id == self.own_node_id {
                continue;
            }
            let down = self.state_of(track.last_heard.load(Ordering::Relaxed)) == NodeState::Down;
            if down && !*was_down {
                tracing::warn!(
                    node_id = track.node_id,
                    failure_timeout_ms = self.failure_timeout_ms,
                    "peer is down: no heartbeat within the failure timeout"
                );
            }
            *was_down = down;
        }
    }
}

/// The running peer thread; stops when dropped.
#[derive(Debug)]
pub struct Detector {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    address: SocketAddr,
}

impl Detector {
    /// Binds `bind_host:peer_port` and starts sending heartbeats to every peer of `cluster`.
    ///
    /// # Errors
    /// The port cannot be bound, or the thread cannot start.
    pub fn start(
        cluster: &ClusterConfig,
        own_node_id: u32,
        bind_host: &str,
        peer_port: u16,
        health: Arc<ClusterHealth>,
    ) -> std::io::Result<Self> {
        let bind = format_address(bind_host, peer_port);
        let socket = UdpSocket::bind(&bind)?;
        let address = socket.local_addr()?;
        let interval = Duration::from_millis(cluster.heartbeat_interval_ms);
        // A datagram or a stop is noticed within a quarter interval.
        socket.set_read_timeout(Some(interval / 4))?;
        let heartbeat = Heartbeat {
            node_id: own_node_id,
            epoch: cluster.epoch,
            started_ms: crate::clock::now_unix_ms(),
        }
        .encode();
        let peers: Vec<(u32, String)> = cluster
            .peers(own_node_id)
            .map(|node| (node.id, node.peer_address()))
            .collect();
        let stop = Arc::new(AtomicBool::new(false));
        let thread_stop = stop.clone();
        let thread = std::thread::Builder::new()
            .name("tessera-peer".to_owned())
            .spawn(move || run(&socket, &peers, &heartbeat, interval, &health, &thread_stop))?;
        tracing::info!(%address, peers = cluster.nodes.len() - 1, "failure detector listening");
        Ok(Self {
            stop,
            thread: Some(thread),
            address,
        })
    }

    /// The bound peer address.
    pub fn address(&self) -> SocketAddr {
        self.address
    }
}

impl Drop for Detector {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn run(
    socket: &UdpSocket,
    peers: &[(u32, String)],
    heartbeat: &[u8; HEARTBEAT_SIZE],
    interval: Duration,
    health: &ClusterHealth,
    stop: &AtomicBool,
) {
    let mut next_send = Instant::now();
    let mut reported = vec![false; health.nodes.len()];
    let mut resolved: Vec<Option<SocketAddr>> = vec![None; peers.len()];
    let mut buffer = [0_u8; 64];
    while !stop.load(Ordering::Relaxed) {
        if Instant::now() >= next_send {
            for ((node_id, address), cached) in peers.iter().zip(resolved.iter_mut()) {
                if cached.is_none() {
                    // Resolved until the first send error, so a peer whose name moves is
                    // found again.
                    *cached = address.to_socket_addrs().ok().and_then(|mut a| a.next());
                }
                let Some(target) = *cached else { continue };
                if let Err(send_error) = socket.send_to(heartbeat, target) {
                    tracing::debug!(node_id, %address, %send_error, "heartbeat not sent");
                    *cached = None;
                }
            }
            next_send += interval;
            if next_send < Instant::now() {
                next_send = Instant::now() + interval;
            }
            health.report_down(&mut reported);
        }
        // Wake for the next send on time, and at least every quarter interval for a stop.
        let until_send = next_send
            .saturating_duration_since(Instant::now())
            .clamp(Duration::from_millis(1), interval / 4);
        let _ = socket.set_read_timeout(Some(until_send));
        match socket.recv_from(&mut buffer) {
            Ok((size, from)) => match Heartbeat::decode(&buffer[..size]) {
                Some(received) if health.heard(&received) => {}
                _ => tracing::debug!(%from, size, "ignored a datagram on the peer port"),
            },
            Err(error)
                if matches!(
                    error.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            // An ICMP refusal from a stopped peer surfaces here; the next send retries.
            Err(error) => tracing::trace!(%error, "peer socket"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::ClusterNode;

    #[test]
    fn heartbeats_round_trip_and_damage_is_refused() {
        let heartbeat = Heartbeat {
            node_id: 7,
            epoch: 3,
            started_ms: 1_700_000_000_000,
        };
        let mut bytes = heartbeat.encode();
        assert_eq!(Heartbeat::decode(&bytes), Some(heartbeat));
        bytes[17] ^= 1;
        assert_eq!(Heartbeat::decode(&bytes), None);
        assert_eq!(Heartbeat::decode(&heartbeat.encode()[..35]), None);
    }

    fn cluster(failure_timeout_ms: u64) -> ClusterConfig {
        ClusterConfig {
            epoch: 2,
            heartbeat_interval_ms: 10,
            failure_timeout_ms,
            nodes: (1..=2)
                .map(|id| ClusterNode {
                    id,
                    name: format!("n{id}"),
                    host: "127.0.0.1".to_owned(),
                    port: 0,
                    cores: 1,
                    peer_port: None,
                    admin_port: None,
                })
                .collect(),
        }
    }

    #[test]
    fn a_node_is_unknown_then_up_then_down() {
        let health = ClusterHealth::new(&cluster(60_000), 1);
        let states = |health: &ClusterHealth| {
            health
                .snapshot(2)
                .iter()
                .map(|node| node.state)
                .collect::<Vec<_>>()
        };
        assert_eq!(states(&health), [NodeState::Up, NodeState::Unknown]);
        let beat = Heartbeat {
            node_id: 2,
            epoch: 2,
            started_ms: 5,
        };
        assert!(health.heard(&beat));
        assert_eq!(states(&health), [NodeState::Up, NodeState::Up]);
        assert!(health.heard(&Heartbeat {
            started_ms: 6,
            ..beat
        }));
        assert_eq!(health.snapshot(2)[1].restarts, 1);
        assert!(!health.heard(&Heartbeat { node_id: 9, ..beat }));
        // A timeout of 0 makes anything heard before now down.
        let strict = ClusterHealth::new(&cluster(0), 1);
        assert_eq!(states(&strict), [NodeState::Up, NodeState::Down]);
    }

    #[test]
    fn two_detectors_see_each_other() {
        let ports: Vec<u16> = (0..2)
            .map(|_| {
                UdpSocket::bind("127.0.0.1:0")
                    .unwrap()
                    .local_addr()
                    .unwrap()
                    .port()
            })
            .collect();
        let mut cluster = cluster(1_000);
        for (node, port) in cluster.nodes.iter_mut().zip(&ports) {
            node.peer_port = Some(*port);
        }
        let healths: Vec<Arc<ClusterHealth>> = (1..=2)
            .map(|id| Arc::new(ClusterHealth::new(&cluster, id)))
            .collect();
        let detectors: Vec<Detector> = (0..2)
            .map(|index| {
                Detector::start(
                    &cluster,
                    u32::try_from(index + 1).unwrap(),
                    "127.0.0.1",
                    ports[index],
                    healths[index].clone(),
                )
                .unwrap()
            })
            .collect();
        let deadline = Instant::now() + Duration::from_secs(10);
        while healths.iter().any(|health| {
            health
                .snapshot(2)
                .iter()
                .any(|node| node.state != NodeState::Up)
        }) {
            assert!(Instant::now() < deadline, "detectors never saw each other");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(healths[0].snapshot(2)[1].epoch, 2);
        drop(detectors);
    }
}
