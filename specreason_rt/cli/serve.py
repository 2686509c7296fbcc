"""`specreason serve`: the OpenAI-compatible HTTP server over a bundle (needs the serve extra)."""

from __future__ import annotations

import argparse
import os

from ..errors import ConfigError


def _serve(args: argparse.Namespace) -> int:
    try:
        from ..serve.app import create_app
        from ..serve.runner import serve_forever
        from ..serve.schema import Limits
    except ImportError as e:
        raise ConfigError(str(e)) from None
    from ..pool import ReasonerPool
    from .common import provider_config

    api_key = args.api_key or os.environ.get("SPECREASON_API_KEY") or None
    if args.host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        print(f"specreason serve: warning: listening on {args.host} without an API key", flush=True)
    pool = ReasonerPool(args.bundle, workers=args.workers, queue_size=args.queue_size,
                        providers=provider_config(args), intra_op_threads=args.threads, max_batch=args.max_batch)
    limits = Limits(max_body_bytes=args.max_body_bytes, max_prompt_chars=args.max_prompt_chars,
                    max_tokens=args.max_tokens_limit, max_branches=args.max_branches, timeout_s=args.timeout)
    app = create_app(pool=pool, model_name=args.model_name, api_key=api_key, limits=limits,
                     shutdown_grace_s=args.graceful)
    print(f"specreason serve: {args.model_name} from {args.bundle} on http://{args.host}:{args.port} "
          f"({args.workers} workers, up to {args.max_batch} stepwise runs batched per worker, queue {args.queue_size})",
          flush=True)
    serve_forever(app, host=args.host, port=args.port, graceful_s=args.graceful)
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (chat/completions, completions, SSE, metrics)",
                       description="Serve a bundle over HTTP: /v1/chat/completions, /v1/completions (JSON or SSE), "
                       "/v1/models, /health, /metrics (Prometheus). SpecReason options travel as extra body fields "
                       "(strategy, preset, n_specs, threshold, score_mode, candidates, trace). Needs "
                       "pip install 'specreason-rt[serve]'.")
    p.add_argument("--bundle", required=True, metavar="DIR")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model-name", default="specreason", help="the model id clients send (default specreason)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1 (default: $SPECREASON_API_KEY, else none)")
    p.add_argument("--workers", type=int, default=1,
                   help="worker threads, one Reasoner each, each batching up to --max-batch stepwise runs (default "
                        "1: lowest latency at low load; 2 gave 1.4x the throughput at 32 clients on 2 cores)")
    p.add_argument("--max-batch", type=int, default=16,
                   help="stepwise runs of different requests a worker batches into shared engine forwards "
                        "(same output as alone; 1 = off; default 16)")
    p.add_argument("--queue-size", type=int, default=64,
                   help="runs that may wait for a worker; past this requests get 429 (default 64)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds a run may take before 504 (default 120)")
    p.add_argument("--max-tokens-limit", type=int, default=1024, help="largest max_tokens a request may ask for")
    p.add_argument("--max-prompt-chars", type=int, default=4096, help="longest problem text accepted")
    p.add_argument("--max-body-bytes", type=int, default=65536, help="largest request body accepted (413 past it)")
    p.add_argument("--max-branches", type=int, default=32, help="most branches one run may hold (n_specs, ...)")
    p.add_argument("--graceful", type=float, default=30.0,
                   help="seconds in-flight requests get to finish on shutdown (SIGINT/SIGTERM)")
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads per worker (0: auto)")
    from .common import add_provider_arguments

    add_provider_arguments(p)
    p.set_defaults(func=_serve)
