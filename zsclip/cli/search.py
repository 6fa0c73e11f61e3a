"""`zsclip search`: rank images by a text, an example image, or both, best first."""

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
  zsclip search photos/ --text "a dog on the beach at sunset"
  zsclip search photos/ --text "a mountain lake" --not "people" --top-k 50 --report lakes.html
  zsclip search photos/ --image photos/corgi.jpg --min-score 0.8 --format csv -o similar.csv
  zsclip embed photos/ -o photos.npy && zsclip search --embeddings photos.npy --text "a red car"

\b
Scores are cosine similarities between each image and the query, in [-1, 1]. Several --text and
--image values are averaged (as prompt ensembling does); --not texts are subtracted. Rows come best
first; unreadable images follow as error rows. With the image cache (on by default) a folder seen
before is not decoded again: only the query is encoded.
Exit status: 0 all inputs handled, 1 some could not be read (the rest were ranked), 2 usage error,
3 the output could not be written, 130/143/129 stopped by Ctrl-C/SIGTERM/SIGHUP."""

TextOpt = Annotated[
    Optional[list[str]],
    typer.Option("--text", help="Words to search for (repeat: the texts are averaged)."),
]
NotOpt = Annotated[
    Optional[list[str]],
    typer.Option(
        "--not",
        metavar="TEXT",
        help="Words to move away from (repeatable; subtracted from the query).",
    ),
]
ImageOpt = Annotated[
    Optional[list[Path]],
    typer.Option(
        "--image", help="An example image to search by (repeatable; averaged with --text)."
    ),
]


def register(app: typer.Typer) -> None:
    app.command(epilog=EPILOG)(search)


def search(
    inputs: InputsArg = None,
    text: TextOpt = None,
    negative: NotOpt = None,
    image: ImageOpt = None,
    top_k: Annotated[
        Optional[int],
        typer.Option(
            "--top-k", "-k", min=1, help="Rows to keep (default 20; unlimited with --min-score)."
        ),
    ] = None,
    min_score: Annotated[
        Optional[float],
        typer.Option(
            "--min-score", min=-1.0, max=1.0, help="Keep only images scoring at least this cosine."
        ),
    ] = None,
    index: IndexOpt = "auto",
    fmt: FormatOpt = None,
    output: OutputOpt = None,
    report: Annotated[
        Optional[Path],
        typer.Option(
            "--report", help="Also write a self-contained HTML page of the results with thumbnails."
        ),
    ] = None,
    embeddings: Annotated[
        Optional[Path],
        typer.Option(
            "--embeddings",
            help="Search image embeddings saved by `zsclip embed` (.npy, .safetensors, .jsonl) "
            "instead of reading images.",
        ),
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
    """Rank images by how well they match words or an example image."""
    from zsclip.cli._output import note, progress, stdout_is_terminal, warn
    from zsclip.cli._runtime import check_outputs, gather_inputs
    from zsclip.cli._writers import choose_format
    from zsclip.errors import UserError
    from zsclip.jobs.search import DEFAULT_TOP_K, Limit, Query

    query = Query(tuple(text or ()), tuple(str(p) for p in image or ()), tuple(negative or ()))
    query.check()
    check_index_mode(index)
    check_examples(query.images)
    check_outputs({"--output": output, "--report": report}, to_stdout=output is None)
    chosen_format = choose_format(fmt, output, stdout_is_terminal())
    if embeddings is not None and inputs:
        raise UserError("give INPUT images or --embeddings FILE, not both")
    items = [] if embeddings is not None else gather_inputs(inputs, quiet)
    if not items and embeddings is None:
        warn("no images found in the INPUT given (folders are searched for image file extensions)")
        return

    from zsclip.cli._runtime import cache_summary, load_for_inference
    from zsclip.jobs import search as job
    from zsclip.jobs.pipeline import DecodeOptions, default_workers

    loaded, torch_device, dtype = load_for_inference(
        model, vocab=vocab, device=device, precision=precision, offline=offline, quiet=quiet
    )
    request = job.SearchRequest(
        query=query,
        items=items,
        limit=Limit(top_k or (None if min_score is not None else DEFAULT_TOP_K), min_score),
        batch_size=batch_size,
        workers=default_workers() if workers is None else workers,
        decode=DecodeOptions.for_model(loaded.preprocess.image_size, exact=exact_preprocess),
        use_cache=cache,
        index=index,
        embeddings=embeddings,
    )
    with progress(len(items), "searching", quiet=quiet) as bar:
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
        _write(run, chosen_format, output, report, quiet, describe(query), loaded.name)
    finally:
        cache_summary(run.cache, quiet)


def check_index_mode(mode: str) -> None:
    from zsclip.errors import UserError
    from zsclip.jobs.search import INDEX_MODES

    if mode not in INDEX_MODES:
        raise UserError(f"unknown --index {mode!r}: use one of {', '.join(INDEX_MODES)}")


def check_examples(paths) -> None:
    """Every --image names an existing file (before the model loads)."""
    import os

    from zsclip.errors import UserError

    for path in paths:
        if not os.path.isfile(path):
            raise UserError(f"--image {path}: no such file")


def describe(query) -> str:
    parts = [repr(text) for text in query.texts] + [f"image {path}" for path in query.images]
    described = " + ".join(parts)
    if query.negatives:
        described += " - " + " - ".join(repr(text) for text in query.negatives)
    return described


def _write(run, fmt: str, output, report, quiet: bool, query: str, model_name: str) -> None:
    """The rows (errors last), then the report; exit status 1 when some inputs could not be read."""
    from zsclip.cli._runtime import finish, output_stream, write_rows
    from zsclip.cli._search_writers import HitWriter

    with output_stream(output) as stream:
        writer = HitWriter(fmt, stream)
        failures = write_rows(
            run.hits,
            writer.write,
            total=None,
            description="writing",
            quiet=True,  # the rows come at once; the bar was the search's
            error_of=lambda hit: None if hit.error is None else (hit.path, hit.error),
        )
        writer.close()
    if report is not None:
        from zsclip.cli._report import render_search_report, thumbnail_for, write_page

        for hit in run.hits:
            if hit.error is None:  # only the kept rows are decoded, for their thumbnails
                hit.thumbnail = thumbnail_for(hit.path)
        write_page(report, render_search_report(run.hits, query=query, model_name=model_name))
    finish(failures, run.total, quiet)
