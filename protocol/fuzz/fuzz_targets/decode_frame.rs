//! Fuzzes the receive path: bytes from a peer, through `decode_frame`, into every body decoder.
//!
//! The property is the one a server lives by: whatever arrives, decoding may refuse it but
//! never panics, so a bad frame can only ever close its own connection. Two extra assertions
//! hold on every input: a frame never claims more bytes than the buffer holds, and a body that
//! passes validation always deserializes.
//!
//! Each input is used twice. First as raw bytes, the way a peer sends them, which exercises
//! header parsing. Then as the body of a frame whose checksums are correct, because random
//! bytes almost never pass the header CRC and the fuzzer would otherwise spend its time in
//! front of rkyv's validator instead of inside it.

#![no_main]

use libfuzzer_sys::fuzz_target;
use tessera_protocol::codec::{self, FrameBuffer};
use tessera_protocol::limits::FRAME_ALIGNMENT;
use tessera_protocol::FrameKind;

fuzz_target!(|data: &[u8]| {
    decode_stream(data);

    let mut framed = FrameBuffer::new();
    if codec::encode_frame_with_body(&mut framed, FrameKind::Request, 0, data).is_ok() {
        let consumed = decode_stream(&framed);
        assert_eq!(consumed, framed.len(), "a sealed frame always decodes");
    }
});

/// Decodes frames from the front of `bytes` until one is incomplete or invalid, the way a
/// connection drains its read buffer. Returns the bytes consumed by whole frames.
fn decode_stream(bytes: &[u8]) -> usize {
    // The receive buffer of a connection is 16-byte aligned and loses only whole frames from
    // its front; copying into a `FrameBuffer` gives the decoder the same guarantee.
    let mut buffer = FrameBuffer::new();
    buffer.extend_from_slice(bytes);
    let mut offset = 0;
    while let Ok(Some(frame)) = codec::decode_frame(&buffer[offset..]) {
        assert!(frame.frame_size <= buffer.len() - offset);
        assert_eq!(frame.frame_size % FRAME_ALIGNMENT, 0);
        assert_eq!(frame.body.len(), frame.header.body_size as usize);
        decode_body(frame.body);
        offset += frame.frame_size;
    }
    offset
}

/// Runs every body decoder on one body, whatever kind the header announced: a hostile peer
/// chooses the kind too.
fn decode_body(body: &[u8]) {
    if let Ok(request) = codec::access_request(body) {
        let _ = codec::check_request(request);
        assert!(
            codec::decode_request(body).is_ok(),
            "a validated request deserializes"
        );
    }
    if codec::access_response(body).is_ok() {
        assert!(
            codec::decode_response(body).is_ok(),
            "a validated response deserializes"
        );
    }
}
