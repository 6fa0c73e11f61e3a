"""report.html for a training run: one self-contained page, charts drawn as inline SVG (no plotting
library).

Input is what log.jsonl holds: a config record first, then training records (step, loss, lr,
logit_scale...) and validation records (event "val", with recall@k and zero-shot figures).
"""

from __future__ import annotations

import html
import json
import math
from typing import Iterable

WIDTH, HEIGHT = 560, 220
PAD_LEFT, PAD_RIGHT, PAD_TOP, PAD_BOTTOM = 58, 14, 26, 30
PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2")

Series = dict[str, list[tuple[float, float]]]


def _fmt(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 1000 or abs(value) < 0.01:
        return f"{value:.2e}"
    return f"{value:.3g}"


def svg_chart(title: str, series: Series, *, y_label: str = "") -> str:
    """A line chart of one or more (x, y) series sharing axes, as an <svg> element."""
    points = [(x, y) for line in series.values() for x, y in line if math.isfinite(y)]
    if not points:
        return f'<svg width="{WIDTH}" height="60"><text x="8" y="30">{html.escape(title)}: no data yet</text></svg>'
    x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
    y0, y1 = min(p[1] for p in points), max(p[1] for p in points)
    if x1 == x0:
        x1 = x0 + 1
    if y1 == y0:
        y0, y1 = y0 - 0.5 * (abs(y0) or 1), y1 + 0.5 * (abs(y1) or 1)
    plot_w, plot_h = WIDTH - PAD_LEFT - PAD_RIGHT, HEIGHT - PAD_TOP - PAD_BOTTOM
    per_row = 4
    legend_rows = math.ceil(len(series) / per_row) if len(series) > 1 else 0
    height = HEIGHT + 16 * legend_rows  # the legend sits under the x axis, four names a row

    def sx(x: float) -> float:
        return PAD_LEFT + (x - x0) / (x1 - x0) * plot_w

    def sy(y: float) -> float:
        return PAD_TOP + (1 - (y - y0) / (y1 - y0)) * plot_h

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" role="img" '
        f'aria-label="{html.escape(title)}">',
        f'<text x="{PAD_LEFT}" y="16" class="title">{html.escape(title)}</text>',
        f'<rect x="{PAD_LEFT}" y="{PAD_TOP}" width="{plot_w}" height="{plot_h}" class="frame"/>',
    ]
    for frac in (0.0, 0.5, 1.0):  # three y ticks, three x ticks
        y = y0 + frac * (y1 - y0)
        parts.append(
            f'<text x="{PAD_LEFT - 4}" y="{sy(y) + 4:.1f}" class="tick" text-anchor="end">{_fmt(y)}</text>'
        )
        x = x0 + frac * (x1 - x0)
        parts.append(
            f'<text x="{sx(x):.1f}" y="{HEIGHT - 12}" class="tick" text-anchor="middle">{_fmt(x)}</text>'
        )
    if y_label:
        parts.append(
            f'<text x="{WIDTH - PAD_RIGHT}" y="16" class="tick" text-anchor="end">{html.escape(y_label)}</text>'
        )
    for i, (name, line) in enumerate(series.items()):
        colour = PALETTE[i % len(PALETTE)]
        coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in line if math.isfinite(y))
        if coords:
            parts.append(
                f'<polyline points="{coords}" fill="none" stroke="{colour}" stroke-width="1.5"/>'
            )
        if legend_rows:
            x, y = PAD_LEFT + 125 * (i % per_row), HEIGHT + 4 + 16 * (i // per_row)
            parts.append(
                f'<text x="{x}" y="{y}" fill="{colour}" class="tick">&#9632; {html.escape(name)}</text>'
            )
    parts.append(
        f'<text x="{WIDTH - PAD_RIGHT}" y="{HEIGHT - 2}" class="tick" text-anchor="end">step</text>'
    )
    parts.append("</svg>")
    return "\n".join(parts)


def _natural(key: str) -> tuple:
    # "R@5" before "R@10"
    head, _, tail = key.rpartition("@")
    return (head, int(tail)) if tail.isdigit() else (key, 0)


def _series(records: Iterable[dict], key: str) -> list[tuple[float, float]]:
    out = []
    for record in records:
        value = record.get(key)
        if isinstance(value, (int, float)) and "step" in record:
            out.append((float(record["step"]), float(value)))
    return out


def render_report(records: list[dict], title: str = "zsclip training run") -> str:
    """The whole page for the records of a log.jsonl (config first), as an HTML string."""
    config = next((r for r in records if r.get("event") == "config"), {})
    train = [r for r in records if r.get("event", "train") == "train"]
    val = [r for r in records if r.get("event") == "val"]
    recall_keys = sorted(
        {k for r in val for k in r if "R@" in k or k.startswith("zeroshot")}, key=_natural
    )
    charts = [
        svg_chart("loss", {"loss": _series(train, "loss")}),
        svg_chart("learning rate", {"lr": _series(train, "lr")}),
        svg_chart("logit scale (exp, capped at 100)", {"scale": _series(train, "logit_scale")}),
        svg_chart(
            "validation", {k: _series(val, k) for k in recall_keys}, y_label="recall / top-1"
        ),
    ]
    last = train[-1] if train else {}
    summary = ", ".join(
        f"{k} {_fmt(last[k])}" for k in ("step", "epoch", "loss", "images_per_s") if k in last
    )
    latest_val = val[-1] if val else {}
    val_rows = "".join(
        f"<tr><td>{html.escape(k)}</td><td>{latest_val[k]:.4f}</td></tr>"
        for k in recall_keys
        if isinstance(latest_val.get(k), (int, float))
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }}
.charts {{ display: flex; flex-wrap: wrap; gap: 12px; }}
svg {{ background: #fff; border: 1px solid #ddd; }}
.frame {{ fill: none; stroke: #bbb; }} .title {{ font-size: 13px; font-weight: 600; }} .tick {{ font-size: 10px; }}
pre {{ background: #f6f6f6; padding: 0.8em; overflow-x: auto; font-size: 12px; }}
td {{ padding: 0 1em 0 0; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<p>Latest: {html.escape(summary) or "no steps yet"}</p>
<div class="charts">
{chr(10).join(charts)}
</div>
<h2>Latest validation</h2>
<table>{val_rows or "<tr><td>none</td></tr>"}</table>
<h2>Configuration</h2>
<pre>{html.escape(json.dumps(config, indent=2, sort_keys=True))}</pre>
</body></html>
"""
