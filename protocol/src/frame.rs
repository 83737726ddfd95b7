//! The fixed-size frame header that precedes every message on the wire.
//!
//! Layout (all integers little-endian; drawn byte by byte in `docs/protocol.md`):
//!
//! ```text
//!  0..4   magic            b"TSRA"
//!  4..6   version          u16, PROTOCOL_VERSION
//!  6      kind             u8, 1 = request, 2 = response
//!  7      flags            u8, must be 0
//!  8..16  request_id       u64, chosen by the client, echoed in the response
//! 16..20  body_size        u32, exact length of the archived body (padding excluded)
//! 20..24  body_checksum    u32, CRC32 (IEEE) of the body bytes
//! 24..28  reserved         u32, must be 0
//! 28..32  header_checksum  u32, CRC32 (IEEE) of bytes 0..28
//! ```
//!
//! The body follows at offset 32 and is padded with zeros to a multiple of 16 bytes, so a
//! receiver that reads frames into a 16-byte aligned buffer and only ever removes whole frames
//! from its front finds every body aligned for in-place, validated access.

use crate::limits::{FRAME_ALIGNMENT, FRAME_BODY_SIZE_MAX, FRAME_HEADER_SIZE};

/// The four bytes every frame starts with.
pub const MAGIC: [u8; 4] = *b"TSRA";

/// The protocol version this crate speaks. A peer announcing another version is refused with
/// `UnsupportedVersion`.
pub const PROTOCOL_VERSION: u16 = 1;

/// What the body of a frame holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FrameKind {
    /// An archived [`crate::Request`], client to server.
    Request = 1,
    /// An archived [`crate::Response`], server to client.
    Response = 2,
}

impl FrameKind {
    /// The kind for a wire byte, if it names one.
    #[must_use]
    pub fn from_byte(byte: u8) -> Option<Self> {
        match byte {
            1 => Some(Self::Request),
            2 => Some(Self::Response),
            _ => None,
        }
    }
}

/// The decoded fixed-size header of one frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    /// Protocol version the sender speaks.
    pub version: u16,
    /// Raw kind byte; see [`FrameKind`].
    pub kind: u8,
    /// Reserved flag bits; zero in this version.
    pub flags: u8,
    /// Correlates a response with its request on a pipelined connection.
    pub request_id: u64,
    /// Exact length of the archived body, padding excluded.
    pub body_size: u32,
    /// CRC32 of the body bytes.
    pub body_checksum: u32,
    /// Reserved; zero in this version.
    pub reserved: u32,
}

impl FrameHeader {
    /// A header for a body of `body_size` bytes with checksum `body_checksum`.
    #[must_use]
    pub fn new(kind: FrameKind, request_id: u64, body_size: u32, body_checksum: u32) -> Self {
        Self {
            version: PROTOCOL_VERSION,
            kind: kind as u8,
            flags: 0,
            request_id,
            body_size,
            body_checksum,
            reserved: 0,
        }
    }

    /// Writes the header, including its own checksum, into 32 bytes.
    #[must_use]
    pub fn to_bytes(&self) -> [u8; FRAME_HEADER_SIZE] {
        let mut bytes = [0_u8; FRAME_HEADER_SIZE];
        bytes[0..4].copy_from_slice(&MAGIC);
        bytes[4..6].copy_from_slice(&self.version.to_le_bytes());
        bytes[6] = self.kind;
        bytes[7] = self.flags;
        bytes[8..16].copy_from_slice(&self.request_id.to_le_bytes());
        bytes[16..20].copy_from_slice(&self.body_size.to_le_bytes());
        bytes[20..24].copy_from_slice(&self.body_checksum.to_le_bytes());
        bytes[24..28].copy_from_slice(&self.reserved.to_le_bytes());
        let header_checksum = crc32fast::hash(&bytes[0..28]);
        bytes[28..32].copy_from_slice(&header_checksum.to_le_bytes());
        bytes
    }

    /// Reads a header from the first 32 bytes of `bytes`.
    ///
    /// Only the magic and the header checksum are checked here: a header that fails them is
    /// garbage and none of its fields can be trusted. Everything else is left to
    /// [`FrameHeader::invalid`], so a well-formed header from a newer peer can still be answered
    /// with its own request id.
    ///
    /// # Errors
    /// Returns the reason the bytes are not a header.
    pub fn from_bytes(bytes: &[u8; FRAME_HEADER_SIZE]) -> Result<Self, &'static str> {
        if bytes[0..4] != MAGIC {
            return Err("bad magic");
        }
        let header_checksum = u32::from_le_bytes([bytes[28], bytes[29], bytes[30], bytes[31]]);
        if crc32fast::hash(&bytes[0..28]) != header_checksum {
            return Err("header checksum mismatch");
        }
        Ok(Self {
            version: u16::from_le_bytes([bytes[4], bytes[5]]),
            kind: bytes[6],
            flags: bytes[7],
            request_id: u64::from_le_bytes([
                bytes[8], bytes[9], bytes[10], bytes[11], bytes[12], bytes[13], bytes[14],
                bytes[15],
            ]),
            body_size: u32::from_le_bytes([bytes[16], bytes[17], bytes[18], bytes[19]]),
            body_checksum: u32::from_le_bytes([bytes[20], bytes[21], bytes[22], bytes[23]]),
            reserved: u32::from_le_bytes([bytes[24], bytes[25], bytes[26], bytes[27]]),
        })
    }

    /// The reason this header must be refused, or `None` if it is valid for this version.
    ///
    /// Like `TigerBeetle`'s `Header.invalid()`, this names the first broken rule so that the
    /// refusal can be logged and sent back.
    #[must_use]
    pub fn invalid(&self) -> Option<&'static str> {
        if self.version != PROTOCOL_VERSION {
            return Some("unsupported protocol version");
        }
        if FrameKind::from_byte(self.kind).is_none() {
            return Some("unknown frame kind");
        }
        if self.flags != 0 {
            return Some("unknown flags");
        }
        if self.reserved != 0 {
            return Some("reserved field is not zero");
        }
        if self.body_size as usize > FRAME_BODY_SIZE_MAX {
            return Some("body size over FRAME_BODY_SIZE_MAX");
        }
        None
    }

    /// The frame's kind; `None` if the kind byte is unknown.
    #[must_use]
    pub fn frame_kind(&self) -> Option<FrameKind> {
        FrameKind::from_byte(self.kind)
    }

    /// Size of the whole frame on the wire: header, body and padding.
    #[must_use]
    pub fn frame_size(&self) -> usize {
        frame_size_for_body(self.body_size as usize)
    }
}

/// Size on the wire of a frame whose body is `body_size` bytes.
#[must_use]
pub const fn frame_size_for_body(body_size: usize) -> usize {
    FRAME_HEADER_SIZE + body_size.next_multiple_of(FRAME_ALIGNMENT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips() {
        let header = FrameHeader::new(FrameKind::Request, 0x0102_0304_0506_0708, 77, 0xDEAD_BEEF);
        let bytes = header.to_bytes();
        assert_eq!(&bytes[0..4], b"TSRA");
        assert_eq!(FrameHeader::from_bytes(&bytes), Ok(header));
        assert_eq!(header.invalid(), None);
        assert_eq!(header.frame_size(), 32 + 80);
    }

    #[test]
    fn header_layout_is_little_endian() {
        let bytes = FrameHeader::new(FrameKind::Response, 1, 2, 3).to_bytes();
        assert_eq!(&bytes[4..6], &[1, 0]);
        assert_eq!(bytes[6], 2);
        assert_eq!(&bytes[8..16], &[1, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(&bytes[16..20], &[2, 0, 0, 0]);
        assert_eq!(&bytes[20..24], &[3, 0, 0, 0]);
    }

    #[test]
    fn any_flipped_bit_is_detected() {
        let bytes = FrameHeader::new(FrameKind::Request, 9, 100, 5).to_bytes();
        for bit in 0..FRAME_HEADER_SIZE * 8 {
            let mut corrupt = bytes;
            corrupt[bit / 8] ^= 1 << (bit % 8);
            assert!(FrameHeader::from_bytes(&corrupt).is_err(), "bit={bit}");
        }
    }

    #[test]
    fn invalid_names_the_broken_rule() {
        let mut header = FrameHeader::new(FrameKind::Request, 1, 0, 0);
        header.version = 2;
        assert_eq!(header.invalid(), Some("unsupported protocol version"));
        let mut header = FrameHeader::new(FrameKind::Request, 1, 0, 0);
        header.kind = 9;
        assert_eq!(header.invalid(), Some("unknown frame kind"));
        let mut header = FrameHeader::new(FrameKind::Request, 1, 0, 0);
        header.body_size = u32::try_from(FRAME_BODY_SIZE_MAX + 1).unwrap();
        assert_eq!(header.invalid(), Some("body size over FRAME_BODY_SIZE_MAX"));
    }
}
