"""What classify and embed print: predictions as jsonl, csv, tsv or a table, and embeddings as jsonl or
tsv.

Machine formats are plain writes (json, csv modules); only `table` goes through rich, for a person
at a terminal. The embedding *files* (.npy, .safetensors, .jsonl) are zsclip.jobs.embedding_files:
jobs read them back.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from zsclip.errors import UserError
from zsclip.escapes import csv_text, for_display, json_text
from zsclip.jobs.classify import prediction_record
from zsclip.jobs.embedding_files import embedding_line

if TYPE_CHECKING:
    from zsclip.jobs.classify import Prediction
    from zsclip.jobs.embed import Embedding

PREDICTION_FORMATS = ("table", "jsonl", "csv", "tsv")
_SUFFIX_FORMATS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
    ".csv": "csv",
    ".tsv": "tsv",
    ".tab": "tsv",
    ".txt": "tsv",
}


def choose_format(requested: str | None, output: Path | None, stdout_tty: bool) -> str:
    """--format if given; else from --output's suffix; else table on a terminal and jsonl in a pipe."""
    if requested is not None:
        fmt = requested.strip().lower()
        if fmt not in PREDICTION_FORMATS:
            raise UserError(
                f"unknown --format {requested!r}: use one of {', '.join(PREDICTION_FORMATS)}"
            )
        if fmt == "table" and output is not None:
            raise UserError("--format table is for the terminal; write files as jsonl, csv or tsv")
        return fmt
    if output is not None:
        return _format_of_output(output)
    return "table" if stdout_tty else "jsonl"


def _format_of_output(output: Path) -> str:
    """The format named by --output's suffix. A device, FIFO or /dev/stdout without one gets jsonl,
    like a pipe; a file with an unknown suffix is an error (a .xlsx must not silently hold jsonl)."""
    from zsclip.atomic import is_regular_target

    suffix = output.suffix.lower()
    if suffix in _SUFFIX_FORMATS:
        return _SUFFIX_FORMATS[suffix]
    if not is_regular_target(output):
        return "jsonl"
    known = ", ".join(sorted(_SUFFIX_FORMATS))
    what = f"its suffix {output.suffix!r} names no format" if suffix else "it has no suffix"
    raise UserError(
        f"--output {str(output)!r}: {what}; name the file {known}, or give --format jsonl, csv or tsv"
    )


# -----------------------------------------------------------------------------------------------
# predictions


class JsonlPredictions:
    """One JSON object a line, UTF-8; a path that is not valid UTF-8 keeps its bytes as \\udcNN
    escapes (zsclip.escapes)."""

    def __init__(self, stream: IO[str], top_k: int) -> None:
        self.stream = stream

    def write(self, prediction: "Prediction") -> None:
        self.stream.write(json_text(prediction_record(prediction)) + "\n")
        self.stream.flush()

    def close(self) -> None:
        pass


class DelimitedPredictions:
    """csv or tsv: path,label,score,label_2,score_2,...,error -- quoted wherever a field needs it; the
    bytes of a name that are not UTF-8 are written as \\xNN (zsclip.escapes.csv_text).

    `label` and `score` are the answer, empty when none was accepted; label_2... are the runners-up.
    `extra` columns go before `error`: best,best_score (the top label whether accepted or not, with
    --min-score or --other) and other (the best background label's score, with --other)."""

    def __init__(
        self, stream: IO[str], top_k: int, delimiter: str, extra: tuple[str, ...] = ()
    ) -> None:
        self.stream, self.top_k, self.extra = stream, top_k, extra
        self.writer = csv.writer(
            stream, delimiter=delimiter, quoting=csv.QUOTE_MINIMAL, lineterminator="\n"
        )
        header = ["path", "label", "score"]
        for rank in range(2, top_k + 1):
            header += [f"label_{rank}", f"score_{rank}"]
        self.writer.writerow(header + list(extra) + ["error"])

    def write(self, prediction: "Prediction") -> None:
        cells: list[str] = [csv_text(prediction.path)]
        answer = prediction.label
        cells += ["", ""] if answer is None else [csv_text(answer), f"{prediction.score:.6f}"]
        for rank in range(1, self.top_k):
            if rank < len(prediction.top):
                label, score = prediction.top[rank]
                cells += [csv_text(label), f"{score:.6f}"]
            else:
                cells += ["", ""]
        cells += [self._extra(name, prediction) for name in self.extra]
        self.writer.writerow(cells + [csv_text(prediction.error or "")])
        self.stream.flush()

    @staticmethod
    def _extra(name: str, prediction: "Prediction") -> str:
        if name == "other":
            return "" if prediction.other is None else f"{prediction.other:.6f}"
        if not prediction.top:
            return ""
        best, best_score = prediction.top[0]
        return csv_text(best) if name == "best" else f"{best_score:.6f}"

    def close(self) -> None:
        pass


class TablePredictions:
    """A rich table for people, printed once all rows are in (column widths need every row).

    Names are shown escaped (zsclip.escapes.for_display). When the terminal is too narrow, paths are
    shortened from the left (`…/sub/alpha_circle.png`): the end of a path tells files apart."""

    def __init__(self, stream: IO[str], top_k: int) -> None:
        self.stream = stream
        self.rows: list["Prediction"] = []

    def write(self, prediction: "Prediction") -> None:
        self.rows.append(prediction)

    def _cells(self, row: "Prediction") -> tuple[str, str, str, str]:
        if row.error is not None:
            return for_display(row.path), f"error: {for_display(row.error)}", "", ""
        if row.unsure:  # scored, none accepted: every candidate is a runner-up
            shown = row.top if row.other is None else [("(other)", row.other)] + row.top
            rest = ", ".join(f"{for_display(label)} {score:.2f}" for label, score in shown)
            return for_display(row.path), "(unsure)", "", rest
        rest = ", ".join(f"{for_display(label)} {score:.2f}" for label, score in row.top[1:])
        label = for_display(row.label) if row.label else "(none above threshold)"
        score = "" if row.score is None else f"{row.score:.3f}"
        return for_display(row.path), label, score, rest

    def close(self) -> None:
        from rich.table import Table
        from rich.text import Text

        from zsclip.cli._output import stdout_console

        console = stdout_console(self.stream)
        cells = [self._cells(row) for row in self.rows]
        budget = path_budget(cells, console.width)
        table = Table(show_edge=False, header_style="bold")
        table.add_column("path", no_wrap=True, min_width=min(budget, _widest(cells, 0, "path")))
        table.add_column("label", overflow="fold")
        table.add_column("score", justify="right", no_wrap=True)
        table.add_column("next", overflow="fold")
        for row, (path, label, score, rest) in zip(self.rows, cells):
            path_text = Text(shorten_left(path, budget))
            if row.error is not None:
                table.add_row(path_text, Text(label, style="red"), "", "")
            else:
                style = "bold" if row.label else "dim"
                table.add_row(path_text, Text(label, style=style), score, Text(rest))
        console.print(table)


_TABLE_FRAME = 11  # 4 columns x 2 spaces of padding + 3 separators (no outer edge)
# Before a path is shortened, the label and runners-up columns give up width down to these (they
# wrap between words); a path never gets fewer columns than _PATH_MIN.
_LABEL_SHARE, _NEXT_SHARE, _PATH_MIN = 24, 12, 12


def _widest(cells: list[tuple[str, ...]], column: int, header: str) -> int:
    from rich.cells import cell_len

    return max([cell_len(header)] + [cell_len(row[column]) for row in cells])


def path_budget(cells: list[tuple[str, ...]], width: int) -> int:
    """Columns the path gets: what the other columns leave of `width`, taking at most a fair share
    for the label and the runners-up (they wrap), but never less than _PATH_MIN."""
    others = (
        min(_widest(cells, 1, "label"), _LABEL_SHARE)
        + _widest(cells, 2, "score")
        + min(_widest(cells, 3, "next"), _NEXT_SHARE)
    )
    return max(_PATH_MIN, width - _TABLE_FRAME - others)


def shorten_left(path: str, width: int) -> str:
    """`path` in at most `width` terminal columns: whole, else `…/` and as many trailing folders as
    fit before the file name, else `…` and the end of the file name."""
    from rich.cells import cell_len

    if cell_len(path) <= width:
        return path
    parts = path.split("/")
    tail = parts[-1]
    for part in reversed(parts[:-1]):
        if cell_len(f"…/{part}/{tail}") > width:
            break
        tail = f"{part}/{tail}"
    if cell_len(f"…/{tail}") <= width:
        return f"…/{tail}"
    kept = ""
    for char in reversed(tail):  # by terminal cells, so wide characters count double
        if cell_len(char + kept) > width - 1:
            break
        kept = char + kept
    return "…" + kept


def prediction_writer(fmt: str, stream: IO[str], top_k: int, extra: tuple[str, ...] = ()):
    """`extra`: the csv/tsv columns of DelimitedPredictions beyond the ranking."""
    if fmt == "jsonl":
        return JsonlPredictions(stream, top_k)
    if fmt in ("csv", "tsv"):
        return DelimitedPredictions(stream, top_k, "," if fmt == "csv" else "\t", extra)
    if fmt == "table":
        return TablePredictions(stream, top_k)
    raise UserError(f"unknown format {fmt!r}")


# -----------------------------------------------------------------------------------------------
# embeddings


class EmbeddingStream:
    """embed's stdout: jsonl records, or tsv (key then one column per dimension, header e0..eN)."""

    def __init__(self, stream: IO[str], fmt: str) -> None:
        if fmt not in ("jsonl", "tsv"):
            raise UserError(
                f"unknown --format {fmt!r} for embed: use jsonl or tsv (or --output FILE.npy)"
            )
        self.stream, self.fmt = stream, fmt
        self.writer = (
            csv.writer(stream, delimiter="\t", lineterminator="\n") if fmt == "tsv" else None
        )
        self.header_done = False

    def write(self, item: "Embedding") -> None:
        if self.fmt == "jsonl":
            self.stream.write(embedding_line(item))
        elif item.error is None:  # tsv has no place for errors; they are on stderr
            values = [f"{value:.9g}" for value in item.vector.tolist()]
            if not self.header_done:
                self.writer.writerow([item.kind] + [f"e{index}" for index in range(len(values))])
                self.header_done = True
            self.writer.writerow([csv_text(item.key)] + values)
        self.stream.flush()

    def close(self, ok: bool = True) -> None:
        pass


# -----------------------------------------------------------------------------------------------
# plain records (sort's rows)


class RecordWriter:
    """Flat records with fixed `columns`: jsonl (the keys that are set, in column order), csv/tsv
    (a header, then every column), or a table for people printed at the end."""

    def __init__(
        self, fmt: str, stream: IO[str], columns: tuple[str, ...], shown: Any = None
    ) -> None:
        """`shown`: for the table, a function from a record to the {column: text} to show."""
        if fmt not in PREDICTION_FORMATS:
            raise UserError(f"unknown format {fmt!r}")
        self.fmt, self.stream, self.columns = fmt, stream, columns
        self.shown = shown or (lambda record: record)
        self.rows: list[dict[str, Any]] = []
        self.writer = None
        if fmt in ("csv", "tsv"):
            delimiter = "," if fmt == "csv" else "\t"
            self.writer = csv.writer(stream, delimiter=delimiter, lineterminator="\n")
            self.writer.writerow(columns)

    def write(self, record: dict[str, Any]) -> None:
        if self.fmt == "jsonl":
            self.stream.write(json_text(record) + "\n")
        elif self.writer is not None:
            self.writer.writerow([_cell(record.get(column)) for column in self.columns])
        else:
            self.rows.append(record)
            return
        self.stream.flush()

    def close(self) -> None:
        if self.fmt != "table":
            return
        from rich.table import Table
        from rich.text import Text

        from zsclip.cli._output import stdout_console

        console = stdout_console(self.stream)
        shown = [self.shown(record) for record in self.rows]
        columns = list(shown[0]) if shown else list(self.columns)
        cells = [[_cell(row.get(column), for_display) for column in columns] for row in shown]
        widths = [_widest(cells, index, name) for index, name in enumerate(columns)]
        # paths (the first column, and "to") share what the other columns leave, shortened
        # from the left, so the file names stay in sight
        paths = [index for index, name in enumerate(columns) if index == 0 or name == "to"]
        rest = sum(min(w, _LABEL_SHARE) for i, w in enumerate(widths) if i not in paths)
        room = console.width - 3 * len(columns) - rest
        # with two, the destination gets the larger share: its folder is the answer
        budgets = {
            i: max(_PATH_MIN, room * (2 if i else 1) // (3 if len(paths) > 1 else 1)) for i in paths
        }
        table = Table(show_edge=False, header_style="bold")
        for index, column in enumerate(columns):
            table.add_column(column, no_wrap=index in paths, overflow="fold")
        for record, row in zip(self.rows, cells):
            style = "red" if record.get("error") else ""
            texts = [shorten_left(c, budgets[i]) if i in paths else c for i, c in enumerate(row)]
            table.add_row(*(Text(text, style) for text in texts))
        console.print(table)


def _cell(value: Any, text=csv_text) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6f}"
    if isinstance(value, (list, tuple)):
        return "; ".join(text(str(item)) for item in value)
    return text(str(value))
