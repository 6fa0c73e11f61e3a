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
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from zsclip.config import ModelChoice, default_model
from zsclip.core.foreign import (
    ForeignCheckpoint,
    looks_like_huggingface,
    read_huggingface_folder,
    read_openai_or_openclip,
    read_torch_file,
)
from zsclip.core.model import CLIP
from zsclip.core.presets import CLIPConfig, canonical_preset_name
from zsclip.core.tokenizer import Tokenizer
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
) -> None:
    """Write `model` as a self-describing zsclip .safetensors file, atomically (temporary file, then
    rename)."""
    from zsclip.core.safetensors_io import write_safetensors

    header = {
        **{k: str(v) for k, v in (metadata or {}).items()},
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "config": json.dumps(model.config.to_dict()),
        "preprocess": json.dumps(preprocess.to_dict()),
        **tokenizer.to_metadata(),
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


def _instantiate(config: CLIPConfig, state_dict: dict[str, torch.Tensor], source: str) -> CLIP:
    """Build without initialising and adopt the checkpoint's tensors without copying them (safetensors
    files are memory-mapped: weights are read from the page cache as they are first used, and never
    duplicated)."""
    with _SkipInit():
        model = CLIP(config)
    expected = model.state_dict()
    for key in expected:  # BatchNorm counters are absent from some exports and carry no information
        if key.endswith("num_batches_tracked") and key not in state_dict:
            state_dict[key] = torch.zeros((), dtype=torch.long)
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        detail = (f"missing {missing[:3]}" if missing else "") + (
            f" unexpected {unexpected[:3]}" if unexpected else ""
        )
        raise UserError(
            f"the {source} checkpoint does not match the architecture read from it:{detail}"
        )
    for key, tensor in state_dict.items():
        if tensor.shape != expected[key].shape:
            raise UserError(
                f"the {source} checkpoint has {key} of shape {tuple(tensor.shape)}, "
                f"expected {tuple(expected[key].shape)}"
            )
    model.load_state_dict(state_dict, assign=True)
    return model.eval()


def _read_zsclip(
    path: Path, metadata: dict[str, str]
) -> tuple[CLIP, PreprocessConfig, dict[str, str]]:
    from safetensors.torch import load_file

    if metadata.get("format_version") != FORMAT_VERSION:
        raise UserError(
            f"{path}: zsclip checkpoint format {metadata.get('format_version')!r} is not supported "
            f"by this version (expects {FORMAT_VERSION}); upgrade zsclip"
        )
    config = CLIPConfig.from_dict(json.loads(metadata["config"]))
    preprocess = PreprocessConfig.from_dict(json.loads(metadata["preprocess"]))
    model = _instantiate(config, load_file(path), "zsclip")
    return model, preprocess, metadata


def _read_foreign(path: Path) -> ForeignCheckpoint:
    if path.is_dir():
        if (path / "config.json").is_file():
            return read_huggingface_folder(path)
        raise UserError(
            f"{path}: a folder must be a Hugging Face CLIP model (config.json + weights)"
        )
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        tensors = load_file(path)
        if looks_like_huggingface(list(tensors)) and (path.parent / "config.json").is_file():
            return read_huggingface_folder(path.parent)
        return read_openai_or_openclip(path, tensors)
    obj = read_torch_file(path)
    if (
        isinstance(obj, dict)
        and looks_like_huggingface(list(obj))
        and (path.parent / "config.json").is_file()
    ):
        return read_huggingface_folder(path.parent)
    return read_openai_or_openclip(path, obj)


def _safetensors_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as handle:
            return handle.metadata() or {}
    except Exception as err:  # safetensors raises its own error types for damaged headers
        raise UserError(f"{path}: not a readable .safetensors file ({str(err)[:160]})") from err


def load_path(path: Path, *, vocab: Path | None = None) -> LoadedModel:
    """Load a checkpoint file or folder in any supported format (on CPU, in eval mode)."""
    if not path.exists():
        raise UserError(f"{path}: no such file or folder")
    metadata = (
        _safetensors_metadata(path) if path.suffix == ".safetensors" and path.is_file() else {}
    )
    if metadata.get("format") == FORMAT_NAME:
        model, preprocess, metadata = _read_zsclip(path, metadata)
    else:
        foreign = _read_foreign(path)
        model = _instantiate(foreign.config, foreign.state_dict, foreign.source)
        preprocess = PreprocessConfig.from_dict(foreign.preprocess)
        metadata = {"source_format": foreign.source}
    # --vocab (or $ZSCLIP_VOCAB, set by load_model), then the checkpoint's own merges, then files
    # beside it (a Hugging Face folder's vocab.json + merges.txt among them), then the cache folder.
    tokenizer = tokenizer_for_checkpoint(metadata, vocab, path if path.is_dir() else path.parent)
    if tokenizer.vocab_size > model.config.text.vocab_size:
        raise UserError(
            f"{path}: the vocabulary has {tokenizer.vocab_size} tokens but the model only "
            f"{model.config.text.vocab_size}; drop --vocab / unset ZSCLIP_VOCAB for this model, "
            f"or pass the vocabulary it was trained with"
        )
    builtin = path.resolve().parent == weights_dir().resolve()
    return LoadedModel(model, preprocess, tokenizer, path.stem, path, dict(metadata), builtin)


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
