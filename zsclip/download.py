"""Fetch one file over HTTP(S) into place, safely. Generic: nothing here knows what the file is for.

download() guarantees, in order:
- offline mode (offline=True or ZSCLIP_OFFLINE=1) never opens a connection;
- a file already at `dest` is trusted: it only ever got there after verification (verify=True
  re-hashes it);
- one writer per file: an fcntl lock beside `dest` makes a second process wait, then find the file
  done;
- bytes go to `<dest>.part`; a cut connection is resumed with an HTTP Range request (a server that
  answers a Range with the whole file is simply read again from the start);
- the SHA-256 is checked before the rename; a mismatch deletes the bad bytes and says so;
- the verified file is fsynced and renamed onto `dest` (a crash never leaves half a file at `dest`).

Failures raise UserError subclasses with one-line messages; callers that know what the file is
(zsclip.core.catalogue) catch Unreachable and OfflineMissing to add the ways forward.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import re
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Callable, Iterator, Optional

from zsclip.errors import UserError
from zsclip.version import __version__

try:  # POSIX; elsewhere downloads still work, without the inter-process lock
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

Progress = Callable[[int, Optional[int]], None]  # (bytes done, total bytes or None when unknown)

CHUNK = 1 << 18  # 256 KiB per read: progress moves smoothly and memory stays flat
USER_AGENT = f"zsclip/{__version__} (python urllib)"
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


class DownloadError(UserError):
    """A download failed for a reason outside the user's command line (network, server, checksum)."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message, exit_code)


class Unreachable(DownloadError):
    """The server could not be reached at all (no network, DNS failure, refused connection, timeout)."""


class OfflineMissing(DownloadError):
    """Offline mode is on and the file is not there."""


class NotFound(DownloadError):
    """The server answered 404: the file does not exist at that address."""


class _Interrupted(Exception):
    """The connection ended before the whole body arrived; the .part file keeps what did."""


def offline_from_env() -> bool:
    """True when ZSCLIP_OFFLINE is set to anything but '', '0', 'false' or 'no'."""
    return os.environ.get("ZSCLIP_OFFLINE", "").strip().lower() not in ("", "0", "false", "no")


def part_path(dest: Path) -> Path:
    """Where the bytes of an unfinished download of `dest` are kept."""
    return dest.with_name(dest.name + ".part")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download(
    url: str,
    dest: str | os.PathLike,
    *,
    sha256: str | None = None,
    progress: Progress | None = None,
    offline: bool = False,
    timeout: float = 30.0,
    attempts: int = 3,
    headers: dict[str, str] | None = None,
    verify: bool = False,
) -> Path:
    """Download `url` to `dest` (see the module docstring) and return `dest`.

    sha256: expected hex digest, or None to skip verification. headers: extra request headers, sent
    to `url`'s host only (not across redirects), e.g. an Authorization token. attempts: tries per
    call when the connection breaks mid-transfer; a refused or unreachable server fails at once.
    """
    dest = Path(dest)
    expected = sha256.lower() if sha256 else None
    if expected is not None and not _SHA256_HEX.match(expected):
        raise ValueError(f"not a SHA-256 hex digest: {sha256!r}")
    if _usable(dest, expected, verify):
        return dest
    if offline or offline_from_env():
        raise OfflineMissing(
            f"{dest.name} is not downloaded yet and offline mode is on (--offline or ZSCLIP_OFFLINE=1); "
            f"fetch it once while online"
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _locked(dest):
        if _usable(dest, expected, verify):  # another process finished it while we waited
            return dest
        return _fetch_with_retries(
            url, dest, expected, progress, timeout, max(1, attempts), headers or {}
        )


def _usable(dest: Path, expected: str | None, verify: bool) -> bool:
    if not dest.is_file():
        return False
    if verify and expected is not None and sha256_file(dest) != expected:
        dest.unlink()  # a damaged cache entry: fetch it again
        return False
    return True


@contextlib.contextmanager
def _locked(dest: Path) -> Iterator[None]:
    """Hold an exclusive lock on a hidden file beside `dest` (blocks while another process holds it).

    The lock file is left behind on purpose: deleting it would let a third process lock a fresh
    inode while the second still holds the old one.
    """
    if fcntl is None:  # pragma: no cover
        yield
        return
    lock_path = dest.with_name(f".{dest.name}.lock")
    with open(lock_path, "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _fetch_with_retries(
    url: str,
    dest: Path,
    expected: str | None,
    progress: Progress | None,
    timeout: float,
    attempts: int,
    headers: dict[str, str],
) -> Path:
    part = part_path(dest)
    for attempt in range(1, attempts + 1):
        try:
            _fetch_into(url, part, progress, timeout, headers)
            break
        except _Interrupted as err:
            if attempt == attempts:
                raise DownloadError(
                    f"download of {dest.name} from {_host(url)} broke off ({err}); run the same command again "
                    f"to resume from {_size(part)} bytes"
                ) from None
            time.sleep(min(0.5 * attempt, 2.0))
    _finish(part, dest, expected)
    return dest


def _fetch_into(
    url: str, part: Path, progress: Progress | None, timeout: float, headers: dict[str, str]
) -> None:
    """One HTTP exchange: append the missing bytes to `part`. Raises _Interrupted if the body comes up
    short."""
    have = _size(part)
    try:
        response = _open(url, have, timeout, headers)
    except _RangeNotSatisfiable:
        # Our .part is already as long as the file (or longer, if stale): keep it only if it is
        # complete.
        part.unlink(missing_ok=True)
        raise _Interrupted(
            "the partial file did not fit the server's copy; starting again"
        ) from None
    with response:
        if have and response.status != 206:
            have = 0  # the server ignored Range and sent the whole file: start again from byte 0
        total = _total_length(response, have, part)
        done = _copy_body(response, part, have, total, progress)
    if total is not None and done < total:
        raise _Interrupted(f"connection closed after {done} of {total} bytes")


def _copy_body(
    response: http.client.HTTPResponse,
    part: Path,
    have: int,
    total: int | None,
    progress: Progress | None,
) -> int:
    """Append the response body to `part` (after its first `have` bytes); return the bytes now in
    `part`."""
    done = have
    with open(part, "ab" if have else "wb") as out:
        if progress is not None:
            progress(done, total)
        while True:
            try:
                chunk = response.read(CHUNK)
            except (http.client.HTTPException, OSError) as err:  # resets, timeouts, short reads
                raise _Interrupted(f"{type(err).__name__} after {done} bytes") from None
            if not chunk:
                break
            try:
                out.write(chunk)
            except OSError as err:
                raise DownloadError(f"cannot write {part}: {err.strerror or err}") from None
            done += len(chunk)
            if progress is not None:
                progress(done, total)
        out.flush()
        os.fsync(out.fileno())
    return done


class _RangeNotSatisfiable(Exception):
    pass


def _open(
    url: str, offset: int, timeout: float, headers: dict[str, str]
) -> http.client.HTTPResponse:
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    if offset:
        request.add_header("Range", f"bytes={offset}-")  # kept across redirects (CDNs)
    for key, value in headers.items():
        request.add_unredirected_header(key, value)  # e.g. tokens: never forwarded to another host
    try:
        return urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416:
            raise _RangeNotSatisfiable() from None
        if err.code == 404:
            raise NotFound(f"{url} does not exist (HTTP 404)") from None
        raise DownloadError(
            f"{_host(url)} answered HTTP {err.code} {err.reason} for {url}"
        ) from None
    except (
        urllib.error.URLError,
        ConnectionError,
        TimeoutError,
        socket.timeout,
        http.client.HTTPException,
    ) as err:
        reason = getattr(err, "reason", err)
        raise Unreachable(f"cannot reach {_host(url)} ({reason})") from None


def _total_length(response: http.client.HTTPResponse, have: int, part: Path) -> int | None:
    """Full size of the file, from Content-Range (206) or Content-Length (200); None if the server
    won't say."""
    content_range = response.headers.get("Content-Range", "")
    match = re.match(r"bytes (\d+)-\d+/(\d+)", content_range)
    if response.status == 206 and match:
        if int(match.group(1)) != have:
            part.unlink(missing_ok=True)
            raise _Interrupted(
                f"server resumed at byte {match.group(1)}, not {have}; starting again"
            )
        return int(match.group(2))
    length = response.headers.get("Content-Length")
    return have + int(length) if length and length.isdigit() else None


def _finish(part: Path, dest: Path, expected: str | None) -> None:
    """Verify the finished .part and rename it onto dest; a mismatch deletes it and raises."""
    if expected is not None:
        actual = sha256_file(part)
        if actual != expected:
            part.unlink()
            raise DownloadError(
                f"checksum mismatch for {dest.name}: expected SHA-256 {expected}, got {actual}; the bad download "
                f"was deleted, run the command again to retry"
            )
    os.replace(part, dest)
    with contextlib.suppress(OSError):  # make the rename itself durable
        dir_fd = os.open(dest.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def probe(
    url: str, *, timeout: float = 30.0, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str]]:
    """HEAD `url` without following redirects; return (status, headers with lower-case names).

    Some hosts state a file's checksum only on the redirect response, which urllib would otherwise
    swallow.
    """
    if offline_from_env():
        raise OfflineMissing(f"offline mode is on; not asking {_host(url)}")
    request = urllib.request.Request(
        url, method="HEAD", headers={"User-Agent": USER_AGENT, **(headers or {})}
    )
    opener = urllib.request.build_opener(_NoRedirect())
    try:
        with opener.open(request, timeout=timeout) as response:
            return response.status, {k.lower(): v for k, v in response.headers.items()}
    except urllib.error.HTTPError as err:  # 3xx arrive here too, since _NoRedirect declines them
        return err.code, {k.lower(): v for k, v in err.headers.items()}
    except (
        urllib.error.URLError,
        ConnectionError,
        TimeoutError,
        socket.timeout,
        http.client.HTTPException,
    ) as err:
        raise Unreachable(f"cannot reach {_host(url)} ({getattr(err, 'reason', err)})") from None


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001 - urllib's signature
        return None


def _host(url: str) -> str:
    return urllib.parse.urlsplit(url).netloc or url


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0
