"""OpenAI response objects (chat.completion, text_completion) and their SSE chunks, from a RunResult.

finish_reason: "stop" for an answer, an eos, a stop string, a depth limit or a repeated step; "length" when the
token budget ran out. Every response carries `specreason`: a summary of the run (strategy, answer, finish,
acceptance, tokens per model), and with trace=true the whole RunResult JSON under specreason.trace.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from ..trace import RunResult


def finish_reason(result: RunResult, *, stopped: bool) -> str:
    return "stop" if stopped or result.finish != "budget" else "length"


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """The text up to the first stop string, and whether one was found."""
    cuts = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[:min(cuts)], True) if cuts else (text, False)


def summary(result: RunResult, *, trace: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"strategy": result.strategy, "answer": result.answer, "finish": result.finish,
                           "steps": len(result.steps), "speculator_steps": result.speculator_steps,
                           "acceptance": result.acceptance, "tokens": result.tokens,
                           "seconds": round(result.seconds, 6)}
    if trace:
        out["trace"] = result.to_json()
    return out


def usage(*, prompt_tokens: int, result: RunResult) -> dict[str, int]:
    completion = sum(s.tokens for s in result.steps)  # tokens of the committed solution (drafts not counted)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion}


class Envelope:
    """Id, timestamps and object kind shared by a response and all of its chunks."""

    def __init__(self, *, chat: bool, model: str) -> None:
        self.chat, self.model = chat, model
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())

    def _base(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def full(self, *, text: str, finish: str, usage: dict[str, int], specreason: dict[str, Any]) -> dict[str, Any]:
        if self.chat:
            choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text},
                                      "finish_reason": finish, "logprobs": None}
            return {**self._base("chat.completion"), "choices": [choice], "usage": usage, "specreason": specreason}
        choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
        return {**self._base("text_completion"), "choices": [choice], "usage": usage, "specreason": specreason}

    def chunk(self, *, text: str | None = None, finish: str | None = None, first: bool = False,
              usage: dict[str, int] | None = None, specreason: dict[str, Any] | None = None,
              no_choices: bool = False) -> str:
        """One SSE event. The usage chunk (stream_options.include_usage) has no choices, as in OpenAI's API."""
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
            if text is not None:
                delta["content"] = text
            choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            body = self._base("chat.completion.chunk")
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
            body = self._base("text_completion")
        body["choices"] = [] if no_choices else [choice]
        if usage is not None:
            body["usage"] = usage
        if specreason is not None:
            body["specreason"] = specreason
        return sse(body)


def sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"
