"""`zsclip convert`: any checkpoint zsclip can load, saved as a self-describing zsclip .safetensors
file."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from zsclip.cli._options import OfflineOpt, VocabOpt


def register(app: typer.Typer) -> None:
    app.command(
        epilog="Example: zsclip convert ViT-B-32.pt vit-b-32.safetensors",
    )(convert)


# What a model says about itself that a converted copy keeps (the rest is rewritten by the save).
KEPT_METADATA = (
    "templates",
    "source_format",
    "description",
    "multi_label_threshold",
    "caption_words",
)


def convert(
    source: Annotated[
        str,
        typer.Argument(
            metavar="SRC",
            help="Checkpoint to read: a file or folder in any supported format, or a model name.",
        ),
    ],
    destination: Annotated[
        Path, typer.Argument(metavar="DST", help="The .safetensors file to write.")
    ],
    vocab: VocabOpt = None,
    offline: OfflineOpt = False,
) -> None:
    """Convert an OpenAI, OpenCLIP or Hugging Face checkpoint to zsclip's own .safetensors format."""
    from zsclip.atomic import check_output
    from zsclip.cli._output import note
    from zsclip.cli._runtime import writing
    from zsclip.core.checkpoints import load_model, save_checkpoint
    from zsclip.core.model import count_parameters
    from zsclip.errors import UserError

    if destination.suffix != ".safetensors":
        raise UserError(f"{destination}: the destination must end in .safetensors")
    check_output(destination, "DST")  # before the (slow) load
    loaded = load_model(source, vocab=vocab, offline=offline)
    keep = {k: v for k, v in loaded.metadata.items() if k in KEPT_METADATA}
    with writing(str(destination)):
        save_checkpoint(
            destination,
            loaded.model,
            preprocess=loaded.preprocess,
            tokenizer=loaded.tokenizer,
            metadata=keep,
            self_contained=True,  # a converted file needs no vocabulary beside it, ever
        )
    note(
        f"wrote {destination} ({count_parameters(loaded.model):,} parameters, "
        f"{loaded.metadata.get('source_format', 'zsclip')} format in)"
    )
