//! The Tessera smart client.
//!
//! A [`Client`] fetches the cluster topology on connect, hashes each key to its slot
//! (`crc32(hash_tag(key)) mod 16384`, shared with the server through `tessera-protocol`) and
//! sends the request straight to the node and core that owns it, over one multiplexed,
//! pipelined connection per core. When a server answers `WrongShard` the client refreshes the
//! topology and retries, a bounded number of times. Batches are split per owning core.
//!
//! The async API runs on tokio and does not pull glommio into your process. [`BlockingClient`]
//! wraps it for scripts and the CLI. With the `embedded` feature, [`Client::embedded`] runs
//! the server's shards inside your process with the same API and semantics, and no server.
//!
//! Errors tell apart requests that certainly did not apply ([`ClientError::is_retryable`]),
//! requests whose outcome is unknown ([`ClientError::is_indeterminate`]) and fatal ones.
//!
//! # Layout
//! - `connection`: one pipelined TCP connection per core, replies matched by request id.
//! - `routing`: the topology, its route table, and a transport per core.
//! - `transport`: network or in-process path to one core.
//! - `cluster`: every node's state, as the client and the nodes' failure detectors see it.
//! - `scan`: range scans, sent to every core and merged in key order.
//! - `query`: secondary indexes (create, drop, list on every core) and queries by the
//!   entries' fields, sent to every core and merged in the query's order.
//! - `watch`: watches as one stream merged across shards, resumed after reconnects.
//! - `counter`: counters with bounds and windows.
//! - `lease`: leases, kept alive in the background by one keeper task per client.
//! - `lock`: locks held by a lease, with fencing tokens, and fenced writes.
//! - `election`: leader election (campaign, resign, observe) on a lock, a lease and a watch.
//! - `txn`: single-shard transactions and the optimistic read-modify-write helper.
//! - `embedded`: shards in this process (feature `embedded`).
//! - [`blocking`]: a synchronous wrapper.
//! - [`error`]: the [`ClientError`] type.
//!
//! # Example
//! ```no_run
//! # async fn example() -> tessera_client::Result<()> {
//! use std::time::Duration;
//! use tessera_client::{Client, PutOptions};
//!
//! let client = Client::connect(["127.0.0.1:7000"]).await?;
//! client.put("user:1", "ada").await?;
//! client.put_with("session:9", "x", PutOptions::new().ttl(Duration::from_secs(30))).await?;
//! let entry = client.get("user:1").await?.expect("just written");
//! assert_eq!(entry.value, b"ada");
//! # Ok(()) }
//! ```

pub mod blocking;
mod cluster;
mod connection;
mod counter;
mod election;
#[cfg(feature = "embedded")]
mod embedded;
pub mod error;
mod lease;
mod lock;
mod query;
mod routing;
mod scan;
mod transport;
mod txn;
mod watch;

use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use tessera_protocol::codec::{
    check_batch, check_key, check_owned_request, check_ttl, check_value,
};
use tessera_protocol::limits::{BATCH_COUNT_MAX, ENVELOPE_OVERHEAD_MAX, FRAME_BODY_SIZE_MAX};
use tessera_protocol::{
    Delete, DeleteCondition, Put, PutCondition, Request, Response, ShardLocation, PROTOCOL_VERSION,
};

pub use blocking::{BlockingClient, BlockingWatch};
pub use cluster::{ClusterStatus, NodeStatus};
pub use counter::{AddOptions, CounterOutcome};
pub use election::{Election, LeaderChange, Leadership};
pub use error::{ClientError, Result};
pub use lease::{Lease, LeaseInfo};
pub use lock::LockGrant;
pub use query::{
    CoreIndexChange, CoreIndexStatus, CorePlan, Field, FieldValue, IndexChange, IndexInfo,
    IndexKind, IndexSpec, IndexState, IndexStatus, OrderBy, Projection, Query, QueryAccess,
    QueryCursor, QueryError, QueryItem, QueryOptions, QueryPlan, QueryResult, QUERY_LIMIT_DEFAULT,
};
pub use scan::{KeyRange, ScanItem, ScanOptions, ScanResult, ShardRevision};
pub use tessera_protocol::CounterAdd;
pub use tessera_protocol::{
    Check, Compare, CompareOp, CoreStats, Entry, ErrorCode, NodeHealth, NodeState, PutEntry, Scan,
    Topology, TtlState, Txn, TxnOp, TxnOutcome, TxnResult,
};
#[cfg(feature = "embedded")]
pub use tessera_server::config::Durability;
#[cfg(feature = "embedded")]
pub use tessera_server::Config as EmbeddedConfig;
pub use txn::Optimistic;
pub use watch::{EventKind, Watch, WatchEvent, WatchMessage, WatchOptions, WatchStart};

use crate::connection::{server_error, Connection, ConnectionSettings};
use crate::routing::ClusterView;
use crate::transport::Transport;

/// How a [`Client`] connects and behaves.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// `host:port` addresses tried in order (first = preferred) to fetch the topology, at
    /// connect and at every refresh, before the cores the current topology names.
    pub endpoints: Vec<String>,
    /// Longest a connection attempt may take.
    pub connect_timeout: Duration,
    /// Longest a request may wait for its reply.
    pub request_timeout: Duration,
    /// Requests in flight per core connection; callers beyond it wait.
    pub inflight_max: usize,
    /// Topology refreshes and retries after `WrongShard` before giving up.
    pub wrong_shard_retry_max: usize,
    /// Name sent in the handshake, for the server's logs.
    pub client_name: String,
    /// Bytes of pushed messages one watch stream buffers for a consumer that has not taken
    /// them; past it the watch ends as [`ClientError::Lagged`] (default 4 MiB: a few of the
    /// largest revisions). At least one message is always buffered.
    pub watch_buffer_bytes_max: usize,
    /// A connection with requests outstanding that receives nothing for this long, not even
    /// the answer to the ping it sends at half of it, is closed and its node marked down:
    /// calls to it then fail at once with [`ClientError::Unavailable`] (default 2 s).
    pub liveness_timeout: Duration,
    /// First wait before probing a node marked down; doubled per failed probe, with
    /// jitter (default 100 ms).
    pub reconnect_backoff_base: Duration,
    /// Longest wait between probes of a node marked down (default 5 s).
    pub reconnect_backoff_max: Duration,
    /// How often the topology is fetched again in the background; `None`: only after
    /// `WrongShard` and when a node comes back (default 30 s).
    pub topology_refresh_interval: Option<Duration>,
}

impl ClientConfig {
    /// Defaults for the given endpoints.
    pub fn new<I, S>(endpoints: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self {
            endpoints: endpoints.into_iter().map(Into::into).collect(),
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(10),
            inflight_max: 1024,
            wrong_shard_retry_max: 3,
            client_name: "tessera-client".to_owned(),
            watch_buffer_bytes_max: 4 * 1024 * 1024,
            liveness_timeout: Duration::from_secs(2),
            reconnect_backoff_base: Duration::from_millis(100),
            reconnect_backoff_max: Duration::from_secs(5),
            topology_refresh_interval: Some(Duration::from_secs(30)),
        }
    }

    fn connection_settings(&self, recovered: Arc<tokio::sync::Notify>) -> ConnectionSettings {
        ConnectionSettings {
            connect_timeout: self.connect_timeout,
            request_timeout: self.request_timeout,
            inflight_max: self.inflight_max.max(1),
            watch_buffer_bytes_max: self.watch_buffer_bytes_max,
            liveness_timeout: self.liveness_timeout.max(Duration::from_millis(4)),
            reconnect_backoff_base: self.reconnect_backoff_base,
            reconnect_backoff_max: self.reconnect_backoff_max.max(self.reconnect_backoff_base),
            recovered,
        }
    }
}

/// Options of a put beyond key and value.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PutOptions {
    ttl: Option<Duration>,
    keep_ttl: bool,
    condition: PutCondition,
    return_previous: bool,
    lease: Option<u64>,
    fields: Vec<Field>,
}

impl PutOptions {
    /// An unconditional put with no TTL.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Expire the key after `ttl` (at least 1 ms).
    #[must_use]
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }

    /// Keep the key's current expiry (ignored when a TTL is given).
    #[must_use]
    pub fn keep_ttl(mut self) -> Self {
        self.keep_ttl = true;
        self
    }

    /// Only write if the key does not exist.
    #[must_use]
    pub fn if_absent(mut self) -> Self {
        self.condition = PutCondition::IfAbsent;
        self
    }

    /// Only write if the key exists.
    #[must_use]
    pub fn if_present(mut self) -> Self {
        self.condition = PutCondition::IfPresent;
        self
    }

    /// Only write if the key's version is `version` (0: the key does not exist): a
    /// compare-and-set against a version read earlier. A put that loses says the current
    /// version in [`PutOutcome::version`] (and the entry, with
    /// [`PutOptions::return_previous`]).
    #[must_use]
    pub fn if_version(mut self, version: u64) -> Self {
        self.condition = PutCondition::IfVersion(version);
        self
    }

    /// Only write if the key exists and holds exactly `value`.
    #[must_use]
    pub fn if_value(mut self, value: impl Into<Vec<u8>>) -> Self {
        self.condition = PutCondition::IfValue(value.into());
        self
    }

    /// Return the entry the put replaced (or found, if the condition failed).
    #[must_use]
    pub fn return_previous(mut self) -> Self {
        self.return_previous = true;
        self
    }

    /// Attach the key to a lease ([`Lease::id`]): the server deletes it when the lease
    /// ends. A key has at most one lease; a put without this option detaches it.
    #[must_use]
    pub fn lease(mut self, lease: u64) -> Self {
        self.lease = Some(lease);
        self
    }

    /// Give the entry the indexed field `name` (repeatable): indexes file the entry by it
    /// and queries match on it ([`Client::query`]). At most `FIELDS_PER_VALUE_MAX` fields,
    /// each name given once. Fields belong to the value: a put replaces them all, so a put
    /// without fields leaves the entry with none.
    ///
    /// ```
    /// use tessera_client::{FieldValue, PutOptions};
    ///
    /// let options = PutOptions::new()
    ///     .field("age", FieldValue::I64(36))
    ///     .field("city", FieldValue::Str("Oslo".to_owned()));
    /// ```
    #[must_use]
    pub fn field(mut self, name: impl Into<String>, value: FieldValue) -> Self {
        self.fields.push(Field::new(name, value));
        self
    }

    /// Give the entry these indexed fields too (see [`PutOptions::field`]).
    #[must_use]
    pub fn fields(mut self, fields: impl IntoIterator<Item = Field>) -> Self {
        self.fields.extend(fields);
        self
    }
}

/// What a put did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PutOutcome {
    /// Whether the condition held and the value was written.
    pub applied: bool,
    /// The key's mod revision after the put: the shard revision the put was applied at, or
    /// the key's current mod revision if not applied (0 if absent).
    pub mod_revision: u64,
    /// The key's version after the put: the new one if applied, else the current one (0 if
    /// absent).
    pub version: u64,
    /// The previous entry, if asked for and it existed.
    pub previous: Option<Entry>,
}

/// Options of a delete beyond the key.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeleteOptions {
    condition: DeleteCondition,
    return_previous: bool,
}

impl DeleteOptions {
    /// An unconditional delete.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Only delete if the key's version is `version` (a compare-and-delete against a version
    /// read earlier). A delete that loses says the current version in
    /// [`DeleteOutcome::version`].
    #[must_use]
    pub fn if_version(mut self, version: u64) -> Self {
        self.condition = DeleteCondition::IfVersion(version);
        self
    }

    /// Only delete if the key holds exactly `value`.
    #[must_use]
    pub fn if_value(mut self, value: impl Into<Vec<u8>>) -> Self {
        self.condition = DeleteCondition::IfValue(value.into());
        self
    }

    /// Return the removed entry (or the one found, if the condition failed).
    #[must_use]
    pub fn return_previous(mut self) -> Self {
        self.return_previous = true;
        self
    }
}

/// What a delete did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeleteOutcome {
    /// Whether a key was removed.
    pub deleted: bool,
    /// The key's version after the delete: 0 if it was removed or did not exist, else (the
    /// condition failed) its current version.
    pub version: u64,
    /// The removed entry (or the one found, if the condition failed), if asked for.
    pub previous: Option<Entry>,
}

/// One core's answer to a ping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pong {
    /// The answering node.
    pub node_id: u32,
    /// The answering core.
    pub core_id: u16,
    /// The address pinged.
    pub address: String,
    /// Time from send to reply.
    pub round_trip: Duration,
}

/// A handle to a Tessera cluster (or an embedded one). Cheap to clone; clones share
/// connections.
#[derive(Debug, Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: ClientConfig,
    /// What every connection is made with.
    settings: ConnectionSettings,
    view: RwLock<Arc<ClusterView>>,
    /// Serializes topology refreshes so a burst of `WrongShard` replies fetches once.
    refresh: tokio::sync::Mutex<()>,
    /// The leases kept alive in the background.
    keeper: Arc<lease::Keeper>,
    #[cfg(feature = "embedded")]
    embedded: Option<(
        Arc<embedded::EmbeddedHost>,
        tessera_server::core::CoreInboxes,
    )>,
}

impl Client {
    /// Connects to a cluster through the first reachable endpoint.
    ///
    /// # Errors
    /// No endpoint answered the handshake, or its topology is invalid.
    pub async fn connect<I, S>(endpoints: I) -> Result<Self>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self::connect_with(ClientConfig::new(endpoints)).await
    }

    /// Connects with explicit settings.
    ///
    /// # Errors
    /// No endpoint answered the handshake, or its topology is invalid.
    pub async fn connect_with(config: ClientConfig) -> Result<Self> {
        if config.endpoints.is_empty() {
            return Err(ClientError::Topology("no endpoints given".to_owned()));
        }
        let recovered = Arc::new(tokio::sync::Notify::new());
        let settings = config.connection_settings(recovered.clone());
        let handshake = fetch_topology(&config, &config.endpoints, &settings, None, 0).await?;
        let view = ClusterView::new(
            handshake.topology,
            handshake.health,
            None,
            |address, _, health| {
                Transport::Remote(Connection::new(
                    address.to_owned(),
                    settings.clone(),
                    health.clone(),
                ))
            },
        )
        .map_err(|error| ClientError::Topology(error.to_string()))?;
        let inner = Arc::new(Inner {
            config,
            settings,
            view: RwLock::new(Arc::new(view)),
            refresh: tokio::sync::Mutex::new(()),
            keeper: Arc::new(lease::Keeper::new()),
            #[cfg(feature = "embedded")]
            embedded: None,
        });
        tokio::spawn(keep_topology_fresh(
            Arc::downgrade(&inner),
            recovered,
            inner.config.topology_refresh_interval,
        ));
        Ok(Self { inner })
    }

    /// Starts the server's shards inside this process and returns a client for them. The
    /// shards stop when the last clone of the client is dropped (or on [`Client::shutdown`]).
    ///
    /// # Errors
    /// The configuration is invalid or a core cannot start.
    #[cfg(feature = "embedded")]
    pub fn embedded(config: EmbeddedConfig) -> Result<Self> {
        let (host, topology, inboxes) = embedded::start(config)?;
        // One node, in this process: always up.
        let health = topology
            .nodes
            .iter()
            .map(|node| NodeHealth {
                node_id: node.node_id,
                state: tessera_protocol::NodeState::Up,
                last_heard_ms: Some(0),
                epoch: topology.epoch,
                restarts: 0,
            })
            .collect();
        let view = ClusterView::new(topology, health, None, |address, core_id, _| {
            Transport::Embedded(embedded::EmbeddedCore::new(
                address.to_owned(),
                core_id,
                inboxes.clone(),
            ))
        })
        .map_err(|error| ClientError::Topology(error.to_string()))?;
        Ok(Self {
            inner: Arc::new(Inner {
                settings: ClientConfig::new(Vec::<String>::new())
                    .connection_settings(Arc::default()),
                config: ClientConfig::new(Vec::<String>::new()),
                view: RwLock::new(Arc::new(view)),
                refresh: tokio::sync::Mutex::new(()),
                keeper: Arc::new(lease::Keeper::new()),
                embedded: Some((host, inboxes)),
            }),
        })
    }

    /// Stops an embedded server now (waiting for its cores); later calls fail with
    /// [`ClientError::ShutDown`]. Does nothing for a remote client.
    pub fn shutdown(&self) {
        #[cfg(feature = "embedded")]
        if let Some((host, _)) = &self.inner.embedded {
            host.shutdown();
        }
    }

    /// The topology the client currently routes by.
    #[must_use]
    pub fn topology(&self) -> Topology {
        self.view().topology.clone()
    }

    /// Every node's health as reported with the current topology by the server that served
    /// it (refreshed with the topology; [`Client::cluster_status`] asks every node now).
    #[must_use]
    pub fn health(&self) -> Vec<NodeHealth> {
        self.view().health.clone()
    }

    fn view(&self) -> Arc<ClusterView> {
        self.inner
            .view
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Fetches the topology again and routes by it if it is at least as new.
    ///
    /// # Errors
    /// No server answered the handshake.
    pub async fn refresh_topology(&self) -> Result<()> {
        self.refresh_to_epoch(0).await
    }

    /// Fetches the topology again, asking the endpoints and then the current topology's
    /// cores in order until one serves at least epoch `wanted` (else the newest answer);
    /// routes by it if it is at least as new as the current one.
    async fn refresh_to_epoch(&self, wanted: u64) -> Result<()> {
        #[cfg(feature = "embedded")]
        if self.inner.embedded.is_some() {
            // An embedded topology never changes.
            return Ok(());
        }
        let epoch_before = self.view().topology.epoch;
        let _guard = self.inner.refresh.lock().await;
        let current = self.view();
        if current.topology.epoch > epoch_before && current.topology.epoch >= wanted {
            // Another caller refreshed while we waited.
            return Ok(());
        }
        let settings = &self.inner.settings;
        let mut candidates: Vec<String> = self.inner.config.endpoints.clone();
        for (_, transport) in current.all_transports() {
            if !candidates.iter().any(|known| known == transport.address()) {
                candidates.push(transport.address().to_owned());
            }
        }
        let wanted = wanted.max(current.topology.epoch);
        let handshake = fetch_topology(
            &self.inner.config,
            &candidates,
            settings,
            Some(&current),
            wanted,
        )
        .await?;
        if handshake.topology.epoch < current.topology.epoch {
            return Ok(());
        }
        if handshake.topology.epoch > current.topology.epoch {
            tracing::info!(
                from = current.topology.epoch,
                to = handshake.topology.epoch,
                "topology changed"
            );
        }
        let view = ClusterView::new(
            handshake.topology,
            handshake.health,
            Some(&current),
            |address, _, health| {
                Transport::Remote(Connection::new(
                    address.to_owned(),
                    settings.clone(),
                    health.clone(),
                ))
            },
        )
        .map_err(|error| ClientError::Topology(error.to_string()))?;
        *self
            .inner
            .view
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Arc::new(view);
        Ok(())
    }

    /// Reads a key; `None` if it does not exist.
    ///
    /// # Errors
    /// See [`ClientError`].
    pub async fn get(&self, key: impl AsRef<[u8]>) -> Result<Option<Entry>> {
        let key = key.as_ref();
        check_key(key)?;
        match self
            .call_for_key(key, &Request::Get { key: key.to_vec() })
            .await?
        {
            Response::Value(entry) => Ok(entry),
            other => Err(unexpected(&other)),
        }
    }

    /// Reads a key, with the shard and revision the answer reflects: the key's state at that
    /// revision of its shard. Watching the key after that revision
    /// (`WatchOptions::after`) then misses no later change.
    ///
    /// # Errors
    /// See [`ClientError`]; [`ClientError::UnexpectedReply`] if the server did not say which
    /// revision it answered at.
    pub async fn get_with_revision(
        &self,
        key: impl AsRef<[u8]>,
    ) -> Result<(Option<Entry>, ShardRevision)> {
        let key = key.as_ref();
        check_key(key)?;
        let (stamp, response) = self
            .call_for_key_stamped(key, &Request::Get { key: key.to_vec() })
            .await?;
        match (stamp, response) {
            (Some(stamp), Response::Value(entry)) => Ok((
                entry,
                ShardRevision {
                    node_id: stamp.node_id,
                    core_id: stamp.core_id,
                    revision: stamp.revision,
                },
            )),
            (None, Response::Value(_)) => Err(ClientError::UnexpectedReply(
                "a read answered with no shard revision".to_owned(),
            )),
            (_, other) => Err(unexpected(&other)),
        }
    }

    /// Writes a key unconditionally, with no TTL.
    ///
    /// # Errors
    /// See [`ClientError`].
    pub async fn put(&self, key: impl AsRef<[u8]>, value: impl AsRef<[u8]>) -> Result<PutOutcome> {
        self.put_with(key, value, PutOptions::new()).await
    }

    /// Writes a key with options (TTL, condition, return previous).
    ///
    /// # Errors
    /// See [`ClientError`].
    pub async fn put_with(
        &self,
        key: impl AsRef<[u8]>,
        value: impl AsRef<[u8]>,
        options: PutOptions,
    ) -> Result<PutOutcome> {
        let (key, value) = (key.as_ref(), value.as_ref());
        check_key(key)?;
        check_value(value)?;
        if let PutCondition::IfValue(expected) = &options.condition {
            check_value(expected)?;
        }
        check_fields(&options.fields)?;
        let ttl_ms = options.ttl.map(duration_ms).transpose()?;
        let request = Request::Put(Box::new(Put {
            key: key.to_vec(),
            value: value.to_vec(),
            ttl_ms,
            keep_ttl: options.keep_ttl,
            condition: options.condition,
            return_previous: options.return_previous,
            lease: options.lease,
            fields: options.fields,
        }));
        if let Some(lease) = options.lease {
            tessera_protocol::codec::check_lease(lease)?;
        }
        match self.call_for_key(key, &request).await? {
            Response::Put {
                applied,
                mod_revision,
                version,
                previous,
            } => Ok(PutOutcome {
                applied,
                mod_revision,
                version,
                previous,
            }),
            other => Err(unexpected(&other)),
        }
    }

    /// Removes a key; `true` if it existed.
    ///
    /// # Errors
    /// See [`ClientError`].
    pub async fn delete(&self, key: impl AsRef<[u8]>) -> Result<bool> {
        Ok(self.delete_with(key, DeleteOptions::new()).await?.deleted)
    }

    /// Removes a key with options (a condition, return the removed entry).
    ///
    /// # Errors
    /// See [`ClientError`].
    pub async fn delete_with(
        &self,
        key: impl AsRef<[u8]>,
        options: DeleteOptions,
    ) -> Result<DeleteOutcome> {
        let key = key.as_ref();
        check_key(key)?;
        if let DeleteCondition::IfValue(expected) = &options.condition {
            check_value(expected)?;
        }
        let request = Request::Delete(Box::new(Delete {
            key: key.to_vec(),
            condition: options.condition,
            return_previous: options.return_previous,
        }));
        match self.call_for_key(key, &request).await? {
            Response::Delete {
                deleted,
                version,
                previous,
            } => Ok(DeleteOutcome {
                deleted,
                version,
                previous,
            }),
            other => Err(unexpected(&other)),
        }
    }

    /// Whether a key exists.
    ///
    /// # Errors
    /// See [`ClientError`].
    pub async fn exists(&self, key: impl AsRef<[u8]>) -> Result<bool> {
        let key = key.as_ref();
        check_key(key)?;
        match self
            .call_for_key(key, &Request::Exists { key: key.to_vec() })
            .await?
        {
            Response::Exists { exists } => Ok(exists),
            other => Err(unexpected(&other)),
        }
    }

    /// Sets a key's TTL; `true` if the key existed.
    ///
    /// # Errors
    /// See [`ClientError`].
    pub async fn expire(&self, key: impl AsRef<[u8]>, ttl: Duration) -> Result<bool> {
        let key = key.as_ref();
        check_key(key)?;
        let ttl_ms = duration_ms(ttl)?;
        match self
            .call_for_key(
                key,
                &Request::Expire {
                    key: key.to_vec(),
                    ttl_ms,
                },
            )
            .await?
        {
            Response::Expiry { applied, .. } => Ok(applied),
            other => Err(unexpected(&other)),
        }
    }

    /// Removes a key's TTL; `true` if the key existed and had one.
    ///
    /// # Errors
    /// See [`ClientError`].
    pub async fn persist(&self, key: impl AsRef<[u8]>) -> Result<bool> {
        let key = key.as_ref();
        check_key(key)?;
        match self
            .call_for_key(key, &Request::Persist { key: key.to_vec() })
            .await?
        {
            Response::Expiry { applied, .. } => Ok(applied),
            other => Err(unexpected(&other)),
        }
    }

    /// A key's remaining time to live.
    ///
    /// # Errors
    /// See [`ClientError`].
    pub async fn ttl(&self, key: impl AsRef<[u8]>) -> Result<TtlState> {
        let key = key.as_ref();
        check_key(key)?;
        match self
            .call_for_key(key, &Request::Ttl { key: key.to_vec() })
            .await?
        {
            Response::Ttl(state) => Ok(state),
            other => Err(unexpected(&other)),
        }
    }

    /// Reads many keys, one request per owning core, in parallel. Results are in key order.
    ///
    /// # Errors
    /// See [`ClientError`]; the first failing part fails the call.
    pub async fn mget<K: AsRef<[u8]>>(&self, keys: &[K]) -> Result<Vec<Option<Entry>>> {
        let keys: Vec<&[u8]> = keys.iter().map(AsRef::as_ref).collect();
        keys.iter().try_for_each(|key| check_key(key))?;
        let parts = self
            .call_batch(
                &keys,
                |index| keys[index].len(),
                true,
                |indices| Request::MultiGet {
                    keys: indices.iter().map(|&index| keys[index].to_vec()).collect(),
                },
            )
            .await?;
        let mut values = vec![None; keys.len()];
        for (indices, response) in parts {
            let Response::Values(part) = response else {
                return Err(unexpected(&response));
            };
            scatter(&indices, part, &mut values)?;
        }
        Ok(values)
    }

    /// Writes many keys, one request per owning core, in parallel; returns each entry's new mod
    /// revision, in entry order. Entries on one core are applied at one revision (so they share
    /// a mod revision); the batch is not atomic across cores. The entries get no TTL and no
    /// fields ([`Client::mput_entries`] gives them).
    ///
    /// # Errors
    /// See [`ClientError`]; parts on other cores may have applied.
    pub async fn mput<K: AsRef<[u8]>, V: AsRef<[u8]>>(
        &self,
        entries: &[(K, V)],
    ) -> Result<Vec<u64>> {
        let keys: Vec<&[u8]> = entries.iter().map(|(key, _)| key.as_ref()).collect();
        for (key, value) in entries {
            check_key(key.as_ref())?;
            check_value(value.as_ref())?;
        }
        self.multi_put(
            &keys,
            |index| keys[index].len() + entries[index].1.as_ref().len(),
            |index| PutEntry {
                key: entries[index].0.as_ref().to_vec(),
                value: entries[index].1.as_ref().to_vec(),
                ttl_ms: None,
                fields: Vec::new(),
            },
        )
        .await
    }

    /// Writes many entries, each with its own TTL (`ttl_ms`) and indexed fields, like
    /// [`Client::mput`]: one request per owning core, in parallel; returns each entry's new
    /// mod revision, in entry order. An entry's fields replace the key's, as in
    /// [`PutOptions::field`].
    ///
    /// ```no_run
    /// # async fn example(client: &tessera_client::Client) -> tessera_client::Result<()> {
    /// use tessera_client::{Field, FieldValue, PutEntry};
    ///
    /// let entries: Vec<PutEntry> = (0..100)
    ///     .map(|index| PutEntry {
    ///         key: format!("user:{index}").into_bytes(),
    ///         value: b"{}".to_vec(),
    ///         ttl_ms: None,
    ///         fields: vec![Field::new("age", FieldValue::I64(20 + index % 50))],
    ///     })
    ///     .collect();
    /// client.mput_entries(&entries).await?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`ClientError::InvalidRequest`] for an entry out of bounds (before anything is sent);
    /// otherwise see [`ClientError`]; parts on other cores may have applied.
    pub async fn mput_entries(&self, entries: &[PutEntry]) -> Result<Vec<u64>> {
        let keys: Vec<&[u8]> = entries.iter().map(|entry| entry.key.as_slice()).collect();
        for entry in entries {
            check_key(&entry.key)?;
            check_value(&entry.value)?;
            if let Some(ttl_ms) = entry.ttl_ms {
                check_ttl(ttl_ms)?;
            }
            check_fields(&entry.fields)?;
        }
        self.multi_put(
            &keys,
            |index| {
                let entry = &entries[index];
                entry.key.len() + entry.value.len() + fields_size(&entry.fields)
            },
            |index| entries[index].clone(),
        )
        .await
    }

    /// Sends the entries `entry(index)` of `keys` as `MultiPut`s, one per owning core
    /// (`weight(index)` is one entry's share of a request), and gathers the mod revisions.
    async fn multi_put(
        &self,
        keys: &[&[u8]],
        weight: impl Fn(usize) -> usize,
        entry: impl Fn(usize) -> PutEntry,
    ) -> Result<Vec<u64>> {
        let parts = self
            .call_batch(keys, weight, false, |indices| Request::MultiPut {
                entries: indices.iter().map(|&index| entry(index)).collect(),
            })
            .await?;
        let mut mod_revisions = vec![0; keys.len()];
        for (indices, response) in parts {
            let Response::MultiPut {
                mod_revisions: part,
            } = response
            else {
                return Err(unexpected(&response));
            };
            scatter(&indices, part, &mut mod_revisions)?;
        }
        Ok(mod_revisions)
    }

    /// Removes many keys, one request per owning core, in parallel; returns which existed.
    ///
    /// # Errors
    /// See [`ClientError`]; parts on other cores may have applied.
    pub async fn mdelete<K: AsRef<[u8]>>(&self, keys: &[K]) -> Result<Vec<bool>> {
        let keys: Vec<&[u8]> = keys.iter().map(AsRef::as_ref).collect();
        keys.iter().try_for_each(|key| check_key(key))?;
        let parts = self
            .call_batch(
                &keys,
                |index| keys[index].len(),
                false,
                |indices| Request::MultiDelete {
                    keys: indices.iter().map(|&index| keys[index].to_vec()).collect(),
                },
            )
            .await?;
        let mut deleted = vec![false; keys.len()];
        for (indices, response) in parts {
            let Response::MultiDelete { deleted: part } = response else {
                return Err(unexpected(&response));
            };
            scatter(&indices, part, &mut deleted)?;
        }
        Ok(deleted)
    }

    /// Pings every core of every node and returns their answers in topology order.
    ///
    /// # Errors
    /// The first core that does not answer.
    pub async fn ping(&self) -> Result<Vec<Pong>> {
        let view = self.view();
        let pings = view.all_transports().map(|(_, transport)| async move {
            let started = Instant::now();
            match transport.call(&Request::Ping).await? {
                Response::Pong { node_id, core_id } => Ok(Pong {
                    node_id,
                    core_id,
                    address: transport.address().to_owned(),
                    round_trip: started.elapsed(),
                }),
                Response::Error(reply) => Err(server_error(reply.code, reply.message)),
                other => Err(unexpected(&other)),
            }
        });
        join_all(pings).await.into_iter().collect()
    }

    /// Every core's counters, in topology order.
    ///
    /// # Errors
    /// The first core that does not answer.
    pub async fn stats(&self) -> Result<Vec<CoreStats>> {
        let view = self.view();
        let calls = view.all_transports().map(|(_, transport)| async move {
            match transport.call(&Request::Stats).await? {
                Response::Stats(stats) => Ok(*stats),
                other => Err(unexpected(&other)),
            }
        });
        join_all(calls).await.into_iter().collect()
    }

    /// Sends a single-key request to the key's owner, refreshing the topology and retrying
    /// (bounded) when the server says the key lives elsewhere.
    async fn call_for_key(&self, key: &[u8], request: &Request) -> Result<Response> {
        self.call_for_key_stamped(key, request)
            .await
            .map(|(_, response)| response)
    }

    /// Sends a single-key request to the key's owner, following `WrongShard` a bounded number
    /// of times; returns the response and the shard state it reflects.
    async fn call_for_key_stamped(
        &self,
        key: &[u8],
        request: &Request,
    ) -> Result<(Option<tessera_protocol::ShardStamp>, Response)> {
        let mut attempt = 0;
        loop {
            let view = self.view();
            let transport = view
                .transport(view.routes.owner_of_key(key))
                .ok_or_else(|| {
                    ClientError::Topology("route table names a missing core".to_owned())
                })?;
            match transport.call_stamped(request).await? {
                (_, Response::Error(reply))
                    if reply.code == ErrorCode::WrongShard
                        && attempt < self.inner.config.wrong_shard_retry_max =>
                {
                    attempt += 1;
                    tracing::debug!(attempt, message = %reply.message, "wrong shard; refreshing topology");
                    self.refresh_to_epoch(wrong_shard_epoch(&reply)).await?;
                }
                (_, Response::Error(reply)) => return Err(server_error(reply.code, reply.message)),
                stamped => return Ok(stamped),
            }
        }
    }

    /// Splits a batch by owning core, into parts of at most `BATCH_COUNT_MAX` keys whose
    /// request weighs at most `BATCH_BODY_SIZE_MAX` bytes (`weight(index)` is one item's share),
    /// sends the parts in parallel, and returns each part's key indices with its response.
    ///
    /// Parts answered `WrongShard` are re-routed after a topology refresh, a bounded number of
    /// times. When `split_if_too_large` is set (reads, which are idempotent), a part whose
    /// reply is over the frame limit is halved and sent again, down to single keys.
    async fn call_batch(
        &self,
        keys: &[&[u8]],
        weight: impl Fn(usize) -> usize,
        split_if_too_large: bool,
        build: impl Fn(&[usize]) -> Request,
    ) -> Result<Vec<(Vec<usize>, Response)>> {
        let mut done = Vec::new();
        let mut parts = group_by_owner(&self.view(), keys, 0..keys.len(), &weight);
        let mut attempt = 0;
        while !parts.is_empty() {
            let view = self.view();
            let calls = parts.drain(..).map(|(location, indices)| {
                let request = build(&indices);
                let transport = view.transport(location);
                async move {
                    check_batch(indices.len())?;
                    let transport = transport.ok_or_else(|| {
                        ClientError::Topology("route table names a missing core".to_owned())
                    })?;
                    let response = transport.call(&request).await?;
                    Ok::<_, ClientError>((location, indices, response))
                }
            });
            let mut misrouted = Vec::new();
            let mut wanted_epoch = 0;
            for result in join_all(calls).await {
                let (location, mut indices, response) = result?;
                match response {
                    Response::Error(reply)
                        if reply.code == ErrorCode::WrongShard
                            && attempt < self.inner.config.wrong_shard_retry_max =>
                    {
                        wanted_epoch = wanted_epoch.max(wrong_shard_epoch(&reply));
                        misrouted.extend(indices);
                    }
                    Response::Error(reply)
                        if reply.code == ErrorCode::TooLarge
                            && split_if_too_large
                            && indices.len() > 1 =>
                    {
                        let second_half = indices.split_off(indices.len() / 2);
                        parts.push((location, indices));
                        parts.push((location, second_half));
                    }
                    Response::Error(reply) => return Err(server_error(reply.code, reply.message)),
                    response => done.push((indices, response)),
                }
            }
            if !misrouted.is_empty() {
                attempt += 1;
                self.refresh_to_epoch(wanted_epoch).await?;
                parts.extend(group_by_owner(&self.view(), keys, misrouted, &weight));
            }
        }
        Ok(done)
    }
}

/// Bytes of items one batch request may carry, leaving room for the envelope.
const BATCH_BODY_SIZE_MAX: usize = FRAME_BODY_SIZE_MAX - ENVELOPE_OVERHEAD_MAX;

/// Bytes of archive structure one batch item adds beyond its key and value (relative
/// pointers, lengths, an optional TTL, alignment): see the test `batch_item_overhead_covers_the_archive`.
const BATCH_ITEM_OVERHEAD: usize = 64;

/// Bytes of archive structure one field adds beyond its name and string value (the name's
/// and value's headers, the value's tag, alignment): see the test
/// `field_overhead_covers_the_archive`.
const FIELD_OVERHEAD: usize = 48;

/// The bytes `fields` add to a batch item, for splitting batches by size.
fn fields_size(fields: &[Field]) -> usize {
    fields
        .iter()
        .map(|field| {
            let value_size = match &field.value {
                FieldValue::Str(text) => text.len(),
                _ => 0,
            };
            field.name.len() + value_size + FIELD_OVERHEAD
        })
        .sum()
}

/// Checks an entry's fields as the server will (count, names, sizes, no NaN): archives a
/// put of only them and runs the protocol's check, so the rules live in one place. Costs
/// nothing for an entry without fields.
fn check_fields(fields: &[Field]) -> Result<()> {
    if fields.is_empty() {
        return Ok(());
    }
    let probe = Request::Put(Box::new(Put {
        fields: fields.to_vec(),
        ..Put::new("fields", Vec::new())
    }));
    check_owned_request(&probe)?;
    Ok(())
}

/// Groups `indices` by the core that owns their key, in parts within `BATCH_COUNT_MAX` items
/// and `BATCH_BODY_SIZE_MAX` bytes. Every index lands in exactly one part, in order.
fn group_by_owner(
    view: &ClusterView,
    keys: &[&[u8]],
    indices: impl IntoIterator<Item = usize>,
    weight: &impl Fn(usize) -> usize,
) -> Vec<(ShardLocation, Vec<usize>)> {
    // (owner, indices, bytes); only the last part of each owner is still open.
    let mut parts: Vec<(ShardLocation, Vec<usize>, usize)> = Vec::new();
    for index in indices {
        let location = view.routes.owner_of_key(keys[index]);
        let size = weight(index) + BATCH_ITEM_OVERHEAD;
        let open = parts
            .iter_mut()
            .rev()
            .find(|(owner, _, _)| *owner == location);
        match open {
            Some((_, part, bytes))
                if part.len() < BATCH_COUNT_MAX && *bytes + size <= BATCH_BODY_SIZE_MAX =>
            {
                part.push(index);
                *bytes += size;
            }
            _ => parts.push((location, vec![index], size)),
        }
    }
    parts
        .into_iter()
        .map(|(location, part, _)| (location, part))
        .collect()
}

/// One server's answer to the handshake.
struct Handshake {
    topology: Topology,
    health: Vec<NodeHealth>,
}

/// Asks `candidates` in order for the topology until one serves at least epoch `wanted`;
/// returns that answer, or else the newest one (or the last error if none answered).
async fn fetch_topology(
    config: &ClientConfig,
    candidates: &[String],
    settings: &ConnectionSettings,
    current: Option<&ClusterView>,
    wanted: u64,
) -> Result<Handshake> {
    let hello = Request::Hello {
        protocol_version: PROTOCOL_VERSION,
        client_name: config.client_name.clone(),
    };
    let mut last_error = ClientError::Topology("no endpoint to ask".to_owned());
    let mut newest: Option<Handshake> = None;
    for address in candidates {
        // Reuse a live connection of the current view when the address is one of its cores.
        let reused = current.and_then(|view| {
            view.all_transports()
                .find(|(_, transport)| transport.address() == address)
                .map(|(_, t)| t.clone())
        });
        let answer = match reused {
            Some(transport) => transport.call(&hello).await,
            None => Connection::new(address.clone(), settings.clone(), Arc::default())
                .call(&hello)
                .await
                .map(|(_, response)| response),
        };
        match answer {
            Ok(Response::Hello {
                topology,
                protocol_version,
                health,
                ..
            }) if protocol_version == PROTOCOL_VERSION => {
                if topology.epoch >= wanted {
                    return Ok(Handshake { topology, health });
                }
                tracing::debug!(%address, epoch = topology.epoch, wanted, "topology older than wanted");
                if newest
                    .as_ref()
                    .is_none_or(|known| known.topology.epoch < topology.epoch)
                {
                    newest = Some(Handshake { topology, health });
                }
                continue;
            }
            Ok(Response::Hello {
                protocol_version, ..
            }) => {
                last_error = ClientError::Server {
                    code: ErrorCode::UnsupportedVersion,
                    message: format!("{address} speaks protocol {protocol_version}, client speaks {PROTOCOL_VERSION}"),
                };
            }
            Ok(Response::Error(reply)) => last_error = server_error(reply.code, reply.message),
            Ok(other) => last_error = unexpected(&other),
            Err(error) => last_error = error,
        }
        tracing::debug!(%address, error = %last_error, "handshake failed");
    }
    newest.ok_or(last_error)
}

/// The epoch a `WrongShard` reply was decided under (0 if it does not say).
fn wrong_shard_epoch(reply: &tessera_protocol::ErrorReply) -> u64 {
    reply.wrong_shard.as_ref().map_or(0, |wrong| wrong.epoch)
}

/// Refreshes the topology every `interval` and whenever a node marked down answers again,
/// until the client is dropped.
async fn keep_topology_fresh(
    inner: std::sync::Weak<Inner>,
    recovered: Arc<tokio::sync::Notify>,
    interval: Option<Duration>,
) {
    loop {
        match interval {
            Some(interval) => {
                tokio::select! {
                    () = recovered.notified() => {}
                    () = tokio::time::sleep(interval) => {}
                }
            }
            None => recovered.notified().await,
        }
        let Some(inner) = inner.upgrade() else { return };
        let client = Client { inner };
        if let Err(error) = client.refresh_topology().await {
            tracing::debug!(%error, "background topology refresh failed");
        }
    }
}

fn duration_ms(duration: Duration) -> Result<u64> {
    let ttl_ms = u64::try_from(duration.as_millis()).unwrap_or(u64::MAX);
    check_ttl(ttl_ms)?;
    Ok(ttl_ms)
}

/// The wait before the `failures`-th retry in a row: `base` doubled per failure up to `cap`,
/// with up to a quarter more at random so many clients do not retry in step.
pub(crate) fn jittered_backoff(failures: u32, base: Duration, cap: Duration) -> Duration {
    let wait = base.saturating_mul(1 << failures.min(16)).min(cap);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.subsec_nanos());
    let jitter_nanos = u128::from(nanos) % (wait.as_nanos() / 4 + 1);
    wait + Duration::from_nanos(u64::try_from(jitter_nanos).unwrap_or(0))
}

fn scatter<T>(indices: &[usize], part: Vec<T>, out: &mut [T]) -> Result<()> {
    if part.len() != indices.len() {
        return Err(ClientError::UnexpectedReply(format!(
            "batch part has {} results for {} keys",
            part.len(),
            indices.len()
        )));
    }
    for (&index, value) in indices.iter().zip(part) {
        out[index] = value;
    }
    Ok(())
}

fn unexpected(response: &Response) -> ClientError {
    match response {
        Response::Error(reply) => server_error(reply.code, reply.message.clone()),
        other => ClientError::UnexpectedReply(format!("{other:?}")),
    }
}

#[cfg(test)]
mod tests {
    use tessera_protocol::codec::{encode_request_body, FrameBuffer};

    use super::*;

    fn multi_put_body_size(entry_count: usize, key_size: usize, value_size: usize) -> usize {
        let entries = (0..entry_count)
            .map(|index| PutEntry {
                key: vec![u8::try_from(index % 256).unwrap(); key_size],
                value: vec![7; value_size],
                ttl_ms: Some(1),
                fields: Vec::new(),
            })
            .collect();
        let mut body = FrameBuffer::new();
        encode_request_body(&mut body, &Request::MultiPut { entries }).unwrap();
        body.len()
    }

    fn multi_put_with_fields_body_size(field_count: usize, name_size: usize) -> usize {
        let fields: Vec<Field> = (0..field_count)
            .map(|index| {
                let mut name = "n".repeat(name_size);
                name.push_str(&index.to_string());
                Field::new(name, FieldValue::Str("v".repeat(100)))
            })
            .collect();
        let entries = vec![PutEntry {
            key: b"k".to_vec(),
            value: b"v".to_vec(),
            ttl_ms: None,
            fields,
        }];
        let mut body = FrameBuffer::new();
        encode_request_body(&mut body, &Request::MultiPut { entries }).unwrap();
        body.len()
    }

    #[test]
    fn field_overhead_covers_the_archive() {
        for name_size in [1, 9, 60] {
            let none = multi_put_with_fields_body_size(0, name_size);
            let many = multi_put_with_fields_body_size(10, name_size);
            let fields: Vec<Field> = (0..10)
                .map(|index| {
                    Field::new(
                        format!("{}{index}", "n".repeat(name_size)),
                        FieldValue::Str("v".repeat(100)),
                    )
                })
                .collect();
            assert!(
                many - none <= fields_size(&fields),
                "name_size={name_size} archived={} estimated={}",
                many - none,
                fields_size(&fields)
            );
        }
    }

    #[test]
    fn fields_are_checked_before_sending() {
        let too_many: Vec<Field> = (0..=tessera_protocol::limits::FIELDS_PER_VALUE_MAX)
            .map(|index| Field::new(format!("f{index}"), FieldValue::I64(1)))
            .collect();
        assert!(matches!(
            check_fields(&too_many),
            Err(ClientError::InvalidRequest(
                tessera_protocol::RequestError::TooManyFields { .. }
            ))
        ));
        let twice = vec![
            Field::new("a", FieldValue::I64(1)),
            Field::new("a", FieldValue::Bool(true)),
        ];
        assert!(matches!(
            check_fields(&twice),
            Err(ClientError::InvalidRequest(
                tessera_protocol::RequestError::BadField { .. }
            ))
        ));
        assert!(check_fields(&[]).is_ok());
        assert!(check_fields(&too_many[..3]).is_ok());
    }

    #[test]
    fn batch_item_overhead_covers_the_archive() {
        for (key_size, value_size) in [(1, 0), (3, 5), (16, 32), (1000, 1), (4096, 65_536)] {
            let one = multi_put_body_size(1, key_size, value_size);
            let many = multi_put_body_size(101, key_size, value_size);
            let per_item_overhead = (many - one) / 100 - key_size - value_size;
            assert!(
                per_item_overhead <= BATCH_ITEM_OVERHEAD,
                "key_size={key_size} value_size={value_size} overhead={per_item_overhead}"
            );
            assert!(one - key_size - value_size <= ENVELOPE_OVERHEAD_MAX);
        }
    }
}
