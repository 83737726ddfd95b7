//! Load against etcd through its v3 gRPC API, with the `etcd-client` crate on tokio, so
//! etcd's figures come from the same sessions, keys, values and histograms as Tessera's
//! (`client_load` drives both).
//!
//! Each session is one `etcd_client::Client`, with its own gRPC channel and so its own HTTP/2
//! connection: `--connections 50` means 50 etcd clients. A set is a `Put`, a get a `Range` of
//! one key, a delete a `DeleteRange`; etcd has no increment, so `--workload incr` is refused.
//!
//! gRPC unary calls have no pipelining of their own: `--pipeline P` keeps up to P calls in
//! flight per client, as concurrent HTTP/2 streams on its one connection, which is the
//! closest etcd gets to P requests queued on one Tessera connection. At P = 1 each client
//! waits for every reply before it sends the next request, as a Tessera session does.
//!
//! Every connection is opened (and proven by one `Range`) before the measured window, so the
//! window holds no connection setup; every call carries a deadline, so a stuck member turns
//! into counted errors, never into a run that does not end.
//!
//! `--workload lease-keepalive` ([`EtcdLeases`]): etcd's `LeaseKeepAlive` is a bidirectional
//! stream of one-lease messages, and `etcd-client` opens one stream per lease
//! (`LeaseClient::keep_alive` returns a keeper and a response stream for one id). So every
//! lease gets its stream before the window (on its session's client and connection), and
//! one "call" on a batch sends one request on each of its streams, then reads one response
//! from each: as many messages as leases, where Tessera sends one request per home core.
//! Lease channels carry no client-wide timeout (which tonic would apply to the streams'
//! lifetime); each call and grant gets its own deadline instead.
//!
//! `--workload lock` ([`EtcdLocks`]): etcd's v3 lock service, `Lock` and `Unlock`. Each
//! contender is its own `etcd_client::Client` (its own connection) with its own lease, granted
//! before the window and renewed by a task on one keepalive stream at a third of its TTL, as
//! Tessera's client renews its leases. `Lock` puts the key `name/<lease>` under the lease and
//! answers once every key of the name created before it is gone (first come, first served);
//! `Unlock` deletes that key. etcd hands out no fencing token of its own: its answer's header
//! revision stands in, which grows strictly from one holder of a name to the next (the next
//! holder is answered only after it saw the previous key's deletion, a later revision). A
//! wait that reaches [`crate::lock_load::LOCK_WAIT`] is cancelled (which makes etcd delete the
//! waiter's key) and counted as a wait that ended.

use std::future::Future;
use std::time::Duration;

use etcd_client::{
    Client, ConnectOptions, KvClient, LeaseClient, LeaseKeepAliveStream, LeaseKeeper, LockClient,
    LockOptions,
};
use futures_util::stream::{self, StreamExt, TryStreamExt};

use crate::client_load::Caller;
use crate::lease_load::{LeaseBatch, LeaseTarget, Renewal};
use crate::lock_load::{LockSession, LockTarget};
use crate::workload::{Op, WorkloadKind};

/// Longest one call may take before it counts as an error (etcd's own request timeout is 7 s
/// with default settings; this is past it, so etcd's answer wins when it has one).
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// The key the connection probe reads. It is outside the benchmark's key space
/// (`workload::KEY_PREFIX`), so the probe changes nothing the run reads or writes.
const PROBE_KEY: &[u8] = b"tessera-bench:probe";

/// One etcd client: a gRPC channel over one HTTP/2 connection to the member.
#[derive(Clone)]
pub struct EtcdCaller {
    /// The KV service on this session's channel. Its calls take `&mut self`, so every call
    /// works on a clone; a clone shares the channel (and connection) and costs a reference
    /// count, which is how tonic clients issue concurrent calls.
    kv: KvClient,
}

impl Caller for EtcdCaller {
    fn call<'call>(
        &'call self,
        op: Op,
        key: &'call [u8],
        value: &'call [u8],
    ) -> impl Future<Output = Result<(), ()>> + Send + 'call {
        let mut kv = self.kv.clone();
        async move {
            let outcome = match op {
                Op::Get => kv.get(key, None).await.map(drop),
                Op::Set => kv.put(key, value, None).await.map(drop),
                Op::Delete => kv.delete(key, None).await.map(drop),
                // `check_workload` refuses the only workload that issues increments.
                // The lease and lock workloads call through `lease_load` and `lock_load`,
                // never through a session.
                Op::Incr | Op::Keepalive | Op::Lock | Op::Unlock | Op::LockPair | Op::Query => {
                    return Err(())
                }
            };
            outcome.map_err(|error| tracing::debug!(%error, "etcd call failed"))
        }
    }
}

/// Refuses the workloads etcd cannot serve as one call per operation.
///
/// # Errors
/// The workload is `incr`: etcd has no increment (it would take a read and a conditional
/// transaction, which is no longer the same operation).
pub fn check_workload(kind: WorkloadKind) -> Result<(), String> {
    if kind == WorkloadKind::Incr {
        return Err(
            "--workload incr: etcd has no increment; use set, get, mixed or delete".to_owned(),
        );
    }
    Ok(())
}

/// Opens `client_count` clients to the etcd member at `address` (`host:port`), one
/// connection each, and proves each with one read.
///
/// # Errors
/// The address is not a valid endpoint, or a client cannot reach the member.
pub async fn connect(address: &str, client_count: usize) -> Result<Vec<EtcdCaller>, String> {
    let endpoint = format!("http://{address}");
    let mut callers = Vec::with_capacity(client_count);
    for client_index in 0..client_count {
        let options = ConnectOptions::new().with_timeout(CALL_TIMEOUT);
        let client = Client::connect([endpoint.as_str()], Some(options))
            .await
            .map_err(|error| format!("etcd endpoint {endpoint}: {error}"))?;
        let mut kv = client.kv_client();
        kv.get(PROBE_KEY, None).await.map_err(|error| {
            format!("cannot reach etcd at {address} (client {client_index}): {error}")
        })?;
        callers.push(EtcdCaller { kv });
    }
    Ok(callers)
}

/// Keepalive streams a batch opens at once before the window.
const STREAM_OPEN_CONCURRENCY: usize = 64;

/// Opens `client_count` clients to the etcd member at `address` for the lease workload, one
/// connection each, and proves each with one read.
///
/// # Errors
/// The address is not a valid endpoint, or a client cannot reach the member.
pub async fn connect_leases(address: &str, client_count: usize) -> Result<EtcdLeases, String> {
    let endpoint = format!("http://{address}");
    let mut clients = Vec::with_capacity(client_count);
    for client_index in 0..client_count {
        let client = Client::connect([endpoint.as_str()], None)
            .await
            .map_err(|error| format!("etcd endpoint {endpoint}: {error}"))?;
        let mut kv = client.kv_client();
        deadline(kv.get(PROBE_KEY, None)).await.map_err(|error| {
            format!("cannot reach etcd at {address} (client {client_index}): {error}")
        })?;
        clients.push(client.lease_client());
    }
    Ok(EtcdLeases { clients })
}

/// `call` with [`CALL_TIMEOUT`], its error as text.
async fn deadline<T, E: std::fmt::Display>(
    call: impl Future<Output = Result<T, E>>,
) -> Result<T, String> {
    match tokio::time::timeout(CALL_TIMEOUT, call).await {
        Ok(outcome) => outcome.map_err(|error| error.to_string()),
        Err(_) => Err(format!("no answer in {} s", CALL_TIMEOUT.as_secs())),
    }
}

/// etcd's leases, session `i` on client `i` (its own connection).
pub struct EtcdLeases {
    clients: Vec<LeaseClient>,
}

impl EtcdLeases {
    fn client(&self, session_index: usize) -> LeaseClient {
        self.clients[session_index % self.clients.len()].clone()
    }
}

impl LeaseTarget for EtcdLeases {
    type Batch = EtcdBatch;

    async fn grant(&self, session_index: usize, ttl: Duration) -> Result<u64, String> {
        let ttl_secs = i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX);
        let mut client = self.client(session_index);
        let granted = deadline(client.grant(ttl_secs, None)).await?;
        u64::try_from(granted.id()).map_err(|_| format!("etcd granted lease {}", granted.id()))
    }

    async fn batch(&self, session_index: usize, ids: Vec<u64>) -> Result<EtcdBatch, String> {
        let client = self.client(session_index);
        let streams = stream::iter(ids)
            .map(|id| {
                let mut client = client.clone();
                async move {
                    let id = i64::try_from(id).map_err(|_| format!("lease id {id}"))?;
                    deadline(client.keep_alive(id)).await
                }
            })
            .buffered(STREAM_OPEN_CONCURRENCY)
            .try_collect()
            .await?;
        Ok(EtcdBatch { streams })
    }

    async fn revoke(&self, session_index: usize, id: u64) -> Result<(), String> {
        let id = i64::try_from(id).map_err(|_| format!("lease id {id}"))?;
        let mut client = self.client(session_index);
        deadline(client.revoke(id)).await.map(drop)
    }
}

/// etcd leases renewed together: one keepalive stream each.
pub struct EtcdBatch {
    streams: Vec<(LeaseKeeper, LeaseKeepAliveStream)>,
}

impl EtcdBatch {
    /// Sends one keepalive on every stream, then reads every answer: whether each lease
    /// still lives (etcd answers TTL 0 for a lease it no longer has).
    async fn renew(&mut self) -> Result<Vec<bool>, String> {
        for (keeper, _) in &mut self.streams {
            keeper
                .keep_alive()
                .await
                .map_err(|error| error.to_string())?;
        }
        let mut alive = Vec::with_capacity(self.streams.len());
        for (keeper, stream) in &mut self.streams {
            match stream.message().await {
                Ok(Some(answer)) => alive.push(answer.ttl() > 0),
                Ok(None) => return Err(format!("the stream of lease {} ended", keeper.id())),
                Err(error) => return Err(error.to_string()),
            }
        }
        Ok(alive)
    }
}

impl LeaseBatch for EtcdBatch {
    fn lease_count(&self) -> usize {
        self.streams.len()
    }

    async fn keepalive(mut self) -> (Self, Result<Renewal, String>) {
        let outcome = match tokio::time::timeout(CALL_TIMEOUT, self.renew()).await {
            Ok(Ok(alive)) => {
                let asked_count = self.streams.len();
                let mut answers = alive.iter();
                self.streams
                    .retain(|_| answers.next().copied().unwrap_or(false));
                let renewed_count = self.streams.len();
                Ok(Renewal {
                    renewed_count: renewed_count as u64,
                    lost_count: (asked_count - renewed_count) as u64,
                })
            }
            Ok(Err(error)) => Err(error),
            Err(_) => Err(format!("no answer in {} s", CALL_TIMEOUT.as_secs())),
        };
        (self, outcome)
    }
}

/// etcd's locks: each session opens its own client (and connection) to the member.
pub struct EtcdLocks {
    address: String,
}

impl EtcdLocks {
    /// Locks on the etcd member at `address` (`host:port`).
    pub fn new(address: &str) -> Self {
        Self {
            address: address.to_owned(),
        }
    }
}

impl LockTarget for EtcdLocks {
    type Session = EtcdLockSession;

    async fn open(&self, session_index: usize, ttl: Duration) -> Result<EtcdLockSession, String> {
        let endpoint = format!("http://{}", self.address);
        let client = Client::connect([endpoint.as_str()], None)
            .await
            .map_err(|error| format!("etcd endpoint {endpoint}: {error}"))?;
        let mut kv = client.kv_client();
        deadline(kv.get(PROBE_KEY, None)).await.map_err(|error| {
            format!(
                "cannot reach etcd at {} (client {session_index}): {error}",
                self.address
            )
        })?;
        let mut leases = client.lease_client();
        let ttl_secs = i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX);
        let lease_id = deadline(leases.grant(ttl_secs, None)).await?.id();
        let (keeper, answers) = deadline(leases.keep_alive(lease_id)).await?;
        let renewal = tokio::spawn(renew_lease(keeper, answers, ttl / 3));
        Ok(EtcdLockSession {
            locks: client.lock_client(),
            leases,
            lease_id,
            renewal,
        })
    }

    async fn close(&self, mut session: EtcdLockSession) -> Result<(), String> {
        session.renewal.abort();
        let lease_id = session.lease_id;
        deadline(session.leases.revoke(lease_id))
            .await
            .map(drop)
            .map_err(|error| format!("revoke lease {lease_id}: {error}"))
    }
}

/// Renews one lease every `interval` on its keepalive stream until the stream fails or the
/// lease is gone (then its locks fail, and the run counts errors).
async fn renew_lease(
    mut keeper: LeaseKeeper,
    mut answers: LeaseKeepAliveStream,
    interval: Duration,
) {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick is at once; the lease was just granted.
    ticks.tick().await;
    loop {
        ticks.tick().await;
        let renewed = async {
            keeper
                .keep_alive()
                .await
                .map_err(|error| error.to_string())?;
            match answers.message().await {
                Ok(Some(answer)) if answer.ttl() > 0 => Ok(()),
                Ok(Some(_)) => Err("the lease had ended".to_owned()),
                Ok(None) => Err("the keepalive stream ended".to_owned()),
                Err(error) => Err(error.to_string()),
            }
        };
        if let Err(error) = deadline(renewed).await {
            tracing::warn!(lease = keeper.id(), %error, "etcd lease renewal failed");
            return;
        }
    }
}

/// One etcd contender: its client's lock service, its lease and the task renewing it.
pub struct EtcdLockSession {
    locks: LockClient,
    leases: LeaseClient,
    lease_id: i64,
    renewal: tokio::task::JoinHandle<()>,
}

impl Drop for EtcdLockSession {
    fn drop(&mut self) {
        self.renewal.abort();
    }
}

impl LockSession for EtcdLockSession {
    /// The ownership key `Lock` answered, which `Unlock` deletes.
    type Grant = Vec<u8>;

    async fn lock(
        &mut self,
        name: &[u8],
        wait: Duration,
    ) -> Result<Option<(u64, Vec<u8>)>, String> {
        let options = LockOptions::new().with_lease(self.lease_id);
        let answer = match tokio::time::timeout(wait, self.locks.lock(name, Some(options))).await {
            Err(_) => return Ok(None),
            Ok(Err(error)) => return Err(error.to_string()),
            Ok(Ok(answer)) => answer,
        };
        let revision = answer
            .header()
            .map(etcd_client::ResponseHeader::revision)
            .ok_or("etcd's lock answer has no header")?;
        let token = u64::try_from(revision)
            .map_err(|_| format!("etcd's lock answer has revision {revision}"))?;
        Ok(Some((token, answer.key().to_vec())))
    }

    async fn unlock(&mut self, _name: &[u8], key: Vec<u8>) -> Result<bool, String> {
        // etcd's `Unlock` deletes the key whatever it holds and says nothing of it.
        deadline(self.locks.unlock(key)).await.map(|_| true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::KEY_PREFIX;

    #[test]
    fn the_probe_key_is_outside_the_key_space() {
        assert!(!PROBE_KEY.starts_with(KEY_PREFIX));
    }

    #[test]
    fn increments_are_refused_and_the_rest_accepted() {
        assert!(check_workload(WorkloadKind::Incr)
            .unwrap_err()
            .contains("no increment"));
        for kind in [
            WorkloadKind::Get,
            WorkloadKind::Set,
            WorkloadKind::Mixed,
            WorkloadKind::Delete,
        ] {
            assert!(check_workload(kind).is_ok(), "{kind:?}");
        }
    }
}
