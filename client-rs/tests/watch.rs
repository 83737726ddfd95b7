//! Watches through the client, written once and run twice like `behaviour.rs`: against a
//! server on loopback (`remote::*`) and against embedded shards (`embedded::*`, with the
//! `embedded` feature). A few scenarios need a TCP connection or a server restart and run
//! remotely only (`remote_*`).
//!
//! Every scenario checks the exact events a watch delivers against a [`Model`] of the writes
//! the test made, computed without the client's help: which core owns a key comes from
//! `slot_for_key` and the topology's slot ranges (`common::core_of_key`), a put's revision
//! from its reply, a delete's from the owning core's own `stats()`, and each key's
//! `create_revision` and `version` from the model's own bookkeeping. [`Delivered`] checks the
//! ordering promises on every message as it arrives: per shard, a snapshot first, then events
//! at strictly increasing revisions after it (so nothing is repeated), and progress that
//! never runs ahead of an event still to come.
//!
//! `watch()` returns only once the watch is open on every shard it covers, so a scenario
//! writes as soon as it returns: every later change is delivered
//! (`a_write_right_after_watch_returns_is_delivered` checks just that, on every shard). By
//! then `positions()` names every shard the watch covers, in topology order, at the revision
//! its watch opened at ([`opened`] checks it against the cores' own `stats()`), which is
//! where the model's expected events start. A refusal of that first open (`Compacted`,
//! `Overloaded`, an unreachable shard) is the error of `watch()` itself, at once: the first
//! open is never retried, and nothing stays open on the shards that did accept it. Only
//! later failures arrive on the stream.
//!
//! Each scenario is bounded by `common::SCENARIO_TIMEOUT` and each wait by `CALL_TIMEOUT`:
//! a hang fails the test. Nothing asserts how long anything took, except that a refused or
//! failed first open is reported within `CALL_TIMEOUT` ([`watch_within`]), shorter than the
//! default reopen backoff (about half a minute) it would take if it were retried.
//!
//! When first written, these scenarios found: a watch on a key of `KEY_SIZE_MAX` bytes was
//! refused (`key_watch_on_a_longest_key`); `positions()` named only the shards that had
//! yielded something, so a consumer that saw one shard's changes could not resume
//! (`positions_cover_every_shard_of_the_watch`); a resume refused with `MissingPosition`
//! left watchers running on the shards it did name (`a_refused_resume_starts_nothing`); and a
//! remote watch that lagged in the client's buffer was never unwatched on the server
//! (`a_stalled_watcher_lags_within_its_bound`). They also pinned down a documented
//! limitation (`docs/semantics.md`, bounded history): after a restart a shard's history
//! starts empty at its recovered revision, so a watch that was not told of its shard's last
//! revisions before the stop (they changed keys outside its range) cannot resume and ends
//! with `Compacted`, while one with periodic progress notifications, which tell it, resumes
//! (`remote_watch_across_a_restart_after_writes_outside_its_range`).

#[macro_use]
mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{core_of_key, within, DurableServer, CALL_TIMEOUT, CORE_COUNT, SCENARIO_TIMEOUT};
use futures_util::future::join_all;
use futures_util::StreamExt;
use tessera_client::{
    Client, ClientError, Entry, ErrorCode, EventKind, KeyRange, PutOptions, ScanItem, ScanOptions,
    ShardRevision, Topology, Watch, WatchEvent, WatchMessage, WatchOptions,
};
use tessera_protocol::limits::KEY_SIZE_MAX;
use tessera_protocol::RequestError;
use tessera_server::{Config, Server};

scenarios!(
    prefix_watch_sees_puts_and_deletes => default_config,
    a_write_right_after_watch_returns_is_delivered => default_config,
    key_watch_sees_only_its_key => default_config,
    key_watch_on_a_longest_key => default_config,
    ranges_and_filters_select_events => default_config,
    expiry_is_an_expired_event => default_config,
    one_multi_put_is_one_message_per_shard => default_config,
    snapshot_then_live_matches_a_final_scan => default_config,
    resume_after_positions_replays_exactly_the_rest => default_config,
    positions_cover_every_shard_of_the_watch => default_config,
    resume_before_the_history_is_compacted => short_history_config,
    a_stalled_watcher_lags_within_its_bound => small_queue_config,
    progress_on_request_and_periodically => default_config,
    watchers_per_shard_are_limited => few_watchers_config,
    invalid_watches_are_refused_locally => default_config,
    a_refused_resume_starts_nothing => default_config,
    dropping_a_watch_unregisters_it => default_config,
);

// ---------------------------------------------------------------------------------------
// Configurations.

fn default_config() -> Config {
    common::test_config(CORE_COUNT)
}

/// Events each core keeps for resumes in `short_history_config`.
const HISTORY_EVENTS_MAX: usize = 4;

fn short_history_config() -> Config {
    Config {
        watch_history_events_max: HISTORY_EVENTS_MAX,
        ..default_config()
    }
}

/// Bytes queued for one watcher before it lags, in `small_queue_config`.
const QUEUE_BYTES_MAX: u64 = 64 * 1024;

fn small_queue_config() -> Config {
    Config {
        watch_queue_bytes_max: QUEUE_BYTES_MAX,
        // The smallest write buffer allowed, so a reader that stops soon backs events up
        // into the hub's queue rather than into the buffer.
        connection_write_buffer_bytes_max: 64 * 1024,
        ..default_config()
    }
}

/// Watchers one core holds, in `few_watchers_config`.
const WATCHERS_PER_SHARD_MAX: usize = 2;

fn few_watchers_config() -> Config {
    Config {
        watchers_per_shard_max: WATCHERS_PER_SHARD_MAX,
        ..default_config()
    }
}

/// Watches one connection holds, in `remote_watchers_per_connection_are_limited`.
const WATCHERS_PER_CONNECTION_MAX: usize = 2;

// ---------------------------------------------------------------------------------------
// The model of the writes.

/// Every write the test made, as a watch should report it: each core's changes in the order
/// applied (one client writing in sequence), each key's live entry, and the event of each
/// change with its previous value (dropped again for watches that did not ask for it).
struct Model {
    topology: Topology,
    live: BTreeMap<Vec<u8>, Entry>,
    /// By core index in topology order: each change's revision and event.
    changes: Vec<Vec<(u64, WatchEvent)>>,
}

/// What one watch delivers: the range and filters of its options, after `after[core]`.
struct Filter {
    range: KeyRange,
    puts: bool,
    deletes: bool,
    previous: bool,
    after: Vec<u64>,
}

impl Filter {
    fn new(range: &KeyRange, options: &WatchOptions) -> Self {
        Self {
            range: range.clone(),
            puts: options.puts,
            deletes: options.deletes,
            previous: options.previous,
            after: vec![0; CORE_COUNT],
        }
    }

    fn after(mut self, after: Vec<u64>) -> Self {
        assert_eq!(after.len(), CORE_COUNT, "after={after:?}");
        self.after = after;
        self
    }

    fn matches(&self, revision: u64, core: usize, event: &WatchEvent) -> bool {
        let key = event.key.as_slice();
        let is_in_range = key >= self.range.start.as_slice()
            && self.range.end.as_deref().is_none_or(|end| key < end);
        let is_wanted = if matches!(event.kind, EventKind::Put { .. }) {
            self.puts
        } else {
            self.deletes
        };
        revision > self.after[core] && is_in_range && is_wanted
    }
}

/// One event as `key_watch_sees_only_its_key` spells it out: its revision, kind, value and
/// previous value.
type Seen = (u64, EventKind, Vec<u8>, Option<Vec<u8>>);

/// Messages' worth of events by core index: each revision and its events, in order.
type Batches = Vec<Vec<(u64, Vec<WatchEvent>)>>;

impl Model {
    fn new(topology: &Topology) -> Self {
        Self {
            topology: topology.clone(),
            live: BTreeMap::new(),
            changes: vec![Vec::new(); CORE_COUNT],
        }
    }

    fn core_of(&self, key: &[u8]) -> usize {
        core_of_key(&self.topology, key)
    }

    /// Puts `key` through `client` and records it; returns its revision.
    async fn put(
        &mut self,
        client: &Client,
        key: impl AsRef<[u8]>,
        value: impl AsRef<[u8]>,
    ) -> u64 {
        let (key, value) = (key.as_ref(), value.as_ref());
        let outcome = within(CALL_TIMEOUT, "put", client.put(key, value))
            .await
            .expect("put succeeds");
        assert!(outcome.applied, "an unconditional put applies");
        self.record_put(key, value, outcome.mod_revision);
        outcome.mod_revision
    }

    /// Puts every entry with one `mput` and records them; returns each entry's revision.
    async fn mput(&mut self, client: &Client, entries: &[(String, Vec<u8>)]) -> Vec<u64> {
        let revisions = within(CALL_TIMEOUT, "mput", client.mput(entries))
            .await
            .expect("mput succeeds");
        for ((key, value), revision) in entries.iter().zip(&revisions) {
            self.record_put(key.as_bytes(), value, *revision);
        }
        revisions
    }

    /// Deletes `key`, which the model holds, and records it; returns its revision, read from
    /// the owning core (only this test writes, one call at a time).
    async fn delete(&mut self, client: &Client, key: impl AsRef<[u8]>) -> u64 {
        let key = key.as_ref();
        assert!(
            self.live.contains_key(key),
            "the model deletes live keys only"
        );
        let deleted = within(CALL_TIMEOUT, "delete", client.delete(key))
            .await
            .expect("delete succeeds");
        assert!(deleted, "{:?} existed", String::from_utf8_lossy(key));
        let revision = revisions(client).await[self.core_of(key)];
        self.record_removal(key, EventKind::Deleted, revision);
        revision
    }

    /// Deletes every key with one `mdelete` and records them.
    async fn mdelete(&mut self, client: &Client, keys: &[String]) {
        let deleted = within(CALL_TIMEOUT, "mdelete", client.mdelete(keys))
            .await
            .expect("mdelete succeeds");
        assert!(deleted.iter().all(|&deleted| deleted), "{deleted:?}");
        let revisions = revisions(client).await;
        for key in keys {
            let core = self.core_of(key.as_bytes());
            self.record_removal(key.as_bytes(), EventKind::Deleted, revisions[core]);
        }
    }

    fn record_put(&mut self, key: &[u8], value: &[u8], revision: u64) {
        let previous = self.live.get(key).cloned();
        let (create_revision, version) = match &previous {
            Some(entry) => (entry.create_revision, entry.version + 1),
            None => (revision, 1),
        };
        self.live.insert(
            key.to_vec(),
            Entry {
                value: value.to_vec(),
                create_revision,
                mod_revision: revision,
                version,
                expires_at_ms: None,
                fields: Vec::new(),
            },
        );
        let core = self.core_of(key);
        let event = WatchEvent {
            key: key.to_vec(),
            kind: EventKind::Put {
                create_revision,
                version,
            },
            value: value.to_vec(),
            previous: previous.map(|entry| entry.value),
            fields: Vec::new(),
        };
        self.push(core, revision, event);
    }

    fn record_removal(&mut self, key: &[u8], kind: EventKind, revision: u64) {
        let previous = self
            .live
            .remove(key)
            .expect("the model removes live keys only");
        let event = WatchEvent {
            key: key.to_vec(),
            kind,
            value: Vec::new(),
            previous: Some(previous.value),
            fields: Vec::new(),
        };
        self.push(self.core_of(key), revision, event);
    }

    /// Records a change in revision order (an expiry may be recorded after a later write).
    fn push(&mut self, core: usize, revision: u64, event: WatchEvent) {
        let changes = &mut self.changes[core];
        let index = changes.partition_point(|(earlier, _)| *earlier <= revision);
        changes.insert(index, (revision, event));
    }

    /// The batches a watch with `filter` delivers, by core index.
    fn expected(&self, filter: &Filter) -> Batches {
        self.changes
            .iter()
            .enumerate()
            .map(|(core, changes)| {
                let mut batches: Vec<(u64, Vec<WatchEvent>)> = Vec::new();
                for (revision, event) in changes {
                    if !filter.matches(*revision, core, event) {
                        continue;
                    }
                    let mut event = event.clone();
                    if !filter.previous {
                        event.previous = None;
                    }
                    match batches.last_mut() {
                        Some((last, events)) if last == revision => events.push(event),
                        _ => batches.push((*revision, vec![event])),
                    }
                }
                batches
            })
            .collect()
    }
}

// ---------------------------------------------------------------------------------------
// What a watch delivered.

/// Everything one watch yielded, by core index, checked message by message.
#[derive(Debug)]
struct Delivered {
    /// The cores the watch covers; a message from another fails the test.
    covered: Vec<bool>,
    snapshots: Vec<Option<(u64, Vec<ScanItem>)>>,
    batches: Batches,
    /// The last progress revision of each core.
    progress: Vec<Option<u64>>,
}

impl Delivered {
    fn new(covered: Vec<bool>) -> Self {
        assert_eq!(covered.len(), CORE_COUNT);
        Self {
            covered,
            snapshots: vec![None; CORE_COUNT],
            batches: vec![Vec::new(); CORE_COUNT],
            progress: vec![None; CORE_COUNT],
        }
    }

    fn everywhere() -> Self {
        Self::new(vec![true; CORE_COUNT])
    }

    /// The revision up to which `core` has delivered everything it is known to have.
    fn floor(&self, core: usize) -> u64 {
        let snapshot = self.snapshots[core]
            .as_ref()
            .map_or(0, |(revision, _)| *revision);
        let batch = self.last_batch_revision(core).unwrap_or(0);
        snapshot.max(batch).max(self.progress[core].unwrap_or(0))
    }

    fn last_batch_revision(&self, core: usize) -> Option<u64> {
        self.batches[core].last().map(|(revision, _)| *revision)
    }

    fn event_count(&self) -> usize {
        self.batches
            .iter()
            .flatten()
            .map(|(_, events)| events.len())
            .sum()
    }

    /// Checks `message` against what came before it from its shard, and keeps it.
    fn record(&mut self, topology: &Topology, message: WatchMessage) {
        let core = core_index_of(topology, message.shard());
        assert!(
            self.covered[core],
            "a message from core index {core}, which the watch does not cover: {message:?}"
        );
        let floor = self.floor(core);
        match message {
            WatchMessage::Snapshot { shard, items } => {
                assert!(
                    self.snapshots[core].is_none(),
                    "core {core}: a second snapshot at {}",
                    shard.revision
                );
                assert!(
                    self.batches[core].is_empty(),
                    "core {core}: the snapshot comes before any event"
                );
                assert!(
                    self.progress[core].is_none(),
                    "core {core}: the snapshot comes before any progress"
                );
                self.snapshots[core] = Some((shard.revision, items));
            }
            WatchMessage::Events { shard, events } => {
                assert!(
                    shard.revision > floor,
                    "core {core}: events at revision {} after everything up to {floor} was \
                     delivered (a repeat or a late event): {events:?}",
                    shard.revision
                );
                assert!(
                    !events.is_empty(),
                    "core {core}: an empty batch at {}",
                    shard.revision
                );
                self.batches[core].push((shard.revision, events));
            }
            WatchMessage::Progress(shard) => {
                assert!(
                    shard.revision >= floor,
                    "core {core}: progress {} behind what was delivered ({floor})",
                    shard.revision
                );
                self.progress[core] = Some(shard.revision);
            }
        }
    }
}

/// The next message of `watch`, failing the test on an error, the end, or a hang.
async fn next(watch: &mut Watch) -> WatchMessage {
    within(CALL_TIMEOUT, "watch message", watch.next())
        .await
        .expect("the stream goes on")
        .expect("no error")
}

/// Reads `watch` into `delivered` until every core it covers reported progress up to at
/// least `targets[core]`: everything up to there has then been delivered. Asks for progress
/// (again whenever a core's falls short) when `ask`; otherwise waits for the watch's
/// periodic notifications.
async fn read_until_progress(
    watch: &mut Watch,
    topology: &Topology,
    delivered: &mut Delivered,
    targets: &[u64],
    ask: bool,
) {
    let is_done = |delivered: &Delivered| {
        (0..CORE_COUNT).all(|core| {
            !delivered.covered[core]
                || delivered.progress[core].is_some_and(|revision| revision >= targets[core])
        })
    };
    if ask {
        watch.request_progress();
    }
    while !is_done(delivered) {
        let message = next(watch).await;
        let is_short = match &message {
            WatchMessage::Progress(shard) => {
                shard.revision < targets[core_index_of(topology, *shard)]
            }
            _ => false,
        };
        delivered.record(topology, message);
        if ask && is_short {
            watch.request_progress();
        }
    }
}

/// Reads `watch` into `delivered`, asking for progress, until every core it covers reported
/// progress up to at least `targets[core]`.
async fn drain(watch: &mut Watch, topology: &Topology, delivered: &mut Delivered, targets: &[u64]) {
    read_until_progress(watch, topology, delivered, targets, true).await;
}

/// Reads `watch` until every core has caught up with the revisions `client` sees now, then
/// checks that it delivered exactly `expected`, batch by batch.
async fn assert_delivered_as_modelled(
    client: &Client,
    watch: &mut Watch,
    topology: &Topology,
    delivered: &mut Delivered,
    expected: &Batches,
) {
    drain(watch, topology, delivered, &revisions(client).await).await;
    assert_eq!(&delivered.batches, expected);
}

/// Each core's start as `watch.positions()` gives it (0 for a core the watch does not
/// cover), checking that it names exactly the cores `covered` names, once each, in topology
/// order: complete from the moment `watch()` returns.
fn starts(watch: &Watch, topology: &Topology, covered: &[bool]) -> Vec<u64> {
    let positions = watch.positions();
    let cores: Vec<usize> = positions
        .iter()
        .map(|shard| core_index_of(topology, *shard))
        .collect();
    let expected: Vec<usize> = (0..CORE_COUNT).filter(|&core| covered[core]).collect();
    assert_eq!(
        cores, expected,
        "positions() names every shard the watch covers, once, in topology order: {positions:?}"
    );
    let mut start = vec![0; CORE_COUNT];
    for shard in positions {
        start[core_index_of(topology, shard)] = shard.revision;
    }
    start
}

/// Checks a watch from now that `watch()` just returned, with no write under way: its
/// positions name the cores `covered` names, each at the core's current revision (where its
/// watch opened). Returns an empty [`Delivered`] for it and each core's start.
async fn opened(
    client: &Client,
    watch: &Watch,
    topology: &Topology,
    covered: Vec<bool>,
) -> (Delivered, Vec<u64>) {
    let start = starts(watch, topology, &covered);
    let current = revisions(client).await;
    for core in (0..CORE_COUNT).filter(|&core| covered[core]) {
        assert_eq!(
            start[core], current[core],
            "core {core}: a watch from now starts at its shard's revision when it opened"
        );
    }
    (Delivered::new(covered), start)
}

/// Reads exactly `count` messages of events (no snapshot or progress expected) into
/// `delivered`.
async fn read_batches(
    watch: &mut Watch,
    topology: &Topology,
    delivered: &mut Delivered,
    count: usize,
) {
    for _ in 0..count {
        let message = next(watch).await;
        assert!(
            matches!(message, WatchMessage::Events { .. }),
            "expected events, got {message:?}"
        );
        delivered.record(topology, message);
    }
}

/// The first item of `watch`, which must be an error.
async fn first_error(watch: &mut Watch) -> ClientError {
    match within(CALL_TIMEOUT, "the watch's error", watch.next()).await {
        Some(Err(error)) => error,
        Some(Ok(message)) => panic!("expected an error, got {message:?}"),
        None => panic!("the stream ended without an error"),
    }
}

/// Checks that the stream ended (after its first error).
async fn assert_ended(watch: &mut Watch) {
    let item = within(CALL_TIMEOUT, "the end of the stream", watch.next()).await;
    assert!(
        item.is_none(),
        "the stream ends after its first error: {item:?}"
    );
}

// ---------------------------------------------------------------------------------------
// Other helpers.

/// The core index (topology order) of a message's shard.
fn core_index_of(topology: &Topology, shard: ShardRevision) -> usize {
    assert_eq!(topology.nodes.len(), 1, "test clusters are one node");
    assert_eq!(topology.nodes[0].node_id, shard.node_id, "{shard:?}");
    topology.nodes[0]
        .cores
        .iter()
        .position(|core| core.core_id == shard.core_id)
        .unwrap_or_else(|| panic!("no core {} in the topology", shard.core_id))
}

/// The position of core index `core` at `revision`, as `WatchOptions::after` takes it.
fn position(topology: &Topology, core: usize, revision: u64) -> ShardRevision {
    ShardRevision {
        node_id: topology.nodes[0].node_id,
        core_id: topology.nodes[0].cores[core].core_id,
        revision,
    }
}

/// Each core's revision in topology order, from the cores themselves.
async fn revisions(client: &Client) -> Vec<u64> {
    let stats = within(CALL_TIMEOUT, "stats", client.stats())
        .await
        .expect("stats succeeds");
    assert_eq!(stats.len(), CORE_COUNT);
    stats.iter().map(|core| core.revision).collect()
}

/// Each core's watcher count in topology order.
async fn watcher_counts(client: &Client) -> Vec<u64> {
    let stats = within(CALL_TIMEOUT, "stats", client.stats())
        .await
        .expect("stats succeeds");
    stats.iter().map(|core| core.watcher_count).collect()
}

/// Waits (bounded) until the cores report exactly `expected` watchers each.
async fn wait_for_watcher_counts(client: &Client, expected: &[u64], what: &str) {
    let wait = async {
        loop {
            let counts = watcher_counts(client).await;
            if counts == expected {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    if tokio::time::timeout(Duration::from_secs(5), wait)
        .await
        .is_err()
    {
        let counts = watcher_counts(client).await;
        panic!("{what}: watcher counts stay {counts:?}, expected {expected:?}");
    }
}

/// The first `count` keys named `prefix:N` that core index `core` owns.
fn keys_on_core(topology: &Topology, core: usize, prefix: &str, count: usize) -> Vec<String> {
    // Each name lands on a given core of two with probability one half, so a search this
    // long fails only if routing is broken.
    const SEARCH_COUNT_MAX: usize = 10_000;
    let keys: Vec<String> = (0..SEARCH_COUNT_MAX)
        .map(|index| format!("{prefix}:{index}"))
        .filter(|key| core_of_key(topology, key.as_bytes()) == core)
        .take(count)
        .collect();
    assert_eq!(keys.len(), count, "{prefix} on core {core}");
    keys
}

fn key_on_core(topology: &Topology, core: usize, prefix: &str) -> String {
    keys_on_core(topology, core, prefix, 1).remove(0)
}

/// Which cores a watch on `key` alone covers: its owner only.
fn owner_only(topology: &Topology, key: &[u8]) -> Vec<bool> {
    let owner = core_of_key(topology, key);
    (0..CORE_COUNT).map(|core| core == owner).collect()
}

/// Opens a watch, failing the test if `watch()` takes longer than `CALL_TIMEOUT` to return
/// (or fail): a first open retried with the default backoff would.
async fn watch_within(
    client: &Client,
    range: KeyRange,
    options: WatchOptions,
) -> Result<Watch, ClientError> {
    within(CALL_TIMEOUT, "watch()", client.watch(&range, options)).await
}

/// Checks that `error` is an `Overloaded` refusal that names the limit `limit`.
fn assert_overloaded(error: &ClientError, limit: &str) {
    match error {
        ClientError::Server {
            code: ErrorCode::Overloaded,
            message,
        } => assert!(
            message.contains(limit),
            "the refusal names {limit}: {message:?}"
        ),
        other => panic!("expected Overloaded naming {limit}, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------
// Scenarios.

async fn prefix_watch_sees_puts_and_deletes(client: &Client) {
    client.put("w/0", "before").await.unwrap();
    let mut watch = client
        .watch(
            &KeyRange::prefix("w/"),
            WatchOptions::new().snapshot().previous(),
        )
        .await
        .unwrap();
    let mut snapshot_keys = Vec::new();
    for _ in 0..2 {
        match next(&mut watch).await {
            WatchMessage::Snapshot { items, .. } => {
                snapshot_keys.extend(items.into_iter().map(|item| item.key));
            }
            other => panic!("expected snapshots first, got {other:?}"),
        }
    }
    assert_eq!(snapshot_keys, vec![b"w/0".to_vec()]);
    client.put("w/1", "one").await.unwrap();
    client.put("x/1", "outside").await.unwrap();
    client.delete("w/0").await.unwrap();
    let mut seen = Vec::new();
    while seen.len() < 2 {
        match next(&mut watch).await {
            WatchMessage::Events { events, .. } => {
                for event in events {
                    seen.push((
                        String::from_utf8(event.key).unwrap(),
                        event.kind,
                        event.previous,
                    ));
                }
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    seen.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(seen[0].0, "w/0");
    assert_eq!(seen[0].1, EventKind::Deleted);
    assert_eq!(seen[0].2.as_deref(), Some(&b"before"[..]));
    assert_eq!(seen[1].0, "w/1");
    assert!(matches!(seen[1].1, EventKind::Put { version: 1, .. }));
    watch.request_progress();
    let mut progress = 0;
    while progress < 2 {
        if let WatchMessage::Progress(_) = next(&mut watch).await {
            progress += 1;
        }
    }
}

/// `watch()` returns only once the watch is open on every shard it covers, so a write issued
/// the moment it returns is delivered, whichever shard it lands on. Twenty fresh watches,
/// each followed at once (before anything else, even reading its positions from the server)
/// by one put per core, sent together.
async fn a_write_right_after_watch_returns_is_delivered(client: &Client) {
    const ROUND_COUNT: usize = 20;
    let topology = client.topology();
    let everywhere = vec![true; CORE_COUNT];
    for round in 0..ROUND_COUNT {
        let prefix = format!("now{round}/");
        let range = KeyRange::prefix(&prefix);
        let options = WatchOptions::new();
        let keys: Vec<String> = (0..CORE_COUNT)
            .map(|core| key_on_core(&topology, core, &prefix))
            .collect();
        let mut watch = watch_within(client, range.clone(), options.clone())
            .await
            .expect("the watch opens");
        let puts = join_all(keys.iter().map(|key| client.put(key, "right after")));
        let outcomes = within(CALL_TIMEOUT, "the puts", puts).await;
        let start = starts(&watch, &topology, &everywhere);
        let mut model = Model::new(&topology);
        for (core, (key, outcome)) in keys.iter().zip(outcomes).enumerate() {
            let outcome = outcome.expect("put succeeds");
            assert!(
                outcome.mod_revision > start[core],
                "round {round}, core {core}: the put at {} is after the watch opened at {}",
                outcome.mod_revision,
                start[core]
            );
            model.record_put(key.as_bytes(), b"right after", outcome.mod_revision);
        }
        let mut delivered = Delivered::new(everywhere.clone());
        drain(
            &mut watch,
            &topology,
            &mut delivered,
            &revisions(client).await,
        )
        .await;
        let expected = model.expected(&Filter::new(&range, &options));
        assert!(expected.iter().all(|batches| batches.len() == 1));
        assert_eq!(
            delivered.batches, expected,
            "round {round}: every put made right after watch() returned is delivered"
        );
    }
}

/// A watch on one key is opened on the key's core alone and sees that key only, not its
/// neighbours in byte order nor other keys of its core; each put carries the key's create
/// revision and its count of writes, which starts over after a delete.
async fn key_watch_sees_only_its_key(client: &Client) {
    let topology = client.topology();
    let mut model = Model::new(&topology);
    let key = key_on_core(&topology, 0, "one");
    let owner = core_of_key(&topology, key.as_bytes());
    let same_core_key = key_on_core(&topology, owner, "near");
    let other_core_key = key_on_core(&topology, 1 - owner, "far");
    // The keys just around it in byte order: one it is a prefix of, and the one right after.
    let longer = format!("{key}0");
    let just_after = format!("{key}\0");
    let created_at = model.put(client, &key, "before the watch").await;

    let range = KeyRange::key(&key);
    let options = WatchOptions::new().previous();
    let mut watch = client.watch(&range, options.clone()).await.unwrap();
    let covered = owner_only(&topology, key.as_bytes());
    let (mut delivered, start) = opened(client, &watch, &topology, covered).await;
    let mut expected_counts = vec![0; CORE_COUNT];
    expected_counts[owner] = 1;
    assert_eq!(
        watcher_counts(client).await,
        expected_counts,
        "a key watch is opened on the key's core only"
    );

    let first = model.put(client, &key, "one").await;
    model.put(client, &same_core_key, "same core").await;
    model.put(client, &other_core_key, "other core").await;
    model.put(client, &longer, "longer").await;
    model.put(client, &just_after, "just after").await;
    let second = model.put(client, &key, "two").await;
    let deleted_at = model.delete(client, &key).await;
    model.delete(client, &same_core_key).await;
    let recreated_at = model.put(client, &key, "three").await;
    let last = model.put(client, &key, "four").await;

    drain(
        &mut watch,
        &topology,
        &mut delivered,
        &revisions(client).await,
    )
    .await;
    assert_eq!(
        delivered.batches,
        model.expected(&Filter::new(&range, &options).after(start)),
        "exactly the key's changes after the watch started"
    );
    // The same, spelled out: the versions count writes since the key was created.
    let put = |create_revision, version| EventKind::Put {
        create_revision,
        version,
    };
    let seen: Vec<Seen> = delivered.batches[owner]
        .iter()
        .flat_map(|(revision, events)| {
            events.iter().map(move |event| {
                (
                    *revision,
                    event.kind,
                    event.value.clone(),
                    event.previous.clone(),
                )
            })
        })
        .collect();
    let bytes = |text: &str| text.as_bytes().to_vec();
    assert_eq!(
        seen,
        vec![
            (
                first,
                put(created_at, 2),
                bytes("one"),
                Some(bytes("before the watch"))
            ),
            (second, put(created_at, 3), bytes("two"), Some(bytes("one"))),
            (
                deleted_at,
                EventKind::Deleted,
                Vec::new(),
                Some(bytes("two"))
            ),
            (recreated_at, put(recreated_at, 1), bytes("three"), None),
            (
                last,
                put(recreated_at, 2),
                bytes("four"),
                Some(bytes("three"))
            ),
        ]
    );
    let progress = delivered.progress[owner].expect("the owner reported progress");
    assert!(
        progress >= last,
        "progress {progress} covers the last event {last}"
    );
}

/// A key of the largest size is a valid key, so it can be watched like any other.
async fn key_watch_on_a_longest_key(client: &Client) {
    let topology = client.topology();
    let mut model = Model::new(&topology);
    let key = vec![b'L'; KEY_SIZE_MAX];
    let range = KeyRange::key(&key);
    let options = WatchOptions::new();
    let mut watch = match client.watch(&range, options.clone()).await {
        Ok(watch) => watch,
        Err(error) => {
            panic!("KeyRange::key of a {KEY_SIZE_MAX}-byte key (a valid key) is refused: {error:?}")
        }
    };
    let (mut delivered, _) = opened(client, &watch, &topology, owner_only(&topology, &key)).await;
    model.put(client, &key, "longest").await;
    model.delete(client, &key).await;
    assert_delivered_as_modelled(
        client,
        &mut watch,
        &topology,
        &mut delivered,
        &model.expected(&Filter::new(&range, &options)),
    )
    .await;
}

/// Prefix, bounded and open-ended ranges see their own keys only, at both ends of the
/// range; `puts_only` and `deletes_only` keep their kind of change; previous values come
/// only when asked for.
async fn ranges_and_filters_select_events(client: &Client) {
    let topology = client.topology();
    let mut model = Model::new(&topology);
    model.put(client, "p/old", "existed before").await;
    let watches = [
        (KeyRange::prefix("p/"), WatchOptions::new()),
        (KeyRange::prefix("p/"), WatchOptions::new().previous()),
        (KeyRange::prefix("p/"), WatchOptions::new().puts_only()),
        (
            KeyRange::prefix("p/"),
            WatchOptions::new().deletes_only().previous(),
        ),
        (KeyRange::between("r/b", "r/d"), WatchOptions::new()),
        (KeyRange::from("r/cz"), WatchOptions::new().previous()),
    ];
    let mut watching = Vec::new();
    for (range, options) in &watches {
        let watch = client.watch(range, options.clone()).await.unwrap();
        let (delivered, start) = opened(client, &watch, &topology, vec![true; CORE_COUNT]).await;
        watching.push((watch, delivered, start));
    }

    // Around the prefix "p/": "p", "p." and "p0" (its end) are outside, "p/" itself inside.
    for key in ["p/a", "p", "p.", "p0", "p/", "pa", "p/b", "p/c"] {
        model.put(client, key, format!("{key} one")).await;
    }
    // Around [r/b, r/d): "r/a" and "r/d" outside; "r/cz" and after in the open-ended range.
    for key in ["r/a", "r/b", "r/c", "r/cz", "r/d", "r/da", "s/x"] {
        model.put(client, key, format!("{key} one")).await;
    }
    model.put(client, "p/a", "p/a two").await;
    model.put(client, "r/c", "r/c two").await;
    model.delete(client, "p/b").await;
    model.delete(client, "p/old").await;
    model.delete(client, "r/b").await;
    model.delete(client, "r/d").await;
    model.delete(client, "p0").await;
    let entries: Vec<(String, Vec<u8>)> = ["p/m1", "p/m2", "r/bb", "q", "p/a"]
        .iter()
        .map(|key| ((*key).to_owned(), format!("{key} batch").into_bytes()))
        .collect();
    model.mput(client, &entries).await;
    model.put(client, "p/b", "p/b again").await;

    let targets = revisions(client).await;
    for ((range, options), (watch, delivered, start)) in watches.iter().zip(&mut watching) {
        drain(watch, &topology, delivered, &targets).await;
        // The first write, before the watches, is left out.
        let expected = model.expected(&Filter::new(range, options).after(start.clone()));
        assert_eq!(
            delivered.batches, expected,
            "range {range:?} options {options:?}"
        );
        assert!(delivered.event_count() > 0, "range {range:?} saw something");
        for (_, events) in delivered.batches.iter().flatten() {
            for event in events {
                if !options.previous {
                    assert_eq!(event.previous, None, "{range:?} did not ask: {event:?}");
                }
                if !options.puts {
                    assert!(!matches!(event.kind, EventKind::Put { .. }), "{event:?}");
                }
                if !options.deletes {
                    assert!(matches!(event.kind, EventKind::Put { .. }), "{event:?}");
                }
            }
        }
    }
}

/// A key whose TTL passes is reported as `Expired` (with its previous value when asked),
/// to watches that take deletes and not to those that take puts only.
async fn expiry_is_an_expired_event(client: &Client) {
    let topology = client.topology();
    let mut model = Model::new(&topology);
    let range = KeyRange::prefix("ttl/");
    let watches = [
        WatchOptions::new().previous(),
        WatchOptions::new().deletes_only(),
        WatchOptions::new().puts_only(),
    ];
    let mut watching = Vec::new();
    for options in &watches {
        let watch = client.watch(&range, options.clone()).await.unwrap();
        let (delivered, _) = opened(client, &watch, &topology, vec![true; CORE_COUNT]).await;
        watching.push((watch, delivered));
    }
    let expiring = "ttl/short";
    let core = core_of_key(&topology, expiring.as_bytes());
    // On the other core, so the expiry is the last change of its own.
    let kept = key_on_core(&topology, 1 - core, "ttl/kept");
    let put_options = PutOptions::new().ttl(Duration::from_millis(50));
    let outcome = within(
        CALL_TIMEOUT,
        "put",
        client.put_with(expiring, "soon gone", put_options),
    )
    .await
    .unwrap();
    model.record_put(expiring.as_bytes(), b"soon gone", outcome.mod_revision);
    // The model's entry has no deadline; this key is removed from it by the expiry below.
    model.put(client, &kept, "stays").await;

    // The first watch reports the expiry once the server's tick reclaims the key.
    let (watch, delivered) = &mut watching[0];
    let expired_at = loop {
        let message = next(watch).await;
        let expiry = match &message {
            WatchMessage::Events { shard, events } => events
                .iter()
                .any(|event| event.kind == EventKind::Expired)
                .then_some(shard.revision),
            _ => None,
        };
        delivered.record(&topology, message);
        if let Some(revision) = expiry {
            break revision;
        }
    };
    assert!(
        expired_at > outcome.mod_revision,
        "{expired_at} after the put"
    );
    let stats = within(CALL_TIMEOUT, "stats", client.stats()).await.unwrap();
    assert_eq!(stats[core].expired_count, 1, "{stats:?}");
    assert_eq!(
        stats[core].revision, expired_at,
        "the expiry is the last change of its core"
    );
    model.record_removal(expiring.as_bytes(), EventKind::Expired, expired_at);
    assert_eq!(
        within(CALL_TIMEOUT, "get", client.get(expiring))
            .await
            .unwrap(),
        None
    );

    let targets = revisions(client).await;
    for (options, (watch, delivered)) in watches.iter().zip(&mut watching) {
        drain(watch, &topology, delivered, &targets).await;
        let expected = model.expected(&Filter::new(&range, options));
        assert_eq!(delivered.batches, expected, "options {options:?}");
    }
}

/// All the events of one `mput` (or `mdelete`) on one shard arrive in one message at one
/// revision, in entry order, even when they fill more than one frame; revisions of a shard
/// strictly increase and none repeats.
async fn one_multi_put_is_one_message_per_shard(client: &Client) {
    let topology = client.topology();
    let mut model = Model::new(&topology);
    let range = KeyRange::prefix("m/");
    let options = WatchOptions::new().previous();
    let mut watch = client.watch(&range, options.clone()).await.unwrap();
    let (mut delivered, _) = opened(client, &watch, &topology, vec![true; CORE_COUNT]).await;

    let small = |names: std::ops::Range<usize>, round: &str| -> Vec<(String, Vec<u8>)> {
        names
            .map(|index| {
                (
                    format!("m/{index}"),
                    format!("{round} {index}").into_bytes(),
                )
            })
            .collect()
    };
    for (names, round) in [(0..12, "first"), (6..20, "second"), (0..3, "third")] {
        let entries = small(names, round);
        let mod_revisions = model.mput(client, &entries).await;
        // Entries of one core share one revision.
        for core in 0..CORE_COUNT {
            let mut core_revisions: Vec<u64> = entries
                .iter()
                .zip(&mod_revisions)
                .filter(|((key, _), _)| core_of_key(&topology, key.as_bytes()) == core)
                .map(|(_, revision)| *revision)
                .collect();
            core_revisions.dedup();
            assert!(core_revisions.len() <= 1, "core {core}: {core_revisions:?}");
        }
    }
    let doomed: Vec<String> = (0..8).map(|index| format!("m/{index}")).collect();
    model.mdelete(client, &doomed).await;
    // More than one watch frame (WATCH_FRAME_BYTES_MAX) of events in one revision of one
    // core: the server splits it, and the client must join it again.
    let large: Vec<(String, Vec<u8>)> = keys_on_core(&topology, 0, "m/large", 24)
        .into_iter()
        .map(|key| (key, vec![b'x'; 100 * 1024]))
        .collect();
    model.mput(client, &large).await;
    model.put(client, "m/single", "one").await;

    drain(
        &mut watch,
        &topology,
        &mut delivered,
        &revisions(client).await,
    )
    .await;
    let expected = model.expected(&Filter::new(&range, &options));
    // Each shard revision the model groups is one message delivered, equal to it.
    for (core, (seen, wanted)) in delivered.batches.iter().zip(&expected).enumerate() {
        let revisions_seen: Vec<u64> = seen.iter().map(|(revision, _)| *revision).collect();
        let revisions_expected: Vec<u64> = wanted.iter().map(|(revision, _)| *revision).collect();
        assert_eq!(
            revisions_seen, revisions_expected,
            "core {core}: one message per revision"
        );
    }
    assert_eq!(delivered.batches, expected);
    let largest = delivered.batches[core_of_key(&topology, large[0].0.as_bytes())]
        .iter()
        .map(|(_, events)| events.len())
        .max();
    assert_eq!(largest, Some(large.len()), "the large mput arrived whole");
}

/// Keys the writers of `snapshot_then_live_matches_a_final_scan` change.
const CHURN_KEY_COUNT: u64 = 40;

/// Changes keys of `s/` until `stop`, counting its calls in `done`: puts, deletes,
/// conditional puts that may not apply, and multi-puts that also write outside the prefix.
async fn churn(client: Client, seed: u64, stop: Arc<AtomicBool>, done: Arc<AtomicUsize>) {
    let mut index: u64 = 0;
    while !stop.load(Ordering::Relaxed) {
        let key = format!("s/{}", (index * 7 + seed * 13) % CHURN_KEY_COUNT);
        let value = format!("writer {seed} write {index}");
        let call = async {
            match index % 6 {
                0..=2 => client.put(&key, &value).await.map(drop),
                3 => client.delete(&key).await.map(drop),
                4 => client
                    .put_with(&key, &value, PutOptions::new().if_absent())
                    .await
                    .map(drop),
                _ => {
                    let next_key = format!("s/{}", (index + 1) % CHURN_KEY_COUNT);
                    let entries = [
                        (key.as_str(), value.as_str()),
                        (next_key.as_str(), value.as_str()),
                        ("t/outside", value.as_str()),
                    ];
                    client.mput(&entries).await.map(drop)
                }
            }
        };
        within(CALL_TIMEOUT, "a writer's call", call)
            .await
            .expect("the writer's call succeeds");
        done.fetch_add(1, Ordering::Relaxed);
        index += 1;
    }
}

/// Each shard's snapshot with its events after it applied in order, merged: the live keys
/// the watch says there are. Also returns how many events were applied.
fn rebuild(topology: &Topology, delivered: &Delivered) -> (BTreeMap<Vec<u8>, Entry>, usize) {
    let mut rebuilt = BTreeMap::new();
    let mut live_events = 0;
    for core in 0..CORE_COUNT {
        let (snapshot_revision, items) = delivered.snapshots[core]
            .clone()
            .unwrap_or_else(|| panic!("core {core} sent no snapshot"));
        let mut shard: BTreeMap<Vec<u8>, Entry> = BTreeMap::new();
        for item in items {
            assert_eq!(core_of_key(topology, &item.key), core, "{item:?}");
            let entry = item.entry.expect("a snapshot carries entries");
            assert!(
                entry.mod_revision <= snapshot_revision,
                "{entry:?} in the snapshot at {snapshot_revision}"
            );
            shard.insert(item.key, entry);
        }
        for (revision, events) in &delivered.batches[core] {
            for event in events {
                live_events += 1;
                match event.kind {
                    EventKind::Put {
                        create_revision,
                        version,
                    } => {
                        let entry = Entry {
                            value: event.value.clone(),
                            create_revision,
                            mod_revision: *revision,
                            version,
                            expires_at_ms: None,
                            fields: Vec::new(),
                        };
                        shard.insert(event.key.clone(), entry);
                    }
                    EventKind::Deleted | EventKind::Expired | EventKind::LeaseEnded { .. } => {
                        let removed = shard.remove(&event.key);
                        assert!(removed.is_some(), "core {core}: {event:?} of a missing key");
                    }
                    EventKind::Left { .. } => panic!("core {core}: {event:?} without a query"),
                }
            }
        }
        rebuilt.extend(shard);
    }
    (rebuilt, live_events)
}

/// Writers keep changing a prefix while a snapshot watch opens on it. Each shard's snapshot
/// plus its events after the snapshot's revision must rebuild exactly what a scan finds
/// once the writers stop: no change missed between the snapshot and the events, none
/// applied twice.
async fn snapshot_then_live_matches_a_final_scan(client: &Client) {
    const WRITER_COUNT: u64 = 2;
    let topology = client.topology();
    let range = KeyRange::prefix("s/");
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    let writers: Vec<_> = (0..WRITER_COUNT)
        .map(|seed| tokio::spawn(churn(client.clone(), seed, stop.clone(), done.clone())))
        .collect();
    let wait_for_writes = |count: usize| {
        let done = done.clone();
        async move {
            while done.load(Ordering::Relaxed) < count {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    };
    within(CALL_TIMEOUT, "the first writes", wait_for_writes(200)).await;
    let mut watch = client
        .watch(&range, WatchOptions::new().snapshot())
        .await
        .unwrap();
    let mut delivered = Delivered::everywhere();
    // Read while the writers go on, so the watch never falls behind its bounds.
    let more_writes = wait_for_writes(done.load(Ordering::Relaxed) + 600);
    tokio::pin!(more_writes);
    let reading = async {
        loop {
            tokio::select! {
                () = &mut more_writes => break,
                item = watch.next() => {
                    let message = item.expect("the stream goes on").expect("no error");
                    delivered.record(&topology, message);
                }
            }
        }
    };
    within(CALL_TIMEOUT, "reading while writing", reading).await;
    stop.store(true, Ordering::Relaxed);
    for writer in writers {
        within(CALL_TIMEOUT, "a writer stops", writer)
            .await
            .expect("the writer did not panic");
    }

    let scan = within(
        CALL_TIMEOUT,
        "scan",
        client.scan(&range, ScanOptions::default()),
    )
    .await
    .unwrap();
    assert_eq!(scan.continuation, None, "one page holds the prefix");
    let mut targets = vec![0; CORE_COUNT];
    for shard in &scan.revisions {
        targets[core_index_of(&topology, *shard)] = shard.revision;
    }
    drain(&mut watch, &topology, &mut delivered, &targets).await;

    let (rebuilt, live_events) = rebuild(&topology, &delivered);
    assert!(
        live_events > 0,
        "the writers changed keys after the snapshots"
    );
    let scanned: BTreeMap<Vec<u8>, Entry> = scan
        .items
        .into_iter()
        .map(|item| (item.key, item.entry.expect("a scan carries entries")))
        .collect();
    assert_eq!(
        rebuilt, scanned,
        "snapshot plus events equals the final state"
    );
}

/// A consumer reads part of what happened, drops the watch, and more happens; a watch
/// resumed after its positions delivers exactly the changes after them: none it had
/// already yielded, none missing.
async fn resume_after_positions_replays_exactly_the_rest(client: &Client) {
    let topology = client.topology();
    let mut model = Model::new(&topology);
    let range = KeyRange::prefix("re/");
    let options = WatchOptions::new().previous();
    let mut keys = keys_on_core(&topology, 0, "re/", 3);
    keys.extend(keys_on_core(&topology, 1, "re/", 3));
    let mut watch = client.watch(&range, options.clone()).await.unwrap();
    let (mut delivered, _) = opened(client, &watch, &topology, vec![true; CORE_COUNT]).await;
    for round in 0..2 {
        for key in &keys {
            model.put(client, key, format!("{key} {round}")).await;
        }
    }
    model.delete(client, &keys[0]).await;
    model.delete(client, &keys[3]).await;
    model.put(client, "rf/outside", "outside").await;

    // Consume part of it: a few messages, at least one from each shard.
    let mut consumed = 0;
    while consumed < 5 || delivered.batches.iter().any(Vec::is_empty) {
        delivered.record(&topology, next(&mut watch).await);
        consumed += 1;
    }
    assert!(
        consumed < 14,
        "some of the 14 changes are left: read {consumed}"
    );
    let positions = watch.positions();
    let mut after = vec![0; CORE_COUNT];
    assert_eq!(positions.len(), CORE_COUNT, "{positions:?}");
    for shard in &positions {
        let core = core_index_of(&topology, *shard);
        assert_eq!(
            Some(shard.revision),
            delivered.last_batch_revision(core),
            "the position of core {core} is the last revision it yielded"
        );
        after[core] = shard.revision;
    }
    drop(watch);

    for key in &keys[1..3] {
        model.put(client, key, format!("{key} after")).await;
    }
    model.put(client, &keys[0], "back").await;
    model.delete(client, &keys[4]).await;
    model.put(client, "rf/outside", "outside again").await;
    let mut resumed = client
        .watch(&range, options.clone().after(positions.clone()))
        .await
        .unwrap();
    assert_eq!(
        resumed.positions(),
        positions,
        "a resumed watch starts at its positions, in topology order"
    );
    let mut rest = Delivered::everywhere();
    drain(&mut resumed, &topology, &mut rest, &revisions(client).await).await;
    let expected = model.expected(&Filter::new(&range, &options).after(after));
    assert_eq!(
        rest.batches, expected,
        "exactly the changes after the positions"
    );
    // Together, what was yielded before and after the resume is everything, once.
    let mut joined = delivered.batches.clone();
    for (core, batches) in rest.batches.iter().enumerate() {
        joined[core].extend(batches.iter().cloned());
    }
    assert_eq!(joined, model.expected(&Filter::new(&range, &options)));
}

/// `positions()` promises a position for every shard the watch covers, in topology order,
/// from the moment `watch()` returns ("its start, before anything"), so a consumer that saw
/// changes on one shard only, or none, can still resume.
async fn positions_cover_every_shard_of_the_watch(client: &Client) {
    let topology = client.topology();
    let mut model = Model::new(&topology);
    let range = KeyRange::prefix("pos/");
    let options = WatchOptions::new();
    let busy = keys_on_core(&topology, 0, "pos/", 3);
    let quiet = key_on_core(&topology, 1, "pos/quiet");
    let start = revisions(client).await;
    let mut watch = client.watch(&range, options.clone()).await.unwrap();
    // Before anything was yielded (and without asking for progress, which would give every
    // shard a position): every shard at its start.
    let at_start: Vec<ShardRevision> = (0..CORE_COUNT)
        .map(|core| position(&topology, core, start[core]))
        .collect();
    assert_eq!(
        watch.positions(),
        at_start,
        "positions() names every shard at its start before anything is yielded"
    );
    for key in &busy {
        model.put(client, key, "busy").await;
    }
    let mut delivered = Delivered::everywhere();
    read_batches(&mut watch, &topology, &mut delivered, busy.len()).await;
    let positions = watch.positions();
    let busy_last = delivered
        .last_batch_revision(0)
        .expect("the busy shard yielded");
    assert_eq!(
        positions,
        vec![position(&topology, 0, busy_last), at_start[1]],
        "positions() names every shard the watch covers, the quiet one at its start"
    );
    drop(watch);

    model.put(client, &busy[0], "after").await;
    model.put(client, &quiet, "after").await;
    let after = vec![busy_last, start[1]];
    let mut resumed = match client.watch(&range, options.clone().after(positions)).await {
        Ok(watch) => watch,
        Err(error) => panic!("resuming after positions() fails: {error:?}"),
    };
    let mut rest = Delivered::everywhere();
    drain(&mut resumed, &topology, &mut rest, &revisions(client).await).await;
    assert_eq!(
        rest.batches,
        model.expected(&Filter::new(&range, &options).after(after))
    );
}

/// With a history of 4 events, resuming after an older revision is refused as `Compacted`
/// with the oldest revision that can be resumed after (never a silent gap), as the error of
/// `watch()` itself, leaving nothing open on the core that could resume; resuming there
/// delivers the 4 events still held.
async fn resume_before_the_history_is_compacted(client: &Client) {
    let topology = client.topology();
    let mut model = Model::new(&topology);
    let range = KeyRange::prefix("c/");
    let options = WatchOptions::new();
    let start = revisions(client).await;
    // Twenty single-event revisions on core 0 only, so only core 0 is compacted.
    let keys = keys_on_core(&topology, 0, "c/", 10);
    for round in 0..2 {
        for key in &keys {
            model.put(client, key, format!("{key} {round}")).await;
        }
    }
    let end = revisions(client).await;
    assert_eq!(end[0] - start[0], 20);
    assert_eq!(end[1], start[1]);
    // The history keeps the newest 4 revisions (one event each); the last one dropped is the
    // oldest revision a watch can resume after.
    let oldest_expected = end[0] - HISTORY_EVENTS_MAX as u64;
    let at = |revisions: [u64; CORE_COUNT]| -> Vec<ShardRevision> {
        (0..CORE_COUNT)
            .map(|core| position(&topology, core, revisions[core]))
            .collect()
    };

    for too_old in [start[0], oldest_expected - 1] {
        let resume = options.clone().after(at([too_old, start[1]]));
        let refusal = watch_within(client, range.clone(), resume)
            .await
            .expect_err("a resume the history no longer holds is refused");
        match refusal {
            ClientError::Compacted {
                node_id,
                core_id,
                oldest_available,
            } => {
                assert_eq!(node_id, topology.nodes[0].node_id);
                assert_eq!(core_id, topology.nodes[0].cores[0].core_id);
                assert_eq!(oldest_available, oldest_expected, "after {too_old}");
            }
            other => panic!("resuming after {too_old}: expected Compacted, got {other:?}"),
        }
        wait_for_watcher_counts(
            client,
            &[0, 0],
            "a refused resume leaves nothing open, not even on core 1, which could resume",
        )
        .await;
    }

    let after = [oldest_expected, start[1]];
    let mut watch = client
        .watch(&range, options.clone().after(at(after)))
        .await
        .unwrap();
    assert_eq!(
        starts(&watch, &topology, &[true; CORE_COUNT]),
        after,
        "a resume starts at its positions"
    );
    let mut delivered = Delivered::everywhere();
    drain(&mut watch, &topology, &mut delivered, &end).await;
    let expected = model.expected(&Filter::new(&range, &options).after(after.to_vec()));
    assert_eq!(expected[0].len(), HISTORY_EVENTS_MAX);
    assert_eq!(delivered.batches, expected);
}

/// A watcher that stops reading while many large events are written: the server's queued
/// bytes for it never pass their bound (it does not grow server memory), other calls on the
/// same client go on, and once read the watch yields what it had received, in order and
/// exactly as written, then `Lagged` with the last revision it yielded from that shard. The
/// watcher is gone from the server once the watch is dropped.
async fn a_stalled_watcher_lags_within_its_bound(client: &Client) {
    const VALUE_BYTES: usize = 8 * 1024;
    const PUT_COUNT: usize = 1600;
    let topology = client.topology();
    let mut model = Model::new(&topology);
    let range = KeyRange::prefix("lag/");
    let options = WatchOptions::new();
    let mut watch = client.watch(&range, options.clone()).await.unwrap();
    let (mut delivered, start) = opened(client, &watch, &topology, vec![true; CORE_COUNT]).await;

    let value = vec![b'v'; VALUE_BYTES];
    for index in 0..PUT_COUNT {
        model
            .put(client, format!("lag/{}", index % 32), &value)
            .await;
        if index % 20 == 0 {
            let stats = within(CALL_TIMEOUT, "stats", client.stats()).await.unwrap();
            for core in &stats {
                assert!(
                    core.watch_queued_bytes <= QUEUE_BYTES_MAX,
                    "core {}: {} bytes queued for watchers, over the bound of {QUEUE_BYTES_MAX}",
                    core.core_id,
                    core.watch_queued_bytes
                );
            }
        }
    }
    // The client still serves plain calls, on the same connections, while the watch stalls.
    let entry = within(CALL_TIMEOUT, "get", client.get("lag/0"))
        .await
        .unwrap();
    assert_eq!(entry.map(|entry| entry.value), Some(value.clone()));
    within(CALL_TIMEOUT, "put", client.put("other/key", "still served"))
        .await
        .unwrap();

    let error = loop {
        match within(CALL_TIMEOUT, "the stalled watch", watch.next()).await {
            Some(Ok(message)) => delivered.record(&topology, message),
            Some(Err(error)) => break error,
            None => panic!("the stream ended without reporting that it lagged"),
        }
    };
    let ClientError::Lagged {
        node_id,
        core_id,
        last_delivered,
    } = error
    else {
        panic!("expected Lagged, got {error:?}");
    };
    let lagged_core = core_index_of(
        &topology,
        ShardRevision {
            node_id,
            core_id,
            revision: last_delivered,
        },
    );
    let last_yielded = delivered
        .last_batch_revision(lagged_core)
        .unwrap_or(start[lagged_core]);
    assert_eq!(
        last_delivered, last_yielded,
        "Lagged names the last revision the stream yielded from core {lagged_core}"
    );
    assert_ended(&mut watch).await;

    // What was yielded is the start of what was written, shard by shard, with no gap.
    let expected = model.expected(&Filter::new(&range, &options));
    for (core, (yielded, written)) in delivered.batches.iter().zip(&expected).enumerate() {
        assert!(yielded.len() <= written.len(), "core {core}");
        assert_eq!(yielded[..], written[..yielded.len()], "core {core}");
    }
    assert!(
        delivered.batches[lagged_core].len() < expected[lagged_core].len(),
        "core {lagged_core} lagged, so some of its events were not yielded"
    );

    drop(watch);
    wait_for_watcher_counts(
        client,
        &[0, 0],
        "a lagged watch, dropped, leaves no watcher",
    )
    .await;
}

/// `request_progress` brings one progress notification per watched shard, at or past the
/// last event; `progress_every` brings them periodically, after any event they cover.
async fn progress_on_request_and_periodically(client: &Client) {
    let topology = client.topology();
    let mut model = Model::new(&topology);
    let range = KeyRange::prefix("pg/");
    let options = WatchOptions::new();
    let mut watch = client.watch(&range, options.clone()).await.unwrap();
    let (mut delivered, _) = opened(client, &watch, &topology, vec![true; CORE_COUNT]).await;
    for index in 0..10 {
        model.put(client, format!("pg/{index}"), "value").await;
    }
    model.put(client, "other", "outside").await;
    let targets = revisions(client).await;
    drain(&mut watch, &topology, &mut delivered, &targets).await;
    assert_eq!(
        delivered.batches,
        model.expected(&Filter::new(&range, &options))
    );
    for (core, target) in targets.iter().enumerate() {
        let progress = delivered.progress[core].expect("progress from every shard");
        let last = delivered
            .last_batch_revision(core)
            .expect("events on both cores");
        assert!(
            progress >= last,
            "core {core}: progress {progress} before event {last}"
        );
        assert!(progress >= *target, "core {core}: {progress} < {target}");
    }

    // A key watch reports progress from its owner only (Delivered checks where from).
    let key = key_on_core(&topology, 1, "pg/");
    let mut key_watch = client
        .watch(&KeyRange::key(&key), options.clone())
        .await
        .unwrap();
    let covered = owner_only(&topology, key.as_bytes());
    let (mut key_delivered, _) = opened(client, &key_watch, &topology, covered).await;
    drain(&mut key_watch, &topology, &mut key_delivered, &targets).await;
    assert_eq!(
        key_delivered.progress[0], None,
        "nothing from the other core"
    );
    assert!(key_delivered.progress[1] >= Some(targets[1]));

    let mut periodic = client
        .watch(
            &range,
            options.clone().progress_every(Duration::from_millis(50)),
        )
        .await
        .unwrap();
    let everywhere = vec![true; CORE_COUNT];
    let (mut periodic_delivered, _) = opened(client, &periodic, &topology, everywhere).await;
    let mut progress_counts = [0; CORE_COUNT];
    let periodic_key = "pg/periodic";
    let periodic_core = core_of_key(&topology, periodic_key.as_bytes());
    let mut written = None;
    loop {
        let is_covered = written.is_some_and(|revision| {
            periodic_delivered.progress[periodic_core].is_some_and(|progress| progress >= revision)
        });
        if is_covered && progress_counts.iter().all(|&count| count >= 6) {
            break;
        }
        let message = next(&mut periodic).await;
        if let WatchMessage::Progress(shard) = &message {
            progress_counts[core_index_of(&topology, *shard)] += 1;
        }
        periodic_delivered.record(&topology, message);
        if written.is_none() && progress_counts.iter().all(|&count| count >= 3) {
            // Unasked progress keeps coming; a write in between arrives before the progress
            // that covers it (Delivered checks the order).
            written = Some(model.put(client, periodic_key, "tick").await);
        }
    }
    assert_eq!(
        periodic_delivered.batches[periodic_core]
            .iter()
            .map(|(revision, _)| *revision)
            .collect::<Vec<_>>(),
        vec![written.expect("written")],
        "the write between the progress notifications"
    );
}

/// `watchers_per_shard_max` refuses one more watcher on a full core with `Overloaded`,
/// naming the limit, as the error of `watch()` itself and at once: with the default
/// `resume_attempts_max`, a first open retried with backoff would take longer than
/// `CALL_TIMEOUT`. Other cores still take watches, refused watches hold no place (not even on
/// the cores that accepted their part), and a dropped watch frees its place.
async fn watchers_per_shard_are_limited(client: &Client) {
    let topology = client.topology();
    let full_keys = keys_on_core(&topology, 0, "lim", 3);
    let other_key = key_on_core(&topology, 1, "lim-other");
    let watch_key = |key: &str| watch_within(client, KeyRange::key(key), WatchOptions::new());
    let mut held = Vec::new();
    for key in &full_keys[..WATCHERS_PER_SHARD_MAX] {
        let watch = watch_key(key)
            .await
            .expect("a watch within the limit opens");
        starts(&watch, &topology, &owner_only(&topology, key.as_bytes()));
        held.push(watch);
    }
    assert_eq!(
        watcher_counts(client).await,
        vec![WATCHERS_PER_SHARD_MAX as u64, 0],
        "open watches are registered"
    );
    let refused = watch_key(&full_keys[2])
        .await
        .expect_err("a watcher past the limit is refused");
    assert_overloaded(&refused, "watchers_per_shard_max");

    let other = watch_key(&other_key)
        .await
        .expect("another core takes a watch");
    starts(
        &other,
        &topology,
        &owner_only(&topology, other_key.as_bytes()),
    );
    assert_eq!(
        watcher_counts(client).await,
        vec![WATCHERS_PER_SHARD_MAX as u64, 1],
        "a refused key watch holds no place"
    );
    let range_refused = watch_within(client, KeyRange::prefix("lim"), WatchOptions::new())
        .await
        .expect_err("a range watch that includes the full core is refused");
    assert_overloaded(&range_refused, "watchers_per_shard_max");
    wait_for_watcher_counts(
        client,
        &[WATCHERS_PER_SHARD_MAX as u64, 1],
        "a refused range watch leaves nothing open on the core that accepted it",
    )
    .await;

    held.remove(0);
    wait_for_watcher_counts(
        client,
        &[WATCHERS_PER_SHARD_MAX as u64 - 1, 1],
        "a dropped watch frees its place",
    )
    .await;
    let range = KeyRange::key(&full_keys[2]);
    let options = WatchOptions::new();
    let mut again = watch_within(client, range.clone(), options.clone())
        .await
        .expect("the freed place takes a watch");
    let covered = owner_only(&topology, full_keys[2].as_bytes());
    let (mut delivered, _) = opened(client, &again, &topology, covered).await;
    let mut model = Model::new(&topology);
    model.put(client, &full_keys[2], "seen").await;
    assert_delivered_as_modelled(
        client,
        &mut again,
        &topology,
        &mut delivered,
        &model.expected(&Filter::new(&range, &options)),
    )
    .await;
    drop(other);
}

/// Watches that can never deliver anything, whose bounds are not keys, or whose progress
/// interval is outside the protocol's range (10 ms to 1 h; below a millisecond counts as
/// one) are refused by `watch()` before anything is sent; the bounds themselves are taken.
async fn invalid_watches_are_refused_locally(client: &Client) {
    let invalid = |result: Result<Watch, ClientError>| match result {
        Ok(watch) => panic!("expected a refusal, got {watch:?}"),
        Err(ClientError::InvalidRequest(request_error)) => request_error,
        Err(other) => panic!("expected InvalidRequest, got {other:?}"),
    };
    for range in [KeyRange::between("b", "a"), KeyRange::between("a", "a")] {
        let refusal = invalid(client.watch(&range, WatchOptions::new()).await);
        assert_eq!(refusal, RequestError::EmptyRange, "{range:?}");
    }
    let nothing = WatchOptions {
        puts: false,
        deletes: false,
        ..WatchOptions::new()
    };
    for options in [nothing, WatchOptions::new().puts_only().deletes_only()] {
        let refusal = invalid(client.watch(&KeyRange::prefix("i/"), options).await);
        assert_eq!(refusal, RequestError::WatchesNothing);
    }
    let too_long = KeyRange::prefix(vec![b'k'; KEY_SIZE_MAX + 1]);
    let refusal = invalid(client.watch(&too_long, WatchOptions::new()).await);
    assert!(
        matches!(refusal, RequestError::KeyTooLarge { .. }),
        "{refusal:?}"
    );
    // A progress interval out of range is refused too, not ignored nor clamped, with the
    // interval (in whole milliseconds, rounded up) and the range.
    let out_of_range = [
        (Duration::from_micros(1), 1),
        (Duration::from_millis(1), 1),
        (Duration::from_millis(9), 9),
        (
            Duration::from_millis(60 * 60 * 1000 + 1),
            60 * 60 * 1000 + 1,
        ),
        (Duration::from_secs(u64::MAX), u32::MAX),
    ];
    for (interval, interval_ms) in out_of_range {
        let options = WatchOptions::new().progress_every(interval);
        let refusal = invalid(client.watch(&KeyRange::prefix("i/"), options).await);
        assert_eq!(
            refusal,
            RequestError::ProgressIntervalOutOfRange {
                interval_ms,
                interval_ms_min: 10,
                interval_ms_max: 60 * 60 * 1000,
            },
            "progress every {interval:?}"
        );
    }
    assert_eq!(
        watcher_counts(client).await,
        vec![0; CORE_COUNT],
        "nothing registered"
    );
    // The bounds of the range are intervals a watch can have.
    for interval in [Duration::from_millis(10), Duration::from_secs(60 * 60)] {
        let options = WatchOptions::new().progress_every(interval);
        let watch = watch_within(client, KeyRange::prefix("i/"), options).await;
        if let Err(error) = watch {
            panic!("progress every {interval:?} (in range) is refused: {error:?}");
        }
    }
}

/// A resume that lacks a shard's position is refused with `MissingPosition`, and starts
/// nothing, not even on the shards it names.
async fn a_refused_resume_starts_nothing(client: &Client) {
    let topology = client.topology();
    let partial = vec![position(&topology, 0, 0)];
    match client
        .watch(&KeyRange::prefix("i/"), WatchOptions::new().after(partial))
        .await
    {
        Err(ClientError::MissingPosition { node_id, core_id }) => {
            assert_eq!(node_id, topology.nodes[0].node_id);
            assert_eq!(core_id, topology.nodes[0].cores[1].core_id);
        }
        other => panic!("expected MissingPosition, got {other:?}"),
    }
    // A watch opened after it is registered on every core once `watch()` returns, and was
    // asked for after the refused resume, so a watcher that resume started anyway is
    // registered by now too.
    let valid = client
        .watch(&KeyRange::prefix("i/"), WatchOptions::new())
        .await
        .unwrap();
    assert_eq!(
        watcher_counts(client).await,
        vec![1; CORE_COUNT],
        "only the valid watch is registered: a refused resume leaves no watcher behind"
    );
    drop(valid);
}

/// A dropped watch leaves no watcher on any core.
async fn dropping_a_watch_unregisters_it(client: &Client) {
    let mut watches = Vec::new();
    for options in [WatchOptions::new(), WatchOptions::new().snapshot()] {
        let watch = client
            .watch(&KeyRange::prefix("d/"), options)
            .await
            .unwrap();
        watches.push(watch);
    }
    assert_eq!(
        watcher_counts(client).await,
        vec![2; CORE_COUNT],
        "two watches on every core"
    );
    drop(watches);
    wait_for_watcher_counts(client, &[0, 0], "dropped watches unregister").await;
}

// ---------------------------------------------------------------------------------------
// Remote only.

/// `watchers_per_connection_max` bounds one connection's watches with `Overloaded`, naming
/// the limit, as the error of `watch()` itself; another connection has its own allowance,
/// and a dropped watch frees its place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_watchers_per_connection_are_limited() {
    let server = Server::start(Config {
        watchers_per_connection_max: WATCHERS_PER_CONNECTION_MAX,
        ..default_config()
    })
    .expect("the server starts");
    let scenario = async {
        let client = within(CALL_TIMEOUT, "connect", Client::connect(server.addresses()))
            .await
            .unwrap();
        let topology = client.topology();
        let range = KeyRange::prefix("conn/");
        let watch = |client| watch_within(client, range.clone(), WatchOptions::new());
        let everywhere = vec![true; CORE_COUNT];
        let mut held = Vec::new();
        for _ in 0..WATCHERS_PER_CONNECTION_MAX {
            let watch = watch(&client)
                .await
                .expect("a watch within the limit opens");
            starts(&watch, &topology, &everywhere);
            held.push(watch);
        }
        let refused = watch(&client)
            .await
            .expect_err("a watch past the connection's limit is refused");
        assert_overloaded(&refused, "watchers_per_connection_max");

        let other_client = within(CALL_TIMEOUT, "connect", Client::connect(server.addresses()))
            .await
            .unwrap();
        let other = watch(&other_client)
            .await
            .expect("another connection has its own allowance");
        starts(&other, &topology, &everywhere);
        let expected = WATCHERS_PER_CONNECTION_MAX as u64 + 1;
        assert_eq!(
            watcher_counts(&client).await,
            vec![expected; CORE_COUNT],
            "the refused watch holds no place"
        );

        held.remove(0);
        // The first client's watches but one, and the other client's.
        let expected = WATCHERS_PER_CONNECTION_MAX as u64 - 1 + 1;
        wait_for_watcher_counts(
            &client,
            &[expected, expected],
            "a dropped watch unregisters",
        )
        .await;
        let again = watch(&client).await.expect("the freed place takes a watch");
        starts(&again, &topology, &everywhere);
    };
    within(SCENARIO_TIMEOUT, "watchers per connection", scenario).await;
    common::stop_server(server);
}

/// The first open of a watch is never retried: with its server gone, `watch()` fails with
/// the connection's error (one a reopen would retry) as soon as it is known, not after the
/// default `resume_attempts_max` of backoff, which lasts longer than `CALL_TIMEOUT`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_a_first_open_that_cannot_reach_its_shards_fails_at_once() {
    let server = Server::start(Config {
        shutdown_timeout_ms: 1_000,
        ..default_config()
    })
    .expect("the server starts");
    let scenario = async {
        let client = within(CALL_TIMEOUT, "connect", Client::connect(server.addresses()))
            .await
            .unwrap();
        tokio::task::spawn_blocking(move || common::stop_server(server))
            .await
            .expect("the server stopped cleanly");
        let error = watch_within(&client, KeyRange::prefix("gone/"), WatchOptions::new())
            .await
            .expect_err("a watch on a stopped server does not open");
        assert!(
            error.is_retryable() || error.is_indeterminate(),
            "a connection failure, which a reopen would retry: {error:?}"
        );
    };
    within(SCENARIO_TIMEOUT, "a first open without a server", scenario).await;
}

/// Two keys of `rs/` on each core, in core order.
fn restart_keys(topology: &Topology) -> Vec<String> {
    let mut keys = keys_on_core(topology, 0, "rs/", 2);
    keys.extend(keys_on_core(topology, 1, "rs/", 2));
    keys
}

/// The writes after the restart in the restart scenarios: both cores, puts and a delete.
async fn write_after_restart(client: &Client, model: &mut Model, keys: &[String]) {
    model.put(client, &keys[0], "after").await;
    model.put(client, &keys[1], "again").await;
    model.put(client, &keys[3], "after").await;
    model.delete(client, &keys[2]).await;
}

/// A watch whose server stops and starts again (same ports, same data directory, `sync`
/// durability) after its range's last change was its shards' last resumes on its own: it
/// delivers every change before and after the restart exactly once, with no error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_watch_resumes_across_a_server_restart() {
    within(
        SCENARIO_TIMEOUT,
        "resume across a restart",
        resume_across_restart(),
    )
    .await;
}

async fn resume_across_restart() {
    let mut server = DurableServer::start("restart", default_config()).await;
    let client = within(CALL_TIMEOUT, "connect", Client::connect(server.addresses()))
        .await
        .unwrap();
    let topology = client.topology();
    let mut model = Model::new(&topology);
    let range = KeyRange::prefix("rs/");
    let options = WatchOptions::new().previous();
    let keys = restart_keys(&topology);
    let mut watch = client.watch(&range, options.clone()).await.unwrap();
    let (mut delivered, start) = opened(&client, &watch, &topology, vec![true; CORE_COUNT]).await;
    // No progress requests: the watch knows only what its events told it.
    for key in &keys {
        model.put(&client, key, "before").await;
    }
    model.delete(&client, &keys[1]).await;
    read_batches(&mut watch, &topology, &mut delivered, keys.len() + 1).await;

    server.restart().await;
    write_after_restart(&client, &mut model, &keys).await;
    read_batches(&mut watch, &topology, &mut delivered, 4).await;
    drain(
        &mut watch,
        &topology,
        &mut delivered,
        &revisions(&client).await,
    )
    .await;
    assert_eq!(
        delivered.batches,
        model.expected(&Filter::new(&range, &options).after(start)),
        "every change once, before and after the restart"
    );
    drop(watch);
    drop(client);
    server.stop().await;
}

/// After a restart each shard's history starts empty at its recovered revision
/// (`docs/semantics.md`), so a watch resumes across it only after that revision. When the
/// last writes before the stop were to keys outside the watched range, a watch has delivered
/// everything of its range yet was never told of those later revisions of its shards. Two
/// watches of the same range see the same restart:
///
/// - one without progress notifications resumes after its range's last change, older than
///   what the shard recovered, and its stream ends with `Compacted` naming the shard and its
///   recovered revision (never a silent gap): a documented limitation, not a bug;
/// - one with periodic progress notifications, read until each core's progress reports the
///   core's revision before the stop, resumes after it: it delivers every change, before
///   and after the restart, exactly once, with no error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_watch_across_a_restart_after_writes_outside_its_range() {
    within(
        SCENARIO_TIMEOUT,
        "a restart after writes outside the range",
        restart_after_writes_outside_the_range(),
    )
    .await;
}

/// Checks that the next item of `watch` is `Compacted`, naming a shard and that shard's
/// revision in `recovered` as the oldest to resume after, and that the stream then ends.
async fn assert_compacted_at(watch: &mut Watch, topology: &Topology, recovered: &[u64]) {
    match first_error(watch).await {
        ClientError::Compacted {
            node_id,
            core_id,
            oldest_available,
        } => {
            let shard = ShardRevision {
                node_id,
                core_id,
                revision: oldest_available,
            };
            let core = core_index_of(topology, shard);
            assert_eq!(
                oldest_available, recovered[core],
                "core {core}: the oldest revision to resume after is the recovered one"
            );
        }
        other => panic!("expected Compacted after the restart, got {other:?}"),
    }
    assert_ended(watch).await;
}

async fn restart_after_writes_outside_the_range() {
    let mut server = DurableServer::start("restart-outside", default_config()).await;
    let client = within(CALL_TIMEOUT, "connect", Client::connect(server.addresses()))
        .await
        .unwrap();
    let topology = client.topology();
    let everywhere = vec![true; CORE_COUNT];
    let mut model = Model::new(&topology);
    let range = KeyRange::prefix("rs/");
    let options = WatchOptions::new().previous();
    let keys = restart_keys(&topology);
    let mut plain = client.watch(&range, options.clone()).await.unwrap();
    let (mut plain_delivered, start) = opened(&client, &plain, &topology, everywhere.clone()).await;
    let periodic_options = options.clone().progress_every(Duration::from_millis(20));
    let mut periodic = client.watch(&range, periodic_options).await.unwrap();
    let (mut periodic_delivered, periodic_start) =
        opened(&client, &periodic, &topology, everywhere).await;
    assert_eq!(periodic_start, start, "no write in between");

    for key in &keys {
        model.put(&client, key, "before").await;
    }
    model.delete(&client, &keys[1]).await;
    // The last writes of every core, outside the range.
    for core in 0..CORE_COUNT {
        let outside = key_on_core(&topology, core, "outside");
        model.put(&client, outside, "not watched").await;
    }
    let expected_before = model.expected(&Filter::new(&range, &options).after(start.clone()));
    let stopped_at = revisions(&client).await;

    // The watch without progress has its range's changes, and knows of nothing later.
    read_batches(&mut plain, &topology, &mut plain_delivered, keys.len() + 1).await;
    assert_eq!(plain_delivered.batches, expected_before);
    let plain_positions = starts(&plain, &topology, &[true; CORE_COUNT]);
    for core in 0..CORE_COUNT {
        assert!(
            plain_positions[core] < stopped_at[core],
            "core {core}: the plain watch is at {}, before the core's last revision {}",
            plain_positions[core],
            stopped_at[core]
        );
    }
    // The watch with periodic progress is told of each core's last revision, without asking.
    read_until_progress(
        &mut periodic,
        &topology,
        &mut periodic_delivered,
        &stopped_at,
        false,
    )
    .await;
    assert_eq!(periodic_delivered.batches, expected_before);
    assert_eq!(
        periodic_delivered.progress,
        stopped_at.iter().copied().map(Some).collect::<Vec<_>>(),
        "progress reports each core's revision, and nothing past it"
    );
    assert_eq!(
        starts(&periodic, &topology, &[true; CORE_COUNT]),
        stopped_at
    );

    server.restart().await;
    let recovered = revisions(&client).await;
    assert_eq!(
        recovered, stopped_at,
        "sync durability recovers every acknowledged write"
    );

    // (a) Without progress: the resume is refused on the stream, and the stream ends.
    assert_compacted_at(&mut plain, &topology, &recovered).await;
    drop(plain);

    // (b) With progress: the stream goes on across the restart, each change once.
    write_after_restart(&client, &mut model, &keys).await;
    let targets = revisions(&client).await;
    read_until_progress(
        &mut periodic,
        &topology,
        &mut periodic_delivered,
        &targets,
        false,
    )
    .await;
    assert_eq!(
        periodic_delivered.batches,
        model.expected(&Filter::new(&range, &options).after(start)),
        "every change once, before and after the restart, with no error"
    );
    assert_eq!(starts(&periodic, &topology, &[true; CORE_COUNT]), targets);
    drop(periodic);
    drop(client);
    server.stop().await;
}
