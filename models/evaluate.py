"""Exact-solve accuracy of a model directory on the held-out split, with greedy decoding.

accuracy = (problems whose extracted answer equals the reference) / (problems evaluated).

Usage: python -m specreason_models.evaluate --model DIR [--n N] [--split heldout] [--batch B]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer
from transformers import LlamaForCausalLM

from .task import HELDOUT_SIZE, Problem, grade, heldout_split, n_steps
from .tokenizer import EOS_ID, PAD_ID, encode_prompt

MAX_NEW_TOKENS = 192  # the longest v2 solution (16 steps) is 155 tokens with EOS


@torch.no_grad()
def greedy_solutions(*, model: LlamaForCausalLM, tok: Tokenizer, questions: list[str], batch: int = 100) -> list[str]:
    """Greedy-decoded solution text per question (left-padded batches, KV cache via generate)."""
    model.eval()
    texts: list[str] = []
    for start in range(0, len(questions), batch):
        prompts = [encode_prompt(tok, q) for q in questions[start : start + batch]]
        width = max(len(p) for p in prompts)
        # input_ids, attention_mask: [rows, width], left-padded so every row's next token is at the end
        input_ids = torch.full((len(prompts), width), PAD_ID, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, ids in enumerate(prompts):
            input_ids[row, width - len(ids) :] = torch.tensor(ids)
            attention_mask[row, width - len(ids) :] = 1
        out = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=MAX_NEW_TOKENS,
            do_sample=False,
            eos_token_id=EOS_ID,
            pad_token_id=PAD_ID,
        )
        # out: [rows, width + new]; decode only the generated part, specials (EOS, PAD) dropped
        texts.extend(tok.decode(row[width:].tolist(), skip_special_tokens=True) for row in out)
    return texts


def accuracy(*, model: LlamaForCausalLM, tok: Tokenizer, problems: list[Problem], batch: int = 100) -> float:
    texts = greedy_solutions(model=model, tok=tok, questions=[p.question for p in problems], batch=batch)
    return sum(grade(generated=t, reference=p.answer) for t, p in zip(texts, problems, strict=True)) / len(problems)


def accuracy_by_length(
    *, model: LlamaForCausalLM, tok: Tokenizer, problems: list[Problem], batch: int = 100
) -> dict[int, tuple[int, int]]:
    """{steps: (solved, problems)} -- greedy exact-solve counts grouped by the reference's step count.

    Problems are decoded in length order so a batch pads little (the longest question sets its width).
    """
    ordered = sorted(problems, key=n_steps)
    texts = greedy_solutions(model=model, tok=tok, questions=[p.question for p in ordered], batch=batch)
    table: dict[int, tuple[int, int]] = {}
    for text, problem in zip(texts, ordered, strict=True):
        solved, total = table.get(n_steps(problem), (0, 0))
        table[n_steps(problem)] = (solved + grade(generated=text, reference=problem.answer), total + 1)
    return dict(sorted(table.items()))


def format_by_length(table: dict[int, tuple[int, int]]) -> str:
    return " ".join(f"{k}:{s / t:.2f}" for k, (s, t) in table.items())


def load(model_dir: str | Path) -> tuple[LlamaForCausalLM, Tokenizer]:
    model_dir = Path(model_dir)
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return model, Tokenizer.from_file(str(model_dir / "tokenizer.json"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m specreason_models.evaluate",
        description="Greedy exact-solve accuracy of a trained model directory on the built-in task.",
    )
    parser.add_argument("--model", required=True, help="Hugging Face model directory (e.g. models/builtin/verifier)")
    parser.add_argument("--n", type=int, default=500, help=f"problems from the start of the split (<= {HELDOUT_SIZE})")
    parser.add_argument("--split", choices=["heldout"], default="heldout", help="which split (only held-out)")
    parser.add_argument("--batch", type=int, default=100, help="problems decoded together")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    model, tok = load(args.model)
    problems = heldout_split(n=args.n)
    start = time.perf_counter()
    acc = accuracy(model=model, tok=tok, problems=problems, batch=args.batch)
    result = {
        "model": str(args.model),
        "split": args.split,
        "n": args.n,
        "accuracy": acc,
        "seconds": round(time.perf_counter() - start, 1),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
