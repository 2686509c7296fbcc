"""Text in and out of token ids: encoding, chat templates, streaming decode and step boundaries.

Terms used below:

    stable text     text a stream of token ids has produced that no later token can change: it never ends in
                    half a UTF-8 character (decoders show an incomplete byte sequence as U+FFFD, which a later
                    token may complete) and never precedes text the decoder would still rewrite.
    pending text    the decoded text of ids pushed after the last stable text; it may end in U+FFFD and may
                    still change. It becomes stable when a later token completes it, or by `flush()`.
    step            a span of generated text ending at the manifest's step delimiter ("\\n\\n" by default).
                    A step boundary is a token: the token whose text completes the delimiter ends the step.

`StreamDecoder` turns one token id at a time into stable text with the `tokenizers` library's own
`decoders.DecodeStream` (the prefix-offset technique: decode a short window of recent ids and emit only what
extends the previous window's text). `StepDetector` searches the text for the delimiter, so it finds it
whether the delimiter is one token, split over several ("\\n" then "\\n"), or merged into a larger token
(SmolLM2's BPE vocabulary has " \\n\\n", "\\n\\n " and "\\n\\n\\n"; others have ".\\n\\n" or "\\n\\nThe").
"""

from __future__ import annotations

import datetime
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.decoders import DecodeStream

from .errors import SpecReasonError
from .manifest import Generation

log = logging.getLogger(__name__)


class TokenizerError(SpecReasonError):
    """The tokenizer files, the manifest's generation facts or a chat request do not fit together."""


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # transformers overrides jinja's tojson: no HTML escaping, and the json.dumps options are exposed.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


def compile_chat_template(template: str) -> jinja2.Template:
    """Compile a Hugging Face chat template in the environment transformers renders it in."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(template)


class Tokenizer:
    """A `tokenizers` tokenizer (tokenizer.json) plus the manifest's generation facts for the same model."""

    def __init__(self, *, path: str | Path, generation: Generation) -> None:
        path = Path(path)
        if not path.is_file():
            raise TokenizerError(f"tokenizer file {path} is missing; the bundle's manifest names it, re-export")
        try:
            self.backend = HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a plain Exception for unreadable files
            raise TokenizerError(f"{path} is not a tokenizer.json the tokenizers library can read ({e})") from e
        self.generation = generation
        self.vocab_size = self.backend.get_vocab_size(with_added_tokens=True)
        ids = [generation.pad_id, *generation.eos_ids] + ([generation.bos_id] if generation.bos_id is not None else [])
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise TokenizerError(f"the manifest's generation ids {bad} are outside {path}'s vocabulary of "
                                 f"{self.vocab_size}; the tokenizer does not belong to this model, re-export")
        self._template: jinja2.Template | None = None
        self._path = path
        self._said_plain = False

    @property
    def has_chat_template(self) -> bool:
        return bool(self.generation.chat_template)

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`. add_special_tokens applies the tokenizer's post-processor (e.g. a BOS)."""
        return list(self.backend.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        return str(self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens))

    def token_string(self, token_id: int) -> str:
        """The vocabulary entry of `token_id` (what transformers calls a token, e.g. "<|im_end|>")."""
        token = self.backend.id_to_token(int(token_id))
        if token is None:
            raise TokenizerError(f"token id {token_id} is not in the vocabulary (size {self.vocab_size})")
        return str(token)

    def render_chat(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True) -> str:
        """The manifest's chat template applied to `messages`, as transformers' apply_chat_template(tokenize=False).

        The result already holds the template's special tokens (BOS, role markers): encode it with
        add_special_tokens=False (or call `encode_chat`), or the post-processor adds a second BOS.
        """
        template = self.generation.chat_template
        if not template:
            raise TokenizerError("this model's manifest has no chat template, so chat messages cannot be "
                                 "rendered; pass the prompt as raw text instead")
        if self._template is None:
            try:
                self._template = compile_chat_template(template)
            except jinja2.TemplateSyntaxError as e:
                raise TokenizerError(f"the manifest's chat template does not compile ({e}); re-export the "
                                     "bundle or pass the prompt as raw text") from e
        gen = self.generation
        variables: dict[str, Any] = {
            "messages": messages,
            "add_generation_prompt": add_generation_prompt,
            "bos_token": self.token_string(gen.bos_id) if gen.bos_id is not None else None,
            "eos_token": self.token_string(gen.eos_ids[0]) if gen.eos_ids else None,
            "tools": None,
            "documents": None,
        }
        try:
            return str(self._template.render(**variables))
        except jinja2.TemplateError as e:
            raise TokenizerError(f"the chat template rejected the messages: {e}") from e

    def encode_prompt(self, text: str) -> list[int]:
        """Token ids of one user prompt: the chat template around it when the model has one, else the plain text
        with the tokenizer's own special tokens (its BOS), which is what a base model was trained on (the
        Gemma-3-270M GGUF ships no template). The first plain prompt is said once per tokenizer on this module's
        logger, so a user sees that no chat formatting was applied."""
        if self.has_chat_template:
            return self.encode_chat([{"role": "user", "content": text}])
        if not self._said_plain:
            self._said_plain = True
            log.warning("%s: the model has no chat template; prompts are passed as plain text",
                        self._path.parent.name or self._path)
        return self.encode(text)

    def encode_chat(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True) -> list[int]:
        """Token ids of the rendered chat; the template supplies the special tokens, so none are added."""
        return self.encode(self.render_chat(messages, add_generation_prompt=add_generation_prompt),
                           add_special_tokens=False)


class StreamDecoder:
    """Incremental detokenisation of one token stream: push ids, get stable text.

    Joining every `push` result and the final `flush()` gives `tokenizer.decode(all ids)`.
    context: ids already decoded before the stream starts (e.g. the prompt), used only so that the first
    tokens decode as they would in place (a leading space is not dropped); it must end on a whole character.
    """

    # How many already-released ids give `pending()` enough left context to decode new ids in place.
    _CONTEXT_IDS = 4

    def __init__(self, *, tokenizer: Tokenizer, skip_special_tokens: bool = True, context: Sequence[int] = ()):
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._restart(context)

    def _restart(self, context: Sequence[int]) -> None:
        context = [int(i) for i in context]
        self._stream = DecodeStream(ids=context or None, skip_special_tokens=self._skip)
        self._recent: list[int] = context[-self._CONTEXT_IDS:]  # released ids, ending on a whole character
        self._unread: list[int] = []  # ids pushed since the last released text

    def push(self, token_id: int) -> str:
        """Add one token; return the text it makes stable ("" when it must wait for more tokens)."""
        token_id = int(token_id)
        try:
            text = self._stream.step(self._tok.backend, token_id)
        except Exception as e:  # DecodeStream raises a plain Exception when its window stops matching
            raise TokenizerError(f"streaming decode failed at token {token_id} ({e}); decode the whole "
                                 "sequence with Tokenizer.decode instead") from e
        self._unread.append(token_id)
        if text is None:
            return ""
        self._recent = (self._recent + self._unread)[-self._CONTEXT_IDS:]
        self._unread = []
        return str(text)

    def pending(self) -> str:
        """The held-back text of the ids not yet released, decoded lossily (may end in U+FFFD)."""
        if not self._unread:
            return ""
        before = self._tok.decode(self._recent, skip_special_tokens=self._skip)
        both = self._tok.decode(self._recent + self._unread, skip_special_tokens=self._skip)
        if both.startswith(before):
            return both[len(before):]
        return self._tok.decode(self._unread, skip_special_tokens=self._skip)

    def flush(self) -> str:
        """Release the pending text as it stands (at the end of a stream) and start over without context.

        Text pushed after a flush that completes a flushed partial character decodes as U+FFFD, exactly as
        decoding the two parts separately would.
        """
        text = self.pending()
        self._restart(())
        return text


@dataclass(frozen=True)
class Step:
    ids: tuple[int, ...]  # the step's token ids; the last one completed the delimiter (unless finish() cut it)
    text: str  # the step's stable text, delimiter included


class StepDetector:
    """Finds step boundaries in one branch's token stream (one detector per branch).

    `push(token_id)` returns True when the text since the last boundary (or reset) now contains the
    delimiter: that token completes a step, which is then available as `last_step`, and the next push starts
    a new step. A token is never split: when its text runs past the delimiter (the BPE token "\\n\\nThe",
    or "\\n\\n " in SmolLM2's vocabulary), the step ends at that token and its text keeps the part after the
    delimiter; the next step's text starts after that token. Because the decoder runs on across boundaries,
    the step texts joined (plus `finish()` of the last one) equal the decode of all pushed ids.

    The delimiter is searched in stable plus pending text, so a boundary is found at its token even when the
    decoder holds text back. Rare case: when the boundary token also ends in half a character, the step takes
    that pending text lossily (U+FFFD) and the decoder restarts (see `StreamDecoder.flush`).
    """

    def __init__(self, *, tokenizer: Tokenizer, delimiter: str | None = None, context: Sequence[int] = ()):
        self.delimiter = tokenizer.generation.step_delimiter if delimiter is None else delimiter
        if not self.delimiter:
            raise TokenizerError("the step delimiter is empty; set one (e.g. '\\n\\n') when exporting the bundle")
        self._tok = tokenizer
        self.reset(context=context)

    def reset(self, *, context: Sequence[int] = ()) -> None:
        """Forget the current step (e.g. after its draft was rejected); context as in StreamDecoder."""
        self._stream = StreamDecoder(tokenizer=self._tok, context=context)
        self._ids: list[int] = []
        self._text = ""
        self.last_step: Step | None = None

    @property
    def step_ids(self) -> tuple[int, ...]:
        """Ids of the step in progress."""
        return tuple(self._ids)

    @property
    def step_text(self) -> str:
        """Stable text of the step in progress."""
        return self._text

    def push(self, token_id: int) -> bool:
        """Add one token of this branch; True when it completes a step (see the class docstring)."""
        stable_before = len(self._text)
        self._ids.append(int(token_id))
        self._text += self._stream.push(token_id)
        pending = self._stream.pending()
        # Only text after the old stable text is new (pending text may have changed), plus enough of the
        # old text for a delimiter that straddles it.
        start = max(0, stable_before - len(self.delimiter) + 1)
        if self.delimiter not in (self._text + pending)[start:]:
            return False
        if pending:
            self._text += self._stream.flush()
        self.last_step = Step(ids=tuple(self._ids), text=self._text)
        self._ids, self._text = [], ""
        return True

    def finish(self) -> Step:
        """End the step in progress without a delimiter (eos, token budget), flushing pending text."""
        step = Step(ids=tuple(self._ids), text=self._text + self._stream.flush())
        self._ids, self._text = [], ""
        self.last_step = step
        return step
