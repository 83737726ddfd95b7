#!/usr/bin/env bash
# Tessera against Redis and the loopback echo ceiling, side by side, in one run.
#
#   scripts/bench-vs-redis.sh            the comparison (about 2 minutes once built)
#
# Settings come from the environment:
#   DURATION_SECS (5)  CONNECTIONS (50)  KEYS (100000)  KEY_SIZE (16)  VALUE_SIZE (32)
#   SERVER_CPU (1)     LOAD_CPU (0)      MEMORY_KEYS (1000000; 0 skips the memory figure)
#   RATE_FRACTION (0.6: the fixed rate for the same-load latency, as a share of Redis's rate)
#   RESULTS_DIR (target/bench-vs-redis)
#
# Every server (Redis without persistence, Tessera in memory with one core, tessera-echo with
# one core) is pinned to SERVER_CPU and the load generator to LOAD_CPU, so each server gets the
# same single core and the same load generator drives all three with the same connections,
# pipeline depth, keys and values. The script starts them on free loopback ports, stops them
# by PID when it ends (whatever the reason), and prints a table with ops/s, p50/p99 latency,
# server CPU per operation and the ratios Tessera/Redis and Tessera/echo. The raw results are
# JSON files in RESULTS_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/bench-common.sh
source scripts/bench-common.sh

MEMORY_KEYS="${MEMORY_KEYS:-1000000}"
RESULTS_DIR="${RESULTS_DIR:-target/bench-vs-redis}"

ensure_package redis-server redis-server

build_release

stop_on_exit

REDIS_PORT=$(free_port)
TESSERA_PORT=$(free_port)
ECHO_PORT=$(free_port)

taskset -c "$SERVER_CPU" redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" \
  --appendonly no --daemonize no --logfile "$RESULTS_DIR/redis.log" &
PIDS+=($!)
REDIS_PID=$!
"$BIN/tessera-server" --cores 1 --cpus "$SERVER_CPU" --port "$TESSERA_PORT" --durability memory \
  >"$RESULTS_DIR/tessera.log" 2>&1 &
PIDS+=($!)
TESSERA_PID=$!
"$BIN/tessera-echo" --cores 1 --cpus "$SERVER_CPU" --port "$ECHO_PORT" \
  >"$RESULTS_DIR/echo.log" 2>&1 &
PIDS+=($!)
ECHO_PID=$!

wait_for_port "$REDIS_PORT" redis
wait_for_port "$TESSERA_PORT" tessera
wait_for_port "$ECHO_PORT" echo

declare -A TARGETS=(
  [echo]="--target echo://127.0.0.1:$ECHO_PORT --server-pid $ECHO_PID"
  [redis]="--target redis://127.0.0.1:$REDIS_PORT --server-pid $REDIS_PID"
  [tessera]="--endpoints 127.0.0.1:$TESSERA_PORT --server-pid $TESSERA_PID"
)

for workload in get set; do
  for pipeline in 1 16; do
    for target in echo redis tessera; do
      say "$target $workload pipeline $pipeline"
      # shellcheck disable=SC2086 # the target flags are words on purpose
      taskset -c "$LOAD_CPU" "$BIN/tessera-bench" ${TARGETS[$target]} \
        --workload "$workload" --pipeline "$pipeline" --connections "$CONNECTIONS" \
        --keys "$KEYS" --key-size "$KEY_SIZE" --value-size "$VALUE_SIZE" \
        --duration-secs "$DURATION_SECS" --json --quiet \
        >"$RESULTS_DIR/$target-$workload-p$pipeline.json" 2>/dev/null
    done
  done
done

# Latency at the same load: an open loop at RATE_FRACTION of Redis's closed-loop GET rate at
# pipeline 1 (latency counted from each request's intended send time).
RATE_FRACTION="${RATE_FRACTION:-0.6}"
REDIS_GET_RATE=$(python3 -c "import json; print(json.load(open('$RESULTS_DIR/redis-get-p1.json'))['ops_per_sec'])")
SAME_RATE=$(python3 -c "print(int($REDIS_GET_RATE * $RATE_FRACTION))")
for target in redis tessera; do
  say "$target get at a fixed $SAME_RATE ops/s"
  # shellcheck disable=SC2086 # the target flags are words on purpose
  taskset -c "$LOAD_CPU" "$BIN/tessera-bench" ${TARGETS[$target]} \
    --workload get --pipeline 1 --connections "$CONNECTIONS" --rate "$SAME_RATE" \
    --keys "$KEYS" --key-size "$KEY_SIZE" --value-size "$VALUE_SIZE" \
    --duration-secs "$DURATION_SECS" --json --quiet \
    >"$RESULTS_DIR/$target-get-rate.json" 2>/dev/null
done

rss_kib() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"; }
redis_used_memory() {
  redis-cli -p "$REDIS_PORT" info memory | awk -F: '/^used_memory:/ { gsub("\r", ""); print $2 }'
}

if [ "$MEMORY_KEYS" -gt 0 ]; then
  say "memory: $MEMORY_KEYS keys in each server"
  redis-cli -p "$REDIS_PORT" flushall >/dev/null
  # A fresh Tessera, so its RSS starts from an empty store.
  kill "$TESSERA_PID"
  wait "$TESSERA_PID" 2>/dev/null || true
  TESSERA_PORT=$(free_port)
  "$BIN/tessera-server" --cores 1 --cpus "$SERVER_CPU" --port "$TESSERA_PORT" --durability memory \
    >>"$RESULTS_DIR/tessera.log" 2>&1 &
  PIDS+=($!)
  TESSERA_PID=$!
  wait_for_port "$TESSERA_PORT" tessera
  load_keys() {
    # shellcheck disable=SC2068 # the target flags are words on purpose
    taskset -c "$LOAD_CPU" "$BIN/tessera-bench" $@ --workload get --preload yes \
      --keys "$MEMORY_KEYS" --key-size "$KEY_SIZE" --value-size "$VALUE_SIZE" \
      --connections "$CONNECTIONS" --duration-secs 0.1 --json --quiet >/dev/null 2>&1
  }
  tessera_before=$(rss_kib "$TESSERA_PID")
  load_keys --endpoints "127.0.0.1:$TESSERA_PORT"
  tessera_after=$(rss_kib "$TESSERA_PID")
  redis_before=$(redis_used_memory)
  load_keys --target "redis://127.0.0.1:$REDIS_PORT"
  redis_after=$(redis_used_memory)
  printf '{"keys": %s, "tessera_rss_kib_before": %s, "tessera_rss_kib_after": %s, "redis_used_memory_before": %s, "redis_used_memory_after": %s}\n' \
    "$MEMORY_KEYS" "$tessera_before" "$tessera_after" "$redis_before" "$redis_after" \
    >"$RESULTS_DIR/memory.json"
fi

python3 - "$RESULTS_DIR" <<'EOF'
import json, os, sys

results = sys.argv[1]
def load(target, workload, pipeline):
    with open(os.path.join(results, f"{target}-{workload}-p{pipeline}.json")) as handle:
        return json.load(handle)

first = load("tessera", "get", 1)
config = first["config"]
print(f"tessera-bench {first['git_revision']} on {first['machine']['cpus']} cpus "
      f"({first['machine']['cpu_model']}), kernel {first['machine']['kernel']}")
print(f"{config['connections']} connections, {config['keys']} keys of {config['key_size']} B, "
      f"values of {config['value_size']} B, uniform, {first['duration_secs']:.0f} s per run; "
      "each server pinned to one CPU, the load generator to another")
print()
header = f"{'workload':<6} {'pipe':>4}  {'target':<8} {'ops/s':>10} {'p50 us':>8} {'p99 us':>8} {'srv us/op':>9}"
print(header + f"  {'vs redis':>8} {'vs echo':>8}")
print("-" * (len(header) + 19))
for workload in ("get", "set"):
    for pipeline in (1, 16):
        rows = {target: load(target, workload, pipeline) for target in ("echo", "redis", "tessera")}
        for target, row in rows.items():
            cpu = row.get("server_cpu_us_per_op")
            cpu_text = f"{cpu:9.2f}" if cpu is not None else f"{'-':>9}"
            line = (f"{workload:<6} {pipeline:>4}  {target:<8} {row['ops_per_sec']:>10.0f} "
                    f"{row['p50_us']:>8.0f} {row['p99_us']:>8.0f} {cpu_text}")
            if target == "tessera":
                line += (f"  {row['ops_per_sec'] / rows['redis']['ops_per_sec']:>7.2f}x"
                         f" {row['ops_per_sec'] / rows['echo']['ops_per_sec']:>7.2f}x")
            if row["errors"]:
                line += f"  ({row['errors']} errors)"
            print(line)
        tessera, redis, echo = rows["tessera"], rows["redis"], rows["echo"]
        if tessera.get("server_cpu_us_per_op") and echo.get("server_cpu_us_per_op"):
            print(f"{'':<13} server cpu per op: tessera/redis "
                  f"{tessera['server_cpu_us_per_op'] / redis['server_cpu_us_per_op']:.2f}x, "
                  f"tessera/echo {tessera['server_cpu_us_per_op'] / echo['server_cpu_us_per_op']:.2f}x")
rate = {target: json.load(open(os.path.join(results, f"{target}-get-rate.json")))
        for target in ("redis", "tessera")}
print()
print(f"same load, open loop at {rate['redis']['config']['rate']:.0f} ops/s (get, pipeline 1):")
for target, row in rate.items():
    print(f"  {target:<8} {row['ops_per_sec']:>8.0f} ops/s  p50 {row['p50_us']:>6.0f} us  "
          f"p99 {row['p99_us']:>6.0f} us  p99.9 {row['p999_us']:>6.0f} us")
print(f"  p99 tessera/redis {rate['tessera']['p99_us'] / rate['redis']['p99_us']:.2f}x")
memory_path = os.path.join(results, "memory.json")
if os.path.exists(memory_path):
    with open(memory_path) as handle:
        memory = json.load(handle)
    keys = memory["keys"]
    tessera = (memory["tessera_rss_kib_after"] - memory["tessera_rss_kib_before"]) * 1024 / keys
    redis = (memory["redis_used_memory_after"] - memory["redis_used_memory_before"]) / keys
    print()
    print(f"memory per key ({keys} keys): tessera RSS {tessera:.0f} B, "
          f"redis used_memory {redis:.0f} B, ratio {tessera / redis:.2f}x")
EOF
