"""Cross-request batching: stepwise runs of different requests share every engine forward, and each request's
output is the same as its run alone."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from specreason_models.task import heldout_split
from specreason_rt.cancel import Cancelled
from specreason_rt.config import ReasonConfig, make_config
from specreason_rt.pool import ReasonerPool
from specreason_rt.reasoner import Reasoner
from specreason_rt.strategies.batched import StepwiseBatch, batch_key
from specreason_rt.strategies.common import Run
from specreason_rt.trace import RunResult

PROBLEMS = [p.question for p in heldout_split(n=24)]


def config(i: int, temperature: float = 0.7) -> ReasonConfig:
    # Per-lane settings that may differ inside one batch: seed, threshold, token budget, first verifier steps,
    # lookahead (steps drafted per verifier pass), fixed or adaptive.
    return make_config(strategy="stepwise", seed=i, **{
        "speculator.temperature": temperature, "stepwise.threshold": [5, 7, 8.9, 10][i % 4],
        "limits.max_tokens": [512, 20][i % 5 == 4], "stepwise.first_n_steps_verifier": int(i % 6 == 5),
        "stepwise.lookahead": [1, 3, 1, 2, 4, 1, 6][i % 7], "stepwise.adaptive_lookahead": i % 7 in (3, 6),
        "stepwise.overlap": i % 2 == 0})


@pytest.fixture(scope="module")
def alone(builtin_bundle: Path) -> dict[int, RunResult]:
    # Models in turn, as a lane runs them: a run alone that overlaps writes the same (test_lookahead.py) but
    # also counts the speculator tokens of the chains it drafted ahead and dropped.
    r = Reasoner(builtin_bundle)
    return {i: r.run(q, config(i).replace(**{"stepwise.overlap": False})) for i, q in enumerate(PROBLEMS)}


def test_lanes_joining_and_leaving_give_each_run_alone(builtin_bundle: Path, alone: dict[int, RunResult]) -> None:
    bundle = Reasoner(builtin_bundle).bundle
    batch, results, pending, ticks = StepwiseBatch(bundle=bundle), {}, list(range(len(PROBLEMS))), 0
    while pending or len(batch):
        joining = []
        while pending and len(batch) + len(joining) < 6:  # continuous: a lane joins as soon as one leaves
            i = pending.pop(0)
            joining.append((Run(bundle=bundle, problem=PROBLEMS[i], config=config(i)),
                            lambda outcome, i=i: results.__setitem__(i, outcome)))
        batch.admit(joining)
        batch.tick()
        ticks += 1
    for i, result in results.items():
        assert isinstance(result, RunResult)
        assert result.text == alone[i].text, i
        assert [s.author for s in result.steps] == [s.author for s in alone[i].steps]
        assert [s.reused_tokens for s in result.steps] == [s.reused_tokens for s in alone[i].steps]
        assert result.tokens == alone[i].tokens
        assert result.drafts == alone[i].drafts
    # The sharing is real: far fewer batched ticks (each a handful of forwards for all lanes) than steps.
    assert ticks < sum(len(r.steps) for r in alone.values()) / 3


def test_batch_key_separates_what_cannot_share_a_forward() -> None:
    assert batch_key(config(0)) == batch_key(config(1))  # seeds, thresholds, limits may differ
    assert batch_key(config(0)) != batch_key(config(0, temperature=0.0))  # one sampler per batch
    assert batch_key(make_config(strategy="best_of_n")) is None
    assert batch_key(make_config(strategy="stepwise", **{"stepwise.candidates": 2})) is None


def test_batched_pool_reproduces_runs_alone_with_mixed_jobs(builtin_bundle: Path,
                                                            alone: dict[int, RunResult]) -> None:
    reference_bon = Reasoner(builtin_bundle).run(PROBLEMS[0], make_config(strategy="best_of_n", seed=3))
    greedy = {i: Reasoner(builtin_bundle).run(PROBLEMS[i], config(i, temperature=0.0)) for i in (1, 2)}
    pool = ReasonerPool(builtin_bundle, workers=1, queue_size=64, max_batch=8)
    try:
        jobs = [(i, config(i)) for i in range(len(PROBLEMS))]
        jobs += [(i, config(i, temperature=0.0)) for i in (1, 2)]  # another batch key: held until the batch drains
        with ThreadPoolExecutor(12) as ex:
            futures = [ex.submit(pool.run, PROBLEMS[i], c) for i, c in jobs]
            bon = ex.submit(pool.run, PROBLEMS[0], make_config(strategy="best_of_n", seed=3))  # runs alone
            results = [f.result(timeout=120) for f in futures]
        for (i, c), result in zip(jobs, results, strict=True):
            expected = greedy[i] if c.speculator.temperature == 0 else alone[i]
            assert result.text == expected.text
        assert bon.result().text == reference_bon.text
    finally:
        pool.close()


def test_cancelling_one_lane_leaves_the_others_running(builtin_bundle: Path, alone: dict[int, RunResult]) -> None:
    pool = ReasonerPool(builtin_bundle, workers=1, queue_size=64, max_batch=8)
    try:
        jobs = [pool.submit(PROBLEMS[i], config(i)) for i in range(6)]
        jobs[2].cancel("the client went away")
        for i, job in enumerate(jobs):
            if i == 2:
                with pytest.raises(Cancelled):
                    job.result(timeout=60)
            else:
                assert job.result(timeout=60).text == alone[i].text
    finally:
        pool.close()


def test_a_lane_streams_its_accepted_steps_before_the_step_the_verifier_writes(builtin_bundle: Path) -> None:
    """The default config drafts several steps per pass; when a later one is rejected, the accepted ones must
    reach the client before the verifier's tokens of the rewritten step (a server builds the text in order)."""
    bundle = Reasoner(builtin_bundle).bundle
    problems = ["52-29+93+11+16*2", "40-82-19+94+99*9", "10*7+54*6-42+10-40"]  # the speculator errs mid-chain
    events: dict[int, list[tuple[int, str]]] = {i: [] for i in range(len(problems))}
    results: dict[int, RunResult | BaseException] = {}
    batch = StepwiseBatch(bundle=bundle)
    batch.admit([(Run(bundle=bundle, problem=q, config=make_config(seed=0),
                      on_step=lambda s, i=i: events[i].append((s.index, "")),
                      on_token=lambda d, i=i: events[i].append((d.step, d.text))),
                  lambda outcome, i=i: results.__setitem__(i, outcome)) for i, q in enumerate(problems)])
    while len(batch):
        batch.tick()
    for i, result in results.items():
        assert isinstance(result, RunResult)
        authors = [s.author for s in result.steps]
        assert "verifier" in authors[1:] and authors[0] == "speculator"  # accepted steps, then a rewritten one
        indices = [k for k, _ in events[i]]
        assert indices == sorted(indices), events[i]
        # What a server streams: the token deltas of a step, else the whole step at its end.
        streamed = {k: "".join(t for j, t in events[i] if j == k) for k in set(indices)}
        assert "".join(streamed[k] or result.steps[k].text for k in sorted(streamed)) == result.text
