"""What a training run keeps on disk, and how it is written so that a crash never loses a usable run.

    OUT/model.safetensors  the latest complete model (a normal zsclip checkpoint: classify/embed/eval
                           load it as is)
    OUT/state.safetensors  everything needed to continue exactly: weights, optimizer, step, RNG states,
                           configuration
    OUT/log.jsonl          the configuration first, then one JSON object per logged step (and per
                           validation)
    OUT/report.html        charts of the log, refreshed at each checkpoint

The state is one .safetensors file: every tensor (weights, AdamW moments, torch's RNG state) is a named
tensor, and everything else (step, data position, configuration, Python's RNG state, the optimizer's
hyper-parameters) is one JSON document in the header's metadata. Reading it runs no code (no pickle
anywhere) and allocates no more than the file holds (the safetensors reader checks every offset against
the file's size); a file that does not match the expected layout is refused with one line. Being one
file, it is written in one atomic step: there is no moment at which the tensors and the JSON disagree.

Writes go model first, then state, each atomically (temporary file + rename). The state carries its own
copy of the weights and names its step, so a `kill -9` between the two writes leaves a newer model beside
an older but self-consistent state: `--resume` continues from the state and reaches the same final
parameters.

zsclip 0.1 kept the state in state.pt, a pickle. Such a file is never opened (unpickling can run code):
a run folder holding one is refused with the way forward (fine-tune from its model.safetensors).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch

from zsclip.atomic import atomic_write_text
from zsclip.errors import UserError

MODEL_FILE = "model.safetensors"
STATE_FILE = "state.safetensors"
LEGACY_STATE_FILE = "state.pt"  # zsclip 0.1: a pickle, never read
LOG_FILE = "log.jsonl"
REPORT_FILE = "report.html"
STATE_FORMAT = "zsclip-train-state"
STATE_VERSION = 2

# Parts of the nested state (as the loop builds it) kept as tensors, named "model/<key>",
# "optimizer/<parameter index>/<name>", "rng/torch" and "rng/cuda/<device>" in the file.
TENSOR_GROUPS = ("model", "optimizer", "rng")
PLAIN_KEYS = {  # key -> the JSON types it may hold
    "step": int,
    "epoch": int,
    "position": int,
    "global_batch": int,
    "world_size": int,
    "config": dict,
    "model_config": dict,
    "tokenizer": dict,
    "preprocess": dict,
    "metadata": dict,
    "scaler": dict,
}


class DamagedState(UserError):
    """state.safetensors cannot be used; the message names the file and what to do."""


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


# ---- the state as (plain JSON, flat tensors) ------------------------------------------------------


def pack(state: dict[str, Any]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The loop's nested state -> (JSON-able dict, {flat name: tensor}); `unpack` is its inverse.

    Of the optimizer only the per-parameter tensors are kept (AdamW's step and moments): its
    hyper-parameters follow from the configuration, so a resumed run rebuilds them from there and a
    state file cannot smuggle in others.
    """
    plain = {key: value for key, value in state.items() if key not in TENSOR_GROUPS}
    tensors = {f"model/{key}": value for key, value in state["model"].items()}
    for index, values in state["optimizer"]["state"].items():
        for name, value in values.items():
            tensors[f"optimizer/{index}/{name}"] = torch.as_tensor(value)
    rng = state["rng"]
    python_version, python_words, gauss = rng["python"]
    cuda = rng.get("cuda", [])
    plain["rng"] = {"python": [python_version, list(python_words), gauss], "cuda": len(cuda)}
    tensors["rng/torch"] = rng["torch"]
    for index, value in enumerate(cuda):
        tensors[f"rng/cuda/{index}"] = value
    return plain, tensors


def unpack(plain: Any, tensors: dict[str, torch.Tensor], source: str) -> dict[str, Any]:
    """(JSON document, flat tensors) -> the nested state; DamagedState when the layout is not
    zsclip's. The values themselves are checked where they are used (zsclip.train.setup)."""

    def damaged(reason: str) -> DamagedState:
        return damaged_state(source, reason)

    if not isinstance(plain, dict):
        raise damaged("its metadata is not a JSON object")
    for key, kind in PLAIN_KEYS.items():
        if not isinstance(plain.get(key), kind) or isinstance(plain.get(key), bool):
            raise damaged(f"{key!r} is missing or not {kind.__name__}")
    state = {key: plain[key] for key in PLAIN_KEYS}
    state["model"] = {}
    optimizer: dict[int, dict[str, torch.Tensor]] = {}
    rng: dict[str, Any] = {"cuda": {}}
    for name, tensor in tensors.items():
        group, _, rest = name.partition("/")
        parts = rest.split("/")
        if group == "model" and rest:
            state["model"][rest] = tensor
        elif group == "optimizer" and len(parts) == 2 and parts[0].isdigit():
            optimizer.setdefault(int(parts[0]), {})[parts[1]] = tensor
        elif name == "rng/torch":
            rng["torch"] = tensor
        elif group == "rng" and len(parts) == 2 and parts[0] == "cuda" and parts[1].isdigit():
            rng["cuda"][int(parts[1])] = tensor
        else:
            raise damaged(f"unexpected tensor {name[:80]!r}")
    state["optimizer"] = {"state": optimizer}
    state["rng"] = _rng(plain.get("rng"), rng, damaged)
    return state


def damaged_state(source: str, reason: str) -> DamagedState:
    model = Path(source).parent / MODEL_FILE
    return DamagedState(
        f"{source} is damaged ({reason}) and cannot be resumed; start a new run in another "
        f"folder, or fine-tune the last model with --model {model}"
    )


def _rng(plain: Any, tensors: dict[str, Any], damaged: Any) -> dict[str, Any]:
    if not isinstance(plain, dict) or "torch" not in tensors:
        raise damaged("no random-number-generator state")
    python = plain.get("python")
    if not (
        isinstance(python, list)
        and len(python) == 3
        and isinstance(python[1], list)
        and all(isinstance(word, int) for word in python[1])
    ):
        raise damaged("the Python RNG state is malformed")
    states: dict[str, Any] = {
        "python": (python[0], tuple(python[1]), python[2]),
        "torch": tensors["torch"],
    }
    cuda = tensors["cuda"]
    if sorted(cuda) != list(range(len(cuda))) or plain.get("cuda", 0) != len(cuda):
        raise damaged("the CUDA RNG states are incomplete")
    if cuda:
        states["cuda"] = [cuda[index] for index in range(len(cuda))]
    return states


# ---- the file --------------------------------------------------------------------------------------


def save_state(out: Path, state: dict[str, Any]) -> None:
    """Write the nested state as OUT/state.safetensors in one atomic step (temporary file, fsync,
    rename)."""
    from zsclip.core.safetensors_io import write_safetensors

    plain, tensors = pack(state)
    header = {
        "format": STATE_FORMAT,
        "version": str(STATE_VERSION),
        "state": json.dumps(plain, separators=(",", ":")),
    }
    write_safetensors(out / STATE_FILE, tensors, header)


def read_state_parts(out: Path) -> tuple[Any, dict[str, torch.Tensor]]:
    """(JSON document, flat tensors) of OUT/state.safetensors, checked as a file but not yet as a
    state. Refuses a folder with no state, and a zsclip 0.1 state.pt without opening it."""
    path = out / STATE_FILE
    if not path.is_file():
        if (out / LEGACY_STATE_FILE).exists():
            raise UserError(
                f"{out / LEGACY_STATE_FILE} was written by zsclip 0.1 as a pickle, which this "
                "version never opens (unpickling can run code); it cannot be resumed. Fine-tune "
                f"its model instead: zsclip train --model {out / MODEL_FILE} --output NEW_FOLDER ..."
            )
        raise UserError(f"no training state in {out} to resume; start the run without --resume")
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("format") != STATE_FORMAT:
                raise damaged_state(str(path), "not a zsclip training state")
            if metadata.get("version") != str(STATE_VERSION):
                raise DamagedState(
                    f"{path} is a version {metadata.get('version')!r} training state; this zsclip "
                    f"reads version {STATE_VERSION}: resume with the zsclip that wrote it"
                )
            plain = json.loads(metadata.get("state", ""))
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except DamagedState:
        raise
    except Exception as err:  # the safetensors reader and json raise several types for bad bytes
        raise damaged_state(str(path), type(err).__name__) from None
    return plain, tensors


def load_state(out: Path) -> dict[str, Any]:
    plain, tensors = read_state_parts(out)
    return unpack(plain, tensors, str(out / STATE_FILE))


def has_state(out: Path) -> bool:
    """Whether OUT holds a training run (this version's state, or zsclip 0.1's)."""
    return (out / STATE_FILE).is_file() or (out / LEGACY_STATE_FILE).exists()


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
