"""Loading and saving models: one entry point, `load_model`, for every format and name zsclip knows.

zsclip's own format is a .safetensors file whose header metadata describes it completely:
    format = "zsclip", format_version = "1",
    config = CLIPConfig as JSON, preprocess = PreprocessConfig as JSON,
    tokenizer.* = the tokenizer (its merges, or the name of the standard vocabulary),
    plus free-form strings such as templates (the prompt set the model was trained for).
Loading our own files never guesses. Foreign formats go through zsclip.core.foreign and are saved back as ours.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from zsclip.config import ModelChoice, default_model
from zsclip.core.config_check import check_shapes, config_from_dict
from zsclip.core.foreign import (
    OPEN_CLIP_WEIGHTS,
    ForeignCheckpoint,
    looks_like_huggingface,
    read_huggingface_folder,
    read_openai_or_openclip,
    read_openclip_folder,
)
from zsclip.core.model import CLIP
from zsclip.core.presets import CLIPConfig, canonical_preset_name
from zsclip.core.safetensors_io import load_tensors, read_metadata, read_shapes
from zsclip.core.tokenizer import Tokenizer
from zsclip.core.torch_files import FORMATS, read_torch_file, sniff
from zsclip.core.transform import PreprocessConfig
from zsclip.core.vocab import tokenizer_for_checkpoint
from zsclip.errors import UserError
from zsclip.paths import builtin_models, weights_dir

FORMAT_NAME = "zsclip"
FORMAT_VERSION = "1"


@dataclass
class LoadedModel:
    model: CLIP  # in eval mode, on the requested device
    preprocess: PreprocessConfig
    tokenizer: Tokenizer
    name: str  # what the user asked for, or the file name
    path: Path | None
    metadata: dict[str, str] = field(default_factory=dict)  # e.g. {"templates": "shapes"}
    builtin: bool = False


# ------------------------------------------------------------------------------------------- saving


def save_checkpoint(
    path: str | os.PathLike,
    model: CLIP,
    *,
    preprocess: PreprocessConfig,
    tokenizer: Tokenizer,
    metadata: dict[str, str] | None = None,
    self_contained: bool = False,
) -> None:
    """Write `model` as a self-describing zsclip .safetensors file, atomically (temporary file, then
    rename). `self_contained` stores the tokenizer's merges even when they are the standard
    vocabulary's (otherwise named only, and found or fetched on load)."""
    from zsclip.core.safetensors_io import write_safetensors

    header = {
        **{k: str(v) for k, v in (metadata or {}).items()},
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "config": json.dumps(model.config.to_dict()),
        "preprocess": json.dumps(preprocess.to_dict()),
        **tokenizer.to_metadata(self_contained=self_contained),
    }
    write_safetensors(path, model.state_dict(), header)


# -------------------------------------------------------------------------------------------
# loading


class _SkipInit(torch.overrides.TorchFunctionMode):
    """Build a module without initialising it: every tensor is about to be replaced by a checkpoint's.

    nn.init functions and in-place fills become no-ops and randn becomes empty, so construction
    allocates (lazily: untouched pages cost no memory) but computes nothing. Building on the meta
    device instead would run PyTorch's Python meta kernels for normal_/mul, whose first use imports
    torch._dynamo, which costs seconds of start-up (docs/performance.md).
    """

    _FILLS = frozenset({"normal_", "uniform_", "fill_", "zero_"})

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - torch's protocol
        kwargs = kwargs or {}
        if (
            getattr(func, "__module__", "") == "torch.nn.init"
            or getattr(func, "__name__", "") in self._FILLS
        ):
            return args[0] if args else kwargs.get("tensor")
        if func is torch.randn:
            return torch.empty(*args, **kwargs)
        return func(*args, **kwargs)


_WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check_dtypes(state_dict: dict[str, torch.Tensor], where: str) -> None:
    for key, tensor in state_dict.items():
        wanted = (torch.int64,) if key.endswith("num_batches_tracked") else _WEIGHT_DTYPES
        if tensor.dtype not in wanted:
            raise UserError(f"{where}: {key} has dtype {tensor.dtype}; weights are floating point")


def _instantiate(config: CLIPConfig, state_dict: dict[str, torch.Tensor]) -> CLIP:
    """Build without initialising and adopt the checkpoint's tensors without copying them
    (safetensors files are memory-mapped: weights are read from the page cache as they are first
    used, and never duplicated). `_read` has checked the tensors against the config."""
    with _SkipInit():
        model = CLIP(config)
    for key in model.state_dict():  # BatchNorm counters are absent from some exports
        if key.endswith("num_batches_tracked") and key not in state_dict:
            state_dict[key] = torch.zeros((), dtype=torch.long)
    model.load_state_dict(state_dict, assign=True)
    return model.eval()


def _json_field(metadata: dict[str, str], key: str, where: str) -> Any:
    if key not in metadata:
        raise UserError(f"{where}: the zsclip header lacks its {key!r} entry")
    try:
        return json.loads(metadata[key])
    except (ValueError, RecursionError) as err:  # RecursionError: nested deeper than Python goes
        raise UserError(f"{where}: the header's {key!r} entry is not valid JSON ({err})") from None


def _preprocess(data: Any, where: str, config: CLIPConfig) -> PreprocessConfig:
    """The preprocessing a checkpoint states, checked: known fields, sane values, the model size."""
    if not isinstance(data, dict):
        raise UserError(f"{where}: the preprocess entry must be a JSON object")
    try:
        preprocess = PreprocessConfig.from_dict(data)
    except (TypeError, ValueError) as err:
        raise UserError(f"{where}: bad preprocess field ({str(err)[:120]})") from None
    if not all(math.isfinite(v) for v in preprocess.mean + preprocess.std):
        raise UserError(f"{where}: preprocess fields mean and std must be finite numbers")
    if preprocess.image_size != config.vision.image_size:
        raise UserError(
            f"{where}: preprocess field image_size ({preprocess.image_size}) differs from the "
            f"model's vision.image_size ({config.vision.image_size})"
        )
    return preprocess


@dataclass
class _Read:
    """A checkpoint read, its tensors checked against its config (names, shapes, dtypes), its
    preprocessing checked against the model; not yet built."""

    config: CLIPConfig
    state_dict: dict[str, torch.Tensor]
    preprocess: PreprocessConfig
    metadata: dict[str, str]


def _fit_tokenizer(tokenizer: Tokenizer, config: CLIPConfig, where: str) -> None:
    """The tokenizer must fit the model: no id beyond its embedding table. Texts longer than its
    positional embedding are cut to it (a tokenizer saved with the default 77 may serve a model of
    32 positions)."""
    if tokenizer.vocab_size > config.text.vocab_size:
        raise UserError(
            f"{where}: the vocabulary has {tokenizer.vocab_size} tokens but the model only "
            f"{config.text.vocab_size}; drop --vocab / unset ZSCLIP_VOCAB for this model, "
            f"or pass the vocabulary it was trained with"
        )
    tokenizer.context_length = min(tokenizer.context_length, config.text.context_length)


def _read_zsclip(path: Path, metadata: dict[str, str]) -> _Read:
    """zsclip's own format: the header's config is checked against the header's shapes before a
    single tensor is touched."""
    if metadata.get("format_version") != FORMAT_VERSION:
        raise UserError(
            f"{path}: zsclip checkpoint format {metadata.get('format_version')!r} is not supported "
            f"by this version (expects {FORMAT_VERSION}); upgrade zsclip"
        )
    where = str(path)
    config = config_from_dict(_json_field(metadata, "config", where), where)
    preprocess = _preprocess(_json_field(metadata, "preprocess", where), where, config)
    check_shapes(config, read_shapes(path), where)
    state_dict = load_tensors(path)
    _check_dtypes(state_dict, where)
    return _Read(config, state_dict, preprocess, metadata)


def _read_foreign_file(path: Path, kind: str) -> ForeignCheckpoint:
    tensors = load_tensors(path) if kind == "safetensors" else read_torch_file(path)
    beside_hf = (path.parent / "config.json").is_file()
    if isinstance(tensors, dict) and looks_like_huggingface(list(tensors)) and beside_hf:
        return read_huggingface_folder(path.parent)
    return read_openai_or_openclip(path, tensors)


def _read(path: Path) -> _Read:
    if path.is_dir():
        # OpenCLIP's config first: timm's repositories hold both, and their config.json describes
        # an image tower only
        # an OpenCLIP config without its weights (a partial download) leaves the transformers files
        open_clip = (path / "open_clip_config.json").is_file()
        if open_clip and any((path / name).is_file() for name in OPEN_CLIP_WEIGHTS):
            foreign = read_openclip_folder(path)
        elif (path / "config.json").is_file():
            foreign = read_huggingface_folder(path)
        elif open_clip:
            foreign = read_openclip_folder(path)  # says which weights are missing
        else:
            raise UserError(
                f"{path}: a folder must be a Hugging Face CLIP model (config.json + weights) or an "
                f"OpenCLIP one (open_clip_config.json + weights)"
            )
    else:
        if not path.is_file():
            raise UserError(f"{path}: not a regular file or folder; {FORMATS}")
        kind = "safetensors" if path.suffix == ".safetensors" else sniff(path)
        metadata = read_metadata(path) if kind == "safetensors" else {}
        if metadata.get("format") == FORMAT_NAME:
            return _read_zsclip(path, metadata)
        foreign = _read_foreign_file(path, kind)
    where = f"{path} ({foreign.source} checkpoint)"
    shapes = {k: tuple(v.shape) for k, v in foreign.state_dict.items()}
    check_shapes(foreign.config, shapes, where, foreign.names)  # before the vocabulary is sought
    _check_dtypes(foreign.state_dict, where)
    preprocess = _preprocess(foreign.preprocess, where, foreign.config)
    metadata = {"source_format": foreign.source}
    return _Read(foreign.config, foreign.state_dict, preprocess, metadata)


def load_path(path: Path, *, vocab: Path | None = None) -> LoadedModel:
    """Load a checkpoint file or folder in any supported format (on CPU, in eval mode). Everything
    read is checked before the model is built; every failure is one UserError line."""
    if not path.exists():
        raise UserError(f"{path}: no such file or folder")
    read = _read(path)
    # --vocab (or $ZSCLIP_VOCAB, set by load_model), then the checkpoint's own merges, then files
    # beside it (a Hugging Face folder's vocab.json + merges.txt among them), then the cache folder.
    tokenizer = tokenizer_for_checkpoint(
        read.metadata, vocab, path if path.is_dir() else path.parent
    )
    _fit_tokenizer(tokenizer, read.config, str(path))
    model = _instantiate(read.config, read.state_dict)
    builtin = path.resolve().parent == weights_dir().resolve()
    return LoadedModel(
        model, read.preprocess, tokenizer, path.stem, path, dict(read.metadata), builtin
    )


@contextlib.contextmanager
def _blamed(choice: ModelChoice | None) -> Iterator[None]:
    """A UserError raised inside names the variable or settings file that chose the model."""
    try:
        yield
    except UserError as err:
        if choice is not None:
            err.args = (choice.blame(str(err)), *err.args[1:])
        raise


def resolve_spec(spec: str | os.PathLike | None, *, offline: bool = False, progress=None) -> Path:
    """Turn what the user typed into a path: a file or folder, a built-in name, or a downloadable name.
    None: $ZSCLIP_MODEL, else the settings file's model (zsclip.config), else the built-in model."""
    if spec is None or str(spec) == "":
        choice = default_model()
        if choice is not None:
            with _blamed(choice):
                return resolve_spec(choice.spec, offline=offline, progress=progress)
        builtins = builtin_models()
        if not builtins:
            raise UserError(
                "no built-in model is installed; pass --model NAME or PATH (see `zsclip models`)"
            )
        return builtins[0]
    text = str(spec)
    if Path(text).expanduser().exists():
        return Path(text).expanduser()
    for path in builtin_models():
        if path.stem.lower() == text.lower():
            return path
    try:
        from zsclip.core import catalogue as hub
    except ImportError:  # the download module is optional for the core
        hub = None
    resolved = hub.resolve(text, offline=offline, progress=progress) if hub is not None else None
    if resolved is not None:
        return Path(resolved)
    if canonical_preset_name(text) is not None:
        raise UserError(
            f"{text!r} names an architecture without trained weights here; train it with "
            f"`zsclip train --model {text}`, or pass a checkpoint path"
        )
    raise UserError(
        f"no model or file named {text!r}; see `zsclip models` for names, or pass a checkpoint path"
    )


def load_model(
    spec: str | os.PathLike | None = None,
    *,
    vocab: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    offline: bool = False,
    progress=None,
) -> LoadedModel:
    """Load a model by name or path (None: $ZSCLIP_MODEL, else the settings file's model, else the
    built-in model), in eval mode on `device`."""
    choice = default_model() if spec is None or str(spec) == "" else None
    if vocab is None and os.environ.get("ZSCLIP_VOCAB"):
        vocab = os.environ[
            "ZSCLIP_VOCAB"
        ]  # the order: --vocab and $ZSCLIP_VOCAB come first
    with _blamed(choice):  # a bad default names where it came from
        path = resolve_spec(choice.spec if choice else spec, offline=offline, progress=progress)
        loaded = load_path(path, vocab=Path(vocab) if vocab is not None else None)
    if choice is not None or str(spec or ""):
        loaded.name = choice.spec if choice is not None else str(spec)
    loaded.model.to(device)
    return loaded
