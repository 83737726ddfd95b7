//! Durability: each core's write-ahead log, and recovery from it.
//!
//! Every mutation a shard applies is written, as it is applied, into the shard's
//! [`format::RecordWriter`] as one record per revision (what the revision did to the key
//! space). The core hands those records to its log, and in `sync` mode a reply that reflects
//! a mutation leaves the server only once the log holds that mutation on disk. This is the
//! single path for mutations: every later kind (leases, locks, transactions) goes through it.
//!
//! # Layout
//! - [`format`]: segment headers and records, byte by byte (`docs/storage.md`). No I/O.
//! - [`log`]: a core's log: appends, the group-commit writer task, segment files.
//! - [`snapshot`]: a core's snapshots: taken a partition at a time, loaded at startup, and
//!   the log truncated behind them.
//! - [`recovery`]: loading the newest snapshot and replaying a core's segments at startup;
//!   the data directory's layout.
//! - [`storage`]: the file operations the log and snapshots use, behind a trait tests
//!   replace.
//!
//! **Invariant:** records are written in revision order and replaying them from an empty
//! store rebuilds the shard exactly.

pub mod format;
pub mod log;
pub mod recovery;
pub mod snapshot;
pub mod storage;

#[cfg(test)]
mod crash_tests;
#[cfg(test)]
mod snapshot_tests;
#[cfg(test)]
pub(crate) mod test_support;

/// How a server instance keeps its data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// Acknowledge a write only after the batch that holds it is on disk (the default).
    #[default]
    Sync,
    /// Acknowledge at once and flush every `flush_interval_ms`; a crash loses at most that
    /// window of acknowledged writes.
    Async,
    /// No log at all: a cache. Everything is lost when the process ends.
    Memory,
}

impl Durability {
    /// The name used in flags and configuration files.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sync => "sync",
            Self::Async => "async",
            Self::Memory => "memory",
        }
    }
}

impl std::str::FromStr for Durability {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "sync" => Ok(Self::Sync),
            "async" => Ok(Self::Async),
            "memory" => Ok(Self::Memory),
            other => Err(format!(
                "durability {other:?} is not one of sync, async, memory"
            )),
        }
    }
}

impl std::fmt::Display for Durability {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(self.as_str())
    }
}

/// Why the log or a snapshot cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DurabilityError {
    /// Bytes on disk are not what this format allows.
    #[error("corrupt log data: {reason}")]
    Corrupt {
        /// What is wrong, with the numbers.
        reason: String,
    },
    /// A segment was written by a format this build cannot read.
    #[error("log format version {version} is not supported (this build reads {supported})")]
    UnsupportedFormat {
        /// The version found.
        version: u16,
        /// The version this build reads.
        supported: u16,
    },
    /// An I/O operation failed.
    #[error("{operation} {path}: {source}")]
    Io {
        /// What was being done.
        operation: &'static str,
        /// The file.
        path: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

/// Turns an I/O error of `operation` on `path` into a [`DurabilityError::Io`].
pub(crate) fn io_error(
    operation: &'static str,
    path: &std::path::Path,
) -> impl FnOnce(std::io::Error) -> DurabilityError {
    let path = path.display().to_string();
    move |source| DurabilityError::Io {
        operation,
        path,
        source,
    }
}

/// The files of `directory` whose names `parse` reads a number from, with that number, in
/// ascending order of it.
///
/// # Errors
/// The directory cannot be read.
pub(crate) fn numbered_files(
    directory: &std::path::Path,
    parse: fn(&str) -> Option<u64>,
) -> Result<Vec<(u64, std::path::PathBuf)>, DurabilityError> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(directory).map_err(io_error("read directory", directory))? {
        let entry = entry.map_err(io_error("read directory", directory))?;
        if let Some(number) = entry.file_name().to_str().and_then(parse) {
            files.push((number, entry.path()));
        }
    }
    files.sort_unstable();
    Ok(files)
}

impl DurabilityError {
    /// Whether the error is the filesystem being out of space.
    pub fn is_no_space(&self) -> bool {
        matches!(self, Self::Io { source, .. } if storage::is_no_space(source))
    }

    /// A [`DurabilityError::Corrupt`] with `reason`.
    pub fn corrupt(reason: impl Into<String>) -> Self {
        Self::Corrupt {
            reason: reason.into(),
        }
    }
}
