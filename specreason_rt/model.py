"""A loaded model of one role: its engine, its manifest entry and the forward passes the loops need.

Terms (used across the runtime):
  branch   one row of the batch: one partial trajectory with its own rows of the KV cache
  pending  the last sampled token of a branch; it is not in the cache yet and is fed by the next forward
  prefill  one forward over many new tokens per branch (a prompt, a step to verify)
  decode   one forward over one new token per branch
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .engine import OrtEngine
from .kv_cache import KVCache
from .manifest import ModelEntry


class RoleModel:
    def __init__(self, *, bundle_dir: str | Path, entry: ModelEntry, providers: list[str] | None = None,
                 intra_op_threads: int = 0, kv_limit_bytes: int | None = None) -> None:
        self.entry = entry
        self.kv_limit_bytes = kv_limit_bytes
        self.arch = entry.architecture
        self.generation = entry.generation
        self.engine = OrtEngine.from_bundle(bundle_dir=bundle_dir, entry=entry, providers=providers,
                                            intra_op_threads=intra_op_threads)

    def new_cache(self, *, branches: int = 1, capacity: int = 256) -> KVCache:
        return KVCache(layers=self.arch.layers, kv_heads=self.arch.kv_heads, head_dim=self.arch.head_dim,
                       branches=branches, max_context=self.arch.max_context, capacity=capacity,
                       max_bytes=self.kv_limit_bytes)

    def forward(self, *, cache: KVCache, tokens: list[list[int]], all_logits: bool = False) -> np.ndarray:
        """Append tokens[b] to branch b (an empty list leaves it unchanged) and return logits.

        Returns [branches, vocab] at each branch's last new token, or with all_logits
        [branches, max_new, vocab] at every new position (rows past len(tokens[b]) are padding).
        A branch given no tokens gets the row of a masked dummy token: ignore it.
        """
        n_new = np.array([len(t) for t in tokens], np.int64)  # [branches]
        width = max(int(n_new.max()), 1)
        ids = np.full((cache.branches, width), self.generation.pad_id, np.int64)  # [branches, width]
        for b, t in enumerate(tokens):
            ids[b, :len(t)] = t
        if all_logits:
            index = np.tile(np.arange(width, dtype=np.int64), (cache.branches, 1))  # [branches, width]
        else:
            index = np.maximum(n_new - 1, 0)[:, None]  # [branches, 1]: only what the sampler needs
        logits = self.engine.step(cache=cache, input_ids=ids, n_new=n_new, logits_index=index)
        return logits if all_logits else logits[:, 0]
