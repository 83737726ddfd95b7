//! The benchmark's smoke test, the only part of it CI runs: a short run against an embedded
//! server and one against Tessera over loopback must report throughput and no errors, and
//! so must each watch workload (every watcher receiving every put in `watch-latency`) and the
//! lock workload (with no overlapping holders and no fencing token out of order). With
//! the `etcd` feature, a run against a real etcd member does the same when an `etcd` binary
//! is installed (CI has none, so that test says it is skipped and passes), and an unreachable
//! member must fail the run with a message rather than hang it.
//! Speed targets live in `scripts/bench-vs-redis.sh`, `scripts/bench-vs-etcd.sh` and
//! `docs/benchmarks.md`, never here.

use std::process::Command;

/// Runs `tessera-bench --json --quiet` with `arguments`, whatever its outcome.
fn bench_output(arguments: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_tessera-bench"))
        .args(arguments)
        .args(["--json", "--quiet"])
        .output()
        .expect("tessera-bench runs")
}

fn run_bench(arguments: &[&str]) -> serde_json::Value {
    let output = bench_output(arguments);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "tessera-bench failed: {stderr}");
    serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|error| panic!("stdout is one JSON object ({error}); stderr: {stderr}"))
}

fn assert_served(result: &serde_json::Value, target: &str) {
    assert_eq!(result["target"], target, "{result}");
    assert!(result["ops_per_sec"].as_f64().unwrap() > 0.0, "{result}");
    assert_eq!(result["errors"], 0, "{result}");
    for field in ["p50_us", "p99_us", "p999_us", "git_revision"] {
        assert!(!result[field].is_null(), "missing {field}: {result}");
    }
}

/// Starts a two-core in-memory Tessera server on a free loopback port; returns it and the
/// endpoint to give `--endpoints`.
fn start_server() -> (tessera_server::Server, String) {
    let server = tessera_server::Server::start(tessera_server::Config {
        cores: 2,
        port: 0,
        memory_bytes_max: 64 * 1024 * 1024,
        durability: tessera_server::config::Durability::Memory,
        ..tessera_server::Config::default()
    })
    .expect("a test server starts");
    let endpoint = server.addresses()[0].clone();
    (server, endpoint)
}

#[test]
fn embedded_run_reports_throughput_and_no_errors() {
    let result = run_bench(&[
        "--embedded",
        "--workload",
        "mixed",
        "--duration-secs",
        "2",
        "--connections",
        "8",
        "--pipeline",
        "4",
        "--keys",
        "1000",
    ]);
    assert_served(&result, "embedded");
    assert_eq!(result["preload"]["keys"], 1000, "{result}");
    assert!(result["ops"]["get"]["operations"].as_u64().unwrap() > 0);
    assert!(result["ops"]["set"]["operations"].as_u64().unwrap() > 0);
}

#[test]
fn network_run_through_the_load_generator_reports_server_cpu() {
    let (server, endpoint) = start_server();
    let result = run_bench(&[
        "--endpoints",
        &endpoint,
        "--workload",
        "get",
        "--duration-secs",
        "1",
        "--connections",
        "4",
        "--pipeline",
        "8",
        "--keys",
        "2000",
        "--server-pid",
        &std::process::id().to_string(),
    ]);
    assert_served(&result, "tessera");
    assert!(
        result["server_cpu_us_per_op"].as_f64().unwrap() > 0.0,
        "{result}"
    );
    let stats = server.shutdown().expect("the server stops cleanly");
    let key_count: usize = stats.iter().map(|core| core.key_count).sum();
    assert_eq!(key_count, 2000, "the preload wrote every key");
}

#[test]
fn watch_latency_reaches_every_watcher_over_the_network() {
    let (server, endpoint) = start_server();
    // Three watches per client: the watchers are spread over two clients.
    let result = run_bench(&[
        "--endpoints",
        &endpoint,
        "--workload",
        "watch-latency",
        "--watchers",
        "5",
        "--watchers-per-client",
        "3",
        "--rate",
        "200",
        "--duration-secs",
        "1",
        "--keys",
        "1000",
    ]);
    assert_served(&result, "tessera");
    let watch = &result["watch"];
    assert_eq!(watch["clients"], 2, "{result}");
    assert_eq!(
        watch["server_watcher_count"], 10,
        "a prefix is watched on both cores"
    );
    let puts = result["ops"]["set"]["operations"].as_u64().unwrap();
    assert_eq!(
        watch["events_expected"].as_u64(),
        Some(puts * 5),
        "{result}"
    );
    assert_eq!(watch["events"], watch["events_expected"], "{result}");
    assert_eq!(watch["lagged_count"], 0, "{result}");
    assert_eq!(watch["latency"]["operations"], watch["events"], "{result}");
    assert!(
        watch["latency"]["p99_us"].as_f64().unwrap() > 0.0,
        "{result}"
    );
    server.shutdown().expect("the server stops cleanly");
}

#[test]
fn embedded_watch_fanout_reports_events_and_its_peer() {
    let result = run_bench(&[
        "--embedded",
        "--workload",
        "watch-fanout",
        "--watchers",
        "4",
        "--duration-secs",
        "1",
        "--connections",
        "4",
        "--keys",
        "1000",
    ]);
    assert_served(&result, "embedded");
    let watch = &result["watch"];
    assert_eq!(watch["watchers"], 4, "{result}");
    assert!(watch["events_per_sec"].as_f64().unwrap() > 0.0, "{result}");
    let peer = &watch["peer"];
    assert_eq!(peer["watchers"], 0, "{result}");
    assert!(peer["ops_per_sec"].as_f64().unwrap() > 0.0, "{result}");
    assert!(
        peer["watched_ops_per_sec_ratio"].as_f64().unwrap() > 0.0,
        "{result}"
    );
    assert_eq!(result["preload"]["keys"], 1000, "{result}");
}

/// Checks a `--workload lock` result: pairs were counted, and the lock kept its promises.
fn assert_locked(result: &serde_json::Value, target: &str, contenders: u64, locks: u64) {
    assert_served(result, target);
    assert_eq!(result["contenders"], contenders, "{result}");
    assert_eq!(result["locks"], locks, "{result}");
    assert_eq!(result["pairs"], result["operations"], "{result}");
    assert_eq!(
        result["ops"]["pair"]["operations"], result["pairs"],
        "{result}"
    );
    assert_eq!(
        result["ops"]["lock"]["operations"], result["pairs"],
        "{result}"
    );
    for field in [
        "overlaps",
        "token_violations",
        "lock_timeouts",
        "unlocks_refused",
    ] {
        assert_eq!(result[field], 0, "{field}: {result}");
    }
    assert_eq!(
        result["close_errors"], 0,
        "every lease was revoked: {result}"
    );
    assert!(result["acquire_p99_us"].as_f64().unwrap() > 0.0, "{result}");
}

#[test]
fn lock_run_counts_pairs_uncontended_and_on_one_lock() {
    let (server, endpoint) = start_server();
    for (names, locks) in [("one", 1), ("per-session", 5)] {
        let result = run_bench(&[
            "--endpoints",
            &endpoint,
            "--workload",
            "lock",
            "--contenders",
            "5",
            "--lock-names",
            names,
            "--duration-secs",
            "1",
        ]);
        assert_locked(&result, "tessera", 5, locks);
        assert_eq!(result["lock_names"], names, "{result}");
    }
    server.shutdown().expect("the server stops cleanly");
}

#[cfg(feature = "etcd")]
#[test]
fn unreachable_etcd_fails_the_run_with_a_message() {
    // A port that was free a moment ago: nothing answers there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port();
    let target = format!("etcd://127.0.0.1:{port}");
    let output = bench_output(&[
        "--target",
        &target,
        "--workload",
        "set",
        "--duration-secs",
        "1",
        "--connections",
        "2",
    ]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("cannot reach etcd"), "{stderr}");
}

/// One etcd member on free loopback ports with its own data directory, stopped and removed
/// on drop.
#[cfg(feature = "etcd")]
struct EtcdMember {
    process: std::process::Child,
    data_dir: std::path::PathBuf,
    client_port: u16,
}

#[cfg(feature = "etcd")]
impl EtcdMember {
    /// Starts a member, or returns `None` when no `etcd` binary is installed.
    fn start() -> Option<Self> {
        let free_port = || {
            std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|listener| listener.local_addr())
                .expect("a free port")
                .port()
        };
        let (client_port, peer_port) = (free_port(), free_port());
        let data_dir = std::env::temp_dir().join(format!(
            "tessera-bench-etcd-{}-{client_port}",
            std::process::id()
        ));
        let client_url = format!("http://127.0.0.1:{client_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let process = Command::new("etcd")
            .arg("--name=smoke")
            .arg(format!("--data-dir={}", data_dir.display()))
            .arg(format!("--listen-client-urls={client_url}"))
            .arg(format!("--advertise-client-urls={client_url}"))
            .arg(format!("--listen-peer-urls={peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={peer_url}"))
            .arg(format!("--initial-cluster=smoke={peer_url}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn();
        match process {
            Ok(process) => Some(Self {
                process,
                data_dir,
                client_port,
            }),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => None,
            Err(error) => panic!("cannot start etcd: {error}"),
        }
    }

    /// Starts a member and waits until it is healthy; returns it with its `--target`, or says
    /// the test is skipped and returns `None` when no `etcd` binary is installed.
    fn start_healthy() -> Option<(Self, String)> {
        let Some(member) = Self::start() else {
            println!("skipped: no `etcd` binary on PATH (Debian: apt-get install etcd-server)");
            return None;
        };
        member.wait_until_healthy();
        let target = format!("etcd://127.0.0.1:{}", member.client_port);
        Some((member, target))
    }

    /// Waits until the member has elected itself leader and answers (`/health`), at most
    /// `ETCD_START_TIMEOUT`.
    fn wait_until_healthy(&self) {
        use std::io::{Read as _, Write as _};
        const ETCD_START_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);
        let deadline = std::time::Instant::now() + ETCD_START_TIMEOUT;
        while std::time::Instant::now() < deadline {
            let mut reply = String::new();
            let is_healthy = std::net::TcpStream::connect(("127.0.0.1", self.client_port))
                .and_then(|mut stream| {
                    stream.write_all(b"GET /health HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
                    stream.read_to_string(&mut reply)
                })
                .is_ok_and(|_| reply.contains("\"health\":\"true\""));
            if is_healthy {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        panic!("etcd on port {} did not become healthy", self.client_port);
    }
}

#[cfg(feature = "etcd")]
impl Drop for EtcdMember {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
        let _ = std::fs::remove_dir_all(&self.data_dir);
    }
}

#[cfg(feature = "etcd")]
#[test]
fn etcd_run_reports_throughput_and_no_errors() {
    let Some((_member, target)) = EtcdMember::start_healthy() else {
        return;
    };
    let result = run_bench(&[
        "--target",
        &target,
        "--workload",
        "mixed",
        "--duration-secs",
        "1",
        "--connections",
        "4",
        "--pipeline",
        "2",
        "--keys",
        "200",
    ]);
    assert_served(&result, "etcd");
    assert_eq!(result["preload"]["keys"], 200, "{result}");
    assert!(result["ops"]["get"]["operations"].as_u64().unwrap() > 0);
    assert!(result["ops"]["set"]["operations"].as_u64().unwrap() > 0);
    assert!(
        result["server_cpu_us_per_op"].as_f64().unwrap() > 0.0,
        "etcd's CPU is found by its port: {result}"
    );
}

#[cfg(feature = "etcd")]
#[test]
fn etcd_lock_run_counts_pairs_and_keeps_its_promises() {
    let Some((_member, target)) = EtcdMember::start_healthy() else {
        return;
    };
    let result = run_bench(&[
        "--target",
        &target,
        "--workload",
        "lock",
        "--contenders",
        "4",
        "--duration-secs",
        "1",
    ]);
    assert_locked(&result, "etcd", 4, 1);
}
