"""Reading the final answer out of a solution's text, and comparing answers.

Two formats (AnswerConfig.format):
  answer_line   the text after the first "Answer:" up to the end of its line (the built-in task: "Answer: 46")
  boxed         the content of the last \\boxed{...}, braces balanced (math prompts)

Answers are normalised before they are compared or voted on: surrounding space and a trailing period go,
and an integer loses its zero padding ("07" == "7"), as the built-in task's grader does.
"""

from __future__ import annotations

import re

_ANSWER_LINE = re.compile(r"Answer:[ \t]*([^\n]*)")
_INTEGER = re.compile(r"[+-]?\d+")


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
    answer = answer.strip().rstrip(".").strip()
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
    if found is None or not found.strip():
        return None
    return normalize(found)


def is_correct(*, predicted: str | None, reference: str) -> bool:
    return predicted is not None and predicted == normalize(reference)
