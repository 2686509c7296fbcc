"""Execution-provider configuration: names, availability, and the TensorRT EP's options for a bundle model."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import onnxruntime as ort
import pytest

from specreason_rt.errors import ConfigError
from specreason_rt.manifest import load_manifest
from specreason_rt.providers import PROVIDERS, ProviderConfig, resolve_providers, tensorrt_ep_options
from specreason_rt.trt_plan import EngineLimits

LIMITS = EngineLimits(max_branches=4, max_prompt_tokens=32, max_step_tokens=8, max_context=64)


def test_the_old_import_path_still_works() -> None:
    from specreason_rt.engine import PROVIDERS as OLD
    from specreason_rt.engine import resolve_providers as old

    assert old is resolve_providers and OLD is PROVIDERS
    assert old("cpu") == ["CPUExecutionProvider"]


def test_unknown_and_unavailable_providers_are_refused() -> None:
    with pytest.raises(ConfigError, match="unknown provider 'rocm'"):
        resolve_providers("rocm")
    with pytest.raises(ConfigError, match="native TensorRT backend"):
        resolve_providers("trt")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(ConfigError, match=r"pip install 'specreason-rt\[gpu\]'"):
            resolve_providers("cuda")


def test_provider_config_is_validated() -> None:
    with pytest.raises(ConfigError, match="unknown provider"):
        ProviderConfig(name="gpu")
    with pytest.raises(ConfigError, match="fp16 applies to the tensorrt provider"):
        ProviderConfig(name="cuda", fp16=True)
    with pytest.raises(ConfigError, match="device_id"):
        ProviderConfig(name="cuda", device_id=-1)
    assert ProviderConfig(name="trt").native_trt


def test_cpu_config_gives_plain_cpu_provider(tiny_plain_bundle: Path) -> None:
    entry = load_manifest(tiny_plain_bundle).models["verifier"]
    assert ProviderConfig().ort_providers(entry=entry) == ["CPUExecutionProvider"]


def test_tensorrt_ep_options_cover_every_dynamic_input_per_regime(tiny_plain_bundle: Path, tmp_path: Path) -> None:
    entry = load_manifest(tiny_plain_bundle).models["verifier"]
    opts = tensorrt_ep_options(entry=entry, limits=LIMITS, device_id=1, fp16=True, cache_dir=tmp_path,
                               workspace_mib=512)
    assert opts["device_id"] == "1" and opts["trt_fp16_enable"] == "True"
    assert opts["trt_engine_cache_enable"] == "True" and opts["trt_engine_cache_path"] == str(tmp_path)
    assert opts["trt_timing_cache_path"] == str(tmp_path)
    assert opts["trt_max_workspace_size"] == str(512 << 20)
    names = [t["name"] for t in entry.io["inputs"]]
    for key in ("trt_profile_min_shapes", "trt_profile_opt_shapes", "trt_profile_max_shapes"):
        listed = [item.split(":")[0] for item in opts[key].split(",")]
        assert listed == names * 3, "one listing of every input per profile (decode, verify, prefill)"
    mins, maxs = opts["trt_profile_min_shapes"].split(","), opts["trt_profile_max_shapes"].split(",")
    # The host cache is empty before the first prefill: past starts at 0. kv_heads 2, head_dim 16.
    assert "past_key.0:1x2x0x16" in mins
    assert maxs[:2] == ["input_ids:4x1", "position_ids:4x1"]  # decode
    assert "input_ids:4x32" in maxs and "attention_mask:4x96" in maxs  # prefill: 64 past + 32 new


def test_tensorrt_ep_needs_a_plain_bundle(tiny_bundle: Path, tmp_path: Path) -> None:
    entry = load_manifest(tiny_bundle).models["verifier"]
    with pytest.raises(ConfigError, match="plain-attention bundle"):
        tensorrt_ep_options(entry=entry, limits=LIMITS, device_id=0, fp16=False, cache_dir=tmp_path,
                            workspace_mib=512)


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="onnxruntime-gpu is installed")
def test_generate_with_an_unavailable_provider_is_one_line(tiny_plain_bundle: Path) -> None:
    run = subprocess.run([sys.executable, "-m", "specreason_rt.cli", "generate", "--bundle", str(tiny_plain_bundle),
                          "--provider", "tensorrt", "1+1"], capture_output=True, text=True)
    assert run.returncode == 1
    assert run.stderr.count("\n") == 1 and "TensorrtExecutionProvider is not available" in run.stderr
