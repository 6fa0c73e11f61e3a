"""Peak memory of the decode pipeline on a large, highly compressible PNG (issue 11, item 5).

    python benchmarks/bench_decode_memory.py [--workdir DIR] [--workers 1 8] [--copies 8]
                                             [--exact] [--zsclip-root CHECKOUT]

The image is 10950x10950 RGBA (120 MP is the pixel limit; this is 119.9 MP): a few hundred KB on disk,
about 480 MB once decoded. Each case runs in its own process: it imports torch and zsclip, decodes one
small image to warm up, resets the kernel's peak-RSS counter (/proc/self/clear_refs), then runs
`decoded_batches` over `--copies` copies of the large file with N decoding threads, as classify and
embed do. Reported: the peak resident set size during the decode, above the resident size before it
(so torch's own footprint is not counted), and the wall time.

`--fidelity` instead measures what the draft path's box averaging of large non-JPEG images costs in
accuracy: for PNGs of the benchmark photos (benchmarks/photos.py, "soft" and "sharp"; some with an alpha
channel) it prints the decoded size on the draft path (draft size 1.5 S, as classify uses) and the
cosine between the [3, S, S] model inputs of the draft and exact paths.

`--zsclip-root` runs the same cases against another checkout (e.g. the commit before the memory
budget) for a before/after comparison; `--budget` sets the decode memory budget in MiB (checkouts
that have one). Linux only (/proc).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIDE = 10950  # 10950^2 = 119.9 MP, just under the 120 MP limit


def make_image(path: Path) -> None:
    """A mostly flat RGBA image with some shapes and a transparent band: it compresses to a few
    hundred KB."""
    from PIL import Image, ImageDraw

    image = Image.new("RGBA", (SIDE, SIDE), (40, 120, 200, 255))
    draw = ImageDraw.Draw(image)
    for i in range(0, SIDE, 730):
        draw.ellipse((i, i, i + 2000, i + 1500), fill=(230, 180, 30, 255))
        draw.rectangle((SIDE - i - 900, i, SIDE - i, i + 600), fill=(20, 20, 20, 128))
    draw.rectangle((0, SIDE // 2, SIDE, SIDE // 2 + 800), fill=(0, 0, 0, 0))
    image.save(path, compress_level=9)


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def run_case(args: argparse.Namespace) -> None:
    """One measurement, in this (fresh) process; prints one JSON line."""
    if args.zsclip_root:
        sys.path.insert(0, str(Path(args.zsclip_root).resolve()))
    import torch
    from PIL import Image

    from zsclip.core.transform import PreprocessConfig
    from zsclip.jobs import pipeline
    from zsclip.jobs.inputs import InputItem

    torch.set_num_threads(1)
    workers = args.workers[0]
    config = PreprocessConfig()
    options = pipeline.DecodeOptions(draft_size=None if args.exact else 336)
    if args.budget is not None:
        options = pipeline.DecodeOptions(options.draft_size, memory_budget=args.budget << 20)
    small = args.workdir / "small.png"
    Image.new("RGB", (640, 480), (1, 2, 3)).save(small)
    for _ in pipeline.decoded_batches([InputItem(str(small))], config, batch_size=1, workers=1):
        pass
    items = [InputItem(str(args.image))] * args.copies
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
    before = _rss_kib("VmRSS")
    start = time.perf_counter()
    decoded = 0
    errors = []
    for batch in pipeline.decoded_batches(
        items, config, batch_size=args.copies, workers=workers, options=options
    ):
        decoded += sum(entry.pixels is not None for entry in batch)
        errors += [entry.error for entry in batch if entry.error]
    seconds = time.perf_counter() - start
    peak = _rss_kib("VmHWM")
    result = {
        "workers": workers,
        "exact": args.exact,
        "decoded": decoded,
        "errors": errors[:1],
        "peak_above_start_mib": round((peak - before) / 1024),
        "seconds": round(seconds, 2),
    }
    print(json.dumps(result))


def fidelity(workdir: Path, size: int = 224) -> None:
    """Draft-path (box-averaged) PNG inputs against the exact path, as cosines of the model inputs."""
    import torch
    from PIL import Image

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from photos import sharp_photo, soft_photo

    from zsclip.core.transform import PreprocessConfig, load_image, to_tensor

    config = PreprocessConfig(image_size=size)
    draft = int(1.5 * size + 0.5)
    print("photo, kind, draft-path size, cosine to the exact path")
    for width, height in [(700, 525), (1024, 768), (2048, 1536), (4000, 3000)]:
        for kind, make in (("soft", soft_photo), ("sharp", sharp_photo)):
            image = make(width, height, seed=width)
            if kind == "sharp":  # and an alpha channel: composited, then averaged
                alpha = Image.linear_gradient("L").resize((width, height))
                image = image.convert("RGBA")
                image.putalpha(alpha)
            path = workdir / f"fidelity-{kind}-{width}.png"
            image.save(path, compress_level=1)
            fast, exact = load_image(path, draft_size=draft), load_image(path)
            a, b = to_tensor(fast, config), to_tensor(exact, config)
            cosine = torch.nn.functional.cosine_similarity(
                a.double().flatten(), b.double().flatten(), dim=0
            )
            print(f"{width}x{height}, {kind}, {fast.size[0]}x{fast.size[1]}, {cosine.item():.6f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--workdir", type=Path, default=Path(tempfile.gettempdir()) / "zsclip-bench-decode-memory"
    )
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--copies", type=int, default=8, help="how many times the image is listed")
    parser.add_argument("--exact", action="store_true", help="the exact (no draft) path")
    parser.add_argument("--budget", type=int, default=None, help="decode memory budget, MiB")
    parser.add_argument("--zsclip-root", type=Path, default=None)
    parser.add_argument("--fidelity", action="store_true", help="draft vs exact PNG inputs")
    parser.add_argument("--case", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--image", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        run_case(args)
        return
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.fidelity:
        fidelity(args.workdir)
        return
    image = args.workdir / f"rgba-{SIDE}.png"
    if not image.exists():
        make_image(image)
    print(f"{image.name}: {image.stat().st_size / 1e3:.0f} KB, {SIDE}x{SIDE} RGBA", flush=True)
    for workers in args.workers:
        command = [sys.executable, __file__, "--case", "--image", str(image)]
        command += ["--workdir", str(args.workdir), "--workers", str(workers)]
        command += ["--copies", str(args.copies)] + (["--exact"] if args.exact else [])
        if args.budget is not None:
            command += ["--budget", str(args.budget)]
        if args.zsclip_root:
            command += ["--zsclip-root", str(args.zsclip_root)]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        print(done.stdout.strip() or done.stderr.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
