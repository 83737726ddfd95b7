//! A synchronous client for scripts, tools and the CLI: the async [`Client`] driven by a
//! private tokio runtime with one worker thread. Each call blocks the calling thread until
//! its reply.
//!
//! The runtime's worker runs in the background, so a [`Lease`] handle is renewed between
//! calls and a [`BlockingWatch`] keeps receiving into its bounded buffer while it is not
//! iterated: a consumer that stops reading for long enough gets [`ClientError::Lagged`], as
//! with the async [`Watch`] it wraps.

use std::sync::mpsc::RecvTimeoutError;
use std::time::Duration;

use futures_util::StreamExt;

use crate::{
    AddOptions, Client, ClientConfig, ClientError, CounterOutcome, DeleteOptions, DeleteOutcome,
    Entry, IndexChange, IndexSpec, IndexStatus, KeyRange, Lease, LeaseInfo, LockGrant, Optimistic,
    Pong, PutEntry, PutOptions, PutOutcome, QueryOptions, QueryResult, Result, ScanOptions,
    ScanResult, ShardRevision, Topology, TtlState, Txn, TxnOp, TxnOutcome, Watch, WatchMessage,
    WatchOptions,
};

/// Times the runtime yields when a [`BlockingWatch`] is dropped, so its aborted shard tasks
/// are dropped and their `Unwatch` requests written (a few scheduler steps; one suffices on
/// an idle connection). Best effort: a connection whose writes are stuck ends the watch when
/// it closes instead.
const WATCH_DROP_YIELD_COUNT: usize = 8;

/// A blocking handle to a Tessera cluster (or an embedded one).
#[derive(Debug)]
pub struct BlockingClient {
    runtime: tokio::runtime::Runtime,
    client: Client,
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("tessera-client")
        .enable_all()
        .build()
        .map_err(|error| ClientError::Topology(format!("cannot start the client runtime: {error}")))
}

impl BlockingClient {
    /// Connects through the first reachable endpoint.
    ///
    /// # Errors
    /// No endpoint answered the handshake.
    pub fn connect<I, S>(endpoints: I) -> Result<Self>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self::connect_with(ClientConfig::new(endpoints))
    }

    /// Connects with explicit settings.
    ///
    /// # Errors
    /// No endpoint answered the handshake.
    pub fn connect_with(config: ClientConfig) -> Result<Self> {
        let runtime = runtime()?;
        let client = runtime.block_on(Client::connect_with(config))?;
        Ok(Self { runtime, client })
    }

    /// Runs the shards in this process (see [`Client::embedded`]).
    ///
    /// # Errors
    /// The configuration is invalid or a core cannot start.
    #[cfg(feature = "embedded")]
    pub fn embedded(config: crate::EmbeddedConfig) -> Result<Self> {
        Ok(Self {
            runtime: runtime()?,
            client: Client::embedded(config)?,
        })
    }

    /// The async client inside.
    #[must_use]
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// See [`Client::topology`].
    #[must_use]
    pub fn topology(&self) -> Topology {
        self.client.topology()
    }

    /// See [`Client::scan`].
    ///
    /// # Errors
    /// See [`ClientError`].
    pub fn scan(&self, range: &KeyRange, options: ScanOptions) -> Result<ScanResult> {
        self.runtime.block_on(self.client.scan(range, options))
    }

    /// See [`Client::watch`]: the same messages, one per call of [`Iterator::next`], which
    /// blocks until the next one arrives. The iterator yields at most one error, then ends.
    ///
    /// ```no_run
    /// # fn example() -> tessera_client::Result<()> {
    /// use tessera_client::{BlockingClient, KeyRange, WatchMessage, WatchOptions};
    ///
    /// let client = BlockingClient::connect(["127.0.0.1:7000"])?;
    /// for message in client.watch(&KeyRange::prefix("user:"), WatchOptions::new())? {
    ///     if let WatchMessage::Events { shard, events } = message? {
    ///         println!("{} events at revision {}", events.len(), shard.revision);
    ///     }
    /// }
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// See [`Client::watch`]; errors of the watch itself come from the iterator.
    pub fn watch(&self, range: &KeyRange, options: WatchOptions) -> Result<BlockingWatch<'_>> {
        // Inside the runtime: the watch spawns its shard tasks on it.
        let watch = self.runtime.block_on(self.client.watch(range, options))?;
        Ok(BlockingWatch {
            runtime: &self.runtime,
            watch: Some(watch),
        })
    }

    /// See [`Client::count`].
    ///
    /// # Errors
    /// See [`ClientError`].
    pub fn count(&self, range: &KeyRange) -> Result<(u64, Vec<ShardRevision>)> {
        self.runtime.block_on(self.client.count(range))
    }

    /// See [`Client::get`].
    ///
    /// # Errors
    /// See [`ClientError`].
    pub fn get(&self, key: impl AsRef<[u8]>) -> Result<Option<Entry>> {
        self.runtime.block_on(self.client.get(key))
    }

    /// See [`Client::put`].
    ///
    /// # Errors
    /// See [`ClientError`].
    pub fn put(&self, key: impl AsRef<[u8]>, value: impl AsRef<[u8]>) -> Result<PutOutcome> {
        self.runtime.block_on(self.client.put(key, value))
    }

    /// See [`Client::put_with`].
    ///
    /// # Errors
    /// See [`ClientError`].
    pub fn put_with(
        &self,
        key: impl AsRef<[u8]>,
        value: impl AsRef<[u8]>,
        options: PutOptions,
    ) -> Result<PutOutcome> {
        self.runtime
            .block_on(self.client.put_with(key, value, options))
    }

    /// See [`Client::delete`].
    ///
    /// # Errors
    /// See [`ClientError`].
    pub fn delete(&self, key: impl AsRef<[u8]>) -> Result<bool> {
        self.runtime.block_on(self.client.delete(key))
    }

    /// See [`Client::delete_with`].
    ///
    /// # Errors
    /// See [`ClientError`].
    pub fn delete_with(
        &self,
        key: impl AsRef<[u8]>,
        options: DeleteOptions,
    ) -> Result<DeleteOutcome> {
        self.runtime.block_on(self.client.delete_with(key, options))
    }

    /// See [`Client::exists`].
    ///
    /// # Errors
    /// See [`ClientError`].
    pub fn exists(&self, key: impl AsRef<[u8]>) -> Result<bool> {
        self.runtime.block_on(self.client.exists(key))
    }

    /// See [`Client::expire`].
    ///
    /// # Errors
    /// See [`ClientError`].
    pub fn expire(&self, key: impl AsRef<[u8]>, ttl: Duration) -> Result<bool> {
        self.runtime.block_on(self.client.expire(key, ttl))
    }

    /// See [`Client::persist`].
    ///
    /// # Errors
    /// See [`ClientError`].
    pub fn persist(&self, key: impl AsRef<[u8]>) -> Result<bool> {
        self.runtime.block_on(self.client.persist(key))
    }

    /// See [`Client::add`].
    ///
    /// # Errors
    /// See [`ClientError`].
    pub fn add(&self, key: impl AsRef<[u8]>, delta: i64) -> Result<i64> {
        self.runtime.block_on(self.client.add(key, delta))
    }

    /// See [`Client::add_with`].
    ///
    /// # Errors
    /// See [`Client::add_with`].
    pub fn add_with(
        &self,
        key: impl AsRef<[u8]>,
        delta: i64,
        options: AddOptions,
    ) -> Result<CounterOutcome> {
        self.runtime
            .block_on(self.client.add_with(key, delta, options))
    }

    /// See [`Client::counter`].
    ///
    /// # Errors
    /// See [`Client::counter`].
    pub fn counter(&self, key: impl AsRef<[u8]>) -> Result<Option<i64>> {
        self.runtime.block_on(self.client.counter(key))
    }

    /// See [`Client::set_counter`].
    ///
    /// # Errors
    /// See [`ClientError`].
    pub fn set_counter(&self, key: impl AsRef<[u8]>, value: i64) -> Result<PutOutcome> {
        self.runtime.block_on(self.client.set_counter(key, value))
    }

    /// See [`Client::compare_and_set_counter`].
    ///
    /// # Errors
    /// See [`ClientError`].
    pub fn compare_and_set_counter(
        &self,
        key: impl AsRef<[u8]>,
        current: i64,
        new: i64,
    ) -> Result<bool> {
        self.runtime
            .block_on(self.client.compare_and_set_counter(key, current, new))
    }

    /// See [`Client::lease`]. The lease is renewed in the background (by the runtime's
    /// worker) until the handle is dropped.
    ///
    /// # Errors
    /// See [`Client::lease`].
    pub fn lease(&self, ttl: Duration) -> Result<Lease> {
        self.runtime.block_on(self.client.lease(ttl))
    }

    /// See [`Client::grant_lease`].
    ///
    /// # Errors
    /// See [`Client::grant_lease`].
    pub fn grant_lease(&self, ttl: Duration) -> Result<u64> {
        self.runtime.block_on(self.client.grant_lease(ttl))
    }

    /// See [`Client::keepalive`].
    ///
    /// # Errors
    /// See [`Client::keepalive`].
    pub fn keepalive(&self, ids: &[u64]) -> Result<Vec<Option<Duration>>> {
        self.runtime.block_on(self.client.keepalive(ids))
    }

    /// See [`Client::revoke_lease`].
    ///
    /// # Errors
    /// See [`Client::revoke_lease`].
    pub fn revoke_lease(&self, id: u64) -> Result<bool> {
        self.runtime.block_on(self.client.revoke_lease(id))
    }

    /// See [`Client::lease_info`].
    ///
    /// # Errors
    /// See [`Client::lease_info`].
    pub fn lease_info(&self, id: u64) -> Result<Option<LeaseInfo>> {
        self.runtime.block_on(self.client.lease_info(id))
    }

    /// See [`Client::leases`].
    ///
    /// # Errors
    /// See [`Client::leases`].
    pub fn leases(&self) -> Result<Vec<u64>> {
        self.runtime.block_on(self.client.leases())
    }

    /// See [`Client::lock`].
    ///
    /// # Errors
    /// See [`Client::lock`].
    pub fn lock(
        &self,
        name: impl AsRef<[u8]>,
        lease: u64,
        wait: Duration,
    ) -> Result<Option<LockGrant>> {
        self.runtime.block_on(self.client.lock(name, lease, wait))
    }

    /// See [`Client::unlock`].
    ///
    /// # Errors
    /// See [`Client::unlock`].
    pub fn unlock(&self, name: impl AsRef<[u8]>, token: u64) -> Result<bool> {
        self.runtime.block_on(self.client.unlock(name, token))
    }

    /// See [`Client::put_fenced`].
    ///
    /// # Errors
    /// See [`Client::put_fenced`].
    pub fn put_fenced(
        &self,
        key: impl AsRef<[u8]>,
        value: impl AsRef<[u8]>,
        lock: impl AsRef<[u8]>,
        token: u64,
    ) -> Result<bool> {
        self.runtime
            .block_on(self.client.put_fenced(key, value, lock, token))
    }

    /// Runs a future of the async [`Client`] (from [`BlockingClient::client`]) on this
    /// client's runtime, blocking until it finishes.
    pub fn block_on<F: std::future::Future>(&self, future: F) -> F::Output {
        self.runtime.block_on(future)
    }

    /// See [`Client::txn`].
    ///
    /// # Errors
    /// See [`Client::txn`].
    pub fn txn(&self, txn: Txn) -> Result<TxnOutcome> {
        self.runtime.block_on(self.client.txn(txn))
    }

    /// See [`Client::optimistic`].
    ///
    /// # Errors
    /// See [`Client::optimistic`].
    pub fn optimistic<K, T, F>(
        &self,
        keys: &[K],
        retry: Optimistic,
        decide: F,
    ) -> Result<(T, TxnOutcome)>
    where
        K: AsRef<[u8]>,
        F: FnMut(&[Option<Entry>]) -> Result<(Vec<TxnOp>, T)>,
    {
        self.runtime
            .block_on(self.client.optimistic(keys, retry, decide))
    }

    /// See [`Client::ttl`].
    ///
    /// # Errors
    /// See [`ClientError`].
    pub fn ttl(&self, key: impl AsRef<[u8]>) -> Result<TtlState> {
        self.runtime.block_on(self.client.ttl(key))
    }

    /// See [`Client::mget`].
    ///
    /// # Errors
    /// See [`ClientError`].
    pub fn mget<K: AsRef<[u8]>>(&self, keys: &[K]) -> Result<Vec<Option<Entry>>> {
        self.runtime.block_on(self.client.mget(keys))
    }

    /// See [`Client::mput`].
    ///
    /// # Errors
    /// See [`ClientError`].
    pub fn mput<K: AsRef<[u8]>, V: AsRef<[u8]>>(&self, entries: &[(K, V)]) -> Result<Vec<u64>> {
        self.runtime.block_on(self.client.mput(entries))
    }

    /// See [`Client::mput_entries`].
    ///
    /// # Errors
    /// See [`ClientError`].
    pub fn mput_entries(&self, entries: &[PutEntry]) -> Result<Vec<u64>> {
        self.runtime.block_on(self.client.mput_entries(entries))
    }

    /// See [`Client::create_index`].
    ///
    /// # Errors
    /// See [`Client::create_index`].
    pub fn create_index(&self, spec: &IndexSpec) -> Result<IndexChange> {
        self.runtime.block_on(self.client.create_index(spec))
    }

    /// See [`Client::drop_index`].
    ///
    /// # Errors
    /// See [`Client::drop_index`].
    pub fn drop_index(&self, name: &str) -> Result<IndexChange> {
        self.runtime.block_on(self.client.drop_index(name))
    }

    /// See [`Client::list_indexes`].
    ///
    /// # Errors
    /// See [`ClientError`].
    pub fn list_indexes(&self) -> Result<Vec<IndexStatus>> {
        self.runtime.block_on(self.client.list_indexes())
    }

    /// See [`Client::query`].
    ///
    /// ```no_run
    /// # fn example() -> tessera_client::Result<()> {
    /// use tessera_client::{BlockingClient, QueryOptions};
    ///
    /// let client = BlockingClient::connect(["127.0.0.1:7000"])?;
    /// let page = client.query(&QueryOptions::new().prefix("user:").filter_text("age >= 20")?)?;
    /// println!("{} matches, more: {}", page.items.len(), page.has_more());
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// See [`Client::query`].
    pub fn query(&self, options: &QueryOptions) -> Result<QueryResult> {
        self.runtime.block_on(self.client.query(options))
    }

    /// See [`Client::mdelete`].
    ///
    /// # Errors
    /// See [`ClientError`].
    pub fn mdelete<K: AsRef<[u8]>>(&self, keys: &[K]) -> Result<Vec<bool>> {
        self.runtime.block_on(self.client.mdelete(keys))
    }

    /// See [`Client::ping`].
    ///
    /// # Errors
    /// See [`ClientError`].
    pub fn ping(&self) -> Result<Vec<Pong>> {
        self.runtime.block_on(self.client.ping())
    }

    /// See [`Client::cluster_status`].
    ///
    /// # Errors
    /// See [`ClientError`].
    pub fn cluster_status(&self) -> Result<crate::ClusterStatus> {
        self.runtime.block_on(self.client.cluster_status())
    }

    /// See [`Client::stats`].
    ///
    /// # Errors
    /// See [`ClientError`].
    pub fn stats(&self) -> Result<Vec<crate::CoreStats>> {
        self.runtime.block_on(self.client.stats())
    }

    /// See [`Client::refresh_topology`].
    ///
    /// # Errors
    /// See [`ClientError`].
    pub fn refresh_topology(&self) -> Result<()> {
        self.runtime.block_on(self.client.refresh_topology())
    }

    /// See [`Client::shutdown`].
    pub fn shutdown(&self) {
        self.client.shutdown();
    }
}

/// An open watch of a [`BlockingClient`]: an [`Iterator`] of the [`WatchMessage`]s of
/// [`Watch`], each `next` blocking until one arrives. It yields at most one error and then
/// ends. Drop it to stop watching.
#[derive(Debug)]
pub struct BlockingWatch<'client> {
    /// The client's runtime, which runs the watch's shard tasks while a call blocks in it.
    runtime: &'client tokio::runtime::Runtime,
    /// Always `Some` until dropped; taken in `drop` to be dropped inside the runtime.
    watch: Option<Watch>,
}

impl BlockingWatch<'_> {
    /// See [`Watch::positions`]: the last revision yielded from each shard, to pass to
    /// [`WatchOptions::after`] when resuming.
    #[must_use]
    pub fn positions(&self) -> Vec<ShardRevision> {
        self.inner().positions()
    }

    /// See [`Watch::request_progress`]. The notifications arrive through the iterator.
    pub fn request_progress(&self) {
        self.inner().request_progress();
    }

    /// Like [`Iterator::next`], but waits at most `timeout`: `Ok` with what the watch
    /// yielded, [`RecvTimeoutError::Timeout`] if nothing arrived in time (nothing is lost,
    /// call again), or [`RecvTimeoutError::Disconnected`] once the watch has ended.
    ///
    /// # Errors
    /// Only the two above; errors of the watch itself are inside `Ok`.
    pub fn next_timeout(
        &mut self,
        timeout: Duration,
    ) -> std::result::Result<Result<WatchMessage>, RecvTimeoutError> {
        let runtime = self.runtime;
        let watch = self.inner_mut();
        // The receiving end of the stream is cancel-safe: a message is never lost by
        // dropping `next` midway.
        match runtime.block_on(async { tokio::time::timeout(timeout, watch.next()).await }) {
            Ok(Some(item)) => Ok(item),
            Ok(None) => Err(RecvTimeoutError::Disconnected),
            Err(_elapsed) => Err(RecvTimeoutError::Timeout),
        }
    }

    fn inner(&self) -> &Watch {
        self.watch
            .as_ref()
            .expect("the watch is only taken when dropped")
    }

    fn inner_mut(&mut self) -> &mut Watch {
        self.watch
            .as_mut()
            .expect("the watch is only taken when dropped")
    }
}

impl Iterator for BlockingWatch<'_> {
    type Item = Result<WatchMessage>;

    fn next(&mut self) -> Option<Self::Item> {
        let runtime = self.runtime;
        runtime.block_on(self.inner_mut().next())
    }
}

impl Drop for BlockingWatch<'_> {
    fn drop(&mut self) {
        let watch = self.watch.take();
        // The runtime must run briefly for the watch to end on the server now rather than at
        // the client's next call. It cannot be entered from inside another runtime; there the
        // tasks end with the client's runtime instead.
        if tokio::runtime::Handle::try_current().is_ok() {
            return;
        }
        self.runtime.block_on(async move {
            drop(watch);
            for _ in 0..WATCH_DROP_YIELD_COUNT {
                tokio::task::yield_now().await;
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use tessera_server::{Config, Server};

    use super::*;
    use crate::EventKind;

    /// Longest any step of a test may wait.
    const STEP_TIMEOUT: Duration = Duration::from_secs(20);

    fn start_server() -> Server {
        Server::start(Config {
            cores: 2,
            port: 0,
            memory_bytes_max: 64 * 1024 * 1024,
            durability: tessera_server::config::Durability::Memory,
            ..Config::default()
        })
        .expect("the test server starts")
    }

    /// Calls `next_timeout` until `matches` accepts a message, within [`STEP_TIMEOUT`].
    fn next_matching(
        watch: &mut BlockingWatch<'_>,
        mut matches: impl FnMut(&WatchMessage) -> bool,
    ) -> WatchMessage {
        let deadline = Instant::now() + STEP_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "no matching message within {STEP_TIMEOUT:?}"
            );
            match watch.next_timeout(left) {
                Ok(Ok(message)) if matches(&message) => return message,
                Ok(Ok(_)) | Err(RecvTimeoutError::Timeout) => {}
                Ok(Err(error)) => panic!("the watch failed: {error}"),
                Err(RecvTimeoutError::Disconnected) => panic!("the watch ended"),
            }
        }
    }

    fn watcher_count(client: &BlockingClient) -> u64 {
        let stats = client.stats().expect("stats");
        stats.iter().map(|core| core.watcher_count).sum()
    }

    #[test]
    fn blocking_watch_iterates_resumes_and_ends_on_drop() {
        let server = start_server();
        let client = BlockingClient::connect(server.addresses()).expect("connect");
        // Its own runtime: its calls must not run the watching client's.
        let observer = BlockingClient::connect(server.addresses()).expect("connect");
        let mut watch = client
            .watch(&KeyRange::prefix("b/"), WatchOptions::new())
            .expect("the watch opens");
        // Every core's progress: from then on every write is seen.
        watch.request_progress();
        let mut reported = Vec::new();
        while reported.len() < 2 {
            if let WatchMessage::Progress(shard) = next_matching(&mut watch, |_| true) {
                if !reported.contains(&shard.core_id) {
                    reported.push(shard.core_id);
                }
            }
        }
        assert_eq!(watch.positions().len(), 2, "{:?}", watch.positions());
        assert!(
            matches!(
                watch.next_timeout(Duration::from_millis(20)),
                Err(RecvTimeoutError::Timeout)
            ),
            "nothing happened"
        );

        let put = client.put("b/1", "one").expect("put");
        // The iterator, blocking in `next`, sees it.
        let message = watch
            .by_ref()
            .find(|message| matches!(message, Ok(WatchMessage::Events { .. })))
            .expect("the watch goes on")
            .expect("no error");
        let WatchMessage::Events { shard, events } = message else {
            unreachable!("filtered above")
        };
        assert_eq!(shard.revision, put.mod_revision);
        assert_eq!(events.len(), 1, "{events:?}");
        assert_eq!(events[0].key, b"b/1");
        assert!(matches!(events[0].kind, EventKind::Put { version: 1, .. }));
        let positions = watch.positions();
        assert!(positions.contains(&shard), "{positions:?}");
        assert_eq!(watcher_count(&observer), 2, "one watcher per core");

        // Dropping it ends it on the server, not only at the client's next call.
        drop(watch);
        let deadline = Instant::now() + STEP_TIMEOUT;
        while watcher_count(&observer) > 0 {
            assert!(Instant::now() < deadline, "the watchers outlived the watch");
            std::thread::sleep(Duration::from_millis(10));
        }

        // Resuming from the positions sees only what came after them.
        client.delete("b/1").expect("delete");
        let mut resumed = client
            .watch(
                &KeyRange::prefix("b/"),
                WatchOptions::new().after(positions),
            )
            .expect("the resume opens");
        let message = next_matching(&mut resumed, |message| {
            matches!(message, WatchMessage::Events { .. })
        });
        let WatchMessage::Events { events, .. } = message else {
            unreachable!("matched above")
        };
        assert_eq!(events.len(), 1, "{events:?}");
        assert_eq!(events[0].kind, EventKind::Deleted);
        drop(resumed);
        drop(client);
        server.shutdown().expect("the server stops cleanly");
    }
}
