"""Device and precision choice for inference: `--device auto|cpu|cuda|cuda:N`, `--precision
fp32|bf16|fp16`.

Precision is applied with autocast: weights stay fp32, matrix products run in the lower precision,
and features come back as fp32 (callers cast before normalising), so outputs are fp32 whatever the
device.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, ContextManager

from zsclip.errors import UserError

if TYPE_CHECKING:
    import torch

PRECISIONS = {
    "fp32": "float32",
    "float32": "float32",
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
    "fp16": "float16",
    "float16": "float16",
    "half": "float16",
}


def resolve_device(name: str) -> "torch.device":
    """`auto` picks CUDA when a GPU is usable, else the CPU. A malformed name, or an explicit choice
    this machine cannot honour, is a usage error (the spelling is checked first, GPU or not)."""
    import torch

    name = (name or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name != "cuda" and not name.startswith("cuda:"):
        raise UserError(f"unknown --device {name!r}: use auto, cpu, cuda or cuda:N")
    index = name.partition(":")[2] if ":" in name else None
    if index is not None and not (index.isascii() and index.isdigit()):
        raise UserError(f"--device {name}: write cuda:N with N a GPU number, e.g. cuda:0")
    if not torch.cuda.is_available():
        raise UserError(
            f"--device {name}: no CUDA GPU is available here (or torch is a CPU build); "
            "use --device cpu"
        )
    count = torch.cuda.device_count()
    if index is not None and int(index) >= count:
        raise UserError(f"--device {name}: only {count} GPU(s) here (cuda:0 .. cuda:{count - 1})")
    return torch.device("cuda" if index is None else f"cuda:{int(index)}")


def resolve_precision(name: str, device: "torch.device") -> "torch.dtype":
    """fp32 anywhere; bf16 on CPUs and on GPUs that support it; fp16 on CUDA only."""
    import torch

    key = PRECISIONS.get((name or "fp32").strip().lower())
    if key is None:
        raise UserError(f"unknown --precision {name!r}: use fp32, bf16 or fp16")
    dtype = getattr(torch, key)
    if dtype == torch.float16 and device.type != "cuda":
        raise UserError(
            "--precision fp16 needs a CUDA GPU (CPU half precision is slow and inexact); "
            "use --precision bf16 or fp32 on the CPU"
        )
    if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError("--precision bf16: this GPU does not support bfloat16; use fp16 or fp32")
    return dtype


def autocast(device: "torch.device", dtype: "torch.dtype") -> ContextManager:
    """The context to run the model in: autocast for bf16/fp16, nothing for fp32."""
    import torch

    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def precision_name(dtype: "torch.dtype") -> str:
    return {"torch.float32": "fp32", "torch.bfloat16": "bf16", "torch.float16": "fp16"}.get(
        str(dtype), str(dtype)
    )
