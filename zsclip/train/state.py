"""What a training run keeps on disk, and how it is written so that a crash never loses a usable run.

OUT/model.safetensors  the latest complete model (a normal zsclip checkpoint: classify/embed/eval
load it as is) OUT/state.pt           everything needed to continue exactly: weights, optimizer,
step, RNG states, configuration OUT/log.jsonl          the configuration first, then one JSON object
per logged step (and per validation) OUT/report.html        charts of the log, refreshed at each
checkpoint

Writes go model first, then state, each atomically (temporary file + rename). The state carries its
own copy of the weights and names its step, so a `kill -9` between the two writes leaves a newer
model beside an older but self-consistent state: `--resume` continues from the state and reaches the
same final parameters.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import torch

from zsclip.atomic import atomic_write_text, temporary_sibling
from zsclip.errors import UserError

MODEL_FILE = "model.safetensors"
STATE_FILE = "state.pt"
LOG_FILE = "log.jsonl"
REPORT_FILE = "report.html"
STATE_VERSION = 1


def rng_states() -> dict[str, Any]:
    states: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_state(out: Path, state: dict[str, Any]) -> None:
    """torch.save to a temporary sibling, fsync, rename: state.pt is always a whole file."""
    path = out / STATE_FILE
    tmp = temporary_sibling(path)
    try:
        with open(tmp, "wb") as handle:
            torch.save({"version": STATE_VERSION, **state}, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def load_state(out: Path) -> dict[str, Any]:
    path = out / STATE_FILE
    if not path.is_file():
        raise UserError(f"no training state in {out} to resume; start the run without --resume")
    try:
        # weights_only=False: the state holds Python RNG tuples and plain dicts written by zsclip
        # itself.
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # torch raises several error types for damaged files
        raise UserError(
            f"{path} is damaged ({type(err).__name__}); start a new run in another folder"
        ) from err
    if state.get("version") != STATE_VERSION:
        raise UserError(f"{path} was written by another zsclip version; start a new run")
    return state


def has_state(out: Path) -> bool:
    return (out / STATE_FILE).is_file()


def read_log(out: Path) -> list[dict]:
    path = out / LOG_FILE
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a line cut short by a crash: everything before it is good
    return records


def rewind_log(out: Path, step: int) -> list[dict]:
    """Drop records logged after `step` (they belong to work a resumed run redoes); returns what is
    kept."""
    kept = [r for r in read_log(out) if r.get("event") == "config" or r.get("step", 0) <= step]
    atomic_write_text(out / LOG_FILE, "".join(json.dumps(r) + "\n" for r in kept))
    return kept


class LogWriter:
    """Appends JSON lines to log.jsonl and keeps them for the report."""

    def __init__(self, out: Path, records: list[dict]) -> None:
        self.path = out / LOG_FILE
        self.records = list(records)

    def write(self, record: dict) -> None:
        self.records.append(record)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
