"""lm-eval tasks on our model: loading tasks (cached, local ones first), one evaluation with the
RNG states kept, the metrics, and the in-loop entry point (`LiveEval`, `evaluate_live`).

Every call here is collective when a process group exists: each rank loads the same tasks and
runs the same lm-eval evaluation; the adapter splits the model work over the data-parallel
copies and hands every rank all answers (`pretrain.eval.lm`).
"""
from __future__ import annotations

import contextlib
import random

import numpy as np
import torch
import torch.distributed as dist

from pretrain.errors import UserError

SEEDS = {"random_seed": 0, "numpy_random_seed": 1234, "torch_random_seed": 1234, "fewshot_random_seed": 1234}


def require_lm_eval() -> None:
    """UserError unless lm-eval is installed (it is the optional extra pretrain[eval])."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise UserError("evaluation tasks need lm-eval, an optional extra: pip install 'pretrain[eval]'") from None


@contextlib.contextmanager
def kept_rng():
    """Python, numpy and torch (CPU and CUDA) RNG states restored on exit: an evaluation seeds
    them (for its own reproducibility) without changing what training draws next."""
    py, npy, cpu = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def dist_rank() -> int:
    return dist.get_rank() if _world() > 1 else 0


def _everyone(value) -> list:
    """`value` of every rank (collective; [value] without a process group)."""
    if _world() == 1:
        return [value]
    out = [None] * _world()
    dist.all_gather_object(out, value)
    return out


class TaskSet:
    """lm-eval tasks by name, built once and reused (task objects keep their loaded datasets).

    Names are looked up in `include_path` alone first: lm-eval's index of its built-in tasks takes
    seconds to build, so it is built only for a name the include path does not define.
    `strict` (pretrain-eval): a task that cannot load is a UserError. Otherwise (in-loop): it is
    reported once through `log` and dropped, and the others run. Either way every rank agrees.
    """

    def __init__(self, names: list[str], include_path: str | None = None, strict: bool = True, log=print):
        require_lm_eval()
        self.names, self.include_path, self.strict, self.log = list(names), include_path, strict, log
        self._local = self._full = None
        self.loaded: dict[str, object] = {}
        self.failed: set[str] = set()

    @property
    def manager(self):
        return self._local or self._full

    def _manager_of(self, name: str):
        from lm_eval.tasks import TaskManager

        if self.include_path:
            if self._local is None:
                self._local = TaskManager(include_path=self.include_path, include_defaults=False)
            if name in self._local.all_tasks:
                return self._local
        if self._full is None:
            self._full = TaskManager(include_path=self.include_path)
        return self._full if name in self._full.all_tasks else None

    def _load_one(self, name: str):
        tm = self._manager_of(name)
        if tm is None:
            where = f"the include path {self.include_path}" if self.include_path else "an include path (none given)"
            raise LookupError(f"unknown task {name!r}: not defined in {where} nor among lm-eval's tasks "
                              "(`lm-eval ls tasks` lists those)")
        try:
            d = tm.load([name])
        except Exception as e:  # noqa: BLE001 -- the task's own loading code and its data files
            raise LookupError(f"task {name!r} cannot be loaded: {type(e).__name__}: {e}") from None
        return d["groups"].get(name) or d["tasks"].get(name) or list(d["tasks"].values())

    def objects(self) -> list:
        """The loaded tasks (lm-eval Task / Group objects), loading those not tried yet."""
        errors = []
        for name in self.names:
            if name in self.loaded or name in self.failed:
                continue
            try:
                self.loaded[name] = self._load_one(name)
            except LookupError as e:
                errors.append(str(e))
                self.failed.add(name)
                if not self.strict and dist_rank() == 0:
                    self.log(f"warning: {e}; evaluating without it")
        if self.strict:
            first = next((e for errs in _everyone(errors) for e in errs), None)
            if first:
                raise UserError(first)
        else:  # a task that failed on any rank is dropped on every rank: the requests must agree
            for names in _everyone(sorted(self.loaded)):
                for name in set(self.loaded) - set(names):
                    del self.loaded[name]
                    self.failed.add(name)
                    if dist_rank() == 0:
                        self.log(f"warning: task {name!r} did not load on every rank; evaluating without it")
        objs = []
        for name in self.names:
            obj = self.loaded.get(name)
            objs.extend(obj if isinstance(obj, list) else [] if obj is None else [obj])
        return objs


def simple_evaluate(lm, tasks: TaskSet, limit=None, num_fewshot=None, log_samples: bool = False):
    """lm-eval's `simple_evaluate` (its results dict, None on ranks other than the first of each
    node), bootstrap off, its seeds set for the call and the RNG states restored after."""
    import lm_eval

    with kept_rng():  # loading a task's data draws from `random` too (datasets' fingerprints)
        objs = tasks.objects()
        return lm_eval.simple_evaluate(model=lm, tasks=objs, task_manager=tasks.manager, limit=limit,
                                       num_fewshot=num_fewshot, bootstrap_iters=0, log_samples=log_samples,
                                       **SEEDS)


def evaluate(lm, tasks: TaskSet, limit=None) -> dict:
    """lm-eval's `evaluate` on every rank: the same results without simple_evaluate's environment
    report (seconds per call), for evaluations repeated during training."""
    from lm_eval.evaluator import evaluate as lm_evaluate

    with kept_rng():  # loading a task's data draws from `random` too (datasets' fingerprints)
        objs = tasks.objects()
        if not objs:
            return {}
        loaded = tasks.manager.load(objs)
        for task in loaded["tasks"].values():  # what simple_evaluate does to each task
            if task.get_config("num_fewshot") is None:
                task.set_config(key="num_fewshot", value=0)
            task.set_fewshot_seed(seed=SEEDS["fewshot_random_seed"])
        random.seed(SEEDS["random_seed"])
        np.random.seed(SEEDS["numpy_random_seed"])
        torch.manual_seed(SEEDS["torch_random_seed"])
        return lm_evaluate(lm=lm, task_dict=loaded, limit=limit, bootstrap_iters=0, log_samples=False)


def metrics(results: dict | None) -> dict[str, dict[str, float]]:
    """{task or group: {metric: value}} from lm-eval's results ("acc,none" -> "acc"; another
    filter is appended: "exact_match,strict-match" -> "exact_match_strict-match"); no stderr."""
    out = {}
    for task, res in ((results or {}).get("results") or {}).items():
        m = {}
        for key, v in res.items():
            metric, _, filt = key.partition(",")
            if not filt or metric.endswith("_stderr") or isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            m[metric if filt == "none" else f"{metric}_{filt}"] = float(v)
        out[task] = m
    return out


def table(results: dict) -> str:
    """lm-eval's own table of the results (and of the groups, when there are any)."""
    from lm_eval.utils import make_table

    text = make_table(results)
    if results.get("groups"):
        text += "\n" + make_table(results, "groups")
    return text


def results_json(results: dict) -> str:
    """The results as lm-eval's own command writes them (what it cannot serialise, as text)."""
    import json

    from lm_eval.utils import handle_non_serializable

    return json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False) + "\n"


class LiveEval:
    """The evaluation during training of one run: tasks loaded once, then, at each interval,
    `metrics = live(engine)` on every rank (collective), which returns
    {task: {metric: value}} on every rank, for the tasks that loaded.

    `engine`: the DeepSpeed engine (or the plain model) in the run's layout; `layout`, `topo`: the
    run's `config.validate.Layout` and `parallel.topology.Topology` (None for a plain model);
    `tokenizer`: the run's (`pretrain.data.tokenizer`). The engine is put in eval mode for the call
    and back after; the RNG states are restored."""

    def __init__(self, cfg, layout, topo, tokenizer, tasks: list[str], limit: int | None = None,
                 include_path: str | None = None, log=print, batch_tokens: int = 4096):
        from pretrain.eval.requests import prefix_token

        self.cfg, self.layout, self.topo, self.tok = cfg, layout, topo, tokenizer
        self.limit, self.batch_tokens = limit, batch_tokens
        prefix_token(tokenizer)  # a tokenizer that cannot begin a text fails at start-up, not at an interval
        self.tasks = TaskSet(tasks, include_path, strict=False, log=log)

    def prepare(self) -> list[str]:
        """Load the tasks now (collective; else the first evaluation does): the names that loaded."""
        with kept_rng():
            self.tasks.objects()
        return list(self.tasks.loaded)

    def __call__(self, engine) -> dict[str, dict[str, float]]:
        from pretrain.eval.lm import PretrainLM
        from pretrain.eval.scorer import make_scorer

        module = getattr(engine, "module", engine)
        scorer = make_scorer(engine, self.cfg.model, self.tok.vocab_size, self.topo,
                             zero_stage=getattr(self.layout, "zero_stage", 0),
                             sequence_parallel=self.cfg.parallel.sequence_parallel)
        was = module.training
        engine.eval()
        try:
            return metrics(evaluate(PretrainLM(scorer, self.tok, batch_tokens=self.batch_tokens), self.tasks,
                                    self.limit))
        except UserError as e:  # every rank has the same requests, so every rank is here
            if dist_rank() == 0:
                self.tasks.log(f"warning: evaluation skipped: {e}")
            return {}
        finally:
            engine.train(was)


_LIVE: dict = {}


def evaluate_live(engine, cfg, layout, topo, tokenizer, tasks: list[str], limit: int | None = None,
                  include_path: str | None = None, log=print) -> dict[str, dict[str, float]]:
    """`LiveEval(...)(engine)`, the LiveEval kept between calls (tasks load once per process)."""
    key = (id(topo), tuple(tasks), limit, include_path)
    if key not in _LIVE:
        _LIVE[key] = LiveEval(cfg, layout, topo, tokenizer, tasks, limit, include_path, log)
    return _LIVE[key](engine)
