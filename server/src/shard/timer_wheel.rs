//! A hierarchical timing wheel: the shard's TTL (and later lease) deadlines.
//!
//! The wheel never reads a clock. Time enters through [`TimerWheel::advance`], which moves the
//! wheel's notion of "now" (`elapsed_ms`) forward and returns the timers that came due.
//!
//! # Structure
//! Eleven levels of 64 slots. A slot at level `l` spans `64^l` milliseconds, so level 0 has
//! one-millisecond slots and the eleven levels together cover every `u64` deadline
//! (6 bits × 11 levels ≥ 64 bits): no deadline is ever clamped or fires early. A timer goes
//! on the level of the highest bit in which its deadline differs from `elapsed_ms`, in the
//! slot named by its deadline's digit at that level. When a higher-level slot comes due its
//! timers are re-inserted below, each moving down at most once per level.
//!
//! Timers live in a slab; each slot is an intrusive doubly-linked list through it (indices,
//! not pointers), so insert and cancel are O(1) and memory is bounded by the live timers. A
//! [`TimerId`] carries the slab index and a generation, so a stale id (fired or cancelled) is
//! recognised instead of touching a reused node. One 64-bit occupancy mask per level lets
//! `advance` jump straight to the next occupied slot: an idle gap of hours or years costs
//! O(levels), never O(milliseconds).
//!
//! # Invariants
//! - Every pending timer is in exactly one list: the due list (deadline `<= elapsed_ms`) or the
//!   slot `slot_of(deadline, level_for(elapsed_ms, deadline))` as computed when it was (re)placed.
//! - A level's occupancy bit is set if and only if that slot's list is non-empty.
//! - Every timer on level `l` has a deadline above `elapsed_ms` that agrees with `elapsed_ms`
//!   in all bits above the level's digit, so its slot is at or after the level's current slot.

/// Bits of the deadline each level resolves.
const SLOT_BITS: u32 = 6;
/// Slots per level.
const SLOT_COUNT: usize = 1 << SLOT_BITS;
/// Levels; together they cover all 64 bits of a deadline.
const LEVEL_COUNT: usize = 11;
/// List index of the due list, after the wheel's slots.
const DUE_LIST: usize = LEVEL_COUNT * SLOT_COUNT;
/// Number of list heads.
const LIST_COUNT: usize = DUE_LIST + 1;
/// "No node" in links and heads.
const NONE: u32 = u32::MAX;
/// The `list` of a node on the free list.
const FREE_LIST: u16 = u16::MAX;

const _: () = assert!(SLOT_BITS as usize * LEVEL_COUNT >= 64);
const _: () = assert!(LIST_COUNT < FREE_LIST as usize);

/// Handle to a scheduled timer. Stale handles (fired or cancelled) are detected by generation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TimerId {
    index: u32,
    generation: u32,
}

impl TimerId {
    /// The id as one integer, for storing it compactly (index in the low half).
    pub fn to_raw(self) -> u64 {
        u64::from(self.generation) << 32 | u64::from(self.index)
    }

    /// The id [`TimerId::to_raw`] encoded.
    pub fn from_raw(raw: u64) -> Self {
        Self {
            // Each half is 32 bits by construction.
            #[allow(clippy::cast_possible_truncation, reason = "the low 32 bits")]
            index: raw as u32,
            generation: u32::try_from(raw >> 32).unwrap_or(u32::MAX),
        }
    }
}

#[derive(Debug)]
struct Node<T> {
    /// `Some` while the timer is pending; `None` on the free list.
    value: Option<T>,
    deadline_ms: u64,
    generation: u32,
    previous: u32,
    next: u32,
    /// Which list holds the node: a slot (`level * 64 + slot`), the due list, or free.
    list: u16,
}

/// A hierarchical timing wheel holding values of type `T` until their deadline.
#[derive(Debug)]
pub struct TimerWheel<T> {
    nodes: Vec<Node<T>>,
    free_head: u32,
    heads: Box<[u32; LIST_COUNT]>,
    occupied: [u64; LEVEL_COUNT],
    elapsed_ms: u64,
    pending_count: usize,
}

/// The level a deadline belongs on, relative to `elapsed_ms` (requires `deadline > elapsed`).
fn level_for(elapsed_ms: u64, deadline_ms: u64) -> usize {
    let masked = (elapsed_ms ^ deadline_ms) | (SLOT_COUNT as u64 - 1);
    let significant_bit = masked.ilog2();
    (significant_bit / SLOT_BITS) as usize
}

/// The slot of `deadline_ms` on `level`.
fn slot_of(deadline_ms: u64, level: usize) -> usize {
    let shift = SLOT_BITS as usize * level;
    // Shifts of 64 or more cannot occur: level < 11 gives shift <= 60.
    let digit = (deadline_ms >> shift) & (SLOT_COUNT as u64 - 1);
    #[allow(clippy::cast_possible_truncation, reason = "digit < 64")]
    let slot = digit as usize;
    slot
}

impl<T> TimerWheel<T> {
    /// An empty wheel whose time starts at `now_ms`; nothing is ever due before it.
    pub fn new(now_ms: u64) -> Self {
        Self {
            nodes: Vec::new(),
            free_head: NONE,
            heads: Box::new([NONE; LIST_COUNT]),
            occupied: [0; LEVEL_COUNT],
            elapsed_ms: now_ms,
            pending_count: 0,
        }
    }

    /// Schedules `value` at absolute `deadline_ms`. A deadline at or before the wheel's time
    /// is due on the next [`TimerWheel::advance`].
    pub fn insert(&mut self, deadline_ms: u64, value: T) -> TimerId {
        let index = if self.free_head == NONE {
            let index = u32::try_from(self.nodes.len()).unwrap_or(NONE);
            assert!(
                index != NONE,
                "timer wheel is full: {} timers",
                self.nodes.len()
            );
            self.nodes.push(Node {
                value: None,
                deadline_ms,
                generation: 0,
                previous: NONE,
                next: NONE,
                list: FREE_LIST,
            });
            index
        } else {
            let index = self.free_head;
            self.free_head = self.nodes[index as usize].next;
            index
        };
        let node = &mut self.nodes[index as usize];
        assert!(
            node.value.is_none(),
            "reused timer node {index} still holds a value"
        );
        node.value = Some(value);
        node.deadline_ms = deadline_ms;
        let generation = node.generation;
        self.place(index);
        self.pending_count += 1;
        TimerId { index, generation }
    }

    /// Cancels a pending timer in O(1) and returns its value; `None` for a stale id.
    pub fn cancel(&mut self, id: TimerId) -> Option<T> {
        let node = self.nodes.get(id.index as usize)?;
        if node.generation != id.generation || node.value.is_none() {
            return None;
        }
        self.unlink(id.index);
        self.release(id.index)
    }

    /// The deadline of a pending timer; `None` for a stale id.
    pub fn deadline_ms(&self, id: TimerId) -> Option<u64> {
        let node = self.nodes.get(id.index as usize)?;
        (node.generation == id.generation && node.value.is_some()).then_some(node.deadline_ms)
    }

    /// Pending timers.
    pub fn len(&self) -> usize {
        self.pending_count
    }

    /// Whether no timer is pending.
    pub fn is_empty(&self) -> bool {
        self.pending_count == 0
    }

    /// Moves the wheel's time forward to `now_ms` (never backwards) and pushes onto `expired`
    /// up to `expired_max` timers whose deadline is at or before `now_ms`, as
    /// `(id, deadline_ms, value)`. Returns how many it pushed. Timers left over because the
    /// budget ran out are returned by later calls; none with a later deadline ever is.
    pub fn advance(
        &mut self,
        now_ms: u64,
        expired_max: usize,
        expired: &mut Vec<(TimerId, u64, T)>,
    ) -> usize {
        let mut pushed_count = 0;
        loop {
            while pushed_count < expired_max {
                let index = self.heads[DUE_LIST];
                if index == NONE {
                    break;
                }
                let deadline_ms = self.nodes[index as usize].deadline_ms;
                assert!(
                    deadline_ms <= self.elapsed_ms,
                    "due timer {index} deadline_ms={deadline_ms} elapsed_ms={}",
                    self.elapsed_ms
                );
                let generation = self.nodes[index as usize].generation;
                self.unlink(index);
                // Only pending nodes are ever linked, so a listed node always holds a value.
                if let Some(value) = self.release(index) {
                    expired.push((TimerId { index, generation }, deadline_ms, value));
                    pushed_count += 1;
                }
            }
            if pushed_count >= expired_max {
                return pushed_count;
            }
            match self.next_slot() {
                Some((level, slot, slot_start_ms)) if slot_start_ms <= now_ms => {
                    assert!(
                        slot_start_ms >= self.elapsed_ms,
                        "slot start {slot_start_ms} before elapsed {}",
                        self.elapsed_ms
                    );
                    self.elapsed_ms = slot_start_ms;
                    self.cascade(level, slot);
                }
                _ => {
                    // Nothing comes due before now_ms, so every timer still agrees with now_ms
                    // above its level's digit and the slot invariant holds for the new time.
                    self.elapsed_ms = self.elapsed_ms.max(now_ms);
                    return pushed_count;
                }
            }
        }
    }

    /// The earliest occupied slot across levels: `(level, slot, start time of the slot)`.
    fn next_slot(&self) -> Option<(usize, usize, u64)> {
        let mut earliest: Option<(usize, usize, u64)> = None;
        for (level, &occupied) in self.occupied.iter().enumerate() {
            if occupied == 0 {
                continue;
            }
            let current_slot = slot_of(self.elapsed_ms, level);
            let ahead = occupied & (u64::MAX << current_slot);
            assert!(
                ahead != 0,
                "level {level} has timers only behind its current slot {current_slot}: \
                 occupied={occupied:#x} elapsed_ms={}",
                self.elapsed_ms
            );
            let slot = ahead.trailing_zeros() as usize;
            let level_shift = SLOT_BITS as usize * level;
            let range_bits = level_shift + SLOT_BITS as usize;
            let range_start_ms = if range_bits >= 64 {
                0
            } else {
                self.elapsed_ms & !((1_u64 << range_bits) - 1)
            };
            let slot_start_ms = range_start_ms + ((slot as u64) << level_shift);
            if earliest.is_none_or(|(_, _, start_ms)| slot_start_ms < start_ms) {
                earliest = Some((level, slot, slot_start_ms));
            }
        }
        earliest
    }

    /// Empties one slot, re-placing each of its timers relative to the current time: due ones
    /// go to the due list, the rest to a lower level.
    fn cascade(&mut self, level: usize, slot: usize) {
        let list = level * SLOT_COUNT + slot;
        let mut index = self.heads[list];
        self.heads[list] = NONE;
        self.occupied[level] &= !(1 << slot);
        while index != NONE {
            let next = self.nodes[index as usize].next;
            self.place(index);
            index = next;
        }
    }

    /// Links a node into the list its deadline belongs to, at the head.
    fn place(&mut self, index: u32) {
        let deadline_ms = self.nodes[index as usize].deadline_ms;
        let list = if deadline_ms <= self.elapsed_ms {
            DUE_LIST
        } else {
            let level = level_for(self.elapsed_ms, deadline_ms);
            let slot = slot_of(deadline_ms, level);
            self.occupied[level] |= 1 << slot;
            level * SLOT_COUNT + slot
        };
        let head = self.heads[list];
        if head != NONE {
            self.nodes[head as usize].previous = index;
        }
        let node = &mut self.nodes[index as usize];
        node.previous = NONE;
        node.next = head;
        node.list = u16::try_from(list).unwrap_or(FREE_LIST);
        self.heads[list] = index;
    }

    /// Removes a node from its list, clearing the slot's occupancy bit if it empties.
    fn unlink(&mut self, index: u32) {
        let (previous, next, list) = {
            let node = &self.nodes[index as usize];
            (node.previous, node.next, usize::from(node.list))
        };
        assert!(
            list < LIST_COUNT,
            "unlinking timer {index} that is in no list"
        );
        if previous == NONE {
            self.heads[list] = next;
        } else {
            self.nodes[previous as usize].next = next;
        }
        if next != NONE {
            self.nodes[next as usize].previous = previous;
        }
        if list != DUE_LIST && self.heads[list] == NONE {
            self.occupied[list / SLOT_COUNT] &= !(1 << (list % SLOT_COUNT));
        }
    }

    /// Returns an unlinked node to the free list and hands back its value.
    fn release(&mut self, index: u32) -> Option<T> {
        let node = &mut self.nodes[index as usize];
        let value = node.value.take();
        assert!(value.is_some(), "timer node {index} released twice");
        node.generation = node.generation.wrapping_add(1);
        node.list = FREE_LIST;
        node.previous = NONE;
        node.next = self.free_head;
        self.free_head = index;
        self.pending_count -= 1;
        value
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;

    fn fire(wheel: &mut TimerWheel<u32>, now_ms: u64) -> Vec<(u64, u32)> {
        let mut expired = Vec::new();
        wheel.advance(now_ms, usize::MAX, &mut expired);
        let mut fired: Vec<(u64, u32)> = expired
            .into_iter()
            .map(|(_, deadline_ms, value)| (deadline_ms, value))
            .collect();
        fired.sort_unstable();
        fired
    }

    #[test]
    fn fires_at_the_deadline_and_not_before() {
        let mut wheel = TimerWheel::new(1_000);
        wheel.insert(1_100, 1);
        wheel.insert(1_000 + 64 * 64 + 3, 2);
        assert!(fire(&mut wheel, 1_099).is_empty());
        assert_eq!(fire(&mut wheel, 1_100), vec![(1_100, 1)]);
        assert!(fire(&mut wheel, 1_000 + 64 * 64 + 2).is_empty());
        assert_eq!(
            fire(&mut wheel, 1_000 + 64 * 64 + 3),
            vec![(1_000 + 64 * 64 + 3, 2)]
        );
        assert!(wheel.is_empty());
    }

    #[test]
    fn cancelled_and_fired_ids_are_stale() {
        let mut wheel = TimerWheel::new(0);
        let first = wheel.insert(10, 1);
        let second = wheel.insert(20, 2);
        assert_eq!(wheel.deadline_ms(first), Some(10));
        assert_eq!(wheel.cancel(first), Some(1));
        assert_eq!(wheel.cancel(first), None);
        assert_eq!(wheel.deadline_ms(first), None);
        // The freed node is reused, but the old id does not reach the new timer.
        let third = wheel.insert(30, 3);
        assert_eq!(wheel.cancel(first), None);
        assert_eq!(fire(&mut wheel, 25), vec![(20, 2)]);
        assert_eq!(wheel.cancel(second), None);
        assert_eq!(wheel.len(), 1);
        assert_eq!(wheel.cancel(third), Some(3));
        assert!(wheel.is_empty());
    }

    #[test]
    fn past_deadlines_are_due_on_the_next_advance() {
        let mut wheel = TimerWheel::new(500);
        wheel.insert(100, 1);
        wheel.insert(500, 2);
        assert_eq!(fire(&mut wheel, 500), vec![(100, 1), (500, 2)]);
    }

    #[test]
    fn time_never_goes_backwards() {
        let mut wheel = TimerWheel::new(1_000);
        wheel.insert(1_050, 1);
        assert!(fire(&mut wheel, 900).is_empty());
        assert_eq!(fire(&mut wheel, 1_050), vec![(1_050, 1)]);
    }

    #[test]
    fn budget_spreads_expiry_over_calls() {
        let mut wheel = TimerWheel::new(0);
        for value in 0..25 {
            wheel.insert(7, value);
        }
        wheel.insert(8, 100);
        let mut expired = Vec::new();
        let mut counts = Vec::new();
        loop {
            let count = wheel.advance(7, 10, &mut expired);
            counts.push(count);
            if count == 0 {
                break;
            }
        }
        assert_eq!(counts, vec![10, 10, 5, 0]);
        assert!(expired.iter().all(|&(_, deadline_ms, _)| deadline_ms == 7));
        assert_eq!(wheel.len(), 1);
        assert_eq!(fire(&mut wheel, 8), vec![(8, 100)]);
    }

    #[test]
    fn a_long_idle_gap_costs_little_and_loses_nothing() {
        let start_ms = 1_700_000_000_000;
        let ten_years_ms = 10 * 365 * 24 * 3_600 * 1_000;
        let mut wheel = TimerWheel::new(start_ms);
        wheel.insert(start_ms + 5, 1);
        wheel.insert(start_ms + ten_years_ms / 2, 2);
        wheel.insert(start_ms + ten_years_ms, 3);
        wheel.insert(start_ms + ten_years_ms + 1, 4);
        let fired = fire(&mut wheel, start_ms + ten_years_ms);
        assert_eq!(
            fired.iter().map(|&(_, value)| value).collect::<Vec<_>>(),
            vec![1, 2, 3]
        );
        assert_eq!(fire(&mut wheel, start_ms + ten_years_ms + 1).len(), 1);
    }

    #[test]
    fn extreme_deadlines_do_not_overflow() {
        let mut wheel = TimerWheel::new(u64::MAX - 10);
        wheel.insert(u64::MAX, 1);
        wheel.insert(u64::MAX - 5, 2);
        assert_eq!(fire(&mut wheel, u64::MAX - 6), vec![]);
        assert_eq!(
            fire(&mut wheel, u64::MAX),
            vec![(u64::MAX - 5, 2), (u64::MAX, 1)]
        );
        let mut wheel = TimerWheel::new(0);
        wheel.insert(u64::MAX, 1);
        wheel.insert(1 << 63, 2);
        assert_eq!(fire(&mut wheel, (1 << 63) - 1), vec![]);
        assert_eq!(fire(&mut wheel, 1 << 63), vec![(1 << 63, 2)]);
        assert_eq!(fire(&mut wheel, u64::MAX), vec![(u64::MAX, 1)]);
    }

    #[derive(Debug, Clone)]
    enum Operation {
        Insert { delay_ms: u64 },
        Cancel { pick: usize },
        Advance { step_ms: u64, expired_max: usize },
    }

    fn operation() -> impl Strategy<Value = Operation> {
        prop_oneof![
            4 => prop_oneof![0..70_u64, 0..5_000_u64, 0..1_000_000_u64, 0..100_000_000_000_u64]
                .prop_map(|delay_ms| Operation::Insert { delay_ms }),
            2 => any::<usize>().prop_map(|pick| Operation::Cancel { pick }),
            3 => (prop_oneof![0..3_u64, 0..200_u64, 0..100_000_u64, 0..1_000_000_000_000_u64],
                  prop_oneof![Just(usize::MAX), 1..4_usize])
                .prop_map(|(step_ms, expired_max)| Operation::Advance { step_ms, expired_max }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// The wheel fires exactly the timers a sorted map would: none early, none lost, none
        /// twice, and cancelled ones never.
        #[test]
        fn matches_a_sorted_model(
            start_ms in 0..u64::MAX / 2,
            operations in prop::collection::vec(operation(), 1..200),
        ) {
            let mut wheel = TimerWheel::new(start_ms);
            let mut model: BTreeMap<(u64, u32), TimerId> = BTreeMap::new();
            let mut now_ms = start_ms;
            let mut next_value = 0_u32;
            for operation in operations {
                match operation {
                    Operation::Insert { delay_ms } => {
                        let deadline_ms = now_ms.saturating_add(delay_ms);
                        let id = wheel.insert(deadline_ms, next_value);
                        model.insert((deadline_ms, next_value), id);
                        next_value += 1;
                    }
                    Operation::Cancel { pick } => {
                        if !model.is_empty() {
                            let key = *model.keys().nth(pick % model.len()).unwrap();
                            let id = model.remove(&key).unwrap();
                            prop_assert_eq!(wheel.cancel(id), Some(key.1));
                            prop_assert_eq!(wheel.cancel(id), None);
                        }
                    }
                    Operation::Advance { step_ms, expired_max } => {
                        now_ms = now_ms.saturating_add(step_ms);
                        let mut expired = Vec::new();
                        let count = wheel.advance(now_ms, expired_max, &mut expired);
                        prop_assert_eq!(count, expired.len());
                        prop_assert!(count <= expired_max);
                        let due_count = model.range(..=(now_ms, u32::MAX)).count();
                        prop_assert_eq!(count, due_count.min(expired_max));
                        for (id, deadline_ms, value) in expired {
                            prop_assert!(deadline_ms <= now_ms);
                            prop_assert_eq!(model.remove(&(deadline_ms, value)), Some(id));
                        }
                    }
                }
                prop_assert_eq!(wheel.len(), model.len());
            }
            // Whatever is left fires by the latest deadline, exactly once.
            let mut expired = Vec::new();
            wheel.advance(u64::MAX, usize::MAX, &mut expired);
            for (id, deadline_ms, value) in expired {
                prop_assert_eq!(model.remove(&(deadline_ms, value)), Some(id));
            }
            prop_assert!(model.is_empty());
            prop_assert!(wheel.is_empty());
        }
    }
}
