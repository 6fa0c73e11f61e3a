"""Helpers for the classify/embed CLI tests: run `zsclip` in-process, make a tiny random model, draw images."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from click.testing import CliRunner

CAPTIONS = [
    "a photo of a red circle",
    "a photo of a blue square",
    "a photo of a green triangle",
    "a corgi on a sofa",
    "a jazz album cover",
    "a mountain lake at dawn",
    "a cat",
    "a dog",
    "a photo of a small dog",
]


@dataclass
class Run:
    code: int
    stdout: str
    stderr: str


def run_cli(args: list[str], *, input: str | None = None, env: dict[str, str] | None = None) -> Run:
    """Run `zsclip ARGS` through zsclip.cli.main (so usage errors give their real exit status and one line),
    with stdout and stderr captured apart."""
    from zsclip.cli import main

    runner = CliRunner()
    import sys

    with runner.isolation(input=input, env=env) as (out, err, _):
        old_argv = sys.argv
        sys.argv = ["zsclip", *args]
        try:
            main()
            code = 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
        finally:
            sys.argv = old_argv
            sys.stdout.flush()
            sys.stderr.flush()
        return Run(code, out.getvalue().decode("utf-8"), err.getvalue().decode("utf-8"))


def build_tiny_checkpoint(
    folder: Path, name: str = "tiny.safetensors", *, metadata: dict | None = None
) -> Path:
    """The "tiny" preset with random weights, a small BPE tokenizer learned from a few captions, saved as
    zsclip's own format. Builds in well under a second."""
    import torch

    from zsclip.core.checkpoints import save_checkpoint
    from zsclip.core.model import build_model
    from zsclip.core.presets import get_preset
    from zsclip.core.transform import PreprocessConfig
    from zsclip.train.bpe import train_bpe

    torch.manual_seed(0)
    config = get_preset("tiny")
    config = dataclasses.replace(config, text=dataclasses.replace(config.text, vocab_size=1024))
    tokenizer = train_bpe(CAPTIONS * 3, vocab_size=700)
    model = build_model(config).eval()
    preprocess = PreprocessConfig(image_size=config.vision.image_size)
    path = folder / name
    save_checkpoint(path, model, preprocess=preprocess, tokenizer=tokenizer, metadata=metadata)
    return path


def make_image(
    path: Path,
    size: tuple[int, int] = (48, 40),
    color: tuple[int, int, int] = (200, 30, 30),
    fmt: str | None = None,
) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, format=fmt)
    return path


def make_photo_folder(root: Path) -> list[str]:
    """A small folder of images in nested sub-folders, plus clutter that must be skipped. Returns the expected
    input paths, in output order."""
    make_image(root / "b.png", color=(0, 0, 200))
    make_image(root / "a.jpg", color=(200, 0, 0))
    make_image(root / "sub" / "c.jpg", color=(0, 200, 0))
    make_image(root / "sub" / "d, with comma.png", color=(90, 90, 90))
    make_image(root / "._a.jpg")  # macOS resource fork: hidden
    (root / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (root / "notes.txt").write_text("not an image\n")
    return [
        os.path.join(str(root), name)
        for name in ("a.jpg", "b.png", "sub/c.jpg", "sub/d, with comma.png")
    ]


# Linux capabilities that let root ignore file permissions (linux/capability.h).
_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH = 1, 2
_PR_CAPBSET_DROP = 24


def obey_file_permissions() -> None:
    """A subprocess `preexec_fn`: the program it runs checks file permissions as any user's would.

    CI runs the tests as root, who reads and writes everything, so a `chmod 0` file would never be
    refused. Under root, this drops the two capabilities that override permissions (DAC_OVERRIDE,
    DAC_READ_SEARCH) from the bounding set, so the program exec'd next never has them; it stays
    root otherwise (it can still run the interpreter under /root). A user other than root needs
    nothing dropped."""
    if os.geteuid() != 0:
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH):
        if libc.prctl(_PR_CAPBSET_DROP, capability, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed: needs CAP_SETPCAP")


def run_zsclip(
    args: list[str],
    *,
    env: dict[str, str] | None = None,
    unprivileged: bool = False,
    timeout: float = 120,
) -> subprocess.CompletedProcess:
    """`python -m zsclip ARGS` in a child process (text output captured); with `unprivileged`, one
    that file permissions apply to even when the tests run as root (obey_file_permissions)."""
    return subprocess.run(
        [sys.executable, "-m", "zsclip", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=timeout,
        preexec_fn=obey_file_permissions if unprivileged else None,
    )
