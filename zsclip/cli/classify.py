"""`zsclip classify`: images (or saved image embeddings) -> the most likely labels, on stdout or in a
file."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from zsclip.cli._classifying import (
    LabelsFileOpt,
    LabelsOpt,
    MinScoreOpt,
    MultiLabelOpt,
    OtherFileOpt,
    OtherOpt,
    TemplatesOpt,
    ThresholdOpt,
)
from zsclip.cli._fewshot import ExamplesOpt, HeadOpt
from zsclip.cli._options import (
    BatchSizeOpt,
    CacheOpt,
    DeviceOpt,
    ExactPreprocessOpt,
    FormatOpt,
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
  zsclip classify photos/ --labels "corgi,jazz album,mountain lake"
  find ~/Pictures -name '*.jpg' | zsclip classify - --labels-file classes.txt --format jsonl | jq .label
  zsclip classify photos/ -L classes.txt --multi-label --threshold 0.25 --report photos.html
  zsclip embed photos/ -o photos.npy && zsclip classify --embeddings photos.npy --labels "cat,dog"
  zsclip classify photos/ -l "cat,dog" --min-score 0.6 --other "a photo of something else"
  zsclip classify photos/ -L tags.txt --multi-label --xmp        # keywords for darktable, Lightroom
  zsclip classify photo.jpg --labels "cat,dog" --server http://127.0.0.1:8765   # a running `zsclip serve`
  zsclip classify photos/ -L classes.txt --examples examples/    # examples/<label>/*.jpg: a few each
  zsclip fit examples/ -L classes.txt -o head.safetensors && zsclip classify photos/ --head head.safetensors

\b
Multi-label scores are sigmoid(logit_scale * (cosine - threshold)): 0.5 at the threshold, one label at a time.
Exit status: 0 all inputs handled, 1 some could not be read (the rest were written), 2 usage error,
3 the output could not be written, 4 no server answers at --server, 130/143/129 stopped by
Ctrl-C/SIGTERM/SIGHUP."""


def register(app: typer.Typer) -> None:
    app.command(epilog=EPILOG)(classify)


def classify(
    inputs: InputsArg = None,
    labels: LabelsOpt = None,
    labels_file: LabelsFileOpt = None,
    templates: TemplatesOpt = None,
    model: ModelOpt = None,
    vocab: VocabOpt = None,
    top_k: Annotated[int, typer.Option("--top-k", "-k", min=1, help="Labels shown per image.")] = 5,
    multi_label: MultiLabelOpt = False,
    threshold: ThresholdOpt = None,
    min_score: MinScoreOpt = None,
    other: OtherOpt = None,
    other_file: OtherFileOpt = None,
    fmt: FormatOpt = None,
    output: Annotated[
        Optional[Path],
        typer.Option(
            "--output", "-o", help="Write the results to this file (atomically) instead of stdout."
        ),
    ] = None,
    report: Annotated[
        Optional[Path],
        typer.Option(
            "--report", help="Also write a self-contained HTML page with thumbnails and score bars."
        ),
    ] = None,
    embeddings: Annotated[
        Optional[Path],
        typer.Option(
            "--embeddings",
            help="Classify image embeddings saved by `zsclip embed` (.npy, .safetensors, .jsonl) "
            "instead of reading images.",
        ),
    ] = None,
    examples: ExamplesOpt = None,
    head: HeadOpt = None,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "fp32",
    batch_size: BatchSizeOpt = 32,
    workers: WorkersOpt = None,
    exact_preprocess: ExactPreprocessOpt = False,
    cache: CacheOpt = True,
    xmp: Annotated[
        bool,
        typer.Option(
            "--xmp",
            help="Also write the accepted labels as keywords into an XMP sidecar beside each image "
            "(IMG_1.jpg.xmp; an existing IMG_1.xmp is updated too), keeping what other programs "
            "wrote there. The image itself is never changed; `zsclip tags --remove` takes them out.",
        ),
    ] = False,
    quiet: QuietOpt = False,
    offline: OfflineOpt = False,
    server: Annotated[
        Optional[str],
        typer.Option(
            "--server",
            envvar="ZSCLIP_SERVER",
            show_envvar=True,
            help="Send the images to a running `zsclip serve` at this URL instead of loading a "
            "model here (same output; its token from ZSCLIP_TOKEN).",
        ),
    ] = None,
) -> None:
    """Classify images into your labels, zero-shot: no training, just class names in words.

    Without --model, the built-in demo model knows only coloured shapes ("red circle"); for photos
    get a real CLIP with --model ViT-B/32 (338 MiB, downloaded once; `zsclip config set model
    ViT-B/32` makes it the default).
    """
    if server:
        _refuse_local_options(model=model, vocab=vocab, embeddings=embeddings, device=device)
        _refuse_local_options(examples=examples, head=head)
        _refuse_local_options(precision=None if precision == "fp32" else precision)
        if other is not None or other_file is not None:
            from zsclip.errors import UserError

            raise UserError(
                "--other does not work with --server yet (the server scores only --labels); "
                "use --min-score, or classify here without --server"
            )
        from zsclip.cli._classify_server import ServerClassify

        remote = ServerClassify(
            server=server,
            inputs=inputs,
            labels=labels,
            labels_file=labels_file,
            templates=templates,
            top_k=top_k,
            multi_label=multi_label,
            threshold=threshold,
            min_score=min_score,
            fmt=fmt,
            output=output,
            report=report,
            batch_size=batch_size,
            exact_preprocess=exact_preprocess,
            xmp=xmp,
            quiet=quiet,
        )
        remote.run()
        return

    from zsclip.cli._choices import Choices, warn_about_labels
    from zsclip.cli._fewshot import FewShot, report_head, run_labels
    from zsclip.cli._output import stdout_is_terminal, warn
    from zsclip.cli._predictions import Sinks, write_predictions
    from zsclip.cli._runtime import check_outputs, gather_inputs
    from zsclip.cli._writers import choose_format
    from zsclip.errors import UserError

    head_labels = head is not None and labels is None and labels_file is None  # the head's own
    label_list = None if head_labels else run_labels(labels, labels_file, examples)
    few, label_list = FewShot.check(examples, head, label_list, templates)
    choices = Choices(
        labels,
        labels_file,
        templates,
        multi_label,
        threshold,
        min_score,
        other,
        other_file,
        given=tuple(label_list),
    )
    label_list, others = choices.check()
    check_outputs({"--output": output, "--report": report}, to_stdout=output is None)
    chosen_format = choose_format(fmt, output, stdout_is_terminal())
    if embeddings is not None and inputs:
        raise UserError("give INPUT images or --embeddings FILE, not both")
    items = None if embeddings is not None else gather_inputs(inputs, quiet)
    if items == []:
        warn("no images found in the INPUT given (folders are searched for image file extensions)")
        return

    from zsclip.cli._report import THUMBNAIL_SIZE
    from zsclip.cli._runtime import cache_summary, load_for_inference
    from zsclip.jobs import classify as job
    from zsclip.jobs.pipeline import DecodeOptions, default_workers

    loaded, torch_device, dtype = load_for_inference(
        model,
        vocab=vocab,
        device=device,
        precision=precision,
        offline=offline,
        quiet=quiet,
        announce=False,
    )
    taught = {label for label, count in zip(label_list, few.counts(label_list)) if count}
    warn_about_labels(loaded, label_list, multi_label, quiet, others, taught)
    decode = DecodeOptions.for_model(
        loaded.preprocess.image_size,
        exact=exact_preprocess,
        thumbnail_size=THUMBNAIL_SIZE if report is not None else None,
    )
    workers = default_workers() if workers is None else workers
    template_choice = few.templates(loaded, templates)
    request = job.ClassifyRequest(
        labels=label_list,
        templates=template_choice,
        items=items,
        embeddings=embeddings,
        options=choices.options(loaded, top_k),
        batch_size=batch_size,
        workers=workers,
        decode=decode,
        use_cache=cache,
        xmp=xmp,
        examples=few.source(
            template_choice, decode, batch_size=batch_size, workers=workers, use_cache=cache
        ),
        head=few.head,
    )
    run = job.start(loaded, request, device=torch_device, dtype=dtype, warn=warn)
    report_head(
        run.head,
        source=f"--head {head}" if head is not None else "--examples",
        multi_label=multi_label,
        threshold=request.options.threshold,
        quiet=quiet,
    )
    sinks = Sinks(
        chosen_format, output, report, quiet, thumbnails_from_files=embeddings is not None
    )
    try:  # exits 1 if some inputs failed
        write_predictions(
            run.predictions, run.total, label_list, request.options, sinks, loaded.name
        )
    finally:
        cache_summary(run.cache, quiet)


def _refuse_local_options(**given) -> None:
    """Options that choose or run the model here mean nothing with --server: say so."""
    from zsclip.errors import UserError

    for name, value in given.items():
        if value is not None and value != "auto":
            raise UserError(
                f"--{name} does not apply with --server (the server's model answers); drop one"
            )
