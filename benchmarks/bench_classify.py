"""zsclip classify vs the usual Hugging Face pipeline, side by side in one run (a script, not a test).

    python benchmarks/bench_classify.py [--workdir DIR] [--only CASE ...]

Set-up (kept in --workdir, so reruns skip it): 24 JPEGs of 4000x3000 and 96 of 640x480 (benchmarks/photos.py:
photo-like content, so decoding costs what it does on real photos), ViT-B/32 with random weights in OpenAI's
layout (same cost as real ones) and the same weights as a Hugging Face folder, 100 labels x 7 templates.

Every case runs in its own process, so its start-up and peak memory (ru_maxrss) are its own:
  hf-*          transformers' CLIPModel + CLIPImageProcessor as its documentation shows: images opened one by one
                in the main loop, processor, get_image_features in batches of 32; the labels' prompts in one call
  zsclip-*      the real CLI (`zsclip classify`, in-process so the start of the image loop can be timed)
  ceiling-*     zsclip's model alone on pre-made tensors: the most any pipeline could reach
  *-passive     transformers with OMP_WAIT_POLICY=PASSIVE, the setting zsclip's CLI makes (see the README)
  text-*        the 700-prompt label classifier: zsclip (computed, then from its cache) and transformers
Throughput counts from the moment the image loop starts (start-up reported apart); wall is launch to exit.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

LABELS = """corgi, tabby cat, golden retriever, horse, cow, sheep, goat, pig, rabbit, hamster, parrot, owl, eagle,
penguin, flamingo, swan, duck, goldfish, shark, dolphin, whale, octopus, crab, turtle, frog, snake, lizard,
butterfly, bee, spider, bicycle, motorcycle, car, bus, fire truck, tractor, train, sailboat, canoe, airplane,
helicopter, hot air balloon, rocket, lighthouse, bridge, castle, skyscraper, barn, tent, windmill, mountain lake,
waterfall, desert, forest, beach, volcano, glacier, canyon, meadow, river, teapot, coffee mug, wine glass,
frying pan, toaster, refrigerator, sofa, armchair, bookshelf, lamp, clock, piano, violin, guitar, drum kit,
jazz album, chess board, football, tennis racket, skateboard, umbrella, backpack, sunglasses, wristwatch, camera,
laptop, telephone, television, robot, teddy bear, pizza, hamburger, strawberry, banana, pineapple, broccoli,
birthday cake, ice cream, sushi, croissant"""
LABELS_100 = [label.strip() for label in LABELS.replace("\n", " ").split(",")]
# The seven-template ensemble from the CLIP authors' ImageNet prompt-engineering notebook.
TEMPLATES_7 = [
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
]
FOLDER_LABELS = (
    LABELS_100[:10],
    LABELS_100[10:20],
)  # first run, then "new labels" for the cached rerun
BATCH = 32


# ------------------------------------------------------------------------------------------- set-up


def setup(work: Path) -> None:
    from photos import write_photos

    write_photos(work / "photos-4000x3000", 24, (4000, 3000), processes=2)
    write_photos(work / "photos-640x480", 96, (640, 480), processes=2)
    (work / "templates7.txt").write_text("\n".join(TEMPLATES_7) + "\n")
    for name, labels in zip(("labels-a.txt", "labels-b.txt"), FOLDER_LABELS):
        (work / name).write_text("\n".join(labels) + "\n")
    (work / "labels100.txt").write_text("\n".join(LABELS_100) + "\n")
    if (
        not (work / "model" / "vitb32-openai.safetensors").is_file()
        or not (work / "hf" / "config.json").is_file()
    ):
        subprocess.run(
            [sys.executable, __file__, "--workdir", str(work), "--case", "make-weights"], check=True
        )


def make_weights(work: Path) -> None:
    import importlib.util

    import torch
    from hf_convert import write_hf_folder

    from zsclip.core.model import build_model
    from zsclip.core.presets import get_preset
    from zsclip.core.safetensors_io import write_safetensors
    from zsclip.core.tokenizer import Tokenizer

    spec = importlib.util.find_spec(
        "open_clip"
    )  # the standard vocabulary ships in the open-clip-torch wheel
    vocab = Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"
    (work / "model").mkdir(parents=True, exist_ok=True)
    shutil.copy(vocab, work / "model" / vocab.name)  # found beside the checkpoint
    torch.manual_seed(0)
    model = build_model(get_preset("ViT-B/32")).eval()
    write_safetensors(work / "model" / "vitb32-openai.safetensors", model.state_dict(), {})
    write_hf_folder(work / "hf", model, Tokenizer.from_openai_bpe(vocab))


# ------------------------------------------------------------------------------------------- cases


def _rss_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
    return 0.0


def _hf_features(output):
    return output if hasattr(output, "shape") else output.pooler_output  # transformers 4 vs 5


def case_hf_folder(work: Path, folder: str, launch: float) -> dict:
    import torch
    import transformers
    from PIL import Image

    model = transformers.CLIPModel.from_pretrained(work / "hf").eval()
    processor = transformers.CLIPImageProcessor.from_pretrained(work / "hf")
    tokenizer = transformers.CLIPTokenizer.from_pretrained(work / "hf")
    prompts = [t.replace("{}", label) for label in FOLDER_LABELS[0] for t in TEMPLATES_7]
    with torch.inference_mode():
        text = _hf_features(
            model.get_text_features(**tokenizer(prompts, padding=True, return_tensors="pt"))
        )
        text = torch.nn.functional.normalize(text, dim=-1).view(
            len(FOLDER_LABELS[0]), len(TEMPLATES_7), -1
        )
        classifier = torch.nn.functional.normalize(text.mean(dim=1), dim=-1).t()  # [D, C]
    paths = sorted((work / folder).glob("*.jpg"))
    ready, forward, rows = time.time(), 0.0, []
    with torch.inference_mode():
        for start in range(0, len(paths), BATCH):
            images = [Image.open(path) for path in paths[start : start + BATCH]]
            inputs = processor(images=images, return_tensors="pt")
            began = time.perf_counter()
            features = _hf_features(model.get_image_features(**inputs))
            forward += time.perf_counter() - began
            features = torch.nn.functional.normalize(features, dim=-1)
            (model.logit_scale.exp() * features @ classifier).softmax(dim=-1)
            rows.append(features)
    done = time.time()
    if os.environ.get("OMP_WAIT_POLICY") is None:
        torch.save(torch.cat(rows), work / f"reference-{folder}.pt")
    return {
        "images": len(paths),
        "startup_s": ready - launch,
        "loop_s": done - ready,
        "images_per_s": len(paths) / (done - ready),
        "forward_only_images_per_s": len(paths) / forward,
    }


def case_zsclip_folder(
    work: Path, folder: str, launch: float, *, labels: str, cache: str, extra: list[str]
) -> dict:
    """The zsclip program itself (zsclip.cli.run, exit included), in-process so the image loop can be timed."""
    import atexit

    import zsclip.jobs.classify
    from zsclip.cli import run

    os.environ["ZSCLIP_CACHE"] = str(work / cache)
    marks: dict[str, float] = {}
    classify_images = zsclip.jobs.classify.classify_images

    def timed(*args, **kwargs):
        marks["ready"] = time.time()
        yield from classify_images(*args, **kwargs)
        marks["done"] = time.time()

    def report() -> None:  # run() calls the exit handlers before it ends the process
        images = len(list((work / folder).glob("*.jpg")))
        loop = marks["done"] - marks["ready"]
        print(
            json.dumps(
                {
                    "images": images,
                    "startup_s": marks["ready"] - launch,
                    "loop_s": loop,
                    "images_per_s": images / loop,
                }
            ),
            flush=True,
        )

    zsclip.jobs.classify.classify_images = timed
    atexit.register(report)
    sys.argv = [
        "zsclip",
        "classify",
        str(work / folder),
        "--model",
        str(work / "model" / "vitb32-openai.safetensors"),
        "--labels-file",
        str(work / labels),
        "--templates",
        str(work / "templates7.txt"),
        "--format",
        "jsonl",
        "--output",
        str(work / f"out-{cache}-{labels}.jsonl"),
        "--batch-size",
        str(BATCH),
        "--quiet",
        *extra,
    ]
    run()  # never returns


def case_ceiling(work: Path, launch: float, precision: str) -> dict:
    import torch

    from zsclip.core.checkpoints import load_model
    from zsclip.core.devices import autocast
    from zsclip.core.transform import PreprocessConfig, normalize

    began = time.time()
    loaded = load_model(work / "model" / "vitb32-openai.safetensors")
    load_s, rss_after_load = time.time() - began, _rss_mb()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    generator = torch.Generator().manual_seed(0)
    batches = [
        normalize(
            torch.randint(0, 256, (BATCH, 3, 224, 224), dtype=torch.uint8, generator=generator),
            PreprocessConfig(),
        )
        for _ in range(2)
    ]
    cpu = torch.device("cpu")
    with torch.inference_mode(), autocast(cpu, dtype):
        loaded.model.encode_image(batches[0][:2])  # first touch of the weights, not counted
        ready = time.time()
        for batch in batches:
            loaded.model.encode_image(batch)
    done = time.time()
    images = BATCH * len(batches)
    return {
        "images": images,
        "startup_s": ready - launch,
        "load_s": load_s,
        "rss_after_load_mb": rss_after_load,
        "loop_s": done - ready,
        "images_per_s": images / (done - ready),
    }


def case_text_zsclip(work: Path, launch: float) -> dict:
    import torch

    from zsclip.core.checkpoints import load_model
    from zsclip.jobs.zeroshot import classifier_for

    os.environ["ZSCLIP_CACHE"] = str(work / "cache-text")
    shutil.rmtree(work / "cache-text", ignore_errors=True)
    loaded = load_model(work / "model" / "vitb32-openai.safetensors")
    templates = str(work / "templates7.txt")
    ready = time.time()
    weights = classifier_for(
        loaded,
        LABELS_100,
        templates,
        device=torch.device("cpu"),
        dtype=torch.float32,
        use_cache=True,
    )
    computed = time.time()
    cached = classifier_for(
        loaded,
        LABELS_100,
        templates,
        device=torch.device("cpu"),
        dtype=torch.float32,
        use_cache=True,
    )
    done = time.time()
    assert torch.equal(weights, cached)
    torch.save(weights, work / "classifier-zsclip.pt")
    prompts = len(LABELS_100) * len(TEMPLATES_7)
    return {
        "prompts": prompts,
        "startup_s": ready - launch,
        "compute_s": computed - ready,
        "prompts_per_s": prompts / (computed - ready),
        "cached_s": done - computed,
    }


def case_text_hf(work: Path, launch: float, recipe: str) -> dict:
    """recipe "batched": all prompts in one call, padded to the longest (the documentation's usage);
    "per-label": the zero-shot notebook's loop, one label's prompts at a time at the full 77-token context."""
    import torch
    import transformers

    model = transformers.CLIPModel.from_pretrained(work / "hf").eval()
    tokenizer = transformers.CLIPTokenizer.from_pretrained(work / "hf")
    # per-label: a 35-prompt sample of the rate
    labels = LABELS_100 if recipe == "batched" else LABELS_100[:5]
    padding = (
        {"padding": True} if recipe == "batched" else {"padding": "max_length", "max_length": 77}
    )

    def classifier_columns(group: list[str]) -> torch.Tensor:
        prompts = [t.replace("{}", label) for label in group for t in TEMPLATES_7]
        text = _hf_features(
            model.get_text_features(**tokenizer(prompts, return_tensors="pt", **padding))
        )
        text = torch.nn.functional.normalize(text, dim=-1).view(len(group), len(TEMPLATES_7), -1)
        return torch.nn.functional.normalize(text.mean(dim=1), dim=-1)  # [C, D]

    with torch.inference_mode():
        if recipe != "batched":
            classifier_columns(
                LABELS_100[-1:]
            )  # warm-up, not counted: the rate is taken from a sample
        ready = time.time()
        groups = [labels] if recipe == "batched" else [[label] for label in labels]
        columns = [classifier_columns(group) for group in groups]
    done = time.time()
    if recipe == "batched" and os.environ.get("OMP_WAIT_POLICY") is None:
        torch.save(torch.cat(columns).t(), work / "classifier-hf.pt")
    prompts = len(labels) * len(TEMPLATES_7)
    return {
        "prompts": prompts,
        "startup_s": ready - launch,
        "compute_s": done - ready,
        "prompts_per_s": prompts / (done - ready),
    }


def case_exact(work: Path, launch: float) -> dict:
    """`zsclip embed --exact-preprocess` on the first 8 12-MP photos, for comparison with transformers."""
    from zsclip.cli import main

    paths = sorted((work / "photos-4000x3000").glob("*.jpg"))[:8]
    sys.argv = [
        "zsclip",
        "embed",
        *map(str, paths),
        "--model",
        str(work / "model" / "vitb32-openai.safetensors"),
        "--exact-preprocess",
        "--no-cache",
        "--output",
        str(work / "exact-12mp.safetensors"),
        "--quiet",
    ]
    try:
        main()
    except SystemExit as exit_:
        if exit_.code not in (0, None):
            raise
    return {"images": len(paths)}


CASES = {  # run in this order; each ceiling runs right before and right after the pipeline it bounds
    "ceiling-fp32": lambda w, t: case_ceiling(w, t, "fp32"),
    "zsclip-640": lambda w, t: case_zsclip_folder(
        w, "photos-640x480", t, labels="labels-a.txt", cache="cache-640", extra=[]
    ),
    "ceiling-fp32-again": lambda w, t: case_ceiling(w, t, "fp32"),
    "zsclip-640-warm": lambda w, t: case_zsclip_folder(
        w, "photos-640x480", t, labels="labels-b.txt", cache="cache-640", extra=[]
    ),
    "hf-640": lambda w, t: case_hf_folder(w, "photos-640x480", t),
    "hf-640-passive": lambda w, t: case_hf_folder(w, "photos-640x480", t),
    "hf-12mp": lambda w, t: case_hf_folder(w, "photos-4000x3000", t),
    "zsclip-12mp": lambda w, t: case_zsclip_folder(
        w, "photos-4000x3000", t, labels="labels-a.txt", cache="cache-12mp", extra=[]
    ),
    "hf-12mp-passive": lambda w, t: case_hf_folder(w, "photos-4000x3000", t),
    "exact-12mp": case_exact,
    "text-zsclip": case_text_zsclip,
    "text-hf-batched": lambda w, t: case_text_hf(w, t, "batched"),
    "text-hf-batched-passive": lambda w, t: case_text_hf(w, t, "batched"),
    "text-hf-per-label": lambda w, t: case_text_hf(w, t, "per-label"),
    "ceiling-bf16": lambda w, t: case_ceiling(w, t, "bf16"),
    "zsclip-640-bf16": lambda w, t: case_zsclip_folder(
        w,
        "photos-640x480",
        t,
        labels="labels-a.txt",
        cache="cache-640-bf16",
        extra=["--precision", "bf16"],
    ),
    "ceiling-bf16-again": lambda w, t: case_ceiling(w, t, "bf16"),
}
# zsclip's CLI sets OMP_WAIT_POLICY=PASSIVE before torch loads (zsclip/cli/_runtime.py); cases that load the
# model without the CLI get it here, and the *-passive baselines show transformers with the same setting.
PASSIVE = {"OMP_WAIT_POLICY": "PASSIVE"}
CASE_ENV = {
    name: PASSIVE for name in CASES if name.startswith("ceiling") or name.endswith("passive")
}
CASE_ENV["text-zsclip"] = PASSIVE
FRESH_CACHES = {
    "zsclip-640": "cache-640",
    "zsclip-12mp": "cache-12mp",
    "zsclip-640-bf16": "cache-640-bf16",
}


# ------------------------------------------------------------------------------------------- driver


def run_case(work: Path, name: str) -> dict:
    """Run one case in a fresh process; add its wall time and peak RSS."""
    if name in FRESH_CACHES:
        shutil.rmtree(work / FRESH_CACHES[name], ignore_errors=True)
    launch = time.time()
    env = {key: value for key, value in os.environ.items() if key != "OMP_WAIT_POLICY"}
    process = subprocess.Popen(
        [
            sys.executable,
            __file__,
            "--workdir",
            str(work),
            "--case",
            name,
            "--launch",
            repr(launch),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**env, **CASE_ENV.get(name, {})},
    )
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.time() - launch
    out, err = process.stdout.read(), process.stderr.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"case {name} failed:\n{err[-3000:]}")
    result = json.loads(out.strip().splitlines()[-1])
    result.update(wall_s=wall, peak_rss_mb=usage.ru_maxrss / 1024)
    return result


WALL_TIME_CASES = {
    "zsclip-640-warm",
    "exact-12mp",
}  # judged by wall time: a cached rerun, a correctness run


def median_run(name: str, runs: list[dict]) -> dict:
    """The run with the median figure (throughput, or wall time for WALL_TIME_CASES), with the spread noted."""
    key = (
        "wall_s"
        if name in WALL_TIME_CASES
        else next(k for k in ("images_per_s", "prompts_per_s") if k in runs[0])
    )
    ordered = sorted(runs, key=lambda run: run[key])
    chosen = dict(ordered[len(ordered) // 2])
    chosen.update(runs=len(runs), spread=f"{ordered[0][key]:.2f}-{ordered[-1][key]:.2f} {key}")
    return chosen


def help_timing(runs: int = 10) -> dict:
    times = []
    for _ in range(runs):
        began = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "zsclip", "--help"], stdout=subprocess.DEVNULL, check=True
        )
        times.append(time.perf_counter() - began)
    times.sort()
    return {"min_s": times[0], "median_s": times[len(times) // 2], "runs": runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/zsclip-bench"))
    parser.add_argument("--only", nargs="*", choices=sorted(CASES), help="run only these cases")
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="run every case N times, interleaved, and report the median run (a shared machine's "
        "neighbours move single runs by 10-30%%)",
    )
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--launch", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    work = args.workdir.resolve()
    if args.case == "make-weights":
        return make_weights(work)
    if args.case:
        print(json.dumps(CASES[args.case](work, args.launch)))
        return
    from bench_report import compare, render

    setup(work)
    results = {"load_before": os.getloadavg(), "help": help_timing()}
    runs: dict[str, list[dict]] = {}
    for _ in range(args.repeat):
        for name in args.only or CASES:
            runs.setdefault(name, []).append(run_case(work, name))
            print(f"{name}: {json.dumps(runs[name][-1])}", file=sys.stderr, flush=True)
    results.update({name: median_run(name, case_runs) for name, case_runs in runs.items()})
    results["load_after"] = os.getloadavg()
    results["accuracy"] = compare(work)
    (work / "results.json").write_text(json.dumps(results, indent=2))
    print(render(results))


if __name__ == "__main__":
    main()
