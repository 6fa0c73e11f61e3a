"""The search job: every input image ranked by cosine similarity to a query made of words, example
images and words to avoid.

The query vector: each `--text` (the raw text, no prompt templates) and each example image is
embedded and L2-normalised; the positives are averaged and normalised again, as prompt ensembling
does; `--not` texts are averaged and normalised the same way and subtracted, and the difference is
normalised once more:

    q = normalize(normalize(mean(positives)) - normalize(mean(negatives)))

An image's score is its cosine with q, in [-1, 1]. The ranking keeps the `top_k` best, or every
image scoring at least `min_score`, or both limits at once; ties keep input order.

Two ways to rank, with the same answers up to the index's recall:
  exact   every input's embedding (from the image cache, else the model) against q, batch by batch
          as the encoder yields them: memory stays at one batch plus the kept rows, never [N, N]
  index   the usearch graph of jobs/vector_index.py, brought in step with the inputs first (files
          new or changed since are encoded, or read from the cache, and added); files it already
          holds are neither decoded nor read from the cache. Used for large folders when the
          optional extra is installed (`choose_method`).
Inputs that cannot be read come back as error rows after the ranked ones, in input order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Sequence

from zsclip.errors import UserError
from zsclip.jobs.inputs import InputItem

if TYPE_CHECKING:
    from pathlib import Path

    import torch

    from zsclip.core.checkpoints import LoadedModel
    from zsclip.jobs.cache import FileStamp, ImageCache
    from zsclip.jobs.pipeline import DecodeOptions, ImageEncoder
    from zsclip.jobs.vector_index import VectorIndex

DEFAULT_TOP_K = 20
# Below this many inputs, search is exact: one query against 50,000 vectors costs tens of ms, and
# always finds the true best (docs/performance.md, "Search and duplicates at scale").
SEARCH_INDEX_MIN = 50_000
INDEX_MODES = ("auto", "always", "never")
_CHUNK = 65_536  # rows per matmul when ranking a matrix: bounded memory for any N
_OVERSAMPLE_LIMIT = 0.05  # asking the index for more than this share of it: rank exactly instead

Note = Callable[[str], None]
Progress = Callable[[int], None]  # inputs done since the last call


@dataclass
class Hit:
    path: str
    score: float | None = None
    error: str | None = None
    thumbnail: bytes | None = None  # JPEG for the HTML report


@dataclass(frozen=True)
class Query:
    texts: Sequence[str] = ()
    images: Sequence[str] = ()  # example image files
    negatives: Sequence[str] = ()  # texts to move away from (--not)

    def check(self) -> None:
        if not self.texts and not self.images:
            raise UserError('nothing to search for: give --text "..." and/or --image FILE')
        if any(not text.strip() for text in (*self.texts, *self.negatives)):
            raise UserError("--text and --not values must not be empty")


@dataclass(frozen=True)
class Limit:
    """How many rows to keep: the `top_k` best (None: no cap), of those scoring >= `min_score`."""

    top_k: int | None = DEFAULT_TOP_K
    min_score: float | None = None


@dataclass
class SearchRequest:
    query: Query
    items: Sequence[InputItem]
    limit: Limit = Limit()
    batch_size: int = 32
    workers: int = 0
    decode: "DecodeOptions | None" = None  # None: exact decoding
    use_cache: bool = True
    index: str = "auto"  # auto (by size, when installed), always, never
    embeddings: "Path | None" = None  # rank image embeddings saved by `zsclip embed` instead


@dataclass
class SearchRun:
    hits: list[Hit]  # ranked rows, then error rows
    total: int  # inputs
    cache: "ImageCache | None"
    method: str  # "exact" or "index"
    errors: int = 0


# ------------------------------------------------------------------------------ the query


def query_vector(
    loaded: "LoadedModel",
    encoder: "ImageEncoder",
    query: Query,
    *,
    device: "torch.device",
    dtype: "torch.dtype",
) -> "torch.Tensor":
    """The unit query vector [D] (see the module docstring)."""
    import torch
    import torch.nn.functional as F

    from zsclip.jobs.zeroshot import encode_texts

    def texts(values: Sequence[str]) -> "torch.Tensor":  # [T, D]
        return encode_texts(
            loaded.model, loaded.tokenizer, list(values), device=device, dtype=dtype
        )

    positives = [texts(query.texts)] if query.texts else []
    if query.images:
        positives.append(example_features(encoder, query.images))
    vector = F.normalize(torch.cat(positives).mean(dim=0), dim=0)  # [D]
    if query.negatives:
        vector = vector - F.normalize(texts(query.negatives).mean(dim=0), dim=0)
        if float(vector.norm()) < 1e-4:
            raise UserError("the --not texts cancel the query; search for something else")
        vector = F.normalize(vector, dim=0)
    return vector


def example_features(encoder: "ImageEncoder", paths: Sequence[str]) -> "torch.Tensor":
    """[n, D] unit features of the --image files; an unreadable one is a usage error."""
    import torch

    rows = []
    for batch, features in encoder.batches([InputItem(path) for path in paths]):
        for entry in batch:
            if entry.error is not None:
                raise UserError(f"--image {entry.path}: {entry.error}")
        rows.append(features)
    return torch.cat(rows)


# ------------------------------------------------------------------------------ ranking


class Ranking:
    """The best rows seen so far under a Limit, fed batch by batch: (score, position) pairs."""

    def __init__(self, limit: Limit) -> None:
        import torch

        self.limit = limit
        self.scores = torch.empty(0)
        self.positions = torch.empty(0, dtype=torch.long)

    def add(self, scores: "torch.Tensor", positions: "torch.Tensor") -> None:
        """scores [n] with the input positions [n] they belong to."""
        import torch

        if self.limit.min_score is not None:
            keep = scores >= self.limit.min_score
            scores, positions = scores[keep], positions[keep]
        scores = torch.cat([self.scores, scores.float()])
        positions = torch.cat([self.positions, positions])
        k = self.limit.top_k
        if k is not None and len(scores) > k:
            # keep the k best and whatever ties the k-th (the sort below breaks ties by position)
            kth = scores.topk(k).values[-1]
            keep = scores >= kth
            scores, positions = _ordered(scores[keep], positions[keep])
            scores, positions = scores[:k], positions[:k]
        self.scores, self.positions = scores, positions

    def result(self) -> list[tuple[int, float]]:
        """(position, score), best first; equal scores in input order."""
        scores, positions = _ordered(self.scores, self.positions)
        return list(zip(positions.tolist(), scores.tolist()))


def _ordered(scores: "torch.Tensor", positions: "torch.Tensor"):
    """Sorted by score descending, then position ascending."""
    import torch

    by_position = torch.argsort(positions)
    scores, positions = scores[by_position], positions[by_position]
    order = torch.sort(-scores, stable=True).indices
    return scores[order], positions[order]


def rank_matrix(
    vectors: "torch.Tensor", query: "torch.Tensor", limit: Limit, positions: Sequence[int]
) -> list[tuple[int, float]]:
    """Exact ranking of the rows of `vectors` [M, D] (row i is input positions[i]), chunked."""
    import torch

    ranking = Ranking(limit)
    if isinstance(positions, range):
        index = torch.arange(positions.start, positions.stop, positions.step)
    else:
        index = torch.as_tensor(list(positions), dtype=torch.long)
    for start in range(0, len(vectors), _CHUNK):
        part = torch.as_tensor(vectors[start : start + _CHUNK]).float()
        ranking.add(part @ query, index[start : start + _CHUNK])  # [m]
    return ranking.result()


def exact_search(
    encoder: "ImageEncoder",
    items: Sequence[InputItem],
    query: "torch.Tensor",
    limit: Limit,
    progress: Progress,
) -> tuple[list[tuple[int, float]], list[tuple[int, str]]]:
    """(ranked (position, score), errors (position, reason)), streaming the inputs' features."""
    import torch

    ranking = Ranking(limit)
    errors: list[tuple[int, str]] = []
    position = 0
    for batch, features in encoder.batches(items):
        readable = []
        for entry in batch:
            if entry.error is not None:
                errors.append((position, entry.error))
            else:
                readable.append(position)
            position += 1
        if readable:
            ranking.add(features @ query, torch.tensor(readable, dtype=torch.long))  # [n]
        progress(len(batch))
    return ranking.result(), errors


# ------------------------------------------------------------------------------ the index


def choose_method(
    mode: str, count: int, minimum: int, cache: "ImageCache | None", note: Note
) -> str:
    """ "exact" or "index" for `count` inputs; says in one note why a large run stays exact."""
    from zsclip.jobs import vector_index

    if mode not in INDEX_MODES:
        raise ValueError(f"index mode {mode!r}: use one of {', '.join(INDEX_MODES)}")
    if mode == "never" or (mode == "auto" and count < minimum):
        return "exact"
    if not vector_index.available():
        if mode == "always":
            raise UserError("--index always needs the optional extra: pip install 'zsclip[index]'")
        note(
            f"zsclip: {count} images, compared exactly; pip install 'zsclip[index]' for an "
            "approximate index that is faster at this size"
        )
        return "exact"
    if cache is None:
        note("zsclip: the search index follows the image cache, which is off; comparing exactly")
        return "exact"
    return "index"


@dataclass
class Synced:
    """The inputs as the index holds them after `sync_index`."""

    positions: dict[str, list[int]] = field(default_factory=dict)  # absolute path -> inputs
    errors: list[tuple[int, str]] = field(default_factory=list)
    # readable inputs that could not be stamped (a file changing under us): ranked exactly
    loose: list[tuple[int, "torch.Tensor"]] = field(default_factory=list)


def sync_index(
    vindex: "VectorIndex",
    encoder: "ImageEncoder",
    items: Sequence[InputItem],
    progress: Progress,
    note: Note,
) -> Synced:
    """Bring the index in step with the inputs: files it holds in their current version are left
    alone; the others are read from the cache or encoded, then added (replacing older versions)."""
    import torch

    from zsclip.jobs.cache import stamp

    synced = Synced()
    todo: list[int] = []
    for position, item in enumerate(items):
        current = stamp(item.path) if item.error is None else None
        if current is not None and vindex.current(current):
            synced.positions.setdefault(current.path, []).append(position)
        else:
            todo.append(position)
    progress(len(items) - len(todo))
    if len(todo) > 1000:
        note(f"zsclip: adding {len(todo)} images to the search index (later runs reuse it)")
    stamps: list["FileStamp"] = []
    vectors: list["torch.Tensor"] = []
    done = 0
    for batch, features in encoder.batches([items[p] for p in todo]):
        row = 0
        for entry in batch:
            position = todo[done]
            done += 1
            if entry.error is not None:
                synced.errors.append((position, entry.error))
                continue
            vector = features[row]
            row += 1
            if entry.stamp is None:
                synced.loose.append((position, vector))
            elif entry.stamp.path in synced.positions:  # the same file given twice
                synced.positions[entry.stamp.path].append(position)
            else:
                stamps.append(entry.stamp)
                vectors.append(vector)
                synced.positions[entry.stamp.path] = [position]
        progress(len(batch))
    if stamps:
        vindex.update(stamps, torch.stack(vectors))
    return synced


def index_search(
    vindex: "VectorIndex", synced: Synced, query: "torch.Tensor", limit: Limit
) -> list[tuple[int, float]]:
    """Ranked (position, score) among the run's inputs, from the graph, or exactly from the
    index's stored vectors when the limit reaches too deep for a graph search."""
    import torch

    found = _graph_ranking(vindex, synced, query, limit)
    if found is None:
        paths = list(synced.positions)
        matrix = vindex.vectors([vindex.key_of(path) for path in paths])  # [M, D]
        ranked = rank_matrix(matrix, query, limit, range(len(paths)))
        found = [(pos, score) for row, score in ranked for pos in synced.positions[paths[row]]]
    for position, vector in synced.loose:
        found.append((position, float(vector @ query)))
    ranking = Ranking(limit)
    if found:
        scores = torch.tensor([score for _, score in found])
        ranking.add(scores, torch.tensor([position for position, _ in found], dtype=torch.long))
    return ranking.result()


def _graph_ranking(
    vindex: "VectorIndex", synced: Synced, query: "torch.Tensor", limit: Limit
) -> list[tuple[int, float]] | None:
    """Neighbours from the graph, asking for more while the inputs among them may not meet the
    limit yet (the index may also hold other folders' images); None past the ceiling."""
    if not synced.positions:
        return []
    share = len(vindex) / len(synced.positions)  # >= 1: index entries per input file
    count = min(len(vindex), max(64, int(2 * (limit.top_k or 64) * share)))
    ceiling = max(count, int(_OVERSAMPLE_LIMIT * len(vindex)))
    while True:
        found = _from_neighbours(vindex, synced, query, limit, count)
        if found is not None or count >= ceiling:
            return found
        count = min(ceiling, count * 4)


def _from_neighbours(
    vindex: "VectorIndex", synced: Synced, query: "torch.Tensor", limit: Limit, count: int
) -> list[tuple[int, float]] | None:
    """The ranked inputs among `count` neighbours, or None when more neighbours could change it."""
    [neighbours] = vindex.search(query[None], count)
    found = [
        (position, n.score)
        for n in neighbours
        if n.path in synced.positions
        for position in synced.positions[n.path]
    ]
    complete = len(neighbours) >= len(vindex)
    if limit.min_score is not None:
        past = bool(neighbours) and neighbours[-1].score < limit.min_score
        enough = limit.top_k is not None and (
            sum(score >= limit.min_score for _, score in found) >= limit.top_k
        )
        return found if complete or past or enough else None
    return found if complete or len(found) >= (limit.top_k or 0) else None


# ------------------------------------------------------------------------------ the job


def start(
    loaded: "LoadedModel",
    request: SearchRequest,
    *,
    device: "torch.device",
    dtype: "torch.dtype",
    warn: Note = lambda message: None,
    note: Note = lambda message: None,
    progress: Progress = lambda done: None,
) -> SearchRun:
    """Embed the query, then rank the inputs (exactly or with the index; see the module
    docstring)."""
    from zsclip.jobs.pipeline import DecodeOptions, ImageEncoder

    request.query.check()
    decode = request.decode or DecodeOptions()
    if request.embeddings is not None:
        return _search_file(loaded, request, decode, device=device, dtype=dtype, warn=warn)
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
    query = query_vector(loaded, encoder, request.query, device=device, dtype=dtype)
    items = list(request.items)
    method = choose_method(request.index, len(items), SEARCH_INDEX_MIN, cache, note)
    if method == "index":
        from zsclip.jobs.vector_index import VectorIndex

        vindex = VectorIndex.open(cache.variant, loaded.model.config.embed_dim, warn=warn)
        synced = sync_index(vindex, encoder, items, progress, note)
        vindex.save(warn)
        ranked, errors = index_search(vindex, synced, query, request.limit), synced.errors
    else:
        ranked, errors = exact_search(encoder, items, query, request.limit, progress)
    hits = [Hit(items[position].path, score) for position, score in ranked]
    hits += [Hit(items[position].path, error=reason) for position, reason in sorted(errors)]
    return SearchRun(hits, len(items), cache, method, errors=len(errors))


def _search_file(
    loaded: "LoadedModel",
    request: SearchRequest,
    decode: "DecodeOptions",
    *,
    device: "torch.device",
    dtype: "torch.dtype",
    warn: Note,
) -> SearchRun:
    """Rank the rows of a file of saved image embeddings: no image is read (an --image example
    is still encoded); the file's error rows come after the ranking, as unreadable inputs do."""
    from zsclip.jobs.classify import read_image_embeddings
    from zsclip.jobs.pipeline import ImageEncoder

    table = read_image_embeddings(request.embeddings, loaded, warn, command="search")
    encoder = ImageEncoder(
        loaded.model, loaded.preprocess, device, dtype, batch_size=request.batch_size, decode=decode
    )
    query = query_vector(loaded, encoder, request.query, device=device, dtype=dtype)
    vectors = table.vectors  # [N, D]; embed writes unit rows, but a hand-made file may not
    for start in range(0, len(vectors), _CHUNK):
        part = vectors[start : start + _CHUNK]
        part /= part.norm(dim=1, keepdim=True).clamp_min(1e-12)
    ranked = rank_matrix(vectors, query.float().cpu(), request.limit, range(len(vectors)))
    hits = [Hit(table.keys[row], score) for row, score in ranked]
    hits += [Hit(key, error=reason) for _, key, reason in table.errors]
    total = len(table.keys) + len(table.errors)
    return SearchRun(hits, total, None, "exact", errors=len(table.errors))
