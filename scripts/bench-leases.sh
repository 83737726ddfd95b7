#!/usr/bin/env bash
# Lease keepalives per second with 10 000 leases, renewed in batches of 1000 and one at a time,
# against Tessera and (when it can be installed) etcd, in one run (issue 6).
#
#   scripts/bench-leases.sh            the comparison (under a minute once built)
#
# Settings come from the environment (see bench-common.sh for the shared ones):
#   DURATION_SECS (5)  SERVER_CPU (1)  LOAD_CPU (0)  RESULTS_DIR (target/bench-leases)
#   LEASES (10000)     BATCH (1000)    SESSIONS (10: tasks, each owning LEASES/SESSIONS leases)
#   BATCH1_PIPELINES ("1 16": keepalive calls in flight per session for the batch-1 runs; at 1
#     batch 1 has the same sessions and calls in flight as the batched run, at 16 it has the
#     concurrency that served it best here)
#   SERVER_CPUS (SERVER_CPU: CPUs of Tessera's two cores, as --cpus takes them)
#   ETCD (1: also drive etcd; 0 skips it)
#
# `tessera-server --cores 2 --durability memory` (both cores pinned to SERVER_CPUS) and, with
# ETCD=1, one etcd member (Debian's etcd-server, installed if `etcd` is missing, default
# settings, data directory under RESULTS_DIR) pinned to SERVER_CPU, both on free loopback
# ports, stopped by PID when the script ends. `tessera-bench --workload lease-keepalive`,
# pinned to LOAD_CPU, grants LEASES leases of 60 s before each window (outside it), renews
# them for DURATION_SECS from SESSIONS tasks, each renewing its slice BATCH ids per call, and
# revokes them afterwards. Tessera renews through `Client::keepalive` (one LeaseKeepalive
# request per home core per call); etcd through `etcd-client`, one LeaseKeepAlive stream per
# lease and one message per lease renewed. The table gives renewed leases/s, calls/s, p50/p99
# per call, server and client CPU per renewed lease, and the batch-BATCH/batch-1 ratio; raw
# results are JSON files in RESULTS_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/bench-common.sh
source scripts/bench-common.sh

RESULTS_DIR="${RESULTS_DIR:-target/bench-leases}"
LEASES="${LEASES:-10000}"
BATCH="${BATCH:-1000}"
SESSIONS="${SESSIONS:-10}"
read -r -a BATCH1_PIPELINES <<<"${BATCH1_PIPELINES:-1 16}"
SERVER_CPUS="${SERVER_CPUS:-$SERVER_CPU}"
ETCD="${ETCD:-1}"

build_for_etcd_comparison

cleanup_extra() { remove_data_dirs; }
stop_on_exit

start_tessera --durability memory

if [ "$ETCD" = 1 ]; then
  start_etcd
  say "$(etcd --version 2>&1 | sed -n 1p), pid $ETCD_PID; tessera-server pid $TESSERA_PID"
fi

# One measured run: run_bench NAME BATCH PIPELINE TARGET-FLAGS..., into NAME-bB-pP.json.
run_bench() {
  local name="$1" batch="$2" pipeline="$3"
  shift 3
  local run="$name-b$batch-p$pipeline"
  say "$name: $LEASES leases, batch $batch, $SESSIONS sessions, $pipeline in flight each"
  taskset -c "$LOAD_CPU" "$BIN/tessera-bench" "$@" --workload lease-keepalive \
    --leases "$LEASES" --batch "$batch" --connections "$SESSIONS" --pipeline "$pipeline" \
    --duration-secs "$DURATION_SECS" --json --quiet \
    >"$RESULTS_DIR/$run.json" 2>"$RESULTS_DIR/$run.stderr"
}

ROWS=("$BATCH 1")
for pipeline in "${BATCH1_PIPELINES[@]}"; do
  ROWS+=("1 $pipeline")
done
NAMES=(tessera)
if [ "$ETCD" = 1 ]; then
  NAMES+=(etcd)
fi
for row in "${ROWS[@]}"; do
  read -r batch pipeline <<<"$row"
  run_bench tessera "$batch" "$pipeline" \
    --endpoints "127.0.0.1:$TESSERA_PORT" --server-pid "$TESSERA_PID"
  if [ "$ETCD" = 1 ]; then
    run_bench etcd "$batch" "$pipeline" \
      --target "etcd://127.0.0.1:$ETCD_CLIENT_PORT" --server-pid "$ETCD_PID"
  fi
done

python3 - "$RESULTS_DIR" "$BATCH" "${NAMES[*]}" "${ROWS[@]}" <<'EOF'
import json, os, sys

results, batch_big, names = sys.argv[1], int(sys.argv[2]), sys.argv[3].split()
rows = [tuple(int(part) for part in row.split()) for row in sys.argv[4:]]
def load(name, batch, pipeline):
    with open(os.path.join(results, f"{name}-b{batch}-p{pipeline}.json")) as handle:
        return json.load(handle)

def cpu(value):
    return f"{value:9.3f}" if value is not None else f"{'-':>9}"

first = load("tessera", *rows[0])
config = first["config"]
print(f"tessera-bench {first['git_revision']} on {first['machine']['cpus']} cpus "
      f"({first['machine']['cpu_model']}), kernel {first['machine']['kernel']}")
print(f"{first['leases']} leases of {first['lease_ttl_secs']:.0f} s over {config['connections']} "
      f"sessions, {first['duration_secs']:.0f} s per run; tessera-server --cores 2 in memory and "
      f"etcd pinned to the server CPU, tessera-bench to another")
print("latency is per keepalive call; CPU is per renewed lease")
print()
header = (f"{'target':<8} {'batch':>5} {'pipe':>4} {'renewed/s':>10} {'calls/s':>8} "
          f"{'p50 us':>9} {'p99 us':>9} {'srv us/lease':>12} {'cli us/lease':>12} "
          f"{'lost':>5} {'errors':>6} {'grant s':>7}")
print(header)
print("-" * len(header))
for name in names:
    for batch, pipeline in rows:
        row = load(name, batch, pipeline)
        line = (f"{name:<8} {row['batch']:>5} {pipeline:>4} {row['ops_per_sec']:>10.0f} "
                f"{row['keepalive_calls_per_sec']:>8.0f} {row['p50_us']:>9.0f} "
                f"{row['p99_us']:>9.0f} {cpu(row.get('server_cpu_us_per_op')):>12} "
                f"{row['client_cpu']['us_per_op']:>12.3f} {row['leases_lost']:>5} "
                f"{row['errors']:>6} {row['grant_duration_secs']:>7.2f}")
        print(line)
print()
big = (batch_big, 1)
for name in names:
    batched = load(name, *big)["ops_per_sec"]
    ratios = [f"{batched / load(name, 1, pipeline)['ops_per_sec']:.1f}x (batch 1, pipe {pipeline})"
              for batch, pipeline in rows if batch == 1]
    print(f"{name}: batch {batch_big} / batch 1 renewed leases/s: " + ", ".join(ratios))
if "etcd" in names:
    for batch, pipeline in rows:
        ratio = load("tessera", batch, pipeline)["ops_per_sec"] / load("etcd", batch, pipeline)["ops_per_sec"]
        print(f"tessera / etcd at batch {batch}, pipe {pipeline}: {ratio:.1f}x")
else:
    print("no same-run peer: etcd was skipped, so only the batch ratio is shown")
EOF
