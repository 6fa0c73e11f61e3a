"""The terminal side of `zsclip train`: signals, the progress bar on stderr, and the closing summary."""

from __future__ import annotations

import signal
from contextlib import contextmanager
from typing import Any, Iterator

from zsclip.cli._output import error_line, note, stderr_console, stderr_is_terminal, warn

# the stop signals and the exit status of a run they stopped (128 + the signal's number)
EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGHUP: 129}


@contextmanager
def stop_on_signals() -> Iterator[dict]:
    """Ctrl-C, SIGTERM and SIGHUP (a closed terminal) ask the loop to save and stop after the current
    step; a second Ctrl-C aborts at once. A signal the caller ignores (nohup) stays ignored."""
    received: dict[str, Any] = {"signal": None}

    def handler(signum: int, frame: Any) -> None:
        if received["signal"] is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        received["signal"] = signum

    previous = {
        sig: signal.signal(sig, handler)
        for sig in EXIT_CODES
        if signal.getsignal(sig) is not signal.SIG_IGN
    }
    try:
        yield received
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def run_training(
    config: Any, *, resume: bool, quiet: bool, given: frozenset[str] = frozenset()
) -> int:
    """Run the job; returns the exit code (0 done, 130/143/129 stopped by a signal after saving).

    Under torchrun only rank 0 shows progress, notes, warnings and the errors it found for all
    (the other ranks exit with the same code, silently); every process leaves the process group.
    """
    from zsclip.train.distributed import is_main, shutdown
    from zsclip.train.parallel import RankZeroError

    main = is_main()
    try:
        return _run(config, resume=resume, quiet=quiet or not main, main=main, given=given)
    except RankZeroError as err:
        return err.exit_code
    finally:
        shutdown()


def _run(config: Any, *, resume: bool, quiet: bool, main: bool, given: frozenset[str]) -> int:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    from zsclip.train.data import DataError
    from zsclip.train.loop import Hooks, prepare

    # The bar starts only once the data checks and set-up have passed, so errors print on a clean
    # terminal. It is drawn on a terminal only: a log file gets the notes, and log.jsonl has every
    # step.
    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"),
        console=stderr_console(),
        disable=quiet or not stderr_is_terminal(),
        transient=False,
    )
    task = bar.add_task("training", total=None, status="")

    def on_start(start: int, total: int) -> None:
        bar.update(task, completed=start, total=total)
        if start and start >= total:
            note(
                f"the run already reached its last step ({total}); give a larger --steps or "
                "--epochs with --resume to train it further",
                quiet=quiet,
            )
        elif start:
            note(f"resuming at step {start} of {total}", quiet=quiet)

    def on_step(record: dict) -> None:
        status = f"loss {record['loss']:.4f}  scale {record['logit_scale']:.1f}  {record['images_per_s']:.0f} img/s"
        bar.update(task, completed=record["step"], status=status)

    def on_validation(record: dict) -> None:
        shown = {k: v for k, v in record.items() if k not in ("event", "step")}
        note(
            "step {}: ".format(record["step"])
            + ", ".join(f"{k} {v:.3f}" for k, v in shown.items()),
            quiet=quiet,
        )

    with stop_on_signals() as received:
        hooks = Hooks(
            warn=warn if main else (lambda message: None),
            note=lambda m: note(m, quiet=quiet),
            on_start=on_start,
            on_step=on_step,
            on_validation=on_validation,
            should_stop=lambda: received["signal"] is not None,
        )
        try:
            run = prepare(config, resume=resume, hooks=hooks, given=given)
        except DataError as err:
            show_problems(err)
            raise
        with bar:
            result = run.train()
    if result.interrupted:
        note(
            f"stopped at step {result.step} of {result.total_steps}; saved. Continue with the same command "
            f"and --resume",
            quiet=not main,
        )
        return EXIT_CODES.get(received["signal"], 130)
    note(
        f"done: {result.step} steps in {result.seconds:.0f} s; model: {result.output / 'model.safetensors'}",
        quiet=quiet,
    )
    return 0


def show_problems(err: Any) -> None:
    """The problems of a zsclip.train.data.DataError, one line each (the first SHOWN_PROBLEMS)."""
    from zsclip.train.data import SHOWN_PROBLEMS

    for problem in err.problems[:SHOWN_PROBLEMS]:
        error_line(problem)
    if len(err.problems) > SHOWN_PROBLEMS:
        error_line(f"... and {len(err.problems) - SHOWN_PROBLEMS} more")
