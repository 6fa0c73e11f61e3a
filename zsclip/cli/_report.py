"""`classify --report FILE.html`: one self-contained page to look at instead of read.

Every image appears as a thumbnail (a base64 JPEG inside the page: no other files, no network) with
its top labels and score bars; a summary at the top counts the images per label. Inputs that could
not be read are listed with their reason. Plain HTML and CSS, no scripts, so it opens anywhere and
prints well. Names and labels are shown escaped (zsclip.escapes.for_display), then HTML-escaped.
"""

from __future__ import annotations

import base64
import html
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from zsclip.atomic import atomic_write_text
from zsclip.escapes import for_display

if TYPE_CHECKING:
    from zsclip.jobs.classify import Prediction

THUMBNAIL_SIZE = 224  # px, longest side: sharp on high-density screens at the 160 px the cards show

_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#1d1d1f;background:#fafafa}
h1{font-size:20px;margin:0 0 4px}h2{font-size:16px;margin:24px 0 8px}.meta{color:#666;margin:0 0 16px}
table.summary{border-collapse:collapse}table.summary td{padding:2px 8px;vertical-align:middle}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(200px,1fr));gap:12px}
.card{background:#fff;border:1px solid #ddd;border-radius:8px;padding:8px;overflow:hidden}
.card img{display:block;width:100%;height:160px;object-fit:contain;background:#eee;border-radius:4px}
.nopreview{height:160px;display:flex;align-items:center;justify-content:center;background:#eee;color:#888}
.path{font-size:12px;color:#555;word-break:break-all;margin:6px 0}
.row{display:grid;grid-template-columns:1fr 44px;gap:4px;font-size:12px;margin:2px 0}
.bar{grid-column:1/3;height:5px;background:#eee;border-radius:3px}.bar span{display:block;height:100%;
background:#3b82f6;border-radius:3px}.row.first{font-weight:600}.row.first .bar span{background:#16a34a}
.score{text-align:right;color:#444}.error{color:#b91c1c}.none{color:#888;font-size:12px}
"""


def _bar(fraction: float) -> str:
    return f'<div class="bar"><span style="width:{max(0.0, min(1.0, fraction)) * 100:.1f}%"></span></div>'


def _shown(text: str) -> str:
    return html.escape(for_display(text))


def _card(prediction: "Prediction") -> str:
    path = _shown(prediction.path)
    if prediction.thumbnail:
        data = base64.b64encode(prediction.thumbnail).decode("ascii")
        picture = f'<img src="data:image/jpeg;base64,{data}" alt="{path}">'
    else:
        picture = '<div class="nopreview">no preview</div>'
    if prediction.error is not None:
        body = f'<div class="error">{_shown(prediction.error)}</div>'
    elif not prediction.top:
        body = '<div class="none">no label above the threshold</div>'
    else:
        rows = ['<div class="none">unsure: no label accepted</div>'] if prediction.unsure else []
        for rank, (label, score) in enumerate(prediction.top):
            rows.append(
                f'<div class="row{" first" if rank == 0 else ""}"><span>{_shown(label)}</span>'
                f'<span class="score">{score:.2f}</span>{_bar(score)}</div>'
            )
        body = "".join(rows)
    return f'<div class="card">{picture}<div class="path">{path}</div>{body}</div>'


def summary_counts(
    predictions: Sequence["Prediction"], labels: Sequence[str], multi_label: bool
) -> Counter:
    """Images per label: by top label, or (multi-label) by every label that passed the threshold."""
    counts: Counter = Counter({label: 0 for label in labels})
    for prediction in predictions:
        if prediction.error is None:
            counts.update(
                label
                for label, _ in (prediction.accepted if multi_label else prediction.accepted[:1])
            )
    return counts


def _summary(predictions: Sequence["Prediction"], labels: Sequence[str], multi_label: bool) -> str:
    counts = summary_counts(predictions, labels, multi_label)
    readable = sum(p.error is None for p in predictions) or 1
    rows = [
        f'<tr><td>{_shown(label)}</td><td>{count}</td><td style="width:240px">{_bar(count / readable)}'
        f"</td></tr>"
        for label, count in counts.most_common()
    ]
    unsure = sum(p.unsure for p in predictions)
    if unsure:
        rows.append(f'<tr><td class="none">unsure</td><td>{unsure}</td><td></td></tr>')
    errors = sum(p.error is not None for p in predictions)
    if errors:
        rows.append(f'<tr><td class="error">could not be read</td><td>{errors}</td><td></td></tr>')
    return f'<table class="summary">{"".join(rows)}</table>'


def render_report(
    predictions: Sequence["Prediction"],
    labels: Sequence[str],
    *,
    model_name: str,
    multi_label: bool = False,
    title: str = "zsclip classify",
) -> str:
    """The whole page as one string."""
    mode = (
        "multi-label: every label whose score passes the threshold" if multi_label else "top labels"
    )
    meta = (
        f"{len(predictions)} inputs, {len(labels)} labels, model {_shown(model_name)}; "
        f"cards show {mode}"
    )
    cards = "\n".join(_card(prediction) for prediction in predictions)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width"><title>{html.escape(title)}</title>'
        f'<style>{_STYLE}</style></head><body>\n<h1>{html.escape(title)}</h1><p class="meta">{meta}</p>\n'
        f"<h2>Images per label</h2>{_summary(predictions, labels, multi_label)}\n"
        f'<h2>Images</h2><div class="grid">\n{cards}\n</div></body></html>\n'
    )


def write_report(
    path: Path,
    predictions: Sequence["Prediction"],
    labels: Sequence[str],
    *,
    model_name: str,
    multi_label: bool = False,
) -> None:
    """Render and write atomically (a failure to write is one line, exit 3)."""
    from zsclip.cli._runtime import writing

    page = render_report(predictions, labels, model_name=model_name, multi_label=multi_label)
    with writing(str(path)):
        atomic_write_text(path, page)


def thumbnail_for(path: str, size: int = THUMBNAIL_SIZE) -> bytes | None:
    """A thumbnail straight from the file (for `--embeddings` runs, where nothing was decoded); None if
    unreadable."""
    from zsclip.core.transform import load_image
    from zsclip.errors import InputError
    from zsclip.jobs.pipeline import make_thumbnail

    try:
        return make_thumbnail(load_image(path, draft_size=size), size)
    except (InputError, OSError):
        return None


# ------------------------------------------------------------------------------ search and duplicates


def _picture(thumbnail: bytes | None, alt: str) -> str:
    if not thumbnail:
        return '<div class="nopreview">no preview</div>'
    data = base64.b64encode(thumbnail).decode("ascii")
    return f'<img src="data:image/jpeg;base64,{data}" alt="{alt}">'


def _page(title: str, meta: str, body: str) -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width"><title>{html.escape(title)}</title>'
        f'<style>{_STYLE}</style></head><body>\n<h1>{html.escape(title)}</h1><p class="meta">{meta}</p>\n'
        f"{body}</body></html>\n"
    )


def render_search_report(hits: Sequence, *, query: str, model_name: str) -> str:
    """`search --report`: the ranked images as cards (thumbnail, path, cosine and its bar), then
    the inputs that could not be read."""
    cards = []
    for rank, hit in enumerate(hits, start=1):
        path = _shown(hit.path)
        if hit.error is not None:
            body = f'<div class="error">{_shown(hit.error)}</div>'
        else:
            body = (
                f'<div class="row first"><span>#{rank}</span><span class="score">{hit.score:.3f}'
                f"</span>{_bar(hit.score)}</div>"
            )
        cards.append(
            f'<div class="card">{_picture(hit.thumbnail, path)}<div class="path">{path}</div>'
            f"{body}</div>"
        )
    found = sum(hit.error is None for hit in hits)
    meta = f"{found} images for {_shown(query)}, best first; model {_shown(model_name)}; scores are cosines"
    return _page("zsclip search", meta, f'<div class="grid">\n{chr(10).join(cards)}\n</div>')


def render_duplicates_report(
    groups: Sequence,
    errors: Sequence[tuple[str, str]],
    thumbnails: dict,
    *,
    model_name: str,
    threshold: float,
) -> str:
    """`duplicates --report`: one row of thumbnails per group, byte-identical copies marked."""
    sections = []
    for number, group in enumerate(groups, start=1):
        same = {p: n for n, paths in enumerate(group.identical, start=1) for p in paths}
        cards = []
        for path in group.paths:
            mark = (
                f'<div class="none">identical copy (set {same[path]})</div>' if path in same else ""
            )
            cards.append(
                f'<div class="card">{_picture(thumbnails.get(path), _shown(path))}'
                f'<div class="path">{_shown(path)}</div>{mark}</div>'
            )
        sections.append(
            f"<h2>Group {number}: {len(group.paths)} images, lowest cosine {group.min_score:.3f}</h2>"
            f'<div class="grid">{"".join(cards)}</div>'
        )
    if errors:
        rows = "".join(
            f'<tr><td>{_shown(p)}</td><td class="error">{_shown(r)}</td></tr>' for p, r in errors
        )
        sections.append(f'<h2>Could not be read</h2><table class="summary">{rows}</table>')
    meta = f"{len(groups)} groups at cosine >= {threshold:g}; model {_shown(model_name)}"
    return _page("zsclip duplicates", meta, "\n".join(sections) or "<p>No duplicates.</p>")


def write_page(path: Path, page: str) -> None:
    """Write a rendered page atomically (a failure to write is one line, exit 3)."""
    from zsclip.cli._runtime import writing

    with writing(str(path)):
        atomic_write_text(path, page)
