"""runtime/gpu_check and runtime/latency_test fail gracefully on a machine without a GPU or TensorRT (issue 12,
point 6): every backend that cannot run gets a "not run" row with its reason, never a traceback."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import onnxruntime as ort
import pytest

RUNTIME = Path(__file__).resolve().parents[1] / "runtime"
HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None


def run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(RUNTIME / script), *args], capture_output=True, text=True,
                          timeout=600)


def test_gpu_check_prints_not_run_rows_with_reasons(tiny_plain_bundle: Path) -> None:
    result = run("gpu_check", "--bundle", str(tiny_plain_bundle), "--steps", "2")
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 0, result.stdout + result.stderr
    rows = {line.split()[0]: line for line in result.stdout.splitlines() if line.split()[:1] in
            (["cpu"], ["cuda"], ["tensorrt"], ["trt"])}
    assert set(rows) == {"cpu", "cuda", "tensorrt", "trt"}
    assert rows["cpu"].split()[1] == "yes"
    available = ort.get_available_providers()
    if "CUDAExecutionProvider" not in available:
        assert "not run" in rows["cuda"] and "CUDAExecutionProvider is not available" in rows["cuda"]
    if "TensorrtExecutionProvider" not in available:
        assert "not run" in rows["tensorrt"] and "TensorrtExecutionProvider is not available" in rows["tensorrt"]
    if not HAS_TENSORRT:
        assert "not run" in rows["trt"] and "TensorRT is not installed" in rows["trt"]
        strict = run("gpu_check", "--bundle", str(tiny_plain_bundle), "--steps", "2", "--strict")
        assert strict.returncode == 1 and "Traceback" not in strict.stderr


def test_latency_test_runs_on_the_builtin_bundle_with_its_defaults(builtin_bundle: Path) -> None:
    result = run("latency_test", str(builtin_bundle))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["provider"] == "cpu"  # auto: the bundle has no TensorRT engines
    assert {(r["role"], r["branches"]) for r in report["results"]} == {
        (role, b) for role in ("speculator", "verifier") for b in (1, 4, 8)}
    # The default context (256) fits the built-in models' 512 positions with room for the 32 steps: not clamped.
    assert all(r["context"] == 256 and r["ms_per_step"] > 0 for r in report["results"])


@pytest.mark.skipif(HAS_TENSORRT, reason="tensorrt is installed: the missing-package line cannot show")
def test_latency_test_without_tensorrt_is_one_line(tiny_plain_bundle: Path) -> None:
    result = run("latency_test", str(tiny_plain_bundle), "--provider", "trt")
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "pip install 'specreason-rt[trt" in result.stderr


def test_device_smoke_runs_here_with_every_gpu_row_skipped_and_a_reason() -> None:
    result = run("device_smoke")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    rows = [line.split(None, 2) for line in result.stdout.splitlines()[2:]]
    names = [r[0] for r in rows]
    for expected in ("cuda", "kv:prefill", "kv:fork", "kv:append", "kv:grow", "kv:rewind", "kv:gather", "kv:concat",
                     "align", "pinned", "thread", "pool/close", "memcheck", "tensorrt", "ort-cuda", "ort-tensorrt"):
        assert expected in names, expected
    cuda_present = importlib.util.find_spec("cuda") is not None
    for name, result_, *detail in rows:
        if name == "tensorrt" and HAS_TENSORRT or cuda_present and name != "tensorrt" and not name.startswith("ort"):
            continue  # this machine can run that row: its result is not a skip
        assert result_ == "skip" and detail and detail[0].strip(), f"{name}: {result_} {detail}"
