"""The training recipe of the built-in pair: seeded, CPU-only, minutes per model.

Usage: python -m specreason_models.train --out DIR [--seed S] [--steps N] [--role speculator|verifier|both]

Reproducibility: torch.manual_seed(seed) fixes the initial weights, and the batches come in a fixed order from
task.train_stream(seed=...). Each role is saved as a Hugging Face directory DIR/<role>/ (config.json,
model.safetensors in float32, generation_config.json, tokenizer files, training.json).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
from transformers import GenerationConfig, LlamaForCausalLM

from .configs import ModelPreset, llama_config, preset, preset_dict
from .data import problem_batches
from .evaluate import accuracy_by_length, format_by_length
from .task import TaskConfig, heldout_split, length_batches
from .tokenizer import BOS_ID, EOS_ID, PAD_ID, build_tokenizer, save_tokenizer

WARMUP_STEPS = 50
MIN_LR_FRACTION = 0.1  # cosine decays to this fraction of the peak


def lr_at(*, step: int, steps: int, peak: float) -> float:
    """Linear warmup, then cosine decay to MIN_LR_FRACTION * peak at the last step."""
    if step < WARMUP_STEPS:
        return peak * (step + 1) / WARMUP_STEPS
    progress = (step - WARMUP_STEPS) / max(1, steps - WARMUP_STEPS)
    return peak * (MIN_LR_FRACTION + (1 - MIN_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * progress)))


def curriculum(*, start: int, top: int, ramp_steps: int) -> Callable[[int], int]:
    """Longest chain allowed at training step b: ``start`` at step 0, growing linearly to ``top`` at ramp_steps.

    Short chains first: the per-step skill is learned where sequences are cheap, then carried to long chains.
    """

    def max_ops_at(b: int) -> int:
        if ramp_steps <= 0:
            return top
        return min(top, start + (top - start) * b // ramp_steps)

    return max_ops_at


def train_model(
    *,
    p: ModelPreset,
    seed: int,
    steps: int | None = None,
    init: Path | None = None,
    config: TaskConfig | None = None,
    curriculum_start: int | None = None,
    ramp_fraction: float = 0.0,
    shortest: int | None = None,
    eval_every: int = 0,
    eval_n: int = 200,
    log: Callable[[str], None] = print,
) -> tuple[LlamaForCausalLM, list[float]]:
    """Train one model (from scratch, or from the weights in ``init``); returns it and the per-step losses.

    Batches hold one chain length each; the longest length grows from ``curriculum_start`` to
    ``config.max_ops`` over the first ``ramp_fraction`` of the steps (no curriculum when it is None).
    """
    steps = p.steps if steps is None else steps
    config = config or TaskConfig()
    torch.manual_seed(seed)
    if init is None:
        model = LlamaForCausalLM(llama_config(p))
    else:
        # Same architecture, longer position range: RoPE has no weights, so the v1 weights load unchanged.
        model = LlamaForCausalLM.from_pretrained(init, config=llama_config(p), dtype=torch.float32)
    tok = build_tokenizer()
    optimizer = torch.optim.AdamW(model.parameters(), lr=p.lr, betas=(0.9, 0.98), weight_decay=0.01)
    start_ops = config.max_ops if curriculum_start is None else curriculum_start
    max_ops_at = curriculum(start=start_ops, top=config.max_ops, ramp_steps=int(ramp_fraction * steps))
    data = problem_batches(
        tok=tok, problems=length_batches(
            seed=seed, batch=p.batch, max_ops_at=max_ops_at, config=config, shortest=shortest
        )
    )
    probe = heldout_split(n=eval_n, config=config) if eval_every else []
    losses: list[float] = []
    start = time.perf_counter()
    for step in range(steps):
        # 1. Set the scheduled learning rate.
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step=step, steps=steps, peak=p.lr)
        # 2. Forward on the next batch; the loss covers solution tokens only (labels carry IGNORE elsewhere).
        model.train()
        input_ids, attention_mask, labels = next(data)
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        # 3. Backward and update, with clipping so the high peak learning rate stays stable.
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        # 4. Report progress.
        if step % 50 == 0 or step == steps - 1:
            log(f"step {step:5d}/{steps}  loss {loss.item():.4f}  len {input_ids.shape[1]:3d}  "
                f"elapsed {time.perf_counter() - start:6.1f}s")
        if eval_every and (step + 1) % eval_every == 0:
            table = accuracy_by_length(model=model, tok=tok, problems=probe)
            acc = sum(s for s, _ in table.values()) / len(probe)
            log(f"step {step + 1:5d}  heldout[{eval_n}] accuracy {acc:.3f}  by length {format_by_length(table)}")
    return model, losses


def save_model(*, model: LlamaForCausalLM, out_dir: Path, meta: dict) -> None:
    """Write a Hugging Face directory: weights (float32 safetensors), configs, tokenizer, training metadata."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, do_sample=False, max_new_tokens=192
    )
    model.save_pretrained(out_dir, safe_serialization=True)
    save_tokenizer(out_dir)
    (out_dir / "training.json").write_text(json.dumps(meta, indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m specreason_models.train",
        description="Train the built-in speculator and/or verifier on the built-in task (CPU, seeded).",
    )
    parser.add_argument("--out", required=True, type=Path, help="output folder; each role goes to OUT/<role>/")
    parser.add_argument("--seed", type=int, default=0, help="seeds the weights and the training data order")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the preset's)")
    parser.add_argument("--role", choices=["speculator", "verifier", "both"], default="both")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--eval-every", type=int, default=0, help="report held-out accuracy every N steps (0: off)")
    parser.add_argument("--eval-n", type=int, default=200, help="held-out problems of that report")
    parser.add_argument("--init", type=Path, default=None,
                        help="start from the weights of this folder (it holds <role>/); default: from scratch")
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the preset's)")
    parser.add_argument("--batch", type=int, default=None, help="problems per step (default: the preset's)")
    parser.add_argument("--max-ops", type=int, default=TaskConfig().max_ops, help="longest chain trained on")
    parser.add_argument("--curriculum-start", type=int, default=None,
                        help="longest chain at step 0, growing linearly to --max-ops (default: no curriculum)")
    parser.add_argument("--min-ops", type=int, default=None,
                        help="shortest chain trained on (default: the task's); the held-out split excluded stays "
                             "the task's, so a fine-tune can dwell on long chains")
    parser.add_argument("--ramp", type=float, default=0.3, help="fraction of the steps the curriculum ramps over")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    roles = ["speculator", "verifier"] if args.role == "both" else [args.role]
    for role in roles:
        p = preset(role)
        if args.steps is not None:
            p = replace(p, steps=args.steps)
        if args.lr is not None:
            p = replace(p, lr=args.lr)
        if args.batch is not None:
            p = replace(p, batch=args.batch)
        config = replace(TaskConfig(), max_ops=args.max_ops)
        init = None if args.init is None else args.init / role
        print(f"== {role}: {preset_dict(p)}  seed {args.seed}  task {vars(config)}  init {init}", flush=True)
        start = time.perf_counter()
        model, losses = train_model(
            p=p, seed=args.seed, init=init, config=config, curriculum_start=args.curriculum_start,
            ramp_fraction=args.ramp, shortest=args.min_ops, eval_every=args.eval_every, eval_n=args.eval_n,
            log=lambda line: print(line, flush=True),
        )
        seconds = time.perf_counter() - start
        meta = {
            "role": role,
            "seed": args.seed,
            "preset": preset_dict(p),
            "task": vars(config),
            "init": None if init is None else str(init),
            "curriculum": {"start": args.curriculum_start, "top": config.max_ops, "ramp_fraction": args.ramp,
                           "shortest": args.min_ops},
            "command": "python -m specreason_models.train " + " ".join(argv if argv is not None else sys.argv[1:]),
            "train_seconds": round(seconds, 1),
            "final_loss": losses[-1],
            "threads": args.threads,
            "parameters": sum(t.numel() for t in model.parameters()),
        }
        save_model(model=model, out_dir=args.out / role, meta=meta)
        print(f"== {role}: saved to {args.out / role} after {seconds:.1f}s")


if __name__ == "__main__":
    main()
