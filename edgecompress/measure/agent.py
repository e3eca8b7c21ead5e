"""The measuring agent: the same worker as on the host, behind HTTP, on the board.

Needs only the standard library, numpy and onnxruntime, so a board can run it from two
copied files (this one and runner.py beside it):

    python agent.py --host 0.0.0.0 --port 8765 --token-file token.txt

Routes: GET /health (no token), GET /info, POST /measure (one .onnx body, or a zip of
several for `edgecompress profile`). Every route but /health needs
`Authorization: Bearer TOKEN`, compared in constant time. The job (cores, threads,
protocol) travels as JSON in the X-Edgecompress-Job header and is validated like any
other untrusted input. One measurement runs at a time (its upload included, so a
slow uploader holds the slot at most for the request timeout); a second gets 503 with
Retry-After, which the client turns into a queue. Uploads are capped, the whole request
has a deadline, the measurement has a timeout, and every failure becomes a JSON error:
a malformed, hostile or slow request never takes the agent down. Plain HTTP: the token
crosses the network in clear, so use it on a trusted link or through an SSH tunnel.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import http.server
import importlib.metadata
import importlib.util
import json
import logging
import os
import platform
import socket
import stat
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

log = logging.getLogger(__name__)

JOB_HEADER = "X-Edgecompress-Job"
AGENT_NAME = "edgecompress-agent"
PROTOCOL_VERSION = 1
_CHUNK = 1 << 16


def _load_runner() -> ModuleType:
    """runner.py from beside this file, without importing the edgecompress package."""
    name = "edgecompress.measure.runner"
    if name in sys.modules:
        return sys.modules[name]
    path = Path(__file__).resolve().with_name("runner.py")
    spec = importlib.util.spec_from_file_location("_edgecompress_runner", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load the measuring worker from {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


runner = _load_runner()


@dataclass(frozen=True)
class AgentSettings:
    """Limits that keep one agent alive whatever its clients send."""

    token: bytes
    max_upload_bytes: int = 64 << 20
    request_timeout_s: float = 30.0
    measure_timeout_s: float = 600.0
    max_connections: int = 16

    @property
    def max_unpacked_bytes(self) -> int:
        return 4 * self.max_upload_bytes


class TokenError(ValueError):
    """A token file that is missing, empty or too short."""


def read_token_file(path: str | Path) -> bytes:
    """The secret from a token file (surrounding whitespace stripped)."""
    path = Path(path)
    try:
        token = path.read_bytes().strip()
    except OSError as err:
        raise TokenError(f"cannot read token file {path}: {err.strerror}") from None
    if any(byte <= 32 or byte >= 127 for byte in token):
        raise TokenError(
            f"token file {path} must hold the token alone: one line of printable characters without spaces"
        )
    if len(token) < 16:
        raise TokenError(
            f"token file {path} holds {len(token)} characters; use at least 16, e.g. "
            "python -c 'import secrets; print(secrets.token_hex(16))' > token.txt"
        )
    try:
        if os.stat(path).st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            log.warning("token file %s is readable by others; chmod 600 it", path)
    except OSError:
        pass
    return token


class _Reject(Exception):
    """An error response: HTTP status, message, and whether to drop the connection."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.headers = headers or {}


class AgentServer(http.server.ThreadingHTTPServer):
    """A threading HTTP server with a connection cap and a one-measurement-at-a-time lock."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], settings: AgentSettings) -> None:
        self.settings = settings
        self.measuring = threading.Lock()
        self._slots = threading.BoundedSemaphore(settings.max_connections)
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            try:
                request.sendall(_raw_response(503, {"error": "too many connections; retry"}))
            except OSError:
                pass
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.exception("request from %s failed", client_address)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


def _raw_response(status: int, body: dict[str, Any]) -> bytes:
    data = json.dumps(body).encode()
    reason = http.server.BaseHTTPRequestHandler.responses.get(status, ("",))[0]
    head = (
        f"HTTP/1.0 {status} {reason}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + data


class _Handler(http.server.BaseHTTPRequestHandler):
    server: AgentServer
    server_version = f"{AGENT_NAME}/{PROTOCOL_VERSION}"
    # Errors in a garbled request line are still answered with a status line and JSON.
    default_request_version = "HTTP/1.0"

    # ------------------------------------------------------------ plumbing

    def setup(self) -> None:
        self.timeout = self.server.settings.request_timeout_s  # per socket read
        super().setup()
        # The whole request (headers and upload) has a deadline too: a client trickling
        # one byte at a time never holds a connection longer than this.
        self._deadline = time.monotonic() + self.server.settings.request_timeout_s
        self._watchdog = threading.Timer(self.server.settings.request_timeout_s, self._cut)
        self._watchdog.daemon = True
        self._watchdog.start()

    def finish(self) -> None:
        self._watchdog.cancel()
        try:
            super().finish()
        except OSError:
            pass

    def _cut(self) -> None:
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (base signature)
        log.info("%s %s", self.address_string(), format % args)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        # http.server's own parse errors (bad request line, huge headers) as JSON too.
        self.close_connection = True
        self._send_json(code, {"error": message or self.responses.get(code, ("error",))[0]})

    def _send_json(self, status: int, body: dict[str, Any], headers: dict | None = None) -> None:
        data = json.dumps(body).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(data)
        except OSError:
            self.close_connection = True

    def _guard(self, handler: Callable[[], tuple[int, dict[str, Any]]]) -> None:
        try:
            status, body = handler()
            self._send_json(status, body)
        except _Reject as err:
            self.close_connection = True
            self._send_json(err.status, {"error": str(err)}, err.headers)
        except Exception as err:  # never let one request take the agent down
            log.exception("internal error")
            self.close_connection = True
            self._send_json(500, {"error": f"internal error: {type(err).__name__}: {err}"})

    def _check_token(self) -> None:
        header = self.headers.get("Authorization", "")
        scheme, _, given = header.partition(" ")
        expected = self.server.settings.token
        # Digests first, so the comparison takes the same time whatever the given length.
        given_digest = hashlib.sha256(given.strip().encode("utf-8", "replace")).digest()
        expected_digest = hashlib.sha256(expected).digest()
        if scheme.lower() != "bearer" or not hmac.compare_digest(given_digest, expected_digest):
            raise _Reject(401, "missing or wrong token", {"WWW-Authenticate": "Bearer"})

    # ------------------------------------------------------------ routes

    def do_GET(self) -> None:  # noqa: N802 (http.server naming)
        route = self.path.split("?", 1)[0]
        if route == "/health":
            self._guard(lambda: (200, {"status": "ok", "agent": AGENT_NAME}))
        elif route == "/info":
            self._guard(self._info)
        else:
            self._guard(self._not_found)

    def do_POST(self) -> None:  # noqa: N802
        route = self.path.split("?", 1)[0]
        if route == "/measure":
            self._guard(self._measure)
        else:
            self.close_connection = True
            self._guard(self._not_found)

    def _not_found(self) -> tuple[int, dict[str, Any]]:
        raise _Reject(404, f"no route {self.command} {self.path.split('?', 1)[0]}")

    def _info(self) -> tuple[int, dict[str, Any]]:
        self._check_token()
        return 200, agent_info(self.server.settings, busy=self.server.measuring.locked())

    def _read_body(self, length: int, out: Any) -> None:
        left = length
        while left > 0:
            if time.monotonic() > self._deadline:
                raise _Reject(408, "the upload took longer than the request timeout")
            try:
                chunk = self.rfile.read(min(_CHUNK, left))
            except (TimeoutError, OSError):
                raise _Reject(408, "the upload stalled or was cut off") from None
            if not chunk:
                raise _Reject(400, f"the body ended {left} bytes short of Content-Length")
            out.write(chunk)
            left -= len(chunk)

    def _job(self) -> dict[str, Any]:
        text = self.headers.get(JOB_HEADER)
        if not text:
            raise _Reject(400, f"missing {JOB_HEADER} header (the job as JSON)")
        try:
            job = runner.validate_job(json.loads(text))
        except (ValueError, runner.JobError) as err:
            raise _Reject(400, f"bad job: {err}") from None
        # A reference is a path on this board: the agent times only what it was sent.
        if any("reference" in entry for entry in job["models"]):
            raise _Reject(400, "bad job: an agent takes no 'reference' (its figures are the board's own ms)")
        return job

    def _measure(self) -> tuple[int, dict[str, Any]]:
        settings = self.server.settings
        self._check_token()
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raise _Reject(411, "chunked uploads are not accepted; send Content-Length")
        length_text = self.headers.get("Content-Length")
        if length_text is None:
            raise _Reject(411, "Content-Length is required")
        try:
            length = int(length_text)
        except ValueError:
            raise _Reject(400, "Content-Length is not a number") from None
        if length <= 0:
            raise _Reject(400, "the body is empty; send the .onnx file")
        if length > settings.max_upload_bytes:
            # Read and drop a moderately oversized body (the request timeout still holds),
            # so the client, still sending, gets the 413 instead of a broken pipe.
            if length <= 4 * settings.max_upload_bytes:
                left = length
                while left > 0:
                    chunk = self.rfile.read(min(left, 1 << 16))
                    if not chunk:
                        break
                    left -= len(chunk)
            raise _Reject(
                413,
                f"upload of {length} bytes exceeds this agent's limit of "
                f"{settings.max_upload_bytes} bytes (agent option --max-upload-mb)",
            )
        job = self._job()
        if not self.server.measuring.acquire(blocking=False):
            raise _Reject(503, "busy with another measurement; retry", {"Retry-After": "1"})
        try:
            with tempfile.TemporaryDirectory(prefix="edgecompress-agent-") as tmp:
                folder = Path(tmp)
                upload = folder / "upload.bin"
                with open(upload, "wb") as f:
                    self._read_body(length, f)
                self._watchdog.cancel()  # the upload is in; the measurement has its own limit
                kind = self.headers.get("Content-Type", "application/octet-stream").lower()
                if kind.startswith("application/zip"):
                    job["models"] = _unpack(upload, job["models"], folder, settings)
                else:
                    if len(job["models"]) != 1:
                        raise _Reject(400, "a single .onnx upload measures exactly one model")
                    job["models"] = [{"id": job["models"][0]["id"], "path": str(upload)}]
                return self._run(job, single=not kind.startswith("application/zip"))
        finally:
            self.server.measuring.release()

    def _run(self, job: dict[str, Any], single: bool) -> tuple[int, dict[str, Any]]:
        try:
            result = runner.run_job(job, self.server.settings.measure_timeout_s)
        except runner.WorkerFailed as err:
            raise _Reject(504 if err.timed_out else 500, str(err)) from None
        if not result.get("ok", False):
            raise _Reject(400, str(result.get("error", "the worker rejected the job")))
        if single:
            one = result["results"][0]
            if one["status"] == "invalid-model":
                raise _Reject(400, f"invalid ONNX model: {one.get('message', '')}")
            if one["status"] == "error":
                raise _Reject(422, f"onnxruntime could not run the model: {one.get('message')}")
        return 200, result


def _unpack(
    upload: Path, models: list[dict[str, str]], folder: Path, settings: AgentSettings
) -> list[dict[str, str]]:
    """Extract the zip members the job names, each to a fresh file name (no traversal)."""
    try:
        archive = zipfile.ZipFile(upload)
    except zipfile.BadZipFile:
        raise _Reject(400, "the body is not a zip archive") from None
    with archive:
        members = {info.filename: info for info in archive.infolist()}
        wanted = [m["path"] for m in models]
        missing = [name for name in wanted if name not in members]
        if missing:
            raise _Reject(400, f"the zip lacks {missing[:3]} named in the job")
        total = sum(members[name].file_size for name in wanted)
        if total > settings.max_unpacked_bytes:
            raise _Reject(413, f"the zip unpacks to {total} bytes, over the agent's limit")
        placed, budget = [], settings.max_unpacked_bytes
        for index, model in enumerate(models):
            target = folder / f"model-{index:05d}.onnx"
            with archive.open(model["path"]) as src, open(target, "wb") as dst:
                data = src.read(budget + 1)  # never trust the declared size alone
                if len(data) > budget:
                    raise _Reject(413, "the zip unpacks to more than the agent's limit")
                budget -= len(data)
                dst.write(data)
            placed.append({"id": model["id"], "path": str(target)})
    return placed


def _ort_version() -> str:
    try:
        return importlib.metadata.version("onnxruntime")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def agent_info(settings: AgentSettings, busy: bool = False) -> dict[str, Any]:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "agent": AGENT_NAME,
        "protocol": PROTOCOL_VERSION,
        "machine": platform.machine(),
        "system": platform.platform(),
        "python": platform.python_version(),
        "ort_version": _ort_version(),
        "cores": cores,
        "max_upload_bytes": settings.max_upload_bytes,
        "busy": busy,
    }


def make_server(host: str, port: int, settings: AgentSettings) -> AgentServer:
    """A bound, not yet serving, agent server (port 0 picks a free port)."""
    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning(
            "serving on %s: anyone who reaches this port with the token can run models here",
            host,
        )
    return AgentServer((host, port), settings)


def serve_agent(
    host: str = "127.0.0.1",
    port: int = 8765,
    token_file: str | Path = "token.txt",
    *,
    max_upload_mb: float = 64,
    request_timeout_s: float = 30.0,
    measure_timeout_s: float = 600.0,
    ready: Callable[[str], None] | None = None,
) -> None:
    """Run the agent until interrupted; `ready` gets its URL once it listens."""
    settings = AgentSettings(
        token=read_token_file(token_file),
        max_upload_bytes=int(max_upload_mb * 2**20),
        request_timeout_s=request_timeout_s,
        measure_timeout_s=measure_timeout_s,
    )
    server = make_server(host, port, settings)
    try:
        if ready is not None:
            ready(server.url)
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()


def main(argv: list[str] | None = None) -> int:
    """`python agent.py ...` on a board without the edgecompress CLI."""
    parser = argparse.ArgumentParser(description="edgecompress measuring agent")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--token-file", required=True)
    parser.add_argument("--max-upload-mb", type=float, default=64)
    parser.add_argument("--request-timeout", type=float, default=30.0)
    parser.add_argument("--measure-timeout", type=float, default=600.0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        serve_agent(
            args.host,
            args.port,
            args.token_file,
            max_upload_mb=args.max_upload_mb,
            request_timeout_s=args.request_timeout,
            measure_timeout_s=args.measure_timeout,
            ready=lambda url: print(f"agent listening on {url}", flush=True),
        )
    except TokenError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
