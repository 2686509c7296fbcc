"""The KV cache: a small object with explicit operations (STYLE.md §5).

Terms: a *branch* is one row of the batch; its *length* is how many tokens of it are cached. Each
branch's tokens sit left-aligned in slots 0..length-1 of a preallocated buffer; slots past a branch's
length are holes, masked out by the attention mask, so branches of different lengths share one batch.

The ONNX graphs return only the new tokens' keys and values; `append` writes them in place, so the
runtime never concatenates the whole cache per step.

Shared prefix (graphs of the "prefix" attention variant, `share_prefix=True`): when one branch is forked into
several (`fork`, or `gather` from one branch to many), its tokens move into a *prefix* segment held once,
`prefix_keys[i]` / `prefix_values[i]` [1, kv_heads, prefix_len, head_dim], and the per-branch buffers then hold
only what each branch adds after it (its *suffix*): token t >= prefix_len of branch b sits in slot
t - prefix_len. `lengths` still counts every token of a branch, prefix included, so callers see no difference.
Branches keep sharing the prefix through gather, append and rewinds above it; an operation that needs a branch's
own copy of prefix tokens (a rewind into the prefix at several branches, joining a cache with another prefix)
first gives every branch its copy (`materialize`: the unshared layout). A fork of a prompt shorter than
`min_prefix` tokens copies it into every branch as before (see SHARED_PREFIX_MIN_TOKENS).
A cache of one branch *folds* its tokens into the prefix segment as it grows (`maybe_fold`, before each
forward): the graph reads the segment in place but concatenates the per-branch past every forward, so a long
single-branch context (one trajectory decoding) is best kept there; a rewind of it into the prefix cuts the
segment.
"""

from __future__ import annotations

import math

import numpy as np

from .errors import CacheLimitError

# A fork shares the prompt only from this many tokens on; shorter prompts are copied into every branch. Measured
# (SmolLM2 fp32, B=8 decode, BENCHMARKS.md "Shared prefix"): shared and copied run alike at 16 tokens, shared is
# 1.4x faster at 64 and 2.3x at 256 (the copied layout concatenates every branch's whole past each forward).
SHARED_PREFIX_MIN_TOKENS = 16


class KVCache:
    # No shared prefix unless __init__ says so; also what subclasses that build their own buffers inherit
    # (backends/trt/kv.py: the device cache never shares).
    share_prefix = False
    min_prefix = SHARED_PREFIX_MIN_TOKENS
    prefix_len = 0

    def __init__(self, *, layers: int, kv_heads: int, head_dim: int, branches: int, max_context: int,
                 capacity: int = 64, dtype: type = np.float32, max_bytes: int | None = None,
                 share_prefix: bool = False, min_prefix: int = SHARED_PREFIX_MIN_TOKENS) -> None:
        if branches < 1:
            raise ValueError(f"branches must be >= 1, got {branches}")
        self.max_bytes = max_bytes
        self.bytes_per_token = 2 * layers * kv_heads * head_dim * np.dtype(dtype).itemsize  # keys + values
        self.layers, self.kv_heads, self.head_dim = layers, kv_heads, head_dim
        self.max_context = max_context
        self.dtype = dtype
        # The shared prefix (module docstring): on only for engines whose graph reads one ("prefix" attention).
        self.share_prefix, self.min_prefix = share_prefix, min_prefix
        self.prefix_len = 0
        self.prefix_keys: list[np.ndarray] = []  # [1, kv_heads, prefix_len, head_dim] per layer; [] = no prefix
        self.prefix_values: list[np.ndarray] = []
        capacity = min(max(capacity, 1), max_context)
        self._check_bytes(branches=branches, capacity=capacity)
        shape = (branches, kv_heads, capacity, head_dim)
        # keys[i], values[i]: [branches, kv_heads, capacity, head_dim]
        self.keys: list[np.ndarray] = [np.zeros(shape, dtype) for _ in range(layers)]
        self.values: list[np.ndarray] = [np.zeros(shape, dtype) for _ in range(layers)]
        self.lengths = np.zeros(branches, np.int64)  # [branches]: every token of a branch, prefix included

    @property
    def branches(self) -> int:
        return int(self.lengths.shape[0])

    @property
    def capacity(self) -> int:
        """Slots per branch buffer (tokens after the shared prefix)."""
        return int(self.keys[0].shape[2])

    @property
    def resident_bytes(self) -> int:
        """Bytes of keys and values held: the shared prefix once plus every branch's buffer."""
        return sum(a.nbytes for a in [*self.keys, *self.values, *self.prefix_keys, *self.prefix_values])

    def _check_bytes(self, *, branches: int, capacity: int) -> None:
        need = (branches * capacity + self.prefix_len) * self.bytes_per_token
        if self.max_bytes is not None and need > self.max_bytes:
            raise CacheLimitError(
                f"the KV cache for {branches} branches x {capacity} tokens needs {need / 2**20:.1f} MiB, over the "
                f"limit of {self.max_bytes / 2**20:.1f} MiB; use fewer branches or tokens, or raise the limit")

    def reserve(self, needed: int) -> None:
        """Grow the buffers (doubling) so that `needed` slots fit; refuse past max_context."""
        if needed > self.max_context:
            raise CacheLimitError(f"a branch would hold {needed} tokens but the model's max context is "
                                  f"{self.max_context}; shorten the prompt or lower max tokens")
        needed -= self.prefix_len  # slots after the shared prefix
        if needed <= self.capacity:
            return
        new_cap = min(max(needed, 2 * self.capacity), self.max_context - self.prefix_len)
        if self.max_bytes is not None and self.branches * new_cap * self.bytes_per_token > self.max_bytes:
            new_cap = needed  # doubling would cross the limit: grow to exactly what is needed
        self._check_bytes(branches=self.branches, capacity=new_cap)
        pad = ((0, 0), (0, 0), (0, new_cap - self.capacity), (0, 0))
        self.keys = [np.pad(k, pad) for k in self.keys]
        self.values = [np.pad(v, pad) for v in self.values]

    def step_inputs(self, n_new: np.ndarray, new_tokens: int) -> tuple[list[np.ndarray], list[np.ndarray],
                                                                       np.ndarray, np.ndarray]:
        """Inputs for one forward that adds n_new[b] (<= new_tokens) tokens to each branch.

        Returns past keys/values [branches, kv_heads, past, head_dim] (past = longest branch after the shared
        prefix), attention_mask [branches, past + new_tokens] over those slots and the new tokens, and
        position_ids [branches, new_tokens] (absolute: the prefix counts). The prefix itself is `prefix_keys`.
        A single branch first folds its own tokens into the prefix when that is due (maybe_fold).
        """
        self.maybe_fold()
        suffix = self.lengths - self.prefix_len  # [branches]
        past = int(suffix.max())
        slots = np.arange(past + new_tokens)
        mask = np.where(slots[None, :] < past, slots[None, :] < suffix[:, None],
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
            start, n = int(self.lengths[b]) - self.prefix_len, int(n_new[b])
            for layer in range(self.layers):
                self.keys[layer][b, :, start:start + n] = new_keys[layer][b, :, :n]
                self.values[layer][b, :, start:start + n] = new_values[layer][b, :, :n]
        self.lengths = self.lengths + n_new

    def gather(self, rows: np.ndarray | list[int]) -> None:
        """Keep, reorder or duplicate branches: new branch j is old branch rows[j].

        From one branch to several (a fork) the branch's tokens become the shared prefix (when sharing is on)."""
        idx = np.asarray(rows, np.int64)
        if self.share_prefix and self.branches == 1 and len(idx) > 1:
            self._share()
        self._check_bytes(branches=len(idx), capacity=self.capacity)
        self.keys = [k[idx] for k in self.keys]
        self.values = [v[idx] for v in self.values]
        self.lengths = self.lengths[idx].copy()

    def concat(self, other: KVCache) -> None:
        """Append other's branches after this cache's (copies both into buffers of the larger capacity)."""
        if (other.layers, other.kv_heads, other.head_dim) != (self.layers, self.kv_heads, self.head_dim):
            raise ValueError("cannot concatenate caches of different models")
        if self.prefix_keys is not other.prefix_keys:
            # Different prompts (a request joining a running batch): every branch needs its own copy.
            self.materialize()
            other.materialize()
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

    def _fold_due(self) -> bool:
        """Whether the single branch's own tokens should join the prefix segment.

        The first time from min_prefix tokens on. After that when its own tokens reach sqrt(2 * prefix_len)
        (and min_prefix): the branch's own tokens are concatenated by the graph every forward (about half that
        many on average) and a fold copies the prefix once, so this threshold minimises the copying per token."""
        length = int(self.lengths[0])
        if not self.prefix_len:
            return length >= self.min_prefix
        return length - self.prefix_len >= max(self.min_prefix, math.isqrt(2 * self.prefix_len))

    def maybe_fold(self) -> None:
        """One branch alone: fold its own tokens into the prefix segment when due, so that the graph reads its older
        tokens in place and concatenates only its recent ones every forward. Called before a forward (by
        step_inputs), not after one: tokens a rewind drops right after the forward that added them (a rejected
        draft) are never folded."""
        if self.share_prefix and self.branches == 1 and self._fold_due():
            self._fold()

    def _share(self) -> None:
        """Before a fork of the single branch: fold its tokens into the prefix segment when due (else its few own
        tokens are copied into every branch by the gather)."""
        if self._fold_due():
            self._fold()

    def _fold(self) -> None:
        """Move the single branch's own tokens into the prefix segment (one copy of prefix + them)."""
        length = int(self.lengths[0])
        suffix = length - self.prefix_len
        own_k = [k[:, :, :suffix] for k in self.keys]  # [1, kv_heads, suffix, head_dim]
        own_v = [v[:, :, :suffix] for v in self.values]
        if self.prefix_len:
            self.prefix_keys = [np.concatenate([p, k], axis=2) for p, k in zip(self.prefix_keys, own_k, strict=True)]
            self.prefix_values = [np.concatenate([p, v], axis=2)
                                  for p, v in zip(self.prefix_values, own_v, strict=True)]
        else:
            self.prefix_keys = [np.ascontiguousarray(k) for k in own_k]
            self.prefix_values = [np.ascontiguousarray(v) for v in own_v]
        room = max(self.capacity - suffix, 1)  # what the branch had reserved past its tokens
        shape = (1, self.kv_heads, room, self.head_dim)
        self.keys = [np.zeros(shape, self.dtype) for _ in range(self.layers)]
        self.values = [np.zeros(shape, self.dtype) for _ in range(self.layers)]
        self.prefix_len = length

    def materialize(self) -> None:
        """Give every branch its own copy of the shared prefix (the unshared layout); a no-op without one."""
        if not self.prefix_len:
            return
        p = self.prefix_len
        need = self.branches * (p + self.capacity) * self.bytes_per_token
        if self.max_bytes is not None and need > self.max_bytes:
            raise CacheLimitError(
                f"giving each of {self.branches} branches its own copy of the {p}-token shared prefix needs "
                f"{need / 2**20:.1f} MiB, over the limit of {self.max_bytes / 2**20:.1f} MiB; use fewer branches "
                "or tokens, or raise the limit")

        def full(prefix: np.ndarray, own: np.ndarray) -> np.ndarray:
            out = np.empty((own.shape[0], self.kv_heads, p + own.shape[2], self.head_dim), own.dtype)
            out[:, :, :p] = prefix  # broadcast over branches
            out[:, :, p:] = own
            return out

        self.keys = [full(a, b) for a, b in zip(self.prefix_keys, self.keys, strict=True)]
        self.values = [full(a, b) for a, b in zip(self.prefix_values, self.values, strict=True)]
        self.prefix_keys, self.prefix_values, self.prefix_len = [], [], 0

    def fork(self, n: int) -> None:
        """Turn a single prefilled branch (the prompt) into n identical branches, without recompute (sharing the
        prompt's keys/values when the cache shares prefixes, see the module docstring)."""
        if self.branches != 1:
            raise ValueError(f"fork expects one branch (the prompt), the cache holds {self.branches}")
        self.gather(np.zeros(n, np.int64))

    def rewind(self, branch: int, length: int) -> None:
        """Drop the tail of one branch (a rejected step) back to `length` tokens."""
        if not 0 <= length <= self.lengths[branch]:
            raise ValueError(f"cannot rewind branch {branch} of length {self.lengths[branch]} to {length}")
        if length < self.prefix_len and self.branches == 1:
            # Nobody else reads the prefix: cut it (one copy of what stays, contiguous for the graph).
            self.prefix_keys = [np.ascontiguousarray(p[:, :, :length]) for p in self.prefix_keys]
            self.prefix_values = [np.ascontiguousarray(p[:, :, :length]) for p in self.prefix_values]
            self.prefix_len = length
        elif length < self.prefix_len:
            self.materialize()  # the branch drops tokens the others keep: it needs its own copy
        self.lengths[branch] = length
