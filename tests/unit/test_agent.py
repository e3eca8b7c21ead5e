"""The measuring agent, started for real on loopback: auth, limits, bad input, concurrency,
and that it is still alive and correct after every bad request."""

from __future__ import annotations

import dataclasses
import http.client
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import pytest

from edgecompress.errors import MeasureError
from edgecompress.measure import measure
from edgecompress.measure.protocol import job_for
from edgecompress.measure.remote import AgentClient
from edgecompress.profiles import load_profile

TOKEN = "0123456789abcdef0123456789abcdef"
REQUEST_TIMEOUT = 2.0


# Every test gets a private EDGECOMPRESS_HOME (the `home` fixture in tests/conftest.py).
pytestmark = pytest.mark.usefixtures("home")


@pytest.fixture
def model(small_model: Path) -> Path:
    return small_model


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, subprocess.Popen]]:
    folder = tmp_path_factory.mktemp("agent")
    token = folder / "token.txt"
    token.write_text(TOKEN + "\n")
    token.chmod(0o600)
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgecompress.measure.agent", "--port", "0", "--token-file", str(token),
         "--max-upload-mb", "1", "--request-timeout", str(REQUEST_TIMEOUT)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    line = proc.stdout.readline()
    assert line.startswith("agent listening on "), proc.stderr.read()
    yield line.split()[-1], proc
    proc.terminate()
    proc.wait(10)


def _conn(url: str) -> http.client.HTTPConnection:
    parsed = urlparse(url)
    return http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=30)


def _request(url: str, method: str, route: str, body: bytes | None = None, headers: dict | None = None):
    conn = _conn(url)
    try:
        conn.request(method, route, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"{}")
    finally:
        conn.close()


def _auth(job: dict | None = None) -> dict:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    if job is not None:
        headers["X-Edgecompress-Job"] = json.dumps(job)
    return headers


def _job(repeats: int = 5) -> dict:
    """A host job of exactly `repeats` timed runs: no minimum time, and no growing window
    (an unsteady window would otherwise time on past `repeats`)."""
    job = job_for(load_profile("host"), [{"id": "m", "path": "m.onnx"}], memory_cap=True)
    return {**job, "warmup": 1, "repeats": repeats, "min_time_s": 0.0, "max_time_s": 0.0}


def _alive(url: str) -> None:
    assert _request(url, "GET", "/health") == (200, {"status": "ok", "agent": "edgecompress-agent"})


def test_measures_through_the_agent(agent, model: Path) -> None:
    url, _ = agent
    m = measure(model, "host", remote=url, token=TOKEN)
    assert m.mode == "measured-on-device" and m.calibration == "none" and m.latency_scale == 1.0
    assert m.status == "ok" and m.latency_ms > 0 and m.peak_memory_mb is not None
    assert any(url in n for n in m.notes)
    assert measure(model, "host", remote=url, token=TOKEN).cached
    info = AgentClient(url, TOKEN).info()
    assert info["agent"] == "edgecompress-agent" and info["busy"] is False


def test_auth_is_required_and_checked(agent, model: Path) -> None:
    url, _ = agent
    assert _request(url, "GET", "/info")[0] == 401
    assert _request(url, "GET", "/info", headers={"Authorization": "Bearer wrong"})[0] == 401
    assert _request(url, "GET", "/info", headers={"Authorization": TOKEN})[0] == 401  # no scheme
    status, body = _request(url, "POST", "/measure", model.read_bytes(), {"X-Edgecompress-Job": "{}"})
    assert status == 401 and "token" in body["error"]
    with pytest.raises(MeasureError, match="refused the token"):
        measure(model, "host", remote=url, token="x" * 32, use_cache=False)
    _alive(url)


def test_upload_cap(agent) -> None:
    url, _ = agent
    big = b"\0" * (2 << 20)
    status, body = _request(url, "POST", "/measure", big, _auth(_job()))
    assert status == 413 and "limit" in body["error"]
    _alive(url)


def test_invalid_model_and_malformed_requests(agent) -> None:
    url, _ = agent
    status, body = _request(url, "POST", "/measure", b"not an onnx file", _auth(_job()))
    assert status == 400 and body["error"].startswith("invalid ONNX model")
    assert _request(url, "POST", "/measure", b"x", _auth())[1]["error"].startswith("missing X-Edgecompress")
    status, body = _request(url, "POST", "/measure", b"x", {**_auth(), "X-Edgecompress-Job": "{nope"})
    assert status == 400 and "bad job" in body["error"]
    hostile = {**_job(), "repeats": 10**9}
    assert _request(url, "POST", "/measure", b"x", _auth(hostile))[0] == 400
    assert _request(url, "POST", "/measure", b"x", _auth({**_job(), "rm": "-rf"}))[0] == 400
    job = _job()
    job["models"] = [{**job["models"][0], "reference": "/etc/passwd"}]
    status, body = _request(url, "POST", "/measure", b"x", _auth(job))
    assert status == 400 and "no 'reference'" in body["error"]
    assert _request(url, "GET", "/../../etc/passwd")[0] == 404
    assert _request(url, "DELETE", "/measure")[0] == 501
    # No Content-Length, chunked, and a garbage request line, over raw sockets.
    host, port = urlparse(url).hostname, urlparse(url).port
    for raw in (
        b"POST /measure HTTP/1.1\r\nAuthorization: Bearer " + TOKEN.encode() + b"\r\n\r\n",
        b"POST /measure HTTP/1.1\r\nAuthorization: Bearer " + TOKEN.encode()
        + b"\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        b"\x16\x03\x01 garbage \xff\xfe\r\n\r\n",
    ):  # fmt: skip
        with socket.create_connection((host, port), timeout=10) as sock:
            sock.sendall(raw)
            reply = sock.recv(4096)
        assert reply.split(b" ")[1] in (b"400", b"411"), reply[:80]
        assert b"application/json" in reply
    _alive(url)


def test_short_and_slow_uploads(agent, model: Path) -> None:
    url, _ = agent
    host, port = urlparse(url).hostname, urlparse(url).port
    head = (
        f"POST /measure HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
        f"X-Edgecompress-Job: {json.dumps(_job())}\r\nContent-Length: 5000\r\n\r\n"
    ).encode()
    # A body that stops short and a client that trickles: both cut at the deadline.
    slow = socket.create_connection((host, port), timeout=30)
    slow.sendall(head + b"x" * 10)
    stalled = socket.create_connection((host, port), timeout=30)
    stalled.sendall(b"GET /health HTTP/1.1\r\nHo")
    start = time.monotonic()
    _alive(url)  # others are served meanwhile
    profile = load_profile("host")  # on a 0.5 s window: the deadline below is for the slow clients
    window = dataclasses.replace(profile.protocol, min_time_s=0.5, max_time_s=0.5)
    quick = dataclasses.replace(profile, protocol=window)
    m = measure(model, quick, remote=url, token=TOKEN, use_cache=False)
    assert m.status == "ok"
    for sock in (slow, stalled):
        sock.settimeout(REQUEST_TIMEOUT * 5)
        data = b""
        while chunk := sock.recv(4096):
            data += chunk
        sock.close()
        assert not data or data.split(b" ")[1] in (b"400", b"408")
    assert time.monotonic() - start < REQUEST_TIMEOUT * 5
    _alive(url)


def test_one_measurement_at_a_time(agent, model: Path) -> None:
    url, _ = agent
    body = model.read_bytes()
    results: dict[str, tuple[int, dict]] = {}

    def slow_request() -> None:
        results["slow"] = _request(url, "POST", "/measure", body, _auth(_job(repeats=3000)))

    thread = threading.Thread(target=slow_request)
    thread.start()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not AgentClient(url, TOKEN).info()["busy"]:
        time.sleep(0.02)
    status, reply = _request(url, "POST", "/measure", body, _auth(_job()))
    assert status == 503 and "busy" in reply["error"]
    # The client waits its turn instead of failing.
    queued = AgentClient(url, TOKEN).measure_file(model, _job(), timeout_s=60)
    thread.join(60)
    assert results["slow"][0] == 200 and len(results["slow"][1]["results"][0]["samples_ns"]) == 3000
    assert queued["results"][0]["status"] == "ok"
    _alive(url)


def test_batch_upload_as_zip(agent, model: Path, tmp_path: Path) -> None:
    url, _ = agent
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"nope")
    result = AgentClient(url, TOKEN).measure_files([("a", model), ("b", garbage)], _job(), timeout_s=60)
    by_id = {r["id"]: r for r in result["results"]}
    assert by_id["a"]["status"] == "ok" and by_id["b"]["status"] == "invalid-model"
    headers = {**_auth(_job()), "Content-Type": "application/zip"}
    status, body = _request(url, "POST", "/measure", b"PK not a zip", headers)
    assert status == 400 and "zip" in body["error"]
    _alive(url)


def _agent_refusing(token_file: Path) -> subprocess.CompletedProcess:
    """Start the agent with a token file it should refuse; it exits instead of serving."""
    return subprocess.run(
        [sys.executable, "-m", "edgecompress.measure.agent", "--port", "0", "--token-file", str(token_file)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_agent_refuses_a_short_token(tmp_path: Path) -> None:
    token = tmp_path / "token.txt"
    token.write_text("short")
    run = _agent_refusing(token)
    assert run.returncode == 2 and "at least 16" in run.stderr


def test_a_token_file_with_more_than_the_token_is_refused(tmp_path: Path, model: Path) -> None:
    from edgecompress.errors import UsageError
    from edgecompress.measure.remote import read_token

    messy = tmp_path / "notes.txt"
    messy.write_text(TOKEN + "\nsecond line\n")
    with pytest.raises(UsageError, match="the token alone"):
        read_token(messy)
    with pytest.raises(UsageError, match="without spaces"):
        measure(model, "host", remote="http://127.0.0.1:1", token="a b\nc")
    run = _agent_refusing(messy)
    assert run.returncode == 2 and "the token alone" in run.stderr


def test_agent_needs_only_stdlib_numpy_onnxruntime() -> None:
    code = (
        "import sys\n"
        "for name in ('torch', 'onnx', 'yaml', 'click', 'rich', 'sklearn'): sys.modules[name] = None\n"
        "import edgecompress.measure.agent as agent\n"
        "assert agent.runner.validate_job\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
