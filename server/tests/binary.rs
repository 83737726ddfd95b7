//! The `tessera-server` binary as an operator runs it: it serves on `port + core` until SIGTERM
//! or SIGINT and then exits 0, `--print-config` prints TOML, and an invalid setting exits
//! non-zero with a message naming the setting.

mod common;

use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use common::{free_port_pair, RawConnection};
use tessera_protocol::Response;

/// Longest the binary may take to start serving.
const START_DURATION_MAX: Duration = Duration::from_secs(10);

/// Longest the binary may take to exit after a termination signal.
const EXIT_DURATION_MAX: Duration = Duration::from_secs(5);

/// The binary with no `TESSERA_*` variable inherited from the environment running the tests.
fn server_command() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_tessera-server"));
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("TESSERA_") {
            command.env_remove(name);
        }
    }
    // No data directory in the source tree; the durable binary is tested in durability.rs.
    command.env("TESSERA_DURABILITY", "memory");
    command
}

fn run(arguments: &[&str]) -> Output {
    server_command()
        .args(arguments)
        .output()
        .expect("the binary runs")
}

/// A running server process, killed if the test ends before it exits.
struct ServerProcess {
    child: Child,
}

impl ServerProcess {
    fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait for the binary") {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn stderr(&mut self) -> String {
        let mut text = String::new();
        if let Some(mut stderr) = self.child.stderr.take() {
            let _ = stderr.read_to_string(&mut text);
        }
        text
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {signal} failed: {status}");
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Starts the binary with two cores on free ports and waits until both cores accept. Retries
/// on new ports if another process took the chosen ones in between.
fn start_binary() -> (ServerProcess, u16) {
    for _ in 0..3 {
        let base = free_port_pair();
        let child = server_command()
            .args(["--cores", "2", "--port", &base.to_string()])
            .args(["--memory-bytes-max", "256MiB", "--log", "warn"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn the binary");
        let mut process = ServerProcess { child };
        let deadline = Instant::now() + START_DURATION_MAX;
        loop {
            if let Some(status) = process.child.try_wait().expect("wait for the binary") {
                let stderr = process.stderr();
                // Another process took the ports, or registered them (its admin or peer
                // port, instance.rs): try others.
                assert!(
                    stderr.contains("cannot listen") || stderr.contains("already uses"),
                    "the binary exited with {status} before serving: {stderr}"
                );
                break;
            }
            let is_serving = [base, base + 1]
                .iter()
                .all(|port| TcpStream::connect(("127.0.0.1", *port)).is_ok());
            if is_serving {
                return (process, base);
            }
            assert!(
                Instant::now() < deadline,
                "the binary did not start serving"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    panic!("the binary could not bind free ports three times");
}

fn serves_then_exits_0_on(signal: &str) {
    let (mut process, base) = start_binary();
    let addresses = [
        format!("127.0.0.1:{base}"),
        format!("127.0.0.1:{}", base + 1),
    ];
    for (core_index, address) in addresses.iter().enumerate() {
        let mut connection = RawConnection::open(address);
        let Response::Hello { topology, .. } = connection.call(&common::hello_request()) else {
            panic!("core {core_index} did not answer the handshake");
        };
        let advertised: Vec<&str> = topology.nodes[0]
            .cores
            .iter()
            .map(|core| core.address.as_str())
            .collect();
        assert_eq!(advertised, addresses, "core i listens on port + i");
        connection.assert_serving(format!("binary-{core_index}").as_bytes());
    }
    let mut idle = RawConnection::open(&addresses[1]);
    assert!(matches!(
        idle.call(&tessera_protocol::Request::Ping),
        Response::Pong { .. }
    ));

    process.signal(signal);
    let Some(status) = process.wait_timeout(EXIT_DURATION_MAX) else {
        panic!("the binary did not exit within {EXIT_DURATION_MAX:?} of {signal}");
    };
    let stderr = process.stderr();
    assert!(
        status.success(),
        "exit status {status} after {signal}: {stderr}"
    );
    idle.expect_closed();
    // Free again once the process is gone (within a bound: the kernel tears down io_uring
    // instances after the process exits, see `listener_release.rs`).
    for address in &addresses {
        let is_released = common::wait_until(Duration::from_secs(1), || {
            TcpListener::bind(address.as_str()).is_ok()
        });
        assert!(
            is_released,
            "{address} is still bound after the process exited"
        );
    }
}

#[test]
fn binary_serves_and_exits_0_on_sigterm() {
    serves_then_exits_0_on("-TERM");
}

#[test]
fn binary_serves_and_exits_0_on_sigint() {
    serves_then_exits_0_on("-INT");
}

#[test]
fn print_config_prints_toml_and_exits_0() {
    let output = run(&["--print-config", "--cores", "2", "--port", "7100"]);
    assert!(output.status.success(), "{output:?}");
    let text = String::from_utf8(output.stdout).expect("utf-8");
    assert!(text.contains("port = "), "{text}");
    let config: tessera_server::Config = toml::from_str(&text).expect("the output is the config");
    assert_eq!(config.cores, 2);
    assert_eq!(config.port, 7100);
    config.validate().expect("the printed config is valid");
}

#[test]
fn invalid_settings_exit_non_zero_naming_the_setting() {
    for (arguments, setting) in [
        (&["--cores", "0"][..], "cores"),
        (&["--port", "65535", "--cores", "2"][..], "port"),
        (&["--tick-ms", "0", "--cores", "1"][..], "tick_ms"),
    ] {
        let output = run(arguments);
        assert!(!output.status.success(), "{arguments:?} was accepted");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(setting), "{arguments:?}: {stderr}");
        assert!(output.stdout.is_empty(), "{arguments:?} printed to stdout");
    }
    let output = run(&["--no-such-flag"]);
    assert!(!output.status.success(), "an unknown flag was accepted");
}

#[test]
fn log_lines_go_to_the_log_target_file() {
    let directory = std::env::temp_dir().join(format!("tessera-log-target-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&directory);
    std::fs::create_dir_all(&directory).expect("create the test directory");
    let log_path = directory.join("server.log");
    std::fs::write(&log_path, "an earlier line\n").expect("write the log file");
    let target = format!("file:{}", log_path.display());
    let child = server_command()
        .args([
            "--cores",
            "1",
            "--port",
            "0",
            "--memory-bytes-max",
            "256MiB",
        ])
        .args(["--log", "info", "--log-target", &target])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the binary");
    let mut process = ServerProcess { child };
    let read_log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    assert!(
        common::wait_until(START_DURATION_MAX, || read_log().contains("server ready")),
        "no 'server ready' in the log file: {}",
        read_log()
    );
    process.signal("-TERM");
    let status = process
        .wait_timeout(EXIT_DURATION_MAX)
        .expect("exits after SIGTERM");
    let stderr = process.stderr();
    assert!(status.success(), "exit status {status}: {stderr}");
    let log = read_log();
    // Appended, not truncated; plain text (no colour codes); stderr has no log line.
    assert!(log.starts_with("an earlier line\n"), "{log}");
    assert!(log.contains("stopped"), "{log}");
    assert!(!log.contains('\u{1b}'), "{log}");
    assert!(!stderr.contains("server ready"), "{stderr}");

    let unwritable = format!("file:{}", directory.join("missing/server.log").display());
    let output = run(&["--port", "0", "--log-target", &unwritable]);
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("cannot open log target"), "{stderr}");
    std::fs::remove_dir_all(&directory).expect("remove the test directory");
}
