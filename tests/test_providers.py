"""Execution-provider configuration: names, availability, and the TensorRT EP's options for a bundle model."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import onnxruntime as ort
import pytest

from specreason_rt.backends.ort import OrtEngine
from specreason_rt.backends.providers import (
    ProviderConfig,
    check_session_providers,
    cuda_ep_options,
    resolve_providers,
    tensorrt_ep_options,
    unavailable_message,
)
from specreason_rt.backends.trt.plan import EngineLimits
from specreason_rt.errors import ConfigError
from specreason_rt.manifest import load_manifest

LIMITS = EngineLimits(max_branches=4, max_prompt_tokens=32, max_step_tokens=8, max_context=64)


def test_unknown_and_unavailable_providers_are_refused() -> None:
    with pytest.raises(ConfigError, match="unknown provider 'rocm'"):
        resolve_providers("rocm")
    with pytest.raises(ConfigError, match="native TensorRT backend"):
        resolve_providers("trt")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(ConfigError, match=r"pip install 'onnxruntime-gpu>=1.20,<1.27'"):
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


def test_tensorrt_ep_gets_one_profile_spanning_every_regime(tiny_plain_bundle: Path, tmp_path: Path) -> None:
    """ONNX Runtime's TensorRT EP keeps its execution context on profile 0 (microsoft/onnxruntime PR #31624), so
    a second profile would never run: one profile must hold decode, a ragged verify and a prefill."""
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
        assert listed == names, "every input listed once: one profile"
    mins = dict(item.split(":") for item in opts["trt_profile_min_shapes"].split(","))
    opts_ = dict(item.split(":") for item in opts["trt_profile_opt_shapes"].split(","))
    maxs = dict(item.split(":") for item in opts["trt_profile_max_shapes"].split(","))
    # The host cache is empty before the first prefill: past starts at 0. kv_heads 2, head_dim 16.
    assert mins["past_key.0"] == "1x2x0x16" and mins["input_ids"] == "1x1"
    # Up to 4 branches of a 32-token prompt, 8 logit positions, 64 past + 32 new key slots.
    assert maxs["input_ids"] == "4x32" and maxs["logits_index"] == "4x8" and maxs["attention_mask"] == "4x96"
    assert opts_["input_ids"] == "4x1", "tuned for decode, the regime that runs most"


def test_cuda_ep_keeps_tf32_off_unless_asked() -> None:
    assert cuda_ep_options(device_id=2, tf32=False) == {"device_id": "2", "use_tf32": "0"}
    assert cuda_ep_options(device_id=0, tf32=True)["use_tf32"] == "1"
    assert ProviderConfig(name="cuda").tf32 is False


def test_a_session_that_fell_back_to_another_provider_is_refused(tiny_plain_bundle: Path) -> None:
    """ONNX Runtime warns and runs on the next provider when the first cannot load; here, on a CPU build, the
    CUDA EP is absent, which is exactly that fallback."""
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed: the CUDA EP would load")
    entry = load_manifest(tiny_plain_bundle).models["verifier"]
    with pytest.raises(ConfigError, match="asked for CUDAExecutionProvider but the session runs on "
                                          "CPUExecutionProvider.*cuDNN"):
        OrtEngine.from_bundle(bundle_dir=tiny_plain_bundle, entry=entry,
                              providers=[("CUDAExecutionProvider", {"device_id": "0"}), "CPUExecutionProvider"])
    with pytest.raises(ConfigError, match="could not load TensorRT.*trt-cu12"):
        check_session_providers(requested=[("TensorrtExecutionProvider", {}), "CUDAExecutionProvider"],
                                actual=["CUDAExecutionProvider", "CPUExecutionProvider"], model="m")
    check_session_providers(requested=["CPUExecutionProvider"], actual=["CPUExecutionProvider"], model="m")


def test_both_onnxruntime_packages_installed_is_named() -> None:
    both = unavailable_message(wanted="CUDAExecutionProvider", available=["CPUExecutionProvider"],
                               installed=["onnxruntime", "onnxruntime-gpu"])
    assert "both onnxruntime and onnxruntime-gpu are installed" in both
    assert "pip uninstall -y onnxruntime onnxruntime-gpu && pip install 'onnxruntime-gpu>=1.20,<1.27'" in both
    cpu_only = unavailable_message(wanted="CUDAExecutionProvider", available=["CPUExecutionProvider"],
                                   installed=["onnxruntime"])
    assert "not available in this onnxruntime build" in cpu_only and "both" not in cpu_only


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
