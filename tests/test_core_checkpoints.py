"""Every checkpoint format loads faithfully: parity with Hugging Face transformers on random weights (1e-4),
the same weights in OpenAI, TorchScript and OpenCLIP layouts, and files whose pickle would run code refused."""

from __future__ import annotations

import gzip
import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from zsclip.core.checkpoints import load_model, save_checkpoint
from zsclip.core.safetensors_io import read_metadata
from zsclip.core.transform import Preprocess
from zsclip.errors import UserError

transformers = pytest.importorskip("transformers")

# transformers 5 cleans text with NFC instead of ftfy + html.unescape, so the parity texts avoid entities and
# mojibake (tests/test_core_tokenizer.py checks those against OpenAI's reference tokenizer).
TEXTS = ["a photo of a corgi.", "a jazz album cover", "", "ÉMOJI 🐶 and friends", "x " * 100]


def _write_hf_vocab(gz_path: Path, folder: Path) -> None:
    """vocab.json + merges.txt in Hugging Face's layout, built from OpenAI's merges file."""
    lines = gzip.open(gz_path, "rt", encoding="utf-8").read().split("\n")[1 : 49152 - 256 - 2 + 1]
    merges = [tuple(line.split()) for line in lines]
    byte_symbols = [chr(b) for b in range(ord("!"), ord("~") + 1)] + [
        chr(b) for b in range(ord("¡"), ord("¬") + 1)
    ]
    byte_symbols += [chr(b) for b in range(ord("®"), ord("ÿ") + 1)]
    extra = 0
    for b in range(
        256
    ):  # GPT-2's byte-to-unicode table, written out independently of zsclip.core.tokenizer
        if b not in [ord(c) for c in byte_symbols]:
            byte_symbols.append(chr(256 + extra))
            extra += 1
    symbols = byte_symbols + [s + "</w>" for s in byte_symbols] + ["".join(m) for m in merges]
    symbols += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(
        json.dumps({s: i for i, s in enumerate(symbols)}, ensure_ascii=False)
    )
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n"
    )


def _images() -> list[Image.Image]:
    gen = torch.Generator().manual_seed(1)
    sizes = [
        (32, 32),
        (57, 40),
        (31, 80),
    ]  # square, landscape, portrait: the full resize + crop path
    out = []
    for w, h in sizes:
        pixels = torch.randint(0, 256, (h, w, 3), generator=gen, dtype=torch.uint8)
        out.append(Image.frombytes("RGB", (w, h), bytes(pixels.flatten().tolist())))
    return out


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory, standard_vocab_path) -> Path:
    """A random CLIPModel with quick_gelu, saved with save_pretrained beside its tokenizer and image processor."""
    folder = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    config = transformers.CLIPConfig(
        # Heads of width 64, as in every published CLIP: OpenAI state dicts do not record the head count.
        text_config=dict(
            hidden_size=128,
            intermediate_size=320,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
            vocab_size=49408,
            hidden_act="quick_gelu",
        ),
        vision_config=dict(
            hidden_size=128,
            intermediate_size=192,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
            hidden_act="quick_gelu",
        ),
        projection_dim=24,
    )
    model = transformers.CLIPModel(config).eval()
    with torch.no_grad():  # random everything, so a swapped or missing tensor cannot go unnoticed
        for name, param in model.named_parameters():
            if name != "logit_scale":
                param.add_(0.2 * torch.randn_like(param))
    model.save_pretrained(folder)
    _write_hf_vocab(standard_vocab_path, folder)
    transformers.CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    ).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def reference(hf_folder):
    """Transformers' own outputs for TEXTS and the images."""
    model = transformers.CLIPModel.from_pretrained(hf_folder).eval()
    tokenizer = transformers.CLIPTokenizer.from_pretrained(hf_folder)
    processor = transformers.CLIPImageProcessor.from_pretrained(hf_folder)
    enc = tokenizer(
        TEXTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    )
    pixels = processor(images=_images(), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        out = model(
            input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], pixel_values=pixels
        )
    return {
        "ids": enc["input_ids"],
        "image": out.image_embeds,
        "text": out.text_embeds,
        "logits": out.logits_per_image,
    }


def _ours(loaded):
    preprocess = Preprocess(loaded.preprocess)
    images = torch.stack([preprocess(im) for im in _images()])
    ids = loaded.tokenizer(TEXTS, context_length=77)
    with torch.no_grad():
        image = F.normalize(loaded.model.encode_image(images), dim=-1)
        text = F.normalize(loaded.model.encode_text(ids), dim=-1)
        logits, _ = loaded.model(images, ids)
    return {"ids": ids, "image": image, "text": text, "logits": logits}


def _assert_matches(ours, reference):
    # transformers pads with the end token, OpenAI's tokenizer with 0; after the end token nothing counts.
    after_end = (
        torch.cumsum((reference["ids"] == 49407).int(), dim=1) - (reference["ids"] == 49407).int()
        > 0
    )
    assert torch.equal(ours["ids"], reference["ids"].masked_fill(after_end, 0))
    for key in ("image", "text", "logits"):
        torch.testing.assert_close(ours[key], reference[key], atol=1e-4, rtol=1e-4, msg=key)


def _openai_state_dict(hf_folder: Path) -> dict[str, torch.Tensor]:
    """The HF weights in OpenAI's layout, converted here independently of zsclip.core.foreign."""
    from safetensors.torch import load_file

    hf = load_file(hf_folder / "model.safetensors")
    out = {}
    for tower, ours in (("text_model.", ""), ("vision_model.", "visual.")):
        layers = {int(k.split(".")[3]) for k in hf if k.startswith(tower + "encoder.layers.")}
        for i in sorted(layers):
            src, dst = f"{tower}encoder.layers.{i}.", f"{ours}transformer.resblocks.{i}."
            for part in ("weight", "bias"):
                out[f"{dst}attn.in_proj_{part}"] = torch.cat(
                    [hf[f"{src}self_attn.{p}_proj.{part}"] for p in "qkv"]
                )
                out[f"{dst}attn.out_proj.{part}"] = hf[f"{src}self_attn.out_proj.{part}"]
                out[f"{dst}ln_1.{part}"] = hf[f"{src}layer_norm1.{part}"]
                out[f"{dst}ln_2.{part}"] = hf[f"{src}layer_norm2.{part}"]
                out[f"{dst}mlp.c_fc.{part}"] = hf[f"{src}mlp.fc1.{part}"]
                out[f"{dst}mlp.c_proj.{part}"] = hf[f"{src}mlp.fc2.{part}"]
    out.update(
        {
            "token_embedding.weight": hf["text_model.embeddings.token_embedding.weight"],
            "positional_embedding": hf["text_model.embeddings.position_embedding.weight"],
            "ln_final.weight": hf["text_model.final_layer_norm.weight"],
            "ln_final.bias": hf["text_model.final_layer_norm.bias"],
            "text_projection": hf["text_projection.weight"].t().contiguous(),
            "logit_scale": hf["logit_scale"],
            "visual.class_embedding": hf["vision_model.embeddings.class_embedding"],
            "visual.conv1.weight": hf["vision_model.embeddings.patch_embedding.weight"],
            "visual.positional_embedding": hf["vision_model.embeddings.position_embedding.weight"],
            "visual.ln_pre.weight": hf["vision_model.pre_layrnorm.weight"],
            "visual.ln_pre.bias": hf["vision_model.pre_layrnorm.bias"],
            "visual.ln_post.weight": hf["vision_model.post_layernorm.weight"],
            "visual.ln_post.bias": hf["vision_model.post_layernorm.bias"],
            "visual.proj": hf["visual_projection.weight"].t().contiguous(),
            # OpenAI's files carry these too; the loader must tolerate them.
            "input_resolution": torch.tensor(32),
            "context_length": torch.tensor(77),
            "vocab_size": torch.tensor(49408),
        }
    )
    return out


def test_huggingface_folder_matches_transformers(hf_folder, reference):
    loaded = load_model(hf_folder)
    assert loaded.model.config.quick_gelu
    _assert_matches(_ours(loaded), reference)


def test_openai_state_dict_pt_and_safetensors(hf_folder, reference, tmp_path, standard_vocab_path):
    from safetensors.torch import save_file

    state_dict = _openai_state_dict(hf_folder)
    torch.save(state_dict, tmp_path / "model.pt")
    save_file(dict(state_dict), tmp_path / "model.safetensors")
    for name in ("model.pt", "model.safetensors"):
        loaded = load_model(tmp_path / name, vocab=standard_vocab_path)
        assert loaded.model.config.quick_gelu, "OpenAI checkpoints run with QuickGELU"
        _assert_matches(_ours(loaded), reference)


def test_torchscript_archive_reads_tensors_without_running_code(
    hf_folder, reference, tmp_path, standard_vocab_path
):
    torch.save(_openai_state_dict(hf_folder), tmp_path / "plain.pt")
    model = load_model(tmp_path / "plain.pt", vocab=standard_vocab_path).model
    example = (torch.zeros(1, 3, 32, 32), torch.tensor([[49406, 320, 49407] + [0] * 74]))
    traced = torch.jit.trace(model, example, check_trace=False)
    torch.jit.save(traced, tmp_path / "ViT-tiny.pt")
    loaded = load_model(tmp_path / "ViT-tiny.pt", vocab=standard_vocab_path)
    _assert_matches(_ours(loaded), reference)


def test_openclip_wrapped_checkpoint_honours_its_config(
    hf_folder, reference, tmp_path, standard_vocab_path
):
    state_dict = {f"module.{k}": v for k, v in _openai_state_dict(hf_folder).items()}
    torch.save({"epoch": 3, "state_dict": state_dict}, tmp_path / "epoch_3.pt")
    # Without a config, an OpenCLIP training checkpoint is taken to use GELU (OpenCLIP's default)...
    assert not load_model(
        tmp_path / "epoch_3.pt", vocab=standard_vocab_path
    ).model.config.quick_gelu
    # ...and open_clip_config.json beside it decides.
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": {"quick_gelu": True}}))
    loaded = load_model(tmp_path / "epoch_3.pt", vocab=standard_vocab_path)
    _assert_matches(_ours(loaded), reference)


def test_convert_then_load_round_trips(hf_folder, reference, tmp_path, standard_vocab_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "zsclip",
            "convert",
            str(hf_folder),
            str(tmp_path / "converted.safetensors"),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    loaded = load_model(tmp_path / "converted.safetensors", vocab=standard_vocab_path)
    _assert_matches(_ours(loaded), reference)


def test_a_converted_file_carries_its_vocabulary(
    hf_folder, reference, tmp_path, monkeypatch, standard_vocab_path
):
    # The standard vocabulary is stored, not just named: the file loads with no vocabulary file
    # anywhere and the network refused.
    destination = tmp_path / "converted.safetensors"
    command = [sys.executable, "-m", "zsclip", "convert", str(hf_folder), str(destination)]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert read_metadata(destination)["tokenizer"] == "bpe"
    monkeypatch.setenv("ZSCLIP_CACHE", str(tmp_path / "empty-cache"))
    loaded = load_model(destination, offline=True)
    assert loaded.tokenizer.is_standard()
    _assert_matches(_ours(loaded), reference)


class _Payload:
    """Unpickling this would create a marker file: proof that code from the checkpoint ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("writer", ["torch.save", "raw pickle"])
def test_pickle_that_would_run_code_is_refused(tmp_path, writer):
    marker = tmp_path / "pwned"
    bad = tmp_path / "evil.pt"
    payload = {"visual.proj": torch.zeros(2, 2), "trap": _Payload(marker)}
    if writer == "torch.save":
        torch.save(payload, bad)
    else:
        bad.write_bytes(pickle.dumps(payload))
    with pytest.raises(UserError, match="refusing to load"):
        load_model(bad)
    assert not marker.exists()
    result = subprocess.run(
        [sys.executable, "-m", "zsclip", "convert", str(bad), str(tmp_path / "out.safetensors")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "refusing to load" in result.stderr
    assert not marker.exists() and not (tmp_path / "out.safetensors").exists()


def test_zsclip_checkpoint_is_self_describing(tmp_path):
    from zsclip.core.model import build_model
    from zsclip.core.presets import get_preset
    from zsclip.core.transform import PreprocessConfig
    from zsclip.train.bpe import train_bpe

    tokenizer = train_bpe(["a red circle", "a blue square", "two green stars"] * 5, vocab_size=560)
    config = get_preset("tiny")
    config.text.vocab_size = tokenizer.vocab_size
    model = build_model(config)
    path = tmp_path / "own.safetensors"
    save_checkpoint(
        path,
        model,
        preprocess=PreprocessConfig(image_size=32),
        tokenizer=tokenizer,
        metadata={"templates": "shapes"},
    )
    loaded = load_model(path)  # no vocabulary anywhere but inside the file
    assert loaded.metadata["templates"] == "shapes"
    assert loaded.model.config == config
    assert torch.equal(loaded.tokenizer(["a red circle"]), tokenizer(["a red circle"]))
