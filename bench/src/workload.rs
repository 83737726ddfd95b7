//! What the load generator asks for: which operation, on which key, with which value.
//!
//! Keys are `prefix` + a zero-padded decimal index, so every key has the same size and any
//! target can be preloaded with exactly the keys the run will read. The index comes from a
//! uniform or a zipf distribution over the key space, drawn from a seeded PRNG per load
//! thread, so two runs with the same seed ask for the same keys in the same order.

use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};
use rand_distr::{Distribution, Zipf};

/// One operation the benchmark issues.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Op {
    /// Read a key.
    Get,
    /// Write a key.
    Set,
    /// Increment a counter key.
    Incr,
    /// Delete a key.
    Delete,
    /// Renew a batch of leases (`--workload lease-keepalive`): one call of the client
    /// library, not a keyed request, so only the lease workload issues it.
    Keepalive,
    /// Acquire a lock (`--workload lock`), from asking to holding it.
    Lock,
    /// Release a lock (`--workload lock`).
    Unlock,
    /// One lock and its unlock (`--workload lock`), from asking for the lock to the unlock's
    /// answer: the unit the lock workload counts.
    LockPair,
    /// One query (`--workload query`), from the call to the merged answer of every core.
    Query,
}

impl Op {
    /// Every operation, in report order.
    pub const ALL: [Op; 9] = [
        Op::Get,
        Op::Set,
        Op::Incr,
        Op::Delete,
        Op::Keepalive,
        Op::Lock,
        Op::Unlock,
        Op::LockPair,
        Op::Query,
    ];

    /// The name used in reports and JSON.
    pub fn name(self) -> &'static str {
        match self {
            Op::Get => "get",
            Op::Set => "set",
            Op::Incr => "incr",
            Op::Delete => "delete",
            Op::Keepalive => "keepalive",
            Op::Lock => "lock",
            Op::Unlock => "unlock",
            Op::LockPair => "pair",
            Op::Query => "query",
        }
    }

    /// Index into per-operation arrays.
    pub fn index(self) -> usize {
        match self {
            Op::Get => 0,
            Op::Set => 1,
            Op::Incr => 2,
            Op::Delete => 3,
            Op::Keepalive => 4,
            Op::Lock => 5,
            Op::Unlock => 6,
            Op::LockPair => 7,
            Op::Query => 8,
        }
    }
}

/// The operation mix of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WorkloadKind {
    /// Only reads.
    Get,
    /// Only writes.
    Set,
    /// Reads and writes in the `--ratio` proportion.
    Mixed,
    /// Only counter increments.
    Incr,
    /// Only deletes.
    Delete,
    /// Put-to-event latency: `--watchers` watches on the key prefix, and one writer putting
    /// keys under it at `--rate` (100 puts/s unless given), each value carrying its send time.
    #[value(name = "watch-latency")]
    #[serde(rename = "watch-latency")]
    WatchLatency,
    /// Events delivered per second: the SET load twice in one run, first with no watchers
    /// (the peer), then with `--watchers` watches on the prefix every key is written under.
    #[value(name = "watch-fanout")]
    #[serde(rename = "watch-fanout")]
    WatchFanout,
    /// Lease renewals per second: `--leases` leases granted up front, then renewed in calls
    /// of `--batch` ids from `--connections` tasks, each owning a slice of them (against
    /// Tessera the tasks share one client, against etcd each has its own).
    #[value(name = "lease-keepalive")]
    #[serde(rename = "lease-keepalive")]
    LeaseKeepalive,
    /// Lock acquire/release pairs per second: `--contenders` sessions, each with its own
    /// lease, lock and unlock in a loop, all on one lock name or each on its own
    /// (`--lock-names`).
    Lock,
    /// Queries per second and their latency: `--connections` sessions on the client library,
    /// each asking `--query-field = v` for a random `v` over every key (written with
    /// `--fields`), answered by an index or a scan (`--query-access`).
    Query,
}

impl WorkloadKind {
    /// Whether the keys should exist before the run starts. The fan-out's two windows then
    /// both overwrite, so neither pays for creating keys.
    pub fn wants_preload(self) -> bool {
        matches!(
            self,
            Self::Get | Self::Mixed | Self::Delete | Self::WatchFanout | Self::Query
        )
    }

    /// Whether the workload measures watches (and so needs the Tessera client library).
    pub fn is_watch(self) -> bool {
        matches!(self, Self::WatchLatency | Self::WatchFanout)
    }
}

/// How keys are picked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyDistribution {
    /// Every key equally likely.
    Uniform,
    /// A few hot keys (Zipf with exponent `--zipf-exponent`).
    Zipf,
}

/// Everything that decides the sequence of operations.
#[derive(Debug, Clone, serde::Serialize)]
pub struct WorkloadSpec {
    /// The operation mix.
    pub kind: WorkloadKind,
    /// Reads per `reads + writes` in a mixed workload, in `[0, 1]`.
    pub read_fraction: f64,
    /// Distinct keys.
    pub key_count: u64,
    /// Bytes per key (at least the prefix plus one digit per decimal digit of the largest
    /// index).
    pub key_size: usize,
    /// Bytes per value written.
    pub value_size: usize,
    /// How keys are picked.
    pub distribution: KeyDistribution,
    /// Zipf exponent (only for the zipf distribution).
    pub zipf_exponent: f64,
    /// Seed of the first load thread; thread `i` uses `seed + i`.
    pub seed: u64,
    /// Whether every write carries the indexed fields of [`FIELD_MODULI`].
    pub fields: bool,
}

/// The indexed fields a write carries with `--fields`: field `name` holds the key's index
/// modulo `modulus`, so an equality on it matches one key in `modulus`: 0.01%, 1% and 10%
/// of the keys.
pub const FIELD_MODULI: [(&str, u64); 3] = [("p10000", 10_000), ("p100", 100), ("p10", 10)];

/// The index a benchmark key was written for (its decimal digits after [`KEY_PREFIX`]).
pub fn key_index(key: &[u8]) -> u64 {
    key.get(KEY_PREFIX.len()..)
        .unwrap_or_default()
        .iter()
        .fold(0_u64, |index, digit| {
            index
                .wrapping_mul(10)
                .wrapping_add(u64::from(digit.wrapping_sub(b'0')))
        })
}

/// Prefix of every key the benchmark writes.
pub const KEY_PREFIX: &[u8] = b"key:";

impl WorkloadSpec {
    /// The smallest key size that holds every index of the key space.
    pub fn key_size_min(key_count: u64) -> usize {
        let largest = key_count.saturating_sub(1).max(1);
        KEY_PREFIX.len() + largest.ilog10() as usize + 1
    }

    /// Checks the settings against each other.
    ///
    /// # Errors
    /// A message naming the setting that is out of range.
    pub fn validate(&self) -> Result<(), String> {
        if self.key_count == 0 {
            return Err("--keys must be at least 1".to_owned());
        }
        let key_size_min = Self::key_size_min(self.key_count);
        if self.key_size < key_size_min {
            return Err(format!(
                "--key-size {} cannot hold {} distinct keys; it must be at least {key_size_min}",
                self.key_size, self.key_count
            ));
        }
        if !(0.0..=1.0).contains(&self.read_fraction) {
            return Err(format!(
                "read fraction {} is outside [0, 1]",
                self.read_fraction
            ));
        }
        if self.distribution == KeyDistribution::Zipf && self.zipf_exponent <= 0.0 {
            return Err(format!(
                "--zipf-exponent {} must be positive",
                self.zipf_exponent
            ));
        }
        Ok(())
    }

    /// Writes the key of `index` into `out` (cleared first): the prefix, then the index
    /// zero-padded to fill `key_size` bytes.
    pub fn write_key(&self, index: u64, out: &mut Vec<u8>) {
        out.clear();
        out.extend_from_slice(KEY_PREFIX);
        let digit_count = self.key_size - KEY_PREFIX.len();
        let start = out.len();
        out.resize(start + digit_count, b'0');
        let mut rest = index;
        for position in (start..start + digit_count).rev() {
            // The remainder of a division by 10 fits a byte.
            #[allow(clippy::cast_possible_truncation, reason = "a decimal digit")]
            let digit = (rest % 10) as u8;
            out[position] = b'0' + digit;
            rest /= 10;
            if rest == 0 {
                break;
            }
        }
        debug_assert_eq!(rest, 0, "index {index} does not fit {digit_count} digits");
    }

    /// The value every write stores: `value_size` bytes of a fixed pattern.
    pub fn value(&self) -> Vec<u8> {
        (0..self.value_size)
            .map(|position| b'a' + u8::try_from(position % 26).unwrap_or(0))
            .collect()
    }
}

/// A per-thread source of operations and key indices.
#[derive(Debug)]
pub struct OpStream {
    spec: WorkloadSpec,
    rng: SmallRng,
    zipf: Option<Zipf<f64>>,
}

impl OpStream {
    /// The stream of load thread `thread_index`.
    ///
    /// # Errors
    /// The zipf distribution cannot be built for these settings.
    pub fn new(spec: &WorkloadSpec, thread_index: u64) -> Result<Self, String> {
        let zipf = match spec.distribution {
            KeyDistribution::Uniform => None,
            // The key count fits an f64 exactly up to 2^53, far beyond any key space here.
            #[allow(clippy::cast_precision_loss, reason = "key counts are far below 2^53")]
            KeyDistribution::Zipf => Some(
                Zipf::new(spec.key_count as f64, spec.zipf_exponent)
                    .map_err(|error| format!("zipf distribution: {error}"))?,
            ),
        };
        Ok(Self {
            spec: spec.clone(),
            rng: SmallRng::seed_from_u64(spec.seed.wrapping_add(thread_index)),
            zipf,
        })
    }

    /// The next operation.
    pub fn next_op(&mut self) -> Op {
        match self.spec.kind {
            WorkloadKind::Get => Op::Get,
            // The watch workloads write: their events are what the watchers receive.
            WorkloadKind::Set | WorkloadKind::WatchLatency | WorkloadKind::WatchFanout => Op::Set,
            WorkloadKind::Incr => Op::Incr,
            WorkloadKind::Delete => Op::Delete,
            // The lease workload runs its own loop (`lease_load`) and draws no keys.
            WorkloadKind::LeaseKeepalive => Op::Keepalive,
            // So does the lock workload (`lock_load`).
            WorkloadKind::Lock => Op::Lock,
            // And the query workload (`query_load`).
            WorkloadKind::Query => Op::Query,
            WorkloadKind::Mixed => {
                if self.rng.random::<f64>() < self.spec.read_fraction {
                    Op::Get
                } else {
                    Op::Set
                }
            }
        }
    }

    /// The next key index, in `0..key_count`.
    pub fn next_key_index(&mut self) -> u64 {
        match &self.zipf {
            None => self.rng.random_range(0..self.spec.key_count),
            // Zipf samples are in [1, n]; rank 1 (the hottest) maps to index 0.
            #[allow(
                clippy::cast_possible_truncation,
                clippy::cast_sign_loss,
                reason = "samples are integers in [1, key_count]"
            )]
            Some(zipf) => (zipf.sample(&mut self.rng) as u64 - 1).min(self.spec.key_count - 1),
        }
    }
}

/// Which keys a thread asks for.
#[derive(Debug)]
pub enum KeyPlan {
    /// Operations and keys drawn from the workload's distribution.
    Random(OpStream),
    /// Every key index `start, start + step, ...` below `end`, once, as a set (the preload).
    Sequential {
        /// Next index.
        next: u64,
        /// Distance between indices.
        step: u64,
        /// First index not written.
        end: u64,
    },
}

impl KeyPlan {
    /// The next operation and key index; `None` once a sequential plan is done.
    pub fn next(&mut self) -> Option<(Op, u64)> {
        match self {
            KeyPlan::Random(stream) => Some((stream.next_op(), stream.next_key_index())),
            KeyPlan::Sequential { next, step, end } => {
                if *next >= *end {
                    return None;
                }
                let index = *next;
                *next += *step;
                Some((Op::Set, index))
            }
        }
    }
}

/// Parses a `reads:writes` ratio such as `9:1` into the fraction of reads.
///
/// # Errors
/// The text is not two non-negative numbers separated by `:`, or both are zero.
pub fn parse_ratio(text: &str) -> Result<f64, String> {
    let (reads, writes) = text
        .split_once(':')
        .ok_or_else(|| format!("ratio {text:?} is not reads:writes, such as 9:1"))?;
    let parse = |part: &str| {
        part.trim()
            .parse::<f64>()
            .ok()
            .filter(|value| value.is_finite() && *value >= 0.0)
            .ok_or_else(|| format!("ratio {text:?}: {part:?} is not a non-negative number"))
    };
    let (reads, writes) = (parse(reads)?, parse(writes)?);
    if reads + writes == 0.0 {
        return Err(format!("ratio {text:?} has no operations"));
    }
    Ok(reads / (reads + writes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(kind: WorkloadKind, distribution: KeyDistribution) -> WorkloadSpec {
        WorkloadSpec {
            kind,
            read_fraction: 0.9,
            key_count: 100_000,
            key_size: 16,
            value_size: 32,
            distribution,
            zipf_exponent: 0.99,
            seed: 7,
            fields: false,
        }
    }

    #[test]
    fn keys_have_the_same_size_and_are_distinct() {
        let spec = spec(WorkloadKind::Get, KeyDistribution::Uniform);
        let mut key = Vec::new();
        spec.write_key(0, &mut key);
        assert_eq!(key, b"key:000000000000");
        spec.write_key(99_999, &mut key);
        assert_eq!(key, b"key:000000099999");
        assert_eq!(key.len(), 16);
        assert_eq!(WorkloadSpec::key_size_min(100_000), 9);
        assert_eq!(WorkloadSpec::key_size_min(1), 5);
        let short = WorkloadSpec {
            key_size: 8,
            ..spec.clone()
        };
        assert!(short.validate().unwrap_err().contains("at least 9"));
        assert_eq!(spec.value().len(), 32);
    }

    #[test]
    fn ratios_parse_into_read_fractions() {
        assert!((parse_ratio("9:1").unwrap() - 0.9).abs() < 1e-12);
        assert!((parse_ratio("1:1").unwrap() - 0.5).abs() < 1e-12);
        assert!((parse_ratio("0:1").unwrap()).abs() < 1e-12);
        assert!(parse_ratio("0:0").is_err());
        assert!(parse_ratio("nine").is_err());
        assert!(parse_ratio("-1:2").is_err());
    }

    #[test]
    fn streams_are_reproducible_and_in_range() {
        for distribution in [KeyDistribution::Uniform, KeyDistribution::Zipf] {
            let spec = spec(WorkloadKind::Mixed, distribution);
            let mut first = OpStream::new(&spec, 0).unwrap();
            let mut second = OpStream::new(&spec, 0).unwrap();
            let mut reads = 0;
            for _ in 0..10_000 {
                let (op, index) = (first.next_op(), first.next_key_index());
                assert_eq!(op, second.next_op());
                assert_eq!(index, second.next_key_index());
                assert!(index < spec.key_count);
                reads += usize::from(op == Op::Get);
            }
            assert!((8_500..9_500).contains(&reads), "reads={reads}");
        }
    }

    #[test]
    fn zipf_makes_the_first_keys_hot() {
        let spec = spec(WorkloadKind::Get, KeyDistribution::Zipf);
        let mut stream = OpStream::new(&spec, 0).unwrap();
        let hot = (0..10_000)
            .filter(|_| stream.next_key_index() < 100)
            .count();
        // With s = 0.99 over 100k keys the first 100 draw about 40% of the samples.
        assert!(hot > 2_500, "hot={hot}");
    }
}
