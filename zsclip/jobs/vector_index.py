"""An approximate nearest-neighbour index of image embeddings, kept beside the image cache, for
searching and de-duplicating folders too large for exact comparison.

The graph is usearch's HNSW (the optional extra `pip install 'zsclip[index]'`); everything that
touches usearch or numpy lives in this module and is imported only when an index is used, so
`import zsclip` and the exact paths never need them.

One index per cache variant (model file + preprocessing + precision, see jobs/cache.py), in
`<cache>/index/<variant>.zsindex`. It follows the cache's row identity: an image is its absolute
path, and the index records the size and mtime_ns of the file version its vector came from. When a
file changes, its old vector is removed and the new one (from the cache, or freshly encoded) added
under a new key; when more than a fifth of the entries would be replaced, the graph is rebuilt from
its stored vectors instead, since HNSW degrades with many removals. Entries for files outside the
current inputs are kept (another folder's search may need them), as the cache keeps its rows;
results are always filtered to the inputs of the run.

The file is one piece, so it can be replaced atomically (zsclip.atomic.temporary_sibling, fsync,
rename):

    usearch's own serialisation | manifest (JSON) | trailer: magic, format version, the two lengths,
                                                              sha256 of everything before the trailer

Every file read is hostile: the trailer's lengths must add up to the file's size, the digest must
match before usearch is handed a single byte, and the manifest must agree with usearch's header
(dimensions, metric, scalar type, count). A file that fails any check is reported in one line
through `warn` and rebuilt; nothing is allocated from a length the file merely claims.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Sequence

from zsclip.paths import cache_dir

if TYPE_CHECKING:
    import torch

    from zsclip.jobs.cache import FileStamp

INDEX_DIR = "index"
SUFFIX = ".zsindex"
MAGIC = b"ZSCLIPIX"
FORMAT_VERSION = 1
TRAILER = struct.Struct("<8sIQQ32s")  # magic, version, payload bytes, manifest bytes, sha256
_KEY_LIMIT = 2**63  # usearch keys are u64; the top value is its sentinel, so stay well below

# HNSW parameters (measured in benchmarks/bench_search.py; figures in docs/performance.md):
CONNECTIVITY = 16  # M: links per node; the file is the vectors + ~7% at 16
EXPANSION_ADD = 128  # ef_construction
EXPANSION_SEARCH = 256  # ef at query time: recall@10 ~0.98 at 100k on structured vectors
REBUILD_FRACTION = 0.2  # replace more than this share of entries -> rebuild the graph

Warn = Callable[[str], None]


class IndexUnavailable(RuntimeError):
    """usearch (or numpy) is not installed."""


class DamagedIndex(Exception):
    """The index file failed a check; the message says which."""


def available() -> bool:
    """True when the optional extra (usearch, numpy) imports: a broken install (a missing shared
    library, a wheel for another Python) counts as absent, so the run stays exact."""
    try:
        import numpy  # noqa: F401
        import usearch.index  # noqa: F401
    except Exception:  # ImportError, OSError from a shared library, anything a bad wheel raises
        return False
    return True


def index_path(variant: str, root: Path | None = None) -> Path:
    return (root or cache_dir()) / INDEX_DIR / f"{variant}{SUFFIX}"


@dataclass
class Entry:
    key: int  # usearch key
    size: int  # st_size of the file version the vector came from
    mtime_ns: int


@dataclass
class Neighbour:
    path: str  # absolute path, as the cache stores it
    score: float  # cosine


def _new_graph(dim: int):
    try:
        from usearch.index import Index
    except ImportError as err:  # pragma: no cover - callers check available() first
        raise IndexUnavailable("pip install 'zsclip[index]'") from err
    # f32 storage chosen explicitly: with dtype=None usearch picks by hardware, and the file
    # would differ between machines.
    return Index(
        ndim=dim,
        metric="ip",
        dtype="f32",
        connectivity=CONNECTIVITY,
        expansion_add=EXPANSION_ADD,
        expansion_search=EXPANSION_SEARCH,
    )


class VectorIndex:
    """The index of one cache variant: a usearch graph plus the manifest {path: Entry}."""

    def __init__(self, path: Path, variant: str, dim: int) -> None:
        self.path, self.variant, self.dim = path, variant, dim
        self.entries: dict[str, Entry] = {}
        self.next_key = 0
        self.changed = False
        self._graph = _new_graph(dim)
        self._paths_by_key: dict[int, str] = {}

    # ------------------------------------------------------------------------------ opening

    @classmethod
    def open(
        cls, variant: str, dim: int, *, root: Path | None = None, warn: Warn = lambda m: None
    ) -> "VectorIndex":
        """The stored index, or an empty one when there is none; a damaged one is reported and
        replaced by an empty one (rebuilt by the caller's update)."""
        path = index_path(variant, root)
        index = cls(path, variant, dim)
        try:
            index._load()
        except FileNotFoundError:
            pass
        except DamagedIndex as err:
            warn(f"the search index {path} is damaged ({err}); rebuilding it")
            index = cls(path, variant, dim)
        except OSError as err:
            warn(f"cannot read the search index {path} ({err.strerror or err}); rebuilding it")
            index = cls(path, variant, dim)
        return index

    def _load(self) -> None:
        with open(self.path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if size < TRAILER.size:
                raise DamagedIndex("too short to be an index")
            with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
                payload_len, manifest = _checked_parts(mapped, size)
                self._read_manifest(manifest)
                view = memoryview(mapped)
                payload = view[:payload_len]
                try:
                    self._load_graph(payload)
                finally:  # the map closes only once no view of it is left
                    payload.release()
                    view.release()

    def _read_manifest(self, data: bytes) -> None:
        try:
            manifest = json.loads(data.decode("utf-8", "surrogatepass"))
        except (UnicodeDecodeError, ValueError) as err:
            raise DamagedIndex(f"manifest is not JSON: {err}") from None
        if not isinstance(manifest, dict) or manifest.get("format") != "zsclip-index":
            raise DamagedIndex("not a zsclip index manifest")
        if manifest.get("variant") != self.variant or manifest.get("dim") != self.dim:
            raise DamagedIndex("made for another model or preprocessing")
        next_key = manifest.get("next_key")
        rows = manifest.get("entries")
        if not _is_int(next_key) or not 0 <= next_key < _KEY_LIMIT or not isinstance(rows, list):
            raise DamagedIndex("manifest fields of the wrong type")
        for row in rows:
            if not (isinstance(row, list) and len(row) == 4 and isinstance(row[0], str)):
                raise DamagedIndex("manifest entry of the wrong shape")
            path, key, size, mtime_ns = row
            if not all(_is_int(v) for v in (key, size, mtime_ns)) or not 0 <= key < next_key:
                raise DamagedIndex("manifest entry of the wrong type")
            if path in self.entries or key in self._paths_by_key:
                raise DamagedIndex("manifest repeats a path or key")
            self.entries[path] = Entry(key, size, mtime_ns)
            self._paths_by_key[key] = path
        self.next_key = next_key

    def _load_graph(self, payload: memoryview) -> None:
        from usearch.index import Index, MetricKind, ScalarKind

        try:
            meta = Index.metadata(payload)
        except Exception as err:  # usearch raises ValueError/RuntimeError for foreign data
            raise DamagedIndex(f"unreadable graph: {err}") from None
        expected = {
            "dimensions": self.dim,
            "kind_metric": MetricKind.IP,
            "kind_scalar": ScalarKind.F32,
            "count_present": len(self.entries),
        }
        if not meta or any(meta.get(name) != value for name, value in expected.items()):
            raise DamagedIndex("graph header disagrees with the manifest")
        graph = _new_graph(self.dim)
        try:
            graph.load(payload)  # a copy: the graph may change, and the file is closed after
        except Exception as err:
            raise DamagedIndex(f"unreadable graph: {err}") from None
        if len(graph) != len(self.entries):
            raise DamagedIndex("graph holds another number of vectors than the manifest")
        self._graph = graph

    # ------------------------------------------------------------------------------ keeping in step

    def current(self, stamp: "FileStamp") -> bool:
        """The index holds this version of the file."""
        entry = self.entries.get(stamp.path)
        return entry is not None and (entry.size, entry.mtime_ns) == (stamp.size, stamp.mtime_ns)

    def __len__(self) -> int:
        return len(self.entries)

    def update(self, stamps: Sequence["FileStamp"], vectors: "torch.Tensor") -> None:
        """Add (or replace) the vectors [n, D] of these file versions."""
        if not stamps:
            return
        replaced = [s.path for s in stamps if s.path in self.entries]
        if self.entries and len(replaced) > REBUILD_FRACTION * len(self.entries):
            self._rebuild(set(replaced))
        else:
            self._remove(replaced)
        import numpy as np

        keys = np.arange(self.next_key, self.next_key + len(stamps), dtype=np.uint64)
        self._graph.add(keys, _as_array(vectors))
        for key, stamp in zip(keys.tolist(), stamps):
            self.entries[stamp.path] = Entry(key, stamp.size, stamp.mtime_ns)
            self._paths_by_key[key] = stamp.path
        self.next_key += len(stamps)
        self.changed = True

    def _remove(self, paths: Iterable[str]) -> None:
        import numpy as np

        keys = [self.entries.pop(path).key for path in paths]
        if keys:
            self._graph.remove(np.array(keys, dtype=np.uint64))
            for key in keys:
                del self._paths_by_key[key]
            self.changed = True

    def _rebuild(self, dropped: set[str]) -> None:
        """A fresh graph from the stored vectors of the entries that stay."""
        kept = [(path, entry) for path, entry in self.entries.items() if path not in dropped]
        vectors = self.vectors([entry.key for _, entry in kept])
        self._graph = _new_graph(self.dim)
        self.entries, self._paths_by_key = {}, {}
        if kept:
            import numpy as np

            keys = np.array([entry.key for _, entry in kept], dtype=np.uint64)
            self._graph.add(keys, vectors)
            for path, entry in kept:
                self.entries[path] = entry
                self._paths_by_key[entry.key] = path
        self.changed = True

    def vectors(self, keys: Sequence[int]):
        """The stored vectors of these keys, a float32 numpy array [n, D]."""
        import numpy as np

        out = np.empty((len(keys), self.dim), dtype=np.float32)
        chunk = 4096
        for start in range(0, len(keys), chunk):
            part = np.array(keys[start : start + chunk], dtype=np.uint64)
            rows = self._graph.get(part)
            if isinstance(rows, (list, tuple)):
                if any(row is None for row in rows):
                    raise DamagedIndex("the graph lacks vectors its manifest names")
                rows = np.stack(rows)
            out[start : start + len(part)] = np.asarray(rows).reshape(len(part), self.dim)
        return out

    def key_of(self, path: str) -> int | None:
        entry = self.entries.get(path)
        return None if entry is None else entry.key

    # ------------------------------------------------------------------------------ queries

    def search(self, queries, count: int, *, expansion: int = EXPANSION_SEARCH):
        """For queries [Q, D] (unit, numpy or torch): per query, up to `count` (path, cosine)
        pairs, best first."""
        keys, scores, counts = self.neighbours(queries, count, expansion=expansion)
        results = []
        for row in range(len(counts)):
            found = []
            for key, score in zip(
                keys[row][: counts[row]].tolist(), scores[row][: counts[row]].tolist()
            ):
                path = self._paths_by_key.get(key)
                if path is not None:
                    found.append(Neighbour(path, score))
            results.append(found)
        return results

    def neighbours(self, queries, count: int, *, expansion: int = EXPANSION_SEARCH):
        """numpy arrays for queries [Q, D]: keys [Q, count], cosines [Q, count] and the number of
        valid columns per row [Q] (fewer when the index holds fewer vectors)."""
        import numpy as np

        self._graph.expansion_search = max(expansion, count)
        queries = _as_array(queries).reshape(-1, self.dim)  # [Q, D]
        matches = self._graph.search(queries, count)
        if hasattr(matches, "counts"):  # several queries: BatchMatches
            keys, distances, counts = matches.keys, matches.distances, matches.counts
        else:  # one query: Matches, holding only the valid rows
            keys, distances = matches.keys[None], matches.distances[None]
            counts = np.array([len(matches.keys)])
        return keys.astype(np.int64), 1.0 - distances, counts  # ip distance = 1 - dot

    # ------------------------------------------------------------------------------ saving

    def save(self, warn: Warn = lambda m: None) -> None:
        """Write atomically when changed; a failure costs the saved work only (one warning)."""
        if not self.changed:
            return
        from zsclip.atomic import temporary_sibling

        try:
            tmp = temporary_sibling(self.path)
        except OSError as err:
            warn(f"cannot write the search index {self.path} ({err.strerror or err})")
            return
        try:
            self._graph.save(os.fspath(tmp))
            with open(tmp, "r+b") as handle:
                payload_len = os.fstat(handle.fileno()).st_size
                digest = hashlib.sha256()
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
                manifest = self._manifest_bytes()
                digest.update(manifest)
                handle.write(manifest)
                handle.write(
                    TRAILER.pack(MAGIC, FORMAT_VERSION, payload_len, len(manifest), digest.digest())
                )
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.path)
            self.changed = False
        except (OSError, RuntimeError) as err:
            warn(
                f"cannot write the search index {self.path} ({getattr(err, 'strerror', None) or err})"
            )
            try:
                os.unlink(tmp)
            except OSError:
                pass

    def _manifest_bytes(self) -> bytes:
        manifest = {
            "format": "zsclip-index",
            "variant": self.variant,
            "dim": self.dim,
            "next_key": self.next_key,
            "entries": [[p, e.key, e.size, e.mtime_ns] for p, e in self.entries.items()],
        }
        # ensure_ascii: a path that is not valid UTF-8 (carried as surrogates) stays escaped
        return json.dumps(manifest, separators=(",", ":")).encode("ascii")


def _checked_parts(mapped: mmap.mmap, size: int) -> tuple[int, bytes]:
    """(payload length, manifest bytes) once the trailer and the digest check out."""
    magic, version, payload_len, manifest_len, digest = TRAILER.unpack(
        mapped[size - TRAILER.size :]
    )
    if magic != MAGIC:
        raise DamagedIndex("not a zsclip index")
    if version != FORMAT_VERSION:
        raise DamagedIndex(f"format version {version}, this zsclip reads {FORMAT_VERSION}")
    if payload_len + manifest_len + TRAILER.size != size:
        raise DamagedIndex("lengths do not add up to the file size (truncated?)")
    body = payload_len + manifest_len
    check = hashlib.sha256()
    for start in range(0, body, 1 << 24):
        check.update(mapped[start : min(body, start + (1 << 24))])
    if check.digest() != digest:
        raise DamagedIndex("checksum mismatch")
    return payload_len, mapped[payload_len:body]


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _as_array(vectors):
    """A C-contiguous float32 numpy array from a torch tensor or array-like ([D] or [n, D])."""
    import numpy as np

    if hasattr(vectors, "detach"):
        vectors = vectors.detach().to("cpu").float().contiguous().numpy()
    return np.ascontiguousarray(vectors, dtype=np.float32)
