//! Property tests of the wire codec, the request checks and slot routing.
//!
//! The codec is the one place where bytes from an untrusted peer become values, so these tests
//! hold it to four promises, each for arbitrary input rather than for a few hand-picked frames:
//!
//! - **Round trip.** Every `Request` and `Response` variant, encoded and decoded again, comes back
//!   equal, with its request id and kind, whether it travels alone, back to back with others in
//!   one buffer, or split into arbitrary chunks by the network. Every body lands 16-aligned.
//! - **Incomplete is not invalid.** Every strict prefix of a frame asks for more bytes; none is an
//!   error, so a slow peer is never mistaken for a broken one.
//! - **Damage is refused.** Any single flipped bit in the header or body is an error. Padding is
//!   covered by no checksum, and a flip there leaves the frame exactly as it was.
//! - **Nothing panics.** Garbage frames, garbage bodies and mutated archives may be refused but
//!   never crash the receiver, because a bad frame must close only its own connection.
//!
//! Generated messages are kept small (keys up to 64 bytes, values up to 256, batches up to 8,
//! entries with up to 4 fields, queries of up to 4 comparisons under up to 4 operators) so the
//! file runs in seconds in a debug build; the limits themselves are tested at their edges by the
//! `check_request` properties. An `f64` a client sends can hold any bits on the wire, NaN and
//! `-0.0` included, though an owned `F64` never does: those are written into the archive, and
//! `check_request` must refuse them wherever a field, a query value or a cursor carries one.

use std::collections::BTreeSet;

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::strategy::ValueTree;
use proptest::test_runner::TestRunner;
use tessera_protocol::codec::{self, FrameBuffer, FrameError};
use tessera_protocol::limits::{
    BATCH_COUNT_MAX, CORE_COUNT_MAX, FIELDS_PER_VALUE_MAX, FIELD_NAME_SIZE_MAX,
    FIELD_STRING_SIZE_MAX, FRAME_ALIGNMENT, FRAME_BODY_SIZE_MAX, FRAME_HEADER_SIZE,
    INDEX_NAME_SIZE_MAX, KEY_SIZE_MAX, LOCK_WAIT_MS_MAX, QUERY_IN_VALUES_MAX, QUERY_LIMIT_MAX,
    QUERY_NODES_MAX, QUERY_ORDER_BY_MAX, SCAN_LIMIT_MAX, TEXT_SIZE_MAX, TTL_MS_MAX,
    TXN_COMPARES_MAX, TXN_OPS_MAX, VALUE_SIZE_MAX, WATCH_PROGRESS_INTERVAL_MS_MAX,
    WATCH_PROGRESS_INTERVAL_MS_MIN,
};
use tessera_protocol::query::{Bound, QueryError, QueryNode, F64};
use tessera_protocol::{
    hash_tag, slot_for_key, split_slots, Check, Compare, CompareOp, CoreInfo, CoreStats,
    CounterAdd, Delete, DeleteCondition, Entry, ErrorCode, ErrorReply, EventBatch, EventKind,
    Field, FieldValue, FrameHeader, FrameKind, IndexInfo, IndexKind, IndexSpec, IndexState,
    LeaseId, LeaseState, NodeHealth, NodeInfo, NodeState, OrderBy, Projection, ProtocolError, Put,
    PutCondition, PutEntry, Query, QueryAccess, QueryCursor, QueryItem, QueryPage, QueryPlan,
    QueryRequest, Request, RequestError, Response, RouteTable, Scan, ScanItem, ScanPage, Topology,
    TtlState, Txn, TxnOp, TxnOutcome, TxnResult, Watch, WatchCancel, WatchEvent, WatchEvents,
    WatchFrom, Watching, WrongShard, PROTOCOL_VERSION, SLOT_COUNT,
};

/// Longest generated key. Real keys may be up to `KEY_SIZE_MAX`; small ones keep cases fast.
const KEY_SIZE_GENERATED_MAX: usize = 64;
/// Longest generated value.
const VALUE_SIZE_GENERATED_MAX: usize = 256;
/// Most items in a generated batch.
const BATCH_COUNT_GENERATED_MAX: usize = 8;
/// Most characters in a generated name or message (each up to 4 bytes of UTF-8).
const TEXT_CHAR_COUNT_GENERATED_MAX: usize = 16;
/// Most nodes in a generated topology.
const NODE_COUNT_GENERATED_MAX: usize = 3;
/// Most cores per node in a generated topology.
const CORE_COUNT_GENERATED_MAX: usize = 4;
/// Most compares in a generated transaction, and most ops in one of its branches.
const TXN_COUNT_GENERATED_MAX: usize = 4;
/// Most frames in one generated stream.
const FRAME_COUNT_GENERATED_MAX: usize = 8;
/// Most fields on a generated entry; `FIELDS_PER_VALUE_MAX` itself is tested at its edge.
const FIELD_COUNT_GENERATED_MAX: usize = 4;
/// Most comparisons, and most operators over them, in a generated query.
const QUERY_NODE_COUNT_GENERATED_MAX: usize = 4;
/// Number of `Request` variants; `request_variant` fails to compile when one is added.
const REQUEST_VARIANT_COUNT: usize = 30;
/// Number of `Response` variants; `response_variant` fails to compile when one is added.
const RESPONSE_VARIANT_COUNT: usize = 32;

// ---------------------------------------------------------------------------------------------
// Strategies.

fn key() -> impl Strategy<Value = Vec<u8>> {
    vec(any::<u8>(), 1..=KEY_SIZE_GENERATED_MAX)
}

fn keys() -> impl Strategy<Value = Vec<Vec<u8>>> {
    vec(key(), 0..=BATCH_COUNT_GENERATED_MAX)
}

fn value() -> impl Strategy<Value = Vec<u8>> {
    vec(any::<u8>(), 0..=VALUE_SIZE_GENERATED_MAX)
}

fn text() -> impl Strategy<Value = String> {
    vec(any::<char>(), 0..=TEXT_CHAR_COUNT_GENERATED_MAX)
        .prop_map(|characters| characters.into_iter().collect())
}

/// A TTL that `check_request` accepts.
fn ttl_ms() -> impl Strategy<Value = u64> {
    1..=TTL_MS_MAX
}

/// A lease id that `check_request` accepts: anything but 0, often a well-formed [`LeaseId`].
fn lease_id() -> impl Strategy<Value = u64> {
    prop_oneof![
        1..=u64::MAX,
        (
            0..=LeaseId::NODE_ID_MAX,
            0..=LeaseId::CORE_ID_MAX,
            1..=LeaseId::SEQUENCE_MAX
        )
            .prop_map(|(node_id, core_id, sequence)| {
                LeaseId::new(node_id, core_id, sequence).unwrap().0
            }),
    ]
}

fn lease_ids() -> impl Strategy<Value = Vec<u64>> {
    vec(lease_id(), 0..=BATCH_COUNT_GENERATED_MAX)
}

fn put_condition() -> impl Strategy<Value = PutCondition> {
    prop_oneof![
        Just(PutCondition::Always),
        Just(PutCondition::IfAbsent),
        Just(PutCondition::IfPresent),
        any::<u64>().prop_map(PutCondition::IfVersion),
        prop::collection::vec(any::<u8>(), 0..32).prop_map(PutCondition::IfValue),
    ]
}

fn put() -> impl Strategy<Value = Put> {
    (
        key(),
        value(),
        proptest::option::of(ttl_ms()),
        any::<bool>(),
        put_condition(),
        any::<bool>(),
        proptest::option::of(lease_id()),
        fields(),
    )
        .prop_map(
            |(key, value, ttl_ms, keep_ttl, condition, return_previous, lease, fields)| Put {
                key,
                value,
                ttl_ms,
                keep_ttl,
                condition,
                return_previous,
                lease,
                fields,
            },
        )
}

fn delete() -> impl Strategy<Value = Delete> {
    (
        key(),
        prop_oneof![
            Just(DeleteCondition::Always),
            any::<u64>().prop_map(DeleteCondition::IfVersion),
            value().prop_map(DeleteCondition::IfValue),
        ],
        any::<bool>(),
    )
        .prop_map(|(key, condition, return_previous)| Delete {
            key,
            condition,
            return_previous,
        })
}

/// A counter add `check_request` accepts: bounds that hold a value, and `refresh_ttl` only
/// with a TTL.
fn counter_add() -> impl Strategy<Value = CounterAdd> {
    (
        key(),
        any::<i64>(),
        any::<Option<i64>>(),
        any::<Option<i64>>(),
        any::<bool>(),
        proptest::option::of(ttl_ms()),
        any::<bool>(),
    )
        .prop_map(|(key, delta, min, max, create, ttl_ms, refresh_ttl)| {
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

fn compare_op() -> impl Strategy<Value = CompareOp> {
    prop_oneof![
        Just(CompareOp::Equal),
        Just(CompareOp::NotEqual),
        Just(CompareOp::Less),
        Just(CompareOp::LessOrEqual),
        Just(CompareOp::Greater),
        Just(CompareOp::GreaterOrEqual),
    ]
}

fn compare() -> impl Strategy<Value = Compare> {
    (
        key(),
        prop_oneof![
            Just(Check::Exists),
            Just(Check::Absent),
            (compare_op(), value()).prop_map(|(op, value)| Check::Value(op, value)),
            (compare_op(), any::<u64>()).prop_map(|(op, version)| Check::Version(op, version)),
            (compare_op(), any::<u64>())
                .prop_map(|(op, revision)| Check::CreateRevision(op, revision)),
            (compare_op(), any::<u64>())
                .prop_map(|(op, revision)| Check::ModRevision(op, revision)),
            any::<u64>().prop_map(Check::Fence),
            (compare_op(), any::<u64>()).prop_map(|(op, lease)| Check::Lease(op, lease)),
        ],
    )
        .prop_map(|(key, check)| Compare { key, check })
}

fn txn_op() -> impl Strategy<Value = TxnOp> {
    prop_oneof![
        key().prop_map(|key| TxnOp::Get { key }),
        (
            key(),
            value(),
            proptest::option::of(ttl_ms()),
            any::<bool>(),
            any::<bool>(),
            fields(),
        )
            .prop_map(|(key, value, ttl_ms, keep_ttl, return_previous, fields)| {
                TxnOp::Put {
                    key,
                    value,
                    ttl_ms,
                    keep_ttl,
                    return_previous,
                    lease: None,
                    fields,
                }
            }),
        (key(), value(), 1..u64::MAX, fields()).prop_map(|(key, value, lease, fields)| {
            TxnOp::Put {
                key,
                value,
                ttl_ms: None,
                keep_ttl: false,
                return_previous: false,
                lease: Some(lease),
                fields,
            }
        }),
        (key(), any::<bool>()).prop_map(|(key, return_previous)| TxnOp::Delete {
            key,
            return_previous
        }),
        counter_add().prop_map(TxnOp::Add),
        scan().prop_map(TxnOp::Range),
    ]
}

/// A branch `check_request` accepts: each key named once (a later op on a key already named
/// is dropped).
fn txn_branch() -> impl Strategy<Value = Vec<TxnOp>> {
    vec(txn_op(), 0..=TXN_COUNT_GENERATED_MAX).prop_map(|ops| {
        let mut named = BTreeSet::new();
        ops.into_iter()
            .filter(|op| op.key().is_none_or(|key| named.insert(key.to_vec())))
            .collect()
    })
}

/// A transaction `check_request` accepts; one that names no key gets a compare.
fn txn() -> impl Strategy<Value = Txn> {
    (
        vec(compare(), 0..=TXN_COUNT_GENERATED_MAX),
        txn_branch(),
        txn_branch(),
        key(),
    )
        .prop_map(|(mut compares, success, failure, key)| {
            let names_a_key = success.iter().chain(&failure).any(|op| op.key().is_some());
            if compares.is_empty() && !names_a_key {
                compares.push(Compare {
                    key,
                    check: Check::Exists,
                });
            }
            Txn {
                compares,
                success,
                failure,
            }
        })
}

fn put_entry() -> impl Strategy<Value = PutEntry> {
    (key(), value(), proptest::option::of(ttl_ms()), fields()).prop_map(
        |(key, value, ttl_ms, fields)| PutEntry {
            key,
            value,
            ttl_ms,
            fields,
        },
    )
}

// A generated name of TEXT_CHAR_COUNT_GENERATED_MAX characters of up to 4 bytes each is always
// a name `check_request` accepts.
const _: () = assert!(TEXT_CHAR_COUNT_GENERATED_MAX * 4 <= FIELD_NAME_SIZE_MAX);
const _: () = assert!(TEXT_CHAR_COUNT_GENERATED_MAX * 4 <= INDEX_NAME_SIZE_MAX);

/// A field or index name `check_request` accepts: 1..=16 characters, so 1..=64 bytes.
fn name() -> impl Strategy<Value = String> {
    vec(any::<char>(), 1..=TEXT_CHAR_COUNT_GENERATED_MAX)
        .prop_map(|characters| characters.into_iter().collect())
}

/// An `f64` from any bits but NaN's (`-0.0` becomes `0.0`), so every class of float is drawn:
/// subnormals, infinities, integral values and fractions.
fn float() -> impl Strategy<Value = F64> {
    prop_oneof![
        any::<u64>().prop_filter_map("NaN", |bits| F64::new(f64::from_bits(bits))),
        prop_oneof![Just(0.0), Just(-0.0), Just(2.0), Just(f64::INFINITY)]
            .prop_map(|number| F64::new(number).expect("not NaN")),
    ]
}

/// A field value `check_request` accepts: of every type, strings up to 64 bytes.
fn field_value() -> impl Strategy<Value = FieldValue> {
    prop_oneof![
        text().prop_map(FieldValue::Str),
        any::<i64>().prop_map(FieldValue::I64),
        float().prop_map(FieldValue::F64),
        any::<bool>().prop_map(FieldValue::Bool),
        any::<i64>().prop_map(FieldValue::Timestamp),
    ]
}

/// An entry's fields as `check_request` accepts them: each name once (a later field with a
/// name already used is dropped), in no particular order.
fn fields() -> impl Strategy<Value = Vec<Field>> {
    vec((name(), field_value()), 0..=FIELD_COUNT_GENERATED_MAX).prop_map(|pairs| {
        let mut named = BTreeSet::new();
        pairs
            .into_iter()
            .filter(|(name, _)| named.insert(name.clone()))
            .map(|(name, value)| Field::new(name, value))
            .collect()
    })
}

fn index_kind() -> impl Strategy<Value = IndexKind> {
    prop_oneof![Just(IndexKind::Equality), Just(IndexKind::Range)]
}

/// An index definition `check_request` accepts: names in size, the prefix empty or a key.
fn index_spec() -> impl Strategy<Value = IndexSpec> {
    (
        name(),
        prop_oneof![Just(Vec::new()), key()],
        name(),
        index_kind(),
    )
        .prop_map(|(name, prefix, field, kind)| IndexSpec {
            name,
            prefix,
            field,
            kind,
        })
}

fn bound() -> impl Strategy<Value = Bound> {
    prop_oneof![
        Just(Bound::Unbounded),
        field_value().prop_map(Bound::Included),
        field_value().prop_map(Bound::Excluded),
    ]
}

/// A comparison `check_query` accepts.
fn comparison() -> impl Strategy<Value = QueryNode> {
    prop_oneof![
        (name(), field_value()).prop_map(|(field, value)| QueryNode::Equal { field, value }),
        (name(), vec(field_value(), 1..=4))
            .prop_map(|(field, values)| QueryNode::In { field, values }),
        (name(), bound(), bound()).prop_map(|(field, lower, upper)| QueryNode::Range {
            field,
            lower,
            upper
        }),
        (name(), text()).prop_map(|(field, prefix)| QueryNode::Prefix { field, prefix }),
    ]
}

/// An operator over nodes before it, which `Index`es pick.
#[derive(Debug, Clone)]
enum Operator {
    And(Vec<Index>),
    Or(Vec<Index>),
    Not(Index),
}

fn operator() -> impl Strategy<Value = Operator> {
    prop_oneof![
        vec(any::<Index>(), 1..=3).prop_map(Operator::And),
        vec(any::<Index>(), 1..=3).prop_map(Operator::Or),
        any::<Index>().prop_map(Operator::Not),
    ]
}

/// A query `check_query` accepts: comparisons first, then operators over any nodes before
/// them (a node may be the operand of several, which the checks allow).
fn query() -> impl Strategy<Value = Query> {
    (
        vec(comparison(), 1..=QUERY_NODE_COUNT_GENERATED_MAX),
        vec(operator(), 0..=QUERY_NODE_COUNT_GENERATED_MAX),
    )
        .prop_map(|(mut nodes, operators)| {
            for operator in operators {
                let count = nodes.len();
                let pick = |index: &Index| u16::try_from(index.index(count)).unwrap();
                nodes.push(match operator {
                    Operator::And(operands) => QueryNode::And(operands.iter().map(pick).collect()),
                    Operator::Or(operands) => QueryNode::Or(operands.iter().map(pick).collect()),
                    Operator::Not(operand) => QueryNode::Not(pick(&operand)),
                });
            }
            Query { nodes }
        })
}

fn projection() -> impl Strategy<Value = Projection> {
    prop_oneof![
        Just(Projection::KeysOnly),
        Just(Projection::Fields),
        Just(Projection::Full),
    ]
}

/// A query request `check_request` accepts: a prefix empty or a key, up to
/// `QUERY_ORDER_BY_MAX` order fields, a limit in range (any limit with `count_only`), and a
/// cursor with one sort value per order field.
fn query_request() -> impl Strategy<Value = QueryRequest> {
    (
        prop_oneof![Just(Vec::new()), key()],
        proptest::option::of(query()),
        vec(
            (name(), any::<bool>()).prop_map(|(field, descending)| OrderBy { field, descending }),
            0..=QUERY_ORDER_BY_MAX,
        ),
        any::<u32>(),
        proptest::option::of((
            vec(proptest::option::of(field_value()), QUERY_ORDER_BY_MAX),
            prop_oneof![Just(Vec::new()), key()],
        )),
        projection(),
        any::<bool>(),
    )
        .prop_map(
            |(prefix, filter, order_by, limit, after, projection, count_only)| QueryRequest {
                limit: if count_only {
                    limit
                } else {
                    1 + limit % QUERY_LIMIT_MAX
                },
                after: after.map(|(mut sort, key)| {
                    sort.truncate(order_by.len());
                    QueryCursor { sort, key }
                }),
                prefix,
                filter,
                order_by,
                projection,
                count_only,
            },
        )
}

/// Every request variant, with arguments that `check_request` accepts.
fn request() -> impl Strategy<Value = Request> {
    prop_oneof![
        (any::<u16>(), text()).prop_map(|(protocol_version, client_name)| Request::Hello {
            protocol_version,
            client_name,
        }),
        Just(Request::Ping),
        Just(Request::Stats),
        key().prop_map(|key| Request::Get { key }),
        put().prop_map(|put| Request::Put(Box::new(put))),
        delete().prop_map(|delete| Request::Delete(Box::new(delete))),
        key().prop_map(|key| Request::Exists { key }),
        (key(), ttl_ms()).prop_map(|(key, ttl_ms)| Request::Expire { key, ttl_ms }),
        key().prop_map(|key| Request::Persist { key }),
        key().prop_map(|key| Request::Ttl { key }),
        keys().prop_map(|keys| Request::MultiGet { keys }),
        vec(put_entry(), 0..=BATCH_COUNT_GENERATED_MAX)
            .prop_map(|entries| Request::MultiPut { entries }),
        keys().prop_map(|keys| Request::MultiDelete { keys }),
        counter_add().prop_map(|add| Request::Add(Box::new(add))),
        scan().prop_map(Request::Scan),
        watch().prop_map(|watch| Request::Watch(Box::new(watch))),
        any::<u64>().prop_map(|watch_id| Request::Unwatch { watch_id }),
        any::<u64>().prop_map(|watch_id| Request::WatchProgress { watch_id }),
        txn().prop_map(|txn| Request::Txn(Box::new(txn))),
        ttl_ms().prop_map(|ttl_ms| Request::LeaseGrant { ttl_ms }),
        lease_ids().prop_map(|ids| Request::LeaseKeepalive { ids }),
        lease_id().prop_map(|id| Request::LeaseRevoke { id }),
        lease_id().prop_map(|id| Request::LeaseTimeToLive { id }),
        Just(Request::LeaseList),
        (key(), lease_id(), lock_wait_ms()).prop_map(|(name, lease, wait_ms)| Request::Lock {
            name,
            lease,
            wait_ms,
        }),
        (key(), any::<u64>()).prop_map(|(name, token)| Request::Unlock { name, token }),
        index_spec().prop_map(|spec| Request::CreateIndex(Box::new(spec))),
        name().prop_map(|name| Request::DropIndex { name }),
        Just(Request::ListIndexes),
        query_request().prop_map(|query| Request::Query(Box::new(query))),
    ]
}

/// A lock wait that `check_request` accepts, often at one of its ends.
fn lock_wait_ms() -> impl Strategy<Value = u32> {
    prop_oneof![Just(0), Just(LOCK_WAIT_MS_MAX), 0..=LOCK_WAIT_MS_MAX]
}

/// A scan `check_request` accepts: bounds empty or key-sized, a limit in range (any limit
/// with `count_only`).
fn scan() -> impl Strategy<Value = Scan> {
    let bound = || prop_oneof![Just(Vec::new()), key()];
    (
        bound(),
        proptest::option::of(bound()),
        1..=SCAN_LIMIT_MAX,
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(|(start, end, limit, keys_only, count_only)| Scan {
            start,
            end,
            limit,
            keys_only,
            count_only,
        })
}

/// A watch `check_request` accepts: bounds empty or key-sized with the end (if any) after the
/// start, at least one of puts and deletes, and a progress interval of 0 or in range.
fn watch() -> impl Strategy<Value = Watch> {
    let bound = || prop_oneof![Just(Vec::new()), key()];
    (
        bound(),
        proptest::option::of(bound()),
        watch_from(),
        prop_oneof![Just((true, false)), Just((false, true)), Just((true, true))],
        any::<bool>(),
        prop_oneof![
            Just(0),
            WATCH_PROGRESS_INTERVAL_MS_MIN..=WATCH_PROGRESS_INTERVAL_MS_MAX
        ],
    )
        .prop_map(
            |(first, second, from, (puts, deletes), previous, progress_interval_ms)| {
                let (start, end) = match second {
                    None => (first, None),
                    Some(second) => {
                        let (start, mut end) = if first <= second {
                            (first, second)
                        } else {
                            (second, first)
                        };
                        if end == start {
                            // Still at most KEY_SIZE_GENERATED_MAX + 1 bytes, well under a key.
                            end.push(0);
                        }
                        (start, Some(end))
                    }
                };
                Watch {
                    start,
                    end,
                    from,
                    puts,
                    deletes,
                    previous,
                    progress_interval_ms,
                    query: None,
                }
            },
        )
}

fn watch_from() -> impl Strategy<Value = WatchFrom> {
    prop_oneof![
        Just(WatchFrom::Now),
        any::<u64>().prop_map(WatchFrom::After),
        Just(WatchFrom::Snapshot),
    ]
}

fn scan_item() -> impl Strategy<Value = ScanItem> {
    (key(), proptest::option::of(entry())).prop_map(|(key, entry)| ScanItem { key, entry })
}

fn scan_page() -> impl Strategy<Value = ScanPage> {
    (
        any::<u32>(),
        any::<u16>(),
        any::<u64>(),
        vec(scan_item(), 0..=BATCH_COUNT_GENERATED_MAX),
        any::<u64>(),
        any::<bool>(),
    )
        .prop_map(
            |(node_id, core_id, revision, items, count, more)| ScanPage {
                node_id,
                core_id,
                revision,
                items,
                count,
                more,
            },
        )
}

fn watching() -> impl Strategy<Value = Watching> {
    (
        any::<u64>(),
        any::<u32>(),
        any::<u16>(),
        any::<u64>(),
        proptest::option::of(vec(scan_item(), 0..=BATCH_COUNT_GENERATED_MAX)),
    )
        .prop_map(
            |(watch_id, node_id, core_id, revision, snapshot)| Watching {
                watch_id,
                node_id,
                core_id,
                revision,
                snapshot,
            },
        )
}

fn event_kind() -> impl Strategy<Value = EventKind> {
    prop_oneof![
        (any::<u64>(), any::<u64>()).prop_map(|(create_revision, version)| EventKind::Put {
            create_revision,
            version,
        }),
        Just(EventKind::Deleted),
        Just(EventKind::Expired),
        (any::<u64>(), any::<bool>())
            .prop_map(|(lease, expired)| EventKind::LeaseEnded { lease, expired }),
    ]
}

fn watch_event() -> impl Strategy<Value = WatchEvent> {
    (key(), event_kind(), value(), proptest::option::of(value())).prop_map(
        |(key, kind, value, previous)| WatchEvent {
            key,
            kind,
            value,
            previous,
            fields: Vec::new(),
        },
    )
}

fn watch_events() -> impl Strategy<Value = WatchEvents> {
    (
        vec(
            (
                any::<u64>(),
                vec(watch_event(), 0..=BATCH_COUNT_GENERATED_MAX),
            )
                .prop_map(|(revision, events)| EventBatch { revision, events }),
            0..=BATCH_COUNT_GENERATED_MAX,
        ),
        any::<bool>(),
    )
        .prop_map(|(batches, continues)| WatchEvents { batches, continues })
}

fn watch_cancel() -> impl Strategy<Value = WatchCancel> {
    prop_oneof![
        any::<u64>().prop_map(|last_delivered| WatchCancel::Lagged { last_delivered }),
        any::<u64>().prop_map(|oldest_available| WatchCancel::Compacted { oldest_available }),
    ]
}

fn entry() -> impl Strategy<Value = Entry> {
    (
        value(),
        any::<u64>(),
        any::<u64>(),
        any::<u64>(),
        any::<Option<u64>>(),
        fields(),
    )
        .prop_map(
            |(value, create_revision, mod_revision, version, expires_at_ms, fields)| Entry {
                value,
                create_revision,
                mod_revision,
                version,
                expires_at_ms,
                fields,
            },
        )
}

fn txn_result() -> impl Strategy<Value = TxnResult> {
    prop_oneof![
        proptest::option::of(entry()).prop_map(TxnResult::Get),
        (any::<u64>(), proptest::option::of(entry()))
            .prop_map(|(version, previous)| TxnResult::Put { version, previous }),
        (any::<bool>(), proptest::option::of(entry()))
            .prop_map(|(deleted, previous)| TxnResult::Delete { deleted, previous }),
        (any::<bool>(), any::<i64>())
            .prop_map(|(applied, value)| TxnResult::Add { applied, value }),
        scan_page().prop_map(TxnResult::Range),
    ]
}

fn txn_outcome() -> impl Strategy<Value = TxnOutcome> {
    (
        any::<bool>(),
        any::<u64>(),
        vec(txn_result(), 0..=TXN_COUNT_GENERATED_MAX),
    )
        .prop_map(|(succeeded, revision, results)| TxnOutcome {
            succeeded,
            revision,
            results,
        })
}

fn ttl_state() -> impl Strategy<Value = TtlState> {
    prop_oneof![
        Just(TtlState::Missing),
        Just(TtlState::Persistent),
        (any::<u64>(), any::<u64>()).prop_map(|(remaining_ms, expires_at_ms)| {
            TtlState::Expiring {
                remaining_ms,
                expires_at_ms,
            }
        }),
    ]
}

fn core_stats() -> impl Strategy<Value = CoreStats> {
    (
        any::<u32>(),
        any::<u16>(),
        any::<[u64; 13]>(),
        any::<Option<u64>>(),
    )
        .prop_map(|(node_id, core_id, counters, log_room_bytes)| CoreStats {
            node_id,
            core_id,
            key_count: counters[0],
            revision: counters[1],
            memory_bytes: counters[2],
            memory_bytes_max: counters[3],
            request_count: counters[4],
            expired_count: counters[5],
            connection_count: counters[6],
            log_record_count: counters[7],
            log_sync_count: counters[8],
            log_byte_count: counters[9],
            log_no_space_count: counters[10],
            log_room_bytes,
            watcher_count: counters[11],
            watch_queued_bytes: counters[12],
        })
}

fn error_code() -> impl Strategy<Value = ErrorCode> {
    prop_oneof![
        Just(ErrorCode::WrongShard),
        Just(ErrorCode::TooLarge),
        Just(ErrorCode::BadFrame),
        Just(ErrorCode::UnsupportedVersion),
        Just(ErrorCode::ShuttingDown),
        Just(ErrorCode::Overloaded),
        Just(ErrorCode::InvalidArgument),
        Just(ErrorCode::StoreFull),
        Just(ErrorCode::Internal),
        Just(ErrorCode::OutOfRange),
        Just(ErrorCode::NoSpace),
        Just(ErrorCode::CrossShard),
        Just(ErrorCode::LeaseNotFound),
        Just(ErrorCode::TableFull),
        Just(ErrorCode::BudgetExceeded),
    ]
}

fn wrong_shard() -> impl Strategy<Value = WrongShard> {
    (
        any::<u64>(),
        0..SLOT_COUNT,
        any::<u32>(),
        any::<u16>(),
        text(),
    )
        .prop_map(
            |(epoch, slot, owner_node_id, owner_core_id, owner_address)| WrongShard {
                epoch,
                slot,
                owner_node_id,
                owner_core_id,
                owner_address,
            },
        )
}

fn error_reply() -> impl Strategy<Value = ErrorReply> {
    (error_code(), text(), proptest::option::of(wrong_shard())).prop_map(
        |(code, message, wrong_shard)| ErrorReply {
            code,
            message,
            wrong_shard,
        },
    )
}

/// Assembles a valid topology: nodes with the given names, core counts and hosts, whose cores
/// own the ranges of `split_slots(total core count)` in order.
fn build_topology(epoch: u64, node_id_base: u32, nodes: &[(String, usize, String)]) -> Topology {
    let core_count_total = nodes.iter().map(|(_, core_count, _)| core_count).sum();
    let mut ranges = split_slots(core_count_total).into_iter();
    let nodes = nodes
        .iter()
        .enumerate()
        .map(|(node_index, (name, core_count, host))| NodeInfo {
            node_id: node_id_base.wrapping_add(u32::try_from(node_index).unwrap()),
            name: name.clone(),
            cores: (0..*core_count)
                .map(|core_index| {
                    let core_id = u16::try_from(core_index).unwrap();
                    CoreInfo {
                        core_id,
                        address: format!("{host}:{}", 7000 + u32::from(core_id)),
                        slots: ranges.next().unwrap(),
                    }
                })
                .collect(),
        })
        .collect();
    assert!(ranges.next().is_none(), "every range is assigned");
    Topology { epoch, nodes }
}

/// A topology of 1..=3 nodes with 1..=4 cores each, valid by construction.
fn topology() -> impl Strategy<Value = Topology> {
    (
        any::<u64>(),
        any::<u32>(),
        vec(
            (text(), 1..=CORE_COUNT_GENERATED_MAX, text()),
            1..=NODE_COUNT_GENERATED_MAX,
        ),
    )
        .prop_map(|(epoch, node_id_base, nodes)| build_topology(epoch, node_id_base, &nodes))
}

fn node_health() -> impl Strategy<Value = NodeHealth> {
    (
        any::<u32>(),
        prop_oneof![
            Just(NodeState::Up),
            Just(NodeState::Down),
            Just(NodeState::Unknown)
        ],
        proptest::option::of(any::<u64>()),
        any::<u64>(),
        any::<u64>(),
    )
        .prop_map(
            |(node_id, state, last_heard_ms, epoch, restarts)| NodeHealth {
                node_id,
                state,
                last_heard_ms,
                epoch,
                restarts,
            },
        )
}

/// Every response variant.
fn response() -> impl Strategy<Value = Response> {
    prop_oneof![
        (
            any::<u16>(),
            any::<u32>(),
            text(),
            topology(),
            vec(node_health(), 0..4)
        )
            .prop_map(
                |(protocol_version, node_id, server_name, topology, health)| Response::Hello {
                    protocol_version,
                    node_id,
                    server_name,
                    topology,
                    health,
                }
            ),
        (any::<u32>(), any::<u16>())
            .prop_map(|(node_id, core_id)| Response::Pong { node_id, core_id }),
        core_stats().prop_map(|stats| Response::Stats(Box::new(stats))),
        proptest::option::of(entry()).prop_map(Response::Value),
        (
            any::<bool>(),
            any::<u64>(),
            any::<u64>(),
            proptest::option::of(entry())
        )
            .prop_map(|(applied, mod_revision, version, previous)| Response::Put {
                applied,
                mod_revision,
                version,
                previous,
            }),
        (any::<bool>(), any::<u64>(), proptest::option::of(entry())).prop_map(
            |(deleted, version, previous)| Response::Delete {
                deleted,
                version,
                previous,
            }
        ),
        any::<bool>().prop_map(|exists| Response::Exists { exists }),
        (any::<bool>(), any::<u64>()).prop_map(|(applied, mod_revision)| Response::Expiry {
            applied,
            mod_revision
        }),
        ttl_state().prop_map(Response::Ttl),
        vec(proptest::option::of(entry()), 0..=BATCH_COUNT_GENERATED_MAX)
            .prop_map(Response::Values),
        vec(any::<u64>(), 0..=BATCH_COUNT_GENERATED_MAX)
            .prop_map(|mod_revisions| Response::MultiPut { mod_revisions }),
        vec(any::<bool>(), 0..=BATCH_COUNT_GENERATED_MAX)
            .prop_map(|deleted| Response::MultiDelete { deleted }),
        error_reply().prop_map(Response::Error),
        (any::<bool>(), any::<i64>(), any::<u64>()).prop_map(|(applied, value, mod_revision)| {
            Response::Counter {
                applied,
                value,
                mod_revision,
            }
        }),
        scan_page().prop_map(Response::Scan),
        watching().prop_map(Response::Watching),
        watch_events().prop_map(Response::WatchEvents),
        any::<u64>().prop_map(|revision| Response::WatchProgress { revision }),
        watch_cancel().prop_map(Response::WatchCancelled),
        any::<bool>().prop_map(|existed| Response::Unwatched { existed }),
        txn_outcome().prop_map(Response::Txn),
        (any::<u64>(), any::<u64>()).prop_map(|(id, ttl_ms)| Response::LeaseGranted { id, ttl_ms }),
        vec(any::<Option<u64>>(), 0..=BATCH_COUNT_GENERATED_MAX)
            .prop_map(|ttls_ms| Response::LeaseKeepalive { ttls_ms }),
        any::<bool>().prop_map(|existed| Response::LeaseRevoked { existed }),
        lease_state().prop_map(Response::LeaseTimeToLive),
        vec(any::<u64>(), 0..=BATCH_COUNT_GENERATED_MAX).prop_map(|ids| Response::Leases { ids }),
        (any::<bool>(), any::<u64>())
            .prop_map(|(acquired, token)| Response::Locked { acquired, token }),
        any::<bool>().prop_map(|released| Response::Unlocked { released }),
        any::<bool>().prop_map(|created| Response::IndexCreated { created }),
        any::<bool>().prop_map(|dropped| Response::IndexDropped { dropped }),
        vec(index_info(), 0..=BATCH_COUNT_GENERATED_MAX).prop_map(Response::Indexes),
        query_page().prop_map(|page| Response::Query(Box::new(page))),
    ]
}

fn index_info() -> impl Strategy<Value = IndexInfo> {
    (
        index_spec(),
        prop_oneof![
            Just(IndexState::Ready),
            (any::<u64>(), any::<u64>()).prop_map(|(keys_done, keys_total)| {
                IndexState::Building {
                    keys_done,
                    keys_total,
                }
            }),
        ],
        any::<u64>(),
        any::<u64>(),
    )
        .prop_map(|(spec, state, entries, memory_bytes)| IndexInfo {
            spec,
            state,
            entries,
            memory_bytes,
        })
}

fn query_item() -> impl Strategy<Value = QueryItem> {
    (
        key(),
        vec(proptest::option::of(field_value()), 0..=QUERY_ORDER_BY_MAX),
        fields(),
        proptest::option::of(entry()),
    )
        .prop_map(|(key, sort, fields, entry)| QueryItem {
            key,
            sort,
            fields,
            entry,
        })
}

fn query_plan() -> impl Strategy<Value = QueryPlan> {
    (
        prop_oneof![
            Just(QueryAccess::Scan),
            (text(), text(), text()).prop_map(|(name, field, lookup)| QueryAccess::Index {
                name,
                field,
                lookup
            }),
        ],
        any::<u64>(),
        any::<u64>(),
        vec(text(), 0..=2),
        any::<bool>(),
    )
        .prop_map(|(access, examined, matched, building, sorted)| QueryPlan {
            access,
            examined,
            matched,
            building,
            sorted,
        })
}

fn query_page() -> impl Strategy<Value = QueryPage> {
    (
        any::<u32>(),
        any::<u16>(),
        any::<u64>(),
        vec(query_item(), 0..=BATCH_COUNT_GENERATED_MAX),
        any::<u64>(),
        any::<bool>(),
        query_plan(),
    )
        .prop_map(
            |(node_id, core_id, revision, items, count, more, plan)| QueryPage {
                node_id,
                core_id,
                revision,
                items,
                count,
                more,
                plan,
            },
        )
}

fn lease_state() -> impl Strategy<Value = LeaseState> {
    (
        any::<bool>(),
        any::<Option<u64>>(),
        any::<Option<u64>>(),
        keys(),
        any::<bool>(),
    )
        .prop_map(|(is_home, ttl_ms, remaining_ms, keys, more)| LeaseState {
            is_home,
            ttl_ms,
            remaining_ms,
            keys,
            more,
        })
}

/// Either kind of message, so streams can mix them.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Message {
    Request(Request),
    Response(Response),
}

impl Message {
    fn kind(&self) -> FrameKind {
        match self {
            Self::Request(_) => FrameKind::Request,
            Self::Response(_) => FrameKind::Response,
        }
    }

    /// Appends this message's frame to `out`.
    fn encode(&self, out: &mut FrameBuffer, request_id: u64) {
        match self {
            Self::Request(request) => codec::encode_request(out, request_id, request),
            Self::Response(response) => codec::encode_response(out, request_id, response),
        }
        .expect("a generated message fits in a frame");
    }

    /// Decodes a body as the message `kind` says it holds.
    fn decode(kind: Option<FrameKind>, body: &[u8]) -> Result<Self, ProtocolError> {
        match kind.expect("decode_frame accepts only known kinds") {
            FrameKind::Request => codec::decode_request(body).map(Self::Request),
            FrameKind::Response => codec::decode_response(body).map(Self::Response),
        }
    }
}

fn message() -> impl Strategy<Value = Message> {
    prop_oneof![
        request().prop_map(Message::Request),
        response().prop_map(Message::Response),
    ]
}

fn frame_kind() -> impl Strategy<Value = FrameKind> {
    prop_oneof![Just(FrameKind::Request), Just(FrameKind::Response)]
}

// ---------------------------------------------------------------------------------------------
// Helpers.

fn request_variant(request: &Request) -> usize {
    match request {
        Request::Hello { .. } => 0,
        Request::Ping => 1,
        Request::Stats => 2,
        Request::Get { .. } => 3,
        Request::Put(_) => 4,
        Request::Delete(_) => 5,
        Request::Exists { .. } => 6,
        Request::Expire { .. } => 7,
        Request::Persist { .. } => 8,
        Request::Ttl { .. } => 9,
        Request::MultiGet { .. } => 10,
        Request::MultiPut { .. } => 11,
        Request::MultiDelete { .. } => 12,
        Request::Add(_) => 13,
        Request::Scan(_) => 14,
        Request::Watch(_) => 15,
        Request::Unwatch { .. } => 16,
        Request::WatchProgress { .. } => 17,
        Request::Txn(_) => 18,
        Request::LeaseGrant { .. } => 19,
        Request::LeaseKeepalive { .. } => 20,
        Request::LeaseRevoke { .. } => 21,
        Request::LeaseTimeToLive { .. } => 22,
        Request::LeaseList => 23,
        Request::Lock { .. } => 24,
        Request::Unlock { .. } => 25,
        Request::CreateIndex(_) => 26,
        Request::DropIndex { .. } => 27,
        Request::ListIndexes => 28,
        Request::Query(_) => 29,
    }
}

fn response_variant(response: &Response) -> usize {
    match response {
        Response::Hello { .. } => 0,
        Response::Pong { .. } => 1,
        Response::Stats(_) => 2,
        Response::Value(_) => 3,
        Response::Put { .. } => 4,
        Response::Delete { .. } => 5,
        Response::Exists { .. } => 6,
        Response::Expiry { .. } => 7,
        Response::Ttl(_) => 8,
        Response::Values(_) => 9,
        Response::MultiPut { .. } => 10,
        Response::MultiDelete { .. } => 11,
        Response::Error(_) => 12,
        Response::Counter { .. } => 13,
        Response::Scan(_) => 14,
        Response::Watching(_) => 15,
        Response::WatchEvents(_) => 16,
        Response::WatchProgress { .. } => 17,
        Response::WatchCancelled(_) => 18,
        Response::Unwatched { .. } => 19,
        Response::Txn(_) => 20,
        Response::LeaseGranted { .. } => 21,
        Response::LeaseKeepalive { .. } => 22,
        Response::LeaseRevoked { .. } => 23,
        Response::LeaseTimeToLive(_) => 24,
        Response::Leases { .. } => 25,
        Response::Locked { .. } => 26,
        Response::Unlocked { .. } => 27,
        Response::IndexCreated { .. } => 28,
        Response::IndexDropped { .. } => 29,
        Response::Indexes(_) => 30,
        Response::Query(_) => 31,
    }
}

fn encode(request_id: u64, message: &Message) -> FrameBuffer {
    let mut buffer = FrameBuffer::new();
    message.encode(&mut buffer, request_id);
    buffer
}

fn aligned_copy(bytes: &[u8]) -> FrameBuffer {
    let mut buffer = FrameBuffer::new();
    buffer.extend_from_slice(bytes);
    buffer
}

/// Whether a body may be handed to rkyv: an empty slice has no address worth checking (an empty
/// `FrameBuffer` hands out a dangling pointer), any other must start 16-aligned.
fn is_aligned(bytes: &[u8]) -> bool {
    bytes.is_empty() || bytes.as_ptr().addr() % FRAME_ALIGNMENT == 0
}

/// Removes the first `size` bytes, the way a connection compacts its read buffer: only whole
/// frames, so whatever follows stays aligned.
fn remove_front(buffer: &mut FrameBuffer, size: usize) {
    let rest = buffer[size..].to_vec();
    buffer.clear();
    buffer.extend_from_slice(&rest);
}

/// Archives `request` alone and runs `check_request` on the validated archive, as a server does
/// with a request that arrived.
fn check(request: &Request) -> Result<(), RequestError> {
    let mut body = FrameBuffer::new();
    codec::encode_request_body(&mut body, request).expect("the request fits in a frame");
    let archived = codec::access_request(&body).expect("an encoded request validates");
    let result = codec::check_request(archived);
    // The archive must also come back unchanged: refusal is about meaning, not about encoding.
    assert_eq!(&codec::decode_request(&body).unwrap(), request);
    // A client checking the owned request before sending it gets the server's answer.
    assert_eq!(codec::check_owned_request(request), result);
    result
}

/// Feeds an arbitrary body to every body decoder. Each may refuse it; none may panic. A body
/// that validates must deserialize, and the value must survive its own round trip.
fn exercise_body(body: &[u8]) {
    assert!(is_aligned(body), "bodies are handed over aligned");
    match codec::access_request(body) {
        Ok(archived) => {
            let checked = codec::check_request(archived);
            let request = codec::decode_request(body).expect("a validated request deserializes");
            let mut again = FrameBuffer::new();
            codec::encode_request_body(&mut again, &request).unwrap();
            assert_eq!(codec::decode_request(&again).unwrap(), request);
            assert_eq!(
                codec::check_request(codec::access_request(&again).unwrap()),
                checked
            );
        }
        Err(error) => {
            assert_eq!(error.code(), ErrorCode::BadFrame);
            assert!(codec::decode_request(body).is_err());
        }
    }
    match codec::access_response(body) {
        Ok(_) => {
            let response = codec::decode_response(body).expect("a validated response deserializes");
            let mut again = FrameBuffer::new();
            codec::encode_response_body(&mut again, &response).unwrap();
            assert_eq!(codec::decode_response(&again).unwrap(), response);
        }
        Err(error) => {
            assert_eq!(error.code(), ErrorCode::BadFrame);
            assert!(codec::decode_response(body).is_err());
        }
    }
}

/// Decodes frame after frame from the front of `bytes` (copied into an aligned buffer) until
/// one is incomplete or invalid, exercising every body found. Returns the bytes consumed.
fn exercise_stream(bytes: &[u8]) -> usize {
    let buffer = aligned_copy(bytes);
    let mut offset = 0;
    while let Ok(Some(frame)) = codec::decode_frame(&buffer[offset..]) {
        assert_eq!(frame.frame_size % FRAME_ALIGNMENT, 0);
        assert!(frame.frame_size <= buffer.len() - offset);
        assert_eq!(frame.body.len(), frame.header.body_size as usize);
        exercise_body(frame.body);
        offset += frame.frame_size;
    }
    offset
}

/// A frame around `body` whose header and body checksums are both right.
fn frame_around(kind: FrameKind, request_id: u64, body: &[u8]) -> FrameBuffer {
    let mut buffer = FrameBuffer::new();
    codec::encode_frame_with_body(&mut buffer, kind, request_id, body).unwrap();
    buffer
}

fn flip_bit(bytes: &[u8], bit: usize) -> FrameBuffer {
    let mut corrupt = aligned_copy(bytes);
    corrupt[bit / 8] ^= 1 << (bit % 8);
    corrupt
}

// ---------------------------------------------------------------------------------------------
// Round trips.

proptest! {
    #[test]
    fn requests_round_trip(request_id in any::<u64>(), request in request()) {
        let mut buffer = FrameBuffer::new();
        codec::encode_request(&mut buffer, request_id, &request).unwrap();
        prop_assert_eq!(buffer.len() % FRAME_ALIGNMENT, 0);
        prop_assert_eq!(codec::frame_size_needed(&buffer), Some(buffer.len()));

        let frame = codec::decode_frame(&buffer).unwrap().expect("the frame is complete");
        prop_assert_eq!(frame.frame_size, buffer.len());
        prop_assert_eq!(frame.header.request_id, request_id);
        prop_assert_eq!(frame.header.version, PROTOCOL_VERSION);
        prop_assert_eq!(frame.header.frame_kind(), Some(FrameKind::Request));
        prop_assert_eq!(frame.body.len(), frame.header.body_size as usize);
        prop_assert!(is_aligned(frame.body));
        // Padding is zero on the way out, even though receivers do not check it.
        prop_assert!(buffer[FRAME_HEADER_SIZE + frame.body.len()..].iter().all(|&byte| byte == 0));

        let archived = codec::access_request(frame.body).unwrap();
        prop_assert_eq!(codec::check_request(archived), Ok(()));
        prop_assert_eq!(codec::decode_request(frame.body).unwrap(), request.clone());

        // Framing an already archived body yields the very same bytes.
        let mut body = FrameBuffer::new();
        codec::encode_request_body(&mut body, &request).unwrap();
        prop_assert_eq!(&body[..], frame.body);
        prop_assert_eq!(
            &frame_around(FrameKind::Request, request_id, &body)[..],
            &buffer[..]
        );
    }

    #[test]
    fn responses_round_trip(request_id in any::<u64>(), response in response()) {
        if let Response::Hello { topology, .. } = &response {
            prop_assert_eq!(topology.check(), Ok(()));
        }
        let mut buffer = FrameBuffer::new();
        codec::encode_response(&mut buffer, request_id, &response).unwrap();
        prop_assert_eq!(buffer.len() % FRAME_ALIGNMENT, 0);
        prop_assert_eq!(codec::frame_size_needed(&buffer), Some(buffer.len()));

        let frame = codec::decode_frame(&buffer).unwrap().expect("the frame is complete");
        prop_assert_eq!(frame.frame_size, buffer.len());
        prop_assert_eq!(frame.header.request_id, request_id);
        prop_assert_eq!(frame.header.frame_kind(), Some(FrameKind::Response));
        prop_assert_eq!(frame.body.len(), frame.header.body_size as usize);
        prop_assert!(is_aligned(frame.body));
        prop_assert!(buffer[FRAME_HEADER_SIZE + frame.body.len()..].iter().all(|&byte| byte == 0));

        prop_assert!(codec::access_response(frame.body).is_ok());
        prop_assert_eq!(codec::decode_response(frame.body).unwrap(), response.clone());

        let mut body = FrameBuffer::new();
        codec::encode_response_body(&mut body, &response).unwrap();
        prop_assert_eq!(&body[..], frame.body);
        prop_assert_eq!(
            &frame_around(FrameKind::Response, request_id, &body)[..],
            &buffer[..]
        );
    }

    #[test]
    fn frames_back_to_back_decode_in_order(
        frames in vec((any::<u64>(), message()), 1..=FRAME_COUNT_GENERATED_MAX),
    ) {
        let mut buffer = FrameBuffer::new();
        for (request_id, message) in &frames {
            message.encode(&mut buffer, *request_id);
        }
        let mut offset = 0;
        for (request_id, message) in &frames {
            prop_assert_eq!(offset % FRAME_ALIGNMENT, 0);
            let frame = codec::decode_frame(&buffer[offset..])
                .unwrap()
                .expect("the frame is complete");
            prop_assert!(is_aligned(frame.body), "offset={}", offset);
            prop_assert_eq!(frame.header.request_id, *request_id);
            prop_assert_eq!(frame.header.frame_kind(), Some(message.kind()));
            let decoded = Message::decode(frame.header.frame_kind(), frame.body).unwrap();
            prop_assert_eq!(&decoded, message);
            offset += frame.frame_size;
        }
        prop_assert_eq!(offset, buffer.len());
        prop_assert!(matches!(codec::decode_frame(&buffer[offset..]), Ok(None)));
    }

    #[test]
    fn a_stream_split_anywhere_decodes_the_same(
        frames in vec((any::<u64>(), message()), 1..=FRAME_COUNT_GENERATED_MAX),
        chunk_sizes in vec(1..=256_usize, 1..=16),
    ) {
        let mut stream = FrameBuffer::new();
        for (request_id, message) in &frames {
            message.encode(&mut stream, *request_id);
        }
        // A receiver that reads whatever arrived and removes only whole frames from the front.
        let mut receive = FrameBuffer::new();
        let mut decoded = Vec::new();
        let mut sent = 0;
        for chunk_size in chunk_sizes.iter().cycle() {
            if sent == stream.len() {
                break;
            }
            let chunk_size = (*chunk_size).min(stream.len() - sent);
            receive.extend_from_slice(&stream[sent..sent + chunk_size]);
            sent += chunk_size;
            loop {
                let frame_size = match codec::decode_frame(&receive).unwrap() {
                    None => break,
                    Some(frame) => {
                        prop_assert!(is_aligned(frame.body));
                        let message =
                            Message::decode(frame.header.frame_kind(), frame.body).unwrap();
                        decoded.push((frame.header.request_id, message));
                        frame.frame_size
                    }
                };
                remove_front(&mut receive, frame_size);
            }
        }
        prop_assert!(receive.is_empty());
        prop_assert_eq!(decoded, frames);
    }
}

/// The frame drawn byte by byte in `docs/protocol.md` ("Example"): `Get { key: b"user:1" }` with
/// request id 7.
#[rustfmt::skip]
const DOCUMENTED_EXAMPLE_FRAME: [u8; 80] = [
    0x54, 0x53, 0x52, 0x41, 0x01, 0x00, 0x01, 0x00, 0x07, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x28, 0x00, 0x00, 0x00, 0x02, 0x7a, 0x7a, 0xe1, 0x00, 0x00, 0x00, 0x00, 0xef, 0x06, 0xe4, 0x06,
    0x75, 0x73, 0x65, 0x72, 0x3a, 0x31, 0x00, 0x00, 0x03, 0x00, 0x00, 0x00, 0xf4, 0xff, 0xff, 0xff,
    0x06, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
];

/// If this fails, the bytes on the wire changed (an edit to the messages, or an rkyv upgrade that
/// changed its format), and the document and `PROTOCOL_VERSION` must follow.
#[test]
fn the_documented_example_frame_is_exact() {
    let request = Request::Get {
        key: b"user:1".to_vec(),
    };
    let buffer = encode(7, &Message::Request(request.clone()));
    assert_eq!(&buffer[..], &DOCUMENTED_EXAMPLE_FRAME[..]);

    let frame = codec::decode_frame(&buffer).unwrap().unwrap();
    assert_eq!(frame.header.body_size, 40);
    assert_eq!(frame.header.body_checksum, 0xE17A_7A02);
    assert_eq!(frame.frame_size, 80);
    let header_checksum = u32::from_le_bytes([
        DOCUMENTED_EXAMPLE_FRAME[28],
        DOCUMENTED_EXAMPLE_FRAME[29],
        DOCUMENTED_EXAMPLE_FRAME[30],
        DOCUMENTED_EXAMPLE_FRAME[31],
    ]);
    assert_eq!(header_checksum, 0x06E4_06EF);
    assert_eq!(codec::decode_request(frame.body).unwrap(), request);
}

#[test]
fn strategies_cover_every_variant() {
    let mut runner = TestRunner::deterministic();
    let mut requests_seen = BTreeSet::new();
    let mut responses_seen = BTreeSet::new();
    for _ in 0..1024 {
        let request = request().new_tree(&mut runner).unwrap().current();
        requests_seen.insert(request_variant(&request));
        let response = response().new_tree(&mut runner).unwrap().current();
        responses_seen.insert(response_variant(&response));
    }
    assert_eq!(requests_seen.len(), REQUEST_VARIANT_COUNT);
    assert_eq!(responses_seen.len(), RESPONSE_VARIANT_COUNT);
}

// ---------------------------------------------------------------------------------------------
// Truncation and corruption.

proptest! {
    #[test]
    fn every_strict_prefix_is_incomplete(request_id in any::<u64>(), message in message()) {
        let buffer = encode(request_id, &message);
        for length in 0..buffer.len() {
            let result = codec::decode_frame(&buffer[..length]);
            prop_assert!(matches!(result, Ok(None)), "length={} result={:?}", length, result);
            let needed = codec::frame_size_needed(&buffer[..length]);
            let expected = (length >= FRAME_HEADER_SIZE).then_some(buffer.len());
            prop_assert_eq!(needed, expected, "length={}", length);
        }
    }

    #[test]
    fn a_flipped_bit_is_refused_unless_it_is_padding(
        request_id in any::<u64>(),
        message in message(),
        body_bits in vec(any::<Index>(), 32),
    ) {
        let buffer = encode(request_id, &message);
        let original = codec::decode_frame(&buffer).unwrap().unwrap();
        let body_end = FRAME_HEADER_SIZE + original.body.len();

        // Every header bit: the header checksum (or the magic) catches it, and since nothing
        // in a damaged header can be trusted, no request id is reported.
        for bit in 0..FRAME_HEADER_SIZE * 8 {
            let corrupt = flip_bit(&buffer, bit);
            let error = codec::decode_frame(&corrupt).unwrap_err();
            prop_assert_eq!(error.request_id, None, "bit={}", bit);
            prop_assert!(
                matches!(error.error, ProtocolError::BadHeader { .. }),
                "bit={} error={:?}", bit, error
            );
            prop_assert_eq!(error.error.code(), ErrorCode::BadFrame);
        }

        // Sampled body bits: the body checksum catches them; the intact header names the request.
        if !original.body.is_empty() {
            for index in &body_bits {
                let bit = FRAME_HEADER_SIZE * 8 + index.index(original.body.len() * 8);
                let corrupt = flip_bit(&buffer, bit);
                let error = codec::decode_frame(&corrupt).unwrap_err();
                prop_assert_eq!(error.request_id, Some(request_id), "bit={}", bit);
                prop_assert!(
                    matches!(
                        error.error,
                        ProtocolError::BodyChecksum { expected, .. }
                            if expected == original.header.body_checksum
                    ),
                    "bit={} error={:?}", bit, error
                );
                prop_assert_eq!(error.error.code(), ErrorCode::BadFrame);
            }
        }

        // Every padding bit: covered by no checksum and never read, so the frame decodes exactly
        // as before.
        for bit in body_end * 8..buffer.len() * 8 {
            let corrupt = flip_bit(&buffer, bit);
            let frame = codec::decode_frame(&corrupt).unwrap().expect("the frame is complete");
            prop_assert_eq!(frame.header, original.header, "bit={}", bit);
            prop_assert_eq!(frame.body, original.body, "bit={}", bit);
            prop_assert_eq!(frame.frame_size, original.frame_size);
            prop_assert_eq!(
                &Message::decode(frame.header.frame_kind(), frame.body).unwrap(),
                &message
            );
        }
    }
}

/// The exhaustive version of the sampled property above, for two small frames: every single bit.
#[test]
fn every_bit_of_small_frames_is_checked() {
    let frames = [
        // A key of nine bytes, so the body (the key padded to 16 and the 56-byte root) is not a
        // multiple of 16 and the frame has padding.
        Message::Request(Request::Get {
            key: b"user:1".to_vec(),
        }),
        // A value of five bytes, so the body (the value, padded to 8, and the 112-byte root)
        // is 120 bytes, not a multiple of 16, and the frame has padding.
        Message::Response(Response::Value(Some(Entry {
            value: b"fives".to_vec(),
            create_revision: 1,
            mod_revision: 1,
            version: 1,
            expires_at_ms: None,
            fields: Vec::new(),
        }))),
    ];
    for message in &frames {
        let buffer = encode(0x0123_4567_89AB_CDEF, message);
        let original = codec::decode_frame(&buffer).unwrap().unwrap();
        let body_end = FRAME_HEADER_SIZE + original.body.len();
        assert!(body_end < buffer.len(), "these frames have padding");
        for bit in 0..buffer.len() * 8 {
            let corrupt = flip_bit(&buffer, bit);
            let result = codec::decode_frame(&corrupt);
            if bit < body_end * 8 {
                assert!(result.is_err(), "bit={bit}");
            } else {
                let frame = result.unwrap().unwrap();
                assert_eq!(frame.body, original.body, "bit={bit}");
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Header refusals.

proptest! {
    #[test]
    fn an_oversized_body_is_refused_from_the_header_alone(
        request_id in any::<u64>(),
        kind in frame_kind(),
        body_size in u32::try_from(FRAME_BODY_SIZE_MAX).unwrap() + 1..=u32::MAX,
        body_checksum in any::<u32>(),
        body_prefix in vec(any::<u8>(), 0..64),
    ) {
        let header = FrameHeader::new(kind, request_id, body_size, body_checksum);
        let mut bytes = aligned_copy(&header.to_bytes());
        let expected = FrameError {
            request_id: Some(request_id),
            error: ProtocolError::BodyTooLarge {
                body_size: body_size as usize,
                body_size_max: FRAME_BODY_SIZE_MAX,
            },
        };
        // The 32 header bytes alone are enough to refuse; bytes of the body change nothing.
        prop_assert_eq!(codec::decode_frame(&bytes).unwrap_err(), expected.clone());
        bytes.extend_from_slice(&body_prefix);
        prop_assert_eq!(codec::decode_frame(&bytes).unwrap_err(), expected.clone());
        prop_assert_eq!(codec::frame_size_needed(&bytes), None);
        prop_assert_eq!(expected.error.code(), ErrorCode::TooLarge);
    }

    #[test]
    fn another_version_is_refused_with_the_request_id(
        request_id in any::<u64>(),
        version in any::<u16>().prop_filter("another version", |v| *v != PROTOCOL_VERSION),
        kind in any::<u8>(),
        body_size in any::<u32>(),
    ) {
        // Version is checked before every other field, so a future header with fields this
        // version does not understand is still answered "unsupported version".
        let mut header = FrameHeader::new(FrameKind::Request, request_id, body_size, 0);
        header.version = version;
        header.kind = kind;
        let error = codec::decode_frame(&header.to_bytes()).unwrap_err();
        prop_assert_eq!(error.error.code(), ErrorCode::UnsupportedVersion);
        prop_assert_eq!(
            error,
            FrameError {
                request_id: Some(request_id),
                error: ProtocolError::UnsupportedVersion { version, supported: PROTOCOL_VERSION },
            }
        );
    }

    #[test]
    fn an_intact_header_breaking_a_rule_is_refused_with_the_request_id(
        request_id in any::<u64>(),
        rule in 0..3_usize,
        kind in 3..=u8::MAX,
        flags in 1..=u8::MAX,
        reserved in 1..=u32::MAX,
    ) {
        let mut header = FrameHeader::new(FrameKind::Request, request_id, 0, 0);
        let reason = match rule {
            0 => {
                header.kind = kind;
                "unknown frame kind"
            }
            1 => {
                header.flags = flags;
                "unknown flags"
            }
            _ => {
                header.reserved = reserved;
                "reserved field is not zero"
            }
        };
        let error = codec::decode_frame(&header.to_bytes()).unwrap_err();
        prop_assert_eq!(
            &error,
            &FrameError { request_id: Some(request_id), error: ProtocolError::BadHeader { reason } }
        );
        prop_assert_eq!(error.error.code(), ErrorCode::BadFrame);
    }
}

#[test]
fn version_two_is_unsupported() {
    let mut header = FrameHeader::new(FrameKind::Request, 42, 0, 0);
    header.version = 2;
    let error = codec::decode_frame(&header.to_bytes()).unwrap_err();
    assert_eq!(error.request_id, Some(42));
    assert_eq!(
        error.error,
        ProtocolError::UnsupportedVersion {
            version: 2,
            supported: 1
        }
    );
    assert_eq!(error.error.code(), ErrorCode::UnsupportedVersion);
    assert!(!error.error.code().is_retryable());
}

/// The order in which header rules are applied is part of the protocol (`docs/protocol.md`):
/// it decides which error a peer gets back.
#[test]
fn header_rules_apply_in_the_documented_order() {
    let body_size_over = u32::try_from(FRAME_BODY_SIZE_MAX).unwrap() + 1;
    let decode = |header: FrameHeader| codec::decode_frame(&header.to_bytes()).unwrap_err().error;

    // Version before size.
    let mut header = FrameHeader::new(FrameKind::Request, 1, body_size_over, 0);
    header.version = 2;
    assert!(matches!(
        decode(header),
        ProtocolError::UnsupportedVersion { .. }
    ));
    // Size before kind, flags and reserved.
    let mut header = FrameHeader::new(FrameKind::Request, 1, body_size_over, 0);
    header.kind = 0;
    header.flags = 1;
    header.reserved = 1;
    assert!(matches!(decode(header), ProtocolError::BodyTooLarge { .. }));
    // Kind, then flags, then reserved.
    let mut header = FrameHeader::new(FrameKind::Request, 1, 0, 0);
    header.kind = 0;
    header.flags = 1;
    header.reserved = 1;
    assert_eq!(
        decode(header),
        ProtocolError::BadHeader {
            reason: "unknown frame kind"
        }
    );
    header.kind = 1;
    assert_eq!(
        decode(header),
        ProtocolError::BadHeader {
            reason: "unknown flags"
        }
    );
    header.flags = 0;
    assert_eq!(
        decode(header),
        ProtocolError::BadHeader {
            reason: "reserved field is not zero"
        }
    );

    // The largest body allowed is only waited for, not refused.
    let header = FrameHeader::new(
        FrameKind::Request,
        1,
        u32::try_from(FRAME_BODY_SIZE_MAX).unwrap(),
        0,
    );
    assert!(matches!(codec::decode_frame(&header.to_bytes()), Ok(None)));
    assert_eq!(
        codec::frame_size_needed(&header.to_bytes()),
        Some(FRAME_HEADER_SIZE + FRAME_BODY_SIZE_MAX)
    );

    // Bad magic is reported before the header checksum.
    let mut bytes = FrameHeader::new(FrameKind::Request, 1, 0, 0).to_bytes();
    bytes[0] = b'X';
    assert_eq!(
        codec::decode_frame(&bytes).unwrap_err().error,
        ProtocolError::BadHeader {
            reason: "bad magic"
        }
    );
}

// ---------------------------------------------------------------------------------------------
// Garbage.

proptest! {
    #[test]
    fn garbage_streams_never_panic(bytes in vec(any::<u8>(), 0..2048)) {
        exercise_stream(&bytes);
    }

    #[test]
    fn garbage_bodies_never_panic(bytes in vec(any::<u8>(), 0..2048)) {
        exercise_body(&aligned_copy(&bytes));
    }

    /// Random bytes almost never pass the header checksum; these do, so the garbage reaches the
    /// body decoders through `decode_frame` exactly as it would from a peer.
    #[test]
    fn garbage_behind_a_valid_header_never_panics(
        request_id in any::<u64>(),
        kind in frame_kind(),
        body in vec(any::<u8>(), 0..2048),
    ) {
        let buffer = frame_around(kind, request_id, &body);
        let frame = codec::decode_frame(&buffer).unwrap().expect("the frame is complete");
        prop_assert_eq!(frame.body, &body[..]);
        prop_assert_eq!(exercise_stream(&buffer), buffer.len());
    }

    /// A real archive with a few bytes overwritten gets much further through validation than
    /// random bytes do, and reaches `check_request` with strange but well-formed values.
    #[test]
    fn mutated_archives_never_panic(
        message in message(),
        mutations in vec((any::<Index>(), any::<u8>()), 1..=4),
    ) {
        let mut body = FrameBuffer::new();
        match &message {
            Message::Request(request) => codec::encode_request_body(&mut body, request),
            Message::Response(response) => codec::encode_response_body(&mut body, response),
        }
        .unwrap();
        for (index, byte) in &mutations {
            let position = index.index(body.len());
            body[position] = *byte;
        }
        exercise_body(&body);
    }
}

#[test]
fn empty_and_tiny_bodies_are_refused() {
    for size in 0..=FRAME_ALIGNMENT {
        let body = aligned_copy(&vec![0xA5; size]);
        assert!(codec::access_request(&body).is_err(), "size={size}");
        assert!(codec::access_response(&body).is_err(), "size={size}");
    }
    exercise_body(&FrameBuffer::new());
}

// ---------------------------------------------------------------------------------------------
// check_request.

/// One request of every variant that carries keys, with `key` in it.
fn requests_with_key(key: &[u8]) -> Vec<Request> {
    let key = key.to_vec();
    vec![
        Request::Get { key: key.clone() },
        Request::Put(Box::new(Put::new(key.clone(), "v"))),
        Request::Delete(Box::new(Delete {
            return_previous: true,
            ..Delete::new(key.clone())
        })),
        Request::Exists { key: key.clone() },
        Request::Expire {
            key: key.clone(),
            ttl_ms: 1000,
        },
        Request::Persist { key: key.clone() },
        Request::Ttl { key: key.clone() },
        Request::MultiGet {
            keys: vec![b"fine".to_vec(), key.clone()],
        },
        Request::MultiPut {
            entries: vec![PutEntry {
                key: key.clone(),
                value: b"v".to_vec(),
                ttl_ms: None,
                fields: Vec::new(),
            }],
        },
        Request::MultiDelete {
            keys: vec![b"fine".to_vec(), key.clone()],
        },
        Request::Add(Box::new(CounterAdd::new(key.clone(), 1))),
        // A transaction checks the key of every compare and of every op that names one.
        Request::Txn(Box::new(Txn::new().when([
            Compare::exists("fine"),
            Compare::value(key.clone(), CompareOp::Equal, "v"),
        ]))),
        Request::Txn(Box::new(
            Txn::new().then([TxnOp::get("fine"), TxnOp::get(key.clone())]),
        )),
        Request::Txn(Box::new(Txn::new().then([TxnOp::put(key.clone(), "v")]))),
        Request::Txn(Box::new(Txn::new().then([TxnOp::delete(key.clone())]))),
        Request::Txn(Box::new(Txn::new().then([TxnOp::add(key.clone(), 1)]))),
        Request::Txn(Box::new(
            Txn::new()
                .when([Compare::exists("fine")])
                .otherwise([TxnOp::get(key.clone())]),
        )),
        // A lock's name is bounded like a key, in a lock, an unlock and a fenced compare.
        Request::Txn(Box::new(
            Txn::new().when([Compare::exists("fine"), Compare::fence(key.clone(), 7)]),
        )),
        Request::Lock {
            name: key.clone(),
            lease: 1,
            wait_ms: 0,
        },
        Request::Unlock {
            name: key,
            token: 1,
        },
    ]
}

/// One request of every variant that carries values, with `value` in it.
fn requests_with_value(value: &[u8]) -> Vec<Request> {
    vec![
        Request::Put(Box::new(Put::new("k", value))),
        // So is the value a compare-and-delete or a transaction's compare expects.
        Request::Delete(Box::new(Delete {
            condition: DeleteCondition::IfValue(value.to_vec()),
            ..Delete::new("k")
        })),
        Request::Txn(Box::new(Txn::new().when([
            Compare::exists("k"),
            Compare::value("k", CompareOp::Less, value),
        ]))),
        Request::Txn(Box::new(
            Txn::new().then([TxnOp::get("fine"), TxnOp::put("k", value)]),
        )),
        // The value a compare-and-set expects is bounded like a value.
        Request::Put(Box::new(Put {
            condition: PutCondition::IfValue(value.to_vec()),
            ..Put::new("k", "new")
        })),
        Request::MultiPut {
            entries: vec![
                PutEntry {
                    key: b"fine".to_vec(),
                    value: Vec::new(),
                    ttl_ms: None,
                    fields: Vec::new(),
                },
                PutEntry {
                    key: b"k".to_vec(),
                    value: value.to_vec(),
                    ttl_ms: None,
                    fields: Vec::new(),
                },
            ],
        },
    ]
}

/// One request of every variant that carries a TTL, with `ttl_ms` in it.
fn requests_with_ttl(ttl_ms: u64) -> Vec<Request> {
    let mut put = Put::new("k", "v");
    put.ttl_ms = Some(ttl_ms);
    let add = CounterAdd {
        ttl_ms: Some(ttl_ms),
        ..CounterAdd::new("k", 1)
    };
    let refreshing_add = CounterAdd {
        refresh_ttl: true,
        ..add.clone()
    };
    let txn_put = TxnOp::Put {
        key: b"k".to_vec(),
        value: b"v".to_vec(),
        ttl_ms: Some(ttl_ms),
        keep_ttl: false,
        return_previous: false,
        lease: None,
        fields: Vec::new(),
    };
    vec![
        Request::Put(Box::new(put)),
        Request::Add(Box::new(add.clone())),
        Request::Add(Box::new(refreshing_add)),
        // A lease's TTL is bounded like a key's.
        Request::LeaseGrant { ttl_ms },
        // A put's TTL is checked whether or not it names a lease.
        Request::Put(Box::new(Put {
            ttl_ms: Some(ttl_ms),
            lease: Some(1),
            ..Put::new("k", "v")
        })),
        Request::Txn(Box::new(Txn::new().then([txn_put]))),
        Request::Txn(Box::new(Txn::new().otherwise([TxnOp::Add(add)]))),
        Request::Expire {
            key: b"k".to_vec(),
            ttl_ms,
        },
        Request::MultiPut {
            entries: vec![PutEntry {
                key: b"k".to_vec(),
                value: b"v".to_vec(),
                ttl_ms: Some(ttl_ms),
                fields: Vec::new(),
            }],
        },
    ]
}

/// One request of every batch variant, with `count` items.
fn batches_of(count: usize) -> Vec<Request> {
    let keys = vec![b"k".to_vec(); count];
    vec![
        Request::LeaseKeepalive {
            ids: vec![1; count],
        },
        Request::MultiGet { keys: keys.clone() },
        Request::MultiDelete { keys },
        Request::MultiPut {
            entries: vec![
                PutEntry {
                    key: b"k".to_vec(),
                    value: Vec::new(),
                    ttl_ms: None,
                    fields: Vec::new(),
                };
                count
            ],
        },
    ]
}

/// A scan's bounds may be empty (the start or end of the keyspace) or up to a key's size,
/// and its limit must be `1..=SCAN_LIMIT_MAX` unless it only counts.
#[test]
fn scan_bounds_and_limits_are_checked() {
    let long = vec![b'k'; KEY_SIZE_MAX];
    let too_long = vec![b'k'; KEY_SIZE_MAX + 1];
    for scan in [
        Scan::range(Vec::new(), None, 1),
        Scan::range(long.clone(), Some(long.clone()), SCAN_LIMIT_MAX),
        Scan::range(Vec::new(), Some(Vec::new()), 5),
        Scan {
            count_only: true,
            ..Scan::range("a", None, 0)
        },
    ] {
        assert_eq!(check(&Request::Scan(scan.clone())), Ok(()), "{scan:?}");
    }
    for scan in [
        Scan::range(too_long.clone(), None, 1),
        Scan::range("a", Some(too_long), 1),
    ] {
        let error = check(&Request::Scan(scan)).unwrap_err();
        assert!(
            matches!(error, RequestError::KeyTooLarge { .. }),
            "{error:?}"
        );
    }
    for limit in [0, SCAN_LIMIT_MAX + 1] {
        let error = check(&Request::Scan(Scan::range("a", None, limit))).unwrap_err();
        assert_eq!(
            error,
            RequestError::ScanLimitOutOfRange {
                limit,
                limit_max: SCAN_LIMIT_MAX
            }
        );
        assert_eq!(error.code(), ErrorCode::InvalidArgument);
    }
}

/// A watch's bounds may be empty (the start or end of the keyspace) or up to a key's size.
#[test]
fn watch_bounds_are_checked() {
    let long = vec![b'k'; KEY_SIZE_MAX];
    let too_long = vec![b'k'; KEY_SIZE_MAX + 1];
    let mut long_end = long.clone();
    *long_end.last_mut().unwrap() = b'l';
    for watch in [
        Watch::range(Vec::new(), None),
        Watch::range("a", Some(b"b".to_vec())),
        Watch::range(long.clone(), None),
        Watch::range(long, Some(long_end)),
        Watch::range(Vec::new(), Some(vec![b'z'; KEY_SIZE_MAX])),
    ] {
        assert_eq!(
            check(&Request::Watch(Box::new(watch.clone()))),
            Ok(()),
            "{watch:?}"
        );
    }
    for watch in [
        Watch::range(too_long.clone(), None),
        Watch::range(too_long.clone(), Some(vec![b'z'; 8])),
        Watch::range("a", Some(too_long.clone())),
    ] {
        let error = check(&Request::Watch(Box::new(watch.clone()))).unwrap_err();
        assert_eq!(
            error,
            RequestError::KeyTooLarge {
                size: too_long.len(),
                size_max: KEY_SIZE_MAX
            },
            "{watch:?}"
        );
        assert_eq!(error.code(), ErrorCode::TooLarge);
    }
}

/// A watch whose end is not after its start can never see a key, so it is refused rather than
/// left open as a silent stream.
#[test]
fn a_watch_of_an_empty_range_is_refused() {
    for (start, end) in [
        (&b"a"[..], &b"a"[..]),
        (b"b", b"a"),
        (b"ab", b"a"),
        (b"a", b""),
        (b"", b""),
    ] {
        let watch = Watch::range(start, Some(end.to_vec()));
        let error = check(&Request::Watch(Box::new(watch.clone()))).unwrap_err();
        assert_eq!(error, RequestError::EmptyRange, "{watch:?}");
        assert_eq!(error.code(), ErrorCode::InvalidArgument);
    }
    // The smallest range that is not empty: one key.
    let one_key = Watch::range("a", Some(b"a\0".to_vec()));
    assert_eq!(check(&Request::Watch(Box::new(one_key))), Ok(()));
}

#[test]
fn a_watch_must_deliver_puts_or_deletes() {
    for (puts, deletes) in [(true, false), (false, true), (true, true)] {
        let watch = Watch {
            puts,
            deletes,
            ..Watch::range("a", None)
        };
        assert_eq!(
            check(&Request::Watch(Box::new(watch.clone()))),
            Ok(()),
            "{watch:?}"
        );
    }
    let watch = Watch {
        puts: false,
        deletes: false,
        ..Watch::range("a", None)
    };
    let error = check(&Request::Watch(Box::new(watch))).unwrap_err();
    assert_eq!(error, RequestError::WatchesNothing);
    assert_eq!(error.code(), ErrorCode::InvalidArgument);
}

/// The progress interval is 0 (none) or `WATCH_PROGRESS_INTERVAL_MS_MIN..=MAX`.
#[test]
fn watch_progress_intervals_are_checked() {
    let with_interval = |progress_interval_ms| {
        Request::Watch(Box::new(Watch {
            progress_interval_ms,
            ..Watch::range("a", None)
        }))
    };
    for interval_ms in [
        0,
        WATCH_PROGRESS_INTERVAL_MS_MIN,
        WATCH_PROGRESS_INTERVAL_MS_MAX,
    ] {
        assert_eq!(check(&with_interval(interval_ms)), Ok(()), "{interval_ms}");
    }
    for interval_ms in [
        1,
        WATCH_PROGRESS_INTERVAL_MS_MIN - 1,
        WATCH_PROGRESS_INTERVAL_MS_MAX + 1,
        u32::MAX,
    ] {
        let error = check(&with_interval(interval_ms)).unwrap_err();
        assert_eq!(
            error,
            RequestError::ProgressIntervalOutOfRange {
                interval_ms,
                interval_ms_min: WATCH_PROGRESS_INTERVAL_MS_MIN,
                interval_ms_max: WATCH_PROGRESS_INTERVAL_MS_MAX,
            }
        );
        assert_eq!(error.code(), ErrorCode::InvalidArgument);
    }
}

#[test]
fn empty_keys_are_refused() {
    for request in requests_with_key(b"") {
        let error = check(&request).unwrap_err();
        assert_eq!(error, RequestError::EmptyKey, "{request:?}");
        assert_eq!(error.code(), ErrorCode::InvalidArgument);
    }
}

#[test]
fn limits_themselves_are_accepted() {
    for request in requests_with_key(&vec![b'k'; KEY_SIZE_MAX]) {
        assert_eq!(check(&request), Ok(()));
    }
    for request in requests_with_value(&vec![b'v'; VALUE_SIZE_MAX]) {
        assert_eq!(check(&request), Ok(()));
    }
    for ttl_ms in [1, TTL_MS_MAX] {
        for request in requests_with_ttl(ttl_ms) {
            assert_eq!(check(&request), Ok(()));
        }
    }
    for count in [0, BATCH_COUNT_MAX] {
        for request in batches_of(count) {
            assert_eq!(check(&request), Ok(()));
        }
    }
    let hello = Request::Hello {
        protocol_version: PROTOCOL_VERSION,
        client_name: "n".repeat(TEXT_SIZE_MAX),
    };
    assert_eq!(check(&hello), Ok(()));
    assert_eq!(check(&Request::Ping), Ok(()));
    assert_eq!(check(&Request::Stats), Ok(()));
    for watch_id in [0, u64::MAX] {
        assert_eq!(check(&Request::Unwatch { watch_id }), Ok(()));
        assert_eq!(check(&Request::WatchProgress { watch_id }), Ok(()));
    }
    assert_eq!(check(&Request::LeaseList), Ok(()));
    for wait_ms in [0, LOCK_WAIT_MS_MAX] {
        let lock = Request::Lock {
            name: b"lock".to_vec(),
            lease: 1,
            wait_ms,
        };
        assert_eq!(check(&lock), Ok(()), "{lock:?}");
    }
    for id in [1, u64::MAX] {
        for request in requests_with_lease(id) {
            assert_eq!(check(&request), Ok(()), "{request:?}");
        }
    }
}

#[test]
fn a_batch_is_counted_before_its_items_are_checked() {
    for request in [
        Request::MultiGet {
            keys: vec![Vec::new(); BATCH_COUNT_MAX + 1],
        },
        Request::LeaseKeepalive {
            ids: vec![0; BATCH_COUNT_MAX + 1],
        },
    ] {
        assert_eq!(
            check(&request),
            Err(RequestError::BatchTooLarge {
                count: BATCH_COUNT_MAX + 1,
                count_max: BATCH_COUNT_MAX
            }),
            "{request:?}"
        );
    }
}

/// One request of every variant that names a lease, naming `id`.
fn requests_with_lease(id: u64) -> Vec<Request> {
    vec![
        Request::Put(Box::new(Put {
            lease: Some(id),
            ..Put::new("k", "v")
        })),
        Request::LeaseKeepalive { ids: vec![id] },
        // Every id of a keepalive is checked, not only the first.
        Request::LeaseKeepalive { ids: vec![7, id] },
        Request::LeaseRevoke { id },
        Request::LeaseTimeToLive { id },
        Request::Lock {
            name: b"lock".to_vec(),
            lease: id,
            wait_ms: 1_000,
        },
    ]
}

/// Lease id 0 names no lease: every request that names one refuses it, as an invalid
/// argument. A put without a lease (`None`) is not a put naming lease 0.
#[test]
fn lease_zero_is_refused() {
    for request in requests_with_lease(0) {
        let error = check(&request).unwrap_err();
        assert_eq!(error, RequestError::ZeroLease, "{request:?}");
        assert_eq!(error.code(), ErrorCode::InvalidArgument);
    }
    assert_eq!(check(&Request::Put(Box::new(Put::new("k", "v")))), Ok(()));
}

/// A put is checked key, value, expected value, lease, then TTL: the first that breaks a
/// rule is the one reported.
#[test]
fn a_put_checks_its_lease_after_its_value_and_before_its_ttl() {
    let put = |value: Vec<u8>, ttl_ms: u64| {
        Request::Put(Box::new(Put {
            ttl_ms: Some(ttl_ms),
            lease: Some(0),
            ..Put::new("k", value)
        }))
    };
    assert_eq!(
        check(&put(vec![b'v'; VALUE_SIZE_MAX + 1], 0)),
        Err(RequestError::ValueTooLarge {
            size: VALUE_SIZE_MAX + 1,
            size_max: VALUE_SIZE_MAX
        })
    );
    assert_eq!(check(&put(b"v".to_vec(), 0)), Err(RequestError::ZeroLease));
}

/// A keepalive's batch bound is exactly `BATCH_COUNT_MAX` ids.
#[test]
fn a_keepalive_holds_at_most_a_batch_of_ids() {
    let keepalive = |count: usize| Request::LeaseKeepalive {
        ids: (1..=count as u64).collect(),
    };
    assert_eq!(check(&keepalive(0)), Ok(()));
    assert_eq!(check(&keepalive(BATCH_COUNT_MAX)), Ok(()));
    let error = check(&keepalive(BATCH_COUNT_MAX + 1)).unwrap_err();
    assert_eq!(
        error,
        RequestError::BatchTooLarge {
            count: BATCH_COUNT_MAX + 1,
            count_max: BATCH_COUNT_MAX
        }
    );
    assert_eq!(error.code(), ErrorCode::TooLarge);
}

/// The lease error codes: only a full table is worth retrying.
#[test]
fn lease_error_codes_are_named_and_only_a_full_table_is_retryable() {
    assert!(ErrorCode::TableFull.is_retryable());
    assert!(!ErrorCode::LeaseNotFound.is_retryable());
    assert_eq!(ErrorCode::TableFull.as_str(), "table_full");
    assert_eq!(ErrorCode::LeaseNotFound.as_str(), "lease_not_found");
}

fn lock(name: impl Into<Vec<u8>>, lease: u64, wait_ms: u32) -> Request {
    Request::Lock {
        name: name.into(),
        lease,
        wait_ms,
    }
}

/// A lock checks its name (like a key), then its lease, then its wait: the first that breaks
/// a rule is the one reported.
#[test]
fn a_lock_checks_its_name_then_its_lease_then_its_wait() {
    let wait_over = LOCK_WAIT_MS_MAX + 1;
    assert_eq!(check(&lock("", 0, wait_over)), Err(RequestError::EmptyKey));
    assert_eq!(
        check(&lock(vec![b'k'; KEY_SIZE_MAX + 1], 0, wait_over)),
        Err(RequestError::KeyTooLarge {
            size: KEY_SIZE_MAX + 1,
            size_max: KEY_SIZE_MAX
        })
    );
    assert_eq!(
        check(&lock("lock", 0, wait_over)),
        Err(RequestError::ZeroLease)
    );
    assert_eq!(
        check(&lock("lock", 1, wait_over)),
        Err(RequestError::LockWaitOutOfRange {
            wait_ms: wait_over,
            wait_ms_max: LOCK_WAIT_MS_MAX
        })
    );
    assert_eq!(check(&lock("lock", 1, LOCK_WAIT_MS_MAX)), Ok(()));
}

/// Any token may be named: an unlock with a token never granted releases nothing, and a
/// fence of 0 holds only for a lock never granted. Neither is the checker's to refuse.
#[test]
fn unlocks_and_fences_take_any_token() {
    for token in [0, 1, u64::MAX] {
        let unlock = Request::Unlock {
            name: b"lock".to_vec(),
            token,
        };
        assert_eq!(check(&unlock), Ok(()), "{unlock:?}");
        let fenced = Request::Txn(Box::new(
            Txn::new()
                .when([Compare::fence("lock", token)])
                .then([TxnOp::put("k", "v")]),
        ));
        assert_eq!(check(&fenced), Ok(()), "{fenced:?}");
    }
    assert_eq!(
        Compare::fence("lock", 9),
        Compare {
            key: b"lock".to_vec(),
            check: Check::Fence(9)
        }
    );
}

proptest! {
    /// A wait over `LOCK_WAIT_MS_MAX` is an invalid argument, and its message carries both
    /// numbers.
    #[test]
    fn lock_waits_over_the_limit_are_refused(wait_ms in LOCK_WAIT_MS_MAX + 1..=u32::MAX) {
        let error = check(&lock("lock", 1, wait_ms)).unwrap_err();
        prop_assert_eq!(
            &error,
            &RequestError::LockWaitOutOfRange { wait_ms, wait_ms_max: LOCK_WAIT_MS_MAX }
        );
        prop_assert_eq!(error.code(), ErrorCode::InvalidArgument);
        let message = error.to_string();
        prop_assert!(message.contains(&wait_ms.to_string()), "{}", message);
        prop_assert!(message.contains(&LOCK_WAIT_MS_MAX.to_string()), "{}", message);
    }

    #[test]
    fn lock_waits_within_the_limit_are_accepted(
        name in key(),
        lease in lease_id(),
        wait_ms in 0..=LOCK_WAIT_MS_MAX,
    ) {
        prop_assert_eq!(check(&lock(name, lease, wait_ms)), Ok(()));
    }
}

/// The documented layout of a lease id: node in bits 63..48, core in 47..36, sequence in
/// 35..0.
#[test]
fn lease_ids_follow_the_documented_layout() {
    let id = LeaseId::new(0x1234, 0xABC, 0x9_8765_4321).unwrap();
    assert_eq!(id.0, 0x1234_ABC9_8765_4321);
    let max = LeaseId::new(
        LeaseId::NODE_ID_MAX,
        LeaseId::CORE_ID_MAX,
        LeaseId::SEQUENCE_MAX,
    )
    .unwrap();
    assert_eq!(max.0, u64::MAX);
    assert_eq!(LeaseId::new(0, 0, 1).unwrap().0, 1);
    // No lease has id 0, and each field is bounded.
    assert_eq!(LeaseId::new(0, 0, 0), None);
    assert_eq!(LeaseId::new(LeaseId::NODE_ID_MAX + 1, 0, 1), None);
    assert_eq!(LeaseId::new(0, LeaseId::CORE_ID_MAX + 1, 1), None);
    assert_eq!(LeaseId::new(0, 0, LeaseId::SEQUENCE_MAX + 1), None);
}

proptest! {
    /// Every id `LeaseId::new` makes gives back its node, core and sequence, and ids of one
    /// home shard sort by sequence.
    #[test]
    fn lease_ids_round_trip_their_fields(
        node_id in 0..=LeaseId::NODE_ID_MAX,
        core_id in 0..=LeaseId::CORE_ID_MAX,
        sequence in 1..LeaseId::SEQUENCE_MAX,
    ) {
        let id = LeaseId::new(node_id, core_id, sequence).unwrap();
        prop_assert_eq!(id.node_id(), node_id);
        prop_assert_eq!(id.core_id(), core_id);
        prop_assert_eq!(id.sequence(), sequence);
        prop_assert_ne!(id.0, 0);
        let next = LeaseId::new(node_id, core_id, sequence + 1).unwrap();
        prop_assert!(next > id);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(16))]

    #[test]
    fn oversized_keys_are_refused(size_over in 1..=64_usize, fill in any::<u8>()) {
        let key = vec![fill; KEY_SIZE_MAX + size_over];
        for request in requests_with_key(&key) {
            let error = check(&request).unwrap_err();
            prop_assert_eq!(
                &error,
                &RequestError::KeyTooLarge { size: key.len(), size_max: KEY_SIZE_MAX }
            );
            prop_assert_eq!(error.code(), ErrorCode::TooLarge);
        }
    }

    #[test]
    fn oversized_values_are_refused(size_over in 1..=64_usize, fill in any::<u8>()) {
        let value = vec![fill; VALUE_SIZE_MAX + size_over];
        for request in requests_with_value(&value) {
            let error = check(&request).unwrap_err();
            prop_assert_eq!(
                &error,
                &RequestError::ValueTooLarge { size: value.len(), size_max: VALUE_SIZE_MAX }
            );
            prop_assert_eq!(error.code(), ErrorCode::TooLarge);
        }
    }

    #[test]
    fn oversized_batches_are_refused(count_over in 1..=8_usize) {
        let count = BATCH_COUNT_MAX + count_over;
        for request in batches_of(count) {
            let error = check(&request).unwrap_err();
            prop_assert_eq!(
                &error,
                &RequestError::BatchTooLarge { count, count_max: BATCH_COUNT_MAX }
            );
            prop_assert_eq!(error.code(), ErrorCode::TooLarge);
        }
    }

    #[test]
    fn oversized_client_names_are_refused(size_over in 1..=64_usize) {
        let client_name = "n".repeat(TEXT_SIZE_MAX + size_over);
        let size = client_name.len();
        let hello = Request::Hello { protocol_version: PROTOCOL_VERSION, client_name };
        let error = check(&hello).unwrap_err();
        prop_assert_eq!(&error, &RequestError::TextTooLarge { size, size_max: TEXT_SIZE_MAX });
        prop_assert_eq!(error.code(), ErrorCode::TooLarge);
    }
}

proptest! {
    #[test]
    fn ttls_outside_the_range_are_refused(
        ttl_ms in prop_oneof![Just(0), TTL_MS_MAX + 1..=u64::MAX],
    ) {
        for request in requests_with_ttl(ttl_ms) {
            let error = check(&request).unwrap_err();
            prop_assert_eq!(
                &error,
                &RequestError::TtlOutOfRange { ttl_ms, ttl_ms_max: TTL_MS_MAX }
            );
            prop_assert_eq!(error.code(), ErrorCode::InvalidArgument);
        }
    }

    #[test]
    fn ttls_inside_the_range_are_accepted(ttl_ms in ttl_ms()) {
        for request in requests_with_ttl(ttl_ms) {
            prop_assert_eq!(check(&request), Ok(()));
        }
    }

    #[test]
    fn watch_progress_intervals_outside_the_range_are_refused(
        interval_ms in prop_oneof![
            1..WATCH_PROGRESS_INTERVAL_MS_MIN,
            WATCH_PROGRESS_INTERVAL_MS_MAX + 1..=u32::MAX,
        ],
    ) {
        let watch = Watch { progress_interval_ms: interval_ms, ..Watch::range("a", None) };
        prop_assert_eq!(
            check(&Request::Watch(Box::new(watch))),
            Err(RequestError::ProgressIntervalOutOfRange {
                interval_ms,
                interval_ms_min: WATCH_PROGRESS_INTERVAL_MS_MIN,
                interval_ms_max: WATCH_PROGRESS_INTERVAL_MS_MAX,
            })
        );
    }
}

/// A branch names each key in one op at most (ranges name none); the same key may appear in
/// both branches, in several compares, or in a compare and an op.
#[test]
fn a_txn_branch_names_each_key_once() {
    let range = || TxnOp::Range(Scan::prefix(b"k", 10));
    for txn in [
        Txn::new().then([TxnOp::get("a"), TxnOp::put("b", "v"), range(), range()]),
        Txn::new()
            .then([TxnOp::put("a", "v")])
            .otherwise([TxnOp::delete("a")]),
        Txn::new()
            .when([
                Compare::exists("a"),
                Compare::version("a", CompareOp::Less, 3),
            ])
            .then([TxnOp::add("a", 1)]),
    ] {
        assert_eq!(
            check(&Request::Txn(Box::new(txn.clone()))),
            Ok(()),
            "{txn:?}"
        );
    }
    for txn in [
        Txn::new().then([TxnOp::get("dup"), TxnOp::get("dup")]),
        Txn::new().then([
            TxnOp::put("dup", "v"),
            TxnOp::get("other"),
            TxnOp::add("dup", 1),
        ]),
        Txn::new().then([TxnOp::get("other")]).otherwise([
            TxnOp::delete("dup"),
            range(),
            TxnOp::get("dup"),
        ]),
    ] {
        let error = check(&Request::Txn(Box::new(txn.clone()))).unwrap_err();
        assert!(
            matches!(&error, RequestError::TxnDuplicateKey { key } if key.contains("dup")),
            "{txn:?}: {error:?}"
        );
        assert_eq!(error.code(), ErrorCode::InvalidArgument);
    }
}

/// At most `TXN_COMPARES_MAX` compares and `TXN_OPS_MAX` ops per branch.
#[test]
fn txn_compares_and_ops_are_counted() {
    let compares = |count: usize| -> Vec<Compare> {
        (0..count)
            .map(|index| Compare::exists(format!("k{index}")))
            .collect()
    };
    let ops = |count: usize| -> Vec<TxnOp> {
        (0..count)
            .map(|index| TxnOp::get(format!("k{index}")))
            .collect()
    };
    for txn in [
        Txn::new().when(compares(TXN_COMPARES_MAX)),
        Txn::new()
            .then(ops(TXN_OPS_MAX))
            .otherwise(ops(TXN_OPS_MAX)),
    ] {
        assert_eq!(check(&Request::Txn(Box::new(txn))), Ok(()));
    }
    for (txn, what, count_max) in [
        (
            Txn::new().when(compares(TXN_COMPARES_MAX + 1)),
            "compares",
            TXN_COMPARES_MAX,
        ),
        (Txn::new().then(ops(TXN_OPS_MAX + 1)), "ops", TXN_OPS_MAX),
        (
            Txn::new().then(ops(1)).otherwise(ops(TXN_OPS_MAX + 1)),
            "ops",
            TXN_OPS_MAX,
        ),
    ] {
        let error = check(&Request::Txn(Box::new(txn))).unwrap_err();
        assert_eq!(
            error,
            RequestError::TxnTooLarge {
                what,
                count: count_max + 1,
                count_max
            }
        );
        assert_eq!(error.code(), ErrorCode::TooLarge);
    }
}

/// A transaction runs on the shard of its keys, so one that names none (no compares, only
/// ranges or nothing) is refused.
#[test]
fn a_txn_must_name_a_key() {
    let range = || TxnOp::Range(Scan::prefix(b"k", 10));
    for txn in [
        Txn::new(),
        Txn::new().then([range()]),
        Txn::new().then([range()]).otherwise([range(), range()]),
    ] {
        let error = check(&Request::Txn(Box::new(txn.clone()))).unwrap_err();
        assert_eq!(error, RequestError::TxnWithoutKey, "{txn:?}");
        assert_eq!(error.code(), ErrorCode::InvalidArgument);
    }
    for txn in [
        Txn::new().when([Compare::absent("k")]),
        Txn::new().then([range()]).otherwise([TxnOp::get("k")]),
    ] {
        assert_eq!(
            check(&Request::Txn(Box::new(txn.clone()))),
            Ok(()),
            "{txn:?}"
        );
    }
}

/// A counter add, alone or in a transaction, must have bounds that hold some value, and may
/// only refresh a TTL it gives.
#[test]
fn counter_bounds_and_refresh_are_checked() {
    let bounded = |min, max| CounterAdd {
        min,
        max,
        ..CounterAdd::new("k", 1)
    };
    let requests = |add: CounterAdd| {
        [
            Request::Add(Box::new(add.clone())),
            Request::Txn(Box::new(Txn::new().then([TxnOp::Add(add)]))),
        ]
    };
    for add in [
        bounded(Some(3), Some(3)),
        bounded(Some(i64::MIN), Some(i64::MAX)),
        bounded(Some(i64::MAX), None),
        bounded(None, Some(i64::MIN)),
        bounded(None, None),
    ] {
        for request in requests(add) {
            assert_eq!(check(&request), Ok(()), "{request:?}");
        }
    }
    for (min, max) in [(4, 3), (i64::MAX, i64::MIN), (0, -1)] {
        for request in requests(bounded(Some(min), Some(max))) {
            let error = check(&request).unwrap_err();
            assert_eq!(error, RequestError::EmptyBounds { min, max }, "{request:?}");
            assert_eq!(error.code(), ErrorCode::InvalidArgument);
        }
    }
    let refresh_without_ttl = CounterAdd {
        refresh_ttl: true,
        ..CounterAdd::new("k", 1)
    };
    for request in requests(refresh_without_ttl) {
        let error = check(&request).unwrap_err();
        assert_eq!(error, RequestError::RefreshWithoutTtl, "{request:?}");
        assert_eq!(error.code(), ErrorCode::InvalidArgument);
    }
}

// ---------------------------------------------------------------------------------------------
// check_request: fields, indexes and queries.

/// One request of every variant that carries an entry's fields, with `fields` in it.
fn requests_with_fields(fields: &[Field]) -> Vec<Request> {
    vec![
        Request::Put(Box::new(Put {
            fields: fields.to_vec(),
            ..Put::new("k", "v")
        })),
        // A batch checks every entry's fields, not only the first's.
        Request::MultiPut {
            entries: vec![
                PutEntry {
                    key: b"fine".to_vec(),
                    value: b"v".to_vec(),
                    ttl_ms: None,
                    fields: vec![Field::new("fine", FieldValue::Bool(true))],
                },
                PutEntry {
                    key: b"k".to_vec(),
                    value: b"v".to_vec(),
                    ttl_ms: None,
                    fields: fields.to_vec(),
                },
            ],
        },
        Request::Txn(Box::new(Txn::new().then([
            TxnOp::get("fine"),
            TxnOp::Put {
                key: b"k".to_vec(),
                value: b"v".to_vec(),
                ttl_ms: None,
                keep_ttl: false,
                return_previous: false,
                lease: None,
                fields: fields.to_vec(),
            },
        ]))),
    ]
}

/// `count` fields with distinct names.
fn distinct_fields(count: usize) -> Vec<Field> {
    (0..count)
        .map(|index| {
            Field::new(
                format!("f{index}"),
                FieldValue::I64(i64::try_from(index).unwrap()),
            )
        })
        .collect()
}

/// Asserts that every request carrying `fields` is refused as a bad field named `name`.
fn assert_bad_field(fields: &[Field], name: &str) {
    for request in requests_with_fields(fields) {
        let error = check(&request).unwrap_err();
        assert!(
            matches!(&error, RequestError::BadField { name: shown, .. } if shown == name),
            "{error:?} for {request:?}"
        );
        assert_eq!(error.code(), ErrorCode::InvalidArgument);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(16))]

    #[test]
    fn more_fields_than_the_limit_are_refused(
        count in FIELDS_PER_VALUE_MAX + 1..=FIELDS_PER_VALUE_MAX + 8,
    ) {
        for request in requests_with_fields(&distinct_fields(count)) {
            let error = check(&request).unwrap_err();
            prop_assert_eq!(
                &error,
                &RequestError::TooManyFields { count, count_max: FIELDS_PER_VALUE_MAX }
            );
            prop_assert_eq!(error.code(), ErrorCode::TooLarge);
        }
    }

    /// Wherever the second use of a name falls, and whatever either value is.
    #[test]
    fn a_field_name_given_twice_is_refused(
        fields in fields().prop_filter("a name to repeat", |fields| !fields.is_empty()),
        repeated in any::<Index>(),
        position in any::<Index>(),
        value in field_value(),
    ) {
        let name = fields[repeated.index(fields.len())].name.clone();
        let mut twice = fields.clone();
        // After the first use, so the first use is the one the message refers to.
        let first = twice.iter().position(|field| field.name == name).unwrap();
        let at = first + 1 + position.index(twice.len() - first);
        twice.insert(at, Field::new(name.clone(), value));
        assert_bad_field(&twice, &name);
    }

    #[test]
    fn field_names_out_of_their_size_are_refused(
        size in prop_oneof![Just(0), FIELD_NAME_SIZE_MAX + 1..=FIELD_NAME_SIZE_MAX + 64],
        fine_count in 0..FIELDS_PER_VALUE_MAX,
    ) {
        let mut fields = distinct_fields(fine_count);
        fields.push(Field::new("n".repeat(size), FieldValue::Bool(false)));
        // The message shows the name cut to the limit.
        assert_bad_field(&fields, &"n".repeat(size.min(FIELD_NAME_SIZE_MAX)));
    }

    #[test]
    fn field_strings_over_their_limit_are_refused(size_over in 1..=64_usize) {
        let text = "s".repeat(FIELD_STRING_SIZE_MAX + size_over);
        assert_bad_field(&[Field::new("s", FieldValue::Str(text))], "s");
    }
}

#[test]
fn field_limits_themselves_are_accepted() {
    let longest_name = "n".repeat(FIELD_NAME_SIZE_MAX);
    let mut fields = distinct_fields(FIELDS_PER_VALUE_MAX - 2);
    fields.push(Field::new(longest_name, FieldValue::Bool(true)));
    fields.push(Field::new(
        "s",
        FieldValue::Str("s".repeat(FIELD_STRING_SIZE_MAX)),
    ));
    assert_eq!(fields.len(), FIELDS_PER_VALUE_MAX);
    for request in requests_with_fields(&fields) {
        assert_eq!(check(&request), Ok(()), "{request:?}");
    }
    // No fields, and every kind of value, are fine too.
    for request in requests_with_fields(&[]) {
        assert_eq!(check(&request), Ok(()), "{request:?}");
    }
    let every_type = [
        Field::new("a", FieldValue::Str(String::new())),
        Field::new("b", FieldValue::I64(i64::MIN)),
        Field::new("c", FieldValue::F64(F64::new(f64::NEG_INFINITY).unwrap())),
        Field::new("d", FieldValue::Bool(false)),
        Field::new("e", FieldValue::Timestamp(i64::MAX)),
    ];
    for request in requests_with_fields(&every_type) {
        assert_eq!(check(&request), Ok(()), "{request:?}");
    }
}

/// Bits no generated request holds anywhere else, so finding them finds the one `f64`.
const MARKER_BITS: u64 = 0x3FF1_2345_6789_ABCD;

fn marker() -> FieldValue {
    FieldValue::F64(F64::new(f64::from_bits(MARKER_BITS)).unwrap())
}

/// `request` archived, with the one `f64` whose bits are [`MARKER_BITS`] given `bits`
/// instead. An `F64` cannot hold NaN or `-0.0`, but its archive is any eight bytes, so this
/// is what a peer can send.
fn with_float_bits(request: &Request, bits: u64) -> FrameBuffer {
    let mut body = FrameBuffer::new();
    codec::encode_request_body(&mut body, request).unwrap();
    let marker = MARKER_BITS.to_le_bytes();
    let offsets: Vec<usize> = body
        .windows(marker.len())
        .enumerate()
        .filter(|(_, window)| *window == marker)
        .map(|(offset, _)| offset)
        .collect();
    assert_eq!(offsets.len(), 1, "the marker is in {request:?} once");
    body[offsets[0]..offsets[0] + marker.len()].copy_from_slice(&bits.to_le_bytes());
    body
}

/// What `check_request` must answer for a request whose `f64` has the given bits.
type FloatRefusal = fn(u64) -> RequestError;

/// One request of every kind that carries an `f64` from the client, the marker in each, and
/// what `check_request` must answer when its bits are NaN or `-0.0`.
fn requests_with_marker() -> Vec<(Request, FloatRefusal)> {
    let bad_field = |_: u64| RequestError::BadField {
        name: "f".to_owned(),
        reason: "an f64 is NaN or -0.0".to_owned(),
    };
    let mut requests: Vec<(Request, FloatRefusal)> =
        requests_with_fields(&[Field::new("f", marker())])
            .into_iter()
            .map(|request| (request, bad_field as FloatRefusal))
            .collect();
    let filters = [
        QueryNode::Equal {
            field: "f".to_owned(),
            value: marker(),
        },
        QueryNode::In {
            field: "f".to_owned(),
            values: vec![FieldValue::I64(1), marker()],
        },
        QueryNode::Range {
            field: "f".to_owned(),
            lower: Bound::Unbounded,
            upper: Bound::Excluded(marker()),
        },
    ];
    for node in filters {
        let query = QueryRequest::new("", Some(Query { nodes: vec![node] }), 10);
        requests.push((Request::Query(Box::new(query)), |bits| {
            RequestError::BadQuery(QueryError::Float { bits })
        }));
    }
    let after = QueryRequest {
        order_by: vec![OrderBy {
            field: "f".to_owned(),
            descending: false,
        }],
        after: Some(QueryCursor {
            sort: vec![Some(marker())],
            key: b"k".to_vec(),
        }),
        ..QueryRequest::new("", None, 10)
    };
    requests.push((Request::Query(Box::new(after)), |_| {
        RequestError::BadQueryRequest {
            reason: "a cursor value is invalid".to_owned(),
        }
    }));
    requests
}

/// Bits of a NaN: every exponent bit set and a payload that is not zero, either sign.
fn nan_bits() -> impl Strategy<Value = u64> {
    (any::<bool>(), 1..(1_u64 << 52))
        .prop_map(|(negative, payload)| (u64::from(negative) << 63) | (0x7FF_u64 << 52) | payload)
}

proptest! {
    /// An `f64` arriving as NaN or `-0.0` bits is refused wherever a client sends one: the
    /// order of values and equality by bits both depend on it.
    #[test]
    fn floats_are_refused_exactly_when_nan_or_negative_zero(
        bits in prop_oneof![nan_bits(), Just(0x8000_0000_0000_0000_u64), any::<u64>()],
    ) {
        let number = f64::from_bits(bits);
        let is_refused = number.is_nan() || bits == (-0.0_f64).to_bits();
        for (request, refusal) in requests_with_marker() {
            let body = with_float_bits(&request, bits);
            let archived = codec::access_request(&body).expect("any bits are an archived F64");
            let result = codec::check_request(archived);
            if is_refused {
                let error = result.unwrap_err();
                prop_assert_eq!(&error, &refusal(bits), "{:?}", request);
                prop_assert_eq!(error.code(), ErrorCode::InvalidArgument);
            } else {
                prop_assert_eq!(result, Ok(()), "{:?} with bits {:#x}", request, bits);
            }
        }
    }
}

fn create_index(name: &str, prefix: &[u8], field: &str) -> Request {
    Request::CreateIndex(Box::new(IndexSpec {
        name: name.to_owned(),
        prefix: prefix.to_vec(),
        field: field.to_owned(),
        kind: IndexKind::Range,
    }))
}

/// An index's name and field have 1..=64 bytes and its prefix is empty or a key; the name is
/// checked first, then the prefix, then the field.
#[test]
fn index_definitions_are_checked() {
    let longest = "n".repeat(INDEX_NAME_SIZE_MAX);
    let too_long = "n".repeat(INDEX_NAME_SIZE_MAX + 1);
    for request in [
        create_index("i", b"", "f"),
        create_index(
            &longest,
            &vec![b'k'; KEY_SIZE_MAX],
            &"f".repeat(FIELD_NAME_SIZE_MAX),
        ),
        Request::DropIndex {
            name: longest.clone(),
        },
        Request::DropIndex {
            name: "i".to_owned(),
        },
    ] {
        assert_eq!(check(&request), Ok(()), "{request:?}");
    }
    let bad_index = |error: &RequestError, expected: &str| matches!(error, RequestError::BadIndex { name, .. } if name == expected);
    for name in [String::new(), too_long.clone()] {
        for request in [
            // The name comes first: the bad prefix and field are not what is reported.
            create_index(&name, &vec![b'k'; KEY_SIZE_MAX + 1], ""),
            Request::DropIndex { name: name.clone() },
        ] {
            let error = check(&request).unwrap_err();
            assert!(
                bad_index(&error, &longest[..name.len().min(INDEX_NAME_SIZE_MAX)]),
                "{error:?}"
            );
            assert_eq!(error.code(), ErrorCode::InvalidArgument);
        }
    }
    let error = check(&create_index("i", &vec![b'k'; KEY_SIZE_MAX + 1], "")).unwrap_err();
    assert_eq!(
        error,
        RequestError::KeyTooLarge {
            size: KEY_SIZE_MAX + 1,
            size_max: KEY_SIZE_MAX
        }
    );
    for field in [String::new(), "f".repeat(FIELD_NAME_SIZE_MAX + 1)] {
        let error = check(&create_index("i", b"p", &field)).unwrap_err();
        assert!(bad_index(&error, "i"), "{error:?}");
        assert_eq!(error.code(), ErrorCode::InvalidArgument);
    }
}

fn order_by(count: usize) -> Vec<OrderBy> {
    (0..count)
        .map(|index| OrderBy {
            field: format!("f{index}"),
            descending: index % 2 == 1,
        })
        .collect()
}

fn query_with(filter: Query) -> Request {
    Request::Query(Box::new(QueryRequest::new("", Some(filter), 10)))
}

fn equal(field: &str, value: FieldValue) -> QueryNode {
    QueryNode::Equal {
        field: field.to_owned(),
        value,
    }
}

fn is_bad_query_request(result: &Result<(), RequestError>) -> bool {
    matches!(result, Err(RequestError::BadQueryRequest { .. }))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    /// A limit outside `1..=QUERY_LIMIT_MAX` is refused, unless the query only counts.
    #[test]
    fn query_limits_outside_the_range_are_refused_unless_counting(
        limit in prop_oneof![Just(0), QUERY_LIMIT_MAX + 1..=u32::MAX],
    ) {
        let query = QueryRequest::new("p", None, limit);
        let result = check(&Request::Query(Box::new(query.clone())));
        prop_assert!(is_bad_query_request(&result), "{:?}", result);
        prop_assert_eq!(result.unwrap_err().code(), ErrorCode::InvalidArgument);
        let counting = QueryRequest { count_only: true, ..query };
        prop_assert_eq!(check(&Request::Query(Box::new(counting))), Ok(()));
    }

    /// A cursor holds one sort value per order field, no more, no fewer.
    #[test]
    fn a_cursor_has_one_sort_value_per_order_field(
        order_count in 0..=QUERY_ORDER_BY_MAX,
        sort_count in 0..=QUERY_ORDER_BY_MAX + 2,
    ) {
        let query = QueryRequest {
            order_by: order_by(order_count),
            after: Some(QueryCursor {
                sort: vec![Some(FieldValue::I64(1)); sort_count],
                key: b"k".to_vec(),
            }),
            ..QueryRequest::new("", None, 10)
        };
        let result = check(&Request::Query(Box::new(query)));
        if order_count == sort_count {
            prop_assert_eq!(result, Ok(()));
        } else {
            prop_assert!(is_bad_query_request(&result), "{:?}", result);
        }
    }
}

/// The prefix and cursor key are empty or a key; at most `QUERY_ORDER_BY_MAX` order fields,
/// each named in 1..=64 bytes; the limits of the query are accepted.
#[test]
fn query_requests_are_checked() {
    let accepted = [
        QueryRequest::new(vec![b'k'; KEY_SIZE_MAX], None, QUERY_LIMIT_MAX),
        QueryRequest {
            order_by: order_by(QUERY_ORDER_BY_MAX),
            after: Some(QueryCursor {
                sort: vec![None, Some(FieldValue::Str(String::new())), None, None],
                key: vec![b'k'; KEY_SIZE_MAX],
            }),
            projection: Projection::KeysOnly,
            ..QueryRequest::new("", None, 1)
        },
        QueryRequest {
            after: Some(QueryCursor {
                sort: Vec::new(),
                key: Vec::new(),
            }),
            ..QueryRequest::new("", None, 1)
        },
    ];
    for query in accepted {
        assert_eq!(
            check(&Request::Query(Box::new(query.clone()))),
            Ok(()),
            "{query:?}"
        );
    }
    let too_long = vec![b'k'; KEY_SIZE_MAX + 1];
    let key_too_large = RequestError::KeyTooLarge {
        size: too_long.len(),
        size_max: KEY_SIZE_MAX,
    };
    let with_cursor_key = QueryRequest {
        after: Some(QueryCursor {
            sort: Vec::new(),
            key: too_long.clone(),
        }),
        ..QueryRequest::new("", None, 1)
    };
    for query in [QueryRequest::new(too_long, None, 1), with_cursor_key] {
        assert_eq!(
            check(&Request::Query(Box::new(query))),
            Err(key_too_large.clone())
        );
    }
    let refused = [
        QueryRequest {
            order_by: order_by(QUERY_ORDER_BY_MAX + 1),
            ..QueryRequest::new("", None, 1)
        },
        QueryRequest {
            order_by: vec![OrderBy {
                field: String::new(),
                descending: false,
            }],
            ..QueryRequest::new("", None, 1)
        },
        QueryRequest {
            order_by: vec![OrderBy {
                field: "f".repeat(FIELD_NAME_SIZE_MAX + 1),
                descending: true,
            }],
            ..QueryRequest::new("", None, 1)
        },
    ];
    for query in refused {
        let result = check(&Request::Query(Box::new(query.clone())));
        assert!(is_bad_query_request(&result), "{query:?}: {result:?}");
    }
}

fn one() -> QueryNode {
    equal("f", FieldValue::I64(1))
}

/// Filters that break one rule of `check_query` each, and the rule.
fn refused_filters() -> Vec<(Query, QueryError)> {
    vec![
        (
            Query { nodes: Vec::new() },
            QueryError::NodeCount { count: 0 },
        ),
        (
            Query {
                nodes: vec![one(); QUERY_NODES_MAX + 1],
            },
            QueryError::NodeCount {
                count: QUERY_NODES_MAX + 1,
            },
        ),
        (
            Query {
                nodes: vec![QueryNode::Not(0)],
            },
            QueryError::Operand {
                node: 0,
                operand: 0,
            },
        ),
        (
            Query {
                nodes: vec![one(), QueryNode::And(vec![0, 2])],
            },
            QueryError::Operand {
                node: 1,
                operand: 2,
            },
        ),
        (
            Query {
                nodes: vec![one(), QueryNode::Or(Vec::new())],
            },
            QueryError::Operand {
                node: 1,
                operand: u16::MAX,
            },
        ),
        (
            Query {
                nodes: vec![QueryNode::In {
                    field: "f".to_owned(),
                    values: Vec::new(),
                }],
            },
            QueryError::InCount { count: 0 },
        ),
        (
            Query {
                nodes: vec![QueryNode::In {
                    field: "f".to_owned(),
                    values: vec![FieldValue::Bool(true); QUERY_IN_VALUES_MAX + 1],
                }],
            },
            QueryError::InCount {
                count: QUERY_IN_VALUES_MAX + 1,
            },
        ),
        (
            Query {
                nodes: vec![equal("", FieldValue::I64(1))],
            },
            QueryError::FieldName { size: 0 },
        ),
        (
            Query {
                nodes: vec![QueryNode::Prefix {
                    field: "f".repeat(FIELD_NAME_SIZE_MAX + 1),
                    prefix: String::new(),
                }],
            },
            QueryError::FieldName {
                size: FIELD_NAME_SIZE_MAX + 1,
            },
        ),
        (
            Query {
                nodes: vec![equal(
                    "f",
                    FieldValue::Str("s".repeat(FIELD_STRING_SIZE_MAX + 1)),
                )],
            },
            QueryError::StringSize {
                size: FIELD_STRING_SIZE_MAX + 1,
            },
        ),
        (
            Query {
                nodes: vec![QueryNode::Prefix {
                    field: "f".to_owned(),
                    prefix: "p".repeat(FIELD_STRING_SIZE_MAX + 1),
                }],
            },
            QueryError::StringSize {
                size: FIELD_STRING_SIZE_MAX + 1,
            },
        ),
    ]
}

/// The filter must pass `check_query`: the refusal names the rule.
#[test]
fn query_filters_are_checked() {
    for (filter, expected) in refused_filters() {
        let error = check(&query_with(filter.clone())).unwrap_err();
        assert_eq!(error, RequestError::BadQuery(expected), "{filter:?}");
        assert_eq!(error.code(), ErrorCode::InvalidArgument);
    }
}

#[test]
fn query_filter_limits_are_accepted() {
    let widest = Query {
        nodes: vec![QueryNode::In {
            field: "f".repeat(FIELD_NAME_SIZE_MAX),
            values: vec![FieldValue::Str("s".repeat(FIELD_STRING_SIZE_MAX)); QUERY_IN_VALUES_MAX],
        }],
    };
    let longest = Query {
        nodes: (0..QUERY_NODES_MAX)
            .map(|index| match index {
                0 => one(),
                _ => QueryNode::Not(u16::try_from(index - 1).unwrap()),
            })
            .collect(),
    };
    for filter in [widest, longest] {
        assert_eq!(check(&query_with(filter)), Ok(()));
    }
}

// ---------------------------------------------------------------------------------------------
// Routing.

#[test]
fn slots_are_stable_and_tags_follow_the_documented_rules() {
    // crc32("123456789") = 0xCBF43926, and 0xCBF43926 mod 16384 = 0x3926 = 14630.
    assert_eq!(slot_for_key(b"123456789"), 14630);
    assert_eq!(slot_for_key(b"{123456789}.anything"), 14630);
    assert_eq!(slot_for_key(b"user:1000"), 6115);
    assert_eq!(slot_for_key(b"{user:1000}.following"), 6115);
    // The examples given in docs/protocol.md.
    assert_eq!(hash_tag(b"user:1000"), b"user:1000");
    assert_eq!(hash_tag(b"{user:1000}.following"), b"user:1000");
    assert_eq!(hash_tag(b"foo{bar}{zap}"), b"bar");
    assert_eq!(hash_tag(b"foo{}{bar}"), b"foo{}{bar}");
    assert_eq!(hash_tag(b"foo{{bar}}zap"), b"{bar");
    assert_eq!(hash_tag(b"foo{bar"), b"foo{bar");
}

proptest! {
    #[test]
    fn every_key_has_a_slot_in_range(key in vec(any::<u8>(), 0..=KEY_SIZE_GENERATED_MAX * 2)) {
        prop_assert!(slot_for_key(&key) < SLOT_COUNT);
    }

    #[test]
    fn keys_sharing_a_tag_share_a_slot(
        tag in vec(any::<u8>().prop_filter("no closing brace", |byte| *byte != b'}'), 1..=16),
        prefixes in vec(
            vec(any::<u8>().prop_filter("no opening brace", |byte| *byte != b'{'), 0..=16),
            2,
        ),
        suffixes in vec(vec(any::<u8>(), 0..=16), 2),
    ) {
        let keys: Vec<Vec<u8>> = prefixes
            .iter()
            .zip(&suffixes)
            .map(|(prefix, suffix)| [&prefix[..], b"{", &tag, b"}", suffix].concat())
            .collect();
        for key in &keys {
            prop_assert_eq!(hash_tag(key), &tag[..]);
            prop_assert_eq!(slot_for_key(key), slot_for_key(&tag));
        }
        prop_assert_eq!(slot_for_key(&keys[0]), slot_for_key(&keys[1]));
    }

    #[test]
    fn split_slots_covers_every_slot_once(part_count in 1..=usize::from(SLOT_COUNT)) {
        let ranges = split_slots(part_count);
        prop_assert_eq!(ranges.len(), part_count);
        prop_assert_eq!(ranges[0].start, 0);
        prop_assert_eq!(ranges[part_count - 1].end, SLOT_COUNT);
        for pair in ranges.windows(2) {
            prop_assert_eq!(pair[0].end, pair[1].start);
        }
        let smallest = ranges.iter().map(tessera_protocol::SlotRange::len).min().unwrap();
        let largest = ranges.iter().map(tessera_protocol::SlotRange::len).max().unwrap();
        prop_assert!(smallest >= 1);
        prop_assert!(largest - smallest <= 1, "smallest={} largest={}", smallest, largest);
    }

    #[test]
    fn a_single_node_route_table_agrees_with_its_ranges(
        core_count in 1..=CORE_COUNT_MAX,
        keys in vec(vec(any::<u8>(), 0..=KEY_SIZE_GENERATED_MAX), 1..=32),
    ) {
        let topology =
            build_topology(1, 1, &[("node".to_string(), core_count, "127.0.0.1".to_string())]);
        let ranges = split_slots(core_count);
        let table = RouteTable::new(&topology).unwrap();
        for key in &keys {
            let slot = slot_for_key(key);
            let location = table.owner_of_key(key);
            prop_assert_eq!(location.node_index, 0);
            prop_assert!(ranges[usize::from(location.core_index)].contains(slot));
            prop_assert_eq!(ranges.iter().filter(|range| range.contains(slot)).count(), 1);
        }
    }

    #[test]
    fn a_cluster_route_table_agrees_with_its_ranges(
        topology in topology(),
        keys in vec(vec(any::<u8>(), 0..=KEY_SIZE_GENERATED_MAX), 1..=32),
    ) {
        let table = RouteTable::new(&topology).unwrap();
        prop_assert_eq!(table.epoch(), topology.epoch);
        for key in &keys {
            let slot = slot_for_key(key);
            let location = table.owner_of_key(key);
            prop_assert_eq!(table.owner_of_slot(slot), location);
            let core = topology.core(location).expect("the table names a core of the topology");
            prop_assert!(core.slots.contains(slot), "slot={} owner={}", slot, core.slots);
            let owner_count = topology
                .nodes
                .iter()
                .flat_map(|node| &node.cores)
                .filter(|core| core.slots.contains(slot))
                .count();
            prop_assert_eq!(owner_count, 1);
        }
    }
}
