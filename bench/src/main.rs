//! `tessera-bench`: one load generator for Tessera, its embedded mode, Redis, etcd and a
//! loopback echo server, so their figures come from the same instrument in the same run.
//!
//! # Layout
//! - `workload`: operations, keys (uniform or zipf), values and the read:write mix.
//! - `wire`: encoding requests and recognising replies for Tessera, echo and Redis (RESP).
//! - `uring`: the network driver, one `io_uring` per load thread, closed or open loop.
//! - `client_load`: load through an async client library on tokio: the public `Client` API
//!   (embedded mode, and `--driver client` for a remote cluster) or etcd's.
//! - `etcd_load` (feature `etcd`): etcd's v3 API through the `etcd-client` crate.
//! - `watch_load`: watchers and the stamped writer of the watch workloads, on the client
//!   library.
//! - `lease_load`: the lease workload: leases granted up front, renewed in batches by
//!   sessions on the client library (Tessera) or `etcd-client` (etcd).
//! - `lock_load`: the lock workload: contenders with a lease each, locking and unlocking in a
//!   loop, with the overlap and fencing-token checks.
//! - `cpu`: CPU time of local processes from /proc, for server CPU per operation.
//! - `report`: hdrhistogram records, the progress line, the text and JSON results.
//!
//! Every result carries the configuration, the machine and the git revision.

// Rates and percentiles are computed in f64 from counts and nanoseconds far below 2^52.
#![allow(
    clippy::cast_precision_loss,
    reason = "statistics over counts far below 2^52"
)]

mod client_load;
mod cpu;
#[cfg(feature = "etcd")]
mod etcd_load;
mod index_setup;
mod lease_load;
mod lock_load;
mod query_load;
mod report;
mod setup;
mod uring;
mod watch_load;
mod wire;
mod workload;

use std::process::ExitCode;
use std::sync::{mpsc, Barrier};
use std::time::{Duration, Instant};

use clap::Parser;
use serde::Serialize;
use tessera_protocol::{slot_for_key, RouteTable, Topology, SLOT_COUNT};

use crate::lease_load::{LeasePlan, LeaseTarget};
use crate::lock_load::{LockNames, LockPlan, LockTarget};
use crate::report::{
    CpuUsage, IndexBuildReport, LeaseReport, LockReport, PeerWindow, Preload, Recorder, RunResult,
    Summary, WatchReport,
};
use crate::uring::{Router, ThreadLoad};
use crate::wire::{EchoWire, RedisWire, TesseraWire, Wire};
use crate::workload::Op;
use crate::workload::{
    parse_ratio, KeyDistribution, KeyPlan, OpStream, WorkloadKind, WorkloadSpec,
};

/// Drive a Tessera cluster, an embedded Tessera, Redis, etcd or an echo server with one
/// workload.
#[derive(Debug, Clone, Parser, Serialize)]
#[command(name = "tessera-bench", version, about)]
#[allow(clippy::struct_excessive_bools, reason = "command-line switches")]
struct Flags {
    /// Tessera endpoints (host:port, comma separated); the topology is fetched from them.
    #[arg(long, env = "TESSERA_ENDPOINTS", value_delimiter = ',')]
    endpoints: Vec<String>,
    /// Run Tessera's shards inside this process (no server).
    #[arg(long, conflicts_with_all = ["endpoints", "target"])]
    embedded: bool,
    /// Shards for `--embedded`.
    #[arg(long, default_value_t = 2)]
    embedded_cores: usize,
    /// Another target: `redis://host:port`, `etcd://host:port` (one member, through its v3
    /// gRPC API; needs the `etcd` feature), `echo://host:port[,host:port...]` (one address per
    /// echo core) or `tessera://host:port[,...]` (same as --endpoints).
    #[arg(long)]
    target: Option<String>,
    /// For Tessera over the network: `raw` (the `io_uring` load generator, with the client's
    /// routing and codec) or `client` (the full async client library on tokio).
    #[arg(long, value_enum, default_value_t = Driver::Raw)]
    driver: Driver,
    /// What to run.
    #[arg(long, value_enum, default_value_t = WorkloadKind::Get)]
    workload: WorkloadKind,
    /// Reads to writes for `--workload mixed`, as `reads:writes`.
    #[arg(long, default_value = "9:1")]
    ratio: String,
    /// Sessions (logical clients). Against Tessera each holds one connection per core; against
    /// etcd each is its own etcd client with its own gRPC channel (one connection).
    #[arg(long, default_value_t = 50)]
    connections: usize,
    /// Requests in flight per session. Against etcd: concurrent unary calls per client (HTTP/2
    /// streams on its connection).
    #[arg(long, default_value_t = 1)]
    pipeline: usize,
    /// Load threads (network drivers) or tokio workers (client driver, etcd).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Length of the measured window.
    #[arg(long, default_value_t = 10.0)]
    duration_secs: f64,
    /// Stop after this many operations instead (or as well).
    #[arg(long)]
    operations: Option<u64>,
    /// Open loop: intended operations per second over all sessions (latency counted from the
    /// intended send time). Without it the loop is closed. For `--workload watch-latency`:
    /// the writer's puts per second (default 100).
    #[arg(long)]
    rate: Option<f64>,
    /// Watches for `--workload watch-latency` (default 1) and `watch-fanout` (default 100),
    /// all on the prefix every key of the workload is written under.
    #[arg(long)]
    watchers: Option<usize>,
    /// Leases for `--workload lease-keepalive`, granted before the measured window and shared
    /// out among the `--connections` sessions in contiguous slices.
    #[arg(long, default_value_t = 10_000)]
    leases: usize,
    /// Lease ids per keepalive call for `--workload lease-keepalive` (a session whose slice
    /// of the leases is smaller renews the whole slice per call).
    #[arg(long, default_value_t = 1_000)]
    batch: usize,
    /// TTL of the leases of `--workload lease-keepalive` and `lock`: long beside a round of
    /// renewals, so a lease ends only if renewals stop reaching it.
    #[arg(long, default_value_t = 60.0)]
    lease_ttl_secs: f64,
    /// Sessions of `--workload lock`, each with its own lease, locking and unlocking in a loop
    /// (against Tessera they share one client, against etcd each has its own). Replaces
    /// `--connections` for this workload.
    #[arg(long, default_value_t = 50)]
    contenders: usize,
    /// Lock names of `--workload lock`: `one` (every contender on one lock) or `per-session`
    /// (each on its own: uncontended).
    #[arg(long, value_enum, default_value_t = LockNames::One)]
    lock_names: LockNames,
    /// Watches per client; each client holds one connection per core, and the server allows
    /// `--watchers-per-connection-max` (1000 by default) watches on one connection.
    #[arg(long, default_value_t = 1_000)]
    watchers_per_client: usize,
    /// Distinct keys.
    #[arg(long, default_value_t = 100_000)]
    keys: u64,
    /// Bytes per key.
    #[arg(long, default_value_t = 16)]
    key_size: usize,
    /// Bytes per value.
    #[arg(long, default_value_t = 32)]
    value_size: usize,
    /// How keys are picked.
    #[arg(long, value_enum, default_value_t = KeyDistribution::Uniform)]
    distribution: KeyDistribution,
    /// Exponent of the zipf distribution.
    #[arg(long, default_value_t = 0.99)]
    zipf_exponent: f64,
    /// Write every key before the measured window: `auto` does so for get, mixed and delete.
    #[arg(long, value_enum, default_value_t = PreloadMode::Auto)]
    preload: PreloadMode,
    /// Seed of the key sequence.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Every write carries three indexed i64 fields: `p10000`, `p100` and `p10`, the key's
    /// index modulo 10000, 100 and 10 (an equality on each matches 0.01%, 1% and 10% of the
    /// keys).
    #[arg(long)]
    fields: bool,
    /// Before the measured window, make the benchmark's equality indexes on the first N of
    /// `p10000`, `p100`, `p10` exist (and drop its others), and wait until every core has
    /// built them. Unset: leave the indexes as they are.
    #[arg(long)]
    indexes: Option<usize>,
    /// Measure a window with no index build first (the peer), then the same load while a
    /// range index on `p10000` is built over the keys (created `--index-build-delay-secs`
    /// into the window): the point operations' latency during a build, and its duration.
    /// Needs `--fields` data (`--preload` with `--fields`, or keys written that way before).
    #[arg(long)]
    index_build: bool,
    /// When, into the measured window, `--index-build` creates its index.
    #[arg(long, default_value_t = 1.0)]
    index_build_delay_secs: f64,
    /// The field `--workload query` compares: `p10000`, `p100` or `p10` (0.01%, 1% or 10% of
    /// the keys match each value).
    #[arg(long, default_value = "p100")]
    query_field: String,
    /// What answers `--workload query`: an equality index on the field (built before the
    /// window) or a scan of the key prefix (no index on it).
    #[arg(long, value_enum, default_value_t = query_load::QueryAccessMode::Index)]
    query_access: query_load::QueryAccessMode,
    /// `--workload query` asks for counts (every match found) instead of pages.
    #[arg(long)]
    query_count: bool,
    /// Items per page of `--workload query` (without `--query-count`).
    #[arg(long, default_value_t = 100)]
    query_limit: u32,
    /// Server processes to measure CPU time of (repeatable). Default: the local processes
    /// listening on the target's ports, if any.
    #[arg(long = "server-pid")]
    server_pids: Vec<u32>,
    /// Print the result as one JSON object on stdout.
    #[arg(long)]
    json: bool,
    /// No progress lines.
    #[arg(long)]
    quiet: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
enum Driver {
    Raw,
    Client,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
enum PreloadMode {
    Auto,
    Yes,
    No,
}

/// What the flags point at.
#[derive(Debug)]
enum Target {
    Tessera {
        endpoints: Vec<String>,
    },
    Embedded,
    Redis {
        address: String,
    },
    #[cfg(feature = "etcd")]
    Etcd {
        address: String,
    },
    Echo {
        addresses: Vec<String>,
    },
}

impl Target {
    fn from_flags(flags: &Flags) -> Result<Self, String> {
        if flags.embedded {
            return Ok(Self::Embedded);
        }
        let split = |rest: &str| -> Vec<String> {
            rest.split(',')
                .filter(|part| !part.is_empty())
                .map(str::to_owned)
                .collect()
        };
        match &flags.target {
            None if flags.endpoints.is_empty() => {
                Err("say what to drive: --endpoints, --embedded or --target".to_owned())
            }
            None => Ok(Self::Tessera {
                endpoints: flags.endpoints.clone(),
            }),
            Some(target) => {
                if let Some(rest) = target.strip_prefix("redis://") {
                    Ok(Self::Redis {
                        address: rest.trim_end_matches('/').to_owned(),
                    })
                } else if let Some(rest) = target.strip_prefix("etcd://") {
                    Self::etcd(rest)
                } else if let Some(rest) = target.strip_prefix("echo://") {
                    Ok(Self::Echo {
                        addresses: split(rest),
                    })
                } else if let Some(rest) = target.strip_prefix("tessera://") {
                    Ok(Self::Tessera {
                        endpoints: split(rest),
                    })
                } else {
                    Err(format!(
                        "--target {target:?}: expected redis://, etcd://, echo:// or tessera://"
                    ))
                }
            }
        }
    }

    /// `etcd://host:port`: one member, since the comparison is with one etcd node.
    #[cfg(feature = "etcd")]
    fn etcd(rest: &str) -> Result<Self, String> {
        let address = rest.trim_end_matches('/');
        if address.is_empty() || address.contains(',') {
            return Err(format!(
                "--target etcd://{rest}: expected one member's host:port"
            ));
        }
        Ok(Self::Etcd {
            address: address.to_owned(),
        })
    }

    #[cfg(not(feature = "etcd"))]
    fn etcd(_rest: &str) -> Result<Self, String> {
        Err(
            "--target etcd://: this tessera-bench was built without etcd support; \
             build it with `--features etcd`"
                .to_owned(),
        )
    }

    fn name(&self) -> &'static str {
        match self {
            Self::Tessera { .. } => "tessera",
            Self::Embedded => "embedded",
            Self::Redis { .. } => "redis",
            #[cfg(feature = "etcd")]
            Self::Etcd { .. } => "etcd",
            Self::Echo { .. } => "echo",
        }
    }
}

/// Routes by the cluster topology, as the smart client does: slot → (node, core) → the
/// session's connection to that core.
struct TopologyRouter {
    routes: RouteTable,
    /// Index of each node's first core among all cores.
    node_offsets: Vec<usize>,
    route_count: usize,
}

impl TopologyRouter {
    fn new(topology: &Topology) -> Result<Self, String> {
        let routes = RouteTable::new(topology).map_err(|error| error.to_string())?;
        let mut node_offsets = Vec::with_capacity(topology.nodes.len());
        let mut route_count = 0;
        for node in &topology.nodes {
            node_offsets.push(route_count);
            route_count += node.cores.len();
        }
        Ok(Self {
            routes,
            node_offsets,
            route_count,
        })
    }
}

impl Router for TopologyRouter {
    fn route_count(&self) -> usize {
        self.route_count
    }

    fn route(&self, key: &[u8]) -> usize {
        let location = self.routes.owner_of_key(key);
        self.node_offsets[usize::from(location.node_index)] + usize::from(location.core_index)
    }
}

/// Routes by slot over `route_count` equal parts (the echo server's cores), costing the same
/// hash as Tessera's routing.
struct EvenRouter {
    route_count: usize,
}

impl Router for EvenRouter {
    fn route_count(&self) -> usize {
        self.route_count
    }

    fn route(&self, key: &[u8]) -> usize {
        usize::from(slot_for_key(key)) * self.route_count / usize::from(SLOT_COUNT)
    }
}

fn main() -> ExitCode {
    let flags = Flags::parse();
    match run(&flags) {
        Ok(result) => {
            if flags.json {
                match serde_json::to_string(&result) {
                    Ok(json) => println!("{json}"),
                    Err(error) => {
                        eprintln!("tessera-bench: cannot encode the result: {error}");
                        return ExitCode::from(2);
                    }
                }
                eprint!("{}", result.to_text());
            } else {
                print!("{}", result.to_text());
            }
            ExitCode::SUCCESS
        }
        Err(message) => {
            eprintln!("tessera-bench: {message}");
            ExitCode::from(2)
        }
    }
}

fn run(flags: &Flags) -> Result<RunResult, String> {
    let spec = WorkloadSpec {
        kind: flags.workload,
        read_fraction: parse_ratio(&flags.ratio)?,
        key_count: flags.keys,
        key_size: flags.key_size,
        value_size: flags.value_size,
        distribution: flags.distribution,
        zipf_exponent: flags.zipf_exponent,
        seed: flags.seed,
        fields: flags.fields,
    };
    spec.validate()?;
    if flags.connections == 0 || flags.pipeline == 0 || flags.threads == 0 {
        return Err("--connections, --pipeline and --threads must be at least 1".to_owned());
    }
    if !(flags.duration_secs > 0.0 && flags.duration_secs.is_finite()) {
        return Err(format!(
            "--duration-secs {} must be positive",
            flags.duration_secs
        ));
    }
    if flags
        .rate
        .is_some_and(|rate| !(rate > 0.0 && rate.is_finite()))
    {
        return Err("--rate must be a positive number of operations per second".to_owned());
    }
    let target = Target::from_flags(flags)?;
    let preload = match flags.preload {
        PreloadMode::Auto => spec.kind.wants_preload(),
        PreloadMode::Yes => true,
        PreloadMode::No => false,
    };
    let config = serde_json::to_value(flags).unwrap_or_default();
    let duration = Duration::from_secs_f64(flags.duration_secs);
    let client_run = |target| ClientRun {
        flags,
        target,
        spec: &spec,
        preload,
        duration,
    };
    if spec.kind == WorkloadKind::LeaseKeepalive {
        return run_leases(&client_run(&target), config);
    }
    if spec.kind == WorkloadKind::Lock {
        return run_locks(&client_run(&target), config);
    }
    if spec.kind.is_watch() {
        return run_watch(&client_run(&target), config);
    }
    if spec.kind == WorkloadKind::Query {
        return run_query(flags, &target, &spec, preload, duration, config);
    }
    match &target {
        Target::Embedded => run_client(&client_run(&target), config),
        Target::Tessera { .. } if flags.driver == Driver::Client => {
            run_client(&client_run(&target), config)
        }
        Target::Tessera { endpoints } => {
            let client = tessera_client::BlockingClient::connect(endpoints.clone())
                .map_err(|error| format!("cannot fetch the topology: {error}"))?;
            let topology = client.topology();
            drop(client);
            let addresses: Vec<String> = topology
                .nodes
                .iter()
                .flat_map(|node| node.cores.iter().map(|core| core.address.clone()))
                .collect();
            let router = TopologyRouter::new(&topology)?;
            run_network(
                flags, &target, &spec, preload, duration, config, &addresses, &router,
            )
        }
        Target::Redis { address } => {
            let addresses = vec![address.clone()];
            let router = EvenRouter { route_count: 1 };
            run_network(
                flags, &target, &spec, preload, duration, config, &addresses, &router,
            )
        }
        #[cfg(feature = "etcd")]
        Target::Etcd { address } => run_etcd(&client_run(&target), address, config),
        Target::Echo { addresses } => {
            if addresses.is_empty() {
                return Err("--target echo:// needs at least one address".to_owned());
            }
            let router = EvenRouter {
                route_count: addresses.len(),
            };
            run_network(
                flags, &target, &spec, preload, duration, config, addresses, &router,
            )
        }
    }
}

/// The encoding the network driver speaks to `target`; none for etcd, which speaks gRPC.
#[cfg_attr(
    not(feature = "etcd"),
    allow(clippy::unnecessary_wraps, reason = "only etcd has no wire")
)]
fn new_wire(target: &Target, spec: &WorkloadSpec) -> Result<Box<dyn Wire>, String> {
    match target {
        Target::Redis { .. } => Ok(Box::new(RedisWire)),
        Target::Echo { .. } => Ok(Box::new(EchoWire::new())),
        Target::Tessera { .. } | Target::Embedded => Ok(Box::new(TesseraWire::new(spec.fields))),
        #[cfg(feature = "etcd")]
        Target::Etcd { .. } => Err("etcd speaks gRPC: it is driven by client_load".to_owned()),
    }
}

/// Sessions of load thread `thread_index` out of `thread_count` (the first threads take the
/// remainder).
fn sessions_of_thread(session_count: usize, thread_count: usize, thread_index: usize) -> usize {
    session_count / thread_count + usize::from(thread_index < session_count % thread_count)
}

fn ports_of(addresses: &[String]) -> Vec<u16> {
    addresses
        .iter()
        .filter_map(|address| address.rsplit_once(':'))
        .filter_map(|(_, port)| port.parse().ok())
        .collect()
}

#[allow(clippy::too_many_arguments, reason = "one call site per target")]
fn run_network(
    flags: &Flags,
    target: &Target,
    spec: &WorkloadSpec,
    preload: bool,
    duration: Duration,
    config: serde_json::Value,
    addresses: &[String],
    router: &dyn Router,
) -> Result<RunResult, String> {
    let thread_count = flags.threads.min(flags.connections);
    let preload_outcome = if preload && !matches!(target, Target::Echo { .. }) {
        Some(run_preload_network(
            flags,
            target,
            spec,
            addresses,
            router,
            thread_count,
        )?)
    } else {
        None
    };
    let server_pids = server_pids_of(flags, addresses);
    let is_tessera = matches!(target, Target::Tessera { .. });
    if let Some(count) = flags.indexes.filter(|_| is_tessera) {
        index_setup::Cores::connect(addresses)?
            .ensure_indexes(&index_setup::first_indexes(count)?, INDEX_WAIT_MAX)?;
    }
    if flags.index_build && is_tessera {
        return run_index_build(flags, target, spec, duration, config, addresses, router).map(
            |mut result| {
                result.preload = preload_outcome;
                result
            },
        );
    }
    let window = measure_network(
        flags,
        target,
        spec,
        duration,
        addresses,
        router,
        &server_pids,
    )?;
    Ok(finish(
        target,
        config,
        &window,
        &server_pids,
        preload_outcome,
    ))
}

/// `--workload query`: the keys written with their fields (preload), the index the access
/// mode asks for made to exist (or not), then `--connections` query sessions on one client.
fn run_query(
    flags: &Flags,
    target: &Target,
    spec: &WorkloadSpec,
    preload: bool,
    duration: Duration,
    config: serde_json::Value,
) -> Result<RunResult, String> {
    let Target::Tessera { endpoints } = target else {
        return Err("--workload query drives a Tessera cluster: give --endpoints".to_owned());
    };
    let topology = tessera_client::BlockingClient::connect(endpoints.clone())
        .map_err(|error| format!("cannot fetch the topology: {error}"))?
        .topology();
    let addresses: Vec<String> = topology
        .nodes
        .iter()
        .flat_map(|node| node.cores.iter().map(|core| core.address.clone()))
        .collect();
    let router = TopologyRouter::new(&topology)?;
    // The keys carry the fields the queries compare.
    let write_spec = WorkloadSpec {
        kind: WorkloadKind::Set,
        fields: true,
        ..spec.clone()
    };
    let thread_count = flags.threads.min(flags.connections);
    let preload_outcome = if preload {
        Some(run_preload_network(
            flags,
            target,
            &write_spec,
            &addresses,
            &router,
            thread_count,
        )?)
    } else {
        None
    };
    let plan = query_load::QueryPlanSpec::new(
        &flags.query_field,
        spec.key_count,
        flags.query_count,
        flags.query_limit,
        flags.query_access,
    )?;
    let wanted = match flags.query_access {
        query_load::QueryAccessMode::Index => vec![index_setup::bench_index(
            plan.field,
            tessera_protocol::IndexKind::Equality,
        )],
        query_load::QueryAccessMode::Scan => Vec::new(),
    };
    index_setup::Cores::connect(&addresses)?.ensure_indexes(&wanted, INDEX_WAIT_MAX)?;
    let runtime = new_runtime(flags)?;
    let client = runtime
        .block_on(tessera_client::Client::connect(endpoints.clone()))
        .map_err(|error| format!("cannot connect: {error}"))?;
    let server_pids = server_pids_of(flags, &addresses);
    let measured = Measured::start(&server_pids);
    let (record, elapsed, report) = query_load::measure(
        &runtime,
        &client,
        &plan,
        flags.connections,
        duration,
        flags.seed,
    )?;
    let (server_cpu_time, client_cpu_time) = measured.finish();
    client.shutdown();
    let window = Window {
        record,
        elapsed,
        server_cpu_time,
        client_cpu_time,
    };
    let mut result = finish(target, config, &window, &server_pids, preload_outcome);
    result.query = Some(report);
    Ok(result)
}

/// Longest wait for an index to be built before a window.
const INDEX_WAIT_MAX: Duration = Duration::from_secs(600);

/// `--index-build`: a window of the load alone, then one during which an index is built.
fn run_index_build(
    flags: &Flags,
    target: &Target,
    spec: &WorkloadSpec,
    duration: Duration,
    config: serde_json::Value,
    addresses: &[String],
    router: &dyn Router,
) -> Result<RunResult, String> {
    let server_pids = server_pids_of(flags, addresses);
    let measure = || {
        measure_network(
            flags,
            target,
            spec,
            duration,
            addresses,
            router,
            &server_pids,
        )
    };
    let idle = measure()?;
    let index = index_setup::bench_index(
        workload::FIELD_MODULI[0].0,
        tessera_protocol::IndexKind::Range,
    );
    let delay = Duration::from_secs_f64(flags.index_build_delay_secs.max(0.0));
    let (building, timing) = std::thread::scope(|scope| {
        let builder = scope
            .spawn(|| index_setup::build_while_measured(addresses, &index, delay, INDEX_WAIT_MAX));
        let window = measure();
        let timing = builder
            .join()
            .map_err(|_| "the index build thread panicked".to_owned());
        (window, timing)
    });
    let (building, timing) = (building?, timing??);
    let idle_total = Summary::of(
        &idle.record.combined(),
        idle.record.error_count(),
        idle.elapsed,
    );
    let mut result = finish(target, config, &building, &server_pids, None);
    let within_window = delay.as_secs_f64() + timing.build_secs <= building.elapsed.as_secs_f64();
    result.index_build = Some(IndexBuildReport {
        p99_ratio: ratio(result.total.p99_us, idle_total.p99_us),
        p50_ratio: ratio(result.total.p50_us, idle_total.p50_us),
        idle: idle_total,
        timing,
        finished_within_window: within_window,
    });
    Ok(result)
}

fn ratio(value: f64, base: f64) -> f64 {
    if base > 0.0 {
        value / base
    } else {
        0.0
    }
}

/// One measured window of point operations, and the CPU each side spent in it.
struct Window {
    record: Recorder,
    elapsed: Duration,
    /// CPU of the server processes, when measurable.
    server_cpu_time: Option<Duration>,
    /// CPU of this process.
    client_cpu_time: Duration,
}

/// The measured window of the network driver: `--threads` load threads, each with its share
/// of the sessions, started together once all are connected.
fn measure_network(
    flags: &Flags,
    target: &Target,
    spec: &WorkloadSpec,
    duration: Duration,
    addresses: &[String],
    router: &dyn Router,
    server_pids: &[u32],
) -> Result<Window, String> {
    let thread_count = flags.threads.min(flags.connections);
    let (progress_sender, progress) = mpsc::channel();
    let barrier = Barrier::new(thread_count + 1);
    let rate_per_session = flags.rate.map(|rate| rate / flags.connections as f64);
    let operation_count_max = flags.operations;
    let outcome = std::thread::scope(|scope| {
        let mut threads = Vec::with_capacity(thread_count);
        for thread_index in 0..thread_count {
            let session_count = sessions_of_thread(flags.connections, thread_count, thread_index);
            let progress_sender = progress_sender.clone();
            let barrier = &barrier;
            threads.push(scope.spawn(move || {
                let connected = uring::connect_all(addresses, session_count);
                barrier.wait();
                let streams = connected?;
                let load = ThreadLoad {
                    session_count,
                    pipeline: flags.pipeline,
                    rate_per_session,
                    keys: KeyPlan::Random(OpStream::new(spec, thread_index as u64)?),
                    operation_count_max: operation_count_max
                        .map(|count| share_of(count, thread_count, thread_index)),
                    duration: Some(duration),
                };
                let mut wire = new_wire(target, spec)?;
                uring::run_thread(
                    streams,
                    router,
                    wire.as_mut(),
                    spec,
                    load,
                    Some(&progress_sender),
                )
            }));
        }
        drop(progress_sender);
        barrier.wait();
        let measured = Measured::start(server_pids);
        report_progress(&progress, flags.quiet);
        let mut record = Recorder::new();
        let mut elapsed = Duration::ZERO;
        let mut first_error = None;
        for thread in threads {
            match thread.join() {
                Ok(Ok(outcome)) => {
                    record.merge(&outcome.record);
                    elapsed = elapsed.max(outcome.elapsed);
                }
                Ok(Err(error)) => {
                    first_error.get_or_insert(error);
                }
                Err(_) => {
                    first_error.get_or_insert_with(|| "a load thread panicked".to_owned());
                }
            }
        }
        match first_error {
            Some(error) => Err(error),
            None => Ok((record, elapsed, measured.finish())),
        }
    });
    let (record, elapsed, (server_cpu_time, client_cpu_time)) = outcome?;
    Ok(Window {
        record,
        elapsed,
        server_cpu_time,
        client_cpu_time,
    })
}

/// The result of a run, with the CPU each side spent per reply.
fn finish(
    target: &Target,
    config: serde_json::Value,
    window: &Window,
    server_pids: &[u32],
    preload: Option<Preload>,
) -> RunResult {
    finish_per(
        target,
        config,
        window,
        server_pids,
        window.record.count(),
        preload,
    )
}

/// The result of a run, with the CPU each side spent per one of `operations` (renewed leases,
/// lock pairs), which need not be replies.
fn finish_per(
    target: &Target,
    config: serde_json::Value,
    window: &Window,
    server_pids: &[u32],
    operations: u64,
    preload: Option<Preload>,
) -> RunResult {
    let (server_cpu, client_cpu) = window.cpu_usage_per(server_pids, operations);
    RunResult::new(
        target.name(),
        config,
        &window.record,
        window.elapsed,
        server_cpu,
        client_cpu,
        preload,
    )
}

impl Window {
    /// The CPU the servers (if measured) and this process spent per reply.
    fn cpu_usage(&self, server_pids: &[u32]) -> (Option<CpuUsage>, CpuUsage) {
        self.cpu_usage_per(server_pids, self.record.count())
    }

    /// The CPU the servers (if measured) and this process spent per one of `operations`.
    fn cpu_usage_per(&self, server_pids: &[u32], operations: u64) -> (Option<CpuUsage>, CpuUsage) {
        let server_cpu = self.server_cpu_time.map(|cpu_time| {
            CpuUsage::new(server_pids.to_vec(), cpu_time, operations, self.elapsed)
        });
        let client_cpu = CpuUsage::new(
            vec![std::process::id()],
            self.client_cpu_time,
            operations,
            self.elapsed,
        );
        (server_cpu, client_cpu)
    }
}

/// Operations of thread `thread_index` when `count` are shared among `thread_count`.
fn share_of(count: u64, thread_count: usize, thread_index: usize) -> u64 {
    let thread_count = thread_count as u64;
    let thread_index = thread_index as u64;
    count / thread_count + u64::from(thread_index < count % thread_count)
}

/// CPU clocks read at the start of the measured window.
struct Measured {
    server_pids: Vec<u32>,
    server_before: Option<Duration>,
    client_before: Duration,
}

impl Measured {
    fn start(server_pids: &[u32]) -> Self {
        Self {
            server_pids: server_pids.to_vec(),
            server_before: if server_pids.is_empty() {
                None
            } else {
                cpu::processes_cpu_time(server_pids).ok()
            },
            client_before: cpu::own_cpu_time(),
        }
    }

    /// CPU spent since `start` by the servers (if measurable) and by this process.
    fn finish(&self) -> (Option<Duration>, Duration) {
        let server = self.server_before.and_then(|before| {
            cpu::processes_cpu_time(&self.server_pids)
                .ok()
                .map(|after| after.saturating_sub(before))
        });
        let client = cpu::own_cpu_time().saturating_sub(self.client_before);
        (server, client)
    }
}

/// Prints one progress line per second until every sender is gone.
fn report_progress(progress: &mpsc::Receiver<Recorder>, is_quiet: bool) {
    let started = Instant::now();
    let mut interval = Recorder::new();
    let mut interval_started = started;
    let mut total_count = 0_u64;
    loop {
        let next_line = interval_started + Duration::from_secs(1);
        match progress.recv_timeout(next_line.saturating_duration_since(Instant::now())) {
            Ok(part) => {
                total_count += part.count();
                interval.merge(&part);
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        }
        let now = Instant::now();
        if now >= next_line {
            if !is_quiet {
                eprintln!(
                    "{}",
                    report::progress_line(
                        now - started,
                        &interval,
                        now - interval_started,
                        total_count
                    )
                );
            }
            interval.reset();
            interval_started = now;
        }
    }
}

/// Writes every key once over the network, before the measured window.
fn run_preload_network(
    flags: &Flags,
    target: &Target,
    spec: &WorkloadSpec,
    addresses: &[String],
    router: &dyn Router,
    thread_count: usize,
) -> Result<Preload, String> {
    let started = Instant::now();
    let thread_count_u64 = thread_count as u64;
    let record = std::thread::scope(|scope| {
        let threads: Vec<_> = (0..thread_count)
            .map(|thread_index| {
                scope.spawn(move || {
                    let session_count =
                        sessions_of_thread(flags.connections, thread_count, thread_index);
                    let streams = uring::connect_all(addresses, session_count)?;
                    let load = ThreadLoad {
                        session_count,
                        pipeline: flags.pipeline.max(PRELOAD_PIPELINE),
                        rate_per_session: None,
                        keys: KeyPlan::Sequential {
                            next: thread_index as u64,
                            step: thread_count_u64,
                            end: spec.key_count,
                        },
                        operation_count_max: None,
                        duration: None,
                    };
                    let mut wire = new_wire(target, spec)?;
                    uring::run_thread(streams, router, wire.as_mut(), spec, load, None)
                })
            })
            .collect();
        let mut record = Recorder::new();
        for thread in threads {
            let outcome = thread
                .join()
                .map_err(|_| "a preload thread panicked".to_owned())??;
            record.merge(&outcome.record);
        }
        Ok::<_, String>(record)
    })?;
    finish_preload(spec, &record, started.elapsed())
}

/// Requests in flight per session while preloading.
const PRELOAD_PIPELINE: usize = 32;

fn finish_preload(
    spec: &WorkloadSpec,
    record: &Recorder,
    elapsed: Duration,
) -> Result<Preload, String> {
    let preload = Preload {
        keys: record.count(),
        duration_secs: elapsed.as_secs_f64(),
        errors: record.error_count(),
    };
    if preload.errors > 0 {
        return Err(format!(
            "preload: {} of {} writes failed",
            preload.errors, preload.keys
        ));
    }
    if preload.keys != spec.key_count {
        return Err(format!(
            "preload wrote {} keys, expected {}",
            preload.keys, spec.key_count
        ));
    }
    Ok(preload)
}

/// What a run through a client library needs besides its clients.
struct ClientRun<'run> {
    flags: &'run Flags,
    target: &'run Target,
    spec: &'run WorkloadSpec,
    /// Whether every key is written before the measured window.
    preload: bool,
    /// The measured window.
    duration: Duration,
}

/// Runs the load through the public client API: embedded, or remote with `--driver client`.
fn run_client(plan: &ClientRun, config: serde_json::Value) -> Result<RunResult, String> {
    let flags = plan.flags;
    let runtime = new_runtime(flags)?;
    let (client, server_pids) = match plan.target {
        Target::Embedded => (start_embedded(flags)?, Vec::new()),
        Target::Tessera { endpoints } => {
            let client = runtime
                .block_on(tessera_client::Client::connect(endpoints.clone()))
                .map_err(|error| format!("cannot connect: {error}"))?;
            let addresses: Vec<String> = client
                .topology()
                .nodes
                .iter()
                .flat_map(|node| node.cores.iter().map(|core| core.address.clone()))
                .collect();
            (client, server_pids_of(flags, &addresses))
        }
        _ => return Err("the client driver drives Tessera only".to_owned()),
    };
    // Every session shares the one client, as an application's tasks would.
    let callers = std::slice::from_ref(&client);
    let outcome = run_sessions(plan, config, &runtime, callers, &server_pids);
    client.shutdown();
    outcome
}

/// Starts `--embedded-cores` shards in this process, in memory.
fn start_embedded(flags: &Flags) -> Result<tessera_client::Client, String> {
    let config = tessera_client::EmbeddedConfig {
        cores: flags.embedded_cores,
        durability: tessera_server::config::Durability::Memory,
        ..tessera_client::EmbeddedConfig::default()
    };
    tessera_client::Client::embedded(config)
        .map_err(|error| format!("cannot start the embedded shards: {error}"))
}

/// Every core's address, in topology order.
fn addresses_of(topology: &Topology) -> Vec<String> {
    topology
        .nodes
        .iter()
        .flat_map(|node| node.cores.iter().map(|core| core.address.clone()))
        .collect()
}

/// Puts per second of the `watch-latency` writer without `--rate`: modest, so that the
/// latency is the delivery's and not a queue's, even with 1000 watchers.
const WATCH_LATENCY_RATE_DEFAULT: f64 = 100.0;

/// The clients and settings of a watch workload.
struct WatchRun<'run> {
    plan: &'run ClientRun<'run>,
    runtime: &'run tokio::runtime::Runtime,
    /// The writer's client (`watch-latency`; the client driver's point load).
    writer: &'run tessera_client::Client,
    /// The watchers' clients: watch `i` uses `watcher_clients[i / watchers_per_client]`.
    watcher_clients: &'run [tessera_client::Client],
    watchers_per_client: usize,
    watcher_count: usize,
    server_pids: &'run [u32],
}

impl WatchRun<'_> {
    fn open_watchers(&self, epoch: Option<Instant>) -> Result<watch_load::Watchers, String> {
        watch_load::Watchers::open(
            self.runtime,
            self.watcher_clients,
            self.watchers_per_client,
            self.watcher_count,
            workload::KEY_PREFIX,
            epoch,
        )
    }

    /// The report of watchers that received `counts` in `elapsed`.
    fn report(
        &self,
        counts: watch_load::Counts,
        elapsed: Duration,
        (server_watcher_count, server_watcher_count_end): (u64, u64),
    ) -> WatchReport {
        WatchReport {
            watchers: self.watcher_count,
            prefix: String::from_utf8_lossy(workload::KEY_PREFIX).into_owned(),
            clients: self.watcher_clients.len(),
            server_watcher_count,
            server_watcher_count_end,
            events: counts.events,
            events_per_sec: report::per_second(counts.events, elapsed),
            events_per_watcher_min: counts.events_per_watcher_min,
            events_per_watcher_max: counts.events_per_watcher_max,
            events_expected: None,
            latency: None,
            lagged_count: counts.lagged,
            error_count: counts.errors,
            peer: None,
        }
    }
}

/// Runs `--workload watch-latency` or `watch-fanout` against Tessera (remote or embedded):
/// the watchers always go through the client library.
fn run_watch(plan: &ClientRun, config: serde_json::Value) -> Result<RunResult, String> {
    let flags = plan.flags;
    let kind = plan.spec.kind;
    let watcher_count = flags.watchers.unwrap_or(match kind {
        WorkloadKind::WatchLatency => 1,
        _ => 100,
    });
    if watcher_count == 0 || flags.watchers_per_client == 0 {
        return Err("--watchers and --watchers-per-client must be at least 1".to_owned());
    }
    let runtime = new_runtime(flags)?;
    // The writer has a client of its own, as a separate application would; an embedded run
    // has one client (no connections to share out).
    let (writer, watcher_clients, watchers_per_client, server_pids) = match plan.target {
        Target::Embedded => {
            let client = start_embedded(flags)?;
            (client.clone(), vec![client], watcher_count, Vec::new())
        }
        Target::Tessera { endpoints } => {
            let connect = || {
                runtime
                    .block_on(tessera_client::Client::connect(endpoints.clone()))
                    .map_err(|error| format!("cannot connect: {error}"))
            };
            let writer = connect()?;
            let watcher_clients = (0..watcher_count.div_ceil(flags.watchers_per_client))
                .map(|_| connect())
                .collect::<Result<Vec<_>, _>>()?;
            let server_pids = server_pids_of(flags, &addresses_of(&writer.topology()));
            (
                writer,
                watcher_clients,
                flags.watchers_per_client,
                server_pids,
            )
        }
        _ => {
            return Err(
                "the watch workloads drive Tessera only (--endpoints or --embedded)".to_owned(),
            )
        }
    };
    let run = WatchRun {
        plan,
        runtime: &runtime,
        writer: &writer,
        watcher_clients: &watcher_clients,
        watchers_per_client,
        watcher_count,
        server_pids: &server_pids,
    };
    let outcome = match kind {
        WorkloadKind::WatchLatency => run_watch_latency(&run, config),
        _ => run_watch_fanout(&run, config),
    };
    writer.shutdown();
    outcome
}

/// Put-to-event latency: the watchers open first, then one writer puts stamped values at a
/// fixed rate for the window; the events of its last puts get [`watch_load::DRAIN_TIMEOUT`]
/// to arrive.
fn run_watch_latency(run: &WatchRun, config: serde_json::Value) -> Result<RunResult, String> {
    let WatchRun { plan, runtime, .. } = *run;
    let flags = plan.flags;
    if plan.spec.value_size < watch_load::STAMP_SIZE {
        return Err(format!(
            "--value-size {} cannot hold the {}-byte send stamp of watch-latency",
            plan.spec.value_size,
            watch_load::STAMP_SIZE
        ));
    }
    let rate = flags.rate.unwrap_or(WATCH_LATENCY_RATE_DEFAULT);
    let epoch = Instant::now();
    let watchers = run.open_watchers(Some(epoch))?;
    let before = watchers.snapshot();
    let (progress_sender, progress) = mpsc::channel();
    let (done_sender, done) = mpsc::channel::<()>();
    let measured = Measured::start(run.server_pids);
    let written = std::thread::scope(|scope| {
        let watchers = &watchers;
        scope.spawn(move || report_progress(&progress, flags.quiet));
        scope.spawn(move || watch_load::report_progress(watchers, &done, flags.quiet));
        let written = runtime.block_on(watch_load::write_stamped(
            run.writer.clone(),
            plan.spec.clone(),
            rate,
            plan.duration,
            epoch,
            Some(progress_sender),
        ));
        drop(done_sender);
        written
    });
    let (server_cpu_time, client_cpu_time) = measured.finish();
    let events_expected = written.put_ok_count * run.watcher_count as u64;
    watchers.wait_for(events_expected, watch_load::DRAIN_TIMEOUT);
    let counts = watchers.snapshot().since(&before);
    let server_watcher_count_end =
        runtime.block_on(watch_load::server_watcher_count(run.writer))?;
    let mut watch = run.report(
        counts,
        written.elapsed,
        (watchers.server_watcher_count, server_watcher_count_end),
    );
    watch.events_expected = Some(events_expected);
    watch.latency = watchers
        .latency()
        .map(|histogram| report::Summary::of(&histogram, 0, written.elapsed));
    drop(watchers);
    let window = Window {
        record: written.record,
        elapsed: written.elapsed,
        server_cpu_time,
        client_cpu_time,
    };
    let mut result = finish(plan.target, config, &window, run.server_pids, None);
    result.watch = Some(watch);
    Ok(result)
}

/// Events per second and the point load beside them: the load's window once with no
/// watchers (the peer), then once more with the watchers open, against the same server.
fn run_watch_fanout(run: &WatchRun, config: serde_json::Value) -> Result<RunResult, String> {
    let WatchRun { plan, runtime, .. } = *run;
    let ClientRun {
        flags,
        target,
        spec,
        preload,
        duration,
    } = *plan;
    let is_network = matches!(target, Target::Tessera { .. }) && flags.driver == Driver::Raw;
    let topology = run.writer.topology();
    let addresses = addresses_of(&topology);
    let router = TopologyRouter::new(&topology)?;
    let callers = std::slice::from_ref(run.writer);
    let preload_outcome = match (preload, is_network) {
        (false, _) => None,
        (true, true) => {
            let thread_count = flags.threads.min(flags.connections);
            Some(run_preload_network(
                flags,
                target,
                spec,
                &addresses,
                &router,
                thread_count,
            )?)
        }
        (true, false) => Some(preload_sessions(flags, spec, runtime, callers)?),
    };
    let measure = || {
        if is_network {
            measure_network(
                flags,
                target,
                spec,
                duration,
                &addresses,
                &router,
                run.server_pids,
            )
        } else {
            measure_sessions(flags, spec, duration, runtime, callers, run.server_pids)
        }
    };
    if !flags.quiet {
        eprintln!("peer window: no watchers");
    }
    let peer = measure()?;
    let watchers = run.open_watchers(None)?;
    if !flags.quiet {
        eprintln!(
            "watched window: {} watchers ({} on the server)",
            run.watcher_count, watchers.server_watcher_count
        );
    }
    let before = watchers.snapshot();
    let started = Instant::now();
    let (done_sender, done) = mpsc::channel::<()>();
    let watched = std::thread::scope(|scope| {
        let watchers = &watchers;
        scope.spawn(move || watch_load::report_progress(watchers, &done, flags.quiet));
        let watched = measure();
        drop(done_sender);
        watched
    })?;
    // Events count from just before the load's connections open to just after its threads
    // end, which holds the load's window.
    let counts = watchers.snapshot().since(&before);
    let events_elapsed = started.elapsed();
    let server_watcher_count_end =
        runtime.block_on(watch_load::server_watcher_count(run.writer))?;
    let mut watch = run.report(
        counts,
        events_elapsed,
        (watchers.server_watcher_count, server_watcher_count_end),
    );
    drop(watchers);
    let (peer_server_cpu, peer_client_cpu) = peer.cpu_usage(run.server_pids);
    let mut result = finish(target, config, &watched, run.server_pids, preload_outcome);
    let peer_total = report::Summary::of(
        &peer.record.combined(),
        peer.record.error_count(),
        peer.elapsed,
    );
    watch.peer = Some(PeerWindow {
        watchers: 0,
        duration_secs: peer.elapsed.as_secs_f64(),
        watched_ops_per_sec_ratio: if peer_total.ops_per_sec > 0.0 {
            result.total.ops_per_sec / peer_total.ops_per_sec
        } else {
            0.0
        },
        total: peer_total,
        server_cpu_us_per_op: peer_server_cpu.map(|usage| usage.us_per_op),
        client_cpu_us_per_op: peer_client_cpu.us_per_op,
    });
    result.watch = Some(watch);
    Ok(result)
}

/// Runs `--workload lease-keepalive`: Tessera through one shared client (remote or embedded),
/// or etcd with one client (and connection) per session.
fn run_leases(plan: &ClientRun, config: serde_json::Value) -> Result<RunResult, String> {
    let flags = plan.flags;
    if flags.rate.is_some() {
        return Err("--workload lease-keepalive is a closed loop; drop --rate".to_owned());
    }
    let lease_ttl = lease_ttl_of(flags)?;
    let lease_plan = LeasePlan::new(
        flags.leases,
        flags.batch,
        flags.connections,
        flags.pipeline,
        lease_ttl,
    )?;
    if lease_plan.batch_size() < flags.batch && !flags.quiet {
        eprintln!(
            "note: {} leases over {} sessions is at most {} per session, so each call renews \
             {} ids, not --batch {}",
            flags.leases,
            flags.connections,
            lease_plan.batch_size(),
            lease_plan.batch_size(),
            flags.batch
        );
    }
    let runtime = new_runtime(flags)?;
    run_coordination(
        plan,
        config,
        &runtime,
        "lease-keepalive",
        |config, client, server_pids| {
            let target = lease_load::TesseraLeases::new(client);
            measure_leases(plan, config, &runtime, &target, &lease_plan, server_pids)
        },
        #[cfg(feature = "etcd")]
        |config, address| {
            let target = runtime.block_on(etcd_load::connect_leases(address, flags.connections))?;
            let server_pids = server_pids_of(flags, std::slice::from_ref(address));
            measure_leases(plan, config, &runtime, &target, &lease_plan, &server_pids)
        },
    )
}

/// The lease TTL `--lease-ttl-secs` asks for (negative is zero).
///
/// # Errors
/// The flag is not finite, or too large to be a duration.
fn lease_ttl_of(flags: &Flags) -> Result<Duration, String> {
    if !(flags.lease_ttl_secs.is_finite() && flags.lease_ttl_secs < 1e9) {
        return Err(format!(
            "--lease-ttl-secs {} is not a usable TTL",
            flags.lease_ttl_secs
        ));
    }
    Ok(Duration::from_secs_f64(flags.lease_ttl_secs.max(0.0)))
}

/// Runs a coordination `workload` (lease-keepalive, lock) on its target: `measure_tessera` gets
/// one shared Tessera client (an embedded server's, shut down afterwards, or one connected to
/// `--endpoints`) and the server PIDs; `measure_etcd` gets the etcd address.
fn run_coordination(
    plan: &ClientRun,
    config: serde_json::Value,
    runtime: &tokio::runtime::Runtime,
    workload: &str,
    measure_tessera: impl FnOnce(
        serde_json::Value,
        tessera_client::Client,
        &[u32],
    ) -> Result<RunResult, String>,
    #[cfg(feature = "etcd")] measure_etcd: impl FnOnce(
        serde_json::Value,
        &String,
    ) -> Result<RunResult, String>,
) -> Result<RunResult, String> {
    let flags = plan.flags;
    match plan.target {
        Target::Embedded => {
            let client = start_embedded(flags)?;
            let outcome = measure_tessera(config, client.clone(), &[]);
            client.shutdown();
            outcome
        }
        Target::Tessera { endpoints } => {
            let client = runtime
                .block_on(tessera_client::Client::connect(endpoints.clone()))
                .map_err(|error| format!("cannot connect: {error}"))?;
            let server_pids = server_pids_of(flags, &addresses_of(&client.topology()));
            measure_tessera(config, client, &server_pids)
        }
        #[cfg(feature = "etcd")]
        Target::Etcd { address } => measure_etcd(config, address),
        _ => Err(format!(
            "--workload {workload} drives Tessera (--endpoints or --embedded) or etcd \
             (--target etcd://)"
        )),
    }
}

/// Grants the leases, renews them for the window, revokes them, and reports renewed leases
/// as the operations.
fn measure_leases<T: LeaseTarget>(
    plan: &ClientRun,
    config: serde_json::Value,
    runtime: &tokio::runtime::Runtime,
    target: &T,
    lease_plan: &LeasePlan,
    server_pids: &[u32],
) -> Result<RunResult, String> {
    let flags = plan.flags;
    let granted = lease_load::grant(runtime, target, lease_plan)?;
    if !flags.quiet {
        eprintln!(
            "granted {} leases in {:.2} s: {} sessions, {} ids per call, {} calls in flight \
             per session",
            lease_plan.lease_count,
            granted.elapsed.as_secs_f64(),
            lease_plan.session_count,
            lease_plan.batch_size(),
            lease_plan.pipeline
        );
    }
    let grant_elapsed = granted.elapsed;
    let (progress_sender, progress) = mpsc::channel();
    let measured = Measured::start(server_pids);
    let outcome = std::thread::scope(|scope| {
        let reporter = scope.spawn(move || lease_load::report_progress(&progress, flags.quiet));
        let outcome = lease_load::run(
            runtime,
            granted.sessions,
            lease_plan.pipeline,
            plan.duration,
            Some(&progress_sender),
        );
        drop(progress_sender);
        let _ = reporter.join();
        outcome
    });
    let (tally, elapsed) = outcome?;
    let (server_cpu_time, client_cpu_time) = measured.finish();
    let (revoke_errors, revoke_failure) = lease_load::revoke(runtime, target, &granted.leases);
    if let Some(error) = &tally.first_error {
        eprintln!(
            "warning: {} keepalive calls failed; the first: {error}",
            tally.record.error_count()
        );
    }
    if let Some(error) = revoke_failure {
        eprintln!("warning: {revoke_errors} revocations failed; the first: {error}");
    }
    let window = Window {
        record: tally.record,
        elapsed,
        server_cpu_time,
        client_cpu_time,
    };
    let mut result = finish_per(
        plan.target,
        config,
        &window,
        server_pids,
        tally.renewed_count,
        None,
    );
    let keepalive_calls = window.record.count();
    result.set_lease(LeaseReport {
        leases: lease_plan.lease_count,
        batch: lease_plan.batch_size(),
        lease_ttl_secs: lease_plan.ttl.as_secs_f64(),
        grant_duration_secs: grant_elapsed.as_secs_f64(),
        keepalive_calls,
        keepalive_calls_per_sec: report::per_second(keepalive_calls, elapsed),
        leases_renewed: tally.renewed_count,
        leases_lost: tally.lost_count,
        revoke_errors,
    });
    Ok(result)
}

/// Runs `--workload lock`: Tessera through one shared client (remote or embedded), or etcd
/// with one client (and connection) per contender.
fn run_locks(plan: &ClientRun, config: serde_json::Value) -> Result<RunResult, String> {
    let flags = plan.flags;
    if flags.rate.is_some() || flags.pipeline != 1 {
        return Err(
            "--workload lock is a closed loop of one lock call at a time per contender; drop \
             --rate and --pipeline"
                .to_owned(),
        );
    }
    let lease_ttl = lease_ttl_of(flags)?;
    let lock_plan = LockPlan::new(flags.contenders, flags.lock_names, lease_ttl)?;
    let runtime = new_runtime(flags)?;
    run_coordination(
        plan,
        config,
        &runtime,
        "lock",
        |config, client, server_pids| {
            let target = lock_load::TesseraLocks::new(client);
            measure_locks(plan, config, &runtime, &target, &lock_plan, server_pids)
        },
        #[cfg(feature = "etcd")]
        |config, address| {
            let target = etcd_load::EtcdLocks::new(address);
            let server_pids = server_pids_of(flags, std::slice::from_ref(address));
            measure_locks(plan, config, &runtime, &target, &lock_plan, &server_pids)
        },
    )
}

/// Opens the contenders (a lease each), runs their pairs for the window, closes them, and
/// reports completed pairs as the operations.
fn measure_locks<T: LockTarget>(
    plan: &ClientRun,
    config: serde_json::Value,
    runtime: &tokio::runtime::Runtime,
    target: &T,
    lock_plan: &LockPlan,
    server_pids: &[u32],
) -> Result<RunResult, String> {
    let flags = plan.flags;
    let opened = lock_load::open(runtime, target, lock_plan)?;
    if !flags.quiet {
        eprintln!(
            "opened {} contenders (a lease each) in {:.2} s, on {} lock(s) ({})",
            lock_plan.contender_count,
            opened.elapsed.as_secs_f64(),
            lock_plan.lock_count(),
            lock_plan.names.name()
        );
    }
    let setup_elapsed = opened.elapsed;
    let progress = std::sync::Arc::new(lock_load::Progress::default());
    let (done_sender, done) = mpsc::channel::<()>();
    let measured = Measured::start(server_pids);
    let outcome = std::thread::scope(|scope| {
        let reporter = {
            let progress = &progress;
            scope.spawn(move || lock_load::report_progress(progress, &done, flags.quiet))
        };
        let outcome = lock_load::run(
            runtime,
            lock_plan,
            opened.sessions,
            plan.duration,
            Some(&progress),
        );
        drop(done_sender);
        let _ = reporter.join();
        outcome
    });
    let (sessions, tally, elapsed) = outcome?;
    let (server_cpu_time, client_cpu_time) = measured.finish();
    let (close_errors, close_failure) = lock_load::close(runtime, target, sessions);
    if let Some(error) = &tally.first_error {
        eprintln!(
            "warning: {} lock calls failed; the first: {error}",
            tally.record.error_count()
        );
    }
    if let Some(error) = close_failure {
        eprintln!("warning: {close_errors} lease revocations failed; the first: {error}");
    }
    if tally.overlap_count > 0 || tally.token_violation_count > 0 {
        eprintln!(
            "warning: the lock broke its promise: {} overlaps, {} token violations",
            tally.overlap_count, tally.token_violation_count
        );
    }
    let window = Window {
        record: tally.record,
        elapsed,
        server_cpu_time,
        client_cpu_time,
    };
    let pair_count = window.record.op(Op::LockPair).count();
    let mut result = finish_per(plan.target, config, &window, server_pids, pair_count, None);
    let summary_of = |op: Op| {
        let record = window.record.op(op);
        report::Summary::of(&record.histogram, record.error_count, elapsed)
    };
    let acquire = summary_of(Op::Lock);
    let pair = summary_of(Op::LockPair);
    result.set_lock(
        LockReport {
            contenders: lock_plan.contender_count,
            lock_names: lock_plan.names.name(),
            locks: lock_plan.lock_count(),
            lock_wait_secs: lock_load::LOCK_WAIT.as_secs_f64(),
            lease_ttl_secs: lock_plan.ttl.as_secs_f64(),
            setup_duration_secs: setup_elapsed.as_secs_f64(),
            pairs: pair_count,
            acquire_p50_us: acquire.p50_us,
            acquire_p99_us: acquire.p99_us,
            acquire_max_us: acquire.max_us,
            lock_timeouts: tally.lock_timeout_count,
            unlocks_refused: tally.unlock_refused_count,
            overlaps: tally.overlap_count,
            token_violations: tally.token_violation_count,
            drained_pairs: tally.drained_pair_count,
            close_errors,
        },
        &pair,
    );
    Ok(result)
}

/// Runs the load against one etcd member, one etcd client (and connection) per session.
#[cfg(feature = "etcd")]
fn run_etcd(
    plan: &ClientRun,
    address: &str,
    config: serde_json::Value,
) -> Result<RunResult, String> {
    etcd_load::check_workload(plan.spec.kind)?;
    let runtime = new_runtime(plan.flags)?;
    let callers = runtime.block_on(etcd_load::connect(address, plan.flags.connections))?;
    let server_pids = server_pids_of(plan.flags, &[address.to_owned()]);
    run_sessions(plan, config, &runtime, &callers, &server_pids)
}

/// The tokio runtime of the client-library drivers, with `--threads` workers.
fn new_runtime(flags: &Flags) -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(flags.threads)
        .enable_all()
        .build()
        .map_err(|error| format!("cannot start tokio: {error}"))
}

/// The server processes to measure: `--server-pid`, or the local listeners on `addresses`.
fn server_pids_of(flags: &Flags, addresses: &[String]) -> Vec<u32> {
    if flags.server_pids.is_empty() {
        cpu::pids_listening_on(&ports_of(addresses))
    } else {
        flags.server_pids.clone()
    }
}

/// The preload (if asked for) and the measured window of a client-library run, with one
/// session per `--connections`; session `i` calls through `callers[i % callers.len()]`.
fn run_sessions<C: client_load::Caller>(
    plan: &ClientRun,
    config: serde_json::Value,
    runtime: &tokio::runtime::Runtime,
    callers: &[C],
    server_pids: &[u32],
) -> Result<RunResult, String> {
    let ClientRun {
        flags,
        target,
        spec,
        preload,
        duration,
    } = *plan;
    let preload_outcome = if preload {
        Some(preload_sessions(flags, spec, runtime, callers)?)
    } else {
        None
    };
    let window = measure_sessions(flags, spec, duration, runtime, callers, server_pids)?;
    Ok(finish(
        target,
        config,
        &window,
        server_pids,
        preload_outcome,
    ))
}

/// Writes every key once through the client library, before the measured window.
fn preload_sessions<C: client_load::Caller>(
    flags: &Flags,
    spec: &WorkloadSpec,
    runtime: &tokio::runtime::Runtime,
    callers: &[C],
) -> Result<Preload, String> {
    let started = Instant::now();
    let load = client_load::ClientLoad {
        session_count: flags.connections,
        pipeline: flags.pipeline.max(PRELOAD_PIPELINE),
        rate_per_session: None,
        operation_count_max: None,
        duration: None,
    };
    let (record, _) = client_load::run(runtime, callers, spec, &load, true, None)?;
    finish_preload(spec, &record, started.elapsed())
}

/// The measured window of a client-library run, one session per `--connections`.
fn measure_sessions<C: client_load::Caller>(
    flags: &Flags,
    spec: &WorkloadSpec,
    duration: Duration,
    runtime: &tokio::runtime::Runtime,
    callers: &[C],
    server_pids: &[u32],
) -> Result<Window, String> {
    let session_count = flags.connections;
    let load = client_load::ClientLoad {
        session_count,
        pipeline: flags.pipeline,
        rate_per_session: flags.rate.map(|rate| rate / session_count as f64),
        operation_count_max: flags
            .operations
            .map(|count| count.div_ceil(session_count as u64)),
        duration: Some(duration),
    };
    let (progress_sender, progress) = mpsc::channel();
    let measured = Measured::start(server_pids);
    let outcome = std::thread::scope(|scope| {
        let reporter = scope.spawn(move || report_progress(&progress, flags.quiet));
        let outcome =
            client_load::run(runtime, callers, spec, &load, false, Some(&progress_sender));
        drop(progress_sender);
        let _ = reporter.join();
        outcome
    });
    let (record, elapsed) = outcome?;
    let (server_cpu_time, client_cpu_time) = measured.finish();
    Ok(Window {
        record,
        elapsed,
        server_cpu_time,
        client_cpu_time,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_and_operations_are_shared_exactly() {
        let sessions: usize = (0..3).map(|index| sessions_of_thread(50, 3, index)).sum();
        assert_eq!(sessions, 50);
        let operations: u64 = (0..3).map(|index| share_of(1_000, 3, index)).sum();
        assert_eq!(operations, 1_000);
    }

    #[test]
    fn targets_parse_from_flags() {
        let flags = Flags::parse_from(["tessera-bench", "--target", "redis://127.0.0.1:6379"]);
        assert!(matches!(
            Target::from_flags(&flags).unwrap(),
            Target::Redis { address } if address == "127.0.0.1:6379"
        ));
        let flags = Flags::parse_from(["tessera-bench", "--target", "echo://a:1,a:2"]);
        assert!(matches!(
            Target::from_flags(&flags).unwrap(),
            Target::Echo { addresses } if addresses.len() == 2
        ));
        let flags = Flags::parse_from(["tessera-bench", "--endpoints", "h:7000,h:7001"]);
        assert!(matches!(
            Target::from_flags(&flags).unwrap(),
            Target::Tessera { endpoints } if endpoints.len() == 2
        ));
        let flags = Flags::parse_from(["tessera-bench"]);
        assert!(Target::from_flags(&flags).is_err());
    }

    #[cfg(feature = "etcd")]
    #[test]
    fn etcd_targets_name_one_member() {
        let flags = Flags::parse_from(["tessera-bench", "--target", "etcd://127.0.0.1:2379/"]);
        assert!(matches!(
            Target::from_flags(&flags).unwrap(),
            Target::Etcd { address } if address == "127.0.0.1:2379"
        ));
        for text in ["etcd://", "etcd://a:1,b:2"] {
            let flags = Flags::parse_from(["tessera-bench", "--target", text]);
            let error = Target::from_flags(&flags).unwrap_err();
            assert!(error.contains("one member"), "{text}: {error}");
        }
    }

    #[test]
    fn even_routing_covers_every_route() {
        let router = EvenRouter { route_count: 3 };
        let mut seen = [false; 3];
        let mut key = Vec::new();
        let spec = WorkloadSpec {
            kind: WorkloadKind::Get,
            read_fraction: 1.0,
            key_count: 1_000,
            key_size: 16,
            value_size: 1,
            distribution: KeyDistribution::Uniform,
            zipf_exponent: 1.0,
            seed: 0,
            fields: false,
        };
        for index in 0..1_000 {
            spec.write_key(index, &mut key);
            seen[router.route(&key)] = true;
        }
        assert_eq!(seen, [true; 3]);
    }
}
