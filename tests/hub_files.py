"""Hugging Face repositories for the tests, made from one tiny random model: in the transformers
layout and in OpenCLIP's, laid out in huggingface_hub's cache format (models--ORG--NAME/ with
blobs/, refs/main and snapshots/COMMIT/ links) or served by a local stand-in for the Hub.

The stand-in answers as the Hub does for `hf_hub_download`: HEAD and GET on
/ORG/NAME/resolve/REVISION/FILE with X-Repo-Commit and ETag headers, and 404 with
X-Error-Code: EntryNotFound for a file the repository lacks.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import torch
from checkpoint_files import hf_config, hf_state_dict
from cli_helpers import build_tiny_checkpoint

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _safetensors_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    return save({k: v.contiguous() for k, v in tensors.items()})


def tiny_repos(root: Path, preprocess_cfg: dict | None = None) -> dict[str, dict[str, bytes]]:
    """{"transformers": files, "openclip": files, "zsclip": {"model": checkpoint path bytes}}: the
    same weights in both Hub layouts, each with the model's vocab.json + merges.txt."""
    from zsclip.core.checkpoints import load_path

    own = build_tiny_checkpoint(root)
    loaded = load_path(own)
    sd = {k: v.detach().clone() for k, v in loaded.model.state_dict().items()}
    sd = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    config = loaded.model.config
    tokenizer = loaded.tokenizer
    vocab = {
        "vocab.json": json.dumps(tokenizer.encoder, ensure_ascii=False).encode(),
        "merges.txt": (
            "#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in tokenizer.merges) + "\n"
        ).encode(),
    }
    hf_sd = hf_state_dict(sd, config.text.layers, config.vision.layers)
    transformers_files = {
        "config.json": json.dumps(hf_config(config)).encode(),
        "model.safetensors": _safetensors_bytes(hf_sd),
        **vocab,
    }
    open_clip_config = {
        "model_cfg": {"embed_dim": config.embed_dim, "quick_gelu": config.quick_gelu},
        "preprocess_cfg": preprocess_cfg or {},
    }
    openclip_files = {
        "open_clip_config.json": json.dumps(open_clip_config).encode(),
        "open_clip_model.safetensors": _safetensors_bytes(sd),
        **vocab,
    }
    return {"transformers": transformers_files, "openclip": openclip_files, "own": own}


def put_in_hub_cache(cache: Path, repo_id: str, files: dict[str, bytes]) -> Path:
    """Write a repository into a huggingface_hub cache folder; returns its snapshot folder."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT)
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    return snapshot


def serve_repo(server, repo_id: str, files: dict[str, bytes]) -> None:
    """Make a tests/local_server.LocalServer answer like the Hub for this repository."""
    server.headers["X-Repo-Commit"] = COMMIT
    server.missing_headers["X-Error-Code"] = "EntryNotFound"
    for name, data in files.items():
        path = f"/{repo_id}/resolve/main/{name}"
        server.files[path] = data
        server.rules[path] = {"headers": {"ETag": f'"{hashlib.sha256(data).hexdigest()}"'}}


def png_bytes(size: tuple[int, int] = (333, 517)) -> bytes:
    from PIL import Image

    generator = torch.Generator().manual_seed(3)
    pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=generator, dtype=torch.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels.numpy(), "RGB").save(buffer, format="PNG")
    return buffer.getvalue()
