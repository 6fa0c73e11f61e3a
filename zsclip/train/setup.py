"""Everything a training run needs before its first step: checked options and data, a model with its
tokenizer and preprocessing (from a preset, a checkpoint, or the saved state of a run being resumed),
the optimizer, and the output folder with its log. Used by zsclip.train.loop.prepare.

The cheap checks come first (options, output folder, the model name, a vocabulary), then the saved
state, then the data (every image is decoded once), then the model.
"""

from __future__ import annotations

import math
import os
import random
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, Collection

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
# Options a resumed run takes from this invocation when they are given on purpose: a new end (the
# schedule is recomputed for it, zsclip.train.loop), files that moved, rows to leave out. All the
# others keep their saved values.
RESUME_OVERRIDES = ("steps", "epochs", "data", "val", "zeroshot_dir", "skip_missing")
CACHE_BYTES = 2 << 30
# JSON types a saved configuration field may hold, by its annotation
_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "int": (int,),
    "float": (int, float),
    "str": (str,),
    "bool": (bool,),
}


def setup(
    config: Any, resume: bool, hooks: Any, given: Collection[str] | None = None
) -> tuple[Any, Any, dict[str, Any]]:
    from zsclip.core.devices import autocast, resolve_device, resolve_precision

    out = Path(config.output)
    if not resume:
        check_config(config)
    world, device, config = tp.start(config, resolve_device)  # torchrun's processes join here
    # read by rank 0, sent to the others
    parts = tp.shared_state(world, device, lambda: _saved_state(out, resume))
    source = str(out / ts.STATE_FILE)
    state = ts.unpack(*parts, source) if parts is not None else None
    if state is not None:
        config = resumed_config(config, state, frozenset(given or ()), hooks, source)
        check_config(config)
    dtype = resolve_precision(config.precision, device)
    if state is None:
        _check_model_choice(config)
    shard_info, pairs, captions, samples = _training_data(config, world, device, state, hooks)
    if state is not None:
        model, tokenizer, preprocess, base_metadata = _from_state(state, source)
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
        _restore(state, optimizer, scaler, source) if state is not None else (0, 0, 0)
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


# ---- options ----------------------------------------------------------------------------------------


def check_output_folder(out: Path) -> None:
    """The run folder must be a folder, or creatable: checked before any work, in one line."""
    if out.exists() and not out.is_dir():
        raise UserError(
            f"--output {out} is a file; give a folder for the run (it is created if missing)"
        )
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"--output {out} cannot be created: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"--output {out}: no permission to write in {existing}")


def check_config(config: Any) -> None:
    for name in ("batch_size", "save_every", "log_every", "world_size", "accum_steps"):
        if getattr(config, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1")
    if (config.steps is not None and config.steps < 1) or (
        config.epochs is not None and config.epochs < 1
    ):
        raise UserError("--steps and --epochs must be at least 1")
    if not math.isfinite(config.lr) or config.lr <= 0:
        raise UserError(f"--lr must be a positive number, not {config.lr}")
    if not math.isfinite(config.weight_decay) or config.weight_decay < 0:
        raise UserError(f"--weight-decay must be a number >= 0, not {config.weight_decay}")
    if config.warmup < 0:
        raise UserError("--warmup must not be negative")


def _check_model_choice(config: Any) -> None:
    """Before any image is read: the --model name means something, and a preset has a tokenizer."""
    from zsclip.core.presets import PRESETS, canonical_preset_name

    if canonical_preset_name(config.model) is not None:
        if config.vocab_size is None:
            _check_standard_vocab(config.model)
        return
    if config.vocab_size is not None:
        raise UserError(
            "--vocab-size applies to training from a preset; a checkpoint keeps its tokenizer"
        )
    if not _names_a_checkpoint(config.model):
        raise UserError(
            f"--model {config.model!r} is neither a preset nor a checkpoint. Presets (train from "
            f"scratch): {', '.join(PRESETS)} (`zsclip models --presets`); to fine-tune, give a "
            "checkpoint file or a name from `zsclip models`"
        )


def _names_a_checkpoint(name: str) -> bool:
    from zsclip.core import catalogue
    from zsclip.paths import builtin_models

    if Path(name).expanduser().exists() or catalogue.is_hf_spec(name):
        return True
    if any(path.stem.lower() == name.lower() for path in builtin_models()):
        return True
    return catalogue.lookup(name) is not None


def _check_standard_vocab(preset: str) -> None:
    """Without --vocab-size a preset uses the standard vocabulary, which is a download away."""
    from zsclip.core.tokenizer import ENV_VOCAB, OPENAI_FILE
    from zsclip.paths import cache_dir

    if os.environ.get(ENV_VOCAB) or (cache_dir() / OPENAI_FILE).is_file():
        return
    raise UserError(
        f"training the preset {preset} needs a vocabulary: learn one from the captions with "
        "--vocab-size N (works offline; e.g. --vocab-size 1024 for short captions), or fetch the "
        f"standard 49,408-token one with `zsclip download vocab` (or set {ENV_VOCAB})"
    )


def resumed_config(
    given_config: Any, state: dict, given: frozenset[str], hooks: Any, source: str
) -> Any:
    """The saved configuration, with the runtime options of this invocation, and the overrides of
    RESUME_OVERRIDES among the fields in `given` (the options set on purpose). Other options given
    with a value unlike the saved one are named in a warning: they are ignored."""
    saved = _saved_config(type(given_config), state["config"], source)
    for name in RUNTIME_FIELDS:
        saved[name] = getattr(given_config, name)
    if "steps" in given or "epochs" in given:
        if "steps" not in given:
            saved["steps"] = None  # --epochs alone: the saved --steps would still win over it
        _check_new_end(given_config, int(state["step"]), given)
    for name in RESUME_OVERRIDES:
        if name in given:
            saved[name] = getattr(given_config, name)
    ignored = sorted(
        name
        for name in given
        if name not in RUNTIME_FIELDS
        and name not in RESUME_OVERRIDES
        and name in saved
        and getattr(given_config, name) != saved[name]
    )
    if ignored:
        kept = ", ".join(f"--{n.replace('_', '-')} {saved[n]}" for n in ignored)
        hooks.warn(f"ignored with --resume, the run keeps its saved settings: {kept}")
    return type(given_config)(**saved)


def _check_new_end(given_config: Any, step: int, given: frozenset[str]) -> None:
    if "steps" in given and given_config.steps is not None and given_config.steps <= step:
        raise UserError(
            f"the run is at step {step}; --steps {given_config.steps} must be larger to continue it"
        )


def _saved_config(cls: type, saved: dict, source: str) -> dict[str, Any]:
    """The saved configuration's fields, each checked against its annotation (a state file is
    input like any other)."""
    values = {}
    for spec in fields(cls):
        if spec.name not in saved:
            continue  # written by an older zsclip: the default applies
        value = saved[spec.name]
        options = [part.strip() for part in str(spec.type).split("|")]
        fits = (value is None and "None" in options) or any(
            isinstance(value, _JSON_TYPES.get(option, ()))
            and (option == "bool" or not isinstance(value, bool))
            for option in options
        )
        if not fits:
            raise ts.damaged_state(source, f"its {spec.name!r} is {str(value)[:40]!r}")
        values[spec.name] = value
    return values


# ---- data ---------------------------------------------------------------------------------------------


def _training_data(
    config: Any, world: Any, device: Any, state: dict | None, hooks: Any
) -> tuple[Any, list, list[str], int]:
    """(shard info or None, pairs, captions, samples an epoch) for a pairs file or tar shards."""
    if not config.data:
        raise UserError("--data is required: the pairs file or tar shards to train on")
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
        # rank 0 decodes every image once; every rank then trains on the same rows
        rows = tp.from_rank_zero(world, device, lambda: _checked_rows(config, hooks))
        pairs = [pairs_data.Pair(line, Path(image), caption) for line, image, caption in rows]
        captions, samples = [p.caption for p in pairs], len(pairs)
    tp.check_global_batch(samples, config, world, config.data)
    return shard_info, pairs, captions, samples


def _checked_rows(config: Any, hooks: Any) -> list[list]:
    pairs = pairs_data.load_pairs(
        Path(config.data), skip_missing=config.skip_missing, warn=hooks.warn
    )
    return [[pair.line, str(pair.image), pair.caption] for pair in pairs]


def _cache_fits(config: Any, pairs: list, preprocess: Any) -> bool:
    # decoded pixels stay in memory, so epochs after the first skip decoding. Each loader worker
    # keeps its own copy (batches go round-robin to workers), hence the budget is shared among them.
    return len(pairs) * 3 * preprocess.image_size**2 * max(1, config.workers) <= CACHE_BYTES


def _val_pairs(config: Any, hooks: Any) -> list | None:
    if not config.val:
        return None
    return pairs_data.load_pairs(
        Path(config.val), skip_missing=config.skip_missing, warn=hooks.warn, option="--val"
    )


def _zeroshot(config: Any, metadata: dict[str, str]) -> Any:
    if not config.zeroshot_dir:
        return None
    from zsclip.jobs import evaluate
    from zsclip.jobs.labels import load_templates

    templates = load_templates(config.templates, model_default=metadata.get("templates"))
    return evaluate.ZeroShotSet.from_folder(Path(config.zeroshot_dir), None, templates)


# ---- the model ----------------------------------------------------------------------------------------


def _new_model(
    config: Any, captions: list[str], hooks: Any
) -> tuple[Any, Any, Any, dict[str, str]]:
    from zsclip.core.model import build_model
    from zsclip.core.presets import canonical_preset_name, get_preset
    from zsclip.core.transform import PreprocessConfig
    from zsclip.core.vocab import find_vocab
    from zsclip.train.bpe import train_bpe

    if canonical_preset_name(config.model) is None:  # a checkpoint: fine-tune it as it is
        from zsclip.core.checkpoints import load_model

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


def _from_state(state: dict, source: str) -> tuple[Any, Any, Any, dict[str, str]]:
    """Model, tokenizer and preprocessing of a saved run; DamagedState for anything inconsistent."""
    from zsclip.core.tokenizer import NeedsStandardVocab, Tokenizer
    from zsclip.core.transform import PreprocessConfig
    from zsclip.core.vocab import find_vocab

    model = _model_from_state(state, source)
    try:
        tokenizer = Tokenizer.from_metadata(state["tokenizer"])
    except NeedsStandardVocab:
        tokenizer = find_vocab(None, None)
        tokenizer.context_length = model.config.text.context_length
    except UserError as err:  # the tokenizer's own reason, with the state file it came from
        raise ts.damaged_state(source, f"tokenizer: {err}") from None
    except Exception as err:  # noqa: BLE001 - whatever a damaged tokenizer entry raises
        raise ts.damaged_state(source, f"tokenizer: {type(err).__name__}") from None
    if tokenizer is None or tokenizer.vocab_size != model.config.text.vocab_size:
        raise ts.damaged_state(source, "its tokenizer does not fit its model")
    try:
        preprocess = PreprocessConfig.from_dict(state["preprocess"])
    except (TypeError, ValueError) as err:
        raise ts.damaged_state(source, f"preprocess: {err}") from None
    base = {
        k: v
        for k, v in state["metadata"].items()
        if k not in ("step", "trained_with", "templates") and isinstance(v, str)
    }
    return model, tokenizer, preprocess, base


def _model_from_state(state: dict, source: str) -> Any:
    """Build the saved architecture on the meta device (no memory) and adopt the saved tensors,
    after checking that their names, shapes and dtypes are exactly the architecture's."""
    from zsclip.core.model import CLIP
    from zsclip.core.presets import CLIPConfig

    tensors = state["model"]
    try:
        config = CLIPConfig.from_dict(state["model_config"])
        layers = config.vision.layers
        depth = (sum(layers) if isinstance(layers, tuple) else layers) + config.text.layers
        if not 0 < depth <= len(tensors):  # every block holds several tensors
            raise ValueError(f"{depth} layers for {len(tensors)} tensors")
        with torch.device("meta"):
            model = CLIP(config)
    except Exception as err:  # noqa: BLE001 - a lying config fails in many ways
        raise ts.damaged_state(source, f"model configuration: {str(err)[:120]}") from None
    expected = model.state_dict()
    if set(expected) != set(tensors):
        odd = sorted(set(expected) ^ set(tensors))[:3]
        raise ts.damaged_state(source, f"its weights do not match its configuration: {odd}")
    for key, tensor in tensors.items():
        if tensor.shape != expected[key].shape or tensor.dtype != expected[key].dtype:
            raise ts.damaged_state(source, f"{key} is {tensor.dtype} {tuple(tensor.shape)}")
    model.load_state_dict(tensors, assign=True)
    return model


def _restore(state: dict, optimizer: Any, scaler: Any, source: str) -> tuple[int, int, int]:
    """Optimizer moments, loss scaler and RNG from a saved run; returns (step, epoch, position)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    saved = state["optimizer"]["state"]
    for index, values in saved.items():
        if index >= len(params):
            raise ts.damaged_state(source, f"optimizer state for parameter {index}")
        for name, tensor in values.items():
            shape = () if name == "step" else params[index].shape
            if name not in ("step", "exp_avg", "exp_avg_sq") or tensor.shape != shape:
                raise ts.damaged_state(source, f"optimizer {name} of parameter {index}")
            if not tensor.is_floating_point():
                raise ts.damaged_state(source, f"optimizer {name} is {tensor.dtype}")
    fresh = optimizer.state_dict()  # hyper-parameters from the configuration, moments from the file
    try:
        optimizer.load_state_dict({"state": saved, "param_groups": fresh["param_groups"]})
        if state["scaler"]:
            scaler.load_state_dict(_scaler_state(state["scaler"]))
        ts.restore_rng_states(state["rng"])
    except (TypeError, ValueError, RuntimeError, KeyError) as err:
        raise ts.damaged_state(source, f"{type(err).__name__}: {str(err)[:120]}") from None
    if state["step"] < 0 or state["epoch"] < 0 or state["position"] < 0:
        raise ts.damaged_state(source, "a negative step or position")
    return int(state["step"]), *tp.saved_position(state)


def _scaler_state(saved: dict) -> dict:
    known = ("scale", "growth_factor", "backoff_factor", "growth_interval", "_growth_tracker")
    if set(saved) - set(known) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in saved.values()
    ):
        raise TypeError("the loss scaler's state is not a set of numbers")
    return saved


# ---- the output folder --------------------------------------------------------------------------------


def _saved_state(out: Path, resume: bool) -> tuple[Any, dict] | None:
    check_output_folder(out)
    if resume:
        return ts.read_state_parts(out)
    if ts.has_state(out):
        raise UserError(
            f"{out} already holds a training run; pass --resume to continue it, or choose another --output"
        )
    return None


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
            "config": asdict(
                config
            ),  # the configuration this stretch runs with (--steps may differ)
        }
    )
    return log
