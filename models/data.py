"""Training batches: token ids of BOS + prompt + solution + EOS, with the loss on the solution only."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from tokenizers import Tokenizer

from .task import Problem
from .tokenizer import EOS_ID, PAD_ID, encode_prompt

IGNORE = -100  # label value torch's cross-entropy skips


def encode_example(*, tok: Tokenizer, problem: Problem) -> tuple[list[int], int]:
    """(ids, prompt_len): the full sequence and how many leading ids are prompt (no loss there)."""
    prompt = encode_prompt(tok, problem.question)
    solution = tok.encode(problem.solution).ids
    return [*prompt, *solution, EOS_ID], len(prompt)


def collate(*, tok: Tokenizer, problems: list[Problem]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded batch.

    Returns input_ids [batch, seq], attention_mask [batch, seq], labels [batch, seq] (IGNORE on prompt and pad).
    """
    encoded = [encode_example(tok=tok, problem=p) for p in problems]
    seq = max(len(ids) for ids, _ in encoded)
    input_ids = torch.full((len(problems), seq), PAD_ID, dtype=torch.long)
    attention_mask = torch.zeros((len(problems), seq), dtype=torch.long)
    labels = torch.full((len(problems), seq), IGNORE, dtype=torch.long)
    for row, (ids, prompt_len) in enumerate(encoded):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
        # labels are the inputs; the model shifts them by one internally
        labels[row, prompt_len : len(ids)] = torch.tensor(ids[prompt_len:])
    return input_ids, attention_mask, labels


def batches(
    *, tok: Tokenizer, stream: Iterator[Problem], batch: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Consecutive batches from a seeded stream: the data order is a pure function of the seed."""
    while True:
        yield collate(tok=tok, problems=[next(stream) for _ in range(batch)])


def problem_batches(
    *, tok: Tokenizer, problems: Iterator[list[Problem]]
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Collated batches from a stream of problem lists (e.g. task.length_batches)."""
    for group in problems:
        yield collate(tok=tok, problems=group)
