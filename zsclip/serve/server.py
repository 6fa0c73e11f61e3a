"""Listening and stopping: the socket, uvicorn, and a graceful end on SIGTERM or Ctrl-C.

The socket is bound before the model loads, so a port in use or a refused address costs a second,
not a model load. On SIGTERM (or the first Ctrl-C) uvicorn stops accepting connections, lets the
requests in flight finish, and the batcher finishes what is queued; then `serve` returns the signal
so the command can exit with its status. A second Ctrl-C stops without waiting.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import signal
import socket
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import uvicorn

from zsclip.errors import UserError

if TYPE_CHECKING:
    from starlette.types import ASGIApp

_STOP_SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP")


@dataclass(frozen=True)
class Listener:
    sock: socket.socket
    host: str  # as the address was resolved
    port: int  # the port bound (the one chosen by the system for --port 0)
    loopback: bool

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


def resolve(host: str, port: int) -> tuple[int, tuple]:
    """(address family, socket address) for --host and --port, or a UserError naming the fix."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as err:
        raise UserError(f"--host {host!r}: cannot resolve it ({err.strerror})") from None
    family, _, _, _, address = infos[0]
    return family, address


def is_loopback(address: tuple) -> bool:
    return ipaddress.ip_address(address[0].split("%")[0]).is_loopback


def listen(host: str, port: int, *, backlog: int = 512) -> Listener:
    """A listening TCP socket on host:port (check `is_loopback(resolve(...))` first)."""
    family, address = resolve(host, port)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(backlog)
    except OSError as err:
        sock.close()
        raise UserError(_bind_problem(err, host, port)) from None
    bound = sock.getsockname()
    return Listener(sock, bound[0], bound[1], is_loopback(bound))


def _bind_problem(err: OSError, host: str, port: int) -> str:
    if err.errno == errno.EADDRINUSE:
        return (
            f"port {port} on {host} is already in use: pick another with --port (0: any free port)"
        )
    if err.errno == errno.EACCES:
        return f"not allowed to listen on port {port}: use a port above 1023"
    if err.errno == errno.EADDRNOTAVAIL:
        return f"--host {host}: not an address of this machine"
    return f"cannot listen on {host}:{port}: {err.strerror or err}"


@dataclass(frozen=True)
class RunOptions:
    quiet: bool = False
    access_log: bool = False  # one stderr line per request
    max_connections: int = 64  # open connections at once; uvicorn answers 503 beyond them
    keep_alive_s: float = 5.0  # an idle connection is closed after this


def serve(
    app: "ASGIApp",
    listener: Listener,
    options: RunOptions,
    on_stop: Callable[[int], None] = lambda signum: None,
) -> int | None:
    """Serve until SIGTERM or Ctrl-C; returns the signal that stopped it (None: stopped otherwise)."""
    config = uvicorn.Config(
        app,
        log_level="info" if options.access_log else "warning",
        access_log=options.access_log,
        limit_concurrency=options.max_connections,
        timeout_keep_alive=max(1, round(options.keep_alive_s)),
        timeout_graceful_shutdown=None,  # each request is bounded by --request-timeout already
        server_header=False,
        proxy_headers=False,
        lifespan="on",
    )
    server = _Server(config, on_stop)
    server.run(sockets=[listener.sock])
    return server.stop_signal


class _Server(uvicorn.Server):
    """uvicorn's server, except that it reports the stop (once) and does not raise the signal again
    afterwards: the drain is the clean way out, and the command turns it into an exit status."""

    def __init__(self, config: uvicorn.Config, on_stop: Callable[[int], None]) -> None:
        super().__init__(config)
        self.on_stop = on_stop
        self.stop_signal: int | None = None

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {}
        for name in _STOP_SIGNALS:
            number = getattr(signal, name, None)
            # a signal the caller ignores (nohup) stays ignored
            if number is not None and signal.getsignal(number) is not signal.SIG_IGN:
                previous[number] = signal.signal(number, self._stop)
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _stop(self, signum: int, frame) -> None:
        if self.stop_signal is None:
            self.stop_signal = signum
            self.on_stop(signum)
        self.handle_exit(signum, frame)
