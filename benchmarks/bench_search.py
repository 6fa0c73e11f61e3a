"""Search and duplicates at scale: zsclip's exact paths against its usearch index, in time, memory and
recall.

    python benchmarks/bench_search.py [--sizes 10000 100000] [--data random lowrank] [--budget 1500]

Vectors are unit length, 512-d (ViT-B/32's embedding), made from a fixed seed:
  random   isotropic: every cosine is about 0 +- 0.044, the worst case for any graph index;
  lowrank  near a random 32-d subspace plus noise, a rough stand-in for real CLIP embeddings, whose
           intrinsic dimension is far below 512.
Both carry about 1% planted near-duplicates (1-3 noisy copies of a vector, cosine 0.96-0.995), so the
duplicates pass has pairs to find at its threshold of 0.95.

Each phase runs zsclip's own code (jobs/search.py rank_matrix, jobs/duplicates.py exact_pairs and
index_pairs, jobs/vector_index.py VectorIndex) in its own process, so its peak RSS is its own, and
stops at a deadline: the exact all-pairs pass past `--exact-cap` seconds is stopped and its total
extrapolated from the tiles it finished; phases that do not fit the budget are listed as skipped.
Wall time and CPU time (user + system of the phase's process) are both reported: on a shared
machine the CPU seconds are the steadier figure.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DIM = 512
THRESHOLD = 0.95
QUERIES = 200  # held-out queries for recall@10 and latency


def vectors(kind: str, n: int, seed: int = 0):
    """[n, DIM] unit float32 rows with ~1% planted near-duplicates, and the planted pairs."""
    import torch

    g = torch.Generator().manual_seed(seed)
    if kind == "lowrank":
        basis = torch.randn(32, DIM, generator=g)
        data = torch.randn(n, 32, generator=g) @ basis + 0.35 * torch.randn(n, DIM, generator=g) * (
            32**0.5
        )
    else:
        data = torch.randn(n, DIM, generator=g)
    data = torch.nn.functional.normalize(data, dim=1)
    planted = []
    for source in range(0, n - 4, 100):  # one group per 100 rows: 1-3 copies of `source`
        group = [source]
        for c in range(int(torch.randint(1, 4, (1,), generator=g))):
            target = 1 - float(torch.empty(1).uniform_(0.005, 0.04, generator=g))
            noise = torch.nn.functional.normalize(torch.randn(DIM, generator=g), dim=0)
            noise -= (noise @ data[source]) * data[source]
            noise = torch.nn.functional.normalize(noise, dim=0)
            data[source + 1 + c] = target * data[source] + (1 - target**2) ** 0.5 * noise
            group.append(source + 1 + c)
        for i, a in enumerate(group):  # copies of one source may also pass the threshold
            planted += [(a, b) for b in group[i + 1 :] if float(data[a] @ data[b]) >= THRESHOLD]
    return data.contiguous(), planted


def queries(kind: str):
    data, _ = vectors(kind, QUERIES, seed=1)
    return data


def _usage() -> dict:
    own = resource.getrusage(resource.RUSAGE_SELF)
    return {"cpu": own.ru_utime + own.ru_stime, "rss_mib": own.ru_maxrss / 1024}


def _stamps(n: int):
    from zsclip.jobs.cache import FileStamp

    return [FileStamp(f"/bench/{i:07d}.jpg", 1000 + i, 0) for i in range(n)]


# ------------------------------------------------------------------------------ phases (children)


def phase_exact_search(kind: str, n: int, args) -> dict:
    import torch

    from zsclip.jobs.search import Limit, rank_matrix

    data, _ = vectors(kind, n)
    qs = queries(kind)
    before = _usage()
    times = []
    for q in qs[:30]:
        start = time.perf_counter()
        rank_matrix(data, q, Limit(20), range(n))
        times.append(time.perf_counter() - start)
    after = _usage()
    times.sort()
    del torch
    return {
        "q1_min_ms": 1000 * times[0],
        "q1_median_ms": 1000 * times[len(times) // 2],
        "q1_cpu_ms": 1000 * (after["cpu"] - before["cpu"]) / len(times),
        "rss_mib": after["rss_mib"],
    }


def phase_exact_dups(kind: str, n: int, args) -> dict:
    from zsclip.jobs.duplicates import BLOCK, row_block_pairs

    data, planted = vectors(kind, n)
    blocks = range(0, n, BLOCK)
    tiles_total = sum(len(range(i0, n, BLOCK)) for i0 in blocks)
    pairs, tiles, rows_done = set(), 0, 0
    before, start = _usage(), time.perf_counter()
    for i0 in blocks:
        pairs.update(row_block_pairs(data, i0, THRESHOLD))
        tiles += len(range(i0, n, BLOCK))
        rows_done = min(n, i0 + BLOCK)
        if time.perf_counter() - start > args.exact_cap:
            break
    wall, after = time.perf_counter() - start, _usage()
    scale = tiles_total / tiles  # tiles are the same size but for the edges: close enough
    checked = [pair for pair in planted if pair[0] < rows_done]
    return {
        "wall_s": wall * scale,
        "cpu_s": (after["cpu"] - before["cpu"]) * scale,
        "extrapolated": rows_done < n,
        "tiles_done": f"{tiles}/{tiles_total}",
        "pairs": sorted(pairs) if rows_done == n else None,
        "exact_equals_planted": pairs >= set(checked)
        and {p for p in pairs if p[0] < rows_done} == set(checked),
        "rss_mib": after["rss_mib"],
    }


def phase_index_build(kind: str, n: int, args) -> dict:
    from zsclip.jobs.vector_index import VectorIndex

    data, _ = vectors(kind, n)
    before, start = _usage(), time.perf_counter()
    index = VectorIndex.open(f"bench-{kind}-{n}", DIM, root=Path(args.workdir))
    index.update(_stamps(n), data)
    built = time.perf_counter()
    index.save()
    saved, after = time.perf_counter(), _usage()
    return {
        "build_wall_s": built - start,
        "save_wall_s": saved - built,
        "cpu_s": after["cpu"] - before["cpu"],
        "file_mib": index.path.stat().st_size / 2**20,
        "rss_mib": after["rss_mib"],
    }


def phase_index_search(kind: str, n: int, args) -> dict:
    import torch

    from zsclip.jobs.vector_index import VectorIndex

    data, _ = vectors(kind, n)
    qs = queries(kind)
    truth = (qs @ data.T).topk(10, dim=1).indices.tolist()  # exact top-10
    del data
    before, start = _usage(), time.perf_counter()
    index = VectorIndex.open(f"bench-{kind}-{n}", DIM, root=Path(args.workdir), warn=print)
    opened, after_open = time.perf_counter() - start, _usage()
    row_of = {path: int(Path(path).stem) for path in index.entries}
    result = {"open_wall_s": opened, "open_cpu_s": after_open["cpu"] - before["cpu"]}
    for ef in (64, 128, 256):
        times, hits = [], 0
        start_cpu = _usage()["cpu"]
        for q, best in zip(qs, truth):
            start = time.perf_counter()
            [found] = index.search(q, 10, expansion=ef)
            times.append(time.perf_counter() - start)
            hits += len({row_of[n.path] for n in found} & set(best))
        times.sort()
        result[f"ef{ef}"] = {
            "recall10": hits / (10 * len(qs)),
            "q1_min_ms": 1000 * times[0],
            "q1_median_ms": 1000 * times[len(times) // 2],
            "q1_cpu_ms": 1000 * (_usage()["cpu"] - start_cpu) / len(qs),
        }
    result["rss_mib"] = _usage()["rss_mib"]
    del torch
    return result


def phase_index_dups(kind: str, n: int, args) -> dict:
    from zsclip.jobs.duplicates import index_pairs
    from zsclip.jobs.vector_index import VectorIndex

    _, planted = vectors(kind, n)
    index = VectorIndex.open(f"bench-{kind}-{n}", DIM, root=Path(args.workdir))
    paths = sorted(index.entries)
    before, start = _usage(), time.perf_counter()
    pairs = {tuple(sorted(p)) for p in index_pairs(index, paths, THRESHOLD)}
    wall, after = time.perf_counter() - start, _usage()
    truth = args.exact_pairs.get((kind, n))
    truth = {tuple(p) for p in truth} if truth is not None else set(planted)
    return {
        "wall_s": wall,
        "cpu_s": after["cpu"] - before["cpu"],
        "pair_recall": len(pairs & truth) / max(1, len(truth)),
        "truth": "exact" if args.exact_pairs.get((kind, n)) is not None else "planted",
        "rss_mib": after["rss_mib"],
    }


def phase_index_update(kind: str, n: int, args) -> dict:
    """1% of the files changed: their old vectors removed, new ones added, the file saved."""
    from zsclip.jobs.cache import FileStamp
    from zsclip.jobs.vector_index import VectorIndex

    data, _ = vectors(kind, n // 100, seed=2)
    index = VectorIndex.open(f"bench-{kind}-{n}", DIM, root=Path(args.workdir))
    changed = [FileStamp(s.path, s.size + 1, 1) for s in _stamps(n // 100)]
    before, start = _usage(), time.perf_counter()
    index.update(changed, data)
    index.save()
    wall, after = time.perf_counter() - start, _usage()
    return {"wall_s": wall, "cpu_s": after["cpu"] - before["cpu"], "changed": len(changed)}


PHASES = {
    "exact_search": phase_exact_search,
    "exact_dups": phase_exact_dups,
    "index_build": phase_index_build,
    "index_search": phase_index_search,
    "index_dups": phase_index_dups,
    "index_update": phase_index_update,
}


# ------------------------------------------------------------------------------ the driver


def run_phase(name: str, kind: str, n: int, args, timeout: float) -> dict:
    """One phase in a child process; {"skipped": why} when it did not finish in time."""
    extra = json.dumps({f"{k}|{v}": p for (k, v), p in args.exact_pairs.items() if p is not None})
    command = [
        sys.executable,
        __file__,
        "--child",
        name,
        kind,
        str(n),
        "--workdir",
        args.workdir,
        "--exact-cap",
        str(args.exact_cap),
    ]
    try:
        done = subprocess.run(
            command, input=extra, capture_output=True, text=True, timeout=max(1.0, timeout)
        )
    except subprocess.TimeoutExpired:
        return {"skipped": f"stopped after {timeout:.0f} s"}
    if done.returncode != 0:
        return {"skipped": f"failed: {done.stderr.strip().splitlines()[-1:]}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--data", nargs="+", default=["lowrank", "random"])
    parser.add_argument("--budget", type=float, default=1500, help="seconds for the whole run")
    parser.add_argument("--exact-cap", type=float, default=90, help="seconds of the all-pairs pass")
    parser.add_argument("--phases", nargs="+", default=list(PHASES), choices=list(PHASES))
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    if args.child:
        name, kind, n = args.child
        raw = json.loads(sys.stdin.read() or "{}")
        args.exact_pairs = {(k.split("|")[0], int(k.split("|")[1])): v for k, v in raw.items()}
        print(json.dumps(PHASES[name](kind, int(n), args)))
        return
    deadline = time.monotonic() + args.budget
    args.exact_pairs = {}
    load_before = os.getloadavg()
    results: dict = {}
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        args.workdir = tmp
        for n in args.sizes:
            for kind in args.data:
                for name in args.phases:
                    left = deadline - time.monotonic()
                    if left < 5:
                        results[f"{kind} {n} {name}"] = {"skipped": "no time left"}
                        continue
                    result = run_phase(name, kind, n, args, left)
                    if name == "exact_dups":
                        args.exact_pairs[(kind, n)] = result.pop("pairs", None)
                    result["load"] = round(os.getloadavg()[0], 1)
                    results[f"{kind} {n} {name}"] = result
                    print(f"{kind} {n} {name}: {json.dumps(result)}", flush=True)
    summary = {"load_before": load_before, "load_after": os.getloadavg(), "results": results}
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
