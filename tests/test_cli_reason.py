"""`specreason run` and `specreason eval` on the built-in pair, and one clear line for bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from specreason_models.task import write_heldout_jsonl

from .test_cli import run


@pytest.fixture(scope="module")
def problems(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_heldout_jsonl(path=tmp_path_factory.mktemp("problems") / "heldout.jsonl", n=6)


def test_run_prints_the_answer_and_writes_the_trace(builtin_bundle: Path, tmp_path: Path) -> None:
    trace = tmp_path / "trace.json"
    res = run("run", "--bundle", str(builtin_bundle), "--trace", str(trace), "37+45*3")
    assert res.returncode == 0, res.stderr
    assert "answer: 46" in res.stdout
    assert "stepwise" in res.stderr and "by the speculator" in res.stderr
    data = json.loads(trace.read_text())
    assert data["answer"] == "46" and data["strategy"] == "stepwise"
    for step in data["steps"]:
        assert step["author"] in ("speculator", "verifier") and step["candidates"]
    assert set(data["timings"]) == {"prefill", "speculate", "verify", "fallback", "select"}


def test_run_json_for_each_strategy(builtin_bundle: Path) -> None:
    for strategy in ("best_of_n", "tree", "majority", "verifier"):
        res = run("run", "--bundle", str(builtin_bundle), "--strategy", strategy, "--preset", "efficient",
                  "--json", "12+98-40")
        assert res.returncode == 0, res.stderr
        data = json.loads(res.stdout)
        assert data["strategy"] == strategy and data["config"]["search"]["n_specs"] == 2


def test_eval_table_json_plot_and_records(builtin_bundle: Path, problems: Path, tmp_path: Path) -> None:
    plot, records = tmp_path / "fig.png", tmp_path / "runs.jsonl"
    args = ["eval", "--bundle", str(builtin_bundle), "--problems", str(problems), "--strategy", "verifier",
            "stepwise", "--thresholds", "3", "9", "--threads", "1"]
    table = run(*args, "--plot", str(plot), "--records", str(records))
    assert table.returncode == 0, table.stderr
    for name in ("verifier", "stepwise(threshold=3)", "stepwise(threshold=9)"):
        assert name in table.stdout
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = [json.loads(line) for line in records.read_text().splitlines()]
    assert len(lines) == 3 * 6 and {line["name"] for line in lines} == {"verifier", "stepwise(threshold=3)",
                                                                            "stepwise(threshold=9)"}
    report = json.loads(run(*args, "--json").stdout)
    verifier = report["strategies"]["verifier"]
    assert report["problems"] == 6 and verifier["accuracy"] >= 5 / 6
    assert verifier["acceptance_rate"] is None and verifier["speculator_step_share"] == 0
    assert report["strategies"]["stepwise(threshold=3)"]["acceptance_rate"] > 0
    assert {"latency_mean_s", "latency_p50_s", "latency_p95_s", "solution_tokens_per_problem"} <= set(verifier)


def test_bad_inputs_give_one_line(builtin_bundle: Path, problems: Path, tmp_path: Path) -> None:
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"id": 1, "question": "1+1", "answer": "2"}\n{"id": 2, "question": "3+4"\n')
    missing_field = tmp_path / "missing.jsonl"
    missing_field.write_text('{"id": 1, "question": "1+1"}\n')
    b = str(builtin_bundle)
    cases = [
        (["run", "--bundle", b, "--threshold", "-1", "1+1"], "threshold must be a number >= 0"),
        (["run", "--bundle", b, "--set", "stepwise.threshold", "1+1"], "--set expects SECTION.FIELD=VALUE"),
        (["run", "--bundle", b, "--set", "search.n_spec=2", "1+1"], "unknown field(s) ['n_spec'] in search"),
        (["run", "--bundle", b, "--n-specs", "0", "--strategy", "best_of_n", "1+1"], "n_specs must be"),
        (["run", "--bundle", b, "--score-mode", "head", "--set", "score.mode=vibes", "1+1"], "unknown score mode"),
        (["run", "--bundle", b, " "], "the problem is empty"),
        (["eval", "--bundle", b, "--problems", str(tmp_path / "nope.jsonl")], "does not exist"),
        (["eval", "--bundle", b, "--problems", str(bad_json)], "bad.jsonl:2: not valid JSON"),
        (["eval", "--bundle", b, "--problems", str(missing_field)], 'needs "question" and "answer"'),
        (["eval", "--bundle", b, "--problems", str(problems), "--strategy", "beam"], "unknown strategy 'beam'"),
        (["eval", "--bundle", b, "--problems", str(problems), "--limit", "0"], "--limit must be >= 1"),
        (["eval", "--bundle", b, "--problems", str(problems), "--plot", str(tmp_path / "no" / "f.png")],
         "does not exist"),
    ]
    for args, message in cases:
        res = run(*args)
        assert res.returncode == 1, (args, res.stdout, res.stderr)
        assert res.stderr.count("\n") == 1 and message in res.stderr, (args, res.stderr)
