"""The GPU extras resolve to the intended major versions (issue 13, findings 1 and 2).

The version boundaries were read from the package index with `pip install --dry-run --report` (see
runtime/README.md, "Installing"): `tensorrt>=10.3` alone resolves to TensorRT 11 for CUDA 13 (tensorrt_cu13),
`cuda-python>=12.6` to cuda-bindings 13 (R580+ driver), and onnxruntime-gpu is built for CUDA 12 up to 1.26
(its `cuda` extra needs nvidia-cuda-runtime-cu12) and for CUDA 13 from 1.27 on."""

from __future__ import annotations

from pathlib import Path

import pytest
from packaging.requirements import Requirement

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def resolved(extra: str) -> dict[str, Requirement]:
    """The extra's requirements by distribution name, with self-references (specreason-rt[x]) expanded."""
    extras = tomllib.loads(PYPROJECT.read_text())["project"]["optional-dependencies"]
    out: dict[str, Requirement] = {}
    for line in extras[extra]:
        req = Requirement(line)
        if req.name == "specreason-rt":
            for inner in sorted(req.extras):
                out.update(resolved(inner))
        else:
            out[req.name] = req
    return out


def allows(req: Requirement, version: str) -> bool:
    return req.specifier.contains(version, prereleases=False)


def test_cuda12_extras_stay_on_cuda12_packages() -> None:
    trt = resolved("trt-cu12")
    assert set(trt) == {"tensorrt-cu12", "cuda-python"}, "never plain `tensorrt`: it resolves to the CUDA 13 build"
    assert allows(trt["tensorrt-cu12"], "10.3.0") and allows(trt["tensorrt-cu12"], "10.16.1.11")
    assert not allows(trt["tensorrt-cu12"], "11.0.0.114") and not allows(trt["tensorrt-cu12"], "10.2.0")
    assert allows(trt["cuda-python"], "12.6.2") and allows(trt["cuda-python"], "12.9.10")
    assert not allows(trt["cuda-python"], "13.0.0")
    ort = resolved("gpu-cu12")["onnxruntime-gpu"]
    assert allows(ort, "1.23.2") and allows(ort, "1.26.0")  # 1.23.2: the newest for Python 3.10 (JetPack 6)
    assert not allows(ort, "1.27.0")


def test_cuda13_extras_take_tensorrt11_and_cuda13_packages() -> None:
    trt = resolved("trt-cu13")
    assert set(trt) == {"tensorrt-cu13", "cuda-python"}
    assert allows(trt["tensorrt-cu13"], "11.4.0.106") and not allows(trt["tensorrt-cu13"], "10.13.3.9")
    assert allows(trt["cuda-python"], "13.4.4") and not allows(trt["cuda-python"], "12.9.10")
    ort = resolved("gpu-cu13")["onnxruntime-gpu"]
    assert allows(ort, "1.27.0") and allows(ort, "1.31.1") and not allows(ort, "1.26.0")


def test_the_short_names_are_the_cuda12_extras() -> None:
    assert resolved("trt") == resolved("trt-cu12")
    assert resolved("gpu") == resolved("gpu-cu12")


CONTAINERS = PYPROJECT.parent / "runtime" / "containers"


def test_the_jetson_image_names_no_base_it_cannot_pull_and_asks_the_driver_first() -> None:
    """`l4t-jetpack:r36.4.0` alone would be looked up on Docker Hub, where it is not: the base must be passed with
    its registry prefix. On L4T, PyPI's aarch64 cuda-python is unconfirmed: the container starts with the device
    check (cudaGetDeviceCount, then the device KV cache)."""
    text = (CONTAINERS / "Dockerfile.jetson").read_text()
    assert "\nARG BASE_IMAGE\n" in text and "ARG BASE_IMAGE=" not in text
    cmd = next(line for line in text.splitlines() if line.startswith("CMD"))
    assert cmd.index("runtime/device_smoke") < cmd.index("--engines-only") < cmd.index("runtime/latency_test")


def test_the_x86_image_ends_with_exactly_one_onnxruntime() -> None:
    text = (CONTAINERS / "Dockerfile.x86-gpu").read_text()
    assert "'.[export,trt-cu12]'" in text
    assert text.index("pip uninstall -y onnxruntime onnxruntime-gpu") < text.index("pip install --no-cache-dir "
                                                                                   "'onnxruntime-gpu[cuda,cudnn]")
    assert "assert d() == ['onnxruntime-gpu']" in text
