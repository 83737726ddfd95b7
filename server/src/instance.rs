//! Instance exclusivity: what keeps two instances on one host from sharing a data directory,
//! a CPU or a port.
//!
//! - The data directory's lock: a durable instance holds an exclusive `flock` on
//!   `<data_dir>/LOCK`, which names it (name and pid). A second instance on the same
//!   directory is refused with the holder's name. The kernel drops the lock when the process
//!   ends, however it ends, so a crash never leaves a directory locked.
//! - The instance registry: every running instance keeps `<name>.<pid>.instance` in the
//!   registry directory (`instance_dir`), holding an exclusive `flock` on it while it runs.
//!   The file says what the instance uses: its explicit CPU list, if any, and its fixed
//!   ports on its host. A starting instance reads every registration; one whose lock is not
//!   held belongs to a process that is gone and is deleted, and a live one whose CPUs or
//!   ports overlap this instance's refuses the start, naming the other instance and the
//!   overlap. Starts are serialized by a lock on `<instance_dir>/registry.lock`, so two
//!   instances starting at once cannot miss each other.
//!
//! The rules ([`InstanceRecord::overlap`]): explicit CPU lists overlap if they share a CPU
//! (wherever they bind, they share the machine); ports overlap if they share a number and
//! the hosts may be the same (`0.0.0.0` and `::` stand for every host). Port 0 (any free
//! port) is never a conflict, and neither is a name alone: instances named alike may run
//! side by side.
//!
//! **Invariant:** while an [`InstanceGuard`] lives, its registration file exists and is
//! locked by this process; it is deleted before the lock is released.

use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::durability::Durability;
use crate::error::InstanceError;

/// The data directory's lock file.
pub const DATA_LOCK_FILE_NAME: &str = "LOCK";

/// The file whose lock serializes registrations in the registry directory.
pub const REGISTRY_LOCK_FILE_NAME: &str = "registry.lock";

/// Suffix of a registration file.
pub const REGISTRATION_SUFFIX: &str = ".instance";

/// Longest a start waits for another starting instance to finish registering.
pub const REGISTRY_LOCK_WAIT_MAX: Duration = Duration::from_secs(5);

/// Registrations one process may hold under one name (tests start many servers named alike
/// in one process); the first is `<name>.<pid>.instance`, the others `<name>.<pid>.<k>.instance`.
pub const REGISTRATIONS_PER_PROCESS_MAX: usize = 4096;

/// Bytes of a registration or lock file read at most; real ones are a few hundred.
pub const RECORD_BYTES_MAX: u64 = 64 * 1024;

/// What an instance uses, as its registration file records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceRecord {
    /// The instance's name.
    pub name: String,
    /// Its process id.
    pub pid: u32,
    /// The host its listeners bind.
    pub host: String,
    /// Its explicit CPU list; `None` when it runs on the online CPUs.
    pub cpus: Option<Vec<usize>>,
    /// Its client ports, `port..port + cores`; empty when it picks free ports.
    pub client_ports: std::ops::Range<u32>,
    /// Its admin port (0: any free port).
    pub admin_port: u16,
    /// Its peer (heartbeat) port (0: any free port).
    pub peer_port: u16,
    /// Its data directory; `None` with durability `memory`.
    pub data_dir: Option<PathBuf>,
}

impl InstanceRecord {
    /// The record of the instance `config` describes, run by this process.
    pub fn for_config(config: &Config) -> Self {
        let client_ports = if config.port == 0 {
            0..0
        } else {
            let start = u32::from(config.port);
            // cores <= CORE_COUNT_MAX (validated), which fits u32.
            start..start + u32::try_from(config.cores).unwrap_or(0)
        };
        Self {
            name: config.name.clone(),
            pid: std::process::id(),
            host: config.host.clone(),
            cpus: config.cpus.clone(),
            client_ports,
            admin_port: config.admin_port(),
            // A cluster of one binds no peer port.
            peer_port: if config
                .cluster
                .as_ref()
                .is_some_and(|cluster| cluster.nodes.len() > 1)
            {
                config.peer_port()
            } else {
                0
            },
            data_dir: (config.durability != Durability::Memory).then(|| config.data_dir.clone()),
        }
    }

    /// The fixed ports, each with what it serves.
    fn ports(&self) -> Vec<(u32, String)> {
        let mut ports: Vec<(u32, String)> = self
            .client_ports
            .clone()
            .map(|port| {
                let core = port - self.client_ports.start;
                (port, format!("client port of core {core}"))
            })
            .collect();
        if self.admin_port != 0 {
            ports.push((u32::from(self.admin_port), "admin port".to_owned()));
        }
        if self.peer_port != 0 {
            ports.push((u32::from(self.peer_port), "peer port".to_owned()));
        }
        ports
    }

    /// What `self` and `other` would both use, described for an operator (`cpus 1 and port
    /// 7000 (client port of core 0) on 127.0.0.1`), or `None` if they can run side by side.
    pub fn overlap(&self, other: &Self) -> Option<String> {
        let mut parts = Vec::new();
        if let (Some(mine), Some(theirs)) = (&self.cpus, &other.cpus) {
            let mut shared: Vec<usize> = mine
                .iter()
                .copied()
                .filter(|cpu| theirs.contains(cpu))
                .collect();
            shared.sort_unstable();
            shared.dedup();
            if !shared.is_empty() {
                let list: Vec<String> = shared.iter().map(ToString::to_string).collect();
                parts.push(format!("cpus {}", list.join(",")));
            }
        }
        if hosts_overlap(&self.host, &other.host) {
            let theirs = other.ports();
            let mut shared = String::new();
            for (port, mine) in self.ports() {
                if let Some((_, what)) = theirs.iter().find(|(their_port, _)| *their_port == port) {
                    if !shared.is_empty() {
                        shared.push_str(", ");
                    }
                    let _ = write!(shared, "{port} (its {what}, this one's {mine})");
                }
            }
            if !shared.is_empty() {
                parts.push(format!(
                    "ports {shared} on {}",
                    if self.host == other.host {
                        self.host.clone()
                    } else {
                        format!("{} and {}", other.host, self.host)
                    }
                ));
            }
        }
        (!parts.is_empty()).then(|| parts.join(" and "))
    }

    /// The registration file's text: one `key=value` line per field.
    pub fn to_text(&self) -> String {
        let cpus = self.cpus.as_ref().map_or_else(String::new, |cpus| {
            cpus.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(",")
        });
        let client_ports = if self.client_ports.is_empty() {
            String::new()
        } else {
            format!("{}-{}", self.client_ports.start, self.client_ports.end - 1)
        };
        let data_dir = self
            .data_dir
            .as_ref()
            .map_or_else(String::new, |path| path.display().to_string());
        format!(
            "name={}\npid={}\nhost={}\ncpus={cpus}\nclient_ports={client_ports}\n\
             admin_port={}\npeer_port={}\ndata_dir={data_dir}\n",
            self.name, self.pid, self.host, self.admin_port, self.peer_port
        )
    }

    /// Reads a registration file's text. Unknown keys are skipped (a newer version may add
    /// some); a missing or malformed known one is an error.
    ///
    /// # Errors
    /// What is missing or malformed.
    pub fn parse(text: &str) -> Result<Self, String> {
        let field = |key: &str| {
            text.lines()
                .find_map(|line| line.strip_prefix(key)?.strip_prefix('='))
                .ok_or_else(|| format!("no {key}= line"))
        };
        let number = |key: &str| {
            let value = field(key)?;
            value
                .parse::<u32>()
                .map_err(|_| format!("{key}={value} is not a number"))
        };
        let port = |key: &str| {
            let value = number(key)?;
            u16::try_from(value).map_err(|_| format!("{key}={value} is not a port"))
        };
        let (name, pid, host) = (field("name")?, number("pid")?, field("host")?);
        let cpus = match field("cpus")? {
            "" => None,
            list => Some(
                crate::config::parse_cpu_list(list)
                    .map_err(|error| format!("cpus={list}: {error}"))?
                    .0,
            ),
        };
        let client_ports = match field("client_ports")? {
            "" => 0..0,
            range => {
                let bounds = range.split_once('-').and_then(|(first, last)| {
                    Some((first.parse::<u16>().ok()?, last.parse::<u16>().ok()?))
                });
                match bounds {
                    Some((first, last)) if first <= last => u32::from(first)..u32::from(last) + 1,
                    _ => return Err(format!("client_ports={range} is not a port range")),
                }
            }
        };
        let data_dir = match field("data_dir")? {
            "" => None,
            path => Some(PathBuf::from(path)),
        };
        Ok(Self {
            name: name.to_owned(),
            pid,
            host: host.to_owned(),
            cpus,
            client_ports,
            admin_port: port("admin_port")?,
            peer_port: port("peer_port")?,
            data_dir,
        })
    }
}

/// Whether listeners on `a` and on `b` could take the same port: the same host, or either
/// one every host (`0.0.0.0`, `::`). Hosts that are not addresses are compared as written.
pub fn hosts_overlap(a: &str, b: &str) -> bool {
    let parse = |host: &str| {
        host.trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            .ok()
    };
    match (parse(a), parse(b)) {
        (Some(a), _) if a.is_unspecified() => true,
        (_, Some(b)) if b.is_unspecified() => true,
        (Some(a), Some(b)) => a == b,
        _ => a == b,
    }
}

/// What keeps this instance exclusive while it runs: the data directory's lock and the
/// registration. Dropping it releases both (the registration file is deleted first).
#[derive(Debug)]
pub struct InstanceGuard {
    /// The locked `<data_dir>/LOCK`; `None` with durability `memory`. The file is kept when
    /// released: deleting it could let two instances lock two different files of one name.
    data_lock: Option<File>,
    /// The registration file and the open, locked descriptor of it.
    registration: Option<(PathBuf, File)>,
}

impl InstanceGuard {
    /// Takes the data directory's lock (durable modes), then registers the instance in the
    /// registry after checking it against every live registration there.
    ///
    /// # Errors
    /// The data directory is locked by another instance, a live instance overlaps this one,
    /// or a lock or registration file cannot be used.
    pub fn acquire(config: &Config) -> Result<Self, InstanceError> {
        let record = InstanceRecord::for_config(config);
        let data_lock = match &record.data_dir {
            Some(data_dir) => Some(lock_data_dir(data_dir, &record)?),
            None => None,
        };
        let registration = register(&config.instance_dir, &record)?;
        Ok(Self {
            data_lock,
            registration: Some(registration),
        })
    }

    /// This instance's registration file.
    pub fn registration(&self) -> Option<&Path> {
        self.registration.as_ref().map(|(path, _)| path.as_path())
    }
}

impl Drop for InstanceGuard {
    fn drop(&mut self) {
        if let Some((path, file)) = self.registration.take() {
            if let Err(error) = std::fs::remove_file(&path) {
                tracing::warn!(%error, path = %path.display(), "cannot remove the registration");
            }
            drop(file);
        }
        drop(self.data_lock.take());
    }
}

/// How a `flock` attempt ended.
enum LockOutcome {
    Locked,
    HeldByAnother,
}

/// Tries to take `file`'s `flock` (exclusive or shared) without waiting.
fn try_flock(file: &File, exclusive: bool) -> std::io::Result<LockOutcome> {
    let operation = if exclusive {
        libc::LOCK_EX
    } else {
        libc::LOCK_SH
    } | libc::LOCK_NB;
    // SAFETY: the descriptor is open for the duration of the call (borrowed from `file`);
    // flock has no other precondition.
    let result = unsafe { libc::flock(file.as_raw_fd(), operation) };
    if result == 0 {
        return Ok(LockOutcome::Locked);
    }
    let error = std::io::Error::last_os_error();
    if error.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(LockOutcome::HeldByAnother)
    } else {
        Err(error)
    }
}

fn io_error(operation: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> InstanceError {
    let path = path.to_owned();
    move |source| InstanceError::Io {
        operation,
        path,
        source,
    }
}

/// Reads at most [`RECORD_BYTES_MAX`] of `file` from its start.
fn read_bounded(file: &File) -> std::io::Result<String> {
    let mut text = String::new();
    file.take(RECORD_BYTES_MAX).read_to_string(&mut text)?;
    Ok(text)
}

/// Locks `<data_dir>/LOCK` and writes this instance's name and pid into it.
fn lock_data_dir(data_dir: &Path, record: &InstanceRecord) -> Result<File, InstanceError> {
    std::fs::create_dir_all(data_dir).map_err(io_error("create directory", data_dir))?;
    let path = data_dir.join(DATA_LOCK_FILE_NAME);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io_error("open", &path))?;
    match try_flock(&file, true).map_err(io_error("lock", &path))? {
        LockOutcome::Locked => {}
        LockOutcome::HeldByAnother => {
            let text = read_bounded(&file).unwrap_or_default();
            let holder = InstanceRecord::parse(&text).map_or_else(
                |_| {
                    let name = text
                        .lines()
                        .find_map(|line| line.strip_prefix("name="))
                        .unwrap_or("(unnamed yet)");
                    let pid = text
                        .lines()
                        .find_map(|line| line.strip_prefix("pid="))
                        .unwrap_or("unknown");
                    format!("{name} (pid {pid})")
                },
                |holder| format!("{} (pid {})", holder.name, holder.pid),
            );
            return Err(InstanceError::DataDirLocked {
                data_dir: data_dir.to_owned(),
                holder,
            });
        }
    }
    let mut file = file;
    file.set_len(0)
        .and_then(|()| file.write_all(record.to_text().as_bytes()))
        .map_err(io_error("write", &path))?;
    Ok(file)
}

/// A registration file's name: the instance name (characters other than letters, digits,
/// `-` and `_` replaced by `_`, so no name reaches outside the directory), the pid and, for
/// a process's second and later registrations under one name, a counter.
fn registration_file_name(name: &str, pid: u32, index: usize) -> String {
    let safe: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if index == 0 {
        format!("{safe}.{pid}{REGISTRATION_SUFFIX}")
    } else {
        format!("{safe}.{pid}.{index}{REGISTRATION_SUFFIX}")
    }
}

/// Creates the registry directory (only this user may write it when this call creates it).
fn create_registry_dir(directory: &Path) -> Result<(), InstanceError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(directory)
        .map_err(io_error("create directory", directory))
}

/// Takes the registry's lock, waiting at most [`REGISTRY_LOCK_WAIT_MAX`].
fn lock_registry(directory: &Path) -> Result<File, InstanceError> {
    let path = directory.join(REGISTRY_LOCK_FILE_NAME);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io_error("open", &path))?;
    let started = Instant::now();
    loop {
        match try_flock(&file, true).map_err(io_error("lock", &path))? {
            LockOutcome::Locked => return Ok(file),
            LockOutcome::HeldByAnother if started.elapsed() < REGISTRY_LOCK_WAIT_MAX => {
                std::thread::sleep(Duration::from_millis(10));
            }
            LockOutcome::HeldByAnother => {
                return Err(InstanceError::RegistryBusy {
                    directory: directory.to_owned(),
                    waited_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
                })
            }
        }
    }
}

/// Checks `record` against every live registration in `directory`, deleting stale ones,
/// then registers it.
fn register(directory: &Path, record: &InstanceRecord) -> Result<(PathBuf, File), InstanceError> {
    create_registry_dir(directory)?;
    let registry_lock = lock_registry(directory)?;
    for other in live_registrations(directory)? {
        let (path, other) = other;
        if let Some(overlap) = record.overlap(&other) {
            return Err(InstanceError::Conflict {
                other: other.name,
                pid: other.pid,
                registration: path,
                overlap,
            });
        }
    }
    let text = record.to_text();
    for index in 0..REGISTRATIONS_PER_PROCESS_MAX {
        let path = directory.join(registration_file_name(&record.name, record.pid, index));
        let file = match OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
        {
            Ok(file) => file,
            Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(error) => return Err(io_error("create", &path)(error)),
        };
        // Nobody else can hold it: it is new, and creation happens under the registry lock.
        if !matches!(
            try_flock(&file, true).map_err(io_error("lock", &path))?,
            LockOutcome::Locked
        ) {
            return Err(io_error("lock", &path)(std::io::Error::other(
                "a new registration file is locked by another process",
            )));
        }
        let mut file = file;
        if let Err(error) = file.write_all(text.as_bytes()) {
            let _ = std::fs::remove_file(&path);
            return Err(io_error("write", &path)(error));
        }
        drop(registry_lock);
        tracing::debug!(path = %path.display(), "registered the instance");
        return Ok((path, file));
    }
    Err(io_error("create", directory)(std::io::Error::other(
        format!(
            "this process already holds {REGISTRATIONS_PER_PROCESS_MAX} registrations named {}",
            record.name
        ),
    )))
}

/// The live registrations in `directory`, with their files. Files whose lock is not held
/// belong to processes that are gone: they are deleted. A live file that cannot be read is
/// logged and skipped, since refusing every start because of it would need an operator.
/// The caller holds the registry lock.
fn live_registrations(directory: &Path) -> Result<Vec<(PathBuf, InstanceRecord)>, InstanceError> {
    let entries = std::fs::read_dir(directory).map_err(io_error("read directory", directory))?;
    let mut live = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io_error("read directory", directory))?;
        let path = entry.path();
        if !entry
            .file_name()
            .to_string_lossy()
            .ends_with(REGISTRATION_SUFFIX)
        {
            continue;
        }
        let file = match File::open(&path) {
            Ok(file) => file,
            // Its owner removed it as it stopped.
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => continue,
            Err(error) => return Err(io_error("open", &path)(error)),
        };
        match try_flock(&file, false).map_err(io_error("lock", &path))? {
            LockOutcome::Locked => {
                // Either its process is gone, or it just stopped and removed the file itself
                // (then the removal finds nothing).
                match std::fs::remove_file(&path) {
                    Ok(()) => {
                        tracing::info!(path = %path.display(), "removed a stale registration");
                    }
                    Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
                    Err(error) => {
                        tracing::warn!(%error, path = %path.display(), "cannot remove a stale registration");
                    }
                }
            }
            LockOutcome::HeldByAnother => {
                match read_bounded(&file)
                    .map_err(|error| error.to_string())
                    .and_then(|text| InstanceRecord::parse(&text))
                {
                    Ok(record) => live.push((path, record)),
                    Err(reason) => tracing::warn!(
                        path = %path.display(),
                        %reason,
                        "skipping an unreadable registration"
                    ),
                }
            }
        }
    }
    Ok(live)
}

/// The CPUs of `cpus` this process may not run on (its affinity mask, which systemd's
/// `CPUAffinity=` or `taskset` set), in order; empty when all are allowed or the mask cannot
/// be read.
pub fn cpus_outside_affinity(cpus: &[usize]) -> Vec<usize> {
    // SAFETY: cpu_set_t is plain data for which all zeroes is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: the pointer and size describe `set`, which lives across the call.
    let result =
        unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &raw mut set) };
    if result != 0 {
        return Vec::new();
    }
    let bits = 8 * std::mem::size_of::<libc::cpu_set_t>();
    cpus.iter()
        .copied()
        // SAFETY: CPU_ISSET reads `set` at `cpu`, which is below the set's size in bits.
        .filter(|&cpu| cpu >= bits || !unsafe { libc::CPU_ISSET(cpu, &set) })
        .collect()
}

/// Logs a warning when the configured CPUs are not all in this process's affinity mask:
/// pinning a core there either fails or escapes what the operator (`CPUAffinity=`) meant.
pub fn warn_on_cpus_outside_affinity(config: &Config) {
    let Some(cpus) = &config.cpus else {
        return;
    };
    let outside = cpus_outside_affinity(cpus);
    if !outside.is_empty() {
        tracing::warn!(
            configured = ?cpus,
            outside_affinity = ?outside,
            "configured cpus are not in this process's allowed CPUs (sched_getaffinity); \
             make the unit's CPUAffinity= match the instance's cpus"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(host: &str, port: u16, cores: u32, cpus: Option<Vec<usize>>) -> InstanceRecord {
        InstanceRecord {
            name: "n".to_owned(),
            pid: 1,
            host: host.to_owned(),
            cpus,
            client_ports: if port == 0 {
                0..0
            } else {
                u32::from(port)..u32::from(port) + cores
            },
            admin_port: crate::cluster::derived_port(port, 1000),
            peer_port: crate::cluster::derived_port(port, 2000),
            data_dir: None,
        }
    }

    fn temporary_directory(label: &str) -> PathBuf {
        let directory = std::env::temp_dir().join(format!(
            "tessera-instance-{label}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&directory);
        std::fs::create_dir_all(&directory).unwrap();
        directory
    }

    #[test]
    fn shared_cpus_overlap_on_any_host() {
        let a = record("127.0.0.1", 0, 1, Some(vec![0, 1]));
        let b = record("127.0.0.2", 0, 1, Some(vec![1, 2]));
        assert_eq!(a.overlap(&b).as_deref(), Some("cpus 1"));
        let c = record("127.0.0.1", 0, 1, Some(vec![2, 3]));
        assert_eq!(a.overlap(&c), None);
        // Without an explicit list an instance claims no CPU.
        let d = record("127.0.0.1", 0, 1, None);
        assert_eq!(a.overlap(&d), None);
    }

    #[test]
    fn shared_ports_overlap_on_the_same_host_only() {
        let a = record("127.0.0.1", 7000, 2, None);
        let b = record("127.0.0.1", 7001, 2, None);
        let overlap = a.overlap(&b).unwrap();
        assert!(
            overlap.starts_with(
                "ports 7001 (its client port of core 0, this one's client port of core 1)"
            ),
            "{overlap}"
        );
        assert!(overlap.ends_with("on 127.0.0.1"), "{overlap}");
        assert_eq!(a.overlap(&record("127.0.0.2", 7001, 2, None)), None);
        assert_eq!(a.overlap(&record("127.0.0.1", 7002, 2, None)), None);
        // A client port on another instance's admin port.
        let overlap = a.overlap(&record("127.0.0.1", 8000, 1, None)).unwrap();
        assert!(
            overlap.contains("8000 (its client port of core 0, this one's admin port)"),
            "{overlap}"
        );
    }

    #[test]
    fn the_wildcard_host_overlaps_every_host() {
        let a = record("0.0.0.0", 7000, 1, None);
        let overlap = a.overlap(&record("127.0.0.3", 7000, 1, None)).unwrap();
        assert!(overlap.ends_with("on 127.0.0.3 and 0.0.0.0"), "{overlap}");
        assert!(record("::", 7000, 1, None)
            .overlap(&record("10.0.0.1", 7000, 1, None))
            .is_some());
        assert!(hosts_overlap("[::1]", "::1"));
        assert!(!hosts_overlap("::1", "127.0.0.1"));
        assert!(hosts_overlap("db.example", "db.example"));
        assert!(!hosts_overlap("db.example", "127.0.0.1"));
    }

    #[test]
    fn port_zero_and_names_never_conflict() {
        let a = record("127.0.0.1", 0, 4, None);
        let b = record("127.0.0.1", 0, 4, None);
        assert_eq!(a.name, b.name);
        assert_eq!(a.overlap(&b), None);
    }

    #[test]
    fn both_cpus_and_ports_are_named() {
        let a = record("127.0.0.1", 7000, 1, Some(vec![3]));
        let overlap = a
            .overlap(&record("127.0.0.1", 7000, 1, Some(vec![3])))
            .unwrap();
        assert!(overlap.starts_with("cpus 3 and ports 7000"), "{overlap}");
    }

    #[test]
    fn records_read_back() {
        let mut original = record("::1", 7000, 3, Some(vec![0, 2, 5]));
        original.data_dir = Some(PathBuf::from("/var/lib/tessera/a"));
        assert_eq!(InstanceRecord::parse(&original.to_text()), Ok(original));
        let free = record("127.0.0.1", 0, 3, None);
        assert_eq!(InstanceRecord::parse(&free.to_text()), Ok(free));
        let error = InstanceRecord::parse("name=a\npid=x\n").unwrap_err();
        assert!(error.contains("pid=x is not a number"), "{error}");
        let text = record("h", 7000, 1, None).to_text() + "future_key=1\n";
        assert!(InstanceRecord::parse(&text).is_ok());
    }

    #[test]
    fn a_second_registration_that_overlaps_is_refused_and_a_stale_one_removed() {
        let directory = temporary_directory("registry");
        let first = record("127.0.0.1", 7000, 2, Some(vec![0]));
        let (first_path, first_file) = register(&directory, &first).unwrap();
        let error = register(&directory, &record("127.0.0.1", 7001, 1, None)).unwrap_err();
        let message = error.to_string();
        assert!(
            matches!(&error, InstanceError::Conflict { other, pid: 1, .. } if other == "n"),
            "{message}"
        );
        assert!(message.contains("ports 7001"), "{message}");
        // Same name and pid, nothing shared: allowed, under another file name.
        let (second_path, _second_file) =
            register(&directory, &record("127.0.0.1", 7100, 1, Some(vec![1]))).unwrap();
        assert_ne!(first_path, second_path);
        // A registration whose process is gone (its lock released) is stale: removed, and
        // no longer in the way.
        drop(first_file);
        assert!(first_path.exists());
        let third = record("127.0.0.1", 7001, 1, None);
        let (third_path, _third_file) = register(&directory, &third).unwrap();
        // The stale file's name was free again: the new registration took it.
        assert_eq!(third_path, first_path);
        let text = std::fs::read_to_string(&third_path).unwrap();
        assert_eq!(InstanceRecord::parse(&text), Ok(third));
        let registration_count = std::fs::read_dir(&directory)
            .unwrap()
            .filter(|entry| {
                let name = entry.as_ref().unwrap().file_name();
                name.to_string_lossy().ends_with(REGISTRATION_SUFFIX)
            })
            .count();
        assert_eq!(registration_count, 2);
        std::fs::remove_dir_all(&directory).unwrap();
    }

    #[test]
    fn the_data_directory_lock_names_its_holder() {
        let directory = temporary_directory("data");
        let mut holder = record("127.0.0.1", 0, 1, None);
        holder.name = "alpha".to_owned();
        holder.pid = 4242;
        let lock = lock_data_dir(&directory, &holder).unwrap();
        let error = lock_data_dir(&directory, &record("127.0.0.1", 0, 1, None)).unwrap_err();
        let message = error.to_string();
        assert!(
            message.contains("in use by instance alpha (pid 4242)"),
            "{message}"
        );
        drop(lock);
        let _lock = lock_data_dir(&directory, &holder).unwrap();
        std::fs::remove_dir_all(&directory).unwrap();
    }

    #[test]
    fn file_names_stay_inside_the_directory() {
        assert_eq!(registration_file_name("a", 7, 0), "a.7.instance");
        assert_eq!(
            registration_file_name("../x y", 7, 2),
            "___x_y.7.2.instance"
        );
    }

    #[test]
    fn allowed_cpus_are_not_reported() {
        let allowed: Vec<usize> = (0..1024)
            .filter(|cpu| cpus_outside_affinity(&[*cpu]).is_empty())
            .collect();
        assert!(!allowed.is_empty(), "this thread may run on some CPU");
        assert!(cpus_outside_affinity(&allowed).is_empty());
        assert_eq!(cpus_outside_affinity(&[100_000]), vec![100_000]);
    }
}
