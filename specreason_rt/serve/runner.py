"""Running the app with uvicorn: in the foreground (`specreason serve`) or in a background thread (tests, embedding).

Graceful shutdown (SIGINT / SIGTERM, or ServerThread.stop): uvicorn stops accepting connections, waits up to
`graceful_s` for in-flight requests, then the app's lifespan closes the pool (queued and running runs finish
within the grace or fail cleanly with 503).
"""

from __future__ import annotations

import threading
import time

import uvicorn
from starlette.applications import Starlette


def uvicorn_config(app: Starlette, *, host: str, port: int, graceful_s: float) -> uvicorn.Config:
    # One event loop: the runs happen in the pool's threads, so the loop only parses and writes.
    return uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False, lifespan="on",
                          timeout_graceful_shutdown=int(graceful_s), timeout_keep_alive=30)


def serve_forever(app: Starlette, *, host: str = "127.0.0.1", port: int = 8000, graceful_s: float = 30) -> None:
    uvicorn.Server(uvicorn_config(app, host=host, port=port, graceful_s=graceful_s)).run()


class ServerThread:
    """The server in a daemon thread on loopback; `url` once started. port=0 picks a free port."""

    def __init__(self, app: Starlette, *, host: str = "127.0.0.1", port: int = 0, graceful_s: float = 30) -> None:
        self.server = uvicorn.Server(uvicorn_config(app, host=host, port=port, graceful_s=graceful_s))
        # uvicorn installs signal handlers only in the main thread, so this thread leaves them alone.
        self.thread = threading.Thread(target=self.server.run, name="specreason-server", daemon=True)

    def start(self, *, timeout: float = 30) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        return self

    @property
    def url(self) -> str:
        sock = self.server.servers[0].sockets[0]
        host, port = sock.getsockname()[:2]
        return f"http://{host}:{port}"

    def stop(self, *, timeout: float = 60) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
