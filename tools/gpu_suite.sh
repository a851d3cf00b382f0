#!/usr/bin/env bash
# The GPU throughput suite: one command, one GPU, <= 8 minutes (issue 12).
#
#   tools/gpu_suite.sh            # 124M (B=16, T=1024) and 1.3B (B=8, T=1024), bf16
#   tools/gpu_suite.sh --smoke    # the same suite on a tiny model, on CPU too (tests/test_bench.py)
#
# Per model: tools/bench_train.py --suite runs, alternating, plain PyTorch eager, plain PyTorch
# compiled (tools/plain_gpt.py), ours at ZeRO-1 eager and ours at ZeRO-1 compiled (train.compile),
# and prints one table: tokens/s, MFU, peak memory and the ratio to plain compiled. Then
# tools/bench_memory.py --device cuda reports the trainer's peak GPU memory at ZeRO-1 (124M).
# Extra arguments go to every bench_train.py call (e.g. --repeat 2, --steps 30).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
if [[ "${1:-}" == "--smoke" ]]; then
    shift
    "$PY" tools/bench_train.py --suite --smoke parallel.zero_stage=1 "$@"
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
