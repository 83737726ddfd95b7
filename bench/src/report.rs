//! Latency histograms, the progress line and the final result (text or JSON).
//!
//! Every load thread records into its own [`Recorder`] (one hdrhistogram per operation, in
//! nanoseconds, three significant digits) and hands the reporter a copy of the last interval
//! now and then; the reporter merges them into one line per second. At the end the threads'
//! whole-run recorders are merged into the [`RunResult`], which carries the configuration and
//! the git revision so no figure travels without its context.

use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::workload::Op;

/// Longest latency a histogram holds, in nanoseconds (one minute); longer ones are clamped.
pub const LATENCY_NS_MAX: u64 = 60_000_000_000;

/// Latencies and errors of one operation.
#[derive(Debug, Clone)]
pub struct OpRecord {
    /// Latency of every successful and failed reply, in nanoseconds.
    pub histogram: Histogram<u64>,
    /// Replies that were errors.
    pub error_count: u64,
}

impl OpRecord {
    fn new() -> Self {
        Self {
            // Bounds 1 ns..=60 s with 3 significant digits are valid hdrhistogram arguments.
            histogram: Histogram::new_with_bounds(1, LATENCY_NS_MAX, 3)
                .unwrap_or_else(|_| unreachable!("constant histogram bounds are valid")),
            error_count: 0,
        }
    }

    /// Replies recorded, errors included.
    pub fn count(&self) -> u64 {
        self.histogram.len()
    }
}

/// One thread's (or the merged) record of every operation.
#[derive(Debug, Clone)]
pub struct Recorder {
    /// One record per [`Op::ALL`] entry, made when the operation is first recorded or merged
    /// in: a histogram holds about 220 KiB of counts, and a workload issues a few of the
    /// operations, so a session's records (and the copies it sends the progress reporter)
    /// hold only what it uses.
    ops: Vec<Option<OpRecord>>,
}

/// The record of an operation that was never recorded.
fn empty_record() -> &'static OpRecord {
    static EMPTY: std::sync::OnceLock<OpRecord> = std::sync::OnceLock::new();
    EMPTY.get_or_init(OpRecord::new)
}

impl Default for Recorder {
    fn default() -> Self {
        Self::new()
    }
}

impl Recorder {
    /// An empty record.
    pub fn new() -> Self {
        Self {
            ops: Op::ALL.iter().map(|_| None).collect(),
        }
    }

    /// Records one reply that took `latency`.
    pub fn record(&mut self, op: Op, latency: Duration, is_error: bool) {
        let record = self.ops[op.index()].get_or_insert_with(OpRecord::new);
        let latency_ns = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
        record
            .histogram
            .saturating_record(latency_ns.clamp(1, LATENCY_NS_MAX));
        record.error_count += u64::from(is_error);
    }

    /// Adds everything `other` recorded.
    pub fn merge(&mut self, other: &Recorder) {
        for (mine, theirs) in self.ops.iter_mut().zip(&other.ops) {
            let Some(theirs) = theirs else { continue };
            let mine = mine.get_or_insert_with(OpRecord::new);
            // Histograms with the same bounds always merge.
            let _ = mine.histogram.add(&theirs.histogram);
            mine.error_count += theirs.error_count;
        }
    }

    /// Empties the record, keeping its allocations.
    pub fn reset(&mut self) {
        for record in self.ops.iter_mut().flatten() {
            record.histogram.reset();
            record.error_count = 0;
        }
    }

    /// Makes the record of every operation in `ops` now and touches its memory, so that
    /// the first replies of a measured window pay for neither.
    pub fn prepare(&mut self, ops: &[Op]) {
        for &op in ops {
            let record = self.ops[op.index()].get_or_insert_with(OpRecord::new);
            record.histogram.reset();
        }
    }

    /// The record of one operation.
    pub fn op(&self, op: Op) -> &OpRecord {
        self.ops[op.index()]
            .as_ref()
            .unwrap_or_else(|| empty_record())
    }

    /// Replies recorded across all operations.
    pub fn count(&self) -> u64 {
        self.ops.iter().flatten().map(OpRecord::count).sum()
    }

    /// Error replies across all operations.
    pub fn error_count(&self) -> u64 {
        self.ops
            .iter()
            .flatten()
            .map(|record| record.error_count)
            .sum()
    }

    /// All operations' latencies in one histogram.
    pub fn combined(&self) -> Histogram<u64> {
        let mut combined = OpRecord::new().histogram;
        for record in self.ops.iter().flatten() {
            let _ = combined.add(&record.histogram);
        }
        combined
    }
}

/// Percentiles and throughput of one operation (or of all of them).
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// Replies received within the measured window.
    pub operations: u64,
    /// Replies per second over the measured window.
    pub ops_per_sec: f64,
    /// Error replies.
    pub errors: u64,
    /// Median latency.
    pub p50_us: f64,
    /// 90th percentile latency.
    pub p90_us: f64,
    /// 99th percentile latency.
    pub p99_us: f64,
    /// 99.9th percentile latency.
    pub p999_us: f64,
    /// Largest latency.
    pub max_us: f64,
    /// Mean latency.
    pub mean_us: f64,
}

impl Summary {
    /// Summarises `histogram` over `elapsed`.
    pub fn of(histogram: &Histogram<u64>, errors: u64, elapsed: Duration) -> Self {
        let operations = histogram.len();
        let microseconds = |nanoseconds: u64| nanoseconds as f64 / 1_000.0;
        let percentile = |quantile: f64| {
            if operations == 0 {
                0.0
            } else {
                microseconds(histogram.value_at_quantile(quantile))
            }
        };
        Self {
            operations,
            ops_per_sec: per_second(operations, elapsed),
            errors,
            p50_us: percentile(0.50),
            p90_us: percentile(0.90),
            p99_us: percentile(0.99),
            p999_us: percentile(0.999),
            max_us: if operations == 0 {
                0.0
            } else {
                microseconds(histogram.max())
            },
            mean_us: if operations == 0 {
                0.0
            } else {
                histogram.mean() / 1_000.0
            },
        }
    }
}

/// `count / elapsed` in events per second; 0 for an empty window.
#[allow(clippy::cast_precision_loss, reason = "counts far below 2^53")]
pub fn per_second(count: u64, elapsed: Duration) -> f64 {
    let seconds = elapsed.as_secs_f64();
    if seconds <= 0.0 {
        0.0
    } else {
        count as f64 / seconds
    }
}

/// CPU time a process spent during the measured window.
#[derive(Debug, Clone, Serialize)]
pub struct CpuUsage {
    /// The processes measured.
    pub pids: Vec<u32>,
    /// CPU time (user + system, all threads) during the window, in milliseconds.
    pub cpu_ms: f64,
    /// CPU time per reply, in microseconds.
    pub us_per_op: f64,
    /// Average cores busy during the window.
    pub cores_busy: f64,
}

impl CpuUsage {
    /// The usage of `pids`, which spent `cpu` while `operations` replies arrived in `elapsed`.
    #[allow(clippy::cast_precision_loss, reason = "counts far below 2^53")]
    pub fn new(pids: Vec<u32>, cpu: Duration, operations: u64, elapsed: Duration) -> Self {
        let cpu_us = cpu.as_secs_f64() * 1e6;
        Self {
            pids,
            cpu_ms: cpu_us / 1_000.0,
            us_per_op: if operations == 0 {
                0.0
            } else {
                cpu_us / operations as f64
            },
            cores_busy: if elapsed.is_zero() {
                0.0
            } else {
                cpu.as_secs_f64() / elapsed.as_secs_f64()
            },
        }
    }
}

/// The machine the run happened on.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    /// Online CPUs.
    pub cpus: usize,
    /// `uname -r`.
    pub kernel: String,
    /// The CPU model, from /proc/cpuinfo.
    pub cpu_model: String,
}

impl Machine {
    /// Reads the machine's description (best effort: unknown fields are empty).
    pub fn describe() -> Self {
        // Online CPUs, not this process's affinity (the benchmark is often pinned to one).
        // SAFETY: sysconf has no memory-safety preconditions.
        let online = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
        let cpus = usize::try_from(online).unwrap_or(0);
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|text| text.trim().to_owned())
            .unwrap_or_default();
        let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|text| {
                text.lines()
                    .find(|line| line.starts_with("model name"))
                    .and_then(|line| line.split_once(':'))
                    .map(|(_, model)| model.trim().to_owned())
            })
            .unwrap_or_default();
        Self {
            cpus,
            kernel,
            cpu_model,
        }
    }
}

/// Everything a run produced: the figures and their context.
#[derive(Debug, Clone, Serialize)]
pub struct RunResult {
    /// What was driven: `tessera`, `embedded`, `redis` or `echo`.
    pub target: String,
    /// The settings of the run.
    pub config: serde_json::Value,
    /// The benchmark's own git revision.
    pub git_revision: &'static str,
    /// Where it ran.
    pub machine: Machine,
    /// Length of the measured window, in seconds.
    pub duration_secs: f64,
    /// All operations together (the fields scripts read).
    #[serde(flatten)]
    pub total: Summary,
    /// Each operation that occurred.
    pub ops: std::collections::BTreeMap<&'static str, Summary>,
    /// CPU time of the server processes, when they run on this host.
    pub server_cpu: Option<CpuUsage>,
    /// Server CPU per reply (a copy of `server_cpu.us_per_op`, for scripts).
    pub server_cpu_us_per_op: Option<f64>,
    /// CPU time of the benchmark process itself.
    pub client_cpu: CpuUsage,
    /// Keys written before the measured window, and how long that took.
    pub preload: Option<Preload>,
    /// What the watchers received (`--workload watch-latency` and `watch-fanout` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub watch: Option<WatchReport>,
    /// The leases and their keepalive calls (`--workload lease-keepalive` only), beside the
    /// other top-level fields for scripts.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub lease: Option<LeaseReport>,
    /// The contenders and what the checks found (`--workload lock` only), beside the other
    /// top-level fields for scripts.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub lock: Option<LockReport>,
    /// The window without a build and the build's timing (`--index-build` only); the
    /// top-level figures are the window during the build.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub index_build: Option<IndexBuildReport>,
    /// What the queries found (`--workload query` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub query: Option<crate::query_load::QueryReport>,
}

/// What `--index-build` measured beside the window during the build.
#[derive(Debug, Clone, Serialize)]
pub struct IndexBuildReport {
    /// The same load with no build.
    pub idle: Summary,
    /// The index and how long every core took to build it.
    #[serde(flatten)]
    pub timing: crate::index_setup::BuildTiming,
    /// Whether the build ended inside the measured window.
    pub finished_within_window: bool,
    /// p99 during the build over p99 without.
    pub p99_ratio: f64,
    /// p50 during the build over p50 without.
    pub p50_ratio: f64,
}

/// What `--workload lock` did. Its result counts completed lock/unlock pairs as the
/// operations (`operations`, `ops_per_sec`, CPU `us_per_op` per pair) at the latency of the
/// pair (`p50_us` and so on; the `pair` row of `ops`), beside the acquire latency (the `lock`
/// row, and `acquire_p50_us`/`acquire_p99_us` here); `errors` are failed calls.
#[derive(Debug, Clone, Serialize)]
pub struct LockReport {
    /// Sessions, each with its own lease, locking in a loop.
    pub contenders: usize,
    /// `one` (every session on one lock) or `per-session` (each on its own).
    pub lock_names: &'static str,
    /// Distinct lock names.
    pub locks: usize,
    /// Longest one lock call waits in line, in seconds.
    pub lock_wait_secs: f64,
    /// TTL of every session's lease (renewed in the background), in seconds.
    pub lease_ttl_secs: f64,
    /// Time granting the leases (and, for etcd, opening the clients) took, in seconds.
    pub setup_duration_secs: f64,
    /// Pairs completed within the window (the run's `operations`).
    pub pairs: u64,
    /// Median time from asking for the lock to holding it.
    pub acquire_p50_us: f64,
    /// 99th percentile of the same.
    pub acquire_p99_us: f64,
    /// Largest of the same.
    pub acquire_max_us: f64,
    /// Lock calls whose wait ended without the lock.
    pub lock_timeouts: u64,
    /// Unlocks the target refused (the grant was no longer the holder's).
    pub unlocks_refused: u64,
    /// Grants that arrived while another session held the lock; must be 0.
    pub overlaps: u64,
    /// Grants whose fencing token did not exceed every earlier token of its lock; must be 0.
    pub token_violations: u64,
    /// Pairs that ended after the window: checked, not counted.
    pub drained_pairs: u64,
    /// Lease revocations after the window that failed.
    pub close_errors: usize,
}

/// What `--workload lease-keepalive` renewed. Its result counts renewed lease ids as the
/// operations (`operations`, `ops_per_sec`, and CPU `us_per_op` per renewed lease), while
/// the latencies (`p50_us` and so on, and the `keepalive` row of `ops`) are per keepalive
/// call and `errors` are failed calls.
#[derive(Debug, Clone, Serialize)]
pub struct LeaseReport {
    /// Leases granted before the measured window.
    pub leases: usize,
    /// Lease ids per keepalive call: `--batch`, or a session's whole slice of the leases
    /// when that is smaller.
    pub batch: usize,
    /// TTL of every lease, in seconds.
    pub lease_ttl_secs: f64,
    /// Time granting the leases (and, for etcd, opening their streams) took, in seconds.
    pub grant_duration_secs: f64,
    /// Keepalive calls answered within the window, failed ones included.
    pub keepalive_calls: u64,
    /// `keepalive_calls` per second of the window.
    pub keepalive_calls_per_sec: f64,
    /// Lease ids renewed within the window (the run's `operations`).
    pub leases_renewed: u64,
    /// Leases a call found ended (expired or revoked); each is counted once and dropped.
    pub leases_lost: u64,
    /// Revocations after the window that failed.
    pub revoke_errors: usize,
}

/// What the watchers of a watch workload received during the measured window.
#[derive(Debug, Clone, Serialize)]
pub struct WatchReport {
    /// Watches open during the window.
    pub watchers: usize,
    /// The key prefix they watched (every key the workload writes is under it).
    pub prefix: String,
    /// Clients the watches were spread over, each with one connection per core.
    pub clients: usize,
    /// Watchers the server's cores held once every watch was open (a prefix is watched on
    /// every core: one per watch and core).
    pub server_watcher_count: u64,
    /// Watchers the cores held at the end of the window.
    pub server_watcher_count_end: u64,
    /// Events received by all watchers together.
    pub events: u64,
    /// `events` per second of the measured window.
    pub events_per_sec: f64,
    /// Fewest events one watcher received.
    pub events_per_watcher_min: u64,
    /// Most events one watcher received.
    pub events_per_watcher_max: u64,
    /// `watch-latency`: every acknowledged put once per watcher. Events still missing
    /// [`crate::watch_load::DRAIN_TIMEOUT`] after the writer stopped are not counted.
    pub events_expected: Option<u64>,
    /// `watch-latency`: from just before a put was sent to a watcher's task receiving its
    /// event, over every event of every watcher (`ops_per_sec` is events per second).
    pub latency: Option<Summary>,
    /// Watches cancelled as lagging (by the server's queue bound or the client's buffer);
    /// each was opened again from the current revision, so it skipped events.
    pub lagged_count: u64,
    /// Watches that failed to open or ended with another error (each opened again).
    pub error_count: u64,
    /// `watch-fanout`: the same point load with no watchers, measured first in the same run.
    pub peer: Option<PeerWindow>,
}

/// The fan-out's peer: the same point load with no watchers, against the same server.
#[derive(Debug, Clone, Serialize)]
pub struct PeerWindow {
    /// Watches open during this window (none).
    pub watchers: usize,
    /// Length of the window, in seconds.
    pub duration_secs: f64,
    /// All its operations together.
    #[serde(flatten)]
    pub total: Summary,
    /// Server CPU per reply, when measurable.
    pub server_cpu_us_per_op: Option<f64>,
    /// CPU of this process per reply.
    pub client_cpu_us_per_op: f64,
    /// Operations per second with the watchers over those of this window.
    pub watched_ops_per_sec_ratio: f64,
}

/// The preload phase.
#[derive(Debug, Clone, Serialize)]
pub struct Preload {
    /// Keys written.
    pub keys: u64,
    /// Time it took, in seconds.
    pub duration_secs: f64,
    /// Error replies (the run is refused if any).
    pub errors: u64,
}

/// The git revision this benchmark was built from.
pub const GIT_REVISION: &str = env!("TESSERA_GIT_REVISION");

impl RunResult {
    /// Builds the result of a run from the merged record.
    pub fn new(
        target: &str,
        config: serde_json::Value,
        record: &Recorder,
        elapsed: Duration,
        server_cpu: Option<CpuUsage>,
        client_cpu: CpuUsage,
        preload: Option<Preload>,
    ) -> Self {
        let ops = Op::ALL
            .iter()
            .map(|&op| (op.name(), record.op(op)))
            .filter(|(_, op_record)| op_record.count() > 0)
            .map(|(name, op_record)| {
                let summary = Summary::of(&op_record.histogram, op_record.error_count, elapsed);
                (name, summary)
            })
            .collect();
        Self {
            target: target.to_owned(),
            config,
            git_revision: GIT_REVISION,
            machine: Machine::describe(),
            duration_secs: elapsed.as_secs_f64(),
            total: Summary::of(&record.combined(), record.error_count(), elapsed),
            ops,
            server_cpu_us_per_op: server_cpu.as_ref().map(|usage| usage.us_per_op),
            server_cpu,
            client_cpu,
            preload,
            watch: None,
            lease: None,
            lock: None,
            index_build: None,
            query: None,
        }
    }

    /// Makes this the result of a lock run: completed pairs (`pair`, their summary) become
    /// the operations; the errors stay those of every call.
    pub fn set_lock(&mut self, lock: LockReport, pair: &Summary) {
        self.total = Summary {
            errors: self.total.errors,
            ..pair.clone()
        };
        self.lock = Some(lock);
    }

    /// Makes this the result of a lease run: renewed lease ids become the operations.
    pub fn set_lease(&mut self, lease: LeaseReport) {
        self.total.operations = lease.leases_renewed;
        self.total.ops_per_sec = per_second(
            lease.leases_renewed,
            Duration::from_secs_f64(self.duration_secs),
        );
        self.lease = Some(lease);
    }

    /// The query and index-build lines of [`RunResult::to_text`].
    fn write_index_text(&self, text: &mut String) {
        use std::fmt::Write as _;
        if let Some(query) = &self.query {
            let _ = writeln!(
                text,
                "query {} = v ({}% of the keys) by {}: {:.0} examined and {:.1} matched per \
                 query{}; wrong answers {}",
                query.field,
                query.selectivity_pct,
                query.access,
                query.examined_per_query,
                query.matches_per_query,
                if query.count_only { " (counts)" } else { "" },
                query.wrong_answers
            );
        }
        if let Some(build) = &self.index_build {
            let _ = writeln!(
                text,
                "index {} built in {:.2} s{}; p99 during the build / idle: {:.2}x, p50: {:.2}x",
                build.timing.index,
                build.timing.build_secs,
                if build.finished_within_window {
                    ""
                } else {
                    " (after the window ended)"
                },
                build.p99_ratio,
                build.p50_ratio
            );
        }
    }

    /// The human-readable summary: one line per operation, then CPU and context.
    pub fn to_text(&self) -> String {
        use std::fmt::Write as _;
        let mut text = String::new();
        let _ = writeln!(
            text,
            "{:<8} {:>12} {:>12} {:>8} {:>9} {:>9} {:>9} {:>9} {:>9}",
            "op", "ops", "ops/s", "errors", "p50 µs", "p90 µs", "p99 µs", "p99.9 µs", "max µs"
        );
        let mut line = |name: &str, summary: &Summary| {
            let _ = writeln!(
                text,
                "{name:<8} {:>12} {:>12.0} {:>8} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1}",
                summary.operations,
                summary.ops_per_sec,
                summary.errors,
                summary.p50_us,
                summary.p90_us,
                summary.p99_us,
                summary.p999_us,
                summary.max_us
            );
        };
        for (name, summary) in &self.ops {
            line(name, summary);
        }
        // A lease run's total counts renewed leases, at the latency of their calls; a lock
        // run's counts pairs.
        let total_name = if self.lease.is_some() {
            "leases"
        } else if self.lock.is_some() {
            "pairs"
        } else {
            "all"
        };
        line(total_name, &self.total);
        if let Some(build) = &self.index_build {
            line("idle", &build.idle);
        }
        if let Some(watch) = &self.watch {
            if let Some(latency) = &watch.latency {
                line("event", latency);
            }
            if let Some(peer) = &watch.peer {
                line("peer", &peer.total);
            }
        }
        self.write_index_text(&mut text);
        if let Some(server) = &self.server_cpu {
            let _ = writeln!(
                text,
                "server cpu: {:.2} µs/op, {:.2} cores busy (pids {:?})",
                server.us_per_op, server.cores_busy, server.pids
            );
        }
        let _ = writeln!(
            text,
            "client cpu: {:.2} µs/op, {:.2} cores busy",
            self.client_cpu.us_per_op, self.client_cpu.cores_busy
        );
        if let Some(watch) = &self.watch {
            watch.write_text(&mut text);
        }
        if let Some(lease) = &self.lease {
            let _ = writeln!(
                text,
                "leases: {} of ttl {:.0} s (granted in {:.2} s), {} per call: {:.0} renewed/s in \
                 {:.0} calls/s; lost {}, failed calls {}, failed revocations {}",
                lease.leases,
                lease.lease_ttl_secs,
                lease.grant_duration_secs,
                lease.batch,
                self.total.ops_per_sec,
                lease.keepalive_calls_per_sec,
                lease.leases_lost,
                self.total.errors,
                lease.revoke_errors
            );
        }
        if let Some(lock) = &self.lock {
            lock.write_text(&self.total, &mut text);
        }
        let _ = writeln!(
            text,
            "target {} over {:.1} s; tessera-bench {}; {} cpus, kernel {}",
            self.target,
            self.duration_secs,
            self.git_revision,
            self.machine.cpus,
            self.machine.kernel
        );
        text
    }
}

impl LockReport {
    /// The lock line of the text summary, for a run whose pairs are `total`.
    fn write_text(&self, total: &Summary, text: &mut String) {
        use std::fmt::Write as _;
        let _ = writeln!(
            text,
            "locks: {} contenders on {} lock(s) ({}), leases of ttl {:.0} s (opened in {:.2} \
             s): {:.0} pairs/s, acquire p50 {:.1} µs p99 {:.1} µs; overlaps {}, token \
             violations {}, timeouts {}, refused unlocks {}, failed calls {}, failed \
             revocations {}, {} pairs after the window",
            self.contenders,
            self.locks,
            self.lock_names,
            self.lease_ttl_secs,
            self.setup_duration_secs,
            total.ops_per_sec,
            self.acquire_p50_us,
            self.acquire_p99_us,
            self.overlaps,
            self.token_violations,
            self.lock_timeouts,
            self.unlocks_refused,
            total.errors,
            self.close_errors,
            self.drained_pairs
        );
    }
}

impl WatchReport {
    /// The watch lines of the text summary: the event row is in the table above.
    fn write_text(&self, text: &mut String) {
        use std::fmt::Write as _;
        let expected = self
            .events_expected
            .map(|expected| format!(" of {expected} expected"))
            .unwrap_or_default();
        let _ = writeln!(
            text,
            "watch: {} watchers on {:?} over {} clients ({} server watchers, {} at the end): \
             {} events{expected}, {:.0} events/s, {}-{} per watcher; lagged {}, errors {}",
            self.watchers,
            self.prefix,
            self.clients,
            self.server_watcher_count,
            self.server_watcher_count_end,
            self.events,
            self.events_per_sec,
            self.events_per_watcher_min,
            self.events_per_watcher_max,
            self.lagged_count,
            self.error_count
        );
        if let Some(peer) = &self.peer {
            let cpu =
                |cpu: Option<f64>| cpu.map_or_else(|| "-".to_owned(), |cpu| format!("{cpu:.2}"));
            let _ = writeln!(
                text,
                "peer (row `peer`): {} watchers, {:.0} ops/s, server cpu {} µs/op, client cpu \
                 {:.2} µs/op; with the watchers {:.2}x its ops/s",
                peer.watchers,
                peer.total.ops_per_sec,
                cpu(peer.server_cpu_us_per_op),
                peer.client_cpu_us_per_op,
                peer.watched_ops_per_sec_ratio
            );
        }
    }
}

/// Formats one progress line: the last interval and the run so far.
pub fn progress_line(
    elapsed: Duration,
    interval: &Recorder,
    interval_length: Duration,
    total_count: u64,
) -> String {
    let combined = interval.combined();
    let summary = Summary::of(&combined, interval.error_count(), interval_length);
    format!(
        "[{:>5.1}s] {:>10.0} ops/s (overall {:>10.0})  p50 {:>8.1} µs  p99 {:>8.1} µs  errors {}",
        elapsed.as_secs_f64(),
        summary.ops_per_sec,
        per_second(total_count, elapsed),
        summary.p50_us,
        summary.p99_us,
        summary.errors
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summaries_carry_percentiles_and_rates() {
        let mut recorder = Recorder::new();
        for latency_us in 1..=1_000_u64 {
            recorder.record(Op::Get, Duration::from_micros(latency_us), latency_us > 990);
        }
        recorder.record(Op::Set, Duration::from_micros(5), false);
        let result = RunResult::new(
            "test",
            serde_json::json!({}),
            &recorder,
            Duration::from_secs(2),
            None,
            CpuUsage::new(
                vec![1],
                Duration::from_millis(10),
                1_001,
                Duration::from_secs(2),
            ),
            None,
        );
        assert_eq!(result.total.operations, 1_001);
        assert!((result.total.ops_per_sec - 500.5).abs() < 1e-9);
        assert_eq!(result.total.errors, 10);
        let get = &result.ops["get"];
        assert!((get.p50_us - 500.0).abs() < 1.0, "{get:?}");
        assert!((get.p99_us - 990.0).abs() < 1.0, "{get:?}");
        let json = serde_json::to_value(&result).unwrap();
        for field in [
            "ops_per_sec",
            "p50_us",
            "p99_us",
            "p999_us",
            "errors",
            "git_revision",
        ] {
            assert!(json.get(field).is_some(), "missing {field}: {json}");
        }
        assert!(result.to_text().contains("get"));
    }

    #[test]
    fn lease_results_count_renewed_leases_beside_calls() {
        let mut recorder = Recorder::new();
        for _ in 0..10 {
            recorder.record(Op::Keepalive, Duration::from_millis(2), false);
        }
        let client_cpu = CpuUsage::new(vec![1], Duration::ZERO, 0, Duration::from_secs(2));
        let mut result = RunResult::new(
            "test",
            serde_json::json!({}),
            &recorder,
            Duration::from_secs(2),
            None,
            client_cpu,
            None,
        );
        result.set_lease(LeaseReport {
            leases: 1_000,
            batch: 100,
            lease_ttl_secs: 60.0,
            grant_duration_secs: 0.1,
            keepalive_calls: 10,
            keepalive_calls_per_sec: 5.0,
            leases_renewed: 1_000,
            leases_lost: 0,
            revoke_errors: 0,
        });
        let json = serde_json::to_value(&result).unwrap();
        assert_eq!(json["operations"], 1_000);
        assert_eq!(json["ops_per_sec"], 500.0);
        assert_eq!(json["keepalive_calls_per_sec"], 5.0);
        assert_eq!(json["leases"], 1_000);
        assert_eq!(json["batch"], 100);
        assert_eq!(json["ops"]["keepalive"]["operations"], 10);
        assert!(
            (json["p50_us"].as_f64().unwrap() - 2_000.0).abs() < 2.0,
            "{json}"
        );
        let text = result.to_text();
        assert!(text.contains("500 renewed/s in 5 calls/s"), "{text}");
    }

    #[test]
    fn lock_results_count_pairs_beside_the_acquire_latency() {
        let mut recorder = Recorder::new();
        for _ in 0..100 {
            recorder.record(Op::Lock, Duration::from_micros(100), false);
            recorder.record(Op::Unlock, Duration::from_micros(50), false);
            recorder.record(Op::LockPair, Duration::from_micros(150), false);
        }
        recorder.record(Op::Unlock, Duration::from_micros(50), true);
        let client_cpu = CpuUsage::new(vec![1], Duration::ZERO, 0, Duration::from_secs(2));
        let mut result = RunResult::new(
            "test",
            serde_json::json!({}),
            &recorder,
            Duration::from_secs(2),
            None,
            client_cpu,
            None,
        );
        let pair = Summary::of(
            &recorder.op(Op::LockPair).histogram,
            0,
            Duration::from_secs(2),
        );
        let acquire = Summary::of(&recorder.op(Op::Lock).histogram, 0, Duration::from_secs(2));
        result.set_lock(
            LockReport {
                contenders: 50,
                lock_names: "one",
                locks: 1,
                lock_wait_secs: 10.0,
                lease_ttl_secs: 60.0,
                setup_duration_secs: 0.01,
                pairs: pair.operations,
                acquire_p50_us: acquire.p50_us,
                acquire_p99_us: acquire.p99_us,
                acquire_max_us: acquire.max_us,
                lock_timeouts: 0,
                unlocks_refused: 1,
                overlaps: 0,
                token_violations: 0,
                drained_pairs: 49,
                close_errors: 0,
            },
            &pair,
        );
        let json = serde_json::to_value(&result).unwrap();
        assert_eq!(json["operations"], 100);
        assert_eq!(json["ops_per_sec"], 50.0);
        assert_eq!(json["errors"], 1, "every failed call");
        assert_eq!(json["contenders"], 50);
        assert_eq!(json["overlaps"], 0);
        assert_eq!(json["token_violations"], 0);
        assert_eq!(json["lock_names"], "one");
        assert!((json["acquire_p50_us"].as_f64().unwrap() - 100.0).abs() < 0.1);
        assert!(
            (json["p50_us"].as_f64().unwrap() - 150.0).abs() < 0.2,
            "{json}"
        );
        assert_eq!(json["ops"]["unlock"]["operations"], 101);
        let text = result.to_text();
        assert!(text.contains("50 contenders on 1 lock(s) (one)"), "{text}");
        assert!(text.contains("\npairs "), "{text}");
    }

    #[test]
    fn merging_adds_counts() {
        let mut first = Recorder::new();
        let mut second = Recorder::new();
        first.record(Op::Get, Duration::from_micros(10), false);
        second.record(Op::Get, Duration::from_micros(20), true);
        first.merge(&second);
        assert_eq!(first.count(), 2);
        assert_eq!(first.error_count(), 1);
        first.reset();
        assert_eq!(first.count(), 0);
    }
}
