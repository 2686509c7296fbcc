"""A loaded model of one role: its engine, its manifest entry and the forward passes the loops need.

Terms (used across the runtime):
  branch   one row of the batch: one partial trajectory with its own rows of the KV cache
  pending  the last sampled token of a branch; it is not in the cache yet and is fed by the next forward
  prefill  one forward over many new tokens per branch (a prompt, a step to verify)
  decode   one forward over one new token per branch
  value    the verifier's value head output in [0, 1] at a token: its belief that the step ending there is
           correct (a bundle's verifier may carry one; see specreason_rt/manifest.py)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal, overload

import numpy as np

from .engine import OrtEngine
from .engine_api import Engine
from .errors import BundleError, ConfigError
from .kv_cache import KVCache
from .manifest import EngineFacts, ModelEntry
from .providers import ProviderConfig, ProviderSpec
from .trt_engine import TrtEngine

# intra_op_threads=0 ("auto") gives models below this size one thread: their ops are too small to split, and
# on the built-in pair (0.1M / 0.8M parameters) one thread ran a stepwise eval 1.6x faster than two.
SMALL_MODEL_PARAMETERS = 10_000_000


class RoleModel:
    def __init__(self, *, bundle_dir: str | Path, entry: ModelEntry,
                 providers: Sequence[ProviderSpec] | ProviderConfig | None = None, intra_op_threads: int = 0,
                 kv_limit_bytes: int | None = None, engine_facts: EngineFacts | None = None,
                 spin: bool = True) -> None:
        self.entry = entry
        self.kv_limit_bytes = kv_limit_bytes
        self.arch = entry.architecture
        self.generation = entry.generation
        self.engine: Engine
        if isinstance(providers, ProviderConfig) and providers.native_trt:
            # The native TensorRT backend: the bundle's prebuilt engine, KV cache on the GPU (providers.py).
            self.engine = TrtEngine.from_bundle(bundle_dir=bundle_dir, entry=entry, facts=engine_facts,
                                                device_id=providers.device_id)
        else:
            specs = providers.ort_providers(entry=entry) if isinstance(providers, ProviderConfig) else providers
            if intra_op_threads == 0 and self.arch.parameters < SMALL_MODEL_PARAMETERS:
                intra_op_threads = 1
            self.engine = OrtEngine.from_bundle(bundle_dir=bundle_dir, entry=entry, providers=specs,
                                                intra_op_threads=intra_op_threads, spin=spin)
        if (entry.value_head is not None) != self.engine.has_value:
            raise BundleError(f"{entry.file}: the manifest {'lists' if entry.value_head else 'has no'} value head but "
                              f"the graph {'lacks' if entry.value_head else 'has'} the output `value`; "
                              "re-export the bundle")

    @property
    def has_value_head(self) -> bool:
        return self.engine.has_value  # both backends fetch the `value` output (step_with_values)

    def new_cache(self, *, branches: int = 1, capacity: int = 256) -> KVCache:
        return self.engine.new_cache(branches=branches, capacity=capacity, max_bytes=self.kv_limit_bytes)

    @overload
    def forward(self, *, cache: KVCache, tokens: list[list[int]], all_logits: bool = False,
                values: Literal[False] = False) -> np.ndarray: ...

    @overload
    def forward(self, *, cache: KVCache, tokens: list[list[int]], all_logits: bool = False,
                values: Literal[True]) -> tuple[np.ndarray, np.ndarray]: ...

    def forward(self, *, cache: KVCache, tokens: list[list[int]], all_logits: bool = False, values: bool = False
                ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Append tokens[b] to branch b (an empty list leaves it unchanged) and return logits.

        Returns [branches, vocab] at each branch's last new token, or with all_logits
        [branches, max_new, vocab] at every new position (rows past len(tokens[b]) are padding).
        A branch given no tokens gets the row of a masked dummy token: ignore it.
        With values=True returns (logits, values): values float32 in [0, 1] at the same positions,
        [branches] or [branches, max_new]; it needs a model exported with a value head.
        """
        if values and not self.has_value_head:
            raise ConfigError(f"the {self.entry.role} of this bundle has no value head: export the verifier with a "
                              "value head (specreason-export --value-head FILE; the built-in verifier has one by "
                              "default) to score with values")
        n_new = np.array([len(t) for t in tokens], np.int64)  # [branches]
        width = max(int(n_new.max()), 1)
        ids = np.full((cache.branches, width), self.generation.pad_id, np.int64)  # [branches, width]
        for b, t in enumerate(tokens):
            ids[b, :len(t)] = t
        if all_logits:
            index = np.tile(np.arange(width, dtype=np.int64), (cache.branches, 1))  # [branches, width]
        else:
            index = np.maximum(n_new - 1, 0)[:, None]  # [branches, 1]: only what the sampler needs
        if values:
            logits, value = self.engine.step_with_values(cache=cache, input_ids=ids, n_new=n_new, logits_index=index)
            return (logits, value) if all_logits else (logits[:, 0], value[:, 0])
        logits = self.engine.step(cache=cache, input_ids=ids, n_new=n_new, logits_index=index)
        return logits if all_logits else logits[:, 0]
