//! Tests of queries on one shard (issue 8), sans-I/O: the planner's choices and a query's
//! bounds, each pinned on a small table of entries.

use tessera_protocol::codec::{self, FrameBuffer};
use tessera_protocol::query::{Bound, QueryNode};
use tessera_protocol::{
    ErrorCode, Field, FieldValue, IndexKind, IndexSpec, OrderBy, Put, Query, QueryAccess,
    QueryCursor, QueryPage, QueryRequest, Request, Response, SlotRange, SLOT_COUNT,
};

use super::lease::LeaseLimits;
use super::lock::LockLimits;
use super::query::{QueryBudget, BUDGET_CHECK_EVERY};
use super::watch::WatchLimits;
use super::{Shard, ShardConfig, ShardId};

const SHARD_ID: ShardId = 0;
const START_MS: u64 = 1_000_000;
/// Most matches a query sorts in these tests: far more than the keys there are.
const SORT_ITEMS_MAX: usize = 10_000;

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
