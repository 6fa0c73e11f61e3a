"""`zsclip classify ... --server URL` without Typer: the call a file watcher or a photo manager's hook
makes once per image, where importing Typer (and the pydantic it brings) and building the command
would be most of the wait.

`quick_command` reads the command line itself, but only when it is sure to read it exactly as the
Typer command would: every option it meets is one it knows, every value plainly valid. Anything
else (--help, an option that chooses a model here, a value Typer would refuse or might read
differently, combined short flags) returns None, and the Typer app takes the whole command line,
with its usual messages. What runs is zsclip.cli._classify_server.ServerClassify, the same code the
Typer command runs with --server. tests/test_cli_quick.py holds the option table below to the Typer
command's, so an option added there without a line here is caught.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from zsclip.cli._classify_server import ServerClassify


@dataclass(frozen=True)
class QuickOption:
    field: Optional[str]  # ServerClassify's field; None: accepted and ignored with --server
    opts: tuple[str, ...]  # as the Typer command spells them
    read: Optional[Callable[[str], object]] = (
        None  # value -> field value (None: refuse); a flag: None
    )
    flag_value: object = True  # what a flag sets
    secondary: bool = False  # a --no-... spelling of a flag


_INTEGER = re.compile(r"[0-9]{1,9}")
_DECIMAL = re.compile(r"-?(?:[0-9]{1,9}(?:\.[0-9]*)?|\.[0-9]+)")


def _whole(least: int) -> Callable[[str], object]:
    def read(text: str) -> int | None:
        return int(text) if _INTEGER.fullmatch(text) and int(text) >= least else None

    return read


def _between(low: float, high: float) -> Callable[[str], object]:
    def read(text: str) -> float | None:
        if not _DECIMAL.fullmatch(text):
            return None
        value = float(text)
        return value if math.isfinite(value) and low <= value <= high else None

    return read


def _text(text: str) -> str | None:
    return text or None  # an empty value: let Typer (and the command's checks) decide


def _path(text: str) -> Path | None:
    return Path(text) if text else None


OPTIONS = (
    QuickOption("labels", ("--labels", "-l"), _text),
    QuickOption("labels_file", ("--labels-file", "-L"), _path),
    QuickOption("templates", ("--templates", "-t"), _text),
    QuickOption("top_k", ("--top-k", "-k"), _whole(1)),
    QuickOption("multi_label", ("--multi-label",)),
    QuickOption("threshold", ("--threshold",), _between(-1.0, 1.0)),
    QuickOption("min_score", ("--min-score",), _between(0.0, 1.0)),
    QuickOption("fmt", ("--format", "-f"), _text),
    QuickOption("output", ("--output", "-o"), _path),
    QuickOption("report", ("--report",), _path),
    QuickOption("batch_size", ("--batch-size", "-b"), _whole(1)),
    QuickOption(None, ("--workers", "-j"), _whole(0)),  # decoding happens on the server
    QuickOption("exact_preprocess", ("--exact-preprocess",)),
    QuickOption(None, ("--cache",)),  # the server keeps its own caches
    QuickOption(None, ("--no-cache",), secondary=True),
    QuickOption("xmp", ("--xmp",)),
    QuickOption("quiet", ("--quiet", "-q")),
    QuickOption(None, ("--offline",)),  # nothing is downloaded here
    QuickOption("server", ("--server",), _text),
)
_BY_NAME = {name: option for option in OPTIONS for name in option.opts}
# Values of environment variables the Typer command reads that it would refuse: then it answers.
_BOOLEAN_WORDS = {"", "0", "1", "true", "false", "t", "f", "yes", "no", "y", "n", "on", "off"}


def quick_command(argv: list[str]) -> Callable[[], None] | None:
    """The command to run for `argv` (the words after `zsclip`), or None: the Typer app's turn."""
    if not argv or argv[0] != "classify":
        return None
    if os.environ.get("ZSCLIP_VOCAB") or not _plain_boolean(os.environ.get("ZSCLIP_OFFLINE")):
        return None  # the Typer command refuses these with --server, in its own words
    fields = _read(argv[1:])
    if fields is None:
        return None
    if "server" not in fields:
        server = os.environ.get("ZSCLIP_SERVER", "")
        if not server:
            return None  # a local run: the model is loaded here, and Typer's start-up is noise
        fields["server"] = server
    return ServerClassify(**fields).run


def _plain_boolean(value: str | None) -> bool:
    return value is None or value.strip().lower() in _BOOLEAN_WORDS


def _read(words: list[str]) -> dict | None:
    """ServerClassify's fields from the words after `classify`, or None when unsure."""
    fields: dict = {}
    inputs: list[str] = []
    position = 0
    while position < len(words):
        word = words[position]
        position += 1
        if word == "--":
            inputs += words[position:]
            break
        if word == "-" or not word.startswith("-"):
            inputs.append(word)
            continue
        name, attached = _split(word)
        option = _BY_NAME.get(name)
        if option is None:
            return None  # --help, a model option, an unknown or combined one: Typer's to answer
        if option.read is None:  # a flag
            if attached is not None:
                return None
            if option.field is not None:
                fields[option.field] = option.flag_value
            continue
        if attached is None:
            if position == len(words):
                return None  # the value is missing
            attached = words[position]
            position += 1
            if attached.startswith("-") and attached != "-" and not _DECIMAL.fullmatch(attached):
                return None  # an option where a value belongs: Typer would decide what it means
        value = option.read(attached)
        if value is None:
            return None
        if option.field is not None:
            fields[option.field] = value  # as in Typer, the last of a repeated option wins
    if inputs:
        fields["inputs"] = inputs
    return fields


def _split(word: str) -> tuple[str, str | None]:
    """`--name=value` -> (--name, value); `-lvalue` -> (-l, value); else (word, None)."""
    if word.startswith("--"):
        name, equals, value = word.partition("=")
        return (name, value) if equals else (word, None)
    if len(word) > 2:
        return word[:2], word[2:]
    return word, None
