# shellcheck shell=bash
# launch/common.sh: functions the launchers in launch/ share. Sourced, not run.
#
# pretrain_help FILE         print FILE's leading comment block (the scripts' --help)
# pretrain_help_if_asked FILE ARGS...   the same and exit 0 when ARGS start with -h/--help
# pretrain_setup SCRIPT ARGS...   a launcher's start: SCRIPT's help if asked, then launch/env.sh
# pretrain_die MESSAGE       `error: MESSAGE` on stderr, exit 2 (a user error: not retried)
# pretrain_nproc             processes per node: $NPROC_PER_NODE, else the GPUs, else 1
# pretrain_trainer_args CONFIG [overrides...]   set PRETRAIN_ARGS for `python -m pretrain.train`
# pretrain_check WORLD       validate PRETRAIN_ARGS for WORLD processes before starting any:
#                            a mistake is one `error:` line and exit 2 (no per-rank copies, no
#                            launcher traceback)
# pretrain_run LAUNCHER...   run torchrun with the stop signals routed to the ranks, and
#                            return the node's status (the trainer's own 2 or 3 when a rank
#                            ended with it, 0 when all $PRETRAIN_NPROC ranks exited 0)

PRETRAIN_LAUNCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export PRETRAIN_LAUNCH_DIR

# Print the comment block at the top of a script (after #! and #SBATCH lines) as its help.
pretrain_help() {
    local line
    while IFS= read -r line; do
        case "$line" in
            '#!'* | '#SBATCH'* | '# shellcheck'*) ;;
            '#') echo ;;
            '# '*) echo "${line#\# }" ;;
            *) break ;;
        esac
    done <"$1"
}

pretrain_help_if_asked() {
    case "${2:-}" in
        -h | --help) pretrain_help "$1"; exit 0 ;;
    esac
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then  # run rather than sourced: show this help
    pretrain_help "$0"
    exit 0
fi

# A launcher's start (`pretrain_setup "$0" "$@"`): its --help when ARGS start with -h/--help,
# then the shared settings (launch/env.sh: it only sets and exports variables).
pretrain_setup() {
    pretrain_help_if_asked "$@"
    # shellcheck source=launch/env.sh
    . "$PRETRAIN_LAUNCH_DIR/env.sh"
}

# `error: ...` on stderr and exit 2: the trainer's convention for mistakes the user can fix
# (the auto-resume wrapper does not retry those).
pretrain_die() {
    echo "error: $*" >&2
    exit 2
}

# Processes per node: $NPROC_PER_NODE, else every visible GPU, else 1 (CPU).
pretrain_nproc() {
    if [ -n "${NPROC_PER_NODE:-}" ]; then
        echo "$NPROC_PER_NODE"
        return
    fi
    local n=0
    if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
        local IFS=,
        # shellcheck disable=SC2086  # split the list on commas
        set -- $CUDA_VISIBLE_DEVICES
        n=$#
    elif command -v nvidia-smi >/dev/null 2>&1; then
        n=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    fi
    if [ "${n:-0}" -gt 0 ]; then echo "$n"; else echo 1; fi
}

# Set PRETRAIN_ARGS to the trainer's arguments for `CONFIG [overrides...]`.
pretrain_trainer_args() {
    [ $# -ge 1 ] || pretrain_die "missing CONFIG (a YAML file, see configs/); run with --help for usage"
    local config=$1
    shift
    [ -f "$config" ] || pretrain_die "config file $config not found (run from the repository root, or give a path)"
    PRETRAIN_ARGS=(-m pretrain.train --config "$config")
    if [ -n "${PRETRAIN_TIMEOUT_MINUTES:-}" ]; then
        PRETRAIN_ARGS+=("parallel.timeout_minutes=$PRETRAIN_TIMEOUT_MINUTES")
    fi
    PRETRAIN_ARGS+=("$@")
}

# The trainer's own validation (config, layout, DeepSpeed config) for a world of $1 processes,
# run once here before any rank starts. Only its `error:` line is shown (a crash shows it all).
pretrain_check() {
    local out rc=0
    out=$("$PRETRAIN_PYTHON" "${PRETRAIN_ARGS[@]}" --check --world-size "$1" 2>&1 >/dev/null) || rc=$?
    if [ "$rc" != 0 ]; then
        grep '^error:' <<<"$out" >&2 || printf '%s\n' "$out" >&2
        exit "$rc"
    fi
}

# PIDs of every process below $1 (read from /proc: no procps needed).
pretrain_descendants() {
    local f line ppid pid kids=()
    for f in /proc/[0-9]*/stat; do
        { read -r line <"$f"; } 2>/dev/null || continue
        line=${line##*) }  # after "pid (comm) ": "STATE PPID ..."
        ppid=${line#* }
        ppid=${ppid%% *}
        if [ "$ppid" = "$1" ]; then
            pid=${f#/proc/}
            kids+=("${pid%/stat}")
        fi
    done
    for pid in "${kids[@]}"; do
        echo "$pid"
        pretrain_descendants "$pid"
    done
}

_pretrain_signal_ranks() {
    local pid
    [ -n "${_PRETRAIN_CHILD:-}" ] || return 0
    echo "launch: got SIG$1; passing it to the ranks (they save a checkpoint and exit 0)" >&2
    for pid in $(pretrain_descendants "$_PRETRAIN_CHILD"); do
        kill -s "$1" "$pid" 2>/dev/null || true
    done
}

_pretrain_signal_child() {
    [ -n "${_PRETRAIN_CHILD:-}" ] || return 0
    echo "launch: got SIG$1; passing it to the launcher (pid $_PRETRAIN_CHILD)" >&2
    kill -s "$1" "$_PRETRAIN_CHILD" 2>/dev/null || true
}

# The node's exit status from the launcher's ($1) and the ranks' own (written by rank.sh):
# torchrun exits 1 whatever its ranks did, but the trainer's 2 (configuration error) and
# 3 (non-finite losses) must reach the auto-resume wrapper, which does not retry them; and
# when all $PRETRAIN_NPROC ranks of the node exited 0 (finished, or saved a checkpoint on
# SIGTERM, after which torchrun still exits 1), the node succeeded.
pretrain_node_status() {
    local rc=$1 f code best='' zeros=0
    if [ "$rc" != 0 ] && [ -d "${PRETRAIN_STATUS_DIR:-}" ]; then
        for f in "$PRETRAIN_STATUS_DIR"/rank_*; do
            [ -f "$f" ] || continue
            read -r code <"$f" || continue
            case "$code" in
                0) zeros=$((zeros + 1)) ;;
                2) best=2 ;;
                3) [ "$best" = 2 ] || best=3 ;;
            esac
        done
        if [ -z "$best" ] && [ "$zeros" -gt 0 ] && [ "$zeros" = "${PRETRAIN_NPROC:-}" ]; then
            best=0
        fi
    fi
    echo "${best:-$rc}"
}

# Run a launcher (torchrun) and return the node's exit status, with signals handled for
# training:
#   SIGUSR1 (SLURM's warning before the time limit, or yours): the launcher itself ignores it
#     and every rank gets it, so the ranks save a checkpoint and exit 0, and so does the launcher.
#   SIGTERM / SIGINT: passed to the launcher, which passes SIGTERM on to the ranks (checkpoint,
#     exit 0) and kills them after PET_SHUTDOWN_TIMEOUT seconds; the node exits 0 when all
#     its ranks did (set PRETRAIN_NPROC to their number).
pretrain_run() {
    _PRETRAIN_CHILD=
    PRETRAIN_STATUS_DIR=$(mktemp -d "${TMPDIR:-/tmp}/pretrain-status.XXXXXX")
    export PRETRAIN_STATUS_DIR
    mkdir -p "$PRETRAIN_LOG_DIR"
    local launcher_log="$PRETRAIN_LOG_DIR/launcher.log"
    trap '_pretrain_signal_ranks USR1' USR1
    trap '_pretrain_signal_child TERM' TERM
    trap '_pretrain_signal_child INT' INT
    (
        trap '' USR1  # inherited through exec: the launcher survives SIGUSR1 sent to the whole job
        # The launcher's own stderr (its tracebacks when a rank fails or on SIGTERM) goes to a file;
        # the ranks' output does not pass through it (rank.sh: console for rank 0, per-rank files).
        exec "$@" 2>>"$launcher_log"
    ) &
    _PRETRAIN_CHILD=$!
    local rc
    while :; do
        rc=0
        wait "$_PRETRAIN_CHILD" || rc=$?
        # >128 with the child still there: `wait` was interrupted by one of our traps.
        if [ "$rc" -gt 128 ] && kill -0 "$_PRETRAIN_CHILD" 2>/dev/null; then
            continue
        fi
        break
    done
    trap - USR1 TERM INT
    local launcher_rc=$rc
    rc=$(pretrain_node_status "$rc")
    pretrain_report_failure "$launcher_rc" "$rc" "$launcher_log"
    rm -rf "$PRETRAIN_STATUS_DIR"
    return "$rc"
}

# The last `error:` line of this run (after the last `====` header) in rank $1's log.
_pretrain_error_line() {
    awk '/^==== /{e=""} /^error:/{e=$0} END{if (e != "") print e}' \
        "$(printf '%s/rank_%05d.log' "$PRETRAIN_LOG_DIR" "$1")" 2>/dev/null
}

# After a failed run: the `error:` line of any rank other than 0 that ended with the trainer's
# 2 or 3, each distinct line once and not rank 0's (on the console already), and the
# launcher's log when the ranks crashed.
pretrain_report_failure() {
    local launcher_rc=$1 node_rc=$2 log=$3 f rank line seen
    [ "$node_rc" != 0 ] || return 0
    seen=$'\n'$(_pretrain_error_line 0)$'\n'
    for f in "$PRETRAIN_STATUS_DIR"/rank_*; do
        [ -f "$f" ] || continue
        rank=${f##*rank_}
        [ "$rank" != 0 ] || continue
        case "$(cat "$f")" in
            2 | 3)
                line=$(_pretrain_error_line "$rank")
                if [ -n "$line" ] && [[ "$seen" != *$'\n'"$line"$'\n'* ]]; then
                    echo "launch: rank $rank: $line" >&2
                    seen+="$line"$'\n'
                fi ;;
        esac
    done
    if [ "$node_rc" != 2 ] && [ "$node_rc" != 3 ] && [ "$launcher_rc" != 0 ] && [ -s "$log" ]; then
        echo "launch: the launcher exited $launcher_rc; the end of $log:" >&2
        tail -n 40 "$log" >&2
    fi
}
