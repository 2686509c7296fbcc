"""The KV cache of the TensorRT backend: the host KVCache's operations and semantics, buffers on the GPU.

Same terms and invariants as kv_cache.py: each branch's tokens sit left-aligned in slots 0..length-1, slots past
a branch's length are holes (masked out), `fork` / `gather` / `concat` / `rewind` / `reserve` mean the same.
What differs:

  * the buffers are one device allocation laid out as trt.plan.Layout says: 2 * layers slices of
    [branches, kv_heads, capacity, head_dim], each starting on a 256-byte boundary; `key_address(layer)` /
    `value_address(layer)` are what the engine binds as past_key.{i} / past_value.{i};
  * every operation is a handful of device-to-device 3D copies planned by trt.plan (append: one per branch,
    grow: one, gather: one per kept branch, concat: two); nothing crosses to the host;
  * there are no host arrays: `keys` / `values` are empty and `step_inputs` refuses.

Memory is anything with the four operations of `DeviceMemory` (trt.engine.CudaMemory on a GPU), normally
behind a `BlockPool`: the cache reallocates on every grow / gather / concat, and a cudaFree synchronises the
whole device, so freed blocks are kept and handed out again instead.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from ...errors import CacheLimitError, ConfigError
from ...kv_cache import KVCache
from .plan import Copy3D, Layout, append_copies, concat_copies, gather_copies, grow_copies


class DeviceMemory(Protocol):
    def alloc(self, nbytes: int) -> int: ...  # a device address, 256-byte aligned (as cudaMalloc's are)
    def free(self, address: int) -> None: ...
    def copy3d(self, *, src: int, dst: int, copy: Copy3D) -> None: ...  # device to device, on the engine's stream
    def zero(self, address: int, nbytes: int) -> None: ...


class BlockPool:
    """DeviceMemory that keeps freed blocks by size and hands them out again (no cudaMalloc / cudaFree, and so
    no device synchronisation, once the shapes of a workload have been seen).

    Safe without events because every user of one pool works on one stream: a block freed after copies were
    queued is reused only by operations queued after them. `trim()` returns the kept blocks to the device
    (also done once when an allocation fails, before trying again)."""

    def __init__(self, memory: DeviceMemory) -> None:
        self.memory = memory
        self.sizes: dict[int, int] = {}  # address -> nbytes of every block handed out
        self.kept: dict[int, list[int]] = {}  # nbytes -> free blocks of that size
        self.device_allocs = 0  # calls that reached the device allocator (for tests and diagnostics)

    def alloc(self, nbytes: int) -> int:
        nbytes = max(nbytes, 1)
        blocks = self.kept.get(nbytes)
        if blocks:
            address = blocks.pop()
        else:
            try:
                address = self.memory.alloc(nbytes)
            except Exception:
                if not self.kept_bytes:
                    raise
                self.trim()  # out of memory, perhaps only because of kept blocks
                address = self.memory.alloc(nbytes)
            self.device_allocs += 1
        self.sizes[address] = nbytes
        return address

    def free(self, address: int) -> None:
        self.kept.setdefault(self.sizes.pop(address), []).append(address)

    def zero(self, address: int, nbytes: int) -> None:
        self.memory.zero(address, nbytes)

    def copy3d(self, *, src: int, dst: int, copy: Copy3D) -> None:
        self.memory.copy3d(src=src, dst=dst, copy=copy)

    @property
    def kept_bytes(self) -> int:
        return sum(size * len(blocks) for size, blocks in self.kept.items())

    def trim(self) -> None:
        for blocks in self.kept.values():
            for address in blocks:
                self.memory.free(address)
        self.kept.clear()

    def close(self) -> None:
        """Return every block, kept or still handed out, to the device."""
        self.trim()
        for address in list(self.sizes):
            self.memory.free(address)
        self.sizes.clear()


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
        self.address = self._alloc(self.layout())

    def layout(self, *, branches: int | None = None, capacity: int | None = None) -> Layout:
        """This cache's device layout, or the one it would have with other branches / capacity."""
        return Layout(layers=self.layers, branches=self.branches if branches is None else branches,
                      kv_heads=self.kv_heads, slots=self._capacity if capacity is None else capacity,
                      row_bytes=self.row_bytes)

    def _alloc(self, layout: Layout) -> int:
        address = self.memory.alloc(layout.nbytes)
        # Holes are masked out, but a masked score times a NaN would still poison a row: start from zeros.
        self.memory.zero(address, layout.nbytes)
        return address

    def _replace(self, address: int) -> None:
        self.memory.free(self.address)
        self.address = address

    @property
    def capacity(self) -> int:
        return self._capacity

    def key_address(self, layer: int) -> int:
        return self.address + self.layout().slice_offset(layer=layer, values=False)

    def value_address(self, layer: int) -> int:
        return self.address + self.layout().slice_offset(layer=layer, values=True)

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
        old, new = self.layout(), self.layout(capacity=new_cap)
        address = self._alloc(new)
        for copy in grow_copies(lengths=self.lengths, old=old, new=new):
            self.memory.copy3d(src=self.address, dst=address, copy=copy)
        self._replace(address)
        self._capacity = new_cap

    def step_inputs(self, n_new: np.ndarray, new_tokens: int) -> tuple[list[np.ndarray], list[np.ndarray],
                                                                       np.ndarray, np.ndarray]:
        raise ConfigError("a device KV cache has no host arrays: run it with the trt backend's engine")

    def staging_layout(self, new_tokens: int) -> Layout:
        """Where the engine binds new_key.{i} / new_value.{i} [branches, kv_heads, new_tokens, head_dim]."""
        return self.layout(capacity=new_tokens)

    def append_from(self, *, staging: int, new_tokens: int, n_new: np.ndarray) -> None:
        """Write the first n_new[b] entries of branch b from the staging buffer (laid out as
        staging_layout(new_tokens)) after each branch's length."""
        self.reserve(int((self.lengths + n_new).max()))
        for copy in append_copies(lengths=self.lengths, n_new=n_new, staging=self.staging_layout(new_tokens),
                                  cache=self.layout()):
            self.memory.copy3d(src=staging, dst=self.address, copy=copy)
        self.lengths = self.lengths + n_new

    def append(self, new_keys: list[np.ndarray], new_values: list[np.ndarray], n_new: np.ndarray) -> None:
        raise ConfigError("a device KV cache takes new entries from the engine's staging buffer (append_from)")

    def gather(self, rows: np.ndarray | list[int]) -> None:
        """Keep, reorder or duplicate branches: new branch j is old branch rows[j]."""
        idx = np.asarray(rows, np.int64)
        self._check_bytes(branches=len(idx), capacity=self._capacity)
        old, new = self.layout(), self.layout(branches=len(idx))
        address = self._alloc(new)
        for copy in gather_copies(lengths=self.lengths, rows=idx, old=old, new=new):
            self.memory.copy3d(src=self.address, dst=address, copy=copy)
        self._replace(address)
        self.lengths = self.lengths[idx].copy()

    def concat(self, other: KVCache) -> None:
        """Append other's branches after this cache's (a request joining a running batch), on the device."""
        if not isinstance(other, DeviceKVCache) or other.memory is not self.memory:
            raise ConfigError("a device KV cache concatenates only another device cache of the same engine "
                              "(create both with the trt backend's new_cache)")
        if (other.layers, other.kv_heads, other.head_dim, other.itemsize) != (
                self.layers, self.kv_heads, self.head_dim, self.itemsize):
            raise ValueError("cannot concatenate caches of different models")
        capacity, branches = max(self._capacity, other.capacity), self.branches + other.branches
        self._check_bytes(branches=branches, capacity=capacity)
        joined = self.layout(branches=branches, capacity=capacity)
        address = self._alloc(joined)
        ours, theirs = concat_copies(lengths=self.lengths, other_lengths=other.lengths, ours=self.layout(),
                                     theirs=other.layout(), joined=joined)
        for copy in ours:
            self.memory.copy3d(src=self.address, dst=address, copy=copy)
        for copy in theirs:
            self.memory.copy3d(src=other.address, dst=address, copy=copy)
        self._replace(address)
        self._capacity = capacity
        self.lengths = np.concatenate([self.lengths, other.lengths])

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
