#!/usr/bin/env bash
# Lock acquire/release pairs per second, uncontended (each of 50 sessions on its own lock) and
# with 50 contenders on one lock, against Tessera and (when it can be installed) etcd, in one
# run (issue 6).
#
#   scripts/bench-locks.sh             the comparison (under a minute once built)
#
# Settings come from the environment (see bench-common.sh for the shared ones):
#   DURATION_SECS (5)  SERVER_CPU (1)  LOAD_CPU (0)  RESULTS_DIR (target/bench-locks)
#   CONTENDERS (50: sessions, each with its own lease, in both modes)
#   SERVER_CPUS (SERVER_CPU: CPUs of Tessera's two cores, as --cpus takes them)
#   DURABILITY (memory: Tessera's --durability; `sync` logs every grant and release and
#     acknowledges after fdatasync, as etcd commits every Lock and Unlock; its log goes under
#     RESULTS_DIR/data)
#   ETCD (1: also drive etcd; 0 skips it)
#
# `tessera-server --cores 2 --durability DURABILITY` (both cores pinned to SERVER_CPUS) and, with
# ETCD=1, one etcd member (Debian's etcd-server, installed if `etcd` is missing, default
# settings, data directory under RESULTS_DIR) pinned to SERVER_CPU, both on free loopback
# ports, stopped by PID when the script ends. `tessera-bench --workload lock`, pinned to
# LOAD_CPU, opens CONTENDERS sessions before each window (outside it), each holding a lease of
# 60 s renewed in the background, then each loops lock (waiting up to 10 s) and unlock for
# DURATION_SECS: `--lock-names per-session` (every session its own lock name: nobody waits)
# and `--lock-names one` (all on one name). Tessera's sessions share one `Client` and call
# `Client::lock`/`Client::unlock`; etcd's each have their own `etcd-client` connection and
# call the v3 lock service (`Lock`/`Unlock`). The table gives pairs/s, acquire p50/p99 (ask to
# grant), pair p50, server and client CPU per pair, the overlaps and token violations the
# bench saw (both must be 0), and the Tessera/etcd and contended/uncontended ratios; raw
# results are JSON files in RESULTS_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/bench-common.sh
source scripts/bench-common.sh

RESULTS_DIR="${RESULTS_DIR:-target/bench-locks}"
CONTENDERS="${CONTENDERS:-50}"
SERVER_CPUS="${SERVER_CPUS:-$SERVER_CPU}"
DURABILITY="${DURABILITY:-memory}"
ETCD="${ETCD:-1}"

build_for_etcd_comparison

cleanup_extra() { remove_data_dirs; }
stop_on_exit

mkdir -p "$RESULTS_DIR/data"
TESSERA_DIR=$(mktemp -d "$(cd "$RESULTS_DIR/data" && pwd)/tessera.XXXXXX")
DATA_DIRS+=("$TESSERA_DIR")
start_tessera --durability "$DURABILITY" --data-dir "$TESSERA_DIR"

if [ "$ETCD" = 1 ]; then
  start_etcd
  say "$(etcd --version 2>&1 | sed -n 1p), pid $ETCD_PID; tessera-server pid $TESSERA_PID"
fi

# One measured run: run_bench NAME LOCK-NAMES TARGET-FLAGS..., into NAME-LOCK-NAMES.json.
run_bench() {
  local name="$1" lock_names="$2"
  shift 2
  local run="$name-$lock_names"
  say "$name: $CONTENDERS contenders, --lock-names $lock_names"
  taskset -c "$LOAD_CPU" "$BIN/tessera-bench" "$@" --workload lock \
    --contenders "$CONTENDERS" --lock-names "$lock_names" \
    --duration-secs "$DURATION_SECS" --json --quiet \
    >"$RESULTS_DIR/$run.json" 2>"$RESULTS_DIR/$run.stderr"
}

MODES=(per-session one)
NAMES=(tessera)
if [ "$ETCD" = 1 ]; then
  NAMES+=(etcd)
fi
for mode in "${MODES[@]}"; do
  run_bench tessera "$mode" --endpoints "127.0.0.1:$TESSERA_PORT" --server-pid "$TESSERA_PID"
  if [ "$ETCD" = 1 ]; then
    run_bench etcd "$mode" --target "etcd://127.0.0.1:$ETCD_CLIENT_PORT" --server-pid "$ETCD_PID"
  fi
done

python3 - "$RESULTS_DIR" "$DURABILITY" "${NAMES[*]}" "${MODES[@]}" <<'EOF'
import json, os, sys

results, durability, names, modes = sys.argv[1], sys.argv[2], sys.argv[3].split(), sys.argv[4:]
def load(name, mode):
    with open(os.path.join(results, f"{name}-{mode}.json")) as handle:
        return json.load(handle)

def cpu(value):
    return f"{value:.1f}" if value is not None else "-"

first = load("tessera", modes[0])
print(f"tessera-bench {first['git_revision']} on {first['machine']['cpus']} cpus "
      f"({first['machine']['cpu_model']}), kernel {first['machine']['kernel']}")
print(f"{first['contenders']} contenders, a lease of {first['lease_ttl_secs']:.0f} s each, "
      f"{first['duration_secs']:.0f} s per run; tessera-server --cores 2 --durability "
      f"{durability} and etcd pinned to the server CPU, tessera-bench to another")
print("acquire: ask to grant; pair: ask to unlocked; CPU is per pair")
print()
header = (f"{'target':<8} {'locks':<11} {'pairs/s':>8} {'acq p50 us':>10} {'acq p99 us':>10} "
          f"{'pair p50 us':>11} {'srv us/pair':>11} {'cli us/pair':>11} {'overlaps':>8} "
          f"{'token viol':>10} {'timeouts':>8} {'errors':>6}")
print(header)
print("-" * len(header))
for name in names:
    for mode in modes:
        row = load(name, mode)
        print(f"{name:<8} {mode:<11} {row['ops_per_sec']:>8.0f} {row['acquire_p50_us']:>10.0f} "
              f"{row['acquire_p99_us']:>10.0f} {row['p50_us']:>11.0f} "
              f"{cpu(row.get('server_cpu_us_per_op')):>11} "
              f"{row['client_cpu']['us_per_op']:>11.1f} {row['overlaps']:>8} "
              f"{row['token_violations']:>10} {row['lock_timeouts']:>8} {row['errors']:>6}")
print()
for name in names:
    ratio = load(name, "one")["ops_per_sec"] / load(name, "per-session")["ops_per_sec"]
    print(f"{name}: one lock / per-session pairs/s: {ratio:.2f}x")
if "etcd" in names:
    for mode in modes:
        ratio = load("tessera", mode)["ops_per_sec"] / load("etcd", mode)["ops_per_sec"]
        print(f"tessera / etcd pairs/s, {mode}: {ratio:.1f}x")
else:
    print("no same-run peer: etcd was skipped, so only the contention ratio is shown")
bad = [(name, mode) for name in names for mode in modes
       if load(name, mode)["overlaps"] or load(name, mode)["token_violations"]]
if bad:
    print(f"LOCK CHECKS FAILED: overlaps or token violations in {bad}")
    sys.exit(1)
EOF
