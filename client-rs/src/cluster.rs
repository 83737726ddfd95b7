//! `Client::cluster_status`: every node of the topology, whether it answers this client, and
//! what the nodes' failure detectors say of each other, for `tessera cluster status` and for
//! services that want to see a partition before their requests do.

use std::time::{Duration, Instant};

use futures_util::future::join_all;
use tessera_protocol::{NodeHealth, NodeState, Request, Response, PROTOCOL_VERSION};

use crate::connection::server_error;
use crate::error::Result;
use crate::{unexpected, Client, ClientError};

/// The cluster as this client and every node it reached see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterStatus {
    /// The epoch of the topology the client routes by.
    pub epoch: u64,
    /// Every node, in topology order.
    pub nodes: Vec<NodeStatus>,
}

/// One node's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeStatus {
    /// The node's id.
    pub node_id: u32,
    /// Its instance name.
    pub name: String,
    /// Its cores' addresses.
    pub addresses: Vec<String>,
    /// The summary: `Up` if it answered this client or any node hears its heartbeats, `Down`
    /// if it did not answer and every node that answered reports it down, else `Unknown`.
    pub state: NodeState,
    /// Its answer to this client's handshake (the round trip), or why there was none.
    pub answer: std::result::Result<Duration, String>,
    /// The topology epoch it serves, if it answered.
    pub epoch: Option<u64>,
    /// What each node that answered reports of this one: (observer's node id, its view).
    pub seen_by: Vec<(u32, NodeHealth)>,
}

/// A node's answer to the handshake (round trip, epoch, its view of every node), or why not.
type HandshakeAnswer = std::result::Result<(Duration, u64, Vec<NodeHealth>), String>;

impl Client {
    /// Asks every node (its first core) for its handshake, in parallel, and combines the
    /// answers with the health each node reports of the others. A node that is marked down
    /// answers at once with the reason.
    ///
    /// # Errors
    /// None today: a node that does not answer is reported, not an error.
    pub async fn cluster_status(&self) -> Result<ClusterStatus> {
        let view = self.view();
        let hello = Request::Hello {
            protocol_version: PROTOCOL_VERSION,
            client_name: self.inner.config.client_name.clone(),
        };
        let asks = view.transports.iter().map(|cores| {
            let hello = &hello;
            async move {
                let transport = cores.first().ok_or("the node has no core")?;
                let started = Instant::now();
                match transport.call(hello).await {
                    Ok(Response::Hello {
                        topology, health, ..
                    }) => Ok((started.elapsed(), topology.epoch, health)),
                    Ok(Response::Error(reply)) => {
                        Err(server_error(reply.code, reply.message).to_string())
                    }
                    Ok(other) => Err(unexpected(&other).to_string()),
                    Err(error) => Err(error.to_string()),
                }
            }
        });
        let answers: Vec<HandshakeAnswer> = join_all(asks)
            .await
            .into_iter()
            .map(|answer| answer.map_err(|error: String| error))
            .collect();
        let nodes = view
            .topology
            .nodes
            .iter()
            .zip(&answers)
            .map(|(node, answer)| {
                let seen_by: Vec<(u32, NodeHealth)> = view
                    .topology
                    .nodes
                    .iter()
                    .zip(&answers)
                    .filter(|(observer, _)| observer.node_id != node.node_id)
                    .filter_map(|(observer, observer_answer)| {
                        let (_, _, health) = observer_answer.as_ref().ok()?;
                        let seen = health.iter().find(|seen| seen.node_id == node.node_id)?;
                        Some((observer.node_id, seen.clone()))
                    })
                    .collect();
                let heard = seen_by.iter().any(|(_, seen)| seen.state == NodeState::Up);
                let all_down = !seen_by.is_empty()
                    && seen_by
                        .iter()
                        .all(|(_, seen)| seen.state == NodeState::Down);
                let state = match answer {
                    Ok(_) => NodeState::Up,
                    Err(_) if heard => NodeState::Up,
                    Err(_) if all_down || view.topology.nodes.len() == 1 => NodeState::Down,
                    Err(_) => NodeState::Unknown,
                };
                NodeStatus {
                    node_id: node.node_id,
                    name: node.name.clone(),
                    addresses: node.cores.iter().map(|core| core.address.clone()).collect(),
                    state,
                    answer: answer
                        .as_ref()
                        .map(|(round_trip, _, _)| *round_trip)
                        .map_err(Clone::clone),
                    epoch: answer.as_ref().ok().map(|(_, epoch, _)| *epoch),
                    seen_by,
                }
            })
            .collect();
        Ok(ClusterStatus {
            epoch: view.topology.epoch,
            nodes,
        })
    }
}

impl ClientError {
    /// Whether the error says the request's node is down or unreachable (nothing sent, or
    /// sent to a node that stopped answering).
    #[must_use]
    pub fn is_node_failure(&self) -> bool {
        matches!(
            self,
            Self::Unavailable { .. } | Self::Connect { .. } | Self::Timeout { .. }
        )
    }
}
