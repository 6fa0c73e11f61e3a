"""`zsclip sort`: classify images and copy, move or link each into DEST/<label>/, safely and
undoably (zsclip.jobs.sort; docs/acting.md)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from zsclip.cli._choices import Choices
from zsclip.cli._classifying import (
    LabelsFileOpt,
    LabelsOpt,
    MinScoreOpt,
    MultiLabelOpt,
    OtherFileOpt,
    OtherOpt,
    TemplatesOpt,
    ThresholdOpt,
)
from zsclip.cli._fewshot import ExamplesOpt, HeadOpt
from zsclip.cli._options import (
    BatchSizeOpt,
    CacheOpt,
    DeviceOpt,
    ExactPreprocessOpt,
    InputsArg,
    ModelOpt,
    OfflineOpt,
    PrecisionOpt,
    QuietOpt,
    VocabOpt,
    WorkersOpt,
)

EPILOG = """\b
Examples:
  zsclip sort photos/ --to sorted/ --labels "cat,dog,car" --min-score 0.6      # copies
  zsclip sort photos/ --to sorted/ -L classes.txt --move --dry-run             # show the plan
  zsclip sort --undo sorted/.zsclip-sort/20250101T120000.000000Z.jsonl

\b
Each image goes to DEST/<label>/<its file name>; images below --min-score (or whose best label is a
--other one) go to DEST/unsure/. A taken name gets -2, -3, ...: nothing is ever overwritten. Every
step is written to a manifest in DEST/.zsclip-sort/ before it happens: after a crash, running the
same command again finishes the job, and --undo MANIFEST puts everything back. With --multi-label an
image goes to the folder of its best label that passes the threshold.
Exit status: 0 all done, 1 some images could not be read or filed (they stay where they are) or
undo left some files, 2 usage error."""

_COLUMNS = ("path", "label", "score", "to", "action", "error")
_UNDO_COLUMNS = ("path", "to", "result")


def register(app: typer.Typer) -> None:
    app.command("sort", epilog=EPILOG)(sort_command)


def sort_command(
    inputs: InputsArg = None,
    to: Annotated[
        Optional[Path],
        typer.Option(
            "--to",
            metavar="DEST",
            help="Destination folder: one subfolder per label, and unsure/.",
        ),
    ] = None,
    labels: LabelsOpt = None,
    labels_file: LabelsFileOpt = None,
    templates: TemplatesOpt = None,
    multi_label: MultiLabelOpt = False,
    threshold: ThresholdOpt = None,
    min_score: MinScoreOpt = None,
    other: OtherOpt = None,
    other_file: OtherFileOpt = None,
    examples: ExamplesOpt = None,
    head: HeadOpt = None,
    copy: Annotated[bool, typer.Option("--copy", help="Copy the images (the default).")] = False,
    move: Annotated[bool, typer.Option("--move", help="Move the images.")] = False,
    link: Annotated[
        bool, typer.Option("--link", help="Leave the images; make symlinks to them.")
    ] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", "-n", help="Print the plan; touch nothing.")
    ] = False,
    undo: Annotated[
        Optional[Path],
        typer.Option(
            "--undo",
            metavar="MANIFEST",
            help="Put back everything the sort of this manifest did (DEST/.zsclip-sort/*.jsonl).",
        ),
    ] = None,
    model: ModelOpt = None,
    vocab: VocabOpt = None,
    fmt: Annotated[
        Optional[str],
        typer.Option(
            "--format", "-f", help="table, jsonl, csv or tsv (default: table on a terminal)."
        ),
    ] = None,
    output: Annotated[
        Optional[Path], typer.Option("--output", "-o", help="Write the rows to this file.")
    ] = None,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "fp32",
    batch_size: BatchSizeOpt = 32,
    workers: WorkersOpt = None,
    exact_preprocess: ExactPreprocessOpt = False,
    cache: CacheOpt = True,
    quiet: QuietOpt = False,
    offline: OfflineOpt = False,
) -> None:
    """Sort images into one folder per label (copy, move or link), with a manifest to undo it."""
    from zsclip.cli._output import stdout_is_terminal
    from zsclip.cli._runtime import check_outputs
    from zsclip.cli._writers import choose_format
    from zsclip.errors import UserError

    check_outputs({"--output": output}, to_stdout=output is None)
    chosen = choose_format(fmt, output, stdout_is_terminal())
    if undo is not None:
        if inputs or to is not None or dry_run or copy or move or link:
            raise UserError(
                "--undo MANIFEST takes no INPUT, --to, --dry-run or --copy/--move/--link"
            )
        _undo(undo, chosen, output, quiet)
        return
    if to is None:
        raise UserError("give --to DEST, the folder to sort into")
    if not inputs:
        raise UserError("no INPUT: give image files, folders, or - to read paths from stdin")
    if sum((copy, move, link)) > 1:
        raise UserError("give one of --copy, --move and --link")
    from zsclip.cli._fewshot import FewShot, run_labels

    head_labels = head is not None and labels is None and labels_file is None  # the head's own
    label_list = None if head_labels else run_labels(labels, labels_file, examples)
    few, label_list = FewShot.check(examples, head, label_list, templates)
    choices = Choices(
        labels, labels_file, templates, multi_label, threshold, min_score, other, other_file,
        given=tuple(label_list),
    )  # fmt: skip
    taught = {"examples": examples, "head": head}  # a rerun must be taught the same way
    settings = _settings(
        choices, to, "move" if move else "link" if link else "copy", model, dry_run, taught
    )
    run = _Run(
        inputs, choices, settings, chosen, output, quiet, few,
        dict(model=model, vocab=vocab, device=device, precision=precision, offline=offline),
        dict(batch_size=batch_size, workers=workers, exact=exact_preprocess, cache=cache),
    )  # fmt: skip
    run.go()


def _settings(
    choices: Choices, to: Path, mode: str, model: str | None, dry_run: bool, taught: dict
):
    """The sort's settings; `request` is what must match for a rerun to carry on a crashed run."""
    from zsclip.jobs.sort import SortSettings

    label_list, others = choices.check()
    request = {
        "labels": label_list,
        "others": list(others),
        **{
            key: str(value) if isinstance(value, Path) else value
            for key, value in vars(choices).items()
            if key not in ("labels", "labels_file", "other", "other_file", "given")
        },
        **{key: os.path.abspath(value) for key, value in taught.items() if value is not None},
        "model": model or os.environ.get("ZSCLIP_MODEL") or "",
    }
    dest = os.path.abspath(os.fspath(to))
    return SortSettings(dest=dest, mode=mode, request=request, dry_run=dry_run)


@dataclass
class _Run:
    """One `zsclip sort` run: open the sorter (lock, recovery), gather, classify, file, write."""

    inputs: Optional[list[str]]
    choices: Choices
    settings: Any  # zsclip.jobs.sort.SortSettings
    fmt: str
    output: Optional[Path]
    quiet: bool
    few: Any  # zsclip.cli._fewshot.FewShot: --examples / --head, read before the model
    load: dict  # keyword arguments of load_for_inference
    pipeline: dict  # batch_size, workers, exact, cache

    def go(self) -> None:
        from zsclip.cli._output import note
        from zsclip.jobs.sort import Sorter, label_folders

        label_list, _ = self.choices.check()
        folders = label_folders(label_list)
        notes = lambda message: note(f"zsclip: {message}", quiet=self.quiet)  # noqa: E731
        with Sorter(self.settings, folders, note=notes) as sorter:
            args = list(self.inputs or [])
            gone = [arg for arg in args if arg != "-" and sorter.missing_but_done(arg)]
            rows = sorter.done_rows(gone)
            args = [arg for arg in args if arg not in gone]
            items = self._gather(args)
            pending, already = sorter.triage(items)
            rows += already
            failures = self._write(rows, sorter, pending, label_list)
        self._finish(sorter, failures, len(rows) + len(pending))

    def _gather(self, args):
        from zsclip.cli._runtime import gather_inputs

        return gather_inputs(args, self.quiet) if args else []

    def _predictions(self, pending, label_list):
        """Classify the pending images (the model is loaded only when there are some)."""
        from zsclip.cli._choices import warn_about_labels
        from zsclip.cli._fewshot import report_head
        from zsclip.cli._output import warn
        from zsclip.cli._runtime import cache_summary, load_for_inference
        from zsclip.jobs import classify as job
        from zsclip.jobs.pipeline import DecodeOptions, default_workers

        loaded, torch_device, dtype = load_for_inference(
            **self.load, quiet=self.quiet, announce=False
        )
        _, others = self.choices.check()
        few, multi_label = self.few, self.choices.multi_label
        taught = {label for label, count in zip(label_list, few.counts(label_list)) if count}
        warn_about_labels(loaded, label_list, multi_label, self.quiet, others, taught)
        workers = self.pipeline["workers"]
        workers = default_workers() if workers is None else workers
        batch_size, use_cache = self.pipeline["batch_size"], self.pipeline["cache"]
        decode = DecodeOptions.for_model(loaded.preprocess.image_size, exact=self.pipeline["exact"])
        template_choice = few.templates(loaded, self.choices.templates)
        request = job.ClassifyRequest(
            labels=label_list,
            templates=template_choice,
            items=pending,
            options=self.choices.options(loaded, top_k=1),
            batch_size=batch_size,
            workers=workers,
            decode=decode,
            use_cache=use_cache,
            examples=few.source(
                template_choice, decode, batch_size=batch_size, workers=workers, use_cache=use_cache
            ),
            head=few.head,
        )
        run = job.start(loaded, request, device=torch_device, dtype=dtype, warn=warn)
        source = "--examples" if few.head is None else f"--head {few.head_path}"
        threshold = request.options.threshold
        report_head(
            run.head, source=source, multi_label=multi_label, threshold=threshold, quiet=self.quiet
        )
        try:
            yield from run.predictions
        finally:
            cache_summary(run.cache, self.quiet)

    def _write(self, rows, sorter, pending, label_list) -> int:
        from zsclip.cli._runtime import output_stream, write_rows
        from zsclip.cli._writers import RecordWriter

        def placed():
            yield from rows
            if pending:
                for prediction in self._predictions(pending, label_list):
                    yield sorter.place(prediction)

        with output_stream(self.output) as stream:
            writer = RecordWriter(self.fmt, stream, _COLUMNS, self._shown)
            failures = write_rows(
                placed(),
                lambda row: writer.write(_record(row)),
                total=len(rows) + len(pending),
                description="sorting",
                quiet=self.quiet,
                error_of=lambda row: None if row.error is None else (row.path, row.error),
            )
            writer.close()
        return failures

    def _shown(self, record: dict) -> dict:
        """A row for people: the destination below DEST, the error in the label's place."""
        to = record.get("to")
        if to is not None and to.startswith(self.settings.dest.rstrip("/") + "/"):
            to = to[len(self.settings.dest.rstrip("/")) + 1 :]
        if "error" in record:
            label, to = f"error: {record['error']}", "(stays)"
        else:
            label = record["label"] if record["label"] is not None else "(unsure)"
        score = record.get("score")
        return {
            "path": record["path"],
            "label": label,
            "score": "" if score is None else f"{score:.3f}",
            "to": to,
            "action": record.get("action", ""),
        }

    def _finish(self, sorter, failures: int, total: int) -> None:
        from zsclip.cli._output import note

        if sorter.manifest_path is not None and not self.settings.dry_run:
            note(
                f"zsclip: manifest {sorter.manifest_path}; undo with: zsclip sort --undo "
                f"{sorter.manifest_path}",
                quiet=self.quiet,
            )
        if failures:
            note(
                f"zsclip: {failures} of {total} images could not be read or filed; they stay "
                "where they are (see the errors above)",
                quiet=self.quiet,
            )
            raise SystemExit(1)


def _record(row) -> dict:
    if row.error is not None:
        return {"path": row.path, "error": row.error}
    score = None if row.score is None else round(float(row.score), 6)
    return {
        "path": row.path,
        "label": row.label,
        "score": score,
        "to": row.to,
        "action": row.status,
    }


def _undo(manifest: Path, fmt: str, output: Path | None, quiet: bool) -> None:
    from zsclip.cli._output import error_line, note
    from zsclip.cli._runtime import output_stream, writing
    from zsclip.cli._writers import RecordWriter
    from zsclip.jobs.sort import undo

    left = total = 0
    with output_stream(output) as stream:
        writer = RecordWriter(fmt, stream, _UNDO_COLUMNS)
        for row in undo(os.fspath(manifest), lambda m: note(f"zsclip: {m}", quiet=quiet)):
            total += 1
            with writing("stdout" if output is None else str(output)):
                writer.write({"path": row.path, "to": row.to, "result": row.result})
            if row.left:
                left += 1
                error_line(f"{row.path}: {row.result}")
        writer.close()
    if left:
        note(f"zsclip: {left} of {total} files were left as they are (see above)", quiet=quiet)
        raise SystemExit(1)
    note(f"zsclip: undid {total} step(s) of {manifest}", quiet=quiet)
