"""Checking a checkpoint's model config against its tensors, before anything is built.

A config read from a file may be damaged or may lie: a header can claim 100,000 layers or a width of
a billion over a few megabytes of weights, and building that model first would allocate whatever it
claims. So a config is parsed strictly here (every field known, present, of the right type and
range), the blocks the weights hold are counted against its depths, and the shape of every tensor
it implies is computed by arithmetic alone (nothing is allocated) and compared with the weights'
names and shapes. Any difference is one line naming the config field; weights the config does not
use are an error, never dropped.

`names` maps zsclip's field names ("text.width") to what a foreign file calls them
("config.json text_config.hidden_size"), so messages speak the file's language.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any

from zsclip.core.presets import CLIPConfig, TextConfig, VisionConfig
from zsclip.errors import UserError


@dataclass(frozen=True)
class Dim:
    size: int
    field: str  # the config field this dimension follows from


Shape = tuple[Dim, ...]


# ------------------------------------------------------------------------------------------ parsing

_INT_FIELDS = {
    "vision": ("image_size", "width", "heads", "patch_size"),
    "text": ("context_length", "vocab_size", "width", "heads", "layers"),
}


def _fields(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def _positive_int(value: Any, field: str, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise UserError(f"{where}: config field {field} must be a positive integer, not {value!r}")
    return value


def _section(data: Any, name: str, cls: type, where: str) -> dict[str, Any]:
    """A config section as a dict with exactly `cls`'s fields."""
    label = f"config field {name}" if name else "the config"
    if not isinstance(data, dict):
        raise UserError(f"{where}: {label} must be a JSON object, not {type(data).__name__}")
    known = _fields(cls)
    unknown = sorted(str(k) for k in data if k not in known)
    missing = sorted(known - set(data))
    prefix = f"{name}." if name else ""
    if unknown:
        raise UserError(f"{where}: unknown config field {prefix}{unknown[0][:60]}")
    if missing:
        raise UserError(f"{where}: the config lacks field {prefix}{missing[0]}")
    return data


def _vision(data: Any, where: str) -> VisionConfig:
    data = _section(data, "vision", VisionConfig, where)
    for key in _INT_FIELDS["vision"]:
        _positive_int(data[key], f"vision.{key}", where)
    if data["kind"] not in ("vit", "resnet"):
        raise UserError(f"{where}: config field vision.kind must be 'vit' or 'resnet'")
    if data["stem"] not in ("patch", "conv"):
        raise UserError(f"{where}: config field vision.stem must be 'patch' or 'conv'")
    layers = data["layers"]
    if data["kind"] == "resnet":
        if not isinstance(layers, list) or len(layers) != 4:
            raise UserError(f"{where}: config field vision.layers must list 4 stage depths")
        for depth in layers:
            _positive_int(depth, "vision.layers", where)
    else:
        _positive_int(layers, "vision.layers", where)
    _ratio(data["mlp_ratio"], "vision.mlp_ratio", where)
    return VisionConfig(**data)


def _ratio(value: Any, field: str, where: str) -> None:
    if (
        not isinstance(value, (int, float))
        or isinstance(value, bool)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise UserError(f"{where}: config field {field} must be a positive number, not {value!r}")


def config_from_dict(data: Any, where: str) -> CLIPConfig:
    """A zsclip checkpoint's config, parsed strictly: each field present, known, typed, in range."""
    data = _section(data, "", CLIPConfig, where)
    _positive_int(data["embed_dim"], "embed_dim", where)
    if not isinstance(data["quick_gelu"], bool):
        raise UserError(f"{where}: config field quick_gelu must be true or false")
    text = _section(data["text"], "text", TextConfig, where)
    for key in _INT_FIELDS["text"]:
        _positive_int(text[key], f"text.{key}", where)
    _ratio(text["mlp_ratio"], "text.mlp_ratio", where)
    config = CLIPConfig(
        embed_dim=data["embed_dim"],
        vision=_vision(data["vision"], where),
        text=TextConfig(**text),
        quick_gelu=data["quick_gelu"],
    )
    check_config(config, where)
    return config


def check_config(config: CLIPConfig, where: str, names: dict[str, str] | None = None) -> None:
    """Relations between fields that the model's constructor would otherwise trip over."""
    names = names or {}

    def fail(field: str, problem: str) -> UserError:
        return UserError(f"{where}: {names.get(field, 'config field ' + field)} {problem}")

    v, t = config.vision, config.text
    for field, value in _plain_ints(config):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise fail(field, f"must be a positive integer, not {value!r}")
    for field, width, ratio in (("vision", v.width, v.mlp_ratio), ("text", t.width, t.mlp_ratio)):
        if not math.isfinite(ratio) or int(width * ratio) < 1:
            raise fail(f"{field}.mlp_ratio", f"must be a positive number, not {ratio!r}")
    if t.width % t.heads:
        raise fail("text.heads", f"({t.heads}) must divide text.width ({t.width})")
    pooled = v.width * 32 if v.kind == "resnet" else v.width
    if pooled % v.heads:
        raise fail("vision.heads", f"({v.heads}) must divide the vision width ({pooled})")
    if v.kind == "vit" and v.image_size % v.patch_size:
        raise fail("vision.image_size", f"({v.image_size}) must be a multiple of the patch size")
    if v.kind == "vit" and v.stem == "conv" and v.patch_size % 4:
        raise fail("vision.patch_size", "must be divisible by 4 with the conv stem")
    if v.kind == "resnet" and v.image_size < 32:
        raise fail("vision.image_size", "must be at least 32 for a ResNet")


def _plain_ints(config: CLIPConfig) -> list[tuple[str, Any]]:
    v, t = config.vision, config.text
    depths = v.layers if isinstance(v.layers, tuple) else (v.layers,)
    pairs = [("embed_dim", config.embed_dim)] + [("vision.layers", d) for d in depths]
    pairs += [(f"vision.{k}", getattr(v, k)) for k in _INT_FIELDS["vision"]]
    return pairs + [(f"text.{k}", getattr(t, k)) for k in _INT_FIELDS["text"]]


# ------------------------------------------------------------------------------------------- shapes


def _d(size: int, field: str) -> Dim:
    return Dim(size, field)


def _block(out: dict[str, Shape], prefix: str, width: int, ratio: float, tower: str) -> None:
    """One ResidualAttentionBlock: pre-norm attention and MLP."""
    w, h = _d(width, f"{tower}.width"), _d(int(width * ratio), f"{tower}.mlp_ratio")
    w3 = _d(3 * width, f"{tower}.width")
    # fmt: off
    shapes = {
        "ln_1.weight": (w,), "ln_1.bias": (w,), "ln_2.weight": (w,), "ln_2.bias": (w,),
        "attn.in_proj_weight": (w3, w), "attn.in_proj_bias": (w3,),
        "attn.out_proj.weight": (w, w), "attn.out_proj.bias": (w,),
        "mlp.c_fc.weight": (h, w), "mlp.c_fc.bias": (h,),
        "mlp.c_proj.weight": (w, h), "mlp.c_proj.bias": (w,),
    }
    # fmt: on
    out.update({prefix + key: shape for key, shape in shapes.items()})


def _vit(out: dict[str, Shape], v: VisionConfig, embed: Dim) -> None:
    w, p = _d(v.width, "vision.width"), v.patch_size
    if v.stem == "conv":
        quarter, half = _d(v.width // 4, "vision.width"), _d(v.width // 2, "vision.width")
        three, k = _d(3, "vision.stem"), _d(3, "vision.stem")
        out["visual.stem.net.0.weight"] = (quarter, three, k, k)
        out["visual.stem.net.0.bias"] = (quarter,)
        out["visual.stem.net.2.weight"] = (half, quarter, k, k)
        out["visual.stem.net.2.bias"] = (half,)
        kernel = _d(p // 4, "vision.patch_size")
        out["visual.conv1.weight"] = (w, half, kernel, kernel)
    else:
        kernel = _d(p, "vision.patch_size")
        out["visual.conv1.weight"] = (w, _d(3, "vision.stem"), kernel, kernel)
    tokens = _d((v.image_size // p) ** 2 + 1, "vision.image_size")
    out["visual.class_embedding"] = (w,)
    out["visual.positional_embedding"] = (tokens, w)
    for name in ("ln_pre", "ln_post"):
        out[f"visual.{name}.weight"] = out[f"visual.{name}.bias"] = (w,)
    out["visual.proj"] = (w, embed)
    for i in range(v.layers):
        _block(out, f"visual.transformer.resblocks.{i}.", v.width, v.mlp_ratio, "vision")


def _norm(out: dict[str, Shape], prefix: str, channels: Dim) -> None:
    for key in ("weight", "bias", "running_mean", "running_var"):
        out[f"{prefix}.{key}"] = (channels,)
    out[f"{prefix}.num_batches_tracked"] = ()


def _conv(out: dict[str, Shape], key: str, cout: int, cin: int | Dim, k: int) -> None:
    cin = cin if isinstance(cin, Dim) else _d(cin, "vision.width")
    kernel = _d(k, "vision.kind")
    out[key] = (_d(cout, "vision.width"), cin, kernel, kernel)


def _resnet(out: dict[str, Shape], v: VisionConfig, embed: Dim) -> None:
    w = v.width
    stem = ((_d(3, "vision.kind"), w // 2), (w // 2, w // 2), (w // 2, w))  # (in, out) channels
    for i, (cin, cout) in enumerate(stem, start=1):
        _conv(out, f"visual.conv{i}.weight", cout, cin, 3)
        _norm(out, f"visual.bn{i}", _d(cout, "vision.width"))
    inplanes = w
    for stage, blocks in enumerate(v.layers, start=1):
        planes = w * 2 ** (stage - 1)
        for b in range(blocks):
            prefix = f"visual.layer{stage}.{b}."
            _conv(out, prefix + "conv1.weight", planes, inplanes, 1)
            _conv(out, prefix + "conv2.weight", planes, planes, 3)
            _conv(out, prefix + "conv3.weight", planes * 4, planes, 1)
            for n, channels in ((1, planes), (2, planes), (3, planes * 4)):
                _norm(out, f"{prefix}bn{n}", _d(channels, "vision.width"))
            if b == 0 and (stage > 1 or inplanes != planes * 4):  # as Bottleneck decides
                _conv(out, prefix + "downsample.0.weight", planes * 4, inplanes, 1)
                _norm(out, prefix + "downsample.1", _d(planes * 4, "vision.width"))
            inplanes = planes * 4
    c = _d(w * 32, "vision.width")
    grid = _d((v.image_size // 32) ** 2 + 1, "vision.image_size")
    out["visual.attnpool.positional_embedding"] = (grid, c)
    for name in ("k_proj", "q_proj", "v_proj"):
        out[f"visual.attnpool.{name}.weight"], out[f"visual.attnpool.{name}.bias"] = (c, c), (c,)
    out["visual.attnpool.c_proj.weight"], out["visual.attnpool.c_proj.bias"] = (embed, c), (embed,)


def expected_shapes(config: CLIPConfig) -> dict[str, Shape]:
    """Every tensor of CLIP(config).state_dict(), its shape computed from the config (a checked
    config: check_config and the block counts first, so the loops are as long as the weights)."""
    out: dict[str, Shape] = {}
    embed, t = _d(config.embed_dim, "embed_dim"), config.text
    (_vit if config.vision.kind == "vit" else _resnet)(out, config.vision, embed)
    w = _d(t.width, "text.width")
    for i in range(t.layers):
        _block(out, f"transformer.resblocks.{i}.", t.width, t.mlp_ratio, "text")
    out["token_embedding.weight"] = (_d(t.vocab_size, "text.vocab_size"), w)
    out["positional_embedding"] = (_d(t.context_length, "text.context_length"), w)
    out["ln_final.weight"] = out["ln_final.bias"] = (w,)
    out["text_projection"] = (w, embed)
    out["logit_scale"] = ()
    return out


# ----------------------------------------------------------------------------------------- matching


def _blocks(keys: list[str], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return len({m.group(1) for k in keys if (m := pattern.match(k))})


def _check_structure(config: CLIPConfig, keys: list[str], fail) -> None:
    """Tower kind, stem and depths, from the tensor names alone (before any long loop runs)."""
    v = config.vision
    kind = "resnet" if "visual.attnpool.positional_embedding" in keys else "vit"
    if v.kind != kind and ("visual.proj" in keys or kind == "resnet"):
        raise fail("vision.kind", f"is {v.kind!r} but the weights hold a {kind} vision tower")
    if v.kind == "vit":
        stem = "conv" if "visual.stem.net.0.weight" in keys else "patch"
        if v.stem != stem:
            raise fail("vision.stem", f"is {v.stem!r} but the weights have a {stem} stem")
    depths = [("text.layers", config.text.layers, "transformer.resblocks.")]
    if v.kind == "vit":
        depths.append(("vision.layers", v.layers, "visual.transformer.resblocks."))
    else:
        depths += [("vision.layers", d, f"visual.layer{i}.") for i, d in enumerate(v.layers, 1)]
    for field, claimed, prefix in depths:
        held = _blocks(keys, prefix)
        if held != claimed:
            raise fail(field, f"is {claimed} but the weights hold {held} blocks ({prefix}N)")


def check_shapes(
    config: CLIPConfig,
    shapes: dict[str, tuple[int, ...]],
    where: str,
    names: dict[str, str] | None = None,
) -> None:
    """Compare the tensors a config implies with the weights' names and shapes; UserError on the
    first difference, naming the field. BatchNorm step counters may be absent (some exports drop
    them)."""
    names = names or {}

    def fail(field: str, problem: str) -> UserError:
        return UserError(f"{where}: {names.get(field, 'config field ' + field)} {problem}")

    check_config(config, where, names)
    keys = list(shapes)
    _check_structure(config, keys, fail)
    expected = expected_shapes(config)
    unused = [k for k in keys if k not in expected]
    if unused:
        raise UserError(
            f"{where}: the weights hold {len(unused)} tensor(s) the config does not use, e.g. "
            f"{unused[0][:80]!r}; refusing to drop them silently"
        )
    for key, dims in expected.items():
        if key not in shapes:
            if key.endswith("num_batches_tracked"):
                continue
            raise UserError(f"{where}: the weights lack {key!r}, which the config implies")
        actual, wanted = tuple(shapes[key]), tuple(d.size for d in dims)
        if actual != wanted:
            field = _culprit(dims, actual)
            problem = f"does not match the weights: {key} has shape {actual}, the config implies"
            raise fail(field, f"{problem} {wanted}")


def _culprit(dims: Shape, actual: tuple[int, ...]) -> str:
    if len(dims) == len(actual):
        for dim, size in zip(dims, actual):
            if dim.size != size:
                return dim.field
    return dims[0].field if dims else "embed_dim"
