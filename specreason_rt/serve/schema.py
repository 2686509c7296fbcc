"""Request bodies of the OpenAI-compatible API and their mapping to a ReasonConfig.

Standard fields: model, messages (chat: system, developer, user, assistant and tool turns, rendered through the
bundle's chat template; the last user turn is the problem) or prompt (completions: raw text, continued as is),
max_tokens (max_completion_tokens), temperature, top_p, seed, stream, stream_options.include_usage, n (1 only),
stop, user. SpecReason options travel as extra body fields (the openai client's `extra_body`): strategy, preset,
n_specs, stop_after, threshold, score_mode, candidates, max_depth, beam_width, tree_depth, trace.

Standard OpenAI fields this server cannot honour (IGNORED: presence_penalty, logprobs, tools, ...) and unknown
fields are ignored, as vLLM does (refusing them breaks clients built for OpenAI): the server logs a warning and
the response lists them under specreason.ignored. A malformed value of a known field is still refused (400):
the ignored standard fields are type-checked too. Past `MAX_JSON_DEPTH` levels of nesting a body is refused.

temperature / top_p set the sampling of the model that samples: the speculator, or the verifier for
strategy "verifier" (whose default is greedy). stop cuts the returned text at the first stop string.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..config import PRESETS, SCORE_MODES, STRATEGIES, ReasonConfig, make_config
from ..errors import ConfigError
from ..prompt import Prompt
from .errors import ApiError

MAX_JSON_DEPTH = 32  # a chat body needs 5 levels (body, messages, message, content parts, part)
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)


def json_depth(body: bytes) -> int:
    """How deeply arrays and objects nest in a JSON text (checked before parsing: the parser recurses)."""
    skeleton = np.frombuffer(_JSON_STRING.sub(b"", body), np.uint8)  # brackets inside strings do not count
    steps = (np.isin(skeleton, (ord("["), ord("{"))).astype(np.int32)
             - np.isin(skeleton, (ord("]"), ord("}"))).astype(np.int32))
    return int(np.cumsum(steps).max(initial=0))

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
    body_timeout_s: float = 30.0  # a body not fully received in this time is refused (408)
    keepalive_s: float = 5.0  # a stream idle this long (a step being verified) gets an SSE comment

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_prompt_chars", "max_tokens", "max_branches"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("timeout_s", "body_timeout_s", "keepalive_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not (0 < value < math.inf):
                raise ConfigError(f"{name} must be a number of seconds > 0, got {value!r}")


@dataclass(frozen=True)
class Defaults:
    """Server-wide run settings (`specreason serve --strategy --preset --set ... --config FILE`); a request's
    own fields win. Applied in this order: the server's preset, its overrides, the request's preset, the
    request's fields."""

    strategy: str = "stepwise"
    preset: str = "default"
    overrides: dict[str, Any] = field(default_factory=dict)  # dotted ReasonConfig fields

    def __post_init__(self) -> None:
        make_config(strategy=self.strategy, preset=self.preset, **self.overrides)  # ConfigError if wrong

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class _Lenient(BaseModel):
    """A request object: known fields are checked strictly, unknown ones kept aside (model_extra) and ignored."""

    model_config = ConfigDict(extra="allow", strict=True)


class StreamOptions(_Lenient):
    include_usage: bool = False


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None  # None: an assistant turn that only called tools
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


# Standard OpenAI fields this server accepts and ignores (type-checked, so a malformed value is still a 400).
IGNORED = ("presence_penalty", "frequency_penalty", "logprobs", "top_logprobs", "logit_bias", "tools",
           "tool_choice", "parallel_tool_calls", "response_format", "metadata", "store", "service_tier",
           "reasoning_effort", "modalities", "prediction", "functions", "function_call", "best_of", "echo", "suffix",
           "web_search_options", "audio")


class _Common(_Lenient):
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
    stop_after: int | None = Field(default=None, ge=0)
    threshold: float | None = Field(default=None, ge=0, le=10)
    score_mode: ScoreMode | None = None
    candidates: int | None = Field(default=None, ge=1)
    max_depth: int | None = Field(default=None, ge=1, le=64)
    beam_width: int | None = Field(default=None, ge=1)
    tree_depth: int | None = Field(default=None, ge=1, le=16)
    trace: bool = False
    # Standard fields that are accepted and ignored (see IGNORED).
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    logprobs: bool | int | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    logit_bias: dict[str, float] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    reasoning_effort: str | None = None
    modalities: list[str] | None = None
    prediction: dict[str, Any] | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    best_of: int | None = Field(default=None, ge=1)
    echo: bool | None = None
    suffix: str | None = None
    web_search_options: dict[str, Any] | None = None
    audio: dict[str, Any] | None = None

    def ignored(self) -> list[str]:
        """Fields this request set that the server ignores: standard ones it cannot honour, then unknown ones."""
        standard = [f for f in IGNORED if getattr(self, f) not in (None, False, 0, [], {})]
        return standard + sorted(self.model_extra or {})

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

    def to_config(self, *, limits: Limits, defaults: Defaults | None = None) -> ReasonConfig:
        """The ReasonConfig of this request over the server's defaults; out-of-range combinations raise 400."""
        defaults = defaults or Defaults()
        budget = self.budget()
        if budget is not None and budget > limits.max_tokens:
            raise ApiError(400, f"max_tokens {budget} is over this server's limit of {limits.max_tokens}",
                           param="max_tokens", code="invalid_value")
        strategy = self.strategy or defaults.strategy
        sampler = "verifier" if strategy == "verifier" else "speculator"
        fields: dict[str, tuple[str, Any]] = {
            "n_specs": ("search.n_specs", self.n_specs), "stop_after": ("search.stop_after", self.stop_after),
            "max_depth": ("search.max_depth", self.max_depth),
            "beam_width": ("search.beam_width", self.beam_width), "tree_depth": ("search.tree_depth", self.tree_depth),
            "threshold": ("stepwise.threshold", self.threshold), "candidates": ("stepwise.candidates", self.candidates),
            "score_mode": ("score.mode", self.score_mode), "temperature": (f"{sampler}.temperature", self.temperature),
            "top_p": (f"{sampler}.top_p", self.top_p), "seed": ("seed", self.seed),
            "max_tokens": ("limits.max_tokens", budget)}
        server_budget = min(int(defaults.overrides.get("limits.max_tokens", limits.max_tokens)), limits.max_tokens)
        overrides = {**PRESETS[defaults.preset], **defaults.overrides, "limits.max_tokens": server_budget,
                     **(PRESETS[self.preset] if self.preset else {}),
                     **{key: value for key, value in fields.values() if value is not None}}
        try:
            config = make_config(strategy=strategy, **overrides)
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

    def prompt(self) -> Prompt:
        """The conversation: rendered through the chat template; the last user message is the problem."""
        try:
            return Prompt.chat([{"role": m.role, "content": m.text()} for m in self.messages])
        except ConfigError as e:
            raise ApiError(400, str(e), param="messages") from None


class CompletionRequest(_Common):
    prompt: str | list[str]

    def prompt_text(self) -> Prompt:
        """The raw text to continue (no chat template: a completion continues exactly what it is given)."""
        if isinstance(self.prompt, list) and len(self.prompt) != 1:
            raise ApiError(400, "prompt takes one string (or a list of one): one problem per request",
                           param="prompt")
        try:
            return Prompt.text(self.prompt[0] if isinstance(self.prompt, list) else self.prompt)
        except ConfigError as e:
            raise ApiError(400, str(e), param="prompt") from None


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
