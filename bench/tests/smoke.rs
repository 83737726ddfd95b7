//! The benchmark's smoke test, the only part of it CI runs: a short run against an embedded
//! server and one against Tessera over loopback must report throughput and no errors.
//! Speed targets live in `scripts/bench-vs-redis.sh` and `docs/benchmarks.md`, never here.

use std::process::Command;

fn run_bench(arguments: &[&str]) -> serde_json::Value {
    let output = Command::new(env!("CARGO_BIN_EXE_tessera-bench"))
        .args(arguments)
        .args(["--json", "--quiet"])
        .output()
        .expect("tessera-bench runs");
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
    let server = tessera_server::Server::start(tessera_server::Config {
        cores: 2,
        port: 0,
        memory_bytes_max: 64 * 1024 * 1024,
        durability: tessera_server::config::Durability::Memory,
        ..tessera_server::Config::default()
    })
    .expect("a test server starts");
    let endpoint = server.addresses()[0].clone();
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
