//! The client's behaviour, written once and run twice: against a server started in this
//! process and reached over loopback TCP (`remote::*`), and against shards embedded in the
//! test process (`embedded::*`, with the `embedded` feature). The two modes promise the same
//! semantics, so a scenario that passes in one mode and fails in the other points at a
//! transport, not at the scenario.
//!
//! Each test gets a fresh two-core cluster, so the counters in `stats()` belong to that test
//! alone. Every scenario is bounded by `common::SCENARIO_TIMEOUT`: a hang fails the test.
//!
//! The expected values are computed independently of the client where possible: which core
//! owns a key comes from `slot_for_key` and the slot ranges in the topology, not from the
//! client's route table.
//!
//! `batch_writes_of_large_values` and `batch_reads_of_large_values` guard a bug found when
//! they were first written: the client split batches by key count but not by size, so a
//! batch of large values failed with a protocol error after part of it had been applied.
//!
//! The `scan_*` and `count_*` scenarios check every page against a model of the keys written
//! (a `BTreeMap`, whose order is byte order), not against what another scan returned.
//! `scan_pages_of_large_values_skip_no_key` and `scan_continues_after_a_longest_key` guard
//! bugs found when they were first written: paging skipped keys when a shard's page ended on
//! its byte budget, and could not continue past a key of `KEY_SIZE_MAX` bytes.

#[macro_use]
mod common;

use std::collections::{BTreeMap, HashSet};
use std::fmt::Debug;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{core_of_key, core_slot_ranges, within, CALL_TIMEOUT, CORE_COUNT};
use tessera_client::{
    Client, ClientError, DeleteOptions, Entry, KeyRange, PutOptions, ScanItem, ScanOptions,
    ScanResult, ShardRevision, TtlState,
};
use tessera_protocol::limits::{
    BATCH_COUNT_MAX, FRAME_BODY_SIZE_MAX, KEY_SIZE_MAX, SCAN_LIMIT_MAX, TTL_MS_MAX, VALUE_SIZE_MAX,
};
use tessera_protocol::Topology;
use tessera_protocol::{slot_for_key, RequestError, SlotRange};

scenarios!(
    round_trip,
    conditional_puts,
    conditional_puts_on_expired_keys,
    delete_returns_previous,
    ttl_expires_keys,
    expire_and_persist,
    keep_ttl,
    batches_preserve_order,
    large_batches_are_split,
    batch_writes_of_large_values,
    batch_reads_of_large_values,
    hash_tags_share_a_core,
    invalid_requests_stay_local,
    limits_are_allowed,
    ping_answers_from_every_core,
    topology_covers_every_slot,
    stats_count_keys,
    concurrent_clones,
    counters_add_and_refuse_overflow,
    scan_returns_keys_in_byte_order,
    scan_pages_visit_every_key_once,
    scan_keys_only_omits_entries,
    scan_between_excludes_the_end,
    scan_skips_expired_and_deleted_keys,
    count_matches_the_model,
    scan_limits_are_refused_locally,
    scan_revisions_come_from_every_core,
    scan_pages_of_large_values_skip_no_key,
    scan_continues_after_a_longest_key,
    reads_report_the_shard_revision,
    compare_and_set_puts,
);

// ---------------------------------------------------------------------------------------
// Helpers.

/// Reads `key`, failing the test if it is missing.
async fn entry_of(client: &Client, key: impl AsRef<[u8]>) -> Entry {
    let key = key.as_ref();
    client
        .get(key)
        .await
        .expect("get succeeds")
        .unwrap_or_else(|| panic!("key {:?} should exist", String::from_utf8_lossy(key)))
}

/// The entry of a key created by the write at `revision`: one write, created and last
/// modified at `revision`, no expiry.
fn created_entry(value: impl Into<Vec<u8>>, revision: u64) -> Entry {
    Entry {
        value: value.into(),
        create_revision: revision,
        mod_revision: revision,
        version: 1,
        expires_at_ms: None,
        fields: Vec::new(),
    }
}

/// Checks that `result` is a refusal of the client's own input, and that the refusal is
/// neither retryable nor indeterminate (nothing was sent, and sending it again cannot help).
fn assert_invalid<T: Debug>(what: &str, result: Result<T, ClientError>, expected: &RequestError) {
    let error = match result {
        Ok(value) => panic!("{what}: expected InvalidRequest({expected:?}), got Ok({value:?})"),
        Err(error) => error,
    };
    assert!(!error.is_retryable(), "{what}: {error:?}");
    assert!(!error.is_indeterminate(), "{what}: {error:?}");
    assert_eq!(error.code(), None, "{what}: {error:?}");
    match error {
        ClientError::InvalidRequest(request_error) => {
            assert_eq!(&request_error, expected, "{what}");
        }
        other => panic!("{what}: expected InvalidRequest({expected:?}), got {other:?}"),
    }
}

/// Requests the shards have applied, summed over every core. `stats()` itself is answered by
/// the core and not counted, so reading this does not change it.
async fn applied_request_count(client: &Client) -> u64 {
    let stats = client.stats().await.expect("stats succeeds");
    stats.iter().map(|core| core.request_count).sum()
}

/// Keys held, summed over every core.
async fn total_key_count(client: &Client) -> u64 {
    let stats = client.stats().await.expect("stats succeeds");
    stats.iter().map(|core| core.key_count).sum()
}

/// The first key named `prefix:N` that core `core_index` owns.
fn key_on_core(topology: &Topology, core_index: usize, prefix: &str) -> String {
    // Each name lands on a given core of two with probability one half, so a search this
    // long fails only if routing is broken.
    const SEARCH_COUNT_MAX: usize = 1000;
    (0..SEARCH_COUNT_MAX)
        .map(|index| format!("{prefix}:{index}"))
        .find(|key| core_of_key(topology, key.as_bytes()) == core_index)
        .expect("some key hashes to each core")
}

fn unix_ms_now() -> u64 {
    let since_epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("the clock is after 1970");
    u64::try_from(since_epoch.as_millis()).expect("milliseconds since 1970 fit in u64")
}

/// The remaining time and deadline of an expiring key, failing the test otherwise.
fn expiring(what: &str, state: TtlState) -> (u64, u64) {
    match state {
        TtlState::Expiring {
            remaining_ms,
            expires_at_ms,
        } => (remaining_ms, expires_at_ms),
        other => panic!("{what}: expected an expiring key, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------
// Scenarios.

/// Put, get, exists and delete, with each write getting a higher mod revision than the last.
/// A key keeps its create revision while its version counts the writes; once deleted and
/// written again it is a new key, created at a new revision with version 1.
async fn round_trip(client: &Client) {
    let key = "round-trip:alpha";
    assert_eq!(client.get(key).await.unwrap(), None);
    assert!(!client.exists(key).await.unwrap());
    assert_eq!(client.ttl(key).await.unwrap(), TtlState::Missing);

    let first = client.put(key, "one").await.unwrap();
    assert!(first.applied);
    assert!(first.mod_revision > 0, "first={first:?}");
    assert_eq!(
        first.previous, None,
        "previous is only returned when asked for"
    );
    let entry = entry_of(client, key).await;
    assert_eq!(entry, created_entry("one", first.mod_revision));
    assert!(client.exists(key).await.unwrap());
    assert_eq!(client.ttl(key).await.unwrap(), TtlState::Persistent);

    let second = client.put(key, "two").await.unwrap();
    assert!(second.applied);
    assert!(
        second.mod_revision > first.mod_revision,
        "first={first:?} second={second:?}"
    );
    let entry = entry_of(client, key).await;
    assert_eq!(
        entry,
        Entry {
            value: b"two".to_vec(),
            create_revision: first.mod_revision,
            mod_revision: second.mod_revision,
            version: 2,
            expires_at_ms: None,
            fields: Vec::new(),
        },
        "an overwrite keeps the create revision and counts one more write"
    );

    assert!(client.delete(key).await.unwrap());
    assert_eq!(client.get(key).await.unwrap(), None);
    assert!(!client.exists(key).await.unwrap());
    assert_eq!(client.ttl(key).await.unwrap(), TtlState::Missing);
    assert!(
        !client.delete(key).await.unwrap(),
        "a second delete finds nothing"
    );

    // A key written again after its delete continues from the shard's revision, and is a
    // new key: created at that revision, with its count of writes started again.
    let third = client.put(key, "three").await.unwrap();
    assert!(
        third.mod_revision > second.mod_revision,
        "second={second:?} third={third:?}"
    );
    assert_eq!(
        entry_of(client, key).await,
        created_entry("three", third.mod_revision)
    );

    // Keys and values are bytes, not text: non-UTF-8 bytes and the empty value round-trip.
    let binary_key = [0xff_u8, 0x00, 0xfe, b'{', b'}'];
    let binary_value = [0_u8, 159, 146, 150, 255];
    client.put(binary_key, binary_value).await.unwrap();
    assert_eq!(entry_of(client, binary_key).await.value, binary_value);
    client.put("round-trip:empty", b"").await.unwrap();
    assert_eq!(entry_of(client, "round-trip:empty").await.value, b"");
    assert!(client.exists("round-trip:empty").await.unwrap());
}

/// `if_absent` and `if_present` apply only when their condition holds, report the current
/// mod revision when they do not (and do not count as a write), and return the entry they
/// found when asked.
async fn conditional_puts(client: &Client) {
    let key = "conditional:beta";
    let created = client
        .put_with(
            key,
            "first",
            PutOptions::new().if_absent().return_previous(),
        )
        .await
        .unwrap();
    assert!(created.applied, "created={created:?}");
    assert_eq!(created.previous, None);
    let first_entry = created_entry("first", created.mod_revision);

    let refused = client
        .put_with(
            key,
            "second",
            PutOptions::new().if_absent().return_previous(),
        )
        .await
        .unwrap();
    assert!(!refused.applied, "refused={refused:?}");
    assert_eq!(
        refused.mod_revision, created.mod_revision,
        "a refused put reports the current mod revision"
    );
    assert_eq!(refused.previous.as_ref(), Some(&first_entry));
    assert_eq!(entry_of(client, key).await, first_entry);

    let replaced = client
        .put_with(
            key,
            "third",
            PutOptions::new().if_present().return_previous(),
        )
        .await
        .unwrap();
    assert!(replaced.applied, "replaced={replaced:?}");
    assert!(
        replaced.mod_revision > created.mod_revision,
        "replaced={replaced:?}"
    );
    assert_eq!(replaced.previous.as_ref(), Some(&first_entry));
    let third_entry = entry_of(client, key).await;
    assert_eq!(third_entry.value, b"third");
    assert_eq!(third_entry.create_revision, created.mod_revision);
    assert_eq!(third_entry.mod_revision, replaced.mod_revision);
    assert_eq!(third_entry.version, 2, "the refused put was not a write");

    let quiet = client
        .put_with(key, "fourth", PutOptions::new().if_present())
        .await
        .unwrap();
    assert!(quiet.applied);
    assert_eq!(
        quiet.previous, None,
        "previous is only returned when asked for"
    );

    let plain = client
        .put_with(key, "fifth", PutOptions::new().return_previous())
        .await
        .unwrap();
    assert!(plain.applied);
    assert_eq!(
        plain.previous,
        Some(Entry {
            value: b"fourth".to_vec(),
            create_revision: created.mod_revision,
            mod_revision: quiet.mod_revision,
            version: 3,
            expires_at_ms: None,
            fields: Vec::new(),
        })
    );
    let fifth_entry = entry_of(client, key).await;
    assert_eq!(fifth_entry.mod_revision, plain.mod_revision);
    assert_eq!(fifth_entry.version, 4);

    let absent_key = "conditional:absent";
    let skipped = client
        .put_with(
            absent_key,
            "x",
            PutOptions::new().if_present().return_previous(),
        )
        .await
        .unwrap();
    assert!(!skipped.applied, "skipped={skipped:?}");
    assert_eq!(skipped.mod_revision, 0, "a missing key has mod revision 0");
    assert_eq!(skipped.previous, None);
    assert_eq!(client.get(absent_key).await.unwrap(), None);
    assert!(!client.exists(absent_key).await.unwrap());
}

/// For conditional puts, an expired key is absent, even before its timer has reclaimed it.
async fn conditional_puts_on_expired_keys(client: &Client) {
    let expired_key = "conditional:expired";
    let old = client
        .put_with(
            expired_key,
            "old",
            PutOptions::new().ttl(Duration::from_millis(50)),
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(150)).await;
    let revived = client
        .put_with(
            expired_key,
            "new",
            PutOptions::new().if_absent().return_previous(),
        )
        .await
        .unwrap();
    assert!(revived.applied, "revived={revived:?}");
    assert_eq!(revived.previous, None, "an expired entry is not returned");
    assert!(
        revived.mod_revision > old.mod_revision,
        "old={old:?} revived={revived:?}"
    );
    assert_eq!(
        entry_of(client, expired_key).await,
        created_entry("new", revived.mod_revision),
        "a key written after it expired is a new key"
    );
    let skipped_expired = client
        .put_with(
            "conditional:expired-present",
            "x",
            PutOptions::new().ttl(Duration::from_millis(50)),
        )
        .await
        .unwrap();
    assert!(skipped_expired.applied);
    tokio::time::sleep(Duration::from_millis(150)).await;
    let refused_expired = client
        .put_with(
            "conditional:expired-present",
            "y",
            PutOptions::new().if_present(),
        )
        .await
        .unwrap();
    assert!(!refused_expired.applied, "refused={refused_expired:?}");
}

/// `delete_with(key, true)` returns the removed entry, expiry included.
async fn delete_returns_previous(client: &Client) {
    let key = "delete:gamma";
    let written = client.put(key, "doomed").await.unwrap();
    let outcome = client
        .delete_with(key, DeleteOptions::new().return_previous())
        .await
        .unwrap();
    assert!(outcome.deleted);
    assert_eq!(
        outcome.previous,
        Some(created_entry("doomed", written.mod_revision))
    );
    let again = client
        .delete_with(key, DeleteOptions::new().return_previous())
        .await
        .unwrap();
    assert!(!again.deleted);
    assert_eq!(again.previous, None);

    let rewritten = client.put(key, "quiet").await.unwrap();
    assert_eq!(
        entry_of(client, key).await,
        created_entry("quiet", rewritten.mod_revision),
        "a deleted key written again starts over"
    );
    let quiet = client.delete_with(key, DeleteOptions::new()).await.unwrap();
    assert!(quiet.deleted);
    assert_eq!(
        quiet.previous, None,
        "previous is only returned when asked for"
    );

    client
        .put_with(
            key,
            "expiring",
            PutOptions::new().ttl(Duration::from_secs(60)),
        )
        .await
        .unwrap();
    let entry = entry_of(client, key).await;
    assert!(entry.expires_at_ms.is_some(), "entry={entry:?}");
    let outcome = client
        .delete_with(key, DeleteOptions::new().return_previous())
        .await
        .unwrap();
    assert_eq!(outcome.previous, Some(entry));
}

/// A key written with a 300 ms TTL is visible with its deadline, then gone after 400 ms.
async fn ttl_expires_keys(client: &Client) {
    let key = "ttl:delta";
    let ttl = Duration::from_millis(300);
    let ttl_ms = 300;
    let started = Instant::now();
    let before_ms = unix_ms_now();
    let written = client
        .put_with(key, "brief", PutOptions::new().ttl(ttl))
        .await
        .unwrap();
    let after_ms = unix_ms_now();
    assert!(written.applied);

    let entry = client.get(key).await.unwrap().unwrap_or_else(|| {
        panic!(
            "a key with a {ttl:?} TTL vanished {:?} after it was written",
            started.elapsed()
        )
    });
    assert_eq!(entry.value, b"brief");
    assert_eq!(entry.mod_revision, written.mod_revision);
    assert_eq!(entry.create_revision, written.mod_revision);
    assert_eq!(entry.version, 1);
    let expires_at_ms = entry
        .expires_at_ms
        .expect("a key written with a TTL expires");
    // The deadline is absolute Unix time: the server's clock when it applied the put, plus
    // the TTL. One millisecond of slack on each side absorbs clock rounding.
    assert!(
        expires_at_ms + 1 >= before_ms + ttl_ms && expires_at_ms <= after_ms + ttl_ms + 1,
        "expires_at_ms={expires_at_ms} before_ms={before_ms} after_ms={after_ms}"
    );
    assert!(client.exists(key).await.unwrap());
    let (remaining_ms, ttl_expires_at_ms) = expiring("ttl", client.ttl(key).await.unwrap());
    assert!(remaining_ms <= ttl_ms, "remaining_ms={remaining_ms}");
    assert!(remaining_ms > 0, "remaining_ms={remaining_ms}");
    assert_eq!(ttl_expires_at_ms, expires_at_ms);
    let persistent_key = "ttl:persistent";
    client.put(persistent_key, "forever").await.unwrap();
    assert_eq!(
        client.ttl(persistent_key).await.unwrap(),
        TtlState::Persistent
    );

    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(client.get(key).await.unwrap(), None);
    assert!(!client.exists(key).await.unwrap());
    assert_eq!(client.ttl(key).await.unwrap(), TtlState::Missing);
    assert!(
        !client.delete(key).await.unwrap(),
        "an expired key is not deleted"
    );
    assert_eq!(
        client.mget(&[key, persistent_key]).await.unwrap()[0],
        None,
        "batches see expiry too"
    );
    assert!(client.exists(persistent_key).await.unwrap());
}

/// `expire` adds a deadline to a live key and `persist` removes it; neither creates keys.
/// Each one that applies is a write (the version counts it and the mod revision moves); one
/// that does not apply changes nothing.
async fn expire_and_persist(client: &Client) {
    let key = "expire:epsilon";
    assert!(!client.expire(key, Duration::from_secs(60)).await.unwrap());
    assert!(!client.persist(key).await.unwrap());
    assert_eq!(
        client.get(key).await.unwrap(),
        None,
        "expire does not create"
    );

    let written = client.put(key, "value").await.unwrap();
    assert!(
        !client.persist(key).await.unwrap(),
        "persisting a key with no TTL changes nothing"
    );
    assert_eq!(
        entry_of(client, key).await,
        created_entry("value", written.mod_revision),
        "a persist that does not apply is not a write"
    );
    assert!(client.expire(key, Duration::from_secs(60)).await.unwrap());
    let (remaining_ms, expires_at_ms) = expiring("after expire", client.ttl(key).await.unwrap());
    assert!(
        remaining_ms <= 60_000 && remaining_ms > 50_000,
        "remaining_ms={remaining_ms}"
    );
    let entry = entry_of(client, key).await;
    assert_eq!(entry.value, b"value", "expire keeps the value");
    assert_eq!(entry.expires_at_ms, Some(expires_at_ms));
    assert_eq!(
        entry.create_revision, written.mod_revision,
        "entry={entry:?}"
    );
    assert!(entry.mod_revision > written.mod_revision, "entry={entry:?}");
    assert_eq!(entry.version, 2, "expire is a write: entry={entry:?}");
    let expired_entry = entry;

    assert!(client.persist(key).await.unwrap());
    assert_eq!(client.ttl(key).await.unwrap(), TtlState::Persistent);
    let entry = entry_of(client, key).await;
    assert_eq!(entry.expires_at_ms, None);
    assert_eq!(entry.value, b"value");
    assert_eq!(
        entry.create_revision, written.mod_revision,
        "entry={entry:?}"
    );
    assert!(
        entry.mod_revision > expired_entry.mod_revision,
        "entry={entry:?}"
    );
    assert_eq!(entry.version, 3, "persist is a write: entry={entry:?}");

    // A short expire removes the key like a put's TTL does.
    assert!(client
        .expire(key, Duration::from_millis(200))
        .await
        .unwrap());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(client.get(key).await.unwrap(), None);
    assert!(!client.exists(key).await.unwrap());
    assert!(
        !client.persist(key).await.unwrap(),
        "an expired key cannot be persisted"
    );
}

/// `keep_ttl` carries the current deadline over a put; a plain put clears it; an explicit
/// TTL wins over `keep_ttl`.
async fn keep_ttl(client: &Client) {
    let key = "keep-ttl:zeta";
    client
        .put_with(key, "v1", PutOptions::new().ttl(Duration::from_secs(60)))
        .await
        .unwrap();
    let deadline_ms = entry_of(client, key)
        .await
        .expires_at_ms
        .expect("written with a TTL");

    let kept = client
        .put_with(key, "v2", PutOptions::new().keep_ttl())
        .await
        .unwrap();
    assert!(kept.applied);
    let entry = entry_of(client, key).await;
    assert_eq!(entry.value, b"v2");
    assert_eq!(entry.mod_revision, kept.mod_revision);
    assert_eq!(entry.version, 2);
    assert_eq!(
        entry.expires_at_ms,
        Some(deadline_ms),
        "keep_ttl keeps the deadline"
    );
    let (_, ttl_deadline_ms) = expiring("after keep_ttl", client.ttl(key).await.unwrap());
    assert_eq!(ttl_deadline_ms, deadline_ms);

    client.put(key, "v3").await.unwrap();
    assert_eq!(entry_of(client, key).await.expires_at_ms, None);
    assert_eq!(client.ttl(key).await.unwrap(), TtlState::Persistent);

    client
        .put_with(key, "v4", PutOptions::new().keep_ttl())
        .await
        .unwrap();
    assert_eq!(
        client.ttl(key).await.unwrap(),
        TtlState::Persistent,
        "keep_ttl on a key without expiry keeps it persistent"
    );

    let fresh_key = "keep-ttl:fresh";
    let fresh = client
        .put_with(fresh_key, "v", PutOptions::new().keep_ttl())
        .await
        .unwrap();
    assert!(fresh.applied);
    assert_eq!(client.ttl(fresh_key).await.unwrap(), TtlState::Persistent);

    client
        .put_with(key, "v5", PutOptions::new().ttl(Duration::from_secs(60)))
        .await
        .unwrap();
    client
        .put_with(
            key,
            "v6",
            PutOptions::new().ttl(Duration::from_secs(30)).keep_ttl(),
        )
        .await
        .unwrap();
    let (remaining_ms, _) = expiring("ttl with keep_ttl", client.ttl(key).await.unwrap());
    assert!(
        remaining_ms <= 30_000,
        "an explicit TTL wins over keep_ttl: remaining_ms={remaining_ms}"
    );

    // keep_ttl on an expired key: the key is absent, so there is no deadline to keep.
    let expired_key = "keep-ttl:expired";
    client
        .put_with(
            expired_key,
            "old",
            PutOptions::new().ttl(Duration::from_millis(50)),
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(150)).await;
    client
        .put_with(expired_key, "new", PutOptions::new().keep_ttl())
        .await
        .unwrap();
    let entry = entry_of(client, expired_key).await;
    assert_eq!(entry.value, b"new");
    assert_eq!(entry.expires_at_ms, None, "a past deadline is not kept");
}

/// mput, mget and mdelete over 500 keys on both cores answer in the caller's order, with
/// missing keys and duplicates mixed in.
async fn batches_preserve_order(client: &Client) {
    const KEY_COUNT: usize = 500;
    let topology = client.topology();
    let keys: Vec<String> = (0..KEY_COUNT)
        .map(|index| format!("batch:{index}"))
        .collect();
    let mut key_count_per_core = [0_usize; CORE_COUNT];
    for key in &keys {
        key_count_per_core[core_of_key(&topology, key.as_bytes())] += 1;
    }
    assert!(
        key_count_per_core.iter().all(|&count| count > 0),
        "the keys must span every core: {key_count_per_core:?}"
    );

    let entries: Vec<(String, String)> = keys
        .iter()
        .enumerate()
        .map(|(index, key)| (key.clone(), format!("value:{index}")))
        .collect();
    let mod_revisions = client.mput(&entries).await.unwrap();
    assert_eq!(mod_revisions.len(), KEY_COUNT);
    // Entries on one core are applied at one revision (the batch is under BATCH_COUNT_MAX).
    let mut revision_of_core: [Option<u64>; CORE_COUNT] = [None; CORE_COUNT];
    for (key, &mod_revision) in keys.iter().zip(&mod_revisions) {
        assert!(mod_revision > 0, "key={key}");
        let core_index = core_of_key(&topology, key.as_bytes());
        let core_revision = *revision_of_core[core_index].get_or_insert(mod_revision);
        assert_eq!(core_revision, mod_revision, "key={key} core={core_index}");
    }

    // Read back in reverse, with a missing key after every seventh.
    let mut asked: Vec<String> = Vec::new();
    for index in (0..KEY_COUNT).rev() {
        asked.push(keys[index].clone());
        if index % 7 == 0 {
            asked.push(format!("batch-missing:{index}"));
        }
    }
    let values = client.mget(&asked).await.unwrap();
    assert_eq!(values.len(), asked.len());
    for (key, value) in asked.iter().zip(&values) {
        match key.strip_prefix("batch:") {
            None => assert_eq!(value, &None, "key={key}"),
            Some(index) => {
                let index: usize = index.parse().unwrap();
                let expected = created_entry(format!("value:{index}"), mod_revisions[index]);
                assert_eq!(value.as_ref(), Some(&expected), "key={key}");
            }
        }
    }

    // A key asked for twice is answered twice.
    let repeated = client
        .mget(&["batch:3", "batch:4", "batch:3"])
        .await
        .unwrap();
    assert_eq!(repeated[0], repeated[2]);
    assert_eq!(repeated[0].as_ref().unwrap().value, b"value:3");
    assert_eq!(repeated[1].as_ref().unwrap().value, b"value:4");

    // Delete every even key, with missing keys mixed in.
    let mut doomed: Vec<String> = Vec::new();
    for index in (0..KEY_COUNT).step_by(2) {
        doomed.push(keys[index].clone());
        if index % 10 == 0 {
            doomed.push(format!("batch-missing:{index}"));
        }
    }
    let deleted = client.mdelete(&doomed).await.unwrap();
    assert_eq!(deleted.len(), doomed.len());
    for (key, &was_deleted) in doomed.iter().zip(&deleted) {
        assert_eq!(was_deleted, key.starts_with("batch:"), "key={key}");
    }
    let values = client.mget(&keys).await.unwrap();
    for (index, value) in values.iter().enumerate() {
        assert_eq!(value.is_some(), index % 2 == 1, "key={}", keys[index]);
    }
    let deleted = client.mdelete(&keys).await.unwrap();
    for (index, &was_deleted) in deleted.iter().enumerate() {
        assert_eq!(was_deleted, index % 2 == 1, "key={}", keys[index]);
    }
    assert_eq!(total_key_count(client).await, 0);

    // Within one batch, a later entry for a key replaces an earlier one. Both are writes, at
    // the batch's one revision.
    let duplicate_revisions = client
        .mput(&[("batch:duplicate", "first"), ("batch:duplicate", "last")])
        .await
        .unwrap();
    let batch_revision = duplicate_revisions[0];
    assert_eq!(duplicate_revisions, [batch_revision, batch_revision]);
    assert_eq!(
        entry_of(client, "batch:duplicate").await,
        Entry {
            value: b"last".to_vec(),
            create_revision: batch_revision,
            mod_revision: batch_revision,
            version: 2,
            expires_at_ms: None,
            fields: Vec::new(),
        },
        "a key named twice in one batch is written twice"
    );

    // Empty batches are answered without a request.
    let no_keys: [&str; 0] = [];
    let no_entries: [(&str, &str); 0] = [];
    assert!(client.mget(&no_keys).await.unwrap().is_empty());
    assert!(client.mput(&no_entries).await.unwrap().is_empty());
    assert!(client.mdelete(&no_keys).await.unwrap().is_empty());
}

/// Batches with more keys per core than one request may carry are split, and still answer
/// in order.
async fn large_batches_are_split(client: &Client) {
    // Enough keys that each core's part is over BATCH_COUNT_MAX.
    let key_count = BATCH_COUNT_MAX * CORE_COUNT * 3 / 2;
    let topology = client.topology();
    let keys: Vec<String> = (0..key_count)
        .map(|index| format!("large:{index}"))
        .collect();
    let mut key_count_per_core = [0_usize; CORE_COUNT];
    for key in &keys {
        key_count_per_core[core_of_key(&topology, key.as_bytes())] += 1;
    }
    assert!(
        key_count_per_core
            .iter()
            .all(|&count| count > BATCH_COUNT_MAX),
        "each core needs more than one part: {key_count_per_core:?}"
    );
    let entries: Vec<(String, String)> = keys
        .iter()
        .map(|key| (key.clone(), format!("{key}:value")))
        .collect();
    let mod_revisions = client.mput(&entries).await.unwrap();
    assert_eq!(mod_revisions.len(), key_count);
    assert!(mod_revisions.iter().all(|&mod_revision| mod_revision > 0));
    assert_eq!(total_key_count(client).await, key_count as u64);

    let values = client.mget(&keys).await.unwrap();
    assert_eq!(values.len(), key_count);
    for ((key, value), &mod_revision) in keys.iter().zip(&values).zip(&mod_revisions) {
        let entry = value
            .as_ref()
            .unwrap_or_else(|| panic!("key={key} missing"));
        assert_eq!(
            entry,
            &created_entry(format!("{key}:value"), mod_revision),
            "key={key}"
        );
    }

    let deleted = client.mdelete(&keys).await.unwrap();
    assert_eq!(deleted.len(), key_count);
    assert!(deleted.iter().all(|&was_deleted| was_deleted));
    assert_eq!(total_key_count(client).await, 0);
}

/// Entries of maximal values, all on core 0 (through a hash tag), that together are over the
/// largest frame body, though each one alone is within every limit.
fn large_entries(topology: &Topology) -> Vec<(Vec<u8>, Vec<u8>)> {
    let entry_count = FRAME_BODY_SIZE_MAX / VALUE_SIZE_MAX + 1;
    let tag = key_on_core(topology, 0, "large-value-tag");
    (0..entry_count)
        .map(|index| {
            let key = format!("{{{tag}}}:{index}").into_bytes();
            let value = vec![u8::try_from(index).unwrap(); VALUE_SIZE_MAX];
            (key, value)
        })
        .collect()
}

/// An mput whose entries are each within the limits, but whose part for one core is over the
/// largest frame, either succeeds (the client splits parts by size as it does by count) or is
/// refused whole with `InvalidRequest` before anything is sent. It must not write the part
/// for the other core and then fail with an error that blames the server.
///
/// The bug this guards: `call_batch` grouped keys by core and into chunks of
/// `BATCH_COUNT_MAX` keys, never by bytes. Encoding the 9.4 MB part failed in the client with
/// `ClientError::Protocol { error: BodyTooLarge }`, after the other core's part had been sent
/// and applied. Parts are now bounded by bytes as well.
async fn batch_writes_of_large_values(client: &Client) {
    let topology = client.topology();
    let mut entries = large_entries(&topology);
    entries.push((
        key_on_core(&topology, 1, "large-value-small").into_bytes(),
        b"small".to_vec(),
    ));
    match client.mput(&entries).await {
        Ok(mod_revisions) => {
            assert_eq!(mod_revisions.len(), entries.len());
            let keys: Vec<&Vec<u8>> = entries.iter().map(|(key, _)| key).collect();
            let values = client.mget(&keys).await.unwrap();
            for ((key, value), found) in entries.iter().zip(values) {
                let found = found.unwrap_or_else(|| panic!("key={key:?} missing"));
                assert!(&found.value == value, "key={key:?}");
            }
        }
        Err(ClientError::InvalidRequest(_)) => {
            assert_eq!(
                total_key_count(client).await,
                0,
                "a batch refused before sending writes nothing"
            );
        }
        Err(other) => panic!(
            "an mput of {} entries, each within the limits, failed with {other:?}; keys written \
             anyway: {}",
            entries.len(),
            total_key_count(client).await
        ),
    }
}

/// Values written one by one can be read back in one mget, even when together they are over
/// the largest frame: the client splits reads (which are idempotent) as needed.
///
/// The bug this guards: the client sent one `MultiGet` for the core's nine keys, and the
/// server refused the 9.4 MB reply with `TooLarge`, so the keys could not be read in one call
/// at all. A read part refused as too large is now halved and sent again.
async fn batch_reads_of_large_values(client: &Client) {
    let topology = client.topology();
    let entries = large_entries(&topology);
    for (key, value) in &entries {
        client.put(key, value).await.unwrap();
    }
    let keys: Vec<&Vec<u8>> = entries.iter().map(|(key, _)| key).collect();
    let values = client.mget(&keys).await.unwrap_or_else(|error| {
        panic!(
            "an mget of {} keys, each stored within the limits, failed: {error:?}",
            keys.len()
        )
    });
    for ((key, value), found) in entries.iter().zip(values) {
        let found = found.unwrap_or_else(|| panic!("key={key:?} missing"));
        assert!(&found.value == value, "key={key:?}");
    }
}

/// Keys that share a `{tag}` hash to the tag's slot, so they all live on the tag's core.
async fn hash_tags_share_a_core(client: &Client) {
    let topology = client.topology();
    // One tag owned by each core, found by search, and a different key count for each, so
    // the per-core counts in stats() tell the tags apart.
    let tags: Vec<String> = (0..CORE_COUNT)
        .map(|core_index| key_on_core(&topology, core_index, "tag"))
        .collect();
    let key_counts: Vec<usize> = (0..CORE_COUNT)
        .map(|core_index| 30 + 20 * core_index)
        .collect();

    for ((tag, &key_count), core_index) in tags.iter().zip(&key_counts).zip(0..) {
        let keys: Vec<String> = (0..key_count)
            .map(|index| format!("{{{tag}}}:member:{index}"))
            .collect();
        for key in &keys {
            assert_eq!(slot_for_key(key.as_bytes()), slot_for_key(tag.as_bytes()));
            assert_eq!(core_of_key(&topology, key.as_bytes()), core_index);
        }
        // Half through single puts, half through one batch.
        let (single, batched) = keys.split_at(key_count / 2);
        for key in single {
            client.put(key, tag).await.unwrap();
        }
        let entries: Vec<(&String, &String)> = batched.iter().map(|key| (key, tag)).collect();
        let mod_revisions = client.mput(&entries).await.unwrap();
        let distinct: HashSet<u64> = mod_revisions.iter().copied().collect();
        assert_eq!(
            distinct.len(),
            1,
            "one core applies the whole batch at one revision: {mod_revisions:?}"
        );
    }

    let stats = client.stats().await.unwrap();
    assert_eq!(stats.len(), CORE_COUNT);
    for (core_index, core_stats) in stats.iter().enumerate() {
        assert_eq!(usize::from(core_stats.core_id), core_index);
        assert_eq!(
            core_stats.key_count, key_counts[core_index] as u64,
            "core {core_index} holds exactly its tag's keys: {stats:?}"
        );
    }
}

/// Arguments outside the protocol's limits are refused by the client itself, before any
/// request leaves it: the shards' request counters do not move.
async fn invalid_requests_stay_local(client: &Client) {
    let applied_before = applied_request_count(client).await;
    refuse_empty_keys(client).await;
    refuse_long_keys(client).await;
    refuse_large_values(client).await;
    refuse_ttls_out_of_range(client).await;
    assert_eq!(
        applied_request_count(client).await,
        applied_before,
        "a refused request must not reach a shard"
    );
    assert_eq!(
        client.get("invalid:good").await.unwrap(),
        None,
        "a refused batch writes none of its entries"
    );
}

async fn refuse_empty_keys(client: &Client) {
    let empty = RequestError::EmptyKey;
    let minute = Duration::from_secs(60);
    assert_invalid("get", client.get("").await, &empty);
    assert_invalid("put", client.put("", "v").await, &empty);
    let options = PutOptions::new().if_absent();
    assert_invalid("put_with", client.put_with("", "v", options).await, &empty);
    assert_invalid("delete", client.delete("").await, &empty);
    assert_invalid(
        "delete_with",
        client
            .delete_with("", DeleteOptions::new().return_previous())
            .await,
        &empty,
    );
    assert_invalid("exists", client.exists("").await, &empty);
    assert_invalid("expire", client.expire("", minute).await, &empty);
    assert_invalid("persist", client.persist("").await, &empty);
    assert_invalid("ttl", client.ttl("").await, &empty);
    assert_invalid("mget", client.mget(&["a", ""]).await, &empty);
    assert_invalid("mput", client.mput(&[("a", "v"), ("", "v")]).await, &empty);
    assert_invalid("mdelete", client.mdelete(&["a", ""]).await, &empty);
}

async fn refuse_long_keys(client: &Client) {
    let long_key = vec![b'k'; KEY_SIZE_MAX + 1];
    let too_large = RequestError::KeyTooLarge {
        size: KEY_SIZE_MAX + 1,
        size_max: KEY_SIZE_MAX,
    };
    let minute = Duration::from_secs(60);
    let keys = [b"a".to_vec(), long_key.clone()];
    assert_invalid("get", client.get(&long_key).await, &too_large);
    assert_invalid("put", client.put(&long_key, "v").await, &too_large);
    assert_invalid("delete", client.delete(&long_key).await, &too_large);
    assert_invalid("exists", client.exists(&long_key).await, &too_large);
    assert_invalid("expire", client.expire(&long_key, minute).await, &too_large);
    assert_invalid("persist", client.persist(&long_key).await, &too_large);
    assert_invalid("ttl", client.ttl(&long_key).await, &too_large);
    assert_invalid("mget", client.mget(&keys).await, &too_large);
    assert_invalid("mdelete", client.mdelete(&keys).await, &too_large);
}

async fn refuse_large_values(client: &Client) {
    let long_value = vec![b'v'; VALUE_SIZE_MAX + 1];
    let too_large = RequestError::ValueTooLarge {
        size: VALUE_SIZE_MAX + 1,
        size_max: VALUE_SIZE_MAX,
    };
    let put = client.put("invalid:value", &long_value).await;
    assert_invalid("put", put, &too_large);
    // One bad entry refuses the whole batch, so the good entry before it is not written.
    let entries = [
        (b"invalid:good".to_vec(), b"v".to_vec()),
        (b"invalid:bad".to_vec(), long_value),
    ];
    assert_invalid("mput", client.mput(&entries).await, &too_large);
}

async fn refuse_ttls_out_of_range(client: &Client) {
    let zero = RequestError::TtlOutOfRange {
        ttl_ms: 0,
        ttl_ms_max: TTL_MS_MAX,
    };
    let too_long = RequestError::TtlOutOfRange {
        ttl_ms: TTL_MS_MAX + 1,
        ttl_ms_max: TTL_MS_MAX,
    };
    let key = "invalid:ttl";
    let put = |ttl| client.put_with(key, "v", PutOptions::new().ttl(ttl));
    assert_invalid("put zero", put(Duration::ZERO).await, &zero);
    // TTLs count whole milliseconds, so less than one is zero.
    assert_invalid("put sub-ms", put(Duration::from_micros(500)).await, &zero);
    let over = Duration::from_millis(TTL_MS_MAX + 1);
    assert_invalid("put over", put(over).await, &too_long);
    assert_invalid(
        "expire zero",
        client.expire(key, Duration::ZERO).await,
        &zero,
    );
    assert_invalid("expire over", client.expire(key, over).await, &too_long);
}

/// Keys, values and TTLs exactly at their limits are accepted and stored whole.
async fn limits_are_allowed(client: &Client) {
    let longest_key = vec![b'k'; KEY_SIZE_MAX];
    let largest_value = vec![b'v'; VALUE_SIZE_MAX];
    client.put(&longest_key, &largest_value).await.unwrap();
    let entry = entry_of(client, &longest_key).await;
    assert_eq!(entry.value.len(), VALUE_SIZE_MAX);
    assert!(entry.value == largest_value);
    let outcome = client
        .delete_with(&longest_key, DeleteOptions::new().return_previous())
        .await
        .unwrap();
    assert_eq!(outcome.previous, Some(entry));

    let key = "limits:longest-ttl";
    let options = PutOptions::new().ttl(Duration::from_millis(TTL_MS_MAX));
    client.put_with(key, "v", options).await.unwrap();
    let (remaining_ms, _) = expiring("longest ttl", client.ttl(key).await.unwrap());
    assert!(
        remaining_ms > TTL_MS_MAX - 60_000,
        "remaining_ms={remaining_ms}"
    );
}

/// `ping` is answered by every core, in topology order.
async fn ping_answers_from_every_core(client: &Client) {
    let topology = client.topology();
    let node = &topology.nodes[0];
    let pongs = client.ping().await.unwrap();
    assert_eq!(pongs.len(), CORE_COUNT, "pongs={pongs:?}");
    for (core_index, (pong, core)) in pongs.iter().zip(&node.cores).enumerate() {
        assert_eq!(usize::from(pong.core_id), core_index, "pong={pong:?}");
        assert_eq!(pong.core_id, core.core_id);
        assert_eq!(pong.node_id, node.node_id);
        assert_eq!(pong.address, core.address);
        assert!(pong.round_trip < CALL_TIMEOUT, "pong={pong:?}");
    }
}

/// The topology is one node whose cores split the slots in half, and a refresh keeps it.
async fn topology_covers_every_slot(client: &Client) {
    let topology = client.topology();
    assert!(topology.epoch >= 1, "topology={topology:?}");
    assert_eq!(topology.nodes.len(), 1);
    let ranges = core_slot_ranges(&topology);
    assert_eq!(
        ranges,
        vec![
            SlotRange {
                start: 0,
                end: 8192
            },
            SlotRange {
                start: 8192,
                end: 16384
            },
        ]
    );
    let addresses: HashSet<&str> = topology.nodes[0]
        .cores
        .iter()
        .map(|core| core.address.as_str())
        .collect();
    assert_eq!(addresses.len(), CORE_COUNT, "each core has its own address");

    client.refresh_topology().await.unwrap();
    assert_eq!(client.topology(), topology);
    client.put("topology:after-refresh", "v").await.unwrap();
    assert_eq!(entry_of(client, "topology:after-refresh").await.value, b"v");
}

/// `stats()` reports one entry per core, and their key counts add up to the keys written.
async fn stats_count_keys(client: &Client) {
    let stats = client.stats().await.unwrap();
    assert_eq!(stats.len(), CORE_COUNT);
    assert_eq!(stats.iter().map(|core| core.key_count).sum::<u64>(), 0);
    let node_id = client.topology().nodes[0].node_id;
    for (core_index, core_stats) in stats.iter().enumerate() {
        assert_eq!(usize::from(core_stats.core_id), core_index);
        assert_eq!(core_stats.node_id, node_id);
    }

    let topology = client.topology();
    let single_keys: Vec<String> = (0..300)
        .map(|index| format!("stats:single:{index}"))
        .collect();
    let batch_keys: Vec<String> = (0..200)
        .map(|index| format!("stats:batch:{index}"))
        .collect();
    for key in &single_keys {
        client.put(key, "v").await.unwrap();
    }
    let entries: Vec<(&String, &str)> = batch_keys.iter().map(|key| (key, "v")).collect();
    client.mput(&entries).await.unwrap();
    // Writing a key again does not add one.
    client.put(&single_keys[0], "again").await.unwrap();

    let mut expected_per_core = [0_u64; CORE_COUNT];
    for key in single_keys.iter().chain(&batch_keys) {
        expected_per_core[core_of_key(&topology, key.as_bytes())] += 1;
    }
    let stats = client.stats().await.unwrap();
    let key_counts: Vec<u64> = stats.iter().map(|core| core.key_count).collect();
    assert_eq!(key_counts, expected_per_core, "stats={stats:?}");
    assert_eq!(key_counts.iter().sum::<u64>(), 500);
    for core_stats in &stats {
        assert!(core_stats.revision > 0, "stats={core_stats:?}");
        assert!(core_stats.memory_bytes > 0, "stats={core_stats:?}");
        assert!(
            core_stats.memory_bytes <= core_stats.memory_bytes_max,
            "stats={core_stats:?}"
        );
    }

    client.mdelete(&batch_keys[..100]).await.unwrap();
    assert_eq!(total_key_count(client).await, 400);
}

/// Sixteen tasks share one client (cloned) and run 500 operations each on their own keys;
/// every answer matches a per-task model. Then all tasks write one shared key, and every
/// write gets a distinct mod revision and is counted in the key's version.
async fn concurrent_clones(client: &Client) {
    const TASK_COUNT: usize = 16;
    const SHARED_PUT_COUNT: usize = 20;
    let mut workers = Vec::with_capacity(TASK_COUNT);
    for task_index in 0..TASK_COUNT {
        let client = client.clone();
        workers.push(tokio::spawn(concurrent_worker(client, task_index)));
    }
    let mut expected: BTreeMap<String, Option<Vec<u8>>> = BTreeMap::new();
    for worker in workers {
        let model = within(CALL_TIMEOUT, "a concurrent worker", worker)
            .await
            .expect("a concurrent worker panicked");
        expected.extend(
            model
                .into_iter()
                .map(|(key, state)| (key, state.map(|entry| entry.value))),
        );
    }
    let keys: Vec<&String> = expected.keys().collect();
    let values = client.mget(&keys).await.unwrap();
    for ((key, expected_value), value) in expected.iter().zip(values) {
        assert_eq!(
            value.map(|entry| entry.value).as_ref(),
            expected_value.as_ref(),
            "key={key}"
        );
    }

    let shared_key = "concurrent:shared";
    let mut writers = Vec::with_capacity(TASK_COUNT);
    for task_index in 0..TASK_COUNT {
        let client = client.clone();
        writers.push(tokio::spawn(async move {
            let mut mod_revisions = Vec::with_capacity(SHARED_PUT_COUNT);
            for put_index in 0..SHARED_PUT_COUNT {
                let value = format!("{task_index}:{put_index}");
                let outcome = client.put(shared_key, value).await.unwrap();
                assert!(outcome.applied);
                mod_revisions.push(outcome.mod_revision);
            }
            mod_revisions
        }));
    }
    let mut all_revisions = Vec::with_capacity(TASK_COUNT * SHARED_PUT_COUNT);
    for writer in writers {
        let mod_revisions = within(CALL_TIMEOUT, "a shared-key writer", writer)
            .await
            .expect("a shared-key writer panicked");
        assert!(
            mod_revisions.windows(2).all(|pair| pair[0] < pair[1]),
            "one task's writes get increasing mod revisions: {mod_revisions:?}"
        );
        all_revisions.extend(mod_revisions);
    }
    let distinct: HashSet<u64> = all_revisions.iter().copied().collect();
    assert_eq!(
        distinct.len(),
        TASK_COUNT * SHARED_PUT_COUNT,
        "every write is distinct"
    );
    let last = entry_of(client, shared_key).await;
    assert_eq!(Some(&last.mod_revision), all_revisions.iter().max());
    assert_eq!(
        Some(&last.create_revision),
        all_revisions.iter().min(),
        "the first write created the key"
    );
    assert_eq!(
        last.version,
        (TASK_COUNT * SHARED_PUT_COUNT) as u64,
        "every write is counted"
    );
}

/// One task of [`concurrent_clones`]: 500 mixed operations on 25 keys of its own, each
/// checked against a model of what the task wrote. Returns the model: each key's entry
/// (value, create and mod revisions, count of writes), or `None` if deleted.
async fn concurrent_worker(client: Client, task_index: usize) -> BTreeMap<String, Option<Entry>> {
    const OPERATION_COUNT: usize = 500;
    const KEY_COUNT: usize = 25;
    let keys: Vec<String> = (0..KEY_COUNT)
        .map(|key_index| format!("concurrent:{task_index}:{key_index}"))
        .collect();
    let mut model: BTreeMap<String, Option<Entry>> =
        keys.iter().map(|key| (key.clone(), None)).collect();
    for operation_index in 0..OPERATION_COUNT {
        // Stride 7 is coprime with 25, so every key sees every kind of operation.
        let key = &keys[(operation_index * 7) % KEY_COUNT];
        let current = model[key].clone();
        let context = format!("task={task_index} operation={operation_index} key={key}");
        match operation_index % 5 {
            0 | 1 => {
                let value = format!("{task_index}:{operation_index}").into_bytes();
                let outcome = client.put(key, &value).await.unwrap();
                assert!(outcome.applied, "{context}");
                let entry = match current {
                    Some(before) => {
                        assert!(
                            outcome.mod_revision > before.mod_revision,
                            "{context} outcome={outcome:?}"
                        );
                        Entry {
                            value,
                            mod_revision: outcome.mod_revision,
                            version: before.version + 1,
                            ..before
                        }
                    }
                    None => created_entry(value, outcome.mod_revision),
                };
                model.insert(key.clone(), Some(entry));
            }
            2 => {
                let found = client.get(key).await.unwrap();
                assert_eq!(found, current, "{context}");
            }
            3 => {
                let deleted = client.delete(key).await.unwrap();
                assert_eq!(deleted, current.is_some(), "{context}");
                model.insert(key.clone(), None);
            }
            _ => {
                let value = format!("absent:{task_index}:{operation_index}").into_bytes();
                let outcome = client
                    .put_with(key, &value, PutOptions::new().if_absent())
                    .await
                    .unwrap();
                assert_eq!(outcome.applied, current.is_none(), "{context}");
                if let Some(before) = &current {
                    assert_eq!(outcome.mod_revision, before.mod_revision, "{context}");
                } else {
                    let entry = created_entry(value, outcome.mod_revision);
                    model.insert(key.clone(), Some(entry));
                }
            }
        }
    }
    model
}

/// `add` counts from zero, returns the new value, is readable as decimal text, keeps a TTL,
/// and refuses overflow and non-counters with `OutOfRange`, changing nothing. Every add that
/// applies is a write the key's version counts. Concurrent adds from many tasks lose no
/// increment (each core applies its adds one at a time).
async fn counters_add_and_refuse_overflow(client: &Client) {
    assert_eq!(client.add("visits", 1).await.unwrap(), 1);
    let created = entry_of(client, "visits").await;
    assert_eq!(created, created_entry("1", created.mod_revision));
    assert_eq!(client.add("visits", 9).await.unwrap(), 10);
    assert_eq!(client.add("visits", -15).await.unwrap(), -5);
    let visits = entry_of(client, "visits").await;
    assert_eq!(visits.value, b"-5");
    assert_eq!(visits.create_revision, created.create_revision);
    assert!(visits.mod_revision > created.mod_revision, "{visits:?}");
    assert_eq!(visits.version, 3, "three adds: {visits:?}");

    let name = client.put("name", "ada").await.unwrap();
    let error = client.add("name", 1).await.unwrap_err();
    assert_eq!(
        error.code(),
        Some(tessera_client::ErrorCode::OutOfRange),
        "{error:?}"
    );
    assert!(
        !error.is_retryable() && !error.is_indeterminate(),
        "{error:?}"
    );
    assert_eq!(
        entry_of(client, "name").await,
        created_entry("ada", name.mod_revision),
        "a refused add is not a write"
    );

    assert_eq!(client.add("edge", i64::MAX).await.unwrap(), i64::MAX);
    let error = client.add("edge", 1).await.unwrap_err();
    assert_eq!(
        error.code(),
        Some(tessera_client::ErrorCode::OutOfRange),
        "{error:?}"
    );
    assert_eq!(client.add("edge", 0).await.unwrap(), i64::MAX);
    assert_eq!(
        entry_of(client, "edge").await.version,
        2,
        "the overflowing add was not a write, adding 0 is"
    );

    client
        .put_with(
            "window",
            "0",
            PutOptions::new().ttl(Duration::from_secs(60)),
        )
        .await
        .unwrap();
    assert_eq!(client.add("window", 3).await.unwrap(), 3);
    assert!(matches!(
        client.ttl("window").await.unwrap(),
        TtlState::Expiring { .. }
    ));

    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move {
                for _ in 0..50 {
                    client.add("shared", 1).await.unwrap();
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(client.add("shared", 0).await.unwrap(), 400);
    assert_eq!(entry_of(client, "shared").await.version, 401);
}

// ---------------------------------------------------------------------------------------
// Scans.

/// What a scan should return: each live key with the entry a read returns for it.
type ScanModel = BTreeMap<Vec<u8>, Entry>;

/// Writes `entries` in one batch and adds them to `model` with the mod revisions the batch
/// got: a key the model holds keeps its create revision and counts one more write.
async fn write_into_model(client: &Client, model: &mut ScanModel, entries: &[(Vec<u8>, Vec<u8>)]) {
    let mod_revisions = client.mput(entries).await.unwrap();
    assert_eq!(mod_revisions.len(), entries.len());
    for ((key, value), mod_revision) in entries.iter().zip(mod_revisions) {
        let entry = match model.remove(key) {
            Some(before) => Entry {
                value: value.clone(),
                mod_revision,
                version: before.version + 1,
                expires_at_ms: None,
                ..before
            },
            None => created_entry(value.clone(), mod_revision),
        };
        model.insert(key.clone(), entry);
    }
}

/// Entries `prefix` + `NNN` for `index_range`, each valued `value:NNN`. Three digits, so
/// byte order is index order.
fn numbered_entries(prefix: &str, index_range: std::ops::Range<usize>) -> Vec<(Vec<u8>, Vec<u8>)> {
    index_range
        .map(|index| {
            let key = format!("{prefix}{index:03}").into_bytes();
            let value = format!("value:{index:03}").into_bytes();
            (key, value)
        })
        .collect()
}

/// The items of `model` in `range`, in key order, with entries or (`keys_only`) without.
fn expected_items(model: &ScanModel, range: &KeyRange, keys_only: bool) -> Vec<ScanItem> {
    model
        .iter()
        .filter(|(key, _)| {
            key.as_slice() >= range.start.as_slice()
                && range.end.as_ref().is_none_or(|end| key < &end)
        })
        .map(|(key, entry)| ScanItem {
            key: key.clone(),
            entry: if keys_only { None } else { Some(entry.clone()) },
        })
        .collect()
}

/// Keys of `items` as text, for readable failure messages.
fn item_keys(items: &[ScanItem]) -> Vec<String> {
    items
        .iter()
        .map(|item| String::from_utf8_lossy(&item.key).into_owned())
        .collect()
}

/// `range` for a failure message: bounds as text, long ones cut short with their length.
fn range_text(range: &KeyRange) -> String {
    const SHOWN_BYTES_MAX: usize = 40;
    let bound = |bytes: &[u8]| {
        let shown = String::from_utf8_lossy(&bytes[..bytes.len().min(SHOWN_BYTES_MAX)]);
        if bytes.len() > SHOWN_BYTES_MAX {
            format!("{shown:?}... ({} bytes)", bytes.len())
        } else {
            format!("{shown:?}")
        }
    };
    let end = range.end.as_deref().map_or("the end".to_owned(), bound);
    format!("[{}, {end})", bound(&range.start))
}

/// Checks that the model's keys in `range` are spread over every core, so a scan that asks
/// only one core (or merges badly) cannot pass.
fn assert_spans_every_core(client: &Client, model: &ScanModel, range: &KeyRange) {
    let topology = client.topology();
    let mut key_count_per_core = [0_usize; CORE_COUNT];
    for item in expected_items(model, range, true) {
        key_count_per_core[core_of_key(&topology, &item.key)] += 1;
    }
    assert!(
        key_count_per_core.iter().all(|&count| count > 0),
        "the keys must span every core: {key_count_per_core:?}"
    );
}

/// Reads all of `range` a page of `options.limit` keys at a time, following `continuation`,
/// and checks each page as it goes: no page is over the limit, a page with a continuation is
/// not empty, and a continuation keeps the range's end. Fails after `page_count_max` pages.
async fn scan_to_the_end(
    client: &Client,
    range: &KeyRange,
    options: ScanOptions,
    page_count_max: usize,
) -> Vec<ScanItem> {
    let mut items: Vec<ScanItem> = Vec::new();
    let mut next = range.clone();
    for page_index in 0..page_count_max {
        let page = client.scan(&next, options).await.unwrap_or_else(|error| {
            panic!(
                "page {page_index} of {} failed: {error:?}",
                range_text(&next)
            )
        });
        assert!(
            page.items.len() <= options.limit as usize,
            "page {page_index}: {} items over the limit of {}",
            page.items.len(),
            options.limit
        );
        assert_eq!(page.revisions.len(), CORE_COUNT, "page {page_index}");
        let last_key = page.items.last().map(|item| item.key.clone());
        items.extend(page.items);
        match page.continuation {
            None => return items,
            Some(continuation) => {
                assert_eq!(continuation.end, range.end, "page {page_index}");
                assert!(
                    last_key.is_some_and(|last_key| last_key < continuation.start),
                    "page {page_index}: the continuation {} does not start after a key the \
                     page returned",
                    range_text(&continuation)
                );
                next = continuation;
            }
        }
    }
    panic!(
        "a scan of {} did not end within {page_count_max} pages",
        range_text(range)
    );
}

/// A prefix scan returns exactly the model's keys with that prefix, from both cores, in byte
/// order and with their entries; neighbours of the prefix on either side are not included.
async fn scan_returns_keys_in_byte_order(client: &Client) {
    let mut model = ScanModel::new();
    let mut entries = numbered_entries("scan:order:", 0..60);
    // Bytes above ASCII sort after every digit, and the empty value is a value.
    entries.push((b"scan:order:\xff\x00".to_vec(), b"binary".to_vec()));
    entries.push((b"scan:order:".to_vec(), Vec::new()));
    // Neighbours just outside the prefix, on both sides.
    entries.push((b"scan:order".to_vec(), b"shorter".to_vec()));
    entries.push((b"scan:order9".to_vec(), b"below".to_vec()));
    entries.push((b"scan:order;".to_vec(), b"above".to_vec()));
    // Written in reverse, so the order of writes does not hide a missing sort.
    entries.reverse();
    write_into_model(client, &mut model, &entries).await;

    let range = KeyRange::prefix("scan:order:");
    assert_spans_every_core(client, &model, &range);
    let result = client.scan(&range, ScanOptions::default()).await.unwrap();
    let expected = expected_items(&model, &range, false);
    assert_eq!(expected.len(), 62);
    assert_eq!(item_keys(&result.items), item_keys(&expected));
    assert_eq!(result.items, expected);
    assert_eq!(result.continuation, None, "1000 keys cover the range");

    // Every key, through the empty prefix and through `all`.
    let everything = expected_items(&model, &KeyRange::all(), false);
    assert_eq!(everything.len(), entries.len());
    for range in [KeyRange::prefix(""), KeyRange::all()] {
        let result = client.scan(&range, ScanOptions::default()).await.unwrap();
        assert_eq!(result.items, everything, "range={range:?}");
        assert_eq!(result.continuation, None);
    }

    // A prefix nothing has.
    let result = client
        .scan(&KeyRange::prefix("scan:none:"), ScanOptions::default())
        .await
        .unwrap();
    assert!(result.items.is_empty(), "result={result:?}");
    assert_eq!(result.continuation, None);
    assert_eq!(result.revisions.len(), CORE_COUNT);
}

/// Paging through 100 keys 7 at a time visits each key exactly once, in order, and the last
/// page has no continuation. Each page but the last is full, since the keys are small.
async fn scan_pages_visit_every_key_once(client: &Client) {
    const KEY_COUNT: usize = 100;
    const PAGE_KEY_COUNT: u32 = 7;
    let mut model = ScanModel::new();
    write_into_model(
        client,
        &mut model,
        &numbered_entries("scan:page:", 0..KEY_COUNT),
    )
    .await;
    write_into_model(client, &mut model, &numbered_entries("scan:pagf:", 0..5)).await;
    let range = KeyRange::prefix("scan:page:");
    assert_spans_every_core(client, &model, &range);
    let expected = expected_items(&model, &range, false);
    assert_eq!(expected.len(), KEY_COUNT);

    let options = ScanOptions::default().limit(PAGE_KEY_COUNT);
    let page_count_max = KEY_COUNT / PAGE_KEY_COUNT as usize + 2;
    let items = scan_to_the_end(client, &range, options, page_count_max).await;
    assert_eq!(item_keys(&items), item_keys(&expected));
    assert_eq!(items, expected);

    // Page by page: full pages, then the rest with no continuation.
    let mut next = range.clone();
    let mut seen = 0;
    loop {
        let page = client.scan(&next, options).await.unwrap();
        let left = KEY_COUNT - seen;
        let full = PAGE_KEY_COUNT as usize;
        assert_eq!(page.items.len(), left.min(full), "seen={seen}");
        assert_eq!(page.items, expected[seen..seen + page.items.len()]);
        seen += page.items.len();
        match page.continuation {
            Some(continuation) => {
                assert!(seen < KEY_COUNT, "a continuation after the last key");
                next = continuation;
            }
            None => break,
        }
    }
    assert_eq!(seen, KEY_COUNT);

    // A limit of one key still gets through, and so does the largest limit in one page.
    let items = scan_to_the_end(client, &range, options.limit(1), KEY_COUNT + 1).await;
    assert_eq!(items, expected);
    let whole = client
        .scan(&range, ScanOptions::default().limit(SCAN_LIMIT_MAX))
        .await
        .unwrap();
    assert_eq!(whole.items, expected);
    assert_eq!(whole.continuation, None);
}

/// `keys_only` returns the same keys with no entries, on every page.
async fn scan_keys_only_omits_entries(client: &Client) {
    let mut model = ScanModel::new();
    write_into_model(client, &mut model, &numbered_entries("scan:keys:", 0..40)).await;
    let range = KeyRange::prefix("scan:keys:");
    assert_spans_every_core(client, &model, &range);

    let result = client
        .scan(&range, ScanOptions::default().keys_only())
        .await
        .unwrap();
    assert!(
        result.items.iter().all(|item| item.entry.is_none()),
        "keys_only returns no entries: {result:?}"
    );
    assert_eq!(result.items, expected_items(&model, &range, true));

    let options = ScanOptions::default().keys_only().limit(6);
    let items = scan_to_the_end(client, &range, options, 10).await;
    assert_eq!(items, expected_items(&model, &range, true));

    // Without keys_only, the same keys come with their entries.
    let full = client.scan(&range, ScanOptions::default()).await.unwrap();
    assert!(full.items.iter().all(|item| item.entry.is_some()));
    assert_eq!(full.items, expected_items(&model, &range, false));
}

/// `between(start, end)` includes `start` and excludes `end`; an empty or inverted range
/// holds nothing; `from(start)` runs to the end of the keyspace.
async fn scan_between_excludes_the_end(client: &Client) {
    let mut model = ScanModel::new();
    write_into_model(
        client,
        &mut model,
        &numbered_entries("scan:between:", 0..30),
    )
    .await;
    write_into_model(client, &mut model, &numbered_entries("scan:beyond:", 0..3)).await;

    let range = KeyRange::between("scan:between:005", "scan:between:020");
    assert_spans_every_core(client, &model, &range);
    let result = client.scan(&range, ScanOptions::default()).await.unwrap();
    let keys = item_keys(&result.items);
    let expected_keys: Vec<String> = (5..20)
        .map(|index| format!("scan:between:{index:03}"))
        .collect();
    assert_eq!(keys, expected_keys);
    assert_eq!(result.items, expected_items(&model, &range, false));
    assert_eq!(result.continuation, None);

    // The end bound is excluded on the last page of a paged scan too.
    let items = scan_to_the_end(client, &range, ScanOptions::default().limit(4), 6).await;
    assert_eq!(item_keys(&items), expected_keys);

    for (start, end) in [
        ("scan:between:010", "scan:between:010"),
        ("scan:between:020", "scan:between:005"),
    ] {
        let range = KeyRange::between(start, end);
        let result = client.scan(&range, ScanOptions::default()).await.unwrap();
        assert!(result.items.is_empty(), "range={range:?} result={result:?}");
        assert_eq!(result.continuation, None, "range={range:?}");
        assert_eq!(client.count(&range).await.unwrap().0, 0, "range={range:?}");
    }

    let range = KeyRange::from("scan:between:025");
    let result = client.scan(&range, ScanOptions::default()).await.unwrap();
    assert_eq!(result.items, expected_items(&model, &range, false));
    assert_eq!(
        result.items.len(),
        5 + 3,
        "the rest of scan:between: and all of scan:beyond:"
    );
}

/// Keys whose TTL passed and deleted keys are absent from scans and counts, whether or not
/// the expiry timer has reclaimed them yet; keys with a TTL still ahead are returned with
/// their deadline.
async fn scan_skips_expired_and_deleted_keys(client: &Client) {
    let prefix = "scan:gone:";
    let mut model = ScanModel::new();
    write_into_model(client, &mut model, &numbered_entries(prefix, 0..30)).await;
    let brief = PutOptions::new().ttl(Duration::from_millis(50));
    let lasting = PutOptions::new().ttl(Duration::from_secs(60));
    for index in 30..40 {
        let key = format!("{prefix}{index:03}");
        client.put_with(&key, "brief", brief.clone()).await.unwrap();
    }
    for index in 40..45 {
        let key = format!("{prefix}{index:03}");
        client
            .put_with(&key, "lasting", lasting.clone())
            .await
            .unwrap();
        let entry = entry_of(client, &key).await;
        assert!(entry.expires_at_ms.is_some(), "entry={entry:?}");
        model.insert(key.into_bytes(), entry);
    }
    // Every third key deleted, singly and in a batch.
    let doomed: Vec<Vec<u8>> = (0..30)
        .step_by(3)
        .map(|index| format!("{prefix}{index:03}").into_bytes())
        .collect();
    assert!(client.delete(&doomed[0]).await.unwrap());
    let deleted = client.mdelete(&doomed[1..]).await.unwrap();
    assert!(deleted.iter().all(|&was_deleted| was_deleted));
    for key in &doomed {
        model.remove(key);
    }
    // A key deleted and written again is back, as a new key (created again, one write).
    let reborn = doomed[4].clone();
    write_into_model(client, &mut model, &[(reborn.clone(), b"reborn".to_vec())]).await;

    tokio::time::sleep(Duration::from_millis(150)).await;
    let range = KeyRange::prefix(prefix);
    assert_spans_every_core(client, &model, &range);
    let expected = expected_items(&model, &range, false);
    assert_eq!(expected.len(), 30 - doomed.len() + 1 + 5);
    let result = client.scan(&range, ScanOptions::default()).await.unwrap();
    assert_eq!(item_keys(&result.items), item_keys(&expected));
    assert_eq!(result.items, expected);
    let paged = scan_to_the_end(client, &range, ScanOptions::default().limit(3), 20).await;
    assert_eq!(paged, expected);
    let keys_only = client
        .scan(&range, ScanOptions::default().keys_only())
        .await
        .unwrap();
    assert_eq!(keys_only.items, expected_items(&model, &range, true));
    assert_eq!(client.count(&range).await.unwrap().0, expected.len() as u64);
}

/// `count` equals the number of the model's keys in the range, for prefixes, bounded and
/// unbounded ranges, and after deletes; it agrees with a scan of the same range.
async fn count_matches_the_model(client: &Client) {
    let mut model = ScanModel::new();
    write_into_model(client, &mut model, &numbered_entries("count:a:", 0..150)).await;
    write_into_model(client, &mut model, &numbered_entries("count:b:", 0..70)).await;
    let ranges = [
        KeyRange::all(),
        KeyRange::prefix("count:"),
        KeyRange::prefix("count:a:"),
        KeyRange::prefix("count:b:"),
        KeyRange::prefix("count:c:"),
        KeyRange::between("count:a:100", "count:b:010"),
        KeyRange::from("count:b:050"),
    ];
    let check = |model: &ScanModel| {
        let model = model.clone();
        let ranges = ranges.clone();
        async move {
            for range in &ranges {
                let expected = expected_items(&model, range, true).len() as u64;
                let (count, revisions) = client.count(range).await.unwrap();
                assert_eq!(count, expected, "range={range:?}");
                assert_eq!(revisions.len(), CORE_COUNT, "range={range:?}");
                let scanned = client
                    .scan(range, ScanOptions::default().keys_only())
                    .await
                    .unwrap();
                assert_eq!(scanned.items.len() as u64, count, "range={range:?}");
            }
        }
    };
    assert_spans_every_core(client, &model, &KeyRange::prefix("count:b:"));
    check(&model).await;
    assert_eq!(client.count(&KeyRange::all()).await.unwrap().0, 220);

    let doomed: Vec<Vec<u8>> = (0..150)
        .step_by(2)
        .map(|index| format!("count:a:{index:03}").into_bytes())
        .collect();
    client.mdelete(&doomed).await.unwrap();
    for key in &doomed {
        model.remove(key);
    }
    check(&model).await;
    assert_eq!(client.count(&KeyRange::all()).await.unwrap().0, 145);
}

/// A scan limit of zero or over `SCAN_LIMIT_MAX`, and a bound far longer than a key, are
/// refused by the client with `InvalidRequest` before anything is sent. The largest limit and
/// bounds as long as a key are allowed.
async fn scan_limits_are_refused_locally(client: &Client) {
    client.put("scan:limit:key", "v").await.unwrap();
    let applied_before = applied_request_count(client).await;
    let range = KeyRange::prefix("scan:limit:");
    for limit in [0, SCAN_LIMIT_MAX + 1, u32::MAX] {
        let expected = RequestError::ScanLimitOutOfRange {
            limit,
            limit_max: SCAN_LIMIT_MAX,
        };
        let options = ScanOptions::default().limit(limit);
        assert_invalid(
            &format!("limit {limit}"),
            client.scan(&range, options).await,
            &expected,
        );
        let keys_only = options.keys_only();
        let result = client.scan(&range, keys_only).await;
        assert_invalid(&format!("keys_only limit {limit}"), result, &expected);
    }
    // Twice a key's length, so the check holds whatever slack a bound is given over a key.
    let long_bound = vec![b'k'; 2 * KEY_SIZE_MAX];
    let options = ScanOptions::default();
    let long_start = KeyRange::from(&long_bound);
    let long_end = KeyRange::between("a", &long_bound);
    assert_bound_too_large("long start", client.scan(&long_start, options).await);
    assert_bound_too_large("long end", client.scan(&long_end, options).await);
    assert_bound_too_large("count long start", client.count(&long_start).await);
    assert_bound_too_large("count long end", client.count(&long_end).await);
    assert_eq!(
        applied_request_count(client).await,
        applied_before,
        "a refused scan must not reach a shard"
    );

    let result = client
        .scan(&range, ScanOptions::default().limit(SCAN_LIMIT_MAX))
        .await
        .unwrap();
    assert_eq!(item_keys(&result.items), ["scan:limit:key"]);
    // Bounds exactly as long as a key are allowed.
    let longest = vec![0xff_u8; KEY_SIZE_MAX];
    let result = client
        .scan(&KeyRange::from(&longest), options)
        .await
        .unwrap();
    assert!(result.items.is_empty(), "result={result:?}");
    assert_eq!(client.count(&KeyRange::from(&longest)).await.unwrap().0, 0);
}

/// Checks that `result` refuses a bound of `2 * KEY_SIZE_MAX` bytes as `KeyTooLarge`, and
/// that the refusal is the client's own, as [`assert_invalid`] does.
fn assert_bound_too_large<T: Debug>(what: &str, result: Result<T, ClientError>) {
    let error = match result {
        Ok(value) => panic!("{what}: expected InvalidRequest(KeyTooLarge), got Ok({value:?})"),
        Err(error) => error,
    };
    assert!(!error.is_retryable(), "{what}: {error:?}");
    assert!(!error.is_indeterminate(), "{what}: {error:?}");
    assert_eq!(error.code(), None, "{what}: {error:?}");
    match error {
        ClientError::InvalidRequest(RequestError::KeyTooLarge { size, .. }) => {
            assert_eq!(size, 2 * KEY_SIZE_MAX, "{what}");
        }
        other => panic!("{what}: expected InvalidRequest(KeyTooLarge), got {other:?}"),
    }
}

/// The revisions of a scan name every core once, in topology order. Reads leave them alone;
/// a write to one core raises that core's revision to at least the write's mod revision and
/// leaves the other core's alone. `count` reports the same revisions as `scan`.
async fn scan_revisions_come_from_every_core(client: &Client) {
    let topology = client.topology();
    let node = &topology.nodes[0];
    let range = KeyRange::prefix("scan:revision:");
    let revisions_now = || async {
        let scanned = client.scan(&range, ScanOptions::default()).await.unwrap();
        let (_, counted) = client.count(&range).await.unwrap();
        assert_eq!(
            scanned.revisions, counted,
            "scan and count read the same revisions"
        );
        scanned.revisions
    };
    let check_cores = |revisions: &[ShardRevision]| {
        assert_eq!(revisions.len(), CORE_COUNT, "revisions={revisions:?}");
        for (revision, core) in revisions.iter().zip(&node.cores) {
            assert_eq!(revision.node_id, node.node_id, "revisions={revisions:?}");
            assert_eq!(revision.core_id, core.core_id, "revisions={revisions:?}");
        }
    };

    let start = revisions_now().await;
    check_cores(&start);
    assert_eq!(revisions_now().await, start, "reads do not move revisions");

    for core_index in 0..CORE_COUNT {
        let before = revisions_now().await;
        let key = key_on_core(&topology, core_index, "scan:revision");
        let written = client.put(&key, "v").await.unwrap();
        let after = revisions_now().await;
        check_cores(&after);
        for (other_index, (old, new)) in before.iter().zip(&after).enumerate() {
            if other_index == core_index {
                assert!(
                    new.revision > old.revision,
                    "core {core_index}: {before:?} {after:?}"
                );
                assert!(
                    new.revision >= written.mod_revision,
                    "{after:?} written={written:?}"
                );
            } else {
                assert_eq!(
                    new, old,
                    "a write to core {core_index} moved core {other_index}"
                );
            }
        }
    }
    let end = revisions_now().await;
    for (old, new) in start.iter().zip(&end) {
        assert!(new.revision > old.revision, "start={start:?} end={end:?}");
    }
}

/// Paging through keys whose values are as large as allowed, mixed with small ones, visits
/// every key once.
///
/// The bug this guards: a shard ends a page before `SCAN_PAGE_BYTES_MAX` bytes, so with
/// 1 MiB values core 0 answered with 4 keys and `more`, while core 1 answered with its
/// first `limit` small keys. The client merged the pages, kept up to `limit` keys (up to
/// core 1's last) and continued after the last one, skipping core 0's keys between its 4th
/// key and that point. A shard that answers with `more` must bound the merged page at its
/// last key.
async fn scan_pages_of_large_values_skip_no_key(client: &Client) {
    const KEY_COUNT: usize = 24;
    let topology = client.topology();
    let prefix = "scan:large:";
    let entries: Vec<(Vec<u8>, Vec<u8>)> = (0..KEY_COUNT)
        .map(|index| {
            let key = format!("{prefix}{index:03}").into_bytes();
            let value = if core_of_key(&topology, &key) == 0 {
                vec![b'v'; VALUE_SIZE_MAX]
            } else {
                format!("small:{index}").into_bytes()
            };
            (key, value)
        })
        .collect();
    let mut model = ScanModel::new();
    // One by one: the large values together are over one frame.
    for (key, value) in &entries {
        let written = client.put(key, value).await.unwrap();
        model.insert(
            key.clone(),
            created_entry(value.clone(), written.mod_revision),
        );
    }
    let range = KeyRange::prefix(prefix);
    assert_spans_every_core(client, &model, &range);
    let large_count = entries
        .iter()
        .filter(|(_, value)| value.len() == VALUE_SIZE_MAX)
        .count();
    assert!(
        large_count * VALUE_SIZE_MAX > 4 * 1024 * 1024 + VALUE_SIZE_MAX,
        "core 0's keys need more than one page: {large_count} large values"
    );
    let expected_keys = item_keys(&expected_items(&model, &range, true));

    for limit in [10, 1000] {
        let options = ScanOptions::default().limit(limit);
        let items = scan_to_the_end(client, &range, options, KEY_COUNT + 1).await;
        assert_eq!(item_keys(&items), expected_keys, "limit={limit}");
        for item in &items {
            let expected = &model[&item.key];
            let entry = item.entry.as_ref().expect("an entry without keys_only");
            assert!(
                entry == expected,
                "limit={limit} key={:?}",
                String::from_utf8_lossy(&item.key)
            );
        }
    }
}

/// Paging through keys as long as allowed goes on past each of them.
///
/// The bug this guards: the continuation after a page starts at `key_after(last key)`, the
/// last key with a zero byte appended. After a key of `KEY_SIZE_MAX` bytes that start is one
/// byte over the limit, so the next page was refused with `KeyTooLarge` and the rest of the
/// range could not be read.
async fn scan_continues_after_a_longest_key(client: &Client) {
    let prefix = "scan:longest:";
    let mut model = ScanModel::new();
    let entries: Vec<(Vec<u8>, Vec<u8>)> = ["a", "b", "c"]
        .iter()
        .map(|name| {
            let mut key = format!("{prefix}{name}").into_bytes();
            key.resize(KEY_SIZE_MAX, b'k');
            (key, name.as_bytes().to_vec())
        })
        .collect();
    write_into_model(client, &mut model, &entries).await;
    let range = KeyRange::prefix(prefix);
    let expected = expected_items(&model, &range, false);
    assert_eq!(expected.len(), 3);
    let whole: ScanResult = client.scan(&range, ScanOptions::default()).await.unwrap();
    assert_eq!(whole.items, expected);

    let items = scan_to_the_end(client, &range, ScanOptions::default().limit(1), 5).await;
    assert_eq!(items, expected);
}

/// `get_with_revision` reports the key's own shard and that shard's revision at the read:
/// right after a put it is the put's revision; a write to the other shard does not move it;
/// a delete moves it, and a missing key still reports where it would live.
async fn reads_report_the_shard_revision(client: &Client) {
    let topology = client.topology();
    let node = &topology.nodes[0];
    let key = key_on_core(&topology, 0, "stamp");
    let other = key_on_core(&topology, 1, "stamp");
    let written = client.put(&key, "v").await.unwrap();
    let (entry, shard) = client.get_with_revision(&key).await.unwrap();
    assert_eq!(entry.unwrap().mod_revision, written.mod_revision);
    assert_eq!(
        (shard.node_id, shard.core_id, shard.revision),
        (node.node_id, node.cores[0].core_id, written.mod_revision)
    );
    client.put(&other, "w").await.unwrap();
    let (_, unmoved) = client.get_with_revision(&key).await.unwrap();
    assert_eq!(
        unmoved, shard,
        "another shard's write is not this shard's revision"
    );
    assert!(client.delete(&key).await.unwrap());
    let (entry, after_delete) = client.get_with_revision(&key).await.unwrap();
    assert_eq!(entry, None);
    assert_eq!(after_delete.core_id, shard.core_id);
    assert_eq!(after_delete.revision, shard.revision + 1);
}

/// Compare-and-set through the client: a put on a version or a value wins only while it
/// holds, and one that loses reports the key's current version and, when asked, its entry.
async fn compare_and_set_puts(client: &Client) {
    let key = "cas:1";
    let won = client
        .put_with(key, "a", PutOptions::new().if_version(0))
        .await
        .unwrap();
    assert!(won.applied);
    assert_eq!(won.version, 1);
    let lost = client
        .put_with(key, "b", PutOptions::new().if_version(0).return_previous())
        .await
        .unwrap();
    assert!(!lost.applied);
    assert_eq!((lost.version, lost.mod_revision), (1, won.mod_revision));
    assert_eq!(lost.previous.map(|entry| entry.value), Some(b"a".to_vec()));
    let next = client
        .put_with(key, "b", PutOptions::new().if_version(lost.version))
        .await
        .unwrap();
    assert!(next.applied);
    assert_eq!(next.version, 2);
    let stale = client
        .put_with(key, "c", PutOptions::new().if_value("a"))
        .await
        .unwrap();
    assert!(!stale.applied);
    assert_eq!(stale.version, 2);
    let fresh = client
        .put_with(key, "c", PutOptions::new().if_value("b"))
        .await
        .unwrap();
    assert!(fresh.applied);
    assert_eq!(fresh.version, 3);
    assert_eq!(entry_of(client, key).await.value, b"c");
    assert_invalid(
        "an expected value over the limit",
        client
            .put_with(
                key,
                "d",
                PutOptions::new().if_value(vec![0; VALUE_SIZE_MAX + 1]),
            )
            .await,
        &RequestError::ValueTooLarge {
            size: VALUE_SIZE_MAX + 1,
            size_max: VALUE_SIZE_MAX,
        },
    );
}
