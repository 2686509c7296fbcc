"""The KV cache: a small object with explicit operations (STYLE.md §5).

Terms: a *branch* is one row of the batch; its *length* is how many tokens of it are cached. Each
branch's tokens sit left-aligned in slots 0..length-1 of a preallocated buffer; slots past a branch's
length are holes, masked out by the attention mask, so branches of different lengths share one batch.

The ONNX graphs return only the new tokens' keys and values; `append` writes them in place, so the
runtime never concatenates the whole cache per step.
"""

from __future__ import annotations

import numpy as np

from .errors import CacheLimitError


class KVCache:
    def __init__(self, *, layers: int, kv_heads: int, head_dim: int, branches: int, max_context: int,
                 capacity: int = 64, dtype: type = np.float32, max_bytes: int | None = None) -> None:
        if branches < 1:
            raise ValueError(f"branches must be >= 1, got {branches}")
        self.max_bytes = max_bytes
        self.bytes_per_token = 2 * layers * kv_heads * head_dim * np.dtype(dtype).itemsize  # keys + values
        self.layers, self.kv_heads, self.head_dim = layers, kv_heads, head_dim
        self.max_context = max_context
        self.dtype = dtype
        capacity = min(max(capacity, 1), max_context)
        self._check_bytes(branches=branches, capacity=capacity)
        shape = (branches, kv_heads, capacity, head_dim)
        # keys[i], values[i]: [branches, kv_heads, capacity, head_dim]
        self.keys: list[np.ndarray] = [np.zeros(shape, dtype) for _ in range(layers)]
        self.values: list[np.ndarray] = [np.zeros(shape, dtype) for _ in range(layers)]
        self.lengths = np.zeros(branches, np.int64)  # [branches]

    @property
    def branches(self) -> int:
        return int(self.lengths.shape[0])

    @property
    def capacity(self) -> int:
        return int(self.keys[0].shape[2])

    def _check_bytes(self, *, branches: int, capacity: int) -> None:
        need = branches * capacity * self.bytes_per_token
        if self.max_bytes is not None and need > self.max_bytes:
            raise CacheLimitError(
                f"the KV cache for {branches} branches x {capacity} tokens needs {need / 2**20:.1f} MiB, over the "
                f"limit of {self.max_bytes / 2**20:.1f} MiB; use fewer branches or tokens, or raise the limit")

    def reserve(self, needed: int) -> None:
        """Grow the buffers (doubling) so that `needed` slots fit; refuse past max_context."""
        if needed > self.max_context:
            raise CacheLimitError(f"a branch would hold {needed} tokens but the model's max context is "
                                  f"{self.max_context}; shorten the prompt or lower max tokens")
        if needed <= self.capacity:
            return
        new_cap = min(max(needed, 2 * self.capacity), self.max_context)
        if self.max_bytes is not None and self.branches * new_cap * self.bytes_per_token > self.max_bytes:
            new_cap = needed  # doubling would cross the limit: grow to exactly what is needed
        self._check_bytes(branches=self.branches, capacity=new_cap)
        pad = ((0, 0), (0, 0), (0, new_cap - self.capacity), (0, 0))
        self.keys = [np.pad(k, pad) for k in self.keys]
        self.values = [np.pad(v, pad) for v in self.values]

    def step_inputs(self, n_new: np.ndarray, new_tokens: int) -> tuple[list[np.ndarray], list[np.ndarray],
                                                                       np.ndarray, np.ndarray]:
        """Inputs for one forward that adds n_new[b] (<= new_tokens) tokens to each branch.

        Returns past keys/values [branches, kv_heads, past, head_dim] (past = longest branch),
        attention_mask [branches, past + new_tokens] and position_ids [branches, new_tokens].
        """
        past = int(self.lengths.max())
        slots = np.arange(past + new_tokens)
        mask = np.where(slots[None, :] < past, slots[None, :] < self.lengths[:, None],
                        (slots[None, :] - past) < n_new[:, None]).astype(np.int64)
        positions = self.lengths[:, None] + np.arange(new_tokens)[None, :]  # [branches, new_tokens]
        keys = [np.ascontiguousarray(k[:, :, :past]) for k in self.keys]
        values = [np.ascontiguousarray(v[:, :, :past]) for v in self.values]
        return keys, values, mask, positions.astype(np.int64)

    def append(self, new_keys: list[np.ndarray], new_values: list[np.ndarray], n_new: np.ndarray) -> None:
        """Write the first n_new[b] new entries of each branch after its current length.

        new_keys[i], new_values[i]: [branches, kv_heads, new_tokens, head_dim]
        """
        self.reserve(int((self.lengths + n_new).max()))
        for b in range(self.branches):
            start, n = int(self.lengths[b]), int(n_new[b])
            for layer in range(self.layers):
                self.keys[layer][b, :, start:start + n] = new_keys[layer][b, :, :n]
                self.values[layer][b, :, start:start + n] = new_values[layer][b, :, :n]
        self.lengths = self.lengths + n_new

    def gather(self, rows: np.ndarray | list[int]) -> None:
        """Keep, reorder or duplicate branches: new branch j is old branch rows[j]."""
        idx = np.asarray(rows, np.int64)
        self._check_bytes(branches=len(idx), capacity=self.capacity)
        self.keys = [k[idx] for k in self.keys]
        self.values = [v[idx] for v in self.values]
        self.lengths = self.lengths[idx].copy()

    def concat(self, other: KVCache) -> None:
        """Append other's branches after this cache's (copies both into buffers of the larger capacity)."""
        if (other.layers, other.kv_heads, other.head_dim) != (self.layers, self.kv_heads, self.head_dim):
            raise ValueError("cannot concatenate caches of different models")
        capacity, ours = max(self.capacity, other.capacity), self.branches
        self._check_bytes(branches=ours + other.branches, capacity=capacity)

        def joined(a: np.ndarray, b: np.ndarray) -> np.ndarray:  # slice copies: np.pad costs more than the data
            out = np.zeros((ours + b.shape[0], self.kv_heads, capacity, self.head_dim), a.dtype)
            out[:ours, :, :a.shape[2]] = a
            out[ours:, :, :b.shape[2]] = b
            return out

        self.keys = [joined(a, b) for a, b in zip(self.keys, other.keys, strict=True)]
        self.values = [joined(a, b) for a, b in zip(self.values, other.values, strict=True)]
        self.lengths = np.concatenate([self.lengths, other.lengths])

    def fork(self, n: int) -> None:
        """Turn a single prefilled branch (the prompt) into n identical branches, without recompute."""
        if self.branches != 1:
            raise ValueError(f"fork expects one branch (the prompt), the cache holds {self.branches}")
        self.gather(np.zeros(n, np.int64))

    def rewind(self, branch: int, length: int) -> None:
        """Drop the tail of one branch (a rejected step) back to `length` tokens."""
        if not 0 <= length <= self.lengths[branch]:
            raise ValueError(f"cannot rewind branch {branch} of length {self.lengths[branch]} to {length}")
        self.lengths[branch] = length
