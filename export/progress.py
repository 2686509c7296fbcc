"""Stage-by-stage progress on stderr: what is running, then how long it took."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator


class Progress:
    def __init__(self, *, total: int, enabled: bool = True) -> None:
        self.total, self.done, self.enabled = total, 0, enabled
        self.timings: dict[str, float] = {}

    @contextlib.contextmanager
    def stage(self, label: str) -> Iterator[None]:
        self.done += 1
        if self.enabled:
            print(f"[{self.done}/{self.total}] {label} ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        yield
        elapsed = time.perf_counter() - start
        self.timings[label] = round(elapsed, 2)
        if self.enabled:
            print(f"      done in {elapsed:.1f} s", file=sys.stderr, flush=True)

    def info(self, text: str) -> None:
        if self.enabled:
            print(f"      {text}", file=sys.stderr, flush=True)
