//! The `tessera` command-line client, run as a separate process against a server started in
//! this test process: its output (text and `-o json`) and its exit status, which scripts
//! depend on: 0 on success, 1 when `get` finds no key, 2 on any error.
//!
//! Every run of the binary has a deadline; a run that outlives it is killed and fails the
//! test.
//!
//! `scan_errors_in_json_are_one_value` guards a bug found when it was first written: `scan`
//! with `-o json` printed `{"items":[` before reading the first page, so an error left that
//! opening in front of the error object and stdout was not one JSON value.

mod common;

use std::fmt::Write as _;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{core_of_key, start_server, stop_server, unused_address, CORE_COUNT};
use serde_json::Value;
use tessera_client::BlockingClient;
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
