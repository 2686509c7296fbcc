"""Fast checks of the built-in task, its grader and its tokenizer (no training, no weights)."""

from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import pytest
from tokenizers import Tokenizer

from specreason_models import BUILTIN_NAMES, builtin_path
from specreason_models.task import (
    HELDOUT_SIZE,
    STEP_DELIMITER,
    TASK_V1,
    TaskConfig,
    extract_answer,
    format_prompt,
    generate_problem,
    grade,
    heldout_split,
    length_batches,
    n_steps,
    read_jsonl,
    train_stream,
    write_heldout_jsonl,
)
from specreason_models.tokenizer import BOS_ID, CHAT_TEMPLATE, EOS_ID, PAD_ID, encode_prompt, save_tokenizer


def _draw(seed: int, n: int) -> list:
    rng = np.random.default_rng(seed)
    return [generate_problem(rng=rng, config=TaskConfig(), problem_id=str(i)) for i in range(n)]


def test_generator_is_deterministic_by_seed():
    assert _draw(7, 20) == _draw(7, 20)
    assert _draw(7, 20) != _draw(8, 20)
    first = [p.question for p in itertools.islice(train_stream(seed=3), 50)]
    again = [p.question for p in itertools.islice(train_stream(seed=3), 50)]
    assert first == again


def test_heldout_split_is_fixed_unique_and_disjoint_from_train():
    heldout = heldout_split()
    assert len(heldout) == HELDOUT_SIZE
    questions = {p.question for p in heldout}
    assert len(questions) == HELDOUT_SIZE
    assert [p.question for p in heldout_split(n=10)] == [p.question for p in heldout[:10]]
    for seed in (0, 1):
        train = {p.question for p in itertools.islice(train_stream(seed=seed), 20000)}
        assert not train & questions


def test_solution_steps_are_delimited_and_correct():
    for p in heldout_split(n=200):
        *steps, answer_line = p.solution.split(STEP_DELIMITER)
        assert answer_line == f"Answer: {p.answer}"
        assert 2 <= len(steps) <= 12 and n_steps(p) == len(steps)
        value = int(steps[0][:2])
        assert p.question.startswith(steps[0][:2])
        for step in steps:
            lhs, rhs = step.split("=")
            x, op, y = int(lhs[:2]), lhs[2], int(lhs[3:])
            assert x == value
            value = {"+": x + y, "-": x - y, "*": x * y}[op] % 100
            assert int(rhs) == value and len(rhs) == 2
        assert int(p.answer) == value
        assert len(format_prompt(p.question)) + len(p.solution) <= 176


def test_heldout_split_covers_every_length():
    counts = Counter(n_steps(p) for p in heldout_split())
    assert sorted(counts) == list(range(2, 13))
    assert min(counts.values()) >= 150  # about 180 each: a by-length table has a usable sample per row
    v1 = Counter(n_steps(p) for p in heldout_split(n=300, config=TASK_V1))
    assert sorted(v1) == [2, 3]


def test_length_batches_hold_one_length_and_follow_the_curriculum():
    heldout = {p.question for p in heldout_split()}
    top = [3, 3, 5, 8, 12, 12]  # longest chain allowed at batch b
    batches = list(itertools.islice(length_batches(seed=0, batch=8, max_ops_at=lambda b: top[min(b, 5)]), 60))
    for b, group in enumerate(batches):
        lengths = {n_steps(p) for p in group}
        assert len(group) == 8 and len(lengths) == 1
        assert 2 <= lengths.pop() <= top[min(b, 5)]
        assert not {p.question for p in group} & heldout
    assert max(n_steps(g[0]) for g in batches) > 8  # the long end is reached
    again = list(itertools.islice(length_batches(seed=0, batch=8, max_ops_at=lambda b: top[min(b, 5)]), 60))
    assert again == batches


def test_length_batches_can_dwell_on_long_chains_and_still_skip_the_heldout_split():
    heldout = {p.question for p in heldout_split()}
    batches = list(itertools.islice(length_batches(seed=3, batch=8, max_ops_at=lambda b: 12, shortest=9), 40))
    lengths = {n_steps(p) for group in batches for p in group}
    assert lengths == {9, 10, 11, 12}
    assert not {p.question for group in batches for p in group} & heldout
    with pytest.raises(ValueError, match="shortest must be in"):
        next(length_batches(seed=3, batch=8, max_ops_at=lambda b: 12, shortest=13))


def test_hand_worked_problem():
    rng = np.random.default_rng(0)
    p = generate_problem(rng=rng, config=TaskConfig(min_ops=1, max_ops=1, mul_weight=1.0), problem_id="x")
    x, y = int(p.question[:2]), int(p.question[3:])
    assert p.question[2] == "*" and 2 <= y <= 9
    assert p.solution == f"{x:02d}*{y}={x * y % 100:02d}\n\nAnswer: {x * y % 100:02d}"


@pytest.mark.parametrize(
    ("generated", "reference", "ok"),
    [
        ("765-246=519\n\nAnswer: 731", "731", True),
        ("Answer: 047", "047", True),
        ("Answer: 47", "047", True),  # padding does not matter
        ("Answer:731</s>", "731", True),
        ("Answer: 730", "731", False),
        ("765-246=519\n\n", "731", False),  # no answer line
        ("", "0", False),
        ("Answer: 12\n\nAnswer: 731", "731", False),  # the first answer counts
    ],
)
def test_grader(generated, reference, ok):
    assert grade(generated=generated, reference=reference) is ok


def test_extract_answer():
    assert extract_answer("blah Answer: 007 more") == "7"
    assert extract_answer("no answer") is None


def test_heldout_jsonl_roundtrip(tmp_path):
    path = write_heldout_jsonl(path=tmp_path / "heldout.jsonl", n=5)
    records = read_jsonl(path)
    assert [set(r) for r in records] == [{"id", "question", "answer", "steps"}] * 5
    assert [r["steps"] for r in records] == [n_steps(p) for p in heldout_split(n=5)]
    assert [r["question"] for r in records] == [p.question for p in heldout_split(n=5)]


def test_tokenizer_round_trip_in_both_libraries(tmp_path):
    from transformers import AutoTokenizer

    save_tokenizer(tmp_path)
    raw = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    hf = AutoTokenizer.from_pretrained(tmp_path)
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (BOS_ID, EOS_ID, PAD_ID)
    delimiter_ids = raw.encode(STEP_DELIMITER).ids
    assert len(delimiter_ids) == 1 and raw.decode(delimiter_ids) == STEP_DELIMITER
    for p in heldout_split(n=20):
        text = format_prompt(p.question) + p.solution
        ids = raw.encode(text).ids
        assert hf(text)["input_ids"] == ids  # same ids, and no BOS added by either library
        assert raw.decode(ids) == text and hf.decode(ids) == text
        assert len(ids) < len(text)  # "\n\n" is one token
    assert BOS_ID not in raw.encode("Q: 1+2\n").ids


def test_chat_template_renders_the_training_prompt(tmp_path):
    from transformers import AutoTokenizer

    save_tokenizer(tmp_path)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    assert hf.chat_template == CHAT_TEMPLATE
    raw = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    question = heldout_split(n=1)[0].question
    rendered = hf.apply_chat_template([{"role": "user", "content": question}], tokenize=False)
    assert rendered == "<s>" + format_prompt(question)
    ids = hf.apply_chat_template([{"role": "user", "content": question}], tokenize=True)
    assert list(ids) == encode_prompt(raw, question) == raw.encode(rendered).ids


def test_builtin_path():
    assert BUILTIN_NAMES == ("speculator", "verifier")
    assert builtin_path("verifier").name == "verifier"
    with pytest.raises(ValueError, match="speculator, verifier"):
        builtin_path("drafter")
