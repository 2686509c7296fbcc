"""Prometheus metrics of one server (its own registry, so several apps can live in one process).

Terms: a request is one HTTP call; a run is one reasoning run (RunResult). acceptance rate = accepted drafted
steps / drafted steps (stepwise), the share RunResult.acceptance reports per run, here over all runs.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from ..trace import RunResult

# Runs on the built-in pair take milliseconds; real models take seconds: buckets span both.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self, *, queue_depth: Callable[[], int], running: Callable[[], int]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("specreason_requests", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.latency = Histogram("specreason_request_latency_seconds", "HTTP request latency (to the last byte)",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram("specreason_queue_wait_seconds", "time a run waited for a worker",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.run_seconds = Histogram("specreason_run_seconds", "reasoning run time by strategy", ["strategy"],
                                     buckets=LATENCY_BUCKETS, registry=r)
        self.tokens = Counter("specreason_tokens", "tokens: prompt / completion (usage), and generated per model "
                              "(speculator / verifier, drafts included)", ["kind"], registry=r)
        self.drafted = Counter("specreason_drafted_steps", "steps the speculator drafted (stepwise)", registry=r)
        self.accepted = Counter("specreason_accepted_steps", "drafted steps the verifier accepted", registry=r)
        self.acceptance = Gauge("specreason_acceptance_rate", "accepted / drafted steps over all runs", registry=r)
        self.rejected = Counter("specreason_rejected", "requests refused before running, by reason", ["reason"],
                                registry=r)
        self._drafted_n = self._accepted_n = 0  # observe_run runs on the event loop only: no lock needed
        Gauge("specreason_queue_depth", "runs waiting for a worker", registry=r).set_function(queue_depth)
        Gauge("specreason_running", "runs in progress", registry=r).set_function(running)

    def observe_run(self, *, result: RunResult, prompt_tokens: int, completion_tokens: int, queue_s: float) -> None:
        self.queue_wait.observe(queue_s)
        self.run_seconds.labels(strategy=result.strategy).observe(result.seconds)
        self.tokens.labels(kind="prompt").inc(prompt_tokens)
        self.tokens.labels(kind="completion").inc(completion_tokens)
        for role, n in result.tokens.items():
            self.tokens.labels(kind=role).inc(n)
        drafted = [s for s in result.steps if s.candidates]
        if drafted:
            accepted = sum(s.author == "speculator" for s in drafted)
            self.drafted.inc(len(drafted))
            self.accepted.inc(accepted)
            self._drafted_n += len(drafted)
            self._accepted_n += accepted
            self.acceptance.set(self._accepted_n / self._drafted_n)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
