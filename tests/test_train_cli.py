"""`zsclip train` as a person meets it: mistakes in one line before any work, the presets named,
resuming without retyping the command, and a quiet stderr when it is not a terminal."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cli_helpers import run_cli

from zsclip.train import shapes


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("world")
    shapes.generate(out, 24, seed=2, image_size=32, val_count=4, eval_per_class=1)
    return out


def train_args(world: Path, out: Path, *extra: str) -> list[str]:
    base = ["train", "--data", str(world / "train.tsv"), "--output", str(out), "--model", "tiny"]
    base += ["--vocab-size", "600", "--batch-size", "8", "--device", "cpu", "--log-every", "1"]
    return [*base, *extra]


def error(result) -> str:
    """The one line a mistake costs (and its exit status 2)."""
    lines = result.stderr.strip().splitlines()
    assert result.code == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith("zsclip: error: ") and "Traceback" not in result.stderr
    return lines[0]


def unreadable_world(tmp_path: Path) -> Path:
    """A pairs file whose images do not exist: any check that reads images would fail on it first."""
    (tmp_path / "ghost.tsv").write_text("nowhere.png\ta red circle.\n" * 16)
    return tmp_path / "ghost.tsv"


# ---- mistakes before work ------------------------------------------------------------------------------


def test_output_that_is_a_file(world, tmp_path):
    (tmp_path / "taken").write_text("not a folder")
    line = error(run_cli(train_args(world, tmp_path / "taken", "--steps", "1")))
    assert "--output" in line and "is a file" in line
    line = error(run_cli(train_args(world, tmp_path / "taken" / "run", "--steps", "1")))
    assert "cannot be created" in line
    assert (tmp_path / "taken").read_text() == "not a folder"


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "-0.001", "0"])
def test_lr_must_be_a_positive_number(tmp_path, value):
    args = ["train", "--data", str(unreadable_world(tmp_path)), "--output", str(tmp_path / "r")]
    line = error(run_cli([*args, "--model", "tiny", "--vocab-size", "600", "--lr", value]))
    assert "--lr must be a positive number" in line
    assert not (tmp_path / "r").exists()


def test_weight_decay_must_be_a_number(tmp_path):
    from zsclip.errors import UserError
    from zsclip.train.loop import TrainConfig, prepare

    args = ["train", "--data", str(unreadable_world(tmp_path)), "--output", str(tmp_path / "r")]
    result = run_cli([*args, "--weight-decay", "nan"])  # the option's range refuses it
    assert result.code == 2 and "--weight-decay" in result.stderr
    assert "Traceback" not in result.stderr
    config = TrainConfig(data=args[2], output=args[4], weight_decay=float("nan"))
    with pytest.raises(UserError, match="--weight-decay must be a number"):
        prepare(config)  # and so does the job, for callers of the Python API


def test_an_unknown_model_names_the_presets(tmp_path):
    from zsclip.core.presets import PRESETS

    args = ["train", "--data", str(unreadable_world(tmp_path)), "--output", str(tmp_path / "r")]
    line = error(run_cli([*args, "--model", "nosuchpreset"]))
    assert "nosuchpreset" in line and "zsclip models --presets" in line
    assert all(name in line for name in PRESETS)  # named before the images are looked at


def test_no_vocabulary_offline_suggests_vocab_size(tmp_path, monkeypatch):
    monkeypatch.delenv("ZSCLIP_VOCAB", raising=False)  # and the test's cache folder is empty
    args = ["train", "--data", str(unreadable_world(tmp_path)), "--output", str(tmp_path / "r")]
    line = error(run_cli([*args, "--model", "tiny"]))
    assert "--vocab-size N" in line and "offline" in line and "zsclip download vocab" in line


def test_data_is_required_to_start(tmp_path):
    line = error(run_cli(["train", "--output", str(tmp_path / "r"), "--vocab-size", "600"]))
    assert "--data is required" in line


# ---- the presets --------------------------------------------------------------------------------------


def test_the_presets_are_listed(tmp_path):
    from zsclip.cli.train import PRESET_NAMES
    from zsclip.core.presets import PRESETS

    assert PRESET_NAMES == tuple(PRESETS)  # the help's copy of the registry's names
    table = run_cli(["models", "--presets"])
    assert table.code == 0 and table.stderr == ""
    names = [line.split()[0] for line in table.stdout.splitlines()[1:]]
    assert names == list(PRESETS)
    rows = {
        row["name"]: row
        for row in json.loads(run_cli(["models", "--presets", "-f", "json"]).stdout)
    }
    assert rows["ViT-B/32"]["parameters"] == 151_277_313  # the paper's ViT-B/32
    assert rows["small"]["image_size"] == 64 and rows["RN50"]["vision"] == "resnet"
    help_text = " ".join(run_cli(["train", "--help"]).stdout.split())
    assert all(name in help_text for name in PRESETS)


# ---- what stderr shows -----------------------------------------------------------------------------------


def test_no_progress_bar_when_stderr_is_not_a_terminal(world, tmp_path):
    result = run_cli(train_args(world, tmp_path / "r", "--steps", "2", "--warmup", "1"))
    assert result.code == 0, result.stderr
    assert result.stderr.splitlines() == [
        "learning a 600-token BPE vocabulary from 24 captions",
        f"done: 2 steps in {result.stderr.split(' in ')[1].split(' s;')[0]} s; model: "
        f"{tmp_path / 'r' / 'model.safetensors'}",
    ]
    assert "\x1b" not in result.stderr and "\r" not in result.stderr and result.stdout == ""


def test_warmup_longer_than_the_run_warns(world, tmp_path):
    result = run_cli(train_args(world, tmp_path / "r", "--steps", "2", "--warmup", "5", "-q"))
    assert result.code == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "--warmup 5 is longer than the run (2 steps)" in warnings[0]
    quiet = run_cli(train_args(world, tmp_path / "r2", "--steps", "2", "--warmup", "2", "-q"))
    assert quiet.stderr == ""


# ---- resuming --------------------------------------------------------------------------------------------


def logged(out: Path, event: str = "train") -> list[dict]:
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [r for r in records if r.get("event") == event]


def test_resume_needs_no_data_and_takes_a_new_end(world, tmp_path):
    """--resume alone continues the run; with a larger --steps the rest of the run follows the
    warmup + cosine schedule of a run that long."""
    from zsclip.train.schedule import lr_at

    out = tmp_path / "r"
    assert run_cli(train_args(world, out, "--steps", "4", "--warmup", "1", "-q")).code == 0
    finished = run_cli(["train", "--output", str(out), "--resume"])
    assert finished.code == 0 and "already reached its last step (4)" in finished.stderr
    assert [r["step"] for r in logged(out)] == [1, 2, 3, 4]
    longer = run_cli(["train", "--output", str(out), "--resume", "--steps", "7", "-q"])
    assert longer.code == 0, longer.stderr
    records = logged(out)
    assert [r["step"] for r in records] == list(range(1, 8))
    want = [lr_at(s, 5e-4, 1, 4) for s in range(4)] + [lr_at(s, 5e-4, 1, 7) for s in range(4, 7)]
    assert [r["lr"] for r in records] == pytest.approx(want)
    assert logged(out, "resume")[-1]["config"]["steps"] == 7
    shorter = run_cli(["train", "--output", str(out), "--resume", "--steps", "5"])
    assert "at step 7; --steps 5 must be larger" in error(shorter)


def test_resume_names_the_options_it_ignores(world, tmp_path):
    out = tmp_path / "r"
    assert run_cli(train_args(world, out, "--steps", "2", "--warmup", "1", "-q")).code == 0
    again = run_cli(
        ["train", "--output", str(out), "--resume", "--steps", "3", "--lr", "0.1", "--seed", "0"]
    )
    assert again.code == 0, again.stderr
    warnings = [line for line in again.stderr.splitlines() if "warning" in line]
    # --seed 0 is the saved seed as well: only what differs is named
    assert warnings == [
        "zsclip: warning: ignored with --resume, the run keeps its saved settings: --lr 0.0005"
    ]
    assert [r["lr"] for r in logged(out)][-1] < 0.1


def test_resume_with_epochs_replaces_a_step_count(world, tmp_path):
    out = tmp_path / "r"  # 24 pairs / batch 8 = 3 steps an epoch
    assert run_cli(train_args(world, out, "--steps", "2", "--warmup", "1", "-q")).code == 0
    again = run_cli(["train", "--output", str(out), "--resume", "--epochs", "2", "-q"])
    assert again.code == 0, again.stderr
    assert [r["step"] for r in logged(out)] == [1, 2, 3, 4, 5, 6]
    assert [r["epoch"] for r in logged(out)] == [0, 0, 0, 1, 1, 1]


def test_sighup_stops_a_run_like_sigterm_unless_ignored():
    """A closed terminal (SIGHUP) saves and stops the run (exit 129); under nohup it stays ignored."""
    import os
    import signal

    from zsclip.cli._train_progress import EXIT_CODES, stop_on_signals

    assert EXIT_CODES[signal.SIGHUP] == 129
    previous = signal.signal(signal.SIGHUP, signal.SIG_DFL)
    try:
        with stop_on_signals() as received:
            os.kill(os.getpid(), signal.SIGHUP)
            assert received["signal"] == signal.SIGHUP
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # nohup
        with stop_on_signals() as received:
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGHUP)
            assert received["signal"] is None
    finally:
        signal.signal(signal.SIGHUP, previous)
