# shellcheck shell=bash
# launch/env.sh: the one place for settings that every launcher in launch/ shares.
#
# Usage: source launch/env.sh   (the launchers do this themselves; export a variable
#        before running a launcher to override its default here)
#
# Python and logs
#   PRETRAIN_PYTHON           interpreter with pretrain installed (default: python3)
#   PRETRAIN_LOG_DIR          per-rank logs: DIR/rank_00000.log ... (default: logs, or
#                             logs/slurm-JOBID under SLURM); rank 0 is also on the console
# Network
#   PRETRAIN_IFNAME           network interface for the collectives (e.g. eth0, ib0, bond0):
#                             sets GLOO_SOCKET_IFNAME and NCCL_SOCKET_IFNAME (unless already
#                             set) and, for launch/multinode.sh, the address this node
#                             announces at rendezvous (LOCAL_ADDR)
#   NCCL_DEBUG                default WARN
#   NCCL_IB_DISABLE etc.      any NCCL_* you export is passed on by the launchers
# Timeouts
#   PRETRAIN_TIMEOUT_MINUTES  collective timeout: passed as parallel.timeout_minutes before
#                             your overrides (so an explicit override still wins). When a node
#                             dies, the survivors fail after this long instead of hanging.
#   PRETRAIN_RDZV_TIMEOUT     seconds torchrun waits for every node to join (default 900)
#   PET_SHUTDOWN_TIMEOUT      seconds torchrun gives ranks to exit after SIGTERM before it
#                             kills them (default 120: room for the final checkpoint)
# Auto-resume
#   PRETRAIN_MAX_RESTARTS     restarts the auto-resume wrapper allows (default 3)
#   PRETRAIN_RESTART_DELAY    seconds between a failure and the restart (default 10)

if [ "${BASH_SOURCE[0]}" = "$0" ]; then  # run rather than sourced: show this help
    # shellcheck source=launch/common.sh
    . "$(dirname "$0")/common.sh"
    pretrain_help "$0"
    exit 0
fi

: "${PRETRAIN_PYTHON:=python3}"
if [ -z "${PRETRAIN_LOG_DIR:-}" ]; then
    if [ -n "${SLURM_JOB_ID:-}" ]; then
        PRETRAIN_LOG_DIR="logs/slurm-${SLURM_JOB_ID}"
    else
        PRETRAIN_LOG_DIR="logs"
    fi
fi
case "$PRETRAIN_LOG_DIR" in
    /*) ;;
    *) PRETRAIN_LOG_DIR="$PWD/$PRETRAIN_LOG_DIR" ;;  # absolute: ranks on other nodes see the same path
esac
: "${PRETRAIN_TIMEOUT_MINUTES:=}"
: "${PRETRAIN_RDZV_TIMEOUT:=900}"
: "${PRETRAIN_MAX_RESTARTS:=3}"
: "${PRETRAIN_RESTART_DELAY:=10}"
: "${PET_SHUTDOWN_TIMEOUT:=120}"
export PRETRAIN_PYTHON PRETRAIN_LOG_DIR PRETRAIN_TIMEOUT_MINUTES PRETRAIN_RDZV_TIMEOUT
export PRETRAIN_MAX_RESTARTS PRETRAIN_RESTART_DELAY PET_SHUTDOWN_TIMEOUT

if [ -n "${PRETRAIN_IFNAME:-}" ]; then
    export GLOO_SOCKET_IFNAME="${GLOO_SOCKET_IFNAME:-$PRETRAIN_IFNAME}"
    export NCCL_SOCKET_IFNAME="${NCCL_SOCKET_IFNAME:-$PRETRAIN_IFNAME}"
fi
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
# A failed or timed-out NCCL collective tears the process down instead of hanging it.
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
export PYTHONUNBUFFERED=1  # log lines reach the files as they happen
