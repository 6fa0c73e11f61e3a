"""`zsclip classify --server URL` as a whole: the options that mean something when a running `zsclip
serve` does the work, checked and carried out. Shared by the Typer command (zsclip.cli.classify)
and the Typer-free fast path (zsclip.cli._quick), so both give the same output, errors and exit
status. Neither torch nor Typer is imported here: a call costs a Python start and one request.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional


@dataclass(frozen=True)
class ServerClassify:
    """The command line's choices, as given (defaults as `zsclip classify`'s)."""

    server: str
    inputs: Optional[list[str]] = None
    labels: Optional[str] = None
    labels_file: Optional[Path] = None
    templates: Optional[str] = None
    top_k: int = 5
    multi_label: bool = False
    threshold: Optional[float] = None
    min_score: Optional[float] = None
    fmt: Optional[str] = None
    output: Optional[Path] = None
    report: Optional[Path] = None
    batch_size: int = 32  # images per request, at most (see RemoteClassify.batch_size)
    exact_preprocess: bool = False
    xmp: bool = False
    quiet: bool = False

    def run(self) -> None:
        """Check everything given before any work, then classify on the server and write the rows;
        exits 1 when some inputs could not be read, 4 when no server answers."""
        from zsclip.cli._choices import Choices
        from zsclip.cli._output import stdout_is_terminal, warn
        from zsclip.cli._predictions import Sinks, write_predictions
        from zsclip.cli._remote import RemoteClassify, classify_remote
        from zsclip.cli._runtime import check_outputs, gather_inputs
        from zsclip.cli._writers import choose_format
        from zsclip.jobs.classify import tagged
        from zsclip.jobs.scores import ClassifyOptions

        choices = Choices(
            self.labels, self.labels_file, self.templates, self.multi_label, self.threshold
        )
        labels, _ = choices.check()
        check_outputs(
            {"--output": self.output, "--report": self.report}, to_stdout=self.output is None
        )
        chosen_format = choose_format(self.fmt, self.output, stdout_is_terminal())
        items = gather_inputs(self.inputs, self.quiet)
        if not items:
            warn(
                "no images found in the INPUT given (folders are searched for image file extensions)"
            )
            return
        request = RemoteClassify(
            labels=labels,
            templates=self.templates,
            top_k=self.top_k,
            multi_label=self.multi_label,
            threshold=self.threshold,
            exact_preprocess=self.exact_preprocess,
            batch_size=self.batch_size,
            min_score=self.min_score,
        )
        run = classify_remote(self.server, items, request, warn)
        options = ClassifyOptions(
            top_k=self.top_k, multi_label=self.multi_label, min_score=self.min_score
        )
        sinks = Sinks(
            chosen_format, self.output, self.report, self.quiet, thumbnails_from_files=True
        )
        # --xmp sidecars are written here, beside the images
        predictions = tagged(run.predictions, self.multi_label, self.xmp)
        write_predictions(predictions, run.total, labels, options, sinks, run.model)
