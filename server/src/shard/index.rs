//! Secondary indexes of one shard (issue 8), sans-I/O: for each index, which keys under its
//! key prefix hold which value of its field. An equality index is a hash map from value to
//! keys; a range index is an ordered set of (value, key), walked between two bounds.
//!
//! The shard will call [`Index::insert`] and [`Index::remove`] in the same apply step as the
//! primary write (puts, deletes, expiry, lease ends), so an index never disagrees with the
//! data of its shard; this module only keeps the structures and answers lookups.
//!
//! Values that compare equal ([`FieldValue::compare`]: `2` and `2.0`) are one value to an
//! index: the equality index files integral floats under the integer, and the range index
//! orders numbers of both types on one line.
//!
//! **Invariant:** every `(value, key)` pair is held at most once, and
//! [`Index::memory_bytes`] is the sum of [`pair_cost`] over the pairs held.

use std::cmp::Ordering;
use std::collections::BTreeSet;
use std::ops::Bound as StdBound;

use ahash::AHashMap;
use tessera_protocol::query::{Bound, FieldValue};

/// Estimated bytes one `(value, key)` pair costs beyond the key's and a string value's bytes:
/// the map or tree slot, the key copy's allocation and the set's node share.
pub const PAIR_OVERHEAD_BYTES: u64 = 80;

/// The memory an index charges for holding `key` under `value`.
pub fn pair_cost(key: &[u8], value: &FieldValue) -> u64 {
    let value_bytes = match value {
        FieldValue::Str(text) => text.len(),
        _ => 0,
    };
    (key.len() + value_bytes) as u64 + PAIR_OVERHEAD_BYTES
}

pub use tessera_protocol::IndexKind;

/// A value as an equality index files it: integral floats as integers, so `2.0` finds `2`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum EqualityKey {
    Str(String),
    Integer(i64),
    Float(u64),
    Bool(bool),
    Timestamp(i64),
}

impl EqualityKey {
    fn of(value: &FieldValue) -> Self {
        match value {
            FieldValue::Str(text) => Self::Str(text.clone()),
            FieldValue::I64(number) => Self::Integer(*number),
            FieldValue::F64(number) => {
                let float = number.get();
                // i64 spans [-2^63, 2^63); an integral float inside it is that integer.
                #[allow(
                    clippy::cast_possible_truncation,
                    clippy::cast_precision_loss,
                    reason = "checked integral and within i64"
                )]
                if float.fract() == 0.0 && float >= -(2_f64.powi(63)) && float < 2_f64.powi(63) {
                    Self::Integer(float as i64)
                } else {
                    Self::Float(float.to_bits())
                }
            }
            FieldValue::Bool(value) => Self::Bool(*value),
            FieldValue::Timestamp(ms) => Self::Timestamp(*ms),
        }
    }
}

/// A value in a range index's order: types apart (strings, numbers, bools, timestamps), and
/// within a type [`FieldValue::compare`].
#[derive(Debug, Clone)]
struct Ordered(FieldValue);

impl Ordered {
    fn rank(&self) -> u8 {
        self.0.type_rank()
    }
}

impl PartialEq for Ordered {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Ordered {}

impl PartialOrd for Ordered {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Ordered {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0.total_cmp(&other.0)
    }
}

/// The least value of type rank `rank` (see [`Ordered::rank`]).
fn least_of_rank(rank: u8) -> FieldValue {
    match rank {
        0 => FieldValue::Str(String::new()),
        // -inf is never NaN, so the fallback is never taken.
        1 => tessera_protocol::query::F64::new(f64::NEG_INFINITY)
            .map_or(FieldValue::I64(i64::MIN), FieldValue::F64),
        2 => FieldValue::Bool(false),
        _ => FieldValue::Timestamp(i64::MIN),
    }
}

#[derive(Debug)]
enum Pairs {
    Equality(AHashMap<EqualityKey, BTreeSet<Vec<u8>>>),
    Range(BTreeSet<(Ordered, Vec<u8>)>),
}

/// One index of one shard.
#[derive(Debug)]
pub struct Index {
    pairs: Pairs,
    pair_count: usize,
    memory_bytes: u64,
}

impl Index {
    /// An empty index of `kind`.
    pub fn new(kind: IndexKind) -> Self {
        Self {
            pairs: match kind {
                IndexKind::Equality => Pairs::Equality(AHashMap::new()),
                IndexKind::Range => Pairs::Range(BTreeSet::new()),
            },
            pair_count: 0,
            memory_bytes: 0,
        }
    }

    /// Its kind.
    pub fn kind(&self) -> IndexKind {
        match self.pairs {
            Pairs::Equality(_) => IndexKind::Equality,
            Pairs::Range(_) => IndexKind::Range,
        }
    }

    /// Files `key` under `value`; `false` if it was already there.
    pub fn insert(&mut self, key: &[u8], value: &FieldValue) -> bool {
        let inserted = match &mut self.pairs {
            Pairs::Equality(map) => map
                .entry(EqualityKey::of(value))
                .or_default()
                .insert(key.to_vec()),
            Pairs::Range(set) => set.insert((Ordered(value.clone()), key.to_vec())),
        };
        if inserted {
            self.pair_count += 1;
            self.memory_bytes += pair_cost(key, value);
        }
        inserted
    }

    /// Removes `key` from under `value`; `false` if it was not there.
    pub fn remove(&mut self, key: &[u8], value: &FieldValue) -> bool {
        let removed = match &mut self.pairs {
            Pairs::Equality(map) => {
                let filed = EqualityKey::of(value);
                let removed = map.get_mut(&filed).is_some_and(|keys| keys.remove(key));
                if map.get(&filed).is_some_and(BTreeSet::is_empty) {
                    map.remove(&filed);
                }
                removed
            }
            Pairs::Range(set) => set.remove(&(Ordered(value.clone()), key.to_vec())),
        };
        if removed {
            self.pair_count -= 1;
            self.memory_bytes -= pair_cost(key, value);
        }
        removed
    }

    /// The keys filed under a value equal to `value`, in key order.
    pub fn equal(&self, value: &FieldValue) -> Vec<&[u8]> {
        match &self.pairs {
            Pairs::Equality(map) => map
                .get(&EqualityKey::of(value))
                .map(|keys| keys.iter().map(Vec::as_slice).collect())
                .unwrap_or_default(),
            Pairs::Range(_) => self.range(
                &Bound::Included(value.clone()),
                &Bound::Included(value.clone()),
            ),
        }
    }

    /// The keys filed under a value equal to `value` from `from` on, in key order, read as
    /// they are asked for: a page that stops early reads no further.
    pub fn equal_from<'a>(
        &'a self,
        value: &FieldValue,
        from: &[u8],
    ) -> Box<dyn Iterator<Item = &'a [u8]> + 'a> {
        let from = StdBound::Included(from.to_vec());
        match &self.pairs {
            Pairs::Equality(map) => Box::new(
                map.get(&EqualityKey::of(value))
                    .into_iter()
                    .flat_map(move |keys| keys.range((from.clone(), StdBound::Unbounded)))
                    .map(Vec::as_slice),
            ),
            Pairs::Range(set) => {
                let value = Ordered(value.clone());
                let start = match from {
                    StdBound::Included(key) => (value.clone(), key),
                    _ => (value.clone(), Vec::new()),
                };
                Box::new(
                    set.range((StdBound::Included(start), StdBound::Unbounded))
                        .take_while(move |(filed, _)| *filed == value)
                        .map(|(_, key)| key.as_slice()),
                )
            }
        }
    }

    /// The keys filed under a value within the bounds, in value order then key order; an
    /// equality index has no order and answers nothing (the planner does not ask it).
    pub fn range(&self, lower: &Bound, upper: &Bound) -> Vec<&[u8]> {
        let Pairs::Range(set) = &self.pairs else {
            return Vec::new();
        };
        // One type per range: bounds of a type admit only values of that type.
        let rank = [lower, upper].into_iter().find_map(|bound| match bound {
            Bound::Included(value) | Bound::Excluded(value) => Some(Ordered(value.clone()).rank()),
            Bound::Unbounded => None,
        });
        // The ends as set elements: an included lower end starts before its value's first key
        // (the empty key), an excluded one at it (its keys are skipped below); an unbounded
        // one at the least value of the range's type.
        let start = match (lower, rank) {
            (Bound::Unbounded, None) => StdBound::Unbounded,
            (Bound::Unbounded, Some(rank)) => {
                StdBound::Included((Ordered(least_of_rank(rank)), Vec::new()))
            }
            (Bound::Included(value) | Bound::Excluded(value), _) => {
                StdBound::Included((Ordered(value.clone()), Vec::new()))
            }
        };
        set.range((start, StdBound::Unbounded))
            .skip_while(|(value, _)| match lower {
                Bound::Excluded(low) => value.0.compare(low) == Some(Ordering::Equal),
                _ => false,
            })
            .take_while(|(value, _)| {
                rank.is_none_or(|rank| value.rank() == rank)
                    && match upper {
                        Bound::Unbounded => true,
                        Bound::Included(high) => {
                            matches!(
                                value.0.compare(high),
                                Some(Ordering::Less | Ordering::Equal)
                            )
                        }
                        Bound::Excluded(high) => value.0.compare(high) == Some(Ordering::Less),
                    }
            })
            .map(|(_, key)| key.as_slice())
            .collect()
    }

    /// The keys filed under a string starting with `prefix`, in value order then key order
    /// (a range index; an equality index answers nothing).
    pub fn prefix(&self, prefix: &str) -> Vec<&[u8]> {
        let Pairs::Range(set) = &self.pairs else {
            return Vec::new();
        };
        let start = (Ordered(FieldValue::Str(prefix.to_owned())), Vec::new());
        set.range((StdBound::Included(start), StdBound::Unbounded))
            .take_while(
                |(value, _)| matches!(&value.0, FieldValue::Str(text) if text.starts_with(prefix)),
            )
            .map(|(_, key)| key.as_slice())
            .collect()
    }

    /// Whether `other` holds exactly the same pairs (tests: an index against one rebuilt).
    pub fn same_pairs(&self, other: &Index) -> bool {
        match (&self.pairs, &other.pairs) {
            (Pairs::Equality(mine), Pairs::Equality(theirs)) => mine == theirs,
            (Pairs::Range(mine), Pairs::Range(theirs)) => mine == theirs,
            _ => false,
        }
    }

    /// Pairs held.
    pub fn len(&self) -> usize {
        self.pair_count
    }

    /// Whether it holds nothing.
    pub fn is_empty(&self) -> bool {
        self.pair_count == 0
    }

    /// Bytes charged for what it holds.
    pub fn memory_bytes(&self) -> u64 {
        self.memory_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use tessera_protocol::query::F64;

    fn float(value: f64) -> FieldValue {
        FieldValue::F64(F64::new(value).unwrap())
    }

    #[test]
    fn equal_numbers_of_both_types_are_one_value() {
        for kind in [IndexKind::Equality, IndexKind::Range] {
            let mut index = Index::new(kind);
            index.insert(b"a", &FieldValue::I64(2));
            index.insert(b"b", &float(2.0));
            index.insert(b"c", &float(2.5));
            assert_eq!(index.equal(&FieldValue::I64(2)), [b"a", b"b"], "{kind:?}");
            assert_eq!(index.equal(&float(2.5)), [b"c"], "{kind:?}");
            assert!(index.remove(b"b", &FieldValue::I64(2)), "{kind:?}");
            assert!(!index.remove(b"b", &float(2.0)), "{kind:?}");
            assert_eq!(index.len(), 2);
        }
    }

    #[test]
    fn ranges_walk_in_value_order_and_keep_to_one_type() {
        let mut index = Index::new(IndexKind::Range);
        for (key, value) in [
            (&b"k1"[..], FieldValue::I64(1)),
            (b"k2", float(1.5)),
            (b"k3", FieldValue::I64(3)),
            (b"k4", FieldValue::Str("x".into())),
            (b"k5", FieldValue::Timestamp(2)),
        ] {
            index.insert(key, &value);
        }
        let keys = index.range(
            &Bound::Excluded(FieldValue::I64(1)),
            &Bound::Included(FieldValue::I64(3)),
        );
        assert_eq!(keys, [&b"k2"[..], b"k3"]);
        let at_least_one = index.range(&Bound::Included(float(1.0)), &Bound::Unbounded);
        assert_eq!(at_least_one, [&b"k1"[..], b"k2", b"k3"]);
        let everything = index.range(&Bound::Unbounded, &Bound::Unbounded);
        assert_eq!(everything.len(), 5);
    }

    fn value() -> impl Strategy<Value = FieldValue> {
        prop_oneof![
            (0_i64..6).prop_map(FieldValue::I64),
            prop_oneof![Just(0.5), Just(2.0), Just(3.5)].prop_map(float),
            prop_oneof![Just("a"), Just("b")].prop_map(|text| FieldValue::Str(text.into())),
            (0_i64..3).prop_map(FieldValue::Timestamp),
        ]
    }

    fn bound() -> impl Strategy<Value = Bound> {
        prop_oneof![
            Just(Bound::Unbounded),
            value().prop_map(Bound::Included),
            value().prop_map(Bound::Excluded),
        ]
    }

    proptest! {
        /// Against a model: a list of (key, value) pairs filtered by brute force.
        #[test]
        fn lookups_match_a_brute_force_filter(
            ops in proptest::collection::vec((any::<bool>(), 0_u8..8, value()), 1..80),
            probe in value(),
            lower in bound(),
            upper in bound(),
        ) {
            for kind in [IndexKind::Equality, IndexKind::Range] {
                let mut index = Index::new(kind);
                let mut model: Vec<(Vec<u8>, FieldValue)> = Vec::new();
                for (is_insert, key, value) in &ops {
                    let key = vec![*key];
                    let position = model.iter().position(|(k, v)| {
                        *k == key && v.compare(value) == Some(Ordering::Equal)
                    });
                    if *is_insert {
                        prop_assert_eq!(index.insert(&key, value), position.is_none());
                        if position.is_none() {
                            model.push((key, value.clone()));
                        }
                    } else {
                        prop_assert_eq!(index.remove(&key, value), position.is_some());
                        if let Some(position) = position {
                            model.remove(position);
                        }
                    }
                }
                prop_assert_eq!(index.len(), model.len());
                let cost: u64 = model.iter().map(|(k, v)| pair_cost(k, v)).sum();
                prop_assert_eq!(index.memory_bytes(), cost);
                let mut expected: Vec<&[u8]> = model
                    .iter()
                    .filter(|(_, v)| v.compare(&probe) == Some(Ordering::Equal))
                    .map(|(k, _)| k.as_slice())
                    .collect();
                expected.sort_unstable();
                prop_assert_eq!(index.equal(&probe), expected);
                if kind == IndexKind::Range {
                    let admits = |v: &FieldValue| {
                        let low = match &lower {
                            Bound::Unbounded => true,
                            Bound::Included(l) => matches!(v.compare(l), Some(Ordering::Greater | Ordering::Equal)),
                            Bound::Excluded(l) => v.compare(l) == Some(Ordering::Greater),
                        };
                        let high = match &upper {
                            Bound::Unbounded => true,
                            Bound::Included(h) => matches!(v.compare(h), Some(Ordering::Less | Ordering::Equal)),
                            Bound::Excluded(h) => v.compare(h) == Some(Ordering::Less),
                        };
                        low && high
                    };
                    let mut expected: Vec<(Ordered, &[u8])> = model
                        .iter()
                        .filter(|(_, v)| admits(v))
                        .map(|(k, v)| (Ordered(v.clone()), k.as_slice()))
                        .collect();
                    expected.sort();
                    let expected: Vec<&[u8]> = expected.into_iter().map(|(_, k)| k).collect();
                    prop_assert_eq!(index.range(&lower, &upper), expected);
                }
            }
        }
    }
}
