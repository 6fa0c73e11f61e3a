"""The HTTP API of `zsclip serve` (FastAPI): four routes under /v1, and the guard in front of them.

    GET  /v1/health      liveness, queue depth, batch counts and the request limits
    GET  /v1/models      the model being served
    POST /v1/classify    images (multipart uploads or base64 JSON) + labels -> the CLI's jsonl rows
    POST /v1/embed       images and/or texts -> the CLI's embed rows
    GET  /v1/openapi.json

Every answer is JSON; every refusal is {"error": {"code": ..., "message": ...}} with a 4xx status
(503 with Retry-After when the queue is full). The guard (`Guard`, the outermost layer) checks the
token, the body size and the request's time before anything is parsed, so a request that breaks a
limit costs the server almost nothing.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hmac
import json
import logging
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import Response
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException

from zsclip.escapes import json_text
from zsclip.serve.engine import ClassifyParams, Engine, RequestError, Upload
from zsclip.serve.schemas import (
    ClassifyAnswer,
    ClassifyBody,
    EmbedAnswer,
    EmbedBody,
    ErrorAnswer,
)

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Receive, Scope, Send

log = logging.getLogger("zsclip.serve")

_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorAnswer} for status in (400, 401, 408, 413, 415, 422, 503)
}


def create_app(engine: Engine, *, token: str | None = None) -> "ASGIApp":
    """The ASGI application: the FastAPI routes behind the guard."""
    from zsclip.version import __version__

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        await asyncio.to_thread(engine.close)  # after uvicorn has let in-flight requests finish

    app = FastAPI(
        title="zsclip",
        version=__version__,
        summary="Zero-shot image classification with CLIP, as a service.",
        openapi_url="/v1/openapi.json",
        docs_url=None,  # the UI pages load their scripts from a CDN; the description is enough
        redoc_url=None,
        lifespan=lifespan,
    )
    _routes(app, engine)
    _error_handlers(app)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    limits = engine.limits
    return Guard(
        app, token=token, max_body=limits.max_upload_bytes, timeout_s=limits.request_timeout_s
    )


def _routes(app: FastAPI, engine: Engine) -> None:
    @app.get("/v1/health", summary="Liveness, queue and limits")
    async def health() -> dict:
        return engine.health()

    @app.get("/v1/models", summary="The model being served")
    async def models() -> dict:
        return {"models": [engine.describe()]}

    @app.post(
        "/v1/classify",
        summary="Classify images into labels (rows as `zsclip classify --format jsonl`)",
        response_model=ClassifyAnswer,
        responses=_ERRORS,
        openapi_extra=_request_body("ClassifyBody"),
    )
    async def classify(request: Request) -> Response:
        with engine.arrival():
            body, uploads = await _read(request, ClassifyBody, engine)
        params = ClassifyParams(
            labels=body.labels,
            templates=body.templates,
            top_k=body.top_k,
            multi_label=body.multi_label,
            threshold=body.threshold,
            min_score=body.min_score,
            exact_preprocess=body.exact_preprocess,
        )
        rows, warnings = await engine.classify(params, uploads)
        answer = {"model": engine.loaded.name, "rows": rows, "warnings": warnings}
        return _json(200, answer)

    @app.post(
        "/v1/embed",
        summary="Embed images and/or texts (rows as `zsclip embed --format jsonl`)",
        response_model=EmbedAnswer,
        responses=_ERRORS,
        openapi_extra=_request_body("EmbedBody"),
    )
    async def embed(request: Request) -> Response:
        with engine.arrival():
            body, uploads = await _read(request, EmbedBody, engine)
        lines = await engine.embed(uploads, body.texts, body.exact_preprocess)
        # The rows are the CLI's own jsonl lines, so their numbers are written exactly as it does.
        model = json_text(engine.loaded.name)
        rows = ",".join(line.rstrip("\n") for line in lines)
        content = f'{{"model": {model}, "rows": [{rows}]}}'
        return Response(content.encode("utf-8"), media_type="application/json")


# -------------------------------------------------------------------------------- reading requests


async def _read(request: Request, schema: type[BaseModel], engine: Engine):
    """The body as `schema` plus the uploaded images, from JSON (base64 images) or multipart."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    max_images = engine.limits.max_images
    if kind == "application/json" or kind.endswith("+json"):
        try:
            data = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError) as err:
            raise RequestError(
                400, "malformed_json", f"the body is not valid JSON: {err}"
            ) from None
        body = _validated(schema, data)
        return body, _base64_images(body.images, max_images)
    if kind == "multipart/form-data":
        fields = engine.limits.max_labels + engine.limits.max_texts + engine.limits.max_templates
        async with request.form(max_files=max_images, max_fields=fields + 16) as form:
            data, files = _form_fields(form)
            body = _validated(schema, data)
            uploads = []
            for index, upload in enumerate(files):
                uploads.append(Upload(upload.filename or f"image-{index}", await upload.read()))
        return body, uploads
    raise RequestError(
        415,
        "unsupported_media_type",
        f"Content-Type {kind or 'missing'}: send application/json or multipart/form-data",
    )


_LISTS = ("labels", "texts")  # form fields given once per item


def _form_fields(form) -> tuple[dict[str, Any], list]:
    """Multipart parts -> (fields for the schema, image file parts in order)."""
    from starlette.datastructures import UploadFile

    data: dict[str, Any] = {}
    files = []
    for key in dict.fromkeys(form.keys()):
        values = form.getlist(key)
        if key == "request":  # every other field at once, as a JSON object (cheaper to parse)
            data.update(_request_field(values))
            continue
        if key == "images":
            if not all(isinstance(value, UploadFile) for value in values):
                raise RequestError(422, "invalid_request", "images: send each image as a file part")
            files = values
            continue
        if any(isinstance(value, UploadFile) for value in values):
            raise RequestError(422, "invalid_request", f"{key}: expected text, got a file")
        if key in _LISTS:
            data[key] = values
        elif key == "templates":
            data[key] = values[0] if len(values) == 1 else values
        elif len(values) > 1:
            raise RequestError(422, "invalid_request", f"{key}: given {len(values)} times")
        else:
            data[key] = values[0]
    return data, files


def _request_field(values: list) -> dict[str, Any]:
    if len(values) != 1 or not isinstance(values[0], str):
        raise RequestError(422, "invalid_request", "request: send one JSON text field")
    try:
        fields = json.loads(values[0])
    except ValueError as err:
        raise RequestError(400, "malformed_json", f"request: not valid JSON: {err}") from None
    if not isinstance(fields, dict) or "images" in fields:
        raise RequestError(
            422, "invalid_request", "request: a JSON object of the fields other than images"
        )
    return fields


def _validated(schema: type[BaseModel], data: Any) -> Any:
    try:
        return schema.model_validate(data)
    except ValidationError as err:
        problems = []
        for problem in err.errors()[:3]:
            where = ".".join(str(part) for part in problem["loc"]) or "body"
            problems.append(f"{where}: {problem['msg']}")
        raise RequestError(422, "invalid_request", "; ".join(problems)) from None


def _base64_images(images: list, max_images: int) -> list[Upload]:
    if len(images) > max_images:
        raise _too_many_images(len(images), max_images)
    uploads = []
    for index, image in enumerate(images):
        name, text = (
            (f"image-{index}", image) if isinstance(image, str) else (image.name, image.data)
        )
        if text.startswith("data:") and ";base64," in text[:100]:  # a data: URL
            text = text.split(",", 1)[1]
        try:
            data = _from_base64(text)
        except (binascii.Error, ValueError):
            raise RequestError(
                422, "invalid_base64", f"images[{index}]: not valid base64 data"
            ) from None
        uploads.append(Upload(name if name is not None else f"image-{index}", data))
    return uploads


def _from_base64(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):  # wrapped in lines, as some encoders write it
        return base64.b64decode("".join(text.split()), validate=True)


def _too_many_images(count: int | None, most: int) -> RequestError:
    given = f"{count} images" if count is not None else "too many images"
    return RequestError(
        413, "too_many_images", f"{given}: the server takes at most {most} per request"
    )


# -------------------------------------------------------------------------------- answers


def _json(status: int, content: Any, headers: dict[str, str] | None = None) -> Response:
    # json_text: the CLI's jsonl writing, so a name that is not valid UTF-8 comes back as \udcNN
    # escapes, exactly as a local run writes it
    text = json_text(content)
    return Response(text.encode("utf-8"), status, headers, media_type="application/json")


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None):
    return _json(status, {"error": {"code": code, "message": message}}, headers)


_HTTP_CODES = {400: "bad_request", 404: "not_found", 405: "method_not_allowed"}


def _error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestError)
    async def refused(request: Request, err: RequestError) -> Response:
        return _error(err.status, err.code, str(err), err.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException) -> Response:
        detail = str(err.detail)
        if err.status_code == 400 and detail.startswith("Too many files"):  # starlette's form limit
            return _error(413, "too_many_images", f"{detail} (per request)")
        code = _HTTP_CODES.get(err.status_code, f"http_{err.status_code}")
        return _error(err.status_code, code, detail, getattr(err, "headers", None))

    @app.exception_handler(Exception)
    async def failed(request: Request, err: Exception) -> Response:
        log.exception("zsclip serve: %s %s failed", request.method, request.url.path)
        return _error(500, "internal_error", "the server failed on this request (see its log)")


def _request_body(schema: str) -> dict:
    """The OpenAPI text for a body read by hand: JSON as the schema, or the same as multipart."""
    ref = {"$ref": f"#/components/schemas/{schema}"}
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": ref},
                "multipart/form-data": {"schema": {"$ref": f"#/components/schemas/{schema}Form"}},
            },
        }
    }


def _openapi(app: FastAPI) -> dict:
    """FastAPI's description, plus the request bodies the routes read by hand."""
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        spec = get_openapi(
            title=app.title, version=app.version, summary=app.summary, routes=app.routes
        )
        schemas = spec.setdefault("components", {}).setdefault("schemas", {})
        for model in (ClassifyBody, EmbedBody):
            schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
            schemas.update(schema.pop("$defs", {}))
            schemas[model.__name__] = schema
            form = json.loads(json.dumps(schema))
            form["title"] = f"{model.__name__}Form"
            form["properties"]["images"] = {
                "type": "array",
                "items": {"type": "string", "format": "binary"},
                "description": "Image files; each file name is echoed as its row's path.",
            }
            schemas[f"{model.__name__}Form"] = form
        app.openapi_schema = spec
    return app.openapi_schema


# -------------------------------------------------------------------------------- the guard


class Guard:
    """The outermost layer: the token, the body's size and the request's time, before any parsing.

    token: compared in constant time with `Authorization: Bearer TOKEN` on every request.
    max_body: a larger Content-Length is refused at once; a body without one is counted as it arrives.
    timeout_s: from the request's headers to its answer; past it the work is cancelled (its images
    leave the model's queue) and the answer is 408.
    """

    def __init__(
        self, app: "ASGIApp", *, token: str | None, max_body: int, timeout_s: float
    ) -> None:
        self.app, self.max_body, self.timeout_s = app, max_body, timeout_s
        self.token = token.encode("utf-8") if token else None

    async def __call__(self, scope: "Scope", receive: "Receive", send: "Send") -> None:
        if scope["type"] != "http":  # lifespan
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        if self.token is not None and not self._authorized(headers.get(b"authorization", b"")):
            await _send_error(
                send,
                401,
                "unauthorized",
                "missing or wrong token: send the header Authorization: Bearer TOKEN",
                {"WWW-Authenticate": "Bearer"},
            )
            return
        refusal = self._length_refusal(headers.get(b"content-length"))
        if refusal is not None:
            await _send_error(send, *refusal)
            return
        await self._within_time(scope, self._counted(receive), send)

    def _authorized(self, header: bytes) -> bool:
        scheme, _, given = header.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), self.token)

    def _length_refusal(self, length: bytes | None):
        if length is None:
            return None
        if not length.isdigit():
            return 400, "bad_request", "Content-Length is not a number"
        if int(length) > self.max_body:
            return 413, "upload_too_large", _too_large_message(int(length), self.max_body)
        return None

    def _counted(self, receive: "Receive") -> "Receive":
        received = 0

        async def counted_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_body:
                raise RequestError(413, "upload_too_large", _too_large_message(None, self.max_body))
            return message

        return counted_receive

    async def _within_time(self, scope: "Scope", receive: "Receive", send: "Send") -> None:
        """Run the app; past the deadline cancel it and answer 408 (if it has not answered yet).
        A timer on this task rather than asyncio.wait_for: no second task per request."""
        started = expired = False
        task = asyncio.current_task()

        async def watched_send(message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        def expire() -> None:
            nonlocal expired
            expired = True
            task.cancel()

        timer = asyncio.get_running_loop().call_later(self.timeout_s, expire)
        try:
            await self.app(scope, receive, watched_send)
        except asyncio.CancelledError:
            if not expired:
                raise  # the server is stopping or the client went away
            if hasattr(task, "uncancel"):  # Python 3.11+: this cancellation is handled here
                task.uncancel()
            if not started:
                await _send_error(
                    send,
                    408,
                    "request_timeout",
                    f"the request took longer than {self.timeout_s:g} s (the server's "
                    "--request-timeout); send fewer images or labels at once",
                )
        finally:
            timer.cancel()


def _too_large_message(size: int | None, limit: int) -> str:
    given = f"{size / 2**20:.1f} MiB" if size is not None else "the body"
    return (
        f"upload too large: {given} exceeds the server's limit of {limit / 2**20:.1f} MiB "
        "per request (its --max-upload-mb); send fewer or smaller images at once"
    )


async def _send_error(
    send: "Send", status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> None:
    body = json.dumps({"error": {"code": code, "message": message}}).encode("utf-8")
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(key.lower().encode(), value.encode()) for key, value in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})
