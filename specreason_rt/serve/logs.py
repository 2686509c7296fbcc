"""Logging of `specreason serve`: one handler on stderr, plain text or one JSON object per line.

Loggers: specreason_rt.* (the runtime: warnings such as ignored request fields, worker restarts),
specreason_rt.serve.access (one line per request: client, method, path, status, latency, tokens), uvicorn.*
(bind errors, shutdown). The library itself only logs; `configure` is for the command line.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

_ACCESS_FIELDS = ("client", "method", "path", "status", "latency_ms", "tokens")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                               + f".{int(record.msecs):03d}Z", "level": record.levelname.lower(),
                               "logger": record.name, "message": record.getMessage()}
        for name in _ACCESS_FIELDS:
            if hasattr(record, name):
                out[name] = getattr(record, name)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out)


def configure(*, level: str = "info", json_lines: bool = False) -> None:
    """Route specreason's and uvicorn's loggers to stderr at `level` (the access log is at info)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json_lines else
                         logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in ("specreason_rt", "uvicorn"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(level.upper())
        logger.propagate = False
