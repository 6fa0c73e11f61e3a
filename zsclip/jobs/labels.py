"""Class labels and prompt-template sets.

Labels come from `--labels "a,b,c"` (split on commas, trimmed) or `--labels-file` (one per line, so
a label may hold commas; blank lines and lines starting with `#` are skipped). Empty and duplicate
labels are usage errors: a duplicate would split its probability mass in two.

A template set is plain text, one template per line, `{}` where the label goes; a line starting with
`#` is a comment (a `#` inside a template is part of it). The named sets live in prompts/<name>.txt;
a user's file works the same way.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from zsclip.errors import UserError
from zsclip.paths import prompts_dir

DEFAULT_TEMPLATE_SET = "photo"


@dataclass(frozen=True)
class TemplateSet:
    name: str  # the set's name, or the file's path for a user's file
    templates: tuple[str, ...]

    def prompts(self, label: str) -> list[str]:
        # str.replace, not str.format: labels with braces ("{x}") must come through untouched.
        return [template.replace("{}", label) for template in self.templates]


def _read_text(path: Path, what: str) -> str:
    try:
        return path.read_text(
            encoding="utf-8-sig"
        )  # tolerate a byte-order mark from Windows editors
    except FileNotFoundError:
        raise UserError(f"{what} {str(path)!r} does not exist") from None
    except UnicodeDecodeError:
        raise UserError(f"{what} {str(path)!r} is not UTF-8 text; save it as UTF-8") from None
    except OSError as err:
        raise UserError(f"cannot read {what} {str(path)!r}: {err.strerror or err}") from None


def _key(label: str) -> str:
    # Prompts are lower-cased and whitespace-collapsed by the tokenizer, so "Corgi" and "corgi " are
    # one class. Compatibility forms (NBSP, full-width letters, ligatures) fold with NFKC, and
    # invisible format characters (zero-width space and joiners, soft hyphen, BOM, direction marks)
    # are dropped: labels a reader cannot tell apart are one class.
    text = unicodedata.normalize("NFKC", label)
    text = "".join(ch for ch in text if unicodedata.category(ch) != "Cf")
    return " ".join(text.casefold().split())


def _visible_key(label: str) -> str:
    # the comparison before invisible characters and compatibility forms are folded
    return " ".join(unicodedata.normalize("NFC", label).casefold().split())


def _shown(label: str) -> str:
    """The label quoted; when it holds anything invisible or unusual (zero-width characters, NBSP),
    with every non-ASCII character written as an escape, so the difference can be seen."""
    plain = all(ch.isprintable() and (ch == " " or not ch.isspace()) for ch in label)
    return repr(label) if plain and _key(label) == _visible_key(label) else ascii(label)


def check_labels(labels: list[str], source: str) -> list[str]:
    """Refuse empty lists, empty labels and duplicates, naming the culprit."""
    if not labels:
        raise UserError(f'no labels in {source}; give at least one, e.g. --labels "cat,dog"')
    seen: dict[str, str] = {}
    for position, label in enumerate(labels, start=1):
        if not label:
            raise UserError(
                f"label {position} in {source} is empty; remove the extra comma or blank entry"
            )
        key = _key(label)
        if not key:
            raise UserError(
                f"label {position} in {source} ({_shown(label)}) holds only invisible characters; "
                "remove it"
            )
        if key in seen:
            first = seen[key]
            why = (
                ""
                if _visible_key(label) == _visible_key(first)
                else " once invisible characters and look-alike forms are ignored"
            )
            raise UserError(
                f"duplicate label {_shown(label)} in {source} (same as {_shown(first)}{why}); "
                "list each once"
            )
        seen[key] = label
    return labels


def parse_labels_option(text: str) -> list[str]:
    """`--labels "corgi, jazz album"` -> ["corgi", "jazz album"]."""
    return check_labels([part.strip() for part in text.split(",")], "--labels")


def read_labels_file(path: Path) -> list[str]:
    """One label per line; blank lines and `#` comment lines skipped; commas are part of the label."""
    labels = []
    for line in _read_text(path, "labels file").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            labels.append(line)
    return check_labels(labels, f"labels file {str(path)!r}")


def resolve_labels(labels: str | None, labels_file: Path | None) -> list[str]:
    """Exactly one of --labels and --labels-file."""
    if labels is not None and labels_file is not None:
        raise UserError("give --labels or --labels-file, not both")
    if labels is not None:
        return parse_labels_option(labels)
    if labels_file is not None:
        return read_labels_file(labels_file)
    raise UserError('no labels: give --labels "cat,dog" or --labels-file classes.txt')


def words_of(text: str) -> list[str]:
    """The words of a label or caption as a tokenizer sees them: NFC, case-folded, runs of letters
    and digits (punctuation and spaces between them are not words)."""
    return re.findall(r"[^\W_]+", unicodedata.normalize("NFC", text).casefold())


def unknown_words(labels: list[str], known: str) -> list[str]:
    """The words of `labels` that are not in `known` (a checkpoint's `caption_words` metadata: every
    word its training captions hold, space-separated), each once, in order of appearance. Empty
    when `known` is empty: a model that does not list its words is not judged."""
    vocabulary = set(known.split())
    if not vocabulary:
        return []
    missing = (word for label in labels for word in words_of(label) if word not in vocabulary)
    return list(dict.fromkeys(missing))


def parse_templates(text: str, name: str) -> TemplateSet:
    """Parse template-file text. Each template must contain `{}`."""
    templates = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):  # a line starting with `#` is a comment
            continue
        if "{}" not in line:
            raise UserError(
                f"template set {name!r}, line {number}: {line!r} has no {{}} where the label goes"
            )
        templates.append(line)
    if not templates:
        raise UserError(
            f"template set {name!r} holds no templates; write one per line, e.g. 'a photo of a {{}}.'"
        )
    return TemplateSet(name, tuple(dict.fromkeys(templates)))  # drop repeats, keep order


def available_template_sets() -> list[str]:
    folder = prompts_dir()
    return sorted(path.stem for path in folder.glob("*.txt")) if folder.is_dir() else []


def named_template_set(name: str | None, *, model_default: str | None = None) -> TemplateSet:
    """A set from prompts/ only, by name (None: the model's own set, else the default): never a file
    path, for callers that must not read files a remote user names (`zsclip serve`)."""
    names = available_template_sets()
    if name is None:
        name = model_default if model_default in names else DEFAULT_TEMPLATE_SET
    if name not in names:
        choices = ", ".join(names) or "none installed"
        raise UserError(
            f"unknown template set {name!r}: send a list of templates or one of: {choices}"
        )
    return parse_templates(_read_text(prompts_dir() / f"{name}.txt", "template set"), name)


def load_templates(spec: str | Path | None, *, model_default: str | None = None) -> TemplateSet:
    """A template set by name (prompts/<name>.txt) or by file path.

    With no spec: the set the checkpoint names (`model_default`) when it exists, else the default
    set.
    """
    if spec is None:
        names = available_template_sets()
        spec = model_default if model_default in names else DEFAULT_TEMPLATE_SET
    path = Path(spec)
    if path.is_file():
        return parse_templates(_read_text(path, "template file"), str(path))
    named = prompts_dir() / f"{spec}.txt"
    if named.is_file() and "/" not in str(spec) and "\\" not in str(spec):
        return parse_templates(_read_text(named, "template set"), str(spec))
    choices = ", ".join(available_template_sets()) or "none installed"
    raise UserError(f"unknown template set {str(spec)!r}: give a file path or one of: {choices}")


def label_key(label: str) -> str:
    """What makes two labels the same label: NFC, case-folded, whitespace collapsed (the tokenizer
    lower-cases and collapses spaces, so "Corgi" and "corgi " are one class)."""
    return _key(label)


def resolve_others(
    others: str | None, others_file: Path | None, labels: list[str]
) -> tuple[str, ...]:
    """Background labels from --other "a,b" or --other-file (read like --labels-file): none, or a
    list that shares no label with `labels` (a label both wanted and background is a mistake)."""
    if others is not None and others_file is not None:
        raise UserError("give --other or --other-file, not both")
    if others is None and others_file is None:
        return ()
    if others is not None:
        parsed = check_labels([part.strip() for part in others.split(",")], "--other")
    else:
        parsed = read_labels_file(others_file)
    for label in parsed:
        for wanted in labels:
            if _key(label) == _key(wanted):
                raise UserError(
                    f"{label!r} is both a label and a background label (--other); keep it in one"
                )
    return tuple(parsed)
