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
Per job: a problem (a string, or a Prompt: a chat or raw text), a config (strategy, preset, seed, limits),
optional on_step / on_token callbacks (called from the worker thread as each step is committed / as the
verifier writes), a timeout, and cancellation (`Job.cancel`: a waiting job is dropped, a
running one stops at its next forward). `close(grace=s)` refuses new jobs, lets running and queued ones finish
for up to s seconds, then cancels the rest; their futures fail with Cancelled.

Liveness: every failure of a job fails that job only (its future holds the error); a worker whose loop
itself fails fails the jobs it held and starts over (`worker_restarts` counts it, `alive` says how many
worker threads run). Every wait has a deadline: a job's future is settled at the latest `DEADLINE_SLACK_S`
after its timeout (`Job.wait`, `iterate`), even if its worker is stuck inside an engine call.

Cross-request batching (max_batch > 1): each worker runs up to max_batch stepwise jobs (one draft per step,
same scoring and sampling settings) as lanes of one StepwiseBatch (strategies/batched.py): every engine
forward serves all of them, jobs join between steps and leave when done, and each job's output is the same
as a run alone. Other jobs run alone on the worker, between the batch's steps.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any

from .backends.providers import ProviderConfig, ProviderSpec
from .cancel import Cancelled, CancelToken, RunTimeout
from .config import ReasonConfig
from .errors import ConfigError, SpecReasonError
from .prompt import Prompt
from .reasoner import Reasoner, default_kv_limit_bytes
from .strategies.batched import StepwiseBatch, batch_key
from .strategies.common import Run
from .trace import RunResult, StepTrace, TokenDelta

log = logging.getLogger(__name__)

# A run checks its deadline before every forward, so it stops within one forward of it; a waiter gives up
# this much later (a worker stuck in one engine call must not hold a client forever).
DEADLINE_SLACK_S = 10.0

StreamItem = StepTrace | TokenDelta


class Overloaded(SpecReasonError):
    """The queue is full: retry later (a server answers 429 with Retry-After)."""


class PoolClosed(SpecReasonError):
    """The pool is shutting down or closed (a server answers 503)."""


class Job:
    """One submitted run: a future of its RunResult, its cancel token and timing facts."""

    def __init__(self, *, prompt: Prompt, config: ReasonConfig, on_step: Callable[[StepTrace], None] | None,
                 on_token: Callable[[TokenDelta], None] | None, timeout: float | None,
                 slack: float = DEADLINE_SLACK_S) -> None:
        self.prompt, self.config, self.on_step, self.on_token = prompt, config, on_step, on_token
        self.token = CancelToken(timeout=timeout)
        self.deadline = None if timeout is None else time.monotonic() + timeout + slack
        self.future: Future[RunResult] = Future()
        self.submitted = time.perf_counter()
        self.started: float | None = None
        self.prompt_tokens = 0  # the verifier's prompt length (what a server reports as usage.prompt_tokens)
        self.items: asyncio.Queue[StreamItem] | None = None  # steps and token deltas, for submit_stream / iterate

    @property
    def problem(self) -> str:
        return self.prompt.problem

    def cancel(self, reason: str = "cancelled by the caller") -> None:
        self.token.cancel(reason)

    def expire(self, error: Exception | None = None) -> None:
        """Settle the future with `error` (default RunTimeout) if the run is still going: its worker is stuck."""
        self.cancel("the run passed its deadline")
        if not self.future.done():
            try:
                self.future.set_exception(error or RunTimeout("the run passed its time limit (its worker did "
                                                              "not stop)"))
            except Exception:  # noqa: BLE001 - set by the worker meanwhile: its outcome stands
                pass

    def result(self, timeout: float | None = None) -> RunResult:
        """Wait for the result; at most `timeout` s, and never past the job's deadline."""
        limit = timeout
        if self.deadline is not None:
            left = max(self.deadline - time.monotonic(), 0.0)
            limit = left if limit is None else min(limit, left)
        try:
            return self.future.result(limit)
        except FutureTimeout:
            if self.deadline is not None and time.monotonic() >= self.deadline:
                self.expire()
                return self.future.result(0)
            raise

    @property
    def queue_seconds(self) -> float:
        return (self.started or time.perf_counter()) - self.submitted


class ReasonerPool:
    def __init__(self, bundle: str | Path, *, workers: int = 1, queue_size: int = 64,
                 providers: Sequence[ProviderSpec] | ProviderConfig | None = None, intra_op_threads: int = 0,
                 kv_limit_bytes: int | None = None, max_batch: int = 1,
                 deadline_slack_s: float = DEADLINE_SLACK_S) -> None:
        """kv_limit_bytes: the most one KV cache may take (None: default_kv_limit_bytes split among workers).
        deadline_slack_s: how long past a job's timeout its waiters give up on a worker that did not stop."""
        for name, value in (("workers", workers), ("queue_size", queue_size), ("max_batch", max_batch)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
        if not (isinstance(deadline_slack_s, int | float) and 0 < deadline_slack_s < float("inf")):
            raise ConfigError(f"deadline_slack_s must be a number of seconds > 0, got {deadline_slack_s!r}")
        self.max_batch, self.deadline_slack_s = max_batch, deadline_slack_s
        limit = kv_limit_bytes if kv_limit_bytes is not None else default_kv_limit_bytes(share=workers)
        # One Reasoner (its own engines and KV buffers) per worker: loading is done once, here.
        self.reasoners = [Reasoner(bundle, providers=providers, intra_op_threads=intra_op_threads,
                                   kv_limit_bytes=limit) for _ in range(workers)]
        self.queue_size = queue_size
        self._queue: queue.Queue[Job | None] = queue.Queue(maxsize=queue_size)
        self._lock = threading.Lock()
        self._closed = False
        self._running: dict[Job, int] = {}  # running job -> index of its worker
        self.worker_restarts = 0
        self._threads = [threading.Thread(target=self._supervise, args=(i,), name=f"specreason-worker-{i}",
                                          daemon=True) for i in range(workers)]
        for t in self._threads:
            t.start()

    # -- state ---------------------------------------------------------------------------------------------------
    @property
    def workers(self) -> int:
        return len(self.reasoners)

    @property
    def alive(self) -> int:
        """Worker threads running (== workers unless the pool is closed)."""
        return sum(t.is_alive() for t in self._threads)

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
    def submit(self, problem: str | Prompt, config: ReasonConfig | None = None, *,
               on_step: Callable[[StepTrace], None] | None = None,
               on_token: Callable[[TokenDelta], None] | None = None, timeout: float | None = None) -> Job:
        """Queue one run; raises Overloaded when the queue is full, PoolClosed after close(), ConfigError for a
        bad problem (empty, not valid Unicode) or config."""
        prompt = Prompt.of(problem)
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, int | float)
                                    or not 0 < timeout < float("inf")):
            raise ConfigError(f"timeout must be a finite number of seconds > 0, got {timeout!r}")
        if config is not None and not isinstance(config, ReasonConfig):
            raise ConfigError(f"config must be a ReasonConfig (see make_config), got {type(config).__name__}")
        job = Job(prompt=prompt, config=config or ReasonConfig(), on_step=on_step, on_token=on_token,
                  timeout=timeout, slack=self.deadline_slack_s)
        with self._lock:  # so that close() cannot slip between the check and the put
            if self._closed:
                raise PoolClosed("the reasoner pool is shutting down: retry on another instance")
            try:
                self._queue.put_nowait(job)
            except queue.Full:
                raise Overloaded(f"all {self.queue_size} queue places are taken: retry later") from None
        return job

    def run(self, problem: str | Prompt, config: ReasonConfig | None = None, *,
            on_step: Callable[[StepTrace], None] | None = None, timeout: float | None = None) -> RunResult:
        """Submit and wait (from any thread)."""
        return self.submit(problem, config, on_step=on_step, timeout=timeout).result()

    async def arun(self, problem: str | Prompt, config: ReasonConfig | None = None, *,
                   on_step: Callable[[StepTrace], None] | None = None, timeout: float | None = None) -> RunResult:
        """Submit and await; if the awaiting task is cancelled, so is the run."""
        job = self.submit(problem, config, on_step=on_step, timeout=timeout)
        try:
            return await self.wait(job)
        except asyncio.CancelledError:
            job.cancel("the awaiting task was cancelled")
            raise

    async def wait(self, job: Job) -> RunResult:
        """Await a job's result, never past its deadline."""
        done = asyncio.wrap_future(job.future)
        left = None if job.deadline is None else max(job.deadline - time.monotonic(), 0.0)
        finished, _ = await asyncio.wait({done}, timeout=left)
        if not finished:
            job.expire()
        return await done

    async def astream(self, problem: str | Prompt, config: ReasonConfig | None = None, *,
                      timeout: float | None = None, tokens: bool = False) -> AsyncIterator[StreamItem | RunResult]:
        """Yield each StepTrace as it is committed (and, with tokens=True, each TokenDelta as the verifier writes),
        then the RunResult. Closing the iterator cancels the run."""
        job = self.submit_stream(problem, config, timeout=timeout, tokens=tokens)
        async for item in self.iterate(job):
            if item is not None:
                yield item

    def submit_stream(self, problem: str | Prompt, config: ReasonConfig | None = None, *,
                      timeout: float | None = None, tokens: bool = False) -> Job:
        """Submit a run whose steps (and token deltas with tokens=True) `iterate(job)` yields on the running
        event loop (call from that loop)."""
        loop = asyncio.get_running_loop()
        items: asyncio.Queue[StreamItem] = asyncio.Queue()  # unbounded, but a run has at most max_tokens items

        def put(item: StreamItem) -> None:  # runs in the worker thread: hand the item to the loop
            loop.call_soon_threadsafe(items.put_nowait, item)

        job = self.submit(problem, config, on_step=put, on_token=put if tokens else None, timeout=timeout)
        job.items = items
        return job

    async def iterate(self, job: Job, *, heartbeat: float | None = None
                      ) -> AsyncIterator[StreamItem | RunResult | None]:
        """The job's items, then its RunResult (or its error raised). With heartbeat: None after every
        `heartbeat` seconds without an item (a server sends a keep-alive then). Never past the job's deadline."""
        items = job.items
        if items is None:
            raise ConfigError("iterate() needs a job from submit_stream()")
        done = asyncio.wrap_future(job.future)
        sent = 0
        try:
            while True:
                getter: asyncio.Future[StreamItem] = asyncio.ensure_future(items.get())
                waits: list[float] = [] if heartbeat is None else [heartbeat]
                if job.deadline is not None:
                    waits.append(max(job.deadline - time.monotonic(), 0.0))
                pending: list[asyncio.Future[Any]] = [getter, done]
                await asyncio.wait(pending, timeout=min(waits) if waits else None,
                                   return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    item = getter.result()
                    sent += isinstance(item, StepTrace)
                    yield item
                    continue
                getter.cancel()
                if not done.done():
                    if job.deadline is not None and time.monotonic() >= job.deadline:
                        job.expire()
                        continue
                    yield None  # idle for `heartbeat` seconds
                    continue
                while not items.empty():  # items put before the result was set
                    item = items.get_nowait()
                    sent += isinstance(item, StepTrace)
                    yield item
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
    def _supervise(self, index: int) -> None:
        """A worker thread: runs the worker loop; if the loop itself fails, fails the jobs it held and restarts
        it (a request cannot take a worker down; a bug in the loop costs only the jobs it held)."""
        reasoner = self.reasoners[index]
        work = self._work if self.max_batch == 1 else self._work_batched
        while True:
            try:
                work(reasoner, index)
                return  # a stop sentinel
            except BaseException as e:  # noqa: BLE001 - the thread must outlive its loop's failure
                log.exception("worker %d failed; its jobs fail and it starts over", index)
                with self._lock:
                    held = [job for job, w in self._running.items() if w == index]
                    self.worker_restarts += 1
                for job in held:
                    self._finish(job, e if isinstance(e, Exception) else RuntimeError(repr(e)))

    def _work(self, reasoner: Reasoner, index: int) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            if self._start(job, reasoner, index):
                self._run_alone(reasoner, job)

    def _start(self, job: Job, reasoner: Reasoner, index: int) -> bool:
        """Mark a dequeued job running; False if it was cancelled while it waited or its prompt cannot be
        built (its future says so)."""
        if not job.future.set_running_or_notify_cancel():
            return False
        job.started = time.perf_counter()
        with self._lock:
            self._running[job] = index
        try:
            job.prompt_tokens = len(job.prompt.encode(reasoner.bundle.tokenizers["verifier"]))
        except Exception as e:  # noqa: BLE001 - a prompt the template or tokenizer refuses fails this job only
            self._finish(job, e)
            return False
        return True

    def _finish(self, job: Job, outcome: RunResult | BaseException) -> None:
        with self._lock:
            self._running.pop(job, None)
        if job.future.done():  # already reported (a batch that failed after this lane finished, an expired job)
            return
        try:
            if isinstance(outcome, BaseException):
                job.future.set_exception(outcome)
            else:
                job.future.set_result(outcome)
        except Exception:  # noqa: BLE001 - settled by an expiring waiter meanwhile: that outcome stands
            pass

    def _new_run(self, reasoner: Reasoner, job: Job) -> Run | None:
        try:
            return Run(bundle=reasoner.bundle, problem=job.prompt, config=job.config, on_step=job.on_step,
                       on_token=job.on_token, cancel=job.token)
        except Exception as e:  # noqa: BLE001 - a bad request fails alone
            self._finish(job, e)
            return None

    def _work_batched(self, reasoner: Reasoner, index: int) -> None:
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
                if not self._start(job, reasoner, index):
                    continue
                if batch_key(job.config) is None:
                    self._run_alone(reasoner, job)  # other strategies run between the batch's steps
                    continue
                if not (batch.accepts(job.config) and (not joining or batch_key(joining[0][0].config)
                                                       == batch_key(job.config))):
                    held = job
                    break
                run = self._new_run(reasoner, job)
                if run is not None:
                    joining.append((run, lambda outcome, job=job: self._finish(job, outcome)))
            if held is not None and not batch and not joining:
                job, held = held, None
                run = self._new_run(reasoner, job)
                if run is not None:
                    joining.append((run, lambda outcome, job=job: self._finish(job, outcome)))
            try:
                batch.admit(joining)
                if len(batch):
                    batch.tick()
            except Exception as e:  # noqa: BLE001 - an engine failure fails the batch's jobs, the worker lives
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
            result = reasoner.run(job.prompt, job.config, on_step=job.on_step, on_token=job.on_token,
                                  cancel=job.token)
        except Exception as e:  # noqa: BLE001 - every error goes to the caller, the worker lives on
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
        # Runs stop at their next forward; a worker stuck in one engine call is not waited for past a few seconds.
        deadline = max(deadline, time.monotonic()) + 5
        while self.running and time.monotonic() < deadline:
            time.sleep(0.01)
        with self._lock:
            stuck = list(self._running)
        for job in stuck:
            job.expire(Cancelled("the server shut down before the run finished"))
        for _ in self._threads:
            self._queue.put(None)  # one stop sentinel per worker (the queue is empty now, so this cannot block)
        for t in self._threads:
            t.join(timeout=max(deadline - time.monotonic(), 0) + 1)
