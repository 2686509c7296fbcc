"""Reading the final answer out of a solution's text, and comparing answers.

Two formats (AnswerConfig.format):
  answer_line   the text after the first "Answer:" up to the end of its line (the built-in task: "Answer: 46")
  boxed         the content of the last \\boxed{...}, braces balanced (math prompts)

Answers are normalised before they are compared or voted on: surrounding space, markdown emphasis (*, `) and
inline-math dollars and a trailing period go,
and an integer loses its zero padding ("07" == "7"), as the built-in task's grader does.

A chat model asked a plain question rarely writes the configured marker ("2 + 3 = 5. The answer is 5."), so the
final answer shown to a user and scored by `specreason eval` falls back (final_answer), in this order:
  1. the configured format          (source "answer_line" / "boxed")
  2. the other format               an "Answer:" line when boxed was asked for, and the reverse
  3. an answer phrase               "the answer is X", "final answer: X" (any case, markdown bold and $ stripped)
  4. the last number of the text    "... so 2 + 3 = 5." -> 5
The strategies themselves (stopping at an answer, voting) use only the configured format: a fallback there
would stop a solution at its first number.

Reference answers in problem sets come in their own conventions: GSM8K ends the solution with "#### 72",
MATH puts it in \\boxed{}; reference_answer reads both.
"""

from __future__ import annotations

import re

_ANSWER_LINE = re.compile(r"Answer:[ \t]*([^\n]*)")
_INTEGER = re.compile(r"[+-]?\d+")
# "The answer is 5", "final answer: **5**", "Answer = $5$": the phrase, then the rest of its sentence.
_ANSWER_PHRASE = re.compile(r"answer\W{0,4}(?:is\b\s*:?|[:=])\s*([^\n]*?)(?:\.\s|\.?$|\n)", re.IGNORECASE)
_NUMBER = re.compile(r"[+-]?\d+(?:[.,]\d+)*")
FORMATS = ("answer_line", "boxed")
# RunResult.finish values of a solution that was cut off before it could finish (no fallback answer for those).
CUT_OFF = frozenset({"budget", "depth", "repeat"})


def _boxed(text: str) -> str | None:
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 1, start + len("\\boxed{")
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j]
    return None  # unbalanced: the answer is not complete yet


def normalize(answer: str) -> str:
    # Markdown emphasis and inline-math dollars around an answer are formatting, not part of it ("**$5$**").
    answer = answer.strip().rstrip(".").strip("*$` \t").rstrip(".").strip()
    if _INTEGER.fullmatch(answer):
        return str(int(answer))
    return answer


def extract_answer(text: str, *, fmt: str = "answer_line") -> str | None:
    """The normalised answer in `text`, or None when there is none (yet)."""
    if fmt == "boxed":
        found = _boxed(text)
    else:
        match = _ANSWER_LINE.search(text)
        found = match.group(1) if match else None
    answer = normalize(found) if found is not None else ""
    return answer or None  # "Answer: **" holds no answer yet


def final_answer(text: str, *, fmt: str = "answer_line", cut_off: bool = False) -> tuple[str | None, str | None]:
    """(answer, source) of a solution, with the fallbacks in the module docstring; (None, None) if none.
    A cut-off solution (token budget, step limit) gets no fallback: its last number is not an answer."""
    found = extract_answer(text, fmt=fmt)
    if found is not None or cut_off:
        return found, fmt if found is not None else None
    other = next(f for f in FORMATS if f != fmt)
    found = extract_answer(text, fmt=other)
    if found is not None:
        return found, other
    phrases = [p for p in (normalize(m.group(1)) for m in _ANSWER_PHRASE.finditer(text)) if p]
    if phrases:
        return phrases[-1], "answer phrase"
    numbers = _NUMBER.findall(text)
    if numbers:
        return normalize(numbers[-1].replace(",", "")), "last number"
    return None, None


def expected_format(fmt: str) -> str:
    """What a solution must contain for its answer to be read, in words (for messages)."""
    return "'Answer: X' line" if fmt == "answer_line" else "\\boxed{X}"


def reference_answer(text: str) -> str:
    """The answer inside a problem set's reference: after GSM8K's '####', in MATH's \\boxed{}, else the text."""
    if "####" in text:
        return text.rsplit("####", 1)[1].strip()
    boxed = _boxed(text)
    return boxed if boxed is not None else text


def is_correct(*, predicted: str | None, reference: str) -> bool:
    return predicted is not None and predicted == normalize(reference)
