"""The embedding API: load a bundle once, then solve problems with any strategy.

    reasoner = Reasoner("specreason-bundle")
    result = reasoner.run("37+45*3", make_config(strategy="stepwise"))
    result.answer, result.text, result.to_json()

A Reasoner is not thread-safe (the engines' IO bindings and KV buffers belong to one run at a time): give
each thread its own, or use `ReasonerPool` (pool.py) for many threads or asyncio. A second thread that calls
`run` while a run is in progress gets ConcurrentUse at once (sharing would silently mix the two runs' caches).

Memory: every KV cache a run allocates is limited to `kv_limit_bytes` (default: `default_kv_limit_bytes()`,
a quarter of the machine's memory, or of the cgroup limit when lower); a run past it fails with CacheLimitError
before allocating, instead of taking the machine down.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from .backends.providers import ProviderConfig, ProviderSpec
from .bundle import Bundle
from .cancel import CancelToken
from .config import ReasonConfig
from .errors import ConfigError, SpecReasonError
from .prompt import Prompt
from .strategies import STRATEGY_FUNCTIONS, Run
from .trace import RunResult, StepTrace, TokenDelta

KV_SHARE_OF_MEMORY = 4  # one KV cache may take 1/4 of the memory: a run holds two (speculator, verifier)


class ConcurrentUse(SpecReasonError, RuntimeError):
    """A Reasoner was used by two threads at once."""


def machine_memory_bytes() -> int:
    """Physical memory, or the cgroup (container) memory limit when it is lower."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total


def default_kv_limit_bytes(*, share: int = 1) -> int:
    """The default limit of one KV cache: a quarter of the machine's memory, split among `share` reasoners."""
    return machine_memory_bytes() // KV_SHARE_OF_MEMORY // max(share, 1)


class Reasoner:
    def __init__(self, bundle: str | Path | Bundle, *, providers: Sequence[ProviderSpec] | ProviderConfig | None = None,
                 intra_op_threads: int = 0, kv_limit_bytes: int | None = None) -> None:
        """kv_limit_bytes: the most one KV cache may take (None: default_kv_limit_bytes()); ignored when a
        loaded Bundle is passed (it carries its own)."""
        if kv_limit_bytes is not None and (not isinstance(kv_limit_bytes, int) or kv_limit_bytes < 1):
            raise ConfigError(f"kv_limit_bytes must be a positive integer, got {kv_limit_bytes!r}")
        limit = kv_limit_bytes if kv_limit_bytes is not None else default_kv_limit_bytes()
        # The two models take turns, so idle ONNX Runtime threads must not spin (see backends/ort.py).
        self.bundle = bundle if isinstance(bundle, Bundle) else Bundle(
            bundle, providers=providers, intra_op_threads=intra_op_threads, kv_limit_bytes=limit, spin=False)
        self._busy = threading.Lock()

    def run(self, problem: str | Prompt, config: ReasonConfig | None = None, *,
            on_step: Callable[[StepTrace], None] | None = None, cancel: CancelToken | None = None,
            on_token: Callable[[TokenDelta], None] | None = None) -> RunResult:
        """Solve one problem (a string: one user turn; or a Prompt: a chat or raw text).

        on_step(step) is called as each step is committed, on_token(delta) as the verifier writes a step
        (streaming). cancel: a token another thread may set (or that expires): the run then raises Cancelled /
        RunTimeout at its next forward.
        """
        if isinstance(problem, str) and not problem.strip():
            raise ConfigError("the problem is empty: pass the question text")
        config = config or ReasonConfig()
        if not isinstance(config, ReasonConfig):
            raise ConfigError(f"config must be a ReasonConfig (see make_config), got {type(config).__name__}")
        if not self._busy.acquire(blocking=False):
            raise ConcurrentUse("this Reasoner is running another problem in another thread; a Reasoner runs one "
                                "problem at a time: give each thread its own, or use ReasonerPool")
        try:
            return STRATEGY_FUNCTIONS[config.strategy](Run(bundle=self.bundle, problem=problem, config=config,
                                                           on_step=on_step, cancel=cancel, on_token=on_token))
        finally:
            self._busy.release()
