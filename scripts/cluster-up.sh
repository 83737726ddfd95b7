#!/usr/bin/env bash
# Starts a local cluster: three loopback "hosts" (127.0.0.1, .2, .3) with two instances
# each, one core per instance, six cluster nodes in all. Writes every instance's config and
# the shared cluster.toml into the run directory, starts each server in the background
# (pid in <name>.pid, log in <name>.log), waits until every core answers a ping, and prints
# `TESSERA_ENDPOINTS=...` as its last line:
#
#   eval "$(scripts/cluster-up.sh | tail -n 1)"; export TESSERA_ENDPOINTS
#   cargo run -p tessera-client --bin tessera -- ping
#   scripts/cluster-down.sh
#
# Each loopback host stands for a machine of its own, with its own instance registry
# (instance_dir), so only the two instances of one host are checked against each other.
# Settings: see scripts/cluster-common.sh. Running it again while the cluster runs prints the
# endpoints again; a cluster that is partly running must be stopped first.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/cluster-common.sh
source scripts/cluster-common.sh

base_port="${TESSERA_BASE_PORT:-17000}"
durability="${TESSERA_CLUSTER_DURABILITY:-memory}"
profile="${TESSERA_CLUSTER_PROFILE:-debug}"
read -r -a cpus <<<"${TESSERA_CLUSTER_CPUS:-0 1}"
# Longest the cluster may take to answer, in seconds.
wait_seconds_max="${TESSERA_CLUSTER_WAIT_S:-60}"

[[ "$base_port" =~ ^[0-9]+$ ]] && [ "$base_port" -ge 1024 ] && [ "$base_port" -le 63000 ] ||
  cluster_fail "TESSERA_BASE_PORT=$base_port is not a port in 1024..63000 (+2001 must fit)"
case "$durability" in memory | async | sync) ;; *)
  cluster_fail "TESSERA_CLUSTER_DURABILITY=$durability is not memory, async or sync" ;;
esac
case "$profile" in debug | release) ;; *)
  cluster_fail "TESSERA_CLUSTER_PROFILE=$profile is not debug or release" ;;
esac
[ "${#cpus[@]}" -eq 2 ] || cluster_fail "TESSERA_CLUSTER_CPUS needs two CPUs, got '${cpus[*]}'"

mapfile -t names < <(cluster_names)
endpoints=()
for name in "${names[@]}"; do
  host_index="${name:1:1}"
  slot_index=0; [ "${name: -1}" = b ] && slot_index=1
  endpoints+=("${cluster_hosts[host_index - 1]}:$((base_port + slot_index))")
done
endpoints_line="TESSERA_ENDPOINTS=$(IFS=,; echo "${endpoints[*]}")"

# Already running? All of it: say so and print the endpoints. Part of it: refuse.
running=0
for name in "${names[@]}"; do
  pid_file="$cluster_dir/$name.pid"
  [ -f "$pid_file" ] || continue
  if cluster_is_ours "$(cat "$pid_file")" "$(realpath "$cluster_dir")/$name.toml"; then
    running=$((running + 1))
  else
    rm -f "$pid_file" # its process is gone
  fi
done
if [ "$running" -eq "${#names[@]}" ]; then
  echo "cluster-up: already running in $cluster_dir"
  echo "$endpoints_line"
  exit 0
elif [ "$running" -gt 0 ]; then
  cluster_fail "$running of ${#names[@]} instances are running in $cluster_dir; run scripts/cluster-down.sh first"
fi

# Every port must be free: client and admin (TCP), peer (UDP), on each host or a wildcard.
taken=()
listening_tcp="$(ss -Htln 2>/dev/null | awk '{print $4}')"
listening_udp="$(ss -Huln 2>/dev/null | awk '{print $4}')"
port_taken() { # $1 listing, $2 host, $3 port
  grep -qxE "(${2//./\\.}|0\.0\.0\.0|\*|\[::\]|\[::ffff:${2//./\\.}\]):$3" <<<"$1"
}
for host in "${cluster_hosts[@]}"; do
  for slot_index in 0 1; do
    port=$((base_port + slot_index))
    for tcp_port in "$port" "$((port + 1000))"; do
      if port_taken "$listening_tcp" "$host" "$tcp_port"; then taken+=("tcp $host:$tcp_port"); fi
    done
    if port_taken "$listening_udp" "$host" "$((port + 2000))"; then
      taken+=("udp $host:$((port + 2000))")
    fi
  done
done
if [ "${#taken[@]}" -gt 0 ]; then
  cluster_fail "ports in use: ${taken[*]}; pick other ports with TESSERA_BASE_PORT"
fi

# The binaries.
profile_flag=(); [ "$profile" = release ] && profile_flag=(--release)
if [ -z "${TESSERA_SERVER_BIN:-}" ] || [ -z "${TESSERA_CLI_BIN:-}" ]; then
  cargo build --quiet "${profile_flag[@]}" -p tessera-server --bin tessera-server \
    -p tessera-client --bin tessera
fi
server_bin="$(realpath "${TESSERA_SERVER_BIN:-target/$profile/tessera-server}")"
cli_bin="$(realpath "${TESSERA_CLI_BIN:-target/$profile/tessera}")"
[ -x "$server_bin" ] || cluster_fail "no server binary at $server_bin"
[ -x "$cli_bin" ] || cluster_fail "no CLI binary at $cli_bin"

# The configs.
mkdir -p "$cluster_dir"
run_dir="$(realpath "$cluster_dir")"
{
  echo "# The local cluster, written by scripts/cluster-up.sh."
  echo "epoch = 1"
  echo "heartbeat_interval_ms = 100"
  echo "failure_timeout_ms = 1000"
  node_id=0
  for name in "${names[@]}"; do
    node_id=$((node_id + 1))
    host_index="${name:1:1}"
    slot_index=0; [ "${name: -1}" = b ] && slot_index=1
    printf '\n[[nodes]]\nid = %d\nname = "%s"\nhost = "%s"\nport = %d\ncores = 1\n' \
      "$node_id" "$name" "${cluster_hosts[host_index - 1]}" "$((base_port + slot_index))"
  done
} >"$run_dir/cluster.toml"
node_id=0
for name in "${names[@]}"; do
  node_id=$((node_id + 1))
  host_index="${name:1:1}"
  slot_index=0; [ "${name: -1}" = b ] && slot_index=1
  cat >"$run_dir/$name.toml" <<CONFIG
# Instance $name of the local cluster, written by scripts/cluster-up.sh.
name = "$name"
node_id = $node_id
host = "${cluster_hosts[host_index - 1]}"
port = $((base_port + slot_index))
cores = 1
cpus = [${cpus[slot_index]}]
durability = "$durability"
data_dir = "$run_dir/data/$name"
memory_bytes_max = 67108864
log_target = "file:$run_dir/$name.log"
instance_dir = "$run_dir/instances/${cluster_hosts[host_index - 1]}"
cluster_file = "cluster.toml"
CONFIG
done

# Start every instance with nothing but its config: no TESSERA_* setting of this shell.
clean_env=(env)
while IFS='=' read -r variable _; do
  [[ "$variable" == TESSERA_* ]] && clean_env+=(-u "$variable")
done < <(env)
for name in "${names[@]}"; do
  config="$run_dir/$name.toml"
  # Startup errors (before logging starts) land in the same file as the log.
  "${clean_env[@]}" "$server_bin" --config "$config" >>"$run_dir/$name.log" 2>&1 &
  echo "$!" >"$run_dir/$name.pid"
done

# Wait until every core of every node answers; fail at once if an instance died.
deadline=$((SECONDS + wait_seconds_max))
until "${clean_env[@]}" "$cli_bin" --endpoints "$(IFS=,; echo "${endpoints[*]}")" ping >/dev/null 2>&1; do
  for name in "${names[@]}"; do
    pid="$(cat "$run_dir/$name.pid")"
    # An exited child stays a zombie until this shell ends, with an empty command line.
    if ! cluster_is_ours "$pid" "$run_dir/$name.toml"; then
      tail -n 5 "$run_dir/$name.log" >&2 || true
      cluster_fail "instance $name (pid $pid) exited; its log is $run_dir/$name.log; stop the rest with scripts/cluster-down.sh"
    fi
  done
  if [ "$SECONDS" -ge "$deadline" ]; then
    cluster_fail "the cluster did not answer within ${wait_seconds_max}s; logs in $run_dir; stop it with scripts/cluster-down.sh"
  fi
  sleep 0.2
done
echo "cluster-up: ${#names[@]} instances serving; configs, pids and logs in $run_dir"
echo "$endpoints_line"
