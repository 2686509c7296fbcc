"""The `specreason` command line: generate, info, and one clear line for bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

EXE = str(Path(sys.executable).parent / "specreason")


def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([EXE, *args], capture_output=True, text=True, input=stdin, timeout=300)


def test_generate_streams_the_same_text_as_json(tiny_bundle: Path) -> None:
    streamed = run("generate", "--bundle", str(tiny_bundle), "--max-tokens", "12", "12+34")
    as_json = run("generate", "--bundle", str(tiny_bundle), "--max-tokens", "12", "--json", "12+34")
    assert streamed.returncode == 0 and as_json.returncode == 0, streamed.stderr + as_json.stderr
    (branch,) = json.loads(as_json.stdout)["branches"]
    assert streamed.stdout == branch["text"] + "\n"
    assert len(branch["tokens"]) == len(branch["logprobs"]) <= 12


def test_generate_branches_are_seeded(tiny_bundle: Path) -> None:
    args = ["generate", "--bundle", str(tiny_bundle), "--branches", "3", "--max-tokens", "8", "--json", "1+1"]
    a, b = run(*args, "--seed", "5"), run(*args, "--seed", "5")
    assert a.returncode == 0, a.stderr
    assert json.loads(a.stdout) == json.loads(b.stdout)
    assert len(json.loads(a.stdout)["branches"]) == 3


def test_generate_reads_stdin(tiny_bundle: Path) -> None:
    res = run("generate", "--bundle", str(tiny_bundle), "--max-tokens", "4", "--json", "-", stdin="9*9")
    assert res.returncode == 0, res.stderr


def test_bad_inputs_give_one_line(tiny_bundle: Path, tmp_path: Path) -> None:
    cases = [
        (["generate", "--bundle", str(tmp_path / "nope"), "hi"], "is not a directory"),
        (["generate", "--bundle", str(tiny_bundle), "--temperature", "-1", "hi"], "temperature must be"),
        (["generate", "--bundle", str(tiny_bundle), "--branches", "0", "hi"], "--branches must be >= 1"),
        (["generate", "--bundle", str(tiny_bundle), "   "], "prompt is empty"),
        (["generate", "--bundle", str(tiny_bundle), "--max-tokens", "100000", "hi"], "max context"),
        (["generate", "--bundle", str(tiny_bundle), "--max-tokens", "0", "hi"], "max_tokens must be >= 1"),
        (["generate", "--bundle", str(tiny_bundle), "--provider", "cuda", "hi"], "not available"),
        (["generate", "--bundle", str(tiny_bundle), "--branches", "8", "--kv-limit-mib", "0.01", "hi"],
         "over the limit"),
        (["info", "--bundle", str(tmp_path)], "has no manifest.json"),
    ]
    for args, needle in cases:
        res = run(*args)
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 1 and len(lines) == 1 and needle in lines[0], (args, res.stderr)
        assert lines[0].startswith("specreason: error: ")


def test_info_summarises_the_bundle(tiny_bundle: Path) -> None:
    res = run("info", "--bundle", str(tiny_bundle))
    assert res.returncode == 0, res.stderr
    assert "speculator" in res.stdout and "greedy agreement 100%" in res.stdout
    assert "KV cache for 4 branches x 128 tokens" in res.stdout  # context capped at the model's max
