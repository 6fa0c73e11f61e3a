"""Write one set of CLIP weights twice: in OpenAI's layout (what zsclip reads) and as a Hugging Face folder
(config.json, model.safetensors, tokenizer and image-processor files) that `CLIPModel.from_pretrained` reads, so
the benchmark's baseline runs on exactly the same network. Needs transformers (a test-only dependency).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

_BLOCK = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
    "attn.out_proj": "self_attn.out_proj",
}


def _tower(sd: dict[str, torch.Tensor], ours: str, hf: str, layers: int) -> dict[str, torch.Tensor]:
    """OpenAI blocks -> Hugging Face encoder layers: in_proj split into q/k/v, the rest renamed."""
    out = {}
    for i in range(layers):
        src, dst = f"{ours}resblocks.{i}.", f"{hf}encoder.layers.{i}."
        for kind in ("weight", "bias"):
            for name, part in zip("qkv", sd[f"{src}attn.in_proj_{kind}"].chunk(3, dim=0)):
                out[f"{dst}self_attn.{name}_proj.{kind}"] = part.contiguous()
            for our_name, hf_name in _BLOCK.items():
                out[f"{dst}{hf_name}.{kind}"] = sd[f"{src}{our_name}.{kind}"]
    return out


def openai_to_hf(
    sd: dict[str, torch.Tensor], text_layers: int, vision_layers: int
) -> dict[str, torch.Tensor]:
    t, v = "text_model.", "vision_model."
    out = {
        f"{t}embeddings.token_embedding.weight": sd["token_embedding.weight"],
        f"{t}embeddings.position_embedding.weight": sd["positional_embedding"],
        f"{t}final_layer_norm.weight": sd["ln_final.weight"],
        f"{t}final_layer_norm.bias": sd["ln_final.bias"],
        "text_projection.weight": sd["text_projection"]
        .t()
        .contiguous(),  # OpenAI [W, E] -> Linear [E, W]
        "logit_scale": sd["logit_scale"].reshape(()),
        f"{v}embeddings.class_embedding": sd["visual.class_embedding"],
        f"{v}embeddings.patch_embedding.weight": sd["visual.conv1.weight"],
        f"{v}embeddings.position_embedding.weight": sd["visual.positional_embedding"],
        f"{v}pre_layrnorm.weight": sd["visual.ln_pre.weight"],  # sic: Hugging Face's spelling
        f"{v}pre_layrnorm.bias": sd["visual.ln_pre.bias"],
        f"{v}post_layernorm.weight": sd["visual.ln_post.weight"],
        f"{v}post_layernorm.bias": sd["visual.ln_post.bias"],
        "visual_projection.weight": sd["visual.proj"].t().contiguous(),
    }
    out.update(_tower(sd, "transformer.", t, text_layers))
    out.update(_tower(sd, "visual.transformer.", v, vision_layers))
    return out


def write_hf_folder(folder: Path, model, tokenizer) -> None:
    """`model`: a zsclip CLIP (ViT); `tokenizer`: zsclip's Tokenizer with the standard vocabulary."""
    import transformers

    cfg = model.config
    hf_config = transformers.CLIPConfig(
        projection_dim=cfg.embed_dim,
        text_config=dict(
            vocab_size=cfg.text.vocab_size,
            hidden_size=cfg.text.width,
            intermediate_size=int(cfg.text.width * cfg.text.mlp_ratio),
            num_hidden_layers=cfg.text.layers,
            num_attention_heads=cfg.text.heads,
            max_position_embeddings=cfg.text.context_length,
            hidden_act="quick_gelu",
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=1,
        ),
        vision_config=dict(
            hidden_size=cfg.vision.width,
            intermediate_size=int(cfg.vision.width * cfg.vision.mlp_ratio),
            num_hidden_layers=cfg.vision.layers,
            num_attention_heads=cfg.vision.heads,
            image_size=cfg.vision.image_size,
            patch_size=cfg.vision.patch_size,
            hidden_act="quick_gelu",
        ),
    )
    hf_model = transformers.CLIPModel(hf_config).eval()
    state = openai_to_hf(model.state_dict(), cfg.text.layers, cfg.vision.layers)
    missing, unexpected = hf_model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise RuntimeError(
            f"conversion mismatch: missing {missing[:3]} unexpected {unexpected[:3]}"
        )
    folder.mkdir(parents=True, exist_ok=True)
    hf_model.save_pretrained(folder)
    (folder / "vocab.json").write_text(json.dumps(tokenizer.encoder, ensure_ascii=False))
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in tokenizer.merges)
    )
    transformers.CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt")
    ).save_pretrained(folder)
    processor = transformers.CLIPImageProcessor(
        size={"shortest_edge": cfg.vision.image_size},
        crop_size={"height": cfg.vision.image_size, "width": cfg.vision.image_size},
    )
    processor.save_pretrained(folder)
