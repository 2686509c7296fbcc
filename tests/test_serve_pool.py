"""ReasonerPool: the thread-safe embedding API (threads, asyncio, streaming, cancellation, bounds, shutdown)."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from specreason_rt.cancel import Cancelled, RunTimeout
from specreason_rt.config import make_config
from specreason_rt.pool import Overloaded, PoolClosed, ReasonerPool
from specreason_rt.reasoner import Reasoner
from specreason_rt.trace import RunResult, StepTrace

PROBLEMS = ["37+45*3", "76-24*4", "94-26-59", "12+34", "88-19+7", "5*6-11"]


@pytest.fixture(scope="module")
def reference(builtin_bundle: Path) -> dict[tuple[str, int], RunResult]:
    """Each problem run alone, in-process, with seeds 0 and 1: what every concurrent run must reproduce."""
    r = Reasoner(builtin_bundle)
    return {(p, s): r.run(p, make_config(strategy="stepwise", seed=s)) for p in PROBLEMS for s in (0, 1)}


def test_many_threads_reproduce_runs_alone(builtin_bundle: Path, reference: dict) -> None:
    pool = ReasonerPool(builtin_bundle, workers=2, queue_size=64)
    try:
        keys = list(reference) * 3
        with ThreadPoolExecutor(8) as ex:
            results = list(ex.map(lambda k: pool.run(k[0], make_config(strategy="stepwise", seed=k[1])), keys))
        for key, result in zip(keys, results, strict=True):
            assert result.text == reference[key].text
            assert [s.author for s in result.steps] == [s.author for s in reference[key].steps]
    finally:
        pool.close()


def test_asyncio_run_and_stream(builtin_bundle: Path, reference: dict) -> None:
    pool = ReasonerPool(builtin_bundle, workers=2)

    async def main() -> tuple[list[RunResult], list[StepTrace], RunResult]:
        results = await asyncio.gather(*(pool.arun(p, make_config(seed=0)) for p in PROBLEMS))
        items = [item async for item in pool.astream(PROBLEMS[0], make_config(seed=0))]
        steps = [i for i in items if isinstance(i, StepTrace)]
        assert isinstance(items[-1], RunResult)
        return list(results), steps, items[-1]

    try:
        results, steps, last = asyncio.run(main())
    finally:
        pool.close()
    assert [r.text for r in results] == [reference[(p, 0)].text for p in PROBLEMS]
    assert "".join(s.text for s in steps) == last.text == reference[(PROBLEMS[0], 0)].text
    assert [s.index for s in steps] == list(range(len(last.steps)))


def test_stream_of_a_strategy_that_commits_at_the_end(builtin_bundle: Path) -> None:
    """best_of_n calls no on_step: the stream still yields its steps (from the result) before the result."""
    pool = ReasonerPool(builtin_bundle, workers=1)

    async def main() -> list:
        return [i async for i in pool.astream(PROBLEMS[1], make_config(strategy="best_of_n", seed=3))]

    try:
        items = asyncio.run(main())
    finally:
        pool.close()
    result = items[-1]
    assert isinstance(result, RunResult) and result.steps
    assert items[:-1] == result.steps


def test_cancel_a_running_job_stops_it_and_the_worker_lives_on(builtin_bundle: Path) -> None:
    pool = ReasonerPool(builtin_bundle, workers=1)
    try:
        holder: dict = {}
        seen: list[StepTrace] = []

        def on_step(step: StepTrace) -> None:
            seen.append(step)
            holder["job"].cancel("test")  # the next forward raises

        holder["job"] = job = pool.submit(PROBLEMS[0], make_config(strategy="stepwise", seed=0), on_step=on_step)
        with pytest.raises(Cancelled, match="test"):
            job.result(timeout=60)
        assert len(seen) == 1
        assert pool.run(PROBLEMS[0], make_config(seed=0)).text  # the same worker serves the next job
    finally:
        pool.close()


def test_timeout_and_cancel_before_start(builtin_bundle: Path) -> None:
    pool = ReasonerPool(builtin_bundle, workers=1)
    gate = threading.Event()
    try:
        # Hold the only worker inside a run, so the next job waits in the queue.
        first = pool.submit(PROBLEMS[0], make_config(seed=0), on_step=lambda s: gate.wait(30))
        waiting = pool.submit(PROBLEMS[1], make_config(seed=0))
        expired = pool.submit(PROBLEMS[2], make_config(seed=0), timeout=1e-6)
        waiting.cancel()
        gate.set()
        assert first.result(timeout=60).text
        with pytest.raises(Cancelled):
            waiting.result(timeout=60)
        with pytest.raises(RunTimeout):
            expired.result(timeout=60)
    finally:
        gate.set()
        pool.close()


def test_full_queue_is_refused_not_grown(builtin_bundle: Path) -> None:
    pool = ReasonerPool(builtin_bundle, workers=1, queue_size=2)
    gate = threading.Event()
    try:
        started = threading.Event()

        def hold(step: StepTrace) -> None:
            started.set()
            gate.wait(30)

        running = pool.submit(PROBLEMS[0], make_config(seed=0), on_step=hold)
        assert started.wait(30)
        queued = [pool.submit(p, make_config(seed=0)) for p in PROBLEMS[1:3]]
        with pytest.raises(Overloaded, match="2 queue places"):
            pool.submit(PROBLEMS[3], make_config(seed=0))
        assert pool.queue_depth == 2
        gate.set()
        for job in [running, *queued]:
            assert job.result(timeout=60).text
    finally:
        gate.set()
        pool.close()


def test_close_finishes_queued_work_then_refuses(builtin_bundle: Path) -> None:
    pool = ReasonerPool(builtin_bundle, workers=1)
    jobs = [pool.submit(p, make_config(seed=0)) for p in PROBLEMS]
    pool.close(grace=60)
    assert all(j.result(timeout=1).text for j in jobs)
    with pytest.raises(PoolClosed):
        pool.submit(PROBLEMS[0])


def test_close_past_its_grace_cancels_cleanly(builtin_bundle: Path) -> None:
    pool = ReasonerPool(builtin_bundle, workers=1)
    gate = threading.Event()
    try:
        running = pool.submit(PROBLEMS[0], make_config(seed=0), on_step=lambda s: gate.wait(0.5))
        queued = pool.submit(PROBLEMS[1], make_config(seed=0))
        pool.close(grace=0.05)
    finally:
        gate.set()
    with pytest.raises(Cancelled, match="shut down"):
        queued.result(timeout=30)
    with pytest.raises(Cancelled, match="shutting down"):
        running.result(timeout=30)
