"""Serving benchmark (JSON): the server's added latency at low load, and throughput under concurrency.

    python -m specreason_rt.serve.bench --bundle DIR [--problems FILE.jsonl] [--n 100] [--clients 1 8 32]

1. added latency: the same problems, one at a time, alternately in-process (Reasoner.run) and through the
   server (one keep-alive HTTP connection): per-request latency p50 / mean, and the ratio server / in-process.
2. throughput: requests per second with 1 and with C concurrent clients, for each worker count, plus p50/p95.
The server runs in its own process (`specreason serve`), so the clients do not share its interpreter lock.
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..config import make_config
from ..reasoner import Reasoner


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start(bundle: str, *, workers: int, port: int, max_batch: int = 1) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "specreason_rt.cli", "serve", "--bundle", bundle, "--port",
                             str(port), "--workers", str(workers), "--queue-size", "4096",
                             "--max-batch", str(max_batch)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("the server did not start")


def _post(conn: http.client.HTTPConnection, body: dict[str, Any]) -> dict[str, Any]:
    conn.request("POST", "/v1/chat/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    res = conn.getresponse()
    data = json.loads(res.read())
    if res.status != 200:
        raise RuntimeError(f"HTTP {res.status}: {data}")
    return data


def _body(question: str, *, strategy: str, seed: int) -> dict[str, Any]:
    return {"model": "specreason", "messages": [{"role": "user", "content": question}], "strategy": strategy,
            "seed": seed}


def added_latency(*, bundle: str, port: int, problems: list[str], strategy: str) -> dict[str, Any]:
    reasoner = Reasoner(bundle)
    conn = http.client.HTTPConnection("127.0.0.1", port)
    local, served = [], []
    for i, q in enumerate(problems[:5]):  # warm both paths
        reasoner.run(q, make_config(strategy=strategy, seed=i))
        _post(conn, _body(q, strategy=strategy, seed=i))
    for i, q in enumerate(problems):
        start = time.perf_counter()
        result = reasoner.run(q, make_config(strategy=strategy, seed=i))
        local.append(time.perf_counter() - start)
        start = time.perf_counter()
        data = _post(conn, _body(q, strategy=strategy, seed=i))
        served.append(time.perf_counter() - start)
        if data["choices"][0]["message"]["content"] != result.text:
            raise RuntimeError(f"the server's answer to {q!r} differs from the in-process run")
    local_ms, served_ms = np.array(local) * 1e3, np.array(served) * 1e3
    return {"strategy": strategy, "requests": len(problems),
            "in_process_p50_ms": round(float(np.median(local_ms)), 3),
            "server_p50_ms": round(float(np.median(served_ms)), 3),
            "in_process_mean_ms": round(float(local_ms.mean()), 3), "server_mean_ms": round(float(served_ms.mean()), 3),
            "added_p50_ms": round(float(np.median(served_ms - local_ms)), 3),
            "added_ratio_mean": round(float(served_ms.mean() / local_ms.mean() - 1), 4)}


def throughput(*, port: int, problems: list[str], clients: int, strategy: str) -> dict[str, Any]:
    latencies = [0.0] * len(problems)

    def loop(c: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        for i in range(c, len(problems), clients):
            start = time.perf_counter()
            _post(conn, _body(problems[i], strategy=strategy, seed=i))
            latencies[i] = time.perf_counter() - start

    threads = [threading.Thread(target=loop, args=(c,)) for c in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    lat = np.array(latencies) * 1e3
    return {"clients": clients, "requests": len(problems), "throughput_rps": round(len(problems) / wall, 2),
            "p50_ms": round(float(np.percentile(lat, 50)), 2), "p95_ms": round(float(np.percentile(lat, 95)), 2)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m specreason_rt.serve.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", required=True)
    p.add_argument("--problems", help="JSONL of {question} (default: the built-in task's held-out split)")
    p.add_argument("--n", type=int, default=100, help="problems for the latency comparison")
    p.add_argument("--load-requests", type=int, default=320, help="requests per throughput measurement")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--max-batch", type=int, nargs="+", default=[1, 16],
                   help="cross-request batch sizes to compare (1 = off)")
    p.add_argument("--strategy", default="stepwise")
    args = p.parse_args(argv)
    if args.problems:
        questions = [json.loads(x)["question"] for x in Path(args.problems).read_text().splitlines() if x.strip()]
    else:
        from specreason_models.task import heldout_split  # the built-in task (no torch needed)

        questions = [q.question for q in heldout_split(n=max(args.n, args.load_requests))]
    report: dict[str, Any] = {"bundle": args.bundle, "throughput": []}
    for workers, max_batch in [(w, b) for b in args.max_batch for w in args.workers]:
        port = _free_port()
        proc = _start(args.bundle, workers=workers, port=port, max_batch=max_batch)
        try:
            if "added_latency" not in report:
                report["added_latency"] = added_latency(bundle=args.bundle, port=port, problems=questions[:args.n],
                                                        strategy=args.strategy)
            for clients in args.clients:
                row = throughput(port=port, problems=questions[:args.load_requests], clients=clients,
                                 strategy=args.strategy)
                report["throughput"].append({"workers": workers, "max_batch": max_batch, **row})
                print(json.dumps(report["throughput"][-1]), file=sys.stderr)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
