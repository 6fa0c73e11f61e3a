"""The training state is input like any other: reading it runs no code, and a damaged or lying state is
refused in one line before anything is built from it."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch

from zsclip.core.safetensors_io import write_safetensors
from zsclip.errors import UserError
from zsclip.train import shapes
from zsclip.train import state as ts
from zsclip.train.loop import TrainConfig, prepare, train


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory) -> Path:
    """A finished 2-step run of the tiny preset (its state is what the tests below damage)."""
    root = tmp_path_factory.mktemp("state")
    shapes.generate(root / "world", 16, seed=1, image_size=32, val_count=4, eval_per_class=1)
    train(config(root / "world", root / "run"))
    return root


def config(world: Path, out: Path, **overrides) -> TrainConfig:
    base = dict(
        data=str(world / "train.tsv"),
        output=str(out),
        model="tiny",
        vocab_size=600,
        batch_size=8,
        steps=2,
        warmup=1,
        save_every=2,
        device="cpu",
    )
    return TrainConfig(**{**base, **overrides})


class RunsShell:
    """Unpickling this calls os.system: what a crafted state.pt would hold."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def copy_run(run_folder: Path, dest: Path) -> Path:
    """A copy of the run (and of its data, beside it) that a test may damage."""
    import shutil

    shutil.copytree(run_folder / "run", dest)
    if not (dest.parent / "world").exists():
        shutil.copytree(run_folder / "world", dest.parent / "world")
    return dest


def cli_resume(out: Path):
    """`zsclip train --data ... --output OUT --resume`, as the run was started."""
    from cli_helpers import run_cli

    data = out.parent / "world" / "train.tsv"
    return run_cli(["train", "--data", str(data), "--output", str(out), "--resume", "-q"])


def one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("zsclip: error: "), stderr
    assert "Traceback" not in stderr
    return lines[0]


# ---- no code runs --------------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["pickle", "torch.save"])
def test_a_crafted_state_pt_runs_nothing(run_folder, tmp_path, form):
    """A run folder from zsclip 0.1, or one crafted to look like it, is refused without being read."""
    marker = tmp_path / "pwned"
    payload = {"step": 1, "model": RunsShell(f"touch {marker}")}
    out = copy_run(run_folder, tmp_path / "run")
    (out / ts.STATE_FILE).unlink()
    if form == "pickle":
        (out / "state.pt").write_bytes(pickle.dumps(payload))
    else:
        torch.save(payload, out / "state.pt")
    result = cli_resume(out)
    line = one_error_line(result.stderr)
    assert result.code == 2 and not marker.exists()
    assert "zsclip 0.1" in line and f"--model {out / 'model.safetensors'}" in line
    again = cli_resume(out)  # refused the same way every time: nothing was half-read
    assert again.stderr == result.stderr and not marker.exists()
    from cli_helpers import run_cli

    fresh = run_cli(["train", "--data", "x.tsv", "--output", str(out), "--model", "tiny"])
    assert "already holds a training run" in one_error_line(fresh.stderr) and not marker.exists()


@pytest.mark.parametrize("form", ["pickle", "torch.save"])
def test_a_pickle_named_state_safetensors_runs_nothing(run_folder, tmp_path, form):
    marker = tmp_path / "pwned"
    out = copy_run(run_folder, tmp_path / "run")
    payload = {"step": 1, "model": RunsShell(f"touch {marker}")}
    if form == "pickle":
        (out / ts.STATE_FILE).write_bytes(pickle.dumps(payload))
    else:
        torch.save(payload, out / ts.STATE_FILE)
    result = cli_resume(out)
    assert "is damaged" in one_error_line(result.stderr) and result.code == 2
    assert not marker.exists()


def test_resuming_unpickles_nothing(run_folder, tmp_path, monkeypatch):
    """A normal resume never reaches pickle or torch.load: no code path could be tricked into it."""

    def refuse(*args, **kwargs):
        raise AssertionError("the training state was read with pickle")

    out = copy_run(run_folder, tmp_path / "run")
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    result = train(config(run_folder / "world", out, steps=3), resume=True, given={"steps"})
    assert result.step == 3


# ---- damaged and lying states ------------------------------------------------------------------------


def rewrite(out: Path, change) -> None:
    """Read the state's JSON and tensors, let `change(plain, tensors)` alter them, write it back."""
    plain, tensors = ts.read_state_parts(out)
    change(plain, tensors)
    header = {
        "format": ts.STATE_FORMAT,
        "version": str(ts.STATE_VERSION),
        "state": json.dumps(plain),
    }
    write_safetensors(out / ts.STATE_FILE, tensors, header)


def set_path(plain: dict, path: str, value) -> None:
    *parents, last = path.split(".")
    for key in parents:
        plain = plain[key]
    plain[last] = value


def replace_tensor(name: str, value: torch.Tensor):
    def change(plain, tensors):
        tensors[name] = value

    return change


DAMAGE = {
    "random bytes": lambda out: (out / ts.STATE_FILE).write_bytes(os.urandom(4096)),
    "cut in half": lambda out: (out / ts.STATE_FILE).write_bytes(
        (out / ts.STATE_FILE).read_bytes()[: (out / ts.STATE_FILE).stat().st_size // 2]
    ),
    "empty": lambda out: (out / ts.STATE_FILE).write_bytes(b""),
    "header claims 1 TiB": lambda out: (out / ts.STATE_FILE).write_bytes(
        safetensors_bytes(
            {"x": {"dtype": "F32", "shape": [262144, 1048576], "data_offsets": [0, 1 << 40]}}
        )
    ),
    "another format": lambda out: write_safetensors(
        out / ts.STATE_FILE, {"a": torch.zeros(1)}, {"format": "zsclip"}
    ),
    "version 1": lambda out: rewrite_header(out, version="1"),
    "metadata not JSON": lambda out: rewrite_header(out, state="{not json"),
    "metadata a list": lambda out: rewrite_header(out, state="[1, 2]"),
    "step a string": lambda out: rewrite(out, lambda p, t: set_path(p, "step", "2")),
    "lr a string": lambda out: rewrite(out, lambda p, t: set_path(p, "config.lr", "fast")),
    "batch size a bool": lambda out: rewrite(
        out, lambda p, t: set_path(p, "config.batch_size", True)
    ),
    "negative position": lambda out: rewrite(out, lambda p, t: set_path(p, "position", -8)),
    "100,000 text layers": lambda out: rewrite(
        out, lambda p, t: set_path(p, "model_config.text.layers", 100_000)
    ),
    "heads zero": lambda out: rewrite(out, lambda p, t: set_path(p, "model_config.text.heads", 0)),
    "unknown vision kind": lambda out: rewrite(
        out, lambda p, t: set_path(p, "model_config.vision.kind", "mlp")
    ),
    "weight of the wrong shape": lambda out: rewrite(
        out, replace_tensor("model/text_projection", torch.zeros(3, 3))
    ),
    "weight of the wrong dtype": lambda out: rewrite(
        out, replace_tensor("model/text_projection", torch.zeros(64, 32, dtype=torch.int32))
    ),
    "a weight missing": lambda out: rewrite(out, lambda p, t: t.pop("model/text_projection")),
    "an unknown tensor": lambda out: rewrite(out, replace_tensor("payload", torch.zeros(1))),
    "optimizer moment of the wrong shape": lambda out: rewrite(
        out, replace_tensor("optimizer/0/exp_avg", torch.zeros(7))
    ),
    "optimizer state for parameter 9999": lambda out: rewrite(
        out, replace_tensor("optimizer/9999/exp_avg", torch.zeros(1))
    ),
    "torch RNG state of the wrong size": lambda out: rewrite(
        out, replace_tensor("rng/torch", torch.zeros(3, dtype=torch.uint8))
    ),
    "Python RNG state malformed": lambda out: rewrite(
        out, lambda p, t: set_path(p, "rng.python", [3, [1, 2, 3], None])
    ),
    "loss scaler state not numbers": lambda out: rewrite(
        out, lambda p, t: set_path(p, "scaler", {"scale": "big"})
    ),
    "tokenizer entry damaged": lambda out: rewrite(
        out, lambda p, t: set_path(p, "tokenizer", {"tokenizer": "bpe", "tokenizer.merges": 7})
    ),
}


def safetensors_bytes(header: dict) -> bytes:
    """A .safetensors file of this header and no data (what a lying file looks like)."""
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text


def rewrite_header(out: Path, **changes: str) -> None:
    from safetensors import safe_open

    with safe_open(str(out / ts.STATE_FILE), "pt") as handle:
        metadata = {**handle.metadata(), **changes}
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    write_safetensors(out / ts.STATE_FILE, tensors, metadata)


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_state_is_one_line(run_folder, tmp_path, damage):
    out = copy_run(run_folder, tmp_path / "run")
    DAMAGE[damage](out)
    before = (out / ts.STATE_FILE).read_bytes()
    with pytest.raises(UserError) as err:
        prepare(config(run_folder / "world", out, steps=4), resume=True, given={"steps"})
    message = str(err.value)
    assert "\n" not in message and str(out) in message, message
    assert (out / ts.STATE_FILE).read_bytes() == before  # refused, not repaired or replaced


def test_a_damaged_state_through_the_cli(run_folder, tmp_path):
    out = copy_run(run_folder, tmp_path / "run")
    DAMAGE["100,000 text layers"](out)
    result = cli_resume(out)
    line = one_error_line(result.stderr)
    assert result.code == 2 and "damaged" in line and "model configuration" in line


def test_the_state_round_trips_exactly(run_folder):
    """What pack() splits, unpack() puts back: tensors bit for bit, Python's RNG state as a tuple."""
    import random

    out = run_folder / "run"
    state = ts.load_state(out)
    plain, tensors = ts.read_state_parts(out)
    again = ts.unpack(*ts.pack(state), "again")
    assert again["step"] == state["step"] == 2 and again["config"] == state["config"]
    assert all(torch.equal(again["model"][k], v) for k, v in state["model"].items())
    for index, values in state["optimizer"]["state"].items():
        assert set(values) == {"step", "exp_avg", "exp_avg_sq"}
        assert all(torch.equal(again["optimizer"]["state"][index][k], v) for k, v in values.items())
    python = state["rng"]["python"]
    random.setstate(python)  # a real Python RNG state
    assert isinstance(python, tuple) and isinstance(python[1], tuple) and len(python[1]) == 625
