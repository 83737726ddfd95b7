//! How the load generator speaks to each target over a socket: encode one request, recognise
//! one complete reply at the front of the receive buffer.
//!
//! - [`TesseraWire`] uses the protocol crate's codec, exactly as the smart client does:
//!   checksummed frames with rkyv bodies, replies validated in place (`access_response`).
//! - [`EchoWire`] sends the same Tessera frames to the echo server, which returns them
//!   unchanged; it validates each echoed body the same way, so the client does the same work
//!   per message and the echo run measures the machine's loopback ceiling for that traffic.
//! - [`RedisWire`] speaks RESP2 for GET, SET, INCR and DEL.
//!
//! Replies are matched to requests in send order (Redis and echo answer in order); Tessera
//! replies also carry their request id, which the driver checks.

use tessera_protocol::codec::{self, FrameBuffer};
use tessera_protocol::{ArchivedResponse, CounterAdd, Delete, Field, FieldValue, Put, Request};

use crate::workload::{key_index, Op, FIELD_MODULI};

/// One reply found at the front of a receive buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reply {
    /// Bytes the reply occupies; remove them before looking for the next one.
    pub size: usize,
    /// The request id it answers, for protocols that carry one.
    pub request_id: Option<u64>,
    /// Whether the target answered with an error.
    pub is_error: bool,
}

/// A target's wire protocol.
pub trait Wire {
    /// Appends one request for `op` on `key` (writing `value`) to `out`.
    ///
    /// # Errors
    /// The operation cannot be expressed in this protocol.
    fn encode(
        &mut self,
        op: Op,
        key: &[u8],
        value: &[u8],
        request_id: u64,
        out: &mut FrameBuffer,
    ) -> Result<(), String>;

    /// Looks for one complete reply at the front of `bytes`; `Ok(None)` if more bytes are
    /// needed.
    ///
    /// # Errors
    /// The bytes are not a valid reply; the connection cannot be used any more.
    fn decode(&self, bytes: &[u8]) -> Result<Option<Reply>, String>;

    /// Bytes the receive buffer must hold for the reply at the front of `bytes` to fit, once
    /// that is known; `None` otherwise.
    fn reply_size_needed(&self, bytes: &[u8]) -> Option<usize>;
}

/// Why a lease renewal or a lock call cannot travel through a [`Wire`]: the lease and lock
/// workloads drive them through the client library (`lease_load`, which groups ids by their
/// home core, and `lock_load`, which waits in line).
const NOT_KEYED: &str =
    "a lease keepalive or lock call is not a keyed request; the raw driver cannot send it";

/// Reusable requests, so encoding allocates nothing once warm.
#[derive(Debug)]
struct TesseraRequests {
    get: Request,
    put: Request,
    delete: Request,
    add: Request,
    /// Whether puts carry the fields of `FIELD_MODULI`.
    fields: bool,
}

impl TesseraRequests {
    fn new(fields: bool) -> Self {
        let mut put = Put::new(Vec::new(), Vec::new());
        if fields {
            put.fields = FIELD_MODULI
                .iter()
                .map(|(name, _)| Field::new(*name, FieldValue::I64(0)))
                .collect();
        }
        Self {
            get: Request::Get { key: Vec::new() },
            put: Request::Put(Box::new(put)),
            delete: Request::Delete(Box::new(Delete::new(Vec::new()))),
            add: Request::Add(Box::new(CounterAdd::new(Vec::new(), 1))),
            fields,
        }
    }

    fn encode(
        &mut self,
        op: Op,
        key: &[u8],
        value: &[u8],
        request_id: u64,
        out: &mut FrameBuffer,
    ) -> Result<(), String> {
        let request = match op {
            Op::Get => &mut self.get,
            Op::Set => &mut self.put,
            Op::Delete => &mut self.delete,
            Op::Incr => &mut self.add,
            Op::Keepalive | Op::Lock | Op::Unlock | Op::LockPair | Op::Query => {
                return Err(NOT_KEYED.to_owned())
            }
        };
        match request {
            Request::Get { key: stored } => {
                stored.clear();
                stored.extend_from_slice(key);
            }
            Request::Delete(delete) => {
                delete.key.clear();
                delete.key.extend_from_slice(key);
            }
            Request::Add(add) => {
                add.key.clear();
                add.key.extend_from_slice(key);
            }
            Request::Put(put) => {
                put.key.clear();
                put.key.extend_from_slice(key);
                put.value.clear();
                put.value.extend_from_slice(value);
                if self.fields {
                    let index = key_index(key);
                    for (field, (_, modulus)) in put.fields.iter_mut().zip(FIELD_MODULI) {
                        field.value = FieldValue::I64(i64::try_from(index % modulus).unwrap_or(0));
                    }
                }
            }
            _ => {}
        }
        codec::encode_request(out, request_id, request).map_err(|error| error.to_string())
    }
}

/// Tessera's framed rkyv protocol.
#[derive(Debug)]
pub struct TesseraWire {
    requests: TesseraRequests,
}

impl TesseraWire {
    /// A codec with empty reusable requests; puts carry the benchmark's fields if `fields`.
    pub fn new(fields: bool) -> Self {
        Self {
            requests: TesseraRequests::new(fields),
        }
    }
}

impl Wire for TesseraWire {
    fn encode(
        &mut self,
        op: Op,
        key: &[u8],
        value: &[u8],
        request_id: u64,
        out: &mut FrameBuffer,
    ) -> Result<(), String> {
        self.requests.encode(op, key, value, request_id, out)
    }

    fn decode(&self, bytes: &[u8]) -> Result<Option<Reply>, String> {
        let Some(frame) = codec::decode_frame(bytes).map_err(|error| error.to_string())? else {
            return Ok(None);
        };
        let response = codec::access_response(frame.body).map_err(|error| error.to_string())?;
        Ok(Some(Reply {
            size: frame.frame_size,
            request_id: Some(frame.header.request_id),
            is_error: matches!(response, ArchivedResponse::Error(_)),
        }))
    }

    fn reply_size_needed(&self, bytes: &[u8]) -> Option<usize> {
        codec::frame_size_needed(bytes)
    }
}

/// Tessera request frames, echoed back unchanged by `tessera-echo`.
#[derive(Debug)]
pub struct EchoWire {
    requests: TesseraRequests,
}

impl EchoWire {
    /// A codec with empty reusable requests.
    pub fn new() -> Self {
        Self {
            requests: TesseraRequests::new(false),
        }
    }
}

impl Wire for EchoWire {
    fn encode(
        &mut self,
        op: Op,
        key: &[u8],
        value: &[u8],
        request_id: u64,
        out: &mut FrameBuffer,
    ) -> Result<(), String> {
        // The echo server knows no operations; any op travels as a frame of the same size
        // Tessera would see. Incr and delete travel as gets.
        let op = if op == Op::Set { Op::Set } else { Op::Get };
        self.requests.encode(op, key, value, request_id, out)
    }

    fn decode(&self, bytes: &[u8]) -> Result<Option<Reply>, String> {
        let Some(frame) = codec::decode_frame(bytes).map_err(|error| error.to_string())? else {
            return Ok(None);
        };
        // The same validation work a Tessera reply costs the client.
        codec::access_request(frame.body).map_err(|error| error.to_string())?;
        Ok(Some(Reply {
            size: frame.frame_size,
            request_id: Some(frame.header.request_id),
            is_error: false,
        }))
    }

    fn reply_size_needed(&self, bytes: &[u8]) -> Option<usize> {
        codec::frame_size_needed(bytes)
    }
}

/// Redis's RESP2, for the four commands the workloads use.
#[derive(Debug, Default)]
pub struct RedisWire;

/// Longest RESP reply line or bulk string the benchmark accepts.
const REDIS_REPLY_SIZE_MAX: usize = 64 * 1024 * 1024;

impl RedisWire {
    fn push_bulk(out: &mut FrameBuffer, bytes: &[u8]) {
        out.extend_from_slice(b"$");
        push_decimal(out, bytes.len() as u64);
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(bytes);
        out.extend_from_slice(b"\r\n");
    }
}

/// Appends `value` in decimal.
fn push_decimal(out: &mut FrameBuffer, value: u64) {
    let mut digits = [0_u8; 20];
    let mut start = digits.len();
    let mut rest = value;
    loop {
        start -= 1;
        #[allow(clippy::cast_possible_truncation, reason = "a decimal digit")]
        let digit = (rest % 10) as u8;
        digits[start] = b'0' + digit;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[start..]);
}

/// Position of the first `\r\n` in `bytes`.
fn line_end(bytes: &[u8]) -> Option<usize> {
    bytes.windows(2).position(|pair| pair == b"\r\n")
}

impl Wire for RedisWire {
    fn encode(
        &mut self,
        op: Op,
        key: &[u8],
        value: &[u8],
        _request_id: u64,
        out: &mut FrameBuffer,
    ) -> Result<(), String> {
        match op {
            Op::Get => out.extend_from_slice(b"*2\r\n$3\r\nGET\r\n"),
            Op::Set => out.extend_from_slice(b"*3\r\n$3\r\nSET\r\n"),
            Op::Incr => out.extend_from_slice(b"*2\r\n$4\r\nINCR\r\n"),
            Op::Delete => out.extend_from_slice(b"*2\r\n$3\r\nDEL\r\n"),
            Op::Keepalive | Op::Lock | Op::Unlock | Op::LockPair | Op::Query => {
                return Err(NOT_KEYED.to_owned())
            }
        }
        Self::push_bulk(out, key);
        if op == Op::Set {
            Self::push_bulk(out, value);
        }
        Ok(())
    }

    fn decode(&self, bytes: &[u8]) -> Result<Option<Reply>, String> {
        let Some(&kind) = bytes.first() else {
            return Ok(None);
        };
        let Some(end) = line_end(bytes) else {
            if bytes.len() > REDIS_REPLY_SIZE_MAX {
                return Err("redis reply line over the limit".to_owned());
            }
            return Ok(None);
        };
        let line_size = end + 2;
        let reply = |size, is_error| {
            Ok(Some(Reply {
                size,
                request_id: None,
                is_error,
            }))
        };
        match kind {
            b'+' | b':' => reply(line_size, false),
            b'-' => reply(line_size, true),
            b'$' => {
                let length_text = std::str::from_utf8(&bytes[1..end])
                    .map_err(|_| "redis bulk length is not text".to_owned())?;
                let length: i64 = length_text
                    .parse()
                    .map_err(|_| format!("redis bulk length {length_text:?} is not a number"))?;
                if length < 0 {
                    return reply(line_size, false);
                }
                let length = usize::try_from(length)
                    .ok()
                    .filter(|&length| length <= REDIS_REPLY_SIZE_MAX)
                    .ok_or_else(|| format!("redis bulk of {length} bytes is over the limit"))?;
                let size = line_size + length + 2;
                if bytes.len() < size {
                    return Ok(None);
                }
                reply(size, false)
            }
            other => Err(format!(
                "unexpected redis reply type {:?}",
                char::from(other)
            )),
        }
    }

    fn reply_size_needed(&self, bytes: &[u8]) -> Option<usize> {
        if bytes.first() != Some(&b'$') {
            return None;
        }
        let end = line_end(bytes)?;
        let length: usize = std::str::from_utf8(&bytes[1..end]).ok()?.parse().ok()?;
        Some(end + 2 + length + 2)
    }
}

#[cfg(test)]
mod tests {
    use tessera_protocol::{Entry, Response};

    use super::*;

    #[test]
    fn redis_requests_are_resp_arrays() {
        let mut out = FrameBuffer::new();
        RedisWire
            .encode(Op::Set, b"k1", b"value", 0, &mut out)
            .unwrap();
        assert_eq!(&out[..], b"*3\r\n$3\r\nSET\r\n$2\r\nk1\r\n$5\r\nvalue\r\n");
        out.clear();
        RedisWire.encode(Op::Get, b"k1", b"", 0, &mut out).unwrap();
        assert_eq!(&out[..], b"*2\r\n$3\r\nGET\r\n$2\r\nk1\r\n");
    }

    #[test]
    fn redis_replies_are_recognised_whole() {
        let wire = RedisWire;
        let decoded = |bytes: &[u8]| wire.decode(bytes).unwrap();
        assert_eq!(decoded(b"+OK\r\n").unwrap().size, 5);
        assert_eq!(decoded(b"+OK\r"), None);
        assert_eq!(decoded(b"$-1\r\n").unwrap().size, 5);
        assert_eq!(decoded(b"$5\r\nhello\r\n+OK\r\n").unwrap().size, 11);
        assert_eq!(decoded(b"$5\r\nhel"), None);
        assert_eq!(decoded(b":42\r\n").unwrap().size, 5);
        let error = decoded(b"-ERR wrong\r\n").unwrap();
        assert!(error.is_error);
        assert!(wire.decode(b"?\r\n").is_err());
        assert_eq!(wire.reply_size_needed(b"$100\r\n"), Some(108));
    }

    #[test]
    fn tessera_replies_carry_their_request_id_and_errors() {
        let mut out = FrameBuffer::new();
        let response = Response::Value(Some(Entry {
            value: b"v".to_vec(),
            create_revision: 2,
            mod_revision: 3,
            version: 2,
            expires_at_ms: None,
            fields: Vec::new(),
        }));
        codec::encode_response(&mut out, 41, &response).unwrap();
        let error = Response::Error(tessera_protocol::ErrorReply::new(
            tessera_protocol::ErrorCode::Overloaded,
            "busy",
        ));
        codec::encode_response(&mut out, 42, &error).unwrap();
        let wire = TesseraWire::new(false);
        let first = wire.decode(&out).unwrap().unwrap();
        assert_eq!(first.request_id, Some(41));
        assert!(!first.is_error);
        let second = wire.decode(&out[first.size..]).unwrap().unwrap();
        assert_eq!(second.request_id, Some(42));
        assert!(second.is_error);
        assert_eq!(wire.decode(&out[..first.size - 1]).unwrap(), None);
    }

    #[test]
    fn echoed_frames_decode_as_requests() {
        let mut wire = EchoWire::new();
        let mut out = FrameBuffer::new();
        wire.encode(Op::Set, b"key", b"value", 9, &mut out).unwrap();
        let reply = wire.decode(&out).unwrap().unwrap();
        assert_eq!(reply.size, out.len());
        assert_eq!(reply.request_id, Some(9));
        let mut tessera = TesseraWire::new(false);
        let mut incr = FrameBuffer::new();
        tessera.encode(Op::Incr, b"k", b"", 1, &mut incr).unwrap();
        let frame = codec::decode_frame(&incr).unwrap().unwrap();
        let request = codec::decode_request(frame.body).unwrap();
        assert_eq!(request, Request::Add(Box::new(CounterAdd::new("k", 1))));
    }
}
