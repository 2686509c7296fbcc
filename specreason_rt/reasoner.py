"""The embedding API: load a bundle once, then solve problems with any strategy.

    reasoner = Reasoner("specreason-bundle")
    result = reasoner.run("37+45*3", make_config(strategy="stepwise"))
    result.answer, result.text, result.to_json()

A Reasoner is not thread-safe (the engines' IO bindings and KV buffers belong to one run at a time): give
each thread its own, or serialise calls. `ReasonerPool` (pool.py) does that for many threads or asyncio.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from .bundle import Bundle
from .cancel import CancelToken
from .config import ReasonConfig
from .errors import ConfigError
from .providers import ProviderConfig, ProviderSpec
from .strategies import STRATEGY_FUNCTIONS, Run
from .trace import RunResult, StepTrace


class Reasoner:
    def __init__(self, bundle: str | Path | Bundle, *, providers: Sequence[ProviderSpec] | ProviderConfig | None = None,
                 intra_op_threads: int = 0, kv_limit_bytes: int | None = None) -> None:
        # The two models take turns, so idle ONNX Runtime threads must not spin (see engine.py).
        self.bundle = bundle if isinstance(bundle, Bundle) else Bundle(
            bundle, providers=providers, intra_op_threads=intra_op_threads, kv_limit_bytes=kv_limit_bytes,
            spin=False)

    def run(self, problem: str, config: ReasonConfig | None = None, *,
            on_step: Callable[[StepTrace], None] | None = None, cancel: CancelToken | None = None) -> RunResult:
        """Solve one problem. on_step(step) is called as each step is committed (for streaming).

        cancel: a token another thread may set (or that expires): the run then raises Cancelled / RunTimeout
        at its next forward.
        """
        if not isinstance(problem, str) or not problem.strip():
            raise ConfigError("the problem is empty: pass the question text")
        config = config or ReasonConfig()
        return STRATEGY_FUNCTIONS[config.strategy](Run(bundle=self.bundle, problem=problem, config=config,
                                                       on_step=on_step, cancel=cancel))
