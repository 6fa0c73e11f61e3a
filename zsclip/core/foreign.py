"""Reading checkpoints zsclip did not write: OpenAI, OpenCLIP and Hugging Face, into zsclip's own
layout.

zsclip's parameter names are OpenAI's, so OpenAI and OpenCLIP state dicts need only unwrapping and
an architecture inferred from tensor shapes; Hugging Face CLIPModel weights are renamed and their
attention projections fused. The files themselves are read by zsclip.core.torch_files and
zsclip.core.safetensors_io (no code from a file ever runs). Everything a file states is checked
here before it is used: JSON configs field by field, tensors by name and number of dimensions, and
every weight must be used (a config that declares fewer layers than the weights hold is an error,
not a different model). The shapes are then checked against the config by zsclip.core.config_check.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from zsclip.core.presets import CLIPConfig, TextConfig, VisionConfig
from zsclip.core.torch_files import read_torch_file
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
    preprocess: dict[str, Any] = field(default_factory=dict)  # PreprocessConfig fields it states
    # zsclip config field -> where this file states it, for error messages (see config_check)
    names: dict[str, str] = field(default_factory=dict)


def _read_json(file: Path) -> Any:
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as err:  # RecursionError: nested too deep
        detail = " ".join(str(err).split())[:120]
        raise UserError(f"{file}: not a readable JSON file ({detail})") from None


def _json_object(file: Path) -> dict[str, Any]:
    data = _read_json(file)
    if not isinstance(data, dict):
        raise UserError(f"{file}: must hold a JSON object, not a {type(data).__name__}")
    return data


def _positive(value: Any, label: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise UserError(f"{label} must be a positive integer, not {str(value)[:40]!r}")
    return value


def _tensor_dict(obj: Any, where: str) -> dict[str, torch.Tensor]:
    if not isinstance(obj, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise UserError(f"{where}: not a CLIP state dict (expected a mapping of names to tensors)")
    return obj


# ------------------------------------------------------------------------------------------- OpenAI
# / OpenCLIP


def unwrap_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """Peel training wrappers (`{"state_dict": ...}`, DDP's `module.` prefix) off an OpenCLIP/OpenAI
    file."""
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    obj = _tensor_dict(obj, str(path))
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    return {k: v for k, v in obj.items() if not _IGNORED_KEYS.search(k)}


def _count_blocks(state_dict: dict[str, torch.Tensor], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return len({m.group(1) for k in state_dict if (m := pattern.match(k))})


def _size(sd: dict[str, torch.Tensor], key: str, ndim: int, dim: int) -> int:
    """One dimension of a tensor the architecture is read from (it must exist and be non-empty)."""
    tensor = sd.get(key)
    if tensor is None:
        raise UserError(f"not a CLIP checkpoint: it lacks {key!r}")
    if tensor.dim() != ndim or 0 in tensor.shape:
        raise UserError(
            f"not a CLIP checkpoint: {key} has shape {tuple(tensor.shape)}, not {ndim} dimensions"
        )
    return tensor.shape[dim]


def _grid(sd: dict[str, torch.Tensor], key: str) -> int:
    """The side of the square token grid a positional embedding covers (its rows: grid^2 + 1)."""
    tokens = _size(sd, key, 2, 0)
    grid = math.isqrt(tokens - 1)
    if tokens < 2 or grid * grid + 1 != tokens:
        raise UserError(f"not a CLIP checkpoint: {key} has {tokens} rows, not a square grid + 1")
    return grid


def _vision_from_shapes(sd: dict[str, torch.Tensor]) -> VisionConfig:
    if "visual.proj" in sd:
        width = _size(sd, "visual.conv1.weight", 4, 0)
        patch = _size(sd, "visual.conv1.weight", 4, 3)
        return VisionConfig(
            kind="vit",
            image_size=patch * _grid(sd, "visual.positional_embedding"),
            width=width,
            layers=_count_blocks(sd, "visual.transformer.resblocks."),
            heads=max(1, width // 64),
            patch_size=patch,
            mlp_ratio=_size(sd, "visual.transformer.resblocks.0.mlp.c_fc.weight", 2, 0) / width,
        )
    if "visual.attnpool.positional_embedding" in sd:
        width = _size(sd, "visual.layer1.0.conv1.weight", 4, 0)
        return VisionConfig(
            kind="resnet",
            image_size=_grid(sd, "visual.attnpool.positional_embedding") * 32,
            width=width,
            layers=tuple(max(1, _count_blocks(sd, f"visual.layer{i}.")) for i in range(1, 5)),
            heads=max(1, width * 32 // 64),
        )
    raise UserError(
        "not a CLIP checkpoint: found neither a ViT (visual.proj) nor a ResNet (visual.attnpool)"
    )


def infer_config(state_dict: dict[str, torch.Tensor], quick_gelu: bool) -> CLIPConfig:
    """The architecture of an OpenAI-layout state dict, read from its tensor shapes (heads = width /
    64). Only the dimensions read here are checked; the rest are compared with the config later."""
    sd = state_dict
    vision = _vision_from_shapes(sd)
    text_width = _size(sd, "ln_final.weight", 1, 0)
    text = TextConfig(
        context_length=_size(sd, "positional_embedding", 2, 0),
        vocab_size=_size(sd, "token_embedding.weight", 2, 0),
        width=text_width,
        heads=max(1, text_width // 64),
        layers=_count_blocks(sd, "transformer.resblocks."),
        mlp_ratio=_size(sd, "transformer.resblocks.0.mlp.c_fc.weight", 2, 0) / text_width,
    )
    embed_dim = _size(sd, "text_projection", 2, 1)
    return CLIPConfig(embed_dim=embed_dim, vision=vision, text=text, quick_gelu=quick_gelu)


_INFERRED_NAMES = {  # where infer_config read each field
    "embed_dim": "the embedding size (from text_projection)",
    "text.width": "the text width (from ln_final.weight)",
    "text.vocab_size": "the vocabulary size (from token_embedding.weight)",
    "text.context_length": "the context length (from positional_embedding)",
    "text.mlp_ratio": "the text MLP width (from block 0)",
    "vision.mlp_ratio": "the vision MLP width (from block 0)",
}


def _apply_open_clip_config(config: CLIPConfig, path: Path, names: dict[str, str]) -> dict:
    """Honour open_clip_config.json beside an OpenCLIP file (activation, heads, mean and std)."""
    data = _json_object(path)

    def section(parent: dict, key: str, default: Any) -> dict:
        value = parent.get(key, default)
        if not isinstance(value, dict):
            raise UserError(f"{path}: {key} must be a JSON object")
        return value

    model_cfg = section(data, "model_cfg", data)
    text_cfg, vision_cfg = section(model_cfg, "text_cfg", {}), section(model_cfg, "vision_cfg", {})
    pre = section(data, "preprocess_cfg", {})
    config.quick_gelu = model_cfg.get("quick_gelu", False)
    if not isinstance(config.quick_gelu, bool):
        raise UserError(f"{path}: model_cfg.quick_gelu must be true or false")
    if "heads" in text_cfg:
        config.text.heads = _positive(text_cfg["heads"], f"{path}: text_cfg.heads")
        names["text.heads"] = f"{path.name} text_cfg.heads"
    if config.vision.kind == "vit" and "head_width" in vision_cfg:
        head_width = _positive(vision_cfg["head_width"], f"{path}: vision_cfg.head_width")
        config.vision.heads = max(1, config.vision.width // head_width)
        names["vision.heads"] = f"{path.name} vision_cfg.head_width"
    return _open_clip_preprocess(pre, path)


# open_clip's preprocess_cfg words -> PreprocessConfig's
_OPEN_CLIP_INTERPOLATION = {"bicubic": "bicubic", "bilinear": "bilinear", "nearest": "nearest"}
_OPEN_CLIP_RESIZE = {"shortest": "shortest", "squash": "squash"}


def _open_clip_preprocess(pre: dict, path: Path) -> dict[str, Any]:
    """mean, std, interpolation and resize mode from open_clip_config.json's preprocess_cfg; a
    setting zsclip cannot reproduce exactly (open_clip's "longest" resize with padding) is refused
    rather than approximated."""
    out: dict[str, Any] = {}
    for key in ("mean", "std"):
        if key in pre:
            value = pre[key]
            if not isinstance(value, list) or len(value) != 3:
                raise UserError(f"{path}: preprocess_cfg.{key} must be a list of three numbers")
            out[key] = tuple(value)
    for key, table in (
        ("interpolation", _OPEN_CLIP_INTERPOLATION),
        ("resize_mode", _OPEN_CLIP_RESIZE),
    ):
        if key in pre:
            if pre[key] not in table:
                shown = ", ".join(table)
                raise UserError(
                    f"{path}: preprocess_cfg.{key} {str(pre[key])[:30]!r} is not supported "
                    f"(zsclip reproduces {shown})"
                )
            out[key] = table[pre[key]]
    return out


def read_openai_or_openclip(path: Path, obj: Any) -> ForeignCheckpoint:
    """An OpenAI or OpenCLIP checkpoint already read by `read_torch_file` (or from safetensors)."""
    wrapped = isinstance(obj, dict) and (
        "state_dict" in obj or any(str(k).startswith("module.") for k in obj)
    )
    has_openai_extras = isinstance(obj, dict) and "input_resolution" in obj
    state_dict = unwrap_state_dict(obj, path)
    config_file = path.parent / "open_clip_config.json"
    # OpenAI's own files (and plain state dicts in their layout) use QuickGELU; OpenCLIP training
    # checkpoints use GELU unless their config says otherwise.
    openclip = config_file.is_file() or (wrapped and not has_openai_extras)
    try:
        config = infer_config(state_dict, quick_gelu=not openclip)
    except UserError as err:
        raise UserError(f"{path}: {err}") from None
    names = dict(_INFERRED_NAMES)
    # OpenAI's and open_clip's pipeline: torchvision's CenterCrop, which rounds its offsets
    preprocess: dict[str, Any] = {"image_size": config.vision.image_size, "crop_offsets": "round"}
    if config_file.is_file():
        preprocess.update(_apply_open_clip_config(config, config_file, names))
    state_dict = {k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()}
    source = "openclip" if openclip else "openai"
    return ForeignCheckpoint(state_dict, config, source, preprocess, names)


# The weight files an OpenCLIP-layout folder (a Hub repository) may hold, in open_clip's order.
OPEN_CLIP_WEIGHTS = (
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.safetensors",
    "open_clip_pytorch_model.bin",
)


def read_openclip_folder(folder: Path) -> ForeignCheckpoint:
    """A Hub repository in OpenCLIP's layout: open_clip_config.json beside one of OPEN_CLIP_WEIGHTS.
    Pickled weights are read by the allow-list reader (nothing in them runs)."""
    from zsclip.core.safetensors_io import load_tensors

    for name in OPEN_CLIP_WEIGHTS:
        path = folder / name
        if path.is_file():
            obj = load_tensors(path) if name.endswith(".safetensors") else read_torch_file(path)
            return read_openai_or_openclip(path, obj)
    raise UserError(f"{folder}: open_clip_config.json but none of {', '.join(OPEN_CLIP_WEIGHTS)}")


# ------------------------------------------------------------------------------------------ Hugging
# Face


_HF_BLOCK_RENAMES = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}

# zsclip config field -> Hugging Face config.json key (and the default transformers uses)
_HF_FIELDS = {
    "text": {
        "context_length": ("max_position_embeddings", 77),
        "vocab_size": ("vocab_size", 49408),
        "width": ("hidden_size", 512),
        "heads": ("num_attention_heads", 8),
        "layers": ("num_hidden_layers", 12),
        "mlp_ratio": ("intermediate_size", 2048),
    },
    "vision": {
        "image_size": ("image_size", 224),
        "width": ("hidden_size", 768),
        "heads": ("num_attention_heads", 12),
        "layers": ("num_hidden_layers", 12),
        "patch_size": ("patch_size", 32),
        "mlp_ratio": ("intermediate_size", 3072),
    },
}
HF_NAMES = {"embed_dim": "config.json projection_dim"} | {
    f"{tower}.{ours}": f"config.json {tower}_config.{theirs}"
    for tower, fields in _HF_FIELDS.items()
    for ours, (theirs, _) in fields.items()
}


def _hf_tower_fields(section: Any, tower: str, where: str) -> dict[str, int]:
    if not isinstance(section, dict):
        raise UserError(f"{where}: config.json {tower}_config must be a JSON object")
    out = {}
    for ours, (theirs, default) in _HF_FIELDS[tower].items():
        out[ours] = _positive(
            section.get(theirs, default), f"{where}: {HF_NAMES[tower + '.' + ours]}"
        )
    eps = section.get("layer_norm_eps", 1e-5)
    if not isinstance(eps, (int, float)) or abs(eps - 1e-5) > 1e-12:
        raise UserError(f"{where}: config.json {tower}_config.layer_norm_eps must be 1e-5")
    return out


def hf_config_to_ours(hf: dict[str, Any], where: str = "config.json") -> CLIPConfig:
    text_cfg, vision_cfg = hf.get("text_config", {}), hf.get("vision_config", {})
    text = _hf_tower_fields(text_cfg, "text", where)
    vision = _hf_tower_fields(vision_cfg, "vision", where)
    acts = [section.get("hidden_act", "quick_gelu") for section in (text_cfg, vision_cfg)]
    if acts[0] != acts[1] or acts[0] not in ("quick_gelu", "gelu"):
        shown = ", ".join(str(a)[:20] for a in acts)
        raise UserError(
            f"{where}: unsupported Hugging Face CLIP activations ({shown}): zsclip runs "
            f"quick_gelu or gelu, the same in both towers"
        )
    embed_dim = _positive(hf.get("projection_dim", 512), f"{where}: {HF_NAMES['embed_dim']}")
    return CLIPConfig(
        embed_dim=embed_dim,
        vision=VisionConfig(
            kind="vit", **{**vision, "mlp_ratio": vision["mlp_ratio"] / vision["width"]}
        ),
        text=TextConfig(**{**text, "mlp_ratio": text["mlp_ratio"] / text["width"]}),
        quick_gelu=acts[0] == "quick_gelu",
    )


class _Taker:
    """Reads tensors from a Hugging Face state dict by name, checking their dimensions, and
    remembers which were read, so that weights nothing used can be reported."""

    def __init__(self, sd: dict[str, torch.Tensor], where: str) -> None:
        self.sd, self.where, self.used = sd, where, set()

    def __call__(self, key: str, ndim: int | None = None) -> torch.Tensor:
        tensor = self.sd.get(key)
        if tensor is None:
            raise UserError(
                f"{self.where}: weights do not match a Hugging Face CLIPModel (missing {key!r})"
            )
        if ndim is not None and tensor.dim() != ndim:
            raise UserError(
                f"{self.where}: {key} has shape {tuple(tensor.shape)}, not {ndim} dimensions"
            )
        self.used.add(key)
        return tensor

    def unused(self) -> list[str]:
        return [k for k in self.sd if k not in self.used and not _IGNORED_KEYS.search(k)]


def _hf_tower(take: _Taker, hf_prefix: str, our_prefix: str, layers: int) -> dict:
    """One Hugging Face encoder's blocks in OpenAI names, q/k/v fused into in_proj."""
    out: dict[str, torch.Tensor] = {}
    for i in range(layers):
        src, dst = f"{hf_prefix}encoder.layers.{i}.", f"{our_prefix}resblocks.{i}."
        for kind in ("weight", "bias"):
            qkv = [take(f"{src}self_attn.{p}_proj.{kind}") for p in "qkv"]
            if not qkv[0].dim() or any(t.shape != qkv[0].shape for t in qkv):
                raise UserError(f"{take.where}: {src}self_attn q/k/v {kind}s differ in shape")
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat(qkv, dim=0)
            for hf_name, our_name in _HF_BLOCK_RENAMES.items():
                out[f"{dst}{our_name}.{kind}"] = take(f"{src}{hf_name}.{kind}")
    return out


def hf_state_dict_to_ours(
    sd: dict[str, torch.Tensor], config: CLIPConfig, where: str = "Hugging Face checkpoint"
) -> dict[str, torch.Tensor]:
    """Rename a Hugging Face CLIPModel state dict to OpenAI's layout (projections transposed). Every
    weight must be used."""
    t, v, take = "text_model.", "vision_model.", _Taker(sd, where)
    for tower, prefix in (("text", t), ("vision", v)):
        held = _count_blocks(sd, f"{prefix}encoder.layers.")
        declared = getattr(config, tower).layers
        if held != declared:
            raise UserError(
                f"{where}: {HF_NAMES[tower + '.layers']} is {declared} but the weights hold "
                f"{held} layers"
            )
    scale = take("logit_scale")
    if scale.numel() != 1:
        raise UserError(f"{where}: logit_scale has shape {tuple(scale.shape)}, not a single value")
    out = {
        "token_embedding.weight": take(f"{t}embeddings.token_embedding.weight"),
        "positional_embedding": take(f"{t}embeddings.position_embedding.weight"),
        "ln_final.weight": take(f"{t}final_layer_norm.weight"),
        "ln_final.bias": take(f"{t}final_layer_norm.bias"),
        "text_projection": take("text_projection.weight", 2).t(),  # Linear [E, W] -> matrix [W, E]
        "logit_scale": scale.reshape(()),
        "visual.class_embedding": take(f"{v}embeddings.class_embedding"),
        "visual.conv1.weight": take(f"{v}embeddings.patch_embedding.weight"),
        "visual.positional_embedding": take(f"{v}embeddings.position_embedding.weight"),
        "visual.ln_pre.weight": take(f"{v}pre_layrnorm.weight"),  # sic: the HF name has this typo
        "visual.ln_pre.bias": take(f"{v}pre_layrnorm.bias"),
        "visual.ln_post.weight": take(f"{v}post_layernorm.weight"),
        "visual.ln_post.bias": take(f"{v}post_layernorm.bias"),
        "visual.proj": take("visual_projection.weight", 2).t(),
    }
    out.update(_hf_tower(take, t, "transformer.", config.text.layers))
    out.update(_hf_tower(take, v, "visual.transformer.", config.vision.layers))
    unused = take.unused()
    if unused:
        raise UserError(
            f"{where}: the weights hold {len(unused)} tensor(s) a CLIPModel with this config.json "
            f"does not use, e.g. {unused[0][:80]!r}; refusing to drop them silently"
        )
    return {k: t.float().contiguous() if t.is_floating_point() else t for k, t in out.items()}


# PIL's resampling codes, as preprocessor_config.json's `resample` writes them
_PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


def _hf_preprocess(folder: Path, image_size: int) -> dict[str, Any]:
    """What preprocessor_config.json states (CLIPImageProcessor's fields): mean, std, the resampling
    filter, and the resize: shortest edge + center crop, or straight to height x width. A resize
    that does not end at the model's input size is refused (zsclip resizes straight to it)."""
    file = folder / "preprocessor_config.json"
    out: dict[str, Any] = {"crop_offsets": "floor"}  # transformers' center_crop floors
    if not file.is_file():
        return out
    data = _json_object(file)
    for theirs, ours in (("image_mean", "mean"), ("image_std", "std")):
        if theirs in data:
            if not isinstance(data[theirs], list):
                raise UserError(f"{file}: {theirs} must be a list of three numbers")
            out[ours] = tuple(data[theirs])
    if "resample" in data:
        if data["resample"] not in _PIL_RESAMPLE or isinstance(data["resample"], bool):
            raise UserError(f"{file}: resample {str(data['resample'])[:20]!r} is not a PIL filter")
        out["interpolation"] = _PIL_RESAMPLE[data["resample"]]
    size = data.get("size", {"shortest_edge": image_size})
    size = {"shortest_edge": size} if isinstance(size, int) else size
    if not isinstance(size, dict):
        raise UserError(f"{file}: size must be a number or an object")
    if "shortest_edge" in size:
        wanted = (size["shortest_edge"],)
        crop = data.get("crop_size", image_size) if data.get("do_center_crop", True) else None
        crop = crop.get("height", image_size) if isinstance(crop, dict) else crop
        wanted += (crop,) if crop is not None else ()
    else:
        out["resize_mode"] = "squash"
        wanted = (size.get("height"), size.get("width"))
    if any(value != image_size for value in wanted) or (
        "shortest_edge" in size and not data.get("do_center_crop", True)
    ):
        raise UserError(
            f"{file}: resizes to {wanted}, not to the model's {image_size} px input; zsclip "
            f"reproduces shortest edge = crop = input size, or height = width = input size"
        )
    return out


def _hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    from zsclip.core.safetensors_io import load_tensors

    if (folder / "model.safetensors").is_file():
        return load_tensors(folder / "model.safetensors")
    if (folder / "pytorch_model.bin").is_file():
        return _tensor_dict(read_torch_file(folder / "pytorch_model.bin"), str(folder))
    raise UserError(
        f"{folder}: no model.safetensors or pytorch_model.bin in this Hugging Face folder"
    )


def read_huggingface_folder(folder: Path) -> ForeignCheckpoint:
    """A folder written by CLIPModel.save_pretrained (config.json + model.safetensors or
    pytorch_model.bin)."""
    hf_config = _json_object(folder / "config.json")
    model_type = hf_config.get("model_type")
    if model_type not in ("clip", None):
        raise UserError(f"{folder}: model_type {str(model_type)[:40]!r} is not a CLIP model")
    config = hf_config_to_ours(hf_config, str(folder))
    state_dict = hf_state_dict_to_ours(_hf_weights(folder), config, str(folder))
    image_size = config.vision.image_size
    preprocess = {"image_size": image_size, **_hf_preprocess(folder, image_size)}
    return ForeignCheckpoint(state_dict, config, "huggingface", preprocess, dict(HF_NAMES))


def looks_like_huggingface(keys: list[str]) -> bool:
    return any(str(k).startswith("text_model.") for k in keys)
