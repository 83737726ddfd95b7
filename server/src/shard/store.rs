//! The shard's key/value map and its memory accounting.
//!
//! The store knows nothing of time, revisions or routing: it keeps entries and charges each
//! one against the shard's memory budget. The shard decides what to write.
//!
//! **Invariant:** `memory_bytes` equals the sum of [`entry_cost`] over all stored entries.

use ahash::AHashMap;

use super::timer_wheel::TimerId;

/// Estimated bytes one entry costs beyond its key and value: the map slot, the entry header,
/// two heap allocations and allocator slack. Deliberately generous so the budget is a ceiling
/// on real memory, not an optimistic guess.
pub const ENTRY_OVERHEAD_BYTES: u64 = 96;

/// Estimated bytes a pending TTL timer costs beyond its copy of the key.
pub const TIMER_OVERHEAD_BYTES: u64 = 48;

/// One stored key's data.
#[derive(Debug)]
pub struct StoredEntry {
    /// The value bytes.
    pub value: Box<[u8]>,
    /// The shard revision of the entry's last modification.
    pub version: u64,
    /// The absolute expiry and the timer that enforces it, if the key has a TTL.
    pub expiry: Option<Expiry>,
}

/// A key's deadline and the wheel timer scheduled for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expiry {
    /// Unix milliseconds at which the key stops existing.
    pub deadline_ms: u64,
    /// The timer that reclaims the key at `deadline_ms`.
    pub timer: TimerId,
}

impl StoredEntry {
    /// Whether the entry has expired at `now_ms`. An expired entry is never returned to a
    /// client, even before its timer reclaims it.
    pub fn is_expired(&self, now_ms: u64) -> bool {
        self.expiry
            .is_some_and(|expiry| expiry.deadline_ms <= now_ms)
    }

    /// The entry's absolute deadline, if any.
    pub fn deadline_ms(&self) -> Option<u64> {
        self.expiry.map(|expiry| expiry.deadline_ms)
    }
}

/// Bytes charged against the budget for an entry with this key and value.
pub fn entry_cost(key_size: usize, value_size: usize, has_expiry: bool) -> u64 {
    let timer_cost = if has_expiry {
        key_size as u64 + TIMER_OVERHEAD_BYTES
    } else {
        0
    };
    key_size as u64 + value_size as u64 + ENTRY_OVERHEAD_BYTES + timer_cost
}

fn stored_cost(key: &[u8], entry: &StoredEntry) -> u64 {
    entry_cost(key.len(), entry.value.len(), entry.expiry.is_some())
}

/// The map and its memory budget.
#[derive(Debug)]
pub struct Store {
    map: AHashMap<Box<[u8]>, StoredEntry>,
    memory_bytes: u64,
    memory_bytes_max: u64,
}

impl Store {
    /// An empty store that may hold up to `memory_bytes_max` bytes of entries.
    pub fn new(memory_bytes_max: u64) -> Self {
        Self {
            map: AHashMap::new(),
            memory_bytes: 0,
            memory_bytes_max,
        }
    }

    /// The entry for `key`, expired or not.
    pub fn get(&self, key: &[u8]) -> Option<&StoredEntry> {
        self.map.get(key)
    }

    /// The entry for `key`, for in-place changes that do not alter its cost.
    pub fn get_mut(&mut self, key: &[u8]) -> Option<&mut StoredEntry> {
        self.map.get_mut(key)
    }

    /// Whether `additional_bytes` more would still fit in the budget.
    pub fn has_room_for(&self, additional_bytes: u64) -> bool {
        self.memory_bytes.saturating_add(additional_bytes) <= self.memory_bytes_max
    }

    /// The cost of the entry stored under `key`, 0 if none.
    pub fn cost_of(&self, key: &[u8]) -> u64 {
        self.map.get(key).map_or(0, |entry| stored_cost(key, entry))
    }

    /// Stores `entry` under `key`, returning the entry it replaced. The caller has checked
    /// the budget; the accounting follows whatever was stored.
    pub fn insert(&mut self, key: &[u8], entry: StoredEntry) -> Option<StoredEntry> {
        self.memory_bytes += stored_cost(key, &entry);
        // Look up first so an overwrite reuses the stored key allocation.
        let previous = if let Some(slot) = self.map.get_mut(key) {
            Some(std::mem::replace(slot, entry))
        } else {
            self.map.insert(Box::from(key), entry);
            None
        };
        if let Some(previous) = &previous {
            self.release(stored_cost(key, previous));
        }
        previous
    }

    /// Removes and returns the entry under `key`.
    pub fn remove(&mut self, key: &[u8]) -> Option<StoredEntry> {
        let entry = self.map.remove(key)?;
        self.release(stored_cost(key, &entry));
        Some(entry)
    }

    /// Re-charges an entry whose expiry was added or removed in place.
    pub fn set_expiry(&mut self, key: &[u8], expiry: Option<Expiry>) -> Option<Expiry> {
        let entry = self.map.get_mut(key)?;
        let cost_before = stored_cost(key, entry);
        let previous = std::mem::replace(&mut entry.expiry, expiry);
        let cost_after = stored_cost(key, entry);
        self.memory_bytes += cost_after;
        self.release(cost_before);
        previous
    }

    fn release(&mut self, bytes: u64) {
        assert!(
            bytes <= self.memory_bytes,
            "memory accounting underflow: releasing={bytes} held={}",
            self.memory_bytes
        );
        self.memory_bytes -= bytes;
    }

    /// Number of stored entries, expired ones not yet reclaimed included.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether the store holds no entry.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Bytes currently charged.
    pub fn memory_bytes(&self) -> u64 {
        self.memory_bytes
    }

    /// The budget.
    pub fn memory_bytes_max(&self) -> u64 {
        self.memory_bytes_max
    }

    /// Recomputes the charge from scratch; for tests and debug assertions (O(n)).
    pub fn memory_bytes_recomputed(&self) -> u64 {
        self.map
            .iter()
            .map(|(key, entry)| stored_cost(key, entry))
            .sum()
    }
}
