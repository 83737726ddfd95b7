//! The server's configuration: read once at startup from flags, `TESSERA_*` environment
//! variables and an optional TOML file (flags win over the environment, which wins over the
//! file, which wins over defaults), validated, and never changed afterwards.
//!
//! Every limit the server enforces is a field here, so an operator can see all of them with
//! `tessera-server --print-config`.

use std::path::{Path, PathBuf};

use clap::Parser;
use serde::{Deserialize, Serialize};
use tessera_protocol::limits::{CORE_COUNT_MAX, TEXT_SIZE_MAX};

use crate::cluster::{derived_port, Own, ADMIN_PORT_OFFSET, PEER_PORT_OFFSET};
pub use crate::cluster::{ClusterConfig, ClusterNode};
pub use crate::durability::Durability;
use crate::error::ConfigError;
use crate::shard::lease::LeaseLimits;
use crate::shard::lock::LockLimits;
use crate::shard::watch::WatchLimits;

/// The effective configuration of one server instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Instance name, reported in the topology and logs.
    pub name: String,
    /// This node's id in the cluster topology.
    pub node_id: u32,
    /// Address the listeners bind to.
    pub host: String,
    /// Port of core 0; core `i` listens on `port + i`. 0 lets the OS pick a free port per core.
    pub port: u16,
    /// Host clients are told to connect to; defaults to `host`.
    pub advertise_host: Option<String>,
    /// Port of the admin HTTP endpoint (`/metrics`, `/health`); defaults to `port + 1000`
    /// (any free port when `port` is 0).
    pub admin_port: Option<u16>,
    /// UDP port this node receives peers' heartbeats on; defaults to `port + 2000` (any free
    /// port when `port` is 0).
    pub peer_port: Option<u16>,
    /// The cluster this instance belongs to. Without it the instance is a cluster of one.
    pub cluster: Option<ClusterConfig>,
    /// Number of cores (shards). Each runs one pinned executor.
    pub cores: usize,
    /// CPUs to pin core `i` to (`cpus[i % len]`); defaults to the online CPUs in order.
    pub cpus: Option<Vec<usize>>,
    /// Open connections allowed across all cores; more are refused with `Overloaded`.
    pub connection_count_max: usize,
    /// Requests one connection may have in flight (read but not answered).
    pub connection_inflight_max: usize,
    /// Reply bytes a connection buffers before it stops reading and flushes.
    pub connection_write_buffer_bytes_max: usize,
    /// Memory budget for stored entries across all cores, split evenly between them.
    pub memory_bytes_max: u64,
    /// Requests a core's inbox (forwards and embedded calls) holds before refusing more.
    pub inbox_capacity: usize,
    /// How often each core reclaims expired keys, in milliseconds.
    pub tick_ms: u64,
    /// Most keys one core reclaims per tick, so a mass expiry cannot stall it.
    pub expired_per_tick_max: usize,
    /// How long one core may spend on one query, in milliseconds, before it refuses it
    /// with `BudgetExceeded` (the core serves nothing else meanwhile).
    pub query_time_budget_ms: u64,
    /// Most matches one core collects to sort for one query (an `order_by` no index gives,
    /// or candidates from an index out of key order); past it the query is refused.
    pub query_sort_items_max: usize,
    /// Most change events each core keeps for watchers to resume from.
    pub watch_history_events_max: usize,
    /// Most bytes of change events each core keeps for watchers to resume from.
    pub watch_history_bytes_max: u64,
    /// Most watchers on one core.
    pub watchers_per_shard_max: usize,
    /// Most bytes of events queued for one watcher before it is cancelled as lagging.
    pub watch_queue_bytes_max: u64,
    /// Most bytes of events queued for all of one core's watchers together; past it, the
    /// watcher with the longest queue is cancelled as lagging.
    pub watch_queue_total_bytes_max: u64,
    /// Most watches one client connection may have open.
    pub watchers_per_connection_max: usize,
    /// Most leases homed on one core.
    pub leases_per_shard_max: usize,
    /// Most keys of one core attached to leases.
    pub lease_keys_per_shard_max: usize,
    /// Most locks one core remembers (held or released).
    pub locks_per_shard_max: usize,
    /// Most lock requests waiting in line on one core.
    pub lock_waiters_per_shard_max: usize,
    /// Locked memory each executor registers for `io_uring`, in bytes.
    pub io_memory_bytes: usize,
    /// Longest a graceful shutdown waits for connections to finish, in milliseconds.
    pub shutdown_timeout_ms: u64,
    /// Log filter (`tracing_subscriber::EnvFilter` syntax), e.g. `info` or `tessera_server=debug`.
    pub log: String,
    /// Where log lines go: `stderr`, or `file:/path` (appended to).
    pub log_target: LogTarget,
    /// The directory where every running instance on this host registers its CPUs and ports
    /// (`<name>.<pid>.instance`), so a second instance that would share them is refused.
    pub instance_dir: PathBuf,
    /// Where the write-ahead logs live (one directory per core inside it).
    pub data_dir: PathBuf,
    /// How writes are made durable: `sync`, `async` or `memory`.
    pub durability: Durability,
    /// In `async` mode, how often the log is written and synced, in milliseconds: the window
    /// of acknowledged writes a crash can lose.
    pub flush_interval_ms: u64,
    /// `sync` mode: after a sync of several writes, how long at most (microseconds) the log
    /// waits for the writers it just answered before it syncs again; 0 never waits.
    pub group_commit_wait_us: u64,
    /// A log segment is closed and a new one started past this size, in bytes.
    pub segment_bytes_max: u64,
    /// A snapshot of each core is taken once this many bytes were logged since the last
    /// one, and the log is truncated behind it; 0 takes none.
    pub snapshot_log_bytes: u64,
    /// Start even if the log is damaged before its end: keep what precedes the damage and
    /// drop the rest (logged). Without it such a log refuses to start.
    pub repair: bool,
}

/// Command-line flags. Every flag may also come from its `TESSERA_*` environment variable.
#[derive(Debug, Clone, Default, Parser)]
#[command(
    name = "tessera-server",
    version,
    about = "Tessera key-value and coordination server"
)]
#[allow(clippy::struct_field_names, reason = "flag names mirror Config fields")]
pub struct Flags {
    /// TOML file with any of the settings below (flags and environment win over it).
    #[arg(long, env = "TESSERA_CONFIG")]
    pub config: Option<PathBuf>,
    /// Print the effective configuration as TOML and exit.
    #[arg(long)]
    pub print_config: bool,
    /// Instance name.
    #[arg(long, env = "TESSERA_NAME")]
    pub name: Option<String>,
    /// Node id in the cluster.
    #[arg(long, env = "TESSERA_NODE_ID")]
    pub node_id: Option<u32>,
    /// Address to bind (default 127.0.0.1).
    #[arg(long, env = "TESSERA_HOST")]
    pub host: Option<String>,
    /// Port of core 0; core i listens on port + i (default 7000; 0 = any free port).
    #[arg(long, env = "TESSERA_PORT")]
    pub port: Option<u16>,
    /// Host advertised to clients in the topology (default: --host).
    #[arg(long, env = "TESSERA_ADVERTISE_HOST")]
    pub advertise_host: Option<String>,
    /// Port of the admin HTTP endpoint, `/metrics` and `/health` (default: --port + 1000).
    #[arg(long, env = "TESSERA_ADMIN_PORT")]
    pub admin_port: Option<u16>,
    /// UDP port for peers' heartbeats (default: --port + 2000).
    #[arg(long, env = "TESSERA_PEER_PORT")]
    pub peer_port: Option<u16>,
    /// TOML file with the cluster's nodes (the `[cluster]` table's contents); overrides a
    /// `[cluster]` table in --config.
    #[arg(long, env = "TESSERA_CLUSTER_FILE")]
    pub cluster_file: Option<PathBuf>,
    /// Number of cores/shards (default: all online CPUs, or the length of --cpus).
    #[arg(long, env = "TESSERA_CORES")]
    pub cores: Option<usize>,
    /// CPUs to pin to, e.g. "0-3,6" (default: online CPUs).
    #[arg(long, env = "TESSERA_CPUS", value_parser = parse_cpu_list)]
    pub cpus: Option<CpuList>,
    /// Open connections allowed across all cores.
    #[arg(long, env = "TESSERA_CONNECTION_COUNT_MAX")]
    pub connection_count_max: Option<usize>,
    /// Requests in flight per connection.
    #[arg(long, env = "TESSERA_CONNECTION_INFLIGHT_MAX")]
    pub connection_inflight_max: Option<usize>,
    /// Reply bytes buffered per connection before flushing (accepts KiB/MiB/GiB).
    #[arg(long, env = "TESSERA_CONNECTION_WRITE_BUFFER_BYTES_MAX", value_parser = parse_size)]
    pub connection_write_buffer_bytes_max: Option<u64>,
    /// Memory budget for entries across all cores (accepts KiB/MiB/GiB; default half of RAM).
    #[arg(long, env = "TESSERA_MEMORY_BYTES_MAX", value_parser = parse_size)]
    pub memory_bytes_max: Option<u64>,
    /// Capacity of each core's cross-thread inbox.
    #[arg(long, env = "TESSERA_INBOX_CAPACITY")]
    pub inbox_capacity: Option<usize>,
    /// Expiry tick interval in milliseconds.
    #[arg(long, env = "TESSERA_TICK_MS")]
    pub tick_ms: Option<u64>,
    /// Keys reclaimed per core per tick at most.
    #[arg(long, env = "TESSERA_EXPIRED_PER_TICK_MAX")]
    pub expired_per_tick_max: Option<usize>,
    /// Time one core may spend on one query, in milliseconds.
    #[arg(long, env = "TESSERA_QUERY_TIME_BUDGET_MS")]
    pub query_time_budget_ms: Option<u64>,
    /// Matches one core collects to sort for one query at most.
    #[arg(long, env = "TESSERA_QUERY_SORT_ITEMS_MAX")]
    pub query_sort_items_max: Option<usize>,
    /// Change events each core keeps for watchers to resume from (default 1024).
    #[arg(long, env = "TESSERA_WATCH_HISTORY_EVENTS_MAX")]
    pub watch_history_events_max: Option<usize>,
    /// Bytes of change events each core keeps (accepts KiB/MiB; default 4 MiB).
    #[arg(long, env = "TESSERA_WATCH_HISTORY_BYTES_MAX", value_parser = parse_size)]
    pub watch_history_bytes_max: Option<u64>,
    /// Watchers one core holds at most (default 10000).
    #[arg(long, env = "TESSERA_WATCHERS_PER_SHARD_MAX")]
    pub watchers_per_shard_max: Option<usize>,
    /// Bytes queued for one watcher before it is cancelled as lagging (accepts KiB/MiB;
    /// default 1 MiB).
    #[arg(long, env = "TESSERA_WATCH_QUEUE_BYTES_MAX", value_parser = parse_size)]
    pub watch_queue_bytes_max: Option<u64>,
    /// Bytes queued for all of one core's watchers before the one with the longest queue is
    /// cancelled as lagging (accepts KiB/MiB; default 64 MiB).
    #[arg(long, env = "TESSERA_WATCH_QUEUE_TOTAL_BYTES_MAX", value_parser = parse_size)]
    pub watch_queue_total_bytes_max: Option<u64>,
    /// Watches one client connection may have open (default 1000).
    #[arg(long, env = "TESSERA_WATCHERS_PER_CONNECTION_MAX")]
    pub watchers_per_connection_max: Option<usize>,
    /// Leases homed on one core (default 100000); past it a grant is refused `TableFull`.
    #[arg(long, env = "TESSERA_LEASES_PER_SHARD_MAX")]
    pub leases_per_shard_max: Option<usize>,
    /// Keys of one core attached to leases (default 1000000); past it a put with a lease is
    /// refused `TableFull`.
    #[arg(long, env = "TESSERA_LEASE_KEYS_PER_SHARD_MAX")]
    pub lease_keys_per_shard_max: Option<usize>,
    /// Locks one core remembers, held or released (default 100000); a lock of a new name
    /// past it is refused `TableFull`.
    #[arg(long, env = "TESSERA_LOCKS_PER_SHARD_MAX")]
    pub locks_per_shard_max: Option<usize>,
    /// Lock requests waiting in line on one core (default 100000); past it a request that
    /// would wait is refused `TableFull`.
    #[arg(long, env = "TESSERA_LOCK_WAITERS_PER_SHARD_MAX")]
    pub lock_waiters_per_shard_max: Option<usize>,
    /// `io_uring` registered memory per core (accepts KiB/MiB).
    #[arg(long, env = "TESSERA_IO_MEMORY_BYTES", value_parser = parse_size)]
    pub io_memory_bytes: Option<u64>,
    /// Graceful shutdown limit in milliseconds.
    #[arg(long, env = "TESSERA_SHUTDOWN_TIMEOUT_MS")]
    pub shutdown_timeout_ms: Option<u64>,
    /// Log filter, e.g. `info` or `tessera_server=debug`.
    #[arg(long, env = "TESSERA_LOG")]
    pub log: Option<String>,
    /// Where log lines go: `stderr` (default) or `file:/path` (appended to).
    #[arg(long, env = "TESSERA_LOG_TARGET", value_parser = parse_log_target)]
    pub log_target: Option<LogTarget>,
    /// Directory where running instances register their CPUs and ports (default:
    /// `$XDG_RUNTIME_DIR/tessera`, else `/run/tessera` as root, else `<temp>/tessera-<uid>`).
    #[arg(long, env = "TESSERA_INSTANCE_DIR")]
    pub instance_dir: Option<PathBuf>,
    /// Directory of the write-ahead logs (default `tessera-data`).
    #[arg(long, env = "TESSERA_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// `sync` (acknowledge after fdatasync; default), `async` (flush every
    /// --flush-interval-ms) or `memory` (no log).
    #[arg(long, env = "TESSERA_DURABILITY")]
    pub durability: Option<Durability>,
    /// Flush interval of `--durability async`, in milliseconds (default 100).
    #[arg(long, env = "TESSERA_FLUSH_INTERVAL_MS")]
    pub flush_interval_ms: Option<u64>,
    /// `sync` mode: longest wait, in microseconds, for the writers just answered before the
    /// next sync (default 250; 0 never waits).
    #[arg(long, env = "TESSERA_GROUP_COMMIT_WAIT_US")]
    pub group_commit_wait_us: Option<u64>,
    /// Size at which a log segment is closed (accepts KiB/MiB/GiB; default 64 MiB).
    #[arg(long, env = "TESSERA_SEGMENT_BYTES_MAX", value_parser = parse_size)]
    pub segment_bytes_max: Option<u64>,
    /// Bytes logged after which a core takes a snapshot and truncates its log (accepts
    /// KiB/MiB/GiB; default 256 MiB; 0 takes none).
    #[arg(long, env = "TESSERA_SNAPSHOT_LOG_BYTES", value_parser = parse_size)]
    pub snapshot_log_bytes: Option<u64>,
    /// Start despite a log damaged before its end, dropping what follows the damage.
    #[arg(long, env = "TESSERA_REPAIR")]
    pub repair: bool,
}

/// Where the server writes its log lines.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum LogTarget {
    /// Standard error (under systemd, the journal).
    Stderr,
    /// A file, opened for appending (created if missing).
    File(PathBuf),
}

impl std::str::FromStr for LogTarget {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text.strip_prefix("file:") {
            Some("") => {
                Err("log target file: needs a path, e.g. file:/var/log/tessera.log".to_owned())
            }
            Some(path) => Ok(Self::File(PathBuf::from(path))),
            None if text == "stderr" => Ok(Self::Stderr),
            None => Err(format!(
                "log target {text:?} is neither stderr nor file:/path"
            )),
        }
    }
}

impl std::fmt::Display for LogTarget {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Stderr => formatter.write_str("stderr"),
            Self::File(path) => write!(formatter, "file:{}", path.display()),
        }
    }
}

impl TryFrom<String> for LogTarget {
    type Error = String;

    fn try_from(text: String) -> Result<Self, Self::Error> {
        text.parse()
    }
}

impl From<LogTarget> for String {
    fn from(target: LogTarget) -> Self {
        target.to_string()
    }
}

/// Parses a log target: `stderr` or `file:/path`.
///
/// # Errors
/// The text is neither.
pub fn parse_log_target(text: &str) -> Result<LogTarget, String> {
    text.parse()
}

/// The instance registry's directory when none is configured: the user's runtime directory
/// if the session has one, `/run/tessera` for root (where systemd's `RuntimeDirectory=`
/// puts it too), else a directory of this user's own under the temporary directory.
pub fn default_instance_dir() -> PathBuf {
    if let Some(runtime) = std::env::var_os("XDG_RUNTIME_DIR").filter(|value| !value.is_empty()) {
        return PathBuf::from(runtime).join("tessera");
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let uid = unsafe { libc::geteuid() };
    if uid == 0 {
        PathBuf::from("/run/tessera")
    } else {
        std::env::temp_dir().join(format!("tessera-{uid}"))
    }
}

/// A parsed CPU list such as `0-3,6`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuList(pub Vec<usize>);

/// The settings a TOML file may hold: the same names as [`Config`], all optional.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    name: Option<String>,
    node_id: Option<u32>,
    host: Option<String>,
    port: Option<u16>,
    advertise_host: Option<String>,
    admin_port: Option<u16>,
    peer_port: Option<u16>,
    cluster: Option<ClusterConfig>,
    cluster_file: Option<PathBuf>,
    cores: Option<usize>,
    cpus: Option<Vec<usize>>,
    connection_count_max: Option<usize>,
    connection_inflight_max: Option<usize>,
    connection_write_buffer_bytes_max: Option<usize>,
    memory_bytes_max: Option<u64>,
    inbox_capacity: Option<usize>,
    tick_ms: Option<u64>,
    expired_per_tick_max: Option<usize>,
    query_time_budget_ms: Option<u64>,
    query_sort_items_max: Option<usize>,
    watch_history_events_max: Option<usize>,
    watch_history_bytes_max: Option<u64>,
    watchers_per_shard_max: Option<usize>,
    watch_queue_bytes_max: Option<u64>,
    watch_queue_total_bytes_max: Option<u64>,
    watchers_per_connection_max: Option<usize>,
    leases_per_shard_max: Option<usize>,
    lease_keys_per_shard_max: Option<usize>,
    locks_per_shard_max: Option<usize>,
    lock_waiters_per_shard_max: Option<usize>,
    io_memory_bytes: Option<usize>,
    shutdown_timeout_ms: Option<u64>,
    log: Option<String>,
    log_target: Option<LogTarget>,
    instance_dir: Option<PathBuf>,
    data_dir: Option<PathBuf>,
    durability: Option<Durability>,
    flush_interval_ms: Option<u64>,
    group_commit_wait_us: Option<u64>,
    segment_bytes_max: Option<u64>,
    snapshot_log_bytes: Option<u64>,
    repair: Option<bool>,
}

/// Default base port.
pub const PORT_DEFAULT: u16 = 7000;

impl Default for Config {
    fn default() -> Self {
        let online_cpus = online_cpu_count();
        Self {
            name: "tessera".to_owned(),
            node_id: 1,
            host: "127.0.0.1".to_owned(),
            port: PORT_DEFAULT,
            advertise_host: None,
            admin_port: None,
            peer_port: None,
            cluster: None,
            cores: online_cpus,
            cpus: None,
            connection_count_max: 10_000,
            connection_inflight_max: 1024,
            connection_write_buffer_bytes_max: 4 * 1024 * 1024,
            memory_bytes_max: physical_memory_bytes().map_or(1 << 30, |bytes| bytes / 2),
            inbox_capacity: 4096,
            tick_ms: 10,
            expired_per_tick_max: 10_000,
            query_time_budget_ms: 1000,
            query_sort_items_max: 100_000,
            watch_history_events_max: WatchLimits::default().history_events_max,
            watch_history_bytes_max: WatchLimits::default().history_bytes_max as u64,
            watchers_per_shard_max: WatchLimits::default().watchers_max,
            watch_queue_bytes_max: WatchLimits::default().queue_bytes_max as u64,
            watch_queue_total_bytes_max: WatchLimits::default().queue_total_bytes_max as u64,
            watchers_per_connection_max: 1_000,
            leases_per_shard_max: LeaseLimits::default().leases_max,
            lease_keys_per_shard_max: LeaseLimits::default().attached_keys_max,
            locks_per_shard_max: LockLimits::default().locks_max,
            lock_waiters_per_shard_max: LockLimits::default().waiters_max,
            io_memory_bytes: 1024 * 1024,
            shutdown_timeout_ms: 5_000,
            log: "info".to_owned(),
            log_target: LogTarget::Stderr,
            instance_dir: default_instance_dir(),
            data_dir: PathBuf::from("tessera-data"),
            durability: Durability::Sync,
            flush_interval_ms: 100,
            group_commit_wait_us: 250,
            segment_bytes_max: 64 * 1024 * 1024,
            snapshot_log_bytes: 256 * 1024 * 1024,
            repair: false,
        }
    }
}

impl Config {
    /// Reads flags (and their environment variables) from the process arguments, then the
    /// TOML file they name, and returns the validated result.
    ///
    /// # Errors
    /// The file cannot be read or parsed, or a setting is invalid.
    pub fn from_flags(flags: &Flags) -> Result<Self, ConfigError> {
        let mut file = match &flags.config {
            Some(path) => read_file(path)?,
            None => FileConfig::default(),
        };
        let cluster_file = flags.cluster_file.as_ref().or(file.cluster_file.as_ref());
        if let Some(path) = cluster_file {
            // A relative path in a config file is relative to that file.
            let path = match (&flags.cluster_file, &flags.config) {
                (None, Some(config_path)) if path.is_relative() => config_path
                    .parent()
                    .map_or_else(|| path.clone(), |directory| directory.join(path)),
                _ => path.clone(),
            };
            file.cluster = Some(read_toml(&path)?);
        }
        let file_sets_cores = file.cores.is_some();
        let mut config = Self::default();
        config.overlay_file(file);
        config.overlay_flags(flags)?;
        // A CPU list without an explicit core count means one core per listed CPU.
        if flags.cores.is_none() && !file_sets_cores {
            if let Some(cpus) = &config.cpus {
                config.cores = cpus.len();
            }
        }
        config.validate()?;
        Ok(config)
    }

    fn overlay_file(&mut self, file: FileConfig) {
        macro_rules! take {
            ($($field:ident),*) => { $( if let Some(value) = file.$field { self.$field = value; } )* };
        }
        take!(
            name,
            node_id,
            host,
            port,
            cores,
            connection_count_max,
            connection_inflight_max,
            connection_write_buffer_bytes_max,
            memory_bytes_max,
            inbox_capacity,
            tick_ms,
            expired_per_tick_max,
            query_time_budget_ms,
            query_sort_items_max,
            watch_history_events_max,
            watch_history_bytes_max,
            watchers_per_shard_max,
            watch_queue_bytes_max,
            watch_queue_total_bytes_max,
            watchers_per_connection_max,
            leases_per_shard_max,
            lease_keys_per_shard_max,
            locks_per_shard_max,
            lock_waiters_per_shard_max,
            io_memory_bytes,
            shutdown_timeout_ms,
            log,
            log_target,
            instance_dir,
            data_dir,
            durability,
            flush_interval_ms,
            group_commit_wait_us,
            segment_bytes_max,
            snapshot_log_bytes,
            repair
        );
        if file.advertise_host.is_some() {
            self.advertise_host = file.advertise_host;
        }
        if file.admin_port.is_some() {
            self.admin_port = file.admin_port;
        }
        if file.peer_port.is_some() {
            self.peer_port = file.peer_port;
        }
        if file.cluster.is_some() {
            self.cluster = file.cluster;
        }
        if file.cpus.is_some() {
            self.cpus = file.cpus;
        }
    }

    fn overlay_flags(&mut self, flags: &Flags) -> Result<(), ConfigError> {
        macro_rules! take {
            ($($field:ident),*) => { $( if let Some(value) = &flags.$field { self.$field = value.clone(); } )* };
        }
        take!(
            name,
            node_id,
            host,
            port,
            cores,
            connection_count_max,
            connection_inflight_max,
            inbox_capacity,
            tick_ms,
            expired_per_tick_max,
            query_time_budget_ms,
            query_sort_items_max,
            watch_history_events_max,
            watch_history_bytes_max,
            watchers_per_shard_max,
            watch_queue_bytes_max,
            watch_queue_total_bytes_max,
            watchers_per_connection_max,
            leases_per_shard_max,
            lease_keys_per_shard_max,
            locks_per_shard_max,
            lock_waiters_per_shard_max,
            shutdown_timeout_ms,
            log,
            log_target,
            instance_dir,
            data_dir,
            durability,
            flush_interval_ms,
            group_commit_wait_us,
            segment_bytes_max,
            snapshot_log_bytes
        );
        if flags.repair {
            self.repair = true;
        }
        if let Some(bytes) = flags.memory_bytes_max {
            self.memory_bytes_max = bytes;
        }
        if let Some(bytes) = flags.connection_write_buffer_bytes_max {
            self.connection_write_buffer_bytes_max =
                to_usize("connection_write_buffer_bytes_max", bytes)?;
        }
        if let Some(bytes) = flags.io_memory_bytes {
            self.io_memory_bytes = to_usize("io_memory_bytes", bytes)?;
        }
        if flags.advertise_host.is_some() {
            self.advertise_host.clone_from(&flags.advertise_host);
        }
        if flags.admin_port.is_some() {
            self.admin_port = flags.admin_port;
        }
        if flags.peer_port.is_some() {
            self.peer_port = flags.peer_port;
        }
        if let Some(cpus) = &flags.cpus {
            self.cpus = Some(cpus.0.clone());
        }
        Ok(())
    }

    /// Checks the bounds of one core's answer to a query.
    fn validate_query_limits(&self) -> Result<(), ConfigError> {
        if self.query_time_budget_ms == 0 || self.query_time_budget_ms > 60_000 {
            return Err(ConfigError::Invalid {
                field: "query_time_budget_ms",
                reason: format!("{} is outside 1..=60000", self.query_time_budget_ms),
            });
        }
        if self.query_sort_items_max == 0 {
            return Err(ConfigError::Invalid {
                field: "query_sort_items_max",
                reason: "must be at least 1".to_owned(),
            });
        }
        Ok(())
    }

    /// Checks the table limits that must be at least 1 (watches, leases, locks, the inbox,
    /// keys reclaimed per tick).
    fn validate_watch_limits(&self) -> Result<(), ConfigError> {
        for (name, value) in [
            ("inbox_capacity", self.inbox_capacity as u64),
            ("expired_per_tick_max", self.expired_per_tick_max as u64),
            (
                "watch_history_events_max",
                self.watch_history_events_max as u64,
            ),
            ("watch_history_bytes_max", self.watch_history_bytes_max),
            ("watchers_per_shard_max", self.watchers_per_shard_max as u64),
            ("watch_queue_bytes_max", self.watch_queue_bytes_max),
            (
                "watch_queue_total_bytes_max",
                self.watch_queue_total_bytes_max,
            ),
            (
                "watchers_per_connection_max",
                self.watchers_per_connection_max as u64,
            ),
            ("leases_per_shard_max", self.leases_per_shard_max as u64),
            (
                "lease_keys_per_shard_max",
                self.lease_keys_per_shard_max as u64,
            ),
            ("locks_per_shard_max", self.locks_per_shard_max as u64),
            (
                "lock_waiters_per_shard_max",
                self.lock_waiters_per_shard_max as u64,
            ),
        ] {
            if value == 0 {
                return Err(ConfigError::Invalid {
                    field: name,
                    reason: "must be at least 1".to_owned(),
                });
            }
        }
        Ok(())
    }

    /// Checks the settings of the log: its batching, flushing, segments and directory.
    fn validate_log_settings(&self) -> Result<(), ConfigError> {
        let invalid =
            |field: &'static str, reason: String| Err(ConfigError::Invalid { field, reason });
        if self.group_commit_wait_us > 100_000 {
            return invalid(
                "group_commit_wait_us",
                format!(
                    "{} is over the maximum of 100000",
                    self.group_commit_wait_us
                ),
            );
        }
        if self.flush_interval_ms == 0 || self.flush_interval_ms > 60_000 {
            return invalid(
                "flush_interval_ms",
                format!("{} is outside 1..=60000", self.flush_interval_ms),
            );
        }
        if self.segment_bytes_max < 1024 * 1024 {
            return invalid(
                "segment_bytes_max",
                format!("{} is below the minimum of 1 MiB", self.segment_bytes_max),
            );
        }
        if self.durability != Durability::Memory && self.data_dir.as_os_str().is_empty() {
            return invalid(
                "data_dir",
                format!("durability {} needs a data directory", self.durability),
            );
        }
        Ok(())
    }

    /// Checks every setting against its allowed range.
    ///
    /// # Errors
    /// The first invalid setting, with the reason.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid =
            |field: &'static str, reason: String| Err(ConfigError::Invalid { field, reason });
        if self.name.is_empty() || self.name.len() > TEXT_SIZE_MAX {
            return invalid("name", format!("must be 1..={TEXT_SIZE_MAX} bytes"));
        }
        if self.cores == 0 || self.cores > CORE_COUNT_MAX {
            return invalid(
                "cores",
                format!("{} is outside 1..={CORE_COUNT_MAX}", self.cores),
            );
        }
        if self.port != 0 && usize::from(self.port) + self.cores - 1 > usize::from(u16::MAX) {
            return invalid(
                "port",
                format!("port {} + {} cores runs past 65535", self.port, self.cores),
            );
        }
        if let Some(cpus) = &self.cpus {
            if cpus.is_empty() {
                return invalid("cpus", "the CPU list is empty".to_owned());
            }
        }
        if self.instance_dir.as_os_str().is_empty() {
            return invalid("instance_dir", "must not be empty".to_owned());
        }
        if self.connection_count_max == 0 {
            return invalid("connection_count_max", "must be at least 1".to_owned());
        }
        if self.connection_inflight_max == 0 {
            return invalid("connection_inflight_max", "must be at least 1".to_owned());
        }
        if self.connection_write_buffer_bytes_max < 64 * 1024 {
            return invalid(
                "connection_write_buffer_bytes_max",
                format!(
                    "{} is below the minimum of 65536",
                    self.connection_write_buffer_bytes_max
                ),
            );
        }
        let per_core = self.memory_bytes_max / self.cores as u64;
        if per_core < 1024 * 1024 {
            return invalid(
                "memory_bytes_max",
                format!(
                    "{} bytes over {} cores leaves under 1 MiB per core",
                    self.memory_bytes_max, self.cores
                ),
            );
        }
        if self.tick_ms == 0 || self.tick_ms > 1000 {
            return invalid("tick_ms", format!("{} is outside 1..=1000", self.tick_ms));
        }
        self.validate_query_limits()?;
        self.validate_watch_limits()?;
        self.validate_log_settings()?;
        if self.io_memory_bytes < 512 * 1024 {
            return invalid(
                "io_memory_bytes",
                format!(
                    "{} is below glommio's minimum of 524288",
                    self.io_memory_bytes
                ),
            );
        }
        if let Some(cluster) = &self.cluster {
            cluster.validate(self.own())?;
        }
        Ok(())
    }

    /// What this instance is, as its cluster entry must say.
    fn own(&self) -> Own<'_> {
        Own {
            node_id: self.node_id,
            port: self.port,
            cores: self.cores,
            advertised_host: self.advertised_host(),
            peer_port: self.peer_port(),
        }
    }

    /// The cluster this instance serves: its `[cluster]` table, or a cluster of itself alone.
    pub fn effective_cluster(&self) -> ClusterConfig {
        self.cluster
            .clone()
            .unwrap_or_else(|| ClusterConfig::single(self.own(), &self.name))
    }

    /// The admin port, given or derived from `port`.
    pub fn admin_port(&self) -> u16 {
        self.admin_port
            .unwrap_or_else(|| derived_port(self.port, ADMIN_PORT_OFFSET))
    }

    /// The peer (heartbeat) port, given or derived from `port`.
    pub fn peer_port(&self) -> u16 {
        self.peer_port
            .unwrap_or_else(|| derived_port(self.port, PEER_PORT_OFFSET))
    }

    /// Memory budget of each core's shard.
    pub fn memory_bytes_max_per_core(&self) -> u64 {
        self.memory_bytes_max / self.cores as u64
    }

    /// The bounds of each core's change history and watchers.
    #[must_use]
    pub fn watch_limits(&self) -> WatchLimits {
        let bytes = |value: u64| usize::try_from(value).unwrap_or(usize::MAX);
        WatchLimits {
            history_events_max: self.watch_history_events_max,
            history_bytes_max: bytes(self.watch_history_bytes_max),
            watchers_max: self.watchers_per_shard_max,
            queue_bytes_max: bytes(self.watch_queue_bytes_max),
            queue_total_bytes_max: bytes(self.watch_queue_total_bytes_max),
        }
    }

    /// The bounds of each shard's lock table.
    pub fn lock_limits(&self) -> LockLimits {
        LockLimits {
            locks_max: self.locks_per_shard_max,
            waiters_max: self.lock_waiters_per_shard_max,
        }
    }

    /// The bounds of each shard's lease tables.
    pub fn lease_limits(&self) -> LeaseLimits {
        LeaseLimits {
            leases_max: self.leases_per_shard_max,
            attached_keys_max: self.lease_keys_per_shard_max,
        }
    }

    /// The CPU that core `core_index` is pinned to.
    pub fn cpu_for_core(&self, core_index: usize) -> Option<usize> {
        self.cpus.as_ref().map(|cpus| cpus[core_index % cpus.len()])
    }

    /// The host written into the topology for clients.
    pub fn advertised_host(&self) -> &str {
        self.advertise_host.as_deref().unwrap_or(&self.host)
    }

    /// The configuration as TOML, as `--print-config` shows it.
    ///
    /// # Errors
    /// Serialization failed (a bug).
    pub fn to_toml(&self) -> Result<String, ConfigError> {
        toml::to_string(self).map_err(|error| ConfigError::Invalid {
            field: "config",
            reason: format!("cannot render as TOML: {error}"),
        })
    }
}

fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
    read_toml(path)
}

fn read_toml<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::File {
        path: path.to_owned(),
        source,
    })?;
    toml::from_str(&text).map_err(|error| ConfigError::Parse {
        path: path.to_owned(),
        message: error.to_string(),
    })
}

fn to_usize(field: &'static str, value: u64) -> Result<usize, ConfigError> {
    usize::try_from(value).map_err(|_| ConfigError::Invalid {
        field,
        reason: format!("{value} does not fit this platform"),
    })
}

/// Parses a byte size: a plain number or one with a `KiB`, `MiB`, `GiB` or `TiB` suffix (also
/// `K`, `M`, `G`, `T`, powers of 1024).
///
/// # Errors
/// The text is not a size.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let digits_end = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, suffix) = text.split_at(digits_end);
    let number: u64 = digits
        .parse()
        .map_err(|_| format!("'{text}' is not a size"))?;
    let shift = match suffix.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        other => return Err(format!("unknown size suffix '{other}' in '{text}'")),
    };
    number
        .checked_shl(shift)
        .filter(|bytes| bytes >> shift == number)
        .ok_or_else(|| format!("'{text}' is too large"))
}

/// Parses a CPU list such as `0-3,6`.
///
/// # Errors
/// The text is not a CPU list.
pub fn parse_cpu_list(text: &str) -> Result<CpuList, String> {
    let mut cpus = Vec::new();
    for part in text
        .split(',')
        .map(str::trim)
        .filter(|part| !part.is_empty())
    {
        let parse = |value: &str| {
            value
                .trim()
                .parse::<usize>()
                .map_err(|_| format!("'{value}' is not a CPU number"))
        };
        match part.split_once('-') {
            Some((first, last)) => {
                let (first, last) = (parse(first)?, parse(last)?);
                if first > last || last - first >= 4096 {
                    return Err(format!("bad CPU range '{part}'"));
                }
                cpus.extend(first..=last);
            }
            None => cpus.push(parse(part)?),
        }
    }
    if cpus.is_empty() {
        return Err("the CPU list is empty".to_owned());
    }
    Ok(CpuList(cpus))
}

/// CPUs this process may run on.
pub fn online_cpu_count() -> usize {
    std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
}

/// Total physical memory from `/proc/meminfo`, if readable.
fn physical_memory_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|line| line.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(arguments: &[&str]) -> Result<Config, ConfigError> {
        let flags = Flags::try_parse_from(
            std::iter::once("tessera-server").chain(arguments.iter().copied()),
        )
        .unwrap();
        Config::from_flags(&flags)
    }

    #[test]
    fn defaults_bind_loopback() {
        let config = parse(&[]).unwrap();
        assert_eq!(config.host, "127.0.0.1");
        assert_eq!(config.port, 7000);
        assert!(config.cores >= 1);
    }

    #[test]
    fn flags_override_the_file() {
        let directory = std::env::temp_dir().join(format!("tessera-config-{}", std::process::id()));
        std::fs::create_dir_all(&directory).unwrap();
        let path = directory.join("a.toml");
        std::fs::write(&path, "port = 9000\ncores = 3\nname = \"from-file\"\n").unwrap();
        let path_text = path.to_str().unwrap();
        let config = parse(&["--config", path_text, "--port", "9100"]).unwrap();
        assert_eq!(config.port, 9100);
        assert_eq!(config.cores, 3);
        assert_eq!(config.name, "from-file");
        std::fs::write(&path, "bogus = 1\n").unwrap();
        assert!(matches!(
            parse(&["--config", path_text]),
            Err(ConfigError::Parse { .. })
        ));
        std::fs::remove_dir_all(&directory).unwrap();
    }

    #[test]
    fn a_cluster_comes_inline_or_from_its_own_file() {
        let directory =
            std::env::temp_dir().join(format!("tessera-cluster-config-{}", std::process::id()));
        std::fs::create_dir_all(&directory).unwrap();
        let nodes = "[[nodes]]\nid = 1\nname = \"a\"\nhost = \"127.0.0.1\"\nport = 7100\ncores = 2\n\n\
                     [[nodes]]\nid = 2\nname = \"b\"\nhost = \"127.0.0.2\"\nport = 7100\ncores = 1\n";
        std::fs::write(
            directory.join("cluster.toml"),
            format!("epoch = 3\n{nodes}"),
        )
        .unwrap();
        let instance = directory.join("a.toml");
        std::fs::write(
            &instance,
            "name = \"a\"\nnode_id = 1\nport = 7100\ncores = 2\ncluster_file = \"cluster.toml\"\n",
        )
        .unwrap();
        let config = parse(&["--config", instance.to_str().unwrap()]).unwrap();
        let cluster = config.cluster.clone().unwrap();
        assert_eq!(cluster.epoch, 3);
        assert_eq!(cluster.nodes.len(), 2);
        assert_eq!(config.peer_port(), 9100);
        assert_eq!(config.admin_port(), 8100);
        // The printed configuration carries the cluster inline and reads back.
        let printed = directory.join("printed.toml");
        std::fs::write(&printed, config.to_toml().unwrap()).unwrap();
        assert_eq!(
            parse(&["--config", printed.to_str().unwrap()]).unwrap(),
            config
        );
        // An instance its cluster entry does not describe is refused.
        let error = parse(&["--config", instance.to_str().unwrap(), "--cores", "3"])
            .unwrap_err()
            .to_string();
        assert!(error.contains("core count is 3"), "{error}");
        std::fs::write(
            &instance,
            format!(
                "name = \"b\"\nnode_id = 2\nhost = \"127.0.0.2\"\nport = 7100\ncores = 1\n\n\
                 [cluster]\n{}",
                nodes.replace("[[nodes]]", "[[cluster.nodes]]")
            ),
        )
        .unwrap();
        let config = parse(&["--config", instance.to_str().unwrap()]).unwrap();
        assert_eq!(config.cluster.unwrap().epoch, 1, "the default epoch");
        std::fs::remove_dir_all(&directory).unwrap();
    }

    #[test]
    fn invalid_settings_name_the_field() {
        let error = parse(&["--cores", "0"]).unwrap_err();
        assert!(
            matches!(error, ConfigError::Invalid { field: "cores", .. }),
            "{error}"
        );
        let error = parse(&["--port", "65535", "--cores", "2"]).unwrap_err();
        assert!(
            matches!(error, ConfigError::Invalid { field: "port", .. }),
            "{error}"
        );
        let error = parse(&["--watchers-per-shard-max", "0"]).unwrap_err();
        assert!(
            matches!(
                error,
                ConfigError::Invalid {
                    field: "watchers_per_shard_max",
                    ..
                }
            ),
            "{error}"
        );
    }

    #[test]
    fn watch_limits_come_from_flags() {
        let config = parse(&[
            "--watch-history-events-max",
            "50",
            "--watch-history-bytes-max",
            "64KiB",
            "--watchers-per-shard-max",
            "7",
            "--watch-queue-bytes-max",
            "2MiB",
        ])
        .unwrap();
        let limits = config.watch_limits();
        assert_eq!(
            (
                limits.history_events_max,
                limits.history_bytes_max,
                limits.watchers_max,
                limits.queue_bytes_max
            ),
            (50, 64 << 10, 7, 2 << 20)
        );
    }

    #[test]
    fn cpu_list_sets_the_core_count() {
        let config = parse(&["--cpus", "0-1"]).unwrap();
        assert_eq!(config.cpus, Some(vec![0, 1]));
        assert_eq!(config.cores, 2);
        assert_eq!(config.cpu_for_core(3), Some(1));
    }

    #[test]
    fn sizes_and_cpu_lists_parse() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("512m"), Ok(512 << 20));
        assert!(parse_size("12XB").is_err());
        assert!(parse_size("99999999999999T").is_err());
        assert_eq!(parse_cpu_list("0-2,5").unwrap().0, vec![0, 1, 2, 5]);
        assert!(parse_cpu_list("3-1").is_err());
    }

    #[test]
    fn log_targets_parse_and_print_back() {
        let config = parse(&["--log-target", "file:/var/log/t.log"]).unwrap();
        assert_eq!(
            config.log_target,
            LogTarget::File(PathBuf::from("/var/log/t.log"))
        );
        assert_eq!(config.log_target.to_string(), "file:/var/log/t.log");
        assert_eq!(parse(&[]).unwrap().log_target, LogTarget::Stderr);
        assert!(parse_log_target("file:").is_err());
        let error = parse_log_target("syslog").unwrap_err();
        assert!(error.contains("neither stderr nor file:/path"), "{error}");
    }

    #[test]
    fn instance_dir_comes_from_flags() {
        let config = parse(&["--instance-dir", "/tmp/registry"]).unwrap();
        assert_eq!(config.instance_dir, PathBuf::from("/tmp/registry"));
        assert!(!parse(&[]).unwrap().instance_dir.as_os_str().is_empty());
    }

    #[test]
    fn printed_config_reads_back() {
        let config = parse(&["--cores", "2", "--port", "7100"]).unwrap();
        let text = config.to_toml().unwrap();
        let read_back: Config = toml::from_str(&text).unwrap();
        assert_eq!(read_back, config);
    }
}
