"""The coordinator's read-only HTTP server: the dashboard, its JSON API, Prometheus /metrics and
the run's prepared dataset (/data/: its manifest and shards, with range requests)."""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import sys
import threading
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from urllib.parse import parse_qs, urlparse

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest

logger = logging.getLogger("starling.coordinator.server")

STATIC_FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/static/dashboard.js": ("dashboard.js", "text/javascript; charset=utf-8"),
    "/static/dashboard.css": ("dashboard.css", "text/css; charset=utf-8"),
}


def _json_safe(value):
    """NaN and infinities are not JSON: they become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


class _CountingHTTPServer(ThreadingHTTPServer):
    """Counts the requests whose handler raised and says so in one line (the standard library prints
    a traceback to stderr); a client that hangs up early is not an error of ours."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type, errors: Counter) -> None:
        super().__init__(address, handler)
        self.errors = errors

    def handle_error(self, request, client_address) -> None:
        error = sys.exc_info()[1]
        if isinstance(error, ConnectionError):
            return
        self.errors.inc()
        logger.warning("a request from %s failed: %r", client_address[0], error)
        logger.debug("its traceback", exc_info=True)


class DashboardServer:
    """Serves `/`, `/api/v1/state`, `/api/v1/history?since=T`, `/metrics`, `/healthz` and, given a
    prepared dataset's folder and file names, `/data/NAME` for those files only, in a thread."""

    def __init__(
        self,
        host: str,
        port: int,
        state: Callable[[], dict],
        history: Callable[[float], list[dict]],
        registry: CollectorRegistry,
        dataset: tuple[Path, frozenset[str]] | None = None,
    ) -> None:
        handler = self._handler_class(state, history, registry, dataset)
        errors = Counter("starling_coordinator_request_errors", "HTTP requests whose handler failed", registry=registry)
        self.httpd = _CountingHTTPServer((host, port), handler, errors)  # OSError if the port is taken
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="dashboard", daemon=True)

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}/"

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        if self.thread.is_alive():
            self.httpd.shutdown()
        self.httpd.server_close()

    @staticmethod
    def _handler_class(state, history, registry, dataset):
        static = resources.files("coordinator") / "static"
        dataset_folder, dataset_files = dataset or (None, frozenset())

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # requests are not worth a log line each
                pass

            def _send(self, body: bytes, content_type: str, status: HTTPStatus = HTTPStatus.OK) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(body)

            def _send_file(self, path: Path) -> None:
                """The file, or the byte range the request asks for (`Range: bytes=START-[END]`)."""
                size = path.stat().st_size
                start, end = 0, size - 1
                wanted = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
                if wanted:
                    start, end = int(wanted[1]), min(int(wanted[2] or end), end)
                    if start > end:
                        self.send_response(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE)
                        self.send_header("Content-Range", f"bytes */{size}")
                        self.end_headers()
                        return
                self.send_response(HTTPStatus.PARTIAL_CONTENT if wanted else HTTPStatus.OK)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(end - start + 1))
                self.send_header("Accept-Ranges", "bytes")
                if wanted:
                    self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
                self.end_headers()
                with open(path, "rb") as handle:
                    handle.seek(start)
                    shutil.copyfileobj(_Limited(handle, end - start + 1), self.wfile)

            def _send_json(self, value) -> None:
                self._send(json.dumps(_json_safe(value)).encode(), "application/json")

            def do_GET(self) -> None:
                url = urlparse(self.path)
                if url.path in STATIC_FILES:
                    name, content_type = STATIC_FILES[url.path]
                    self._send((static / name).read_bytes(), content_type)
                elif url.path == "/api/v1/state":
                    self._send_json(state())
                elif url.path == "/api/v1/history":
                    try:
                        since = float(parse_qs(url.query).get("since", ["0"])[0])
                    except ValueError:
                        self._send(b"since must be a number\n", "text/plain", HTTPStatus.BAD_REQUEST)
                        return
                    self._send_json({"points": history(since)})
                elif url.path == "/metrics":
                    self._send(generate_latest(registry), CONTENT_TYPE_LATEST)
                elif url.path.startswith("/data/") and url.path[len("/data/") :] in dataset_files:
                    self._send_file(dataset_folder / url.path[len("/data/") :])
                elif url.path == "/healthz":
                    self._send(b"ok\n", "text/plain")
                else:
                    self._send(b"not found\n", "text/plain", HTTPStatus.NOT_FOUND)

        return Handler


class _Limited:
    """A file read up to `left` bytes (shutil.copyfileobj reads until empty)."""

    def __init__(self, handle, left: int) -> None:
        self.handle, self.left = handle, left

    def read(self, size: int = -1) -> bytes:
        size = self.left if size < 0 else min(size, self.left)
        data = self.handle.read(size)
        self.left -= len(data)
        return data
