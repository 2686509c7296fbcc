"""Where a bundle's models run, and with which options.

Names (CLI `--provider`, Python `ProviderConfig(name=...)`):

  cpu        ONNX Runtime, CPUExecutionProvider (default)
  cuda       ONNX Runtime, CUDAExecutionProvider (onnxruntime-gpu), CPU fallback for unsupported nodes
  tensorrt   ONNX Runtime, TensorrtExecutionProvider (onnxruntime-gpu built with TensorRT): ONNX Runtime
             builds and caches the engines itself, with one optimization profile spanning every regime
             (trt.plan.spanning_profile: the EP runs profile 0 only), fp16 on request; CUDA then CPU as
             fallbacks for nodes TensorRT does not take. Needs a plain-attention bundle.
  trt        the native TensorRT backend (backends/trt/engine.py): the bundle's prebuilt engines (specreason-export
             --trt), KV caches on the GPU, only logits cross to the host. Needs pip install 'specreason-rt[trt]'.

With the ONNX Runtime providers the KV cache stays a host (numpy) cache: each call copies the cache to the
device and back. Only `trt` keeps it on the device.

A session that silently ends up on another provider (ONNX Runtime falls back when it cannot load CUDA or
libnvinfer) is refused: `check_session_providers` compares what was asked with `session.get_providers()[0]`.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..manifest import ModelEntry
from .trt.plan import EngineLimits, plan_profiles, spanning_profile

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


# onnxruntime and onnxruntime-gpu install the same `onnxruntime` package; with both installed the files of the
# one installed last win, typically leaving the CPU build (microsoft/onnxruntime#26996).
ORT_DISTRIBUTIONS = ("onnxruntime", "onnxruntime-gpu")
GPU_INSTALL_HINT = ("pip uninstall -y onnxruntime onnxruntime-gpu && pip install 'onnxruntime-gpu>=1.20,<1.27' "
                    "(CUDA 12; 'onnxruntime-gpu>=1.27' for CUDA 13), on an NVIDIA machine")


def installed_ort_distributions() -> list[str]:
    """Which of the ONNX Runtime distributions that provide `import onnxruntime` are installed."""
    found = []
    for name in ORT_DISTRIBUTIONS:
        try:
            importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        found.append(name)
    return found


def unavailable_message(*, wanted: str, available: Sequence[str], installed: Sequence[str]) -> str:
    """Why `wanted` is missing from this onnxruntime, and the one command that fixes it."""
    if set(ORT_DISTRIBUTIONS) <= set(installed):
        return (f"{wanted} is not available: both onnxruntime and onnxruntime-gpu are installed, which leaves only "
                f"the CPU build; keep one: {GPU_INSTALL_HINT}")
    return (f"{wanted} is not available in this onnxruntime build (available: {', '.join(available)}); "
            f"install onnxruntime-gpu: {GPU_INSTALL_HINT}")


def resolve_providers(name: str) -> list[str]:
    """Execution providers for a CLI/API name; refuse one this onnxruntime build lacks."""
    import onnxruntime as ort

    if name not in PROVIDERS:
        hint = " (trt is the native TensorRT backend: use ProviderConfig)" if name == NATIVE_TRT else ""
        raise ConfigError(f"unknown provider {name!r}: choose one of {', '.join(PROVIDERS)}{hint}")
    wanted = PROVIDERS[name][0]
    if wanted not in ort.get_available_providers():
        raise ConfigError(unavailable_message(wanted=wanted, available=ort.get_available_providers(),
                                              installed=installed_ort_distributions()))
    return PROVIDERS[name]


def preload_gpu_libraries(name: str) -> None:
    """Load the GPU libraries an ONNX Runtime provider dlopens, from where pip puts them.

    tensorrt: pip's TensorRT keeps libnvinfer in site-packages/tensorrt_libs, which the EP's dlopen does not search;
    importing tensorrt loads it into the process first (without it the EP falls back to CUDA silently).
    cuda/tensorrt: onnxruntime.preload_dlls (ONNX Runtime >= 1.21) loads CUDA and cuDNN from the nvidia-* wheels.
    """
    if name == "tensorrt":
        try:
            import tensorrt  # noqa: F401  (loaded for its side effect: libnvinfer in the process)
        except ImportError:
            pass  # a system TensorRT on the library path still works; check_session_providers catches the rest
    if name in ("cuda", "tensorrt"):
        import onnxruntime as ort

        preload = getattr(ort, "preload_dlls", None)
        if preload is not None:
            preload()


def provider_name(spec: ProviderSpec) -> str:
    return spec if isinstance(spec, str) else spec[0]


def check_session_providers(*, requested: Iterable[ProviderSpec], actual: Sequence[str], model: str) -> None:
    """Refuse a session that ONNX Runtime put on another provider than the first one asked for."""
    wanted = provider_name(next(iter(requested), "CPUExecutionProvider"))
    got = actual[0] if actual else "(none)"
    if got != wanted:
        hint = {"TensorrtExecutionProvider": "ONNX Runtime could not load TensorRT (libnvinfer): install the trt "
                                             "extra (pip install 'specreason-rt[trt-cu12]') or put TensorRT's lib "
                                             "directory on LD_LIBRARY_PATH",
                "CUDAExecutionProvider": "ONNX Runtime could not load CUDA or cuDNN: check the driver "
                                         "(nvidia-smi) and pip install 'onnxruntime-gpu[cuda,cudnn]'"}
        raise ConfigError(f"{model}: asked for {wanted} but the session runs on {got}; "
                          f"{hint.get(wanted, 'see the ONNX Runtime log')}")


def cuda_ep_options(*, device_id: int, tf32: bool) -> dict[str, str]:
    """CUDAExecutionProvider options. TF32 is off unless asked for: on Ampere and later it rounds fp32 matmul
    inputs to 10-bit mantissas (the built-in verifier's logits move by ~3e-2), which breaks fp32 parity."""
    return {"device_id": str(device_id), "use_tf32": "1" if tf32 else "0"}


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
    """TensorrtExecutionProvider options for one bundle model: engine and timing caches, fp16, and one explicit
    profile spanning every regime for every dynamic input (past starts at 0: the host cache is empty before
    prefill). One profile, because the EP's execution context stays on profile 0 (trt.plan.spanning_profile)."""
    if entry.kv_cache.get("attention", "plain") != "plain":
        raise ConfigError(f"{entry.role}: the tensorrt provider needs a plain-attention bundle, this one has "
                          f"{entry.kv_cache['attention']} attention (GroupQueryAttention is an ONNX Runtime contrib "
                          "op TensorRT cannot parse; the profiles are planned for the plain graph's inputs); "
                          "re-export with --attention plain or --trt")
    profile = spanning_profile(plan_profiles(limits=limits.clamp_context(entry.architecture.max_context),
                                             inputs=entry.io["inputs"], min_past=0))
    dynamic = [t["name"] for t in entry.io["inputs"] if any(isinstance(d, str) for d in t["shape"])]
    picks = [[{n: profile.shapes[n][i] for n in dynamic}] for i in range(3)]
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
    tf32: bool = False  # cuda provider: allow TF32 matmuls (faster on Ampere+, not fp32-exact)

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
        preload_gpu_libraries(self.name)
        specs: list[ProviderSpec] = []
        for provider in names:
            if provider == "TensorrtExecutionProvider":
                specs.append((provider, tensorrt_ep_options(
                    entry=entry, limits=self.limits, device_id=self.device_id, fp16=self.fp16,
                    cache_dir=self.cache_dir or default_cache_dir(), workspace_mib=self.workspace_mib)))
            elif provider == "CUDAExecutionProvider":
                specs.append((provider, cuda_ep_options(device_id=self.device_id, tf32=self.tf32)))
            else:
                specs.append(provider)
        return specs

    def describe(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["cache_dir"] = str(self.cache_dir) if self.cache_dir else None
        return out
