"""The native TensorRT backend: a bundle's prebuilt engine driven through the TensorRT Python API.

Same interface as ort.OrtEngine (`step(*, cache, input_ids, n_new, logits_index) -> logits [branches, k,
vocab]`, `ort_seconds`), written to the TensorRT 10.x API (10.3 is JetPack 6.2's) and the parts of it TensorRT 11
keeps: `deserialize_cuda_engine`, `set_optimization_profile_async`, `set_input_shape`, `set_tensor_address`,
`execute_async_v3`. Device memory and copies go through cuda-python's runtime bindings (`cuda.bindings.runtime`,
or `cuda.cudart` on cuda-python 12 releases before it); no PyTorch. tensorrt and cuda-python are imported only
when an engine is opened, with one clear message when they are missing.

One step:
  1. host inputs (ids, positions, mask, logits_index; a few KB) are packed into one pinned host array: one copy
     to the device;
  2. the device KV cache's buffers are bound as past_key/past_value as they are ([branches, kv_heads, capacity,
     head_dim]; holes masked out): no cache copy;
  3. the graph writes the new tokens' keys/values into a staging buffer; one 3D device copy per growing branch
     appends them in place (trt.kv.DeviceKVCache.append_from);
  4. only the logits rows asked for in logits_index are copied to the host (pinned), then out to the caller.
The profile (decode / verify / prefill) is chosen per call from the shapes; switching costs one async call.
Every bound address is 256-byte aligned (trt.plan.Layout) and every set_input_shape / set_tensor_address result
is checked. Device memory comes from a BlockPool (no cudaMalloc / cudaFree, which synchronises the device, once
a workload's shapes have been seen). The CUDA device is made current in every thread that touches it
(DeviceGuard): the runtime API's current device is per thread, and pool or server workers are other threads.
`close()` frees the stream and every buffer.
"""

from __future__ import annotations

import ctypes
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import BundleError, ConfigError, SpecReasonError
from ...kv_cache import KVCache
from ...manifest import EngineFacts, ModelEntry
from ..base import Engine
from .kv import BlockPool, DeviceKVCache
from .plan import (
    ALIGN,
    Copy3D,
    EngineLimits,
    Profile,
    check_engine_compatible,
    select_profile,
    step_dims,
    step_mask_positions,
)

TRT_INSTALL_HINT = ("pip install 'specreason-rt[trt-cu12]' (TensorRT 10 and cuda-python 12 wheels; [trt-cu13] for "
                    "CUDA 13 / TensorRT 11; on Jetson, TensorRT comes with JetPack: see runtime/README.md)")


def import_tensorrt() -> Any:
    try:
        import tensorrt
    except ImportError as e:
        raise ConfigError(f"the trt backend needs the tensorrt Python package, which is not installed: "
                          f"{TRT_INSTALL_HINT}") from e
    return tensorrt


def import_cudart() -> Any:
    try:
        from cuda.bindings import runtime  # cuda-python >= 12.6.1, and the only path in 13
    except ImportError:
        try:
            from cuda import cudart as runtime  # earlier cuda-python 12 releases
        except ImportError as e:
            raise ConfigError(f"the trt backend needs cuda-python, which is not installed: {TRT_INSTALL_HINT}") from e
    return runtime


_THREAD = threading.local()  # the CUDA runtime's current device is per host thread: remember what we set


class DeviceGuard:
    """Makes `device_id` the calling thread's current CUDA device before any CUDA call of an engine.

    cudaSetDevice affects only the thread that calls it; a ReasonerPool or server worker thread that never
    called it allocates on (and launches to) GPU 0. The guard calls `set_device` once per thread and again only
    when another guard (another engine, another GPU) has switched that thread in between."""

    def __init__(self, *, device_id: int, set_device: Callable[[int], None]) -> None:
        self.device_id, self.set_device = device_id, set_device

    def use(self) -> None:
        if getattr(_THREAD, "device", None) != self.device_id:
            self.set_device(self.device_id)
            _THREAD.device = self.device_id


class CudaMemory:
    """Device allocations and copies on one stream (the engine's), through cuda-python."""

    def __init__(self, *, cudart: Any, stream: Any, device_id: int = 0) -> None:
        self.cudart = cudart
        self.stream = stream
        self.guard = DeviceGuard(device_id=device_id, set_device=lambda d: self.check(cudart.cudaSetDevice(d)))

    def check(self, result: tuple[Any, ...]) -> Any:
        err, *rest = result
        if err != self.cudart.cudaError_t.cudaSuccess:
            _, name = self.cudart.cudaGetErrorName(err)
            _, text = self.cudart.cudaGetErrorString(err)
            raise SpecReasonError(f"CUDA error {name.decode()}: {text.decode()}")
        return rest[0] if len(rest) == 1 else (tuple(rest) or None)

    def alloc(self, nbytes: int) -> int:
        self.guard.use()
        return int(self.check(self.cudart.cudaMalloc(max(nbytes, 1))))

    def free(self, address: int) -> None:
        self.guard.use()
        self.check(self.cudart.cudaFree(address))

    def alloc_host(self, nbytes: int) -> int:
        """Pinned (page-locked) host memory: async copies from pageable memory are staged and synchronous."""
        self.guard.use()
        return int(self.check(self.cudart.cudaMallocHost(max(nbytes, 1))))

    def free_host(self, address: int) -> None:
        self.check(self.cudart.cudaFreeHost(address))

    def zero(self, address: int, nbytes: int) -> None:
        self.guard.use()
        self.check(self.cudart.cudaMemsetAsync(address, 0, nbytes, self.stream))

    def copy3d(self, *, src: int, dst: int, copy: Copy3D) -> None:
        rt = self.cudart
        self.guard.use()
        p = rt.cudaMemcpy3DParms()
        p.srcPtr = rt.make_cudaPitchedPtr(src, copy.src_pitch, copy.src_pitch, copy.src_rows)
        p.srcPos = rt.make_cudaPos(*copy.src_pos)
        p.dstPtr = rt.make_cudaPitchedPtr(dst, copy.dst_pitch, copy.dst_pitch, copy.dst_rows)
        p.dstPos = rt.make_cudaPos(*copy.dst_pos)
        p.extent = rt.make_cudaExtent(*copy.extent)
        p.kind = rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice
        self.check(rt.cudaMemcpy3DAsync(p, self.stream))

    def to_device(self, address: int, host: np.ndarray) -> None:
        self.guard.use()
        self.check(self.cudart.cudaMemcpyAsync(address, host.ctypes.data, host.nbytes,
                                               self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, self.stream))

    def to_host(self, host: np.ndarray, address: int) -> None:
        self.guard.use()
        self.check(self.cudart.cudaMemcpyAsync(host.ctypes.data, address, host.nbytes,
                                               self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, self.stream))

    def sync(self) -> None:
        self.guard.use()
        self.check(self.cudart.cudaStreamSynchronize(self.stream))


class _Scratch:
    """A device buffer that grows (doubling) and is reused across steps: no allocation in the hot loop."""

    def __init__(self, memory: Any) -> None:  # DeviceMemory
        self.memory, self.address, self.nbytes = memory, 0, 0

    def ensure(self, nbytes: int) -> int:
        if nbytes > self.nbytes:
            self.close()
            self.nbytes = max(nbytes, 2 * self.nbytes)
            self.address = self.memory.alloc(self.nbytes)
        return self.address

    def close(self) -> None:
        if self.address:
            self.memory.free(self.address)
            self.address = 0


class _PinnedScratch:
    """A pinned host buffer that grows (doubling); `array(shape, dtype)` is a numpy view of its start."""

    def __init__(self, memory: CudaMemory) -> None:
        self.memory, self.address, self.nbytes = memory, 0, 0

    def array(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        if nbytes > self.nbytes:
            self.close()
            self.nbytes = max(nbytes, 2 * self.nbytes, ALIGN)
            self.address = self.memory.alloc_host(self.nbytes)
        raw = (ctypes.c_uint8 * self.nbytes).from_address(self.address)
        return np.frombuffer(memoryview(raw).cast("B"), np.uint8, count=nbytes).view(dtype).reshape(shape)

    def close(self) -> None:
        if self.address:
            self.memory.free_host(self.address)
            self.address = 0


def _aligned(nbytes: int) -> int:
    return (nbytes + ALIGN - 1) // ALIGN * ALIGN


def device_facts(*, cudart: Any, device_id: int) -> tuple[str, str]:
    """(compute capability "major.minor", name) of a GPU."""
    memory = CudaMemory(cudart=cudart, stream=0)
    props = memory.check(cudart.cudaGetDeviceProperties(device_id))
    name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
    return f"{props.major}.{props.minor}", name.rstrip("\x00")


class TrtEngine(Engine):
    """Runs one bundle model's TensorRT engine; the manifest names every tensor and records every profile."""

    value_head_hint = ("export the verifier with a value head (specreason-export --value-head FILE) and rebuild "
                       "the engines")

    def __init__(self, *, bundle_dir: str | Path, entry: ModelEntry, facts: EngineFacts, device_id: int = 0) -> None:
        trt, cudart = import_tensorrt(), import_cudart()
        self.trt, self.cudart = trt, cudart
        self.facts, self.entry = facts, entry
        probe = CudaMemory(cudart=cudart, stream=0)
        probe.check(cudart.cudaSetDevice(device_id))
        capability, _ = device_facts(cudart=cudart, device_id=device_id)
        # Refuse before deserializing: TensorRT's own failure is a logged error and a None.
        check_engine_compatible(engine_file=facts.file, built_trt=facts.tensorrt_version,
                                built_cc=facts.compute_capability, runtime_trt=trt.__version__,
                                runtime_cc=capability)
        self.device_id = device_id
        self.stream = probe.check(cudart.cudaStreamCreate())
        self.stream_handle = int(self.stream)
        self.cuda = CudaMemory(cudart=cudart, stream=self.stream, device_id=device_id)
        self.cuda.guard.use()  # this thread: cudaSetDevice above ran outside the guard
        self.memory = BlockPool(self.cuda)
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine((Path(bundle_dir) / facts.file).read_bytes())
        if self.engine is None:
            raise BundleError(f"{facts.file}: TensorRT {trt.__version__} could not deserialize the engine (see its log "
                              "above); rebuild it on this machine with `specreason-export --engines-only --out BUNDLE`")
        self.context = self.engine.create_execution_context()
        self.inputs: list[dict[str, Any]] = entry.io["inputs"]
        self.layers = entry.architecture.layers
        self.kv_heads, self.head_dim = entry.architecture.kv_heads, entry.architecture.head_dim
        self.vocab = entry.architecture.vocab_size
        names = entry.kv_cache
        self.past_key_names = [names["past_key"].format(i) for i in range(self.layers)]
        self.past_value_names = [names["past_value"].format(i) for i in range(self.layers)]
        self.new_key_names = [names["new_key"].format(i) for i in range(self.layers)]
        self.new_value_names = [names["new_value"].format(i) for i in range(self.layers)]
        self._check_io()
        # Outputs other than logits and the new keys/values (a value head's `value`) get scratch buffers.
        known = {"logits", *self.new_key_names, *self.new_value_names}
        self.has_value = "value" in {t["name"] for t in entry.io["outputs"]}
        self._extra = {t["name"]: _Scratch(self.memory) for t in entry.io["outputs"] if t["name"] not in known}
        self.profiles = [Profile.from_json(p) for p in facts.profiles]
        if len(self.profiles) != self.engine.num_optimization_profiles:
            raise BundleError(f"{facts.file}: the manifest records {len(self.profiles)} profiles, the engine has "
                              f"{self.engine.num_optimization_profiles}; rebuild the engines")
        self.limits = EngineLimits(max_branches=facts.max_branches, max_prompt_tokens=facts.max_prompt_tokens,
                                   max_step_tokens=facts.max_step_tokens, max_context=facts.max_context)
        self.kv_itemsize = np.dtype(trt.nptype(self.engine.get_tensor_dtype(self.past_key_names[0]))).itemsize
        self._inputs = _Scratch(self.memory)
        self._new_kv = _Scratch(self.memory)
        self._logits = _Scratch(self.memory)
        self._host_inputs = _PinnedScratch(self.cuda)
        self._host_logits = _PinnedScratch(self.cuda)
        self._host_value = _PinnedScratch(self.cuda)
        self._profile = -1
        self.ort_seconds = 0.0  # wall time inside TensorRT execution and the logits copy (same name as OrtEngine)

    @classmethod
    def from_bundle(cls, *, bundle_dir: str | Path, entry: ModelEntry, facts: EngineFacts | None,
                    device_id: int = 0) -> TrtEngine:
        import_tensorrt(), import_cudart()  # a missing package is the first thing to fix
        if facts is None:
            raise BundleError(f"the bundle has no TensorRT engine for {entry.role}: build them with "
                              "`specreason-export --engines-only --out BUNDLE` on the GPU machine")
        return cls(bundle_dir=bundle_dir, entry=entry, facts=facts, device_id=device_id)

    def _check_io(self) -> None:
        trt = self.trt
        actual = {}
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            actual[name] = self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
        expected = {t["name"]: True for t in self.inputs}
        expected.update({t["name"]: False for t in self.entry.io["outputs"]})
        if actual != expected:
            raise BundleError(f"{self.facts.file}: engine tensors {sorted(set(actual) ^ set(expected))} differ from "
                              "the manifest's IO; rebuild the engines from this bundle's ONNX")
        for name in ("input_ids", "position_ids", "attention_mask", "logits_index"):
            if self.engine.get_tensor_dtype(name) != trt.DataType.INT64:
                raise BundleError(f"{self.facts.file}: input {name} is not int64 in the engine; rebuild the engines")
        if self.engine.get_tensor_dtype("logits") != trt.DataType.FLOAT:
            raise BundleError(f"{self.facts.file}: logits are not float32 in the engine; rebuild the engines")

    def new_cache(self, *, branches: int, capacity: int, max_bytes: int | None) -> DeviceKVCache:
        """A KV cache on this engine's GPU, limited to the context the engine's profiles cover."""
        if branches > self.limits.max_branches:
            raise ConfigError(f"{branches} branches exceed the engine's max_branches ({self.limits.max_branches}); "
                              "use fewer or rebuild the engines with a larger --max-branches")
        return DeviceKVCache(memory=self.memory, layers=self.layers, kv_heads=self.kv_heads, head_dim=self.head_dim,
                             branches=branches, max_context=self.limits.max_context, capacity=capacity,
                             itemsize=self.kv_itemsize, max_bytes=max_bytes)

    def _bind(self, name: str, address: int, shape: tuple[int, ...] | None = None) -> None:
        """Set one tensor's shape (inputs) and address, refusing what TensorRT refuses (it returns False and logs)."""
        ctx = self.context
        if shape is not None and not ctx.set_input_shape(name, shape):
            raise SpecReasonError(f"TensorRT refused shape {shape} for {name} of {self.facts.file} (outside the "
                                  "optimization profile? see its log above)")
        if address % ALIGN:
            raise SpecReasonError(f"{name}: address {address:#x} is not {ALIGN}-byte aligned (a bug in the layout)")
        if not ctx.set_tensor_address(name, address):
            raise SpecReasonError(f"TensorRT refused the address of {name} of {self.facts.file}")

    def _step(self, *, cache: KVCache, input_ids: np.ndarray, n_new: np.ndarray, logits_index: np.ndarray,
              want_value: bool) -> tuple[np.ndarray, np.ndarray | None]:
        if not isinstance(cache, DeviceKVCache):
            raise ConfigError("the trt backend runs on its device KV cache: create caches with RoleModel.new_cache "
                              "(or TrtEngine.new_cache), not KVCache")
        if not self.stream:
            raise ConfigError(f"the TensorRT engine {self.facts.file} was closed")
        self.cuda.guard.use()
        branches, new = input_ids.shape
        k = logits_index.shape[1]
        cache.reserve(int((cache.lengths + n_new).max()))  # the capacity is the past the graph sees: fix it first
        past = cache.capacity
        dims = step_dims(inputs=self.inputs, branches=branches, new_tokens=new, past_tokens=past, logit_positions=k)
        profile = select_profile(self.profiles, dims, limits=self.limits)
        ctx = self.context
        if profile != self._profile:
            if not ctx.set_optimization_profile_async(profile, self.stream_handle):
                name = self.profiles[profile].name
                raise SpecReasonError(f"TensorRT refused optimization profile {profile} ({name})")
            self._profile = profile

        # 1. Host inputs, packed back to back (256-byte aligned) in pinned memory: one copy to the device.
        mask, positions = step_mask_positions(lengths=cache.lengths, n_new=n_new, past=past, new_tokens=new)
        host = {"input_ids": input_ids, "position_ids": positions, "attention_mask": mask,
                "logits_index": logits_index}
        offsets, total = {}, 0
        for name, array in host.items():
            offsets[name] = total
            total += _aligned(array.size * 8)
        packed = self._host_inputs.array((total // 8,), np.int64)
        for name, array in host.items():
            packed[offsets[name] // 8: offsets[name] // 8 + array.size] = np.asarray(array, np.int64).ravel()
        base = self._inputs.ensure(total)
        self.cuda.to_device(base, packed)
        for name, array in host.items():
            self._bind(name, base + offsets[name], tuple(array.shape))

        # 2. The cache buffers are the past, as they are.
        past_shape = (branches, self.kv_heads, past, self.head_dim)
        for i in range(self.layers):
            self._bind(self.past_key_names[i], cache.key_address(i), past_shape)
            self._bind(self.past_value_names[i], cache.value_address(i), past_shape)

        # 3. Outputs: new keys/values in the staging layout append_from expects (aligned slices).
        staging_layout = cache.staging_layout(new)
        staging = self._new_kv.ensure(staging_layout.nbytes)
        for i in range(self.layers):
            self._bind(self.new_key_names[i], staging + staging_layout.slice_offset(layer=i, values=False))
            self._bind(self.new_value_names[i], staging + staging_layout.slice_offset(layer=i, values=True))
        logits = self._host_logits.array((branches, k, self.vocab), np.float32)
        self._bind("logits", self._logits.ensure(logits.nbytes))
        missing = ctx.infer_shapes()  # names of inputs whose shapes are still unknown: none, or a bug above
        if missing:
            raise SpecReasonError(f"TensorRT still needs the shapes of {sorted(missing)} of {self.facts.file}")
        for name, scratch in self._extra.items():
            shape = tuple(ctx.get_tensor_shape(name))
            itemsize = np.dtype(self.trt.nptype(self.engine.get_tensor_dtype(name))).itemsize
            self._bind(name, scratch.ensure(int(np.prod(shape)) * itemsize))

        start = time.perf_counter()
        if not ctx.execute_async_v3(self.stream_handle):
            raise SpecReasonError(f"TensorRT execution of {self.facts.file} failed (see its log above)")
        # 4. Append in place on the device; only the requested logits rows cross to the host.
        cache.append_from(staging=staging, new_tokens=new, n_new=n_new)
        self.cuda.to_host(logits, self._logits.address)
        value = None
        if want_value:
            value = self._host_value.array((branches, k), np.float32)  # [branches, k]
            self.cuda.to_host(value, self._extra["value"].address)
        self.cuda.sync()
        self.ort_seconds += time.perf_counter() - start
        # The pinned buffers are rewritten by the next step: hand out copies.
        return logits.copy(), (value.copy() if value is not None else None)

    def close(self) -> None:
        """Free the stream, the scratch and pinned buffers and the pool; drop the TensorRT objects. Caches made
        by this engine must not be used afterwards. Idempotent."""
        if not getattr(self, "stream", None):
            return
        self.cuda.guard.use()
        self.cuda.sync()
        for scratch in (self._inputs, self._new_kv, self._logits, *self._extra.values()):
            scratch.close()
        for pinned in (self._host_inputs, self._host_logits, self._host_value):
            pinned.close()
        self.memory.close()
        self.context = self.engine = self.runtime = None
        self.cuda.check(self.cudart.cudaStreamDestroy(self.stream))
        self.stream, self.stream_handle = None, 0
