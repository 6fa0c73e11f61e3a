"""Model names -> local files: the table of downloadable files (hub_models.json) and `hf:ORG/NAME`
repositories.

The table is data: each entry has a name, a kind ("openai" checkpoint or the standard "vocab"), its
published address, SHA-256 and size, and its place in the cache (zsclip.paths.cache_dir()). Names
are matched without regard to case, and "/" or "@" may be written "-": `ViT-B/32`, `vit-b-32` and
`ViT-L-14-336px` all work.

resolve() downloads on first use through zsclip.download (verified, resumable, locked, atomic) and
returns the cached path; with offline=True (or ZSCLIP_OFFLINE=1) it only looks in the cache. Nothing
here prints: progress goes to a ProgressFactory the terminal layer supplies, either per call or once
with set_progress_factory().
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ContextManager, Optional

from zsclip import paths
from zsclip.download import (
    DownloadError,
    OfflineMissing,
    Progress,
    Unreachable,
    download,
    offline_from_env,
    probe,
    sha256_file,
)
from zsclip.errors import UserError

# (label, expected size in bytes or None) -> a context manager that yields a download progress
# callback
ProgressFactory = Callable[[str, Optional[int]], ContextManager[Progress]]

_TABLE_FILE = Path(__file__).with_name("catalogue.json")
_WAYS_FORWARD = {
    "model": "use the built-in model (leave out --model) or --model PATH with a local checkpoint file",
    "vocab": "pass --vocab PATH (or ZSCLIP_VOCAB) to a copy of bpe_simple_vocab_16e6.txt.gz",
}
_default_progress: ProgressFactory | None = None


@dataclass(frozen=True)
class Entry:
    name: str
    kind: str  # "openai" (a checkpoint) or "vocab" (the standard BPE vocabulary)
    url: str
    sha256: str
    size: int | None  # bytes; None when unknown until downloaded
    file: str  # place in the cache folder
    aliases: tuple[str, ...] = field(default=())

    def path(self) -> Path:
        return paths.cache_dir() / self.file

    def cached(self) -> bool:
        return self.path().is_file()


def _load_table() -> dict[str, Entry]:
    rows = json.loads(_TABLE_FILE.read_text(encoding="utf-8"))["entries"]
    return {row["name"]: Entry(**{**row, "aliases": tuple(row.get("aliases", ()))}) for row in rows}


ENTRIES: dict[str, Entry] = _load_table()


def set_progress_factory(factory: ProgressFactory | None) -> None:
    """Install the progress display used when a caller of resolve() passes none (the CLI installs a
    bar)."""
    global _default_progress
    _default_progress = factory


def canonical(name: str) -> str:
    """The form names are compared in: lower case, with '/' and '@' written as '-'."""
    return re.sub(r"[/@]", "-", name.strip().lower())


def lookup(name: str) -> Entry | None:
    """The table entry called `name` (or one of its aliases), else None."""
    key = canonical(name)
    for entry in ENTRIES.values():
        if key == canonical(entry.name) or key in (canonical(alias) for alias in entry.aliases):
            return entry
    return None


def known_names() -> list[str]:
    """Names of the downloadable checkpoints, in table order."""
    return [entry.name for entry in ENTRIES.values() if entry.kind == "openai"]


def is_hf_spec(spec: str) -> bool:
    return spec.strip().lower().startswith("hf:")


def resolve(
    name: str,
    offline: bool = False,
    progress: ProgressFactory | None = None,
    *,
    verify: bool = False,
) -> Path | None:
    """The local path of checkpoint `name`, downloading it on first use; None if `name` is not a known
    name.

    `hf:ORG/NAME` gives a folder (config.json, weights, tokenizer files). An OpenAI checkpoint also
    brings the standard vocabulary into the cache, where the tokenizer looks for it. verify=True
    re-hashes cached files.
    """
    if is_hf_spec(name):
        return fetch_hf(name.strip()[3:], offline=offline, progress=progress)
    entry = lookup(name)
    if entry is None or entry.kind != "openai":
        return None
    path = fetch_entry(entry, offline=offline, progress=progress, verify=verify)
    try:
        fetch_standard_vocab(offline=offline, progress=progress, verify=verify)
    except OfflineMissing:
        pass  # offline without the vocabulary: the tokenizer's own error names --vocab
    return path


def fetch_standard_vocab(
    offline: bool = False, progress: ProgressFactory | None = None, *, verify: bool = False
) -> Path:
    """cache_dir()/bpe_simple_vocab_16e6.txt.gz, fetched from openai/CLIP and verified on first use."""
    return fetch_entry(ENTRIES["vocab"], offline=offline, progress=progress, verify=verify)


def fetch_entry(
    entry: Entry,
    *,
    offline: bool = False,
    progress: ProgressFactory | None = None,
    verify: bool = False,
) -> Path:
    """Download one table entry into the cache (unless it is there) with errors that name the ways
    forward.

    verify=True re-hashes a cached copy and fetches it again if it does not match.
    """
    ways = _WAYS_FORWARD["vocab" if entry.kind == "vocab" else "model"]
    command = "zsclip download " + ("vocab" if entry.kind == "vocab" else entry.name)
    try:
        return fetch_file(
            entry.url,
            entry.path(),
            sha256=entry.sha256,
            size=entry.size,
            offline=offline,
            progress=progress,
            verify=verify,
        )
    except OfflineMissing:
        raise OfflineMissing(
            f"{entry.name} is not in the cache ({entry.path()}) and offline mode is on; run `{command}` once "
            f"while online, or {ways}"
        ) from None
    except Unreachable as err:
        raise Unreachable(
            f"cannot download {entry.name}: {err}; {ways}, or try again when online"
        ) from None


def fetch_file(
    url: str,
    dest: Path,
    *,
    sha256: str | None,
    size: int | None = None,
    offline: bool = False,
    progress: ProgressFactory | None = None,
    headers: dict[str, str] | None = None,
    verify: bool = False,
) -> Path:
    """download() with a progress display opened only when bytes will actually move."""
    if verify and sha256 and dest.is_file() and sha256_file(dest) != sha256.lower():
        dest.unlink()  # damaged in the cache: fetch it again below
    factory = progress or _default_progress
    if dest.is_file() or offline or offline_from_env() or factory is None:
        return download(url, dest, sha256=sha256, offline=offline, headers=headers)
    with factory(dest.name, size) as callback:
        return download(
            url, dest, sha256=sha256, offline=offline, headers=headers, progress=callback
        )


# kept here too: `zsclip models` lists them beside the downloads
builtin_models = paths.builtin_models


def catalog() -> list[dict]:
    """One row per built-in model, table entry and cached hf: folder: name, kind, size, cached, path,
    url."""
    rows = [
        {
            "name": path.stem,
            "kind": "builtin",
            "size": path.stat().st_size,
            "cached": True,
            "path": str(path),
            "url": None,
        }
        for path in builtin_models()
    ]
    for entry in ENTRIES.values():
        path = entry.path()
        size = path.stat().st_size if path.is_file() else entry.size
        rows.append(
            {
                "name": entry.name,
                "kind": entry.kind,
                "size": size,
                "cached": path.is_file(),
                "path": str(path),
                "url": entry.url,
            }
        )
    for repo_id, folder in cached_hf():
        rows.append(
            {
                "name": f"hf:{repo_id}",
                "kind": "hf",
                "size": _folder_size(folder),
                "cached": True,
                "path": str(folder),
                "url": f"{hf_endpoint()}/{repo_id}",
            }
        )
    return rows


def _folder_size(folder: Path) -> int:
    with contextlib.suppress(OSError):
        return sum(
            p.stat().st_size for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
        )
    return 0


# ---- Hugging Face repositories (hf:ORG/NAME) ----

HF_CONFIG = "config.json"
HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")  # the first one the repository has
HF_EXTRAS = (  # tokenizer and preprocessing files; a repository may lack any of them
    "vocab.json",
    "merges.txt",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "preprocessor_config.json",
)
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


def hf_endpoint() -> str:
    """https://huggingface.co, or a mirror named by $HF_ENDPOINT (the variable huggingface_hub reads
    too)."""
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def hf_folder(repo_id: str) -> Path:
    return paths.cache_dir() / "hf" / repo_id


def hf_complete(folder: Path) -> bool:
    """A folder is usable once config.json and a weights file are in it (files land only when whole)."""
    return (folder / HF_CONFIG).is_file() and any((folder / name).is_file() for name in HF_WEIGHTS)


def cached_hf() -> list[tuple[str, Path]]:
    """(ORG/NAME, folder) for every complete hf: download in the cache."""
    root = paths.cache_dir() / "hf"
    if not root.is_dir():
        return []
    return [
        (f"{folder.parent.name}/{folder.name}", folder)
        for folder in sorted(root.glob("*/*"))
        if folder.is_dir() and hf_complete(folder)
    ]


def fetch_hf(
    repo_id: str, *, offline: bool = False, progress: ProgressFactory | None = None
) -> Path:
    """Fetch config.json, extras and weights of a Hugging Face CLIP repository into the cache; return
    the folder.

    A complete folder is returned without asking the network (delete it to fetch a newer revision).
    Files stored with Git LFS (the weights) are verified against the SHA-256 the server states;
    small text files are not.
    """
    if "/.." in f"/{repo_id}" or not _REPO_ID.match(repo_id):
        raise UserError(f"hf:{repo_id} is not ORG/NAME; write e.g. hf:openai/clip-vit-base-patch32")
    folder = hf_folder(repo_id)
    if hf_complete(folder):
        return folder
    if offline or offline_from_env():
        raise OfflineMissing(
            f"hf:{repo_id} is not in the cache ({folder}) and offline mode is on; run `zsclip download "
            f"hf:{repo_id}` once while online, or {_WAYS_FORWARD['model']}"
        )
    try:
        if not _fetch_hf_file(repo_id, HF_CONFIG, progress):
            raise UserError(
                f"hf:{repo_id} has no {HF_CONFIG}; is it a Hugging Face CLIP model repository?"
            )
        extras = [name for name in HF_EXTRAS if _fetch_hf_file(repo_id, name, progress)]
        if not any(_fetch_hf_file(repo_id, name, progress) for name in HF_WEIGHTS):
            raise UserError(f"hf:{repo_id} has neither {' nor '.join(HF_WEIGHTS)}")
    except Unreachable as err:
        raise Unreachable(
            f"cannot download hf:{repo_id}: {err}; {_WAYS_FORWARD['model']}, or try again "
            f"when online"
        ) from None
    if not {"vocab.json", "merges.txt"} <= set(extras):
        with contextlib.suppress(
            DownloadError
        ):  # the tokenizer falls back to the standard vocabulary
            fetch_standard_vocab(progress=progress)
    return folder


def _hf_headers() -> dict[str, str]:
    token = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
    return {"Authorization": f"Bearer {token}"} if token else {}


def _fetch_hf_file(repo_id: str, name: str, progress: ProgressFactory | None) -> bool:
    """Download one file of the repository; False if the repository has no such file."""
    dest = hf_folder(repo_id) / name
    if dest.is_file():
        return True
    url = f"{hf_endpoint()}/{repo_id}/resolve/main/{name}"
    status, headers = probe(url, headers=_hf_headers())
    if status == 404:
        return False
    if status in (401, 403):
        raise UserError(
            f"Hugging Face refused hf:{repo_id} (HTTP {status}): it does not exist, or it is gated or private "
            f"(set HF_TOKEN to a token with access)"
        )
    if status >= 400:
        raise DownloadError(f"{url} answered HTTP {status}")
    size = headers.get("x-linked-size") or headers.get("content-length")
    fetch_file(
        url,
        dest,
        sha256=_lfs_sha256(status, headers),
        size=int(size) if size and size.isdigit() else None,
        progress=progress,
        headers=_hf_headers(),
    )
    return True


def _lfs_sha256(status: int, headers: dict[str, str]) -> str | None:
    """The SHA-256 an LFS file's redirect states in X-Linked-Etag (or its ETag); None for plain git
    files."""
    keys = ("x-linked-etag", "etag") if 300 <= status < 400 else ("x-linked-etag",)
    for key in keys:
        tag = headers.get(key, "").removeprefix("W/").strip('"').lower()
        if _SHA256_HEX.match(tag):
            return tag
    return None
