"""Running the app with uvicorn: in the foreground (`specreason serve`) or in a background thread (tests, embedding).

Connections (uvicorn's h11 protocol, with bounds): at most `max_connections` at once (past it uvicorn answers 503
and closes), request headers must arrive within `header_timeout_s` of the connection (or of their first byte
on a kept-alive one) and within h11's 16 KiB limit, or the socket is closed; the app refuses a body that takes
longer than Limits.body_timeout_s (408). So stalled clients cannot hold file descriptors.

Graceful shutdown (SIGINT / SIGTERM, or ServerThread.stop): uvicorn stops accepting connections while the pool
closes: queued and running runs get `graceful_s` to finish, then fail with 503 (an OpenAI error body with
Retry-After, or an SSE error event) before uvicorn, `SHUTDOWN_MARGIN_S` later, would cancel the handlers.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import h11
import uvicorn
from starlette.applications import Starlette
from uvicorn.protocols.http.h11_impl import H11Protocol

from ..errors import ConfigError

SHUTDOWN_MARGIN_S = 10  # uvicorn's own deadline past the pool's grace: runs that did not stop are answered first
MAX_HEADER_BYTES = 16 * 1024
log = logging.getLogger("specreason_rt.serve")


class GuardedH11(H11Protocol):
    """uvicorn's h11 protocol, closing a connection whose request headers do not arrive in time."""

    header_timeout_s = 10.0  # set per server by `protocol_class`

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_timer: asyncio.TimerHandle | None = None
        self._arm()

    def _waiting_for_headers(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _arm(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_overdue)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_overdue(self) -> None:
        self._header_timer = None
        if self._waiting_for_headers() and not self.transport.is_closing():
            self.transport.close()  # a stalled or slow-loris client: free its socket

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._waiting_for_headers():
            self._arm()  # the first bytes of a request on a kept-alive connection start the clock
        else:
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # Answered before the client sent its whole body (413, 408, an early 4xx): the rest of that body would
        # have to be read before another request, so the connection ends here instead of idling.
        if self.conn.their_state not in (h11.DONE, h11.IDLE) and not self.transport.is_closing():
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)


def protocol_class(header_timeout_s: float) -> type[GuardedH11]:
    return type("GuardedH11", (GuardedH11,), {"header_timeout_s": header_timeout_s})


def default_max_connections() -> int:
    """Connections served at once: 256, or fewer when the process may open fewer files (room for the models)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return 256 if soft == resource.RLIM_INFINITY else max(min(256, soft - 64), 8)


def uvicorn_config(app: Starlette, *, host: str, port: int, graceful_s: float, max_connections: int | None = None,
                   header_timeout_s: float = 10.0, log_level: str = "warning") -> uvicorn.Config:
    if not 0 <= port <= 65535:
        raise ConfigError(f"port must be in 0..65535 (0: any free port), got {port}")
    if not header_timeout_s > 0:
        raise ConfigError(f"header_timeout_s must be > 0, got {header_timeout_s}")
    # One event loop: the runs happen in the pool's threads, so the loop only parses and writes.
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False, lifespan="on",
                          http=protocol_class(header_timeout_s), h11_max_incomplete_event_size=MAX_HEADER_BYTES,
                          limit_concurrency=max_connections or default_max_connections(),
                          timeout_graceful_shutdown=int(graceful_s) + SHUTDOWN_MARGIN_S, timeout_keep_alive=30,
                          log_config=None)


class Server(uvicorn.Server):
    """uvicorn's server, closing the app's pool as the shutdown begins (see the module docstring) and
    announcing itself only once its port is bound."""

    def __init__(self, config: uvicorn.Config, *, graceful_s: float,
                 on_started: Callable[[str], None] | None = None) -> None:
        super().__init__(config)
        self.graceful_s, self.on_started = graceful_s, on_started

    def _log_started_message(self, listeners: Sequence[socket.SocketType]) -> None:
        host, port = listeners[0].getsockname()[:2]
        url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
        if self.on_started is not None:
            self.on_started(url)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        pool = getattr(self.config.app.state, "pool", None) if isinstance(self.config.app, Starlette) else None
        closing = asyncio.ensure_future(asyncio.to_thread(pool.close, grace=self.graceful_s)) if pool else None
        await super().shutdown(sockets)
        if closing is not None:
            await closing


def serve_forever(app: Starlette, *, host: str = "127.0.0.1", port: int = 8000, graceful_s: float = 30,
                  on_started: Callable[[str], None] | None = None, **options: Any) -> None:
    """Serve until SIGINT / SIGTERM; on_started(url) once the port is bound. A port that cannot be bound ends the
    process with uvicorn's one-line error (exit status 3)."""
    config = uvicorn_config(app, host=host, port=port, graceful_s=graceful_s, **options)
    Server(config, graceful_s=graceful_s, on_started=on_started).run()


class ServerThread:
    """The server in a daemon thread on loopback; `url` once started. port=0 picks a free port."""

    def __init__(self, app: Starlette, *, host: str = "127.0.0.1", port: int = 0, graceful_s: float = 30,
                 **options: Any) -> None:
        self.server = Server(uvicorn_config(app, host=host, port=port, graceful_s=graceful_s, **options),
                             graceful_s=graceful_s)
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
