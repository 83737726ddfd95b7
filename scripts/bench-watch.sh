#!/usr/bin/env bash
# Watches on one Tessera core: put-to-event latency with few and many watchers, and the events
# delivered beside a SET load against the same load with no watchers, in one run.
#
#   scripts/bench-watch.sh            the three measurements (under a minute once built)
#
# Settings come from the environment:
#   DURATION_SECS (5)  CONNECTIONS (50)  KEYS (100000)  KEY_SIZE (16)  VALUE_SIZE (32)
#   SERVER_CPU (1)     LOAD_CPU (0)      RESULTS_DIR (target/bench-watch)
#   LATENCY_WATCHERS ("1 1000")  LATENCY_RATE (100 puts/s)
#   FANOUT_WATCHERS (100)        FANOUT_PIPELINE (1)
#   FANOUT_RATE (unset: closed loop; SETs per second over all sessions for an open loop)
#
# Each measurement gets a fresh one-core server in memory, pinned to SERVER_CPU on a free
# loopback port, and tessera-bench pinned to LOAD_CPU (watchers and load generator share that
# CPU), and the server is stopped by PID after it:
# - `--workload watch-latency --watchers N` for each N of LATENCY_WATCHERS: N watches on the
#   prefix every key is written under (through the client library, 1000 per client, which
#   holds one connection per core), then one writer putting LATENCY_RATE stamped values per
#   second; latency runs from just before a put is sent to a watcher's task receiving it.
# - `--workload watch-fanout --watchers FANOUT_WATCHERS`: the SET load (CONNECTIONS sessions of
#   the raw driver, keys preloaded) for DURATION_SECS with no watchers, then again with the
#   watchers consuming every event; events per second over all watchers, and SET ops/s with
#   the watchers as a ratio to the window without.
# Raw results are JSON files in RESULTS_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."

RESULTS_DIR="${RESULTS_DIR:-target/bench-watch}"
LATENCY_WATCHERS="${LATENCY_WATCHERS:-1 1000}"
LATENCY_RATE="${LATENCY_RATE:-100}"
FANOUT_WATCHERS="${FANOUT_WATCHERS:-100}"
FANOUT_PIPELINE="${FANOUT_PIPELINE:-1}"
FANOUT_RATE="${FANOUT_RATE:-}"

# shellcheck source=scripts/bench-common.sh
. scripts/bench-common.sh

say "building (release)"
cargo build --release --locked -q -p tessera-server -p tessera-bench
BIN=target/release
mkdir -p "$RESULTS_DIR"
rm -f "$RESULTS_DIR"/*.json

stop_on_exit
stop_server() {
  kill "$SERVER_PID" 2>/dev/null || true
  wait "$SERVER_PID" 2>/dev/null || true
}

# Runs tessera-bench with "$@" against a fresh server; its JSON goes to RESULTS_DIR/$1.json.
measure() {
  local name="$1"
  shift
  local port
  port=$(free_port)
  "$BIN/tessera-server" --cores 1 --cpus "$SERVER_CPU" --port "$port" --durability memory \
    >"$RESULTS_DIR/$name.log" 2>&1 &
  SERVER_PID=$!
  PIDS+=("$SERVER_PID")
  wait_for_port "$port" tessera-server
  taskset -c "$LOAD_CPU" "$BIN/tessera-bench" --endpoints "127.0.0.1:$port" \
    --server-pid "$SERVER_PID" --keys "$KEYS" --key-size "$KEY_SIZE" \
    --value-size "$VALUE_SIZE" --duration-secs "$DURATION_SECS" --json --quiet "$@" \
    >"$RESULTS_DIR/$name.json" 2>"$RESULTS_DIR/$name.stderr"
  stop_server
}

for watchers in $LATENCY_WATCHERS; do
  say "put-to-event latency, $watchers watchers"
  measure "latency-w$watchers" --workload watch-latency --watchers "$watchers" \
    --rate "$LATENCY_RATE"
done
say "events delivered with $FANOUT_WATCHERS watchers beside the SET load (and with none)"
fanout_rate=()
if [ -n "$FANOUT_RATE" ]; then
  fanout_rate=(--rate "$FANOUT_RATE")
fi
measure "fanout-w$FANOUT_WATCHERS" --workload watch-fanout --watchers "$FANOUT_WATCHERS" \
  --connections "$CONNECTIONS" --pipeline "$FANOUT_PIPELINE" "${fanout_rate[@]}"

python3 - "$RESULTS_DIR" "$LATENCY_WATCHERS" "$FANOUT_WATCHERS" <<'EOF'
import json, os, sys

results, latency_watchers, fanout_watchers = sys.argv[1], sys.argv[2].split(), sys.argv[3]
def load(name):
    with open(os.path.join(results, name + ".json")) as handle:
        return json.load(handle)

def cpu(value):
    return f"{value:9.2f}" if value is not None else f"{'-':>9}"

first = load(f"latency-w{latency_watchers[0]}")
config = first["config"]
print(f"tessera-bench {first['git_revision']} on {first['machine']['cpus']} cpus "
      f"({first['machine']['cpu_model']}), kernel {first['machine']['kernel']}")
print("one server core in memory pinned to one CPU; watchers and load generator pinned to another")
print()
print(f"put-to-event latency: one writer at {config['rate']:g} puts/s for "
      f"{first['duration_secs']:.0f} s, keys of {config['key_size']} B, values of "
      f"{config['value_size']} B, every watch on prefix {first['watch']['prefix']!r}")
header = (f"{'watchers':>8} {'events':>9} {'events/s':>9} {'p50 us':>8} {'p99 us':>8} "
          f"{'p99.9 us':>8} {'max us':>8} {'put p50':>8} {'srv us/put':>10} {'lagged':>6} "
          f"{'missing':>7}")
print(header)
print("-" * len(header))
for watchers in latency_watchers:
    row = load(f"latency-w{watchers}")
    watch = row["watch"]
    latency = watch["latency"]
    missing = watch["events_expected"] - watch["events"]
    print(f"{watch['watchers']:>8} {watch['events']:>9} {watch['events_per_sec']:>9.0f} "
          f"{latency['p50_us']:>8.0f} {latency['p99_us']:>8.0f} {latency['p999_us']:>8.0f} "
          f"{latency['max_us']:>8.0f} {row['p50_us']:>8.0f} "
          f"{cpu(row.get('server_cpu_us_per_op')):>10} {watch['lagged_count']:>6} {missing:>7}")
print()
fanout = load(f"fanout-w{fanout_watchers}")
config = fanout["config"]
watch = fanout["watch"]
peer = watch["peer"]
loop = f"open loop at {config['rate']:g} SETs/s" if config.get("rate") else "closed loop"
print(f"events delivered beside the SET load: {config['connections']} connections, pipeline "
      f"{config['pipeline']}, {loop}, {config['keys']} keys preloaded, "
      f"{fanout['duration_secs']:.0f} s per window, the window with no watchers first")
header = (f"{'watchers':>8} {'set ops/s':>10} {'p50 us':>8} {'p99 us':>8} {'srv us/op':>9} "
          f"{'cli us/op':>9} {'events/s':>10} {'lagged':>6} {'vs 0 watchers':>13}")
print(header)
print("-" * len(header))
print(f"{0:>8} {peer['ops_per_sec']:>10.0f} {peer['p50_us']:>8.0f} {peer['p99_us']:>8.0f} "
      f"{cpu(peer.get('server_cpu_us_per_op'))} {peer['client_cpu_us_per_op']:>9.2f} "
      f"{'-':>10} {'-':>6} {'1.00x':>13}")
print(f"{watch['watchers']:>8} {fanout['ops_per_sec']:>10.0f} {fanout['p50_us']:>8.0f} "
      f"{fanout['p99_us']:>8.0f} {cpu(fanout.get('server_cpu_us_per_op'))} "
      f"{fanout['client_cpu']['us_per_op']:>9.2f} {watch['events_per_sec']:>10.0f} "
      f"{watch['lagged_count']:>6} {peer['watched_ops_per_sec_ratio']:>12.2f}x")
print(f"events per watcher: {watch['events_per_watcher_min']}-{watch['events_per_watcher_max']} "
      f"(SETs acknowledged in the window: {fanout['operations']}); watch errors "
      f"{watch['error_count']}; server watchers {watch['server_watcher_count']} at the start, "
      f"{watch['server_watcher_count_end']} at the end")
EOF
