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
    key_after, prefix_end, ErrorCode, ErrorReply, Field, FieldValue, IndexKind, Projection, Query,
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

/// Where the candidates come from.
struct Plan<'a> {
    access: QueryAccess,
    /// The index's keys (`None`: scan the prefix), and whether they are in key order.
    keys: Option<(Vec<&'a [u8]>, bool)>,
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

/// An index's keys for a comparison, and whether they come in key order.
fn lookup<'a>(index: &'a ShardIndex, node: &QueryNode) -> (Vec<&'a [u8]>, bool) {
    match node {
        // One value's keys are held in key order (`2` and `2.0` are one value).
        QueryNode::Equal { value, .. } => (index.index.equal(value), true),
        QueryNode::In { values, .. } => {
            let mut keys: Vec<&[u8]> = values
                .iter()
                .flat_map(|value| index.index.equal(value))
                .collect();
            // Two listed values may be one (`2`, `2.0`).
            keys.sort_unstable();
            keys.dedup();
            (keys, true)
        }
        QueryNode::Prefix { prefix, .. } => (index.index.prefix(prefix), false),
        QueryNode::Range { lower, upper, .. } => (index.index.range(lower, upper), false),
        QueryNode::And(_) | QueryNode::Or(_) | QueryNode::Not(_) => (Vec::new(), false),
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
    fn plan(&self, query: &QueryRequest) -> Plan<'_> {
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
            plan.keys = Some(lookup(index, node));
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
        let plan = self.plan(query);
        let order_by = &query.order_by;
        let limit = query.limit as usize;
        let after = query.after.as_ref();
        let prefix_end = prefix_end(&query.prefix);
        let key_ordered = plan.keys.as_ref().is_none_or(|(_, ordered)| *ordered);
        let streams = order_by.is_empty() && key_ordered && !query.count_only;
        let start = first_key(query);
        let candidates: Box<dyn Iterator<Item = EntryRef<'_>>> = match &plan.keys {
            Some((keys, _)) => Box::new(
                keys.iter()
                    .filter(|key| key.starts_with(&query.prefix) && ***key >= *start.as_slice())
                    .filter_map(|key| self.store.get(key)),
            ),
            None => Box::new(self.store.range(&start, prefix_end.as_deref())),
        };
        let mut examined = 0_u64;
        let mut matched = 0_u64;
        let mut items = Vec::new();
        let mut bytes = 0;
        let mut more = false;
        let mut sorting: Vec<Match<'_>> = Vec::new();
        for entry in candidates {
            if entry.is_expired(now_ms) {
                continue;
            }
            examined += 1;
            if examined % BUDGET_CHECK_EVERY == 0 && !(budget.time_left)() {
                return self.time_refusal(&plan, examined, budget.time_budget_ms);
            }
            let entry_fields = fields::to_fields(entry.fields());
            let holds = query
                .filter
                .as_ref()
                .is_none_or(|filter| filter.matches(|name| field_value(&entry_fields, name)));
            if !holds {
                continue;
            }
            if streams {
                matched += 1;
                if items.len() == limit || bytes >= SCAN_PAGE_BYTES_MAX {
                    more = true;
                    break;
                }
                bytes += item_bytes(entry, query.projection);
                items.push(item(entry, Vec::new(), entry_fields, query.projection));
                continue;
            }
            let sort: Vec<Option<FieldValue>> = order_by
                .iter()
                .map(|order| field_value(&entry_fields, &order.field).cloned())
                .collect();
            // Only what follows the cursor matches, counted or not, in any order (in key
            // order the candidates start after it already).
            if let Some(after) = after {
                if cursor_cmp(order_by, &sort, entry.key(), &after.sort, &after.key)
                    != Ordering::Greater
                {
                    continue;
                }
            }
            matched += 1;
            if query.count_only {
                continue;
            }
            if sorting.len() >= budget.sort_items_max {
                return self.sort_refusal(&plan, budget.sort_items_max);
            }
            sorting.push(Match {
                sort,
                key: entry.key(),
            });
        }
        let sorted = !streams && !query.count_only;
        if sorted {
            (items, more) = self.sorted_items(sorting, query);
        }
        let count = if query.count_only {
            matched
        } else {
            items.len() as u64
        };
        Response::Query(Box::new(QueryPage {
            node_id: self.config.node_id,
            core_id: self.config.shard_id,
            revision: self.revision,
            items,
            count,
            more,
            plan: QueryPlan {
                access: plan.access,
                examined,
                matched,
                building: plan.building,
                sorted,
            },
        }))
    }
}

impl Shard {
    fn time_refusal(&self, plan: &Plan<'_>, examined: u64, time_budget_ms: u64) -> Response {
        let building = if plan.building.is_empty() {
            String::new()
        } else {
            format!(
                "; index {} is still building and was not used",
                plan.building.join(", ")
            )
        };
        budget_refusal(format!(
            "query passed its time budget of {time_budget_ms} ms on core {} after examining \
             {examined} entries by {}{building}",
            self.config.shard_id,
            access_text(&plan.access),
        ))
    }

    fn sort_refusal(&self, plan: &Plan<'_>, sort_items_max: usize) -> Response {
        budget_refusal(format!(
            "query matches more than {sort_items_max} entries on core {} to sort (by {}); \
             narrow it, or page through it with a smaller order",
            self.config.shard_id,
            access_text(&plan.access),
        ))
    }

    /// The first page of `matches` in the query's order, and whether more follow it.
    fn sorted_items(
        &self,
        mut matches: Vec<Match<'_>>,
        query: &QueryRequest,
    ) -> (Vec<QueryItem>, bool) {
        matches.sort_unstable_by(|left, right| {
            cursor_cmp(
                &query.order_by,
                &left.sort,
                left.key,
                &right.sort,
                right.key,
            )
        });
        let mut items = Vec::new();
        let mut bytes = 0;
        for found in matches {
            if items.len() == query.limit as usize || bytes >= SCAN_PAGE_BYTES_MAX {
                return (items, true);
            }
            let Some(entry) = self.store.get(found.key) else {
                continue;
            };
            bytes += item_bytes(entry, query.projection);
            let entry_fields = if query.projection == Projection::Fields {
                fields::to_fields(entry.fields())
            } else {
                Vec::new()
            };
            items.push(item(entry, found.sort, entry_fields, query.projection));
        }
        (items, false)
    }
}

/// The first key a query can return: the prefix's first, or in key order with a cursor,
/// the key after the cursor's.
fn first_key(query: &QueryRequest) -> Vec<u8> {
    match &query.after {
        Some(after)
            if query.order_by.is_empty() && after.key.as_slice() >= query.prefix.as_slice() =>
        {
            key_after(&after.key)
        }
        _ => query.prefix.clone(),
    }
}

fn field_value<'a>(fields: &'a [Field], name: &str) -> Option<&'a FieldValue> {
    fields
        .iter()
        .find(|field| field.name == name)
        .map(|field| &field.value)
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

fn item(
    entry: EntryRef<'_>,
    sort: Vec<Option<FieldValue>>,
    entry_fields: Vec<Field>,
    projection: Projection,
) -> QueryItem {
    QueryItem {
        key: entry.key().to_vec(),
        sort,
        fields: if projection == Projection::Fields {
            entry_fields
        } else {
            Vec::new()
        },
        entry: (projection == Projection::Full).then(|| to_entry(entry)),
    }
}
