#!/usr/bin/env bash
# launch/rank.sh PROGRAM [ARGS...]: run one rank of a job with its own log file.
#
# The launchers in launch/ start every rank through this wrapper (torchrun --no-python,
# deepspeed --no_python); you do not call it yourself. It appends the rank's stdout and
# stderr to $PRETRAIN_LOG_DIR/rank_NNNNN.log (NNNNN = the global $RANK, so the files of
# all nodes can share one directory) and, for rank 0 only, shows them on the console too.
# It exits with PROGRAM's status and, when the launcher asks for it ($PRETRAIN_STATUS_DIR),
# records that status so the node script can report the trainer's own exit code.
#
# Signals: the launchers signal every process of a rank (torchrun: its process group;
# launch/ scripts and DeepSpeed: the process tree), so PROGRAM gets them directly; this
# wrapper only outlives them to record the status.
#
# Environment: RANK (set by the launcher), PRETRAIN_LOG_DIR (see launch/env.sh).
set -uo pipefail
# shellcheck source=launch/common.sh
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"
pretrain_setup "$0" "$@"
[ $# -ge 1 ] || pretrain_die "rank.sh: missing PROGRAM; see --help"

rank=${RANK:-0}
mkdir -p "$PRETRAIN_LOG_DIR" || exit 1
log=$(printf '%s/rank_%05d.log' "$PRETRAIN_LOG_DIR" "$rank")
printf '==== %s rank %s (local %s) on %s: %s\n' "$(date '+%F %T')" "$rank" \
    "${LOCAL_RANK:-?}" "$(hostname)" "$*" >>"$log"
if [ "$rank" = 0 ]; then
    # tee ignores the stop signals, so it keeps copying the rank's last words (the checkpoint
    # it saved on SIGUSR1/SIGTERM) even when a scheduler signals every process of the job.
    exec > >(
        trap '' INT TERM HUP USR1 USR2
        exec tee -p -a "$log"  # -p: keep writing the file if the console goes away
    ) 2>&1
else
    exec >>"$log" 2>&1
fi
trap ':' INT TERM HUP USR1 USR2  # PROGRAM (in the foreground) gets the signal itself
rc=0
"$@" || rc=$?
if [ -n "${PRETRAIN_STATUS_DIR:-}" ] && [ -d "$PRETRAIN_STATUS_DIR" ]; then
    echo "$rc" >"$PRETRAIN_STATUS_DIR/rank_$rank"
fi
exit "$rc"
