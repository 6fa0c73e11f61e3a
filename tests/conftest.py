"""Shared fixtures. Nothing here touches the network."""

from __future__ import annotations

import importlib.util
import signal
from pathlib import Path

import pytest


def _ignore(signum: int, frame: object) -> None:
    pass


def pytest_configure(config: pytest.Config) -> None:
    # Programs inherit ignored signals: under nohup SIGHUP is ignored, in a background shell job
    # SIGINT. The tests that signal zsclip need the defaults, as from a terminal. A Python handler
    # is not inherited across exec, so one that does nothing gives every child the defaults while
    # the test run itself still ignores what it was started to ignore.
    for signum in (signal.SIGHUP, signal.SIGINT):
        if signal.getsignal(signum) == signal.SIG_IGN:
            signal.signal(signum, _ignore)


def _open_clip_vocab() -> Path | None:
    # Locate the file inside the installed open-clip-torch wheel without importing open_clip
    # (importing it needs torchvision, which we do not install).
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "bpe_simple_vocab_16e6.txt.gz"
        if candidate.is_file():
            return candidate
    return None


@pytest.fixture(scope="session")
def standard_vocab_path() -> Path:
    """OpenAI's 49,408-token BPE vocabulary, taken from the open-clip-torch wheel (a test-only install)."""
    path = _open_clip_vocab()
    if path is None:
        pytest.skip("needs the standard vocabulary: pip install --no-deps open-clip-torch")
    return path


@pytest.fixture(autouse=True)
def _private_cache(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every test gets its own empty $ZSCLIP_CACHE, so nothing reads or fills the user's ~/.cache/zsclip
    (classify and embed cache image embeddings and label classifiers there by default)."""
    monkeypatch.setenv("ZSCLIP_CACHE", str(tmp_path_factory.mktemp("zsclip-cache")))


@pytest.fixture(autouse=True)
def _private_settings(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every test gets its own empty settings folder ($XDG_CONFIG_HOME) and no $ZSCLIP_MODEL, so the
    user's `zsclip config set model ...` never changes which model a test loads."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path_factory.mktemp("zsclip-config")))
    monkeypatch.delenv("ZSCLIP_MODEL", raising=False)


@pytest.fixture()
def server():
    """A local HTTP server on 127.0.0.1 (tests/local_server.py), closed after the test."""
    from local_server import LocalServer

    srv = LocalServer()
    yield srv
    srv.close()
