"""Shared FastAPI plumbing for the inference servers (reward model, critic, initial policy).

* :func:`create_app`: a FastAPI app with bearer-token auth, a request-body size limit, a JSON-only body rule, a
  request read deadline and JSON error responses ``{"error": "<message>"}`` for every failure (a bad request never
  stops the server).
* :func:`run_server`: serve an app with uvicorn on a loopback address unless ``allow_remote`` is set, with the
  connection limits of the app (:class:`ServerLimits`).
* :class:`BackgroundServer`: run an app in a background thread on a free 127.0.0.1 port (tests, benchmarks,
  in-process use); a context manager that yields the base URL and stops cleanly.

Auth: when a token is configured (argument, else the environment variable ``NEMO_ALIGNER_API_TOKEN``), every
request except those to ``public_paths`` (default ``/health``) needs ``Authorization: Bearer <token>``; a missing
or wrong token is answered 401.

Slow and stalled clients (:class:`ServerLimits`, set through :func:`create_app`): the request line and headers must
arrive within ``request_timeout_s`` of the connection opening (or of the previous response on a keep-alive
connection), else the connection is closed; the body must then arrive within ``request_timeout_s`` more, else 408
and the connection is closed; an idle keep-alive connection is closed after ``keep_alive_timeout_s``; beyond
``max_connections`` open connections a request is answered 503 at once (and its connection closed); a request line
or header block over ``max_header_bytes`` is answered 400. Every early error response (401, 408, 413, 415) closes
the connection, so the unread rest of a body can never keep it open. Pipelined requests are answered in order, also
when the client shuts down its sending side after writing them (then the connection closes after the last answer).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from nemo_aligner.errors import CannotListenError
from nemo_aligner.utils.config import ConfigValueError, number

__all__ = [
    "API_TOKEN_ENV",
    "DEFAULT_MAX_REQUEST_BYTES",
    "APIError",
    "BackgroundServer",
    "ServerLimits",
    "add_health_and_info",
    "check_api_token",
    "check_host",
    "check_port",
    "create_app",
    "is_loopback",
    "read_json",
    "resolve_api_token",
    "run_server",
]

API_TOKEN_ENV = "NEMO_ALIGNER_API_TOKEN"
DEFAULT_MAX_REQUEST_BYTES = 64 * 1024 * 1024
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


@dataclass(frozen=True)
class ServerLimits:
    """How long a client may take and how many may be connected (see the module docstring).

    Attributes:
        request_timeout_s: seconds allowed for the request line + headers (from the connection opening or the
            previous response), and again for the whole body (from the end of the headers); > 0.
        keep_alive_timeout_s: seconds an idle keep-alive connection stays open between requests; > 0.
        max_connections: open connections served at once; a request on a connection beyond it is answered 503
            (uvicorn's plain-text "Service Unavailable") and its connection closed; >= 1.
        max_header_bytes: the most bytes of request line + headers (h11's incomplete-event limit); >= 1024.

    Raises:
        ValueError: a value out of range, naming it.
    """

    request_timeout_s: float = 30.0
    keep_alive_timeout_s: float = 5.0
    max_connections: int = 512
    max_header_bytes: int = 16 * 1024

    def __post_init__(self):
        for name in ("request_timeout_s", "keep_alive_timeout_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or value == float("inf"):
                raise ValueError(f"{name} must be a finite number of seconds > 0, got {value!r}")
        for name, low in (("max_connections", 1), ("max_header_bytes", 1024)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


class APIError(HTTPException):
    """Raise in a handler to answer ``status_code`` with ``{"error": message}``."""

    def __init__(self, status_code: int, message: str):
        super().__init__(status_code=status_code, detail=message)


def resolve_api_token(api_token: str | None = None) -> str | None:
    """The token to require: ``api_token`` if non-empty, else ``$NEMO_ALIGNER_API_TOKEN`` if non-empty, else None
    (no auth)."""
    for value in (api_token, os.environ.get(API_TOKEN_ENV)):
        if value is not None and str(value).strip():
            return str(value).strip()
    return None


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an IP literal or ``localhost``) names only this machine (127.0.0.0/8, ::1, localhost).

    ``0.0.0.0``/``::`` (all interfaces) and every other name are not loopback.
    """
    host = str(host).strip().strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _error_body(message: str) -> bytes:
    return json.dumps({"error": message}).encode()


async def _send_error(send, status: int, message: str, headers: Iterable[tuple[bytes, bytes]] = ()) -> None:
    body = _error_body(message)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers],
        }
    )
    await send({"type": "http.response.body", "body": body})


_CLOSE = [(b"connection", b"close")]


def _is_json_media_type(value: bytes | None) -> bool:
    """Whether a Content-Type header names JSON: ``application/json`` or ``application/<x>+json``, any parameters."""
    if value is None:
        return False
    media = value.decode("latin-1").split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


class _GuardMiddleware:
    """Pure-ASGI middleware, in this order: bearer-token check (401); declared body size (413); a body on
    POST/PUT/PATCH must be JSON (415); the body is read, bounded in size (413) and in time (``body_timeout_s`` from
    the end of the headers: 408), then replayed to the app. Every early answer closes the connection."""

    def __init__(self, app, api_token: str | None, max_request_bytes: int, public_paths: tuple[str, ...],
                 body_timeout_s: float = ServerLimits.request_timeout_s):
        self.app = app
        self.api_token = api_token
        self.max_request_bytes = max_request_bytes
        self.public_paths = public_paths
        self.body_timeout_s = float(body_timeout_s)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        deadline = time.monotonic() + self.body_timeout_s
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        if self.api_token is not None and scope.get("path") not in self.public_paths:
            auth = headers.get(b"authorization", b"").decode("latin-1")
            scheme, _, token = auth.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_token.encode()):
                message = "missing bearer token" if not auth else "invalid bearer token"
                return await _send_error(send, 401, message, [(b"www-authenticate", b"Bearer"), *_CLOSE])
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                declared_size = int(declared)
            except ValueError:
                return await _send_error(send, 400, "invalid Content-Length header", _CLOSE)
            if declared_size > self.max_request_bytes:
                return await _send_error(
                    send, 413, f"request body of {declared_size} bytes exceeds the limit of {self.max_request_bytes}",
                    _CLOSE,
                )
        has_body = (declared is not None and declared_size > 0) or b"transfer-encoding" in headers
        if scope.get("method") in _BODY_METHODS and has_body and not _is_json_media_type(headers.get(b"content-type")):
            got = headers.get(b"content-type", b"").decode("latin-1") or "none"
            return await _send_error(
                send, 415, f"unsupported Content-Type {got!r}: send the body as JSON with "
                "'Content-Type: application/json'", _CLOSE,
            )
        # Read the body (bounded in size and time), then replay it to the app: chunked uploads are limited too.
        chunks, size = [], 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), timeout=max(deadline - time.monotonic(), 0.0))
            except asyncio.TimeoutError:
                return await _send_error(
                    send, 408, f"request body not received within {self.body_timeout_s:g} s "
                    f"({size} bytes arrived)", _CLOSE,
                )
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_request_bytes:
                return await _send_error(
                    send, 413, f"request body exceeds the limit of {self.max_request_bytes} bytes", _CLOSE
                )
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


def _validation_message(err: RequestValidationError) -> tuple[int, str]:
    errors = err.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        return 400, "request body is not valid JSON"
    parts = []
    for e in errors[:5]:
        loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
        parts.append(f"{loc}: {e.get('msg')}" if loc else str(e.get("msg")))
    return 422, "; ".join(parts) or "invalid request"


def create_app(
    title: str,
    api_token: str | None = None,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    public_paths: Iterable[str] = ("/health",),
    on_shutdown: Iterable[Callable[[], Any]] = (),
    limits: ServerLimits | None = None,
) -> FastAPI:
    """A FastAPI app with auth, a body size limit, read deadlines and JSON error handlers; add routes to it as usual.

    Args:
        title: shown in the OpenAPI docs.
        api_token: bearer token to require; None/empty falls back to ``$NEMO_ALIGNER_API_TOKEN`` (see
            :func:`resolve_api_token`); neither set = no auth.
        max_request_bytes: larger request bodies are answered 413 before the handler runs.
        public_paths: paths served without a token (default only ``/health``).
        on_shutdown: callables run (in order, errors ignored) when the server shuts down; more can be appended to
            ``app.state.on_shutdown``.
        limits: timeouts and connection limits (default :class:`ServerLimits`); the body deadline is enforced by the
            app itself, the rest by :func:`run_server` / :class:`BackgroundServer`, which read ``app.state.limits``.

    Every error is answered ``{"error": "<message>"}``: 400 malformed or too deeply nested JSON, 401 auth, 404/405
    unknown route or method, 408 body not received in time, 413 too large, 415 a body that is not
    ``application/json``, 422 invalid fields, 500 an unexpected server-side exception (the server keeps serving).

    Raises:
        ValueError: ``max_request_bytes < 1``; ``api_token`` set but empty or only whitespace
            (:func:`check_api_token`).
    """
    if int(max_request_bytes) < 1:
        raise ValueError(f"max_request_bytes must be >= 1, got {max_request_bytes}")
    check_api_token(api_token)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        for callback in app.state.on_shutdown:
            with contextlib.suppress(Exception):
                callback()

    app = FastAPI(title=title, lifespan=lifespan)
    app.state.on_shutdown = list(on_shutdown)
    app.state.api_token = resolve_api_token(api_token)
    app.state.max_request_bytes = int(max_request_bytes)
    app.state.limits = limits if limits is not None else ServerLimits()
    app.add_middleware(
        _GuardMiddleware,
        api_token=app.state.api_token,
        max_request_bytes=int(max_request_bytes),
        public_paths=tuple(public_paths),
        body_timeout_s=app.state.limits.request_timeout_s,
    )

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        message = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        return JSONResponse({"error": message}, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        status, message = _validation_message(exc)
        return JSONResponse({"error": message}, status_code=status)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        return JSONResponse({"error": f"internal server error: {type(exc).__name__}: {exc}"}, status_code=500)

    return app


def add_health_and_info(app: FastAPI, info: Callable[[], dict]) -> None:
    """Add the routes every server has: ``GET /health`` -> ``{"status": "ok"}`` (public by default, see
    :func:`create_app`) and ``GET /info`` -> ``info()`` (what the server serves and how it batches)."""

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/info")
    async def info_route() -> dict:
        return info()


async def read_json(request: Request) -> Any:
    """The request body parsed as JSON.

    Raises:
        APIError: 400 when the body is empty, not valid JSON (UTF-8), or nested too deeply for the parser (Python's
            recursion limit, about 1000 levels).
    """
    body = await request.body()
    if not body.strip():
        raise APIError(400, "request body is empty; send a JSON object")
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise APIError(400, f"request body is not valid JSON: {err}") from None
    except RecursionError:
        raise APIError(400, "request body is not valid JSON: arrays/objects nested too deeply") from None


def check_host(host: str, allow_remote: bool) -> None:
    """Refuse a non-loopback ``host`` unless ``allow_remote``.

    Raises:
        ValueError: ``host`` is not loopback (see :func:`is_loopback`) and ``allow_remote`` is false.
    """
    if not allow_remote and not is_loopback(host):
        raise ConfigValueError(
            f"refusing to listen on non-loopback host {host!r}: the server would be reachable from other machines; "
            "pass allow_remote=True (inference.allow_remote=true) to do so deliberately, ideally with an api_token"
        )


def check_port(port: Any, key: str = "port") -> int:
    """``port`` as an int, if it is a TCP port number (0 = any free port, up to 65535).

    Raises:
        ConfigValueError: anything else, one line naming ``key`` (e.g. ``inference.port``) and the range.
    """
    return number(int, 0, 65535)(port, key)


def check_api_token(api_token: Any, key: str = "api_token") -> None:
    """Refuse a token that is set but empty or only whitespace: it cannot be sent as ``Authorization: Bearer
    <token>``, and :func:`resolve_api_token` would silently fall back to ``$NEMO_ALIGNER_API_TOKEN`` or no auth.
    None (not set) is fine.

    Raises:
        ConfigValueError: one line naming ``key`` (e.g. ``inference.api_token``).
    """
    if api_token is not None and not str(api_token).strip():
        raise ConfigValueError(
            f"{key}={api_token!r}: expected a non-empty token, or null (${API_TOKEN_ENV} if set, else no auth); "
            "an empty or whitespace-only token cannot be sent as a bearer token"
        )


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), int(port)))
    except OSError as err:
        sock.close()
        raise CannotListenError(f"cannot listen on {host}:{port}: {err.strerror or err}") from err
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _url(host: str, port: int) -> str:
    host = host.strip("[]")
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _header_deadline_protocol(request_timeout_s: float):
    """uvicorn's h11 protocol, plus a deadline for the request line and headers, and answers for a client that
    half-closes.

    uvicorn itself only times out a keep-alive connection that receives no bytes at all; a client that connects and
    sends nothing before its first request, or sends half a header and stops, would hold the connection forever.
    Here a timer closes the connection unless a complete request head arrives within ``request_timeout_s`` of the
    connection opening or of the previous response (the body's own deadline is :class:`_GuardMiddleware`'s).

    Half-close: a client may write its requests (pipelined or not), then shut down its sending side (``nc -N``,
    ``ncat``, ``sock.shutdown(SHUT_WR)``) and read. uvicorn closes the whole connection on that EOF, so the request
    in flight and the pipelined ones behind it were dropped without an answer. Here, when the EOF comes after a
    complete request, every complete request already received is answered in order and the connection is closed
    after the last answer; an EOF with nothing to answer (idle, or in the middle of a request) closes it at once,
    as before.
    """
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class _Protocol(H11Protocol):
        _head_timer = None
        _peer_closed = False  # the client shut down its sending side after a complete request

        def _arm_head_timer(self) -> None:
            self._disarm_head_timer()
            self._head_timer = self.loop.call_later(request_timeout_s, self._head_timeout)

        def _disarm_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timeout(self) -> None:
            self._head_timer = None
            if (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing():
                self.transport.close()

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm_head_timer()

        def connection_lost(self, exc) -> None:
            self._disarm_head_timer()
            super().connection_lost(exc)

        def handle_events(self) -> None:
            super().handle_events()
            if self.cycle is not None and not self.cycle.response_complete:  # a request head arrived
                self._disarm_head_timer()

        def eof_received(self) -> bool | None:
            if self._peer_closed:  # asyncio reports the EOF again when reading resumes
                return True
            if self.cycle is not None and not self.cycle.response_complete and self.conn.their_state is h11.DONE:
                self._peer_closed = True  # answer it (and the complete requests behind it), then close
                return True  # keep the transport open for writing
            return super().eof_received()  # nothing to answer: the transport closes

        def on_response_complete(self) -> None:
            super().on_response_complete()  # starts the next pipelined request, if a complete one is buffered
            if self._peer_closed and not self.transport.is_closing():
                answering = self.cycle is not None and not self.cycle.response_complete
                if not answering or self.conn.their_state is not h11.DONE:  # nothing more can arrive
                    self.transport.close()
            if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
                self._arm_head_timer()

    return _Protocol


def _uvicorn_server(app, log_level: str, on_ready: Callable[[], None] | None = None):
    import uvicorn

    class _Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets=sockets)
            if self.started and on_ready is not None:
                on_ready()

    limits = getattr(getattr(app, "state", None), "limits", None) or ServerLimits()
    config = uvicorn.Config(
        app, log_level=log_level, access_log=False, lifespan="on", timeout_graceful_shutdown=5,
        http=_header_deadline_protocol(limits.request_timeout_s),
        timeout_keep_alive=limits.keep_alive_timeout_s,
        # uvicorn answers 503 once len(connections) >= limit_concurrency, counting the new connection itself
        limit_concurrency=limits.max_connections + 1,
        h11_max_incomplete_event_size=limits.max_header_bytes,
    )
    return _Server(config)


def run_server(
    app,
    host: str = "127.0.0.1",
    port: int = 5555,
    allow_remote: bool = False,
    log_level: str = "warning",
    on_ready: Callable[[str], None] | None = None,
) -> None:
    """Serve ``app`` with uvicorn until interrupted (Ctrl-C / SIGTERM, then a graceful shutdown). Blocks.

    Args:
        host: address to listen on; a non-loopback one (e.g. ``0.0.0.0``) needs ``allow_remote=True``.
        port: TCP port (0 = any free port).
        allow_remote: allow listening on a non-loopback address.
        log_level: uvicorn's log level.
        on_ready: called with the base URL (e.g. ``http://127.0.0.1:5555``) once the server accepts requests.

    Raises:
        ValueError: a non-loopback ``host`` without ``allow_remote``; a ``port`` outside 0..65535.
        OSError: the address cannot be bound (e.g. the port is in use), naming it.
    """
    check_host(host, allow_remote)
    port = check_port(port)
    sock = _bind(host, port)
    url = _url(host, sock.getsockname()[1])
    server = _uvicorn_server(app, log_level, (lambda: on_ready(url)) if on_ready else None)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C after a graceful shutdown: not an error here
        pass
    finally:
        sock.close()


class BackgroundServer:
    """Serve an app in a daemon thread on a free loopback port; ``with BackgroundServer(app) as url: ...``.

    Args:
        app: an ASGI app.
        host: a loopback address (default 127.0.0.1); other addresses are refused.
        port: 0 (default) picks a free port.
        startup_timeout: seconds to wait for the server to accept requests.

    Attributes:
        url: the base URL, e.g. ``http://127.0.0.1:40123`` (set by :meth:`start`).

    Raises:
        ValueError: a non-loopback ``host``, a ``port`` outside 0..65535; RuntimeError: the server did not start
            within ``startup_timeout``.
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, startup_timeout: float = 20.0,
                 log_level: str = "warning"):
        check_host(host, allow_remote=False)
        self.app, self.host, self.port = app, host, check_port(port)
        self.startup_timeout = startup_timeout
        self.log_level = log_level
        self.url: str | None = None
        self._server = None
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None

    def start(self) -> str:
        """Start serving; returns the base URL."""
        self._sock = _bind(self.host, self.port)
        self.url = _url(self.host, self._sock.getsockname()[1])
        self._server = _uvicorn_server(self.app, self.log_level)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._sock]}, name="uvicorn-background", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + self.startup_timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"server at {self.url} did not start within {self.startup_timeout} s")
            time.sleep(0.01)
        return self.url

    def stop(self, timeout: float = 10.0) -> None:
        """Ask the server to exit and wait up to ``timeout`` seconds for the thread. Idempotent."""
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
