"""`specreason bench verify`: a verification pass of several drafts on one forked context, in one forward at
B = drafts against one forward per draft at B = 1 (ours alone; a benchmark, never a test).

This is the verifier's pass in best-of-n and multi-candidate stepwise: the prompt is prefilled once and forked
into the drafts' branches, then every draft's tokens are fed with logits at every position (what scoring reads).
The two ways run interleaved, from identical caches, and must give identical logits (checked every run).
A gqa graph runs a multi-token forward on a cache at B > 1 branch by branch (ONNX Runtime's GroupQueryAttention
takes it at batch 1 only, engine.py), so there both columns measure the same work; a plain graph does it in one.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ConfigError
from .manifest import load_manifest
from .model import RoleModel


def bench_verify(*, bundle: str | Path, role: str = "verifier", context: int = 512, drafts: int = 4,
                 draft_tokens: int = 32, repeats: int = 5, threads: int = 0) -> dict[str, Any]:
    if min(context, drafts, draft_tokens, repeats) < 1:
        raise ConfigError("--context, --drafts, --draft-tokens and --repeats must be >= 1")
    entry = load_manifest(bundle).models[role]
    arch = entry.architecture
    if context + draft_tokens > arch.max_context:
        raise ConfigError(f"context + draft tokens = {context + draft_tokens} is over the model's max context "
                          f"{arch.max_context}; lower --context or --draft-tokens")
    model = RoleModel(bundle_dir=bundle, entry=entry, intra_op_threads=threads)
    rng = np.random.default_rng(0)
    prompt = rng.integers(4, arch.vocab_size, size=context).tolist()
    rows = rng.integers(4, arch.vocab_size, size=(drafts, draft_tokens)).tolist()  # [drafts, draft_tokens]

    def forked(branches: int):
        cache = model.new_cache(branches=1, capacity=context + draft_tokens)
        model.forward(cache=cache, tokens=[prompt])
        if branches > 1:
            cache.fork(branches)  # the prompt's cache into every draft's branch, as best-of-n does
        return cache

    batched_cache, single_cache = forked(drafts), forked(1)

    def batched() -> np.ndarray:
        batched_cache.lengths[:] = context  # drop the previous run's drafts
        return model.forward(cache=batched_cache, tokens=rows, all_logits=True)  # [drafts, draft_tokens, vocab]

    def one_by_one() -> np.ndarray:
        out = []
        for row in rows:
            single_cache.lengths[:] = context
            out.append(model.forward(cache=single_cache, tokens=[row], all_logits=True))
        return np.concatenate(out)  # [drafts, draft_tokens, vocab]

    ways = {"one_forward": batched, "one_per_draft": one_by_one}
    difference = float(np.abs(batched() - one_by_one()).max())  # also the warm-up of both shapes
    wall: dict[str, list[float]] = {k: [] for k in ways}
    cpu: dict[str, list[float]] = {k: [] for k in ways}
    for r in range(repeats):
        for name in (list(ways) if r % 2 == 0 else list(ways)[::-1]):  # interleaved A,B / B,A
            start, start_cpu = time.perf_counter(), time.process_time()
            ways[name]()
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    ratios = [a / b for a, b in zip(wall["one_forward"], wall["one_per_draft"], strict=True)]
    return {"benchmark": "verification pass: drafts on one forked context, one forward vs one per draft",
            "bundle": str(bundle), "role": role, "precision": entry.precision,
            "attention": entry.kv_cache.get("attention", "plain"), "threads": threads, "context": context,
            "drafts": drafts, "draft_tokens": draft_tokens, "repeats": repeats,
            "max_abs_logit_difference": difference,
            **{f"{k}_ms": round(statistics.median(v) * 1e3, 1) for k, v in wall.items()},
            **{f"{k}_cpu_ms": round(statistics.median(v) * 1e3, 1) for k, v in cpu.items()},
            "one_forward_over_one_per_draft": {"median": round(statistics.median(ratios), 3),
                                               "min": round(min(ratios), 3), "max": round(max(ratios), 3)}}
