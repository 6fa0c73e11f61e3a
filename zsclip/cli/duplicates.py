"""`zsclip duplicates`: groups of near-identical images, and byte-identical files."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from zsclip.cli._options import (
    BatchSizeOpt,
    CacheOpt,
    DeviceOpt,
    ExactPreprocessOpt,
    FormatOpt,
    IndexOpt,
    InputsArg,
    ModelOpt,
    OfflineOpt,
    OutputOpt,
    PrecisionOpt,
    QuietOpt,
    VocabOpt,
    WorkersOpt,
)

EPILOG = """\b
Examples:
  zsclip duplicates photos/                          # one group per line (jsonl) off a terminal
  zsclip duplicates photos/ --threshold 0.97 --report duplicates.html
  zsclip duplicates photos/ | jq -r '.paths[1:][]'   # every copy but the first of each group

\b
A group holds images whose embeddings have cosine >= --threshold, joined through each other
(A like B, B like C); min_score is the lowest cosine between any two of its images. Byte-identical
files are found before any model work and listed under "identical". Re-encoded, resized and
slightly cropped copies group; whether a mirror image does depends on the model. The default
threshold is the model's own when its file names one (0.96 for the built-in model), else
0.97 (docs/search.md).
Exit status: 0 all inputs handled, 1 some could not be read (the rest were compared), 2 usage error,
3 the output could not be written, 130/143/129 stopped by Ctrl-C/SIGTERM/SIGHUP."""


def register(app: typer.Typer) -> None:
    app.command(epilog=EPILOG)(duplicates)


def duplicates(
    inputs: InputsArg = None,
    threshold: Annotated[
        Optional[float],
        typer.Option(
            "--threshold",
            min=0.0,
            max=1.0,
            help="Cosine at which two images count as duplicates (default: the model's, else 0.97).",
        ),
    ] = None,
    index: IndexOpt = "auto",
    fmt: FormatOpt = None,
    output: OutputOpt = None,
    report: Annotated[
        Optional[Path],
        typer.Option("--report", help="Also write a self-contained HTML page showing each group."),
    ] = None,
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
    """Find near-duplicate images (re-encoded, resized, slightly cropped) and identical files."""
    from zsclip.cli._output import note, progress, stdout_is_terminal, warn
    from zsclip.cli._runtime import check_outputs, gather_inputs
    from zsclip.cli._writers import choose_format
    from zsclip.cli.search import check_index_mode
    from zsclip.errors import UserError

    if threshold is not None and threshold <= 0.0:
        raise UserError("--threshold must be above 0 (a cosine; duplicates sit near 1)")
    check_index_mode(index)
    check_outputs({"--output": output, "--report": report}, to_stdout=output is None)
    chosen_format = choose_format(fmt, output, stdout_is_terminal())
    items = gather_inputs(inputs, quiet)
    if not items:
        warn("no images found in the INPUT given (folders are searched for image file extensions)")
        return

    from zsclip.cli._runtime import cache_summary, load_for_inference
    from zsclip.jobs import duplicates as job
    from zsclip.jobs.pipeline import DecodeOptions, default_workers

    loaded, torch_device, dtype = load_for_inference(
        model, vocab=vocab, device=device, precision=precision, offline=offline, quiet=quiet
    )
    request = job.DuplicatesRequest(
        items=items,
        threshold=job.default_threshold(loaded.metadata) if threshold is None else threshold,
        batch_size=batch_size,
        workers=default_workers() if workers is None else workers,
        decode=DecodeOptions.for_model(loaded.preprocess.image_size, exact=exact_preprocess),
        use_cache=cache,
        index=index,
    )
    with progress(len(items), "comparing", quiet=quiet) as bar:
        run = job.start(
            loaded,
            request,
            device=torch_device,
            dtype=dtype,
            warn=warn,
            note=lambda message: note(message, quiet=quiet),
            progress=bar.advance,
        )
    try:
        _write(run, chosen_format, output, report, quiet, loaded.name, request.threshold)
    finally:
        cache_summary(run.cache, quiet)


def _write(run, fmt, output, report, quiet: bool, model_name: str, threshold: float) -> None:
    """Groups, then error rows; the report; exit status 1 when some inputs could not be read."""
    from zsclip.cli._output import error_line, note
    from zsclip.cli._runtime import finish, output_stream, writing
    from zsclip.cli._search_writers import GroupWriter

    name = "stdout" if output is None else str(output)
    with output_stream(output) as stream:
        writer = GroupWriter(fmt, stream)
        with writing(name):
            for group in run.groups:
                writer.write(group)
            for path, reason in run.errors:
                writer.write_error(path, reason)
                error_line(f"{path}: {reason}")
            writer.close()
    copies = sum(len(group.paths) - 1 for group in run.groups)
    note(
        f"zsclip: {len(run.groups)} group(s) of duplicates among {run.total} images "
        f"({copies} could go); threshold {threshold:g}",
        quiet=quiet,
    )
    if report is not None:
        from zsclip.cli._report import render_duplicates_report, thumbnail_for, write_page

        thumbnails = {path: thumbnail_for(path) for group in run.groups for path in group.paths}
        page = render_duplicates_report(
            run.groups, run.errors, thumbnails, model_name=model_name, threshold=threshold
        )
        write_page(report, page)
    finish(len(run.errors), run.total, quiet)
