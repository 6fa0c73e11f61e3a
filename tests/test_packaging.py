"""The installed wheel, not the checkout: prompts/ and weights/ travel inside the package
(zsclip/_data, pyproject's force-include) and are found from anywhere.

Built offline with the build backend the test extras install (hatchling), installed with
`pip install --no-deps --target` into a scratch folder that comes first on PYTHONPATH, and run
from a folder outside the checkout, so nothing can fall back to the source tree.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _pip(*args: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pip", "--disable-pip-version-check", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> dict:
    pytest.importorskip("hatchling", reason="the test extras install hatchling to build the wheel")
    scratch = tmp_path_factory.mktemp("wheel")
    source = scratch / "source"  # a copy, so the build writes nothing into the checkout
    shutil.copytree(
        ROOT,
        source,
        ignore=shutil.ignore_patterns(".*", "__pycache__", "tests", "benchmarks", "*.egg-info"),
    )
    _pip(
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "--no-index",
        "-q",
        "-w",
        str(scratch),
        str(source),
    )
    [wheel] = scratch.glob("zsclip-*.whl")
    site = scratch / "site"
    _pip("install", "--no-deps", "--no-index", "-q", "--target", str(site), str(wheel))
    elsewhere = scratch / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "ZSCLIP_CACHE": str(scratch / "cache")}
    env.pop("ZSCLIP_MODEL", None)
    env["XDG_CONFIG_HOME"] = str(scratch / "config")  # no user settings file (zsclip config)
    return {"wheel": wheel, "site": site, "cwd": elsewhere, "env": env}


def run_installed(installed: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        cwd=installed["cwd"],
        env=installed["env"],
        timeout=300,
    )


def test_the_wheel_carries_the_data_inside_the_package(installed: dict) -> None:
    names = set(zipfile.ZipFile(installed["wheel"]).namelist())
    for prompt in (ROOT / "prompts").glob("*.txt"):
        assert f"zsclip/_data/prompts/{prompt.name}" in names
    for weight in (ROOT / "weights").glob("*.safetensors"):
        assert f"zsclip/_data/weights/{weight.name}" in names
    assert "zsclip/core/catalogue.json" in names
    assert not any(name.startswith(("tests/", "prompts/", "weights/")) for name in names)


def test_the_installed_package_finds_its_data_and_classifies(installed: dict) -> None:
    """Imported from the install (not the checkout), it finds every prompt set and the built-in
    model, and `zsclip classify` on the examples gives the built-in model's answers."""
    probe = run_installed(
        installed,
        "-c",
        "import json, zsclip, zsclip.paths as p; from zsclip.jobs.labels import "
        "available_template_sets as sets; print(json.dumps([zsclip.__file__, str(p.prompts_dir()), "
        "[m.name for m in p.builtin_models()], sets()]))",
    )
    assert probe.returncode == 0, probe.stderr
    module, prompts, models, sets = json.loads(probe.stdout)
    site = str(installed["site"])
    assert module.startswith(site) and prompts.startswith(site)
    assert models == [path.name for path in sorted((ROOT / "weights").glob("*.safetensors"))]
    assert sets == sorted(path.stem for path in (ROOT / "prompts").glob("*.txt"))

    examples = installed["cwd"] / "examples"
    shutil.copytree(ROOT / "examples", examples)
    done = run_installed(
        installed, "-m", "zsclip", "classify", "examples", "-L", "examples/labels.txt", "-k", "1"
    )
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    # every example is named after what it shows
    assert [row["label"] for row in rows] == [
        Path(row["path"]).stem.replace("-", " ") for row in rows
    ]
    assert len(rows) == 8
    named = run_installed(
        installed,
        "-m",
        "zsclip",
        "classify",
        "examples/red-heart.png",
        "-l",
        "red heart,blue star",
        "-t",
        "art",
    )
    assert named.returncode == 0, named.stderr  # a named template set from the installed prompts/
