"""The `specreason` command line: generate, info, one clear line for bad input, and the conventions users
know from other tools (--version, python -m, a default bundle, examples and defaults in --help, did-you-mean,
a quiet closed pipe)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from specreason_rt.cli import build_parser
from specreason_rt.cli.common import BUNDLE_ENV
from specreason_rt.cli.info import describe_windows
from specreason_rt.cli.parser import HelpFormatter, subcommands
from specreason_rt.manifest import Architecture

EXE = str(Path(sys.executable).parent / "specreason")
EXPORT_EXE = str(Path(sys.executable).parent / "specreason-export")


def run(*args: str, stdin: str | None = None, cwd: Path | None = None,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([EXE, *args], capture_output=True, text=True, input=stdin, timeout=300, cwd=cwd,
                          env=env)


def env_without_bundle(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != BUNDLE_ENV}
    return {**env, **extra}


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


def test_version_on_both_commands_and_python_m() -> None:
    version = metadata.version("specreason-rt")
    for cmd, prog in (([EXE], "specreason"), ([sys.executable, "-m", "specreason_rt"], "specreason"),
                      ([EXPORT_EXE], "specreason-export"), ([sys.executable, "-m", "specreason_export"],
                                                            "specreason-export")):
        res = subprocess.run([*cmd, "--version"], capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, (cmd, res.stderr)
        assert res.stdout.startswith(f"{prog} {version} (onnxruntime "), res.stdout


def test_python_m_runs_a_subcommand(tiny_bundle: Path) -> None:
    res = subprocess.run([sys.executable, "-m", "specreason_rt", "info", "--bundle", str(tiny_bundle)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "greedy agreement" in res.stdout, res.stderr


def test_bundle_defaults_to_the_env_var_then_the_export_folder(tiny_bundle: Path, tmp_path: Path) -> None:
    shutil.copytree(tiny_bundle, tmp_path / "specreason-bundle")  # what a bare specreason-export writes here
    res = run("info", cwd=tmp_path, env=env_without_bundle())
    assert res.returncode == 0 and res.stdout.startswith("bundle specreason-bundle:"), res.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    res = run("info", cwd=elsewhere, env=env_without_bundle(**{BUNDLE_ENV: str(tiny_bundle)}))
    assert res.returncode == 0 and res.stdout.startswith(f"bundle {tiny_bundle}:"), res.stderr
    res = run("generate", "--max-tokens", "2", "1+1", cwd=elsewhere, env=env_without_bundle())
    assert res.returncode == 1 and res.stderr == ("specreason: error: no bundle at ./specreason-bundle (the default): "
                                                  f"pass --bundle DIR, set ${BUNDLE_ENV}, or create "
                                                  "./specreason-bundle with specreason-export\n")


def test_every_subcommand_help_has_an_example_and_its_defaults() -> None:
    subs = subcommands(build_parser())
    assert {"info", "generate", "run", "eval", "serve", "bench", "bench logits", "bench decode"} <= set(subs)
    for name, parser in subs.items():
        text = parser.format_help()
        assert "\nexample" in text and "  specreason " in text.split("\nexample")[1], name
        formatter = HelpFormatter(prog="x")
        for action in parser._actions:
            shown = action.default is not None and action.default is not False and action.default != argparse.SUPPRESS
            if shown and action.option_strings and action.help:
                assert "default" in formatter._get_help_string(action), (name, action.dest)
        assert "--bundle DIR" not in text or "$SPECREASON_BUNDLE" in text, name
    generate = subs["generate"].format_help()
    assert "(default: 0.0)" in generate.replace("\n", " ").replace("  ", " ")  # --min-p: a default shown
    assert "(default: None)" not in generate and "(default: False)" not in generate


def test_did_you_mean_for_flags_subcommands_and_choices(tiny_bundle: Path) -> None:
    b = ["--bundle", str(tiny_bundle)]
    cases = [
        (["run", *b, "--tresh", "5", "1+1"], "unrecognized arguments: --tresh 1+1; --tresh: did you mean --threshold?"),
        (["run", *b, "--sed=3", "1+1"], "--sed=3: did you mean --seed?"),
        (["eval", *b, "--problemz", "p.jsonl"],  # the required --problems is what argparse reports first
         "the following arguments are required: --problems; --problemz: did you mean --problems?"),
        (["rn", "1+1"], "invalid choice: 'rn'; did you mean run?"),
        (["bench", "decod"], "invalid choice: 'decod'; did you mean decode?"),
        (["run", *b, "--strategy", "stepwize", "1+1"], "invalid choice: 'stepwize'; did you mean stepwise?"),
    ]
    for args, needle in cases:
        res = run(*args)
        assert res.returncode == 2 and needle in res.stderr, (args, res.stderr)
        assert "Traceback" not in res.stderr
    res = run("run", *b, "--zzzzzz", "1+1")
    assert res.returncode == 2 and "did you mean" not in res.stderr  # nothing close: no guess


def test_a_closed_pipe_ends_quietly(tiny_bundle: Path) -> None:
    """`specreason info --json | head -1`: the reader is gone before the writer writes (made certain here by
    closing the pipe's read end first)."""
    for args in (["info", "--bundle", str(tiny_bundle), "--json"], ["--help"],
                 ["generate", "--bundle", str(tiny_bundle), "--max-tokens", "4", "1+1"]):
        read, write = os.pipe()
        os.close(read)
        try:
            res = subprocess.run([EXE, *args], stdout=write, stderr=subprocess.PIPE, text=True, timeout=120)
        finally:
            os.close(write)
        assert res.stderr == "" and res.returncode in (141, 0), (args, res.returncode, res.stderr)
        assert args == ["--help"] or res.returncode == 141


def test_info_shows_attention_and_backends(tiny_bundle: Path, tiny_plain_bundle: Path) -> None:
    gqa = run("info", "--bundle", str(tiny_bundle))
    assert gqa.returncode == 0, gqa.stderr
    assert gqa.stdout.count("attention: gqa (ONNX Runtime's GroupQueryAttention") == 2
    lines = {line.split()[0]: line.split()[1] for line in gqa.stdout.splitlines()[-4:]}
    assert lines == {"cpu": "yes", "cuda": "yes", "tensorrt": "no", "trt": "no"}, gqa.stdout
    assert "speculator and verifier: gqa attention is an ONNX Runtime contrib op" in gqa.stdout
    plain = run("info", "--bundle", str(tiny_plain_bundle))
    assert plain.stdout.count("attention: plain (standard ONNX ops)") == 2
    assert "    tensorrt  yes" in plain.stdout and "    trt       no   no TensorRT engine" in plain.stdout


def test_describe_windows() -> None:
    assert describe_windows([None, None]) == "full attention on every layer"
    assert describe_windows([4096, 4096, None, 4096, 4096, 4096, None, 512]) == (
        "window 4096 on layers 0-1, 3-5; window 512 on layers 7; full attention on layers 2, 6")


@pytest.mark.skipif("attention_windows" not in {f.name for f in dataclasses.fields(Architecture)},
                    reason="the manifest does not carry architecture.attention_windows yet")
def test_info_shows_sliding_windows_and_features(tiny_bundle: Path, tmp_path: Path) -> None:
    bundle = shutil.copytree(tiny_bundle, tmp_path / "b")
    manifest = json.loads((bundle / "manifest.json").read_text())
    for entry in manifest["models"].values():
        entry["architecture"]["attention_windows"] = [8, None]
        entry["architecture"]["features"] = ["qk_norm", "logit_softcap"]
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    res = run("info", "--bundle", str(bundle))
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("sliding windows: window 8 on layers 0; full attention on layers 1") == 2
    assert res.stdout.count("features: qk_norm, logit_softcap") == 2
