//! Recovery at startup: load a core's newest valid snapshot, then replay its log segments
//! into its shard.
//!
//! Runs on the core's thread before the core reports ready, with plain blocking file I/O
//! (nothing else runs on the core yet). The newest snapshot that reads back whole is loaded
//! (a damaged one is renamed `*.damaged`, logged, and the next older one tried: the log is
//! kept from the oldest kept snapshot on, so nothing is lost). Segments are read in id order
//! from the one holding the first record after the snapshot, and every later record is
//! replayed. What a crash can leave is handled without help: a segment whose header never
//! reached the disk (the crash hit its creation) is removed, and a last segment that ends in a
//! torn or unchecksummable record is truncated there (logged). Damage that valid records
//! follow is not a crash's doing: recovery refuses to start, naming the file and offset,
//! unless `repair` is set, in which case everything from the damage on is dropped (logged).

use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use crate::durability::format::{read_record, ReadOutcome, SegmentHeader, SEGMENT_HEADER_SIZE};
use crate::durability::log::parse_segment_file_name;
use crate::durability::snapshot::{
    is_temporary_file_name, load_snapshot, snapshot_files, SnapshotLoaded,
};
use crate::durability::{io_error, numbered_files, DurabilityError};
use crate::shard::Shard;

/// What recovery found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovered {
    /// The id the next segment must take.
    pub next_segment_id: u64,
    /// Segments read.
    pub segment_count: usize,
    /// Records replayed.
    pub record_count: u64,
    /// Bytes of records replayed.
    pub byte_count: u64,
    /// The base revision of the snapshot loaded, if one was.
    pub snapshot_base: Option<u64>,
    /// Entries the snapshot held.
    pub snapshot_entry_count: u64,
    /// Files truncated or removed, with the reason (a crash's leftovers, or `repair`).
    pub repairs: Vec<String>,
}

/// The segment files of `directory`, in id order.
///
/// # Errors
/// The directory cannot be read.
pub fn segment_files(directory: &Path) -> Result<Vec<(u64, PathBuf)>, DurabilityError> {
    numbered_files(directory, parse_segment_file_name)
}

/// Replays the log in `directory` (created if missing) into `shard` at time `now_ms`.
///
/// # Errors
/// A file cannot be read, a segment belongs to another core, or the log is damaged before its
/// end and `repair` is not set.
pub fn recover(
    directory: &Path,
    core_id: u16,
    shard: &mut Shard,
    now_ms: u64,
    repair: bool,
) -> Result<Recovered, DurabilityError> {
    fs::create_dir_all(directory).map_err(io_error("create directory", directory))?;
    let mut recovered = Recovered::default();
    remove_temporary_snapshots(directory, &mut recovered)?;
    let (loaded, damaged) =
        load_newest_snapshot(directory, core_id, shard, now_ms, &mut recovered)?;
    let base = loaded.map_or(0, |loaded| loaded.base_revision);
    let segments = segment_files(directory)?;
    recovered.next_segment_id = segments.last().map_or(1, |(id, _)| id + 1);
    if loaded.is_none() && !damaged.is_empty() && segments.is_empty() && !repair {
        let names: Vec<String> = damaged
            .iter()
            .map(|(path, error)| format!("{} ({error})", path.display()))
            .collect();
        return Err(DurabilityError::corrupt(format!(
            "every snapshot is damaged: {}; and there is no log to rebuild the shard from. \
             Start with --repair to set them aside and start empty",
            names.join(", ")
        )));
    }
    // Refuses (touching nothing) if the log does not reach back to what is loaded.
    let first = first_segment_after(&segments, base, repair, &mut recovered)?;
    set_aside(directory, damaged, &mut recovered)?;
    let replay = Replay {
        core_id,
        now_ms,
        base,
        repair,
    };
    replay_log(&segments, first, &replay, shard, &mut recovered)?;
    if let Some(loaded) = loaded {
        shard.restore_revision(loaded.end_revision);
    }
    if !recovered.repairs.is_empty() {
        sync_directory_blocking(directory)?;
    }
    for repair in &recovered.repairs {
        tracing::warn!(core_id, repair = %repair, "log repaired during recovery");
    }
    Ok(recovered)
}

/// What recovery replays the log with.
struct Replay {
    core_id: u16,
    now_ms: u64,
    /// Records up to this revision are in the snapshot loaded.
    base: u64,
    repair: bool,
}

/// Replays `segments` from index `first` on, cutting what a crash left at the tail and, with
/// `repair`, everything from damage on.
fn replay_log(
    segments: &[(u64, PathBuf)],
    first: usize,
    replay: &Replay,
    shard: &mut Shard,
    recovered: &mut Recovered,
) -> Result<(), DurabilityError> {
    let mut drop_from = None;
    for (index, (segment_id, path)) in segments.iter().enumerate().skip(first) {
        let bytes = fs::read(path).map_err(io_error("read", path))?;
        let outcome = replay_segment(&bytes, *segment_id, replay, shard, recovered)
            .map_err(|error| located(path, 0, &error))?;
        if let SegmentEnd::Clean { end } = outcome {
            if bytes.len() > end {
                // Preallocated space never written: give it back.
                truncate(path, end)?;
            }
            continue;
        }
        // The segment ends badly. It is the log's tail if no later segment holds a record:
        // then what a crash leaves there is cut off without asking.
        let later = &segments[index + 1..];
        let is_tail = !later_segments_hold_records(later)?;
        match outcome {
            SegmentEnd::TornHeader if is_tail => {
                fs::remove_file(path).map_err(io_error("remove", path))?;
                recovered.repairs.push(format!(
                    "{}: removed (its header was never written whole)",
                    path.display()
                ));
            }
            SegmentEnd::Torn { offset } if is_tail && !has_batch_marker_after(&bytes[offset..]) => {
                truncate(path, offset)?;
                recovered.repairs.push(format!(
                    "{}: truncated at byte {offset} (a record torn by a crash)",
                    path.display()
                ));
            }
            SegmentEnd::Unstarted if is_tail => {
                fs::remove_file(path).map_err(io_error("remove", path))?;
                if bytes.iter().all(|&byte| byte == 0) {
                    // The next segment, allocated ahead and never used: nothing to report.
                    tracing::debug!(path = %path.display(), "removed an unused preallocated segment");
                } else {
                    recovered.repairs.push(format!(
                        "{}: removed (its header never reached the disk, so nothing in it was \
                         synced)",
                        path.display()
                    ));
                }
            }
            SegmentEnd::Damaged { offset, ref reason }
                if is_tail && !has_batch_marker_after(&bytes[offset..]) =>
            {
                if offset == 0 {
                    fs::remove_file(path).map_err(io_error("remove", path))?;
                } else {
                    truncate(path, offset)?;
                }
                recovered.repairs.push(format!(
                    "{}: truncated at byte {offset} ({reason}; nothing valid follows)",
                    path.display()
                ));
            }
            _ => {
                let (offset, reason) = match outcome {
                    SegmentEnd::Damaged { offset, reason, .. } => (offset, reason),
                    SegmentEnd::Torn { offset } => (offset, "a record cut short".to_owned()),
                    SegmentEnd::Unstarted => (0, "the segment header was never written".to_owned()),
                    _ => (0, "the segment header is damaged".to_owned()),
                };
                if !replay.repair {
                    return Err(DurabilityError::corrupt(format!(
                        "{} is damaged at byte {offset} ({reason}) and valid log data follows; \
                         start with --repair to keep what precedes the damage and drop the rest",
                        path.display()
                    )));
                }
                if offset == 0 {
                    // The header itself is damaged: nothing in the file can be trusted.
                    fs::remove_file(path).map_err(io_error("remove", path))?;
                } else {
                    truncate(path, offset)?;
                }
                recovered.repairs.push(format!(
                    "{}: repaired, cut at byte {offset} ({reason})",
                    path.display()
                ));
                drop_from = Some(index + 1);
                break;
            }
        }
    }
    if let Some(first_dropped) = drop_from {
        for (_, path) in &segments[first_dropped..] {
            fs::remove_file(path).map_err(io_error("remove", path))?;
            recovered
                .repairs
                .push(format!("{}: removed by repair", path.display()));
        }
    }
    Ok(())
}

/// Removes snapshots that were being written when the process stopped.
fn remove_temporary_snapshots(
    directory: &Path,
    recovered: &mut Recovered,
) -> Result<(), DurabilityError> {
    for entry in fs::read_dir(directory).map_err(io_error("read directory", directory))? {
        let entry = entry.map_err(io_error("read directory", directory))?;
        if entry
            .file_name()
            .to_str()
            .is_some_and(is_temporary_file_name)
        {
            let path = entry.path();
            fs::remove_file(&path).map_err(io_error("remove", &path))?;
            recovered.repairs.push(format!(
                "{}: removed (a snapshot not finished when the process stopped)",
                path.display()
            ));
        }
    }
    Ok(())
}

/// A snapshot that did not read back whole, and why.
type Damaged = (PathBuf, DurabilityError);

/// Loads the newest snapshot that reads back whole, trying older ones after a damaged one.
/// Returns it and the damaged ones passed over, with what is wrong with each; those are set
/// aside by [`set_aside`] once recovery knows it can go on without them.
fn load_newest_snapshot(
    directory: &Path,
    core_id: u16,
    shard: &mut Shard,
    now_ms: u64,
    recovered: &mut Recovered,
) -> Result<(Option<SnapshotLoaded>, Vec<Damaged>), DurabilityError> {
    let mut damaged = Vec::new();
    for (_, path) in snapshot_files(directory)? {
        match load_snapshot(&path, core_id, shard, now_ms) {
            Ok(loaded) => {
                shard.restore_revision(loaded.base_revision);
                recovered.snapshot_base = Some(loaded.base_revision);
                recovered.snapshot_entry_count = loaded.entry_count;
                return Ok((Some(loaded), damaged));
            }
            Err(error) => {
                *shard = shard.emptied(now_ms);
                damaged.push((path, error));
            }
        }
    }
    Ok((None, damaged))
}

/// Renames damaged snapshots to `*.snap.damaged`: kept for inspection, never loaded again.
fn set_aside(
    directory: &Path,
    damaged: Vec<Damaged>,
    recovered: &mut Recovered,
) -> Result<(), DurabilityError> {
    if damaged.is_empty() {
        return Ok(());
    }
    let source = match recovered.snapshot_base {
        Some(base) => format!("the snapshot at revision {base} and the log after it"),
        None => "the log alone".to_owned(),
    };
    for (path, error) in damaged {
        let renamed = path.with_extension("snap.damaged");
        fs::rename(&path, &renamed).map_err(io_error("rename", &path))?;
        recovered.repairs.push(format!(
            "{}: damaged ({error}); renamed to {}, and the shard recovered from {source}",
            path.display(),
            renamed.display()
        ));
    }
    sync_directory_blocking(directory)
}

/// The header of the segment at `path`, or `None` if the file does not begin with a valid
/// one (a segment created but not started, or a torn one).
///
/// # Errors
/// The file cannot be read.
pub fn read_segment_header(path: &Path) -> Result<Option<SegmentHeader>, DurabilityError> {
    let mut bytes = [0; SEGMENT_HEADER_SIZE];
    let mut file = fs::File::open(path).map_err(io_error("open", path))?;
    match std::io::Read::read_exact(&mut file, &mut bytes) {
        Ok(()) => Ok(SegmentHeader::from_bytes(&bytes).ok()),
        Err(error) if error.kind() == std::io::ErrorKind::UnexpectedEof => Ok(None),
        Err(error) => Err(io_error("read", path)(error)),
    }
}

/// The index of the first segment that may hold a record after `base`: segments before it
/// hold only records up to `base` (a later segment's header says so). Refuses a log that
/// begins after `base`, since the records in between are gone, unless `repair` is set.
fn first_segment_after(
    segments: &[(u64, PathBuf)],
    base: u64,
    repair: bool,
    recovered: &mut Recovered,
) -> Result<usize, DurabilityError> {
    let mut first = 0;
    for (index, (_, path)) in segments.iter().enumerate() {
        match read_segment_header(path)? {
            Some(header) if header.revision_before <= base => first = index,
            Some(header) if index == 0 => {
                let message = format!(
                    "{} begins after revision {}, but the state before it is known only up to \
                     revision {base} (no snapshot covers the gap)",
                    path.display(),
                    header.revision_before
                );
                if !repair {
                    return Err(DurabilityError::corrupt(format!(
                        "{message}; start with --repair to recover what remains"
                    )));
                }
                recovered
                    .repairs
                    .push(format!("{message}: repaired by keeping what remains"));
                return Ok(0);
            }
            _ => break,
        }
    }
    Ok(first)
}

/// Whether a valid batch marker starts anywhere in `bytes` after its first byte. The writer
/// syncs each batch before it writes the next, and every batch begins with a marker, so
/// only a segment's last batch can be torn by a crash: bad bytes with no batch after them
/// are that batch, torn, while a batch after them proves they were synced and then damaged.
fn has_batch_marker_after(bytes: &[u8]) -> bool {
    (1..bytes.len()).any(|offset| {
        matches!(read_record(&bytes[offset..]), ReadOutcome::Record(record, _) if record.batch_length().is_some())
    })
}

/// Whether any of `segments` holds a byte of record data after its header.
fn later_segments_hold_records(segments: &[(u64, PathBuf)]) -> Result<bool, DurabilityError> {
    for (_, path) in segments {
        if segment_holds_records(path)? {
            return Ok(true);
        }
    }
    Ok(false)
}

fn segment_holds_records(path: &Path) -> Result<bool, DurabilityError> {
    let bytes = fs::read(path).map_err(io_error("read", path))?;
    Ok(bytes.len() > SEGMENT_HEADER_SIZE
        && bytes[SEGMENT_HEADER_SIZE..].iter().any(|&byte| byte != 0))
}

fn located(path: &Path, offset: usize, error: &DurabilityError) -> DurabilityError {
    DurabilityError::corrupt(format!("{} at byte {offset}: {error}", path.display()))
}

/// How a segment's records ended.
#[derive(Debug, PartialEq, Eq)]
enum SegmentEnd {
    /// At the end of the data, or at zeros from `end` on.
    Clean { end: usize },
    /// The file is shorter than a header.
    TornHeader,
    /// A record runs past the end of the file.
    Torn { offset: usize },
    /// The header is all zeros: the segment was created but its first write never reached
    /// the disk whole, so nothing in it was ever synced.
    Unstarted,
    /// A record is present but wrong.
    Damaged { offset: usize, reason: String },
}

fn replay_segment(
    bytes: &[u8],
    segment_id: u64,
    replay: &Replay,
    shard: &mut Shard,
    recovered: &mut Recovered,
) -> Result<SegmentEnd, DurabilityError> {
    let Replay {
        core_id,
        now_ms,
        base,
        ..
    } = *replay;
    let Some(header_bytes) = bytes.first_chunk::<SEGMENT_HEADER_SIZE>() else {
        return Ok(SegmentEnd::TornHeader);
    };
    if header_bytes.iter().all(|&byte| byte == 0) {
        return Ok(SegmentEnd::Unstarted);
    }
    let header = match SegmentHeader::from_bytes(header_bytes) {
        Ok(header) => header,
        Err(DurabilityError::Corrupt { reason }) => {
            return Ok(SegmentEnd::Damaged { offset: 0, reason })
        }
        Err(error) => return Err(error),
    };
    if header.segment_id != segment_id || header.core_id != core_id {
        return Err(DurabilityError::corrupt(format!(
            "segment header says segment {} of core {}, expected segment {segment_id} of core \
             {core_id}",
            header.segment_id, header.core_id
        )));
    }
    recovered.segment_count += 1;
    let mut offset = SEGMENT_HEADER_SIZE;
    loop {
        match read_record(&bytes[offset..]) {
            ReadOutcome::Record(record, size) => {
                if record.batch_length().is_none() && record.revision > base {
                    shard.replay(now_ms, &record).map_err(|error| {
                        DurabilityError::corrupt(format!("byte {offset}: {error}"))
                    })?;
                    recovered.record_count += 1;
                    recovered.byte_count += size as u64;
                }
                offset += size;
            }
            ReadOutcome::End => {
                let rest = &bytes[offset..];
                return Ok(if rest.iter().all(|&byte| byte == 0) {
                    SegmentEnd::Clean { end: offset }
                } else {
                    SegmentEnd::Torn { offset }
                });
            }
            ReadOutcome::Damaged { reason } => return Ok(SegmentEnd::Damaged { offset, reason }),
        }
    }
}

fn truncate(path: &Path, size: usize) -> Result<(), DurabilityError> {
    let file = fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(io_error("open", path))?;
    file.set_len(size as u64)
        .map_err(io_error("truncate", path))?;
    file.sync_all().map_err(io_error("sync", path))
}

fn sync_directory_blocking(directory: &Path) -> Result<(), DurabilityError> {
    fs::File::open(directory)
        .and_then(|handle| handle.sync_all())
        .map_err(io_error("sync directory", directory))
}

/// The description of a data directory, checked at every start so a directory written for
/// another core count (whose shards own other slots) is never replayed into the wrong cores.
const META_FILE_NAME: &str = "tessera-data";

/// Creates the data directory and its per-core directories, or checks an existing one's core
/// count.
///
/// # Errors
/// The directory cannot be created, or it was written for another number of cores.
pub fn prepare_data_dir(data_dir: &Path, core_count: usize) -> Result<(), DurabilityError> {
    fs::create_dir_all(data_dir).map_err(io_error("create directory", data_dir))?;
    let meta_path = data_dir.join(META_FILE_NAME);
    let expected = format!("tessera data directory\nformat 1\ncores {core_count}\n");
    match fs::read_to_string(&meta_path) {
        Ok(found) if found == expected => {}
        Ok(found) => {
            return Err(DurabilityError::corrupt(format!(
                "{} describes another layout ({:?}); this server runs {core_count} cores. \
                 Start it with the core count the directory was written with",
                meta_path.display(),
                found.lines().collect::<Vec<_>>().join(", ")
            )))
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            let temporary = data_dir.join(format!("{META_FILE_NAME}.tmp"));
            let mut file = fs::File::create(&temporary).map_err(io_error("create", &temporary))?;
            file.write_all(expected.as_bytes())
                .and_then(|()| file.sync_all())
                .map_err(io_error("write", &temporary))?;
            fs::rename(&temporary, &meta_path).map_err(io_error("rename", &meta_path))?;
            sync_directory_blocking(data_dir)?;
        }
        Err(error) => return Err(io_error("read", &meta_path)(error)),
    }
    for core_id in 0..core_count {
        let directory = core_directory(data_dir, core_id);
        fs::create_dir_all(&directory).map_err(io_error("create directory", &directory))?;
    }
    Ok(())
}

/// The directory of core `core_id`'s log.
pub fn core_directory(data_dir: &Path, core_id: usize) -> PathBuf {
    data_dir.join(format!("core-{core_id}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::durability::format::{
        batch_marker, read_record, Effect, ReadOutcome, RecordWriter, SegmentHeader,
        LOG_FORMAT_VERSION,
    };
    use crate::durability::log::segment_file_name;
    use crate::durability::test_support::{shard_config, TestDir};

    fn shard() -> Shard {
        Shard::new(shard_config(0), 0)
    }

    /// A segment file holding one put per revision in `revisions`.
    /// The bytes of segment `segment_id` holding one `Set` per `(revision, key, value,
    /// deadline_ms)`, in order.
    fn segment_bytes(
        segment_id: u64,
        revision_before: u64,
        records: impl IntoIterator<Item = (u64, String, Vec<u8>, Option<u64>)>,
    ) -> Vec<u8> {
        let mut bytes = SegmentHeader {
            format_version: LOG_FORMAT_VERSION,
            core_id: 0,
            segment_id,
            revision_before,
        }
        .to_bytes()
        .to_vec();
        // Each record is its own batch, behind its own marker, as the writer writes them.
        for (revision, key, value, deadline_ms) in records {
            let mut writer = RecordWriter::new();
            writer.begin(revision);
            writer.push(Effect::Set {
                key: key.as_bytes(),
                value: &value,
                deadline_ms,
                create_revision: revision,
                version: 1,
            });
            writer.finish();
            let record = writer.take();
            bytes.extend_from_slice(&batch_marker(record.len() as u64));
            bytes.extend_from_slice(&record);
        }
        bytes
    }

    /// A segment file holding one put per revision in `revisions`.
    fn write_segment(
        directory: &Path,
        segment_id: u64,
        revisions: std::ops::Range<u64>,
    ) -> Vec<u8> {
        let records = revisions
            .clone()
            .map(|revision| (revision, format!("key-{revision}"), b"value".to_vec(), None));
        let bytes = segment_bytes(segment_id, revisions.start - 1, records);
        fs::write(directory.join(segment_file_name(segment_id)), &bytes).unwrap();
        bytes
    }

    #[test]
    fn segments_replay_in_order_and_revisions_continue() {
        let directory = TestDir::new("order");
        write_segment(&directory.0, 1, 1..4);
        write_segment(&directory.0, 2, 4..6);
        let mut shard = shard();
        let recovered = recover(&directory.0, 0, &mut shard, 0, false).unwrap();
        assert_eq!(recovered.segment_count, 2);
        assert_eq!(recovered.record_count, 5);
        assert_eq!(recovered.next_segment_id, 3);
        assert!(recovered.repairs.is_empty());
        assert_eq!(shard.revision(), 5);
        assert_eq!(shard.key_count(), 5);
    }

    #[test]
    fn a_torn_tail_is_truncated_and_a_torn_header_removed() {
        let directory = TestDir::new("torn");
        let first = write_segment(&directory.0, 1, 1..4);
        let path = directory.0.join(segment_file_name(1));
        // The last record cut in its middle, as a crash during an append leaves it.
        fs::write(&path, &first[..first.len() - 5]).unwrap();
        // A second segment whose header never reached the disk whole.
        fs::write(directory.0.join(segment_file_name(2)), [0x54, 0x53]).unwrap();
        let mut shard = shard();
        let recovered = recover(&directory.0, 0, &mut shard, 0, false).unwrap();
        assert_eq!(recovered.record_count, 2);
        assert_eq!(shard.revision(), 2);
        // Nothing after the torn record holds a record, so the torn record is the tail and
        // is cut off; the segment whose header never reached the disk goes too.
        assert_eq!(recovered.repairs.len(), 2, "{:?}", recovered.repairs);
        assert!(!directory.0.join(segment_file_name(2)).exists());
    }

    #[test]
    fn damage_followed_by_valid_records_refuses_to_start_unless_repaired() {
        let directory = TestDir::new("damage");
        let bytes = write_segment(&directory.0, 1, 1..6);
        let path = directory.0.join(segment_file_name(1));
        let mut damaged = bytes.clone();
        // Flip a byte inside the second record's payload.
        let second_record = SEGMENT_HEADER_SIZE + (bytes.len() - SEGMENT_HEADER_SIZE) / 5 + 12;
        damaged[second_record] ^= 0xff;
        fs::write(&path, &damaged).unwrap();
        let error = recover(&directory.0, 0, &mut shard(), 0, false).unwrap_err();
        assert!(error.to_string().contains("--repair"), "{error}");
        let mut repaired = shard();
        let recovered = recover(&directory.0, 0, &mut repaired, 0, true).unwrap();
        assert_eq!(repaired.revision(), 1);
        assert_eq!(recovered.repairs.len(), 1, "{:?}", recovered.repairs);
        // The repair is durable: the next start finds a clean log.
        let mut again = shard();
        let recovered = recover(&directory.0, 0, &mut again, 0, false).unwrap();
        assert!(recovered.repairs.is_empty());
        assert_eq!(again.revision(), 1);
    }

    #[test]
    fn expired_keys_are_gone_after_recovery() {
        let directory = TestDir::new("expired");
        let records = [(1, Some(500)), (2, Some(5_000)), (3, None)]
            .into_iter()
            .map(|(revision, deadline_ms)| {
                (
                    revision,
                    format!("key-{revision}"),
                    b"v".to_vec(),
                    deadline_ms,
                )
            });
        let bytes = segment_bytes(1, 0, records);
        fs::write(directory.0.join(segment_file_name(1)), &bytes).unwrap();
        let mut shard = shard();
        recover(&directory.0, 0, &mut shard, 1_000, false).unwrap();
        assert_eq!(
            shard.key_count(),
            2,
            "the key that expired while down is gone"
        );
        assert_eq!(shard.timer_count(), 1);
        assert_eq!(shard.revision(), 3);
    }

    #[test]
    fn a_data_directory_for_another_core_count_is_refused() {
        let directory = TestDir::new("meta");
        prepare_data_dir(&directory.0, 2).unwrap();
        prepare_data_dir(&directory.0, 2).unwrap();
        let error = prepare_data_dir(&directory.0, 3).unwrap_err();
        assert!(error.to_string().contains("3 cores"), "{error}");
        assert!(core_directory(&directory.0, 1).is_dir());
    }

    /// The value of `key` in `shard`, read through the request path.
    fn value_of(shard: &mut Shard, key: &[u8]) -> Option<Vec<u8>> {
        use tessera_protocol::codec::{self, FrameBuffer};
        use tessera_protocol::{Request, Response};
        let mut body = FrameBuffer::new();
        codec::encode_request_body(&mut body, &Request::Get { key: key.to_vec() }).unwrap();
        let request = codec::access_request(&body).unwrap();
        match shard.apply(0, request) {
            Response::Value(entry) => entry.map(|entry| entry.value),
            other => panic!("get answered {other:?}"),
        }
    }

    const CORRUPTION_KEY_COUNT: u64 = 7;

    /// A segment of `record_count` records; record `r` sets key `r % 7` to a value naming `r`.
    fn corruption_segment(record_count: u64) -> Vec<u8> {
        let records = (1..=record_count).map(|revision| {
            (
                revision,
                format!("key-{}", revision % CORRUPTION_KEY_COUNT),
                corruption_value(revision),
                None,
            )
        });
        segment_bytes(1, 0, records)
    }

    fn corruption_value(revision: u64) -> Vec<u8> {
        format!("value-{revision}-{}", "x".repeat((revision % 50) as usize)).into_bytes()
    }

    /// After recovery the shard must be exactly the state of some prefix of the records: the
    /// revision says which, and every key must hold what that prefix left.
    fn assert_is_a_prefix(shard: &mut Shard, record_count: u64) {
        let revision = shard.revision();
        assert!(
            revision <= record_count,
            "revision {revision} of {record_count}"
        );
        for key_index in 0..CORRUPTION_KEY_COUNT {
            let key = format!("key-{key_index}");
            let expected = (1..=revision)
                .rev()
                .find(|candidate| candidate % CORRUPTION_KEY_COUNT == key_index)
                .map(corruption_value);
            assert_eq!(
                value_of(shard, key.as_bytes()),
                expected,
                "{key} at revision {revision}"
            );
        }
    }

    #[derive(Debug, Clone)]
    enum Corruption {
        Truncate(usize),
        FlipBit(usize),
        ZeroPage(usize),
    }

    fn corruption() -> impl proptest::strategy::Strategy<Value = Corruption> {
        use proptest::prelude::*;
        prop_oneof![
            any::<usize>().prop_map(Corruption::Truncate),
            any::<usize>().prop_map(Corruption::FlipBit),
            any::<usize>().prop_map(Corruption::ZeroPage),
        ]
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig {
            cases: 200,
            failure_persistence: None,
            ..proptest::prelude::ProptestConfig::default()
        })]

        /// Truncated, bit-flipped or zeroed segment files: recovery never panics, never
        /// returns corrupt data (what it keeps is a prefix of what was written), keeps every
        /// complete record before a plain truncation, and with `repair` always starts.
        #[test]
        fn damaged_files_recover_a_prefix_or_refuse(
            record_count in 1..300_u64,
            corruption in corruption(),
        ) {
            let directory = TestDir::new("corrupt");
            let original = corruption_segment(record_count);
            let mut damaged = original.clone();
            match corruption {
                Corruption::Truncate(at) => damaged.truncate(at % (original.len() + 1)),
                Corruption::FlipBit(at) => {
                    let bit = at % (original.len() * 8);
                    damaged[bit / 8] ^= 1 << (bit % 8);
                }
                Corruption::ZeroPage(at) => {
                    let page = (at % original.len().div_ceil(4096)) * 4096;
                    let end = (page + 4096).min(damaged.len());
                    damaged[page..end].fill(0);
                }
            }
            let path = directory.0.join(segment_file_name(1));
            fs::write(&path, &damaged).unwrap();
            let mut shard = shard();
            match recover(&directory.0, 0, &mut shard, 0, false) {
                Ok(_) => assert_is_a_prefix(&mut shard, record_count),
                Err(error) => {
                    proptest::prop_assert!(
                        !matches!(corruption, Corruption::Truncate(_)),
                        "a truncated log must recover: {}", error
                    );
                    fs::write(&path, &damaged).unwrap();
                    let mut repaired = self::shard();
                    let outcome = recover(&directory.0, 0, &mut repaired, 0, true);
                    proptest::prop_assert!(outcome.is_ok(), "repair must start: {:?}", outcome.err());
                    assert_is_a_prefix(&mut repaired, record_count);
                    // A repaired log starts cleanly next time, without --repair.
                    let mut again = self::shard();
                    let outcome = recover(&directory.0, 0, &mut again, 0, false);
                    proptest::prop_assert!(outcome.is_ok(), "after repair: {:?}", outcome.err());
                    proptest::prop_assert_eq!(again.revision(), repaired.revision());
                }
            }
            if let Corruption::Truncate(_) = corruption {
                // Every record wholly inside the kept bytes is kept.
                let mut complete = 0;
                let mut offset = SEGMENT_HEADER_SIZE;
                while let ReadOutcome::Record(record, size) = read_record(&original[offset..]) {
                    if offset + size > damaged.len() {
                        break;
                    }
                    if record.batch_length().is_none() {
                        complete += 1;
                    }
                    offset += size;
                }
                if damaged.len() >= SEGMENT_HEADER_SIZE {
                    proptest::prop_assert_eq!(shard.revision(), complete);
                }
            }
        }
    }
}
