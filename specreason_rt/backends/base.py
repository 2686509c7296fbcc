"""The one interface both backends meet: ONNX Runtime (ort.OrtEngine) and native TensorRT (trt.engine.TrtEngine).

RoleModel drives a model through these and nothing else, so a backend is a subclass of `Engine` with:

  new_cache(*, branches, capacity, max_bytes)   the KV cache this backend steps (host or device memory)
  _step(*, cache, input_ids, n_new, logits_index, want_value) -> (logits, values or None)
        append the first n_new[b] tokens of input_ids[b] ([branches, new], right-padded) to branch b and return
        the logits at logits_index ([branches, k] positions < new), plus the value head's output when asked
  has_value      whether the graph / engine has a value head output
  cpu_threads    the intra-op threads it runs on the CPU, or None where it runs elsewhere (a GPU)
  ort_seconds    wall time spent inside the backend's runtime (ONNX Runtime or TensorRT execution)
  close()        release what the backend holds (sessions, streams, device memory); idempotent

`step` and `step_with_values`, the two calls RoleModel makes, are written once here over `_step`.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod

import numpy as np

from ..errors import ConfigError
from ..kv_cache import KVCache


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class Engine(ABC):
    has_value: bool
    ort_seconds: float
    cpu_threads: int | None = None
    # What the user does to get a value head for this backend (the end of step_with_values' refusal).
    value_head_hint = "export the verifier with a value head: specreason-export --value-head FILE"

    @abstractmethod
    def new_cache(self, *, branches: int, capacity: int, max_bytes: int | None) -> KVCache: ...

    @abstractmethod
    def _step(self, *, cache: KVCache, input_ids: np.ndarray, n_new: np.ndarray, logits_index: np.ndarray,
              want_value: bool) -> tuple[np.ndarray, np.ndarray | None]: ...

    @abstractmethod
    def close(self) -> None: ...

    def step(self, *, cache: KVCache, input_ids: np.ndarray, n_new: np.ndarray, logits_index: np.ndarray
             ) -> np.ndarray:
        """Append the first n_new[b] tokens of input_ids[b] to branch b; return logits [branches, k, vocab].

        input_ids: [branches, new] right-padded; n_new: [branches] (0 leaves a branch unchanged);
        logits_index: [branches, k] positions (< new) whose logits are wanted.
        """
        return self._step(cache=cache, input_ids=input_ids, n_new=n_new, logits_index=logits_index,
                          want_value=False)[0]

    def step_with_values(self, *, cache: KVCache, input_ids: np.ndarray, n_new: np.ndarray,
                         logits_index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """`step`, also returning the value head's output [branches, k] at the same positions."""
        if not self.has_value:
            raise ConfigError(f"this model has no value head output (`value`); {self.value_head_hint}")
        logits, value = self._step(cache=cache, input_ids=input_ids, n_new=n_new, logits_index=logits_index,
                                   want_value=True)
        assert value is not None
        return logits, value
