"""Export self-check: ONNX Runtime against the PyTorch source on a ragged batch of branches.

The check runs the exported graph the way the runtime does — one batched prefill of prompts of different
lengths (right-padded, holes masked), then `decode_steps` batched greedy decode steps with the runtime's
KV cache — and compares every logit row it produced with the source model run on each branch alone.

    max_abs_logit_diff   max |logit_onnx - logit_torch| over every compared position and vocab entry
    greedy_agreement     share of generated positions where argmax(onnx) == argmax(torch), the torch
                         model being fed the same tokens (teacher forcing); 1.0 means the greedy
                         continuations are token-identical
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from specreason_rt.engine import OrtEngine
from specreason_rt.kv_cache import KVCache

from .onnx_export import KV_NAMES


@dataclasses.dataclass(frozen=True)
class Tolerance:
    max_abs_logit_diff: float | None  # None: recorded, not enforced (quantized weights change logits)
    min_greedy_agreement: float


# fp32 must match the source to float rounding; quantized exports are held to greedy agreement only.
DEFAULT_TOLERANCES = {
    "fp32": Tolerance(max_abs_logit_diff=1e-3, min_greedy_agreement=1.0),
    "int8": Tolerance(max_abs_logit_diff=None, min_greedy_agreement=0.7),
    "int4": Tolerance(max_abs_logit_diff=None, min_greedy_agreement=0.6),
}


def run_onnx(*, engine: OrtEngine, prompts: list[list[int]], decode_steps: int, kv_heads: int, head_dim: int,
             max_context: int) -> tuple[list[np.ndarray], list[list[int]]]:
    """Batched prefill + greedy decode. Returns per branch its logits [len + steps, vocab] and its tokens."""
    branches = len(prompts)
    lens = np.array([len(p) for p in prompts], np.int64)
    cache = KVCache(layers=engine.layers, kv_heads=kv_heads, head_dim=head_dim, branches=branches,
                    max_context=max_context, capacity=int(lens.max()) + decode_steps + 1)

    # 1. Prefill every prompt in one call; ask for logits at every prompt position.
    width = int(lens.max())
    ids = np.zeros((branches, width), np.int64)  # [branches, width], right-padded
    for b, p in enumerate(prompts):
        ids[b, :len(p)] = p
    index = np.tile(np.arange(width), (branches, 1))
    logits = engine.step(cache=cache, input_ids=ids, n_new=lens, logits_index=index)
    rows = [[logits[b, t] for t in range(lens[b])] for b in range(branches)]
    tokens = [list(p) for p in prompts]
    nxt = np.array([int(np.argmax(logits[b, lens[b] - 1])) for b in range(branches)], np.int64)

    # 2. Greedy decode, one token per branch per step, branches at different lengths.
    ones = np.ones(branches, np.int64)
    zero_index = np.zeros((branches, 1), np.int64)
    for _ in range(decode_steps):
        for b in range(branches):
            tokens[b].append(int(nxt[b]))
        logits = engine.step(cache=cache, input_ids=nxt[:, None], n_new=ones, logits_index=zero_index)
        for b in range(branches):
            rows[b].append(logits[b, 0])
        nxt = np.argmax(logits[:, 0], axis=-1).astype(np.int64)
    return [np.stack(r) for r in rows], tokens


def validate(*, model: Any, onnx_path: Path, attention: str, prompts: list[list[int]], precision: str,
             decode_steps: int = 8, tolerance: Tolerance | None = None) -> dict[str, Any]:
    """Compare the ONNX graph with `model`; return the report recorded in the manifest."""
    import torch

    if len(prompts) < 3 or len({len(p) for p in prompts}) < 2:
        raise ValueError("validation needs >= 3 prompts of different lengths")
    tol = tolerance or DEFAULT_TOLERANCES[precision]
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    engine = OrtEngine(model_path=onnx_path, layers=cfg.num_hidden_layers, kv_names=KV_NAMES[attention],
                       attention=attention)
    onnx_rows, tokens = run_onnx(engine=engine, prompts=prompts, decode_steps=decode_steps,
                                 kv_heads=cfg.num_key_value_heads, head_dim=head_dim,
                                 max_context=cfg.max_position_embeddings)

    max_diff, agree, total = 0.0, 0, 0
    for b, prompt in enumerate(prompts):
        with torch.no_grad():
            ref = model(torch.tensor([tokens[b]])).logits[0].float().numpy()  # [len + steps, vocab]
        ours = onnx_rows[b]
        max_diff = max(max_diff, float(np.abs(ours - ref).max()))
        gen = slice(len(prompt) - 1, None)  # positions whose argmax is a generated token
        agree += int((ours[gen].argmax(-1) == ref[gen].argmax(-1)).sum())
        total += ours[gen].shape[0]
    agreement = agree / total
    passed = agreement >= tol.min_greedy_agreement and (
        tol.max_abs_logit_diff is None or max_diff <= tol.max_abs_logit_diff)
    return {
        "passed": passed,
        "reference": "transformers (PyTorch, fp32) on the source weights, each branch run alone",
        "precision": precision,
        "attention": attention,
        "branches": len(prompts),
        "prompt_lengths": [len(p) for p in prompts],
        "decode_steps": decode_steps,
        "max_abs_logit_diff": max_diff,
        "greedy_agreement": agreement,
        "greedy_positions_checked": total,
        "tolerance": dataclasses.asdict(tol),
    }
