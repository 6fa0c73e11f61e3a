"""`zsclip eval`: zero-shot accuracy on a folder of class subfolders, or retrieval recall on a pairs file."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from zsclip.commands.options import (BatchSizeOpt, DeviceOpt, ModelOpt, OfflineOpt, PrecisionOpt, QuietOpt,
                                     VocabOpt, WorkersOpt)

EPILOG = """\b
Examples:
  zsclip eval shapes/heldout --labels-file shapes/labels.txt
  zsclip eval photos/by-class --model ViT-B/32 --templates photo --format table
  zsclip eval --pairs val.tsv --model runs/x/model.safetensors

\b
JSON keys: top1, top5, mean_per_class_recall, n, classes; with --pairs: image_to_text_R@{1,5,10},
text_to_image_R@{1,5,10}, n."""


def eval_command(
    folder: Annotated[Optional[Path], typer.Argument(
        help="Folder with one subfolder of images per class; the subfolder name is the label.")] = None,
    pairs: Annotated[Optional[Path], typer.Option(
        "--pairs", help="Measure retrieval recall on image<TAB>caption pairs instead.")] = None,
    labels_file: Annotated[Optional[Path], typer.Option(
        "--labels-file", "-L", help="All candidate labels, one a line: every folder name must be among them; "
        "the others act as distractors.")] = None,
    templates: Annotated[Optional[str], typer.Option(
        "--templates", "-t", help="Prompt template set (name in prompts/ or a file). Default: the model's own set, "
        "else photo.")] = None,
    model: ModelOpt = None,
    vocab: VocabOpt = None,
    fmt: Annotated[Optional[str], typer.Option(
        "--format", "-f", help="json or table (default: table on a terminal, json otherwise).")] = None,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "fp32",
    batch_size: BatchSizeOpt = 256,
    workers: WorkersOpt = 0,
    quiet: QuietOpt = False,
    offline: OfflineOpt = False,
) -> None:
    """Measure a model: zero-shot top-1/top-5 on class folders, or recall@k on image-caption pairs."""
    from zsclip.errors import UserError
    from zsclip.output import stdout_is_terminal

    if (folder is None) == (pairs is None):
        raise UserError("give a class folder (zsclip eval DIR) or --pairs FILE, not both and not neither")
    fmt = fmt or ("table" if stdout_is_terminal() else "json")
    if fmt not in ("json", "table"):
        raise UserError(f"unknown --format {fmt!r}: use json or table")
    if pairs is not None and (labels_file is not None or templates is not None):
        raise UserError("--labels-file and --templates apply to class folders, not to --pairs")
    result = _measure(folder, pairs, labels_file, templates, model, vocab, device, precision, batch_size,
                      workers or 0, quiet, offline)
    _render(result, fmt)


def _measure(folder, pairs, labels_file, templates, model, vocab, device, precision, batch_size, workers, quiet,
             offline) -> dict:
    from zsclip import evaluate
    from zsclip.checkpoints import load_model
    from zsclip.devices import autocast, resolve_device, resolve_precision
    from zsclip.output import progress

    torch_device = resolve_device(device)
    dtype = resolve_precision(precision, torch_device)
    if folder is not None:  # check the cheap things before loading the model
        from zsclip.labels import load_templates, read_labels_file

        labels = read_labels_file(labels_file) if labels_file is not None else None
        zs = evaluate.ZeroShotSet.from_folder(folder, labels, None)
        total = len(zs.items)
    else:
        from zsclip import data

        pair_list = data.load_pairs(pairs)
        total = len(pair_list)
    loaded = load_model(model, vocab=vocab, device=torch_device, offline=offline)
    options = dict(autocast=lambda: autocast(torch_device, dtype), batch_size=batch_size, workers=workers)
    with progress(total, "evaluating", quiet=quiet) as bar:
        done = [0]

        def tick(now: int, _total: int) -> None:
            bar.advance(now - done[0])
            done[0] = now

        if folder is not None:
            zs.templates = load_templates(templates, model_default=loaded.metadata.get("templates"))
            return evaluate.evaluate_zeroshot(loaded.model, loaded.tokenizer, loaded.preprocess, zs, torch_device,
                                              progress=tick, **options)
        return evaluate.evaluate_pairs(loaded.model, loaded.tokenizer, loaded.preprocess, pair_list, torch_device,
                                       progress=tick, **options)


def _render(result: dict, fmt: str) -> None:
    import json
    import sys

    if fmt == "json":
        sys.stdout.write(json.dumps(result) + "\n")
        return
    from rich.table import Table

    from zsclip.output import stdout_console

    table = Table("metric", "value")
    for key, value in result.items():
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    stdout_console().print(table)


def register(app: typer.Typer) -> None:
    app.command("eval", epilog=EPILOG)(eval_command)
