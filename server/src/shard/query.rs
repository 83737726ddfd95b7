//! Queries on one shard (issue 8): the planner and the executor, sans-I/O.
//!
//! The planner looks at the comparisons the whole filter requires (the root, or the
//! operands of a root `and`) and picks a ready index on one of their fields whose prefix
//! covers the query's: an `=` first, then `in`, a string `prefix`, a range bounded on both
//! sides, then on one. Its keys are the candidates; without one, the candidates are every
//! key under the prefix, in key order. Each candidate's entry is then checked against the
//! whole filter, so an index only ever narrows what is read, never what matches.
//!
//! Results come in the query's order: by the `order_by` fields, then by key. A scan in key
//! order stops as soon as the page is full. Anything else (an `order_by`, or index
//! candidates in value order) collects the matches after the cursor, at most
//! `sort_items_max` of them, and sorts them. The clock is the caller's: `time_left` is asked
//! every [`BUDGET_CHECK_EVERY`] candidates, and a query past it is refused, never cut short
//! silently.

use std::cmp::Ordering;

use tessera_protocol::index::cursor_cmp;
use tessera_protocol::limits::SCAN_PAGE_BYTES_MAX;
use tessera_protocol::query::{Bound, QueryNode};
use tessera_protocol::{
    key_after, prefix_end, ErrorCode, ErrorReply, FieldValue, IndexKind, Projection, Query,
    QueryAccess, QueryItem, QueryPage, QueryPlan, QueryRequest, Response,
};

use super::fields;
use super::indexes::ShardIndex;
use super::store::EntryRef;
use super::{to_entry, Shard};

/// Candidates read between two looks at the clock.
pub const BUDGET_CHECK_EVERY: u64 = 256;

/// The bounds one query runs within.
pub struct QueryBudget<'a> {
    /// Whether time is left; asked every [`BUDGET_CHECK_EVERY`] candidates.
    pub time_left: &'a mut dyn FnMut() -> bool,
    /// The time budget, for the refusal's message.
    pub time_budget_ms: u64,
    /// Most matches collected to sort.
    pub sort_items_max: usize,
}

/// Keys read from an index, as they are asked for.
type Keys<'a> = Box<dyn Iterator<Item = &'a [u8]> + 'a>;

/// Where the candidates come from.
struct Plan<'a> {
    access: QueryAccess,
    /// The index's keys (`None`: scan the prefix), and whether they are in key order.
    keys: Option<(Keys<'a>, bool)>,
    building: Vec<String>,
}

/// How well a comparison narrows through an index; lower is better.
fn rank(node: &QueryNode, kind: IndexKind) -> Option<u8> {
    match (node, kind) {
        (QueryNode::Equal { .. }, _) => Some(0),
        (QueryNode::In { .. }, _) => Some(1),
        (QueryNode::Prefix { .. }, IndexKind::Range) => Some(2),
        (QueryNode::Range { lower, upper, .. }, IndexKind::Range) => {
            let bounded = [lower, upper]
                .iter()
                .filter(|bound| !matches!(bound, Bound::Unbounded))
                .count();
            Some(5 - u8::try_from(bounded).unwrap_or(2))
        }
        _ => None,
    }
}

/// An index's keys for a comparison from `start` on (in key order, when they come in it),
/// and whether they come in key order.
fn lookup<'a>(index: &'a ShardIndex, node: &QueryNode, start: &[u8]) -> (Keys<'a>, bool) {
    match node {
        // One value's keys are held in key order (`2` and `2.0` are one value), and read
        // only as far as the page goes.
        QueryNode::Equal { value, .. } => (index.index.equal_from(value, start), true),
        QueryNode::In { values, .. } => {
            let mut keys: Vec<&[u8]> = values
                .iter()
                .flat_map(|value| index.index.equal(value))
                .collect();
            // Two listed values may be one (`2`, `2.0`).
            keys.sort_unstable();
            keys.dedup();
            (Box::new(keys.into_iter()), true)
        }
        QueryNode::Prefix { prefix, .. } => {
            (Box::new(index.index.prefix(prefix).into_iter()), false)
        }
        QueryNode::Range { lower, upper, .. } => {
            (Box::new(index.index.range(lower, upper).into_iter()), false)
        }
        QueryNode::And(_) | QueryNode::Or(_) | QueryNode::Not(_) => {
            (Box::new(std::iter::empty()), false)
        }
    }
}

/// The comparisons every match must satisfy: the root, or a root `and`'s operands.
fn required(filter: &Query) -> Vec<&QueryNode> {
    match filter.nodes.last() {
        Some(QueryNode::And(operands)) => operands
            .iter()
            .filter_map(|operand| filter.nodes.get(usize::from(*operand)))
            .collect(),
        Some(root) => vec![root],
        None => Vec::new(),
    }
}

fn budget_refusal(message: String) -> Response {
    Response::Error(ErrorReply::new(ErrorCode::BudgetExceeded, message))
}

/// One match, kept to be sorted.
struct Match<'a> {
    sort: Vec<Option<FieldValue>>,
    key: &'a [u8],
}

impl Shard {
    fn plan(&self, query: &QueryRequest, start: &[u8]) -> Plan<'_> {
        let mut plan = Plan {
            access: QueryAccess::Scan,
            keys: None,
            building: Vec::new(),
        };
        let Some(filter) = &query.filter else {
            return plan;
        };
        let mut best: Option<(u8, &ShardIndex, &QueryNode)> = None;
        for node in required(filter) {
            let Some(field) = node.field() else {
                continue;
            };
            for index in self.indexes.iter() {
                if index.spec.field != field || !query.prefix.starts_with(&index.spec.prefix) {
                    continue;
                }
                let Some(rank) = rank(node, index.spec.kind) else {
                    continue;
                };
                if !index.is_ready() {
                    if !plan.building.contains(&index.spec.name) {
                        plan.building.push(index.spec.name.clone());
                    }
                    continue;
                }
                if best.is_none_or(|(best_rank, _, _)| rank < best_rank) {
                    best = Some((rank, index, node));
                }
            }
        }
        if let Some((_, index, node)) = best {
            plan.access = QueryAccess::Index {
                name: index.spec.name.clone(),
                field: index.spec.field.clone(),
                lookup: Query {
                    nodes: vec![node.clone()],
                }
                .to_text(),
            };
            plan.keys = Some(lookup(index, node, start));
        }
        plan
    }

    /// Answers one query from this shard's keys at its current revision: the first
    /// `limit` matches after the cursor in the query's order, or their count.
    ///
    /// The request passed `codec::check_request`.
    pub fn query(
        &self,
        now_ms: u64,
        query: &QueryRequest,
        budget: &mut QueryBudget<'_>,
    ) -> Response {
        let start = key_order_start(query);
        let mut plan = self.plan(query, &start);
        let keys = plan.keys.take();
        let mut found = match self.collect(now_ms, query, keys, &start, &plan, budget) {
            Ok(found) => found,
            Err(refusal) => return refusal,
        };
        if found.sorted {
            self.page_sorted(query, &mut found);
        }
        let count = if query.count_only {
            found.matched
        } else {
            found.items.len() as u64
        };
        Response::Query(Box::new(QueryPage {
            node_id: self.config.node_id,
            core_id: self.config.shard_id,
            revision: self.revision,
            items: found.items,
            count,
            more: found.more,
            plan: QueryPlan {
                access: plan.access,
                examined: found.examined,
                matched: found.matched,
                building: plan.building,
                sorted: found.sorted,
            },
        }))
    }

    /// Reads the plan's candidates and checks each against the filter: the page itself when
    /// matches come in the page's order, else the matches after the cursor to sort.
    fn collect<'s>(
        &'s self,
        now_ms: u64,
        query: &QueryRequest,
        keys: Option<(Keys<'s>, bool)>,
        start: &[u8],
        plan: &Plan<'s>,
        budget: &mut QueryBudget<'_>,
    ) -> Result<Found<'s>, Response> {
        let order_by = &query.order_by;
        let after = query.after.as_ref();
        let key_ordered = keys.as_ref().is_none_or(|(_, ordered)| *ordered);
        let streams = order_by.is_empty() && key_ordered && !query.count_only;
        let prefix_end = prefix_end(&query.prefix);
        let candidates: Box<dyn Iterator<Item = EntryRef<'s>> + 's> = match keys {
            Some((keys, _)) => {
                let prefix = query.prefix.clone();
                let start = start.to_vec();
                Box::new(
                    keys.filter(move |key| key.starts_with(&prefix) && *key >= start.as_slice())
                        .filter_map(|key| self.store.get(key)),
                )
            }
            None => Box::new(self.store.range(start, prefix_end.as_deref())),
        };
        let mut found = Found {
            examined: 0,
            matched: 0,
            items: Vec::new(),
            bytes: 0,
            more: false,
            sorted: !streams && !query.count_only,
            to_sort: Vec::new(),
        };
        for entry in candidates {
            if entry.is_expired(now_ms) {
                continue;
            }
            found.examined += 1;
            if found.examined % BUDGET_CHECK_EVERY == 0 && !(budget.time_left)() {
                return Err(self.time_refusal(plan, budget, found.examined));
            }
            let values = fields::values(entry.fields());
            let holds = query
                .filter
                .as_ref()
                .is_none_or(|filter| filter.matches(|name| fields::value_in(&values, name)));
            if !holds {
                continue;
            }
            if streams {
                found.matched += 1;
                if found.is_full(query) {
                    found.more = true;
                    break;
                }
                found.bytes += item_bytes(entry, query.projection);
                found.items.push(item(entry, Vec::new(), query.projection));
                continue;
            }
            let sort: Vec<Option<FieldValue>> = order_by
                .iter()
                .map(|order| fields::value_in(&values, &order.field).cloned())
                .collect();
            // Only what follows the cursor matches, counted or not, in any order (in key
            // order the candidates start after it already).
            if after.is_some_and(|after| {
                cursor_cmp(order_by, &sort, entry.key(), &after.sort, &after.key)
                    != Ordering::Greater
            }) {
                continue;
            }
            found.matched += 1;
            if query.count_only {
                continue;
            }
            if found.to_sort.len() >= budget.sort_items_max {
                return Err(budget_refusal(format!(
                    "query matches more than {} entries on core {} to sort (by {}); narrow it, \
                     or page through it with a smaller order",
                    budget.sort_items_max,
                    self.config.shard_id,
                    access_text(&plan.access),
                )));
            }
            found.to_sort.push(Match {
                sort,
                key: entry.key(),
            });
        }
        Ok(found)
    }

    /// Sorts the collected matches and takes the page from them.
    fn page_sorted(&self, query: &QueryRequest, found: &mut Found<'_>) {
        let order_by = &query.order_by;
        let mut to_sort = std::mem::take(&mut found.to_sort);
        to_sort.sort_unstable_by(|left, right| {
            cursor_cmp(order_by, &left.sort, left.key, &right.sort, right.key)
        });
        for matched in to_sort {
            if found.is_full(query) {
                found.more = true;
                break;
            }
            let Some(entry) = self.store.get(matched.key) else {
                continue;
            };
            found.bytes += item_bytes(entry, query.projection);
            found
                .items
                .push(item(entry, matched.sort, query.projection));
        }
    }

    fn time_refusal(&self, plan: &Plan<'_>, budget: &QueryBudget<'_>, examined: u64) -> Response {
        let building = if plan.building.is_empty() {
            String::new()
        } else {
            format!(
                "; index {} is still building and was not used",
                plan.building.join(", ")
            )
        };
        budget_refusal(format!(
            "query passed its time budget of {} ms on core {} after examining {examined} \
             entries by {}{building}",
            budget.time_budget_ms,
            self.config.shard_id,
            access_text(&plan.access),
        ))
    }
}

/// Where candidates in key order start: the prefix, or right after the cursor's key when
/// the order is the key's (a cursor before the prefix starts at the prefix).
fn key_order_start(query: &QueryRequest) -> Vec<u8> {
    match &query.after {
        Some(after)
            if query.order_by.is_empty() && after.key.as_slice() >= query.prefix.as_slice() =>
        {
            key_after(&after.key)
        }
        _ => query.prefix.clone(),
    }
}

/// What a query found on the shard.
struct Found<'a> {
    examined: u64,
    matched: u64,
    items: Vec<QueryItem>,
    bytes: usize,
    more: bool,
    /// Whether the page comes from sorting `to_sort`.
    sorted: bool,
    to_sort: Vec<Match<'a>>,
}

impl Found<'_> {
    /// Whether the page can take no more items.
    fn is_full(&self, query: &QueryRequest) -> bool {
        self.items.len() == query.limit as usize || self.bytes >= SCAN_PAGE_BYTES_MAX
    }
}

fn access_text(access: &QueryAccess) -> String {
    match access {
        QueryAccess::Index { name, lookup, .. } => format!("index {name} ({lookup})"),
        QueryAccess::Scan => "scan of the prefix".to_owned(),
    }
}

fn item_bytes(entry: EntryRef<'_>, projection: Projection) -> usize {
    entry.key().len()
        + match projection {
            Projection::KeysOnly => 0,
            Projection::Fields => entry.fields().len(),
            Projection::Full => entry.fields().len() + entry.value().len(),
        }
}

fn item(entry: EntryRef<'_>, sort: Vec<Option<FieldValue>>, projection: Projection) -> QueryItem {
    QueryItem {
        key: entry.key().to_vec(),
        sort,
        fields: if projection == Projection::Fields {
            fields::to_fields(entry.fields())
        } else {
            Vec::new()
        },
        entry: (projection == Projection::Full).then(|| to_entry(entry)),
    }
}
