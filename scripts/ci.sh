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

step "fuzz target builds"
scripts/fuzz.sh check

step "ok"
