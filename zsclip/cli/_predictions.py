"""Where `classify`'s predictions go (stdout or --output, in the chosen format, and the HTML report):
one writer for a local run and for `classify --server` (zsclip.cli._classify_server), so both
write the same bytes. No Typer here."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional


@dataclass(frozen=True)
class Sinks:
    """Where the predictions go: stdout or --output in `fmt`, and the optional HTML report."""

    fmt: str
    output: Optional[Path]
    report: Optional[Path]
    quiet: bool
    thumbnails_from_files: bool  # no images were decoded here: report thumbnails read the files


def write_predictions(
    predictions, total: int, label_list, options, sinks: Sinks, model_name: str
) -> None:
    """Write every prediction, then the report; exit status 1 when some inputs could not be read."""
    from zsclip.cli._runtime import finish, output_stream, write_rows
    from zsclip.cli._writers import prediction_writer

    kept: list = []
    with output_stream(sinks.output) as stream:
        writer = prediction_writer(
            sinks.fmt, stream, min(options.top_k, len(label_list)), judging_columns(options)
        )

        def write(prediction) -> None:
            writer.write(prediction)
            if sinks.report is not None:
                kept.append(prediction)

        failures = write_rows(
            predictions,
            write,
            total=total,
            description="classifying",
            quiet=sinks.quiet,
            error_of=failure_of,
        )
        writer.close()
    if sinks.report is not None:
        _write_report(
            sinks.report,
            kept,
            label_list,
            model_name,
            options.multi_label,
            sinks.thumbnails_from_files,
        )
    finish(failures, total, sinks.quiet)


def judging_columns(options) -> tuple[str, ...]:
    """The csv/tsv columns that --min-score and --other add (zsclip.cli._writers)."""
    columns: tuple[str, ...] = ()
    if options.min_score is not None or options.others:
        columns += ("best", "best_score")
    if options.others:
        columns += ("other",)
    return columns


def failure_of(prediction) -> tuple[str, str] | None:
    """An input that could not be read, or whose sidecar could not be written (--xmp)."""
    if prediction.error is not None:
        return prediction.path, prediction.error
    if prediction.sidecar_error is not None:
        return prediction.path, prediction.sidecar_error
    return None


def _write_report(path, predictions, label_list, model_name, multi_label, from_files) -> None:
    from zsclip.cli._report import thumbnail_for, write_report

    if from_files:  # nothing was decoded here: read thumbnails from the files if still there
        for prediction in predictions:
            if prediction.error is None:
                prediction.thumbnail = thumbnail_for(prediction.path)
    write_report(path, predictions, label_list, model_name=model_name, multi_label=multi_label)
