"""The reasoning strategies on the trained built-in pair: the issue's named scenarios, deterministic by seed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from specreason_rt.bundle import Bundle
from specreason_rt.config import ReasonConfig, make_config
from specreason_rt.context import Context
from specreason_rt.errors import ConfigError
from specreason_rt.reasoner import Reasoner
from specreason_rt.strategies import STRATEGY_FUNCTIONS, Run

QUESTIONS = ["76-24*4", "37+45*3", "12+98-40", "55*7-13", "90-91+9"]


@pytest.fixture(scope="module")
def reasoner(builtin_bundle: Path) -> Reasoner:
    return Reasoner(builtin_bundle)


def cfg(strategy: str, seed: int = 0, **overrides: object) -> ReasonConfig:
    return make_config(strategy=strategy, **{"seed": seed, **overrides})


@pytest.mark.parametrize("reuse", [True, False])
def test_threshold_above_scale_is_the_verifier_alone(reasoner: Reasoner, reuse: bool) -> None:
    for seed, q in enumerate(QUESTIONS):
        alone = reasoner.run(q, cfg("verifier", seed))
        spec = reasoner.run(q, cfg("stepwise", seed, **{"stepwise.threshold": 10,
                                                        "stepwise.reuse_draft_prefix": reuse}))
        assert [s.author for s in spec.steps] == ["verifier"] * len(spec.steps)
        assert all(s.candidates and not any(c.accepted for c in s.candidates) for s in spec.steps)
        assert spec.text == alone.text and spec.answer == alone.answer
        assert spec.acceptance == 0.0


def test_draft_prefix_reuse_saves_verifier_tokens(reasoner: Reasoner) -> None:
    runs = [reasoner.run(q, cfg("stepwise", s, **{"stepwise.threshold": 10})) for s, q in enumerate(QUESTIONS)]
    reused = sum(step.reused_tokens for r in runs for step in r.steps)
    written = sum(r.tokens["verifier"] for r in runs)
    assert reused > 0  # the speculator's drafts are mostly right, so the verifier keeps part of them
    assert written + reused == sum(step.tokens for r in runs for step in r.steps)


def test_threshold_zero_is_the_speculator_alone(reasoner: Reasoner) -> None:
    for seed, q in enumerate(QUESTIONS):
        alone = reasoner.run(q, cfg("speculator", seed))
        spec = reasoner.run(q, cfg("stepwise", seed, **{"stepwise.threshold": 0}))
        assert [s.author for s in spec.steps] == ["speculator"] * len(spec.steps)
        assert spec.text == alone.text
        assert spec.tokens["verifier"] == 0


def test_first_steps_by_the_verifier(reasoner: Reasoner) -> None:
    result = reasoner.run("37+45*3", cfg("stepwise", 0, **{"stepwise.threshold": 0,
                                                          "stepwise.first_n_steps_verifier": 1}))
    assert result.steps[0].author == "verifier" and not result.steps[0].candidates
    assert all(s.author == "speculator" for s in result.steps[1:])


def test_best_of_n_with_one_spec_is_the_single_trajectory(reasoner: Reasoner) -> None:
    for seed, q in enumerate(QUESTIONS):
        alone = reasoner.run(q, cfg("speculator", seed))
        best = reasoner.run(q, cfg("best_of_n", seed, **{"search.n_specs": 1}))
        assert best.text == alone.text and len(best.candidates) == 1 and best.candidates[0].accepted


def test_best_of_n_scores_every_trajectory_and_picks_the_best(reasoner: Reasoner) -> None:
    result = reasoner.run("55*7-13", cfg("best_of_n", 3, **{"search.n_specs": 6}))
    assert len(result.candidates) == 6
    combined = [c.combined for c in result.candidates]
    assert result.candidates[int(np.argmax(combined))].accepted
    assert result.text == next(c.text for c in result.candidates if c.accepted)
    assert all(c.score is not None and 0 <= c.score <= 9 for c in result.candidates)


def test_tree_prunes_to_beam_width(reasoner: Reasoner) -> None:
    width = 3
    result = reasoner.run("12+98-40", cfg("tree", 1, **{"search.beam_width": width, "search.tree_depth": 2}))
    levels = result.details["levels"]
    assert levels[0]["expanded"] == width  # the root forks into width children
    for before, level in zip(levels, levels[1:], strict=False):
        assert level["expanded"] == before["kept"] * width
    assert all(level["kept"] <= width for level in levels)
    assert result.answer is not None and any(c.accepted for c in result.candidates)


def test_majority_vote_picks_the_most_common_answer(reasoner: Reasoner) -> None:
    result = reasoner.run("55*7-13", cfg("majority", 2, **{"search.n_specs": 7}))
    answers = [c.answer for c in result.candidates]
    counts = {a: answers.count(a) for a in answers if a is not None}
    assert result.answer == max(counts, key=lambda a: counts[a]) or counts[result.answer] == max(counts.values())


@pytest.mark.parametrize("strategy", ["stepwise", "best_of_n", "tree", "majority", "speculator"])
def test_a_seed_reproduces_a_run(reasoner: Reasoner, strategy: str) -> None:
    a = reasoner.run("90-91+9", cfg(strategy, 7)).to_json()
    b = reasoner.run("90-91+9", cfg(strategy, 7)).to_json()
    for r in (a, b):
        r.pop("seconds"), r.pop("timings")
    assert a == b


def _assert_cache_is_fresh(ctx: Context) -> None:
    """The branch's cache holds exactly what a fresh prefill of its cached tokens would."""
    n = len(ctx.tokens[0]) - len(ctx.pending[0])
    fresh = Context(model=ctx.model, tokenizer=ctx.tokenizer, prompt=ctx.tokens[0][:n], room=1)
    assert int(ctx.cache.lengths[0]) == n
    for mine, ref in zip(ctx.cache.keys + ctx.cache.values, fresh.cache.keys + fresh.cache.values, strict=True):
        np.testing.assert_allclose(mine[0, :, :n], ref[0, :, :n], atol=1e-4)


def test_rejected_drafts_leave_no_trace_in_either_cache(builtin_bundle: Path) -> None:
    bundle = Bundle(builtin_bundle)
    # A high threshold: some drafts accepted, some rejected (with and without a reused prefix).
    authors = []
    for seed, q in enumerate(QUESTIONS):
        run = Run(bundle=bundle, problem=q, config=cfg("stepwise", seed, **{"stepwise.threshold": 8.95,
                                                                            "stepwise.candidates": 2}))
        result = STRATEGY_FUNCTIONS["stepwise"](run)
        authors += [s.author for s in result.steps]
        spec, ver = (ctx for _, ctx in run.contexts)
        assert spec.branches == ver.branches == 1
        # Both contexts hold the prompt plus exactly the committed steps.
        committed = [t for s in result.steps for t in bundle.tokenizers["verifier"].encode(
            s.text, add_special_tokens=False)]
        for ctx in (spec, ver):
            assert ctx.tokenizer.decode(ctx.generated(0)) == result.text
            _assert_cache_is_fresh(ctx)
        assert len(ver.generated(0)) >= len(committed) - 1  # eos is generated but not text
    assert "speculator" in authors and "verifier" in authors


def test_config_validation_errors_say_what_to_change() -> None:
    with pytest.raises(ConfigError, match=r"n_specs must be an integer in \[1, 1024\]"):
        make_config(**{"search.n_specs": 0})
    with pytest.raises(ConfigError, match="threshold must be a number >= 0"):
        make_config(**{"stepwise.threshold": -1})
    with pytest.raises(ConfigError, match="temperature must be a finite number >= 0"):
        make_config(**{"speculator.temperature": -0.5})
    with pytest.raises(ConfigError, match="unknown strategy 'beam'"):
        make_config(strategy="beam")
    with pytest.raises(ConfigError, match="unknown preset 'fast'"):
        make_config(preset="fast")
    with pytest.raises(ConfigError, match=r"unknown field\(s\) \['thresh'\] in stepwise"):
        make_config(**{"stepwise.thresh": 5})
    with pytest.raises(ConfigError, match="unknown score mode"):
        make_config(**{"score.mode": "vibes"})


def test_presets_are_the_seeds() -> None:
    for preset, (n, depth, temp) in {"default": (4, 8, 0.7), "efficient": (2, 6, 0.8),
                                     "quality": (8, 12, 0.6)}.items():
        c = make_config(preset=preset)
        assert (c.search.n_specs, c.search.max_depth, c.speculator.temperature) == (n, depth, temp)
    assert make_config().score.verify_weight == 0.3


def test_judge_mode_reads_digit_logits(reasoner: Reasoner) -> None:
    # The built-in verifier is no judge, but the mechanics must hold: scores on the 0-9 scale, the judge
    # prompt gone from the cache afterwards, and greedy scores being whole digits.
    for method in ("greedy", "average"):
        result = reasoner.run("37+45*3", cfg("stepwise", 0, **{"score.mode": "judge", "score.method": method,
                                                                "score.judge_prompt": "\n\nQ: 1+2\n"}))
        scores = [c.score for s in result.steps for c in s.candidates]
        assert scores and all(0 <= x <= 9 for x in scores)
        if method == "greedy":
            assert all(float(x).is_integer() for x in scores)


def test_empty_problem_is_refused(reasoner: Reasoner) -> None:
    with pytest.raises(ConfigError, match="the problem is empty"):
        reasoner.run("  ")


@pytest.fixture(scope="module")
def mixed_bundle(tmp_path_factory: pytest.TempPathFactory, word_tokenizer_llama_dir: Path) -> Path:
    """The built-in speculator with a verifier whose (word-level) tokenizer is different."""
    from specreason_export.bundle import ExportOptions, write_bundle

    out = tmp_path_factory.mktemp("mixed") / "bundle"
    write_bundle(ExportOptions(speculator="speculator", verifier=str(word_tokenizer_llama_dir), out=out,
                               show_progress=False))
    return out


@pytest.mark.parametrize("threshold", [0, 10])
def test_different_tokenizers_hand_text_across(mixed_bundle: Path, threshold: int) -> None:
    bundle = Bundle(mixed_bundle)
    assert not bundle.manifest.tokenizers_shared
    config = cfg("stepwise", 0, **{"stepwise.threshold": threshold, "limits.max_step_tokens": 6,
                                   "limits.max_tokens": 24, "limits.stop_on_repeat": False})
    run = Run(bundle=bundle, problem="37+45*3", config=config)
    result = STRATEGY_FUNCTIONS["stepwise"](run)
    author = "speculator" if threshold == 0 else "verifier"
    assert result.steps and all(s.author == author for s in result.steps)
    spec, ver = (ctx for _, ctx in run.contexts)
    # The model that did not write a step holds that step's text in its own tokenizer.
    reader = ver if author == "speculator" else spec
    expected = [t for s in result.steps for t in reader.tokenizer.encode(s.text, add_special_tokens=False)]
    written = spec if author == "speculator" else ver
    assert reader.generated(0) == expected
    ends = np.cumsum([s.tokens for s in result.steps])
    pieces = np.split(np.array(written.generated(0)), ends[:-1])
    assert [written.tokenizer.decode(p.tolist()) for p in pieces] == [s.text for s in result.steps]


def test_head_mode_scores_are_the_value_head_at_the_step_end(builtin_bundle: Path) -> None:
    bundle = Bundle(builtin_bundle)
    verifier = bundle.models["verifier"]
    assert verifier.has_value_head
    run = Run(bundle=bundle, problem="37+45*3", config=cfg("stepwise", 0, **{"score.mode": "head",
                                                                            "stepwise.threshold": 0}))
    result = STRATEGY_FUNCTIONS["stepwise"](run)
    tok = bundle.tokenizers["verifier"]
    prompt = run.prompts["verifier"]
    first = tok.encode(result.steps[0].text, add_special_tokens=False)
    cache = verifier.new_cache(branches=1, capacity=64)
    _, values = verifier.forward(cache=cache, tokens=[prompt + first], values=True)
    assert result.steps[0].candidates[0].score == pytest.approx(9 * float(values[0]), abs=1e-3)


@pytest.mark.smollm2
def test_judge_mode_on_a_chat_model(smollm2_bundle: Path) -> None:
    """SmolLM2 judges each drafted step with the paper's prompt; the judge prompt never stays in the cache."""
    bundle = Bundle(smollm2_bundle)
    config = cfg("stepwise", 0, **{"score.mode": "judge", "score.method": "average", "stepwise.threshold": 5,
                                   "speculator.temperature": 0, "limits.max_tokens": 24,
                                   "limits.max_step_tokens": 12})
    run = Run(bundle=bundle, problem="What is 12 + 30? Think step by step.", config=config)
    result = STRATEGY_FUNCTIONS["stepwise"](run)
    scores = [c.score for s in result.steps for c in s.candidates]
    assert scores and all(0 <= x <= 9 for x in scores)
    spec, ver = (ctx for _, ctx in run.contexts)
    for ctx in (spec, ver):
        assert ctx.tokenizer.decode(ctx.generated(0)) == result.text
    _assert_cache_is_fresh(ver)


@pytest.mark.parametrize("threshold", [0.0, 7.0, 10.0])
def test_token_deltas_add_up_to_each_step_alone_and_batched(reasoner: Reasoner, threshold: float) -> None:
    """on_token: the verifier's text as it writes a step, before that step's on_step; same in StepwiseBatch."""
    from specreason_rt.strategies.batched import StepwiseBatch
    from specreason_rt.trace import StepTrace, TokenDelta

    config = cfg("stepwise", seed=3, **{"stepwise.threshold": threshold})
    for batched in (False, True):
        events: list[StepTrace | TokenDelta] = []
        if batched:
            batch, out = StepwiseBatch(bundle=reasoner.bundle), []
            batch.admit([(Run(bundle=reasoner.bundle, problem="94-26-59", config=config, on_step=events.append,
                              on_token=events.append), out.append)])
            while len(batch):
                batch.tick()
            result = out[0]
        else:
            result = reasoner.run("94-26-59", config, on_step=events.append, on_token=events.append)
        streamed: dict[int, str] = {}
        for e in events:
            if isinstance(e, TokenDelta):
                assert e.author == "verifier"
                streamed[e.step] = streamed.get(e.step, "") + e.text
            else:
                assert e.text.startswith(streamed.get(e.index, ""))
        verifier_steps = [s for s in result.steps if s.author == "verifier"]
        assert all(s.index in streamed for s in verifier_steps if s.text)
        assert not any(s.index in streamed for s in result.steps if s.author == "speculator")
        if threshold == 10.0:
            assert max(len(s.text) for s in verifier_steps) > 1 and streamed


@pytest.mark.parametrize("role", ["verifier", "speculator"])
def test_one_model_alone_streams_tokens_and_steps_as_it_writes(reasoner: Reasoner, role: str) -> None:
    """The single-model baselines stream too: each step's tokens, then that step, in order, adding up to the text."""
    from specreason_rt.trace import StepTrace, TokenDelta

    events: list[StepTrace | TokenDelta] = []
    result = reasoner.run("94-26-59*3", cfg(role, seed=1), on_step=events.append, on_token=events.append)
    steps = [e for e in events if isinstance(e, StepTrace)]
    assert [(s.index, s.text, s.author) for s in steps] == [(s.index, s.text, s.author) for s in result.steps]
    assert len(steps) >= 2  # several steps: the stream is not one chunk at the end
    streamed, text = "", ""
    for e in events:
        if isinstance(e, TokenDelta):
            assert e.author == role
            streamed += e.text
        else:
            text += e.text
            assert streamed == text  # a step is announced once all its tokens went out, never before
    assert streamed == result.text


def test_a_chat_and_raw_text_prompt(reasoner: Reasoner) -> None:
    from specreason_rt.prompt import Prompt

    one = reasoner.run("12+34", cfg("stepwise"))
    assert reasoner.run(Prompt.chat([{"role": "user", "content": "12+34"}]), cfg("stepwise")).text == one.text
    with pytest.raises(ConfigError, match="last message must be a non-empty user message"):
        Prompt.chat([{"role": "user", "content": "12+34"}, {"role": "assistant", "content": "46"}])
    with pytest.raises(ConfigError, match="not valid Unicode"):
        Prompt.text("1+\ud800")
    assert reasoner.run(Prompt.text("12+34=46\n\n"), cfg("verifier")).text is not None


def test_best_of_n_decodes_no_longer_than_its_longest_trajectory(reasoner: Reasoner) -> None:
    """The trajectories never wait for each other at step ends: one speculator forward per token of the
    longest (the prefill included), where stepping in lockstep ran each step as long as its longest branch's."""
    for seed, q in enumerate(QUESTIONS):
        result = reasoner.run(q, cfg("best_of_n", seed, **{"speculator.temperature": 1.5}))
        assert result.forwards["speculator"] == max(c.tokens for c in result.candidates)


def test_best_of_n_stop_after_keeps_the_first_trajectories_to_finish(reasoner: Reasoner) -> None:
    """search.stop_after = m: the batch stops when m trajectories have finished; they are the m shortest of
    the run that waits for all (same seed, same draws up to that point), and the winner is one of them."""
    n, m = 6, 2
    for seed, q in enumerate(QUESTIONS):
        over = {"speculator.temperature": 1.5, "search.n_specs": n}
        full = reasoner.run(q, cfg("best_of_n", seed, **over))
        short = reasoner.run(q, cfg("best_of_n", seed, **over, **{"search.stop_after": m}))
        assert len(short.candidates) == m and (short.details["sampled"], short.details["stopped"]) == (n, n - m)
        assert sorted(c.tokens for c in short.candidates) == sorted(c.tokens for c in full.candidates)[:m]
        assert {c.text for c in short.candidates} <= {c.text for c in full.candidates}
        assert short.forwards["speculator"] == max(c.tokens for c in short.candidates)
        assert short.text == next(c.text for c in short.candidates if c.accepted)
        # the stopped trajectories' partial steps count as speculator tokens: they were generated
        assert short.tokens["speculator"] > sum(c.tokens for c in short.candidates)
    all_of_them = reasoner.run(QUESTIONS[0], cfg("best_of_n", 0, **{"search.stop_after": 4}))
    assert len(all_of_them.candidates) == 4 and all_of_them.details["stopped"] == 0


def test_best_of_n_stop_after_past_n_specs_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"stop_after must be an integer in \[0, n_specs=4\]"):
        cfg("best_of_n", 0, **{"search.stop_after": 5})


@pytest.mark.parametrize("mode", ["likelihood", "head", "judge"])
@pytest.mark.parametrize("stop_after", [0, 2])
def test_best_of_n_overlap_reads_the_same_scores(reasoner: Reasoner, mode: str, stop_after: int,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """search.overlap: the verifier reads each step in a second thread as the speculator writes it; the
    trajectories, their scores and the winner are those of reading them all after sampling."""
    from specreason_rt.backends.base import usable_cores
    from specreason_rt.strategies import search

    if usable_cores() < 2 or not reasoner.bundle.own_cores():
        pytest.skip("overlap needs a CPU core per model")
    # The built-in speculator is below the size where overlap pays, so it runs sequentially by default.
    assert not reasoner.run(QUESTIONS[0], cfg("best_of_n")).details["overlap"]
    monkeypatch.setattr(search, "SMALL_MODEL_PARAMETERS", 0)
    for seed, q in enumerate(QUESTIONS[:3]):
        over = {"speculator.temperature": 1.5, "score.mode": mode, "search.stop_after": stop_after}
        runs = [reasoner.run(q, cfg("best_of_n", seed, **over, **{"search.overlap": o})) for o in (False, True)]
        assert [r.details["overlap"] for r in runs] == [False, True]
        turns, overlapped = runs
        assert [c.text for c in overlapped.candidates] == [c.text for c in turns.candidates]
        assert [c.score for c in overlapped.candidates] == pytest.approx([c.score for c in turns.candidates],
                                                                         abs=2e-3)
        assert overlapped.text == turns.text
