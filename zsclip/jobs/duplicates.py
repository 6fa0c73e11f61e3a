"""The duplicates job: groups of near-identical images, and of byte-identical files.

1. Byte-identical files first, before any model work: files are grouped by size, and only files
   sharing a size are read, hashed (sha256 of the first 64 KiB, then of the whole file for those
   still alike). Each set of identical files is embedded once.
2. The embeddings of the distinct files (from the image cache, else the model) are compared, and
   every pair with cosine >= threshold is an edge:
     exact  the [M, D] matrix against itself in blocks of the upper triangle, so memory stays at
            one BLOCK x BLOCK tile, never M x M;
     index  each image's NEIGHBOURS nearest neighbours from the usearch graph (jobs/vector_index.py,
            for large folders with the optional extra installed), then the same cosine test.
3. A group is a connected component of those edges (single linkage), with the identical copies of
   its members. Burst shots and edits of one photo form cliques, but a chain A~B~C joins A and C
   even when they are not alike; `min_score`, the lowest cosine between any two members, shows
   how tight a group is.

What counts as a duplicate is the model's call: re-encoded, resized and slightly cropped copies
stay close in any CLIP model, while a mirror image may not (the built-in model reads position, so
its flipped copies are different pictures). The default threshold is the checkpoint's own
(`duplicate_threshold` in its metadata) when it has one, else DEFAULT_THRESHOLD; the measurements
behind both are in docs/search.md.
"""

from __future__ import annotations

import hashlib
import os
from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

from zsclip.errors import UserError
from zsclip.jobs.inputs import InputItem
from zsclip.jobs.search import Note, Progress, Synced, choose_method, sync_index

if TYPE_CHECKING:
    import torch

    from zsclip.core.checkpoints import LoadedModel
    from zsclip.jobs.cache import ImageCache
    from zsclip.jobs.pipeline import DecodeOptions, ImageEncoder

DEFAULT_THRESHOLD = 0.97  # cosine, for models that name none; docs/search.md has the measurements
METADATA_KEY = "duplicate_threshold"
# Below this many distinct images, the exact blocked pass: it costs N^2 but cheap pairs, and at 100,000
# still took half the CPU of the index's neighbour pass (docs/performance.md, "Search and duplicates at
# scale"); the two cross near 200,000.
DUPLICATES_INDEX_MIN = 200_000
BLOCK = 4096  # tile side of the exact pass: 64 MiB of fp32 scores
NEIGHBOURS = 16  # per image from the index; larger groups still join through their members
MAX_EDGES_PER_IMAGE = 50  # more pairs than this above the threshold: not duplicates any more
HEAD_BYTES = 65_536


@dataclass
class Group:
    paths: list[str]  # input order
    min_score: float  # lowest cosine between any two members (1.0 for identical files)
    identical: list[list[str]] = field(default_factory=list)  # byte-identical sets within


@dataclass
class DuplicatesRequest:
    items: Sequence[InputItem]
    threshold: float = DEFAULT_THRESHOLD
    batch_size: int = 32
    workers: int = 0
    decode: "DecodeOptions | None" = None
    use_cache: bool = True
    index: str = "auto"


@dataclass
class DuplicatesRun:
    groups: list[Group]
    errors: list[tuple[str, str]]  # (path, reason), input order
    total: int
    cache: "ImageCache | None"
    method: str  # "exact" or "index"


def default_threshold(metadata: dict[str, str]) -> float:
    """The checkpoint's `duplicate_threshold` when it is a cosine in (0, 1], else the generic one."""
    try:
        value = float(metadata[METADATA_KEY])
    except (KeyError, ValueError):
        return DEFAULT_THRESHOLD
    return value if 0.0 < value <= 1.0 else DEFAULT_THRESHOLD


# ------------------------------------------------------------------------------ identical bytes


def _digest(path: str, limit: int | None) -> bytes | None:
    """sha256 of the file's first `limit` bytes (None: all of it); None when it cannot be read."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            left = limit
            while left is None or left > 0:
                block = handle.read(1 << 20 if left is None else min(1 << 20, left))
                if not block:
                    break
                digest.update(block)
                if left is not None:
                    left -= len(block)
    except OSError:
        return None
    return digest.digest()


def _split(positions: list[int], key: Callable[[int], bytes | None]) -> list[list[int]]:
    """Sub-lists (>= 2 long) of positions sharing a key; unreadable ones (None) drop out."""
    buckets: dict[bytes, list[int]] = defaultdict(list)
    for position in positions:
        value = key(position)
        if value is not None:
            buckets[value].append(position)
    return [bucket for bucket in buckets.values() if len(bucket) > 1]


def identical_sets(items: Sequence[InputItem]) -> list[list[int]]:
    """Sets (>= 2, positions in input order) of inputs whose files hold the same bytes. The same
    file named twice is one such set; unreadable and empty files are left to the decoder."""
    by_size: dict[int, list[int]] = defaultdict(list)
    for position, item in enumerate(items):
        if item.error is None:
            try:
                size = os.stat(item.path).st_size
            except (OSError, ValueError):
                continue
            if size:
                by_size[size].append(position)
    found = []
    for size, positions in by_size.items():
        if len(positions) < 2:
            continue
        for alike in _split(positions, lambda p: _digest(items[p].path, HEAD_BYTES)):
            if size <= HEAD_BYTES:
                found.append(alike)
            else:
                found.extend(_split(alike, lambda p: _digest(items[p].path, None)))
    return sorted(found)


# ------------------------------------------------------------------------------ similar pairs


class _Components:
    """Union-find over representatives 0..n-1."""

    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, a: int) -> int:
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a: int, b: int) -> None:
        a, b = self.find(a), self.find(b)
        if a != b:
            self.parent[max(a, b)] = min(a, b)

    def groups(self) -> list[list[int]]:
        members: dict[int, list[int]] = defaultdict(list)
        for node in range(len(self.parent)):
            members[self.find(node)].append(node)
        return list(members.values())


class _EdgeBudget:
    def __init__(self, count: int, threshold: float) -> None:
        self.left = max(100_000, MAX_EDGES_PER_IMAGE * count)
        self.threshold = threshold

    def spend(self, edges: int) -> None:
        self.left -= edges
        if self.left < 0:
            raise UserError(
                f"more than {MAX_EDGES_PER_IMAGE} pairs per image score above the threshold "
                f"{self.threshold}: these are similar images, not duplicates; raise --threshold"
            )


def exact_pairs(vectors: "torch.Tensor", threshold: float) -> Iterator[tuple[int, int]]:
    """Pairs (i < j) of rows of vectors [M, D] with cosine >= threshold, tile by tile."""
    budget = _EdgeBudget(len(vectors), threshold)
    for i0 in range(0, len(vectors), BLOCK):
        yield from row_block_pairs(vectors, i0, threshold, budget)


def row_block_pairs(
    vectors: "torch.Tensor", i0: int, threshold: float, budget: "_EdgeBudget | None" = None
) -> Iterator[tuple[int, int]]:
    """The pairs (i, j > i) with i in the BLOCK rows from i0: tiles i0..i0+BLOCK x j0..j0+BLOCK."""
    import torch

    rows = vectors[i0 : i0 + BLOCK]
    for j0 in range(i0, len(vectors), BLOCK):
        scores = rows @ vectors[j0 : j0 + BLOCK].T  # [b, b']
        if j0 == i0:  # the diagonal tile: only pairs above the diagonal
            below = torch.ones_like(scores, dtype=torch.bool).tril()
            scores.masked_fill_(below, -2.0)
        hits = (scores >= threshold).nonzero()
        if budget is not None:
            budget.spend(len(hits))
        for i, j in hits.tolist():
            yield i0 + i, j0 + j


def index_pairs(vindex, paths: Sequence[str], threshold: float) -> Iterator[tuple[int, int]]:
    """Pairs (i, j) of rows (`paths`: absolute paths the index holds) among each one's nearest
    neighbours in the graph with cosine >= threshold."""
    import numpy as np

    row_of_key = {vindex.key_of(path): row for row, path in enumerate(paths)}
    budget = _EdgeBudget(len(paths), threshold)
    share = len(vindex) / max(1, len(paths))  # the index may hold other folders' images too
    count = min(len(vindex), int(NEIGHBOURS * share) + 1)
    for start in range(0, len(paths), BLOCK):
        keys = [vindex.key_of(path) for path in paths[start : start + BLOCK]]
        found, scores, counts = vindex.neighbours(vindex.vectors(keys), count, expansion=64)
        valid = np.arange(found.shape[1])[None, :] < counts[:, None]
        rows, columns = np.nonzero(valid & (scores >= threshold))  # few: duplicates are rare
        pairs = []
        for row, key in zip((rows + start).tolist(), found[rows, columns].tolist()):
            other = row_of_key.get(key)
            if other is not None and other != row:
                pairs.append((row, other))
        budget.spend(len(pairs))
        yield from pairs


def min_pairwise(vectors: "torch.Tensor") -> float:
    """The lowest cosine between any two rows of [g, D], tile by tile."""
    lowest = 1.0
    for i0 in range(0, len(vectors), BLOCK):
        rows = vectors[i0 : i0 + BLOCK]
        for j0 in range(i0, len(vectors), BLOCK):
            lowest = min(lowest, float((rows @ vectors[j0 : j0 + BLOCK].T).min()))
    return min(1.0, lowest)


# ------------------------------------------------------------------------------ the job


@dataclass
class _Compared:
    """The distinct readable files: row r is input `positions[r]`, with its vector and the edges."""

    positions: list[int]
    vectors: "torch.Tensor"  # [M, D]
    edges: Iterator[tuple[int, int]]
    errors: list[tuple[int, str]]  # (input position, reason)


def _exact(
    encoder: "ImageEncoder", items, reps: list[int], threshold: float, progress: Progress
) -> _Compared:
    import torch

    positions, rows, errors = [], [], []
    done = 0
    for batch, features in encoder.batches([items[p] for p in reps]):
        for entry in batch:
            if entry.error is not None:
                errors.append((reps[done], entry.error))
            else:
                positions.append(reps[done])
            done += 1
        rows.append(features)
        progress(len(batch))
    dim = encoder.model.config.embed_dim
    vectors = torch.cat(rows) if rows else torch.zeros(0, dim)
    return _Compared(positions, vectors, exact_pairs(vectors, threshold), errors)


def _indexed(vindex, encoder, items, reps: list[int], threshold: float, progress, note):
    import torch

    synced: Synced = sync_index(vindex, encoder, [items[p] for p in reps], progress, note)
    paths = list(synced.positions)
    positions = [reps[synced.positions[path][0]] for path in paths]
    keys = [vindex.key_of(path) for path in paths]
    vectors = torch.from_numpy(vindex.vectors(keys)) if keys else torch.zeros(0, vindex.dim)
    edges = index_pairs(vindex, paths, threshold)
    if synced.loose:  # files that changed under us: compared exactly with everything
        loose = torch.stack([vector for _, vector in synced.loose])
        first = len(positions)
        positions += [reps[p] for p, _ in synced.loose]
        vectors = torch.cat([vectors, loose])
        scores = loose @ vectors.T  # [l, M]
        extra = [
            (first + i, j) for i, j in (scores >= threshold).nonzero().tolist() if first + i != j
        ]
        edges = _chain(edges, extra)
    errors = [(reps[p], reason) for p, reason in synced.errors]
    return _Compared(positions, vectors, edges, errors)


def _chain(*parts) -> Iterator[tuple[int, int]]:
    for part in parts:
        yield from part


def start(
    loaded: "LoadedModel",
    request: DuplicatesRequest,
    *,
    device: "torch.device",
    dtype: "torch.dtype",
    warn: Note = lambda message: None,
    note: Note = lambda message: None,
    progress: Progress = lambda done: None,
) -> DuplicatesRun:
    """Identical files first, then the embeddings of the distinct ones (module docstring)."""
    from zsclip.jobs.pipeline import DecodeOptions, ImageEncoder

    if not 0.0 < request.threshold <= 1.0:
        raise UserError(f"threshold {request.threshold}: give a cosine above 0 and at most 1")
    items = list(request.items)
    sets = identical_sets(items)
    copy_of = {p: group[0] for group in sets for p in group[1:]}  # position -> first copy
    reps = [p for p in range(len(items)) if p not in copy_of]
    progress(len(copy_of))
    decode = request.decode or DecodeOptions()
    encoder = ImageEncoder.with_cache(
        loaded,
        device,
        dtype,
        decode=decode,
        batch_size=request.batch_size,
        workers=request.workers,
        use_cache=request.use_cache,
        warn=warn,
    )
    cache = encoder.cache
    method = choose_method(request.index, len(reps), DUPLICATES_INDEX_MIN, cache, note)
    if method == "index":
        from zsclip.jobs.vector_index import VectorIndex

        vindex = VectorIndex.open(cache.variant, loaded.model.config.embed_dim, warn=warn)
        compared = _indexed(vindex, encoder, items, reps, request.threshold, progress, note)
        vindex.save(warn)
    else:
        compared = _exact(encoder, items, reps, request.threshold, progress)
    groups = _groups(items, compared, sets, copy_of)
    failed = {p: reason for p, reason in compared.errors}
    errors = [
        (item.path, failed.get(p, failed.get(copy_of.get(p, -1), "")))
        for p, item in enumerate(items)
        if p in failed or copy_of.get(p) in failed
    ]
    return DuplicatesRun(groups, errors, len(items), cache, method)


def _groups(
    items, compared: _Compared, sets: list[list[int]], copy_of: dict[int, int]
) -> list[Group]:
    """Connected components of the edges, each with the identical copies of its members."""
    components = _Components(len(compared.positions))
    for i, j in compared.edges:
        components.union(i, j)
    copies: dict[int, list[int]] = defaultdict(list)
    for position, first in copy_of.items():
        copies[first].append(position)
    identical_of = {group[0]: group for group in sets}
    groups = []
    for rows in components.groups():
        firsts = [compared.positions[row] for row in rows]
        members = sorted(p for first in firsts for p in (first, *copies[first]))
        if len(members) < 2:
            continue
        score = min_pairwise(compared.vectors[rows]) if len(rows) > 1 else 1.0
        identical = [
            [items[p].path for p in identical_of[first]]
            for first in sorted(firsts)
            if first in identical_of
        ]
        groups.append((members[0], Group([items[p].path for p in members], score, identical)))
    return [group for _, group in sorted(groups, key=lambda pair: pair[0])]
