"""Time to first token of a streamed answer, against one or more running servers, interleaved (JSON).

    python -m specreason_rt.serve.ttft --url http://127.0.0.1:8000 [--url ...] --prompt "What is 2+2?" \
        [--repeats 7] [--max-tokens 128] [--out FILE]

Each repeat sends the same streamed chat request to every server in turn (A,B then B,A, so neither always
goes first), one at a time, and records: the time to the first chunk whose delta carries text (TTFT), the time
to the end of the stream, and how many text chunks arrived. Medians over repeats, and per-repeat ratios of each
server to the first one. What a server does between chunks (the strategy, the step length) is its own business:
this only sees the wire, so it compares servers of different versions on equal terms. Extra request fields
(e.g. a strategy) go in with --field NAME=JSON.
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
import time
from typing import Any
from urllib.parse import urlsplit

import numpy as np


def stream_once(*, url: str, body: dict[str, Any], timeout_s: float = 600.0) -> dict[str, Any]:
    """One streamed chat request: seconds to the first text chunk and to the end, text chunks, the text."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port or 80, timeout=timeout_s)
    start = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body=json.dumps({**body, "stream": True}),
                 headers={"Content-Type": "application/json"})
    res = conn.getresponse()
    if res.status != 200:
        raise RuntimeError(f"{url}: HTTP {res.status}: {res.read()[:300]!r}")
    first: float | None = None
    chunks, text = 0, []
    for raw in res:  # SSE: "data: {...}" lines, blank lines, ": keep-alive" comments
        line = raw.decode("utf-8").strip()
        if not line.startswith("data:"):
            continue
        data = line[len("data:"):].strip()
        if data == "[DONE]":
            break
        delta = json.loads(data)["choices"][0].get("delta", {}).get("content") or ""
        if delta:
            chunks += 1
            text.append(delta)
            if first is None:
                first = time.perf_counter() - start
    end = time.perf_counter() - start
    conn.close()
    if first is None:
        raise RuntimeError(f"{url}: the stream carried no text")
    return {"ttft_s": first, "total_s": end, "text_chunks": chunks, "text": "".join(text)}


def compare(*, urls: list[str], body: dict[str, Any], repeats: int, warmup: int = 1) -> dict[str, Any]:
    """Interleaved repeats over `urls`; medians per server and per-repeat ratios to urls[0]."""
    for url in urls:  # untimed: loads lazily initialised state on each side
        for _ in range(warmup):
            stream_once(url=url, body=body)
    runs: dict[str, list[dict[str, Any]]] = {u: [] for u in urls}
    for r in range(repeats):
        for url in (urls if r % 2 == 0 else urls[::-1]):
            runs[url].append(stream_once(url=url, body=body))
    servers = []
    base_ttft = np.array([x["ttft_s"] for x in runs[urls[0]]])  # [repeats]
    for url in urls:
        ttft = np.array([x["ttft_s"] for x in runs[url]])  # [repeats]
        total = np.array([x["total_s"] for x in runs[url]])
        servers.append({"url": url, "ttft_ms_median": round(float(np.median(ttft)) * 1e3, 2),
                        "total_ms_median": round(float(np.median(total)) * 1e3, 2),
                        "ttft_share_of_total_median": round(float(np.median(ttft / total)), 4),
                        "text_chunks_median": float(np.median([x["text_chunks"] for x in runs[url]])),
                        "ttft_ratio_to_first_median": round(float(np.median(ttft / base_ttft)), 4),
                        "ttft_ms": [round(float(t) * 1e3, 2) for t in ttft],
                        "same_text_every_repeat": len({x["text"] for x in runs[url]}) == 1,
                        "text": runs[url][0]["text"]})
    return {"repeats": repeats, "order": "A,B,.. then ..,B,A", "request": body, "servers": servers}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m specreason_rt.serve.ttft", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", action="append", required=True, help="a running server (repeatable; the first is "
                   "the baseline of the ratios)")
    p.add_argument("--prompt", required=True, help="the user message")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--field", action="append", default=[], metavar="NAME=JSON",
                   help='an extra request field, e.g. strategy="stepwise" or seed=0 (repeatable)')
    p.add_argument("--out", help="also write the JSON result to this file")
    args = p.parse_args(argv)
    body: dict[str, Any] = {"model": "specreason", "messages": [{"role": "user", "content": args.prompt}],
                            "max_tokens": args.max_tokens}
    for field in args.field:
        name, sep, value = field.partition("=")
        if not sep or not name:
            p.error(f"--field {field!r}: write NAME=JSON, e.g. seed=0")
        try:
            body[name] = json.loads(value)
        except json.JSONDecodeError:
            p.error(f"--field {field!r}: the value is not JSON (quote strings: strategy='\"stepwise\"')")
    try:
        report = compare(urls=args.url, body=body, repeats=args.repeats)
    except (OSError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    text = json.dumps(report, indent=2)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
