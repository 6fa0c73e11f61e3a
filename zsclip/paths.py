"""Where zsclip finds its data (prompts/, weights/) and keeps its cache.

A checkout has prompts/ and weights/ beside the package; an installed wheel carries them in
zsclip/_data/.
"""

from __future__ import annotations

import os
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def _data_dir(name: str) -> Path:
    installed = _PACKAGE / "_data"  # what the wheel carries
    if installed.is_dir():
        return installed / name
    return _PACKAGE.parent / name  # a source checkout or an editable install


def prompts_dir() -> Path:
    """Folder of the named prompt-template sets (`<name>.txt`)."""
    return _data_dir("prompts")


def weights_dir() -> Path:
    """Folder of the built-in model(s) shipped with zsclip."""
    return _data_dir("weights")


def cache_dir() -> Path:
    """zsclip's cache: $ZSCLIP_CACHE, else $XDG_CACHE_HOME/zsclip, else ~/.cache/zsclip. Not created
    here."""
    if os.environ.get("ZSCLIP_CACHE"):
        return Path(os.environ["ZSCLIP_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "zsclip"


def builtin_models() -> list[Path]:
    """The models shipped in weights/ (`<name>.safetensors`), the default first: the one named in
    weights/DEFAULT if that file exists, else in name order. Empty when none is shipped."""
    folder = weights_dir()
    if not folder.is_dir():
        return []
    found = sorted(path for path in folder.glob("*.safetensors") if path.is_file())
    default_file = folder / "DEFAULT"
    if default_file.is_file():
        wanted = default_file.read_text().strip()
        found.sort(key=lambda path: path.stem != wanted)  # stable: the rest keep name order
    return found
