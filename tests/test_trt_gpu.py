"""On an NVIDIA GPU with TensorRT: build engines for the tiny pair and check the native backend against ONNX
Runtime CPU. Marked gpu; skipped (not passed) where there is no GPU or no tensorrt/cuda-python."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.gpu


def _gpu_reason() -> str | None:
    if importlib.util.find_spec("tensorrt") is None:
        return "tensorrt is not installed (pip install 'specreason-rt[trt-cu12]')"
    if importlib.util.find_spec("cuda") is None:
        return "cuda-python is not installed (pip install 'specreason-rt[trt-cu12]')"
    from specreason_rt.backends.trt.engine import import_cudart

    cudart = import_cudart()
    err, count = cudart.cudaGetDeviceCount()
    if err != cudart.cudaError_t.cudaSuccess or count == 0:
        return "no NVIDIA GPU visible"
    return None


REASON = _gpu_reason()
skip_without_gpu = pytest.mark.skipif(REASON is not None, reason=REASON or "")


@pytest.fixture(scope="module")
def trt_bundle(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> Path:
    from specreason_export.bundle import ExportOptions, write_bundle
    from specreason_export.trt import TrtOptions
    from specreason_rt.backends.trt.plan import EngineLimits

    out = tmp_path_factory.mktemp("trt") / "tiny-trt"
    limits = EngineLimits(max_branches=8, max_prompt_tokens=64, max_step_tokens=16, max_context=128)
    write_bundle(ExportOptions(speculator=str(tiny_llama_dir), verifier=str(tiny_llama_dir), out=out,
                               trt=TrtOptions(limits=limits), show_progress=False))
    return out


@skip_without_gpu
def test_engines_are_recorded_and_load(trt_bundle: Path) -> None:
    from specreason_rt.manifest import load_manifest

    manifest = load_manifest(trt_bundle)
    assert set(manifest.engines) == {"speculator", "verifier"}
    assert manifest.engines["verifier"].max_branches == 8


@skip_without_gpu
def test_native_trt_matches_ort_cpu_on_a_ragged_batch(trt_bundle: Path) -> None:
    from specreason_rt.backends.providers import ProviderConfig
    from specreason_rt.bundle import Bundle

    cpu = Bundle(trt_bundle, roles=["verifier"]).models["verifier"]
    gpu = Bundle(trt_bundle, roles=["verifier"], providers=ProviderConfig(name="trt")).models["verifier"]
    prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
    caches = [m.new_cache(branches=3, capacity=8) for m in (cpu, gpu)]
    logits = [m.forward(cache=c, tokens=prompts) for m, c in zip((cpu, gpu), caches, strict=True)]
    for _ in range(12):  # greedy decode past the initial capacity (the device cache grows)
        assert np.abs(logits[0] - logits[1]).max() < 1e-3
        assert np.array_equal(logits[0].argmax(-1), logits[1].argmax(-1))
        nxt = [[int(t)] for t in logits[0].argmax(-1)]
        logits = [m.forward(cache=c, tokens=nxt) for m, c in zip((cpu, gpu), caches, strict=True)]
    for c in caches:
        c.gather([2, 2, 0])
    step = [[20, 21, 22], [23], [24, 25]]
    verify = [m.forward(cache=c, tokens=step, all_logits=True) for m, c in zip((cpu, gpu), caches, strict=True)]
    for b, t in enumerate(step):
        assert np.abs(verify[0][b, :len(t)] - verify[1][b, :len(t)]).max() < 1e-3


@skip_without_gpu
def test_concat_and_close_on_the_device(trt_bundle: Path) -> None:
    """A request joining a running batch (concat) gives the same logits as on CPU; close() frees the engine and
    a later step is refused."""
    from specreason_rt.backends.providers import ProviderConfig
    from specreason_rt.bundle import Bundle
    from specreason_rt.errors import ConfigError

    cpu = Bundle(trt_bundle, roles=["verifier"]).models["verifier"]
    gpu = Bundle(trt_bundle, roles=["verifier"], providers=ProviderConfig(name="trt")).models["verifier"]
    caches, joiners = [m.new_cache(branches=2, capacity=8) for m in (cpu, gpu)], []
    for m, c in zip((cpu, gpu), caches, strict=True):
        m.forward(cache=c, tokens=[[5, 6, 7], [8]])
        joiner = m.new_cache(branches=1, capacity=32)
        m.forward(cache=joiner, tokens=[[9, 10, 11, 12, 13, 14, 15, 16, 17, 18]])
        c.concat(joiner)
        joiners.append(joiner)
    logits = [m.forward(cache=c, tokens=[[20], [21], [22]]) for m, c in zip((cpu, gpu), caches, strict=True)]
    assert np.abs(logits[0] - logits[1]).max() < 1e-3
    gpu.engine.close()
    gpu.engine.close()  # idempotent
    with pytest.raises(ConfigError, match="closed"):
        gpu.forward(cache=caches[1], tokens=[[1], [1], [1]])
