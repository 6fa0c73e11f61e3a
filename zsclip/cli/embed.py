"""`zsclip embed`: images or texts -> L2-normalised fp32 CLIP embeddings, on stdout or in a file."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from zsclip.cli._options import (
    BatchSizeOpt,
    CacheOpt,
    DeviceOpt,
    ExactPreprocessOpt,
    InputsArg,
    ModelOpt,
    OfflineOpt,
    PrecisionOpt,
    QuietOpt,
    VocabOpt,
    WorkersOpt,
)

EPILOG = """\b
Examples:
  zsclip embed photos/ --output photos.npy      (row order in photos.npy.paths.txt)
  zsclip embed photos/ -o photos.safetensors && zsclip classify --embeddings photos.safetensors -l "cat,dog"
  zsclip embed --text "a photo of a corgi" --text "a jazz album cover" --format jsonl

\b
Embeddings are unit length (L2-normalised), float32, whatever the device and precision.
Exit status: 0 all inputs handled, 1 some could not be read (the rest were written), 2 usage error,
3 the output could not be written, 130/143/129 stopped by Ctrl-C/SIGTERM/SIGHUP."""


def register(app: typer.Typer) -> None:
    app.command(epilog=EPILOG)(embed)


def embed(
    inputs: InputsArg = None,
    text: Annotated[
        Optional[list[str]],
        typer.Option("--text", help="A text to embed (repeat the option for several)."),
    ] = None,
    texts_file: Annotated[
        Optional[Path],
        typer.Option(
            "--texts-file",
            help="Texts to embed, one per line (blank lines skipped); - reads stdin.",
        ),
    ] = None,
    model: ModelOpt = None,
    vocab: VocabOpt = None,
    output: Annotated[
        Optional[Path],
        typer.Option(
            "--output",
            "-o",
            help="Write to FILE.npy (+ FILE.npy.paths.txt / .texts.txt row list), "
            "FILE.safetensors (rows in its metadata) or FILE.jsonl, atomically.",
        ),
    ] = None,
    fmt: Annotated[
        str, typer.Option("--format", "-f", help="stdout format: jsonl or tsv.")
    ] = "jsonl",
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "fp32",
    batch_size: BatchSizeOpt = 32,
    workers: WorkersOpt = None,
    exact_preprocess: ExactPreprocessOpt = False,
    cache: CacheOpt = True,
    quiet: QuietOpt = False,
    offline: OfflineOpt = False,
) -> None:
    """Embed images or texts with CLIP's image or text tower."""
    import sys

    from zsclip.cli._output import warn
    from zsclip.cli._runtime import (
        cache_summary,
        check_outputs,
        finish,
        gather_inputs,
        load_for_inference,
        write_rows,
        writing,
    )
    from zsclip.cli._writers import EmbeddingStream
    from zsclip.errors import UserError
    from zsclip.jobs.embed import embed_images, embed_texts
    from zsclip.jobs.embedding_files import EmbeddingFile
    from zsclip.jobs.pipeline import DecodeOptions, ImageEncoder, default_workers

    texts = _gather_texts(text, texts_file)
    if texts is not None and inputs:
        raise UserError(
            "give INPUT images or --text/--texts-file, not both (embed them in two runs)"
        )
    if texts is None and not inputs:
        raise UserError(
            "nothing to embed: give images or folders, - for paths on stdin, or --text TEXT"
        )
    check_outputs({"--output": output}, to_stdout=output is None)
    sink = (
        EmbeddingFile(output)
        if output is not None
        else EmbeddingStream(sys.stdout, fmt.strip().lower())
    )
    items = gather_inputs(inputs, quiet) if texts is None else None
    if items == []:
        warn("no images found in the INPUT given (folders are searched for image file extensions)")
        if output is None:
            return  # an output file is still written, empty, so a pipeline finds what it expects

    loaded, torch_device, dtype = load_for_inference(
        model, vocab=vocab, device=device, precision=precision, offline=offline, quiet=quiet
    )
    if isinstance(sink, EmbeddingFile):
        sink.model_name = loaded.name
    images_cache = None
    if texts is not None:
        rows, total = (
            embed_texts(loaded.model, loaded.tokenizer, texts, device=torch_device, dtype=dtype),
            len(texts),
        )
    else:
        decode = DecodeOptions.for_model(loaded.preprocess.image_size, exact=exact_preprocess)
        encoder = ImageEncoder.with_cache(
            loaded,
            torch_device,
            dtype,
            decode=decode,
            batch_size=batch_size,
            workers=default_workers() if workers is None else workers,
            use_cache=cache,
            warn=warn,
        )
        images_cache = encoder.cache
        rows = embed_images(encoder, items)
        total = len(items)
    destination = "stdout" if output is None else str(output)
    ok = False
    try:
        failures = write_rows(
            rows,
            sink.write,
            total=total,
            description="embedding",
            quiet=quiet,
            error_of=lambda row: None if row.error is None else (row.key, row.error),
            output=destination,
        )
        ok = True
    finally:
        with writing(destination):
            sink.close(ok)
    cache_summary(images_cache, quiet)
    finish(failures, total, quiet)


def _gather_texts(text: list[str] | None, texts_file: Path | None) -> list[str] | None:
    """--text values then --texts-file lines, in that order; None when neither was given."""
    import sys

    from zsclip.errors import UserError

    if not text and texts_file is None:
        return None
    texts = list(text or [])
    if texts_file is not None:
        try:
            content = (
                sys.stdin.read()
                if str(texts_file) == "-"
                else texts_file.read_text(encoding="utf-8-sig")
            )
        except (OSError, UnicodeDecodeError) as err:
            raise UserError(
                f"cannot read --texts-file {texts_file}: {getattr(err, 'strerror', None) or err}"
            ) from None
        texts += [line.strip() for line in content.splitlines() if line.strip()]
    if not texts or any(not t.strip() for t in texts):
        raise UserError("--text values and --texts-file lines must not be empty")
    return texts
