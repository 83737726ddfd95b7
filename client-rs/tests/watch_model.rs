//! Watches against a model, through the real client and server (embedded and remote).
//!
//! Each proptest case starts a fresh two-core cluster and runs a random plan: puts, deletes,
//! puts with a short TTL (and later a sleep long enough for them to expire), batch puts and
//! batch deletes over twelve keys under two prefixes (each prefix has keys on both cores),
//! while three to six watchers follow random ranges (a prefix, one key, a span of keys,
//! everything) with random filters (puts, deletes, both) and with or without previous
//! values. Some open before the first step with `Now`, some mid-run with `Now` or a
//! snapshot; some read after every step, some only every few steps (slow); some are dropped
//! and resumed later from `Watch::positions` (resuming). One more watcher never reads, and a
//! flood of writes into its range at the end must get it cancelled as lagging.
//!
//! **The model.** The test applies every step to a model of the store, which knows, for
//! each client call, the events each core must publish (key, kind, create revision and
//! version, value, previous value) and, for writes, the revision from the reply. Expiries
//! are the one thing the test does not order: the server reclaims a key on its tick, between
//! any two calls. A reference watcher on everything, opened first and drained by its own
//! task, fixes that order, and is itself checked against the model:
//! - each core's revisions are exactly `1..=N`, where `N` counts the model's writes and
//!   expiries on that core (every revision in these plans has an event), and the core's own
//!   revision in `stats()` is `N`: no gap, no extra revision;
//! - with the expiries taken out, the batches are exactly the model's, in the order the
//!   calls were made, at the revisions the replies gave;
//! - every key put with a TTL expires exactly once, alone in its revision, after its put and
//!   before the first write on its core after the sleep that waited for it.
//!
//! Every other watcher is then checked against that validated sequence, per core: what it
//! yielded equals the events of its range and filter, shaped by `previous`, over its window
//! `(start, end]`, with no gap, repeat or reordering, across drops and resumes.
//! - `start` is the snapshot's revision (which must fall between the writes it was opened
//!   between, and whose items must equal the model's live keys of the range at that
//!   revision, a key whose TTL passed but which was not reclaimed yet excepted), or, for
//!   `Now`, some revision between the writes it was opened between and no later than the
//!   progress notification the test waited for.
//! - `end` is the last revision of its phase for a watcher that never failed (it was synced
//!   with a progress notification at least that high); `last_delivered` for the core that
//!   lagged; the resume position for the core whose resume was refused as compacted.
//!   The other cores of a stream that ended on an error yield a prefix of their sequence.
//! - Cancellations happen exactly where the model says: watchers that read are never
//!   cancelled; the one that never reads is cancelled as `Lagged` by the flood; a resume is
//!   refused as `Compacted` exactly when the model's history (bounded by
//!   `watch_history_events_max`, whole revisions dropped oldest first) no longer holds the
//!   revision after the position, with the model's `oldest_available`.
//! - Finally the servers hold no watcher the client gave up (`watcher_count` in `stats()`).
//!
//! The server's limits are small so the interesting cases happen: a 32 KiB queue per
//! watcher, a 64 KiB write buffer (the smallest allowed) and, in two cases of three, a
//! history of 4 or 12 events (so resumes are refused). Readers stay far from these bounds (a
//! slow reader falls at most six steps behind), so their cancellation would be a bug; the
//! flood (800 writes of 1 KiB into the never-reader's range, pausing every 16 writes until
//! the reference watcher caught up) passes them several times over. Cases:
//! `PROPTEST_CASES` embedded (default 16), half that remote.

mod common;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::within;
use futures_util::{FutureExt, StreamExt};
use proptest::prelude::*;
use tessera_client::{
    Client, ClientError, EventKind, KeyRange, PutOptions, ScanItem, ShardRevision, Watch,
    WatchEvent, WatchMessage, WatchOptions,
};
use tokio::task::JoinHandle;

// ---------------------------------------------------------------------------------------
// The plan.

const PREFIXES: [&str; 2] = ["a/", "b/"];
const KEYS_PER_PREFIX: usize = 6;
const KEY_COUNT: usize = PREFIXES.len() * KEYS_PER_PREFIX;
const STEP_COUNT_MAX: usize = 30;

/// Per-watcher queue bound of the test servers: small, so the flood passes it quickly.
const WATCH_QUEUE_BYTES_MAX: u64 = 32 * 1024;
/// The smallest write buffer (and in-process channel room) the server accepts.
const WRITE_BUFFER_BYTES_MAX: usize = 64 * 1024;
/// Put-then-delete pairs of the flood that must cancel the watcher that never reads.
const FLOOD_PAIR_COUNT: usize = 400;
const FLOOD_VALUE_SIZE: usize = 1024;
/// Pairs of the flood between waits for the reference watcher: at most 16 events of about
/// 2 KiB (value and previous value) behind, well within its queue and write buffer.
const FLOOD_CHUNK_PAIR_COUNT: usize = 8;

/// Longest a wait for a message, a progress notification or a reclaim may take.
const WAIT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a watcher that must be cancelled may stay silent, or the servers may take to
/// drop the watchers the client gave up, before the test gives up.
const SILENCE_TIMEOUT: Duration = Duration::from_secs(1);
/// Longest one whole case may take.
const CASE_TIMEOUT: Duration = Duration::from_secs(40);

fn key_name(key: usize) -> Vec<u8> {
    format!(
        "{}{}",
        PREFIXES[key / KEYS_PER_PREFIX],
        key % KEYS_PER_PREFIX
    )
    .into_bytes()
}

#[derive(Debug, Clone)]
enum Step {
    Put {
        key: usize,
        value_size: usize,
    },
    Delete {
        key: usize,
    },
    PutWithTtl {
        key: usize,
        ttl_ms: u64,
    },
    MultiPut {
        entries: Vec<(usize, usize)>,
    },
    MultiDelete {
        keys: Vec<usize>,
    },
    /// Waits until every key put with a TTL so far has expired and been reclaimed.
    Sleep,
}

#[derive(Debug, Clone, Copy)]
enum RangeChoice {
    Prefix(usize),
    All,
    Key(usize),
    /// From the first key to the second (exclusive), or to the end of the keyspace.
    Between(usize, Option<usize>),
}

#[derive(Debug, Clone, Copy)]
enum Filter {
    Both,
    PutsOnly,
    DeletesOnly,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Opening {
    Now,
    Snapshot,
}

#[derive(Debug, Clone)]
struct WatcherPlan {
    range: RangeChoice,
    filter: Filter,
    previous: bool,
    opening: Opening,
    /// Opened before this step (reduced modulo the step count plus one).
    open_before: usize,
    /// Reads what has arrived after every `read_every` steps.
    read_every: usize,
    /// Dropped this many steps after opening, and reopened this many steps after that.
    resume: Option<(usize, usize)>,
}

#[derive(Debug, Clone)]
struct NeverReaderPlan {
    range: RangeChoice,
    filter: Filter,
    opening: Opening,
    open_before: usize,
}

#[derive(Debug, Clone)]
struct CasePlan {
    steps: Vec<Step>,
    watchers: Vec<WatcherPlan>,
    never_reader: NeverReaderPlan,
    history_events_max: usize,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        6 => (0..KEY_COUNT, 0..300_usize)
            .prop_map(|(key, value_size)| Step::Put { key, value_size }),
        3 => (0..KEY_COUNT).prop_map(|key| Step::Delete { key }),
        2 => (0..KEY_COUNT, 5..30_u64).prop_map(|(key, ttl_ms)| Step::PutWithTtl { key, ttl_ms }),
        2 => prop::collection::vec((0..KEY_COUNT, 0..200_usize), 1..6)
            .prop_map(|entries| Step::MultiPut { entries }),
        1 => prop::collection::vec(0..KEY_COUNT, 1..5).prop_map(|keys| Step::MultiDelete { keys }),
        1 => Just(Step::Sleep),
    ]
}

fn range_choice() -> impl Strategy<Value = RangeChoice> {
    prop_oneof![
        (0..PREFIXES.len()).prop_map(RangeChoice::Prefix),
        Just(RangeChoice::All),
        (0..KEY_COUNT).prop_map(RangeChoice::Key),
        (0..KEY_COUNT, 1..KEY_COUNT).prop_map(|(start, width)| {
            let end = start + width;
            RangeChoice::Between(start, (end < KEY_COUNT).then_some(end))
        }),
    ]
}

fn filter() -> impl Strategy<Value = Filter> {
    prop_oneof![
        2 => Just(Filter::Both),
        1 => Just(Filter::PutsOnly),
        1 => Just(Filter::DeletesOnly),
    ]
}

fn opening() -> impl Strategy<Value = Opening> {
    prop_oneof![Just(Opening::Now), Just(Opening::Snapshot)]
}

fn open_before() -> impl Strategy<Value = usize> {
    // A third open before the first step.
    prop_oneof![1 => Just(0_usize), 2 => 0..=STEP_COUNT_MAX]
}

fn watcher_plan() -> impl Strategy<Value = WatcherPlan> {
    (
        range_choice(),
        filter(),
        any::<bool>(),
        opening(),
        open_before(),
        prop_oneof![Just(1_usize), 2..=6_usize],
        prop::option::weighted(0.5, (1..8_usize, 1..12_usize)),
    )
        .prop_map(
            |(range, filter, previous, opening, open_before, read_every, resume)| WatcherPlan {
                range,
                filter,
                previous,
                opening,
                open_before,
                read_every,
                resume,
            },
        )
}

fn case_plan() -> impl Strategy<Value = CasePlan> {
    (
        prop::collection::vec(step(), 5..=STEP_COUNT_MAX),
        prop::collection::vec(watcher_plan(), 3..=6),
        (range_choice(), filter(), opening(), open_before()).prop_map(
            |(range, filter, opening, open_before)| NeverReaderPlan {
                range,
                filter,
                opening,
                open_before,
            },
        ),
        prop_oneof![Just(4_usize), Just(12_usize), Just(1024_usize)],
    )
        .prop_map(
            |(steps, watchers, never_reader, history_events_max)| CasePlan {
                steps,
                watchers,
                never_reader,
                history_events_max,
            },
        )
}

// ---------------------------------------------------------------------------------------
// The proptest entry points.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    #[cfg_attr(not(feature = "embedded"), allow(dead_code, reason = "embedded only"))]
    Embedded,
    Remote,
}

/// `PROPTEST_CASES` if set, else `default`.
fn case_count(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|text| text.parse().ok())
        .unwrap_or(default)
}

fn proptest_config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: None,
        // Each case runs a real cluster: keep shrinking (and a failing run) bounded.
        max_shrink_iters: 24,
        ..ProptestConfig::default()
    }
}

#[cfg(feature = "embedded")]
proptest! {
    #![proptest_config(proptest_config(case_count(16)))]

    /// Embedded shards: every watcher's stream is the model's, per core.
    #[test]
    fn embedded_watchers_see_exactly_the_model_stream(plan in case_plan()) {
        run_case(Mode::Embedded, &plan);
    }
}

proptest! {
    #![proptest_config(proptest_config((case_count(16) / 2).max(1)))]

    /// A server on loopback: every watcher's stream is the model's, per core.
    #[test]
    fn remote_watchers_see_exactly_the_model_stream(plan in case_plan()) {
        run_case(Mode::Remote, &plan);
    }
}

fn run_case(mode: Mode, plan: &CasePlan) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    runtime.block_on(within(CASE_TIMEOUT, "one case", run(mode, plan)));
}

// ---------------------------------------------------------------------------------------
// The cluster.

/// A fresh two-core cluster; stopped when dropped, also when a check panics.
struct Cluster {
    client: Option<Client>,
    server: Option<tessera_server::Server>,
    node_id: u32,
    /// Core ids in topology order.
    core_ids: Vec<u16>,
    /// The core of each model key.
    key_cores: Vec<u16>,
}

impl Cluster {
    async fn start(mode: Mode, history_events_max: usize) -> Self {
        let config = tessera_server::Config {
            watch_history_events_max: history_events_max,
            watch_queue_bytes_max: WATCH_QUEUE_BYTES_MAX,
            connection_write_buffer_bytes_max: WRITE_BUFFER_BYTES_MAX,
            shutdown_timeout_ms: 1_000,
            ..common::test_config(common::CORE_COUNT)
        };
        let (client, server) = match mode {
            #[cfg(feature = "embedded")]
            Mode::Embedded => (
                Client::embedded(config).expect("the embedded shards start"),
                None,
            ),
            #[cfg(not(feature = "embedded"))]
            Mode::Embedded => unreachable!("embedded cases need the embedded feature"),
            Mode::Remote => {
                let server = tessera_server::Server::start(config).expect("the server starts");
                // The client buffers a watch's pushes like the server's write buffer, so a
                // watcher that never reads lags as soon in either mode.
                let settings = tessera_client::ClientConfig {
                    watch_buffer_bytes_max: WRITE_BUFFER_BYTES_MAX,
                    ..tessera_client::ClientConfig::new(server.addresses())
                };
                let connect = Client::connect_with(settings);
                let client = within(WAIT_TIMEOUT, "connect", connect)
                    .await
                    .expect("the server accepts the handshake");
                (client, Some(server))
            }
        };
        let topology = client.topology();
        assert_eq!(topology.nodes.len(), 1, "one node");
        let node_id = topology.nodes[0].node_id;
        let core_ids: Vec<u16> = topology.nodes[0]
            .cores
            .iter()
            .map(|core| core.core_id)
            .collect();
        let key_cores: Vec<u16> = (0..KEY_COUNT)
            .map(|key| core_ids[common::core_of_key(&topology, &key_name(key))])
            .collect();
        for (prefix_index, prefix) in PREFIXES.iter().enumerate() {
            let cores: BTreeSet<u16> = key_cores
                [prefix_index * KEYS_PER_PREFIX..(prefix_index + 1) * KEYS_PER_PREFIX]
                .iter()
                .copied()
                .collect();
            assert_eq!(
                cores.len(),
                core_ids.len(),
                "the keys under {prefix} must spread over every core: {key_cores:?}"
            );
        }
        Self {
            client: Some(client),
            server,
            node_id,
            core_ids,
            key_cores,
        }
    }

    fn client(&self) -> &Client {
        self.client
            .as_ref()
            .expect("the client lives until the cluster stops")
    }

    async fn stats(&self) -> Vec<tessera_client::CoreStats> {
        within(WAIT_TIMEOUT, "stats", self.client().stats())
            .await
            .expect("stats")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Some(client) = self.client.take() {
            client.shutdown();
        }
        if let Some(server) = self.server.take() {
            let _ = server.shutdown();
        }
    }
}

// ---------------------------------------------------------------------------------------
// The model of the store.

/// One revision's events, as a watcher of everything with previous values sees them.
type Batches = Vec<(u64, Vec<WatchEvent>)>;

#[derive(Debug, Clone)]
struct KeyState {
    value: Vec<u8>,
    create_revision: u64,
    version: u64,
}

/// The events one client call must publish on one core.
#[derive(Debug, Clone)]
struct ModelBatch {
    core_id: u16,
    /// Client calls made before this one: watchers opened at boundary `b` come after every
    /// batch with a smaller boundary and before every other.
    boundary: usize,
    /// From the reply (writes), or learned from the reference (deletes).
    revision: Option<u64>,
    events: Vec<WatchEvent>,
}

/// A key put with a TTL, which must expire exactly once.
#[derive(Debug, Clone)]
struct TtlPut {
    key: Vec<u8>,
    core_id: u16,
    value: Vec<u8>,
    /// Index of its put in `Model::batches`.
    put_batch: usize,
    deadline: Instant,
    /// The boundary after the sleep that waited for it: it expired before any write from
    /// there on.
    reclaimed_by: Option<usize>,
    revision: Option<u64>,
}

#[derive(Debug, Default)]
struct Model {
    keys: BTreeMap<usize, KeyState>,
    batches: Vec<ModelBatch>,
    ttl_puts: Vec<TtlPut>,
    /// Keys put with a TTL that have not been reclaimed yet (index into `ttl_puts`). No step
    /// touches them, since whether the server reclaimed them yet is a matter of timing.
    doomed: BTreeMap<usize, usize>,
    boundary: usize,
    value_count: u64,
}

impl Model {
    /// A fresh value of about `size` bytes, unique in the case.
    fn value(&mut self, size: usize) -> Vec<u8> {
        self.value_count += 1;
        let mut value = format!("{}:", self.value_count).into_bytes();
        value.resize(value.len().max(size), b'x');
        value
    }

    fn put_event(&mut self, key: usize, value: &[u8], revision: u64) -> WatchEvent {
        let before = self.keys.get(&key).cloned();
        let (create_revision, version) = match &before {
            Some(state) => (state.create_revision, state.version + 1),
            None => (revision, 1),
        };
        self.keys.insert(
            key,
            KeyState {
                value: value.to_vec(),
                create_revision,
                version,
            },
        );
        WatchEvent {
            key: key_name(key),
            kind: EventKind::Put {
                create_revision,
                version,
            },
            value: value.to_vec(),
            previous: before.map(|state| state.value),
            fields: Vec::new(),
        }
    }

    fn delete_event(&mut self, key: usize) -> Option<WatchEvent> {
        let before = self.keys.remove(&key)?;
        Some(WatchEvent {
            key: key_name(key),
            kind: EventKind::Deleted,
            value: Vec::new(),
            previous: Some(before.value),
            fields: Vec::new(),
        })
    }

    fn push(&mut self, core_id: u16, revision: Option<u64>, events: Vec<WatchEvent>) {
        assert!(!events.is_empty(), "a model batch has events");
        self.batches.push(ModelBatch {
            core_id,
            boundary: self.boundary,
            revision,
            events,
        });
    }

    /// Revisions each core reaches once every TTL put so far has expired.
    fn revision_counts(&self, cluster: &Cluster) -> BTreeMap<u16, u64> {
        let mut counts: BTreeMap<u16, u64> =
            cluster.core_ids.iter().map(|&core| (core, 0)).collect();
        for batch in &self.batches {
            *counts.entry(batch.core_id).or_default() += 1;
        }
        for ttl_put in &self.ttl_puts {
            *counts.entry(ttl_put.core_id).or_default() += 1;
        }
        counts
    }

    async fn apply(&mut self, cluster: &Cluster, reference: &Reference, step: &Step) {
        match step {
            Step::Put { key, value_size } => {
                if !self.doomed.contains_key(key) {
                    let value = self.value(*value_size);
                    self.put(cluster, *key, value, None).await;
                }
            }
            Step::PutWithTtl { key, ttl_ms } => {
                if !self.doomed.contains_key(key) {
                    let value = self.value(8);
                    self.put(cluster, *key, value, Some(*ttl_ms)).await;
                }
            }
            Step::Delete { key } => {
                if !self.doomed.contains_key(key) {
                    self.delete(cluster, *key).await;
                }
            }
            Step::MultiPut { entries } => {
                let entries: Vec<(usize, usize)> = entries
                    .iter()
                    .copied()
                    .filter(|(key, _)| !self.doomed.contains_key(key))
                    .collect();
                if !entries.is_empty() {
                    let entries: Vec<(usize, Vec<u8>)> = entries
                        .into_iter()
                        .map(|(key, size)| (key, self.value(size)))
                        .collect();
                    self.multi_put(cluster, &entries).await;
                }
            }
            Step::MultiDelete { keys } => {
                let keys: Vec<usize> = keys
                    .iter()
                    .copied()
                    .filter(|key| !self.doomed.contains_key(key))
                    .collect();
                if !keys.is_empty() {
                    self.multi_delete(cluster, &keys).await;
                }
            }
            Step::Sleep => self.expire_all(cluster, reference).await,
        }
    }

    async fn put(&mut self, cluster: &Cluster, key: usize, value: Vec<u8>, ttl_ms: Option<u64>) {
        let options = match ttl_ms {
            Some(ttl_ms) => PutOptions::new().ttl(Duration::from_millis(ttl_ms)),
            None => PutOptions::new(),
        };
        let started = Instant::now();
        let put = cluster.client().put_with(key_name(key), &value, options);
        let outcome = within(WAIT_TIMEOUT, "put", put).await.expect("put");
        assert!(outcome.applied, "an unconditional put applies");
        let core_id = cluster.key_cores[key];
        let event = self.put_event(key, &value, outcome.mod_revision);
        self.push(core_id, Some(outcome.mod_revision), vec![event]);
        if let Some(ttl_ms) = ttl_ms {
            self.ttl_puts.push(TtlPut {
                key: key_name(key),
                core_id,
                value,
                put_batch: self.batches.len() - 1,
                deadline: started + Duration::from_millis(ttl_ms),
                reclaimed_by: None,
                revision: None,
            });
            self.doomed.insert(key, self.ttl_puts.len() - 1);
        }
        self.boundary += 1;
    }

    async fn delete(&mut self, cluster: &Cluster, key: usize) {
        let delete = cluster.client().delete(key_name(key));
        let existed = within(WAIT_TIMEOUT, "delete", delete)
            .await
            .expect("delete");
        let event = self.delete_event(key);
        assert_eq!(
            existed,
            event.is_some(),
            "delete of {:?}: the model says it existed: {}",
            String::from_utf8_lossy(&key_name(key)),
            event.is_some()
        );
        if let Some(event) = event {
            self.push(cluster.key_cores[key], None, vec![event]);
        }
        self.boundary += 1;
    }

    async fn multi_put(&mut self, cluster: &Cluster, entries: &[(usize, Vec<u8>)]) {
        let pairs: Vec<(Vec<u8>, Vec<u8>)> = entries
            .iter()
            .map(|(key, value)| (key_name(*key), value.clone()))
            .collect();
        let mput = cluster.client().mput(&pairs);
        let revisions = within(WAIT_TIMEOUT, "mput", mput).await.expect("mput");
        assert_eq!(revisions.len(), entries.len(), "one revision per entry");
        let mut per_core: BTreeMap<u16, (u64, Vec<WatchEvent>)> = BTreeMap::new();
        for ((key, value), &revision) in entries.iter().zip(&revisions) {
            let core_id = cluster.key_cores[*key];
            let event = self.put_event(*key, value, revision);
            let (core_revision, events) = per_core
                .entry(core_id)
                .or_insert_with(|| (revision, Vec::new()));
            assert_eq!(
                *core_revision, revision,
                "the entries of one core share one revision: {revisions:?}"
            );
            events.push(event);
        }
        for (core_id, (revision, events)) in per_core {
            self.push(core_id, Some(revision), events);
        }
        self.boundary += 1;
    }

    async fn multi_delete(&mut self, cluster: &Cluster, keys: &[usize]) {
        let names: Vec<Vec<u8>> = keys.iter().map(|&key| key_name(key)).collect();
        let mdelete = cluster.client().mdelete(&names);
        let deleted = within(WAIT_TIMEOUT, "mdelete", mdelete)
            .await
            .expect("mdelete");
        let mut expected = Vec::new();
        let mut per_core: BTreeMap<u16, Vec<WatchEvent>> = BTreeMap::new();
        for &key in keys {
            let event = self.delete_event(key);
            expected.push(event.is_some());
            if let Some(event) = event {
                per_core
                    .entry(cluster.key_cores[key])
                    .or_default()
                    .push(event);
            }
        }
        assert_eq!(deleted, expected, "mdelete of {keys:?}");
        for (core_id, events) in per_core {
            self.push(core_id, None, events);
        }
        self.boundary += 1;
    }

    /// Sleeps past every outstanding TTL, then waits until the reference watcher has seen
    /// every core reach the revision that counts their reclaims.
    async fn expire_all(&mut self, cluster: &Cluster, reference: &Reference) {
        let Some(deadline) = self
            .doomed
            .values()
            .map(|&index| self.ttl_puts[index].deadline)
            .max()
        else {
            return;
        };
        // Past the deadline, the next expiry tick (10 ms) reclaims the key.
        tokio::time::sleep_until((deadline + Duration::from_millis(15)).into()).await;
        reference
            .wait_for(&self.revision_counts(cluster), "the TTL keys to expire")
            .await;
        for (&key, &index) in &self.doomed {
            self.keys.remove(&key);
            self.ttl_puts[index].reclaimed_by = Some(self.boundary);
        }
        self.doomed.clear();
    }

    /// Put-then-delete pairs over `keys`, with values of `FLOOD_VALUE_SIZE` bytes. Every
    /// `FLOOD_CHUNK_PAIR_COUNT` pairs it waits for the reference watcher: a writer that
    /// never waits outruns any reader (the reader's path has more hops than the writer's),
    /// and a reader that falls behind is rightly cancelled.
    async fn flood(&mut self, cluster: &Cluster, reference: &Reference, keys: &[usize]) {
        for index in 0..FLOOD_PAIR_COUNT {
            let key = keys[index % keys.len()];
            let value = self.value(FLOOD_VALUE_SIZE);
            self.put(cluster, key, value, None).await;
            self.delete(cluster, key).await;
            if index % FLOOD_CHUNK_PAIR_COUNT == FLOOD_CHUNK_PAIR_COUNT - 1 {
                reference
                    .wait_for(
                        &self.revision_counts(cluster),
                        "the reference to follow the flood",
                    )
                    .await;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// The reference watcher.

#[derive(Debug, Default)]
struct ReferenceLog {
    cores: BTreeMap<u16, Batches>,
    fault: Option<String>,
}

/// A watcher on everything with previous values, drained by its own task so it never lags.
struct Reference {
    log: Arc<Mutex<ReferenceLog>>,
    task: JoinHandle<()>,
}

impl Reference {
    async fn open(cluster: &Cluster) -> Self {
        let mut opening = Follower::new(
            "the reference watcher".to_owned(),
            cluster,
            RangeChoice::All,
            Filter::Both,
            true,
            Opening::Now,
            Reading::Every(1),
            0,
            None,
        );
        opening.open(cluster, None, 0, BTreeMap::new()).await;
        for core_id in &cluster.core_ids {
            assert_eq!(
                opening.segments[0].progress.get(core_id),
                Some(&0),
                "the reference watcher starts at revision 0 on core {core_id}"
            );
        }
        assert!(opening.faults.is_empty(), "{:?}", opening.faults);
        let mut watch = opening.watch.take().expect("the reference watch is open");
        let log = Arc::new(Mutex::new(ReferenceLog::default()));
        let task_log = log.clone();
        let task = tokio::spawn(async move {
            while let Some(item) = watch.next().await {
                let mut log = task_log.lock().expect("the reference log");
                match item {
                    Ok(WatchMessage::Events { shard, events }) => log
                        .cores
                        .entry(shard.core_id)
                        .or_default()
                        .push((shard.revision, events)),
                    Ok(WatchMessage::Progress(_)) => {}
                    Ok(other) => {
                        log.fault = Some(format!("the reference watcher yielded {other:?}"));
                        return;
                    }
                    Err(error) => {
                        log.fault = Some(format!("the reference watcher failed: {error}"));
                        return;
                    }
                }
            }
            task_log.lock().expect("the reference log").fault =
                Some("the reference watcher ended".to_owned());
        });
        Self { log, task }
    }

    /// The last revision seen from each core.
    fn floor(&self) -> BTreeMap<u16, u64> {
        let log = self.log.lock().expect("the reference log");
        log.cores
            .iter()
            .map(|(&core_id, batches)| {
                (core_id, batches.last().map_or(0, |(revision, _)| *revision))
            })
            .collect()
    }

    async fn wait_for(&self, targets: &BTreeMap<u16, u64>, what: &str) {
        let started = Instant::now();
        loop {
            {
                let log = self.log.lock().expect("the reference log");
                if let Some(fault) = &log.fault {
                    panic!("waiting for {what}: {fault}");
                }
            }
            let floor = self.floor();
            let is_done = targets
                .iter()
                .all(|(core_id, &target)| floor.get(core_id).copied().unwrap_or(0) >= target);
            if is_done {
                return;
            }
            assert!(
                started.elapsed() < WAIT_TIMEOUT,
                "waiting for {what}: the reference watcher reached {floor:?}, not {targets:?}"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    async fn stop(self) -> BTreeMap<u16, Batches> {
        self.task.abort();
        let _ = self.task.await;
        let log = self.log.lock().expect("the reference log");
        log.cores.clone()
    }
}

// ---------------------------------------------------------------------------------------
// The watchers under test.

#[derive(Debug, Clone)]
struct Spec {
    range: KeyRange,
    puts: bool,
    deletes: bool,
    previous: bool,
}

impl Spec {
    fn new(range: RangeChoice, filter: Filter, previous: bool) -> Self {
        let range = match range {
            RangeChoice::Prefix(prefix) => KeyRange::prefix(PREFIXES[prefix]),
            RangeChoice::All => KeyRange::all(),
            RangeChoice::Key(key) => KeyRange::key(key_name(key)),
            RangeChoice::Between(start, Some(end)) => {
                KeyRange::between(key_name(start), key_name(end))
            }
            RangeChoice::Between(start, None) => KeyRange::from(key_name(start)),
        };
        Self {
            range,
            puts: !matches!(filter, Filter::DeletesOnly),
            deletes: !matches!(filter, Filter::PutsOnly),
            previous,
        }
    }

    fn contains(&self, key: &[u8]) -> bool {
        key >= self.range.start.as_slice() && self.range.end.as_deref().is_none_or(|end| key < end)
    }

    fn matches(&self, event: &WatchEvent) -> bool {
        self.contains(&event.key)
            && if matches!(event.kind, EventKind::Put { .. }) {
                self.puts
            } else {
                self.deletes
            }
    }

    fn shaped(&self, event: &WatchEvent) -> WatchEvent {
        WatchEvent {
            previous: if self.previous {
                event.previous.clone()
            } else {
                None
            },
            ..event.clone()
        }
    }

    fn options(&self) -> WatchOptions {
        let mut options = WatchOptions::new();
        if !self.puts {
            options = options.deletes_only();
        }
        if !self.deletes {
            options = options.puts_only();
        }
        if self.previous {
            options = options.previous();
        }
        options
    }

    /// The events of `batches` this watcher must see over `(after, through]`.
    fn expected(&self, batches: &Batches, after: u64, through: u64) -> Batches {
        batches
            .iter()
            .filter(|(revision, _)| *revision > after && *revision <= through)
            .filter_map(|(revision, events)| {
                let events: Vec<WatchEvent> = events
                    .iter()
                    .filter(|event| self.matches(event))
                    .map(|event| self.shaped(event))
                    .collect();
                (!events.is_empty()).then_some((*revision, events))
            })
            .collect()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reading {
    Every(usize),
    Never,
}

/// What one core of a watch yielded.
#[derive(Debug, Default)]
struct Seen {
    events: Batches,
    snapshot: Option<(u64, Vec<ScanItem>)>,
    /// The last revision yielded (events, snapshot or progress).
    last: u64,
    progress_max: Option<u64>,
}

/// One opening of a watch: the first, or a resume.
#[derive(Debug)]
struct Segment {
    boundary: usize,
    /// The reference watcher's revisions just before the opening: the shard was past them.
    floor: BTreeMap<u16, u64>,
    after: Option<Vec<ShardRevision>>,
    /// The first progress notification from each core after the opening.
    progress: BTreeMap<u16, u64>,
}

struct Follower {
    name: String,
    spec: Spec,
    node_id: u32,
    cores: Vec<u16>,
    opening: Opening,
    reading: Reading,
    open_before: usize,
    /// (drop before step, reopen before step)
    resume: Option<(usize, usize)>,
    /// The positions it was dropped at, until it resumes.
    dropped_at: Option<Vec<ShardRevision>>,
    watch: Option<Watch>,
    seen: BTreeMap<u16, Seen>,
    segments: Vec<Segment>,
    ending: Option<ClientError>,
    faults: Vec<String>,
}

impl Follower {
    #[allow(clippy::too_many_arguments, reason = "one per field of a plan")]
    fn new(
        name: String,
        cluster: &Cluster,
        range: RangeChoice,
        filter: Filter,
        previous: bool,
        opening: Opening,
        reading: Reading,
        open_before: usize,
        resume: Option<(usize, usize)>,
    ) -> Self {
        let cores = match range {
            RangeChoice::Key(key) => vec![cluster.key_cores[key]],
            _ => cluster.core_ids.clone(),
        };
        Self {
            name,
            spec: Spec::new(range, filter, previous),
            node_id: cluster.node_id,
            cores,
            opening,
            reading,
            open_before,
            resume,
            dropped_at: None,
            watch: None,
            seen: BTreeMap::new(),
            segments: Vec::new(),
            ending: None,
            faults: Vec::new(),
        }
    }

    fn from_plan(index: usize, plan: &WatcherPlan, cluster: &Cluster, step_count: usize) -> Self {
        let open_before = plan.open_before % (step_count + 1);
        let resume = plan.resume.and_then(|(after_open, gap)| {
            let drop_before = open_before + after_open;
            (drop_before < step_count).then(|| (drop_before, (drop_before + gap).min(step_count)))
        });
        Self::new(
            format!("watcher {index} {plan:?}"),
            cluster,
            plan.range,
            plan.filter,
            plan.previous,
            plan.opening,
            Reading::Every(plan.read_every),
            open_before,
            resume,
        )
    }

    fn never_reader(plan: &NeverReaderPlan, cluster: &Cluster, step_count: usize) -> Self {
        Self::new(
            format!("the watcher that never reads {plan:?}"),
            cluster,
            plan.range,
            plan.filter,
            // Deletes weigh as much as puts, so the flood passes its bounds either way.
            true,
            plan.opening,
            Reading::Never,
            plan.open_before % (step_count + 1),
            None,
        )
    }

    /// Opens the watch (a resume if `after` is given) and waits until every core has
    /// registered it: a snapshot from each, or a progress notification.
    async fn open(
        &mut self,
        cluster: &Cluster,
        after: Option<Vec<ShardRevision>>,
        boundary: usize,
        floor: BTreeMap<u16, u64>,
    ) {
        let options = match (&after, self.opening) {
            (Some(positions), _) => self.spec.options().after(positions.clone()),
            (None, Opening::Now) => self.spec.options(),
            (None, Opening::Snapshot) => self.spec.options().snapshot(),
        };
        let watch = cluster.client().watch(&self.spec.range, options);
        let opened = within(WAIT_TIMEOUT, "watch", watch).await;
        let is_snapshot = after.is_none() && self.opening == Opening::Snapshot;
        let is_resume = after.is_some();
        self.segments.push(Segment {
            boundary,
            floor,
            after,
            progress: BTreeMap::new(),
        });
        match opened {
            Ok(watch) => self.watch = Some(watch),
            // A resume the history no longer covers is refused by `watch` itself; the model
            // judges the refusal like any ending.
            Err(error @ ClientError::Compacted { .. }) if is_resume => {
                self.ending = Some(error);
                return;
            }
            Err(error) => panic!("{}: watch refused: {error}", self.name),
        }
        if is_snapshot {
            self.read_until("a snapshot from every core", |follower| {
                follower.cores.iter().all(|core_id| {
                    follower
                        .seen
                        .get(core_id)
                        .is_some_and(|seen| seen.snapshot.is_some())
                })
            })
            .await;
        } else {
            self.read_until("a progress notification from every core", |follower| {
                let segment = follower.segments.last().expect("a segment was pushed");
                follower
                    .cores
                    .iter()
                    .all(|core_id| segment.progress.contains_key(core_id))
            })
            .await;
        }
    }

    /// Drops the watch, after checking that its positions are what it yielded.
    fn close(&mut self) -> Option<Vec<ShardRevision>> {
        let watch = self.watch.take()?;
        let mut positions = watch.positions();
        positions.sort_by_key(|position| position.core_id);
        let yielded: Vec<ShardRevision> = self
            .cores
            .iter()
            .map(|&core_id| ShardRevision {
                node_id: self.node_id,
                core_id,
                revision: self.seen.get(&core_id).map_or(0, |seen| seen.last),
            })
            .collect();
        if positions != yielded {
            self.faults.push(format!(
                "positions() {positions:?} are not the last revisions yielded {yielded:?}"
            ));
        }
        Some(positions)
    }

    /// Records everything that has already arrived.
    fn drain_ready(&mut self) {
        while let Some(watch) = &mut self.watch {
            match watch.next().now_or_never() {
                Some(item) => self.record(item),
                None => break,
            }
        }
    }

    /// Reads until `is_done` holds or the stream ends, asking for progress every so often.
    async fn read_until(&mut self, what: &str, is_done: impl Fn(&Self) -> bool) {
        let started = Instant::now();
        while !is_done(self) {
            let Some(watch) = &mut self.watch else { return };
            watch.request_progress();
            match tokio::time::timeout(Duration::from_millis(200), watch.next()).await {
                Ok(item) => self.record(item),
                Err(_) => assert!(
                    started.elapsed() < WAIT_TIMEOUT,
                    "{}: {what} did not come within {WAIT_TIMEOUT:?}; seen {:?}",
                    self.name,
                    self.seen
                ),
            }
        }
    }

    /// Reads until every core has said it delivered everything through `through`.
    async fn sync(&mut self, through: &BTreeMap<u16, u64>) {
        self.read_until("progress to the last revision", |follower| {
            follower.cores.iter().all(|core_id| {
                follower
                    .seen
                    .get(core_id)
                    .and_then(|seen| seen.progress_max)
                    .is_some_and(|progress| progress >= through[core_id])
            })
        })
        .await;
    }

    /// Reads everything a watcher that must be cancelled has, up to its error.
    async fn read_to_error(&mut self) {
        while let Some(watch) = &mut self.watch {
            if let Ok(item) = tokio::time::timeout(SILENCE_TIMEOUT, watch.next()).await {
                self.record(item);
            } else {
                self.faults.push(format!(
                    "not cancelled: silent for {SILENCE_TIMEOUT:?} after the flood"
                ));
                self.watch = None;
            }
        }
    }

    fn record(&mut self, item: Option<tessera_client::Result<WatchMessage>>) {
        match item {
            None => {
                self.faults
                    .push("the stream ended without an error".to_owned());
                self.watch = None;
            }
            Some(Err(error)) => {
                if let Some(watch) = &mut self.watch {
                    if !matches!(watch.next().now_or_never(), Some(None)) {
                        self.faults
                            .push(format!("the stream goes on after {error:?}"));
                    }
                }
                self.ending = Some(error);
                self.watch = None;
            }
            Some(Ok(message)) => self.record_message(message),
        }
    }

    fn record_message(&mut self, message: WatchMessage) {
        let shard = message.shard();
        if !self.cores.contains(&shard.core_id) || shard.node_id != self.node_id {
            self.faults.push(format!(
                "a message from a shard it does not watch: {message:?}"
            ));
            return;
        }
        let is_first_segment = self.segments.len() == 1;
        let segment = self.segments.last_mut().expect("a watch is open");
        let seen = self.seen.entry(shard.core_id).or_default();
        match message {
            WatchMessage::Snapshot { items, .. } => {
                let is_first = is_first_segment
                    && seen.snapshot.is_none()
                    && seen.events.is_empty()
                    && seen.progress_max.is_none();
                if !is_first || self.opening != Opening::Snapshot {
                    self.faults
                        .push(format!("a snapshot that is not first, at {shard:?}"));
                }
                seen.snapshot = Some((shard.revision, items));
                seen.last = shard.revision;
            }
            WatchMessage::Events { events, .. } => {
                if shard.revision <= seen.last {
                    self.faults.push(format!(
                        "core {}: revision {} after {}: repeated or out of order",
                        shard.core_id, shard.revision, seen.last
                    ));
                }
                if events.is_empty() {
                    self.faults.push(format!("an empty batch at {shard:?}"));
                }
                seen.events.push((shard.revision, events));
                seen.last = shard.revision;
            }
            WatchMessage::Progress(_) => {
                if shard.revision < seen.last {
                    self.faults.push(format!(
                        "core {}: progress {} after revision {}",
                        shard.core_id, shard.revision, seen.last
                    ));
                }
                seen.last = seen.last.max(shard.revision);
                seen.progress_max = seen.progress_max.max(Some(shard.revision));
                segment
                    .progress
                    .entry(shard.core_id)
                    .or_insert(shard.revision);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// One case.

async fn run(mode: Mode, plan: &CasePlan) {
    let cluster = Cluster::start(mode, plan.history_events_max).await;
    let mut model = Model::default();
    let reference = Reference::open(&cluster).await;
    let step_count = plan.steps.len();
    let mut followers: Vec<Follower> = plan
        .watchers
        .iter()
        .enumerate()
        .map(|(index, watcher)| Follower::from_plan(index, watcher, &cluster, step_count))
        .collect();
    let mut never_reader = Follower::never_reader(&plan.never_reader, &cluster, step_count);

    // Phase 1: the steps, with watchers opening, reading, dropping and resuming.
    for index in 0..=step_count {
        for follower in followers.iter_mut().chain([&mut never_reader]) {
            if follower.open_before == index {
                let floor = reference.floor();
                follower.open(&cluster, None, model.boundary, floor).await;
            }
            match follower.resume {
                Some((drop_before, _)) if drop_before == index => {
                    follower.drain_ready();
                    follower.dropped_at = follower.close();
                    if follower.dropped_at.is_none() {
                        // It ended already: nothing to resume.
                        follower.resume = None;
                    }
                }
                Some((_, reopen_before)) if reopen_before == index => {
                    let positions = follower
                        .dropped_at
                        .take()
                        .expect("positions were taken when it was dropped");
                    let floor = reference.floor();
                    follower
                        .open(&cluster, Some(positions), model.boundary, floor)
                        .await;
                }
                _ => {}
            }
        }
        let Some(step) = plan.steps.get(index) else {
            break;
        };
        model.apply(&cluster, &reference, step).await;
        for follower in &mut followers {
            if let Reading::Every(read_every) = follower.reading {
                if index % read_every == 0 {
                    follower.drain_ready();
                }
            }
        }
    }
    model.expire_all(&cluster, &reference).await;
    let phase_one = model.revision_counts(&cluster);
    reference.wait_for(&phase_one, "the end of the steps").await;
    for follower in &mut followers {
        follower.sync(&phase_one).await;
        follower.watch = None;
    }

    // Phase 2: a flood into the range of the watcher that never reads.
    let flood_keys: Vec<usize> = (0..KEY_COUNT)
        .filter(|&key| never_reader.spec.contains(&key_name(key)))
        .collect();
    assert!(!flood_keys.is_empty(), "every range holds a model key");
    model.flood(&cluster, &reference, &flood_keys).await;
    let last = model.revision_counts(&cluster);
    reference.wait_for(&last, "the end of the flood").await;
    never_reader.read_to_error().await;

    // Every watcher but the reference is gone: the servers must hold no other.
    let mut faults = Vec::new();
    wait_for_watchers(&cluster, 1, &mut faults).await;
    for stats in cluster.stats().await {
        if stats.revision != last[&stats.core_id] {
            faults.push(format!(
                "core {} is at revision {}, the model at {}",
                stats.core_id, stats.revision, last[&stats.core_id]
            ));
        }
    }
    let reference_batches = reference.stop().await;
    wait_for_watchers(&cluster, 0, &mut faults).await;

    // The checks.
    let world = World::validate(&cluster, &mut model, reference_batches, &last, plan);
    for follower in &followers {
        faults.extend(
            world
                .check(follower, &phase_one)
                .into_iter()
                .map(|fault| format!("{}: {fault}", follower.name)),
        );
    }
    faults.extend(
        world
            .check(&never_reader, &last)
            .into_iter()
            .map(|fault| format!("{}: {fault}", never_reader.name)),
    );
    assert!(
        faults.is_empty(),
        "{mode:?}: {} faults:\n{}",
        faults.len(),
        faults.join("\n")
    );
}

/// Waits until every core holds `count` watchers, and records a fault if one does not.
async fn wait_for_watchers(cluster: &Cluster, count: u64, faults: &mut Vec<String>) {
    let started = Instant::now();
    loop {
        let stats = cluster.stats().await;
        if stats.iter().all(|core| core.watcher_count == count) {
            return;
        }
        if started.elapsed() > SILENCE_TIMEOUT {
            let counts: Vec<(u16, u64, u64)> = stats
                .iter()
                .map(|core| (core.core_id, core.watcher_count, core.watch_queued_bytes))
                .collect();
            faults.push(format!(
                "(core, watchers, queued bytes) are {counts:?}; every core should hold {count} \
                 watchers once the client dropped the others"
            ));
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

// ---------------------------------------------------------------------------------------
// The checks.

/// Everything that happened, validated: each core's revisions with their events, and the
/// revisions of the model's calls.
struct World {
    batches: BTreeMap<u16, Batches>,
    /// (boundary, revision) of each model batch, per core, in order.
    calls: BTreeMap<u16, Vec<(usize, u64)>>,
    /// Per core, indexed by revision: the oldest revision a resume may start after once
    /// the shard applied that revision.
    compacted_through: BTreeMap<u16, Vec<u64>>,
    /// (core, revision, key) of the puts with a TTL.
    ttl_puts: BTreeSet<(u16, u64, Vec<u8>)>,
    last: BTreeMap<u16, u64>,
}

impl World {
    /// Checks the reference watcher's stream against the model (panics on a mismatch, as
    /// every other check depends on it) and assigns the model's deletes their revisions.
    fn validate(
        cluster: &Cluster,
        model: &mut Model,
        mut batches: BTreeMap<u16, Batches>,
        last: &BTreeMap<u16, u64>,
        plan: &CasePlan,
    ) -> Self {
        let mut calls: BTreeMap<u16, Vec<(usize, u64)>> = BTreeMap::new();
        let mut compacted_through = BTreeMap::new();
        for &core_id in &cluster.core_ids {
            let core_batches = batches.entry(core_id).or_default();
            let revisions: Vec<u64> = core_batches.iter().map(|(revision, _)| *revision).collect();
            let expected: Vec<u64> = (1..=last[&core_id]).collect();
            assert_eq!(
                revisions, expected,
                "core {core_id}: the reference watcher's revisions"
            );
            let mut model_batches = model
                .batches
                .iter_mut()
                .filter(|batch| batch.core_id == core_id);
            let mut ttl_puts: VecDeque<&mut TtlPut> = model
                .ttl_puts
                .iter_mut()
                .filter(|ttl_put| ttl_put.core_id == core_id)
                .collect();
            let mut core_calls = Vec::new();
            for (revision, events) in core_batches.iter() {
                if events.iter().any(|event| event.kind == EventKind::Expired) {
                    check_expiry(core_id, *revision, events, &mut ttl_puts);
                    continue;
                }
                let batch = model_batches.next().unwrap_or_else(|| {
                    panic!("core {core_id}: revision {revision} {events:?} is not in the model")
                });
                assert_eq!(
                    &batch.events, events,
                    "core {core_id}: the events of revision {revision}"
                );
                if let Some(known) = batch.revision {
                    assert_eq!(known, *revision, "core {core_id}: the reply's revision");
                }
                batch.revision = Some(*revision);
                core_calls.push((batch.boundary, *revision));
            }
            assert!(
                model_batches.next().is_none(),
                "core {core_id}: the reference watcher missed model batches"
            );
            assert!(
                ttl_puts.is_empty(),
                "core {core_id}: keys never expired: {ttl_puts:?}"
            );
            compacted_through.insert(core_id, compaction(core_batches, plan.history_events_max));
            calls.insert(core_id, core_calls);
        }
        // Each key expired before the first write on its core after the sleep that waited.
        for ttl_put in &model.ttl_puts {
            let put_revision = model.batches[ttl_put.put_batch].revision;
            let expired = ttl_put.revision.expect("matched above");
            assert!(
                put_revision.is_some_and(|put| put < expired),
                "{ttl_put:?} expired before its put"
            );
            let reclaimed_by = ttl_put.reclaimed_by.expect("every TTL key was waited for");
            let next_write = calls[&ttl_put.core_id]
                .iter()
                .find(|(boundary, _)| *boundary >= reclaimed_by);
            if let Some((_, next)) = next_write {
                assert!(
                    expired < *next,
                    "{ttl_put:?} expired at {expired}, after the write at {next}"
                );
            }
        }
        let ttl_puts = model
            .ttl_puts
            .iter()
            .map(|ttl_put| {
                let revision = model.batches[ttl_put.put_batch]
                    .revision
                    .expect("assigned above");
                (ttl_put.core_id, revision, ttl_put.key.clone())
            })
            .collect();
        Self {
            batches,
            calls,
            compacted_through,
            ttl_puts,
            last: last.clone(),
        }
    }

    /// The shard revision was at least this when a watch opened at `boundary` registered.
    fn low(&self, core_id: u16, boundary: usize, floor: &BTreeMap<u16, u64>) -> u64 {
        let before = self.calls[&core_id]
            .iter()
            .filter(|(call_boundary, _)| *call_boundary < boundary)
            .map(|(_, revision)| *revision)
            .max()
            .unwrap_or(0);
        before.max(floor.get(&core_id).copied().unwrap_or(0))
    }

    /// The shard revision was at most this when a watch opened at `boundary` registered.
    fn high(&self, core_id: u16, boundary: usize) -> u64 {
        self.calls[&core_id]
            .iter()
            .find(|(call_boundary, _)| *call_boundary >= boundary)
            .map_or(self.last[&core_id], |(_, revision)| revision - 1)
    }

    fn check(&self, follower: &Follower, through: &BTreeMap<u16, u64>) -> Vec<String> {
        let mut faults = follower.faults.clone();
        match (&follower.ending, follower.reading) {
            (Some(ClientError::Lagged { .. }), Reading::Never) | (None, Reading::Every(_)) => {}
            (Some(ClientError::Compacted { .. }), Reading::Every(_))
                if follower.segments.len() > 1 => {}
            (ending, reading) => faults.push(format!(
                "it ended with {ending:?}, which the model does not allow for {reading:?}"
            )),
        }
        if follower.segments.is_empty() {
            faults.push("never opened".to_owned());
            return faults;
        }
        for &core_id in &follower.cores {
            self.check_core(follower, core_id, through[&core_id], &mut faults);
        }
        faults
    }

    fn check_core(
        &self,
        follower: &Follower,
        core_id: u16,
        through: u64,
        faults: &mut Vec<String>,
    ) {
        let empty = Seen::default();
        let seen = follower.seen.get(&core_id).unwrap_or(&empty);
        let batches = &self.batches[&core_id];
        let first = &follower.segments[0];
        let low = self.low(core_id, first.boundary, &first.floor);
        let high = self.high(core_id, first.boundary);
        let starts: Vec<u64> = match follower.opening {
            Opening::Snapshot => {
                let Some((revision, items)) = &seen.snapshot else {
                    faults.push(format!("core {core_id}: no snapshot"));
                    return;
                };
                if !(low..=high).contains(revision) {
                    faults.push(format!(
                        "core {core_id}: snapshot at {revision}, outside {low}..={high}"
                    ));
                }
                self.check_snapshot(follower, core_id, *revision, items, faults);
                vec![*revision]
            }
            Opening::Now => {
                let top = first
                    .progress
                    .get(&core_id)
                    .map_or(high, |&progress| high.min(progress));
                (low..=top).collect()
            }
        };
        if starts.is_empty() {
            faults.push(format!("core {core_id}: no start fits {low}..={high}"));
            return;
        }
        // Where the stream of this core must end, and whether it must reach there.
        let (end, is_exact) = match &follower.ending {
            None => (through, true),
            Some(ClientError::Lagged {
                core_id: lagged,
                last_delivered,
                ..
            }) if *lagged == core_id => (*last_delivered, true),
            Some(ClientError::Compacted {
                core_id: refused, ..
            }) if *refused == core_id => {
                let position = follower
                    .segments
                    .last()
                    .and_then(|segment| segment.after.as_ref())
                    .and_then(|after| after.iter().find(|position| position.core_id == core_id))
                    .map_or(0, |position| position.revision);
                (position, true)
            }
            Some(_) => (through, false),
        };
        let fits = starts.iter().any(|&start| {
            let expected = follower.spec.expected(batches, start, end);
            if is_exact {
                expected == seen.events
            } else {
                expected.starts_with(&seen.events)
            }
        });
        if !fits {
            let expected = follower.spec.expected(batches, starts[0], end);
            let what = if is_exact { "equal to" } else { "a prefix of" };
            faults.push(format!(
                "core {core_id}: the stream is not {what} the model's over (start, {end}] for \
                 any start in {}..={}:\n{}",
                starts[0],
                starts[starts.len() - 1],
                difference(&expected, &seen.events)
            ));
        }
        self.check_resumes(follower, core_id, faults);
    }

    /// Each resume was refused as compacted exactly when the model's history says.
    fn check_resumes(&self, follower: &Follower, core_id: u16, faults: &mut Vec<String>) {
        let table = &self.compacted_through[&core_id];
        for (index, segment) in follower.segments.iter().enumerate().skip(1) {
            let Some(position) = segment
                .after
                .as_ref()
                .and_then(|after| after.iter().find(|position| position.core_id == core_id))
            else {
                faults.push(format!("core {core_id}: a resume without its position"));
                continue;
            };
            let after = position.revision;
            let low = self.low(core_id, segment.boundary, &segment.floor);
            let high = segment
                .progress
                .get(&core_id)
                .map_or(self.high(core_id, segment.boundary), |&progress| {
                    self.high(core_id, segment.boundary).min(progress)
                });
            let index_of = |revision: u64| usize::try_from(revision).expect("a small revision");
            let must_refuse = after < table[index_of(low)];
            let may_refuse = after < table[index_of(high.max(low))];
            let is_last = index + 1 == follower.segments.len();
            match &follower.ending {
                Some(ClientError::Compacted {
                    core_id: refused,
                    oldest_available,
                    ..
                }) if is_last && *refused == core_id => {
                    let allowed: Vec<u64> = (low..=high.max(low))
                        .map(|revision| table[index_of(revision)])
                        .filter(|&oldest| after < oldest)
                        .collect();
                    if !may_refuse || !allowed.contains(oldest_available) {
                        faults.push(format!(
                            "core {core_id}: the resume after {after} was refused with \
                             oldest_available {oldest_available}; the model allows {allowed:?} \
                             (shard at {low}..={high})"
                        ));
                    }
                }
                _ if segment.progress.contains_key(&core_id) && must_refuse => {
                    faults.push(format!(
                        "core {core_id}: the resume after {after} was accepted, but the history \
                         holds only revisions after {} (shard at {low})",
                        table[index_of(low)]
                    ));
                }
                _ => {}
            }
        }
    }

    /// The snapshot holds the live keys of the range at `revision`, as the model replays
    /// them; a key whose TTL passed may be missing until it is reclaimed.
    fn check_snapshot(
        &self,
        follower: &Follower,
        core_id: u16,
        revision: u64,
        items: &[ScanItem],
        faults: &mut Vec<String>,
    ) {
        let batches = &self.batches[&core_id];
        let mut live: BTreeMap<Vec<u8>, (Vec<u8>, u64, u64, u64)> = BTreeMap::new();
        for (at, events) in batches.iter().filter(|(at, _)| *at <= revision) {
            for event in events {
                match event.kind {
                    EventKind::Put {
                        create_revision,
                        version,
                    } => {
                        live.insert(
                            event.key.clone(),
                            (event.value.clone(), create_revision, *at, version),
                        );
                    }
                    _ => {
                        live.remove(&event.key);
                    }
                }
            }
        }
        live.retain(|key, _| follower.spec.contains(key));
        let keys: Vec<&Vec<u8>> = items.iter().map(|item| &item.key).collect();
        if !keys.windows(2).all(|pair| pair[0] < pair[1]) {
            faults.push(format!(
                "core {core_id}: snapshot keys out of order: {keys:?}"
            ));
        }
        for item in items {
            let Some((value, create_revision, mod_revision, version)) = live.remove(&item.key)
            else {
                faults.push(format!(
                    "core {core_id}: snapshot at {revision} holds {:?}, not live in the model",
                    String::from_utf8_lossy(&item.key)
                ));
                continue;
            };
            let has_ttl = self
                .ttl_puts
                .contains(&(core_id, mod_revision, item.key.clone()));
            let is_same = item.entry.as_ref().is_some_and(|entry| {
                entry.value == value
                    && entry.create_revision == create_revision
                    && entry.mod_revision == mod_revision
                    && entry.version == version
                    && entry.expires_at_ms.is_some() == has_ttl
            });
            if !is_same {
                faults.push(format!(
                    "core {core_id}: snapshot at {revision}: {item:?}, the model has value {:?} \
                     create {create_revision} mod {mod_revision} version {version} ttl {has_ttl}",
                    String::from_utf8_lossy(&value)
                ));
            }
        }
        for (key, (_, _, mod_revision, _)) in live {
            let has_ttl = self
                .ttl_puts
                .contains(&(core_id, mod_revision, key.clone()));
            let expires_next = batches
                .iter()
                .filter(|(at, _)| *at > revision)
                .flat_map(|(_, events)| events)
                .find(|event| event.key == key)
                .is_some_and(|event| event.kind == EventKind::Expired);
            if !(has_ttl && expires_next) {
                faults.push(format!(
                    "core {core_id}: snapshot at {revision} lacks the live key {:?}",
                    String::from_utf8_lossy(&key)
                ));
            }
        }
    }
}

/// Matches an expiry batch of the reference watcher with the oldest TTL put of its key.
fn check_expiry(
    core_id: u16,
    revision: u64,
    events: &[WatchEvent],
    ttl_puts: &mut VecDeque<&mut TtlPut>,
) {
    assert_eq!(
        events.len(),
        1,
        "core {core_id}: an expiry shares revision {revision}: {events:?}"
    );
    let event = &events[0];
    let position = ttl_puts
        .iter()
        .position(|ttl_put| ttl_put.key == event.key)
        .unwrap_or_else(|| {
            panic!("core {core_id}: revision {revision} expires a key with no TTL: {event:?}")
        });
    let ttl_put = ttl_puts.remove(position).expect("found above");
    assert_eq!(
        event,
        &WatchEvent {
            key: ttl_put.key.clone(),
            kind: EventKind::Expired,
            value: Vec::new(),
            previous: Some(ttl_put.value.clone()),
            fields: Vec::new(),
        },
        "core {core_id}: the expiry at revision {revision}"
    );
    ttl_put.revision = Some(revision);
}

/// For each revision `r` of a core, the oldest revision a resume can start after once the
/// shard applied `r`: the history keeps the newest whole revisions within
/// `history_events_max` events (and the default bytes bound, far above these cases).
fn compaction(batches: &Batches, history_events_max: usize) -> Vec<u64> {
    let history_bytes_max = tessera_server::Config::default().watch_history_bytes_max;
    let cost = |event: &WatchEvent| {
        (64 + event.key.len() + event.value.len() + event.previous.as_ref().map_or(0, Vec::len))
            as u64
    };
    let mut table = vec![0];
    let mut held: VecDeque<(u64, usize, u64)> = VecDeque::new();
    let (mut count, mut bytes, mut through) = (0, 0, 0);
    for (revision, events) in batches {
        let revision_bytes: u64 = events.iter().map(cost).sum();
        held.push_back((*revision, events.len(), revision_bytes));
        count += events.len();
        bytes += revision_bytes;
        while count > history_events_max || bytes > history_bytes_max {
            let Some((oldest, oldest_count, oldest_bytes)) = held.pop_front() else {
                break;
            };
            count -= oldest_count;
            bytes -= oldest_bytes;
            through = oldest;
        }
        table.push(through);
    }
    table
}

/// The first place two streams differ, for a failure message.
fn difference(expected: &Batches, seen: &Batches) -> String {
    let mut text = String::new();
    let position = expected
        .iter()
        .zip(seen)
        .position(|(left, right)| left != right)
        .unwrap_or(expected.len().min(seen.len()));
    let _ = writeln!(
        text,
        "  expected {} revisions, seen {}; first difference at index {position}",
        expected.len(),
        seen.len()
    );
    let show = |batches: &Batches| -> String {
        batches
            .iter()
            .skip(position.saturating_sub(1))
            .take(3)
            .map(|(revision, events)| {
                let events: Vec<String> = events
                    .iter()
                    .map(|event| {
                        format!(
                            "{} {:?} {}B prev {:?}",
                            String::from_utf8_lossy(&event.key),
                            event.kind,
                            event.value.len(),
                            event.previous.as_ref().map(Vec::len)
                        )
                    })
                    .collect();
                format!("{revision}: [{}]", events.join(", "))
            })
            .collect::<Vec<_>>()
            .join("; ")
    };
    let _ = writeln!(text, "  expected ... {}", show(expected));
    let _ = write!(text, "  seen     ... {}", show(seen));
    text
}
