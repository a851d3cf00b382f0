#!/usr/bin/env bash
# launch/multinode.sh CONFIG [overrides...]: the command to run once on every node, for
# clusters without ssh between nodes (Kubernetes, cloud batch, SLURM's srun).
#
#   # on each of 2 nodes (node 0 at 10.0.0.1):
#   MASTER_ADDR=10.0.0.1 NNODES=2 NODE_RANK=0 launch/multinode.sh configs/gpt2-124m.yaml ...
#   MASTER_ADDR=10.0.0.1 NNODES=2 NODE_RANK=1 launch/multinode.sh configs/gpt2-124m.yaml ...
#
# Starts torchrun with c10d rendezvous at MASTER_ADDR:MASTER_PORT: the nodes find each other
# there (in any start order, within PRETRAIN_RDZV_TIMEOUT seconds), node 0 hosts the
# rendezvous store, and torchrun numbers the ranks. Every node must be given the same
# CONFIG and overrides.
#
# Environment:
#   MASTER_ADDR       address (or name) of node 0, reachable from every node (required)
#   MASTER_PORT       rendezvous port on node 0 (default 29500)
#   NNODES            number of nodes (default 1)
#   NODE_RANK         this node's index, 0..NNODES-1 (default 0); node 0 hosts the store
#   NPROC_PER_NODE    processes per node (default: every visible GPU, or 1 without GPUs)
#   LOCAL_ADDR        address this node announces to the others (default: the address of
#                     $PRETRAIN_IFNAME if set, else torchrun uses the hostname)
#   PRETRAIN_RDZV_ID  job id shared by the nodes of one job (default: pretrain)
#   and launch/env.sh (interface, timeouts, per-rank log directory).
#
# When a node dies, the ranks on the other nodes fail their next collective within
# parallel.timeout_minutes (PRETRAIN_TIMEOUT_MINUTES) and this script exits non-zero on
# every surviving node; restart all nodes (or wrap this script in
# `python -m pretrain.launch.autoresume --`) and training resumes from the newest
# checkpoint. SIGUSR1 or SIGTERM to this script: the ranks save a checkpoint and exit 0.
set -euo pipefail
# shellcheck source=launch/common.sh
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"
pretrain_setup "$0" "$@"
pretrain_trainer_args "$@"
[ -n "${MASTER_ADDR:-}" ] || pretrain_die "MASTER_ADDR is not set: export the address of node 0 (see --help)"
MASTER_PORT=${MASTER_PORT:-29500}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
case "$NNODES$NODE_RANK" in
    *[!0-9]*) pretrain_die "NNODES=$NNODES and NODE_RANK=$NODE_RANK must be whole numbers" ;;
esac
[ "$NODE_RANK" -lt "$NNODES" ] || pretrain_die "NODE_RANK=$NODE_RANK is not below NNODES=$NNODES"
if [ -z "${LOCAL_ADDR:-}" ] && [ -n "${PRETRAIN_IFNAME:-}" ] && command -v ip >/dev/null 2>&1; then
    LOCAL_ADDR=$(ip -4 -o addr show dev "$PRETRAIN_IFNAME" 2>/dev/null | awk '{split($4, a, "/"); print a[1]; exit}')
    [ -n "$LOCAL_ADDR" ] || pretrain_die "PRETRAIN_IFNAME=$PRETRAIN_IFNAME has no IPv4 address on $(hostname)"
fi
nproc=$(pretrain_nproc)
export PRETRAIN_NPROC=$nproc
pretrain_check $((NNODES * nproc))
is_host=0
[ "$NODE_RANK" = 0 ] && is_host=1
extra=()
[ -n "${LOCAL_ADDR:-}" ] && extra+=("--local_addr=$LOCAL_ADDR")
echo "launch/multinode.sh: node $NODE_RANK of $NNODES, $nproc process(es), rendezvous" \
    "$MASTER_ADDR:$MASTER_PORT${LOCAL_ADDR:+, this node $LOCAL_ADDR}; per-rank logs in $PRETRAIN_LOG_DIR" >&2
pretrain_run "$PRETRAIN_PYTHON" -m torch.distributed.run --nnodes="$NNODES" \
    --nproc_per_node="$nproc" --max_restarts=0 --rdzv_backend=c10d \
    --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv_id="${PRETRAIN_RDZV_ID:-pretrain}" \
    --rdzv_conf="is_host=$is_host,join_timeout=$PRETRAIN_RDZV_TIMEOUT" "${extra[@]}" \
    --no-python "$PRETRAIN_LAUNCH_DIR/rank.sh" "$PRETRAIN_PYTHON" "${PRETRAIN_ARGS[@]}"
