"""Client of the measuring agent (measure/agent.py) running on a board.

A busy agent answers 503; the client waits and retries until its deadline, so several
searches sharing one board queue up instead of failing.
"""

from __future__ import annotations

import io
import json
import logging
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path
from typing import Any

from edgecompress.errors import MeasureError, UsageError

log = logging.getLogger(__name__)

JOB_HEADER = "X-Edgecompress-Job"


def read_token(path: str | Path) -> str:
    """The agent token from a file, for --token-file."""
    path = Path(path).expanduser()
    try:
        token = path.read_text().strip()
    except OSError as err:
        raise UsageError(f"cannot read token file {path}: {err.strerror}") from None
    if not token:
        raise UsageError(f"token file {path} is empty; put the agent's token in it")
    if not _valid_token(token):
        raise UsageError(
            f"token file {path} must hold the token alone: one line of printable characters without spaces"
        )
    return token


def _valid_token(token: str) -> bool:
    return token.isascii() and token.isprintable() and not any(c.isspace() for c in token)


class AgentClient:
    """Talks to one agent: health, info, and measurements of one model or a batch."""

    def __init__(self, url: str, token: str | None, connect_timeout_s: float = 30.0) -> None:
        parsed = urllib.parse.urlparse(url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise UsageError(f"--remote {url!r} is not an http URL like http://board:8765")
        if not token:
            raise UsageError("--remote needs the agent's token: pass --token-file F")
        if not _valid_token(token):
            raise UsageError("the agent token must be printable characters without spaces")
        self.url = url.rstrip("/")
        self.token = token
        self.connect_timeout_s = connect_timeout_s

    def _request(
        self,
        method: str,
        route: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        timeout_s: float | None = None,
    ) -> dict[str, Any]:
        deadline = time.monotonic() + (timeout_s or self.connect_timeout_s)
        wait = 0.2
        while True:
            request = urllib.request.Request(
                self.url + route,
                data=body,
                method=method,
                headers={"Authorization": f"Bearer {self.token}", **(headers or {})},
            )
            remaining = max(1.0, deadline - time.monotonic())
            try:
                with urllib.request.urlopen(request, timeout=remaining) as response:
                    return json.loads(response.read() or b"{}")
            except urllib.error.HTTPError as err:
                message = _error_message(err)
                if err.code == 503 and time.monotonic() + wait < deadline:
                    log.info("agent busy; retrying in %.1f s", wait)
                    time.sleep(wait)
                    wait = min(wait * 1.5, 5.0)
                    continue
                if err.code == 401:
                    raise MeasureError(
                        f"the agent at {self.url} refused the token; check --token-file"
                    ) from None
                raise MeasureError(f"the agent at {self.url} answered {err.code}: {message}") from None
            except (urllib.error.URLError, OSError) as err:
                reason = getattr(err, "reason", err)
                raise MeasureError(
                    f"cannot reach the agent at {self.url}: {reason}; is `edgecompress agent` "
                    "running there and the port open?"
                ) from None
            except json.JSONDecodeError:
                raise MeasureError(f"the agent at {self.url} sent a reply that is not JSON") from None

    def health(self) -> dict[str, Any]:
        return self._request("GET", "/health")

    def info(self) -> dict[str, Any]:
        return self._request("GET", "/info")

    def measure_file(self, path: Path, job: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        """Upload one .onnx file and measure it with the job's settings."""
        job = dict(job, models=[{"id": job["models"][0]["id"], "path": Path(path).name}])
        return self._request(
            "POST",
            "/measure",
            body=Path(path).read_bytes(),
            headers={"Content-Type": "application/octet-stream", JOB_HEADER: json.dumps(job)},
            timeout_s=timeout_s,
        )

    def measure_files(
        self, models: list[tuple[str, Path]], job: dict[str, Any], timeout_s: float
    ) -> dict[str, Any]:
        """Upload several .onnx files as one zip and measure them in one worker."""
        buffer = io.BytesIO()
        entries = []
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
            for index, (model_id, path) in enumerate(models):
                name = f"{index:05d}.onnx"
                archive.write(path, name)
                entries.append({"id": model_id, "path": name})
        job = dict(job, models=entries)
        return self._request(
            "POST",
            "/measure",
            body=buffer.getvalue(),
            headers={"Content-Type": "application/zip", JOB_HEADER: json.dumps(job)},
            timeout_s=timeout_s,
        )


def _error_message(err: urllib.error.HTTPError) -> str:
    try:
        return str(json.loads(err.read() or b"{}").get("error", err.reason))
    except (json.JSONDecodeError, OSError, AttributeError):
        return str(err.reason)
