"""Request bodies of the OpenAI-compatible API and their mapping to a ReasonConfig.

Standard fields: model, messages (chat) or prompt (completions), max_tokens (max_completion_tokens), temperature,
top_p, seed, stream, stream_options.include_usage, n (1 only), stop, user. SpecReason options travel as extra
body fields (the openai client's `extra_body`): strategy, preset, n_specs, threshold, score_mode, candidates,
max_depth, beam_width, tree_depth, trace. Unknown fields and wrong types are refused (extra="forbid", strict),
never silently ignored.

temperature / top_p set the sampling of the model that samples: the speculator, or the verifier for
strategy "verifier" (whose default is greedy). stop cuts the returned text at the first stop string.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..config import PRESETS, SCORE_MODES, STRATEGIES, ReasonConfig, make_config
from ..errors import ConfigError
from .errors import ApiError

Strategy = Literal["stepwise", "best_of_n", "tree", "speculator", "verifier", "majority"]
Preset = Literal["default", "efficient", "quality"]
ScoreMode = Literal["likelihood", "judge", "head"]
# Spelled out for the type checker; these keep them equal to the runtime's lists.
assert get_args(Strategy) == STRATEGIES and get_args(Preset) == tuple(PRESETS) and get_args(ScoreMode) == SCORE_MODES


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; past these the server answers 400 (or 413 for the body)."""

    max_body_bytes: int = 65536
    max_prompt_chars: int = 4096
    max_tokens: int = 1024  # the largest max_tokens a request may set (also the default budget)
    max_branches: int = 32  # n_specs, beam_width^2, candidates: branches one run may hold
    timeout_s: float = 120.0  # a run past this is cancelled (504)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class _Common(_Strict):
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(default=None, ge=1)
    stop: str | list[str] | None = None
    user: str | None = None
    # SpecReason options (extra body fields)
    strategy: Strategy | None = None
    preset: Preset | None = None
    n_specs: int | None = Field(default=None, ge=1)
    threshold: float | None = Field(default=None, ge=0, le=10)
    score_mode: ScoreMode | None = None
    candidates: int | None = Field(default=None, ge=1)
    max_depth: int | None = Field(default=None, ge=1, le=64)
    beam_width: int | None = Field(default=None, ge=1)
    tree_depth: int | None = Field(default=None, ge=1, le=16)
    trace: bool = False

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int | None) -> int | None:
        if n is not None and n != 1:
            raise ValueError("only n=1 is supported: send one request per choice with different seeds, or ask for "
                             "strategy best_of_n / majority to sample several trajectories")
        return n

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop: str | list[str] | None) -> str | list[str] | None:
        items = [stop] if isinstance(stop, str) else stop or []
        if len(items) > 4 or any(not s for s in items):
            raise ValueError("stop takes up to 4 non-empty strings")
        return stop

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def budget(self) -> int | None:
        return self.max_tokens

    def to_config(self, *, limits: Limits) -> ReasonConfig:
        """The ReasonConfig of this request; out-of-range combinations raise ApiError 400."""
        budget = self.budget()
        if budget is not None and budget > limits.max_tokens:
            raise ApiError(400, f"max_tokens {budget} is over this server's limit of {limits.max_tokens}",
                           param="max_tokens", code="invalid_value")
        strategy = self.strategy or "stepwise"
        sampler = "verifier" if strategy == "verifier" else "speculator"
        fields: dict[str, tuple[str, Any]] = {
            "n_specs": ("search.n_specs", self.n_specs), "max_depth": ("search.max_depth", self.max_depth),
            "beam_width": ("search.beam_width", self.beam_width), "tree_depth": ("search.tree_depth", self.tree_depth),
            "threshold": ("stepwise.threshold", self.threshold), "candidates": ("stepwise.candidates", self.candidates),
            "score_mode": ("score.mode", self.score_mode), "temperature": (f"{sampler}.temperature", self.temperature),
            "top_p": (f"{sampler}.top_p", self.top_p), "seed": ("seed", self.seed),
            "max_tokens": ("limits.max_tokens", budget if budget is not None else limits.max_tokens)}
        overrides = {key: value for key, value in fields.values() if value is not None}
        try:
            config = make_config(strategy=strategy, preset=self.preset or "default", **overrides)
        except ConfigError as e:
            raise ApiError(400, str(e), code="invalid_value") from None
        branches = {"best_of_n": config.search.n_specs, "majority": config.search.n_specs,
                    "tree": config.search.beam_width ** 2, "stepwise": config.stepwise.candidates}.get(strategy, 1)
        if branches > limits.max_branches:
            raise ApiError(400, f"this request would run {branches} branches at once; this server allows "
                           f"{limits.max_branches} (lower n_specs, beam_width or candidates)", code="invalid_value")
        return config


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)

    def budget(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def problem(self) -> str:
        """The one user message: SpecReason solves one problem per request (no multi-turn, no system prompt)."""
        others = sorted({m.role for m in self.messages if m.role != "user"})
        if others or len(self.messages) != 1:
            raise ApiError(400, "send exactly one user message holding the problem; "
                           f"{'roles ' + ', '.join(others) + ' are' if others else 'several user messages are'} "
                           "not supported (the bundle's chat template builds the prompt)", param="messages")
        return self.messages[0].text()


class CompletionRequest(_Common):
    prompt: str | list[str]

    def problem(self) -> str:
        if isinstance(self.prompt, list):
            if len(self.prompt) != 1:
                raise ApiError(400, "prompt takes one string (or a list of one): one problem per request",
                               param="prompt")
            return self.prompt[0]
        return self.prompt


def parse(cls: type[_Common], data: Any) -> _Common:
    """Validate a decoded JSON body; the first problem becomes a 400 naming the field."""
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        param = ".".join(str(p) for p in err["loc"]) or None
        message = err["msg"]
        if err["type"] == "extra_forbidden":
            message = f"unknown field {param!r}: see README 'Serving' for the fields this server takes"
        return _raise(ApiError(400, f"{param}: {message}" if param else message, param=param,
                               code="unknown_field" if err["type"] == "extra_forbidden" else "invalid_value"))


def _raise(error: ApiError) -> _Common:
    raise error
