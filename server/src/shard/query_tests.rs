//! Model-based tests of secondary indexes and queries (issue 8), sans-I/O.
//!
//! A property test drives random puts (alone, batched, in transactions, attached to a lease),
//! deletes, counter adds, TTL changes, expiries (a clock that moves, and ticks that reclaim),
//! lease revocations, index creations and drops, and index builds a few keys at a time, over
//! eight keys whose entries carry random fields: three names and a few values of every type,
//! so that comparisons hit, miss and meet values they do not compare with. A model holds what
//! the shard must: every entry of the store (expired ones until they are reclaimed), the index
//! definitions and how far each build has walked.
//!
//! After every step the shard's indexes are checked against its store
//! (`Shard::check_invariants`), its index list against the model, and random queries (filter
//! trees of every comparison under `and`, `or` and `not`; prefixes; orders; limits;
//! projections; counts; cursors) against a brute-force filter over the model: the same keys in
//! the same order ([`cursor_cmp`]) page after page through the cursor, the same count, the same
//! fields and entries, and a plan that uses a ready index whenever one fits (and lists the
//! building ones that would have).
//!
//! At a random step the shard restarts. It is recovered twice: by replaying its whole journal,
//! and from a snapshot taken at another random step plus the journal after the snapshot's
//! base. Both answer every query exactly as the original did, and the test goes on with one of
//! them, which must keep its indexes in step from there. At the end both recoveries are made
//! again and compared once more.
//!
//! Below the property test, unit tests pin the planner's choices and a query's bounds.

use std::cmp::Ordering;
use std::collections::BTreeMap;

use proptest::prelude::*;
use proptest::sample::{select, Index};
use tessera_protocol::codec::{self, FrameBuffer};
use tessera_protocol::index::cursor_cmp;
use tessera_protocol::query::{Bound, QueryNode, F64};
use tessera_protocol::{
    key_after, CounterAdd, ErrorCode, Field, FieldValue, IndexInfo, IndexKind, IndexSpec,
    IndexState, OrderBy, Projection, Put, PutEntry, Query, QueryAccess, QueryCursor, QueryItem,
    QueryPage, QueryRequest, Request, Response, SlotRange, Txn, TxnOp, SLOT_COUNT,
};

use super::index::pair_cost;
use super::lease::LeaseLimits;
use super::lock::LockLimits;
use super::query::{QueryBudget, BUDGET_CHECK_EVERY};
use super::store::PARTITION_COUNT;
use super::watch::WatchLimits;
use super::{Shard, ShardConfig, ShardId};
use crate::durability::format::{read_record, ReadOutcome, RecordWriter};
use crate::durability::snapshot::{
    load_snapshot, snapshot_file_name, ChunkEncoder, SnapshotEntry, SnapshotHeader,
    SNAPSHOT_FORMAT_VERSION,
};
use crate::durability::test_support::TestDir;

const SHARD_ID: ShardId = 0;
const START_MS: u64 = 1_000_000;
/// Most matches a query sorts in these tests: far more than the keys there are.
const SORT_ITEMS_MAX: usize = 10_000;

/// Keys of three lengths, so that prefixes nest (`a` holds `a1`, which holds `a10`).
const KEYS: [&str; 8] = ["a0", "a1", "a10", "a11", "a2", "b0", "b1", "b2"];
/// Values: two counters and two that are not.
const VALUES: [&str; 4] = ["x", "y", "3", "10"];
const FIELD_NAMES: [&str; 3] = ["a", "b", "c"];
const INDEX_NAMES: [&str; 5] = ["i0", "i1", "i2", "i3", "i4"];
const INDEX_PREFIXES: [&str; 4] = ["", "a", "a1", "b"];
/// Query prefixes: those of indexes, one under them and one no key has.
const QUERY_PREFIXES: [&str; 6] = ["", "a", "a1", "a10", "b", "c"];
const TTL_MS_GENERATED_MAX: u64 = 40;
/// Leases the model keeps granted at once.
const LEASE_COUNT_MAX: usize = 2;
/// Pages a query may take: one per matching key, and the last.
const PAGE_COUNT_MAX: usize = KEYS.len() + 1;

fn config() -> ShardConfig {
    ShardConfig {
        node_id: 1,
        shard_id: SHARD_ID,
        slots: SlotRange {
            start: 0,
            end: SLOT_COUNT,
        },
        memory_bytes_max: 1 << 40,
        expired_per_tick_max: 1_024,
        watch_limits: WatchLimits::default(),
        lease_limits: LeaseLimits::default(),
        lock_limits: LockLimits::default(),
    }
}

/// Archives `request` as a client would send it and applies it at `now_ms`.
fn apply(shard: &mut Shard, now_ms: u64, request: &Request) -> Response {
    let mut body = FrameBuffer::new();
    codec::encode_request_body(&mut body, request).expect("test request archives");
    let archived = codec::access_request(&body).expect("archived request validates");
    codec::check_request(archived).expect("test request is within the protocol's limits");
    shard.apply(now_ms, archived)
}

/// Answers `query` with a budget that never runs out, as the core would within its time.
fn run_query(shard: &Shard, now_ms: u64, query: &QueryRequest) -> Response {
    let mut time_left = || true;
    let mut budget = QueryBudget {
        time_left: &mut time_left,
        time_budget_ms: 1_000,
        sort_items_max: SORT_ITEMS_MAX,
    };
    shard.query(now_ms, query, &mut budget)
}

/// The page a query answers; the query must be one `check_request` accepts.
fn query_page(shard: &Shard, now_ms: u64, query: &QueryRequest) -> QueryPage {
    let request = Request::Query(Box::new(query.clone()));
    assert_eq!(codec::check_owned_request(&request), Ok(()), "{query:?}");
    match run_query(shard, now_ms, query) {
        Response::Query(page) => *page,
        other => panic!("{query:?} was answered {other:?}"),
    }
}

/// Every page of `query`, each continuing after the last item of the one before, until a
/// page says nothing more follows.
fn all_pages(shard: &Shard, now_ms: u64, query: &QueryRequest) -> Vec<QueryPage> {
    let mut pages = vec![query_page(shard, now_ms, query)];
    while let Some(last) = pages.last().filter(|page| page.more) {
        assert!(pages.len() < PAGE_COUNT_MAX, "{query:?} never ends");
        let cursor = last
            .items
            .last()
            .expect("a page with more has items")
            .cursor();
        let next = QueryRequest {
            after: Some(cursor),
            ..query.clone()
        };
        pages.push(query_page(shard, now_ms, &next));
    }
    pages
}

/// Error replies match on their code alone.
fn same_response(actual: &Response, expected: &Response) -> bool {
    match (actual, expected) {
        (Response::Error(actual), Response::Error(expected)) => actual.code == expected.code,
        _ => actual == expected,
    }
}

fn error_code(code: ErrorCode) -> Response {
    Response::Error(tessera_protocol::ErrorReply::new(code, ""))
}

// ---------------------------------------------------------------------------------------------
// The model.

#[derive(Debug, Clone)]
struct ModelEntry {
    value: Vec<u8>,
    /// Ordered by name, as the shard returns them.
    fields: Vec<Field>,
    deadline_ms: Option<u64>,
    lease: Option<u64>,
}

impl ModelEntry {
    fn is_live(&self, now_ms: u64) -> bool {
        self.deadline_ms
            .is_none_or(|deadline_ms| deadline_ms > now_ms)
    }

    fn field(&self, name: &str) -> Option<&FieldValue> {
        self.fields
            .iter()
            .find(|field| field.name == name)
            .map(|field| &field.value)
    }
}

/// How far an index's build has walked.
#[derive(Debug, Clone)]
struct ModelBuild {
    next: Vec<u8>,
    keys_done: u64,
    keys_total: u64,
}

#[derive(Debug, Clone)]
struct ModelIndex {
    spec: IndexSpec,
    /// `None` once ready.
    build: Option<ModelBuild>,
}

impl ModelIndex {
    fn covers(&self, key: &[u8]) -> bool {
        key.starts_with(&self.spec.prefix)
            && self
                .build
                .as_ref()
                .is_none_or(|build| key < build.next.as_slice())
    }
}

#[derive(Debug, Default)]
struct Model {
    /// Every entry the store holds, expired ones not yet reclaimed included.
    entries: BTreeMap<Vec<u8>, ModelEntry>,
    /// In creation order.
    indexes: Vec<ModelIndex>,
    /// Leases granted and not revoked.
    leases: Vec<u64>,
}

fn sorted_fields(fields: &[Field]) -> Vec<Field> {
    let mut sorted = fields.to_vec();
    sorted.sort_by(|left, right| left.name.cmp(&right.name));
    sorted
}

impl Model {
    /// What a write of `key` finds: an expired entry is reclaimed first, as the shard does.
    fn reclaim(&mut self, now_ms: u64, key: &[u8]) {
        if self
            .entries
            .get(key)
            .is_some_and(|entry| !entry.is_live(now_ms))
        {
            self.entries.remove(key);
        }
    }

    /// The deadline a put gives `key`: its TTL's, or with `keep_ttl` the live entry's.
    fn deadline_of(
        &self,
        now_ms: u64,
        key: &[u8],
        ttl_ms: Option<u64>,
        keep_ttl: bool,
    ) -> Option<u64> {
        match ttl_ms {
            Some(ttl_ms) => Some(now_ms + ttl_ms),
            None if keep_ttl => self.entries.get(key).and_then(|entry| entry.deadline_ms),
            None => None,
        }
    }

    fn write(
        &mut self,
        key: &str,
        value: &str,
        fields: &[Field],
        deadline_ms: Option<u64>,
        lease: Option<u64>,
    ) {
        self.entries.insert(
            key.as_bytes().to_vec(),
            ModelEntry {
                value: value.as_bytes().to_vec(),
                fields: sorted_fields(fields),
                deadline_ms,
                lease,
            },
        );
    }

    fn create_index(&mut self, spec: &IndexSpec) -> Response {
        if let Some(existing) = self
            .indexes
            .iter()
            .find(|index| index.spec.name == spec.name)
        {
            return if existing.spec == *spec {
                Response::IndexCreated { created: false }
            } else {
                error_code(ErrorCode::InvalidArgument)
            };
        }
        let has_keys = self.entries.keys().any(|key| key.starts_with(&spec.prefix));
        self.indexes.push(ModelIndex {
            spec: spec.clone(),
            build: has_keys.then(|| ModelBuild {
                next: spec.prefix.clone(),
                keys_done: 0,
                keys_total: self.entries.len() as u64,
            }),
        });
        Response::IndexCreated { created: true }
    }

    /// Files up to `keys_max` keys for the first index still building; whether a build is
    /// left.
    fn build_step(&mut self, keys_max: usize) -> bool {
        let Self {
            entries, indexes, ..
        } = self;
        if let Some(index) = indexes.iter_mut().find(|index| index.build.is_some()) {
            let build = index.build.as_mut().expect("found building");
            let keys: Vec<&Vec<u8>> = entries
                .keys()
                .filter(|key| key.starts_with(&index.spec.prefix) && **key >= build.next)
                .take(keys_max)
                .collect();
            build.keys_done += keys.len() as u64;
            match keys.last() {
                Some(last) if keys.len() == keys_max => build.next = key_after(last),
                _ => index.build = None,
            }
        }
        self.indexes.iter().any(|index| index.build.is_some())
    }

    fn info(&self, index: &ModelIndex) -> IndexInfo {
        let pairs: Vec<(&Vec<u8>, &FieldValue)> = self
            .entries
            .iter()
            .filter(|(key, _)| index.covers(key))
            .filter_map(|(key, entry)| entry.field(&index.spec.field).map(|value| (key, value)))
            .collect();
        IndexInfo {
            spec: index.spec.clone(),
            state: match &index.build {
                None => IndexState::Ready,
                Some(build) => IndexState::Building {
                    keys_done: build.keys_done,
                    keys_total: build.keys_total,
                },
            },
            entries: pairs.len() as u64,
            memory_bytes: pairs.iter().map(|(key, value)| pair_cost(key, value)).sum(),
        }
    }

    /// What a recovered shard holds: the live entries, every index ready.
    fn restart(&mut self, now_ms: u64) {
        self.entries.retain(|_, entry| entry.is_live(now_ms));
        for index in &mut self.indexes {
            index.build = None;
        }
    }

    fn is_ready(&self, name: &str) -> bool {
        self.indexes
            .iter()
            .any(|index| index.spec.name == name && index.build.is_none())
    }
}

// ---------------------------------------------------------------------------------------------
// Operations.

/// One write of a transaction.
#[derive(Debug, Clone)]
enum TxnWrite {
    Put {
        key: &'static str,
        value: &'static str,
        fields: Vec<Field>,
        ttl_ms: Option<u64>,
        keep_ttl: bool,
    },
    Delete(&'static str),
}

impl TxnWrite {
    fn key(&self) -> &'static str {
        match self {
            Self::Put { key, .. } | Self::Delete(key) => key,
        }
    }
}

#[derive(Debug, Clone)]
enum Operation {
    Put {
        key: &'static str,
        value: &'static str,
        fields: Vec<Field>,
        ttl_ms: Option<u64>,
        keep_ttl: bool,
    },
    /// A put attached to one of the leases granted (granting one if there is none).
    PutLeased {
        key: &'static str,
        value: &'static str,
        fields: Vec<Field>,
        lease: Index,
    },
    MultiPut(Vec<(&'static str, &'static str, Vec<Field>, Option<u64>)>),
    /// Each key once.
    Txn(Vec<TxnWrite>),
    Delete(&'static str),
    MultiDelete(Vec<&'static str>),
    Expire {
        key: &'static str,
        ttl_ms: u64,
    },
    Persist(&'static str),
    Add {
        key: &'static str,
        delta: i64,
    },
    CreateIndex(IndexSpec),
    DropIndex(&'static str),
    /// A build slice of at most this many keys.
    Build(usize),
    /// The clock moves on by this many ms.
    Advance(u64),
    Tick,
    LeaseGrant,
    LeaseRevoke(Index),
}

/// A value of every type, from domains small enough that queries often hit.
fn field_value() -> impl Strategy<Value = FieldValue> {
    prop_oneof![
        2 => select(vec!["", "x", "xy"]).prop_map(|text| FieldValue::Str(text.to_owned())),
        3 => (0_i64..=2).prop_map(FieldValue::I64),
        // 1.0 is the integer 1 to comparisons and indexes.
        2 => select(vec![-1.5, 1.0, 2.5])
            .prop_map(|number| FieldValue::F64(F64::new(number).expect("not NaN"))),
        1 => any::<bool>().prop_map(FieldValue::Bool),
        1 => (0_i64..=1).prop_map(FieldValue::Timestamp),
    ]
}

fn field_name() -> impl Strategy<Value = String> {
    select(FIELD_NAMES.to_vec()).prop_map(str::to_owned)
}

/// An entry's fields: each name once, in the order drawn (the shard orders them).
fn fields() -> impl Strategy<Value = Vec<Field>> {
    proptest::collection::vec((field_name(), field_value()), 0..=4).prop_map(|pairs| {
        let mut fields: Vec<Field> = Vec::new();
        for (name, value) in pairs {
            if fields.iter().all(|field| field.name != name) {
                fields.push(Field::new(name, value));
            }
        }
        fields
    })
}

fn key() -> impl Strategy<Value = &'static str> {
    select(KEYS.to_vec())
}

fn value() -> impl Strategy<Value = &'static str> {
    select(VALUES.to_vec())
}

fn ttl_ms() -> impl Strategy<Value = Option<u64>> {
    prop_oneof![2 => Just(None), 1 => (1..=TTL_MS_GENERATED_MAX).prop_map(Some)]
}

fn txn_write() -> impl Strategy<Value = TxnWrite> {
    prop_oneof![
        3 => (key(), value(), fields(), ttl_ms(), any::<bool>()).prop_map(
            |(key, value, fields, ttl_ms, keep_ttl)| TxnWrite::Put {
                key,
                value,
                fields,
                ttl_ms,
                keep_ttl,
            }
        ),
        1 => key().prop_map(TxnWrite::Delete),
    ]
}

fn index_spec() -> impl Strategy<Value = IndexSpec> {
    (
        select(INDEX_NAMES.to_vec()),
        select(INDEX_PREFIXES.to_vec()),
        field_name(),
        prop_oneof![Just(IndexKind::Equality), Just(IndexKind::Range)],
    )
        .prop_map(|(name, prefix, field, kind)| IndexSpec {
            name: name.to_owned(),
            prefix: prefix.as_bytes().to_vec(),
            field,
            kind,
        })
}

fn operation() -> impl Strategy<Value = Operation> {
    prop_oneof![
        6 => (key(), value(), fields(), ttl_ms(), any::<bool>()).prop_map(
            |(key, value, fields, ttl_ms, keep_ttl)| Operation::Put {
                key,
                value,
                fields,
                ttl_ms,
                keep_ttl,
            }
        ),
        2 => (key(), value(), fields(), any::<Index>()).prop_map(
            |(key, value, fields, lease)| Operation::PutLeased {
                key,
                value,
                fields,
                lease,
            }
        ),
        2 => proptest::collection::vec((key(), value(), fields(), ttl_ms()), 1..=3)
            .prop_map(Operation::MultiPut),
        2 => proptest::collection::vec(txn_write(), 1..=3).prop_map(|writes| {
            let mut named: Vec<&str> = Vec::new();
            Operation::Txn(
                writes
                    .into_iter()
                    .filter(|write| {
                        let fresh = !named.contains(&write.key());
                        named.push(write.key());
                        fresh
                    })
                    .collect(),
            )
        }),
        2 => key().prop_map(Operation::Delete),
        1 => proptest::collection::vec(key(), 1..=3).prop_map(Operation::MultiDelete),
        1 => (key(), 1..=TTL_MS_GENERATED_MAX).prop_map(|(key, ttl_ms)| Operation::Expire {
            key,
            ttl_ms
        }),
        1 => key().prop_map(Operation::Persist),
        1 => (key(), -3_i64..=3).prop_map(|(key, delta)| Operation::Add { key, delta }),
        3 => index_spec().prop_map(Operation::CreateIndex),
        1 => select(INDEX_NAMES.to_vec()).prop_map(Operation::DropIndex),
        4 => (1_usize..=4).prop_map(Operation::Build),
        3 => (0_u64..=15).prop_map(Operation::Advance),
        2 => Just(Operation::Tick),
        1 => Just(Operation::LeaseGrant),
        2 => any::<Index>().prop_map(Operation::LeaseRevoke),
    ]
}

/// Applies `operation` to the shard and the model, and checks the shard's answer where the
/// model knows it.
#[allow(
    clippy::too_many_lines,
    reason = "one arm per operation, each with the request and the model's part"
)]
fn step(
    shard: &mut Shard,
    model: &mut Model,
    now_ms: &mut u64,
    operation: &Operation,
) -> Result<(), TestCaseError> {
    let now = *now_ms;
    let (request, expected) = match operation {
        Operation::Put {
            key,
            value,
            fields,
            ttl_ms,
            keep_ttl,
        } => {
            model.reclaim(now, key.as_bytes());
            let deadline_ms = model.deadline_of(now, key.as_bytes(), *ttl_ms, *keep_ttl);
            model.write(key, value, fields, deadline_ms, None);
            let request = Request::Put(Box::new(Put {
                ttl_ms: *ttl_ms,
                keep_ttl: *keep_ttl,
                fields: fields.clone(),
                ..Put::new(*key, *value)
            }));
            (request, None)
        }
        Operation::PutLeased {
            key,
            value,
            fields,
            lease,
        } => {
            if model.leases.is_empty() {
                match apply(shard, now, &Request::LeaseGrant { ttl_ms: 60_000 }) {
                    Response::LeaseGranted { id, .. } => model.leases.push(id),
                    other => prop_assert!(false, "lease grant answered {:?}", other),
                }
            }
            let lease = Some(model.leases[lease.index(model.leases.len())]);
            model.reclaim(now, key.as_bytes());
            model.write(key, value, fields, None, lease);
            let request = Request::Put(Box::new(Put {
                lease,
                fields: fields.clone(),
                ..Put::new(*key, *value)
            }));
            (request, None)
        }
        Operation::MultiPut(entries) => {
            for (key, ..) in entries {
                model.reclaim(now, key.as_bytes());
            }
            for (key, value, fields, ttl_ms) in entries {
                model.write(key, value, fields, ttl_ms.map(|ttl_ms| now + ttl_ms), None);
            }
            let request = Request::MultiPut {
                entries: entries
                    .iter()
                    .map(|(key, value, fields, ttl_ms)| PutEntry {
                        key: key.as_bytes().to_vec(),
                        value: value.as_bytes().to_vec(),
                        ttl_ms: *ttl_ms,
                        fields: fields.clone(),
                    })
                    .collect(),
            };
            (request, None)
        }
        Operation::Txn(writes) => {
            for write in writes {
                model.reclaim(now, write.key().as_bytes());
            }
            let mut ops = Vec::new();
            for write in writes {
                match write {
                    TxnWrite::Put {
                        key,
                        value,
                        fields,
                        ttl_ms,
                        keep_ttl,
                    } => {
                        let deadline_ms =
                            model.deadline_of(now, key.as_bytes(), *ttl_ms, *keep_ttl);
                        model.write(key, value, fields, deadline_ms, None);
                        ops.push(TxnOp::Put {
                            key: key.as_bytes().to_vec(),
                            value: value.as_bytes().to_vec(),
                            ttl_ms: *ttl_ms,
                            keep_ttl: *keep_ttl,
                            return_previous: false,
                            lease: None,
                            fields: fields.clone(),
                        });
                    }
                    TxnWrite::Delete(key) => {
                        model.entries.remove(key.as_bytes());
                        ops.push(TxnOp::delete(*key));
                    }
                }
            }
            (Request::Txn(Box::new(Txn::new().then(ops))), None)
        }
        Operation::Delete(key) => {
            model.reclaim(now, key.as_bytes());
            let deleted = model.entries.remove(key.as_bytes()).is_some();
            let request = Request::Delete(Box::new(tessera_protocol::Delete::new(*key)));
            let expected = Response::Delete {
                deleted,
                version: 0,
                previous: None,
            };
            (request, Some(expected))
        }
        Operation::MultiDelete(keys) => {
            for key in keys {
                model.reclaim(now, key.as_bytes());
            }
            let deleted = keys
                .iter()
                .map(|key| model.entries.remove(key.as_bytes()).is_some())
                .collect();
            let request = Request::MultiDelete {
                keys: keys.iter().map(|key| key.as_bytes().to_vec()).collect(),
            };
            (request, Some(Response::MultiDelete { deleted }))
        }
        Operation::Expire { key, ttl_ms } => {
            model.reclaim(now, key.as_bytes());
            if let Some(entry) = model.entries.get_mut(key.as_bytes()) {
                entry.deadline_ms = Some(now + ttl_ms);
            }
            let request = Request::Expire {
                key: key.as_bytes().to_vec(),
                ttl_ms: *ttl_ms,
            };
            (request, None)
        }
        Operation::Persist(key) => {
            model.reclaim(now, key.as_bytes());
            if let Some(entry) = model.entries.get_mut(key.as_bytes()) {
                entry.deadline_ms = None;
            }
            let request = Request::Persist {
                key: key.as_bytes().to_vec(),
            };
            (request, None)
        }
        Operation::Add { key, delta } => {
            model.reclaim(now, key.as_bytes());
            // A counter keeps its fields, its deadline and its lease; only the number changes.
            let expected = match model.entries.get_mut(key.as_bytes()) {
                None => {
                    model.write(key, &delta.to_string(), &[], None, None);
                    Response::Counter {
                        applied: true,
                        value: *delta,
                        mod_revision: 0,
                    }
                }
                Some(entry) => match std::str::from_utf8(&entry.value)
                    .ok()
                    .and_then(|text| text.parse::<i64>().ok())
                {
                    Some(number) => {
                        entry.value = (number + delta).to_string().into_bytes();
                        Response::Counter {
                            applied: true,
                            value: number + delta,
                            mod_revision: 0,
                        }
                    }
                    None => error_code(ErrorCode::OutOfRange),
                },
            };
            let request = Request::Add(Box::new(CounterAdd::new(*key, *delta)));
            let actual = apply(shard, now, &request);
            let actual = match actual {
                Response::Counter { applied, value, .. } => Response::Counter {
                    applied,
                    value,
                    mod_revision: 0,
                },
                other => other,
            };
            prop_assert!(
                same_response(&actual, &expected),
                "{:?}: {:?}, expected {:?}",
                request,
                actual,
                expected
            );
            return Ok(());
        }
        Operation::CreateIndex(spec) => {
            let expected = model.create_index(spec);
            (Request::CreateIndex(Box::new(spec.clone())), Some(expected))
        }
        Operation::DropIndex(name) => {
            let before = model.indexes.len();
            model.indexes.retain(|index| index.spec.name != *name);
            let dropped = model.indexes.len() != before;
            let request = Request::DropIndex {
                name: (*name).to_owned(),
            };
            (request, Some(Response::IndexDropped { dropped }))
        }
        Operation::Build(keys_max) => {
            let is_building = shard.build_indexes(*keys_max);
            prop_assert_eq!(
                is_building,
                model.build_step(*keys_max),
                "build of {} keys",
                keys_max
            );
            return Ok(());
        }
        Operation::Advance(ms) => {
            *now_ms += ms;
            return Ok(());
        }
        Operation::Tick => {
            let due: Vec<Vec<u8>> = model
                .entries
                .iter()
                .filter(|(_, entry)| !entry.is_live(now))
                .map(|(key, _)| key.clone())
                .collect();
            for key in &due {
                model.entries.remove(key);
            }
            prop_assert_eq!(shard.tick(now), due.len(), "keys reclaimed by the tick");
            return Ok(());
        }
        Operation::LeaseGrant => {
            if model.leases.len() >= LEASE_COUNT_MAX {
                return Ok(());
            }
            match apply(shard, now, &Request::LeaseGrant { ttl_ms: 60_000 }) {
                Response::LeaseGranted { id, .. } => model.leases.push(id),
                other => prop_assert!(false, "lease grant answered {:?}", other),
            }
            return Ok(());
        }
        Operation::LeaseRevoke(lease) => {
            if model.leases.is_empty() {
                return Ok(());
            }
            let id = model.leases.remove(lease.index(model.leases.len()));
            // Its keys go, expired or not.
            model.entries.retain(|_, entry| entry.lease != Some(id));
            (
                Request::LeaseRevoke { id },
                Some(Response::LeaseRevoked { existed: true }),
            )
        }
    };
    let actual = apply(shard, now, &request);
    match expected {
        Some(expected) => prop_assert!(
            same_response(&actual, &expected),
            "{:?}: {:?}, expected {:?}",
            request,
            actual,
            expected
        ),
        None => prop_assert!(
            !matches!(actual, Response::Error(_)),
            "{:?}: {:?}",
            request,
            actual
        ),
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Queries.

/// A predicate tree, flattened into a [`Query`] (operands first).
#[derive(Debug, Clone)]
enum Tree {
    Leaf(QueryNode),
    And(Vec<Tree>),
    Or(Vec<Tree>),
    Not(Box<Tree>),
}

fn bound() -> impl Strategy<Value = Bound> {
    prop_oneof![
        Just(Bound::Unbounded),
        field_value().prop_map(Bound::Included),
        field_value().prop_map(Bound::Excluded),
    ]
}

fn comparison() -> impl Strategy<Value = QueryNode> {
    prop_oneof![
        3 => (field_name(), field_value()).prop_map(|(field, value)| QueryNode::Equal {
            field,
            value
        }),
        2 => (field_name(), proptest::collection::vec(field_value(), 1..=3))
            .prop_map(|(field, values)| QueryNode::In { field, values }),
        3 => (field_name(), bound(), bound()).prop_map(|(field, lower, upper)| {
            QueryNode::Range {
                field,
                lower,
                upper,
            }
        }),
        1 => (field_name(), select(vec!["", "x", "y"])).prop_map(|(field, prefix)| {
            QueryNode::Prefix {
                field,
                prefix: prefix.to_owned(),
            }
        }),
    ]
}

fn tree() -> impl Strategy<Value = Tree> {
    let nested = comparison()
        .prop_map(Tree::Leaf)
        .prop_recursive(3, 12, 3, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 1..=3).prop_map(Tree::And),
                proptest::collection::vec(inner.clone(), 1..=3).prop_map(Tree::Or),
                inner.prop_map(|tree| Tree::Not(Box::new(tree))),
            ]
        });
    // Roots an index can narrow (a comparison, or an `and` of them) as often as any tree.
    prop_oneof![
        comparison().prop_map(Tree::Leaf),
        proptest::collection::vec(comparison().prop_map(Tree::Leaf), 1..=3).prop_map(Tree::And),
        nested,
    ]
}

fn flatten(tree: &Tree, nodes: &mut Vec<QueryNode>) -> u16 {
    let node = match tree {
        Tree::Leaf(node) => node.clone(),
        Tree::And(children) => {
            QueryNode::And(children.iter().map(|child| flatten(child, nodes)).collect())
        }
        Tree::Or(children) => {
            QueryNode::Or(children.iter().map(|child| flatten(child, nodes)).collect())
        }
        Tree::Not(child) => QueryNode::Not(flatten(child, nodes)),
    };
    nodes.push(node);
    u16::try_from(nodes.len() - 1).expect("a small tree")
}

fn projection() -> impl Strategy<Value = Projection> {
    prop_oneof![
        Just(Projection::KeysOnly),
        Just(Projection::Fields),
        Just(Projection::Full),
    ]
}

/// A cursor of a page that never was: any sort values and any key, beside the prefix or
/// not.
fn cursor() -> impl Strategy<Value = (Vec<Option<FieldValue>>, &'static str)> {
    (
        proptest::collection::vec(proptest::option::of(field_value()), 2),
        select(vec!["", "a", "a1", "a10\0", "a2", "b", "b1", "z"]),
    )
}

fn query_request() -> impl Strategy<Value = QueryRequest> {
    (
        // Most often prefixes many keys share.
        prop_oneof![
            2 => Just(""),
            2 => Just("a"),
            3 => select(QUERY_PREFIXES.to_vec()),
        ],
        proptest::option::weighted(0.85, tree()),
        proptest::collection::vec(
            (field_name(), any::<bool>())
                .prop_map(|(field, descending)| OrderBy { field, descending }),
            0..=2,
        ),
        1_u32..=3,
        projection(),
        proptest::bool::weighted(0.15),
        proptest::option::weighted(0.15, cursor()),
    )
        .prop_map(
            |(prefix, tree, order_by, limit, projection, count_only, cursor)| {
                let filter = tree.map(|tree| {
                    let mut nodes = Vec::new();
                    flatten(&tree, &mut nodes);
                    Query { nodes }
                });
                let after = cursor.map(|(mut sort, key)| {
                    sort.truncate(order_by.len());
                    QueryCursor {
                        sort,
                        key: key.as_bytes().to_vec(),
                    }
                });
                QueryRequest {
                    prefix: prefix.as_bytes().to_vec(),
                    filter,
                    order_by,
                    limit,
                    after,
                    projection,
                    count_only,
                }
            },
        )
}

/// Whether node `node` of `query` holds for `entry`, read recursively from the tree, apart
/// from the shard's one-pass evaluation.
fn holds(query: &Query, node: u16, entry: &ModelEntry) -> bool {
    let equal =
        |found: &FieldValue, wanted: &FieldValue| found.compare(wanted) == Some(Ordering::Equal);
    let above = |found: &FieldValue, bound: &Bound| match bound {
        Bound::Unbounded => true,
        Bound::Included(low) => matches!(
            found.compare(low),
            Some(Ordering::Greater | Ordering::Equal)
        ),
        Bound::Excluded(low) => found.compare(low) == Some(Ordering::Greater),
    };
    let below = |found: &FieldValue, bound: &Bound| match bound {
        Bound::Unbounded => true,
        Bound::Included(high) => {
            matches!(found.compare(high), Some(Ordering::Less | Ordering::Equal))
        }
        Bound::Excluded(high) => found.compare(high) == Some(Ordering::Less),
    };
    match &query.nodes[usize::from(node)] {
        QueryNode::And(operands) => operands.iter().all(|operand| holds(query, *operand, entry)),
        QueryNode::Or(operands) => operands.iter().any(|operand| holds(query, *operand, entry)),
        QueryNode::Not(operand) => !holds(query, *operand, entry),
        QueryNode::Equal { field, value } => {
            entry.field(field).is_some_and(|found| equal(found, value))
        }
        QueryNode::In { field, values } => entry
            .field(field)
            .is_some_and(|found| values.iter().any(|value| equal(found, value))),
        QueryNode::Range {
            field,
            lower,
            upper,
        } => entry
            .field(field)
            .is_some_and(|found| above(found, lower) && below(found, upper)),
        QueryNode::Prefix { field, prefix } => {
            matches!(entry.field(field), Some(FieldValue::Str(text)) if text.starts_with(prefix.as_str()))
        }
    }
}

/// The live entries of the model `query` matches, in its order, after its cursor: their
/// keys and sort values.
fn expected_matches(
    model: &Model,
    now_ms: u64,
    query: &QueryRequest,
) -> Vec<(Vec<u8>, Vec<Option<FieldValue>>)> {
    let mut matches: Vec<(Vec<u8>, Vec<Option<FieldValue>>)> = model
        .entries
        .iter()
        .filter(|(key, entry)| key.starts_with(&query.prefix) && entry.is_live(now_ms))
        .filter(|(_, entry)| {
            query.filter.as_ref().is_none_or(|filter| {
                holds(
                    filter,
                    u16::try_from(filter.nodes.len() - 1).unwrap(),
                    entry,
                )
            })
        })
        .map(|(key, entry)| {
            let sort: Vec<Option<FieldValue>> = query
                .order_by
                .iter()
                .map(|order| entry.field(&order.field).cloned())
                .collect();
            (key.clone(), sort)
        })
        .filter(|(key, sort)| {
            query.after.as_ref().is_none_or(|after| {
                cursor_cmp(&query.order_by, sort, key, &after.sort, &after.key) == Ordering::Greater
            })
        })
        .collect();
    matches.sort_by(|(left_key, left_sort), (right_key, right_sort)| {
        cursor_cmp(&query.order_by, left_sort, left_key, right_sort, right_key)
    });
    matches
}

/// How well a comparison narrows through an index of `kind` (lower is better), as the
/// planner's documentation ranks them: `=`, `in`, a string prefix, a range bounded on both
/// sides, on one, on none.
fn rank(node: &QueryNode, kind: IndexKind) -> Option<u8> {
    match (node, kind) {
        (QueryNode::Equal { .. }, _) => Some(0),
        (QueryNode::In { .. }, _) => Some(1),
        (QueryNode::Prefix { .. }, IndexKind::Range) => Some(2),
        (QueryNode::Range { lower, upper, .. }, IndexKind::Range) => Some(match (lower, upper) {
            (Bound::Unbounded, Bound::Unbounded) => 5,
            (Bound::Unbounded, _) | (_, Bound::Unbounded) => 4,
            _ => 3,
        }),
        _ => None,
    }
}

/// The comparisons every match must satisfy: the root, or a root `and`'s operands.
fn required(filter: &Query) -> Vec<&QueryNode> {
    match filter.nodes.last() {
        Some(QueryNode::And(operands)) => operands
            .iter()
            .map(|operand| &filter.nodes[usize::from(*operand)])
            .collect(),
        Some(root) => vec![root],
        None => Vec::new(),
    }
}

/// Checks a page's plan: a ready index fitting a required comparison is used, one of the best
/// rank; the building ones that fit are listed; and the matches are sorted unless they come
/// in key order.
fn check_plan(model: &Model, query: &QueryRequest, page: &QueryPage) -> Result<(), TestCaseError> {
    let mut fitting: Vec<(u8, &ModelIndex)> = Vec::new();
    if let Some(filter) = &query.filter {
        for node in required(filter) {
            for index in &model.indexes {
                if node.field() == Some(index.spec.field.as_str())
                    && query.prefix.starts_with(&index.spec.prefix)
                {
                    if let Some(rank) = rank(node, index.spec.kind) {
                        fitting.push((rank, index));
                    }
                }
            }
        }
    }
    let mut building: Vec<&str> = fitting
        .iter()
        .filter(|(_, index)| index.build.is_some())
        .map(|(_, index)| index.spec.name.as_str())
        .collect();
    building.sort_unstable();
    building.dedup();
    let mut listed: Vec<&str> = page.plan.building.iter().map(String::as_str).collect();
    listed.sort_unstable();
    prop_assert_eq!(listed, building, "indexes building for {:?}", query);
    let best = fitting
        .iter()
        .filter(|(_, index)| index.build.is_none())
        .map(|(rank, _)| *rank)
        .min();
    match (&page.plan.access, best) {
        (QueryAccess::Scan, None) => {}
        (QueryAccess::Index { name, field, .. }, Some(best)) => {
            prop_assert!(model.is_ready(name), "{} is not ready", name);
            prop_assert!(
                fitting.iter().any(|(rank, index)| *rank == best
                    && index.spec.name == *name
                    && index.spec.field == *field),
                "{:?} used {}, not one of rank {}",
                query,
                name,
                best
            );
        }
        (access, best) => prop_assert!(
            false,
            "{:?} by {:?}; best ready rank {:?}",
            query,
            access,
            best
        ),
    }
    let key_ordered = best.is_none_or(|best| best <= 1);
    // Unless the matches come in key order already, they are sorted.
    let sorted = !query.count_only && (!query.order_by.is_empty() || !key_ordered);
    prop_assert_eq!(page.plan.sorted, sorted, "sorted for {:?}", query);
    prop_assert!(page.plan.matched <= page.plan.examined);
    Ok(())
}

/// Checks one page's items against the model's matches they should be.
fn check_items(
    shard: &Shard,
    model: &Model,
    query: &QueryRequest,
    items: &[QueryItem],
    expected: &[(Vec<u8>, Vec<Option<FieldValue>>)],
) -> Result<(), TestCaseError> {
    let keys: Vec<&[u8]> = items.iter().map(|item| item.key.as_slice()).collect();
    let expected_keys: Vec<&[u8]> = expected.iter().map(|(key, _)| key.as_slice()).collect();
    prop_assert_eq!(keys, expected_keys, "keys of {:?}", query);
    for (item, (key, sort)) in items.iter().zip(expected) {
        let entry = &model.entries[key];
        prop_assert_eq!(&item.sort, sort, "sort values of {:?}", key);
        let stored = shard.store.get(key).expect("a returned key is stored");
        match query.projection {
            Projection::KeysOnly => {
                prop_assert!(item.fields.is_empty() && item.entry.is_none(), "{:?}", item);
            }
            Projection::Fields => {
                prop_assert_eq!(&item.fields, &entry.fields, "fields of {:?}", key);
                prop_assert!(item.entry.is_none());
            }
            Projection::Full => {
                prop_assert!(item.fields.is_empty());
                let full = item.entry.as_ref().expect("a full item has its entry");
                prop_assert_eq!(&full.value, &entry.value, "value of {:?}", key);
                prop_assert_eq!(&full.fields, &entry.fields, "fields of {:?}", key);
                prop_assert_eq!(
                    full.expires_at_ms,
                    entry.deadline_ms,
                    "deadline of {:?}",
                    key
                );
                let revisions = stored.revisions();
                prop_assert_eq!(
                    (full.create_revision, full.mod_revision, full.version),
                    (revisions.create, revisions.modify, revisions.version)
                );
            }
        }
    }
    Ok(())
}

/// Answers `query` page by page and checks every page against the model.
fn check_query(
    shard: &Shard,
    model: &Model,
    now_ms: u64,
    query: &QueryRequest,
) -> Result<(), TestCaseError> {
    let expected = expected_matches(model, now_ms, query);
    let limit = query.limit as usize;
    let pages = all_pages(shard, now_ms, query);
    let first = &pages[0];
    check_plan(model, query, first)?;
    prop_assert_eq!(first.revision, shard.revision());
    if query.count_only {
        prop_assert_eq!(first.count, expected.len() as u64, "count of {:?}", query);
        prop_assert_eq!(first.plan.matched, first.count);
        prop_assert!(first.items.is_empty() && !first.more);
        return Ok(());
    }
    let mut rest = expected.as_slice();
    for page in &pages {
        check_plan(model, query, page)?;
        let taken = rest.len().min(limit);
        check_items(shard, model, query, &page.items, &rest[..taken])?;
        prop_assert_eq!(page.count, page.items.len() as u64);
        prop_assert_eq!(
            page.more,
            rest.len() > limit,
            "more after a page of {:?}",
            query
        );
        rest = &rest[taken..];
    }
    prop_assert!(rest.is_empty());
    Ok(())
}

/// Checks everything a step must leave true: the shard's invariants (its indexes against its
/// store among them), its keys and index list against the model's, `queries`, and on the
/// field of every index an `=` (and for a range index a range and a prefix), which must use
/// an index once it is ready.
fn check_shard(
    shard: &Shard,
    model: &Model,
    now_ms: u64,
    queries: &[QueryRequest],
) -> Result<(), TestCaseError> {
    shard.check_invariants();
    prop_assert_eq!(shard.key_count(), model.entries.len(), "keys stored");
    let infos: Vec<IndexInfo> = shard
        .indexes()
        .iter()
        .map(super::indexes::ShardIndex::info)
        .collect();
    let expected: Vec<IndexInfo> = model
        .indexes
        .iter()
        .map(|index| model.info(index))
        .collect();
    prop_assert_eq!(infos, expected, "the index list");
    for query in queries {
        check_query(shard, model, now_ms, query)?;
    }
    for index in &model.indexes {
        // An `=` any index can answer, and for a range index a range and a prefix.
        let mut probes = vec![QueryNode::Equal {
            field: index.spec.field.clone(),
            value: FieldValue::I64(1),
        }];
        if index.spec.kind == IndexKind::Range {
            probes.push(QueryNode::Range {
                field: index.spec.field.clone(),
                lower: Bound::Included(FieldValue::I64(1)),
                upper: Bound::Unbounded,
            });
            probes.push(QueryNode::Prefix {
                field: index.spec.field.clone(),
                prefix: "x".to_owned(),
            });
        }
        for node in probes {
            let probe = QueryRequest::new(
                index.spec.prefix.clone(),
                Some(Query { nodes: vec![node] }),
                2,
            );
            check_query(shard, model, now_ms, &probe)?;
            if index.build.is_none() {
                let page = query_page(shard, now_ms, &probe);
                prop_assert!(
                    matches!(page.plan.access, QueryAccess::Index { .. }),
                    "{:?}",
                    page.plan
                );
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Restart and recovery.

/// Replays every record of `log` after revision `after_revision` into `shard`.
fn replay(shard: &mut Shard, now_ms: u64, log: &[u8], after_revision: u64) {
    let mut offset = 0;
    while let ReadOutcome::Record(record, size) = read_record(&log[offset..]) {
        if record.revision > after_revision {
            shard
                .replay(now_ms, &record)
                .expect("a journaled record replays");
        }
        offset += size;
    }
    assert_eq!(offset, log.len(), "every journaled byte is a record");
}

/// A shard rebuilt from its whole journal, as recovery does without a snapshot.
fn recover_from_journal(now_ms: u64, log: &[u8]) -> Shard {
    let mut shard = Shard::with_journal(config(), now_ms);
    replay(&mut shard, now_ms, log, 0);
    shard
}

/// A snapshot file's bytes, made as `write_snapshot` makes them (entries live at the time,
/// then leases, locks and index definitions), of a shard that stands still meanwhile.
struct Snapshot {
    bytes: Vec<u8>,
    base_revision: u64,
}

impl Snapshot {
    fn of(shard: &Shard, now_ms: u64) -> Self {
        let base_revision = shard.revision();
        let mut bytes = SnapshotHeader {
            format_version: SNAPSHOT_FORMAT_VERSION,
            core_id: SHARD_ID,
            base_revision,
            taken_at_ms: now_ms,
        }
        .to_bytes()
        .to_vec();
        let mut encoder = ChunkEncoder::new();
        for partition in 0..PARTITION_COUNT {
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
        encoder.push_leases(shard.leases());
        encoder.push_locks(shard.locks());
        encoder.push_indexes(shard.indexes());
        encoder.finish(base_revision);
        bytes.extend_from_slice(&encoder.take_sealed(0).expect("the snapshot is sealed"));
        Self {
            bytes,
            base_revision,
        }
    }

    /// A shard recovered from this snapshot and the records of `log` after its base.
    fn recover(&self, now_ms: u64, log: &[u8]) -> Shard {
        let directory = TestDir::in_memory("query-snapshot");
        let path = directory
            .path()
            .join(snapshot_file_name(self.base_revision));
        std::fs::write(&path, &self.bytes).expect("the snapshot is written");
        let mut shard = Shard::with_journal(config(), now_ms);
        let loaded =
            load_snapshot(&path, SHARD_ID, &mut shard, now_ms).expect("the snapshot loads");
        assert_eq!(loaded.base_revision, self.base_revision);
        shard.restore_revision(loaded.base_revision);
        replay(&mut shard, now_ms, log, loaded.base_revision);
        shard.restore_revision(loaded.end_revision);
        shard
    }
}

/// Asserts that `recovered` answers every query, page by page, exactly as `original` does
/// (the plans aside: the original may still be building an index).
fn check_same_answers(
    original: &Shard,
    recovered: &Shard,
    now_ms: u64,
    queries: &[QueryRequest],
    how: &str,
) -> Result<(), TestCaseError> {
    prop_assert_eq!(
        recovered.revision(),
        original.revision(),
        "revision {}",
        how
    );
    let specs = |shard: &Shard| -> Vec<IndexSpec> {
        shard
            .indexes()
            .iter()
            .map(|index| index.spec.clone())
            .collect()
    };
    prop_assert_eq!(
        specs(recovered),
        specs(original),
        "index definitions {}",
        how
    );
    prop_assert!(
        !recovered.indexes().is_building(),
        "a recovered index is ready {}",
        how
    );
    for query in queries {
        let answers = |shard: &Shard| -> Vec<(Vec<QueryItem>, u64, bool, u64)> {
            all_pages(shard, now_ms, query)
                .into_iter()
                .map(|page| (page.items, page.count, page.more, page.revision))
                .collect()
        };
        prop_assert_eq!(answers(recovered), answers(original), "{:?} {}", query, how);
    }
    Ok(())
}

/// Recovers `shard` both ways and checks both against it and against the model as a
/// recovered shard must be; returns them, journal's first.
fn restart(
    shard: &Shard,
    model: &mut Model,
    now_ms: u64,
    log: &[u8],
    snapshot: Option<&Snapshot>,
    queries: &[QueryRequest],
) -> Result<Vec<Shard>, TestCaseError> {
    let mut recovered = vec![(recover_from_journal(now_ms, log), "from the journal")];
    if let Some(snapshot) = snapshot {
        recovered.push((
            snapshot.recover(now_ms, log),
            "from the snapshot and the journal",
        ));
    }
    model.restart(now_ms);
    for (shard_recovered, how) in &recovered {
        check_same_answers(shard, shard_recovered, now_ms, queries, how)?;
        check_shard(shard_recovered, model, now_ms, queries)?;
    }
    Ok(recovered.into_iter().map(|(shard, _)| shard).collect())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 128,
        // A failure prints the shrunk operations, which replay it exactly.
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// Random writes, expiries, lease ends, index definitions and build slices: after every
    /// step, random queries answer what a brute-force filter over the model does, and index
    /// and data never disagree, before and after a restart.
    #[test]
    fn queries_answer_as_a_brute_force_filter_over_a_model(
        initial in proptest::collection::vec((value(), fields()), KEYS.len()),
        steps in proptest::collection::vec(
            (operation(), proptest::collection::vec(query_request(), 2)),
            1..=40,
        ),
        snapshot_at in 0..40_usize,
        restart_at in 0..40_usize,
        continue_from_snapshot in any::<bool>(),
        final_queries in proptest::collection::vec(query_request(), 6),
    ) {
        let mut now_ms = START_MS;
        let mut shard = Shard::with_journal(config(), now_ms);
        let mut model = Model::default();
        // Every record journaled, across the restart too.
        let mut log = Vec::new();
        let mut snapshot = None;
        // Every key first, so that queries find something from the start.
        let initial = Operation::MultiPut(
            KEYS.iter()
                .zip(initial)
                .map(|(key, (value, fields))| (*key, value, fields, None))
                .collect(),
        );
        step(&mut shard, &mut model, &mut now_ms, &initial)?;
        for (index, (operation, queries)) in steps.iter().enumerate() {
            step(&mut shard, &mut model, &mut now_ms, operation)
                .map_err(|error| TestCaseError::fail(format!("step {index}: {error}")))?;
            log.extend_from_slice(&shard.journal_mut().map(RecordWriter::take).unwrap_or_default());
            check_shard(&shard, &model, now_ms, queries)
                .map_err(|error| TestCaseError::fail(format!("after step {index}: {error}")))?;
            if index == snapshot_at {
                snapshot = Some(Snapshot::of(&shard, now_ms));
            }
            if index == restart_at {
                let mut recovered = restart(&shard, &mut model, now_ms, &log, snapshot.as_ref(), queries)
                    .map_err(|error| TestCaseError::fail(format!("restart after step {index}: {error}")))?;
                shard = if continue_from_snapshot { recovered.pop() } else { recovered.into_iter().next() }
                    .expect("recovered");
            }
        }
        restart(&shard, &mut model, now_ms, &log, snapshot.as_ref(), &final_queries)
            .map_err(|error| TestCaseError::fail(format!("final restart: {error}")))?;
    }
}

// ---------------------------------------------------------------------------------------------
// The planner and a query's bounds.

fn put_fields(shard: &mut Shard, key: &str, fields: &[(&str, FieldValue)]) {
    let request = Request::Put(Box::new(Put {
        fields: fields
            .iter()
            .map(|(name, value)| Field::new(*name, value.clone()))
            .collect(),
        ..Put::new(key, "v")
    }));
    assert!(matches!(
        apply(shard, START_MS, &request),
        Response::Put { applied: true, .. }
    ));
}

fn create_index(shard: &mut Shard, name: &str, prefix: &str, field: &str, kind: IndexKind) {
    let spec = IndexSpec {
        name: name.to_owned(),
        prefix: prefix.as_bytes().to_vec(),
        field: field.to_owned(),
        kind,
    };
    let response = apply(shard, START_MS, &Request::CreateIndex(Box::new(spec)));
    assert_eq!(response, Response::IndexCreated { created: true });
}

/// `text` as a query on every key.
fn parsed(text: &str) -> QueryRequest {
    let filter = tessera_protocol::query::parse_query(text).expect("the query parses");
    QueryRequest::new("", Some(filter), 100)
}

fn keys_of(page: &QueryPage) -> Vec<String> {
    page.items
        .iter()
        .map(|item| String::from_utf8(item.key.clone()).unwrap())
        .collect()
}

fn index_used(page: &QueryPage) -> Option<&str> {
    match &page.plan.access {
        QueryAccess::Index { name, .. } => Some(name),
        QueryAccess::Scan => None,
    }
}

/// Keys `k00`..: `age` their index modulo 10, `city` one of two, `tag` on every third.
fn people(count: usize) -> Shard {
    let mut shard = Shard::new(config(), START_MS);
    for index in 0..count {
        let mut fields = vec![
            ("age", FieldValue::I64(i64::try_from(index % 10).unwrap())),
            (
                "city",
                FieldValue::Str(if index % 2 == 0 { "Oslo" } else { "Bergen" }.to_owned()),
            ),
        ];
        if index % 3 == 0 {
            fields.push(("tag", FieldValue::Bool(true)));
        }
        put_fields(&mut shard, &format!("k{index:03}"), &fields);
    }
    shard
}

/// An `=` on an equality index beats every range, and an `in` beats a range; among ranges, one
/// bounded on both sides beats one bounded on one. Whatever is picked, the filter as a whole
/// decides what matches.
#[test]
fn the_planner_prefers_equality_then_in_then_the_narrowest_range() {
    let mut shard = people(40);
    create_index(&mut shard, "age_range", "", "age", IndexKind::Range);
    create_index(&mut shard, "city_eq", "", "city", IndexKind::Equality);
    // One build at a time: the first, then the second.
    assert!(shard.build_indexes(usize::MAX));
    assert!(!shard.build_indexes(usize::MAX));
    let cases = [
        (r#"age >= 3 and city = "Oslo""#, Some("city_eq"), 12),
        (
            r#"city in ("Oslo", "Paris") and age < 2"#,
            Some("city_eq"),
            4,
        ),
        ("age >= 3 and age < 5", Some("age_range"), 8),
        (r#"city prefix "Os""#, None, 20),
        // An `or` requires neither side, so no index narrows it.
        (r#"age = 1 or city = "Oslo""#, None, 24),
        ("not age = 1", None, 36),
    ];
    for (text, index, match_count) in cases {
        let page = query_page(&shard, START_MS, &parsed(text));
        assert_eq!(index_used(&page), index, "{text}");
        assert_eq!(page.items.len(), match_count, "{text}");
        assert_eq!(page.plan.matched, match_count as u64, "{text}");
    }
    // Two ranges of one field: the planner takes the one bounded on both sides.
    let query = Query {
        nodes: vec![
            QueryNode::Range {
                field: "age".to_owned(),
                lower: Bound::Included(FieldValue::I64(8)),
                upper: Bound::Unbounded,
            },
            QueryNode::Range {
                field: "age".to_owned(),
                lower: Bound::Excluded(FieldValue::I64(7)),
                upper: Bound::Excluded(FieldValue::I64(9)),
            },
            QueryNode::And(vec![0, 1]),
        ],
    };
    let page = query_page(&shard, START_MS, &QueryRequest::new("", Some(query), 100));
    match &page.plan.access {
        QueryAccess::Index { name, lookup, .. } => {
            assert_eq!(name, "age_range");
            assert!(lookup.contains('<'), "the bounded range: {lookup}");
        }
        QueryAccess::Scan => panic!("no index used"),
    }
    // Only the keys of age 8 are read through it, and only they match.
    assert_eq!(page.plan.examined, 4);
    assert_eq!(keys_of(&page), ["k008", "k018", "k028", "k038"]);
}

/// An index that has not filed every key yet is named in the plan and not used; once its
/// build is done, it is used, and the answer is the same.
#[test]
fn a_building_index_is_listed_and_not_used() {
    let mut shard = people(20);
    create_index(&mut shard, "age_eq", "", "age", IndexKind::Equality);
    let query = parsed("age = 4");
    let building = query_page(&shard, START_MS, &query);
    assert_eq!(building.plan.access, QueryAccess::Scan);
    assert_eq!(building.plan.building, ["age_eq"]);
    assert_eq!(building.plan.examined, 20);
    // Half the keys filed: still not used.
    assert!(shard.build_indexes(10));
    assert_eq!(
        query_page(&shard, START_MS, &query).plan.building,
        ["age_eq"]
    );
    assert!(!shard.build_indexes(100));
    let ready = query_page(&shard, START_MS, &query);
    assert_eq!(index_used(&ready), Some("age_eq"));
    assert!(ready.plan.building.is_empty());
    assert_eq!(ready.plan.examined, 2);
    assert_eq!(ready.items, building.items);
    // An index of another prefix than the query's does not fit it, building or not.
    create_index(&mut shard, "age_k1", "k01", "age", IndexKind::Equality);
    let page = query_page(&shard, START_MS, &query);
    assert_eq!(index_used(&page), Some("age_eq"));
    assert!(page.plan.building.is_empty());
}

/// Expired entries an index still files (until they are reclaimed) are never returned.
#[test]
fn expired_entries_are_skipped_through_an_index() {
    let mut shard = people(4);
    create_index(&mut shard, "city_eq", "", "city", IndexKind::Equality);
    assert!(!shard.build_indexes(usize::MAX));
    let expire = Request::Expire {
        key: b"k002".to_vec(),
        ttl_ms: 10,
    };
    assert!(matches!(
        apply(&mut shard, START_MS, &expire),
        Response::Expiry { applied: true, .. }
    ));
    let query = parsed(r#"city = "Oslo""#);
    assert_eq!(
        keys_of(&query_page(&shard, START_MS, &query)),
        ["k000", "k002"]
    );
    let later = START_MS + 10;
    let page = query_page(&shard, later, &query);
    assert_eq!(index_used(&page), Some("city_eq"));
    assert_eq!(keys_of(&page), ["k000"]);
    assert_eq!(shard.indexes().get("city_eq").unwrap().info().entries, 4);
    assert_eq!(shard.tick(later), 1);
    assert_eq!(shard.indexes().get("city_eq").unwrap().info().entries, 3);
    shard.check_invariants();
}

fn query_with_budget(
    shard: &Shard,
    query: &QueryRequest,
    time_left: &mut dyn FnMut() -> bool,
    sort_items_max: usize,
) -> Response {
    let mut budget = QueryBudget {
        time_left,
        time_budget_ms: 25,
        sort_items_max,
    };
    shard.query(START_MS, query, &mut budget)
}

/// The clock is asked every `BUDGET_CHECK_EVERY` candidates, not before; a query past its
/// budget is refused, saying how far it got, never cut short silently.
#[test]
fn a_query_past_its_time_budget_is_refused() {
    let shard = people(3 * usize::try_from(BUDGET_CHECK_EVERY).unwrap());
    let query = QueryRequest {
        count_only: true,
        ..parsed("age = 3")
    };
    let mut asked = 0;
    let mut one_look = || {
        asked += 1;
        asked < 2
    };
    match query_with_budget(&shard, &query, &mut one_look, SORT_ITEMS_MAX) {
        Response::Error(reply) => {
            assert_eq!(reply.code, ErrorCode::BudgetExceeded);
            assert!(
                reply.message.contains("time budget of 25 ms"),
                "{}",
                reply.message
            );
            let examined = 2 * BUDGET_CHECK_EVERY;
            assert!(
                reply
                    .message
                    .contains(&format!("after examining {examined} entries")),
                "{}",
                reply.message
            );
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(asked, 2);
    // Fewer candidates than that: the clock is never asked.
    let mut never = || -> bool { panic!("the clock was asked") };
    let small = people(usize::try_from(BUDGET_CHECK_EVERY).unwrap() - 1);
    assert!(matches!(
        query_with_budget(&small, &query, &mut never, SORT_ITEMS_MAX),
        Response::Query(_)
    ));
}

/// Matches that must be sorted are collected up to `sort_items_max`; one more is refused.
/// Key order needs no sorting, so a scan in key order has no such bound.
#[test]
fn sorting_more_than_sort_items_max_is_refused() {
    let shard = people(10);
    let mut time_left = || true;
    let by_age = QueryRequest {
        order_by: vec![OrderBy {
            field: "age".to_owned(),
            descending: true,
        }],
        ..QueryRequest::new("", None, 3)
    };
    match query_with_budget(&shard, &by_age, &mut time_left, 9) {
        Response::Error(reply) => {
            assert_eq!(reply.code, ErrorCode::BudgetExceeded);
            assert!(
                reply.message.contains("more than 9 entries"),
                "{}",
                reply.message
            );
        }
        other => panic!("{other:?}"),
    }
    let Response::Query(page) = query_with_budget(&shard, &by_age, &mut time_left, 10) else {
        panic!("refused with room for every match");
    };
    assert_eq!(keys_of(&page), ["k009", "k008", "k007"]);
    assert!(page.more && page.plan.sorted);
    let in_key_order = QueryRequest::new("", None, 3);
    let Response::Query(page) = query_with_budget(&shard, &in_key_order, &mut time_left, 1) else {
        panic!("a scan in key order sorts nothing");
    };
    assert_eq!(keys_of(&page), ["k000", "k001", "k002"]);
    assert!(page.more && !page.plan.sorted);
}

/// A count with a cursor counts the matches after it, whether they come in key order (the
/// cursor is where the scan starts) or must be sorted (the cursor is compared with each).
/// Before, a count in key order started after the cursor while a count in another order
/// ignored it, so the same position gave two answers.
#[test]
fn a_count_after_a_cursor_counts_the_matches_after_it() {
    let mut shard = people(10);
    create_index(&mut shard, "age_range", "", "age", IndexKind::Range);
    assert!(!shard.build_indexes(usize::MAX));
    let by_key = QueryRequest {
        after: Some(QueryCursor {
            sort: Vec::new(),
            key: b"k004".to_vec(),
        }),
        count_only: true,
        ..QueryRequest::new("", None, 1)
    };
    let by_age = QueryRequest {
        order_by: vec![OrderBy {
            field: "age".to_owned(),
            descending: false,
        }],
        after: Some(QueryCursor {
            sort: vec![Some(FieldValue::I64(4))],
            key: b"k004".to_vec(),
        }),
        ..by_key.clone()
    };
    // Through a range index, whose keys come in value order, too.
    let ranged = QueryRequest {
        filter: parsed("age >= 0").filter,
        ..by_key.clone()
    };
    for query in [by_key, by_age, ranged] {
        let page = query_page(&shard, START_MS, &query);
        assert_eq!(page.count, 5, "{query:?}");
        assert_eq!(page.plan.matched, 5, "{query:?}");
    }
}
