"""The thread-safe embedding API: a bundle loaded once per worker, called from many threads or from asyncio.

    pool = ReasonerPool("specreason-bundle", workers=2, queue_size=64)
    result = pool.run("37+45*3", make_config(strategy="stepwise"))              # any thread, blocking
    result = await pool.arun("37+45*3", config, timeout=30)                    # asyncio
    async for item in pool.astream("37+45*3", config): ...                     # StepTrace items, then RunResult
    job = pool.submit("37+45*3", config); job.cancel(); pool.close()

Thread-safety: every public method may be called from any thread at any time. A `Reasoner` is not
thread-safe (its engines' IO bindings and KV buffers belong to one run), so the pool owns `workers`
Reasoners, each driven by one worker thread; a job is one run of one problem. ONNX Runtime releases the GIL
while it runs, so workers overlap their forwards.

Bounds: at most `queue_size` jobs wait; `submit` past that raises `Overloaded` at once (no unbounded memory).
Per job: a config (strategy, preset, seed, limits), an optional on_step callback (called from the worker
thread as each step is committed), a timeout, and cancellation (`Job.cancel`: a waiting job is dropped, a
running one stops at its next forward). `close(grace=s)` refuses new jobs, lets running and queued ones finish
for up to s seconds, then cancels the rest; their futures fail with Cancelled.

Cross-request batching (max_batch > 1): each worker runs up to max_batch stepwise jobs (one draft per step,
same scoring and sampling settings) as lanes of one StepwiseBatch (strategies/batched.py): every engine
forward serves all of them, jobs join between steps and leave when done, and each job's output is the same
as a run alone. Other jobs run alone on the worker, between the batch's steps.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from .cancel import Cancelled, CancelToken
from .config import ReasonConfig
from .errors import ConfigError, SpecReasonError
from .providers import ProviderConfig, ProviderSpec
from .reasoner import Reasoner
from .strategies.batched import StepwiseBatch, batch_key
from .strategies.common import Run
from .trace import RunResult, StepTrace


class Overloaded(SpecReasonError):
    """The queue is full: retry later (a server answers 429 with Retry-After)."""


class PoolClosed(SpecReasonError):
    """The pool is shutting down or closed (a server answers 503)."""


class Job:
    """One submitted run: a future of its RunResult, its cancel token and timing facts."""

    def __init__(self, *, problem: str, config: ReasonConfig, on_step: Callable[[StepTrace], None] | None,
                 timeout: float | None) -> None:
        self.problem, self.config, self.on_step = problem, config, on_step
        self.token = CancelToken(timeout=timeout)
        self.future: Future[RunResult] = Future()
        self.submitted = time.perf_counter()
        self.started: float | None = None
        self.prompt_tokens = 0  # the verifier's prompt length (what a server reports as usage.prompt_tokens)
        self.steps: asyncio.Queue[StepTrace] | None = None  # committed steps, for submit_stream / iterate

    def cancel(self, reason: str = "cancelled by the caller") -> None:
        self.token.cancel(reason)

    def result(self, timeout: float | None = None) -> RunResult:
        return self.future.result(timeout)

    @property
    def queue_seconds(self) -> float:
        return (self.started or time.perf_counter()) - self.submitted


class ReasonerPool:
    def __init__(self, bundle: str | Path, *, workers: int = 1, queue_size: int = 64,
                 providers: Sequence[ProviderSpec] | ProviderConfig | None = None, intra_op_threads: int = 0,
                 kv_limit_bytes: int | None = None, max_batch: int = 1) -> None:
        if not isinstance(workers, int) or workers < 1:
            raise ConfigError(f"workers must be an integer >= 1, got {workers!r}")
        if not isinstance(queue_size, int) or queue_size < 1:
            raise ConfigError(f"queue_size must be an integer >= 1, got {queue_size!r}")
        if not isinstance(max_batch, int) or max_batch < 1:
            raise ConfigError(f"max_batch must be an integer >= 1 (1 = no cross-request batching), got {max_batch!r}")
        self.max_batch = max_batch
        # One Reasoner (its own engines and KV buffers) per worker: loading is done once, here.
        self.reasoners = [Reasoner(bundle, providers=providers, intra_op_threads=intra_op_threads,
                                   kv_limit_bytes=kv_limit_bytes) for _ in range(workers)]
        self.queue_size = queue_size
        self._queue: queue.Queue[Job | None] = queue.Queue(maxsize=queue_size)
        self._lock = threading.Lock()
        self._closed = False
        self._running: set[Job] = set()
        work = self._work if max_batch == 1 else self._work_batched
        self._threads = [threading.Thread(target=work, args=(r,), name=f"specreason-worker-{i}", daemon=True)
                         for i, r in enumerate(self.reasoners)]
        for t in self._threads:
            t.start()

    # -- state ---------------------------------------------------------------------------------------------------
    @property
    def workers(self) -> int:
        return len(self.reasoners)

    @property
    def queue_depth(self) -> int:
        """Jobs waiting for a worker."""
        return self._queue.qsize()

    @property
    def running(self) -> int:
        with self._lock:
            return len(self._running)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def bundle(self):  # noqa: ANN201 - the first worker's Bundle (manifest, tokenizers) for read-only use
        return self.reasoners[0].bundle

    # -- submitting ----------------------------------------------------------------------------------------------
    def submit(self, problem: str, config: ReasonConfig | None = None, *,
               on_step: Callable[[StepTrace], None] | None = None, timeout: float | None = None) -> Job:
        """Queue one run; raises Overloaded when the queue is full, PoolClosed after close()."""
        if not isinstance(problem, str) or not problem.strip():
            raise ConfigError("the problem is empty: pass the question text")
        if timeout is not None and not timeout > 0:
            raise ConfigError(f"timeout must be > 0 seconds, got {timeout!r}")
        job = Job(problem=problem, config=config or ReasonConfig(), on_step=on_step, timeout=timeout)
        with self._lock:  # so that close() cannot slip between the check and the put
            if self._closed:
                raise PoolClosed("the reasoner pool is shutting down: retry on another instance")
            try:
                self._queue.put_nowait(job)
            except queue.Full:
                raise Overloaded(f"all {self.queue_size} queue places are taken: retry later") from None
        return job

    def run(self, problem: str, config: ReasonConfig | None = None, *,
            on_step: Callable[[StepTrace], None] | None = None, timeout: float | None = None) -> RunResult:
        """Submit and wait (from any thread)."""
        return self.submit(problem, config, on_step=on_step, timeout=timeout).result()

    async def arun(self, problem: str, config: ReasonConfig | None = None, *,
                   on_step: Callable[[StepTrace], None] | None = None, timeout: float | None = None) -> RunResult:
        """Submit and await; if the awaiting task is cancelled, so is the run."""
        job = self.submit(problem, config, on_step=on_step, timeout=timeout)
        try:
            return await asyncio.wrap_future(job.future)
        except asyncio.CancelledError:
            job.cancel("the awaiting task was cancelled")
            raise

    async def astream(self, problem: str, config: ReasonConfig | None = None, *,
                      timeout: float | None = None) -> AsyncIterator[StepTrace | RunResult]:
        """Yield each StepTrace as it is committed, then the RunResult. Closing the iterator cancels the run."""
        job = self.submit_stream(problem, config, timeout=timeout)
        async for item in self.iterate(job):
            yield item

    def submit_stream(self, problem: str, config: ReasonConfig | None = None, *,
                      timeout: float | None = None) -> Job:
        """Submit a run whose steps `iterate(job)` yields on the running event loop (call from that loop)."""
        loop = asyncio.get_running_loop()
        steps: asyncio.Queue[StepTrace] = asyncio.Queue()  # unbounded, but a run has at most max_tokens steps

        def on_step(step: StepTrace) -> None:  # runs in the worker thread: hand the step to the loop
            loop.call_soon_threadsafe(steps.put_nowait, step)

        job = self.submit(problem, config, on_step=on_step, timeout=timeout)
        job.steps = steps
        return job

    async def iterate(self, job: Job) -> AsyncIterator[StepTrace | RunResult]:
        steps = job.steps
        if steps is None:
            raise ConfigError("iterate() needs a job from submit_stream()")
        done = asyncio.wrap_future(job.future)
        sent = 0
        try:
            while True:
                getter: asyncio.Future[StepTrace] = asyncio.ensure_future(steps.get())
                waiting: list[asyncio.Future[Any]] = [getter, done]
                await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    sent += 1
                    yield getter.result()
                    continue
                getter.cancel()
                while not steps.empty():  # steps committed before the result was set
                    sent += 1
                    yield steps.get_nowait()
                result = done.result()  # raises the run's error
                # Strategies that commit only at the end (best_of_n, tree) call no on_step: send their steps now.
                for step in result.steps[sent:]:
                    yield step
                yield result
                return
        finally:
            if not job.future.done():
                job.cancel("the stream was closed")

    # -- workers and shutdown ------------------------------------------------------------------------------------
    def _work(self, reasoner: Reasoner) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            if self._start(job, reasoner):
                self._run_alone(reasoner, job)

    def _start(self, job: Job, reasoner: Reasoner) -> bool:
        """Mark a dequeued job running; False if it was cancelled while it waited (its future says so)."""
        if not job.future.set_running_or_notify_cancel():
            return False
        job.started = time.perf_counter()
        with self._lock:
            self._running.add(job)
        tok = reasoner.bundle.tokenizers["verifier"]
        job.prompt_tokens = len(tok.encode_prompt(job.problem))
        return True

    def _finish(self, job: Job, outcome: RunResult | BaseException) -> None:
        if job.future.done():  # already reported (a batch that failed after this lane finished)
            return
        if isinstance(outcome, BaseException):
            job.future.set_exception(outcome)
        else:
            job.future.set_result(outcome)
        with self._lock:
            self._running.discard(job)

    def _work_batched(self, reasoner: Reasoner) -> None:
        """A worker that runs batchable jobs as lanes of one StepwiseBatch, one step of all of them at a time."""
        batch = StepwiseBatch(bundle=reasoner.bundle)
        held: Job | None = None  # a batchable job that must wait for the batch to drain (different settings)
        stopping = False
        while True:
            joining: list[tuple[Run, Any]] = []
            # Take new jobs between steps; block only when there is nothing else to do.
            while not stopping and held is None and len(batch) + len(joining) < self.max_batch:
                try:
                    job = self._queue.get(block=not batch and not joining)
                except queue.Empty:
                    break
                if job is None:
                    stopping = True
                    break
                if not self._start(job, reasoner):
                    continue
                if batch_key(job.config) is None:
                    self._run_alone(reasoner, job)  # other strategies run between the batch's steps
                    continue
                if not (batch.accepts(job.config) and (not joining or batch_key(joining[0][0].config)
                                                       == batch_key(job.config))):
                    held = job
                    break
                try:
                    run = Run(bundle=reasoner.bundle, problem=job.problem, config=job.config, on_step=job.on_step,
                              cancel=job.token)
                except BaseException as e:  # noqa: BLE001 - a bad request fails alone
                    self._finish(job, e)
                    continue
                joining.append((run, lambda outcome, job=job: self._finish(job, outcome)))
            if held is not None and not batch and not joining:
                job, held = held, None
                try:
                    joining.append((Run(bundle=reasoner.bundle, problem=job.problem, config=job.config,
                                        on_step=job.on_step, cancel=job.token),
                                    lambda outcome, job=job: self._finish(job, outcome)))
                except BaseException as e:  # noqa: BLE001
                    self._finish(job, e)
            try:
                batch.admit(joining)
                if len(batch):
                    batch.tick()
            except BaseException as e:  # noqa: BLE001 - an engine failure fails the batch's jobs, the worker lives
                for lane in batch.lanes:
                    lane.done(e)
                for _, done in joining:
                    if not any(lane.done is done for lane in batch.lanes):
                        done(e)
                batch = StepwiseBatch(bundle=reasoner.bundle)
            if stopping and not batch and held is None:
                return

    def _run_alone(self, reasoner: Reasoner, job: Job) -> None:
        try:
            job.token.check()  # cancelled or timed out while it waited
            result = reasoner.run(job.problem, job.config, on_step=job.on_step, cancel=job.token)
        except BaseException as e:  # noqa: BLE001 - every error goes to the caller, the worker lives on
            self._finish(job, e)
        else:
            self._finish(job, result)

    def close(self, *, grace: float = 30.0) -> None:
        """Refuse new jobs; let running and queued jobs finish for up to `grace` seconds, then cancel the rest."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        deadline = time.monotonic() + grace
        while (self.queue_depth or self.running) and time.monotonic() < deadline:
            time.sleep(0.01)
        # Cancel what is left: waiting jobs fail without running, running ones stop at their next forward.
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None and job.future.set_running_or_notify_cancel():
                job.future.set_exception(Cancelled("the server shut down before the run started"))
        with self._lock:
            for job in self._running:
                job.cancel("the server is shutting down")
        for _ in self._threads:
            self._queue.put(None)  # one stop sentinel per worker (the queue is empty now, so this cannot block)
        for t in self._threads:
            t.join(timeout=max(deadline - time.monotonic(), 0) + 10)
