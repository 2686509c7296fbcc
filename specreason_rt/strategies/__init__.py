"""The reasoning strategies. Each takes a `Run` (one problem, one config) and returns a RunResult."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from ..trace import RunResult
from .baselines import run_majority, run_single
from .common import Run
from .search import run_best_of_n, run_tree
from .stepwise import run_stepwise

STRATEGY_FUNCTIONS: dict[str, Callable[[Run], RunResult]] = {
    "stepwise": run_stepwise,
    "best_of_n": run_best_of_n,
    "tree": run_tree,
    "speculator": partial(run_single, role="speculator"),
    "verifier": partial(run_single, role="verifier"),
    "majority": run_majority,
}

__all__ = ["STRATEGY_FUNCTIONS", "Run"]
