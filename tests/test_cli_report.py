"""The HTML report: self-contained, every image rendered in a real (headless Chromium) browser."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from cli_helpers import build_tiny_checkpoint, make_photo_folder, run_cli

from zsclip.cli._report import render_report, summary_counts
from zsclip.jobs.classify import Prediction

LABELS = "red circle,blue square,corgi"
# Counts the images the browser actually decoded, once everything has loaded, into an attribute of <body>
# that --dump-dom prints.
PROBE = (
    "<script>addEventListener('load', () => { const all = [...document.images];"
    " document.body.dataset.loaded = all.filter(i => i.complete && i.naturalWidth > 0).length + '/' + all.length;"
    " });</script>"
)


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def images_rendered(html_file: Path, scratch: Path) -> tuple[int, int]:
    """(decoded, total) images of the page as headless Chromium sees them."""
    browser = find_chromium()
    if browser is None:
        message = "headless browser test needs Chromium: apt-get install -y chromium"
        if os.environ.get("ZSCLIP_REQUIRE_BROWSER", "") not in ("", "0"):
            pytest.fail(f"{message} (ZSCLIP_REQUIRE_BROWSER is set, as in .ci/run)")
        pytest.skip(message)
    probe = scratch / "probe.html"
    probe.write_text(
        html_file.read_text(encoding="utf-8").replace("</body>", PROBE + "</body>"),
        encoding="utf-8",
    )
    command = [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--disable-extensions",
        f"--user-data-dir={scratch / 'profile'}",
        "--virtual-time-budget=10000",
        "--dump-dom",
        probe.as_uri(),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    found = re.search(r'data-loaded="(\d+)/(\d+)"', done.stdout)
    assert found, f"no result from Chromium (exit {done.returncode}): {done.stderr[-800:]}"
    return int(found.group(1)), int(found.group(2))


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("report")
    return {
        "model": str(build_tiny_checkpoint(root)),
        "root": root,
        "expected": make_photo_folder(root / "photos"),
    }


def test_report_renders_every_image_in_a_browser(world: dict, tmp_path: Path) -> None:
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not really")
    report = tmp_path / "report.html"
    result = run_cli(
        [
            "classify",
            "--model",
            world["model"],
            "-t",
            "simple",
            str(world["root"] / "photos"),
            str(broken),
            "--labels",
            LABELS,
            "--report",
            str(report),
        ]
    )
    assert result.code == 1  # the broken file; everything else was classified and shown
    html = report.read_text(encoding="utf-8")
    assert (
        "http://" not in html and "https://" not in html and "<script" not in html
    )  # self-contained, static
    assert html.count("data:image/jpeg;base64,") == len(world["expected"])
    assert "broken.jpg" in html and "Images per label" in html
    decoded, total = images_rendered(report, tmp_path)
    assert (decoded, total) == (len(world["expected"]), len(world["expected"]))


def test_report_from_saved_embeddings_reads_thumbnails(world: dict, tmp_path: Path) -> None:
    saved = tmp_path / "photos.safetensors"
    assert (
        run_cli(
            ["embed", "--model", world["model"], str(world["root"] / "photos"), "-o", str(saved)]
        ).code
        == 0
    )
    report = tmp_path / "report.html"
    result = run_cli(
        [
            "classify",
            "--model",
            world["model"],
            "-t",
            "simple",
            "--embeddings",
            str(saved),
            "--labels",
            LABELS,
            "--report",
            str(report),
            "--multi-label",
            "--threshold",
            "-1",
        ]
    )
    assert result.code == 0, result.stderr
    assert report.read_text().count("data:image/jpeg;base64,") == len(world["expected"])


def test_render_escapes_and_counts() -> None:
    predictions = [
        Prediction("<b>&.jpg", [("cat", 0.9), ("dog", 0.1)], thumbnail=b"\xff\xd8fake"),
        Prediction("two.jpg", [("cat", 0.6), ("dog", 0.4)]),
        Prediction("bad.jpg", error="empty file <0 bytes>"),
    ]
    page = render_report(predictions, ["cat", "dog"], model_name="m<1>")
    assert "<b>&.jpg" not in page and "&lt;b&gt;&amp;.jpg" in page
    assert "empty file &lt;0 bytes&gt;" in page and "m&lt;1&gt;" in page
    assert page.count("<img ") == 1 and page.count("no preview") == 2
    assert summary_counts(predictions, ["cat", "dog"], multi_label=False) == {"cat": 2, "dog": 0}
    assert summary_counts(predictions, ["cat", "dog"], multi_label=True) == {"cat": 2, "dog": 2}
