//! Locks, sans-I/O: each lock's holder (a lease and the fencing token of its grant), its line
//! of waiters (first come, first served), and the last token it granted, which fenced writes
//! compare against.
//!
//! The shard decides: it grants a lock at a new revision whose number is the token (so tokens
//! only grow, and survive restarts with the log), hands the lock to the first waiter whose
//! lease lives when it is released, and drops the waits of a lease that ended. A waiter is
//! answered through the core: the shard records what happened to it ([`LockEvent`]) and the
//! core delivers it to the request that waits.
//!
//! **Invariants:** a waiter is in exactly one line and in `waiters`' count; a lock with no
//! holder has no waiter (a release grants the next one at once); `by_lease` names every lock
//! a lease holds or waits for.

use std::collections::{BTreeSet, VecDeque};

use ahash::AHashMap;

/// Bounds of a shard's lock table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LockLimits {
    /// Locks the shard remembers (held or released: a released one keeps its last token).
    pub locks_max: usize,
    /// Requests waiting in line, over all locks.
    pub waiters_max: usize,
}

impl Default for LockLimits {
    fn default() -> Self {
        Self {
            locks_max: 100_000,
            waiters_max: 100_000,
        }
    }
}

/// Who holds a lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Holder {
    /// The lease.
    pub lease: u64,
    /// The fencing token of the grant.
    pub token: u64,
}

#[derive(Debug, Clone, Copy)]
struct Waiter {
    id: u64,
    lease: u64,
    /// When it stops waiting, in monotonic milliseconds.
    deadline_ms: u64,
}

#[derive(Debug, Default)]
struct LockState {
    holder: Option<Holder>,
    line: VecDeque<Waiter>,
    last_token: u64,
}

/// What happened to a waiting request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockEvent {
    /// It holds the lock now, with this token.
    Granted {
        /// The waiter.
        waiter: u64,
        /// The fencing token.
        token: u64,
    },
    /// Its wait ended without the lock; `holder_token` is the holder's.
    TimedOut {
        /// The waiter.
        waiter: u64,
        /// The current holder's token.
        holder_token: u64,
    },
    /// Its lease ended while it waited.
    LeaseEnded {
        /// The waiter.
        waiter: u64,
    },
}

/// A table is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockTableFull {
    /// `locks_max` locks are known.
    Locks(usize),
    /// `waiters_max` requests wait.
    Waiters(usize),
}

/// A shard's locks.
#[derive(Debug, Default)]
pub struct Locks {
    limits: LockLimits,
    table: AHashMap<Box<[u8]>, LockState>,
    /// Every lock each lease holds or waits for, in name order (so a lease's end releases
    /// them in the same order on every shard).
    by_lease: AHashMap<u64, BTreeSet<Box<[u8]>>>,
    waiter_count: usize,
    last_waiter: u64,
}

impl Locks {
    /// An empty table.
    pub fn new(limits: LockLimits) -> Self {
        Self {
            limits,
            ..Self::default()
        }
    }

    /// The holder of `name`.
    pub fn holder(&self, name: &[u8]) -> Option<Holder> {
        self.table.get(name).and_then(|lock| lock.holder)
    }

    /// The last token granted for `name` (0 if none was).
    pub fn last_token(&self, name: &[u8]) -> u64 {
        self.table.get(name).map_or(0, |lock| lock.last_token)
    }

    /// Whether a new lock `name` has room.
    ///
    /// # Errors
    /// The table is full and does not know `name`.
    pub fn has_room_for(&self, name: &[u8]) -> Result<(), LockTableFull> {
        if self.table.len() >= self.limits.locks_max && !self.table.contains_key(name) {
            return Err(LockTableFull::Locks(self.limits.locks_max));
        }
        Ok(())
    }

    /// Records that `lease` holds `name` with `token` (a grant, or recovery).
    pub fn set_holder(&mut self, name: &[u8], lease: u64, token: u64) {
        let lock = self.table.entry(Box::from(name)).or_default();
        lock.holder = Some(Holder { lease, token });
        lock.last_token = lock.last_token.max(token);
        self.by_lease
            .entry(lease)
            .or_default()
            .insert(Box::from(name));
    }

    /// Records that `name` is free, having granted up to `token` (a release, or recovery).
    /// Its waiters stay in line for the caller to grant.
    pub fn clear_holder(&mut self, name: &[u8], token: u64) {
        let lock = self.table.entry(Box::from(name)).or_default();
        lock.last_token = lock.last_token.max(token);
        let released = lock.holder.take();
        if let Some(holder) = released {
            self.forget_if_unused(holder.lease, name);
        }
    }

    /// Puts a request in line for `name`; returns its waiter id.
    ///
    /// # Errors
    /// Too many requests wait.
    pub fn enqueue(
        &mut self,
        name: &[u8],
        lease: u64,
        deadline_ms: u64,
    ) -> Result<u64, LockTableFull> {
        if self.waiter_count >= self.limits.waiters_max {
            return Err(LockTableFull::Waiters(self.limits.waiters_max));
        }
        self.last_waiter += 1;
        let id = self.last_waiter;
        self.table
            .entry(Box::from(name))
            .or_default()
            .line
            .push_back(Waiter {
                id,
                lease,
                deadline_ms,
            });
        self.waiter_count += 1;
        self.by_lease
            .entry(lease)
            .or_default()
            .insert(Box::from(name));
        Ok(id)
    }

    /// Takes the first waiter of a free lock `name` whose lease `lives`; the ones before it
    /// (dead leases) are pushed onto `events`. Returns the waiter and its lease.
    pub fn next_waiter(
        &mut self,
        name: &[u8],
        lives: impl Fn(u64) -> bool,
        events: &mut Vec<LockEvent>,
    ) -> Option<(u64, u64)> {
        loop {
            let lock = self.table.get_mut(name)?;
            if lock.holder.is_some() {
                return None;
            }
            let waiter = lock.line.pop_front()?;
            self.waiter_count -= 1;
            if lives(waiter.lease) {
                return Some((waiter.id, waiter.lease));
            }
            events.push(LockEvent::LeaseEnded { waiter: waiter.id });
            self.forget_if_unused(waiter.lease, name);
        }
    }

    /// The locks `lease` holds or waits for, in name order.
    pub fn names_of(&self, lease: u64) -> impl Iterator<Item = &[u8]> + '_ {
        self.by_lease
            .get(&lease)
            .into_iter()
            .flatten()
            .map(|name| &**name)
    }

    /// Ends the waits past their deadline at `mono_ms`, pushing them onto `events` in the
    /// order they were queued.
    pub fn expire_waits(&mut self, mono_ms: u64, events: &mut Vec<LockEvent>) {
        if self.waiter_count == 0 {
            return;
        }
        let first = events.len();
        let mut emptied = Vec::new();
        for (name, lock) in &mut self.table {
            let holder_token = lock.holder.map_or(0, |holder| holder.token);
            let before = lock.line.len();
            lock.line.retain(|waiter| {
                let waits = waiter.deadline_ms > mono_ms;
                if !waits {
                    events.push(LockEvent::TimedOut {
                        waiter: waiter.id,
                        holder_token,
                    });
                    emptied.push((waiter.lease, name.clone()));
                }
                waits
            });
            self.waiter_count -= before - lock.line.len();
        }
        for (lease, name) in emptied {
            self.forget_if_unused(lease, &name);
        }
        // The table's order is a hash's; waiter ids are the order of arrival.
        events[first..].sort_by_key(|event| match event {
            LockEvent::Granted { waiter, .. }
            | LockEvent::TimedOut { waiter, .. }
            | LockEvent::LeaseEnded { waiter } => *waiter,
        });
    }

    /// The locks `lease` holds, and the waits it had (removed, onto `events`), when it ends.
    pub fn lease_ended(
        &mut self,
        lease: u64,
        events: &mut Vec<LockEvent>,
    ) -> Vec<(Box<[u8]>, u64)> {
        let names = self.by_lease.remove(&lease).unwrap_or_default();
        let mut held = Vec::new();
        for name in names {
            let Some(lock) = self.table.get_mut(&name) else {
                continue;
            };
            let before = lock.line.len();
            lock.line.retain(|waiter| {
                let ends = waiter.lease == lease;
                if ends {
                    events.push(LockEvent::LeaseEnded { waiter: waiter.id });
                }
                !ends
            });
            self.waiter_count -= before - lock.line.len();
            if let Some(holder) = lock.holder.filter(|holder| holder.lease == lease) {
                held.push((name, holder.token));
            }
        }
        held
    }

    /// Every lock with its holder and last token (a snapshot).
    pub fn entries(&self) -> impl Iterator<Item = (&[u8], Option<Holder>, u64)> + '_ {
        self.table
            .iter()
            .map(|(name, lock)| (&**name, lock.holder, lock.last_token))
    }

    /// Requests waiting.
    pub fn waiter_count(&self) -> usize {
        self.waiter_count
    }

    fn forget_if_unused(&mut self, lease: u64, name: &[u8]) {
        let Some(lock) = self.table.get(name) else {
            return;
        };
        let holds = lock.holder.is_some_and(|holder| holder.lease == lease);
        let waits = lock.line.iter().any(|waiter| waiter.lease == lease);
        if !holds && !waits {
            self.forget_lease_of(lease, name);
        }
    }

    fn forget_lease_of(&mut self, lease: u64, name: &[u8]) {
        if let Some(names) = self.by_lease.get_mut(&lease) {
            names.remove(name);
            if names.is_empty() {
                self.by_lease.remove(&lease);
            }
        }
    }

    /// Checks the invariants (tests).
    pub fn check_invariants(&self) {
        let waiting: usize = self.table.values().map(|lock| lock.line.len()).sum();
        assert_eq!(waiting, self.waiter_count, "waiter count");
        for (name, lock) in &self.table {
            assert!(
                lock.holder.is_some() || lock.line.is_empty(),
                "a free lock has waiters"
            );
            for lease in lock
                .holder
                .map(|holder| holder.lease)
                .into_iter()
                .chain(lock.line.iter().map(|waiter| waiter.lease))
            {
                assert!(
                    self.by_lease
                        .get(&lease)
                        .is_some_and(|names| names.contains(name)),
                    "lease {lease} is not indexed for its lock"
                );
            }
        }
    }
}
