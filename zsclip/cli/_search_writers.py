"""What `search` and `duplicates` print: ranked rows and groups, as jsonl, csv, tsv or a table.

The formats follow classify's (zsclip.cli._writers): machine formats are plain writes, a name that
is not valid UTF-8 keeps its bytes (\\udcNN in jsonl, \\xNN in csv/tsv), and only `table` goes
through rich, for a person at a terminal.

    search      jsonl {"path", "score"} best first, then {"path", "error"} for unreadable inputs
                csv/tsv path,score,error
    duplicates  jsonl {"paths": [...], "min_score", "identical": [[...], ...]} one group a line, then
                {"path", "error"}; csv/tsv group,path,min_score,identical,error (one row per image;
                `identical` numbers the byte-identical set the image belongs to within its group)
"""

from __future__ import annotations

import csv
from typing import IO, TYPE_CHECKING

from zsclip.cli._writers import path_budget, shorten_left
from zsclip.errors import UserError
from zsclip.escapes import csv_text, for_display, json_text
from zsclip.jobs.scores import rounded_score

if TYPE_CHECKING:
    from zsclip.jobs.duplicates import Group
    from zsclip.jobs.search import Hit


def _delimited(stream: IO[str], fmt: str):
    delimiter = "," if fmt == "csv" else "\t"
    return csv.writer(stream, delimiter=delimiter, quoting=csv.QUOTE_MINIMAL, lineterminator="\n")


# ------------------------------------------------------------------------------ search


def hit_record(hit: "Hit") -> dict:
    if hit.error is not None:
        return {"path": hit.path, "error": hit.error}
    return {"path": hit.path, "score": rounded_score(hit.score)}


class HitWriter:
    """One ranked row at a time; `table` collects them and prints at close."""

    def __init__(self, fmt: str, stream: IO[str]) -> None:
        if fmt not in ("jsonl", "csv", "tsv", "table"):
            raise UserError(f"unknown format {fmt!r}")
        self.fmt, self.stream = fmt, stream
        self.rows: list["Hit"] = []
        self.writer = _delimited(stream, fmt) if fmt in ("csv", "tsv") else None
        if self.writer is not None:
            self.writer.writerow(["path", "score", "error"])

    def write(self, hit: "Hit") -> None:
        if self.fmt == "table":
            self.rows.append(hit)
            return
        if self.writer is not None:
            score = "" if hit.score is None else f"{hit.score:.6f}"
            self.writer.writerow([csv_text(hit.path), score, csv_text(hit.error or "")])
        else:
            self.stream.write(json_text(hit_record(hit)) + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.fmt != "table":
            return
        cells = [
            (str(rank), for_display(hit.path), "" if hit.score is None else f"{hit.score:.3f}")
            for rank, hit in enumerate(self.rows, start=1)
        ]
        _print_table(
            self.stream,
            ("#", "path", "score"),
            cells,
            [hit.error for hit in self.rows],
        )


# ------------------------------------------------------------------------------ duplicates


def group_record(group: "Group") -> dict:
    return {
        "paths": group.paths,
        "min_score": rounded_score(group.min_score),
        "identical": group.identical,
    }


class GroupWriter:
    """One group at a time (csv/tsv: one row per image); `table` prints at close."""

    def __init__(self, fmt: str, stream: IO[str]) -> None:
        if fmt not in ("jsonl", "csv", "tsv", "table"):
            raise UserError(f"unknown format {fmt!r}")
        self.fmt, self.stream = fmt, stream
        self.count = 0
        self.rows: list[tuple[str, str, str, str | None]] = []
        self.writer = _delimited(stream, fmt) if fmt in ("csv", "tsv") else None
        if self.writer is not None:
            self.writer.writerow(["group", "path", "min_score", "identical", "error"])

    def write(self, group: "Group") -> None:
        self.count += 1
        sets = {path: str(n) for n, paths in enumerate(group.identical, start=1) for path in paths}
        if self.fmt == "table":
            for first, path in zip([True] + [False] * len(group.paths), group.paths):
                mark = f"= {sets[path]}" if path in sets else ""
                score = f"{group.min_score:.3f}" if first else ""
                label = str(self.count) if first else ""
                self.rows.append((label, for_display(path), f"{score} {mark}".strip(), None))
            return
        if self.writer is not None:
            for path in group.paths:
                score = f"{group.min_score:.6f}"
                self.writer.writerow([self.count, csv_text(path), score, sets.get(path, ""), ""])
        else:
            self.stream.write(json_text(group_record(group)) + "\n")
        self.stream.flush()

    def write_error(self, path: str, reason: str) -> None:
        if self.fmt == "table":
            self.rows.append(("", for_display(path), "", reason))
        elif self.writer is not None:
            self.writer.writerow(["", csv_text(path), "", "", csv_text(reason)])
        else:
            self.stream.write(json_text({"path": path, "error": reason}) + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.fmt == "table":
            cells = [row[:3] for row in self.rows]
            _print_table(
                self.stream, ("group", "path", "min score"), cells, [r[3] for r in self.rows]
            )


# ------------------------------------------------------------------------------ tables


def _print_table(
    stream: IO[str], header: tuple[str, str, str], cells: list, errors: list[str | None]
) -> None:
    """A three-column rich table (label, path, value); an error shows in red in the value column.
    Paths are shortened from the left when the terminal is narrow."""
    from rich.table import Table
    from rich.text import Text

    from zsclip.cli._output import stdout_console

    console = stdout_console(stream)
    shown = [
        (label, path, f"error: {for_display(e)}" if e else value, "")
        for (label, path, value), e in zip(cells, errors)
    ]
    # path_budget reserves room for classify's label/score/next columns: here value and label
    budget = path_budget([(p, v, lab, "") for lab, p, v, _ in shown], console.width)
    table = Table(show_edge=False, header_style="bold")
    table.add_column(header[0], justify="right", no_wrap=True)
    table.add_column(header[1], no_wrap=True)
    table.add_column(header[2], overflow="fold")
    for (label, path, value, _), error in zip(shown, errors):
        style = "red" if error else ""
        table.add_row(label, Text(shorten_left(path, budget)), Text(value, style=style))
    console.print(table)
