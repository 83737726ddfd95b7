//! A synchronous client for scripts, tools and the CLI: the async [`Client`] driven by a
//! private single-threaded tokio runtime. Each call blocks the calling thread until its reply.

use std::time::Duration;

use crate::{
    Client, ClientConfig, ClientError, DeleteOutcome, Entry, KeyRange, Pong, PutOptions,
    PutOutcome, Result, ScanOptions, ScanResult, ShardRevision, Topology, TtlState,
};

/// A blocking handle to a Tessera cluster (or an embedded one).
#[derive(Debug)]
pub struct BlockingClient {
    runtime: tokio::runtime::Runtime,
    client: Client,
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
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
        return_previous: bool,
    ) -> Result<DeleteOutcome> {
        self.runtime
            .block_on(self.client.delete_with(key, return_previous))
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
