"""Model names -> local files: the table of models known by name (catalogue.json) and `hf:ORG/NAME`
repositories.

The table is data: each entry has a name, a kind (an "openai" checkpoint, an "hf" repository, or the
standard "vocab"), its address (a URL with SHA-256 and size, or a repository), and the published
ImageNet zero-shot top-1 and parameter count that let a user choose. Names are matched without
regard to case, and "/" or "@" may be written "-": `ViT-B/32`, `vit-b-32` and `ViT-L-14-336px` all
work; a repository's own ORG/NAME names its entry too.

Weights already on disk are used, never fetched again: an OpenAI checkpoint in OpenAI's package's
cache (~/.cache/clip) once its SHA-256 matches the published one, a repository in the Hugging Face
cache that transformers or open_clip filled (zsclip.core.hf_repos). Otherwise resolve() downloads
on first use, OpenAI's files through zsclip.download (verified, resumable, locked, atomic) into
zsclip's cache, Hugging Face repositories through huggingface_hub into its shared cache; with
offline=True (or ZSCLIP_OFFLINE=1, HF_HUB_OFFLINE=1) it only looks in the caches. Nothing
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
from zsclip.core import hf_repos
from zsclip.download import (
    DownloadError,
    OfflineMissing,
    Progress,
    Unreachable,
    download,
    offline_from_env,
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
    kind: str  # "openai" (a checkpoint file), "hf" (a Hugging Face repository) or "vocab"
    url: str | None = None  # openai and vocab: the published address
    sha256: str | None = None
    size: int | None = None  # bytes of the weights; None when unknown until downloaded
    file: str | None = None  # openai and vocab: place in the cache folder
    aliases: tuple[str, ...] = field(default=())
    repo: str | None = None  # hf: ORG/NAME on the Hub
    top1: float | None = None  # ImageNet-1k zero-shot top-1, percent (open_clip's evaluation)
    params: int | None = None
    image_size: int | None = None
    family: str | None = None
    license: str | None = None

    def path(self) -> Path:
        """Where zsclip's own download of an openai/vocab entry is kept."""
        return paths.cache_dir() / (self.file or self.name)

    def cached(self) -> bool:
        """On disk already: in zsclip's cache, OpenAI's package's or the Hugging Face cache."""
        if self.kind == "hf":
            return hf_repos.find_cached(self.repo or "") is not None
        return self.path().is_file() or openai_cached(self) is not None


def _load_table() -> dict[str, Entry]:
    rows = json.loads(_TABLE_FILE.read_text(encoding="utf-8"))["entries"]
    return {row["name"]: Entry(**{**row, "aliases": tuple(row.get("aliases", ()))}) for row in rows}


def _strip_hf(key: str) -> str:
    return key[3:] if key.startswith("hf:") else key


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
    key = _strip_hf(canonical(name))
    for entry in ENTRIES.values():
        names = (entry.name, *entry.aliases, *((entry.repo,) if entry.repo else ()))
        if key in (canonical(alias) for alias in names):
            return entry
    return None


def known_names() -> list[str]:
    """Names of the downloadable checkpoints, in table order."""
    return [entry.name for entry in ENTRIES.values() if entry.kind in ("openai", "hf")]


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
    if entry is None or entry.kind == "vocab":
        return None
    if entry.kind == "hf":
        return fetch_hf(entry.repo or "", offline=offline, progress=progress)
    path = openai_cached(entry) or fetch_entry(
        entry, offline=offline, progress=progress, verify=verify
    )
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


# ---- OpenAI's own cache ----


def openai_cache_dir() -> Path:
    """Where OpenAI's `clip` package keeps its downloads (clip.load's default download_root)."""
    return Path("~/.cache/clip").expanduser()


def openai_cached(entry: Entry) -> Path | None:
    """OpenAI's package's copy of `entry` (~/.cache/clip/<file name of its address>) when its SHA-256
    is the published one, else None: a file that differs is never used (zsclip then fetches its own
    verified copy, and leaves the other package's file alone). The hash of a file already checked is
    remembered by size and modification time, so a 900 MB file is not re-read at every start."""
    if entry.kind != "openai" or not entry.url or not entry.sha256:
        return None
    path = openai_cache_dir() / entry.url.rsplit("/", 1)[-1]
    try:
        info = path.stat()
    except OSError:
        return None
    if not path.is_file() or (entry.size is not None and info.st_size != entry.size):
        return None
    stamp = [info.st_size, info.st_mtime_ns]
    memo = _read_memo()
    digest = (
        memo.get(str(path), {}).get("sha256")
        if memo.get(str(path), {}).get("stamp") == stamp
        else None
    )
    if digest is None:
        try:
            digest = sha256_file(path)
        except OSError:
            return None
        memo[str(path)] = {"stamp": stamp, "sha256": digest}
        _write_memo(memo)
    return path if digest == entry.sha256.lower() else None


def _memo_path() -> Path:
    return paths.cache_dir() / "verified-elsewhere.json"


def _read_memo() -> dict:
    try:
        with open(_memo_path(), "rb") as handle:
            data = json.loads(handle.read(1 << 20))
    except (OSError, ValueError, RecursionError):
        return {}
    return {k: v for k, v in data.items() if isinstance(v, dict)} if isinstance(data, dict) else {}


def _write_memo(memo: dict) -> None:
    from zsclip.atomic import atomic_write_text

    with contextlib.suppress(OSError, UserError):  # a memo that cannot be written costs a re-hash
        _memo_path().parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(_memo_path(), json.dumps(memo, indent=1))


# ---- what `zsclip models` lists ----


def _row(name: str, kind: str, size: int | None, found: Path | None, where: str, **extra) -> dict:
    return {
        "name": name,
        "kind": kind,
        "size": size,
        "cached": found is not None,
        "path": str(found) if found is not None else None,
        "found_in": where if found is not None else None,
        **extra,
    }


def _scores(entry: Entry) -> dict:
    return {"top1": entry.top1, "params": entry.params, "image_size": entry.image_size}


def catalog() -> list[dict]:
    """One row per built-in model, table entry and cached hf: repository: name, kind, size, cached,
    path (where it was found, or None), found_in (which cache), url, top1, params, image_size."""
    none = {"top1": None, "params": None, "image_size": None}
    rows = [
        _row(path.stem, "builtin", path.stat().st_size, path, "built in", url=None, **none)
        for path in builtin_models()
    ]
    listed: set[str] = set()
    for entry in ENTRIES.values():
        if entry.kind == "hf":
            repo = entry.repo or ""
            listed.add(repo)
            found = hf_repos.find_cached(repo)
            where = _hf_where(found)
            url = f"{hf_endpoint()}/{repo}"
            rows.append(_row(entry.name, "hf", entry.size, found, where, url=url, **_scores(entry)))
            continue
        own = entry.path() if entry.path().is_file() else None
        found = own or openai_cached(entry)
        where = "zsclip cache" if own is not None else "OpenAI cache (~/.cache/clip)"
        size = found.stat().st_size if found is not None else entry.size
        rows.append(
            _row(entry.name, entry.kind, size, found, where, url=entry.url, **_scores(entry))
        )
    for repo_id, folder in hf_repos.cached_repos():
        if repo_id not in listed:
            size = hf_repos.folder_size(folder)
            url = f"{hf_endpoint()}/{repo_id}"
            rows.append(
                _row(f"hf:{repo_id}", "hf", size, folder, _hf_where(folder), url=url, **none)
            )
    return rows


def _hf_where(folder: Path | None) -> str:
    if folder is None:
        return ""
    return (
        "zsclip cache (old hf/ folder)"
        if folder.is_relative_to(paths.cache_dir())
        else ("Hugging Face cache")
    )


# ---- Hugging Face repositories (hf:ORG/NAME): zsclip.core.hf_repos ----


def hf_endpoint() -> str:
    """https://huggingface.co, or a mirror named by $HF_ENDPOINT (the variable huggingface_hub reads
    too)."""
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def fetch_hf(
    repo_id: str, *, offline: bool = False, progress: ProgressFactory | None = None
) -> Path:
    """The local folder of a Hugging Face CLIP repository: from the Hugging Face cache (or zsclip's
    old one) when a complete copy is there, else downloaded with huggingface_hub. A repository
    without the tokenizer's vocabulary also brings the standard one into zsclip's cache."""
    progress = progress or _default_progress
    folder = hf_repos.fetch(repo_id, offline=offline, progress=progress)
    if not {"vocab.json", "merges.txt"} <= {p.name for p in folder.iterdir()}:
        with contextlib.suppress(DownloadError):  # the tokenizer then names --vocab itself
            fetch_standard_vocab(offline=offline, progress=progress)
    return folder
