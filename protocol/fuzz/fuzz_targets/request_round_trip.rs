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

#![no_main]

use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use tessera_protocol::codec::{self, FrameBuffer};
use tessera_protocol::limits::{
    BATCH_COUNT_MAX, KEY_SIZE_MAX, LOCK_WAIT_MS_MAX, SCAN_LIMIT_MAX, TEXT_SIZE_MAX,
    TXN_COMPARES_MAX, TXN_OPS_MAX,
};
use tessera_protocol::{
    Check, Compare, CompareOp, CounterAdd, Delete, DeleteCondition, FrameKind, Put, PutCondition,
    PutEntry, Request, RequestError, Scan, Txn, TxnOp, Watch, WatchFrom,
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
    let request = match input.int_in_range(0_u8..=25)? {
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
        | Request::LeaseList => Ok(()),
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
        Request::Watch(watch) => codec::check_watch(
            &watch.start,
            watch.end.as_deref(),
            watch.puts,
            watch.deletes,
            watch.progress_interval_ms,
        ),
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
                check_optional_ttl(entry.ttl_ms)
            })
        }
        Request::Scan(scan) => check_owned_scan(scan),
    }
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
                    ..
                } => {
                    codec::check_key(key)?;
                    codec::check_value(value)?;
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
