"""The webhook under a flood of idle and slow clients: threads, latency of a real request, cut-off times.

Opens ``--idle`` connections against a webhook on a free port, a third each sending nothing, half a
request line and headers, or a request that declares 1000 bytes and sends 10; then sends ``--requests``
real notifications one after another and prints, as JSON: the threads of this process (before and under
the flood), the median and worst latency of the real requests, and how long the server kept one slow
client of each kind (capped at ``--cap`` seconds: the stdlib server never cut them off).

    python bench/bench_webhook.py [--idle 300] [--requests 20] [--cap 15]
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import threading
import time
import urllib.request

from worker.sources.webhook import make_webhook_server

TOKEN = "bench-token"
BODY = json.dumps(
    {
        "EventName": "s3:ObjectCreated:Put",
        "Key": "wafers/lot1/a.png",
        "Records": [
            {
                "eventName": "s3:ObjectCreated:Put",
                "s3": {"bucket": {"name": "wafers"}, "object": {"key": "lot1/a.png", "size": 12, "eTag": "e"}},
            }
        ],
    }
).encode()
CLIENTS = {
    "silent": b"",
    "half_headers": b"POST /minio HTTP/1.1\r\nHost: x\r\nContent-Le",
    "slow_body": (
        b"POST /minio HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + TOKEN.encode() + b"\r\n"
        b"Content-Length: 1000\r\n\r\n0123456789"
    ),
}


def _held_seconds(address: tuple[str, int], payload: bytes, cap_s: float) -> float:
    """Seconds until the server closes a connection that sent ``payload`` (``cap_s`` if it never does)."""
    started = time.perf_counter()
    with socket.create_connection(address, timeout=cap_s) as client:
        if payload:
            client.sendall(payload)
        try:
            while client.recv(65536):
                pass
        except TimeoutError:
            return cap_s
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--idle", type=int, default=300)
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--cap", type=float, default=15.0)
    args = parser.parse_args()

    accepted: list[int] = []
    server = make_webhook_server("127.0.0.1", 0, TOKEN, lambda events: accepted.append(len(events)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    threads_before = threading.active_count()
    thread.start()
    address = server.server_address[:2]
    kinds = list(CLIENTS)
    idle = [socket.create_connection(address, timeout=30) for _ in range(args.idle)]
    for index, client in enumerate(idle):
        if CLIENTS[kinds[index % 3]]:
            client.sendall(CLIENTS[kinds[index % 3]])
    latencies = []
    for _ in range(args.requests):
        request = urllib.request.Request(
            server.url + "/minio", data=BODY, headers={"Authorization": f"Bearer {TOKEN}"}, method="POST"
        )
        started = time.perf_counter()
        with urllib.request.urlopen(request, timeout=60) as response:
            assert response.status == 200
        latencies.append(time.perf_counter() - started)
    threads_flood = threading.active_count()
    held = {kind: round(_held_seconds(address, payload, args.cap), 2) for kind, payload in CLIENTS.items()}
    for client in idle:
        client.close()
    server.shutdown()
    server.server_close()
    print(
        json.dumps(
            {
                "server": "uvicorn" if hasattr(server, "_server") else "http.server (ThreadingHTTPServer)",
                "idle_connections": args.idle,
                "threads_before": threads_before,
                "threads_under_flood": threads_flood,
                "real_requests": len(latencies),
                "latency_ms_median": round(statistics.median(latencies) * 1000, 1),
                "latency_ms_max": round(max(latencies) * 1000, 1),
                "seconds_a_client_was_held": held,
                "held_cap_s": args.cap,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
