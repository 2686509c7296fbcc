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
from typing import Any, Literal, overload

import numpy as np

from .backends.base import Engine
from .backends.ort import OrtEngine
from .backends.providers import ProviderConfig, ProviderSpec
from .backends.trt.engine import TrtEngine
from .errors import BundleError, ConfigError
from .kv_cache import SHARED_PREFIX_MIN_TOKENS, KVCache
from .manifest import EngineFacts, ModelEntry

# A forward of more new tokens than this per branch runs as consecutive chunks of this many (each on the cache the
# previous one filled; same logits). ONNX Runtime's CPU GroupQueryAttention multiplies every new query with every
# key up to the branch's length and masks afterwards; chunks skip the products above the diagonal between chunks.
# Measured on the shared machine (SmolLM2 fp32, BENCHMARKS.md "Prefill"): 2048 tokens in chunks of 512 took 0.86x
# the CPU time of one call on one thread but 1.15x the wall time on two, and a 4096-token prompt grew the peak RSS
# by 152 MiB in chunks of 2048 against 187 MiB in one call. No clear win, so only prompts past 2048 are chunked.
PREFILL_CHUNK = 2048

# intra_op_threads=0 ("auto") gives models below this size one thread: their ops are too small to split, and
# on the built-in pair (0.1M / 0.8M parameters) one thread ran a stepwise eval 1.6x faster than two.
SMALL_MODEL_PARAMETERS = 10_000_000


# ONNX Runtime's type names for the manifest's dtypes.
ORT_TYPES = {"float32": "tensor(float)", "float16": "tensor(float16)", "bfloat16": "tensor(bfloat16)",
             "int64": "tensor(int64)", "int32": "tensor(int32)", "int8": "tensor(int8)", "uint8": "tensor(uint8)",
             "bool": "tensor(bool)"}


def check_graph_io(*, session: Any, entry: ModelEntry) -> None:
    """The graph's own IO (names, dtypes, fixed dims) must be the manifest's: the numbers the runtime sizes
    buffers from (kv_heads, head_dim, vocabulary, layer count) are thereby the graph's, not just the manifest's."""
    graph = {a.name: a for a in [*session.get_inputs(), *session.get_outputs()]}
    listed = {t["name"]: t for t in [*entry.io["inputs"], *entry.io["outputs"]]}
    if set(graph) != set(listed):
        raise BundleError(f"{entry.file}: the graph's tensors {sorted(set(graph) - set(listed))[:4]} are not in the "
                          f"manifest and the manifest's {sorted(set(listed) - set(graph))[:4]} are not in the graph; "
                          "re-export the bundle")
    for name, t in listed.items():
        arg = graph[name]
        shape = list(arg.shape) if arg.shape is not None else None
        fixed_differs = shape is not None and (len(shape) != len(t["shape"]) or any(
            (isinstance(a, int) or isinstance(b, int)) and a != b for a, b in zip(shape, t["shape"], strict=True)))
        if ORT_TYPES[t["dtype"]] != arg.type or fixed_differs:
            raise BundleError(f"{entry.file}: tensor {name} is {arg.type} {shape} in the graph but "
                              f"{t['dtype']} {t['shape']} in the manifest; re-export the bundle")


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
            # The native TensorRT backend: the bundle's prebuilt engine, KV cache on the GPU (backends/providers.py).
            self.engine = TrtEngine.from_bundle(bundle_dir=bundle_dir, entry=entry, facts=engine_facts,
                                                device_id=providers.device_id)
        else:
            specs = providers.ort_providers(entry=entry) if isinstance(providers, ProviderConfig) else providers
            if intra_op_threads == 0 and self.arch.parameters < SMALL_MODEL_PARAMETERS:
                intra_op_threads = 1
            try:
                self.engine = OrtEngine.from_bundle(bundle_dir=bundle_dir, entry=entry, providers=specs,
                                                    intra_op_threads=intra_op_threads, spin=spin)
            except (BundleError, ConfigError):
                raise
            except Exception as e:  # noqa: BLE001 - ONNX Runtime raises its own types (Fail, InvalidProtobuf, ...)
                first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
                raise BundleError(f"{entry.file}: ONNX Runtime cannot load this graph ({first}); the file is "
                                  "truncated or not a graph of this bundle: re-export the bundle") from e
            check_graph_io(session=self.engine.session, entry=entry)
        self.prefill_chunk = PREFILL_CHUNK  # new tokens per forward call; see PREFILL_CHUNK
        # A fork shares prompts of at least this many tokens (graphs of the "prefix" variant; kv_cache.py).
        self.shared_prefix_min_tokens = SHARED_PREFIX_MIN_TOKENS
        if (entry.value_head is not None) != self.engine.has_value:
            raise BundleError(f"{entry.file}: the manifest {'lists' if entry.value_head else 'has no'} value head but "
                              f"the graph {'lacks' if entry.value_head else 'has'} the output `value`; "
                              "re-export the bundle")

    @property
    def has_value_head(self) -> bool:
        return self.engine.has_value  # both backends fetch the `value` output (step_with_values)

    def new_cache(self, *, branches: int = 1, capacity: int = 256) -> KVCache:
        cache = self.engine.new_cache(branches=branches, capacity=capacity, max_bytes=self.kv_limit_bytes)
        cache.min_prefix = self.shared_prefix_min_tokens
        return cache

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
        counts = [len(t) for t in tokens]
        n_new = np.array(counts, np.int64)  # [branches]
        width = max(max(counts, default=0), 1)
        chunk = max(int(self.prefill_chunk), 1)
        # GroupQueryAttention refuses several new tokens on top of a cache at branches > 1 (the engine then runs
        # branch by branch), so a batched gqa prefill is chunked only when it is a single branch.
        if width > chunk and (cache.branches == 1 or self.entry.kv_cache.get("attention") in ("plain", "prefix")):
            return self._forward_chunked(cache=cache, tokens=tokens, n_new=n_new, chunk=chunk,
                                         all_logits=all_logits, values=values)
        return self._forward_once(cache=cache, tokens=tokens, n_new=n_new, all_logits=all_logits, values=values)

    def _forward_once(self, *, cache: KVCache, tokens: list[list[int]], n_new: np.ndarray, all_logits: bool,
                      values: bool) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        width = max(int(n_new.max()), 1)
        if width == 1:  # a decode step (one token or none per branch): built in one call, it runs per token
            pad = self.generation.pad_id
            ids = np.array([[t[0] if len(t) else pad] for t in tokens], np.int64)  # [branches, 1]
        else:
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

    def _forward_chunked(self, *, cache: KVCache, tokens: list[list[int]], n_new: np.ndarray, chunk: int,
                         all_logits: bool, values: bool) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """forward() as consecutive calls of at most `chunk` new tokens per branch (same results, see PREFILL_CHUNK).

        A branch whose tokens end in an earlier chunk feeds nothing in the later ones; its rows are taken from the
        chunk that holds its last token."""
        width = int(n_new.max())
        branches = cache.branches
        pieces: list[np.ndarray | tuple[np.ndarray, np.ndarray]] = []
        for start in range(0, width, chunk):
            part = [list(t[start:start + chunk]) for t in tokens]
            pieces.append(self._forward_once(cache=cache, tokens=part, n_new=np.array([len(p) for p in part],
                                             np.int64), all_logits=all_logits, values=values))
        logit_parts = [p[0] if isinstance(p, tuple) else p for p in pieces]
        value_parts = [p[1] for p in pieces if isinstance(p, tuple)]
        if all_logits:
            # Chunk i's rows are positions i * chunk ...; padding rows past a branch's tokens are ignored anyway.
            logits = np.concatenate(logit_parts, axis=1)[:, :width]  # [branches, width, vocab]
            return (logits, np.concatenate(value_parts, axis=1)[:, :width]) if values else logits
        last = np.maximum(n_new - 1, 0) // chunk  # [branches]: the chunk holding each branch's last token
        rows = np.arange(branches)
        logits = np.stack(logit_parts)[last, rows]  # [branches, vocab]
        return (logits, np.stack(value_parts)[last, rows]) if values else logits
