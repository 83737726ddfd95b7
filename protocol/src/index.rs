//! The messages of secondary indexes and queries (issue 8): index definitions and their
//! state, the [`QueryRequest`] one core answers with a [`QueryPage`], and how the planner
//! reports what it did ([`QueryPlan`]). Like `message`, every change here is a wire change
//! (`docs/protocol.md`, `docs/query.md`).
//!
//! A query is answered by every core for its own keys, in one order: by the `order_by`
//! fields ([`crate::query::sort_value_cmp`], each ascending or descending), then by key. The
//! client merges the pages in that order; [`QueryCursor`] names the position a page ended
//! at, so the next page starts right after it on every core.

// The rkyv derive generates resolver and archived types for struct-like enum variants whose
// fields carry no docs; every type written here is documented.
#![allow(missing_docs)]

use std::cmp::Ordering;

use crate::message::Entry;
use crate::query::{sort_value_cmp, Field, FieldValue, Query};

/// How an index finds entries.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize,
)]
#[rkyv(derive(Debug, Clone, Copy, PartialEq, Eq))]
pub enum IndexKind {
    /// Exact values (`=`, `in`), by hash.
    Equality,
    /// Ordered values (`<`, `>=`, `between`, `prefix` on strings, and `=` and `in` too).
    Range,
}

impl IndexKind {
    /// `eq` or `range`, as the CLI and JSON write it.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Equality => "eq",
            Self::Range => "range",
        }
    }
}

/// An index definition: which keys it covers (those starting with `prefix`) and which field
/// of their entries it files them by.
#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
#[rkyv(derive(Debug))]
pub struct IndexSpec {
    /// Names the index (1..=`INDEX_NAME_SIZE_MAX` bytes), unique on a shard.
    pub name: String,
    /// The keys it covers; empty for every key.
    pub prefix: Vec<u8>,
    /// The field it files them by.
    pub field: String,
    /// Equality or range.
    pub kind: IndexKind,
}

impl IndexSpec {
    /// The index `name` of the keys starting with `prefix`, filed by their `field`.
    ///
    /// ```
    /// use tessera_protocol::{IndexKind, IndexSpec};
    ///
    /// let spec = IndexSpec::new("user_age", "user:", "age", IndexKind::Range);
    /// assert_eq!(spec.prefix, b"user:");
    /// ```
    #[must_use]
    pub fn new(
        name: impl Into<String>,
        prefix: impl Into<Vec<u8>>,
        field: impl Into<String>,
        kind: IndexKind,
    ) -> Self {
        Self {
            name: name.into(),
            prefix: prefix.into(),
            field: field.into(),
            kind,
        }
    }
}

/// Whether an index can answer queries yet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
#[rkyv(derive(Debug, Clone, Copy, PartialEq, Eq))]
pub enum IndexState {
    /// Filing the keys that existed when it was created, a bounded slice at a time; queries
    /// do not use it yet (their plan names it in [`QueryPlan::building`]).
    Building {
        /// Keys looked at so far.
        keys_done: u64,
        /// Keys the shard held when the build started.
        keys_total: u64,
    },
    /// Complete, and kept in step with every write.
    Ready,
}

/// One index of one shard ([`crate::Response::Indexes`]).
#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
#[rkyv(derive(Debug))]
pub struct IndexInfo {
    /// The definition.
    pub spec: IndexSpec,
    /// Building or ready.
    pub state: IndexState,
    /// Keys filed in it on this shard.
    pub entries: u64,
    /// Bytes it is charged on this shard.
    pub memory_bytes: u64,
}

/// One key of a query's order: a field, ascending or descending.
#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
#[rkyv(derive(Debug))]
pub struct OrderBy {
    /// The field.
    pub field: String,
    /// Largest first.
    pub descending: bool,
}

/// What a query returns of each entry it matches.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize,
)]
#[rkyv(derive(Debug, Clone, Copy, PartialEq, Eq))]
pub enum Projection {
    /// The key only.
    KeysOnly,
    /// The key and the entry's fields.
    Fields,
    /// The key and the whole entry (value, revisions, expiry, fields).
    #[default]
    Full,
}

/// Where a query page ended: the order's values and the key of its last item. The next page
/// starts right after it.
#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
#[rkyv(derive(Debug))]
pub struct QueryCursor {
    /// The last item's value of each `order_by` field (`None`: it has none).
    pub sort: Vec<Option<FieldValue>>,
    /// The last item's key.
    pub key: Vec<u8>,
}

/// The arguments of [`crate::Request::Query`]: the live entries under `prefix` whose fields
/// match `filter`.
#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
#[rkyv(derive(Debug))]
pub struct QueryRequest {
    /// The keys looked at; empty for every key.
    pub prefix: Vec<u8>,
    /// The predicate; `None` matches every entry under `prefix`.
    pub filter: Option<Query>,
    /// The order (at most `QUERY_ORDER_BY_MAX` fields), then the key; empty for key order.
    pub order_by: Vec<OrderBy>,
    /// Most items to return, `1..=QUERY_LIMIT_MAX` (ignored with `count_only`).
    pub limit: u32,
    /// Continue after this position (a previous page's last item).
    pub after: Option<QueryCursor>,
    /// What to return of each match.
    pub projection: Projection,
    /// Return no items, only how many entries match (after the cursor, if there is one).
    pub count_only: bool,
}

impl QueryRequest {
    /// The first `limit` entries under `prefix` that match `filter`, in key order, whole.
    #[must_use]
    pub fn new(prefix: impl Into<Vec<u8>>, filter: Option<Query>, limit: u32) -> Self {
        Self {
            prefix: prefix.into(),
            filter,
            order_by: Vec::new(),
            limit,
            after: None,
            projection: Projection::Full,
            count_only: false,
        }
    }
}

/// How a core found a query's candidates.
#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
#[rkyv(derive(Debug))]
pub enum QueryAccess {
    /// Through an index: the keys it files under the values a comparison of the filter
    /// admits; each is then checked against the whole filter.
    Index {
        /// The index.
        name: String,
        /// Its field.
        field: String,
        /// What it was asked: `= v`, `in (..)`, a range, a prefix.
        lookup: String,
    },
    /// Every key under the prefix, in key order.
    Scan,
}

/// What a core did to answer a query (`explain`).
#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
#[rkyv(derive(Debug))]
pub struct QueryPlan {
    /// Index or scan.
    pub access: QueryAccess,
    /// Entries looked at (candidates read and checked against the filter).
    pub examined: u64,
    /// Entries that matched after the cursor (before the limit).
    pub matched: u64,
    /// Indexes that would fit the query but are still building, so were not used.
    pub building: Vec<String>,
    /// Whether the core sorted its matches (an `order_by` no index provides).
    pub sorted: bool,
}

/// One matched entry.
#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
#[rkyv(derive(Debug))]
pub struct QueryItem {
    /// The key.
    pub key: Vec<u8>,
    /// Its value of each `order_by` field, in order (empty without `order_by`).
    pub sort: Vec<Option<FieldValue>>,
    /// Its fields, for [`Projection::Fields`] (for `Full` they are in `entry`).
    pub fields: Vec<Field>,
    /// Its entry, for [`Projection::Full`].
    pub entry: Option<Entry>,
}

impl QueryItem {
    /// The position of this item, to continue after it.
    #[must_use]
    pub fn cursor(&self) -> QueryCursor {
        QueryCursor {
            sort: self.sort.clone(),
            key: self.key.clone(),
        }
    }
}

/// One core's answer to a query, read at one revision.
#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
#[rkyv(derive(Debug))]
pub struct QueryPage {
    /// The answering node.
    pub node_id: u32,
    /// The answering core (its shard).
    pub core_id: u16,
    /// The shard's revision the page was read at.
    pub revision: u64,
    /// The matches, in the query's order (none for `count_only`).
    pub items: Vec<QueryItem>,
    /// For `count_only`, the entries that match; otherwise `items.len()`.
    pub count: u64,
    /// Whether the shard holds more matches after the last item.
    pub more: bool,
    /// What the core did.
    pub plan: QueryPlan,
}

/// How two positions compare in the order of `order_by` (then by key): the order every
/// core returns its matches in and the client merges them in.
#[must_use]
pub fn cursor_cmp(
    order_by: &[OrderBy],
    left_sort: &[Option<FieldValue>],
    left_key: &[u8],
    right_sort: &[Option<FieldValue>],
    right_key: &[u8],
) -> Ordering {
    for (index, order) in order_by.iter().enumerate() {
        let left = left_sort.get(index).and_then(Option::as_ref);
        let right = right_sort.get(index).and_then(Option::as_ref);
        let ordering = sort_value_cmp(left, right);
        // Entries without the field sort last in either direction.
        let ordering = if order.descending && left.is_some() && right.is_some() {
            ordering.reverse()
        } else {
            ordering
        };
        if ordering != Ordering::Equal {
            return ordering;
        }
    }
    left_key.cmp(right_key)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order(field: &str, descending: bool) -> OrderBy {
        OrderBy {
            field: field.to_owned(),
            descending,
        }
    }

    #[test]
    fn positions_order_by_fields_then_key() {
        let by_age = [order("age", false)];
        let twenty = [Some(FieldValue::I64(20))];
        let thirty = [Some(FieldValue::I64(30))];
        let none = [None];
        assert_eq!(
            cursor_cmp(&by_age, &twenty, b"b", &thirty, b"a"),
            Ordering::Less
        );
        assert_eq!(
            cursor_cmp(&by_age, &twenty, b"a", &twenty, b"b"),
            Ordering::Less
        );
        // Missing values sort last, ascending or not.
        assert_eq!(
            cursor_cmp(&by_age, &thirty, b"z", &none, b"a"),
            Ordering::Less
        );
        let by_age_descending = [order("age", true)];
        assert_eq!(
            cursor_cmp(&by_age_descending, &twenty, b"a", &thirty, b"b"),
            Ordering::Greater
        );
        assert_eq!(
            cursor_cmp(&by_age_descending, &twenty, b"a", &none, b"b"),
            Ordering::Less
        );
        // Without an order, keys alone.
        assert_eq!(cursor_cmp(&[], &[], b"a", &[], b"b"), Ordering::Less);
    }
}
