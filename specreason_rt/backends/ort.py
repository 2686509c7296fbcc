"""ONNX Runtime engine: one InferenceSession per model, driven through the manifest's IO names.

Three graph variants (export/graph.py): "plain" graphs return the new tokens' keys/values, which `step`
writes into the cache; "prefix" graphs are plain graphs that also read a shared prefix segment (the prompt
that forked branches share, kv_cache.py), an empty one when the cache has none; "gqa" graphs use
GroupQueryAttention with past and present bound to the cache's own buffers (IO binding), so the op writes the
new entries in place and a decode step copies no cache.
A graph exported with a value head has the extra output `value` [branches, k]; only `step_with_values`
fetches it, so `step` costs what it costs on a graph without a head.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ..errors import BundleError, ConfigError
from ..kv_cache import KVCache
from ..manifest import ModelEntry
from .base import Engine, usable_cores
from .providers import ProviderSpec, check_session_providers


class OrtEngine(Engine):
    """Runs forwards of one bundle model. The manifest, not the graph, names every tensor."""

    def __init__(self, *, model_path: str | Path, layers: int, kv_names: dict[str, str], attention: str,
                 expected_inputs: list[str] | None = None, providers: Sequence[ProviderSpec] | None = None,
                 intra_op_threads: int = 0, spin: bool = True) -> None:
        if attention not in ("plain", "gqa", "prefix"):
            raise BundleError(f"{model_path}: unknown attention variant {attention!r}; re-export the bundle")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = intra_op_threads
        if not spin:
            # Idle pool threads otherwise spin for a while after each run, taking the cores from the next
            # session's run when two models alternate (a reasoning run): measured 1.6x slower stepwise runs.
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.log_severity_level = 3
        requested = list(providers or ["CPUExecutionProvider"])
        self.session = ort.InferenceSession(str(model_path), opts, providers=requested)
        # ONNX Runtime falls back to the next provider (with a warning at most) when one cannot load: refuse that.
        check_session_providers(requested=requested, actual=self.session.get_providers(), model=str(model_path))
        # 0 threads is ONNX Runtime's own choice: a thread per core.
        on_cpu = self.session.get_providers()[0] == "CPUExecutionProvider"
        self.cpu_threads = (intra_op_threads or usable_cores()) if on_cpu else None
        if expected_inputs is not None:
            expected, actual = set(expected_inputs), {i.name for i in self.session.get_inputs()}
            if expected != actual:
                raise BundleError(f"{model_path}: graph inputs {sorted(actual - expected)} are not in the manifest "
                                  f"and manifest inputs {sorted(expected - actual)} are not in the graph; "
                                  "re-export the bundle")
        self.attention = attention
        self.layers = layers
        self.past_key_names = [kv_names["past_key"].format(i) for i in range(layers)]
        self.past_value_names = [kv_names["past_value"].format(i) for i in range(layers)]
        out_key, out_value = ("present_key", "present_value") if attention == "gqa" else ("new_key", "new_value")
        if attention == "prefix":
            self.prefix_key_names = [kv_names["prefix_key"].format(i) for i in range(layers)]
            self.prefix_value_names = [kv_names["prefix_value"].format(i) for i in range(layers)]
        self.out_key_names = [kv_names[out_key].format(i) for i in range(layers)]
        self.out_value_names = [kv_names[out_value].format(i) for i in range(layers)]
        self.ort_seconds = 0.0  # wall time spent inside ONNX Runtime calls (for overhead accounting)
        self._binding: ort.IOBinding | None = None
        self._bound_arrays: list[np.ndarray] = []  # kept alive, so identity comparison stays meaningful
        self.has_value = "value" in {o.name for o in self.session.get_outputs()}
        vocab = next(o.shape[-1] for o in self.session.get_outputs() if o.name == "logits")
        self.vocab = vocab if isinstance(vocab, int) else None  # static in our exports
        # Steady-state decode (gqa): small inputs and the logits output stay bound to these arrays, which are
        # refilled in place; re-binding costs ~5 us per tensor per call, a few % of a tiny model's step.
        self._inputs: dict[str, np.ndarray] = {}
        self._logits_out: np.ndarray | None = None
        self.cache_shape: tuple[int, int, int] | None = None  # (kv_heads, head_dim, max_context), from a bundle

    @classmethod
    def from_bundle(cls, *, bundle_dir: str | Path, entry: ModelEntry, providers: Sequence[ProviderSpec] | None = None,
                    intra_op_threads: int = 0, spin: bool = True) -> OrtEngine:
        engine = cls(model_path=Path(bundle_dir) / entry.file, layers=entry.architecture.layers,
                     kv_names=entry.kv_cache, attention=entry.kv_cache.get("attention", "plain"),
                     expected_inputs=[t["name"] for t in entry.io["inputs"]],
                     providers=providers, intra_op_threads=intra_op_threads, spin=spin)
        arch = entry.architecture
        engine.cache_shape = (arch.kv_heads, arch.head_dim, arch.max_context)
        return engine

    def new_cache(self, *, branches: int, capacity: int, max_bytes: int | None) -> KVCache:
        """A host KV cache for this model (backends.base.Engine); needs the facts from_bundle read."""
        if self.cache_shape is None:
            raise ConfigError("this engine was built from a bare model path: create KVCache yourself")
        kv_heads, head_dim, max_context = self.cache_shape
        return KVCache(layers=self.layers, kv_heads=kv_heads, head_dim=head_dim, branches=branches,
                       max_context=max_context, capacity=capacity, max_bytes=max_bytes,
                       share_prefix=self.attention == "prefix")

    def close(self) -> None:
        """Drop the session and the bindings (backends.base.Engine); ONNX Runtime frees them with the objects."""
        self._binding, self._bound_arrays, self._inputs, self._logits_out = None, [], {}, None
        self.session = None

    def _step(self, *, cache: KVCache, input_ids: np.ndarray, n_new: np.ndarray, logits_index: np.ndarray,
              want_value: bool) -> tuple[np.ndarray, np.ndarray | None]:
        if self.attention != "gqa":
            return self._step_plain(cache=cache, input_ids=input_ids, n_new=n_new, logits_index=logits_index,
                                    want_value=want_value)
        branches, new = input_ids.shape
        longest = int(cache.lengths.max())
        # The padded tail of a row is written past the branch's length and never attended: reserve room for it.
        cache.reserve(longest + new)
        if new > 1 and branches > 1 and longest > 0:
            # ONNX Runtime's GroupQueryAttention takes several new tokens on top of a cache for batch 1 only,
            # so such a call (verifying drafted steps, say) runs branch by branch on views of the cache.
            rows = [self._run_gqa(keys=[k[b:b + 1] for k in cache.keys], values=[v[b:b + 1] for v in cache.values],
                                  lengths=cache.lengths[b:b + 1], input_ids=input_ids[b:b + 1],
                                  logits_index=logits_index[b:b + 1], reuse=False, want_value=want_value)
                    for b in range(branches) if n_new[b] > 0]
            logits = np.zeros((branches, logits_index.shape[1], rows[0][0].shape[-1]), np.float32)
            logits[n_new > 0] = np.concatenate([r[0] for r in rows])
            value = None
            if want_value:
                value = np.zeros((branches, logits_index.shape[1]), np.float32)  # [branches, k]
                value[n_new > 0] = np.concatenate([r[1] for r in rows])
        else:
            logits, value = self._run_gqa(keys=cache.keys, values=cache.values, lengths=cache.lengths,
                                          input_ids=input_ids, logits_index=logits_index, reuse=True,
                                          want_value=want_value, longest=longest)
        cache.lengths = cache.lengths + n_new
        return logits, value

    def _run_gqa(self, *, keys: list[np.ndarray], values: list[np.ndarray], lengths: np.ndarray,
                 input_ids: np.ndarray, logits_index: np.ndarray, reuse: bool, want_value: bool,
                 longest: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        new = input_ids.shape[1]
        seqlens = (lengths + (new - 1)).astype(np.int32)  # [branches]: every row counts as `new` tokens long
        total = np.array((int(lengths.max()) if longest is None else longest) + new, np.int32)
        arrays = [*keys, *values]
        same = len(arrays) == len(self._bound_arrays) and all(
            a is b for a, b in zip(arrays, self._bound_arrays, strict=True))
        if not reuse or self._binding is None or not same:
            # Bind each cache buffer as both past input and present output: GQA then updates it in place.
            binding = self.session.io_binding()
            for names, buffers in ((zip(self.past_key_names, self.out_key_names, strict=True), keys),
                                   (zip(self.past_value_names, self.out_value_names, strict=True), values)):
                for (past, present), array in zip(names, buffers, strict=True):
                    value = ort.OrtValue.ortvalue_from_numpy(array)
                    binding.bind_ortvalue_input(past, value)
                    binding.bind_ortvalue_output(present, value)
            if reuse:
                self._binding, self._bound_arrays = binding, arrays
                self._inputs, self._logits_out = {}, None
        else:
            binding = self._binding
        if reuse and not want_value and self.vocab is not None:
            return self._run_bound(binding, input_ids=input_ids, seqlens=seqlens, total=total,
                                   logits_index=logits_index), None
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(input_ids, np.int64))
        binding.bind_cpu_input("seqlens_k", seqlens)
        binding.bind_cpu_input("total_sequence_length", total)
        binding.bind_cpu_input("logits_index", np.ascontiguousarray(logits_index, np.int64))
        self._inputs, self._logits_out = {}, None  # those names are now bound elsewhere
        binding.bind_output("logits")
        if want_value:
            # Bound after logits; a reused binding keeps it (and its tiny cost) for later calls.
            binding.bind_output("value")
        start = time.perf_counter()
        self.session.run_with_iobinding(binding)
        self.ort_seconds += time.perf_counter() - start
        # Outputs come in binding order: the 2 * layers caches, logits, then value when it was ever bound.
        outputs = binding.get_outputs()
        kv = 2 * self.layers
        return outputs[kv].numpy(), (outputs[kv + 1].numpy() if want_value else None)

    def _run_bound(self, binding: ort.IOBinding, *, input_ids: np.ndarray, seqlens: np.ndarray, total: np.ndarray,
                   logits_index: np.ndarray) -> np.ndarray:
        """Run a reused binding whose small inputs and logits output live in arrays refilled in place."""
        inputs = self._inputs
        for name, array, dtype in (("input_ids", input_ids, np.int64), ("seqlens_k", seqlens, np.int32),
                                   ("total_sequence_length", total, np.int32),
                                   ("logits_index", logits_index, np.int64)):
            held = inputs.get(name)
            if held is not None and held.shape == array.shape:
                np.copyto(held, array)
            else:
                held = inputs[name] = np.array(array, dtype=dtype)  # a fresh, contiguous copy
                binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(held))
        shape = (*logits_index.shape, self.vocab)  # [branches, k, vocab]
        if self._logits_out is None or self._logits_out.shape != shape:
            self._logits_out = np.empty(shape, np.float32)
            binding.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(self._logits_out))
        start = time.perf_counter()
        self.session.run_with_iobinding(binding)
        self.ort_seconds += time.perf_counter() - start
        return self._logits_out.copy()  # the buffer is rewritten by the next step

    def _step_plain(self, *, cache: KVCache, input_ids: np.ndarray, n_new: np.ndarray, logits_index: np.ndarray,
                    want_value: bool) -> tuple[np.ndarray, np.ndarray | None]:
        keys, values, mask, positions = cache.step_inputs(n_new, input_ids.shape[1])
        prefix: dict[str, np.ndarray] = {}
        if self.attention == "prefix":
            # The shared segment as it is (no per-branch copy); a cache without one feeds 0-token tensors.
            empty = np.zeros((1, *keys[0].shape[1:2], 0, keys[0].shape[3]), keys[0].dtype)
            prefix_keys = cache.prefix_keys or [empty] * self.layers
            prefix_values = cache.prefix_values or [empty] * self.layers
            prefix = dict(zip(self.prefix_key_names + self.prefix_value_names, prefix_keys + prefix_values,
                              strict=True))
        logits, new_keys, new_values, value = self._run_plain(
            input_ids=input_ids, position_ids=positions, attention_mask=mask, logits_index=logits_index,
            past_keys=keys, past_values=values, want_value=want_value, extra=prefix)
        cache.append(new_keys, new_values, n_new)
        return logits, value

    def forward(self, *, input_ids: np.ndarray, position_ids: np.ndarray, attention_mask: np.ndarray,
                logits_index: np.ndarray, past_keys: list[np.ndarray], past_values: list[np.ndarray]
                ) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
        """One forward of a "plain" graph over the new tokens of every branch.

        input_ids, position_ids: [branches, new]; attention_mask: [branches, past + new];
        logits_index: [branches, k]; past_*: [branches, kv_heads, past, head_dim]
        returns logits [branches, k, vocab], new keys / values [branches, kv_heads, new, head_dim]
        """
        if self.attention != "plain":
            raise ConfigError(f"forward() drives plain-attention graphs; use step() for this {self.attention} graph")
        logits, keys, values, _ = self._run_plain(
            input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask, logits_index=logits_index,
            past_keys=past_keys, past_values=past_values, want_value=False)
        return logits, keys, values

    def _run_plain(self, *, input_ids: np.ndarray, position_ids: np.ndarray, attention_mask: np.ndarray,
                   logits_index: np.ndarray, past_keys: list[np.ndarray], past_values: list[np.ndarray],
                   want_value: bool, extra: dict[str, np.ndarray] | None = None
                   ) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray], np.ndarray | None]:
        feed = {"input_ids": input_ids, "position_ids": position_ids, "attention_mask": attention_mask,
                "logits_index": logits_index, **(extra or {})}
        feed.update(zip(self.past_key_names, past_keys, strict=True))
        feed.update(zip(self.past_value_names, past_values, strict=True))
        start = time.perf_counter()
        names = ["logits", *self.out_key_names, *self.out_value_names, *(["value"] if want_value else [])]
        out = self.session.run(names, feed)
        self.ort_seconds += time.perf_counter() - start
        return out[0], out[1:1 + self.layers], out[1 + self.layers:1 + 2 * self.layers], (
            out[-1] if want_value else None)
