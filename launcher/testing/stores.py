"""Object stores on loopback for the remote-shard tests and benchmarks: an S3-API server (moto's, which s3fs tests
itself against), a Google Cloud Storage emulator (gcp-storage-emulator, which gcsfs reaches through
STORAGE_EMULATOR_HOST) and an HTTP server that serves a folder with range requests and injects the faults networks have
(a connection dropped in the middle of a file, 503 before success, a slow answer, bytes that are not the file's)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from launcher.testing.env import free_port

S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@contextmanager
def _server(kind: str, arg: str, **popen) -> Iterator[int]:
    """`python -m launcher.testing.stores KIND ARG` (one of the servers below) in a process of its own, as a bucket is
    elsewhere: it shares no interpreter lock with the reader. Yields the loopback port it chose; stopped after."""
    proc = subprocess.Popen([sys.executable, "-m", "launcher.testing.stores", kind, arg], stdout=subprocess.PIPE,
                            text=True, **popen)
    try:
        line = proc.stdout.readline()
        if not line.startswith("port "):
            raise RuntimeError(f"the {kind} server did not start (exit code {proc.wait()})")
        yield int(line.split()[1])
    finally:
        proc.terminate()
        proc.wait()


@contextmanager
def s3_server(latency_s: float = 0.0) -> Iterator[dict[str, str]]:
    """moto's S3 server (its WSGI app, as `moto_server` runs it) on a free loopback port, `latency_s` added to every
    request. Yields the environment s3fs (botocore) needs to use it: its address (AWS_ENDPOINT_URL) and throwaway
    credentials."""
    with _server("s3", str(latency_s)) as port:
        yield {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", **S3_CREDENTIALS}


@contextmanager
def gcs_server(bucket: str) -> Iterator[dict[str, str]]:
    """gcp-storage-emulator, in memory, on a free loopback port, with `bucket` made. Yields the environment gcsfs needs
    to use it: its address (without Google credentials gcsfs goes on anonymously)."""
    with _server("gcs", bucket, stderr=subprocess.DEVNULL) as port:  # it prints a traceback per client disconnect
        yield {"STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{port}"}


def _serve_gcs(bucket: str) -> None:
    from gcp_storage_emulator.server import create_server

    server = create_server("127.0.0.1", 0, in_memory=True, default_bucket=bucket)  # port 0: the system picks one
    server.start()
    server._api.is_running.wait()
    print(f"port {server._api._httpd.server_port}", flush=True)
    threading.Event().wait()


def _serve_s3(latency_s: float) -> None:
    import logging

    from moto.server import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import make_server

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
    app = DomainDispatcherApplication(create_backend_app)

    def delayed(environ, start_response):
        time.sleep(latency_s)
        return app(environ, start_response)

    server = make_server("127.0.0.1", 0, delayed if latency_s else app, threaded=True)
    print(f"port {server.server_port}", flush=True)
    server.serve_forever()


@contextmanager
def environ(values: dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@dataclass
class Faults:
    """What the server does to requests for a file (by its path under the folder): `drop_after` bytes then the
    connection is closed, for the first `drop_times` GETs that reach that many bytes; `fail` 503s before it
    answers; `corrupt` serves the file with one byte changed (at byte 1000, or at the given byte), the first
    `corrupt_times` times it is asked for that byte (None: always); `delay` seconds before every answer; `hold_from`
    keeps a GET whose range starts at or after that byte waiting until `release` is set."""

    drop_after: dict[str, int] = field(default_factory=dict)
    drop_times: int = 1
    fail: dict[str, int] = field(default_factory=dict)
    corrupt: set[str] | dict[str, int] = field(default_factory=set)
    corrupt_times: int | None = None
    delay: float = 0.0
    hold_from: dict[str, int] = field(default_factory=dict)
    release: threading.Event = field(default_factory=threading.Event)
    requests: Counter = field(default_factory=Counter)  # GETs per path, as served
    dropped: Counter = field(default_factory=Counter)  # connections closed mid-file, per path
    corrupted: Counter = field(default_factory=Counter)  # answers with a byte changed, per path


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet
        pass

    def _file(self) -> tuple[str, Path | None]:
        rel = self.path.split("?")[0].lstrip("/")
        path = self.server.root / rel
        return rel, path if path.is_file() and self.server.root in path.resolve().parents else None

    def do_HEAD(self) -> None:
        rel, path = self._file()
        if path is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(path.stat().st_size))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()

    def do_GET(self) -> None:
        faults: Faults = self.server.faults
        time.sleep(faults.delay)
        rel, path = self._file()
        if path is None:
            self.send_error(404)
            return
        if faults.fail.get(rel, 0) > 0:
            faults.fail[rel] -= 1
            self.send_error(503, "try again")
            return
        data = path.read_bytes()
        start, end = 0, len(data) - 1
        header = self.headers.get("Range")
        if header and header.startswith("bytes="):
            first, _, last = header[6:].partition("-")
            start, end = int(first or 0), min(int(last), len(data) - 1) if last else len(data) - 1
        if rel in faults.hold_from and start >= faults.hold_from[rel]:
            faults.release.wait(120)
        at = faults.corrupt.get(rel) if isinstance(faults.corrupt, dict) else 1000 if rel in faults.corrupt else None
        if at is not None and start <= at <= end and (faults.corrupt_times is None or faults.corrupted[rel] <
                                                      faults.corrupt_times):
            faults.corrupted[rel] += 1
            data = data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:]
        body = data[start:end + 1]
        faults.requests[rel] += 1
        self.send_response(206 if header else 200)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        if header:
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        self.end_headers()
        cut = faults.drop_after.get(rel)
        if cut is not None and faults.dropped[rel] < faults.drop_times and cut < len(body):
            faults.dropped[rel] += 1
            self.wfile.write(body[:cut])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(2)  # the connection dies mid-file
            return
        self.wfile.write(body)


@contextmanager
def http_server(root: Path, faults: Faults | None = None) -> Iterator[tuple[str, Faults]]:
    """Serve `root` on a free loopback port; yields its URL and the faults object (change it between requests)."""
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), _Handler)
    server.root, server.faults = Path(root).resolve(), faults or Faults()
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", server.faults
    finally:
        server.shutdown()
        server.server_close()


if __name__ == "__main__":  # python -m launcher.testing.stores s3 LATENCY_S | gcs BUCKET: what the servers run
    _serve_s3(float(sys.argv[2])) if sys.argv[1] == "s3" else _serve_gcs(sys.argv[2])
