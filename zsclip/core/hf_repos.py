"""`hf:ORG/NAME`: CLIP repositories on the Hugging Face Hub, found in the shared cache or downloaded
with huggingface_hub.

A repository holds one of two layouts, and many hold both:
  * OpenCLIP: open_clip_config.json + open_clip_model.safetensors, open_clip_pytorch_model.safetensors
    or open_clip_pytorch_model.bin (the names open_clip's own loader accepts);
  * transformers: config.json + model.safetensors or pytorch_model.bin, with tokenizer and
    preprocessor files beside them.
The OpenCLIP layout wins when both are there: its config states the preprocessing the weights were
trained and scored with (DFN's squash resize, for one), and in timm's repositories config.json
describes an image tower only.

Files live in huggingface_hub's cache ($HF_HUB_CACHE, else $HF_HOME/hub, else
~/.cache/huggingface/hub), shared with transformers and open_clip: a repository either of them
downloaded is used as it is, without asking the network. Downloads go through `hf_hub_download`,
so tokens (HF_TOKEN or `hf auth login`), mirrors ($HF_ENDPOINT), HF_HUB_OFFLINE and Xet storage
work as in every Hugging Face tool. Older zsclip versions kept hf: downloads in
<zsclip cache>/hf/ORG/NAME; such folders are still used.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator, Optional

from zsclip import paths
from zsclip.download import DownloadError, OfflineMissing, Progress, Unreachable, offline_from_env
from zsclip.errors import UserError

ProgressFactory = Callable[[str, Optional[int]], ContextManager[Progress]]

OPEN_CLIP_CONFIG = "open_clip_config.json"
# as zsclip.core.foreign.OPEN_CLIP_WEIGHTS, repeated so that listing the caches needs no torch
OPEN_CLIP_WEIGHTS = (
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.safetensors",
    "open_clip_pytorch_model.bin",
)
HF_CONFIG = "config.json"
HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json")
HF_EXTRAS = (*TOKENIZER_FILES, "special_tokens_map.json", "preprocessor_config.json")
LAYOUTS = {  # layout -> (config file, weight files in order of preference)
    "openclip": (OPEN_CLIP_CONFIG, OPEN_CLIP_WEIGHTS),
    "transformers": (HF_CONFIG, HF_WEIGHTS),
}
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
WAYS_FORWARD = "use the built-in model (leave out --model) or --model PATH with a local checkpoint"


def check_repo_id(repo_id: str) -> str:
    if "/.." in f"/{repo_id}" or "--" in repo_id or not _REPO_ID.match(repo_id):
        raise UserError(f"hf:{repo_id} is not ORG/NAME; write e.g. hf:openai/clip-vit-base-patch32")
    return repo_id


def hub_cache_dir() -> Path:
    """huggingface_hub's cache folder, read from the environment at each call (as the library does
    at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "huggingface" / "hub"


def hub_offline() -> bool:
    """HF_HUB_OFFLINE=1 (or ZSCLIP_OFFLINE=1): use only what the caches hold."""
    value = os.environ.get("HF_HUB_OFFLINE", "").strip().lower()
    return value in ("1", "true", "yes", "on") or offline_from_env()


def legacy_folder(repo_id: str) -> Path:
    """Where zsclip before version 0.2 kept an hf: download."""
    return paths.cache_dir() / "hf" / repo_id


def layout_of(folder: Path) -> str | None:
    """ "openclip" or "transformers" when the folder holds a complete copy of that layout, else None."""
    for layout, (config, weights) in LAYOUTS.items():
        if (folder / config).is_file() and any((folder / name).is_file() for name in weights):
            return layout
    return None


def find_cached(repo_id: str, revision: str = "main") -> Path | None:
    """The folder of a complete copy of the repository in the Hugging Face cache (the snapshot
    `revision` points at) or in zsclip's old cache folder; None when neither holds one. Never
    touches the network."""
    snapshot = _snapshot_folder(repo_id, revision)
    if snapshot is not None and layout_of(snapshot):
        return snapshot
    legacy = legacy_folder(repo_id)
    return legacy if layout_of(legacy) else None


def _snapshot_folder(repo_id: str, revision: str) -> Path | None:
    repo = hub_cache_dir() / f"models--{repo_id.replace('/', '--')}"
    ref = repo / "refs" / revision
    commit = revision
    with contextlib.suppress(OSError, UnicodeDecodeError):
        commit = ref.read_text(encoding="utf-8").strip() if ref.is_file() else revision
    folder = repo / "snapshots" / commit
    if not re.fullmatch(r"[0-9A-Za-z._-]{1,100}", commit) or not folder.is_dir():
        return None
    return folder


def fetch(
    repo_id: str,
    *,
    offline: bool = False,
    progress: ProgressFactory | None = None,
    revision: str = "main",
) -> Path:
    """The local folder of hf:`repo_id`: from a cache when a complete copy is there, else
    downloaded into the Hugging Face cache. Errors are one UserError line naming the way forward."""
    check_repo_id(repo_id)
    found = find_cached(repo_id, revision)
    if found is not None:
        return found
    if offline or hub_offline():
        raise OfflineMissing(
            f"hf:{repo_id} is not in the Hugging Face cache ({hub_cache_dir()}) and offline mode is "
            f"on; run `zsclip download hf:{repo_id}` once while online, or {WAYS_FORWARD}"
        )
    _check_reachable(repo_id)
    try:
        with _quiet_library():
            return _download(repo_id, revision, progress)
    except _Missing as err:
        raise UserError(str(err)) from None


def _check_reachable(repo_id: str) -> None:
    """Fail at once when nothing listens at the Hub's address (no network, a refused port, a name
    that does not resolve): huggingface_hub would retry for about 20 seconds, printing as it goes.
    Only a TCP connection is tried; behind a proxy (HTTPS_PROXY, ...) the library is left to it."""
    import socket
    import urllib.parse

    if any(
        os.environ.get(name)
        for name in (
            "HTTPS_PROXY",
            "https_proxy",
            "HTTP_PROXY",
            "http_proxy",
            "ALL_PROXY",
            "all_proxy",
        )
    ):
        return
    parts = urllib.parse.urlsplit(_endpoint())
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname or "", port), timeout=15):
            pass
    except OSError as err:
        raise Unreachable(_unreachable(repo_id, err)) from None


@contextlib.contextmanager
def _quiet_library() -> Iterator[None]:
    """huggingface_hub logs retries and notes as multi-line warnings; zsclip's errors say it in one
    line, so its logger is held to errors while zsclip calls it (and restored after)."""
    import logging

    logger = logging.getLogger("huggingface_hub")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


class _Missing(Exception):
    """The repository exists but lacks a file the layout needs."""


def _download(repo_id: str, revision: str, progress: ProgressFactory | None) -> Path:
    """Fetch the OpenCLIP layout when the repository has it, else the transformers one."""
    get = _Getter(repo_id, revision, progress)
    for layout, (config, weights) in LAYOUTS.items():
        config_path = get(config)
        if config_path is None:
            continue
        for name in HF_EXTRAS if layout == "transformers" else TOKENIZER_FILES:
            get(name)
        if not any(get(name, big=True) is not None for name in weights):
            raise _Missing(f"hf:{repo_id} has {config} but none of {', '.join(weights)}")
        return config_path.parent
    raise _Missing(
        f"hf:{repo_id} has neither {OPEN_CLIP_CONFIG} nor {HF_CONFIG}; is it a CLIP model repository?"
    )


class _Getter:
    """One file of one repository through hf_hub_download; None when the repository lacks it."""

    def __init__(self, repo_id: str, revision: str, progress: ProgressFactory | None) -> None:
        self.repo_id, self.revision, self.progress = repo_id, revision, progress

    def __call__(self, name: str, *, big: bool = False) -> Path | None:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError

        kwargs: dict[str, Any] = {
            "revision": self.revision,
            "cache_dir": str(hub_cache_dir()),
            "endpoint": os.environ.get("HF_ENDPOINT") or None,
            "library_name": "zsclip",
        }
        try:
            with self._bar(name if big else None) as tqdm_class:
                if tqdm_class is not None and _takes_tqdm_class():
                    kwargs["tqdm_class"] = tqdm_class
                return Path(hf_hub_download(self.repo_id, name, **kwargs))
        except EntryNotFoundError as err:
            if type(err).__name__ == "LocalEntryNotFoundError":  # the network failed, no copy
                raise Unreachable(_unreachable(self.repo_id, err)) from None
            return None
        except Exception as err:  # noqa: BLE001 - huggingface_hub raises many types: one line each
            raise _translate(self.repo_id, err) from None

    @contextlib.contextmanager
    def _bar(self, name: str | None) -> Iterator[type | None]:
        """A tqdm class that feeds zsclip's progress display (None: huggingface_hub stays quiet)."""
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()  # zsclip draws its own progress, on stderr, or none when --quiet
        factory = self.progress
        if name is None or factory is None:
            yield None
            return
        with factory(f"hf:{self.repo_id}/{name}", None) as callback:
            yield _tqdm_feeding(callback)


def _takes_tqdm_class() -> bool:
    """Whether this huggingface_hub's hf_hub_download accepts a progress class (newer ones do)."""
    import inspect

    from huggingface_hub import hf_hub_download

    return "tqdm_class" in inspect.signature(hf_hub_download).parameters


def _tqdm_feeding(callback: Progress) -> type:
    """A tqdm subclass that draws nothing and reports (bytes done, total) to `callback`."""
    from huggingface_hub.utils import tqdm as hf_tqdm

    class _Feed(hf_tqdm):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)
            self._done, self._size = int(kwargs.get("initial") or 0), kwargs.get("total")

        def update(self, n: float | None = 1) -> bool | None:
            self._done += int(n or 0)
            callback(self._done, self._size)
            return None

    return _Feed


def _unreachable(repo_id: str, err: BaseException) -> str:
    return (
        f"cannot download hf:{repo_id}: cannot reach {_endpoint()} ({_first_line(err)}); "
        f"{WAYS_FORWARD}, or try again when online"
    )


def _translate(repo_id: str, err: Exception) -> UserError:
    """huggingface_hub's exceptions -> one zsclip line."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(err, GatedRepoError):
        return UserError(
            f"hf:{repo_id} is gated: accept its terms on the Hub and set HF_TOKEN (or run "
            f"`hf auth login`) with an account that has access"
        )
    if isinstance(err, RepositoryNotFoundError):
        return UserError(
            f"hf:{repo_id} does not exist on {_endpoint()}, or it is private (set HF_TOKEN to a "
            f"token with access)"
        )
    if isinstance(err, RevisionNotFoundError):
        return UserError(f"hf:{repo_id} has no revision named in the request")
    if isinstance(err, OfflineModeIsEnabled):
        return OfflineMissing(
            f"hf:{repo_id} is not cached and HF_HUB_OFFLINE is set; {WAYS_FORWARD}"
        )
    if isinstance(err, HfHubHTTPError):
        return DownloadError(f"hf:{repo_id}: the Hub answered {_first_line(err)}")
    if isinstance(err, (ConnectionError, TimeoutError)) or "Connect" in type(err).__name__:
        return Unreachable(_unreachable(repo_id, err))
    if isinstance(err, OSError):
        return DownloadError(f"hf:{repo_id}: {_first_line(err)}")
    return DownloadError(
        f"hf:{repo_id}: download failed ({type(err).__name__}: {_first_line(err)})"
    )


def _endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return (lines[0] if lines else type(err).__name__)[:200]


# ------------------------------------------------------------------------------ listing the caches


def cached_repos() -> list[tuple[str, Path]]:
    """(ORG/NAME, folder) for every complete CLIP repository in the Hugging Face cache (at the
    revision `main` points at) and in zsclip's old hf/ folder, the Hub cache first."""
    found: dict[str, Path] = {}
    root = hub_cache_dir()
    with contextlib.suppress(OSError):
        for repo in sorted(root.glob("models--*--*")):
            repo_id = repo.name[len("models--") :].replace("--", "/", 1)
            folder = _snapshot_folder(repo_id, "main") if _REPO_ID.match(repo_id) else None
            if folder is not None and _is_clip(folder):
                found[repo_id] = folder
    legacy = paths.cache_dir() / "hf"
    with contextlib.suppress(OSError):
        for folder in sorted(legacy.glob("*/*")):
            repo_id = f"{folder.parent.name}/{folder.name}"
            if repo_id not in found and folder.is_dir() and layout_of(folder):
                found[repo_id] = folder
    return sorted(found.items())


def _is_clip(folder: Path) -> bool:
    """A complete OpenCLIP copy, or a transformers one whose config.json says model_type clip (the
    cache holds every other kind of model too)."""
    layout = layout_of(folder)
    if layout != "transformers":
        return layout == "openclip"
    try:
        with open(folder / HF_CONFIG, "rb") as handle:
            data = json.loads(handle.read(1 << 20))
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(data, dict) and data.get("model_type") == "clip"


def folder_size(folder: Path) -> int:
    """Bytes of the files in a snapshot folder (symlinks into blobs/ are followed)."""
    total = 0
    with contextlib.suppress(OSError):
        for path in folder.iterdir():
            with contextlib.suppress(OSError):
                if path.is_file() and not path.name.startswith("."):
                    total += path.stat().st_size
    return total
