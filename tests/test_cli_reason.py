"""`specreason run` and `specreason eval` on the built-in pair, and one clear line for bad input."""

from __future__ import annotations

import itertools
import json
import re
import subprocess
from pathlib import Path

import pytest

from specreason_models.task import write_heldout_jsonl
from specreason_rt.answers import extract_answer, final_answer, normalize, reference_answer
from specreason_rt.evaluate import figure, label_box

from .test_cli import EXE, run


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


def test_eval_lookahead_sweep_accounting_and_by_length(builtin_bundle: Path, tmp_path: Path) -> None:
    problems = tmp_path / "p.jsonl"
    rows = [("76-24*4", "08", 2), ("37+45*3", "46", 2), ("12+98-40", "70", 2), ("21+34*3", "65", 2),
            ("55*7-13+20", "92", 3), ("90-91+9*2", "16", 3)]
    problems.write_text("".join(json.dumps({"question": q, "answer": a, "steps": n}) + "\n" for q, a, n in rows))
    args = ["eval", "--bundle", str(builtin_bundle), "--problems", str(problems), "--strategy", "verifier",
            "stepwise", "--lookaheads", "1", "3", "--overlap", "both", "--adaptive", "both", "--threads", "1"]
    figure = tmp_path / "by-length.png"
    table = run(*args, "--plot-by-length", str(figure))
    assert table.returncode == 0, table.stderr
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for name in ("stepwise(lookahead=1,sequential)", "stepwise(lookahead=1,overlap)",
                 "stepwise(lookahead=3,fixed,sequential)", "stepwise(lookahead=3,fixed,overlap)",
                 "stepwise(lookahead=3,adaptive,sequential)", "stepwise(lookahead=3,adaptive,overlap)"):
        assert name in table.stdout
    assert "lookahead=1,adaptive" not in table.stdout  # nothing to adapt with one step per pass
    assert "by length: accuracy / speedup vs verifier" in table.stdout and "wasted" in table.stdout
    report = json.loads(run(*args, "--json").stdout)
    assert sorted(report["by_length"]) == ["2", "3"]
    assert [report["by_length"][n]["verifier"]["problems"] for n in ("2", "3")] == [4, 2]
    one = report["strategies"]["stepwise(lookahead=1,sequential)"]["per_problem"]
    three = report["strategies"]["stepwise(lookahead=3,fixed,sequential)"]["per_problem"]
    # per-problem means are rounded to 4 places: compare to that precision
    assert one["drafted"] == pytest.approx(one["accepted"] + one["rejected"], abs=1e-3) and one["drafted"] > 0
    assert three["verify_passes"] < three["drafted"]  # several steps scored per verifier pass
    assert one["verify_passes"] == one["drafted"]
    assert set(one["phase_seconds"]) == {"prefill", "speculate", "verify", "fallback", "select"}
    verifier = report["strategies"]["verifier"]["per_problem"]
    assert verifier["drafted"] == 0 and verifier["verifier_forwards"] > 0
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "1+1", "answer": "2", "steps": "two"}) + "\n")
    res = run("eval", "--bundle", str(builtin_bundle), "--problems", str(bad))
    assert res.returncode != 0 and "must be an integer >= 0" in res.stderr and "Traceback" not in res.stderr


def test_eval_stop_after_rows(builtin_bundle: Path, problems: Path) -> None:
    res = run("eval", "--bundle", str(builtin_bundle), "--problems", str(problems), "--limit", "2", "--strategy",
              "speculator", "best_of_n", "--stop-after", "0", "1", "--overlap", "both", "--baseline", "speculator",
              "--json")
    assert res.returncode == 0, res.stderr
    rows = json.loads(res.stdout)["strategies"]
    assert set(rows) == {"speculator", "best_of_n(sequential)", "best_of_n(overlap)",
                         "best_of_n(stop_after=1,sequential)", "best_of_n(stop_after=1,overlap)"}
    one = rows["best_of_n(stop_after=1,overlap)"]["config"]["search"]
    assert one["stop_after"] == 1 and one["overlap"] is True
    assert rows["best_of_n(sequential)"]["config"]["search"] == {**one, "stop_after": 0, "overlap": False}


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
        (["eval", "--bundle", b, "--problems", str(missing_field)], "no answer field: each line needs one of 'answer'"),
        (["eval", "--bundle", b, "--problems", str(problems), "--fields", "question"], "--fields expects"),
        (["eval", "--bundle", b, "--problems", str(problems), "--baseline", "beam"], "--baseline 'beam' is not one"),
        (["eval", "--bundle", b, "--problems", str(problems), "--records", str(tmp_path)], "is a directory"),
        # issue 11 finding 11: a string for a number, a path that cannot take the trace (checked before the run)
        (["run", "--bundle", b, "--set", "speculator.temperature=abc", "1+1"],
         "--set speculator.temperature: expects a number (default 0.7), got 'abc'"),
        (["run", "--bundle", b, "--set", "verifier.top_p=[1]", "1+1"], "--set verifier.top_p: expects a number"),
        (["run", "--bundle", b, "--set", "stepwise.candidates=two", "1+1"], "expects an integer (default 1)"),
        (["run", "--bundle", b, "--set", "limits.stop_on_answer=maybe", "1+1"], "expects true or false"),
        (["run", "--bundle", b, "--trace", str(tmp_path), "1+1"], f"--trace: {tmp_path} is a directory"),
        (["run", "--bundle", b, "--trace", str(tmp_path / "no" / "t.json"), "1+1"], "folder of"),
        (["eval", "--bundle", b, "--problems", str(problems), "--strategy", "beam"], "unknown strategy 'beam'"),
        (["eval", "--bundle", b, "--problems", str(problems), "--limit", "0"], "--limit must be >= 1"),
        (["eval", "--bundle", b, "--problems", str(problems), "--plot", str(tmp_path / "no" / "f.png")],
         "does not exist"),
    ]
    for args, message in cases:
        res = run(*args)
        assert res.returncode == 1, (args, res.stdout, res.stderr)
        assert res.stderr.count("\n") == 1 and message in res.stderr, (args, res.stderr)


def test_run_prints_the_solution_an_answer_line_and_a_plain_summary(builtin_bundle: Path) -> None:
    """The built-in task is left-to-right arithmetic mod 100: 37+45=82, 82*3=246 -> 46."""
    b = str(builtin_bundle)
    res = run("run", "--bundle", b, "37+45*3")
    assert res.returncode == 0, res.stderr
    assert res.stdout == "37+45=82\n\n82*3=46\n\nAnswer: 46\nanswer: 46\n"
    assert re.fullmatch(r"stepwise: 3 steps: 3 drafted by the speculator and accepted; \d+\.\d ms\n", res.stderr)
    # No draft can score above 9: every step is rejected and written by the verifier; the first one undrafted.
    res = run("run", "--bundle", b, "--threshold", "9.5", "--set", "stepwise.first_n_steps_verifier=1", "37+45*3")
    assert re.fullmatch(r"stepwise: 3 steps: 2 drafted, rejected and rewritten by the verifier, 1 written by the "
                        r"verifier without a draft; \d+\.\d ms\n", res.stderr), res.stderr
    res = run("run", "--bundle", b, "--strategy", "best_of_n", "--preset", "efficient", "37+45*3")
    assert "best_of_n: 3 steps: the best of 2 speculator trajectories, scored by the verifier;" in res.stderr
    res = run("run", "--bundle", b, "--strategy", "best_of_n", "--set", "search.stop_after=1", "37+45*3")
    assert "the one speculator trajectory (the first 1 of 4 to finish), scored" in res.stderr, res.stderr
    res = run("run", "--bundle", b, "--max-tokens", "5", "37+45*3")
    assert "; stopped at the token budget (limits.max_tokens); " in res.stderr


def test_run_answer_falls_back_or_says_what_it_expects(builtin_bundle: Path) -> None:
    b = str(builtin_bundle)
    res = run("run", "--bundle", b, "--answer-format", "boxed", "37+45*3")
    assert res.stdout.splitlines()[-1] == ("answer: 46 (read from its 'Answer:' line: the solution has no "
                                           "\\boxed{X})"), res.stdout
    data = json.loads(run("run", "--bundle", b, "--answer-format", "boxed", "--json", "37+45*3").stdout)
    assert data["answer"] is None and (data["final_answer"], data["final_answer_source"]) == ("46", "answer_line")
    # A cut-off solution's last number is not its answer.
    res = run("run", "--bundle", b, "--max-tokens", "5", "37+45*3")
    assert res.stdout.splitlines()[-1] == ("answer: (none): stopped at the token budget (limits.max_tokens) before "
                                           "the solution wrote its 'Answer: X' line")


def test_final_answer_fallbacks_for_chat_models() -> None:
    cases = {
        "2 + 3 = 5. The answer is 5.": ("5", "answer phrase"),
        "So the final answer is **42**.\n\nLet me know if you need more help!": ("42", "answer phrase"),
        "The answer is: $12$": ("12", "answer phrase"),
        "**Final Answer:** 9": ("9", "answer_line"),
        "We get $x = \\boxed{7}$.": ("7", "boxed"),
        "First 1,200 apples, then we add 34 more: 1,234 apples!\nHope this helps.": ("1234", "last number"),
        "I cannot tell.": (None, None),
    }
    for text, expected in cases.items():
        assert final_answer(text, fmt="answer_line") == expected, text
    assert final_answer("2+3 is 5", cut_off=True) == (None, None)
    assert extract_answer("Answer: **", fmt="answer_line") is None and normalize("**$07$**.") == "7"
    assert reference_answer("Natalia sold 48 clips... 48+24 = 72\n#### 72") == "72"
    assert reference_answer("so the sum is $\\boxed{\\frac{1}{2}}$.") == "\\frac{1}{2}"
    assert reference_answer("46") == "46"


def test_eval_reads_common_field_names_and_names_its_baseline(builtin_bundle: Path, tmp_path: Path) -> None:
    gsm = tmp_path / "gsm.jsonl"  # problem/solution with GSM8K's '#### answer'
    gsm.write_text('{"problem": "37+45*3", "solution": "37+45=82, 82*3=46\\n#### 46"}\n'
                   '{"problem": "12+98-40", "solution": "#### 70"}\n')
    custom = tmp_path / "custom.jsonl"
    custom.write_text('{"key": "a", "query": "37+45*3", "gold": "46"}\n')
    args = ["eval", "--bundle", str(builtin_bundle), "--strategy", "speculator", "verifier", "--threads", "1"]
    res = run(*args, "--problems", str(gsm))
    assert res.returncode == 0, res.stderr
    main, accounting = res.stdout.split("\n\n")[:2]  # the strategies table, then the per-problem accounting
    head, _, *rows, note = main.splitlines()
    assert head.split()[8:10] == ["vs", "verifier"] and len(rows) == 2
    assert accounting.splitlines()[0].split()[:3] == ["per", "problem", "drafted"]
    assert note == ("vs verifier: speedup = mean latency of verifier / mean latency of the row "
                    "(above 1: faster than verifier)")
    assert rows[1].split()[:2] == ["verifier", "1.000"] and rows[1].split()[5] == "1.00x"
    report = json.loads(run(*args, "--problems", str(custom), "--fields", "question=query,answer=gold,id=key",
                            "--baseline", "speculator", "--json").stdout)
    assert report["speedup_baseline"] == "speculator" and report["strategies"]["speculator"]["speedup"] == 1.0
    assert report["strategies"]["verifier"]["accuracy"] == 1.0
    assert {"accuracy_lenient", "answered"} <= set(report["strategies"]["verifier"])


def test_plot_labels_never_overlap() -> None:
    """A threshold sweep puts several strategies on one point; their labels must stay apart and in the axes."""
    names = ["verifier", "speculator", *(f"stepwise(threshold={t})" for t in (3, 5, 7, 9)), "best_of_n"]
    latency = [0.050, 0.020, 0.030, 0.0303, 0.0306, 0.045, 0.060]
    accuracy = [1.0, 0.5, 5 / 6, 5 / 6, 5 / 6, 1.0, 1.0]
    report = {"problems": 6, "strategies": {n: {"latency_mean_s": t, "accuracy": a}
                                            for n, t, a in zip(names, latency, accuracy, strict=True)}}
    fig, labels = figure(report)
    renderer = fig.canvas.get_renderer()
    boxes = [label_box(label, renderer) for label in labels]
    assert [label.get_text() for label in labels] == names
    assert not [(a, b) for a, b in itertools.combinations(range(len(boxes)), 2) if boxes[a].overlaps(boxes[b])]
    frame = fig.axes[0].get_window_extent(renderer)
    assert all(frame.x0 <= box.x0 and box.x1 <= frame.x1 and box.y1 <= frame.y1 for box in boxes)


def test_text_fields_take_the_text_and_input_must_be_unicode(builtin_bundle: Path, tmp_path: Path) -> None:
    """A judge prompt of digits stays a prompt (issue 11 finding 11); undecodable bytes are one line, not a
    tokenizer traceback; stdin's trailing newline is not part of the question."""
    b = str(builtin_bundle)
    res = run("run", "--bundle", b, "--score-mode", "judge", "--set", "score.judge_prompt=5", "--json", "37+45*3")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["config"]["score"]["judge_prompt"] == "5"
    assert run("run", "--bundle", b, "-", stdin="37+45*3\n").stdout.endswith("answer: 46\n")
    res = subprocess.run([EXE, "run", "--bundle", b, b"37+\xff"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 1 and res.stderr == ("specreason: error: the problem is not valid UTF-8 text: byte 0xff "
                                                  "at character 3\n")
    res = subprocess.run([EXE, "generate", "--bundle", b, "-"], input=b"37+\xff", capture_output=True, timeout=120)
    assert res.returncode == 1
    assert res.stderr == b"specreason: error: the prompt on stdin is not UTF-8: byte 0xff at offset 3\n"
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes(b'{"question": "1+1\xff", "answer": "2"}\n')
    res = run("eval", "--bundle", b, "--problems", str(latin1))
    assert res.returncode == 1 and "latin1.jsonl is not UTF-8 text (byte 0xff at offset 17)" in res.stderr
