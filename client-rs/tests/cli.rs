//! The `tessera` command-line client, run as a separate process against a server started in
//! this test process: its output (text and `-o json`) and its exit status, which scripts
//! depend on: 0 on success (a conditional write whose condition failed included), 1 when
//! `get` or `counter get` finds no key or `txn` ran its failure branch, 2 on any error.
//!
//! `txn` reads its document from stdin ([`tessera_with_input`]); a malformed one is refused
//! before connecting, so those cases need no server.
//!
//! Every run of the binary has a deadline; a run that outlives it is killed and fails the
//! test.
//!
//! `scan_errors_in_json_are_one_value` guards a bug found when it was first written: `scan`
//! with `-o json` printed `{"items":[` before reading the first page, so an error left that
//! opening in front of the error object and stdout was not one JSON value.
//!
//! `watch` runs in the background ([`Watcher`]): its lines are read as they come, with a
//! deadline on each, and the process is killed if the test ends first. A test writes only
//! once every core has answered the watch's first progress request (`--progress-ms` prints
//! it), so no write can land before the watch and be missed.
//!
//! `put --field`, `get` with fields, `index` and `query` (the module [`fields_indexes_and_
//! queries`]) check the text forms against the values the client reads, and page through a
//! query with the cursor the binary prints until it prints none.
//!
//! `lease` commands: nothing in the binary renews a lease in the background, so a granted
//! lease lives exactly as long as its TTL and the `lease keepalive` runs allow; the tests of
//! expiry rely on that. `lease keepalive --every-ms` runs in the background like a watch.

mod common;

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read, Write as _};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{core_of_key, start_server, stop_server, unused_address, CORE_COUNT};
use serde_json::Value;
use tessera_client::{BlockingClient, PutOptions};
use tessera_protocol::limits::KEY_SIZE_MAX;
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
    tessera_with_input(endpoints, arguments, None)
}

/// Runs `tessera` like [`tessera`], with `input` (if any) on its stdin, which is then closed.
fn tessera_with_input(endpoints: &Endpoints<'_>, arguments: &[&str], input: Option<&str>) -> Run {
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
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the tessera binary starts");
    if let Some(input) = input {
        let mut stdin = child.stdin.take().expect("stdin is piped");
        // A binary that exits before reading all of it closes the pipe: not this test's
        // failure to report.
        let _ = stdin.write_all(input.as_bytes());
    }
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

    /// Runs the binary with `input` on stdin and checks that it exited with `status_code`.
    fn run_with_input(&self, status_code: i32, arguments: &[&str], input: &str) -> Run {
        let run = tessera_with_input(&Endpoints::Flag(&self.endpoint), arguments, Some(input));
        assert_eq!(
            run.status_code, status_code,
            "tessera {arguments:?} < {input}: {run:?}"
        );
        run
    }

    /// A blocking client of this server, for writing many keys faster than one run of the
    /// binary per key, and for reading what the binary should print.
    fn client(&self) -> BlockingClient {
        BlockingClient::connect([self.endpoint.as_str()]).expect("the test server accepts a client")
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
    assert!(put.stdout.starts_with("OK (mod_revision "), "{put:?}");
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
    let created = put["mod_revision"]
        .as_u64()
        .expect("mod_revision is a number");
    assert!(created > 0, "{put}");

    let run = fixture.run_expecting(0, &["-o", "json", "get", "k"]);
    assert!(run.stdout.contains(r#""value":"v""#), "{run:?}");
    let get = parse_json(&run);
    assert_eq!(get["found"], Value::Bool(true));
    assert_eq!(get["value"], "v");
    assert_eq!(get["create_revision"].as_u64(), Some(created));
    assert_eq!(get["mod_revision"].as_u64(), Some(created));
    assert_eq!(get["version"].as_u64(), Some(1));
    assert_eq!(get["expires_at_ms"], Value::Null);

    // A second write moves the mod revision and counts in the version; the create revision
    // stays.
    let put = parse_json(&fixture.run_expecting(0, &["-o", "json", "put", "k", "w"]));
    let modified = put["mod_revision"]
        .as_u64()
        .expect("mod_revision is a number");
    assert!(modified > created, "{put}");
    let get = parse_json(&fixture.run_expecting(0, &["-o", "json", "get", "k"]));
    assert_eq!(get["value"], "w");
    assert_eq!(get["create_revision"].as_u64(), Some(created));
    assert_eq!(get["mod_revision"].as_u64(), Some(modified));
    assert_eq!(get["version"].as_u64(), Some(2));

    // A refused put reports the current mod revision.
    let refused =
        parse_json(&fixture.run_expecting(0, &["-o", "json", "put", "k", "x", "--if-absent"]));
    assert_eq!(refused["applied"], Value::Bool(false));
    assert_eq!(refused["mod_revision"].as_u64(), Some(modified));

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

/// `stats --count 2 --interval-ms 200` prints the header, then two lines of totals across
/// every core: the keys written, rates only from the second line on.
#[test]
fn stats_rolling_view_prints_totals_under_a_header() {
    let fixture = Fixture::start();
    let client = fixture.client();
    for index in 0..3 {
        client
            .put(format!("rolling-{index}"), "value")
            .expect("the put applies");
    }
    let run = fixture.run_expecting(0, &["stats", "--count", "2", "--interval-ms", "200"]);
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{run:?}");
    let header: Vec<&str> = lines[0].split_whitespace().collect();
    assert_eq!(
        header,
        [
            "keys",
            "memory",
            "mem%",
            "req/s",
            "conns",
            "expired/s",
            "watchers",
            "syncs/s",
            "rec/sync"
        ],
        "{run:?}"
    );
    let column = |line: &str, name: &str| -> String {
        let index = header.iter().position(|column| *column == name).unwrap();
        line.split_whitespace().nth(index).unwrap().to_owned()
    };
    for line in &lines[1..] {
        assert_eq!(line.split_whitespace().count(), header.len(), "{line}");
        assert_eq!(column(line, "keys"), "3", "{run:?}");
        assert_eq!(column(line, "watchers"), "0", "{run:?}");
        // The command's own connection, at least.
        assert!(
            column(line, "conns").parse::<u64>().unwrap() >= 1,
            "{run:?}"
        );
        assert_ne!(column(line, "memory"), "0B", "{run:?}");
    }
    assert_eq!(
        column(lines[1], "req/s"),
        "-",
        "no rate on the first line: {run:?}"
    );
    let rate: f64 = column(lines[2], "req/s")
        .parse()
        .expect("a rate on the second line");
    assert!(rate >= 0.0, "{run:?}");
    // In memory mode nothing is synced.
    assert_eq!(column(lines[2], "syncs/s"), "0", "{run:?}");
    assert_eq!(column(lines[2], "rec/sync"), "-", "{run:?}");

    let run = fixture.run_expecting(0, &["-o", "json", "stats", "--count", "1"]);
    let line = parse_json(&run);
    assert_eq!(line["key_count"].as_u64(), Some(3), "{run:?}");
    assert_eq!(line["requests_per_second"], Value::Null, "{run:?}");
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

/// Keys `fruit:*` written in shuffled order through the binary, with neighbours of the prefix
/// on both sides, and the keys expected from `scan fruit:` in order. Checks that they span
/// every core.
fn write_fruits(fixture: &Fixture) -> Vec<(&'static str, &'static str)> {
    let fruits = [
        ("fruit:kiwi", "green"),
        ("fruit:apple", "red and round"),
        ("fruit:mango", "orange"),
        ("fruit:banana", "yellow"),
        ("fruit:fig", "purple"),
        ("fruit:cherry", "dark red"),
        ("fruit:lemon", "sour"),
        ("fruit:date", "brown"),
        ("fruit:grape", "bunch"),
        ("fruit:elderberry", "tiny"),
        ("fruit:honeydew", "pale"),
        ("fruit:jackfruit", "huge"),
    ];
    for (key, value) in fruits {
        fixture.run_expecting(0, &["put", key, value]);
    }
    for (key, value) in [
        ("fruit", "shorter"),
        ("fruit9", "below"),
        ("fruit;", "above"),
    ] {
        fixture.run_expecting(0, &["put", key, value]);
    }
    let topology = fixture.client().topology();
    let mut key_count_per_core = [0_usize; CORE_COUNT];
    for (key, _) in fruits {
        key_count_per_core[core_of_key(&topology, key.as_bytes())] += 1;
    }
    assert!(
        key_count_per_core.iter().all(|&count| count > 0),
        "the keys must span every core: {key_count_per_core:?}"
    );
    let mut sorted = fruits.to_vec();
    sorted.sort_unstable();
    sorted
}

/// Writes `many:0000` .. `many:<key_count - 1>` with values `value:NNNN` in one batch.
fn write_many(fixture: &Fixture, key_count: usize) -> Vec<String> {
    let keys: Vec<String> = (0..key_count)
        .map(|index| format!("many:{index:04}"))
        .collect();
    let entries: Vec<(&String, String)> = keys
        .iter()
        .enumerate()
        .map(|(index, key)| (key, format!("value:{index:04}")))
        .collect();
    fixture
        .client()
        .mput(&entries)
        .expect("the batch is written");
    keys
}

#[test]
fn scan_prints_keys_in_key_order() {
    let fixture = Fixture::start();
    let fruits = write_fruits(&fixture);
    let run = fixture.run_expecting(0, &["scan", "fruit:"]);
    let expected = fruits.iter().fold(String::new(), |mut text, (key, value)| {
        let _ = writeln!(text, "{key}\t{value}");
        text
    });
    assert_eq!(run.stdout, expected, "{run:?}");
    assert_eq!(run.stderr, "", "{run:?}");

    // The empty prefix is every key, the neighbours of `fruit:` included.
    let run = fixture.run_expecting(0, &["scan", ""]);
    let keys: Vec<&str> = run
        .stdout
        .lines()
        .map(|line| line.split('\t').next().expect("a line has a key"))
        .collect();
    let mut expected_keys: Vec<&str> = fruits.iter().map(|(key, _)| *key).collect();
    expected_keys.extend(["fruit", "fruit9", "fruit;"]);
    expected_keys.sort_unstable();
    assert_eq!(keys, expected_keys, "{run:?}");

    // A prefix nothing has prints nothing, and succeeds.
    let run = fixture.run_expecting(0, &["scan", "vegetable:"]);
    assert_eq!(run.stdout, "", "{run:?}");
    fixture.stop();
}

#[test]
fn scan_limit_and_keys_only() {
    const KEY_COUNT: usize = 2500;
    let fixture = Fixture::start();
    let keys = write_many(&fixture, KEY_COUNT);
    let text_lines = |count: usize| -> String {
        keys[..count]
            .iter()
            .enumerate()
            .fold(String::new(), |mut text, (index, key)| {
                let _ = writeln!(text, "{key}\tvalue:{index:04}");
                text
            })
    };
    let key_lines = |count: usize| -> String {
        keys[..count].iter().fold(String::new(), |mut text, key| {
            let _ = writeln!(text, "{key}");
            text
        })
    };

    let run = fixture.run_expecting(0, &["scan", "many:", "--limit", "3"]);
    assert_eq!(run.stdout, text_lines(3), "{run:?}");
    let run = fixture.run_expecting(0, &["scan", "many:", "--limit", "1"]);
    assert_eq!(run.stdout, text_lines(1), "{run:?}");
    // More than one page of the binary's (1000 keys), and then all of them, however many
    // pages that takes; a limit over the key count prints every key once.
    for (limit, expected_count) in [("1500", 1500), ("2500", KEY_COUNT), ("100000", KEY_COUNT)] {
        let run = fixture.run_expecting(0, &["scan", "many:", "--limit", limit]);
        assert!(
            run.stdout == text_lines(expected_count),
            "--limit {limit}: {run:?}"
        );
    }
    let run = fixture.run_expecting(0, &["scan", "many:"]);
    assert!(run.stdout == text_lines(KEY_COUNT), "no limit: {run:?}");

    let run = fixture.run_expecting(0, &["scan", "many:", "--keys-only", "--limit", "5"]);
    assert_eq!(run.stdout, key_lines(5), "{run:?}");
    let run = fixture.run_expecting(0, &["scan", "many:", "--keys-only"]);
    assert!(run.stdout == key_lines(KEY_COUNT), "{run:?}");
    fixture.stop();
}

#[test]
fn scan_json_lists_items_count_and_revisions() {
    let fixture = Fixture::start();
    let fruits = write_fruits(&fixture);
    fixture.run_expecting(0, &["put", "fruit:quince", "hard", "--ttl-ms", "60000"]);
    let client = fixture.client();
    let mut expected_keys: Vec<&str> = fruits.iter().map(|(key, _)| *key).collect();
    expected_keys.push("fruit:quince");
    expected_keys.sort_unstable();

    let run = fixture.run_expecting(0, &["-o", "json", "scan", "fruit:"]);
    let scan = parse_json(&run);
    let items = scan["items"]
        .as_array()
        .unwrap_or_else(|| panic!("items is a list: {run:?}"));
    let keys: Vec<&str> = items
        .iter()
        .map(|item| item["key"].as_str().expect("a key is a string"))
        .collect();
    assert_eq!(keys, expected_keys, "{run:?}");
    for item in items {
        let key = item["key"].as_str().expect("a key is a string");
        let entry = client.get(key).unwrap().expect("a scanned key exists");
        // The whole object: these fields and no others.
        let expected = serde_json::json!({
            "key": key,
            "value": String::from_utf8(entry.value).expect("the values are text"),
            "create_revision": entry.create_revision,
            "mod_revision": entry.mod_revision,
            "version": entry.version,
            "expires_at_ms": entry.expires_at_ms,
        });
        assert_eq!(item, &expected);
    }
    let quince = &items[keys.iter().position(|key| *key == "fruit:quince").unwrap()];
    assert!(quince["expires_at_ms"].as_u64().is_some(), "{quince}");
    assert_eq!(
        scan["count"].as_u64(),
        Some(expected_keys.len() as u64),
        "{run:?}"
    );
    let revisions = scan["revisions"].as_array().expect("revisions is a list");
    assert_eq!(revisions.len(), CORE_COUNT, "{run:?}");
    let node_id = client.topology().nodes[0].node_id;
    for (core_index, revision) in revisions.iter().enumerate() {
        assert_eq!(
            revision["node_id"].as_u64(),
            Some(u64::from(node_id)),
            "{run:?}"
        );
        assert_eq!(
            revision["core_id"].as_u64(),
            Some(core_index as u64),
            "{run:?}"
        );
        // Every core holds some of the keys, so every core has written something.
        let number = revision["revision"]
            .as_u64()
            .expect("a revision is a number");
        assert!(number > 0, "{run:?}");
    }

    let run = fixture.run_expecting(
        0,
        &[
            "-o",
            "json",
            "scan",
            "fruit:",
            "--keys-only",
            "--limit",
            "2",
        ],
    );
    let scan = parse_json(&run);
    assert_eq!(
        scan["items"],
        serde_json::json!([{ "key": expected_keys[0] }, { "key": expected_keys[1] }]),
        "{run:?}"
    );
    assert_eq!(scan["count"].as_u64(), Some(2), "{run:?}");

    // More than one of the binary's pages still makes one JSON value.
    write_many(&fixture, 1200);
    let run = fixture.run_expecting(0, &["-o", "json", "scan", "many:", "--keys-only"]);
    let scan = parse_json(&run);
    assert_eq!(scan["items"].as_array().map(Vec::len), Some(1200));
    assert_eq!(scan["items"][1199]["key"], "many:1199");
    assert_eq!(scan["count"].as_u64(), Some(1200));

    let run = fixture.run_expecting(0, &["-o", "json", "scan", "vegetable:"]);
    let scan = parse_json(&run);
    assert_eq!(scan["items"], serde_json::json!([]), "{run:?}");
    assert_eq!(scan["count"].as_u64(), Some(0), "{run:?}");
    fixture.stop();
}

#[test]
fn scan_count_prints_the_number() {
    let fixture = Fixture::start();
    let fruits = write_fruits(&fixture);
    let run = fixture.run_expecting(0, &["scan", "fruit:", "--count"]);
    assert_eq!(run.stdout, format!("{}\n", fruits.len()), "{run:?}");
    let run = fixture.run_expecting(0, &["scan", "", "--count"]);
    assert_eq!(run.stdout, format!("{}\n", fruits.len() + 3), "{run:?}");
    let run = fixture.run_expecting(0, &["scan", "vegetable:", "--count"]);
    assert_eq!(run.stdout, "0\n", "{run:?}");

    fixture.run_expecting(0, &["del", "fruit:kiwi"]);
    let run = fixture.run_expecting(0, &["-o", "json", "scan", "fruit:", "--count"]);
    let count = parse_json(&run);
    assert_eq!(
        count["count"].as_u64(),
        Some(fruits.len() as u64 - 1),
        "{run:?}"
    );
    let revisions = count["revisions"].as_array().expect("revisions is a list");
    assert_eq!(revisions.len(), CORE_COUNT, "{run:?}");
    for (core_index, revision) in revisions.iter().enumerate() {
        assert_eq!(
            revision["core_id"].as_u64(),
            Some(core_index as u64),
            "{run:?}"
        );
        assert!(revision["node_id"].as_u64().is_some(), "{run:?}");
        assert!(
            revision["revision"]
                .as_u64()
                .is_some_and(|number| number > 0),
            "{run:?}"
        );
    }

    for conflicting in [
        &["--count", "--limit", "3"][..],
        &["--count", "--keys-only"][..],
    ] {
        let mut arguments = vec!["scan", "fruit:"];
        arguments.extend_from_slice(conflicting);
        let run = fixture.run_expecting(2, &arguments);
        assert_eq!(run.stdout, "", "{run:?}");
    }
    fixture.stop();
}

#[test]
fn scan_errors_in_json_are_one_value() {
    let fixture = Fixture::start();
    // Twice a key's length: refused however a fix treats a bound one byte over a key.
    let long_prefix = "p".repeat(2 * KEY_SIZE_MAX);
    let run = fixture.run_expecting(2, &["scan", &long_prefix]);
    assert_eq!(run.stdout, "", "{run:?}");
    assert!(run.stderr.starts_with("tessera: "), "{run:?}");

    let run = fixture.run_expecting(2, &["-o", "json", "scan", &long_prefix]);
    let error = parse_json(&run);
    assert!(error["error"].as_str().is_some(), "{run:?}");
    let message = error["error"].as_str().unwrap_or_default();
    assert!(message.contains(&(2 * KEY_SIZE_MAX).to_string()), "{run:?}");
    fixture.stop();
}

/// A `tessera watch` running in the background against a fixture. Its stdout is read line by
/// line on a thread, so a test can wait for each line with a deadline; its stderr is read on
/// another. The process is killed when the watcher is dropped, so a failing test leaves none.
struct Watcher {
    child: Child,
    arguments: Vec<String>,
    lines: mpsc::Receiver<String>,
    stderr: mpsc::Receiver<String>,
    /// Every line read so far, for failure messages and [`Watcher::finish`].
    seen: Vec<String>,
}

/// `--progress-ms` for watchers that want only the first progress lines (every core is
/// watching) and no periodic ones during the test.
const PROGRESS_MS_NEVER: &str = "600000";

impl Watcher {
    /// Starts `tessera --endpoints <core 0> watch <arguments>`.
    fn start(fixture: &Fixture, arguments: &[&str]) -> Self {
        let mut command = Command::new(env!("CARGO_BIN_EXE_tessera"));
        command.env_remove("TESSERA_ENDPOINTS");
        command.args(["--endpoints", &fixture.endpoint]);
        let mut child = command
            .args(arguments)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the tessera binary starts");
        let (line_sender, lines) = mpsc::channel();
        let stdout = child.stdout.take().expect("stdout is piped");
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if line_sender.send(line).is_err() {
                    return;
                }
            }
        });
        let (stderr_sender, stderr) = mpsc::channel();
        let mut stderr_pipe = child.stderr.take().expect("stderr is piped");
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = stderr_pipe.read_to_string(&mut text);
            let _ = stderr_sender.send(text);
        });
        Self {
            child,
            arguments: arguments.iter().map(ToString::to_string).collect(),
            lines,
            stderr,
            seen: Vec::new(),
        }
    }

    /// The next line of stdout, waiting at most [`RUN_TIMEOUT`].
    fn next_line(&mut self) -> String {
        match self.lines.recv_timeout(RUN_TIMEOUT) {
            Ok(line) => {
                self.seen.push(line.clone());
                line
            }
            Err(error) => panic!(
                "tessera watch {:?}: no line within {RUN_TIMEOUT:?} ({error}); so far {:?}",
                self.arguments, self.seen
            ),
        }
    }

    /// Reads lines up to the first progress line of every core, and returns the others read
    /// meanwhile (snapshot lines). From then on every write is watched. A core answers the
    /// progress request only after its snapshot, so every snapshot line is among them.
    fn wait_until_watching(&mut self) -> Vec<String> {
        let mut cores = Vec::new();
        let mut others = Vec::new();
        while cores.len() < CORE_COUNT {
            let line = self.next_line();
            let core = match serde_json::from_str(&line) {
                Ok(Value::Object(object)) if object["type"] == "progress" => {
                    object["core_id"].as_u64()
                }
                Ok(_) => None,
                Err(_) => line
                    .strip_prefix("progress rev=")
                    .and_then(|position| position.split(':').nth(1)?.parse().ok()),
            };
            match core {
                Some(core) if !cores.contains(&core) => cores.push(core),
                Some(_) => {}
                None => others.push(line),
            }
        }
        others
    }

    /// Waits at most [`RUN_TIMEOUT`] for the process to exit, and returns everything it
    /// printed (stdout from the first line, those already read included).
    fn finish(mut self) -> Run {
        let deadline = Instant::now() + RUN_TIMEOUT;
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("the child can be polled") {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "tessera watch {:?} did not exit within {RUN_TIMEOUT:?}; printed {:?}",
                self.arguments,
                self.seen
            );
            std::thread::sleep(Duration::from_millis(5));
        };
        // The pipes close with the process, which ends both reading threads.
        while let Ok(line) = self.lines.recv_timeout(RUN_TIMEOUT) {
            self.seen.push(line);
        }
        let stderr = self
            .stderr
            .recv_timeout(RUN_TIMEOUT)
            .expect("stderr is read to its end");
        Run {
            status_code: status
                .code()
                .expect("the child exited, not killed by a signal"),
            stdout: self.seen.iter().fold(String::new(), |mut text, line| {
                let _ = writeln!(text, "{line}");
                text
            }),
            stderr,
        }
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The positions of the `resume with: --from ...` line of a watch's stderr, one per core.
fn resume_positions(run: &Run) -> Vec<String> {
    let line = run
        .stderr
        .lines()
        .find_map(|line| line.strip_prefix("resume with: --from "))
        .unwrap_or_else(|| panic!("a resume line on stderr: {run:?}"));
    let positions: Vec<String> = line.split(' ').map(ToOwned::to_owned).collect();
    assert_eq!(positions.len(), CORE_COUNT, "{run:?}");
    positions
}

/// `node:core:revision` of `key`'s core at `revision`, as `watch` prints it.
fn position_of(client: &BlockingClient, key: &str, revision: u64) -> String {
    let topology = client.topology();
    let node_id = topology.nodes[0].node_id;
    let core_id = topology.nodes[0].cores[core_of_key(&topology, key.as_bytes())].core_id;
    format!("{node_id}:{core_id}:{revision}")
}

/// The line `watch` prints for a put.
fn put_line(client: &BlockingClient, key: &str, value: &str) -> String {
    let outcome = client.put(key, value).expect("the put applies");
    let version = client.get(key).unwrap().expect("just written").version;
    let position = position_of(client, key, outcome.mod_revision);
    format!("put {key} {value} rev={position} version={version}")
}

/// Deletes `key` and returns the line `watch` prints for it. A delete does not return its
/// revision, so it is the core's revision after it, read from its counters: the test makes
/// no other write to that core in between.
fn delete_line(client: &BlockingClient, key: &str) -> String {
    assert!(
        client.delete(key).expect("the delete applies"),
        "{key} exists"
    );
    let topology = client.topology();
    let core_index = core_of_key(&topology, key.as_bytes());
    let revision = client.stats().expect("stats")[core_index].revision;
    format!("delete {key} rev={}", position_of(client, key, revision))
}

#[test]
fn watch_prints_the_changes_of_a_key_in_order() {
    let fixture = Fixture::start();
    let client = fixture.client();
    let mut watcher = Watcher::start(
        &fixture,
        &[
            "watch",
            "watched:k",
            "--progress-ms",
            PROGRESS_MS_NEVER,
            "--count",
            "4",
        ],
    );
    assert_eq!(watcher.wait_until_watching(), Vec::<String>::new());
    let expected = [
        put_line(&client, "watched:k", "one"),
        put_line(&client, "watched:k", "two"),
        delete_line(&client, "watched:k"),
        put_line(&client, "watched:k", "three"),
    ];
    // Outside the prefix, on every core: not printed.
    for index in 0..8 {
        client.put(format!("other:{index}"), "x").unwrap();
    }
    for line in &expected {
        assert_eq!(&watcher.next_line(), line);
    }
    let run = watcher.finish();
    assert_eq!(run.status_code, 0, "--count ends it: {run:?}");
    assert!(expected[1].ends_with("version=2"), "{expected:?}");
    assert!(
        expected[3].ends_with("version=1"),
        "recreated: {expected:?}"
    );
    // The key's core resumes after its last event.
    let last_position = expected[3]
        .split(' ')
        .find_map(|part| part.strip_prefix("rev="))
        .unwrap();
    assert!(
        resume_positions(&run).contains(&last_position.to_owned()),
        "{run:?}"
    );
    fixture.stop();
}

/// `watch --query` prints keys entering (`put`), changing in and leaving (`left`) the
/// result set, with their fields, and nothing of keys outside it. One key, so one core:
/// its lines come in order.
#[test]
fn watch_query_prints_the_result_set_changes() {
    let fixture = Fixture::start();
    let client = fixture.client();
    let mut watcher = Watcher::start(
        &fixture,
        &[
            "watch",
            "people:",
            "--query",
            "age >= 20",
            "--progress-ms",
            PROGRESS_MS_NEVER,
            "--count",
            "3",
        ],
    );
    assert_eq!(watcher.wait_until_watching(), Vec::<String>::new());
    let put_age = |age: i64| {
        let options = PutOptions::new().field("age", tessera_client::FieldValue::I64(age));
        client.put_with("people:ada", "v", options).unwrap();
    };
    put_age(10); // outside
    put_age(30); // enters
    put_age(31); // changes in it
    put_age(5); // leaves
    let lines: Vec<String> = (0..3).map(|_| watcher.next_line()).collect();
    let run = watcher.finish();
    assert_eq!(run.status_code, 0, "{run:?}");
    let kinds: Vec<&str> = lines
        .iter()
        .map(|line| line.split(' ').next().unwrap())
        .collect();
    assert_eq!(kinds, ["put", "put", "left"], "{lines:?}");
    assert!(lines[0].ends_with("age=30"), "{lines:?}");
    assert!(lines[2].ends_with("age=5"), "{lines:?}");
    fixture.stop();
}

#[test]
fn watch_snapshot_prints_the_keys_first() {
    let fixture = Fixture::start();
    let client = fixture.client();
    let keys = ["snap:a", "snap:b", "snap:c", "snap:d", "snap:e", "snap:f"];
    for key in keys {
        client.put(key, format!("value of {key}")).unwrap();
    }
    client.put("snapshot", "outside the prefix").unwrap();
    let revisions = client.stats().expect("stats");
    let mut watcher = Watcher::start(
        &fixture,
        &[
            "watch",
            "snap:",
            "--snapshot",
            "--progress-ms",
            PROGRESS_MS_NEVER,
            "--count",
            &(keys.len() + 1).to_string(),
        ],
    );
    let mut snapshot_lines = watcher.wait_until_watching();
    let put = put_line(&client, "snap:g", "late");
    assert_eq!(watcher.next_line(), put);
    let run = watcher.finish();
    assert_eq!(run.status_code, 0, "{run:?}");

    // Each core's keys in key order at that core's revision; cores interleave.
    let topology = client.topology();
    for (core_index, core) in topology.nodes[0].cores.iter().enumerate() {
        let position = format!(
            "{}:{}:{}",
            topology.nodes[0].node_id, core.core_id, revisions[core_index].revision
        );
        let core_lines: Vec<&String> = snapshot_lines
            .iter()
            .filter(|line| line.ends_with(&format!(" rev={position}")))
            .collect();
        let mut sorted = core_lines.clone();
        sorted.sort();
        assert_eq!(core_lines, sorted, "core {core_index}: {run:?}");
    }
    snapshot_lines.sort();
    let expected: Vec<String> = keys
        .iter()
        .map(|key| {
            let revision = revisions[core_of_key(&topology, key.as_bytes())].revision;
            format!(
                "snapshot {key} value of {key} rev={}",
                position_of(&client, key, revision)
            )
        })
        .collect();
    assert_eq!(snapshot_lines, expected, "{run:?}");
    fixture.stop();
}

#[test]
fn watch_json_lines_have_their_fields() {
    let fixture = Fixture::start();
    let client = fixture.client();
    let topology = client.topology();
    let node_id = topology.nodes[0].node_id;
    let core_id_of =
        |key: &str| topology.nodes[0].cores[core_of_key(&topology, key.as_bytes())].core_id;
    client.put("j:1", "first").unwrap();
    let first = client.get("j:1").unwrap().unwrap();
    let mut watcher = Watcher::start(
        &fixture,
        &[
            "-o",
            "json",
            "watch",
            "j:",
            "--snapshot",
            "--prev",
            "--progress-ms",
            PROGRESS_MS_NEVER,
            "--count",
            "5",
        ],
    );
    let snapshot_lines = watcher.wait_until_watching();
    assert_eq!(snapshot_lines.len(), 1, "{snapshot_lines:?}");
    let snapshot = parse_line(&snapshot_lines[0]);
    let snapshot_revision = snapshot["revision"].as_u64().expect("revision is a number");
    assert!(snapshot_revision >= first.mod_revision, "{snapshot}");
    // A `scan -o json` item, and the core and revision of the snapshot.
    let expected = serde_json::json!({
        "type": "snapshot", "key": "j:1", "value": "first",
        "create_revision": first.create_revision, "mod_revision": first.mod_revision,
        "version": 1, "expires_at_ms": null,
        "node_id": node_id, "core_id": core_id_of("j:1"), "revision": snapshot_revision,
    });
    assert_eq!(snapshot, expected);

    let second = client.put("j:1", "second").unwrap().mod_revision;
    let brief = PutOptions::new().ttl(Duration::from_millis(50));
    let ttl = client.put_with("j:t", "brief", brief).unwrap().mod_revision;
    client.delete("j:1").unwrap();
    let mut events: Vec<Value> = (0..4).map(|_| parse_line(&watcher.next_line())).collect();
    // Across cores events interleave: compare each event on its own.
    events.sort_by_key(|event| (event["type"].to_string(), event["key"].to_string()));
    let deleted_revision = events[0]["revision"].as_u64().expect("revision");
    let expired_revision = events[1]["revision"].as_u64().expect("revision");
    let expected = [
        serde_json::json!({
            "type": "delete", "key": "j:1", "previous": "second",
            "node_id": node_id, "core_id": core_id_of("j:1"), "revision": deleted_revision,
        }),
        serde_json::json!({
            "type": "expire", "key": "j:t", "previous": "brief",
            "node_id": node_id, "core_id": core_id_of("j:t"), "revision": expired_revision,
        }),
        serde_json::json!({
            "type": "put", "key": "j:1", "value": "second", "previous": "first",
            "create_revision": first.create_revision, "version": 2,
            "node_id": node_id, "core_id": core_id_of("j:1"), "revision": second,
        }),
        serde_json::json!({
            "type": "put", "key": "j:t", "value": "brief", "previous": null,
            "create_revision": ttl, "version": 1,
            "node_id": node_id, "core_id": core_id_of("j:t"), "revision": ttl,
        }),
    ];
    assert_eq!(events, expected);
    assert!(deleted_revision > second, "{events:?}");
    assert!(expired_revision > ttl, "{events:?}");

    let run = watcher.finish();
    assert_eq!(run.status_code, 0, "{run:?}");
    // Every line is one JSON value; the first progress lines carry a core's position.
    for line in run.stdout.lines() {
        let value = parse_line(line);
        if value["type"] == "progress" {
            let core_id = value["core_id"].as_u64().expect("core_id is a number");
            let revision = value["revision"].as_u64().expect("revision is a number");
            let expected = serde_json::json!({
                "type": "progress", "node_id": node_id, "core_id": core_id, "revision": revision,
            });
            assert_eq!(value, expected);
        }
    }
    resume_positions(&run);
    fixture.stop();
}

/// One line of `-o json watch`.
fn parse_line(line: &str) -> Value {
    serde_json::from_str(line).unwrap_or_else(|error| panic!("not JSON ({error}): {line}"))
}

/// Runs `tessera watch resume: --from <positions> --count <count>` to its end, checks it
/// succeeded, and returns its event lines and the positions it says to resume from.
fn resume_watch(
    fixture: &Fixture,
    positions: &[String],
    count: usize,
) -> (Vec<String>, Vec<String>) {
    let count = count.to_string();
    let mut arguments = vec!["watch", "resume:", "--count", &count, "--from"];
    arguments.extend(positions.iter().map(String::as_str));
    let run = fixture.run_expecting(0, &arguments);
    let lines = run.stdout.lines().map(ToOwned::to_owned).collect();
    (lines, resume_positions(&run))
}

/// Sorted, since events of different cores interleave in no set order.
fn sorted(mut lines: Vec<String>) -> Vec<String> {
    lines.sort();
    lines
}

#[test]
fn watch_from_resumes_right_after_the_positions() {
    let fixture = Fixture::start();
    let client = fixture.client();
    let mut watcher = Watcher::start(
        &fixture,
        &[
            "watch",
            "resume:",
            "--progress-ms",
            PROGRESS_MS_NEVER,
            "--count",
            "2",
        ],
    );
    assert_eq!(watcher.wait_until_watching(), Vec::<String>::new());
    let first = [
        put_line(&client, "resume:1", "one"),
        put_line(&client, "resume:2", "two"),
    ];
    let printed = vec![watcher.next_line(), watcher.next_line()];
    let run = watcher.finish();
    assert_eq!(run.status_code, 0, "{run:?}");
    assert_eq!(sorted(printed), sorted(first.to_vec()), "{run:?}");
    let positions = resume_positions(&run);

    // While nobody watches: a resume prints these and nothing before them.
    let later: Vec<String> = ["resume:3", "resume:4", "resume:5"]
        .into_iter()
        .map(|key| put_line(&client, key, "later"))
        .chain([delete_line(&client, "resume:1")])
        .collect();
    let (lines, next_positions) = resume_watch(&fixture, &positions, later.len());
    assert_eq!(sorted(lines), sorted(later.clone()));

    // Repeated `--from`, from where that one stopped: only what came after.
    let last = put_line(&client, "resume:6", "last");
    let mut arguments = vec!["watch", "resume:", "--count", "1"];
    for position in &next_positions {
        arguments.extend(["--from", position.as_str()]);
    }
    let run = fixture.run_expecting(0, &arguments);
    assert_eq!(run.stdout, format!("{last}\n"), "{run:?}");
    let positions = resume_positions(&run);

    // Two keys of one core in one batch share a revision. A `--count` that stops inside it
    // resumes before it, so the rest is not lost (and the first prints again).
    let topology = client.topology();
    let batch_core = core_of_key(&topology, b"resume:batch:0");
    let batch_keys: Vec<String> = (1..)
        .map(|index| format!("resume:batch:{index}"))
        .filter(|key| core_of_key(&topology, key.as_bytes()) == batch_core)
        .take(1)
        .chain(["resume:batch:0".to_owned()])
        .collect();
    let revisions = client
        .mput(&[(&batch_keys[0], "x"), (&batch_keys[1], "y")])
        .unwrap();
    assert_eq!(revisions[0], revisions[1], "one core, one revision");
    let batch: Vec<String> = batch_keys
        .iter()
        .zip(["x", "y"])
        .map(|(key, value)| {
            let position = position_of(&client, key, revisions[0]);
            format!("put {key} {value} rev={position} version=1")
        })
        .collect();
    let (lines, cut_positions) = resume_watch(&fixture, &positions, 1);
    assert_eq!(lines.len(), 1, "{lines:?}");
    let batch_position = position_of(&client, &batch_keys[0], revisions[0] - 1);
    assert!(cut_positions.contains(&batch_position), "{cut_positions:?}");
    assert!(batch.contains(&lines[0]), "{lines:?}");
    let (lines, _) = resume_watch(&fixture, &cut_positions, 2);
    assert_eq!(sorted(lines), sorted(batch.clone()));

    // A resume from the start of history prints every event, each once.
    let from_start: Vec<String> = positions
        .iter()
        .map(|position| {
            let (core, _) = position.rsplit_once(':').unwrap();
            format!("{core}:0")
        })
        .collect();
    let every_event: Vec<String> = first
        .into_iter()
        .chain(later)
        .chain([last])
        .chain(batch)
        .collect();
    let (lines, _) = resume_watch(&fixture, &from_start, every_event.len());
    assert_eq!(sorted(lines), sorted(every_event));
    fixture.stop();
}

#[test]
fn watch_from_compacted_history_says_where_to_resume() {
    let fixture = Fixture::start();
    // More events per core than a core's history keeps (1024 by default).
    write_many(&fixture, 2500);
    let topology = fixture.client().topology();
    let node_id = topology.nodes[0].node_id;
    let mut arguments = vec!["watch".to_owned(), "many:".to_owned(), "--from".to_owned()];
    arguments.extend(
        topology.nodes[0]
            .cores
            .iter()
            .map(|core| format!("{node_id}:{}:0", core.core_id)),
    );
    let arguments: Vec<&str> = arguments.iter().map(String::as_str).collect();
    let run = fixture.run_expecting(2, &arguments);
    assert!(run.stderr.contains("compacted"), "{run:?}");
    assert!(run.stderr.contains("--snapshot"), "{run:?}");
    resume_positions(&run);

    let mut json_arguments = vec!["-o", "json"];
    json_arguments.extend(&arguments);
    let run = fixture.run_expecting(2, &json_arguments);
    let error_line = run.stdout.lines().last().expect("an error line");
    let error: Value = serde_json::from_str(error_line).expect("the error line is JSON");
    assert_eq!(error["type"], "error", "{run:?}");
    assert!(
        error["error"]
            .as_str()
            .is_some_and(|message| message.contains("compacted")),
        "{run:?}"
    );
    fixture.stop();
}

#[test]
fn watch_rejects_bad_positions() {
    for bad in ["1:0", "1:0:x", "one:0:3", "1:0:3:4", "1:70000:3", ""] {
        let run = tessera(
            &Endpoints::Flag("127.0.0.1:1"),
            &["watch", "p", "--from", bad, "1:1:3"],
        );
        assert_eq!(run.status_code, 2, "--from {bad:?}: {run:?}");
        assert_eq!(run.stdout, "", "{run:?}");
        assert!(
            run.stderr.contains("<node>:<core>:<revision>"),
            "--from {bad:?}: {run:?}"
        );
    }
    // A prefix after --from is read as one more position, and the message says so.
    let run = tessera(
        &Endpoints::Flag("127.0.0.1:1"),
        &["watch", "--from", "1:0:3", "1:1:3", "p"],
    );
    assert_eq!(run.status_code, 2, "{run:?}");
    assert!(
        run.stderr.contains("the prefix goes before --from"),
        "{run:?}"
    );
    for conflicting in [
        &["--snapshot", "--from", "1:0:3", "1:1:3"][..],
        &["--puts-only", "--deletes-only"][..],
        &["--count", "0"][..],
        &["--progress-ms", "0"][..],
        // Read as a flag, not a position.
        &["--from", "-1:0:3", "1:1:3"][..],
    ] {
        let mut arguments = vec!["watch", "p"];
        arguments.extend_from_slice(conflicting);
        let run = tessera(&Endpoints::Flag("127.0.0.1:1"), &arguments);
        assert_eq!(run.status_code, 2, "{conflicting:?}: {run:?}");
    }

    // Well-formed, but one core short.
    let fixture = Fixture::start();
    let node_id = fixture.client().topology().nodes[0].node_id;
    let position = format!("{node_id}:0:0");
    let run = fixture.run_expecting(2, &["watch", "p", "--from", &position]);
    assert!(
        run.stderr
            .contains(&format!("no resume position for node {node_id} core 1")),
        "{run:?}"
    );
    assert!(run.stderr.contains("every core"), "{run:?}");
    fixture.stop();
}

/// Sends SIGINT to `child`, as Ctrl-C in a terminal does.
#[cfg(unix)]
fn interrupt(child: &Child) {
    const SIGINT: i32 = 2;
    send_signal(child, SIGINT);
}

#[cfg(unix)]
#[test]
fn watch_interrupted_prints_where_to_resume() {
    let fixture = Fixture::start();
    let client = fixture.client();
    let mut watcher = Watcher::start(
        &fixture,
        &["watch", "ctrl:", "--progress-ms", PROGRESS_MS_NEVER],
    );
    assert_eq!(watcher.wait_until_watching(), Vec::<String>::new());
    let line = put_line(&client, "ctrl:1", "one");
    assert_eq!(watcher.next_line(), line);
    interrupt(&watcher.child);
    let run = watcher.finish();
    assert_eq!(run.status_code, 130, "128 + SIGINT: {run:?}");
    let position = line
        .split(' ')
        .find_map(|part| part.strip_prefix("rev="))
        .unwrap();
    assert!(
        resume_positions(&run).contains(&position.to_owned()),
        "{run:?}"
    );
    fixture.stop();
}

// ---------------------------------------------------------------------------------------
// Counters, conditional writes and transactions.

/// The first key named `prefix:N` that core `core_index` owns.
fn key_on_core(client: &BlockingClient, core_index: usize, prefix: &str) -> String {
    let topology = client.topology();
    // Each name lands on a given core of two with probability one half.
    (0..1000)
        .map(|index| format!("{prefix}:{index}"))
        .find(|key| core_of_key(&topology, key.as_bytes()) == core_index)
        .expect("some key hashes to each core")
}

#[test]
fn counter_add_get_and_set() {
    let fixture = Fixture::start();
    let client = fixture.client();
    assert_eq!(
        fixture
            .run_expecting(0, &["counter", "add", "c", "5"])
            .stdout,
        "5\n"
    );
    assert_eq!(
        fixture
            .run_expecting(0, &["counter", "add", "c", "-7"])
            .stdout,
        "-2\n"
    );
    assert_eq!(
        fixture.run_expecting(0, &["counter", "get", "c"]).stdout,
        "-2\n"
    );
    let json = parse_json(&fixture.run_expecting(0, &["-o", "json", "counter", "add", "c", "3"]));
    let entry = client.get("c").unwrap().expect("the counter exists");
    assert_eq!(
        json,
        serde_json::json!({ "value": 1, "applied": true, "mod_revision": entry.mod_revision })
    );
    let json = parse_json(&fixture.run_expecting(0, &["-o", "json", "counter", "get", "c"]));
    assert_eq!(json, serde_json::json!({ "found": true, "value": 1 }));

    let set = fixture.run_expecting(0, &["counter", "set", "c", "-40"]);
    assert!(set.stdout.starts_with("OK (mod_revision "), "{set:?}");
    assert_eq!(client.counter("c").unwrap(), Some(-40));
    let set = parse_json(&fixture.run_expecting(0, &["-o", "json", "counter", "set", "c", "9"]));
    assert_eq!(set["applied"], true, "{set}");
    assert_eq!(
        set["mod_revision"].as_u64(),
        Some(client.get("c").unwrap().unwrap().mod_revision),
        "{set}"
    );
    assert_eq!(client.counter("c").unwrap(), Some(9));

    // The existing `add` still takes a default delta of 1.
    assert_eq!(fixture.run_expecting(0, &["add", "c"]).stdout, "10\n");
    fixture.stop();
}

#[test]
fn counter_get_of_a_missing_or_non_counter_key() {
    let fixture = Fixture::start();
    let run = fixture.run_expecting(1, &["counter", "get", "nothing"]);
    assert_eq!(run.stdout, "", "{run:?}");
    assert!(run.stderr.contains("not found"), "{run:?}");
    let json = parse_json(&fixture.run_expecting(1, &["-o", "json", "counter", "get", "nothing"]));
    assert_eq!(json, serde_json::json!({ "found": false }));

    fixture.run_expecting(0, &["put", "name", "ada"]);
    let run = fixture.run_expecting(2, &["counter", "get", "name"]);
    assert!(run.stderr.starts_with("tessera: "), "{run:?}");
    assert!(run.stderr.contains("not a counter"), "{run:?}");
    fixture.stop();
}

#[test]
fn counter_bounds_refuse_and_change_nothing() {
    let fixture = Fixture::start();
    let client = fixture.client();
    fixture.run_expecting(
        0,
        &["counter", "add", "b", "8", "--min", "0", "--max", "10"],
    );
    let before = client.get("b").unwrap().expect("the counter exists");

    for arguments in [
        &["counter", "add", "b", "3", "--max", "10"][..],
        &["counter", "add", "b", "-9", "--min", "0"][..],
        &["counter", "add", "b", "-20", "--min", "-11", "--max", "10"][..],
    ] {
        let run = fixture.run_expecting(2, arguments);
        assert_eq!(run.stdout, "", "{run:?}");
        assert!(run.stderr.starts_with("tessera: "), "{run:?}");
        assert!(run.stderr.contains("out_of_range"), "{run:?}");
    }
    let run = fixture.run_expecting(
        2,
        &["-o", "json", "counter", "add", "b", "3", "--max", "10"],
    );
    let error = parse_json(&run);
    assert_eq!(error["code"], "out_of_range", "{run:?}");
    // Nothing applied: the same value at the same revision.
    assert_eq!(client.get("b").unwrap(), Some(before));

    // Negative bounds are numbers, not flags; on the bound is within it.
    assert_eq!(
        fixture
            .run_expecting(
                0,
                &["counter", "add", "b", "-10", "--min", "-2", "--max", "-1"]
            )
            .stdout,
        "-2\n"
    );
    // Empty bounds and a refresh without a TTL are refused before anything is sent.
    fixture.run_expecting(2, &["counter", "add", "b", "1", "--min", "5", "--max", "4"]);
    fixture.run_expecting(2, &["counter", "add", "b", "1", "--refresh-ttl"]);
    assert_eq!(client.counter("b").unwrap(), Some(-2));
    // Overflow, and a value that is not a counter, are out of range too.
    fixture.run_expecting(0, &["counter", "set", "big", &i64::MAX.to_string()]);
    let run = fixture.run_expecting(2, &["counter", "add", "big", "1"]);
    assert!(run.stderr.contains("out_of_range"), "{run:?}");
    fixture.run_expecting(0, &["put", "text", "abc"]);
    let run = fixture.run_expecting(2, &["counter", "add", "text", "1"]);
    assert!(run.stderr.contains("out_of_range"), "{run:?}");
    fixture.stop();
}

#[test]
fn counter_add_without_create_and_with_a_window() {
    let fixture = Fixture::start();
    let client = fixture.client();
    let run = fixture.run_expecting(0, &["counter", "add", "absent", "1", "--no-create"]);
    assert_eq!(run.stdout, "not applied (no counter)\n", "{run:?}");
    let json = parse_json(&fixture.run_expecting(
        0,
        &["-o", "json", "counter", "add", "absent", "1", "--no-create"],
    ));
    assert_eq!(
        json,
        serde_json::json!({ "value": 0, "applied": false, "mod_revision": 0 })
    );
    assert_eq!(client.get("absent").unwrap(), None);

    fixture.run_expecting(0, &["counter", "add", "window", "1", "--ttl-ms", "60000"]);
    let first = client.get("window").unwrap().expect("created");
    let deadline = first.expires_at_ms.expect("created with a TTL");
    // A fixed window: a later add with a TTL keeps the first deadline.
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(
        fixture
            .run_expecting(0, &["counter", "add", "window", "1", "--ttl-ms", "60000"])
            .stdout,
        "2\n"
    );
    assert_eq!(
        client.get("window").unwrap().unwrap().expires_at_ms,
        Some(deadline)
    );
    // A sliding one restarts it.
    fixture.run_expecting(
        0,
        &[
            "counter",
            "add",
            "window",
            "1",
            "--ttl-ms",
            "60000",
            "--refresh-ttl",
        ],
    );
    let refreshed = client.get("window").unwrap().unwrap();
    assert!(
        refreshed.expires_at_ms.is_some_and(|at| at > deadline),
        "deadline={deadline} refreshed={refreshed:?}"
    );
    // `--no-create` adds to an existing counter.
    assert_eq!(
        fixture
            .run_expecting(0, &["counter", "add", "window", "1", "--no-create"])
            .stdout,
        "4\n"
    );
    fixture.stop();
}

#[test]
fn put_if_version_and_if_value() {
    let fixture = Fixture::start();
    let client = fixture.client();
    // Version 0: only if the key does not exist.
    fixture.run_expecting(0, &["put", "k", "one", "--if-version", "0"]);
    let run = fixture.run_expecting(0, &["put", "k", "two", "--if-version", "1"]);
    assert!(run.stdout.starts_with("OK (mod_revision "), "{run:?}");
    let written = client.get("k").unwrap().expect("written");
    assert_eq!(
        (written.value.as_slice(), written.version),
        (&b"two"[..], 2)
    );

    // A lost compare-and-set: the put's usual line for a failed condition, with the current
    // version, and exit 0 like any put whose condition failed.
    let run = fixture.run_expecting(0, &["put", "k", "three", "--if-version", "1"]);
    assert_eq!(
        run.stdout, "not applied (condition failed, current version 2)\n",
        "{run:?}"
    );
    let run = fixture.run_expecting(0, &["put", "k", "three", "--if-value", "one"]);
    assert_eq!(
        run.stdout, "not applied (condition failed, current version 2)\n",
        "{run:?}"
    );
    let lost = parse_json(
        &fixture.run_expecting(0, &["-o", "json", "put", "k", "three", "--if-version", "7"]),
    );
    assert_eq!(
        lost,
        serde_json::json!({
            "applied": false,
            "mod_revision": written.mod_revision,
            "version": 2,
        })
    );
    assert_eq!(client.get("k").unwrap(), Some(written));

    let won = parse_json(
        &fixture.run_expecting(0, &["-o", "json", "put", "k", "three", "--if-value", "two"]),
    );
    assert_eq!(won["applied"], true, "{won}");
    assert_eq!(won["version"], 3, "{won}");
    assert_eq!(client.get("k").unwrap().unwrap().value, b"three");
    // An --if-value put never creates a key.
    let run = fixture.run_expecting(0, &["put", "new", "v", "--if-value", "v"]);
    assert_eq!(
        run.stdout, "not applied (condition failed, current version 0)\n",
        "{run:?}"
    );
    assert_eq!(client.get("new").unwrap(), None);

    // One condition at a time.
    for conflicting in [
        &["--if-version", "1", "--if-value", "x"][..],
        &["--if-version", "1", "--if-absent"][..],
        &["--if-value", "x", "--if-present"][..],
    ] {
        let mut arguments = vec!["put", "k", "v"];
        arguments.extend_from_slice(conflicting);
        let run = fixture.run_expecting(2, &arguments);
        assert_eq!(run.stdout, "", "{run:?}");
    }
    fixture.stop();
}

#[test]
fn del_if_version_and_if_value() {
    let fixture = Fixture::start();
    let client = fixture.client();
    fixture.run_expecting(0, &["put", "k", "one"]);
    fixture.run_expecting(0, &["put", "k", "two"]);
    let before = client.get("k").unwrap().expect("written");

    // Lost: the key stays, and the line says its current version.
    let run = fixture.run_expecting(0, &["del", "k", "--if-version", "1"]);
    assert_eq!(
        run.stdout, "not applied (condition failed, current version 2)\n",
        "{run:?}"
    );
    let run = fixture.run_expecting(0, &["del", "k", "--if-value", "one"]);
    assert_eq!(
        run.stdout, "not applied (condition failed, current version 2)\n",
        "{run:?}"
    );
    let lost =
        parse_json(&fixture.run_expecting(0, &["-o", "json", "del", "k", "--if-version", "5"]));
    assert_eq!(lost, serde_json::json!({ "deleted": false, "version": 2 }));
    assert_eq!(client.get("k").unwrap(), Some(before));

    assert_eq!(
        fixture
            .run_expecting(0, &["del", "k", "--if-version", "2"])
            .stdout,
        "deleted\n"
    );
    assert_eq!(client.get("k").unwrap(), None);
    assert_eq!(
        fixture
            .run_expecting(0, &["del", "k", "--if-version", "2"])
            .stdout,
        "not found\n"
    );

    fixture.run_expecting(0, &["put", "v", "exact"]);
    let won =
        parse_json(&fixture.run_expecting(0, &["-o", "json", "del", "v", "--if-value", "exact"]));
    assert_eq!(won, serde_json::json!({ "deleted": true, "version": 0 }));
    let run = fixture.run_expecting(2, &["del", "v", "--if-version", "1", "--if-value", "x"]);
    assert_eq!(run.stdout, "", "{run:?}");
    fixture.stop();
}

/// Keys `{t}a` (`one`), `{t}gone` and the counter `{t}n` (5), all on one shard, and a
/// document whose compares hold until `{t}new` exists.
fn write_txn_keys(client: &BlockingClient) -> String {
    let written = client.put("{t}a", "one").unwrap();
    client.put("{t}gone", "x").unwrap();
    client.add("{t}n", 5).unwrap();
    let revision = written.mod_revision;
    format!(
        r#"{{
            "compare": [
                {{"key": "{{t}}a", "value": ["=", "one"]}},
                {{"key": "{{t}}a", "exists": true}},
                {{"key": "{{t}}new", "exists": false}},
                {{"key": "{{t}}a", "version": ["=", 1]}},
                {{"key": "{{t}}a", "mod_revision": [">=", {revision}]}},
                {{"key": "{{t}}a", "create_revision": ["<=", {revision}]}}
            ],
            "success": [
                {{"get": "{{t}}a"}},
                {{"put": "{{t}}new", "value": "fresh"}},
                {{"delete": "{{t}}gone"}},
                {{"delete": "{{t}}never"}},
                {{"add": "{{t}}n", "delta": 2, "min": 0, "max": 10}},
                {{"get": "{{t}}missing"}},
                {{"range": "{{t}}", "limit": 100}}
            ],
            "failure": [
                {{"get": "{{t}}new"}},
                {{"add": "{{t}}n", "delta": 1}}
            ]
        }}"#
    )
}

#[test]
fn txn_runs_the_success_branch_then_the_failure_branch() {
    let fixture = Fixture::start();
    let client = fixture.client();
    let document = write_txn_keys(&client);

    let run = fixture.run_with_input(0, &["txn"], &document);
    let new = client.get("{t}new").unwrap().expect("the txn wrote it");
    let revision = new.mod_revision;
    assert_eq!(
        run.stdout,
        format!(
            "succeeded revision={revision}\n\
             get {{t}}a one\n\
             put {{t}}new version=1\n\
             delete {{t}}gone deleted\n\
             delete {{t}}never absent\n\
             add {{t}}n 7\n\
             get {{t}}missing (none)\n\
             range {{t}} 3 keys\n\
             {{t}}a\tone\n\
             {{t}}n\t7\n\
             {{t}}new\tfresh\n"
        ),
        "{run:?}"
    );
    assert_eq!(run.stderr, "", "{run:?}");
    // Every write at the one revision.
    assert_eq!(client.get("{t}n").unwrap().unwrap().mod_revision, revision);
    assert_eq!(client.get("{t}gone").unwrap(), None);

    // `{t}new` exists now: the failure branch runs, and the exit status says so.
    let run = fixture.run_with_input(1, &["txn"], &document);
    let counter = client.get("{t}n").unwrap().unwrap();
    assert_eq!(
        run.stdout,
        format!(
            "failed revision={}\nget {{t}}new fresh\nadd {{t}}n 8\n",
            counter.mod_revision
        ),
        "{run:?}"
    );
    assert!(counter.mod_revision > revision, "{counter:?}");

    // A branch that writes nothing answers the shard's current revision.
    let run = fixture.run_with_input(0, &["txn"], r#"{"success": [{"get": "{t}a"}]}"#);
    assert_eq!(
        run.stdout,
        format!(
            "succeeded revision={}\nget {{t}}a one\n",
            counter.mod_revision
        ),
        "{run:?}"
    );
    fixture.stop();
}

#[test]
fn txn_json_output() {
    let fixture = Fixture::start();
    let client = fixture.client();
    let document = write_txn_keys(&client);

    let run = fixture.run_with_input(0, &["-o", "json", "txn"], &document);
    let outcome = parse_json(&run);
    let a = client.get("{t}a").unwrap().unwrap();
    let n = client.get("{t}n").unwrap().unwrap();
    let new = client.get("{t}new").unwrap().unwrap();
    let revision = new.mod_revision;
    let item = |key: &str, entry: &tessera_client::Entry| {
        serde_json::json!({
            "key": key,
            "value": String::from_utf8(entry.value.clone()).unwrap(),
            "create_revision": entry.create_revision,
            "mod_revision": entry.mod_revision,
            "version": entry.version,
            "expires_at_ms": entry.expires_at_ms,
        })
    };
    let mut get_a = item("{t}a", &a);
    get_a["op"] = "get".into();
    get_a["found"] = true.into();
    assert_eq!(
        outcome,
        serde_json::json!({
            "succeeded": true,
            "revision": revision,
            "results": [
                get_a,
                { "op": "put", "key": "{t}new", "version": 1 },
                { "op": "delete", "key": "{t}gone", "deleted": true },
                { "op": "delete", "key": "{t}never", "deleted": false },
                { "op": "add", "key": "{t}n", "applied": true, "value": 7 },
                { "op": "get", "key": "{t}missing", "found": false },
                {
                    "op": "range",
                    "prefix": "{t}",
                    "count": 3,
                    "more": false,
                    "items": [item("{t}a", &a), item("{t}n", &n), item("{t}new", &new)],
                },
            ],
        }),
        "{run:?}"
    );

    let run = fixture.run_with_input(1, &["-o", "json", "txn"], &document);
    let outcome = parse_json(&run);
    assert_eq!(outcome["succeeded"], false, "{run:?}");
    assert_eq!(
        outcome["revision"].as_u64(),
        Some(client.get("{t}n").unwrap().unwrap().mod_revision),
        "{run:?}"
    );
    assert_eq!(outcome["results"][0]["op"], "get", "{run:?}");
    assert_eq!(outcome["results"][0]["value"], "fresh", "{run:?}");
    assert_eq!(
        outcome["results"][1],
        serde_json::json!({ "op": "add", "key": "{t}n", "applied": true, "value": 8 }),
        "{run:?}"
    );
    fixture.stop();
}

#[test]
fn txn_refuses_malformed_documents() {
    // Checked before connecting: no server is needed to refuse them.
    let endpoints = Endpoints::Flag("127.0.0.1:1");
    let cases = [
        ("", "EOF"),
        ("not json", "expected"),
        (r#"{"compare": [], "sucess": []}"#, "unknown field `sucess`"),
        (r#"{"compare": [{"key": "k"}]}"#, "compare[0]"),
        (
            r#"{"compare": [{"key": "k", "exists": true, "version": ["=", 1]}]}"#,
            "has 2 checks, not 1",
        ),
        (
            r#"{"compare": [{"key": "k", "version": ["==", 1]}]}"#,
            "unknown variant `==`",
        ),
        (
            r#"{"compare": [{"key": "k", "version": ["=", "one"]}]}"#,
            "invalid type",
        ),
        (
            r#"{"compare": [{"key": "k", "versoin": ["=", 1]}]}"#,
            "unknown field `versoin`",
        ),
        (
            r#"{"success": [{"put": "k"}]}"#,
            "success[0]: put \"k\": needs a `value`",
        ),
        (
            r#"{"failure": [{"add": "n"}]}"#,
            "failure[0]: add \"n\": needs a `delta`",
        ),
        (
            r#"{"success": [{"get": "k"}, {"get": "j", "value": "v"}]}"#,
            "success[1]: get \"j\": a get op has no field `value`",
        ),
        (
            r#"{"success": [{"get": "k", "put": "k", "value": "v"}]}"#,
            "exactly one of get, put, delete, add, range",
        ),
        (r#"{"success": [{"value": "v"}]}"#, "exactly one of"),
        (
            r#"{"success": [{"add": "n", "delta": 1, "refresh_ttl": true}]}"#,
            "`refresh_ttl` needs a `ttl_ms`",
        ),
        (
            r#"{"success": [{"frobnicate": "k"}]}"#,
            "unknown field `frobnicate`",
        ),
        ("[]", "the document is an array, not an object"),
        ("null", "the document is null, not an object"),
        (
            r#"{"compare": {}}"#,
            "invalid type: map, expected a sequence",
        ),
        (
            r#"{"compare": [["k", true]]}"#,
            "compare[0]: is an array, not an object",
        ),
        (
            r#"{"success": ["k"]}"#,
            "success[0]: is a string, not an object",
        ),
    ];
    for (document, expected) in cases {
        let run = tessera_with_input(&endpoints, &["txn"], Some(document));
        assert_eq!(run.status_code, 2, "{document}: {run:?}");
        assert_eq!(run.stdout, "", "{document}: {run:?}");
        assert!(
            run.stderr
                .starts_with("tessera: invalid transaction on stdin: "),
            "{document}: {run:?}"
        );
        assert!(
            run.stderr.contains(expected),
            "{document}: expected {expected:?}: {run:?}"
        );
    }
    let run = tessera_with_input(&endpoints, &["-o", "json", "txn"], Some("{"));
    assert_eq!(run.status_code, 2, "{run:?}");
    let error = parse_json(&run);
    assert!(
        error["error"]
            .as_str()
            .is_some_and(|message| message.starts_with("invalid transaction on stdin: ")),
        "{run:?}"
    );
    assert_eq!(error["code"], Value::Null, "{run:?}");
}

#[test]
fn txn_refusals_apply_nothing() {
    let fixture = Fixture::start();
    let client = fixture.client();
    let first = key_on_core(&client, 0, "cross");
    let second = key_on_core(&client, 1, "cross");
    let document = format!(
        r#"{{"compare": [{{"key": "{first}", "exists": false}}],
             "success": [{{"put": "{first}", "value": "1"}}, {{"put": "{second}", "value": "2"}}]}}"#
    );
    let run = fixture.run_with_input(2, &["txn"], &document);
    assert_eq!(run.stdout, "", "{run:?}");
    assert!(run.stderr.contains("cross_shard"), "{run:?}");
    assert!(run.stderr.contains(&format!("{first:?}")), "{run:?}");
    assert!(run.stderr.contains(&format!("{second:?}")), "{run:?}");
    let run = fixture.run_with_input(2, &["-o", "json", "txn"], &document);
    assert_eq!(parse_json(&run)["code"], "cross_shard", "{run:?}");
    assert_eq!(client.get(&first).unwrap(), None);
    assert_eq!(client.get(&second).unwrap(), None);

    // A counter add out of its bounds fails the whole transaction.
    client.add("{u}n", 9).unwrap();
    let before = client.get("{u}n").unwrap();
    let document = r#"{"success": [
        {"put": "{u}a", "value": "v"},
        {"add": "{u}n", "delta": 2, "max": 10}
    ]}"#;
    let run = fixture.run_with_input(2, &["txn"], document);
    assert!(run.stderr.contains("out_of_range"), "{run:?}");
    assert_eq!(client.get("{u}a").unwrap(), None);
    assert_eq!(client.get("{u}n").unwrap(), before);

    // A key twice in one branch, and no key at all, are refused before sending.
    let run = fixture.run_with_input(
        2,
        &["txn"],
        r#"{"success": [{"put": "{u}a", "value": "v"}, {"get": "{u}a"}]}"#,
    );
    assert!(run.stderr.contains("more than one op"), "{run:?}");
    let run = fixture.run_with_input(2, &["txn"], "{}");
    assert!(run.stderr.contains("must name a key"), "{run:?}");
    assert_eq!(client.get("{u}a").unwrap(), None);
    fixture.stop();
}

#[test]
fn help_lists_the_new_commands() {
    let endpoints = Endpoints::Flag("127.0.0.1:1");
    let run = tessera(&endpoints, &["--help"]);
    assert_eq!(run.status_code, 0, "{run:?}");
    for command in ["counter", "txn", "add", "put", "del", "lease"] {
        assert!(
            run.stdout.contains(&format!("  {command} ")),
            "{command}: {run:?}"
        );
    }
    let run = tessera(&endpoints, &["counter", "add", "--help"]);
    for option in ["--min", "--max", "--ttl-ms", "--refresh-ttl", "--no-create"] {
        assert!(run.stdout.contains(option), "{option}: {run:?}");
    }
    let run = tessera(&endpoints, &["txn", "--help"]);
    for part in [
        "\"compare\"",
        "\"success\"",
        "\"failure\"",
        "mod_revision",
        "Exit status",
    ] {
        assert!(run.stdout.contains(part), "{part}: {run:?}");
    }
    let run = tessera(&endpoints, &["put", "--help"]);
    assert!(run.stdout.contains("--if-version"), "{run:?}");
    assert!(run.stdout.contains("--if-value"), "{run:?}");
    let run = tessera(&endpoints, &["del", "--help"]);
    assert!(run.stdout.contains("--if-version"), "{run:?}");
    let run = tessera(&endpoints, &["put", "--help"]);
    assert!(run.stdout.contains("--lease <ID>"), "{run:?}");
    let run = tessera(&endpoints, &["lease", "--help"]);
    for command in ["grant", "keepalive", "revoke", "ttl", "list"] {
        assert!(
            run.stdout.contains(&format!("  {command} ")),
            "{command}: {run:?}"
        );
    }
    let run = tessera(&endpoints, &["lease", "keepalive", "--help"]);
    assert!(run.stdout.contains("--every-ms <N>"), "{run:?}");
    let run = tessera(&endpoints, &["lease", "ttl", "--help"]);
    assert!(run.stdout.contains("--keys"), "{run:?}");
}

// ---------------------------------------------------------------------------------------
// Leases.

/// Runs `lease grant <ttl_ms>` and returns the id it printed, alone on its line.
fn grant(fixture: &Fixture, ttl_ms: u64) -> u64 {
    let run = fixture.run_expecting(0, &["lease", "grant", &ttl_ms.to_string()]);
    let id: u64 = run
        .stdout
        .trim_end()
        .parse()
        .unwrap_or_else(|error| panic!("grant prints an id ({error}): {run:?}"));
    assert_eq!(run.stdout, format!("{id}\n"), "the id on its own line");
    assert_ne!(id, 0);
    id
}

/// The ids `lease list` prints, one per line.
fn listed_leases(fixture: &Fixture) -> Vec<u64> {
    let run = fixture.run_expecting(0, &["lease", "list"]);
    run.stdout
        .lines()
        .map(|line| {
            line.parse()
                .unwrap_or_else(|error| panic!("an id per line ({error}): {run:?}"))
        })
        .collect()
}

/// Longest a test waits for the server to delete the keys of a lease that ended: its TTL,
/// then the expiry and the deletes on every shard, with room for a loaded machine.
const LEASE_END_TIMEOUT: Duration = Duration::from_secs(5);

/// Waits until `key` is gone, at most [`LEASE_END_TIMEOUT`].
fn wait_until_gone(client: &BlockingClient, key: &str) {
    let start = Instant::now();
    while client.exists(key).expect("exists") {
        assert!(
            start.elapsed() < LEASE_END_TIMEOUT,
            "{key} still exists after {LEASE_END_TIMEOUT:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn lease_keys_are_listed_and_deleted_on_revoke() {
    let fixture = Fixture::start();
    let client = fixture.client();
    let id = grant(&fixture, 60_000);
    let id_text = id.to_string();
    // Keys on both cores, one with a TTL of its own too (the server allows both).
    let keys = [
        key_on_core(&client, 0, "leased"),
        key_on_core(&client, 1, "leased"),
        key_on_core(&client, 1, "leased-ttl"),
    ];
    for key in &keys[..2] {
        let run = fixture.run_expecting(0, &["put", key, "v", "--lease", &id_text]);
        assert!(run.stdout.starts_with("OK (mod_revision "), "{run:?}");
    }
    fixture.run_expecting(
        0,
        &[
            "put",
            &keys[2],
            "v",
            "--lease",
            &id_text,
            "--ttl-ms",
            "60000",
            "--if-absent",
        ],
    );
    // An unleased key, which the revoke must leave alone.
    fixture.run_expecting(0, &["put", "unleased", "v"]);
    assert!(listed_leases(&fixture).contains(&id));

    let run = fixture.run_expecting(0, &["lease", "ttl", &id_text]);
    let mut lines = run.stdout.lines();
    let first = lines.next().unwrap_or_default();
    let remaining_ms: u64 = first
        .strip_prefix(&format!("id={id} ttl=60000 remaining="))
        .and_then(|number| number.parse().ok())
        .unwrap_or_else(|| panic!("`id=<id> ttl=<ms> remaining=<ms>`: {run:?}"));
    assert!(remaining_ms > 0, "{run:?}");
    assert!(remaining_ms <= 60_000, "{run:?}");
    assert_eq!(lines.next(), None, "keys only with --keys: {run:?}");

    let run = fixture.run_expecting(0, &["lease", "ttl", &id_text, "--keys"]);
    let mut sorted_keys = keys.to_vec();
    sorted_keys.sort();
    let listed: Vec<&str> = run.stdout.lines().skip(1).collect();
    assert_eq!(
        listed, sorted_keys,
        "the keys of every shard, in key order: {run:?}"
    );
    assert!(
        run.stdout
            .starts_with(&format!("id={id} ttl=60000 remaining=")),
        "{run:?}"
    );
    assert_eq!(run.stderr, "", "no more keys than listed: {run:?}");

    assert_eq!(
        fixture
            .run_expecting(0, &["lease", "revoke", &id_text])
            .stdout,
        "revoked\n"
    );
    for key in &keys {
        fixture.run_expecting(1, &["get", key]);
    }
    fixture.run_expecting(0, &["get", "unleased"]);
    let run = fixture.run_expecting(1, &["lease", "revoke", &id_text]);
    assert_eq!(run.stdout, "not found\n", "{run:?}");
    let run = fixture.run_expecting(1, &["lease", "ttl", &id_text, "--keys"]);
    assert_eq!(run.stdout, "not found\n", "{run:?}");
    assert!(!listed_leases(&fixture).contains(&id));
    fixture.stop();
}

#[test]
fn lease_keepalive_reports_each_lease() {
    let fixture = Fixture::start();
    let first = grant(&fixture, 60_000);
    let second = grant(&fixture, 30_000);
    // An id of the same home and a sequence never granted.
    let unknown = first + 1000;
    let run = fixture.run_expecting(
        1,
        &[
            "lease",
            "keepalive",
            &first.to_string(),
            &unknown.to_string(),
            &second.to_string(),
        ],
    );
    assert_eq!(
        run.stdout,
        format!("{first} ttl=60000\n{unknown} not found\n{second} ttl=30000\n"),
        "{run:?}"
    );
    let run = fixture.run_expecting(0, &["lease", "keepalive", &second.to_string()]);
    assert_eq!(run.stdout, format!("{second} ttl=30000\n"), "{run:?}");
    // A revoked lease is not found either.
    fixture.run_expecting(0, &["lease", "revoke", &first.to_string()]);
    let run = fixture.run_expecting(1, &["lease", "keepalive", &first.to_string()]);
    assert_eq!(run.stdout, format!("{first} not found\n"), "{run:?}");
    assert_eq!(listed_leases(&fixture), vec![second]);
    // Id 0 names no lease: a usage error, nothing sent.
    let run = fixture.run_expecting(2, &["lease", "keepalive", "0"]);
    assert!(run.stderr.contains("names no lease"), "{run:?}");
    fixture.stop();
}

#[test]
fn lease_without_keepalive_expires_with_its_keys() {
    let fixture = Fixture::start();
    let client = fixture.client();
    // Before the grant is sent, so the lease's deadline is at least its TTL from here.
    let before_grant = Instant::now();
    let id = grant(&fixture, 300);
    fixture.run_expecting(0, &["put", "short", "v", "--lease", &id.to_string()]);
    assert!(client.exists("short").expect("exists"), "the lease lives");
    // Nothing renews it: the key goes with the lease, after its TTL.
    wait_until_gone(&client, "short");
    let gone_after = before_grant.elapsed();
    // The server counts whole milliseconds, so it may end up to one early.
    assert!(
        gone_after >= Duration::from_millis(299),
        "deleted {gone_after:?} after the grant, before its TTL of 300 ms"
    );
    fixture.run_expecting(1, &["lease", "ttl", &id.to_string()]);
    assert!(!listed_leases(&fixture).contains(&id));
    fixture.stop();
}

#[cfg(unix)]
#[test]
fn lease_keepalive_every_keeps_a_lease_alive_until_interrupted() {
    let fixture = Fixture::start();
    let client = fixture.client();
    let id = grant(&fixture, 400);
    // Renewing first, so the short TTL need not cover the put's run too.
    let mut keeper = Watcher::start(
        &fixture,
        &["lease", "keepalive", "--every-ms", "100", &id.to_string()],
    );
    assert_eq!(
        keeper.next_line(),
        format!("{id} ttl=400"),
        "the first round"
    );
    fixture.run_expecting(0, &["put", "kept", "v", "--lease", &id.to_string()]);
    // Well past the TTL: only the renewals keep it.
    std::thread::sleep(Duration::from_millis(1200));
    assert!(client.exists("kept").expect("exists"), "the lease was kept");
    let run = fixture.run_expecting(0, &["lease", "ttl", &id.to_string()]);
    assert!(
        run.stdout
            .starts_with(&format!("id={id} ttl=400 remaining=")),
        "{run:?}"
    );
    interrupt(&keeper.child);
    let run = keeper.finish();
    assert_eq!(run.status_code, 130, "128 + SIGINT: {run:?}");
    assert_eq!(
        run.stdout,
        format!("{id} ttl=400\n"),
        "no line for rounds that changed nothing: {run:?}"
    );
    assert_eq!(run.stderr, "", "{run:?}");
    // Nothing renews it any more.
    wait_until_gone(&client, "kept");
    fixture.stop();
}

#[test]
fn lease_json_output() {
    let fixture = Fixture::start();
    let granted = parse_json(&fixture.run_expecting(0, &["-o", "json", "lease", "grant", "60000"]));
    let id = granted["id"].as_u64().expect("id is a number");
    assert_eq!(granted["ttl_ms"].as_u64(), Some(60_000), "{granted}");
    let id_text = id.to_string();
    let put = parse_json(
        &fixture.run_expecting(0, &["-o", "json", "put", "j", "v", "--lease", &id_text]),
    );
    assert_eq!(put["applied"], Value::Bool(true));

    let ttl =
        parse_json(&fixture.run_expecting(0, &["-o", "json", "lease", "ttl", &id_text, "--keys"]));
    assert_eq!(ttl["id"].as_u64(), Some(id), "{ttl}");
    assert_eq!(ttl["found"], Value::Bool(true), "{ttl}");
    assert_eq!(ttl["ttl_ms"].as_u64(), Some(60_000), "{ttl}");
    let remaining_ms = ttl["remaining_ms"]
        .as_u64()
        .expect("remaining_ms is a number");
    assert!(remaining_ms <= 60_000, "{ttl}");
    assert_eq!(ttl["keys"], serde_json::json!(["j"]), "{ttl}");
    assert_eq!(ttl["more"], Value::Bool(false), "{ttl}");
    let ttl = parse_json(&fixture.run_expecting(0, &["-o", "json", "lease", "ttl", &id_text]));
    assert_eq!(ttl.get("keys"), None, "keys only when asked: {ttl}");
    assert_eq!(ttl["more"], Value::Bool(false), "{ttl}");

    let list = parse_json(&fixture.run_expecting(0, &["-o", "json", "lease", "list"]));
    assert_eq!(list, serde_json::json!({ "ids": [id] }));

    let unknown = id + 1000;
    let renewed = parse_json(&fixture.run_expecting(
        1,
        &[
            "-o",
            "json",
            "lease",
            "keepalive",
            &id_text,
            &unknown.to_string(),
        ],
    ));
    assert_eq!(
        renewed,
        serde_json::json!({ "leases": [
            { "id": id, "found": true, "ttl_ms": 60_000 },
            { "id": unknown, "found": false },
        ] })
    );

    let revoked =
        parse_json(&fixture.run_expecting(0, &["-o", "json", "lease", "revoke", &id_text]));
    assert_eq!(revoked, serde_json::json!({ "revoked": true }));
    let revoked =
        parse_json(&fixture.run_expecting(1, &["-o", "json", "lease", "revoke", &id_text]));
    assert_eq!(revoked, serde_json::json!({ "revoked": false }));
    let ttl = parse_json(&fixture.run_expecting(1, &["-o", "json", "lease", "ttl", &id_text]));
    assert_eq!(ttl, serde_json::json!({ "id": id, "found": false }));
    let list = parse_json(&fixture.run_expecting(0, &["-o", "json", "lease", "list"]));
    assert_eq!(list, serde_json::json!({ "ids": [] }));
    fixture.stop();
}

#[test]
fn put_with_a_lease_that_does_not_live_fails() {
    let fixture = Fixture::start();
    let id = grant(&fixture, 60_000);
    let never_granted = (id + 1000).to_string();
    let run = fixture.run_expecting(2, &["put", "orphan", "v", "--lease", &never_granted]);
    assert_eq!(run.stdout, "", "{run:?}");
    assert!(run.stderr.contains("lease_not_found"), "{run:?}");
    let run = fixture.run_expecting(
        2,
        &[
            "-o",
            "json",
            "put",
            "orphan",
            "v",
            "--lease",
            &never_granted,
        ],
    );
    let error = parse_json(&run);
    assert_eq!(error["code"], "lease_not_found", "{run:?}");
    assert!(error["error"].as_str().is_some(), "{run:?}");
    // A revoked lease is refused the same way.
    fixture.run_expecting(0, &["lease", "revoke", &id.to_string()]);
    let run = fixture.run_expecting(
        2,
        &[
            "-o",
            "json",
            "put",
            "orphan",
            "v",
            "--lease",
            &id.to_string(),
        ],
    );
    assert_eq!(parse_json(&run)["code"], "lease_not_found", "{run:?}");
    // Nothing was written.
    fixture.run_expecting(1, &["get", "orphan"]);
    let run = fixture.run_expecting(2, &["put", "orphan", "v", "--lease", "0"]);
    assert!(run.stderr.contains("names no lease"), "{run:?}");
    fixture.stop();
}

/// Sends `signal` to `child`.
#[cfg(unix)]
fn send_signal(child: &Child, signal: i32) {
    extern "C" {
        fn kill(pid: i32, signal: i32) -> i32;
    }
    let pid = i32::try_from(child.id()).expect("a pid fits an i32");
    // SAFETY: `kill` only sends a signal, to a child this test started and has not reaped.
    let result = unsafe { kill(pid, signal) };
    assert_eq!(result, 0, "kill({pid}, {signal})");
}

/// Lock safety with a real pause: a `tessera lock` holder is stopped with SIGSTOP past its
/// lease, the lock goes to the next `tessera lock` within the TTL and a tick, the stale
/// token is fenced off, and the old holder, continued, finds it lost the lock (exit 1). The
/// new holder releases on Ctrl-C (exit 130).
#[cfg(unix)]
#[test]
fn lock_holder_paused_past_its_lease_loses_the_lock() {
    const SIGSTOP: i32 = 19;
    const SIGCONT: i32 = 18;
    let fixture = Fixture::start();
    let client = fixture.client();
    let (lock, data) = ("{cli}lock", "{cli}data");
    let mut first = Watcher::start(&fixture, &["lock", lock, "--ttl-ms", "400"]);
    let old_token: u64 = first
        .next_line()
        .parse()
        .expect("the first line is the token");
    assert!(client.put_fenced(data, "first", lock, old_token).unwrap());
    send_signal(&first.child, SIGSTOP);
    let stopped_at = Instant::now();
    let mut second = Watcher::start(&fixture, &["lock", lock, "--wait-ms", "5000"]);
    let new_token: u64 = second
        .next_line()
        .parse()
        .expect("the first line is the token");
    let handover = stopped_at.elapsed();
    assert!(new_token > old_token, "{new_token} after {old_token}");
    // The lease's TTL plus a tick, and two process starts of slack.
    assert!(
        handover < Duration::from_millis(2_500),
        "handover took {handover:?}"
    );
    assert!(
        !client.put_fenced(data, "stale", lock, old_token).unwrap(),
        "fenced off"
    );
    assert!(client.put_fenced(data, "second", lock, new_token).unwrap());
    send_signal(&first.child, SIGCONT);
    let paused = first.finish();
    assert_eq!(paused.status_code, 1, "{paused:?}");
    assert!(paused.stderr.contains("lost the lock"), "{paused:?}");
    interrupt(&second.child);
    assert_eq!(second.finish().status_code, 130);
    // Released on Ctrl-C: the next taker gets it at once.
    let lease = client.lease(Duration::from_secs(10)).unwrap();
    let grant = client.lock(lock, lease.id(), Duration::ZERO).unwrap();
    assert!(grant.is_some_and(|grant| grant.token > new_token));
    fixture.stop();
}

/// `tessera txn` with a lease compare, a put that attaches a lease and a fence: the put
/// lands only while the token is the lock's newest.
#[test]
fn txn_fences_and_leases() {
    let fixture = Fixture::start();
    let client = fixture.client();
    let lease = client.lease(Duration::from_secs(30)).unwrap();
    let grant = client
        .lock("{f}lock", lease.id(), Duration::ZERO)
        .unwrap()
        .expect("free");
    let document = format!(
        r#"{{"compare": [{{"key": "{{f}}lock", "fence": {token}}},
                         {{"key": "{{f}}k", "lease": ["=", 0]}}],
             "success": [{{"put": "{{f}}k", "value": "v", "lease": {lease}}}]}}"#,
        token = grant.token,
        lease = lease.id()
    );
    fixture.run_with_input(0, &["txn"], &document);
    let info = client.lease_info(lease.id()).unwrap().expect("alive");
    assert_eq!(info.keys, vec![b"{f}k".to_vec()]);
    // Now attached: the lease compare fails, and so does a stale fence.
    fixture.run_with_input(1, &["txn"], &document);
    let stale = document.replace(&format!("\"fence\": {}", grant.token), "\"fence\": 0");
    let stale = stale.replace(
        r#"{"key": "{f}k", "lease": ["=", 0]}"#,
        r#"{"key": "{f}k", "exists": true}"#,
    );
    fixture.run_with_input(1, &["txn"], &stale);
    drop(lease);
    fixture.stop();
}

/// `put --field`, `get`, `index` and `query` through the binary.
mod fields_indexes_and_queries {
    use std::cmp::Reverse;

    use serde_json::json;
    use tessera_client::{Field, FieldValue, IndexKind, IndexSpec, PutEntry};

    use super::*;

    /// The people these tests write: (key, age, city).
    fn people() -> Vec<(String, i64, &'static str)> {
        (0..30)
            .map(|index| {
                let age = 20 + (index * 7) % 30;
                let city = ["Oslo", "Bergen", "Tromso"][usize::try_from(index % 3).unwrap()];
                (format!("person:{index:02}"), age, city)
            })
            .collect()
    }

    fn write_people(client: &BlockingClient) -> Vec<(String, i64, &'static str)> {
        let people = people();
        let entries: Vec<PutEntry> = people
            .iter()
            .map(|(key, age, city)| PutEntry {
                key: key.clone().into_bytes(),
                value: format!("v{key}").into_bytes(),
                ttl_ms: None,
                fields: vec![
                    Field::new("age", FieldValue::I64(*age)),
                    Field::new("city", FieldValue::Str((*city).to_owned())),
                ],
            })
            .collect();
        client.mput_entries(&entries).unwrap();
        people
    }

    fn wait_until_ready(client: &BlockingClient) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !client
            .list_indexes()
            .unwrap()
            .iter()
            .all(tessera_client::IndexStatus::is_ready)
        {
            assert!(Instant::now() < deadline, "the indexes are not ready");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn put_fields_are_typed_and_get_prints_them() {
        let fixture = Fixture::start();
        fixture.run_expecting(
            0,
            &[
                "put",
                "user:1",
                "ada",
                "--field",
                "age=36",
                "--field",
                "city=Oslo",
                "--field",
                "score=2.5",
                "--field",
                "active=true",
                "--field",
                "seen=@2026-01-01",
                "--field",
                r#"zip="0150""#,
            ],
        );
        let entry = fixture.client().get("user:1").unwrap().unwrap();
        let expected = vec![
            Field::new("active", FieldValue::Bool(true)),
            Field::new("age", FieldValue::I64(36)),
            Field::new("city", FieldValue::Str("Oslo".to_owned())),
            Field::new(
                "score",
                FieldValue::F64(tessera_protocol::query::F64::new(2.5).unwrap()),
            ),
            Field::new("seen", FieldValue::Timestamp(1_767_225_600_000)),
            Field::new("zip", FieldValue::Str("0150".to_owned())),
        ];
        assert_eq!(entry.fields, expected);

        // The value, then one line per field in the form --field takes.
        let get = fixture.run_expecting(0, &["get", "user:1"]);
        assert_eq!(
            get.stdout,
            "ada\nactive=true\nage=36\ncity=Oslo\nscore=2.5\n\
             seen=@2026-01-01T00:00:00.000Z\nzip=\"0150\"\n"
        );
        let get = parse_json(&fixture.run_expecting(0, &["-o", "json", "get", "user:1"]));
        assert_eq!(
            get["fields"],
            json!({
                "active": {"type": "bool", "value": true},
                "age": {"type": "i64", "value": 36},
                "city": {"type": "string", "value": "Oslo"},
                "score": {"type": "f64", "value": 2.5},
                "seen": {"type": "timestamp", "value": 1_767_225_600_000_i64},
                "zip": {"type": "string", "value": "0150"},
            })
        );
        // What get prints, put takes back.
        let mut again = vec!["put", "user:2", "ada"];
        let text = fixture.run_expecting(0, &["get", "user:1"]).stdout;
        let lines: Vec<&str> = text.lines().collect();
        for line in &lines[1..] {
            again.extend(["--field", line]);
        }
        fixture.run_expecting(0, &again);
        assert_eq!(
            fixture.client().get("user:2").unwrap().unwrap().fields,
            expected
        );

        // A put without fields clears them, and get prints the value alone.
        fixture.run_expecting(0, &["put", "user:1", "plain"]);
        assert_eq!(
            fixture.run_expecting(0, &["get", "user:1"]).stdout,
            "plain\n"
        );

        // Malformed fields are usage errors; too many are refused before sending.
        for bad in ["novalue", "=1", "t=@yesterday", r#"s="open"#] {
            let run = fixture.run_expecting(2, &["put", "k", "v", "--field", bad]);
            assert!(run.stderr.contains("--field"), "{bad}: {run:?}");
        }
        let many: Vec<String> = (0..17).map(|index| format!("f{index}=1")).collect();
        let mut arguments = vec!["put", "k", "v"];
        for field in &many {
            arguments.extend(["--field", field.as_str()]);
        }
        let run = fixture.run_expecting(2, &arguments);
        assert!(run.stderr.contains("17 fields"), "{run:?}");
        let run = fixture.run_expecting(2, &["put", "k", "v", "--field", "a=1", "--field", "a=2"]);
        assert!(run.stderr.contains("given twice"), "{run:?}");
        assert_eq!(fixture.client().get("k").unwrap(), None);
        fixture.stop();
    }

    #[test]
    fn index_create_list_and_drop() {
        let fixture = Fixture::start();
        let client = fixture.client();
        let people = write_people(&client);
        let created = fixture.run_expecting(0, &["index", "create", "person:", "age", "range"]);
        assert_eq!(created.stdout, "created person:age_range\n");
        let again = fixture.run_expecting(0, &["index", "create", "person:", "age", "range"]);
        assert_eq!(
            again.stdout,
            "exists person:age_range (the same definition)\n"
        );
        let named = fixture.run_expecting(
            0,
            &[
                "index", "create", "person:", "city", "eq", "--name", "city_eq",
            ],
        );
        assert_eq!(named.stdout, "created city_eq\n");
        let json_again = parse_json(&fixture.run_expecting(
            0,
            &[
                "-o", "json", "index", "create", "person:", "city", "eq", "--name", "city_eq",
            ],
        ));
        assert_eq!(json_again["name"], "city_eq");
        assert_eq!(json_again["created"], false);
        let cores = json_again["cores"].as_array().unwrap();
        assert_eq!(cores.len(), CORE_COUNT);
        assert!(cores.iter().all(|core| core["created"] == false));
        wait_until_ready(&client);

        let list = fixture.run_expecting(0, &["index", "list"]);
        let lines: Vec<&str> = list.stdout.lines().collect();
        assert_eq!(lines.len(), 3, "{list:?}");
        assert!(lines[0].starts_with("name "), "{list:?}");
        let city: Vec<&str> = lines[1].split_whitespace().collect();
        assert_eq!(city[..4], ["city_eq", "person:", "city", "eq"], "{list:?}");
        assert_eq!(city[4], people.len().to_string());
        assert_eq!(city.last(), Some(&"ready"));
        assert!(lines[2].starts_with("person:age_range "), "{list:?}");

        let list = parse_json(&fixture.run_expecting(0, &["-o", "json", "index", "list"]));
        let indexes = list["indexes"].as_array().unwrap();
        assert_eq!(indexes.len(), 2);
        let age = &indexes[1];
        assert_eq!(age["name"], "person:age_range");
        assert_eq!(age["prefix"], "person:");
        assert_eq!(age["field"], "age");
        assert_eq!(age["kind"], "range");
        assert_eq!(age["ready"], true);
        assert_eq!(age["entries"].as_u64(), Some(people.len() as u64));
        assert_eq!(age["missing"], json!([]));
        let cores = age["cores"].as_array().unwrap();
        assert_eq!(cores.len(), CORE_COUNT);
        let per_core: u64 = cores
            .iter()
            .map(|core| {
                assert_eq!(core["state"], "ready");
                assert_eq!(core["keys_done"], Value::Null);
                core["entries"].as_u64().unwrap()
            })
            .sum();
        assert_eq!(per_core, people.len() as u64);

        // Another definition under a taken name: each core refuses, naming itself.
        let node_id = client.topology().nodes[0].node_id;
        let taken = fixture.run_expecting(
            2,
            &[
                "index", "create", "person:", "age", "eq", "--name", "city_eq",
            ],
        );
        assert!(
            taken.stderr.contains(&format!("node {node_id} core 0")),
            "{taken:?}"
        );
        fixture.run_expecting(2, &["index", "create", "person:", "age", "hash"]);

        let dropped = fixture.run_expecting(0, &["index", "drop", "city_eq"]);
        assert_eq!(dropped.stdout, "dropped city_eq\n");
        let missing = fixture.run_expecting(0, &["index", "drop", "city_eq"]);
        assert_eq!(missing.stdout, "not found\n");
        let dropped = parse_json(
            &fixture.run_expecting(0, &["-o", "json", "index", "drop", "person:age_range"]),
        );
        assert_eq!(dropped["dropped"], true);
        assert_eq!(dropped["cores"].as_array().map(Vec::len), Some(CORE_COUNT));
        let list = parse_json(&fixture.run_expecting(0, &["-o", "json", "index", "list"]));
        assert_eq!(list, json!({ "indexes": [] }));
        fixture.stop();
    }

    /// A server holding [`people`] and a ready range index `age` on their ages; the people
    /// aged 30 or more, in key order.
    fn indexed_people() -> (Fixture, BlockingClient, Vec<(String, i64, &'static str)>) {
        let fixture = Fixture::start();
        let client = fixture.client();
        let people = write_people(&client);
        client
            .create_index(&IndexSpec::new("age", "person:", "age", IndexKind::Range))
            .unwrap();
        wait_until_ready(&client);
        let thirty: Vec<(String, i64, &str)> = people
            .into_iter()
            .filter(|(_, age, _)| *age >= 30)
            .collect();
        (fixture, client, thirty)
    }

    fn keys_of(people: &[(String, i64, &str)]) -> Vec<String> {
        people.iter().map(|(key, _, _)| key.clone()).collect()
    }

    #[test]
    fn query_prints_one_line_per_match() {
        let (fixture, _client, expected) = indexed_people();
        let keys = keys_of(&expected);
        let run = fixture.run_expecting(
            0,
            &["query", "age >= 30", "--prefix", "person:", "--keys-only"],
        );
        assert_eq!(run.stdout.lines().collect::<Vec<_>>(), keys, "{run:?}");
        assert!(!run.stderr.contains("more"), "{run:?}");
        let (key, age, city) = &expected[0];
        let run = fixture.run_expecting(0, &["query", "age >= 30", "--prefix", "person:"]);
        assert_eq!(
            run.stdout.lines().next(),
            Some(format!("{key}\tv{key}\tage={age} city={city}").as_str())
        );
        let run = fixture.run_expecting(
            0,
            &["query", "age >= 30", "--prefix", "person:", "--fields"],
        );
        assert_eq!(
            run.stdout.lines().next(),
            Some(format!("{key}\tage={age} city={city}").as_str())
        );
        fixture.stop();
    }

    #[test]
    fn query_json_has_whole_items_and_every_plan() {
        let (fixture, client, expected) = indexed_people();
        let keys = keys_of(&expected);
        // JSON: whole items, the count, no cursor, every core's revision.
        let filter = r#"age >= 30 and city = "Oslo""#;
        let run = fixture.run_expecting(0, &["-o", "json", "query", filter, "--prefix", "person:"]);
        let result = parse_json(&run);
        let oslo: Vec<&(String, i64, &str)> = expected
            .iter()
            .filter(|(_, _, city)| *city == "Oslo")
            .collect();
        let items = result["items"].as_array().unwrap();
        assert_eq!(items.len(), oslo.len());
        let entry = client.get(&oslo[0].0).unwrap().unwrap();
        assert_eq!(
            items[0],
            json!({
                "key": oslo[0].0,
                "value": format!("v{}", oslo[0].0),
                "create_revision": entry.create_revision,
                "mod_revision": entry.mod_revision,
                "version": 1,
                "expires_at_ms": null,
                "fields": {
                    "age": {"type": "i64", "value": oslo[0].1},
                    "city": {"type": "string", "value": "Oslo"},
                },
            })
        );
        assert_eq!(result["count"].as_u64(), Some(oslo.len() as u64));
        assert_eq!(result["more"], false);
        assert_eq!(result["cursor"], Value::Null);
        assert_eq!(
            result["revisions"].as_array().map(Vec::len),
            Some(CORE_COUNT)
        );
        assert!(result.get("plans").is_none(), "plans only with --explain");

        // --explain: every core's plan.
        let run = fixture.run_expecting(
            0,
            &[
                "-o",
                "json",
                "query",
                "age >= 30",
                "--prefix",
                "person:",
                "--explain",
            ],
        );
        let plans = parse_json(&run)["plans"].as_array().unwrap().clone();
        assert_eq!(plans.len(), CORE_COUNT);
        let mut matched = 0;
        for plan in &plans {
            assert_eq!(plan["access"], "index", "{plan}");
            assert_eq!(plan["index"], "age");
            assert_eq!(plan["field"], "age");
            assert_eq!(plan["lookup"], "age >= 30");
            assert_eq!(plan["building"], json!([]));
            assert_eq!(plan["examined"], plan["matched"]);
            matched += plan["matched"].as_u64().unwrap();
        }
        assert_eq!(matched, keys.len() as u64);
        let run = fixture.run_expecting(
            0,
            &[
                "query",
                r#"city = "Oslo""#,
                "--prefix",
                "person:",
                "--explain",
                "--keys-only",
            ],
        );
        let explained: Vec<&str> = run
            .stdout
            .lines()
            .filter(|line| line.starts_with("explain node "))
            .collect();
        assert_eq!(explained.len(), CORE_COUNT, "{run:?}");
        for line in explained {
            assert!(line.contains(": scan of the prefix; examined "), "{line}");
        }

        fixture.stop();
    }

    #[test]
    fn query_counts() {
        let (fixture, _client, expected) = indexed_people();
        let keys = keys_of(&expected);
        // --count.
        let run =
            fixture.run_expecting(0, &["query", "age >= 30", "--prefix", "person:", "--count"]);
        assert_eq!(run.stdout, format!("{}\n", keys.len()));
        let count = parse_json(&fixture.run_expecting(
            0,
            &[
                "-o",
                "json",
                "query",
                "age >= 30",
                "--prefix",
                "person:",
                "--count",
            ],
        ));
        assert_eq!(count["count"].as_u64(), Some(keys.len() as u64));
        assert_eq!(
            count["revisions"].as_array().map(Vec::len),
            Some(CORE_COUNT)
        );
        assert!(count.get("items").is_none());

        fixture.stop();
    }

    #[test]
    fn query_pages_continue_with_the_printed_cursor() {
        let (fixture, _client, mut expected) = indexed_people();
        let keys = keys_of(&expected);
        // Pages of four, largest age first, each continued with the cursor the last printed.
        expected.sort_by_key(|(key, age, _)| (Reverse(*age), key.clone()));
        let descending: Vec<String> = expected.iter().map(|(key, _, _)| key.clone()).collect();
        let mut printed: Vec<String> = Vec::new();
        let mut after: Option<String> = None;
        for _ in 0..100 {
            let mut arguments = vec![
                "-o",
                "json",
                "query",
                "age >= 30",
                "--prefix",
                "person:",
                "--keys-only",
                "--limit",
                "4",
                "--order-by",
                "age:desc",
            ];
            if let Some(cursor) = &after {
                arguments.extend(["--after", cursor.as_str()]);
            }
            let page = parse_json(&fixture.run_expecting(0, &arguments));
            let items = page["items"].as_array().unwrap();
            assert!(items.len() <= 4);
            printed.extend(
                items
                    .iter()
                    .map(|item| item["key"].as_str().unwrap().to_owned()),
            );
            match page["cursor"].as_str() {
                Some(cursor) => {
                    assert_eq!(page["more"], true);
                    after = Some(cursor.to_owned());
                }
                None => break,
            }
        }
        assert_eq!(printed, descending);
        // In text, the continuation goes to stderr.
        let run = fixture.run_expecting(
            0,
            &[
                "query",
                "age >= 30",
                "--prefix",
                "person:",
                "--keys-only",
                "--limit",
                "2",
            ],
        );
        assert_eq!(run.stdout.lines().collect::<Vec<_>>(), keys[..2]);
        let token = run
            .stderr
            .trim()
            .strip_prefix("more: continue with --after ")
            .unwrap_or_else(|| panic!("{run:?}"));
        let run = fixture.run_expecting(
            0,
            &[
                "query",
                "age >= 30",
                "--prefix",
                "person:",
                "--keys-only",
                "--limit",
                "2",
                "--after",
                token,
            ],
        );
        assert_eq!(run.stdout.lines().collect::<Vec<_>>(), keys[2..4]);

        fixture.stop();
    }

    #[test]
    fn query_errors_exit_2() {
        let (fixture, _client, _) = indexed_people();
        // Errors: the filter's, the cursor's, the limit's.
        let run = fixture.run_expecting(2, &["query", "age >=", "--prefix", "person:"]);
        assert!(run.stderr.contains("at byte 6"), "{run:?}");
        let run = fixture.run_expecting(2, &["-o", "json", "query", "age >="]);
        assert!(
            parse_json(&run)["error"]
                .as_str()
                .unwrap()
                .contains("query"),
            "{run:?}"
        );
        let run = fixture.run_expecting(2, &["query", "age >= 1", "--after", "xyz"]);
        assert!(run.stderr.contains("not a cursor"), "{run:?}");
        fixture.run_expecting(2, &["query", "age >= 1", "--limit", "0"]);
        fixture.run_expecting(2, &["query", "age >= 1", "--count", "--keys-only"]);
        fixture.stop();
    }
}
