"""Placeholders in `--help` that read as words: `--top-k N`, `--output FILE`, `INPUT...`, `DST`.

Recent Typer releases show a parameter's Python type instead (`--top-k <int range>`, `INPUT
<list[str]>`, `{out}` for a required argument). `WordedGroup`, the class of zsclip's top-level
command group, gives every option and argument of every command (sub-groups included) a word when
its declaration names none:

    int -> N, float -> X, a path -> DIR when the option's name ends in "dir", else FILE,
    any other value -> the option's name in capitals (--model MODEL, --format FORMAT),
    an argument -> its name in capitals, with "..." when it takes several and in [ ] when optional.

A `metavar=` given in a declaration wins.
"""

from __future__ import annotations

from pathlib import Path, PurePath
from typing import Any, get_args, get_origin

import typer

_CLICK_TYPES = {
    "integer": int,
    "integer range": int,
    "float": float,
    "float range": float,
    "path": Path,
}


def _value_type(param: Any) -> Any:
    """The Python type of one value of `param`: Typer >= 0.29 describes it itself, older Typer
    releases through click's parameter types."""
    descriptor = getattr(param, "type_descriptor", None)
    if descriptor is not None:
        annotation = descriptor.annotation
        return get_args(annotation)[0] if get_origin(annotation) is list else annotation
    return _CLICK_TYPES.get(getattr(getattr(param, "type", None), "name", ""), str)


def _option_word(param: Any) -> str:
    name = (max(param.opts, key=len) if param.opts else param.name or "value").lstrip("-")
    kind = _value_type(param)
    if kind is int:
        return "N"
    if kind is float:
        return "X"
    if isinstance(kind, type) and issubclass(kind, PurePath):
        return "DIR" if name.endswith("dir") else "FILE"
    return name.replace("-", "_").upper()


def _argument_word(param: Any) -> str:
    return (param.metavar or param.name or "arg").upper()


def _argument_with_words(base: type) -> type:
    """`base` (an argument class) showing its word, without a type, in usage and in help."""

    def word(self: Any) -> str:
        return _argument_word(self) + ("..." if self.nargs != 1 else "")

    def get_usage_pieces(self: Any, ctx: Any) -> list[str]:
        return [word(self) if self.required else f"[{word(self)}]"]

    def get_help_record(self: Any, ctx: Any) -> tuple[str, str] | None:
        record = base.get_help_record(self, ctx)
        return None if record is None else (word(self), record[1])

    methods = {"get_usage_pieces": get_usage_pieces, "get_help_record": get_help_record}
    # No new slots: the same memory layout as `base`, so an existing instance can switch class.
    return type(f"Worded{base.__name__}", (base,), {"__slots__": (), "worded": True, **methods})


_WORDED: dict[type, type] = {}


def reword(command: Any) -> None:
    """Give every parameter of `command` (and of its sub-commands) a word placeholder."""
    for param in getattr(command, "params", []):
        if param.param_type_name == "argument":
            base = type(param)
            if not getattr(base, "worded", False):
                param.__class__ = _WORDED.setdefault(base, _argument_with_words(base))
        elif param.param_type_name == "option":
            if param.metavar is None and not param.is_flag and not param.count:
                param.metavar = _option_word(param)
    for sub in getattr(command, "commands", {}).values():
        reword(sub)


class WordedGroup(typer.core.TyperGroup):
    """zsclip's top-level group: its commands' placeholders are words (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        reword(self)
