//! Crash states the page cache hides, a failed sync, and a full disk, through a storage that
//! records every operation.
//!
//! [`RecordingStorage`] does each file operation on a real directory and records it, with the
//! sync barriers, and the test records where each revision was acknowledged. A *crash image*
//! at a point of that history is what the disk may hold if the power went out there: for each
//! file, everything written before its last sync, then an in-order run of the writes since,
//! the last of them torn (a byte prefix, or some of its 4 KiB pages and not others); for the
//! directory, the names as of its last sync plus an in-order run of the renames, creations and
//! removals since. Recovery runs on each image without `--repair` and must start, keep every
//! acknowledged revision, and hold exactly the state of one prefix of the revisions written
//! (no garbage, no hole).

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::Duration;

use tessera_protocol::codec::{self, FrameBuffer};
use tessera_protocol::message::Put;
use tessera_protocol::{Delete, Request, Response};

use crate::durability::log::{run_writer, CoreLog, Segment, WriterControl, WriterSettings};
use crate::durability::recovery::recover;
use crate::durability::snapshot::write_snapshot;
use crate::durability::storage::{Storage, StorageFile};
use crate::durability::test_support::{shard_config, TestDir};
use crate::durability::Durability;
use crate::shard::Shard;

const PAGE: usize = 4096;

#[derive(Debug, Clone)]
enum Op {
    Create {
        path: PathBuf,
        file: usize,
    },
    Allocate {
        file: usize,
        size: u64,
    },
    Write {
        file: usize,
        offset: u64,
        bytes: Vec<u8>,
    },
    Sync {
        file: usize,
    },
    SyncDirectory,
    Rename {
        from: PathBuf,
        to: PathBuf,
    },
    Remove {
        path: PathBuf,
    },
    /// The test saw this revision durable here: from this point on it was acknowledged.
    Acknowledged {
        revision: u64,
    },
}

#[derive(Debug, Default)]
struct Recording {
    ops: Vec<Op>,
    paths: Vec<PathBuf>,
    /// Syncs after which every sync fails.
    syncs_before_failure: Option<usize>,
    /// Allocations fail with ENOSPC while set.
    is_full: bool,
}

#[derive(Debug, Clone, Default)]
struct RecordingStorage(Rc<RefCell<Recording>>);

#[derive(Debug)]
struct RecordingFile {
    storage: RecordingStorage,
    id: usize,
}

impl RecordingStorage {
    fn record(&self, op: Op) {
        self.0.borrow_mut().ops.push(op);
    }

    fn open(&self, path: &Path) -> io::Result<RecordingFile> {
        fs::File::create(path)?;
        let id = {
            let mut recording = self.0.borrow_mut();
            recording.paths.push(path.to_owned());
            recording.paths.len() - 1
        };
        self.record(Op::Create {
            path: path.to_owned(),
            file: id,
        });
        Ok(RecordingFile {
            storage: self.clone(),
            id,
        })
    }

    fn ops(&self) -> Vec<Op> {
        self.0.borrow().ops.clone()
    }

    fn path_of(&self, file: usize) -> PathBuf {
        self.0.borrow().paths[file].clone()
    }
}

impl RecordingFile {
    /// A sync barrier, or the injected failure.
    fn record_sync(&self) -> io::Result<()> {
        let mut recording = self.storage.0.borrow_mut();
        if let Some(remaining) = &mut recording.syncs_before_failure {
            if *remaining == 0 {
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
            *remaining -= 1;
        }
        recording.ops.push(Op::Sync { file: self.id });
        Ok(())
    }
}

impl StorageFile for RecordingFile {
    async fn write_at(&self, bytes: Vec<u8>, offset: u64) -> io::Result<usize> {
        use std::os::unix::fs::FileExt as _;
        let path = self.storage.path_of(self.id);
        fs::OpenOptions::new()
            .write(true)
            .open(&path)?
            .write_all_at(&bytes, offset)?;
        let length = bytes.len();
        self.storage.record(Op::Write {
            file: self.id,
            offset,
            bytes,
        });
        Ok(length)
    }

    async fn sync(&self) -> io::Result<()> {
        self.record_sync()
    }

    async fn allocate(&self, size: u64) -> io::Result<()> {
        if self.storage.0.borrow().is_full {
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        let file = fs::OpenOptions::new()
            .write(true)
            .open(self.storage.path_of(self.id))?;
        if file.metadata()?.len() < size {
            file.set_len(size)?;
        }
        self.storage.record(Op::Allocate {
            file: self.id,
            size,
        });
        Ok(())
    }

    async fn close(self) -> io::Result<()> {
        Ok(())
    }
}

impl Storage for RecordingStorage {
    type File = RecordingFile;

    async fn create(&self, path: &Path) -> io::Result<RecordingFile> {
        self.open(path)
    }

    async fn sync_directory(&self, _directory: &Path) -> io::Result<()> {
        self.record(Op::SyncDirectory);
        Ok(())
    }

    async fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        fs::rename(from, to)?;
        {
            let mut recording = self.0.borrow_mut();
            for path in &mut recording.paths {
                if path == from {
                    to.clone_into(path);
                }
            }
        }
        self.record(Op::Rename {
            from: from.to_owned(),
            to: to.to_owned(),
        });
        Ok(())
    }

    async fn remove(&self, path: &Path) -> io::Result<()> {
        fs::remove_file(path)?;
        self.record(Op::Remove {
            path: path.to_owned(),
        });
        Ok(())
    }
}

/// A small deterministic generator (xorshift64*), so a failing image can be replayed.
struct Random(u64);

impl Random {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, bound: usize) -> usize {
        usize::try_from(self.next() % bound.max(1) as u64).unwrap()
    }
}

fn apply(shard: &mut Shard, request: &Request) -> Response {
    let mut body = FrameBuffer::new();
    codec::encode_request_body(&mut body, request).unwrap();
    shard.apply(1, codec::access_request(&body).unwrap())
}

const KEY_COUNT: u64 = 13;

/// The key revision `revision` writes, and its value (`None`: the revision deletes the key).
fn change_of(revision: u64) -> (Vec<u8>, Option<Vec<u8>>) {
    let key = format!("key-{}", revision % KEY_COUNT).into_bytes();
    if revision % 7 == 3 {
        return (key, None);
    }
    let filler = usize::try_from(revision * 37 % 700).unwrap();
    (
        key,
        Some(format!("value-{revision}-{}", "x".repeat(filler)).into_bytes()),
    )
}

/// Every key's value after revisions `1..=revision`, by the model. Deletes of absent keys
/// write no revision, so the model replays the same rule the workload follows.
fn model_state(revisions: &[Change], revision: u64) -> BTreeMap<Vec<u8>, Vec<u8>> {
    let mut state = BTreeMap::new();
    for (at, key, value) in revisions {
        if *at > revision {
            break;
        }
        match value {
            Some(value) => state.insert(key.clone(), value.clone()),
            None => state.remove(key),
        };
    }
    state
}

fn shard_state(shard: &mut Shard) -> BTreeMap<Vec<u8>, Vec<u8>> {
    let mut state = BTreeMap::new();
    for index in 0..KEY_COUNT {
        let key = format!("key-{index}").into_bytes();
        if let Response::Value(Some(entry)) = apply(shard, &Request::Get { key: key.clone() }) {
            state.insert(key, entry.value);
        }
    }
    state
}

/// A revision the workload wrote: its number, key and value (`None`: a delete).
type Change = (u64, Vec<u8>, Option<Vec<u8>>);

/// Applies the workload's `step`th change; returns it if it took a revision (a delete of an
/// absent key does not).
fn apply_change(shard: &mut Shard, step: u64) -> Option<Change> {
    let revision = shard.revision() + 1;
    let (key, value) = change_of(step);
    let response = match &value {
        Some(value) => apply(
            shard,
            &Request::Put(Box::new(Put::new(key.clone(), value.clone()))),
        ),
        None => apply(shard, &Request::Delete(Box::new(Delete::new(key.clone())))),
    };
    if shard.revision() == revision {
        Some((revision, key, value))
    } else {
        assert!(matches!(response, Response::Delete { deleted: false, .. }));
        None
    }
}

/// What the workload wrote: the ops recorded, and every revision with its change.
struct History {
    ops: Vec<Op>,
    revisions: Vec<Change>,
}

/// A sync-mode log at revision 0 whose writer runs on `storage` in `directory`, with
/// segments of `segment_bytes`; fire the control's `finish` and await the task to stop it.
async fn start_log(
    storage: &RecordingStorage,
    directory: &Path,
    segment_bytes: u64,
) -> (Rc<CoreLog>, WriterControl, glommio::Task<Option<String>>) {
    let log = Rc::new(CoreLog::new(Durability::Sync, 0));
    let mut segment = Segment::allocate(storage, directory, 1, segment_bytes)
        .await
        .unwrap();
    segment.start(0, 0).await.unwrap();
    segment.sync().await.unwrap();
    let control = WriterControl::default();
    let writer = glommio::spawn_local(run_writer(
        log.clone(),
        storage.clone(),
        0,
        segment,
        WriterSettings {
            segment_bytes_max: segment_bytes,
            flush_interval: Duration::from_millis(5),
            // Some batches merge with the next, some do not: both kinds of history.
            group_commit_wait: Duration::from_micros(200),
        },
        control.clone(),
    ));
    (log, control, writer)
}

/// Runs the log writer (and, if `snapshot_every` is set, snapshots) on recorded storage
/// while `round_count` rounds of writes are applied and, some rounds, waited for.
fn run_workload(
    directory: &Path,
    seed: u64,
    round_count: usize,
    snapshot_every: Option<usize>,
) -> History {
    let storage = RecordingStorage::default();
    let executor = glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
        .make()
        .unwrap();
    let recorded = storage.clone();
    let directory = directory.to_owned();
    let revisions = executor.run(async move {
        let mut random = Random(seed | 1);
        let shard = Rc::new(RefCell::new(Shard::with_journal(shard_config(0), 1)));
        let (log, control, writer) = start_log(&storage, &directory, 16 * 1024).await;
        let mut revisions = Vec::new();
        let mut snapshot = None;
        let mut step = 0;
        for round in 0..round_count {
            for _ in 0..=random.below(4) {
                step += 1;
                revisions.extend(apply_change(&mut shard.borrow_mut(), step));
            }
            {
                let mut shard = shard.borrow_mut();
                let revision = shard.revision();
                log.append(shard.journal_mut().unwrap(), revision);
            }
            if random.below(3) != 0 {
                let revision = shard.borrow().revision();
                log.wait_durable(revision).await;
                storage.record(Op::Acknowledged { revision });
            }
            if let Some(every) = snapshot_every {
                if round % every == every - 1
                    && snapshot
                        .as_ref()
                        .is_none_or(|(_, done): &(_, Rc<std::cell::Cell<bool>>)| done.get())
                {
                    if let Some((task, _)) = snapshot.take() {
                        task.await;
                    }
                    let (storage, directory, shard, log) = (
                        storage.clone(),
                        directory.clone(),
                        shard.clone(),
                        log.clone(),
                    );
                    let done = Rc::new(std::cell::Cell::new(false));
                    let finished = done.clone();
                    let task = glommio::spawn_local(async move {
                        write_snapshot(&storage, &directory, 0, &shard, &log)
                            .await
                            .unwrap();
                        finished.set(true);
                    });
                    snapshot = Some((task, done));
                }
            }
            // A snapshot copies one partition per turn: let it make progress.
            let turns = if snapshot.is_some() { 8 } else { 1 };
            for _ in 0..turns {
                futures_lite::future::yield_now().await;
            }
        }
        if let Some((task, _)) = snapshot {
            task.await;
        }
        control.finish.fire();
        assert_eq!(writer.await, None, "the writer failed");
        let revision = shard.borrow().revision();
        storage.record(Op::Acknowledged { revision });
        revisions
    });
    History {
        ops: recorded.ops(),
        revisions,
    }
}

/// Applies `bytes` at `offset` to `content`, growing it with zeros as needed.
fn write_into(content: &mut Vec<u8>, offset: u64, bytes: &[u8]) {
    let offset = usize::try_from(offset).unwrap();
    if content.len() < offset + bytes.len() {
        content.resize(offset + bytes.len(), 0);
    }
    content[offset..offset + bytes.len()].copy_from_slice(bytes);
}

/// Applies one file operation fully.
fn apply_op(content: &mut Vec<u8>, op: &Op) {
    match op {
        Op::Write { offset, bytes, .. } => write_into(content, *offset, bytes),
        Op::Allocate { size, .. } => {
            let size = usize::try_from(*size).unwrap();
            if content.len() < size {
                content.resize(size, 0);
            }
        }
        _ => {}
    }
}

/// Applies a write the crash tore: a byte prefix of it, or some of its pages.
fn apply_torn(content: &mut Vec<u8>, op: &Op, random: &mut Random) {
    let Op::Write { offset, bytes, .. } = op else {
        if random.below(2) == 0 {
            apply_op(content, op);
        }
        return;
    };
    if random.below(2) == 0 {
        let kept = random.below(bytes.len() + 1);
        write_into(content, *offset, &bytes[..kept]);
        return;
    }
    // Pages of the file persist independently; the ones that did not keep what was there.
    let start = usize::try_from(*offset).unwrap();
    let end = start + bytes.len();
    let mut page_start = start;
    while page_start < end {
        let page_end = ((page_start / PAGE + 1) * PAGE).min(end);
        if random.below(2) == 0 {
            write_into(
                content,
                page_start as u64,
                &bytes[page_start - start..page_end - start],
            );
        }
        page_start = page_end;
    }
}

/// Builds in `image` what the disk may hold after a crash once `ops` had been issued.
fn build_crash_image(ops: &[Op], directory: &Path, image: &Path, random: &mut Random) {
    // Files by id: content as of their last sync, and the writes since.
    let mut durable: HashMap<usize, Vec<u8>> = HashMap::new();
    let mut unsynced: HashMap<usize, Vec<Op>> = HashMap::new();
    // Names as of the directory's last sync, and the name changes since.
    let mut names: HashMap<PathBuf, usize> = HashMap::new();
    let mut live_names: HashMap<PathBuf, usize> = HashMap::new();
    let mut name_changes: Vec<Op> = Vec::new();
    for op in ops {
        match op {
            Op::Create { path, file } => {
                durable.insert(*file, Vec::new());
                live_names.insert(path.clone(), *file);
                name_changes.push(op.clone());
            }
            Op::Write { file, .. } | Op::Allocate { file, .. } => {
                unsynced.entry(*file).or_default().push(op.clone());
            }
            Op::Sync { file } => {
                let content = durable.entry(*file).or_default();
                for pending in unsynced.remove(file).unwrap_or_default() {
                    apply_op(content, &pending);
                }
            }
            Op::Rename { from, to } => {
                if let Some(file) = live_names.remove(from) {
                    live_names.insert(to.clone(), file);
                }
                name_changes.push(op.clone());
            }
            Op::Remove { path } => {
                live_names.remove(path);
                name_changes.push(op.clone());
            }
            Op::SyncDirectory => {
                names.clone_from(&live_names);
                name_changes.clear();
            }
            Op::Acknowledged { .. } => {}
        }
    }
    // The directory: an in-order run of the changes since its last sync made it.
    let applied = random.below(name_changes.len() + 1);
    for change in &name_changes[..applied] {
        match change {
            Op::Create { path, file } => {
                names.insert(path.clone(), *file);
            }
            Op::Rename { from, to } => {
                if let Some(file) = names.remove(from) {
                    names.insert(to.clone(), file);
                }
            }
            Op::Remove { path } => {
                names.remove(path);
            }
            _ => {}
        }
    }
    // Each file: an in-order run of its unsynced writes, the last one torn.
    for (path, file) in &names {
        let mut content = durable.get(file).cloned().unwrap_or_default();
        let pending = unsynced.get(file).map_or(&[][..], Vec::as_slice);
        let whole = random.below(pending.len() + 1);
        for op in &pending[..whole] {
            apply_op(&mut content, op);
        }
        if let Some(op) = pending.get(whole) {
            apply_torn(&mut content, op, random);
        }
        let relative = path.strip_prefix(directory).unwrap();
        fs::write(image.join(relative), content).unwrap();
    }
}

/// Builds `images_per_cut` crash images at every point of `history` and recovers each.
fn check_crash_images(
    history: &History,
    directory: &Path,
    seed: u64,
    images_per_cut: usize,
) -> usize {
    let mut random = Random(seed.wrapping_mul(31) | 1);
    let mut checked = 0;
    let mut acknowledged = 0;
    let written = history
        .revisions
        .last()
        .map_or(0, |(revision, ..)| *revision);
    for cut in 0..=history.ops.len() {
        if let Some(Op::Acknowledged { revision }) =
            cut.checked_sub(1).and_then(|last| history.ops.get(last))
        {
            acknowledged = *revision;
        }
        for variant in 0..images_per_cut {
            let image = TestDir::in_memory("image");
            build_crash_image(&history.ops[..cut], directory, &image.0, &mut random);
            let mut shard = Shard::with_journal(shard_config(0), 1);
            let recovered = recover(&image.0, 0, &mut shard, 1, false).unwrap_or_else(|error| {
                panic!("seed {seed}, cut {cut}, image {variant}: recovery refused: {error}")
            });
            let revision = shard.revision();
            assert!(
                revision >= acknowledged && revision <= written,
                "seed {seed}, cut {cut}, image {variant}: revision {revision}, acknowledged \
                 {acknowledged}, written {written}; {recovered:?}"
            );
            assert_eq!(
                shard_state(&mut shard),
                model_state(&history.revisions, revision),
                "seed {seed}, cut {cut}, image {variant}: the state is not the prefix up to \
                 revision {revision}; {recovered:?}"
            );
            shard.check_invariants();
            checked += 1;
        }
    }
    checked
}

#[test]
fn every_crash_image_of_the_log_recovers_a_prefix_with_every_acknowledged_write() {
    for seed in [1, 2, 3] {
        let directory = TestDir::new("log");
        let history = run_workload(&directory.0, seed, 150, None);
        let switches = history
            .ops
            .iter()
            .filter(|op| matches!(op, Op::Create { .. }))
            .count();
        assert!(
            switches >= 3,
            "the workload must switch segments: {switches} files"
        );
        let checked = check_crash_images(&history, &directory.0, seed, 2);
        eprintln!(
            "seed {seed}: {checked} crash images of {} operations recovered",
            history.ops.len()
        );
        assert!(checked > 500, "{checked} images");
    }
}

#[test]
fn every_crash_image_during_snapshots_and_log_truncation_recovers() {
    for seed in [4, 5] {
        let directory = TestDir::new("snapshots");
        let history = run_workload(&directory.0, seed, 200, Some(25));
        let renames = history
            .ops
            .iter()
            .filter(|op| matches!(op, Op::Rename { .. }))
            .count();
        let removals = history
            .ops
            .iter()
            .filter(|op| matches!(op, Op::Remove { .. }))
            .count();
        assert!(renames >= 3, "{renames} snapshots committed");
        assert!(removals >= 1, "nothing was truncated behind a snapshot");
        let checked = check_crash_images(&history, &directory.0, seed, 2);
        eprintln!(
            "seed {seed}: {checked} crash images of {} operations ({renames} snapshots, \
             {removals} files removed behind them) recovered",
            history.ops.len()
        );
    }
}

/// A failed `fdatasync` is never retried and never acknowledged: the log stops, nothing after
/// the failure becomes durable, the writer reports it, and what was durable recovers.
#[test]
fn a_failed_sync_is_never_acknowledged() {
    let directory = TestDir::new("sync-failure");
    let storage = RecordingStorage::default();
    let executor = glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
        .make()
        .unwrap();
    let path = directory.0.clone();
    let durable_before_failure = executor.run(async move {
        let mut shard = Shard::with_journal(shard_config(0), 1);
        let (log, control, writer) = start_log(&storage, &path, 1 << 20).await;
        storage.0.borrow_mut().syncs_before_failure = Some(3);
        let mut durable = 0;
        for round in 1..=10_u64 {
            apply(
                &mut shard,
                &Request::Put(Box::new(Put::new(format!("key-{round}"), "value"))),
            );
            let revision = shard.revision();
            log.append(shard.journal_mut().unwrap(), revision);
            let waited = futures_lite::future::or(
                async {
                    log.wait_durable(revision).await;
                    true
                },
                async {
                    glommio::timer::sleep(Duration::from_millis(100)).await;
                    false
                },
            )
            .await;
            if waited {
                durable = revision;
            } else {
                assert!(
                    log.failure().is_some(),
                    "round {round} timed out without a failure"
                );
            }
        }
        let failure = writer.await;
        assert!(
            failure
                .as_deref()
                .is_some_and(|reason| reason.contains("os error 5")),
            "{failure:?}"
        );
        assert_eq!(log.durable_revision(), durable);
        control.finish.fire();
        durable
    });
    assert_eq!(
        durable_before_failure, 3,
        "three syncs succeeded, one per write"
    );
    let mut shard = Shard::with_journal(shard_config(0), 1);
    recover(&directory.0, 0, &mut shard, 1, false).unwrap();
    assert!(shard.revision() >= durable_before_failure);
}

/// With the disk full the next segment cannot be allocated: the log reports the room left
/// (which shrinks as records are appended), and once space is freed it allocates again and
/// the room limit goes away. Every durable write recovers.
#[test]
fn a_full_disk_limits_the_room_until_space_is_freed() {
    let directory = TestDir::new("full");
    let storage = RecordingStorage::default();
    let executor = glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
        .make()
        .unwrap();
    let path = directory.0.clone();
    let segment_bytes: u64 = 512 * 1024;
    let revision = executor.run(async move {
        let mut shard = Shard::with_journal(shard_config(0), 1);
        let (log, control, writer) = start_log(&storage, &path, segment_bytes).await;
        storage.0.borrow_mut().is_full = true;
        let value = vec![b'v'; 1000];
        let mut room_seen = Vec::new();
        for round in 0..400_u64 {
            apply(
                &mut shard,
                &Request::Put(Box::new(Put::new(format!("key-{round}"), value.clone()))),
            );
            let revision = shard.revision();
            log.append(shard.journal_mut().unwrap(), revision);
            log.wait_durable(revision).await;
            // Let the writer look at the next segment after its write.
            glommio::timer::sleep(Duration::from_millis(1)).await;
            if let Some(room) = log.room() {
                room_seen.push(room);
                if room < 100_000 {
                    break;
                }
            }
        }
        assert!(
            room_seen.len() > 10,
            "the room was never limited: {room_seen:?}"
        );
        assert!(
            room_seen.windows(2).all(|pair| pair[1] <= pair[0]),
            "{room_seen:?}"
        );
        assert!(room_seen[0] <= segment_bytes / 2);
        storage.0.borrow_mut().is_full = false;
        glommio::timer::sleep(crate::durability::log::NO_SPACE_RETRY * 3).await;
        assert_eq!(log.room(), None, "space was freed but writes stay limited");
        assert_eq!(log.stats().no_space_count, 1);
        control.finish.fire();
        assert_eq!(writer.await, None);
        shard.revision()
    });
    let mut shard = Shard::with_journal(shard_config(0), 1);
    recover(&directory.0, 0, &mut shard, 1, false).unwrap();
    assert_eq!(shard.revision(), revision);
}
