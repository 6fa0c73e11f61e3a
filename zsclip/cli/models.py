"""`zsclip models` lists what can be loaded by name; `zsclip download` fetches it ahead of time.

`install_download_progress` is the stderr progress bar zsclip.core.catalogue shows whenever any
command's `--model NAME` fetches a file on first use; zsclip/cli/app.py installs it before every
command.
"""

from __future__ import annotations

import contextlib
import json
import sys
from typing import Annotated, Iterator, Optional

import typer

from zsclip.cli._options import OfflineOpt, QuietOpt
from zsclip.errors import UserError

FORMATS = ("table", "json")
# What each downloadable name is, in a few words (`zsclip models`, ABOUT). Built-in models describe
# themselves (their `description` metadata).
DESCRIPTIONS = {
    "RN50": "real CLIP: ResNet-50",
    "RN101": "real CLIP: ResNet-101",
    "RN50x4": "real CLIP: ResNet-50, 4x compute, 288 px",
    "RN50x16": "real CLIP: ResNet-50, 16x compute, 384 px",
    "RN50x64": "real CLIP: ResNet-50, 64x compute, 448 px",
    "ViT-B/32": "real CLIP: the usual start on a CPU",
    "ViT-B/16": "real CLIP: ViT-B, finer patches, slower",
    "ViT-L/14": "real CLIP: ViT-L, for a GPU",
    "ViT-L/14@336px": "real CLIP: OpenAI's most accurate, for a GPU",
    "vocab": "the standard BPE vocabulary, not a model",
}
FAMILIES = {  # hf: entries of the table, by the data they were trained on
    "laion2b": "OpenCLIP on LAION-2B",
    "datacomp": "OpenCLIP on DataComp-1B",
    "dfn": "Apple DFN (filtered data)",
    "metaclip": "Meta MetaCLIP 2.5B",
}
# Where a cached model was found, in the table's FOUND column (the json says it in full).
FOUND_SHORT = {
    "built in": "built-in",
    "zsclip cache": "zsclip",
    "OpenAI cache (~/.cache/clip)": "OpenAI",
    "Hugging Face cache": "HF",
    "zsclip cache (old hf/ folder)": "zsclip",
}


def register(app: typer.Typer) -> None:
    app.command("models")(models_command)
    app.command("download")(download_command)


def install_download_progress() -> None:
    from zsclip.core import catalogue as hub

    hub.set_progress_factory(progress_bar)


def models_command(
    format: Annotated[str, typer.Option("--format", "-f", help="table or json.")] = "table",
    presets: Annotated[
        bool,
        typer.Option(
            "--presets",
            help="List the architectures `zsclip train --model NAME` builds from scratch instead.",
        ),
    ] = False,
) -> None:
    """List the built-in model(s) and every name that can be downloaded, with size, published ImageNet
    zero-shot top-1 and parameter count, and which cache holds each one (zsclip's, OpenAI's
    ~/.cache/clip, or the Hugging Face cache shared with transformers and open_clip).

    Example: zsclip models --format json
    """
    from zsclip.core import catalogue as hub

    if format not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)}, not {format!r}")
    if presets:
        rows = preset_rows()
        text = json.dumps(rows, indent=2) + "\n" if format == "json" else render_presets(rows)
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    rows = [{**row, "description": describe(row)} for row in hub.catalog()]
    if format == "json":
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
    else:
        sys.stdout.write(render_table(rows))
    sys.stdout.flush()


def download_command(
    names: Annotated[
        list[str],
        typer.Argument(
            metavar="NAME",
            help="Names from `zsclip models` (e.g. ViT-B/32), `vocab`, or hf:ORG/NAME.",
            show_default=False,
        ),
    ],
    offline: OfflineOpt = False,
    quiet: QuietOpt = False,
    verify: Annotated[
        bool,
        typer.Option(
            "--verify", help="Re-hash files already in the cache and fetch again any that differ."
        ),
    ] = False,
) -> None:
    """Fetch checkpoints into the cache ahead of time; print each local path on stdout.

    Example: zsclip download ViT-B/32 hf:openai/clip-vit-base-patch32
    """
    from zsclip.cli._output import error_line

    failures: list[UserError] = []
    for name in names:
        try:
            path = fetch_by_name(name, offline=offline, quiet=quiet, verify=verify)
        except UserError as err:
            if len(names) == 1:
                raise
            error_line(str(err))
            failures.append(err)
            continue
        sys.stdout.write(f"{path}\n")
        sys.stdout.flush()
    if failures:
        code = max(err.exit_code for err in failures)
        raise UserError(
            f"{len(failures)} of {len(names)} downloads failed (see above)", exit_code=code
        )


def fetch_by_name(name: str, *, offline: bool, quiet: bool, verify: bool = False):  # -> Path
    """The local path for one NAME of `zsclip download`, fetching it if needed."""
    from functools import partial

    from zsclip.core import catalogue as hub

    progress = partial(progress_bar, quiet=quiet)
    for builtin in hub.builtin_models():
        if hub.canonical(builtin.stem) == hub.canonical(name):
            return builtin  # shipped with zsclip: nothing to fetch
    entry = hub.lookup(name)
    if entry is not None and entry.kind == "vocab":
        return hub.fetch_standard_vocab(offline=offline, progress=progress, verify=verify)
    path = hub.resolve(name, offline=offline, progress=progress, verify=verify)
    if path is None:
        raise UserError(
            f"unknown model name {name!r}; `zsclip models` lists the names (or use hf:ORG/NAME)"
        )
    return path


@contextlib.contextmanager
def progress_bar(label: str, size: Optional[int], *, quiet: bool = False) -> Iterator:
    """A hub.ProgressFactory: a rich bar on stderr when it is a terminal, one note line otherwise."""
    from zsclip.cli._output import note, stderr_is_terminal

    if quiet or not stderr_is_terminal():
        note(f"downloading {label}" + (f" ({human_size(size)})" if size else ""), quiet=quiet)
        yield _ignore
        return
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    from zsclip.cli._output import stderr_console

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=stderr_console(), transient=False) as bar:
        task = bar.add_task(f"downloading {label}", total=size)
        yield lambda done, total: bar.update(task, completed=done, total=total)


def _ignore(done: int, total: Optional[int]) -> None:
    pass


def human_size(size: Optional[int]) -> str:
    if size is None:
        return "?"
    for unit in ("B", "KiB", "MiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.2f} GiB"


def describe(row: dict) -> str:
    """A model in a few words: a built-in model's own `description`, else the table's."""
    if row["kind"] == "builtin":
        from zsclip.escapes import for_display

        return for_display(str(_header_metadata(row["path"]).get("description", "built-in model")))
    if row["kind"] == "hf":
        from zsclip.core import catalogue as hub

        entry = hub.lookup(row["name"]) if not row["name"].startswith("hf:") else None
        if entry is None:
            return "Hugging Face CLIP"
        text = FAMILIES.get(entry.family or "", "open CLIP")
        if entry.license and "non-commercial" in entry.license.lower():
            text += " (non-commercial licence)"
        return text
    return DESCRIPTIONS.get(row["name"], "")


def _header_metadata(path: str) -> dict:
    """A .safetensors file's header metadata, read without torch; {} when it cannot be read."""
    import struct

    try:
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > 1 << 20:  # the built-in header is a few KiB: do not read what a file claims
                return {}
            metadata = json.loads(handle.read(length)).get("__metadata__")
    except (OSError, ValueError, struct.error, AttributeError):
        return {}
    return metadata if isinstance(metadata, dict) else {}


def render_table(rows: list[dict]) -> str:
    """Plain aligned columns (no markup): NAME KIND SIZE TOP1 PARAMS FOUND ABOUT PATH. TOP1 is the
    published ImageNet zero-shot top-1 (%); FOUND says which cache holds the model ("-": none yet)."""
    header = ("NAME", "KIND", "SIZE", "TOP1", "PARAMS", "FOUND", "ABOUT", "PATH")
    lines = [header] + [
        (
            row["name"],
            row["kind"],
            human_size(row["size"]),
            f"{row['top1']:.1f}" if row.get("top1") is not None else "-",
            f"{row['params'] / 1e6:.0f}M" if row.get("params") else "-",
            FOUND_SHORT.get(row.get("found_in") or "", "yes") if row["cached"] else "-",
            row.get("description", ""),
            row["path"] or "-",
        )
        for row in rows
    ]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
    return "".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line[:-1], widths))
        + "  "
        + line[-1]
        + "\n"
        for line in lines
    )


def preset_rows() -> list[dict]:
    """One row per training preset: its shape, and its parameter count with the text vocabulary its
    configuration names (`train --vocab-size N` or the standard vocabulary change the text embedding)."""
    import torch

    from zsclip.core.model import CLIP
    from zsclip.core.presets import PRESETS

    rows = []
    for name, config in PRESETS.items():
        with torch.device("meta"):  # shapes only: no memory, no initialisation
            parameters = sum(p.numel() for p in CLIP(config).parameters())
        vision = config.vision
        rows.append(
            {
                "name": name,
                "vision": vision.kind,
                "image_size": vision.image_size,
                "embed_dim": config.embed_dim,
                "vocab_size": config.text.vocab_size,
                "parameters": parameters,
            }
        )
    return rows


def render_presets(rows: list[dict]) -> str:
    """Plain aligned columns: NAME VISION IMAGE EMBED VOCAB PARAMS."""
    header = ("NAME", "VISION", "IMAGE", "EMBED", "VOCAB", "PARAMS")
    lines = [header] + [
        (
            row["name"],
            row["vision"],
            f"{row['image_size']} px",
            str(row["embed_dim"]),
            str(row["vocab_size"]),
            f"{row['parameters'] / 1e6:.1f} M",
        )
        for row in rows
    ]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() + "\n"
        for line in lines
    )
