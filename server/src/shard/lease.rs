//! Leases, sans-I/O: the leases this shard is home to, and which of its keys are attached to
//! which lease (homed here or on another core).
//!
//! A home lease lives until its deadline on a *monotonic* clock (`mono_ms`, never the wall
//! clock: a clock step must not end every lease at once), kept by a timing wheel of its own;
//! a keepalive moves the deadline to `now + ttl`. Deadlines are not journaled: a lease
//! recovered from the log starts a full TTL again, so a restart does not revoke every lease
//! whose owner could not reach the server while it was down.
//!
//! A shard may hold keys attached to a lease homed on another core. It learns that such a
//! lease lives by asking its home (`begin_check` / `end_check`, done by the core), and that it
//! ended when the home tells every core (`foreign_ended`). A check in flight when the end
//! arrives comes back dead, whatever the home answered: the end may have overtaken the
//! answer.
//!
//! **Invariants:** `attached` and `keys` describe the same pairs; every home lease has exactly
//! one pending timer, whose id it holds.

use std::collections::BTreeSet;

use ahash::AHashMap;
use tessera_protocol::LeaseId;

use super::timer_wheel::{TimerId, TimerWheel};

/// Bounds of a shard's lease tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseLimits {
    /// Leases homed on the shard.
    pub leases_max: usize,
    /// Keys of the shard attached to leases.
    pub attached_keys_max: usize,
}

impl Default for LeaseLimits {
    fn default() -> Self {
        Self {
            leases_max: 100_000,
            attached_keys_max: 1_000_000,
        }
    }
}

/// A lease homed on this shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HomeLease {
    /// Its time to live.
    pub ttl_ms: u64,
    /// When it ends unless kept alive, in monotonic milliseconds.
    pub deadline_ms: u64,
    timer: TimerId,
}

/// What the shard knows of a lease homed elsewhere.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Foreign {
    /// The home said it lives (and has not said it ended since).
    is_alive: bool,
    /// Checks with the home not yet answered.
    checks_in_flight: u32,
    /// The lease ended while a check was in flight.
    ended_during_check: bool,
}

/// A table is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseTableFull {
    /// `leases_max` leases are homed here.
    Leases(usize),
    /// `attached_keys_max` keys are attached.
    AttachedKeys(usize),
}

/// A shard's leases and attachments.
#[derive(Debug)]
pub struct Leases {
    limits: LeaseLimits,
    home: AHashMap<u64, HomeLease>,
    wheel: TimerWheel<u64>,
    /// The last sequence number granted (ids are never reused).
    last_sequence: u64,
    /// Key to lease, for every attached key of this shard.
    attached: AHashMap<Box<[u8]>, u64>,
    /// Lease to its keys on this shard, in key order.
    keys: AHashMap<u64, BTreeSet<Box<[u8]>>>,
    foreign: AHashMap<u64, Foreign>,
}

impl Leases {
    /// Empty tables whose monotonic clock starts at `mono_ms`.
    pub fn new(limits: LeaseLimits, mono_ms: u64) -> Self {
        Self {
            limits,
            home: AHashMap::new(),
            wheel: TimerWheel::new(mono_ms),
            last_sequence: 0,
            attached: AHashMap::new(),
            keys: AHashMap::new(),
            foreign: AHashMap::new(),
        }
    }

    /// The next lease id of this shard, or `None` if the node, core or sequence cannot be
    /// encoded in one.
    pub fn next_id(&self, node_id: u32, core_id: u16) -> Option<u64> {
        LeaseId::new(node_id, core_id, self.last_sequence + 1).map(|id| id.0)
    }

    /// Starts lease `id` (from [`Leases::next_id`] or the log) with `ttl_ms`, ending at
    /// `mono_ms + ttl_ms`.
    ///
    /// # Errors
    /// The table is full.
    pub fn grant(&mut self, id: u64, ttl_ms: u64, mono_ms: u64) -> Result<(), LeaseTableFull> {
        if self.home.len() >= self.limits.leases_max && !self.home.contains_key(&id) {
            return Err(LeaseTableFull::Leases(self.limits.leases_max));
        }
        self.last_sequence = self.last_sequence.max(LeaseId(id).sequence());
        let deadline_ms = mono_ms.saturating_add(ttl_ms);
        let timer = self.wheel.insert(deadline_ms, id);
        let lease = HomeLease {
            ttl_ms,
            deadline_ms,
            timer,
        };
        if let Some(replaced) = self.home.insert(id, lease) {
            self.wheel.cancel(replaced.timer);
        }
        Ok(())
    }

    /// The lease homed here, if it lives at `mono_ms`.
    pub fn home_lease(&self, id: u64, mono_ms: u64) -> Option<HomeLease> {
        self.home
            .get(&id)
            .copied()
            .filter(|lease| lease.deadline_ms > mono_ms)
    }

    /// Restarts a live home lease's TTL; returns it, or `None` if it does not live.
    pub fn keepalive(&mut self, id: u64, mono_ms: u64) -> Option<u64> {
        let lease = self
            .home
            .get_mut(&id)
            .filter(|lease| lease.deadline_ms > mono_ms)?;
        self.wheel.cancel(lease.timer);
        lease.deadline_ms = mono_ms.saturating_add(lease.ttl_ms);
        lease.timer = self.wheel.insert(lease.deadline_ms, id);
        Some(lease.ttl_ms)
    }

    /// Restarts every home lease's TTL at `mono_ms` (after recovery).
    pub fn restart_all(&mut self, mono_ms: u64) {
        for (id, lease) in &mut self.home {
            self.wheel.cancel(lease.timer);
            lease.deadline_ms = mono_ms.saturating_add(lease.ttl_ms);
            lease.timer = self.wheel.insert(lease.deadline_ms, *id);
        }
    }

    /// Ends a home lease (revoked, or expired); returns it if it was there.
    pub fn end_home(&mut self, id: u64) -> Option<HomeLease> {
        let lease = self.home.remove(&id)?;
        self.wheel.cancel(lease.timer);
        Some(lease)
    }

    /// Pushes onto `ended` up to `max` home leases whose deadline passed by `mono_ms`, and
    /// removes them from the table.
    pub fn take_expired(&mut self, mono_ms: u64, max: usize, ended: &mut Vec<u64>) {
        let mut fired = Vec::new();
        self.wheel.advance(mono_ms, max, &mut fired);
        for (timer, _, id) in fired {
            if self.home.get(&id).is_some_and(|lease| lease.timer == timer) {
                self.home.remove(&id);
                ended.push(id);
            }
        }
    }

    /// The ids of the home leases that live at `mono_ms`, ascending.
    pub fn home_ids(&self, mono_ms: u64) -> Vec<u64> {
        let mut ids: Vec<u64> = self
            .home
            .iter()
            .filter(|(_, lease)| lease.deadline_ms > mono_ms)
            .map(|(id, _)| *id)
            .collect();
        ids.sort_unstable();
        ids
    }

    /// Every home lease with its TTL (a snapshot).
    pub fn home_leases(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.home.iter().map(|(id, lease)| (*id, lease.ttl_ms))
    }

    /// The last sequence number granted.
    pub fn last_sequence(&self) -> u64 {
        self.last_sequence
    }

    /// Raises the last sequence granted to at least `sequence` (recovery).
    pub fn restore_sequence(&mut self, sequence: u64) {
        self.last_sequence = self.last_sequence.max(sequence);
    }

    /// Home leases held.
    pub fn home_count(&self) -> usize {
        self.home.len()
    }

    /// Whether a lease homed elsewhere is known to live.
    pub fn is_foreign_alive(&self, id: u64) -> bool {
        self.foreign
            .get(&id)
            .is_some_and(|foreign| foreign.is_alive)
    }

    /// Records that the shard is asking a lease's home whether it lives.
    pub fn begin_check(&mut self, id: u64) {
        self.foreign.entry(id).or_default().checks_in_flight += 1;
    }

    /// Records the home's answer; returns whether the lease may be used (it lives and did not
    /// end while the check was in flight).
    pub fn end_check(&mut self, id: u64, is_alive: bool) -> bool {
        let Some(foreign) = self.foreign.get_mut(&id) else {
            return false;
        };
        foreign.checks_in_flight = foreign.checks_in_flight.saturating_sub(1);
        let usable = is_alive && !foreign.ended_during_check;
        if usable {
            foreign.is_alive = true;
        }
        if foreign.checks_in_flight == 0 {
            foreign.ended_during_check = false;
            if !foreign.is_alive && !self.keys.contains_key(&id) {
                self.foreign.remove(&id);
            }
        }
        usable
    }

    /// Marks a lease homed elsewhere as alive without asking (recovery: its keys came back
    /// from the log attached to it).
    pub fn assume_foreign_alive(&mut self, id: u64) {
        self.foreign.entry(id).or_default().is_alive = true;
    }

    /// Records that a lease homed elsewhere ended.
    pub fn foreign_ended(&mut self, id: u64) {
        if let Some(foreign) = self.foreign.get_mut(&id) {
            foreign.is_alive = false;
            if foreign.checks_in_flight > 0 {
                foreign.ended_during_check = true;
            } else {
                self.foreign.remove(&id);
            }
        }
    }

    /// The lease `key` is attached to.
    pub fn lease_of(&self, key: &[u8]) -> Option<u64> {
        // Every write asks; most shards have no attached key, and then nothing is hashed.
        if self.attached.is_empty() {
            return None;
        }
        self.attached.get(key).copied()
    }

    /// Whether `key` can be attached (it is already, or the table has room).
    ///
    /// # Errors
    /// The table of attached keys is full.
    pub fn has_room_for_key(&self, key: &[u8]) -> Result<(), LeaseTableFull> {
        if self.attached.len() >= self.limits.attached_keys_max && !self.attached.contains_key(key)
        {
            return Err(LeaseTableFull::AttachedKeys(self.limits.attached_keys_max));
        }
        Ok(())
    }

    /// Attaches `key` to `lease`, detaching it from any other.
    pub fn attach(&mut self, key: &[u8], lease: u64) {
        if self.lease_of(key) == Some(lease) {
            return;
        }
        self.detach(key);
        self.attached.insert(Box::from(key), lease);
        self.keys.entry(lease).or_default().insert(Box::from(key));
    }

    /// Detaches `key` from its lease, if any.
    pub fn detach(&mut self, key: &[u8]) {
        if self.attached.is_empty() {
            return;
        }
        let Some(lease) = self.attached.remove(key) else {
            return;
        };
        if let Some(keys) = self.keys.get_mut(&lease) {
            keys.remove(key);
            if keys.is_empty() {
                self.keys.remove(&lease);
            }
        }
    }

    /// The keys of this shard attached to `lease`, in key order, at most `max` of them and
    /// `bytes_max` bytes, and whether there are more.
    pub fn keys_of(&self, lease: u64, max: usize, bytes_max: usize) -> (Vec<Vec<u8>>, bool) {
        let Some(keys) = self.keys.get(&lease) else {
            return (Vec::new(), false);
        };
        let mut listed = Vec::new();
        let mut bytes = 0;
        for key in keys {
            if listed.len() >= max || bytes + key.len() > bytes_max {
                return (listed, true);
            }
            bytes += key.len();
            listed.push(key.to_vec());
        }
        (listed, false)
    }

    /// Detaches and returns every key of this shard attached to `lease`.
    pub fn take_keys(&mut self, lease: u64) -> Vec<Box<[u8]>> {
        let keys = self.keys.remove(&lease).unwrap_or_default();
        for key in &keys {
            self.attached.remove(key);
        }
        keys.into_iter().collect()
    }

    /// Every attachment (a snapshot).
    pub fn attachments(&self) -> impl Iterator<Item = (&[u8], u64)> + '_ {
        self.attached.iter().map(|(key, lease)| (&**key, *lease))
    }

    /// Attached keys.
    pub fn attached_count(&self) -> usize {
        self.attached.len()
    }

    /// Checks the invariants (tests).
    pub fn check_invariants(&self) {
        let pairs: usize = self.keys.values().map(BTreeSet::len).sum();
        assert_eq!(pairs, self.attached.len(), "attachments disagree");
        for (key, lease) in &self.attached {
            assert!(
                self.keys.get(lease).is_some_and(|keys| keys.contains(key)),
                "key attached to {lease} is missing from its set"
            );
        }
        assert_eq!(
            self.wheel.len(),
            self.home.len(),
            "one timer per home lease"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leases() -> Leases {
        Leases::new(
            LeaseLimits {
                leases_max: 2,
                attached_keys_max: 3,
            },
            1_000,
        )
    }

    #[test]
    fn a_lease_lives_until_its_deadline_and_keepalive_moves_it() {
        let mut table = leases();
        let id = table.next_id(1, 2).expect("encodable");
        assert_eq!(LeaseId(id).node_id(), 1);
        assert_eq!(LeaseId(id).core_id(), 2);
        table.grant(id, 100, 1_000).expect("room");
        assert!(table.home_lease(id, 1_099).is_some());
        assert_eq!(table.keepalive(id, 1_050), Some(100));
        assert!(table.home_lease(id, 1_149).is_some());
        let mut ended = Vec::new();
        table.take_expired(1_149, 10, &mut ended);
        assert!(ended.is_empty());
        table.take_expired(1_150, 10, &mut ended);
        assert_eq!(ended, vec![id]);
        assert_eq!(table.keepalive(id, 1_151), None);
        table.check_invariants();
    }

    #[test]
    fn ids_are_never_reused_and_the_table_is_bounded() {
        let mut table = leases();
        let first = table.next_id(1, 0).expect("encodable");
        table.grant(first, 10, 1_000).expect("room");
        let second = table.next_id(1, 0).expect("encodable");
        assert!(second > first);
        table.grant(second, 10, 1_000).expect("room");
        let third = table.next_id(1, 0).expect("encodable");
        assert_eq!(
            table.grant(third, 10, 1_000),
            Err(LeaseTableFull::Leases(2))
        );
        table.end_home(first);
        table.end_home(second);
        assert!(table.next_id(1, 0).expect("encodable") > second);
        table.check_invariants();
    }

    #[test]
    fn a_key_has_one_lease_and_attachments_are_bounded() {
        let mut table = leases();
        table.attach(b"a", 7);
        table.attach(b"b", 7);
        table.attach(b"a", 8);
        assert_eq!(table.lease_of(b"a"), Some(8));
        assert_eq!(table.keys_of(7, 10, 100), (vec![b"b".to_vec()], false));
        table.attach(b"c", 8);
        assert_eq!(
            table.has_room_for_key(b"d"),
            Err(LeaseTableFull::AttachedKeys(3))
        );
        assert_eq!(table.has_room_for_key(b"a"), Ok(()));
        let mut taken = table.take_keys(8);
        taken.sort();
        assert_eq!(taken, vec![Box::from(&b"a"[..]), Box::from(&b"c"[..])]);
        assert_eq!(table.lease_of(b"a"), None);
        table.check_invariants();
    }

    #[test]
    fn an_end_that_overtakes_a_check_wins() {
        let mut table = leases();
        table.begin_check(42);
        table.foreign_ended(42);
        assert!(!table.end_check(42, true), "the end arrived first");
        assert!(!table.is_foreign_alive(42));
        table.begin_check(42);
        assert!(table.end_check(42, true));
        assert!(table.is_foreign_alive(42));
        table.foreign_ended(42);
        assert!(!table.is_foreign_alive(42));
    }
}
