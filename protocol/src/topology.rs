//! The cluster topology a server returns in its handshake, and the slot route table built
//! from it.
//!
//! A topology names every node, every node's cores (one shard each), the address each core
//! listens on and the contiguous slot range it owns, under an epoch that increases whenever
//! the assignment changes. It is designed for many nodes even while a server knows only itself.
//!
//! **Invariant:** a valid topology assigns every slot in `0..SLOT_COUNT` to exactly one core of
//! exactly one node; [`Topology::check`] enforces it and [`RouteTable::new`] relies on it.

use crate::limits::{CORE_COUNT_MAX, NODE_COUNT_MAX, TEXT_SIZE_MAX};
use crate::routing::{slot_for_key, Slot, SlotRange, SLOT_COUNT};

/// The whole cluster as one server sees it.
#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
#[rkyv(derive(Debug))]
pub struct Topology {
    /// Increases whenever the slot assignment changes; a client keeps the newest it has seen.
    pub epoch: u64,
    /// Every node, in configuration order.
    pub nodes: Vec<NodeInfo>,
}

/// One server process (instance) in the cluster.
#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
#[rkyv(derive(Debug))]
pub struct NodeInfo {
    /// Stable identifier of the node, unique in the cluster.
    pub node_id: u32,
    /// Human-readable name (the instance name).
    pub name: String,
    /// The node's cores, indexed by `core_id`.
    pub cores: Vec<CoreInfo>,
}

/// One core of a node: one shard with its own listener.
#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
#[rkyv(derive(Debug))]
pub struct CoreInfo {
    /// Index of the core within its node, `0..cores.len()`.
    pub core_id: u16,
    /// `host:port` a client connects to for this core.
    pub address: String,
    /// The slots this core's shard owns.
    pub slots: SlotRange,
}

/// Whether a node answers its peers, as the answering node's failure detector sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
#[rkyv(derive(Debug, PartialEq, Eq))]
pub enum NodeState {
    /// A heartbeat arrived within the failure timeout (or it is the answering node).
    Up,
    /// No heartbeat for longer than the failure timeout.
    Down,
    /// Nothing heard yet, and the node started less than a failure timeout ago.
    Unknown,
}

/// One node's health, as the answering node sees it.
#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
#[rkyv(derive(Debug))]
pub struct NodeHealth {
    /// The node.
    pub node_id: u32,
    /// Up, down or not heard yet.
    pub state: NodeState,
    /// Milliseconds since its last heartbeat arrived; `None` if none has (0 for the answering
    /// node itself).
    pub last_heard_ms: Option<u64>,
    /// The topology epoch its last heartbeat carried (0 if none arrived). A peer at another
    /// epoch runs another slot assignment.
    pub epoch: u64,
    /// Times the node was seen to restart (a heartbeat with a new start stamp).
    pub restarts: u64,
}

/// Where a slot lives: indexes into [`Topology::nodes`] and that node's `cores`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ShardLocation {
    /// Index into [`Topology::nodes`].
    pub node_index: u16,
    /// Index into the node's cores (equal to its `core_id`).
    pub core_index: u16,
}

/// Why a topology cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TopologyError {
    /// The topology names no node, or more than the limit.
    #[error("topology has {node_count} nodes (allowed 1..={NODE_COUNT_MAX})")]
    NodeCount {
        /// Nodes found.
        node_count: usize,
    },
    /// A node has no core, or more than the limit.
    #[error("node {node_id} has {core_count} cores (allowed 1..={CORE_COUNT_MAX})")]
    CoreCount {
        /// The node.
        node_id: u32,
        /// Cores found.
        core_count: usize,
    },
    /// Two nodes share an id.
    #[error("node id {node_id} appears twice")]
    DuplicateNode {
        /// The repeated id.
        node_id: u32,
    },
    /// A core's id does not match its position.
    #[error("node {node_id} core at index {index} has core_id {core_id}")]
    CoreId {
        /// The node.
        node_id: u32,
        /// Position of the core in the list.
        index: usize,
        /// The id it claims.
        core_id: u16,
    },
    /// A name or address is longer than the limit.
    #[error("a name or address is {size} bytes (allowed {TEXT_SIZE_MAX})")]
    TextSize {
        /// Length found.
        size: usize,
    },
    /// A slot is owned by no core, or by more than one.
    #[error("slot {slot} is owned by {owner_count} cores (must be exactly 1)")]
    SlotCoverage {
        /// The first slot found wrong.
        slot: u32,
        /// How many cores claim it.
        owner_count: usize,
    },
}

impl Topology {
    /// Checks the topology's invariants: sizes within limits, unique ids, and every slot owned
    /// by exactly one core.
    ///
    /// # Errors
    /// The first rule the topology breaks.
    pub fn check(&self) -> Result<(), TopologyError> {
        let node_count = self.nodes.len();
        if node_count == 0 || node_count > NODE_COUNT_MAX {
            return Err(TopologyError::NodeCount { node_count });
        }
        let mut owner_counts = vec![0_usize; usize::from(SLOT_COUNT)];
        for (node_position, node) in self.nodes.iter().enumerate() {
            if self.nodes[..node_position]
                .iter()
                .any(|other| other.node_id == node.node_id)
            {
                return Err(TopologyError::DuplicateNode {
                    node_id: node.node_id,
                });
            }
            if node.name.len() > TEXT_SIZE_MAX {
                return Err(TopologyError::TextSize {
                    size: node.name.len(),
                });
            }
            let core_count = node.cores.len();
            if core_count == 0 || core_count > CORE_COUNT_MAX {
                return Err(TopologyError::CoreCount {
                    node_id: node.node_id,
                    core_count,
                });
            }
            for (index, core) in node.cores.iter().enumerate() {
                if usize::from(core.core_id) != index {
                    return Err(TopologyError::CoreId {
                        node_id: node.node_id,
                        index,
                        core_id: core.core_id,
                    });
                }
                if core.address.len() > TEXT_SIZE_MAX {
                    return Err(TopologyError::TextSize {
                        size: core.address.len(),
                    });
                }
                let end = core.slots.end.min(SLOT_COUNT);
                for slot in core.slots.start..end {
                    owner_counts[usize::from(slot)] += 1;
                }
            }
        }
        if let Some((slot, &owner_count)) = owner_counts
            .iter()
            .enumerate()
            .find(|(_, &count)| count != 1)
        {
            // slot < 16384 always fits in u32.
            #[allow(clippy::cast_possible_truncation, reason = "slot < 16384")]
            return Err(TopologyError::SlotCoverage {
                slot: slot as u32,
                owner_count,
            });
        }
        Ok(())
    }

    /// The core at `location`, if the location is inside this topology.
    #[must_use]
    pub fn core(&self, location: ShardLocation) -> Option<&CoreInfo> {
        self.nodes
            .get(usize::from(location.node_index))?
            .cores
            .get(usize::from(location.core_index))
    }

    /// The node at `location`, if it exists.
    #[must_use]
    pub fn node(&self, location: ShardLocation) -> Option<&NodeInfo> {
        self.nodes.get(usize::from(location.node_index))
    }

    /// Total number of shards (cores) across all nodes.
    #[must_use]
    pub fn shard_count(&self) -> usize {
        self.nodes.iter().map(|node| node.cores.len()).sum()
    }
}

/// A slot-indexed table answering "which node and core owns this slot" in O(1).
///
/// Built once per topology epoch; client and server both route through it.
#[derive(Clone, Debug)]
pub struct RouteTable {
    epoch: u64,
    locations: Box<[ShardLocation]>,
}

impl RouteTable {
    /// Builds the table for a topology, after checking it.
    ///
    /// # Errors
    /// The first rule the topology breaks (see [`Topology::check`]).
    pub fn new(topology: &Topology) -> Result<Self, TopologyError> {
        topology.check()?;
        let unset = ShardLocation {
            node_index: u16::MAX,
            core_index: u16::MAX,
        };
        let mut locations = vec![unset; usize::from(SLOT_COUNT)].into_boxed_slice();
        for (node_index, node) in topology.nodes.iter().enumerate() {
            for (core_index, core) in node.cores.iter().enumerate() {
                // Both indexes were bounded by check() (NODE_COUNT_MAX and CORE_COUNT_MAX fit u16).
                #[allow(clippy::cast_possible_truncation, reason = "bounded by check()")]
                let location = ShardLocation {
                    node_index: node_index as u16,
                    core_index: core_index as u16,
                };
                for slot in core.slots.start..core.slots.end {
                    locations[usize::from(slot)] = location;
                }
            }
        }
        debug_assert!(locations.iter().all(|location| *location != unset));
        Ok(Self {
            epoch: topology.epoch,
            locations,
        })
    }

    /// The epoch of the topology this table was built from.
    #[must_use]
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The owner of `slot`. Slots are below [`SLOT_COUNT`]; larger values wrap.
    #[must_use]
    pub fn owner_of_slot(&self, slot: Slot) -> ShardLocation {
        self.locations[usize::from(slot % SLOT_COUNT)]
    }

    /// The owner of `key`.
    #[must_use]
    pub fn owner_of_key(&self, key: &[u8]) -> ShardLocation {
        self.owner_of_slot(slot_for_key(key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::split_slots;

    fn single_node(core_count: usize) -> Topology {
        let cores = split_slots(core_count)
            .into_iter()
            .enumerate()
            .map(|(index, slots)| CoreInfo {
                core_id: u16::try_from(index).unwrap(),
                address: format!("127.0.0.1:{}", 7000 + index),
                slots,
            })
            .collect();
        Topology {
            epoch: 1,
            nodes: vec![NodeInfo {
                node_id: 1,
                name: "a".into(),
                cores,
            }],
        }
    }

    #[test]
    fn route_table_follows_slot_ranges() {
        let topology = single_node(2);
        let table = RouteTable::new(&topology).unwrap();
        assert_eq!(table.owner_of_slot(0).core_index, 0);
        assert_eq!(table.owner_of_slot(8191).core_index, 0);
        assert_eq!(table.owner_of_slot(8192).core_index, 1);
        assert_eq!(table.owner_of_slot(16383).core_index, 1);
        assert_eq!(table.epoch(), 1);
    }

    #[test]
    fn gaps_and_overlaps_are_refused() {
        let mut topology = single_node(2);
        topology.nodes[0].cores[1].slots.start = 8000;
        assert_eq!(
            topology.check(),
            Err(TopologyError::SlotCoverage {
                slot: 8000,
                owner_count: 2
            })
        );
        let mut topology = single_node(2);
        topology.nodes[0].cores[1].slots.end = 16000;
        assert_eq!(
            topology.check(),
            Err(TopologyError::SlotCoverage {
                slot: 16000,
                owner_count: 0
            })
        );
        let empty = Topology {
            epoch: 1,
            nodes: vec![],
        };
        assert_eq!(
            empty.check(),
            Err(TopologyError::NodeCount { node_count: 0 })
        );
    }

    #[test]
    fn many_nodes_route_to_their_own_ranges() {
        let ranges = split_slots(6);
        let nodes = (0..3_u16)
            .map(|node| NodeInfo {
                node_id: u32::from(node) + 10,
                name: format!("n{node}"),
                cores: (0..2_u16)
                    .map(|core| CoreInfo {
                        core_id: core,
                        address: format!("10.0.0.{node}:{}", 7000 + core),
                        slots: ranges[usize::from(node * 2 + core)],
                    })
                    .collect(),
            })
            .collect();
        let topology = Topology { epoch: 3, nodes };
        let table = RouteTable::new(&topology).unwrap();
        for slot in (0..SLOT_COUNT).step_by(97) {
            let location = table.owner_of_slot(slot);
            assert!(
                topology.core(location).unwrap().slots.contains(slot),
                "slot={slot}"
            );
        }
        assert_eq!(topology.shard_count(), 6);
    }
}
