"""`zsclip models` and `zsclip download`: run the commands and parse stdout. No outside network."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import typer
from local_server import LocalServer, closed_port_url, payload
from typer.testing import CliRunner

from zsclip import paths
from zsclip.cli import models as models_cmd
from zsclip.core import catalogue as hub
from zsclip.errors import UserError

REPO_ROOT = Path(__file__).resolve().parents[1]
NINE = [
    "RN50",
    "RN101",
    "RN50x4",
    "RN50x16",
    "RN50x64",
    "ViT-B/32",
    "ViT-B/16",
    "ViT-L/14",
    "ViT-L/14@336px",
]


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    monkeypatch.setenv("ZSCLIP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("no_proxy", "*")
    monkeypatch.delenv("ZSCLIP_OFFLINE", raising=False)
    monkeypatch.setattr(paths, "weights_dir", lambda: tmp_path / "weights")
    monkeypatch.setattr(hub, "_default_progress", None)


def invoke(*args: str):
    """Run models/download in an app of their own (independent of the other commands' modules)."""
    app = typer.Typer()
    models_cmd.register(app)
    return CliRunner().invoke(app, list(args))


def test_models_json_lists_every_name_uncached():
    result = invoke("models", "--format", "json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [row["name"] for row in rows if row["kind"] == "openai"] == NINE
    assert [row["name"] for row in rows if row["kind"] == "vocab"] == ["vocab"]
    keys = {"name", "kind", "size", "cached", "path", "found_in", "url", "description"}
    for row in rows:
        assert set(row) == keys | {"top1", "params", "image_size"}
        assert row["cached"] is False and row["path"] is None and row["found_in"] is None
    vit = next(row for row in rows if row["name"] == "ViT-B/32")
    assert vit["size"] == 353_976_522 and vit["top1"] == 63.32 and vit["params"] == 151_277_313


def test_models_json_shows_builtin_and_cached_files(tmp_path):
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "shapes.safetensors").write_bytes(b"12345")
    cached = hub.ENTRIES["ViT-B/16"].path()
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"x" * 10)
    rows = {row["name"]: row for row in json.loads(invoke("models", "--format", "json").stdout)}
    assert rows["shapes"] == {
        "name": "shapes",
        "kind": "builtin",
        "size": 5,
        "cached": True,
        "path": str(tmp_path / "weights" / "shapes.safetensors"),
        "found_in": "built in",
        "url": None,
        "top1": None,
        "params": None,
        "image_size": None,
        "description": "built-in model",  # its header is unreadable: no description of its own
    }
    assert rows["ViT-B/16"]["cached"] is True and rows["ViT-B/16"]["path"] == str(cached)
    assert rows["ViT-B/16"]["found_in"] == "zsclip cache"
    assert rows["ViT-B/16"]["size"] == 10 and rows["ViT-B/32"]["cached"] is False


def test_models_table_is_plain_text_with_a_header():
    result = invoke("models")
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["NAME", "KIND", "SIZE", "TOP1", "PARAMS", "FOUND", "ABOUT", "PATH"]
    hf_names = [e.name for e in hub.ENTRIES.values() if e.kind == "hf"]
    assert len(lines) == 1 + len(NINE) + len(hf_names) + 1
    assert "\x1b" not in result.stdout
    assert lines[6].split()[:7] == ["ViT-B/32", "openai", "337.6", "MiB", "63.3", "151M", "-"]
    dfn = next(line for line in lines if line.startswith("ViT-H-14-dfn5b "))
    assert dfn.split()[:7] == ["ViT-H-14-dfn5b", "hf", "3.67", "GiB", "83.4", "986M", "-"]


def test_models_rejects_an_unknown_format():
    result = invoke("models", "--format", "xml")
    assert isinstance(result.exception, UserError) and "table, json" in str(result.exception)


def _serve_entries(server: LocalServer, monkeypatch) -> bytes:
    weights, vocab = payload(60_000, seed=11), payload(2_000, seed=12)
    server.files.update({"/w.pt": weights, "/v.gz": vocab})
    for name, path, data in (("ViT-B/32", "/w.pt", weights), ("vocab", "/v.gz", vocab)):
        moved = replace(
            hub.ENTRIES[name], url=server.url(path), sha256=hashlib.sha256(data).hexdigest()
        )
        monkeypatch.setitem(hub.ENTRIES, name, moved)
    return weights


def test_download_fetches_and_prints_the_paths(server, monkeypatch):
    weights = _serve_entries(server, monkeypatch)
    result = invoke("download", "ViT-B-32", "vocab")
    assert result.exit_code == 0, result.output
    out = result.stdout.splitlines()
    assert out == [str(hub.ENTRIES["ViT-B/32"].path()), str(hub.ENTRIES["vocab"].path())]
    assert Path(out[0]).read_bytes() == weights
    assert (
        "downloading ViT-B-32.pt" in result.stderr
    )  # stderr is not a terminal: a note instead of a bar
    rows = {row["name"]: row for row in json.loads(invoke("models", "--format", "json").stdout)}
    assert rows["ViT-B/32"]["cached"] and rows["vocab"]["cached"]
    quiet = invoke("download", "--quiet", "--verify", "ViT-B/32")
    assert quiet.exit_code == 0 and quiet.stderr == "" and len(server.requests("/w.pt")) == 1


def test_download_offline_reports_each_missing_name(server, monkeypatch):
    _serve_entries(server, monkeypatch)
    result = invoke("download", "--offline", "ViT-B/32", "RN50")
    assert isinstance(result.exception, UserError) and result.exception.exit_code == 1
    assert "2 of 2 downloads failed" in str(result.exception)
    assert result.stderr.count("offline mode is on") == 2
    assert server.log == []


def test_download_unknown_name_is_a_usage_error():
    result = invoke("download", "ViT-Z/99")
    assert isinstance(result.exception, UserError) and result.exception.exit_code == 2
    assert "zsclip models" in str(result.exception)


def _run_cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), **env}
    return subprocess.run(
        [sys.executable, "-m", "zsclip", *args],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_models_json_end_to_end():
    result = _run_cli("models", "--format", "json")
    assert result.returncode == 0, result.stderr
    assert [row["name"] for row in json.loads(result.stdout) if row["kind"] == "openai"] == NINE


def test_cli_download_with_the_server_down_prints_one_line():
    endpoint = closed_port_url("").rstrip("/")
    result = _run_cli("download", "hf:org/clip-tiny", HF_ENDPOINT=endpoint)
    assert result.returncode == 1 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("zsclip: error: cannot download hf:org/clip-tiny")
    assert "built-in model" in lines[0] and "--model PATH" in lines[0]
