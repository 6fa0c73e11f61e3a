"""What the check of a pairs file costs before training starts (a script, not a test).

    python benchmarks/bench_pairs_check.py [--workdir DIR] [--repeat 3]

zsclip.train.data.check_images decodes every image completely, in a few threads, so that a truncated file
or a pixel flood is found before step 0. This script times it against the header-only check it replaced
(Image.open, which reads a few hundred bytes) and against the same decode in one thread, on three kinds of
data kept in --workdir (reruns skip the drawing):
  shapes-64     2,000 images of the shapes world (64 px PNG, what `zsclip shapes` writes)
  photo-640     200 JPEGs of 640x480 (benchmarks/photos.py: photo-like content)
  photo-12mp    24 JPEGs of 4000x3000 (phone photos)
Each figure is the best of --repeat runs (the file cache is warm after the first), in ms per image.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))


def make_sets(workdir: Path) -> dict[str, Path]:
    """Pairs files for the three data sets, drawn once."""
    from photos import write_photos

    from zsclip.train import shapes

    sets = {}
    world = workdir / "shapes"
    if not (world / "train.tsv").is_file():
        shapes.generate(world, 2000, seed=0, image_size=64, val_count=10, eval_per_class=1)
    sets["shapes-64"] = world / "train.tsv"
    for name, count, size in (("photo-640", 200, (640, 480)), ("photo-12mp", 24, (4000, 3000))):
        folder = workdir / name
        paths = write_photos(folder, count, size, processes=2)
        pairs = folder / "pairs.tsv"
        pairs.write_text("".join(f"{p.name}\ta photo\n" for p in paths))
        sets[name] = pairs
    return sets


def header_only(pairs: list) -> None:
    """The check zsclip 0.1 made: open the file, read its size from the header."""
    from PIL import Image

    for pair in pairs:
        with Image.open(pair.image) as image:
            assert image.width > 0


def best_of(repeat: int, work) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/zsclip-bench-pairs-check"))
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    from zsclip.train import data

    threads = data._check_threads()
    print(f"decode threads: {threads}")
    print(f"{'set':12} {'images':>6} {'header':>10} {'decode, 1 thread':>17} {'decode':>10}")
    for name, path in make_sets(args.workdir).items():
        pairs, _ = data.read_pairs(path)
        header = best_of(args.repeat, lambda: header_only(pairs))
        full = best_of(args.repeat, lambda: data.check_images(pairs, path))
        data._check_threads = lambda: 1  # the same work without the thread pool
        single = best_of(args.repeat, lambda: data.check_images(pairs, path))
        data._check_threads = lambda: threads
        per = 1000 / len(pairs)
        print(
            f"{name:12} {len(pairs):6d} {header * per:8.3f}ms {single * per:15.3f}ms "
            f"{full * per:8.3f}ms"
        )


if __name__ == "__main__":
    main()
