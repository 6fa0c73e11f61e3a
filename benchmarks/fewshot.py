"""Few-shot top-1 against zero-shot, the CLIP paper's Figure 6 in miniature (a script, not a test).

    python benchmarks/fewshot.py [--draws 3] [--only shapes fashion novel] [--threads N]

For the built-in model (zsclip-shapes), top-1 on fixed test images for zero-shot and for 1, 2, 4, 8 and
16 examples per label, fitted with zsclip's own code (zsclip.jobs.fewshot, the code `--examples` runs):
  probe     the linear probe alone: L2-regularised logistic regression, lambda by cross-validation
  combined  what `--examples` uses (method auto: the probe pulled toward the zero-shot weights, or a
            logit blend of probe and zero-shot, whichever cross-validates better)
  prior, blend   the two heads auto chooses between, for reference
Each figure is the mean (and standard deviation) over `--draws` random draws of the examples; within
a draw the example sets are nested (the 2 include the 1). The data sets:
  shapes    the built-in model's own world: 100 colour-shape labels (80 seen in training, 20 held out),
            drawn in-process with zsclip.train.shapes; 16 example candidates and 20 test images a label
  fashion   Fashion-MNIST, a data set zsclip did not make, read at run time from Debian's
            dataset-fashion-mnist package (/usr/share/datasets/fashion-mnist; `apt-get install
            dataset-fashion-mnist`), never copied: 10 labels, 40 candidates a label from the train
            file, 200 test images a label from the t10k file; the 28 px grey images are inverted to
            dark-on-light like the shapes world
  novel     the 100 shapes labels plus "dax", a grey heart: a colour the model never saw, a word it
            does not know; examples for every label, top-1 reported for dax and for the others
The figures go to docs/fewshot.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_LABELS = [
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
]
SHOTS = (1, 2, 4, 8, 16)
METHODS = ("probe", "auto", "prior", "blend")
COLUMN = {"probe": "probe alone", "auto": "combined (auto)", "prior": "prior", "blend": "blend"}


@dataclass
class Split:
    """Embedded images of one data set: candidates to draw examples from, and fixed test images."""

    name: str
    labels: list[str]
    text: torch.Tensor  # [D, C] the zero-shot classifier
    pool_x: torch.Tensor  # [P, D] unit embeddings
    pool_y: torch.Tensor  # [P]
    test_x: torch.Tensor  # [T, D]
    test_y: torch.Tensor  # [T]


class Model:
    """The built-in model as classify uses it: its preprocessing, unit image embeddings, and the
    prompt-ensembled zero-shot classifier from zsclip's own code."""

    def __init__(self) -> None:
        from zsclip.api import load_full
        from zsclip.core.transform import Preprocess
        from zsclip.jobs.scores import logit_scale_of

        self.loaded = load_full(None, device="cpu")
        self.preprocess = Preprocess(self.loaded.preprocess)
        self.scale = logit_scale_of(self.loaded.model)

    @torch.inference_mode()
    def images(self, images: list, batch: int = 256) -> torch.Tensor:
        out = []
        for start in range(0, len(images), batch):
            pixels = torch.stack([self.preprocess(im) for im in images[start : start + batch]])
            out.append(F.normalize(self.loaded.model.encode_image(pixels).float(), dim=-1))
        return torch.cat(out)  # [N, D]

    def classifier(self, labels: list[str]) -> torch.Tensor:
        from zsclip.jobs.zeroshot import classifier_for

        return classifier_for(
            self.loaded,
            labels,
            None,
            device=torch.device("cpu"),
            dtype=torch.float32,
            use_cache=False,
        ).float()  # [D, C]


# -------------------------------------------------------------------------------------------- data


def dax(rng: random.Random):
    """A grey heart: a colour the built-in model never saw (its colours are saturated, or black)."""
    from zsclip.train import shapes

    scene = shapes.sample_scene(rng, "black", "heart")
    grey = tuple([128 + rng.randint(-12, 12)] * 3)
    return shapes.render(dataclasses.replace(scene, tint=grey), rng)


def shapes_split(model: Model, novel: bool, pool: int = 16, test: int = 20) -> Split:
    from zsclip.train import shapes

    labels = [shapes.label(c, s) for c, s in shapes.all_combinations()]
    rng = random.Random("benchmarks/fewshot")
    drawn: list[list] = []
    for colour, shape in shapes.all_combinations():
        drawn.append([shapes.draw_example(rng, colour, shape)[0] for _ in range(pool + test)])
    if novel:
        labels.append("dax")
        drawn.append([dax(rng) for _ in range(pool + test)])
    return _split("novel" if novel else "shapes", labels, drawn, pool, model)


def _split(name: str, labels: list[str], drawn: list[list], pool: int, model: Model) -> Split:
    x = model.images([im for per_label in drawn for im in per_label])  # [C * (pool + test), D]
    n = len(drawn[0])
    y = torch.arange(len(labels)).repeat_interleave(n)
    in_pool = (torch.arange(len(y)) % n) < pool
    return Split(
        name, labels, model.classifier(labels), x[in_pool], y[in_pool], x[~in_pool], y[~in_pool]
    )


def read_idx(path: Path) -> torch.Tensor:
    """An MNIST idx file (gzip) -> uint8 tensor [n, 28, 28] or [n]; its header's sizes are checked
    against the data actually there."""
    data = gzip.decompress(path.read_bytes())
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims)]
    body = data[4 + 4 * dims :]
    if len(body) != int(torch.tensor(shape).prod()):
        raise SystemExit(f"{path}: damaged idx file")
    return torch.frombuffer(bytearray(body), dtype=torch.uint8).view(shape)


def fashion_split(model: Model, pool: int = 40, test: int = 200) -> Split | None:
    from PIL import Image

    if not (FASHION_DIR / "t10k-images-idx3-ubyte.gz").is_file():
        print(f"fashion: skipped, {FASHION_DIR} not found (apt-get install dataset-fashion-mnist)")
        return None
    gen = torch.Generator().manual_seed(0)
    drawn: list[list] = [[] for _ in FASHION_LABELS]
    for part, count in (("train", pool), ("t10k", test)):
        images = read_idx(FASHION_DIR / f"{part}-images-idx3-ubyte.gz")
        targets = read_idx(FASHION_DIR / f"{part}-labels-idx1-ubyte.gz")
        for c in range(len(FASHION_LABELS)):
            members = torch.nonzero(targets == c).flatten()
            chosen = members[torch.randperm(len(members), generator=gen)[:count]]
            drawn[c] += [
                Image.fromarray((255 - images[i]).numpy(), "L").convert("RGB")
                for i in chosen.tolist()
            ]
    return _split("fashion", FASHION_LABELS, drawn, pool, model)


# ------------------------------------------------------------------------------------- the curve


def draw_examples(split: Split, shots: int, draw: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `shots` of a per-draw shuffle of each label's candidates (nested across shots)."""
    gen = torch.Generator().manual_seed(1000 + draw)
    rows = []
    for c in range(len(split.labels)):
        members = torch.nonzero(split.pool_y == c).flatten()
        rows.append(members[torch.randperm(len(members), generator=gen)[:shots]])
    index = torch.cat(rows)
    return split.pool_x[index], split.pool_y[index]


def top1(
    weight: torch.Tensor,
    bias: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    group: torch.Tensor | None = None,
) -> float:
    hit = (x @ weight + bias).argmax(1) == y
    return 100 * float(hit[group].float().mean() if group is not None else hit.float().mean())


def macro_f1(cos: torch.Tensor, thresholds: torch.Tensor, y: torch.Tensor) -> float:
    """Mean over labels of the F1 of "cosine at or above the label's threshold" on images [N, C]."""
    predicted = cos >= thresholds  # [N, C]
    truth = torch.nn.functional.one_hot(y, cos.shape[1]).bool()  # [N, C]
    tp = (predicted & truth).sum(0).double()
    f1 = 2 * tp / (predicted.sum(0) + truth.sum(0)).clamp(min=1)  # [C]
    return 100 * float(f1.mean())


def multi_label(
    split: Split, heads: dict, x: torch.Tensor, y: torch.Tensor, default: float
) -> dict:
    """Test macro-F1 of multi-label mode: zero-shot at the model's threshold, and the combined head
    at that threshold, with per-label thresholds as classify --multi-label --examples chooses them,
    and with every label's own best cut on the examples."""
    from zsclip.jobs.fewshot import choose_thresholds

    head = heads["auto"]
    columns = F.normalize(head.weight, dim=0)  # [D, C]
    thresholds, _ = choose_thresholds(x @ columns, y, default)  # [C], NaN: the model's
    thresholds = torch.where(thresholds.isnan(), torch.tensor(default), thresholds)
    own, _ = choose_thresholds(x @ columns, y)  # without the rule that keeps the model's threshold
    own = torch.where(own.isnan(), torch.tensor(default), own)
    return {
        "zero-shot, model's threshold": macro_f1(
            split.test_x @ split.text, torch.tensor(default), split.test_y
        ),
        "head, model's threshold": macro_f1(
            split.test_x @ columns, torch.tensor(default), split.test_y
        ),
        "head, per-label thresholds": macro_f1(split.test_x @ columns, thresholds, split.test_y),
        "head, every label its own cut": macro_f1(split.test_x @ columns, own, split.test_y),
    }


def curve(split: Split, model: Model, draws: int, groups: dict[str, torch.Tensor]) -> dict:
    """{group: {shots: {method: [top-1 per draw]}}}, multi-label macro-F1 per shots, and the auto
    choices per shots."""
    from zsclip.jobs.fewshot import fit_heads
    from zsclip.jobs.scores import model_threshold

    default = model_threshold(model.loaded.metadata)
    f1: dict = {}
    results: dict = {
        g: {0: {"zero-shot": [top1(model.scale * split.text, 0, split.test_x, split.test_y, m)]}}
        for g, m in groups.items()
    }
    chosen: dict[int, list[str]] = {}
    seconds: dict[
        int, list[float]
    ] = {}  # CPU per fit_heads call (auto's cost: its CV covers the rest)
    for shots in SHOTS:
        for draw in range(draws):
            x, y = draw_examples(split, shots, draw)
            started = time.process_time()
            heads = fit_heads(x, y, split.text, model.scale, METHODS)
            seconds.setdefault(shots, []).append(time.process_time() - started)
            chosen.setdefault(shots, []).append(heads["auto"].method)
            for key, value in multi_label(split, heads, x, y, default).items():
                f1.setdefault(shots, {}).setdefault(key, []).append(value)
            for g, mask in groups.items():
                for method, head in heads.items():
                    score = top1(head.weight, head.bias, split.test_x, split.test_y, mask)
                    results[g].setdefault(shots, {}).setdefault(method, []).append(score)
    return {
        "results": results,
        "chosen": chosen,
        "f1": f1,
        "threshold": default,
        "seconds": seconds,
    }


def table(title: str, results: dict) -> None:
    print(f"\n### {title}\n")
    print("| examples/label | " + " | ".join(COLUMN[m] for m in METHODS) + " |")
    print("|---|" + "---|" * len(METHODS))
    print(f"| 0 (zero-shot) | {results[0]['zero-shot'][0]:.1f} |" + " |" * (len(METHODS) - 1))
    for shots in SHOTS:
        cells = []
        for method in METHODS:
            values = results[shots][method]
            spread = statistics.pstdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.1f} ± {spread:.1f}")
        print(f"| {shots} | " + " | ".join(cells) + " |")


def run(split: Split, model: Model, draws: int) -> None:
    started = time.process_time()
    groups = {"all": torch.ones_like(split.test_y, dtype=torch.bool)}
    if split.name == "novel":
        dax_index = split.labels.index("dax")
        groups = {
            "dax": split.test_y == dax_index,
            "the other 100 labels": split.test_y != dax_index,
        }
    out = curve(split, model, draws, groups)
    for group, results in out["results"].items():
        suffix = f", test images of {group}" if split.name == "novel" else ""
        title = (
            f"{split.name}: top-1 (%), {len(split.labels)} labels, {len(split.test_y)} test images"
        )
        table(title + suffix, results)
    print(
        f"\n{split.name}, multi-label: test macro-F1 (%), mean over draws; the model's threshold "
        f"is {out['threshold']:g}\n"
    )
    columns = list(out["f1"][SHOTS[0]])
    print("| examples/label | " + " | ".join(columns) + " |")
    print("|---|" + "---|" * len(columns))
    for shots in SHOTS:
        values = [statistics.mean(out["f1"][shots][c]) for c in columns]
        print(f"| {shots} | " + " | ".join(f"{v:.1f}" for v in values) + " |")
    picks = "; ".join(f"{s}: {'/'.join(out['chosen'][s])}" for s in SHOTS)
    print(f"\nauto chose, per draw: {picks}")
    cost = ", ".join(f"{s}: {statistics.mean(out['seconds'][s]):.1f}" for s in SHOTS)
    print(f"CPU seconds per fit (all four heads), by examples per label: {cost}")
    print(f"{split.name}: {time.process_time() - started:.0f} s of CPU for the fits")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--draws", type=int, default=3)
    parser.add_argument(
        "--only",
        nargs="*",
        default=["shapes", "fashion", "novel"],
        choices=["shapes", "fashion", "novel"],
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    began, cpu = time.time(), time.process_time()
    model = Model()
    print(f"built-in model {model.loaded.name}, logit scale {model.scale:.2f}, {args.draws} draws")
    for name in args.only:
        if name == "fashion":
            split = fashion_split(model)
        else:
            split = shapes_split(model, novel=name == "novel")
        if split is not None:
            run(split, model, args.draws)
    print(
        f"\ntotal {time.time() - began:.0f} s wall, {time.process_time() - cpu:.0f} s CPU, "
        f"{args.threads} thread(s), torch {torch.__version__}, Python {sys.version.split()[0]}"
    )


if __name__ == "__main__":
    main()
