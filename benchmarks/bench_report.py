"""Accuracy checks and the Markdown report for bench_classify.py (kept apart so the runner stays readable)."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import torch


def _cached_vectors(database: Path) -> dict[str, torch.Tensor]:
    """{path: vector} of every embedding in one case's image cache (each case has its own cache folder)."""
    from zsclip.jobs.cache import blob_to_vector

    with sqlite3.connect(database) as connection:
        rows = connection.execute("SELECT path, vector FROM images").fetchall()
    return {path: torch.tensor(blob_to_vector(blob)) for path, blob in rows}


def _in_order(vectors: dict[str, torch.Tensor], folder: Path) -> torch.Tensor:
    return torch.stack([vectors[str(path)] for path in sorted(folder.glob("*.jpg"))])  # [N, D]


def _top1(path: Path) -> list[str]:
    return [json.loads(line)["label"] for line in path.read_text().splitlines()]


def compare(work: Path) -> dict:
    """How zsclip's embeddings relate to transformers' (the reference) and to each other."""
    from zsclip.jobs.embedding_files import read_embeddings

    out: dict[str, float] = {}
    ref12 = work / "reference-photos-4000x3000.pt"
    ref640 = work / "reference-photos-640x480.pt"
    if ref12.is_file() and (work / "exact-12mp.safetensors").is_file():
        exact = read_embeddings(work / "exact-12mp.safetensors").vectors
        out["exact_12mp_max_abs_diff"] = float(
            (exact - torch.load(ref12)[: len(exact)]).abs().max()
        )
    if ref12.is_file() and (work / "cache-12mp" / "images.sqlite3").is_file():
        drafted = _in_order(
            _cached_vectors(work / "cache-12mp" / "images.sqlite3"), work / "photos-4000x3000"
        )
        cosine = (drafted * torch.load(ref12)).sum(dim=-1)
        out["draft_12mp_cosine_min"], out["draft_12mp_cosine_mean"] = (
            float(cosine.min()),
            float(cosine.mean()),
        )
    fp32_db = work / "cache-640" / "images.sqlite3"
    if ref640.is_file() and fp32_db.is_file():
        default = _in_order(_cached_vectors(fp32_db), work / "photos-640x480")
        out["default_640_max_abs_diff"] = float((default - torch.load(ref640)).abs().max())
    bf16_db = work / "cache-640-bf16" / "images.sqlite3"
    if fp32_db.is_file() and bf16_db.is_file():
        fp32 = _in_order(_cached_vectors(fp32_db), work / "photos-640x480")
        bf16 = _in_order(_cached_vectors(bf16_db), work / "photos-640x480")
        cosine = (fp32 * bf16).sum(dim=-1)
        out["bf16_cosine_min"], out["bf16_cosine_mean"] = float(cosine.min()), float(cosine.mean())
        a, b = (
            _top1(work / "out-cache-640-labels-a.txt.jsonl"),
            _top1(work / "out-cache-640-bf16-labels-a.txt.jsonl"),
        )
        out["bf16_top1_agreement"] = sum(x == y for x, y in zip(a, b)) / len(a)
    if (work / "classifier-zsclip.pt").is_file() and (work / "classifier-hf.pt").is_file():
        diff = torch.load(work / "classifier-zsclip.pt") - torch.load(work / "classifier-hf.pt")
        out["classifier_max_abs_diff"] = float(diff.abs().max())
    return out


def _value(results: dict, name: str, key: str) -> float | None:
    """A case's figure; for a ceiling, the mean of its runs before and after the pipeline it bounds."""
    runs = [results[n][key] for n in (name, f"{name}-again") if n in results]
    return sum(runs) / len(runs) if runs else None


def _ratio(results: dict, a: str, b: str, key: str, invert: bool = False) -> str:
    x, y = _value(results, a, key), _value(results, b, key)
    if x is None or y is None:
        return "n/a"
    return f"{(y / x) if invert else (x / y):.2f}x"


def render(results: dict) -> str:
    """Markdown tables: one row per case, then the ratios the targets are about."""
    lines = [
        f"Load average (1, 5, 15 min) before: {', '.join(f'{v:.2f}' for v in results['load_before'])}; "
        f"after: {', '.join(f'{v:.2f}' for v in results['load_after'])}",
        "",
        f"`zsclip --help`: min {results['help']['min_s']:.3f} s, median {results['help']['median_s']:.3f} s "
        f"over {results['help']['runs']} runs",
        "",
        "| case | items | start-up s | items/s after start-up | wall s | peak RSS MB | runs: spread |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in results.items():
        if not isinstance(row, dict) or "wall_s" not in row:
            continue
        items = row.get("images", row.get("prompts", ""))
        rate = row.get("images_per_s", row.get("prompts_per_s"))
        rate_text = f"{rate:.2f}" if rate is not None else ""
        lines.append(
            f"| {name} | {items} | {row.get('startup_s', 0):.2f} | {rate_text} | {row['wall_s']:.2f} | "
            f"{row['peak_rss_mb']:.0f} | {row.get('runs', 1)}: {row.get('spread', '')} |"
        )
    r = results
    lines += [
        "",
        "| ratio | measured | target |",
        "|---|---|---|",
        f"| 12 MP folder, images/s zsclip / transformers | {_ratio(r, 'zsclip-12mp', 'hf-12mp', 'images_per_s')}"
        " | >= 2.5x |",
        f"| 12 MP folder, wall time transformers / zsclip (start-up included) | "
        f"{_ratio(r, 'zsclip-12mp', 'hf-12mp', 'wall_s', invert=True)} | |",
        f"| 12 MP folder, images/s zsclip / transformers with PASSIVE | "
        f"{_ratio(r, 'zsclip-12mp', 'hf-12mp-passive', 'images_per_s')} | |",
        f"| 640x480 folder, images/s zsclip / transformers | "
        f"{_ratio(r, 'zsclip-640', 'hf-640', 'images_per_s')} | >= 1.2x |",
        f"| 640x480 folder, images/s zsclip / model-only ceiling | "
        f"{_ratio(r, 'zsclip-640', 'ceiling-fp32', 'images_per_s')} | >= 0.85x |",
        f"| 640x480 folder, images/s zsclip / transformers with PASSIVE | "
        f"{_ratio(r, 'zsclip-640', 'hf-640-passive', 'images_per_s')} | |",
        f"| 640x480, transformers / ceiling | {_ratio(r, 'hf-640', 'ceiling-fp32', 'images_per_s')} | |",
        f"| 700-prompt classifier, prompts/s zsclip / transformers one padded batch (its documented usage) | "
        f"{_ratio(r, 'text-zsclip', 'text-hf-batched', 'prompts_per_s')} | >= 3x |",
        f"| 700-prompt classifier, prompts/s zsclip / transformers per label at 77 tokens (the notebook's loop) | "
        f"{_ratio(r, 'text-zsclip', 'text-hf-per-label', 'prompts_per_s')} | |",
        f"| 700-prompt classifier, prompts/s zsclip / transformers one padded batch with PASSIVE | "
        f"{_ratio(r, 'text-zsclip', 'text-hf-batched-passive', 'prompts_per_s')} | |",
        f"| cached reclassification with new labels: first run / rerun, wall | "
        f"{_ratio(r, 'zsclip-640-warm', 'zsclip-640', 'wall_s', invert=True)} | >= 5x |",
        f"| bf16 / fp32, model-only ceiling | {_ratio(r, 'ceiling-bf16', 'ceiling-fp32', 'images_per_s')} | |",
        f"| bf16 / fp32, 640x480 folder images/s | "
        f"{_ratio(r, 'zsclip-640-bf16', 'zsclip-640', 'images_per_s')} | |",
    ]
    if "text-zsclip" in r:
        lines.append(
            f"| 700-prompt classifier from the cache | {r['text-zsclip']['cached_s'] * 1e3:.0f} ms | |"
        )
    lines += ["", "| accuracy | value |", "|---|---|"]
    lines += [f"| {key} | {value:.6g} |" for key, value in results.get("accuracy", {}).items()]
    return "\n".join(lines)
