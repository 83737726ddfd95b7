//! CPU time of processes on this host, from `/proc`.
//!
//! Server CPU per operation is the figure a shared, noisy machine disturbs least: it does not
//! depend on how much of the machine the load generator or a neighbour took. Each thread's
//! `/proc/<pid>/task/<tid>/schedstat` gives its time on CPU in nanoseconds; a process's time
//! is the sum over its threads. The benchmark finds a local server by the port it listens on.

use std::collections::BTreeSet;
use std::fs;
use std::time::Duration;

/// Time on CPU of every thread of `pid`, so far.
///
/// # Errors
/// The process is gone or `/proc` cannot be read.
pub fn process_cpu_time(pid: u32) -> Result<Duration, String> {
    let tasks = fs::read_dir(format!("/proc/{pid}/task"))
        .map_err(|error| format!("/proc/{pid}/task: {error}"))?;
    let mut total_ns = 0_u64;
    for task in tasks.flatten() {
        let path = task.path().join("schedstat");
        // A thread may exit between listing and reading; it no longer counts.
        if let Ok(text) = fs::read_to_string(&path) {
            total_ns += text
                .split_whitespace()
                .next()
                .and_then(|field| field.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    Ok(Duration::from_nanos(total_ns))
}

/// CPU time (user and system) of this process so far, threads that have exited included.
pub fn own_cpu_time() -> Duration {
    // SAFETY: getrusage writes one plain struct, which lives on this stack frame.
    let usage = unsafe {
        let mut usage = std::mem::zeroed::<libc::rusage>();
        if libc::getrusage(libc::RUSAGE_SELF, &raw mut usage) != 0 {
            return Duration::ZERO;
        }
        usage
    };
    let time = |value: libc::timeval| {
        Duration::from_secs(u64::try_from(value.tv_sec).unwrap_or(0))
            + Duration::from_micros(u64::try_from(value.tv_usec).unwrap_or(0))
    };
    time(usage.ru_utime) + time(usage.ru_stime)
}

/// Sum of [`process_cpu_time`] over `pids`.
///
/// # Errors
/// One of the processes is gone.
pub fn processes_cpu_time(pids: &[u32]) -> Result<Duration, String> {
    pids.iter().map(|&pid| process_cpu_time(pid)).sum()
}

/// Processes that hold a listening TCP socket on one of `ports` (on any local address).
/// Empty when none is found or `/proc` does not tell (another user's processes).
pub fn pids_listening_on(ports: &[u16]) -> Vec<u32> {
    let inodes = listening_inodes(ports);
    if inodes.is_empty() {
        return Vec::new();
    }
    let mut pids = BTreeSet::new();
    let Ok(processes) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    for process in processes.flatten() {
        let Some(pid) = process
            .file_name()
            .to_str()
            .and_then(|name| name.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(descriptors) = fs::read_dir(process.path().join("fd")) else {
            continue;
        };
        for descriptor in descriptors.flatten() {
            let Ok(target) = fs::read_link(descriptor.path()) else {
                continue;
            };
            let target = target.to_string_lossy();
            let inode = target
                .strip_prefix("socket:[")
                .and_then(|rest| rest.strip_suffix(']'))
                .and_then(|inode| inode.parse::<u64>().ok());
            if inode.is_some_and(|inode| inodes.contains(&inode)) {
                pids.insert(pid);
                break;
            }
        }
    }
    pids.into_iter().collect()
}

/// Socket inodes in `LISTEN` state on one of `ports`, from /proc/net/tcp and tcp6.
fn listening_inodes(ports: &[u16]) -> BTreeSet<u64> {
    const STATE_LISTEN: &str = "0A";
    let mut inodes = BTreeSet::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
            let (Some(local), Some(state), Some(inode)) =
                (fields.get(1), fields.get(3), fields.get(9))
            else {
                continue;
            };
            let port = local
                .rsplit_once(':')
                .and_then(|(_, port)| u16::from_str_radix(port, 16).ok());
            if *state == STATE_LISTEN && port.is_some_and(|port| ports.contains(&port)) {
                if let Ok(inode) = inode.parse() {
                    inodes.insert(inode);
                }
            }
        }
    }
    inodes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_this_process_by_its_listening_port() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let pids = pids_listening_on(&[port]);
        assert_eq!(pids, vec![std::process::id()]);
        drop(listener);
        assert!(pids_listening_on(&[port]).is_empty());
    }

    #[test]
    fn cpu_time_grows_with_work() {
        let pid = std::process::id();
        let before = process_cpu_time(pid).unwrap();
        let mut sum = 0_u64;
        let spin_until = std::time::Instant::now() + Duration::from_millis(30);
        while std::time::Instant::now() < spin_until {
            sum = sum.wrapping_add(std::hint::black_box(1));
        }
        let after = process_cpu_time(pid).unwrap();
        assert!(
            after > before,
            "before={before:?} after={after:?} sum={sum}"
        );
    }
}
