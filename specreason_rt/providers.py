"""Where a bundle's models run, and with which options.

Names (CLI `--provider`, Python `ProviderConfig(name=...)`):

  cpu        ONNX Runtime, CPUExecutionProvider (default)
  cuda       ONNX Runtime, CUDAExecutionProvider (onnxruntime-gpu), CPU fallback for unsupported nodes
  tensorrt   ONNX Runtime, TensorrtExecutionProvider (onnxruntime-gpu built with TensorRT): ONNX Runtime
             builds and caches the engines itself, with one optimization profile per regime (trt_plan.py)
             for every dynamic input, fp16 on request; CUDA then CPU as fallbacks. Needs a plain-attention bundle.
  trt        the native TensorRT backend (trt_engine.py): the bundle's prebuilt engines (specreason-export
             --trt), KV caches on the GPU, only logits cross to the host. Needs pip install 'specreason-rt[trt]'.

With the ONNX Runtime providers the KV cache stays a host (numpy) cache: each call copies the cache to the
device and back. Only `trt` keeps it on the device.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .manifest import ModelEntry
from .trt_plan import EngineLimits, plan_profiles

# CLI names -> ONNX Runtime execution providers. Later entries in a list are fallbacks for unsupported ops.
PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}
NATIVE_TRT = "trt"
PROVIDER_NAMES = (*PROVIDERS, NATIVE_TRT)

# What onnxruntime.InferenceSession takes: a provider name, or (name, {option: value}).
ProviderSpec = str | tuple[str, dict[str, str]]


def resolve_providers(name: str) -> list[str]:
    """Execution providers for a CLI/API name; refuse one this onnxruntime build lacks."""
    import onnxruntime as ort

    if name not in PROVIDERS:
        hint = " (trt is the native TensorRT backend: use ProviderConfig)" if name == NATIVE_TRT else ""
        raise ConfigError(f"unknown provider {name!r}: choose one of {', '.join(PROVIDERS)}{hint}")
    wanted = PROVIDERS[name][0]
    if wanted not in ort.get_available_providers():
        raise ConfigError(f"{wanted} is not available in this onnxruntime build "
                          f"(available: {', '.join(ort.get_available_providers())}); "
                          "install onnxruntime-gpu (pip install 'specreason-rt[gpu]') on an NVIDIA machine")
    return PROVIDERS[name]


def default_cache_dir() -> Path:
    """Where the TensorRT EP keeps its engines and timing cache unless told otherwise."""
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "specreason" / "trt-ep"


def _shape_list(profiles_shapes: list[dict[str, tuple[int, ...]]]) -> str:
    # "name:1x2x3,name:4x5x6": a name listed once per profile makes one profile per listing (ONNX Runtime's syntax).
    return ",".join(f"{name}:{'x'.join(str(d) for d in shape)}"
                    for shapes in profiles_shapes for name, shape in shapes.items())


def tensorrt_ep_options(*, entry: ModelEntry, limits: EngineLimits, device_id: int, fp16: bool, cache_dir: Path,
                        workspace_mib: int) -> dict[str, str]:
    """TensorrtExecutionProvider options for one bundle model: engine and timing caches, fp16, and an explicit
    profile per regime covering every dynamic input (past starts at 0: the host cache is empty before prefill)."""
    if entry.kv_cache.get("attention", "plain") != "plain":
        raise ConfigError(f"{entry.role}: the tensorrt provider needs a plain-attention bundle (GroupQueryAttention "
                          "is an ONNX Runtime contrib op TensorRT cannot parse); re-export with --attention plain "
                          "or --trt")
    profiles = plan_profiles(limits=limits.clamp_context(entry.architecture.max_context), inputs=entry.io["inputs"],
                             min_past=0)
    dynamic = [t["name"] for t in entry.io["inputs"] if any(isinstance(d, str) for d in t["shape"])]
    picks = [[{n: p.shapes[n][i] for n in dynamic} for p in profiles] for i in range(3)]
    return {
        "device_id": str(device_id),
        "trt_fp16_enable": "True" if fp16 else "False",
        "trt_max_workspace_size": str(workspace_mib << 20),
        "trt_engine_cache_enable": "True",
        "trt_engine_cache_path": str(cache_dir),
        "trt_timing_cache_enable": "True",
        "trt_timing_cache_path": str(cache_dir),
        "trt_profile_min_shapes": _shape_list(picks[0]),
        "trt_profile_opt_shapes": _shape_list(picks[1]),
        "trt_profile_max_shapes": _shape_list(picks[2]),
    }


@dataclasses.dataclass(frozen=True)
class ProviderConfig:
    """One concern: where the models run. `limits` size the TensorRT EP's profiles (the native backend reads
    its limits from the bundle's engines)."""

    name: str = "cpu"
    device_id: int = 0
    fp16: bool = False  # TensorRT EP only; native engines carry their precision
    cache_dir: Path | None = None  # TensorRT EP engine + timing cache (default: default_cache_dir())
    workspace_mib: int = 4096
    limits: EngineLimits = EngineLimits()

    def __post_init__(self) -> None:
        if self.name not in PROVIDER_NAMES:
            raise ConfigError(f"unknown provider {self.name!r}: choose one of {', '.join(PROVIDER_NAMES)}")
        if self.device_id < 0:
            raise ConfigError(f"device_id must be >= 0, got {self.device_id}")
        if self.fp16 and self.name != "tensorrt":
            raise ConfigError("fp16 applies to the tensorrt provider; native trt engines are built fp16 with "
                              "specreason-export --trt --precision fp16, the cpu/cuda providers run the fp32 ONNX")
        if self.workspace_mib < 1:
            raise ConfigError(f"workspace_mib must be >= 1, got {self.workspace_mib}")

    @property
    def native_trt(self) -> bool:
        return self.name == NATIVE_TRT

    def ort_providers(self, *, entry: ModelEntry) -> list[ProviderSpec]:
        """The providers list for an onnxruntime.InferenceSession of this bundle model."""
        if self.native_trt:
            raise ConfigError("the trt backend does not run through ONNX Runtime")
        names = resolve_providers(self.name)
        device: dict[str, str] = {"device_id": str(self.device_id)}
        specs: list[ProviderSpec] = []
        for provider in names:
            if provider == "TensorrtExecutionProvider":
                specs.append((provider, tensorrt_ep_options(
                    entry=entry, limits=self.limits, device_id=self.device_id, fp16=self.fp16,
                    cache_dir=self.cache_dir or default_cache_dir(), workspace_mib=self.workspace_mib)))
            elif provider == "CUDAExecutionProvider":
                specs.append((provider, dict(device)))
            else:
                specs.append(provider)
        return specs

    def describe(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["cache_dir"] = str(self.cache_dir) if self.cache_dir else None
        return out
