"""Option definitions shared by several commands, so each flag means the same everywhere."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

InputsArg = Annotated[
    Optional[list[str]],
    typer.Argument(
        metavar="INPUT",
        show_default=False,
        help="Image files, folders (recursive, sorted; hidden files skipped) or - to read paths from stdin.",
    ),
]
ModelOpt = Annotated[
    Optional[str],
    typer.Option(
        "--model",
        "-m",
        help="Model: a built-in or downloadable name (see `zsclip models`), hf:ORG/NAME, or a checkpoint path. "
        "Default: $ZSCLIP_MODEL, else `zsclip config set model NAME`, else the built-in demo model "
        "(coloured shapes only).",
    ),
]
VocabOpt = Annotated[
    Optional[Path],
    typer.Option(
        "--vocab",
        envvar="ZSCLIP_VOCAB",
        metavar="PATH",
        help="BPE vocabulary (bpe_simple_vocab_16e6.txt.gz, or a folder with vocab.json + merges.txt); overrides "
        "the checkpoint's own. Needed for OpenAI/OpenCLIP files when it is neither beside them nor in the cache.",
    ),
]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")]
PrecisionOpt = Annotated[
    str, typer.Option("--precision", help="fp32, bf16 or fp16 (fp16 on CUDA only).")
]
BatchSizeOpt = Annotated[
    int, typer.Option("--batch-size", "-b", min=1, help="Images per forward pass.")
]
WorkersOpt = Annotated[
    Optional[int],
    typer.Option("--workers", "-j", min=0, help="Image-decoding workers (default: one per core)."),
]
QuietOpt = Annotated[
    bool, typer.Option("--quiet", "-q", help="No progress bar or notes on stderr.")
]
OfflineOpt = Annotated[
    bool,
    typer.Option(
        "--offline", envvar="ZSCLIP_OFFLINE", help="Never touch the network; use the cache only."
    ),
]
ExactPreprocessOpt = Annotated[
    bool,
    typer.Option(
        "--exact-preprocess",
        help="Decode every image at full size, exactly as the reference preprocessing does. Default: JPEGs are "
        "decoded at a reduced scale when that keeps >= 1.5x the model's input size (12-MP photos about 4x faster, "
        "inputs within cosine 0.9996 of exact).",
    ),
]
CacheOpt = Annotated[
    bool,
    typer.Option(
        "--cache/--no-cache",
        help="Reuse image embeddings and label classifiers stored under $ZSCLIP_CACHE (else ~/.cache/zsclip); an "
        "image is encoded again when its size or modification time changes.",
    ),
]
# The row-writing commands (classify, search, duplicates): where the rows go and in what form.
IndexOpt = Annotated[
    str,
    typer.Option(
        "--index",
        metavar="MODE",
        help="auto: the approximate index (pip install 'zsclip[index]') for large folders (search: "
        "50,000 images and more; duplicates: 200,000), exact below; always; never (always exact).",
    ),
]
FormatOpt = Annotated[
    Optional[str],
    typer.Option(
        "--format",
        "-f",
        help="table, jsonl, csv or tsv. Default: table on a terminal, jsonl otherwise "
        "(with --output: from its suffix).",
    ),
]
OutputOpt = Annotated[
    Optional[Path],
    typer.Option(
        "--output", "-o", help="Write the rows to this file (atomically) instead of stdout."
    ),
]
