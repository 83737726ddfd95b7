//! The write-ahead log's bytes: segment headers and records, encoded and decoded without I/O.
//!
//! `docs/storage.md` draws both byte by byte; a change here changes that page and
//! [`LOG_FORMAT_VERSION`] in the same commit. All integers are little-endian.
//!
//! A record is one shard revision: the revision number and the effects that revision had on
//! the key space (set a key, remove a key). Replaying the records of a shard in order, from an
//! empty store, rebuilds its state exactly, whatever requests produced them.
//!
//! Decoding tells three outcomes apart, as recovery needs: a complete, checksummed record;
//! the end of the written data (zeros, or a record cut short at the end of the file, which is
//! what a crash during an append leaves); and a record that is present but wrong, which recovery
//! must not skip silently.

use tessera_protocol::IndexKind;

use crate::durability::DurabilityError;

/// Identifies a log segment file.
pub const SEGMENT_MAGIC: [u8; 4] = *b"TSWL";

/// Version of the log format written by this build.
pub const LOG_FORMAT_VERSION: u16 = 5;

/// The oldest log format this build still reads (version 3 has no lease effects, 4 no
/// fields and indexes).
pub const LOG_FORMAT_VERSION_MIN: u16 = 3;

/// Bytes of a segment header.
pub const SEGMENT_HEADER_SIZE: usize = 32;

/// Bytes of a record header (payload size and checksum).
pub const RECORD_HEADER_SIZE: usize = 8;

/// Largest record payload: a batch of `BATCH_COUNT_MAX` maximal entries fits with room to
/// spare, and a size read from a damaged header above this is refused before anything is
/// allocated for it.
pub const RECORD_PAYLOAD_SIZE_MAX: usize = 64 * 1024 * 1024;

const _: () = assert!(
    tessera_protocol::limits::FRAME_BODY_SIZE_MAX < RECORD_PAYLOAD_SIZE_MAX,
    "any request's effects fit one record"
);

const EFFECT_SET: u8 = 1;
const EFFECT_REMOVE: u8 = 2;
const EFFECT_ATTACH: u8 = 3;
const EFFECT_LEASE_GRANT: u8 = 4;
const EFFECT_LEASE_END: u8 = 5;
const EFFECT_LOCK_HELD: u8 = 6;
const EFFECT_LOCK_FREE: u8 = 7;
const EFFECT_FIELDS: u8 = 8;
const EFFECT_INDEX_CREATE: u8 = 9;
const EFFECT_INDEX_DROP: u8 = 10;

const INDEX_KIND_EQUALITY: u8 = 1;
const INDEX_KIND_RANGE: u8 = 2;

/// The header at the start of every segment file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentHeader {
    /// Format version the segment was written in.
    pub format_version: u16,
    /// The core (shard) whose log this is.
    pub core_id: u16,
    /// Segments of a core are numbered from 1, in the order they were written.
    pub segment_id: u64,
    /// The revision of the last record before this segment (0 for a new log): the first
    /// record in the segment is `first_revision_before + 1` or later.
    pub revision_before: u64,
}

impl SegmentHeader {
    /// The header's bytes.
    pub fn to_bytes(&self) -> [u8; SEGMENT_HEADER_SIZE] {
        let mut bytes = [0; SEGMENT_HEADER_SIZE];
        bytes[0..4].copy_from_slice(&SEGMENT_MAGIC);
        bytes[4..6].copy_from_slice(&self.format_version.to_le_bytes());
        bytes[6..8].copy_from_slice(&self.core_id.to_le_bytes());
        bytes[8..16].copy_from_slice(&self.segment_id.to_le_bytes());
        bytes[16..24].copy_from_slice(&self.revision_before.to_le_bytes());
        // [24, 28) reserved, zero.
        seal_file_header(&mut bytes);
        bytes
    }

    /// Parses and checks a header.
    ///
    /// # Errors
    /// Bad magic, a checksum mismatch or a format this build cannot read.
    pub fn from_bytes(bytes: &[u8; SEGMENT_HEADER_SIZE]) -> Result<Self, DurabilityError> {
        check_file_header(bytes, SEGMENT_MAGIC, "segment")?;
        let header = Self {
            format_version: u16::from_le_bytes([bytes[4], bytes[5]]),
            core_id: u16::from_le_bytes([bytes[6], bytes[7]]),
            segment_id: read_u64(bytes, 8),
            revision_before: read_u64(bytes, 16),
        };
        if !(LOG_FORMAT_VERSION_MIN..=LOG_FORMAT_VERSION).contains(&header.format_version) {
            return Err(DurabilityError::UnsupportedFormat {
                version: header.format_version,
                supported: LOG_FORMAT_VERSION,
            });
        }
        Ok(header)
    }
}

/// Writes the checksum of a 32-byte file header (segment or snapshot): CRC32 of bytes 0..28
/// into bytes 28..32.
pub(crate) fn seal_file_header(bytes: &mut [u8; SEGMENT_HEADER_SIZE]) {
    let checksum = crc32fast::hash(&bytes[..28]);
    bytes[28..32].copy_from_slice(&checksum.to_le_bytes());
}

/// Checks a 32-byte file header's magic and checksum; `what` names the file kind.
///
/// # Errors
/// The magic or the checksum is wrong.
pub(crate) fn check_file_header(
    bytes: &[u8; SEGMENT_HEADER_SIZE],
    magic: [u8; 4],
    what: &str,
) -> Result<(), DurabilityError> {
    if bytes[0..4] != magic {
        return Err(DurabilityError::corrupt(format!(
            "{what} header has the wrong magic"
        )));
    }
    let expected = u32::from_le_bytes([bytes[28], bytes[29], bytes[30], bytes[31]]);
    let actual = crc32fast::hash(&bytes[..28]);
    if expected != actual {
        return Err(DurabilityError::corrupt(format!(
            "{what} header checksum mismatch (stored {expected:#010x}, computed {actual:#010x})"
        )));
    }
    Ok(())
}

/// One change a revision made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect<'a> {
    /// The key now holds `value`, at the record's revision, expiring at `deadline_ms`.
    Set {
        /// The key.
        key: &'a [u8],
        /// The value.
        value: &'a [u8],
        /// Absolute expiry in Unix milliseconds, if any.
        deadline_ms: Option<u64>,
        /// The revision at which the key was created.
        create_revision: u64,
        /// Writes since the key was created, this one included.
        version: u64,
    },
    /// The key no longer exists.
    Remove {
        /// The key.
        key: &'a [u8],
    },
    /// The key (just set by the effect before) is attached to `lease`. A `Set` without an
    /// `Attach` after it leaves the key attached to no lease.
    Attach {
        /// The key.
        key: &'a [u8],
        /// The lease.
        lease: u64,
    },
    /// A lease homed on this shard was granted with this TTL.
    LeaseGrant {
        /// The lease.
        id: u64,
        /// Its time to live.
        ttl_ms: u64,
    },
    /// A lease homed on this shard ended (its keys' removals are in the same record).
    LeaseEnd {
        /// The lease.
        id: u64,
    },
    /// The lock `name` is held by `lease` with fencing token `token` (the record's revision).
    LockHeld {
        /// The lock.
        name: &'a [u8],
        /// The holder's lease.
        lease: u64,
        /// The fencing token.
        token: u64,
    },
    /// The lock `name` is free; it granted up to `token`.
    LockFree {
        /// The lock.
        name: &'a [u8],
        /// The last token granted.
        token: u64,
    },
    /// The key (just set by the effect before) carries these indexed fields (the shard's
    /// blob, `shard::fields`). A `Set` without a `Fields` after it leaves the key without.
    Fields {
        /// The key.
        key: &'a [u8],
        /// The fields blob.
        fields: &'a [u8],
    },
    /// An index was defined.
    IndexCreate {
        /// Its name (UTF-8).
        name: &'a [u8],
        /// The keys it covers.
        prefix: &'a [u8],
        /// Its field (UTF-8).
        field: &'a [u8],
        /// Equality or range.
        kind: IndexKind,
    },
    /// An index was dropped.
    IndexDrop {
        /// Its name (UTF-8).
        name: &'a [u8],
    },
}

/// Appends records to a buffer: `begin` a revision, add its effects, `finish` it.
///
/// The shard writes through this while it applies a request, so the log says exactly what
/// the store did.
#[derive(Debug, Default)]
pub struct RecordWriter {
    buffer: Vec<u8>,
    /// Where the open record's header starts, if one is open.
    open_at: Option<usize>,
    /// Finished records in `buffer`.
    record_count: u64,
}

impl RecordWriter {
    /// An empty writer.
    pub fn new() -> Self {
        Self::default()
    }

    /// Opens the record of `revision`.
    pub fn begin(&mut self, revision: u64) {
        assert!(
            self.open_at.is_none(),
            "record already open at revision {revision}"
        );
        self.open_at = Some(self.buffer.len());
        self.buffer.extend_from_slice(&[0; RECORD_HEADER_SIZE]);
        self.buffer.extend_from_slice(&revision.to_le_bytes());
    }

    /// Adds an effect to the open record.
    pub fn push(&mut self, effect: Effect<'_>) {
        assert!(self.open_at.is_some(), "no open record");
        match effect {
            Effect::Set {
                key,
                value,
                deadline_ms,
                create_revision,
                version,
            } => {
                self.buffer.push(EFFECT_SET);
                self.push_bytes_u16(key);
                self.push_bytes_u32(value);
                self.buffer.extend_from_slice(
                    &deadline_ms
                        .map_or(0, |deadline| deadline.max(1))
                        .to_le_bytes(),
                );
                self.buffer
                    .extend_from_slice(&create_revision.to_le_bytes());
                self.buffer.extend_from_slice(&version.to_le_bytes());
            }
            Effect::Remove { key } => {
                self.buffer.push(EFFECT_REMOVE);
                self.push_bytes_u16(key);
            }
            Effect::Attach { key, lease } => {
                self.buffer.push(EFFECT_ATTACH);
                self.push_bytes_u16(key);
                self.buffer.extend_from_slice(&lease.to_le_bytes());
            }
            Effect::LeaseGrant { id, ttl_ms } => {
                self.buffer.push(EFFECT_LEASE_GRANT);
                self.buffer.extend_from_slice(&id.to_le_bytes());
                self.buffer.extend_from_slice(&ttl_ms.to_le_bytes());
            }
            Effect::LeaseEnd { id } => {
                self.buffer.push(EFFECT_LEASE_END);
                self.buffer.extend_from_slice(&id.to_le_bytes());
            }
            Effect::LockHeld { name, lease, token } => {
                self.buffer.push(EFFECT_LOCK_HELD);
                self.push_bytes_u16(name);
                self.buffer.extend_from_slice(&lease.to_le_bytes());
                self.buffer.extend_from_slice(&token.to_le_bytes());
            }
            Effect::LockFree { name, token } => {
                self.buffer.push(EFFECT_LOCK_FREE);
                self.push_bytes_u16(name);
                self.buffer.extend_from_slice(&token.to_le_bytes());
            }
            Effect::Fields { key, fields } => {
                self.buffer.push(EFFECT_FIELDS);
                self.push_bytes_u16(key);
                self.push_bytes_u32(fields);
            }
            Effect::IndexCreate {
                name,
                prefix,
                field,
                kind,
            } => {
                self.buffer.push(EFFECT_INDEX_CREATE);
                self.push_bytes_u16(name);
                self.push_bytes_u16(prefix);
                self.push_bytes_u16(field);
                self.buffer.push(index_kind_byte(kind));
            }
            Effect::IndexDrop { name } => {
                self.buffer.push(EFFECT_INDEX_DROP);
                self.push_bytes_u16(name);
            }
        }
    }

    fn push_bytes_u16(&mut self, bytes: &[u8]) {
        push_u16_prefixed(&mut self.buffer, bytes);
    }

    fn push_bytes_u32(&mut self, bytes: &[u8]) {
        push_u32_prefixed(&mut self.buffer, bytes);
    }

    /// Closes the open record: fills in its size and checksum.
    pub fn finish(&mut self) {
        let Some(start) = self.open_at.take() else {
            return;
        };
        seal_record(&mut self.buffer[start..]);
        self.record_count += 1;
    }

    /// Finished records waiting to be taken.
    pub fn record_count(&self) -> u64 {
        self.record_count
    }

    /// Drops the open record, which must have no effects (a revision that changed nothing).
    pub fn abort(&mut self) {
        if let Some(start) = self.open_at.take() {
            assert!(
                self.buffer.len() == start + RECORD_HEADER_SIZE + 8,
                "aborting a record that has effects"
            );
            self.buffer.truncate(start);
        }
    }

    /// Whether no finished record is waiting.
    pub fn is_empty(&self) -> bool {
        self.buffer.is_empty()
    }

    /// Bytes of finished records waiting to be taken.
    pub fn len(&self) -> usize {
        self.buffer.len()
    }

    /// Moves the finished records out (no record may be open), leaving the writer empty.
    pub fn take(&mut self) -> Vec<u8> {
        assert!(self.open_at.is_none(), "taking records while one is open");
        self.record_count = 0;
        std::mem::take(&mut self.buffer)
    }

    /// Appends the finished records to `out`, leaving the writer empty.
    pub fn drain_into(&mut self, out: &mut Vec<u8>) {
        assert!(self.open_at.is_none(), "taking records while one is open");
        out.extend_from_slice(&self.buffer);
        self.buffer.clear();
        self.record_count = 0;
    }
}

/// Appends `bytes` (a key) after its size as a u16.
pub(crate) fn push_u16_prefixed(buffer: &mut Vec<u8>, bytes: &[u8]) {
    // Keys are at most KEY_SIZE_MAX (4 KiB), checked before they reach a shard.
    let size = u16::try_from(bytes.len()).unwrap_or(u16::MAX);
    assert!(
        usize::from(size) == bytes.len(),
        "key of {} bytes",
        bytes.len()
    );
    buffer.extend_from_slice(&size.to_le_bytes());
    buffer.extend_from_slice(bytes);
}

/// Appends `bytes` (a value) after its size as a u32.
pub(crate) fn push_u32_prefixed(buffer: &mut Vec<u8>, bytes: &[u8]) {
    let size = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
    assert!(
        size as usize == bytes.len(),
        "value of {} bytes",
        bytes.len()
    );
    buffer.extend_from_slice(&size.to_le_bytes());
    buffer.extend_from_slice(bytes);
}

/// Bytes of a batch marker: a record header and a 16-byte payload.
pub const BATCH_MARKER_SIZE: usize = RECORD_HEADER_SIZE + 16;

/// The marker the writer puts before each batch it writes with one call: a record of
/// revision 0 (no real record has it) whose payload then holds the byte length of the
/// records that follow in the batch. Recovery uses it to tell a batch that a crash tore (the
/// last one written, never synced) from damage to data that was synced.
pub fn batch_marker(batch_length: u64) -> [u8; BATCH_MARKER_SIZE] {
    let mut marker = [0; BATCH_MARKER_SIZE];
    marker[RECORD_HEADER_SIZE + 8..].copy_from_slice(&batch_length.to_le_bytes());
    seal_record(&mut marker);
    marker
}

/// Fills in the header of the record that makes up all of `record`: its first
/// [`RECORD_HEADER_SIZE`] bytes were reserved, its payload follows them.
pub fn seal_record(record: &mut [u8]) {
    let payload_size = record.len() - RECORD_HEADER_SIZE;
    assert!(
        (8..=RECORD_PAYLOAD_SIZE_MAX).contains(&payload_size),
        "record payload of {payload_size} bytes"
    );
    let size_bytes = u32::try_from(payload_size)
        .unwrap_or(u32::MAX)
        .to_le_bytes();
    let checksum = record_checksum(size_bytes, &record[RECORD_HEADER_SIZE..]);
    record[0..4].copy_from_slice(&size_bytes);
    record[4..8].copy_from_slice(&checksum.to_le_bytes());
}

/// The checksum of a record: CRC32 over its size field and payload, so a torn size is caught
/// as surely as a torn payload.
fn record_checksum(size_bytes: [u8; 4], payload: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&size_bytes);
    hasher.update(payload);
    hasher.finalize()
}

fn read_u64(bytes: &[u8], offset: usize) -> u64 {
    let mut word = [0; 8];
    word.copy_from_slice(&bytes[offset..offset + 8]);
    u64::from_le_bytes(word)
}

/// A record read back from a log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record<'a> {
    /// The shard revision the record brought the shard to.
    pub revision: u64,
    effects: &'a [u8],
}

impl<'a> Record<'a> {
    /// If this is a batch marker ([`batch_marker`]), the length of the batch after it.
    pub fn batch_length(&self) -> Option<u64> {
        if self.revision != 0 {
            return None;
        }
        let bytes: [u8; 8] = self.effects.get(..8)?.try_into().ok()?;
        Some(u64::from_le_bytes(bytes))
    }

    /// The record's effects, in the order they were applied.
    pub fn effects(&self) -> Effects<'a> {
        Effects { rest: self.effects }
    }
}

/// Iterator over a record's effects; its payload was checksummed, so a malformed effect can
/// only mean a bug or a checksum collision and ends the iteration with an error.
#[derive(Debug, Clone)]
pub struct Effects<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for Effects<'a> {
    type Item = Result<Effect<'a>, DurabilityError>;

    fn next(&mut self) -> Option<Self::Item> {
        let (&kind, rest) = self.rest.split_first()?;
        let parsed = match kind {
            EFFECT_SET => parse_set(rest),
            EFFECT_REMOVE => {
                take_u16_prefixed(rest).map(|(key, rest)| (Effect::Remove { key }, rest))
            }
            EFFECT_ATTACH => take_u16_prefixed(rest).and_then(|(key, rest)| {
                let (lease, rest) = take_u64(rest)?;
                Ok((Effect::Attach { key, lease }, rest))
            }),
            EFFECT_LEASE_GRANT => take_u64(rest).and_then(|(id, rest)| {
                let (ttl_ms, rest) = take_u64(rest)?;
                Ok((Effect::LeaseGrant { id, ttl_ms }, rest))
            }),
            EFFECT_LEASE_END => take_u64(rest).map(|(id, rest)| (Effect::LeaseEnd { id }, rest)),
            EFFECT_LOCK_HELD => take_u16_prefixed(rest).and_then(|(name, rest)| {
                let (lease, rest) = take_u64(rest)?;
                let (token, rest) = take_u64(rest)?;
                Ok((Effect::LockHeld { name, lease, token }, rest))
            }),
            EFFECT_LOCK_FREE => take_u16_prefixed(rest).and_then(|(name, rest)| {
                let (token, rest) = take_u64(rest)?;
                Ok((Effect::LockFree { name, token }, rest))
            }),
            EFFECT_FIELDS => take_u16_prefixed(rest).and_then(|(key, rest)| {
                let (fields, rest) = take_u32_prefixed(rest)?;
                Ok((Effect::Fields { key, fields }, rest))
            }),
            EFFECT_INDEX_CREATE => parse_index_create(rest),
            EFFECT_INDEX_DROP => {
                take_u16_prefixed(rest).map(|(name, rest)| (Effect::IndexDrop { name }, rest))
            }
            other => Err(DurabilityError::corrupt(format!(
                "unknown effect kind {other}"
            ))),
        };
        match parsed {
            Ok((effect, rest)) => {
                self.rest = rest;
                Some(Ok(effect))
            }
            Err(error) => {
                self.rest = &[];
                Some(Err(error))
            }
        }
    }
}

fn parse_set(bytes: &[u8]) -> Result<(Effect<'_>, &[u8]), DurabilityError> {
    let (key, rest) = take_u16_prefixed(bytes)?;
    let (value, rest) = take_u32_prefixed(rest)?;
    let Some((numbers, rest)) = rest.split_first_chunk::<24>() else {
        return Err(DurabilityError::corrupt("set effect cut short"));
    };
    let number = |index: usize| {
        let mut word = [0; 8];
        word.copy_from_slice(&numbers[index * 8..index * 8 + 8]);
        u64::from_le_bytes(word)
    };
    let deadline_ms = number(0);
    Ok((
        Effect::Set {
            key,
            value,
            deadline_ms: (deadline_ms != 0).then_some(deadline_ms),
            create_revision: number(1),
            version: number(2),
        },
        rest,
    ))
}

fn parse_index_create(bytes: &[u8]) -> Result<(Effect<'_>, &[u8]), DurabilityError> {
    let (name, rest) = take_u16_prefixed(bytes)?;
    let (prefix, rest) = take_u16_prefixed(rest)?;
    let (field, rest) = take_u16_prefixed(rest)?;
    let Some((&kind, rest)) = rest.split_first() else {
        return Err(DurabilityError::corrupt("index effect cut short"));
    };
    let kind = index_kind_of(kind)?;
    Ok((
        Effect::IndexCreate {
            name,
            prefix,
            field,
            kind,
        },
        rest,
    ))
}

/// How the log and snapshots write an index's kind.
pub(crate) fn index_kind_byte(kind: IndexKind) -> u8 {
    match kind {
        IndexKind::Equality => INDEX_KIND_EQUALITY,
        IndexKind::Range => INDEX_KIND_RANGE,
    }
}

/// The kind an index's kind byte names.
pub(crate) fn index_kind_of(byte: u8) -> Result<IndexKind, DurabilityError> {
    match byte {
        INDEX_KIND_EQUALITY => Ok(IndexKind::Equality),
        INDEX_KIND_RANGE => Ok(IndexKind::Range),
        other => Err(DurabilityError::corrupt(format!(
            "unknown index kind {other}"
        ))),
    }
}

/// An index definition read from disk: its name and field must be UTF-8.
pub(crate) fn index_spec_of(
    name: &[u8],
    prefix: &[u8],
    field: &[u8],
    kind: IndexKind,
) -> Result<tessera_protocol::IndexSpec, DurabilityError> {
    let text = |bytes: &[u8]| {
        String::from_utf8(bytes.to_vec())
            .map_err(|_| DurabilityError::corrupt("index name or field not UTF-8"))
    };
    Ok(tessera_protocol::IndexSpec {
        name: text(name)?,
        prefix: prefix.to_vec(),
        field: text(field)?,
        kind,
    })
}

fn take_u64(bytes: &[u8]) -> Result<(u64, &[u8]), DurabilityError> {
    let Some((word, rest)) = bytes.split_first_chunk::<8>() else {
        return Err(DurabilityError::corrupt("effect cut short"));
    };
    Ok((u64::from_le_bytes(*word), rest))
}

pub(crate) fn take_u16_prefixed(bytes: &[u8]) -> Result<(&[u8], &[u8]), DurabilityError> {
    let Some((size, rest)) = bytes.split_first_chunk::<2>() else {
        return Err(DurabilityError::corrupt("effect cut short"));
    };
    let size = usize::from(u16::from_le_bytes(*size));
    if rest.len() < size {
        return Err(DurabilityError::corrupt("effect key cut short"));
    }
    Ok(rest.split_at(size))
}

pub(crate) fn take_u32_prefixed(bytes: &[u8]) -> Result<(&[u8], &[u8]), DurabilityError> {
    let Some((size, rest)) = bytes.split_first_chunk::<4>() else {
        return Err(DurabilityError::corrupt("effect cut short"));
    };
    let size = u32::from_le_bytes(*size) as usize;
    if rest.len() < size {
        return Err(DurabilityError::corrupt("effect value cut short"));
    }
    Ok(rest.split_at(size))
}

/// What is at some position of a segment's record area.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadOutcome<'a> {
    /// A complete record whose checksum matches, and the bytes it occupies.
    Record(Record<'a>, usize),
    /// Nothing more was written here: the end of the data, zero bytes (preallocated space), or
    /// a record cut short by the end of the data (a crash during an append). Not an error.
    End,
    /// A complete record whose checksum does not match, or a size that cannot be. Recovery
    /// decides whether anything valid follows.
    Damaged {
        /// What is wrong.
        reason: String,
    },
}

/// Reads the record at the start of `bytes` (the rest of a segment's data).
pub fn read_record(bytes: &[u8]) -> ReadOutcome<'_> {
    let Some(header) = bytes.first_chunk::<RECORD_HEADER_SIZE>() else {
        return ReadOutcome::End;
    };
    if header.iter().all(|&byte| byte == 0) {
        return ReadOutcome::End;
    }
    let size_bytes = [header[0], header[1], header[2], header[3]];
    let payload_size = u32::from_le_bytes(size_bytes) as usize;
    let checksum = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    if !(8..=RECORD_PAYLOAD_SIZE_MAX).contains(&payload_size) {
        return ReadOutcome::Damaged {
            reason: format!("record payload size {payload_size} is impossible"),
        };
    }
    let Some(payload) = bytes.get(RECORD_HEADER_SIZE..RECORD_HEADER_SIZE + payload_size) else {
        return ReadOutcome::End;
    };
    let actual = record_checksum(size_bytes, payload);
    if actual != checksum {
        return ReadOutcome::Damaged {
            reason: format!(
                "record checksum mismatch (stored {checksum:#010x}, computed {actual:#010x})"
            ),
        };
    }
    let revision = read_u64(payload, 0);
    ReadOutcome::Record(
        Record {
            revision,
            effects: &payload[8..],
        },
        RECORD_HEADER_SIZE + payload_size,
    )
}

/// Whether a valid record starts anywhere in `bytes` (at any byte offset). Used after a damaged
/// record: damage followed by valid records is not a torn tail, and must not be cut off
/// silently.
pub fn has_valid_record_after(bytes: &[u8]) -> bool {
    (1..bytes.len()).any(|offset| matches!(read_record(&bytes[offset..]), ReadOutcome::Record(..)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_records() -> Vec<u8> {
        let mut writer = RecordWriter::new();
        writer.begin(7);
        writer.push(Effect::Set {
            key: b"k1",
            value: b"v1",
            deadline_ms: None,
            create_revision: 7,
            version: 1,
        });
        writer.push(Effect::Set {
            key: b"k2",
            value: b"",
            deadline_ms: Some(1_700_000_000_000),
            create_revision: 3,
            version: 4,
        });
        writer.finish();
        writer.begin(8);
        writer.push(Effect::Remove { key: b"k1" });
        writer.finish();
        writer.take()
    }

    #[test]
    fn records_read_back_in_order() {
        let bytes = sample_records();
        let ReadOutcome::Record(first, first_size) = read_record(&bytes) else {
            panic!("first record");
        };
        assert_eq!(first.revision, 7);
        let effects: Vec<_> = first.effects().map(Result::unwrap).collect();
        assert_eq!(
            effects,
            vec![
                Effect::Set {
                    key: b"k1",
                    value: b"v1",
                    deadline_ms: None,
                    create_revision: 7,
                    version: 1,
                },
                Effect::Set {
                    key: b"k2",
                    value: b"",
                    deadline_ms: Some(1_700_000_000_000),
                    create_revision: 3,
                    version: 4,
                },
            ]
        );
        let ReadOutcome::Record(second, second_size) = read_record(&bytes[first_size..]) else {
            panic!("second record");
        };
        assert_eq!(second.revision, 8);
        assert_eq!(
            second.effects().map(Result::unwrap).collect::<Vec<_>>(),
            vec![Effect::Remove { key: b"k1" }]
        );
        assert_eq!(first_size + second_size, bytes.len());
        assert_eq!(read_record(&bytes[bytes.len()..]), ReadOutcome::End);
    }

    #[test]
    fn a_cut_record_is_the_end_and_a_flipped_bit_is_damage() {
        let bytes = sample_records();
        for cut in 1..bytes.len() {
            let outcome = read_record(&bytes[..cut]);
            let ReadOutcome::Record(_, size) = read_record(&bytes) else {
                unreachable!()
            };
            if cut < size {
                assert_eq!(outcome, ReadOutcome::End, "cut at {cut}");
            }
        }
        for bit in 0..(bytes.len() * 8) {
            let mut flipped = bytes.clone();
            flipped[bit / 8] ^= 1 << (bit % 8);
            // Whatever it reads as, it must not be the original first record with other
            // content: either damage, the end, or (if the flip hit the second record) the
            // unchanged first record.
            match read_record(&flipped) {
                ReadOutcome::Record(record, _) => {
                    let ReadOutcome::Record(original, size) = read_record(&bytes) else {
                        unreachable!()
                    };
                    assert!(
                        bit / 8 >= size,
                        "bit {bit} flipped inside an accepted record"
                    );
                    assert_eq!(record, original);
                }
                ReadOutcome::End | ReadOutcome::Damaged { .. } => {}
            }
        }
    }

    #[test]
    fn zeros_are_the_end_and_damage_before_valid_records_is_seen() {
        assert_eq!(read_record(&[0; 64]), ReadOutcome::End);
        let mut bytes = sample_records();
        bytes[9] ^= 0xff;
        assert!(matches!(read_record(&bytes), ReadOutcome::Damaged { .. }));
        assert!(has_valid_record_after(&bytes));
        let mut only_first = sample_records();
        let ReadOutcome::Record(_, size) = read_record(&only_first) else {
            unreachable!()
        };
        only_first.truncate(size);
        only_first[9] ^= 0xff;
        assert!(!has_valid_record_after(&only_first));
    }

    #[test]
    fn segment_headers_round_trip_and_refuse_damage() {
        let header = SegmentHeader {
            format_version: LOG_FORMAT_VERSION,
            core_id: 3,
            segment_id: 12,
            revision_before: 99,
        };
        let bytes = header.to_bytes();
        assert_eq!(SegmentHeader::from_bytes(&bytes).unwrap(), header);
        for index in 0..SEGMENT_HEADER_SIZE {
            let mut damaged = bytes;
            damaged[index] ^= 0x40;
            assert!(SegmentHeader::from_bytes(&damaged).is_err(), "byte {index}");
        }
    }
}
