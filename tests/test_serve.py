"""`zsclip serve` and `classify --server`: a real server process on 127.0.0.1 with the built-in model.

Two servers run for the module: a plain one with low limits (so the limits are cheap to reach), and a
guarded one with a token, a queue of one image and a model slowed by tests/slow_serve.py (so a
request stays in flight long enough to fill the queue and to be drained by SIGTERM). The batcher and
the guard are also tested on their own, in-process.
"""

from __future__ import annotations

import asyncio
import base64
import http.client
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import pytest
from cli_helpers import run_cli

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("python_multipart")

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
TOKEN = "test-token-0123456789abcdef"
STARTUP_S = 120  # importing torch on a busy 2-core machine


# ------------------------------------------------------------------------------------------ servers


class Served:
    """A `zsclip serve` process and a way to talk to it."""

    def __init__(self, args: list[str], env: dict[str, str], prefix: list[str]) -> None:
        self.process = subprocess.Popen(
            [sys.executable, *prefix, "serve", "--port", "0", *args],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self.ready = threading.Event()
        self.port = 0
        threading.Thread(target=self._read_stderr, daemon=True).start()

    def wait(self) -> "Served":
        """Block until the server says where it listens."""
        if not self.ready.wait(STARTUP_S) or not self.port:
            self.stop()
            raise AssertionError(f"the server did not start: {self.lines}")
        return self

    def _read_stderr(self) -> None:
        for line in self.process.stderr:
            self.lines.append(line)
            if " serving " in line:
                self.port = int(line.split("http://127.0.0.1:")[1].split()[0])
                self.ready.set()
        self.ready.set()

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        timeout: float = 60,
    ) -> tuple[int, dict, dict]:
        """(status, headers, JSON body)."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            connection.request(method, path, body=body, headers=headers or {})
            response = connection.getresponse()
            return response.status, dict(response.getheaders()), json.loads(response.read())
        finally:
            connection.close()

    def post_json(self, path: str, content, headers: dict[str, str] | None = None):
        data = json.dumps(content).encode()
        return self.request(
            "POST", path, data, {"Content-Type": "application/json", **(headers or {})}
        )

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(30)


def _environment(tmp: Path, **extra: str) -> dict[str, str]:
    """The server's own cache and settings, no model or server named by the environment (module
    fixtures start before conftest's per-test ones)."""
    names = ("ZSCLIP_TOKEN", "ZSCLIP_SERVER", "ZSCLIP_MODEL")
    env = {k: v for k, v in os.environ.items() if k not in names}
    private = {"ZSCLIP_CACHE": str(tmp / "cache"), "XDG_CONFIG_HOME": str(tmp / "config")}
    return {**env, **private, **extra}


@pytest.fixture(scope="module")
def servers(tmp_path_factory) -> dict[str, Served]:
    """Both servers, started together (their start-up is most of this module's time)."""
    plain_tmp, guarded_tmp = tmp_path_factory.mktemp("plain"), tmp_path_factory.mktemp("guarded")
    limits = ["--max-labels", "200", "--max-upload-mb", "1", "--max-images", "16"]
    started = {"plain": Served(limits, _environment(plain_tmp), ["-m", "zsclip"])}
    # the guarded one: a token, a queue of one image, each forward pass 1.5 s late
    slow = [str(Path(__file__).parent / "slow_serve.py"), "1.5"]
    args = ["--queue-size", "1", "--batch-wait-ms", "0"]
    started["guarded"] = Served(args, _environment(guarded_tmp, ZSCLIP_TOKEN=TOKEN), slow)
    yield started
    for server in started.values():
        server.stop()


@pytest.fixture()
def plain(servers) -> Served:
    return servers["plain"].wait()


@pytest.fixture()
def guarded(servers) -> Served:
    return servers["guarded"].wait()


def _image(name: str) -> bytes:
    return (EXAMPLES / name).read_bytes()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _labels() -> list[str]:
    lines = (EXAMPLES / "labels.txt").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def _png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels, with almost no data behind it."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )


# ------------------------------------------------------------------------------------------ endpoints


def test_health_and_models(plain: Served) -> None:
    status, _, health = plain.request("GET", "/v1/health")
    assert status == 200 and health["status"] == "ok"
    assert health["model"] == "zsclip-shapes"
    assert health["limits"]["max_labels"] == 200
    assert health["limits"]["max_upload_bytes"] == 2**20
    status, _, models = plain.request("GET", "/v1/models")
    assert status == 200
    (model,) = models["models"]
    assert model["embed_dim"] == 128 and model["builtin"] is True
    assert "shapes" in model["template_sets"]


def test_openapi_describes_every_endpoint(plain: Served) -> None:
    status, _, spec = plain.request("GET", "/v1/openapi.json")
    assert status == 200
    assert {"/v1/health", "/v1/models", "/v1/classify", "/v1/embed"} <= set(spec["paths"])
    body = spec["paths"]["/v1/classify"]["post"]["requestBody"]["content"]
    assert {"application/json", "multipart/form-data"} <= set(body)
    assert "labels" in spec["components"]["schemas"]["ClassifyBody"]["required"]


def test_classify_base64_with_a_bad_image_fails_only_its_row(plain: Served) -> None:
    images = [
        {"data": _b64(_image("red-heart.png")), "name": "mine/heart-\udcff.png"},
        {"data": _b64(b"hello, I am not an image"), "name": "notes.png"},
        _b64(_image("blue-circle.png")),
    ]
    labels = ["red heart", "blue circle", "green star"]
    status, _, answer = plain.post_json("/v1/classify", {"images": images, "labels": labels})
    assert status == 200
    heart, bad, circle = answer["rows"]
    # a name that is not UTF-8 (a byte carried as a surrogate) comes back as the CLI writes it
    assert heart["path"] == "mine/heart-\udcff.png" and heart["label"] == "red heart"
    assert [entry["label"] for entry in heart["top"]][0] == "red heart"
    assert bad == {"path": "notes.png", "error": "not an image (or not a supported image format)"}
    assert circle["path"] == "image-2" and circle["label"] == "blue circle"


def _form(fields: list[tuple[str, str]], images: list[tuple[str, bytes]]) -> tuple[bytes, str]:
    """multipart/form-data as `curl -F` writes it: one part per field, then the files."""
    parts = [
        f'--B0undary\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
        for name, value in fields
    ]
    for name, data in images:
        head = f'--B0undary\r\nContent-Disposition: form-data; name="images"; filename="{name}"'
        parts.append(f"{head}\r\nContent-Type: image/png\r\n\r\n".encode() + data + b"\r\n")
    return b"".join(parts) + b"--B0undary--\r\n", "multipart/form-data; boundary=B0undary"


def test_classify_multipart_options(plain: Served) -> None:
    fields = [("labels", "red heart"), ("labels", "blue circle"), ("labels", "green star")]
    fields += [("top_k", "2"), ("min_score", "0.9999999")]
    body, kind = _form(fields, [("shapes/heart.png", _image("red-heart.png"))])
    status, _, answer = plain.request("POST", "/v1/classify", body, {"Content-Type": kind})
    assert status == 200
    (row,) = answer["rows"]
    assert row["path"] == "shapes/heart.png"  # the file name, as sent
    assert len(row["top"]) == 2  # top_k
    assert row["label"] is None and row["score"] is None  # below min_score: none of these
    assert row["top"][0]["label"] == "red heart"


def test_bomb_image_is_refused_from_its_header_in_its_own_row(plain: Served) -> None:
    images = [
        {"data": _b64(_png_claiming(40000, 40000)), "name": "bomb.png"},
        {"data": _b64(_image("green-star.png")), "name": "star.png"},
    ]
    status, _, answer = plain.post_json(
        "/v1/classify", {"images": images, "labels": ["green star", "red heart"]}
    )
    assert status == 200
    bomb, star = answer["rows"]
    assert "image too large" in bomb["error"] and "decompression bomb" in bomb["error"]
    assert star["label"] == "green star"


def test_embed_images_and_texts_match_the_cli(plain: Served, tmp_path: Path) -> None:
    images = [{"data": _b64(_image("red-heart.png")), "name": "heart.png"}]
    status, _, answer = plain.post_json(
        "/v1/embed", {"images": images, "texts": ["a red heart", "a blue circle"]}
    )
    assert status == 200
    heart, text_a, text_b = answer["rows"]
    assert heart["path"] == "heart.png" and text_a["text"] == "a red heart"
    for row in (heart, text_a, text_b):
        assert len(row["embedding"]) == 128
        assert abs(sum(v * v for v in row["embedding"]) - 1) < 1e-5  # unit length (fp32)
    local = run_cli(["embed", str(EXAMPLES / "red-heart.png"), "--format", "jsonl", "-q"])
    assert local.code == 0
    assert json.loads(local.stdout)["embedding"] == heart["embedding"]  # the same numbers


def test_classify_server_output_is_the_local_output(plain: Served, tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    shutil.copytree(EXAMPLES, folder)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (folder / "empty.png").write_bytes(b"")
    labels = str(EXAMPLES / "labels.txt")
    url = f"http://127.0.0.1:{plain.port}"
    cases = (
        ["--format", "jsonl"],
        ["--format", "csv", "--multi-label", "--top-k", "3", "--templates", "simple"],
    )
    for options in cases:
        args = ["classify", str(folder), "-", "-L", labels, *options]
        missing = f"{folder / 'missing.png'}\n"  # on stdin: an unreadable input, not a usage error
        local = run_cli([*args, "-q"], input=missing)
        remote = run_cli([*args, "-q", "--server", url], input=missing)
        assert local.code == 1  # three inputs cannot be read
        assert (remote.code, remote.stdout) == (local.code, local.stdout)
        assert remote.stdout.count("\n") >= 11  # eight images, three errors (and a header)
    remote_env = run_cli(
        ["classify", str(folder / "red-heart.png"), "-L", labels, "-q"], env={"ZSCLIP_SERVER": url}
    )
    assert remote_env.code == 0 and json.loads(remote_env.stdout)["label"] == "red heart"


def test_min_score_and_xmp_through_the_server_match_the_local_run(
    plain: Served, tmp_path: Path
) -> None:
    """--min-score is applied by the server, --xmp sidecars are written here: the same rows and
    the same sidecars as a local run; --other is refused in one line."""
    folder = tmp_path / "photos"
    shutil.copytree(EXAMPLES, folder)
    url = f"http://127.0.0.1:{plain.port}"
    labels = "blue circle,red heart,green star,orange triangle"
    for options in (["--min-score", "0.9"], ["--multi-label", "--min-score", "0.7"]):
        args = ["classify", str(folder), "-l", labels, "-f", "jsonl", "-q", "--xmp", *options]
        local = run_cli(args)
        sidecars = {path.name: path.read_bytes() for path in folder.glob("*.xmp")}
        for path in folder.glob("*.xmp"):
            path.unlink()
        remote = run_cli([*args, "--server", url])
        assert (remote.code, remote.stdout) == (local.code, local.stdout) == (0, local.stdout)
        assert {path.name: path.read_bytes() for path in folder.glob("*.xmp")} == sidecars
        rows = [json.loads(line) for line in local.stdout.splitlines()]
        assert any(row["label"] is None for row in rows) and sidecars  # both kinds of image
        assert len(sidecars) == sum(row["label"] is not None for row in rows)
        for path in folder.glob("*.xmp"):
            path.unlink()
    refused = run_cli([*args, "--other", "yellow square", "--server", url])
    assert refused.code == 2 and "--other does not work with --server" in refused.stderr


def _zsclip(entry: list[str], args: list[str], cwd: Path, stdin: str = "") -> tuple:
    process = subprocess.run(
        [sys.executable, "-X", "importtime", *entry, *args],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=cwd,
        env={k: v for k, v in os.environ.items() if k not in ("ZSCLIP_SERVER", "ZSCLIP_DEBUG")},
        timeout=STARTUP_S,
    )
    imported = {
        line.rsplit("|", 1)[1].strip()
        for line in process.stderr.splitlines()
        if line.startswith("import time:")
    }
    stderr = "".join(
        line + "\n" for line in process.stderr.splitlines() if not line.startswith("import time:")
    )
    outputs = {path.name: path.read_bytes() for path in cwd.glob("out*")}
    for path in cwd.glob("out*"):
        path.unlink()
    return (process.returncode, process.stdout, stderr, outputs), imported


def test_classify_server_without_typer_is_the_typer_command(plain: Served, tmp_path: Path) -> None:
    """`zsclip classify --server` (read without Typer, zsclip.cli._quick) against the Typer command
    itself: the same stdout, stderr, exit status and files, and none of Typer, pydantic, torch, PIL
    or rich imported on the way."""
    url = f"http://127.0.0.1:{plain.port}"
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (tmp_path / "templates.txt").write_text("a drawing of a {}\n{} on white\n")
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    nobody = f"http://127.0.0.1:{closed.getsockname()[1]}"
    image, labels = str(EXAMPLES / "red-heart.png"), str(EXAMPLES / "labels.txt")
    cases = [  # (arguments, stdin, exit status)
        ([image, "-L", labels, "--server", url], "", 0),
        ([image, "-l", "red heart,blue circle", "-k1", "--format=csv", "--server", url], "", 0),
        (["-", "-L", labels, "-t", "templates.txt", "-o", "out.tsv", "--server", url], image, 0),
        (
            [
                image,
                "broken.png",
                "-L",
                labels,
                "--multi-label",
                "--threshold",
                "0.2",
                "-q",
                "--server",
                url,
            ],
            "",
            1,
        ),
        ([image, "-L", labels, "--min-score", "0.99", "-f", "jsonl", "--server", url], "", 0),
        ([image, "--server", url], "", 2),  # no labels
        ([image, "-l", "a,b", "--threshold", "0.3", "--server", url], "", 2),  # not multi-label
        ([image, "-l", "a,b", "--server", nobody], "", 4),
    ]
    typer_entry = ["-c", "from zsclip.cli.app import main; main()", "classify"]
    try:
        for args, stdin, status in cases:
            quick, imported = _zsclip(["-m", "zsclip", "classify"], args, tmp_path, stdin)
            typed, _ = _zsclip(typer_entry, args, tmp_path, stdin)
            assert quick == typed, args
            assert quick[0] == status, (args, quick)
            heavy = {name for name in imported if name.split(".")[0] in _HEAVY}
            assert not heavy, (args, sorted(heavy))
    finally:
        closed.close()


_HEAVY = {"typer", "click", "pydantic", "pydantic_core", "torch", "PIL", "rich", "numpy"}


def test_classify_without_a_server_says_so_in_one_line(tmp_path: Path) -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    result = run_cli(
        ["classify", str(EXAMPLES / "red-heart.png"), "--labels", "a,b", "--server", url]
    )
    assert result.code == 4
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1
    assert f"no zsclip server answers at {url}" in result.stderr
    refused = run_cli(["classify", str(EXAMPLES), "-l", "a,b", "--server", url, "--model", "x"])
    assert refused.code == 2 and "--model does not apply with --server" in refused.stderr


# ------------------------------------------------------------------------------------------ limits


def test_too_many_labels(plain: Served) -> None:
    labels = [f"label {index}" for index in range(201)]
    status, _, answer = plain.post_json(
        "/v1/classify", {"images": [_b64(_image("red-heart.png"))], "labels": labels}
    )
    assert status == 413
    assert answer["error"]["code"] == "too_many_labels"
    assert "at most 200" in answer["error"]["message"]


def test_too_many_images(plain: Served) -> None:
    images = [_b64(_image("red-heart.png"))] * 17
    status, _, answer = plain.post_json("/v1/classify", {"images": images, "labels": ["a", "b"]})
    assert (status, answer["error"]["code"]) == (413, "too_many_images")


def test_malformed_and_invalid_requests(plain: Served) -> None:
    status, _, answer = plain.request(
        "POST", "/v1/classify", b'{"labels": ["a",', {"Content-Type": "application/json"}
    )
    assert (status, answer["error"]["code"]) == (400, "malformed_json")
    status, _, answer = plain.post_json("/v1/classify", {"labels": ["a", "b"], "top_k": 0})
    assert (status, answer["error"]["code"]) == (422, "invalid_request")
    assert "top_k" in answer["error"]["message"]
    status, _, answer = plain.post_json("/v1/classify", {"labels": ["cat", "Cat "]})
    assert (status, answer["error"]["code"]) == (422, "invalid_labels")
    status, _, answer = plain.post_json("/v1/classify", {"labels": ["a"], "templates": "/etc/x"})
    assert (status, answer["error"]["code"]) == (422, "unknown_templates")
    status, _, answer = plain.post_json("/v1/classify", {"labels": ["a"], "images": ["@@@"]})
    assert (status, answer["error"]["code"]) == (422, "invalid_base64")
    status, _, answer = plain.request("POST", "/v1/classify", b"x", {"Content-Type": "text/plain"})
    assert (status, answer["error"]["code"]) == (415, "unsupported_media_type")
    status, _, answer = plain.request("GET", "/v1/nothing-here")
    assert (status, answer["error"]["code"]) == (404, "not_found")


def test_oversized_upload_is_refused_before_it_is_read(plain: Served) -> None:
    with socket.create_connection(("127.0.0.1", plain.port), timeout=30) as sock:
        sock.sendall(
            b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 5000000\r\n\r\n"
        )  # and no body: the answer must not wait for it
        reply = b""
        while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413")
    error = json.loads(body)["error"]
    assert error["code"] == "upload_too_large" and "--max-upload-mb" in error["message"]


# ------------------------------------------------------------------------------------------ guarded


def _auth(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_token_is_required_on_every_request(guarded: Served) -> None:
    for path in ("/v1/health", "/v1/models", "/v1/openapi.json"):
        status, headers, answer = guarded.request("GET", path)
        assert status == 401 and answer["error"]["code"] == "unauthorized"
        assert headers.get("www-authenticate") == "Bearer"
    status, _, _ = guarded.request(
        "GET", "/v1/health", headers=_auth("test-token-0123456789abcdeX")
    )
    assert status == 401
    status, _, answer = guarded.post_json("/v1/classify", {"labels": ["a", "b"]})
    assert status == 401
    status, _, answer = guarded.request("GET", "/v1/health", headers=_auth())
    assert status == 200 and answer["status"] == "ok"


def _in_flight(server: Served) -> tuple[threading.Thread, dict]:
    """Start a one-image classify in a thread; return once the server has admitted it."""
    result: dict = {}
    body = {"images": [_b64(_image("red-heart.png"))], "labels": ["red heart", "blue circle"]}

    def post() -> None:
        result["answer"] = server.post_json("/v1/classify", body, _auth())

    thread = threading.Thread(target=post)
    thread.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        _, _, health = server.request("GET", "/v1/health", headers=_auth())
        if health["queue"]["admitted"] == 1:
            return thread, result
        time.sleep(0.05)
    raise AssertionError("the request was never admitted")


def test_full_queue_answers_503_with_retry_after(guarded: Served) -> None:
    thread, first = _in_flight(guarded)
    body = {"images": [_b64(_image("blue-circle.png"))], "labels": ["red heart", "blue circle"]}
    status, headers, answer = guarded.post_json("/v1/classify", body, _auth())
    assert status == 503 and answer["error"]["code"] == "queue_full"
    assert headers.get("retry-after") == "1"
    thread.join(60)
    status, _, done = first["answer"]
    assert status == 200 and done["rows"][0]["label"] == "red heart"


def test_sigterm_drains_the_request_in_flight_then_exits_0(guarded: Served) -> None:
    thread, first = _in_flight(guarded)
    guarded.process.send_signal(signal.SIGTERM)
    thread.join(60)
    status, _, answer = first["answer"]
    assert status == 200 and answer["rows"][0]["label"] == "red heart"
    assert guarded.process.wait(60) == 0
    assert any("stopping" in line for line in guarded.lines)


# ------------------------------------------------------------------------------------------ command


def test_other_hosts_need_a_token_and_tokens_need_length() -> None:
    result = run_cli(["serve", "--host", "0.0.0.0", "--port", "0"], env={"ZSCLIP_TOKEN": ""})
    assert result.code == 2 and "reachable from other machines" in result.stderr
    assert result.stderr.count("\n") == 1
    result = run_cli(["serve", "--token", "short"])
    assert result.code == 2 and "at least 16" in result.stderr


def test_serve_without_the_extra_names_the_install(monkeypatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "uvicorn" else real(name, *a)
    )
    result = run_cli(["serve"])
    assert result.code == 2
    assert "pip install 'zsclip[serve]'" in result.stderr and result.stderr.count("\n") == 1


def test_the_bomb_limit_is_the_cli_one() -> None:
    from zsclip.core.transform import DEFAULT_MAX_PIXELS
    from zsclip.serve import engine

    assert engine.DEFAULT_MAX_PIXELS == DEFAULT_MAX_PIXELS


# ------------------------------------------------------------------------------------------ in-process


class _Entry:
    def __init__(self, value: float) -> None:
        self.value = value


def _recording_batcher(max_batch: int, wait_s: float):
    import torch

    from zsclip.serve.batcher import Batcher

    sizes: list[int] = []

    def encode(entries):
        sizes.append(len(entries))
        return torch.tensor([[entry.value] for entry in entries])  # [n, 1]

    return Batcher(encode, max_batch=max_batch, wait_s=wait_s), sizes


def test_batcher_merges_requests_and_splits_large_ones() -> None:
    batcher, sizes = _recording_batcher(max_batch=4, wait_s=0.0)
    futures = [
        batcher.submit([_Entry(10 * job + i) for i in range(n)]) for job, n in enumerate((3, 3, 2))
    ]
    batcher.start()  # all three were queued: batches of 4, 4 across the requests
    results = [future.result(10) for future in futures]
    batcher.close()
    assert sizes == [4, 4]
    assert [r.flatten().tolist() for r in results] == [[0, 1, 2], [10, 11, 12], [20, 21]]


def test_batcher_waits_for_company_within_the_window() -> None:
    batcher, sizes = _recording_batcher(max_batch=8, wait_s=5.0)
    batcher.start()
    first = batcher.submit([_Entry(1)])
    second = batcher.submit([_Entry(2)])  # arrives within the window: the same batch
    third = batcher.submit([_Entry(3)] * 6)  # fills the batch: no need to wait out the window
    began = time.monotonic()
    assert first.result(10).item() == 1 and second.result(10).item() == 2
    third.result(10)
    assert time.monotonic() - began < 4
    batcher.close()
    assert sizes == [8]


def test_batcher_skips_abandoned_requests_and_reports_model_failures() -> None:
    from zsclip.serve.batcher import Batcher

    batcher, sizes = _recording_batcher(max_batch=2, wait_s=0.0)
    gone = batcher.submit([_Entry(1), _Entry(2)])
    assert gone.cancel()
    kept = batcher.submit([_Entry(3)])
    batcher.start()
    assert kept.result(10).item() == 3
    batcher.close()
    assert sizes == [1]

    def broken(entries):
        raise RuntimeError("out of memory")

    failing = Batcher(broken, max_batch=4, wait_s=0.0)
    failing.start()
    with pytest.raises(RuntimeError, match="out of memory"):
        failing.submit([_Entry(1)]).result(10)
    failing.close()


def _call(app, body_chunks: list[bytes], headers: list[tuple[bytes, bytes]]):
    """Run an ASGI app on one request; return (status, JSON body)."""
    sent: list[dict] = []
    chunks = list(body_chunks)

    async def receive():
        if chunks:
            return {"type": "http.request", "body": chunks.pop(0), "more_body": bool(chunks)}
        await asyncio.sleep(3600)

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/", "headers": headers}
    asyncio.run(app(scope, receive, send))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return status, json.loads(body)


def test_guard_counts_bodies_without_a_length_and_bounds_the_time() -> None:
    from zsclip.serve.app import Guard
    from zsclip.serve.engine import RequestError

    async def reads_everything(scope, receive, send):
        try:
            while (await receive()).get("more_body"):
                pass
        except RequestError as err:  # FastAPI turns this into its JSON error; here by hand
            await send({"type": "http.response.start", "status": err.status, "headers": []})
            await send(
                {"type": "http.response.body", "body": json.dumps({"code": err.code}).encode()}
            )
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    guard = Guard(reads_everything, token=None, max_body=1000, timeout_s=30)
    assert _call(guard, [b"x" * 600, b"x" * 300], []) == (200, {})
    assert _call(guard, [b"x" * 600, b"x" * 600], []) == (413, {"code": "upload_too_large"})

    async def never_answers(scope, receive, send):
        await asyncio.sleep(3600)

    slow = Guard(never_answers, token=None, max_body=1000, timeout_s=0.2)
    status, answer = _call(slow, [b""], [])
    assert status == 408 and answer["error"]["code"] == "request_timeout"
