#!/usr/bin/env bash
# Stops exactly what scripts/cluster-up.sh started: each pid in the run directory's pid files
# that is still that instance's server (checked against /proc/PID/cmdline, so a reused pid is
# never signalled) gets SIGTERM; whatever has not exited after TESSERA_CLUSTER_STOP_S seconds
# (default 10) gets SIGKILL. Pid files are removed. Safe to run when nothing runs.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/cluster-common.sh
source scripts/cluster-common.sh

stop_seconds_max="${TESSERA_CLUSTER_STOP_S:-10}"
if [ ! -d "$cluster_dir" ]; then
  echo "cluster-down: nothing to stop ($cluster_dir does not exist)"
  exit 0
fi
run_dir="$(realpath "$cluster_dir")"

pids=()
configs=()
for name in $(cluster_names); do
  pid_file="$run_dir/$name.pid"
  [ -f "$pid_file" ] || continue
  pid="$(cat "$pid_file")"
  if [[ "$pid" =~ ^[0-9]+$ ]] && cluster_is_ours "$pid" "$run_dir/$name.toml"; then
    kill -TERM "$pid" 2>/dev/null || true
    pids+=("$pid")
    configs+=("$run_dir/$name.toml")
  else
    echo "cluster-down: $name (pid $pid) is not running"
    rm -f "$pid_file"
  fi
done

deadline=$((SECONDS + stop_seconds_max))
for index in "${!pids[@]}"; do
  while cluster_is_ours "${pids[index]}" "${configs[index]}" && [ "$SECONDS" -lt "$deadline" ]; do
    sleep 0.1
  done
done
for name in $(cluster_names); do
  pid_file="$run_dir/$name.pid"
  [ -f "$pid_file" ] || continue
  pid="$(cat "$pid_file")"
  if cluster_is_ours "$pid" "$run_dir/$name.toml"; then
    echo "cluster-down: $name (pid $pid) still running after ${stop_seconds_max}s; SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$pid_file"
done
echo "cluster-down: stopped ${#pids[@]} instances in $run_dir"
