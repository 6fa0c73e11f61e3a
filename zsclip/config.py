"""The user's settings file, so that a default model does not need --model or an environment variable.

The file is `$XDG_CONFIG_HOME/zsclip/config.json`, else `~/.config/zsclip/config.json`: one JSON object
of strings, written by `zsclip config set` (atomically) and read by every command that loads a model.
One key is read:

    model   the model a command uses without --model: a name from `zsclip models`, hf:ORG/NAME, or
            a checkpoint path

Which model a command uses: --model, else $ZSCLIP_MODEL, else this file's `model`, else the built-in
model (`default_model` gives the second and third, with where the value came from, so an error about a
bad name can say where to fix it). Device and prompt set are not settings: `--device auto` already
picks the GPU, and a model names the prompt set it was trained for.

The file is read as untrusted text: at most MAX_BYTES, UTF-8 JSON, an object whose known keys hold
non-empty strings. Anything else is one UserError naming the file and the fix; keys this version
does not know are kept when the file is rewritten and otherwise ignored.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from zsclip.errors import UserError

FILE_NAME = "config.json"
KEYS = {
    "model": "the model used without --model",
}
MAX_BYTES = 64 * 1024  # a settings file is a few lines; anything larger is not one


@dataclass(frozen=True)
class ModelChoice:
    """A default model and where it came from, for error messages."""

    spec: str
    source: str  # "ZSCLIP_MODEL" or the settings file's path

    def blame(self, message: str) -> str:
        """`message` prefixed with where the bad value came from and how to change it."""
        if self.source == "ZSCLIP_MODEL":
            return f"ZSCLIP_MODEL={self.spec}: {message} (or unset ZSCLIP_MODEL)"
        return (
            f"model {self.spec!r} from {self.source}: {message} "
            "(or change it: `zsclip config set model NAME`, `zsclip config unset model`)"
        )


def config_path() -> Path:
    """Where the settings live (the file need not exist)."""
    xdg = os.environ.get("XDG_CONFIG_HOME")
    base = Path(xdg).expanduser() if xdg and os.path.isabs(xdg) else Path.home() / ".config"
    return base / "zsclip" / FILE_NAME


def _damaged(path: Path, reason: str) -> UserError:
    return UserError(
        f"settings file {path} {reason}; fix it (a JSON object such as "
        f'{{"model": "ViT-B/32"}}) or delete it'
    )


def read_settings(path: Path | None = None) -> dict[str, object]:
    """The settings file's object ({} when there is no file); a UserError when it is damaged."""
    path = config_path() if path is None else path
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_BYTES + 1)
    except FileNotFoundError:
        return {}
    except IsADirectoryError:
        raise _damaged(path, "is a folder, not a settings file") from None
    except OSError as err:
        raise UserError(f"cannot read {path}: {err.strerror or err}") from None
    if len(data) > MAX_BYTES:
        raise _damaged(
            path, f"is larger than {MAX_BYTES // 1024} KiB, too large for a settings file"
        )
    try:
        settings = json.loads(data.decode("utf-8-sig"))
    except UnicodeDecodeError:
        raise _damaged(path, "is not UTF-8 text") from None
    except json.JSONDecodeError as err:
        raise _damaged(path, f"is not valid JSON ({err.msg}, line {err.lineno})") from None
    except RecursionError:
        raise _damaged(path, "is nested too deeply") from None
    if not isinstance(settings, dict):
        raise _damaged(path, "holds no JSON object")
    for key in KEYS:
        value = settings.get(key)
        if key in settings and not (isinstance(value, str) and value.strip()):
            raise _damaged(path, f"has a {key!r} that is not a non-empty string")
    return settings


def write_settings(settings: dict[str, object], path: Path | None = None) -> Path:
    """Replace the settings file atomically (the folder is created); returns its path."""
    from zsclip.atomic import OutputError, atomic_write_text

    path = config_path() if path is None else path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(settings, indent=2, ensure_ascii=False) + "\n")
    except OutputError:
        raise
    except OSError as err:
        raise UserError(f"cannot write {path}: {err.strerror or err}") from None
    return path


def default_model() -> ModelChoice | None:
    """The model to use when no --model was given: $ZSCLIP_MODEL, else the settings file's `model`,
    else None (the built-in model). The file is not read when the variable is set."""
    from_env = os.environ.get("ZSCLIP_MODEL", "")
    if from_env.strip():
        return ModelChoice(from_env, "ZSCLIP_MODEL")
    path = config_path()
    model = read_settings(path).get("model")
    return ModelChoice(str(model), str(path)) if model else None
