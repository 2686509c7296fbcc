"""Prometheus metrics of one server (its own registry, so several apps can live in one process).

Terms: a request is one HTTP call; a run is one reasoning run (RunResult). Every run metric carries the served
model's name (label `model`). Counters, so that rates come per scrape window:
  specreason_prompt_tokens_total / specreason_generation_tokens_total   usage as clients are billed (the
      committed solution; drafts not counted): their sum is usage.total_tokens over all requests
  specreason_model_tokens_total{role}   tokens each model generated, drafts included (a separate metric: its
      labels sum to the work done, not to usage)
  specreason_drafted_steps_total / specreason_accepted_steps_total   acceptance rate over a window =
      rate(accepted) / rate(drafted)
Histograms: request latency, queue wait, run time; and for streamed requests time to first token (submit to the
first text sent) and time per output token ((run end - first token) / (completion tokens - 1)).
Process metrics (memory, CPU, open fds) come from prometheus_client's default process collector.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest

from ..trace import RunResult

# Runs on the built-in pair take milliseconds; real models take seconds: buckets span both.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TOKEN_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class Metrics:
    def __init__(self, *, model: str, queue_depth: Callable[[], int], running: Callable[[], int]) -> None:
        self.registry = CollectorRegistry()
        self.model = model
        r = self.registry
        ProcessCollector(registry=r)  # process_resident_memory_bytes, process_cpu_seconds_total, ...
        m = ["model"]
        self.requests = Counter("specreason_requests", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.latency = Histogram("specreason_request_latency_seconds", "HTTP request latency (to the last byte)",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram("specreason_queue_wait_seconds", "time a run waited for a worker", m,
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.run_seconds = Histogram("specreason_run_seconds", "reasoning run time by strategy", [*m, "strategy"],
                                     buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("specreason_time_to_first_token_seconds", "streamed requests: submit to first text",
                              m, buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("specreason_time_per_output_token_seconds",
                              "streamed requests: seconds per output token after the first", m,
                              buckets=TOKEN_BUCKETS, registry=r)
        self.prompt_tokens = Counter("specreason_prompt_tokens", "prompt tokens (usage)", m, registry=r)
        self.generation_tokens = Counter("specreason_generation_tokens", "completion tokens (usage: the committed "
                                         "solution)", m, registry=r)
        self.model_tokens = Counter("specreason_model_tokens", "tokens each model generated, drafts included",
                                    [*m, "role"], registry=r)
        self.drafted = Counter("specreason_drafted_steps", "steps the speculator drafted (stepwise)", m, registry=r)
        self.accepted = Counter("specreason_accepted_steps", "drafted steps the verifier accepted", m, registry=r)
        self.rejected = Counter("specreason_rejected", "requests refused before running, by reason", ["reason"],
                                registry=r)
        Gauge("specreason_queue_depth", "runs waiting for a worker", registry=r).set_function(queue_depth)
        Gauge("specreason_running", "runs in progress", registry=r).set_function(running)

    def observe_run(self, *, result: RunResult, prompt_tokens: int, completion_tokens: int, queue_s: float,
                    first_token_s: float | None) -> None:
        model = self.model
        self.queue_wait.labels(model=model).observe(queue_s)
        self.run_seconds.labels(model=model, strategy=result.strategy).observe(result.seconds)
        self.prompt_tokens.labels(model=model).inc(prompt_tokens)
        self.generation_tokens.labels(model=model).inc(completion_tokens)
        for role, n in result.tokens.items():
            self.model_tokens.labels(model=model, role=role).inc(n)
        if first_token_s is not None:
            self.ttft.labels(model=model).observe(first_token_s)
            if completion_tokens > 1:
                rest = max(queue_s + result.seconds - first_token_s, 0.0)
                self.tpot.labels(model=model).observe(rest / (completion_tokens - 1))
        drafted = [s for s in result.steps if s.candidates]
        self.drafted.labels(model=model).inc(len(drafted))
        self.accepted.labels(model=model).inc(sum(s.author == "speculator" for s in drafted))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
