#!/usr/bin/env bash
# The GPU throughput suite: one command, one GPU, <= 8 minutes (issue 12).
#
#   tools/gpu_suite.sh            # 124M (B=16, T=1024) and 1.3B (B=8, T=1024), bf16
#   tools/gpu_suite.sh --smoke    # the same suite on a tiny model, on CPU too (tests/test_bench.py)
#
# Per model: tools/bench_train.py --suite runs, alternating, plain PyTorch eager, plain PyTorch
# compiled (tools/plain_gpt.py), ours at ZeRO-1 eager and ours at ZeRO-1 compiled (train.compile),
# and prints one table: tokens/s, MFU, peak memory and the ratio to plain compiled. Then
# tools/bench_memory.py --device cuda reports the trainer's peak GPU memory at ZeRO-1 (124M), and
# tests/sync_probe.py the trainer's device synchronizations, blocking host/device copies and
# device-to-host reads per step (ZeRO-1 bf16, 124M; on a GPU torch's sync debug mode counts too).
# Extra arguments go to every bench_train.py call (e.g. --repeat 2, --steps 30).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}

# syncs MAX_STEPS INTERVAL TRAINER_OVERRIDES...: the probe's counts per step, rank by rank
syncs() {
    local steps=$1 interval=$2 tmp
    shift 2
    tmp=$(mktemp -d)
    "$PY" tests/sync_probe.py "$tmp/syncs" data.synthetic=true "train.out_dir=$tmp/run" "train.max_steps=$steps" \
        "logging.interval=$interval" checkpoint.interval=0 train.eval_interval=0 logging.tensorboard=false \
        parallel.zero_stage=1 train.precision=bf16 "$@" > "$tmp/log" 2>&1 || { tail -20 "$tmp/log"; rm -rf "$tmp"; return 1; }
    "$PY" tests/sync_probe.py --summary "$tmp/syncs" "$interval" "$steps"
    rm -rf "$tmp"
}

if [[ "${1:-}" == "--smoke" ]]; then
    shift
    "$PY" tools/bench_train.py --suite --smoke parallel.zero_stage=1 "$@"
    echo "== synchronizations per step: the trainer at ZeRO-1 bf16, tiny model"
    syncs 6 4 train.device=cpu model.n_layer=2 model.d_model=64 model.n_head=2 model.vocab_size=512 \
        model.seq_len=32 train.micro_batch_size=2 train.global_batch_size=8
    exit 0
fi
COMMON=(--suite --steps 20 --warmup 8 --repeat 1 parallel.zero_stage=1 train.precision=bf16)
echo "== 124M: 12 x 768, 12 heads, T 1024, B 16"
"$PY" tools/bench_train.py --layers 12 --d-model 768 --heads 12 --vocab 50304 --seq 1024 --batch 16 \
    "${COMMON[@]}" "$@"
echo "== 1.3B: 24 x 2048, 16 heads, T 1024, B 8"
"$PY" tools/bench_train.py --layers 24 --d-model 2048 --heads 16 --vocab 50304 --seq 1024 --batch 8 \
    "${COMMON[@]}" "$@"
echo "== memory: the trainer at ZeRO-1, 124M, one GPU"
"$PY" tools/bench_memory.py --device cuda --world 1 --runs z1 --layers 12 --d-model 768 --heads 12 \
    --vocab 50304 --seq 1024 --batch 16 --precision bf16
echo "== synchronizations per step: the trainer at ZeRO-1 bf16, 124M, one GPU"
syncs 12 10 model.n_layer=12 model.d_model=768 model.n_head=12 model.vocab_size=50304 model.seq_len=1024 \
    train.micro_batch_size=16 train.global_batch_size=16
