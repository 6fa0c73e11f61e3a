"""`zsclip config`: show, set and unset the settings in the user's settings file (zsclip.config).

Today the one setting is `model`, the default model of every command that takes --model. A value is
checked when it is set, without downloading anything: a path must exist (it is stored absolute), a
name must be one `zsclip models` lists (it is stored as listed), hf:ORG/NAME is taken as written.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from zsclip.errors import UserError

KeyArg = Annotated[
    str, typer.Argument(metavar="KEY", help="The setting's name: model.", show_default=False)
]


def register(app: typer.Typer) -> None:
    group = typer.Typer(
        help="Show or change zsclip's settings file: the default model without --model.\n\n"
        "Example: zsclip config set model ViT-B/32",
        no_args_is_help=True,
        rich_markup_mode=None,
    )
    group.command("show")(show_command)
    group.command("set")(set_command)
    group.command("unset")(unset_command)
    group.command("path")(path_command)
    app.add_typer(group, name="config")


def show_command() -> None:
    """Print the settings as KEY = VALUE lines, and say on stderr which model is the default.

    The default model is --model, else $ZSCLIP_MODEL, else the settings file's model, else the
    built-in model.
    """
    from zsclip.cli._output import note
    from zsclip.config import KEYS, config_path, read_settings
    from zsclip.escapes import for_display

    path = config_path()
    settings = read_settings(path)
    for key, value in settings.items():
        text = value if isinstance(value, str) else _json(value)
        sys.stdout.write(f"{for_display(key)} = {for_display(text)}\n")
    sys.stdout.flush()
    if not path.exists():
        note(f"zsclip: no settings file yet ({path}); e.g. `zsclip config set model ViT-B/32`")
    for key in settings:
        if key not in KEYS:
            note(f"zsclip: {key!r} is not a setting this version reads; it is ignored")
    note(f"zsclip: without --model, commands use {_default_model_phrase(settings, path)}")


def set_command(
    key: KeyArg,
    value: Annotated[
        str,
        typer.Argument(
            metavar="VALUE",
            help="For model: a name from `zsclip models`, hf:ORG/NAME, or a checkpoint path.",
            show_default=False,
        ),
    ],
) -> None:
    """Set KEY to VALUE in the settings file (written atomically; the folder is created).

    Example: zsclip config set model ViT-B/32
    """
    from zsclip.cli._output import note, warn
    from zsclip.config import config_path, read_settings, write_settings

    _check_key(key)
    stored = _checked_model(value)
    path = config_path()
    settings = read_settings(path)  # a damaged file is reported, not overwritten
    settings[key] = stored
    write_settings(settings, path)
    note(f"zsclip: {key} = {stored} (in {path})")
    from zsclip.core import catalogue as hub

    entry = hub.lookup(stored)
    if entry is not None and not entry.cached():
        size = f" ({_mib(entry.size)})" if entry.size else ""
        note(
            f"zsclip: {entry.name}{size} is downloaded on first use; "
            f"`zsclip download {entry.name}` fetches it now"
        )
    _warn_if_overridden(warn)


def unset_command(key: KeyArg) -> None:
    """Remove KEY from the settings file; without a model setting, the built-in model is the default."""
    from zsclip.cli._output import note, warn
    from zsclip.config import config_path, read_settings, write_settings

    _check_key(key)
    path = config_path()
    settings = read_settings(path)
    if key not in settings:
        note(f"zsclip: {key} is not set in {path}; nothing to do")
        return
    del settings[key]
    write_settings(settings, path)
    note(f"zsclip: removed {key} from {path}")
    _warn_if_overridden(warn)


def path_command() -> None:
    """Print where the settings file is (or would be): $XDG_CONFIG_HOME/zsclip/config.json, else
    ~/.config/zsclip/config.json."""
    from zsclip.config import config_path
    from zsclip.escapes import for_display

    sys.stdout.write(f"{for_display(str(config_path()))}\n")
    sys.stdout.flush()


# ------------------------------------------------------------------------------------------ helpers


def _check_key(key: str) -> None:
    from zsclip.config import KEYS

    if key not in KEYS:
        known = ", ".join(f"{name} ({meaning})" for name, meaning in KEYS.items())
        raise UserError(f"unknown setting {key!r}; the settings are: {known}")


def _checked_model(value: str) -> str:
    """What `config set model VALUE` stores, checked the way --model is, without downloading: an
    existing path (made absolute), a listed name (as listed), or hf:ORG/NAME."""
    from zsclip.core import catalogue as hub
    from zsclip.core.presets import canonical_preset_name

    text = value.strip()
    if not text:
        raise UserError(
            "the model must not be empty; to go back to the built-in model run "
            "`zsclip config unset model`"
        )
    candidate = Path(text).expanduser()
    if candidate.exists():
        return str(candidate.resolve())
    if hub.is_hf_spec(text):
        repo = text[3:].strip()
        if repo.count("/") != 1 or not all(repo.split("/")):
            raise UserError(
                f"{text} is not hf:ORG/NAME; write e.g. hf:openai/clip-vit-base-patch32"
            )
        return f"hf:{repo}"
    for builtin in hub.builtin_models():
        if hub.canonical(builtin.stem) == hub.canonical(text):
            return builtin.stem
    entry = hub.lookup(text)
    if entry is not None and entry.kind == "openai":
        return entry.name
    if entry is not None:
        raise UserError(f"{text!r} is the tokenizer's vocabulary, not a model; see `zsclip models`")
    if canonical_preset_name(text) is not None:
        raise UserError(
            f"{text!r} names an architecture without trained weights here; train it with "
            f"`zsclip train --model {text}`, or give a checkpoint path"
        )
    raise UserError(
        f"no model or file named {text!r}; see `zsclip models` for names, or give a checkpoint path"
    )


def _default_model_phrase(settings: dict, path: Path) -> str:
    import os

    from zsclip.core import catalogue as hub

    if os.environ.get("ZSCLIP_MODEL", "").strip():
        return f"ZSCLIP_MODEL={os.environ['ZSCLIP_MODEL']} (the variable wins over the file)"
    if settings.get("model"):
        return f"{settings['model']} (from {path})"
    builtins = hub.builtin_models()
    return f"the built-in model {builtins[0].stem}" if builtins else "no model (none is built in)"


def _warn_if_overridden(warn) -> None:
    import os

    if os.environ.get("ZSCLIP_MODEL", "").strip():
        warn(
            f"ZSCLIP_MODEL={os.environ['ZSCLIP_MODEL']} is set and wins over the settings file; "
            "unset it for the file's model to apply"
        )


def _mib(size: int) -> str:
    return f"{size / 2**20:.0f} MiB"


def _json(value: object) -> str:
    import json

    return json.dumps(value, ensure_ascii=False)
