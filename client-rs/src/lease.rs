//! Leases: a TTL that the client renews in the background, and keys attached to it that the
//! server deletes when it ends (revoked, or not renewed in time).
//!
//! A lease lives on one shard, its *home*, whose id it carries (`LeaseId`); the home's timing
//! wheel decides when it expires. [`Client::lease`] grants one and returns a [`Lease`] handle
//! that the client keeps alive until the handle is dropped: one keeper task per client renews
//! every handle's lease at a third of its TTL, with one `LeaseKeepalive` request per home core
//! for all the leases due at once, so thousands of leases cost a few requests per round.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use tessera_protocol::limits::BATCH_COUNT_MAX;
use tessera_protocol::{LeaseId, Request, Response, ShardLocation};

use crate::routing::ClusterView;
use crate::{duration_ms, unexpected, Client, ClientError, Inner, Result};

/// A lease kept alive in the background while this handle lives. Dropping it stops the
/// renewals (the lease then ends after its TTL); [`Lease::revoke`] ends it now.
#[derive(Debug)]
pub struct Lease {
    id: u64,
    ttl: Duration,
    alive: Arc<AtomicBool>,
    keeper: Arc<Keeper>,
}

impl Lease {
    /// The lease's id, to attach keys with [`crate::PutOptions::lease`].
    #[must_use]
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The TTL it was granted with.
    #[must_use]
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// False once a renewal found the lease ended (it expired before a renewal reached its
    /// home, or was revoked): its keys are gone, and it does not come back.
    #[must_use]
    pub fn is_alive(&self) -> bool {
        self.alive.load(Ordering::Acquire)
    }

    /// Ends the lease now: the server deletes every key attached to it. `true` if it was
    /// still alive.
    ///
    /// # Errors
    /// See [`ClientError`].
    pub async fn revoke(self, client: &Client) -> Result<bool> {
        self.keeper.forget(self.id);
        client.revoke_lease(self.id).await
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.keeper.forget(self.id);
    }
}

/// What the server knows of a lease ([`Client::lease_info`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseInfo {
    /// The lease.
    pub id: u64,
    /// The TTL it was granted with.
    pub ttl: Duration,
    /// Time left before it expires, unless renewed.
    pub remaining: Duration,
    /// The keys attached to it, on every shard, in key order.
    pub keys: Vec<Vec<u8>>,
    /// Whether some shard held more attached keys than it listed.
    pub more: bool,
}

/// The leases a client keeps alive, and the task that renews them.
#[derive(Debug, Default)]
pub(crate) struct Keeper {
    kept: Mutex<HashMap<u64, Kept>>,
    wake: tokio::sync::Notify,
    is_running: AtomicBool,
    /// Spreads grants over the cores.
    next_core: AtomicUsize,
}

#[derive(Debug)]
struct Kept {
    ttl: Duration,
    due: Instant,
    alive: Arc<AtomicBool>,
}

/// How often a lease is renewed: three times per TTL, so two renewals may be lost in a row.
const RENEWALS_PER_TTL: u32 = 3;

impl Keeper {
    /// A keeper whose grants start at a core picked from the clock, so clients that grant
    /// once each (a CLI run) still spread their leases over the cores.
    pub(crate) fn new() -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |elapsed| elapsed.subsec_nanos());
        Self {
            next_core: AtomicUsize::new(nanos as usize),
            ..Self::default()
        }
    }

    fn kept(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Kept>> {
        self.kept.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn keep(&self, id: u64, ttl: Duration, alive: Arc<AtomicBool>) {
        let due = Instant::now() + ttl / RENEWALS_PER_TTL;
        self.kept().insert(id, Kept { ttl, due, alive });
        self.wake.notify_one();
    }

    fn forget(&self, id: u64) {
        self.kept().remove(&id);
    }

    /// The ids due by `now`, each moved to its next renewal.
    fn take_due(&self, now: Instant) -> Vec<u64> {
        let mut kept = self.kept();
        kept.iter_mut()
            .filter(|(_, lease)| lease.due <= now)
            .map(|(id, lease)| {
                lease.due = now + lease.ttl / RENEWALS_PER_TTL;
                *id
            })
            .collect()
    }

    fn next_due(&self) -> Option<Instant> {
        self.kept().values().map(|lease| lease.due).min()
    }

    /// Records a renewal's answer: a lease the server no longer has is lost. A renewal that
    /// failed to reach the server is tried again soon, well within the TTL.
    fn settle(&self, id: u64, outcome: Result<Option<u64>>) {
        let mut kept = self.kept();
        match outcome {
            Ok(Some(_)) => {}
            Ok(None) => {
                if let Some(lost) = kept.remove(&id) {
                    lost.alive.store(false, Ordering::Release);
                    tracing::warn!(lease = id, "lease ended before it was renewed");
                }
            }
            Err(error) => {
                tracing::debug!(lease = id, %error, "renewal failed; retrying soon");
                if let Some(lease) = kept.get_mut(&id) {
                    lease.due = Instant::now() + (lease.ttl / 10).min(Duration::from_millis(500));
                }
            }
        }
    }
}

/// Renews the kept leases of the client behind `inner` until the client is gone.
async fn keep_alive(inner: Weak<Inner>, keeper: Arc<Keeper>) {
    loop {
        let wait = keeper.next_due().map_or(Duration::from_secs(1), |due| {
            due.saturating_duration_since(Instant::now())
        });
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = keeper.wake.notified() => {}
        }
        let Some(inner) = inner.upgrade() else { return };
        let client = Client { inner };
        let due = keeper.take_due(Instant::now());
        if due.is_empty() {
            continue;
        }
        for (id, outcome) in client.renew(&due).await {
            keeper.settle(id, outcome);
        }
    }
}

impl Client {
    /// Grants a lease of `ttl` and keeps it alive in the background until the returned
    /// handle is dropped. Attach keys to it with [`crate::PutOptions::lease`].
    ///
    /// # Errors
    /// `TableFull` if the home shard holds its most leases; otherwise see [`ClientError`].
    pub async fn lease(&self, ttl: Duration) -> Result<Lease> {
        let id = self.grant_lease(ttl).await?;
        let keeper = self.inner.keeper.clone();
        let alive = Arc::new(AtomicBool::new(true));
        keeper.keep(id, ttl, alive.clone());
        if !keeper.is_running.swap(true, Ordering::AcqRel) {
            tokio::spawn(keep_alive(Arc::downgrade(&self.inner), keeper.clone()));
        }
        Ok(Lease {
            id,
            ttl,
            alive,
            keeper,
        })
    }

    /// Grants a lease of `ttl` that nothing renews (see [`Client::lease`] for one that is);
    /// returns its id. The grant goes to the cores in turn, so leases spread over shards.
    ///
    /// # Errors
    /// See [`Client::lease`].
    pub async fn grant_lease(&self, ttl: Duration) -> Result<u64> {
        let ttl_ms = duration_ms(ttl)?;
        let view = self.view();
        let cores: Vec<ShardLocation> = locations(&view);
        let turn = self.inner.keeper.next_core.fetch_add(1, Ordering::Relaxed);
        let location = cores
            .get(turn % cores.len().max(1))
            .copied()
            .ok_or_else(|| ClientError::Topology("the topology has no core".to_owned()))?;
        match self
            .call_at(&view, location, &Request::LeaseGrant { ttl_ms })
            .await?
        {
            Response::LeaseGranted { id, .. } => Ok(id),
            other => Err(unexpected(&other)),
        }
    }

    /// Renews leases now, one request per home core; returns each one's TTL, or `None` for
    /// a lease that no longer lives.
    ///
    /// # Errors
    /// The first request that failed; see [`ClientError`].
    pub async fn keepalive(&self, ids: &[u64]) -> Result<Vec<Option<Duration>>> {
        let mut positions: HashMap<u64, Vec<usize>> = HashMap::with_capacity(ids.len());
        for (position, id) in ids.iter().enumerate() {
            positions.entry(*id).or_default().push(position);
        }
        let mut ttls = vec![None; ids.len()];
        for (id, outcome) in self.renew(ids).await {
            let ttl = outcome?.map(Duration::from_millis);
            for &position in positions.get(&id).into_iter().flatten() {
                ttls[position] = ttl;
            }
        }
        Ok(ttls)
    }

    /// Ends a lease now, deleting every key attached to it; `true` if it was alive.
    ///
    /// # Errors
    /// See [`ClientError`].
    pub async fn revoke_lease(&self, id: u64) -> Result<bool> {
        let view = self.view();
        let Some(location) =
            home_of(&view, id).filter(|location| view.transport(*location).is_some())
        else {
            // No core of the cluster is its home: no such lease lives.
            return Ok(false);
        };
        match self
            .call_at(&view, location, &Request::LeaseRevoke { id })
            .await?
        {
            Response::LeaseRevoked { existed } => Ok(existed),
            other => Err(unexpected(&other)),
        }
    }

    /// What the server knows of a lease: its TTL, the time left and the keys attached to it
    /// on every shard; `None` if it does not live.
    ///
    /// # Errors
    /// See [`ClientError`].
    pub async fn lease_info(&self, id: u64) -> Result<Option<LeaseInfo>> {
        let view = self.view();
        let calls = locations(&view).into_iter().map(|location| {
            let view = view.clone();
            async move {
                self.call_at(&view, location, &Request::LeaseTimeToLive { id })
                    .await
            }
        });
        let mut info = LeaseInfo {
            id,
            ttl: Duration::ZERO,
            remaining: Duration::ZERO,
            keys: Vec::new(),
            more: false,
        };
        let mut lives = false;
        for response in join_all(calls).await {
            match response? {
                Response::LeaseTimeToLive(state) => {
                    if state.is_home {
                        if let (Some(ttl_ms), Some(remaining_ms)) =
                            (state.ttl_ms, state.remaining_ms)
                        {
                            lives = true;
                            info.ttl = Duration::from_millis(ttl_ms);
                            info.remaining = Duration::from_millis(remaining_ms);
                        }
                    }
                    info.keys.extend(state.keys);
                    info.more |= state.more;
                }
                other => return Err(unexpected(&other)),
            }
        }
        info.keys.sort_unstable();
        Ok(lives.then_some(info))
    }

    /// The ids of every live lease, ascending.
    ///
    /// # Errors
    /// See [`ClientError`].
    pub async fn leases(&self) -> Result<Vec<u64>> {
        let view = self.view();
        let calls = locations(&view).into_iter().map(|location| {
            let view = view.clone();
            async move { self.call_at(&view, location, &Request::LeaseList).await }
        });
        let mut ids = Vec::new();
        for response in join_all(calls).await {
            match response? {
                Response::Leases { ids: part } => ids.extend(part),
                other => return Err(unexpected(&other)),
            }
        }
        ids.sort_unstable();
        Ok(ids)
    }

    /// Sends keepalives for `ids`, grouped by home core, at most `BATCH_COUNT_MAX` per
    /// request, in parallel; returns each id with its TTL (`None`: ended), or `Err` where
    /// the request failed.
    async fn renew(&self, ids: &[u64]) -> Vec<(u64, Result<Option<u64>>)> {
        let view = self.view();
        let mut groups: HashMap<(u16, u16), Vec<u64>> = HashMap::new();
        let mut outcomes = Vec::with_capacity(ids.len());
        for &id in ids {
            match home_of(&view, id).filter(|location| view.transport(*location).is_some()) {
                Some(location) => groups
                    .entry((location.node_index, location.core_index))
                    .or_default()
                    .push(id),
                // No core of the cluster is its home: no such lease lives.
                None => outcomes.push((id, Ok(None))),
            }
        }
        let calls = groups
            .into_iter()
            .flat_map(|((node_index, core_index), ids)| {
                let location = ShardLocation {
                    node_index,
                    core_index,
                };
                ids.chunks(BATCH_COUNT_MAX)
                    .map(|chunk| {
                        let view = view.clone();
                        let chunk = chunk.to_vec();
                        async move {
                            let request = Request::LeaseKeepalive { ids: chunk.clone() };
                            let error = match self.call_at(&view, location, &request).await {
                                Ok(Response::LeaseKeepalive { ttls_ms })
                                    if ttls_ms.len() == chunk.len() =>
                                {
                                    return chunk
                                        .into_iter()
                                        .zip(ttls_ms.into_iter().map(Ok))
                                        .collect();
                                }
                                Ok(other) => unexpected(&other),
                                Err(error) => error,
                            };
                            chunk
                                .into_iter()
                                .map(|id| (id, Err(error.clone())))
                                .collect::<Vec<_>>()
                        }
                    })
                    .collect::<Vec<_>>()
            });
        for part in join_all(calls).await {
            outcomes.extend(part);
        }
        outcomes
    }

    /// Sends a request to one core.
    async fn call_at(
        &self,
        view: &ClusterView,
        location: ShardLocation,
        request: &Request,
    ) -> Result<Response> {
        let transport = view
            .transport(location)
            .ok_or_else(|| ClientError::Topology("route table names a missing core".to_owned()))?;
        match transport.call(request).await? {
            Response::Error(reply) => {
                Err(crate::connection::server_error(reply.code, reply.message))
            }
            response => Ok(response),
        }
    }
}

/// Every core of every node, in topology order.
fn locations(view: &ClusterView) -> Vec<ShardLocation> {
    view.topology
        .nodes
        .iter()
        .enumerate()
        .flat_map(|(node_index, node)| {
            (0..node.cores.len()).map(move |core_index| ShardLocation {
                node_index: u16::try_from(node_index).unwrap_or(u16::MAX),
                core_index: u16::try_from(core_index).unwrap_or(u16::MAX),
            })
        })
        .collect()
}

/// The home core of a lease, from its id, if its node is in the topology.
fn home_of(view: &ClusterView, id: u64) -> Option<ShardLocation> {
    let lease = LeaseId(id);
    let node_index = view
        .topology
        .nodes
        .iter()
        .position(|node| node.node_id == lease.node_id())?;
    Some(ShardLocation {
        node_index: u16::try_from(node_index).ok()?,
        core_index: lease.core_id(),
    })
}
