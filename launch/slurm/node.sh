#!/bin/bash
# One node's part of a mera-ds Slurm job: what mera-ray.sbatch and mera-torchrun.sbatch run on
# each node with srun. This node's address is read from MERA_IFACE here, on the node itself.
#
#   node.sh ray-head                 the Ray head: `ray start --head --block`
#   node.sh ray-worker               a Ray worker node joining the head at MERA_HEAD_IP
#   node.sh torchrun TORCHRUN_ARGS   torchrun, with this node's address and rendezvous role
#
# The settings come from the batch script's environment (launch/slurm/common.sh).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

mera_job_env
[[ -n ${MERA_HEAD_IP:-} ]] || mera_die "node.sh runs under a mera-*.sbatch script (no MERA_HEAD_IP)"
node=$(mera_node_name)
ip=$(mera_iface_ip)

case ${1:-} in
ray-head | ray-worker)
  # Node-local, short (socket paths), and one per node: on a shared /tmp two Ray instances must
  # not share a temp dir.
  temp_dir=${MERA_TMP:-/tmp}/mera-ray-$SLURM_JOB_ID-$node
  ((${#temp_dir} <= 44)) || mera_die "Ray temp dir $temp_dir: longer than 44 characters (Ray's socket paths); set MERA_TMP"
  args=(--block --node-ip-address "$ip" --temp-dir "$temp_dir" --disable-usage-stats
    --num-cpus "$(mera_cpus)" --num-gpus "$(mera_gpus)"
    --node-manager-port "$MERA_NODE_MANAGER_PORT" --object-manager-port "$MERA_OBJECT_MANAGER_PORT"
    --dashboard-agent-listen-port "$MERA_AGENT_HTTP_PORT"
    --dashboard-agent-grpc-port "$MERA_AGENT_GRPC_PORT"
    --runtime-env-agent-port "$MERA_RUNTIME_ENV_PORT" --metrics-export-port "$MERA_METRICS_PORT"
    --min-worker-port "$MERA_MIN_WORKER_PORT" --max-worker-port "$MERA_MAX_WORKER_PORT")
  ports=("$MERA_NODE_MANAGER_PORT" "$MERA_OBJECT_MANAGER_PORT" "$MERA_AGENT_HTTP_PORT"
    "$MERA_AGENT_GRPC_PORT" "$MERA_RUNTIME_ENV_PORT" "$MERA_METRICS_PORT")
  if [[ $1 == ray-head ]]; then
    # The dashboard serves Ray's state API, which Ray Train's placement group cleaner (on the
    # head) asks every second; on loopback only: nothing off the head reaches it.
    args+=(--head --port "$MERA_GCS_PORT" --ray-client-server-port "$MERA_CLIENT_PORT"
      --include-dashboard true --dashboard-host 127.0.0.1 --dashboard-port "$MERA_DASHBOARD_PORT")
    ports+=("$MERA_GCS_PORT" "$MERA_CLIENT_PORT" "$MERA_DASHBOARD_PORT" "$AUTOSCALER_METRIC_PORT"
      "$DASHBOARD_METRIC_PORT")
  else
    args+=(--address "$MERA_HEAD_IP:$MERA_GCS_PORT")
  fi
  mera_check_ports "${ports[@]}"
  # Ray processes that look for "the" cluster's state API (Ray Train's placement group cleaner)
  # would otherwise scan `ps` for Ray instances and stop at other users' on a shared node.
  export RAY_API_SERVER_ADDRESS=http://127.0.0.1:$MERA_DASHBOARD_PORT
  # A single-node Ray (`mera run` without --ray-address) sets this to 0 in its environment;
  # inherited here it would refuse to form a cluster of several nodes.
  export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1
  # The job's end ends the whole cluster: a node has nothing to drain its work to on SIGTERM.
  export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=${RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S:-0}
  mera_say "$node: Ray ${1#ray-} on $ip ($MERA_IFACE), temp dir $temp_dir"
  mera_exec ray start "${args[@]}"
  ;;
torchrun)
  shift
  # The rendezvous store runs on the head. torchrun decides that by resolving the host name,
  # which on many nodes (and in network namespaces) gives 127.0.x.1: it is told instead.
  is_host=0
  [[ $ip == "$MERA_HEAD_IP" ]] && is_host=1
  ((is_host == 0)) || mera_check_ports "$MERA_RDZV_PORT"
  mera_say "$node: torchrun on $ip ($MERA_IFACE)"
  mera_exec torchrun --local-addr "$ip" --rdzv-conf "is_host=$is_host" "$@"
  ;;
*)
  mera_die "usage: node.sh ray-head | ray-worker | torchrun TORCHRUN_ARGS"
  ;;
esac
