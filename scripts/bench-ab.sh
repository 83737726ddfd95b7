#!/usr/bin/env bash
# Point operations of the working tree against an older revision, alternating runs of the two
# in one sitting, so that a change's cost on the request path is measured against its own
# baseline on the same machine at the same time rather than against a table from another day.
#
#   scripts/bench-ab.sh REV            e.g. scripts/bench-ab.sh ab1c36f (a few minutes once built)
#
# Settings come from the environment (see bench-common.sh for the shared ones):
#   DURATION_SECS (5)  SERVER_CPU (1)  LOAD_CPU (0)  RESULTS_DIR (target/bench-ab)
#   ROUNDS (3: each round runs every workload against both revisions, base first then head,
#     the order swapped every other round)
#   PIPELINES ("1 16")  WORKLOADS ("get set")
#   BASE_SRC (RESULTS_DIR/base-src: where REV is checked out and built)
#
# REV is checked out (detached) in target/bench-ab/base-src and built there in release with a
# target directory of its own; the working tree is built as usual. Each revision's
# `tessera-server --cores 1 --durability memory` runs pinned to SERVER_CPU, one at a time, and
# is driven by its own `tessera-bench` (the handshake may differ between revisions) pinned to
# LOAD_CPU. The table gives, per workload and pipeline, each run's server CPU per op and
# throughput, their means, and head/base.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/bench-common.sh
source scripts/bench-common.sh

BASE_REV="${1:?usage: scripts/bench-ab.sh REV}"
RESULTS_DIR="${RESULTS_DIR:-target/bench-ab}"
ROUNDS="${ROUNDS:-3}"
PIPELINES="${PIPELINES:-1 16}"
WORKLOADS="${WORKLOADS:-get set}"
BASE_SRC="${BASE_SRC:-$RESULTS_DIR/base-src}"

mkdir -p "$RESULTS_DIR"
rm -f "$RESULTS_DIR"/*.json
base_commit=$(git rev-parse --verify "$BASE_REV^{commit}")
if [ ! -d "$BASE_SRC" ]; then
  git worktree add --detach "$BASE_SRC" "$base_commit" >/dev/null
else
  git -C "$BASE_SRC" checkout -q --detach "$base_commit"
fi
say "building $BASE_REV and the working tree (release)"
(cd "$BASE_SRC" && cargo build --release --locked -q -p tessera-server -p tessera-bench)
cargo build --release --locked -q -p tessera-server -p tessera-bench
declare -A BINS=([base]="$BASE_SRC/target/release" [head]=target/release)

stop_on_exit

# One run: run_side SIDE WORKLOAD PIPELINE ROUND. A fresh server for every run.
run_side() {
  local side="$1" workload="$2" pipeline="$3" round="$4" port pid
  port=$(free_port)
  "${BINS[$side]}/tessera-server" --cores 1 --cpus "$SERVER_CPU" --port "$port" \
    --durability memory >"$RESULTS_DIR/$side.log" 2>&1 &
  pid=$!
  PIDS+=("$pid")
  wait_for_port "$port" "$side server"
  say "round $round: $side $workload pipeline $pipeline"
  taskset -c "$LOAD_CPU" "${BINS[$side]}/tessera-bench" --endpoints "127.0.0.1:$port" \
    --server-pid "$pid" --workload "$workload" --pipeline "$pipeline" \
    --connections "$CONNECTIONS" --keys "$KEYS" --key-size "$KEY_SIZE" \
    --value-size "$VALUE_SIZE" --duration-secs "$DURATION_SECS" --json --quiet \
    >"$RESULTS_DIR/$side-$workload-p$pipeline-r$round.json" 2>/dev/null
  kill "$pid"
  wait "$pid" 2>/dev/null || true
}

for round in $(seq 1 "$ROUNDS"); do
  order="base head"
  if [ $((round % 2)) = 0 ]; then
    order="head base"
  fi
  for workload in $WORKLOADS; do
    for pipeline in $PIPELINES; do
      for side in $order; do
        run_side "$side" "$workload" "$pipeline" "$round"
      done
    done
  done
done

python3 - "$RESULTS_DIR" "$BASE_REV" "$ROUNDS" "$WORKLOADS" "$PIPELINES" <<'EOF'
import json, os, statistics, sys

results, base_rev, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
workloads, pipelines = sys.argv[4].split(), [int(p) for p in sys.argv[5].split()]
def load(side, workload, pipeline, round_):
    with open(os.path.join(results, f"{side}-{workload}-p{pipeline}-r{round_}.json")) as handle:
        return json.load(handle)

head = load("head", workloads[0], pipelines[0], 1)
print(f"base {base_rev} against the working tree ({head['git_revision']}), {rounds} rounds "
      f"alternating, {head['duration_secs']:.0f} s per run, one core each, pinned")
print()
print(f"{'workload':<6} {'pipe':>4}  {'side':<5} {'server us/op per round':<28} {'mean':>6} "
      f"{'ops/s mean':>11}  head/base cpu")
for workload in workloads:
    for pipeline in pipelines:
        means = {}
        for side in ("base", "head"):
            rows = [load(side, workload, pipeline, r) for r in range(1, rounds + 1)]
            cpus = [row["server_cpu_us_per_op"] for row in rows]
            means[side] = statistics.mean(cpus)
            rates = statistics.mean(row["ops_per_sec"] for row in rows)
            errors = sum(row["errors"] for row in rows)
            line = (f"{workload:<6} {pipeline:>4}  {side:<5} "
                    f"{' '.join(f'{cpu:.3f}' for cpu in cpus):<28} {means[side]:>6.3f} "
                    f"{rates:>11.0f}")
            if side == "head":
                line += f"  {means['head'] / means['base']:.3f}x"
            if errors:
                line += f"  ({errors} errors)"
            print(line)
EOF
