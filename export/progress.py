"""Stage-by-stage progress on stderr: what is running, that it still runs, then how long it took.

Long stages (loading a large model, validation) print a line every `heartbeat_s` seconds, so a log shows
the export is alive. Progress bars of the libraries we call (transformers' tqdm bars) are routed through
here when stderr is not a terminal: a few plain lines instead of a flood of carriage returns.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any


class Progress:
    def __init__(self, *, total: int, enabled: bool = True, heartbeat_s: float = 30.0) -> None:
        self.total, self.done, self.enabled = total, 0, enabled
        self.heartbeat_s = heartbeat_s
        self.timings: dict[str, float] = {}

    def _print(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def stage(self, label: str) -> Iterator[None]:
        self.done += 1
        if self.enabled:
            self._print(f"[{self.done}/{self.total}] {label} ...")
        start = time.perf_counter()
        stop = threading.Event()
        beat = threading.Thread(target=self._heartbeat, args=(stop, start), daemon=True)
        if self.enabled:
            beat.start()
        try:
            yield
        finally:
            stop.set()
        elapsed = time.perf_counter() - start
        self.timings[label] = round(elapsed, 2)
        if self.enabled:
            self._print(f"      done in {elapsed:.1f} s")

    def _heartbeat(self, stop: threading.Event, start: float) -> None:
        while not stop.wait(self.heartbeat_s):
            self._print(f"      ... still running ({time.perf_counter() - start:.0f} s)")

    def info(self, text: str) -> None:
        if self.enabled:
            self._print(f"      {text}")

    def bars_inline(self) -> bool:
        """Whether library progress bars may draw themselves (enabled and stderr is a terminal)."""
        return self.enabled and sys.stderr.isatty()

    def tqdm_class(self) -> type:
        """A tqdm stand-in for library loops: one line per ~25% (nothing when progress is off)."""
        progress = self

        class Bar:
            def __init__(self, iterable: Iterable[Any] | None = None, *args: Any, desc: str | None = None,
                         total: int | None = None, **kwargs: Any) -> None:
                self.iterable, self.desc = iterable, (desc or "working").rstrip(". ")
                if total is None and iterable is not None and hasattr(iterable, "__len__"):
                    total = len(iterable)
                self.total, self.n, self._shown = total, 0, -1

            def __iter__(self) -> Iterator[Any]:
                for item in self.iterable or ():
                    yield item
                    self.update(1)

            def update(self, n: int = 1) -> None:
                self.n += n
                if self.total:
                    quarter = 4 * self.n // self.total
                    if quarter > self._shown:
                        self._shown = quarter
                        progress.info(f"{self.desc}: {self.n}/{self.total}")

            def __enter__(self) -> Bar:
                return self

            def __exit__(self, *exc: object) -> None:
                self.close()

            def close(self) -> None:
                pass

            def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
                self.desc = desc or self.desc

            def set_postfix(self, *args: Any, **kwargs: Any) -> None:
                pass

        return Bar
