//! Snapshots written by the real `write_snapshot` on glommio, beside the real log writer, then
//! loaded and recovered from the files they left.
//!
//! What is checked: a snapshot reads back exactly what the shard held (values, versions,
//! deadlines) and leaves out what expired; a snapshot taken while the shard keeps changing,
//! plus the log after its base, recovers the live state exactly (the "fuzzy" snapshot of
//! `snapshot.rs`); pruning keeps [`SNAPSHOTS_KEPT`] snapshots and the log from the older one
//! on; a damaged newest snapshot falls back to the older one; a truncated, bit-flipped or
//! zeroed snapshot file is refused, never loaded as other data; a snapshot interrupted before
//! its rename is removed and never loaded; and a batch of the log writer that spans segments
//! leaves headers exact enough for recovery to replay every record after a snapshot's base.
//! Entries carry fields and the shard holds indexes: a snapshot brings both back, and the
//! indexes it rebuilds answer queries as the live shard's did.
//!
//! The shard is driven with the wall clock (`clock::now_unix_ms`), not a made-up time:
//! `write_snapshot` reads the wall clock to leave out expired keys, so a shard driven with
//! another time would disagree with its own snapshot about which keys live.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::fs;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::OnceLock;
use std::time::Duration;

use futures_lite::future::yield_now;
use tessera_protocol::codec::{self, FrameBuffer};
use tessera_protocol::query::parse_query;
use tessera_protocol::{
    Compare, CounterAdd, Delete, Field, FieldValue, IndexKind, IndexSpec, IndexState, Put,
    PutCondition, PutEntry, QueryAccess, QueryPage, QueryRequest, Request, Response, Txn, TxnOp,
};

use crate::clock::now_unix_ms;
use crate::durability::format::{
    read_record, ReadOutcome, RECORD_HEADER_SIZE, SEGMENT_HEADER_SIZE,
};
use crate::durability::log::{
    run_writer, segment_file_name, CoreLog, Segment, WriterControl, WriterSettings,
};
use crate::durability::recovery::{read_segment_header, recover, segment_files, Recovered};
use crate::durability::snapshot::{
    load_snapshot, snapshot_file_name, snapshot_files, write_snapshot, ChunkEncoder, SnapshotEntry,
    SnapshotHeader, SnapshotLoaded, SnapshotWritten, SNAPSHOTS_KEPT, SNAPSHOT_FORMAT_VERSION,
    SNAPSHOT_HEADER_SIZE,
};
use crate::durability::storage::{GlommioFile, GlommioStorage, Storage, StorageFile};
use crate::durability::test_support::{shard_config, TestDir};
use crate::durability::{Durability, DurabilityError};
use crate::runtime::LocalSignal;
use crate::shard::query::QueryBudget;
use crate::shard::store::{KeyRevisions, PARTITION_COUNT};
use crate::shard::{LockStep, Shard};

const CORE_ID: u16 = 0;

/// Segments no test fills: the log never switches segments.
const SEGMENT_BYTES_LARGE: u64 = 16 * 1024 * 1024;

/// Segments a few hundred records fill, so the log switches segments often.
const SEGMENT_BYTES_SMALL: u64 = 64 * 1024;

/// Only used by `async` mode and while the disk is full; the tests run `sync`.
const FLUSH_INTERVAL: Duration = Duration::from_millis(1);

const MINUTE_MS: u64 = 60_000;
const HOUR_MS: u64 = 60 * MINUTE_MS;

/// A value large enough that a handful of them fill a snapshot chunk (1 MiB).
const VALUE_BYTES_LARGE: usize = 100 * 1024;

/// Most passes a test waits for something another task does, so a regression hangs no test.
const WAIT_PASS_COUNT_MAX: u32 = 100_000;

/// A shard that journals its revisions, as a durable core's does.
fn new_shard(now_ms: u64) -> Shard {
    Shard::with_journal(shard_config(CORE_ID), now_ms)
}

/// Runs `future` on a glommio executor of its own, as a core runs.
fn run_on_executor<T>(future: impl Future<Output = T>) -> T {
    glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
        .io_memory(1024 * 1024)
        .make()
        .unwrap()
        .run(future)
}

/// Archives `request` as a client would send it and applies it at `now_ms`.
fn apply(shard: &mut Shard, now_ms: u64, request: &Request) -> Response {
    let mut body = FrameBuffer::new();
    codec::encode_request_body(&mut body, request).unwrap();
    let archived = codec::access_request(&body).unwrap();
    shard.apply(now_ms, archived)
}

fn put(key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>, ttl_ms: Option<u64>) -> Request {
    Request::Put(Box::new(Put {
        ttl_ms,
        ..Put::new(key, value)
    }))
}

/// An entry as the tests compare it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct StoredEntry {
    value: Vec<u8>,
    /// The fields blob (`shard::fields`).
    fields: Vec<u8>,
    revisions: KeyRevisions,
    deadline_ms: Option<u64>,
}

/// What a shard holds that is live at some time, by key.
type Contents = BTreeMap<Vec<u8>, StoredEntry>;

/// The entries of `shard` that have not expired at `now_ms`, read from every partition.
fn contents(shard: &Shard, now_ms: u64) -> Contents {
    (0..PARTITION_COUNT)
        .flat_map(|partition| shard.partition_entries(partition))
        .filter(|entry| !entry.is_expired(now_ms))
        .map(|entry| {
            (
                entry.key().to_vec(),
                StoredEntry {
                    value: entry.value().to_vec(),
                    fields: entry.fields().to_vec(),
                    revisions: entry.revisions(),
                    deadline_ms: entry.deadline_ms(),
                },
            )
        })
        .collect()
}

fn key_text(key: &[u8]) -> String {
    String::from_utf8_lossy(key).into_owned()
}

/// Asserts that `actual` holds exactly `expected`. The message counts the keys missing,
/// unexpected and different and names the first few, rather than printing megabytes.
fn assert_same_contents(actual: &Contents, expected: &Contents, context: &str) {
    let missing: Vec<String> = expected
        .keys()
        .filter(|key| !actual.contains_key(*key))
        .map(|key| key_text(key))
        .collect();
    let unexpected: Vec<String> = actual
        .keys()
        .filter(|key| !expected.contains_key(*key))
        .map(|key| key_text(key))
        .collect();
    let different: Vec<String> = expected
        .iter()
        .filter_map(|(key, wanted)| {
            let found = actual.get(key)?;
            (found != wanted).then(|| {
                format!(
                    "{} ({:?} of {} bytes, deadline {:?}; expected {:?} of {} bytes, \
                     deadline {:?})",
                    key_text(key),
                    found.revisions,
                    found.value.len(),
                    found.deadline_ms,
                    wanted.revisions,
                    wanted.value.len(),
                    wanted.deadline_ms
                )
            })
        })
        .collect();
    assert!(
        missing.is_empty() && unexpected.is_empty() && different.is_empty(),
        "{context}: of {} keys, {} missing (first {:?}), {} unexpected (first {:?}), {} \
         different (first {:?})",
        expected.len(),
        missing.len(),
        &missing[..missing.len().min(5)],
        unexpected.len(),
        &unexpected[..unexpected.len().min(5)],
        different.len(),
        &different[..different.len().min(3)],
    );
}

/// A seeded generator (`SplitMix64`), so a failing seed replays the same requests.
struct TestRng(u64);

impl TestRng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut mixed = self.0;
        mixed = (mixed ^ (mixed >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        mixed = (mixed ^ (mixed >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        mixed ^ (mixed >> 31)
    }

    /// A number in `0..bound`.
    fn below(&mut self, bound: u64) -> u64 {
        self.next_u64() % bound
    }

    fn bytes(&mut self, size: usize) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(size + 8);
        while bytes.len() < size {
            bytes.extend_from_slice(&self.next_u64().to_le_bytes());
        }
        bytes.truncate(size);
        bytes
    }
}

fn usize_of(number: u64) -> usize {
    usize::try_from(number).unwrap()
}

/// A core's durable half as the server runs it: the shard, its log and the log's writer task
/// on the same executor. The writer syncs every batch (`sync` mode).
struct TestCore {
    directory: PathBuf,
    shard: RefCell<Shard>,
    log: Rc<CoreLog>,
    control: WriterControl,
    writer: RefCell<Option<glommio::Task<Option<String>>>>,
}

impl TestCore {
    /// Starts segment 1 in `directory` for `shard`, and the writer behind it.
    async fn start(directory: &Path, shard: Shard, segment_bytes_max: u64) -> Rc<Self> {
        Self::start_on(GlommioStorage, directory, shard, segment_bytes_max).await
    }

    /// [`TestCore::start`], with the log written through `storage`.
    async fn start_on<S: Storage>(
        storage: S,
        directory: &Path,
        shard: Shard,
        segment_bytes_max: u64,
    ) -> Rc<Self> {
        let revision = shard.revision();
        let mut segment = Segment::allocate(&storage, directory, 1, segment_bytes_max)
            .await
            .unwrap();
        segment.start(CORE_ID, revision).await.unwrap();
        segment.sync().await.unwrap();
        let log = Rc::new(CoreLog::new(Durability::Sync, revision));
        let control = WriterControl::default();
        let writer = glommio::spawn_local(run_writer(
            log.clone(),
            storage,
            CORE_ID,
            segment,
            WriterSettings {
                segment_bytes_max,
                flush_interval: FLUSH_INTERVAL,
                group_commit_wait: Duration::from_micros(200),
            },
            control.clone(),
        ));
        Rc::new(Self {
            directory: directory.to_owned(),
            shard: RefCell::new(shard),
            log,
            control,
            writer: RefCell::new(Some(writer)),
        })
    }

    /// Applies `requests` at `now_ms`, lets the shard reclaim what expired, and hands the
    /// journal to the log: what a core does after each pass over its connections.
    fn apply_batch(&self, now_ms: u64, requests: &[Request]) {
        let mut shard = self.shard.borrow_mut();
        for request in requests {
            apply(&mut shard, now_ms, request);
        }
        shard.tick(now_ms);
        let revision = shard.revision();
        self.log.append(shard.journal_mut().unwrap(), revision);
    }

    async fn snapshot(&self) -> SnapshotWritten {
        write_snapshot(
            &GlommioStorage,
            &self.directory,
            CORE_ID,
            &self.shard,
            &self.log,
        )
        .await
        .unwrap()
    }

    /// Stops the writer once everything applied is on disk, as a core stops.
    async fn finish(&self) {
        self.control.finish.fire();
        let writer = self.writer.borrow_mut().take().unwrap();
        assert_eq!(writer.await, None, "the log failed");
        assert_eq!(self.log.durable_revision(), self.shard.borrow().revision());
    }

    fn contents(&self, now_ms: u64) -> Contents {
        contents(&self.shard.borrow(), now_ms)
    }

    fn revision(&self) -> u64 {
        self.shard.borrow().revision()
    }
}

/// The segments of `directory` that were created but never started: the writer allocates
/// the next segment once the current one is half full, so a core that stops leaves one, and
/// recovery removes it (and lists that among its repairs).
fn unstarted_segments(directory: &Path) -> Vec<String> {
    segment_files(directory)
        .unwrap()
        .into_iter()
        .filter(|(_, path)| read_segment_header(path).unwrap().is_none())
        .map(|(_, path)| path.display().to_string())
        .collect()
}

/// The repairs of `repairs` other than the removal of a segment in `unstarted`.
fn repairs_besides<'a>(repairs: &'a [String], unstarted: &[String]) -> Vec<&'a String> {
    repairs
        .iter()
        .filter(|repair| {
            !unstarted
                .iter()
                .any(|path| repair.starts_with(path.as_str()))
        })
        .collect()
}

/// Recovers `directory` into a new shard and asserts it holds what `core` holds, at the same
/// revision, with nothing repaired. Returns what recovery reported.
fn assert_recovers_live_state(directory: &Path, core: &TestCore, context: &str) -> Recovered {
    let now_ms = now_unix_ms();
    let mut shard = new_shard(now_ms);
    let unstarted = unstarted_segments(directory);
    let recovered = recover(directory, CORE_ID, &mut shard, now_ms, false)
        .unwrap_or_else(|error| panic!("{context}: recovery failed: {error}"));
    let repairs = repairs_besides(&recovered.repairs, &unstarted);
    assert!(repairs.is_empty(), "{context}: {repairs:?}");
    shard.check_invariants();
    assert_same_contents(&contents(&shard, now_ms), &core.contents(now_ms), context);
    assert_eq!(shard.revision(), core.revision(), "{context}: revision");
    assert_eq!(
        index_specs(&shard),
        index_specs(&core.shard.borrow()),
        "{context}: indexes"
    );
    assert!(
        !shard.indexes().is_building(),
        "{context}: a recovered index is ready"
    );
    recovered
}

/// A shard's index definitions, in creation order.
fn index_specs(shard: &Shard) -> Vec<IndexSpec> {
    shard
        .indexes()
        .iter()
        .map(|index| index.spec.clone())
        .collect()
}

/// The byte offsets of a snapshot file's chunks, checked to tile the file after its header.
fn chunk_offsets(bytes: &[u8]) -> Vec<usize> {
    let mut offsets = Vec::new();
    let mut offset = SNAPSHOT_HEADER_SIZE;
    while offset < bytes.len() {
        offsets.push(offset);
        let size = u32::from_le_bytes(bytes[offset..offset + 4].try_into().unwrap());
        offset += RECORD_HEADER_SIZE + usize::try_from(size).unwrap();
    }
    assert_eq!(offset, bytes.len(), "chunks run past the end of the file");
    offsets
}

// 1. Round trip ---------------------------------------------------------------------------------

const ROUND_TRIP_KEY_COUNT: u64 = 3_000;

/// Key `index` of the round trip: its value's size, TTL and fate follow from the index.
fn round_trip_requests(now_ms: u64) -> Vec<(u64, Request)> {
    let mut rng = TestRng(1);
    let mut requests = Vec::new();
    for index in 0..ROUND_TRIP_KEY_COUNT {
        // Index 1 modulo 150 is also 1 modulo 3 and 5: a large value kept with its TTL and
        // not overwritten.
        let size = if index % 150 == 1 {
            VALUE_BYTES_LARGE + usize_of(index)
        } else if index % 7 == 0 {
            0
        } else {
            usize_of(index * 37 % 400)
        };
        // 1: lives past the load; 2: lives at the snapshot, expired by the load; 3: expired
        // before the snapshot was taken, so the snapshot leaves it out.
        let (at_ms, ttl_ms) = match index % 5 {
            1 => (now_ms, Some(HOUR_MS)),
            2 => (now_ms, Some(10 * MINUTE_MS)),
            3 => (now_ms - HOUR_MS, Some(1_000)),
            _ => (now_ms, None),
        };
        requests.push((at_ms, put(format!("key-{index}"), rng.bytes(size), ttl_ms)));
    }
    // Overwrites that keep the TTL and deletes, so versions are not the order of insertion
    // and deleted keys must stay absent.
    for index in (0..ROUND_TRIP_KEY_COUNT).step_by(3) {
        let size = usize_of(rng.below(300));
        let overwrite = Request::Put(Box::new(Put {
            keep_ttl: true,
            ..Put::new(format!("key-{index}"), rng.bytes(size))
        }));
        requests.push((now_ms, overwrite));
    }
    for index in (0..ROUND_TRIP_KEY_COUNT).step_by(11) {
        let key = format!("key-{index}").into_bytes();
        requests.push((now_ms, Request::Delete(Box::new(Delete::new(key)))));
    }
    requests
}

#[test]
fn a_snapshot_reads_back_every_live_entry_with_its_version_and_deadline() {
    let directory = TestDir::new("round-trip");
    run_on_executor(async {
        let now_ms = now_unix_ms();
        let load_ms = now_ms + 30 * MINUTE_MS;
        let mut live = Shard::new(shard_config(CORE_ID), now_ms - HOUR_MS);
        for (at_ms, request) in round_trip_requests(now_ms) {
            apply(&mut live, at_ms, &request);
        }
        let revision = live.revision();
        let at_snapshot = contents(&live, now_ms);
        let at_load = contents(&live, load_ms);
        // The data covers what the snapshot must tell apart.
        assert!(
            at_load.len() < at_snapshot.len(),
            "some keys expire before the load"
        );
        assert!(
            at_snapshot.len() < live.key_count(),
            "some expired before the snapshot"
        );
        assert!(at_load.values().any(|entry| entry.deadline_ms.is_some()));
        assert!(at_load.values().any(|entry| entry.value.is_empty()));
        assert!(
            at_load
                .values()
                .filter(|entry| entry.value.len() >= VALUE_BYTES_LARGE)
                .count()
                > 10
        );
        let shard = RefCell::new(live);
        // The log holds every revision already: this test is about the file alone.
        let log = CoreLog::new(Durability::Sync, revision);
        let written = write_snapshot(&GlommioStorage, directory.path(), CORE_ID, &shard, &log)
            .await
            .unwrap();

        let name = format!("snap-{revision:020}.snap");
        assert_eq!(name, snapshot_file_name(revision));
        assert_eq!(written.path, directory.path().join(&name));
        assert_eq!(
            directory.file_names(),
            vec![name],
            "no temporary file is left"
        );
        assert_eq!(written.base_revision, revision);
        assert_eq!(written.end_revision, revision);
        assert_eq!(written.entry_count, at_snapshot.len() as u64);
        assert!(written.removed.is_empty());
        let bytes = fs::read(&written.path).unwrap();
        assert_eq!(written.byte_count, bytes.len() as u64);
        assert!(
            chunk_offsets(&bytes).len() >= 2,
            "large values split the chunks"
        );

        let mut loaded_shard = new_shard(load_ms);
        let loaded = load_snapshot(&written.path, CORE_ID, &mut loaded_shard, load_ms).unwrap();
        assert_eq!(
            loaded,
            SnapshotLoaded {
                base_revision: revision,
                end_revision: revision,
                entry_count: at_snapshot.len() as u64,
            }
        );
        assert_same_contents(&contents(&loaded_shard, load_ms), &at_load, "loaded");
        // Nothing expired was stored, nothing was journaled, and the revision is recovery's
        // to set.
        assert_eq!(loaded_shard.key_count(), at_load.len());
        let deadline_count = at_load
            .values()
            .filter(|entry| entry.deadline_ms.is_some())
            .count();
        assert_eq!(loaded_shard.timer_count(), deadline_count);
        assert_eq!(loaded_shard.journal_len(), 0);
        assert_eq!(loaded_shard.revision(), 0);
        loaded_shard.check_invariants();

        let error = load_snapshot(&written.path, CORE_ID + 1, &mut new_shard(load_ms), load_ms)
            .unwrap_err();
        assert!(error.to_string().contains("snapshot of core 0"), "{error}");
    });
}

// 2. A snapshot of a shard that keeps changing ---------------------------------------------------

const RANDOM_KEY_COUNT: u64 = 400;
const COUNTER_KEY_COUNT: u64 = 8;

fn random_key(rng: &mut TestRng) -> Vec<u8> {
    format!("key-{}", rng.below(RANDOM_KEY_COUNT)).into_bytes()
}

/// Short TTLs expire while the test runs (some while the snapshot is being taken).
fn random_ttl(rng: &mut TestRng) -> Option<u64> {
    match rng.below(8) {
        0 | 1 => Some(1 + rng.below(40)),
        2 => Some(HOUR_MS),
        _ => None,
    }
}

fn random_value(rng: &mut TestRng) -> Vec<u8> {
    let size = if rng.below(40) == 0 {
        8 * 1024
    } else {
        usize_of(rng.below(200))
    };
    rng.bytes(size)
}

/// Fields for a random put: none half the time, else up to three of `f0`..`f3` with small
/// numbers or strings.
fn random_fields(rng: &mut TestRng) -> Vec<Field> {
    if rng.below(2) == 0 {
        return Vec::new();
    }
    let mut fields: Vec<Field> = Vec::new();
    for _ in 0..=rng.below(3) {
        let name = format!("f{}", rng.below(4));
        let value = if rng.below(2) == 0 {
            FieldValue::I64(i64::try_from(rng.below(5)).unwrap())
        } else {
            FieldValue::Str(format!("s{}", rng.below(3)))
        };
        if fields.iter().all(|field| field.name != name) {
            fields.push(Field::new(name, value));
        }
    }
    fields
}

/// An index on one of a few prefixes and fields, under one of three names (a name may be
/// taken by another definition, which the shard refuses).
fn random_index(rng: &mut TestRng) -> IndexSpec {
    IndexSpec {
        name: format!("index-{}", rng.below(3)),
        prefix: ["", "key-1", "key-2"][usize_of(rng.below(3))]
            .as_bytes()
            .to_vec(),
        field: format!("f{}", rng.below(4)),
        kind: if rng.below(2) == 0 {
            IndexKind::Equality
        } else {
            IndexKind::Range
        },
    }
}

/// A random request of every kind that mutates: puts (conditional, with and without TTLs,
/// keeping TTLs, with and without fields), deletes, batches, expire, persist, counters, and
/// index definitions created and dropped.
fn random_request(rng: &mut TestRng) -> Request {
    match rng.below(100) {
        0..=39 => {
            let ttl_ms = random_ttl(rng);
            let condition = match rng.below(10) {
                0 => PutCondition::IfAbsent,
                1 => PutCondition::IfPresent,
                _ => PutCondition::Always,
            };
            Request::Put(Box::new(Put {
                ttl_ms,
                keep_ttl: ttl_ms.is_none() && rng.below(4) == 0,
                condition,
                fields: random_fields(rng),
                ..Put::new(random_key(rng), random_value(rng))
            }))
        }
        40..=54 => Request::Delete(Box::new(Delete::new(random_key(rng)))),
        55..=64 => Request::MultiPut {
            entries: (0..2 + rng.below(4))
                .map(|_| PutEntry {
                    key: random_key(rng),
                    value: random_value(rng),
                    ttl_ms: random_ttl(rng),
                    fields: random_fields(rng),
                })
                .collect(),
        },
        65..=71 => Request::MultiDelete {
            keys: (0..2 + rng.below(4)).map(|_| random_key(rng)).collect(),
        },
        72..=79 => Request::Expire {
            key: random_key(rng),
            ttl_ms: if rng.below(2) == 0 {
                1 + rng.below(40)
            } else {
                HOUR_MS
            },
        },
        80..=85 => Request::Persist {
            key: random_key(rng),
        },
        86 => Request::CreateIndex(Box::new(random_index(rng))),
        87 => Request::DropIndex {
            name: format!("index-{}", rng.below(3)),
        },
        _ => Request::Add(Box::new(CounterAdd::new(
            format!("counter-{}", rng.below(COUNTER_KEY_COUNT)),
            i64::try_from(rng.below(1_000)).unwrap() - 500,
        ))),
    }
}

fn random_batch(rng: &mut TestRng, request_count_max: u64) -> Vec<Request> {
    (0..=rng.below(request_count_max))
        .map(|_| random_request(rng))
        .collect()
}

/// Batches the writing task goes on applying once the snapshot is done, so the log holds
/// revisions after the snapshot's end too.
const BATCHES_AFTER_SNAPSHOT: u32 = 30;

/// Most batches applied while the snapshot is taken. The writing task applies one each time
/// it runs, and it runs thousands of times while the snapshot waits for a `fdatasync`: this
/// keeps the log to a few megabytes.
const BATCHES_DURING_SNAPSHOT_MAX: u32 = 1_500;

/// One seed: a shard changes while `write_snapshot` copies it; recovery must rebuild it.
async fn snapshot_while_writing(seed: u64) {
    let directory = TestDir::new("concurrent");
    let context = format!("seed {seed}");
    let core = TestCore::start(
        directory.path(),
        new_shard(now_unix_ms()),
        SEGMENT_BYTES_LARGE,
    )
    .await;
    let mut rng = TestRng(seed);
    // Something in every partition before the snapshot begins.
    for _ in 0..40 {
        core.apply_batch(now_unix_ms(), &random_batch(&mut rng, 40));
    }
    let is_snapshot_done = Rc::new(Cell::new(false));
    let writes = glommio::spawn_local({
        let core = core.clone();
        let is_snapshot_done = is_snapshot_done.clone();
        async move {
            let mut batch_count = 0_u32;
            let mut batches_after = 0;
            let mut pass_count = 0;
            while batches_after < BATCHES_AFTER_SNAPSHOT {
                pass_count += 1;
                assert!(pass_count < WAIT_PASS_COUNT_MAX, "the snapshot never ended");
                if is_snapshot_done.get() {
                    batches_after += 1;
                } else if batch_count >= BATCHES_DURING_SNAPSHOT_MAX {
                    pause().await;
                    continue;
                }
                core.apply_batch(now_unix_ms(), &random_batch(&mut rng, 8));
                batch_count += 1;
                yield_now().await;
            }
            batch_count
        }
    });
    let written = core.snapshot().await;
    is_snapshot_done.set(true);
    let batch_count = writes.await;
    core.finish().await;
    assert!(
        written.end_revision > written.base_revision,
        "{context}: nothing changed while the snapshot was taken ({batch_count} batches)"
    );
    assert!(core.revision() > written.end_revision, "{context}");

    // The snapshot alone is not the state at its base: some entries it copied were written
    // after the base, and only the log after the base makes the rest agree with them.
    let now_ms = now_unix_ms();
    let mut snapshot_alone = new_shard(now_ms);
    load_snapshot(&written.path, CORE_ID, &mut snapshot_alone, now_ms).unwrap();
    let copied_after_base = (0..PARTITION_COUNT)
        .flat_map(|partition| snapshot_alone.partition_entries(partition))
        .filter(|entry| entry.mod_revision() > written.base_revision)
        .count();
    assert!(
        copied_after_base > 0,
        "{context}: the snapshot was not fuzzy"
    );

    let recovered = assert_recovers_live_state(directory.path(), &core, &context);
    assert_eq!(
        recovered.snapshot_base,
        Some(written.base_revision),
        "{context}"
    );
    assert_eq!(
        recovered.snapshot_entry_count, written.entry_count,
        "{context}"
    );
    assert!(recovered.record_count > 0, "{context}");
}

#[test]
fn a_snapshot_of_a_changing_shard_plus_the_log_recovers_the_live_state() {
    run_on_executor(async {
        for seed in 1..=4 {
            snapshot_while_writing(seed).await;
        }
    });
}

// 3. Pruning -------------------------------------------------------------------------------------

/// `batch_count` batches of puts of fresh and old keys, each written before the next.
async fn write_puts(core: &TestCore, rng: &mut TestRng, batch_count: u32) {
    for _ in 0..batch_count {
        let requests: Vec<Request> = (0..10)
            .map(|_| {
                let key = format!("key-{}", rng.below(2_000));
                let size = usize_of(100 + rng.below(200));
                put(key, rng.bytes(size), None)
            })
            .collect();
        core.apply_batch(now_unix_ms(), &requests);
        yield_now().await;
    }
}

fn is_segment(path: &Path) -> bool {
    path.extension().is_some_and(|extension| extension == "log")
}

#[test]
fn old_snapshots_and_the_log_before_the_older_kept_one_are_removed() {
    let directory = TestDir::new("prune");
    run_on_executor(async {
        let core = TestCore::start(
            directory.path(),
            new_shard(now_unix_ms()),
            SEGMENT_BYTES_SMALL,
        )
        .await;
        let mut rng = TestRng(3);
        let mut taken: Vec<SnapshotWritten> = Vec::new();
        for round in 0..4 {
            // About 100 KiB of records: more than a segment each round.
            write_puts(&core, &mut rng, 40).await;
            let written = core.snapshot().await;
            let kept = snapshot_files(directory.path()).unwrap();
            assert_eq!(kept.len(), (round + 1).min(SNAPSHOTS_KEPT), "round {round}");
            assert_eq!(kept[0], (written.base_revision, written.path.clone()));
            taken.push(written);
        }
        // Revisions only the log holds.
        write_puts(&core, &mut rng, 10).await;
        core.finish().await;

        let bases: Vec<u64> = snapshot_files(directory.path())
            .unwrap()
            .into_iter()
            .map(|(base, _)| base)
            .collect();
        assert_eq!(bases, vec![taken[3].base_revision, taken[2].base_revision]);
        let removed: Vec<&PathBuf> = taken.iter().flat_map(|written| &written.removed).collect();
        for old in &taken[..2] {
            assert!(!old.path.exists());
            assert!(
                removed.contains(&&old.path),
                "{} was not reported",
                old.path.display()
            );
        }
        let removed_segments: Vec<&&PathBuf> =
            removed.iter().filter(|path| is_segment(path)).collect();
        assert!(removed_segments.len() >= 2, "{removed_segments:?}");
        for path in &removed_segments {
            assert!(!path.exists());
        }
        assert!(!directory.path().join(segment_file_name(1)).exists());
        // What is left of the log begins at or before the older kept snapshot, and goes on
        // without a gap.
        let segments = segment_files(directory.path()).unwrap();
        let first = read_segment_header(&segments[0].1).unwrap().unwrap();
        assert!(
            first.revision_before <= taken[2].base_revision,
            "the log begins after revision {}, the older snapshot at {}",
            first.revision_before,
            taken[2].base_revision
        );
        for pair in segments.windows(2) {
            assert_eq!(pair[1].0, pair[0].0 + 1, "segment ids go on without a gap");
        }
        let recovered = assert_recovers_live_state(directory.path(), &core, "after pruning");
        assert_eq!(recovered.snapshot_base, Some(taken[3].base_revision));
    });
}

// 4. A damaged newest snapshot ------------------------------------------------------------------

/// Two snapshots with writes before, between and after them, and the log pruned behind the
/// older: returns the core (finished) and the snapshots, older first.
async fn two_snapshots(directory: &Path) -> (Rc<TestCore>, SnapshotWritten, SnapshotWritten) {
    let core = TestCore::start(directory, new_shard(now_unix_ms()), SEGMENT_BYTES_SMALL).await;
    let mut rng = TestRng(4);
    write_puts(&core, &mut rng, 60).await;
    let older = core.snapshot().await;
    write_puts(&core, &mut rng, 60).await;
    let newer = core.snapshot().await;
    write_puts(&core, &mut rng, 20).await;
    core.finish().await;
    assert!(
        !directory.join(segment_file_name(1)).exists(),
        "the log before the older snapshot was pruned"
    );
    (core, older, newer)
}

fn flip_middle_byte(path: &Path) -> Vec<u8> {
    let mut bytes = fs::read(path).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x20;
    fs::write(path, &bytes).unwrap();
    bytes
}

#[test]
fn a_damaged_newest_snapshot_falls_back_to_the_older_one_and_the_log_after_it() {
    let directory = TestDir::new("fallback");
    run_on_executor(async {
        let (core, older, newer) = two_snapshots(directory.path()).await;
        let damaged_bytes = flip_middle_byte(&newer.path);

        let now_ms = now_unix_ms();
        let mut shard = new_shard(now_ms);
        let unstarted = unstarted_segments(directory.path());
        let recovered = recover(directory.path(), CORE_ID, &mut shard, now_ms, false).unwrap();
        assert_eq!(recovered.snapshot_base, Some(older.base_revision));
        assert_eq!(recovered.snapshot_entry_count, older.entry_count);
        assert_same_contents(
            &contents(&shard, now_ms),
            &core.contents(now_ms),
            "fallback",
        );
        assert_eq!(shard.revision(), core.revision());
        shard.check_invariants();

        // The damaged file is kept for inspection under a name no start loads again.
        let damaged = directory
            .path()
            .join(format!("snap-{:020}.snap.damaged", newer.base_revision));
        assert!(!newer.path.exists());
        assert_eq!(fs::read(&damaged).unwrap(), damaged_bytes);
        let repairs = repairs_besides(&recovered.repairs, &unstarted);
        assert_eq!(repairs.len(), 1, "{repairs:?}");
        let repair = repairs[0];
        assert!(
            repair.contains(&newer.path.display().to_string()),
            "{repair}"
        );
        assert!(repair.contains("damaged"), "{repair}");
        assert!(repair.contains(&damaged.display().to_string()), "{repair}");

        // The next start finds nothing to repair and loads the older snapshot again.
        let mut again = new_shard(now_ms);
        let recovered = recover(directory.path(), CORE_ID, &mut again, now_ms, false).unwrap();
        assert!(recovered.repairs.is_empty(), "{:?}", recovered.repairs);
        assert_eq!(recovered.snapshot_base, Some(older.base_revision));
        assert_same_contents(&contents(&again, now_ms), &core.contents(now_ms), "again");
    });
}

#[test]
fn both_snapshots_damaged_with_the_log_pruned_refuses_to_start() {
    let directory = TestDir::new("both-damaged");
    run_on_executor(async {
        let (_core, older, newer) = two_snapshots(directory.path()).await;
        flip_middle_byte(&older.path);
        flip_middle_byte(&newer.path);
        let now_ms = now_unix_ms();
        // The log no longer reaches back to revision 0: starting from it alone would show a
        // state no prefix of the history describes.
        let error = recover(
            directory.path(),
            CORE_ID,
            &mut new_shard(now_ms),
            now_ms,
            false,
        )
        .unwrap_err();
        assert!(error.to_string().contains("--repair"), "{error}");
        // A refusal touches nothing: both snapshots are where they were.
        assert_eq!(snapshot_files(directory.path()).unwrap().len(), 2);
    });
}

// 5. Damaged snapshot files ----------------------------------------------------------------------

/// A real snapshot file with known content, built once for every case of the property test.
struct CorruptionSnapshot {
    bytes: Vec<u8>,
    loaded: SnapshotLoaded,
    contents: Contents,
    /// Offsets of the bytes that frame the data: the file header, each chunk's size,
    /// checksum and sequence number, and the end marker.
    frame_offsets: Vec<usize>,
}

/// Bytes of the end marker: its kind, the end revision and the entry count.
const END_MARKER_SIZE: usize = 17;

fn corruption_snapshot() -> &'static CorruptionSnapshot {
    static SNAPSHOT: OnceLock<CorruptionSnapshot> = OnceLock::new();
    SNAPSHOT.get_or_init(build_corruption_snapshot)
}

fn build_corruption_snapshot() -> CorruptionSnapshot {
    let directory = TestDir::new("corruption-source");
    let now_ms = now_unix_ms();
    let mut live = Shard::new(shard_config(CORE_ID), now_ms);
    let mut rng = TestRng(5);
    for index in 0..400_u64 {
        let size = if index % 25 == 0 {
            80 * 1024
        } else {
            usize_of(rng.below(300))
        };
        let ttl_ms = (index % 3 == 0).then_some(HOUR_MS);
        apply(
            &mut live,
            now_ms,
            &put(format!("key-{index}"), rng.bytes(size), ttl_ms),
        );
    }
    for index in (0..400_u64).step_by(7) {
        apply(
            &mut live,
            now_ms,
            &put(format!("key-{index}"), rng.bytes(10), None),
        );
    }
    let expected = contents(&live, now_ms);
    let revision = live.revision();
    let shard = RefCell::new(live);
    let log = CoreLog::new(Durability::Sync, revision);
    let written = run_on_executor(write_snapshot(
        &GlommioStorage,
        directory.path(),
        CORE_ID,
        &shard,
        &log,
    ))
    .unwrap();
    let bytes = fs::read(&written.path).unwrap();
    let chunks = chunk_offsets(&bytes);
    assert!(chunks.len() >= 2, "the file has several chunks to damage");
    let mut frame_offsets: Vec<usize> = (0..SNAPSHOT_HEADER_SIZE).collect();
    for chunk in chunks {
        frame_offsets.extend(chunk..chunk + RECORD_HEADER_SIZE + 8);
    }
    frame_offsets.extend(bytes.len() - END_MARKER_SIZE..bytes.len());
    CorruptionSnapshot {
        bytes,
        loaded: SnapshotLoaded {
            base_revision: revision,
            end_revision: revision,
            entry_count: expected.len() as u64,
        },
        contents: expected,
        frame_offsets,
    }
}

#[derive(Debug, Clone)]
enum Corruption {
    /// Cut at any length, the whole file included (which damages nothing).
    Truncate(usize),
    /// Cut this many bytes off the end: into the end marker or just before it.
    TruncateTail(usize),
    FlipBit(usize),
    /// Flip a bit in the header, a chunk's frame or the end marker.
    FlipFrameBit(usize),
    /// Zero a 4096-byte page, as a lost write of a page leaves it.
    ZeroPage(usize),
    /// Bytes after the end marker.
    Append(Vec<u8>),
}

fn corruption() -> impl proptest::strategy::Strategy<Value = Corruption> {
    use proptest::prelude::*;
    prop_oneof![
        any::<usize>().prop_map(Corruption::Truncate),
        (1..=64_usize).prop_map(Corruption::TruncateTail),
        any::<usize>().prop_map(Corruption::FlipBit),
        any::<usize>().prop_map(Corruption::FlipFrameBit),
        any::<usize>().prop_map(Corruption::ZeroPage),
        proptest::collection::vec(any::<u8>(), 1..64).prop_map(Corruption::Append),
    ]
}

fn damage(snapshot: &CorruptionSnapshot, corruption: &Corruption) -> Vec<u8> {
    let mut bytes = snapshot.bytes.clone();
    let length = bytes.len();
    let flip = |bytes: &mut Vec<u8>, bit: usize| bytes[bit / 8] ^= 1 << (bit % 8);
    match corruption {
        Corruption::Truncate(at) => bytes.truncate(at % (length + 1)),
        Corruption::TruncateTail(count) => bytes.truncate(length - count),
        Corruption::FlipBit(at) => flip(&mut bytes, at % (length * 8)),
        Corruption::FlipFrameBit(at) => {
            let offsets = &snapshot.frame_offsets;
            let byte = offsets[at / 8 % offsets.len()];
            flip(&mut bytes, byte * 8 + at % 8);
        }
        Corruption::ZeroPage(at) => {
            let page = at % length.div_ceil(4096) * 4096;
            let end = (page + 4096).min(length);
            bytes[page..end].fill(0);
        }
        Corruption::Append(extra) => bytes.extend_from_slice(extra),
    }
    bytes
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig {
        cases: 200,
        failure_persistence: None,
        ..proptest::prelude::ProptestConfig::default()
    })]

    /// Truncated, bit-flipped, zeroed or extended snapshot files: loading never panics and
    /// either refuses the file or, only when the damage changed no byte, returns exactly what
    /// was written. Recovery from the damaged file alone (no log) never returns other data:
    /// it refuses to start (and with `--repair` sets the file aside and starts empty).
    #[test]
    fn damaged_snapshot_files_are_refused_never_loaded_as_other_data(
        corruption in corruption(),
    ) {
        let snapshot = corruption_snapshot();
        let damaged = damage(snapshot, &corruption);
        let is_intact = damaged == snapshot.bytes;
        let directory = TestDir::new("corrupt");
        let path = directory.path().join(snapshot_file_name(snapshot.loaded.base_revision));
        fs::write(&path, &damaged).unwrap();
        let now_ms = now_unix_ms();

        let mut shard = new_shard(now_ms);
        match load_snapshot(&path, CORE_ID, &mut shard, now_ms) {
            Ok(loaded) => {
                proptest::prop_assert!(is_intact, "{:?} was loaded: {:?}", corruption, loaded);
                proptest::prop_assert_eq!(loaded, snapshot.loaded);
                assert_same_contents(&contents(&shard, now_ms), &snapshot.contents, "intact");
            }
                        Err(error) => {
                proptest::prop_assert!(!is_intact, "the intact file was refused: {}", error);
                proptest::prop_assert!(
                    matches!(error, DurabilityError::Corrupt { .. }),
                    "{:?} refused as {:?}", corruption, error
                );
            }
        }

        let mut shard = new_shard(now_ms);
        match recover(directory.path(), CORE_ID, &mut shard, now_ms, false) {
            Ok(recovered) if is_intact => {
                proptest::prop_assert!(recovered.repairs.is_empty(), "{:?}", recovered.repairs);
                proptest::prop_assert_eq!(recovered.snapshot_base, Some(snapshot.loaded.base_revision));
                assert_same_contents(&contents(&shard, now_ms), &snapshot.contents, "recovered");
                proptest::prop_assert_eq!(shard.revision(), snapshot.loaded.end_revision);
            }
            Ok(recovered) => {
                proptest::prop_assert_eq!(recovered.snapshot_base, None);
                proptest::prop_assert_eq!(shard.key_count(), 0);
                proptest::prop_assert_eq!(shard.revision(), 0);
                proptest::prop_assert_eq!(recovered.repairs.len(), 1);
                let repair = &recovered.repairs[0];
                proptest::prop_assert!(repair.contains(&path.display().to_string()), "{}", repair);
                proptest::prop_assert!(!path.exists());
                proptest::prop_assert!(path.with_extension("snap.damaged").exists());
            }
            Err(error) => {
                proptest::prop_assert!(!is_intact, "the intact file was refused: {}", error);
            }
        }
    }
}

/// A damaged snapshot and no log at all (a core directory holding only a snapshot, as a
/// restored backup would): recovery refuses to start, touching nothing, since starting empty
/// would drop the data silently. With `--repair` it sets the snapshot aside and starts empty.
#[test]
fn a_damaged_only_snapshot_without_a_log_refuses_to_start_unless_repaired() {
    let snapshot = corruption_snapshot();
    let directory = TestDir::new("only-snapshot");
    let path = directory
        .path()
        .join(snapshot_file_name(snapshot.loaded.base_revision));
    let mut damaged = snapshot.bytes.clone();
    let middle = damaged.len() / 2;
    damaged[middle] ^= 1;
    fs::write(&path, &damaged).unwrap();
    let now_ms = now_unix_ms();
    let mut shard = new_shard(now_ms);
    let error = recover(directory.path(), CORE_ID, &mut shard, now_ms, false).unwrap_err();
    assert!(error.to_string().contains("--repair"), "{error}");
    assert_eq!(
        fs::read(&path).unwrap(),
        damaged,
        "a refusal touches nothing"
    );
    let mut shard = new_shard(now_ms);
    let recovered = recover(directory.path(), CORE_ID, &mut shard, now_ms, true).unwrap();
    assert_eq!(recovered.snapshot_base, None);
    assert_eq!(shard.key_count(), 0);
    assert_eq!(shard.revision(), 0);
    assert_eq!(recovered.repairs.len(), 1, "{:?}", recovered.repairs);
    assert!(
        recovered.repairs[0].contains("damaged"),
        "{:?}",
        recovered.repairs
    );
    assert_eq!(
        directory.file_names(),
        vec![format!(
            "snap-{:020}.snap.damaged",
            snapshot.loaded.base_revision
        )]
    );
}

// 6. A snapshot interrupted before its rename ------------------------------------------------------

/// A complete, valid snapshot file of core `CORE_ID` made by hand: `entries` at base `base`.
fn handmade_snapshot(base: u64, entries: &[SnapshotEntry<'_>]) -> Vec<u8> {
    let mut bytes = SnapshotHeader {
        format_version: SNAPSHOT_FORMAT_VERSION,
        core_id: CORE_ID,
        base_revision: base,
        taken_at_ms: 0,
    }
    .to_bytes()
    .to_vec();
    let mut encoder = ChunkEncoder::new();
    for entry in entries {
        encoder.push(entry);
    }
    encoder.finish(base);
    bytes.extend_from_slice(&encoder.take_sealed(0).unwrap());
    bytes
}

#[test]
fn a_snapshot_interrupted_before_its_rename_is_removed_and_never_loaded() {
    let directory = TestDir::new("temporary");
    run_on_executor(async {
        let core = TestCore::start(
            directory.path(),
            new_shard(now_unix_ms()),
            SEGMENT_BYTES_LARGE,
        )
        .await;
        let mut rng = TestRng(6);
        write_puts(&core, &mut rng, 50).await;
        let committed = core.snapshot().await;
        write_puts(&core, &mut rng, 50).await;
        // The server drops a snapshot in progress when it stops (`unless_fired`): here after
        // a few partitions. The snapshot is polled by hand, so it runs only as far as this
        // test lets it.
        let interrupted_base = core.revision();
        let interrupted_path = directory
            .path()
            .join(format!("snap-{interrupted_base:020}.tmp"));
        let mut interrupted = Box::pin(core.snapshot());
        let mut poll_count = 0;
        let mut poll_count_after_create = 0;
        while poll_count_after_create < 20 {
            poll_count += 1;
            assert!(
                poll_count < PAUSE_COUNT_MAX,
                "the temporary file never appeared"
            );
            let step = futures_lite::future::poll_once(&mut interrupted).await;
            assert!(
                step.is_none(),
                "the snapshot finished before it was dropped"
            );
            if interrupted_path.exists() {
                poll_count_after_create += 1;
            }
            // Lets the file operations in flight complete.
            pause().await;
        }
        drop(interrupted);
        assert!(interrupted_path.exists());
        core.finish().await;

        // A finished snapshot that was not renamed yet, of a history this log does not have:
        // loading it would show a key that never existed and skip the log up to its base.
        let ghost_base = core.revision() + 1_000;
        let ghost = handmade_snapshot(
            ghost_base,
            &[SnapshotEntry {
                key: b"ghost",
                value: b"never written",
                revisions: KeyRevisions::created(ghost_base),
                deadline_ms: None,
                fields: &[],
            }],
        );
        let ghost_path = directory.path().join(format!("snap-{ghost_base:020}.tmp"));
        fs::write(&ghost_path, &ghost).unwrap();
        let now_ms = now_unix_ms();
        let loadable = load_snapshot(&ghost_path, CORE_ID, &mut new_shard(now_ms), now_ms);
        assert_eq!(
            loadable.unwrap().base_revision,
            ghost_base,
            "the ghost is a valid snapshot"
        );

        let mut shard = new_shard(now_ms);
        let unstarted = unstarted_segments(directory.path());
        let recovered = recover(directory.path(), CORE_ID, &mut shard, now_ms, false).unwrap();
        assert_eq!(recovered.snapshot_base, Some(committed.base_revision));
        assert_same_contents(
            &contents(&shard, now_ms),
            &core.contents(now_ms),
            "recovered",
        );
        assert_eq!(shard.revision(), core.revision());
        assert!(!interrupted_path.exists());
        assert!(!ghost_path.exists());
        let repairs = repairs_besides(&recovered.repairs, &unstarted);
        assert_eq!(repairs.len(), 2, "{repairs:?}");
        for path in [&interrupted_path, &ghost_path] {
            let path = path.display().to_string();
            assert!(
                repairs
                    .iter()
                    .any(|repair| repair.contains(&path) && repair.contains("not finished")),
                "{path} in {repairs:?}"
            );
        }
        // No temporary file is left.
        assert!(!directory.file_names().iter().any(|name| Path::new(name)
            .extension()
            .is_some_and(|extension| extension == "tmp")));
    });
}

// 7. Segment headers when one batch spans segments ------------------------------------------------

/// Each started segment of `directory`: its id, its header's `revision_before` and the
/// revision of its last record (`None` if it holds none).
fn segment_revisions(directory: &Path) -> Vec<(u64, u64, Option<u64>)> {
    segment_files(directory)
        .unwrap()
        .into_iter()
        .filter_map(|(segment_id, path)| {
            let header = read_segment_header(&path).unwrap()?;
            let bytes = fs::read(&path).unwrap();
            let mut offset = SEGMENT_HEADER_SIZE;
            let mut last = None;
            while let ReadOutcome::Record(record, size) = read_record(&bytes[offset..]) {
                if record.batch_length().is_none() {
                    last = Some(record.revision);
                }
                offset += size;
            }
            Some((segment_id, header.revision_before, last))
        })
        .collect()
}

/// Asserts that each segment's header names the revision of the last record before it, as
/// `SegmentHeader::revision_before` is documented ("the revision of the last record before
/// this segment"): recovery and pruning decide from it which segments hold records after a
/// snapshot's base.
fn assert_segment_headers_are_exact(directory: &Path) {
    let segments = segment_revisions(directory);
    for pair in segments.windows(2) {
        let (_, _, last_before) = pair[0];
        let (segment_id, revision_before, _) = pair[1];
        if let Some(last_before) = last_before {
            assert_eq!(
                revision_before, last_before,
                "segment {segment_id} says it follows revision {revision_before}, but the \
                 segment before it ends at revision {last_before} (segments as (id, \
                 revision_before, last record): {segments:?})"
            );
        }
    }
}

fn late_puts(count: u64) -> Vec<Request> {
    (0..count)
        .map(|index| put(format!("late-{index}"), vec![b'v'; 200], None))
        .collect()
}

/// The writer takes whatever was appended since its last write as one batch, and switches
/// segments inside it when the current one is full. A core appends once per pass over its
/// connections, so a busy core (or a slow `fdatasync`) hands it batches far larger than what
/// is left of a segment.
#[test]
fn a_batch_that_spans_segments_gives_the_next_segment_an_exact_header() {
    let directory = TestDir::new("spanning-batch");
    run_on_executor(async {
        let now_ms = now_unix_ms();
        let core = TestCore::start(directory.path(), new_shard(now_ms), SEGMENT_BYTES_SMALL).await;
        let early: Vec<Request> = (0..10)
            .map(|index| put(format!("early-{index}"), b"e".to_vec(), None))
            .collect();
        core.apply_batch(now_ms, &early);
        let revision = core.revision();
        core.log.wait_durable(revision).await;
        // About 240 KiB in one batch: the rest of segment 1, then segment 2.
        core.apply_batch(now_ms, &late_puts(1_000));
        core.finish().await;
        let started = segment_revisions(directory.path())
            .into_iter()
            .filter(|(_, _, last)| last.is_some())
            .count();
        assert!(started >= 2, "{:?}", segment_revisions(directory.path()));
        assert_recovers_live_state(directory.path(), &core, "one batch over two segments");
        assert_segment_headers_are_exact(directory.path());
    });
}

/// Glommio storage whose file syncs wait while its gate is closed: a disk slow to sync.
#[derive(Clone, Default)]
struct GatedStorage {
    gate: Rc<Gate>,
}

#[derive(Default)]
struct Gate {
    /// Fired when the gate opens; `None` while it is open.
    closed: RefCell<Option<LocalSignal>>,
    /// Syncs that found the gate closed.
    held_count: Cell<u64>,
}

impl Gate {
    fn close(&self) {
        *self.closed.borrow_mut() = Some(LocalSignal::new());
    }

    fn open(&self) {
        if let Some(signal) = self.closed.borrow_mut().take() {
            signal.fire();
        }
    }

    async fn pass(&self) {
        let closed = self.closed.borrow().clone();
        if let Some(signal) = closed {
            self.held_count.set(self.held_count.get() + 1);
            signal.wait().await;
        }
    }
}

struct GatedFile {
    file: GlommioFile,
    gate: Rc<Gate>,
}

impl StorageFile for GatedFile {
    async fn write_at(&self, bytes: Vec<u8>, offset: u64) -> std::io::Result<usize> {
        self.file.write_at(bytes, offset).await
    }

    async fn sync(&self) -> std::io::Result<()> {
        self.gate.pass().await;
        self.file.sync().await
    }

    async fn allocate(&self, size: u64) -> std::io::Result<()> {
        self.file.allocate(size).await
    }

    async fn close(self) -> std::io::Result<()> {
        self.file.close().await
    }
}

impl Storage for GatedStorage {
    type File = GatedFile;

    async fn create(&self, path: &Path) -> std::io::Result<GatedFile> {
        let file = GlommioStorage.create(path).await?;
        Ok(GatedFile {
            file,
            gate: self.gate.clone(),
        })
    }

    async fn sync_directory(&self, directory: &Path) -> std::io::Result<()> {
        GlommioStorage.sync_directory(directory).await
    }

    async fn rename(&self, from: &Path, to: &Path) -> std::io::Result<()> {
        GlommioStorage.rename(from, to).await
    }

    async fn remove(&self, path: &Path) -> std::io::Result<()> {
        GlommioStorage.remove(path).await
    }
}

/// Sleeps a moment: unlike a yield, this lets the executor reap completed file operations
/// while the other tasks are idle.
async fn pause() {
    glommio::timer::sleep(Duration::from_millis(1)).await;
}

/// Most pauses a test waits for another task (a few seconds).
const PAUSE_COUNT_MAX: u32 = 5_000;

/// Pauses until `condition` holds.
async fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    for _ in 0..PAUSE_COUNT_MAX {
        if condition() {
            return;
        }
        pause().await;
    }
    panic!("waited too long for {what}");
}

/// The server's sequence under load: a sync is slow, requests go on arriving, a snapshot
/// begins and copies the store meanwhile, and the writes after the copy wait in the log. When
/// the sync completes, the writer writes all that waited as one batch over two segments. The
/// second segment's header must say it follows the last record of the first: recovery
/// replays from the last segment whose header is at or before the snapshot's base (and
/// pruning removes a segment by its successor's header). Before commit f10007c the header
/// named the revision before the whole batch (10, with the first segment ending at 291), so
/// recovery started at the second segment and lost revisions 21 to 291: 271 keys.
#[test]
fn a_snapshot_taken_during_a_slow_sync_keeps_every_record_after_its_base() {
    let directory = TestDir::new("slow-sync");
    run_on_executor(async {
        let now_ms = now_unix_ms();
        let storage = GatedStorage::default();
        let gate = storage.gate.clone();
        let core = TestCore::start_on(
            storage,
            directory.path(),
            new_shard(now_ms),
            SEGMENT_BYTES_SMALL,
        )
        .await;
        // Revisions 1..=10 are written; their sync is held.
        gate.close();
        let early: Vec<Request> = (0..10)
            .map(|index| put(format!("early-{index}"), b"e".to_vec(), None))
            .collect();
        core.apply_batch(now_ms, &early);
        wait_until("the writer's sync", || gate.held_count.get() > 0).await;
        // Revisions 11..=20 wait in the log; a snapshot begins at 20 and copies the store.
        let early: Vec<Request> = (10..20)
            .map(|index| put(format!("early-{index}"), b"e".to_vec(), None))
            .collect();
        core.apply_batch(now_ms, &early);
        let base = core.revision();
        let snapshot = glommio::spawn_local({
            let core = core.clone();
            async move { core.snapshot().await }
        });
        let temporary = directory.path().join(format!("snap-{base:020}.tmp"));
        wait_until("the snapshot's copy", || {
            let mut scratch = new_shard(now_ms);
            load_snapshot(&temporary, CORE_ID, &mut scratch, now_ms).is_ok()
        })
        .await;
        // Revisions after the copy: the log alone holds them.
        core.apply_batch(now_ms, &late_puts(1_000));
        gate.open();
        let written = snapshot.await;
        assert_eq!(written.base_revision, base);
        assert_eq!(written.end_revision, base);
        core.finish().await;
        let removed: Vec<String> = written
            .removed
            .iter()
            .map(|path| path.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        let context = format!(
            "after a slow sync (snapshot base {base}, pruned {removed:?}, segments left as (id, \
             revision_before, last record): {:?})",
            segment_revisions(directory.path())
        );
        assert_recovers_live_state(directory.path(), &core, &context);
    });
}

// 8. Locks and leases ------------------------------------------------------------------------------

/// Takes lock `name` for `lease` without waiting; the token.
fn take_lock(shard: &mut Shard, name: &str, lease: u64) -> u64 {
    match shard.lock(name.as_bytes(), lease, 0) {
        LockStep::Done(Response::Locked {
            acquired: true,
            token,
        }) => token,
        other => panic!("lock {name:?} for {lease}: {other:?}"),
    }
}

fn grant_lease(shard: &mut Shard, now_ms: u64, ttl_ms: u64) -> u64 {
    match apply(shard, now_ms, &Request::LeaseGrant { ttl_ms }) {
        Response::LeaseGranted { id, .. } => id,
        other => panic!("grant answered {other:?}"),
    }
}

/// A snapshot holds every lock the shard remembers: its holder (lease and token) or none,
/// and its last token, so that after a load a fence still refuses a token older than the
/// last grant. Waits are left out (their requests do not survive a restart). The leases
/// and the keys attached to them come back beside the locks, each lease with a full TTL
/// from the loading shard's monotonic time, and a lease's end still releases its locks.
#[test]
fn a_snapshot_brings_back_locks_with_their_leases() {
    let directory = TestDir::new("locks");
    run_on_executor(async {
        let now_ms = now_unix_ms();
        let mut live = Shard::new(shard_config(CORE_ID), now_ms);
        live.set_monotonic_ms(1_000);
        let first = grant_lease(&mut live, now_ms, HOUR_MS);
        let second = grant_lease(&mut live, now_ms, 2 * HOUR_MS);
        let stale = take_lock(&mut live, "x", first);
        assert!(live.unlock(b"x", stale));
        let x_token = take_lock(&mut live, "x", second);
        let y_token = take_lock(&mut live, "y", first);
        let z_token = take_lock(&mut live, "z", first);
        assert!(live.unlock(b"z", z_token));
        assert!(matches!(
            live.lock(b"y", second, 60_000),
            LockStep::Queued(_)
        ));
        let attach = Request::Put(Box::new(Put {
            lease: Some(first),
            ..Put::new("k", "v")
        }));
        assert!(matches!(
            apply(&mut live, now_ms, &attach),
            Response::Put { applied: true, .. }
        ));
        live.check_invariants();
        let revision = live.revision();
        let shard = RefCell::new(live);
        let log = CoreLog::new(Durability::Sync, revision);
        let written = write_snapshot(&GlommioStorage, directory.path(), CORE_ID, &shard, &log)
            .await
            .unwrap();

        let mut loaded = new_shard(now_ms);
        let loaded_mono_ms = 9_000_000;
        loaded.set_monotonic_ms(loaded_mono_ms);
        load_snapshot(&written.path, CORE_ID, &mut loaded, now_ms).unwrap();
        loaded.restore_revision(written.end_revision);
        loaded.check_invariants();
        let lock_of = |shard: &Shard, name: &str| {
            let holder = shard
                .locks()
                .holder(name.as_bytes())
                .map(|holder| (holder.lease, holder.token));
            (holder, shard.locks().last_token(name.as_bytes()))
        };
        assert_eq!(lock_of(&loaded, "x"), (Some((second, x_token)), x_token));
        assert_eq!(lock_of(&loaded, "y"), (Some((first, y_token)), y_token));
        assert_eq!(lock_of(&loaded, "z"), (None, z_token));
        assert_eq!(loaded.locks().entries().count(), 3);
        assert_eq!(
            loaded.locks().waiter_count(),
            0,
            "waits are not snapshotted"
        );
        let mut leases: Vec<(u64, u64)> = loaded.leases().home_leases().collect();
        leases.sort_unstable();
        assert_eq!(leases, vec![(first, HOUR_MS), (second, 2 * HOUR_MS)]);
        assert_eq!(loaded.leases().lease_of(b"k"), Some(first));
        assert_eq!(loaded.journal_len(), 0, "nothing was journaled");

        // A fence reads the loaded last token.
        let fenced = |token: u64| {
            Request::Txn(Box::new(
                Txn::new()
                    .when([Compare::fence("x", token)])
                    .then([TxnOp::put("w", "fenced")]),
            ))
        };
        let succeeded = |response: Response| match response {
            Response::Txn(outcome) => outcome.succeeded,
            other => panic!("a transaction answered {other:?}"),
        };
        assert!(!succeeded(apply(&mut loaded, now_ms, &fenced(stale))));
        assert!(succeeded(apply(&mut loaded, now_ms, &fenced(x_token))));

        // The holders keep their locks until their leases end, a full TTL after the load.
        loaded.set_monotonic_ms(loaded_mono_ms + HOUR_MS - 1);
        loaded.tick(now_ms);
        assert_eq!(lock_of(&loaded, "y"), (Some((first, y_token)), y_token));
        loaded.set_monotonic_ms(loaded_mono_ms + HOUR_MS);
        loaded.tick(now_ms);
        loaded.check_invariants();
        assert_eq!(loaded.take_ended_leases(), vec![(first, true)]);
        assert_eq!(lock_of(&loaded, "y"), (None, y_token));
        assert_eq!(lock_of(&loaded, "x"), (Some((second, x_token)), x_token));
        let next = take_lock(&mut loaded, "y", second);
        assert_eq!(next, loaded.revision(), "a grant's token is its revision");
        assert!(next > x_token, "token {next} after {x_token}");
    });
}

// 8. Fields and indexes -------------------------------------------------------------------------

/// The page `query` gets from `shard`, with a budget that never runs out.
fn query_page(shard: &Shard, now_ms: u64, query: &QueryRequest) -> QueryPage {
    let mut time_left = || true;
    let mut budget = QueryBudget {
        time_left: &mut time_left,
        time_budget_ms: 1_000,
        sort_items_max: 10_000,
    };
    match shard.query(now_ms, query, &mut budget) {
        Response::Query(page) => *page,
        other => panic!("{query:?} was answered {other:?}"),
    }
}

fn create_index(shard: &mut Shard, now_ms: u64, name: &str, prefix: &str, field: &str) {
    let spec = IndexSpec {
        name: name.to_owned(),
        prefix: prefix.as_bytes().to_vec(),
        field: field.to_owned(),
        kind: IndexKind::Range,
    };
    let response = apply(shard, now_ms, &Request::CreateIndex(Box::new(spec)));
    assert_eq!(response, Response::IndexCreated { created: true });
}

/// A snapshot holds each entry's fields and every index definition. Loading it files the
/// loaded entries in each index, a built one and one whose build had not finished alike, so
/// every index is ready and answers queries exactly as the live shard did (once its own
/// build finished).
#[test]
fn a_snapshot_brings_back_fields_and_indexes_that_answer_queries_as_before() {
    let directory = TestDir::new("indexes");
    run_on_executor(async {
        let now_ms = now_unix_ms();
        let mut live = new_shard(now_ms);
        for index in 0..300_u64 {
            let mut fields = vec![Field::new(
                "age",
                FieldValue::I64(i64::try_from(index % 50).unwrap()),
            )];
            if index % 3 == 0 {
                fields.push(Field::new(
                    "city",
                    FieldValue::Str(format!("city-{}", index % 7)),
                ));
            }
            // Some expire before the snapshot: neither they nor their fields come back.
            let ttl_ms = (index % 10 == 0).then_some(1);
            let request = Request::Put(Box::new(Put {
                ttl_ms,
                fields,
                ..Put::new(format!("key-{index:03}"), "v")
            }));
            apply(&mut live, now_ms - 1_000, &request);
        }
        create_index(&mut live, now_ms, "age", "", "age");
        while live.build_indexes(64) {}
        create_index(&mut live, now_ms, "city", "key-1", "city");
        assert!(live.build_indexes(10), "the city index is still building");
        live.check_invariants();
        let at_snapshot = contents(&live, now_ms);
        assert!(at_snapshot.len() < live.key_count(), "some expired");
        let revision = live.revision();
        let shard = RefCell::new(live);
        let log = CoreLog::new(Durability::Sync, revision);
        let written = write_snapshot(&GlommioStorage, directory.path(), CORE_ID, &shard, &log)
            .await
            .unwrap();

        let mut loaded = new_shard(now_ms);
        load_snapshot(&written.path, CORE_ID, &mut loaded, now_ms).unwrap();
        loaded.restore_revision(written.end_revision);
        loaded.check_invariants();
        assert_same_contents(&contents(&loaded, now_ms), &at_snapshot, "loaded");
        let mut live = shard.into_inner();
        assert_eq!(index_specs(&loaded), index_specs(&live));
        let states: Vec<IndexState> = loaded
            .indexes()
            .iter()
            .map(|index| index.info().state)
            .collect();
        assert_eq!(states, [IndexState::Ready, IndexState::Ready]);
        while live.build_indexes(64) {}
        let entries = |shard: &Shard| -> Vec<u64> {
            shard
                .indexes()
                .iter()
                .map(|index| index.info().entries)
                .collect()
        };
        // The live shard's index still files the expired entries its tick has not reclaimed.
        live.tick(now_ms);
        assert_eq!(entries(&loaded), entries(&live));

        for text in [
            "age = 7",
            "age >= 10 and age < 13",
            r#"city = "city-3""#,
            r#"city prefix "city-" and age > 40"#,
            "not age exists",
        ] {
            for prefix in ["", "key-1", "key-10"] {
                let query = QueryRequest::new(prefix, Some(parse_query(text).unwrap()), 1_000);
                let from_live = query_page(&live, now_ms, &query);
                let from_loaded = query_page(&loaded, now_ms, &query);
                assert_eq!(
                    from_loaded.items, from_live.items,
                    "{text} under {prefix:?}"
                );
                assert_eq!(
                    from_loaded.plan.access, from_live.plan.access,
                    "{text} under {prefix:?}"
                );
            }
        }
        // The loaded indexes are used.
        let by_city = QueryRequest::new(
            "key-1",
            Some(parse_query(r#"city = "city-3""#).unwrap()),
            1_000,
        );
        let page = query_page(&loaded, now_ms, &by_city);
        assert!(
            matches!(&page.plan.access, QueryAccess::Index { name, .. } if name == "city"),
            "{:?}",
            page.plan
        );
        assert!(!page.items.is_empty());
        assert!(page.items.iter().all(|item| {
            item.entry
                .as_ref()
                .is_some_and(|entry| entry.fields.iter().any(|field| field.name == "city"))
        }));
    });
}
