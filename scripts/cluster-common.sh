# Shared by cluster-up.sh and cluster-down.sh (sourced, not run): where the local cluster
# lives and which instances it has. Three "hosts" on loopback addresses, two instances on
# each, one core per instance: six instances, six cluster nodes.
#
# Environment (all optional):
#   TESSERA_CLUSTER_DIR          run directory: configs, cluster.toml, pid and log files
#                                (default target/cluster)
#   TESSERA_BASE_PORT            instance a's client port on every host (default 17000);
#                                instance b uses +1; admin ports +1000, peer ports +2000
#   TESSERA_CLUSTER_DURABILITY   memory (default), async or sync
#   TESSERA_CLUSTER_PROFILE      debug (default) or release: which build to run
#   TESSERA_CLUSTER_CPUS         the CPUs of instances a and b (default "0 1")
#   TESSERA_SERVER_BIN / TESSERA_CLI_BIN   binaries to use instead of building them

cluster_dir="${TESSERA_CLUSTER_DIR:-target/cluster}"
cluster_hosts=(127.0.0.1 127.0.0.2 127.0.0.3)
cluster_slots=(a b)

cluster_fail() { printf '%s: %s\n' "$(basename "$0")" "$*" >&2; exit 1; }

# The instance names, in node order: h1-a h1-b h2-a ...
cluster_names() {
  local host_index slot
  for host_index in "${!cluster_hosts[@]}"; do
    for slot in "${cluster_slots[@]}"; do
      printf 'h%d-%s\n' "$((host_index + 1))" "$slot"
    done
  done
}

# Whether pid $1 is the server started with config $2 (guards against a reused pid).
cluster_is_ours() {
  local pid="$1" config="$2" cmdline
  [ -r "/proc/$pid/cmdline" ] || return 1
  cmdline="$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null)" || return 1
  [[ "$cmdline" == *tessera-server*"--config $config"* ]]
}
