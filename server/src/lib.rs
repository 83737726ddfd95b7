//! Tessera's server: a thread-per-core, shared-nothing key-value store.
//!
//! Each core runs one pinned glommio (`io_uring`) executor and owns one shard: a contiguous
//! range of hash slots with its own key map and TTL timing wheel, and its own listener on
//! `port + core index`. Cores share nothing but immutable configuration and talk only through
//! bounded inboxes. The smart client sends each request straight to the owning core; a request
//! that reaches another core is forwarded (the slow path).
//!
//! # Layout
//! - [`server`]: startup (bind, topology, one executor per core) and graceful shutdown.
//! - [`cluster`]: the cluster's nodes, the topology they all derive, heartbeats.
//! - [`config`]: flags, `TESSERA_*` environment and TOML file, validated once.
//! - [`instance`]: the data directory's lock and the host's instance registry (CPUs, ports).
//! - [`systemd`]: readiness, stopping and watchdog notifications to the service manager.
//! - [`core`]: a core's context and the routing decision for each request.
//! - [`shard`]: the sans-I/O state machine (`apply(now, request)`), its store and timer wheel.
//! - [`net`]: the accept loop with the connection limit, and pipelined connections.
//! - [`watch_stream`]: a shard's watchers served to connections and in-process channels.
//! - [`inbox`]: the bounded cross-thread queue into a core.
//! - [`metrics`]: per-core counters and histograms, and their Prometheus text format.
//! - [`admin`]: the admin HTTP endpoint (`/metrics`, `/health`) on a thread of its own.
//! - [`runtime`]: the core-local stop signal over glommio.
//! - [`clock`]: the wall clock, read once per batch and passed down as `now_ms`.
//! - [`error`]: configuration, startup and run-time errors.
//!
//! # Example
//! ```no_run
//! let config = tessera_server::config::Config { cores: 2, port: 0, ..Default::default() };
//! let server = tessera_server::Server::start(config).unwrap();
//! println!("listening on {:?}", server.addresses());
//! server.shutdown().unwrap();
//! ```

#![deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod admin;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod core;
pub mod durability;
pub mod error;
pub mod inbox;
pub mod instance;
pub mod metrics;
pub mod net;
pub mod runtime;
pub mod server;
pub mod shard;
pub mod systemd;
pub mod watch_stream;

pub use config::Config;
pub use error::{ConfigError, ServerError, StartError};
pub use server::{CoreSummary, Mode, Server, ServerEvent};
