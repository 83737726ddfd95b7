//! Encoding messages into frames and decoding frames into validated, archived messages.
//!
//! Encoding appends to a buffer the caller owns and reuses ([`FrameBuffer`]), so the hot path
//! allocates nothing once buffers have grown. Decoding never copies: [`decode_frame`] checks
//! the header and the body checksum, then [`access_request`] / [`access_response`] validate
//! the archived body in place with bytecheck. Unvalidated access is never used on these bytes.
//!
//! **Precondition:** buffers handed to the decoder start at a 16-byte aligned address and
//! frames are removed from their front only whole, which keeps every body aligned.

use rkyv::rancor;
use rkyv::util::AlignedVec;

use crate::error::{ProtocolError, RequestError};
use crate::frame::{frame_size_for_body, FrameHeader, FrameKind, PROTOCOL_VERSION};
use crate::index::{ArchivedIndexSpec, ArchivedQueryRequest};
use crate::limits::{
    BATCH_COUNT_MAX, FRAME_ALIGNMENT, FRAME_BODY_SIZE_MAX, FRAME_HEADER_SIZE, KEY_SIZE_MAX,
    SCAN_LIMIT_MAX, TEXT_SIZE_MAX, TTL_MS_MAX, VALUE_SIZE_MAX, WATCH_PROGRESS_INTERVAL_MS_MAX,
    WATCH_PROGRESS_INTERVAL_MS_MIN,
};
use crate::limits::{
    FIELD_NAME_SIZE_MAX, INDEX_NAME_SIZE_MAX, LOCK_WAIT_MS_MAX, QUERY_LIMIT_MAX,
    QUERY_ORDER_BY_MAX, TXN_COMPARES_MAX, TXN_OPS_MAX,
};
use crate::message::{
    ArchivedCheck, ArchivedCounterAdd, ArchivedDeleteCondition, ArchivedPutCondition,
    ArchivedReply, ArchivedRequest, ArchivedResponse, ArchivedScan, ArchivedTxn, ArchivedTxnOp,
    ArchivedWatch, Reply, Request, Response, ShardStamp,
};
use crate::query::{check_fields, check_query, shown_name, Query};

/// A byte buffer whose start is 16-byte aligned, as frames and archived bodies need.
pub type FrameBuffer = AlignedVec<FRAME_ALIGNMENT>;

const PADDING: [u8; FRAME_ALIGNMENT] = [0; FRAME_ALIGNMENT];

/// One complete frame found at the front of a buffer.
#[derive(Debug, Clone, Copy)]
pub struct Frame<'a> {
    /// The validated header.
    pub header: FrameHeader,
    /// The body bytes, exactly `header.body_size` long, checksum verified.
    pub body: &'a [u8],
    /// Bytes the whole frame occupies, padding included; remove this many from the buffer.
    pub frame_size: usize,
}

/// A frame that cannot be accepted, with the request id when the header was intact enough to
/// read it (so the refusal can be addressed to the request).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{error}")]
pub struct FrameError {
    /// The request id from an intact header, if any.
    pub request_id: Option<u64>,
    /// What is wrong.
    pub error: ProtocolError,
}

/// Looks for one complete frame at the front of `bytes`.
///
/// Returns `Ok(None)` when more bytes are needed; use [`frame_size_needed`] to learn how many.
/// A header announcing a body over the limit is refused here, before the body arrives, so a
/// receiver never allocates for it.
///
/// # Errors
/// The frame is invalid; the connection it came from cannot be trusted any more.
pub fn decode_frame(bytes: &[u8]) -> Result<Option<Frame<'_>>, FrameError> {
    let Some(header_bytes) = bytes.first_chunk::<FRAME_HEADER_SIZE>() else {
        return Ok(None);
    };
    let header = FrameHeader::from_bytes(header_bytes).map_err(|reason| FrameError {
        request_id: None,
        error: ProtocolError::BadHeader { reason },
    })?;
    let refuse = |error| {
        Err(FrameError {
            request_id: Some(header.request_id),
            error,
        })
    };
    if header.version != PROTOCOL_VERSION {
        return refuse(ProtocolError::UnsupportedVersion {
            version: header.version,
            supported: PROTOCOL_VERSION,
        });
    }
    if header.body_size as usize > FRAME_BODY_SIZE_MAX {
        return refuse(ProtocolError::BodyTooLarge {
            body_size: header.body_size as usize,
            body_size_max: FRAME_BODY_SIZE_MAX,
        });
    }
    if let Some(reason) = header.invalid() {
        return refuse(ProtocolError::BadHeader { reason });
    }
    let frame_size = header.frame_size();
    if bytes.len() < frame_size {
        return Ok(None);
    }
    let body = &bytes[FRAME_HEADER_SIZE..FRAME_HEADER_SIZE + header.body_size as usize];
    let actual = crc32fast::hash(body);
    if actual != header.body_checksum {
        return refuse(ProtocolError::BodyChecksum {
            expected: header.body_checksum,
            actual,
        });
    }
    Ok(Some(Frame {
        header,
        body,
        frame_size,
    }))
}

/// How many bytes the frame at the front of `bytes` occupies in total, once its header has
/// arrived; `None` before that or if the header is invalid.
#[must_use]
pub fn frame_size_needed(bytes: &[u8]) -> Option<usize> {
    let header = FrameHeader::from_bytes(bytes.first_chunk::<FRAME_HEADER_SIZE>()?).ok()?;
    if header.invalid().is_some() {
        return None;
    }
    Some(header.frame_size())
}

/// Validates a request body in place and returns a view of it.
///
/// # Errors
/// The body is not a valid archived [`Request`] (or is misaligned).
pub fn access_request(body: &[u8]) -> Result<&ArchivedRequest, ProtocolError> {
    rkyv::access::<ArchivedRequest, rancor::BoxedError>(body).map_err(|error| {
        ProtocolError::InvalidBody {
            reason: error.to_string(),
        }
    })
}

/// Validates a response body (an archived [`Reply`]) in place and returns a view of it.
///
/// # Errors
/// The body is not a valid archived [`Reply`] (or is misaligned).
pub fn access_reply(body: &[u8]) -> Result<&ArchivedReply<'_>, ProtocolError> {
    rkyv::access::<ArchivedReply, rancor::BoxedError>(body).map_err(|error| {
        ProtocolError::InvalidBody {
            reason: error.to_string(),
        }
    })
}

/// Validates a response body in place and returns a view of its response.
///
/// # Errors
/// The body is not a valid archived [`Reply`] (or is misaligned).
pub fn access_response(body: &[u8]) -> Result<&ArchivedResponse, ProtocolError> {
    access_reply(body).map(|reply| &reply.response)
}

/// Validates and deserializes a response body into its owned [`Response`].
///
/// # Errors
/// The body is not a valid archived [`Reply`].
pub fn decode_response(body: &[u8]) -> Result<Response, ProtocolError> {
    decode_reply(body).map(|(_, response)| response)
}

/// Validates and deserializes a response body into the shard state it reflects and its
/// owned [`Response`].
///
/// # Errors
/// The body is not a valid archived [`Reply`].
pub fn decode_reply(body: &[u8]) -> Result<(Option<ShardStamp>, Response), ProtocolError> {
    let archived = access_reply(body)?;
    let invalid = |error: rancor::BoxedError| ProtocolError::InvalidBody {
        reason: error.to_string(),
    };
    let response =
        rkyv::deserialize::<Response, rancor::BoxedError>(&archived.response).map_err(invalid)?;
    let stamp = archived.stamp.as_ref().map(|stamp| ShardStamp {
        node_id: stamp.node_id.to_native(),
        core_id: stamp.core_id.to_native(),
        revision: stamp.revision.to_native(),
    });
    Ok((stamp, response))
}

/// Validates and deserializes a request body into an owned [`Request`].
///
/// # Errors
/// The body is not a valid archived [`Request`].
pub fn decode_request(body: &[u8]) -> Result<Request, ProtocolError> {
    let archived = access_request(body)?;
    rkyv::deserialize::<Request, rancor::BoxedError>(archived).map_err(|error| {
        ProtocolError::InvalidBody {
            reason: error.to_string(),
        }
    })
}

/// Appends one request frame to `out`.
///
/// # Errors
/// The archived request is over [`FRAME_BODY_SIZE_MAX`]; `out` is left as it was.
pub fn encode_request(
    out: &mut FrameBuffer,
    request_id: u64,
    request: &Request,
) -> Result<(), ProtocolError> {
    encode_frame(out, FrameKind::Request, request_id, |out| {
        serialize(request, out)
    })
}

/// Appends one response frame to `out`, reflecting no shard (`stamp` `None`).
///
/// # Errors
/// The archived response is over [`FRAME_BODY_SIZE_MAX`]; `out` is left as it was.
pub fn encode_response(
    out: &mut FrameBuffer,
    request_id: u64,
    response: &Response,
) -> Result<(), ProtocolError> {
    encode_reply(out, request_id, None, response)
}

/// Appends one response frame to `out` that reflects `stamp`.
///
/// # Errors
/// The archived response is over [`FRAME_BODY_SIZE_MAX`]; `out` is left as it was.
pub fn encode_reply(
    out: &mut FrameBuffer,
    request_id: u64,
    stamp: Option<ShardStamp>,
    response: &Response,
) -> Result<(), ProtocolError> {
    encode_frame(out, FrameKind::Response, request_id, |out| {
        serialize(&Reply { stamp, response }, out)
    })
}

/// Appends one frame of `kind` around an already archived `body` (a reply computed on another
/// core, or a request from an in-process caller).
///
/// # Errors
/// `body` is over [`FRAME_BODY_SIZE_MAX`]; `out` is left as it was.
pub fn encode_frame_with_body(
    out: &mut FrameBuffer,
    kind: FrameKind,
    request_id: u64,
    body: &[u8],
) -> Result<(), ProtocolError> {
    encode_frame(out, kind, request_id, |out| {
        out.extend_from_slice(body);
        Ok(())
    })
}

/// Archives a request alone, without a frame, into `out` (which must be empty so the root
/// lands aligned). Used where no network is involved: embedded calls and cross-core forwards.
///
/// # Errors
/// The archived request is over [`FRAME_BODY_SIZE_MAX`].
pub fn encode_request_body(out: &mut FrameBuffer, request: &Request) -> Result<(), ProtocolError> {
    encode_body(out, |out| serialize(request, out))
}

/// Archives a response alone, without a frame, into `out` (which must be empty), reflecting
/// no shard.
///
/// # Errors
/// The archived response is over [`FRAME_BODY_SIZE_MAX`].
pub fn encode_response_body(
    out: &mut FrameBuffer,
    response: &Response,
) -> Result<(), ProtocolError> {
    encode_reply_body(out, None, response)
}

/// Archives a response that reflects `stamp`, without a frame, into `out` (which must be
/// empty).
///
/// # Errors
/// The archived response is over [`FRAME_BODY_SIZE_MAX`].
pub fn encode_reply_body(
    out: &mut FrameBuffer,
    stamp: Option<ShardStamp>,
    response: &Response,
) -> Result<(), ProtocolError> {
    encode_body(out, |out| serialize(&Reply { stamp, response }, out))
}

fn encode_body(
    out: &mut FrameBuffer,
    write: impl FnOnce(&mut FrameBuffer) -> Result<(), ProtocolError>,
) -> Result<(), ProtocolError> {
    assert!(
        out.is_empty(),
        "body buffer must start empty, len={}",
        out.len()
    );
    write(out)?;
    if out.len() > FRAME_BODY_SIZE_MAX {
        let body_size = out.len();
        out.clear();
        return Err(ProtocolError::BodyTooLarge {
            body_size,
            body_size_max: FRAME_BODY_SIZE_MAX,
        });
    }
    Ok(())
}

/// Serializes `value` at the end of `out`. rkyv writes children first and the root last;
/// relative pointers make the result independent of where in `out` it starts, as long as the
/// start is aligned.
fn serialize<T>(value: &T, out: &mut FrameBuffer) -> Result<(), ProtocolError>
where
    T: for<'a> rkyv::Serialize<
        rkyv::api::high::HighSerializer<
            FrameBuffer,
            rkyv::ser::allocator::ArenaHandle<'a>,
            rancor::BoxedError,
        >,
    >,
{
    // The serializer takes its writer by value; lend it the buffer and take it back, so the
    // caller's allocation is reused.
    let buffer = std::mem::take(out);
    match rkyv::api::high::to_bytes_in::<_, rancor::BoxedError>(value, buffer) {
        Ok(buffer) => {
            *out = buffer;
            Ok(())
        }
        Err(error) => Err(ProtocolError::Encode {
            reason: error.to_string(),
        }),
    }
}

fn encode_frame(
    out: &mut FrameBuffer,
    kind: FrameKind,
    request_id: u64,
    write_body: impl FnOnce(&mut FrameBuffer) -> Result<(), ProtocolError>,
) -> Result<(), ProtocolError> {
    let frame_start = out.len();
    assert!(
        frame_start % FRAME_ALIGNMENT == 0,
        "frame must start aligned, at={frame_start}"
    );
    out.extend_from_slice(&[0; FRAME_HEADER_SIZE]);
    let body_start = out.len();
    if let Err(error) = write_body(out) {
        out.resize(frame_start, 0);
        return Err(error);
    }
    let body_size = out.len() - body_start;
    if body_size > FRAME_BODY_SIZE_MAX {
        out.resize(frame_start, 0);
        return Err(ProtocolError::BodyTooLarge {
            body_size,
            body_size_max: FRAME_BODY_SIZE_MAX,
        });
    }
    let body_checksum = crc32fast::hash(&out[body_start..]);
    let padding_size = body_size.next_multiple_of(FRAME_ALIGNMENT) - body_size;
    out.extend_from_slice(&PADDING[..padding_size]);
    // body_size <= FRAME_BODY_SIZE_MAX, which a const assertion keeps within u32.
    #[allow(
        clippy::cast_possible_truncation,
        reason = "body_size <= FRAME_BODY_SIZE_MAX"
    )]
    let header = FrameHeader::new(kind, request_id, body_size as u32, body_checksum);
    out[frame_start..body_start].copy_from_slice(&header.to_bytes());
    debug_assert_eq!(out.len() - frame_start, frame_size_for_body(body_size));
    Ok(())
}

/// Checks a key's size.
///
/// # Errors
/// The key is empty or over [`KEY_SIZE_MAX`].
pub fn check_key(key: &[u8]) -> Result<(), RequestError> {
    if key.is_empty() {
        return Err(RequestError::EmptyKey);
    }
    if key.len() > KEY_SIZE_MAX {
        return Err(RequestError::KeyTooLarge {
            size: key.len(),
            size_max: KEY_SIZE_MAX,
        });
    }
    Ok(())
}

/// Checks a value's size.
///
/// # Errors
/// The value is over [`VALUE_SIZE_MAX`].
pub fn check_value(value: &[u8]) -> Result<(), RequestError> {
    if value.len() > VALUE_SIZE_MAX {
        return Err(RequestError::ValueTooLarge {
            size: value.len(),
            size_max: VALUE_SIZE_MAX,
        });
    }
    Ok(())
}

/// Checks a TTL.
///
/// # Errors
/// The TTL is zero or over [`TTL_MS_MAX`].
pub fn check_ttl(ttl_ms: u64) -> Result<(), RequestError> {
    if ttl_ms == 0 || ttl_ms > TTL_MS_MAX {
        return Err(RequestError::TtlOutOfRange {
            ttl_ms,
            ttl_ms_max: TTL_MS_MAX,
        });
    }
    Ok(())
}

/// Checks a lease id: 0 names no lease.
///
/// # Errors
/// The id is 0.
pub fn check_lease(id: u64) -> Result<(), RequestError> {
    if id == 0 {
        return Err(RequestError::ZeroLease);
    }
    Ok(())
}

/// Checks a batch's item count.
///
/// # Errors
/// The batch is over [`BATCH_COUNT_MAX`].
pub fn check_batch(count: usize) -> Result<(), RequestError> {
    if count > BATCH_COUNT_MAX {
        return Err(RequestError::BatchTooLarge {
            count,
            count_max: BATCH_COUNT_MAX,
        });
    }
    Ok(())
}

/// Checks a text field's size.
///
/// # Errors
/// The text is over [`TEXT_SIZE_MAX`].
pub fn check_text(text: &str) -> Result<(), RequestError> {
    if text.len() > TEXT_SIZE_MAX {
        return Err(RequestError::TextTooLarge {
            size: text.len(),
            size_max: TEXT_SIZE_MAX,
        });
    }
    Ok(())
}

/// Checks a watch's arguments: its range's bounds, that the range holds a key at all, that
/// it delivers puts or deletes, and its progress interval (0 for none).
///
/// # Errors
/// The first argument out of bounds, in that order.
pub fn check_watch(
    start: &[u8],
    end: Option<&[u8]>,
    puts: bool,
    deletes: bool,
    progress_interval_ms: u32,
) -> Result<(), RequestError> {
    check_bounds(start, end)?;
    if end.is_some_and(|end| end <= start) {
        // A watch that can never see a key is a mistake, not a quiet stream.
        return Err(RequestError::EmptyRange);
    }
    if !puts && !deletes {
        return Err(RequestError::WatchesNothing);
    }
    let allowed = WATCH_PROGRESS_INTERVAL_MS_MIN..=WATCH_PROGRESS_INTERVAL_MS_MAX;
    if progress_interval_ms != 0 && !allowed.contains(&progress_interval_ms) {
        return Err(RequestError::ProgressIntervalOutOfRange {
            interval_ms: progress_interval_ms,
            interval_ms_min: WATCH_PROGRESS_INTERVAL_MS_MIN,
            interval_ms_max: WATCH_PROGRESS_INTERVAL_MS_MAX,
        });
    }
    Ok(())
}

/// Checks a range's bounds: each may be empty (the start of the keyspace) but not longer
/// than a key.
///
/// # Errors
/// A bound over `KEY_SIZE_MAX`.
pub fn check_bounds(start: &[u8], end: Option<&[u8]>) -> Result<(), RequestError> {
    for bound in std::iter::once(start).chain(end) {
        if !bound.is_empty() {
            check_key(bound)?;
        }
    }
    Ok(())
}

/// Checks every argument of a validated request against the protocol's limits.
///
/// The structure was already validated by [`access_request`]; this checks the meaning: sizes
/// and ranges a well-formed message may still get wrong. Both the server (on arrival) and the
/// client (before sending) apply it.
///
/// # Errors
/// The first argument out of bounds.
pub fn check_request(request: &ArchivedRequest) -> Result<(), RequestError> {
    match request {
        ArchivedRequest::Hello { client_name, .. } => check_text(client_name.as_str()),
        ArchivedRequest::Get { key }
        | ArchivedRequest::Exists { key }
        | ArchivedRequest::Persist { key }
        | ArchivedRequest::Ttl { key } => check_key(key.as_slice()),
        ArchivedRequest::Delete(delete) => {
            check_key(delete.key.as_slice())?;
            match &delete.condition {
                ArchivedDeleteCondition::IfValue(expected) => check_value(expected.as_slice()),
                ArchivedDeleteCondition::Always | ArchivedDeleteCondition::IfVersion(_) => Ok(()),
            }
        }
        ArchivedRequest::Add(add) => check_add(add),
        ArchivedRequest::Txn(txn) => check_txn(txn),
        ArchivedRequest::Put(put) => {
            check_key(put.key.as_slice())?;
            check_value(put.value.as_slice())?;
            check_fields(&put.fields)?;
            if let ArchivedPutCondition::IfValue(expected) = &put.condition {
                check_value(expected.as_slice())?;
            }
            if let Some(lease) = put.lease.as_ref() {
                check_lease(lease.to_native())?;
            }
            match put.ttl_ms.as_ref() {
                Some(ttl_ms) => check_ttl(ttl_ms.to_native()),
                None => Ok(()),
            }
        }
        ArchivedRequest::Expire { key, ttl_ms } => {
            check_key(key.as_slice())?;
            check_ttl(ttl_ms.to_native())
        }
        ArchivedRequest::MultiGet { keys } | ArchivedRequest::MultiDelete { keys } => {
            check_batch(keys.len())?;
            keys.iter().try_for_each(|key| check_key(key.as_slice()))
        }
        ArchivedRequest::Ping
        | ArchivedRequest::Stats
        | ArchivedRequest::Unwatch { .. }
        | ArchivedRequest::WatchProgress { .. }
        | ArchivedRequest::LeaseList
        | ArchivedRequest::ListIndexes => Ok(()),
        ArchivedRequest::LeaseGrant { ttl_ms } => check_ttl(ttl_ms.to_native()),
        ArchivedRequest::LeaseKeepalive { ids } => {
            check_batch(ids.len())?;
            ids.iter().try_for_each(|id| check_lease(id.to_native()))
        }
        ArchivedRequest::LeaseRevoke { id } | ArchivedRequest::LeaseTimeToLive { id } => {
            check_lease(id.to_native())
        }
        ArchivedRequest::Lock {
            name,
            lease,
            wait_ms,
        } => {
            check_key(name.as_slice())?;
            check_lease(lease.to_native())?;
            let wait_ms = wait_ms.to_native();
            if wait_ms > LOCK_WAIT_MS_MAX {
                return Err(RequestError::LockWaitOutOfRange {
                    wait_ms,
                    wait_ms_max: LOCK_WAIT_MS_MAX,
                });
            }
            Ok(())
        }
        ArchivedRequest::Unlock { name, .. } => check_key(name.as_slice()),
        ArchivedRequest::Watch(watch) => check_watch_request(watch),
        ArchivedRequest::Scan(scan) => check_scan(scan),
        ArchivedRequest::CreateIndex(spec) => check_index_spec(spec),
        ArchivedRequest::DropIndex { name } => check_index_name(name.as_str()),
        ArchivedRequest::Query(query) => check_query_request(query),
        ArchivedRequest::MultiPut { entries } => {
            check_batch(entries.len())?;
            entries.iter().try_for_each(|entry| {
                check_key(entry.key.as_slice())?;
                check_value(entry.value.as_slice())?;
                check_fields(&entry.fields)?;
                match entry.ttl_ms.as_ref() {
                    Some(ttl_ms) => check_ttl(ttl_ms.to_native()),
                    None => Ok(()),
                }
            })
        }
    }
}

/// Checks a watch's range, flags, progress interval and query.
fn check_watch_request(watch: &ArchivedWatch) -> Result<(), RequestError> {
    check_watch(
        watch.start.as_slice(),
        watch.end.as_ref().map(rkyv::vec::ArchivedVec::as_slice),
        watch.puts,
        watch.deletes,
        watch.progress_interval_ms.to_native(),
    )?;
    match watch.query.as_ref() {
        Some(query) => check_query(&owned_query(query)?).map_err(RequestError::from),
        None => Ok(()),
    }
}

/// Checks an index definition: its name, then its prefix (empty or a key), then its field's
/// name (1..=`FIELD_NAME_SIZE_MAX` bytes).
fn check_index_spec(spec: &ArchivedIndexSpec) -> Result<(), RequestError> {
    check_index_name(spec.name.as_str())?;
    check_bound_key(spec.prefix.as_slice())?;
    let field = spec.field.as_str();
    if field.is_empty() || field.len() > FIELD_NAME_SIZE_MAX {
        return Err(RequestError::BadIndex {
            name: shown_name(spec.name.as_str()),
            reason: format!(
                "a field name has 1..={FIELD_NAME_SIZE_MAX} bytes, this one {}",
                field.len()
            ),
        });
    }
    Ok(())
}

/// Checks an index's name: 1..=`INDEX_NAME_SIZE_MAX` bytes.
fn check_index_name(name: &str) -> Result<(), RequestError> {
    if name.is_empty() || name.len() > INDEX_NAME_SIZE_MAX {
        return Err(RequestError::BadIndex {
            name: shown_name(name),
            reason: format!(
                "a name has 1..={INDEX_NAME_SIZE_MAX} bytes, this one {}",
                name.len()
            ),
        });
    }
    Ok(())
}

/// Checks a key used as a bound or prefix: empty, or a key's size.
fn check_bound_key(key: &[u8]) -> Result<(), RequestError> {
    if key.is_empty() {
        Ok(())
    } else {
        check_key(key)
    }
}

/// Checks a query's prefix, predicate, order, limit and cursor.
fn check_query_request(query: &ArchivedQueryRequest) -> Result<(), RequestError> {
    check_bound_key(query.prefix.as_slice())?;
    if let Some(filter) = query.filter.as_ref() {
        check_query(&owned_query(filter)?)?;
    }
    let bad = |reason: String| RequestError::BadQueryRequest { reason };
    if query.order_by.len() > QUERY_ORDER_BY_MAX {
        return Err(bad(format!(
            "order_by has {} fields, over the limit of {QUERY_ORDER_BY_MAX}",
            query.order_by.len()
        )));
    }
    for order in query.order_by.iter() {
        let field = order.field.as_str();
        if field.is_empty() || field.len() > FIELD_NAME_SIZE_MAX {
            return Err(bad(format!(
                "an order_by field name has 1..={FIELD_NAME_SIZE_MAX} bytes, this one {}",
                field.len()
            )));
        }
    }
    let limit = query.limit.to_native();
    if !query.count_only && !(1..=QUERY_LIMIT_MAX).contains(&limit) {
        return Err(bad(format!(
            "limit {limit} is outside 1..={QUERY_LIMIT_MAX}"
        )));
    }
    if let Some(after) = query.after.as_ref() {
        check_bound_key(after.key.as_slice())?;
        if after.sort.len() != query.order_by.len() {
            return Err(bad(format!(
                "the cursor has {} sort values for {} order_by fields",
                after.sort.len(),
                query.order_by.len()
            )));
        }
        for value in after.sort.iter().flatten() {
            if !value.to_owned_value().is_valid() {
                return Err(bad("a cursor value is invalid".to_owned()));
            }
        }
    }
    Ok(())
}

/// An archived query, owned (to be checked and evaluated).
///
/// # Errors
/// It cannot be deserialized (it passed validation, so this does not happen).
pub fn owned_query(query: &crate::query::ArchivedQuery) -> Result<Query, RequestError> {
    rkyv::deserialize::<Query, rancor::BoxedError>(query).map_err(|error| {
        RequestError::Unencodable {
            reason: error.to_string(),
        }
    })
}

/// Checks a scan's bounds and limit.
fn check_scan(scan: &ArchivedScan) -> Result<(), RequestError> {
    check_bounds(
        scan.start.as_slice(),
        scan.end.as_ref().map(rkyv::vec::ArchivedVec::as_slice),
    )?;
    let limit = scan.limit.to_native();
    if !scan.count_only && !(1..=SCAN_LIMIT_MAX).contains(&limit) {
        return Err(RequestError::ScanLimitOutOfRange {
            limit,
            limit_max: SCAN_LIMIT_MAX,
        });
    }
    Ok(())
}

/// Checks a counter add: its key, bounds that hold a value, and its TTL.
fn check_add(add: &ArchivedCounterAdd) -> Result<(), RequestError> {
    check_key(add.key.as_slice())?;
    if let (Some(min), Some(max)) = (add.min.as_ref(), add.max.as_ref()) {
        let (min, max) = (min.to_native(), max.to_native());
        if min > max {
            return Err(RequestError::EmptyBounds { min, max });
        }
    }
    match add.ttl_ms.as_ref() {
        Some(ttl_ms) => check_ttl(ttl_ms.to_native()),
        None if add.refresh_ttl => Err(RequestError::RefreshWithoutTtl),
        None => Ok(()),
    }
}

/// Checks a transaction: its counts, every compare and op, and that no branch names a key
/// twice. Which shard the keys live on is the server's to check.
fn check_txn(txn: &ArchivedTxn) -> Result<(), RequestError> {
    if txn_keys(txn).next().is_none() {
        // A transaction is sent to the shard of its keys; with none, it has no shard.
        return Err(RequestError::TxnWithoutKey);
    }
    if txn.compares.len() > TXN_COMPARES_MAX {
        return Err(RequestError::TxnTooLarge {
            what: "compares",
            count: txn.compares.len(),
            count_max: TXN_COMPARES_MAX,
        });
    }
    for compare in txn.compares.iter() {
        check_key(compare.key.as_slice())?;
        if let ArchivedCheck::Value(_, value) = &compare.check {
            check_value(value.as_slice())?;
        }
    }
    for branch in [&txn.success, &txn.failure] {
        if branch.len() > TXN_OPS_MAX {
            return Err(RequestError::TxnTooLarge {
                what: "ops",
                count: branch.len(),
                count_max: TXN_OPS_MAX,
            });
        }
        let mut keys: Vec<&[u8]> = Vec::with_capacity(branch.len());
        for op in branch.iter() {
            match op {
                ArchivedTxnOp::Get { key } | ArchivedTxnOp::Delete { key, .. } => {
                    check_key(key.as_slice())?;
                }
                ArchivedTxnOp::Put {
                    key,
                    value,
                    ttl_ms,
                    lease,
                    fields,
                    ..
                } => {
                    check_key(key.as_slice())?;
                    check_value(value.as_slice())?;
                    check_fields(fields)?;
                    if let Some(ttl_ms) = ttl_ms.as_ref() {
                        check_ttl(ttl_ms.to_native())?;
                    }
                    if let Some(lease) = lease.as_ref() {
                        check_lease(lease.to_native())?;
                    }
                }
                ArchivedTxnOp::Add(add) => check_add(add)?,
                ArchivedTxnOp::Range(scan) => check_scan(scan)?,
            }
            if let Some(key) = txn_op_key(op) {
                keys.push(key);
            }
        }
        keys.sort_unstable();
        if let Some(pair) = keys.windows(2).find(|pair| pair[0] == pair[1]) {
            return Err(RequestError::TxnDuplicateKey {
                key: printable_key(pair[0]),
            });
        }
    }
    Ok(())
}

/// The key an archived transaction op names, or `None` for a range.
#[must_use]
pub fn txn_op_key(op: &ArchivedTxnOp) -> Option<&[u8]> {
    match op {
        ArchivedTxnOp::Get { key }
        | ArchivedTxnOp::Put { key, .. }
        | ArchivedTxnOp::Delete { key, .. } => Some(key.as_slice()),
        ArchivedTxnOp::Add(add) => Some(add.key.as_slice()),
        ArchivedTxnOp::Range(_) => None,
    }
}

/// Every key an archived transaction names: its compares', then both branches' ops'.
pub fn txn_keys(txn: &ArchivedTxn) -> impl Iterator<Item = &[u8]> {
    txn.compares
        .iter()
        .map(|compare| compare.key.as_slice())
        .chain(
            txn.success
                .iter()
                .chain(txn.failure.iter())
                .filter_map(txn_op_key),
        )
}

/// A key as text for a message: UTF-8 shown as is (lossy), cut to 64 bytes.
#[must_use]
pub fn printable_key(key: &[u8]) -> String {
    const SHOWN_MAX: usize = 64;
    let shown = String::from_utf8_lossy(&key[..key.len().min(SHOWN_MAX)]).into_owned();
    if key.len() > SHOWN_MAX {
        format!("{shown:?}... ({} bytes)", key.len())
    } else {
        format!("{shown:?}")
    }
}

/// Checks an owned request as the server will: archives it and runs [`check_request`]. For
/// clients sending requests whose checks are not worth writing twice (transactions).
///
/// # Errors
/// The request cannot be archived, or an argument is out of bounds.
pub fn check_owned_request(request: &Request) -> Result<(), RequestError> {
    let mut body = FrameBuffer::new();
    let unencodable = |error: ProtocolError| RequestError::Unencodable {
        reason: error.to_string(),
    };
    serialize(request, &mut body).map_err(unencodable)?;
    check_request(access_request(&body).map_err(unencodable)?)
}
