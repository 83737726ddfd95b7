# Helpers the comparison scripts share (sourced by bench-vs-redis.sh and bench-vs-etcd.sh,
# never run): messages, installing a Debian package, free loopback ports, waiting for a
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
