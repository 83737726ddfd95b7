//! A durable node restarted under a cluster table that moved its slots refuses to start,
//! naming the keys it holds of slots it no longer owns: serving them (scans would) or
//! dropping them (data loss) would both be wrong while data does not move between nodes.

mod common;

use tessera_protocol::{Put, PutCondition, Request, Response};
use tessera_server::config::{ClusterConfig, ClusterNode, Durability};
use tessera_server::{Config, Server};

use common::{free_port_pair, test_config, RawConnection, TestDir};

/// Node 1 (this server, two cores on `port`) and node 2 (never started), slots assigned in
/// the order of `ids`.
fn config(port: u16, peer_port: u16, data: &TestDir, ids: [u32; 2]) -> Config {
    let node = |id: u32| ClusterNode {
        id,
        name: format!("node-{id}"),
        host: format!("127.0.0.{id}"),
        port,
        cores: 2,
        peer_port: Some(peer_port),
        admin_port: Some(0),
    };
    Config {
        name: "node-1".to_owned(),
        node_id: 1,
        host: "127.0.0.1".to_owned(),
        port,
        cores: 2,
        peer_port: Some(peer_port),
        admin_port: Some(0),
        durability: Durability::Sync,
        data_dir: data.0.clone(),
        cluster: Some(ClusterConfig {
            epoch: 1,
            heartbeat_interval_ms: 100,
            failure_timeout_ms: 500,
            nodes: ids.iter().map(|&id| node(id)).collect(),
        }),
        ..test_config(2)
    }
}

#[test]
fn a_changed_table_that_moved_stored_keys_refuses_to_start() {
    let data = TestDir::new("reassign");
    let port = free_port_pair();
    let peer_port = free_port_pair();
    let server = Server::start(config(port, peer_port, &data, [1, 2])).expect("node 1 starts");
    // Node 1 owns the first half of the slots: write keys until a few landed on each core.
    let routes = tessera_protocol::RouteTable::new(server.topology()).expect("valid");
    let mut written = 0;
    for index in 0..200 {
        let key = format!("k{index}").into_bytes();
        let owner = routes.owner_of_key(&key);
        if owner.node_index != 0 {
            continue;
        }
        let address = &server.addresses()[usize::from(owner.core_index)];
        let mut connection = RawConnection::open(address);
        let reply = connection.call(&Request::Put(Box::new(Put {
            key,
            value: b"v".to_vec(),
            ttl_ms: None,
            keep_ttl: false,
            condition: PutCondition::Always,
            return_previous: false,
            lease: None,
            fields: Vec::new(),
        })));
        assert!(
            matches!(reply, Response::Put { applied: true, .. }),
            "{reply:?}"
        );
        written += 1;
    }
    assert!(written > 10);
    server.shutdown().expect("a clean stop");

    // The same table starts again with every key.
    let server = Server::start(config(port, peer_port, &data, [1, 2])).expect("restarts");
    server.shutdown().expect("a clean stop");

    // Node 2 first: node 1 now owns the second half, and its keys are of the first.
    let error = Server::start(config(port, peer_port, &data, [2, 1]))
        .expect_err("the moved keys are refused")
        .to_string();
    assert!(
        error.contains("does not own under this cluster table"),
        "{error}"
    );
    assert!(
        error.contains("data does not move between nodes"),
        "{error}"
    );
}
