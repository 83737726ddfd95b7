//! Indexed fields, secondary indexes and queries through the client, written once and run
//! against a two-core server on loopback (`remote::*`) and against embedded shards
//! (`embedded::*`, with the `embedded` feature).
//!
//! Every result is checked against a model the test computes by itself: the people it
//! wrote, filtered by a plain Rust predicate and sorted by a plain Rust key, not by another
//! query or the protocol's evaluation. The same queries run by scan (no index), by index,
//! and after the index is dropped, and must agree with the model each time; the plan every
//! core reports says which access it took.
//!
//! `an_index_over_existing_keys_builds_then_serves` runs with a tick of one second: a core
//! starts filing existing keys at its next tick, so right after the create every core that
//! holds keys is still building (a tick landing in the few milliseconds between the create
//! and the listing would make that core ready early; the test asks only that some core is
//! seen building, and that every core not using the index says it is building).
//!
//! `pages_of_large_values_skip_no_match` makes each core end its page on its byte bound
//! before its limit, which is when the merge must stop at the smallest last item of a core
//! with more: taking the first `limit` of everything would skip that core's next match.
//!
//! `fields_and_indexes_survive_a_restart` restarts a durable (`sync`) server on its data
//! directory and checks that fields and index definitions came back and that queries use
//! the recovered indexes.

#[macro_use]
mod common;

use std::cmp::Reverse;
use std::time::{Duration, Instant};

use common::{core_of_key, within, DurableServer, CALL_TIMEOUT, CORE_COUNT};
use tessera_client::{
    Client, ClientError, ErrorCode, Field, FieldValue, IndexKind, IndexSpec, IndexState, PutEntry,
    PutOptions, QueryAccess, QueryItem, QueryOptions, QueryResult, Txn, TxnOp, TxnResult,
};
use tessera_protocol::limits::{FIELDS_PER_VALUE_MAX, QUERY_LIMIT_MAX, QUERY_ORDER_BY_MAX};
use tessera_protocol::query::F64;
use tessera_protocol::{QueryCursor, RequestError};

scenarios!(
    fields_round_trip => default_config,
    field_errors_are_refused_before_sending => default_config,
    queries_by_scan_and_by_index_match_the_model => default_config,
    order_by_merges_both_cores => default_config,
    pages_return_every_match_once_in_order => default_config,
    pages_of_large_values_skip_no_match => default_config,
    counts_and_projections => default_config,
    invalid_queries_are_refused => default_config,
    index_definitions_are_checked_on_every_core => default_config,
    dropping_an_index_falls_back_to_a_scan => default_config,
    an_index_over_existing_keys_builds_then_serves => slow_tick_config,
    a_watch_on_a_query_follows_its_result_set => default_config,
);

/// Two cores, in memory.
fn default_config() -> tessera_server::Config {
    common::test_config(CORE_COUNT)
}

/// Two cores whose index builds start at most a second after a create.
fn slow_tick_config() -> tessera_server::Config {
    tessera_server::Config {
        tick_ms: 1000,
        ..common::test_config(CORE_COUNT)
    }
}

// ---------------------------------------------------------------------------------------
// The model.

/// One entry the tests write, with its fields as plain Rust values.
#[derive(Debug, Clone)]
struct Person {
    key: String,
    /// Missing for every tenth person, so orders have entries without the field.
    age: Option<i64>,
    city: &'static str,
    score: f64,
    active: bool,
}

const CITIES: [&str; 4] = ["Oslo", "Bergen", "Trondheim", "Stavanger"];

/// `count` people under `person:`, with ages, cities and scores spread out.
fn people(count: usize) -> Vec<Person> {
    (0..count)
        .map(|index| {
            let number = i64::try_from(index).unwrap();
            Person {
                key: format!("person:{index:04}"),
                age: (index % 10 != 9).then_some(18 + (number * 7) % 50),
                city: CITIES[index % CITIES.len()],
                score: f64::from(i32::try_from(index).unwrap()) * 0.5,
                active: index % 3 == 0,
            }
        })
        .collect()
}

impl Person {
    fn fields(&self) -> Vec<Field> {
        let mut fields = vec![
            Field::new("city", FieldValue::Str(self.city.to_owned())),
            Field::new("score", FieldValue::F64(F64::new(self.score).unwrap())),
            Field::new("active", FieldValue::Bool(self.active)),
        ];
        if let Some(age) = self.age {
            fields.push(Field::new("age", FieldValue::I64(age)));
        }
        fields
    }

    fn value(&self) -> Vec<u8> {
        format!("value of {}", self.key).into_bytes()
    }
}

/// Writes `people` in one batch (and two entries outside their prefix with the same fields,
/// which no query under `person:` may return).
async fn write_people(client: &Client, people: &[Person]) {
    let mut entries: Vec<PutEntry> = people
        .iter()
        .map(|person| PutEntry {
            key: person.key.clone().into_bytes(),
            value: person.value(),
            ttl_ms: None,
            fields: person.fields(),
        })
        .collect();
    for outsider in ["other:1", "other:2"] {
        entries.push(PutEntry {
            key: outsider.as_bytes().to_vec(),
            value: b"outside".to_vec(),
            ttl_ms: None,
            fields: people[0].fields(),
        });
    }
    let revisions = within(CALL_TIMEOUT, "mput_entries", client.mput_entries(&entries))
        .await
        .unwrap();
    assert_eq!(revisions.len(), entries.len());
    assert!(revisions.iter().all(|revision| *revision > 0));
}

/// The keys of `people` that `matches`, in key order.
fn model_keys(people: &[Person], matches: impl Fn(&Person) -> bool) -> Vec<String> {
    let mut keys: Vec<String> = people
        .iter()
        .filter(|person| matches(person))
        .map(|person| person.key.clone())
        .collect();
    keys.sort();
    keys
}

fn keys_of(items: &[QueryItem]) -> Vec<String> {
    items
        .iter()
        .map(|item| String::from_utf8(item.key.clone()).unwrap())
        .collect()
}

/// A query of `person:` with the filter `text`, every match in one page.
fn all_matching(text: &str) -> QueryOptions {
    QueryOptions::new()
        .prefix("person:")
        .filter_text(text)
        .unwrap_or_else(|error| panic!("{text}: {error}"))
        .limit(QUERY_LIMIT_MAX)
}

async fn query(client: &Client, options: &QueryOptions) -> QueryResult {
    within(CALL_TIMEOUT, "query", client.query(options))
        .await
        .unwrap_or_else(|error| panic!("{options:?}: {error}"))
}

/// The index each core used (`None`: it scanned).
fn index_used(result: &QueryResult) -> Vec<Option<String>> {
    result
        .plans
        .iter()
        .map(|plan| match &plan.plan.access {
            QueryAccess::Index { name, .. } => Some(name.clone()),
            QueryAccess::Scan => None,
        })
        .collect()
}

/// Waits until every core has finished building `name`.
async fn wait_until_ready(client: &Client, name: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let indexes = client.list_indexes().await.unwrap();
        let status = indexes
            .iter()
            .find(|status| status.spec.name == name)
            .unwrap_or_else(|| panic!("no index {name} in {indexes:?}"));
        if status.is_ready() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "index {name} is not ready: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The queries every access path must answer like the model, and the index each should
/// use once `city_eq` and `age_range` exist.
type ModelQuery = (&'static str, fn(&Person) -> bool, Option<&'static str>);

fn model_queries() -> Vec<ModelQuery> {
    vec![
        (r#"city = "Oslo""#, |p| p.city == "Oslo", Some("city_eq")),
        (
            "age >= 30 and age < 50",
            |p| p.age.is_some_and(|age| (30..50).contains(&age)),
            Some("age_range"),
        ),
        (
            r#"age between 25 and 40 and city in ("Bergen", "Oslo")"#,
            |p| {
                p.age.is_some_and(|age| (25..=40).contains(&age))
                    && (p.city == "Bergen" || p.city == "Oslo")
            },
            // `in` narrows better than a range.
            Some("city_eq"),
        ),
        ("age exists", |p| p.age.is_some(), Some("age_range")),
        (
            r#"city prefix "S""#,
            |p| p.city.starts_with('S'),
            // An equality index does not answer `prefix`.
            None,
        ),
        (
            r#"not (city = "Oslo") or active = true"#,
            |p| p.city != "Oslo" || p.active,
            // Nothing the whole filter requires.
            None,
        ),
        (
            "score > 10.5 and active = true and age < 40",
            |p| p.score > 10.5 && p.active && p.age.is_some_and(|age| age < 40),
            Some("age_range"),
        ),
        (r#"age = "20""#, |_| false, Some("age_range")),
    ]
}

async fn check_model_queries(client: &Client, people: &[Person], indexed: bool) {
    for (text, matches, index) in model_queries() {
        let result = query(client, &all_matching(text)).await;
        assert_eq!(
            keys_of(&result.items),
            model_keys(people, matches),
            "{text} (indexed: {indexed})"
        );
        assert_eq!(result.cursor, None, "{text}: one page holds every match");
        assert_eq!(result.plans.len(), CORE_COUNT);
        let expected = if indexed { index } else { None };
        assert_eq!(
            index_used(&result),
            vec![expected.map(str::to_owned); CORE_COUNT],
            "{text} (indexed: {indexed}): {:?}",
            result.plans
        );
        let examined: u64 = result.plans.iter().map(|plan| plan.plan.examined).sum();
        let matched: u64 = result.plans.iter().map(|plan| plan.plan.matched).sum();
        assert_eq!(matched, result.items.len() as u64, "{text}");
        assert!(examined >= matched, "{text}");
        if expected.is_none() {
            // A scan reads every live entry under the prefix, and nothing else.
            assert_eq!(examined, people.len() as u64, "{text}");
        }
        for item in &result.items {
            let entry = item.entry.as_ref().expect("queries return whole entries");
            let person = people
                .iter()
                .find(|person| person.key.as_bytes() == item.key)
                .unwrap();
            assert_eq!(entry.value, person.value(), "{text}");
            assert_eq!(entry.fields, sorted(person.fields()), "{text}");
        }
    }
}

fn sorted(mut fields: Vec<Field>) -> Vec<Field> {
    fields.sort_by(|left, right| left.name.cmp(&right.name));
    fields
}

async fn create(client: &Client, name: &str, field: &str, kind: IndexKind) {
    let spec = IndexSpec::new(name, "person:", field, kind);
    let change = within(CALL_TIMEOUT, "create_index", client.create_index(&spec))
        .await
        .unwrap();
    assert_eq!(change.cores.len(), CORE_COUNT);
    assert!(change.is_applied_everywhere(), "{change:?}");
}

// ---------------------------------------------------------------------------------------
// Scenarios.

async fn fields_round_trip(client: &Client) {
    // Given out of name order, returned in name order.
    let options = PutOptions::new()
        .field("city", FieldValue::Str("Oslo".to_owned()))
        .field("age", FieldValue::I64(36))
        .fields([
            Field::new("seen", FieldValue::Timestamp(1_767_225_600_000)),
            Field::new("active", FieldValue::Bool(true)),
            Field::new("score", FieldValue::F64(F64::new(2.5).unwrap())),
        ]);
    let written = client.put_with("ada", "v1", options).await.unwrap();
    assert!(written.applied);
    let entry = client.get("ada").await.unwrap().unwrap();
    let names: Vec<&str> = entry
        .fields
        .iter()
        .map(|field| field.name.as_str())
        .collect();
    assert_eq!(names, ["active", "age", "city", "score", "seen"]);
    assert_eq!(entry.fields[1].value, FieldValue::I64(36));
    assert_eq!(
        entry.fields[4].value,
        FieldValue::Timestamp(1_767_225_600_000)
    );

    // The fields belong to the value: a put without them clears them.
    client.put("ada", "v2").await.unwrap();
    assert!(client.get("ada").await.unwrap().unwrap().fields.is_empty());

    // A batch gives each entry its own fields, and mput gives none.
    let entries: Vec<PutEntry> = (0..20)
        .map(|index| PutEntry {
            key: format!("batch:{index}").into_bytes(),
            value: b"v".to_vec(),
            ttl_ms: None,
            fields: vec![Field::new("n", FieldValue::I64(index))],
        })
        .collect();
    client.mput_entries(&entries).await.unwrap();
    let read = client
        .mget(
            &entries
                .iter()
                .map(|entry| entry.key.clone())
                .collect::<Vec<_>>(),
        )
        .await
        .unwrap();
    for (entry, read) in entries.iter().zip(read) {
        assert_eq!(read.unwrap().fields, entry.fields);
    }
    client.mput(&[("batch:0", "plain")]).await.unwrap();
    assert!(client
        .get("batch:0")
        .await
        .unwrap()
        .unwrap()
        .fields
        .is_empty());

    // A transaction's put carries fields too, and its get returns them.
    let fields = vec![Field::new("state", FieldValue::Str("paid".to_owned()))];
    let put = TxnOp::Put {
        key: b"{order}status".to_vec(),
        value: b"paid".to_vec(),
        ttl_ms: None,
        keep_ttl: false,
        return_previous: false,
        lease: None,
        fields: fields.clone(),
    };
    let outcome = client
        .txn(Txn::new().then([put, TxnOp::get("{order}other")]))
        .await
        .unwrap();
    assert!(outcome.succeeded);
    let outcome = client
        .txn(Txn::new().then([TxnOp::get("{order}status")]))
        .await
        .unwrap();
    match &outcome.results[..] {
        [TxnResult::Get(Some(entry))] => assert_eq!(entry.fields, fields),
        other => panic!("expected the entry, got {other:?}"),
    }
}

async fn field_errors_are_refused_before_sending(client: &Client) {
    let too_many =
        (0..=FIELDS_PER_VALUE_MAX).map(|index| Field::new(format!("f{index}"), FieldValue::I64(1)));
    let error = client
        .put_with("k", "v", PutOptions::new().fields(too_many))
        .await
        .unwrap_err();
    match &error {
        ClientError::InvalidRequest(RequestError::TooManyFields { count, count_max }) => {
            assert_eq!((*count, *count_max), (17, 16));
        }
        other => panic!("expected TooManyFields, got {other:?}"),
    }
    assert_eq!(
        RequestError::TooManyFields {
            count: 17,
            count_max: 16
        }
        .code(),
        ErrorCode::TooLarge
    );
    let twice = PutOptions::new()
        .field("age", FieldValue::I64(1))
        .field("age", FieldValue::I64(2));
    assert!(matches!(
        client.put_with("k", "v", twice).await,
        Err(ClientError::InvalidRequest(RequestError::BadField { .. }))
    ));
    let unnamed = PutOptions::new().field("", FieldValue::Bool(true));
    assert!(matches!(
        client.put_with("k", "v", unnamed).await,
        Err(ClientError::InvalidRequest(RequestError::BadField { .. }))
    ));
    let long = PutOptions::new().field("s", FieldValue::Str("x".repeat(1025)));
    assert!(matches!(
        client.put_with("k", "v", long).await,
        Err(ClientError::InvalidRequest(RequestError::BadField { .. }))
    ));
    let batch = [PutEntry {
        key: b"k".to_vec(),
        value: b"v".to_vec(),
        ttl_ms: None,
        fields: vec![
            Field::new("a", FieldValue::I64(1)),
            Field::new("a", FieldValue::I64(1)),
        ],
    }];
    assert!(matches!(
        client.mput_entries(&batch).await,
        Err(ClientError::InvalidRequest(RequestError::BadField { .. }))
    ));
    // Nothing was written.
    assert_eq!(client.get("k").await.unwrap(), None);
    // Exactly the limit is fine.
    let most = (0..FIELDS_PER_VALUE_MAX)
        .map(|index| Field::new(format!("f{index:02}"), FieldValue::I64(1)));
    client
        .put_with("k", "v", PutOptions::new().fields(most))
        .await
        .unwrap();
    assert_eq!(
        client.get("k").await.unwrap().unwrap().fields.len(),
        FIELDS_PER_VALUE_MAX
    );
}

async fn queries_by_scan_and_by_index_match_the_model(client: &Client) {
    let people = people(120);
    write_people(client, &people).await;
    let topology = client.topology();
    let cores: std::collections::HashSet<usize> = people
        .iter()
        .map(|person| core_of_key(&topology, person.key.as_bytes()))
        .collect();
    assert_eq!(cores.len(), CORE_COUNT, "the people live on both cores");

    check_model_queries(client, &people, false).await;
    create(client, "city_eq", "city", IndexKind::Equality).await;
    create(client, "age_range", "age", IndexKind::Range).await;
    wait_until_ready(client, "city_eq").await;
    wait_until_ready(client, "age_range").await;
    check_model_queries(client, &people, true).await;

    // An index filed by value narrows what is read: the `=` reads only its matches.
    let result = query(client, &all_matching(r#"city = "Oslo""#)).await;
    let examined: u64 = result.plans.iter().map(|plan| plan.plan.examined).sum();
    assert_eq!(examined, result.items.len() as u64);
    match &result.plans[0].plan.access {
        QueryAccess::Index { field, lookup, .. } => {
            assert_eq!(field, "city");
            assert_eq!(lookup, r#"city = "Oslo""#);
        }
        QueryAccess::Scan => panic!("expected the index"),
    }

    // Writes after the build keep the indexes in step: a move to Oslo, a removal and a new
    // person.
    let mut people = people;
    people[1].city = "Oslo";
    client
        .put_with(
            &people[1].key,
            people[1].value(),
            PutOptions::new().fields(people[1].fields()),
        )
        .await
        .unwrap();
    client.delete(&people[0].key).await.unwrap();
    people.remove(0);
    let newcomer = Person {
        key: "person:9999".to_owned(),
        age: Some(33),
        city: "Oslo",
        score: 1.0,
        active: false,
    };
    client
        .put_with(
            &newcomer.key,
            newcomer.value(),
            PutOptions::new().fields(newcomer.fields()),
        )
        .await
        .unwrap();
    people.push(newcomer);
    check_model_queries(client, &people, true).await;
}

async fn order_by_merges_both_cores(client: &Client) {
    let people = people(80);
    write_people(client, &people).await;
    create(client, "age_range", "age", IndexKind::Range).await;
    wait_until_ready(client, "age_range").await;

    // Ascending, entries without an age last, ties by key.
    let mut expected: Vec<&Person> = people.iter().collect();
    expected.sort_by_key(|person| (person.age.is_none(), person.age, person.key.clone()));
    let ascending = query(client, &all_matching("score >= 0").order_by("age")).await;
    assert_eq!(
        keys_of(&ascending.items),
        expected.iter().map(|p| p.key.clone()).collect::<Vec<_>>()
    );
    for (item, person) in ascending.items.iter().zip(&expected) {
        assert_eq!(item.sort, vec![person.age.map(FieldValue::I64)]);
    }
    assert!(ascending.plans.iter().all(|plan| plan.plan.sorted));

    // Descending: largest first, still without an age last.
    expected.sort_by_key(|person| {
        (
            person.age.is_none(),
            Reverse(person.age),
            person.key.clone(),
        )
    });
    let descending = query(
        client,
        &all_matching("age exists or active = true").order_by_descending("age"),
    )
    .await;
    let expected_descending: Vec<String> = expected
        .iter()
        .filter(|person| person.age.is_some() || person.active)
        .map(|person| person.key.clone())
        .collect();
    assert_eq!(keys_of(&descending.items), expected_descending);

    // Two fields: city ascending, then score descending.
    let mut by_city: Vec<&Person> = people.iter().filter(|p| p.age.is_some()).collect();
    by_city.sort_by(|left, right| {
        left.city
            .cmp(right.city)
            .then(right.score.total_cmp(&left.score))
            .then(left.key.cmp(&right.key))
    });
    let result = query(
        client,
        &all_matching("age exists")
            .order_by("city")
            .order_by_descending("score"),
    )
    .await;
    assert_eq!(
        keys_of(&result.items),
        by_city.iter().map(|p| p.key.clone()).collect::<Vec<_>>()
    );
    // The first items come from both cores, interleaved by the merge.
    let topology = client.topology();
    let first_cores: std::collections::HashSet<usize> = result.items[..10]
        .iter()
        .map(|item| core_of_key(&topology, &item.key))
        .collect();
    assert_eq!(first_cores.len(), CORE_COUNT);
}

/// Pages through `options` `page_size` items at a time; every page's items and the cursor
/// that ends the paging.
async fn page_through(client: &Client, options: &QueryOptions, page_size: u32) -> Vec<String> {
    let mut keys = Vec::new();
    let mut options = options.clone().limit(page_size);
    for _ in 0..1000 {
        let page = query(client, &options).await;
        assert!(page.items.len() <= page_size as usize, "{options:?}");
        keys.extend(keys_of(&page.items));
        match page.cursor {
            Some(cursor) => {
                assert_eq!(
                    cursor.key,
                    page.items
                        .last()
                        .expect("a page with a cursor has items")
                        .key
                );
                options = options.after(cursor);
            }
            None => return keys,
        }
    }
    panic!("paging did not end: {options:?}");
}

async fn pages_return_every_match_once_in_order(client: &Client) {
    let people = people(150);
    write_people(client, &people).await;
    let key_order = model_keys(&people, |p| p.age.is_some_and(|age| age >= 20));
    let by_scan = QueryOptions::new()
        .prefix("person:")
        .filter_text("age >= 20")
        .unwrap();
    for page_size in [1, 7, 50] {
        assert_eq!(page_through(client, &by_scan, page_size).await, key_order);
    }
    let every = page_through(client, &QueryOptions::new().prefix("person:"), 13).await;
    assert_eq!(every, model_keys(&people, |_| true));

    create(client, "age_range", "age", IndexKind::Range).await;
    create(client, "city_eq", "city", IndexKind::Equality).await;
    wait_until_ready(client, "age_range").await;
    wait_until_ready(client, "city_eq").await;
    // The same pages by index (its candidates come in value order and are sorted by key).
    for page_size in [1, 7, 50] {
        assert_eq!(page_through(client, &by_scan, page_size).await, key_order);
    }

    // In the order of a field, descending, with ties (many people share an age).
    let mut expected: Vec<&Person> = people
        .iter()
        .filter(|p| p.city == "Oslo" || p.city == "Bergen")
        .collect();
    expected.sort_by_key(|person| {
        (
            person.age.is_none(),
            Reverse(person.age),
            person.key.clone(),
        )
    });
    let expected: Vec<String> = expected.iter().map(|p| p.key.clone()).collect();
    let by_age = QueryOptions::new()
        .prefix("person:")
        .filter_text(r#"city in ("Oslo", "Bergen")"#)
        .unwrap()
        .order_by_descending("age");
    for page_size in [1, 6, 1000] {
        assert_eq!(page_through(client, &by_age, page_size).await, expected);
    }
}

async fn pages_of_large_values_skip_no_match(client: &Client) {
    // Each value is over a fifth of a core's page bound, so a page holds about five.
    let value = vec![b'x'; 900 * 1024];
    let entries: Vec<PutEntry> = (0..14)
        .map(|index| PutEntry {
            key: format!("big:{index:02}").into_bytes(),
            value: value.clone(),
            ttl_ms: None,
            fields: vec![Field::new("n", FieldValue::I64(index))],
        })
        .collect();
    client.mput_entries(&entries).await.unwrap();
    let keys: Vec<String> = (0..14).map(|index| format!("big:{index:02}")).collect();
    let by_key = QueryOptions::new()
        .prefix("big:")
        .filter_text("n >= 0")
        .unwrap();
    let first = query(client, &by_key.clone().limit(10)).await;
    assert!(first.items.len() < 10, "a page ends on its byte bound");
    assert!(first.has_more());
    assert_eq!(page_through(client, &by_key, 10).await, keys);
    let descending = by_key.order_by_descending("n");
    let mut reversed = keys;
    reversed.reverse();
    assert_eq!(page_through(client, &descending, 10).await, reversed);
}

async fn counts_and_projections(client: &Client) {
    let people = people(60);
    write_people(client, &people).await;
    let oslo = model_keys(&people, |p| p.city == "Oslo");
    let count = query(client, &all_matching(r#"city = "Oslo""#).count_only()).await;
    assert_eq!(count.count, oslo.len() as u64);
    assert!(count.items.is_empty());
    assert_eq!(count.cursor, None);
    assert_eq!(count.plans.len(), CORE_COUNT);
    // A count ignores the limit and any cursor: every match counts.
    let capped = all_matching(r#"city = "Oslo""#)
        .limit(1)
        .after(QueryCursor {
            sort: Vec::new(),
            key: b"person:9".to_vec(),
        })
        .count_only();
    assert_eq!(query(client, &capped).await.count, oslo.len() as u64);
    let everyone = query(client, &QueryOptions::new().prefix("person:").count_only()).await;
    assert_eq!(everyone.count, people.len() as u64);

    let keys_only = query(client, &all_matching(r#"city = "Oslo""#).keys_only()).await;
    assert_eq!(keys_of(&keys_only.items), oslo);
    assert_eq!(keys_only.count, oslo.len() as u64);
    assert!(keys_only
        .items
        .iter()
        .all(|item| item.entry.is_none() && item.fields.is_empty()));

    let fields_only = query(client, &all_matching(r#"city = "Oslo""#).fields_only()).await;
    assert_eq!(keys_of(&fields_only.items), oslo);
    for item in &fields_only.items {
        assert!(item.entry.is_none());
        let person = people
            .iter()
            .find(|p| p.key.as_bytes() == item.key)
            .unwrap();
        assert_eq!(item.fields, sorted(person.fields()));
    }

    let full = query(client, &all_matching(r#"city = "Oslo""#)).await;
    for item in &full.items {
        let entry = item.entry.as_ref().expect("whole entries by default");
        assert!(item.fields.is_empty(), "the fields are in the entry");
        assert!(!entry.fields.is_empty());
        assert_eq!(entry.version, 1);
    }
}

async fn invalid_queries_are_refused(client: &Client) {
    client.put("k", "v").await.unwrap();
    match QueryOptions::new().filter_text("age >= 20 and") {
        Err(error @ ClientError::InvalidRequest(RequestError::BadQuery(_))) => {
            assert!(error.to_string().contains("at byte 13"), "{error}");
        }
        other => panic!("expected a syntax error, got {other:?}"),
    }
    assert!(QueryOptions::new().filter_text("").is_err());
    for limit in [0, QUERY_LIMIT_MAX + 1] {
        match client.query(&QueryOptions::new().limit(limit)).await {
            Err(ClientError::InvalidRequest(RequestError::BadQueryRequest { reason })) => {
                assert!(reason.contains("limit"), "{reason}");
            }
            other => panic!("limit {limit}: expected a refusal, got {other:?}"),
        }
    }
    let mut too_ordered = QueryOptions::new();
    for index in 0..=QUERY_ORDER_BY_MAX {
        too_ordered = too_ordered.order_by(format!("f{index}"));
    }
    assert!(matches!(
        client.query(&too_ordered).await,
        Err(ClientError::InvalidRequest(
            RequestError::BadQueryRequest { .. }
        ))
    ));
    // A cursor of another order.
    let wrong_cursor = QueryOptions::new().order_by("age").after(QueryCursor {
        sort: Vec::new(),
        key: b"k".to_vec(),
    });
    assert!(matches!(
        client.query(&wrong_cursor).await,
        Err(ClientError::InvalidRequest(
            RequestError::BadQueryRequest { .. }
        ))
    ));
    // A valid query still answers.
    let result = client.query(&QueryOptions::new()).await.unwrap();
    assert_eq!(keys_of(&result.items), ["k"]);
}

async fn index_definitions_are_checked_on_every_core(client: &Client) {
    let spec = IndexSpec::new("people_age", "person:", "age", IndexKind::Range);
    let first = client.create_index(&spec).await.unwrap();
    assert!(first.is_applied_everywhere());
    // The same definition again changes nothing, anywhere.
    let again = client.create_index(&spec).await.unwrap();
    assert!(!again.is_applied_anywhere(), "{again:?}");
    let topology = client.topology();
    let expected_cores: Vec<(u32, u16)> = topology
        .nodes
        .iter()
        .flat_map(|node| node.cores.iter().map(|core| (node.node_id, core.core_id)))
        .collect();
    let answered: Vec<(u32, u16)> = again
        .cores
        .iter()
        .map(|core| (core.node_id, core.core_id))
        .collect();
    assert_eq!(answered, expected_cores);

    // Another definition under the name is refused by the cores, which say who they are.
    let other = IndexSpec::new("people_age", "person:", "city", IndexKind::Equality);
    let error = client.create_index(&other).await.unwrap_err();
    assert_eq!(error.code(), Some(ErrorCode::InvalidArgument), "{error}");
    let (node_id, core_id) = expected_cores[0];
    assert!(
        error
            .to_string()
            .contains(&format!("node {node_id} core {core_id}")),
        "{error}"
    );
    // Bad definitions never leave the client.
    for bad in [
        IndexSpec::new("", "p", "f", IndexKind::Equality),
        IndexSpec::new("x".repeat(65), "p", "f", IndexKind::Equality),
        IndexSpec::new("n", "p", "", IndexKind::Equality),
    ] {
        assert!(
            matches!(
                client.create_index(&bad).await,
                Err(ClientError::InvalidRequest(RequestError::BadIndex { .. }))
            ),
            "{bad:?}"
        );
    }

    let listed = client.list_indexes().await.unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0].spec, spec);
    assert_eq!(listed[0].cores.len(), CORE_COUNT);
    assert!(listed[0].missing.is_empty());
    assert!(
        listed[0].is_ready(),
        "created over no keys, so ready at once"
    );

    let dropped = client.drop_index("people_age").await.unwrap();
    assert!(dropped.is_applied_everywhere());
    let dropped = client.drop_index("people_age").await.unwrap();
    assert!(!dropped.is_applied_anywhere());
    assert!(client.list_indexes().await.unwrap().is_empty());
}

async fn dropping_an_index_falls_back_to_a_scan(client: &Client) {
    let people = people(50);
    write_people(client, &people).await;
    create(client, "city_eq", "city", IndexKind::Equality).await;
    wait_until_ready(client, "city_eq").await;
    let options = all_matching(r#"city = "Bergen""#);
    let by_index = query(client, &options).await;
    assert_eq!(
        index_used(&by_index),
        vec![Some("city_eq".to_owned()); CORE_COUNT]
    );
    client.drop_index("city_eq").await.unwrap();
    let by_scan = query(client, &options).await;
    assert_eq!(index_used(&by_scan), vec![None; CORE_COUNT]);
    assert_eq!(keys_of(&by_scan.items), keys_of(&by_index.items));
    assert_eq!(
        keys_of(&by_scan.items),
        model_keys(&people, |p| p.city == "Bergen")
    );
}

async fn an_index_over_existing_keys_builds_then_serves(client: &Client) {
    let people = people(600);
    write_people(client, &people).await;
    create(client, "age_range", "age", IndexKind::Range).await;
    let listed = client.list_indexes().await.unwrap();
    assert_eq!(listed.len(), 1);
    let status = &listed[0];
    assert!(!status.is_ready(), "{status:?}");
    let building: Vec<_> = status
        .cores
        .iter()
        .filter_map(|core| match core.state {
            IndexState::Building {
                keys_done,
                keys_total,
            } => Some((keys_done, keys_total)),
            IndexState::Ready => None,
        })
        .collect();
    assert!(!building.is_empty(), "{status:?}");
    for (keys_done, keys_total) in building {
        assert!(keys_total > 0, "{status:?}");
        assert!(keys_done <= keys_total, "{status:?}");
    }

    // Meanwhile queries scan, and the cores that could use the index say it is building.
    let options = all_matching("age >= 40");
    let expected = model_keys(&people, |p| p.age.is_some_and(|age| age >= 40));
    let early = query(client, &options).await;
    assert_eq!(keys_of(&early.items), expected);
    assert!(
        early
            .plans
            .iter()
            .any(|plan| plan.plan.building == ["age_range"]),
        "{:?}",
        early.plans
    );
    for plan in &early.plans {
        if plan.plan.access == QueryAccess::Scan {
            assert_eq!(plan.plan.building, ["age_range"], "{plan:?}");
        }
    }

    wait_until_ready(client, "age_range").await;
    let listed = client.list_indexes().await.unwrap();
    let filed = people.iter().filter(|p| p.age.is_some()).count() as u64;
    assert_eq!(listed[0].entries, filed, "{listed:?}");
    assert!(listed[0].memory_bytes > 0);
    let late = query(client, &options).await;
    assert_eq!(keys_of(&late.items), expected);
    assert_eq!(
        index_used(&late),
        vec![Some("age_range".to_owned()); CORE_COUNT]
    );
    assert!(late.plans.iter().all(|plan| plan.plan.building.is_empty()));
}

// ---------------------------------------------------------------------------------------
// Durability.

/// Writes `key` with the field `age` (or no fields), value `v`.
async fn put_age(client: &Client, key: &str, age: Option<i64>) {
    let mut options = PutOptions::new();
    if let Some(age) = age {
        options = options.field("age", FieldValue::I64(age));
    }
    client.put_with(key, "v", options).await.unwrap();
}

/// A watch on `age >= 20` starts with a snapshot of the matching keys only, then sees keys
/// enter the result set (puts), change in it (puts), leave it while they still exist
/// (`Left`) and leave it by being deleted; changes outside the set are not delivered.
async fn a_watch_on_a_query_follows_its_result_set(client: &Client) {
    use futures_util::StreamExt;
    use tessera_client::{EventKind, KeyRange, WatchMessage, WatchOptions};

    put_age(client, "person:a", Some(30)).await;
    put_age(client, "person:b", Some(40)).await;
    put_age(client, "person:c", Some(10)).await;
    put_age(client, "person:z", None).await;
    let query = tessera_protocol::query::parse_query("age >= 20").unwrap();
    let mut watch = client
        .watch(
            &KeyRange::prefix("person:"),
            WatchOptions::new().snapshot().query(query),
        )
        .await
        .unwrap();
    let mut snapshot = Vec::new();
    let mut events: std::collections::BTreeMap<String, Vec<(&'static str, Option<i64>)>> =
        std::collections::BTreeMap::new();
    let mut snapshots_seen = 0;
    while snapshots_seen < CORE_COUNT {
        match within(CALL_TIMEOUT, "a snapshot", watch.next()).await {
            Some(Ok(WatchMessage::Snapshot { items, .. })) => {
                snapshots_seen += 1;
                snapshot.extend(
                    items
                        .into_iter()
                        .map(|item| String::from_utf8(item.key).unwrap()),
                );
            }
            other => panic!("expected snapshots first, got {other:?}"),
        }
    }
    snapshot.sort();
    assert_eq!(snapshot, ["person:a", "person:b"]);
    put_age(client, "person:c", Some(25)).await; // enters
    put_age(client, "person:a", Some(35)).await; // changes in it
    put_age(client, "person:b", Some(5)).await; // leaves, still there
    put_age(client, "person:c", Some(15)).await; // leaves again
    put_age(client, "person:d", Some(1)).await; // never in it
    put_age(client, "person:z", Some(3)).await; // never in it
    client.delete("person:a").await.unwrap(); // leaves by a delete
    client.delete("person:b").await.unwrap(); // not in it any more: nothing
                                              // A marker on every core: a shard's events come in order, so once its marker arrived
                                              // everything before it on that shard has too.
    let topology = client.topology();
    let markers: Vec<String> = (0..CORE_COUNT)
        .map(|core| {
            (0..10_000)
                .map(|number| format!("person:end{number}"))
                .find(|key| core_of_key(&topology, key.as_bytes()) == core)
                .unwrap()
        })
        .collect();
    for marker in &markers {
        put_age(client, marker, Some(99)).await;
    }
    while !markers.iter().all(|marker| events.contains_key(marker)) {
        match within(CALL_TIMEOUT, "the events", watch.next()).await {
            Some(Ok(WatchMessage::Events { events: batch, .. })) => {
                for event in batch {
                    let kind = match event.kind {
                        EventKind::Put { .. } => "put",
                        EventKind::Left { .. } => "left",
                        EventKind::Deleted => "deleted",
                        other => panic!("unexpected {other:?}"),
                    };
                    let age = event
                        .fields
                        .iter()
                        .find(|field| field.name == "age")
                        .map(|field| match field.value {
                            FieldValue::I64(age) => age,
                            ref other => panic!("age {other:?}"),
                        });
                    events
                        .entry(String::from_utf8(event.key).unwrap())
                        .or_default()
                        .push((kind, age));
                }
            }
            Some(Ok(WatchMessage::Progress(_))) => {}
            other => panic!("expected events, got {other:?}"),
        }
    }
    let expected: std::collections::BTreeMap<String, Vec<(&'static str, Option<i64>)>> = [
        ("person:a", vec![("put", Some(35)), ("deleted", None)]),
        ("person:b", vec![("left", Some(5))]),
        ("person:c", vec![("put", Some(25)), ("left", Some(15))]),
    ]
    .into_iter()
    .map(|(key, kinds)| (key.to_owned(), kinds))
    .chain(
        markers
            .iter()
            .map(|marker| (marker.clone(), vec![("put", Some(99))])),
    )
    .collect();
    assert_eq!(events, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fields_and_indexes_survive_a_restart() {
    let mut server = DurableServer::start("query-restart", common::test_config(CORE_COUNT)).await;
    let mut people = people(80);
    {
        let client = within(CALL_TIMEOUT, "connect", Client::connect(server.addresses()))
            .await
            .unwrap();
        write_people(&client, &people).await;
        create(&client, "age_range", "age", IndexKind::Range).await;
        create(&client, "city_eq", "city", IndexKind::Equality).await;
        wait_until_ready(&client, "age_range").await;
        client.drop_index("city_eq").await.unwrap();
        // Written after the index: filed as it is written.
        let late = Person {
            key: "person:late".to_owned(),
            age: Some(44),
            city: "Oslo",
            score: 3.0,
            active: true,
        };
        client
            .put_with(
                &late.key,
                late.value(),
                PutOptions::new().fields(late.fields()),
            )
            .await
            .unwrap();
        people.push(late);
    }
    within(Duration::from_secs(30), "restart", server.restart()).await;

    let client = within(CALL_TIMEOUT, "connect", Client::connect(server.addresses()))
        .await
        .unwrap();
    for person in [&people[0], &people[9], people.last().unwrap()] {
        let entry = client.get(&person.key).await.unwrap().unwrap();
        assert_eq!(entry.value, person.value());
        assert_eq!(entry.fields, sorted(person.fields()));
    }
    let listed = client.list_indexes().await.unwrap();
    let names: Vec<&str> = listed
        .iter()
        .map(|status| status.spec.name.as_str())
        .collect();
    assert_eq!(names, ["age_range"], "the dropped index stays dropped");
    assert!(listed[0].is_ready(), "recovery rebuilds before serving");
    let filed = people.iter().filter(|p| p.age.is_some()).count() as u64;
    assert_eq!(listed[0].entries, filed);

    let result = query(
        &client,
        &all_matching("age between 30 and 45").order_by("age"),
    )
    .await;
    let mut expected: Vec<&Person> = people
        .iter()
        .filter(|p| p.age.is_some_and(|age| (30..=45).contains(&age)))
        .collect();
    expected.sort_by_key(|p| (p.age, p.key.clone()));
    assert_eq!(
        keys_of(&result.items),
        expected.iter().map(|p| p.key.clone()).collect::<Vec<_>>()
    );
    assert_eq!(
        index_used(&result),
        vec![Some("age_range".to_owned()); CORE_COUNT]
    );
    drop(client);
    server.stop().await;
}

// ---------------------------------------------------------------------------------------
// The blocking client.

/// The blocking client's index and query calls are the async ones', run to completion.
#[test]
fn the_blocking_client_indexes_and_queries() {
    let server = common::start_server(CORE_COUNT);
    let addresses = server.addresses();
    common::on_thread_within(common::SCENARIO_TIMEOUT, "blocking queries", move || {
        let client = tessera_client::BlockingClient::connect(addresses).unwrap();
        let people = people(40);
        let entries: Vec<PutEntry> = people
            .iter()
            .map(|person| PutEntry {
                key: person.key.clone().into_bytes(),
                value: person.value(),
                ttl_ms: None,
                fields: person.fields(),
            })
            .collect();
        client.mput_entries(&entries).unwrap();
        let spec = IndexSpec::new("city_eq", "person:", "city", IndexKind::Equality);
        assert!(client.create_index(&spec).unwrap().is_applied_everywhere());
        let deadline = Instant::now() + Duration::from_secs(10);
        while !client.list_indexes().unwrap()[0].is_ready() {
            assert!(Instant::now() < deadline, "the index is not ready");
            std::thread::sleep(Duration::from_millis(10));
        }
        let result = client
            .query(&all_matching(r#"city = "Trondheim""#))
            .unwrap();
        assert_eq!(
            keys_of(&result.items),
            model_keys(&people, |p| p.city == "Trondheim")
        );
        assert_eq!(
            index_used(&result),
            vec![Some("city_eq".to_owned()); CORE_COUNT]
        );
        assert!(client
            .drop_index("city_eq")
            .unwrap()
            .is_applied_everywhere());
        assert!(client.list_indexes().unwrap().is_empty());
    });
    common::stop_server(server);
}
