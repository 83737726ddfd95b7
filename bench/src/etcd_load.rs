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

use std::future::Future;
use std::time::Duration;

use etcd_client::{
    Client, ConnectOptions, KvClient, LeaseClient, LeaseKeepAliveStream, LeaseKeeper,
};
use futures_util::stream::{self, StreamExt, TryStreamExt};

use crate::client_load::Caller;
use crate::lease_load::{LeaseBatch, LeaseTarget, Renewal};
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
                // The lease workload renews through `lease_load`, never through a session.
                Op::Incr | Op::Keepalive => return Err(()),
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
