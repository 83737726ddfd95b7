//! Transactions on one shard, and the optimistic read-modify-write loop built on them.
//!
//! A [`Txn`] runs on the shard that owns its keys: every key it names must live on one
//! shard, which keys sharing a hash tag (`{user42}name`, `{user42}email`) always do. The
//! server refuses anything else with `CrossShard`.

use std::time::Duration;

use tessera_protocol::codec::check_owned_request;
use tessera_protocol::{Compare, CompareOp, Entry, Request, Response, Txn, TxnOp, TxnOutcome};

use crate::{jittered_backoff, unexpected, Client, ClientError, Result, TxnResult};

/// How [`Client::optimistic`] retries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Optimistic {
    attempts_max: u32,
    backoff: Duration,
    backoff_max: Duration,
}

impl Default for Optimistic {
    fn default() -> Self {
        Self {
            attempts_max: 16,
            backoff: Duration::from_millis(1),
            backoff_max: Duration::from_millis(100),
        }
    }
}

impl Optimistic {
    /// 16 attempts, waiting from 1 ms (doubling, jittered, at most 100 ms) between them.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Gives up with [`ClientError::Conflict`] after this many attempts (at least 1).
    #[must_use]
    pub fn attempts(mut self, attempts_max: u32) -> Self {
        self.attempts_max = attempts_max.max(1);
        self
    }

    /// The first wait after a conflict; it doubles, up to `backoff_max`.
    #[must_use]
    pub fn backoff(mut self, backoff: Duration, backoff_max: Duration) -> Self {
        self.backoff = backoff;
        self.backoff_max = backoff_max.max(backoff);
        self
    }
}

impl Client {
    /// Runs a transaction on the shard of its keys.
    ///
    /// # Errors
    /// `CrossShard` if its keys live on different shards, `InvalidRequest` for a
    /// transaction over its limits (or naming a key twice in a branch), the error of a
    /// counter add that failed (nothing applied); otherwise see [`ClientError`].
    pub async fn txn(&self, txn: Txn) -> Result<TxnOutcome> {
        // The request goes to the shard of its first key; the server checks the others.
        let key = txn
            .compares
            .iter()
            .map(|compare| compare.key.as_slice())
            .chain(
                txn.success
                    .iter()
                    .chain(&txn.failure)
                    .filter_map(TxnOp::key),
            )
            .next()
            .map(<[u8]>::to_vec)
            .unwrap_or_default();
        let request = Request::Txn(Box::new(txn));
        check_owned_request(&request)?;
        match self.call_for_key(&key, &request).await? {
            Response::Txn(outcome) => Ok(outcome),
            other => Err(unexpected(&other)),
        }
    }

    /// Reads `keys` at one revision, lets `decide` choose the writes from what it read, and
    /// commits them only if none of the keys changed since (compares on each key's mod
    /// revision). On a conflict it reads again and retries, as `retry` says.
    ///
    /// `decide` may return an error to stop without writing. Returns what `decide` returned
    /// with the committed transaction's outcome.
    ///
    /// # Errors
    /// [`ClientError::Conflict`] after the last attempt, `decide`'s error, or the
    /// transaction's (see [`Client::txn`]).
    pub async fn optimistic<K, T, F>(
        &self,
        keys: &[K],
        retry: Optimistic,
        mut decide: F,
    ) -> Result<(T, TxnOutcome)>
    where
        K: AsRef<[u8]>,
        F: FnMut(&[Option<Entry>]) -> Result<(Vec<TxnOp>, T)>,
    {
        let keys: Vec<&[u8]> = keys.iter().map(AsRef::as_ref).collect();
        for attempt in 0..retry.attempts_max {
            if attempt > 0 {
                tokio::time::sleep(jittered_backoff(
                    attempt - 1,
                    retry.backoff,
                    retry.backoff_max,
                ))
                .await;
            }
            let read = self
                .txn(Txn::new().then(keys.iter().map(|key| TxnOp::get(*key))))
                .await?;
            let entries = read
                .results
                .into_iter()
                .map(|result| match result {
                    TxnResult::Get(entry) => Ok(entry),
                    other => Err(ClientError::UnexpectedReply(format!(
                        "a get in a transaction answered {other:?}"
                    ))),
                })
                .collect::<Result<Vec<_>>>()?;
            let (ops, value) = decide(&entries)?;
            // A missing key's mod revision is 0, and every existing key's is positive.
            let unchanged = keys.iter().zip(&entries).map(|(key, entry)| {
                let mod_revision = entry.as_ref().map_or(0, |entry| entry.mod_revision);
                Compare::mod_revision(*key, CompareOp::Equal, mod_revision)
            });
            let outcome = self.txn(Txn::new().when(unchanged).then(ops)).await?;
            if outcome.succeeded {
                return Ok((value, outcome));
            }
            tracing::debug!(attempt, "optimistic transaction conflicted; retrying");
        }
        Err(ClientError::Conflict {
            attempts: retry.attempts_max,
        })
    }
}
