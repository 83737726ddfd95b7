//! Conditional deletes, counters and single-shard transactions through the client, written
//! once and run twice like `behaviour.rs`: against a server on loopback (`remote::*`) and
//! against embedded shards (`embedded::*`, with the `embedded` feature).
//!
//! The expected values come from the test's own bookkeeping, not from the client: which core
//! owns a key from `slot_for_key` and the topology's slot ranges (`common::core_of_key`), a
//! shard's revision from that core's own `stats()`, and what a compare should answer from
//! the key's entry and a comparison written here ([`expected_holds`]), not from
//! `CompareOp::holds`.
//!
//! "Applies nothing" is checked in full each time: the key's entry (value, revisions,
//! version, expiry) is unchanged and its shard's revision did not move.
//!
//! The TTL scenarios sleep, but only past deadlines the server reported (`expires_at_ms`),
//! with TTLs of a few hundred milliseconds. Every scenario is bounded by
//! `common::SCENARIO_TIMEOUT`: a hang fails the test.

#[macro_use]
mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{core_of_key, within, CALL_TIMEOUT};
use futures_util::StreamExt;
use tessera_client::{
    AddOptions, Client, ClientError, Compare, CompareOp, CounterAdd, CounterOutcome, DeleteOptions,
    Entry, ErrorCode, EventKind, KeyRange, Optimistic, PutOptions, Scan, Topology, TtlState, Txn,
    TxnOp, TxnOutcome, TxnResult, WatchMessage, WatchOptions,
};
use tessera_protocol::limits::{TXN_COMPARES_MAX, TXN_OPS_MAX};
use tessera_protocol::RequestError;

scenarios!(
    conditional_deletes,
    conditional_deletes_on_expired_keys,
    counter_bounds_refuse_and_apply_nothing,
    counter_overflow_and_non_counters_are_out_of_range,
    counter_without_create,
    counter_fixed_window_is_set_at_creation,
    counter_restarts_at_zero_after_its_window,
    counter_sliding_window_is_refreshed,
    set_counter_keeps_the_window,
    compare_and_set_counter_wins_and_loses,
    txn_compares_on_present_and_missing_keys,
    txn_runs_one_branch,
    txn_ops_take_their_options,
    txn_writes_take_one_revision,
    txn_writes_are_one_watch_batch,
    txn_keys_must_share_a_shard,
    txn_refuses_a_key_twice_and_oversized_branches,
    txn_failing_counter_add_applies_nothing,
    txn_range_sees_earlier_writes,
    optimistic_transfers_conserve_the_sum,
    optimistic_gives_up_after_losing,
    optimistic_retries_and_stops_on_decide_errors,
);

// ---------------------------------------------------------------------------------------
// Helpers.

/// Reads `key`, failing the test if it is missing.
async fn entry_of(client: &Client, key: &str) -> Entry {
    client
        .get(key)
        .await
        .expect("get succeeds")
        .unwrap_or_else(|| panic!("key {key:?} should exist"))
}

/// The revision of the shard that owns `key`, from that core's own `stats()`.
async fn shard_revision(client: &Client, key: &str) -> u64 {
    let core_index = core_of_key(&client.topology(), key.as_bytes());
    let stats = client.stats().await.expect("stats succeeds");
    stats[core_index].revision
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

/// Checks that `result` is the server's refusal with `code`, and returns its message.
fn server_error<T: std::fmt::Debug>(
    what: &str,
    result: Result<T, ClientError>,
    code: ErrorCode,
) -> String {
    match result {
        Err(ClientError::Server {
            code: actual,
            message,
        }) if actual == code => message,
        other => panic!("{what}: expected a server error {code}, got {other:?}"),
    }
}

/// Checks that `result` is the client's own refusal `expected`, sent nowhere.
fn invalid_request<T: std::fmt::Debug>(
    what: &str,
    result: Result<T, ClientError>,
    expected: &RequestError,
) {
    match result {
        Err(ClientError::InvalidRequest(error)) => assert_eq!(&error, expected, "{what}"),
        other => panic!("{what}: expected InvalidRequest({expected:?}), got {other:?}"),
    }
}

fn unix_ms_now() -> u64 {
    let since_epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("the clock is after 1970");
    u64::try_from(since_epoch.as_millis()).expect("milliseconds since 1970 fit in u64")
}

/// Sleeps until the Unix time `deadline_ms` has passed by `margin_ms`.
async fn sleep_past(deadline_ms: u64, margin_ms: u64) {
    let wake_ms = deadline_ms + margin_ms;
    let now_ms = unix_ms_now();
    if wake_ms > now_ms {
        tokio::time::sleep(Duration::from_millis(wake_ms - now_ms)).await;
    }
}

/// The deadline of an expiring key, failing the test otherwise.
async fn deadline_of(client: &Client, key: &str) -> u64 {
    match client.ttl(key).await.expect("ttl succeeds") {
        TtlState::Expiring { expires_at_ms, .. } => expires_at_ms,
        other => panic!("{key}: expected an expiring key, got {other:?}"),
    }
}

/// An applied add's outcome, failing the test otherwise.
async fn add_applied(client: &Client, key: &str, delta: i64, options: AddOptions) -> i64 {
    let outcome = client
        .add_with(key, delta, options)
        .await
        .unwrap_or_else(|error| panic!("add {delta} to {key}: {error}"));
    assert!(outcome.applied, "{key}: {outcome:?}");
    assert!(outcome.mod_revision > 0, "{key}: {outcome:?}");
    outcome.value
}

/// Whether `current` relates to `given` as `op` says, written independently of
/// `CompareOp::holds`.
fn expected_holds<T: PartialOrd + ?Sized>(op: CompareOp, current: &T, given: &T) -> bool {
    match op {
        CompareOp::Equal => current == given,
        CompareOp::NotEqual => current != given,
        CompareOp::Less => current < given,
        CompareOp::LessOrEqual => current <= given,
        CompareOp::Greater => current > given,
        CompareOp::GreaterOrEqual => current >= given,
    }
}

const OPERATORS: [CompareOp; 6] = [
    CompareOp::Equal,
    CompareOp::NotEqual,
    CompareOp::Less,
    CompareOp::LessOrEqual,
    CompareOp::Greater,
    CompareOp::GreaterOrEqual,
];

/// A compare of one of a key's numbers: version, create revision or mod revision.
type NumberCompare = fn(Vec<u8>, CompareOp, u64) -> Compare;

/// Runs `txn` and returns its outcome, failing the test on an error.
async fn txn_ok(client: &Client, what: &str, txn: Txn) -> TxnOutcome {
    client
        .txn(txn)
        .await
        .unwrap_or_else(|error| panic!("{what}: {error}"))
}

// ---------------------------------------------------------------------------------------
// Conditional deletes.

/// A delete guarded by a version or a value removes the key only if it holds; one that
/// loses says the current version, returns the entry it found if asked, and changes nothing
/// (no revision). A missing key is version 0 and fails every condition.
async fn conditional_deletes(client: &Client) {
    let key = "cdel:k";
    client.put(key, "one").await.unwrap();
    client.put(key, "two").await.unwrap();
    let entry = entry_of(client, key).await;
    assert_eq!(entry.version, 2, "{entry:?}");
    let revision_before = shard_revision(client, key).await;

    let lost = client
        .delete_with(key, DeleteOptions::new().if_version(1))
        .await
        .unwrap();
    assert!(!lost.deleted, "{lost:?}");
    assert_eq!(lost.version, 2, "{lost:?}");
    assert_eq!(lost.previous, None, "not asked for: {lost:?}");
    let lost = client
        .delete_with(key, DeleteOptions::new().if_version(3).return_previous())
        .await
        .unwrap();
    assert_eq!((lost.deleted, lost.version), (false, 2), "{lost:?}");
    assert_eq!(lost.previous.as_ref(), Some(&entry), "the entry found");
    let lost = client
        .delete_with(key, DeleteOptions::new().if_value("one").return_previous())
        .await
        .unwrap();
    assert_eq!((lost.deleted, lost.version), (false, 2), "{lost:?}");
    assert_eq!(lost.previous.as_ref(), Some(&entry), "the entry found");
    // A value is compared whole: a prefix of it is not it.
    let lost = client
        .delete_with(key, DeleteOptions::new().if_value("tw"))
        .await
        .unwrap();
    assert_eq!((lost.deleted, lost.version), (false, 2), "{lost:?}");
    assert_eq!(client.get(key).await.unwrap().as_ref(), Some(&entry));
    assert_eq!(
        shard_revision(client, key).await,
        revision_before,
        "a lost delete takes no revision"
    );

    let won = client
        .delete_with(key, DeleteOptions::new().if_version(2).return_previous())
        .await
        .unwrap();
    assert_eq!((won.deleted, won.version), (true, 0), "{won:?}");
    assert_eq!(won.previous.as_ref(), Some(&entry), "the entry removed");
    assert_eq!(client.get(key).await.unwrap(), None);
    assert_eq!(shard_revision(client, key).await, revision_before + 1);

    // Missing: nothing to remove, whatever the condition.
    for options in [
        DeleteOptions::new().if_version(0),
        DeleteOptions::new().if_version(2),
        DeleteOptions::new().if_value("two"),
        DeleteOptions::new().if_value(""),
    ] {
        let outcome = client
            .delete_with(key, options.clone().return_previous())
            .await
            .unwrap();
        assert_eq!(
            (outcome.deleted, outcome.version, outcome.previous),
            (false, 0, None),
            "{options:?}"
        );
    }
    assert_eq!(shard_revision(client, key).await, revision_before + 1);

    let value_key = "cdel:value";
    client.put(value_key, "exact").await.unwrap();
    let won = client
        .delete_with(value_key, DeleteOptions::new().if_value("exact"))
        .await
        .unwrap();
    assert_eq!((won.deleted, won.version), (true, 0), "{won:?}");
    assert!(!client.exists(value_key).await.unwrap());
}

/// An expired key is missing to a conditional delete: it matches neither its old version
/// nor its old value.
async fn conditional_deletes_on_expired_keys(client: &Client) {
    let key = "cdel:ttl";
    client
        .put_with(
            key,
            "short",
            PutOptions::new().ttl(Duration::from_millis(200)),
        )
        .await
        .unwrap();
    let deadline = deadline_of(client, key).await;
    sleep_past(deadline, 50).await;
    for options in [
        DeleteOptions::new().if_version(1),
        DeleteOptions::new().if_value("short"),
    ] {
        let outcome = client
            .delete_with(key, options.clone().return_previous())
            .await
            .unwrap();
        assert_eq!(
            (outcome.deleted, outcome.version, outcome.previous),
            (false, 0, None),
            "{options:?}"
        );
    }
    assert_eq!(client.get(key).await.unwrap(), None);
}

// ---------------------------------------------------------------------------------------
// Counters.

/// An add whose result would leave its bounds fails with `OutOfRange` and changes nothing:
/// not the value, the revisions, the version, the TTL, nor the shard's revision. On a bound
/// is within it, and a missing counter refused is not created.
async fn counter_bounds_refuse_and_apply_nothing(client: &Client) {
    let key = "counter:bounded";
    let window = Duration::from_secs(60);
    let options = || AddOptions::new().bounds(0..=10).ttl(window);
    assert_eq!(add_applied(client, key, 7, options()).await, 7);
    let before = entry_of(client, key).await;
    assert!(before.expires_at_ms.is_some(), "{before:?}");
    let revision_before = shard_revision(client, key).await;

    for (delta, options) in [
        (4, options()),
        (-8, options()),
        (i64::MAX, options()),
        (i64::MIN, options()),
        (1, AddOptions::new().max(7)),
        (-1, AddOptions::new().min(7)),
        // Bounds that exclude the current value and the result.
        (1, AddOptions::new().bounds(20..=30)),
        // A refused add with a refresh does not touch the TTL either.
        (4, options().refresh_ttl()),
    ] {
        let what = format!("add {delta} with {options:?}");
        let result = client.add_with(key, delta, options).await;
        let error = match &result {
            Err(error) => error.clone(),
            Ok(outcome) => panic!("{what}: expected OutOfRange, got {outcome:?}"),
        };
        assert!(!error.is_retryable(), "{what}: {error:?}");
        assert!(!error.is_indeterminate(), "{what}: {error:?}");
        server_error(&what, result, ErrorCode::OutOfRange);
        assert_eq!(
            entry_of(client, key).await,
            before,
            "{what}: applied nothing"
        );
        assert_eq!(
            shard_revision(client, key).await,
            revision_before,
            "{what}: took no revision"
        );
    }

    // Exactly on each bound is allowed, and so are bounds the value is outside of, if the
    // result is inside.
    assert_eq!(add_applied(client, key, 3, options()).await, 10);
    assert_eq!(add_applied(client, key, -10, options()).await, 0);
    assert_eq!(
        add_applied(client, key, 25, AddOptions::new().bounds(20..=30)).await,
        25
    );
    let after = entry_of(client, key).await;
    assert_eq!(after.version, before.version + 3, "{after:?}");
    assert_eq!(after.expires_at_ms, before.expires_at_ms, "{after:?}");

    // A missing counter starts at 0, and a refused add does not create it.
    let missing = "counter:never";
    let result = client.add_with(missing, 0, AddOptions::new().min(1)).await;
    server_error("add 0 with min 1", result, ErrorCode::OutOfRange);
    assert_eq!(client.get(missing).await.unwrap(), None);

    // Bounds that hold no value are the client's to refuse.
    invalid_request(
        "empty bounds",
        client
            .add_with(key, 1, AddOptions::new().min(5).max(4))
            .await,
        &RequestError::EmptyBounds { min: 5, max: 4 },
    );
    invalid_request(
        "refresh without a ttl",
        client
            .add_with(key, 1, AddOptions::new().refresh_ttl())
            .await,
        &RequestError::RefreshWithoutTtl,
    );
    assert_eq!(client.counter(key).await.unwrap(), Some(25));
}

/// Overflow is an error, never a wrap; a value that is not the decimal text of an i64 is
/// not a counter to add to (`OutOfRange`) nor to read (`NotACounter`). Neither changes the
/// key.
async fn counter_overflow_and_non_counters_are_out_of_range(client: &Client) {
    for (key, start, delta) in [
        ("counter:max", i64::MAX, 1),
        ("counter:min", i64::MIN, -1),
        ("counter:far", i64::MAX - 5, i64::MAX),
    ] {
        client.set_counter(key, start).await.unwrap();
        let before = entry_of(client, key).await;
        let result = client.add(key, delta).await;
        let message = server_error(&format!("{key} + {delta}"), result, ErrorCode::OutOfRange);
        assert!(message.contains("overflow"), "{key}: {message}");
        assert_eq!(entry_of(client, key).await, before, "{key}");
        assert_eq!(client.counter(key).await.unwrap(), Some(start));
    }
    // The extremes themselves are counters.
    assert_eq!(
        client.add("counter:min", i64::MAX).await.unwrap(),
        -1,
        "i64::MIN + i64::MAX"
    );

    for value in ["abc", "", "12abc", " 7", "1.5", "99999999999999999999"] {
        let key = "counter:text";
        client.put(key, value).await.unwrap();
        let before = entry_of(client, key).await;
        let result = client.add(key, 1).await;
        server_error(&format!("add to {value:?}"), result, ErrorCode::OutOfRange);
        let result = client.add_with(key, 1, AddOptions::new().no_create()).await;
        server_error(
            &format!("no-create add to {value:?}"),
            result,
            ErrorCode::OutOfRange,
        );
        assert_eq!(entry_of(client, key).await, before, "{value:?}");
        match client.counter(key).await {
            Err(ClientError::NotACounter { key: named, size }) => {
                assert_eq!(named, key);
                assert_eq!(size, value.len(), "{value:?}");
            }
            other => panic!("counter of {value:?}: expected NotACounter, got {other:?}"),
        }
    }
    assert_eq!(client.counter("counter:absent").await.unwrap(), None);
}

/// `no_create` adds only to an existing counter: a missing one stays missing and takes no
/// revision, and the outcome says nothing applied.
async fn counter_without_create(client: &Client) {
    let key = "counter:lazy";
    let revision_before = shard_revision(client, key).await;
    let outcome = client
        .add_with(
            key,
            5,
            AddOptions::new().no_create().ttl(Duration::from_secs(60)),
        )
        .await
        .unwrap();
    assert_eq!(
        outcome,
        CounterOutcome {
            applied: false,
            value: 0,
            mod_revision: 0,
        }
    );
    assert_eq!(client.get(key).await.unwrap(), None);
    assert_eq!(shard_revision(client, key).await, revision_before);

    assert_eq!(add_applied(client, key, 2, AddOptions::new()).await, 2);
    let outcome = client
        .add_with(key, 3, AddOptions::new().no_create())
        .await
        .unwrap();
    assert!(outcome.applied, "{outcome:?}");
    assert_eq!(outcome.value, 5);
    assert_eq!(
        outcome.mod_revision,
        entry_of(client, key).await.mod_revision
    );
}

/// The TTL of an add applies when the add creates the counter; later adds, with a TTL or
/// without, keep that deadline.
async fn counter_fixed_window_is_set_at_creation(client: &Client) {
    let key = "counter:fixed";
    let window = || AddOptions::new().ttl(Duration::from_secs(60));
    let created_before_ms = unix_ms_now();
    assert_eq!(add_applied(client, key, 1, window()).await, 1);
    let deadline = deadline_of(client, key).await;
    assert!(
        deadline >= created_before_ms + 60_000,
        "deadline={deadline} created_before_ms={created_before_ms}"
    );
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(add_applied(client, key, 1, window()).await, 2);
    assert_eq!(
        deadline_of(client, key).await,
        deadline,
        "a later add with a TTL"
    );
    assert_eq!(client.add(key, 1).await.unwrap(), 3);
    assert_eq!(
        deadline_of(client, key).await,
        deadline,
        "a later add without"
    );
    assert_eq!(
        add_applied(
            client,
            key,
            1,
            AddOptions::new().ttl(Duration::from_millis(1))
        )
        .await,
        4
    );
    assert_eq!(deadline_of(client, key).await, deadline, "a shorter TTL");

    // Without a TTL a created counter never expires, and a later add with a TTL does not
    // give it one: the TTL is the creating add's.
    client.add("counter:forever", 1).await.unwrap();
    add_applied(client, "counter:forever", 1, window()).await;
    assert_eq!(
        client.ttl("counter:forever").await.unwrap(),
        TtlState::Persistent
    );
}

/// When its window ends the counter is gone, and the next add starts a new window at 0.
async fn counter_restarts_at_zero_after_its_window(client: &Client) {
    let key = "counter:window";
    let window = || AddOptions::new().max(3).ttl(Duration::from_millis(300));
    for expected in 1..=3 {
        assert_eq!(add_applied(client, key, 1, window()).await, expected);
    }
    let deadline = deadline_of(client, key).await;
    let result = client.add_with(key, 1, window()).await;
    server_error("a fourth add in the window", result, ErrorCode::OutOfRange);
    assert_eq!(deadline_of(client, key).await, deadline);

    sleep_past(deadline, 50).await;
    assert_eq!(client.counter(key).await.unwrap(), None, "the window ended");
    let outcome = client.add_with(key, 1, window().no_create()).await.unwrap();
    assert!(
        !outcome.applied,
        "an expired counter is missing: {outcome:?}"
    );
    assert_eq!(
        add_applied(client, key, 1, window()).await,
        1,
        "a new window"
    );
    let next_deadline = deadline_of(client, key).await;
    assert!(next_deadline > deadline, "{next_deadline} > {deadline}");
    let entry = entry_of(client, key).await;
    assert_eq!(entry.version, 1, "a new key: {entry:?}");
}

/// `refresh_ttl` restarts the TTL at every add that applies: the counter outlives its first
/// deadline, and expires one TTL after its last add.
async fn counter_sliding_window_is_refreshed(client: &Client) {
    let key = "counter:sliding";
    let ttl = Duration::from_millis(400);
    let sliding = || AddOptions::new().ttl(ttl).refresh_ttl();
    assert_eq!(add_applied(client, key, 1, sliding()).await, 1);
    let first_deadline = deadline_of(client, key).await;
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(
        add_applied(client, key, 1, sliding()).await,
        2,
        "within the TTL"
    );
    let second_deadline = deadline_of(client, key).await;
    assert!(
        second_deadline > first_deadline,
        "{second_deadline} > {first_deadline}"
    );

    sleep_past(first_deadline, 30).await;
    if unix_ms_now() + 30 < second_deadline {
        assert_eq!(
            client.counter(key).await.unwrap(),
            Some(2),
            "alive past its first deadline"
        );
    }
    sleep_past(second_deadline, 50).await;
    assert_eq!(client.counter(key).await.unwrap(), None);
}

/// `set_counter` writes a value and keeps the counter's deadline (its window); on a missing
/// key it creates a counter without one.
async fn set_counter_keeps_the_window(client: &Client) {
    let key = "counter:set";
    add_applied(
        client,
        key,
        1,
        AddOptions::new().ttl(Duration::from_secs(60)),
    )
    .await;
    let deadline = deadline_of(client, key).await;
    let outcome = client.set_counter(key, -42).await.unwrap();
    assert!(outcome.applied, "{outcome:?}");
    assert_eq!(outcome.version, 2, "{outcome:?}");
    assert_eq!(client.counter(key).await.unwrap(), Some(-42));
    assert_eq!(deadline_of(client, key).await, deadline);
    assert_eq!(entry_of(client, key).await.value, b"-42");
    assert_eq!(client.add(key, 2).await.unwrap(), -40);

    let fresh = "counter:set-fresh";
    client.set_counter(fresh, 9).await.unwrap();
    assert_eq!(client.counter(fresh).await.unwrap(), Some(9));
    assert_eq!(client.ttl(fresh).await.unwrap(), TtlState::Persistent);
}

/// `compare_and_set_counter` writes only over the value it names, keeping the TTL; a missing
/// counter matches nothing.
async fn compare_and_set_counter_wins_and_loses(client: &Client) {
    let key = "counter:cas";
    add_applied(
        client,
        key,
        5,
        AddOptions::new().ttl(Duration::from_secs(60)),
    )
    .await;
    let deadline = deadline_of(client, key).await;
    assert!(client.compare_and_set_counter(key, 5, 6).await.unwrap());
    assert_eq!(client.counter(key).await.unwrap(), Some(6));
    assert_eq!(deadline_of(client, key).await, deadline);

    let before = entry_of(client, key).await;
    assert!(!client.compare_and_set_counter(key, 5, 7).await.unwrap());
    assert_eq!(
        entry_of(client, key).await,
        before,
        "a lost CAS changes nothing"
    );

    let missing = "counter:cas-missing";
    assert!(!client.compare_and_set_counter(missing, 0, 1).await.unwrap());
    assert_eq!(client.get(missing).await.unwrap(), None);
}

// ---------------------------------------------------------------------------------------
// Transactions.

/// Every kind of compare, with every operator, on a present key and on a missing one (whose
/// version and revisions are 0 and which fails every value compare). Each runs alone, so
/// its outcome is its own; then several together hold only if each does.
async fn txn_compares_on_present_and_missing_keys(client: &Client) {
    let present = "{cmp}present";
    let missing = "{cmp}missing";
    client.put(present, "b").await.unwrap();
    client.put(present, "m").await.unwrap();
    let entry = entry_of(client, present).await;
    assert_eq!(entry.version, 2);
    assert!(entry.create_revision < entry.mod_revision, "{entry:?}");

    let mut cases: Vec<(Compare, bool)> = vec![
        (Compare::exists(present), true),
        (Compare::absent(present), false),
        (Compare::exists(missing), false),
        (Compare::absent(missing), true),
    ];
    for op in OPERATORS {
        for given in ["a", "m", "z", "", "mm"] {
            cases.push((
                Compare::value(present, op, given),
                expected_holds(op, b"m".as_slice(), given.as_bytes()),
            ));
            // A missing key fails every value compare, `!=` included.
            cases.push((Compare::value(missing, op, given), false));
        }
        // Each number compare with the present key's field; the missing key's is 0.
        let numbers: [(u64, NumberCompare); 3] = [
            (entry.version, Compare::version),
            (entry.create_revision, Compare::create_revision),
            (entry.mod_revision, Compare::mod_revision),
        ];
        for (current, compare) in numbers {
            for given in [0, current - 1, current, current + 1] {
                cases.push((
                    compare(present.into(), op, given),
                    expected_holds(op, &current, &given),
                ));
                cases.push((
                    compare(missing.into(), op, given),
                    expected_holds(op, &0, &given),
                ));
            }
        }
    }
    let revision_before = shard_revision(client, present).await;
    for (compare, expected) in &cases {
        let outcome = txn_ok(
            client,
            "compare",
            Txn::new()
                .when([compare.clone()])
                .then([TxnOp::get(present)])
                .otherwise([TxnOp::get(missing)]),
        )
        .await;
        assert_eq!(outcome.succeeded, *expected, "{compare:?}");
        let read = if *expected { Some(entry.clone()) } else { None };
        assert_eq!(outcome.results, [TxnResult::Get(read)], "{compare:?}");
        assert_eq!(outcome.revision, revision_before, "{compare:?}: read only");
    }

    // Together: all must hold.
    let holding: Vec<Compare> = cases
        .iter()
        .filter(|(_, expected)| *expected)
        .map(|(compare, _)| compare.clone())
        .take(TXN_COMPARES_MAX)
        .collect();
    let outcome = txn_ok(client, "all hold", Txn::new().when(holding.clone())).await;
    assert!(outcome.succeeded);
    let failing = cases
        .iter()
        .find(|(_, expected)| !*expected)
        .map(|(compare, _)| compare.clone())
        .expect("some compare fails");
    let mut mixed = holding;
    mixed.truncate(TXN_COMPARES_MAX - 1);
    mixed.insert(mixed.len() / 2, failing);
    let outcome = txn_ok(client, "one fails", Txn::new().when(mixed)).await;
    assert!(!outcome.succeeded);
    // No compares hold trivially.
    let outcome = txn_ok(
        client,
        "no compares",
        Txn::new().then([TxnOp::get(present)]),
    )
    .await;
    assert!(outcome.succeeded);
    assert_eq!(shard_revision(client, present).await, revision_before);
}

/// The success ops run when the compares hold, the failure ops otherwise, and the branch not
/// taken applies nothing; each op answers in order.
async fn txn_runs_one_branch(client: &Client) {
    let (flag, a, b) = ("{br}flag", "{br}a", "{br}b");
    let txn = || {
        Txn::new()
            .when([Compare::absent(flag)])
            .then([
                TxnOp::put(flag, "set"),
                TxnOp::put(a, "from success"),
                TxnOp::add("{br}n", 1),
            ])
            .otherwise([
                TxnOp::get(flag),
                TxnOp::put(b, "from failure"),
                TxnOp::delete(a),
                TxnOp::add("{br}n", 10),
            ])
    };
    let first = txn_ok(client, "first", txn()).await;
    assert!(first.succeeded);
    assert_eq!(
        first.results,
        [
            TxnResult::Put {
                version: 1,
                previous: None
            },
            TxnResult::Put {
                version: 1,
                previous: None
            },
            TxnResult::Add {
                applied: true,
                value: 1
            },
        ]
    );
    assert_eq!(
        client.get(b).await.unwrap(),
        None,
        "the failure branch did not run"
    );
    let flag_entry = entry_of(client, flag).await;

    let second = txn_ok(client, "second", txn()).await;
    assert!(!second.succeeded);
    assert_eq!(
        second.results,
        [
            TxnResult::Get(Some(flag_entry.clone())),
            TxnResult::Put {
                version: 1,
                previous: None
            },
            TxnResult::Delete {
                deleted: true,
                previous: None
            },
            TxnResult::Add {
                applied: true,
                value: 11
            },
        ]
    );
    assert_eq!(
        entry_of(client, flag).await,
        flag_entry,
        "success did not run"
    );
    assert_eq!(entry_of(client, b).await.value, b"from failure");
    assert_eq!(client.get(a).await.unwrap(), None);
}

/// The options of ops in a branch: previous entries of puts and deletes, a put's TTL or
/// `keep_ttl`, and a counter add's bounds, TTL and `create`.
async fn txn_ops_take_their_options(client: &Client) {
    let (flag, b) = ("{br}flag", "{br}b");
    client.put(flag, "set").await.unwrap();
    client.put(b, "from failure").await.unwrap();
    let flag_entry = entry_of(client, flag).await;
    let previous_put = entry_of(client, b).await;
    let outcome = txn_ok(
        client,
        "options",
        Txn::new().then([
            TxnOp::Put {
                key: b.into(),
                value: b"again".to_vec(),
                ttl_ms: Some(60_000),
                keep_ttl: false,
                return_previous: true,
                lease: None,
                fields: Vec::new(),
            },
            TxnOp::Delete {
                key: flag.into(),
                return_previous: true,
            },
            TxnOp::Add(CounterAdd {
                min: Some(0),
                max: Some(100),
                ttl_ms: Some(60_000),
                ..CounterAdd::new("{br}fresh", 4)
            }),
            TxnOp::Add(CounterAdd {
                create: false,
                ..CounterAdd::new("{br}lazy", 4)
            }),
        ]),
    )
    .await;
    assert!(outcome.succeeded);
    assert_eq!(
        outcome.results,
        [
            TxnResult::Put {
                version: 2,
                previous: Some(previous_put)
            },
            TxnResult::Delete {
                deleted: true,
                previous: Some(flag_entry)
            },
            TxnResult::Add {
                applied: true,
                value: 4
            },
            TxnResult::Add {
                applied: false,
                value: 0
            },
        ]
    );
    let b_deadline = entry_of(client, b).await.expires_at_ms;
    assert!(b_deadline.is_some());
    assert!(entry_of(client, "{br}fresh").await.expires_at_ms.is_some());
    assert_eq!(client.get("{br}lazy").await.unwrap(), None);

    // As outside a transaction, a put keeps the TTL only if asked to.
    let keep = TxnOp::Put {
        key: b.into(),
        value: b"kept".to_vec(),
        ttl_ms: None,
        keep_ttl: true,
        return_previous: false,
        lease: None,
        fields: Vec::new(),
    };
    txn_ok(client, "keep_ttl", Txn::new().then([keep])).await;
    let kept = entry_of(client, b).await;
    assert_eq!(
        (kept.value.as_slice(), kept.expires_at_ms),
        (&b"kept"[..], b_deadline)
    );
    txn_ok(client, "no TTL", Txn::new().then([TxnOp::put(b, "plain")])).await;
    assert_eq!(entry_of(client, b).await.expires_at_ms, None);
}

/// Every write of a branch takes the one revision the outcome names: each key written has it
/// as its mod revision, and the shard's revision moved by one. A branch that writes nothing
/// answers the current revision and takes none.
async fn txn_writes_take_one_revision(client: &Client) {
    let keys = ["{rev}a", "{rev}b", "{rev}c"];
    client.put("{rev}doomed", "x").await.unwrap();
    client.put(keys[1], "old").await.unwrap();
    let old_b = entry_of(client, keys[1]).await;
    let revision_before = shard_revision(client, keys[0]).await;
    let outcome = txn_ok(
        client,
        "writes",
        Txn::new().when([Compare::exists("{rev}doomed")]).then([
            TxnOp::put(keys[0], "1"),
            TxnOp::put(keys[1], "2"),
            TxnOp::add(keys[2], 3),
            TxnOp::delete("{rev}doomed"),
            TxnOp::delete("{rev}never"),
        ]),
    )
    .await;
    assert!(outcome.succeeded);
    assert_eq!(outcome.revision, revision_before + 1, "one revision");
    assert_eq!(shard_revision(client, keys[0]).await, outcome.revision);
    for key in keys {
        let entry = entry_of(client, key).await;
        assert_eq!(entry.mod_revision, outcome.revision, "{key}: {entry:?}");
    }
    let b = entry_of(client, keys[1]).await;
    assert_eq!(b.create_revision, old_b.create_revision, "{b:?}");
    assert_eq!(b.version, 2, "{b:?}");
    let a = entry_of(client, keys[0]).await;
    assert_eq!(
        (a.create_revision, a.version),
        (outcome.revision, 1),
        "{a:?}"
    );
    assert_eq!(client.get("{rev}doomed").await.unwrap(), None);

    // Nothing written: the current revision, and no new one.
    for txn in [
        Txn::new().then([TxnOp::get(keys[0]), TxnOp::delete("{rev}never")]),
        Txn::new()
            .when([Compare::absent(keys[0])])
            .then([TxnOp::put(keys[0], "no")]),
        Txn::new().then([TxnOp::Add(CounterAdd {
            create: false,
            ..CounterAdd::new("{rev}never", 1)
        })]),
    ] {
        let what = format!("{txn:?}");
        let read = txn_ok(client, &what, txn).await;
        assert_eq!(read.revision, outcome.revision, "{what}");
        assert_eq!(
            shard_revision(client, keys[0]).await,
            outcome.revision,
            "{what}"
        );
    }
    assert_eq!(entry_of(client, keys[0]).await, a);
}

/// A watch on the prefix sees a transaction's writes as one message: every event of the
/// revision the outcome names, in the order of the ops, and nothing of a transaction that
/// wrote nothing.
async fn txn_writes_are_one_watch_batch(client: &Client) {
    client.put("{watch}doomed", "x").await.unwrap();
    client.put("{watch}b", "old").await.unwrap();
    let mut watch = client
        .watch(&KeyRange::prefix("{watch}"), WatchOptions::new().previous())
        .await
        .unwrap();
    // Read only: no event.
    txn_ok(client, "read", Txn::new().then([TxnOp::get("{watch}b")])).await;
    let outcome = txn_ok(
        client,
        "writes",
        Txn::new().then([
            TxnOp::put("{watch}a", "1"),
            TxnOp::delete("{watch}doomed"),
            TxnOp::put("{watch}b", "new"),
            // Neither of these changes anything, so neither is an event.
            TxnOp::delete("{watch}never"),
            TxnOp::Add(CounterAdd {
                create: false,
                ..CounterAdd::new("{watch}lazy", 1)
            }),
            TxnOp::add("{watch}n", 5),
        ]),
    )
    .await;
    let (shard, events) = loop {
        let message = within(CALL_TIMEOUT, "the txn's events", watch.next())
            .await
            .expect("the watch goes on")
            .expect("the watch has no error");
        match message {
            WatchMessage::Events { shard, events } => break (shard, events),
            WatchMessage::Progress(_) => {}
            WatchMessage::Snapshot { .. } => panic!("no snapshot was asked for"),
        }
    };
    assert_eq!(shard.revision, outcome.revision, "{events:?}");
    let summary: Vec<(String, EventKind, String, Option<String>)> = events
        .iter()
        .map(|event| {
            (
                String::from_utf8_lossy(&event.key).into_owned(),
                event.kind,
                String::from_utf8_lossy(&event.value).into_owned(),
                event
                    .previous
                    .as_ref()
                    .map(|previous| String::from_utf8_lossy(previous).into_owned()),
            )
        })
        .collect();
    let b = entry_of(client, "{watch}b").await;
    let created = |version| EventKind::Put {
        create_revision: outcome.revision,
        version,
    };
    assert_eq!(
        summary,
        [
            ("{watch}a".to_owned(), created(1), "1".to_owned(), None),
            (
                "{watch}doomed".to_owned(),
                EventKind::Deleted,
                String::new(),
                Some("x".to_owned())
            ),
            (
                "{watch}b".to_owned(),
                EventKind::Put {
                    create_revision: b.create_revision,
                    version: 2
                },
                "new".to_owned(),
                Some("old".to_owned())
            ),
            ("{watch}n".to_owned(), created(1), "5".to_owned(), None),
        ]
    );
}

/// Every key of a transaction, in its compares and both its branches, must live on one
/// shard; otherwise it is refused with `CrossShard`, naming two of them, and applies nothing.
/// Keys sharing a hash tag always share a shard.
async fn txn_keys_must_share_a_shard(client: &Client) {
    let topology = client.topology();
    let first = key_on_core(&topology, 0, "cross");
    let second = key_on_core(&topology, 1, "cross");
    let revisions_before = [
        shard_revision(client, &first).await,
        shard_revision(client, &second).await,
    ];
    for txn in [
        Txn::new().then([
            TxnOp::put(first.as_str(), "1"),
            TxnOp::put(second.as_str(), "2"),
        ]),
        Txn::new()
            .when([Compare::absent(first.as_str())])
            .then([TxnOp::put(second.as_str(), "2")]),
        // The failure branch counts though it would not run.
        Txn::new()
            .then([TxnOp::put(first.as_str(), "1")])
            .otherwise([TxnOp::put(second.as_str(), "2")]),
        Txn::new().when([
            Compare::absent(second.as_str()),
            Compare::absent(first.as_str()),
        ]),
    ] {
        let what = format!("{txn:?}");
        let message = server_error(&what, client.txn(txn).await, ErrorCode::CrossShard);
        assert!(message.contains(&format!("{first:?}")), "{what}: {message}");
        assert!(
            message.contains(&format!("{second:?}")),
            "{what}: {message}"
        );
    }
    assert_eq!(client.get(&first).await.unwrap(), None);
    assert_eq!(client.get(&second).await.unwrap(), None);
    assert_eq!(
        [
            shard_revision(client, &first).await,
            shard_revision(client, &second).await
        ],
        revisions_before
    );

    // One tag, whatever comes around it: one shard.
    let tagged = ["{user42}name", "{user42}email", "{user42}", "x{user42}y"];
    let core = core_of_key(&topology, tagged[0].as_bytes());
    for key in tagged {
        assert_eq!(core_of_key(&topology, key.as_bytes()), core, "{key}");
    }
    let outcome = txn_ok(
        client,
        "one tag",
        Txn::new()
            .when([Compare::absent(tagged[0])])
            .then(tagged.iter().map(|key| TxnOp::put(*key, "v"))),
    )
    .await;
    assert!(outcome.succeeded);
    for key in tagged {
        assert_eq!(entry_of(client, key).await.mod_revision, outcome.revision);
    }
}

/// A branch naming a key twice, and compares or ops over their limits, are refused by the
/// client before sending; at the limits they run. One key in both branches, or in a compare
/// and an op, is fine.
async fn txn_refuses_a_key_twice_and_oversized_branches(client: &Client) {
    let key = "{dup}k";
    for ops in [
        vec![TxnOp::put(key, "1"), TxnOp::get(key)],
        vec![TxnOp::get(key), TxnOp::get("{dup}other"), TxnOp::get(key)],
        vec![TxnOp::add(key, 1), TxnOp::delete(key)],
    ] {
        let what = format!("{ops:?}");
        invalid_request(
            &what,
            client.txn(Txn::new().then(ops.clone())).await,
            &RequestError::TxnDuplicateKey {
                key: format!("{key:?}"),
            },
        );
        invalid_request(
            &what,
            client
                .txn(Txn::new().then([TxnOp::get("{dup}x")]).otherwise(ops))
                .await,
            &RequestError::TxnDuplicateKey {
                key: format!("{key:?}"),
            },
        );
    }
    assert_eq!(client.get(key).await.unwrap(), None);
    let outcome = txn_ok(
        client,
        "one key per branch",
        Txn::new()
            .when([
                Compare::absent(key),
                Compare::version(key, CompareOp::Equal, 0),
            ])
            .then([TxnOp::put(key, "s")])
            .otherwise([TxnOp::put(key, "f")]),
    )
    .await;
    assert!(outcome.succeeded);

    let keys = |count: usize| -> Vec<String> {
        (0..count)
            .map(|index| format!("{{dup}}many:{index}"))
            .collect()
    };
    let at_limit = keys(TXN_OPS_MAX);
    let outcome = txn_ok(
        client,
        "ops at the limit",
        Txn::new()
            .when(at_limit.iter().map(|key| Compare::absent(key.as_str())))
            .then(at_limit.iter().map(|key| TxnOp::put(key.as_str(), "v"))),
    )
    .await;
    assert!(outcome.succeeded);
    assert_eq!(outcome.results.len(), TXN_OPS_MAX);
    let over = keys(TXN_OPS_MAX + 1);
    invalid_request(
        "ops over the limit",
        client
            .txn(Txn::new().otherwise(over.iter().map(|key| TxnOp::get(key.as_str()))))
            .await,
        &RequestError::TxnTooLarge {
            what: "ops",
            count: TXN_OPS_MAX + 1,
            count_max: TXN_OPS_MAX,
        },
    );
    let compares = keys(TXN_COMPARES_MAX + 1);
    invalid_request(
        "compares over the limit",
        client
            .txn(Txn::new().when(compares.iter().map(|key| Compare::exists(key.as_str()))))
            .await,
        &RequestError::TxnTooLarge {
            what: "compares",
            count: TXN_COMPARES_MAX + 1,
            count_max: TXN_COMPARES_MAX,
        },
    );
    invalid_request(
        "no key",
        client
            .txn(Txn::new().then([TxnOp::Range(Scan::prefix(b"{dup}", 10))]))
            .await,
        &RequestError::TxnWithoutKey,
    );
}

/// A counter add that fails inside a transaction (bounds, overflow, not a counter) fails the
/// whole transaction with `OutOfRange`: the ops before and after it apply nothing, and the
/// shard takes no revision.
async fn txn_failing_counter_add_applies_nothing(client: &Client) {
    let (a, n, text, doomed) = ("{fail}a", "{fail}n", "{fail}text", "{fail}doomed");
    client.put(a, "before").await.unwrap();
    client.set_counter(n, 9).await.unwrap();
    client.put(text, "abc").await.unwrap();
    client.put(doomed, "x").await.unwrap();
    let entries_before = [
        entry_of(client, a).await,
        entry_of(client, n).await,
        entry_of(client, text).await,
        entry_of(client, doomed).await,
    ];
    let revision_before = shard_revision(client, a).await;
    let failing_adds = [
        TxnOp::Add(CounterAdd {
            max: Some(10),
            ..CounterAdd::new(n, 2)
        }),
        TxnOp::Add(CounterAdd {
            min: Some(9),
            ..CounterAdd::new(n, -1)
        }),
        TxnOp::add(n, i64::MAX),
        TxnOp::add(text, 1),
    ];
    for failing in failing_adds {
        let what = format!("{failing:?}");
        let txn = Txn::new().when([Compare::exists(a)]).then([
            TxnOp::put(a, "after"),
            TxnOp::delete(doomed),
            failing,
            TxnOp::put("{fail}new", "v"),
        ]);
        server_error(&what, client.txn(txn).await, ErrorCode::OutOfRange);
        let entries = [
            entry_of(client, a).await,
            entry_of(client, n).await,
            entry_of(client, text).await,
            entry_of(client, doomed).await,
        ];
        assert_eq!(entries, entries_before, "{what}");
        assert_eq!(client.get("{fail}new").await.unwrap(), None, "{what}");
        assert_eq!(shard_revision(client, a).await, revision_before, "{what}");
    }
    // The same add within its bounds applies with the rest.
    let outcome = txn_ok(
        client,
        "within bounds",
        Txn::new().then([
            TxnOp::put(a, "after"),
            TxnOp::Add(CounterAdd {
                max: Some(10),
                ..CounterAdd::new(n, 1)
            }),
        ]),
    )
    .await;
    assert_eq!(
        outcome.results[1],
        TxnResult::Add {
            applied: true,
            value: 10
        }
    );
    assert_eq!(entry_of(client, a).await.value, b"after");
}

/// A range op lists the transaction shard's keys of its prefix as they are at that point of
/// the branch: after the earlier ops' writes, before the later ones'. A prefix wider than the
/// tag lists only the transaction's shard.
async fn txn_range_sees_earlier_writes(client: &Client) {
    let a = client.put("{rg}a", "1").await.unwrap();
    let c = client.put("{rg}c", "3").await.unwrap();
    let topology = client.topology();
    let core = core_of_key(&topology, b"{rg}a");
    let elsewhere = key_on_core(&topology, 1 - core, "rg-other");
    client.put(&elsewhere, "far").await.unwrap();
    let range = |limit| TxnOp::Range(Scan::prefix(b"{rg}", limit));

    let outcome = txn_ok(
        client,
        "range between writes",
        Txn::new().then([
            range(100),
            TxnOp::put("{rg}b", "2"),
            TxnOp::delete("{rg}a"),
            TxnOp::Range(Scan::prefix(b"{rg}", 100)),
            TxnOp::put("{rg}d", "4"),
        ]),
    )
    .await;
    let listed = |result: &TxnResult| -> Vec<(String, String, u64)> {
        let TxnResult::Range(page) = result else {
            panic!("expected a range page, got {result:?}");
        };
        assert_eq!(page.count, page.items.len() as u64, "{page:?}");
        page.items
            .iter()
            .map(|item| {
                let entry = item.entry.as_ref().expect("a range returns entries");
                (
                    String::from_utf8_lossy(&item.key).into_owned(),
                    String::from_utf8_lossy(&entry.value).into_owned(),
                    entry.mod_revision,
                )
            })
            .collect()
    };
    assert_eq!(
        listed(&outcome.results[0]),
        [
            ("{rg}a".to_owned(), "1".to_owned(), a.mod_revision),
            ("{rg}c".to_owned(), "3".to_owned(), c.mod_revision),
        ],
        "before the writes"
    );
    assert_eq!(
        listed(&outcome.results[3]),
        [
            ("{rg}b".to_owned(), "2".to_owned(), outcome.revision),
            ("{rg}c".to_owned(), "3".to_owned(), c.mod_revision),
        ],
        "after the put of b and the delete of a, before the put of d"
    );
    assert_eq!(
        entry_of(client, "{rg}d").await.mod_revision,
        outcome.revision
    );

    // A limit cuts the page short and says more remain.
    let outcome = txn_ok(
        client,
        "limited",
        Txn::new().when([Compare::exists("{rg}b")]).then([range(1)]),
    )
    .await;
    let TxnResult::Range(page) = &outcome.results[0] else {
        panic!("expected a range page: {outcome:?}");
    };
    assert_eq!(page.items.len(), 1);
    assert!(page.more, "{page:?}");

    // The empty prefix is every key, but only this shard's.
    let outcome = txn_ok(
        client,
        "every key",
        Txn::new()
            .when([Compare::exists("{rg}b")])
            .then([TxnOp::Range(Scan::prefix(b"", 1000))]),
    )
    .await;
    let TxnResult::Range(page) = &outcome.results[0] else {
        panic!("expected a range page: {outcome:?}");
    };
    let keys: Vec<&[u8]> = page.items.iter().map(|item| item.key.as_slice()).collect();
    assert!(keys.contains(&b"{rg}d".as_slice()), "{keys:?}");
    assert!(!keys.contains(&elsewhere.as_bytes()), "{keys:?}");
    for key in keys {
        assert_eq!(core_of_key(&topology, key), core, "{key:?}");
    }
}

// ---------------------------------------------------------------------------------------
// The optimistic helper.

/// Concurrent transfers between two accounts through `optimistic`: every one commits once
/// (it retries on conflicts), none is lost or doubled, and the sum is conserved.
async fn optimistic_transfers_conserve_the_sum(client: &Client) {
    const TASK_COUNT: usize = 8;
    const TRANSFERS_PER_TASK: usize = 50;
    const BALANCE_START: i64 = 1000;
    let accounts = ["{acct}a", "{acct}b"];
    for account in accounts {
        client.set_counter(account, BALANCE_START).await.unwrap();
    }
    let commit_count = Arc::new(AtomicUsize::new(0));
    let decide_count = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..TASK_COUNT)
        .map(|task_index| {
            let client = client.clone();
            let commit_count = commit_count.clone();
            let decide_count = decide_count.clone();
            tokio::spawn(async move {
                // Half the tasks move money one way, half the other.
                let (source, target) = if task_index % 2 == 0 { (0, 1) } else { (1, 0) };
                let retry = Optimistic::new()
                    .attempts(10_000)
                    .backoff(Duration::from_millis(1), Duration::from_millis(8));
                for _ in 0..TRANSFERS_PER_TASK {
                    let (moved, outcome) = client
                        .optimistic(&accounts, retry, |entries| {
                            decide_count.fetch_add(1, Ordering::Relaxed);
                            let balance = |index: usize| -> i64 {
                                let entry = entries[index].as_ref().expect("accounts exist");
                                std::str::from_utf8(&entry.value)
                                    .expect("a balance is text")
                                    .parse()
                                    .expect("a balance is a number")
                            };
                            let (from, to) = (balance(source), balance(target));
                            let ops = vec![
                                TxnOp::put(accounts[source], (from - 1).to_string()),
                                TxnOp::put(accounts[target], (to + 1).to_string()),
                            ];
                            Ok((ops, 1_i64))
                        })
                        .await
                        .unwrap_or_else(|error| panic!("task {task_index}: {error}"));
                    assert_eq!(moved, 1);
                    assert!(outcome.succeeded, "{outcome:?}");
                    commit_count.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("a transfer task does not panic");
    }
    let transfer_count = TASK_COUNT * TRANSFERS_PER_TASK;
    assert_eq!(commit_count.load(Ordering::Relaxed), transfer_count);
    assert!(decide_count.load(Ordering::Relaxed) >= transfer_count);
    let balances = [
        client.counter(accounts[0]).await.unwrap().unwrap(),
        client.counter(accounts[1]).await.unwrap().unwrap(),
    ];
    assert_eq!(balances[0] + balances[1], 2 * BALANCE_START, "{balances:?}");
    // As many transfers each way: back where they started.
    assert_eq!(balances, [BALANCE_START; 2]);
    // Every commit wrote both accounts once: none lost, none applied twice.
    let expected_version = 1 + u64::try_from(transfer_count).unwrap();
    for account in accounts {
        let entry = entry_of(client, account).await;
        assert_eq!(entry.version, expected_version, "{account}: {entry:?}");
    }
}

/// With one attempt, a write that lands between the read and the commit makes `optimistic`
/// give up with `Conflict`, having written nothing; the conflicting write stays. The write
/// is made from inside `decide`, so the conflict happens every time, not by chance.
async fn optimistic_gives_up_after_losing(client: &Client) {
    let keys = ["{lose}a", "{lose}b"];
    client.put(keys[0], "0").await.unwrap();
    // `{lose}b` is missing: its mod revision 0 is compared too.
    for conflicting_key in keys {
        let calls = AtomicUsize::new(0);
        let intruder = client.clone();
        let result = client
            .optimistic(&keys, Optimistic::new().attempts(1), |entries| {
                calls.fetch_add(1, Ordering::Relaxed);
                assert_eq!(entries.len(), 2);
                // `decide` is synchronous; the runtime is multi-threaded, so this thread may
                // block on another client call while the others run.
                tokio::task::block_in_place(|| {
                    tokio::runtime::Handle::current()
                        .block_on(intruder.put(conflicting_key, "intruder"))
                })
                .expect("the conflicting write succeeds");
                Ok((
                    vec![TxnOp::put(keys[0], "mine"), TxnOp::put(keys[1], "mine")],
                    (),
                ))
            })
            .await;
        match result {
            Err(ClientError::Conflict { attempts: 1 }) => {}
            other => panic!("{conflicting_key}: expected Conflict after 1 attempt, got {other:?}"),
        }
        assert_eq!(calls.load(Ordering::Relaxed), 1);
        assert_eq!(entry_of(client, conflicting_key).await.value, b"intruder");
        for key in keys {
            let value = client.get(key).await.unwrap().map(|entry| entry.value);
            assert_ne!(
                value.as_deref(),
                Some(&b"mine"[..]),
                "{key}: nothing written"
            );
        }
        client.delete(keys[1]).await.unwrap();
    }
}

/// A conflict on the first attempt only is retried and commits on the second, with what
/// `decide` saw then; an error from `decide` stops at once, writing nothing.
async fn optimistic_retries_and_stops_on_decide_errors(client: &Client) {
    let key = "{retry}n";
    client.set_counter(key, 10).await.unwrap();
    let calls = AtomicUsize::new(0);
    let intruder = client.clone();
    let (seen, outcome) = client
        .optimistic(&[key], Optimistic::new().attempts(3), |entries| {
            let call = calls.fetch_add(1, Ordering::Relaxed);
            let entry = entries[0].as_ref().expect("the counter exists");
            let value: i64 = std::str::from_utf8(&entry.value).unwrap().parse().unwrap();
            if call == 0 {
                tokio::task::block_in_place(|| {
                    tokio::runtime::Handle::current().block_on(intruder.add(key, 5))
                })
                .expect("the conflicting add succeeds");
            }
            Ok((vec![TxnOp::put(key, (value * 2).to_string())], value))
        })
        .await
        .expect("the second attempt commits");
    assert_eq!(calls.load(Ordering::Relaxed), 2);
    assert_eq!(seen, 15, "the second attempt read the intruder's write");
    assert!(outcome.succeeded);
    assert_eq!(client.counter(key).await.unwrap(), Some(30));
    assert_eq!(entry_of(client, key).await.mod_revision, outcome.revision);

    let before = entry_of(client, key).await;
    let calls = AtomicUsize::new(0);
    let result: Result<((), TxnOutcome), ClientError> = client
        .optimistic(&[key], Optimistic::new().attempts(5), |_| {
            calls.fetch_add(1, Ordering::Relaxed);
            Err(ClientError::NotACounter {
                key: key.to_owned(),
                size: 0,
            })
        })
        .await;
    assert!(
        matches!(result, Err(ClientError::NotACounter { .. })),
        "{result:?}"
    );
    assert_eq!(
        calls.load(Ordering::Relaxed),
        1,
        "no retry after decide's error"
    );
    assert_eq!(entry_of(client, key).await, before);
}
