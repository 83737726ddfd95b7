//! The client's error type. Every error says whether the request certainly did not apply
//! (retryable), may or may not have applied (indeterminate), or will fail again (fatal).

use std::time::Duration;

use tessera_protocol::{ErrorCode, ProtocolError, RequestError};

/// What went wrong with a request.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The server answered with an error.
    #[error("server error {code}: {message}")]
    Server {
        /// The wire code; branch on this.
        code: ErrorCode,
        /// The server's explanation.
        message: String,
    },
    /// The request was refused before sending: an argument is out of the protocol's limits.
    #[error("invalid request: {0}")]
    InvalidRequest(#[from] RequestError),
    /// No connection could be made; nothing was sent.
    #[error("cannot connect to {address}: {reason}")]
    Connect {
        /// The address tried.
        address: String,
        /// Why.
        reason: String,
    },
    /// The node is marked down: a connection to it failed, or it stopped answering. The
    /// request was not sent. The client probes the node in the background (with jittered
    /// exponential backoff) and sends to it again once it answers.
    #[error("node at {address} is down ({reason}); not sent")]
    Unavailable {
        /// The core's address.
        address: String,
        /// What marked it down.
        reason: String,
        /// How long it has been down.
        down_for: Duration,
    },
    /// The connection broke after the request was sent: it may or may not have applied.
    #[error("connection to {address} lost before the reply")]
    Disconnected {
        /// The server's address.
        address: String,
    },
    /// No reply arrived in time: the request may or may not have applied.
    #[error("no reply from {address} within {timeout:?}")]
    Timeout {
        /// The server's address.
        address: String,
        /// The limit that passed.
        timeout: Duration,
    },
    /// The request could not be encoded (it is over a frame limit); nothing was sent.
    #[error("cannot encode the request: {0}")]
    Encode(ProtocolError),
    /// The server sent bytes that are not a valid frame or message. The connection is closed;
    /// every request in flight on it was sent and may or may not have applied.
    #[error("protocol error from {address}: {error}")]
    Protocol {
        /// The server's address.
        address: String,
        /// What was wrong.
        error: ProtocolError,
    },
    /// The server's reply does not fit the request (a server bug).
    #[error("unexpected reply: {0}")]
    UnexpectedReply(String),
    /// The cluster topology could not be obtained or is unusable.
    #[error("topology unavailable: {0}")]
    Topology(String),
    /// The client (or its embedded server) has been shut down.
    #[error("client is shut down")]
    ShutDown,
    /// A watch cannot resume where asked: the shard's history no longer holds every event
    /// after that revision. Resume after `oldest_available` at the earliest, or watch again
    /// with a snapshot.
    #[error(
        "watch on node {node_id} core {core_id} is compacted: the oldest revision to resume \
         after is {oldest_available}"
    )]
    Compacted {
        /// The node of the shard.
        node_id: u32,
        /// The core (shard).
        core_id: u16,
        /// The oldest revision a watch on that shard can resume after.
        oldest_available: u64,
    },
    /// A watch asked to resume has no position for a shard it covers.
    #[error("no resume position for node {node_id} core {core_id}")]
    MissingPosition {
        /// The node of the shard.
        node_id: u32,
        /// The core (shard).
        core_id: u16,
    },
    /// A watch fell behind: the server (or the client, for a consumer that stopped reading)
    /// had more events queued for it than its bound. Every event up to `last_delivered` was
    /// delivered; resume after it or watch again with a snapshot.
    #[error(
        "watch on node {node_id} core {core_id} lagged: events were delivered up to revision \
         {last_delivered}"
    )]
    Lagged {
        /// The node of the shard.
        node_id: u32,
        /// The core (shard).
        core_id: u16,
        /// The last revision delivered from that shard.
        last_delivered: u64,
    },
    /// A counter read found a value that is not the decimal text of an `i64`.
    #[error("the value under {key:?} ({size} bytes) is not a counter")]
    NotACounter {
        /// The key, as text.
        key: String,
        /// The value's size.
        size: usize,
    },
    /// An optimistic transaction kept losing to concurrent writers.
    #[error("optimistic transaction conflicted {attempts} times; gave up")]
    Conflict {
        /// Attempts made.
        attempts: u32,
    },
}

impl ClientError {
    /// Whether the request certainly had no effect and may be sent again.
    #[must_use]
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Server { code, .. } => code.is_retryable(),
            Self::Connect { .. } | Self::Unavailable { .. } | Self::Conflict { .. } => true,
            _ => false,
        }
    }

    /// Whether the request was sent but its outcome is unknown.
    #[must_use]
    pub fn is_indeterminate(&self) -> bool {
        match self {
            Self::Disconnected { .. } | Self::Timeout { .. } | Self::Protocol { .. } => true,
            Self::Server { code, .. } => *code == ErrorCode::Internal,
            _ => false,
        }
    }

    /// The server's error code, if the server answered with an error.
    #[must_use]
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Self::Server { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// Result of a client call.
pub type Result<T, E = ClientError> = std::result::Result<T, E>;
