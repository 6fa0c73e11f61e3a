"""How far JPEG draft decoding moves CLIP's input, and what it saves, for several draft policies.

    python benchmarks/bench_draft.py [--workdir DIR] [--size 224]

For each photo size and content kind (benchmarks/photos.py: "soft" camera-like, "sharp" hard edges and blocky
noise), the image is preprocessed exactly (full decode) and with the decoder's DCT scaling limited so that the
decoded short side stays >= k * S, for k = 1 (the smallest scale >= the target), 1.5 and 2. Reported: the decoded
size, decode + resize time (best of 3, one core), and the cosine between the [3, S, S] model inputs (model-free:
a trained CLIP's sensitivity is unknown here, and random weights are far less sensitive than real ones).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from photos import write_photos  # noqa: E402

from zsclip.core.transform import PreprocessConfig, load_image, normalize, to_pixels  # noqa: E402

SIZES = [
    (640, 480),
    (1024, 768),
    (1200, 900),
    (1600, 1200),
    (2048, 1536),
    (3024, 4032),
    (4000, 3000),
]
FACTORS = (1.0, 1.5, 2.0)


def _timed(
    path: Path, draft: int | None, config: PreprocessConfig
) -> tuple[float, tuple[int, int], torch.Tensor]:
    best, size, pixels = float("inf"), (0, 0), None
    for _ in range(3):
        start = time.perf_counter()
        image = load_image(path, draft_size=draft)
        pixels = to_pixels(image, config)  # [3, S, S] uint8
        best, size = min(best, time.perf_counter() - start), image.size
    return best * 1e3, size, normalize(pixels, config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--workdir", type=Path, default=Path(tempfile.gettempdir()) / "zsclip-bench-draft"
    )
    parser.add_argument("--size", type=int, default=224, help="model input size S")
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = PreprocessConfig(image_size=args.size)
    header = (
        "| image | kind | exact ms | "
        + " | ".join(f"k={k:g}: decoded, ms, cosine" for k in FACTORS)
        + " |"
    )
    print(header)
    print("|" + "---|" * (3 + len(FACTORS)))
    for width, height in SIZES:
        for kind in ("soft", "sharp"):
            (path,) = write_photos(
                args.workdir, 1, (width, height), prefix=f"{kind}_{width}x{height}", kind=kind
            )
            exact_ms, _, exact = _timed(path, None, config)
            cells = []
            for factor in FACTORS:
                ms, size, drafted = _timed(path, int(factor * args.size), config)
                cosine = torch.nn.functional.cosine_similarity(
                    drafted.flatten().double(), exact.flatten().double(), dim=0
                ).item()
                cells.append(f"{size[0]}x{size[1]}, {ms:.0f}, {cosine:.5f}")
            print(
                f"| {width}x{height} | {kind} | {exact_ms:.0f} | " + " | ".join(cells) + " |",
                flush=True,
            )


if __name__ == "__main__":
    main()
