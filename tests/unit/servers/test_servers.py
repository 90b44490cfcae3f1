"""Server plumbing: DynamicBatcher, the shared FastAPI app (auth, errors, size limit, loopback bind) and HTTPClient.

Every server here listens on 127.0.0.1 only; every request loop is bounded.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from nemo_aligner.servers.app import (
    API_TOKEN_ENV,
    APIError,
    BackgroundServer,
    create_app,
    is_loopback,
    read_json,
    resolve_api_token,
    run_server,
)
from nemo_aligner.servers.batching import BatcherClosedError, DynamicBatcher
from nemo_aligner.servers.client import HTTPClient, ServerRequestError


# ---- DynamicBatcher ------------------------------------------------------------------------------------------------
class Recorder:
    """A ``process`` that doubles numbers, records every micro-batch and the thread it ran in."""

    def __init__(self, delay: float = 0.0, fail_on=None):
        self.batches: list[list] = []
        self.threads: set[int] = set()
        self.delay = delay
        self.fail_on = fail_on
        self.lock = threading.Lock()

    def __call__(self, items):
        with self.lock:
            self.batches.append(list(items))
            self.threads.add(threading.get_ident())
        if self.delay:
            time.sleep(self.delay)
        if self.fail_on is not None and self.fail_on in items:
            raise RuntimeError(f"boom on {self.fail_on}")
        return [2 * x for x in items]


def _gather(batcher, requests):
    async def main():
        return await asyncio.gather(*(batcher.submit(r) for r in requests), return_exceptions=True)

    return asyncio.run(main())


def test_batcher_groups_concurrent_requests_and_returns_each_its_own_results():
    proc = Recorder(delay=0.01)
    batcher = DynamicBatcher(proc, micro_batch_size=4, max_wait_ms=50)
    requests = [[10 * r + k for k in range(r % 3 + 1)] for r in range(12)]  # 1..3 items each, 24 items
    try:
        results = _gather(batcher, requests)
    finally:
        batcher.close()
    assert results == [[2 * x for x in r] for r in requests]
    assert all(1 <= len(b) <= 4 for b in proc.batches)
    assert sorted(x for b in proc.batches for x in b) == sorted(x for r in requests for x in r)
    assert len(proc.batches) < len(requests)  # requests really were gathered
    assert len(proc.batches) >= 24 // 4
    assert len(proc.threads) == 1  # one worker thread only
    stats = batcher.stats()
    assert stats["items"] == 24 and stats["requests"] == 12 and stats["micro_batches"] == len(proc.batches)
    assert stats["max_micro_batch"] == 4 and stats["failed_micro_batches"] == 0


def test_batcher_splits_a_large_request_and_keeps_its_order():
    proc = Recorder()
    batcher = DynamicBatcher(proc, micro_batch_size=3, max_wait_ms=0)
    try:
        assert batcher.submit_sync(list(range(10)), timeout=10) == [2 * x for x in range(10)]
        assert batcher.submit_sync([], timeout=10) == []
    finally:
        batcher.close()
    assert [len(b) for b in proc.batches] == [3, 3, 3, 1]


def test_batcher_waits_at_most_max_wait_ms_for_a_lone_request():
    proc = Recorder()
    batcher = DynamicBatcher(proc, micro_batch_size=64, max_wait_ms=30)
    try:
        start = time.perf_counter()
        assert batcher.submit_sync([1], timeout=10) == [2]
        elapsed = time.perf_counter() - start
    finally:
        batcher.close()
    assert 0.025 <= elapsed < 1.0


def test_batcher_exception_fails_only_its_micro_batch():
    proc = Recorder(delay=0.05, fail_on=13)
    batcher = DynamicBatcher(proc, micro_batch_size=2, max_wait_ms=0)
    try:
        # The worker is busy with [1, 2] while the others queue; then micro-batches are [11, 12], [13, 14], [21, 22]
        async def main():
            first = asyncio.ensure_future(batcher.submit([1, 2]))
            await asyncio.sleep(0.02)
            rest = [batcher.submit(r) for r in ([11, 12], [13, 14], [21, 22])]
            return await asyncio.gather(first, *rest, return_exceptions=True)

        results = asyncio.run(main())
        assert results[0] == [2, 4] and results[1] == [22, 24] and results[3] == [42, 44]
        assert isinstance(results[2], RuntimeError) and "boom on 13" in str(results[2])
        assert batcher.submit_sync([5], timeout=10) == [10]  # the worker survived
        assert batcher.stats()["failed_micro_batches"] == 1
    finally:
        batcher.close()


def test_batcher_exception_shared_by_requests_in_the_same_micro_batch():
    proc = Recorder(delay=0.05, fail_on=7)
    batcher = DynamicBatcher(proc, micro_batch_size=4, max_wait_ms=0)
    try:
        async def main():
            first = asyncio.ensure_future(batcher.submit([0]))
            await asyncio.sleep(0.02)
            rest = [batcher.submit(r) for r in ([6], [7], [8], [9], [100])]  # [6, 7, 8, 9] fail, [100] does not
            return await asyncio.gather(first, *rest, return_exceptions=True)

        results = asyncio.run(main())
    finally:
        batcher.close()
    assert results[0] == [0] and results[5] == [200]
    assert all(isinstance(r, RuntimeError) for r in results[1:5])


def test_batcher_wrong_result_count_is_an_error_and_close_rejects_new_work():
    batcher = DynamicBatcher(lambda items: items[:-1], micro_batch_size=4, max_wait_ms=0)
    with pytest.raises(ValueError, match="returned 1 results for a micro-batch of 2"):
        batcher.submit_sync([1, 2], timeout=10)
    batcher.close()
    batcher.close()  # idempotent
    with pytest.raises(BatcherClosedError):
        batcher.submit_sync([1])


def test_batcher_argument_checks():
    with pytest.raises(ValueError, match="micro_batch_size"):
        DynamicBatcher(lambda x: x, micro_batch_size=0, max_wait_ms=1)
    with pytest.raises(ValueError, match="max_wait_ms"):
        DynamicBatcher(lambda x: x, micro_batch_size=1, max_wait_ms=-1)


# ---- app plumbing ---------------------------------------------------------------------------------------------------
def _echo_app(**kwargs):
    app = create_app("test", **kwargs)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.post("/echo")
    async def echo(request: __import__("fastapi").Request):
        body = await read_json(request)
        if not isinstance(body, dict) or "x" not in body:
            raise APIError(422, "field 'x' is required")
        return {"x": body["x"]}

    @app.post("/crash")
    async def crash():
        raise RuntimeError("internal kaboom")

    return app


def test_auth_and_error_handlers(monkeypatch):
    monkeypatch.delenv(API_TOKEN_ENV, raising=False)
    client = TestClient(_echo_app(api_token="s3cret"), raise_server_exceptions=False)
    good = {"Authorization": "Bearer s3cret"}
    assert client.get("/health").json() == {"status": "ok"}  # /health is public
    r = client.post("/echo", json={"x": 1})
    assert r.status_code == 401 and r.json()["error"] == "missing bearer token"
    r = client.post("/echo", json={"x": 1}, headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401 and r.json()["error"] == "invalid bearer token"
    r = client.post("/echo", json={"x": 1}, headers={"Authorization": "Basic s3cret"})
    assert r.status_code == 401
    assert client.post("/echo", json={"x": 1}, headers=good).json() == {"x": 1}
    r = client.post("/echo", content=b"{not json", headers={**good, "Content-Type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]
    r = client.post("/echo", json={"y": 1}, headers=good)
    assert r.status_code == 422 and r.json()["error"] == "field 'x' is required"
    r = client.get("/nowhere", headers=good)
    assert r.status_code == 404 and "error" in r.json()
    r = client.post("/crash", headers=good)
    assert r.status_code == 500 and "internal kaboom" in r.json()["error"]
    assert client.post("/echo", json={"x": 2}, headers=good).json() == {"x": 2}  # still serving


def test_token_from_environment(monkeypatch):
    monkeypatch.setenv(API_TOKEN_ENV, "from-env")
    assert resolve_api_token(None) == "from-env"
    assert resolve_api_token("explicit") == "explicit"
    client = TestClient(_echo_app())
    assert client.post("/echo", json={"x": 1}).status_code == 401
    assert client.post("/echo", json={"x": 1}, headers={"Authorization": "Bearer from-env"}).status_code == 200
    monkeypatch.setenv(API_TOKEN_ENV, "")
    assert resolve_api_token(None) is None
    assert TestClient(_echo_app()).post("/echo", json={"x": 1}).status_code == 200  # no token: open


def test_blank_api_token_is_refused(monkeypatch):
    """A token that is set but empty or whitespace cannot be sent as a bearer token; before, create_app fell back to
    $NEMO_ALIGNER_API_TOKEN or to no auth at all."""
    monkeypatch.delenv(API_TOKEN_ENV, raising=False)
    for token in (" ", "", "\t\n"):
        with pytest.raises(ValueError, match=r"^api_token=.*: expected a non-empty token"):
            _echo_app(api_token=token)
    client = TestClient(_echo_app(api_token=" tok "))  # surrounding whitespace is trimmed, as before
    assert client.post("/echo", json={"x": 1}).status_code == 401
    assert client.post("/echo", json={"x": 1}, headers={"Authorization": "Bearer tok"}).status_code == 200


def test_request_size_limit(monkeypatch):
    monkeypatch.delenv(API_TOKEN_ENV, raising=False)
    client = TestClient(_echo_app(max_request_bytes=100))
    r = client.post("/echo", json={"x": "a" * 200})
    assert r.status_code == 413 and "exceeds the limit of 100" in r.json()["error"]

    def chunks():  # no Content-Length: the streamed body is counted
        for _ in range(10):
            yield b"x" * 20

    r = client.post("/echo", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413
    assert client.post("/echo", json={"x": "small"}).json() == {"x": "small"}


def test_is_loopback():
    for host in ("127.0.0.1", "127.1.2.3", "localhost", "::1", "[::1]"):
        assert is_loopback(host), host
    for host in ("0.0.0.0", "::", "10.0.0.1", "192.168.1.5", "example.com", ""):
        assert not is_loopback(host), host


def test_non_loopback_bind_is_refused_without_allow_remote():
    app = _echo_app()
    for host in ("0.0.0.0", "10.1.2.3"):
        with pytest.raises(ValueError, match="allow_remote"):
            run_server(app, host=host, port=0)
    with pytest.raises(ValueError, match="non-loopback"):
        BackgroundServer(app, host="0.0.0.0")


def test_port_outside_the_tcp_range_is_refused_before_binding():
    for port in (70000, -1):
        with pytest.raises(ValueError, match=rf"^port={port}: expected an integer >= 0 and <= 65535$"):
            run_server(_echo_app(), host="127.0.0.1", port=port)
        with pytest.raises(ValueError, match=rf"^port={port}: expected an integer >= 0 and <= 65535$"):
            BackgroundServer(_echo_app(), port=port)


def test_run_server_reports_a_busy_port():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        with pytest.raises(OSError, match=f"127.0.0.1:{port}"):
            run_server(_echo_app(), host="127.0.0.1", port=port)


# ---- real socket + HTTPClient ---------------------------------------------------------------------------------------
def test_http_client_over_a_real_socket(monkeypatch):
    monkeypatch.delenv(API_TOKEN_ENV, raising=False)
    with BackgroundServer(_echo_app(api_token="tok")) as url:
        assert url.startswith("http://127.0.0.1:")
        with HTTPClient(url, api_token="tok", timeout=10) as client:
            assert client.get("/health") == {"status": "ok"}
            assert client.post("/echo", {"x": [1, 2]}) == {"x": [1, 2]}
            with pytest.raises(ServerRequestError) as err:
                client.post("/echo", {"y": 1})
            assert err.value.status_code == 422 and err.value.message == "field 'x' is required"
        with pytest.raises(ServerRequestError) as err:
            HTTPClient(url, timeout=10).post("/echo", {"x": 1})  # no token
        assert err.value.status_code == 401 and API_TOKEN_ENV in str(err.value)
        # 5xx: retried, then raised with the server's message
        client = HTTPClient(url, api_token="tok", timeout=10, max_retries=2, backoff=0.01)
        start = time.perf_counter()
        with pytest.raises(ServerRequestError, match="internal kaboom") as err:
            client.post("/crash", {})
        assert err.value.status_code == 500
        assert time.perf_counter() - start >= 0.01 + 0.02
    # the server has stopped: the port no longer answers
    with pytest.raises(ConnectionError):
        HTTPClient(url, max_retries=0, timeout=2).get("/health")


def test_http_client_retries_then_raises_connection_error_naming_the_url():
    with socket.socket() as s:  # a free loopback port with nobody listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    attempts = []
    transport = httpx.HTTPTransport()

    class Counting(httpx.BaseTransport):
        def handle_request(self, request):
            attempts.append(time.perf_counter())
            return transport.handle_request(request)

    client = HTTPClient(url, max_retries=3, backoff=0.02, timeout=2)
    client._client = httpx.Client(base_url=url, transport=Counting(), timeout=2)
    with pytest.raises(ConnectionError, match=f"127.0.0.1:{port}/health after 4 attempt"):
        client.get("/health")
    assert len(attempts) == 4
    gaps = [b - a for a, b in zip(attempts, attempts[1:])]
    assert gaps[0] >= 0.02 and gaps[1] >= 0.04 and gaps[2] >= 0.08  # exponential backoff


def test_http_client_argument_checks():
    with pytest.raises(ValueError):
        HTTPClient("")
    with pytest.raises(ValueError):
        HTTPClient("http://127.0.0.1:1", max_retries=-1)


# ---- slow / stalled / hostile clients (issue 10 item 16) -----------------------------------------------------------
def _read_until_closed(sock: socket.socket, limit_s: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and the seconds that took; raises
    ``socket.timeout`` if it is still open after ``limit_s``."""
    sock.settimeout(limit_s)
    start, data = time.monotonic(), b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return data, time.monotonic() - start
        data += chunk


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


_STALLED_HEAD = (b"POST /echo HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 1000\r\n\r\n")


def test_stalled_uploads_are_answered_408_and_closed_after_the_body_timeout(monkeypatch):
    from nemo_aligner.servers.app import ServerLimits

    monkeypatch.delenv(API_TOKEN_ENV, raising=False)
    with BackgroundServer(_echo_app(limits=ServerLimits(request_timeout_s=0.5))) as url:
        socks = [socket.create_connection(("127.0.0.1", _port(url)), timeout=5) for _ in range(50)]
        try:
            start = time.monotonic()
            for s in socks:  # headers and part of the body, then nothing
                s.sendall(_STALLED_HEAD + b'{"x": "abc')
            answers = [_read_until_closed(s, 5.0)[0] for s in socks]
            elapsed = time.monotonic() - start
        finally:
            for s in socks:
                s.close()
        assert all(a.startswith(b"HTTP/1.1 408") for a in answers), answers[0]
        assert b"request body not received within 0.5 s (10 bytes arrived)" in answers[0]
        assert elapsed < 4.0  # all 50 closed about 0.5 s after they stalled
        with HTTPClient(url, timeout=5, max_retries=0) as client:
            assert client.post("/echo", {"x": 1}) == {"x": 1}  # still serving


def test_stalled_request_head_and_silent_connections_are_closed(monkeypatch):
    from nemo_aligner.servers.app import ServerLimits

    monkeypatch.delenv(API_TOKEN_ENV, raising=False)
    with BackgroundServer(_echo_app(limits=ServerLimits(request_timeout_s=0.5, keep_alive_timeout_s=0.5))) as url:
        port = _port(url)
        with socket.create_connection(("127.0.0.1", port), timeout=5) as silent, \
                socket.create_connection(("127.0.0.1", port), timeout=5) as half, \
                socket.create_connection(("127.0.0.1", port), timeout=5) as kept:
            half.sendall(b"POST /echo HTTP/1.1\r\nHost: 127.")  # half a request head, then nothing
            kept.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\nGET /hea")  # a request, then half one
            for s in (silent, half):
                data, seconds = _read_until_closed(s, 5.0)
                assert data == b"" and seconds < 3.0
            data, seconds = _read_until_closed(kept, 5.0)
            assert data.startswith(b"HTTP/1.1 200") and b'{"status":"ok"}' in data and seconds < 3.0


def test_connections_beyond_the_limit_get_503_until_some_close(monkeypatch):
    from nemo_aligner.servers.app import ServerLimits

    monkeypatch.delenv(API_TOKEN_ENV, raising=False)
    with BackgroundServer(_echo_app(limits=ServerLimits(request_timeout_s=30, max_connections=3))) as url:
        idle = [socket.create_connection(("127.0.0.1", _port(url)), timeout=5) for _ in range(3)]
        try:
            statuses = []
            for _ in range(50):  # bounded: the server registers the idle connections within a few event-loop turns
                statuses.append(httpx.get(url + "/health", timeout=5).status_code)
                if statuses[-1] == 503:
                    break
                time.sleep(0.02)
            assert statuses[-1] == 503, statuses
        finally:
            for s in idle:
                s.close()
        for _ in range(100):  # once they are gone, requests are served again
            status = httpx.get(url + "/health", timeout=5).status_code
            if status == 200:
                break
            time.sleep(0.02)
        assert status == 200


def test_deeply_nested_json_is_400_and_a_non_json_body_is_415(monkeypatch):
    monkeypatch.delenv(API_TOKEN_ENV, raising=False)
    client = TestClient(_echo_app(), raise_server_exceptions=False)
    json_header = {"Content-Type": "application/json"}
    r = client.post("/echo", content=b"[" * 100_000 + b"]" * 100_000, headers=json_header)
    assert r.status_code == 400 and "nested too deeply" in r.json()["error"]
    r = client.post("/echo", content=b'{"x": ' * 5000 + b"1" + b"}" * 5000, headers=json_header)
    assert r.status_code == 400 and "nested too deeply" in r.json()["error"]
    for content_type in ("text/plain", "application/x-www-form-urlencoded", None):
        headers = {"Content-Type": content_type} if content_type else {}
        r = client.post("/echo", content=b'{"x": 1}', headers=headers)
        assert r.status_code == 415, (content_type, r.text)
        assert "application/json" in r.json()["error"] and repr(content_type or "none") in r.json()["error"]
    for content_type in ("application/json; charset=utf-8", "application/merge-patch+json"):
        r = client.post("/echo", content=b'{"x": 1}', headers={"Content-Type": content_type})
        assert r.status_code == 200 and r.json() == {"x": 1}


def test_server_limits_argument_checks():
    from nemo_aligner.servers.app import ServerLimits

    for kwargs, name in (({"request_timeout_s": 0}, "request_timeout_s"), ({"keep_alive_timeout_s": -1}, "keep_alive"),
                         ({"max_connections": 0}, "max_connections"), ({"max_connections": 2.5}, "max_connections"),
                         ({"request_timeout_s": float("inf")}, "request_timeout_s"),
                         ({"max_header_bytes": 10}, "max_header_bytes")):
        with pytest.raises(ValueError, match=name):
            ServerLimits(**kwargs)
