//! What the integration tests share: a server started in-process on free loopback ports, and
//! a raw-frame connection over a blocking `std::net::TcpStream` (mini-redis `tests/server.rs`
//! style), so the tests see exactly the bytes a client would.
//!
//! Every socket has read and write timeouts ([`IO_TIMEOUT`]): a server that stops answering
//! fails the test instead of hanging it. Each test binary uses a different subset of these
//! helpers.

#![allow(
    dead_code,
    reason = "each test binary uses a different subset of the helpers"
)]

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use tessera_protocol::codec::{self, FrameBuffer};
use tessera_protocol::limits::FRAME_HEADER_SIZE;
use tessera_protocol::{
    CoreStats, Entry, ErrorCode, ErrorReply, FrameKind, Put, Request, Response, RouteTable,
    PROTOCOL_VERSION,
};
use tessera_server::{Config, Server};

/// Longest a socket read or write may block before the test fails.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// Bytes read per call; a frame larger than this grows the buffer to the frame's size.
const READ_SIZE: usize = 64 * 1024;

/// Memory budget of test servers: small and fixed, so tests do not depend on the host's RAM.
pub const TEST_MEMORY_BYTES_MAX: u64 = 256 * 1024 * 1024;

/// A configuration for a test server with `core_count` cores, each on a free port.
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
    start_server_with(test_config(core_count))
}

/// Starts a server with `config`, failing the test if it cannot start.
pub fn start_server_with(config: Config) -> Server {
    Server::start(config)
        .unwrap_or_else(|start_error| panic!("server did not start: {start_error}"))
}

/// The route table of a running server, as a smart client would build it from the handshake.
pub fn route_table(server: &Server) -> RouteTable {
    RouteTable::new(server.topology()).expect("the server's topology is valid")
}

/// The core (index into `server.addresses()`) that owns `key`. Test servers are one node.
pub fn owner_core(routes: &RouteTable, key: &[u8]) -> usize {
    let location = routes.owner_of_key(key);
    assert_eq!(location.node_index, 0, "a test server is a single node");
    usize::from(location.core_index)
}

/// The first `count` keys named `prefix-N` (N = 0, 1, ...) that core `core_index` owns.
pub fn keys_owned_by(
    routes: &RouteTable,
    core_index: usize,
    prefix: &str,
    count: usize,
) -> Vec<Vec<u8>> {
    (0..)
        .map(|key_index| format!("{prefix}-{key_index}").into_bytes())
        .filter(|key| owner_core(routes, key) == core_index)
        .take(count)
        .collect()
}

/// Calls `condition` until it holds or `timeout` passes; returns whether it held.
pub fn wait_until(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Whether `io_error` means the peer closed or reset the connection (as opposed to a timeout).
pub fn is_disconnect(io_error: &io::Error) -> bool {
    matches!(
        io_error.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::UnexpectedEof
    )
}

/// One client connection that speaks raw frames.
///
/// Requests are framed into a write buffer and sent with [`RawConnection::flush`]; replies are
/// read into a 16-byte aligned buffer from which whole frames are removed from the front, the
/// same discipline the server uses, so every body is aligned when it is validated.
pub struct RawConnection {
    stream: TcpStream,
    /// Received bytes; `[0, filled)` is data. Its length is the room available for reads.
    read_buffer: FrameBuffer,
    filled: usize,
    /// Framed requests not yet sent.
    write_buffer: FrameBuffer,
    /// The last request id handed out by [`RawConnection::call`] and friends.
    request_id_last: u64,
}

impl RawConnection {
    /// Connects to `address`, failing the test if it cannot.
    pub fn open(address: &str) -> Self {
        Self::try_open(address)
            .unwrap_or_else(|io_error| panic!("connect to {address}: {io_error}"))
    }

    /// Connects to `address`.
    pub fn try_open(address: &str) -> io::Result<Self> {
        let stream = TcpStream::connect(address)?;
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.set_write_timeout(Some(IO_TIMEOUT))?;
        stream.set_nodelay(true)?;
        let mut read_buffer = FrameBuffer::with_capacity(READ_SIZE);
        read_buffer.resize(READ_SIZE, 0);
        Ok(Self {
            stream,
            read_buffer,
            filled: 0,
            write_buffer: FrameBuffer::new(),
            request_id_last: 0,
        })
    }

    /// The underlying socket, for tests that need to change its options.
    pub fn stream(&self) -> &TcpStream {
        &self.stream
    }

    /// Frames `request` with `request_id` into the write buffer; [`Self::flush`] sends it.
    pub fn queue(&mut self, request_id: u64, request: &Request) {
        codec::encode_request(&mut self.write_buffer, request_id, request)
            .unwrap_or_else(|protocol_error| panic!("cannot encode {request:?}: {protocol_error}"));
    }

    /// Sends everything queued.
    pub fn flush(&mut self) -> io::Result<()> {
        let outcome = self.stream.write_all(&self.write_buffer);
        self.write_buffer.clear();
        outcome
    }

    /// Sends one request with `request_id` now.
    pub fn send(&mut self, request_id: u64, request: &Request) -> io::Result<()> {
        self.queue(request_id, request);
        self.flush()
    }

    /// Sends bytes as they are, for malformed frames.
    pub fn send_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes)
    }

    /// Reads the next reply frame: `Ok(None)` when the server closed the connection cleanly
    /// between frames. A reply that is not a valid response frame fails the test.
    pub fn receive(&mut self) -> io::Result<Option<(u64, Response)>> {
        loop {
            if let Some(reply) = self.take_frame() {
                return Ok(Some(reply));
            }
            let frame_size = codec::frame_size_needed(&self.read_buffer[..self.filled]);
            let room_needed = frame_size.unwrap_or(0).max(self.filled + READ_SIZE);
            if self.read_buffer.len() < room_needed {
                self.read_buffer.resize(room_needed, 0);
            }
            match self.stream.read(&mut self.read_buffer[self.filled..]) {
                Ok(0) => {
                    assert_eq!(
                        self.filled, 0,
                        "the server closed the connection in the middle of a frame"
                    );
                    return Ok(None);
                }
                Ok(read_size) => self.filled += read_size,
                Err(io_error) if io_error.kind() == io::ErrorKind::Interrupted => {}
                Err(io_error) => return Err(io_error),
            }
        }
    }

    /// Removes one complete reply frame from the front of the read buffer, if there is one.
    fn take_frame(&mut self) -> Option<(u64, Response)> {
        let (request_id, response, frame_size) =
            match codec::decode_frame(&self.read_buffer[..self.filled]) {
                Ok(Some(frame)) => {
                    assert_eq!(
                        frame.header.frame_kind(),
                        Some(FrameKind::Response),
                        "the server sent a frame that is not a response: {:?}",
                        frame.header
                    );
                    let response =
                        codec::decode_response(frame.body).unwrap_or_else(|protocol_error| {
                            panic!("the server sent an invalid body: {protocol_error}")
                        });
                    (frame.header.request_id, response, frame.frame_size)
                }
                Ok(None) => return None,
                Err(frame_error) => panic!("the server sent an invalid frame: {frame_error}"),
            };
        self.read_buffer.copy_within(frame_size..self.filled, 0);
        self.filled -= frame_size;
        Some((request_id, response))
    }

    /// Reads the next reply, failing the test on a timeout, an error or a closed connection.
    pub fn reply(&mut self) -> (u64, Response) {
        match self.receive() {
            Ok(Some(reply)) => reply,
            Ok(None) => panic!("the server closed the connection instead of replying"),
            Err(io_error) => panic!("no reply: {io_error}"),
        }
    }

    /// Asserts that the server closes the connection next: no further frame, and end of file
    /// or a reset rather than a timeout.
    pub fn expect_closed(&mut self) {
        match self.receive() {
            Ok(None) => {}
            Ok(Some((request_id, response))) => {
                panic!("expected the connection to close, got reply {request_id}: {response:?}")
            }
            Err(io_error) if is_disconnect(&io_error) => {}
            Err(io_error) => panic!("expected the connection to close, got: {io_error}"),
        }
    }

    /// Sends `request` with the next request id and returns its reply, checking the id.
    pub fn call(&mut self, request: &Request) -> Response {
        self.request_id_last += 1;
        let request_id = self.request_id_last;
        self.send(request_id, request)
            .unwrap_or_else(|io_error| panic!("cannot send {request:?}: {io_error}"));
        let (reply_id, response) = self.reply();
        assert_eq!(reply_id, request_id, "reply to {request:?}: {response:?}");
        response
    }

    /// Sends `requests` pipelined, `window` at a time, and returns their replies in request
    /// order. Replies may arrive in any order; each must carry a request id of its window, once.
    pub fn call_many(&mut self, requests: &[Request], window: usize) -> Vec<Response> {
        let mut responses: Vec<Option<Response>> = vec![None; requests.len()];
        for (window_index, chunk) in requests.chunks(window).enumerate() {
            let request_id_first = self.request_id_last + 1;
            for request in chunk {
                self.request_id_last += 1;
                self.queue(self.request_id_last, request);
            }
            self.flush()
                .unwrap_or_else(|io_error| panic!("cannot send a window: {io_error}"));
            for _ in chunk {
                let (request_id, response) = self.reply();
                assert!(
                    (request_id_first..=self.request_id_last).contains(&request_id),
                    "reply id {request_id} is outside the window \
                     {request_id_first}..={}",
                    self.request_id_last
                );
                let offset = usize::try_from(request_id - request_id_first).expect("small");
                let slot = &mut responses[window_index * window + offset];
                assert!(slot.is_none(), "a second reply for request id {request_id}");
                *slot = Some(response);
            }
        }
        responses
            .into_iter()
            .map(|response| response.expect("every request was answered"))
            .collect()
    }

    /// Puts `key` = `value` and returns the key's new mod revision, failing the test unless
    /// applied.
    pub fn put(&mut self, key: &[u8], value: &[u8]) -> u64 {
        match self.call(&put_request(key, value)) {
            Response::Put {
                applied: true,
                mod_revision,
                ..
            } => mod_revision,
            other => panic!("put {key:?}: {other:?}"),
        }
    }

    /// Reads `key`'s entry.
    pub fn get(&mut self, key: &[u8]) -> Option<Entry> {
        match self.call(&get_request(key)) {
            Response::Value(entry) => entry,
            other => panic!("get {key:?}: {other:?}"),
        }
    }

    /// The counters of the core this connection is attached to.
    pub fn stats(&mut self) -> CoreStats {
        match self.call(&Request::Stats) {
            Response::Stats(stats) => *stats,
            other => panic!("stats: {other:?}"),
        }
    }

    /// Asserts that a put and a get on this connection still work.
    pub fn assert_serving(&mut self, key: &[u8]) {
        let value = format!("value of {}", String::from_utf8_lossy(key)).into_bytes();
        let mod_revision = self.put(key, &value);
        let entry = self.get(key).expect("the key just written exists");
        assert_eq!(entry.value, value);
        assert_eq!(entry.mod_revision, mod_revision);
    }
}

/// An unconditional put with no TTL.
pub fn put_request(key: &[u8], value: &[u8]) -> Request {
    Request::Put(Box::new(Put::new(key, value)))
}

/// A get.
pub fn get_request(key: &[u8]) -> Request {
    Request::Get { key: key.to_vec() }
}

/// A handshake in this crate's protocol version.
pub fn hello_request() -> Request {
    Request::Hello {
        protocol_version: PROTOCOL_VERSION,
        client_name: "integration-test".to_owned(),
    }
}

/// The error a response carries, failing the test if it is not an error with `code`.
pub fn expect_error(response: &Response, code: ErrorCode) -> &ErrorReply {
    match response {
        Response::Error(reply) if reply.code == code => reply,
        other => panic!("expected a {code} error, got {other:?}"),
    }
}

/// A frame exactly as a client would send it: header, body and zero padding to 16 bytes.
pub fn frame_bytes(header: &tessera_protocol::FrameHeader, body: &[u8]) -> Vec<u8> {
    let mut bytes = header.to_bytes().to_vec();
    bytes.extend_from_slice(body);
    let padded_size = FRAME_HEADER_SIZE
        + body
            .len()
            .next_multiple_of(tessera_protocol::limits::FRAME_ALIGNMENT);
    bytes.resize(padded_size, 0);
    bytes
}

/// A port `base` such that `base` and `base + 1` are free now, and `base + 1000`, the admin
/// port a server on `base` derives. Candidates lie below Linux's ephemeral range (32768 and
/// up), where other tests' port-0 listeners and client sockets do not land.
pub fn free_port_pair() -> u16 {
    let random = RandomState::new();
    for attempt in 0..1000_u32 {
        let offset = u16::try_from(random.hash_one(attempt) % 12_000).unwrap();
        let base = 20_000 + offset;
        let first = TcpListener::bind(("127.0.0.1", base));
        let second = TcpListener::bind(("127.0.0.1", base + 1));
        let admin = TcpListener::bind(("127.0.0.1", base + 1000));
        if first.is_ok() && second.is_ok() && admin.is_ok() {
            return base;
        }
    }
    panic!("no free base, base + 1 and base + 1000 found");
}

/// A directory of the test's own under the temporary directory, removed when dropped.
pub struct TestDir(pub std::path::PathBuf);

impl TestDir {
    pub fn new(name: &str) -> Self {
        let path = std::env::temp_dir().join(format!(
            "tessera-{name}-{}-{}",
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
