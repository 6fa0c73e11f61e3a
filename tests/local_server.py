"""A local HTTP/1.1 server for download tests (127.0.0.1 only: nothing at test time leaves the machine).

Shared by tests/test_download.py and tests/test_cli_models.py; the `server` fixture in conftest.py starts one.
"""

from __future__ import annotations

import hashlib
import http.server
import re
import socket
import threading
import time


def payload(n: int, seed: int = 0) -> bytes:
    """n deterministic pseudo-random bytes."""
    out, block = bytearray(), hashlib.sha256(str(seed).encode()).digest()
    while len(out) < n:
        block = hashlib.sha256(block).digest()
        out += block
    return bytes(out[:n])


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class LocalServer:
    """A threaded HTTP/1.1 server; `files` maps paths to bytes, `rules` maps paths to behaviours:

    cut_at=N (with cuts=K): the first K responses stop after N bytes of body and close the connection.
    ignore_range=True: answer 200 with the whole file even when asked for a range.
    delay=S: sleep S seconds between 16 KiB chunks. redirect=PATH, headers={...}: answer 302 to PATH.
    Every request is logged as {"method", "path", "range", "status", "sent"}.
    """

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.rules: dict[str, dict] = {}
        self.headers: dict[str, str] = {}  # sent with every answer (e.g. a Hub's X-Repo-Commit)
        self.missing_headers: dict[str, str] = {}  # sent with every 404
        self.log: list[dict] = []
        self._lock = threading.Lock()
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.owner = self  # type: ignore[attr-defined]
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def requests(self, path: str, method: str = "GET") -> list[dict]:
        return [entry for entry in self.log if entry["path"] == path and entry["method"] == method]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def do_HEAD(self) -> None:
        self._serve(send_body=False)

    def do_GET(self) -> None:
        self._serve(send_body=True)

    def _serve(self, send_body: bool) -> None:
        server: LocalServer = self.server.owner  # type: ignore[attr-defined]
        rule = server.rules.get(self.path, {})
        entry = {
            "method": self.command,
            "path": self.path,
            "range": self.headers.get("Range"),
            "sent": 0,
        }
        with server._lock:
            server.log.append(entry)
        if "redirect" in rule:
            return self._reply(
                entry, 302, {"Location": rule["redirect"], **rule.get("headers", {})}, b"", True
            )
        data = server.files.get(self.path)
        if data is None:
            return self._reply(entry, 404, dict(server.missing_headers), b"not found", send_body)
        start, status, extra = 0, 200, {**server.headers, **rule.get("headers", {})}
        match = re.match(r"bytes=(\d+)-$", self.headers.get("Range") or "")
        if match and not rule.get("ignore_range"):
            start = int(match.group(1))
            if start >= len(data):
                return self._reply(
                    entry, 416, {"Content-Range": f"bytes */{len(data)}"}, b"", send_body
                )
            status, extra["Content-Range"] = 206, f"bytes {start}-{len(data) - 1}/{len(data)}"
        body = data[start:]
        limit = len(body)
        with server._lock:
            if rule.get("cuts", 0) > 0:
                rule["cuts"] -= 1
                limit = max(0, rule["cut_at"] - start)
        self._reply(
            entry, status, extra, body, send_body, limit=limit, delay=rule.get("delay", 0.0)
        )

    def _reply(self, entry, status, headers, body, send_body, limit=None, delay=0.0) -> None:
        entry["status"] = status
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not send_body:
            return
        limit = len(body) if limit is None else limit
        try:
            for offset in range(0, limit, 16384):
                chunk = body[offset : min(offset + 16384, limit)]
                self.wfile.write(chunk)
                self.wfile.flush()
                entry["sent"] += len(chunk)
                if delay:
                    time.sleep(delay)
        except (BrokenPipeError, ConnectionResetError):
            pass
        if limit < len(body):
            self.close_connection = True  # cut: the client sees the connection end early


def closed_port_url(path: str = "/x") -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}{path}"
