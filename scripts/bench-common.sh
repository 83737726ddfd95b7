# Helpers the comparison scripts share (sourced by bench-vs-redis.sh, bench-vs-etcd.sh and the
# other scripts/bench-*.sh, never run): messages, installing a Debian package, free loopback ports, waiting for a
# server, and stopping every server a script started, whatever ends the script.
#
# A script adds each server's PID to PIDS as it starts it, and calls `stop_on_exit` once:
# on exit, Ctrl-C or SIGTERM every PID in PIDS is sent SIGTERM and waited for, then the
# script's own `cleanup_extra` (if it defines one) runs.

say() { printf '==> %s\n' "$*" >&2; }

# The workload and placement every comparison shares, from the environment or these defaults.
DURATION_SECS="${DURATION_SECS:-5}"
CONNECTIONS="${CONNECTIONS:-50}"
KEYS="${KEYS:-100000}"
KEY_SIZE="${KEY_SIZE:-16}"
VALUE_SIZE="${VALUE_SIZE:-32}"
# The servers' admin endpoints on any free port: the default, `--port` + 1000, is not checked
# free by `free_port` (a script that scrapes passes `--admin-port` itself).
export TESSERA_ADMIN_PORT="${TESSERA_ADMIN_PORT:-0}"
SERVER_CPU="${SERVER_CPU:-1}"
LOAD_CPU="${LOAD_CPU:-0}"
if [ "$(nproc)" -lt 2 ]; then
  say "fewer than 2 CPUs: the servers and the load generator share CPU 0"
  SERVER_CPU=0
  LOAD_CPU=0
fi


# Runs a command as root: directly when we are root, through sudo otherwise.
as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

# Installs Debian package $1 unless command $2 exists. A fresh machine may have no package
# lists yet, so the lists are updated once if the first attempt fails.
ensure_package() {
  local package="$1" command="$2"
  if command -v "$command" >/dev/null 2>&1; then
    return 0
  fi
  say "installing $package"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$package" >/dev/null ||
    { as_root apt-get update -q >/dev/null &&
      as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$package" >/dev/null; }
}

# A free loopback port (the kernel picks it; nothing is listening on it when we return).
free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

# Runs "$@" every 0.1 s until it succeeds, 100 times at most; then says $1 and fails.
wait_until() {
  local failure="$1"
  shift
  for _ in $(seq 1 100); do
    if "$@" 2>/dev/null; then
      return 0
    fi
    sleep 0.1
  done
  say "$failure"
  return 1
}

# Whether something accepts connections on loopback port $1.
port_accepts() {
  python3 -c "import socket,sys; s=socket.socket(); s.settimeout(0.2); sys.exit(s.connect_ex(('127.0.0.1', $1)))"
}

wait_for_port() {
  local port="$1" name="$2"
  wait_until "$name did not start listening on port $port" port_accepts "$port"
}

PIDS=()
stop_servers() {
  for pid in "${PIDS[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
  for pid in "${PIDS[@]}"; do
    wait "$pid" 2>/dev/null || true
  done
  if declare -F cleanup_extra >/dev/null; then
    cleanup_extra
  fi
}

# Stops the servers when the script ends. Ctrl-C and SIGTERM end it (with the usual status)
# rather than letting it go on to the next step with its servers gone.
stop_on_exit() {
  trap stop_servers EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
}

# The setup bench-leases.sh and bench-locks.sh share. Each expects ETCD (1 or 0) and
# RESULTS_DIR set, and SERVER_CPUS for `start_tessera`.

# Builds tessera-server and tessera-bench in release (with the cargo flags "$@"), sets BIN to
# where they are, and makes RESULTS_DIR.
build_release() {
  say "building (release)"
  cargo build --release --locked -q -p tessera-server -p tessera-bench "$@"
  BIN=target/release
  mkdir -p "$RESULTS_DIR"
}

# Checks that etcd can be installed when ETCD=1 (else sets ETCD=0), builds tessera-server and
# tessera-bench (with the etcd feature when ETCD=1) into BIN, and empties RESULTS_DIR of the
# results of an earlier run, which must not pass for this one's.
build_for_etcd_comparison() {
  if [ "$ETCD" = 1 ] && ! ensure_package etcd-server etcd; then
    say "etcd-server could not be installed: Tessera only"
    ETCD=0
  fi
  local features=()
  if [ "$ETCD" = 1 ]; then
    features=(--features tessera-bench/etcd)
  fi
  build_release "${features[@]}"
  rm -f "$RESULTS_DIR"/*.json "$RESULTS_DIR"/*.stderr
}

# Directories made for server data. A script that fills it defines
# `cleanup_extra() { remove_data_dirs; }` before `stop_on_exit`, so they go when it ends.
DATA_DIRS=()
remove_data_dirs() {
  for dir in "${DATA_DIRS[@]}"; do
    rm -rf -- "$dir"
  done
}

# Starts `tessera-server --cores 2` pinned to SERVER_CPUS on a free port (TESSERA_PORT), with
# the extra flags "$@", logging to RESULTS_DIR/tessera.log; sets TESSERA_PID and waits for it.
start_tessera() {
  TESSERA_PORT=$(free_port)
  "$BIN/tessera-server" --cores 2 --cpus "$SERVER_CPUS" --port "$TESSERA_PORT" \
    "$@" >"$RESULTS_DIR/tessera.log" 2>&1 &
  PIDS+=($!)
  TESSERA_PID=$!
  wait_for_port "$TESSERA_PORT" tessera
}

# etcd serves requests only once its one member has elected itself leader; /health says so.
etcd_is_healthy() {
  python3 -c "import json,sys,urllib.request; sys.exit(0 if json.load(urllib.request.urlopen('http://127.0.0.1:$1/health', timeout=1)).get('health') == 'true' else 1)"
}

# Starts one etcd member pinned to SERVER_CPU on free ports (ETCD_CLIENT_PORT, ETCD_PEER_PORT),
# its data in a new directory under RESULTS_DIR/data (added to DATA_DIRS), logging to
# RESULTS_DIR/etcd.log; sets ETCD_PID and waits until it is healthy.
start_etcd() {
  mkdir -p "$RESULTS_DIR/data"
  ETCD_DIR=$(mktemp -d "$(cd "$RESULTS_DIR/data" && pwd)/etcd.XXXXXX")
  DATA_DIRS+=("$ETCD_DIR")
  ETCD_CLIENT_PORT=$(free_port)
  ETCD_PEER_PORT=$(free_port)
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
  wait_for_port "$ETCD_CLIENT_PORT" etcd
  wait_until "etcd on port $ETCD_CLIENT_PORT did not become healthy" \
    etcd_is_healthy "$ETCD_CLIENT_PORT"
}
