"""Bounded load on loopback: 32 concurrent clients, hundreds of requests, every answer checked; overload; shutdown.

Timings are printed (run with -s), never asserted.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from specreason_models.task import heldout_split, problem_record
from specreason_rt.answers import is_correct
from specreason_rt.config import make_config
from specreason_rt.pool import ReasonerPool
from specreason_rt.reasoner import Reasoner
from specreason_rt.serve.app import create_app
from specreason_rt.serve.runner import ServerThread

CLIENTS = 32
REQUESTS = 320


def _problems(n: int) -> list[dict]:
    return [problem_record(p) for p in heldout_split(n=n)]


def _ask(client: httpx.Client, question: str, seed: int) -> httpx.Response:
    return client.post("/v1/chat/completions", json={"model": "specreason", "seed": seed,
                                                      "messages": [{"role": "user", "content": question}]})


def test_load_32_clients_every_response_checked(builtin_bundle: Path) -> None:
    problems = _problems(REQUESTS)
    # What each request must answer: the same problem run alone, in-process, with the same seed.
    alone = Reasoner(builtin_bundle)
    expected = [alone.run(p["question"], make_config(seed=i)) for i, p in enumerate(problems)]
    pool = ReasonerPool(builtin_bundle, workers=2, queue_size=REQUESTS, max_batch=16)  # as specreason serve
    srv = ServerThread(create_app(pool=pool)).start()
    latencies = [0.0] * REQUESTS
    answers: list[str | None] = [None] * REQUESTS

    def client_loop(c: int) -> None:
        with httpx.Client(base_url=srv.url, timeout=120) as client:
            for i in range(c, REQUESTS, CLIENTS):
                start = time.perf_counter()
                res = _ask(client, problems[i]["question"], i)
                latencies[i] = time.perf_counter() - start
                assert res.status_code == 200, res.text
                body = res.json()
                assert body["choices"][0]["message"]["content"] == expected[i].text, problems[i]
                answers[i] = body["specreason"]["answer"]

    try:
        start = time.perf_counter()
        with ThreadPoolExecutor(CLIENTS) as ex:
            list(ex.map(client_loop, range(CLIENTS)))  # re-raises any client's assertion
        wall = time.perf_counter() - start
        metrics = httpx.get(f"{srv.url}/metrics").text
    finally:
        srv.stop()
    assert all(lat > 0 for lat in latencies)  # none lost
    correct = [is_correct(predicted=a, reference=p["answer"]) for a, p in zip(answers, problems, strict=True)]
    alone_correct = [is_correct(predicted=r.answer, reference=p["answer"]) for r, p in zip(expected, problems,
                                                                                        strict=True)]
    assert correct == alone_correct
    assert f'specreason_requests_total{{endpoint="/v1/chat/completions",status="200"}} {float(REQUESTS)}' in metrics
    lat = np.array(latencies) * 1e3
    print(json.dumps({"clients": CLIENTS, "requests": REQUESTS, "ok": REQUESTS, "accuracy": float(np.mean(correct)),
                      "p50_ms": round(float(np.percentile(lat, 50)), 1),
                      "p95_ms": round(float(np.percentile(lat, 95)), 1),
                      "throughput_rps": round(REQUESTS / wall, 1)}))


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        line = next(x for x in f if x.startswith("VmRSS"))
    return int(line.split()[1]) / 1024


def test_overload_is_refused_with_429_and_memory_stays_bounded(builtin_bundle: Path) -> None:
    pool = ReasonerPool(builtin_bundle, workers=1, queue_size=2)
    srv = ServerThread(create_app(pool=pool)).start()
    problems = _problems(64)
    depths: list[int] = []
    stop = threading.Event()

    def watch() -> None:  # the queue never holds more than its bound
        with httpx.Client(base_url=srv.url) as c:
            while not stop.is_set():
                depths.append(c.get("/health").json()["queue_depth"])

    def flood(c: int) -> list[int]:
        codes = []
        with httpx.Client(base_url=srv.url, timeout=120) as client:
            for i in range(c, len(problems) * 4, CLIENTS):
                res = _ask(client, problems[i % len(problems)]["question"], 0)
                codes.append(res.status_code)
                if res.status_code == 429:
                    assert res.headers["Retry-After"] == "1"
                    assert res.json()["error"]["code"] == "queue_full"
                else:
                    assert res.status_code == 200, res.text
        return codes

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        rss = [_rss_mib()]
        for _ in range(2):  # two rounds: memory after the second is not above the first's
            with ThreadPoolExecutor(CLIENTS) as ex:
                codes = [c for cs in ex.map(flood, range(CLIENTS)) for c in cs]
            rss.append(_rss_mib())
        assert httpx.get(f"{srv.url}/health").status_code == 200
    finally:
        stop.set()
        watcher.join()
        srv.stop()
    assert codes.count(429) > 0 and codes.count(200) > 0
    assert max(depths) <= 2
    print(json.dumps({"requests": len(codes), "ok": codes.count(200), "429": codes.count(429),
                      "rss_mib": [round(r) for r in rss], "max_queue_depth": max(depths)}))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _served_so_far(url: str) -> dict[str, float]:
    """From the server's /metrics: completions answered, runs in progress, runs waiting for a worker."""
    seen = {"completed": 0.0, "running": 0.0, "queued": 0.0}
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith('specreason_requests_total{endpoint="/v1/completions"'):
            seen["completed"] += float(line.rsplit(" ", 1)[1])
        elif line.startswith("specreason_running "):
            seen["running"] = float(line.split()[1])
        elif line.startswith("specreason_queue_depth "):
            seen["queued"] = float(line.split()[1])
    return seen


@pytest.mark.slow
def test_sigterm_finishes_in_flight_requests(builtin_bundle: Path) -> None:
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "specreason_rt.cli", "serve", "--bundle", str(builtin_bundle),
                             "--port", str(port), "--workers", "1", "--graceful", "60"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=os.environ.copy())
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline and proc.poll() is None, "the server did not start"
            time.sleep(0.2)
        problems = _problems(8)
        body = {"model": "specreason", "strategy": "majority", "n_specs": 8}
        with ThreadPoolExecutor(8) as ex:
            futures = [ex.submit(httpx.post, f"{url}/v1/completions", json={**body, "prompt": p["question"]},
                                 timeout=120) for p in problems]
            # Signal once every request is in (answered, running or waiting in line) and some still wait: a
            # client that had not connected yet would rightly be refused, which is not what this test is about.
            deadline = time.monotonic() + 60
            while True:
                seen = _served_so_far(url)
                if seen["completed"] + seen["running"] + seen["queued"] >= len(problems) and seen["queued"] > 0:
                    break
                assert seen["completed"] < len(problems), "the runs finished before the signal: make them longer"
                assert time.monotonic() < deadline, f"the requests did not all arrive: {seen}"
                time.sleep(0.005)
            proc.send_signal(signal.SIGTERM)
            responses = [f.result() for f in futures]
        # uvicorn re-raises the signal once it has shut down cleanly, so the exit is "killed by SIGTERM".
        assert proc.wait(timeout=90) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert [r.status_code for r in responses] == [200] * 8
    assert all(r.json()["choices"][0]["text"] for r in responses)
