//! Starting and stopping a server: bind one listener per core, build the topology, start one
//! pinned glommio executor per core, report readiness, and stop gracefully.
//!
//! Startup binds every listener on the calling thread first, so a taken port fails fast and
//! port 0 (any free port, for tests) yields a topology with the real ports before any core
//! serves. Each core then builds its executor itself and reports success or the reason it
//! could not start; [`Server::start`] returns only when all cores are serving, or fails with
//! nothing left running.
//!
//! Stopping closes every core's inbox. A core whose inbox closes answers what was queued,
//! stops accepting, lets each connection answer what it read, and exits.

use std::net::{SocketAddr, ToSocketAddrs};
use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::Duration;

use glommio::sync::Gate;
use glommio::{LocalExecutorBuilder, Placement};
use socket2::{Domain, Protocol, Socket, Type};
use tessera_protocol::{RouteTable, Topology};

use crate::admin::AdminServer;
use crate::cluster::format_address;
use crate::cluster::heartbeat::{ClusterHealth, Detector};

use crate::config::Config;
use crate::core::{run_ticks, serve_inbox, CoreContext, CoreInboxes};
use crate::durability::log::{run_writer, CoreLog, Segment, WriterControl, WriterSettings};
use crate::durability::recovery::{core_directory, prepare_data_dir, recover};
use crate::durability::snapshot::write_snapshot;
use crate::durability::storage::{GlommioFile, GlommioStorage};
use crate::durability::Durability;
use crate::error::{ServerError, StartError};
use crate::inbox::Inbox;
use crate::instance::InstanceGuard;
use crate::runtime::{LocalNotify, LocalSignal};
use crate::shard::{Shard, ShardConfig};

/// Backlog of each core's listening socket.
const LISTEN_BACKLOG: i32 = 1024;

/// Longest a core may take to start before startup is abandoned.
const CORE_START_TIMEOUT: Duration = Duration::from_secs(30);

/// Whether cores listen on the network or only serve in-process callers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// One TCP listener per core.
    Network,
    /// No listeners: requests arrive only through the cores' inboxes (embedded mode).
    Embedded,
}

/// Something the process owning the server should react to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerEvent {
    /// A core's executor returned; unless shutdown was requested, the server is broken.
    CoreExited {
        /// The core.
        core_id: u16,
    },
    /// A termination signal arrived (posted by the binary's signal thread).
    Signal(i32),
    /// A core's log failed (a write or sync error): nothing more is acknowledged, and the
    /// process must exit so its supervisor restarts it and recovery replays the log.
    CoreFailed {
        /// The core.
        core_id: u16,
        /// What failed.
        reason: String,
    },
}

/// One counter per core, in core order, that the core's expiry ticker increments once per
/// tick (never per request): a counter that stops advancing means its core's executor is
/// stuck. Read by the systemd watchdog ([`crate::systemd`]).
pub type CoreProgress = Arc<[AtomicU64]>;

/// What a core had done when it stopped, as reported by [`Server::shutdown`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CoreSummary {
    /// The core.
    pub core_id: u16,
    /// Mutations the core's shard applied (its final revision).
    pub revision: u64,
    /// Entries held when it stopped.
    pub key_count: usize,
    /// Requests the shard applied.
    pub request_count: u64,
}

/// A running server. Dropping it stops it.
#[derive(Debug)]
pub struct Server {
    topology: Arc<Topology>,
    /// This node's index in `topology.nodes`.
    node_index: usize,
    health: Arc<ClusterHealth>,
    /// The failure detector's thread (only in a cluster of several nodes); stops on drop.
    detector: Option<Detector>,
    inboxes: CoreInboxes,
    threads: Vec<(u16, JoinHandle<Result<CoreSummary, String>>)>,
    events: mpsc::Receiver<ServerEvent>,
    events_sender: mpsc::Sender<ServerEvent>,
    /// The admin endpoint (`/metrics`, `/health`), in network mode.
    admin: Option<AdminServer>,
    progress: CoreProgress,
    /// The data directory's lock and the instance's registration (network mode). Declared
    /// last so it is released only after the cores stopped (fields drop after `Drop::drop`).
    instance: Option<InstanceGuard>,
}

struct CoreStart {
    core_id: u16,
    cpu: Option<usize>,
    listener: Option<OwnedFd>,
    shard_config: ShardConfig,
    topology: Arc<Topology>,
    node_index: u16,
    health: Arc<ClusterHealth>,
    inboxes: CoreInboxes,
    config: Arc<Config>,
    connection_count: Arc<AtomicUsize>,
    ready: mpsc::Sender<(u16, Result<(), String>)>,
    events: mpsc::Sender<ServerEvent>,
    progress: CoreProgress,
}

impl Server {
    /// Starts a server that listens on the network.
    ///
    /// # Errors
    /// Invalid configuration, a port that cannot be bound, or a core that cannot start.
    pub fn start(config: Config) -> Result<Self, StartError> {
        Self::start_with_mode(config, Mode::Network)
    }

    /// Starts a server in `mode`.
    ///
    /// # Errors
    /// Invalid configuration, a port that cannot be bound, or a core that cannot start.
    pub fn start_with_mode(mut config: Config, mode: Mode) -> Result<Self, StartError> {
        config.validate()?;
        make_data_dir_absolute(&mut config)?;
        let instance = prepare_instance(&config, mode)?;
        let config = Arc::new(config);
        let core_count = config.cores;
        let listeners = match mode {
            Mode::Network => bind_listeners(&config)?,
            Mode::Embedded => Vec::new(),
        };
        let (topology, node_index, health, detector) = start_cluster(&config, mode, &listeners)?;
        let topology = Arc::new(topology);
        let online_cpus = online_cpus();
        let inboxes: CoreInboxes = (0..core_count)
            .map(|_| Arc::new(Inbox::new(config.inbox_capacity)))
            .collect::<Vec<_>>()
            .into();
        let connection_count = Arc::new(AtomicUsize::new(0));
        let (ready_sender, ready) = mpsc::channel();
        let (events_sender, events) = mpsc::channel();
        let progress: CoreProgress = (0..core_count).map(|_| AtomicU64::new(0)).collect();
        let mut server = Self {
            topology: topology.clone(),
            node_index,
            health: health.clone(),
            detector,
            inboxes: inboxes.clone(),
            threads: Vec::with_capacity(core_count),
            events,
            events_sender: events_sender.clone(),
            admin: None,
            progress: progress.clone(),
            instance,
        };
        let mut listeners = listeners
            .into_iter()
            .map(|(_, socket)| OwnedFd::from(socket));
        for core_index in 0..core_count {
            // core_count <= CORE_COUNT_MAX, which fits u16 (validated).
            let core_id = u16::try_from(core_index).map_err(|_| StartError::Core {
                core_id: u16::MAX,
                reason: format!("core index {core_index} does not fit"),
            })?;
            let cpu = config.cpu_for_core(core_index).or_else(|| {
                online_cpus
                    .get(core_index % online_cpus.len().max(1))
                    .copied()
            });
            let start = CoreStart {
                core_id,
                cpu,
                listener: listeners.next(),
                shard_config: ShardConfig {
                    node_id: config.node_id,
                    shard_id: core_id,
                    slots: topology.nodes[node_index].cores[core_index].slots,
                    memory_bytes_max: config.memory_bytes_max_per_core(),
                    expired_per_tick_max: config.expired_per_tick_max,
                    watch_limits: config.watch_limits(),
                    lease_limits: config.lease_limits(),
                    lock_limits: config.lock_limits(),
                },
                topology: topology.clone(),
                node_index: u16::try_from(node_index).unwrap_or(u16::MAX),
                health: health.clone(),
                inboxes: inboxes.clone(),
                config: config.clone(),
                connection_count: connection_count.clone(),
                ready: ready_sender.clone(),
                events: events_sender.clone(),
                progress: progress.clone(),
            };
            let thread = std::thread::Builder::new()
                .name(format!("tessera-core-{core_id}"))
                .spawn(move || run_core_thread(start))
                .map_err(|spawn_error| StartError::Core {
                    core_id,
                    reason: format!("cannot spawn thread: {spawn_error}"),
                })?;
            server.threads.push((core_id, thread));
        }
        drop(ready_sender);
        wait_until_ready(&ready, core_count)?;
        if mode == Mode::Network {
            server.admin = Some(AdminServer::start(
                &config,
                inboxes,
                connection_count,
                health,
                topology.epoch,
            )?);
        }
        tracing::info!(
            cores = core_count,
            addresses = ?server.addresses(),
            "server ready"
        );
        Ok(server)
    }

    /// Each core's progress counter (ticks run), in core order.
    pub fn core_progress(&self) -> CoreProgress {
        self.progress.clone()
    }

    /// Each core's progress counter now, in core order.
    pub fn core_progress_counts(&self) -> Vec<u64> {
        self.progress
            .iter()
            .map(|count| count.load(Ordering::Relaxed))
            .collect()
    }

    /// This instance's registration file in the instance registry (network mode).
    pub fn registration(&self) -> Option<&std::path::Path> {
        self.instance.as_ref().and_then(InstanceGuard::registration)
    }

    /// The topology this server serves.
    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// Each core's advertised address, in core order.
    pub fn addresses(&self) -> Vec<String> {
        self.topology.nodes[self.node_index]
            .cores
            .iter()
            .map(|core| core.address.clone())
            .collect()
    }

    /// Every node's health as this node's failure detector sees it, in topology order.
    pub fn health(&self) -> Vec<tessera_protocol::NodeHealth> {
        self.health.snapshot(self.topology.epoch)
    }

    /// The address the failure detector receives heartbeats on, in a cluster of several
    /// nodes.
    pub fn peer_address(&self) -> Option<SocketAddr> {
        self.detector.as_ref().map(Detector::address)
    }

    /// The address of the admin endpoint (`/metrics`, `/health`), in network mode.
    pub fn admin_address(&self) -> Option<SocketAddr> {
        self.admin.as_ref().map(AdminServer::address)
    }

    /// Every core's inbox, for in-process callers (embedded mode).
    pub fn inboxes(&self) -> CoreInboxes {
        self.inboxes.clone()
    }

    /// A sender the owning process uses to post events (signals) to [`Server::next_event`].
    pub fn event_sender(&self) -> mpsc::Sender<ServerEvent> {
        self.events_sender.clone()
    }

    /// Blocks until a core exits or an event is posted.
    pub fn next_event(&self) -> Option<ServerEvent> {
        self.events.recv().ok()
    }

    /// Stops every core gracefully, waits for them, and returns what each had done.
    ///
    /// # Errors
    /// A core failed or panicked while running or stopping.
    pub fn shutdown(mut self) -> Result<Vec<CoreSummary>, ServerError> {
        self.stop_and_join()
    }

    fn stop_and_join(&mut self) -> Result<Vec<CoreSummary>, ServerError> {
        if let Some(admin) = &self.admin {
            admin.begin_shutdown();
        }
        for inbox in self.inboxes.iter() {
            inbox.close();
        }
        let mut first_error = None;
        let mut summaries = Vec::with_capacity(self.threads.len());
        for (core_id, thread) in self.threads.drain(..) {
            let outcome = match thread.join() {
                Ok(Ok(summary)) => {
                    summaries.push(summary);
                    continue;
                }
                Ok(Err(reason)) => ServerError::CoreFailed { core_id, reason },
                Err(_) => ServerError::CorePanicked { core_id },
            };
            tracing::error!(%outcome, "core stopped abnormally");
            first_error.get_or_insert(outcome);
        }
        // Until here `/health` answered 503 to load balancers.
        if let Some(mut admin) = self.admin.take() {
            admin.stop();
        }
        first_error.map_or(Ok(summaries), Err)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if !self.threads.is_empty() {
            let _ = self.stop_and_join();
        }
    }
}

/// How long a port taken at start is tried again. A process killed with SIGKILL can hold its
/// listening sockets a moment after it is gone, while the kernel tears down its `io_uring`
/// instances; a supervisor restarting it at once would otherwise fail (and, restarted too
/// often, give up).
const BIND_RETRY_DURATION: Duration = Duration::from_secs(2);

/// Binds `socket` to `address`, trying again for [`BIND_RETRY_DURATION`] while the address
/// is in use.
fn bind_retrying(socket: &Socket, address: SocketAddr) -> std::io::Result<()> {
    let deadline = std::time::Instant::now() + BIND_RETRY_DURATION;
    loop {
        match socket.bind(&address.into()) {
            Err(error)
                if error.kind() == std::io::ErrorKind::AddrInUse
                    && std::time::Instant::now() < deadline =>
            {
                tracing::debug!(%address, "address in use; trying again");
                std::thread::sleep(Duration::from_millis(50));
            }
            outcome => return outcome,
        }
    }
}

fn bind_listeners(config: &Config) -> Result<Vec<(SocketAddr, Socket)>, StartError> {
    (0..config.cores)
        .map(|core_index| {
            let core_id = u16::try_from(core_index).unwrap_or(u16::MAX);
            let port = if config.port == 0 {
                0
            } else {
                // validate() checked that port + cores - 1 <= 65535.
                config.port + core_id
            };
            let address_text = format!("{}:{port}", config.host);
            let bind_error = |source| StartError::Bind {
                core_id,
                address: address_text.clone(),
                source,
            };
            let address = address_text
                .to_socket_addrs()
                .map_err(bind_error)?
                .next()
                .ok_or_else(|| bind_error(std::io::Error::other("address resolves to nothing")))?;
            let socket = Socket::new(
                Domain::for_address(address),
                Type::STREAM,
                Some(Protocol::TCP),
            )
            .map_err(bind_error)?;
            socket.set_reuse_address(true).map_err(bind_error)?;
            socket.set_tcp_nodelay(true).map_err(bind_error)?;
            bind_retrying(&socket, address).map_err(bind_error)?;
            socket.listen(LISTEN_BACKLOG).map_err(bind_error)?;
            socket.set_nonblocking(true).map_err(bind_error)?;
            let local = socket
                .local_addr()
                .map_err(bind_error)?
                .as_socket()
                .ok_or_else(|| bind_error(std::io::Error::other("not an IP socket")))?;
            Ok((local, socket))
        })
        .collect()
}

/// Claims the instance's data directory and registers its CPUs and ports (network mode),
/// then prepares the data directory: nothing touches it before it is known to be this
/// instance's alone.
fn prepare_instance(config: &Config, mode: Mode) -> Result<Option<InstanceGuard>, StartError> {
    crate::instance::warn_on_cpus_outside_affinity(config);
    let instance = match mode {
        Mode::Network => Some(InstanceGuard::acquire(config)?),
        Mode::Embedded => None,
    };
    if config.durability != Durability::Memory {
        prepare_data_dir(&config.data_dir, config.cores)?;
    }
    Ok(instance)
}

/// Waits until each of `core_count` cores reported it started, or one failed.
fn wait_until_ready(
    ready: &mpsc::Receiver<(u16, Result<(), String>)>,
    core_count: usize,
) -> Result<(), StartError> {
    for _ in 0..core_count {
        match ready.recv_timeout(CORE_START_TIMEOUT) {
            Ok((_, Ok(()))) => {}
            Ok((core_id, Err(reason))) => return Err(StartError::Core { core_id, reason }),
            Err(_) => {
                return Err(StartError::Core {
                    core_id: u16::MAX,
                    reason: format!("cores did not start within {CORE_START_TIMEOUT:?}"),
                })
            }
        }
    }
    Ok(())
}

/// Every later use of the data directory (glommio's among them) sees an absolute path, and
/// logs name the directory unambiguously.
fn make_data_dir_absolute(config: &mut Config) -> Result<(), StartError> {
    if config.durability != Durability::Memory {
        config.data_dir = std::path::absolute(&config.data_dir).map_err(|error| {
            StartError::Config(crate::error::ConfigError::Invalid {
                field: "data_dir",
                reason: format!("{}: {error}", config.data_dir.display()),
            })
        })?;
    }
    Ok(())
}

/// The topology this node serves, its index in it, and the failure detector (started in a
/// network cluster of several nodes).
fn start_cluster(
    config: &Config,
    mode: Mode,
    listeners: &[(SocketAddr, Socket)],
) -> Result<(Topology, usize, Arc<ClusterHealth>, Option<Detector>), StartError> {
    let cluster = config.effective_cluster();
    if mode == Mode::Embedded && cluster.nodes.len() > 1 {
        return Err(StartError::Config(crate::error::ConfigError::Invalid {
            field: "cluster",
            reason: "embedded shards are a cluster of one: they have no address for other \
                     nodes to reach or to send their clients to"
                .to_owned(),
        }));
    }
    let own_addresses: Option<Vec<String>> = match mode {
        Mode::Network => Some(
            listeners
                .iter()
                .map(|(local, _)| format_address(config.advertised_host(), local.port()))
                .collect(),
        ),
        Mode::Embedded => Some(
            (0..config.cores)
                .map(|core_index| format!("embedded:{core_index}"))
                .collect(),
        ),
    };
    let topology = crate::cluster::topology(&cluster, config.node_id, own_addresses.as_deref())?;
    RouteTable::new(&topology)?;
    let node_index = cluster.node_index(config.node_id).ok_or_else(|| {
        StartError::Config(crate::error::ConfigError::Invalid {
            field: "node_id",
            reason: format!("node {} is not in the cluster", config.node_id),
        })
    })?;
    let health = Arc::new(ClusterHealth::new(&cluster, config.node_id));
    // A cluster of one has no peer to hear from: no peer port is bound.
    let detector = if cluster.nodes.len() > 1 && mode == Mode::Network {
        let detector = Detector::start(
            &cluster,
            config.node_id,
            &config.host,
            config.peer_port(),
            health.clone(),
        )
        .map_err(|source| StartError::Bind {
            core_id: u16::MAX,
            address: format_address(&config.host, config.peer_port()),
            source,
        })?;
        Some(detector)
    } else {
        None
    };
    Ok((topology, node_index, health, detector))
}

/// Runs the accept loop until the core stops, then takes the socket out of `LISTEN`.
async fn accept_until_stopped(
    context: &Rc<CoreContext>,
    listener: glommio::net::TcpListener,
    listener_control: Option<Socket>,
    gate: &Rc<Gate>,
    handoff: crate::net::connection::Handoff,
) {
    crate::net::listener::accept_loop(context.clone(), listener, gate.clone(), handoff).await;
    // The abandoned accept's io_uring request keeps a reference to the socket until the ring
    // is torn down, after this thread exits; until then the kernel would still accept
    // connections nobody serves, and the port could not be bound again. shutdown(2) takes the
    // socket out of LISTEN at once, whatever holds references. See
    // server/tests/listener_release.rs.
    if let Some(control) = listener_control {
        if let Err(shutdown_error) = control.shutdown(std::net::Shutdown::Both) {
            tracing::debug!(%shutdown_error, "cannot shut the listening socket down");
        }
    }
}

/// Waits until every connection has closed, aborting those still open after the timeout.
async fn close_connections(context: &CoreContext, gate: &Gate, shutdown_timeout_ms: u64) {
    let timeout = Duration::from_millis(shutdown_timeout_ms);
    // `gate.close()` is awaited once, to completion: dropping it midway leaves glommio's gate
    // closing with nobody to notify, and the last connection's exit then panics. The timeout
    // runs beside it and fires `abort`, which makes every connection drop what it is writing
    // (to clients that stopped reading) and end, so the close completes promptly after it.
    // See server/tests/shutdown_timeout.rs.
    futures_lite::future::or(
        async {
            let _ = gate.close().await;
        },
        async {
            glommio::timer::sleep(timeout).await;
            tracing::warn!(
                ?timeout,
                "connections still open after the shutdown timeout; closing"
            );
            context.abort.fire();
            std::future::pending::<()>().await;
        },
    )
    .await;
}

/// Starts the log's writer, which reports a failed write to the process (which must exit).
fn spawn_writer(
    config: &Config,
    core_id: u16,
    events: &mpsc::Sender<ServerEvent>,
    log: Rc<CoreLog>,
    segment: Segment<GlommioFile>,
    control: WriterControl,
) -> glommio::Task<()> {
    let events = events.clone();
    let settings = WriterSettings {
        segment_bytes_max: config.segment_bytes_max,
        flush_interval: Duration::from_millis(config.flush_interval_ms),
        group_commit_wait: Duration::from_micros(config.group_commit_wait_us),
    };
    glommio::spawn_local(async move {
        let failure = run_writer(log, GlommioStorage, core_id, segment, settings, control).await;
        if let Some(reason) = failure {
            let _ = events.send(ServerEvent::CoreFailed { core_id, reason });
        }
    })
}

/// Takes a snapshot each time `snapshot_log_bytes` more were logged (counting what recovery
/// replayed after the last snapshot), until `finish` fires. A failed snapshot is logged and
/// tried again later; it never stops the core.
async fn run_snapshots(
    context: Rc<CoreContext>,
    log: Rc<CoreLog>,
    snapshot_log_bytes: u64,
    backlog_bytes: u64,
    finish: LocalSignal,
) {
    if snapshot_log_bytes == 0 {
        return;
    }
    let directory = core_directory(&context.config.data_dir, usize::from(context.core_id));
    let logged = LocalNotify::new();
    log.subscribe(logged.clone());
    // Log bytes as counted by the log's stats when the last snapshot began, less what
    // recovery replayed (which the last snapshot does not hold either).
    let mut bytes_at_snapshot = 0_u64;
    let mut backlog_bytes = backlog_bytes;
    while !finish.is_fired() {
        let logged_bytes = log.stats().byte_count + backlog_bytes;
        if logged_bytes.saturating_sub(bytes_at_snapshot) < snapshot_log_bytes {
            futures_lite::future::or(logged.notified(), finish.wait()).await;
            continue;
        }
        bytes_at_snapshot = log.stats().byte_count;
        backlog_bytes = 0;
        let started = std::time::Instant::now();
        let taken = finish
            .unless_fired(write_snapshot(
                &GlommioStorage,
                &directory,
                context.core_id,
                &context.shard,
                &log,
            ))
            .await;
        match taken {
            Some(Ok(written)) => tracing::info!(
                base_revision = written.base_revision,
                end_revision = written.end_revision,
                entries = written.entry_count,
                bytes = written.byte_count,
                longest_pause_us = written.longest_pause_us,
                removed_files = written.removed.len(),
                elapsed_ms = started.elapsed().as_millis(),
                "snapshot taken"
            ),
            Some(Err(error)) => {
                tracing::warn!(%error, "snapshot failed; the log is kept and it is tried again later");
            }
            None => {}
        }
    }
}

/// The core's shard, recovered from its log unless durability is `memory`, with the log, the
/// segment its writer continues in and the bytes recovery replayed after the last snapshot.
async fn open_shard(
    core_id: u16,
    shard_config: &ShardConfig,
    config: &Config,
) -> Result<(Shard, Option<DurableCore>), String> {
    let now_ms = crate::clock::now_unix_ms();
    if config.durability == Durability::Memory {
        return Ok((Shard::new(shard_config.clone(), now_ms), None));
    }
    let directory = core_directory(&config.data_dir, usize::from(core_id));
    let mut shard = Shard::with_journal(shard_config.clone(), now_ms);
    let started = std::time::Instant::now();
    let recovered = recover(&directory, core_id, &mut shard, now_ms, config.repair)
        .map_err(|error| format!("recovery of {}: {error}", directory.display()))?;
    // Keys of slots this core no longer owns (the cluster table changed) would be served
    // by scans and never by point reads: refuse rather than serve or drop them.
    let (unowned, example) = shard.unowned_keys();
    if unowned > 0 {
        return Err(format!(
            "{} holds {unowned} keys of slots core {core_id} does not own under this cluster \
             table (slots {}; one is {}): the table changed, and data does not move between \
             nodes yet. Start with the previous table, or move this data directory aside",
            directory.display(),
            shard_config.slots,
            tessera_protocol::codec::printable_key(example.as_deref().unwrap_or_default()),
        ));
    }
    // Every recovered lease gets its full TTL from now, however long recovery took.
    shard.restart_leases(crate::clock::monotonic_ms());
    tracing::info!(
        leases = shard.leases().home_count(),
        snapshot_base = recovered.snapshot_base,
        snapshot_entries = recovered.snapshot_entry_count,
        segments = recovered.segment_count,
        records = recovered.record_count,
        bytes = recovered.byte_count,
        revision = shard.revision(),
        keys = shard.key_count(),
        elapsed_ms = started.elapsed().as_millis(),
        "recovered"
    );
    let start_segment = async {
        let mut segment = Segment::allocate(
            &GlommioStorage,
            &directory,
            recovered.next_segment_id,
            config.segment_bytes_max,
        )
        .await?;
        segment.start(core_id, shard.revision()).await?;
        segment.sync().await?;
        Ok::<_, crate::durability::DurabilityError>(segment)
    };
    let segment = start_segment
        .await
        .map_err(|error| format!("cannot start a log segment: {error}"))?;
    let log = Rc::new(CoreLog::new(config.durability, shard.revision()));
    Ok((
        shard,
        Some(DurableCore {
            log,
            segment,
            backlog_bytes: recovered.byte_count,
        }),
    ))
}

/// A core's log, as recovery leaves it.
struct DurableCore {
    log: Rc<CoreLog>,
    segment: Segment<GlommioFile>,
    /// Bytes of log replayed after the last snapshot.
    backlog_bytes: u64,
}

fn online_cpus() -> Vec<usize> {
    let mut cpus: Vec<usize> = glommio::CpuSet::online()
        .map(|set| set.iter().map(|location| location.cpu).collect())
        .unwrap_or_default();
    cpus.sort_unstable();
    cpus
}

fn run_core_thread(start: CoreStart) -> Result<CoreSummary, String> {
    let span = tracing::info_span!("core", id = start.core_id);
    let _entered = span.enter();
    let placement = start.cpu.map_or(Placement::Unbound, Placement::Fixed);
    let executor = LocalExecutorBuilder::new(placement)
        .name(&format!("tessera-core-{}", start.core_id))
        .io_memory(start.config.io_memory_bytes)
        .make();
    let executor = match executor {
        Ok(executor) => executor,
        Err(executor_error) => {
            let cpu = start
                .cpu
                .map_or_else(|| "any cpu".to_owned(), |cpu| format!("cpu {cpu}"));
            let reason = format!("cannot create an executor on {cpu}: {executor_error}");
            let _ = start.ready.send((start.core_id, Err(reason.clone())));
            let _ = start.events.send(ServerEvent::CoreExited {
                core_id: start.core_id,
            });
            return Err(reason);
        }
    };
    let core_id = start.core_id;
    let events = start.events.clone();
    let summary = executor.run(run_core(start));
    let _ = events.send(ServerEvent::CoreExited { core_id });
    let summary = summary.ok_or_else(|| "core did not finish starting".to_owned())?;
    tracing::info!(
        revision = summary.revision,
        key_count = summary.key_count,
        request_count = summary.request_count,
        "core stopped"
    );
    Ok(summary)
}

/// Starts a durable core's log writer and snapshot task.
fn spawn_durable_tasks(
    events: &mpsc::Sender<ServerEvent>,
    context: &Rc<CoreContext>,
    durable: DurableCore,
    writer_control: &WriterControl,
    snapshots_finish: &LocalSignal,
) -> (glommio::Task<()>, glommio::Task<()>) {
    let snapshot_task = glommio::spawn_local(run_snapshots(
        context.clone(),
        durable.log.clone(),
        context.config.snapshot_log_bytes,
        durable.backlog_bytes,
        snapshots_finish.clone(),
    ));
    let writer_task = spawn_writer(
        &context.config,
        context.core_id,
        events,
        durable.log,
        durable.segment,
        writer_control.clone(),
    );
    (writer_task, snapshot_task)
}

/// Starts the task that serves the core's connections.
fn start_connections(
    context: &Rc<CoreContext>,
    gate: &Gate,
    handoff: &crate::net::connection::Handoff,
) -> Result<(), String> {
    let ring = crate::net::connection::SocketRing::for_config(&context.config)
        .map_err(|ring_error| format!("cannot create the socket ring: {ring_error}"))?;
    gate.spawn(crate::net::connection::serve(
        context.clone(),
        handoff.clone(),
        ring,
    ))
    .map(glommio::Task::detach)
    .map_err(|spawn_error| format!("cannot start connections: {spawn_error}"))?;
    Ok(())
}

async fn run_core(start: CoreStart) -> Option<CoreSummary> {
    // A second descriptor for the listening socket, to take it out of LISTEN at stop (below).
    let listener_control = start
        .listener
        .as_ref()
        .and_then(|fd| fd.try_clone().ok())
        .map(Socket::from);
    let listener = start.listener.map(|fd| {
        // SAFETY: the descriptor is a listening TCP socket this process owns; ownership moves
        // from the OwnedFd into the glommio listener, which closes it.
        unsafe { glommio::net::TcpListener::from_raw_fd(fd.into_raw_fd()) }
    });
    let inbox = start.inboxes[usize::from(start.core_id)].clone();
    let opened = match RouteTable::new(&start.topology) {
        Ok(routes) => open_shard(start.core_id, &start.shard_config, &start.config)
            .await
            .map(|(shard, durable)| (routes, shard, durable)),
        Err(topology_error) => Err(topology_error.to_string()),
    };
    let (routes, shard, durable) = match opened {
        Ok(opened) => opened,
        Err(reason) => {
            let _ = start.ready.send((start.core_id, Err(reason)));
            return None;
        }
    };
    let log = durable.as_ref().map(|durable| durable.log.clone());
    let context = Rc::new(CoreContext {
        node_id: start.config.node_id,
        node_index: start.node_index,
        health: start.health,
        core_id: start.core_id,
        topology: start.topology,
        routes,
        shard: std::cell::RefCell::new(shard),
        inboxes: start.inboxes,
        config: start.config.clone(),
        connection_count: start.connection_count,
        stop: LocalSignal::new(),
        abort: LocalSignal::new(),
        log,
        watch: crate::core::WatchDelivery::default(),
        lock_waiters: std::cell::RefCell::default(),
        metrics: std::cell::RefCell::default(),
        index_build_running: std::cell::Cell::new(false),
    });
    let writer_control = WriterControl::default();
    let snapshots_finish = LocalSignal::new();
    let durable_tasks = durable.map(|durable| {
        spawn_durable_tasks(
            &start.events,
            &context,
            durable,
            &writer_control,
            &snapshots_finish,
        )
    });
    let inbox_task = glommio::spawn_local(serve_inbox(context.clone(), inbox));
    let tick_task = glommio::spawn_local(run_ticks(context.clone(), start.progress.clone()));
    let sinks_task = glommio::spawn_local(crate::watch_stream::serve_sinks(context.clone()));
    // Leases of other cores that recovered keys or locks refer to are asked after, once:
    // one that ended while the server was down (its end logged by its home, the deletions
    // here not yet) ends here too.
    glommio::spawn_local(crate::core::reconcile_foreign_leases(context.clone())).detach();
    let gate = Rc::new(Gate::new());
    let handoff = crate::net::connection::Handoff::new(context.watch.wake_connections.clone());
    if listener.is_some() {
        if let Err(reason) = start_connections(&context, &gate, &handoff) {
            let _ = start.ready.send((start.core_id, Err(reason)));
            return None;
        }
    }
    let _ = start.ready.send((start.core_id, Ok(())));
    match listener {
        Some(listener) => {
            accept_until_stopped(&context, listener, listener_control, &gate, handoff).await;
        }
        None => context.stop.wait().await,
    }
    // Lock requests waiting in line are answered now, not at the end of their wait.
    context.cancel_lock_waits();
    close_connections(&context, &gate, start.config.shutdown_timeout_ms).await;
    inbox_task.await;
    tick_task.await;
    sinks_task.await;
    // Everything the core applied is in the log once the writer has finished.
    snapshots_finish.fire();
    context.flush_journal();
    writer_control.finish.fire();
    if let Some((writer_task, snapshot_task)) = durable_tasks {
        snapshot_task.await;
        writer_task.await;
    }
    let shard = context.shard.borrow();
    Some(CoreSummary {
        core_id: context.core_id,
        revision: shard.revision(),
        key_count: shard.key_count(),
        request_count: shard.stats().request_count,
    })
}
