"""The KV cache of the TensorRT backend: the host KVCache's operations and semantics, buffers on the GPU.

Same terms and invariants as kv_cache.py: each branch's tokens sit left-aligned in slots 0..length-1, slots past
a branch's length are holes (masked out), `fork` / `gather` / `rewind` / `reserve` mean the same. What differs:

  * the buffers are one device allocation laid out [layers * 2, branches * kv_heads, capacity, head_dim]
    (see trt_plan.py); `key_address(layer)` / `value_address(layer)` are what the engine binds as
    past_key.{i} / past_value.{i} [branches, kv_heads, capacity, head_dim];
  * every operation is a handful of device-to-device 3D copies planned by trt_plan (append: one per branch,
    grow: one, gather: one per kept branch); nothing crosses to the host;
  * there are no host arrays: `keys` / `values` are empty and `step_inputs` refuses.

Memory is anything with the four operations of `DeviceMemory` (trt_engine.CudaMemory on a GPU).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from .errors import CacheLimitError, ConfigError
from .kv_cache import KVCache
from .trt_plan import Copy3D, append_copies, gather_copies, grow_copies


class DeviceMemory(Protocol):
    def alloc(self, nbytes: int) -> int: ...  # a device address
    def free(self, address: int) -> None: ...
    def copy3d(self, *, src: int, dst: int, copy: Copy3D) -> None: ...  # device to device, on the engine's stream
    def zero(self, address: int, nbytes: int) -> None: ...


class DeviceKVCache(KVCache):
    def __init__(self, *, memory: DeviceMemory, layers: int, kv_heads: int, head_dim: int, branches: int,
                 max_context: int, capacity: int = 64, itemsize: int = 4, max_bytes: int | None = None) -> None:
        if branches < 1:
            raise ValueError(f"branches must be >= 1, got {branches}")
        self.memory = memory
        self.max_bytes = max_bytes
        self.itemsize = itemsize
        self.bytes_per_token = 2 * layers * kv_heads * head_dim * itemsize  # keys + values
        self.layers, self.kv_heads, self.head_dim = layers, kv_heads, head_dim
        self.row_bytes = head_dim * itemsize  # one slot of one head
        self.max_context = max_context
        self.dtype = np.float32 if itemsize == 4 else np.float16
        self.keys, self.values = [], []  # no host buffers: see the module docstring
        capacity = min(max(capacity, 1), max_context)
        self._check_bytes(branches=branches, capacity=capacity)
        self._capacity = capacity
        self.lengths = np.zeros(branches, np.int64)  # [branches]
        self.address = self._alloc(branches=branches, capacity=capacity)

    def _alloc(self, *, branches: int, capacity: int) -> int:
        nbytes = branches * capacity * self.bytes_per_token
        address = self.memory.alloc(nbytes)
        # Holes are masked out, but a masked score times a NaN would still poison a row: start from zeros.
        self.memory.zero(address, nbytes)
        return address

    @property
    def capacity(self) -> int:
        return self._capacity

    def _slice_bytes(self) -> int:
        """Bytes of one (layer, keys|values) slice: [branches, kv_heads, capacity, head_dim]."""
        return self.branches * self.kv_heads * self._capacity * self.row_bytes

    def key_address(self, layer: int) -> int:
        return self.address + 2 * layer * self._slice_bytes()

    def value_address(self, layer: int) -> int:
        return self.address + (2 * layer + 1) * self._slice_bytes()

    def reserve(self, needed: int) -> None:
        """Grow the buffer (doubling) so that `needed` slots fit; refuse past max_context."""
        if needed > self.max_context:
            raise CacheLimitError(f"a branch would hold {needed} tokens but the engine's max context is "
                                  f"{self.max_context}; shorten the prompt or lower max tokens, or rebuild the "
                                  "engines with a larger --trt-max-context")
        if needed <= self._capacity:
            return
        new_cap = min(max(needed, 2 * self._capacity), self.max_context)
        if self.max_bytes is not None and self.branches * new_cap * self.bytes_per_token > self.max_bytes:
            new_cap = needed
        self._check_bytes(branches=self.branches, capacity=new_cap)
        new = self._alloc(branches=self.branches, capacity=new_cap)
        for copy in grow_copies(lengths=self.lengths, old_capacity=self._capacity, new_capacity=new_cap,
                                kv_heads=self.kv_heads, row_bytes=self.row_bytes, layers=self.layers):
            self.memory.copy3d(src=self.address, dst=new, copy=copy)
        self.memory.free(self.address)
        self.address, self._capacity = new, new_cap

    def step_inputs(self, n_new: np.ndarray, new_tokens: int) -> tuple[list[np.ndarray], list[np.ndarray],
                                                                       np.ndarray, np.ndarray]:
        raise ConfigError("a device KV cache has no host arrays: run it with the trt backend's engine")

    def append_from(self, *, staging: int, new_tokens: int, n_new: np.ndarray) -> None:
        """Write the first n_new[b] entries of branch b from the staging buffer (the graph's new_key/new_value
        outputs, [layers * 2, branches, kv_heads, new_tokens, head_dim]) after each branch's length."""
        self.reserve(int((self.lengths + n_new).max()))
        for copy in append_copies(lengths=self.lengths, n_new=n_new, new_tokens=new_tokens, capacity=self._capacity,
                                  kv_heads=self.kv_heads, row_bytes=self.row_bytes, layers=self.layers):
            self.memory.copy3d(src=staging, dst=self.address, copy=copy)
        self.lengths = self.lengths + n_new

    def append(self, new_keys: list[np.ndarray], new_values: list[np.ndarray], n_new: np.ndarray) -> None:
        raise ConfigError("a device KV cache takes new entries from the engine's staging buffer (append_from)")

    def gather(self, rows: np.ndarray | list[int]) -> None:
        """Keep, reorder or duplicate branches: new branch j is old branch rows[j]."""
        idx = np.asarray(rows, np.int64)
        self._check_bytes(branches=len(idx), capacity=self._capacity)
        new = self._alloc(branches=len(idx), capacity=self._capacity)
        for copy in gather_copies(lengths=self.lengths, rows=idx, capacity=self._capacity, kv_heads=self.kv_heads,
                                  row_bytes=self.row_bytes, layers=self.layers):
            self.memory.copy3d(src=self.address, dst=new, copy=copy)
        self.memory.free(self.address)
        self.address = new
        self.lengths = self.lengths[idx].copy()

    def close(self) -> None:
        """Free the device buffer now (otherwise when the cache is garbage-collected)."""
        if self.address:
            self.memory.free(self.address)
            self.address = 0

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown may have torn down the CUDA bindings already
            return
