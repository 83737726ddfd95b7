//! The client's view of the cluster: the topology, its route table, and one transport per
//! (node, core). A view is immutable; a topology refresh builds a new one, reusing the
//! connections of cores whose address did not change.

use std::sync::Arc;

use tessera_protocol::{NodeHealth, RouteTable, ShardLocation, Topology};

use crate::connection::SharedHealth;
use crate::transport::Transport;

/// One topology epoch as the client uses it.
#[derive(Debug)]
pub(crate) struct ClusterView {
    pub topology: Topology,
    /// Every node's health as the server that served the topology saw it.
    pub health: Vec<NodeHealth>,
    pub routes: RouteTable,
    /// `transports[node_index][core_index]`.
    pub transports: Vec<Vec<Arc<Transport>>>,
    /// The health of each node's connections, `node_health[node_index]`, kept across
    /// views by node id.
    node_health: Vec<(u32, SharedHealth)>,
}

impl ClusterView {
    /// Builds a view, taking existing transports from `previous` where the address matches.
    pub(crate) fn new(
        topology: Topology,
        health: Vec<NodeHealth>,
        previous: Option<&ClusterView>,
        mut make: impl FnMut(&str, u16, &SharedHealth) -> Transport,
    ) -> Result<Self, tessera_protocol::TopologyError> {
        let routes = RouteTable::new(&topology)?;
        let node_health: Vec<(u32, SharedHealth)> = topology
            .nodes
            .iter()
            .map(|node| {
                let known = previous.and_then(|view| {
                    view.node_health
                        .iter()
                        .find(|(node_id, _)| *node_id == node.node_id)
                });
                (
                    node.node_id,
                    known.map_or_else(SharedHealth::default, |(_, health)| health.clone()),
                )
            })
            .collect();
        let transports = topology
            .nodes
            .iter()
            .zip(&node_health)
            .map(|(node, (_, health))| {
                node.cores
                    .iter()
                    .map(|core| {
                        previous
                            .and_then(|view| view.transport_by_address(&core.address))
                            .unwrap_or_else(|| Arc::new(make(&core.address, core.core_id, health)))
                    })
                    .collect()
            })
            .collect();
        Ok(Self {
            topology,
            health,
            routes,
            transports,
            node_health,
        })
    }

    fn transport_by_address(&self, address: &str) -> Option<Arc<Transport>> {
        self.transports
            .iter()
            .flatten()
            .find(|transport| transport.address() == address)
            .cloned()
    }

    /// The transport to the core that owns `location`.
    pub(crate) fn transport(&self, location: ShardLocation) -> Option<Arc<Transport>> {
        self.transports
            .get(usize::from(location.node_index))?
            .get(usize::from(location.core_index))
            .cloned()
    }

    /// Every transport, in node and core order.
    pub(crate) fn all_transports(&self) -> impl Iterator<Item = (ShardLocation, &Arc<Transport>)> {
        self.transports
            .iter()
            .enumerate()
            .flat_map(|(node_index, cores)| {
                cores
                    .iter()
                    .enumerate()
                    .map(move |(core_index, transport)| {
                        let location = ShardLocation {
                            node_index: u16::try_from(node_index).unwrap_or(u16::MAX),
                            core_index: u16::try_from(core_index).unwrap_or(u16::MAX),
                        };
                        (location, transport)
                    })
            })
    }
}
