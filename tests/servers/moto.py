"""moto's DynamoDB server on a free port of 127.0.0.1, for the DynamoDB tests.

moto's in-process `mock_aws` does not work with aiobotocore, so the tests talk to a
real HTTP server in a thread of the test process: moto's own WSGI application (the
one `ThreadedMotoServer` and `moto_server` serve) behind werkzeug's threaded server,
with one difference: requests are handled one at a time.

Why: moto's backends take no lock, so two concurrent conditional PutItems on one
key can both succeed (reproduced with moto 5.2: 8 threads racing over 300 keys gave
2 double wins), where DynamoDB makes every conditional write atomic. Handling one
request at a time restores that guarantee and costs nothing (the GIL serialises moto
anyway); connections stay concurrent and keep-alive.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import socket
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

__all__ = ["DUMMY_AWS_ENV", "MotoServer", "free_port", "running_moto_server"]

DUMMY_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "eu-west-1",
}
"""Credentials and region for boto; moto accepts anything."""

WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


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


def _one_request_at_a_time(app: WsgiApp) -> WsgiApp:
    lock = threading.Lock()

    def serial_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        with lock:
            return list(app(environ, start_response))

    return serial_app


@contextlib.contextmanager
def running_moto_server() -> Iterator[MotoServer]:
    """Serve moto on a free port of 127.0.0.1 in a daemon thread; stop it on exit."""
    from moto.moto_server.werkzeug_app import (
        DomainDispatcherApplication,
        MotoRequestHandler,
        create_backend_app,
    )
    from werkzeug.serving import make_server

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    app = _one_request_at_a_time(DomainDispatcherApplication(create_backend_app))
    server = make_server(
        "127.0.0.1", free_port(), app, threaded=True, request_handler=MotoRequestHandler
    )
    thread = threading.Thread(target=server.serve_forever, name="moto-server", daemon=True)
    thread.start()
    try:
        yield MotoServer("127.0.0.1", server.server_port)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
