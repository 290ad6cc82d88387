"""An HTTP endpoint for MinIO / Ceph RGW webhook notification targets, served by uvicorn.

MinIO retries a webhook delivery (and queues it in ``queue_dir`` if configured)
until it gets a 2xx, so the handler answers 200 only after ``submit`` returned;
any failure downstream answers 503 and MinIO delivers again (at-least-once).
A body that is not a notification answers 400: redelivering it cannot help.

Authentication: MinIO's ``auth_token`` setting sends ``Authorization: Bearer
<token>``; the token is compared in constant time.  An empty token is refused at
construction, so the endpoint is never accidentally open.

Why uvicorn and not ``http.server``: the stdlib ``ThreadingHTTPServer`` spends one
thread per *connection*, with no timeout, so 300 idle connections held 306
threads and a client that declared 1000 bytes and sent 10 held its thread for
as long as it liked.  uvicorn keeps every connection on one asyncio event loop
(an idle connection costs a socket, not a thread), and the blocking ``submit``
runs on a bounded pool of ``workers`` threads.  What bounds each client:

* ``header_timeout_s``: a connection that has not sent a complete request line
  and headers (or sends nothing after a response) is closed;
* ``body_timeout_s``: a body that does not arrive in full in time answers 408;
* ``max_body_bytes``: a larger body (declared or streamed in chunks) answers 413;
* ``max_connections``: past this many open connections a request answers 503
  (MinIO retries), so file descriptors and memory stay bounded.

``submit`` runs on the pool threads, so it must be thread-safe (open its own
database session per call, for instance).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import math
import socket
import threading
from collections.abc import Awaitable, Callable, Generator, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from http import HTTPStatus
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from worker.errors import BadEventError
from worker.events import parse_notification
from worker.sources import Submit

logger = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 1 << 20
"""MinIO sends one event per request (a few KiB); 1 MiB leaves ample room."""
DEFAULT_WORKERS = 8
"""Threads running ``submit``; requests beyond them wait on the event loop, not in new threads."""
DEFAULT_HEADER_TIMEOUT_S = 10.0
DEFAULT_BODY_TIMEOUT_S = 10.0
DEFAULT_KEEP_ALIVE_S = 5
DEFAULT_MAX_CONNECTIONS = 1024

HEALTH_PATH = "/health"

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


class _EarlyReplyError(Exception):
    """Raised inside the app to answer early (bad length, oversized or slow body)."""

    def __init__(self, status: HTTPStatus, error: str) -> None:
        super().__init__(error)
        self.status = status
        self.error = error


class _HeaderDeadlineProtocol(H11Protocol):
    """uvicorn's h11 protocol plus a deadline for the request line and headers.

    uvicorn times out idle keep-alive connections only after a response; a connection that never
    completes its first request (or its next one) would stay open forever. ``header_timeout_s`` is set
    on a subclass per server.
    """

    header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S
    _deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        super().connection_lost(exc)

    def _arm_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline = self.loop.call_later(self.header_timeout_s, self._expire)

    def _expire(self) -> None:
        """Close the connection unless a request whose headers arrived is being handled."""
        idle = self.cycle is None or self.cycle.response_complete
        if idle and self.transport is not None and not self.transport.is_closing():
            self.transport.close()


class _Server(uvicorn.Server):
    """A uvicorn server that leaves signal handling to its caller (the ingest CLI's stop event)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


class WebhookServer:
    """The webhook endpoint: bound at construction, served by :meth:`serve_forever` until :meth:`shutdown`.

    The methods mirror ``socketserver`` (``serve_forever``/``shutdown``/``server_close``) so callers can
    run it on a thread the same way.
    """

    def __init__(
        self,
        address: tuple[str, int],
        *,
        token: str,
        submit: Submit,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        workers: int = DEFAULT_WORKERS,
        header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S,
        body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S,
        keep_alive_s: int = DEFAULT_KEEP_ALIVE_S,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
    ) -> None:
        if not token:
            raise ValueError("the webhook needs a non-empty bearer token; refusing to run an open endpoint")
        if workers < 1 or max_body_bytes < 1 or header_timeout_s <= 0 or body_timeout_s <= 0 or max_connections < 1:
            raise ValueError("webhook workers, body limit, timeouts and max_connections must be positive")
        self.expected_authorization = f"Bearer {token}".encode()
        self.submit = submit
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s
        self._socket = socket.create_server(address, backlog=512)
        self.server_address = self._socket.getsockname()
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="webhook-submit")
        protocol = type("WebhookH11Protocol", (_HeaderDeadlineProtocol,), {"header_timeout_s": header_timeout_s})
        config = uvicorn.Config(
            self._app,
            http=protocol,
            ws="none",
            lifespan="off",
            interface="asgi3",
            loop="asyncio",
            log_config=None,
            access_log=False,
            server_header=False,
            proxy_headers=False,
            timeout_keep_alive=keep_alive_s,
            limit_concurrency=max_connections,
            h11_max_incomplete_event_size=64 * 1024,
            timeout_graceful_shutdown=math.ceil(body_timeout_s) + 1,  # a request mid-body gets its 408 first
        )
        self._server = _Server(config)
        self._stopped = threading.Event()

    @property
    def url(self) -> str:
        """Base URL of the bound socket (useful when port 0 picked a free port)."""
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        """Serve on this thread until :meth:`shutdown` (``poll_interval`` is kept for ``socketserver`` callers;
        uvicorn checks for shutdown every 0.1 s)."""
        del poll_interval
        self._stopped.clear()
        try:
            self._server.run(sockets=[self._socket])
        finally:
            self._stopped.set()

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Stop serving and wait (up to ``timeout_s``) until :meth:`serve_forever` has returned."""
        self._server.should_exit = True
        if self._server.started:
            self._stopped.wait(timeout_s)

    def server_close(self) -> None:
        """Close the listening socket and the submit pool."""
        self._socket.close()
        self._pool.shutdown(wait=False, cancel_futures=True)

    # --- the ASGI application -------------------------------------------------------------------

    async def _app(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        method, path = scope["method"], scope["path"]
        if method == "HEAD":
            # MinIO probes the target URL with HEAD to see it is up: 200 on any path.
            await _respond(send, HTTPStatus.OK, b"", content_type=None)
            return
        if method == "GET":
            if path == HEALTH_PATH:
                await _respond_json(send, HTTPStatus.OK, {"status": "ok"})
            else:
                await _respond_json(send, HTTPStatus.NOT_FOUND, {"error": "not found"})
            return
        if method != "POST":
            await _respond_json(send, HTTPStatus.METHOD_NOT_ALLOWED, {"error": "use POST"}, close=True)
            return
        headers = {name.lower(): value for name, value in scope["headers"]}
        if not hmac.compare_digest(headers.get(b"authorization", b"").strip(), self.expected_authorization):
            await _respond_json(
                send, HTTPStatus.UNAUTHORIZED, {"error": "missing or wrong bearer token"}, close=True, bearer=True
            )
            return
        try:
            body = await asyncio.wait_for(self._read_body(headers, receive), timeout=self.body_timeout_s)
        except _EarlyReplyError as reply:
            await _respond_json(send, reply.status, {"error": reply.error}, close=True)
            return
        except TimeoutError:
            logger.info("webhook from %s: body not received within %.1f s", _client(scope), self.body_timeout_s)
            await _respond_json(
                send,
                HTTPStatus.REQUEST_TIMEOUT,
                {"error": f"body not received within {self.body_timeout_s:g} s"},
                close=True,
            )
            return
        if body is None:
            return  # the client went away
        await self._handle_notification(scope, body, send)

    async def _read_body(self, headers: dict[bytes, bytes], receive: Receive) -> bytes | None:
        """The whole body, refusing a missing, invalid or oversized length (also for chunked bodies)."""
        raw_length = headers.get(b"content-length")
        chunked = b"chunked" in headers.get(b"transfer-encoding", b"").lower()
        if raw_length is None and not chunked:
            raise _EarlyReplyError(HTTPStatus.LENGTH_REQUIRED, "Content-Length required")
        if raw_length is not None:
            try:
                length = int(raw_length)
            except ValueError:
                raise _EarlyReplyError(HTTPStatus.BAD_REQUEST, "invalid Content-Length") from None
            if length < 0 or length > self.max_body_bytes:
                raise _EarlyReplyError(
                    HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                    f"body of {length} bytes exceeds the limit of {self.max_body_bytes}",
                )
        chunks: list[bytes] = []
        received = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            received += len(chunk)
            if received > self.max_body_bytes:
                raise _EarlyReplyError(
                    HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body exceeds the limit of {self.max_body_bytes} bytes"
                )
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _handle_notification(self, scope: Scope, body: bytes, send: Send) -> None:
        try:
            events = parse_notification(body)
        except BadEventError as exc:
            logger.warning("webhook from %s: rejected body (%s)", _client(scope), exc)
            await _respond_json(send, HTTPStatus.BAD_REQUEST, {"error": str(exc)})
            return
        if events:
            try:
                await asyncio.get_running_loop().run_in_executor(self._pool, self.submit, events)
            except Exception:
                # Not swallowed: the 503 makes MinIO redeliver, and the traceback is logged here
                # because this is the only place that can see it.
                logger.exception("webhook: submit failed for %d events; answering 503", len(events))
                await _respond_json(send, HTTPStatus.SERVICE_UNAVAILABLE, {"error": "submit failed, retry later"})
                return
        await _respond_json(send, HTTPStatus.OK, {"accepted": len(events)})


def _client(scope: Scope) -> str:
    client = scope.get("client")
    return str(client[0]) if client else "?"


async def _respond_json(
    send: Send, status: HTTPStatus, payload: dict[str, object], *, close: bool = False, bearer: bool = False
) -> None:
    await _respond(send, status, json.dumps(payload).encode(), close=close, bearer=bearer)


async def _respond(
    send: Send,
    status: HTTPStatus,
    body: bytes,
    *,
    content_type: str | None = "application/json",
    close: bool = False,
    bearer: bool = False,
) -> None:
    headers = [(b"content-length", str(len(body)).encode())]
    if content_type:
        headers.append((b"content-type", content_type.encode()))
    if bearer:
        headers.append((b"www-authenticate", b"Bearer"))
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": int(status), "headers": headers})
    await send({"type": "http.response.body", "body": body})


def make_webhook_server(
    host: str,
    port: int,
    token: str,
    submit: Submit,
    *,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    **limits: Any,
) -> WebhookServer:
    """Bind (but do not start) the webhook server; ``port=0`` picks a free port.

    ``limits`` are :class:`WebhookServer`'s ``workers``, ``header_timeout_s``, ``body_timeout_s``,
    ``keep_alive_s`` and ``max_connections``.
    """
    return WebhookServer((host, port), token=token, submit=submit, max_body_bytes=max_body_bytes, **limits)


def serve(
    host: str,
    port: int,
    token: str,
    submit: Submit,
    *,
    stop_event: threading.Event | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    **limits: Any,
) -> None:
    """Serve until ``stop_event`` is set (or forever), then close the socket."""
    server = make_webhook_server(host, port, token, submit, max_body_bytes=max_body_bytes, **limits)
    logger.info("webhook listening on %s", server.url)
    if stop_event is not None:
        watcher = threading.Thread(
            target=lambda: (stop_event.wait(), server.shutdown()), name="webhook-stop", daemon=True
        )
        watcher.start()
    try:
        server.serve_forever(poll_interval=0.5)
    finally:
        server.server_close()
