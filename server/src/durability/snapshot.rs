//! A core's snapshots: the whole shard in one file, so the log behind it can go.
//!
//! # Taking one
//! The shard goes on serving while its snapshot is written. The snapshot copies the store one
//! partition (a 256th of the keys, `shard::store::PARTITION_COUNT`) at a time, synchronously,
//! then writes what it copied and lets requests run before the next partition: the shard
//! pauses for one partition's copy at a time, never for all of it. Mutations between steps
//! are not a problem: the snapshot records the revision it began at (the *base*), every
//! record after the base stays in the log, and replaying those records over the snapshot
//! gives the same state whatever mix of before and after a partition's copy saw, because each
//! logged effect sets or removes a whole key. The file is written as `snap-<base>.tmp`,
//! synced, and once the log holds every revision the snapshot saw, renamed to
//! `snap-<base>.snap` and the directory synced. Then older snapshots beyond
//! [`SNAPSHOTS_KEPT`] are removed and so is every log segment whose records all precede the
//! oldest kept snapshot's base (so a damaged newest snapshot still leaves an older one and the
//! log after it).
//!
//! # The file (`docs/storage.md` draws it)
//! A 32-byte header, then chunks framed exactly like log records (size, CRC32, payload). A
//! chunk's payload is its sequence number (from 1) and items: entries, and last of all one
//! end marker with the revision the snapshot ended at and the entry count. A snapshot without
//! its end marker, with a chunk out of sequence or any byte after the end, is not valid.

use std::cell::RefCell;
use std::fs;
use std::io::Read as _;
use std::path::{Path, PathBuf};

use crate::durability::format::{
    check_file_header, index_kind_byte, index_kind_of, index_spec_of, push_u16_prefixed,
    push_u32_prefixed, read_record, seal_file_header, seal_record, take_u16_prefixed,
    take_u32_prefixed, ReadOutcome, RECORD_HEADER_SIZE, RECORD_PAYLOAD_SIZE_MAX,
};
use crate::durability::log::CoreLog;
use crate::durability::recovery::{read_segment_header, segment_files};
use crate::durability::storage::{Storage, StorageFile};
use crate::durability::{io_error, numbered_files, DurabilityError};
use crate::shard::indexes::Indexes;
use crate::shard::lease::Leases;
use crate::shard::lock::Locks;
use crate::shard::store::{KeyRevisions, PARTITION_COUNT};
use crate::shard::Shard;

/// Identifies a snapshot file.
pub const SNAPSHOT_MAGIC: [u8; 4] = *b"TSSN";

/// Version of the snapshot format written by this build.
pub const SNAPSHOT_FORMAT_VERSION: u16 = 4;

/// The oldest snapshot format this build still reads (version 2 has no lease items, 3 no
/// fields and index items).
pub const SNAPSHOT_FORMAT_VERSION_MIN: u16 = 2;

/// Bytes of a snapshot header.
pub const SNAPSHOT_HEADER_SIZE: usize = 32;

/// A chunk is closed once its payload passes this size (an entry is never split, so one
/// chunk holds at least one entry however large).
pub const SNAPSHOT_CHUNK_BYTES: usize = 1024 * 1024;

/// Snapshots kept on disk: the newest, and one older to fall back on if the newest is
/// damaged. The log is kept from the oldest kept snapshot's base on.
pub const SNAPSHOTS_KEPT: usize = 2;

const ITEM_ENTRY: u8 = 0x10;
const ITEM_END: u8 = 0x11;
const ITEM_LEASE: u8 = 0x12;
const ITEM_ATTACH: u8 = 0x13;
const ITEM_LEASE_SEQUENCE: u8 = 0x14;
const ITEM_LOCK: u8 = 0x15;
const ITEM_ENTRY_FIELDS: u8 = 0x16;
const ITEM_INDEX: u8 = 0x17;

/// The file name of the snapshot that began at revision `base`.
pub fn snapshot_file_name(base: u64) -> String {
    format!("snap-{base:020}.snap")
}

fn temporary_file_name(base: u64) -> String {
    format!("snap-{base:020}.tmp")
}

/// The base revision in a file name written by [`snapshot_file_name`].
pub fn parse_snapshot_file_name(name: &str) -> Option<u64> {
    name.strip_prefix("snap-")?
        .strip_suffix(".snap")?
        .parse()
        .ok()
}

/// Whether `name` is a snapshot that was being written when the process stopped.
pub fn is_temporary_file_name(name: &str) -> bool {
    name.starts_with("snap-")
        && Path::new(name)
            .extension()
            .is_some_and(|extension| extension == "tmp")
}

/// The header at the start of a snapshot file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotHeader {
    /// Format version the snapshot was written in.
    pub format_version: u16,
    /// The core (shard) whose snapshot this is.
    pub core_id: u16,
    /// The shard's revision when the snapshot began: the log is replayed after it.
    pub base_revision: u64,
    /// When the snapshot began, in Unix milliseconds (for operators).
    pub taken_at_ms: u64,
}

impl SnapshotHeader {
    /// The header's bytes.
    pub fn to_bytes(&self) -> [u8; SNAPSHOT_HEADER_SIZE] {
        let mut bytes = [0; SNAPSHOT_HEADER_SIZE];
        bytes[0..4].copy_from_slice(&SNAPSHOT_MAGIC);
        bytes[4..6].copy_from_slice(&self.format_version.to_le_bytes());
        bytes[6..8].copy_from_slice(&self.core_id.to_le_bytes());
        bytes[8..16].copy_from_slice(&self.base_revision.to_le_bytes());
        bytes[16..24].copy_from_slice(&self.taken_at_ms.to_le_bytes());
        // [24, 28) reserved, zero.
        seal_file_header(&mut bytes);
        bytes
    }

    /// Parses and checks a header.
    ///
    /// # Errors
    /// Bad magic, a checksum mismatch or a format this build cannot read.
    pub fn from_bytes(bytes: &[u8; SNAPSHOT_HEADER_SIZE]) -> Result<Self, DurabilityError> {
        check_file_header(bytes, SNAPSHOT_MAGIC, "snapshot")?;
        let header = Self {
            format_version: u16::from_le_bytes([bytes[4], bytes[5]]),
            core_id: u16::from_le_bytes([bytes[6], bytes[7]]),
            base_revision: u64_at(bytes, 8),
            taken_at_ms: u64_at(bytes, 16),
        };
        if !(SNAPSHOT_FORMAT_VERSION_MIN..=SNAPSHOT_FORMAT_VERSION).contains(&header.format_version)
        {
            return Err(DurabilityError::UnsupportedFormat {
                version: header.format_version,
                supported: SNAPSHOT_FORMAT_VERSION,
            });
        }
        Ok(header)
    }
}

fn u64_at(bytes: &[u8], offset: usize) -> u64 {
    let mut word = [0; 8];
    word.copy_from_slice(&bytes[offset..offset + 8]);
    u64::from_le_bytes(word)
}

/// One stored entry, as a snapshot holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotEntry<'a> {
    /// The key.
    pub key: &'a [u8],
    /// The value.
    pub value: &'a [u8],
    /// The fields blob (`shard::fields`); empty without fields.
    pub fields: &'a [u8],
    /// The entry's create and mod revisions and version.
    pub revisions: KeyRevisions,
    /// Absolute expiry in Unix milliseconds, if any.
    pub deadline_ms: Option<u64>,
}

/// Builds a snapshot's chunks in memory: entries go in, sealed chunks come out.
#[derive(Debug, Default)]
pub struct ChunkEncoder {
    buffer: Vec<u8>,
    /// Where the open chunk starts in `buffer`.
    open_at: Option<usize>,
    /// Sequence number of the last chunk opened.
    sequence: u64,
    entry_count: u64,
}

impl ChunkEncoder {
    /// An encoder with nothing in it.
    pub fn new() -> Self {
        Self::default()
    }

    fn open(&mut self) -> usize {
        if let Some(start) = self.open_at {
            return start;
        }
        let start = self.buffer.len();
        self.sequence += 1;
        self.buffer.extend_from_slice(&[0; RECORD_HEADER_SIZE]);
        self.buffer.extend_from_slice(&self.sequence.to_le_bytes());
        self.open_at = Some(start);
        start
    }

    fn seal(&mut self) {
        if let Some(start) = self.open_at.take() {
            seal_record(&mut self.buffer[start..]);
        }
    }

    /// Adds an entry.
    pub fn push(&mut self, entry: &SnapshotEntry<'_>) {
        let start = self.open();
        self.buffer.push(if entry.fields.is_empty() {
            ITEM_ENTRY
        } else {
            ITEM_ENTRY_FIELDS
        });
        self.buffer
            .extend_from_slice(&entry.revisions.modify.to_le_bytes());
        self.buffer
            .extend_from_slice(&entry.revisions.create.to_le_bytes());
        self.buffer
            .extend_from_slice(&entry.revisions.version.to_le_bytes());
        self.buffer.extend_from_slice(
            &entry
                .deadline_ms
                .map_or(0, |deadline| deadline.max(1))
                .to_le_bytes(),
        );
        push_u16_prefixed(&mut self.buffer, entry.key);
        push_u32_prefixed(&mut self.buffer, entry.value);
        if !entry.fields.is_empty() {
            push_u32_prefixed(&mut self.buffer, entry.fields);
        }
        self.entry_count += 1;
        self.seal_if_full(start);
    }

    /// Adds the shard's leases: the last lease sequence granted, every lease homed on it
    /// with its TTL, and every attachment of a key to a lease. Like entries, they may be
    /// copied at any moment after the base: the log's lease effects set or remove one
    /// lease or attachment each, so replaying them over the copy gives the exact state.
    pub fn push_leases(&mut self, leases: &Leases) {
        self.open();
        self.buffer.push(ITEM_LEASE_SEQUENCE);
        self.buffer
            .extend_from_slice(&leases.last_sequence().to_le_bytes());
        for (id, ttl_ms) in leases.home_leases() {
            let start = self.open();
            self.buffer.push(ITEM_LEASE);
            self.buffer.extend_from_slice(&id.to_le_bytes());
            self.buffer.extend_from_slice(&ttl_ms.to_le_bytes());
            self.seal_if_full(start);
        }
        for (key, lease) in leases.attachments() {
            let start = self.open();
            self.buffer.push(ITEM_ATTACH);
            self.buffer.extend_from_slice(&lease.to_le_bytes());
            push_u16_prefixed(&mut self.buffer, key);
            self.seal_if_full(start);
        }
    }

    /// Adds the shard's index definitions. Loading one files the entries loaded before it,
    /// and the log's index effects after the base replay over it in order.
    pub fn push_indexes(&mut self, indexes: &Indexes) {
        for index in indexes.iter() {
            let start = self.open();
            self.buffer.push(ITEM_INDEX);
            push_u16_prefixed(&mut self.buffer, index.spec.name.as_bytes());
            push_u16_prefixed(&mut self.buffer, &index.spec.prefix);
            push_u16_prefixed(&mut self.buffer, index.spec.field.as_bytes());
            self.buffer.push(index_kind_byte(index.spec.kind));
            self.seal_if_full(start);
        }
    }

    /// Adds the shard's locks: each one's last token and holder (lease and token, or none).
    pub fn push_locks(&mut self, locks: &Locks) {
        for (name, holder, last_token) in locks.entries() {
            let start = self.open();
            self.buffer.push(ITEM_LOCK);
            self.buffer.extend_from_slice(&last_token.to_le_bytes());
            let (lease, token) = holder.map_or((0, 0), |holder| (holder.lease, holder.token));
            self.buffer.extend_from_slice(&lease.to_le_bytes());
            self.buffer.extend_from_slice(&token.to_le_bytes());
            push_u16_prefixed(&mut self.buffer, name);
            self.seal_if_full(start);
        }
    }

    fn seal_if_full(&mut self, start: usize) {
        if self.buffer.len() - start - RECORD_HEADER_SIZE >= SNAPSHOT_CHUNK_BYTES {
            self.seal();
        }
    }

    /// Adds the end marker: the snapshot saw the shard up to `end_revision`.
    pub fn finish(&mut self, end_revision: u64) {
        self.open();
        self.buffer.push(ITEM_END);
        self.buffer.extend_from_slice(&end_revision.to_le_bytes());
        self.buffer
            .extend_from_slice(&self.entry_count.to_le_bytes());
        self.seal();
    }

    /// Takes the sealed chunks (not the open one), if they add up to at least `at_least`
    /// bytes.
    pub fn take_sealed(&mut self, at_least: usize) -> Option<Vec<u8>> {
        let sealed = self.open_at.unwrap_or(self.buffer.len());
        if sealed == 0 || sealed < at_least {
            return None;
        }
        let open = self.buffer.split_off(sealed);
        self.open_at = self.open_at.map(|_| 0);
        Some(std::mem::replace(&mut self.buffer, open))
    }

    /// Entries pushed so far.
    pub fn entry_count(&self) -> u64 {
        self.entry_count
    }
}

/// A snapshot that was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotWritten {
    /// The file.
    pub path: PathBuf,
    /// The revision it began at.
    pub base_revision: u64,
    /// The revision it ended at.
    pub end_revision: u64,
    /// Entries in it.
    pub entry_count: u64,
    /// The file's size.
    pub byte_count: u64,
    /// The longest time the shard was held for one partition's copy, in microseconds.
    pub longest_pause_us: u64,
    /// Files removed behind it (older snapshots, log segments).
    pub removed: Vec<PathBuf>,
}

/// Bytes gathered before they are written out.
const WRITE_BYTES: usize = 1024 * 1024;

/// Writes a snapshot of `shard` into `directory` (see the module documentation), then removes
/// what it makes unnecessary. `log` is the core's log: the snapshot is committed only once
/// the log holds every revision it saw.
///
/// # Errors
/// A file operation failed (the temporary file is removed); nothing committed is touched.
pub async fn write_snapshot<S: Storage>(
    storage: &S,
    directory: &Path,
    core_id: u16,
    shard: &RefCell<Shard>,
    log: &CoreLog,
) -> Result<SnapshotWritten, DurabilityError> {
    let base_revision = shard.borrow().revision();
    let temporary = directory.join(temporary_file_name(base_revision));
    let file = storage
        .create(&temporary)
        .await
        .map_err(io_error("create", &temporary))?;
    let outcome = write_contents(&file, &temporary, core_id, base_revision, shard, log).await;
    let synced = match outcome {
        Ok(written) => file
            .sync()
            .await
            .map_err(io_error("fdatasync", &temporary))
            .map(|()| written),
        Err(error) => Err(error),
    };
    let _ = file.close().await;
    let (end_revision, entry_count, byte_count, longest_pause_us) = match synced {
        Ok(written) => written,
        Err(error) => {
            let _ = storage.remove(&temporary).await;
            return Err(error);
        }
    };
    // Committing a snapshot that holds revisions the log could still lose would let recovery
    // show a state no prefix of the log describes.
    if let Some(reason) = log.failure() {
        let _ = storage.remove(&temporary).await;
        return Err(DurabilityError::corrupt(format!(
            "the log failed: {reason}"
        )));
    }
    log.wait_durable(end_revision).await;
    let path = directory.join(snapshot_file_name(base_revision));
    storage
        .rename(&temporary, &path)
        .await
        .map_err(io_error("rename", &temporary))?;
    storage
        .sync_directory(directory)
        .await
        .map_err(io_error("sync directory", directory))?;
    let removed = prune(storage, directory).await?;
    Ok(SnapshotWritten {
        path,
        base_revision,
        end_revision,
        entry_count,
        byte_count,
        longest_pause_us,
        removed,
    })
}

/// Writes header, chunks and end marker; returns the end revision, entry count, bytes and
/// longest pause.
async fn write_contents<F: StorageFile>(
    file: &F,
    path: &Path,
    core_id: u16,
    base_revision: u64,
    shard: &RefCell<Shard>,
    log: &CoreLog,
) -> Result<(u64, u64, u64, u64), DurabilityError> {
    let header = SnapshotHeader {
        format_version: SNAPSHOT_FORMAT_VERSION,
        core_id,
        base_revision,
        taken_at_ms: crate::clock::now_unix_ms(),
    };
    let mut offset = 0_u64;
    let mut write = |bytes: Vec<u8>| {
        let at = offset;
        offset += bytes.len() as u64;
        async move {
            let length = bytes.len();
            let written = file
                .write_at(bytes, at)
                .await
                .map_err(io_error("write", path))?;
            if written == length {
                Ok(())
            } else {
                Err(io_error("write", path)(std::io::Error::other(format!(
                    "short write: {written} of {length} bytes"
                ))))
            }
        }
    };
    write(header.to_bytes().to_vec()).await?;
    let mut encoder = ChunkEncoder::new();
    let mut longest_pause = std::time::Duration::ZERO;
    for partition in 0..PARTITION_COUNT {
        if let Some(reason) = log.failure() {
            return Err(DurabilityError::corrupt(format!(
                "the log failed: {reason}"
            )));
        }
        let started = std::time::Instant::now();
        {
            let shard = shard.borrow();
            let now_ms = crate::clock::now_unix_ms();
            for entry in shard.partition_entries(partition) {
                if entry.is_expired(now_ms) {
                    continue;
                }
                encoder.push(&SnapshotEntry {
                    key: entry.key(),
                    value: entry.value(),
                    fields: entry.fields(),
                    revisions: entry.revisions(),
                    deadline_ms: entry.deadline_ms(),
                });
            }
        }
        longest_pause = longest_pause.max(started.elapsed());
        if let Some(bytes) = encoder.take_sealed(WRITE_BYTES) {
            write(bytes).await?;
        }
        // Let the shard serve requests before the next partition.
        futures_lite::future::yield_now().await;
    }
    let end_revision = {
        let shard = shard.borrow();
        encoder.push_leases(shard.leases());
        encoder.push_locks(shard.locks());
        encoder.push_indexes(shard.indexes());
        shard.revision()
    };
    encoder.finish(end_revision);
    if let Some(bytes) = encoder.take_sealed(0) {
        write(bytes).await?;
    }
    let longest_pause_us = u64::try_from(longest_pause.as_micros()).unwrap_or(u64::MAX);
    Ok((
        end_revision,
        encoder.entry_count(),
        offset,
        longest_pause_us,
    ))
}

/// The snapshot files of `directory`, newest (highest base) first.
///
/// # Errors
/// The directory cannot be read.
pub fn snapshot_files(directory: &Path) -> Result<Vec<(u64, PathBuf)>, DurabilityError> {
    let mut snapshots = numbered_files(directory, parse_snapshot_file_name)?;
    snapshots.reverse();
    Ok(snapshots)
}

/// Removes snapshots beyond the [`SNAPSHOTS_KEPT`] newest, and the log segments whose records
/// all precede the oldest kept one's base (none while fewer are kept). The segment being
/// written is never among them: a segment goes only when a later one's header says it began
/// at or before that base.
async fn prune<S: Storage>(storage: &S, directory: &Path) -> Result<Vec<PathBuf>, DurabilityError> {
    let snapshots = snapshot_files(directory)?;
    let mut removed = Vec::new();
    for (_, path) in snapshots.iter().skip(SNAPSHOTS_KEPT) {
        storage
            .remove(path)
            .await
            .map_err(io_error("remove", path))?;
        removed.push(path.clone());
    }
    // Until there are SNAPSHOTS_KEPT snapshots the whole log stays: a damaged only snapshot
    // must still leave the log to recover from.
    let Some(&(keep_from, _)) = snapshots.get(SNAPSHOTS_KEPT - 1) else {
        return Ok(removed);
    };
    let segments = segment_files(directory)?;
    for pair in segments.windows(2) {
        let (_, path) = &pair[0];
        let (_, next_path) = &pair[1];
        let next_begins_after = match read_segment_header(next_path) {
            Ok(Some(header)) => header.revision_before,
            // A segment not started yet, or unreadable: keep everything from here on.
            _ => break,
        };
        if next_begins_after > keep_from {
            break;
        }
        storage
            .remove(path)
            .await
            .map_err(io_error("remove", path))?;
        removed.push(path.clone());
    }
    if !removed.is_empty() {
        storage
            .sync_directory(directory)
            .await
            .map_err(io_error("sync directory", directory))?;
    }
    Ok(removed)
}

/// A snapshot loaded into a shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotLoaded {
    /// The revision it began at: the log is replayed after it.
    pub base_revision: u64,
    /// The revision it ended at.
    pub end_revision: u64,
    /// Entries in the file (expired ones were not stored).
    pub entry_count: u64,
}

/// Loads the snapshot at `path` into `shard` (which should be empty), at time `now_ms`.
/// Entries already expired are dropped. Reads the file in chunks, so memory beyond the shard
/// stays at one chunk.
///
/// # Errors
/// The file cannot be read, or is not a complete, valid snapshot of core `core_id`; `shard`
/// may then hold part of it and must be discarded.
pub fn load_snapshot(
    path: &Path,
    core_id: u16,
    shard: &mut Shard,
    now_ms: u64,
) -> Result<SnapshotLoaded, DurabilityError> {
    let file = fs::File::open(path).map_err(io_error("open", path))?;
    let mut reader = std::io::BufReader::with_capacity(WRITE_BYTES, file);
    let mut header_bytes = [0; SNAPSHOT_HEADER_SIZE];
    reader
        .read_exact(&mut header_bytes)
        .map_err(|_| DurabilityError::corrupt("snapshot shorter than its header"))?;
    let header = SnapshotHeader::from_bytes(&header_bytes)?;
    if header.core_id != core_id {
        return Err(DurabilityError::corrupt(format!(
            "snapshot of core {}, expected core {core_id}",
            header.core_id
        )));
    }
    let mut chunk = Vec::new();
    let mut sequence = 0_u64;
    let mut entry_count = 0_u64;
    let mut offset = SNAPSHOT_HEADER_SIZE as u64;
    loop {
        chunk.resize(RECORD_HEADER_SIZE, 0);
        read_all(&mut reader, &mut chunk[..], offset, "chunk header")?;
        let payload_size = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]) as usize;
        if !(8..=RECORD_PAYLOAD_SIZE_MAX).contains(&payload_size) {
            return Err(DurabilityError::corrupt(format!(
                "byte {offset}: chunk payload size {payload_size} is impossible"
            )));
        }
        chunk.resize(RECORD_HEADER_SIZE + payload_size, 0);
        read_all(
            &mut reader,
            &mut chunk[RECORD_HEADER_SIZE..],
            offset,
            "chunk",
        )?;
        let record = match read_record(&chunk) {
            ReadOutcome::Record(record, _) => record,
            ReadOutcome::Damaged { reason } => {
                return Err(DurabilityError::corrupt(format!("byte {offset}: {reason}")))
            }
            ReadOutcome::End => {
                return Err(DurabilityError::corrupt(format!(
                    "byte {offset}: a zero chunk header"
                )))
            }
        };
        sequence += 1;
        if record.revision != sequence {
            return Err(DurabilityError::corrupt(format!(
                "byte {offset}: chunk {} where chunk {sequence} belongs",
                record.revision
            )));
        }
        let items = &chunk[RECORD_HEADER_SIZE + 8..];
        if let Some((end_revision, stored_count)) =
            restore_items(items, offset, shard, now_ms, &mut entry_count)?
        {
            if stored_count != entry_count {
                return Err(DurabilityError::corrupt(format!(
                    "the end marker counts {stored_count} entries, the chunks hold {entry_count}"
                )));
            }
            let mut rest_of_file = [0; 1];
            if reader
                .read(&mut rest_of_file)
                .map_err(io_error("read", path))?
                != 0
            {
                return Err(DurabilityError::corrupt(
                    "bytes follow the snapshot's end marker",
                ));
            }
            return Ok(SnapshotLoaded {
                base_revision: header.base_revision,
                end_revision,
                entry_count,
            });
        }
        offset += chunk.len() as u64;
    }
}

/// Restores a chunk's entries into `shard`; returns the end marker's revision and entry count
/// if the chunk ends with it.
fn restore_items(
    mut items: &[u8],
    offset: u64,
    shard: &mut Shard,
    now_ms: u64,
    entry_count: &mut u64,
) -> Result<Option<(u64, u64)>, DurabilityError> {
    while let Some((&kind, rest)) = items.split_first() {
        match kind {
            ITEM_ENTRY | ITEM_ENTRY_FIELDS => {
                let at_byte = |error: DurabilityError| {
                    DurabilityError::corrupt(format!("byte {offset}: {error}"))
                };
                let (entry, rest) =
                    parse_entry(rest, kind == ITEM_ENTRY_FIELDS).map_err(at_byte)?;
                shard
                    .restore_entry(
                        now_ms,
                        entry.key,
                        entry.fields,
                        entry.value,
                        entry.revisions,
                        entry.deadline_ms,
                    )
                    .map_err(at_byte)?;
                *entry_count += 1;
                items = rest;
            }
            ITEM_INDEX => {
                items = restore_index_item(rest, shard)
                    .map_err(|error| DurabilityError::corrupt(format!("byte {offset}: {error}")))?;
            }
            ITEM_LEASE_SEQUENCE | ITEM_LEASE | ITEM_ATTACH | ITEM_LOCK => {
                items = restore_lease_item(kind, rest, shard)
                    .map_err(|error| DurabilityError::corrupt(format!("byte {offset}: {error}")))?;
            }
            ITEM_END if rest.len() == 16 => return Ok(Some((u64_at(rest, 0), u64_at(rest, 8)))),
            ITEM_END => {
                return Err(DurabilityError::corrupt(format!(
                    "byte {offset}: the end marker is malformed or not last"
                )))
            }
            other => {
                return Err(DurabilityError::corrupt(format!(
                    "byte {offset}: unknown snapshot item kind {other}"
                )))
            }
        }
    }
    Ok(None)
}

/// Restores one lease item into `shard`; returns the bytes after it.
fn restore_lease_item<'a>(
    kind: u8,
    bytes: &'a [u8],
    shard: &mut Shard,
) -> Result<&'a [u8], DurabilityError> {
    let cut_short = || DurabilityError::corrupt("snapshot lease item cut short");
    let (first, rest) = bytes.split_first_chunk::<8>().ok_or_else(cut_short)?;
    let first = u64::from_le_bytes(*first);
    match kind {
        ITEM_LEASE_SEQUENCE => {
            shard.restore_lease_sequence(first);
            Ok(rest)
        }
        ITEM_LEASE => {
            let (ttl_ms, rest) = rest.split_first_chunk::<8>().ok_or_else(cut_short)?;
            shard.restore_lease(first, u64::from_le_bytes(*ttl_ms));
            Ok(rest)
        }
        ITEM_LOCK => {
            let (holder, rest) = rest.split_first_chunk::<16>().ok_or_else(cut_short)?;
            let lease = u64_at(holder, 0);
            let token = u64_at(holder, 8);
            let (name, rest) = take_u16_prefixed(rest)?;
            shard.restore_lock(name, (lease != 0).then_some((lease, token)), first);
            Ok(rest)
        }
        _ => {
            let (key, rest) = take_u16_prefixed(rest)?;
            shard.restore_attachment(key, first);
            Ok(rest)
        }
    }
}

fn read_all(
    reader: &mut impl std::io::Read,
    buffer: &mut [u8],
    offset: u64,
    what: &str,
) -> Result<(), DurabilityError> {
    reader.read_exact(buffer).map_err(|error| {
        if error.kind() == std::io::ErrorKind::UnexpectedEof {
            DurabilityError::corrupt(format!(
                "byte {offset}: the snapshot ends inside a {what}, before its end marker"
            ))
        } else {
            DurabilityError::corrupt(format!("byte {offset}: cannot read: {error}"))
        }
    })
}

/// Restores one index definition into `shard`; returns the bytes after it.
fn restore_index_item<'a>(bytes: &'a [u8], shard: &mut Shard) -> Result<&'a [u8], DurabilityError> {
    let (name, rest) = take_u16_prefixed(bytes)?;
    let (prefix, rest) = take_u16_prefixed(rest)?;
    let (field, rest) = take_u16_prefixed(rest)?;
    let Some((&kind, rest)) = rest.split_first() else {
        return Err(DurabilityError::corrupt("snapshot index item cut short"));
    };
    shard.restore_index(index_spec_of(name, prefix, field, index_kind_of(kind)?)?);
    Ok(rest)
}

fn parse_entry(
    bytes: &[u8],
    has_fields: bool,
) -> Result<(SnapshotEntry<'_>, &[u8]), DurabilityError> {
    let Some((fixed, rest)) = bytes.split_first_chunk::<32>() else {
        return Err(DurabilityError::corrupt("snapshot entry cut short"));
    };
    let revisions = KeyRevisions {
        modify: u64_at(fixed, 0),
        create: u64_at(fixed, 8),
        version: u64_at(fixed, 16),
    };
    let deadline_ms = u64_at(fixed, 24);
    let (key, rest) = take_u16_prefixed(rest)?;
    let (value, rest) = take_u32_prefixed(rest)?;
    let (fields, rest) = if has_fields {
        take_u32_prefixed(rest)?
    } else {
        (&[][..], rest)
    };
    Ok((
        SnapshotEntry {
            key,
            value,
            fields,
            revisions,
            deadline_ms: (deadline_ms != 0).then_some(deadline_ms),
        },
        rest,
    ))
}
