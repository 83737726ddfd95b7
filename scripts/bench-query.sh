#!/usr/bin/env bash
# The figures of secondary indexes and queries (issue 8), all through tessera-bench:
#   1. query latency with an index and by a scan, for 0.01%, 1% and 10% of KEYS entries
#      matching (counts: every match is found), and the same for pages of 100;
#   2. the write throughput cost of keeping 1 and 3 indexes, against none in the same
#      rounds (the peer);
#   3. point-operation latency while an index is built over every key, against the same
#      load without a build just before (an open loop at BUILD_RATE, so the core has room
#      and the figure is the build's interference, not queueing at saturation).
#
#   scripts/bench-query.sh             (about 8 minutes once built)
#
# Settings come from the environment:
#   KEYS (1000000)  CORES (1)  DURATION_SECS (5)  ROUNDS (3)  QUERY_SESSIONS (1: the
#   latency of one query at a time; more sessions queue on the core)
#   DURABILITY (memory)  BUILD_RATE (10000 gets/s, open loop, during and before the build)
#   PARTS ("query write build")  RESULTS_DIR (target/bench-query)
#
# The server runs on SERVER_CPU with CORES cores, the load generator on LOAD_CPU. Every
# key carries the fields p10000, p100 and p10 (its index modulo 10000, 100, 10). Results:
# one JSON per run in RESULTS_DIR, and RESULTS_DIR/summary.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
# Before bench-common.sh, which would set its own default.
KEYS="${KEYS:-1000000}"
# shellcheck source=scripts/bench-common.sh
source scripts/bench-common.sh

CORES="${CORES:-1}"
ROUNDS="${ROUNDS:-3}"
QUERY_SESSIONS="${QUERY_SESSIONS:-1}"
DURABILITY="${DURABILITY:-memory}"
BUILD_RATE="${BUILD_RATE:-10000}"
# Which parts to run: any of query, write, build (the summary reads what the runs left).
PARTS="${PARTS:-query write build}"
has_part() { [[ " $PARTS " == *" $1 "* ]]; }
RESULTS_DIR="${RESULTS_DIR:-target/bench-query}"

build_release
for part in $PARTS; do rm -f "$RESULTS_DIR/$part"-*.json; done
DATA_DIR=$(mktemp -d)
cleanup_extra() { rm -rf "$DATA_DIR"; }
stop_on_exit

TESSERA_PORT=$(free_port)
taskset -c "$SERVER_CPU" "$BIN/tessera-server" --cores "$CORES" --port "$TESSERA_PORT" \
  --durability "$DURABILITY" --data-dir "$DATA_DIR" --instance-dir "$DATA_DIR/instances" \
  >"$RESULTS_DIR/tessera.log" 2>&1 &
PIDS+=($!)
wait_for_port "$TESSERA_PORT" tessera

bench() {
  local name="$1"
  shift
  taskset -c "$LOAD_CPU" "$BIN/tessera-bench" --endpoints "127.0.0.1:$TESSERA_PORT" \
    --keys "$KEYS" --key-size "$KEY_SIZE" --value-size "$VALUE_SIZE" --json --quiet "$@" \
    >"$RESULTS_DIR/$name.json" 2>"$RESULTS_DIR/$name.stderr"
}

say "loading $KEYS keys with fields"
bench preload --workload set --fields --preload yes --duration-secs 0.5 --connections 16 \
  --pipeline 16 --indexes 0

for count in $(has_part query && echo --query-count page); do
  [ "$count" = page ] && count=""
  mode=${count:+count}
  mode=${mode:-page}
  for field in p10000 p100 p10; do
    for access in index scan; do
      say "query $field by $access ($mode)"
      bench "query-$mode-$field-$access" --workload query --preload no --query-field "$field" \
        --query-access "$access" $count --connections "$QUERY_SESSIONS" \
        --duration-secs "$DURATION_SECS"
    done
  done
done

for round in $(has_part write && seq 1 "$ROUNDS"); do
  for indexes in 0 1 3; do
    say "round $round: writes keeping $indexes indexes"
    bench "write-$round-$indexes" --workload set --fields --preload no --indexes "$indexes" \
      --connections "$CONNECTIONS" --pipeline 16 --duration-secs "$DURATION_SECS"
  done
done

for round in $(has_part build && seq 1 "$ROUNDS"); do
  say "round $round: gets while an index is built over $KEYS keys"
  bench "build-$round" --workload get --preload no --indexes 0 --index-build --connections 16 \
    --rate "$BUILD_RATE" --duration-secs "$((DURATION_SECS * 4))"
done

python3 - "$RESULTS_DIR" "$KEYS" "$ROUNDS" <<'EOF' | tee "$RESULTS_DIR/summary.txt"
import json, statistics, sys

results, keys, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
def load(name):
    with open(f"{results}/{name}.json") as handle:
        return json.load(handle)

for mode in ["count", "page"]:
    print(f"query latency, {mode}s, {keys} entries: p50 / p99 ms (queries/s), examined per query")
    print(f"| selectivity | index | scan | scan / index p50 |")
    print(f"|---|---|---|---|")
    for field, share in [("p10000", "0.01%"), ("p100", "1%"), ("p10", "10%")]:
        cells = []
        p50 = {}
        for access in ["index", "scan"]:
            run = load(f"query-{mode}-{field}-{access}")
            query = run["query"]
            assert query["access"] == access and query["wrong_answers"] == 0, (field, access, query)
            p50[access] = run["p50_us"]
            cells.append(f"{run['p50_us']/1000:.2f} / {run['p99_us']/1000:.2f} "
                         f"({run['ops_per_sec']:.0f}/s), {query['examined_per_query']:.0f}")
        print(f"| {share} | {cells[0]} | {cells[1]} | {p50['scan']/p50['index']:.1f}x |")
    print()

print("write throughput keeping indexes (ratio to none, same round), server CPU per write")
print("| indexes | ops/s per round | ratio to 0 (median) | server µs/op (median) |")
print("|---|---|---|---|")
for indexes in [0, 1, 3]:
    runs = [load(f"write-{r}-{indexes}") for r in range(1, rounds + 1)]
    bases = [load(f"write-{r}-0") for r in range(1, rounds + 1)]
    ratios = [run["ops_per_sec"] / base["ops_per_sec"] for run, base in zip(runs, bases)]
    cpu = [run["server_cpu_us_per_op"] for run in runs if run.get("server_cpu_us_per_op")]
    rates = ", ".join("%.0f" % run["ops_per_sec"] for run in runs)
    median_cpu = statistics.median(cpu) if cpu else float("nan")
    print(f"| {indexes} | {rates} | {statistics.median(ratios):.3f} | {median_cpu:.2f} |")
print()

print(f"gets at a fixed rate while an index is built over {keys} keys, against the same load")
print("just before with no build")
print("| round | build s | idle p50 / p99 µs | building p50 / p99 µs | p99 ratio |")
print("|---|---|---|---|---|")
ratios = []
for r in range(1, rounds + 1):
    build = load(f"build-{r}")
    info = build["index_build"]
    ratios.append(info["p99_ratio"])
    late = "" if info["finished_within_window"] else " (after the window)"
    print(f"| {r} | {info['build_secs']:.2f}{late} | {info['idle']['p50_us']:.0f} / "
          f"{info['idle']['p99_us']:.0f} | {build['p50_us']:.0f} / {build['p99_us']:.0f} | "
          f"{info['p99_ratio']:.2f}x |")
print(f"median p99 ratio {statistics.median(ratios):.2f}x (target: within 2x)")
EOF
