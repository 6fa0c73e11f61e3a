"""Valid checkpoints in every format zsclip reads, made from one tiny random model, for the tests
that damage them (tests/test_core_hostile_checkpoints.py, tests/test_core_checkpoint_fuzz.py).

Each foreign file sits in its own folder beside a vocab.json + merges.txt of the model's small
vocabulary, so that loading needs nothing from the network or the cache. The Hugging Face folder is
written here by renaming (no transformers needed); tests/test_core_checkpoints.py checks the real
transformers layout.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from cli_helpers import build_tiny_checkpoint


@dataclass
class Formats:
    zsclip: Path  # zsclip's own .safetensors
    openai: Path  # an OpenAI-layout state dict written by torch.save (a zip archive)
    torchscript: Path  # the same model traced and saved by torch.jit.save
    huggingface: Path  # a CLIPModel.save_pretrained-style folder
    state_dict: dict[str, torch.Tensor] = field(repr=False)  # the weights, in zsclip's names


def _write_vocab(folder: Path, tokenizer) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(tokenizer.encoder, ensure_ascii=False))
    merges = "\n".join(f"{a} {b}" for a, b in tokenizer.merges)
    (folder / "merges.txt").write_text("#version: 0.2\n" + merges + "\n")


def hf_state_dict(sd: dict[str, torch.Tensor], text_layers: int, vision_layers: int) -> dict:
    """zsclip's names -> Hugging Face CLIPModel's (q/k/v split, projections transposed)."""
    t, v = "text_model.", "vision_model."
    out = {
        f"{t}embeddings.token_embedding.weight": sd["token_embedding.weight"],
        f"{t}embeddings.position_embedding.weight": sd["positional_embedding"],
        f"{t}final_layer_norm.weight": sd["ln_final.weight"],
        f"{t}final_layer_norm.bias": sd["ln_final.bias"],
        "text_projection.weight": sd["text_projection"].t(),
        "logit_scale": sd["logit_scale"],
        f"{v}embeddings.class_embedding": sd["visual.class_embedding"],
        f"{v}embeddings.patch_embedding.weight": sd["visual.conv1.weight"],
        f"{v}embeddings.position_embedding.weight": sd["visual.positional_embedding"],
        f"{v}pre_layrnorm.weight": sd["visual.ln_pre.weight"],
        f"{v}pre_layrnorm.bias": sd["visual.ln_pre.bias"],
        f"{v}post_layernorm.weight": sd["visual.ln_post.weight"],
        f"{v}post_layernorm.bias": sd["visual.ln_post.bias"],
        "visual_projection.weight": sd["visual.proj"].t(),
    }
    renames = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1"}
    renames |= {"mlp.c_proj": "mlp.fc2", "attn.out_proj": "self_attn.out_proj"}
    for hf, ours, layers in ((t, "", text_layers), (v, "visual.", vision_layers)):
        for i in range(layers):
            src, dst = f"{ours}transformer.resblocks.{i}.", f"{hf}encoder.layers.{i}."
            for kind in ("weight", "bias"):
                for p, part in zip("qkv", sd[f"{src}attn.in_proj_{kind}"].chunk(3)):
                    out[f"{dst}self_attn.{p}_proj.{kind}"] = part
                for our_name, hf_name in renames.items():
                    out[f"{dst}{hf_name}.{kind}"] = sd[f"{src}{our_name}.{kind}"]
    return {k: t.contiguous() for k, t in out.items()}


def hf_config(config) -> dict:
    """config.json for a zsclip ViT config."""
    tower = {"hidden_act": "quick_gelu" if config.quick_gelu else "gelu"}
    text, vision = config.text, config.vision
    return {
        "model_type": "clip",
        "projection_dim": config.embed_dim,
        "text_config": {
            **tower,
            "hidden_size": text.width,
            "intermediate_size": int(text.width * text.mlp_ratio),
            "num_hidden_layers": text.layers,
            "num_attention_heads": text.heads,
            "max_position_embeddings": text.context_length,
            "vocab_size": text.vocab_size,
        },
        "vision_config": {
            **tower,
            "hidden_size": vision.width,
            "intermediate_size": int(vision.width * vision.mlp_ratio),
            "num_hidden_layers": vision.layers,
            "num_attention_heads": vision.heads,
            "image_size": vision.image_size,
            "patch_size": vision.patch_size,
        },
    }


def build_formats(root: Path) -> Formats:
    from safetensors.torch import save_file

    from zsclip.core.checkpoints import load_path

    own = build_tiny_checkpoint(root / "zsclip")
    loaded = load_path(own)
    sd = {k: v.detach().clone() for k, v in loaded.model.state_dict().items()}
    for name in ("openai", "torchscript", "huggingface"):
        _write_vocab(root / name, loaded.tokenizer)
    torch.save(sd, root / "openai" / "model.pt")
    example = (torch.zeros(1, 3, 32, 32), torch.tensor([[5, 6, 7] + [0] * 74]))
    with warnings.catch_warnings():  # torch.jit is deprecated; OpenAI's archives are what it wrote
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(loaded.model, example, check_trace=False)
        torch.jit.save(traced, root / "torchscript" / "model.pt")
    config = loaded.model.config
    hf = root / "huggingface"
    save_file(hf_state_dict(sd, config.text.layers, config.vision.layers), hf / "model.safetensors")
    (hf / "config.json").write_text(json.dumps(hf_config(config), indent=2))
    return Formats(own, root / "openai/model.pt", root / "torchscript/model.pt", hf, sd)
