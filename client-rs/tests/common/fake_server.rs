//! A scripted stand-in for a Tessera node, for the failures a healthy server never shows.
//!
//! It answers every handshake itself, with a one-node, one-core topology that points back at
//! its own address, so a client connects to it like to a real node. Every request is recorded,
//! and every one but the handshake is handed to the test's script with the index of the
//! connection it came on (0 for the first accepted). The script decides the reply: a
//! response, silence, raw bytes, or a closed connection. Tests use it to drive the client into silence (request
//! timeouts), endless redirects (`WrongShard`), malformed replies and dropped connections.
//!
//! The server runs as tokio tasks of the test's runtime and stops when it is dropped.

use std::sync::{Arc, Mutex, PoisonError};

use tessera_protocol::codec::{self, FrameBuffer};
use tessera_protocol::{
    split_slots, CoreInfo, NodeInfo, Request, Response, Topology, PROTOCOL_VERSION,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

/// Node id the fake server reports.
pub const FAKE_NODE_ID: u32 = 77;

/// What the fake server does with one request.
#[derive(Debug, Clone)]
pub enum Reply {
    /// Answer with this response, under the request's id.
    Response(Response),
    /// Never answer; keep the connection open.
    Nothing,
    /// Write these bytes instead of a frame.
    RawBytes(Vec<u8>),
    /// Close the connection without answering.
    Close,
}

/// Decides the reply to each request other than the handshake, given the index of the
/// connection it arrived on.
pub type Script = dyn Fn(usize, &Request) -> Reply + Send + Sync;

/// A running fake server.
pub struct FakeServer {
    address: String,
    log: Arc<Mutex<Vec<Request>>>,
    /// Dropping the accept task drops its set of connection tasks, which aborts them.
    accept_task: tokio::task::JoinHandle<()>,
}

impl FakeServer {
    /// Starts a fake server on a free loopback port that answers with `script`.
    pub async fn start(script: impl Fn(usize, &Request) -> Reply + Send + Sync + 'static) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a free loopback port");
        let address = listener
            .local_addr()
            .expect("a bound listener has an address")
            .to_string();
        let topology = Arc::new(fake_topology(&address));
        let script: Arc<Script> = Arc::new(script);
        let log = Arc::new(Mutex::new(Vec::new()));
        let accept_task = tokio::spawn(accept_loop(listener, topology, script, log.clone()));
        Self {
            address,
            log,
            accept_task,
        }
    }

    /// The address clients connect to.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// Every request received so far, handshakes included, in arrival order.
    pub fn received(&self) -> Vec<Request> {
        self.log
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// How many received requests `matches` accepts.
    pub fn received_count(&self, matches: impl Fn(&Request) -> bool) -> usize {
        self.received()
            .iter()
            .filter(|request| matches(request))
            .count()
    }
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        self.accept_task.abort();
    }
}

/// The topology the fake server advertises: one node whose one core at `address` owns every
/// slot.
pub fn fake_topology(address: &str) -> Topology {
    let slots = split_slots(1)[0];
    Topology {
        epoch: 1,
        nodes: vec![NodeInfo {
            node_id: FAKE_NODE_ID,
            name: "fake".to_owned(),
            cores: vec![CoreInfo {
                core_id: 0,
                address: address.to_owned(),
                slots,
            }],
        }],
    }
}

async fn accept_loop(
    listener: TcpListener,
    topology: Arc<Topology>,
    script: Arc<Script>,
    log: Arc<Mutex<Vec<Request>>>,
) {
    let mut connections = JoinSet::new();
    for connection_index in 0.. {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        connections.spawn(serve(
            stream,
            connection_index,
            topology.clone(),
            script.clone(),
            log.clone(),
        ));
    }
}

async fn serve(
    mut stream: TcpStream,
    connection_index: usize,
    topology: Arc<Topology>,
    script: Arc<Script>,
    log: Arc<Mutex<Vec<Request>>>,
) {
    // Received bytes, kept in an aligned buffer so that request bodies can be validated in
    // place; whole frames are removed from the front.
    let mut received = FrameBuffer::new();
    let mut chunk = vec![0_u8; 64 * 1024];
    loop {
        loop {
            let (request_id, request, frame_size) = match codec::decode_frame(&received) {
                Ok(Some(frame)) => {
                    let request = codec::decode_request(frame.body)
                        .unwrap_or_else(|error| panic!("the client sent a bad body: {error}"));
                    (frame.header.request_id, request, frame.frame_size)
                }
                Ok(None) => break,
                Err(error) => panic!("the client sent a bad frame: {error}"),
            };
            let rest = received[frame_size..].to_vec();
            received.clear();
            received.extend_from_slice(&rest);
            log.lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(request.clone());
            let reply = match request {
                Request::Hello { .. } => Reply::Response(Response::Hello {
                    protocol_version: PROTOCOL_VERSION,
                    node_id: FAKE_NODE_ID,
                    server_name: "fake".to_owned(),
                    topology: (*topology).clone(),
                    health: Vec::new(),
                }),
                other => script(connection_index, &other),
            };
            let bytes = match reply {
                Reply::Response(response) => {
                    let mut frame = FrameBuffer::new();
                    codec::encode_response(&mut frame, request_id, &response)
                        .expect("a scripted response fits in a frame");
                    frame.to_vec()
                }
                Reply::Nothing => continue,
                Reply::RawBytes(bytes) => bytes,
                Reply::Close => return,
            };
            if stream.write_all(&bytes).await.is_err() {
                return;
            }
        }
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(read_size) => received.extend_from_slice(&chunk[..read_size]),
        }
    }
}
