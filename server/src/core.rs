//! One core's runtime state and the decisions made for every request that reaches it:
//! answer here, forward to the owning core of this node, refuse with `WrongShard` for a key
//! another node owns, or split a batch whose keys live on several cores.
//!
//! **Architecture Invariant:** a key is only ever touched by the shard the route table names.
//! Requests for another core of this node cross over through that core's [`Inbox`]; the shard
//! itself is reachable only from its own thread (`Rc<RefCell<Shard>>`, never shared).
//!
//! Forwarding is the slow path for simple clients; the smart client routes to the owner and
//! never needs it (a cross-core round trip costs tens of microseconds on this runtime).

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_channel::oneshot;
use tessera_protocol::codec::{self, FrameBuffer};
use tessera_protocol::index::ArchivedQueryRequest;
use tessera_protocol::message::{ArchivedRequest, ArchivedTxn};
use tessera_protocol::query::ArchivedField;
use tessera_protocol::QueryRequest;
use tessera_protocol::{
    CoreStats, ErrorCode, ErrorReply, PutEntry, Request, Response, RouteTable, ShardLocation,
    ShardStamp, Slot, Topology, WrongShard, PROTOCOL_VERSION,
};

use crate::config::Config;
use crate::durability::log::CoreLog;
use crate::inbox::{Inbox, PushError};
use crate::runtime::LocalNotify;
use crate::runtime::LocalSignal;
use crate::shard::lock::LockEvent;
use crate::shard::{LockStep, Shard};
use crate::watch_stream::{self, EncodedBatch, SinkSet, WatchSink};

/// Work handed to a core from another thread: an archived request body and where to send
/// the archived response body.
#[derive(Debug)]
pub struct CoreRequest {
    /// The archived request, validated again on arrival.
    pub body: FrameBuffer,
    /// Receives the archived response. Dropped unanswered only if the core dies.
    pub reply: oneshot::Sender<FrameBuffer>,
    /// For a `Watch` from an in-process client: where the watch's messages go after the
    /// reply.
    pub stream: Option<WatchSink>,
}

/// What one core asks of another.
#[derive(Debug)]
pub enum CoreMessage {
    /// A request to answer.
    Request(CoreRequest),
    /// Whether a lease homed on the receiving core lives (for a put on the sender's shard
    /// attaching a key to it).
    LeaseCheck {
        /// The lease.
        lease: u64,
        /// Receives the answer.
        reply: oneshot::Sender<bool>,
    },
    /// A lease homed on the sender ended: delete the keys attached to it.
    LeaseEnded {
        /// The lease.
        lease: u64,
        /// Whether it expired (else it was revoked).
        expired: bool,
        /// Told once the keys are deleted (and durable in `sync` mode), for a revoke that
        /// answers only when every shard is done.
        done: Option<oneshot::Sender<()>>,
    },
    /// The admin endpoint's scrape: answer a snapshot of the core's metrics. At most one per
    /// core is in flight (the admin thread sends no other until this one is answered).
    Metrics {
        /// Receives the snapshot; the scrape may have given up on it already.
        reply: std::sync::mpsc::Sender<crate::metrics::CoreSnapshot>,
    },
}

impl From<CoreRequest> for CoreMessage {
    fn from(request: CoreRequest) -> Self {
        Self::Request(request)
    }
}

/// Every core's inbox on this node, indexed by core id.
pub type CoreInboxes = Arc<[Arc<Inbox<CoreMessage>>]>;

/// Where a request must be executed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// On this core.
    Here,
    /// On another core of this node.
    Core(u16),
    /// On another node: the client must be told `WrongShard`.
    Elsewhere(ShardLocation, Slot),
    /// A batch whose keys live on several cores of this node.
    Split,
    /// On this core, once the given core (the home of the lease a put attaches its key to)
    /// said the lease lives.
    AfterLeaseCheck(u16),
    /// A revoke of a lease homed here: answered once every core deleted its keys.
    Revoke,
    /// A lock request of this shard: answered when granted or when its wait ends.
    Lock,
}

/// A reply that will arrive from other cores.
pub type PendingReply = Pin<Box<dyn Future<Output = Reply>>>;

/// A reply ready to be framed: either an archived body computed elsewhere or a response.
#[derive(Debug)]
pub enum Reply {
    /// An archived response body, from another core.
    Body(FrameBuffer),
    /// A response computed here.
    Response(Response),
}

/// One core's state, owned by that core's thread.
#[derive(Debug)]
pub struct CoreContext {
    /// This node's id.
    pub node_id: u32,
    /// This node's index in `topology.nodes`.
    pub node_index: u16,
    /// Every node's health as this node's failure detector sees it (read for handshakes).
    pub health: Arc<crate::cluster::heartbeat::ClusterHealth>,
    /// This core's id within the node.
    pub core_id: u16,
    /// The cluster topology, immutable for the life of the process.
    pub topology: Arc<Topology>,
    /// This core's own copy of the slot route table.
    pub routes: RouteTable,
    /// This core's shard. Borrowed only in synchronous code, never across an await.
    pub shard: RefCell<Shard>,
    /// Every core's inbox on this node.
    pub inboxes: CoreInboxes,
    /// Settings and limits.
    pub config: Arc<Config>,
    /// Open connections across all cores (the server-wide limit is checked at accept).
    pub connection_count: Arc<AtomicUsize>,
    /// Fired when this core must stop: stop accepting, answer what was read, close.
    pub stop: LocalSignal,
    /// Fired when a graceful stop has taken longer than `shutdown_timeout_ms`: connections
    /// abandon writes to clients that do not read and close at once.
    pub abort: LocalSignal,
    /// The core's write-ahead log; `None` with durability `memory`.
    pub log: Option<Rc<CoreLog>>,
    /// Who serves the shard's watchers, and when to wake them.
    pub watch: WatchDelivery,
    /// Lock requests waiting in line, by waiter id: the lock's name and where the answer
    /// goes. Bounded by the shard's `LockLimits::waiters_max`.
    pub lock_waiters: RefCell<ahash::AHashMap<u64, LockWaiter>>,
    /// What the core counts for `/metrics`: plain counters on the core's own thread.
    pub metrics: RefCell<crate::metrics::CoreMetrics>,
    /// Whether a task is filing keys for an index being built ([`build_indexes`]).
    pub index_build_running: std::cell::Cell<bool>,
}

/// A lock request waiting in line: the lock's name and where its answer goes.
pub type LockWaiter = (Box<[u8]>, oneshot::Sender<Response>);

/// How a core's watchers reach their streams: connections pump their own watches when the
/// connection task wakes; in-process streams are pumped by their own task.
#[derive(Debug)]
pub struct WatchDelivery {
    /// Wakes the connection task: a connection was handed over, or watchers have events.
    pub wake_connections: LocalNotify,
    /// Wakes the in-process watch streams' pump.
    pub wake_sinks: LocalNotify,
    /// The in-process (embedded mode) watch streams.
    pub sinks: RefCell<SinkSet>,
    /// The hub's publish count when watchers were last woken.
    pub published_seen: Cell<u64>,
    /// When a connection's watch next owes a periodic progress notification (`u64::MAX`
    /// for none): the tick wakes the connection task then.
    pub progress_due_ms: Cell<u64>,
    /// The last lone revision archived for a watch stream, reused for the next stream of
    /// the same spec.
    pub encoded: RefCell<EncodedBatch>,
}

impl Default for WatchDelivery {
    fn default() -> Self {
        Self {
            wake_connections: LocalNotify::new(),
            wake_sinks: LocalNotify::new(),
            sinks: RefCell::default(),
            published_seen: Cell::new(0),
            progress_due_ms: Cell::new(u64::MAX),
            encoded: RefCell::default(),
        }
    }
}

impl CoreContext {
    /// Hands what the shard journaled to the core's log, and wakes whoever serves watchers
    /// if the shard published events. Called after every batch of requests, expiry tick and
    /// inbox batch.
    pub fn flush_journal(&self) {
        self.deliver_lock_events();
        self.broadcast_ended_leases();
        let mut shard = self.shard.borrow_mut();
        let hub = shard.watch_hub();
        let published = hub.published_count();
        if published != self.watch.published_seen.get() && hub.watcher_count() > 0 {
            self.watch.published_seen.set(published);
            self.watch.wake_connections.notify();
            if !self.watch.sinks.borrow().is_empty() {
                self.watch.wake_sinks.notify();
            }
        }
        let Some(log) = &self.log else { return };
        let revision = shard.revision();
        if let Some(journal) = shard.journal_mut() {
            log.append(journal, revision);
        }
    }

    /// The revision a reply produced now must wait for before it leaves the server, when
    /// replies wait for the log (`sync` mode): the shard's current revision.
    pub fn gate_revision(&self) -> Option<u64> {
        match &self.log {
            Some(log) if log.is_gating() => Some(self.shard.borrow().revision()),
            _ => None,
        }
    }

    /// This core's shard at its revision now: what a response produced now reflects.
    pub fn stamp(&self) -> ShardStamp {
        ShardStamp {
            node_id: self.node_id,
            core_id: self.core_id,
            revision: self.shard.borrow().revision(),
        }
    }

    /// Decides where `request` runs.
    pub fn route(&self, request: &ArchivedRequest) -> Route {
        match request {
            ArchivedRequest::Hello { .. }
            | ArchivedRequest::Ping
            | ArchivedRequest::Stats
            | ArchivedRequest::Scan(_)
            | ArchivedRequest::Watch(_)
            | ArchivedRequest::Unwatch { .. }
            | ArchivedRequest::WatchProgress { .. }
            | ArchivedRequest::LeaseGrant { .. }
            | ArchivedRequest::LeaseKeepalive { .. }
            | ArchivedRequest::LeaseTimeToLive { .. }
            | ArchivedRequest::LeaseList
            | ArchivedRequest::CreateIndex(_)
            | ArchivedRequest::DropIndex { .. }
            | ArchivedRequest::ListIndexes
            | ArchivedRequest::Query(_) => Route::Here,
            ArchivedRequest::Get { key }
            | ArchivedRequest::Exists { key }
            | ArchivedRequest::Expire { key, .. }
            | ArchivedRequest::Persist { key }
            | ArchivedRequest::Ttl { key } => self.route_key(key),
            ArchivedRequest::Delete(delete) => self.route_key(&delete.key),
            ArchivedRequest::Unlock { name, .. } => self.route_key(name),
            ArchivedRequest::Lock { name, .. } => match self.route_key(name) {
                Route::Here => match self.shard.borrow().lease_to_check(request) {
                    Some(home) => Route::AfterLeaseCheck(home),
                    None => Route::Lock,
                },
                other => other,
            },
            ArchivedRequest::Add(add) => self.route_key(&add.key),
            ArchivedRequest::Put(put) => match self.route_key(&put.key) {
                // A put without a lease, the common one, needs no look at the shard.
                Route::Here if put.lease.is_none() => Route::Here,
                Route::Here => match self.shard.borrow().lease_to_check(request) {
                    Some(home) => Route::AfterLeaseCheck(home),
                    None => Route::Here,
                },
                other => other,
            },
            ArchivedRequest::LeaseRevoke { id } => {
                let lease = tessera_protocol::LeaseId(id.to_native());
                if lease.node_id() == self.node_id && lease.core_id() != self.core_id {
                    Route::Core(lease.core_id())
                } else {
                    Route::Revoke
                }
            }
            ArchivedRequest::Txn(txn) => match self.txn_shard(txn) {
                Ok(Route::Here) => match self.shard.borrow().lease_to_check(request) {
                    Some(home) => Route::AfterLeaseCheck(home),
                    None => Route::Here,
                },
                Ok(route) => route,
                // Answered here, with `CrossShard`.
                Err(_) => Route::Here,
            },
            ArchivedRequest::MultiGet { keys } | ArchivedRequest::MultiDelete { keys } => {
                self.route_keys(keys.iter().map(rkyv::vec::ArchivedVec::as_slice))
            }
            ArchivedRequest::MultiPut { entries } => {
                self.route_keys(entries.iter().map(|entry| entry.key.as_slice()))
            }
        }
    }

    fn route_key(&self, key: &[u8]) -> Route {
        let slot = tessera_protocol::slot_for_key(key);
        let location = self.routes.owner_of_slot(slot);
        if location.node_index != self.node_index {
            Route::Elsewhere(location, slot)
        } else if location.core_index == self.core_id {
            Route::Here
        } else {
            Route::Core(location.core_index)
        }
    }

    fn route_keys<'a>(&self, mut keys: impl Iterator<Item = &'a [u8]>) -> Route {
        let Some(first) = keys.next() else {
            return Route::Here;
        };
        let first_route = self.route_key(first);
        let mut route = first_route;
        for key in keys {
            match self.route_key(key) {
                elsewhere @ Route::Elsewhere(..) => return elsewhere,
                other if other != first_route => route = Route::Split,
                _ => {}
            }
        }
        route
    }

    /// Where every key of a transaction lives, or two keys that live on different shards.
    fn txn_shard<'a>(&self, txn: &'a ArchivedTxn) -> Result<Route, (&'a [u8], &'a [u8])> {
        let mut keys = codec::txn_keys(txn);
        let Some(first) = keys.next() else {
            return Ok(Route::Here);
        };
        let shard_of = |key: &[u8]| {
            self.routes
                .owner_of_slot(tessera_protocol::slot_for_key(key))
        };
        let first_shard = shard_of(first);
        match keys.find(|key| shard_of(key) != first_shard) {
            Some(other) => Err((first, other)),
            None => Ok(self.route_key(first)),
        }
    }

    /// Asks the shard to bring into cache what a request it owns will read, so the misses
    /// of a batch of requests overlap. A hint only: it changes nothing.
    pub fn prefetch(&self, request: &ArchivedRequest) {
        let key = match request {
            ArchivedRequest::Get { key }
            | ArchivedRequest::Exists { key }
            | ArchivedRequest::Expire { key, .. }
            | ArchivedRequest::Persist { key }
            | ArchivedRequest::Ttl { key } => key.as_slice(),
            ArchivedRequest::Delete(delete) => delete.key.as_slice(),
            ArchivedRequest::Add(add) => add.key.as_slice(),
            ArchivedRequest::Put(put) => put.key.as_slice(),
            _ => return,
        };
        if self.route_key(key) == Route::Here {
            self.shard.borrow().prefetch(key);
        }
    }

    /// Answers a request that routes here.
    pub fn respond_here(&self, now_ms: u64, request: &ArchivedRequest) -> Response {
        match request {
            ArchivedRequest::Hello {
                protocol_version, ..
            } => {
                if protocol_version.to_native() != PROTOCOL_VERSION {
                    return error(
                        ErrorCode::UnsupportedVersion,
                        format!(
                            "client speaks protocol {}, server speaks {PROTOCOL_VERSION}",
                            protocol_version.to_native()
                        ),
                    );
                }
                let node_name = self
                    .topology
                    .nodes
                    .get(usize::from(self.node_index))
                    .map(|node| node.name.clone());
                Response::Hello {
                    protocol_version: PROTOCOL_VERSION,
                    node_id: self.node_id,
                    server_name: node_name.unwrap_or_default(),
                    topology: (*self.topology).clone(),
                    health: self.health.snapshot(self.topology.epoch),
                }
            }
            ArchivedRequest::Watch(_) => error(
                ErrorCode::InvalidArgument,
                "a watch needs a stream to push to: open it on a client connection",
            ),
            ArchivedRequest::Unwatch { .. } | ArchivedRequest::WatchProgress { .. } => {
                Response::Unwatched { existed: false }
            }
            ArchivedRequest::Txn(txn) => match self.txn_shard(txn) {
                Ok(Route::Here) => self.apply(now_ms, request),
                Ok(_) => error(
                    ErrorCode::Internal,
                    format!(
                        "core {}: a transaction for another shard reached it",
                        self.core_id
                    ),
                ),
                Err((first, other)) => error(
                    ErrorCode::CrossShard,
                    format!(
                        "transaction keys {} (slot {}) and {} (slot {}) live on different \
                         shards; give every key the same hash tag, like {{user42}}name",
                        codec::printable_key(first),
                        tessera_protocol::slot_for_key(first),
                        codec::printable_key(other),
                        tessera_protocol::slot_for_key(other),
                    ),
                ),
            },
            ArchivedRequest::Stats => {
                let mut shard = self.shard.borrow_mut();
                let hub = shard.watch_hub();
                let (watcher_count, watch_queued_bytes) =
                    (hub.watcher_count() as u64, hub.queued_bytes() as u64);
                let stats = shard.stats();
                let log_stats = self.log.as_ref().map(|log| log.stats()).unwrap_or_default();
                Response::Stats(Box::new(CoreStats {
                    node_id: self.node_id,
                    core_id: self.core_id,
                    key_count: shard.key_count() as u64,
                    revision: shard.revision(),
                    memory_bytes: shard.memory_bytes(),
                    memory_bytes_max: shard.config().memory_bytes_max,
                    request_count: stats.request_count,
                    expired_count: stats.expired_count,
                    connection_count: self.connection_count.load(Ordering::Relaxed) as u64,
                    log_record_count: log_stats.record_count,
                    log_sync_count: log_stats.sync_count,
                    log_byte_count: log_stats.byte_count,
                    log_no_space_count: log_stats.no_space_count,
                    log_room_bytes: self.log.as_ref().and_then(|log| log.room()),
                    watcher_count,
                    watch_queued_bytes,
                }))
            }
            ArchivedRequest::Query(query) => self.query(now_ms, query),
            _ => self.apply(now_ms, request),
        }
    }

    /// Answers a query from this core's shard within the configured time budget.
    fn query(&self, now_ms: u64, query: &ArchivedQueryRequest) -> Response {
        let query = match rkyv::deserialize::<QueryRequest, rkyv::rancor::BoxedError>(query) {
            Ok(query) => query,
            Err(decode) => return error(ErrorCode::Internal, decode.to_string()),
        };
        let time_budget_ms = self.config.query_time_budget_ms;
        let deadline = std::time::Instant::now() + Duration::from_millis(time_budget_ms);
        let mut time_left = || std::time::Instant::now() < deadline;
        let mut budget = crate::shard::query::QueryBudget {
            time_left: &mut time_left,
            time_budget_ms,
            sort_items_max: self.config.query_sort_items_max,
        };
        self.shard.borrow().query(now_ms, &query, &mut budget)
    }

    /// Applies a request to the shard, unless the log's disk is full and it might not fit.
    fn apply(&self, now_ms: u64, request: &ArchivedRequest) -> Response {
        if let Some(refusal) = self.refuse_without_space(request) {
            return refusal;
        }
        let mut shard = self.shard.borrow_mut();
        if uses_lease_clock(request) {
            shard.set_monotonic_ms(crate::clock::monotonic_ms());
        }
        shard.apply(now_ms, request)
    }

    /// For a request body from another thread that is answered later (a put whose lease
    /// must be checked with its home first, a revoke), the pending answer.
    fn answer_later(self: &Rc<Self>, body: &[u8]) -> Option<PendingReply> {
        let request = codec::access_request(body).ok()?;
        codec::check_request(request).ok()?;
        match self.route(request) {
            Route::AfterLeaseCheck(home) => Some(self.apply_after_lease_check(home, body)),
            Route::Revoke => Some(self.revoke_and_wait(body)),
            Route::Lock => Some(self.lock_and_wait(body)),
            _ => None,
        }
    }

    /// Sends every lease that ended on this shard to every other core, which deletes its
    /// keys attached to it. These messages bypass the inboxes' bound: there is one per lease
    /// end and core, and none may be lost.
    pub fn broadcast_ended_leases(&self) {
        let ended = self.shard.borrow_mut().take_ended_leases();
        for (lease, expired) in ended {
            self.tell_lease_ended(lease, expired, false);
        }
    }

    /// Tells every other core that `lease` ended; with `wait`, returns a receiver per core
    /// that is told once that core deleted its keys.
    fn tell_lease_ended(
        &self,
        lease: u64,
        expired: bool,
        wait: bool,
    ) -> Vec<oneshot::Receiver<()>> {
        let mut waits = Vec::new();
        for (core_id, inbox) in self.inboxes.iter().enumerate() {
            if core_id == usize::from(self.core_id) {
                continue;
            }
            let done = wait.then(|| {
                let (done, receiver) = oneshot::channel();
                waits.push(receiver);
                done
            });
            // A closed inbox belongs to a core that is stopping; its keys go with it.
            let _ = inbox.push_control(CoreMessage::LeaseEnded {
                lease,
                expired,
                done,
            });
        }
        waits
    }

    /// Answers a lock request: now if the lock is free (or the wait is 0), else once it is
    /// granted or its wait ends.
    pub fn lock_and_wait(self: &Rc<Self>, body: &[u8]) -> PendingReply {
        let step = match codec::access_request(body) {
            Ok(ArchivedRequest::Lock {
                name,
                lease,
                wait_ms,
            }) => {
                let mut shard = self.shard.borrow_mut();
                shard.set_monotonic_ms(crate::clock::monotonic_ms());
                let step = shard.lock(name, lease.to_native(), wait_ms.to_native());
                if let LockStep::Queued(waiter) = step {
                    let (reply, answer) = oneshot::channel();
                    self.lock_waiters
                        .borrow_mut()
                        .insert(waiter, (Box::from(name.as_slice()), reply));
                    Err(answer)
                } else {
                    Ok(step)
                }
            }
            Ok(_) => Ok(LockStep::Done(error(
                ErrorCode::Internal,
                "not a lock request",
            ))),
            Err(protocol_error) => Ok(LockStep::Done(error(
                protocol_error.code(),
                protocol_error.to_string(),
            ))),
        };
        self.flush_journal();
        let context = self.clone();
        Box::pin(async move {
            let response = match step {
                Ok(LockStep::Done(response)) => response,
                Ok(LockStep::Queued(_)) => error(ErrorCode::Internal, "a waiter with no answer"),
                Err(answer) => answer
                    .await
                    .unwrap_or_else(|_| shutting_down(context.core_id)),
            };
            if let (Some(revision), Some(log)) = (context.gate_revision(), &context.log) {
                log.wait_durable(revision).await;
            }
            Reply::Body(encode_reply_body(Some(context.stamp()), &response))
        })
    }

    /// Answers every lock request still waiting with `ShuttingDown` (the core is stopping).
    /// Their waits stay in the shard's lines until they end.
    pub fn cancel_lock_waits(&self) {
        let mut waiters = self.lock_waiters.borrow_mut();
        for (_, reply) in waiters.values_mut() {
            // What is left is a sender nobody listens to: a grant that comes later anyway
            // cannot be delivered and is released at once.
            let (closed, _) = oneshot::channel();
            let _ = std::mem::replace(reply, closed).send(shutting_down(self.core_id));
        }
    }

    /// Answers the lock requests whose wait ended. A grant whose request is gone (its
    /// connection closed) is released at once, so no lock stays held by nobody.
    fn deliver_lock_events(&self) {
        loop {
            let events = self.shard.borrow_mut().take_lock_events();
            if events.is_empty() {
                return;
            }
            for event in events {
                let (waiter, response) = match event {
                    LockEvent::Granted { waiter, token } => (
                        waiter,
                        Response::Locked {
                            acquired: true,
                            token,
                        },
                    ),
                    LockEvent::TimedOut {
                        waiter,
                        holder_token,
                    } => (
                        waiter,
                        Response::Locked {
                            acquired: false,
                            token: holder_token,
                        },
                    ),
                    LockEvent::LeaseEnded { waiter } => (
                        waiter,
                        error(
                            ErrorCode::LeaseNotFound,
                            "the lease ended while its lock request waited",
                        ),
                    ),
                };
                let Some((name, reply)) = self.lock_waiters.borrow_mut().remove(&waiter) else {
                    continue;
                };
                if let (Err(_), LockEvent::Granted { token, .. }) = (reply.send(response), event) {
                    self.shard.borrow_mut().unlock(&name, token);
                }
            }
        }
    }

    /// Answers a revoke of a lease homed here once every other core deleted its keys
    /// attached to it, so no read after the answer finds one.
    pub fn revoke_and_wait(self: &Rc<Self>, body: &[u8]) -> PendingReply {
        let now_ms = crate::clock::now_unix_ms();
        let response = match codec::access_request(body) {
            Ok(request) => self.apply(now_ms, request),
            Err(protocol_error) => error(protocol_error.code(), protocol_error.to_string()),
        };
        let ended = self.shard.borrow_mut().take_ended_leases();
        let waits: Vec<_> = ended
            .into_iter()
            .flat_map(|(lease, expired)| self.tell_lease_ended(lease, expired, true))
            .collect();
        self.flush_journal();
        let context = self.clone();
        Box::pin(async move {
            for wait in waits {
                // A core that stopped took its keys with it.
                let _ = wait.await;
            }
            if let (Some(revision), Some(log)) = (context.gate_revision(), &context.log) {
                log.wait_durable(revision).await;
            }
            Reply::Body(encode_reply_body(Some(context.stamp()), &response))
        })
    }

    /// Asks core `home` whether `lease` lives, then answers the put in `body` here: the
    /// path of a put attaching its key to a lease homed on another core that this shard does
    /// not know yet.
    pub fn apply_after_lease_check(self: &Rc<Self>, home: u16, body: &[u8]) -> PendingReply {
        let lease = codec::access_request(body)
            .ok()
            .and_then(|request| self.shard.borrow().lease_needing_check(request));
        let (Some(lease), Some(inbox)) = (lease, self.inboxes.get(usize::from(home))) else {
            return Box::pin(std::future::ready(Reply::Response(error(
                ErrorCode::Internal,
                "a lease check for a request that uses no lease of another core",
            ))));
        };
        let (reply, answer) = oneshot::channel();
        self.shard.borrow_mut().begin_lease_check(lease);
        let pushed = inbox.push_control(CoreMessage::LeaseCheck { lease, reply });
        let context = self.clone();
        let mut copy = FrameBuffer::with_capacity(body.len());
        copy.extend_from_slice(body);
        Box::pin(async move {
            let is_alive = pushed.is_ok() && answer.await.unwrap_or(false);
            let usable = context.shard.borrow_mut().end_lease_check(lease, is_alive);
            if !usable && pushed.is_err() {
                return Reply::Response(shutting_down(home));
            }
            // The shard now knows whether the lease lives; the request is answered as any
            // other (a dead lease is refused `LeaseNotFound`).
            if matches!(
                codec::access_request(&copy),
                Ok(ArchivedRequest::Lock { .. })
            ) {
                return context.lock_and_wait(&copy).await;
            }
            let now_ms = crate::clock::now_unix_ms();
            let response = match codec::access_request(&copy) {
                Ok(request) => context.respond_here(now_ms, request),
                Err(protocol_error) => error(protocol_error.code(), protocol_error.to_string()),
            };
            context.flush_journal();
            if let (Some(revision), Some(log)) = (context.gate_revision(), &context.log) {
                log.wait_durable(revision).await;
            }
            Reply::Body(encode_reply_body(Some(context.stamp()), &response))
        })
    }

    /// While the log's disk is full, the `NoSpace` answer for a write whose records might not
    /// fit what the log can still take. Reads, and every request while the disk has room,
    /// pass.
    fn refuse_without_space(&self, request: &ArchivedRequest) -> Option<Response> {
        let room = self.log.as_ref()?.room()?;
        let shard = self.shard.borrow();
        let needed = shard.journal_bound(request)? + shard.journal_len() as u64;
        (needed > room).then(|| {
            error(
                ErrorCode::NoSpace,
                format!(
                    "core {}: the disk holding the write-ahead log is full ({room} bytes left, the \
                     write needs up to {needed}); reads still work",
                    self.core_id
                ),
            )
        })
    }

    /// The `WrongShard` answer for a key another node owns.
    pub fn wrong_shard(&self, location: ShardLocation, slot: Slot) -> Response {
        let owner_node = self.topology.node(location);
        let owner_core = self.topology.core(location);
        Response::Error(ErrorReply {
            code: ErrorCode::WrongShard,
            message: format!(
                "slot {slot} is owned by node {} core {} (epoch {})",
                owner_node.map_or(0, |node| node.node_id),
                location.core_index,
                self.topology.epoch
            ),
            wrong_shard: Some(WrongShard {
                epoch: self.topology.epoch,
                slot,
                owner_node_id: owner_node.map_or(0, |node| node.node_id),
                owner_core_id: location.core_index,
                owner_address: owner_core
                    .map(|core| core.address.clone())
                    .unwrap_or_default(),
            }),
        })
    }

    /// Validates an archived request body that arrived from another thread and answers it.
    /// Only requests that route to this core are executed; anything else is refused, since a
    /// forward or an embedded caller has already routed.
    ///
    /// A `Watch` needs `stream`, where its messages go after the reply; `Unwatch` and
    /// `WatchProgress` name one of this core's in-process streams.
    pub fn respond_to_body(&self, now_ms: u64, body: &[u8], stream: Option<WatchSink>) -> Response {
        let request = match codec::access_request(body) {
            Ok(request) => request,
            Err(protocol_error) => return error(protocol_error.code(), protocol_error.to_string()),
        };
        if let Err(request_error) = codec::check_request(request) {
            return error(request_error.code(), request_error.to_string());
        }
        match (request, stream) {
            (ArchivedRequest::Watch(watch), Some(sink)) => {
                return match watch_stream::open(self, now_ms, None, watch) {
                    Ok((stream, watching)) => {
                        self.watch.sinks.borrow_mut().add(stream, sink);
                        // A resume's replay is queued already.
                        self.watch.wake_sinks.notify();
                        watching
                    }
                    Err(refusal) => refusal,
                };
            }
            (ArchivedRequest::Unwatch { watch_id }, _) => {
                let mut shard = self.shard.borrow_mut();
                let existed = self
                    .watch
                    .sinks
                    .borrow_mut()
                    .remove(shard.watch_hub(), watch_id.to_native());
                return Response::Unwatched { existed };
            }
            (ArchivedRequest::WatchProgress { watch_id }, _) => {
                let mut shard = self.shard.borrow_mut();
                let progress = self
                    .watch
                    .sinks
                    .borrow_mut()
                    .request_progress(shard.watch_hub(), watch_id.to_native());
                return match progress {
                    Some(revision) => {
                        self.watch.wake_sinks.notify();
                        Response::WatchProgress { revision }
                    }
                    None => Response::Unwatched { existed: false },
                };
            }
            _ => {}
        }
        match self.route(request) {
            Route::Here => self.respond_here(now_ms, request),
            Route::Elsewhere(location, slot) => self.wrong_shard(location, slot),
            Route::Core(core_id) => error(
                ErrorCode::WrongShard,
                format!(
                    "request routed to core {} belongs to core {core_id}",
                    self.core_id
                ),
            ),
            Route::Split => error(
                ErrorCode::WrongShard,
                format!("batch sent to core {} spans several cores", self.core_id),
            ),
            Route::AfterLeaseCheck(_) | Route::Revoke | Route::Lock => error(
                ErrorCode::Internal,
                "a request answered later reached the synchronous path",
            ),
        }
    }

    /// Sends an archived request body to another core of this node and returns its reply.
    /// The push happens now, before the returned future is first polled.
    pub fn forward(&self, core_id: u16, body: &[u8]) -> PendingReply {
        match self.dispatch(core_id, body) {
            Ok(receiver) => Box::pin(async move {
                match receiver.await {
                    Ok(body) => Reply::Body(body),
                    Err(oneshot::Canceled) => Reply::Response(shutting_down(core_id)),
                }
            }),
            Err(response) => Box::pin(std::future::ready(Reply::Response(response))),
        }
    }

    fn dispatch(
        &self,
        core_id: u16,
        body: &[u8],
    ) -> Result<oneshot::Receiver<FrameBuffer>, Response> {
        let Some(inbox) = self.inboxes.get(usize::from(core_id)) else {
            return Err(error(
                ErrorCode::Internal,
                format!("no core {core_id} on this node"),
            ));
        };
        let mut copy = FrameBuffer::with_capacity(body.len());
        copy.extend_from_slice(body);
        let (reply, receiver) = oneshot::channel();
        match inbox.push(CoreMessage::Request(CoreRequest {
            body: copy,
            reply,
            stream: None,
        })) {
            Ok(()) => Ok(receiver),
            Err(PushError::Full(_)) => Err(error(
                ErrorCode::Overloaded,
                format!(
                    "core {core_id} inbox is full ({} requests)",
                    inbox.capacity()
                ),
            )),
            Err(PushError::Closed(_)) => Err(shutting_down(core_id)),
        }
    }

    /// Splits a batch by owning core, runs this core's part now, forwards the others, and
    /// returns a future that merges the parts back in request order.
    pub fn split(&self, now_ms: u64, request: &ArchivedRequest) -> PendingReply {
        let (kind, parts) = match self.split_parts(request) {
            Ok(split) => split,
            Err(response) => return Box::pin(std::future::ready(Reply::Response(response))),
        };
        let mut waiting = Vec::with_capacity(parts.len());
        let mut total = 0;
        for (core_id, indices, sub_request) in parts {
            total += indices.len();
            let mut body = FrameBuffer::new();
            let part = match codec::encode_request_body(&mut body, &sub_request) {
                Err(protocol_error) => {
                    PartReply::Ready(error(protocol_error.code(), protocol_error.to_string()))
                }
                Ok(()) if core_id == self.core_id => {
                    PartReply::Ready(self.respond_to_body(now_ms, &body, None))
                }
                Ok(()) => match self.dispatch(core_id, &body) {
                    Ok(receiver) => PartReply::Waiting(core_id, receiver),
                    Err(response) => PartReply::Ready(response),
                },
            };
            waiting.push((indices, part));
        }
        Box::pin(async move { Reply::Response(merge_parts(kind, total, waiting).await) })
    }

    #[allow(clippy::type_complexity, reason = "private helper")]
    fn split_parts(
        &self,
        request: &ArchivedRequest,
    ) -> Result<(BatchKind, Vec<(u16, Vec<usize>, Request)>), Response> {
        let keys: Vec<&[u8]> = match request {
            ArchivedRequest::MultiGet { keys } | ArchivedRequest::MultiDelete { keys } => {
                keys.iter().map(rkyv::vec::ArchivedVec::as_slice).collect()
            }
            ArchivedRequest::MultiPut { entries } => {
                entries.iter().map(|entry| entry.key.as_slice()).collect()
            }
            _ => return Err(error(ErrorCode::Internal, "only batches can be split")),
        };
        let mut groups: Vec<(u16, Vec<usize>)> = Vec::new();
        for (index, key) in keys.iter().enumerate() {
            let core_id = match self.route_key(key) {
                Route::Here => self.core_id,
                Route::Core(core_id) => core_id,
                Route::Elsewhere(location, slot) => return Err(self.wrong_shard(location, slot)),
                Route::Split | Route::AfterLeaseCheck(_) | Route::Revoke | Route::Lock => {
                    return Err(error(ErrorCode::Internal, "a key cannot split"))
                }
            };
            match groups
                .iter_mut()
                .find(|(group_core, _)| *group_core == core_id)
            {
                Some((_, indices)) => indices.push(index),
                None => groups.push((core_id, vec![index])),
            }
        }
        let owned_keys =
            |indices: &[usize]| indices.iter().map(|&index| keys[index].to_vec()).collect();
        let (kind, parts) = match request {
            ArchivedRequest::MultiGet { .. } => (
                BatchKind::Get,
                groups
                    .into_iter()
                    .map(|(core_id, indices)| {
                        let sub_request = Request::MultiGet {
                            keys: owned_keys(&indices),
                        };
                        (core_id, indices, sub_request)
                    })
                    .collect(),
            ),
            ArchivedRequest::MultiDelete { .. } => (
                BatchKind::Delete,
                groups
                    .into_iter()
                    .map(|(core_id, indices)| {
                        let sub_request = Request::MultiDelete {
                            keys: owned_keys(&indices),
                        };
                        (core_id, indices, sub_request)
                    })
                    .collect(),
            ),
            ArchivedRequest::MultiPut { entries } => (
                BatchKind::Put,
                groups
                    .into_iter()
                    .map(|(core_id, indices)| {
                        let sub_entries = indices
                            .iter()
                            .map(|&index| {
                                let entry = &entries[index];
                                PutEntry {
                                    key: entry.key.to_vec(),
                                    value: entry.value.to_vec(),
                                    ttl_ms: entry.ttl_ms.as_ref().map(|ttl_ms| ttl_ms.to_native()),
                                    fields: entry
                                        .fields
                                        .iter()
                                        .map(ArchivedField::to_field)
                                        .collect(),
                                }
                            })
                            .collect();
                        (
                            core_id,
                            indices,
                            Request::MultiPut {
                                entries: sub_entries,
                            },
                        )
                    })
                    .collect(),
            ),
            _ => return Err(error(ErrorCode::Internal, "only batches can be split")),
        };
        Ok((kind, parts))
    }
}

/// Which batch a split belongs to, so the parts merge into the right answer.
#[derive(Debug, Clone, Copy)]
enum BatchKind {
    Get,
    Put,
    Delete,
}

enum PartReply {
    Ready(Response),
    Waiting(u16, oneshot::Receiver<FrameBuffer>),
}

async fn merge_parts(
    kind: BatchKind,
    total: usize,
    parts: Vec<(Vec<usize>, PartReply)>,
) -> Response {
    let mut values = vec![
        None;
        if matches!(kind, BatchKind::Get) {
            total
        } else {
            0
        }
    ];
    let mut versions = vec![
        0;
        if matches!(kind, BatchKind::Put) {
            total
        } else {
            0
        }
    ];
    let mut deleted = vec![
        false;
        if matches!(kind, BatchKind::Delete) {
            total
        } else {
            0
        }
    ];
    // Every part is awaited, even after one fails, so no reply is left unread; the first
    // failure is reported. Parts that succeeded stay applied: a batch spanning cores is not
    // atomic, which is why the smart client splits batches itself.
    let mut failure = None;
    for (indices, part) in parts {
        let response = match part {
            PartReply::Ready(response) => response,
            PartReply::Waiting(core_id, receiver) => match receiver.await {
                Ok(body) => codec::decode_response(&body).unwrap_or_else(|protocol_error| {
                    error(ErrorCode::Internal, protocol_error.to_string())
                }),
                Err(oneshot::Canceled) => shutting_down(core_id),
            },
        };
        match (kind, response) {
            (BatchKind::Get, Response::Values(part_values))
                if part_values.len() == indices.len() =>
            {
                for (index, value) in indices.into_iter().zip(part_values) {
                    values[index] = value;
                }
            }
            (
                BatchKind::Put,
                Response::MultiPut {
                    mod_revisions: part_versions,
                },
            ) if part_versions.len() == indices.len() => {
                for (index, version) in indices.into_iter().zip(part_versions) {
                    versions[index] = version;
                }
            }
            (
                BatchKind::Delete,
                Response::MultiDelete {
                    deleted: part_deleted,
                },
            ) if part_deleted.len() == indices.len() => {
                for (index, was_deleted) in indices.into_iter().zip(part_deleted) {
                    deleted[index] = was_deleted;
                }
            }
            (_, failed @ Response::Error(_)) => {
                failure.get_or_insert(failed);
            }
            (_, other) => {
                failure.get_or_insert(error(
                    ErrorCode::Internal,
                    format!("unexpected reply to a split batch part: {other:?}"),
                ));
            }
        }
    }
    if let Some(failure) = failure {
        return failure;
    }
    match kind {
        BatchKind::Get => Response::Values(values),
        BatchKind::Put => Response::MultiPut {
            mod_revisions: versions,
        },
        BatchKind::Delete => Response::MultiDelete { deleted },
    }
}

/// Asks the home of every lease of another core that this shard's recovered keys or locks
/// refer to whether it lives, and ends the ones that do not here (their keys deleted, their
/// locks released). Until the answer comes, such a lease is taken to live.
pub async fn reconcile_foreign_leases(context: Rc<CoreContext>) {
    let leases = context.shard.borrow().foreign_leases();
    for lease in leases {
        let home = usize::from(tessera_protocol::LeaseId(lease).core_id());
        let Some(inbox) = context.inboxes.get(home) else {
            context
                .shard
                .borrow_mut()
                .lease_ended_elsewhere(lease, true);
            continue;
        };
        let (reply, answer) = oneshot::channel();
        if inbox
            .push_control(CoreMessage::LeaseCheck { lease, reply })
            .is_err()
        {
            return;
        }
        // A home that stops before answering says nothing: the lease stays as it is.
        if let Ok(false) = answer.await {
            context
                .shard
                .borrow_mut()
                .lease_ended_elsewhere(lease, true);
            context.flush_journal();
        }
    }
}

/// Whether a request reads the monotonic clock leases run on.
fn uses_lease_clock(request: &ArchivedRequest) -> bool {
    match request {
        ArchivedRequest::Put(put) => put.lease.is_some(),
        ArchivedRequest::LeaseGrant { .. }
        | ArchivedRequest::LeaseKeepalive { .. }
        | ArchivedRequest::LeaseRevoke { .. }
        | ArchivedRequest::LeaseTimeToLive { .. }
        | ArchivedRequest::LeaseList => true,
        _ => false,
    }
}

/// An error response with no routing detail.
pub fn error(code: ErrorCode, message: impl Into<String>) -> Response {
    Response::Error(ErrorReply::new(code, message))
}

fn shutting_down(core_id: u16) -> Response {
    error(
        ErrorCode::ShuttingDown,
        format!("core {core_id} is shutting down"),
    )
}

/// Archives `response` (which reflects `stamp`) as a body; a response over the frame limit
/// becomes a `TooLarge` error.
pub fn encode_reply_body(stamp: Option<ShardStamp>, response: &Response) -> FrameBuffer {
    let mut body = FrameBuffer::new();
    if let Err(protocol_error) = codec::encode_reply_body(&mut body, stamp, response) {
        body.clear();
        let refusal = error(
            protocol_error.code(),
            format!("reply refused: {protocol_error}"),
        );
        // An error reply is a few hundred bytes; it always fits.
        let encoded = codec::encode_response_body(&mut body, &refusal);
        debug_assert!(encoded.is_ok());
    }
    body
}

/// Answers requests from other threads until the inbox closes, then fires the core's stop.
/// Requests already queued when the inbox closes are still answered.
pub async fn serve_inbox(context: std::rc::Rc<CoreContext>, inbox: Arc<Inbox<CoreMessage>>) {
    let mut batch = VecDeque::new();
    while inbox.receive_batch(&mut batch).await {
        let now_ms = crate::clock::now_unix_ms();
        let mut replies = Vec::with_capacity(batch.len());
        let mut lease_acks = Vec::new();
        context.metrics.borrow_mut().inbox_messages += batch.len() as u64;
        for (position, message) in batch.drain(..).enumerate() {
            match message {
                CoreMessage::Request(request) => {
                    if let Some(pending) = context.answer_later(&request.body) {
                        glommio::spawn_local(async move {
                            let body = match pending.await {
                                Reply::Body(body) => body,
                                Reply::Response(response) => encode_reply_body(None, &response),
                            };
                            let _ = request.reply.send(body);
                        })
                        .detach();
                        continue;
                    }
                    let response = context.respond_to_body(now_ms, &request.body, request.stream);
                    replies.push((
                        request.reply,
                        encode_reply_body(Some(context.stamp()), &response),
                    ));
                }
                CoreMessage::LeaseCheck { lease, reply } => {
                    let mut shard = context.shard.borrow_mut();
                    shard.set_monotonic_ms(crate::clock::monotonic_ms());
                    let _ = reply.send(shard.is_home_lease_alive(lease));
                }
                CoreMessage::LeaseEnded {
                    lease,
                    expired,
                    done,
                } => {
                    context
                        .shard
                        .borrow_mut()
                        .lease_ended_elsewhere(lease, expired);
                    if let Some(done) = done {
                        lease_acks.push(done);
                    }
                }
                CoreMessage::Metrics { reply } => {
                    let _ = reply.send(context.metrics_snapshot());
                }
            }
            if position % 64 == 63 {
                glommio::executor().yield_if_needed().await;
            }
        }
        context.flush_journal();
        // The caller may have given up (a dropped embedded future); that is not an error.
        let send_all = |replies: Vec<(oneshot::Sender<FrameBuffer>, FrameBuffer)>,
                        lease_acks: Vec<oneshot::Sender<()>>| {
            for (reply, body) in replies {
                let _ = reply.send(body);
            }
            for ack in lease_acks {
                let _ = ack.send(());
            }
        };
        match (context.gate_revision(), &context.log) {
            (Some(revision), Some(log)) if log.durable_revision() < revision => {
                // Answer once the batch is on disk, without holding up the next batch.
                let log = log.clone();
                glommio::spawn_local(async move {
                    log.wait_durable(revision).await;
                    send_all(replies, lease_acks);
                })
                .detach();
            }
            _ => send_all(replies, lease_acks),
        }
    }
    context.stop.fire();
}

/// Reclaims expired keys every `tick_ms` until the core stops.
pub async fn run_ticks(context: std::rc::Rc<CoreContext>, progress: crate::server::CoreProgress) {
    let tick = Duration::from_millis(context.config.tick_ms);
    while context
        .stop
        .unless_fired(glommio::timer::sleep(tick))
        .await
        .is_some()
    {
        // One count per tick: the watchdog's proof that this core's executor still runs.
        if let Some(count) = progress.get(usize::from(context.core_id)) {
            count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        let now_ms = crate::clock::now_unix_ms();
        let expired_count = {
            let mut shard = context.shard.borrow_mut();
            shard.set_monotonic_ms(crate::clock::monotonic_ms());
            shard.tick(now_ms)
        };
        context.flush_journal();
        if now_ms >= context.watch.progress_due_ms.get() {
            context.watch.wake_connections.notify();
        }
        if !context.watch.sinks.borrow().is_empty() {
            // Progress notifications, and readers that made room.
            context.watch.wake_sinks.notify();
        }
        if expired_count > 0 {
            tracing::trace!(expired_count, "reclaimed expired keys");
        }
        if !context.index_build_running.get() && context.shard.borrow().indexes().is_building() {
            context.index_build_running.set(true);
            glommio::spawn_local(build_indexes(context.clone())).detach();
        }
    }
}

/// Keys an index build files per call into the shard.
pub const INDEX_BUILD_SLICE_KEYS: usize = 64;

/// How long an index build runs before it lets the core's connections in: short beside a
/// point request's latency.
pub const INDEX_BUILD_SLICE: Duration = Duration::from_micros(25);

/// The pause between two slices of a build. A task that only yields stays runnable, and
/// glommio runs a task queue's runnable tasks before it polls the ring again, so the build
/// sleeps on a timer instead: the ring is polled and the connections served before it goes
/// on. Measured with gets at 10 000/s during a build over 1M keys (`scripts/bench-query.sh`):
/// 50 µs slices with 20 µs pauses put the gets' p99 at 4.5-4.8x their p99 without a build;
/// 25 µs slices with 200 µs pauses at 1.2-2.5x (median 1.6x over three rounds), the build
/// taking about 11 s.
pub const INDEX_BUILD_PAUSE: Duration = Duration::from_micros(200);

/// Files the keys of indexes being built, a time slice at a time, letting the core's other
/// work in between, until none is building or the core stops.
pub async fn build_indexes(context: Rc<CoreContext>) {
    let started = std::time::Instant::now();
    let mut more = true;
    while more && !context.stop.is_fired() {
        let slice_started = std::time::Instant::now();
        while more && slice_started.elapsed() < INDEX_BUILD_SLICE {
            more = context
                .shard
                .borrow_mut()
                .build_indexes(INDEX_BUILD_SLICE_KEYS);
        }
        if more {
            glommio::timer::sleep(INDEX_BUILD_PAUSE).await;
        }
    }
    tracing::info!(
        core = context.core_id,
        elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        "index build finished"
    );
    context.index_build_running.set(false);
}
