#!/usr/bin/env bash
# What a /metrics scrape costs: its time and size, and the server CPU it takes.
#
#   scripts/bench-metrics.sh             (about a minute once built)
#
# Settings come from the environment:
#   CORES (2)  KEYS (100000)  SCRAPES (1000)  DURABILITY (memory; sync adds the log's series)
#   RESULTS_DIR (target/bench-metrics)
#
# Starts a release tessera-server with CORES cores on free loopback ports, loads KEYS keys
# with tessera-bench (whose short get run also gives the request series something to count),
# then scrapes GET /metrics SCRAPES times, one after the other, over a new connection each
# (as Prometheus does with keep-alive off). It reports the body size, the wall time per
# scrape (mean, p50, p99, max) as the scraping client sees it, and the server's CPU time per
# scrape: utime + stime of the whole process from /proc/PID/stat across the scrapes, less
# what the idle server spent over an equally long pause before them (its expiry ticks).
# Results: RESULTS_DIR/metrics.json and RESULTS_DIR/scrape.txt (the last scrape's body).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/bench-common.sh
source scripts/bench-common.sh

CORES="${CORES:-2}"
SCRAPES="${SCRAPES:-1000}"
DURABILITY="${DURABILITY:-memory}"
RESULTS_DIR="${RESULTS_DIR:-target/bench-metrics}"

say "building (release)"
cargo build --release --locked -q -p tessera-server -p tessera-bench
BIN=target/release
mkdir -p "$RESULTS_DIR"
DATA_DIR=$(mktemp -d)
cleanup_extra() { rm -rf "$DATA_DIR"; }
stop_on_exit

TESSERA_PORT=$(free_port)
ADMIN_PORT=$(free_port)
"$BIN/tessera-server" --cores "$CORES" --port "$TESSERA_PORT" --admin-port "$ADMIN_PORT" \
  --durability "$DURABILITY" --data-dir "$DATA_DIR" >"$RESULTS_DIR/tessera.log" 2>&1 &
PIDS+=($!)
TESSERA_PID=$!
wait_for_port "$TESSERA_PORT" tessera
wait_for_port "$ADMIN_PORT" "tessera admin"

say "loading $KEYS keys"
"$BIN/tessera-bench" --endpoints "127.0.0.1:$TESSERA_PORT" --workload get --preload yes \
  --keys "$KEYS" --key-size "$KEY_SIZE" --value-size "$VALUE_SIZE" \
  --connections "$CONNECTIONS" --duration-secs 0.5 --json --quiet >/dev/null 2>&1

say "$SCRAPES scrapes of http://127.0.0.1:$ADMIN_PORT/metrics"
python3 - "$TESSERA_PID" "$ADMIN_PORT" "$SCRAPES" "$RESULTS_DIR" "$CORES" "$KEYS" <<'EOF'
import json, os, socket, sys, time

pid, port, scrapes, results, cores, keys = sys.argv[1:7]
port, scrapes = int(port), int(scrapes)
ticks_per_second = os.sysconf("SC_CLK_TCK")

def cpu_seconds():
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    # utime and stime are fields 14 and 15 of stat(5); fields[0] here is field 3.
    return (int(fields[11]) + int(fields[12])) / ticks_per_second

def scrape():
    with socket.create_connection(("127.0.0.1", port)) as connection:
        connection.sendall(b"GET /metrics HTTP/1.1\r\nHost: bench\r\n\r\n")
        chunks = []
        while chunk := connection.recv(1 << 16):
            chunks.append(chunk)
    answer = b"".join(chunks)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    return body

scrape()  # warm up: the first scrape allocates the encoder's buffers
pause_started = time.monotonic()
idle_before = cpu_seconds()
time.sleep(2.0)
idle_cpu_per_second = (cpu_seconds() - idle_before) / (time.monotonic() - pause_started)

durations = []
cpu_before = cpu_seconds()
started = time.monotonic()
for _ in range(scrapes):
    scrape_started = time.perf_counter()
    body = scrape()
    durations.append(time.perf_counter() - scrape_started)
elapsed = time.monotonic() - started
cpu_spent = cpu_seconds() - cpu_before - idle_cpu_per_second * elapsed

with open(os.path.join(results, "scrape.txt"), "wb") as handle:
    handle.write(body)
durations.sort()
def percentile(fraction):
    return durations[min(len(durations) - 1, int(fraction * len(durations)))]
result = {
    "cores": int(cores),
    "keys": int(keys),
    "scrapes": scrapes,
    "body_bytes": len(body),
    "series_lines": sum(1 for line in body.splitlines() if not line.startswith(b"#")),
    "scrape_ms_mean": 1e3 * sum(durations) / len(durations),
    "scrape_ms_p50": 1e3 * percentile(0.50),
    "scrape_ms_p99": 1e3 * percentile(0.99),
    "scrape_ms_max": 1e3 * durations[-1],
    "server_cpu_ms_per_scrape": 1e3 * cpu_spent / scrapes,
    "idle_server_cpu_ms_per_second": 1e3 * idle_cpu_per_second,
    "cpu_tick_ms": 1e3 / ticks_per_second,
}
with open(os.path.join(results, "metrics.json"), "w") as handle:
    json.dump(result, handle, indent=2)
print(f"{result['cores']} cores, {result['keys']} keys: a scrape is {result['body_bytes']} bytes "
      f"({result['series_lines']} series lines)")
print(f"wall time per scrape: mean {result['scrape_ms_mean']:.3f} ms, p50 "
      f"{result['scrape_ms_p50']:.3f} ms, p99 {result['scrape_ms_p99']:.3f} ms, max "
      f"{result['scrape_ms_max']:.3f} ms")
print(f"server CPU per scrape: {result['server_cpu_ms_per_scrape']:.3f} ms over {scrapes} scrapes "
      f"(idle server: {result['idle_server_cpu_ms_per_second']:.2f} ms/s subtracted; "
      f"/proc counts in {result['cpu_tick_ms']:.0f} ms ticks)")
EOF
