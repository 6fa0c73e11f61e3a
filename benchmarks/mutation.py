"""A small mutation check: plant one-line bugs in the scoring, ensembling, caching, loss and
tokenizer code, run the tests on each, and list the mutants the tests let through.

    python benchmarks/mutation.py                  # every mutant, each against its relevant tests
    python benchmarks/mutation.py --full           # each against the default test command instead
    python benchmarks/mutation.py -k cache -k loss # only mutants whose name contains a word
    python benchmarks/mutation.py --list           # the mutants, without running anything

Each mutant is applied to a scratch copy of the checkout (zsclip/, tests/, prompts/, weights/,
examples/), never to the checkout itself, and that copy comes first on PYTHONPATH, so the test
subprocesses (`python -m zsclip`, torchrun) import the mutated code too. A mutant is killed when the
tests fail; it survives when they pass. The mutants must apply exactly (each `old` text occurs once
in its file): when the code moves, the script says which mutant no longer applies.

Not part of CI: the run takes tens of minutes on 2 cores. docs/testing.md lists the survivors and
why each one stays.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COPIED = ("zsclip", "tests", "prompts", "weights", "examples", "pyproject.toml", "README.md")

SCORES = ["tests/test_cli_scores.py", "tests/test_cli_classify.py", "tests/test_cli_embed.py"]
CACHE = ["tests/test_jobs_cache.py", "tests/test_cli_scores.py"]
LOSS = ["tests/test_train_loss.py", "tests/test_train_accumulate.py"]
TOKENIZER = ["tests/test_core_tokenizer.py", "tests/test_cli_scores.py"]
EVAL = ["tests/test_cli_eval.py"]


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str  # file, relative to the checkout
    old: str  # text that occurs exactly once in the file
    new: str
    tests: tuple[str, ...]  # the relevant subset (ignored with --full)


def m(name: str, path: str, old: str, new: str, tests: list[str]) -> Mutant:
    return Mutant(name, path, old, new, tuple(tests))


CLASSIFY = "zsclip/jobs/classify.py"
ZEROSHOT = "zsclip/jobs/zeroshot.py"
CACHE_PY = "zsclip/jobs/cache.py"
LOSS_PY = "zsclip/train/loss.py"
TOKENIZER_PY = "zsclip/core/tokenizer.py"
MODEL_PY = "zsclip/core/model.py"
EVALUATE = "zsclip/jobs/evaluate.py"

MUTANTS = [
    # --- scoring
    m(
        "scoring: no logit scale in the softmax",
        CLASSIFY,
        "torch.softmax(scale * cosine, dim=-1)",
        "torch.softmax(cosine, dim=-1)",
        SCORES,
    ),
    m(
        "scoring: softmax over the images instead of the labels",
        CLASSIFY,
        "torch.softmax(scale * cosine, dim=-1)",
        "torch.softmax(scale * cosine, dim=0)",
        SCORES,
    ),
    m(
        "scoring: no logit scale in the multi-label sigmoid",
        CLASSIFY,
        "torch.sigmoid(scale * (cosine - options.threshold))",
        "torch.sigmoid(cosine - options.threshold)",
        SCORES,
    ),
    m(
        "scoring: multi-label threshold ignored",
        CLASSIFY,
        "torch.sigmoid(scale * (cosine - options.threshold))",
        "torch.sigmoid(scale * cosine)",
        SCORES,
    ),
    m(
        "scoring: multi-label keeps labels below 0.5",
        CLASSIFY,
        "if value >= 0.5]",
        "if value >= 0.25]",
        SCORES,
    ),
    m(
        "scoring: temperature not capped at 100",
        CLASSIFY,
        "model.logit_scale.detach().exp().clamp(max=100.0)",
        "model.logit_scale.detach().exp()",
        SCORES,
    ),
    m(
        "scoring: log-temperature used as the scale",
        CLASSIFY,
        "model.logit_scale.detach().exp().clamp(max=100.0)",
        "model.logit_scale.detach().clamp(max=100.0)",
        SCORES,
    ),
    m(
        "scoring: top-k drops the last label",
        CLASSIFY,
        "k = min(options.top_k, len(labels))",
        "k = min(options.top_k, len(labels) - 1) or 1",
        SCORES,
    ),
    # --- prompt ensembling
    m(
        "ensembling: mean of prompts not renormalised",
        ZEROSHOT,
        "return F.normalize(per_label, dim=-1).t().contiguous()",
        "return per_label.t().contiguous()",
        SCORES,
    ),
    m(
        "ensembling: prompts grouped by template instead of by label",
        ZEROSHOT,
        "return [prompt for label in labels for prompt in templates.prompts(label)]",
        "return [t.replace('{}', label) for t in templates.templates for label in labels]",
        SCORES,
    ),
    m(
        "ensembling: prompt embeddings not normalised before the mean",
        ZEROSHOT,
        "features[start : start + len(part)] = F.normalize(encoded.float(), dim=-1).cpu()",
        "features[start : start + len(part)] = encoded.float().cpu()",
        SCORES,
    ),
    m(
        "ensembling: only the first template used",
        ZEROSHOT,
        "per_label = features.view(len(labels), count, -1).mean(",
        "per_label = features.view(len(labels), count, -1)[:, :1].mean(",
        SCORES,
    ),
    m(
        "ensembling: sum instead of mean (equivalent after renormalising)",
        ZEROSHOT,
        "per_label = features.view(len(labels), count, -1).mean(",
        "per_label = features.view(len(labels), count, -1).sum(",
        SCORES,
    ),
    # --- caches
    m(
        "cache: classifier key blind to label order",
        CACHE_PY,
        '"labels": list(labels),',
        '"labels": sorted(labels),',
        CACHE,
    ),
    m(
        "cache: classifier key blind to templates",
        CACHE_PY,
        '"templates": list(templates),',
        '"templates": len(templates),',
        CACHE,
    ),
    m(
        "cache: classifier key blind to precision",
        CACHE_PY,
        '"precision": precision,\n            "context"',
        '"precision": "fp32",\n            "context"',
        CACHE,
    ),
    m(
        "cache: classifier key blind to the tokenizer",
        CACHE_PY,
        '"tokenizer": _digest(tokenizer_meta),',
        '"tokenizer": None,',
        CACHE,
    ),
    m(
        "cache: classifier key blind to the model",
        CACHE_PY,
        '"model": model_id,\n            "tokenizer"',
        '"model": None,\n            "tokenizer"',
        CACHE,
    ),
    m(
        "cache: model identity blind to the modification time",
        CACHE_PY,
        "stats = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files]",
        "stats = [(str(p), p.stat().st_size, 0) for p in files]",
        CACHE,
    ),
    m(
        "cache: image entry reused after the file changed",
        CACHE_PY,
        "if current.size == size and current.mtime_ns == mtime_ns:",
        "if current.size == size:",
        CACHE,
    ),
    m(
        "cache: image variant blind to precision",
        CACHE_PY,
        '"precision": precision,\n            "byteorder"',
        '"precision": "fp32",\n            "byteorder"',
        CACHE,
    ),
    m(
        "cache: cached classifier of another shape accepted",
        CACHE_PY,
        "return weights.clone() if tuple(weights.shape) == expected_shape else None",
        "return weights.clone()",
        CACHE,
    ),
    # --- loss
    m(
        "loss: no symmetric half (image->text only)",
        LOSS_PY,
        "F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)",
        "F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_image, labels)",
        LOSS,
    ),
    m(
        "loss: temperature not capped at 100",
        LOSS_PY,
        "return logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)",
        "return logit_scale.exp()",
        LOSS,
    ),
    m(
        "loss: log-temperature clamped at 100 instead of ln 100",
        LOSS_PY,
        "logit_scale.clamp_(0.0, math.log(MAX_LOGIT_SCALE))",
        "logit_scale.clamp_(0.0, MAX_LOGIT_SCALE)",
        LOSS,
    ),
    m(
        "loss: features not normalised",
        LOSS_PY,
        "image_features = F.normalize(image_features, dim=-1)",
        "image_features = image_features",
        LOSS,
    ),
    m(
        "loss: rank offset ignored in the labels",
        LOSS_PY,
        "return torch.arange(offset, offset + n, device=device)",
        "return torch.arange(n, device=device)",
        LOSS,
    ),
    # --- tokenizer and text tower
    m(
        "tokenizer: no lower-casing",
        TOKENIZER_PY,
        'return " ".join(text.split()).lower()',
        'return " ".join(text.split())',
        TOKENIZER,
    ),
    m(
        "tokenizer: whitespace not collapsed",
        TOKENIZER_PY,
        'return " ".join(text.split()).lower()',
        "return text.strip().lower()",
        TOKENIZER,
    ),
    m(
        "tokenizer: html entities not unescaped",
        TOKENIZER_PY,
        "text = html.unescape(html.unescape(ftfy.fix_text(text)))",
        "text = ftfy.fix_text(text)",
        TOKENIZER,
    ),
    m(
        "tokenizer: truncation drops the end token",
        TOKENIZER_PY,
        "ids = ids[: length - 1] + [self.eot_token_id]",
        "ids = ids[:length]",
        TOKENIZER,
    ),
    m(
        "model: text feature read at the last position, not the end token",
        MODEL_PY,
        "return x[torch.arange(x.shape[0], device=x.device), end] @ self.text_projection",
        "return x[:, -1] @ self.text_projection",
        TOKENIZER,
    ),
    m(
        "model: forward temperature not capped at 100",
        MODEL_PY,
        "scale = self.logit_scale.exp().clamp(\n            max=100.0\n        )",
        "scale = self.logit_scale.exp()",
        ["tests/test_core_model.py", "tests/test_api.py"],
    ),
    # --- evaluation
    m(
        "eval: ties counted against the right answer",
        EVALUATE,
        "rank_i2t = (sims > correct[:, None]).sum(dim=1)",
        "rank_i2t = (sims >= correct[:, None]).sum(dim=1) - 1",
        EVAL,
    ),
    m(
        "eval: top-5 counts any of the first 4",
        EVALUATE,
        "k = min(5, n_labels)",
        "k = min(4, n_labels)",
        EVAL,
    ),
]


def scratch_copy(destination: Path) -> None:
    for name in COPIED:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(
                source, destination / name, ignore=shutil.ignore_patterns("__pycache__")
            )
        else:
            shutil.copy2(source, destination / name)


def apply(mutant: Mutant, root: Path) -> str:
    """Plant the mutant in the copy at `root`; returns the original text, to restore."""
    path = root / mutant.path
    text = path.read_text()
    count = text.count(mutant.old)
    if count != 1:
        raise SystemExit(f"mutant {mutant.name!r}: {mutant.path} holds its text {count} times")
    path.write_text(text.replace(mutant.old, mutant.new))
    return text


def run_tests(
    root: Path, tests: list[str], timeout: float, extra: list[str]
) -> tuple[bool, float, str]:
    """(passed, seconds, what decided it) for pytest over `tests` in the copy: the first failing
    test when one failed, else pytest's closing line."""
    env = {**os.environ, "PYTHONPATH": str(root), "PYTHONDONTWRITEBYTECODE": "1"}
    command = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *extra, *tests]
    started = time.monotonic()
    try:
        done = subprocess.run(
            command, cwd=root, env=env, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return False, time.monotonic() - started, "timed out (counted as killed)"
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    failed = [line.split(" - ")[0] for line in lines if line.startswith(("FAILED", "ERROR"))]
    summary = failed[0] if failed else (lines[-1] if lines else "")
    return done.returncode == 0, time.monotonic() - started, summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="run the default test command")
    parser.add_argument("-k", action="append", default=[], help="only mutants whose name has this")
    parser.add_argument("--list", action="store_true", help="list the mutants and stop")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per test run")
    parser.add_argument(
        "--no-baseline", action="store_true", help="skip the run of the unmutated code"
    )
    parser.add_argument(
        "--deselect", action="append", default=[], help="a test id to leave out (pytest's option)"
    )
    args = parser.parse_args()
    chosen = [x for x in MUTANTS if not args.k or any(k in x.name for k in args.k)]
    if args.list:
        for mutant in chosen:
            print(f"{mutant.name}  ({mutant.path})")
        return
    with tempfile.TemporaryDirectory(prefix="zsclip-mutants-") as scratch:
        root = Path(scratch)
        scratch_copy(root)
        for mutant in chosen:  # check that every mutant applies before running anything
            (root / mutant.path).write_text(apply(mutant, root))
        extra = [f"--deselect={test}" for test in args.deselect]
        if not args.no_baseline:
            baseline = sorted({t for x in chosen for t in x.tests})
            passed, seconds, last = run_tests(
                root, [] if args.full else baseline, args.timeout, extra
            )
            print(
                f"baseline ({'default command' if args.full else 'relevant tests'}): {last} "
                f"({seconds:.0f} s)",
                flush=True,
            )
            if not passed:
                raise SystemExit("the unmutated code fails its tests: fix that first")
        survivors = []
        print(f"{'result':<9} {'s':>5}  mutant")
        for mutant in chosen:
            original = apply(mutant, root)
            try:
                passed, seconds, last = run_tests(
                    root, [] if args.full else list(mutant.tests), args.timeout, extra
                )
            finally:
                (root / mutant.path).write_text(original)
            print(
                f"{'SURVIVED' if passed else 'killed':<9} {seconds:5.0f}  {mutant.name}", flush=True
            )
            if passed:
                survivors.append(mutant.name)
        print(f"\n{len(chosen) - len(survivors)} of {len(chosen)} mutants killed; survivors:")
        for name in survivors:
            print(f"  {name}")


if __name__ == "__main__":
    main()
