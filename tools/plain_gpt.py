"""The plain-PyTorch reference loop that tools/bench_train.py compares the trainer against.

One process, no DeepSpeed, nothing of the trainer: the same `pretrain.model.GPT` (so any
model config can be compared), its loss taken the way a plain script does it
(`F.cross_entropy` over the full fp32 logits), torch AdamW (fused on CUDA, the default
implementation on CPU), `clip_grad_norm_`, bf16 autocast on CUDA and fp32 on CPU, and
optionally `torch.compile` of the whole model. Random tokens, seeded; `--warmup` untimed steps,
then `--steps` timed ones. Prints one line `RESULT {json}`: step_ms, tokens_per_sec, tflops,
mfu (known GPUs), peak_mem_gib (CUDA max_memory_allocated), loss.

    python tools/plain_gpt.py --model-json '{"n_layer": 2, "d_model": 64, "n_head": 4, "seq_len": 32}' \\
        --vocab 512 --batch 2 --steps 3 --warmup 1
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the pretrain package, from a clone

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from pretrain.config.schema import ModelConfig  # noqa: E402
from pretrain.model import GPT  # noqa: E402
from pretrain.model import param_groups  # noqa: E402
from pretrain.run.monitor import peak_flops  # noqa: E402
from pretrain.model.size import flops_per_token  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model-json", required=True, help="ModelConfig fields as JSON (seq_len included)")
    p.add_argument("--vocab", type=int, required=True, help="embedding rows (the padded vocabulary)")
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--mode", choices=["eager", "compile"], default="eager")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)

    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.manual_seed(a.seed)
    cfg = ModelConfig(**{**json.loads(a.model_json), "dropout": 0.0})
    model = GPT(cfg, a.vocab).to(dev)
    run = torch.compile(model) if a.mode == "compile" else model
    opt = torch.optim.AdamW(param_groups(model.named_parameters(), 0.1), lr=3e-4, betas=(0.9, 0.95), fused=cuda)

    def step(x, y):
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cuda):
            logits = run(x)
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    gen = torch.Generator(device=dev).manual_seed(a.seed + 1)
    data = torch.randint(0, a.vocab, (4, a.batch, cfg.seq_len + 1), device=dev, generator=gen)
    batches = [(d[:, :-1].contiguous(), d[:, 1:].contiguous()) for d in data]
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for i in range(a.warmup):
        step(*batches[i % 4])
    sync()
    t0 = time.perf_counter()
    for i in range(a.steps):
        loss = step(*batches[i % 4])
    sync()
    seconds = (time.perf_counter() - t0) / a.steps
    tokens_per_sec = a.batch * cfg.seq_len / seconds
    flops = tokens_per_sec * flops_per_token(cfg, a.vocab)
    peak = peak_flops(dev, "bf16" if cuda else "fp32", None)
    print("RESULT " + json.dumps({
        "device": torch.cuda.get_device_name() if cuda else "cpu", "mode": a.mode,
        "step_ms": round(seconds * 1e3, 2), "tokens_per_sec": round(tokens_per_sec), "tflops": round(flops / 1e12, 3),
        "mfu": round(flops / peak, 4) if peak else None,
        "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        "loss": round(float(loss), 4)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
