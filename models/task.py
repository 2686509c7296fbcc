"""The built-in reasoning task: chained 2-digit arithmetic modulo 100, solved step by step.

Terms used everywhere in this package:

* **question** -- an expression evaluated strictly left to right, e.g. ``"76-24*4"``.
  Operands of ``+`` and ``-`` have ``digits`` digits; the operand of ``*`` is one digit (2..9).
* **step** -- one line ``"x op y = z"`` (written ``"76-24=52"``) where ``x`` is the running value,
  ``z = (x op y) mod 10**digits``, and every value is zero-padded to ``digits`` digits. Steps are separated by
  :data:`STEP_DELIMITER` (a blank line), as in the SpecReason paper.
* **solution** -- the steps, the delimiter, then the answer line ``"Answer: 08"``.
* **prompt** -- :func:`format_prompt` of the question; training and evaluation use the same function.

Why this is hard enough: each step needs (1) the right operand copied from the question (an induction-style
lookup that needs at least two layers) and (2) most-significant-digit-first arithmetic, where the first digit
depends on the carry from the lower digit, in a single forward pass. Measured in pilots (models/README.md):
one-layer models fail at the copy, a two-layer 64-wide speculator learns the copy but makes arithmetic errors,
and the eight-layer verifier learns both.

Splits: the held-out split is drawn from its own fixed seed; the train stream uses the training seed and skips
any question that is in the held-out split, so the two are disjoint by construction (and tested). The space of
questions (~10^6 to 10^8 per length) is much larger than what training sees, so the model must generalize.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

STEP_DELIMITER = "\n\n"
ANSWER_PREFIX = "Answer: "

# Seed streams: entropy pairs for np.random.default_rng so train and held-out never share a stream.
HELDOUT_SEED = 20250407
HELDOUT_SIZE = 2000
_TRAIN_STREAM = 0
_HELDOUT_STREAM = 1

_ANSWER_RE = re.compile(r"Answer:\s*(-?\d+)")


@dataclass(frozen=True)
class TaskConfig:
    """Difficulty knobs of the task; the defaults are the built-in task."""

    min_ops: int = 2  # operations per question (= steps per solution), drawn uniformly in [min_ops, max_ops]
    # v2: reasoning-trace length, up to 12 steps (~30 to ~160 tokens); v1 stopped at 3 (TASK_V1). 12, not the
    # issue's 16: what the verifier's fine-tune could reach on one shared CPU thread in the time there was.
    max_ops: int = 12
    digits: int = 2  # digits of + / - operands and of every running value (values are mod 10**digits)
    mul_weight: float = 0.3  # probability that an operation is '*'

    def __post_init__(self) -> None:
        if not 1 <= self.min_ops <= self.max_ops:
            raise ValueError(f"need 1 <= min_ops <= max_ops, got {self.min_ops}, {self.max_ops}")
        if not 1 <= self.digits <= 4:
            raise ValueError(f"digits must be 1..4, got {self.digits}")
        if not 0.0 <= self.mul_weight <= 1.0:
            raise ValueError(f"mul_weight must be in [0, 1], got {self.mul_weight}")

    @property
    def modulus(self) -> int:
        return 10**self.digits


def n_steps(problem: Problem) -> int:
    """Steps in a problem's reference solution (= operations in its question)."""
    return problem.solution.count(STEP_DELIMITER)


TASK_V1 = TaskConfig(max_ops=3)  # the first built-in task (2-3 steps), kept for comparisons


@dataclass(frozen=True)
class Problem:
    id: str
    question: str
    solution: str  # steps joined by STEP_DELIMITER, then the answer line
    answer: str  # the reference answer, zero-padded like the steps ("30", "07")


def _fmt(value: int, digits: int) -> str:
    return f"{value:0{digits}d}"


def _apply(x: int, op: str, y: int, modulus: int) -> int:
    if op == "+":
        return (x + y) % modulus
    if op == "-":
        return (x - y) % modulus
    return (x * y) % modulus


def generate_problem(*, rng: np.random.Generator, config: TaskConfig, problem_id: str) -> Problem:
    """Draw one problem; the draw order is fixed so a seed always gives the same problem."""
    n_ops = int(rng.integers(config.min_ops, config.max_ops + 1))
    hi = 10**config.digits
    lo = 10 ** (config.digits - 1)
    value = int(rng.integers(lo, hi))
    question = [_fmt(value, config.digits)]
    steps = []
    for _ in range(n_ops):
        if rng.random() < config.mul_weight:
            op, operand = "*", int(rng.integers(2, 10))
            text = str(operand)  # one digit, not padded: it is not a running value
        else:
            op = "+" if rng.random() < 0.5 else "-"
            operand = int(rng.integers(lo, hi))
            text = _fmt(operand, config.digits)
        result = _apply(value, op, operand, config.modulus)
        question.append(op + text)
        steps.append(f"{_fmt(value, config.digits)}{op}{text}={_fmt(result, config.digits)}")
        value = result
    answer = _fmt(value, config.digits)
    solution = STEP_DELIMITER.join([*steps, ANSWER_PREFIX + answer])
    return Problem(id=problem_id, question="".join(question), solution=solution, answer=answer)


def format_prompt(question: str) -> str:
    """The text the model sees before its solution (without the BOS token, which the tokenizer adds)."""
    return f"Q: {question}\n"


def extract_answer(text: str) -> str | None:
    """The answer after the first 'Answer:' in generated text, as a canonical integer string, or None."""
    match = _ANSWER_RE.search(text)
    if match is None:
        return None
    return str(int(match.group(1)))


def grade(*, generated: str, reference: str) -> bool:
    """Exact match of the extracted answer against the reference, ignoring zero padding ("07" == "7")."""
    got = extract_answer(generated)
    return got is not None and got == str(int(reference))


def heldout_split(*, n: int = HELDOUT_SIZE, config: TaskConfig | None = None) -> list[Problem]:
    """The first ``n`` held-out problems (n <= HELDOUT_SIZE); deterministic, independent of any training seed."""
    if not 0 <= n <= HELDOUT_SIZE:
        raise ValueError(f"the held-out split has {HELDOUT_SIZE} problems, asked for {n}")
    config = config or TaskConfig()
    rng = np.random.default_rng([HELDOUT_SEED, _HELDOUT_STREAM])
    problems: list[Problem] = []
    seen: set[str] = set()
    while len(problems) < n:
        problem = generate_problem(rng=rng, config=config, problem_id=f"heldout-{len(problems):05d}")
        if problem.question not in seen:  # unique questions so accuracy counts distinct problems
            seen.add(problem.question)
            problems.append(problem)
    return problems


def length_batches(
    *,
    seed: int,
    batch: int,
    max_ops_at: Callable[[int], int],
    config: TaskConfig | None = None,
    shortest: int | None = None,
) -> Iterator[list[Problem]]:
    """Endless seeded batches of training problems, all problems of a batch with the same step count.

    Batch ``b`` draws its step count uniformly in ``[shortest, max_ops_at(b)]`` (a curriculum when
    ``max_ops_at`` grows; ``shortest`` defaults to ``config.min_ops`` and lets a fine-tune dwell on long chains
    while the held-out split that is excluded stays ``config``'s). One length per batch keeps padding (wasted
    compute) near zero at trace length.
    Never yields a held-out question of ``config``'s split.
    """
    config = config or TaskConfig()
    excluded = {p.question for p in heldout_split(n=HELDOUT_SIZE, config=config)}
    rng = np.random.default_rng([seed, _TRAIN_STREAM])
    index = 0
    b = 0
    low = config.min_ops if shortest is None else shortest
    if not config.min_ops <= low <= config.max_ops:
        raise ValueError(f"shortest must be in [{config.min_ops}, {config.max_ops}], got {shortest}")
    while True:
        top = min(config.max_ops, max(low, max_ops_at(b)))
        length = int(rng.integers(low, top + 1))
        fixed = replace(config, min_ops=length, max_ops=length)
        problems: list[Problem] = []
        while len(problems) < batch:
            problem = generate_problem(rng=rng, config=fixed, problem_id=f"train-{seed}-{index:08d}")
            index += 1
            if problem.question not in excluded:
                problems.append(problem)
        yield problems
        b += 1


def train_stream(*, seed: int, config: TaskConfig | None = None) -> Iterator[Problem]:
    """An endless, seeded stream of training problems that never contains a held-out question."""
    config = config or TaskConfig()
    excluded = {p.question for p in heldout_split(n=HELDOUT_SIZE, config=config)}
    rng = np.random.default_rng([seed, _TRAIN_STREAM])
    index = 0
    while True:
        problem = generate_problem(rng=rng, config=config, problem_id=f"train-{seed}-{index:08d}")
        index += 1
        if problem.question not in excluded:
            yield problem


def problem_record(problem: Problem) -> dict[str, str | int]:
    """The JSONL record the evaluation CLIs read: {"id", "question", "answer", "steps"}.

    ``steps`` (the reference solution's step count) is what ``specreason eval`` groups its by-length table on.
    """
    return {"id": problem.id, "question": problem.question, "answer": problem.answer, "steps": n_steps(problem)}


def write_jsonl(*, problems: Iterable[Problem], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for problem in problems:
            f.write(json.dumps(problem_record(problem)) + "\n")
    return path


def write_heldout_jsonl(*, path: str | Path, n: int = HELDOUT_SIZE) -> Path:
    """Write the held-out split (first ``n`` problems) as JSONL lines {"id", "question", "answer"}."""
    return write_jsonl(problems=heldout_split(n=n), path=path)


def read_jsonl(path: str | Path) -> list[dict[str, str]]:
    with Path(path).open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m specreason_models.task",
                                description="Write the built-in task's held-out split as JSONL "
                                            "({\"id\", \"question\", \"answer\"} per line) for specreason eval.")
    p.add_argument("--heldout", required=True, metavar="FILE.jsonl", help="where to write the split")
    p.add_argument("--n", type=int, default=HELDOUT_SIZE, help=f"first N problems (default {HELDOUT_SIZE})")
    args = p.parse_args(argv)
    if not 1 <= args.n <= HELDOUT_SIZE:
        p.error(f"--n must be in 1..{HELDOUT_SIZE}")
    print(write_heldout_jsonl(path=args.heldout, n=args.n))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
