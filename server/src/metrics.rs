//! What a core counts about itself for the admin endpoint's `/metrics`, and how a scrape of
//! every core becomes the Prometheus (`OpenMetrics`) text format.
//!
//! Every counter lives in its core's own state as plain integers ([`CoreMetrics`] in a
//! `RefCell` of the `CoreContext`, the shard's and the log's stats): the hot path touches no
//! shared atomic and takes no lock. A scrape asks each core through its inbox for a
//! [`CoreSnapshot`] (plain data, sent back to the admin thread), and [`encode`] writes the
//! snapshots with `prometheus-client`, never by hand.
//!
//! Latency is measured cheaply: the connection task reads the clock at the start and end of
//! each pass over its ready connections and attributes the pass's time to every request
//! answered in it; a request answered later (a forward, a lock wait, a lease check) is timed
//! from its pass to the moment its reply reaches the connection task.
//!
//! **Invariant:** every array here has a fixed size (operations × buckets, operations ×
//! error codes); counting allocates nothing and never grows.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};
use tessera_protocol::message::{ArchivedRequest, ArchivedResponse};
use tessera_protocol::{codec, ErrorCode, Response};

use crate::core::Reply;
use crate::durability::log::LogStats;

/// Buckets of a request latency histogram: up to 2^i µs for i in 0..21 (1 µs to about 1 s).
pub const LATENCY_BUCKET_COUNT: usize = 21;
/// Buckets of the expiry lag histogram: up to 2^i ms for i in 0..17 (1 ms to about 65 s).
pub const EXPIRY_LAG_BUCKET_COUNT: usize = 17;
/// Buckets of the records-per-sync histogram: up to 2^i records for i in 0..17.
pub const SYNC_RECORD_BUCKET_COUNT: usize = 17;
/// Buckets of the bytes-per-sync histogram: up to 2^i bytes for i in 0..27 (1 B to 64 MiB).
pub const SYNC_BYTE_BUCKET_COUNT: usize = 27;

/// A histogram with fixed, doubling upper bounds: bucket `i` counts values up to `2^i` (and
/// above the bound of the one before). Values above the last bound are only in `count` and
/// `sum` (the `+Inf` bucket).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Histogram<const N: usize> {
    buckets: [u64; N],
    count: u64,
    sum: u64,
}

impl<const N: usize> Default for Histogram<N> {
    fn default() -> Self {
        Self {
            buckets: [0; N],
            count: 0,
            sum: 0,
        }
    }
}

impl<const N: usize> Histogram<N> {
    /// Counts one `value`.
    pub fn record(&mut self, value: u64) {
        self.record_times(value, 1);
    }

    /// Counts `value` `times` times (a batch's service time, once per request in it).
    pub fn record_times(&mut self, value: u64, times: u64) {
        let index = bucket_index(value);
        if let Some(bucket) = self.buckets.get_mut(index) {
            *bucket += times;
        }
        self.count += times;
        self.sum = self.sum.saturating_add(value.saturating_mul(times));
    }

    /// Values counted.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Sum of the values counted (saturating).
    pub fn sum(&self) -> u64 {
        self.sum
    }

    /// Values per bucket, not cumulative; bucket `i` holds values up to `2^i`.
    pub fn buckets(&self) -> &[u64; N] {
        &self.buckets
    }

    /// The buckets as the encoder takes them: `(upper bound × scale, count in the bucket)`,
    /// then `(f64::MAX, count above the last bound)`, which it writes as `+Inf`; it sums
    /// them into Prometheus' cumulative counts itself.
    fn encoder_buckets(&self, scale: f64) -> Vec<(f64, u64)> {
        let mut buckets: Vec<(f64, u64)> = Vec::with_capacity(N + 1);
        let mut bounded = 0;
        for (index, &count) in self.buckets.iter().enumerate() {
            bounded += count;
            buckets.push((upper_bound(index) * scale, count));
        }
        buckets.push((f64::MAX, self.count - bounded));
        buckets
    }
}

/// The bucket of `value`: the smallest `i` with `value <= 2^i`.
fn bucket_index(value: u64) -> usize {
    (u64::BITS - value.saturating_sub(1).leading_zeros()) as usize
}

#[allow(
    clippy::cast_precision_loss,
    reason = "bounds are powers of two below 2^64, exact in f64"
)]
fn upper_bound(index: usize) -> f64 {
    (1_u64 << index.min(63)) as f64
}

/// A request latency histogram, in µs.
pub type LatencyHistogram = Histogram<LATENCY_BUCKET_COUNT>;

/// What a client asked for, as counted: one per request variant, plus frames that were no
/// valid request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(missing_docs, reason = "each names the request variant it counts")]
pub enum Op {
    Hello,
    Ping,
    Stats,
    Get,
    Put,
    Delete,
    Exists,
    Expire,
    Persist,
    Ttl,
    MultiGet,
    MultiPut,
    MultiDelete,
    Add,
    Scan,
    Watch,
    Unwatch,
    WatchProgress,
    Txn,
    LeaseGrant,
    LeaseKeepalive,
    LeaseRevoke,
    LeaseTimeToLive,
    LeaseList,
    Lock,
    Unlock,
    CreateIndex,
    DropIndex,
    ListIndexes,
    Query,
    /// A frame or body that could not be decoded, or a frame that was not a request.
    Invalid,
}

/// Number of [`Op`]s.
pub const OP_COUNT: usize = 31;

impl Op {
    /// Every op, in index order.
    pub const ALL: [Op; OP_COUNT] = [
        Op::Hello,
        Op::Ping,
        Op::Stats,
        Op::Get,
        Op::Put,
        Op::Delete,
        Op::Exists,
        Op::Expire,
        Op::Persist,
        Op::Ttl,
        Op::MultiGet,
        Op::MultiPut,
        Op::MultiDelete,
        Op::Add,
        Op::Scan,
        Op::Watch,
        Op::Unwatch,
        Op::WatchProgress,
        Op::Txn,
        Op::LeaseGrant,
        Op::LeaseKeepalive,
        Op::LeaseRevoke,
        Op::LeaseTimeToLive,
        Op::LeaseList,
        Op::Lock,
        Op::Unlock,
        Op::CreateIndex,
        Op::DropIndex,
        Op::ListIndexes,
        Op::Query,
        Op::Invalid,
    ];

    /// The op of a request.
    pub fn of(request: &ArchivedRequest) -> Self {
        match request {
            ArchivedRequest::Hello { .. } => Op::Hello,
            ArchivedRequest::Ping => Op::Ping,
            ArchivedRequest::Stats => Op::Stats,
            ArchivedRequest::Get { .. } => Op::Get,
            ArchivedRequest::Put(_) => Op::Put,
            ArchivedRequest::Delete(_) => Op::Delete,
            ArchivedRequest::Exists { .. } => Op::Exists,
            ArchivedRequest::Expire { .. } => Op::Expire,
            ArchivedRequest::Persist { .. } => Op::Persist,
            ArchivedRequest::Ttl { .. } => Op::Ttl,
            ArchivedRequest::MultiGet { .. } => Op::MultiGet,
            ArchivedRequest::MultiPut { .. } => Op::MultiPut,
            ArchivedRequest::MultiDelete { .. } => Op::MultiDelete,
            ArchivedRequest::Add(_) => Op::Add,
            ArchivedRequest::Scan(_) => Op::Scan,
            ArchivedRequest::Watch(_) => Op::Watch,
            ArchivedRequest::Unwatch { .. } => Op::Unwatch,
            ArchivedRequest::WatchProgress { .. } => Op::WatchProgress,
            ArchivedRequest::Txn(_) => Op::Txn,
            ArchivedRequest::LeaseGrant { .. } => Op::LeaseGrant,
            ArchivedRequest::LeaseKeepalive { .. } => Op::LeaseKeepalive,
            ArchivedRequest::LeaseRevoke { .. } => Op::LeaseRevoke,
            ArchivedRequest::LeaseTimeToLive { .. } => Op::LeaseTimeToLive,
            ArchivedRequest::LeaseList => Op::LeaseList,
            ArchivedRequest::Lock { .. } => Op::Lock,
            ArchivedRequest::Unlock { .. } => Op::Unlock,
            ArchivedRequest::CreateIndex(_) => Op::CreateIndex,
            ArchivedRequest::DropIndex { .. } => Op::DropIndex,
            ArchivedRequest::ListIndexes => Op::ListIndexes,
            ArchivedRequest::Query(_) => Op::Query,
        }
    }

    /// The `op` label.
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Hello => "hello",
            Op::Ping => "ping",
            Op::Stats => "stats",
            Op::Get => "get",
            Op::Put => "put",
            Op::Delete => "delete",
            Op::Exists => "exists",
            Op::Expire => "expire",
            Op::Persist => "persist",
            Op::Ttl => "ttl",
            Op::MultiGet => "multi_get",
            Op::MultiPut => "multi_put",
            Op::MultiDelete => "multi_delete",
            Op::Add => "add",
            Op::Scan => "scan",
            Op::Watch => "watch",
            Op::Unwatch => "unwatch",
            Op::WatchProgress => "watch_progress",
            Op::Txn => "txn",
            Op::LeaseGrant => "lease_grant",
            Op::LeaseKeepalive => "lease_keepalive",
            Op::LeaseRevoke => "lease_revoke",
            Op::LeaseTimeToLive => "lease_ttl",
            Op::LeaseList => "lease_list",
            Op::Lock => "lock",
            Op::Unlock => "unlock",
            Op::CreateIndex => "create_index",
            Op::DropIndex => "drop_index",
            Op::ListIndexes => "list_indexes",
            Op::Query => "query",
            Op::Invalid => "invalid",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

const _: () = assert!(Op::Invalid as usize + 1 == OP_COUNT);

/// The error codes counted one by one; any other (a code added later) counts as `other`.
const ERROR_CODES: [ErrorCode; 14] = [
    ErrorCode::WrongShard,
    ErrorCode::TooLarge,
    ErrorCode::BadFrame,
    ErrorCode::UnsupportedVersion,
    ErrorCode::ShuttingDown,
    ErrorCode::Overloaded,
    ErrorCode::InvalidArgument,
    ErrorCode::StoreFull,
    ErrorCode::Internal,
    ErrorCode::OutOfRange,
    ErrorCode::NoSpace,
    ErrorCode::CrossShard,
    ErrorCode::LeaseNotFound,
    ErrorCode::TableFull,
];

/// The largest archived error reply: its message and the owner's address in a `WrongShard`
/// are at most `TEXT_SIZE_MAX` bytes each, and the rest is a few fixed fields.
const ERROR_BODY_BYTES_MAX: usize = 4 * tessera_protocol::limits::TEXT_SIZE_MAX;

/// Error counters per op: one per code in [`ERROR_CODES`] and one for any other.
const ERROR_SLOT_COUNT: usize = ERROR_CODES.len() + 1;

fn error_slot(code: ErrorCode) -> usize {
    ERROR_CODES
        .iter()
        .position(|known| *known == code)
        .unwrap_or(ERROR_CODES.len())
}

fn error_slot_name(slot: usize) -> &'static str {
    ERROR_CODES.get(slot).map_or("other", |code| code.as_str())
}

/// Requests answered and errors returned by one core's connections, by op.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestMetrics {
    /// Service time per op, in µs; its count is the number of requests answered.
    latency_us: [LatencyHistogram; OP_COUNT],
    /// Error replies per op and code.
    errors: [[u64; ERROR_SLOT_COUNT]; OP_COUNT],
}

impl Default for RequestMetrics {
    fn default() -> Self {
        Self {
            latency_us: [LatencyHistogram::default(); OP_COUNT],
            errors: [[0; ERROR_SLOT_COUNT]; OP_COUNT],
        }
    }
}

impl RequestMetrics {
    /// Counts `times` requests of `op` that took `latency_us` each.
    pub fn record(&mut self, op: Op, latency_us: u64, times: u64) {
        self.latency_us[op.index()].record_times(latency_us, times);
    }

    /// Counts an error reply with `code` to a request of `op`.
    pub fn count_error(&mut self, op: Op, code: ErrorCode) {
        self.errors[op.index()][error_slot(code)] += 1;
    }

    /// Counts `response` if it is an error.
    pub fn count_response(&mut self, op: Op, response: &Response) {
        if let Response::Error(reply) = response {
            self.count_error(op, reply.code);
        }
    }

    /// Counts `reply` (an archived body from another core, or a response) if it is an error.
    pub fn count_reply(&mut self, op: Op, reply: &Reply) {
        match reply {
            Reply::Response(response) => self.count_response(op, response),
            // A larger body cannot be an error reply; it is not validated a second time.
            Reply::Body(body) if body.len() <= ERROR_BODY_BYTES_MAX => {
                if let Ok(ArchivedResponse::Error(error)) = codec::access_response(body) {
                    if let Ok(code) =
                        rkyv::deserialize::<ErrorCode, rkyv::rancor::Error>(&error.code)
                    {
                        self.count_error(op, code);
                    }
                }
            }
            Reply::Body(_) => {}
        }
    }

    /// Requests of `op` answered.
    pub fn request_count(&self, op: Op) -> u64 {
        self.latency_us[op.index()].count()
    }

    /// The latency histogram of `op`, in µs.
    pub fn latency_us(&self, op: Op) -> &LatencyHistogram {
        &self.latency_us[op.index()]
    }

    /// Error replies to requests of `op` with `code`.
    pub fn error_count(&self, op: Op, code: ErrorCode) -> u64 {
        self.errors[op.index()][error_slot(code)]
    }
}

/// One core's own counters that neither the shard nor the log keeps: owned by the core's
/// thread (a `RefCell` in its context), borrowed only in synchronous code.
#[derive(Debug, Default)]
pub struct CoreMetrics {
    /// What the core's connections answered.
    pub requests: RequestMetrics,
    /// Connections the core serves now.
    pub connections_open: u64,
    /// Connections the core has adopted since it started.
    pub connections_accepted: u64,
    /// Messages the core took from its inbox (forwards, embedded calls, control messages).
    pub inbox_messages: u64,
}

/// The log's counters and histograms, as a snapshot carries them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LogMetrics {
    /// Writes, syncs, records and bytes.
    pub stats: LogStats,
    /// Time of each batch's write and `fdatasync`, in µs.
    pub flush_latency_us: LatencyHistogram,
    /// Records per sync (the group commit's batch).
    pub records_per_sync: Histogram<SYNC_RECORD_BUCKET_COUNT>,
    /// Bytes per sync.
    pub bytes_per_sync: Histogram<SYNC_BYTE_BUCKET_COUNT>,
}

/// What a core reports to a scrape: plain data, built on the core's thread and sent to the
/// admin thread.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CoreSnapshot {
    /// The core.
    pub core_id: u16,
    /// Requests and errors by op.
    pub requests: Box<RequestMetrics>,
    /// Connections the core serves now.
    pub connections_open: u64,
    /// Connections the core has adopted since it started.
    pub connections_accepted: u64,
    /// Messages taken from the inbox.
    pub inbox_messages: u64,
    /// Entries held, expired ones not yet reclaimed included.
    pub key_count: u64,
    /// Bytes charged against the memory budget.
    pub memory_bytes: u64,
    /// The shard's memory budget.
    pub memory_bytes_max: u64,
    /// The shard's revision.
    pub revision: u64,
    /// Keys removed because their TTL passed.
    pub expired_count: u64,
    /// Writes refused because the memory budget was used up.
    pub refused_full_count: u64,
    /// Pending TTL timers in the wheel.
    pub timer_count: u64,
    /// How late the wheel reclaimed keys, in ms.
    pub expiry_lag_ms: Histogram<EXPIRY_LAG_BUCKET_COUNT>,
    /// Watchers on the shard.
    pub watcher_count: u64,
    /// Bytes of events queued for the shard's watchers.
    pub watch_queued_bytes: u64,
    /// Watchers cancelled as lagging.
    pub watch_lagged_count: u64,
    /// The log's counters (`None` with durability `memory`).
    pub log: Option<LogMetrics>,
}

/// One core as a scrape saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CoreReport {
    /// The core.
    pub core_id: u16,
    /// Messages waiting in the core's inbox when the scrape looked (read by the admin thread,
    /// so it is there even for a core that did not answer).
    pub inbox_depth: usize,
    /// The inbox's bound for requests.
    pub inbox_capacity: usize,
    /// The core's answer, or `None` if it did not answer within the bound.
    pub snapshot: Option<CoreSnapshot>,
}

/// One scrape of every core of this instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scrape {
    /// This node.
    pub node_id: u32,
    /// Open client connections across the instance.
    pub connection_count: u64,
    /// The instance's connection limit.
    pub connection_count_max: u64,
    /// Every core, in core order.
    pub cores: Vec<CoreReport>,
    /// Every node of the cluster as this node's failure detector sees it (this one included).
    pub nodes: Vec<tessera_protocol::NodeHealth>,
}

/// Writes `scrape` in the Prometheus (`OpenMetrics`) text format.
///
/// # Errors
/// Only a formatting error of the encoder (writing into a `String` does not fail).
pub fn encode(scrape: Scrape) -> Result<String, std::fmt::Error> {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(scrape));
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry)?;
    Ok(text)
}

/// The content type of what [`encode`] writes.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A scale from µs or ms to seconds.
const MICROSECONDS: f64 = 1e-6;
const MILLISECONDS: f64 = 1e-3;

/// Writes one metric family: the descriptor, then every series `series` yields.
fn family(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    metric_type: MetricType,
    series: impl FnOnce(&mut MetricEncoder<'_>) -> Result<(), std::fmt::Error>,
) -> Result<(), std::fmt::Error> {
    let mut metric = encoder.encode_descriptor(name, help, unit, metric_type)?;
    series(&mut metric)
}

fn counter(metric: &mut MetricEncoder<'_>, labels: &[(&str, &str)], value: u64) -> FmtResult {
    metric
        .encode_family(&labels)?
        .encode_counter::<NoLabelSet, u64, f64>(&value, None)
}

fn gauge(metric: &mut MetricEncoder<'_>, labels: &[(&str, &str)], value: u64) -> FmtResult {
    let value = i64::try_from(value).unwrap_or(i64::MAX);
    if labels.is_empty() {
        // An empty label set would be written as `{}`.
        return metric.encode_gauge(&value);
    }
    metric.encode_family(&labels)?.encode_gauge(&value)
}

#[allow(
    clippy::cast_precision_loss,
    reason = "a histogram's sum, reported as a float, may round past 2^53"
)]
fn histogram<const N: usize>(
    metric: &mut MetricEncoder<'_>,
    labels: &[(&str, &str)],
    histogram: &Histogram<N>,
    scale: f64,
) -> FmtResult {
    let buckets = histogram.encoder_buckets(scale);
    metric
        .encode_family(&labels)?
        .encode_histogram::<NoLabelSet>(
            histogram.sum() as f64 * scale,
            histogram.count(),
            &buckets,
            None,
        )
}

type FmtResult = Result<(), std::fmt::Error>;

/// A log counter family: name, help, and its value in the log's stats.
type LogCounter = (&'static str, &'static str, fn(&LogStats) -> u64);

/// The cores that answered, with their `core` label.
fn answered(scrape: &Scrape) -> impl Iterator<Item = (String, &CoreSnapshot)> {
    scrape.cores.iter().filter_map(|core| {
        core.snapshot
            .as_ref()
            .map(|snapshot| (core.core_id.to_string(), snapshot))
    })
}

/// A per-core gauge or counter family over the cores that answered.
fn per_core(
    encoder: &mut DescriptorEncoder<'_>,
    scrape: &Scrape,
    (name, help, unit, metric_type): (&str, &str, Option<&Unit>, MetricType),
    value: impl Fn(&CoreSnapshot) -> u64,
) -> FmtResult {
    family(encoder, name, help, unit, metric_type, |metric| {
        for (core, snapshot) in answered(scrape) {
            let labels = [("core", core.as_str())];
            match metric_type {
                MetricType::Counter => counter(metric, &labels, value(snapshot))?,
                _ => gauge(metric, &labels, value(snapshot))?,
            }
        }
        Ok(())
    })
}

impl Collector for Scrape {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> FmtResult {
        let encoder = &mut encoder;
        for (name, help, value) in [
            (
                "tessera_core_up",
                "Whether the core answered the scrape within the bound (1) or not (0).",
                (|core| u64::from(core.snapshot.is_some())) as fn(&CoreReport) -> u64,
            ),
            (
                "tessera_inbox_depth",
                "Messages waiting in the core's inbox.",
                |core| core.inbox_depth as u64,
            ),
            (
                "tessera_inbox_capacity",
                "The bound of the core's inbox for requests.",
                |core| core.inbox_capacity as u64,
            ),
        ] {
            // Every core, answered or not: these come from the admin side of the scrape.
            family(encoder, name, help, None, MetricType::Gauge, |metric| {
                for core in &self.cores {
                    let label = core.core_id.to_string();
                    gauge(metric, &[("core", label.as_str())], value(core))?;
                }
                Ok(())
            })?;
        }
        family(
            encoder,
            "tessera_node_id",
            "This instance's node id in its cluster.",
            None,
            MetricType::Gauge,
            |metric| gauge(metric, &[], u64::from(self.node_id)),
        )?;
        family(
            encoder,
            "tessera_node_connections",
            "Open client connections across the instance.",
            None,
            MetricType::Gauge,
            |metric| gauge(metric, &[], self.connection_count),
        )?;
        family(
            encoder,
            "tessera_node_connections_max",
            "The instance's connection limit.",
            None,
            MetricType::Gauge,
            |metric| gauge(metric, &[], self.connection_count_max),
        )?;
        self.encode_nodes(encoder)?;
        self.encode_requests(encoder)?;
        self.encode_store(encoder)?;
        self.encode_connections(encoder)?;
        self.encode_watch(encoder)?;
        self.encode_log(encoder)
    }
}

impl Scrape {
    /// The failure detector's view: each node up or not, and how long since it was heard.
    fn encode_nodes(&self, encoder: &mut DescriptorEncoder<'_>) -> FmtResult {
        family(
            encoder,
            "tessera_peer_up",
            "Whether this node's failure detector hears the node (1) or not (0: down, or not \
             heard yet); this node is always 1.",
            None,
            MetricType::Gauge,
            |metric| {
                for node in &self.nodes {
                    let label = node.node_id.to_string();
                    let up = node.state == tessera_protocol::NodeState::Up;
                    gauge(metric, &[("node", label.as_str())], u64::from(up))?;
                }
                Ok(())
            },
        )?;
        family(
            encoder,
            "tessera_peer_last_heard",
            "Time since the node's last heartbeat arrived (absent until one has).",
            Some(&Unit::Seconds),
            MetricType::Gauge,
            |metric| {
                for node in &self.nodes {
                    if let Some(ms) = node.last_heard_ms {
                        let label = node.node_id.to_string();
                        #[allow(clippy::cast_precision_loss, reason = "milliseconds as seconds")]
                        let seconds = ms as f64 / 1000.0;
                        metric
                            .encode_family(&[("node", label.as_str())])?
                            .encode_gauge(&seconds)?;
                    }
                }
                Ok(())
            },
        )
    }

    fn encode_requests(&self, encoder: &mut DescriptorEncoder<'_>) -> FmtResult {
        family(
            encoder,
            "tessera_requests",
            "Requests the core's connections answered, by op.",
            None,
            MetricType::Counter,
            |metric| {
                for (core, snapshot) in answered(self) {
                    for op in Op::ALL {
                        let count = snapshot.requests.request_count(op);
                        if count > 0 {
                            let labels = [("core", core.as_str()), ("op", op.as_str())];
                            counter(metric, &labels, count)?;
                        }
                    }
                }
                Ok(())
            },
        )?;
        family(
            encoder,
            "tessera_request_errors",
            "Error replies of the core's connections, by op and error code.",
            None,
            MetricType::Counter,
            |metric| {
                for (core, snapshot) in answered(self) {
                    for op in Op::ALL {
                        let errors = &snapshot.requests.errors[op.index()];
                        for (slot, &count) in errors.iter().enumerate() {
                            if count > 0 {
                                let labels = [
                                    ("core", core.as_str()),
                                    ("op", op.as_str()),
                                    ("code", error_slot_name(slot)),
                                ];
                                counter(metric, &labels, count)?;
                            }
                        }
                    }
                }
                Ok(())
            },
        )?;
        family(
            encoder,
            "tessera_request_duration",
            "Service time of requests by op: the connection task's pass that answered them \
             (from its completions to its sends), or the time to the reply for requests \
             answered later (forwards, lock waits).",
            Some(&Unit::Seconds),
            MetricType::Histogram,
            |metric| {
                for (core, snapshot) in answered(self) {
                    for op in Op::ALL {
                        let latency = snapshot.requests.latency_us(op);
                        if latency.count() > 0 {
                            let labels = [("core", core.as_str()), ("op", op.as_str())];
                            histogram(metric, &labels, latency, MICROSECONDS)?;
                        }
                    }
                }
                Ok(())
            },
        )
    }

    fn encode_store(&self, encoder: &mut DescriptorEncoder<'_>) -> FmtResult {
        let gauge_type = MetricType::Gauge;
        let counter_type = MetricType::Counter;
        let bytes = Some(&Unit::Bytes);
        per_core(
            encoder,
            self,
            (
                "tessera_keys",
                "Entries the shard holds, expired ones not yet reclaimed included.",
                None,
                gauge_type,
            ),
            |snapshot| snapshot.key_count,
        )?;
        per_core(
            encoder,
            self,
            (
                "tessera_memory_used",
                "Bytes charged against the shard's memory budget.",
                bytes,
                gauge_type,
            ),
            |snapshot| snapshot.memory_bytes,
        )?;
        per_core(
            encoder,
            self,
            (
                "tessera_memory_budget",
                "The shard's memory budget.",
                bytes,
                gauge_type,
            ),
            |snapshot| snapshot.memory_bytes_max,
        )?;
        per_core(
            encoder,
            self,
            (
                "tessera_revision",
                "The shard's revision (mutations applied).",
                None,
                gauge_type,
            ),
            |snapshot| snapshot.revision,
        )?;
        per_core(
            encoder,
            self,
            (
                "tessera_store_full_refusals",
                "Writes refused because the memory budget was used up.",
                None,
                counter_type,
            ),
            |snapshot| snapshot.refused_full_count,
        )?;
        per_core(
            encoder,
            self,
            (
                "tessera_expired_keys",
                "Keys removed because their TTL passed.",
                None,
                counter_type,
            ),
            |snapshot| snapshot.expired_count,
        )?;
        per_core(
            encoder,
            self,
            (
                "tessera_ttl_timers",
                "Pending TTL deadlines in the shard's timing wheel.",
                None,
                gauge_type,
            ),
            |snapshot| snapshot.timer_count,
        )?;
        family(
            encoder,
            "tessera_expiry_lag",
            "How far past its deadline the timing wheel reclaimed each key.",
            Some(&Unit::Seconds),
            MetricType::Histogram,
            |metric| {
                for (core, snapshot) in answered(self) {
                    let labels = [("core", core.as_str())];
                    histogram(metric, &labels, &snapshot.expiry_lag_ms, MILLISECONDS)?;
                }
                Ok(())
            },
        )?;
        Ok(())
    }

    fn encode_connections(&self, encoder: &mut DescriptorEncoder<'_>) -> FmtResult {
        let gauge_type = MetricType::Gauge;
        let counter_type = MetricType::Counter;
        per_core(
            encoder,
            self,
            (
                "tessera_connections",
                "Client connections the core serves.",
                None,
                gauge_type,
            ),
            |snapshot| snapshot.connections_open,
        )?;
        per_core(
            encoder,
            self,
            (
                "tessera_connections_accepted",
                "Client connections the core adopted.",
                None,
                counter_type,
            ),
            |snapshot| snapshot.connections_accepted,
        )?;
        per_core(
            encoder,
            self,
            (
                "tessera_inbox_messages",
                "Messages the core took from its inbox.",
                None,
                counter_type,
            ),
            |snapshot| snapshot.inbox_messages,
        )
    }

    fn encode_watch(&self, encoder: &mut DescriptorEncoder<'_>) -> FmtResult {
        per_core(
            encoder,
            self,
            (
                "tessera_watchers",
                "Watchers on the shard.",
                None,
                MetricType::Gauge,
            ),
            |snapshot| snapshot.watcher_count,
        )?;
        per_core(
            encoder,
            self,
            (
                "tessera_watch_queued",
                "Bytes of events queued for the shard's watchers.",
                Some(&Unit::Bytes),
                MetricType::Gauge,
            ),
            |snapshot| snapshot.watch_queued_bytes,
        )?;
        per_core(
            encoder,
            self,
            (
                "tessera_watch_lagged",
                "Watchers cancelled because their queue passed its bound.",
                None,
                MetricType::Counter,
            ),
            |snapshot| snapshot.watch_lagged_count,
        )
    }

    fn encode_log(&self, encoder: &mut DescriptorEncoder<'_>) -> FmtResult {
        let logs =
            || answered(self).filter_map(|(core, snapshot)| snapshot.log.map(|log| (core, log)));
        if logs().next().is_none() {
            return Ok(());
        }
        let counters: [LogCounter; 4] = [
            (
                "tessera_log_syncs",
                "fdatasync calls of the core's log.",
                |stats| stats.sync_count,
            ),
            (
                "tessera_log_records",
                "Records the core's log wrote.",
                |stats| stats.record_count,
            ),
            (
                "tessera_log_written_bytes",
                "Bytes the core's log wrote.",
                |stats| stats.byte_count,
            ),
            (
                "tessera_log_no_space",
                "Times the log's disk was found full.",
                |stats| stats.no_space_count,
            ),
        ];
        for (name, help, value) in counters {
            family(encoder, name, help, None, MetricType::Counter, |metric| {
                for (core, log) in logs() {
                    counter(metric, &[("core", core.as_str())], value(&log.stats))?;
                }
                Ok(())
            })?;
        }
        family(
            encoder,
            "tessera_log_flush_duration",
            "Time of each log batch's write and fdatasync.",
            Some(&Unit::Seconds),
            MetricType::Histogram,
            |metric| {
                for (core, log) in logs() {
                    let labels = [("core", core.as_str())];
                    histogram(metric, &labels, &log.flush_latency_us, MICROSECONDS)?;
                }
                Ok(())
            },
        )?;
        family(
            encoder,
            "tessera_log_sync_records",
            "Records per log sync (the group commit's batch).",
            None,
            MetricType::Histogram,
            |metric| {
                for (core, log) in logs() {
                    histogram(
                        metric,
                        &[("core", core.as_str())],
                        &log.records_per_sync,
                        1.0,
                    )?;
                }
                Ok(())
            },
        )?;
        family(
            encoder,
            "tessera_log_sync",
            "Bytes per log sync.",
            Some(&Unit::Bytes),
            MetricType::Histogram,
            |metric| {
                for (core, log) in logs() {
                    histogram(metric, &[("core", core.as_str())], &log.bytes_per_sync, 1.0)?;
                }
                Ok(())
            },
        )
    }
}

impl crate::core::CoreContext {
    /// A snapshot of the core's metrics now, for a scrape.
    pub fn metrics_snapshot(&self) -> CoreSnapshot {
        let metrics = self.metrics.borrow();
        let mut shard = self.shard.borrow_mut();
        let hub = shard.watch_hub();
        let (watcher_count, watch_queued_bytes, watch_lagged_count) = (
            hub.watcher_count() as u64,
            hub.queued_bytes() as u64,
            hub.lagged_count(),
        );
        let stats = shard.stats();
        CoreSnapshot {
            core_id: self.core_id,
            requests: Box::new(metrics.requests.clone()),
            connections_open: metrics.connections_open,
            connections_accepted: metrics.connections_accepted,
            inbox_messages: metrics.inbox_messages,
            key_count: shard.key_count() as u64,
            memory_bytes: shard.memory_bytes(),
            memory_bytes_max: shard.config().memory_bytes_max,
            revision: shard.revision(),
            expired_count: stats.expired_count,
            refused_full_count: stats.refused_full_count,
            timer_count: shard.timer_count() as u64,
            expiry_lag_ms: stats.expiry_lag_ms,
            watcher_count,
            watch_queued_bytes,
            watch_lagged_count,
            log: self.log.as_ref().map(|log| log.metrics()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_bounds_double() {
        let mut histogram = Histogram::<4>::default();
        for value in [0, 1, 2, 3, 4, 5, 8, 9, 1000] {
            histogram.record(value);
        }
        // ≤1: 0, 1; ≤2: 2; ≤4: 3, 4; ≤8: 5, 8; 9 and 1000 only in +Inf.
        assert_eq!(histogram.buckets(), &[2, 1, 2, 2]);
        assert_eq!(histogram.count(), 9);
        assert_eq!(histogram.sum(), 1032);
        assert_eq!(
            histogram.encoder_buckets(1.0),
            vec![(1.0, 2), (2.0, 1), (4.0, 2), (8.0, 2), (f64::MAX, 2)]
        );
    }

    #[test]
    fn record_times_counts_a_batch() {
        let mut histogram = Histogram::<4>::default();
        histogram.record_times(3, 5);
        assert_eq!(histogram.buckets(), &[0, 0, 5, 0]);
        assert_eq!(histogram.count(), 5);
        assert_eq!(histogram.sum(), 15);
    }

    #[test]
    fn ops_are_in_index_order() {
        for (index, op) in Op::ALL.iter().enumerate() {
            assert_eq!(op.index(), index, "{op:?}");
        }
    }

    fn snapshot(core_id: u16) -> CoreSnapshot {
        let mut requests = RequestMetrics::default();
        requests.record(Op::Get, 3, 4);
        requests.record(Op::Put, 700, 1);
        requests.count_error(Op::Get, ErrorCode::WrongShard);
        requests.count_error(Op::Put, ErrorCode::StoreFull);
        requests.count_error(Op::Put, ErrorCode::StoreFull);
        let mut expiry_lag_ms = Histogram::default();
        expiry_lag_ms.record(2);
        CoreSnapshot {
            core_id,
            requests: Box::new(requests),
            connections_open: 3,
            connections_accepted: 7,
            inbox_messages: 11,
            key_count: 42,
            memory_bytes: 4096,
            memory_bytes_max: 1 << 20,
            revision: 9,
            expired_count: 1,
            refused_full_count: 2,
            timer_count: 5,
            expiry_lag_ms,
            watcher_count: 2,
            watch_queued_bytes: 128,
            watch_lagged_count: 1,
            log: None,
        }
    }

    fn scrape(cores: Vec<CoreReport>) -> String {
        encode(Scrape {
            node_id: 1,
            connection_count: 3,
            connection_count_max: 100,
            cores,
            nodes: vec![
                tessera_protocol::NodeHealth {
                    node_id: 1,
                    state: tessera_protocol::NodeState::Up,
                    last_heard_ms: Some(0),
                    epoch: 1,
                    restarts: 0,
                },
                tessera_protocol::NodeHealth {
                    node_id: 2,
                    state: tessera_protocol::NodeState::Down,
                    last_heard_ms: Some(2500),
                    epoch: 1,
                    restarts: 0,
                },
                tessera_protocol::NodeHealth {
                    node_id: 3,
                    state: tessera_protocol::NodeState::Unknown,
                    last_heard_ms: None,
                    epoch: 0,
                    restarts: 0,
                },
            ],
        })
        .unwrap()
    }

    fn report(core_id: u16, snapshot: Option<CoreSnapshot>) -> CoreReport {
        CoreReport {
            core_id,
            inbox_depth: 4,
            inbox_capacity: 1024,
            snapshot,
        }
    }

    fn lines(text: &str) -> Vec<&str> {
        text.lines().collect()
    }

    #[test]
    fn snapshot_becomes_labelled_series() {
        let text = scrape(vec![report(0, Some(snapshot(0)))]);
        let lines = lines(&text);
        for expected in [
            "tessera_core_up{core=\"0\"} 1",
            "tessera_inbox_depth{core=\"0\"} 4",
            "tessera_node_id 1",
            "tessera_node_connections 3",
            "tessera_requests_total{core=\"0\",op=\"get\"} 4",
            "tessera_requests_total{core=\"0\",op=\"put\"} 1",
            "tessera_request_errors_total{core=\"0\",op=\"get\",code=\"wrong_shard\"} 1",
            "tessera_request_errors_total{core=\"0\",op=\"put\",code=\"store_full\"} 2",
            "tessera_keys{core=\"0\"} 42",
            "tessera_memory_used_bytes{core=\"0\"} 4096",
            "tessera_memory_budget_bytes{core=\"0\"} 1048576",
            "tessera_expired_keys_total{core=\"0\"} 1",
            "tessera_connections{core=\"0\"} 3",
            "tessera_watchers{core=\"0\"} 2",
            "tessera_watch_queued_bytes{core=\"0\"} 128",
            "tessera_watch_lagged_total{core=\"0\"} 1",
            "tessera_request_duration_seconds_count{core=\"0\",op=\"get\"} 4",
            "tessera_expiry_lag_seconds_count{core=\"0\"} 1",
            "tessera_peer_up{node=\"1\"} 1",
            "tessera_peer_up{node=\"2\"} 0",
            "tessera_peer_up{node=\"3\"} 0",
            "tessera_peer_last_heard_seconds{node=\"2\"} 2.5",
        ] {
            assert!(
                lines.contains(&expected),
                "{expected} missing from:\n{text}"
            );
        }
        // A node never heard has no time since.
        assert!(
            !text.contains("tessera_peer_last_heard_seconds{node=\"3\"}"),
            "{text}"
        );
        // Ops never seen have no series; no log without durability.
        assert!(!text.contains("op=\"scan\""), "{text}");
        assert!(!text.contains("tessera_log_"), "{text}");
        assert_eq!(lines.last(), Some(&"# EOF"));
    }

    #[test]
    fn latency_buckets_are_cumulative_in_seconds() {
        let text = scrape(vec![report(0, Some(snapshot(0)))]);
        let get_buckets: Vec<&str> = text
            .lines()
            .filter(|line| {
                line.starts_with("tessera_request_duration_seconds_bucket{")
                    && line.contains("op=\"get\"")
            })
            .collect();
        assert_eq!(get_buckets.len(), LATENCY_BUCKET_COUNT + 1, "{text}");
        // Four requests of 3 µs: nothing up to 2 µs, all four from 4 µs on.
        let value = |line: &str| line.rsplit(' ').next().unwrap().to_owned();
        assert!(
            get_buckets[1].contains("le=\"0.000002\""),
            "{}",
            get_buckets[1]
        );
        assert_eq!(value(get_buckets[1]), "0", "{}", get_buckets[1]);
        assert!(
            get_buckets[2].contains("le=\"0.000004\""),
            "{}",
            get_buckets[2]
        );
        assert_eq!(value(get_buckets[2]), "4", "{}", get_buckets[2]);
        assert_eq!(value(get_buckets[LATENCY_BUCKET_COUNT - 1]), "4");
        let infinite = get_buckets[LATENCY_BUCKET_COUNT];
        assert!(infinite.contains("le=\"+Inf\""), "{infinite}");
        assert_eq!(value(infinite), "4", "{infinite}");
        assert!(
            text.contains("tessera_request_duration_seconds_sum{core=\"0\",op=\"get\"} 0.000012"),
            "{text}"
        );
    }

    #[test]
    fn a_core_that_did_not_answer_is_reported_down() {
        let text = scrape(vec![report(0, Some(snapshot(0))), report(1, None)]);
        let lines = lines(&text);
        assert!(lines.contains(&"tessera_core_up{core=\"1\"} 0"), "{text}");
        assert!(
            lines.contains(&"tessera_inbox_depth{core=\"1\"} 4"),
            "{text}"
        );
        assert!(!text.contains("tessera_keys{core=\"1\"}"), "{text}");
    }

    #[test]
    fn log_series_appear_with_a_log() {
        let mut with_log = snapshot(0);
        let mut log = LogMetrics {
            stats: LogStats {
                write_count: 2,
                sync_count: 2,
                record_count: 10,
                byte_count: 2000,
                no_space_count: 0,
            },
            ..LogMetrics::default()
        };
        log.flush_latency_us.record(150);
        log.records_per_sync.record(4);
        log.records_per_sync.record(6);
        log.bytes_per_sync.record(1000);
        log.bytes_per_sync.record(1000);
        with_log.log = Some(log);
        let text = scrape(vec![report(0, Some(with_log))]);
        let lines = lines(&text);
        for expected in [
            "tessera_log_syncs_total{core=\"0\"} 2",
            "tessera_log_records_total{core=\"0\"} 10",
            "tessera_log_written_bytes_total{core=\"0\"} 2000",
            "tessera_log_flush_duration_seconds_count{core=\"0\"} 1",
            "tessera_log_sync_records_count{core=\"0\"} 2",
            "tessera_log_sync_records_sum{core=\"0\"} 10.0",
            "tessera_log_sync_bytes_sum{core=\"0\"} 2000.0",
        ] {
            assert!(
                lines.contains(&expected),
                "{expected} missing from:\n{text}"
            );
        }
    }
}
