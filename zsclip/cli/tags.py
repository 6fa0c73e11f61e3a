"""`zsclip tags`: list, or take out, the keywords `classify --xmp` wrote into XMP sidecars
(zsclip.jobs.xmp)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from zsclip.cli._options import InputsArg, QuietOpt

EPILOG = """\b
Examples:
  zsclip tags photos/                  # zsclip's keywords in each image's sidecars
  zsclip tags photos/ --remove         # take them out again (other keywords and fields stay)

\b
Only zsclip's own keywords are touched: the zsclip|... hierarchical keywords and the plain keywords
zsclip added (a keyword that was there before zsclip stays). A sidecar left with nothing in it is
removed. Exit status: 0 done, 1 some sidecars could not be read or written (left untouched)."""


def register(app: typer.Typer) -> None:
    app.command("tags", epilog=EPILOG)(tags_command)


def tags_command(
    inputs: InputsArg = None,
    remove: Annotated[
        bool, typer.Option("--remove", help="Take zsclip's keywords out of the sidecars.")
    ] = False,
    fmt: Annotated[
        Optional[str],
        typer.Option(
            "--format", "-f", help="table, jsonl, csv or tsv (default: table on a terminal)."
        ),
    ] = None,
    output: Annotated[
        Optional[Path], typer.Option("--output", "-o", help="Write the rows to this file.")
    ] = None,
    quiet: QuietOpt = False,
) -> None:
    """List (or --remove) the keywords `classify --xmp` wrote into XMP sidecars."""
    from zsclip.cli._output import stdout_is_terminal
    from zsclip.cli._runtime import check_outputs, finish, gather_inputs, output_stream, write_rows
    from zsclip.cli._writers import RecordWriter, choose_format
    from zsclip.errors import UserError

    if not inputs:
        raise UserError("no INPUT: give image files, folders, or - to read paths from stdin")
    check_outputs({"--output": output}, to_stdout=output is None)
    chosen = choose_format(fmt, output, stdout_is_terminal())
    items = gather_inputs(inputs, quiet)
    columns = ("path", "sidecar", "removed" if remove else "keywords", "error")
    with output_stream(output) as stream:
        writer = RecordWriter(chosen, stream, columns)
        failures = write_rows(
            _rows(items, remove),
            writer.write,
            total=len(items),
            description="tags",
            quiet=quiet,
            error_of=lambda row: (row["path"], row["error"]) if "error" in row else None,
        )
        writer.close()
    finish(failures, len(items), quiet)


def _rows(items, remove: bool):
    """One row per sidecar holding zsclip keywords (per image with an error)."""
    from zsclip.jobs.xmp import XmpError, read_tags, remove_tags, sidecars_of

    for item in items:
        if item.error is not None:
            yield {"path": item.path, "error": item.error}
            continue
        try:
            if remove:
                before = {path: labels for path, labels in read_tags(item.path).items() if labels}
                for sidecar in remove_tags(item.path):
                    yield {
                        "path": item.path,
                        "sidecar": sidecar,
                        "removed": before.get(sidecar, []),
                    }
            else:
                for sidecar, labels in read_tags(item.path).items():
                    yield {"path": item.path, "sidecar": sidecar, "keywords": labels}
        except XmpError as err:
            sidecar = next(iter(sidecars_of(item.path)), None)
            yield {"path": item.path, "sidecar": sidecar, "error": str(err)}
