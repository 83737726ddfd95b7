#!/usr/bin/env bash
# Throughput of a local cluster of 1, 2 and 3 instances (each one core, all on one machine, so
# they share its CPUs), with Redis as the peer measured in the same run, and the client
# library's CPU per request with routing over 1 and 3 instances (issue 7).
#
#   scripts/bench-cluster.sh           the whole run (about three minutes once built)
#
# Settings come from the environment (see bench-common.sh for the shared ones):
#   DURATION_SECS (5)  SERVER_CPU (1)  LOAD_CPU (0)  RESULTS_DIR (target/bench-cluster)
#   INSTANCES ("1 2 3": the cluster sizes to measure)
#
# For each size N, N `tessera-server` instances form one cluster (a shared cluster file, nodes
# 1..N on free loopback ports, one core each, durability memory), all pinned to SERVER_CPU, so
# the servers of every size have the same CPU to share: what changes is how the keys are
# split. (Each instance gets a registry directory of its own, since the shared one refuses
# a second instance on the same CPU, which is the point here.) `tessera-bench`, pinned to LOAD_CPU, is given the first instance only, fetches the
# topology from it and sends every request to the owning instance: the `raw` driver (the
# io_uring load generator with the client's routing and codec) for get and set at pipeline 1
# and 16, and the `client` driver (the full async client, one `Client` shared by every
# session) for get at pipeline 1, whose client CPU per request is the routing client's cost.
# Redis is run on SERVER_CPU with the same raw load. Server CPU is the sum over every
# instance's process. Raw results are JSON files in RESULTS_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/bench-common.sh
source scripts/bench-common.sh

RESULTS_DIR="${RESULTS_DIR:-target/bench-cluster}"
INSTANCES="${INSTANCES:-1 2 3}"

ensure_package redis-server redis-server
build_release
rm -f "$RESULTS_DIR"/*.json "$RESULTS_DIR"/*.toml

stop_on_exit

# One measured run: run_bench NAME WORKLOAD PIPELINE DRIVER-AND-TARGET-FLAGS...
run_bench() {
  local name="$1" workload="$2" pipeline="$3"
  shift 3
  say "$name $workload pipeline $pipeline"
  taskset -c "$LOAD_CPU" "$BIN/tessera-bench" "$@" \
    --workload "$workload" --pipeline "$pipeline" --connections "$CONNECTIONS" \
    --keys "$KEYS" --key-size "$KEY_SIZE" --value-size "$VALUE_SIZE" \
    --duration-secs "$DURATION_SECS" --json --quiet \
    >"$RESULTS_DIR/$name-$workload-p$pipeline.json" 2>"$RESULTS_DIR/$name-$workload-p$pipeline.stderr"
}

REDIS_PORT=$(free_port)
taskset -c "$SERVER_CPU" redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" \
  --appendonly no --daemonize no --logfile "$RESULTS_DIR/redis.log" &
PIDS+=($!)
REDIS_PID=$!
wait_for_port "$REDIS_PORT" redis
for workload in get set; do
  for pipeline in 1 16; do
    run_bench redis "$workload" "$pipeline" --target "redis://127.0.0.1:$REDIS_PORT" \
      --server-pid "$REDIS_PID"
  done
done
kill "$REDIS_PID"
wait "$REDIS_PID" 2>/dev/null || true

for count in $INSTANCES; do
  cluster_file="$RESULTS_DIR/cluster-$count.toml"
  ports=()
  peer_ports=()
  {
    echo "epoch = 1"
    for node in $(seq 1 "$count"); do
      port=$(free_port)
      peer_port=$(free_port)
      ports+=("$port")
      peer_ports+=("$peer_port")
      printf '\n[[nodes]]\nid = %s\nname = "n%s"\nhost = "127.0.0.1"\nport = %s\ncores = 1\npeer_port = %s\n' \
        "$node" "$node" "$port" "$peer_port"
    done
  } >"$cluster_file"
  instance_pids=()
  for node in $(seq 1 "$count"); do
    "$BIN/tessera-server" --name "n$node" --node-id "$node" --cores 1 --cpus "$SERVER_CPU" \
      --port "${ports[$((node - 1))]}" --peer-port "${peer_ports[$((node - 1))]}" \
      --admin-port 0 --durability memory --cluster-file "$cluster_file" \
      --instance-dir "$RESULTS_DIR/registry-n$node" \
      >"$RESULTS_DIR/tessera-$count-n$node.log" 2>&1 &
    PIDS+=($!)
    instance_pids+=(--server-pid "$!")
  done
  for node in $(seq 1 "$count"); do
    wait_for_port "${ports[$((node - 1))]}" "instance n$node of $count"
  done
  endpoints="127.0.0.1:${ports[0]}"
  for workload in get set; do
    for pipeline in 1 16; do
      run_bench "tessera-$count" "$workload" "$pipeline" --endpoints "$endpoints" \
        "${instance_pids[@]}"
    done
  done
  run_bench "client-$count" get 1 --driver client --endpoints "$endpoints" "${instance_pids[@]}"
  for pid in "${instance_pids[@]}"; do
    if [ "$pid" != --server-pid ]; then
      kill "$pid"
      wait "$pid" 2>/dev/null || true
    fi
  done
done

python3 - "$RESULTS_DIR" "$INSTANCES" <<'EOF'
import json, os, sys

results, sizes = sys.argv[1], [int(size) for size in sys.argv[2].split()]
def load(name, workload, pipeline):
    with open(os.path.join(results, f"{name}-{workload}-p{pipeline}.json")) as handle:
        return json.load(handle)

first = load(f"tessera-{sizes[0]}", "get", 1)
config = first["config"]
print(f"tessera-bench {first['git_revision']} on {first['machine']['cpus']} cpus "
      f"({first['machine']['cpu_model']}), kernel {first['machine']['kernel']}")
print(f"{config['connections']} sessions, {config['keys']} keys of {config['key_size']} B, "
      f"values of {config['value_size']} B, {first['duration_secs']:.0f} s per run; every "
      "server process pinned to one shared CPU, the load generator to another")
print()
header = (f"{'workload':<6} {'pipe':>4}  {'target':<12} {'ops/s':>10} {'p50 us':>7} "
          f"{'p99 us':>7} {'srv us/op':>9} {'vs redis':>8} {'vs 1 inst':>9}")
print(header)
print("-" * len(header))
for workload in ("get", "set"):
    for pipeline in (1, 16):
        redis = load("redis", workload, pipeline)
        single = load(f"tessera-{sizes[0]}", workload, pipeline)
        rows = [("redis", redis)] + [
            (f"tessera x{size}", load(f"tessera-{size}", workload, pipeline)) for size in sizes
        ]
        for name, row in rows:
            cpu = row.get("server_cpu_us_per_op")
            cpu_text = f"{cpu:9.2f}" if cpu is not None else f"{'-':>9}"
            line = (f"{workload:<6} {pipeline:>4}  {name:<12} {row['ops_per_sec']:>10.0f} "
                    f"{row['p50_us']:>7.0f} {row['p99_us']:>7.0f} {cpu_text}")
            if name != "redis":
                line += (f" {row['ops_per_sec'] / redis['ops_per_sec']:>7.2f}x"
                         f" {row['ops_per_sec'] / single['ops_per_sec']:>8.2f}x")
            if row["errors"]:
                line += f"  ({row['errors']} errors)"
            print(line)
print()
print("the client library (get, pipeline 1), client CPU per request with routing:")
for size in sizes:
    row = load(f"client-{size}", "get", 1)
    print(f"  {size} instance(s): {row['ops_per_sec']:>8.0f} ops/s, client "
          f"{row['client_cpu']['us_per_op']:.2f} us/op, server "
          f"{row.get('server_cpu_us_per_op') or 0:.2f} us/op"
          + (f"  ({row['errors']} errors)" if row["errors"] else ""))
EOF
