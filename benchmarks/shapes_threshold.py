"""Choose the built-in model's multi-label threshold from freshly drawn eval folders, and (with
--write) record it in weights/zsclip-shapes.safetensors without touching a tensor byte.

    python benchmarks/shapes_threshold.py --work /tmp/threshold            # measure, print, choose
    python benchmarks/shapes_threshold.py --work /tmp/threshold --write    # ... and store the choice

What it does:
1. Draws two shapes worlds with seeds the model was not trained on (`zsclip shapes DIR --count 100
   --seed S`; only their seen/ and heldout/ eval folders are used): the first to choose on, the
   second to confirm the choice on images it was not chosen from.
2. Scores every image against all 100 labels as `zsclip classify --multi-label` does (same prompt set,
   same preprocessing), keeping the cosines.
3. For each threshold t from 0 to 1 in steps of 0.01, a label "passes" for an image when its cosine
   reaches t (its multi-label score is then at least 0.5). Each image shows exactly one label (its
   folder), so over all image-label pairs: precision = right passes / passes, recall = images whose
   label passes / images, F1 their harmonic mean; and the mean number of labels passing per image.
4. Chooses the t with the highest mean of the seen and held-out F1 (held-out combinations count as
   much as seen ones although there are 4x fewer), on the first seed.

--write stores `multi_label_threshold` (the choice), `caption_words` (every word the training
captions can hold, zsclip.train.shapes.caption_words) and `description` in the checkpoint's header
metadata. The tensor bytes are copied unchanged; the script checks that every tensor is
byte-identical before and after, and writes the file atomically. Figures: weights/README.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import struct
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHECKPOINT = REPO / "weights" / "zsclip-shapes.safetensors"
DESCRIPTION = "demo: coloured shapes only"
STEPS = [round(i / 100, 2) for i in range(101)]


def draw_world(folder: Path, seed: int) -> None:
    if not (folder / "labels.txt").is_file():
        command = ["shapes", str(folder), "--count", "100", "--seed", str(seed), "--quiet"]
        subprocess.run([sys.executable, "-m", "zsclip", *command], check=True)


def cosines(loaded, folder: Path, labels: list[str]):
    """([N, C] image-label cosines, [N] index of each image's own label) for one eval folder."""
    import torch

    from zsclip.jobs.inputs import expand_inputs
    from zsclip.jobs.pipeline import DecodeOptions, ImageEncoder
    from zsclip.jobs.zeroshot import classifier_for

    device, dtype = torch.device("cpu"), torch.float32
    classifier = classifier_for(loaded, labels, None, device=device, dtype=dtype, use_cache=False)
    items = expand_inputs([str(folder)], None)
    decode = DecodeOptions.for_model(loaded.preprocess.image_size, exact=False)
    encoder = ImageEncoder(loaded.model, loaded.preprocess, device, dtype, decode=decode)
    rows, truth = [], []
    with torch.no_grad():
        for batch, features in encoder.batches(items):
            rows.append(features.float() @ classifier.float())  # [n, C]
            truth += [labels.index(Path(entry.path).parent.name) for entry in batch]
    return torch.cat(rows), torch.tensor(truth)


def sweep(cos, truth) -> list[dict]:
    """Per threshold: labels passing per image, precision, recall and F1 of "label present"."""
    own = cos[range(len(truth)), truth]  # [N] each image's cosine with its own label
    results = []
    for t in STEPS:
        passes = (cos >= t).sum().item()
        right = (own >= t).sum().item()
        precision = right / passes if passes else 1.0
        recall = right / len(truth)
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_image = passes / len(truth)
        results.append({"t": t, "per_image": per_image, "p": precision, "r": recall, "f1": f1})
    return results


def measure(loaded, world: Path) -> dict[str, list[dict]]:
    labels = (world / "labels.txt").read_text(encoding="utf-8").split("\n")[:-1]
    return {part: sweep(*cosines(loaded, world / part, labels)) for part in ("seen", "heldout")}


def choose(figures: dict[str, list[dict]]) -> float:
    scores = [(s["f1"] + h["f1"]) / 2 for s, h in zip(figures["seen"], figures["heldout"])]
    return STEPS[max(range(len(STEPS)), key=scores.__getitem__)]


def print_table(title: str, figures: dict[str, list[dict]], marks: tuple[float, ...]) -> None:
    print(f"\n{title}\n")
    print("| t | seen: labels/image | P | R | F1 | held-out: labels/image | P | R | F1 |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for s, h in zip(figures["seen"], figures["heldout"]):
        if round(s["t"] * 100) % 5 and s["t"] not in marks:
            continue
        cells = [f"{s['t']:.2f}" + (" *" if s["t"] in marks else "")]
        for row in (s, h):
            cells += [
                f"{row['per_image']:.2f}",
                f"{row['p']:.3f}",
                f"{row['r']:.3f}",
                f"{row['f1']:.3f}",
            ]
        print("| " + " | ".join(cells) + " |")


def _read_header(path: Path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + length]), data[8 + length :]


def write_metadata(path: Path, updates: dict[str, str]) -> None:
    """Rewrite `path`'s header metadata with `updates`, keeping every tensor byte; checked after."""
    import torch
    from safetensors import safe_open

    from zsclip.atomic import atomic_write_bytes

    header, body = _read_header(path)
    before = {}
    with safe_open(path, framework="pt") as handle:
        for name in handle.keys():
            before[name] = handle.get_tensor(name).clone()
    header["__metadata__"] = {**header["__metadata__"], **updates}
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)  # the format pads the header to a multiple of 8 bytes
    atomic_write_bytes(path, struct.pack("<Q", len(text)) + text + body)
    new_header, new_body = _read_header(path)
    assert hashlib.sha256(new_body).digest() == hashlib.sha256(body).digest()
    assert {k: v for k, v in new_header.items() if k != "__metadata__"} == {
        k: v for k, v in header.items() if k != "__metadata__"
    }
    with safe_open(path, framework="pt") as handle:
        assert set(handle.keys()) == set(before)
        for name in handle.keys():
            tensor = handle.get_tensor(name)
            assert tensor.dtype == before[name].dtype and tensor.shape == before[name].shape
            assert tensor.view(-1).view(torch.uint8).equal(before[name].view(-1).view(torch.uint8))
    print(f"\nwrote {sorted(updates)} into {path}; all {len(before)} tensors byte-identical")
    print(f"sha256 {hashlib.sha256(path.read_bytes()).hexdigest()}, {path.stat().st_size} bytes")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="folder for the drawn worlds")
    parser.add_argument("--seeds", type=int, nargs=2, default=(1, 2), help="choose on, confirm on")
    parser.add_argument("--model", type=Path, default=CHECKPOINT)
    parser.add_argument("--write", action="store_true", help="store the choice in --model")
    args = parser.parse_args()

    from zsclip.core.checkpoints import load_path
    from zsclip.train.shapes import caption_words

    loaded = load_path(args.model)
    tune, confirm = (args.work / f"seed{seed}" for seed in args.seeds)
    draw_world(tune, args.seeds[0])
    draw_world(confirm, args.seeds[1])
    tuned = measure(loaded, tune)
    chosen = choose(tuned)
    marks = (0.25, chosen)
    print_table(
        f"seed {args.seeds[0]} (choosing): * = 0.25 (generic default) and {chosen}", tuned, marks
    )
    print_table(f"seed {args.seeds[1]} (confirming)", measure(loaded, confirm), marks)
    print(f"\nchosen multi_label_threshold: {chosen}")
    if args.write:
        updates = {
            "multi_label_threshold": f"{chosen}",
            "caption_words": " ".join(caption_words()),
            "description": DESCRIPTION,
        }
        write_metadata(args.model, updates)


if __name__ == "__main__":
    main()
