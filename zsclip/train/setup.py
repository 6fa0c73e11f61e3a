"""Everything a training run needs before its first step: checked data, a model with its tokenizer and
preprocessing (from a preset, a checkpoint, or the saved state of a run being resumed), the
optimizer, and the output folder with its log. Used by zsclip.train.loop.prepare.
"""

from __future__ import annotations

import random
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch

from zsclip.errors import UserError
from zsclip.train import data as pairs_data
from zsclip.train import parallel as tp
from zsclip.train import state as ts
from zsclip.train.schedule import build_optimizer

# Options that may differ when a run is resumed: they change how fast it goes, not what it computes
# (the process count and accum_steps change the global batch; the run goes on from the same sample,
# zsclip.train.batches).
RUNTIME_FIELDS = ("workers", "device", "output", "world_size", "accum_steps", "grad_checkpointing")
CACHE_BYTES = 2 << 30


def setup(config: Any, resume: bool, hooks: Any) -> tuple[Any, Any, dict[str, Any]]:
    from zsclip.core.devices import autocast, resolve_device, resolve_precision

    out = Path(config.output)
    world, device, config = tp.start(
        config, resolve_device
    )  # torchrun's processes join one group here
    state = tp.shared_state(
        world, lambda: _saved_state(out, resume)
    )  # read by rank 0, sent to the others
    if state is not None:
        config = _resumed_config(config, state)
    _check_config(config)
    dtype = resolve_precision(config.precision, device)
    shard_info, pairs, captions, samples = _training_data(config, world, state, hooks)
    if state is not None:
        model, tokenizer, preprocess, base_metadata = _from_state(state)
    else:
        model, tokenizer, preprocess, base_metadata = _new_model(config, captions, hooks)
    model.to(device).train()
    model.set_grad_checkpointing(config.grad_checkpointing)
    context = model.config.text.context_length
    truncated = tokenizer.count_truncated(captions, context) if captions else 0
    if truncated:
        hooks.warn(
            f"{truncated} of {len(captions)} captions are longer than the {context}-token context "
            "and will be truncated"
        )
    optimizer = build_optimizer(model, config.lr, config.weight_decay)
    scaler = tp.grad_scaler(device, dtype)
    step, epoch, position = (
        _restore(state, optimizer, scaler, samples) if state is not None else (0, 0, 0)
    )
    if shard_info is None:
        dataset = pairs_data.PairDataset(
            pairs, preprocess, cache=_cache_fits(config, pairs, preprocess)
        )
    else:
        dataset = tp.shard_dataset(shard_info, preprocess, config, world)
    collate = pairs_data.Collate(tokenizer, context, preprocess)
    parts = {
        "model": model,
        "tokenizer": tokenizer,
        "preprocess": preprocess,
        "optimizer": optimizer,
        "device": device,
        "autocast": lambda: autocast(device, dtype),
        "step": step,
        "dataset": dataset,
        "collate": collate,
        "base_metadata": base_metadata,
        # validation runs on rank 0 only, so only its machine needs the --val and --zeroshot-dir
        # files
        "val_pairs": _val_pairs(config, hooks) if world.is_main else None,
        "zeroshot": _zeroshot(config, base_metadata) if world.is_main else None,
        "world": world,
        "towers": tp.wrap(model, world, device),
        "scaler": scaler,
        "epoch": epoch,
        "position": position,
        "source": tp.data_source(
            config, world, dataset=dataset, collate=collate, shard_info=shard_info
        ),
        "skipped": getattr(dataset, "skipped", None),
    }
    parts["log"] = _open_log(out, config, state, step, samples) if world.is_main else tp.MemoryLog()
    return config, hooks, parts


def _training_data(
    config: Any, world: Any, state: dict | None, hooks: Any
) -> tuple[Any, list, list[str], int]:
    """(shard info or None, pairs, captions, samples an epoch) for a pairs file or tar shards."""
    if tp.is_shards(config.data):
        shard_info = tp.shard_data(
            config.data,
            world,
            config.workers or 0,
            config.vocab_size is not None and state is None,
            hooks.warn,
        )
        captions, samples, pairs = shard_info.captions, shard_info.samples_per_epoch, []
    else:
        shard_info = None
        pairs = pairs_data.load_pairs(
            Path(config.data), skip_missing=config.skip_missing, warn=hooks.warn
        )
        captions, samples = [p.caption for p in pairs], len(pairs)
    tp.check_global_batch(samples, config, world, config.data)
    return shard_info, pairs, captions, samples


def _restore(state: dict, optimizer: Any, scaler: Any, samples: int) -> tuple[int, int, int]:
    """Optimizer, loss scaler and RNG from a saved run; returns (step, epoch, position)."""
    optimizer.load_state_dict(state["optimizer"])
    if state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    ts.restore_rng_states(state["rng"])
    return (int(state["step"]), *tp.saved_position(state, samples))


def _saved_state(out: Path, resume: bool) -> dict | None:
    state = ts.load_state(out) if resume else None
    if state is None and ts.has_state(out):
        raise UserError(
            f"{out} already holds a training run; pass --resume to continue it, or choose another --output"
        )
    return state


def _cache_fits(config: Any, pairs: list, preprocess: Any) -> bool:
    # decoded pixels stay in memory, so epochs after the first skip decoding. Each loader worker
    # keeps its own copy (batches go round-robin to workers), hence the budget is shared among them.
    return len(pairs) * 3 * preprocess.image_size**2 * max(1, config.workers) <= CACHE_BYTES


def _check_config(config: Any) -> None:
    for name in ("batch_size", "save_every", "log_every", "world_size", "accum_steps"):
        if getattr(config, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1")
    if (
        config.steps is not None
        and config.steps < 1
        or config.epochs is not None
        and config.epochs < 1
    ):
        raise UserError("--steps and --epochs must be at least 1")
    if config.lr <= 0 or config.weight_decay < 0 or config.warmup < 0:
        raise UserError("--lr must be positive; --weight-decay and --warmup must not be negative")


def _resumed_config(given: Any, state: dict) -> Any:
    """The saved configuration, with only the runtime options taken from this invocation."""
    saved = dict(state["config"])
    for name in RUNTIME_FIELDS:
        saved[name] = getattr(given, name)
    known = {f.name for f in fields(given)}
    return type(given)(**{k: v for k, v in saved.items() if k in known})


def _new_model(
    config: Any, captions: list[str], hooks: Any
) -> tuple[Any, Any, Any, dict[str, str]]:
    from zsclip.core.model import build_model
    from zsclip.core.presets import canonical_preset_name, get_preset
    from zsclip.core.transform import PreprocessConfig
    from zsclip.core.vocab import find_vocab
    from zsclip.train.bpe import train_bpe

    if (
        canonical_preset_name(config.model) is None
    ):  # a checkpoint: fine-tune it with its own tokenizer
        from zsclip.core.checkpoints import load_model

        if config.vocab_size is not None:
            raise UserError(
                "--vocab-size applies to training from a preset; a checkpoint keeps its tokenizer"
            )
        loaded = load_model(config.model)
        meta = {k: v for k, v in loaded.metadata.items() if k == "templates"}
        return (
            loaded.model,
            loaded.tokenizer,
            loaded.preprocess,
            {"fine_tuned_from": loaded.name, **meta},
        )
    model_config = get_preset(config.model)
    context = model_config.text.context_length
    if config.vocab_size is not None:
        hooks.note(
            f"learning a {config.vocab_size}-token BPE vocabulary from {len(captions)} captions"
        )
        tokenizer = train_bpe(captions, config.vocab_size, context_length=context)
    else:
        tokenizer = find_vocab(None, None)
        tokenizer.context_length = context
    model_config.text.vocab_size = tokenizer.vocab_size
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    model = build_model(model_config)
    preprocess = PreprocessConfig(image_size=model_config.vision.image_size)
    return model, tokenizer, preprocess, {"preset": config.model}


def _from_state(state: dict) -> tuple[Any, Any, Any, dict[str, str]]:
    from zsclip.core.model import CLIP
    from zsclip.core.presets import CLIPConfig
    from zsclip.core.tokenizer import NeedsStandardVocab, Tokenizer
    from zsclip.core.transform import PreprocessConfig
    from zsclip.core.vocab import find_vocab

    with torch.device("meta"):
        model = CLIP(CLIPConfig.from_dict(state["model_config"]))
    model.load_state_dict(state["model"], assign=True)
    try:
        tokenizer = Tokenizer.from_metadata(state["tokenizer"])
    except NeedsStandardVocab:
        tokenizer = find_vocab(None, None)
        tokenizer.context_length = model.config.text.context_length
    preprocess = PreprocessConfig.from_dict(state["preprocess"])
    base = {
        k: v
        for k, v in state.get("metadata", {}).items()
        if k not in ("step", "trained_with", "templates")
    }
    return model, tokenizer, preprocess, base


def _val_pairs(config: Any, hooks: Any) -> list | None:
    if not config.val:
        return None
    return pairs_data.load_pairs(
        Path(config.val), skip_missing=config.skip_missing, warn=hooks.warn
    )


def _zeroshot(config: Any, metadata: dict[str, str]) -> Any:
    if not config.zeroshot_dir:
        return None
    from zsclip.jobs import evaluate
    from zsclip.jobs.labels import load_templates

    templates = load_templates(config.templates, model_default=metadata.get("templates"))
    return evaluate.ZeroShotSet.from_folder(Path(config.zeroshot_dir), None, templates)


def _open_log(out: Path, config: Any, state: dict | None, step: int, n_pairs: int) -> ts.LogWriter:
    out.mkdir(parents=True, exist_ok=True)
    if state is None:
        (out / ts.LOG_FILE).unlink(missing_ok=True)
        log = ts.LogWriter(out, [])
        log.write(
            {
                "event": "config",
                "config": asdict(config),
                "world_size": config.world_size,
                "pairs": n_pairs,
                "torch": torch.__version__,
            }
        )
        return log
    log = ts.LogWriter(out, ts.rewind_log(out, step))
    log.write(
        {
            "event": "resume",
            "step": step,
            "world_size": config.world_size,
            "workers": config.workers,
        }
    )
    return log
