//! The Tessera wire protocol: frames, rkyv messages, limits and slot routing.
//!
//! Every message travels as a frame: a fixed 32-byte header (magic, version, kind, request id,
//! body size, body CRC32, header CRC32) followed by an rkyv-archived [`Request`] or
//! [`Response`], padded to 16 bytes. Receivers validate the archive in place (bytecheck) and
//! read it without copying. The format is drawn byte by byte in `docs/protocol.md`.
//!
//! This crate does no I/O and depends on no runtime: client, server and tests share it.
//!
//! # Layout
//! - [`frame`]: the header, its byte layout and its `invalid()` check.
//! - [`message`]: one request variant per command, one response variant per answer.
//! - [`codec`]: encode into a caller's buffer; decode into incomplete, invalid or validated.
//! - [`limits`]: every size a peer can send, with compile-time relations between them.
//! - [`index`]: index definitions and states, query requests, pages and plans.
//! - [`query`]: typed field values and query predicates: checks, evaluation, the readable
//!   syntax.
//! - [`routing`]: `slot = crc32(hash_tag(key)) mod 16384`.
//! - [`topology`]: nodes, cores, slot ranges and the route table built from them.
//! - [`error`]: wire error codes and decoding errors.
//!
//! # Example
//! ```
//! use tessera_protocol::{codec, Put, Request};
//!
//! let mut buffer = codec::FrameBuffer::new();
//! codec::encode_request(&mut buffer, 7, &Request::Put(Box::new(Put::new("k", "v")))).unwrap();
//! let frame = codec::decode_frame(&buffer).unwrap().unwrap();
//! assert_eq!(frame.header.request_id, 7);
//! let request = codec::access_request(frame.body).unwrap();
//! assert!(codec::check_request(request).is_ok());
//! ```

#![deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod codec;
pub mod error;
pub mod frame;
pub mod index;
pub mod limits;
pub mod message;
pub mod query;
pub mod routing;
pub mod topology;

pub use error::{ErrorCode, ProtocolError, RequestError};
pub use frame::{FrameHeader, FrameKind, MAGIC, PROTOCOL_VERSION};
pub use index::{
    IndexInfo, IndexKind, IndexSpec, IndexState, OrderBy, Projection, QueryAccess, QueryCursor,
    QueryItem, QueryPage, QueryPlan, QueryRequest,
};
pub use message::{
    key_after, prefix_end, ArchivedPut, ArchivedPutCondition, ArchivedReply, ArchivedRequest,
    ArchivedResponse, Check, Compare, CompareOp, CoreStats, CounterAdd, Delete, DeleteCondition,
    Entry, ErrorReply, EventBatch, EventKind, LeaseId, LeaseState, Put, PutCondition, PutEntry,
    Reply, Request, Response, Scan, ScanItem, ScanPage, ShardStamp, TtlState, Txn, TxnOp,
    TxnOutcome, TxnResult, Watch, WatchCancel, WatchEvent, WatchEvents, WatchFrom, Watching,
    WrongShard,
};
pub use query::{Field, FieldValue, Query};
pub use routing::{hash_tag, slot_for_key, split_slots, Slot, SlotRange, SLOT_COUNT};
pub use topology::{
    CoreInfo, NodeHealth, NodeInfo, NodeState, RouteTable, ShardLocation, Topology, TopologyError,
};
