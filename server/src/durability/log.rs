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
//! Segment files are `wal-<segment id, 20 digits>.log` in the core's directory; a new one is
//! started (header written and synced, directory synced) once the current one passes
//! `segment_bytes_max`.

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::Duration;

use glommio::io::BufferedFile;

use crate::durability::format::{RecordWriter, SegmentHeader, LOG_FORMAT_VERSION};
use crate::durability::{Durability, DurabilityError};
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
    stats: LogStats,
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

    /// The revision of the last record known to be on disk.
    pub fn durable_revision(&self) -> u64 {
        self.state.borrow().durable_revision
    }

    /// Whether the log has failed (and why).
    pub fn failure(&self) -> Option<String> {
        self.state.borrow().failure.clone()
    }

    /// The log's counters.
    pub fn stats(&self) -> LogStats {
        self.state.borrow().stats
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

    fn mark_durable(&self, revision: u64, byte_count: u64, record_count: u64) {
        let subscribers = {
            let mut state = self.state.borrow_mut();
            state.durable_revision = state.durable_revision.max(revision);
            state.stats.write_count += 1;
            state.stats.sync_count += 1;
            state.stats.byte_count += byte_count;
            state.stats.record_count += record_count;
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

/// The segment being written.
#[derive(Debug)]
pub struct Segment {
    directory: PathBuf,
    core_id: u16,
    id: u64,
    file: BufferedFile,
    /// Bytes written so far (the next write's offset).
    size: u64,
}

impl Segment {
    /// Creates segment `segment_id` in `directory`: writes its header, syncs it and the
    /// directory.
    ///
    /// # Errors
    /// The file cannot be created, written or synced.
    pub async fn create(
        directory: &Path,
        core_id: u16,
        segment_id: u64,
        revision_before: u64,
    ) -> Result<Self, DurabilityError> {
        let path = directory.join(segment_file_name(segment_id));
        let io_error = |operation| {
            let path = path.display().to_string();
            move |source: glommio::GlommioError<()>| DurabilityError::Io {
                operation,
                path,
                source: source.into(),
            }
        };
        let file = BufferedFile::create(&path)
            .await
            .map_err(io_error("create"))?;
        let header = SegmentHeader {
            format_version: LOG_FORMAT_VERSION,
            core_id,
            segment_id,
            revision_before,
        };
        let mut segment = Self {
            directory: directory.to_owned(),
            core_id,
            id: segment_id,
            file,
            size: 0,
        };
        segment.write(header.to_bytes().to_vec()).await?;
        segment.sync().await?;
        sync_directory(directory).await?;
        Ok(segment)
    }

    async fn write(&mut self, bytes: Vec<u8>) -> Result<(), DurabilityError> {
        let length = bytes.len() as u64;
        let written = self
            .file
            .write_at(bytes, self.size)
            .await
            .map_err(|source| self.io_error("write", source))?;
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

    async fn sync(&self) -> Result<(), DurabilityError> {
        self.file
            .fdatasync()
            .await
            .map_err(|source| self.io_error("fdatasync", source))
    }

    fn path(&self) -> PathBuf {
        self.directory.join(segment_file_name(self.id))
    }

    fn io_error(
        &self,
        operation: &'static str,
        source: glommio::GlommioError<()>,
    ) -> DurabilityError {
        DurabilityError::Io {
            operation,
            path: self.path().display().to_string(),
            source: source.into(),
        }
    }
}

/// Syncs a directory, so a file created or renamed in it survives a crash.
///
/// # Errors
/// The directory cannot be opened or synced.
pub async fn sync_directory(directory: &Path) -> Result<(), DurabilityError> {
    let io_error = |operation| {
        let path = directory.display().to_string();
        move |source: glommio::GlommioError<()>| DurabilityError::Io {
            operation,
            path,
            source: source.into(),
        }
    };
    let handle = glommio::io::Directory::open(directory)
        .await
        .map_err(io_error("open directory"))?;
    handle.sync().await.map_err(io_error("sync directory"))?;
    let _ = handle.close().await;
    Ok(())
}

/// What the writer is told at the end.
#[derive(Debug, Clone, Default)]
pub struct WriterControl {
    /// Fired when the core has stopped producing records: write what is left and return.
    pub finish: LocalSignal,
}

/// Writes the log's batches until `control.finish` fires and everything appended is written.
/// Returns the failure, if the log failed (the caller makes the process exit non-zero).
pub async fn run_writer(
    log: Rc<CoreLog>,
    mut segment: Segment,
    segment_bytes_max: u64,
    flush_interval: Duration,
    control: WriterControl,
) -> Option<String> {
    loop {
        let is_finishing = control.finish.is_fired();
        if let Some((records, revision, record_count)) = log.take_batch() {
            let byte_count = records.len() as u64;
            let outcome = async {
                segment.write(records).await?;
                segment.sync().await?;
                Ok::<_, DurabilityError>(())
            }
            .await;
            if let Err(error) = outcome {
                log.fail(error.to_string());
                return log.failure();
            }
            log.mark_durable(revision, byte_count, record_count);
            if log.mode == Durability::Async && !is_finishing {
                // One write and sync per interval, however busy the core is.
                let _ = control
                    .finish
                    .unless_fired(glommio::timer::sleep(flush_interval))
                    .await;
            }
            if segment.size >= segment_bytes_max {
                let next = Segment::create(
                    &segment.directory,
                    segment.core_id,
                    segment.id + 1,
                    revision,
                )
                .await;
                match next {
                    Ok(next) => segment = next,
                    Err(error) => {
                        log.fail(error.to_string());
                        return log.failure();
                    }
                }
            }
            continue;
        }
        if is_finishing {
            return log.failure();
        }
        match log.mode {
            Durability::Sync => {
                futures_lite::future::or(log.appended.notified(), control.finish.wait()).await;
            }
            _ => {
                futures_lite::future::or(
                    glommio::timer::sleep(flush_interval),
                    control.finish.wait(),
                )
                .await;
            }
        }
    }
}
