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
import functools
import json
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from types import FrameType
from typing import Any

import jinja2
import jinja2.ext
from jinja2 import nodes
from jinja2.compiler import CodeGenerator, Frame
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


# Bounds on rendering a chat template (the template comes from the bundle, so it is input like any other):
# real templates render a conversation in well under a millisecond into a few KB.
MAX_TEMPLATE_OUTPUT_CHARS = 1 << 20
TEMPLATE_DEADLINE_S = 2.0
_MAX_EXPONENT = 256


class TemplateLimitError(jinja2.exceptions.TemplateError):
    """A chat template went past the rendering bounds (time, output size, one huge value)."""


def _check_counts(args: Any, kwargs: dict[str, Any]) -> None:
    # A width, count or padding argument past the output bound ("x"|center(10**9), s.ljust(...)) would
    # build the huge value before its size could be checked: refuse it first.
    for a in [*args, *kwargs.values()]:
        if isinstance(a, int) and not isinstance(a, bool) and abs(a) > MAX_TEMPLATE_OUTPUT_CHARS:
            raise TemplateLimitError(f"an argument of {a} (at most {MAX_TEMPLATE_OUTPUT_CHARS})")


def _check_size(value: Any) -> Any:
    if isinstance(value, str | list | tuple | dict) and len(value) > MAX_TEMPLATE_OUTPUT_CHARS:
        raise TemplateLimitError(f"a value of {len(value)} items (at most {MAX_TEMPLATE_OUTPUT_CHARS})")
    return value


class _BoundedCodeGenerator(CodeGenerator):
    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:
        # `a ~ b` compiles to a join the sandbox does not see: check its result like any other value.
        self.write("environment.checked(")
        super().visit_Concat(node, frame)
        self.write(")")


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    """The sandbox transformers renders in, with every value a template builds (operators, `~`, calls,
    filters) limited in size, so no step can build a huge string or list (doubling in a loop included)."""

    intercepted_binops = frozenset({"*", "**", "+"})
    code_generator_class = _BoundedCodeGenerator

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.filters = {name: _checked_filter(f) for name, f in self.filters.items()}

    @staticmethod
    def checked(value: Any) -> Any:
        return _check_size(value)

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "**" and isinstance(right, int) and abs(right) > _MAX_EXPONENT:
            raise TemplateLimitError(f"an exponent of {right} (at most {_MAX_EXPONENT})")
        if operator == "*":
            for seq, count in ((left, right), (right, left)):
                if isinstance(seq, str | list | tuple) and isinstance(count, int) \
                        and len(seq) * count > MAX_TEMPLATE_OUTPUT_CHARS:
                    raise TemplateLimitError(f"a repetition of {len(seq) * count} items "
                                             f"(at most {MAX_TEMPLATE_OUTPUT_CHARS})")
        return _check_size(super().call_binop(context, operator, left, right))

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805 - jinja's names
        _check_counts(args, kwargs)
        return _check_size(super().call(__context, __obj, *args, **kwargs))


def _checked_filter(f: Any) -> Any:
    @functools.wraps(f)  # keeps jinja's pass_context / pass_environment marks
    def checked(*args: Any, **kwargs: Any) -> Any:
        _check_counts(args[1:], kwargs)  # args[0] is the filtered value (or jinja's context)
        return _check_size(f(*args, **kwargs))

    return checked


def compile_chat_template(template: str) -> jinja2.Template:
    """Compile a Hugging Face chat template in the environment transformers renders it in (bounded)."""
    env = _BoundedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _checked_filter(_tojson)
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(template)


def render_bounded(template: jinja2.Template, variables: dict[str, Any], *,
                   deadline_s: float = TEMPLATE_DEADLINE_S, max_chars: int = MAX_TEMPLATE_OUTPUT_CHARS) -> str:
    """Render with a time limit and an output limit; TemplateLimitError past either.

    Time: a trace function on the template's own frames (compiled templates run as Python code named
    "<template>") checks the clock at every line, so a loop that prints nothing is stopped as well; other
    frames are not traced. Output: the chunks are counted as they are produced.
    """
    deadline = time.monotonic() + deadline_s

    def line_check(frame: FrameType, event: str, arg: Any) -> Any:
        if time.monotonic() > deadline:
            raise TemplateLimitError(f"rendering took longer than {deadline_s:g} s")
        return line_check

    def on_call(frame: FrameType, event: str, arg: Any) -> Any:
        return line_check if frame.f_code.co_filename == "<template>" else None

    previous = sys.gettrace()
    sys.settrace(on_call)
    try:
        chunks, size = [], 0
        for chunk in template.generate(**variables):
            size += len(chunk)
            if size > max_chars:
                raise TemplateLimitError(f"the rendered prompt passed {max_chars} characters")
            chunks.append(chunk)
        return "".join(chunks)
    finally:
        sys.settrace(previous)


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
            return render_bounded(self._template, variables)
        except TemplateLimitError as e:
            raise TokenizerError(f"the chat template went past its bounds ({e}); fix the bundle's chat template "
                                 "or pass the prompt as raw text") from e
        except (jinja2.TemplateError, RecursionError) as e:
            raise TokenizerError(f"the chat template rejected the messages: {e}") from e

    def set_chat_template(self, template: str) -> None:
        """Use `template` instead of the manifest's (a deployment override, e.g. `serve --chat-template`); it is
        compiled now, so a template that does not compile is refused here."""
        try:
            compiled = compile_chat_template(template)
        except jinja2.TemplateSyntaxError as e:
            raise TokenizerError(f"the chat template does not compile ({e})") from e
        self.generation = replace(self.generation, chat_template=template)
        self._template = compiled

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
