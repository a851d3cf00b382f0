"""Per-rank memory of the real trainer under ZeRO 0-3 (and TP=2), beside the `--plan` estimate.

For each run (default: ZeRO-0, 1, 2, 3 with data parallelism over 2 ranks, then tensor
parallelism 2 with ZeRO-1) `world` worker processes (gloo, one thread each) train the same
model for `--steps` steps through `pretrain.run.trainer.Trainer` (the real config -> layout ->
DeepSpeed engine -> training loop; only the final checkpoint and validation are skipped, so
they do not add to the peak). Each rank measures:

  tensors, at the end of every optimizer step (inside the optimizer's `step()`, when the
  gradients and the Adam moments are all alive; the largest step is kept): every live tensor
  (the garbage collector's tensors plus the model's and the optimizer's parameters, their
  gradients and the optimizer state), deduplicated by storage, in bytes:
    weights   storages of the model's parameters (ZeRO-3: also their partitions `ds_tensor`;
              ZeRO 1/2: DeepSpeed's flat buffer the parameters are views of)
    master    the optimizer's parameters that are not model storages: DeepSpeed's fp32
              partition copies (ZeRO 1-3; also made in fp32)
    grads     `.grad` of the model's and of the optimizer's parameters
    optimizer the optimizer state (Adam exp_avg, exp_avg_sq, step)
    other     every other live tensor: DeepSpeed's gradient/communication buffers, the batch...
  activations: bytes saved for backward during one micro-batch's forward (a
    saved_tensors_hooks pack hook on the model, parameters excluded, storages deduplicated);
  RSS: resident memory at the start of the run (interpreter, torch, DeepSpeed, earlier runs'
    freed-but-cached pages) and its peak during the run (Linux VmHWM, reset per run with
    /proc/self/clear_refs; the peak also holds transient activation gradients and buffers).

The estimate is `pretrain.plan.estimate.memory_estimate(cfg, layout)` for the same config (its module
docstring says what it counts); its total is compared with the measured peak, the growth of
the rank's RSS during the run (peak - start), and the worst rank's difference is printed per
run (the issue's target: within 15%).

    python tools/bench_memory.py --smoke            # seconds (CI): a tiny model, every run
    python tools/bench_memory.py                    # REFERENCE.md CPU shape 6x384, V 50304, T 256, B 8
    python tools/bench_memory.py --config configs/gpt2-124m.yaml --runs z0 z3 tp2
    python tools/bench_memory.py --device cuda --world 1 --runs z1 --precision bf16   # GPU: adds
        torch.cuda.max_memory_allocated per rank and run (tools/gpu_suite.sh)
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import weakref
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tools/procmem.py, also in worker processes
from benchshape import ANCHOR, SMOKE, add_shape_args, fill_defaults, shape_overrides  # noqa: E402
from procmem import reset_peak_rss, status_bytes  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
GiB, MiB = 2**30, 2**20
RUNS = {"z0": ("ZeRO-0, DP=2", ["parallel.zero_stage=0"]),
        "z1": ("ZeRO-1, DP=2", ["parallel.zero_stage=1"]),
        "z2": ("ZeRO-2, DP=2", ["parallel.zero_stage=2"]),
        "z3": ("ZeRO-3, DP=2", ["parallel.zero_stage=3"]),
        "tp2": ("TP=2, ZeRO-1", ["parallel.tensor=2", "parallel.zero_stage=1"])}


# ------------------------------------------------------------------ worker side
class Probe:
    """Measures live tensor bytes at each optimizer step and saved activations per forward."""

    def __init__(self, engine, opt, earlier=None):
        import torch

        self.torch = torch
        self.engine, self.opt, self.model = engine, opt, engine.module
        self.model_params = list(self.model.parameters())
        self.opt_params = [p for g in opt.param_groups for p in g["params"]]
        self.earlier = earlier or {}  # tensors alive before this run: id -> weakref
        self.best: dict | None = None
        self.activations = 0
        self._seen: set = set()
        self._ctx = None
        orig = opt.step

        def step(*args, **kwargs):
            out = orig(*args, **kwargs)
            self.snapshot()
            return out

        opt.step = step  # DeepSpeed calls optimizer.step() (per param group under ZeRO 1/2)
        self.model.register_forward_pre_hook(self._pre)
        self.model.register_forward_hook(self._post)

    @staticmethod
    def _key(t):
        try:
            s = t.untyped_storage()
            return (t.device.type, s.data_ptr()), s.nbytes()
        except (RuntimeError, NotImplementedError):
            return None, 0

    # activations: what autograd saves during the forward, parameters left out
    def _pre(self, module, args):
        if self.torch.is_grad_enabled() and self._ctx is None:
            self._seen, self._bytes = set(), 0
            self._ctx = self.torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
            self._ctx.__enter__()

    def _post(self, module, args, out):
        if self._ctx is not None:
            self._ctx.__exit__(None, None, None)
            self._ctx = None
            self.activations = max(self.activations, self._bytes)

    def _pack(self, t):
        key, n = self._key(t)
        if key is not None and key not in self._seen:
            self._seen.add(key)
            params = {self._key(p)[0] for p in self.model_params if p.numel()}
            if key not in params:
                self._bytes += n
        return t

    def _earlier(self, obj) -> bool:
        ref = self.earlier.get(id(obj))
        return ref is not None and ref() is obj

    def snapshot(self) -> None:
        torch = self.torch
        cats: dict[str, int] = {"weights": 0, "master": 0, "grads": 0, "optimizer": 0, "other": 0}
        owner: dict = {}

        def claim(t, cat):
            if isinstance(t, torch.Tensor) and t.numel():
                key, n = self._key(t)
                if key is not None and key not in owner:
                    owner[key] = (cat, n, f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')}")

        for p in self.model_params:
            claim(p, "weights")
            claim(getattr(p, "ds_tensor", None), "weights")
        for p in self.opt_params:
            claim(p, "master")
        for p in self.model_params + self.opt_params:
            claim(p.grad, "grads")
        for st in self.opt.state.values():
            for v in st.values():
                claim(v, "optimizer")
        for obj in gc.get_objects():
            try:
                if isinstance(obj, torch.Tensor) and not self._earlier(obj):
                    claim(obj, "other")
            except ReferenceError:
                pass
        for cat, n, _ in owner.values():
            cats[cat] += n
        cats["total"] = sum(v for v in cats.values())
        # the largest unclassified storages (shape of one tensor viewing each), for the report
        cats["other_largest"] = sorted(([n, what] for cat, n, what in owner.values() if cat == "other"),
                                       reverse=True)[:4]
        if self.best is None or cats["total"] >= self.best["total"]:
            self.best = cats


def worker(spec_file: str) -> int:
    import torch

    from pretrain.config.load import load_config
    from pretrain.config.validate import resolve
    from pretrain.plan.estimate import memory_estimate
    from pretrain.run.trainer import Trainer

    spec = json.loads(Path(spec_file).read_text())
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(spec["threads"])

    class MemTrainer(Trainer):
        """The trainer with probes; no final checkpoint or validation (not part of a step's memory)."""

        def _loop(self):
            self.probe = Probe(self.engine, self.opt, self.earlier)
            return super()._loop()

        def _save(self):
            return Path("(not saved by bench_memory)")

        def _validate(self, which="val"):
            return None

    out = []
    for run in spec["runs"]:
        os.environ["MASTER_PORT"] = str(run["port"])
        cfg = load_config(spec["config"], run["overrides"])
        layout = resolve(cfg, world, None)
        gc.collect()
        earlier = {id(o): weakref.ref(o) for o in gc.get_objects() if isinstance(o, torch.Tensor)}
        resettable = reset_peak_rss()
        rss0 = status_bytes("VmRSS")
        t0 = time.perf_counter()
        cuda = cfg.train.device == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        tr = MemTrainer(cfg, layout)
        tr.earlier = earlier
        rc = tr.run()
        gpu_peak = torch.cuda.max_memory_allocated() if cuda else None
        peak = status_bytes("VmHWM")  # without a per-run reset: the process's peak so far
        est = memory_estimate(cfg, layout)
        out.append({"name": run["name"], "rank": rank, "rc": rc, "seconds": time.perf_counter() - t0,
                    "tensors": tr.probe.best, "activations": tr.probe.activations,
                    "rss_start": rss0, "rss_peak": peak, "peak_reset": resettable, "gpu_peak": gpu_peak,
                    "layout": {"dp": layout.dp, "tp": layout.tp, "zero": layout.zero_stage},
                    "estimate": {k: est[k] for k in ("params", "weights", "gradients", "optimizer", "buffers",
                                                      "activations", "activations_stored_attention", "logits",
                                                      "total", "total_stored_attention")}})
        del tr
        gc.collect()
    Path(spec["out"], f"rank{rank}.json").write_text(json.dumps(out))
    return 0


# ------------------------------------------------------------------ parent side
def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def _launch(a, runs: list, tmp: Path) -> list | None:
    """Start `a.world` worker processes for `runs` (in sequence inside them); their results, or None."""
    tmp.mkdir(parents=True, exist_ok=True)
    spec = {"config": a.config, "runs": runs, "out": str(tmp), "threads": a.threads}
    spec_file = tmp / "spec.json"
    spec_file.write_text(json.dumps(spec))
    # A fixed glibc mmap threshold: large blocks go back to the OS when freed, so the RSS peak
    # follows the live tensors (with the default, dynamic threshold, freed blocks stay in the heap
    # and the ranks' peaks differed by up to 170 MiB on the same run).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072",
           "OMP_NUM_THREADS": str(a.threads), "PYTHONUNBUFFERED": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(runs[0]["port"]), "WORLD_SIZE": str(a.world), "LOCAL_WORLD_SIZE": str(a.world)}
    env.pop("PRETRAIN_FAULTS", None)
    procs = []
    t0 = time.perf_counter()
    for r in range(a.world):
        e = {**env, "RANK": str(r), "LOCAL_RANK": str(r)}
        log = open(tmp / f"log{r}.txt", "w")
        procs.append((subprocess.Popen([sys.executable, __file__, "--worker", str(spec_file)], env=e, cwd=ROOT,
                                       stdout=log, stderr=subprocess.STDOUT), log))
    failed = None
    try:
        for r, (pr, log) in enumerate(procs):
            left = max(1.0, a.timeout - (time.perf_counter() - t0))
            try:
                rc = pr.wait(timeout=left)
            except subprocess.TimeoutExpired:
                rc = "timeout"
            if rc != 0 and failed is None:
                failed = (r, rc)
                for other, _ in procs:
                    if other.poll() is None:
                        other.kill()
    finally:
        for pr, log in procs:
            if pr.poll() is None:
                pr.kill()
                pr.wait()
            log.close()
    if failed:
        r, rc = failed
        print((tmp / f"log{r}.txt").read_text()[-4000:], file=sys.stderr)
        print(f"bench_memory: rank {r} failed ({rc}); logs in {tmp}", file=sys.stderr)
        return None
    return [x for r in range(a.world) for x in json.loads((tmp / f"rank{r}.json").read_text())]


def _parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--config", help="trainer YAML config (default: the built-in defaults + the shape below)")
    add_shape_args(p, "micro-batch per rank")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="cuda: ranks on GPUs (one each), also reporting torch.cuda.max_memory_allocated")
    p.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="threads per rank")
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--shared", action="store_true",
                   help="all runs in one process per rank (faster; RSS start then includes earlier runs)")
    p.add_argument("--smoke", action="store_true", help="a tiny model, --shared (seconds)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="extra trainer overrides section.key=value")
    a = p.parse_args()
    if a.smoke:
        fill_defaults(a, SMOKE)
        a.steps = 1  # Adam's moments exist after the first step
        a.shared = True
    elif a.config is None:
        fill_defaults(a, ANCHOR)
    return a


def _mib(n) -> str:
    return "-" if n is None else f"{n / MiB:,.1f}"


def main() -> int:
    a = _parse()
    if a.worker:
        return worker(a.worker)
    os.chdir(ROOT)
    tmp = Path(tempfile.mkdtemp(prefix="bench_memory_"))
    base = shape_overrides(a) + [
        "data.synthetic=true", f"train.precision={a.precision}", f"train.device={a.device}", "model.dropout=0.0",
        f"train.max_steps={a.steps}", "train.global_batch_size=null", "train.eval_interval=0",
        "logging.interval=1", "logging.tensorboard=false", "checkpoint.interval=0", "checkpoint.resume=none",
        "parallel.timeout_minutes=5"]
    ports = _free_ports(len(a.runs))
    runs = [{"name": RUNS[r][0], "port": port,
             "overrides": base + RUNS[r][1] + a.overrides + [f"train.out_dir={tmp / r}"]}
            for r, port in zip(a.runs, ports)]
    import importlib.metadata as md

    shape = " ".join(shape_overrides(a))
    print(f"bench_memory: {shape}, {a.precision}, {a.world} {a.device.upper()} ranks x {a.threads} thread(s), {a.steps} steps per run, "
          f"{'all runs in one process per rank' if a.shared else 'fresh processes per run'}; "
          f"torch {md.version('torch')}, deepspeed {md.version('deepspeed')}, python {platform.python_version()}, "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}", flush=True)
    t0 = time.perf_counter()
    res = []
    for i, group in enumerate([runs] if a.shared else [[r] for r in runs]):
        got = _launch(a, group, tmp / f"g{i}")
        if got is None:
            return 1
        res += got
    res.sort(key=lambda x: ([q["name"] for q in runs].index(x["name"]), x["rank"]))

    print("\nMiB per rank. measured: live tensors at the optimizer step / bytes saved for backward in one "
          "micro-batch / RSS; estimate: `--plan` memory_estimate. Tensors: weights + master (fp32 partition "
          "copy) + grads + optimizer state (Adam moments) + other (buffers) = total. The peak compared with "
          "the estimate's total is the RSS growth during the run (peak - start).")
    print("| run | rank | weights meas / est | grads meas / est | master + Adam meas / est | other tensors / est "
          "buffers | tensor total meas / est | activations meas / est | RSS start -> peak | peak growth meas / est "
          "(est / meas) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    worst: dict = {}
    for x in res:
        t, e = x["tensors"] or {}, x["estimate"]
        states = e["weights"] + e["gradients"] + e["optimizer"] + e["buffers"]
        opt = t.get("master", 0) + t.get("optimizer", 0)
        grow = x["rss_peak"] - x["rss_start"]
        ratio = e["total"] / grow if grow > 0 else float("nan")
        worst[x["name"]] = max(worst.get(x["name"], 0.0), abs(ratio - 1))
        x["estimate_over_peak"] = ratio
        print(f"| {x['name']} | {x['rank']} | {_mib(t.get('weights'))} / {_mib(e['weights'])} "
              f"| {_mib(t.get('grads'))} / {_mib(e['gradients'])} | {_mib(opt)} / {_mib(e['optimizer'])} "
              f"| {_mib(t.get('other'))} / {_mib(e['buffers'])} | {_mib(t.get('total'))} / {_mib(states)} "
              f"| {_mib(x['activations'])} / {_mib(e['activations'])} "
              f"| {_mib(x['rss_start'])} -> {_mib(x['rss_peak'])} | {_mib(grow)} / {_mib(e['total'])} ({ratio:.2f}) |")
    print("\nestimate vs measured peak, worst rank per run: "
          + ", ".join(f"{k} {100 * v:.0f}%" for k, v in worst.items())
          + f"; within 15% for every run: {all(v <= 0.15 for v in worst.values())}")
    print("\nlargest 'other' tensors at the optimizer step (rank 0; MiB, shape of a tensor viewing the storage):")
    for x in res:
        if x["rank"] == 0 and (x["tensors"] or {}).get("other_largest"):
            print(f"  {x['name']}: " + ", ".join(f"{n / MiB:,.1f} {what}" for n, what in x["tensors"]["other_largest"]))
    for x in res:
        if x.get("gpu_peak") is not None:
            print(f"GPU peak allocated (torch.cuda.max_memory_allocated): {x['name']} rank {x['rank']}: "
                  f"{_mib(x['gpu_peak'])} MiB")
    print("\nparameters per rank before sharding (estimate): "
          + ", ".join(sorted({f"{x['name']}: {x['estimate']['params']:,}" for x in res}))
          + f"; peak RSS reset per run: {all(x['peak_reset'] for x in res)}; load average {os.getloadavg()[0]:.2f}; "
          f"{time.perf_counter() - t0:.0f} s")
    print("RESULT " + json.dumps(res), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
