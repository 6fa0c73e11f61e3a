"""What classify and embed print: predictions as jsonl, csv, tsv or a table, and embeddings as jsonl or
tsv.

Machine formats are plain writes (json, csv modules); only `table` goes through rich, for a person
at a terminal. The embedding *files* (.npy, .safetensors, .jsonl) are zsclip.jobs.embedding_files:
jobs read them back.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import IO, TYPE_CHECKING

from zsclip.errors import UserError
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
        return _SUFFIX_FORMATS.get(output.suffix.lower(), "jsonl")
    return "table" if stdout_tty else "jsonl"


# -----------------------------------------------------------------------------------------------
# predictions


class JsonlPredictions:
    def __init__(self, stream: IO[str], top_k: int) -> None:
        self.stream = stream

    def write(self, prediction: "Prediction") -> None:
        self.stream.write(json.dumps(prediction_record(prediction), ensure_ascii=False) + "\n")
        self.stream.flush()

    def close(self) -> None:
        pass


class DelimitedPredictions:
    """csv or tsv: path,label,score,label_2,score_2,...,error -- quoted wherever a field needs it."""

    def __init__(self, stream: IO[str], top_k: int, delimiter: str) -> None:
        self.stream, self.top_k = stream, top_k
        self.writer = csv.writer(
            stream, delimiter=delimiter, quoting=csv.QUOTE_MINIMAL, lineterminator="\n"
        )
        header = ["path", "label", "score"]
        for rank in range(2, top_k + 1):
            header += [f"label_{rank}", f"score_{rank}"]
        self.writer.writerow(header + ["error"])

    def write(self, prediction: "Prediction") -> None:
        cells: list[str] = [prediction.path]
        for rank in range(self.top_k):
            if rank < len(prediction.top):
                label, score = prediction.top[rank]
                cells += [label, f"{score:.6f}"]
            else:
                cells += ["", ""]
        self.writer.writerow(cells + [prediction.error or ""])
        self.stream.flush()

    def close(self) -> None:
        pass


class TablePredictions:
    """A rich table for people, printed once all rows are in (column widths need every row)."""

    def __init__(self, stream: IO[str], top_k: int) -> None:
        self.rows: list["Prediction"] = []

    def write(self, prediction: "Prediction") -> None:
        self.rows.append(prediction)

    def close(self) -> None:
        from rich.table import Table
        from rich.text import Text

        from zsclip.cli._output import stdout_console

        table = Table(show_edge=False, header_style="bold")
        for name in ("path", "label", "score", "next"):
            table.add_column(name, overflow="fold", justify="right" if name == "score" else "left")
        for row in self.rows:
            if row.error is not None:
                table.add_row(Text(row.path), Text(f"error: {row.error}", style="red"), "", "")
                continue
            rest = ", ".join(f"{label} {score:.2f}" for label, score in row.top[1:])
            label = Text(
                row.label or "(none above threshold)", style="bold" if row.label else "dim"
            )
            score = "" if row.score is None else f"{row.score:.3f}"
            table.add_row(Text(row.path), label, score, Text(rest))
        stdout_console().print(table)


def prediction_writer(fmt: str, stream: IO[str], top_k: int):
    if fmt == "jsonl":
        return JsonlPredictions(stream, top_k)
    if fmt in ("csv", "tsv"):
        return DelimitedPredictions(stream, top_k, "," if fmt == "csv" else "\t")
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
            self.writer.writerow([item.key] + values)
        self.stream.flush()

    def close(self, ok: bool = True) -> None:
        pass
