"""An HTTP endpoint for MinIO / Ceph RGW webhook notification targets, stdlib only.

MinIO retries a webhook delivery (and queues it in ``queue_dir`` if configured)
until it gets a 2xx, so the handler answers 200 only after ``submit`` returned;
any failure downstream answers 503 and MinIO delivers again (at-least-once).
A body that is not a notification answers 400: redelivering it cannot help.

Authentication: MinIO's ``auth_token`` setting sends ``Authorization: Bearer
<token>``; the token is compared in constant time.  An empty token is refused at
construction, so the endpoint is never accidentally open.

Requests are handled on one thread each, so ``submit`` must be thread-safe (open
its own database session per call, for instance).
"""

from __future__ import annotations

import hmac
import json
import logging
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from worker.errors import BadEventError
from worker.events import parse_notification
from worker.sources import Submit

logger = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 1 << 20
"""MinIO sends one event per request (a few KiB); 1 MiB leaves ample room."""

HEALTH_PATH = "/health"


class WebhookServer(ThreadingHTTPServer):
    """A threading HTTP server that carries the token, the callback and the body limit."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self,
        address: tuple[str, int],
        *,
        token: str,
        submit: Submit,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    ) -> None:
        if not token:
            raise ValueError("the webhook needs a non-empty bearer token; refusing to run an open endpoint")
        self.expected_authorization = f"Bearer {token}".encode()
        self.submit = submit
        self.max_body_bytes = max_body_bytes
        super().__init__(address, WebhookHandler)

    @property
    def url(self) -> str:
        """Base URL of the bound socket (useful when port 0 picked a free port)."""
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


class WebhookHandler(BaseHTTPRequestHandler):
    """Handles one request: health checks, and authenticated notification POSTs."""

    server: WebhookServer
    protocol_version = "HTTP/1.1"
    server_version = "waferwatch-webhook"

    def do_GET(self) -> None:
        """``GET /health`` answers 200 for load balancers and compose health checks."""
        if self.path.split("?", 1)[0] == HEALTH_PATH:
            self._reply(HTTPStatus.OK, {"status": "ok"})
        else:
            self._reply(HTTPStatus.NOT_FOUND, {"error": "not found"})

    def do_HEAD(self) -> None:
        """HEAD on any path answers 200: MinIO probes the target URL with HEAD to see it is up."""
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_POST(self) -> None:
        """Authenticate, read a bounded body, parse it, submit, and only then answer 200."""
        if not self._authorized():
            self.close_connection = True
            self._reply(HTTPStatus.UNAUTHORIZED, {"error": "missing or wrong bearer token"}, bearer=True)
            return
        body = self._read_body()
        if body is None:
            return
        try:
            events = parse_notification(body)
        except BadEventError as exc:
            logger.warning("webhook from %s: rejected body (%s)", self.client_address[0], exc)
            self._reply(HTTPStatus.BAD_REQUEST, {"error": str(exc)})
            return
        if events:
            try:
                self.server.submit(events)
            except Exception:
                # Not swallowed: the 503 makes MinIO redeliver, and the traceback is logged here
                # because this thread is the only place that can see it.
                logger.exception("webhook: submit failed for %d events; answering 503", len(events))
                self._reply(HTTPStatus.SERVICE_UNAVAILABLE, {"error": "submit failed, retry later"})
                return
        self._reply(HTTPStatus.OK, {"accepted": len(events)})

    def log_message(self, format: str, *args: object) -> None:
        """Route the stdlib access log to ``logging`` instead of stderr."""
        logger.debug("%s - " + format, self.client_address[0], *args)

    def _authorized(self) -> bool:
        supplied = (self.headers.get("Authorization") or "").strip().encode()
        return hmac.compare_digest(supplied, self.server.expected_authorization)

    def _read_body(self) -> bytes | None:
        """Read exactly Content-Length bytes, refusing missing lengths and oversized bodies."""
        raw_length = self.headers.get("Content-Length")
        if raw_length is None:
            self.close_connection = True
            self._reply(HTTPStatus.LENGTH_REQUIRED, {"error": "Content-Length required"})
            return None
        try:
            length = int(raw_length)
        except ValueError:
            self.close_connection = True
            self._reply(HTTPStatus.BAD_REQUEST, {"error": "invalid Content-Length"})
            return None
        if length < 0 or length > self.server.max_body_bytes:
            self.close_connection = True
            self._reply(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                {"error": f"body of {length} bytes exceeds the limit of {self.server.max_body_bytes}"},
            )
            return None
        return self.rfile.read(length)

    def _reply(self, status: HTTPStatus, payload: dict[str, object], *, bearer: bool = False) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if bearer:
            self.send_header("WWW-Authenticate", "Bearer")
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)


def make_webhook_server(
    host: str,
    port: int,
    token: str,
    submit: Submit,
    *,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
) -> WebhookServer:
    """Bind (but do not start) the webhook server; ``port=0`` picks a free port."""
    return WebhookServer((host, port), token=token, submit=submit, max_body_bytes=max_body_bytes)


def serve(
    host: str,
    port: int,
    token: str,
    submit: Submit,
    *,
    stop_event: threading.Event | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
) -> None:
    """Serve until ``stop_event`` is set (or forever), then close the socket."""
    server = make_webhook_server(host, port, token, submit, max_body_bytes=max_body_bytes)
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
