"""What a hostile checkpoint costs before zsclip refuses it: wall time and peak memory of
`zsclip classify IMAGE --labels a,b --model FILE` for a zip bomb (a TorchScript archive whose one
member is GiBs of deflated zeros), zsclip headers claiming 100,000 layers or a width of 10^9, and,
for comparison, an empty file (the cost of starting zsclip and failing at once) and the built-in
model loading for real. Also the time `load_path` alone takes to refuse each, in this process.

    python benchmarks/hostile_checkpoints.py [--bomb-gib 4] [--work DIR]

Prints a Markdown table (the figures in docs/performance.md come from it). Building the bomb
deflates the zeros once: about a minute for 4 GiB.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
import zipfile
from pathlib import Path

import torch


def _bomb(torchscript: Path, dst: Path, gib: int) -> None:
    """The archive with its first tensor member replaced by `gib` GiB of deflated zeros."""
    with zipfile.ZipFile(torchscript) as old, zipfile.ZipFile(dst, "w") as new:
        for info in old.infolist():
            if info.filename.endswith("/data/0"):
                entry = zipfile.ZipInfo(info.filename)
                entry.compress_type = zipfile.ZIP_DEFLATED
                with new.open(entry, "w", force_zip64=True) as handle:
                    zeros = bytes(1 << 24)
                    for _ in range(gib * 64):
                        handle.write(zeros)
            else:
                new.writestr(info, old.read(info))


def _lying_header(src: Path, dst: Path, field: str, value: int) -> None:
    from safetensors.torch import load_file

    from zsclip.core.safetensors_io import read_metadata, write_safetensors

    metadata = read_metadata(src)
    config = json.loads(metadata["config"])
    tower, key = field.split(".")
    config[tower][key] = value
    write_safetensors(dst, load_file(src), {**metadata, "config": json.dumps(config)})


def _build(work: Path, gib: int) -> dict[str, Path]:
    from zsclip.core.checkpoints import load_model
    from zsclip.paths import builtin_models

    builtin = builtin_models()[0]
    model = load_model(builtin).model
    size = model.config.vision.image_size
    example = (torch.zeros(1, 3, size, size), torch.tensor([[1, 2, 3] + [0] * 29]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.trace(model, example, check_trace=False), work / "scripted.pt")
    (work / "empty.pt").write_bytes(b"")
    _bomb(work / "scripted.pt", work / "bomb.pt", gib)
    _lying_header(builtin, work / "layers.safetensors", "text.layers", 100_000)
    _lying_header(builtin, work / "width.safetensors", "vision.width", 10**9)
    from PIL import Image

    Image.new("RGB", (64, 64), (200, 30, 30)).save(work / "image.png")
    return {
        "empty file": work / "empty.pt",
        f"zip bomb ({(work / 'bomb.pt').stat().st_size / 2**20:.1f} MiB -> {gib} GiB)": work
        / "bomb.pt",
        "header: 100,000 text layers": work / "layers.safetensors",
        "header: vision width 10^9": work / "width.safetensors",
        "the built-in model (loads)": builtin,
    }


def _command(model: Path, image: Path) -> tuple[float, int, int, str]:
    """(wall seconds, peak RSS bytes, exit status, last stderr line) of one classify run."""
    args = [sys.executable, "-m", "zsclip", "classify", str(image), "--labels", "a,b"]
    start = time.perf_counter()
    process = subprocess.Popen(
        [*args, "--model", str(model)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    stderr = process.stderr.read().decode(errors="replace")
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    return (
        wall,
        usage.ru_maxrss * 1024,
        process.returncode,
        (stderr.strip().splitlines() or [""])[-1],
    )


def _refusal_seconds(model: Path) -> float:
    from zsclip.core.checkpoints import load_path
    from zsclip.errors import UserError

    start = time.perf_counter()
    try:
        load_path(model)
    except UserError:
        pass
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bomb-gib", type=int, default=4)
    parser.add_argument("--work", type=Path, default=None)
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        work = options.work or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        cases = _build(work, options.bomb_gib)
        print("| file given as --model | exit | wall s | peak RSS MiB | load_path alone s |")
        print("|---|---|---|---|---|")
        for name, path in cases.items():
            wall, rss, code, line = _command(path, work / "image.png")
            alone = _refusal_seconds(path)
            print(f"| {name} | {code} | {wall:.2f} | {rss / 2**20:.0f} | {alone:.3f} |")
            print(f"<!-- {line[:200]} -->", file=sys.stderr)


if __name__ == "__main__":
    main()
