"""Weights already on disk are found, never fetched again: the Hugging Face cache (transformers and
OpenCLIP layouts), downloads through huggingface_hub from a local stand-in for the Hub, and OpenAI's
package's cache (~/.cache/clip) behind its SHA-256 check. Nothing here leaves 127.0.0.1."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch
from cli_helpers import run_zsclip
from hub_files import put_in_hub_cache, serve_repo, tiny_repos
from local_server import closed_port_url, payload, sha

from zsclip.core import catalogue as hub
from zsclip.core.checkpoints import load_model
from zsclip.download import OfflineMissing
from zsclip.errors import UserError


@pytest.fixture(scope="module")
def repos(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return tiny_repos(tmp_path_factory.mktemp("tiny-repos"))


@pytest.fixture(autouse=True)
def _no_hub(monkeypatch, tmp_path) -> None:
    """A private, empty Hugging Face cache, and a Hub address where nothing answers."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_ENDPOINT", closed_port_url(""))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("ZSCLIP_OFFLINE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(hub, "_default_progress", None)


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_both_layouts_load_offline_from_the_hub_cache(repos, tmp_path) -> None:
    cache = Path(os.environ["HF_HUB_CACHE"])
    put_in_hub_cache(cache, "org/tiny-hf", repos["transformers"])
    put_in_hub_cache(cache, "org/tiny-oc", repos["openclip"])
    own = load_model(repos["own"])
    for repo_id, source in (("org/tiny-hf", "huggingface"), ("org/tiny-oc", "openclip")):
        loaded = load_model(f"hf:{repo_id}", offline=True)
        assert loaded.path.is_relative_to(cache) and loaded.metadata["source_format"] == source
        _same_weights(loaded.model, own.model)
        assert (
            loaded.tokenizer("a photo of a dog").tolist()
            == own.tokenizer("a photo of a dog").tolist()
        )


def test_the_cli_classifies_with_a_cached_repo_offline_in_a_fresh_process(repos, tmp_path) -> None:
    cache = Path(os.environ["HF_HUB_CACHE"])
    put_in_hub_cache(cache, "org/tiny-hf", repos["transformers"])
    put_in_hub_cache(cache, "org/tiny-oc", repos["openclip"])
    image = tmp_path / "x.png"
    from hub_files import png_bytes

    image.write_bytes(png_bytes((61, 47)))
    outputs = []
    for spec in ("hf:org/tiny-hf", "hf:org/tiny-oc", str(repos["own"])):
        args = ["classify", str(image), "--labels", "cat,dog", "-t", "simple", "-f", "jsonl"]
        result = run_zsclip([*args, "--model", spec, "--offline", "--no-cache"])
        assert result.returncode == 0, result.stderr
        outputs.append(json.loads(result.stdout))
    assert outputs[0]["label"] == outputs[1]["label"] == outputs[2]["label"]


def test_offline_without_a_copy_names_the_cache_and_the_way_forward(tmp_path) -> None:
    with pytest.raises(OfflineMissing, match="not in the Hugging Face cache .*zsclip download"):
        hub.resolve("hf:org/absent", offline=True)


def test_hf_hub_offline_is_honoured(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OfflineMissing):
        hub.resolve("hf:org/absent")


def test_an_unreachable_hub_is_one_line_naming_the_ways_forward() -> None:
    with pytest.raises(UserError, match="cannot download hf:org/absent: cannot reach") as caught:
        hub.resolve("hf:org/absent")
    assert "\n" not in str(caught.value) and "--model PATH" in str(caught.value)


def test_a_download_lands_in_the_shared_cache_and_a_second_process_finds_it(
    repos, server, tmp_path
) -> None:
    serve_repo(server, "org/tiny-oc", repos["openclip"])
    env = {"HF_ENDPOINT": server.url(""), "HF_HUB_CACHE": os.environ["HF_HUB_CACHE"]}
    first = run_zsclip(["download", "hf:org/tiny-oc"], env=env)
    assert first.returncode == 0, first.stderr
    folder = Path(first.stdout.strip())
    cache = Path(os.environ["HF_HUB_CACHE"])
    assert (
        folder
        == cache / "models--org--tiny-oc" / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    )
    for name, data in repos["openclip"].items():
        assert (folder / name).read_bytes() == data
    gets = [e for e in server.log if e["method"] == "GET" and e["status"] == 200]
    assert sorted(Path(e["path"]).name for e in gets) == sorted(repos["openclip"])
    assert not server.requests("/org/tiny-oc/resolve/main/config.json", "GET")  # one layout only
    count = len(server.log)
    image = tmp_path / "x.png"
    from hub_files import png_bytes

    image.write_bytes(png_bytes((40, 30)))
    second = run_zsclip(
        ["classify", str(image), "--labels", "a,b", "-t", "simple", "--model", "hf:org/tiny-oc"],
        env={**env, "HF_ENDPOINT": closed_port_url("")},  # the Hub is gone: only the cache helps
    )
    assert second.returncode == 0, second.stderr
    assert len(server.log) == count
    listed = run_zsclip(["models", "--format", "json"], env=env)
    assert listed.returncode == 0, listed.stderr
    row = next(r for r in json.loads(listed.stdout) if r["name"] == "hf:org/tiny-oc")
    assert row["cached"] and row["found_in"] == "Hugging Face cache" and row["path"] == str(folder)


def test_a_transformers_only_repo_is_downloaded_in_its_layout(repos, server) -> None:
    serve_repo(server, "org/tiny-hf", repos["transformers"])
    os.environ["HF_ENDPOINT"] = server.url("")  # restored by the autouse fixture's monkeypatch
    folder = hub.resolve("hf:org/tiny-hf")
    assert {p.name for p in folder.iterdir()} == set(repos["transformers"])
    assert server.requests("/org/tiny-hf/resolve/main/open_clip_config.json", "HEAD")
    _same_weights(load_model(folder).model, load_model(repos["own"]).model)


def test_a_repo_without_clip_files_is_one_line(server) -> None:
    serve_repo(server, "org/not-clip", {"README.md": b"hello"})
    os.environ["HF_ENDPOINT"] = server.url("")
    with pytest.raises(UserError, match="neither open_clip_config.json nor config.json"):
        hub.resolve("hf:org/not-clip")


def test_catalogue_names_resolve_to_their_repositories(repos) -> None:
    cache = Path(os.environ["HF_HUB_CACHE"])
    put_in_hub_cache(cache, "apple/DFN5B-CLIP-ViT-H-14", repos["openclip"])
    path = hub.resolve("ViT-H-14-dfn5b", offline=True)
    assert path.is_relative_to(cache / "models--apple--DFN5B-CLIP-ViT-H-14")
    assert hub.lookup("hf:apple/DFN5B-CLIP-ViT-H-14").name == "ViT-H-14-dfn5b"


# ----------------------------------------------------------------------------- OpenAI's own cache


def _openai_entry(server, data: bytes, monkeypatch) -> hub.Entry:
    """RN50, moved to the local server, with the hash and size of `data`."""
    server.files["/clip/models/RN50.pt"] = data
    server.files["/vocab.gz"] = b"vocab"
    entry = dataclasses.replace(
        hub.ENTRIES["RN50"],
        url=server.url("/clip/models/RN50.pt"),
        sha256=sha(data),
        size=len(data),
    )
    vocab = dataclasses.replace(
        hub.ENTRIES["vocab"], url=server.url("/vocab.gz"), sha256=sha(b"vocab"), size=5
    )
    monkeypatch.setitem(hub.ENTRIES, "RN50", entry)
    monkeypatch.setitem(hub.ENTRIES, "vocab", vocab)
    return entry


def test_openai_cache_file_with_the_published_hash_is_used(server, monkeypatch) -> None:
    data = payload(50_000, seed=11)
    _openai_entry(server, data, monkeypatch)
    theirs = Path(os.environ["HOME"]) / ".cache" / "clip" / "RN50.pt"
    theirs.parent.mkdir(parents=True)
    theirs.write_bytes(data)
    assert hub.resolve("RN50") == theirs
    assert not server.requests("/clip/models/RN50.pt")
    row = next(r for r in hub.catalog() if r["name"] == "RN50")
    assert (
        row["cached"] and row["path"] == str(theirs) and row["found_in"].startswith("OpenAI cache")
    )
    assert hub.resolve("RN50") == theirs  # the second time from the remembered hash


def test_openai_cache_file_that_differs_is_refused_and_fetched_again(server, monkeypatch) -> None:
    data = payload(50_000, seed=12)
    _openai_entry(server, data, monkeypatch)
    theirs = Path(os.environ["HOME"]) / ".cache" / "clip" / "RN50.pt"
    theirs.parent.mkdir(parents=True)
    damaged = bytearray(data)
    damaged[1000] ^= 0xFF
    theirs.write_bytes(bytes(damaged))
    path = hub.resolve("RN50")
    assert path == hub.ENTRIES["RN50"].path() and path.read_bytes() == data
    assert len(server.requests("/clip/models/RN50.pt")) == 1
    assert theirs.read_bytes() == bytes(damaged)  # the other package's file is left alone
    row = next(r for r in hub.catalog() if r["name"] == "RN50")
    assert row["found_in"] == "zsclip cache" and row["path"] == str(path)


def test_the_curated_table_names_clip_models_with_their_published_scores() -> None:
    hf = [entry for entry in hub.ENTRIES.values() if entry.kind == "hf"]
    openai = [entry for entry in hub.ENTRIES.values() if entry.kind == "openai"]
    assert len(openai) == 9 and all(entry.top1 is not None for entry in openai)
    assert {entry.family for entry in hf} >= {"laion2b", "datacomp", "dfn", "metaclip"}
    for entry in hf:
        assert hub.lookup(entry.name) is entry and hub.lookup(f"hf:{entry.repo}") is entry
        assert 60.0 < entry.top1 < 90.0 and entry.params > 100_000_000 and entry.size > 10**8
    best_openai = max(entry.top1 for entry in openai)
    assert max(entry.top1 for entry in hf) - best_openai > 7.0  # the "about 8 points"


def test_download_progress_reaches_zsclips_display(repos, server) -> None:
    import contextlib

    serve_repo(server, "org/tiny-oc", repos["openclip"])
    os.environ["HF_ENDPOINT"] = server.url("")
    seen: list = []

    @contextlib.contextmanager
    def factory(label, size):
        seen.append(label)
        yield lambda done, total: seen.append((done, total))

    hub.resolve("hf:org/tiny-oc", progress=factory)
    assert seen[0] == "hf:org/tiny-oc/open_clip_model.safetensors"  # the weights only
    size = len(repos["openclip"]["open_clip_model.safetensors"])
    assert seen[-1] == (size, size)
