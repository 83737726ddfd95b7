//! Fuzzes the send path: a request built from fuzz input is encoded, decoded and checked.
//!
//! Properties, for every request the builder can produce:
//! - the frame decodes with the same request id and kind, and the body comes back equal;
//! - `check_request` on the archived form (what a server runs) agrees with the single-field
//!   checks applied to the owned request (what a client can run before encoding).
//!
//! Sizes are bounded like redb's `BoundedU64`: keys and names reach one byte past their limit so
//! both sides of each check are reached, while batches and values stay small enough to keep the
//! fuzzer fast. Transactions reach one compare and one op past their limits; their keys come
//! from a small pool as often as not, so branches that name a key twice are common. Lease ids
//! are 0 (which names no lease) a quarter of the time, so both sides of that check are reached
//! too, in puts, in every lease request and in locks. Lock waits reach one past
//! `LOCK_WAIT_MS_MAX` as often as not (and sometimes any `u32`); fenced compares and unlocks
//! take any token, which no check refuses.
//!
//! Entries carry up to one field past `FIELDS_PER_VALUE_MAX`, with names and strings up to one
//! byte past their limits, drawn from four short names as often as not so that a name given
//! twice is common. Index definitions and queries reach one byte past each name's limit, one
//! node past `QUERY_NODES_MAX`, one value past `QUERY_IN_VALUES_MAX`, one order field past
//! `QUERY_ORDER_BY_MAX`, both ends of the limit, and cursors with any number of sort values;
//! operators name earlier nodes as often as not, and any node otherwise. An owned `f64` is
//! never NaN or `-0.0`, so those bits are left to the property tests, which write them into the
//! archive.

#![no_main]

use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use tessera_protocol::codec::{self, FrameBuffer};
use tessera_protocol::limits::{
    BATCH_COUNT_MAX, FIELDS_PER_VALUE_MAX, FIELD_NAME_SIZE_MAX, FIELD_STRING_SIZE_MAX,
    INDEX_NAME_SIZE_MAX, KEY_SIZE_MAX, LOCK_WAIT_MS_MAX, QUERY_IN_VALUES_MAX, QUERY_LIMIT_MAX,
    QUERY_NODES_MAX, QUERY_ORDER_BY_MAX, SCAN_LIMIT_MAX, TEXT_SIZE_MAX, TXN_COMPARES_MAX,
    TXN_OPS_MAX,
};
use tessera_protocol::query::{check_query, shown_name, Bound, QueryNode, F64};
use tessera_protocol::{
    Check, Compare, CompareOp, CounterAdd, Delete, DeleteCondition, Field, FieldValue, FrameKind,
    IndexKind, IndexSpec, OrderBy, Projection, Put, PutCondition, PutEntry, Query, QueryCursor,
    QueryRequest, Request, RequestError, Scan, Txn, TxnOp, Watch, WatchFrom,
};

/// Longest value the builder makes; `VALUE_SIZE_MAX` itself is covered by the property tests.
const VALUE_SIZE_FUZZ_MAX: usize = 4096;

fuzz_target!(|data: &[u8]| {
    let mut input = Unstructured::new(data);
    let Ok(request_id) = input.arbitrary::<u64>() else {
        return;
    };
    let Ok(request) = build_request(&mut input) else {
        return;
    };

    let mut buffer = FrameBuffer::new();
    codec::encode_request(&mut buffer, request_id, &request).expect("a bounded request fits");
    let frame = codec::decode_frame(&buffer)
        .expect("an encoded frame is valid")
        .expect("an encoded frame is complete");
    assert_eq!(frame.frame_size, buffer.len());
    assert_eq!(frame.header.request_id, request_id);
    assert_eq!(frame.header.frame_kind(), Some(FrameKind::Request));
    let archived = codec::access_request(frame.body).expect("an encoded body validates");
    assert_eq!(codec::check_request(archived), check_owned(&request));
    assert_eq!(
        codec::decode_request(frame.body).expect("it deserializes"),
        request
    );
});

/// Up to `size_max` bytes of input (fewer when the input runs out).
fn bytes(input: &mut Unstructured<'_>, size_max: usize) -> Result<Vec<u8>> {
    let size = input.int_in_range(0..=size_max)?.min(input.len());
    Ok(input.bytes(size)?.to_vec())
}

fn key(input: &mut Unstructured<'_>) -> Result<Vec<u8>> {
    bytes(input, KEY_SIZE_MAX + 1)
}

fn value(input: &mut Unstructured<'_>) -> Result<Vec<u8>> {
    bytes(input, VALUE_SIZE_FUZZ_MAX)
}

fn ttl_ms(input: &mut Unstructured<'_>) -> Result<Option<u64>> {
    input.arbitrary()
}

fn batch_count(input: &mut Unstructured<'_>) -> Result<usize> {
    input.int_in_range(0..=BATCH_COUNT_MAX + 1)
}

/// A lease id: 0 a quarter of the time, otherwise any.
fn lease_id(input: &mut Unstructured<'_>) -> Result<u64> {
    if input.ratio(1_u8, 4_u8)? {
        Ok(0)
    } else {
        input.arbitrary()
    }
}

/// A lock wait: any `u32` an eighth of the time, otherwise up to one past the limit, at
/// either end of it often.
fn lock_wait_ms(input: &mut Unstructured<'_>) -> Result<u32> {
    Ok(match input.int_in_range(0_u8..=7)? {
        0 => input.arbitrary()?,
        1 => LOCK_WAIT_MS_MAX,
        2 => LOCK_WAIT_MS_MAX + 1,
        _ => input.int_in_range(0..=LOCK_WAIT_MS_MAX + 1)?,
    })
}

/// A key of a transaction: as often as not one of four short ones, so that keys repeat.
fn txn_key(input: &mut Unstructured<'_>) -> Result<Vec<u8>> {
    if input.arbitrary()? {
        Ok(vec![b'k', input.int_in_range(b'0'..=b'3')?])
    } else {
        key(input)
    }
}

/// Text of up to `size_max` bytes of input (lossy UTF-8, so a little longer at times).
fn text(input: &mut Unstructured<'_>, size_max: usize) -> Result<String> {
    Ok(String::from_utf8_lossy(&bytes(input, size_max)?).into_owned())
}

/// A field or index name: as often as not one of four short ones, so names repeat, else up to
/// one byte past `size_max`.
fn name(input: &mut Unstructured<'_>, size_max: usize) -> Result<String> {
    if input.arbitrary()? {
        Ok(format!("n{}", input.int_in_range(0_u8..=3)?))
    } else {
        text(input, size_max + 1)
    }
}

/// A value of any type; strings up to one byte past their limit.
fn field_value(input: &mut Unstructured<'_>) -> Result<FieldValue> {
    Ok(match input.int_in_range(0_u8..=4)? {
        0 => FieldValue::Str(text(input, FIELD_STRING_SIZE_MAX + 1)?),
        1 => FieldValue::I64(input.arbitrary()?),
        2 => F64::new(input.arbitrary()?).map_or(FieldValue::Bool(false), FieldValue::F64),
        3 => FieldValue::Bool(input.arbitrary()?),
        _ => FieldValue::Timestamp(input.arbitrary()?),
    })
}

/// Up to one field past the limit.
fn fields(input: &mut Unstructured<'_>) -> Result<Vec<Field>> {
    let count = input.int_in_range(0..=FIELDS_PER_VALUE_MAX + 1)?;
    (0..count)
        .map(|_| {
            Ok(Field::new(
                name(input, FIELD_NAME_SIZE_MAX)?,
                field_value(input)?,
            ))
        })
        .collect()
}

fn bound(input: &mut Unstructured<'_>) -> Result<Bound> {
    Ok(match input.int_in_range(0_u8..=2)? {
        0 => Bound::Unbounded,
        1 => Bound::Included(field_value(input)?),
        _ => Bound::Excluded(field_value(input)?),
    })
}

/// An operand of node `index`: a node before it as often as not, else any.
fn operand(input: &mut Unstructured<'_>, index: usize) -> Result<u16> {
    if index > 0 && input.arbitrary()? {
        Ok(u16::try_from(input.int_in_range(0..=index - 1)?).unwrap_or(u16::MAX))
    } else {
        input.arbitrary()
    }
}

fn operands(input: &mut Unstructured<'_>, index: usize) -> Result<Vec<u16>> {
    let count = input.int_in_range(0_usize..=3)?;
    (0..count).map(|_| operand(input, index)).collect()
}

/// Node `index` of a query.
fn query_node(input: &mut Unstructured<'_>, index: usize) -> Result<QueryNode> {
    Ok(match input.int_in_range(0_u8..=6)? {
        0 => QueryNode::Equal {
            field: name(input, FIELD_NAME_SIZE_MAX)?,
            value: field_value(input)?,
        },
        1 => QueryNode::In {
            field: name(input, FIELD_NAME_SIZE_MAX)?,
            // One past the limit copies a small value, so the frame stays small.
            values: if input.ratio(1_u8, 8_u8)? {
                vec![FieldValue::Bool(true); QUERY_IN_VALUES_MAX + 1]
            } else {
                let count = input.int_in_range(0_usize..=4)?;
                (0..count)
                    .map(|_| field_value(input))
                    .collect::<Result<_>>()?
            },
        },
        2 => QueryNode::Range {
            field: name(input, FIELD_NAME_SIZE_MAX)?,
            lower: bound(input)?,
            upper: bound(input)?,
        },
        3 => QueryNode::Prefix {
            field: name(input, FIELD_NAME_SIZE_MAX)?,
            prefix: text(input, FIELD_STRING_SIZE_MAX + 1)?,
        },
        4 => QueryNode::And(operands(input, index)?),
        5 => QueryNode::Or(operands(input, index)?),
        _ => QueryNode::Not(operand(input, index)?),
    })
}

fn query(input: &mut Unstructured<'_>) -> Result<Query> {
    let count = input.int_in_range(0..=QUERY_NODES_MAX + 1)?;
    Ok(Query {
        nodes: (0..count)
            .map(|index| query_node(input, index))
            .collect::<Result<_>>()?,
    })
}

fn query_request(input: &mut Unstructured<'_>) -> Result<QueryRequest> {
    let order_count = input.int_in_range(0..=QUERY_ORDER_BY_MAX + 1)?;
    let order_by = (0..order_count)
        .map(|_| {
            Ok(OrderBy {
                field: name(input, FIELD_NAME_SIZE_MAX)?,
                descending: input.arbitrary()?,
            })
        })
        .collect::<Result<_>>()?;
    Ok(QueryRequest {
        prefix: key(input)?,
        filter: if input.arbitrary()? {
            Some(query(input)?)
        } else {
            None
        },
        order_by,
        limit: match input.int_in_range(0_u8..=3)? {
            0 => 0,
            1 => QUERY_LIMIT_MAX,
            2 => QUERY_LIMIT_MAX + 1,
            _ => input.arbitrary()?,
        },
        after: if input.arbitrary()? {
            let sort_count = input.int_in_range(0..=QUERY_ORDER_BY_MAX + 1)?;
            Some(QueryCursor {
                sort: (0..sort_count)
                    .map(|_| {
                        Ok(if input.arbitrary()? {
                            Some(field_value(input)?)
                        } else {
                            None
                        })
                    })
                    .collect::<Result<_>>()?,
                key: key(input)?,
            })
        } else {
            None
        },
        projection: match input.int_in_range(0_u8..=2)? {
            0 => Projection::KeysOnly,
            1 => Projection::Fields,
            _ => Projection::Full,
        },
        count_only: input.arbitrary()?,
    })
}

fn scan(input: &mut Unstructured<'_>) -> Result<Scan> {
    Ok(Scan {
        start: key(input)?,
        end: if input.arbitrary()? {
            Some(key(input)?)
        } else {
            None
        },
        limit: input.arbitrary()?,
        keys_only: input.arbitrary()?,
        count_only: input.arbitrary()?,
    })
}

fn counter_add(input: &mut Unstructured<'_>, key: Vec<u8>) -> Result<CounterAdd> {
    Ok(CounterAdd {
        key,
        delta: input.arbitrary()?,
        min: input.arbitrary()?,
        max: input.arbitrary()?,
        create: input.arbitrary()?,
        ttl_ms: ttl_ms(input)?,
        refresh_ttl: input.arbitrary()?,
    })
}

fn compare_op(input: &mut Unstructured<'_>) -> Result<CompareOp> {
    Ok(match input.int_in_range(0_u8..=5)? {
        0 => CompareOp::Equal,
        1 => CompareOp::NotEqual,
        2 => CompareOp::Less,
        3 => CompareOp::LessOrEqual,
        4 => CompareOp::Greater,
        _ => CompareOp::GreaterOrEqual,
    })
}

fn compare(input: &mut Unstructured<'_>) -> Result<Compare> {
    let key = txn_key(input)?;
    let check = match input.int_in_range(0_u8..=7)? {
        0 => Check::Exists,
        1 => Check::Absent,
        2 => Check::Value(compare_op(input)?, value(input)?),
        3 => Check::Version(compare_op(input)?, input.arbitrary()?),
        4 => Check::CreateRevision(compare_op(input)?, input.arbitrary()?),
        5 => Check::Fence(input.arbitrary()?),
        6 => Check::Lease(compare_op(input)?, input.arbitrary()?),
        _ => Check::ModRevision(compare_op(input)?, input.arbitrary()?),
    };
    Ok(Compare { key, check })
}

fn txn_op(input: &mut Unstructured<'_>) -> Result<TxnOp> {
    Ok(match input.int_in_range(0_u8..=4)? {
        0 => TxnOp::Get {
            key: txn_key(input)?,
        },
        1 => TxnOp::Put {
            key: txn_key(input)?,
            value: value(input)?,
            ttl_ms: ttl_ms(input)?,
            keep_ttl: input.arbitrary()?,
            return_previous: input.arbitrary()?,
            lease: if input.arbitrary()? {
                Some(lease_id(input)?)
            } else {
                None
            },
            fields: fields(input)?,
        },
        2 => TxnOp::Delete {
            key: txn_key(input)?,
            return_previous: input.arbitrary()?,
        },
        3 => {
            let key = txn_key(input)?;
            TxnOp::Add(counter_add(input, key)?)
        }
        _ => TxnOp::Range(scan(input)?),
    })
}

fn txn(input: &mut Unstructured<'_>) -> Result<Txn> {
    let compare_count = input.int_in_range(0..=TXN_COMPARES_MAX + 1)?;
    let compares = (0..compare_count)
        .map(|_| compare(input))
        .collect::<Result<_>>()?;
    let mut branch = || -> Result<Vec<TxnOp>> {
        let op_count = input.int_in_range(0..=TXN_OPS_MAX + 1)?;
        (0..op_count).map(|_| txn_op(input)).collect()
    };
    Ok(Txn {
        compares,
        success: branch()?,
        failure: branch()?,
    })
}

fn build_request(input: &mut Unstructured<'_>) -> Result<Request> {
    let request = match input.int_in_range(0_u8..=29)? {
        0 => Request::Hello {
            protocol_version: input.arbitrary()?,
            client_name: String::from_utf8_lossy(&bytes(input, TEXT_SIZE_MAX + 1)?).into_owned(),
        },
        1 => Request::Ping,
        2 => Request::Stats,
        3 => Request::Get { key: key(input)? },
        4 => Request::Put(Box::new(Put {
            key: key(input)?,
            value: value(input)?,
            ttl_ms: ttl_ms(input)?,
            keep_ttl: input.arbitrary()?,
            condition: match input.int_in_range(0_u8..=4)? {
                0 => PutCondition::Always,
                1 => PutCondition::IfAbsent,
                2 => PutCondition::IfPresent,
                3 => PutCondition::IfVersion(input.arbitrary()?),
                _ => PutCondition::IfValue(bytes(input, VALUE_SIZE_FUZZ_MAX)?),
            },
            return_previous: input.arbitrary()?,
            lease: if input.arbitrary()? {
                Some(lease_id(input)?)
            } else {
                None
            },
            fields: fields(input)?,
        })),
        5 => Request::Delete(Box::new(Delete {
            key: key(input)?,
            condition: match input.int_in_range(0_u8..=2)? {
                0 => DeleteCondition::Always,
                1 => DeleteCondition::IfVersion(input.arbitrary()?),
                _ => DeleteCondition::IfValue(bytes(input, VALUE_SIZE_FUZZ_MAX)?),
            },
            return_previous: input.arbitrary()?,
        })),
        6 => Request::Exists { key: key(input)? },
        7 => Request::Expire {
            key: key(input)?,
            ttl_ms: input.arbitrary()?,
        },
        8 => Request::Persist { key: key(input)? },
        9 => Request::Ttl { key: key(input)? },
        10 => Request::MultiGet {
            keys: (0..batch_count(input)?)
                .map(|_| key(input))
                .collect::<Result<_>>()?,
        },
        11 => Request::MultiPut {
            entries: (0..batch_count(input)?)
                .map(|_| {
                    Ok(PutEntry {
                        key: key(input)?,
                        value: value(input)?,
                        ttl_ms: ttl_ms(input)?,
                        fields: fields(input)?,
                    })
                })
                .collect::<Result<_>>()?,
        },
        12 => Request::MultiDelete {
            keys: (0..batch_count(input)?)
                .map(|_| key(input))
                .collect::<Result<_>>()?,
        },
        13 => {
            let key = key(input)?;
            Request::Add(Box::new(counter_add(input, key)?))
        }
        15 => Request::Watch(Box::new(Watch {
            start: key(input)?,
            end: if input.arbitrary()? {
                Some(key(input)?)
            } else {
                None
            },
            from: match input.int_in_range(0_u8..=2)? {
                0 => WatchFrom::Now,
                1 => WatchFrom::After(input.arbitrary()?),
                _ => WatchFrom::Snapshot,
            },
            puts: input.arbitrary()?,
            deletes: input.arbitrary()?,
            previous: input.arbitrary()?,
            progress_interval_ms: input.arbitrary()?,
            query: if input.arbitrary()? {
                Some(query(input)?)
            } else {
                None
            },
        })),
        16 => Request::Unwatch {
            watch_id: input.arbitrary()?,
        },
        17 => Request::WatchProgress {
            watch_id: input.arbitrary()?,
        },
        18 => Request::Txn(Box::new(txn(input)?)),
        19 => Request::LeaseGrant {
            ttl_ms: input.arbitrary()?,
        },
        20 => Request::LeaseKeepalive {
            ids: (0..batch_count(input)?)
                .map(|_| lease_id(input))
                .collect::<Result<_>>()?,
        },
        21 => Request::LeaseRevoke {
            id: lease_id(input)?,
        },
        22 => Request::LeaseTimeToLive {
            id: lease_id(input)?,
        },
        23 => Request::LeaseList,
        24 => Request::Lock {
            name: key(input)?,
            lease: lease_id(input)?,
            wait_ms: lock_wait_ms(input)?,
        },
        25 => Request::Unlock {
            name: key(input)?,
            token: input.arbitrary()?,
        },
        26 => Request::CreateIndex(Box::new(IndexSpec {
            name: name(input, INDEX_NAME_SIZE_MAX)?,
            prefix: key(input)?,
            field: name(input, FIELD_NAME_SIZE_MAX)?,
            kind: if input.arbitrary()? {
                IndexKind::Equality
            } else {
                IndexKind::Range
            },
        })),
        27 => Request::DropIndex {
            name: name(input, INDEX_NAME_SIZE_MAX)?,
        },
        28 => Request::ListIndexes,
        29 => Request::Query(Box::new(query_request(input)?)),
        _ => Request::Scan(scan(input)?),
    };
    Ok(request)
}

/// The checks of `check_request`, applied field by field to the owned request, in the same
/// order (batch size first, then each item in order, key before value before TTL).
fn check_owned(request: &Request) -> std::result::Result<(), RequestError> {
    let check_optional_ttl = |ttl_ms: Option<u64>| ttl_ms.map_or(Ok(()), codec::check_ttl);
    match request {
        Request::Hello { client_name, .. } => codec::check_text(client_name),
        Request::Ping
        | Request::Stats
        | Request::Unwatch { .. }
        | Request::WatchProgress { .. }
        | Request::LeaseList
        | Request::ListIndexes => Ok(()),
        Request::CreateIndex(spec) => {
            check_owned_index_name(&spec.name)?;
            check_owned_bound_key(&spec.prefix)?;
            if spec.field.is_empty() || spec.field.len() > FIELD_NAME_SIZE_MAX {
                return Err(RequestError::BadIndex {
                    name: shown_name(&spec.name),
                    reason: format!(
                        "a field name has 1..={FIELD_NAME_SIZE_MAX} bytes, this one {}",
                        spec.field.len()
                    ),
                });
            }
            Ok(())
        }
        Request::DropIndex { name } => check_owned_index_name(name),
        Request::Query(query) => check_owned_query(query),
        Request::LeaseGrant { ttl_ms } => codec::check_ttl(*ttl_ms),
        Request::LeaseKeepalive { ids } => {
            codec::check_batch(ids.len())?;
            ids.iter().try_for_each(|id| codec::check_lease(*id))
        }
        Request::LeaseRevoke { id } | Request::LeaseTimeToLive { id } => codec::check_lease(*id),
        Request::Lock {
            name,
            lease,
            wait_ms,
        } => {
            codec::check_key(name)?;
            codec::check_lease(*lease)?;
            if *wait_ms > LOCK_WAIT_MS_MAX {
                return Err(RequestError::LockWaitOutOfRange {
                    wait_ms: *wait_ms,
                    wait_ms_max: LOCK_WAIT_MS_MAX,
                });
            }
            Ok(())
        }
        Request::Unlock { name, .. } => codec::check_key(name),
        Request::Watch(watch) => {
            codec::check_watch(
                &watch.start,
                watch.end.as_deref(),
                watch.puts,
                watch.deletes,
                watch.progress_interval_ms,
            )?;
            match &watch.query {
                Some(filter) => check_query(filter).map_err(RequestError::from),
                None => Ok(()),
            }
        }
        Request::Get { key }
        | Request::Exists { key }
        | Request::Persist { key }
        | Request::Ttl { key } => codec::check_key(key),
        Request::Delete(delete) => {
            codec::check_key(&delete.key)?;
            match &delete.condition {
                DeleteCondition::IfValue(expected) => codec::check_value(expected),
                DeleteCondition::Always | DeleteCondition::IfVersion(_) => Ok(()),
            }
        }
        Request::Add(add) => check_owned_add(add),
        Request::Txn(txn) => check_owned_txn(txn),
        Request::Put(put) => {
            codec::check_key(&put.key)?;
            codec::check_value(&put.value)?;
            check_owned_fields(&put.fields)?;
            if let PutCondition::IfValue(expected) = &put.condition {
                codec::check_value(expected)?;
            }
            if let Some(lease) = put.lease {
                codec::check_lease(lease)?;
            }
            check_optional_ttl(put.ttl_ms)
        }
        Request::Expire { key, ttl_ms } => {
            codec::check_key(key)?;
            codec::check_ttl(*ttl_ms)
        }
        Request::MultiGet { keys } | Request::MultiDelete { keys } => {
            codec::check_batch(keys.len())?;
            keys.iter().try_for_each(|key| codec::check_key(key))
        }
        Request::MultiPut { entries } => {
            codec::check_batch(entries.len())?;
            entries.iter().try_for_each(|entry| {
                codec::check_key(&entry.key)?;
                codec::check_value(&entry.value)?;
                check_owned_fields(&entry.fields)?;
                check_optional_ttl(entry.ttl_ms)
            })
        }
        Request::Scan(scan) => check_owned_scan(scan),
    }
}

/// At most `FIELDS_PER_VALUE_MAX` fields; then each in order: its name's size, a name given
/// before, a string's size.
fn check_owned_fields(fields: &[Field]) -> std::result::Result<(), RequestError> {
    if fields.len() > FIELDS_PER_VALUE_MAX {
        return Err(RequestError::TooManyFields {
            count: fields.len(),
            count_max: FIELDS_PER_VALUE_MAX,
        });
    }
    for (index, field) in fields.iter().enumerate() {
        let bad = |reason: String| RequestError::BadField {
            name: shown_name(&field.name),
            reason,
        };
        if field.name.is_empty() || field.name.len() > FIELD_NAME_SIZE_MAX {
            return Err(bad(format!(
                "a name has 1..={FIELD_NAME_SIZE_MAX} bytes, this one {}",
                field.name.len()
            )));
        }
        if fields[..index]
            .iter()
            .any(|earlier| earlier.name == field.name)
        {
            return Err(bad("the name is given twice".to_owned()));
        }
        if let FieldValue::Str(text) = &field.value {
            if text.len() > FIELD_STRING_SIZE_MAX {
                return Err(bad(format!(
                    "a string of {} bytes is over the limit of {FIELD_STRING_SIZE_MAX}",
                    text.len()
                )));
            }
        }
    }
    Ok(())
}

fn check_owned_index_name(name: &str) -> std::result::Result<(), RequestError> {
    if name.is_empty() || name.len() > INDEX_NAME_SIZE_MAX {
        return Err(RequestError::BadIndex {
            name: shown_name(name),
            reason: format!(
                "a name has 1..={INDEX_NAME_SIZE_MAX} bytes, this one {}",
                name.len()
            ),
        });
    }
    Ok(())
}

/// A prefix or cursor key: empty, or a key.
fn check_owned_bound_key(key: &[u8]) -> std::result::Result<(), RequestError> {
    if key.is_empty() {
        Ok(())
    } else {
        codec::check_key(key)
    }
}

/// The prefix, the filter, the order's count and names, the limit, then the cursor's key,
/// sort count and values.
fn check_owned_query(query: &QueryRequest) -> std::result::Result<(), RequestError> {
    check_owned_bound_key(&query.prefix)?;
    if let Some(filter) = &query.filter {
        check_query(filter)?;
    }
    let bad = |reason: String| RequestError::BadQueryRequest { reason };
    if query.order_by.len() > QUERY_ORDER_BY_MAX {
        return Err(bad(format!(
            "order_by has {} fields, over the limit of {QUERY_ORDER_BY_MAX}",
            query.order_by.len()
        )));
    }
    for order in &query.order_by {
        if order.field.is_empty() || order.field.len() > FIELD_NAME_SIZE_MAX {
            return Err(bad(format!(
                "an order_by field name has 1..={FIELD_NAME_SIZE_MAX} bytes, this one {}",
                order.field.len()
            )));
        }
    }
    if !query.count_only && !(1..=QUERY_LIMIT_MAX).contains(&query.limit) {
        return Err(bad(format!(
            "limit {} is outside 1..={QUERY_LIMIT_MAX}",
            query.limit
        )));
    }
    if let Some(after) = &query.after {
        check_owned_bound_key(&after.key)?;
        if after.sort.len() != query.order_by.len() {
            return Err(bad(format!(
                "the cursor has {} sort values for {} order_by fields",
                after.sort.len(),
                query.order_by.len()
            )));
        }
        if after.sort.iter().flatten().any(|value| !value.is_valid()) {
            return Err(bad("a cursor value is invalid".to_owned()));
        }
    }
    Ok(())
}

fn check_owned_scan(scan: &Scan) -> std::result::Result<(), RequestError> {
    for bound in std::iter::once(&scan.start).chain(scan.end.as_ref()) {
        if !bound.is_empty() {
            codec::check_key(bound)?;
        }
    }
    if !scan.count_only && !(1..=SCAN_LIMIT_MAX).contains(&scan.limit) {
        return Err(RequestError::ScanLimitOutOfRange {
            limit: scan.limit,
            limit_max: SCAN_LIMIT_MAX,
        });
    }
    Ok(())
}

/// Key, then bounds, then TTL (and a refresh only with one).
fn check_owned_add(add: &CounterAdd) -> std::result::Result<(), RequestError> {
    codec::check_key(&add.key)?;
    if let (Some(min), Some(max)) = (add.min, add.max) {
        if min > max {
            return Err(RequestError::EmptyBounds { min, max });
        }
    }
    match add.ttl_ms {
        Some(ttl_ms) => codec::check_ttl(ttl_ms),
        None if add.refresh_ttl => Err(RequestError::RefreshWithoutTtl),
        None => Ok(()),
    }
}

/// A key first (a transaction runs on its keys' shard), then the compares' count and each
/// compare, then each branch: its count, each op, and no key named twice.
fn check_owned_txn(txn: &Txn) -> std::result::Result<(), RequestError> {
    let names_a_key = !txn.compares.is_empty()
        || txn
            .success
            .iter()
            .chain(&txn.failure)
            .any(|op| !matches!(op, TxnOp::Range(_)));
    if !names_a_key {
        return Err(RequestError::TxnWithoutKey);
    }
    if txn.compares.len() > TXN_COMPARES_MAX {
        return Err(RequestError::TxnTooLarge {
            what: "compares",
            count: txn.compares.len(),
            count_max: TXN_COMPARES_MAX,
        });
    }
    for compare in &txn.compares {
        codec::check_key(&compare.key)?;
        if let Check::Value(_, value) = &compare.check {
            codec::check_value(value)?;
        }
    }
    for branch in [&txn.success, &txn.failure] {
        if branch.len() > TXN_OPS_MAX {
            return Err(RequestError::TxnTooLarge {
                what: "ops",
                count: branch.len(),
                count_max: TXN_OPS_MAX,
            });
        }
        let mut named = std::collections::BTreeSet::new();
        let mut duplicate = None;
        for op in branch {
            let key = match op {
                TxnOp::Get { key } | TxnOp::Delete { key, .. } => {
                    codec::check_key(key)?;
                    Some(key)
                }
                TxnOp::Put {
                    key,
                    value,
                    ttl_ms,
                    lease,
                    fields,
                    ..
                } => {
                    codec::check_key(key)?;
                    codec::check_value(value)?;
                    check_owned_fields(fields)?;
                    if let Some(ttl_ms) = ttl_ms {
                        codec::check_ttl(*ttl_ms)?;
                    }
                    if let Some(lease) = lease {
                        codec::check_lease(*lease)?;
                    }
                    Some(key)
                }
                TxnOp::Add(add) => {
                    check_owned_add(add)?;
                    Some(&add.key)
                }
                TxnOp::Range(scan) => {
                    check_owned_scan(scan)?;
                    None
                }
            };
            if let Some(key) = key {
                if !named.insert(key) && duplicate.is_none_or(|earlier: &Vec<u8>| key < earlier) {
                    duplicate = Some(key);
                }
            }
        }
        // Every op is checked before duplicates are looked for; the message names the
        // smallest key named twice.
        if let Some(key) = duplicate {
            return Err(RequestError::TxnDuplicateKey {
                key: codec::printable_key(key),
            });
        }
    }
    Ok(())
}
