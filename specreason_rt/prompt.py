"""What the models are asked: a problem, a chat conversation, or raw text to continue.

    Prompt.of("37+45*3")                                   one user turn (the problem)
    Prompt.chat([{"role": "system", ...}, {"role": "user", ...}, ...])   a conversation
    Prompt.text("Once upon a time")                        raw text, continued as is (no chat template)

A chat is rendered through each model's chat template: the problem is the last user turn, earlier turns and
system messages are context. A model without a chat template takes one user turn as plain text; a longer
conversation cannot be rendered for it (ConfigError). Every text is checked up front: a string that is not
valid Unicode (a lone UTF-16 surrogate, as a JSON body or a mis-decoded command line can carry) is refused
with ConfigError before a tokenizer sees it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .errors import ConfigError
from .tokenizer import Tokenizer

CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")


def check_text(text: object, *, what: str = "the problem") -> str:
    """`text` if it is a str that UTF-8 can encode; ConfigError naming the first bad character otherwise."""
    if not isinstance(text, str):
        raise ConfigError(f"{what} must be a string, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ConfigError(f"{what} is not valid Unicode: character {e.start} is {text[e.start]!r} (a lone "
                          "surrogate); send UTF-8 text") from None
    return text


@dataclass(frozen=True)
class Prompt:
    messages: tuple[tuple[str, str], ...] = ()  # (role, content) pairs of a chat
    raw: str | None = None  # raw text: encoded as is (with the tokenizer's special tokens, e.g. a BOS)

    @staticmethod
    def of(problem: str | Prompt) -> Prompt:
        if isinstance(problem, Prompt):
            return problem
        if not check_text(problem).strip():
            raise ConfigError("the problem is empty: pass the question text")
        return Prompt.chat([{"role": "user", "content": problem}])

    @staticmethod
    def chat(messages: Sequence[Mapping[str, object]]) -> Prompt:
        if not messages:
            raise ConfigError("the conversation is empty: send at least one user message")
        pairs = []
        for i, m in enumerate(messages):
            role = m.get("role")
            if role not in CHAT_ROLES:
                raise ConfigError(f"message {i} has role {role!r}: choose from {', '.join(CHAT_ROLES)}")
            pairs.append((str(role), check_text(m.get("content"), what=f"message {i}'s content")))
        if pairs[-1][0] != "user" or not pairs[-1][1].strip():
            raise ConfigError("the last message must be a non-empty user message: it holds the problem")
        return Prompt(messages=tuple(pairs))

    @staticmethod
    def text(raw: str) -> Prompt:
        if not check_text(raw, what="the prompt").strip():
            raise ConfigError("the prompt is empty: pass the text to continue")
        return Prompt(raw=raw)

    @property
    def problem(self) -> str:
        """The problem text: the last user turn, or the raw text."""
        return self.raw if self.raw is not None else self.messages[-1][1]

    @property
    def chars(self) -> int:
        return len(self.raw) if self.raw is not None else sum(len(c) for _, c in self.messages)

    def encode(self, tokenizer: Tokenizer) -> list[int]:
        """Token ids of this prompt for one model (its tokenizer, its chat template)."""
        if self.raw is not None:
            return tokenizer.encode(self.raw)
        if tokenizer.generation.chat_template is None:
            if len(self.messages) != 1:
                raise ConfigError("this bundle's models have no chat template, so a conversation cannot be "
                                  "rendered: send one user message, or the raw text as a completion prompt")
            return tokenizer.encode_prompt(self.problem)  # plain text, said once per model
        return tokenizer.encode_chat([{"role": r, "content": c} for r, c in self.messages])
