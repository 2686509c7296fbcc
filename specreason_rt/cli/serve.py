"""`specreason serve`: the OpenAI-compatible HTTP server over a bundle (needs the serve extra).

Every flag is checked before the bundle loads: a bad value ends the command with one line naming it.
Server-wide run settings come from --config FILE (TOML; YAML when pyyaml is installed), then --preset /
--strategy / --threshold / --score-mode, then --set SECTION.FIELD=VALUE; a request's own fields win over all.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from ..errors import ConfigError

LOG_LEVELS = ("debug", "info", "warning", "error")
CONFIG_KEYS = ("strategy", "preset")  # top-level keys of a --config file; the rest are config sections


def _value(text: str) -> Any:
    """A --set value: JSON when it parses (numbers, true/false, null), else the string itself."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _read_config(path: str) -> dict[str, Any]:
    """A --config file as {"strategy", "preset", "overrides": {dotted: value}}."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"--config {path}: cannot read it ({e})") from None
    if file.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ConfigError("--config: YAML needs pyyaml (pip install pyyaml), or write the file as TOML") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"--config {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    else:
        if sys.version_info >= (3, 11):
            import tomllib
        else:  # the serve extra installs tomli on Python 3.10
            import tomli as tomllib
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"--config {path} is not valid TOML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path} must hold a table of settings (strategy, preset, [section] ...)")
    out: dict[str, Any] = {k: data[k] for k in CONFIG_KEYS if k in data}
    overrides: dict[str, Any] = {}
    for section, fields in data.items():
        if section in CONFIG_KEYS:
            continue
        if not isinstance(fields, dict):
            raise ConfigError(f"--config {path}: {section} must be a table of fields, e.g. [{section}] then "
                              "field = value (top-level keys are strategy and preset)")
        overrides.update({f"{section}.{k}": v for k, v in fields.items()})
    out["overrides"] = overrides
    return out


def _defaults(args: argparse.Namespace):  # noqa: ANN202 - schema is imported lazily (serve extra)
    from ..serve.schema import Defaults

    file = _read_config(args.config) if args.config else {"overrides": {}}
    overrides = dict(file["overrides"])
    shortcuts = {"stepwise.threshold": args.threshold, "score.mode": args.score_mode}
    overrides.update({k: v for k, v in shortcuts.items() if v is not None})
    for item in args.set or []:  # after the shortcuts: an explicit --set wins
        key, sep, value = item.partition("=")
        if not sep or "." not in key:
            raise ConfigError(f"--set expects SECTION.FIELD=VALUE (e.g. stepwise.threshold=5), got {item!r}")
        overrides[key.strip()] = _value(value.strip())
    return Defaults(strategy=args.strategy or file.get("strategy", "stepwise"),
                    preset=args.preset or file.get("preset", "default"), overrides=overrides)


def _check_flags(args: argparse.Namespace) -> None:
    """One line per bad flag, before anything loads."""
    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ConfigError(message)

    need(0 <= args.port <= 65535, f"--port must be in 0..65535 (0: any free port), got {args.port}")
    for flag in ("workers", "max_batch", "queue_size", "max_tokens_limit", "max_prompt_chars", "max_body_bytes",
                 "max_branches"):
        value = getattr(args, flag)
        need(value >= 1, f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    for flag in ("timeout", "header_timeout", "body_timeout", "keepalive"):
        value = getattr(args, flag)
        need(math.isfinite(value) and value > 0, f"--{flag.replace('_', '-')} must be a number of seconds > 0, "
             f"got {value}")
    need(math.isfinite(args.graceful) and args.graceful >= 0, f"--graceful must be >= 0 seconds, got {args.graceful}")
    need(args.threads >= 0, f"--threads must be >= 0 (0: auto), got {args.threads}")
    need(args.max_connections is None or args.max_connections >= 1,
         f"--max-connections must be >= 1, got {args.max_connections}")
    need(args.kv_limit_mib is None or (math.isfinite(args.kv_limit_mib) and args.kv_limit_mib > 0),
         f"--kv-limit-mib must be > 0, got {args.kv_limit_mib}")
    if args.api_key is not None:
        need(args.api_key != "", "--api-key is empty: pass a key, or leave the flag out to serve without one")
        need(args.api_key.isascii() and args.api_key.isprintable() and " " not in args.api_key,
             "--api-key must be printable ASCII without spaces (HTTP headers cannot carry other characters)")


def _api_key(args: argparse.Namespace) -> str | None:
    if args.api_key is not None:
        return str(args.api_key)
    env = os.environ.get("SPECREASON_API_KEY")
    if env is not None and not (env and env.isascii() and env.isprintable() and " " not in env):
        raise ConfigError("$SPECREASON_API_KEY must be non-empty printable ASCII without spaces; unset it to serve "
                          "without a key")
    return env


def _serve(args: argparse.Namespace) -> int:
    try:
        from ..serve.app import create_app
        from ..serve.logs import configure
        from ..serve.runner import serve_forever
        from ..serve.schema import Limits
    except ImportError as e:
        raise ConfigError(str(e)) from None
    from ..pool import ReasonerPool
    from .common import provider_config

    _check_flags(args)
    api_key = _api_key(args)
    defaults = _defaults(args)
    limits = Limits(max_body_bytes=args.max_body_bytes, max_prompt_chars=args.max_prompt_chars,
                    max_tokens=args.max_tokens_limit, max_branches=args.max_branches, timeout_s=args.timeout,
                    body_timeout_s=args.body_timeout, keepalive_s=args.keepalive)
    template = None
    if args.chat_template:
        try:
            template = Path(args.chat_template).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"--chat-template {args.chat_template}: cannot read it ({e})") from None
    configure(level=args.log_level, json_lines=args.log_json)
    if args.host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        print(f"specreason serve: warning: listening on {args.host} without an API key", file=sys.stderr, flush=True)
    kv_limit = None if args.kv_limit_mib is None else int(args.kv_limit_mib * 2**20)
    pool = ReasonerPool(args.bundle, workers=args.workers, queue_size=args.queue_size,
                        providers=provider_config(args), intra_op_threads=args.threads, max_batch=args.max_batch,
                        kv_limit_bytes=kv_limit)
    try:
        if template is not None:  # the bundle's own files stay hash-checked; only the rendering changes
            for reasoner in pool.reasoners:
                for tok in reasoner.bundle.tokenizers.values():
                    tok.set_chat_template(template)
        app = create_app(pool=pool, model_name=args.model_name, api_key=api_key, limits=limits, defaults=defaults,
                         shutdown_grace_s=args.graceful)
    except BaseException:
        pool.close(grace=0)
        raise

    def started(url: str) -> None:  # called once the port is bound
        print(f"specreason serve: {args.model_name} from {args.bundle} on {url} ({args.workers} workers, up to "
              f"{args.max_batch} stepwise runs batched per worker, queue {args.queue_size}, strategy "
              f"{defaults.strategy}, preset {defaults.preset})", flush=True)

    serve_forever(app, host=args.host, port=args.port, graceful_s=args.graceful, on_started=started,
                  max_connections=args.max_connections, header_timeout_s=args.header_timeout,
                  log_level=args.log_level)
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    from ..config import PRESETS, SCORE_MODES, STRATEGIES

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (chat/completions, completions, SSE, metrics)",
                       description="Serve a bundle over HTTP: /v1/chat/completions, /v1/completions (JSON or SSE), "
                       "/v1/models, /health, /metrics (Prometheus). SpecReason options travel as extra body fields "
                       "(strategy, preset, n_specs, threshold, score_mode, candidates, trace) and win over the "
                       "server-wide defaults set here. Needs pip install 'specreason-rt[serve]'.")
    p.add_argument("--bundle", required=True, metavar="DIR")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port, 0..65535 (0: any free port; default 8000)")
    p.add_argument("--model-name", default="specreason", help="the model id clients send (default specreason)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1 (default: $SPECREASON_API_KEY, else none)")
    d = p.add_argument_group("server-wide run settings (a request's own fields win)")
    d.add_argument("--config", default=None, metavar="FILE",
                   help="TOML (or YAML with pyyaml) file: strategy = ..., preset = ..., then [section] field = value")
    d.add_argument("--strategy", choices=STRATEGIES, default=None, help="default strategy (default stepwise)")
    d.add_argument("--preset", choices=list(PRESETS), default=None, help="default preset (default default)")
    d.add_argument("--threshold", type=float, default=None, help="stepwise.threshold (0-9 scale)")
    d.add_argument("--score-mode", choices=SCORE_MODES, default=None, help="score.mode")
    d.add_argument("--set", action="append", metavar="SECTION.FIELD=VALUE",
                   help="any config field, e.g. --set stepwise.candidates=2 (repeatable; wins over --config)")
    d.add_argument("--chat-template", default=None, metavar="FILE",
                   help="render prompts with this Jinja chat template instead of the bundle's (no re-export)")
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
    p.add_argument("--max-prompt-chars", type=int, default=4096, help="longest prompt text accepted (all messages)")
    p.add_argument("--max-body-bytes", type=int, default=65536, help="largest request body accepted (413 past it)")
    p.add_argument("--max-branches", type=int, default=32, help="most branches one run may hold (n_specs, ...)")
    p.add_argument("--kv-limit-mib", type=float, default=None, metavar="MIB",
                   help="most memory one KV cache may take (default: a quarter of the machine's memory / workers)")
    p.add_argument("--max-connections", type=int, default=None,
                   help="connections served at once, past it 503 (default 256, fewer under a low open-file limit)")
    p.add_argument("--header-timeout", type=float, default=10.0,
                   help="seconds a client has to send its request headers before the socket is closed (default 10)")
    p.add_argument("--body-timeout", type=float, default=30.0,
                   help="seconds a client has to send its request body before 408 (default 30)")
    p.add_argument("--keepalive", type=float, default=5.0,
                   help="seconds of silence in a stream before an SSE keep-alive comment (default 5)")
    p.add_argument("--graceful", type=float, default=30.0,
                   help="seconds in-flight requests get to finish on shutdown (SIGINT/SIGTERM); then 503")
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads per worker (0: auto)")
    p.add_argument("--log-level", choices=LOG_LEVELS, default="info",
                   help="log level (default info: the access log, one line per request)")
    p.add_argument("--log-json", action="store_true", help="log one JSON object per line")
    from .common import add_provider_arguments

    add_provider_arguments(p)
    p.set_defaults(func=_serve)
