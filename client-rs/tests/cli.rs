//! The `tessera` command-line client, run as a separate process against a server started in
//! this test process: its output (text and `-o json`) and its exit status, which scripts
//! depend on: 0 on success, 1 when `get` finds no key, 2 on any error.
//!
//! Every run of the binary has a deadline; a run that outlives it is killed and fails the
//! test.

mod common;

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{start_server, stop_server, unused_address, CORE_COUNT};
use serde_json::Value;
use tessera_server::Server;

/// Longest one run of the binary may take.
const RUN_TIMEOUT: Duration = Duration::from_secs(20);

/// How `tessera` is told where the server is.
enum Endpoints<'a> {
    /// `--endpoints <list>`.
    Flag(&'a str),
    /// The `TESSERA_ENDPOINTS` environment variable.
    Environment(&'a str),
}

/// What one run of the binary did.
struct Run {
    status_code: i32,
    stdout: String,
    stderr: String,
}

impl std::fmt::Debug for Run {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            formatter,
            "exit status {}\n--- stdout ---\n{}--- stderr ---\n{}",
            self.status_code, self.stdout, self.stderr
        )
    }
}

/// Runs `tessera` with `endpoints` and `arguments`, waiting at most [`RUN_TIMEOUT`].
fn tessera(endpoints: &Endpoints<'_>, arguments: &[&str]) -> Run {
    let mut command = Command::new(env!("CARGO_BIN_EXE_tessera"));
    // The caller's environment must not leak into the test.
    command.env_remove("TESSERA_ENDPOINTS");
    match endpoints {
        Endpoints::Flag(list) => {
            command.args(["--endpoints", list]);
        }
        Endpoints::Environment(list) => {
            command.env("TESSERA_ENDPOINTS", list);
        }
    }
    let mut child = command
        .args(arguments)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the tessera binary starts");
    let deadline = Instant::now() + RUN_TIMEOUT;
    // The outputs are small, so the child never blocks on a full pipe before it exits.
    while child.try_wait().expect("the child can be polled").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("tessera {arguments:?} did not exit within {RUN_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let Output {
        status,
        stdout,
        stderr,
    } = child
        .wait_with_output()
        .expect("the child's output can be read");
    Run {
        status_code: status
            .code()
            .expect("the child exited, not killed by a signal"),
        stdout: String::from_utf8(stdout).expect("stdout is UTF-8"),
        stderr: String::from_utf8(stderr).expect("stderr is UTF-8"),
    }
}

/// A two-core server and the `--endpoints` value that names its core 0.
struct Fixture {
    server: Server,
    endpoint: String,
}

impl Fixture {
    fn start() -> Self {
        let server = start_server(CORE_COUNT);
        let endpoint = server.addresses()[0].clone();
        Self { server, endpoint }
    }

    /// Runs `tessera --endpoints <core 0> <arguments>`.
    fn run(&self, arguments: &[&str]) -> Run {
        tessera(&Endpoints::Flag(&self.endpoint), arguments)
    }

    /// Runs the binary and checks that it exited with `status_code`.
    fn run_expecting(&self, status_code: i32, arguments: &[&str]) -> Run {
        let run = self.run(arguments);
        assert_eq!(
            run.status_code, status_code,
            "tessera {arguments:?}: {run:?}"
        );
        run
    }

    fn stop(self) {
        stop_server(self.server);
    }
}

fn parse_json(run: &Run) -> Value {
    serde_json::from_str(run.stdout.trim())
        .unwrap_or_else(|error| panic!("stdout is not one JSON value ({error}): {run:?}"))
}

#[test]
fn put_then_get_prints_the_value() {
    let fixture = Fixture::start();
    let put = fixture.run_expecting(0, &["put", "k", "v"]);
    assert!(put.stdout.starts_with("OK (version "), "{put:?}");
    let get = fixture.run_expecting(0, &["get", "k"]);
    assert_eq!(get.stdout, "v\n");
    let get = fixture.run_expecting(1, &["get", "missing"]);
    assert_eq!(get.stdout, "", "{get:?}");
    assert!(get.stderr.contains("not found"), "{get:?}");
    fixture.stop();
}

#[test]
fn expired_key_is_not_found() {
    let fixture = Fixture::start();
    fixture.run_expecting(0, &["put", "t", "v", "--ttl-ms", "300"]);
    let ttl = fixture.run_expecting(0, &["ttl", "t"]);
    let remaining_ms: u64 = ttl
        .stdout
        .trim()
        .strip_suffix(" ms")
        .and_then(|number| number.parse().ok())
        .unwrap_or_else(|| panic!("ttl prints `<n> ms`: {ttl:?}"));
    assert!(remaining_ms <= 300, "{ttl:?}");
    std::thread::sleep(Duration::from_millis(500));
    fixture.run_expecting(1, &["get", "t"]);
    fixture.stop();
}

#[test]
fn key_commands_report_what_they_did() {
    let fixture = Fixture::start();
    fixture.run_expecting(0, &["put", "k", "v"]);
    let refused = fixture.run_expecting(0, &["put", "k", "w", "--if-absent"]);
    assert!(refused.stdout.contains("not applied"), "{refused:?}");
    assert_eq!(fixture.run_expecting(0, &["get", "k"]).stdout, "v\n");
    fixture.run_expecting(0, &["put", "k", "x", "--if-present"]);
    assert_eq!(fixture.run_expecting(0, &["get", "k"]).stdout, "x\n");

    assert_eq!(fixture.run_expecting(0, &["exists", "k"]).stdout, "true\n");
    assert_eq!(
        fixture.run_expecting(0, &["ttl", "k"]).stdout,
        "no expiry\n"
    );
    assert_eq!(
        fixture.run_expecting(0, &["expire", "k", "60000"]).stdout,
        "OK\n"
    );
    fixture.run_expecting(0, &["put", "k", "y", "--keep-ttl"]);
    let ttl = fixture.run_expecting(0, &["ttl", "k"]);
    assert!(
        ttl.stdout.ends_with(" ms\n"),
        "keep-ttl keeps the expiry: {ttl:?}"
    );
    assert_eq!(fixture.run_expecting(0, &["persist", "k"]).stdout, "OK\n");
    assert_eq!(
        fixture.run_expecting(0, &["ttl", "k"]).stdout,
        "no expiry\n"
    );

    assert_eq!(fixture.run_expecting(0, &["del", "k"]).stdout, "deleted\n");
    assert_eq!(
        fixture.run_expecting(0, &["del", "k"]).stdout,
        "not found\n"
    );
    assert_eq!(fixture.run_expecting(0, &["exists", "k"]).stdout, "false\n");
    assert_eq!(
        fixture.run_expecting(0, &["ttl", "k"]).stdout,
        "not found\n"
    );
    fixture.stop();
}

#[test]
fn topology_shows_cores_and_slot_ranges() {
    let fixture = Fixture::start();
    let run = fixture.run_expecting(0, &["topology"]);
    for address in fixture.server.addresses() {
        assert!(run.stdout.contains(&address), "missing {address}: {run:?}");
    }
    assert!(run.stdout.contains("0..8192"), "{run:?}");
    assert!(run.stdout.contains("8192..16384"), "{run:?}");

    let run = fixture.run_expecting(0, &["-o", "json", "topology"]);
    let topology = parse_json(&run);
    let cores = topology["nodes"][0]["cores"]
        .as_array()
        .unwrap_or_else(|| panic!("nodes[0].cores is a list: {run:?}"));
    assert_eq!(cores.len(), CORE_COUNT, "{run:?}");
    let addresses: Vec<&str> = cores
        .iter()
        .map(|core| core["address"].as_str().expect("an address is a string"))
        .collect();
    assert_eq!(addresses, fixture.server.addresses());
    let ranges: Vec<(u64, u64)> = cores
        .iter()
        .map(|core| {
            let start = core["slot_start"].as_u64().expect("slot_start is a number");
            let end = core["slot_end"].as_u64().expect("slot_end is a number");
            (start, end)
        })
        .collect();
    assert_eq!(ranges, [(0, 8192), (8192, 16384)]);
    assert!(topology["epoch"].as_u64().is_some(), "{run:?}");
    fixture.stop();
}

#[test]
fn json_output_for_scripts() {
    let fixture = Fixture::start();
    let put = parse_json(&fixture.run_expecting(0, &["-o", "json", "put", "k", "v"]));
    assert_eq!(put["applied"], Value::Bool(true));
    let version = put["version"].as_u64().expect("version is a number");

    let run = fixture.run_expecting(0, &["-o", "json", "get", "k"]);
    assert!(run.stdout.contains(r#""value":"v""#), "{run:?}");
    let get = parse_json(&run);
    assert_eq!(get["found"], Value::Bool(true));
    assert_eq!(get["value"], "v");
    assert_eq!(get["version"].as_u64(), Some(version));
    assert_eq!(get["expires_at_ms"], Value::Null);

    let missing = parse_json(&fixture.run_expecting(1, &["-o", "json", "get", "missing"]));
    assert_eq!(missing["found"], Value::Bool(false));

    let stats = parse_json(&fixture.run_expecting(0, &["-o", "json", "stats"]));
    let stats = stats.as_array().expect("stats is a list");
    assert_eq!(stats.len(), CORE_COUNT);
    let key_count: u64 = stats
        .iter()
        .map(|core| core["key_count"].as_u64().expect("key_count is a number"))
        .sum();
    assert_eq!(key_count, 1);

    let pongs = parse_json(&fixture.run_expecting(0, &["-o", "json", "ping"]));
    assert_eq!(pongs.as_array().map(Vec::len), Some(CORE_COUNT));
    fixture.stop();
}

#[test]
fn ping_prints_one_pong_per_core() {
    let fixture = Fixture::start();
    let run = fixture.run_expecting(0, &["ping"]);
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(lines.len(), CORE_COUNT, "{run:?}");
    for (line, address) in lines.iter().zip(fixture.server.addresses()) {
        assert!(line.starts_with("PONG"), "{run:?}");
        assert!(line.contains(&address), "{run:?}");
    }
    let stats = fixture.run_expecting(0, &["stats"]);
    assert_eq!(stats.stdout.lines().count(), 1 + CORE_COUNT, "{stats:?}");
    fixture.stop();
}

#[test]
fn unreachable_endpoint_exits_2() {
    let address = unused_address();
    let run = tessera(
        &Endpoints::Flag(&address),
        &["--timeout-ms", "2000", "get", "k"],
    );
    assert_eq!(run.status_code, 2, "{run:?}");
    assert_eq!(run.stdout, "", "{run:?}");
    assert!(run.stderr.starts_with("tessera: "), "{run:?}");
    assert!(run.stderr.contains(&address), "{run:?}");

    let run = tessera(
        &Endpoints::Flag(&address),
        &["-o", "json", "--timeout-ms", "2000", "ping"],
    );
    assert_eq!(run.status_code, 2, "{run:?}");
    let error = parse_json(&run);
    assert!(error["error"].as_str().is_some(), "{run:?}");
}

#[test]
fn usage_errors_exit_2() {
    let run = tessera(&Endpoints::Flag("127.0.0.1:1"), &["get"]);
    assert_eq!(run.status_code, 2, "a missing argument: {run:?}");
    let run = tessera(&Endpoints::Flag("127.0.0.1:1"), &["frobnicate"]);
    assert_eq!(run.status_code, 2, "an unknown command: {run:?}");
    let run = tessera(
        &Endpoints::Flag("127.0.0.1:1"),
        &["put", "k", "v", "--if-absent", "--if-present"],
    );
    assert_eq!(run.status_code, 2, "conflicting flags: {run:?}");
}

#[test]
fn endpoints_from_the_environment() {
    let fixture = Fixture::start();
    fixture.run_expecting(0, &["put", "k", "from-flag"]);
    let run = tessera(&Endpoints::Environment(&fixture.endpoint), &["get", "k"]);
    assert_eq!(run.status_code, 0, "{run:?}");
    assert_eq!(run.stdout, "from-flag\n");

    // A list: the dead endpoint is skipped.
    let list = format!("{},{}", unused_address(), fixture.endpoint);
    let run = tessera(&Endpoints::Environment(&list), &["get", "k"]);
    assert_eq!(run.status_code, 0, "{run:?}");
    assert_eq!(run.stdout, "from-flag\n");
    fixture.stop();
}

#[test]
fn add_prints_the_counter_and_refuses_text() {
    let fixture = Fixture::start();
    assert_eq!(fixture.run_expecting(0, &["add", "hits"]).stdout, "1\n");
    assert_eq!(
        fixture.run_expecting(0, &["add", "hits", "41"]).stdout,
        "42\n"
    );
    assert_eq!(
        fixture.run_expecting(0, &["add", "hits", "-2"]).stdout,
        "40\n"
    );
    let json = parse_json(&fixture.run_expecting(0, &["-o", "json", "add", "hits", "2"]));
    assert_eq!(json["value"], 42);
    fixture.run_expecting(0, &["put", "name", "ada"]);
    let refused = fixture.run_expecting(2, &["add", "name"]);
    assert!(refused.stderr.contains("out_of_range"), "{refused:?}");
    fixture.stop();
}
