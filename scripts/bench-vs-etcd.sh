#!/usr/bin/env bash
# Durable SET throughput: Tessera against etcd, side by side, in one run (issue 4).
#
#   scripts/bench-vs-etcd.sh            the comparison (about a minute once built)
#
# Settings come from the environment:
#   DURATION_SECS (5)  CONNECTIONS (50)  KEYS (100000)  KEY_SIZE (16)  VALUE_SIZE (32)
#   SERVER_CPU (1)     LOAD_CPU (0)
#   PIPELINES ("1 16": requests in flight per connection, each depth run against both; the
#     issue's figure is pipeline 1)
#   REPEATS (3: runs of each target at each depth, alternating etcd and Tessera, so that a
#     change in the shared disk's speed during the script touches both; medians are reported)
#   FSYNC_PROBE_COUNT (200: fdatasync calls timed on the data disk before and after the runs;
#     0 skips)
#   RESULTS_DIR (target/bench-vs-etcd)
#   DATA_PARENT (RESULTS_DIR/data: both servers' data directories go here, on one disk)
#
# One etcd member (Debian's etcd-server, installed if `etcd` is missing; default settings, so
# every commit is fsynced) and `tessera-server --cores 1 --durability sync` (every write is
# acknowledged after the fdatasync of its group-commit batch) each get a fresh data directory
# under DATA_PARENT, which must be a real disk, not tmpfs: the comparison is about what a
# durable write costs. Both servers are pinned to SERVER_CPU and the load generator to
# LOAD_CPU. `tessera-bench` drives both with the same SET workload, connections, keys and
# values: its raw io_uring driver against Tessera, and `etcd-client` (gRPC over tonic, one
# client and connection per session) against etcd. At pipeline 1 every connection has one
# request in flight; at deeper PIPELINES a Tessera connection queues that many and an etcd
# client keeps that many calls in flight on its HTTP/2 connection. The script starts the
# servers on free loopback ports, stops them by PID and removes their data directories when
# it ends (whatever the reason), and prints ops/s, p50/p99 latency, CPU per operation, writes
# per fdatasync (from Tessera's stats and etcd's WAL metrics) and the ratio Tessera/etcd. The
# raw results are JSON files in RESULTS_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/bench-common.sh
source scripts/bench-common.sh

read -r -a PIPELINES <<<"${PIPELINES:-1 16}"
REPEATS="${REPEATS:-3}"
FSYNC_PROBE_COUNT="${FSYNC_PROBE_COUNT:-200}"
RESULTS_DIR="${RESULTS_DIR:-target/bench-vs-etcd}"
DATA_PARENT="${DATA_PARENT:-$RESULTS_DIR/data}"

ensure_package etcd-server etcd

say "building (release)"
cargo build --release --locked -q -p tessera-server -p tessera-client -p tessera-bench \
  --features tessera-bench/etcd
BIN=target/release
mkdir -p "$RESULTS_DIR" "$DATA_PARENT"
# An absolute path: tessera-server cannot open a relative --data-dir (glommio's directory open
# fails with EBADF on one).
DATA_PARENT=$(cd "$DATA_PARENT" && pwd)
# Results of an earlier run must not pass for this one's.
rm -f "$RESULTS_DIR"/*-set-p*.json "$RESULTS_DIR"/*-set-p*.log "$RESULTS_DIR"/fsync-*.json

filesystem=$(df --output=fstype "$DATA_PARENT" | tail -n 1)
if [ "$filesystem" = tmpfs ] || [ "$filesystem" = ramfs ]; then
  say "DATA_PARENT $DATA_PARENT is on $filesystem: fsync costs nothing there, the figures would mean little"
  exit 1
fi

# etcd serves requests only once its one member has elected itself leader; /health says so.
etcd_is_healthy() {
  python3 -c "import json,sys,urllib.request; sys.exit(0 if json.load(urllib.request.urlopen('http://127.0.0.1:$1/health', timeout=1)).get('health') == 'true' else 1)"
}

DATA_DIRS=()
cleanup_extra() {
  for dir in "${DATA_DIRS[@]}"; do
    rm -rf -- "$dir"
  done
}
stop_on_exit

ETCD_DIR=$(mktemp -d "$DATA_PARENT/etcd.XXXXXX")
DATA_DIRS+=("$ETCD_DIR")
TESSERA_DIR=$(mktemp -d "$DATA_PARENT/tessera.XXXXXX")
DATA_DIRS+=("$TESSERA_DIR")

# Times FSYNC_PROBE_COUNT appends + fdatasync on the data disk into fsync-$1.json: the cost
# every durable write pays at least once per batch, on a disk other machines may share.
probe_fsync() {
  if [ "$FSYNC_PROBE_COUNT" -le 0 ]; then
    return 0
  fi
  say "timing $FSYNC_PROBE_COUNT fdatasync calls on $DATA_PARENT ($filesystem)"
  python3 - "$DATA_PARENT" "$FSYNC_PROBE_COUNT" "$filesystem" >"$RESULTS_DIR/fsync-$1.json" <<'EOF'
import json, os, sys, tempfile, time

parent, count, filesystem = sys.argv[1], int(sys.argv[2]), sys.argv[3]
latencies_us = []
with tempfile.NamedTemporaryFile(dir=parent) as handle:
    for _ in range(count):
        os.write(handle.fileno(), b"x" * 64)
        started = time.perf_counter()
        os.fdatasync(handle.fileno())
        latencies_us.append((time.perf_counter() - started) * 1e6)
latencies_us.sort()
print(json.dumps({
    "filesystem": filesystem,
    "count": count,
    "p50_us": latencies_us[len(latencies_us) // 2],
    "p99_us": latencies_us[min(len(latencies_us) - 1, len(latencies_us) * 99 // 100)],
}))
EOF
}

ETCD_CLIENT_PORT=$(free_port)
ETCD_PEER_PORT=$(free_port)
TESSERA_PORT=$(free_port)

taskset -c "$SERVER_CPU" etcd --name bench --data-dir "$ETCD_DIR" \
  --listen-client-urls "http://127.0.0.1:$ETCD_CLIENT_PORT" \
  --advertise-client-urls "http://127.0.0.1:$ETCD_CLIENT_PORT" \
  --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
  --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
  --initial-cluster "bench=http://127.0.0.1:$ETCD_PEER_PORT" \
  --logger zap --log-outputs stderr \
  >"$RESULTS_DIR/etcd.log" 2>&1 &
PIDS+=($!)
ETCD_PID=$!
taskset -c "$SERVER_CPU" "$BIN/tessera-server" --cores 1 --cpus "$SERVER_CPU" \
  --port "$TESSERA_PORT" --durability sync --data-dir "$TESSERA_DIR" \
  >"$RESULTS_DIR/tessera.log" 2>&1 &
PIDS+=($!)
TESSERA_PID=$!

wait_for_port "$ETCD_CLIENT_PORT" etcd
wait_until "etcd on port $ETCD_CLIENT_PORT did not become healthy" \
  etcd_is_healthy "$ETCD_CLIENT_PORT"
wait_for_port "$TESSERA_PORT" tessera
say "$(etcd --version 2>&1 | sed -n 1p), pid $ETCD_PID; tessera-server pid $TESSERA_PID"

# Counters that say how many writes shared one fdatasync: Tessera's per-core log stats, and
# etcd's WAL fsync count from its metrics.
tessera_log_stats() {
  "$BIN/tessera" --endpoints "127.0.0.1:$TESSERA_PORT" -o json stats
}
etcd_metrics() {
  python3 - "$ETCD_CLIENT_PORT" <<'EOF'
import json, sys, urllib.request

text = urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/metrics", timeout=5).read().decode()
wanted = {
    "etcd_disk_wal_fsync_duration_seconds_count": "wal_fsync_count",
    "etcd_disk_backend_commit_duration_seconds_count": "backend_commit_count",
    "etcd_server_proposals_committed_total": "proposals_committed",
}
found = {}
for line in text.splitlines():
    name, _, value = line.partition(" ")
    if name in wanted:
        found[wanted[name]] = float(value)
print(json.dumps(found))
EOF
}

# One measured run: run_bench NAME PIPELINE REPEAT TARGET-FLAGS..., into NAME-set-pP-rR.json.
run_bench() {
  local name="$1" pipeline="$2" repeat="$3"
  shift 3
  local run="$name-set-p$pipeline-r$repeat"
  say "$name set pipeline $pipeline (run $repeat of $REPEATS)"
  taskset -c "$LOAD_CPU" "$BIN/tessera-bench" "$@" \
    --workload set --pipeline "$pipeline" --connections "$CONNECTIONS" \
    --keys "$KEYS" --key-size "$KEY_SIZE" --value-size "$VALUE_SIZE" \
    --duration-secs "$DURATION_SECS" --json --quiet \
    >"$RESULTS_DIR/$run.json" 2>"$RESULTS_DIR/$run.log"
}

probe_fsync before
for pipeline in "${PIPELINES[@]}"; do
  for repeat in $(seq 1 "$REPEATS"); do
    run="set-p$pipeline-r$repeat"
    etcd_metrics >"$RESULTS_DIR/etcd-$run.before.json"
    run_bench etcd "$pipeline" "$repeat" \
      --target "etcd://127.0.0.1:$ETCD_CLIENT_PORT" --server-pid "$ETCD_PID"
    etcd_metrics >"$RESULTS_DIR/etcd-$run.after.json"
    tessera_log_stats >"$RESULTS_DIR/tessera-$run.before.json"
    run_bench tessera "$pipeline" "$repeat" \
      --endpoints "127.0.0.1:$TESSERA_PORT" --server-pid "$TESSERA_PID"
    tessera_log_stats >"$RESULTS_DIR/tessera-$run.after.json"
  done
done
probe_fsync after

python3 - "$RESULTS_DIR" "$REPEATS" "${PIPELINES[@]}" <<'EOF'
import json, os, statistics, sys

results, repeats = sys.argv[1], int(sys.argv[2])
pipelines = [int(text) for text in sys.argv[3:]]
def load(name):
    with open(os.path.join(results, name)) as handle:
        return json.load(handle)

def writes_per_sync(run):
    """Writes that shared one fdatasync during a run: log records per log sync for Tessera,
    committed proposals per WAL fsync for etcd."""
    before, after = load(f"{run}.before.json"), load(f"{run}.after.json")
    if run.startswith("tessera"):
        total = lambda stats, field: sum(core[field] for core in stats)
        writes = total(after, "log_record_count") - total(before, "log_record_count")
        syncs = total(after, "log_sync_count") - total(before, "log_sync_count")
    else:
        writes = after.get("proposals_committed", 0) - before.get("proposals_committed", 0)
        syncs = after.get("wal_fsync_count", 0) - before.get("wal_fsync_count", 0)
    return writes / syncs if syncs else None

def median_run(name, pipeline):
    """The run with the median rate (the lower middle one for an even count), and every rate."""
    runs = [(load(f"{name}-set-p{pipeline}-r{repeat}.json"), f"{name}-set-p{pipeline}-r{repeat}")
            for repeat in range(1, repeats + 1)]
    runs.sort(key=lambda run: run[0]["ops_per_sec"])
    return runs[(len(runs) - 1) // 2], [run[0]["ops_per_sec"] for run in runs]

first = load(f"etcd-set-p{pipelines[0]}-r1.json")
config = first["config"]
print(f"tessera-bench {first['git_revision']} on {first['machine']['cpus']} cpus "
      f"({first['machine']['cpu_model']}), kernel {first['machine']['kernel']}")
print(f"durable SET, {config['connections']} connections, {config['keys']} keys of "
      f"{config['key_size']} B, values of {config['value_size']} B, uniform, "
      f"{first['duration_secs']:.0f} s per run, {repeats} runs each (etcd and Tessera "
      "alternating), median shown; each server pinned to one CPU, the load generator to another")
for moment in ("before", "after"):
    path = os.path.join(results, f"fsync-{moment}.json")
    if os.path.exists(path):
        fsync = load(f"fsync-{moment}.json")
        print(f"data disk ({fsync['filesystem']}) {moment} the runs: fdatasync of a growing file "
              f"p50 {fsync['p50_us']:.0f} us, p99 {fsync['p99_us']:.0f} us over {fsync['count']} calls")
print()
header = (f"{'target':<8} {'pipe':>4} {'ops/s':>9} {'p50 us':>8} {'p99 us':>8} {'p99.9 us':>9} "
          f"{'srv us/op':>9} {'cli us/op':>9} {'cli busy':>8} {'writes/sync':>11} {'vs etcd':>8}")
print(header)
print("-" * len(header))
ratios = {}
for pipeline in pipelines:
    medians = {}
    for name in ("etcd", "tessera"):
        (row, run), rates = median_run(name, pipeline)
        medians[name] = row["ops_per_sec"]
        cpu = row.get("server_cpu_us_per_op")
        cpu_text = f"{cpu:9.1f}" if cpu is not None else f"{'-':>9}"
        per_sync = writes_per_sync(run)
        per_sync_text = f"{per_sync:11.1f}" if per_sync is not None else f"{'-':>11}"
        line = (f"{name:<8} {pipeline:>4} {row['ops_per_sec']:>9.0f} {row['p50_us']:>8.0f} "
                f"{row['p99_us']:>8.0f} {row['p999_us']:>9.0f} {cpu_text} "
                f"{row['client_cpu']['us_per_op']:>9.1f} {row['client_cpu']['cores_busy']:>8.2f} "
                f"{per_sync_text}")
        if name == "tessera":
            ratios[pipeline] = medians["tessera"] / medians["etcd"]
            line += f" {ratios[pipeline]:>7.2f}x"
        errors = sum(load(f"{name}-set-p{pipeline}-r{repeat}.json")["errors"]
                     for repeat in range(1, repeats + 1))
        if errors:
            line += f"  ({errors} errors)"
        print(line)
        if repeats > 1:
            print(f"{'':<14}rates of the {repeats} runs: "
                  + ", ".join(f"{rate:.0f}" for rate in rates))
    if repeats > 1:
        pairs = [load(f"tessera-set-p{pipeline}-r{repeat}.json")["ops_per_sec"]
                 / load(f"etcd-set-p{pipeline}-r{repeat}.json")["ops_per_sec"]
                 for repeat in range(1, repeats + 1)]
        print(f"{'':<14}tessera/etcd run by run: " + ", ".join(f"{pair:.1f}x" for pair in pairs))
if 1 in ratios:
    print()
    print(f"issue 4 target, Tessera >= 10x etcd's put rate at {config['connections']} clients, "
          f"pipeline 1 (medians): {ratios[1]:.1f}x, {'met' if ratios[1] >= 10 else 'not met'}")
EOF
