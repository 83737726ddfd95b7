//! Leader election on leases, locks and watches.
//!
//! An election `name` is a lock `{name}lock` and a key `{name}leader` on one shard (the hash
//! tag puts them together). A candidate campaigns with a lease: it waits in line for the
//! lock (the server wakes it when the leader resigns or its lease ends), then writes its
//! value under the leader key, attached to its lease and fenced by its token, so a former
//! leader that was paused cannot overwrite it. Observers watch the leader key.

use std::time::Duration;

use futures_util::StreamExt;
use tessera_protocol::limits::LOCK_WAIT_MS_MAX;
use tessera_protocol::{Compare, Txn, TxnOp};

use crate::{Client, ClientError, KeyRange, Result, WatchMessage, WatchOptions};

/// One election: its lock and leader key.
#[derive(Debug, Clone)]
pub struct Election {
    client: Client,
    lock: Vec<u8>,
    leader_key: Vec<u8>,
}

/// A won campaign: this candidate leads until it resigns or its lease ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leadership {
    /// The fencing token of the lock: guard the leader's writes with it
    /// ([`Client::put_fenced`] on keys of the election's hash tag).
    pub token: u64,
    /// The lease the leadership rides on.
    pub lease: u64,
}

/// Who leads, as an observer sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaderChange {
    /// This value leads now.
    Elected(Vec<u8>),
    /// Nobody leads (the leader resigned or its lease ended).
    Vacant,
}

impl Client {
    /// The election `name`: its lock and leader key share the hash tag `{name}`.
    #[must_use]
    pub fn election(&self, name: &str) -> Election {
        Election {
            client: self.clone(),
            lock: format!("{{{name}}}lock").into_bytes(),
            leader_key: format!("{{{name}}}leader").into_bytes(),
        }
    }
}

impl Election {
    /// The key observers watch: it holds the leader's value while there is one.
    #[must_use]
    pub fn leader_key(&self) -> &[u8] {
        &self.leader_key
    }

    /// Waits until this candidate leads, then publishes `value` as the leader's. The lease
    /// must be kept alive (a [`crate::Lease`] handle) for as long as it leads.
    ///
    /// # Errors
    /// `LeaseNotFound` if the lease ends while waiting; otherwise see [`ClientError`].
    pub async fn campaign(&self, lease: u64, value: impl AsRef<[u8]>) -> Result<Leadership> {
        let wait = Duration::from_millis(u64::from(LOCK_WAIT_MS_MAX));
        let grant = loop {
            if let Some(grant) = self.client.lock(&self.lock, lease, wait).await? {
                break grant;
            }
        };
        let publish = Txn::new()
            .when([Compare::fence(self.lock.clone(), grant.token)])
            .then([TxnOp::Put {
                key: self.leader_key.clone(),
                value: value.as_ref().to_vec(),
                ttl_ms: None,
                keep_ttl: false,
                return_previous: false,
                lease: Some(lease),
                fields: Vec::new(),
            }]);
        if !self.client.txn(publish).await?.succeeded {
            // Granted again already: this candidate's lease ended meanwhile.
            return Err(ClientError::Server {
                code: tessera_protocol::ErrorCode::LeaseNotFound,
                message: "the leadership was lost before it was published".to_owned(),
            });
        }
        Ok(Leadership {
            token: grant.token,
            lease,
        })
    }

    /// Gives the leadership up: removes the leader's value (if it is still this leader's)
    /// and releases the lock, so the next candidate in line leads.
    ///
    /// # Errors
    /// See [`ClientError`].
    pub async fn resign(&self, leadership: &Leadership) -> Result<()> {
        let withdraw = Txn::new()
            .when([Compare::fence(self.lock.clone(), leadership.token)])
            .then([TxnOp::delete(self.leader_key.clone())]);
        self.client.txn(withdraw).await?;
        self.client.unlock(&self.lock, leadership.token).await?;
        Ok(())
    }

    /// The leader's value now, if there is a leader.
    ///
    /// # Errors
    /// See [`ClientError`].
    pub async fn leader(&self) -> Result<Option<Vec<u8>>> {
        Ok(self
            .client
            .get(&self.leader_key)
            .await?
            .map(|entry| entry.value))
    }

    /// Calls `on_change` with who leads now, then with every change, until it returns
    /// `false` or the watch fails.
    ///
    /// # Errors
    /// The watch's error; see [`Client::watch`].
    pub async fn observe(&self, mut on_change: impl FnMut(LeaderChange) -> bool) -> Result<()> {
        let range = KeyRange::key(&self.leader_key);
        let mut watch = self
            .client
            .watch(&range, WatchOptions::new().snapshot())
            .await?;
        while let Some(message) = watch.next().await {
            let changes: Vec<LeaderChange> = match message? {
                WatchMessage::Snapshot { items, .. } => vec![items
                    .into_iter()
                    .find_map(|item| item.entry.map(|entry| entry.value))
                    .map_or(LeaderChange::Vacant, LeaderChange::Elected)],
                WatchMessage::Events { events, .. } => events
                    .into_iter()
                    .map(|event| match event.kind {
                        tessera_protocol::EventKind::Put { .. } => {
                            LeaderChange::Elected(event.value)
                        }
                        _ => LeaderChange::Vacant,
                    })
                    .collect(),
                WatchMessage::Progress(_) => Vec::new(),
            };
            for change in changes {
                if !on_change(change) {
                    return Ok(());
                }
            }
        }
        Ok(())
    }
}
