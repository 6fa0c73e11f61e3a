"""Reading checkpoints zsclip did not write: OpenAI, OpenCLIP and Hugging Face, into zsclip's own
layout.

zsclip's parameter names are OpenAI's, so OpenAI and OpenCLIP state dicts need only unwrapping and
an architecture inferred from tensor shapes; Hugging Face CLIPModel weights are renamed and their
attention projections fused. Nothing here executes code from a file: pickles are read with
`weights_only=True`, and TorchScript archives are opened as zip files whose pickled module tree is
rebuilt from an allow-list.
"""

from __future__ import annotations

import collections
import json
import pickle
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from zsclip.core.presets import CLIPConfig, TextConfig, VisionConfig
from zsclip.errors import UserError

# Keys some writers add beside the weights; they carry nothing we need.
_IGNORED_KEYS = re.compile(
    r"(^|\.)(input_resolution|context_length|vocab_size|attn_mask|position_ids)$"
)


@dataclass
class ForeignCheckpoint:
    """A state dict in zsclip's layout plus what the file said about itself."""

    state_dict: dict[str, torch.Tensor]
    config: CLIPConfig
    source: str  # "openai", "openclip" or "huggingface"
    preprocess: dict[str, Any] = field(
        default_factory=dict
    )  # PreprocessConfig fields the file states


# ------------------------------------------------------------------------------------------- safe
# torch files


class _ScriptModule:
    """Stands in for a TorchScript module class while its pickled attribute tree is read."""

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, dict):
            self.__dict__.update(state)


_STORAGE_DTYPES = {
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "DoubleStorage": torch.float64,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


def _rebuild_tensor(storage, offset, size, stride, *_ignored) -> torch.Tensor:
    return storage.as_strided(tuple(size), tuple(stride), offset)


class _TorchScriptUnpickler(pickle.Unpickler):
    """Reads data.pkl of a TorchScript archive: module objects become plain attribute holders, tensors
    are read from the archive's data/ entries, and any other global is refused."""

    def __init__(self, archive: zipfile.ZipFile, prefix: str, data: bytes) -> None:
        import io

        super().__init__(io.BytesIO(data))
        self._archive, self._prefix = archive, prefix
        self._storages: dict[str, torch.Tensor] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module.startswith("__torch__"):
            return type(name, (_ScriptModule,), {})
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")

    def persistent_load(self, pid: Any) -> torch.Tensor:
        kind, dtype, key = pid[0], pid[1], pid[2]
        if kind != "storage" or not isinstance(dtype, torch.dtype):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
        if key not in self._storages:
            raw = bytearray(self._archive.read(f"{self._prefix}data/{key}"))
            self._storages[key] = (
                torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
            )
        return self._storages[key]


def _torchscript_prefix(archive: zipfile.ZipFile) -> str | None:
    names = archive.namelist()
    for name in names:
        if name.endswith("data.pkl") and name.count("/") == 1:
            prefix = name[: -len("data.pkl")]
            if (
                any(n.startswith(prefix + "code/") for n in names)
                or f"{prefix}constants.pkl" in names
            ):
                return prefix
    return None


def _collect_tensors(obj: Any, prefix: str, out: dict[str, torch.Tensor], seen: set[int]) -> None:
    if id(obj) in seen:
        return
    seen.add(id(obj))
    for name, value in vars(obj).items():
        if isinstance(value, torch.Tensor):
            out[prefix + name] = value
        elif isinstance(value, _ScriptModule):
            _collect_tensors(value, f"{prefix}{name}.", out, seen)


def read_torchscript(path: Path) -> dict[str, torch.Tensor] | None:
    """The parameters and buffers of a TorchScript archive, or None if `path` is not one. Runs none of
    its code."""
    if not zipfile.is_zipfile(path):
        return None
    with zipfile.ZipFile(path) as archive:
        prefix = _torchscript_prefix(archive)
        if prefix is None:
            return None
        root = _TorchScriptUnpickler(archive, prefix, archive.read(prefix + "data.pkl")).load()
    tensors: dict[str, torch.Tensor] = {}
    _collect_tensors(root, "", tensors, set())
    return tensors


def read_torch_file(path: Path) -> Any:
    """torch.load that can never run code: TorchScript archives by their tensors, other pickles
    weights-only."""
    scripted = read_torchscript(path)
    if scripted is not None:
        return scripted
    import warnings

    try:
        with (
            warnings.catch_warnings()
        ):  # torch warns about pickle protocols; the user cannot act on it
            warnings.simplefilter("ignore")
            return torch.load(
                path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path)
            )
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        reason = f"it asks for {found.group(1)}" if found else "it holds objects other than tensors"
        raise UserError(
            f"{path}: refusing to load: unpickling it could run code ({reason}); "
            f"re-save it as a plain state dict or .safetensors with a trusted tool"
        ) from err
    except (RuntimeError, EOFError, ValueError) as err:
        raise UserError(
            f"{path}: not a readable PyTorch checkpoint ({str(err).splitlines()[0][:160]})"
        ) from err


# ------------------------------------------------------------------------------------------- OpenAI
# / OpenCLIP


def unwrap_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """Peel training wrappers (`{"state_dict": ...}`, DDP's `module.` prefix) off an OpenCLIP/OpenAI
    file."""
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"{path}: not a CLIP state dict (expected a mapping of names to tensors)")
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    return {k: v for k, v in obj.items() if not _IGNORED_KEYS.search(k)}


def _count_blocks(state_dict: dict[str, torch.Tensor], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return len({m.group(1) for k in state_dict if (m := pattern.match(k))})


def infer_config(state_dict: dict[str, torch.Tensor], quick_gelu: bool) -> CLIPConfig:
    """The architecture of an OpenAI-layout state dict, read from its tensor shapes (heads = width /
    64)."""
    sd = state_dict
    if "visual.proj" in sd:
        width = sd["visual.conv1.weight"].shape[0]
        patch = sd["visual.conv1.weight"].shape[-1]
        grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
        vision = VisionConfig(
            kind="vit",
            image_size=patch * grid,
            width=width,
            layers=_count_blocks(sd, "visual.transformer.resblocks."),
            heads=max(1, width // 64),
            patch_size=patch,
            mlp_ratio=sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / width,
        )
    elif "visual.attnpool.positional_embedding" in sd:
        width = sd["visual.layer1.0.conv1.weight"].shape[0]
        grid = round((sd["visual.attnpool.positional_embedding"].shape[0] - 1) ** 0.5)
        vision = VisionConfig(
            kind="resnet",
            image_size=grid * 32,
            width=width,
            layers=tuple(_count_blocks(sd, f"visual.layer{i}.") for i in range(1, 5)),
            heads=width * 32 // 64,
        )
    else:
        raise UserError(
            "not a CLIP checkpoint: found neither a ViT (visual.proj) nor a ResNet (visual.attnpool)"
        )
    text_width = sd["ln_final.weight"].shape[0]
    text = TextConfig(
        context_length=sd["positional_embedding"].shape[0],
        vocab_size=sd["token_embedding.weight"].shape[0],
        width=text_width,
        heads=max(1, text_width // 64),
        layers=_count_blocks(sd, "transformer.resblocks."),
        mlp_ratio=sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / text_width,
    )
    return CLIPConfig(
        embed_dim=sd["text_projection"].shape[1], vision=vision, text=text, quick_gelu=quick_gelu
    )


def _apply_open_clip_config(config: CLIPConfig, path: Path) -> dict[str, Any]:
    """Honour open_clip_config.json (activation, head counts, preprocessing) beside an OpenCLIP file."""
    data = json.loads(path.read_text())
    model_cfg = data.get("model_cfg", data)
    config.quick_gelu = bool(model_cfg.get("quick_gelu", False))
    text_cfg, vision_cfg = model_cfg.get("text_cfg", {}), model_cfg.get("vision_cfg", {})
    if "heads" in text_cfg:
        config.text.heads = int(text_cfg["heads"])
    if config.vision.kind == "vit" and "head_width" in vision_cfg:
        config.vision.heads = config.vision.width // int(vision_cfg["head_width"])
    pre = data.get("preprocess_cfg", {})
    return {
        k: (tuple(v) if isinstance(v, list) else v) for k, v in pre.items() if k in ("mean", "std")
    }


def read_openai_or_openclip(path: Path, obj: Any) -> ForeignCheckpoint:
    """An OpenAI or OpenCLIP checkpoint already read by `read_torch_file` (or a safetensors dict)."""
    wrapped = isinstance(obj, dict) and (
        "state_dict" in obj or any(k.startswith("module.") for k in obj)
    )
    has_openai_extras = isinstance(obj, dict) and "input_resolution" in obj
    state_dict = unwrap_state_dict(obj, path)
    config_file = path.parent / "open_clip_config.json"
    # OpenAI's own files (and plain state dicts in their layout) use QuickGELU; OpenCLIP training
    # checkpoints use GELU unless their config says otherwise.
    openclip = config_file.is_file() or (wrapped and not has_openai_extras)
    config = infer_config(state_dict, quick_gelu=not openclip)
    preprocess: dict[str, Any] = {"image_size": config.vision.image_size}
    if config_file.is_file():
        preprocess.update(_apply_open_clip_config(config, config_file))
    state_dict = {k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()}
    return ForeignCheckpoint(state_dict, config, "openclip" if openclip else "openai", preprocess)


# -------------------------------------------------------------------------------------------
# Hugging Face


_HF_BLOCK_RENAMES = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}


def _hf_tower(
    sd: dict[str, torch.Tensor], hf_prefix: str, our_prefix: str, layers: int
) -> dict[str, torch.Tensor]:
    """One Hugging Face encoder's blocks in OpenAI names, q/k/v fused into in_proj."""
    out: dict[str, torch.Tensor] = {}
    for i in range(layers):
        src, dst = f"{hf_prefix}encoder.layers.{i}.", f"{our_prefix}resblocks.{i}."
        for kind in ("weight", "bias"):
            qkv = [sd[f"{src}self_attn.{p}_proj.{kind}"] for p in "qkv"]
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat(qkv, dim=0)
            for hf_name, our_name in _HF_BLOCK_RENAMES.items():
                out[f"{dst}{our_name}.{kind}"] = sd[f"{src}{hf_name}.{kind}"]
    return out


def hf_config_to_ours(hf: dict[str, Any]) -> CLIPConfig:
    text, vision = hf.get("text_config", {}), hf.get("vision_config", {})
    acts = {text.get("hidden_act", "quick_gelu"), vision.get("hidden_act", "quick_gelu")}
    if not acts <= {"quick_gelu", "gelu"} or len(acts) != 1:
        raise UserError(
            f"unsupported Hugging Face CLIP activations {sorted(acts)}: zsclip runs quick_gelu or gelu"
        )
    for tower in (text, vision):
        if abs(tower.get("layer_norm_eps", 1e-5) - 1e-5) > 1e-12:
            raise UserError("unsupported Hugging Face CLIP config: layer_norm_eps must be 1e-5")
    v_width, t_width = vision.get("hidden_size", 768), text.get("hidden_size", 512)
    return CLIPConfig(
        embed_dim=hf.get("projection_dim", 512),
        vision=VisionConfig(
            kind="vit",
            image_size=vision.get("image_size", 224),
            width=v_width,
            layers=vision.get("num_hidden_layers", 12),
            heads=vision.get("num_attention_heads", 12),
            patch_size=vision.get("patch_size", 32),
            mlp_ratio=vision.get("intermediate_size", 3072) / v_width,
        ),
        text=TextConfig(
            context_length=text.get("max_position_embeddings", 77),
            vocab_size=text.get("vocab_size", 49408),
            width=t_width,
            heads=text.get("num_attention_heads", 8),
            layers=text.get("num_hidden_layers", 12),
            mlp_ratio=text.get("intermediate_size", 2048) / t_width,
        ),
        quick_gelu=acts == {"quick_gelu"},
    )


def hf_state_dict_to_ours(
    sd: dict[str, torch.Tensor], config: CLIPConfig
) -> dict[str, torch.Tensor]:
    """Rename a Hugging Face CLIPModel state dict to OpenAI's layout (projections transposed)."""
    t, v = "text_model.", "vision_model."
    out = {
        "token_embedding.weight": sd[f"{t}embeddings.token_embedding.weight"],
        "positional_embedding": sd[f"{t}embeddings.position_embedding.weight"],
        "ln_final.weight": sd[f"{t}final_layer_norm.weight"],
        "ln_final.bias": sd[f"{t}final_layer_norm.bias"],
        "text_projection": sd[
            "text_projection.weight"
        ].t(),  # HF Linear [E, W] -> OpenAI matrix [W, E]
        "logit_scale": sd["logit_scale"].reshape(()),
        "visual.class_embedding": sd[f"{v}embeddings.class_embedding"],
        "visual.conv1.weight": sd[f"{v}embeddings.patch_embedding.weight"],
        "visual.positional_embedding": sd[f"{v}embeddings.position_embedding.weight"],
        "visual.ln_pre.weight": sd[f"{v}pre_layrnorm.weight"],  # sic: the HF name has this typo
        "visual.ln_pre.bias": sd[f"{v}pre_layrnorm.bias"],
        "visual.ln_post.weight": sd[f"{v}post_layernorm.weight"],
        "visual.ln_post.bias": sd[f"{v}post_layernorm.bias"],
        "visual.proj": sd["visual_projection.weight"].t(),
    }
    out.update(_hf_tower(sd, t, "transformer.", config.text.layers))
    out.update(_hf_tower(sd, v, "visual.transformer.", config.vision.layers))
    return {k: t.float().contiguous() if t.is_floating_point() else t for k, t in out.items()}


def _hf_preprocess(folder: Path) -> dict[str, Any]:
    file = folder / "preprocessor_config.json"
    if not file.is_file():
        return {}
    data = json.loads(file.read_text())
    out: dict[str, Any] = {}
    if "image_mean" in data:
        out["mean"] = tuple(data["image_mean"])
    if "image_std" in data:
        out["std"] = tuple(data["image_std"])
    return out


def read_huggingface_folder(folder: Path) -> ForeignCheckpoint:
    """A folder written by CLIPModel.save_pretrained (config.json + model.safetensors or
    pytorch_model.bin)."""
    hf_config = json.loads((folder / "config.json").read_text())
    if hf_config.get("model_type") not in ("clip", None):
        raise UserError(f"{folder}: model_type {hf_config.get('model_type')!r} is not a CLIP model")
    config = hf_config_to_ours(hf_config)
    if (folder / "model.safetensors").is_file():
        from safetensors.torch import load_file

        raw = load_file(folder / "model.safetensors")
    elif (folder / "pytorch_model.bin").is_file():
        raw = read_torch_file(folder / "pytorch_model.bin")
    else:
        raise UserError(
            f"{folder}: no model.safetensors or pytorch_model.bin in this Hugging Face folder"
        )
    try:
        state_dict = hf_state_dict_to_ours(raw, config)
    except KeyError as err:
        raise UserError(
            f"{folder}: weights do not match a Hugging Face CLIPModel (missing {err})"
        ) from err
    preprocess = {"image_size": config.vision.image_size, **_hf_preprocess(folder)}
    return ForeignCheckpoint(state_dict, config, "huggingface", preprocess)


def looks_like_huggingface(keys: list[str]) -> bool:
    return any(k.startswith("text_model.") for k in keys)
