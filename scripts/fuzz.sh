#!/usr/bin/env bash
# Fuzzing the frame decoder (protocol/fuzz).
#
#   scripts/fuzz.sh check            build the fuzz targets (what CI runs; stable toolchain)
#   scripts/fuzz.sh run [SECONDS]    fuzz decode_frame for SECONDS (default 60) with cargo-fuzz
#
# `run` installs cargo-fuzz if it is missing. Crashes land in protocol/fuzz/artifacts/; see
# protocol/fuzz/README.md for reproducing one.
set -euo pipefail
cd "$(dirname "$0")/../protocol"

mode="${1:-check}"
case "$mode" in
  check)
    cargo build --manifest-path fuzz/Cargo.toml --bins --quiet
    ;;
  run)
    seconds="${2:-60}"
    if ! cargo fuzz --version >/dev/null 2>&1; then
      cargo install cargo-fuzz --locked
    fi
    # -s none: no sanitizer, which lets the stable toolchain build the target.
    cargo fuzz run decode_frame -s none -- -max_total_time="$seconds"
    ;;
  *)
    echo "usage: scripts/fuzz.sh check | run [SECONDS]" >&2
    exit 2
    ;;
esac
