//! The shard's key/value map and its memory accounting.
//!
//! The store knows nothing of time, revisions or routing: it keeps entries and charges each
//! one against the shard's memory budget. The shard decides what to write.
//!
//! Each entry is one heap allocation holding a small header, the key and the value, and the
//! hash table holds only a pointer to it. A lookup therefore touches the table's control bytes
//! and one allocation (where the key is compared and the value found next to it), and a stored
//! key costs its bytes, a 27-byte header (43 with a TTL), the allocator's rounding and one
//! 16-byte table slot. Measured with 16-byte keys and 32-byte values, this took the resident
//! memory per key from 220 to about 110 bytes; the ordered index and the create revision and
//! version in the header have since brought it to about 187 (`docs/benchmarks.md`). An overwrite with a value
//! of the same size is done in place, without allocating.
//!
//! Entry layout (little-endian):
//!
//! ```text
//! [0, 8)    mod_revision        u64
//! [8, 16)   create_revision     u64
//! [16, 24)  version             u64   writes since the key was created
//! [24, 26)  key size            u16   (KEY_SIZE_MAX fits)
//! [26]      flags               u8    bit 0: the entry has an expiry; bit 1: it has fields
//! [27, 35)  deadline_ms         u64   only with an expiry
//! [35, 43)  timer               u32 index, u32 generation; only with an expiry
//! then      fields size         u32   only with fields
//! then the key, then the fields blob (`fields`), then the value (to the end of the
//! allocation)
//! ```
//!
//! The map is split into [`PARTITION_COUNT`] hash tables by bits of the key's hash that the
//! tables themselves do not use. A snapshot copies one partition at a time between requests
//! (`durability::snapshot`), so the shard pauses for a 256th of its data per step and not for
//! all of it; growing a table also moves a 256th of the entries at a time.
//!
//! Beside the hash tables, the store keeps every key in an ordered index (a B-tree of key
//! copies, up to [`ORDER_INLINE_BYTES`] bytes held in the tree itself), which scans walk in
//! key order. Only a new key or a removed one touches it: an overwrite, the common write, does
//! not.
//!
//! **Invariants:** `memory_bytes` equals the sum of [`entry_cost`] over all stored entries;
//! the ordered index holds exactly the keys of the hash tables.

use std::collections::BTreeSet;
use std::ops::Bound;

use hashbrown::hash_table::{Entry as TableEntry, HashTable};
use smallvec::SmallVec;

use super::timer_wheel::TimerId;

/// Estimated bytes one entry costs beyond its key and value: the table slot and its share of
/// the table's spare capacity, the header, and the allocator's per-chunk overhead and
/// rounding. Deliberately generous so the budget is a ceiling on real memory.
pub const ENTRY_OVERHEAD_BYTES: u64 = 96;

/// Estimated bytes a TTL costs beyond its copy of the key: the larger header and the timer
/// wheel's node and key allocation.
pub const TIMER_OVERHEAD_BYTES: u64 = 64;

/// Bytes of a key the ordered index holds in its tree; a longer key is copied to the heap.
pub const ORDER_INLINE_BYTES: usize = 16;

/// Estimated bytes a key costs in the ordered index beyond a heap copy of a long key: its
/// slot in a B-tree node and the node's spare room and links.
pub const ORDER_OVERHEAD_BYTES: u64 = 56;

/// A key as the ordered index holds it.
type OrderKey = SmallVec<[u8; ORDER_INLINE_BYTES]>;

/// Hash tables the map is split into.
pub const PARTITION_COUNT: usize = 256;

/// Where the partition index is taken from in a key's hash: above the bits a table of fewer
/// than 2^40 slots uses for the slot, below the 7 top bits it keeps in its control bytes.
const PARTITION_SHIFT: u32 = 40;

const HEADER_SIZE: usize = 27;
const KEY_SIZE_AT: usize = 24;
const FLAGS_AT: usize = 26;
const EXPIRY_SIZE: usize = 16;
const FIELDS_SIZE_SIZE: usize = 4;
const FLAG_EXPIRY: u8 = 1;
const FLAG_FIELDS: u8 = 2;

/// Bytes an entry's fields blob adds to it: the blob and its size (none without fields).
pub fn fields_cost(fields_size: usize) -> usize {
    if fields_size == 0 {
        0
    } else {
        fields_size + FIELDS_SIZE_SIZE
    }
}

/// Where an entry's parts lie.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Layout {
    key_size: usize,
    fields_size: usize,
    has_expiry: bool,
}

impl Layout {
    fn data_start(self) -> usize {
        HEADER_SIZE
            + if self.has_expiry { EXPIRY_SIZE } else { 0 }
            + if self.fields_size > 0 {
                FIELDS_SIZE_SIZE
            } else {
                0
            }
    }

    fn fields_start(self) -> usize {
        self.data_start() + self.key_size
    }

    fn value_start(self) -> usize {
        self.fields_start() + self.fields_size
    }

    fn size(self, value_size: usize) -> usize {
        self.value_start() + value_size
    }
}

/// The revisions an entry carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyRevisions {
    /// The shard revision at which the key was created.
    pub create: u64,
    /// The shard revision of the key's last modification.
    pub modify: u64,
    /// Writes since the key was created (1 after the first).
    pub version: u64,
}

impl KeyRevisions {
    /// A key created at `revision`.
    pub fn created(revision: u64) -> Self {
        Self {
            create: revision,
            modify: revision,
            version: 1,
        }
    }

    /// The same key written again at `revision`.
    #[must_use]
    pub fn written(self, revision: u64) -> Self {
        Self {
            create: self.create,
            modify: revision,
            version: self.version.saturating_add(1),
        }
    }
}

/// A key's deadline and the wheel timer scheduled for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expiry {
    /// Unix milliseconds at which the key stops existing.
    pub deadline_ms: u64,
    /// The timer that reclaims the key at `deadline_ms`.
    pub timer: TimerId,
}

/// A stored entry, read in place.
#[derive(Debug, Clone, Copy)]
pub struct EntryRef<'a> {
    bytes: &'a [u8],
}

impl<'a> EntryRef<'a> {
    fn key_size(self) -> usize {
        usize::from(u16::from_le_bytes([
            self.bytes[KEY_SIZE_AT],
            self.bytes[KEY_SIZE_AT + 1],
        ]))
    }

    fn has_expiry(self) -> bool {
        self.bytes[FLAGS_AT] & FLAG_EXPIRY != 0
    }

    fn layout(self) -> Layout {
        let has_expiry = self.has_expiry();
        let fields_size = if self.bytes[FLAGS_AT] & FLAG_FIELDS == 0 {
            0
        } else {
            let at = HEADER_SIZE + if has_expiry { EXPIRY_SIZE } else { 0 };
            let mut size = [0; 4];
            size.copy_from_slice(&self.bytes[at..at + FIELDS_SIZE_SIZE]);
            u32::from_le_bytes(size) as usize
        };
        Layout {
            key_size: self.key_size(),
            fields_size,
            has_expiry,
        }
    }

    /// Where the key starts: after the header, the expiry and the fields size, whichever
    /// the flags say are there (read without the fields size itself: lookups compare keys
    /// of every entry they probe).
    fn data_start(self) -> usize {
        let flags = self.bytes[FLAGS_AT];
        HEADER_SIZE
            + if flags & FLAG_EXPIRY == 0 {
                0
            } else {
                EXPIRY_SIZE
            }
            + if flags & FLAG_FIELDS == 0 {
                0
            } else {
                FIELDS_SIZE_SIZE
            }
    }

    /// The key.
    pub fn key(self) -> &'a [u8] {
        let start = self.data_start();
        &self.bytes[start..start + self.key_size()]
    }

    /// The fields blob (`fields`); empty without fields.
    pub fn fields(self) -> &'a [u8] {
        let layout = self.layout();
        &self.bytes[layout.fields_start()..layout.value_start()]
    }

    /// The value.
    pub fn value(self) -> &'a [u8] {
        if self.bytes[FLAGS_AT] & FLAG_FIELDS == 0 {
            &self.bytes[self.data_start() + self.key_size()..]
        } else {
            &self.bytes[self.layout().value_start()..]
        }
    }

    /// The shard revision of the entry's last modification.
    pub fn mod_revision(self) -> u64 {
        read_u64(self.bytes, 0)
    }

    /// The entry's create and mod revisions and version.
    pub fn revisions(self) -> KeyRevisions {
        KeyRevisions {
            modify: read_u64(self.bytes, 0),
            create: read_u64(self.bytes, 8),
            version: read_u64(self.bytes, 16),
        }
    }

    /// The absolute expiry and the timer that enforces it, if the key has a TTL.
    pub fn expiry(self) -> Option<Expiry> {
        self.has_expiry().then(|| Expiry {
            deadline_ms: read_u64(self.bytes, HEADER_SIZE),
            timer: TimerId::from_raw(read_u64(self.bytes, HEADER_SIZE + 8)),
        })
    }

    /// The entry's absolute deadline, if any.
    pub fn deadline_ms(self) -> Option<u64> {
        self.expiry().map(|expiry| expiry.deadline_ms)
    }

    /// Whether the entry has expired at `now_ms`. An expired entry is never returned to a
    /// client, even before its timer reclaims it.
    pub fn is_expired(self, now_ms: u64) -> bool {
        self.expiry()
            .is_some_and(|expiry| expiry.deadline_ms <= now_ms)
    }

    /// Bytes this entry is charged against the budget.
    pub fn cost(self) -> u64 {
        let layout = self.layout();
        entry_cost(
            layout.key_size,
            self.value().len() + fields_cost(layout.fields_size),
            layout.has_expiry,
        )
    }
}

/// An entry taken out of the store.
#[derive(Debug)]
pub struct OwnedEntry(Box<[u8]>);

impl OwnedEntry {
    /// The entry, read in place.
    pub fn view(&self) -> EntryRef<'_> {
        EntryRef { bytes: &self.0 }
    }
}

/// Hints the CPU to load the cache line at `address`.
fn prefetch_read(address: *const u8) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        // SAFETY: a prefetch never faults and reads nothing the program can observe; SSE is
        // part of the x86_64 baseline.
        unsafe { _mm_prefetch(address.cast::<i8>(), _MM_HINT_T0) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = address;
}

fn read_u64(bytes: &[u8], offset: usize) -> u64 {
    let mut word = [0; 8];
    word.copy_from_slice(&bytes[offset..offset + 8]);
    u64::from_le_bytes(word)
}

/// What [`write_entry`] writes besides the header: each part given is copied in, each
/// `None` left as it is.
struct Parts<'a> {
    key: Option<&'a [u8]>,
    fields: Option<&'a [u8]>,
    value: Option<&'a [u8]>,
}

/// Writes an entry's header into `bytes`, which holds exactly the entry's size for
/// `layout`, and the parts that are given.
fn write_entry(
    bytes: &mut [u8],
    layout: Layout,
    parts: &Parts<'_>,
    revisions: KeyRevisions,
    expiry: Option<Expiry>,
) {
    // Keys are checked against KEY_SIZE_MAX (4 KiB) and fields against their limits
    // before they reach the store.
    let key_size_field = u16::try_from(layout.key_size).unwrap_or(u16::MAX);
    assert!(
        usize::from(key_size_field) == layout.key_size,
        "key of {} bytes does not fit the header",
        layout.key_size
    );
    assert!(
        layout.has_expiry == expiry.is_some() && bytes.len() >= layout.value_start(),
        "entry of {} bytes does not fit its layout {layout:?}",
        bytes.len()
    );
    bytes[0..8].copy_from_slice(&revisions.modify.to_le_bytes());
    bytes[8..16].copy_from_slice(&revisions.create.to_le_bytes());
    bytes[16..24].copy_from_slice(&revisions.version.to_le_bytes());
    bytes[KEY_SIZE_AT..KEY_SIZE_AT + 2].copy_from_slice(&key_size_field.to_le_bytes());
    let mut flags = 0;
    let mut at = HEADER_SIZE;
    if let Some(expiry) = expiry {
        flags |= FLAG_EXPIRY;
        bytes[at..at + 8].copy_from_slice(&expiry.deadline_ms.to_le_bytes());
        bytes[at + 8..at + 16].copy_from_slice(&expiry.timer.to_raw().to_le_bytes());
        at += EXPIRY_SIZE;
    }
    if layout.fields_size > 0 {
        flags |= FLAG_FIELDS;
        let size = u32::try_from(layout.fields_size).unwrap_or(u32::MAX);
        bytes[at..at + FIELDS_SIZE_SIZE].copy_from_slice(&size.to_le_bytes());
        at += FIELDS_SIZE_SIZE;
    }
    bytes[FLAGS_AT] = flags;
    debug_assert_eq!(at, layout.data_start());
    if let Some(key) = parts.key {
        bytes[layout.data_start()..layout.fields_start()].copy_from_slice(key);
    }
    if let Some(fields) = parts.fields {
        bytes[layout.fields_start()..layout.value_start()].copy_from_slice(fields);
    }
    if let Some(value) = parts.value {
        bytes[layout.value_start()..].copy_from_slice(value);
    }
}

fn new_entry(
    key: &[u8],
    fields: &[u8],
    value: &[u8],
    revisions: KeyRevisions,
    expiry: Option<Expiry>,
) -> Box<[u8]> {
    let layout = Layout {
        key_size: key.len(),
        fields_size: fields.len(),
        has_expiry: expiry.is_some(),
    };
    let mut bytes = vec![0; layout.size(value.len())].into_boxed_slice();
    let parts = Parts {
        key: Some(key),
        fields: Some(fields),
        value: Some(value),
    };
    write_entry(&mut bytes, layout, &parts, revisions, expiry);
    bytes
}

/// Bytes charged against the budget for an entry with this key and value.
pub fn entry_cost(key_size: usize, value_size: usize, has_expiry: bool) -> u64 {
    let timer_cost = if has_expiry {
        key_size as u64 + TIMER_OVERHEAD_BYTES
    } else {
        0
    };
    let order_cost = ORDER_OVERHEAD_BYTES
        + if key_size > ORDER_INLINE_BYTES {
            // The heap copy and the allocator's overhead for it.
            key_size as u64 + 16
        } else {
            0
        };
    key_size as u64 + value_size as u64 + ENTRY_OVERHEAD_BYTES + timer_cost + order_cost
}

/// The map and its memory budget.
pub struct Store {
    partitions: Box<[HashTable<Box<[u8]>>]>,
    /// Every key, in byte order.
    order: BTreeSet<OrderKey>,
    len: usize,
    hasher: ahash::RandomState,
    memory_bytes: u64,
    memory_bytes_max: u64,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Store")
            .field("len", &self.len)
            .field("memory_bytes", &self.memory_bytes)
            .field("memory_bytes_max", &self.memory_bytes_max)
            .finish_non_exhaustive()
    }
}

impl Store {
    /// An empty store that may hold up to `memory_bytes_max` bytes of entries.
    pub fn new(memory_bytes_max: u64) -> Self {
        Self {
            partitions: (0..PARTITION_COUNT).map(|_| HashTable::new()).collect(),
            order: BTreeSet::new(),
            len: 0,
            hasher: ahash::RandomState::new(),
            memory_bytes: 0,
            memory_bytes_max,
        }
    }

    fn hash(&self, key: &[u8]) -> u64 {
        self.hasher.hash_one(key)
    }

    #[allow(
        clippy::cast_possible_truncation,
        reason = "PARTITION_COUNT is 256: the cast keeps exactly the 8 bits wanted"
    )]
    fn partition_of(hash: u64) -> usize {
        usize::from((hash >> PARTITION_SHIFT) as u8)
    }

    fn table(&self, hash: u64) -> &HashTable<Box<[u8]>> {
        &self.partitions[Self::partition_of(hash)]
    }

    fn table_mut(&mut self, hash: u64) -> &mut HashTable<Box<[u8]>> {
        &mut self.partitions[Self::partition_of(hash)]
    }

    /// The entry for `key`, expired or not.
    pub fn get(&self, key: &[u8]) -> Option<EntryRef<'_>> {
        let hash = self.hash(key);
        self.table(hash)
            .find(hash, |bytes| EntryRef { bytes }.key() == key)
            .map(|bytes| EntryRef { bytes })
    }

    /// The entries of partition `partition` (`0..PARTITION_COUNT`), expired ones included,
    /// in no particular order. An index out of range has none.
    pub fn partition(&self, partition: usize) -> impl Iterator<Item = EntryRef<'_>> {
        self.partitions
            .get(partition)
            .into_iter()
            .flat_map(HashTable::iter)
            .map(|bytes| EntryRef { bytes })
    }

    /// The entries whose keys are in `[start, end)` (`end` `None`: to the last key), expired
    /// ones included, in key order.
    pub fn range<'a>(
        &'a self,
        start: &[u8],
        end: Option<&[u8]>,
    ) -> impl Iterator<Item = EntryRef<'a>> + 'a {
        // `BTreeSet::range` panics on a range that ends before it starts.
        let is_empty = end.is_some_and(|end| end <= start);
        let bounds = (
            Bound::Included(start),
            end.map_or(Bound::Unbounded, Bound::Excluded),
        );
        let keys = if is_empty {
            None
        } else {
            Some(self.order.range::<[u8], _>(bounds))
        };
        keys.into_iter()
            .flatten()
            .filter_map(move |key| self.get(key))
    }

    /// Starts loading the entries that may hold `key` into cache. Reading the table's slots
    /// may itself miss, but misses of several keys prefetched in a row overlap, and the entry
    /// behind each slot is requested without waiting for it.
    pub fn prefetch(&self, key: &[u8]) {
        let hash = self.hash(key);
        for bytes in self.table(hash).iter_hash(hash) {
            prefetch_read(bytes.as_ptr());
        }
    }

    /// Whether `additional_bytes` more would still fit in the budget.
    pub fn has_room_for(&self, additional_bytes: u64) -> bool {
        self.memory_bytes.saturating_add(additional_bytes) <= self.memory_bytes_max
    }

    /// The cost of the entry stored under `key`, 0 if none.
    pub fn cost_of(&self, key: &[u8]) -> u64 {
        self.get(key).map_or(0, EntryRef::cost)
    }

    /// Stores `value` and the fields blob `fields` under `key` with `revisions`, replacing
    /// any entry. The caller has checked the budget; the accounting follows whatever was
    /// stored. An entry of the same layout and size is overwritten in place.
    pub fn insert(
        &mut self,
        key: &[u8],
        fields: &[u8],
        value: &[u8],
        revisions: KeyRevisions,
        expiry: Option<Expiry>,
    ) {
        self.insert_with(key, fields, value, revisions, expiry, |_| {});
    }

    /// [`Store::insert`], showing the entry it replaces (if any) to `replaced` first, in the
    /// same lookup.
    pub fn insert_with(
        &mut self,
        key: &[u8],
        fields: &[u8],
        value: &[u8],
        revisions: KeyRevisions,
        expiry: Option<Expiry>,
        replaced: impl FnOnce(EntryRef<'_>),
    ) {
        let hash = self.hash(key);
        let layout = Layout {
            key_size: key.len(),
            fields_size: fields.len(),
            has_expiry: expiry.is_some(),
        };
        let size = layout.size(value.len());
        let cost = entry_cost(
            key.len(),
            value.len() + fields_cost(fields.len()),
            expiry.is_some(),
        );
        let hasher = &self.hasher;
        #[allow(clippy::borrowed_box, reason = "the table's element type is Box<[u8]>")]
        let rehash = |bytes: &Box<[u8]>| hasher.hash_one(EntryRef { bytes }.key());
        let table = &mut self.partitions[Self::partition_of(hash)];
        let released = match table.entry(hash, |bytes| EntryRef { bytes }.key() == key, rehash) {
            TableEntry::Occupied(mut occupied) => {
                let stored = occupied.get_mut();
                let before = EntryRef { bytes: stored };
                let released = before.cost();
                replaced(before);
                // Same size and the same layout (expiry, fields size): the key is already in
                // place; rewrite header, fields and value. Same size alone is not enough: a
                // TTL dropped and a value 16 bytes longer would shift the key.
                if stored.len() == size && before.layout() == layout {
                    let parts = Parts {
                        key: None,
                        fields: Some(fields),
                        value: Some(value),
                    };
                    write_entry(stored, layout, &parts, revisions, expiry);
                } else {
                    *stored = new_entry(key, fields, value, revisions, expiry);
                }
                released
            }
            TableEntry::Vacant(vacant) => {
                vacant.insert(new_entry(key, fields, value, revisions, expiry));
                self.order.insert(OrderKey::from_slice(key));
                self.len += 1;
                0
            }
        };
        self.memory_bytes += cost;
        self.release(released);
    }

    /// Removes and returns the entry under `key`.
    pub fn remove(&mut self, key: &[u8]) -> Option<OwnedEntry> {
        let hash = self.hash(key);
        let occupied = self
            .table_mut(hash)
            .find_entry(hash, |bytes| EntryRef { bytes }.key() == key)
            .ok()?;
        let (bytes, _) = occupied.remove();
        self.order.remove(key);
        self.len -= 1;
        let entry = OwnedEntry(bytes);
        self.release(entry.view().cost());
        Some(entry)
    }

    /// Sets the revisions and expiry of the entry under `key`, keeping its value and fields. Re-charges
    /// the entry when the expiry was added or removed. Returns whether the key was found.
    pub fn update(&mut self, key: &[u8], revisions: KeyRevisions, expiry: Option<Expiry>) -> bool {
        let hash = self.hash(key);
        let Some(stored) = self
            .table_mut(hash)
            .find_mut(hash, |bytes| EntryRef { bytes }.key() == key)
        else {
            return false;
        };
        let before = EntryRef { bytes: stored };
        let cost_before = before.cost();
        let layout = before.layout();
        if layout.has_expiry == expiry.is_some() {
            // The header keeps its size: the key, fields and value stay where they are.
            let parts = Parts {
                key: None,
                fields: None,
                value: None,
            };
            write_entry(stored, layout, &parts, revisions, expiry);
        } else {
            let fields = before.fields().to_vec();
            let value = before.value().to_vec();
            *stored = new_entry(key, &fields, &value, revisions, expiry);
        }
        let cost_after = EntryRef { bytes: stored }.cost();
        self.memory_bytes += cost_after;
        self.release(cost_before);
        true
    }

    /// Points the entry under `key` (which has an expiry) at a new timer, in place.
    pub fn set_timer(&mut self, key: &[u8], timer: TimerId) {
        let hash = self.hash(key);
        let stored = self
            .table_mut(hash)
            .find_mut(hash, |bytes| EntryRef { bytes }.key() == key);
        if let Some(stored) = stored {
            assert!(
                EntryRef { bytes: stored }.has_expiry(),
                "set_timer on an entry without expiry"
            );
            stored[HEADER_SIZE + 8..HEADER_SIZE + 16]
                .copy_from_slice(&timer.to_raw().to_le_bytes());
        }
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
        self.len
    }

    /// Whether the store holds no entry.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes currently charged.
    pub fn memory_bytes(&self) -> u64 {
        self.memory_bytes
    }

    /// The budget.
    pub fn memory_bytes_max(&self) -> u64 {
        self.memory_bytes_max
    }

    /// Checks that the ordered index holds exactly the stored keys; for tests (O(n)).
    pub fn check_order(&self) {
        assert_eq!(
            self.order.len(),
            self.len,
            "ordered index and tables differ in size"
        );
        for key in &self.order {
            assert!(
                self.get(key).is_some(),
                "ordered index holds a removed key {key:?}"
            );
        }
    }

    /// Recomputes the charge from scratch; for tests and debug assertions (O(n)).
    pub fn memory_bytes_recomputed(&self) -> u64 {
        (0..PARTITION_COUNT)
            .flat_map(|partition| self.partition(partition))
            .map(EntryRef::cost)
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Revisions of a key created at revision 1 and last written at `modify`.
    fn rev(modify: u64) -> KeyRevisions {
        KeyRevisions {
            create: 1,
            modify,
            version: modify,
        }
    }

    fn expiry(deadline_ms: u64) -> Expiry {
        Expiry {
            deadline_ms,
            timer: TimerId::from_raw(0x0000_0007_0000_0003),
        }
    }

    #[test]
    fn entries_read_back_what_was_written() {
        let mut store = Store::new(1 << 20);
        store.insert(b"plain", b"", b"value", rev(3), None);
        store.insert(b"timed", b"", b"", rev(4), Some(expiry(99)));
        let plain = store.get(b"plain").unwrap();
        assert_eq!(plain.key(), b"plain");
        assert_eq!(plain.value(), b"value");
        assert_eq!(plain.mod_revision(), 3);
        assert_eq!(plain.revisions(), rev(3));
        assert_eq!(plain.expiry(), None);
        let timed = store.get(b"timed").unwrap();
        assert_eq!(timed.value(), b"");
        assert_eq!(timed.expiry(), Some(expiry(99)));
        assert!(timed.is_expired(99));
        assert!(!timed.is_expired(98));
        assert!(store.get(b"missing").is_none());
        assert_eq!(store.memory_bytes(), store.memory_bytes_recomputed());
    }

    #[test]
    fn overwrites_updates_and_removes_keep_the_accounting() {
        let mut store = Store::new(1 << 20);
        store.insert(b"k", b"", b"aaaa", rev(1), None);
        // Same size: in place.
        store.insert(b"k", b"", b"bbbb", rev(2), None);
        assert_eq!(store.get(b"k").unwrap().value(), b"bbbb");
        // The same total size with another layout: an expiry dropped, 16 more value bytes.
        store.insert(b"t", b"", b"v", rev(1), Some(expiry(5)));
        store.insert(b"t", b"", &[b'w'; 17], rev(2), None);
        let replaced = store.get(b"t").unwrap();
        assert_eq!(replaced.value(), [b'w'; 17]);
        assert_eq!(replaced.expiry(), None);
        store.remove(b"t");
        // Another size, then an expiry added and removed.
        store.insert(b"k", b"", b"cc", rev(3), None);
        assert!(store.update(b"k", rev(4), Some(expiry(10))));
        assert_eq!(store.get(b"k").unwrap().value(), b"cc");
        assert_eq!(store.get(b"k").unwrap().mod_revision(), 4);
        assert_eq!(store.memory_bytes(), store.memory_bytes_recomputed());
        let timer = TimerId::from_raw(42);
        store.set_timer(b"k", timer);
        assert_eq!(store.get(b"k").unwrap().expiry().unwrap().timer, timer);
        assert!(store.update(b"k", rev(5), None));
        assert_eq!(store.get(b"k").unwrap().expiry(), None);
        assert_eq!(store.memory_bytes(), store.memory_bytes_recomputed());
        assert!(!store.update(b"missing", rev(1), None));
        let removed = store.remove(b"k").unwrap();
        assert_eq!(removed.view().value(), b"cc");
        assert_eq!(store.memory_bytes(), 0);
        assert!(store.is_empty());
    }

    #[test]
    fn fields_sit_between_key_and_value_in_every_layout() {
        let mut store = Store::new(1 << 20);
        store.insert(b"f", b"FIELDS", b"value", rev(1), None);
        let entry = store.get(b"f").unwrap();
        assert_eq!(
            (entry.key(), entry.fields(), entry.value()),
            (&b"f"[..], &b"FIELDS"[..], &b"value"[..])
        );
        // Same size and layout: in place.
        store.insert(b"f", b"fields", b"VALUE", rev(2), None);
        assert_eq!(store.get(b"f").unwrap().fields(), b"fields");
        // The same total size, fields moved into the value: another layout.
        store.insert(b"f", b"", b"0123456789ab", rev(3), Some(expiry(7)));
        let entry = store.get(b"f").unwrap();
        assert_eq!(
            (entry.fields(), entry.value()),
            (&b""[..], &b"0123456789ab"[..])
        );
        store.insert(b"f", b"xy", b"v", rev(4), Some(expiry(7)));
        // A TTL added or dropped keeps the fields and value.
        assert!(store.update(b"f", rev(5), None));
        let entry = store.get(b"f").unwrap();
        assert_eq!(
            (entry.fields(), entry.value(), entry.expiry()),
            (&b"xy"[..], &b"v"[..], None)
        );
        assert!(store.update(b"f", rev(6), Some(expiry(9))));
        let entry = store.get(b"f").unwrap();
        assert_eq!(
            (entry.key(), entry.fields(), entry.value()),
            (&b"f"[..], &b"xy"[..], &b"v"[..])
        );
        assert_eq!(store.memory_bytes(), store.memory_bytes_recomputed());
        assert_eq!(
            store.get(b"f").unwrap().cost(),
            entry_cost(1, 1 + fields_cost(2), true)
        );
    }

    #[test]
    fn many_keys_survive_growth() {
        let mut store = Store::new(u64::MAX);
        for index in 0..10_000_u32 {
            store.insert(
                &index.to_le_bytes(),
                b"",
                &index.to_be_bytes(),
                KeyRevisions::created(u64::from(index)),
                None,
            );
        }
        for index in 0..10_000_u32 {
            let entry = store.get(&index.to_le_bytes()).unwrap();
            assert_eq!(entry.value(), index.to_be_bytes());
        }
        assert_eq!(store.len(), 10_000);
        assert_eq!(store.memory_bytes(), store.memory_bytes_recomputed());
        // Every entry is in exactly one partition, and the partitions share them out.
        let sizes: Vec<usize> = (0..PARTITION_COUNT)
            .map(|partition| store.partition(partition).count())
            .collect();
        assert_eq!(sizes.iter().sum::<usize>(), 10_000);
        assert!(sizes.iter().all(|&size| size > 0), "{sizes:?}");
        assert_eq!(store.partition(PARTITION_COUNT).count(), 0);
    }
}
