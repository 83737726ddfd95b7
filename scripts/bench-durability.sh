#!/usr/bin/env bash
# SET throughput and latency of one Tessera core in each durability mode, in one run.
#
#   scripts/bench-durability.sh          sync, async and memory at pipeline 1 and 16 (~1 min)
#
# Settings come from the environment:
#   DURATION_SECS (5)  CONNECTIONS (50)  KEYS (100000)  KEY_SIZE (16)  VALUE_SIZE (32)
#   SERVER_CPU (1)     LOAD_CPU (0)      RESULTS_DIR (target/bench-durability)
#   DATA_PARENT (target/bench-durability/data: on the disk under test, not tmpfs)
#
# For each mode and pipeline depth the script starts a fresh one-core server pinned to
# SERVER_CPU on a free loopback port with an empty data directory, drives it with
# tessera-bench pinned to LOAD_CPU (50 connections, SET of uniform keys), reads the core's log
# counters with `tessera stats -o json`, and stops the server by PID. It prints ops/s, p50 and
# p99 latency, server CPU per operation and, for the logging modes, records per fdatasync.
# Raw results are JSON files in RESULTS_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."

RESULTS_DIR="${RESULTS_DIR:-target/bench-durability}"
DATA_PARENT="${DATA_PARENT:-$RESULTS_DIR/data}"

# shellcheck source=scripts/bench-common.sh
. scripts/bench-common.sh

say "building (release)"
cargo build --release --locked -q -p tessera-server -p tessera-bench -p tessera-client
BIN=target/release
mkdir -p "$RESULTS_DIR"
rm -rf "$DATA_PARENT"
mkdir -p "$DATA_PARENT"
say "data directories on $(df --output=fstype "$DATA_PARENT" | tail -1) ($DATA_PARENT)"

stop_on_exit
stop_server() {
  kill "$SERVER_PID" 2>/dev/null || true
  wait "$SERVER_PID" 2>/dev/null || true
}

for mode in sync async memory; do
  for pipeline in 1 16; do
    name="$mode-p$pipeline"
    port=$(free_port)
    say "$mode, pipeline $pipeline"
    "$BIN/tessera-server" --cores 1 --cpus "$SERVER_CPU" --port "$port" \
      --durability "$mode" --data-dir "$DATA_PARENT/$name" \
      >"$RESULTS_DIR/$name.log" 2>&1 &
    SERVER_PID=$!
    PIDS+=("$SERVER_PID")
    wait_for_port "$port" tessera-server
    taskset -c "$LOAD_CPU" "$BIN/tessera-bench" --endpoints "127.0.0.1:$port" \
      --server-pid "$SERVER_PID" --workload set --pipeline "$pipeline" \
      --connections "$CONNECTIONS" --keys "$KEYS" --key-size "$KEY_SIZE" \
      --value-size "$VALUE_SIZE" --duration-secs "$DURATION_SECS" --json --quiet \
      >"$RESULTS_DIR/$name.json" 2>/dev/null
    "$BIN/tessera" --endpoints "127.0.0.1:$port" stats -o json >"$RESULTS_DIR/$name-stats.json"
    stop_server
  done
done

python3 - "$RESULTS_DIR" <<'EOF'
import json, os, sys

results = sys.argv[1]
def load(name):
    with open(os.path.join(results, name)) as handle:
        return json.load(handle)

def log_counters(stats):
    cores = stats if isinstance(stats, list) else stats.get("cores", [stats])
    records = sum(core.get("log_record_count", 0) for core in cores)
    syncs = sum(core.get("log_sync_count", 0) for core in cores)
    return records, syncs

first = load("sync-p1.json")
config = first["config"]
print(f"tessera-bench {first['git_revision']} on {first['machine']['cpus']} cpus "
      f"({first['machine']['cpu_model']}), kernel {first['machine']['kernel']}")
print(f"SET, {config['connections']} connections, {config['keys']} keys of "
      f"{config['key_size']} B, values of {config['value_size']} B, {first['duration_secs']:.0f} s "
      "per run; one server core pinned to one CPU, the load generator to another")
print()
header = (f"{'mode':<7} {'pipe':>4} {'ops/s':>10} {'p50 us':>8} {'p99 us':>8} "
          f"{'srv us/op':>9} {'writes/sync':>11} {'vs memory':>9}")
print(header)
print("-" * len(header))
for pipeline in (1, 16):
    memory = load(f"memory-p{pipeline}.json")["ops_per_sec"]
    for mode in ("sync", "async", "memory"):
        row = load(f"{mode}-p{pipeline}.json")
        records, syncs = log_counters(load(f"{mode}-p{pipeline}-stats.json"))
        per_sync = f"{records / syncs:11.1f}" if syncs else f"{'-':>11}"
        cpu = row.get("server_cpu_us_per_op")
        cpu_text = f"{cpu:9.2f}" if cpu is not None else f"{'-':>9}"
        print(f"{mode:<7} {pipeline:>4} {row['ops_per_sec']:>10.0f} {row['p50_us']:>8.0f} "
              f"{row['p99_us']:>8.0f} {cpu_text} {per_sync} "
              f"{row['ops_per_sec'] / memory:>8.2f}x")
EOF
