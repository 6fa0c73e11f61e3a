"""Turn INPUT arguments (files, folders, `-` for paths on stdin) into an ordered list of image inputs.

Order of the result = order of the arguments; a folder contributes its images recursively, sorted by
name at every level. Inside folders, hidden entries (`.DS_Store`, macOS `._IMG_1.JPG` forks,
`.git/`) and files without an image extension are skipped. Symlinks are followed, but a folder
already visited (the same device and inode) is never entered again, so link cycles cannot loop. A path that
cannot be used (missing, a dangling link, a link cycle) becomes an input with an `error`, so the
caller reports it and goes on; only a command-line argument that does not exist at all is a usage
error, found before any work.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence, TextIO

from zsclip.core.imagefile import RAW_SUFFIXES
from zsclip.errors import UserError

# Extensions collected from folders. A file named explicitly is always tried, whatever its name.
# Camera RAW files are collected too: without the `zsclip[raw]` extra each one gets an error line
# that names the extra, rather than vanishing from the results.
IMAGE_EXTENSIONS = (
    frozenset(
        (
            ".jpg .jpeg .jpe .jfif .png .gif .bmp .dib .webp .tif .tiff .ppm .pgm .pbm .pnm .ico"
            " .tga .heic .heif .hif .avif"
        ).split()
    )
    | RAW_SUFFIXES
)


@dataclass(frozen=True)
class InputItem:
    """One input as the user will see it in the output: `path` as given or joined below a given folder."""

    path: str
    error: str | None = None


def is_hidden(name: str) -> bool:
    return name.startswith(".")


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def read_stdin_paths(stream: TextIO) -> list[str]:
    """Newline-separated paths; blank lines skipped, a trailing carriage return dropped, spaces kept.

    Read as bytes when the stream has them, so a name that is not valid UTF-8 arrives intact (as
    Python carries such names: os.fsdecode)."""
    raw = getattr(stream, "buffer", None)
    lines = (os.fsdecode(line) for line in raw) if raw is not None else stream
    paths = []
    for line in lines:
        line = line.rstrip("\n").rstrip("\r")
        if line.strip():
            paths.append(line)
    return paths


def _missing_arguments(args: Sequence[str]) -> None:
    """A path named on the command line that does not exist at all is a typo: a usage error before any
    work. (A dangling symlink exists; it becomes an error row like any unreadable input.)"""
    missing = [arg for arg in args if arg != "-" and _does_not_exist(arg)]
    if missing:
        names = ", ".join(repr(arg) for arg in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise UserError(
            f"INPUT {names}{more}: no such file or folder (check the spelling; `-` reads paths "
            "from stdin)"
        )


def _does_not_exist(path: str) -> bool:
    """True only when the file system says so (ENOENT, ENOTDIR): a path it may not look at (a folder
    that cannot be entered) exists and becomes an error row that says why."""
    try:
        os.lstat(path)
        return False
    except FileNotFoundError:
        return True
    except NotADirectoryError:
        return True
    except OSError:  # permission denied, name too long, ...: reported on its row
        return False
    except ValueError:  # embedded NUL byte
        return True


def _link_problem(path: str) -> str | None:
    """Why `path` cannot be opened, for a missing path or a bad symlink; None when it exists."""
    try:
        os.stat(path)
        return None
    except OSError as err:
        if err.errno == errno.ELOOP:
            return "symlink cycle (following the link leads back to it)"
        if os.path.islink(path):
            return f"dangling symlink (target {os.readlink(path)!r} does not exist)"
        if err.errno == errno.ENOENT:
            return "no such file or folder"
        return err.strerror or str(err)


def _walk_folder(folder: str, seen_dirs: set[tuple[int, int]]) -> Iterator[InputItem]:
    """Images below `folder`, depth first, each level sorted by name; never enters a real folder twice.

    Iterative (a stack of the folders being listed), so nesting depth is bounded by the file system,
    not by Python's recursion limit."""
    stack: list[Iterator[str]] = []
    entered = _enter(folder, seen_dirs)
    if isinstance(entered, InputItem):
        yield entered
    elif entered is not None:
        stack.append(entered)
    while stack:
        child = next(stack[-1], None)
        if child is None:
            stack.pop()
            continue
        name = os.path.basename(child)
        if os.path.isdir(child):  # follows symlinks
            entered = _enter(child, seen_dirs)
            if isinstance(entered, InputItem):
                yield entered
            elif entered is not None:
                stack.append(entered)
        elif os.path.isfile(child):
            if is_image_name(name):
                yield InputItem(child)
        elif is_image_name(name):  # named like an image but unusable (broken link, FIFO, socket)
            yield InputItem(
                child, _link_problem(child) or "not a regular file (a FIFO, socket or device)"
            )


def _enter(folder: str, seen_dirs: set[tuple[int, int]]) -> Iterator[str] | InputItem | None:
    """The visible entries of `folder` as paths, sorted by name; None for a folder already visited
    (a link back to a folder on this walk, or one already listed: following it would loop); an
    InputItem with the reason when it cannot be listed.

    A folder is known by its device and inode, not its realpath: one stat instead of one per path
    component (realpath makes a deep tree cubic), and a bind mount of a parent cannot loop either."""
    try:
        info = os.stat(folder)
        if (info.st_dev, info.st_ino) in seen_dirs:
            return None
        seen_dirs.add((info.st_dev, info.st_ino))
        names = sorted(os.listdir(folder))
    except OSError as err:
        return InputItem(folder, f"cannot list folder: {err.strerror or err}")
    return iter([os.path.join(folder, name) for name in names if not is_hidden(name)])


def expand_inputs(args: Sequence[str], stdin: TextIO | None = None) -> list[InputItem]:
    """Expand INPUT arguments in order. `-` reads newline-separated paths from `stdin` (once). An
    argument that does not exist is a UserError; a path read from stdin that does not is an input
    with an error, like an unreadable file."""
    if not args:
        raise UserError(
            "no INPUT given: name image files or folders, or `-` to read paths from stdin"
        )
    _missing_arguments(args)
    items: list[InputItem] = []
    seen_dirs: set[tuple[int, int]] = set()
    stdin_used = False
    for arg in args:
        if arg == "-":
            if stdin_used:
                raise UserError("`-` (paths on stdin) may be given only once")
            stdin_used = True
            if stdin is None:
                raise UserError("`-` was given but there is no stdin to read paths from")
            items.extend(_expand_many(read_stdin_paths(stdin), seen_dirs))
        else:
            items.extend(_expand_many([arg], seen_dirs))
    return items


def _expand_many(paths: Iterable[str], seen_dirs: set[tuple[int, int]]) -> Iterator[InputItem]:
    for path in paths:
        if os.path.isdir(path):
            yield from _walk_folder(path, seen_dirs)
        elif os.path.exists(path):
            yield InputItem(path)
        else:
            yield InputItem(path, _link_problem(path) or "cannot open")
