"""`zsclip shapes`: draw the synthetic captioned world the built-in model is trained on."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from zsclip.cli._options import QuietOpt


def shapes_command(
    out: Annotated[
        Path,
        typer.Argument(
            help="Folder to create. A previous shapes set there is replaced whole; any other "
            "non-empty folder is refused."
        ),
    ],
    count: Annotated[int, typer.Option("--count", "-n", min=1, help="Training images.")] = 20000,
    seed: Annotated[int, typer.Option("--seed", help="Same seed, same bytes.")] = 0,
    image_size: Annotated[
        int, typer.Option("--image-size", min=16, help="Side of the square images, px.")
    ] = 64,
    val_count: Annotated[
        Optional[int],
        typer.Option("--val-count", min=1, help="Validation pairs (default: count/20, >= 100)."),
    ] = None,
    per_class: Annotated[
        int, typer.Option("--per-class", min=1, help="Images per label in seen/ and heldout/.")
    ] = 10,
    quiet: QuietOpt = False,
) -> None:
    """Draw coloured shapes with captions: train.tsv, val.tsv, seen/ and heldout/ eval folders,
    labels.txt.

    Some colour-shape combinations are held out: they appear in no training image or caption, so
    `zsclip eval OUT/heldout --labels-file OUT/labels.txt` measures zero-shot transfer to unseen
    classes.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    from zsclip.cli._output import note, stderr_console, stderr_is_terminal
    from zsclip.train import shapes

    shapes.check_output(out)  # before the first image is drawn

    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=stderr_console(),
        disable=quiet or not stderr_is_terminal(),
        transient=True,
    ) as bar:
        task = bar.add_task("drawing", total=None)

        def progress(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        counts = shapes.generate(
            out,
            count,
            seed,
            image_size=image_size,
            val_count=val_count,
            eval_per_class=per_class,
            progress=progress,
        )
    note(
        f"wrote {counts['train']} training and {counts['val']} validation pairs, {counts['seen']} seen and "
        f"{counts['heldout']} held-out eval images ({len(shapes.HELDOUT)} held-out labels) to {out}",
        quiet=quiet,
    )


def register(app: typer.Typer) -> None:
    app.command("shapes")(shapes_command)
