//! Scans: the keys of a range in key order, across every shard.
//!
//! A shard keeps its own keys in order, and keys are spread over shards by hash, so a scan
//! asks every core of every node for its first `limit` keys of the range, in parallel, and
//! merges the pages. A shard that has more keys than its page holds stopped at some key (its
//! `limit`-th, or earlier when the page filled its byte bound): the merge keeps only keys up
//! to the smallest such stopping key, so no key a shard left out is skipped, and then the
//! first `limit` of those. The next page starts just after the last key returned
//! ([`ScanResult::continuation`]).
//! Each shard reads its page at one revision, reported in [`ScanResult::revisions`]; there is
//! no revision common to several shards. Memory is bounded by `limit` keys per shard.

use futures_util::future::join_all;
use tessera_protocol::codec::check_key;
use tessera_protocol::limits::{KEY_SIZE_MAX, SCAN_LIMIT_MAX};
use tessera_protocol::{key_after, prefix_end, Request, RequestError, Response, Scan, ScanPage};

pub use tessera_protocol::ScanItem;

use crate::connection::server_error;
use crate::{unexpected, Client, ClientError, Result};

/// A range of keys, `[start, end)` in byte order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct KeyRange {
    /// The first key (inclusive); empty for the start of the keyspace.
    pub start: Vec<u8>,
    /// The end (exclusive); `None` for the end of the keyspace.
    pub end: Option<Vec<u8>>,
}

impl KeyRange {
    /// Every key.
    #[must_use]
    pub fn all() -> Self {
        Self::default()
    }

    /// The keys that start with `prefix`.
    #[must_use]
    pub fn prefix(prefix: impl AsRef<[u8]>) -> Self {
        let prefix = prefix.as_ref();
        Self {
            start: prefix.to_vec(),
            end: prefix_end(prefix),
        }
    }

    /// Exactly one key: from the key to the next possible key (for a key of `KEY_SIZE_MAX`
    /// bytes, which no key extends, to the next prefix).
    #[must_use]
    pub fn key(key: impl AsRef<[u8]>) -> Self {
        let key = key.as_ref();
        Self {
            start: key.to_vec(),
            end: next_start(key),
        }
    }

    /// Whether the range holds exactly one possible key, `start`.
    #[must_use]
    pub fn is_one_key(&self) -> bool {
        !self.start.is_empty() && self.end == next_start(&self.start)
    }

    /// The keys from `start` (inclusive) to `end` (exclusive).
    #[must_use]
    pub fn between(start: impl AsRef<[u8]>, end: impl AsRef<[u8]>) -> Self {
        Self {
            start: start.as_ref().to_vec(),
            end: Some(end.as_ref().to_vec()),
        }
    }

    /// The keys from `start` (inclusive) to the end of the keyspace.
    #[must_use]
    pub fn from(start: impl AsRef<[u8]>) -> Self {
        Self {
            start: start.as_ref().to_vec(),
            end: None,
        }
    }
}

/// How a scan reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScanOptions {
    /// Most keys to return, `1..=SCAN_LIMIT_MAX` (default 1000).
    pub limit: u32,
    /// Return keys without their entries.
    pub keys_only: bool,
}

impl Default for ScanOptions {
    fn default() -> Self {
        Self {
            limit: 1000,
            keys_only: false,
        }
    }
}

impl ScanOptions {
    /// At most `limit` keys.
    #[must_use]
    pub fn limit(mut self, limit: u32) -> Self {
        self.limit = limit;
        self
    }

    /// Keys without their entries.
    #[must_use]
    pub fn keys_only(mut self) -> Self {
        self.keys_only = true;
        self
    }
}

/// The revision one shard answered at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ShardRevision {
    /// The node.
    pub node_id: u32,
    /// The core (shard) on that node.
    pub core_id: u16,
    /// The shard's revision.
    pub revision: u64,
}

/// One page of a scan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScanResult {
    /// The keys (and entries, unless `keys_only`), in key order across every shard.
    pub items: Vec<ScanItem>,
    /// The revision each shard read its part at, in topology order.
    pub revisions: Vec<ShardRevision>,
    /// The range that holds the rest, if there is more: pass it to the next call.
    pub continuation: Option<KeyRange>,
}

impl Client {
    /// The first `options.limit` keys of `range` in key order, from every shard.
    ///
    /// # Errors
    /// A bound is longer than a key, the limit is outside `1..=SCAN_LIMIT_MAX`, or a core
    /// does not answer.
    pub async fn scan(&self, range: &KeyRange, options: ScanOptions) -> Result<ScanResult> {
        check_range(range)?;
        if !(1..=SCAN_LIMIT_MAX).contains(&options.limit) {
            return Err(ClientError::InvalidRequest(
                RequestError::ScanLimitOutOfRange {
                    limit: options.limit,
                    limit_max: SCAN_LIMIT_MAX,
                },
            ));
        }
        let request = Request::Scan(Scan {
            start: range.start.clone(),
            end: range.end.clone(),
            limit: options.limit,
            keys_only: options.keys_only,
            count_only: false,
        });
        let pages = self.scan_every_shard(&request).await?;
        Ok(merge_pages(range, pages, options.limit as usize))
    }

    /// How many live keys `range` holds, counted by every shard at its own revision.
    ///
    /// # Errors
    /// A bound is longer than a key, or a core does not answer.
    pub async fn count(&self, range: &KeyRange) -> Result<(u64, Vec<ShardRevision>)> {
        check_range(range)?;
        let request = Request::Scan(Scan {
            start: range.start.clone(),
            end: range.end.clone(),
            limit: 0,
            keys_only: true,
            count_only: true,
        });
        let pages = self.scan_every_shard(&request).await?;
        let count = pages.iter().map(|page| page.count).sum();
        Ok((count, pages.iter().map(shard_revision).collect()))
    }

    async fn scan_every_shard(&self, request: &Request) -> Result<Vec<ScanPage>> {
        let view = self.view();
        let calls = view.all_transports().map(|(_, transport)| async move {
            match transport.call(request).await? {
                Response::Scan(page) => Ok(page),
                Response::Error(reply) => Err(server_error(reply.code, reply.message)),
                other => Err(unexpected(&other)),
            }
        });
        join_all(calls).await.into_iter().collect()
    }
}

/// The smallest key that can follow `key`: `key` and a zero byte, or, for a key of the
/// largest size (which nothing extends), the first key past every key it is a prefix of.
/// `None` if no key can follow.
pub(crate) fn next_start(key: &[u8]) -> Option<Vec<u8>> {
    if key.len() < KEY_SIZE_MAX {
        Some(key_after(key))
    } else {
        prefix_end(key)
    }
}

fn check_range(range: &KeyRange) -> Result<()> {
    for bound in std::iter::once(range.start.as_slice()).chain(range.end.as_deref()) {
        if !bound.is_empty() {
            check_key(bound)?;
        }
    }
    Ok(())
}

fn shard_revision(page: &ScanPage) -> ShardRevision {
    ShardRevision {
        node_id: page.node_id,
        core_id: page.core_id,
        revision: page.revision,
    }
}

/// Merges every shard's page of `range` into the first `limit` keys and the range left.
fn merge_pages(range: &KeyRange, pages: Vec<ScanPage>, limit: usize) -> ScanResult {
    let revisions = pages.iter().map(shard_revision).collect();
    // Past the smallest key at which a shard with more keys stopped, that shard's keys are
    // missing from the merge: keep nothing beyond it.
    let cutoff = pages
        .iter()
        .filter(|page| page.more)
        .filter_map(|page| page.items.last().map(|item| item.key.clone()))
        .min();
    let mut more = pages.iter().any(|page| page.more);
    let mut items: Vec<ScanItem> = pages.into_iter().flat_map(|page| page.items).collect();
    // Each page is sorted and a key lives on one shard only.
    items.sort_unstable_by(|left, right| left.key.cmp(&right.key));
    if let Some(cutoff) = &cutoff {
        let kept = items.partition_point(|item| item.key <= *cutoff);
        items.truncate(kept);
    }
    if items.len() > limit {
        items.truncate(limit);
        more = true;
    }
    let continuation = match items.last() {
        Some(last) if more => next_start(&last.key).map(|start| KeyRange {
            start,
            end: range.end.clone(),
        }),
        _ => None,
    };
    ScanResult {
        items,
        revisions,
        continuation,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(core_id: u16, keys: &[&str], more: bool) -> ScanPage {
        ScanPage {
            node_id: 1,
            core_id,
            revision: u64::from(core_id) * 10,
            items: keys
                .iter()
                .map(|key| ScanItem {
                    key: key.as_bytes().to_vec(),
                    entry: None,
                })
                .collect(),
            count: keys.len() as u64,
            more,
        }
    }

    fn keys(result: &ScanResult) -> Vec<String> {
        result
            .items
            .iter()
            .map(|item| String::from_utf8(item.key.clone()).unwrap())
            .collect()
    }

    #[test]
    fn pages_merge_in_key_order_and_continue_after_the_last_key() {
        let range = KeyRange::prefix("k");
        let pages = vec![
            page(0, &["k1", "k4", "k5"], true),
            page(1, &["k2", "k3"], false),
        ];
        let result = merge_pages(&range, pages, 3);
        assert_eq!(keys(&result), ["k1", "k2", "k3"]);
        assert_eq!(
            result.continuation,
            Some(KeyRange {
                start: b"k3\0".to_vec(),
                end: Some(b"l".to_vec()),
            })
        );
        assert_eq!(result.revisions.len(), 2);
        assert_eq!(result.revisions[1].revision, 10);
    }

    /// A shard whose page ended early (its byte bound) holds keys past its last one that
    /// the others' pages may already pass: the merge stops at that shard's last key.
    #[test]
    fn a_short_page_with_more_cuts_the_merge() {
        let range = KeyRange::all();
        let pages = vec![
            page(0, &["b", "d"], true),
            page(1, &["a", "c", "e", "f"], true),
        ];
        let result = merge_pages(&range, pages, 4);
        assert_eq!(keys(&result), ["a", "b", "c", "d"]);
        assert_eq!(result.continuation.unwrap().start, b"d\0".to_vec());
    }

    #[test]
    fn a_longest_key_continues_at_the_next_prefix() {
        let longest = vec![b'k'; KEY_SIZE_MAX];
        let mut expected = vec![b'k'; KEY_SIZE_MAX - 1];
        expected.push(b'l');
        assert_eq!(next_start(&longest), Some(expected));
        assert_eq!(next_start(&vec![0xFF; KEY_SIZE_MAX]), None);
        assert_eq!(next_start(b"k"), Some(b"k\0".to_vec()));
    }

    #[test]
    fn a_range_read_to_its_end_has_no_continuation() {
        let range = KeyRange::all();
        let result = merge_pages(&range, vec![page(0, &["a"], false), page(1, &[], false)], 5);
        assert_eq!(keys(&result), ["a"]);
        assert_eq!(result.continuation, None);
    }

    #[test]
    fn prefix_ranges_end_after_the_prefix() {
        assert_eq!(KeyRange::prefix("ab").end, Some(b"ac".to_vec()));
        assert_eq!(KeyRange::prefix([0x61, 0xFF]).end, Some(vec![0x62]));
        assert_eq!(KeyRange::prefix([0xFF, 0xFF]).end, None);
        assert_eq!(KeyRange::prefix("").end, None);
    }
}
