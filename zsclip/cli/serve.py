"""`zsclip serve`: keep a model loaded and answer classify and embed requests over HTTP (zsclip.serve)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from zsclip.cli._options import DeviceOpt, ModelOpt, OfflineOpt, PrecisionOpt, QuietOpt, VocabOpt

EPILOG = """\b
Examples:
  zsclip serve                                  # http://127.0.0.1:8765, the built-in model
  zsclip serve --model ViT-B/32 --port 9000
  ZSCLIP_TOKEN=$(python -c 'import secrets; print(secrets.token_urlsafe(32))') zsclip serve --host 0.0.0.0
  curl -F images=@cat.jpg -F labels=cat -F labels=dog http://127.0.0.1:8765/v1/classify
  zsclip classify photos/ --labels "cat,dog" --server http://127.0.0.1:8765

\b
Listens on loopback unless --host says otherwise; any other address needs a token (--token or
ZSCLIP_TOKEN, at least 16 characters), which every request must then send as
Authorization: Bearer TOKEN. SIGTERM, SIGHUP or Ctrl-C: stop taking connections, finish the requests
in flight, exit 0 after SIGTERM (129 after SIGHUP, 130 after Ctrl-C). Endpoints and limits:
docs/serving.md."""

MIN_TOKEN_CHARS = 16
EXTRA = "pip install 'zsclip[serve]'"


def register(app: typer.Typer) -> None:
    app.command(epilog=EPILOG)(serve)


def serve(
    model: ModelOpt = None,
    vocab: VocabOpt = None,
    host: Annotated[
        str, typer.Option("--host", help="Address to listen on (loopback by default).")
    ] = "127.0.0.1",
    port: Annotated[
        int, typer.Option("--port", "-p", min=0, max=65535, help="Port; 0 picks a free one.")
    ] = 8765,
    token: Annotated[
        Optional[str],
        typer.Option(
            "--token",
            envvar="ZSCLIP_TOKEN",
            show_envvar=True,
            help="Require Authorization: Bearer TOKEN on every request; needed off loopback. "
            "Prefer the variable: a command line is visible to other users.",
        ),
    ] = None,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "fp32",
    max_batch: Annotated[
        int,
        typer.Option("--max-batch", min=1, help="Images per forward pass, across requests."),
    ] = 32,
    batch_wait_ms: Annotated[
        float,
        typer.Option(
            "--batch-wait-ms",
            min=0.0,
            max=1000.0,
            help="The longest an image waits for images on their way (being decoded) to share "
            "its forward pass; a lone request never waits.",
        ),
    ] = 50.0,
    queue_size: Annotated[
        int,
        typer.Option(
            "--queue-size",
            min=1,
            help="Images and texts admitted at once; more answer 503 with Retry-After.",
        ),
    ] = 256,
    workers: Annotated[
        Optional[int],
        typer.Option("--workers", "-j", min=1, help="Decoding threads (default: one per core)."),
    ] = None,
    max_upload_mb: Annotated[
        float, typer.Option("--max-upload-mb", min=0.001, help="Largest request body, in MiB.")
    ] = 32.0,
    max_images: Annotated[
        int, typer.Option("--max-images", min=1, help="Images per request.")
    ] = 64,
    max_labels: Annotated[
        int, typer.Option("--max-labels", min=1, help="Labels per request.")
    ] = 1000,
    max_texts: Annotated[int, typer.Option("--max-texts", min=1, help="Texts per request.")] = 256,
    max_megapixels: Annotated[
        float,
        typer.Option(
            "--max-megapixels",
            min=0.001,
            help="Largest image, from its header (decompression bombs): as in classify.",
        ),
    ] = 120.0,
    request_timeout: Annotated[
        float,
        typer.Option("--request-timeout", min=0.1, help="Seconds a request may take, in all."),
    ] = 60.0,
    max_connections: Annotated[
        int, typer.Option("--max-connections", min=1, help="Open connections at once.")
    ] = 64,
    cache: Annotated[
        bool,
        typer.Option(
            "--cache/--no-cache",
            help="Read and write label classifiers in the on-disk cache, as classify does.",
        ),
    ] = True,
    access_log: Annotated[
        bool, typer.Option("--access-log", help="One stderr line per request.")
    ] = False,
    quiet: QuietOpt = False,
    offline: OfflineOpt = False,
) -> None:
    """Serve a model over HTTP: classify and embed without loading it for every call."""
    from zsclip.cli._output import note
    from zsclip.errors import UserError

    _require_extra()
    if token is not None and len(token) < MIN_TOKEN_CHARS:
        raise UserError(
            f"the token is {len(token)} characters; use at least {MIN_TOKEN_CHARS}, e.g. "
            "python -c 'import secrets; print(secrets.token_urlsafe(32))'"
        )
    from zsclip.serve.server import RunOptions, is_loopback, listen, resolve
    from zsclip.serve.server import serve as run_server

    if not token and not is_loopback(resolve(host, port)[1]):
        raise UserError(
            f"--host {host} is reachable from other machines: set a token first "
            "(ZSCLIP_TOKEN or --token, at least 16 characters), or keep the default 127.0.0.1"
        )
    listener = listen(host, port)  # before the model: a port in use costs a second, not a load
    from zsclip.cli._runtime import load_for_inference
    from zsclip.serve.app import create_app
    from zsclip.serve.engine import Batching, Engine, Limits

    loaded, torch_device, dtype = load_for_inference(
        model, vocab=vocab, device=device, precision=precision, offline=offline, quiet=quiet
    )
    limits = Limits(
        max_upload_bytes=int(max_upload_mb * 2**20),
        max_images=max_images,
        max_labels=max_labels,
        max_texts=max_texts,
        max_pixels=int(max_megapixels * 1e6),
        request_timeout_s=request_timeout,
    )
    batching = Batching(
        max_batch=max_batch,
        wait_ms=batch_wait_ms,
        queue_size=queue_size,
        workers=workers or 0,
    )
    engine = Engine(loaded, torch_device, dtype, limits=limits, batching=batching, use_cache=cache)
    app = create_app(engine, token=token)
    # The one line --quiet keeps: where the server listens (the port chosen, with --port 0).
    note(
        f"zsclip: serving {loaded.name} on {listener.url} (POST /v1/classify, /v1/embed; "
        f"GET /v1/health, /v1/models, /v1/openapi.json){'; token required' if token else ''}"
    )

    def stopping(signum: int) -> None:
        note(
            f"zsclip: stopping: finishing the requests in flight ({engine.admitted} images and "
            "texts); Ctrl-C again to stop at once",
            quiet=quiet,
        )

    options = RunOptions(quiet=quiet, access_log=access_log, max_connections=max_connections)
    stopped_by = run_server(app, listener, options, on_stop=stopping)
    note("zsclip: stopped", quiet=quiet)
    if stopped_by is not None and stopped_by != _sigterm():
        raise SystemExit(128 + stopped_by)  # Ctrl-C 130, SIGHUP 129, as for other commands


def _sigterm() -> int:
    import signal

    return signal.SIGTERM  # the way services are stopped: the drained server exits 0


def _require_extra() -> None:
    """One line naming the install command when the server's packages are missing."""
    import importlib.util

    from zsclip.errors import UserError

    missing = [
        name
        for name, module in (
            ("fastapi", "fastapi"),
            ("uvicorn", "uvicorn"),
            ("python-multipart", "python_multipart"),
        )
        if importlib.util.find_spec(module) is None
    ]
    if missing:
        raise UserError(
            f"zsclip serve needs {', '.join(missing)}, which zsclip installs as an extra: {EXTRA}"
        )
