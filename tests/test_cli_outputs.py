"""Where results go and what happens when they cannot go there: special files given as --output, checks
made before any work, write failures (disk full, /dev/full, closed stdout), signals and the temporary
files they would otherwise leave behind. CI runs as root, so permission bits prove nothing here: a
read-only mount, a file in the way, /proc and resource limits stand in for "cannot write"."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from cli_helpers import build_tiny_checkpoint, make_photo_folder, run_cli

import zsclip.atomic
from zsclip.atomic import OUTPUT_FAILED

LABELS = "red circle,blue square,corgi"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("outputs")
    return {
        "model": str(build_tiny_checkpoint(root)),
        "root": root,
        "photos": str(root / "photos"),
        "expected": make_photo_folder(root / "photos"),
    }


def classify(world: dict, *args: str, model: str | None = None):
    return run_cli(
        ["classify", world["photos"], "--model", model or world["model"], "-t", "simple"]
        + ["--labels", LABELS, "--no-cache", *args]
    )


def temporaries(folder: Path) -> list[str]:
    return sorted(name for name in os.listdir(folder) if name.endswith(".tmp"))


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


def zsclip_process(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "zsclip", *args], capture_output=True, text=True, **kwargs
    )


# ------------------------------------------------------------------------------ special files


def _still_null_device(world: dict, target: str) -> None:
    result = classify(world, "--output", target, "--report", target, "--format", "csv")
    assert result.code == 0, result.stderr
    info = os.stat(target)
    assert stat.S_ISCHR(info.st_mode) and info.st_rdev == os.makedev(1, 3)


def test_a_device_node_stays_a_device(world: dict, tmp_path: Path) -> None:
    """A device node given as --output or --report is written through: renaming over it would put a
    regular file where the device was. (Our own node: this test is safe to run on a broken build.)"""
    node = tmp_path / "null"
    os.mknod(node, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    _still_null_device(world, str(node))
    assert os.listdir(tmp_path) == ["null"]  # no temporary beside it


def test_dev_null_stays_the_system_device(world: dict) -> None:
    _still_null_device(world, "/dev/null")


def test_fifo_output_is_written_through(world: dict, tmp_path: Path) -> None:
    fifo = tmp_path / "results.csv"
    os.mkfifo(fifo)
    os.link(fifo, tmp_path / "same-fifo")  # a second name, to release the reader whatever happens
    received: list[bytes] = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_bytes()), daemon=True)
    reader.start()
    result = classify(world, "--output", str(fifo))
    if reader.is_alive():  # the writer never opened the FIFO: give the reader its end of file
        os.close(os.open(tmp_path / "same-fifo", os.O_WRONLY | os.O_NONBLOCK))
    reader.join()
    assert result.code == 0, result.stderr
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    lines = received[0].decode().splitlines()
    assert lines[0].startswith("path,label,score") and len(lines) == 1 + len(world["expected"])


def test_symlink_output_replaces_its_target_and_stays_a_link(world: dict, tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    target = tmp_path / "real" / "results.jsonl"
    target.write_text("old\n")
    target.chmod(0o600)  # a private file stays private when it is replaced
    link = tmp_path / "results.jsonl"
    link.symlink_to(target)
    dangling = tmp_path / "new.jsonl"
    dangling.symlink_to(tmp_path / "real" / "created.jsonl")
    for out in (link, dangling):
        result = classify(world, "--output", str(out))
        assert result.code == 0, result.stderr
        assert out.is_symlink()
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        assert [row["path"] for row in rows] == world["expected"]
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert temporaries(tmp_path) == [] and temporaries(tmp_path / "real") == []


def test_what_cannot_take_a_stream_is_refused_before_any_work(world: dict, tmp_path: Path) -> None:
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(tmp_path / "results.csv"))
    (tmp_path / "afile").write_text("a file, not a folder\n")
    cases = {
        str(tmp_path / "results.csv"): "socket",
        str(tmp_path): "is a folder",
        str(tmp_path / "afile" / "x.csv"): "is a file, not a folder",
        "/proc/zsclip-no-such/x.csv": "cannot write in /proc",
    }
    try:
        os.mknod(tmp_path / "block.csv", stat.S_IFBLK | 0o600, os.makedev(7, 200))
        cases[str(tmp_path / "block.csv")] = "block device"
    except OSError:  # no mknod for block devices here (a container): the socket case still runs
        pass
    no_model = str(tmp_path / "no-such-model.safetensors")  # loading it would fail: it must not
    for option in ("--output", "--report"):
        for path, reason in cases.items():
            result = classify(world, option, path, model=no_model)
            assert result.code == 2, (option, path, result.stderr)
            line = one_line(result.stderr)
            assert option in line and reason in line and "model" not in line, line
    sock.close()
    assert not (tmp_path / "afile" / "x.csv").exists() and temporaries(tmp_path) == []


def test_output_and_report_may_not_be_one_file(world: dict, tmp_path: Path) -> None:
    out = str(tmp_path / "x.html")
    result = classify(world, "--output", out, "--report", out, "--format", "jsonl")
    assert result.code == 2 and "same file" in one_line(result.stderr)


def test_unknown_output_suffix_needs_format(world: dict, tmp_path: Path) -> None:
    for name in ("results.xlsx", "results"):
        result = classify(world, "--output", str(tmp_path / name))
        assert result.code == 2 and "--format" in one_line(result.stderr)
    assert os.listdir(tmp_path) == []
    result = classify(world, "--output", str(tmp_path / "results.xlsx"), "--format", "csv")
    assert result.code == 0, result.stderr
    assert (tmp_path / "results.xlsx").read_text().startswith("path,label,score")


def test_embed_and_convert_check_their_destination_first(world: dict, tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("in the way\n")
    no_model = str(tmp_path / "no-such-model.safetensors")
    embed = run_cli(
        ["embed", world["photos"], "--model", no_model, "-o", str(tmp_path / "afile" / "e.npy")]
    )
    assert embed.code == 2 and "afile is a file" in one_line(embed.stderr)
    convert = run_cli(["convert", no_model, str(tmp_path / "afile" / "m.safetensors")])
    assert convert.code == 2 and "DST" in one_line(convert.stderr)


@pytest.mark.skipif(
    subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode != 0
    if os.path.exists("/usr/bin/unshare")
    else True,
    reason="needs unshare -m (root in a namespace-capable system) for a read-only bind mount",
)
def test_read_only_folder_is_a_usage_error_before_the_work(world: dict, tmp_path: Path) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    command = (
        f"mount --bind -o ro {folder} {folder} && exec {sys.executable} -m zsclip classify "
        f"{world['photos']} --model {tmp_path / 'no-such-model'} --labels a,b "
        f"--output {folder / 'out.csv'}"
    )
    result = subprocess.run(["unshare", "-m", "sh", "-c", command], capture_output=True, text=True)
    assert result.returncode == 2, result.stderr
    assert "Read-only file system" in one_line(result.stderr)


# ------------------------------------------------------------------------------ failures while writing


def _model_args(world: dict) -> list[str]:
    return ["classify", world["photos"], "--model", world["model"], "-t", "simple", "-l", LABELS]


def test_stdout_to_dev_full_is_one_line_and_exit_3(world: dict) -> None:
    with open("/dev/full", "w") as full:
        result = subprocess.run(
            [sys.executable, "-m", "zsclip", *_model_args(world), "--no-cache"],
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
        )
    assert result.returncode == OUTPUT_FAILED
    assert "cannot write to stdout: No space left on device" in one_line(result.stderr)


def test_any_command_whose_stdout_fails_says_so_in_one_line() -> None:
    with open("/dev/full", "w") as full:
        result = subprocess.run(
            [sys.executable, "-m", "zsclip", "models"],
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
        )
    assert result.returncode == OUTPUT_FAILED
    assert "cannot write to stdout" in one_line(result.stderr)


def test_closed_stdout_is_a_usage_error(world: dict) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "zsclip", *_model_args(world)],
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: os.close(1),
    )
    assert result.returncode == 2
    assert "stdout is closed" in one_line(result.stderr)


def _file_size_limit(limit: int):
    def limit_files() -> None:
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return limit_files


def test_disk_full_while_writing_leaves_the_old_file(world: dict, tmp_path: Path) -> None:
    """A write that fails half way (EFBIG under a file-size limit stands in for a full disk): one line,
    exit 3, the old file untouched and no temporary left."""
    out = tmp_path / "results.jsonl"
    out.write_text("old results\n")
    result = subprocess.run(
        [sys.executable, "-m", "zsclip", *_model_args(world), "--no-cache", "-o", str(out)],
        capture_output=True,
        text=True,
        preexec_fn=_file_size_limit(300),  # the old file (12 bytes) is below it; 4 rows are not
    )
    assert result.returncode == OUTPUT_FAILED, result.stderr
    assert f"cannot write {out}: File too large" in one_line(result.stderr)
    assert out.read_text() == "old results\n" and temporaries(tmp_path) == []


def test_dev_stdout_writes_to_what_stdout_is(world: dict, tmp_path: Path) -> None:
    """/dev/stdout opened afresh would truncate or overwrite a file stdout appends to; it is the
    process's own stdout that gets the rows, after what the file held."""
    log = tmp_path / "log.jsonl"
    log.write_text('{"earlier": true}\n')
    with open(log, "a") as appending:
        result = subprocess.run(
            [sys.executable, "-m", "zsclip", *_model_args(world), "-o", "/dev/stdout"],
            stdout=appending,
            stderr=subprocess.PIPE,
            text=True,
        )
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert rows[0] == {"earlier": True}
    assert [row["path"] for row in rows[1:]] == world[
        "expected"
    ]  # jsonl: /dev/stdout has no suffix


# ------------------------------------------------------------------------------ signals and temporaries

# Runs `zsclip classify` whose classifier yields one row, says so on stderr, then waits: the --output
# temporary exists and holds a row when the test sends its signal.
STALLED_RUN = r"""
import sys, time
import zsclip.jobs.classify as job

def stalled(model, items, *args, **kwargs):
    yield job.Prediction(items[0].path, [("corgi", 1.0)])
    sys.stderr.write("zsclip-test: writing\n")
    sys.stderr.flush()
    time.sleep(600)

job.classify_images = stalled
from zsclip.cli import run
sys.argv = ["zsclip", *sys.argv[1:]]
run()
"""


def _start_stalled(world: dict, out: Path) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, "-c", STALLED_RUN, *_model_args(world), "-q", "-o", str(out)],
        stderr=subprocess.PIPE,
        text=True,
    )
    line = process.stderr.readline()
    assert line == "zsclip-test: writing\n", line + process.stderr.read()
    return process


@pytest.mark.parametrize(
    "signum, code", [(signal.SIGTERM, 143), (signal.SIGHUP, 129), (signal.SIGINT, 130)]
)
def test_signals_remove_the_temporary(world: dict, tmp_path: Path, signum: int, code: int) -> None:
    out = tmp_path / "results.csv"
    out.write_text("old\n")
    process = _start_stalled(world, out)
    assert len(temporaries(tmp_path)) == 1
    process.send_signal(signum)
    rest = process.stderr.read()
    assert process.wait() == code
    assert rest == "zsclip: interrupted\n"
    assert temporaries(tmp_path) == [] and out.read_text() == "old\n"


def test_temporaries_of_killed_runs_are_removed_by_the_next_run(world: dict, tmp_path: Path):
    out = tmp_path / "results.csv"
    process = _start_stalled(world, out)
    process.kill()  # SIGKILL: nothing can clean up
    process.wait()
    process.stderr.close()
    [left] = temporaries(tmp_path)
    assert f"-{process.pid}-" in left
    host = zsclip.atomic.host_tag()
    keep = [
        f".results.csv.zsclip-{host}-1-abcdefgh.tmp",  # PID 1 is alive
        ".results.csv.k2j3h4g5.tmp",  # not zsclip's pattern (an older version, another tool)
        f".results.csv.zsclip-{'0' * 8 if host != '0' * 8 else '1' * 8}-{process.pid}-x.tmp",
    ]
    for name in keep:
        (tmp_path / name).write_text("")
    result = classify(world, "--output", str(tmp_path / "other.csv"))
    assert result.code == 0, result.stderr
    assert temporaries(tmp_path) == sorted(keep)
    assert not out.exists()
