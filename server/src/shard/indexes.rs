//! The secondary indexes of one shard (issue 8), sans-I/O: their definitions, their
//! structures ([`Index`]) and the builds that file the keys existing when an index was
//! created.
//!
//! The shard calls [`Indexes::on_write`] in the same apply step as every change to an
//! entry's fields: a put, a delete, an expiry, a lease's end. A build walks the store in
//! key order, a bounded slice per [`Indexes::build_step`]; until it has passed a key, writes
//! of that key leave the index alone (the build files the key's fields when it gets there),
//! and after, they update it. So at every moment an index holds exactly the keys before its
//! build's position, and a ready index exactly the store.
//!
//! **Invariant:** a ready index files every stored entry under its prefix that has its field
//! (expired entries not yet reclaimed included: queries skip those, as reads do), and
//! nothing else; a building one the same for the keys before [`Build::next`].

use tessera_protocol::limits::{INDEXES_MAX, INDEXES_PER_PREFIX_MAX};
use tessera_protocol::{key_after, prefix_end, IndexInfo, IndexSpec, IndexState};

use super::fields::{self, ValueRef};
use super::index::Index;
use super::store::{EntryRef, Store};

/// Where a build is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Build {
    /// The first key not yet filed.
    pub next: Vec<u8>,
    /// Keys filed so far.
    pub keys_done: u64,
    /// Keys the shard held when the build started.
    pub keys_total: u64,
}

/// One index of the shard.
#[derive(Debug)]
pub struct ShardIndex {
    /// The definition.
    pub spec: IndexSpec,
    /// The pairs.
    pub index: Index,
    /// `None` once ready.
    pub build: Option<Build>,
}

impl ShardIndex {
    /// Whether it covers `key` now: under its prefix, and filed already if building.
    fn covers(&self, key: &[u8]) -> bool {
        key.starts_with(&self.spec.prefix)
            && self
                .build
                .as_ref()
                .is_none_or(|build| key < build.next.as_slice())
    }

    /// Whether queries may use it.
    pub fn is_ready(&self) -> bool {
        self.build.is_none()
    }

    /// What `ListIndexes` says of it.
    pub fn info(&self) -> IndexInfo {
        IndexInfo {
            spec: self.spec.clone(),
            state: match &self.build {
                None => IndexState::Ready,
                Some(build) => IndexState::Building {
                    keys_done: build.keys_done,
                    keys_total: build.keys_total,
                },
            },
            entries: self.index.len() as u64,
            memory_bytes: self.index.memory_bytes(),
        }
    }
}

/// Why an index cannot be created.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CreateError {
    /// Another definition holds the name.
    #[error("an index named {name:?} exists with another definition (field {field:?}, {kind})")]
    NameTaken {
        /// The name.
        name: String,
        /// The existing index's field.
        field: String,
        /// The existing index's kind.
        kind: &'static str,
    },
    /// The shard holds [`INDEXES_MAX`] indexes.
    #[error("the shard holds {INDEXES_MAX} indexes, the most it keeps")]
    TooMany,
    /// [`INDEXES_PER_PREFIX_MAX`] indexes already cover keys this one would.
    #[error(
        "{INDEXES_PER_PREFIX_MAX} indexes already cover keys under this prefix (each write of \
         such a key updates all of them)"
    )]
    TooManyForPrefix,
}

/// What [`Indexes::create`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Created {
    /// The same definition exists; nothing changed.
    Exists,
    /// A new index, with a build to run (the shard holds keys under its prefix).
    Building,
    /// A new index, ready at once.
    Ready,
}

/// Every index of a shard.
#[derive(Debug, Default)]
pub struct Indexes {
    list: Vec<ShardIndex>,
}

impl Indexes {
    /// No indexes.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether there are none (a write then costs nothing here).
    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// The indexes, in creation order.
    pub fn iter(&self) -> impl Iterator<Item = &ShardIndex> {
        self.list.iter()
    }

    /// The index named `name`.
    pub fn get(&self, name: &str) -> Option<&ShardIndex> {
        self.list.iter().find(|index| index.spec.name == name)
    }

    /// Defines an index. A build starts at the first key of its prefix if `store` holds any
    /// key, so the index is not ready until [`Indexes::build_step`] has walked them.
    ///
    /// # Errors
    /// The name holds another definition, or a limit is reached.
    pub fn create(&mut self, spec: IndexSpec, store: &Store) -> Result<Created, CreateError> {
        if let Some(existing) = self.get(&spec.name) {
            if existing.spec == spec {
                return Ok(Created::Exists);
            }
            return Err(CreateError::NameTaken {
                name: spec.name,
                field: existing.spec.field.clone(),
                kind: existing.spec.kind.as_str(),
            });
        }
        if self.list.len() >= INDEXES_MAX {
            return Err(CreateError::TooMany);
        }
        // Two prefixes cover a key in common only when one starts with the other.
        let overlapping = self
            .list
            .iter()
            .filter(|index| {
                index.spec.prefix.starts_with(&spec.prefix)
                    || spec.prefix.starts_with(&index.spec.prefix)
            })
            .count();
        if overlapping >= INDEXES_PER_PREFIX_MAX {
            return Err(CreateError::TooManyForPrefix);
        }
        let has_keys = store
            .range(&spec.prefix, prefix_end(&spec.prefix).as_deref())
            .next()
            .is_some();
        let build = has_keys.then(|| Build {
            next: spec.prefix.clone(),
            keys_done: 0,
            keys_total: store.len() as u64,
        });
        let created = if build.is_some() {
            Created::Building
        } else {
            Created::Ready
        };
        self.list.push(ShardIndex {
            index: Index::new(spec.kind),
            spec,
            build,
        });
        Ok(created)
    }

    /// Removes the index named `name`; whether it existed.
    pub fn drop_index(&mut self, name: &str) -> bool {
        let before = self.list.len();
        self.list.retain(|index| index.spec.name != name);
        self.list.len() != before
    }

    /// Keeps every index in step with a change of `key`'s fields: `before` is the blob it
    /// held (`None`: the key did not exist), `after` the one it holds now (`None`: removed).
    pub fn on_write(&mut self, key: &[u8], before: Option<&[u8]>, after: Option<&[u8]>) {
        if self.list.is_empty() {
            return;
        }
        let before = before.map(decoded).unwrap_or_default();
        let after = after.map(decoded).unwrap_or_default();
        for index in &mut self.list {
            if !index.covers(key) {
                continue;
            }
            let old = value_of(&before, &index.spec.field);
            let new = value_of(&after, &index.spec.field);
            if old == new {
                continue;
            }
            if let Some(old) = old {
                index.index.remove(key, &old.to_value());
            }
            if let Some(new) = new {
                index.index.insert(key, &new.to_value());
            }
        }
    }

    /// Files up to `keys_max` more keys for the first index still building; whether any
    /// build is left after it.
    pub fn build_step(&mut self, store: &Store, keys_max: usize) -> bool {
        let Some(index) = self.list.iter_mut().find(|index| index.build.is_some()) else {
            return false;
        };
        let Some(build) = &mut index.build else {
            return false;
        };
        let end = prefix_end(&index.spec.prefix);
        let mut filed = 0;
        let mut last: Option<&[u8]> = None;
        for entry in store.range(&build.next, end.as_deref()).take(keys_max) {
            file(&mut index.index, &index.spec.field, entry);
            filed += 1;
            last = Some(entry.key());
        }
        build.keys_done += filed as u64;
        match last {
            Some(last) if filed == keys_max => build.next = key_after(last),
            // The range is walked to its end.
            _ => index.build = None,
        }
        self.list.iter().any(|index| index.build.is_some())
    }

    /// Finishes every build now (recovery, before the shard serves).
    pub fn build_all(&mut self, store: &Store) {
        while self.build_step(store, usize::MAX) {}
    }

    /// Bytes the indexes are charged, together.
    pub fn memory_bytes(&self) -> u64 {
        self.list
            .iter()
            .map(|index| index.index.memory_bytes())
            .sum()
    }

    /// Whether any index is building.
    pub fn is_building(&self) -> bool {
        self.list.iter().any(|index| index.build.is_some())
    }

    /// Checks every index against the store (the module invariant); for tests (O(n)).
    pub fn check(&self, store: &Store) {
        for shard_index in &self.list {
            let mut expected = Index::new(shard_index.spec.kind);
            let end = prefix_end(&shard_index.spec.prefix);
            for entry in store.range(&shard_index.spec.prefix, end.as_deref()) {
                if shard_index.covers(entry.key()) {
                    file(&mut expected, &shard_index.spec.field, entry);
                }
            }
            assert!(
                shard_index.index.same_pairs(&expected),
                "index {:?} disagrees with the store: {} pairs, expected {}",
                shard_index.spec.name,
                shard_index.index.len(),
                expected.len()
            );
        }
    }
}

fn decoded(blob: &[u8]) -> fields::Decoded<'_> {
    fields::decode(blob).unwrap_or_default()
}

fn value_of<'a>(fields: &[(&str, ValueRef<'a>)], name: &str) -> Option<ValueRef<'a>> {
    fields
        .iter()
        .find(|(field, _)| *field == name)
        .map(|(_, value)| *value)
}

/// Files `entry` in `index` under its value of `field`, if it has one.
fn file(index: &mut Index, field: &str, entry: EntryRef<'_>) {
    if let Some(value) = fields::lookup(entry.fields(), field) {
        index.insert(entry.key(), &value.to_value());
    }
}

#[cfg(test)]
mod tests {
    use tessera_protocol::{Field, FieldValue, IndexKind};

    use super::*;
    use crate::shard::fields::encode_owned;
    use crate::shard::store::KeyRevisions;

    fn blob(age: i64) -> Vec<u8> {
        let mut blob = Vec::new();
        encode_owned(&[Field::new("age", FieldValue::I64(age))], &mut blob);
        blob
    }

    fn spec(name: &str, prefix: &str, kind: IndexKind) -> IndexSpec {
        IndexSpec {
            name: name.to_owned(),
            prefix: prefix.as_bytes().to_vec(),
            field: "age".to_owned(),
            kind,
        }
    }

    /// Writes `key` with `age` in the store and tells the indexes, as the shard does.
    fn put(store: &mut Store, indexes: &mut Indexes, key: &str, age: Option<i64>) {
        let fields = age.map(blob).unwrap_or_default();
        let before = store
            .get(key.as_bytes())
            .map(|entry| entry.fields().to_vec());
        store.insert(
            key.as_bytes(),
            &fields,
            b"v",
            KeyRevisions::created(1),
            None,
        );
        indexes.on_write(key.as_bytes(), before.as_deref(), Some(&fields));
    }

    fn remove(store: &mut Store, indexes: &mut Indexes, key: &str) {
        if let Some(removed) = store.remove(key.as_bytes()) {
            indexes.on_write(key.as_bytes(), Some(removed.view().fields()), None);
        }
    }

    /// A build over existing keys runs in slices while writes land before and after its
    /// position; at every step the index equals the store up to the position, and once done
    /// the whole store.
    #[test]
    fn a_build_in_slices_stays_in_step_with_writes_around_it() {
        let mut store = Store::new(u64::MAX);
        let mut indexes = Indexes::new();
        for number in 0..100 {
            put(
                &mut store,
                &mut indexes,
                &format!("u:{number:03}"),
                Some(number % 7),
            );
        }
        put(&mut store, &mut indexes, "other", Some(3));
        assert_eq!(
            indexes.create(spec("by_age", "u:", IndexKind::Range), &store),
            Ok(Created::Building)
        );
        let mut steps = 0;
        loop {
            let more = indexes.build_step(&store, 9);
            indexes.check(&store);
            steps += 1;
            // Writes on both sides of the build's position, and removals.
            put(
                &mut store,
                &mut indexes,
                &format!("u:{:03}", steps * 7 % 100),
                Some(steps),
            );
            put(
                &mut store,
                &mut indexes,
                &format!("u:{:03}", 99 - steps),
                None,
            );
            remove(
                &mut store,
                &mut indexes,
                &format!("u:{:03}", steps * 13 % 100),
            );
            put(
                &mut store,
                &mut indexes,
                &format!("u:{:03}", 100 + steps),
                Some(1),
            );
            indexes.check(&store);
            if !more {
                break;
            }
        }
        assert!(steps > 5, "{steps} steps");
        let index = indexes.get("by_age").unwrap();
        assert!(index.is_ready());
        // Keys outside the prefix are not filed; every key under it with the field is.
        let with_field = store
            .range(b"u:", Some(b"u;"))
            .filter(|entry| !entry.fields().is_empty())
            .count();
        assert_eq!(index.index.len(), with_field);
        assert_eq!(indexes.memory_bytes(), index.index.memory_bytes());
    }

    #[test]
    fn definitions_are_checked_against_the_existing_ones_and_the_limits() {
        let store = Store::new(u64::MAX);
        let mut indexes = Indexes::new();
        let by_age = spec("by_age", "u:", IndexKind::Equality);
        // No key under the prefix: ready at once.
        assert_eq!(indexes.create(by_age.clone(), &store), Ok(Created::Ready));
        assert_eq!(indexes.create(by_age, &store), Ok(Created::Exists));
        assert!(matches!(
            indexes.create(spec("by_age", "u:", IndexKind::Range), &store),
            Err(CreateError::NameTaken { .. })
        ));
        for number in 1..INDEXES_PER_PREFIX_MAX {
            let name = format!("nested{number}");
            let prefix = format!("u:{}", "x".repeat(number));
            indexes
                .create(spec(&name, &prefix, IndexKind::Equality), &store)
                .unwrap();
        }
        // Every key under "u:xxx..." is covered by all of them already.
        assert_eq!(
            indexes.create(spec("one_more", "u:", IndexKind::Range), &store),
            Err(CreateError::TooManyForPrefix)
        );
        // A prefix no other covers is fine.
        assert_eq!(
            indexes.create(spec("elsewhere", "v:", IndexKind::Range), &store),
            Ok(Created::Ready)
        );
        assert!(indexes.drop_index("elsewhere"));
        assert!(!indexes.drop_index("elsewhere"));
    }
}
