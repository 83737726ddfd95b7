//! The cluster this instance belongs to: every node's id, addresses and core count, from which
//! every instance derives the same topology (slot ranges in configuration order, under the
//! configuration's epoch), and the failure detector that tells which nodes answer.
//!
//! - [`ClusterConfig`]: the `[cluster]` table of an instance's configuration (or the file
//!   `cluster_file` names), validated against the instance's own settings.
//! - [`topology`]: the topology every instance of the cluster serves, identical on all of
//!   them (the client ports of this node come from its bound listeners when it picks them).
//! - [`heartbeat`]: heartbeats over UDP to every peer's peer port, and the health each
//!   node's last heartbeat implies.
//!
//! **Invariant:** two instances given the same cluster table build equal topologies; slot
//! ownership depends on nothing but the table.

pub mod heartbeat;

use serde::{Deserialize, Serialize};
use tessera_protocol::limits::{CORE_COUNT_MAX, NODE_COUNT_MAX, TEXT_SIZE_MAX};
use tessera_protocol::{split_slots, CoreInfo, NodeInfo, Topology, TopologyError};

use crate::error::ConfigError;

/// Offset of the default admin port (`/metrics`, `/health`) from an instance's base port.
pub const ADMIN_PORT_OFFSET: u16 = 1000;
/// Offset of the default peer port (heartbeats) from an instance's base port.
pub const PEER_PORT_OFFSET: u16 = 2000;

/// Every node of a cluster, as each instance's configuration names it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// The slot assignment's epoch: raise it whenever `nodes` changes, so clients and
    /// servers tell the newer assignment apart.
    #[serde(default = "default_epoch")]
    pub epoch: u64,
    /// How often each node sends a heartbeat to every other node, in milliseconds.
    #[serde(default = "default_heartbeat_interval_ms")]
    pub heartbeat_interval_ms: u64,
    /// A node from which no heartbeat arrived for this long is reported down, in
    /// milliseconds.
    #[serde(default = "default_failure_timeout_ms")]
    pub failure_timeout_ms: u64,
    /// Every node, in the order slots are assigned.
    pub nodes: Vec<ClusterNode>,
}

/// One node (instance) of a cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterNode {
    /// Unique id; the instance whose `node_id` it is serves this entry's slots.
    pub id: u32,
    /// The instance name.
    pub name: String,
    /// The host clients and peers reach the node at.
    pub host: String,
    /// Port of the node's core 0; core `i` listens on `port + i`.
    pub port: u16,
    /// How many cores (shards) the node runs.
    pub cores: usize,
    /// The node's peer (heartbeat) port; defaults to `port + 2000`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_port: Option<u16>,
    /// The node's admin port; defaults to `port + 1000`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin_port: Option<u16>,
}

fn default_epoch() -> u64 {
    1
}

fn default_heartbeat_interval_ms() -> u64 {
    250
}

fn default_failure_timeout_ms() -> u64 {
    1500
}

/// The port at `offset` from `base`, or 0 (any free port) when `base` is 0.
pub fn derived_port(base: u16, offset: u16) -> u16 {
    if base == 0 {
        0
    } else {
        base.saturating_add(offset)
    }
}

impl ClusterNode {
    /// The node's peer port, given or derived.
    pub fn peer_port(&self) -> u16 {
        self.peer_port
            .unwrap_or_else(|| derived_port(self.port, PEER_PORT_OFFSET))
    }

    /// The node's admin port, given or derived.
    pub fn admin_port(&self) -> u16 {
        self.admin_port
            .unwrap_or_else(|| derived_port(self.port, ADMIN_PORT_OFFSET))
    }

    /// `host:port` of the node's peer port.
    pub fn peer_address(&self) -> String {
        format_address(&self.host, self.peer_port())
    }

    /// The client ports this node listens on, `port..port + cores`.
    fn client_ports(&self) -> std::ops::Range<usize> {
        usize::from(self.port)..usize::from(self.port) + self.cores
    }
}

/// What the instance itself is configured as, checked against its entry in the cluster.
#[derive(Debug, Clone, Copy)]
pub struct Own<'a> {
    /// The instance's `node_id`.
    pub node_id: u32,
    /// Its base port.
    pub port: u16,
    /// Its core count.
    pub cores: usize,
    /// The host it advertises to clients.
    pub advertised_host: &'a str,
    /// Its peer port.
    pub peer_port: u16,
}

impl ClusterConfig {
    /// Checks the table and that this instance's entry matches the instance.
    ///
    /// # Errors
    /// The first rule broken, naming the node.
    pub fn validate(&self, own: Own<'_>) -> Result<(), ConfigError> {
        let invalid = |reason: String| {
            Err(ConfigError::Invalid {
                field: "cluster",
                reason,
            })
        };
        if self.nodes.is_empty() || self.nodes.len() > NODE_COUNT_MAX {
            return invalid(format!(
                "{} nodes (allowed 1..={NODE_COUNT_MAX})",
                self.nodes.len()
            ));
        }
        if self.epoch == 0 {
            return invalid("epoch must be at least 1".to_owned());
        }
        if !(10..=10_000).contains(&self.heartbeat_interval_ms) {
            return invalid(format!(
                "heartbeat_interval_ms {} is outside 10..=10000",
                self.heartbeat_interval_ms
            ));
        }
        if self.failure_timeout_ms < 2 * self.heartbeat_interval_ms {
            return invalid(format!(
                "failure_timeout_ms {} must be at least twice heartbeat_interval_ms ({})",
                self.failure_timeout_ms, self.heartbeat_interval_ms
            ));
        }
        let total_cores: usize = self.nodes.iter().map(|node| node.cores).sum();
        if total_cores > usize::from(tessera_protocol::SLOT_COUNT) {
            return invalid(format!(
                "{total_cores} cores in all is more than the {} slots",
                tessera_protocol::SLOT_COUNT
            ));
        }
        for index in 0..self.nodes.len() {
            self.validate_node(index)?;
        }
        let Some(entry) = self.nodes.iter().find(|node| node.id == own.node_id) else {
            return invalid(format!(
                "this instance's node_id {} is not among the cluster's nodes",
                own.node_id
            ));
        };
        let mismatch = |what: &str, configured: String, listed: String| {
            invalid(format!(
                "this instance's {what} is {configured} but its cluster entry (node {}) says \
                 {listed}",
                own.node_id
            ))
        };
        if entry.cores != own.cores {
            return mismatch("core count", own.cores.to_string(), entry.cores.to_string());
        }
        if entry.port != own.port {
            return mismatch("port", own.port.to_string(), entry.port.to_string());
        }
        if entry.host != own.advertised_host {
            return mismatch(
                "advertised host",
                own.advertised_host.to_owned(),
                entry.host.clone(),
            );
        }
        if self.nodes.len() > 1 && entry.peer_port() != own.peer_port {
            return mismatch(
                "peer port",
                own.peer_port.to_string(),
                entry.peer_port().to_string(),
            );
        }
        Ok(())
    }

    /// Checks node `index` alone and against the nodes before it.
    fn validate_node(&self, index: usize) -> Result<(), ConfigError> {
        let node = &self.nodes[index];
        let invalid = |reason: String| {
            Err(ConfigError::Invalid {
                field: "cluster",
                reason,
            })
        };
        let node_invalid = |reason: String| invalid(format!("node {}: {reason}", node.id));
        if node.name.is_empty() || node.name.len() > TEXT_SIZE_MAX {
            return node_invalid(format!("name must be 1..={TEXT_SIZE_MAX} bytes"));
        }
        if node.host.is_empty() || node.host.len() > TEXT_SIZE_MAX - 8 {
            return node_invalid("host is empty or too long".to_owned());
        }
        if node.cores == 0 || node.cores > CORE_COUNT_MAX {
            return node_invalid(format!(
                "{} cores is outside 1..={CORE_COUNT_MAX}",
                node.cores
            ));
        }
        if node.port == 0 && self.nodes.len() > 1 {
            return node_invalid(
                "port 0 (any free port) cannot be used in a cluster of several nodes: \
                 peers and clients need its address"
                    .to_owned(),
            );
        }
        if node.client_ports().end - 1 > usize::from(u16::MAX) {
            return node_invalid(format!(
                "port {} + {} cores runs past 65535",
                node.port, node.cores
            ));
        }
        for other in &self.nodes[..index] {
            if other.id == node.id {
                return node_invalid("the id appears twice".to_owned());
            }
            if other.name == node.name {
                return node_invalid(format!(
                    "the name {:?} is also node {}'s",
                    node.name, other.id
                ));
            }
            if other.host == node.host && self.nodes.len() > 1 {
                let overlap = |a: &std::ops::Range<usize>, b: &std::ops::Range<usize>| {
                    a.start < b.end && b.start < a.end
                };
                let ports = |n: &ClusterNode| {
                    let peer = usize::from(n.peer_port());
                    let admin = usize::from(n.admin_port());
                    [n.client_ports(), peer..peer + 1, admin..admin + 1]
                };
                let (mine, theirs) = (ports(node), ports(other));
                if mine.iter().any(|a| theirs.iter().any(|b| overlap(a, b))) {
                    return node_invalid(format!(
                        "its ports overlap node {}'s on host {}",
                        other.id, node.host
                    ));
                }
            }
        }
        Ok(())
    }

    /// The cluster of one instance alone, as an instance without a `[cluster]` table runs.
    pub fn single(own: Own<'_>, name: &str) -> Self {
        Self {
            epoch: default_epoch(),
            heartbeat_interval_ms: default_heartbeat_interval_ms(),
            failure_timeout_ms: default_failure_timeout_ms(),
            nodes: vec![ClusterNode {
                id: own.node_id,
                name: name.to_owned(),
                host: own.advertised_host.to_owned(),
                port: own.port,
                cores: own.cores,
                peer_port: Some(own.peer_port),
                admin_port: None,
            }],
        }
    }

    /// The index of node `node_id` in `nodes` (and in the topology).
    pub fn node_index(&self, node_id: u32) -> Option<usize> {
        self.nodes.iter().position(|node| node.id == node_id)
    }

    /// The nodes other than `node_id`.
    pub fn peers(&self, node_id: u32) -> impl Iterator<Item = &ClusterNode> {
        self.nodes.iter().filter(move |node| node.id != node_id)
    }
}

/// The topology of `cluster`: the slots split evenly over every core of every node, in
/// configuration order. The cores of node `own_node_id` get the addresses in
/// `own_addresses` (its bound listeners, whose ports the OS may have picked) when given;
/// every other core is at its node's `host:port + core`.
///
/// # Errors
/// The result breaks a topology rule (a table that passed [`ClusterConfig::validate`] does
/// not).
pub fn topology(
    cluster: &ClusterConfig,
    own_node_id: u32,
    own_addresses: Option<&[String]>,
) -> Result<Topology, TopologyError> {
    let total_cores = cluster.nodes.iter().map(|node| node.cores).sum();
    let mut ranges = split_slots(total_cores).into_iter();
    let nodes = cluster
        .nodes
        .iter()
        .map(|node| {
            let cores = (0..node.cores)
                .map(|core_index| {
                    let address = match own_addresses {
                        Some(addresses) if node.id == own_node_id => {
                            addresses.get(core_index).cloned().unwrap_or_default()
                        }
                        _ => format_address(
                            &node.host,
                            node.port
                                .saturating_add(u16::try_from(core_index).unwrap_or(u16::MAX)),
                        ),
                    };
                    CoreInfo {
                        core_id: u16::try_from(core_index).unwrap_or(u16::MAX),
                        address,
                        slots: ranges
                            .next()
                            .unwrap_or(tessera_protocol::SlotRange { start: 0, end: 0 }),
                    }
                })
                .collect();
            NodeInfo {
                node_id: node.id,
                name: node.name.clone(),
                cores,
            }
        })
        .collect();
    let topology = Topology {
        epoch: cluster.epoch,
        nodes,
    };
    topology.check()?;
    Ok(topology)
}

/// `host:port`, bracketing an IPv6 host.
pub fn format_address(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn three_nodes() -> ClusterConfig {
        ClusterConfig {
            epoch: 4,
            heartbeat_interval_ms: 100,
            failure_timeout_ms: 500,
            nodes: (1..=3)
                .map(|id| ClusterNode {
                    id,
                    name: format!("n{id}"),
                    host: format!("127.0.0.{id}"),
                    port: 7000,
                    cores: usize::try_from(id).unwrap(),
                    peer_port: None,
                    admin_port: None,
                })
                .collect(),
        }
    }

    fn own(cluster: &ClusterConfig, node_id: u32) -> Own<'_> {
        let node = &cluster.nodes[cluster.node_index(node_id).unwrap()];
        Own {
            node_id,
            port: node.port,
            cores: node.cores,
            advertised_host: &node.host,
            peer_port: node.peer_port(),
        }
    }

    #[test]
    fn every_instance_builds_the_same_topology() {
        let cluster = three_nodes();
        cluster.validate(own(&cluster, 2)).unwrap();
        let one = topology(&cluster, 1, None).unwrap();
        let two = topology(&cluster, 2, None).unwrap();
        assert_eq!(one, two);
        assert_eq!(one.epoch, 4);
        assert_eq!(one.shard_count(), 6);
        assert_eq!(one.nodes[2].cores[2].address, "127.0.0.3:7002");
        // Slots follow configuration order: node 1's core first.
        assert_eq!(one.nodes[0].cores[0].slots.start, 0);
        assert_eq!(
            one.nodes[2].cores[2].slots.end,
            tessera_protocol::SLOT_COUNT
        );
    }

    #[test]
    fn an_entry_that_disagrees_with_the_instance_is_refused() {
        let cluster = three_nodes();
        let mut wrong = own(&cluster, 2);
        wrong.cores = 5;
        let error = cluster.validate(wrong).unwrap_err().to_string();
        assert!(error.contains("core count is 5"), "{error}");
        let mut absent = own(&cluster, 2);
        absent.node_id = 9;
        let error = cluster.validate(absent).unwrap_err().to_string();
        assert!(error.contains("node_id 9 is not among"), "{error}");
    }

    #[test]
    fn overlapping_ports_on_one_host_are_refused() {
        let mut cluster = three_nodes();
        cluster.nodes[1].host = "127.0.0.1".to_owned();
        cluster.nodes[1].port = 7000;
        let error = cluster.validate(own(&cluster, 1)).unwrap_err().to_string();
        assert!(error.contains("overlap node 1"), "{error}");
        cluster.nodes[1].port = 7100;
        cluster.validate(own(&cluster, 1)).unwrap();
        cluster.nodes[1].peer_port = Some(7000);
        let error = cluster.validate(own(&cluster, 1)).unwrap_err().to_string();
        assert!(error.contains("overlap"), "{error}");
    }

    #[test]
    fn duplicate_ids_and_port_zero_are_refused() {
        let mut cluster = three_nodes();
        cluster.nodes[2].id = 1;
        assert!(cluster.validate(own(&cluster, 2)).is_err());
        let mut cluster = three_nodes();
        cluster.nodes[0].port = 0;
        let error = cluster.validate(own(&cluster, 2)).unwrap_err().to_string();
        assert!(error.contains("port 0"), "{error}");
    }
}
