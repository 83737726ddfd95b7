#!/usr/bin/env bash
# The single test entry point: CI (.ci/run), the README and developers all run this.
# Formatting, lints (pedantic, warnings are errors) and every test in the workspace, with the
# embedded feature on so embedded mode runs the same behavioural tests as remote mode.
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
# Each test binary starts real servers on loopback; a bounded thread count keeps a 2-core
# machine responsive and the suite's timing predictable.
export RUST_TEST_THREADS="${RUST_TEST_THREADS:-4}"

step() { printf '\n==> %s\n' "$*"; }

for component in rustfmt clippy; do
  if ! rustup component list --installed 2>/dev/null | grep -q "^${component}"; then
    step "installing ${component}"
    rustup component add "${component}"
  fi
done

step "format"
cargo fmt --all -- --check

step "clippy"
cargo clippy --workspace --all-targets --all-features --locked -- -D warnings

step "tests"
cargo test --workspace --all-features --locked

step "systemd units and example configs"
scripts/check-units.sh

step "local cluster smoke (scripts/cluster-up.sh, ping, cluster status, scripts/cluster-down.sh)"
# The binaries the tests built; the first base port whose ports are all free.
export TESSERA_CLUSTER_DIR=target/cluster-ci
export TESSERA_SERVER_BIN=target/debug/tessera-server TESSERA_CLI_BIN=target/debug/tessera
trap 'scripts/cluster-down.sh >/dev/null 2>&1 || true' EXIT
for base_port in 17000 21000 25000 29000; do
  if up="$(TESSERA_BASE_PORT=$base_port timeout 60 scripts/cluster-up.sh)"; then
    endpoints="$(tail -n 1 <<<"$up")"
    [[ "$endpoints" == TESSERA_ENDPOINTS=* ]] || { echo "cluster-up printed: $up"; exit 1; }
    timeout 30 "$TESSERA_CLI_BIN" --endpoints "${endpoints#TESSERA_ENDPOINTS=}" ping
    # Every node answers, so every one is listed up (exit 0).
    timeout 30 "$TESSERA_CLI_BIN" --endpoints "${endpoints#TESSERA_ENDPOINTS=}" cluster status
    break
  fi
  scripts/cluster-down.sh >/dev/null
  [ "$base_port" != 29000 ] || { echo "no local cluster could start"; exit 1; }
done
timeout 30 scripts/cluster-down.sh
trap - EXIT
unset TESSERA_CLUSTER_DIR TESSERA_SERVER_BIN TESSERA_CLI_BIN

step "fuzz target builds"
scripts/fuzz.sh check

step "ok"
