//! One core's shard: every key whose slot falls in the shard's range, their TTL timers and the
//! shard's revision counter.
//!
//! The shard is sans-I/O, in the style of raft-rs's `RawNode`: [`Shard::apply`] takes the
//! current time and a validated request and returns the response, synchronously and to
//! completion; [`Shard::tick`] reclaims expired keys. It never reads a clock, never awaits and
//! never touches another shard, so tests drive it with an explicit `now_ms`.
//!
//! **Invariants**
//! - Every mutation (put, delete, expire, persist, reclaiming an expired key, a batch on this
//!   shard) increments `revision` exactly once, and entries it writes carry that revision as
//!   their mod revision (a new key also as its create revision; its version counts its writes).
//! - An entry has a pending wheel timer if and only if it has an expiry, and the timer's id is
//!   the one stored in the entry.
//! - An expired entry is never returned, whether or not its timer has fired yet.
//! - The caller only hands the shard keys whose slot is in `slots` (checked in debug builds).

pub mod fields;
pub mod index;
pub mod indexes;
pub mod lease;
pub mod lock;
pub mod query;
pub mod store;
pub mod timer_wheel;
pub mod watch;

use ahash::AHashSet;
use tessera_protocol::codec::txn_keys;
use tessera_protocol::limits::SCAN_LIMIT_MAX;
use tessera_protocol::limits::{SCAN_PAGE_BYTES_MAX, TXN_RANGE_ITEMS_MAX, TXN_READ_BYTES_MAX};
use tessera_protocol::message::{
    ArchivedCheck, ArchivedCompare, ArchivedCompareOp, ArchivedCounterAdd, ArchivedDeleteCondition,
    ArchivedPutEntry, ArchivedRequest, ArchivedScan, ArchivedTxn, ArchivedTxnOp,
};
use tessera_protocol::{
    ArchivedPutCondition, CompareOp, Entry, ErrorCode, ErrorReply, LeaseId, LeaseState, Response,
    ScanItem, ScanPage, SlotRange, TtlState, TxnOutcome, TxnResult,
};

use self::indexes::Indexes;
use self::lease::{LeaseLimits, LeaseTableFull, Leases};
use self::lock::{LockEvent, LockLimits, LockTableFull, Locks};
use self::store::{entry_cost, fields_cost, EntryRef, Expiry, KeyRevisions, OwnedEntry, Store};
use self::timer_wheel::{TimerId, TimerWheel};
use self::watch::{
    Before, DeleteCause, Event, Start, WatchError, WatchHub, WatchId, WatchLimits, WatchSpec,
};
use crate::durability::format::{Effect, Record, RecordWriter};
use crate::durability::DurabilityError;

/// Index of a shard (core) within its node.
pub type ShardId = u16;

/// What a shard is told when it is created.
#[derive(Debug, Clone)]
pub struct ShardConfig {
    /// The node this shard belongs to, reported in pings.
    pub node_id: u32,
    /// This shard's index within the node.
    pub shard_id: ShardId,
    /// The slots this shard owns.
    pub slots: SlotRange,
    /// Budget for stored entries, in bytes (see [`store::entry_cost`]).
    pub memory_bytes_max: u64,
    /// Most keys one [`Shard::tick`] reclaims, so a mass expiry cannot stall the core.
    pub expired_per_tick_max: usize,
    /// Bounds of the shard's change history and watchers.
    pub watch_limits: WatchLimits,
    /// Bounds of the shard's lease tables.
    pub lease_limits: LeaseLimits,
    /// Bounds of the shard's lock table.
    pub lock_limits: LockLimits,
}

/// Counters a shard keeps about itself.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ShardStats {
    /// Requests applied.
    pub request_count: u64,
    /// Keys removed because their TTL passed.
    pub expired_count: u64,
    /// Writes refused because the memory budget was used up.
    pub refused_full_count: u64,
    /// How far past its deadline each key the wheel reclaimed was, in ms (`tick`'s `now_ms`
    /// minus the deadline): a wheel that falls behind (bounded by `expired_per_tick_max`)
    /// holds memory for keys reads already treat as gone.
    pub expiry_lag_ms: ExpiryLagHistogram,
}

/// Buckets of [`ShardStats::expiry_lag_ms`]: 1 ms to about 65 s, doubling.
pub type ExpiryLagHistogram =
    crate::metrics::Histogram<{ crate::metrics::EXPIRY_LAG_BUCKET_COUNT }>;

/// One core's keys, timers and revision.
#[derive(Debug)]
pub struct Shard {
    config: ShardConfig,
    store: Store,
    wheel: TimerWheel<Box<[u8]>>,
    revision: u64,
    /// Reused by `tick` so reclaiming keys allocates nothing once warm.
    expired_buffer: Vec<(TimerId, u64, Box<[u8]>)>,
    stats: ShardStats,
    /// Records of the revisions applied since the core last took them; `None` when nothing is
    /// logged (durability `memory`, and while replaying).
    journal: Option<RecordWriter>,
    /// The change history and watchers.
    watch: WatchHub,
    /// The events of the revision being applied, published when it finishes.
    events: Vec<Event>,
    /// Whether writes make events (not while recovery rebuilds the store).
    is_recording_events: bool,
    /// Leases homed here, and the attachments of this shard's keys to leases.
    leases: Leases,
    /// The monotonic clock leases run on, as the core last set it.
    mono_ms: u64,
    /// Home leases that ended since the core last took them, with whether they expired:
    /// every other core must delete its keys attached to them.
    ended_leases: Vec<(u64, bool)>,
    /// Locks, their holders and lines.
    locks: Locks,
    /// What happened to waiting lock requests since the core last took them.
    lock_events: Vec<LockEvent>,
    /// Secondary indexes, updated in the same step as every write.
    indexes: Indexes,
}

/// What a lock request does now.
#[derive(Debug)]
pub enum LockStep {
    /// It is answered now.
    Done(Response),
    /// It waits in line as this waiter; its answer comes as a [`LockEvent`].
    Queued(u64),
}

impl Shard {
    /// An empty shard whose clock starts at `now_ms`.
    pub fn new(config: ShardConfig, now_ms: u64) -> Self {
        assert!(
            !config.slots.is_empty(),
            "shard {} owns no slot",
            config.shard_id
        );
        assert!(
            config.expired_per_tick_max > 0,
            "expired_per_tick_max must be positive"
        );
        Self {
            store: Store::new(config.memory_bytes_max),
            wheel: TimerWheel::new(now_ms),
            revision: 0,
            expired_buffer: Vec::new(),
            stats: ShardStats::default(),
            journal: None,
            watch: WatchHub::new(config.watch_limits, 0),
            events: Vec::new(),
            is_recording_events: true,
            leases: Leases::new(config.lease_limits, 0),
            mono_ms: 0,
            ended_leases: Vec::new(),
            locks: Locks::new(config.lock_limits),
            lock_events: Vec::new(),
            indexes: Indexes::new(),
            config,
        }
    }

    /// Moves the monotonic clock leases run on to `mono_ms` (never backwards). The core
    /// calls this before applying requests and ticks.
    pub fn set_monotonic_ms(&mut self, mono_ms: u64) {
        self.mono_ms = self.mono_ms.max(mono_ms);
    }

    /// Home leases that ended since the last call, with whether they expired (else they were
    /// revoked); the core tells every other core.
    pub fn take_ended_leases(&mut self) -> Vec<(u64, bool)> {
        std::mem::take(&mut self.ended_leases)
    }

    /// Whether a lease homed here lives (a check from another core).
    pub fn is_home_lease_alive(&self, lease: u64) -> bool {
        self.leases.home_lease(lease, self.mono_ms).is_some()
    }

    /// For a put, a lock or a transaction using a lease homed on another core of this node
    /// that this shard does not yet know to live: that core, which the core must ask first
    /// ([`Shard::begin_lease_check`]).
    pub fn lease_to_check(&self, request: &ArchivedRequest) -> Option<u16> {
        self.lease_needing_check(request)
            .map(|lease| LeaseId(lease).core_id())
    }

    /// The lease [`Shard::lease_to_check`] is about (a transaction's first such put's).
    pub fn lease_needing_check(&self, request: &ArchivedRequest) -> Option<u64> {
        let needs_check = |lease: u64| {
            let id = LeaseId(lease);
            id.node_id() == self.config.node_id
                && id.core_id() != self.config.shard_id
                && !self.leases.is_foreign_alive(lease)
        };
        match request {
            ArchivedRequest::Put(put) => put
                .lease
                .as_ref()
                .map(|lease| lease.to_native())
                .filter(|lease| needs_check(*lease)),
            ArchivedRequest::Lock { lease, .. } => {
                Some(lease.to_native()).filter(|lease| needs_check(*lease))
            }
            ArchivedRequest::Txn(txn) => txn
                .success
                .iter()
                .chain(txn.failure.iter())
                .filter_map(|op| match op {
                    ArchivedTxnOp::Put { lease, .. } => {
                        lease.as_ref().map(|lease| lease.to_native())
                    }
                    _ => None,
                })
                .find(|lease| needs_check(*lease)),
            _ => None,
        }
    }

    /// Records that the core is asking a lease's home whether it lives.
    pub fn begin_lease_check(&mut self, lease: u64) {
        self.leases.begin_check(lease);
    }

    /// Records the home's answer; returns whether the lease may be used.
    pub fn end_lease_check(&mut self, lease: u64, is_alive: bool) -> bool {
        self.leases.end_check(lease, is_alive)
    }

    /// A lease homed on another core ended: deletes this shard's keys attached to it, at one
    /// revision (none if it has none).
    pub fn lease_ended_elsewhere(&mut self, lease: u64, expired: bool) {
        self.leases.foreign_ended(lease);
        self.delete_lease_keys(lease, expired, false);
        self.release_locks_of(lease);
    }

    /// The leases homed on another core of this node that this shard's keys or locks are
    /// attached to.
    pub fn foreign_leases(&self) -> Vec<u64> {
        let mut leases: Vec<u64> = self
            .leases
            .attachments()
            .map(|(_, lease)| lease)
            .chain(
                self.locks
                    .entries()
                    .filter_map(|(_, holder, _)| holder.map(|holder| holder.lease)),
            )
            .filter(|lease| {
                let id = LeaseId(*lease);
                id.node_id() == self.config.node_id && id.core_id() != self.config.shard_id
            })
            .collect();
        leases.sort_unstable();
        leases.dedup();
        leases
    }

    /// What happened to waiting lock requests since the last call.
    pub fn take_lock_events(&mut self) -> Vec<LockEvent> {
        std::mem::take(&mut self.lock_events)
    }

    /// Acquires the lock `name` for `lease`, or puts the request in line for `wait_ms`.
    pub fn lock(&mut self, name: &[u8], lease: u64, wait_ms: u32) -> LockStep {
        self.stats.request_count += 1;
        self.try_lock(name, lease, wait_ms)
    }

    fn try_lock(&mut self, name: &[u8], lease: u64, wait_ms: u32) -> LockStep {
        self.debug_check_owned(name);
        if let Err(refusal) = self.check_lease_lives(lease) {
            return LockStep::Done(refusal);
        }
        match self.locks.holder(name) {
            Some(holder) if holder.lease == lease => LockStep::Done(Response::Locked {
                acquired: true,
                token: holder.token,
            }),
            Some(holder) if wait_ms == 0 => LockStep::Done(Response::Locked {
                acquired: false,
                token: holder.token,
            }),
            Some(_) => {
                // The clock counts whole milliseconds, and `mono_ms` may be most of one
                // behind the real time: one more keeps the wait at least `wait_ms` long.
                let deadline_ms = self.mono_ms.saturating_add(u64::from(wait_ms) + 1);
                match self.locks.enqueue(name, lease, deadline_ms) {
                    Ok(waiter) => LockStep::Queued(waiter),
                    Err(full) => LockStep::Done(self.lock_table_full(full)),
                }
            }
            None => match self.locks.has_room_for(name) {
                Ok(()) => LockStep::Done(Response::Locked {
                    acquired: true,
                    token: self.grant_lock(name, lease),
                }),
                Err(full) => LockStep::Done(self.lock_table_full(full)),
            },
        }
    }

    fn lock_table_full(&self, full: LockTableFull) -> Response {
        let what = match full {
            LockTableFull::Locks(max) => format!("it knows {max} locks"),
            LockTableFull::Waiters(max) => format!("{max} lock requests wait on it"),
        };
        error(
            ErrorCode::TableFull,
            format!("shard {} is full: {what}", self.config.shard_id),
        )
    }

    /// Grants `name` to `lease` at a new revision, whose number is the fencing token.
    fn grant_lock(&mut self, name: &[u8], lease: u64) -> u64 {
        let token = self.begin_revision();
        self.locks.set_holder(name, lease, token);
        if let Some(journal) = &mut self.journal {
            journal.push(Effect::LockHeld { name, lease, token });
        }
        self.finish_revision();
        token
    }

    /// Releases `name` (held with `token`) at a new revision, then grants it to the first
    /// waiter whose lease lives, at the next.
    fn release_lock(&mut self, name: &[u8], token: u64) {
        self.begin_revision();
        self.locks.clear_holder(name, token);
        if let Some(journal) = &mut self.journal {
            journal.push(Effect::LockFree { name, token });
        }
        self.finish_revision();
        let leases = &self.leases;
        let mono_ms = self.mono_ms;
        let node_id = self.config.node_id;
        let shard_id = self.config.shard_id;
        let lives = |lease: u64| {
            let id = LeaseId(lease);
            if id.node_id() == node_id && id.core_id() == shard_id {
                leases.home_lease(lease, mono_ms).is_some()
            } else {
                leases.is_foreign_alive(lease)
            }
        };
        let next = self.locks.next_waiter(name, lives, &mut self.lock_events);
        if let Some((waiter, lease)) = next {
            let token = self.grant_lock(name, lease);
            self.lock_events.push(LockEvent::Granted { waiter, token });
        }
    }

    /// Releases `name` if `token` is its holder's; whether it did.
    pub fn unlock(&mut self, name: &[u8], token: u64) -> bool {
        self.debug_check_owned(name);
        let holds = self
            .locks
            .holder(name)
            .is_some_and(|holder| holder.token == token);
        if holds {
            self.release_lock(name, token);
        }
        holds
    }

    /// Releases every lock `lease` held and ends its waits.
    fn release_locks_of(&mut self, lease: u64) {
        let held = self.locks.lease_ended(lease, &mut self.lock_events);
        for (name, token) in held {
            self.release_lock(&name, token);
        }
    }

    /// Restores a lock's state (recovery): its holder, or none, and the last token granted.
    pub fn restore_lock(&mut self, name: &[u8], holder: Option<(u64, u64)>, last_token: u64) {
        self.locks.clear_holder(name, last_token);
        if let Some((lease, token)) = holder {
            self.locks.set_holder(name, lease, token);
            if !self.is_home(lease) {
                self.leases.assume_foreign_alive(lease);
            }
        }
    }

    /// The shard's locks, for a snapshot.
    pub fn locks(&self) -> &Locks {
        &self.locks
    }

    /// Deletes the keys attached to `lease` at one revision, journaling the lease's end too
    /// if it was homed here (`is_home`). No revision if there is nothing to journal.
    fn delete_lease_keys(&mut self, lease: u64, expired: bool, is_home: bool) {
        let keys = self.leases.take_keys(lease);
        if keys.is_empty() && !is_home {
            return;
        }
        self.begin_revision();
        let mut record_bytes = 0;
        for key in &keys {
            // A record holds at most so many removals; a lease with more keys than that
            // takes consecutive revisions.
            if record_bytes >= LEASE_END_RECORD_BYTES_MAX {
                self.finish_revision();
                self.begin_revision();
                record_bytes = 0;
            }
            record_bytes += key.len() + 3;
            self.remove_entry(key, DeleteCause::LeaseEnded { lease, expired });
        }
        if is_home {
            if let Some(journal) = &mut self.journal {
                journal.push(Effect::LeaseEnd { id: lease });
            }
        }
        self.finish_revision();
    }

    /// A shard that writes a record of every revision it applies, for the core to log.
    pub fn with_journal(config: ShardConfig, now_ms: u64) -> Self {
        let mut shard = Self::new(config, now_ms);
        shard.journal = Some(RecordWriter::new());
        shard
    }

    /// The records written since the last call, if the shard keeps a journal.
    pub fn journal_mut(&mut self) -> Option<&mut RecordWriter> {
        self.journal.as_mut()
    }

    /// Applies one logged record (recovery). Effects are applied as they were; a key whose
    /// deadline has passed by `now_ms` is dropped rather than stored. Nothing is journaled.
    ///
    /// # Errors
    /// The record goes back in revision, or its effects are malformed.
    pub fn replay(&mut self, now_ms: u64, record: &Record<'_>) -> Result<(), DurabilityError> {
        if record.revision <= self.revision {
            return Err(DurabilityError::corrupt(format!(
                "record of revision {} follows revision {}",
                record.revision, self.revision
            )));
        }
        let journal = self.journal.take();
        self.is_recording_events = false;
        let outcome = self.replay_effects(now_ms, record);
        self.is_recording_events = true;
        self.journal = journal;
        outcome?;
        self.revision = record.revision;
        self.watch.restart_at(self.revision);
        Ok(())
    }

    fn replay_effects(&mut self, now_ms: u64, record: &Record<'_>) -> Result<(), DurabilityError> {
        let mut effects = record.effects().peekable();
        while let Some(effect) = effects.next() {
            match effect? {
                Effect::Set {
                    key,
                    value,
                    deadline_ms,
                    create_revision,
                    version,
                } => {
                    // A `Fields` of the same key right after carries its fields.
                    let fields = match effects.peek() {
                        Some(Ok(Effect::Fields {
                            key: fields_key,
                            fields,
                        })) if *fields_key == key => {
                            let fields = *fields;
                            effects.next();
                            check_fields_blob(fields)?;
                            fields
                        }
                        _ => &[],
                    };
                    // An `Attach` follows if the key is still attached.
                    self.leases.detach(key);
                    if deadline_ms.is_some_and(|deadline_ms| deadline_ms <= now_ms) {
                        self.remove_entry(key, DeleteCause::Expired);
                    } else {
                        let revisions = KeyRevisions {
                            create: create_revision,
                            modify: record.revision,
                            version,
                        };
                        self.restore(key, fields, value, revisions, deadline_ms);
                    }
                }
                Effect::Fields { .. } => {
                    return Err(DurabilityError::corrupt(
                        "a fields effect that does not follow its key's set",
                    ));
                }
                Effect::IndexCreate {
                    name,
                    prefix,
                    field,
                    kind,
                } => self.restore_index(crate::durability::format::index_spec_of(
                    name, prefix, field, kind,
                )?),
                Effect::IndexDrop { name } => {
                    self.indexes.drop_index(&String::from_utf8_lossy(name));
                }
                Effect::Remove { key } => {
                    self.remove_entry(key, DeleteCause::Deleted);
                }
                Effect::Attach { key, lease } => self.restore_attachment(key, lease),
                Effect::LeaseGrant { id, ttl_ms } => self.restore_lease(id, ttl_ms),
                Effect::LeaseEnd { id } => {
                    self.leases.end_home(id);
                }
                Effect::LockHeld { name, lease, token } => {
                    self.locks.set_holder(name, lease, token);
                    if !self.is_home(lease) {
                        self.leases.assume_foreign_alive(lease);
                    }
                }
                Effect::LockFree { name, token } => self.locks.clear_holder(name, token),
            }
        }
        Ok(())
    }

    /// Stores one entry of a snapshot (recovery): `value` under `key` with its `revisions`,
    /// expiring at `deadline_ms`. Dropped if it expired by `now_ms`. Nothing is journaled and
    /// the revision is left alone ([`Shard::restore_revision`] sets it).
    ///
    /// # Errors
    /// The fields blob is damaged.
    pub fn restore_entry(
        &mut self,
        now_ms: u64,
        key: &[u8],
        fields: &[u8],
        value: &[u8],
        revisions: KeyRevisions,
        deadline_ms: Option<u64>,
    ) -> Result<(), DurabilityError> {
        check_fields_blob(fields)?;
        if deadline_ms.is_some_and(|deadline_ms| deadline_ms <= now_ms) {
            return Ok(());
        }
        let journal = self.journal.take();
        self.is_recording_events = false;
        self.restore(key, fields, value, revisions, deadline_ms);
        self.is_recording_events = true;
        self.journal = journal;
        Ok(())
    }

    /// Stores `value` and `fields` under `key` with exactly `revisions` (recovery),
    /// replacing any entry.
    fn restore(
        &mut self,
        key: &[u8],
        fields: &[u8],
        value: &[u8],
        revisions: KeyRevisions,
        deadline_ms: Option<u64>,
    ) {
        let expiry_before = self.store.get(key).and_then(EntryRef::expiry);
        self.replace_entry(key, fields, value, deadline_ms, revisions, expiry_before);
    }

    /// Restores an index definition (recovery) and files every key it covers now, so it is
    /// ready when the shard serves. A definition that breaks a limit (which the log cannot
    /// hold) is dropped with a warning.
    pub fn restore_index(&mut self, spec: tessera_protocol::IndexSpec) {
        let name = spec.name.clone();
        match self.indexes.create(spec, &self.store) {
            Ok(_) => self.indexes.build_all(&self.store),
            Err(refusal) => {
                tracing::warn!(index = name, %refusal, "index not restored");
            }
        }
    }

    /// The shard's indexes.
    pub fn indexes(&self) -> &Indexes {
        &self.indexes
    }

    /// Files up to `keys_max` more keys for an index still building; whether a build is
    /// left. The core calls it between requests while it returns true.
    pub fn build_indexes(&mut self, keys_max: usize) -> bool {
        self.indexes.build_step(&self.store, keys_max)
    }

    /// Restores a lease homed here (recovery), with a full TTL from now.
    pub fn restore_lease(&mut self, id: u64, ttl_ms: u64) {
        // Recovery restores what the log held when it was written, within the same limit.
        if self.leases.grant(id, ttl_ms, self.mono_ms).is_err() {
            tracing::warn!(
                id,
                "lease table full while restoring a lease; it is dropped"
            );
        }
    }

    /// Restores that `key` is attached to `lease` (recovery), if the key came back. A lease
    /// homed elsewhere is taken to live until its home says it ended.
    pub fn restore_attachment(&mut self, key: &[u8], lease: u64) {
        if self.store.get(key).is_none() {
            return;
        }
        self.leases.attach(key, lease);
        if !self.is_home(lease) {
            self.leases.assume_foreign_alive(lease);
        }
    }

    /// Starts every lease homed here on a full TTL from `mono_ms` (after recovery: the
    /// owners could not renew while the server was down).
    pub fn restart_leases(&mut self, mono_ms: u64) {
        self.set_monotonic_ms(mono_ms);
        self.leases.restart_all(self.mono_ms);
    }

    /// Raises the last lease sequence granted (recovery from a snapshot).
    pub fn restore_lease_sequence(&mut self, sequence: u64) {
        self.leases.restore_sequence(sequence);
    }

    /// The shard's leases and attachments, for a snapshot.
    pub fn leases(&self) -> &Leases {
        &self.leases
    }

    fn is_home(&self, lease: u64) -> bool {
        let lease = LeaseId(lease);
        lease.node_id() == self.config.node_id && lease.core_id() == self.config.shard_id
    }

    /// Sets the revision recovery continues from: the revision a snapshot began at, then the
    /// larger of what the log replayed and what the snapshot saw. Never goes back.
    pub fn restore_revision(&mut self, revision: u64) {
        self.revision = self.revision.max(revision);
        self.watch.restart_at(self.revision);
    }

    /// The same shard, emptied (recovery starting over from an older snapshot).
    #[must_use]
    pub fn emptied(&self, now_ms: u64) -> Self {
        let mut shard = Self::new(self.config.clone(), now_ms);
        if self.journal.is_some() {
            shard.journal = Some(RecordWriter::new());
        }
        shard
    }

    /// The entries of store partition `partition` (`0..store::PARTITION_COUNT`), expired ones
    /// included: a snapshot copies one partition at a time.
    pub fn partition_entries(&self, partition: usize) -> impl Iterator<Item = EntryRef<'_>> {
        self.store.partition(partition)
    }

    /// Bytes of journal waiting for the core to hand them to the log.
    pub fn journal_len(&self) -> usize {
        self.journal.as_ref().map_or(0, RecordWriter::len)
    }

    /// At most how many bytes of log `request` can write, or `None` if it writes none (a
    /// read). The core refuses a write that would not fit while the disk is full.
    #[allow(
        clippy::too_many_lines,
        reason = "one arm per request kind, so each kind's bound reads in one place"
    )]
    pub fn journal_bound(&self, request: &ArchivedRequest) -> Option<u64> {
        // A record's header and revision, an effect's kind, sizes and deadline, and the
        // removal of an expired entry the write may reclaim first (its own record).
        const RECORD: u64 = JOURNAL_RECORD_BOUND;
        const EFFECT: u64 = JOURNAL_EFFECT_BOUND;
        match request {
            ArchivedRequest::Put(put) => Some(
                key_write(&put.key, put.value.len())
                    + archived_fields_write(&put.key, &put.fields)
                    + put
                        .lease
                        .as_ref()
                        .map_or(0, |_| EFFECT + put.key.len() as u64),
            ),
            ArchivedRequest::Delete(delete) => Some(key_write(&delete.key, 0)),
            ArchivedRequest::Add(add) => Some(
                key_write(&add.key, COUNTER_TEXT_MAX)
                    + fields_write(
                        &add.key,
                        self.store
                            .get(&add.key)
                            .map_or(0, |entry| entry.fields().len()),
                    ),
            ),
            ArchivedRequest::Txn(txn) => Some(self.txn_journal_bound(txn)),
            ArchivedRequest::Expire { key, .. } | ArchivedRequest::Persist { key } => {
                let (value_size, fields_size) = self
                    .store
                    .get(key)
                    .map_or((0, 0), |entry| (entry.value().len(), entry.fields().len()));
                Some(key_write(key, value_size) + fields_write(key, fields_size))
            }
            ArchivedRequest::MultiPut { entries } => Some(
                entries
                    .iter()
                    .map(|entry| {
                        key_write(&entry.key, entry.value.len())
                            + archived_fields_write(&entry.key, &entry.fields)
                    })
                    .sum(),
            ),
            ArchivedRequest::MultiDelete { keys } => {
                Some(keys.iter().map(|key| key_write(key, 0)).sum())
            }
            ArchivedRequest::LeaseGrant { .. } => Some(RECORD + EFFECT),
            ArchivedRequest::CreateIndex(spec) => Some(
                RECORD + EFFECT + (spec.name.len() + spec.prefix.len() + spec.field.len()) as u64,
            ),
            ArchivedRequest::DropIndex { name } => Some(RECORD + EFFECT + name.len() as u64),
            // A release and the next holder's grant.
            ArchivedRequest::Lock { name, .. } | ArchivedRequest::Unlock { name, .. } => {
                Some(2 * (RECORD + EFFECT + name.len() as u64))
            }
            ArchivedRequest::LeaseRevoke { id } => {
                let (keys, _) = self.leases.keys_of(id.to_native(), usize::MAX, usize::MAX);
                // Each lock it holds or waits for: a release and the next holder's grant.
                let locks: u64 = self
                    .locks
                    .names_of(id.to_native())
                    .map(|name| 2 * (RECORD + EFFECT + 8 + name.len() as u64))
                    .sum();
                Some(
                    RECORD + EFFECT + locks + keys.iter().map(|key| key_write(key, 0)).sum::<u64>(),
                )
            }
            ArchivedRequest::LeaseKeepalive { .. }
            | ArchivedRequest::LeaseTimeToLive { .. }
            | ArchivedRequest::LeaseList
            | ArchivedRequest::Hello { .. }
            | ArchivedRequest::Stats
            | ArchivedRequest::Ping
            | ArchivedRequest::Get { .. }
            | ArchivedRequest::Exists { .. }
            | ArchivedRequest::Ttl { .. }
            | ArchivedRequest::MultiGet { .. }
            | ArchivedRequest::ListIndexes
            | ArchivedRequest::Query(_)
            | ArchivedRequest::Scan(_)
            | ArchivedRequest::Watch(_)
            | ArchivedRequest::Unwatch { .. }
            | ArchivedRequest::WatchProgress { .. } => None,
        }
    }

    /// At most how many bytes of log a transaction can write.
    fn txn_journal_bound(&self, txn: &ArchivedTxn) -> u64 {
        const EFFECT: u64 = JOURNAL_EFFECT_BOUND;
        // Either branch may run; every key of the request is reclaimed first.
        let branch = |ops: &rkyv::vec::ArchivedVec<ArchivedTxnOp>| -> u64 {
            ops.iter()
                .map(|op| match op {
                    ArchivedTxnOp::Put {
                        key,
                        value,
                        lease,
                        fields,
                        ..
                    } => {
                        key_write(key, value.len())
                            + archived_fields_write(key, fields)
                            + lease.as_ref().map_or(0, |_| EFFECT + key.len() as u64)
                    }
                    ArchivedTxnOp::Delete { key, .. } => key_write(key, 0),
                    ArchivedTxnOp::Add(add) => {
                        key_write(&add.key, COUNTER_TEXT_MAX)
                            + fields_write(
                                &add.key,
                                self.store
                                    .get(&add.key)
                                    .map_or(0, |entry| entry.fields().len()),
                            )
                    }
                    ArchivedTxnOp::Get { .. } | ArchivedTxnOp::Range(_) => 0,
                })
                .sum()
        };
        let reclaims: u64 = txn_keys(txn).map(|key| key_write(key, 0)).sum();
        reclaims + branch(&txn.success).max(branch(&txn.failure))
    }

    /// Starts the next revision and its record.
    fn begin_revision(&mut self) -> u64 {
        self.revision += 1;
        if let Some(journal) = &mut self.journal {
            journal.begin(self.revision);
        }
        self.revision
    }

    /// Closes the current revision's record and publishes its events.
    fn finish_revision(&mut self) {
        if let Some(journal) = &mut self.journal {
            journal.finish();
        }
        if self.events.is_empty() {
            self.watch.advance(self.revision);
        } else {
            self.watch.publish(self.revision, &mut self.events);
        }
    }

    /// The shard's change history and watchers.
    pub fn watch_hub(&mut self) -> &mut WatchHub {
        &mut self.watch
    }

    /// Starts a watcher with a snapshot: the live keys of its range now, at the current
    /// revision `R` (returned), and the watcher registered to receive every event after
    /// `R`. Both happen in one call, so no change falls between the snapshot and the events.
    /// At most `keys_max` keys and `SCAN_PAGE_BYTES_MAX` bytes of keys and values, so the
    /// snapshot fits in one reply.
    ///
    /// # Errors
    /// [`WatchError::SnapshotTooLarge`] if the range holds more live keys, or the hub's
    /// refusal; nothing is registered.
    pub fn watch_with_snapshot(
        &mut self,
        now_ms: u64,
        spec: WatchSpec,
        keys_max: usize,
    ) -> Result<(WatchId, u64, Vec<ScanItem>), WatchError> {
        if self.watch.watcher_count() >= self.config.watch_limits.watchers_max {
            // Refused before reading anything.
            return Err(WatchError::TooManyWatchers {
                watchers_max: self.config.watch_limits.watchers_max,
            });
        }
        let revision = self.revision;
        let mut items = Vec::new();
        let mut bytes = 0;
        for entry in self
            .store
            .range(&spec.start, spec.end.as_deref())
            .filter(|entry| !entry.is_expired(now_ms))
            .filter(|entry| {
                spec.query
                    .as_ref()
                    .is_none_or(|query| watch::fields_match(query, entry.fields()))
            })
        {
            bytes += entry.key().len() + entry.value().len();
            if items.len() == keys_max || bytes > SCAN_PAGE_BYTES_MAX {
                return Err(WatchError::SnapshotTooLarge {
                    keys_max,
                    bytes_max: SCAN_PAGE_BYTES_MAX,
                });
            }
            items.push(ScanItem {
                key: entry.key().to_vec(),
                entry: Some(to_entry(entry)),
            });
        }
        let id = self.watch.watch(spec, Start::Now)?;
        Ok((id, revision, items))
    }

    /// Applies one validated request at time `now_ms` and returns its response.
    ///
    /// The request must have passed `codec::check_request`; sizes are not checked again.
    /// `Hello` is answered by the node, not the shard, and is refused here.
    pub fn apply(&mut self, now_ms: u64, request: &ArchivedRequest) -> Response {
        self.stats.request_count += 1;
        match request {
            ArchivedRequest::Hello { .. }
            | ArchivedRequest::Stats
            | ArchivedRequest::Watch(_)
            | ArchivedRequest::Unwatch { .. }
            | ArchivedRequest::WatchProgress { .. }
            | ArchivedRequest::Query(_) => Response::Error(ErrorReply::new(
                ErrorCode::Internal,
                "hello, stats, watches and queries are answered by the core",
            )),
            ArchivedRequest::CreateIndex(spec) => {
                match rkyv::deserialize::<tessera_protocol::IndexSpec, rkyv::rancor::BoxedError>(
                    &**spec,
                ) {
                    Ok(spec) => self.create_index(spec),
                    Err(decode) => error(ErrorCode::Internal, decode.to_string()),
                }
            }
            ArchivedRequest::DropIndex { name } => self.drop_index(name.as_str()),
            ArchivedRequest::ListIndexes => {
                Response::Indexes(self.indexes.iter().map(indexes::ShardIndex::info).collect())
            }
            ArchivedRequest::Ping => Response::Pong {
                node_id: self.config.node_id,
                core_id: self.config.shard_id,
            },
            ArchivedRequest::Get { key } => Response::Value(self.get(now_ms, key)),
            ArchivedRequest::Put(put) => self.put(
                now_ms,
                &put.key,
                &fields_blob(&put.fields),
                &put.value,
                put.ttl_ms.as_ref().map(|ttl_ms| ttl_ms.to_native()),
                put.keep_ttl,
                Condition::of(&put.condition),
                put.return_previous,
                put.lease.as_ref().map(|lease| lease.to_native()),
            ),
            ArchivedRequest::Delete(delete) => self.delete(
                now_ms,
                &delete.key,
                &delete.condition,
                delete.return_previous,
            ),
            ArchivedRequest::Exists { key } => Response::Exists {
                exists: self.live_entry(now_ms, key).is_some(),
            },
            ArchivedRequest::Expire { key, ttl_ms } => {
                self.set_ttl(now_ms, key, Some(now_ms.saturating_add(ttl_ms.to_native())))
            }
            ArchivedRequest::Persist { key } => self.set_ttl(now_ms, key, None),
            ArchivedRequest::Ttl { key } => Response::Ttl(self.ttl(now_ms, key)),
            ArchivedRequest::MultiGet { keys } => {
                Response::Values(keys.iter().map(|key| self.get(now_ms, key)).collect())
            }
            ArchivedRequest::MultiPut { entries } => self.multi_put(now_ms, entries),
            ArchivedRequest::Add(add) => self.add(now_ms, add),
            ArchivedRequest::Txn(txn) => self.txn(now_ms, txn),
            ArchivedRequest::LeaseGrant { ttl_ms } => self.lease_grant(ttl_ms.to_native()),
            ArchivedRequest::LeaseKeepalive { ids } => Response::LeaseKeepalive {
                ttls_ms: ids
                    .iter()
                    .map(|id| self.leases.keepalive(id.to_native(), self.mono_ms))
                    .collect(),
            },
            ArchivedRequest::LeaseRevoke { id } => self.lease_revoke(id.to_native()),
            ArchivedRequest::LeaseTimeToLive { id } => {
                Response::LeaseTimeToLive(self.lease_state(id.to_native()))
            }
            ArchivedRequest::LeaseList => Response::Leases {
                ids: self.leases.home_ids(self.mono_ms),
            },
            // The core sends locks that may wait through `lock`; here one cannot, so it is
            // answered at once, as with a wait of 0.
            ArchivedRequest::Lock { name, lease, .. } => {
                match self.try_lock(name, lease.to_native(), 0) {
                    LockStep::Done(response) => response,
                    LockStep::Queued(_) => error(
                        ErrorCode::Internal,
                        "a lock without a wait queued".to_owned(),
                    ),
                }
            }
            ArchivedRequest::Unlock { name, token } => Response::Unlocked {
                released: self.unlock(name, token.to_native()),
            },
            ArchivedRequest::MultiDelete { keys } => self.multi_delete(now_ms, keys),
            ArchivedRequest::Scan(scan) => Response::Scan(self.scan(now_ms, scan)),
        }
    }

    /// One page of a scan, read at the current revision: the live keys of `[start, end)` in
    /// key order, at most `limit` of them and about `SCAN_PAGE_BYTES_MAX` bytes (at least
    /// one key), or only their count. The request passed `codec::check_request`.
    fn scan(&self, now_ms: u64, scan: &ArchivedScan) -> ScanPage {
        let limit = scan_limit(scan);
        let mut bytes = 0;
        self.scan_page(now_ms, scan, |items, item_bytes| {
            if items >= limit || bytes >= SCAN_PAGE_BYTES_MAX {
                return false;
            }
            bytes += item_bytes;
            true
        })
    }

    /// A transaction's range op: like a scan page, but within what is left of the
    /// transaction's read bounds (`budget`), which it uses up; a key that would pass them ends
    /// the page (`more`).
    fn txn_range(&self, now_ms: u64, scan: &ArchivedScan, budget: &mut ReadBudget) -> ScanPage {
        let limit = scan_limit(scan);
        self.scan_page(now_ms, scan, |items, item_bytes| {
            if items >= limit || budget.items == 0 || item_bytes > budget.bytes {
                return false;
            }
            budget.items -= 1;
            budget.bytes -= item_bytes;
            true
        })
    }

    /// The live keys of a scan's range in key order while `admit(items so far, the next
    /// key's bytes)` lets them in (the first it refuses ends the page, with `more` set), or
    /// only their count.
    fn scan_page(
        &self,
        now_ms: u64,
        scan: &ArchivedScan,
        mut admit: impl FnMut(usize, usize) -> bool,
    ) -> ScanPage {
        let end = scan.end.as_ref().map(rkyv::vec::ArchivedVec::as_slice);
        let live = self
            .store
            .range(scan.start.as_slice(), end)
            .filter(|entry| !entry.is_expired(now_ms));
        let mut page = ScanPage {
            node_id: self.config.node_id,
            core_id: self.config.shard_id,
            revision: self.revision,
            items: Vec::new(),
            count: 0,
            more: false,
        };
        if scan.count_only {
            page.count = live.count() as u64;
            return page;
        }
        page.items.reserve(scan_limit(scan).min(1024));
        for entry in live {
            if !admit(page.items.len(), scan_item_bytes(entry, scan.keys_only)) {
                // One more live key exists: the range goes on after the page.
                page.more = true;
                break;
            }
            page.items.push(scan_item(entry, scan.keys_only));
        }
        page.count = page.items.len() as u64;
        page
    }

    /// Reclaims keys whose TTL passed by `now_ms`, at most `expired_per_tick_max` per call, and
    /// returns how many it removed. Keys left over are reclaimed by later ticks; until then
    /// reads already treat them as absent.
    pub fn tick(&mut self, now_ms: u64) -> usize {
        let mut expired = std::mem::take(&mut self.expired_buffer);
        self.wheel
            .advance(now_ms, self.config.expired_per_tick_max, &mut expired);
        let mut expired_count = 0;
        for (timer, deadline_ms, key) in expired.drain(..) {
            let stored_timer = self
                .store
                .get(&key)
                .and_then(EntryRef::expiry)
                .map(|expiry| expiry.timer);
            assert!(
                stored_timer == Some(timer),
                "fired timer {timer:?} (deadline_ms={deadline_ms}) does not match the entry's \
                 timer {stored_timer:?}"
            );
            if deadline_ms > now_ms {
                // The wheel's time never goes back, so a deadline written after the wall clock
                // stepped back fires early. The key still lives (reads agree): arm it again;
                // it is looked at on each tick until the clock passes its deadline.
                let timer = self.wheel.insert(deadline_ms, key.clone());
                self.store.set_timer(&key, timer);
                continue;
            }
            // The timer has fired already, so only the entry goes.
            let revision = self.begin_revision();
            let removed = self.store.remove(&key);
            if let Some(removed) = &removed {
                self.indexes
                    .on_write(&key, Some(removed.view().fields()), None);
            }
            self.leases.detach(&key);
            if let Some(journal) = &mut self.journal {
                journal.push(Effect::Remove { key: &key });
            }
            if let Some(removed) = removed {
                self.record_removal(revision, &key, &removed, DeleteCause::Expired);
            }
            self.finish_revision();
            self.stats.expiry_lag_ms.record(now_ms - deadline_ms);
            expired_count += 1;
        }
        self.stats.expired_count += expired_count as u64;
        self.expired_buffer = expired;
        let mut ended = Vec::new();
        self.leases
            .take_expired(self.mono_ms, self.config.expired_per_tick_max, &mut ended);
        for lease in ended {
            self.release_locks_of(lease);
            self.delete_lease_keys(lease, true, true);
            self.ended_leases.push((lease, true));
        }
        self.locks.expire_waits(self.mono_ms, &mut self.lock_events);
        expired_count
    }

    /// Starts loading into cache the memory a request for `key` will touch (a hint; it
    /// changes nothing and costs no miss of its own).
    pub fn prefetch(&self, key: &[u8]) {
        self.store.prefetch(key);
    }

    /// The shard's revision: the number of mutations applied so far.
    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// Entries held, including expired ones not yet reclaimed.
    pub fn key_count(&self) -> usize {
        self.store.len()
    }

    /// Pending TTL timers.
    pub fn timer_count(&self) -> usize {
        self.wheel.len()
    }

    /// Bytes charged against the memory budget: entries and secondary indexes.
    pub fn memory_bytes(&self) -> u64 {
        self.store.memory_bytes() + self.indexes.memory_bytes()
    }

    /// Whether `additional_bytes` more would still fit in the budget, which entries and
    /// indexes share. A write's own index pairs are charged once it applied, so the budget
    /// can be passed by one write's pairs at most.
    fn has_room_for(&self, additional_bytes: u64) -> bool {
        self.memory_bytes().saturating_add(additional_bytes) <= self.store.memory_bytes_max()
    }

    /// The shard's counters.
    pub fn stats(&self) -> ShardStats {
        self.stats
    }

    /// The shard's configuration.
    pub fn config(&self) -> &ShardConfig {
        &self.config
    }

    /// Checks the invariants that cost O(n): the memory charge, the key order, the lease and
    /// lock tables, and every index against the store. For tests.
    pub fn check_invariants(&self) {
        self.leases.check_invariants();
        self.locks.check_invariants();
        assert_eq!(
            self.store.memory_bytes(),
            self.store.memory_bytes_recomputed()
        );
        self.store.check_order();
        self.indexes.check(&self.store);
    }

    /// How many stored keys (expired ones included) are of slots this shard does not own,
    /// and the first found: after recovery under a changed cluster table, the keys of slots
    /// that moved away.
    pub fn unowned_keys(&self) -> (usize, Option<Vec<u8>>) {
        let mut count = 0;
        let mut first = None;
        for partition in 0..store::PARTITION_COUNT {
            for entry in self.store.partition(partition) {
                if !self
                    .config
                    .slots
                    .contains(tessera_protocol::slot_for_key(entry.key()))
                {
                    count += 1;
                    first.get_or_insert_with(|| entry.key().to_vec());
                }
            }
        }
        (count, first)
    }

    fn debug_check_owned(&self, key: &[u8]) {
        debug_assert!(
            self.config
                .slots
                .contains(tessera_protocol::slot_for_key(key)),
            "shard {} (slots {}) handed a key of slot {}",
            self.config.shard_id,
            self.config.slots,
            tessera_protocol::slot_for_key(key)
        );
    }

    /// The entry for `key` if it exists and has not expired.
    fn live_entry(&self, now_ms: u64, key: &[u8]) -> Option<EntryRef<'_>> {
        self.debug_check_owned(key);
        self.store
            .get(key)
            .filter(|entry| !entry.is_expired(now_ms))
    }

    fn get(&self, now_ms: u64, key: &[u8]) -> Option<Entry> {
        self.live_entry(now_ms, key).map(to_entry)
    }

    /// Removes `key` now if it has expired but its timer has not fired yet, so a write finds
    /// the same state a reader sees. Reclaiming is a mutation like the timer's.
    fn reclaim_if_expired(&mut self, now_ms: u64, key: &[u8]) {
        // Every mutation passes here first, so this is where a misrouted key is caught.
        self.debug_check_owned(key);
        if self
            .store
            .get(key)
            .is_some_and(|entry| entry.is_expired(now_ms))
        {
            self.begin_revision();
            self.remove_entry(key, DeleteCause::Expired);
            self.finish_revision();
            self.stats.expired_count += 1;
        }
    }

    /// Removes an entry and its timer (and journals it and records its event) without
    /// touching the revision.
    fn remove_entry(&mut self, key: &[u8], cause: DeleteCause) -> Option<OwnedEntry> {
        let entry = self.store.remove(key)?;
        self.indexes
            .on_write(key, Some(entry.view().fields()), None);
        self.leases.detach(key);
        if let Some(journal) = &mut self.journal {
            journal.push(Effect::Remove { key });
        }
        self.record_removal(self.revision, key, &entry, cause);
        if let Some(expiry) = entry.view().expiry() {
            let cancelled = self.wheel.cancel(expiry.timer);
            assert!(
                cancelled.is_some(),
                "entry's timer {:?} was not pending",
                expiry.timer
            );
        }
        Some(entry)
    }

    /// Records that `key` (which held `removed`) stopped existing at `revision`.
    fn record_removal(
        &mut self,
        revision: u64,
        key: &[u8],
        removed: &OwnedEntry,
        cause: DeleteCause,
    ) {
        if self.is_recording_events {
            self.events.push(Event::delete_with_fields(
                revision,
                key,
                cause,
                Some(Before {
                    value: removed.view().value(),
                    fields: removed.view().fields(),
                }),
            ));
        }
    }

    /// Writes `value` under `key` at `revision`, replacing any entry and its timer (a new
    /// key is created at `revision`; an existing one keeps its create revision).
    fn write_entry(
        &mut self,
        key: &[u8],
        fields: &[u8],
        value: &[u8],
        deadline_ms: Option<u64>,
        revision: u64,
    ) {
        // A put-like write without a lease leaves the key attached to none.
        self.leases.detach(key);
        let before = self
            .store
            .get(key)
            .map(|entry| (entry.revisions(), entry.expiry()));
        let revisions = before.map_or(KeyRevisions::created(revision), |(revisions, _)| {
            revisions.written(revision)
        });
        let expiry_before = before.and_then(|(_, expiry)| expiry);
        self.replace_entry(key, fields, value, deadline_ms, revisions, expiry_before);
    }

    /// Stores `value` and the fields blob `fields` under `key` with `revisions`, replacing
    /// the entry whose expiry (looked up by the caller) was `expiry_before`, and its timer,
    /// and keeps the indexes in step.
    fn replace_entry(
        &mut self,
        key: &[u8],
        fields: &[u8],
        value: &[u8],
        deadline_ms: Option<u64>,
        revisions: KeyRevisions,
        expiry_before: Option<Expiry>,
    ) {
        if let Some(expiry) = expiry_before {
            let cancelled = self.wheel.cancel(expiry.timer);
            assert!(
                cancelled.is_some(),
                "entry's timer {:?} was not pending",
                expiry.timer
            );
        }
        let expiry = deadline_ms.map(|deadline_ms| Expiry {
            deadline_ms,
            timer: self.wheel.insert(deadline_ms, Box::from(key)),
        });
        let make_event = |previous: Option<Before<'_>>| {
            Event::put_with_fields(
                revisions.modify,
                key,
                value,
                fields,
                revisions.create,
                revisions.version,
                previous,
            )
        };
        let mut event = None;
        let mut existed = false;
        let indexes = &mut self.indexes;
        self.store
            .insert_with(key, fields, value, revisions, expiry, |before| {
                existed = true;
                indexes.on_write(key, Some(before.fields()), Some(fields));
                if self.is_recording_events {
                    event = Some(make_event(Some(Before {
                        value: before.value(),
                        fields: before.fields(),
                    })));
                }
            });
        if !existed {
            self.indexes.on_write(key, None, Some(fields));
        }
        if self.is_recording_events {
            self.events.push(event.unwrap_or_else(|| make_event(None)));
        }
        let lease = self.leases.lease_of(key);
        journal_set(
            self.journal.as_mut(),
            key,
            fields,
            value,
            deadline_ms,
            revisions,
            lease,
        );
    }

    fn store_full(&mut self, needed_bytes: u64) -> Response {
        self.stats.refused_full_count += 1;
        Response::Error(ErrorReply::new(
            ErrorCode::StoreFull,
            format!(
                "shard {} memory budget exhausted: {} of {} bytes used ({} by indexes), write \
                 needs {needed_bytes} more",
                self.config.shard_id,
                self.memory_bytes(),
                self.store.memory_bytes_max(),
                self.indexes.memory_bytes()
            ),
        ))
    }

    #[allow(
        clippy::too_many_arguments,
        reason = "mirrors the fields of a Put request"
    )]
    fn put(
        &mut self,
        now_ms: u64,
        key: &[u8],
        fields: &[u8],
        value: &[u8],
        ttl_ms: Option<u64>,
        keep_ttl: bool,
        condition: Condition<'_>,
        return_previous: bool,
        lease: Option<u64>,
    ) -> Response {
        if let Some(lease) = lease {
            if let Err(refusal) = self.check_lease_for(key, lease) {
                return refusal;
            }
        }
        // One lookup answers everything the put needs to know about the current entry; the
        // write is the second (a put is on the hot path).
        self.debug_check_owned(key);
        let mut current = self.store.get(key).map(|entry| Current {
            is_expired: entry.is_expired(now_ms),
            revisions: entry.revisions(),
            expiry: entry.expiry(),
            cost: entry.cost(),
            previous: return_previous.then(|| to_entry(entry)),
            is_value_expected: match condition {
                Condition::IfValue(expected) => entry.value() == expected,
                _ => false,
            },
        });
        if current.as_ref().is_some_and(|current| current.is_expired) {
            self.reclaim_if_expired(now_ms, key);
            current = None;
        }
        let condition_holds = condition.holds(current.as_ref());
        let (revisions_before, expiry_before, cost_old, previous) = match current {
            Some(current) => (
                Some(current.revisions),
                current.expiry,
                current.cost,
                current.previous,
            ),
            None => (None, None, 0, None),
        };
        if !condition_holds {
            return Response::Put {
                applied: false,
                mod_revision: revisions_before.map_or(0, |revisions| revisions.modify),
                version: revisions_before.map_or(0, |revisions| revisions.version),
                previous,
            };
        }
        let deadline_ms = match ttl_ms {
            Some(ttl_ms) => Some(now_ms.saturating_add(ttl_ms)),
            None if keep_ttl => expiry_before.map(|expiry| expiry.deadline_ms),
            None => None,
        };
        let cost_new = entry_cost(
            key.len(),
            value.len() + fields_cost(fields.len()),
            deadline_ms.is_some(),
        );
        if cost_new > cost_old && !self.has_room_for(cost_new - cost_old) {
            return self.store_full(cost_new - cost_old);
        }
        let revision = self.begin_revision();
        let revisions = revisions_before.map_or(KeyRevisions::created(revision), |before| {
            before.written(revision)
        });
        self.set_lease(key, lease);
        self.replace_entry(key, fields, value, deadline_ms, revisions, expiry_before);
        self.finish_revision();
        Response::Put {
            applied: true,
            mod_revision: revision,
            version: revisions.version,
            previous,
        }
    }

    /// Whether `key` may be attached to `lease`: the lease lives (homed here, or known to
    /// live by its home on another core of this node) and the attachments have room.
    fn check_lease_for(&self, key: &[u8], lease: u64) -> Result<(), Response> {
        self.check_lease_lives(lease)?;
        self.leases
            .has_room_for_key(key)
            .map_err(|full| self.lease_table_full(full))
    }

    /// Whether `lease` lives, for a key or a lock of this shard to use it.
    fn check_lease_lives(&self, lease: u64) -> Result<(), Response> {
        let id = LeaseId(lease);
        if id.node_id() != self.config.node_id {
            return Err(error(
                ErrorCode::InvalidArgument,
                format!(
                    "lease {lease} is homed on node {}; a key can only be attached to a lease \
                     of its own node",
                    id.node_id()
                ),
            ));
        }
        let lives = if self.is_home(lease) {
            self.leases.home_lease(lease, self.mono_ms).is_some()
        } else {
            self.leases.is_foreign_alive(lease)
        };
        if !lives {
            return Err(error(
                ErrorCode::LeaseNotFound,
                format!("lease {lease} does not live (it expired, was revoked or never was)"),
            ));
        }
        Ok(())
    }

    fn lease_table_full(&self, full: LeaseTableFull) -> Response {
        let what = match full {
            LeaseTableFull::Leases(max) => format!("{max} leases are homed on it"),
            LeaseTableFull::AttachedKeys(max) => {
                format!("{max} of its keys are attached to leases")
            }
        };
        error(
            ErrorCode::TableFull,
            format!("shard {} is full: {what}", self.config.shard_id),
        )
    }

    /// Attaches a key a put-like write is writing to `lease`, or detaches it (`None`).
    fn set_lease(&mut self, key: &[u8], lease: Option<u64>) {
        match lease {
            Some(lease) => self.leases.attach(key, lease),
            None => self.leases.detach(key),
        }
    }

    /// Grants a lease homed here, at a new revision (the grant is journaled).
    fn lease_grant(&mut self, ttl_ms: u64) -> Response {
        let Some(id) = self
            .leases
            .next_id(self.config.node_id, self.config.shard_id)
        else {
            return error(
                ErrorCode::InvalidArgument,
                format!(
                    "node {} core {} cannot name leases (ids hold node ids up to {} and core \
                     ids up to {}), or its lease ids ran out",
                    self.config.node_id,
                    self.config.shard_id,
                    LeaseId::NODE_ID_MAX,
                    LeaseId::CORE_ID_MAX
                ),
            );
        };
        if let Err(full) = self.leases.grant(id, ttl_ms, self.mono_ms) {
            return self.lease_table_full(full);
        }
        self.begin_revision();
        if let Some(journal) = &mut self.journal {
            journal.push(Effect::LeaseGrant { id, ttl_ms });
        }
        self.finish_revision();
        Response::LeaseGranted { id, ttl_ms }
    }

    /// Ends a lease homed here now: its keys here are deleted at one revision, and the core
    /// tells the other cores.
    fn lease_revoke(&mut self, lease: u64) -> Response {
        if self.leases.home_lease(lease, self.mono_ms).is_none() {
            return Response::LeaseRevoked { existed: false };
        }
        self.leases.end_home(lease);
        // Locks first: the lease's end is journaled last, so a log cut between them leaves
        // the lease alive (it comes back), never a lock held by a lease that is gone.
        self.release_locks_of(lease);
        self.delete_lease_keys(lease, false, true);
        self.ended_leases.push((lease, false));
        Response::LeaseRevoked { existed: true }
    }

    /// What this shard knows of a lease.
    fn lease_state(&self, lease: u64) -> LeaseState {
        let is_home = self.is_home(lease);
        let home = is_home
            .then(|| self.leases.home_lease(lease, self.mono_ms))
            .flatten();
        let (keys, more) = self
            .leases
            .keys_of(lease, SCAN_LIMIT_MAX as usize, SCAN_PAGE_BYTES_MAX);
        LeaseState {
            is_home,
            ttl_ms: home.map(|home| home.ttl_ms),
            remaining_ms: home.map(|home| home.deadline_ms.saturating_sub(self.mono_ms)),
            keys,
            more,
        }
    }

    /// Adds to the decimal counter under `key`, within its bounds, as the request says.
    fn add(&mut self, now_ms: u64, add: &ArchivedCounterAdd) -> Response {
        self.reclaim_if_expired(now_ms, &add.key);
        let plan = match self.plan_add(now_ms, add) {
            Ok(plan) => plan,
            Err(refusal) => return refusal,
        };
        let Some(plan) = plan else {
            return Response::Counter {
                applied: false,
                value: 0,
                mod_revision: 0,
            };
        };
        if plan.cost_new > plan.cost_old && !self.has_room_for(plan.cost_new - plan.cost_old) {
            return self.store_full(plan.cost_new - plan.cost_old);
        }
        let revision = self.begin_revision();
        self.write_counter(&add.key, &plan, revision);
        self.finish_revision();
        Response::Counter {
            applied: true,
            value: plan.value,
            mod_revision: revision,
        }
    }

    /// What a counter add would write (`None`: the counter is missing and not created), or
    /// the refusal: the stored value is not a counter, or the sum overflows or leaves the
    /// bounds. Changes nothing; expired keys were reclaimed by the caller.
    fn plan_add(
        &self,
        now_ms: u64,
        add: &ArchivedCounterAdd,
    ) -> Result<Option<CounterPlan>, Response> {
        let key = add.key.as_slice();
        let delta = add.delta.to_native();
        let ttl_ms = add.ttl_ms.as_ref().map(|ttl_ms| ttl_ms.to_native());
        let current = self.live_entry(now_ms, key);
        let (current_value, expiry_before, revisions_before, cost_old) = match current {
            None if !add.create => return Ok(None),
            None => (0, None, None, 0),
            Some(entry) => match parse_counter(entry.value()) {
                Some(value) => (value, entry.expiry(), Some(entry.revisions()), entry.cost()),
                None => {
                    return Err(error(
                        ErrorCode::OutOfRange,
                        format!(
                            "the value under the key ({} bytes) is not a decimal i64 counter",
                            entry.value().len()
                        ),
                    ))
                }
            },
        };
        let Some(value) = current_value.checked_add(delta) else {
            return Err(error(
                ErrorCode::OutOfRange,
                format!("adding {delta} to {current_value} overflows i64"),
            ));
        };
        let min = add.min.as_ref().map_or(i64::MIN, |min| min.to_native());
        let max = add.max.as_ref().map_or(i64::MAX, |max| max.to_native());
        if !(min..=max).contains(&value) {
            return Err(error(
                ErrorCode::OutOfRange,
                format!(
                    "adding {delta} to {current_value} gives {value}, outside {min}..={max}; \
                     nothing was applied"
                ),
            ));
        }
        let deadline_ms = match (revisions_before, ttl_ms) {
            // A new counter starts its window; an existing one keeps it unless refreshed.
            (None, Some(ttl_ms)) => Some(now_ms.saturating_add(ttl_ms)),
            (Some(_), Some(ttl_ms)) if add.refresh_ttl => Some(now_ms.saturating_add(ttl_ms)),
            _ => expiry_before.map(|expiry| expiry.deadline_ms),
        };
        let text = value.to_string();
        // A counter keeps its fields: only the number changes.
        let fields = current
            .map(|entry| entry.fields().to_vec())
            .unwrap_or_default();
        let cost_new = entry_cost(
            key.len(),
            text.len() + fields_cost(fields.len()),
            deadline_ms.is_some(),
        );
        Ok(Some(CounterPlan {
            value,
            text,
            fields,
            deadline_ms,
            revisions_before,
            expiry_before,
            cost_old,
            cost_new,
        }))
    }

    /// Writes a planned counter value at `revision`.
    fn write_counter(&mut self, key: &[u8], plan: &CounterPlan, revision: u64) {
        let revisions = plan
            .revisions_before
            .map_or(KeyRevisions::created(revision), |before| {
                before.written(revision)
            });
        self.replace_entry(
            key,
            &plan.fields,
            plan.text.as_bytes(),
            plan.deadline_ms,
            revisions,
            plan.expiry_before,
        );
    }

    /// Whether a transaction's compare holds now.
    fn compare_holds(&self, now_ms: u64, compare: &ArchivedCompare) -> bool {
        let entry = self.live_entry(now_ms, &compare.key);
        let revisions = entry.map(EntryRef::revisions);
        let number = |op: &ArchivedCompareOp, given: u64, field: fn(KeyRevisions) -> u64| {
            compare_op(*op).holds(&revisions.map_or(0, field), &given)
        };
        match &compare.check {
            ArchivedCheck::Exists => entry.is_some(),
            ArchivedCheck::Absent => entry.is_none(),
            ArchivedCheck::Value(op, value) => {
                entry.is_some_and(|entry| compare_op(*op).holds(entry.value(), value.as_slice()))
            }
            ArchivedCheck::Version(op, given) => {
                number(op, given.to_native(), |revisions| revisions.version)
            }
            ArchivedCheck::CreateRevision(op, given) => {
                number(op, given.to_native(), |revisions| revisions.create)
            }
            ArchivedCheck::ModRevision(op, given) => {
                number(op, given.to_native(), |revisions| revisions.modify)
            }
            ArchivedCheck::Fence(token) => token.to_native() >= self.locks.last_token(&compare.key),
            ArchivedCheck::Lease(op, given) => compare_op(*op).holds(
                &self
                    .leases
                    .lease_of(&compare.key)
                    .filter(|_| entry.is_some())
                    .unwrap_or(0),
                &given.to_native(),
            ),
        }
    }

    /// What a transaction branch will do, decided before anything applies: each counter
    /// add's write, the bytes its gets and previous entries read, and whether it writes;
    /// or the refusal (a counter add, the read bound, the memory budget).
    fn plan_txn(
        &mut self,
        now_ms: u64,
        ops: &rkyv::vec::ArchivedVec<ArchivedTxnOp>,
    ) -> Result<TxnPlan, Response> {
        let mut counters = Vec::new();
        let (mut cost_new, mut cost_old, mut read_bytes) = (0_u64, 0_u64, 0_usize);
        let mut writes = false;
        for op in ops.iter() {
            let read_entry = |key: &[u8]| {
                self.live_entry(now_ms, key)
                    .map_or(0, |entry| entry.key().len() + entry.value().len())
            };
            match op {
                ArchivedTxnOp::Get { key } => read_bytes += read_entry(key),
                ArchivedTxnOp::Put {
                    key,
                    value,
                    ttl_ms,
                    keep_ttl,
                    return_previous,
                    lease,
                    fields,
                } => {
                    if let Some(lease) = lease.as_ref() {
                        self.check_lease_for(key, lease.to_native())?;
                    }
                    let has_expiry = ttl_ms.is_some()
                        || (*keep_ttl
                            && self
                                .live_entry(now_ms, key)
                                .is_some_and(|entry| entry.expiry().is_some()));
                    let fields = fields::encoded_size_archived(fields);
                    cost_new +=
                        entry_cost(key.len(), value.len() + fields_cost(fields), has_expiry);
                    cost_old += self.store.cost_of(key);
                    if *return_previous {
                        read_bytes += read_entry(key);
                    }
                    writes = true;
                }
                ArchivedTxnOp::Delete {
                    key,
                    return_previous,
                } => {
                    if *return_previous {
                        read_bytes += read_entry(key);
                    }
                    // A delete frees what the key costs, for the writes beside it.
                    cost_old += self.store.cost_of(key);
                    writes |= self.store.get(key).is_some();
                }
                ArchivedTxnOp::Add(add) => match self.plan_add(now_ms, add) {
                    Err(refusal) => return Err(refusal),
                    Ok(plan) => {
                        if let Some(plan) = &plan {
                            cost_new += plan.cost_new;
                            cost_old += plan.cost_old;
                            writes = true;
                        }
                        counters.push(plan);
                    }
                },
                ArchivedTxnOp::Range(_) => {}
            }
        }
        if read_bytes > TXN_READ_BYTES_MAX {
            return Err(error(
                ErrorCode::TooLarge,
                format!(
                    "the transaction's gets and previous entries read {read_bytes} bytes, over \
                     the limit of {TXN_READ_BYTES_MAX}; nothing was applied"
                ),
            ));
        }
        if cost_new > cost_old && !self.has_room_for(cost_new - cost_old) {
            return Err(self.store_full(cost_new - cost_old));
        }
        Ok(TxnPlan {
            counters,
            read_bytes,
            writes,
        })
    }

    /// Runs a transaction: the compares, then one branch's ops in order, every write at one
    /// revision (none if the branch writes nothing). Everything that can refuse (a counter
    /// out of range, the memory budget, the read bounds) is checked before anything applies.
    #[allow(
        clippy::too_many_lines,
        reason = "one arm per op kind, each applying what `plan_txn` decided"
    )]
    fn txn(&mut self, now_ms: u64, txn: &ArchivedTxn) -> Response {
        for key in txn_keys(txn) {
            self.reclaim_if_expired(now_ms, key);
        }
        let succeeded = txn
            .compares
            .iter()
            .all(|compare| self.compare_holds(now_ms, compare));
        let ops = if succeeded {
            &txn.success
        } else {
            &txn.failure
        };
        let TxnPlan {
            counters,
            read_bytes,
            writes,
        } = match self.plan_txn(now_ms, ops) {
            Ok(plan) => plan,
            Err(refusal) => return refusal,
        };
        let revision = if writes {
            self.begin_revision()
        } else {
            self.revision
        };
        let mut budget = ReadBudget {
            bytes: TXN_READ_BYTES_MAX - read_bytes,
            items: TXN_RANGE_ITEMS_MAX,
        };
        let mut counters = counters.into_iter();
        let mut results = Vec::with_capacity(ops.len());
        for op in ops.iter() {
            let result = match op {
                ArchivedTxnOp::Get { key } => TxnResult::Get(self.get(now_ms, key)),
                ArchivedTxnOp::Put { .. } => self.txn_put(now_ms, op, revision),
                ArchivedTxnOp::Delete {
                    key,
                    return_previous,
                } => {
                    let removed = self.remove_entry(key, DeleteCause::Deleted);
                    TxnResult::Delete {
                        deleted: removed.is_some(),
                        previous: removed
                            .filter(|_| *return_previous)
                            .map(|entry| into_entry(&entry)),
                    }
                }
                ArchivedTxnOp::Add(add) => match counters.next().flatten() {
                    Some(plan) => {
                        self.write_counter(&add.key, &plan, revision);
                        TxnResult::Add {
                            applied: true,
                            value: plan.value,
                        }
                    }
                    None => TxnResult::Add {
                        applied: false,
                        value: 0,
                    },
                },
                ArchivedTxnOp::Range(scan) => {
                    TxnResult::Range(self.txn_range(now_ms, scan, &mut budget))
                }
            };
            results.push(result);
        }
        if writes {
            self.finish_revision();
        }
        Response::Txn(TxnOutcome {
            succeeded,
            revision,
            results,
        })
    }

    /// Applies a transaction's put op at `revision`.
    fn txn_put(&mut self, now_ms: u64, op: &ArchivedTxnOp, revision: u64) -> TxnResult {
        let ArchivedTxnOp::Put {
            key,
            value,
            ttl_ms,
            keep_ttl,
            return_previous,
            lease,
            fields,
        } = op
        else {
            return TxnResult::Put {
                version: 0,
                previous: None,
            };
        };
        let fields = fields_blob(fields);
        let before = self.store.get(key);
        let previous = before.filter(|_| *return_previous).map(to_entry);
        let expiry_before = before.and_then(EntryRef::expiry);
        let revisions = before.map_or(KeyRevisions::created(revision), |entry| {
            entry.revisions().written(revision)
        });
        let deadline_ms = match ttl_ms.as_ref() {
            Some(ttl_ms) => Some(now_ms.saturating_add(ttl_ms.to_native())),
            None if *keep_ttl => expiry_before.map(|expiry| expiry.deadline_ms),
            None => None,
        };
        self.set_lease(key, lease.as_ref().map(|lease| lease.to_native()));
        self.replace_entry(key, &fields, value, deadline_ms, revisions, expiry_before);
        TxnResult::Put {
            version: revisions.version,
            previous,
        }
    }

    fn delete(
        &mut self,
        now_ms: u64,
        key: &[u8],
        condition: &ArchivedDeleteCondition,
        return_previous: bool,
    ) -> Response {
        self.reclaim_if_expired(now_ms, key);
        let Some(entry) = self.store.get(key) else {
            return Response::Delete {
                deleted: false,
                version: 0,
                previous: None,
            };
        };
        let holds = match condition {
            ArchivedDeleteCondition::Always => true,
            ArchivedDeleteCondition::IfVersion(version) => {
                entry.revisions().version == version.to_native()
            }
            ArchivedDeleteCondition::IfValue(value) => entry.value() == value.as_slice(),
        };
        if !holds {
            return Response::Delete {
                deleted: false,
                version: entry.revisions().version,
                previous: return_previous.then(|| to_entry(entry)),
            };
        }
        self.begin_revision();
        let removed = self.remove_entry(key, DeleteCause::Deleted);
        self.finish_revision();
        Response::Delete {
            deleted: removed.is_some(),
            version: 0,
            previous: removed
                .filter(|_| return_previous)
                .map(|entry| into_entry(&entry)),
        }
    }

    /// Defines an index at a new revision (journaled); its build runs later, in slices.
    fn create_index(&mut self, spec: tessera_protocol::IndexSpec) -> Response {
        let name = spec.name.clone();
        let journaled = spec.clone();
        match self.indexes.create(spec, &self.store) {
            Ok(indexes::Created::Exists) => Response::IndexCreated { created: false },
            Ok(_) => {
                self.begin_revision();
                if let Some(journal) = &mut self.journal {
                    journal.push(Effect::IndexCreate {
                        name: journaled.name.as_bytes(),
                        prefix: &journaled.prefix,
                        field: journaled.field.as_bytes(),
                        kind: journaled.kind,
                    });
                }
                self.finish_revision();
                Response::IndexCreated { created: true }
            }
            Err(refusal) => error(
                match refusal {
                    indexes::CreateError::NameTaken { .. } => ErrorCode::InvalidArgument,
                    indexes::CreateError::TooMany | indexes::CreateError::TooManyForPrefix => {
                        ErrorCode::TableFull
                    }
                },
                format!(
                    "index {name:?} on shard {}: {refusal}",
                    self.config.shard_id
                ),
            ),
        }
    }

    /// Removes an index at a new revision (journaled), if it exists.
    fn drop_index(&mut self, name: &str) -> Response {
        if !self.indexes.drop_index(name) {
            return Response::IndexDropped { dropped: false };
        }
        self.begin_revision();
        if let Some(journal) = &mut self.journal {
            journal.push(Effect::IndexDrop {
                name: name.as_bytes(),
            });
        }
        self.finish_revision();
        Response::IndexDropped { dropped: true }
    }

    /// Sets (`Some`) or removes (`None`) a live key's deadline.
    fn set_ttl(&mut self, now_ms: u64, key: &[u8], deadline_ms: Option<u64>) -> Response {
        self.reclaim_if_expired(now_ms, key);
        let Some(entry) = self.live_entry(now_ms, key) else {
            return Response::Expiry {
                applied: false,
                mod_revision: 0,
            };
        };
        let current_expiry = entry.expiry();
        let revisions_before = entry.revisions();
        if deadline_ms.is_none() && current_expiry.is_none() {
            // Persisting a key that never expires changes nothing, so it is not a mutation.
            return Response::Expiry {
                applied: false,
                mod_revision: entry.mod_revision(),
            };
        }
        if current_expiry.is_none() {
            let timer_cost = entry_cost(key.len(), 0, true) - entry_cost(key.len(), 0, false);
            if !self.has_room_for(timer_cost) {
                return self.store_full(timer_cost);
            }
        }
        if let Some(expiry) = current_expiry {
            let cancelled = self.wheel.cancel(expiry.timer);
            assert!(
                cancelled.is_some(),
                "entry's timer {:?} was not pending",
                expiry.timer
            );
        }
        let expiry = deadline_ms.map(|deadline_ms| Expiry {
            deadline_ms,
            timer: self.wheel.insert(deadline_ms, Box::from(key)),
        });
        let revision = self.begin_revision();
        let revisions = revisions_before.written(revision);
        let is_updated = self.store.update(key, revisions, expiry);
        assert!(is_updated, "live entry vanished while its ttl was set");
        if let Some(entry) = self.store.get(key) {
            let value = entry.value();
            let lease = self.leases.lease_of(key);
            journal_set(
                self.journal.as_mut(),
                key,
                entry.fields(),
                value,
                deadline_ms,
                revisions,
                lease,
            );
            if self.is_recording_events {
                // A TTL change is a write of the same value and fields.
                self.events.push(Event::put_with_fields(
                    revision,
                    key,
                    value,
                    entry.fields(),
                    revisions.create,
                    revisions.version,
                    Some(Before {
                        value,
                        fields: entry.fields(),
                    }),
                ));
            }
        }
        self.finish_revision();
        Response::Expiry {
            applied: true,
            mod_revision: revision,
        }
    }

    fn ttl(&self, now_ms: u64, key: &[u8]) -> TtlState {
        match self.live_entry(now_ms, key) {
            None => TtlState::Missing,
            Some(entry) => match entry.deadline_ms() {
                None => TtlState::Persistent,
                Some(expires_at_ms) => TtlState::Expiring {
                    remaining_ms: expires_at_ms.saturating_sub(now_ms),
                    expires_at_ms,
                },
            },
        }
    }

    /// Writes every entry at one new revision, or none if the budget cannot hold them all.
    fn multi_put(
        &mut self,
        now_ms: u64,
        entries: &rkyv::vec::ArchivedVec<ArchivedPutEntry>,
    ) -> Response {
        if entries.is_empty() {
            return Response::MultiPut {
                mod_revisions: Vec::new(),
            };
        }
        for entry in entries.iter() {
            self.reclaim_if_expired(now_ms, &entry.key);
        }
        // The budget check counts each distinct key's old cost once and its last write's cost,
        // since a later entry for the same key replaces an earlier one.
        let mut seen: AHashSet<&[u8]> = AHashSet::with_capacity(entries.len());
        let mut cost_new = 0_u64;
        let mut cost_old = 0_u64;
        for entry in entries.iter().rev() {
            if seen.insert(entry.key.as_slice()) {
                let has_expiry = entry.ttl_ms.is_some();
                let fields = fields::encoded_size_archived(&entry.fields);
                cost_new += entry_cost(
                    entry.key.len(),
                    entry.value.len() + fields_cost(fields),
                    has_expiry,
                );
                cost_old += self.store.cost_of(&entry.key);
            }
        }
        if cost_new > cost_old && !self.has_room_for(cost_new - cost_old) {
            return self.store_full(cost_new - cost_old);
        }
        let revision = self.begin_revision();
        for entry in entries.iter() {
            let deadline_ms = entry
                .ttl_ms
                .as_ref()
                .map(|ttl_ms| now_ms.saturating_add(ttl_ms.to_native()));
            self.write_entry(
                &entry.key,
                &fields_blob(&entry.fields),
                &entry.value,
                deadline_ms,
                revision,
            );
        }
        self.finish_revision();
        Response::MultiPut {
            mod_revisions: vec![revision; entries.len()],
        }
    }

    /// Removes every listed key that exists at one new revision (none if none exists).
    fn multi_delete(
        &mut self,
        now_ms: u64,
        keys: &rkyv::vec::ArchivedVec<rkyv::vec::ArchivedVec<u8>>,
    ) -> Response {
        for key in keys.iter() {
            self.reclaim_if_expired(now_ms, key);
        }
        // A batch on one shard is one revision, however many keys it removed, and none if it
        // removed nothing.
        let revision_before = self.revision;
        self.begin_revision();
        let deleted: Vec<bool> = keys
            .iter()
            .map(|key| self.remove_entry(key, DeleteCause::Deleted).is_some())
            .collect();
        if deleted.contains(&true) {
            self.finish_revision();
        } else {
            self.revision = revision_before;
            if let Some(journal) = &mut self.journal {
                journal.abort();
            }
        }
        Response::MultiDelete { deleted }
    }
}

/// Bytes of a record's header and revision in [`Shard::journal_bound`].
const JOURNAL_RECORD_BOUND: u64 = 16;

/// Bytes of an effect's kind, sizes and deadline in [`Shard::journal_bound`].
const JOURNAL_EFFECT_BOUND: u64 = 31;

/// Log bytes of a write of `key` with a value of `value_size` bytes, and of the removal of
/// an expired entry the write may reclaim first (its own record).
fn key_write(key: &[u8], value_size: usize) -> u64 {
    2 * (JOURNAL_RECORD_BOUND + JOURNAL_EFFECT_BOUND + key.len() as u64) + value_size as u64
}

/// Log bytes of the `Fields` effect after a set, if the entry has fields.
fn fields_write(key: &[u8], fields_size: usize) -> u64 {
    if fields_size == 0 {
        0
    } else {
        JOURNAL_EFFECT_BOUND + (key.len() + fields_size) as u64
    }
}

/// [`fields_write`] for a request's fields.
fn archived_fields_write(key: &[u8], fields: &[tessera_protocol::query::ArchivedField]) -> u64 {
    fields_write(key, fields::encoded_size_archived(fields))
}

/// Bytes of key removals one revision of a lease's end holds; the rest go in the next
/// revisions, so a record stays well under `RECORD_PAYLOAD_SIZE_MAX`.
const LEASE_END_RECORD_BYTES_MAX: usize = 16 * 1024 * 1024;

/// Longest decimal text of an `i64` (`-9223372036854775808`).
const COUNTER_TEXT_MAX: usize = 20;

/// What a counter add writes, decided before anything applies.
struct CounterPlan {
    value: i64,
    text: String,
    /// The fields the counter keeps.
    fields: Vec<u8>,
    deadline_ms: Option<u64>,
    revisions_before: Option<KeyRevisions>,
    expiry_before: Option<Expiry>,
    cost_old: u64,
    cost_new: u64,
}

/// What a transaction branch will do ([`Shard::plan_txn`]).
struct TxnPlan {
    /// Each counter add's write, in op order (`None`: missing and not created).
    counters: Vec<Option<CounterPlan>>,
    read_bytes: usize,
    writes: bool,
}

/// What is left of a transaction's read bounds for its range ops.
struct ReadBudget {
    bytes: usize,
    items: usize,
}

fn error(code: ErrorCode, message: String) -> Response {
    Response::Error(ErrorReply::new(code, message))
}

fn compare_op(op: ArchivedCompareOp) -> CompareOp {
    match op {
        ArchivedCompareOp::Equal => CompareOp::Equal,
        ArchivedCompareOp::NotEqual => CompareOp::NotEqual,
        ArchivedCompareOp::Less => CompareOp::Less,
        ArchivedCompareOp::LessOrEqual => CompareOp::LessOrEqual,
        ArchivedCompareOp::Greater => CompareOp::Greater,
        ArchivedCompareOp::GreaterOrEqual => CompareOp::GreaterOrEqual,
    }
}

/// Most keys a scan's page may hold.
fn scan_limit(scan: &ArchivedScan) -> usize {
    usize::try_from(scan.limit.to_native()).unwrap_or(usize::MAX)
}

/// Bytes a scan item carries: its key, and its value unless keys only.
fn scan_item_bytes(entry: EntryRef<'_>, keys_only: bool) -> usize {
    entry.key().len() + if keys_only { 0 } else { entry.value().len() }
}

fn scan_item(entry: EntryRef<'_>, keys_only: bool) -> ScanItem {
    ScanItem {
        key: entry.key().to_vec(),
        entry: (!keys_only).then(|| to_entry(entry)),
    }
}

/// A counter's value: decimal text of an i64, optionally signed, nothing else.
fn parse_counter(text: &[u8]) -> Option<i64> {
    std::str::from_utf8(text).ok()?.parse().ok()
}

/// What a put needs to know of the entry it may replace.
struct Current {
    is_expired: bool,
    revisions: KeyRevisions,
    expiry: Option<Expiry>,
    cost: u64,
    previous: Option<Entry>,
    /// For an `IfValue` put, whether the value is the one expected.
    is_value_expected: bool,
}

/// When a put applies, borrowed from the request.
#[derive(Debug, Clone, Copy)]
enum Condition<'a> {
    Always,
    IfAbsent,
    IfPresent,
    IfVersion(u64),
    IfValue(&'a [u8]),
}

impl<'a> Condition<'a> {
    fn of(condition: &'a ArchivedPutCondition) -> Self {
        match condition {
            ArchivedPutCondition::Always => Self::Always,
            ArchivedPutCondition::IfAbsent => Self::IfAbsent,
            ArchivedPutCondition::IfPresent => Self::IfPresent,
            ArchivedPutCondition::IfVersion(version) => Self::IfVersion(version.to_native()),
            ArchivedPutCondition::IfValue(value) => Self::IfValue(value.as_slice()),
        }
    }

    /// Whether a put applies to `current` (the live entry, if any).
    fn holds(self, current: Option<&Current>) -> bool {
        match self {
            Self::Always => true,
            Self::IfAbsent => current.is_none(),
            Self::IfPresent => current.is_some(),
            Self::IfVersion(version) => {
                current.map_or(0, |current| current.revisions.version) == version
            }
            Self::IfValue(_) => current.is_some_and(|current| current.is_value_expected),
        }
    }
}

/// Journals that `key` now holds `value` with `revisions`, if the shard keeps a journal.
fn journal_set(
    journal: Option<&mut RecordWriter>,
    key: &[u8],
    fields: &[u8],
    value: &[u8],
    deadline_ms: Option<u64>,
    revisions: KeyRevisions,
    lease: Option<u64>,
) {
    if let Some(journal) = journal {
        journal.push(Effect::Set {
            key,
            value,
            deadline_ms,
            create_revision: revisions.create,
            version: revisions.version,
        });
        if !fields.is_empty() {
            journal.push(Effect::Fields { key, fields });
        }
        if let Some(lease) = lease {
            journal.push(Effect::Attach { key, lease });
        }
    }
}

pub(crate) fn to_entry(entry: EntryRef<'_>) -> Entry {
    let revisions = entry.revisions();
    Entry {
        value: entry.value().to_vec(),
        create_revision: revisions.create,
        mod_revision: revisions.modify,
        version: revisions.version,
        expires_at_ms: entry.deadline_ms(),
        fields: fields::to_fields(entry.fields()),
    }
}

/// Checks a fields blob read from disk before it is stored.
fn check_fields_blob(blob: &[u8]) -> Result<(), DurabilityError> {
    fields::decode(blob)
        .map(|_| ())
        .map_err(|error| DurabilityError::corrupt(error.to_string()))
}

/// A request's fields as the store keeps them.
fn fields_blob(fields: &[tessera_protocol::query::ArchivedField]) -> Vec<u8> {
    let mut blob = Vec::new();
    fields::encode_archived(fields, &mut blob);
    blob
}

fn into_entry(entry: &OwnedEntry) -> Entry {
    to_entry(entry.view())
}

#[cfg(test)]
mod query_tests;
#[cfg(test)]
mod tests;
