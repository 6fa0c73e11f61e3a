"""`zsclip eval`: zero-shot accuracy on a folder of class subfolders, or retrieval recall on a pairs
file."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from zsclip.cli._fewshot import ExamplesOpt, HeadOpt
from zsclip.cli._options import (
    BatchSizeOpt,
    DeviceOpt,
    ModelOpt,
    OfflineOpt,
    PrecisionOpt,
    QuietOpt,
    VocabOpt,
)

EPILOG = """\b
Examples:
  zsclip eval shapes/heldout --labels-file shapes/labels.txt
  zsclip eval photos/by-class --model ViT-B/32 --templates photo --format table
  zsclip eval --pairs val.tsv --model runs/x/model.safetensors
  zsclip eval shapes/heldout -L shapes/labels.txt --examples examples/   # few-shot: examples/<label>/*.png

\b
JSON keys: top1, top5, mean_per_class_recall, n, classes; with --pairs: image_to_text_R@{1,5,10},
text_to_image_R@{1,5,10}, n. With --examples or --head the scores are the few-shot head's, plus
zeroshot_top1 and examples (how many it was fitted on)."""


def eval_command(
    folder: Annotated[
        Optional[Path],
        typer.Argument(
            help="Folder with one subfolder of images per class; the subfolder name is the label."
        ),
    ] = None,
    pairs: Annotated[
        Optional[Path],
        typer.Option(
            "--pairs", help="Measure retrieval recall on image<TAB>caption pairs instead."
        ),
    ] = None,
    labels_file: Annotated[
        Optional[Path],
        typer.Option(
            "--labels-file",
            "-L",
            help="All candidate labels, one a line: every folder name must be among them; "
            "the others act as distractors.",
        ),
    ] = None,
    templates: Annotated[
        Optional[str],
        typer.Option(
            "--templates",
            "-t",
            help="Prompt template set (name in prompts/ or a file). Default: the model's own set, "
            "else photo.",
        ),
    ] = None,
    examples: ExamplesOpt = None,
    head: HeadOpt = None,
    model: ModelOpt = None,
    vocab: VocabOpt = None,
    fmt: Annotated[
        Optional[str],
        typer.Option(
            "--format", "-f", help="json or table (default: table on a terminal, json otherwise)."
        ),
    ] = None,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "fp32",
    batch_size: BatchSizeOpt = 256,
    workers: Annotated[
        int,
        typer.Option(
            "--workers",
            "-j",
            min=0,
            help="Image-decoding processes beside this one (0: decode in this process).",
        ),
    ] = 0,
    quiet: QuietOpt = False,
    offline: OfflineOpt = False,
) -> None:
    """Measure a model: zero-shot top-1/top-5 on class folders, or recall@k on image-caption pairs."""
    from zsclip.cli._output import stdout_is_terminal
    from zsclip.errors import UserError

    if (folder is None) == (pairs is None):
        raise UserError(
            "give a class folder (zsclip eval DIR) or --pairs FILE, not both and not neither"
        )
    fmt = fmt or ("table" if stdout_is_terminal() else "json")
    if fmt not in ("json", "table"):
        raise UserError(f"unknown --format {fmt!r}: use json or table")
    if examples is not None and head is not None:
        raise UserError("give --examples DIR (fit now) or --head FILE (fitted before), not both")
    if pairs is not None and (labels_file is not None or templates is not None or examples or head):
        raise UserError(
            "--labels-file, --templates, --examples and --head apply to class folders, not to --pairs"
        )
    from zsclip.cli._fewshot import FewShot
    from zsclip.core.devices import autocast
    from zsclip.jobs import evaluate

    # The cheap checks (folders, labels, examples, head, pairs file) come before the model is loaded.
    few = FewShot()
    if folder is not None:
        from zsclip.jobs.labels import read_labels_file

        labels = read_labels_file(labels_file) if labels_file is not None else None
        if head is not None:  # its labels are the candidates, unless a labels file names them
            few, labels = FewShot.check(None, head, labels, templates)
        task: Any = evaluate.ZeroShotSet.from_folder(folder, labels, None)
        if examples is not None:
            few, _ = FewShot.check(examples, None, task.labels, templates)
        total = len(task.items)
    else:
        task = _load_pairs(pairs)
        total = len(task)
    from zsclip.cli._runtime import load_for_inference

    loaded, torch_device, dtype = load_for_inference(
        model, vocab=vocab, device=device, precision=precision, offline=offline, quiet=quiet
    )
    fitted = None
    if isinstance(task, evaluate.ZeroShotSet):
        from zsclip.jobs.labels import load_templates

        task.templates = load_templates(templates, model_default=loaded.metadata.get("templates"))
        if few.active:
            fitted = _few_shot_head(few, task, loaded, torch_device, dtype, head, workers, quiet)
    run = evaluate.EvalRun(
        loaded.model,
        loaded.tokenizer,
        loaded.preprocess,
        torch_device,
        autocast=lambda: autocast(torch_device, dtype),
        batch_size=batch_size,
        workers=workers,
    )
    _render(_measure(task, run, total, quiet, fitted.head if fitted else None), fmt)


def _few_shot_head(few, task, loaded, device, dtype, head_path, workers, quiet):
    """The head for --examples (fitted or cached) or --head (checked against the model), for the
    task's labels in order; warns when examples are also evaluation images."""
    import os

    from zsclip.cli._fewshot import report_head
    from zsclip.cli._output import warn
    from zsclip.jobs import classify as job
    from zsclip.jobs.pipeline import DecodeOptions
    from zsclip.jobs.zeroshot import classifier_for

    task.templates = few.templates(loaded, None) if few.head is not None else task.templates
    text = classifier_for(
        loaded, task.labels, task.templates, device=device, dtype=dtype, warn=warn
    )
    source = few.source(task.templates, DecodeOptions(), workers=workers or 0)  # exact, as eval
    request = job.ClassifyRequest(task.labels, task.templates, examples=source, head=few.head)
    fitted = job.few_shot_head(loaded, request, text, device=device, dtype=dtype, warn=warn)
    origin = f"--head {head_path}" if head_path is not None else "--examples"
    report_head(fitted, source=origin, multi_label=False, threshold=None, quiet=quiet)
    if few.examples is not None:
        evaluated = {os.path.realpath(path) for path, _ in task.items}
        shared = sum(os.path.realpath(item.path) in evaluated for item in few.examples.items)
        if shared:
            warn(
                f"{shared} example image(s) are also evaluation images; the score is optimistic "
                "(keep examples and evaluation images apart)"
            )
    return fitted


def _load_pairs(pairs: Path) -> list:
    """The pairs of --pairs, every image decoded once; problems listed by line, then one error."""
    from zsclip.cli._output import error_line
    from zsclip.train import data

    try:
        return data.load_pairs(pairs, option="--pairs", hint="fix or remove those rows")
    except data.DataError as err:
        for problem in err.problems[: data.SHOWN_PROBLEMS]:
            error_line(problem)
        if len(err.problems) > data.SHOWN_PROBLEMS:
            error_line(f"... and {len(err.problems) - data.SHOWN_PROBLEMS} more")
        raise


def _measure(task: Any, run: Any, total: int, quiet: bool, head: Any = None) -> dict:
    """Zero-shot scores for a ZeroShotSet, retrieval recall for a list of pairs, with a progress bar."""
    from zsclip.cli._output import progress
    from zsclip.jobs import evaluate

    with progress(total, "evaluating", quiet=quiet) as bar:
        done = [0]

        def tick(now: int, _total: int) -> None:
            bar.advance(now - done[0])
            done[0] = now

        run.progress = tick
        if isinstance(task, evaluate.ZeroShotSet):
            return evaluate.evaluate_zeroshot(run, task, head)
        return evaluate.evaluate_pairs(run, task)


def _render(result: dict, fmt: str) -> None:
    import json
    import sys

    if fmt == "json":
        sys.stdout.write(json.dumps(_rounded(result)) + "\n")
        return
    from rich.table import Table

    from zsclip.cli._output import stdout_console

    table = Table("metric", "value")
    for key, value in result.items():
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    stdout_console().print(table)


def _rounded(value: Any) -> Any:
    """Figures to 6 decimals (float32 sums carry ~7 digits): 0.055, not 0.054999999701976776."""
    if isinstance(value, float):
        return round(value, 6)
    if isinstance(value, dict):
        return {key: _rounded(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_rounded(item) for item in value]
    return value


def register(app: typer.Typer) -> None:
    app.command("eval", epilog=EPILOG)(eval_command)
