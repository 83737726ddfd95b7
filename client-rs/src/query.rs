//! Secondary indexes and queries (issue 8), across every shard.
//!
//! Index definitions, index listings and queries are answered by each core for its own
//! shard and never forwarded, so every call here goes to every core of every node, in
//! parallel, like a scan. An index exists cluster-wide because every core was told to create
//! it; a core that refused (or did not answer) makes the call fail with the error, naming
//! that core, and creating again with the same definition is harmless (it changes nothing
//! where the index exists).
//!
//! A query page from one core holds its first `limit` matches after the cursor, in the one
//! order every core uses ([`cursor_cmp`]: the `order_by` fields, then the key). The merge
//! works like the scan's: a core that has more matches than it returned stopped at its last
//! item, so only items up to the smallest such last item are kept (no match a core left out
//! can sort before them), then the first `limit` of those. The last item kept is the cursor
//! the next page continues after ([`QueryResult::cursor`]). Each core reads its page at one
//! revision of its own ([`CorePlan::revision`]); there is no revision common to several.
//!
//! **Invariant:** the items of a [`QueryResult`] are in `cursor_cmp` order, each key at most
//! once, and paging with the cursor until it is `None` returns every match that existed
//! throughout, exactly once.

use std::cmp::Ordering;
use std::sync::Arc;

use futures_util::future::join_all;
use tessera_protocol::codec::check_owned_request;
use tessera_protocol::index::cursor_cmp;
use tessera_protocol::query::parse_query;
use tessera_protocol::{QueryPage, QueryRequest, Request, RequestError, Response};

pub use tessera_protocol::query::QueryError;
pub use tessera_protocol::{
    Field, FieldValue, IndexInfo, IndexKind, IndexSpec, IndexState, OrderBy, Projection, Query,
    QueryAccess, QueryCursor, QueryItem, QueryPlan,
};

use crate::connection::server_error;
use crate::routing::ClusterView;
use crate::transport::Transport;
use crate::{unexpected, Client, ClientError, Result};

/// Items a query returns when [`QueryOptions::limit`] is not given.
pub const QUERY_LIMIT_DEFAULT: u32 = 100;

/// What [`Client::create_index`] or [`Client::drop_index`] did on each core.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexChange {
    /// Every core, in topology order.
    pub cores: Vec<CoreIndexChange>,
}

impl IndexChange {
    /// Whether any core changed: created the index (it was new there) or dropped it (it
    /// existed there).
    #[must_use]
    pub fn is_applied_anywhere(&self) -> bool {
        self.cores.iter().any(|core| core.applied)
    }

    /// Whether every core changed.
    #[must_use]
    pub fn is_applied_everywhere(&self) -> bool {
        self.cores.iter().all(|core| core.applied)
    }
}

/// What one core did with an index definition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CoreIndexChange {
    /// The node.
    pub node_id: u32,
    /// The core (shard) on that node.
    pub core_id: u16,
    /// Create: the index is new on this core (false: it existed with the same definition).
    /// Drop: the index existed on this core and is gone.
    pub applied: bool,
}

/// One index as every core reports it ([`Client::list_indexes`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexStatus {
    /// The definition.
    pub spec: IndexSpec,
    /// The cores that hold it, in topology order.
    pub cores: Vec<CoreIndexStatus>,
    /// The cores that do not hold it, as `(node_id, core_id)`: a create that failed part
    /// way, or a core added since. Creating it again fills them in.
    pub missing: Vec<(u32, u16)>,
    /// Keys filed in it, over every core.
    pub entries: u64,
    /// Bytes it is charged, over every core.
    pub memory_bytes: u64,
}

impl IndexStatus {
    /// Whether every core holds it and every one has finished building it: queries can use
    /// it everywhere.
    #[must_use]
    pub fn is_ready(&self) -> bool {
        self.missing.is_empty()
            && self
                .cores
                .iter()
                .all(|core| core.state == IndexState::Ready)
    }
}

/// One index on one core.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CoreIndexStatus {
    /// The node.
    pub node_id: u32,
    /// The core (shard) on that node.
    pub core_id: u16,
    /// Ready, or building with its progress.
    pub state: IndexState,
    /// Keys filed in it on this core.
    pub entries: u64,
    /// Bytes it is charged on this core.
    pub memory_bytes: u64,
}

/// What a query asks for. Built from [`QueryOptions::new`]: every key, no filter, key order,
/// [`QUERY_LIMIT_DEFAULT`] items, whole entries.
///
/// ```
/// use tessera_client::QueryOptions;
///
/// let options = QueryOptions::new()
///     .prefix("user:")
///     .filter_text(r#"age >= 20 and city = "Oslo""#)?
///     .order_by_descending("age")
///     .limit(10);
/// # Ok::<(), tessera_client::ClientError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueryOptions {
    prefix: Vec<u8>,
    filter: Option<Query>,
    order_by: Vec<OrderBy>,
    limit: u32,
    after: Option<QueryCursor>,
    projection: Projection,
    count_only: bool,
}

impl Default for QueryOptions {
    fn default() -> Self {
        Self {
            prefix: Vec::new(),
            filter: None,
            order_by: Vec::new(),
            limit: QUERY_LIMIT_DEFAULT,
            after: None,
            projection: Projection::Full,
            count_only: false,
        }
    }
}

impl QueryOptions {
    /// Every live entry, in key order, [`QUERY_LIMIT_DEFAULT`] at most, whole.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Only the keys that start with `prefix`. An index is used only if its prefix is a
    /// prefix of this one.
    #[must_use]
    pub fn prefix(mut self, prefix: impl AsRef<[u8]>) -> Self {
        self.prefix = prefix.as_ref().to_vec();
        self
    }

    /// Only the entries whose fields match `filter`.
    #[must_use]
    pub fn filter(mut self, filter: Query) -> Self {
        self.filter = Some(filter);
        self
    }

    /// Only the entries whose fields match `text`, in the syntax of
    /// [`tessera_protocol::query::parse_query`] (`age >= 20 and city = "Oslo"`).
    ///
    /// # Errors
    /// [`ClientError::InvalidRequest`] with [`RequestError::BadQuery`]: the text does not
    /// parse (the error says at which byte and why) or breaks a limit of queries.
    pub fn filter_text(self, text: &str) -> Result<Self> {
        let filter = parse_query(text).map_err(RequestError::BadQuery)?;
        Ok(self.filter(filter))
    }

    /// Then by `field`, smallest first (entries without it last). Repeatable, at most
    /// `QUERY_ORDER_BY_MAX` fields; the key breaks ties.
    #[must_use]
    pub fn order_by(mut self, field: impl Into<String>) -> Self {
        self.order_by.push(OrderBy {
            field: field.into(),
            descending: false,
        });
        self
    }

    /// Then by `field`, largest first (entries without it still last).
    #[must_use]
    pub fn order_by_descending(mut self, field: impl Into<String>) -> Self {
        self.order_by.push(OrderBy {
            field: field.into(),
            descending: true,
        });
        self
    }

    /// At most `limit` items, `1..=QUERY_LIMIT_MAX` (ignored with [`QueryOptions::count_only`]).
    #[must_use]
    pub fn limit(mut self, limit: u32) -> Self {
        self.limit = limit;
        self
    }

    /// Continue right after `cursor`: the [`QueryResult::cursor`] of the previous page of
    /// the same query (the same prefix, filter and order).
    #[must_use]
    pub fn after(mut self, cursor: QueryCursor) -> Self {
        self.after = Some(cursor);
        self
    }

    /// What to return of each match (default [`Projection::Full`]).
    #[must_use]
    pub fn projection(mut self, projection: Projection) -> Self {
        self.projection = projection;
        self
    }

    /// Return keys only ([`Projection::KeysOnly`]).
    #[must_use]
    pub fn keys_only(self) -> Self {
        self.projection(Projection::KeysOnly)
    }

    /// Return keys and fields, without values ([`Projection::Fields`]).
    #[must_use]
    pub fn fields_only(self) -> Self {
        self.projection(Projection::Fields)
    }

    /// Return no items, only how many entries match ([`QueryResult::count`]), counted by
    /// every core. The cursor is not sent: every match counts.
    #[must_use]
    pub fn count_only(mut self) -> Self {
        self.count_only = true;
        self
    }

    /// The order asked for.
    #[must_use]
    pub fn order(&self) -> &[OrderBy] {
        &self.order_by
    }

    /// The request every core is sent.
    #[must_use]
    pub fn to_request(&self) -> QueryRequest {
        QueryRequest {
            prefix: self.prefix.clone(),
            filter: self.filter.clone(),
            order_by: self.order_by.clone(),
            limit: self.limit,
            after: if self.count_only {
                None
            } else {
                self.after.clone()
            },
            projection: self.projection,
            count_only: self.count_only,
        }
    }
}

/// What one core did to answer a query (`explain`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CorePlan {
    /// The node.
    pub node_id: u32,
    /// The core (shard) on that node.
    pub core_id: u16,
    /// The shard's revision its page was read at.
    pub revision: u64,
    /// Index or scan, entries examined and matched, indexes still building.
    pub plan: QueryPlan,
}

/// One page of a query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueryResult {
    /// The matches, in the query's order across every core (none with `count_only`).
    pub items: Vec<QueryItem>,
    /// With `count_only`, the entries that match on every core together; otherwise
    /// `items.len()`.
    pub count: u64,
    /// Every core's plan, in topology order.
    pub plans: Vec<CorePlan>,
    /// Where the next page starts, if there are more matches: pass it to
    /// [`QueryOptions::after`]. `None` once every match was returned.
    pub cursor: Option<QueryCursor>,
}

impl QueryResult {
    /// Whether more matches follow the last item.
    #[must_use]
    pub fn has_more(&self) -> bool {
        self.cursor.is_some()
    }
}

impl Client {
    /// Defines an index on every core of every node: `spec.name` files the keys starting
    /// with `spec.prefix` by their field `spec.field`. A core that holds keys under the
    /// prefix builds it in the background; until it is done ([`Client::list_indexes`]),
    /// queries there do not use it.
    ///
    /// ```no_run
    /// # async fn example(client: &tessera_client::Client) -> tessera_client::Result<()> {
    /// use tessera_client::{IndexKind, IndexSpec};
    ///
    /// let change = client
    ///     .create_index(&IndexSpec::new("user_age", "user:", "age", IndexKind::Range))
    ///     .await?;
    /// println!("new on some core: {}", change.is_applied_anywhere());
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`ClientError::InvalidRequest`] for a name, prefix or field out of bounds; the error
    /// of the first core that refused (another definition holds the name: `invalid_argument`;
    /// a limit of indexes: `table_full`), its message naming the node and core. Other cores
    /// may have created it; creating it again with the same definition is safe.
    pub async fn create_index(&self, spec: &IndexSpec) -> Result<IndexChange> {
        let request = Request::CreateIndex(Box::new(spec.clone()));
        check_owned_request(&request)?;
        let answers = self.call_every_core(&request).await?;
        let cores = answers
            .into_iter()
            .map(|(node_id, core_id, response)| match response {
                Response::IndexCreated { created } => Ok(CoreIndexChange {
                    node_id,
                    core_id,
                    applied: created,
                }),
                other => Err(unexpected(&other)),
            })
            .collect::<Result<_>>()?;
        Ok(IndexChange { cores })
    }

    /// Removes the index `name` from every core; queries that used it scan instead.
    ///
    /// # Errors
    /// [`ClientError::InvalidRequest`] for a name out of bounds, or the first core's error.
    pub async fn drop_index(&self, name: &str) -> Result<IndexChange> {
        let request = Request::DropIndex {
            name: name.to_owned(),
        };
        check_owned_request(&request)?;
        let answers = self.call_every_core(&request).await?;
        let cores = answers
            .into_iter()
            .map(|(node_id, core_id, response)| match response {
                Response::IndexDropped { dropped } => Ok(CoreIndexChange {
                    node_id,
                    core_id,
                    applied: dropped,
                }),
                other => Err(unexpected(&other)),
            })
            .collect::<Result<_>>()?;
        Ok(IndexChange { cores })
    }

    /// Every index, as every core reports it, by name: the definition, each core's state
    /// (ready, or building with its progress), the cores that lack it, and the totals.
    ///
    /// # Errors
    /// The first core that does not answer.
    pub async fn list_indexes(&self) -> Result<Vec<IndexStatus>> {
        let answers = self.call_every_core(&Request::ListIndexes).await?;
        let mut per_core = Vec::with_capacity(answers.len());
        for (node_id, core_id, response) in answers {
            match response {
                Response::Indexes(infos) => per_core.push((node_id, core_id, infos)),
                other => return Err(unexpected(&other)),
            }
        }
        Ok(merge_indexes(per_core))
    }

    /// The first `options.limit` entries that match, in the query's order across every
    /// core, with each core's plan and the cursor of the next page; or, with
    /// [`QueryOptions::count_only`], how many match.
    ///
    /// ```no_run
    /// # async fn example(client: &tessera_client::Client) -> tessera_client::Result<()> {
    /// use tessera_client::QueryOptions;
    ///
    /// let mut options = QueryOptions::new().prefix("user:").filter_text("age >= 20")?;
    /// loop {
    ///     let page = client.query(&options).await?;
    ///     for item in &page.items {
    ///         println!("{}", String::from_utf8_lossy(&item.key));
    ///     }
    ///     match page.cursor {
    ///         Some(cursor) => options = options.after(cursor),
    ///         None => break,
    ///     }
    /// }
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`ClientError::InvalidRequest`] for options out of bounds (a limit outside
    /// `1..=QUERY_LIMIT_MAX`, too many `order_by` fields, a cursor of another order); the
    /// first core's error, naming it: `budget_exceeded` when a core passed its time budget
    /// or had more matches to sort than it keeps (narrow the query, or index a field it
    /// requires).
    pub async fn query(&self, options: &QueryOptions) -> Result<QueryResult> {
        let query = options.to_request();
        let limit = query.limit as usize;
        let count_only = query.count_only;
        let request = Request::Query(Box::new(query));
        check_owned_request(&request)?;
        let answers = self.call_every_core(&request).await?;
        let mut pages = Vec::with_capacity(answers.len());
        for (_, _, response) in answers {
            match response {
                Response::Query(page) => pages.push(*page),
                other => return Err(unexpected(&other)),
            }
        }
        if count_only {
            return Ok(count_pages(&pages));
        }
        merge_pages(&options.order_by, pages, limit)
    }

    /// Sends `request` to every core of every node in parallel; each answer with the node
    /// and core that gave it, in topology order.
    ///
    /// # Errors
    /// The first core (in topology order) that failed: a server refusal names the node and
    /// core in its message; a transport error names the address.
    async fn call_every_core(&self, request: &Request) -> Result<Vec<(u32, u16, Response)>> {
        let view = self.view();
        let calls = every_core(&view)
            .into_iter()
            .map(|(node_id, core_id, transport)| async move {
                match transport.call(request).await {
                    Ok(Response::Error(reply)) => Err(on_core(
                        node_id,
                        core_id,
                        server_error(reply.code, reply.message),
                    )),
                    Ok(response) => Ok((node_id, core_id, response)),
                    Err(error) => Err(on_core(node_id, core_id, error)),
                }
            });
        join_all(calls).await.into_iter().collect()
    }
}

/// Every core of `view` with its node id, core id and transport, in topology order.
fn every_core(view: &ClusterView) -> Vec<(u32, u16, Arc<Transport>)> {
    view.topology
        .nodes
        .iter()
        .zip(&view.transports)
        .flat_map(|(node, transports)| {
            node.cores
                .iter()
                .zip(transports)
                .map(move |(core, transport)| (node.node_id, core.core_id, transport.clone()))
        })
        .collect()
}

/// `error` from one core of a fan-out, its message naming the core when the server refused
/// (transport errors name the core's address already).
fn on_core(node_id: u32, core_id: u16, error: ClientError) -> ClientError {
    match error {
        ClientError::Server { code, message } => ClientError::Server {
            code,
            message: format!("node {node_id} core {core_id}: {message}"),
        },
        other => other,
    }
}

/// Merges every core's indexes by definition, in name order.
fn merge_indexes(per_core: Vec<(u32, u16, Vec<IndexInfo>)>) -> Vec<IndexStatus> {
    let all_cores: Vec<(u32, u16)> = per_core
        .iter()
        .map(|(node_id, core_id, _)| (*node_id, *core_id))
        .collect();
    let mut merged: Vec<IndexStatus> = Vec::new();
    for (node_id, core_id, infos) in per_core {
        for info in infos {
            let core = CoreIndexStatus {
                node_id,
                core_id,
                state: info.state,
                entries: info.entries,
                memory_bytes: info.memory_bytes,
            };
            // Two definitions under one name (a create that raced another) stay apart, each
            // missing where the other is.
            match merged.iter_mut().find(|status| status.spec == info.spec) {
                Some(status) => {
                    status.entries += info.entries;
                    status.memory_bytes += info.memory_bytes;
                    status.cores.push(core);
                }
                None => merged.push(IndexStatus {
                    spec: info.spec,
                    cores: vec![core],
                    missing: Vec::new(),
                    entries: info.entries,
                    memory_bytes: info.memory_bytes,
                }),
            }
        }
    }
    for status in &mut merged {
        status.missing = all_cores
            .iter()
            .copied()
            .filter(|&(node_id, core_id)| {
                !status
                    .cores
                    .iter()
                    .any(|core| core.node_id == node_id && core.core_id == core_id)
            })
            .collect();
    }
    // Stable: definitions sharing a name keep the order the cores reported them in.
    merged.sort_by(|left, right| left.spec.name.cmp(&right.spec.name));
    merged
}

fn core_plan(page: &QueryPage) -> CorePlan {
    CorePlan {
        node_id: page.node_id,
        core_id: page.core_id,
        revision: page.revision,
        plan: page.plan.clone(),
    }
}

/// The total of every core's count.
fn count_pages(pages: &[QueryPage]) -> QueryResult {
    QueryResult {
        items: Vec::new(),
        count: pages.iter().map(|page| page.count).sum(),
        plans: pages.iter().map(core_plan).collect(),
        cursor: None,
    }
}

/// How two items compare in the query's order.
fn item_cmp(order_by: &[OrderBy], left: &QueryItem, right: &QueryItem) -> Ordering {
    cursor_cmp(order_by, &left.sort, &left.key, &right.sort, &right.key)
}

/// Merges every core's page into the first `limit` matches and the cursor after them.
///
/// # Errors
/// [`ClientError::UnexpectedReply`] for a page out of order, or one that has more matches
/// but returned none (it would leave the merge no place to stop).
fn merge_pages(order_by: &[OrderBy], pages: Vec<QueryPage>, limit: usize) -> Result<QueryResult> {
    let plans = pages.iter().map(core_plan).collect();
    for page in &pages {
        let is_sorted = page
            .items
            .windows(2)
            .all(|pair| item_cmp(order_by, &pair[0], &pair[1]) == Ordering::Less);
        if !is_sorted {
            return Err(ClientError::UnexpectedReply(format!(
                "node {} core {} answered a query page out of order",
                page.node_id, page.core_id
            )));
        }
        if page.more && page.items.is_empty() {
            return Err(ClientError::UnexpectedReply(format!(
                "node {} core {} has more matches but returned none",
                page.node_id, page.core_id
            )));
        }
    }
    // Past the smallest item at which a core with more matches stopped, that core's matches
    // are missing from the merge: keep nothing beyond it.
    let cutoff: Option<QueryItem> = pages
        .iter()
        .filter(|page| page.more)
        .filter_map(|page| page.items.last())
        .min_by(|left, right| item_cmp(order_by, left, right))
        .cloned();
    let mut more = pages.iter().any(|page| page.more);
    let mut items: Vec<QueryItem> = pages.into_iter().flat_map(|page| page.items).collect();
    // A key lives on one shard only, so no two items are equal.
    items.sort_by(|left, right| item_cmp(order_by, left, right));
    if let Some(cutoff) = &cutoff {
        let kept = items.partition_point(|item| item_cmp(order_by, item, cutoff).is_le());
        items.truncate(kept);
    }
    if items.len() > limit {
        items.truncate(limit);
        more = true;
    }
    let cursor = if more {
        items.last().map(QueryItem::cursor)
    } else {
        None
    };
    Ok(QueryResult {
        count: items.len() as u64,
        items,
        plans,
        cursor,
    })
}

#[cfg(test)]
mod tests {
    use tessera_protocol::QueryAccess;

    use super::*;

    fn plan() -> QueryPlan {
        QueryPlan {
            access: QueryAccess::Scan,
            examined: 0,
            matched: 0,
            building: Vec::new(),
            sorted: false,
        }
    }

    /// A page of `core_id` holding `items` as (key, age), in the order given.
    fn page(core_id: u16, items: &[(&str, Option<i64>)], more: bool, by_age: bool) -> QueryPage {
        QueryPage {
            node_id: 1,
            core_id,
            revision: u64::from(core_id) * 10,
            items: items
                .iter()
                .map(|(key, age)| QueryItem {
                    key: key.as_bytes().to_vec(),
                    sort: if by_age {
                        vec![age.map(FieldValue::I64)]
                    } else {
                        Vec::new()
                    },
                    fields: Vec::new(),
                    entry: None,
                })
                .collect(),
            count: items.len() as u64,
            more,
            plan: plan(),
        }
    }

    fn keys(result: &QueryResult) -> Vec<String> {
        result
            .items
            .iter()
            .map(|item| String::from_utf8(item.key.clone()).unwrap())
            .collect()
    }

    fn age(descending: bool) -> Vec<OrderBy> {
        vec![OrderBy {
            field: "age".to_owned(),
            descending,
        }]
    }

    #[test]
    fn pages_merge_in_key_order_and_continue_after_the_last_item() {
        let pages = vec![
            page(0, &[("k1", None), ("k4", None), ("k5", None)], true, false),
            page(1, &[("k2", None), ("k3", None)], false, false),
        ];
        let result = merge_pages(&[], pages, 3).unwrap();
        assert_eq!(keys(&result), ["k1", "k2", "k3"]);
        assert_eq!(result.count, 3);
        let cursor = result.cursor.unwrap();
        assert_eq!(cursor.key, b"k3");
        assert!(cursor.sort.is_empty());
        assert_eq!(result.plans.len(), 2);
        assert_eq!(result.plans[1].revision, 10);
    }

    /// A core whose page ended early holds matches past its last item that the other
    /// pages may already pass: the merge stops at that core's last item.
    #[test]
    fn a_short_page_with_more_cuts_the_merge() {
        let pages = vec![
            page(0, &[("b", Some(20)), ("d", Some(40))], true, true),
            page(
                1,
                &[("a", Some(10)), ("c", Some(30)), ("e", Some(50))],
                true,
                true,
            ),
        ];
        let result = merge_pages(&age(false), pages, 4).unwrap();
        assert_eq!(keys(&result), ["a", "b", "c", "d"]);
        let cursor = result.cursor.unwrap();
        assert_eq!(cursor.key, b"d");
        assert_eq!(cursor.sort, vec![Some(FieldValue::I64(40))]);
    }

    #[test]
    fn descending_order_merges_across_cores_with_missing_values_last() {
        let pages = vec![
            page(
                0,
                &[("x", Some(50)), ("y", Some(20)), ("m", None)],
                false,
                true,
            ),
            page(1, &[("w", Some(40)), ("a", None), ("z", None)], false, true),
        ];
        let result = merge_pages(&age(true), pages, 10).unwrap();
        assert_eq!(keys(&result), ["x", "w", "y", "a", "m", "z"]);
        assert_eq!(result.cursor, None, "every core returned everything");
    }

    #[test]
    fn the_limit_cuts_and_leaves_a_cursor_though_no_core_has_more() {
        let pages = vec![
            page(0, &[("a", Some(1)), ("c", Some(3))], false, true),
            page(1, &[("b", Some(2)), ("d", Some(4))], false, true),
        ];
        let result = merge_pages(&age(false), pages, 3).unwrap();
        assert_eq!(keys(&result), ["a", "b", "c"]);
        assert_eq!(result.cursor.unwrap().key, b"c");
    }

    #[test]
    fn a_query_read_to_its_end_has_no_cursor() {
        let pages = vec![
            page(0, &[("a", None)], false, false),
            page(1, &[], false, false),
        ];
        let result = merge_pages(&[], pages, 5).unwrap();
        assert_eq!(keys(&result), ["a"]);
        assert_eq!(result.cursor, None);
        assert!(!result.has_more());
    }

    #[test]
    fn pages_a_server_should_never_send_are_errors() {
        let unordered = vec![page(0, &[("b", None), ("a", None)], false, false)];
        assert!(matches!(
            merge_pages(&[], unordered, 5),
            Err(ClientError::UnexpectedReply(_))
        ));
        let stuck = vec![page(0, &[], true, false)];
        assert!(matches!(
            merge_pages(&[], stuck, 5),
            Err(ClientError::UnexpectedReply(_))
        ));
    }

    #[test]
    fn counts_add_up_over_cores() {
        let mut first = page(0, &[], false, false);
        first.count = 7;
        let mut second = page(1, &[], false, false);
        second.count = 5;
        let result = count_pages(&[first, second]);
        assert_eq!(result.count, 12);
        assert!(result.items.is_empty());
        assert_eq!(result.plans.len(), 2);
    }

    #[test]
    fn indexes_merge_by_definition_and_name_the_cores_that_lack_one() {
        let age = IndexSpec::new("age", "user:", "age", IndexKind::Range);
        let city = IndexSpec::new("city", "user:", "city", IndexKind::Equality);
        let info = |spec: &IndexSpec, state, entries| IndexInfo {
            spec: spec.clone(),
            state,
            entries,
            memory_bytes: entries * 10,
        };
        let building = IndexState::Building {
            keys_done: 3,
            keys_total: 9,
        };
        let merged = merge_indexes(vec![
            (
                1,
                0,
                vec![
                    info(&city, IndexState::Ready, 4),
                    info(&age, IndexState::Ready, 5),
                ],
            ),
            (1, 1, vec![info(&age, building, 2)]),
        ]);
        assert_eq!(merged.len(), 2);
        assert_eq!(merged[0].spec, age);
        assert_eq!(merged[0].entries, 7);
        assert_eq!(merged[0].memory_bytes, 70);
        assert_eq!(merged[0].cores[1].state, building);
        assert!(merged[0].missing.is_empty());
        assert!(!merged[0].is_ready(), "core 1 is building");
        assert_eq!(merged[1].spec, city);
        assert_eq!(merged[1].missing, [(1, 1)]);
        assert!(!merged[1].is_ready(), "core 1 lacks it");
    }

    #[test]
    fn options_build_the_request() {
        let options = QueryOptions::new()
            .prefix("user:")
            .filter_text("age >= 20")
            .unwrap()
            .order_by("city")
            .order_by_descending("age")
            .limit(7)
            .keys_only()
            .after(QueryCursor {
                sort: vec![None, None],
                key: b"user:9".to_vec(),
            });
        let request = options.to_request();
        assert_eq!(request.prefix, b"user:");
        assert_eq!(request.limit, 7);
        assert_eq!(request.projection, Projection::KeysOnly);
        assert_eq!(request.order_by.len(), 2);
        assert!(request.order_by[1].descending);
        assert!(request.after.is_some());
        // A count counts every match.
        assert_eq!(options.count_only().to_request().after, None);
        match QueryOptions::new().filter_text("age >") {
            Err(ClientError::InvalidRequest(RequestError::BadQuery(QueryError::Syntax {
                position,
                ..
            }))) => assert_eq!(position, 5),
            other => panic!("expected a syntax error, got {other:?}"),
        }
    }
}
