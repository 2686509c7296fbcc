"""Candidate steps for training and measuring the value head: correct, corrupted, or sampled from the speculator.

Terms:

* **context** -- BOS + prompt + the first ``k`` reference steps, each followed by the step delimiter: what a
  verifier has seen before it judges the next step.
* **candidate** -- the tokens of the next step as a runtime feeds them to the verifier: ``"x op y=z"`` plus the
  delimiter token (id 100) for an ordinary step, ``"Answer: N"`` plus EOS for the answer line. The value head
  reads the verifier's state at the candidate's last token, so both kinds end on a token that closes the step.
* **label** -- 1 when the candidate equals the reference step token for token, else 0.

The corruptions imitate the speculator's measured mistakes (models/README.md: operand copies right in 85% of
steps, arithmetic with carries/borrows its weak spot): a wrong result digit, the tens digit off by a carry, a
wrong operand or running value copied (with the result computed consistently from it, the speculator's usual
pattern), a wrong operator, a wrong answer line.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable

import numpy as np
from tokenizers import Tokenizer

from .task import ANSWER_PREFIX, STEP_DELIMITER, Problem, format_prompt
from .tokenizer import BOS_ID, EOS_ID

STEP_RE = re.compile(r"^(\d+)([+\-*])(\d+)=(\d+)$")
STEP_CORRUPTIONS = ("result_digit", "carry", "operand", "running_value", "operator")
MODULUS = 100  # the built-in task's values are two digits


@dataclasses.dataclass(frozen=True)
class Example:
    context: list[int]  # BOS + prompt + k reference steps
    candidate: list[int]  # the step judged, ending in the delimiter token or EOS
    label: int  # 1 = identical to the reference step
    kind: str  # "correct", a corruption name, or "speculator"


def steps_of(problem: Problem) -> list[str]:
    """The solution's parts: each step "x op y=z", then the answer line."""
    return problem.solution.split(STEP_DELIMITER)


def _tokens(tok: Tokenizer, part: str, *, last: bool) -> list[int]:
    # The answer line ends the solution, so the model closes it with EOS; every other step with the delimiter.
    return tok.encode(part).ids + [EOS_ID] if last else tok.encode(part + STEP_DELIMITER).ids


def context_ids(tok: Tokenizer, problem: Problem, k: int) -> list[int]:
    parts = steps_of(problem)[:k]
    return [BOS_ID, *tok.encode(format_prompt(problem.question) + "".join(p + STEP_DELIMITER for p in parts)).ids]


def _other(rng: np.random.Generator, value: int, choices: Iterable[int]) -> int:
    pool = [c for c in choices if c != value]
    return int(rng.choice(pool))


def _apply(x: int, op: str, y: int) -> int:
    return (x + y) % MODULUS if op == "+" else (x - y) % MODULUS if op == "-" else (x * y) % MODULUS


def corrupt_step(step: str, *, kind: str, question: str, rng: np.random.Generator) -> str:
    """A wrong version of `step` ("x op y=z"), differing from it, made the way `kind` says."""
    x_s, op, y_s, z_s = STEP_RE.match(step).groups()  # type: ignore[union-attr]
    x, y, z = int(x_s), int(y_s), int(z_s)
    if kind == "result_digit":
        pos = int(rng.integers(2))
        digits = list(z_s)
        digits[pos] = str(_other(rng, int(digits[pos]), range(10)))
        return f"{x_s}{op}{y_s}={''.join(digits)}"
    if kind == "carry":
        return f"{x_s}{op}{y_s}={(z + (10 if rng.random() < 0.5 else -10)) % MODULUS:02d}"
    if kind == "operand":
        # Prefer another operand of the question (a wrong copy), else any value of the same format.
        operands = [int(t) for t in re.findall(r"[+\-](\d+)", question)] if op != "*" else []
        pool = [v for v in operands if v != y] or ([*range(2, 10)] if op == "*" else [*range(10, 100)])
        y2 = _other(rng, y, pool)
        y2_s = str(y2) if op == "*" else f"{y2:02d}"
        return f"{x_s}{op}{y2_s}={_apply(x, op, y2):02d}"
    if kind == "running_value":
        x2 = _other(rng, x, range(10, 100))
        return f"{x2:02d}{op}{y_s}={_apply(x2, op, y):02d}"
    if kind == "operator":
        if op == "*":  # '*' has a one-digit operand: a swapped operator would not be well formed
            return corrupt_step(step, kind="carry", question=question, rng=rng)
        op2 = "-" if op == "+" else "+"
        # Half the time the result follows the wrong operator, half the time it stays (an operator typo).
        z2 = _apply(x, op2, y) if rng.random() < 0.5 else z
        return f"{x_s}{op2}{y_s}={z2:02d}"
    raise ValueError(f"unknown corruption {kind!r}; valid: {', '.join(STEP_CORRUPTIONS)}")


def corrupt_answer(answer_line: str, *, earlier: list[int], rng: np.random.Generator) -> str:
    """A wrong answer line: a digit changed, the tens off by a carry, or an earlier running value."""
    value = int(answer_line[len(ANSWER_PREFIX):])
    choice = rng.random()
    if choice < 1 / 3 and any(v != value for v in earlier):
        wrong = _other(rng, value, earlier)
    elif choice < 2 / 3:
        wrong = (value + (10 if rng.random() < 0.5 else -10)) % MODULUS
    else:
        wrong = (value + int(rng.integers(1, 10))) % MODULUS
    return f"{ANSWER_PREFIX}{wrong:02d}"


def make_example(*, tok: Tokenizer, problem: Problem, rng: np.random.Generator, corrupt: bool) -> Example:
    """One candidate at a random step of `problem`: the reference step, or a corruption of it."""
    parts = steps_of(problem)
    k = int(rng.integers(len(parts)))
    last = k == len(parts) - 1
    part, kind = parts[k], "correct"
    if corrupt:
        if last:
            earlier = [int(p.split("=")[1]) for p in parts[:-1]] + [int(problem.question[:2])]
            part, kind = corrupt_answer(part, earlier=earlier, rng=rng), "answer"
        else:
            kind = STEP_CORRUPTIONS[int(rng.integers(len(STEP_CORRUPTIONS)))]
            part = corrupt_step(part, kind=kind, question=problem.question, rng=rng)
        if part == parts[k]:  # a corruption that happens to reproduce the step is not a negative
            return make_example(tok=tok, problem=problem, rng=rng, corrupt=True)
    return Example(context=context_ids(tok, problem, k), candidate=_tokens(tok, part, last=last),
                   label=int(not corrupt), kind=kind)


def make_examples(*, tok: Tokenizer, problems: Iterable[Problem], rng: np.random.Generator) -> list[Example]:
    """One example per problem, alternating correct and corrupted so the set is balanced."""
    return [make_example(tok=tok, problem=p, rng=rng, corrupt=bool(i % 2)) for i, p in enumerate(problems)]


def speculator_examples(*, speculator: object, tok: Tokenizer, problems: list[Problem], rng: np.random.Generator,
                        temperature: float = 0.7, batch: int = 256) -> list[Example]:
    """Real candidates: the speculator samples the next step after a random number of reference steps.

    Labelled by comparing with the reference step token for token. Sampling uses torch's global generator,
    seeded here from `rng`, so a seed reproduces the set on one machine.
    """
    import torch

    from .tokenizer import PAD_ID

    torch.manual_seed(int(rng.integers(2**31)))
    delimiter_id = tok.token_to_id(STEP_DELIMITER)
    out: list[Example] = []
    for start in range(0, len(problems), batch):
        chunk = problems[start:start + batch]
        ks = [int(rng.integers(len(steps_of(p)))) for p in chunk]
        contexts = [context_ids(tok, p, k) for p, k in zip(chunk, ks, strict=True)]
        width = max(len(c) for c in contexts)
        ids = torch.full((len(chunk), width), PAD_ID, dtype=torch.long)  # [rows, width], left-padded
        mask = torch.zeros_like(ids)
        for row, c in enumerate(contexts):
            ids[row, width - len(c):] = torch.tensor(c)
            mask[row, width - len(c):] = 1
        with torch.no_grad():
            gen = speculator.generate(  # type: ignore[attr-defined]
                input_ids=ids, attention_mask=mask, do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                max_new_tokens=16, eos_token_id=[delimiter_id, EOS_ID], pad_token_id=PAD_ID)
        for p, k, c, row in zip(chunk, ks, contexts, gen[:, width:].tolist(), strict=True):
            cut = next((i + 1 for i, t in enumerate(row) if t in (delimiter_id, EOS_ID)), len(row))
            candidate = row[:cut]
            reference = _tokens(tok, steps_of(p)[k], last=k == len(steps_of(p)) - 1)
            out.append(Example(context=c, candidate=candidate, label=int(candidate == reference), kind="speculator"))
    return out
