"""`zsclip fit`: example images per label -> a few-shot head file for `classify --head` and `eval --head`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from zsclip.cli._options import (
    BatchSizeOpt,
    CacheOpt,
    DeviceOpt,
    ExactPreprocessOpt,
    ModelOpt,
    OfflineOpt,
    PrecisionOpt,
    QuietOpt,
    VocabOpt,
    WorkersOpt,
)

EPILOG = """\b
Examples:
  zsclip fit examples/ -o head.safetensors                 # labels: the subfolder names
  zsclip fit examples/ -L classes.txt -o head.safetensors  # more labels; those without examples stay zero-shot
  zsclip classify photos/ --head head.safetensors

\b
Methods: auto (default) fits prior and blend and keeps the one that cross-validates better; prior pulls
the classifier toward the labels' words (good when the words are partly right); blend mixes the probe's
logits with the zero-shot ones; probe ignores the words. Each label's multi-label threshold is chosen on
the examples and saved. The fitted head is cached: fitting the same files again costs nothing."""


def register(app: typer.Typer) -> None:
    app.command(epilog=EPILOG)(fit)


def fit(
    folder: Annotated[
        Path,
        typer.Argument(
            metavar="DIR",
            show_default=False,
            help="One subfolder of example images per label, named after it.",
        ),
    ],
    output: Annotated[
        Path,
        typer.Option(
            "--output", "-o", metavar="FILE", help="Where to write the head (.safetensors)."
        ),
    ],
    labels: Annotated[
        Optional[str],
        typer.Option(
            "--labels", "-l", help="Comma-separated labels (default: the subfolder names of DIR)."
        ),
    ] = None,
    labels_file: Annotated[
        Optional[Path],
        typer.Option("--labels-file", "-L", help="One label per line; # starts a comment line."),
    ] = None,
    templates: Annotated[
        Optional[str],
        typer.Option(
            "--templates",
            "-t",
            help="Prompt template set (name in prompts/ or a file); saved in the head. Default: the "
            "model's own set, else photo.",
        ),
    ] = None,
    method: Annotated[
        str, typer.Option("--method", help="auto, prior, blend or probe (see below).")
    ] = "auto",
    contrast: Annotated[
        str,
        typer.Option(
            "--contrast",
            help="auto, seen or all: may labels with examples take images from labels without any? "
            "(all: yes, needed for a label the words cannot describe; seen: no; auto: all when the "
            "words send a quarter of the examples to labels without examples).",
        ),
    ] = "auto",
    model: ModelOpt = None,
    vocab: VocabOpt = None,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "fp32",
    batch_size: BatchSizeOpt = 32,
    workers: WorkersOpt = None,
    exact_preprocess: ExactPreprocessOpt = False,
    cache: CacheOpt = True,
    quiet: QuietOpt = False,
    offline: OfflineOpt = False,
) -> None:
    """Fit a few-shot head on example images (a few per label) and save it for `classify --head`."""
    from zsclip.cli._fewshot import FewShot, report_head, run_labels
    from zsclip.cli._output import warn
    from zsclip.cli._runtime import check_outputs, load_for_inference
    from zsclip.errors import UserError
    from zsclip.jobs.fewshot import CONTRASTS, METHODS, FitOptions
    from zsclip.jobs.heads import save_head
    from zsclip.jobs.pipeline import DecodeOptions, default_workers
    from zsclip.jobs.scores import model_threshold

    if method not in METHODS:
        raise UserError(f"unknown --method {method!r}: use {', '.join(METHODS)}")
    if contrast not in CONTRASTS:
        raise UserError(f"unknown --contrast {contrast!r}: use {', '.join(CONTRASTS)}")
    check_outputs({"--output": output}, to_stdout=False)
    label_list = run_labels(labels, labels_file, folder)
    few, _ = FewShot.check(folder, None, label_list, None)

    from zsclip.jobs import classify as job
    from zsclip.jobs.zeroshot import classifier_for

    loaded, torch_device, dtype = load_for_inference(
        model, vocab=vocab, device=device, precision=precision, offline=offline, quiet=quiet
    )
    template_set = few.templates(loaded, templates)
    decode = DecodeOptions.for_model(loaded.preprocess.image_size, exact=exact_preprocess)
    source = few.source(
        template_set,
        decode,
        options=FitOptions(method=method, contrast=contrast),
        batch_size=batch_size,
        workers=default_workers() if workers is None else workers,
        use_cache=cache,
    )
    text = classifier_for(
        loaded,
        label_list,
        template_set,
        device=torch_device,
        dtype=dtype,
        use_cache=cache,
        warn=warn,
    )  # [D, C]
    request = job.ClassifyRequest(labels=label_list, templates=template_set, examples=source)
    fitted = job.few_shot_head(loaded, request, text, device=torch_device, dtype=dtype, warn=warn)
    from zsclip.cli._runtime import writing

    with writing(str(output)):
        save_head(output, fitted.head)
    default = model_threshold(loaded.metadata)  # what labels without their own threshold use
    report_head(
        fitted, source="--examples", multi_label=True, threshold=default, quiet=quiet, limit=None
    )
    if not quiet:
        from zsclip.cli._output import note

        note(f"zsclip: wrote {output}; use it with `zsclip classify IMAGES --head {output}`")
