//! Locks held by a lease, with fencing tokens.
//!
//! A lock lives on the shard of its name's slot. [`Client::lock`] waits in line on the
//! server (first come, first served; the server wakes the next waiter, nobody polls) and
//! returns the grant's fencing token, which grows with every grant of that lock. The lock is
//! released by [`Client::unlock`] (a compare-and-delete on the server, with the token) or
//! when its lease ends. A holder that may have lost its lease without noticing (a long
//! pause) guards its writes with the token ([`Client::put_fenced`]): the shard refuses them
//! once the lock was granted again. `docs/semantics.md` says what this does and does not
//! guarantee.

use std::time::Duration;

use tessera_protocol::codec::{check_key, check_lease};
use tessera_protocol::limits::LOCK_WAIT_MS_MAX;
use tessera_protocol::{Compare, Request, Response, Txn, TxnOp};

use crate::{unexpected, Client, ClientError, Result};

/// A lock granted to a lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockGrant {
    /// The lock's name.
    pub name: Vec<u8>,
    /// The fencing token of this grant.
    pub token: u64,
}

impl Client {
    /// Acquires the lock `name` for `lease`, waiting in line up to `wait` (zero answers at
    /// once). Returns the grant, or `None` if another lease still holds it when the wait
    /// ends. Asking again with the lease that holds it returns its current grant.
    ///
    /// # Errors
    /// `LeaseNotFound` if the lease does not live (or ends while waiting); otherwise see
    /// [`ClientError`].
    pub async fn lock(
        &self,
        name: impl AsRef<[u8]>,
        lease: u64,
        wait: Duration,
    ) -> Result<Option<LockGrant>> {
        let name = name.as_ref();
        check_key(name)?;
        check_lease(lease)?;
        let wait_ms = u32::try_from(wait.as_millis())
            .ok()
            .filter(|wait_ms| *wait_ms <= LOCK_WAIT_MS_MAX)
            .ok_or(ClientError::InvalidRequest(
                tessera_protocol::RequestError::LockWaitOutOfRange {
                    wait_ms: u32::MAX,
                    wait_ms_max: LOCK_WAIT_MS_MAX,
                },
            ))?;
        let request = Request::Lock {
            name: name.to_vec(),
            lease,
            wait_ms,
        };
        match self.call_for_key(name, &request).await? {
            Response::Locked { acquired, token } => Ok(acquired.then(|| LockGrant {
                name: name.to_vec(),
                token,
            })),
            other => Err(unexpected(&other)),
        }
    }

    /// Releases the lock `name` if `token` is its current holder's; `true` if it was.
    ///
    /// # Errors
    /// See [`ClientError`].
    pub async fn unlock(&self, name: impl AsRef<[u8]>, token: u64) -> Result<bool> {
        let name = name.as_ref();
        check_key(name)?;
        let request = Request::Unlock {
            name: name.to_vec(),
            token,
        };
        match self.call_for_key(name, &request).await? {
            Response::Unlocked { released } => Ok(released),
            other => Err(unexpected(&other)),
        }
    }

    /// Writes `value` under `key` only if `token` is at least the last fencing token granted
    /// for the lock `lock` (which must share the key's shard: one hash tag); `true` if it was
    /// written. A former holder whose lock was granted again is refused.
    ///
    /// # Errors
    /// `CrossShard` if the lock and the key live on different shards; otherwise see
    /// [`Client::txn`].
    pub async fn put_fenced(
        &self,
        key: impl AsRef<[u8]>,
        value: impl AsRef<[u8]>,
        lock: impl AsRef<[u8]>,
        token: u64,
    ) -> Result<bool> {
        let txn = Txn::new()
            .when([Compare::fence(lock.as_ref(), token)])
            .then([TxnOp::put(key.as_ref(), value.as_ref())]);
        Ok(self.txn(txn).await?.succeeded)
    }
}
