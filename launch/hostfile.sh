#!/usr/bin/env bash
# launch/hostfile.sh HOSTFILE CONFIG [overrides...]: train on the nodes of a hostfile with the
# DeepSpeed launcher, for clusters where this node can ssh (pdsh) to every node.
#
#   launch/hostfile.sh hosts.txt configs/gpt2-124m.yaml data.paths=[data/shards]
#
# HOSTFILE, one node per line (MPI style; the first node is node 0):
#   # comments and blank lines are ignored
#   worker-0 slots=8
#   worker-1 slots=8
#
# Runs `deepspeed --hostfile HOSTFILE` (pdsh over ssh: passwordless ssh from this node to
# every node, pdsh installed here). Every node needs the repository at this same path and
# the same Python environment. The environment reaches the nodes through a DeepSpeed env
# file ($PRETRAIN_LOG_DIR/deepspeed_env, passed as DS_ENV_FILE) holding the exported
# PRETRAIN_*, NCCL_*, GLOO_*, TORCH_*, PET_*, OMP_/MKL_NUM_THREADS, PATH, LD_LIBRARY_PATH,
# VIRTUAL_ENV, HF_* variables, the names in $PRETRAIN_EXTRA_ENV, and your own
# ~/.deepspeed_env and ./.deepspeed_env lines (which win).
#
# Environment:
#   MASTER_ADDR       address of node 0 as the other nodes reach it (default: its hostfile name)
#   MASTER_PORT       default 29500
#   PRETRAIN_EXTRA_ENV   more variable names to send to the nodes, space-separated
#   PRETRAIN_NO_SSH=1    DeepSpeed's no-ssh mode: run this script on every node yourself,
#                        with NODE_RANK=0..N-1 (the line of the node in HOSTFILE)
#   PRETRAIN_DS_ARGS     extra arguments for the deepspeed launcher (e.g. --ssh_port 2222)
#   and launch/env.sh (interface, timeouts, per-rank log directory).
#
# Per-rank logs: $PRETRAIN_LOG_DIR/rank_NNNNN.log on each node; rank 0 prints to the console.
# If a rank fails, DeepSpeed stops the others and this script exits non-zero; a node that
# hangs or vanishes makes the others fail within parallel.timeout_minutes.
set -euo pipefail
# shellcheck source=launch/common.sh
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"
pretrain_setup "$0" "$@"
[ $# -ge 2 ] || pretrain_die "usage: launch/hostfile.sh HOSTFILE CONFIG [overrides...] (see --help)"
hostfile=$1
shift
[ -f "$hostfile" ] || pretrain_die "hostfile $hostfile not found"
pretrain_trainer_args "$@"

# Check the hostfile here, with a clear message, rather than in DeepSpeed's traceback.
first_host=
nodes=0
slots=0
lineno=0
while IFS= read -r line || [ -n "$line" ]; do
    lineno=$((lineno + 1))
    line=${line#"${line%%[![:space:]]*}"}  # strip leading blanks
    case "$line" in '' | '#'*) continue ;; esac
    if ! [[ "$line" =~ ^([^[:space:]]+)[[:space:]]+slots=([0-9]+)([[:space:]]|$) ]]; then
        pretrain_die "$hostfile line $lineno: expected 'HOST slots=N', got: $line"
    fi
    [ -n "$first_host" ] || first_host=${BASH_REMATCH[1]}
    nodes=$((nodes + 1))
    slots=$((slots + BASH_REMATCH[2]))
done <"$hostfile"
[ "$nodes" -gt 0 ] || pretrain_die "$hostfile lists no nodes (expected lines like 'worker-0 slots=8')"

python_path=$("$PRETRAIN_PYTHON" -c 'import sys; print(sys.executable)') ||
    pretrain_die "PRETRAIN_PYTHON=$PRETRAIN_PYTHON does not run"
export PRETRAIN_PYTHON=$python_path  # the same interpreter path on every node
pretrain_check "$slots"

# The environment for the nodes, as a DeepSpeed env file (NAME=VALUE per line).
mkdir -p "$PRETRAIN_LOG_DIR"
env_file="$PRETRAIN_LOG_DIR/deepspeed_env"
{
    while IFS= read -r name; do
        case "$name" in
            PRETRAIN_* | NCCL_* | GLOO_* | TORCH_* | PET_* | HF_* | OMP_NUM_THREADS | MKL_NUM_THREADS | \
                PATH | LD_LIBRARY_PATH | VIRTUAL_ENV | PYTHONUNBUFFERED) ;;
            *) [[ " ${PRETRAIN_EXTRA_ENV:-} " == *" $name "* ]] || continue ;;
        esac
        value=${!name}
        # DeepSpeed writes `export NAME="VALUE"` into a shell command line: skip what would break it.
        if [[ "$value" == *[\"\$\`\\]* || "$value" == *$'\n'* ]]; then
            echo "launch/hostfile.sh: not sending $name to the nodes (quotes, \$, \` or newlines in its value)" >&2
            continue
        fi
        printf '%s=%s\n' "$name" "$value"
    done < <(compgen -e | sort)
    for f in "$HOME/.deepspeed_env" ./.deepspeed_env; do
        [ -f "$f" ] && grep -v '^[[:space:]]*\(#\|$\)' "$f"
    done
} >"$env_file.tmp"
mv "$env_file.tmp" "$env_file"
export DS_ENV_FILE=$env_file  # absolute, so DeepSpeed reads this file (it looks in ~ and .)

ds=("$python_path" -m deepspeed.launcher.runner --hostfile "$hostfile"
    --master_addr "${MASTER_ADDR:-$first_host}" --master_port "${MASTER_PORT:-29500}")
if [ "${PRETRAIN_NO_SSH:-0}" = 1 ]; then
    [ -n "${NODE_RANK:-}" ] || pretrain_die "PRETRAIN_NO_SSH=1 needs NODE_RANK (this node's line in $hostfile, from 0)"
    ds+=(--no_ssh --node_rank "$NODE_RANK")
fi
if [ -n "${PRETRAIN_DS_ARGS:-}" ]; then
    read -r -a extra <<<"$PRETRAIN_DS_ARGS"
    ds+=("${extra[@]}")
fi
echo "launch/hostfile.sh: $nodes node(s) from $hostfile, node 0 ${MASTER_ADDR:-$first_host};" \
    "env for the nodes in $env_file; per-rank logs in $PRETRAIN_LOG_DIR" >&2
exec "${ds[@]}" --no_python --no_local_rank "$PRETRAIN_LAUNCH_DIR/rank.sh" "$python_path" "${PRETRAIN_ARGS[@]}"
