//! The messages: one [`Request`] variant per command and one [`Response`] variant per kind of
//! answer. Plain data with no behaviour; the server reads requests in place as
//! `ArchivedRequest` after validation, and the client deserializes responses.
//!
//! Every change to these types is a wire change: it updates `docs/protocol.md` in the same
//! commit and, once released, bumps [`crate::PROTOCOL_VERSION`]. The enums are deliberately
//! exhaustive: a new command must be handled everywhere it is matched, not fall into a `_` arm.

// The rkyv derive generates resolver and archived types for struct-like enum variants whose
// fields carry no docs; every type written here is documented.
#![allow(missing_docs)]

use crate::error::ErrorCode;
use crate::index::{IndexInfo, IndexSpec, QueryPage, QueryRequest};
use crate::query::Field;
use crate::topology::{NodeHealth, Topology};

/// A request from client to server.
#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
#[rkyv(derive(Debug))]
pub enum Request {
    /// Handshake: returns the server's protocol version and the topology.
    Hello {
        /// Version the client speaks.
        protocol_version: u16,
        /// Free-form client name for the server's logs (at most `TEXT_SIZE_MAX` bytes).
        client_name: String,
    },
    /// Liveness check; answered by whichever core receives it.
    Ping,
    /// Counters of the core that receives it (never forwarded).
    Stats,
    /// Reads one key.
    Get {
        /// The key.
        key: Vec<u8>,
    },
    /// Writes one key. Boxed, so its many fields do not widen every other request's
    /// archive (an archived enum is as wide as its widest variant).
    Put(Box<Put>),
    /// Removes one key (if its condition holds). Boxed like `Put`.
    Delete(Box<Delete>),
    /// Whether a key exists (and has not expired).
    Exists {
        /// The key.
        key: Vec<u8>,
    },
    /// Sets a key's time to live, counted from when the server applies it.
    Expire {
        /// The key.
        key: Vec<u8>,
        /// Time to live in milliseconds, `1..=TTL_MS_MAX`.
        ttl_ms: u64,
    },
    /// Removes a key's time to live.
    Persist {
        /// The key.
        key: Vec<u8>,
    },
    /// Reads a key's remaining time to live.
    Ttl {
        /// The key.
        key: Vec<u8>,
    },
    /// Reads many keys. The smart client sends one per owning core.
    MultiGet {
        /// The keys, at most `BATCH_COUNT_MAX`.
        keys: Vec<Vec<u8>>,
    },
    /// Writes many keys. Entries that land on one shard are applied at one revision.
    MultiPut {
        /// The entries, at most `BATCH_COUNT_MAX`.
        entries: Vec<PutEntry>,
    },
    /// Removes many keys.
    MultiDelete {
        /// The keys, at most `BATCH_COUNT_MAX`.
        keys: Vec<Vec<u8>>,
    },
    /// Adds `delta` to the counter stored under `key` and returns the new value. The value is
    /// the counter in decimal text. Boxed: its options would widen every request's archive.
    Add(Box<CounterAdd>),
    /// Reads the keys of a range in key order, from the shard of the core that receives it
    /// (never forwarded: the client sends one to every core and merges the pages).
    Scan(Scan),
    /// Opens a watch on the shard of the core that receives it (never forwarded: the client
    /// sends one to every core whose shard can hold keys of the range). The first reply is
    /// [`Response::Watching`] (or a refusal); after it the server pushes
    /// [`Response::WatchEvents`], [`Response::WatchProgress`] and at most one
    /// [`Response::WatchCancelled`] under the same request id, which names the watch.
    /// Boxed so the watch's many fields do not widen every other request's archive.
    Watch(Box<Watch>),
    /// Ends a watch of this connection; answered [`Response::Unwatched`]. Nothing of the
    /// watch is pushed after the answer.
    Unwatch {
        /// The watch's id ([`Watching::watch_id`]).
        watch_id: u64,
    },
    /// Asks for a progress notification now: the watch's queued events are pushed, then a
    /// [`Response::WatchProgress`] on the watch's stream. Answered [`Response::Unwatched`]
    /// with `existed` false if there is no such watch, else [`Response::WatchProgress`].
    WatchProgress {
        /// The watch's id ([`Watching::watch_id`]).
        watch_id: u64,
    },
    /// A transaction on one shard: if every compare holds, the `success` ops run, else the
    /// `failure` ops, in order, and all their writes take one revision. Every key must live
    /// on one shard (use a hash tag); otherwise it is refused with `CrossShard`.
    Txn(Box<Txn>),
    /// Grants a lease homed on the shard of the core that receives it (never forwarded: the
    /// client picks the core). Its id names that shard ([`LeaseId`]).
    LeaseGrant {
        /// Time to live in milliseconds, `1..=TTL_MS_MAX`; a keepalive restarts it.
        ttl_ms: u64,
    },
    /// Renews leases homed on the shard of the core that receives it (the client sends one
    /// per home core), restarting each one's TTL. At most `BATCH_COUNT_MAX` ids.
    LeaseKeepalive {
        /// The leases.
        ids: Vec<u64>,
    },
    /// Ends a lease now: every key attached to it, on every shard, is deleted. Routed to the
    /// lease's home core.
    LeaseRevoke {
        /// The lease.
        id: u64,
    },
    /// What the shard of the core that receives it knows of a lease (never forwarded: the
    /// client asks every core and merges): its TTL if homed here, and the keys attached to
    /// it on this shard.
    LeaseTimeToLive {
        /// The lease.
        id: u64,
    },
    /// The leases homed on the shard of the core that receives it (never forwarded).
    LeaseList,
    /// Acquires the lock `name` for a lease, waiting up to `wait_ms` in line (first come,
    /// first served) if another lease holds it. Routed like a key: the lock lives on the
    /// shard of its name's slot. Answered [`Response::Locked`] when granted or when the wait
    /// ends; the lease must live.
    Lock {
        /// The lock's name (a key's size limits apply).
        name: Vec<u8>,
        /// The lease that holds it; the lock is released when the lease ends.
        lease: u64,
        /// How long to wait in line, `0..=LOCK_WAIT_MS_MAX`; 0 answers at once.
        wait_ms: u32,
    },
    /// Releases the lock `name` if `token` is the current holder's: a compare-and-delete on
    /// the server, never a read then a write.
    Unlock {
        /// The lock's name.
        name: Vec<u8>,
        /// The fencing token its grant returned.
        token: u64,
    },
    /// Defines a secondary index on the shard of the core that receives it (never
    /// forwarded: the client sends one to every core of every node, which is what makes a
    /// definition cluster-wide). Journaled like a write. Filing the keys that exist runs in
    /// bounded slices after the answer. Creating an index that exists with the same
    /// definition changes nothing; another definition under its name is refused.
    CreateIndex(Box<IndexSpec>),
    /// Removes an index from the shard of the core that receives it (never forwarded).
    DropIndex {
        /// The index.
        name: String,
    },
    /// The indexes of the shard of the core that receives it (never forwarded).
    ListIndexes,
    /// Finds the live entries under a prefix whose fields match a predicate, on the shard of
    /// the core that receives it (never forwarded: the client asks every core and merges).
    /// Boxed so its many fields do not widen every other request's archive.
    Query(Box<QueryRequest>),
}

/// A lease id: the home shard (node and core) in its top bits, so any core can tell where a
/// lease lives, and a sequence number the home shard never reuses.
///
/// ```text
/// bits 63..48  node id (u16)    47..36  core id (12 bits)    35..0  sequence
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LeaseId(pub u64);

impl LeaseId {
    /// Largest node id a lease can name.
    pub const NODE_ID_MAX: u32 = u16::MAX as u32;
    /// Largest core id a lease can name.
    pub const CORE_ID_MAX: u16 = (1 << 12) - 1;
    /// Largest sequence number.
    pub const SEQUENCE_MAX: u64 = (1 << 36) - 1;

    /// The id of the `sequence`-th lease of `core_id` on `node_id`, or `None` if one of them
    /// does not fit (0 is not a sequence: no lease has id 0).
    #[must_use]
    pub fn new(node_id: u32, core_id: u16, sequence: u64) -> Option<Self> {
        if node_id > Self::NODE_ID_MAX
            || core_id > Self::CORE_ID_MAX
            || sequence == 0
            || sequence > Self::SEQUENCE_MAX
        {
            return None;
        }
        Some(Self(
            (u64::from(node_id) << 48) | (u64::from(core_id) << 36) | sequence,
        ))
    }

    /// The home node's id.
    #[must_use]
    pub fn node_id(self) -> u32 {
        u32::try_from(self.0 >> 48).unwrap_or(Self::NODE_ID_MAX)
    }

    /// The home core's id.
    #[must_use]
    pub fn core_id(self) -> u16 {
        // Twelve bits always fit.
        u16::try_from((self.0 >> 36) & u64::from(Self::CORE_ID_MAX)).unwrap_or(Self::CORE_ID_MAX)
    }

    /// The sequence number within the home shard.
    #[must_use]
    pub fn sequence(self) -> u64 {
        self.0 & Self::SEQUENCE_MAX
    }
}

/// The arguments of [`Request::Delete`].
#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
#[rkyv(derive(Debug))]
pub struct Delete {
    /// The key.
    pub key: Vec<u8>,
    /// When the delete applies.
    pub condition: DeleteCondition,
    /// Return the removed entry (or the one found, when the condition failed).
    pub return_previous: bool,
}

impl Delete {
    /// An unconditional delete.
    #[must_use]
    pub fn new(key: impl Into<Vec<u8>>) -> Self {
        Self {
            key: key.into(),
            condition: DeleteCondition::Always,
            return_previous: false,
        }
    }
}

/// When a delete applies.
#[derive(
    Clone, Debug, Default, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize,
)]
#[rkyv(derive(Debug))]
pub enum DeleteCondition {
    /// Whenever the key exists.
    #[default]
    Always,
    /// Only if the key's version is exactly this (a version read earlier).
    IfVersion(u64),
    /// Only if the key holds exactly this value (at most `VALUE_SIZE_MAX` bytes).
    IfValue(Vec<u8>),
}

/// The arguments of [`Request::Add`].
#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
#[rkyv(derive(Debug))]
pub struct CounterAdd {
    /// The key.
    pub key: Vec<u8>,
    /// The amount to add (negative to subtract).
    pub delta: i64,
    /// The smallest value the counter may take; an add that would go below fails with
    /// `OutOfRange` and applies nothing.
    pub min: Option<i64>,
    /// The largest value the counter may take, likewise.
    pub max: Option<i64>,
    /// Create a missing (or expired) counter at 0 before adding. Without it, an add to a
    /// missing counter applies nothing and answers `applied: false`.
    pub create: bool,
    /// Time to live of a counter this add creates (a fixed window); `None` for none.
    pub ttl_ms: Option<u64>,
    /// Also restart an existing counter's TTL at `ttl_ms` (a sliding window). Without it an
    /// existing counter keeps its expiry.
    pub refresh_ttl: bool,
}

impl CounterAdd {
    /// Adds `delta`, creating the counter at 0 if missing, without bounds or TTL.
    #[must_use]
    pub fn new(key: impl Into<Vec<u8>>, delta: i64) -> Self {
        Self {
            key: key.into(),
            delta,
            min: None,
            max: None,
            create: true,
            ttl_ms: None,
            refresh_ttl: false,
        }
    }
}

/// The arguments of [`Request::Txn`].
#[derive(
    Clone, Debug, Default, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize,
)]
#[rkyv(derive(Debug))]
pub struct Txn {
    /// Checked first, all at one revision; the transaction succeeds if every one holds (an
    /// empty list holds). At most `TXN_COMPARES_MAX`.
    pub compares: Vec<Compare>,
    /// Run if it succeeds. At most `TXN_OPS_MAX`; a key at most once.
    pub success: Vec<TxnOp>,
    /// Run if it fails. At most `TXN_OPS_MAX`; a key at most once.
    pub failure: Vec<TxnOp>,
}

impl Txn {
    /// A transaction with no compares and no ops.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds compares.
    #[must_use]
    pub fn when(mut self, compares: impl IntoIterator<Item = Compare>) -> Self {
        self.compares.extend(compares);
        self
    }

    /// Adds ops run if every compare holds.
    #[must_use]
    pub fn then(mut self, ops: impl IntoIterator<Item = TxnOp>) -> Self {
        self.success.extend(ops);
        self
    }

    /// Adds ops run if a compare fails.
    #[must_use]
    pub fn otherwise(mut self, ops: impl IntoIterator<Item = TxnOp>) -> Self {
        self.failure.extend(ops);
        self
    }
}

impl Compare {
    /// The key exists.
    #[must_use]
    pub fn exists(key: impl Into<Vec<u8>>) -> Self {
        Self::of(key, Check::Exists)
    }

    /// The key does not exist.
    #[must_use]
    pub fn absent(key: impl Into<Vec<u8>>) -> Self {
        Self::of(key, Check::Absent)
    }

    /// The key's value relates to `value` as `op` says (a missing key never does).
    #[must_use]
    pub fn value(key: impl Into<Vec<u8>>, op: CompareOp, value: impl Into<Vec<u8>>) -> Self {
        Self::of(key, Check::Value(op, value.into()))
    }

    /// The key's version relates to `version` as `op` says (0 for a missing key).
    #[must_use]
    pub fn version(key: impl Into<Vec<u8>>, op: CompareOp, version: u64) -> Self {
        Self::of(key, Check::Version(op, version))
    }

    /// The key's create revision relates to `revision` as `op` says (0 for a missing key).
    #[must_use]
    pub fn create_revision(key: impl Into<Vec<u8>>, op: CompareOp, revision: u64) -> Self {
        Self::of(key, Check::CreateRevision(op, revision))
    }

    /// `token` is at least the last fencing token granted for the lock `lock` (which must
    /// live on the transaction's shard: give it the keys' hash tag).
    #[must_use]
    pub fn fence(lock: impl Into<Vec<u8>>, token: u64) -> Self {
        Self::of(lock, Check::Fence(token))
    }

    /// The key's mod revision relates to `revision` as `op` says (0 for a missing key).
    #[must_use]
    pub fn mod_revision(key: impl Into<Vec<u8>>, op: CompareOp, revision: u64) -> Self {
        Self::of(key, Check::ModRevision(op, revision))
    }

    fn of(key: impl Into<Vec<u8>>, check: Check) -> Self {
        Self {
            key: key.into(),
            check,
        }
    }
}

/// One compare of a [`Txn`]: a check of one key's current state.
#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
#[rkyv(derive(Debug))]
pub struct Compare {
    /// The key.
    pub key: Vec<u8>,
    /// What must hold of it.
    pub check: Check,
}

/// What a [`Compare`] checks. A missing (or expired) key has version, create revision and
/// mod revision 0, and fails every `Value` check.
#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
#[rkyv(derive(Debug))]
pub enum Check {
    /// The key exists.
    Exists,
    /// The key does not exist.
    Absent,
    /// The key's value compared (bytewise) with this one.
    Value(CompareOp, Vec<u8>),
    /// The key's version compared with this one.
    Version(CompareOp, u64),
    /// The key's create revision compared with this one.
    CreateRevision(CompareOp, u64),
    /// The key's mod revision compared with this one.
    ModRevision(CompareOp, u64),
    /// The compare's key names a lock, and this fencing token is at least the last token
    /// granted for it (held or released since): a write guarded by it cannot come from a
    /// holder whose lock has since been granted again.
    Fence(u64),
    /// The key's lease compared with this one (0: attached to none).
    Lease(CompareOp, u64),
}

/// How a [`Check`] compares the key's current field (left) with the given one (right).
#[derive(Clone, Copy, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
#[rkyv(derive(Debug, Clone, Copy, PartialEq, Eq))]
pub enum CompareOp {
    /// `current == given`
    Equal,
    /// `current != given`
    NotEqual,
    /// `current < given`
    Less,
    /// `current <= given`
    LessOrEqual,
    /// `current > given`
    Greater,
    /// `current >= given`
    GreaterOrEqual,
}

impl CompareOp {
    /// Whether `current` relates to `given` as this operator says.
    #[must_use]
    pub fn holds<T: Ord + ?Sized>(self, current: &T, given: &T) -> bool {
        let ordering = current.cmp(given);
        match self {
            Self::Equal => ordering.is_eq(),
            Self::NotEqual => ordering.is_ne(),
            Self::Less => ordering.is_lt(),
            Self::LessOrEqual => ordering.is_le(),
            Self::Greater => ordering.is_gt(),
            Self::GreaterOrEqual => ordering.is_ge(),
        }
    }
}

/// One operation of a [`Txn`] branch.
#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
#[rkyv(derive(Debug))]
pub enum TxnOp {
    /// Reads a key.
    Get {
        /// The key.
        key: Vec<u8>,
    },
    /// Writes a key, unconditionally (the compares are the condition).
    Put {
        /// The key.
        key: Vec<u8>,
        /// The new value.
        value: Vec<u8>,
        /// Time to live in milliseconds; `None` means no expiry (unless `keep_ttl`).
        ttl_ms: Option<u64>,
        /// Keep the key's current expiry when `ttl_ms` is `None`.
        keep_ttl: bool,
        /// Return the entry the put replaced.
        return_previous: bool,
        /// Attach the key to this lease (`None` detaches it), as [`Put::lease`] does. The
        /// lease must live and be known to the transaction's shard: homed there, or used
        /// there before (by a put or a lock of the same hash tag).
        lease: Option<u64>,
        /// The entry's indexed fields, as [`Put::fields`].
        fields: Vec<Field>,
    },
    /// Removes a key.
    Delete {
        /// The key.
        key: Vec<u8>,
        /// Return the removed entry.
        return_previous: bool,
    },
    /// Adds to a counter, as [`Request::Add`] does; an add that fails fails the whole
    /// transaction, and nothing is applied.
    Add(CounterAdd),
    /// Reads the keys of a range that live on the transaction's shard, in key order (after
    /// the writes of earlier ops).
    Range(Scan),
}

impl TxnOp {
    /// Reads `key`.
    #[must_use]
    pub fn get(key: impl Into<Vec<u8>>) -> Self {
        Self::Get { key: key.into() }
    }

    /// Writes `value` under `key`, with no TTL.
    #[must_use]
    pub fn put(key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> Self {
        Self::Put {
            key: key.into(),
            value: value.into(),
            ttl_ms: None,
            keep_ttl: false,
            return_previous: false,
            lease: None,
            fields: Vec::new(),
        }
    }

    /// Removes `key`.
    #[must_use]
    pub fn delete(key: impl Into<Vec<u8>>) -> Self {
        Self::Delete {
            key: key.into(),
            return_previous: false,
        }
    }

    /// Adds `delta` to the counter under `key`, creating it at 0 if missing.
    #[must_use]
    pub fn add(key: impl Into<Vec<u8>>, delta: i64) -> Self {
        Self::Add(CounterAdd::new(key, delta))
    }

    /// The key the op names, or `None` for a range.
    #[must_use]
    pub fn key(&self) -> Option<&[u8]> {
        match self {
            Self::Get { key } | Self::Put { key, .. } | Self::Delete { key, .. } => Some(key),
            Self::Add(add) => Some(&add.key),
            Self::Range(_) => None,
        }
    }
}

/// The arguments of [`Request::Watch`]: changes to the keys in `[start, end)`.
#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
#[rkyv(derive(Debug))]
pub struct Watch {
    /// The first key of the range (inclusive); empty for the start of the keyspace.
    pub start: Vec<u8>,
    /// The end of the range (exclusive); `None` for the end of the keyspace.
    pub end: Option<Vec<u8>>,
    /// Where the watch starts.
    pub from: WatchFrom,
    /// Deliver puts.
    pub puts: bool,
    /// Deliver deletes (and expiries).
    pub deletes: bool,
    /// Include each key's previous value in its events.
    pub previous: bool,
    /// Push a progress notification this often, in milliseconds; 0 for never. Otherwise
    /// `WATCH_PROGRESS_INTERVAL_MS_MIN..=WATCH_PROGRESS_INTERVAL_MS_MAX`.
    pub progress_interval_ms: u32,
    /// Follow the result set of this predicate over the keys' fields instead of every
    /// change: a key entering it or changing in it is a put (with `puts`), a key leaving
    /// it is [`EventKind::Left`] or its delete (with `deletes`); changes outside it are not
    /// delivered. A snapshot holds only the keys that match.
    pub query: Option<crate::query::Query>,
}

impl Watch {
    /// Puts and deletes in `[start, end)` from now on, without previous values or progress.
    #[must_use]
    pub fn range(start: impl Into<Vec<u8>>, end: Option<Vec<u8>>) -> Self {
        Self {
            start: start.into(),
            end,
            from: WatchFrom::Now,
            puts: true,
            deletes: true,
            previous: false,
            progress_interval_ms: 0,
            query: None,
        }
    }
}

/// Where a watch starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
#[rkyv(derive(Debug, Clone, Copy, PartialEq, Eq))]
pub enum WatchFrom {
    /// With the next revision the shard applies.
    Now,
    /// With the first revision after this one (a resume), replayed from the shard's history.
    /// Refused with [`WatchCancel::Compacted`] if the history no longer reaches back to it.
    After(u64),
    /// With the range's live keys now, at revision `R` ([`Watching::snapshot`]), then every
    /// event after `R`.
    Snapshot,
}

/// The arguments of [`Request::Scan`]: the keys in `[start, end)`, in byte order.
#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
#[rkyv(derive(Debug))]
pub struct Scan {
    /// The first key of the range (inclusive); empty for the start of the keyspace.
    pub start: Vec<u8>,
    /// The end of the range (exclusive); `None` for the end of the keyspace.
    pub end: Option<Vec<u8>>,
    /// Most keys to return, `1..=SCAN_LIMIT_MAX`. A page also ends before it would pass
    /// `SCAN_PAGE_BYTES_MAX`.
    pub limit: u32,
    /// Return keys without their entries.
    pub keys_only: bool,
    /// Return no keys, only how many live keys the range holds (`limit` is ignored).
    pub count_only: bool,
}

impl Scan {
    /// Every key in `[start, end)`, `limit` at most, with entries.
    #[must_use]
    pub fn range(start: impl Into<Vec<u8>>, end: Option<Vec<u8>>, limit: u32) -> Self {
        Self {
            start: start.into(),
            end,
            limit,
            keys_only: false,
            count_only: false,
        }
    }

    /// Every key that starts with `prefix`, `limit` at most, with entries.
    #[must_use]
    pub fn prefix(prefix: &[u8], limit: u32) -> Self {
        Self::range(prefix, prefix_end(prefix), limit)
    }
}

/// The smallest key greater than every key that starts with `prefix`, or `None` if there is
/// none (`prefix` is empty or all `0xFF`): the exclusive end of a prefix scan.
#[must_use]
pub fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let keep = prefix.iter().rposition(|&byte| byte != 0xFF)?;
    let mut end = prefix[..=keep].to_vec();
    end[keep] += 1;
    Some(end)
}

/// The smallest key after `key`: where a scan continues after returning `key`.
#[must_use]
pub fn key_after(key: &[u8]) -> Vec<u8> {
    let mut next = Vec::with_capacity(key.len() + 1);
    next.extend_from_slice(key);
    next.push(0);
    next
}

/// When a put applies.
#[derive(
    Clone, Debug, Default, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize,
)]
#[rkyv(derive(Debug))]
pub enum PutCondition {
    /// Always.
    #[default]
    Always,
    /// Only if the key does not exist (or has expired).
    IfAbsent,
    /// Only if the key exists.
    IfPresent,
    /// Only if the key's version is exactly this: a compare-and-set against a version read
    /// earlier. Version 0 means the key does not exist.
    IfVersion(u64),
    /// Only if the key exists and holds exactly this value (at most `VALUE_SIZE_MAX` bytes).
    IfValue(Vec<u8>),
}

/// The arguments of [`Request::Put`].
#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
#[rkyv(derive(Debug))]
pub struct Put {
    /// The key.
    pub key: Vec<u8>,
    /// The new value.
    pub value: Vec<u8>,
    /// Time to live in milliseconds; `None` means no expiry (unless `keep_ttl`).
    pub ttl_ms: Option<u64>,
    /// Keep the key's current expiry when `ttl_ms` is `None` (like Redis `KEEPTTL`).
    pub keep_ttl: bool,
    /// When the put applies.
    pub condition: PutCondition,
    /// Return the entry the put replaced (or found, when the condition failed).
    pub return_previous: bool,
    /// Attach the key to this lease (a key has at most one: a put without a lease detaches
    /// it). The key is deleted when the lease ends. `None` for no lease.
    pub lease: Option<u64>,
    /// The entry's indexed fields (at most `FIELDS_PER_VALUE_MAX`, names unique). They
    /// replace the entry's fields as the value replaces its value.
    pub fields: Vec<Field>,
}

impl Put {
    /// An unconditional put with no TTL.
    #[must_use]
    pub fn new(key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> Self {
        Self {
            key: key.into(),
            value: value.into(),
            ttl_ms: None,
            keep_ttl: false,
            condition: PutCondition::Always,
            return_previous: false,
            lease: None,
            fields: Vec::new(),
        }
    }
}

/// One entry of [`Request::MultiPut`].
#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
#[rkyv(derive(Debug))]
pub struct PutEntry {
    /// The key.
    pub key: Vec<u8>,
    /// The new value.
    pub value: Vec<u8>,
    /// Time to live in milliseconds; `None` means no expiry.
    pub ttl_ms: Option<u64>,
    /// The entry's indexed fields, as [`Put::fields`].
    pub fields: Vec<Field>,
}

/// A stored value as returned to clients.
#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
#[rkyv(derive(Debug))]
pub struct Entry {
    /// The value bytes.
    pub value: Vec<u8>,
    /// The shard revision at which the key was created (since it last did not exist).
    pub create_revision: u64,
    /// The shard revision at which the key was last modified.
    pub mod_revision: u64,
    /// How many times the key was written since it was created (1 after the first put).
    pub version: u64,
    /// Absolute expiry in Unix milliseconds, if the key has a TTL.
    pub expires_at_ms: Option<u64>,
    /// The entry's indexed fields, ordered by name.
    pub fields: Vec<Field>,
}

/// A key's time to live.
#[derive(Clone, Copy, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
#[rkyv(derive(Debug, Clone, Copy, PartialEq, Eq))]
pub enum TtlState {
    /// The key does not exist.
    Missing,
    /// The key exists and never expires.
    Persistent,
    /// The key expires.
    Expiring {
        /// Milliseconds left at the time the server answered.
        remaining_ms: u64,
        /// Absolute expiry in Unix milliseconds.
        expires_at_ms: u64,
    },
}

/// Which shard a response reflects, and at which of its revisions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
#[rkyv(derive(Debug, Clone, Copy, PartialEq, Eq))]
pub struct ShardStamp {
    /// The answering node.
    pub node_id: u32,
    /// The answering core (its shard).
    pub core_id: u16,
    /// The shard's revision when the response was produced: everything it says holds at
    /// this revision.
    pub revision: u64,
}

/// The body of every response frame: the response and the shard state it reflects. Only
/// archived (the receiver reads [`ArchivedReply`]); [`crate::codec::decode_reply`] gives the
/// owned parts.
#[derive(Debug, rkyv::Archive, rkyv::Serialize)]
#[rkyv(archived = ArchivedReply)]
pub struct Reply<'a> {
    /// The shard and revision the response reflects; `None` for a push on a watch stream
    /// (its revisions are in the message) and for answers from no single shard (a frame
    /// refused before it was read, a batch split over several shards).
    pub stamp: Option<ShardStamp>,
    /// The response.
    #[rkyv(with = rkyv::with::Inline)]
    pub response: &'a Response,
}

/// A response from server to client, matched to its request by the frame's request id.
#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
#[rkyv(derive(Debug))]
pub enum Response {
    /// Answer to [`Request::Hello`].
    Hello {
        /// Version the server speaks.
        protocol_version: u16,
        /// The answering node's id.
        node_id: u32,
        /// The answering node's name.
        server_name: String,
        /// The whole cluster.
        topology: Topology,
        /// Every node's health as the answering node sees it, in topology order.
        health: Vec<NodeHealth>,
    },
    /// Answer to [`Request::Ping`].
    Pong {
        /// The answering node.
        node_id: u32,
        /// The answering core.
        core_id: u16,
    },
    /// Answer to [`Request::Stats`]. Boxed so the many counters do not widen every other
    /// response (an archived enum is as wide as its widest variant).
    Stats(Box<CoreStats>),
    /// Answer to [`Request::Get`]: the entry, or `None` if the key does not exist.
    Value(Option<Entry>),
    /// Answer to [`Request::Put`].
    Put {
        /// Whether the put's condition held and the value was written.
        applied: bool,
        /// The key's mod revision after the request: the new one if applied, else the current
        /// one (0 if the key does not exist).
        mod_revision: u64,
        /// The key's version after the request: the new one if applied, else the current one
        /// (0 if the key does not exist), so a compare-and-set that lost needs no second read.
        version: u64,
        /// The previous entry, if asked for and the key existed.
        previous: Option<Entry>,
    },
    /// Answer to [`Request::Delete`].
    Delete {
        /// Whether a key was removed.
        deleted: bool,
        /// The key's version after the request: 0 if it was removed or did not exist, else
        /// (the condition failed) its current version, so a caller needs no second read.
        version: u64,
        /// The removed entry (or the one found, when the condition failed), if asked for and
        /// the key existed.
        previous: Option<Entry>,
    },
    /// Answer to [`Request::Exists`].
    Exists {
        /// Whether the key exists.
        exists: bool,
    },
    /// Answer to [`Request::Expire`] and [`Request::Persist`].
    Expiry {
        /// Whether the key existed (for persist: and had a TTL) and was changed.
        applied: bool,
        /// The key's mod revision after the request (0 if the key does not exist).
        mod_revision: u64,
    },
    /// Answer to [`Request::Ttl`].
    Ttl(TtlState),
    /// Answer to [`Request::MultiGet`], in request order.
    Values(Vec<Option<Entry>>),
    /// Answer to [`Request::MultiPut`]: each entry's new mod revision, in request order.
    MultiPut {
        /// Mod revisions, one per entry.
        mod_revisions: Vec<u64>,
    },
    /// Answer to [`Request::MultiDelete`]: whether each key was removed, in request order.
    MultiDelete {
        /// One flag per key.
        deleted: Vec<bool>,
    },
    /// The request failed; see [`ErrorCode`].
    Error(ErrorReply),
    /// Answer to [`Request::Add`].
    Counter {
        /// Whether the add applied: false only when the counter was missing and the add did
        /// not create it (then `value` and `mod_revision` are 0).
        applied: bool,
        /// The counter's value after the add.
        value: i64,
        /// The key's mod revision after the add.
        mod_revision: u64,
    },
    /// Answer to [`Request::Scan`].
    Scan(ScanPage),
    /// First answer to [`Request::Watch`]: the watch is open.
    Watching(Watching),
    /// Pushed on a watch's stream: the next events, whole revisions in revision order.
    WatchEvents(WatchEvents),
    /// Pushed on a watch's stream (and the answer to [`Request::WatchProgress`]): every
    /// event of the range up to `revision` has been pushed.
    WatchProgress {
        /// The shard revision the watch has caught up to.
        revision: u64,
    },
    /// Pushed on a watch's stream, last: the watch ended. Also the first answer to a
    /// [`Request::Watch`] whose start the history no longer holds.
    WatchCancelled(WatchCancel),
    /// Answer to [`Request::Unwatch`] (and to a [`Request::WatchProgress`] for an unknown
    /// watch).
    Unwatched {
        /// Whether the watch existed.
        existed: bool,
    },
    /// Answer to [`Request::Txn`].
    Txn(TxnOutcome),
    /// Answer to [`Request::LeaseGrant`].
    LeaseGranted {
        /// The lease ([`LeaseId`]).
        id: u64,
        /// Its time to live.
        ttl_ms: u64,
    },
    /// Answer to [`Request::LeaseKeepalive`]: for each id in request order, the TTL it now
    /// has again, or `None` if no such lease lives (it expired, was revoked or never was).
    LeaseKeepalive {
        /// One per id.
        ttls_ms: Vec<Option<u64>>,
    },
    /// Answer to [`Request::LeaseRevoke`].
    LeaseRevoked {
        /// Whether the lease was alive.
        existed: bool,
    },
    /// Answer to [`Request::LeaseTimeToLive`].
    LeaseTimeToLive(LeaseState),
    /// Answer to [`Request::LeaseList`]: the ids of the leases homed here, ascending.
    Leases {
        /// The ids.
        ids: Vec<u64>,
    },
    /// Answer to [`Request::Lock`].
    Locked {
        /// Whether the lease now holds the lock.
        acquired: bool,
        /// If acquired, the fencing token of this grant (greater than every token granted
        /// for the lock before); else the current holder's.
        token: u64,
    },
    /// Answer to [`Request::Unlock`].
    Unlocked {
        /// Whether the token was the holder's and the lock was released.
        released: bool,
    },
    /// Answer to [`Request::CreateIndex`].
    IndexCreated {
        /// Whether the index is new (false: it existed with the same definition).
        created: bool,
    },
    /// Answer to [`Request::DropIndex`].
    IndexDropped {
        /// Whether the index existed.
        dropped: bool,
    },
    /// Answer to [`Request::ListIndexes`]: the shard's indexes, by name.
    Indexes(Vec<IndexInfo>),
    /// Answer to [`Request::Query`]. Boxed: a page with its plan would widen every
    /// response's archive.
    Query(Box<QueryPage>),
}

/// One shard's knowledge of a lease ([`Response::LeaseTimeToLive`]).
#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
#[rkyv(derive(Debug))]
pub struct LeaseState {
    /// Whether this shard is the lease's home.
    pub is_home: bool,
    /// On the home: the TTL granted, or `None` if the lease does not live.
    pub ttl_ms: Option<u64>,
    /// On the home: milliseconds left, or `None` if the lease does not live.
    pub remaining_ms: Option<u64>,
    /// The keys attached to it on this shard, in key order (at most `SCAN_LIMIT_MAX`).
    pub keys: Vec<Vec<u8>>,
    /// Whether this shard holds more attached keys than it returned.
    pub more: bool,
}

/// What a transaction did.
#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
#[rkyv(derive(Debug))]
pub struct TxnOutcome {
    /// Whether every compare held (the `success` ops ran; else the `failure` ops).
    pub succeeded: bool,
    /// The revision the writes took, or the shard's revision if the branch wrote nothing.
    pub revision: u64,
    /// One result per op of the branch that ran, in order.
    pub results: Vec<TxnResult>,
}

/// The result of one [`TxnOp`].
#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
#[rkyv(derive(Debug))]
pub enum TxnResult {
    /// The entry read, if the key exists.
    Get(Option<Entry>),
    /// The key's new version, and the replaced entry if asked for.
    Put {
        /// The key's version after the write.
        version: u64,
        /// The entry replaced, if asked for and the key existed.
        previous: Option<Entry>,
    },
    /// Whether the key existed and was removed, and its entry if asked for.
    Delete {
        /// Whether a key was removed.
        deleted: bool,
        /// The removed entry, if asked for.
        previous: Option<Entry>,
    },
    /// The counter after the add.
    Add {
        /// Whether the add applied (false: missing, and not created).
        applied: bool,
        /// Its value.
        value: i64,
    },
    /// The range's page (this shard's keys only).
    Range(ScanPage),
}

/// The first answer to [`Request::Watch`].
#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
#[rkyv(derive(Debug))]
pub struct Watching {
    /// Names the watch in [`Request::Unwatch`] and [`Request::WatchProgress`]: on a network
    /// connection, the request id of the [`Request::Watch`].
    pub watch_id: u64,
    /// The answering node.
    pub node_id: u32,
    /// The answering core (its shard).
    pub core_id: u16,
    /// The watch delivers every matching event after this shard revision: the shard's
    /// revision now, the one resumed after, or the snapshot's.
    pub revision: u64,
    /// For [`WatchFrom::Snapshot`], the range's live keys at `revision`, in key order.
    pub snapshot: Option<Vec<ScanItem>>,
}

/// Events pushed on a watch's stream.
#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
#[rkyv(derive(Debug))]
pub struct WatchEvents {
    /// Revisions in increasing order, each once, with their matching events.
    pub batches: Vec<EventBatch>,
    /// The last batch's revision has more events, in the next `WatchEvents` of this watch (a
    /// revision too large for one frame); the receiver joins them before handing it on.
    pub continues: bool,
}

/// The matching events of one revision, in the order the shard applied them.
#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
#[rkyv(derive(Debug))]
pub struct EventBatch {
    /// The shard revision.
    pub revision: u64,
    /// Its events.
    pub events: Vec<WatchEvent>,
}

/// One change to one key.
#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
#[rkyv(derive(Debug))]
pub struct WatchEvent {
    /// The key.
    pub key: Vec<u8>,
    /// What happened.
    pub kind: EventKind,
    /// The new value (empty for a delete).
    pub value: Vec<u8>,
    /// The value before, if the watch asked for it and the key existed.
    pub previous: Option<Vec<u8>>,
    /// The key's indexed fields after a put (or a `Left`); empty for deletes.
    pub fields: Vec<Field>,
}

/// What happened to a key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
#[rkyv(derive(Debug, Clone, Copy, PartialEq, Eq))]
pub enum EventKind {
    /// The key was written (created when `version` is 1).
    Put {
        /// The revision that created the key.
        create_revision: u64,
        /// Writes since it was created, this one included.
        version: u64,
    },
    /// The key was removed by a delete request.
    Deleted,
    /// The key's TTL passed.
    Expired,
    /// The key's lease ended: revoked, or expired (`expired`).
    LeaseEnded {
        /// The lease.
        lease: u64,
        /// Whether the lease expired (else it was revoked).
        expired: bool,
    },
    /// Only on a watch with a query: the key was written and no longer matches it (it
    /// left the result set). `value` is its new value.
    Left {
        /// The revision that created the key.
        create_revision: u64,
        /// Writes since it was created, this one included.
        version: u64,
    },
}

/// Why a watch ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
#[rkyv(derive(Debug, Clone, Copy, PartialEq, Eq))]
pub enum WatchCancel {
    /// The watch fell behind: its queue passed its bound. Every event up to
    /// `last_delivered` was pushed; resume after it, or take a new snapshot.
    Lagged {
        /// The last revision pushed.
        last_delivered: u64,
    },
    /// The history no longer holds every event after the revision asked for: resume after
    /// `oldest_available` at the earliest, or take a new snapshot.
    Compacted {
        /// The oldest revision a watch can resume after.
        oldest_available: u64,
    },
}

/// One shard's page of a scan, read at one revision.
#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
#[rkyv(derive(Debug))]
pub struct ScanPage {
    /// The answering node.
    pub node_id: u32,
    /// The answering core (its shard).
    pub core_id: u16,
    /// The shard's revision the whole page was read at.
    pub revision: u64,
    /// The keys, in byte order (none for `count_only`).
    pub items: Vec<ScanItem>,
    /// For `count_only`, the live keys in the range; otherwise `items.len()`.
    pub count: u64,
    /// Whether the shard holds more keys in the range after the last item: the next page
    /// starts at `key_after(last item's key)` (at `prefix_end` of it for a key of
    /// `KEY_SIZE_MAX` bytes).
    pub more: bool,
}

/// One key of a [`ScanPage`].
#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
#[rkyv(derive(Debug))]
pub struct ScanItem {
    /// The key.
    pub key: Vec<u8>,
    /// Its entry; `None` for `keys_only`.
    pub entry: Option<Entry>,
}

/// One core's counters, as reported by [`Request::Stats`].
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize,
)]
#[rkyv(derive(Debug))]
pub struct CoreStats {
    /// The answering node.
    pub node_id: u32,
    /// The answering core.
    pub core_id: u16,
    /// Entries held, including expired ones not yet reclaimed.
    pub key_count: u64,
    /// The shard's revision (mutations applied so far).
    pub revision: u64,
    /// Bytes charged against the shard's memory budget.
    pub memory_bytes: u64,
    /// The shard's memory budget.
    pub memory_bytes_max: u64,
    /// Requests the shard applied.
    pub request_count: u64,
    /// Keys removed because their TTL passed.
    pub expired_count: u64,
    /// Open client connections across the whole node.
    pub connection_count: u64,
    /// Records the core's log has written (0 with durability `memory`).
    pub log_record_count: u64,
    /// `fdatasync` calls the core's log has made; records per sync is the group commit's batch.
    pub log_sync_count: u64,
    /// Bytes the core's log has written.
    pub log_byte_count: u64,
    /// Times the core's log found its disk full (writes were refused with `NoSpace` until
    /// space was freed).
    pub log_no_space_count: u64,
    /// While the disk is full, the bytes of records the log can still take; `None` while
    /// it has room (or with durability `memory`).
    pub log_room_bytes: Option<u64>,
    /// Watchers on the core's shard.
    pub watcher_count: u64,
    /// Bytes of events queued for the shard's watchers, not yet handed to their streams.
    pub watch_queued_bytes: u64,
}

/// The body of an error response.
#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
#[rkyv(derive(Debug))]
pub struct ErrorReply {
    /// What went wrong; clients branch on this.
    pub code: ErrorCode,
    /// Human-readable detail with the numbers involved (at most `TEXT_SIZE_MAX` bytes).
    pub message: String,
    /// Where the key lives, for [`ErrorCode::WrongShard`].
    pub wrong_shard: Option<WrongShard>,
}

impl ErrorReply {
    /// An error reply with no routing detail.
    #[must_use]
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            wrong_shard: None,
        }
    }
}

/// Routing detail of a [`ErrorCode::WrongShard`] reply.
#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
#[rkyv(derive(Debug))]
pub struct WrongShard {
    /// Epoch of the answering server's topology.
    pub epoch: u64,
    /// The key's slot.
    pub slot: u16,
    /// Node that owns the slot.
    pub owner_node_id: u32,
    /// Core on that node that owns the slot.
    pub owner_core_id: u16,
    /// Address of that core.
    pub owner_address: String,
}
