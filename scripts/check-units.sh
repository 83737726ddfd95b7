#!/usr/bin/env bash
# Checks deploy/: every systemd unit passes `systemd-analyze verify` with no output at all
# (it exits 0 even on errors, so its output is what counts), the template instantiated for
# each example drop-in (deploy/examples/tessera@NAME.service.d) with that drop-in; every
# example config is accepted by the server (`--print-config`); and each drop-in's
# CPUAffinity= matches its instance's `cpus`.
#
# Environment: TESSERA_SERVER_BIN, the server binary (default target/debug/tessera-server,
# built if missing). The units' ExecStart names /usr/local/bin/tessera-server, which verify
# requires to exist; the copies checked here point at the built binary instead.
set -euo pipefail
cd "$(dirname "$0")/.."

fail() { printf 'check-units: %s\n' "$*" >&2; exit 1; }

if ! command -v systemd-analyze >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "check-units: installing systemd for systemd-analyze"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq systemd >/dev/null
  else
    fail "systemd-analyze is missing (install systemd)"
  fi
fi

binary="${TESSERA_SERVER_BIN:-target/debug/tessera-server}"
if [ ! -x "$binary" ]; then
  cargo build --quiet -p tessera-server --bin tessera-server
fi
[ -x "$binary" ] || fail "no server binary at $binary"
binary="$(realpath "$binary")"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# The units as installed, in one directory: the template once per example instance, with
# that instance's drop-ins.
units=()
for unit in deploy/*.service deploy/*.target; do
  name="$(basename "$unit")"
  if [[ "$name" == *@.service ]]; then
    prefix="${name%@.service}"
    instances=()
    for dropin in deploy/examples/"$prefix"@*.service.d; do
      [ -d "$dropin" ] || continue
      instance="$(basename "$dropin" .service.d)"
      instances+=("${instance#"$prefix"@}")
      cp -r "$dropin" "$work/"
    done
    [ "${#instances[@]}" -gt 0 ] || instances=(check)
    for instance in "${instances[@]}"; do
      sed "s|/usr/local/bin/tessera-server|$binary|g" "$unit" >"$work/$prefix@$instance.service"
      units+=("$work/$prefix@$instance.service")
    done
  else
    sed "s|/usr/local/bin/tessera-server|$binary|g" "$unit" >"$work/$name"
    units+=("$work/$name")
  fi
done
[ "${#units[@]}" -gt 0 ] || fail "no units in deploy/"

for unit in "${units[@]}"; do
  status=0
  output="$(systemd-analyze verify "$unit" 2>&1)" || status=$?
  if [ -n "$output" ] || [ "$status" -ne 0 ]; then
    printf '%s\n' "$output" >&2
    fail "systemd-analyze verify $(basename "$unit") reported the above (exit $status)"
  fi
  echo "check-units: $(basename "$unit") verified"
done

# Every example instance config loads, and its drop-in pins the CPUs it names.
for config in deploy/examples/*.toml; do
  # A cluster table (cluster.toml) is checked through the instance configs naming it.
  if grep -q '^\[\[nodes\]\]' "$config"; then continue; fi
  name="$(sed -n 's/^name *= *"\(.*\)"/\1/p' "$config")"
  printed="$(env -u TESSERA_CONFIG -u TESSERA_CLUSTER_FILE "$binary" --config "$config" --print-config 2>&1)" ||
    { printf '%s\n' "$printed" >&2; fail "the server refuses $config"; }
  cpus="$(sed -n 's/^cpus *= *\[\(.*\)\]/\1/p' "$config" | tr -d ' ' | tr ',' ' ')"
  dropin="deploy/examples/tessera@$name.service.d/cpus.conf"
  if [ -n "$cpus" ]; then
    [ -f "$dropin" ] || fail "$config pins cpus $cpus but $dropin is missing"
    affinity="$(sed -n 's/^CPUAffinity=//p' "$dropin")"
    [ "$affinity" = "$cpus" ] ||
      fail "$dropin says CPUAffinity=$affinity but $config has cpus $cpus"
  fi
  echo "check-units: $config loads (instance $name, cpus ${cpus:-any})"
done
echo "check-units: ok"
