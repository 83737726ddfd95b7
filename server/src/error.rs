//! Operating errors of the server: configuration, startup and run time. Programmer errors are
//! assertions, not variants here. Messages carry the values involved.

use std::path::PathBuf;

/// The configuration cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The config file cannot be read.
    #[error("cannot read config file {path}: {source}")]
    File {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The config file is not valid TOML for this schema.
    #[error("cannot parse config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What the parser said.
        message: String,
    },
    /// A setting is out of range.
    #[error("invalid setting {field}: {reason}")]
    Invalid {
        /// The setting's name, as in the TOML file.
        field: &'static str,
        /// Why it is refused.
        reason: String,
    },
}

/// The server could not start. Nothing is left running when this is returned.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A core's listener could not bind.
    #[error("core {core_id} cannot listen on {address}: {source}")]
    Bind {
        /// The core.
        core_id: u16,
        /// The address it tried.
        address: String,
        /// Why.
        source: std::io::Error,
    },
    /// A core's thread or executor could not start.
    #[error("core {core_id} failed to start: {reason}")]
    Core {
        /// The core.
        core_id: u16,
        /// Why.
        reason: String,
    },
    /// The data directory cannot be used, or a core's log cannot be recovered.
    #[error("data: {0}")]
    Data(#[from] crate::durability::DurabilityError),
    /// The topology built from the configuration is invalid (a bug or impossible settings).
    #[error("invalid topology: {0}")]
    Topology(#[from] tessera_protocol::TopologyError),
    /// Another instance holds the data directory, or already uses this instance's CPUs or
    /// ports.
    #[error(transparent)]
    Instance(#[from] InstanceError),
}

/// This instance cannot run beside the instances already running on the host.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InstanceError {
    /// Another live process holds the data directory's lock.
    #[error(
        "data directory {data_dir} is in use by instance {holder}; two instances must never \
         share one (give this one its own data_dir, or stop the other)"
    )]
    DataDirLocked {
        /// The data directory.
        data_dir: PathBuf,
        /// The holder as its lock file names it, e.g. `a (pid 1234)`.
        holder: String,
    },
    /// A running instance already uses some of this instance's CPUs or ports.
    #[error(
        "instance {other} (pid {pid}, registered in {registration}) already uses {overlap}; \
         give this instance other cpus or ports, or stop the other"
    )]
    Conflict {
        /// The other instance's name.
        other: String,
        /// Its process id.
        pid: u32,
        /// Its registration file.
        registration: PathBuf,
        /// What both would use, e.g. `cpus 2,3 and ports 7001 on 127.0.0.1`.
        overlap: String,
    },
    /// The instance registry stayed locked by another starting instance for too long.
    #[error("the instance registry {directory} stayed locked for {waited_ms} ms")]
    RegistryBusy {
        /// The registry directory.
        directory: PathBuf,
        /// How long this instance waited.
        waited_ms: u64,
    },
    /// A lock or registration file cannot be created, locked, read or written.
    #[error("cannot {operation} {path}: {source}")]
    Io {
        /// What was attempted.
        operation: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// Why it failed.
        source: std::io::Error,
    },
}

/// A core stopped abnormally while the server ran.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// A core's executor returned an error.
    #[error("core {core_id} failed: {reason}")]
    CoreFailed {
        /// The core.
        core_id: u16,
        /// Why.
        reason: String,
    },
    /// A core's thread panicked (a broken invariant).
    #[error("core {core_id} panicked")]
    CorePanicked {
        /// The core.
        core_id: u16,
    },
}
