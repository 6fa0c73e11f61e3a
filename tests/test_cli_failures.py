"""What a user meets when something goes wrong: a mistyped option, Ctrl-C, a damaged checkpoint, a
device that is not there, a decoder that crashes on one file. Each ends in one line, the right exit
status, and no half-written output."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from cli_helpers import build_tiny_checkpoint, make_image, make_photo_folder, run_cli

LABELS = "red,green,blue"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("failures")
    return {
        "model": str(build_tiny_checkpoint(root)),
        "root": root,
        "photos": make_photo_folder(root / "photos"),
    }


def assert_one_line_error(result, code: int = 2) -> str:
    assert result.code == code, result.stderr
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("zsclip: error: "), lines
    return lines[0]


# ------------------------------------------------------------------------------ click usage errors


@pytest.mark.parametrize(
    "args, words",
    [
        (["classify", "--bogus"], ["No such option: --bogus", "classify --help"]),
        (["nosuchcommand"], ["No such command", "--help"]),
        (["classify", "-k", "0"], ["--top-k", "greater than or equal to 1"]),
        (["classify", "-k", "many"], ["--top-k", "integer"]),
        (["classify", "--multi-label", "--threshold", "2"], ["--threshold", "1"]),
        (["classify", "--labels"], ["--labels", "requires an argument"]),
        (["embed", "--batch-size", "0"], ["--batch-size"]),
        (["train", "--steps", "x"], ["--steps"]),
    ],
)
def test_click_usage_errors_are_one_line_exit_2(args: list[str], words: list[str]) -> None:
    line = assert_one_line_error(run_cli(args))
    for word in words:
        assert word in line, line


def test_bare_zsclip_shows_the_help() -> None:
    result = run_cli([])
    assert result.code == 2 and "Usage:" in result.stdout + result.stderr
    assert "classify" in result.stdout + result.stderr


# --------------------------------------------------------------------------------------- Ctrl-C

# Runs the real program, but the third batch waits (for the test's SIGINT) after two batches'
# rows have gone to the output, so the interrupt lands mid-run.
DRIVER = textwrap.dedent("""
    import sys, time
    import zsclip.jobs.classify as job
    from zsclip.cli import run

    ready, real, calls = sys.argv[1], job.score_features, []

    def score_then_wait(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            open(ready, "w").close()
            time.sleep(120)
        return real(*args, **kwargs)

    job.score_features = score_then_wait
    sys.argv = ["zsclip", *sys.argv[2:]]
    run()
""")


def interrupt_midway(world: dict, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    ready = tmp_path / "ready"
    command = [sys.executable, "-c", DRIVER, str(ready), "classify", *world["photos"]]
    command += ["--model", world["model"], "-t", "simple", "-l", LABELS, "--batch-size", "1"]
    child = subprocess.Popen(
        [*command, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "ZSCLIP_CACHE": str(tmp_path / "cache")},
    )
    deadline = time.monotonic() + 120
    while not ready.exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ready.exists(), child.communicate()[1]
    child.send_signal(signal.SIGINT)
    out, err = child.communicate(timeout=60)
    return subprocess.CompletedProcess(child.args, child.returncode, out, err)


def test_ctrl_c_mid_run_leaves_no_output_file(world: dict, tmp_path: Path) -> None:
    results = tmp_path / "out" / "results.jsonl"
    results.parent.mkdir()
    done = interrupt_midway(world, tmp_path, "--output", str(results))
    assert done.returncode == 130, done.stderr
    assert done.stderr.splitlines()[-1] == "zsclip: interrupted"
    assert "Traceback" not in done.stderr and done.stdout == ""
    assert list(results.parent.iterdir()) == []  # no results file, no temporary beside it


def test_ctrl_c_mid_run_keeps_the_previous_output(world: dict, tmp_path: Path) -> None:
    results = tmp_path / "results.csv"
    results.write_text("path,label\nold.jpg,cat\n")
    done = interrupt_midway(world, tmp_path, "--output", str(results))
    assert done.returncode == 130 and "zsclip: interrupted" in done.stderr
    assert results.read_text() == "path,label\nold.jpg,cat\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "ready", "results.csv"]


def test_ctrl_c_with_rows_on_stdout(world: dict, tmp_path: Path) -> None:
    done = interrupt_midway(world, tmp_path)
    assert done.returncode == 130 and done.stderr.splitlines()[-1] == "zsclip: interrupted"
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert [row["path"] for row in rows] == world["photos"][:2]  # the rows before the interrupt


# ----------------------------------------------------------------------------- damaged checkpoints


def _cut(fraction: float):
    return lambda data: data[: int(len(data) * fraction)]


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(_cut(0.5), id="half"),
        pytest.param(lambda data: data[:-1], id="last-byte-missing"),
        pytest.param(_cut(0.001), id="cut-inside-the-header"),
        pytest.param(lambda data: b"", id="empty"),
        pytest.param(lambda data: bytes(range(256)) * 40, id="garbage"),
        pytest.param(lambda data: (10**15).to_bytes(8, "little") + data[8:], id="huge-header"),
    ],
)
def test_a_damaged_checkpoint_is_one_line_exit_2(world: dict, tmp_path: Path, damage) -> None:
    damaged = tmp_path / "model.safetensors"
    damaged.write_bytes(damage(Path(world["model"]).read_bytes()))
    line = assert_one_line_error(
        run_cli(["classify", world["photos"][0], "--model", str(damaged), "-l", LABELS])
    )
    assert str(damaged) in line


def _torch_file(value):
    def write(path: Path) -> None:
        import torch

        torch.save(value(), path)

    return write


def _zip_file(path: Path) -> None:
    import zipfile

    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("notes.txt", "not a torch archive")


@pytest.mark.parametrize(
    "write",
    [
        pytest.param(lambda p: p.write_bytes(bytes(range(256)) * 12), id="random-bytes"),
        pytest.param(_zip_file, id="zip-not-torch"),
        pytest.param(_torch_file(lambda: __import__("torch").zeros(3)), id="one-tensor"),
        pytest.param(_torch_file(lambda: [1, 2, 3]), id="a-list"),
        pytest.param(
            _torch_file(lambda: {"weight": __import__("torch").zeros(2, 2)}), id="not-clip"
        ),
        pytest.param(lambda p: p.write_text("hello, I am a text file\n"), id="text"),
        pytest.param(lambda p: p.write_bytes(b""), id="empty"),
    ],
)
def test_a_pt_file_that_is_no_clip_checkpoint_is_one_line_exit_2(
    world: dict, tmp_path: Path, write
) -> None:
    path = tmp_path / "model.pt"
    write(path)
    line = assert_one_line_error(
        run_cli(["classify", world["photos"][0], "--model", str(path), "-l", LABELS])
    )
    assert str(path) in line or "CLIP" in line


# ----------------------------------------------------------------------------------------- devices


@pytest.mark.parametrize(
    "name, gpus, expected",
    [
        ("cpu", 0, "cpu"),
        (" CPU ", 0, "cpu"),
        ("auto", 0, "cpu"),
        ("auto", 1, "cuda"),
        ("cuda", 2, "cuda"),
        ("cuda:1", 2, "cuda:1"),
        ("CUDA:0", 1, "cuda:0"),
        ("cuda:01", 2, "cuda:1"),
    ],
)
def test_device_names(monkeypatch, name: str, gpus: int, expected: str) -> None:
    import torch

    from zsclip.core.devices import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    assert str(resolve_device(name)) == expected


@pytest.mark.parametrize(
    "name, gpus, words",
    [
        ("cuda:abc", 0, "cuda:N"),  # the spelling is checked first, GPU or not
        ("cuda:abc", 2, "cuda:N"),
        ("cuda:", 2, "cuda:N"),
        ("cuda:-1", 2, "cuda:N"),
        ("cuda:1.5", 2, "cuda:N"),
        ("cuda:0", 0, "no CUDA GPU"),
        ("cuda", 0, "no CUDA GPU"),
        ("cuda:2", 2, "only 2 GPU(s) here (cuda:0 .. cuda:1)"),
        ("gpu", 1, "use auto, cpu, cuda or cuda:N"),
        ("tpu:0", 1, "use auto, cpu, cuda or cuda:N"),
    ],
)
def test_device_mistakes_are_usage_errors(monkeypatch, name: str, gpus: int, words: str) -> None:
    import torch

    from zsclip.core.devices import resolve_device
    from zsclip.errors import UserError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    with pytest.raises(UserError) as caught:
        resolve_device(name)
    assert caught.value.exit_code == 2 and words in str(caught.value)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("name", ["cuda:0", "cuda:abc"])
def test_device_mistakes_on_the_command_line(world: dict, monkeypatch, name: str) -> None:
    """Without a GPU (made so here, whatever the machine has): one line, exit 2, before any work."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = run_cli(
        ["classify", world["photos"][0], "--model", world["model"], "-l", LABELS, "--device", name]
    )
    line = assert_one_line_error(result)
    assert ("cuda:N" if name == "cuda:abc" else "no CUDA GPU") in line


# --------------------------------------------------------------------------------- decoder crashes


@pytest.mark.parametrize("workers", ["0", "2"])
def test_a_decoder_crash_is_an_error_row(world: dict, monkeypatch, workers: str) -> None:
    """An unexpected exception from the image loader on one file (a decoder bug, not a bad file)
    costs that file only: an error row and one stderr line for it, the other rows right, exit 1."""
    import zsclip.core.transform as transform

    real = transform.load_image
    victim = world["photos"][1]

    def crashing(path, *args, **kwargs):
        if str(path) == victim:
            raise RuntimeError("decoder bug\nwith a second line")
        return real(path, *args, **kwargs)

    args = [*world["photos"], "--model", world["model"], "-t", "simple", "-l", LABELS]
    args += ["--workers", workers, "--no-cache"]
    clean = run_cli(["classify", *args])
    assert clean.code == 0, clean.stderr
    monkeypatch.setattr(transform, "load_image", crashing)
    result = run_cli(["classify", *args])
    assert result.code == 1, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    expected = [json.loads(line) for line in clean.stdout.splitlines()]
    assert [row["path"] for row in rows] == world["photos"]
    assert rows[1] == {"path": victim, "error": "cannot read image: decoder bug with a second line"}
    assert rows[:1] + rows[2:] == expected[:1] + expected[2:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("zsclip: error:")]
    assert errors == [f"zsclip: error: {victim}: cannot read image: decoder bug with a second line"]
    assert "Traceback" not in result.stderr


def test_a_decoder_out_of_memory_is_an_error_row(world: dict, monkeypatch, tmp_path: Path) -> None:
    import zsclip.core.transform as transform

    big = str(make_image(tmp_path / "big.png"))

    def out_of_memory(path, *args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(transform, "load_image", out_of_memory)
    result = run_cli(["embed", big, "--model", world["model"], "--no-cache"])
    assert result.code == 1
    assert json.loads(result.stdout) == {
        "path": big,
        "error": "image too large to decode in memory",
    }
