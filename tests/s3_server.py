"""A moto S3/SQS server on 127.0.0.1 for tests that need real HTTP, not patched clients.

``ThreadedMotoServer`` serves every AWS service moto emulates from one in-process
state, so S3 bucket notifications configured with ``QueueConfigurations`` are
delivered to SQS queues created on the same endpoint, as on AWS.
"""

from __future__ import annotations

import os
import socket
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager

from moto.server import ThreadedMotoServer

DUMMY_AWS_ENV: dict[str, str] = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SECURITY_TOKEN": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
"""Credentials that can never reach real AWS; set before any boto3 client is built."""


def free_port() -> int:
    """A TCP port that was free a moment ago (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def dummy_aws_environment() -> Iterator[None]:
    """Set the dummy credentials for the duration of the block, restoring previous values."""
    previous = {name: os.environ.get(name) for name in DUMMY_AWS_ENV}
    os.environ.update(DUMMY_AWS_ENV)
    try:
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextmanager
def running_moto_server() -> Iterator[str]:
    """Start a moto server on a free local port and yield its endpoint URL."""
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


def reset_moto(endpoint_url: str) -> None:
    """Forget every bucket, queue and object (moto's own reset endpoint)."""
    request = urllib.request.Request(f"{endpoint_url}/moto-api/reset", method="POST", data=b"")
    with urllib.request.urlopen(request, timeout=10) as response:
        response.read()
