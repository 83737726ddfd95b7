//! A shard's watches: the recent history of its changes, and the watchers that follow them.
//!
//! Sans-I/O like the rest of the shard: the shard [`WatchHub::publish`]es the events of each
//! revision it applies, and whoever serves a watcher [`WatchHub::take`]s what is queued for it.
//! Nothing here reads a clock or awaits.
//!
//! **Guarantees** (per shard; there is no order across shards, `docs/semantics.md`):
//! - A watcher receives the events of its range in revision order, each exactly once, and all
//!   the matching events of one revision in one [`Batch`].
//! - Resuming after revision `R` replays every matching event after `R` from the history, or
//!   refuses with [`WatchError::Compacted`] when the history no longer reaches back to `R`:
//!   never a silent gap.
//! - A watcher whose queue would pass its byte bound is cancelled with
//!   [`Cancelled::Lagged`], reporting the last revision it was handed, instead of buffering
//!   without limit. Its queue is dropped at once. An empty queue takes any one revision, and
//!   a resume's replay is bounded by the history, not the queue, so a watcher can always
//!   resume from where it was cancelled while the history still holds it.
//!
//! **Limits**: the history holds at most `history_events_max` events and
//! `history_bytes_max` bytes, dropping whole revisions, oldest first; a hub holds at most
//! `watchers_max` watchers; each watcher queues at most `queue_bytes_max` bytes, and all of
//! them together `queue_total_bytes_max` (past it, the watcher with the longest queue is
//! cancelled as lagging).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;
use std::rc::Rc;

use tessera_protocol::Query;

/// Identifies a watcher within its hub.
pub type WatchId = u64;

/// Why a key stopped existing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeleteCause {
    /// A delete request.
    Deleted,
    /// Its TTL passed.
    Expired,
    /// Its lease ended: revoked, or expired.
    LeaseEnded {
        /// The lease.
        lease: u64,
        /// Whether it expired (else it was revoked).
        expired: bool,
    },
}

/// What happened to a key, without the bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// The key now holds the event's value (created if `version` is 1).
    Put {
        /// The revision that created the key.
        create_revision: u64,
        /// Writes since the key was created, this one included.
        version: u64,
    },
    /// The key no longer exists.
    Delete(DeleteCause),
    /// Only in what a watcher with a query is handed: the key was written and left the
    /// query's result set (the event was recorded as a `Put`).
    Left {
        /// The revision that created the key.
        create_revision: u64,
        /// Writes since the key was created, this one included.
        version: u64,
    },
}

/// One change to one key at one revision. The key, the new value (puts), the previous
/// value and both versions of the key's fields blob share one allocation: every write makes
/// an event, so it costs one allocation.
#[derive(Clone, PartialEq, Eq)]
pub struct Event {
    /// The shard revision of the change.
    pub revision: u64,
    /// What happened.
    pub change: Change,
    key_len: u32,
    value_len: u32,
    previous_len: Option<u32>,
    fields_len: u32,
    previous_fields_len: u32,
    /// The key, the value, the previous value, the fields, the previous fields.
    bytes: Box<[u8]>,
}

/// What a key held before an event: its value and its fields blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Before<'a> {
    /// The value.
    pub value: &'a [u8],
    /// The fields blob (`shard::fields`).
    pub fields: &'a [u8],
}

impl fmt::Debug for Event {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("Event")
            .field("revision", &self.revision)
            .field("key", &String::from_utf8_lossy(self.key()))
            .field("change", &self.change)
            .field("value_len", &self.value_len)
            .field("previous_len", &self.previous_len)
            .finish_non_exhaustive()
    }
}

/// A length that fits an event's `u32` fields (keys and values are far smaller).
fn length(bytes: &[u8]) -> u32 {
    u32::try_from(bytes.len()).unwrap_or(u32::MAX)
}

impl Event {
    /// `key` was written with `value` at `revision`; it held `previous` before, if anything.
    /// Neither has fields.
    pub fn put(
        revision: u64,
        key: &[u8],
        value: &[u8],
        create_revision: u64,
        version: u64,
        previous: Option<&[u8]>,
    ) -> Self {
        let previous = previous.map(|value| Before { value, fields: &[] });
        Self::put_with_fields(
            revision,
            key,
            value,
            &[],
            create_revision,
            version,
            previous,
        )
    }

    /// `key` was written with `value` and the fields blob `fields` at `revision`; it held
    /// `previous` before, if anything.
    pub fn put_with_fields(
        revision: u64,
        key: &[u8],
        value: &[u8],
        fields: &[u8],
        create_revision: u64,
        version: u64,
        previous: Option<Before<'_>>,
    ) -> Self {
        let change = Change::Put {
            create_revision,
            version,
        };
        Self::new(revision, change, key, value, fields, previous)
    }

    /// `key`, which held `previous` (without fields), stopped existing at `revision`.
    pub fn delete(revision: u64, key: &[u8], cause: DeleteCause, previous: Option<&[u8]>) -> Self {
        let previous = previous.map(|value| Before { value, fields: &[] });
        Self::delete_with_fields(revision, key, cause, previous)
    }

    /// `key`, which held `previous`, stopped existing at `revision`.
    pub fn delete_with_fields(
        revision: u64,
        key: &[u8],
        cause: DeleteCause,
        previous: Option<Before<'_>>,
    ) -> Self {
        Self::new(revision, Change::Delete(cause), key, &[], &[], previous)
    }

    fn new(
        revision: u64,
        change: Change,
        key: &[u8],
        value: &[u8],
        fields: &[u8],
        previous: Option<Before<'_>>,
    ) -> Self {
        let (previous_value, previous_fields) =
            previous.map_or((&[][..], &[][..]), |before| (before.value, before.fields));
        let mut bytes = Vec::with_capacity(
            key.len() + value.len() + previous_value.len() + fields.len() + previous_fields.len(),
        );
        bytes.extend_from_slice(key);
        bytes.extend_from_slice(value);
        bytes.extend_from_slice(previous_value);
        bytes.extend_from_slice(fields);
        bytes.extend_from_slice(previous_fields);
        Self {
            revision,
            change,
            key_len: length(key),
            value_len: length(value),
            previous_len: previous.map(|before| length(before.value)),
            fields_len: length(fields),
            previous_fields_len: length(previous_fields),
            bytes: bytes.into_boxed_slice(),
        }
    }

    /// The key's fields blob after a put (empty otherwise, and without fields).
    pub fn fields(&self) -> &[u8] {
        let start = (self.key_len + self.value_len + self.previous_len.unwrap_or(0)) as usize;
        &self.bytes[start..start + self.fields_len as usize]
    }

    /// The key's fields blob before the change, if it existed and the previous value was
    /// kept.
    pub fn previous_fields(&self) -> Option<&[u8]> {
        let start =
            (self.key_len + self.value_len + self.previous_len.unwrap_or(0) + self.fields_len)
                as usize;
        self.previous_len
            .map(|_| &self.bytes[start..start + self.previous_fields_len as usize])
    }

    /// The key.
    pub fn key(&self) -> &[u8] {
        &self.bytes[..self.key_len as usize]
    }

    /// The new value, for a put.
    pub fn value(&self) -> Option<&[u8]> {
        let start = self.key_len as usize;
        match self.change {
            Change::Put { .. } | Change::Left { .. } => {
                Some(&self.bytes[start..start + self.value_len as usize])
            }
            Change::Delete(_) => None,
        }
    }

    /// The value the key held before, if it existed (and was kept).
    pub fn previous(&self) -> Option<&[u8]> {
        let start = (self.key_len + self.value_len) as usize;
        self.previous_len
            .map(|previous_len| &self.bytes[start..start + previous_len as usize])
    }

    /// The same event without its previous value (and fields), as `change`.
    #[must_use]
    fn shaped_as(&self, change: Change, keep_previous: bool) -> Self {
        let previous = if keep_previous {
            self.previous().map(|value| Before {
                value,
                fields: self.previous_fields().unwrap_or_default(),
            })
        } else {
            None
        };
        Self::new(
            self.revision,
            change,
            self.key(),
            self.value().unwrap_or(&[]),
            self.fields(),
            previous,
        )
    }

    /// The same event without its previous value.
    #[must_use]
    pub fn without_previous(&self) -> Self {
        self.shaped_as(self.change, false)
    }

    /// Bytes the event is charged in the history and in queues: its key, values and a fixed
    /// share for the structure.
    pub fn cost(&self) -> usize {
        EVENT_OVERHEAD_BYTES + self.bytes.len()
    }

    fn is_put(&self) -> bool {
        matches!(self.change, Change::Put { .. })
    }
}

/// Bytes an event costs beyond its key and values.
pub const EVENT_OVERHEAD_BYTES: usize = 64;

/// The events of one revision that one watcher asked for, delivered together.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// The revision.
    pub revision: u64,
    /// Its matching events, in the order the shard applied them.
    pub events: Vec<Event>,
}

/// Which keys and changes a watcher follows.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct WatchSpec {
    /// First key (inclusive).
    pub start: Box<[u8]>,
    /// End (exclusive); `None` for no end.
    pub end: Option<Box<[u8]>>,
    /// Deliver puts.
    pub puts: bool,
    /// Deliver deletes.
    pub deletes: bool,
    /// Keep events' previous values (dropped otherwise, to save queue bytes).
    pub previous: bool,
    /// Follow this predicate's result set over the keys' fields (`Watch::query`).
    pub query: Option<Query>,
}

impl WatchSpec {
    /// The event as this watcher is handed it, or `None` if it does not follow it.
    fn admit(&self, event: &Event) -> Option<Event> {
        let key = event.key();
        if key < &*self.start || self.end.as_deref().is_some_and(|end| key >= end) {
            return None;
        }
        let change = match &self.query {
            None if event.is_put() => self.puts.then_some(event.change),
            None => self.deletes.then_some(event.change),
            Some(query) => {
                let before = event
                    .previous_fields()
                    .is_some_and(|fields| fields_match(query, fields));
                let after = event.is_put() && fields_match(query, event.fields());
                match (before, after, event.change) {
                    // Entering the result set, or changing in it.
                    (_, true, change) => self.puts.then_some(change),
                    (
                        true,
                        false,
                        Change::Put {
                            create_revision,
                            version,
                        },
                    ) => self.deletes.then_some(Change::Left {
                        create_revision,
                        version,
                    }),
                    (true, false, change) => self.deletes.then_some(change),
                    (false, false, _) => None,
                }
            }
        }?;
        if change == event.change && self.previous {
            Some(event.clone())
        } else {
            Some(event.shaped_as(change, self.previous))
        }
    }
}

/// Whether a fields blob matches `query`.
pub fn fields_match(query: &Query, blob: &[u8]) -> bool {
    let values = super::fields::values(blob);
    query.matches(|name| super::fields::value_in(&values, name))
}

/// Where a new watcher starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// With the next revision applied.
    Now,
    /// With the first revision after this one, replayed from the history.
    After(u64),
}

/// Why a watcher was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchError {
    /// The history no longer holds every event after the revision asked for.
    Compacted {
        /// The oldest revision a watcher can resume after.
        oldest_available: u64,
    },
    /// The hub already has `watchers_max` watchers.
    TooManyWatchers {
        /// The limit.
        watchers_max: usize,
    },
    /// The revision asked for is past the shard's.
    FutureRevision {
        /// The shard's revision.
        revision: u64,
    },
    /// A resume's replay would take the shard's queued events past `queue_total_bytes_max`.
    QueuesFull {
        /// The limit.
        queue_total_bytes_max: usize,
    },
    /// A snapshot of the range would hold more than `keys_max` keys or `bytes_max` bytes.
    SnapshotTooLarge {
        /// The most keys a snapshot holds.
        keys_max: usize,
        /// The most bytes of keys and values a snapshot holds.
        bytes_max: usize,
    },
}

impl fmt::Display for WatchError {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Compacted { oldest_available } => write!(
                formatter,
                "the history is compacted: the oldest revision to resume after is {oldest_available}"
            ),
            Self::TooManyWatchers { watchers_max } => {
                write!(formatter, "the shard already has {watchers_max} watchers")
            }
            Self::QueuesFull {
                queue_total_bytes_max,
            } => write!(
                formatter,
                "replaying the history would take the shard's queued events past \
                 {queue_total_bytes_max} bytes; try again once watchers have caught up"
            ),
            Self::FutureRevision { revision } => write!(
                formatter,
                "the shard is at revision {revision}: cannot resume after a later one"
            ),
            Self::SnapshotTooLarge {
                keys_max,
                bytes_max,
            } => write!(
                formatter,
                "the range holds more than {keys_max} keys or {bytes_max} bytes, too much for \
                 one snapshot: scan it in pages and watch from the first page's revision"
            ),
        }
    }
}

/// Why a watcher stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cancelled {
    /// Its queue passed its byte bound. `last_delivered` is the last revision it was handed:
    /// resume after it (or take a new snapshot).
    Lagged {
        /// The last revision it was handed.
        last_delivered: u64,
    },
}

/// The hub's limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WatchLimits {
    /// Most events the history holds.
    pub history_events_max: usize,
    /// Most bytes of events the history holds.
    pub history_bytes_max: usize,
    /// Most watchers.
    pub watchers_max: usize,
    /// Most bytes one watcher may have queued.
    pub queue_bytes_max: usize,
    /// Most bytes all watchers together may have queued.
    pub queue_total_bytes_max: usize,
}

impl Default for WatchLimits {
    /// 1024 events and 4 MiB of history, 10 000 watchers, 1 MiB queued per watcher and
    /// 64 MiB for all of them. Every
    /// write adds to the history, and a longer one costs more cache: about 3% of SET
    /// throughput in memory mode at 1024 events, 8% at 40 000 (`docs/benchmarks.md`).
    fn default() -> Self {
        Self {
            history_events_max: 1_024,
            history_bytes_max: 4 * 1024 * 1024,
            watchers_max: 10_000,
            queue_bytes_max: 1024 * 1024,
            queue_total_bytes_max: 64 * 1024 * 1024,
        }
    }
}

#[derive(Debug)]
struct Watcher {
    spec: WatchSpec,
    /// Watchers with equal specs share one id, and each publish builds their batch once.
    spec_id: u64,
    /// Batches, shared with the watchers of the same spec.
    queue: VecDeque<Rc<Batch>>,
    queue_bytes: usize,
    /// The last revision handed out by `take`.
    last_delivered: u64,
    cancelled: Option<Cancelled>,
    /// Bytes of a resume's replay still queued (at the front). They do not count against
    /// `queue_bytes_max`: the replay is bounded by the history, and counting it would cancel
    /// a resume whose backlog passes the bound before it could be drained.
    replay_bytes: usize,
}

impl Watcher {
    /// Cancels the watcher as lagging and drops its queue at once.
    fn cancel_lagged(&mut self) {
        self.cancelled = Some(Cancelled::Lagged {
            last_delivered: self.last_delivered,
        });
        self.queue.clear();
        self.queue_bytes = 0;
        self.replay_bytes = 0;
    }
}

/// Bytes of one chunk of the history: events are copied into chunks back to back, and a
/// chunk is freed whole once every event in it has been dropped, so recording an event
/// allocates and frees nothing of its own (freeing each old event one by one missed cache
/// and cost 9% of a core at 10 000 events, `docs/benchmarks.md`).
const HISTORY_CHUNK_BYTES: usize = 64 * 1024;

/// One event held in the history: its fixed fields, and where its bytes are.
#[derive(Debug, Clone, Copy)]
struct Recorded {
    revision: u64,
    change: Change,
    key_len: u32,
    value_len: u32,
    previous_len: Option<u32>,
    fields_len: u32,
    previous_fields_len: u32,
    /// Sequence number of the chunk holding its bytes.
    chunk: u64,
    /// Where they start in it.
    offset: usize,
    /// How many there are.
    len: usize,
}

/// Recent events, oldest first, their bytes in chunks.
#[derive(Debug, Default)]
struct History {
    recorded: VecDeque<Recorded>,
    chunks: VecDeque<Vec<u8>>,
    /// Sequence number of `chunks[0]`.
    first_chunk: u64,
    /// Bytes charged for the events held ([`Event::cost`]).
    bytes: usize,
}

impl History {
    fn len(&self) -> usize {
        self.recorded.len()
    }

    fn clear(&mut self) {
        self.first_chunk += self.chunks.len() as u64;
        self.recorded.clear();
        self.chunks.clear();
        self.bytes = 0;
    }

    fn push(&mut self, event: &Event) {
        let len = event.bytes.len();
        let has_room = self
            .chunks
            .back()
            .is_some_and(|chunk| chunk.capacity() - chunk.len() >= len);
        if !has_room {
            self.chunks
                .push_back(Vec::with_capacity(HISTORY_CHUNK_BYTES.max(len)));
        }
        let chunk = self.first_chunk + self.chunks.len() as u64 - 1;
        let Some(bytes) = self.chunks.back_mut() else {
            return;
        };
        let offset = bytes.len();
        bytes.extend_from_slice(&event.bytes);
        self.recorded.push_back(Recorded {
            revision: event.revision,
            change: event.change,
            key_len: event.key_len,
            value_len: event.value_len,
            previous_len: event.previous_len,
            fields_len: event.fields_len,
            previous_fields_len: event.previous_fields_len,
            chunk,
            offset,
            len,
        });
        self.bytes += event.cost();
    }

    fn front_revision(&self) -> Option<u64> {
        self.recorded.front().map(|recorded| recorded.revision)
    }

    /// Drops the oldest event, and its chunk once nothing else is in it.
    fn pop_front(&mut self) {
        let Some(recorded) = self.recorded.pop_front() else {
            return;
        };
        self.bytes -= EVENT_OVERHEAD_BYTES + recorded.len;
        let still_used = self.recorded.front().map_or(u64::MAX, |next| next.chunk);
        while self.first_chunk < still_used.min(self.first_chunk + self.chunks.len() as u64) {
            // With no event left, the last chunk goes too: it would be the next to fill, but
            // a fresh one costs one allocation and keeps the bookkeeping simple.
            self.chunks.pop_front();
            self.first_chunk += 1;
        }
    }

    /// The events after `revision`, rebuilt from their bytes.
    fn events_after(&self, revision: u64) -> Vec<Event> {
        let first = self
            .recorded
            .partition_point(|recorded| recorded.revision <= revision);
        self.recorded
            .range(first..)
            .filter_map(|recorded| {
                let index = usize::try_from(recorded.chunk - self.first_chunk).ok()?;
                let bytes = self
                    .chunks
                    .get(index)
                    .and_then(|chunk| chunk.get(recorded.offset..recorded.offset + recorded.len));
                // Every event's bytes stay until it is dropped: a miss would be a silent gap.
                debug_assert!(bytes.is_some(), "history event {recorded:?} has no bytes");
                let bytes = bytes?;
                Some(Event {
                    revision: recorded.revision,
                    change: recorded.change,
                    key_len: recorded.key_len,
                    value_len: recorded.value_len,
                    previous_len: recorded.previous_len,
                    fields_len: recorded.fields_len,
                    previous_fields_len: recorded.previous_fields_len,
                    bytes: Box::from(bytes),
                })
            })
            .collect()
    }
}

/// A shard's history and watchers.
#[derive(Debug)]
pub struct WatchHub {
    limits: WatchLimits,
    /// Recent events, oldest first, whole revisions only.
    history: History,
    /// Every event after this revision is in `history` (events at or before it may be gone).
    compacted_through: u64,
    /// The revision of the last event published (or the shard's revision when it started).
    revision: u64,
    watchers: BTreeMap<WatchId, Watcher>,
    next_id: WatchId,
    /// Bytes queued across all watchers.
    queued_bytes: usize,
    /// Revisions published so far: tells whoever delivers that there may be more to take.
    published_count: u64,
    /// Watchers cancelled as `Lagged` so far (their own queue or all queues together past
    /// the bound), for metrics.
    lagged_count: u64,
    /// The distinct specs of the watchers: id and how many watchers have it.
    specs: HashMap<WatchSpec, (u64, usize)>,
    next_spec_id: u64,
    /// A publish's batch per spec id (cleared after each publish; kept for its capacity).
    batches: HashMap<u64, Option<Rc<Batch>>>,
}

impl WatchHub {
    /// A hub for a shard at `revision`, with no history before it.
    pub fn new(limits: WatchLimits, revision: u64) -> Self {
        Self {
            limits,
            history: History::default(),
            compacted_through: revision,
            revision,
            watchers: BTreeMap::new(),
            next_id: 1,
            queued_bytes: 0,
            published_count: 0,
            lagged_count: 0,
            specs: HashMap::new(),
            next_spec_id: 0,
            batches: HashMap::new(),
        }
    }

    /// Starts over at `revision` with no history (after recovery: the events before it are
    /// not kept, so no watcher can resume before it). Watchers are kept.
    pub fn restart_at(&mut self, revision: u64) {
        self.history.clear();
        self.compacted_through = revision;
        self.revision = revision;
    }

    /// The oldest revision a watcher can resume after.
    pub fn oldest_available(&self) -> u64 {
        self.compacted_through
    }

    /// Watchers registered (cancelled ones included until they are removed).
    pub fn watcher_count(&self) -> usize {
        self.watchers.len()
    }

    /// Revisions with events published so far. When it changes, watchers may have events
    /// to take.
    pub fn published_count(&self) -> u64 {
        self.published_count
    }

    /// Watchers cancelled as `Lagged` since the hub started.
    pub fn lagged_count(&self) -> u64 {
        self.lagged_count
    }

    /// Bytes queued across all watchers.
    pub fn queued_bytes(&self) -> usize {
        self.queued_bytes
    }

    /// The revision of the last event published, or of the shard when the hub started.
    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// Registers a watcher. With [`Start::After`], every matching event after that revision
    /// is queued at once from the history.
    ///
    /// # Errors
    /// See [`WatchError`]; nothing is registered.
    pub fn watch(&mut self, spec: WatchSpec, start: Start) -> Result<WatchId, WatchError> {
        if self.watchers.len() >= self.limits.watchers_max {
            return Err(WatchError::TooManyWatchers {
                watchers_max: self.limits.watchers_max,
            });
        }
        let after = match start {
            Start::Now => self.revision,
            Start::After(revision) if revision > self.revision => {
                return Err(WatchError::FutureRevision {
                    revision: self.revision,
                })
            }
            Start::After(revision) if revision < self.compacted_through => {
                return Err(WatchError::Compacted {
                    oldest_available: self.compacted_through,
                })
            }
            Start::After(revision) => revision,
        };
        let mut watcher = Watcher {
            spec,
            spec_id: 0,
            queue: VecDeque::new(),
            queue_bytes: 0,
            last_delivered: after,
            cancelled: None,
            replay_bytes: 0,
        };
        let replayed = self.history.events_after(after);
        let mut index = 0;
        while index < replayed.len() {
            let revision = replayed[index].revision;
            let end = index
                + replayed[index..]
                    .iter()
                    .take_while(|event| event.revision == revision)
                    .count();
            // The replay is bounded by the history, not by the queue: a resume whose backlog
            // passed the queue bound would otherwise be cancelled again on every attempt.
            if let Some(batch) = batch_for(&watcher.spec, revision, replayed[index..end].iter()) {
                enqueue(&mut watcher, Rc::new(batch), usize::MAX);
            }
            index = end;
        }
        if self.queued_bytes + watcher.queue_bytes > self.limits.queue_total_bytes_max {
            return Err(WatchError::QueuesFull {
                queue_total_bytes_max: self.limits.queue_total_bytes_max,
            });
        }
        watcher.replay_bytes = watcher.queue_bytes;
        self.queued_bytes += watcher.queue_bytes;
        watcher.spec_id = self.intern(&watcher.spec);
        let id = self.next_id;
        self.next_id += 1;
        self.watchers.insert(id, watcher);
        Ok(id)
    }

    /// Records the events of one applied `revision` (in the order applied), taking them out
    /// of `events`, and queues copies for the watchers they match. Revisions with no events
    /// need not be published.
    pub fn publish(&mut self, revision: u64, events: &mut Vec<Event>) {
        debug_assert!(
            revision > self.revision,
            "revision {revision} after {}",
            self.revision
        );
        self.revision = revision;
        self.published_count += 1;
        for watcher in self.watchers.values_mut() {
            if watcher.cancelled.is_some() {
                continue;
            }
            let batch = self
                .batches
                .entry(watcher.spec_id)
                .or_insert_with(|| batch_for(&watcher.spec, revision, events.iter()).map(Rc::new));
            let Some(batch) = batch else { continue };
            let before = watcher.queue_bytes;
            enqueue(watcher, batch.clone(), self.limits.queue_bytes_max);
            self.queued_bytes = self.queued_bytes - before + watcher.queue_bytes;
            if watcher.cancelled.is_some() {
                self.lagged_count += 1;
            }
        }
        self.batches.clear();
        for event in events.drain(..) {
            self.history.push(&event);
        }
        self.trim_history();
        self.shed_longest_queues();
    }

    /// While all queues together are over their bound, cancels the watcher with the longest
    /// queue: the slowest reader goes, not whichever was next to receive.
    fn shed_longest_queues(&mut self) {
        while self.queued_bytes > self.limits.queue_total_bytes_max {
            let Some(longest) = self
                .watchers
                .values_mut()
                .filter(|watcher| watcher.queue_bytes > 0)
                .max_by_key(|watcher| watcher.queue_bytes)
            else {
                break;
            };
            self.queued_bytes -= longest.queue_bytes;
            longest.cancel_lagged();
            self.lagged_count += 1;
        }
    }

    /// Notes that the shard reached `revision` with no event (a revision no watcher can see).
    pub fn advance(&mut self, revision: u64) {
        self.revision = self.revision.max(revision);
    }

    fn trim_history(&mut self) {
        while self.history.len() > self.limits.history_events_max
            || self.history.bytes > self.limits.history_bytes_max
        {
            // Whole revisions only, so a resume never starts in the middle of one.
            let Some(oldest) = self.history.front_revision() else {
                break;
            };
            while self.history.front_revision() == Some(oldest) {
                self.history.pop_front();
            }
            self.compacted_through = oldest;
        }
    }

    /// Hands out up to `bytes_max` bytes of `id`'s queued batches (at least one, if any is
    /// queued), oldest first; or why it was cancelled, once its queue is empty. `None` for an
    /// unknown watcher.
    pub fn take(&mut self, id: WatchId, bytes_max: usize) -> Option<Result<Vec<Batch>, Cancelled>> {
        let taken = self.take_through(id, bytes_max, u64::MAX)?;
        Some(taken.map(|batches| batches.into_iter().map(Rc::unwrap_or_clone).collect()))
    }

    /// Like [`WatchHub::take`], but only batches of revisions up to `revision_max` (those
    /// already on disk, when events wait for the log like replies do), as shared with the
    /// other watchers of the same spec: the same `Rc` for all of them.
    pub fn take_through(
        &mut self,
        id: WatchId,
        bytes_max: usize,
        revision_max: u64,
    ) -> Option<Result<Vec<Rc<Batch>>, Cancelled>> {
        let watcher = self.watchers.get_mut(&id)?;
        if let Some(cancelled) = watcher.cancelled {
            return Some(Err(cancelled));
        }
        let mut taken = Vec::new();
        let mut bytes = 0;
        while let Some(batch) = watcher.queue.front() {
            let cost = batch_cost(batch);
            if batch.revision > revision_max || (!taken.is_empty() && bytes + cost > bytes_max) {
                break;
            }
            bytes += cost;
            watcher.queue_bytes -= cost;
            watcher.replay_bytes = watcher.replay_bytes.saturating_sub(cost);
            self.queued_bytes -= cost;
            watcher.last_delivered = batch.revision;
            if let Some(batch) = watcher.queue.pop_front() {
                taken.push(batch);
            }
        }
        Some(Ok(taken))
    }

    /// The revision up to which `id` has been handed every event of its range (its progress
    /// notification): the shard's revision once its queue is empty, else the last revision
    /// handed to it. `None` for an unknown or cancelled watcher.
    pub fn progress(&self, id: WatchId) -> Option<u64> {
        let watcher = self.watchers.get(&id)?;
        if watcher.cancelled.is_some() {
            return None;
        }
        Some(if watcher.queue.is_empty() {
            self.revision
        } else {
            watcher.last_delivered
        })
    }

    /// The id of `spec`, shared by every watcher with an equal one.
    fn intern(&mut self, spec: &WatchSpec) -> u64 {
        if let Some((spec_id, count)) = self.specs.get_mut(spec) {
            *count += 1;
            return *spec_id;
        }
        let spec_id = self.next_spec_id;
        self.next_spec_id += 1;
        self.specs.insert(spec.clone(), (spec_id, 1));
        spec_id
    }

    /// Whether `id` has batches queued (or a cancellation to report).
    pub fn has_pending(&self, id: WatchId) -> bool {
        self.watchers
            .get(&id)
            .is_some_and(|watcher| watcher.cancelled.is_some() || !watcher.queue.is_empty())
    }

    /// Removes a watcher (cancelled or not). Returns whether it existed.
    pub fn unwatch(&mut self, id: WatchId) -> bool {
        match self.watchers.remove(&id) {
            Some(watcher) => {
                self.queued_bytes -= watcher.queue_bytes;
                if let Some((_, count)) = self.specs.get_mut(&watcher.spec) {
                    *count -= 1;
                    if *count == 0 {
                        self.specs.remove(&watcher.spec);
                    }
                }
                true
            }
            None => false,
        }
    }
}

fn batch_cost(batch: &Batch) -> usize {
    batch.events.iter().map(Event::cost).sum()
}

/// The events of `revision` that `spec` matches, shaped for it; `None` if there are none.
fn batch_for<'a>(
    spec: &WatchSpec,
    revision: u64,
    events: impl Iterator<Item = &'a Event>,
) -> Option<Batch> {
    let events: Vec<Event> = events.filter_map(|event| spec.admit(event)).collect();
    (!events.is_empty()).then_some(Batch { revision, events })
}

/// Queues `batch` for `watcher`, or cancels it if it would
/// take a queue already holding something past `queue_bytes_max`. An empty queue takes any
/// one batch: the bound limits a backlog, and a single revision larger than it (a batch of
/// big values) must not cancel every watcher that resumes before it.
fn enqueue(watcher: &mut Watcher, batch: Rc<Batch>, queue_bytes_max: usize) {
    if watcher.cancelled.is_some() {
        return;
    }
    let cost = batch_cost(&batch);
    let backlog = watcher.queue_bytes - watcher.replay_bytes;
    if !watcher.queue.is_empty() && backlog + cost > queue_bytes_max {
        watcher.cancel_lagged();
        return;
    }
    watcher.queue_bytes += cost;
    watcher.queue.push_back(batch);
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const LIMITS: WatchLimits = WatchLimits {
        history_events_max: 12,
        history_bytes_max: 1_500,
        watchers_max: 4,
        queue_bytes_max: 700,
        queue_total_bytes_max: 2_000,
    };

    fn key(index: u8) -> Box<[u8]> {
        Box::from(&[b'k', b'0' + index][..])
    }

    fn put_event(revision: u64, key_index: u8, value_size: usize) -> Event {
        let value = vec![b'v'; value_size];
        Event::put(revision, &key(key_index), &value, revision, 1, Some(b"old"))
    }

    fn delete_event(revision: u64, key_index: u8, cause: DeleteCause) -> Event {
        Event::delete(revision, &key(key_index), cause, None)
    }

    fn everything() -> WatchSpec {
        WatchSpec {
            start: Box::from(&b""[..]),
            end: None,
            puts: true,
            deletes: true,
            previous: true,
            query: None,
        }
    }

    fn blob(age: i64) -> Vec<u8> {
        let mut blob = Vec::new();
        crate::shard::fields::encode_owned(
            &[tessera_protocol::Field::new(
                "age",
                tessera_protocol::FieldValue::I64(age),
            )],
            &mut blob,
        );
        blob
    }

    /// A watch on `age >= 20` sees keys enter, change in and leave its result set, and
    /// nothing of keys outside it.
    #[test]
    fn a_query_watch_follows_its_result_set() {
        let mut hub = WatchHub::new(LIMITS, 0);
        let query = tessera_protocol::query::parse_query("age >= 20").unwrap();
        let spec = WatchSpec {
            query: Some(query),
            previous: false,
            ..everything()
        };
        let id = hub.watch(spec, Start::Now).unwrap();
        let (young, old, older) = (blob(10), blob(30), blob(40));
        let put = |revision, key: &[u8], fields: &[u8], before: Option<&[u8]>| {
            Event::put_with_fields(
                revision,
                key,
                b"v",
                fields,
                1,
                revision,
                before.map(|fields| Before {
                    value: b"v",
                    fields,
                }),
            )
        };
        let steps = [
            // Outside the set: nothing.
            put(1, b"a", &young, None),
            // Enters.
            put(2, b"a", &old, Some(&young)),
            // Changes in it.
            put(3, b"a", &older, Some(&old)),
            // Leaves, still existing.
            put(4, b"a", &young, Some(&older)),
            // Enters again, then is deleted while in it.
            put(5, b"a", &old, Some(&young)),
            Event::delete_with_fields(
                6,
                b"a",
                DeleteCause::Deleted,
                Some(Before {
                    value: b"v",
                    fields: &old,
                }),
            ),
            // A delete of a key outside it: nothing.
            Event::delete_with_fields(
                7,
                b"b",
                DeleteCause::Expired,
                Some(Before {
                    value: b"v",
                    fields: &young,
                }),
            ),
        ];
        for event in steps {
            let revision = event.revision;
            hub.publish(revision, &mut vec![event]);
        }
        let batches = hub.take(id, usize::MAX).unwrap().unwrap();
        let seen: Vec<(u64, Change)> = batches
            .iter()
            .flat_map(|batch| {
                batch
                    .events
                    .iter()
                    .map(|event| (event.revision, event.change))
            })
            .collect();
        let put_change = |version| Change::Put {
            create_revision: 1,
            version,
        };
        assert_eq!(
            seen,
            [
                (2, put_change(2)),
                (3, put_change(3)),
                (
                    4,
                    Change::Left {
                        create_revision: 1,
                        version: 4
                    }
                ),
                (5, put_change(5)),
                (6, Change::Delete(DeleteCause::Deleted)),
            ]
        );
        // The fields travel with the event; the previous value was not asked for.
        assert_eq!(batches[0].events[0].fields(), &old[..]);
        assert_eq!(batches[0].events[0].previous(), None);
    }

    #[test]
    fn a_watcher_gets_its_range_by_revision_and_resumes_from_the_history() {
        let mut hub = WatchHub::new(LIMITS, 10);
        let range = WatchSpec {
            start: key(2),
            end: Some(key(5)),
            previous: false,
            ..everything()
        };
        let live = hub.watch(range.clone(), Start::Now).unwrap();
        hub.publish(
            11,
            &mut vec![
                put_event(11, 1, 1),
                put_event(11, 2, 1),
                put_event(11, 4, 1),
            ],
        );
        hub.publish(12, &mut vec![put_event(12, 5, 1)]);
        hub.publish(13, &mut vec![delete_event(13, 3, DeleteCause::Expired)]);
        let batches = hub.take(live, usize::MAX).unwrap().unwrap();
        let seen: Vec<(u64, Box<[u8]>)> = batches
            .iter()
            .flat_map(|batch| {
                batch
                    .events
                    .iter()
                    .map(|event| (batch.revision, Box::from(event.key())))
            })
            .collect();
        assert_eq!(seen, [(11, key(2)), (11, key(4)), (13, key(3))]);
        assert!(batches[0]
            .events
            .iter()
            .all(|event| event.previous().is_none()));
        assert_eq!(hub.progress(live), Some(13));
        // Resuming after 11 replays 13 only; after 10, both.
        let resumed = hub.watch(range, Start::After(11)).unwrap();
        let batches = hub.take(resumed, usize::MAX).unwrap().unwrap();
        assert_eq!(batches.len(), 1);
        assert_eq!(batches[0].revision, 13);
        assert_eq!(
            hub.watch(everything(), Start::After(14)),
            Err(WatchError::FutureRevision { revision: 13 })
        );
    }

    #[test]
    fn an_old_revision_is_refused_once_the_history_dropped_it() {
        let limits = WatchLimits {
            queue_bytes_max: 1 << 20,
            ..LIMITS
        };
        let mut hub = WatchHub::new(limits, 0);
        for revision in 1..=20 {
            hub.publish(revision, &mut vec![put_event(revision, 0, 1)]);
        }
        let oldest = hub.oldest_available();
        assert_eq!(oldest, 20 - LIMITS.history_events_max as u64);
        assert_eq!(
            hub.watch(everything(), Start::After(oldest - 1)),
            Err(WatchError::Compacted {
                oldest_available: oldest
            })
        );
        let id = hub.watch(everything(), Start::After(oldest)).unwrap();
        let batches = hub.take(id, usize::MAX).unwrap().unwrap();
        let revisions: Vec<u64> = batches.iter().map(|batch| batch.revision).collect();
        assert_eq!(revisions, ((oldest + 1)..=20).collect::<Vec<_>>());
    }

    #[test]
    fn a_watcher_that_never_reads_is_cancelled_at_its_bound() {
        let mut hub = WatchHub::new(LIMITS, 0);
        let reader = hub.watch(everything(), Start::Now).unwrap();
        let idle = hub.watch(everything(), Start::Now).unwrap();
        for revision in 1..=100 {
            hub.publish(revision, &mut vec![put_event(revision, 0, 40)]);
            hub.take(reader, usize::MAX).unwrap().unwrap();
        }
        assert_eq!(
            hub.take(idle, usize::MAX),
            Some(Err(Cancelled::Lagged { last_delivered: 0 }))
        );
        assert_eq!(hub.progress(reader), Some(100));
        assert_eq!(hub.watch(everything(), Start::Now).map(|_| ()), Ok(()));
        assert!(hub.unwatch(idle));
        assert_eq!(hub.watcher_count(), 2);
    }

    /// Events of every size, a chunk's worth and more, come back exactly from the chunks,
    /// and chunks are freed as the events in them are dropped.
    #[test]
    fn the_history_rebuilds_its_events_and_frees_whole_chunks() {
        let mut history = History::default();
        let mut pushed = Vec::new();
        for revision in 1..=300_u64 {
            let size = match revision % 7 {
                0 => HISTORY_CHUNK_BYTES + 10,
                1 => 0,
                _ => usize::try_from(revision * 37 % 900).unwrap(),
            };
            let event = if revision % 5 == 0 {
                delete_event(revision, 3, DeleteCause::Expired)
            } else {
                put_event(revision, u8::try_from(revision % 6).unwrap(), size)
            };
            history.push(&event);
            pushed.push(event);
        }
        assert_eq!(history.events_after(0), pushed);
        assert_eq!(history.events_after(150), pushed[150..]);
        let charged: usize = pushed.iter().map(Event::cost).sum();
        assert_eq!(history.bytes, charged);
        for _ in 0..290 {
            history.pop_front();
        }
        assert_eq!(history.events_after(0), pushed[290..]);
        assert!(
            history.chunks.len() <= 4,
            "{} chunks for 10 events",
            history.chunks.len()
        );
        for _ in 0..10 {
            history.pop_front();
        }
        assert!(history.chunks.is_empty());
        assert_eq!(history.bytes, 0);
        history.push(&pushed[0]);
        assert_eq!(history.events_after(0), pushed[..1]);
    }

    /// Past the bound on all queues together, the watcher with the longest queue is
    /// cancelled, not the one that happened to receive next; the others keep their events.
    #[test]
    fn the_total_queue_bound_cancels_the_longest_queue() {
        let limits = WatchLimits {
            queue_bytes_max: 10_000,
            queue_total_bytes_max: 1_000,
            ..LIMITS
        };
        let mut hub = WatchHub::new(limits, 0);
        let slow = hub.watch(everything(), Start::Now).unwrap();
        let fast = hub.watch(everything(), Start::Now).unwrap();
        let mut revision = 0;
        // `fast` takes everything as it comes; `slow` never reads.
        while hub.progress(slow).is_some() {
            revision += 1;
            assert!(
                revision < 20,
                "the slow watcher is cancelled once over the bound"
            );
            hub.publish(revision, &mut vec![put_event(revision, 0, 100)]);
            assert!(hub.queued_bytes() <= limits.queue_total_bytes_max);
            let taken = hub.take(fast, usize::MAX).unwrap().unwrap();
            assert_eq!(taken.len(), 1, "the reader keeps up at revision {revision}");
        }
        let Some(Err(Cancelled::Lagged { last_delivered })) = hub.take(slow, 0) else {
            panic!("the slow watcher is cancelled as lagging");
        };
        assert_eq!(last_delivered, 0, "the slow watcher was handed nothing");
        assert_eq!(hub.queued_bytes(), 0);
        hub.publish(revision + 1, &mut vec![put_event(revision + 1, 0, 100)]);
        assert_eq!(hub.take(fast, usize::MAX).unwrap().unwrap().len(), 1);
    }

    /// A resume's backlog past the queue bound survives the next writes while it drains
    /// (found in review: the next publish cancelled it), and a replay that would pass the
    /// bound on all queues is refused instead of pinning memory.
    #[test]
    fn a_resume_backlog_drains_and_replays_respect_the_total_bound() {
        let limits = WatchLimits {
            history_events_max: 100,
            history_bytes_max: 1 << 20,
            queue_bytes_max: 700,
            queue_total_bytes_max: 3_000,
            ..LIMITS
        };
        let mut hub = WatchHub::new(limits, 0);
        for revision in 1..=10 {
            hub.publish(revision, &mut vec![put_event(revision, 0, 100)]);
        }
        let resumed = hub.watch(everything(), Start::After(0)).unwrap();
        assert!(hub.queued_bytes() > limits.queue_bytes_max);
        let first = hub.take(resumed, 1).unwrap().unwrap();
        assert_eq!(first.len(), 1);
        hub.publish(11, &mut vec![put_event(11, 0, 100)]);
        let rest = hub.take(resumed, usize::MAX).unwrap().unwrap();
        let revisions: Vec<u64> = rest.iter().map(|batch| batch.revision).collect();
        assert_eq!(revisions, (2..=11).collect::<Vec<_>>());
        // Each replay holds 10 revisions (about 1.7 KB): the second would pass 3000 bytes.
        let held = hub.watch(everything(), Start::After(1)).unwrap();
        assert_eq!(
            hub.watch(everything(), Start::After(1)),
            Err(WatchError::QueuesFull {
                queue_total_bytes_max: 3_000
            })
        );
        hub.take(held, usize::MAX).unwrap().unwrap();
        assert!(hub.watch(everything(), Start::After(1)).is_ok());
    }

    /// Batches of revisions past the limit given to `take_through` stay queued, in order.
    #[test]
    fn take_through_holds_later_revisions_back() {
        let mut hub = WatchHub::new(LIMITS, 0);
        let id = hub.watch(everything(), Start::Now).unwrap();
        for revision in 1..=3 {
            hub.publish(revision, &mut vec![put_event(revision, 0, 1)]);
        }
        let taken = hub.take_through(id, usize::MAX, 2).unwrap().unwrap();
        assert_eq!(
            taken.iter().map(|batch| batch.revision).collect::<Vec<_>>(),
            [1, 2]
        );
        assert!(hub.has_pending(id));
        assert_eq!(hub.progress(id), Some(2));
        let taken = hub.take_through(id, usize::MAX, 3).unwrap().unwrap();
        assert_eq!(
            taken.iter().map(|batch| batch.revision).collect::<Vec<_>>(),
            [3]
        );
        assert_eq!(hub.progress(id), Some(3));
        assert_eq!(hub.queued_bytes(), 0);
    }

    /// One revision larger than the queue bound still reaches a watcher with an empty queue,
    /// and a watcher cancelled as lagging resumes from the history even when the backlog
    /// passes the bound (found in review: it was cancelled again on every resume).
    #[test]
    fn a_large_revision_and_a_large_backlog_do_not_cancel_a_resume() {
        let limits = WatchLimits {
            history_events_max: 100,
            history_bytes_max: 1 << 20,
            ..LIMITS
        };
        let mut hub = WatchHub::new(limits, 0);
        let id = hub.watch(everything(), Start::Now).unwrap();
        hub.publish(1, &mut vec![put_event(1, 0, LIMITS.queue_bytes_max * 2)]);
        let batches = hub.take(id, usize::MAX).unwrap().unwrap();
        assert_eq!(batches.len(), 1);
        // An idle watcher falls behind and is cancelled; resuming replays everything after.
        let idle = hub.watch(everything(), Start::Now).unwrap();
        for revision in 2..=12 {
            hub.publish(revision, &mut vec![put_event(revision, 1, 90)]);
        }
        let Some(Err(Cancelled::Lagged { last_delivered })) = hub.take(idle, usize::MAX) else {
            panic!("the idle watcher is cancelled");
        };
        let resumed = hub
            .watch(everything(), Start::After(last_delivered))
            .unwrap();
        let batches = hub.take(resumed, usize::MAX).unwrap().unwrap();
        assert_eq!(batches.len(), 11);
    }

    // The model: every event ever published, and for each watcher the batches it must see.

    #[derive(Debug, Clone)]
    enum Step {
        Publish(Vec<(u8, bool, usize)>),
        Watch(u8, u8, u8, Option<u64>),
        Take(u8, usize),
        Unwatch(u8),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            5 => prop::collection::vec((0..6_u8, any::<bool>(), 0..120_usize), 0..4)
                .prop_map(Step::Publish),
            1 => (0..6_u8, 1..7_u8, 0..3_u8, prop::option::of(0..30_u64))
                .prop_map(|(start, width, filter, after)| Step::Watch(start, width, filter, after)),
            3 => (0..6_u8, prop_oneof![Just(usize::MAX), 0..300_usize])
                .prop_map(|(index, bytes)| Step::Take(index, bytes)),
            1 => (0..6_u8).prop_map(Step::Unwatch),
        ]
    }

    struct Followed {
        id: WatchId,
        spec: WatchSpec,
        /// What it must be handed, in order, and has not been yet.
        pending: VecDeque<Batch>,
        /// Bytes of `pending` that are still a resume's replay (exempt from the queue bound).
        replay: usize,
        last_delivered: u64,
        lagged: bool,
    }

    fn matching(spec: &WatchSpec, revision: u64, events: &[Event]) -> Option<Batch> {
        let events: Vec<Event> = events
            .iter()
            .filter_map(|event| spec.admit(event))
            .collect();
        (!events.is_empty()).then_some(Batch { revision, events })
    }

    fn queued_bytes(pending: &VecDeque<Batch>) -> usize {
        pending.iter().map(batch_cost).sum()
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

        /// Random publishes, watchers (some resuming, some never reading) and takes: each
        /// watcher is handed exactly the model's batches for its range, in order, without
        /// gaps or repeats; it is cancelled exactly when the model's queue passes the bound;
        /// and a resume is refused exactly when the history no longer covers it.
        #[test]
        fn watchers_see_exactly_the_model_stream(steps in prop::collection::vec(step(), 1..80)) {
            let mut hub = WatchHub::new(LIMITS, 0);
            let mut log: Vec<(u64, Vec<Event>)> = Vec::new();
            let mut revision = 0;
            let mut followed: Vec<Followed> = Vec::new();
            for step in steps {
                match step {
                    Step::Publish(changes) => {
                        revision += 1;
                        let events: Vec<Event> = changes
                            .iter()
                            .map(|&(key_index, is_put, size)| {
                                if is_put {
                                    put_event(revision, key_index, size)
                                } else {
                                    delete_event(revision, key_index, DeleteCause::Deleted)
                                }
                            })
                            .collect();
                        if events.is_empty() {
                            hub.advance(revision);
                            continue;
                        }
                        hub.publish(revision, &mut events.clone());
                        for watcher in followed.iter_mut().filter(|watcher| !watcher.lagged) {
                            if let Some(batch) = matching(&watcher.spec, revision, &events) {
                                let backlog = queued_bytes(&watcher.pending) - watcher.replay;
                                if !watcher.pending.is_empty() && backlog + batch_cost(&batch) > LIMITS.queue_bytes_max {
                                    watcher.lagged = true;
                                    watcher.pending.clear();
                                    watcher.replay = 0;
                                } else {
                                    watcher.pending.push_back(batch);
                                }
                            }
                        }
                        // Past the bound on all queues, the longest goes (the newest of equals).
                        loop {
                            let total: usize = followed.iter().map(|watcher| queued_bytes(&watcher.pending)).sum();
                            if total <= LIMITS.queue_total_bytes_max {
                                prop_assert_eq!(hub.queued_bytes(), total);
                                break;
                            }
                            let longest = followed
                                .iter_mut()
                                .filter(|watcher| !watcher.pending.is_empty())
                                .max_by_key(|watcher| queued_bytes(&watcher.pending));
                            let Some(longest) = longest else { break };
                            longest.lagged = true;
                            longest.pending.clear();
                            longest.replay = 0;
                        }
                        log.push((revision, events));
                    }
                    Step::Watch(start, width, filter, after) => {
                        let spec = WatchSpec {
                            start: key(start),
                            end: (start + width < 7).then(|| key(start + width)),
                            puts: filter != 1,
                            deletes: filter != 2,
                            previous: start % 2 == 0, query: None,
                        };
                        let start_at = after.map_or(Start::Now, Start::After);
                        let result = hub.watch(spec.clone(), start_at);
                        let after = after.unwrap_or(revision);
                        let history_covers = after >= hub.oldest_available();
                        match result {
                            Ok(id) => {
                                prop_assert!(after <= revision && history_covers);
                                // The replay is never cut by the queue bound.
                                let pending: VecDeque<Batch> = log
                                    .iter()
                                    .filter(|(at, _)| *at > after)
                                    .filter_map(|(at, events)| matching(&spec, *at, events))
                                    .collect();
                                let replay = queued_bytes(&pending);
                                let queued: usize = followed.iter().map(|watcher| queued_bytes(&watcher.pending)).sum();
                                prop_assert!(queued + replay <= LIMITS.queue_total_bytes_max);
                                let lagged = false;
                                followed.push(Followed { id, spec, pending, replay, last_delivered: after, lagged });
                            }
                            Err(WatchError::QueuesFull { .. }) => {
                                let replay: usize = log
                                    .iter()
                                    .filter(|(at, _)| *at > after)
                                    .filter_map(|(at, events)| matching(&spec, *at, events))
                                    .map(|batch| batch_cost(&batch))
                                    .sum();
                                let queued: usize = followed.iter().map(|watcher| queued_bytes(&watcher.pending)).sum();
                                prop_assert!(queued + replay > LIMITS.queue_total_bytes_max);
                            }
                            Err(WatchError::Compacted { oldest_available }) => {
                                prop_assert!(after < oldest_available);
                            }
                            Err(WatchError::FutureRevision { revision: at }) => {
                                prop_assert!(after > at && at == revision);
                            }
                            Err(WatchError::TooManyWatchers { .. }) => {
                                prop_assert_eq!(hub.watcher_count(), LIMITS.watchers_max);
                            }
                            Err(WatchError::SnapshotTooLarge { .. }) => {
                                prop_assert!(false, "the hub takes no snapshot");
                            }
                        }
                    }
                    Step::Take(index, bytes_max) => {
                        let Some(watcher) = followed.get_mut(usize::from(index)) else { continue };
                        match hub.take(watcher.id, bytes_max) {
                            Some(Ok(batches)) => {
                                prop_assert!(!watcher.lagged);
                                prop_assert_eq!(batches.is_empty(), watcher.pending.is_empty());
                                for batch in batches {
                                    let expected = watcher.pending.pop_front();
                                    prop_assert_eq!(Some(&batch), expected.as_ref());
                                    watcher.replay = watcher.replay.saturating_sub(batch_cost(&batch));
                                    watcher.last_delivered = batch.revision;
                                }
                            }
                            Some(Err(Cancelled::Lagged { last_delivered })) => {
                                prop_assert!(watcher.lagged);
                                prop_assert_eq!(last_delivered, watcher.last_delivered);
                            }
                            None => prop_assert!(false, "a followed watcher is unknown"),
                        }
                    }
                    Step::Unwatch(index) => {
                        if usize::from(index) < followed.len() {
                            let watcher = followed.remove(usize::from(index));
                            prop_assert!(hub.unwatch(watcher.id));
                        }
                    }
                }
            }
            // Drained, every live watcher has been handed its whole stream.
            for watcher in &mut followed {
                match hub.take(watcher.id, usize::MAX) {
                    Some(Ok(batches)) => {
                        prop_assert!(!watcher.lagged);
                        prop_assert_eq!(batches, Vec::from(std::mem::take(&mut watcher.pending)));
                        prop_assert_eq!(hub.progress(watcher.id), Some(revision));
                    }
                    Some(Err(_)) => prop_assert!(watcher.lagged),
                    None => prop_assert!(false, "a followed watcher is unknown"),
                }
            }
        }
    }
}
