"""Configuration of a reasoning run: one small frozen dataclass per concern, presets, validation.

    ReasonConfig
      strategy     which algorithm runs (STRATEGIES)
      search       SearchConfig: branch counts and depths (best_of_n, tree, majority)
      stepwise     StepwiseConfig: the paper's accept-or-fallback options
      score        ScoreConfig: how the verifier judges and how scores combine
      speculator   SamplingParams of the speculator (drafts, trajectories)
      verifier     SamplingParams of the verifier (its own steps; greedy by default)
      limits       LimitsConfig: token budget, step length, stop rules
      answer       AnswerConfig: how the final answer is read from the text
      seed         one seed; each model samples from its own stream, so a seed reproduces a run exactly

Every value is checked when the object is built; a bad one raises ConfigError with what to change.
Presets are the seed document's (n_specs, max_depth, temperature): default (4, 8, 0.7), efficient (2, 6, 0.8),
quality (8, 12, 0.6).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError
from .sampling import SamplingError, SamplingParams

STRATEGIES = ("stepwise", "best_of_n", "tree", "speculator", "verifier", "majority")
SCORE_MODES = ("likelihood", "judge", "head")
SCORE_METHODS = ("greedy", "average")
ANSWER_FORMATS = ("answer_line", "boxed")
SCALE_MAX = 9  # scores live on the paper's 0-9 scale
# Hard bounds, far past any useful run, so that a typo cannot ask for terabytes: the branches one run holds at
# once (n_specs, candidates, beam_width^2), steps per trajectory or tree level, and tokens of a solution. The KV
# memory limit (reasoner.py) is the finer bound; these refuse the absurd before anything is allocated.
MAX_BRANCHES = 1024
MAX_DEPTH = 1024
MAX_TOKENS = 1 << 20

# A judge instruction after the paper's (arXiv 2504.07891: rate the latest step's correctness on a 0-9 scale;
# our wording), appended after the step being judged; the score is read from the verifier's logits of the ten
# digit tokens at its end. Set ScoreConfig.judge_prompt to the wording (and chat markup) your verifier expects.
DEFAULT_JUDGE_PROMPT = (
    "\n\nEvaluate the last reasoning step solely on its factual correctness and logical validity. Ignore style, "
    "phrasing and overall usefulness. Output a score from 0 to 9, where 0 is completely wrong and 9 is "
    "completely correct.\nScore: ")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass(frozen=True)
class SearchConfig:
    n_specs: int = 4  # best_of_n trajectories / majority samples
    max_depth: int = 8  # steps per trajectory
    beam_width: int = 4  # tree: children per node and nodes kept per level
    tree_depth: int = 3  # tree: levels expanded before the kept nodes are finished as trajectories
    majority_model: str = "speculator"  # which model samples the majority vote
    # best_of_n: stop sampling once this many trajectories have finished and choose among them (0: wait for
    # all n_specs). Cuts the wait for the longest sample; see strategies/search.py.
    stop_after: int = 0
    # best_of_n: the verifier reads each trajectory's steps in a second thread as the speculator writes them,
    # where each model has a core of its own (Bundle.own_cores) and the speculator is not tiny (see
    # strategies/search.py, _overlaps); elsewhere it reads them all after sampling. The same scores either way
    # (on by default, like stepwise.overlap).
    overlap: bool = True

    def __post_init__(self) -> None:
        for name, most in (("n_specs", MAX_BRANCHES), ("max_depth", MAX_DEPTH),
                           ("beam_width", math.isqrt(MAX_BRANCHES)), ("tree_depth", MAX_DEPTH)):
            value = getattr(self, name)
            _check(_is_int(value) and 1 <= value <= most, f"{name} must be an integer in [1, {most}], got {value!r}")
        _check(isinstance(self.overlap, bool), f"overlap must be true or false, got {self.overlap!r}")
        _check(_is_int(self.stop_after) and 0 <= self.stop_after <= self.n_specs,
               f"stop_after must be an integer in [0, n_specs={self.n_specs}] (0: wait for every trajectory), "
               f"got {self.stop_after!r}")
        _check(self.majority_model in ("speculator", "verifier"),
               f"majority_model must be 'speculator' or 'verifier', got {self.majority_model!r}")


@dataclass(frozen=True)
class StepwiseConfig:
    threshold: float = 7.0  # accept a draft whose score >= threshold (0-9 scale); above 9 rejects every draft
    candidates: int = 1  # drafts per step, scored in one batch (1 = the paper)
    first_n_steps_verifier: int = 0  # the verifier writes the first n steps itself (the paper's option)
    # When the verifier writes a rejected step greedily, keep the draft's tokens that match its own greedy
    # choices (read from the scoring pass's logits): they are exactly what it would write, so the output is
    # unchanged and those tokens cost no decode steps (speculative decoding inside the fallback).
    reuse_draft_prefix: bool = True
    # Multi-step lookahead: the speculator drafts up to `lookahead` steps ahead, the verifier scores them all in
    # one pass and keeps the longest prefix of steps that each score >= threshold (token-level speculative
    # decoding's accept rule, at the step level); the first rejected step is rewritten by the verifier and the
    # steps drafted after it are dropped from both caches. 1 = the paper's one step at a time.
    lookahead: int = 8
    # Adaptive lookahead: `lookahead` becomes the most steps a round drafts; each round drafts as many as the
    # run's recent acceptance rate says will likely survive (strategies/lookahead.py, LookaheadPolicy), and one
    # step where steps are scored one at a time (candidates > 1, or score mode 'judge'). The default: on the
    # built-in pair it is 1.43x faster than one step per pass with a speculator whose steps pass 99.5% of the
    # time and 1.10x with one whose steps pass 71% of the time, where a fixed lookahead of 8 is 0.92x
    # (BENCHMARKS.md, models in turn).
    adaptive_lookahead: bool = True
    # Pipeline the models (strategies/lookahead.py): the speculator drafts the next chain while the verifier
    # scores this one, in a second thread. It changes when work runs, never the output, so it is on by default
    # and applies where it can: one candidate per step, scores read from the pass (not 'judge'), both models
    # on the CPU with a core each (Bundle.own_cores); elsewhere, and in the serving batch, the models take
    # turns (BENCHMARKS.md measures both on the built-in pair).
    overlap: bool = True

    def steps_per_pass(self, *, score_mode: str) -> int:
        """The most steps one verifier pass scores: `lookahead`, or 1 where adaptive lookahead meets scoring that
        takes one step at a time (several candidates per step, or the judge's prompt after each step)."""
        if self.adaptive_lookahead and (self.candidates > 1 or score_mode == "judge"):
            return 1
        return self.lookahead

    def pipelines(self, *, score_mode: str) -> bool:
        """Whether a run may overlap the two models: asked for, one candidate per step (a chain to draft ahead),
        and scores the verifier reads from the chain's own pass (the judge scores after a prompt per step)."""
        return self.overlap and self.candidates == 1 and score_mode != "judge"

    def __post_init__(self) -> None:
        _check(isinstance(self.threshold, int | float) and math.isfinite(self.threshold) and self.threshold >= 0,
               f"threshold must be a number >= 0 on the 0-{SCALE_MAX} scale (above {SCALE_MAX} rejects every "
               f"draft), got {self.threshold!r}")
        _check(_is_int(self.candidates) and 1 <= self.candidates <= MAX_BRANCHES,
               f"candidates must be an integer in [1, {MAX_BRANCHES}], got {self.candidates!r}")
        _check(_is_int(self.first_n_steps_verifier) and self.first_n_steps_verifier >= 0,
               f"first_n_steps_verifier must be an integer >= 0, got {self.first_n_steps_verifier!r}")
        _check(_is_int(self.lookahead) and 1 <= self.lookahead <= MAX_DEPTH,
               f"lookahead must be an integer in [1, {MAX_DEPTH}] (steps drafted per verifier pass), "
               f"got {self.lookahead!r}")
        _check(self.lookahead == 1 or self.candidates == 1 or self.adaptive_lookahead,
               f"a fixed lookahead > 1 drafts one chain of steps: set candidates to 1 (got "
               f"candidates={self.candidates}), lookahead to 1, or adaptive_lookahead to true (one step per pass "
               "with several candidates)")
        _check(isinstance(self.overlap, bool), f"overlap must be true or false, got {self.overlap!r}")
        _check(isinstance(self.adaptive_lookahead, bool),
               f"adaptive_lookahead must be true or false, got {self.adaptive_lookahead!r}")


@dataclass(frozen=True)
class ScoreConfig:
    mode: str = "likelihood"  # judge | likelihood | head (see scoring.py)
    method: str = "average"  # greedy | average: how one score is read (see scoring.py)
    judge_prompt: str = DEFAULT_JUDGE_PROMPT
    # Combined score of a whole trajectory (best_of_n, tree leaves, majority of nothing): the seed's three parts.
    # The seed gives verify_weight 0.3; the rest is split evenly between local confidence and consistency.
    local_weight: float = 0.35  # speculator's own token probabilities (geometric mean)
    consistency_weight: float = 0.35  # share of trajectories that reach the same final answer
    verify_weight: float = 0.3  # the verifier's judgement

    def __post_init__(self) -> None:
        _check(self.mode in SCORE_MODES, f"unknown score mode {self.mode!r}: choose from {', '.join(SCORE_MODES)}")
        _check(self.method in SCORE_METHODS,
               f"unknown score method {self.method!r}: choose from {', '.join(SCORE_METHODS)}")
        weights = (self.local_weight, self.consistency_weight, self.verify_weight)
        _check(all(isinstance(w, int | float) and math.isfinite(w) and w >= 0 for w in weights) and sum(weights) > 0,
               f"score weights must be numbers >= 0 with a positive sum, got local={self.local_weight}, "
               f"consistency={self.consistency_weight}, verify={self.verify_weight}")
        _check(self.mode != "judge" or bool(self.judge_prompt.strip()), "judge mode needs a non-empty judge_prompt")


@dataclass(frozen=True)
class LimitsConfig:
    max_tokens: int = 512  # token budget of the whole solution
    max_step_tokens: int = 96  # a step longer than this is cut (it then counts as a step)
    stop_on_answer: bool = True  # stop once a committed step holds a complete answer
    stop_on_repeat: bool = True  # stop after two identical consecutive steps (a loop)

    def __post_init__(self) -> None:
        for name in ("max_tokens", "max_step_tokens"):
            value = getattr(self, name)
            _check(_is_int(value) and 1 <= value <= MAX_TOKENS,
                   f"{name} must be an integer in [1, {MAX_TOKENS}], got {value!r}")


@dataclass(frozen=True)
class AnswerConfig:
    format: str = "answer_line"  # "answer_line": text after 'Answer:' on its line; "boxed": last \boxed{...}

    def __post_init__(self) -> None:
        _check(self.format in ANSWER_FORMATS,
               f"unknown answer format {self.format!r}: choose from {', '.join(ANSWER_FORMATS)}")


@dataclass(frozen=True)
class ReasonConfig:
    strategy: str = "stepwise"
    search: SearchConfig = field(default_factory=SearchConfig)
    stepwise: StepwiseConfig = field(default_factory=StepwiseConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    speculator: SamplingParams = field(default_factory=lambda: SamplingParams(temperature=0.7))
    verifier: SamplingParams = field(default_factory=SamplingParams)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    answer: AnswerConfig = field(default_factory=AnswerConfig)
    seed: int = 0

    def __post_init__(self) -> None:
        _check(self.strategy in STRATEGIES,
               f"unknown strategy {self.strategy!r}: choose from {', '.join(STRATEGIES)}")
        _check(_is_int(self.seed) and self.seed >= 0, f"seed must be an integer >= 0, got {self.seed!r}")
        # The judge reads one score after the appended judge prompt: one pass cannot judge several steps.
        _check(self.stepwise.steps_per_pass(score_mode="judge") == 1 or self.score.mode != "judge",
               "a fixed stepwise.lookahead > 1 scores drafted steps as one chain in one pass, which score mode "
               "'judge' cannot do: use score.mode 'likelihood' or 'head', lookahead 1, or adaptive_lookahead true")

    def replace(self, **changes: Any) -> ReasonConfig:
        """A copy with changes; nested fields by dotted name, e.g. replace(**{"stepwise.threshold": 5})."""
        return from_dict(to_dict(self), overrides=changes)

    def to_json(self) -> dict[str, Any]:
        return to_dict(self)


PRESETS: dict[str, dict[str, Any]] = {
    "default": {"search.n_specs": 4, "search.max_depth": 8, "speculator.temperature": 0.7},
    "efficient": {"search.n_specs": 2, "search.max_depth": 6, "speculator.temperature": 0.8},
    "quality": {"search.n_specs": 8, "search.max_depth": 12, "speculator.temperature": 0.6},
}

_SECTIONS: dict[str, type] = {"search": SearchConfig, "stepwise": StepwiseConfig, "score": ScoreConfig,
                              "speculator": SamplingParams, "verifier": SamplingParams, "limits": LimitsConfig,
                              "answer": AnswerConfig}


def to_dict(config: ReasonConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


def from_dict(data: dict[str, Any], *, overrides: dict[str, Any] | None = None) -> ReasonConfig:
    """Build a config from nested dicts plus dotted overrides; unknown keys are errors, not silently ignored."""
    nested: dict[str, Any] = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    for key, value in (overrides or {}).items():
        section, _, name = key.partition(".")
        if name:
            nested.setdefault(section, {})
            if not isinstance(nested[section], dict):
                raise ConfigError(f"{section} is not a section; cannot set {key}")
            nested[section][name] = value
        else:
            nested[section] = value
    top = {f.name for f in dataclasses.fields(ReasonConfig)}
    unknown = sorted(set(nested) - top)
    if unknown:
        raise ConfigError(f"unknown config field(s) {unknown}: known are {', '.join(sorted(top))}")
    kwargs: dict[str, Any] = {}
    for key, value in nested.items():
        cls = _SECTIONS.get(key)
        if cls is None:
            kwargs[key] = value
            continue
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping of its fields, got {value!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        bad = sorted(set(value) - known)
        if bad:
            raise ConfigError(f"unknown field(s) {bad} in {key}: known are {', '.join(sorted(known))}")
        try:
            kwargs[key] = cls(**value)
        except SamplingError as e:
            raise ConfigError(f"{key}: {e}") from None
    return ReasonConfig(**kwargs)


def make_config(*, strategy: str = "stepwise", preset: str = "default", **overrides: Any) -> ReasonConfig:
    """A preset, then dotted overrides: make_config(strategy="tree", preset="quality", **{"tree.beam_width": 2})."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}: choose from {', '.join(PRESETS)}")
    return from_dict({"strategy": strategy}, overrides={**PRESETS[preset], **overrides})
