"""Multi-step lookahead drafting (stepwise.lookahead > 1) on the trained built-in pair: the issue's scenarios."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from specreason_models.task import heldout_split, n_steps
from specreason_rt.bundle import Bundle
from specreason_rt.config import ReasonConfig, make_config
from specreason_rt.errors import ConfigError
from specreason_rt.reasoner import Reasoner
from specreason_rt.strategies import STRATEGY_FUNCTIONS, Run
from specreason_rt.strategies.lookahead import LookaheadPolicy, accepted_prefix

from .test_strategies import _assert_cache_is_fresh

QUESTIONS = ["76-24*4", "37+45*3", "12+98-40", "55*7-13", "90-91+9", "21+34*3-50+7", "88*2-19*4+61-3"]


@pytest.fixture(scope="module")
def reasoner(builtin_bundle: Path) -> Reasoner:
    return Reasoner(builtin_bundle)


def cfg(strategy: str, seed: int = 0, **overrides: object) -> ReasonConfig:
    return make_config(strategy=strategy, **{"seed": seed, **overrides})


def test_accepted_prefix_is_the_leading_run_of_passing_steps() -> None:
    assert accepted_prefix(np.array([8.0, 7.5, 3.0, 9.0]), threshold=7.0) == 2
    assert accepted_prefix(np.array([8.0, 7.0]), threshold=7.0) == 2
    assert accepted_prefix(np.array([1.0, 9.0]), threshold=7.0) == 0
    assert accepted_prefix(np.array([np.nan, 9.0]), threshold=0.0) == 0  # NaN (nothing to score) never passes


def test_lookahead_policy_drafts_what_the_acceptance_rate_says_will_survive() -> None:
    fixed = LookaheadPolicy(most=4, adaptive=False)
    fixed.observe(drafted=4, accepted=0)
    assert fixed.size() == 4  # not adaptive: always the configured lookahead
    policy = LookaheadPolicy(most=6, adaptive=True)
    assert policy.size() == 3  # the prior 0.75: 0.75**2 >= 1/2 > 0.75**3
    assert policy.draft_ahead(8)  # overlap: the first round drafts ahead (nothing is known yet)
    for _ in range(10):
        policy.observe(drafted=policy.size(), accepted=policy.size())
    assert policy.size() == 6 and policy.rate > 0.9  # everything passes: up to the most
    assert policy.draft_ahead(6) == (policy.rate**6 >= 0.5)  # then size()'s rule: ahead of a likely pass
    for _ in range(3):
        policy.observe(drafted=policy.size(), accepted=0)
    assert policy.size() == 1 and policy.rate < 0.5  # three rejections in a row: one step at a time
    assert not policy.draft_ahead(1)  # overlap would not draft ahead of even one step
    before = policy.rate
    policy.observe(drafted=5, accepted=2)  # two passes, then one rejection; steps after it are no evidence
    expected = before
    for x in (1.0, 1.0, 0.0):
        expected += LookaheadPolicy.DECAY * (x - expected)
    assert policy.rate == pytest.approx(expected)


@pytest.mark.parametrize(("lookahead", "reuse", "overlap", "adaptive"),
                         [(2, True, False, False), (4, True, False, False), (4, False, False, False),
                          (1, True, True, False), (3, True, True, False), (6, True, False, True),
                          (6, True, True, True)])
def test_threshold_above_scale_is_the_verifier_alone(reasoner: Reasoner, lookahead: int, reuse: bool,
                                                     overlap: bool, adaptive: bool) -> None:
    for seed, q in enumerate(QUESTIONS):
        alone = reasoner.run(q, cfg("verifier", seed))
        run = reasoner.run(q, cfg("stepwise", seed, **{"stepwise.threshold": 10, "stepwise.lookahead": lookahead,
                                                       "stepwise.reuse_draft_prefix": reuse,
                                                       "stepwise.overlap": overlap,
                                                       "stepwise.adaptive_lookahead": adaptive}))
        assert [s.author for s in run.steps] == ["verifier"] * len(run.steps)
        assert run.text == alone.text and run.answer == alone.answer
        assert run.drafts.accepted == 0 and run.drafts.rejected == run.drafts.drafted > 0
        assert run.acceptance == 0.0
        if adaptive and not overlap:  # every round rejects its first step: 3 steps (the prior), 2, then 1 per round
            assert run.drafts.drafted <= run.drafts.rounds + 3


@pytest.mark.parametrize(("lookahead", "overlap"), [(2, False), (4, False), (1, True), (3, True)])
def test_threshold_zero_is_the_speculator_alone(reasoner: Reasoner, lookahead: int, overlap: bool) -> None:
    for seed, q in enumerate(QUESTIONS):
        alone = reasoner.run(q, cfg("speculator", seed))
        run = reasoner.run(q, cfg("stepwise", seed, **{"stepwise.threshold": 0, "stepwise.lookahead": lookahead,
                                                       "stepwise.overlap": overlap}))
        assert [s.author for s in run.steps] == ["speculator"] * len(run.steps)
        assert run.text == alone.text
        assert run.tokens["verifier"] == 0 and run.drafts.wasted_tokens == 0
        # Several steps per verifier pass: ceil(steps / lookahead) rounds.
        assert run.drafts.rounds == -(-len(run.steps) // lookahead)


@pytest.mark.parametrize("overlap", [False, True])
def test_adaptive_lookahead_at_threshold_zero_is_the_speculator_alone(reasoner: Reasoner, overlap: bool) -> None:
    for seed, q in enumerate(QUESTIONS):
        alone = reasoner.run(q, cfg("speculator", seed))
        run = reasoner.run(q, cfg("stepwise", seed, **{"stepwise.threshold": 0, "stepwise.lookahead": 6,
                                                       "stepwise.adaptive_lookahead": True,
                                                       "stepwise.overlap": overlap}))
        assert run.text == alone.text and run.tokens["verifier"] == 0
        # Everything passes, so the rounds grow: 2 steps, then 3, 4, ... (fewer rounds than 2 steps each).
        assert run.drafts.rounds <= -(-len(run.steps) // 2)


def test_greedy_drafts_give_the_same_run_with_any_lookahead(reasoner: Reasoner) -> None:
    """A greedy speculator drafts the same steps whatever the lookahead, and a causal verifier scores step i the
    same with or without the steps after it: the accepted/rejected steps and the text must not change."""
    for seed, q in enumerate(QUESTIONS):
        base = {"speculator.temperature": 0.0, "stepwise.threshold": 7.0}
        one = reasoner.run(q, cfg("stepwise", seed, **{**base, "stepwise.lookahead": 1}))
        for lookahead, adaptive in ((2, False), (3, False), (5, False), (6, True)):
            many = reasoner.run(q, cfg("stepwise", seed, **{**base, "stepwise.lookahead": lookahead,
                                                            "stepwise.adaptive_lookahead": adaptive}))
            assert many.text == one.text
            assert [s.author for s in many.steps] == [s.author for s in one.steps]
            assert many.drafts.accepted == one.drafts.accepted
            assert many.drafts.verify_passes <= one.drafts.verify_passes


@pytest.mark.parametrize("overlap", [False, True])
def test_rejected_lookahead_steps_leave_no_trace_in_either_cache(builtin_bundle: Path, overlap: bool) -> None:
    bundle = Bundle(builtin_bundle)
    mid_chain = 0  # rounds that accepted some steps and rejected a later one
    long_chains = [p.question for p in heldout_split(n=60) if n_steps(p) >= 8][:8]
    for seed, q in enumerate(long_chains):
        # Long chains and a hot speculator (the v2 one errs on ~1% of its steps at 0.7): chains fail mid-way.
        run = Run(bundle=bundle, problem=q, config=cfg("stepwise", seed, **{"stepwise.threshold": 7.0,
                                                                            "stepwise.lookahead": 3,
                                                                            "speculator.temperature": 2.0,
                                                                            "stepwise.overlap": overlap}))
        result = STRATEGY_FUNCTIONS["stepwise"](run)
        spec, ver = (ctx for _, ctx in run.contexts)
        assert spec.branches == ver.branches == 1
        for ctx in (spec, ver):  # both hold the prompt plus exactly the committed steps, and nothing dropped
            assert ctx.tokenizer.decode(ctx.generated(0)) == result.text
            _assert_cache_is_fresh(ctx)
        authors = [s.author for s in result.steps]
        mid_chain += any(a == "speculator" and b == "verifier" for a, b in zip(authors, authors[1:], strict=False))
        d = result.drafts
        assert d.drafted == d.accepted + d.rejected and d.rounds == d.verify_passes
        assert d.accepted == authors.count("speculator")
    assert mid_chain > 0


@pytest.mark.parametrize(("lookahead", "overlap", "adaptive"),
                         [(1, False, False), (4, False, False), (1, True, False), (4, True, False), (6, False, True),
                          (6, True, True)])
def test_a_seed_reproduces_a_lookahead_run(reasoner: Reasoner, lookahead: int, overlap: bool,
                                           adaptive: bool) -> None:
    over = {"stepwise.lookahead": lookahead, "stepwise.overlap": overlap, "stepwise.adaptive_lookahead": adaptive}
    a = reasoner.run("21+34*3-50+7", cfg("stepwise", 7, **over)).to_json()
    b = reasoner.run("21+34*3-50+7", cfg("stepwise", 7, **over)).to_json()
    for r in (a, b):
        r.pop("seconds"), r.pop("timings")
    assert a == b


def test_lookahead_config_errors_say_what_to_change() -> None:
    with pytest.raises(ConfigError, match=r"lookahead must be an integer in \[1, 1024\]"):
        make_config(**{"stepwise.lookahead": 0})
    fixed = {"stepwise.adaptive_lookahead": False}
    with pytest.raises(ConfigError, match="set candidates to 1"):
        make_config(**{"stepwise.lookahead": 2, "stepwise.candidates": 2, **fixed})
    with pytest.raises(ConfigError, match="score.mode 'likelihood' or 'head'"):
        make_config(**{"stepwise.lookahead": 2, "score.mode": "judge", **fixed})
    # The default (adaptive, up to 8 steps) takes one step per pass where steps are scored one at a time.
    assert make_config(**{"stepwise.candidates": 2}).stepwise.steps_per_pass(score_mode="likelihood") == 1
    assert make_config(**{"score.mode": "judge"}).stepwise.steps_per_pass(score_mode="judge") == 1
    assert make_config().stepwise.steps_per_pass(score_mode="likelihood") == 8
    # Overlap is a timing choice (the output is the same): where it cannot apply, the models take turns.
    assert make_config().stepwise.pipelines(score_mode="likelihood")
    assert not make_config(**{"score.mode": "judge"}).stepwise.pipelines(score_mode="judge")
    assert not make_config(**{"stepwise.candidates": 2}).stepwise.pipelines(score_mode="likelihood")
    assert not make_config(**{"stepwise.overlap": False}).stepwise.pipelines(score_mode="likelihood")
    with pytest.raises(ConfigError, match="overlap must be true or false"):
        make_config(**{"stepwise.overlap": "yes"})



# Adaptive rounds reach their most (3) while the rate is >= 0.79; only then is a chain likely to pass whole
# and the next one drafted ahead (LookaheadPolicy.draft_ahead).
@pytest.mark.parametrize(("lookahead", "adaptive"), [(1, False), (3, False), (3, True)])
def test_overlap_writes_what_the_sequential_loop_writes(builtin_bundle: Path, lookahead: int,
                                                        adaptive: bool) -> None:
    """A chain drafted ahead and then dropped gives its RNG draws back, and is as long as the sequential loop's
    next chain would be: pipelining changes when work runs, not the output, for sampled drafts too."""
    piped, turns = Reasoner(builtin_bundle), Reasoner(builtin_bundle)
    piped.bundle.own_cores = lambda: True  # type: ignore[method-assign]  # pipeline even on a one-core machine
    dropped = 0  # runs where a chain drafted ahead was dropped (its draws given back)
    long_chains = [p.question for p in heldout_split(n=60) if n_steps(p) >= 8][:6]
    for seed, q in enumerate(long_chains):
        over = {"stepwise.threshold": 7.0, "stepwise.lookahead": lookahead, "stepwise.adaptive_lookahead": adaptive,
                "speculator.temperature": 2.0}  # hot drafts: chains fail mid-way, and every draw matters
        a = piped.run(q, cfg("stepwise", seed, **over, **{"stepwise.overlap": True}))
        b = turns.run(q, cfg("stepwise", seed, **over, **{"stepwise.overlap": False}))
        assert a.text == b.text
        assert [(s.author, s.text) for s in a.steps] == [(s.author, s.text) for s in b.steps]
        assert a.drafts.accepted == b.drafts.accepted and a.drafts.verify_passes == b.drafts.verify_passes
        dropped += a.drafts.drafted > b.drafts.drafted
    assert dropped > 0


def test_overlap_needs_a_core_per_model_and_never_leaves_the_serving_batch(builtin_bundle: Path) -> None:
    from specreason_rt.backends.base import usable_cores
    from specreason_rt.strategies.batched import batch_key

    one = Bundle(builtin_bundle, intra_op_threads=1)
    assert [m.engine.cpu_threads for m in one.models.values()] == [1, 1]
    assert one.own_cores() == (usable_cores() >= 2)
    every = Bundle(builtin_bundle, intra_op_threads=usable_cores())  # each model would take every core
    assert not every.own_cores()
    # The default overlaps, and still batches: a lane writes what its run alone writes.
    assert make_config().stepwise.overlap and batch_key(make_config()) is not None
