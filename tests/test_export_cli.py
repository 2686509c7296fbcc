"""specreason-export: successful exports, and one clear line with no bundle left behind for bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from specreason_export.cli import main
from specreason_rt.manifest import load_manifest

from .conftest import read_manifest


def run_export(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(["--quiet", *args])
    err = capsys.readouterr().err
    return code, err


def assert_nothing_written(out: Path) -> None:
    assert not out.exists(), f"{out} was written"
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    assert leftovers == [], f"temporary files left behind: {leftovers}"


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code != 0
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one line, got: {err!r}"
    assert lines[0].startswith("specreason-export: error: ")
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"


def test_tiny_hf_dir_exports_and_validates(tmp_path: Path, capsys, tiny_llama_dir: Path) -> None:
    out = tmp_path / "bundle"
    code, err = run_export(capsys, "--speculator", str(tiny_llama_dir), "--verifier", str(tiny_llama_dir),
                           "--out", str(out))
    assert code == 0, err
    manifest = load_manifest(out)  # also re-checks every file hash
    spec = manifest.models["speculator"]
    assert spec.validation["passed"] and spec.validation["greedy_agreement"] == 1.0
    assert spec.validation["max_abs_logit_diff"] <= 1e-3
    assert spec.validation["branches"] >= 3 and len(set(spec.validation["prompt_lengths"])) >= 2
    assert spec.validation["decode_steps"] >= 8
    assert spec.source["kind"] == "hf" and spec.source["files"]
    assert manifest.tokenizers_shared
    assert (out / "speculator" / "tokenizer.json").is_file()
    assert spec.generation.eos_ids == (2,) and spec.generation.step_delimiter == "\n\n"
    assert {"torch", "transformers", "onnxruntime", "onnx"} <= set(manifest.tools)
    assert_nothing_written(tmp_path / "not-there")  # and no temp dirs beside the bundle
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_quantized_exports_record_validation(tmp_path: Path, capsys, precision: str) -> None:
    """The trained built-in pair (a random model's near-uniform logits make quantized argmax a coin toss)."""
    import onnx

    out = tmp_path / precision
    code, err = run_export(capsys, "--out", str(out), "--precision", precision)
    assert code == 0, err
    data = read_manifest(out)
    assert data["precision"] == precision
    for entry in data["models"].values():
        v = entry["validation"]
        assert v["precision"] == precision and v["passed"]
        assert v["tolerance"]["max_abs_logit_diff"] is None  # recorded, not enforced for quantized weights
        assert 0.5 <= v["greedy_agreement"] <= 1.0 and v["max_abs_logit_diff"] > 0.0
        assert v["quantization"]["embedding"]  # the format the agreement was measured on (export/quantize.py)
    ops = {n.op_type for n in onnx.load(str(out / "speculator" / "model.onnx")).graph.node}
    assert ("MatMulNBits" if precision == "int4" else "MatMulInteger") in ops


def test_different_tokenizers_are_allowed_and_recorded(tmp_path: Path, capsys, tiny_llama_dir: Path,
                                                       word_tokenizer_llama_dir: Path) -> None:
    out = tmp_path / "mixed"
    code, err = run_export(capsys, "--speculator", str(tiny_llama_dir), "--verifier", str(word_tokenizer_llama_dir),
                           "--out", str(out))
    assert code == 0, err
    assert read_manifest(out)["tokenizers_shared"] is False


def test_unknown_source(tmp_path: Path, capsys) -> None:
    out = tmp_path / "b"
    code, err = run_export(capsys, "--speculator", "no-such-model", "--out", str(out))
    assert_one_line_error(code, err, "unknown source 'no-such-model'", "built-in name")
    assert_nothing_written(out)


def test_hub_id_without_network(tmp_path: Path, capsys, monkeypatch, tiny_llama_dir: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # this machine has no hub access; offline mode fails at once
    out = tmp_path / "b"
    code, err = run_export(capsys, "--speculator", str(tiny_llama_dir), "--verifier", "someorg/no-such-model",
                           "--out", str(out))
    assert_one_line_error(code, err, "someorg/no-such-model", "hub")
    assert_nothing_written(out)


def test_missing_gguf(tmp_path: Path, capsys) -> None:
    out = tmp_path / "b"
    code, err = run_export(capsys, "--speculator", str(tmp_path / "missing.gguf"), "--out", str(out))
    assert_one_line_error(code, err, "no such .gguf file")
    assert_nothing_written(out)


def test_corrupt_gguf(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "corrupt.gguf"
    bad.write_bytes(b"GGUF" + os.urandom(4096))
    out = tmp_path / "b"
    code, err = run_export(capsys, "--speculator", str(bad), "--out", str(out))
    assert_one_line_error(code, err, "not a valid GGUF file")
    assert_nothing_written(out)


def test_directory_without_config(tmp_path: Path, capsys) -> None:
    (tmp_path / "empty-model").mkdir()
    out = tmp_path / "b"
    code, err = run_export(capsys, "--speculator", str(tmp_path / "empty-model"), "--out", str(out))
    assert_one_line_error(code, err, "no config.json")
    assert_nothing_written(out)


def test_corrupt_weights(tmp_path: Path, capsys, tiny_llama_dir: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny_llama_dir, broken)
    (broken / "model.safetensors").write_bytes(b"\x00" * 100)
    out = tmp_path / "b"
    code, err = run_export(capsys, "--speculator", str(broken), "--out", str(out))
    assert_one_line_error(code, err, "cannot load weights")
    assert_nothing_written(out)


def test_unsupported_architecture(tmp_path: Path, capsys) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50)).save_pretrained(gpt2)
    out = tmp_path / "b"
    code, err = run_export(capsys, "--speculator", str(gpt2), "--out", str(out))
    assert_one_line_error(code, err, "unsupported architecture 'gpt2'", "llama")
    assert_nothing_written(out)


def test_existing_output_needs_force(tmp_path: Path, capsys, tiny_llama_dir: Path, tiny_bundle: Path) -> None:
    out = tmp_path / "b"
    shutil.copytree(tiny_bundle, out)
    old_created = read_manifest(out)["created"]
    (out / "manifest.json").write_text((out / "manifest.json").read_text().replace(old_created, "old"))
    args = ["--speculator", str(tiny_llama_dir), "--verifier", str(tiny_llama_dir), "--out", str(out)]
    code, err = run_export(capsys, *args)
    assert_one_line_error(code, err, "already exists", "--force")
    assert read_manifest(out)["created"] == "old"  # untouched
    code, err = run_export(capsys, *args, "--force")
    assert code == 0, err
    assert read_manifest(out)["created"] != "old"  # replaced by the new bundle
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_validation_failure_leaves_no_bundle(tmp_path: Path, capsys, tiny_llama_dir: Path) -> None:
    out = tmp_path / "b"
    code, err = run_export(capsys, "--speculator", str(tiny_llama_dir), "--verifier", str(tiny_llama_dir),
                           "--out", str(out), "--precision", "int8", "--max-logit-diff", "1e-12")
    assert_one_line_error(code, err, "failed validation", "no bundle written")
    assert_nothing_written(out)


def test_too_few_decode_steps(tmp_path: Path, capsys) -> None:
    code, err = run_export(capsys, "--decode-steps", "2", "--out", str(tmp_path / "b"))
    assert_one_line_error(code, err, "--decode-steps must be >= 8")


def test_no_space_left(tmp_path: Path, capsys, tiny_llama_dir: Path) -> None:
    """A real full filesystem: a 1 MiB tmpfs (needs root, as this machine and CI have)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {res.stderr.decode().strip()}")
    try:
        out = mnt / "b"
        code, err = run_export(capsys, "--speculator", str(tiny_llama_dir), "--verifier", str(tiny_llama_dir),
                               "--out", str(out))
        assert_one_line_error(code, err, "space")
        assert_nothing_written(out)
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_help_explains_sources() -> None:
    res = subprocess.run([sys.executable, "-m", "specreason_export.cli", "--help"], capture_output=True, text=True)
    assert res.returncode == 0
    for needle in ("SOURCE", ".gguf", "--precision", "--force", "validat"):
        assert needle in res.stdout


def test_default_export_is_the_builtin_pair(tmp_path: Path) -> None:
    """The real console script with no arguments writes ./specreason-bundle from the built-in pair."""
    exe = Path(sys.executable).parent / "specreason-export"
    res = subprocess.run([str(exe)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    assert "[1/" in res.stderr  # progress per stage
    manifest = load_manifest(tmp_path / "specreason-bundle")
    for role in ("speculator", "verifier"):
        entry = manifest.models[role]
        assert entry.source == {**entry.source, "kind": "builtin", "id": role}
        assert entry.validation["passed"] and entry.validation["greedy_agreement"] == 1.0
        assert entry.validation["max_abs_logit_diff"] <= 1e-3
    assert manifest.tokenizers_shared
    assert json.loads((tmp_path / "specreason-bundle" / "manifest.json").read_text())["schema_version"] == 1
