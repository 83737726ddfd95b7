//! Key to slot routing, shared by client and server so that they can never disagree.
//!
//! `slot = crc32(hash_tag(key)) mod 16384`. A key containing `{tag}` (a non-empty run between
//! the first `{` and the first `}` after it) hashes only `tag`, as in Redis Cluster, so related
//! keys can be placed on one shard. CRC32 (IEEE, as computed by `crc32fast`) is fixed by this
//! protocol: it is unseeded and identical on every platform and version. Changing it would move
//! every key, so it may only change with a new protocol version.

/// Number of hash slots the key space is divided into.
pub const SLOT_COUNT: u16 = 16384;

/// A hash slot, `0..SLOT_COUNT`.
pub type Slot = u16;

/// The part of `key` that is hashed: the content of the first non-empty `{...}`, or the key.
#[must_use]
pub fn hash_tag(key: &[u8]) -> &[u8] {
    let Some(open) = key.iter().position(|&byte| byte == b'{') else {
        return key;
    };
    let rest = &key[open + 1..];
    match rest.iter().position(|&byte| byte == b'}') {
        Some(close) if close > 0 => &rest[..close],
        _ => key,
    }
}

/// The slot that owns `key`.
#[must_use]
pub fn slot_for_key(key: &[u8]) -> Slot {
    let slot = crc32fast::hash(hash_tag(key)) % u32::from(SLOT_COUNT);
    // The modulo keeps the value below 16384, so it always fits.
    #[allow(clippy::cast_possible_truncation, reason = "slot < 16384")]
    let slot = slot as Slot;
    slot
}

/// A contiguous range of slots, `[start, end)`.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize,
)]
#[rkyv(derive(Debug, Clone, Copy, PartialEq, Eq))]
pub struct SlotRange {
    /// First slot in the range.
    pub start: u16,
    /// One past the last slot in the range; at most [`SLOT_COUNT`].
    pub end: u16,
}

impl SlotRange {
    /// Whether `slot` falls in the range.
    #[must_use]
    pub fn contains(&self, slot: Slot) -> bool {
        self.start <= slot && slot < self.end
    }

    /// Number of slots in the range.
    #[must_use]
    pub fn len(&self) -> usize {
        usize::from(self.end.saturating_sub(self.start))
    }

    /// Whether the range holds no slot.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.end <= self.start
    }
}

impl std::fmt::Display for SlotRange {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(formatter, "{}..{}", self.start, self.end)
    }
}

/// Divides the slot space into `part_count` contiguous ranges of near-equal size, in order.
///
/// Part `i` gets `[i * 16384 / n, (i + 1) * 16384 / n)`. The split is a pure function of
/// `part_count`, so every node computes the same ranges from the same configuration.
///
/// Returns an empty vector when `part_count` is 0 or exceeds [`SLOT_COUNT`].
#[must_use]
pub fn split_slots(part_count: usize) -> Vec<SlotRange> {
    let slot_count = usize::from(SLOT_COUNT);
    if part_count == 0 || part_count > slot_count {
        return Vec::new();
    }
    let boundary = |index: usize| -> u16 {
        // index <= part_count <= 16384, so the boundary is at most 16384 and fits in u16.
        #[allow(clippy::cast_possible_truncation, reason = "boundary <= 16384")]
        let value = (index * slot_count / part_count) as u16;
        value
    };
    (0..part_count)
        .map(|index| SlotRange {
            start: boundary(index),
            end: boundary(index + 1),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_tag_follows_redis_rules() {
        assert_eq!(hash_tag(b"user:1000"), b"user:1000");
        assert_eq!(hash_tag(b"{user:1000}.following"), b"user:1000");
        assert_eq!(hash_tag(b"foo{bar}{zap}"), b"bar");
        assert_eq!(hash_tag(b"foo{}{bar}"), b"foo{}{bar}");
        assert_eq!(hash_tag(b"foo{{bar}}zap"), b"{bar");
        assert_eq!(hash_tag(b"foo{bar"), b"foo{bar");
        assert_eq!(hash_tag(b""), b"");
    }

    #[test]
    fn slots_are_stable_across_versions() {
        // These values are part of the protocol: if this test fails, every stored key moves.
        assert_eq!(crc32fast::hash(b"123456789"), 0xCBF4_3926);
        assert_eq!(slot_for_key(b"123456789"), (0xCBF4_3926_u32 % 16384) as u16);
        assert_eq!(slot_for_key(b""), 0);
        assert_eq!(slot_for_key(b"{user1}:a"), slot_for_key(b"{user1}:b"));
        assert_eq!(slot_for_key(b"{user1}:a"), slot_for_key(b"user1"));
    }

    #[test]
    fn split_covers_every_slot_once() {
        for part_count in [1, 2, 3, 7, 64, 1000, 16384] {
            let ranges = split_slots(part_count);
            assert_eq!(ranges.len(), part_count);
            assert_eq!(ranges[0].start, 0);
            assert_eq!(ranges[part_count - 1].end, SLOT_COUNT);
            for pair in ranges.windows(2) {
                assert_eq!(pair[0].end, pair[1].start, "part_count={part_count}");
            }
            assert!(ranges.iter().all(|range| !range.is_empty()));
        }
        assert!(split_slots(0).is_empty());
        assert!(split_slots(16385).is_empty());
    }

    #[test]
    fn two_cores_split_in_half() {
        assert_eq!(
            split_slots(2),
            vec![
                SlotRange {
                    start: 0,
                    end: 8192
                },
                SlotRange {
                    start: 8192,
                    end: 16384
                }
            ]
        );
    }
}
