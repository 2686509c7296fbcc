"""Stopping a run from outside: a cancel token checked before every forward of a run's contexts.

A token is set by another thread (a client that went away, a server shutting down) or expires at its
deadline (a per-request timeout). The run then raises `Cancelled` (or `RunTimeout`) at its next forward, so
no more compute is spent on an answer nobody will read; the Reasoner stays usable for the next run.
"""

from __future__ import annotations

import threading
import time

from .errors import SpecReasonError


class Cancelled(SpecReasonError):
    """The run was cancelled before it finished."""


class RunTimeout(Cancelled):
    """The run passed its deadline."""


class CancelToken:
    def __init__(self, *, timeout: float | None = None) -> None:
        self._event = threading.Event()
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.reason = ""

    def cancel(self, reason: str = "cancelled") -> None:
        self.reason = reason
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def check(self) -> None:
        """Raise if the run must stop now; called by the contexts before each forward (cheap: no lock)."""
        if self._event.is_set():
            raise Cancelled(f"the run was cancelled ({self.reason})")
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise RunTimeout("the run passed its time limit")
