"""checkpoint.init_from: a run that starts from imported weights (import-hf) or from one of our
checkpoints (continued pretraining). Step, schedule and data position stay at 0; a resume of the
run itself overrides all of it."""
from __future__ import annotations

from pathlib import Path

from pretrain.checkpoint import store


def weights(cfg, layout, shape: dict, log):
    """(a model-building source of the weights, our checkpoint's directory or None for an
    import-hf directory). With checkpoint.init_optimizer the source is None: the optimizer load
    after the engine is built (`optimizer`) brings the weights too."""
    from pretrain.interop.init_weights import META, checkpoint_source, init_source

    src = cfg.checkpoint.init_from
    if (Path(src) / META).is_file() or (Path(src) / "init" / META).is_file() or src.endswith(".safetensors"):
        return init_source(src, cfg, layout, log), None
    from pretrain.checkpoint.resume_check import check_init

    tag_dir = store.resolve_tag_dir(src, cfg.checkpoint.verify, split=True)
    saved = store.read_state(tag_dir)
    check_init(saved, cfg, shape, f"checkpoint.init_from={src}")
    source = None
    if not cfg.checkpoint.init_optimizer:
        source = checkpoint_source(tag_dir, layout.padded_vocab_size, f"checkpoint.init_from={src}")
    log(f"initialised from {tag_dir} (step {saved.get('step')}, "
        f"{'weights and optimizer state' if cfg.checkpoint.init_optimizer else 'weights only'}); "
        "this run starts at step 0 and sample 0 of its data")
    return source, tag_dir


def optimizer(engine, tag_dir: Path, now: dict, log, topo) -> None:
    """checkpoint.init_optimizer: weights and optimizer state of `tag_dir`, in any layout (`now`:
    this run's {'dp', 'tp', 'pp', 'zero_stage'})."""
    saved = store.read_state(tag_dir)
    if saved.get("layout") != now:
        from pretrain.interop.reshard import load_resharded

        load_resharded(engine, tag_dir, saved.get("layout") or {}, now, log, topo=topo)
    else:
        load_path, _ = store.engine_load(engine, tag_dir, load_optimizer_states=True, load_lr_scheduler_states=False)
        store.finish_load(load_path, tag_dir, rng=False)
