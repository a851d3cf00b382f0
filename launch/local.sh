#!/usr/bin/env bash
# launch/local.sh CONFIG [overrides...]: train on this node with every GPU, or N CPU processes.
#
#   launch/local.sh configs/gpt2-124m.yaml data.paths=[data/shards] train.max_steps=1000
#   NPROC_PER_NODE=4 launch/local.sh configs/quickstart.yaml train.device=cpu
#
# Runs `torchrun --standalone` with one process per visible GPU (CUDA_VISIBLE_DEVICES or
# nvidia-smi), or $NPROC_PER_NODE processes (default 1 without a GPU). Each rank logs to
# $PRETRAIN_LOG_DIR/rank_NNNNN.log; rank 0 also prints to the console. SIGUSR1 or SIGTERM
# to this script makes the ranks save a checkpoint and exit 0, and the script too; run it
# again to resume (checkpoint.resume=auto), or wrap it in the auto-resume wrapper:
#
#   python -m pretrain.launch.autoresume -- launch/local.sh CONFIG [overrides...]
#
# Settings (network, timeouts, log directory): launch/env.sh.
# Exit status: the trainer's (0 done or stopped on request, 2 configuration error,
# 3 stopped after non-finite steps), non-zero for a crash.
set -euo pipefail
# shellcheck source=launch/common.sh
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"
pretrain_setup "$0" "$@"
pretrain_trainer_args "$@"
nproc=$(pretrain_nproc)
export PRETRAIN_NPROC=$nproc
pretrain_check "$nproc"
echo "launch/local.sh: $nproc process(es) on $(hostname); per-rank logs in $PRETRAIN_LOG_DIR" >&2
pretrain_run "$PRETRAIN_PYTHON" -m torch.distributed.run --standalone --nnodes=1 \
    --nproc_per_node="$nproc" --max_restarts=0 \
    --no-python "$PRETRAIN_LAUNCH_DIR/rank.sh" "$PRETRAIN_PYTHON" "${PRETRAIN_ARGS[@]}"
