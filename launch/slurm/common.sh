# shellcheck shell=bash
# The launch convention of mera-ds on Slurm, shared by mera-ray.sbatch, mera-torchrun.sbatch and
# node.sh (what srun runs on each node). Sourced, never run. Settings, all optional, read from the
# environment (srun passes it on to every node):
#
#   MERA_IFACE      the network interface of the cluster network, the same name on every node
#                   (default: the batch node's first non-loopback interface with an IPv4 address).
#                   Every address is read from it, never from `hostname --ip-address` (often
#                   127.0.x.1), and GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME are set to it.
#   MERA_CONTAINER  a prefix for the ray, mera and torchrun commands, e.g.
#                   "apptainer exec --nv mera.sif" (split on spaces).
#   MERA_PORT_BASE  the first of the job's ports (default: from SLURM_JOB_ID, below).
#   MERA_TMP        where each node's Ray temp dir is made (default /tmp; keep it short: Ray's
#                   unix socket paths must stay under 107 characters).
#   MERA_RAY_TIMEOUT  seconds to wait for every node to join the Ray cluster (default 300).
#   MERA_STOP_GRACE   seconds a stopped process group gets before SIGKILL (default 45).
#
# Ports: a job uses the block MERA_PORT_BASE .. MERA_PORT_BASE+199 on every node. By default
# MERA_PORT_BASE = 20000 + 200 * (SLURM_JOB_ID mod 60), i.e. 20000..31999: above Ray's default
# worker ports (10002-19999) and below Linux's ephemeral ports (32768-60999). Two jobs on one
# node collide only when their ids are equal mod 60; the ports are checked free at start.

MERA_PORT_BLOCK=200

mera_say() { echo "mera-slurm: $*" >&2; }
mera_die() { echo "mera-slurm: error: $*" >&2; exit 2; }

mera_node_name() { echo "${SLURMD_NODENAME:-$(hostname -s)}"; }

# The first interface with an IPv4 address other than loopback.
mera_default_iface() { ip -o -4 addr show | awk '$2 != "lo" { print $2; exit }'; }

# The IPv4 address of MERA_IFACE on this node.
mera_iface_ip() {
  local addr
  addr=$(ip -o -4 addr show dev "$MERA_IFACE" 2>/dev/null | awk '{ split($4, a, "/"); print a[1]; exit }')
  [[ -n $addr ]] || mera_die "$(mera_node_name): interface $MERA_IFACE has no IPv4 address (set MERA_IFACE)"
  echo "$addr"
}

# The job's settings, the same on every node: interface, ports, container prefix. Exports what the
# other nodes (through srun) and the processes started here need.
mera_job_env() {
  [[ -n ${SLURM_JOB_ID:-} ]] || mera_die "not inside a Slurm job (no SLURM_JOB_ID)"
  if [[ -z ${MERA_IFACE:-} ]]; then
    MERA_IFACE=$(mera_default_iface)
    [[ -n $MERA_IFACE ]] || mera_die "no network interface with an IPv4 address besides lo"
  fi
  export MERA_IFACE
  # Ray's workers inherit the raylet's environment, torchrun's ranks torchrun's: gloo and NCCL
  # bind to this interface rather than to whatever the host name resolves to.
  export GLOO_SOCKET_IFNAME=$MERA_IFACE NCCL_SOCKET_IFNAME=$MERA_IFACE

  local slots=$(((32000 - 20000) / MERA_PORT_BLOCK))
  export MERA_PORT_BASE=${MERA_PORT_BASE:-$((20000 + MERA_PORT_BLOCK * (SLURM_JOB_ID % slots)))}
  if ! [[ $MERA_PORT_BASE =~ ^[0-9]+$ ]] || ((MERA_PORT_BASE < 1024 || MERA_PORT_BASE + MERA_PORT_BLOCK > 65536)); then
    mera_die "MERA_PORT_BASE=$MERA_PORT_BASE: not a port from 1024 to $((65536 - MERA_PORT_BLOCK))"
  fi
  local b=$MERA_PORT_BASE
  export MERA_GCS_PORT=$b MERA_CLIENT_PORT=$((b + 1)) MERA_DASHBOARD_PORT=$((b + 2)) \
    MERA_NODE_MANAGER_PORT=$((b + 3)) MERA_OBJECT_MANAGER_PORT=$((b + 4)) \
    MERA_AGENT_HTTP_PORT=$((b + 5)) MERA_AGENT_GRPC_PORT=$((b + 6)) \
    MERA_RUNTIME_ENV_PORT=$((b + 7)) MERA_METRICS_PORT=$((b + 8)) MERA_RDZV_PORT=$((b + 9)) \
    MERA_MIN_WORKER_PORT=$((b + 20)) MERA_MAX_WORKER_PORT=$((b + MERA_PORT_BLOCK - 1))
  # Fixed in Ray unless set: the head's autoscaler and dashboard metrics servers.
  export AUTOSCALER_METRIC_PORT=$((b + 10)) DASHBOARD_METRIC_PORT=$((b + 11))
}

# Run (mera_c) or exec (mera_exec) a command through MERA_CONTAINER's prefix, if any.
mera_c() {
  local prefix
  read -r -a prefix <<<"${MERA_CONTAINER:-}"
  "${prefix[@]}" "$@"
}
mera_exec() {
  local prefix
  read -r -a prefix <<<"${MERA_CONTAINER:-}"
  exec "${prefix[@]}" "$@"
}

# The allocation's nodes (NODES), the head (the first: the node the batch script runs on) and its
# address on MERA_IFACE (HEAD_IP, exported for node.sh).
mera_nodes() {
  [[ -n ${SLURM_JOB_NODELIST:-} ]] || mera_die "no SLURM_JOB_NODELIST"
  mapfile -t NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
  ((${#NODES[@]} > 0)) || mera_die "scontrol show hostnames $SLURM_JOB_NODELIST: no nodes"
  HEAD=${NODES[0]}
  if [[ -n ${SLURMD_NODENAME:-} && $SLURMD_NODENAME != "$HEAD" ]]; then
    mera_die "the batch script runs on $SLURMD_NODENAME, not on the first node $HEAD"
  fi
  HEAD_IP=$(mera_iface_ip)
  export MERA_HEAD_IP=$HEAD_IP
}

# CPUs of a node for its srun step and Ray (Slurm's count; nodes are taken whole and alike).
mera_cpus() { echo "${SLURM_CPUS_ON_NODE:-$(nproc)}"; }

# GPUs of this node: Slurm's count, else the devices CUDA_VISIBLE_DEVICES lists, else none.
mera_gpus() {
  if [[ -n ${SLURM_GPUS_ON_NODE:-} ]]; then
    echo "$SLURM_GPUS_ON_NODE"
  elif [[ -n ${CUDA_VISIBLE_DEVICES:-} && $CUDA_VISIBLE_DEVICES != NoDevFiles ]]; then
    local devices
    IFS=, read -r -a devices <<<"$CUDA_VISIBLE_DEVICES"
    echo "${#devices[@]}"
  else
    echo 0
  fi
}

# Fail if any of the given ports is already listened on here (another job with the same ports).
mera_check_ports() {
  local listening p
  listening=$(ss -Hltn 2>/dev/null | awk '{ n = split($4, a, ":"); print a[n] }')
  for p in "$@"; do
    if grep -qx "$p" <<<"$listening"; then
      mera_die "$(mera_node_name): port $p is in use (another job on this node?); set MERA_PORT_BASE"
    fi
  done
}

# --- processes started by a batch script ---------------------------------------------------------

MERA_MAIN=         # the job's main process group: the driver, or the srun step of torchrun
MERA_NODE_PIDS=()  # the srun steps of per-node services (ray start), the head's first

# Start a command in the background, in a process group (and session) of its own: its pid, which
# is also its process group id, is in $! after. `mera_spawn --container CMD` runs CMD through
# MERA_CONTAINER's prefix.
mera_spawn() {
  local prefix=()
  if [[ $1 == --container ]]; then
    shift
    read -r -a prefix <<<"${MERA_CONTAINER:-}"
  fi
  setsid "${prefix[@]}" "$@" </dev/null &
}

# Run the job's main command (mera_spawn's arguments) and return its exit status.
mera_main() {
  local rc=0
  mera_spawn "$@"
  MERA_MAIN=$!
  wait "$MERA_MAIN" || rc=$?
  MERA_MAIN=
  mera_say "the job's main command exited with status $rc"
  return "$rc"
}

# Whether anything of process group $1 is still running.
mera_group_alive() { kill -0 -- "-$1" 2>/dev/null; }

# Stop the process groups given, together: SIGTERM to each leader (srun passes it on to its
# remote task; `ray start --block` drains its node and ends its processes; a group whose leader is
# gone gets it whole), up to MERA_STOP_GRACE seconds for them all, then SIGKILL to whatever is
# left of them. Only these groups are signalled: never `ray stop`, which ends every Ray instance of
# the user on the node.
mera_stop() {
  local pid deadline=$((SECONDS + ${MERA_STOP_GRACE:-45})) left
  for pid in "$@"; do
    kill -TERM "$pid" 2>/dev/null || kill -TERM -- "-$pid" 2>/dev/null
  done
  while :; do
    left=()
    for pid in "$@"; do
      mera_group_alive "$pid" && left+=("$pid")
    done
    ((${#left[@]} > 0 && SECONDS < deadline)) || break
    sleep 0.2
  done
  for pid in "${left[@]}"; do
    mera_say "process group $pid still running after ${MERA_STOP_GRACE:-45} s: killed"
    kill -KILL -- "-$pid" 2>/dev/null
  done
  for pid in "$@"; do
    wait "$pid" 2>/dev/null
  done
  return 0
}

# On exit, whatever the cause (the end, an error, SIGTERM from scancel or the time limit, SIGINT):
# the main process, then the worker nodes' services (each leaves the head's cluster), then the
# head's. The exit status is kept: the main command's, 143 on SIGTERM, 130 on SIGINT.
mera_cleanup() {
  local rc=$?
  set +e
  trap '' TERM INT
  [[ -n $MERA_MAIN ]] && mera_stop "$MERA_MAIN"
  ((${#MERA_NODE_PIDS[@]} > 1)) && mera_stop "${MERA_NODE_PIDS[@]:1}"
  ((${#MERA_NODE_PIDS[@]} > 0)) && mera_stop "${MERA_NODE_PIDS[0]}"
  exit "$rc"
}

mera_traps() {
  trap mera_cleanup EXIT
  trap 'exit 143' TERM
  trap 'exit 130' INT
}
