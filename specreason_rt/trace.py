"""What a reasoning run returns: the answer, the text, and a JSON-serialisable trace of how it got there."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

PHASES = ("prefill", "speculate", "verify", "fallback", "select")


@dataclass
class Candidate:
    text: str
    tokens: int
    score: float | None = None  # verifier score 0-9 (stepwise, tree) or None
    combined: float | None = None  # combined score 0-1 (best_of_n, tree leaves)
    local: float | None = None  # speculator's geometric-mean token probability
    answer: str | None = None  # final answer of a whole trajectory
    accepted: bool = False


@dataclass
class StepTrace:
    index: int
    author: str  # "speculator" | "verifier"
    text: str
    tokens: int  # tokens of the committed step (in its author's tokenizer)
    candidates: list[Candidate] = field(default_factory=list)
    reused_tokens: int = 0  # fallback steps: draft tokens the verifier kept (its own greedy choices)


@dataclass
class DraftCounts:
    """Where the speculator's work went in one stepwise run (all counts are per run).

    drafted   step positions the speculator drafted (every lookahead step; k candidates of one step count once)
    accepted  drafted steps committed as the speculator's
    rejected  drafted - accepted: scored below the threshold, or (lookahead) drafted after a step that was
    wasted_tokens  speculator tokens drafted and then dropped from both caches (rejected steps, losing candidates)
    verify_passes  verifier prefill passes that scored drafts (one per round, however many steps it scores)
    rounds    draft-then-verify rounds (one per verifier pass; lookahead drafts several steps per round)
    """

    drafted: int = 0
    accepted: int = 0
    rejected: int = 0
    wasted_tokens: int = 0
    verify_passes: int = 0
    rounds: int = 0

    def add_round(self, *, step_tokens: list[int], accepted: int) -> None:
        """One draft-then-verify round: the drafted steps' token counts, of which the first `accepted` passed."""
        self.rounds += 1
        self.verify_passes += 1
        self.drafted += len(step_tokens)
        self.accepted += accepted
        self.rejected += len(step_tokens) - accepted
        self.wasted_tokens += sum(step_tokens[accepted:])

    def add_dropped(self, *, step_tokens: list[int]) -> None:
        """Steps drafted and dropped unscored (overlap's chain drafted ahead of one that failed)."""
        self.drafted += len(step_tokens)
        self.rejected += len(step_tokens)
        self.wasted_tokens += sum(step_tokens)


@dataclass(frozen=True)
class TokenDelta:
    """New text of the step being written (token-level streaming): the verifier's tokens as it writes them, an
    accepted draft's text at once. The deltas of a step add up to a prefix of its StepTrace.text; the StepTrace
    that follows them commits the step (and carries the rest, if any)."""

    step: int  # index of the step the text belongs to
    author: str  # "verifier" | "speculator"
    text: str


class Timer:
    """Wall time per phase of a run."""

    def __init__(self) -> None:
        self.seconds = dict.fromkeys(PHASES, 0.0)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - start


@dataclass
class RunResult:
    strategy: str
    answer: str | None
    text: str  # the solution: the committed steps joined
    steps: list[StepTrace]
    finish: str  # "answer" | "eos" | "budget" | "depth" | "repeat"
    seconds: float
    timings: dict[str, float]  # seconds per phase (PHASES)
    tokens: dict[str, int]  # tokens generated per model (speculator, verifier), drafts included
    forwards: dict[str, int]  # model forwards per model
    candidates: list[Candidate] = field(default_factory=list)  # whole trajectories (best_of_n, tree, majority)
    config: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)  # strategy-specific facts (tree: nodes per level)
    drafts: DraftCounts = field(default_factory=DraftCounts)  # stepwise: drafted / accepted / wasted work

    @property
    def speculator_steps(self) -> int:
        return sum(s.author == "speculator" for s in self.steps)

    @property
    def acceptance(self) -> float | None:
        """Share of drafted steps that were accepted (stepwise), None when nothing was drafted."""
        if self.drafts.drafted:
            return self.drafts.accepted / self.drafts.drafted
        drafted = [s for s in self.steps if s.candidates]
        if not drafted:
            return None
        return sum(s.author == "speculator" for s in drafted) / len(drafted)

    def to_json(self) -> dict[str, Any]:
        """Plain JSON types only (a numpy scalar that slipped into a field is turned into its Python value)."""
        out = _plain(dataclasses.asdict(self))
        out["speculator_steps"] = self.speculator_steps
        out["acceptance"] = self.acceptance
        return out


def _plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_plain(v) for v in x]
    if x is None or isinstance(x, str | int | float | bool):
        return x
    item = getattr(x, "item", None)  # numpy scalars (np.bool_, np.float32, ...)
    if callable(item):
        return item()
    raise TypeError(f"{type(x).__name__} in a RunResult is not JSON-serialisable")
