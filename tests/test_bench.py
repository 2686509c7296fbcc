"""The fair benchmark harness: equal threads, interleaved windows, outputs compared, quality figures.

Real workers (ours on the tiny bundle, transformers on the tiny Llama folder it was exported from), real
subprocesses and pipes. No timing is asserted anywhere: only who ran, when relative to whom, with how many
threads, and what they computed.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from specreason_rt.bench_harness import OURS, SystemSpec, Worker, window_order
from specreason_rt.bench_quality import agreement, perplexity
from specreason_rt.manifest import load_manifest

EXE = str(Path(sys.executable).parent / "specreason")
ROOT = Path(__file__).resolve().parents[1]


def bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([EXE, "bench", *args], capture_output=True, text=True, cwd=ROOT, timeout=600)


def test_window_order_alternates() -> None:
    workers = [Worker(spec=SystemSpec(name=n, command=()), process=None, hello={})  # type: ignore[arg-type]
               for n in "ABC"]
    orders = ["".join(w.spec.name for w in window_order(workers, k)) for k in range(4)]
    assert orders == ["ABC", "CBA", "ABC", "CBA"]


def test_agreement_and_perplexity_by_hand() -> None:
    # prompt of 3 tokens, trajectory [7, 8, 9]; argmax[i] predicts token i + 1, so argmax[2:5] is compared.
    assert agreement(argmax=[0, 0, 7, 8, 9], start=3, trajectory=[7, 8, 9]) == (3, 3)
    assert agreement(argmax=[0, 0, 7, 5, 9], start=3, trajectory=[7, 8, 9]) == (2, 1)
    assert agreement(argmax=[0, 0, 1, 8, 9], start=3, trajectory=[7, 8, 9]) == (2, 0)
    assert perplexity([0.0, 0.0]) == 1.0 and abs(perplexity([-1.0, -3.0]) - 7.389056) < 1e-5


def test_decode_gives_every_system_the_same_threads_and_interleaves(tiny_bundle: Path, tiny_llama_dir: Path) -> None:
    res = bench("decode", "--bundle", str(tiny_bundle), "--peer", "transformers", str(tiny_llama_dir),
                "--threads", "1", "--branches", "1", "2", "--contexts", "8", "--steps", "3", "--warmup", "2",
                "--windows", "4", "--gap-ms", "0", "--no-floor", "--json")
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    # 1. The same explicit thread count reached every system, read back from each one (ORT's session options,
    #    torch.get_num_threads); both defaults differ from 1 on a machine with 2+ cores.
    assert {name: s["threads"] for name, s in data["systems"].items()} == {OURS: 1, "transformers": 1}
    assert data["machine"]["threads_per_system"] == 1 and data["machine"]["cpu_model"]
    # 2. Interleaved: per cell, windows run A,B then B,A ..., one system at a time (monotonic clock of the machine).
    windows = [r for r in data["raw"] if r["op"] == "decode_window"]
    assert len(windows) == 2 * 2 * 4  # cells x systems x windows
    windows.sort(key=lambda r: r["t0"])
    assert all(a["t1"] <= b["t0"] for a, b in zip(windows, windows[1:], strict=False)), "windows overlapped"
    for cell in range(2):
        order = [r["system"] for r in windows[cell * 8:(cell + 1) * 8]]
        assert order == [OURS, "transformers", "transformers", OURS] * 2, order
    # 3. Per cell and system: the rate, the cores used and a paired ratio over every window.
    for cell in data["cells"]:
        assert set(cell["systems"]) == {OURS, "transformers"}
        assert cell["ratios"][f"{OURS}/transformers"]["n"] == 4
        assert all(s["cores_used"]["n"] == 4 for s in cell["systems"].values())


def test_generate_outputs_are_compared(tiny_bundle: Path, tiny_llama_dir: Path, tmp_path: Path) -> None:
    """End to end on the same fp32 weights: ours and transformers must write the same greedy tokens."""
    out = tmp_path / "generate.json"
    res = bench("generate", "--bundle", str(tiny_bundle), "--peer", "transformers", str(tiny_llama_dir),
                "--threads", "1", "--raw", "--prompt", "37+45*3", "--new-tokens", "12", "--windows", "2",
                "--gap-ms", "0", "--out", str(out))
    assert res.returncode == 0, res.stderr
    assert "transformers" in res.stdout and "identical to ours" in res.stdout  # the human summary
    data = json.loads(out.read_text())
    assert data["timing"]["ratios"][f"{OURS}/transformers"]["n"] == 2
    outs = data["outputs"]
    assert len(outs[OURS]["tokens"]) == 12 and outs["transformers"]["tokens"] == outs[OURS]["tokens"]
    assert outs["transformers"]["identical_to_ours"] and outs[OURS]["deterministic"]
    assert [r["system"] for r in data["raw"] if r["op"] == "generate"][-4:] == [
        OURS, "transformers", "transformers", OURS]


def test_prefill_cells(tiny_bundle: Path, tiny_llama_dir: Path) -> None:
    res = bench("prefill", "--bundle", str(tiny_bundle), "--peer", "transformers", str(tiny_llama_dir),
                "--threads", "1", "--tokens", "16", "40", "--n-specs", "1", "4", "--windows", "2", "--gap-ms",
                "0", "--json")
    assert res.returncode == 0, res.stderr
    cells = json.loads(res.stdout)["cells"]
    assert [(c["n_specs"], c["prompt_tokens"]) for c in cells] == [(1, 16), (4, 16), (1, 40), (4, 40)]
    assert all(c["systems"][OURS]["ms"] > 0 for c in cells)


def test_quality_of_an_identical_model_is_perfect_and_recorded(tiny_bundle: Path, tiny_llama_dir: Path,
                                                                  tmp_path: Path) -> None:
    """The fp32 bundle against itself and against its torch source: agreement 1, perplexity ratio 1."""
    bundle = tmp_path / "copy"
    shutil.copytree(tiny_bundle, bundle)
    res = bench("quality", "--bundle", str(bundle), "--reference", str(tiny_bundle), "--new-tokens", "8",
                "--text-tokens", "100", "--peer", "transformers", str(tiny_llama_dir), "--threads", "1", "--record",
                "--json")
    assert res.returncode == 0, res.stderr
    models = json.loads(res.stdout)["models"]
    assert set(models) == {"fp32-reference", OURS, "transformers"}
    for q in models.values():
        assert q["greedy_agreement"] == 1.0 and q["positions"] == 24 * 8 and q["prompts_fully_identical"] == 24
        assert q["perplexity_over_reference"] == pytest.approx(1.0, abs=1e-3)
    recorded = load_manifest(bundle).models["speculator"].validation["quality"]
    assert recorded["greedy_agreement"] == 1.0 and recorded["prompts"] == 24


def test_bad_input_is_one_line(tiny_bundle: Path) -> None:
    for args, needle in ((["--peer", "llama.cpp", "x"], "unknown peer 'llama.cpp'"),
                         (["--threads", "0"], "--threads must be >= 1"),
                         (["--peer", "transformers", "/nonexistent/model"], "not found")):
        res = bench("decode", "--bundle", str(tiny_bundle), "--no-floor", *args)
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 1 and len(lines) == 1 and needle in lines[0], res.stderr


def test_verify_pass_one_forward_equals_one_per_draft(any_tiny_bundle: Path) -> None:
    res = bench("verify", "--bundle", str(any_tiny_bundle), "--context", "12", "--drafts", "3", "--draft-tokens",
                "5", "--repeats", "1", "--threads", "1", "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["max_abs_logit_difference"] < 1e-5 and out["one_forward_ms"] > 0 and out["one_per_draft_ms"] > 0
    bad = bench("verify", "--bundle", str(any_tiny_bundle), "--context", "1000")
    assert bad.returncode != 0 and "max context" in bad.stderr and "Traceback" not in bad.stderr
