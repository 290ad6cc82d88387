"""Row 11 of the fault suite: the webhook survives idle, slow and oversized clients.

Before the fix the stdlib ``ThreadingHTTPServer`` spent one thread per connection with no socket timeout:
300 idle connections held 306 threads, and a client that declared 1000 bytes and sent 10 held its thread
for as long as it stayed connected. Now uvicorn keeps connections on one event loop, ``submit`` runs on a
bounded pool, and header/body deadlines and a body limit cut bad clients off. Real sockets, a real server
on a free port; the submit callback records what it got.
"""

from __future__ import annotations

import json
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import pytest

from worker.events import ObjectEvent
from worker.sources.webhook import WebhookServer, make_webhook_server

TOKEN = "s3cret"
BODY = json.dumps(
    {
        "EventName": "s3:ObjectCreated:Put",
        "Key": "wafers/lot1/a.png",
        "Records": [
            {
                "eventVersion": "2.0",
                "eventSource": "minio:s3",
                "eventTime": "2026-12-01T08:15:30.123Z",
                "eventName": "s3:ObjectCreated:Put",
                "s3": {"bucket": {"name": "wafers"}, "object": {"key": "lot1/a.png", "size": 12, "eTag": "0123abcd"}},
            }
        ],
    }
).encode()


class Recorder:
    """A thread-safe submit callback that records the keys it was given."""

    def __init__(self) -> None:
        self.keys: list[str] = []
        self._lock = threading.Lock()

    def __call__(self, events: list[ObjectEvent]) -> None:
        with self._lock:
            self.keys.extend(event.key for event in events)


@contextmanager
def _serve(server: WebhookServer) -> Iterator[WebhookServer]:
    thread = threading.Thread(target=server.serve_forever, name="webhook-under-test", daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=30)
        assert not thread.is_alive(), "the webhook did not stop"


def _post(server: WebhookServer, body: bytes = BODY) -> int:
    request = urllib.request.Request(
        server.url + "/minio", data=body, headers={"Authorization": f"Bearer {TOKEN}"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def _connect(server: WebhookServer, payload: bytes) -> socket.socket:
    host, port = server.server_address[:2]
    client = socket.create_connection((host, port), timeout=30)
    if payload:
        client.sendall(payload)
    return client


def _read_until_closed(client: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (socket.timeout if it never does)."""
    received = b""
    while chunk := client.recv(65536):
        received += chunk
    return received


SLOW_BODY = b"POST /minio HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer s3cret\r\nContent-Length: 1000\r\n\r\n0123456789"
PARTIAL_HEADERS = b"POST /minio HTTP/1.1\r\nHost: x\r\nContent-Le"


def test_300_idle_connections_keep_the_thread_count_bounded_and_a_real_request_is_answered() -> None:
    recorder = Recorder()
    baseline = threading.active_count()
    server = make_webhook_server("127.0.0.1", 0, TOKEN, recorder, max_body_bytes=4096)
    with _serve(server) as served, ExitStack() as stack:
        clients = [
            stack.enter_context(_connect(served, (b"", PARTIAL_HEADERS, SLOW_BODY)[index % 3])) for index in range(300)
        ]

        status = _post(served)  # accepted after all 300 (one listen queue): they are all open now
        threads = threading.active_count() - baseline
        with urllib.request.urlopen(served.url + "/health", timeout=30) as response:
            health = response.status

        assert status == 200
        assert recorder.keys == ["lot1/a.png"]
        assert health == 200
        # the serving thread plus at most the submit pool (8 threads), whatever the clients do
        assert threads <= 1 + 8, f"{threads} threads for {len(clients)} idle connections"


def test_slow_silent_and_half_sent_clients_are_cut_off() -> None:
    recorder = Recorder()
    server = make_webhook_server(
        "127.0.0.1", 0, TOKEN, recorder, max_body_bytes=4096, header_timeout_s=1.0, body_timeout_s=1.0
    )
    with _serve(server) as served:
        slow_body = _connect(served, SLOW_BODY)
        silent = _connect(served, b"")
        half_headers = _connect(served, PARTIAL_HEADERS)

        slow_reply = _read_until_closed(slow_body)  # a socket.timeout here (30 s) means it was never cut off
        silent_reply = _read_until_closed(silent)
        half_reply = _read_until_closed(half_headers)

        assert slow_reply.startswith(b"HTTP/1.1 408")
        assert b"Connection: close" in slow_reply or b"connection: close" in slow_reply
        assert silent_reply == b""
        assert half_reply == b""
        assert _post(served) == 200  # the server is fine afterwards
        assert recorder.keys == ["lot1/a.png"]


@pytest.mark.parametrize("chunked", [False, True])
def test_bodies_over_the_limit_are_refused_declared_or_streamed(chunked: bool) -> None:
    recorder = Recorder()
    server = make_webhook_server("127.0.0.1", 0, TOKEN, recorder, max_body_bytes=4096)
    body = b"x" * 5000
    if chunked:
        framing = b"Transfer-Encoding: chunked\r\n\r\n" + b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n"
    else:
        framing = b"Content-Length: %d\r\n\r\n" % len(body) + body
    request = b"POST /minio HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer s3cret\r\n" + framing
    with _serve(server) as served:
        client = _connect(served, request)

        reply = _read_until_closed(client)

        assert reply.startswith(b"HTTP/1.1 413"), reply[:80]
        assert recorder.keys == []
        client.close()
