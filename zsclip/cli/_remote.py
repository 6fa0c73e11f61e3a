"""`classify --server URL`: the images go to a running `zsclip serve` instead of a model loaded here.

The standard library only (http.client), and neither torch nor PIL: what makes a fresh `zsclip
classify` slow (importing torch, mapping the model) is exactly what this path skips. The files are
read here and uploaded as multipart parts named image-0, image-1, ... (the server never sees local
paths); each row the server sends back gets its input's path as this machine knows it, so the
output is the same as a local run's. A file that cannot be read here gets the same one-line reason
as locally (zsclip.core.imagefile), without a trip to the server.

Images go in requests of at most the server's --max-images and --max-upload-mb (it says so in
/v1/health). A full queue (503) is retried after the Retry-After it names, a few times; a server
that is not there is one line and exit status 4.
"""

from __future__ import annotations

import http.client
import json
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence
from urllib.parse import urlsplit

from zsclip.errors import InputError, UserError
from zsclip.jobs.classify import Prediction
from zsclip.jobs.inputs import InputItem

UNREACHABLE_EXIT = 4  # the server is not there (or went away): a script may fall back to local
RETRIES = 8  # attempts after a 503 (queue full) before giving up
PART_OVERHEAD = 256  # bytes of multipart headers around each image, generously


@dataclass(frozen=True)
class RemoteClassify:
    """What to ask the server: the CLI's options, as it resolved them."""

    labels: list[str]
    templates: str | None  # a set name or a file of templates (read here, sent as templates)
    top_k: int
    multi_label: bool
    threshold: float | None  # None: the server's model default
    exact_preprocess: bool
    min_score: float | None = None  # a best score below this: "label": null (the server applies it)
    # images per request, at most: as many as a local run puts in one forward pass, so that a lone
    # client's batches on the server are the local ones (floating-point results depend, in the last
    # bits, on how many images share a forward pass)
    batch_size: int = 32


@dataclass
class RemoteRun:
    predictions: Iterator[Prediction]
    total: int
    model: str  # the server's model name, for the report


class Server:
    """One keep-alive HTTP connection to a `zsclip serve`."""

    def __init__(self, url: str, token: str | None, timeout: float = 30.0) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UserError(f"--server {url!r}: give an address like http://127.0.0.1:8765")
        self.url = url.rstrip("/")
        self.base = parts.path.rstrip("/")
        self.token, self.timeout = token, timeout
        connection = (
            http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        )
        self._connect = lambda: connection(parts.hostname, parts.port, timeout=self.timeout)
        self._connection: http.client.HTTPConnection | None = None

    def get(self, path: str) -> dict:
        return self._request("GET", path, None, {})

    def post(self, path: str, body: bytes, content_type: str) -> dict:
        """POST, retrying while the server's queue is full (503 with Retry-After)."""
        for _ in range(RETRIES):
            try:
                return self._request("POST", path, body, {"Content-Type": content_type})
            except _Busy as busy:
                time.sleep(busy.retry_after)
        return self._request("POST", path, body, {"Content-Type": content_type})

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def _request(self, method: str, path: str, body: bytes | None, headers: dict) -> dict:
        if self.token:
            headers = {**headers, "Authorization": f"Bearer {self.token}"}
        for attempt in (1, 2):  # a kept-alive connection the server closed meanwhile: once more
            if self._connection is None:
                self._connection = self._connect()
            try:
                self._connection.request(method, self.base + path, body=body, headers=headers)
                response = self._connection.getresponse()
                status, data = response.status, response.read()
                retry_after = response.getheader("Retry-After")
                break
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as err:
                self.close()
                if attempt == 2:
                    raise self._unreachable(err) from None
            except OSError as err:  # refused, unknown host, timed out
                self.close()
                raise self._unreachable(err) from None
        return self._answer(status, data, retry_after)

    def _answer(self, status: int, data: bytes, retry_after: str | None) -> dict:
        try:
            answer = json.loads(data)
        except ValueError:
            answer = None
        if status == 200 and isinstance(answer, dict):
            return answer
        error = answer.get("error") if isinstance(answer, dict) else None
        message = error.get("message") if isinstance(error, dict) else f"HTTP {status}"
        if status == 503:
            raise _Busy(_seconds(retry_after))
        if status == 401:
            raise UserError(
                f"the server at {self.url} wants a token: set ZSCLIP_TOKEN to the one it was "
                "started with"
            )
        raise UserError(f"the server at {self.url} refused the request: {message}")

    def _unreachable(self, err: OSError) -> UserError:
        reason = getattr(err, "strerror", None) or str(err) or type(err).__name__
        return UserError(
            f"no zsclip server answers at {self.url} ({reason}): start one with `zsclip serve`, "
            "or drop --server (and ZSCLIP_SERVER) to classify here",
            exit_code=UNREACHABLE_EXIT,
        )


class _Busy(Exception):
    def __init__(self, retry_after: float) -> None:
        self.retry_after = retry_after


def _seconds(header: str | None) -> float:
    try:
        return min(30.0, max(0.05, float(header or 1)))
    except ValueError:
        return 1.0


def classify_remote(
    url: str,
    items: Sequence[InputItem],
    request: RemoteClassify,
    warn: Callable[[str], None],
) -> RemoteRun:
    """Check the server is there (and learn its limits), then predict lazily, in input order."""
    server = Server(url, os.environ.get("ZSCLIP_TOKEN") or None)
    health = server.get("/v1/health")
    limits = health.get("limits", {})
    server.timeout = float(limits.get("request_timeout_s", 60)) + 30
    fields = _fields(request)
    most = min(int(limits.get("max_images", 64)), request.batch_size)
    predictions = _predict(server, items, fields, most, limits, warn)
    return RemoteRun(predictions, len(items), str(health.get("model", url)))


def _fields(request: RemoteClassify) -> dict:
    """The fields of every request, sent as one JSON part: the labels, templates and options."""
    fields: dict = {"labels": request.labels}
    spec = request.templates
    if spec is not None and Path(spec).is_file():  # a file here: the server gets its templates
        from zsclip.jobs.labels import load_templates

        fields["templates"] = list(load_templates(spec).templates)
    elif spec is not None:
        fields["templates"] = spec
    fields.update(top_k=request.top_k, multi_label=request.multi_label)
    if request.threshold is not None:
        fields["threshold"] = request.threshold
    if request.exact_preprocess:
        fields["exact_preprocess"] = True
    if request.min_score is not None:
        fields["min_score"] = request.min_score
    return fields


def _predict(
    server: Server,
    items: Sequence[InputItem],
    fields: dict,
    most: int,
    limits: dict,
    warn: Callable[[str], None],
) -> Iterator[Prediction]:
    """Read files into requests of at most `most` images and the server's upload limit; yield rows
    as each answer comes."""
    from zsclip.core.imagefile import read_image_bytes

    budget = int(limits.get("max_upload_bytes", 32 * 2**20)) - len(_json(fields)) - 1024
    warned: set[str] = set()
    slots: list[Prediction | tuple[str, bytes]] = []  # local error rows, or (path, bytes) to send
    uploads, size = 0, 0
    try:
        for item in items:
            if item.error is not None:
                slots.append(Prediction(item.path, error=item.error))
                continue
            try:
                data = read_image_bytes(item.path, max(1, budget - PART_OVERHEAD))
            except InputError as err:
                slots.append(Prediction(item.path, error=str(err)))
                continue
            if uploads and (uploads == most or size + len(data) + PART_OVERHEAD > budget):
                yield from _send(server, slots, fields, warn, warned)
                slots, uploads, size = [], 0, 0
            slots.append((item.path, data))
            uploads, size = uploads + 1, size + len(data) + PART_OVERHEAD
        yield from _send(server, slots, fields, warn, warned)
    finally:
        server.close()


def _send(server, slots, fields, warn, warned: set[str]) -> Iterator[Prediction]:
    """One request for the slots' images; the slots' predictions in order."""
    images = [slot for slot in slots if not isinstance(slot, Prediction)]
    rows: list[dict] = []
    if images:
        body, content_type = _multipart(fields, [data for _, data in images])
        answer = server.post("/v1/classify", body, content_type)
        rows = answer.get("rows", [])
        if len(rows) != len(images):
            raise UserError(
                f"the server at {server.url} answered {len(rows)} rows for {len(images)} images"
            )
        for message in answer.get("warnings", []):
            if message not in warned:  # the same labels give the same warning every time
                warned.add(message)
                warn(message)
    answers = iter(rows)
    min_score = fields.get("min_score")
    for slot in slots:
        yield (
            slot if isinstance(slot, Prediction) else _prediction(slot[0], next(answers), min_score)
        )


def _prediction(path: str, row: dict, min_score: float | None = None) -> Prediction:
    """A server row back as the Prediction a local run makes, under this machine's path (the labels
    of `top` reaching `min_score` are the accepted ones, as zsclip.jobs.classify.judged counts)."""
    if row.get("error") is not None:
        return Prediction(path, error=str(row["error"]))
    top = [(str(entry["label"]), float(entry["score"])) for entry in row.get("top") or []]
    passing = None
    if min_score is not None:
        passing = next((n for n, (_, score) in enumerate(top) if score < min_score), len(top))
    if top and row.get("label") is None:
        passing = 0
    return Prediction(path, top, passing=passing)


def _json(fields: dict) -> bytes:
    return json.dumps(fields, ensure_ascii=False).encode("utf-8")


def _multipart(fields: dict, images: list[bytes]) -> tuple[bytes, str]:
    """A multipart/form-data body: the fields as one JSON part `request`, then the images as
    parts named image-N."""
    boundary = uuid.uuid4().hex
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="request"\r\n'
        "Content-Type: application/json\r\n\r\n".encode()
        + _json(fields)
        + b"\r\n"
    ]
    for index, data in enumerate(images):
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="images"; '
            f'filename="image-{index}"\r\nContent-Type: application/octet-stream\r\n\r\n'
        )
        parts.append(head.encode() + data + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"
