"""The one interface both backends meet: ONNX Runtime (engine.OrtEngine) and native TensorRT (trt_engine.TrtEngine).

RoleModel drives a model through these and nothing else, so a backend is a class with:

  new_cache(*, branches, capacity, max_bytes)   the KV cache this backend steps (host or device memory)
  step(*, cache, input_ids, n_new, logits_index) -> logits [branches, k, vocab]
        append the first n_new[b] tokens of input_ids[b] ([branches, new], right-padded) to branch b and return
        the logits at logits_index ([branches, k] positions < new)
  step_with_values(...) -> (logits, values [branches, k])   the same, with the value head's output
  has_value      whether the graph / engine has a value head output
  ort_seconds    wall time spent inside the backend's runtime (ONNX Runtime or TensorRT execution)
  close()        release what the backend holds (sessions, streams, device memory); idempotent
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

from .kv_cache import KVCache


@runtime_checkable
class Engine(Protocol):
    has_value: bool
    ort_seconds: float

    def new_cache(self, *, branches: int, capacity: int, max_bytes: int | None) -> KVCache: ...

    def step(self, *, cache: KVCache, input_ids: np.ndarray, n_new: np.ndarray, logits_index: np.ndarray
             ) -> np.ndarray: ...

    def step_with_values(self, *, cache: KVCache, input_ids: np.ndarray, n_new: np.ndarray,
                         logits_index: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...

    def close(self) -> None: ...
