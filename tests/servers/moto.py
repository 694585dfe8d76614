"""moto's DynamoDB server on a free port of 127.0.0.1, for the DynamoDB tests.

moto's in-process `mock_aws` does not work with aiobotocore, so the tests talk to a
real HTTP server: `ThreadedMotoServer`, in a thread of the test process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import socket
from collections.abc import Iterator

__all__ = ["DUMMY_AWS_ENV", "MotoServer", "free_port", "running_moto_server"]

DUMMY_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "eu-west-1",
}
"""Credentials and region for boto; moto accepts anything."""


@dataclasses.dataclass(frozen=True)
class MotoServer:
    """A running moto server."""

    host: str
    port: int

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.port}"


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def running_moto_server() -> Iterator[MotoServer]:
    """Start moto's threaded server on a free port; stop it on exit."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield MotoServer("127.0.0.1", port)
    finally:
        server.stop()
