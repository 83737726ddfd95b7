//! A core's write-ahead log: the records its shard journals, written to segment files with
//! group commit.
//!
//! The core appends what its shard journaled after every batch of requests ([`CoreLog::append`]).
//! A writer task takes everything appended since its last write, writes it with one call and
//! syncs it with one `fdatasync`; records appended while it writes go in the next batch. In
//! `sync` mode replies wait ([`CoreLog::durable_revision`], [`CoreLog::subscribe`]) until the
//! revision they reflect is on disk. In `async` mode the writer runs every
//! `flush_interval_ms` and nothing waits. A failed write or sync is never retried: the log
//! stops, nothing after it is acknowledged, and the server is told to exit so its supervisor
//! restarts it and recovery replays what reached the disk.
//!
//! Segment files are `wal-<segment id, 20 digits>.log` in the core's directory. Each is
//! preallocated to `segment_bytes_max` when it is created, so appends into it never need new
//! disk space. The next segment is created and preallocated while the current one is half
//! full; its header (with the revision before it) is written when the log switches to it.
//! When the next segment cannot be allocated because the disk is full, the log says how many
//! bytes are left in the current one ([`CoreLog::room`]), the core refuses writes that would
//! not fit with a typed `NoSpace` error (reads go on), and the writer tries the allocation
//! again every [`NO_SPACE_RETRY`] until space is freed.
//!
//! All file I/O goes through [`Storage`], so tests can record it and inject faults.

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::Duration;

use crate::durability::format::{
    batch_marker, RecordWriter, SegmentHeader, BATCH_MARKER_SIZE, LOG_FORMAT_VERSION,
    RECORD_HEADER_SIZE, SEGMENT_HEADER_SIZE,
};
use crate::durability::storage::{Storage, StorageFile};
use crate::durability::{io_error, Durability, DurabilityError};
use crate::runtime::{LocalNotify, LocalSignal};

/// The file name of segment `segment_id`.
pub fn segment_file_name(segment_id: u64) -> String {
    format!("wal-{segment_id:020}.log")
}

/// The segment id in a file name written by [`segment_file_name`].
pub fn parse_segment_file_name(name: &str) -> Option<u64> {
    name.strip_prefix("wal-")?
        .strip_suffix(".log")?
        .parse()
        .ok()
}

/// How often the writer tries again to allocate a segment after the disk was full.
pub const NO_SPACE_RETRY: Duration = Duration::from_millis(500);

/// Bytes of the current segment kept back when the disk is full (at most an eighth of a
/// segment), for what the core applies without asking (expiry of keys) and what was
/// admitted before the log knew.
pub const NO_SPACE_RESERVE_BYTES: u64 = 256 * 1024;

/// Counters of a core's log, for stats and the benchmark.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LogStats {
    /// Batches written.
    pub write_count: u64,
    /// `fdatasync` calls that completed.
    pub sync_count: u64,
    /// Records written.
    pub record_count: u64,
    /// Bytes written, headers included.
    pub byte_count: u64,
    /// Times a segment could not be allocated because the disk was full.
    pub no_space_count: u64,
}

/// What each written batch is counted in, for metrics.
#[derive(Debug, Default)]
struct BatchHistograms {
    flush_latency_us: crate::metrics::LatencyHistogram,
    records_per_sync: crate::metrics::Histogram<{ crate::metrics::SYNC_RECORD_BUCKET_COUNT }>,
    bytes_per_sync: crate::metrics::Histogram<{ crate::metrics::SYNC_BYTE_BUCKET_COUNT }>,
}

#[derive(Debug, Default)]
struct LogState {
    /// Records appended and not yet taken by the writer.
    pending: Vec<u8>,
    /// Records in `pending`.
    pending_record_count: u64,
    /// The revision of the last record appended.
    appended_revision: u64,
    /// The revision of the last record on disk.
    durable_revision: u64,
    /// Set once a write or sync failed; the log takes nothing more.
    failure: Option<String>,
    /// While the disk is full: bytes the current segment can still take.
    room: Option<u64>,
    stats: LogStats,
    /// Histograms of every batch written: its write and sync time, its records and bytes.
    batches: BatchHistograms,
    /// Woken whenever `durable_revision` advances.
    subscribers: Vec<LocalNotify>,
}

/// A core's log, shared by the core's tasks (never across threads).
#[derive(Debug)]
pub struct CoreLog {
    mode: Durability,
    state: RefCell<LogState>,
    /// Wakes the writer when records are appended.
    appended: LocalNotify,
}

impl CoreLog {
    /// A log in `mode` whose records up to `recovered_revision` are already on disk.
    pub fn new(mode: Durability, recovered_revision: u64) -> Self {
        assert!(mode != Durability::Memory, "memory mode keeps no log");
        Self {
            mode,
            state: RefCell::new(LogState {
                appended_revision: recovered_revision,
                durable_revision: recovered_revision,
                ..LogState::default()
            }),
            appended: LocalNotify::new(),
        }
    }

    /// Whether replies must wait for their revision to be on disk (`sync` mode).
    pub fn is_gating(&self) -> bool {
        self.mode == Durability::Sync
    }

    /// Takes the shard's journaled records; `revision` is the shard's revision after them.
    pub fn append(&self, journal: &mut RecordWriter, revision: u64) {
        if journal.is_empty() {
            return;
        }
        let record_count = journal.record_count();
        let mut state = self.state.borrow_mut();
        if state.failure.is_some() {
            // Nothing after a failure is written or acknowledged.
            let _ = journal.take();
            return;
        }
        journal.drain_into(&mut state.pending);
        state.pending_record_count += record_count;
        assert!(
            revision >= state.appended_revision,
            "appended revision {revision} after {}",
            state.appended_revision
        );
        state.appended_revision = revision;
        drop(state);
        if self.mode == Durability::Sync {
            self.appended.notify();
        }
    }

    /// Records appended and not yet taken by the writer.
    pub fn pending_record_count(&self) -> u64 {
        self.state.borrow().pending_record_count
    }

    /// The revision of the last record known to be on disk.
    pub fn durable_revision(&self) -> u64 {
        self.state.borrow().durable_revision
    }

    /// While the disk is full, the bytes of records the log can still take (records waiting
    /// to be written count against it); `None` while the disk has room.
    pub fn room(&self) -> Option<u64> {
        let state = self.state.borrow();
        state
            .room
            .map(|room| room.saturating_sub(state.pending.len() as u64))
    }

    fn set_room(&self, room: Option<u64>) {
        let mut state = self.state.borrow_mut();
        if room.is_some() && state.room.is_none() {
            state.stats.no_space_count += 1;
        }
        state.room = room;
    }

    /// Whether the log has failed (and why).
    pub fn failure(&self) -> Option<String> {
        self.state.borrow().failure.clone()
    }

    /// The log's counters.
    pub fn stats(&self) -> LogStats {
        self.state.borrow().stats
    }

    /// The log's counters and the histograms of its batches, for metrics.
    pub fn metrics(&self) -> crate::metrics::LogMetrics {
        let state = self.state.borrow();
        crate::metrics::LogMetrics {
            stats: state.stats,
            flush_latency_us: state.batches.flush_latency_us,
            records_per_sync: state.batches.records_per_sync,
            bytes_per_sync: state.batches.bytes_per_sync,
        }
    }

    /// Wakes `notify` every time the durable revision advances.
    pub fn subscribe(&self, notify: LocalNotify) {
        self.state.borrow_mut().subscribers.push(notify);
    }

    /// Completes once `revision` is on disk (never, if the log fails first).
    pub async fn wait_durable(&self, revision: u64) {
        if self.durable_revision() >= revision {
            return;
        }
        let notify = LocalNotify::new();
        self.subscribe(notify.clone());
        while self.durable_revision() < revision {
            notify.notified().await;
        }
        self.state
            .borrow_mut()
            .subscribers
            .retain(|subscriber| !subscriber.is_same(&notify));
    }

    fn take_batch(&self) -> Option<(Vec<u8>, u64, u64)> {
        let mut state = self.state.borrow_mut();
        if state.pending.is_empty() || state.failure.is_some() {
            return None;
        }
        let records = std::mem::take(&mut state.pending);
        let record_count = std::mem::take(&mut state.pending_record_count);
        Some((records, state.appended_revision, record_count))
    }

    /// Notes a batch of `record_count` records and `byte_count` bytes on disk up to
    /// `revision`, whose write and sync took `flush_latency_us`.
    fn mark_durable(
        &self,
        revision: u64,
        byte_count: u64,
        record_count: u64,
        flush_latency_us: u64,
    ) {
        let subscribers = {
            let mut state = self.state.borrow_mut();
            state.durable_revision = state.durable_revision.max(revision);
            state.stats.write_count += 1;
            state.stats.sync_count += 1;
            state.stats.byte_count += byte_count;
            state.stats.record_count += record_count;
            state.batches.flush_latency_us.record(flush_latency_us);
            state.batches.records_per_sync.record(record_count);
            state.batches.bytes_per_sync.record(byte_count);
            state.subscribers.clone()
        };
        for subscriber in subscribers {
            subscriber.notify();
        }
    }

    fn fail(&self, reason: String) {
        tracing::error!(%reason, "write-ahead log failed; no further write is acknowledged");
        let mut state = self.state.borrow_mut();
        state.failure.get_or_insert(reason);
        state.pending.clear();
    }
}

/// A segment file: created and preallocated, and (once started) being written.
#[derive(Debug)]
pub struct Segment<F> {
    directory: PathBuf,
    id: u64,
    file: F,
    /// Bytes written so far (the next write's offset); 0 until the header is written.
    size: u64,
    /// Bytes preallocated, or `None` where the filesystem cannot preallocate.
    capacity: Option<u64>,
}

impl<F: StorageFile> Segment<F> {
    /// Creates segment `segment_id` in `directory`, preallocates `capacity` bytes and syncs
    /// the directory. The segment holds nothing until [`Segment::start`].
    ///
    /// # Errors
    /// The file cannot be created or the directory synced, or there is no space for it (then
    /// the file is removed again; see [`DurabilityError::is_no_space`]).
    pub async fn allocate<S: Storage<File = F>>(
        storage: &S,
        directory: &Path,
        segment_id: u64,
        capacity: u64,
    ) -> Result<Self, DurabilityError> {
        let path = directory.join(segment_file_name(segment_id));
        let file = storage
            .create_appending(&path)
            .await
            .map_err(io_error("create", &path))?;
        let capacity = match file.allocate(capacity).await {
            Ok(()) => Some(capacity),
            Err(error) if error.kind() == std::io::ErrorKind::Unsupported => {
                tracing::warn!(
                    path = %path.display(),
                    "the filesystem cannot preallocate; a full disk will stop the server"
                );
                None
            }
            Err(error) => {
                let _ = file.close().await;
                let _ = storage.remove(&path).await;
                return Err(io_error("allocate", &path)(error));
            }
        };
        storage
            .sync_directory(directory)
            .await
            .map_err(io_error("sync directory", directory))?;
        Ok(Self {
            directory: directory.to_owned(),
            id: segment_id,
            file,
            size: 0,
            capacity,
        })
    }

    /// Writes the segment's header (not synced: the first batch's sync covers it).
    ///
    /// # Errors
    /// The write fails.
    pub async fn start(
        &mut self,
        core_id: u16,
        revision_before: u64,
    ) -> Result<(), DurabilityError> {
        let header = SegmentHeader {
            format_version: LOG_FORMAT_VERSION,
            core_id,
            segment_id: self.id,
            revision_before,
        };
        self.size = 0;
        self.write(header.to_bytes().to_vec()).await
    }

    /// The segment's id.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Bytes of records the segment can still take without growing, or `None` if it was
    /// not preallocated.
    fn remaining(&self) -> Option<u64> {
        self.capacity
            .map(|capacity| capacity.saturating_sub(self.size))
    }

    async fn write(&mut self, bytes: Vec<u8>) -> Result<(), DurabilityError> {
        let length = bytes.len() as u64;
        let written = self
            .file
            .write_at(bytes, self.size)
            .await
            .map_err(io_error("write", &self.path()))?;
        if written as u64 != length {
            return Err(DurabilityError::Io {
                operation: "write",
                path: self.path().display().to_string(),
                source: std::io::Error::other(format!("short write: {written} of {length} bytes")),
            });
        }
        self.size += length;
        Ok(())
    }

    /// Makes what was written durable.
    ///
    /// # Errors
    /// `fdatasync` fails.
    pub async fn sync(&self) -> Result<(), DurabilityError> {
        self.file
            .sync()
            .await
            .map_err(io_error("fdatasync", &self.path()))
    }

    fn path(&self) -> PathBuf {
        self.directory.join(segment_file_name(self.id))
    }
}

/// `records` after the batch marker that announces them.
fn with_marker(records: &[u8]) -> Vec<u8> {
    let mut batch = Vec::with_capacity(BATCH_MARKER_SIZE + records.len());
    batch.extend_from_slice(&batch_marker(records.len() as u64));
    batch.extend_from_slice(records);
    batch
}

/// The length of the longest prefix of `records` (whole records back to back) that is at
/// most `limit` bytes, and the revision of the last record in it (`None` if it is empty or
/// all of `records`, which the caller knows the revision of).
fn whole_records_within(records: &[u8], limit: u64) -> (usize, Option<u64>) {
    if records.len() as u64 <= limit {
        return (records.len(), None);
    }
    let mut offset = 0;
    let mut last_revision = None;
    while let Some(header) = records
        .get(offset..)
        .and_then(<[u8]>::first_chunk::<{ RECORD_HEADER_SIZE + 8 }>)
    {
        let size = RECORD_HEADER_SIZE
            + u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
        if (offset + size) as u64 > limit {
            break;
        }
        let mut revision = [0; 8];
        revision.copy_from_slice(&header[RECORD_HEADER_SIZE..]);
        last_revision = Some(u64::from_le_bytes(revision));
        offset += size;
    }
    (offset, last_revision)
}

/// What is told the writer at the end.
#[derive(Debug, Clone, Default)]
pub struct WriterControl {
    /// Fired when the core has stopped producing records: write what is left and return.
    pub finish: LocalSignal,
}

/// The outcome of allocating a segment.
type Allocated<F> = Result<Segment<F>, DurabilityError>;

/// The writer's segments: the one being written and, once it is half full, the next.
struct Segments<S: Storage> {
    storage: S,
    core_id: u16,
    current: Segment<S::File>,
    next: Option<Segment<S::File>>,
    /// The next segment being allocated (and zeroed) by a task of its own, so the writer
    /// goes on writing meanwhile; its outcome is in `prepared` once it has finished.
    preparing: Option<glommio::Task<()>>,
    prepared: Rc<RefCell<Option<Allocated<S::File>>>>,
    /// Woken when the preparation finishes (the writer's own wake-up).
    wake: LocalNotify,
    segment_bytes_max: u64,
    /// While the disk is full: when to try allocating the next segment again.
    retry_at: Option<std::time::Instant>,
}

impl<S: Storage> Segments<S> {
    /// Writes a batch of whole records and syncs it, switching to the next segment where the
    /// current one is full (each segment's part is synced before the next is started).
    /// `revision_before` is the revision of the last record written before `records`.
    async fn write_batch(
        &mut self,
        mut records: Vec<u8>,
        mut revision_before: u64,
    ) -> Result<(), DurabilityError> {
        loop {
            let limit = self
                .current
                .capacity
                .unwrap_or(self.segment_bytes_max)
                .saturating_sub(self.current.size + BATCH_MARKER_SIZE as u64);
            let (fits, last_revision) = whole_records_within(&records, limit);
            let holds_records = self.current.size > SEGMENT_HEADER_SIZE as u64;
            if fits == records.len() || !holds_records {
                // All of it fits, or the segment is empty and takes even a record larger than
                // a segment (the file grows).
                self.current.write(with_marker(&records)).await?;
                return self.current.sync().await;
            }
            let rest = records.split_off(fits);
            if !records.is_empty() {
                self.current.write(with_marker(&records)).await?;
            }
            self.current.sync().await?;
            // The next segment's header names the last record before it exactly: pruning
            // removes a segment by the next one's header.
            if let Some(last_revision) = last_revision {
                revision_before = last_revision;
            }
            self.switch(revision_before).await?;
            records = rest;
        }
    }

    /// Continues in the next segment (allocating it now if it is not ready).
    async fn switch(&mut self, revision_before: u64) -> Result<(), DurabilityError> {
        if self.next.is_none() {
            if let Some(preparing) = self.preparing.take() {
                // The writer caught up with the preparation: wait for it.
                preparing.await;
                self.next = self.prepared.borrow_mut().take().transpose()?;
            }
        }
        let next = match self.next.take() {
            Some(next) => next,
            None => {
                Segment::allocate(
                    &self.storage,
                    &self.current.directory,
                    self.current.id + 1,
                    self.segment_bytes_max,
                )
                .await?
            }
        };
        let previous = std::mem::replace(&mut self.current, next);
        let _ = previous.file.close().await;
        self.current.start(self.core_id, revision_before).await
    }

    /// Starts allocating the next segment in a task of its own.
    fn start_preparing(&mut self) {
        let storage = self.storage.clone();
        let directory = self.current.directory.clone();
        let segment_id = self.current.id + 1;
        let capacity = self.segment_bytes_max;
        let prepared = self.prepared.clone();
        let wake = self.wake.clone();
        self.preparing = Some(glommio::spawn_local(async move {
            let outcome = Segment::allocate(&storage, &directory, segment_id, capacity).await;
            *prepared.borrow_mut() = Some(outcome);
            wake.notify();
        }));
    }

    fn reserve(&self) -> u64 {
        (self.segment_bytes_max / 8).min(NO_SPACE_RESERVE_BYTES)
    }

    /// Starts allocating the next segment once the current one is half full, and takes the
    /// outcome when it is ready. Returns the room left while the disk is full (`None` when
    /// it is not).
    ///
    /// # Errors
    /// Allocation failed for another reason than space.
    fn prepare_next(&mut self) -> Result<Option<u64>, DurabilityError> {
        if self.next.is_some() {
            return Ok(None);
        }
        let Some(remaining) = self.current.remaining() else {
            return Ok(None);
        };
        if remaining > self.segment_bytes_max / 2 {
            return Ok(None);
        }
        let now = std::time::Instant::now();
        if self.preparing.is_some() {
            let Some(outcome) = self.prepared.borrow_mut().take() else {
                // Still allocating.
                return Ok(self
                    .retry_at
                    .map(|_| remaining.saturating_sub(self.reserve())));
            };
            self.preparing = None;
            match outcome {
                Ok(next) => {
                    if self.retry_at.take().is_some() {
                        tracing::info!("disk space is available again; writes are accepted");
                    }
                    self.next = Some(next);
                    return Ok(None);
                }
                Err(error) if error.is_no_space() => {
                    if self.retry_at.is_none() {
                        tracing::warn!(%error, remaining, "the disk is full: writes are refused until space is freed");
                    }
                    self.retry_at = Some(now + NO_SPACE_RETRY);
                    return Ok(Some(remaining.saturating_sub(self.reserve())));
                }
                Err(error) => return Err(error),
            }
        }
        if self.retry_at.is_some_and(|retry_at| now < retry_at) {
            return Ok(Some(remaining.saturating_sub(self.reserve())));
        }
        self.start_preparing();
        Ok(self
            .retry_at
            .map(|_| remaining.saturating_sub(self.reserve())))
    }
}

/// Waits until the writers just answered (`answered` records' worth) are back, on top of
/// what is already waiting, or `wait_max` passed. Under load this merges the batch that
/// arrived during the sync with the one the sync's replies will bring, so each sync covers
/// twice the writes (measured: about 1.5x the synced writes per second and lower latency at
/// 50 clients, `docs/benchmarks.md`). A lone writer (a batch of one) never waits.
async fn wait_for_writers(
    log: &CoreLog,
    answered: u64,
    wait_max: Duration,
    control: &WriterControl,
) {
    if wait_max.is_zero() {
        return;
    }
    let target = log.pending_record_count() + answered;
    let deadline = std::time::Instant::now() + wait_max;
    while log.pending_record_count() < target && log.failure().is_none() {
        let now = std::time::Instant::now();
        if now >= deadline || control.finish.is_fired() {
            return;
        }
        futures_lite::future::or(
            futures_lite::future::or(
                log.appended.notified(),
                glommio::timer::sleep(deadline - now),
            ),
            control.finish.wait(),
        )
        .await;
    }
}

/// How the writer writes.
#[derive(Debug, Clone, Copy)]
pub struct WriterSettings {
    /// Size of a segment (preallocated).
    pub segment_bytes_max: u64,
    /// `async` mode: how often the log is written and synced.
    pub flush_interval: Duration,
    /// `sync` mode: after a sync of several writes, how long at most the writer waits for
    /// the writers it just answered to send their next write, so both halves of the traffic
    /// go in one batch instead of alternating between two (`ZERO` waits not at all).
    pub group_commit_wait: Duration,
}

/// Writes the log's batches until `control.finish` fires and everything appended is written.
/// `segment` has been started. Returns the failure, if the log failed (the caller makes the
/// process exit non-zero).
pub async fn run_writer<S: Storage>(
    log: Rc<CoreLog>,
    storage: S,
    core_id: u16,
    segment: Segment<S::File>,
    settings: WriterSettings,
    control: WriterControl,
) -> Option<String> {
    let WriterSettings {
        segment_bytes_max,
        flush_interval,
        group_commit_wait,
    } = settings;
    let mut segments = Segments {
        storage,
        core_id,
        current: segment,
        next: None,
        preparing: None,
        prepared: Rc::new(RefCell::new(None)),
        wake: log.appended.clone(),
        segment_bytes_max,
        retry_at: None,
    };
    let mut durable_revision = log.durable_revision();
    loop {
        match segments.prepare_next() {
            Ok(room) => log.set_room(room),
            Err(error) => {
                log.fail(error.to_string());
                return log.failure();
            }
        }
        let is_finishing = control.finish.is_fired();
        if let Some((records, revision, record_count)) = log.take_batch() {
            let byte_count = records.len() as u64;
            let started = std::time::Instant::now();
            if let Err(error) = segments.write_batch(records, durable_revision).await {
                log.fail(error.to_string());
                return log.failure();
            }
            let flush_latency_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
            durable_revision = revision;
            log.mark_durable(revision, byte_count, record_count, flush_latency_us);
            if log.mode == Durability::Sync && record_count > 1 && !is_finishing {
                wait_for_writers(&log, record_count, group_commit_wait, &control).await;
            }
            if log.mode == Durability::Async && !is_finishing {
                // One write and sync per interval, however busy the core is.
                let _ = control
                    .finish
                    .unless_fired(glommio::timer::sleep(flush_interval))
                    .await;
            }
            continue;
        }
        if is_finishing {
            return log.failure();
        }
        let wait = match (log.mode, segments.retry_at) {
            (_, Some(_)) => NO_SPACE_RETRY.min(flush_interval),
            (Durability::Sync, None) => Duration::MAX,
            _ => flush_interval,
        };
        let sleep = async {
            if wait == Duration::MAX {
                std::future::pending::<()>().await;
            } else {
                glommio::timer::sleep(wait).await;
            }
        };
        match log.mode {
            Durability::Sync => {
                futures_lite::future::or(
                    futures_lite::future::or(log.appended.notified(), sleep),
                    control.finish.wait(),
                )
                .await;
            }
            _ => {
                futures_lite::future::or(sleep, control.finish.wait()).await;
            }
        }
    }
}
