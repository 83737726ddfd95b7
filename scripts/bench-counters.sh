#!/usr/bin/env bash
# Counter adds per second, Tessera against Redis INCR in one run: one hot key (every add on
# one counter, so one shard serializes them) and uniform keys.
#
#   scripts/bench-counters.sh            the comparison (about a minute once built)
#
# Settings come from the environment (see bench-common.sh): DURATION_SECS (5),
# CONNECTIONS (50), KEYS (100000, the uniform case), SERVER_CPU (1), LOAD_CPU (0),
# RESULTS_DIR (target/bench-counters).
#
# Both servers are pinned to SERVER_CPU (Tessera with one core, in memory; Redis without
# persistence) and the load generator to LOAD_CPU; they are started on free loopback ports and
# stopped by PID when the script ends.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/bench-common.sh
source scripts/bench-common.sh

RESULTS_DIR="${RESULTS_DIR:-target/bench-counters}"
ensure_package redis-server redis-server
say "building (release)"
cargo build --release --locked -q -p tessera-server -p tessera-bench
BIN=target/release
mkdir -p "$RESULTS_DIR"
stop_on_exit

REDIS_PORT=$(free_port)
TESSERA_PORT=$(free_port)
taskset -c "$SERVER_CPU" redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" \
  --appendonly no --daemonize no --logfile "$RESULTS_DIR/redis.log" &
PIDS+=($!)
REDIS_PID=$!
"$BIN/tessera-server" --cores 1 --cpus "$SERVER_CPU" --port "$TESSERA_PORT" --durability memory \
  >"$RESULTS_DIR/tessera.log" 2>&1 &
PIDS+=($!)
TESSERA_PID=$!
wait_for_port "$REDIS_PORT" redis
wait_for_port "$TESSERA_PORT" tessera

declare -A TARGETS=(
  [redis]="--target redis://127.0.0.1:$REDIS_PORT --server-pid $REDIS_PID"
  [tessera]="--endpoints 127.0.0.1:$TESSERA_PORT --server-pid $TESSERA_PID"
)
for keys in 1 "$KEYS"; do
  for pipeline in 1 16; do
    for target in redis tessera; do
      say "$target incr, $keys keys, pipeline $pipeline"
      # shellcheck disable=SC2086 # the target flags are words on purpose
      taskset -c "$LOAD_CPU" "$BIN/tessera-bench" ${TARGETS[$target]} \
        --workload incr --pipeline "$pipeline" --connections "$CONNECTIONS" --keys "$keys" \
        --duration-secs "$DURATION_SECS" --json --quiet \
        >"$RESULTS_DIR/$target-k$keys-p$pipeline.json" 2>/dev/null
    done
  done
done

python3 - "$RESULTS_DIR" "$KEYS" <<'PY'
import json, os, sys
results, uniform = sys.argv[1], sys.argv[2]
def load(target, keys, pipeline):
    with open(os.path.join(results, f"{target}-k{keys}-p{pipeline}.json")) as handle:
        return json.load(handle)
first = load("tessera", 1, 1)
print(f"tessera-bench {first['git_revision']} on {first['machine']['cpus']} cpus "
      f"({first['machine']['cpu_model']}); {first['config']['connections']} connections, "
      f"{first['duration_secs']:.0f} s per run, each server on one CPU")
print(f"{'keys':>7} {'pipe':>4}  {'target':<8} {'adds/s':>10} {'p50 us':>8} {'p99 us':>8} "
      f"{'srv us/op':>9} {'vs redis':>8}")
for keys in ("1", uniform):
    for pipeline in (1, 16):
        rows = {target: load(target, keys, pipeline) for target in ("redis", "tessera")}
        for target, row in rows.items():
            cpu = row.get("server_cpu_us_per_op")
            line = (f"{keys:>7} {pipeline:>4}  {target:<8} {row['ops_per_sec']:>10.0f} "
                    f"{row['p50_us']:>8.0f} {row['p99_us']:>8.0f} "
                    + (f"{cpu:9.2f}" if cpu is not None else f"{'-':>9}"))
            if target == "tessera":
                line += f" {row['ops_per_sec'] / rows['redis']['ops_per_sec']:>7.2f}x"
            if row["errors"]:
                line += f"  ({row['errors']} errors)"
            print(line)
PY
