//! Sans-I/O tests of [`Shard`]: every request is applied at an explicit `now_ms`, and time
//! moves only when a test says so.
//!
//! Command semantics are table-driven, in the style of raft-rs's data-driven tests: each row
//! is `(now_ms, request, expected response, revision afterwards)`, and the rows run in order
//! against one shard. A property test then drives random operations over a small key space
//! with a random non-decreasing clock and compares the shard with a plain map after every
//! step.
//!
//! Every request goes through the real codec (archived, validated and checked against the
//! protocol's limits), so the shard sees exactly what a connection would hand it, and every
//! step ends with `check_invariants`. Nothing here depends on how the timer wheel is built:
//! it is seen only through `tick` and `timer_count`.

use std::collections::BTreeMap;

use proptest::prelude::*;
use tessera_protocol::codec::{self, FrameBuffer};
use tessera_protocol::limits::{TXN_RANGE_ITEMS_MAX, TXN_READ_BYTES_MAX};
use tessera_protocol::PutCondition::{Always, IfAbsent, IfPresent, IfValue, IfVersion};
use tessera_protocol::{
    Check, Compare, CompareOp, CounterAdd, Delete, DeleteCondition, Entry, ErrorCode, ErrorReply,
    LeaseId, LeaseState, Put, PutCondition, PutEntry, Request, Response, Scan, ScanItem, ScanPage,
    SlotRange, TtlState, Txn, TxnOp, TxnOutcome, TxnResult, SLOT_COUNT,
};

use super::lease::LeaseLimits;
use super::lock::{LockEvent, LockLimits};
use super::store::entry_cost;
use super::watch::{Change, DeleteCause, Event, Start, WatchLimits, WatchSpec};
use super::{LockStep, Shard, ShardConfig, ShardId, ShardStats};
use crate::durability::format::{read_record, ReadOutcome, RecordWriter};

const NODE_ID: u32 = 1;
const SHARD_ID: ShardId = 0;
/// Every slot, so every key a test makes up is owned by the shard under test.
const SLOTS_ALL: SlotRange = SlotRange {
    start: 0,
    end: SLOT_COUNT,
};
const MEMORY_BYTES_UNLIMITED: u64 = 1 << 40;
const EXPIRED_PER_TICK_MAX: usize = 1_024;
const START_MS: u64 = 1_000;

fn config(memory_bytes_max: u64, expired_per_tick_max: usize) -> ShardConfig {
    ShardConfig {
        node_id: NODE_ID,
        shard_id: SHARD_ID,
        slots: SLOTS_ALL,
        memory_bytes_max,
        expired_per_tick_max,
        watch_limits: WatchLimits {
            queue_bytes_max: usize::MAX,
            queue_total_bytes_max: usize::MAX,
            ..WatchLimits::default()
        },
        lease_limits: LeaseLimits::default(),
        lock_limits: LockLimits::default(),
    }
}

fn new_shard() -> Shard {
    Shard::new(
        config(MEMORY_BYTES_UNLIMITED, EXPIRED_PER_TICK_MAX),
        START_MS,
    )
}

/// Archives `request` as a client would send it and applies it at `now_ms`.
fn apply(shard: &mut Shard, now_ms: u64, request: &Request) -> Response {
    let mut body = FrameBuffer::new();
    codec::encode_request_body(&mut body, request).expect("test request archives");
    let archived = codec::access_request(&body).expect("archived request validates");
    codec::check_request(archived).expect("test request is within the protocol's limits");
    let response = shard.apply(now_ms, archived);
    shard.check_invariants();
    response
}

/// What `Shard::journal_bound` says `request` may write to the log, as the core asks it.
fn journal_bound(shard: &Shard, request: &Request) -> Option<u64> {
    let mut body = FrameBuffer::new();
    codec::encode_request_body(&mut body, request).expect("test request archives");
    shard.journal_bound(codec::access_request(&body).expect("archived request validates"))
}

fn tick(shard: &mut Shard, now_ms: u64) -> usize {
    let reclaimed_count = shard.tick(now_ms);
    shard.check_invariants();
    reclaimed_count
}

/// Error replies match on their code alone: the message is for people, and the numbers in it
/// are not something a table should have to spell out.
fn same_response(actual: &Response, expected: &Response) -> bool {
    match (actual, expected) {
        (Response::Error(actual), Response::Error(expected)) => actual.code == expected.code,
        _ => actual == expected,
    }
}

/// One table row: at `now_ms` (first), the request gets the response, after which the shard's
/// revision is the last field.
type Step = (u64, Request, Response, u64);

/// `response` with every entry's create revision and version cleared, and the version of a
/// put (alone or in a transaction): the tables spell out values and mod revisions, and
/// `revisions_count_writes_and_creation` and the model test check the other two. A delete's
/// version is kept: it is 0 unless a conditional delete lost, which is what its tables check.
fn without_create_and_version(response: &Response) -> Response {
    let clear = |entry: &mut Entry| {
        entry.create_revision = 0;
        entry.version = 0;
    };
    let clear_page = |page: &mut ScanPage| {
        page.items
            .iter_mut()
            .filter_map(|item| item.entry.as_mut())
            .for_each(clear);
    };
    let mut response = response.clone();
    if let Response::Put { version, .. } = &mut response {
        *version = 0;
    }
    if let Response::Txn(outcome) = &mut response {
        for result in &mut outcome.results {
            match result {
                TxnResult::Get(entry) => entry.iter_mut().for_each(clear),
                TxnResult::Put { version, previous } => {
                    *version = 0;
                    previous.iter_mut().for_each(clear);
                }
                TxnResult::Delete { previous, .. } => previous.iter_mut().for_each(clear),
                TxnResult::Add { .. } => {}
                TxnResult::Range(page) => clear_page(page),
            }
        }
    }
    match &mut response {
        Response::Value(Some(entry))
        | Response::Put {
            previous: Some(entry),
            ..
        }
        | Response::Delete {
            previous: Some(entry),
            ..
        } => clear(entry),
        Response::Values(entries) => entries.iter_mut().flatten().for_each(clear),
        Response::Scan(page) => clear_page(page),
        _ => {}
    }
    response
}

fn run(shard: &mut Shard, steps: &[Step]) {
    for (index, (now_ms, request, expected, revision)) in steps.iter().enumerate() {
        let actual = without_create_and_version(&apply(shard, *now_ms, request));
        assert!(
            same_response(&actual, expected),
            "step {index} at now_ms={now_ms}: {request:?}\n  actual: {actual:?}\nexpected: \
             {expected:?}"
        );
        assert_eq!(
            shard.revision(),
            *revision,
            "revision after step {index} at now_ms={now_ms}: {request:?}"
        );
    }
}

// Requests.

fn get(key: &str) -> Request {
    Request::Get { key: key.into() }
}

fn exists(key: &str) -> Request {
    Request::Exists { key: key.into() }
}

fn ttl(key: &str) -> Request {
    Request::Ttl { key: key.into() }
}

fn expire(key: &str, ttl_ms: u64) -> Request {
    Request::Expire {
        key: key.into(),
        ttl_ms,
    }
}

fn persist(key: &str) -> Request {
    Request::Persist { key: key.into() }
}

fn delete(key: &str) -> Request {
    Request::Delete(Box::new(Delete::new(key)))
}

fn delete_returning(key: &str) -> Request {
    delete_if(key, DeleteCondition::Always, true)
}

fn delete_if(key: &str, condition: DeleteCondition, return_previous: bool) -> Request {
    Request::Delete(Box::new(Delete {
        condition,
        return_previous,
        ..Delete::new(key)
    }))
}

fn put(key: &str, value: &str) -> Request {
    Request::Put(Box::new(Put::new(key, value)))
}

fn put_ttl(key: &str, value: &str, ttl_ms: u64) -> Request {
    Request::Put(Box::new(Put {
        ttl_ms: Some(ttl_ms),
        ..Put::new(key, value)
    }))
}

fn put_keep_ttl(key: &str, value: &str) -> Request {
    Request::Put(Box::new(Put {
        keep_ttl: true,
        ..Put::new(key, value)
    }))
}

fn put_if(key: &str, value: &str, condition: PutCondition) -> Request {
    Request::Put(Box::new(Put {
        condition,
        ..Put::new(key, value)
    }))
}

fn put_returning(key: &str, value: &str, condition: PutCondition) -> Request {
    Request::Put(Box::new(Put {
        condition,
        return_previous: true,
        ..Put::new(key, value)
    }))
}

fn multi_get(keys: &[&str]) -> Request {
    Request::MultiGet {
        keys: keys.iter().map(|key| key.as_bytes().to_vec()).collect(),
    }
}

fn multi_put(entries: &[(&str, &str, Option<u64>)]) -> Request {
    Request::MultiPut {
        entries: entries
            .iter()
            .map(|&(key, value, ttl_ms)| PutEntry {
                key: key.into(),
                value: value.into(),
                ttl_ms,
                fields: Vec::new(),
            })
            .collect(),
    }
}

fn multi_delete(keys: &[&str]) -> Request {
    Request::MultiDelete {
        keys: keys.iter().map(|key| key.as_bytes().to_vec()).collect(),
    }
}

// Responses.

/// An entry last modified at `mod_revision` (create revision and version unchecked: see
/// `without_create_and_version`).
fn entry(value: &str, mod_revision: u64) -> Entry {
    Entry {
        value: value.into(),
        create_revision: 0,
        mod_revision,
        version: 0,
        expires_at_ms: None,
        fields: Vec::new(),
    }
}

fn entry_until(value: &str, mod_revision: u64, expires_at_ms: u64) -> Entry {
    Entry {
        expires_at_ms: Some(expires_at_ms),
        ..entry(value, mod_revision)
    }
}

fn found(entry: Entry) -> Response {
    Response::Value(Some(entry))
}

fn not_found() -> Response {
    Response::Value(None)
}

// Versions are left out here, as in `without_create_and_version`: the model test checks them.
fn applied(mod_revision: u64) -> Response {
    put_reply(true, mod_revision, None)
}

fn not_applied(mod_revision: u64) -> Response {
    put_reply(false, mod_revision, None)
}

fn put_reply(applied: bool, mod_revision: u64, previous: Option<Entry>) -> Response {
    Response::Put {
        applied,
        mod_revision,
        version: 0,
        previous,
    }
}

fn is_present(exists: bool) -> Response {
    Response::Exists { exists }
}

fn deleted(deleted: bool) -> Response {
    Response::Delete {
        deleted,
        version: 0,
        previous: None,
    }
}

fn expiry(applied: bool, mod_revision: u64) -> Response {
    Response::Expiry {
        applied,
        mod_revision,
    }
}

fn persistent() -> Response {
    Response::Ttl(TtlState::Persistent)
}

fn missing() -> Response {
    Response::Ttl(TtlState::Missing)
}

fn expiring(remaining_ms: u64, expires_at_ms: u64) -> Response {
    Response::Ttl(TtlState::Expiring {
        remaining_ms,
        expires_at_ms,
    })
}

fn values(entries: Vec<Option<Entry>>) -> Response {
    Response::Values(entries)
}

fn multi_put_versions(mod_revisions: &[u64]) -> Response {
    Response::MultiPut {
        mod_revisions: mod_revisions.to_vec(),
    }
}

fn multi_deleted(deleted: &[bool]) -> Response {
    Response::MultiDelete {
        deleted: deleted.to_vec(),
    }
}

fn store_full() -> Response {
    Response::Error(ErrorReply::new(ErrorCode::StoreFull, ""))
}

/// What the store charges for `key` holding `value`.
fn cost(key: &str, value: &str, has_expiry: bool) -> u64 {
    entry_cost(key.len(), value.len(), has_expiry)
}

#[test]
fn ping_answers_with_the_configured_node_and_core() {
    let mut shard = Shard::new(
        ShardConfig {
            node_id: 7,
            shard_id: 3,
            ..config(MEMORY_BYTES_UNLIMITED, EXPIRED_PER_TICK_MAX)
        },
        START_MS,
    );
    let pong = Response::Pong {
        node_id: 7,
        core_id: 3,
    };
    run(&mut shard, &[(1000, Request::Ping, pong, 0)]);
}

#[test]
fn hello_and_stats_are_refused_because_the_core_answers_them() {
    let internal = Response::Error(ErrorReply::new(ErrorCode::Internal, ""));
    let hello = Request::Hello {
        protocol_version: tessera_protocol::PROTOCOL_VERSION,
        client_name: "test".into(),
    };
    run(
        &mut new_shard(),
        &[
            (1000, hello, internal.clone(), 0),
            (1000, Request::Stats, internal, 0),
        ],
    );
}

#[test]
fn get_put_delete_and_exists() {
    let mut shard = new_shard();
    run(
        &mut shard,
        &[
            (1000, get("a"), not_found(), 0),
            (1000, exists("a"), is_present(false), 0),
            (1000, ttl("a"), missing(), 0),
            (1000, put("a", "1"), applied(1), 1),
            (1000, get("a"), found(entry("1", 1)), 1),
            (1000, exists("a"), is_present(true), 1),
            (1000, ttl("a"), persistent(), 1),
            (1000, put("b", "2"), applied(2), 2),
            (1000, put("a", "3"), applied(3), 3),
            (1000, get("a"), found(entry("3", 3)), 3),
            (1000, get("b"), found(entry("2", 2)), 3),
            (1000, delete("a"), deleted(true), 4),
            (1000, delete("a"), deleted(false), 4),
            (1000, get("a"), not_found(), 4),
            (1000, exists("a"), is_present(false), 4),
            (1000, ttl("a"), missing(), 4),
            // An empty value is a value, not a deletion.
            (1000, put("a", ""), applied(5), 5),
            (1000, get("a"), found(entry("", 5)), 5),
            (1000, exists("a"), is_present(true), 5),
        ],
    );
    assert_eq!(shard.key_count(), 2);
    assert_eq!(shard.timer_count(), 0);
    assert_eq!(
        shard.memory_bytes(),
        cost("a", "", false) + cost("b", "2", false)
    );
}

#[test]
fn every_mutation_is_one_revision_and_reads_are_none() {
    let pong = Response::Pong {
        node_id: NODE_ID,
        core_id: SHARD_ID,
    };
    run(
        &mut new_shard(),
        &[
            (1000, put("a", "1"), applied(1), 1),
            (1000, put("b", "1"), applied(2), 2),
            (1000, get("a"), found(entry("1", 1)), 2),
            (1000, exists("a"), is_present(true), 2),
            (1000, ttl("a"), persistent(), 2),
            (
                1000,
                multi_get(&["a", "b"]),
                values(vec![Some(entry("1", 1)), Some(entry("1", 2))]),
                2,
            ),
            (1000, Request::Ping, pong, 2),
            // Refused and empty-handed writes are not mutations either.
            (1000, put_if("a", "2", IfAbsent), not_applied(1), 2),
            (1000, delete("missing"), deleted(false), 2),
            (1000, expire("missing", 10), expiry(false, 0), 2),
            (1000, persist("a"), expiry(false, 1), 2),
            (1000, multi_delete(&["missing"]), multi_deleted(&[false]), 2),
            // Each kind of mutation moves the revision by exactly one and stamps the entry.
            (1000, expire("a", 500), expiry(true, 3), 3),
            (1000, get("a"), found(entry_until("1", 3, 1500)), 3),
            (1000, persist("a"), expiry(true, 4), 4),
            (1000, get("a"), found(entry("1", 4)), 4),
            (1000, put("a", "2"), applied(5), 5),
            (
                1000,
                multi_put(&[("a", "3", None), ("c", "3", None)]),
                multi_put_versions(&[6, 6]),
                6,
            ),
            (1000, get("a"), found(entry("3", 6)), 6),
            (1000, get("c"), found(entry("3", 6)), 6),
            (1000, delete("c"), deleted(true), 7),
            (
                1000,
                multi_delete(&["a", "b"]),
                multi_deleted(&[true, true]),
                8,
            ),
        ],
    );
}

#[test]
fn put_reply_carries_the_current_version_when_not_applied() {
    run(
        &mut new_shard(),
        &[
            // Absent key: version 0.
            (1000, put_if("a", "1", IfPresent), not_applied(0), 0),
            (1000, put("a", "1"), applied(1), 1),
            (1000, put("other", "1"), applied(2), 2),
            // Present key: its own version, not the shard's revision.
            (1000, put_if("a", "2", IfAbsent), not_applied(1), 2),
            (1000, expire("a", 100), expiry(true, 3), 3),
            (1000, put_if("a", "2", IfAbsent), not_applied(3), 3),
            (1000, get("a"), found(entry_until("1", 3, 1100)), 3),
        ],
    );
}

#[test]
fn conditions_on_absent_present_and_expired_keys() {
    let mut shard = new_shard();
    run(
        &mut shard,
        &[
            (1000, put_if("a", "1", IfPresent), not_applied(0), 0),
            (1000, get("a"), not_found(), 0),
            (1000, put_if("a", "1", IfAbsent), applied(1), 1),
            (1000, put_if("a", "2", IfAbsent), not_applied(1), 1),
            (1000, get("a"), found(entry("1", 1)), 1),
            (1000, put_if("a", "3", IfPresent), applied(2), 2),
            (1000, get("a"), found(entry("3", 2)), 2),
            (1000, put_if("a", "4", Always), applied(3), 3),
            (1000, put_ttl("b", "old", 100), applied(4), 4),
            (1000, put_ttl("c", "old", 100), applied(5), 5),
            (1099, put_if("b", "new", IfAbsent), not_applied(4), 5),
            (1099, put_if("c", "new", IfPresent), applied(6), 6),
            (1099, get("c"), found(entry("new", 6)), 6),
            // b's deadline has passed but no tick has run: a write sees it as absent. Its
            // reclaim is a mutation of its own, before the write's.
            (1100, put_if("b", "new", IfPresent), not_applied(0), 7),
            (1100, get("b"), not_found(), 7),
            (1100, put_ttl("d", "old", 100), applied(8), 8),
            (1200, put_if("d", "new", IfAbsent), applied(10), 10),
            (1200, get("d"), found(entry("new", 10)), 10),
            (1200, ttl("d"), persistent(), 10),
        ],
    );
    // Both expired keys were reclaimed by the writes, so no timer is left for tick.
    assert_eq!(shard.key_count(), 3);
    assert_eq!(shard.timer_count(), 0);
    assert_eq!(tick(&mut shard, 1200), 0);
    assert_eq!(shard.revision(), 10);
    assert_eq!(shard.stats().expired_count, 2);
}

#[test]
fn return_previous_on_puts_and_deletes() {
    run(
        &mut new_shard(),
        &[
            (
                1000,
                put_returning("a", "1", Always),
                put_reply(true, 1, None),
                1,
            ),
            (
                1000,
                put_returning("a", "2", Always),
                put_reply(true, 2, Some(entry("1", 1))),
                2,
            ),
            // A refused put returns what it found.
            (
                1000,
                put_returning("a", "3", IfAbsent),
                put_reply(false, 2, Some(entry("2", 2))),
                2,
            ),
            (
                1000,
                put_returning("b", "1", IfPresent),
                put_reply(false, 0, None),
                2,
            ),
            (
                1000,
                put_returning("b", "1", IfAbsent),
                put_reply(true, 3, None),
                3,
            ),
            (
                1000,
                put_returning("b", "2", IfPresent),
                put_reply(true, 4, Some(entry("1", 3))),
                4,
            ),
            // The previous entry carries its deadline.
            (1000, put_ttl("t", "x", 500), applied(5), 5),
            (
                1200,
                put_returning("t", "y", Always),
                put_reply(true, 6, Some(entry_until("x", 5, 1500))),
                6,
            ),
            // Not asked, not returned.
            (1200, put("a", "4"), applied(7), 7),
            (1200, delete("b"), deleted(true), 8),
            (
                1200,
                delete_returning("a"),
                Response::Delete {
                    deleted: true,
                    version: 0,
                    previous: Some(entry("4", 7)),
                },
                9,
            ),
            (1200, delete_returning("a"), deleted(false), 9),
            (1200, put_ttl("t", "z", 100), applied(10), 10),
            (
                1250,
                delete_returning("t"),
                Response::Delete {
                    deleted: true,
                    version: 0,
                    previous: Some(entry_until("z", 10, 1300)),
                },
                11,
            ),
            // An expired key is not returned, whether or not its timer has fired.
            (1250, put_ttl("e", "gone", 50), applied(12), 12),
            (
                1300,
                put_returning("e", "new", Always),
                put_reply(true, 14, None),
                14,
            ),
            (1300, put_ttl("f", "gone", 50), applied(15), 15),
            (1350, delete_returning("f"), deleted(false), 16),
        ],
    );
}

#[test]
fn expired_key_is_invisible_before_tick_reclaims_it() {
    let mut shard = new_shard();
    run(
        &mut shard,
        &[
            (1000, put_ttl("k", "v", 100), applied(1), 1),
            (1099, get("k"), found(entry_until("v", 1, 1100)), 1),
            (1099, exists("k"), is_present(true), 1),
            (1099, ttl("k"), expiring(1, 1100), 1),
            (
                1099,
                multi_get(&["k"]),
                values(vec![Some(entry_until("v", 1, 1100))]),
                1,
            ),
            (1100, get("k"), not_found(), 1),
            (1100, exists("k"), is_present(false), 1),
            (1100, ttl("k"), missing(), 1),
            (1100, multi_get(&["k"]), values(vec![None]), 1),
        ],
    );
    // Reads never reclaim: the entry and its timer are still held.
    assert_eq!(shard.key_count(), 1);
    assert_eq!(shard.timer_count(), 1);
    assert_eq!(tick(&mut shard, 1099), 0);
    assert_eq!(shard.key_count(), 1);
    assert_eq!(tick(&mut shard, 1100), 1);
    assert_eq!(shard.key_count(), 0);
    assert_eq!(shard.timer_count(), 0);
    assert_eq!(shard.memory_bytes(), 0);
    assert_eq!(shard.revision(), 2, "the expiry is one mutation");
    assert_eq!(tick(&mut shard, 1100), 0);
    assert_eq!(tick(&mut shard, 5000), 0);
    assert_eq!(shard.revision(), 2);
    assert_eq!(shard.stats().expired_count, 1);
    run(&mut shard, &[(5000, get("k"), not_found(), 2)]);
}

#[test]
fn expire_then_persist() {
    let mut shard = new_shard();
    run(
        &mut shard,
        &[
            (1000, expire("k", 100), expiry(false, 0), 0),
            (1000, put("k", "v"), applied(1), 1),
            (1000, expire("k", 500), expiry(true, 2), 2),
            (1000, get("k"), found(entry_until("v", 2, 1500)), 2),
            (1000, ttl("k"), expiring(500, 1500), 2),
            (1200, ttl("k"), expiring(300, 1500), 2),
            (1499, ttl("k"), expiring(1, 1500), 2),
        ],
    );
    assert_eq!(shard.timer_count(), 1);
    assert_eq!(shard.memory_bytes(), cost("k", "v", true));
    run(
        &mut shard,
        &[
            // Expire again: the new deadline counts from now and replaces the old one.
            (1499, expire("k", 1000), expiry(true, 3), 3),
            (1499, ttl("k"), expiring(1000, 2499), 3),
        ],
    );
    assert_eq!(shard.timer_count(), 1);
    assert_eq!(
        tick(&mut shard, 1500),
        0,
        "the replaced deadline must not fire"
    );
    run(
        &mut shard,
        &[
            (1500, persist("k"), expiry(true, 4), 4),
            (1500, ttl("k"), persistent(), 4),
            (1500, get("k"), found(entry("v", 4)), 4),
            (9000, get("k"), found(entry("v", 4)), 4),
            (9000, persist("k"), expiry(false, 4), 4),
        ],
    );
    assert_eq!(shard.timer_count(), 0);
    assert_eq!(shard.memory_bytes(), cost("k", "v", false));
    assert_eq!(tick(&mut shard, 9000), 0);
    assert_eq!(shard.key_count(), 1);
}

#[test]
fn persist_without_ttl_is_not_a_mutation() {
    let mut shard = new_shard();
    run(
        &mut shard,
        &[
            (1000, persist("k"), expiry(false, 0), 0),
            (1000, put("k", "v"), applied(1), 1),
            (1000, put("other", "v"), applied(2), 2),
            (1000, persist("k"), expiry(false, 1), 2),
            (1000, get("k"), found(entry("v", 1)), 2),
        ],
    );
    assert_eq!(shard.timer_count(), 0);
}

#[test]
fn expire_and_persist_on_expired_key_see_it_absent() {
    let mut shard = new_shard();
    run(
        &mut shard,
        &[
            (1000, put_ttl("a", "v", 100), applied(1), 1),
            (1000, put_ttl("b", "v", 100), applied(2), 2),
            // Each call reclaims the expired key (one mutation) and then finds nothing.
            (1100, expire("a", 100), expiry(false, 0), 3),
            (1100, persist("b"), expiry(false, 0), 4),
            (1100, get("a"), not_found(), 4),
            (1100, get("b"), not_found(), 4),
        ],
    );
    assert_eq!(shard.key_count(), 0);
    assert_eq!(shard.timer_count(), 0);
    assert_eq!(tick(&mut shard, 1100), 0);
}

#[test]
fn keep_ttl_keeps_the_deadline() {
    let mut shard = new_shard();
    let keep_ttl_but_new_ttl = Request::Put(Box::new(Put {
        ttl_ms: Some(50),
        keep_ttl: true,
        ..Put::new("k", "3")
    }));
    run(
        &mut shard,
        &[
            (1000, put_ttl("k", "1", 500), applied(1), 1),
            (1200, put_keep_ttl("k", "2"), applied(2), 2),
            (1200, get("k"), found(entry_until("2", 2, 1500)), 2),
            (1200, ttl("k"), expiring(300, 1500), 2),
            // An explicit TTL wins over keep_ttl.
            (1200, keep_ttl_but_new_ttl, applied(3), 3),
            (1200, ttl("k"), expiring(50, 1250), 3),
            // Nothing to keep: the key stays persistent, or is created persistent.
            (1200, put("p", "1"), applied(4), 4),
            (1200, put_keep_ttl("p", "2"), applied(5), 5),
            (1200, ttl("p"), persistent(), 5),
            (1200, put_keep_ttl("new", "1"), applied(6), 6),
            (1200, ttl("new"), persistent(), 6),
        ],
    );
    assert_eq!(shard.timer_count(), 1);
    assert_eq!(tick(&mut shard, 1249), 0);
    assert_eq!(tick(&mut shard, 1250), 1);
    assert_eq!(shard.revision(), 7);
    run(&mut shard, &[(1250, get("k"), not_found(), 7)]);
}

#[test]
fn keep_ttl_on_expired_key_writes_it_persistent() {
    let mut shard = new_shard();
    run(
        &mut shard,
        &[
            (1000, put_ttl("k", "1", 100), applied(1), 1),
            (1100, put_keep_ttl("k", "2"), applied(3), 3),
            (1100, get("k"), found(entry("2", 3)), 3),
        ],
    );
    assert_eq!(shard.timer_count(), 0);
}

#[test]
fn plain_put_clears_the_ttl_and_its_timer() {
    let mut shard = new_shard();
    run(&mut shard, &[(1000, put_ttl("k", "1", 100), applied(1), 1)]);
    assert_eq!(shard.timer_count(), 1);
    assert_eq!(shard.memory_bytes(), cost("k", "1", true));
    run(
        &mut shard,
        &[
            (1050, put("k", "2"), applied(2), 2),
            (1050, ttl("k"), persistent(), 2),
        ],
    );
    assert_eq!(shard.timer_count(), 0);
    assert_eq!(shard.memory_bytes(), cost("k", "2", false));
    assert_eq!(tick(&mut shard, 1200), 0);
    run(&mut shard, &[(1200, get("k"), found(entry("2", 2)), 2)]);
    assert_eq!(shard.key_count(), 1);
}

#[test]
fn new_ttl_replaces_the_timer() {
    let mut shard = new_shard();
    run(
        &mut shard,
        &[
            (1000, put_ttl("k", "1", 100), applied(1), 1),
            (1050, put_ttl("k", "2", 300), applied(2), 2),
            (1050, ttl("k"), expiring(300, 1350), 2),
        ],
    );
    assert_eq!(shard.timer_count(), 1);
    // The first deadline passes without effect: its timer was replaced, not left behind.
    assert_eq!(tick(&mut shard, 1100), 0);
    run(
        &mut shard,
        &[(1100, get("k"), found(entry_until("2", 2, 1350)), 2)],
    );
    assert_eq!(tick(&mut shard, 1349), 0);
    run(&mut shard, &[(1350, get("k"), not_found(), 2)]);
    assert_eq!(tick(&mut shard, 1350), 1);
    assert_eq!(shard.revision(), 3);
    assert_eq!(shard.timer_count(), 0);
    assert_eq!(shard.key_count(), 0);
}

/// Observed accounting: a write that finds an expired key its timer has not reclaimed yet
/// first reclaims it, which counts as its own mutation (`expired_count` +1, revision +1), and
/// then writes at the next revision. A delete or batch delete of such a key reports nothing
/// deleted, yet the revision moves by one for the reclaim.
#[test]
fn write_to_expired_key_reclaims_it_first() {
    let mut shard = new_shard();
    run(
        &mut shard,
        &[
            (1000, put_ttl("a", "old", 100), applied(1), 1),
            (1000, put_ttl("b", "old", 100), applied(2), 2),
            (1000, put_ttl("c", "old", 100), applied(3), 3),
            (1000, put_ttl("d", "old", 100), applied(4), 4),
            (1100, put("a", "new"), applied(6), 6),
            (1100, get("a"), found(entry("new", 6)), 6),
            (1100, delete("b"), deleted(false), 7),
            (
                1100,
                multi_delete(&["c", "missing"]),
                multi_deleted(&[false, false]),
                8,
            ),
            (
                1100,
                multi_put(&[("d", "new", None)]),
                multi_put_versions(&[10]),
                10,
            ),
        ],
    );
    assert_eq!(shard.stats().expired_count, 4);
    assert_eq!(shard.key_count(), 2);
    assert_eq!(shard.timer_count(), 0);
    assert_eq!(tick(&mut shard, 1100), 0, "nothing is left for the timers");
    assert_eq!(shard.revision(), 10);
}

/// A key that expires costs one revision whichever path reclaims it, so two shards fed the same
/// requests agree on the revision whether or not a tick ran in between.
#[test]
fn reclaim_counts_once_whether_lazy_or_by_tick() {
    let requests = [
        (1000, put_ttl("a", "1", 100)),
        (1000, put_ttl("b", "1", 100)),
        (1000, put_ttl("c", "1", 100)),
        (1100, put("a", "2")),
        (1100, delete("b")),
        (1100, put_if("c", "2", IfPresent)),
        (1100, put("d", "1")),
    ];
    let mut lazy = new_shard();
    let mut ticked = new_shard();
    for (index, (now_ms, request)) in requests.iter().enumerate() {
        if index == 3 {
            assert_eq!(tick(&mut ticked, 1100), 3);
        }
        let lazy_response = apply(&mut lazy, *now_ms, request);
        let ticked_response = apply(&mut ticked, *now_ms, request);
        if index < 3 {
            assert_eq!(lazy_response, ticked_response, "{request:?}");
        }
    }
    assert_eq!(lazy.revision(), 8);
    assert_eq!(ticked.revision(), 8);
    assert_eq!(lazy.stats().expired_count, 3);
    assert_eq!(ticked.stats().expired_count, 3);
    assert_eq!(lazy.key_count(), ticked.key_count());
    assert_eq!(lazy.memory_bytes(), ticked.memory_bytes());
    assert_eq!(tick(&mut lazy, 1100), 0);
}

/// The wall clock may step backwards (`clock.rs` accepts that it then lengthens TTLs), and the
/// shard may be created at a later time than the first request it is given. Either way a key
/// written at 1000 with a TTL of 100 lives until 1100: a tick at 1001 must leave it alone, as
/// reads at 1001 still return it.
#[test]
fn tick_after_the_clock_stepped_back_reclaims_only_expired_keys() {
    let mut ticked_later = new_shard();
    assert_eq!(tick(&mut ticked_later, 2000), 0);
    let created_later = Shard::new(config(MEMORY_BYTES_UNLIMITED, EXPIRED_PER_TICK_MAX), 2000);
    for (name, mut shard) in [
        ("ticked at 2000", ticked_later),
        ("created at 2000", created_later),
    ] {
        run(&mut shard, &[(1000, put_ttl("k", "v", 100), applied(1), 1)]);
        assert_eq!(tick(&mut shard, 1001), 0, "{name}: k lives until 1100");
        run(
            &mut shard,
            &[(1001, get("k"), found(entry_until("v", 1, 1100)), 1)],
        );
        assert_eq!(tick(&mut shard, 1100), 1, "{name}");
        assert_eq!(shard.revision(), 2, "{name}");
    }
}

#[test]
fn tick_reclaims_at_most_expired_per_tick_max() {
    const EXPIRING_COUNT: usize = 50;
    const LATER_COUNT: usize = 5;
    let mut shard = Shard::new(config(MEMORY_BYTES_UNLIMITED, 10), START_MS);
    let expiring_keys: Vec<String> = (0..EXPIRING_COUNT).map(|i| format!("key{i}")).collect();
    let expiring_keys: Vec<&str> = expiring_keys.iter().map(String::as_str).collect();
    for key in &expiring_keys {
        assert!(matches!(
            apply(&mut shard, 1000, &put_ttl(key, "v", 100)),
            Response::Put { applied: true, .. }
        ));
    }
    for index in 0..LATER_COUNT {
        let later = put_ttl(&format!("later{index}"), "v", 101);
        assert!(matches!(
            apply(&mut shard, 1000, &later),
            Response::Put { applied: true, .. }
        ));
    }
    let written_revision = shard.revision();
    assert_eq!(written_revision, (EXPIRING_COUNT + LATER_COUNT) as u64);
    let all_gone = values(vec![None; EXPIRING_COUNT]);
    for round in 1..=5 {
        assert_eq!(tick(&mut shard, 1100), 10, "round {round}");
        assert_eq!(shard.key_count(), EXPIRING_COUNT + LATER_COUNT - 10 * round);
        assert_eq!(shard.timer_count(), shard.key_count());
        assert_eq!(shard.revision(), written_revision + 10 * round as u64);
        // The keys a tick has not reached yet are just as invisible as the reclaimed ones.
        assert_eq!(
            apply(&mut shard, 1100, &multi_get(&expiring_keys)),
            all_gone
        );
        for key in &expiring_keys {
            assert_eq!(
                apply(&mut shard, 1100, &exists(key)),
                is_present(false),
                "{key}"
            );
        }
    }
    assert_eq!(tick(&mut shard, 1100), 0);
    assert_eq!(shard.key_count(), LATER_COUNT);
    let revision = written_revision + EXPIRING_COUNT as u64;
    run(
        &mut shard,
        &[(1100, exists("later0"), is_present(true), revision)],
    );
    assert_eq!(tick(&mut shard, 1101), LATER_COUNT);
    assert_eq!(shard.key_count(), 0);
    assert_eq!(shard.timer_count(), 0);
    assert_eq!(shard.revision(), revision + LATER_COUNT as u64);
    assert_eq!(
        shard.stats().expired_count,
        (EXPIRING_COUNT + LATER_COUNT) as u64
    );
}

#[test]
fn multi_get_answers_in_request_order() {
    let mut shard = new_shard();
    run(
        &mut shard,
        &[
            (1000, put("a", "1"), applied(1), 1),
            (1000, put("b", "2"), applied(2), 2),
            (1000, put_ttl("t", "3", 100), applied(3), 3),
            (
                1000,
                multi_get(&["b", "missing", "a", "t", "b"]),
                values(vec![
                    Some(entry("2", 2)),
                    None,
                    Some(entry("1", 1)),
                    Some(entry_until("3", 3, 1100)),
                    Some(entry("2", 2)),
                ]),
                3,
            ),
            (
                1100,
                multi_get(&["t", "a"]),
                values(vec![None, Some(entry("1", 1))]),
                3,
            ),
        ],
    );
}

#[test]
fn multi_put_applies_every_entry_at_one_revision() {
    let mut shard = new_shard();
    run(
        &mut shard,
        &[
            (1000, put("x", "0"), applied(1), 1),
            (
                1000,
                multi_put(&[("a", "1", None), ("b", "2", Some(100)), ("x", "3", None)]),
                multi_put_versions(&[2, 2, 2]),
                2,
            ),
            (
                1000,
                multi_get(&["x", "b", "a"]),
                values(vec![
                    Some(entry("3", 2)),
                    Some(entry_until("2", 2, 1100)),
                    Some(entry("1", 2)),
                ]),
                2,
            ),
        ],
    );
    assert_eq!(shard.key_count(), 3);
    assert_eq!(shard.timer_count(), 1);
    assert_eq!(tick(&mut shard, 1100), 1);
    assert_eq!(shard.revision(), 3);
}

#[test]
fn multi_put_with_duplicate_keys_keeps_the_last() {
    let mut shard = new_shard();
    run(
        &mut shard,
        &[
            (
                1000,
                multi_put(&[("a", "1", Some(100)), ("b", "x", None), ("a", "2", None)]),
                multi_put_versions(&[1, 1, 1]),
                1,
            ),
            (1000, get("a"), found(entry("2", 1)), 1),
            (1000, get("b"), found(entry("x", 1)), 1),
        ],
    );
    assert_eq!(shard.key_count(), 2);
    assert_eq!(
        shard.timer_count(),
        0,
        "the first write's timer went with it"
    );
    assert_eq!(
        shard.memory_bytes(),
        cost("a", "2", false) + cost("b", "x", false)
    );
    run(
        &mut shard,
        &[
            (
                1000,
                multi_put(&[("c", "1", None), ("c", "22", Some(100))]),
                multi_put_versions(&[2, 2]),
                2,
            ),
            (1000, get("c"), found(entry_until("22", 2, 1100)), 2),
        ],
    );
    assert_eq!(shard.timer_count(), 1);
    assert_eq!(tick(&mut shard, 1100), 1);
    assert_eq!(shard.revision(), 3);
}

#[test]
fn multi_delete_is_one_revision_if_anything_was_deleted() {
    let mut shard = new_shard();
    run(
        &mut shard,
        &[
            (1000, put("a", "1"), applied(1), 1),
            (1000, put("b", "1"), applied(2), 2),
            (1000, put_ttl("c", "1", 100), applied(3), 3),
            (
                1000,
                multi_delete(&["a", "missing", "c", "a"]),
                multi_deleted(&[true, false, true, false]),
                4,
            ),
            (
                1000,
                multi_delete(&["a", "missing"]),
                multi_deleted(&[false, false]),
                4,
            ),
            (
                1000,
                multi_get(&["a", "b", "c"]),
                values(vec![None, Some(entry("1", 2)), None]),
                4,
            ),
        ],
    );
    assert_eq!(shard.key_count(), 1);
    assert_eq!(shard.timer_count(), 0);
    assert_eq!(shard.memory_bytes(), cost("b", "1", false));
}

#[test]
fn empty_batches_change_nothing() {
    let mut shard = new_shard();
    let steps = |revision| -> Vec<Step> {
        vec![
            (1000, multi_get(&[]), values(vec![]), revision),
            (1000, multi_put(&[]), multi_put_versions(&[]), revision),
            (1000, multi_delete(&[]), multi_deleted(&[]), revision),
        ]
    };
    run(&mut shard, &steps(0));
    run(&mut shard, &[(1000, put("a", "1"), applied(1), 1)]);
    run(&mut shard, &steps(1));
    assert_eq!(shard.key_count(), 1);
}

/// A shard with room for exactly three `kN` keys holding four-byte values and no TTL.
fn full_shard_budget() -> u64 {
    3 * cost("k1", "vvvv", false)
}

#[test]
fn store_full_refuses_growth_and_changes_nothing() {
    let memory_bytes_max = full_shard_budget();
    let mut shard = Shard::new(config(memory_bytes_max, EXPIRED_PER_TICK_MAX), START_MS);
    run(
        &mut shard,
        &[
            (1000, put("k1", "vvvv"), applied(1), 1),
            (1000, put("k2", "vvvv"), applied(2), 2),
            (1000, put("k3", "vvvv"), applied(3), 3),
        ],
    );
    assert_eq!(
        shard.memory_bytes(),
        memory_bytes_max,
        "a write that fits exactly applies"
    );
    run(
        &mut shard,
        &[
            (1000, put("k4", "vvvv"), store_full(), 3),
            (1000, put("k4", ""), store_full(), 3),
            (1000, put("k1", "vvvvv"), store_full(), 3),
            (1000, put_ttl("k1", "vvvv", 100), store_full(), 3),
            (1000, expire("k2", 100), store_full(), 3),
            (1000, multi_put(&[("k4", "v", None)]), store_full(), 3),
            // A refused condition is reported as such, before the budget is considered.
            (1000, put_if("k4", "vvvv", IfPresent), not_applied(0), 3),
            // Reads still work, and the refused writes left no trace.
            (1000, get("k4"), not_found(), 3),
            (1000, exists("k4"), is_present(false), 3),
            (
                1000,
                multi_get(&["k1", "k2"]),
                values(vec![Some(entry("vvvv", 1)), Some(entry("vvvv", 2))]),
                3,
            ),
            (1000, ttl("k2"), persistent(), 3),
        ],
    );
    assert_eq!(shard.key_count(), 3);
    assert_eq!(shard.timer_count(), 0);
    assert_eq!(shard.memory_bytes(), memory_bytes_max);
    assert_eq!(shard.stats().refused_full_count, 6);
}

#[test]
fn store_full_still_takes_writes_that_do_not_grow() {
    let memory_bytes_max = full_shard_budget();
    let mut shard = Shard::new(config(memory_bytes_max, EXPIRED_PER_TICK_MAX), START_MS);
    run(
        &mut shard,
        &[
            (1000, put("k1", "vvvv"), applied(1), 1),
            (1000, put("k2", "vvvv"), applied(2), 2),
            (1000, put("k3", "vvvv"), applied(3), 3),
            (1000, put("k1", "wwww"), applied(4), 4),
            (1000, put("k1", "v"), applied(5), 5),
        ],
    );
    assert_eq!(shard.memory_bytes(), memory_bytes_max - 3);
    run(
        &mut shard,
        &[
            // Three bytes free are not enough for a new key ...
            (1000, put("k4", "vvvv"), store_full(), 5),
            // ... but exactly enough to grow k1 back, in a single put or a batch.
            (
                1000,
                multi_put(&[("k1", "vvvv", None)]),
                multi_put_versions(&[6]),
                6,
            ),
            (1000, put("k2", "vvv"), applied(7), 7),
            (1000, put("k2", "vvvv"), applied(8), 8),
            // Leave room for one TTL entry and less than a new key after it.
            (
                1000,
                multi_delete(&["k2", "k3"]),
                multi_deleted(&[true, true]),
                9,
            ),
            (1000, put_ttl("k3", "", 100), applied(10), 10),
            (1000, put("k2", ""), store_full(), 10),
            // Persist shrinks an entry, so it applies even when no new key fits.
            (1000, persist("k3"), expiry(true, 11), 11),
            (1000, ttl("k3"), persistent(), 11),
        ],
    );
    assert_eq!(
        shard.memory_bytes(),
        cost("k1", "vvvv", false) + cost("k3", "", false)
    );
}

#[test]
fn deleting_and_expiring_free_room() {
    let memory_bytes_max = full_shard_budget();
    let mut shard = Shard::new(config(memory_bytes_max, EXPIRED_PER_TICK_MAX), START_MS);
    run(
        &mut shard,
        &[
            (1000, put("k1", "vvvv"), applied(1), 1),
            (1000, put("k2", "vvvv"), applied(2), 2),
            (1000, put("k3", "vvvv"), applied(3), 3),
            (1000, put("k4", "vvvv"), store_full(), 3),
            (1000, delete("k2"), deleted(true), 4),
            (1000, put("k4", "vvvv"), applied(5), 5),
            (1000, put("k5", "vvvv"), store_full(), 5),
            (
                1000,
                multi_delete(&["k1", "k3"]),
                multi_deleted(&[true, true]),
                6,
            ),
            (1000, put_ttl("k5", "v", 100), applied(7), 7),
            (1000, put("k6", "vvvv"), store_full(), 7),
            // k5 has expired, but a write reclaims only its own key: until a tick runs, the
            // invisible k5 still holds its bytes.
            (1100, get("k5"), not_found(), 7),
            (1100, put("k6", "vvvv"), store_full(), 7),
        ],
    );
    assert_eq!(tick(&mut shard, 1100), 1);
    run(&mut shard, &[(1100, put("k6", "vvvv"), applied(9), 9)]);
    assert_eq!(shard.key_count(), 2);
    assert_eq!(shard.timer_count(), 0);
    assert_eq!(shard.memory_bytes(), 2 * cost("k4", "vvvv", false));
}

#[test]
fn multi_put_that_does_not_fit_applies_nothing() {
    let memory_bytes_max = full_shard_budget();
    let mut shard = Shard::new(config(memory_bytes_max, EXPIRED_PER_TICK_MAX), START_MS);
    run(
        &mut shard,
        &[
            (1000, put("k1", "vvvv"), applied(1), 1),
            (
                1000,
                multi_put(&[
                    ("k1", "", None),
                    ("k2", "vvvv", None),
                    ("k3", "vvvv", None),
                    ("k4", "vvvv", None),
                ]),
                store_full(),
                1,
            ),
            (
                1000,
                multi_get(&["k1", "k2", "k3", "k4"]),
                values(vec![Some(entry("vvvv", 1)), None, None, None]),
                1,
            ),
            // The same batch without k4 fits: k1's shrink is counted against the others.
            (
                1000,
                multi_put(&[("k1", "", None), ("k2", "vvvv", None), ("k3", "vvvv", None)]),
                multi_put_versions(&[2, 2, 2]),
                2,
            ),
        ],
    );
    assert_eq!(shard.key_count(), 3);
    assert_eq!(shard.memory_bytes(), memory_bytes_max - 4);
    // A key repeated in a batch is charged once, for its last value.
    run(
        &mut shard,
        &[(
            1000,
            multi_put(&[("k1", "vvvvvvvvvvvvvvvv", None), ("k1", "vvvv", None)]),
            multi_put_versions(&[3, 3]),
            3,
        )],
    );
    assert_eq!(shard.memory_bytes(), memory_bytes_max);
}

#[test]
fn store_full_message_carries_the_numbers() {
    let memory_bytes_max = cost("k1", "vvvv", false);
    let mut shard = Shard::new(config(memory_bytes_max, EXPIRED_PER_TICK_MAX), START_MS);
    run(&mut shard, &[(1000, put("k1", "vvvv"), applied(1), 1)]);
    let Response::Error(reply) = apply(&mut shard, 1000, &put("k2", "v")) else {
        panic!("expected a store-full error");
    };
    assert_eq!(reply.code, ErrorCode::StoreFull);
    let needed = cost("k2", "v", false).to_string();
    assert!(
        reply.message.contains(&memory_bytes_max.to_string()),
        "{}",
        reply.message
    );
    assert!(reply.message.contains(&needed), "{}", reply.message);
}

#[test]
fn stats_count_requests_expiries_and_refusals() {
    let mut shard = Shard::new(config(cost("k", "v", true), EXPIRED_PER_TICK_MAX), START_MS);
    run(
        &mut shard,
        &[
            (1000, put_ttl("k", "v", 100), applied(1), 1),
            (1000, put("other", "v"), store_full(), 1),
            (1000, get("k"), found(entry_until("v", 1, 1100)), 1),
        ],
    );
    assert_eq!(tick(&mut shard, 1100), 1);
    let mut expiry_lag_ms = crate::shard::ExpiryLagHistogram::default();
    expiry_lag_ms.record(0);
    assert_eq!(
        shard.stats(),
        ShardStats {
            request_count: 3,
            expired_count: 1,
            refused_full_count: 1,
            expiry_lag_ms,
        }
    );
}

/// The wheel reports how late it reclaimed each key: a tick that comes 250 ms after a key's
/// deadline, or one held back by `expired_per_tick_max`, shows up as lag.
#[test]
fn tick_records_how_far_past_its_deadline_each_key_was_reclaimed() {
    let mut shard = Shard::new(config(1 << 20, 1), START_MS);
    run(
        &mut shard,
        &[
            (1000, put_ttl("a", "v", 100), applied(1), 1),
            (1000, put_ttl("b", "v", 100), applied(2), 2),
        ],
    );
    // Deadline 1100; one key per tick.
    assert_eq!(tick(&mut shard, 1350), 1);
    assert_eq!(tick(&mut shard, 1400), 1);
    let lag = shard.stats().expiry_lag_ms;
    assert_eq!(lag.count(), 2);
    assert_eq!(lag.sum(), 250 + 300);
    // 250 ms falls in the bucket up to 256 ms, 300 ms in the one up to 512 ms.
    assert_eq!(lag.buckets()[8], 1);
    assert_eq!(lag.buckets()[9], 1);
    assert_eq!(lag.buckets().iter().sum::<u64>(), 2);
}

/// `mod.rs` promises that a key outside the shard's slots is caught in debug builds, so a
/// routing mistake cannot silently write a key on the wrong core. Every request that carries a
/// key has to check it, whichever path through the shard it takes.
#[cfg(debug_assertions)]
#[test]
fn every_keyed_request_checks_ownership_in_debug_builds() {
    let slots = SlotRange { start: 0, end: 1 };
    let foreign = (0_u32..1_000)
        .map(|index| format!("foreign{index}"))
        .find(|key| !slots.contains(tessera_protocol::slot_for_key(key.as_bytes())))
        .expect("some key hashes outside slot 0");
    let key = foreign.as_str();
    let requests = [
        get(key),
        exists(key),
        ttl(key),
        multi_get(&[key]),
        put(key, "v"),
        delete(key),
        expire(key, 100),
        persist(key),
        multi_put(&[(key, "v", None)]),
        multi_delete(&[key]),
        lock_request(key, home_lease(1), 0),
        unlock_request(key, 1),
    ];
    let unchecked: Vec<&Request> = requests
        .iter()
        .filter(|request| {
            let mut shard = Shard::new(
                ShardConfig {
                    slots,
                    ..config(MEMORY_BYTES_UNLIMITED, EXPIRED_PER_TICK_MAX)
                },
                START_MS,
            );
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                apply(&mut shard, 1000, request)
            }));
            outcome.is_ok()
        })
        .collect();
    assert!(
        unchecked.is_empty(),
        "a key of slot {} reached a shard owning {slots} unchecked by: {unchecked:?}",
        tessera_protocol::slot_for_key(key.as_bytes())
    );
}

// The model and the property test.

/// Keys `key0` to `key7`: few enough that operations keep colliding.
const MODEL_KEY_COUNT: usize = 8;

fn model_key(index: usize) -> Vec<u8> {
    format!("key{index}").into_bytes()
}

/// Locks `lock0` to `lock2`: one more than the table holds, so `locks_max` is reached. Lock
/// names are not keys: the store never holds one.
const MODEL_LOCK_COUNT: usize = 3;

fn model_lock_name(index: usize) -> Vec<u8> {
    format!("lock{index}").into_bytes()
}

/// What a client can observe about one lock: its holder (lease and token), and the last
/// token granted, which fenced compares read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct ModelLock {
    holder: Option<(u64, u64)>,
    last_token: u64,
}

/// What a client can observe about one key.
#[derive(Debug, Clone)]
struct ModelEntry {
    value: Vec<u8>,
    create_revision: u64,
    mod_revision: u64,
    version: u64,
    deadline_ms: Option<u64>,
}

impl ModelEntry {
    /// `value` written at `revision` over `before` (the key's entry, if it exists).
    fn written(
        before: Option<&ModelEntry>,
        value: Vec<u8>,
        revision: u64,
        deadline_ms: Option<u64>,
    ) -> Self {
        Self {
            value,
            create_revision: before.map_or(revision, |entry| entry.create_revision),
            mod_revision: revision,
            version: before.map_or(1, |entry| entry.version + 1),
            deadline_ms,
        }
    }

    fn is_expired(&self, now_ms: u64) -> bool {
        self.deadline_ms
            .is_some_and(|deadline_ms| deadline_ms <= now_ms)
    }

    fn to_entry(&self) -> Entry {
        Entry {
            value: self.value.clone(),
            create_revision: self.create_revision,
            mod_revision: self.mod_revision,
            version: self.version,
            expires_at_ms: self.deadline_ms,
            fields: Vec::new(),
        }
    }
}

/// The shard's documented behaviour written as plainly as possible. Expired entries stay in
/// the map until a write or a tick reclaims them, as in the shard, because a reclaim is a
/// mutation and the revision must be predicted exactly. A write is refused if and only if it
/// would leave more bytes charged than the budget and more than before.
///
/// Leases run on the same clock as the keys here (the test sets the shard's monotonic clock to
/// `now_ms` before every step). A lease stays in `leases` until a tick or a revoke ends it, as
/// in the shard: one past its deadline no longer lives, but is still listed and still counts
/// against `leases_max` until the next tick.
///
/// Locks are asked for with a wait of 0 only, through `Shard::lock` as the core sends them
/// (a wait is answered by the core, which this test is not). A lock held by a lease past its
/// deadline stays held until the tick that ends the lease releases it.
#[derive(Debug)]
struct Model {
    entries: BTreeMap<Vec<u8>, ModelEntry>,
    revision: u64,
    memory_bytes_max: u64,
    stats: ShardStats,
    /// Leases homed on the shard: id to (TTL, deadline).
    leases: BTreeMap<u64, (u64, u64)>,
    /// The last lease sequence granted.
    last_sequence: u64,
    /// Key to its lease.
    attached: BTreeMap<Vec<u8>, u64>,
    /// Leases ended since the test last took them, with whether they expired.
    ended_leases: Vec<(u64, bool)>,
    /// Keys deleted in this step because their lease ended: lease, and whether it expired.
    lease_removals: BTreeMap<Vec<u8>, (u64, bool)>,
    /// Every lock ever granted (a released one keeps its last token, and its room).
    locks: BTreeMap<Vec<u8>, ModelLock>,
}

/// Small, so that the property test reaches both bounds.
const MODEL_LEASE_LIMITS: LeaseLimits = LeaseLimits {
    leases_max: 3,
    attached_keys_max: 3,
};

/// Fewer locks than names, so the bound is reached. Nothing waits in the model test (a wait
/// is the core's to answer), so `waiters_max` is never reached here.
const MODEL_LOCK_LIMITS: LockLimits = LockLimits {
    locks_max: MODEL_LOCK_COUNT - 1,
    waiters_max: 1,
};

fn model_config(memory_bytes_max: u64) -> ShardConfig {
    ShardConfig {
        lease_limits: MODEL_LEASE_LIMITS,
        lock_limits: MODEL_LOCK_LIMITS,
        ..config(memory_bytes_max, MODEL_KEY_COUNT)
    }
}

impl Model {
    fn new(memory_bytes_max: u64) -> Self {
        Self {
            entries: BTreeMap::new(),
            revision: 0,
            memory_bytes_max,
            stats: ShardStats::default(),
            leases: BTreeMap::new(),
            last_sequence: 0,
            attached: BTreeMap::new(),
            ended_leases: Vec::new(),
            lease_removals: BTreeMap::new(),
            locks: BTreeMap::new(),
        }
    }

    fn lease_lives(&self, now_ms: u64, id: u64) -> bool {
        self.leases
            .get(&id)
            .is_some_and(|&(_, deadline_ms)| deadline_ms > now_ms)
    }

    /// Why a put may not attach `key` to `lease`, if it may not. The shard only learns that a
    /// lease of another core lives by asking its home, which this test never does.
    fn lease_refusal(&self, now_ms: u64, key: &[u8], lease: u64) -> Option<ErrorCode> {
        if let Some(code) = self.dead_lease_refusal(now_ms, lease) {
            return Some(code);
        }
        let is_full = self.attached.len() >= MODEL_LEASE_LIMITS.attached_keys_max;
        (is_full && !self.attached.contains_key(key)).then_some(ErrorCode::TableFull)
    }

    /// Why a lease may not be used (for a key or a lock), if it may not: it is another
    /// node's, or it does not live (as far as this shard knows).
    fn dead_lease_refusal(&self, now_ms: u64, lease: u64) -> Option<ErrorCode> {
        let id = LeaseId(lease);
        if id.node_id() != NODE_ID {
            return Some(ErrorCode::InvalidArgument);
        }
        if id.core_id() != SHARD_ID || !self.lease_lives(now_ms, lease) {
            return Some(ErrorCode::LeaseNotFound);
        }
        None
    }

    /// A lock with a wait of 0: granted at a new revision (its token) if free and the table
    /// has room, the holder's token again for the holder, else refused with the holder's.
    fn lock(&mut self, now_ms: u64, name: &[u8], lease: u64) -> Response {
        if let Some(code) = self.dead_lease_refusal(now_ms, lease) {
            return error_reply(code);
        }
        let known = self.locks.get(name).copied();
        if let Some((holder, token)) = known.and_then(|lock| lock.holder) {
            return locked(holder == lease, token);
        }
        if known.is_none() && self.locks.len() >= MODEL_LOCK_LIMITS.locks_max {
            return error_reply(ErrorCode::TableFull);
        }
        self.revision += 1;
        let token = self.revision;
        self.locks.insert(
            name.to_vec(),
            ModelLock {
                holder: Some((lease, token)),
                last_token: token,
            },
        );
        locked(true, token)
    }

    /// An unlock: a release at a new revision if `token` is the holder's, else nothing.
    fn unlock(&mut self, name: &[u8], token: u64) -> Response {
        let Some(lock) = self
            .locks
            .get_mut(name)
            .filter(|lock| lock.holder.is_some_and(|(_, held)| held == token))
        else {
            return unlocked(false);
        };
        lock.holder = None;
        self.revision += 1;
        unlocked(true)
    }

    /// A lease homed here ends: its keys go at one revision (even if it has none), then each
    /// lock it holds is released at a revision of its own.
    fn end_lease(&mut self, lease: u64, expired: bool) {
        self.leases.remove(&lease);
        let keys: Vec<Vec<u8>> = self
            .attached
            .iter()
            .filter(|&(_, &attached_to)| attached_to == lease)
            .map(|(key, _)| key.clone())
            .collect();
        for key in keys {
            self.attached.remove(&key);
            self.entries.remove(&key);
            self.lease_removals.insert(key, (lease, expired));
        }
        self.revision += 1;
        self.ended_leases.push((lease, expired));
        for lock in self.locks.values_mut() {
            if lock.holder.is_some_and(|(holder, _)| holder == lease) {
                lock.holder = None;
                self.revision += 1;
            }
        }
    }

    fn lease_state(&self, now_ms: u64, lease: u64) -> LeaseState {
        let id = LeaseId(lease);
        let is_home = id.node_id() == NODE_ID && id.core_id() == SHARD_ID;
        let live = self
            .leases
            .get(&lease)
            .filter(|&&(_, deadline_ms)| is_home && deadline_ms > now_ms);
        LeaseState {
            is_home,
            ttl_ms: live.map(|&(ttl_ms, _)| ttl_ms),
            remaining_ms: live.map(|&(_, deadline_ms)| deadline_ms - now_ms),
            keys: self
                .attached
                .iter()
                .filter(|&(_, &attached_to)| attached_to == lease)
                .map(|(key, _)| key.clone())
                .collect(),
            more: false,
        }
    }

    fn lease_request(&mut self, now_ms: u64, request: &Request) -> Response {
        match request {
            Request::LeaseGrant { ttl_ms } => {
                if self.leases.len() >= MODEL_LEASE_LIMITS.leases_max {
                    return error_reply(ErrorCode::TableFull);
                }
                self.last_sequence += 1;
                let id = home_lease(self.last_sequence);
                self.leases.insert(id, (*ttl_ms, now_ms + ttl_ms));
                self.revision += 1;
                granted(id, *ttl_ms)
            }
            Request::LeaseKeepalive { ids } => Response::LeaseKeepalive {
                ttls_ms: ids
                    .iter()
                    .map(|id| {
                        let lives = self.lease_lives(now_ms, *id);
                        let (ttl_ms, deadline_ms) = self.leases.get_mut(id).filter(|_| lives)?;
                        *deadline_ms = now_ms + *ttl_ms;
                        Some(*ttl_ms)
                    })
                    .collect(),
            },
            Request::LeaseRevoke { id } => {
                let existed = self.lease_lives(now_ms, *id);
                if existed {
                    self.end_lease(*id, false);
                }
                revoked(existed)
            }
            Request::LeaseTimeToLive { id } => {
                Response::LeaseTimeToLive(self.lease_state(now_ms, *id))
            }
            Request::LeaseList => {
                // Only live leases: one past its deadline is gone before a tick ends it.
                let live: Vec<u64> = self
                    .leases
                    .keys()
                    .copied()
                    .filter(|id| self.lease_lives(now_ms, *id))
                    .collect();
                lease_list(&live)
            }
            _ => unreachable!("not a lease request: {request:?}"),
        }
    }

    fn memory_bytes_of(entries: &BTreeMap<Vec<u8>, ModelEntry>) -> u64 {
        entries
            .iter()
            .map(|(key, entry)| {
                entry_cost(key.len(), entry.value.len(), entry.deadline_ms.is_some())
            })
            .sum()
    }

    fn memory_bytes(&self) -> u64 {
        Self::memory_bytes_of(&self.entries)
    }

    fn timer_count(&self) -> usize {
        self.entries
            .values()
            .filter(|entry| entry.deadline_ms.is_some())
            .count()
    }

    fn live(&self, now_ms: u64, key: &[u8]) -> Option<&ModelEntry> {
        self.entries
            .get(key)
            .filter(|entry| !entry.is_expired(now_ms))
    }

    fn reclaim_if_expired(&mut self, now_ms: u64, key: &[u8]) {
        if self
            .entries
            .get(key)
            .is_some_and(|entry| entry.is_expired(now_ms))
        {
            self.entries.remove(key);
            self.attached.remove(key);
            self.revision += 1;
            self.stats.expired_count += 1;
        }
    }

    /// Makes `after` the new state unless the budget refuses it.
    fn commit(&mut self, after: BTreeMap<Vec<u8>, ModelEntry>) -> bool {
        let before_bytes = self.memory_bytes();
        let after_bytes = Self::memory_bytes_of(&after);
        if after_bytes > before_bytes && after_bytes > self.memory_bytes_max {
            self.stats.refused_full_count += 1;
            return false;
        }
        self.entries = after;
        true
    }

    fn apply(&mut self, now_ms: u64, request: &Request) -> Response {
        self.stats.request_count += 1;
        match request {
            Request::Hello { .. }
            | Request::Stats
            | Request::Watch(_)
            | Request::Unwatch { .. }
            | Request::WatchProgress { .. }
            | Request::CreateIndex(_)
            | Request::DropIndex { .. }
            | Request::ListIndexes
            | Request::Query(_) => unreachable!("not generated: {request:?}"),
            Request::Ping => Response::Pong {
                node_id: NODE_ID,
                core_id: SHARD_ID,
            },
            Request::Get { key } => {
                Response::Value(self.live(now_ms, key).map(ModelEntry::to_entry))
            }
            Request::Exists { key } => Response::Exists {
                exists: self.live(now_ms, key).is_some(),
            },
            Request::Ttl { key } => Response::Ttl(match self.live(now_ms, key) {
                None => TtlState::Missing,
                Some(ModelEntry {
                    deadline_ms: None, ..
                }) => TtlState::Persistent,
                Some(ModelEntry {
                    deadline_ms: Some(deadline_ms),
                    ..
                }) => TtlState::Expiring {
                    remaining_ms: deadline_ms - now_ms,
                    expires_at_ms: *deadline_ms,
                },
            }),
            Request::Put(put) => self.put(now_ms, put),
            Request::Delete(delete) => self.delete(now_ms, delete),
            Request::Expire { key, ttl_ms } => {
                self.set_deadline(now_ms, key, Some(now_ms + ttl_ms))
            }
            Request::Persist { key } => self.set_deadline(now_ms, key, None),
            Request::MultiGet { keys } => Response::Values(
                keys.iter()
                    .map(|key| self.live(now_ms, key).map(ModelEntry::to_entry))
                    .collect(),
            ),
            Request::MultiPut { entries } => self.multi_put(now_ms, entries),
            Request::MultiDelete { keys } => {
                let deleted: Vec<bool> = keys
                    .iter()
                    .map(|key| {
                        self.reclaim_if_expired(now_ms, key);
                        self.attached.remove(key);
                        self.entries.remove(key).is_some()
                    })
                    .collect();
                if deleted.contains(&true) {
                    self.revision += 1;
                }
                Response::MultiDelete { deleted }
            }
            Request::Add(add) => self.add(now_ms, add),
            Request::Scan(scan) => Response::Scan(self.scan(now_ms, scan)),
            Request::Txn(txn) => {
                let response = self.txn(now_ms, txn);
                if let Response::Txn(outcome) = &response {
                    // A transaction's put leaves its key attached to no lease, and a key it
                    // deleted is attached to none.
                    let ops = if outcome.succeeded {
                        &txn.success
                    } else {
                        &txn.failure
                    };
                    for op in ops {
                        if let TxnOp::Put { key, .. } = op {
                            self.attached.remove(key);
                        }
                    }
                    let entries = &self.entries;
                    self.attached.retain(|key, _| entries.contains_key(key));
                }
                response
            }
            Request::LeaseGrant { .. }
            | Request::LeaseKeepalive { .. }
            | Request::LeaseRevoke { .. }
            | Request::LeaseTimeToLive { .. }
            | Request::LeaseList => self.lease_request(now_ms, request),
            Request::Lock {
                name,
                lease,
                wait_ms,
            } => {
                assert_eq!(*wait_ms, 0, "a wait is answered by the core, not modelled");
                self.lock(now_ms, name, *lease)
            }
            Request::Unlock { name, token } => self.unlock(name, *token),
        }
    }

    fn delete(&mut self, now_ms: u64, delete: &Delete) -> Response {
        self.reclaim_if_expired(now_ms, &delete.key);
        let Some(current) = self.entries.get(&delete.key) else {
            return deleted(false);
        };
        let condition_holds = match &delete.condition {
            DeleteCondition::Always => true,
            DeleteCondition::IfVersion(version) => current.version == *version,
            DeleteCondition::IfValue(value) => current.value == *value,
        };
        let previous = delete.return_previous.then(|| current.to_entry());
        if !condition_holds {
            return Response::Delete {
                deleted: false,
                version: current.version,
                previous,
            };
        }
        self.entries.remove(&delete.key);
        self.attached.remove(&delete.key);
        self.revision += 1;
        Response::Delete {
            deleted: true,
            version: 0,
            previous,
        }
    }

    /// The live keys of the range in order; no page in the model is long enough in bytes to
    /// end early.
    fn scan(&self, now_ms: u64, scan: &Scan) -> ScanPage {
        let live = Self::live_range(&self.entries, now_ms, scan);
        let mut page = model_page(self.revision, Vec::new(), false);
        page.count = live.len() as u64;
        if scan.count_only {
            return page;
        }
        let limit = scan.limit as usize;
        page.more = live.len() > limit;
        page.items = live
            .into_iter()
            .take(limit)
            .map(|(key, entry)| ScanItem {
                key: key.clone(),
                entry: (!scan.keys_only).then(|| entry.to_entry()),
            })
            .collect();
        page.count = page.items.len() as u64;
        page
    }

    /// The live entries of a scan's range, in key order.
    fn live_range<'a>(
        entries: &'a BTreeMap<Vec<u8>, ModelEntry>,
        now_ms: u64,
        scan: &Scan,
    ) -> Vec<(&'a Vec<u8>, &'a ModelEntry)> {
        entries
            .iter()
            .filter(|(key, entry)| {
                key.as_slice() >= scan.start.as_slice()
                    && scan
                        .end
                        .as_ref()
                        .is_none_or(|end| key.as_slice() < end.as_slice())
                    && !entry.is_expired(now_ms)
            })
            .collect()
    }

    /// A counter add on its own: one revision if it writes, none if it is refused or finds
    /// nothing to add to.
    fn add(&mut self, now_ms: u64, add: &CounterAdd) -> Response {
        self.reclaim_if_expired(now_ms, &add.key);
        let revision = self.revision + 1;
        let mut after = self.entries.clone();
        match model_add(&mut after, now_ms, add, revision) {
            Err(code) => Response::Error(ErrorReply::new(code, "")),
            Ok(None) => Response::Counter {
                applied: false,
                value: 0,
                mod_revision: 0,
            },
            Ok(Some(value)) => {
                if !self.commit(after) {
                    return store_full();
                }
                self.revision = revision;
                counter(value, revision)
            }
        }
    }

    /// Whether a transaction's compare holds of the key's live entry (a missing key has
    /// version and revisions 0 and no value).
    fn compare_holds(&self, now_ms: u64, compare: &Compare) -> bool {
        let current = self.live(now_ms, &compare.key);
        let number = |field: fn(&ModelEntry) -> u64| current.map_or(0, field);
        match &compare.check {
            Check::Exists => current.is_some(),
            Check::Absent => current.is_none(),
            Check::Value(op, value) => {
                current.is_some_and(|entry| model_compare(*op, &entry.value, value))
            }
            Check::Version(op, given) => model_compare(*op, &number(|entry| entry.version), given),
            Check::CreateRevision(op, given) => {
                model_compare(*op, &number(|entry| entry.create_revision), given)
            }
            Check::ModRevision(op, given) => {
                model_compare(*op, &number(|entry| entry.mod_revision), given)
            }
            Check::Fence(token) => {
                let last_token = self
                    .locks
                    .get(&compare.key)
                    .map_or(0, |lock| lock.last_token);
                *token >= last_token
            }
            Check::Lease(op, given) => {
                let lease = current
                    .and(self.attached.get(&compare.key).copied())
                    .unwrap_or(0);
                model_compare(*op, &lease, given)
            }
        }
    }

    /// A transaction, spelled out step by step: reclaim every named key that expired (each
    /// its own revision), evaluate the compares, then run the branch's ops in order on a copy
    /// of the map at the next revision. The copy becomes the state only if the branch wrote
    /// something and nothing refused it: an add out of range, reads over the bound, or the
    /// memory budget.
    fn txn(&mut self, now_ms: u64, txn: &Txn) -> Response {
        let named_keys: Vec<&Vec<u8>> = txn
            .compares
            .iter()
            .map(|compare| &compare.key)
            .chain(txn.success.iter().filter_map(model_op_key))
            .chain(txn.failure.iter().filter_map(model_op_key))
            .collect();
        for key in named_keys {
            self.reclaim_if_expired(now_ms, key);
        }
        let succeeded = txn
            .compares
            .iter()
            .all(|compare| self.compare_holds(now_ms, compare));
        let ops = if succeeded {
            &txn.success
        } else {
            &txn.failure
        };
        // A branch names each key once, so what an op reads of its own key is what the map
        // holds before the branch runs.
        let read_bytes: usize = ops
            .iter()
            .map(|op| match op {
                TxnOp::Get { key }
                | TxnOp::Put {
                    key,
                    return_previous: true,
                    ..
                }
                | TxnOp::Delete {
                    key,
                    return_previous: true,
                } => self
                    .live(now_ms, key)
                    .map_or(0, |entry| key.len() + entry.value.len()),
                _ => 0,
            })
            .sum();
        let mut run = ModelTxnRun {
            after: self.entries.clone(),
            now_ms,
            revision: self.revision + 1,
            range_bytes_left: TXN_READ_BYTES_MAX.saturating_sub(read_bytes),
            range_items_left: TXN_RANGE_ITEMS_MAX,
            writes: false,
        };
        let mut results = Vec::with_capacity(ops.len());
        for op in ops {
            match run.op(op) {
                Ok(result) => results.push(result),
                Err(code) => return Response::Error(ErrorReply::new(code, "")),
            }
        }
        if read_bytes > TXN_READ_BYTES_MAX {
            return Response::Error(ErrorReply::new(ErrorCode::TooLarge, ""));
        }
        // What the deletes free is room for the puts and adds beside them, as it would be in
        // separate requests: the budget judges the state the branch leaves.
        if run.writes {
            if !self.commit(run.after) {
                return store_full();
            }
            self.revision = run.revision;
        }
        // Everything the transaction read, it read at its one revision.
        for result in &mut results {
            if let TxnResult::Range(page) = result {
                page.revision = self.revision;
            }
        }
        Response::Txn(TxnOutcome {
            succeeded,
            revision: self.revision,
            results,
        })
    }

    fn put(&mut self, now_ms: u64, put: &Put) -> Response {
        // The lease is checked first: a put it refuses does not even reclaim the key.
        if let Some(code) = put
            .lease
            .and_then(|lease| self.lease_refusal(now_ms, &put.key, lease))
        {
            return error_reply(code);
        }
        self.reclaim_if_expired(now_ms, &put.key);
        let current = self.entries.get(&put.key).cloned();
        let previous = if put.return_previous {
            current.as_ref().map(ModelEntry::to_entry)
        } else {
            None
        };
        let condition_holds = match &put.condition {
            Always => true,
            IfAbsent => current.is_none(),
            IfPresent => current.is_some(),
            IfVersion(version) => current.as_ref().map_or(0, |entry| entry.version) == *version,
            IfValue(value) => current.as_ref().is_some_and(|entry| entry.value == *value),
        };
        if !condition_holds {
            return Response::Put {
                applied: false,
                mod_revision: current.as_ref().map_or(0, |entry| entry.mod_revision),
                version: current.map_or(0, |entry| entry.version),
                previous,
            };
        }
        let deadline_ms = match put.ttl_ms {
            Some(ttl_ms) => Some(now_ms + ttl_ms),
            None if put.keep_ttl => current.as_ref().and_then(|entry| entry.deadline_ms),
            None => None,
        };
        let revision = self.revision + 1;
        let mut after = self.entries.clone();
        after.insert(
            put.key.clone(),
            ModelEntry::written(current.as_ref(), put.value.clone(), revision, deadline_ms),
        );
        if !self.commit(after) {
            return store_full();
        }
        self.revision = revision;
        match put.lease {
            Some(lease) => self.attached.insert(put.key.clone(), lease),
            None => self.attached.remove(&put.key),
        };
        Response::Put {
            applied: true,
            mod_revision: revision,
            version: current.as_ref().map_or(1, |entry| entry.version + 1),
            previous,
        }
    }

    fn set_deadline(&mut self, now_ms: u64, key: &[u8], deadline_ms: Option<u64>) -> Response {
        self.reclaim_if_expired(now_ms, key);
        let Some(current) = self.entries.get(key).cloned() else {
            return expiry(false, 0);
        };
        if deadline_ms.is_none() && current.deadline_ms.is_none() {
            return expiry(false, current.mod_revision);
        }
        let revision = self.revision + 1;
        let mut after = self.entries.clone();
        after.insert(
            key.to_vec(),
            ModelEntry::written(Some(&current), current.value.clone(), revision, deadline_ms),
        );
        if !self.commit(after) {
            return store_full();
        }
        self.revision = revision;
        expiry(true, revision)
    }

    fn multi_put(&mut self, now_ms: u64, entries: &[PutEntry]) -> Response {
        if entries.is_empty() {
            return multi_put_versions(&[]);
        }
        for entry in entries {
            self.reclaim_if_expired(now_ms, &entry.key);
        }
        let revision = self.revision + 1;
        let mut after = self.entries.clone();
        for entry in entries {
            let written = ModelEntry::written(
                after.get(&entry.key),
                entry.value.clone(),
                revision,
                entry.ttl_ms.map(|ttl_ms| now_ms + ttl_ms),
            );
            after.insert(entry.key.clone(), written);
        }
        if !self.commit(after) {
            return store_full();
        }
        self.revision = revision;
        for entry in entries {
            self.attached.remove(&entry.key);
        }
        Response::MultiPut {
            mod_revisions: vec![revision; entries.len()],
        }
    }

    /// Reclaims every expired entry: the property test gives the shard a per-tick budget no
    /// smaller than the key space, so nothing is left for a later tick.
    ///
    /// Then it ends every lease whose deadline the clock reached (again, the test allows more
    /// per tick than it can grant), each at a revision of its own. Only the keys that expired
    /// count.
    fn tick(&mut self, now_ms: u64) -> usize {
        let count_before = self.entries.len();
        for entry in self.entries.values() {
            if let Some(deadline_ms) = entry.deadline_ms.filter(|_| entry.is_expired(now_ms)) {
                self.stats.expiry_lag_ms.record(now_ms - deadline_ms);
            }
        }
        self.entries.retain(|_, entry| !entry.is_expired(now_ms));
        let entries = &self.entries;
        self.attached.retain(|key, _| entries.contains_key(key));
        let reclaimed_count = count_before - self.entries.len();
        self.revision += reclaimed_count as u64;
        self.stats.expired_count += reclaimed_count as u64;
        let expired: Vec<u64> = self
            .leases
            .iter()
            .filter(|&(_, &(_, deadline_ms))| deadline_ms <= now_ms)
            .map(|(&id, _)| id)
            .collect();
        for lease in expired {
            self.end_lease(lease, true);
        }
        reclaimed_count
    }
}

/// A counter add on `entries`, in which its key has not expired: `Ok(Some(value))` with the
/// counter written at `revision`, `Ok(None)` if the key is missing and not created, or the
/// refusal, with `entries` untouched.
fn model_add(
    entries: &mut BTreeMap<Vec<u8>, ModelEntry>,
    now_ms: u64,
    add: &CounterAdd,
    revision: u64,
) -> Result<Option<i64>, ErrorCode> {
    let current = entries.get(&add.key);
    assert!(current.is_none_or(|entry| !entry.is_expired(now_ms)));
    let before = match current {
        None if !add.create => return Ok(None),
        None => 0,
        Some(entry) => std::str::from_utf8(&entry.value)
            .ok()
            .and_then(|text| text.parse::<i64>().ok())
            .ok_or(ErrorCode::OutOfRange)?,
    };
    let value = before.checked_add(add.delta).ok_or(ErrorCode::OutOfRange)?;
    if add.min.is_some_and(|min| value < min) || add.max.is_some_and(|max| value > max) {
        return Err(ErrorCode::OutOfRange);
    }
    let deadline_ms = match current {
        // A counter's window starts when it is created ...
        None => add.ttl_ms.map(|ttl_ms| now_ms + ttl_ms),
        // ... and restarts only when an add asks for it.
        Some(_) if add.refresh_ttl => Some(
            now_ms
                + add
                    .ttl_ms
                    .expect("check_request: refresh_ttl comes with a ttl"),
        ),
        Some(entry) => entry.deadline_ms,
    };
    let written = ModelEntry::written(
        current,
        value.to_string().into_bytes(),
        revision,
        deadline_ms,
    );
    entries.insert(add.key.clone(), written);
    Ok(Some(value))
}

/// A transaction's branch running on a copy of the model's map, at its one revision.
struct ModelTxnRun {
    after: BTreeMap<Vec<u8>, ModelEntry>,
    now_ms: u64,
    revision: u64,
    /// What the gets and previous entries of the branch leave of `TXN_READ_BYTES_MAX`.
    range_bytes_left: usize,
    range_items_left: usize,
    /// Whether an op has written (the transaction then takes `revision`).
    writes: bool,
}

impl ModelTxnRun {
    /// Runs one op of the branch, or says why the whole transaction is refused.
    fn op(&mut self, op: &TxnOp) -> Result<TxnResult, ErrorCode> {
        let result = match op {
            TxnOp::Get { key } => TxnResult::Get(self.after.get(key).map(ModelEntry::to_entry)),
            TxnOp::Put {
                key,
                value,
                ttl_ms,
                keep_ttl,
                return_previous,
                lease: _,
                fields: _,
            } => {
                let current = self.after.get(key).cloned();
                let deadline_ms = match ttl_ms {
                    Some(ttl_ms) => Some(self.now_ms + ttl_ms),
                    None if *keep_ttl => current.as_ref().and_then(|entry| entry.deadline_ms),
                    None => None,
                };
                let written = ModelEntry::written(
                    current.as_ref(),
                    value.clone(),
                    self.revision,
                    deadline_ms,
                );
                let version = written.version;
                self.after.insert(key.clone(), written);
                self.writes = true;
                TxnResult::Put {
                    version,
                    previous: current
                        .filter(|_| *return_previous)
                        .map(|entry| entry.to_entry()),
                }
            }
            TxnOp::Delete {
                key,
                return_previous,
            } => {
                let removed = self.after.remove(key);
                self.writes |= removed.is_some();
                TxnResult::Delete {
                    deleted: removed.is_some(),
                    previous: removed
                        .filter(|_| *return_previous)
                        .map(|entry| entry.to_entry()),
                }
            }
            TxnOp::Add(add) => match model_add(&mut self.after, self.now_ms, add, self.revision)? {
                None => TxnResult::Add {
                    applied: false,
                    value: 0,
                },
                Some(value) => {
                    self.writes = true;
                    TxnResult::Add {
                        applied: true,
                        value,
                    }
                }
            },
            TxnOp::Range(scan) => TxnResult::Range(self.range(scan)),
        };
        Ok(result)
    }

    /// The range's live keys in order, while its limit and what is left of the transaction's
    /// read bounds allow; the first key that does not fit ends the page. The page's revision
    /// is the transaction's, filled in once it is known.
    fn range(&mut self, scan: &Scan) -> ScanPage {
        let live = Model::live_range(&self.after, self.now_ms, scan);
        let mut page = model_page(0, Vec::new(), false);
        if scan.count_only {
            page.count = live.len() as u64;
            return page;
        }
        for (key, entry) in &live {
            let bytes = key.len() + if scan.keys_only { 0 } else { entry.value.len() };
            if page.items.len() == scan.limit as usize
                || self.range_items_left == 0
                || bytes > self.range_bytes_left
            {
                break;
            }
            self.range_items_left -= 1;
            self.range_bytes_left -= bytes;
            page.items.push(ScanItem {
                key: (*key).clone(),
                entry: (!scan.keys_only).then(|| entry.to_entry()),
            });
        }
        page.more = page.items.len() < live.len();
        page.count = page.items.len() as u64;
        page
    }
}

/// Whether `current` relates to `given` as `op` says.
fn model_compare<T: Ord + ?Sized>(op: CompareOp, current: &T, given: &T) -> bool {
    match op {
        CompareOp::Equal => current == given,
        CompareOp::NotEqual => current != given,
        CompareOp::Less => current < given,
        CompareOp::LessOrEqual => current <= given,
        CompareOp::Greater => current > given,
        CompareOp::GreaterOrEqual => current >= given,
    }
}

/// The key a transaction op names (none for a range).
fn model_op_key(op: &TxnOp) -> Option<&Vec<u8>> {
    match op {
        TxnOp::Get { key } | TxnOp::Put { key, .. } | TxnOp::Delete { key, .. } => Some(key),
        TxnOp::Add(add) => Some(&add.key),
        TxnOp::Range(_) => None,
    }
}

fn model_page(revision: u64, items: Vec<ScanItem>, more: bool) -> ScanPage {
    ScanPage {
        node_id: NODE_ID,
        core_id: SHARD_ID,
        revision,
        count: items.len() as u64,
        items,
        more,
    }
}

#[derive(Debug, Clone)]
enum Operation {
    Apply(Request),
    /// A transaction whose one compare is aimed at what the model holds when it runs.
    Probe(Probe),
    /// A lease request aimed at a lease the model holds when it runs.
    Leased(Leased),
    /// A lock request aimed at a lock and a lease the model holds when it runs.
    Locking(Locking),
    Tick,
}

/// A lock, unlock or fenced write of lock `lock_index`, with a token near the lock's last
/// one (`offset` -1, 0 or 1: the holder's token, while it is held). A lock is taken by the
/// lease `Leased` would pick for `lease_index` (a grant of `ttl_ms` if there is none), or by
/// `lease` if given. Random tokens mostly miss; these hit the edge of the fence.
#[derive(Debug, Clone)]
struct Locking {
    lock_index: usize,
    lease_index: usize,
    lease: Option<u64>,
    ttl_ms: u64,
    offset: i8,
    action: LockAction,
}

#[derive(Debug, Clone, Copy)]
enum LockAction {
    Lock,
    Unlock,
    /// A put of key `key_index` if the fence holds.
    FencedPut(usize),
}

impl Locking {
    fn request(&self, model: &Model, now_ms: u64) -> Request {
        let name = model_lock_name(self.lock_index);
        let last_token = model.locks.get(&name).map_or(0, |lock| lock.last_token);
        let token = last_token.saturating_add_signed(i64::from(self.offset));
        match self.action {
            LockAction::Lock => {
                let picked = model_lease_for(model, now_ms, self.lease_index);
                let Some(lease) = self.lease.or(picked) else {
                    return lease_grant(self.ttl_ms);
                };
                Request::Lock {
                    name,
                    lease,
                    wait_ms: 0,
                }
            }
            LockAction::Unlock => Request::Unlock { name, token },
            LockAction::FencedPut(key_index) => Request::Txn(Box::new(Txn {
                compares: vec![Compare {
                    key: name,
                    check: Check::Fence(token),
                }],
                success: vec![TxnOp::Put {
                    key: model_key(key_index),
                    value: b"fenced".to_vec(),
                    ttl_ms: None,
                    keep_ttl: false,
                    return_previous: false,
                    lease: None,
                    fields: Vec::new(),
                }],
                failure: Vec::new(),
            })),
        }
    }
}

fn locking_strategy() -> impl Strategy<Value = Locking> {
    (
        0..MODEL_LOCK_COUNT,
        0..MODEL_LEASE_LIMITS.leases_max * 2,
        prop::option::weighted(0.15, lease_id_strategy()),
        lease_ttl_ms_strategy(),
        -1..=1_i8,
        prop_oneof![
            3 => Just(LockAction::Lock),
            2 => Just(LockAction::Unlock),
            2 => (0..MODEL_KEY_COUNT).prop_map(LockAction::FencedPut),
        ],
    )
        .prop_map(
            |(lock_index, lease_index, lease, ttl_ms, offset, action)| Locking {
                lock_index,
                lease_index,
                lease,
                ttl_ms,
                offset,
                action,
            },
        )
}

/// A request naming the `lease_index`th live lease of the model. If none lives, it names
/// one of the table's (past their deadline, not yet ticked) half the time, and is otherwise
/// a grant of a lease of `ttl_ms`. Random ids mostly name leases that are gone or never
/// were; these name the ones there are.
#[derive(Debug, Clone)]
struct Leased {
    lease_index: usize,
    ttl_ms: u64,
    request: LeasedRequest,
}

#[derive(Debug, Clone)]
enum LeasedRequest {
    Put(Put),
    Keepalive,
    Revoke,
    TimeToLive,
}

/// The `lease_index`th live lease of the model; if none lives, one of the table's (past its
/// deadline, not yet ticked) for an even index; else none.
fn model_lease_for(model: &Model, now_ms: u64, lease_index: usize) -> Option<u64> {
    let mut ids: Vec<u64> = model
        .leases
        .keys()
        .copied()
        .filter(|&id| model.lease_lives(now_ms, id))
        .collect();
    if ids.is_empty() && lease_index % 2 == 0 {
        ids = model.leases.keys().copied().collect();
    }
    (!ids.is_empty()).then(|| ids[lease_index % ids.len()])
}

impl Leased {
    fn request(&self, model: &Model, now_ms: u64) -> Request {
        let Some(id) = model_lease_for(model, now_ms, self.lease_index) else {
            return lease_grant(self.ttl_ms);
        };
        match &self.request {
            LeasedRequest::Put(put) => Request::Put(Box::new(Put {
                lease: Some(id),
                ..put.clone()
            })),
            LeasedRequest::Keepalive => lease_keepalive(&[id]),
            LeasedRequest::Revoke => lease_revoke(id),
            LeasedRequest::TimeToLive => lease_time_to_live(id),
        }
    }
}

fn leased_strategy() -> impl Strategy<Value = Leased> {
    (
        0..MODEL_LEASE_LIMITS.leases_max * 2,
        lease_ttl_ms_strategy(),
        prop_oneof![
            // Mostly unconditional, so that most of them attach their key.
            4 => (put_strategy(), prop::bool::weighted(0.6)).prop_map(|(put, always)| {
                LeasedRequest::Put(if always { Put { condition: Always, ..put } } else { put })
            }),
            2 => Just(LeasedRequest::Keepalive),
            1 => Just(LeasedRequest::Revoke),
            1 => Just(LeasedRequest::TimeToLive),
        ],
    )
        .prop_map(|(lease_index, ttl_ms, request)| Leased {
            lease_index,
            ttl_ms,
            request,
        })
}

/// Any lease id a request may name: one of the first leases this shard grants (some never
/// are), one of another core (never known to live here) or one of another node.
fn lease_id_strategy() -> impl Strategy<Value = u64> {
    prop_oneof![
        4 => (1..=6_u64).prop_map(home_lease),
        1 => Just(foreign_lease(1)),
        1 => Just(LeaseId::new(NODE_ID + 1, SHARD_ID, 1).unwrap().0),
    ]
}

/// A compare of a key the model holds (the `key_index`th live one, if any), against a number
/// or value just below, equal to or just above the stored one (`offset` -1, 0 or 1). Random
/// compares mostly meet missing keys; these meet keys whose version, create revision and mod
/// revision differ, so a check that reads the wrong field shows.
#[derive(Debug, Clone)]
struct Probe {
    key_index: usize,
    /// Version, create revision, mod revision or value.
    field: usize,
    op: CompareOp,
    offset: i8,
}

impl Probe {
    fn request(&self, model: &Model, now_ms: u64) -> Request {
        let live: Vec<(&Vec<u8>, &ModelEntry)> = model
            .entries
            .iter()
            .filter(|(_, entry)| !entry.is_expired(now_ms))
            .collect();
        let compare = if live.is_empty() {
            Compare {
                key: model_key(self.key_index % MODEL_KEY_COUNT),
                check: Check::Absent,
            }
        } else {
            let (key, entry) = live[self.key_index % live.len()];
            let near = |number: u64| number.saturating_add_signed(i64::from(self.offset));
            let check = match self.field {
                0 => Check::Version(self.op, near(entry.version)),
                1 => Check::CreateRevision(self.op, near(entry.create_revision)),
                2 => Check::ModRevision(self.op, near(entry.mod_revision)),
                _ => {
                    let mut value = entry.value.clone();
                    match self.offset {
                        -1 => drop(value.pop()),
                        0 => {}
                        _ => value.push(b'a'),
                    }
                    Check::Value(self.op, value)
                }
            };
            Compare {
                key: key.clone(),
                check,
            }
        };
        let key = compare.key.clone();
        Request::Txn(Box::new(Txn {
            compares: vec![compare],
            success: vec![TxnOp::Get { key }],
            failure: Vec::new(),
        }))
    }
}

fn probe_strategy() -> impl Strategy<Value = Probe> {
    (
        0..MODEL_KEY_COUNT,
        0..4_usize,
        compare_op_strategy(),
        -1..=1_i8,
    )
        .prop_map(|(key_index, field, op, offset)| Probe {
            key_index,
            field,
            op,
            offset,
        })
}

fn key_strategy() -> impl Strategy<Value = Vec<u8>> {
    (0..MODEL_KEY_COUNT).prop_map(model_key)
}

/// Mostly text, sometimes a counter (small, at either end of `i64`, or spelled oddly) or
/// something that looks like one but is not.
fn value_strategy() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        2 => prop::collection::vec(b'a'..=b'z', 0..8),
        2 => short_text_strategy(),
        2 => (-3..3_i64).prop_map(|value| value.to_string().into_bytes()),
        1 => prop_oneof![
            Just(i64::MAX.to_string()),
            Just(i64::MIN.to_string()),
            Just("+1".to_owned()),
            Just("007".to_owned()),
            Just(" 1".to_owned()),
            Just("-".to_owned()),
            Just("9223372036854775808".to_owned()),
        ]
        .prop_map(String::into_bytes),
    ]
}

/// One of seven texts (empty, `a`, `b`, `aa`, ...), so values written twice often match.
fn short_text_strategy() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(b'a'..=b'b', 0..3)
}

/// Values a condition or compare expects: mostly ones a run often stores.
fn expected_value_strategy() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        2 => short_text_strategy(),
        1 => (-3..3_i64).prop_map(|value| value.to_string().into_bytes()),
        1 => value_strategy(),
    ]
}

/// Deltas and bounds near the small counters of a run, and at the ends of `i64`, so adds
/// often land on a bound or overflow.
fn counter_number_strategy() -> impl Strategy<Value = i64> {
    prop_oneof![4 => -3..3_i64, 1 => Just(i64::MAX), 1 => Just(i64::MIN)]
}

fn counter_add_strategy() -> impl Strategy<Value = CounterAdd> {
    (
        key_strategy(),
        counter_number_strategy(),
        prop::option::weighted(0.3, counter_number_strategy()),
        prop::option::weighted(0.3, counter_number_strategy()),
        prop::bool::weighted(0.8),
        prop::option::weighted(0.3, ttl_ms_strategy()),
        any::<bool>(),
    )
        .prop_map(|(key, delta, min, max, create, ttl_ms, refresh_ttl)| {
            // Empty bounds and a refresh without a TTL are refused by `check_request`.
            let (min, max) = match (min, max) {
                (Some(min), Some(max)) if min > max => (Some(max), Some(min)),
                bounds => bounds,
            };
            CounterAdd {
                key,
                delta,
                min,
                max,
                create,
                ttl_ms,
                refresh_ttl: refresh_ttl && ttl_ms.is_some(),
            }
        })
}

fn delete_strategy() -> impl Strategy<Value = Delete> {
    (
        key_strategy(),
        prop_oneof![
            1 => Just(DeleteCondition::Always),
            // A present key's version is at least 1, and stays small in a run.
            1 => prop_oneof![1 => Just(0), 4 => 1..4_u64].prop_map(DeleteCondition::IfVersion),
            1 => expected_value_strategy().prop_map(DeleteCondition::IfValue),
        ],
        any::<bool>(),
    )
        .prop_map(|(key, condition, return_previous)| Delete {
            key,
            condition,
            return_previous,
        })
}

fn compare_op_strategy() -> impl Strategy<Value = CompareOp> {
    prop_oneof![
        Just(CompareOp::Equal),
        Just(CompareOp::NotEqual),
        Just(CompareOp::Less),
        Just(CompareOp::LessOrEqual),
        Just(CompareOp::Greater),
        Just(CompareOp::GreaterOrEqual),
    ]
}

/// Compares of every kind. Versions stay small in a run and revisions reach a few dozen, so
/// the numbers given are near the ones stored.
fn compare_strategy() -> impl Strategy<Value = Compare> {
    let of_a_key = (
        key_strategy(),
        prop_oneof![
            Just(Check::Exists),
            Just(Check::Absent),
            (compare_op_strategy(), expected_value_strategy())
                .prop_map(|(op, value)| Check::Value(op, value)),
            (compare_op_strategy(), 0..4_u64).prop_map(|(op, version)| Check::Version(op, version)),
            (compare_op_strategy(), 0..40_u64)
                .prop_map(|(op, revision)| Check::CreateRevision(op, revision)),
            (compare_op_strategy(), 0..40_u64)
                .prop_map(|(op, revision)| Check::ModRevision(op, revision)),
            (compare_op_strategy(), 0..4_u64).prop_map(|(op, sequence)| Check::Lease(
                op,
                if sequence == 0 {
                    0
                } else {
                    home_lease(sequence)
                }
            )),
        ],
    )
        .prop_map(|(key, check)| Compare { key, check });
    // Fences mostly of the lock names (a key's name is a lock never granted, fenced at 0).
    let fence = (
        prop_oneof![
            3 => (0..MODEL_LOCK_COUNT).prop_map(model_lock_name),
            1 => key_strategy(),
        ],
        0..40_u64,
    )
        .prop_map(|(key, token)| Compare {
            key,
            check: Check::Fence(token),
        });
    prop_oneof![6 => of_a_key, 1 => fence]
}

/// Every kind of op; adds a little rarer, as one that fails fails the whole transaction.
fn txn_op_strategy() -> impl Strategy<Value = TxnOp> {
    prop_oneof![
        2 => key_strategy().prop_map(|key| TxnOp::Get { key }),
        3 => (
            key_strategy(),
            value_strategy(),
            prop::option::of(ttl_ms_strategy()),
            any::<bool>(),
            any::<bool>(),
        )
            .prop_map(|(key, value, ttl_ms, keep_ttl, return_previous)| TxnOp::Put {
                key,
                value,
                ttl_ms,
                keep_ttl,
                return_previous,
                lease: None, fields: Vec::new(),
            }),
        2 => (key_strategy(), any::<bool>())
            .prop_map(|(key, return_previous)| TxnOp::Delete { key, return_previous }),
        1 => counter_add_strategy().prop_map(TxnOp::Add),
        1 => scan_strategy().prop_map(TxnOp::Range),
    ]
}

/// Up to six ops, each key named once (a later op on a key already named is dropped).
fn txn_branch_strategy() -> impl Strategy<Value = Vec<TxnOp>> {
    prop::collection::vec(txn_op_strategy(), 0..=6).prop_map(|ops| {
        let mut named = std::collections::BTreeSet::new();
        ops.into_iter()
            .filter(|op| model_op_key(op).is_none_or(|key| named.insert(key.clone())))
            .collect()
    })
}

fn txn_strategy() -> impl Strategy<Value = Txn> {
    (
        prop::collection::vec(compare_strategy(), 0..=3),
        txn_branch_strategy(),
        txn_branch_strategy(),
    )
        .prop_map(|(compares, success, failure)| Txn {
            compares,
            success,
            failure,
        })
        .prop_filter("a transaction names a key", |txn| {
            !txn.compares.is_empty()
                || txn
                    .success
                    .iter()
                    .chain(&txn.failure)
                    .any(|op| model_op_key(op).is_some())
        })
}

/// Short enough that keys expire within a few steps of the clock.
fn ttl_ms_strategy() -> impl Strategy<Value = u64> {
    1..80_u64
}

/// Leases live longer than keys, so that they gather keys before they end, and the table
/// fills up; some still end within a step or two.
fn lease_ttl_ms_strategy() -> impl Strategy<Value = u64> {
    prop_oneof![1 => 1..40_u64, 3 => 40..400_u64]
}

fn put_strategy() -> impl Strategy<Value = Put> {
    (
        key_strategy(),
        value_strategy(),
        prop::option::of(ttl_ms_strategy()),
        any::<bool>(),
        prop_oneof![
            Just(Always),
            Just(IfAbsent),
            Just(IfPresent),
            // Versions stay small in a run, so these often hold.
            (0..4_u64).prop_map(IfVersion),
            // Empty values are written often enough for some of these to hold.
            prop_oneof![Just(Vec::new()), value_strategy()].prop_map(IfValue),
        ],
        any::<bool>(),
        prop::option::weighted(0.1, lease_id_strategy()),
    )
        .prop_map(
            |(key, value, ttl_ms, keep_ttl, condition, return_previous, lease)| Put {
                key,
                value,
                ttl_ms,
                keep_ttl,
                condition,
                return_previous,
                lease,
                fields: Vec::new(),
            },
        )
}

fn put_entry_strategy() -> impl Strategy<Value = PutEntry> {
    (
        key_strategy(),
        value_strategy(),
        prop::option::of(ttl_ms_strategy()),
    )
        .prop_map(|(key, value, ttl_ms)| PutEntry {
            key,
            value,
            ttl_ms,
            fields: Vec::new(),
        })
}

fn request_strategy() -> impl Strategy<Value = Request> {
    let keys = || prop::collection::vec(key_strategy(), 0..5);
    prop_oneof![
        3 => key_strategy().prop_map(|key| Request::Get { key }),
        1 => key_strategy().prop_map(|key| Request::Exists { key }),
        2 => key_strategy().prop_map(|key| Request::Ttl { key }),
        6 => put_strategy().prop_map(|put| Request::Put(Box::new(put))),
        4 => delete_strategy().prop_map(|delete| Request::Delete(Box::new(delete))),
        2 => (key_strategy(), ttl_ms_strategy())
            .prop_map(|(key, ttl_ms)| Request::Expire { key, ttl_ms }),
        2 => key_strategy().prop_map(|key| Request::Persist { key }),
        1 => keys().prop_map(|keys| Request::MultiGet { keys }),
        2 => prop::collection::vec(put_entry_strategy(), 0..5)
            .prop_map(|entries| Request::MultiPut { entries }),
        1 => keys().prop_map(|keys| Request::MultiDelete { keys }),
        3 => counter_add_strategy().prop_map(|add| Request::Add(Box::new(add))),
        2 => scan_strategy().prop_map(Request::Scan),
        4 => txn_strategy().prop_map(|txn| Request::Txn(Box::new(txn))),
        3 => lease_ttl_ms_strategy().prop_map(|ttl_ms| Request::LeaseGrant { ttl_ms }),
        1 => prop::collection::vec(lease_id_strategy(), 0..3)
            .prop_map(|ids| Request::LeaseKeepalive { ids }),
        1 => lease_id_strategy().prop_map(|id| Request::LeaseRevoke { id }),
        1 => lease_id_strategy().prop_map(|id| Request::LeaseTimeToLive { id }),
        1 => Just(Request::LeaseList),
        1 => ((0..MODEL_LOCK_COUNT).prop_map(model_lock_name), lease_id_strategy())
            .prop_map(|(name, lease)| Request::Lock { name, lease, wait_ms: 0 }),
        1 => ((0..MODEL_LOCK_COUNT).prop_map(model_lock_name), 0..40_u64)
            .prop_map(|(name, token)| Request::Unlock { name, token }),
    ]
}

/// Ranges over the model's keys and around them (`key` and `key9` bound all of them, `kez`
/// is past them), some empty or backwards.
fn scan_strategy() -> impl Strategy<Value = Scan> {
    let bound = || {
        prop_oneof![
            key_strategy(),
            Just(b"key".to_vec()),
            Just(b"key9".to_vec()),
            Just(b"kez".to_vec()),
            Just(Vec::new()),
        ]
    };
    (
        bound(),
        prop::option::of(bound().prop_filter("an end is a key", |end| !end.is_empty())),
        1..=u32::try_from(MODEL_KEY_COUNT).unwrap() + 1,
        any::<bool>(),
        prop::bool::weighted(0.2),
    )
        .prop_map(|(start, end, limit, keys_only, count_only)| Scan {
            start,
            end,
            limit,
            keys_only,
            count_only,
        })
}

/// About one tick in thirteen steps: often enough to reclaim, rarely enough that many expired
/// keys meet a write first.
fn operation_strategy() -> impl Strategy<Value = Operation> {
    prop_oneof![
        11 => request_strategy().prop_map(Operation::Apply),
        1 => probe_strategy().prop_map(Operation::Probe),
        4 => leased_strategy().prop_map(Operation::Leased),
        3 => locking_strategy().prop_map(Operation::Locking),
        1 => Just(Operation::Tick),
    ]
}

/// Lock `name` as the model sees it, or `None` if the shard never granted it.
fn model_lock_of(shard: &Shard, name: &[u8]) -> Option<ModelLock> {
    shard
        .locks()
        .entries()
        .find(|(known, _, _)| *known == name)
        .map(|(_, holder, last_token)| ModelLock {
            holder: holder.map(|holder| (holder.lease, holder.token)),
            last_token,
        })
}

/// Keys and their values, in key order.
type KeyValues = BTreeMap<Vec<u8>, Vec<u8>>;

/// Whether `key` was stored in `entries` with a deadline passed at `now_ms`.
fn model_deadline_passed(entries: &BTreeMap<Vec<u8>, ModelEntry>, key: &[u8], now_ms: u64) -> bool {
    entries
        .get(key)
        .is_some_and(|entry| entry.is_expired(now_ms))
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 256,
        // A failure prints the shrunk operations, which replay it exactly; writing them under
        // the source tree is left to whoever debugs it.
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// Random operations over eight keys and three locks with a clock that stands still or
    /// moves forward: the shard answers as the model does, holds the same entries, timers,
    /// bytes and locks, and shows every key as the model does after every step.
    #[test]
    fn shard_matches_a_model(
        start_ms in 0..1_000_000_u64,
        memory_bytes_max in prop_oneof![Just(u64::MAX), 0..1_500_u64],
        steps in prop::collection::vec(
            (prop_oneof![1 => Just(0_u64), 3 => 0..40_u64], operation_strategy()),
            1..=50,
        ),
        snapshot_at in 0..50_usize,
        snapshot_start in 0..MODEL_KEY_COUNT,
    ) {
        let mut shard = Shard::with_journal(model_config(memory_bytes_max), start_ms);
        // A watcher of part of the keys, started with a snapshot partway through.
        let mut snapshot_watcher: Option<(u64, u64, KeyValues)> = None;
        let mut model = Model::new(memory_bytes_max);
        // A watcher of every key: replaying its events rebuilds exactly what the store holds.
        let everything = WatchSpec {
            start: Box::from(&b""[..]),
            end: None,
            puts: true,
            deletes: true,
            previous: true, query: None,
        };
        let watcher = shard.watch_hub().watch(everything, Start::Now).unwrap();
        let mut shadow: BTreeMap<Vec<u8>, (Vec<u8>, u64, u64, u64)> = BTreeMap::new();
        let mut last_revision = 0;
        let every_key = Request::MultiGet {
            keys: (0..MODEL_KEY_COUNT).map(model_key).collect(),
        };
        let mut now_ms = start_ms;
        for (index, (clock_step_ms, operation)) in steps.iter().enumerate() {
            now_ms += clock_step_ms;
            // Leases run on the same clock as keys in this test.
            shard.set_monotonic_ms(now_ms);
            let model_before = model.entries.clone();
            model.lease_removals.clear();
            let request = match operation {
                Operation::Apply(request) => Some(request.clone()),
                Operation::Probe(probe) => Some(probe.request(&model, now_ms)),
                Operation::Leased(leased) => Some(leased.request(&model, now_ms)),
                Operation::Locking(locking) => Some(locking.request(&model, now_ms)),
                Operation::Tick => None,
            };
            if let Some(request) = &request {
                // What the core reserves on a full disk covers what the request logs.
                let bound = journal_bound(&shard, request);
                let journal_len_before = shard.journal_len();
                let actual = respond(&mut shard, now_ms, request);
                let journaled = (shard.journal_len() - journal_len_before) as u64;
                // A revoke's bound leaves out the releases of the lease's locks: that gap is
                // for `a_revoke_journal_bound_covers_the_lock_releases` to guard.
                let releases_locks = matches!(
                    request,
                    Request::LeaseRevoke { id } if model.locks.values().any(|lock| {
                        lock.holder.is_some_and(|(lease, _)| lease == *id)
                    })
                );
                prop_assert!(
                    releases_locks || journaled <= bound.unwrap_or(0),
                    "step {}: {:?} journaled {} bytes, bound {:?}",
                    index, request, journaled, bound
                );
                let expected = model.apply(now_ms, request);
                prop_assert!(
                    same_response(&actual, &expected),
                    "step {} at now_ms={}: {:?}\n  actual: {:?}\nexpected: {:?}",
                    index, now_ms, request, actual, expected
                );
            } else {
                let reclaimed_count = tick(&mut shard, now_ms);
                prop_assert_eq!(reclaimed_count, model.tick(now_ms), "tick at step {}", index);
            }
            prop_assert_eq!(shard.revision(), model.revision, "revision after step {}", index);
            prop_assert_eq!(shard.key_count(), model.entries.len(), "keys after step {}", index);
            prop_assert_eq!(shard.timer_count(), model.timer_count(), "timers after step {}", index);
            prop_assert_eq!(shard.memory_bytes(), model.memory_bytes(), "bytes after step {}", index);
            let actual = apply(&mut shard, now_ms, &every_key);
            let expected = model.apply(now_ms, &every_key);
            prop_assert_eq!(actual, expected, "every key after step {}", index);
            prop_assert_eq!(shard.stats(), model.stats, "stats after step {}", index);
            let mut ended = shard.take_ended_leases();
            ended.sort_unstable();
            model.ended_leases.sort_unstable();
            prop_assert_eq!(&ended, &model.ended_leases, "ended leases after step {}", index);
            model.ended_leases.clear();
            prop_assert_eq!(shard.leases().home_count(), model.leases.len(), "leases after step {}", index);
            prop_assert_eq!(shard.leases().attached_count(), model.attached.len(), "attached keys after step {}", index);
            for key in (0..MODEL_KEY_COUNT).map(model_key) {
                prop_assert_eq!(shard.leases().lease_of(&key), model.attached.get(&key).copied(), "lease of {:?} after step {}", key, index);
            }
            for name in (0..MODEL_LOCK_COUNT).map(model_lock_name) {
                prop_assert_eq!(model_lock_of(&shard, &name), model.locks.get(&name).copied(), "lock {:?} after step {}", name, index);
            }
            prop_assert_eq!(shard.locks().waiter_count(), 0);
            prop_assert_eq!(shard.take_lock_events(), Vec::new(), "events after step {}", index);
            let is_delete_request = matches!(
                request,
                Some(Request::Delete(_) | Request::MultiDelete { .. } | Request::Txn(_))
            );
            let batches = shard.watch_hub().take(watcher, usize::MAX).unwrap().unwrap();
            for batch in batches {
                prop_assert!(batch.revision > last_revision, "revisions go forward");
                last_revision = batch.revision;
                for event in batch.events {
                    prop_assert_eq!(event.revision, batch.revision);
                    let before = shadow.get(event.key()).map(|(value, ..)| value.clone());
                    prop_assert_eq!(event.previous().map(<[u8]>::to_vec), before, "previous value at step {}", index);
                    match event.change {
                        Change::Put { create_revision, version } => {
                            let value = event.value().unwrap_or_default().to_vec();
                            shadow.insert(event.key().to_vec(), (value, create_revision, event.revision, version));
                        }
                        Change::Delete(cause) => {
                            prop_assert!(shadow.remove(event.key()).is_some());
                            // A lease's end removes its keys; a delete request removes live keys;
                            // anything else is expiry.
                            let deadline_passed = model_deadline_passed(&model_before, event.key(), now_ms);
                            let expected = match model.lease_removals.get(event.key()) {
                                Some(&(lease, expired)) => DeleteCause::LeaseEnded { lease, expired },
                                None if is_delete_request && !deadline_passed => DeleteCause::Deleted,
                                None => DeleteCause::Expired,
                            };
                            prop_assert_eq!(cause, expected, "cause at step {}", index);
                        }
                        Change::Left { .. } => prop_assert!(false, "left event without a query"),
                    }
                }
            }
            prop_assert_eq!(last_revision.max(shard.revision()), shard.revision());
            let stored: BTreeMap<Vec<u8>, (Vec<u8>, u64, u64, u64)> = model
                .entries
                .iter()
                .map(|(key, entry)| (key.clone(), (entry.value.clone(), entry.create_revision, entry.mod_revision, entry.version)))
                .collect();
            prop_assert_eq!(&shadow, &stored, "events rebuild the store after step {}", index);
            if index == snapshot_at {
                let spec = WatchSpec {
                    start: model_key(snapshot_start).into_boxed_slice(),
                    end: None,
                    puts: true,
                    deletes: true,
                    previous: false, query: None,
                };
                let (id, revision, items) = shard.watch_with_snapshot(now_ms, spec, 100).unwrap();
                prop_assert_eq!(revision, shard.revision());
                let live: KeyValues = items
                    .into_iter()
                    .map(|item| (item.key, item.entry.map(|entry| entry.value).unwrap_or_default()))
                    .collect();
                snapshot_watcher = Some((id, revision, live));
            }
            if let Some((id, revision, live)) = &mut snapshot_watcher {
                for batch in shard.watch_hub().take(*id, usize::MAX).unwrap().unwrap() {
                    prop_assert!(batch.revision > *revision, "only events after the snapshot");
                    *revision = batch.revision;
                    for event in batch.events {
                        match event.value() {
                            Some(value) => { live.insert(event.key().to_vec(), value.to_vec()); }
                            None => { live.remove(event.key()); }
                        }
                    }
                }
                // The snapshot and the events after it hold every live key of the range with
                // its value (and keys that expired since, until they are reclaimed).
                let expected: KeyValues = model
                    .entries
                    .iter()
                    .filter(|(key, entry)| key.as_slice() >= model_key(snapshot_start).as_slice() && !entry.is_expired(now_ms))
                    .map(|(key, entry)| (key.clone(), entry.value.clone()))
                    .collect();
                let seen: KeyValues = live
                    .iter()
                    .filter(|(key, _)| model.entries.get(*key).is_some_and(|entry| !entry.is_expired(now_ms)))
                    .map(|(key, value)| (key.clone(), value.clone()))
                    .collect();
                prop_assert_eq!(&seen, &expected, "snapshot and events after step {}", index);
                prop_assert!(live.keys().all(|key| model.entries.contains_key(key)), "a removed key is still seen");
            }
        }
        // The journal rebuilds the same shard: every key reads the same, and the revision
        // continues where it was.
        let journal = shard.journal_mut().map(RecordWriter::take).unwrap_or_default();
        let mut replayed = Shard::new(model_config(u64::MAX), start_ms);
        // Recovered leases start a full TTL at the recovering shard's monotonic time.
        let recovered_mono_ms = now_ms + 1_000;
        replayed.set_monotonic_ms(recovered_mono_ms);
        let mut offset = 0;
        while let ReadOutcome::Record(record, size) = read_record(&journal[offset..]) {
            replayed.replay(now_ms, &record).unwrap();
            offset += size;
        }
        prop_assert_eq!(offset, journal.len(), "every journaled byte is a record");
        prop_assert_eq!(replayed.revision(), shard.revision());
        prop_assert_eq!(
            apply(&mut replayed, now_ms, &every_key),
            apply(&mut shard, now_ms, &every_key),
            "the replayed shard"
        );
        // Every lease not ended comes back with a full TTL and the live keys attached to it.
        let ids: Vec<u64> = model.leases.keys().copied().collect();
        prop_assert_eq!(apply(&mut replayed, now_ms, &Request::LeaseList), lease_list(&ids));
        for (&id, &(ttl_ms, _)) in &model.leases {
            let mut expected = model.lease_state(now_ms, id);
            expected.ttl_ms = Some(ttl_ms);
            expected.remaining_ms = Some(ttl_ms);
            expected.keys.retain(|key| model.live(now_ms, key).is_some());
            prop_assert_eq!(
                apply(&mut replayed, now_ms, &lease_time_to_live(id)),
                Response::LeaseTimeToLive(expected),
                "lease {} replayed", id
            );
        }
        // Every lock comes back with its holder and last token.
        for name in (0..MODEL_LOCK_COUNT).map(model_lock_name) {
            prop_assert_eq!(model_lock_of(&replayed, &name), model.locks.get(&name).copied(), "lock {:?} replayed", name);
        }
        let live_attached = model
            .attached
            .keys()
            .filter(|key| model.live(now_ms, key).is_some())
            .count();
        prop_assert_eq!(replayed.leases().attached_count(), live_attached);
        // The sequence goes on where it was.
        let grant = apply(&mut replayed, now_ms, &lease_grant(1));
        if model.leases.len() < MODEL_LEASE_LIMITS.leases_max {
            prop_assert_eq!(grant, granted(home_lease(model.last_sequence + 1), 1));
        } else {
            prop_assert!(same_response(&grant, &error_reply(ErrorCode::TableFull)));
        }
    }
}

// Counters.

fn add(key: &str, delta: i64) -> Request {
    add_with(CounterAdd::new(key, delta))
}

fn add_with(add: CounterAdd) -> Request {
    Request::Add(Box::new(add))
}

fn counter(value: i64, mod_revision: u64) -> Response {
    Response::Counter {
        applied: true,
        value,
        mod_revision,
    }
}

fn out_of_range() -> Response {
    Response::Error(ErrorReply::new(ErrorCode::OutOfRange, ""))
}

/// A counter is a key holding decimal text: a missing key counts as 0, every add is one
/// revision, the TTL is kept, and a value that is not a counter or a sum that would overflow
/// is refused with `OutOfRange` and changes nothing.
#[test]
fn add_creates_counts_keeps_the_ttl_and_refuses_overflow() {
    let mut shard = new_shard();
    run(
        &mut shard,
        &[
            (1000, add("hits", 1), counter(1, 1), 1),
            (1000, add("hits", 41), counter(42, 2), 2),
            (1000, add("hits", -50), counter(-8, 3), 3),
            (1000, get("hits"), found(entry("-8", 3)), 3),
            (1000, put("text", "seven"), applied(4), 4),
            (1000, add("text", 1), out_of_range(), 4),
            (1000, get("text"), found(entry("seven", 4)), 4),
            (1000, put("big", &i64::MAX.to_string()), applied(5), 5),
            (1000, add("big", 1), out_of_range(), 5),
            (1000, add("big", -1), counter(i64::MAX - 1, 6), 6),
            (1000, put_ttl("window", "5", 100), applied(7), 7),
            (1050, add("window", 1), counter(6, 8), 8),
            (1050, get("window"), found(entry_until("6", 8, 1100)), 8),
            // Expired: the counter starts again from zero (the reclaim is a revision too).
            (1100, add("window", 1), counter(1, 10), 10),
            (1100, ttl("window"), persistent(), 10),
        ],
    );
    assert_eq!(shard.timer_count(), 0);
}

// Scans.

fn scan_page(shard: &mut Shard, now_ms: u64, scan: Scan) -> ScanPage {
    match apply(shard, now_ms, &Request::Scan(scan)) {
        Response::Scan(page) => page,
        other => panic!("scan answered {other:?}"),
    }
}

fn page_keys(page: &ScanPage) -> Vec<String> {
    page.items
        .iter()
        .map(|item| String::from_utf8(item.key.clone()).unwrap())
        .collect()
}

/// A page ends once it holds `SCAN_PAGE_BYTES_MAX` bytes of keys and values, whatever the
/// limit, and says there is more; keys-only pages count keys alone.
#[test]
fn a_scan_page_ends_at_its_byte_bound() {
    use tessera_protocol::limits::{SCAN_PAGE_BYTES_MAX, VALUE_SIZE_MAX};
    let mut shard = new_shard();
    let value = vec![b'v'; VALUE_SIZE_MAX];
    for index in 0..6 {
        let request = Request::Put(Box::new(Put::new(format!("big{index}"), value.clone())));
        assert!(matches!(
            apply(&mut shard, START_MS, &request),
            Response::Put { applied: true, .. }
        ));
    }
    let page = scan_page(&mut shard, START_MS, Scan::prefix(b"big", 100));
    let expected_count = SCAN_PAGE_BYTES_MAX.div_ceil(VALUE_SIZE_MAX + 4);
    assert_eq!(page_keys(&page).len(), expected_count);
    assert!(page.more);
    let keys_only = Scan {
        keys_only: true,
        ..Scan::prefix(b"big", 100)
    };
    let page = scan_page(&mut shard, START_MS, keys_only);
    assert_eq!(
        page_keys(&page),
        ["big0", "big1", "big2", "big3", "big4", "big5"]
    );
    assert!(!page.more);
    assert!(page.items.iter().all(|item| item.entry.is_none()));
}

/// Long keys (kept on the heap by the ordered index) and short ones scan in byte order, and
/// removing them, by delete or by expiry, leaves the index and the charge consistent.
#[test]
fn scans_follow_byte_order_through_writes_deletes_and_expiry() {
    let mut shard = new_shard();
    let long = |suffix: &str| format!("p/{}{suffix}", "x".repeat(40));
    for key in [long("b"), "p/a".to_owned(), long("a"), "p/c".to_owned()] {
        apply(&mut shard, START_MS, &put(&key, "1"));
    }
    apply(&mut shard, START_MS, &put_ttl("p/b", "short", 10));
    apply(&mut shard, START_MS, &put("q/outside", "1"));
    let everything = || Scan::prefix(b"p/", 100);
    let page = scan_page(&mut shard, START_MS, everything());
    assert_eq!(
        page_keys(&page),
        [
            "p/a".to_owned(),
            "p/b".to_owned(),
            "p/c".to_owned(),
            long("a"),
            long("b")
        ]
    );
    assert_eq!(page.revision, shard.revision());
    // Expired: gone from scans before its timer fires, and from the index once it has.
    let page = scan_page(&mut shard, START_MS + 10, everything());
    assert_eq!(page_keys(&page).len(), 4);
    assert_eq!(tick(&mut shard, START_MS + 10), 1);
    apply(&mut shard, START_MS + 10, &delete(&long("a")));
    let page = scan_page(&mut shard, START_MS + 10, everything());
    assert_eq!(
        page_keys(&page),
        ["p/a".to_owned(), "p/c".to_owned(), long("b")]
    );
    let count = Scan {
        count_only: true,
        ..everything()
    };
    let page = scan_page(&mut shard, START_MS + 10, count);
    assert_eq!((page.count, page.items.len()), (3, 0));
    // A range that ends before it starts is empty, not an error.
    let backwards = Scan::range("p/c", Some(b"p/a".to_vec()), 10);
    assert!(scan_page(&mut shard, START_MS + 10, backwards)
        .items
        .is_empty());
}

// Key revisions.

fn revisions_of(shard: &mut Shard, now_ms: u64, key: &str) -> Option<(u64, u64, u64)> {
    match apply(shard, now_ms, &get(key)) {
        Response::Value(entry) => {
            entry.map(|entry| (entry.create_revision, entry.mod_revision, entry.version))
        }
        other => panic!("get answered {other:?}"),
    }
}

/// A key's create revision is where it began to exist, its mod revision its last write, and
/// its version the writes since it was created (puts, adds, TTL changes, batch entries); a
/// key deleted or expired and written again starts over.
#[test]
fn revisions_count_writes_and_creation() {
    let mut shard = new_shard();
    let now = START_MS;
    apply(&mut shard, now, &put("k", "a"));
    assert_eq!(revisions_of(&mut shard, now, "k"), Some((1, 1, 1)));
    apply(&mut shard, now, &put("other", "x"));
    apply(&mut shard, now, &put("k", "b"));
    assert_eq!(revisions_of(&mut shard, now, "k"), Some((1, 3, 2)));
    apply(&mut shard, now, &expire("k", 1_000));
    apply(&mut shard, now, &persist("k"));
    // Persisting a key without a TTL changes nothing and counts nothing.
    apply(&mut shard, now, &persist("k"));
    assert_eq!(revisions_of(&mut shard, now, "k"), Some((1, 5, 4)));
    apply(&mut shard, now, &put_if("k", "c", IfAbsent));
    assert_eq!(revisions_of(&mut shard, now, "k"), Some((1, 5, 4)));
    apply(&mut shard, now, &delete("k"));
    assert_eq!(revisions_of(&mut shard, now, "k"), None);
    apply(&mut shard, now, &add("k", 5));
    assert_eq!(revisions_of(&mut shard, now, "k"), Some((7, 7, 1)));
    let batch = Request::MultiPut {
        entries: vec![
            PutEntry {
                key: b"k".to_vec(),
                value: b"1".to_vec(),
                ttl_ms: Some(10),
                fields: Vec::new(),
            },
            PutEntry {
                key: b"k".to_vec(),
                value: b"2".to_vec(),
                ttl_ms: Some(10),
                fields: Vec::new(),
            },
        ],
    };
    apply(&mut shard, now, &batch);
    assert_eq!(revisions_of(&mut shard, now, "k"), Some((7, 8, 3)));
    // Expired, then written again: a new key.
    apply(&mut shard, now + 10, &put("k", "again"));
    assert_eq!(revisions_of(&mut shard, now + 10, "k"), Some((10, 10, 1)));
}

/// A snapshot holds at most `keys_max` live keys of its range; a larger range is refused and
/// nothing is registered.
#[test]
fn a_snapshot_of_too_many_keys_is_refused() {
    let mut shard = new_shard();
    for index in 0..5 {
        apply(&mut shard, START_MS, &put(&format!("s/{index}"), "v"));
    }
    let spec = |start: &str| WatchSpec {
        start: Box::from(start.as_bytes()),
        end: Some(Box::from(&b"s0"[..])),
        puts: true,
        deletes: true,
        previous: false,
        query: None,
    };
    assert_eq!(
        shard
            .watch_with_snapshot(START_MS, spec("s/"), 4)
            .unwrap_err(),
        super::watch::WatchError::SnapshotTooLarge {
            keys_max: 4,
            bytes_max: tessera_protocol::limits::SCAN_PAGE_BYTES_MAX
        }
    );
    assert_eq!(shard.watch_hub().watcher_count(), 0);
    let (_, revision, items) = shard.watch_with_snapshot(START_MS, spec("s/1"), 4).unwrap();
    assert_eq!((revision, items.len()), (5, 4));
}

/// Compare-and-set: a put on a version or a value applies only while it still holds, and a
/// put that loses says the key's current version (and entry, when asked) so the caller needs
/// no second read.
#[test]
fn compare_and_set_by_version_and_by_value() {
    let mut shard = new_shard();
    let cas = |value: &str, condition: PutCondition| {
        Request::Put(Box::new(Put {
            condition,
            return_previous: true,
            ..Put::new("k", value)
        }))
    };
    let outcome = |response: Response| match response {
        Response::Put {
            applied,
            mod_revision,
            version,
            previous,
        } => (
            applied,
            mod_revision,
            version,
            previous.map(|entry| String::from_utf8(entry.value).unwrap()),
        ),
        other => panic!("unexpected {other:?}"),
    };
    let steps = [
        // Version 0 is "absent": the first writer wins, a second one loses.
        (cas("1", IfVersion(0)), (true, 1, 1, None)),
        (cas("x", IfVersion(0)), (false, 1, 1, Some("1"))),
        (cas("2", IfVersion(1)), (true, 2, 2, Some("1"))),
        (cas("x", IfVersion(1)), (false, 2, 2, Some("2"))),
        (cas("x", IfValue(b"1".to_vec())), (false, 2, 2, Some("2"))),
        (cas("3", IfValue(b"2".to_vec())), (true, 3, 3, Some("2"))),
    ];
    for (index, (request, expected)) in steps.into_iter().enumerate() {
        let expected = (
            expected.0,
            expected.1,
            expected.2,
            expected.3.map(str::to_owned),
        );
        assert_eq!(
            outcome(apply(&mut shard, 1000, &request)),
            expected,
            "step {index}"
        );
    }
    assert_eq!(shard.revision(), 3, "a lost compare-and-set writes nothing");
    // On a missing key a value never matches, and version 0 does.
    assert!(
        apply(&mut shard, 1000, &delete("k"))
            == Response::Delete {
                deleted: true,
                version: 0,
                previous: None
            }
    );
    assert_eq!(
        outcome(apply(&mut shard, 1000, &cas("4", IfValue(b"3".to_vec())))),
        (false, 0, 0, None)
    );
    assert_eq!(
        outcome(apply(&mut shard, 1000, &cas("4", IfVersion(0)))),
        (true, 5, 1, None)
    );
}

// Conditional deletes.

fn delete_reply(deleted: bool, version: u64, previous: Option<Entry>) -> Response {
    Response::Delete {
        deleted,
        version,
        previous,
    }
}

/// A delete on a version or a value removes the key only while it still holds; one that
/// loses writes nothing and says the key's current version (and entry, when asked), so the
/// caller needs no second read. A missing key is never deleted, whatever the condition.
#[test]
fn conditional_delete_by_version_and_by_value() {
    use DeleteCondition::{IfValue as DeleteIfValue, IfVersion as DeleteIfVersion};
    run(
        &mut new_shard(),
        &[
            (1000, put("k", "1"), applied(1), 1),
            (1000, put("k", "2"), applied(2), 2),
            // Lost on the version: the current version is 2, and the entry comes back.
            (
                1000,
                delete_if("k", DeleteIfVersion(1), true),
                delete_reply(false, 2, Some(entry("2", 2))),
                2,
            ),
            // Lost on the value, without the entry.
            (
                1000,
                delete_if("k", DeleteIfValue(b"1".to_vec()), false),
                delete_reply(false, 2, None),
                2,
            ),
            (1000, get("k"), found(entry("2", 2)), 2),
            // Won on the value: the removed entry comes back and the version is 0.
            (
                1000,
                delete_if("k", DeleteIfValue(b"2".to_vec()), true),
                delete_reply(true, 0, Some(entry("2", 2))),
                3,
            ),
            (1000, get("k"), not_found(), 3),
            // Missing: nothing to delete, even for version 0 or an empty value.
            (
                1000,
                delete_if("k", DeleteIfVersion(0), true),
                deleted(false),
                3,
            ),
            (
                1000,
                delete_if("k", DeleteIfValue(Vec::new()), true),
                deleted(false),
                3,
            ),
            // Created again, the key starts over at version 1: won on the version.
            (1000, put("k", "3"), applied(4), 4),
            (
                1000,
                delete_if("k", DeleteIfVersion(1), false),
                deleted(true),
                5,
            ),
            // An expired key is missing: reclaimed (a revision of its own), never matched.
            (1000, put_ttl("e", "v", 100), applied(6), 6),
            (
                1100,
                delete_if("e", DeleteIfValue(b"v".to_vec()), true),
                deleted(false),
                7,
            ),
        ],
    );
}

// Counter options.

fn add_bounded(key: &str, delta: i64, min: Option<i64>, max: Option<i64>) -> Request {
    add_with(CounterAdd {
        min,
        max,
        ..CounterAdd::new(key, delta)
    })
}

fn add_if_exists(key: &str, delta: i64) -> Request {
    add_with(CounterAdd {
        create: false,
        ..CounterAdd::new(key, delta)
    })
}

fn add_window(key: &str, delta: i64, ttl_ms: u64, refresh_ttl: bool) -> Request {
    add_with(CounterAdd {
        ttl_ms: Some(ttl_ms),
        refresh_ttl,
        ..CounterAdd::new(key, delta)
    })
}

/// The answer to an add that found no counter and did not create one.
fn not_counted() -> Response {
    Response::Counter {
        applied: false,
        value: 0,
        mod_revision: 0,
    }
}

/// A bounded add that would leave `min..=max` is refused with `OutOfRange` and applies
/// nothing: the value, the revision and a missing key stay as they were. Landing exactly on
/// a bound is allowed.
#[test]
fn counter_bounds_refuse_and_apply_nothing() {
    let mut shard = new_shard();
    run(
        &mut shard,
        &[
            (1000, add_bounded("c", 5, None, Some(10)), counter(5, 1), 1),
            (1000, add_bounded("c", 6, None, Some(10)), out_of_range(), 1),
            (1000, get("c"), found(entry("5", 1)), 1),
            (1000, add_bounded("c", 5, None, Some(10)), counter(10, 2), 2),
            (
                1000,
                add_bounded("c", -11, Some(0), None),
                out_of_range(),
                2,
            ),
            (
                1000,
                add_bounded("c", -10, Some(0), Some(0)),
                counter(0, 3),
                3,
            ),
            (1000, get("c"), found(entry("0", 3)), 3),
            // A counter the add would create is bounded too: 0 + 0 is below 1.
            (
                1000,
                add_bounded("new", 0, Some(1), None),
                out_of_range(),
                3,
            ),
            (1000, get("new"), not_found(), 3),
            // Overflow is refused whatever the bounds.
            (1000, put("big", &i64::MAX.to_string()), applied(4), 4),
            (
                1000,
                add_bounded("big", 1, Some(i64::MIN), Some(i64::MAX)),
                out_of_range(),
                4,
            ),
            (1000, get("big"), found(entry(&i64::MAX.to_string(), 4)), 4),
        ],
    );
    assert_eq!(shard.key_count(), 2);
}

/// Without `create`, an add to a missing or expired counter applies nothing and answers
/// `applied: false` (the reclaim of an expired one is still a revision); an existing counter
/// is added to as usual.
#[test]
fn counter_add_without_create_needs_the_counter() {
    let mut shard = new_shard();
    let add_if_exists_with_ttl = add_with(CounterAdd {
        create: false,
        ttl_ms: Some(100),
        ..CounterAdd::new("c", 1)
    });
    run(
        &mut shard,
        &[
            (1000, add_if_exists("c", 1), not_counted(), 0),
            (1000, add_if_exists_with_ttl, not_counted(), 0),
            (1000, get("c"), not_found(), 0),
            (1000, add("c", 1), counter(1, 1), 1),
            (1000, add_if_exists("c", 2), counter(3, 2), 2),
            (1000, put_ttl("t", "5", 100), applied(3), 3),
            (1050, add_if_exists("t", 1), counter(6, 4), 4),
            (1100, add_if_exists("t", 1), not_counted(), 5),
            (1100, get("t"), not_found(), 5),
            // Still a counter's rules: text is refused.
            (1100, put("text", "x"), applied(6), 6),
            (1100, add_if_exists("text", 1), out_of_range(), 6),
        ],
    );
    assert_eq!(shard.timer_count(), 0);
}

/// A counter's TTL is a fixed window: set by the add that creates it, kept by later adds
/// (with or without a TTL of their own), and restarted only by `refresh_ttl`. Once the window
/// passes, the next add starts a new counter and a new window.
#[test]
fn counter_ttl_is_a_fixed_window_unless_refreshed() {
    let mut shard = new_shard();
    run(
        &mut shard,
        &[
            (1000, add_window("w", 1, 100, false), counter(1, 1), 1),
            (1000, ttl("w"), expiring(100, 1100), 1),
            (1050, add_window("w", 1, 100, false), counter(2, 2), 2),
            (1050, ttl("w"), expiring(50, 1100), 2),
            (1060, add("w", 1), counter(3, 3), 3),
            (1060, get("w"), found(entry_until("3", 3, 1100)), 3),
            (1070, add_window("w", 1, 100, true), counter(4, 4), 4),
            (1070, ttl("w"), expiring(100, 1170), 4),
            (1169, add_window("w", 1, 500, false), counter(5, 5), 5),
            (1169, ttl("w"), expiring(1, 1170), 5),
            // The window passed: reclaimed (revision 6), then created afresh at 7.
            (1170, get("w"), not_found(), 5),
            (1170, add_window("w", 1, 100, false), counter(1, 7), 7),
            (1170, ttl("w"), expiring(100, 1270), 7),
            // A counter created without a TTL keeps none, unless an add refreshes it.
            (1170, add("p", 1), counter(1, 8), 8),
            (1170, add_window("p", 1, 100, false), counter(2, 9), 9),
            (1170, ttl("p"), persistent(), 9),
            (1170, add_window("p", 1, 100, true), counter(3, 10), 10),
            (1170, ttl("p"), expiring(100, 1270), 10),
        ],
    );
    assert_eq!(shard.timer_count(), 2);
    assert_eq!(tick(&mut shard, 1270), 2);
    assert_eq!(shard.revision(), 12);
}

// Transactions.

fn txn(compares: Vec<Compare>, success: Vec<TxnOp>, failure: Vec<TxnOp>) -> Request {
    Request::Txn(Box::new(Txn {
        compares,
        success,
        failure,
    }))
}

fn compare(key: &str, check: Check) -> Compare {
    Compare {
        key: key.into(),
        check,
    }
}

fn op_get(key: &str) -> TxnOp {
    TxnOp::Get { key: key.into() }
}

fn op_put(key: &str, value: &str) -> TxnOp {
    TxnOp::Put {
        key: key.into(),
        value: value.into(),
        ttl_ms: None,
        keep_ttl: false,
        return_previous: false,
        lease: None,
        fields: Vec::new(),
    }
}

fn op_put_returning(key: &str, value: &str) -> TxnOp {
    TxnOp::Put {
        key: key.into(),
        value: value.into(),
        ttl_ms: None,
        keep_ttl: false,
        return_previous: true,
        lease: None,
        fields: Vec::new(),
    }
}

fn op_delete(key: &str, return_previous: bool) -> TxnOp {
    TxnOp::Delete {
        key: key.into(),
        return_previous,
    }
}

fn op_add(key: &str, delta: i64) -> TxnOp {
    TxnOp::Add(CounterAdd::new(key, delta))
}

fn outcome(succeeded: bool, revision: u64, results: Vec<TxnResult>) -> Response {
    Response::Txn(TxnOutcome {
        succeeded,
        revision,
        results,
    })
}

/// A put's result in a table (versions cleared, as in `without_create_and_version`).
fn put_result(previous: Option<Entry>) -> TxnResult {
    TxnResult::Put {
        version: 0,
        previous,
    }
}

fn too_large() -> Response {
    Response::Error(ErrorReply::new(ErrorCode::TooLarge, ""))
}

/// If every compare holds (none holds too), the success ops run, else the failure ops, in
/// order, and the outcome says which.
#[test]
fn txn_runs_the_success_or_the_failure_branch() {
    use CompareOp::{Equal, Greater, Less};
    // Claims `lock` for the one that finds it absent; a later one reads who holds it.
    let claim = |owner: &str| {
        txn(
            vec![compare("lock", Check::Absent)],
            vec![op_put("lock", owner), op_add("claims", 1)],
            vec![op_get("lock")],
        )
    };
    run(
        &mut new_shard(),
        &[
            (
                1000,
                claim("a"),
                outcome(
                    true,
                    1,
                    vec![
                        put_result(None),
                        TxnResult::Add {
                            applied: true,
                            value: 1,
                        },
                    ],
                ),
                1,
            ),
            (
                1000,
                claim("b"),
                outcome(false, 1, vec![TxnResult::Get(Some(entry("a", 1)))]),
                1,
            ),
            // Every compare must hold: one that fails runs the failure branch.
            (
                1000,
                txn(
                    vec![
                        compare("lock", Check::Value(Equal, b"a".to_vec())),
                        compare("lock", Check::ModRevision(Greater, 1)),
                    ],
                    vec![op_delete("lock", true)],
                    vec![op_put_returning("lock", "c")],
                ),
                outcome(false, 2, vec![put_result(Some(entry("a", 1)))]),
                2,
            ),
            (
                1000,
                txn(
                    vec![
                        compare("lock", Check::Value(Equal, b"c".to_vec())),
                        compare("lock", Check::Version(Equal, 2)),
                        compare("lock", Check::CreateRevision(Less, 2)),
                        compare("claims", Check::Exists),
                    ],
                    vec![op_delete("lock", true)],
                    vec![],
                ),
                outcome(
                    true,
                    3,
                    vec![TxnResult::Delete {
                        deleted: true,
                        previous: Some(entry("c", 2)),
                    }],
                ),
                3,
            ),
            // No compares: success.
            (
                1000,
                txn(vec![], vec![op_get("lock")], vec![op_put("never", "x")]),
                outcome(true, 3, vec![TxnResult::Get(None)]),
                3,
            ),
            (1000, get("never"), not_found(), 3),
        ],
    );
}

/// A missing key (or an expired one) has version, create revision and mod revision 0, and
/// fails every value check, `NotEqual` included.
#[test]
fn txn_compares_see_a_missing_key_as_zero_and_valueless() {
    use CompareOp::{Equal, GreaterOrEqual, Less, NotEqual};
    let holds = |check: Check| txn(vec![compare("k", check)], vec![op_get("other")], vec![]);
    let held = || outcome(true, 0, vec![TxnResult::Get(None)]);
    let failed = || outcome(false, 0, vec![]);
    run(
        &mut new_shard(),
        &[
            (1000, holds(Check::Absent), held(), 0),
            (1000, holds(Check::Exists), failed(), 0),
            (1000, holds(Check::Version(Equal, 0)), held(), 0),
            (1000, holds(Check::CreateRevision(Equal, 0)), held(), 0),
            (1000, holds(Check::ModRevision(Less, 1)), held(), 0),
            (
                1000,
                holds(Check::Value(NotEqual, b"x".to_vec())),
                failed(),
                0,
            ),
            (1000, holds(Check::Value(Equal, Vec::new())), failed(), 0),
            (
                1000,
                holds(Check::Value(GreaterOrEqual, Vec::new())),
                failed(),
                0,
            ),
        ],
    );
}

/// A transaction's writes (puts, deletes, adds) all take one new revision and reach a
/// watcher as one batch at that revision, in op order; reads in the same branch need none.
#[test]
#[allow(clippy::too_many_lines, reason = "one scenario, step by step")]
fn txn_writes_share_one_revision_and_one_watch_batch() {
    let mut shard = new_shard();
    run(
        &mut shard,
        &[
            (1000, put("a", "1"), applied(1), 1),
            (1000, put("d", "old"), applied(2), 2),
            (1000, add("n", 5), counter(5, 3), 3),
        ],
    );
    let everything = WatchSpec {
        start: Box::from(&b""[..]),
        end: None,
        puts: true,
        deletes: true,
        previous: true,
        query: None,
    };
    let watcher = shard.watch_hub().watch(everything, Start::Now).unwrap();
    run(
        &mut shard,
        &[
            (
                1000,
                txn(
                    vec![],
                    vec![
                        op_put("a", "2"),
                        op_get("x"),
                        op_delete("d", false),
                        op_add("n", 1),
                        op_put("new", "v"),
                        TxnOp::Range(Scan::range("a", None, 10)),
                    ],
                    vec![],
                ),
                outcome(
                    true,
                    4,
                    vec![
                        put_result(None),
                        TxnResult::Get(None),
                        TxnResult::Delete {
                            deleted: true,
                            previous: None,
                        },
                        TxnResult::Add {
                            applied: true,
                            value: 6,
                        },
                        put_result(None),
                        // Read at the transaction's revision, after the writes before it.
                        TxnResult::Range(model_page(
                            4,
                            vec![
                                ScanItem {
                                    key: b"a".to_vec(),
                                    entry: Some(entry("2", 4)),
                                },
                                ScanItem {
                                    key: b"n".to_vec(),
                                    entry: Some(entry("6", 4)),
                                },
                                ScanItem {
                                    key: b"new".to_vec(),
                                    entry: Some(entry("v", 4)),
                                },
                            ],
                            false,
                        )),
                    ],
                ),
                4,
            ),
            (
                1000,
                multi_get(&["a", "d", "n", "new"]),
                values(vec![
                    Some(entry("2", 4)),
                    None,
                    Some(entry("6", 4)),
                    Some(entry("v", 4)),
                ]),
                4,
            ),
        ],
    );
    let batches = shard
        .watch_hub()
        .take(watcher, usize::MAX)
        .unwrap()
        .unwrap();
    let expected = vec![super::watch::Batch {
        revision: 4,
        events: vec![
            super::watch::Event::put(4, b"a", b"2", 1, 2, Some(b"1")),
            super::watch::Event::delete(4, b"d", DeleteCause::Deleted, Some(b"old")),
            super::watch::Event::put(4, b"n", b"6", 3, 2, Some(b"5")),
            super::watch::Event::put(4, b"new", b"v", 4, 1, None),
        ],
    }];
    assert_eq!(batches, expected);
    assert_eq!(revisions_of(&mut shard, 1000, "new"), Some((4, 4, 1)));
}

/// A counter add that fails (not a counter, out of its bounds, overflow) fails the whole
/// transaction with its error, wherever it is in the branch: nothing of the branch applies,
/// no revision is taken and no watcher hears of it.
#[test]
fn a_failing_counter_add_in_a_txn_applies_nothing() {
    let mut shard = new_shard();
    run(
        &mut shard,
        &[
            (1000, put("text", "x"), applied(1), 1),
            (1000, put("a", "1"), applied(2), 2),
        ],
    );
    let watcher = shard
        .watch_hub()
        .watch(
            WatchSpec {
                start: Box::from(&b""[..]),
                end: None,
                puts: true,
                deletes: true,
                previous: false,
                query: None,
            },
            Start::Now,
        )
        .unwrap();
    let bounded = TxnOp::Add(CounterAdd {
        max: Some(0),
        ..CounterAdd::new("c", 1)
    });
    let overflow = TxnOp::Add(CounterAdd::new("a", i64::MAX));
    run(
        &mut shard,
        &[
            (
                1000,
                txn(
                    vec![],
                    vec![op_put("b", "x"), op_delete("a", false), op_add("text", 1)],
                    vec![],
                ),
                out_of_range(),
                2,
            ),
            (
                1000,
                txn(
                    vec![],
                    vec![op_add("a", 1), bounded, op_put("b", "x")],
                    vec![],
                ),
                out_of_range(),
                2,
            ),
            (
                1000,
                txn(
                    vec![compare("a", Check::Absent)],
                    vec![],
                    vec![op_put("b", "x"), overflow],
                ),
                out_of_range(),
                2,
            ),
            (
                1000,
                multi_get(&["a", "b", "c", "text"]),
                values(vec![Some(entry("1", 2)), None, None, Some(entry("x", 1))]),
                2,
            ),
        ],
    );
    assert!(shard
        .watch_hub()
        .take(watcher, usize::MAX)
        .unwrap()
        .unwrap()
        .is_empty());
}

/// Puts `VALUE_SIZE_MAX`-byte values under `keys`.
fn put_large_values(shard: &mut Shard, keys: &[String]) {
    use tessera_protocol::limits::VALUE_SIZE_MAX;
    for key in keys {
        let request = Request::Put(Box::new(Put::new(key.as_str(), vec![b'v'; VALUE_SIZE_MAX])));
        assert!(matches!(
            apply(shard, START_MS, &request),
            Response::Put { applied: true, .. }
        ));
    }
}

/// The entries a transaction's gets and previous entries return are bounded by
/// `TXN_READ_BYTES_MAX` together: a branch that would read more is refused `TooLarge` before
/// anything applies.
#[test]
fn txn_reads_over_the_bound_are_refused_too_large() {
    use tessera_protocol::limits::VALUE_SIZE_MAX;
    const _: () = assert!(4 * VALUE_SIZE_MAX >= TXN_READ_BYTES_MAX);
    const _: () = assert!(3 * (VALUE_SIZE_MAX + 2) < TXN_READ_BYTES_MAX);
    let mut shard = new_shard();
    let keys: Vec<String> = (0..4).map(|index| format!("g{index}")).collect();
    put_large_values(&mut shard, &keys);
    let gets: Vec<TxnOp> = keys.iter().map(|key| op_get(key)).collect();
    let revision = shard.revision();
    run(
        &mut shard,
        &[(
            START_MS,
            txn(vec![], gets.clone(), vec![]),
            too_large(),
            revision,
        )],
    );
    // Previous entries count as reads: a put that returns one, a delete that returns one.
    let writes = vec![
        op_get("g0"),
        op_put_returning("g1", "small"),
        op_delete("g2", true),
        op_put_returning("g3", "small"),
    ];
    run(
        &mut shard,
        &[
            (START_MS, txn(vec![], writes, vec![]), too_large(), revision),
            (START_MS, exists("g2"), is_present(true), revision),
        ],
    );
    // Three fit.
    let Response::Txn(outcome) = apply(
        &mut shard,
        START_MS,
        &txn(vec![], gets[..3].to_vec(), vec![]),
    ) else {
        panic!("three gets are within the bound");
    };
    assert_eq!(outcome.results.len(), 3);
    assert!(outcome
        .results
        .iter()
        .all(|result| matches!(result, TxnResult::Get(Some(entry)) if entry.value.len() == VALUE_SIZE_MAX)));
    assert_eq!(shard.revision(), revision);
}

fn range_keys(result: &TxnResult) -> (Vec<String>, bool) {
    match result {
        TxnResult::Range(page) => (page_keys(page), page.more),
        other => panic!("not a range: {other:?}"),
    }
}

/// A transaction's range ops share what its gets and previous entries leave of
/// `TXN_READ_BYTES_MAX` (whatever the order of the ops): a key that does not fit ends its page
/// with `more`, and a later range goes on with what is left.
#[test]
fn txn_range_ops_share_the_read_byte_budget() {
    use tessera_protocol::limits::VALUE_SIZE_MAX;
    // After one large get, two large items fit and a third does not.
    const _: () = assert!(2 * (VALUE_SIZE_MAX + 5) <= TXN_READ_BYTES_MAX - (VALUE_SIZE_MAX + 1));
    const _: () = assert!(3 * (VALUE_SIZE_MAX + 5) > TXN_READ_BYTES_MAX - (VALUE_SIZE_MAX + 1));
    let mut shard = new_shard();
    let keys: Vec<String> = (0..6).map(|index| format!("big/{index}")).collect();
    put_large_values(&mut shard, &keys);
    put_large_values(&mut shard, &["g".to_owned()]);
    let revision = shard.revision();
    let request = txn(
        vec![],
        vec![
            TxnOp::Range(Scan::prefix(b"big/", 100)),
            TxnOp::Range(Scan {
                keys_only: true,
                ..Scan::prefix(b"big/", 100)
            }),
            TxnOp::Range(Scan {
                count_only: true,
                ..Scan::prefix(b"big/", 100)
            }),
            op_get("g"),
        ],
        vec![],
    );
    let Response::Txn(outcome) = apply(&mut shard, START_MS, &request) else {
        panic!("the ranges are cut short, not refused");
    };
    assert_eq!(outcome.revision, revision);
    assert_eq!(
        range_keys(&outcome.results[0]),
        (vec!["big/0".to_owned(), "big/1".to_owned()], true)
    );
    // What is left holds every key without its value.
    assert_eq!(range_keys(&outcome.results[1]), (keys.clone(), false));
    // Counting reads no entry, and costs nothing.
    let TxnResult::Range(count) = &outcome.results[2] else {
        panic!("not a range");
    };
    assert_eq!((count.count, count.items.len(), count.more), (6, 0, false));
    assert!(matches!(&outcome.results[3], TxnResult::Get(Some(_))));
}

/// The range ops of a transaction return at most `TXN_RANGE_ITEMS_MAX` keys together.
#[test]
fn txn_range_ops_share_the_item_budget() {
    const KEY_COUNT: usize = TXN_RANGE_ITEMS_MAX + 5;
    const FIRST_COUNT: usize = TXN_RANGE_ITEMS_MAX / 2;
    let mut shard = new_shard();
    let keys: Vec<String> = (0..KEY_COUNT)
        .map(|index| format!("r/{index:06}"))
        .collect();
    for chunk in keys.chunks(tessera_protocol::limits::BATCH_COUNT_MAX) {
        let entries: Vec<(&str, &str, Option<u64>)> =
            chunk.iter().map(|key| (key.as_str(), "", None)).collect();
        apply(&mut shard, START_MS, &multi_put(&entries));
    }
    let limit = u32::try_from(TXN_RANGE_ITEMS_MAX).unwrap();
    let split = keys[FIRST_COUNT].clone().into_bytes();
    let request = txn(
        vec![],
        vec![
            TxnOp::Range(Scan::range("r/", Some(split.clone()), limit)),
            TxnOp::Range(Scan::range(split, None, limit)),
        ],
        vec![op_get("r/")],
    );
    let Response::Txn(outcome) = apply(&mut shard, START_MS, &request) else {
        panic!("the ranges are cut short, not refused");
    };
    let (first, first_more) = range_keys(&outcome.results[0]);
    let (second, second_more) = range_keys(&outcome.results[1]);
    assert_eq!((first.len(), first_more), (FIRST_COUNT, false));
    assert_eq!(
        (second.len(), second_more),
        (TXN_RANGE_ITEMS_MAX - FIRST_COUNT, true)
    );
    assert_eq!(second, keys[FIRST_COUNT..TXN_RANGE_ITEMS_MAX]);
}

/// A transaction whose branch writes nothing (reads, ranges, deletes of missing keys, adds
/// that do not create) takes no revision and answers the current one; reclaiming an expired
/// key it names is still a revision of its own, as for any write.
#[test]
fn a_txn_that_writes_nothing_takes_no_revision() {
    let mut shard = new_shard();
    let watcher = shard
        .watch_hub()
        .watch(
            WatchSpec {
                start: Box::from(&b""[..]),
                end: None,
                puts: true,
                deletes: true,
                previous: false,
                query: None,
            },
            Start::Now,
        )
        .unwrap();
    let read_only = txn(
        vec![compare("a", Check::Exists)],
        vec![
            op_get("a"),
            op_delete("missing", true),
            TxnOp::Add(CounterAdd {
                create: false,
                ..CounterAdd::new("counter", 1)
            }),
            TxnOp::Range(Scan {
                keys_only: true,
                ..Scan::prefix(b"", 10)
            }),
        ],
        vec![op_put("a", "never")],
    );
    run(
        &mut shard,
        &[
            (1000, put("a", "1"), applied(1), 1),
            (
                1000,
                read_only,
                outcome(
                    true,
                    1,
                    vec![
                        TxnResult::Get(Some(entry("1", 1))),
                        TxnResult::Delete {
                            deleted: false,
                            previous: None,
                        },
                        TxnResult::Add {
                            applied: false,
                            value: 0,
                        },
                        TxnResult::Range(model_page(
                            1,
                            vec![ScanItem {
                                key: b"a".to_vec(),
                                entry: None,
                            }],
                            false,
                        )),
                    ],
                ),
                1,
            ),
            // The branch that runs may be empty.
            (
                1000,
                txn(
                    vec![compare("a", Check::Absent)],
                    vec![op_put("a", "x")],
                    vec![],
                ),
                outcome(false, 1, vec![]),
                1,
            ),
            // e expired: reclaimed at 3, and the read-only transaction answers 3.
            (1000, put_ttl("e", "v", 100), applied(2), 2),
            (
                1100,
                txn(vec![], vec![op_get("e")], vec![]),
                outcome(true, 3, vec![TxnResult::Get(None)]),
                3,
            ),
        ],
    );
    let batches = shard
        .watch_hub()
        .take(watcher, usize::MAX)
        .unwrap()
        .unwrap();
    let revisions: Vec<u64> = batches.iter().map(|batch| batch.revision).collect();
    assert_eq!(revisions, [1, 2, 3], "the put, the put and the reclaim");
}

/// What a transaction's deletes free is room for its puts and adds, as it would be in separate
/// requests: on a full shard, moving a key (delete the old name, put the new) fits, while a
/// transaction that grows the store past its budget is refused whole. (Found by the model
/// test: the first version of `Shard::txn` charged the puts and adds against the budget
/// without crediting the deletes beside them, and refused the move with `StoreFull`.)
#[test]
fn a_txn_delete_makes_room_for_its_writes() {
    let memory_bytes_max = full_shard_budget();
    let mut shard = Shard::new(config(memory_bytes_max, EXPIRED_PER_TICK_MAX), START_MS);
    let rename = |from: &str, to: &str| {
        txn(
            vec![compare(from, Check::Exists)],
            vec![op_delete(from, false), op_put(to, "vvvv")],
            vec![],
        )
    };
    run(
        &mut shard,
        &[
            (1000, put("k1", "vvvv"), applied(1), 1),
            (1000, put("k2", "vvvv"), applied(2), 2),
            (1000, put("k3", "vvvv"), applied(3), 3),
            (1000, put("k4", "vvvv"), store_full(), 3),
            (
                1000,
                rename("k1", "k4"),
                outcome(
                    true,
                    4,
                    vec![
                        TxnResult::Delete {
                            deleted: true,
                            previous: None,
                        },
                        put_result(None),
                    ],
                ),
                4,
            ),
            // A delete and two new keys grow the store: refused, nothing applied.
            (
                1000,
                txn(
                    vec![],
                    vec![
                        op_delete("k2", false),
                        op_put("k5", "vvvv"),
                        op_put("k6", "v"),
                    ],
                    vec![],
                ),
                store_full(),
                4,
            ),
            (
                1000,
                multi_get(&["k1", "k2", "k4", "k5", "k6"]),
                values(vec![
                    None,
                    Some(entry("vvvv", 2)),
                    Some(entry("vvvv", 4)),
                    None,
                    None,
                ]),
                4,
            ),
        ],
    );
    assert_eq!(shard.memory_bytes(), memory_bytes_max);
    assert_eq!(shard.stats().refused_full_count, 2);
}

// Leases. Leases run on the monotonic clock the core sets (`set_monotonic_ms`); keys' TTLs on
// the wall clock (`now_ms`). These tests move the two independently, so a test that passes
// cannot be relying on one standing in for the other.

/// The monotonic time these tests start at: far from `START_MS`, so mixing up the clocks shows.
const MONO_START_MS: u64 = 50_000;

/// The id of this shard's `sequence`-th lease.
fn home_lease(sequence: u64) -> u64 {
    LeaseId::new(NODE_ID, SHARD_ID, sequence).unwrap().0
}

/// The `sequence`-th lease of another core of this node.
fn foreign_lease(sequence: u64) -> u64 {
    LeaseId::new(NODE_ID, SHARD_ID + 2, sequence).unwrap().0
}

fn lease_grant(ttl_ms: u64) -> Request {
    Request::LeaseGrant { ttl_ms }
}

fn lease_keepalive(ids: &[u64]) -> Request {
    Request::LeaseKeepalive { ids: ids.to_vec() }
}

fn lease_revoke(id: u64) -> Request {
    Request::LeaseRevoke { id }
}

fn lease_time_to_live(id: u64) -> Request {
    Request::LeaseTimeToLive { id }
}

fn put_leased(key: &str, value: &str, lease: u64) -> Request {
    Request::Put(Box::new(Put {
        lease: Some(lease),
        ..Put::new(key, value)
    }))
}

fn granted(id: u64, ttl_ms: u64) -> Response {
    Response::LeaseGranted { id, ttl_ms }
}

fn revoked(existed: bool) -> Response {
    Response::LeaseRevoked { existed }
}

fn kept_alive(ttls_ms: &[Option<u64>]) -> Response {
    Response::LeaseKeepalive {
        ttls_ms: ttls_ms.to_vec(),
    }
}

fn lease_list(ids: &[u64]) -> Response {
    Response::Leases { ids: ids.to_vec() }
}

fn error_reply(code: ErrorCode) -> Response {
    Response::Error(ErrorReply::new(code, ""))
}

/// What the shard says of lease `id`, at its current monotonic time.
fn lease_state(shard: &mut Shard, id: u64) -> LeaseState {
    match apply(shard, START_MS, &lease_time_to_live(id)) {
        Response::LeaseTimeToLive(state) => state,
        other => panic!("lease time to live answered {other:?}"),
    }
}

/// The keys of this shard attached to lease `id`, in key order.
fn lease_keys(shard: &mut Shard, id: u64) -> Vec<String> {
    let state = lease_state(shard, id);
    assert!(!state.more, "a test attaches few keys");
    state
        .keys
        .into_iter()
        .map(|key| String::from_utf8(key).unwrap())
        .collect()
}

/// A lease homed here that lives: its TTL and what is left of it.
fn live_home_lease(ttl_ms: u64, remaining_ms: u64, keys: &[&str]) -> LeaseState {
    LeaseState {
        is_home: true,
        ttl_ms: Some(ttl_ms),
        remaining_ms: Some(remaining_ms),
        keys: keys.iter().map(|key| key.as_bytes().to_vec()).collect(),
        more: false,
    }
}

/// What the core asks before applying `request`: the home core of its lease, if that must
/// be asked whether the lease lives.
fn lease_to_check(shard: &Shard, request: &Request) -> Option<u16> {
    let mut body = FrameBuffer::new();
    codec::encode_request_body(&mut body, request).expect("test request archives");
    shard.lease_to_check(codec::access_request(&body).expect("archived request validates"))
}

/// A watcher of every key, with previous values.
fn watch_everything(shard: &mut Shard) -> u64 {
    let everything = WatchSpec {
        start: Box::from(&b""[..]),
        end: None,
        puts: true,
        deletes: true,
        previous: true,
        query: None,
    };
    shard.watch_hub().watch(everything, Start::Now).unwrap()
}

fn take_batches(shard: &mut Shard, watcher: u64) -> Vec<super::watch::Batch> {
    shard
        .watch_hub()
        .take(watcher, usize::MAX)
        .unwrap()
        .unwrap()
}

fn lease_ended(revision: u64, key: &str, value: &str, lease: u64, expired: bool) -> Event {
    Event::delete(
        revision,
        key.as_bytes(),
        DeleteCause::LeaseEnded { lease, expired },
        Some(value.as_bytes()),
    )
}

fn leased_shard(lease_limits: LeaseLimits) -> Shard {
    let mut shard = Shard::with_journal(
        ShardConfig {
            lease_limits,
            ..config(MEMORY_BYTES_UNLIMITED, EXPIRED_PER_TICK_MAX)
        },
        START_MS,
    );
    shard.set_monotonic_ms(MONO_START_MS);
    shard
}

fn lease_shard() -> Shard {
    leased_shard(LeaseLimits::default())
}

fn lease_tick(shard: &mut Shard, mono_ms: u64) {
    shard.set_monotonic_ms(mono_ms);
    tick(shard, START_MS);
}

#[test]
fn lease_ids_name_the_home_node_and_core_and_never_repeat() {
    let mut shard = Shard::new(
        ShardConfig {
            node_id: 7,
            shard_id: 3,
            ..config(MEMORY_BYTES_UNLIMITED, EXPIRED_PER_TICK_MAX)
        },
        START_MS,
    );
    shard.set_monotonic_ms(MONO_START_MS);
    let mut ids = Vec::new();
    for sequence in 1..=3 {
        let Response::LeaseGranted { id, ttl_ms } = apply(&mut shard, START_MS, &lease_grant(500))
        else {
            panic!("grant refused");
        };
        assert_eq!(ttl_ms, 500);
        let lease = LeaseId(id);
        assert_eq!(
            (lease.node_id(), lease.core_id(), lease.sequence()),
            (7, 3, sequence)
        );
        // Each grant is a revision of its own (it is journaled).
        assert_eq!(shard.revision(), sequence);
        ids.push(id);
    }
    assert!(ids.windows(2).all(|pair| pair[0] < pair[1]), "{ids:?}");
    // Ending the newest lease does not free its sequence for the next grant.
    assert_eq!(
        apply(&mut shard, START_MS, &lease_revoke(ids[2])),
        revoked(true)
    );
    let Response::LeaseGranted { id, .. } = apply(&mut shard, START_MS, &lease_grant(500)) else {
        panic!("grant refused");
    };
    assert_eq!(LeaseId(id).sequence(), 4);
    assert_eq!(
        apply(&mut shard, START_MS, &Request::LeaseList),
        lease_list(&[ids[0], ids[1], id])
    );
}

#[test]
fn a_keepalive_restarts_the_ttl_and_takes_no_revision() {
    let mut shard = lease_shard();
    let lease = home_lease(1);
    run(
        &mut shard,
        &[(START_MS, lease_grant(100), granted(lease, 100), 1)],
    );
    assert_eq!(
        lease_state(&mut shard, lease),
        live_home_lease(100, 100, &[])
    );
    shard.set_monotonic_ms(MONO_START_MS + 60);
    assert_eq!(
        lease_state(&mut shard, lease),
        live_home_lease(100, 40, &[])
    );
    let journal_len = shard.journal_len();
    // The answer is per id, in request order: an unknown lease does not live.
    run(
        &mut shard,
        &[(
            START_MS,
            lease_keepalive(&[home_lease(9), lease, foreign_lease(1)]),
            kept_alive(&[None, Some(100), None]),
            1,
        )],
    );
    assert_eq!(
        shard.journal_len(),
        journal_len,
        "a keepalive is not journaled"
    );
    assert_eq!(
        lease_state(&mut shard, lease),
        live_home_lease(100, 100, &[])
    );
    // The old deadline (MONO_START_MS + 100) has passed; the new one has not.
    lease_tick(&mut shard, MONO_START_MS + 159);
    assert!(shard.take_ended_leases().is_empty());
    assert_eq!(lease_state(&mut shard, lease), live_home_lease(100, 1, &[]));
    lease_tick(&mut shard, MONO_START_MS + 160);
    assert_eq!(shard.take_ended_leases(), vec![(lease, true)]);
    run(
        &mut shard,
        &[(START_MS, lease_keepalive(&[lease]), kept_alive(&[None]), 2)],
    );
}

/// A lease lives while its deadline is ahead of the monotonic clock: at the deadline it no
/// longer does, even before a tick ends it, and the tick at the deadline deletes every key
/// attached to it at one revision.
#[test]
fn a_lease_expires_at_its_deadline_and_deletes_its_keys_at_one_revision() {
    let mut shard = lease_shard();
    let lease = home_lease(1);
    run(
        &mut shard,
        &[
            (START_MS, lease_grant(100), granted(lease, 100), 1),
            (START_MS, put_leased("b", "2", lease), applied(2), 2),
            (START_MS, put_leased("a", "1", lease), applied(3), 3),
            (START_MS, put("c", "3"), applied(4), 4),
        ],
    );
    let watcher = watch_everything(&mut shard);
    lease_tick(&mut shard, MONO_START_MS + 99);
    assert!(shard.take_ended_leases().is_empty());
    assert_eq!(shard.revision(), 4);
    assert_eq!(lease_keys(&mut shard, lease), ["a", "b"]);

    shard.set_monotonic_ms(MONO_START_MS + 100);
    // Not ticked yet, but no longer alive: it takes no new key and no keepalive.
    run(
        &mut shard,
        &[
            (
                START_MS,
                put_leased("d", "4", lease),
                error_reply(ErrorCode::LeaseNotFound),
                4,
            ),
            (START_MS, lease_keepalive(&[lease]), kept_alive(&[None]), 4),
        ],
    );
    assert_eq!(lease_state(&mut shard, lease).ttl_ms, None);
    tick(&mut shard, START_MS);
    assert_eq!(shard.revision(), 5, "one revision for the lease's end");
    assert_eq!(
        take_batches(&mut shard, watcher),
        vec![super::watch::Batch {
            revision: 5,
            events: vec![
                lease_ended(5, "a", "1", lease, true),
                lease_ended(5, "b", "2", lease, true),
            ],
        }]
    );
    assert_eq!(shard.take_ended_leases(), vec![(lease, true)]);
    assert!(shard.take_ended_leases().is_empty(), "taken once");
    run(
        &mut shard,
        &[
            (
                START_MS,
                multi_get(&["a", "b"]),
                values(vec![None, None]),
                5,
            ),
            (START_MS, get("c"), found(entry("3", 4)), 5),
            (START_MS, Request::LeaseList, lease_list(&[]), 5),
        ],
    );
    assert_eq!(
        lease_state(&mut shard, lease),
        LeaseState {
            is_home: true,
            ttl_ms: None,
            remaining_ms: None,
            keys: Vec::new(),
            more: false,
        }
    );
    // Lease expiry is not key expiry.
    assert_eq!(shard.stats().expired_count, 0);
}

#[test]
fn a_revoke_deletes_the_keys_at_one_revision_and_only_once() {
    let mut shard = lease_shard();
    let lease = home_lease(1);
    let empty = home_lease(2);
    run(
        &mut shard,
        &[
            (START_MS, lease_grant(1_000), granted(lease, 1_000), 1),
            (START_MS, lease_grant(1_000), granted(empty, 1_000), 2),
            (START_MS, put_leased("a", "1", lease), applied(3), 3),
            (START_MS, put_leased("b", "2", lease), applied(4), 4),
        ],
    );
    let watcher = watch_everything(&mut shard);
    run(
        &mut shard,
        &[
            (START_MS, lease_revoke(lease), revoked(true), 5),
            // Gone: a second revoke changes nothing, nor does revoking what never was.
            (START_MS, lease_revoke(lease), revoked(false), 5),
            (START_MS, lease_revoke(home_lease(9)), revoked(false), 5),
            (START_MS, lease_revoke(foreign_lease(1)), revoked(false), 5),
            // A lease with no keys still ends at a revision: its end is journaled.
            (START_MS, lease_revoke(empty), revoked(true), 6),
            (
                START_MS,
                multi_get(&["a", "b"]),
                values(vec![None, None]),
                6,
            ),
        ],
    );
    assert_eq!(
        take_batches(&mut shard, watcher),
        vec![super::watch::Batch {
            revision: 5,
            events: vec![
                lease_ended(5, "a", "1", lease, false),
                lease_ended(5, "b", "2", lease, false),
            ],
        }]
    );
    assert_eq!(
        shard.take_ended_leases(),
        vec![(lease, false), (empty, false)]
    );
    // A revoked lease does not expire later.
    lease_tick(&mut shard, MONO_START_MS + 5_000);
    assert!(shard.take_ended_leases().is_empty());
    assert_eq!(shard.revision(), 6);
}

/// A lease past its deadline but not yet ticked cannot be revoked: it is not alive, and the
/// tick ends it as expired (once).
#[test]
fn a_lease_past_its_deadline_ends_as_expired_not_revoked() {
    let mut shard = lease_shard();
    let lease = home_lease(1);
    run(
        &mut shard,
        &[
            (START_MS, lease_grant(10), granted(lease, 10), 1),
            (START_MS, put_leased("a", "1", lease), applied(2), 2),
        ],
    );
    shard.set_monotonic_ms(MONO_START_MS + 10);
    run(
        &mut shard,
        &[(START_MS, lease_revoke(lease), revoked(false), 2)],
    );
    assert!(shard.take_ended_leases().is_empty());
    tick(&mut shard, START_MS);
    assert_eq!(shard.take_ended_leases(), vec![(lease, true)]);
    run(&mut shard, &[(START_MS, get("a"), not_found(), 3)]);
}

#[test]
fn a_put_with_a_lease_that_does_not_live_is_refused_and_applies_nothing() {
    let mut shard = lease_shard();
    let revoked_lease = home_lease(1);
    let expired_lease = home_lease(2);
    let other_node = LeaseId::new(NODE_ID + 1, SHARD_ID, 1).unwrap().0;
    run(
        &mut shard,
        &[
            (
                START_MS,
                lease_grant(1_000),
                granted(revoked_lease, 1_000),
                1,
            ),
            (START_MS, lease_grant(10), granted(expired_lease, 10), 2),
            (START_MS, lease_revoke(revoked_lease), revoked(true), 3),
            (START_MS, put("k", "old"), applied(4), 4),
        ],
    );
    lease_tick(&mut shard, MONO_START_MS + 10);
    assert_eq!(shard.revision(), 5, "the expired lease ended");
    let journal_len = shard.journal_len();
    let refusals = [
        (home_lease(9), ErrorCode::LeaseNotFound),
        (revoked_lease, ErrorCode::LeaseNotFound),
        (expired_lease, ErrorCode::LeaseNotFound),
        // Not known to live: the core asks its home first (see the foreign lease tests).
        (foreign_lease(1), ErrorCode::LeaseNotFound),
        // A key can only be attached to a lease of its own node.
        (other_node, ErrorCode::InvalidArgument),
    ];
    for (lease, code) in refusals {
        for key in ["k", "new"] {
            run(
                &mut shard,
                &[(START_MS, put_leased(key, "v", lease), error_reply(code), 5)],
            );
        }
    }
    assert_eq!(shard.journal_len(), journal_len);
    run(
        &mut shard,
        &[(
            START_MS,
            multi_get(&["k", "new"]),
            values(vec![Some(entry("old", 4)), None]),
            5,
        )],
    );
    assert_eq!(
        lease_to_check(&shard, &put_leased("k", "v", other_node)),
        None
    );
    assert_eq!(shard.leases().attached_count(), 0);
}

#[test]
fn a_key_has_at_most_one_lease() {
    let mut shard = lease_shard();
    let first = home_lease(1);
    let second = home_lease(2);
    run(
        &mut shard,
        &[
            (START_MS, lease_grant(1_000), granted(first, 1_000), 1),
            (START_MS, lease_grant(1_000), granted(second, 1_000), 2),
            (START_MS, put_leased("k", "1", first), applied(3), 3),
            (START_MS, put_leased("j", "1", first), applied(4), 4),
        ],
    );
    assert_eq!(lease_keys(&mut shard, first), ["j", "k"]);
    assert_eq!(lease_keys(&mut shard, second), Vec::<String>::new());
    // A put that does not apply moves nothing.
    let refused = Request::Put(Box::new(Put {
        condition: IfAbsent,
        lease: Some(second),
        ..Put::new("k", "2")
    }));
    run(&mut shard, &[(START_MS, refused, not_applied(3), 4)]);
    assert_eq!(lease_keys(&mut shard, first), ["j", "k"]);
    run(
        &mut shard,
        &[(START_MS, put_leased("k", "2", second), applied(5), 5)],
    );
    assert_eq!(lease_keys(&mut shard, first), ["j"]);
    assert_eq!(lease_keys(&mut shard, second), ["k"]);
    // The key went with its new lease: ending the old one leaves it.
    run(
        &mut shard,
        &[
            (START_MS, lease_revoke(first), revoked(true), 6),
            (
                START_MS,
                multi_get(&["j", "k"]),
                values(vec![None, Some(entry("2", 5))]),
                6,
            ),
            (START_MS, lease_revoke(second), revoked(true), 7),
            (START_MS, get("k"), not_found(), 7),
        ],
    );
}

/// Every put-like write without a lease (a put, a batch entry, a transaction's put) leaves the
/// key attached to none, so the key outlives the lease.
#[test]
fn a_write_without_a_lease_detaches_the_key() {
    let mut shard = lease_shard();
    let lease = home_lease(1);
    run(
        &mut shard,
        &[
            (START_MS, lease_grant(100), granted(lease, 100), 1),
            (START_MS, put_leased("a", "1", lease), applied(2), 2),
            (START_MS, put_leased("b", "1", lease), applied(3), 3),
            (START_MS, put_leased("c", "1", lease), applied(4), 4),
            (START_MS, put_leased("d", "1", lease), applied(5), 5),
            (START_MS, put("a", "2"), applied(6), 6),
            (
                START_MS,
                multi_put(&[("b", "2", None)]),
                multi_put_versions(&[7]),
                7,
            ),
            (
                START_MS,
                txn(vec![], vec![op_put("c", "2")], vec![]),
                outcome(true, 8, vec![put_result(None)]),
                8,
            ),
        ],
    );
    assert_eq!(lease_keys(&mut shard, lease), ["d"]);
    lease_tick(&mut shard, MONO_START_MS + 100);
    assert_eq!(shard.take_ended_leases(), vec![(lease, true)]);
    run(
        &mut shard,
        &[(
            START_MS,
            multi_get(&["a", "b", "c", "d"]),
            values(vec![
                Some(entry("2", 6)),
                Some(entry("2", 7)),
                Some(entry("2", 8)),
                None,
            ]),
            9,
        )],
    );
}

/// Changing a key's value by a counter add, or its TTL, keeps its lease; the log says so too
/// (a replayed shard agrees).
#[test]
fn counter_adds_expire_and_persist_keep_the_lease() {
    let mut shard = lease_shard();
    let lease = home_lease(1);
    run(
        &mut shard,
        &[
            (START_MS, lease_grant(1_000), granted(lease, 1_000), 1),
            (START_MS, put_leased("n", "1", lease), applied(2), 2),
            (START_MS, put_leased("m", "1", lease), applied(3), 3),
            (START_MS, add("n", 1), counter(2, 4), 4),
            (
                START_MS,
                txn(vec![], vec![op_add("m", 5)], vec![]),
                outcome(
                    true,
                    5,
                    vec![TxnResult::Add {
                        applied: true,
                        value: 6,
                    }],
                ),
                5,
            ),
            (START_MS, expire("n", 60_000), expiry(true, 6), 6),
            (START_MS, persist("n"), expiry(true, 7), 7),
            (START_MS, expire("m", 60_000), expiry(true, 8), 8),
        ],
    );
    assert_eq!(lease_keys(&mut shard, lease), ["m", "n"]);
    let mut replayed = replay_journal(&mut shard, MONO_START_MS);
    assert_eq!(lease_keys(&mut replayed, lease), ["m", "n"]);
    run(
        &mut shard,
        &[
            (START_MS, lease_revoke(lease), revoked(true), 9),
            (
                START_MS,
                multi_get(&["m", "n"]),
                values(vec![None, None]),
                9,
            ),
        ],
    );
}

/// A key that stops existing (deleted, expired, deleted in a batch or a transaction) is no
/// longer attached; a later key of the same name is attached only if its own put says so.
#[test]
fn a_key_that_is_removed_leaves_its_lease() {
    let mut shard = lease_shard();
    let lease = home_lease(1);
    run(
        &mut shard,
        &[
            (START_MS, lease_grant(1_000), granted(lease, 1_000), 1),
            (START_MS, put_leased("a", "1", lease), applied(2), 2),
            (
                START_MS,
                Request::Put(Box::new(Put {
                    ttl_ms: Some(50),
                    lease: Some(lease),
                    ..Put::new("b", "1")
                })),
                applied(3),
                3,
            ),
            (START_MS, put_leased("c", "1", lease), applied(4), 4),
            (START_MS, put_leased("d", "1", lease), applied(5), 5),
            (START_MS, put_leased("e", "1", lease), applied(6), 6),
            (START_MS, delete("a"), deleted(true), 7),
        ],
    );
    assert_eq!(lease_keys(&mut shard, lease), ["b", "c", "d", "e"]);
    // The key's own TTL (wall clock) ends it before its lease does.
    assert_eq!(tick(&mut shard, START_MS + 50), 1);
    assert_eq!(lease_keys(&mut shard, lease), ["c", "d", "e"]);
    run(
        &mut shard,
        &[
            (
                START_MS + 50,
                multi_delete(&["c"]),
                multi_deleted(&[true]),
                9,
            ),
            (
                START_MS + 50,
                txn(vec![], vec![op_delete("d", false)], vec![]),
                outcome(
                    true,
                    10,
                    vec![TxnResult::Delete {
                        deleted: true,
                        previous: None,
                    }],
                ),
                10,
            ),
            (START_MS + 50, put("a", "again"), applied(11), 11),
            (START_MS + 50, add("c", 1), counter(1, 12), 12),
        ],
    );
    assert_eq!(lease_keys(&mut shard, lease), ["e"]);
    run(
        &mut shard,
        &[
            (START_MS + 50, lease_revoke(lease), revoked(true), 13),
            (
                START_MS + 50,
                multi_get(&["a", "c", "e"]),
                values(vec![Some(entry("again", 11)), Some(entry("1", 12)), None]),
                13,
            ),
        ],
    );
}

/// Both lease tables are bounded. A refusal is `TableFull` (retryable) and applies nothing;
/// re-attaching a key already attached takes no room.
#[test]
fn the_lease_tables_are_bounded() {
    let mut shard = leased_shard(LeaseLimits {
        leases_max: 2,
        attached_keys_max: 2,
    });
    let first = home_lease(1);
    let second = home_lease(2);
    let table_full = error_reply(ErrorCode::TableFull);
    assert!(ErrorCode::TableFull.is_retryable());
    run(
        &mut shard,
        &[
            (START_MS, lease_grant(1_000), granted(first, 1_000), 1),
            (START_MS, lease_grant(1_000), granted(second, 1_000), 2),
            (START_MS, lease_grant(1_000), table_full.clone(), 2),
            (START_MS, put_leased("a", "1", first), applied(3), 3),
            (START_MS, put_leased("b", "1", first), applied(4), 4),
            (
                START_MS,
                put_leased("c", "1", second),
                table_full.clone(),
                4,
            ),
            (START_MS, get("c"), not_found(), 4),
            // Already attached: moving or rewriting it takes no more room.
            (START_MS, put_leased("a", "2", second), applied(5), 5),
            (START_MS, put_leased("b", "2", first), applied(6), 6),
            // A key without a lease needs no room.
            (START_MS, put("c", "1"), applied(7), 7),
            (START_MS, lease_revoke(first), revoked(true), 8),
            (START_MS, put_leased("c", "2", second), applied(9), 9),
            (
                START_MS,
                lease_grant(1_000),
                granted(home_lease(3), 1_000),
                10,
            ),
        ],
    );
    assert_eq!(lease_keys(&mut shard, second), ["a", "c"]);
    assert_eq!(shard.leases().home_count(), 2);
    assert_eq!(shard.leases().attached_count(), 2);
}

/// A put attached to a lease homed on another core of the node: the core asks the home first
/// (`lease_to_check`, `begin_lease_check`, `end_lease_check`), then applies the put; once the
/// shard knows the lease lives it asks no more, until the home says the lease ended
/// (`lease_ended_elsewhere`), which deletes the shard's keys attached to it at one revision.
#[test]
fn a_lease_of_another_core_is_checked_with_its_home_and_ended_by_it() {
    let mut shard = lease_shard();
    let lease = foreign_lease(1);
    let put_a = put_leased("a", "1", lease);
    // Only a put attached to a lease of another core of this node needs a check.
    assert_eq!(lease_to_check(&shard, &put("a", "1")), None);
    assert_eq!(
        lease_to_check(&shard, &put_leased("a", "1", home_lease(1))),
        None
    );
    assert_eq!(lease_to_check(&shard, &lease_revoke(lease)), None);
    assert_eq!(lease_to_check(&shard, &put_a), Some(SHARD_ID + 2));

    // The home says it does not live: the put is refused.
    shard.begin_lease_check(lease);
    assert!(!shard.end_lease_check(lease, false));
    assert_eq!(lease_to_check(&shard, &put_a), Some(SHARD_ID + 2));

    shard.begin_lease_check(lease);
    assert!(shard.end_lease_check(lease, true));
    assert_eq!(lease_to_check(&shard, &put_a), None, "known to live");
    run(
        &mut shard,
        &[
            (START_MS, put_a, applied(1), 1),
            (START_MS, put_leased("b", "1", lease), applied(2), 2),
            (START_MS, put("c", "1"), applied(3), 3),
        ],
    );
    assert_eq!(
        lease_state(&mut shard, lease),
        LeaseState {
            is_home: false,
            ttl_ms: None,
            remaining_ms: None,
            keys: vec![b"a".to_vec(), b"b".to_vec()],
            more: false,
        }
    );
    // The home lease's table knows nothing of it.
    run(
        &mut shard,
        &[
            (START_MS, Request::LeaseList, lease_list(&[]), 3),
            (START_MS, lease_keepalive(&[lease]), kept_alive(&[None]), 3),
        ],
    );

    let watcher = watch_everything(&mut shard);
    shard.lease_ended_elsewhere(lease, true);
    shard.check_invariants();
    assert_eq!(shard.revision(), 4);
    assert_eq!(
        take_batches(&mut shard, watcher),
        vec![super::watch::Batch {
            revision: 4,
            events: vec![
                lease_ended(4, "a", "1", lease, true),
                lease_ended(4, "b", "1", lease, true),
            ],
        }]
    );
    // Only the home reports the end to the other cores.
    assert!(shard.take_ended_leases().is_empty());
    run(
        &mut shard,
        &[(
            START_MS,
            multi_get(&["a", "b", "c"]),
            values(vec![None, None, Some(entry("1", 3))]),
            4,
        )],
    );
    // Ended: it must be asked about again, and a put that is not is refused.
    let put_d = put_leased("d", "1", lease);
    assert_eq!(lease_to_check(&shard, &put_d), Some(SHARD_ID + 2));
    run(
        &mut shard,
        &[(START_MS, put_d, error_reply(ErrorCode::LeaseNotFound), 4)],
    );
    // The end of a lease this shard has no keys of takes no revision.
    shard.lease_ended_elsewhere(foreign_lease(2), false);
    shard.lease_ended_elsewhere(lease, false);
    assert_eq!(shard.revision(), 4);
}

/// The end of a lease can overtake the answer to a check: the home answered "alive", then
/// the lease ended and the end arrived first. The check must then come back unusable, or the
/// put would attach a key to a lease whose end this shard has already processed, and the key
/// would never be deleted.
#[test]
fn an_end_that_overtakes_a_check_refuses_the_put() {
    let mut shard = lease_shard();
    let lease = foreign_lease(1);
    let put_a = put_leased("a", "1", lease);
    assert_eq!(lease_to_check(&shard, &put_a), Some(SHARD_ID + 2));
    shard.begin_lease_check(lease);
    shard.lease_ended_elsewhere(lease, false);
    assert!(!shard.end_lease_check(lease, true));
    assert_eq!(lease_to_check(&shard, &put_a), Some(SHARD_ID + 2));
    run(
        &mut shard,
        &[(
            START_MS,
            put_a.clone(),
            error_reply(ErrorCode::LeaseNotFound),
            0,
        )],
    );
    // Two checks in flight when the end arrives: both come back unusable.
    shard.begin_lease_check(lease);
    shard.begin_lease_check(lease);
    shard.lease_ended_elsewhere(lease, true);
    assert!(!shard.end_lease_check(lease, true));
    assert!(!shard.end_lease_check(lease, true));
    // A check begun after the end is answered on its own merits.
    shard.begin_lease_check(lease);
    assert!(shard.end_lease_check(lease, true));
    run(&mut shard, &[(START_MS, put_a, applied(1), 1)]);
    shard.check_invariants();
}

#[test]
fn leases_are_listed_in_ascending_order() {
    let mut shard = lease_shard();
    let mut expected = Vec::new();
    for sequence in 1..=40 {
        run(
            &mut shard,
            &[(
                START_MS,
                lease_grant(1_000),
                granted(home_lease(sequence), 1_000),
                sequence,
            )],
        );
        expected.push(home_lease(sequence));
    }
    for sequence in [3, 17, 40] {
        apply(&mut shard, START_MS, &lease_revoke(home_lease(sequence)));
        expected.retain(|&id| id != home_lease(sequence));
    }
    assert_eq!(
        apply(&mut shard, START_MS, &Request::LeaseList),
        lease_list(&expected)
    );
}

/// Replays every record `shard` journaled into a fresh shard whose monotonic clock reads
/// `mono_ms`, at wall time `START_MS`.
fn replay_journal(shard: &mut Shard, mono_ms: u64) -> Shard {
    let journal = shard.journal_mut().map(RecordWriter::take).unwrap();
    let mut replayed = Shard::new(shard.config().clone(), START_MS);
    replayed.set_monotonic_ms(mono_ms);
    let mut offset = 0;
    while let ReadOutcome::Record(record, size) = read_record(&journal[offset..]) {
        replayed.replay(START_MS, &record).unwrap();
        offset += size;
    }
    assert_eq!(offset, journal.len(), "every journaled byte is a record");
    replayed.check_invariants();
    replayed
}

/// Recovery brings back the leases that had not ended, each with a full TTL from the new
/// shard's monotonic time (deadlines are not journaled), the keys attached to them, and the
/// sequence (ids are never reused). Keys attached to a lease of another core come back
/// attached to it, and it is taken to live until its home says otherwise.
#[test]
fn a_replayed_journal_brings_back_leases_and_attachments() {
    let mut shard = lease_shard();
    let (first, second, revoked_lease, expiring) =
        (home_lease(1), home_lease(2), home_lease(3), home_lease(4));
    let foreign = foreign_lease(1);
    shard.begin_lease_check(foreign);
    assert!(shard.end_lease_check(foreign, true));
    run(
        &mut shard,
        &[
            (START_MS, lease_grant(500), granted(first, 500), 1),
            (START_MS, lease_grant(800), granted(second, 800), 2),
            (START_MS, lease_grant(300), granted(revoked_lease, 300), 3),
            (START_MS, lease_grant(10), granted(expiring, 10), 4),
            (START_MS, put_leased("a", "1", first), applied(5), 5),
            (START_MS, put_leased("b", "1", first), applied(6), 6),
            (START_MS, put_leased("c", "1", second), applied(7), 7),
            (START_MS, put_leased("d", "1", revoked_lease), applied(8), 8),
            (START_MS, put_leased("f", "1", expiring), applied(9), 9),
            (START_MS, put_leased("g", "1", foreign), applied(10), 10),
            (START_MS, put("e", "1"), applied(11), 11),
            (START_MS, lease_revoke(revoked_lease), revoked(true), 12),
            // Moved to another lease, then detached.
            (START_MS, put_leased("b", "2", second), applied(13), 13),
            (START_MS, put_leased("e", "2", first), applied(14), 14),
            (START_MS, put("e", "3"), applied(15), 15),
        ],
    );
    lease_tick(&mut shard, MONO_START_MS + 10);
    assert_eq!(shard.revision(), 16, "the expiring lease ended");
    // Keepalives are not journaled: the replayed TTLs start over anyway.
    shard.set_monotonic_ms(MONO_START_MS + 200);
    apply(&mut shard, START_MS, &lease_keepalive(&[first]));

    let recovered_mono_ms = 7_000_000;
    let mut replayed = replay_journal(&mut shard, recovered_mono_ms);
    assert_eq!(replayed.revision(), 16);
    run(
        &mut replayed,
        &[
            (
                START_MS,
                Request::LeaseList,
                lease_list(&[first, second]),
                16,
            ),
            (
                START_MS,
                multi_get(&["a", "b", "c", "d", "e", "f", "g"]),
                values(vec![
                    Some(entry("1", 5)),
                    Some(entry("2", 13)),
                    Some(entry("1", 7)),
                    None,
                    Some(entry("3", 15)),
                    None,
                    Some(entry("1", 10)),
                ]),
                16,
            ),
        ],
    );
    assert_eq!(
        lease_state(&mut replayed, first),
        live_home_lease(500, 500, &["a"])
    );
    assert_eq!(
        lease_state(&mut replayed, second),
        live_home_lease(800, 800, &["b", "c"])
    );
    assert_eq!(lease_state(&mut replayed, revoked_lease).ttl_ms, None);
    assert_eq!(lease_state(&mut replayed, expiring).ttl_ms, None);
    assert_eq!(lease_keys(&mut replayed, foreign), ["g"]);
    assert_eq!(
        lease_keys(&mut replayed, home_lease(5)),
        Vec::<String>::new()
    );
    // Recovered attachments to a lease of another core count as known alive.
    assert_eq!(
        lease_to_check(&replayed, &put_leased("h", "1", foreign)),
        None
    );
    // The sequence continues after the last lease granted, ended or not.
    run(
        &mut replayed,
        &[(
            START_MS,
            lease_grant(10_000),
            granted(home_lease(5), 10_000),
            17,
        )],
    );
    // The recovered leases expire a full TTL after recovery.
    lease_tick(&mut replayed, recovered_mono_ms + 499);
    assert!(replayed.take_ended_leases().is_empty());
    lease_tick(&mut replayed, recovered_mono_ms + 500);
    assert_eq!(replayed.take_ended_leases(), vec![(first, true)]);
    replayed.lease_ended_elsewhere(foreign, true);
    run(
        &mut replayed,
        &[(
            START_MS,
            multi_get(&["a", "b", "c", "g"]),
            values(vec![None, Some(entry("2", 13)), Some(entry("1", 7)), None]),
            19,
        )],
    );
}

// Locks.
//
// A lock request reaches the shard through `Shard::lock` (the core sends it there, so it
// can wait), and these tests do the same, after archiving and checking it like any request.
// Tokens are revisions, so the tables below spell them out as revision numbers.

fn lock_request(name: &str, lease: u64, wait_ms: u32) -> Request {
    Request::Lock {
        name: name.into(),
        lease,
        wait_ms,
    }
}

fn unlock_request(name: &str, token: u64) -> Request {
    Request::Unlock {
        name: name.into(),
        token,
    }
}

fn locked(acquired: bool, token: u64) -> Response {
    Response::Locked { acquired, token }
}

fn unlocked(released: bool) -> Response {
    Response::Unlocked { released }
}

/// Archives and checks a lock request, then hands it to `Shard::lock`, as the core does.
fn lock_step_of(shard: &mut Shard, request: &Request) -> LockStep {
    let mut body = FrameBuffer::new();
    codec::encode_request_body(&mut body, request).expect("test request archives");
    let archived = codec::access_request(&body).expect("archived request validates");
    codec::check_request(archived).expect("test request is within the protocol's limits");
    let tessera_protocol::message::ArchivedRequest::Lock {
        name,
        lease,
        wait_ms,
    } = archived
    else {
        panic!("not a lock request: {request:?}");
    };
    let step = shard.lock(name, lease.to_native(), wait_ms.to_native());
    shard.check_invariants();
    step
}

/// Answers `request` as the core would: a lock through `Shard::lock` (none of the model's
/// waits), anything else through `Shard::apply`.
fn respond(shard: &mut Shard, now_ms: u64, request: &Request) -> Response {
    if !matches!(request, Request::Lock { .. }) {
        return apply(shard, now_ms, request);
    }
    match lock_step_of(shard, request) {
        LockStep::Done(response) => response,
        LockStep::Queued(waiter) => panic!("{request:?} waits as {waiter}"),
    }
}

/// A lock request answered at once.
fn lock_now(shard: &mut Shard, name: &str, lease: u64, wait_ms: u32) -> Response {
    match lock_step_of(shard, &lock_request(name, lease, wait_ms)) {
        LockStep::Done(response) => response,
        LockStep::Queued(waiter) => panic!("lock {name:?} for {lease} waits as {waiter}"),
    }
}

/// A lock request that waits in line; its waiter id.
fn lock_queued(shard: &mut Shard, name: &str, lease: u64, wait_ms: u32) -> u64 {
    match lock_step_of(shard, &lock_request(name, lease, wait_ms)) {
        LockStep::Queued(waiter) => waiter,
        LockStep::Done(response) => panic!("lock {name:?} for {lease} answered {response:?}"),
    }
}

fn unlock(shard: &mut Shard, name: &str, token: u64) -> Response {
    apply(shard, START_MS, &unlock_request(name, token))
}

/// The lease and token holding `name`.
fn lock_holder(shard: &Shard, name: &str) -> Option<(u64, u64)> {
    shard
        .locks()
        .holder(name.as_bytes())
        .map(|holder| (holder.lease, holder.token))
}

fn last_token(shard: &Shard, name: &str) -> u64 {
    shard.locks().last_token(name.as_bytes())
}

/// A transaction that puts `key` if `token` fences lock `lock`.
fn fenced_put(lock: &str, token: u64, key: &str, value: &str) -> Request {
    txn(
        vec![compare(lock, Check::Fence(token))],
        vec![op_put(key, value)],
        Vec::new(),
    )
}

/// The code of a refusal.
fn refusal(response: &Response) -> ErrorCode {
    match response {
        Response::Error(reply) => reply.code,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// Whether a transaction's compares held.
fn txn_succeeded(response: &Response) -> bool {
    match response {
        Response::Txn(outcome) => outcome.succeeded,
        other => panic!("a transaction answered {other:?}"),
    }
}

fn locked_shard(lock_limits: LockLimits) -> Shard {
    let mut shard = Shard::with_journal(
        ShardConfig {
            lock_limits,
            ..config(MEMORY_BYTES_UNLIMITED, EXPIRED_PER_TICK_MAX)
        },
        START_MS,
    );
    shard.set_monotonic_ms(MONO_START_MS);
    shard
}

fn lock_shard() -> Shard {
    locked_shard(LockLimits::default())
}

/// Grants `count` home leases of `ttl_ms`, one revision each; their ids.
fn grant_leases(shard: &mut Shard, count: u64, ttl_ms: u64) -> Vec<u64> {
    (0..count)
        .map(|_| match apply(shard, START_MS, &lease_grant(ttl_ms)) {
            Response::LeaseGranted { id, .. } => id,
            other => panic!("grant answered {other:?}"),
        })
        .collect()
}

/// A free lock is granted at a new revision, whose number is the token, so tokens grow with
/// every grant of every lock. The holder asking again gets its own token back, and another
/// lease that will not wait gets the holder's, neither taking a revision.
#[test]
fn lock_tokens_are_grant_revisions_that_grow() {
    let mut shard = lock_shard();
    let leases = grant_leases(&mut shard, 2, 10_000);
    let (first, second) = (leases[0], leases[1]);
    assert_eq!(lock_now(&mut shard, "a", first, 0), locked(true, 3));
    assert_eq!(shard.revision(), 3);
    assert_eq!(lock_holder(&shard, "a"), Some((first, 3)));
    run(&mut shard, &[(START_MS, put("k", "v"), applied(4), 4)]);
    assert_eq!(lock_now(&mut shard, "b", second, 0), locked(true, 5));
    assert_eq!(shard.revision(), 5);

    let journal_len = shard.journal_len();
    // The holder again (waiting or not): its own token, no revision.
    assert_eq!(lock_now(&mut shard, "a", first, 0), locked(true, 3));
    assert_eq!(lock_now(&mut shard, "a", first, 5_000), locked(true, 3));
    // Another lease that will not wait: refused with the holder's token.
    assert_eq!(lock_now(&mut shard, "a", second, 0), locked(false, 3));
    assert_eq!(lock_now(&mut shard, "b", first, 0), locked(false, 5));
    assert_eq!(shard.revision(), 5);
    assert_eq!(shard.journal_len(), journal_len, "nothing was journaled");
    assert_eq!(shard.locks().waiter_count(), 0);

    // Released and granted again: a new, larger token.
    assert_eq!(unlock(&mut shard, "a", 3), unlocked(true));
    assert_eq!(shard.revision(), 6);
    assert_eq!(lock_now(&mut shard, "a", second, 0), locked(true, 7));
    assert_eq!(lock_holder(&shard, "a"), Some((second, 7)));
    assert_eq!(last_token(&shard, "a"), 7);
    assert!(shard.take_lock_events().is_empty());
}

/// An unlock is a compare-and-delete: only the holder's token releases the lock, and any other
/// changes nothing, takes no revision and journals nothing.
#[test]
fn an_unlock_with_a_wrong_token_is_refused_and_changes_nothing() {
    let mut shard = lock_shard();
    let lease = grant_leases(&mut shard, 1, 10_000)[0];
    assert_eq!(lock_now(&mut shard, "a", lease, 0), locked(true, 2));
    let journal_len = shard.journal_len();
    for token in [0, 1, 3, u64::MAX] {
        assert_eq!(
            unlock(&mut shard, "a", token),
            unlocked(false),
            "token {token}"
        );
    }
    assert_eq!(unlock(&mut shard, "never", 2), unlocked(false));
    assert_eq!(shard.revision(), 2);
    assert_eq!(shard.journal_len(), journal_len);
    assert_eq!(lock_holder(&shard, "a"), Some((lease, 2)));

    assert_eq!(unlock(&mut shard, "a", 2), unlocked(true));
    assert_eq!(shard.revision(), 3);
    assert_eq!(lock_holder(&shard, "a"), None);
    assert_eq!(
        last_token(&shard, "a"),
        2,
        "a released lock keeps its last token"
    );
    // Released already.
    assert_eq!(unlock(&mut shard, "a", 2), unlocked(false));
    assert_eq!(shard.revision(), 3);
    // The token of an earlier grant does not release a later one, even for the same lease.
    assert_eq!(lock_now(&mut shard, "a", lease, 0), locked(true, 4));
    assert_eq!(unlock(&mut shard, "a", 2), unlocked(false));
    assert_eq!(lock_holder(&shard, "a"), Some((lease, 4)));
    assert_eq!(shard.revision(), 4);
}

/// Waiters are served first come, first served (not by lease id): each release takes a
/// revision and the next waiter's grant the one after it, whose number is its token.
#[test]
fn waiters_are_granted_in_the_order_they_queued() {
    let mut shard = lock_shard();
    let leases = grant_leases(&mut shard, 4, 10_000);
    let holder = leases[0];
    assert_eq!(lock_now(&mut shard, "a", holder, 0), locked(true, 5));
    let waiters = [
        lock_queued(&mut shard, "a", leases[3], 5_000),
        lock_queued(&mut shard, "a", leases[1], 5_000),
        lock_queued(&mut shard, "a", leases[2], 5_000),
    ];
    assert!(waiters.windows(2).all(|pair| pair[0] != pair[1]));
    assert_eq!(shard.revision(), 5, "a wait takes no revision");
    assert_eq!(shard.locks().waiter_count(), 3);
    assert!(shard.take_lock_events().is_empty());

    let mut token = 5;
    for (waiter, lease) in waiters.into_iter().zip([leases[3], leases[1], leases[2]]) {
        assert_eq!(unlock(&mut shard, "a", token), unlocked(true));
        let granted_token = token + 2;
        assert_eq!(shard.revision(), granted_token);
        assert_eq!(
            shard.take_lock_events(),
            vec![LockEvent::Granted {
                waiter,
                token: granted_token,
            }]
        );
        assert_eq!(lock_holder(&shard, "a"), Some((lease, granted_token)));
        token = granted_token;
    }
    assert_eq!(shard.locks().waiter_count(), 0);
    assert_eq!(unlock(&mut shard, "a", token), unlocked(true));
    assert_eq!(shard.revision(), token + 1);
    assert!(shard.take_lock_events().is_empty());
    assert_eq!(lock_holder(&shard, "a"), None);
}

/// A wait ends at its deadline (on the tick that reaches it), answered with the holder's
/// token; it leaves the line, so a later release passes it by. Ending a wait takes no
/// revision. The deadline is one millisecond past the wait, since the clock counts whole
/// milliseconds: a wait is never shorter than asked.
#[test]
fn a_wait_that_times_out_leaves_the_line() {
    let mut shard = lock_shard();
    let leases = grant_leases(&mut shard, 3, 10_000);
    assert_eq!(lock_now(&mut shard, "a", leases[0], 0), locked(true, 4));
    let early = lock_queued(&mut shard, "a", leases[1], 100);
    let late = lock_queued(&mut shard, "a", leases[2], 300);
    lease_tick(&mut shard, MONO_START_MS + 100);
    assert!(shard.take_lock_events().is_empty());
    assert_eq!(shard.locks().waiter_count(), 2);
    lease_tick(&mut shard, MONO_START_MS + 101);
    assert_eq!(
        shard.take_lock_events(),
        vec![LockEvent::TimedOut {
            waiter: early,
            holder_token: 4,
        }]
    );
    assert_eq!(shard.locks().waiter_count(), 1);
    assert_eq!(shard.revision(), 4);
    assert_eq!(unlock(&mut shard, "a", 4), unlocked(true));
    assert_eq!(
        shard.take_lock_events(),
        vec![LockEvent::Granted {
            waiter: late,
            token: 6,
        }]
    );
    assert_eq!(lock_holder(&shard, "a"), Some((leases[2], 6)));
    // Its deadline passing later changes nothing: it no longer waits.
    lease_tick(&mut shard, MONO_START_MS + 300);
    assert!(shard.take_lock_events().is_empty());
    assert_eq!(lock_holder(&shard, "a"), Some((leases[2], 6)));
}

/// The end of a lease, however it comes, releases every lock it holds (each at a revision,
/// after the lease's own) and grants each to its next waiter with a larger token; the waits
/// the lease itself had end with `LeaseEnded`.
fn a_lease_end_releases_its_locks(end: impl FnOnce(&mut Shard, u64), expired: bool) {
    let mut shard = lock_shard();
    let leases = grant_leases(&mut shard, 3, 10_000);
    let (ending, waiting, other) = (leases[0], leases[1], leases[2]);
    assert_eq!(lock_now(&mut shard, "a", ending, 0), locked(true, 4));
    assert_eq!(lock_now(&mut shard, "b", other, 0), locked(true, 5));
    let ending_waits = lock_queued(&mut shard, "b", ending, 50_000);
    let waiter = lock_queued(&mut shard, "a", waiting, 50_000);
    end(&mut shard, ending);
    // The release of "a" (6) and its grant (7), then the lease's end (8), journaled last.
    assert_eq!(shard.revision(), 8);
    assert_eq!(
        shard.take_lock_events(),
        vec![
            LockEvent::LeaseEnded {
                waiter: ending_waits
            },
            LockEvent::Granted { waiter, token: 7 },
        ]
    );
    assert_eq!(lock_holder(&shard, "a"), Some((waiting, 7)));
    assert_eq!(lock_holder(&shard, "b"), Some((other, 5)));
    assert_eq!(shard.locks().waiter_count(), 0);
    assert_eq!(shard.take_ended_leases(), vec![(ending, expired)]);
    assert_eq!(
        refusal(&lock_now(&mut shard, "c", ending, 0)),
        ErrorCode::LeaseNotFound
    );
    // The release of "b" later passes the ended wait by.
    assert_eq!(unlock(&mut shard, "b", 5), unlocked(true));
    assert!(shard.take_lock_events().is_empty());
    assert_eq!(lock_holder(&shard, "b"), None);
}

#[test]
fn a_lease_that_expires_releases_its_locks_and_grants_the_next_waiter() {
    a_lease_end_releases_its_locks(
        |shard, lease| {
            // Only the ending lease is short: renew the others past its deadline.
            let others: Vec<u64> = (2..=3).map(home_lease).collect();
            shard.set_monotonic_ms(MONO_START_MS + 5_000);
            apply(shard, START_MS, &lease_keepalive(&others));
            lease_tick(shard, MONO_START_MS + 9_999);
            assert!(shard.take_ended_leases().is_empty());
            assert_eq!(lock_holder(shard, "a"), Some((lease, 4)));
            lease_tick(shard, MONO_START_MS + 10_000);
        },
        true,
    );
}

#[test]
fn a_revoked_lease_releases_its_locks_and_grants_the_next_waiter() {
    a_lease_end_releases_its_locks(
        |shard, lease| {
            assert_eq!(apply(shard, START_MS, &lease_revoke(lease)), revoked(true));
        },
        false,
    );
}

/// A lease of another core holds a lock here; its home's word that it ended releases the
/// lock at once (no keys: only the release and the grant take revisions), and ends its
/// waits.
#[test]
fn a_lease_of_another_core_that_ends_releases_its_locks() {
    let mut shard = lock_shard();
    let foreign = foreign_lease(1);
    let home = grant_leases(&mut shard, 1, 10_000)[0];
    let lock_foreign = lock_request("a", foreign, 0);
    assert_eq!(lease_to_check(&shard, &lock_foreign), Some(SHARD_ID + 2));
    assert_eq!(
        refusal(&lock_now(&mut shard, "a", foreign, 0)),
        ErrorCode::LeaseNotFound
    );
    shard.begin_lease_check(foreign);
    assert!(shard.end_lease_check(foreign, true));
    assert_eq!(lease_to_check(&shard, &lock_foreign), None);
    assert_eq!(lock_now(&mut shard, "a", foreign, 0), locked(true, 2));
    assert_eq!(lock_now(&mut shard, "b", home, 0), locked(true, 3));
    let foreign_waits = lock_queued(&mut shard, "b", foreign, 50_000);
    let waiter = lock_queued(&mut shard, "a", home, 50_000);
    shard.lease_ended_elsewhere(foreign, false);
    shard.check_invariants();
    assert_eq!(shard.revision(), 5);
    assert_eq!(
        shard.take_lock_events(),
        vec![
            LockEvent::LeaseEnded {
                waiter: foreign_waits
            },
            LockEvent::Granted { waiter, token: 5 },
        ]
    );
    assert_eq!(lock_holder(&shard, "a"), Some((home, 5)));
    assert!(
        shard.take_ended_leases().is_empty(),
        "only the home reports it"
    );
}

/// A waiter whose lease ended but was not yet ticked when the lock came free is passed by
/// with `LeaseEnded`: the lock goes to the next waiter whose lease lives.
#[test]
fn a_waiter_whose_lease_ended_before_its_turn_is_skipped() {
    let mut shard = lock_shard();
    let holder = grant_leases(&mut shard, 1, 10_000)[0];
    let short = grant_leases(&mut shard, 1, 100)[0];
    let long = grant_leases(&mut shard, 1, 10_000)[0];
    assert_eq!(lock_now(&mut shard, "a", holder, 0), locked(true, 4));
    let skipped = lock_queued(&mut shard, "a", short, 50_000);
    let waiter = lock_queued(&mut shard, "a", long, 50_000);
    shard.set_monotonic_ms(MONO_START_MS + 100);
    assert_eq!(unlock(&mut shard, "a", 4), unlocked(true));
    assert_eq!(
        shard.take_lock_events(),
        vec![
            LockEvent::LeaseEnded { waiter: skipped },
            LockEvent::Granted { waiter, token: 6 },
        ]
    );
    assert_eq!(lock_holder(&shard, "a"), Some((long, 6)));
    // The tick that ends the short lease finds nothing of it among the locks.
    tick(&mut shard, START_MS);
    assert_eq!(shard.take_ended_leases(), vec![(short, true)]);
    assert_eq!(shard.revision(), 7);
    assert!(shard.take_lock_events().is_empty());
    assert_eq!(shard.locks().waiter_count(), 0);
}

/// A fence holds for a token at least the last one granted for the lock, held or released
/// since: the holder's writes pass, and once the lock is granted again no write fenced with
/// the older token does, released or not. A lock never granted fences at 0.
#[test]
fn a_fence_holds_for_the_last_token_and_fails_after_a_regrant() {
    let mut shard = lock_shard();
    let leases = grant_leases(&mut shard, 2, 10_000);
    let write = |shard: &mut Shard, token: u64, value: &str| {
        txn_succeeded(&apply(
            shard,
            START_MS,
            &fenced_put("lk", token, "k", value),
        ))
    };
    assert!(write(&mut shard, 0, "never granted"));
    assert_eq!(shard.revision(), 3);
    assert_eq!(lock_now(&mut shard, "lk", leases[0], 0), locked(true, 4));
    let first = 4;
    assert!(!write(&mut shard, 0, "zero"));
    assert!(!write(&mut shard, first - 1, "older"));
    assert_eq!(shard.revision(), 4, "a failed fence writes nothing");
    assert!(write(&mut shard, first, "holder"));
    assert!(write(&mut shard, first + 100, "newer"));
    assert_eq!(shard.revision(), 6);
    // Released: the last token is still the first grant's.
    assert_eq!(unlock(&mut shard, "lk", first), unlocked(true));
    assert!(write(&mut shard, first, "after release"));
    assert_eq!(shard.revision(), 8);

    assert_eq!(lock_now(&mut shard, "lk", leases[1], 0), locked(true, 9));
    let second = 9;
    assert!(!write(&mut shard, first, "stale holder"));
    assert!(write(&mut shard, second, "new holder"));
    assert_eq!(unlock(&mut shard, "lk", second), unlocked(true));
    assert!(!write(&mut shard, first, "stale after release"));
    assert!(write(&mut shard, second, "last"));
    assert_eq!(shard.revision(), 12);
    run(
        &mut shard,
        &[(START_MS, get("k"), found(entry("last", 12)), 12)],
    );
    // A fence reads only its own lock.
    assert!(txn_succeeded(&apply(
        &mut shard,
        START_MS,
        &fenced_put("other", 0, "k", "x")
    )));
}

/// Both lock tables are bounded, and a refusal is `TableFull` that applies nothing. A lock
/// released keeps its room (it remembers its last token, for fences), so a known lock may be
/// taken again when a new one may not. A lease that will not wait needs no room in line.
#[test]
fn the_lock_tables_are_bounded() {
    let mut shard = locked_shard(LockLimits {
        locks_max: 2,
        waiters_max: 1,
    });
    let leases = grant_leases(&mut shard, 3, 10_000);
    assert_eq!(lock_now(&mut shard, "a", leases[0], 0), locked(true, 4));
    assert_eq!(lock_now(&mut shard, "b", leases[0], 0), locked(true, 5));
    let full = lock_now(&mut shard, "c", leases[0], 0);
    let Response::Error(reply) = &full else {
        panic!("a third lock answered {full:?}");
    };
    assert_eq!(reply.code, ErrorCode::TableFull);
    assert!(reply.message.contains("2 locks"), "{}", reply.message);
    assert_eq!(shard.revision(), 5);
    assert_eq!(last_token(&shard, "c"), 0);
    assert_eq!(unlock(&mut shard, "a", 4), unlocked(true));
    assert_eq!(
        refusal(&lock_now(&mut shard, "c", leases[1], 0)),
        ErrorCode::TableFull
    );
    assert_eq!(lock_now(&mut shard, "a", leases[1], 0), locked(true, 7));

    let waiter = lock_queued(&mut shard, "a", leases[2], 5_000);
    let full = lock_now(&mut shard, "b", leases[2], 5_000);
    let Response::Error(reply) = &full else {
        panic!("a second waiter answered {full:?}");
    };
    assert_eq!(reply.code, ErrorCode::TableFull);
    assert!(
        reply.message.contains("1 lock requests"),
        "{}",
        reply.message
    );
    assert_eq!(lock_now(&mut shard, "b", leases[2], 0), locked(false, 5));
    assert_eq!(shard.locks().waiter_count(), 1);
    assert_eq!(shard.revision(), 7);
    // The line has room again once the waiter is served.
    assert_eq!(unlock(&mut shard, "a", 7), unlocked(true));
    assert_eq!(
        shard.take_lock_events(),
        vec![LockEvent::Granted { waiter, token: 9 }]
    );
    assert!(matches!(
        lock_step_of(&mut shard, &lock_request("b", leases[1], 5_000)),
        LockStep::Queued(_)
    ));
}

/// A lock is held by a lease that lives, like a key's: one of this shard's that has not
/// ended (or passed its deadline), or one of another core of this node known to live. A
/// refusal applies nothing.
#[test]
fn a_lock_needs_a_live_lease_of_this_node() {
    let mut shard = lock_shard();
    let refused = |shard: &mut Shard, lease: u64, wait_ms: u32| {
        refusal(&lock_now(shard, "a", lease, wait_ms))
    };
    let not_found = ErrorCode::LeaseNotFound;
    assert_eq!(refused(&mut shard, home_lease(1), 0), not_found);
    let other_node = LeaseId::new(NODE_ID + 1, SHARD_ID, 1).unwrap().0;
    assert_eq!(
        refused(&mut shard, other_node, 0),
        ErrorCode::InvalidArgument
    );
    assert_eq!(refused(&mut shard, foreign_lease(1), 5_000), not_found);
    let short = grant_leases(&mut shard, 1, 100)[0];
    let revoked_lease = grant_leases(&mut shard, 1, 10_000)[0];
    apply(&mut shard, START_MS, &lease_revoke(revoked_lease));
    assert_eq!(refused(&mut shard, revoked_lease, 0), not_found);
    shard.set_monotonic_ms(MONO_START_MS + 100);
    // Past its deadline, not yet ticked: no longer alive.
    assert_eq!(refused(&mut shard, short, 0), not_found);
    assert_eq!(shard.revision(), 3);
    assert_eq!(last_token(&shard, "a"), 0);
    assert_eq!(
        shard.locks().entries().count(),
        0,
        "a refusal remembers no lock"
    );
    assert_eq!(shard.locks().waiter_count(), 0);
}

/// `Shard::apply` answers a lock like `Shard::lock` when it need not wait, and an unlock.
#[test]
fn apply_answers_locks_that_need_not_wait() {
    let mut shard = lock_shard();
    let leases = grant_leases(&mut shard, 2, 10_000);
    run(
        &mut shard,
        &[
            (
                START_MS,
                lock_request("a", leases[0], 0),
                locked(true, 3),
                3,
            ),
            (
                START_MS,
                lock_request("a", leases[0], 0),
                locked(true, 3),
                3,
            ),
            (
                START_MS,
                lock_request("a", leases[1], 0),
                locked(false, 3),
                3,
            ),
            (START_MS, unlock_request("a", 2), unlocked(false), 3),
            (START_MS, unlock_request("a", 3), unlocked(true), 4),
            (
                START_MS,
                lock_request("a", leases[1], 9),
                locked(true, 5),
                5,
            ),
        ],
    );
    // What the core reserves on a full disk covers a release with the grant to the next
    // waiter, and a grant.
    lock_queued(&mut shard, "a", leases[0], 5_000);
    let unlock_a = unlock_request("a", 5);
    let bound = journal_bound(&shard, &unlock_a).unwrap();
    let journal_len = shard.journal_len();
    assert_eq!(apply(&mut shard, START_MS, &unlock_a), unlocked(true));
    assert_eq!(shard.revision(), 7, "the release and the grant");
    assert!((shard.journal_len() - journal_len) as u64 <= bound);
    let lock_b = lock_request("b", leases[0], 0);
    let bound = journal_bound(&shard, &lock_b).unwrap();
    let journal_len = shard.journal_len();
    assert_eq!(lock_now(&mut shard, "b", leases[0], 0), locked(true, 8));
    assert!((shard.journal_len() - journal_len) as u64 <= bound);
}

/// Regression guard for `Shard::apply` on a lock that would wait: it answers at once with
/// the holder's token (the core sends waits to `Shard::lock`), so the request must not stay
/// in line either. A waiter left behind would be granted the lock on the next release, and
/// nothing would ever answer it or unlock: the lock would be held with a token nobody knows
/// until the lease ends.
#[test]
fn apply_of_a_lock_that_would_wait_leaves_no_one_in_line() {
    let mut shard = lock_shard();
    let leases = grant_leases(&mut shard, 2, 10_000);
    assert_eq!(lock_now(&mut shard, "a", leases[0], 0), locked(true, 3));
    assert_eq!(
        apply(&mut shard, START_MS, &lock_request("a", leases[1], 5_000)),
        locked(false, 3)
    );
    assert_eq!(shard.locks().waiter_count(), 0, "an answered request waits");
    assert_eq!(unlock(&mut shard, "a", 3), unlocked(true));
    assert_eq!(lock_holder(&shard, "a"), None);
    assert!(shard.take_lock_events().is_empty());
}

/// Regression guard: a lock request is one request in the shard's stats, whichever way it
/// arrives (`Shard::lock` counts it, and `Shard::apply` must not count it again).
#[test]
fn a_lock_counts_as_one_request() {
    let mut shard = lock_shard();
    let lease = grant_leases(&mut shard, 1, 10_000)[0];
    let before = shard.stats().request_count;
    assert_eq!(lock_now(&mut shard, "a", lease, 0), locked(true, 2));
    assert_eq!(shard.stats().request_count, before + 1);
    apply(&mut shard, START_MS, &lock_request("b", lease, 0));
    assert_eq!(shard.stats().request_count, before + 2);
    apply(&mut shard, START_MS, &unlock_request("b", 3));
    assert_eq!(shard.stats().request_count, before + 3);
}

/// Regression guard: what the core reserves for a revoke on a full disk must cover all it
/// journals, the releases of the lease's locks (and the grants to their waiters) included.
#[test]
fn a_revoke_journal_bound_covers_the_lock_releases() {
    let mut shard = lock_shard();
    let leases = grant_leases(&mut shard, 2, 10_000);
    for name in ["a", "b", "c"] {
        assert!(matches!(
            lock_now(&mut shard, name, leases[0], 0),
            Response::Locked { acquired: true, .. }
        ));
        lock_queued(&mut shard, name, leases[1], 5_000);
    }
    let bound = journal_bound(&shard, &lease_revoke(leases[0])).unwrap();
    let journal_len = shard.journal_len();
    assert_eq!(
        apply(&mut shard, START_MS, &lease_revoke(leases[0])),
        revoked(true)
    );
    assert_eq!(shard.take_lock_events().len(), 3);
    let journaled = (shard.journal_len() - journal_len) as u64;
    assert!(
        journaled <= bound,
        "a revoke journaled {journaled} bytes, bound {bound}"
    );
}

/// Recovery brings back each lock's holder and last token (waits are not journaled: their
/// requests died with the server), so a fence still refuses a token granted before the last
/// grant. The holder's lease comes back with a full TTL, and its end releases the lock; the
/// next grant's token continues after the recovered revision.
#[test]
fn a_replayed_journal_brings_back_holders_and_last_tokens() {
    let mut shard = lock_shard();
    let (first, second) = (home_lease(1), home_lease(2));
    run(
        &mut shard,
        &[
            (START_MS, lease_grant(500), granted(first, 500), 1),
            (START_MS, lease_grant(800), granted(second, 800), 2),
        ],
    );
    assert_eq!(lock_now(&mut shard, "x", first, 0), locked(true, 3));
    assert_eq!(unlock(&mut shard, "x", 3), unlocked(true));
    assert_eq!(lock_now(&mut shard, "x", second, 0), locked(true, 5));
    assert_eq!(lock_now(&mut shard, "y", first, 0), locked(true, 6));
    assert_eq!(lock_now(&mut shard, "z", first, 0), locked(true, 7));
    assert_eq!(unlock(&mut shard, "z", 7), unlocked(true));
    // The revoke releases "y" at the revision after the lease's end.
    run(
        &mut shard,
        &[(START_MS, lease_revoke(first), revoked(true), 10)],
    );
    let third = grant_leases(&mut shard, 1, 10_000)[0];
    lock_queued(&mut shard, "x", third, 50_000);
    assert_eq!(shard.revision(), 11);

    let recovered_mono_ms = 7_000_000;
    let mut replayed = replay_journal(&mut shard, recovered_mono_ms);
    assert_eq!(replayed.revision(), 11);
    assert_eq!(lock_holder(&replayed, "x"), Some((second, 5)));
    assert_eq!(last_token(&replayed, "x"), 5);
    assert_eq!(lock_holder(&replayed, "y"), None);
    assert_eq!(last_token(&replayed, "y"), 6);
    assert_eq!(lock_holder(&replayed, "z"), None);
    assert_eq!(last_token(&replayed, "z"), 7);
    assert_eq!(replayed.locks().waiter_count(), 0);
    assert!(!txn_succeeded(&apply(
        &mut replayed,
        START_MS,
        &fenced_put("x", 3, "k", "stale")
    )));
    assert!(txn_succeeded(&apply(
        &mut replayed,
        START_MS,
        &fenced_put("x", 5, "k", "holder")
    )));
    assert_eq!(replayed.revision(), 12);
    // The holder keeps the lock until its recovered lease ends, a full TTL after recovery.
    assert_eq!(lock_now(&mut replayed, "x", second, 0), locked(true, 5));
    assert_eq!(lock_now(&mut replayed, "x", third, 0), locked(false, 5));
    lease_tick(&mut replayed, recovered_mono_ms + 799);
    assert_eq!(lock_holder(&replayed, "x"), Some((second, 5)));
    lease_tick(&mut replayed, recovered_mono_ms + 800);
    assert_eq!(replayed.take_ended_leases(), vec![(second, true)]);
    assert_eq!(lock_holder(&replayed, "x"), None);
    assert_eq!(replayed.revision(), 14, "the lease's end, then the release");
    assert_eq!(lock_now(&mut replayed, "x", third, 0), locked(true, 15));
    assert!(!txn_succeeded(&apply(
        &mut replayed,
        START_MS,
        &fenced_put("x", 5, "k", "stale")
    )));
}

/// Regression guard for a crash between the records of one lease end. Revoking (or
/// expiring) a lease journals the release of each lock it held, then its end, as records of
/// their own. Recovery keeps the whole records before a tear, so a crash can leave the
/// releases in the log without the end: the lease comes back (and ends again later), and
/// the lock is free. The other order would leave a lock held by a lease that is gone.
#[test]
fn a_log_cut_after_a_lease_end_leaves_no_lock_held_by_the_ended_lease() {
    let mut shard = lock_shard();
    let (ending, other) = (home_lease(1), home_lease(2));
    grant_leases(&mut shard, 2, 10_000);
    assert_eq!(lock_now(&mut shard, "x", ending, 0), locked(true, 3));
    run(
        &mut shard,
        &[(START_MS, lease_revoke(ending), revoked(true), 5)],
    );
    let journal = shard.journal_mut().map(RecordWriter::take).unwrap();
    let recovered_mono_ms = 7_000_000;
    let mut replayed = Shard::new(shard.config().clone(), START_MS);
    replayed.set_monotonic_ms(recovered_mono_ms);
    let mut offset = 0;
    // Every record but the last (the lease's end).
    while let ReadOutcome::Record(record, size) = read_record(&journal[offset..]) {
        if offset + size == journal.len() {
            break;
        }
        replayed.replay(START_MS, &record).unwrap();
        offset += size;
    }
    assert_eq!(replayed.revision(), 4, "the release was replayed");
    replayed.restart_leases(recovered_mono_ms);
    tick(&mut replayed, START_MS);
    assert_eq!(
        apply(&mut replayed, START_MS, &Request::LeaseList),
        lease_list(&[ending, other]),
        "the lease whose end was cut off comes back"
    );
    assert!(
        matches!(
            lock_now(&mut replayed, "x", other, 0),
            Response::Locked { acquired: true, .. }
        ),
        "lock x is still held by {:?}, whose lease ended",
        lock_holder(&replayed, "x")
    );
}

/// A lock recovered for a lease of another core is taken to live (the lease can use it
/// without a check) and is listed among the leases recovery asks the homes about; the
/// home's word that it ended releases the lock.
#[test]
fn a_recovered_lock_of_another_cores_lease_is_assumed_alive_until_its_home_says() {
    let mut shard = lock_shard();
    let foreign = foreign_lease(1);
    shard.begin_lease_check(foreign);
    assert!(shard.end_lease_check(foreign, true));
    assert_eq!(lock_now(&mut shard, "x", foreign, 0), locked(true, 1));
    let mut replayed = replay_journal(&mut shard, 7_000_000);
    assert_eq!(lock_holder(&replayed, "x"), Some((foreign, 1)));
    assert_eq!(replayed.foreign_leases(), vec![foreign]);
    assert_eq!(
        lease_to_check(&replayed, &lock_request("x", foreign, 0)),
        None
    );
    assert_eq!(lock_now(&mut replayed, "x", foreign, 0), locked(true, 1));
    replayed.lease_ended_elsewhere(foreign, true);
    replayed.check_invariants();
    assert_eq!(lock_holder(&replayed, "x"), None);
    assert_eq!(last_token(&replayed, "x"), 1);
    assert_eq!(replayed.revision(), 2, "the release");
}

/// Regression guard for determinism: the same requests on two shards give the same
/// revisions and tokens (the simulator replays a seed exactly). When a lease that holds many
/// locks with waiters ends, the order of the releases decides which waiter's grant gets
/// which token, so it must not depend on a hash map's per-instance seed; nor may the order
/// of the waits that time out on one tick.
#[test]
fn lock_releases_and_timeouts_happen_in_the_same_order_on_every_shard() {
    let run_once = || {
        let mut shard = lock_shard();
        let leases = grant_leases(&mut shard, 4, 10_000);
        let (ending, waiting, other, late) = (leases[0], leases[1], leases[2], leases[3]);
        let names: Vec<String> = (0..8).map(|index| format!("lock{index}")).collect();
        let others: Vec<String> = (0..8).map(|index| format!("other{index}")).collect();
        for (name, other_name) in names.iter().zip(&others) {
            lock_now(&mut shard, name, ending, 0);
            lock_queued(&mut shard, name, waiting, 5_000);
            lock_now(&mut shard, other_name, other, 0);
            lock_queued(&mut shard, other_name, ending, 5_000);
        }
        apply(&mut shard, START_MS, &lease_revoke(ending));
        let ended = shard.take_lock_events();
        let tokens: Vec<(String, u64)> = names
            .iter()
            .map(|name| (name.clone(), lock_holder(&shard, name).unwrap().1))
            .collect();
        for other_name in &others {
            lock_queued(&mut shard, other_name, late, 50);
        }
        lease_tick(&mut shard, MONO_START_MS + 50);
        (ended, tokens, shard.take_lock_events())
    };
    let first = run_once();
    for _ in 0..8 {
        assert_eq!(run_once(), first);
    }
}
