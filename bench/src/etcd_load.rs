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

use std::future::Future;
use std::time::Duration;

use etcd_client::{Client, ConnectOptions, KvClient};

use crate::client_load::Caller;
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
                Op::Incr => return Err(()),
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
