"""The ASGI app: OpenAI-compatible routes over a ReasonerPool.

    POST /v1/chat/completions, /v1/completions   (JSON, or SSE with "stream": true)
    GET  /v1/models, /health, /metrics           (/health and /metrics need no API key)

Request path: 1. auth  2. read the body (bounded in size, time and nesting)  3. validate (schema.py)  4. submit
to the pool (bounded queue: 429 + Retry-After when full, 503 while shutting down)  5. await the run (it is
cancelled if the client goes away; every wait has a deadline)  6. answer, or stream: the verifier's tokens as it
writes them, an accepted draft's text once accepted, each chunk's `specreason` field naming its step (and
`step_end` on the chunk that completes one), SSE comments (": keep-alive") while a step is being verified.
Every error is an OpenAI error body; nothing a client sends makes the server stop serving.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..cancel import Cancelled, RunTimeout
from ..errors import CacheLimitError, ConfigError
from ..pool import Job, Overloaded, PoolClosed, ReasonerPool
from ..prompt import Prompt
from ..tokenizer import TokenizerError
from ..trace import RunResult, StepTrace, TokenDelta
from .errors import ApiError
from .metrics import Metrics
from .responses import Envelope, cut_at_stop, finish_reason, sse, summary, usage
from .schema import MAX_JSON_DEPTH, ChatRequest, CompletionRequest, Defaults, Limits, _Common, json_depth, parse

RETRY_AFTER_S = 1  # a full queue drains in about one run time; clients back off and retry
log = logging.getLogger("specreason_rt.serve")
access_log = logging.getLogger("specreason_rt.serve.access")


def _reject_constant(name: str) -> None:
    """NaN and Infinity are not JSON (Python's parser accepts them by default)."""
    raise ValueError(f"{name} is not a JSON number")


def check_chat_template(pool: ReasonerPool) -> None:
    """Render a one-turn chat with every model's template now, so a template that does not compile or fails on
    a plain user turn stops the server at start-up (TokenizerError) instead of failing every request."""
    for tok in pool.bundle.tokenizers.values():
        Prompt.of("1+1").encode(tok)


def create_app(*, pool: ReasonerPool, model_name: str = "specreason", api_key: str | None = None,
               limits: Limits | None = None, defaults: Defaults | None = None, close_pool: bool = True,
               shutdown_grace_s: float = 30.0) -> Starlette:
    """The app over `pool`; on shutdown it closes the pool (running runs get shutdown_grace_s to finish).

    api_key: printable ASCII without spaces (an HTTP header carries it), or None for no auth.
    """
    limits = limits or Limits()
    defaults = defaults or Defaults()
    if api_key is not None and not (api_key and api_key.isascii() and api_key.isprintable() and " " not in api_key):
        raise ConfigError("the API key must be non-empty printable ASCII without spaces (it travels in an HTTP "
                          "header); pass None for no key")
    check_chat_template(pool)
    metrics = Metrics(model=model_name, queue_depth=lambda: pool.queue_depth, running=lambda: pool.running)

    def check_auth(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").strip().partition(" ")
        # The scheme is case-insensitive (RFC 9110 11.1); the key is compared in constant time.
        if not (scheme.lower() == "bearer" and secrets.compare_digest(given.strip().encode(), api_key.encode())):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'", code="invalid_api_key")

    async def read_body(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limits.max_body_bytes:
            raise ApiError(413, f"the body is over {limits.max_body_bytes} bytes", code="body_too_large")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limits.max_body_bytes:
                raise ApiError(413, f"the body is over {limits.max_body_bytes} bytes", code="body_too_large")
        return bytes(body)

    async def read_json(request: Request) -> Any:
        try:
            body = await asyncio.wait_for(read_body(request), timeout=limits.body_timeout_s)
        except TimeoutError:
            raise ApiError(408, f"the body did not arrive within {limits.body_timeout_s:g} s",
                           code="body_timeout") from None
        except ClientDisconnect:
            raise ApiError(400, "the client disconnected before sending the whole body") from None
        depth = json_depth(body)
        if depth > MAX_JSON_DEPTH:
            raise ApiError(400, f"the body nests {depth} levels deep; this server takes at most {MAX_JSON_DEPTH}",
                           code="invalid_json")
        try:
            return json.loads(body, parse_constant=_reject_constant)
        except (json.JSONDecodeError, UnicodeDecodeError, ValueError, RecursionError) as e:
            raise ApiError(400, f"the body is not valid JSON: {e}", code="invalid_json") from None

    def submit(req: _Common, prompt: Prompt, *, stream: bool) -> Job:
        if req.model != model_name:
            raise ApiError(404, f"the model {req.model!r} does not exist: this server serves {model_name!r}",
                           param="model", code="model_not_found")
        if prompt.chars > limits.max_prompt_chars:
            raise ApiError(400, f"the prompt has {prompt.chars} characters; this server takes at most "
                           f"{limits.max_prompt_chars}", code="context_length_exceeded")
        config = req.to_config(limits=limits, defaults=defaults)
        try:
            if stream:
                return pool.submit_stream(prompt, config, timeout=limits.timeout_s, tokens=True)
            return pool.submit(prompt, config, timeout=limits.timeout_s)
        except Overloaded as e:
            metrics.rejected.labels(reason="overloaded").inc()
            raise ApiError(429, str(e), code="queue_full", retry_after=RETRY_AFTER_S) from None
        except PoolClosed as e:
            metrics.rejected.labels(reason="closed").inc()
            raise ApiError(503, str(e), code="shutting_down", retry_after=RETRY_AFTER_S) from None
        except ConfigError as e:
            raise ApiError(400, str(e), code="invalid_value") from None

    def run_error(e: BaseException) -> ApiError:
        """A run's failure as an API error: 4xx where the request is at fault, 503/504 for cancelled runs."""
        if isinstance(e, CacheLimitError):
            return ApiError(400, str(e), code="context_length_exceeded")
        if isinstance(e, ConfigError | TokenizerError):  # the template refused the messages, a bad value
            return ApiError(400, str(e), code="invalid_value")
        if isinstance(e, RunTimeout):
            return ApiError(504, f"{e} of {limits.timeout_s:g} s", code="timeout")
        if isinstance(e, Cancelled):
            code = "shutting_down" if pool.closed else "cancelled"
            return ApiError(503, str(e), code=code, retry_after=RETRY_AFTER_S)
        log.error("run failed: %s: %s", type(e).__name__, e, exc_info=e)
        return ApiError(500, f"internal error: {type(e).__name__}: {e}", code="internal_error")

    async def wait(job: Job, request: Request) -> RunResult:
        """Await the run (never past its deadline); cancel it if the client disconnects meanwhile."""
        waiting = asyncio.ensure_future(pool.wait(job))
        try:
            while True:
                finished, _ = await asyncio.wait({waiting}, timeout=0.5)
                if finished:
                    return waiting.result()
                if await request.is_disconnected():
                    job.cancel("the client disconnected")
        finally:
            waiting.cancel()

    def note(req: _Common, request: Request) -> dict[str, Any]:
        ignored = req.ignored()
        if ignored:
            log.warning("%s: ignoring field(s) this server does not honour: %s", request.url.path, ", ".join(ignored))
            return {"ignored": ignored}
        return {}

    async def completion(request: Request, *, chat: bool) -> Response:
        check_auth(request)
        req = parse(ChatRequest if chat else CompletionRequest, await read_json(request))
        assert isinstance(req, ChatRequest | CompletionRequest)
        prompt = req.prompt() if isinstance(req, ChatRequest) else req.prompt_text()
        extra = note(req, request)
        job = submit(req, prompt, stream=req.stream)
        env = Envelope(chat=chat, model=model_name)
        if req.stream:
            return StreamingResponse(stream(job, req, env, extra, request), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        try:
            result = await wait(job, request)
        except asyncio.CancelledError:
            job.cancel("the request was cancelled")
            raise
        except Exception as e:  # noqa: BLE001 - every run failure becomes an error body
            raise run_error(e) from None
        text, stopped = cut_at_stop(result.text, req.stops())
        use = usage(prompt_tokens=job.prompt_tokens, result=result)
        metrics.observe_run(result=result, prompt_tokens=use["prompt_tokens"],
                            completion_tokens=use["completion_tokens"], queue_s=job.queue_seconds, first_token_s=None)
        request.state.tokens = use["total_tokens"]
        return JSONResponse(env.full(text=text, finish=finish_reason(result, stopped=stopped), usage=use,
                                     specreason={**summary(result, trace=req.trace), **extra}))

    async def stream(job: Job, req: _Common, env: Envelope, extra: dict[str, Any], request: Request
                     ) -> AsyncIterator[str]:
        """SSE: a role chunk; text chunks as the steps are written (token deltas, then each step's rest at its
        commit); a finish chunk (+ usage chunk); then [DONE]. ": keep-alive" comments while nothing is written.

        A stop string may straddle two deltas: the last (longest stop - 1) characters are held back until the
        next text shows they are not the start of one.
        """
        stops = req.stops()
        hold = max((len(s) for s in stops), default=1) - 1
        full, sent, stopped = "", 0, False
        step_text = ""  # text of the step being written, streamed so far
        first_token_s: float | None = None
        yield env.chunk(first=True)

        def emit(*, end: int | None = None, info: dict[str, Any]) -> str | None:
            nonlocal sent
            cut_end = len(full) - hold if end is None else end
            text = full[sent:cut_end] if cut_end > sent else ""
            sent = max(sent, cut_end)
            if not text and not info.get("step_end"):
                return None
            return env.chunk(text=text, specreason=info)

        try:
            async for item in pool.iterate(job, heartbeat=limits.keepalive_s):
                if item is None:
                    yield ": keep-alive\n\n"
                    continue
                if isinstance(item, TokenDelta | StepTrace):
                    if isinstance(item, TokenDelta):
                        new, info = item.text, {"step": item.step, "author": item.author}
                        step_text += new
                    else:
                        # The step's text past what its deltas streamed (all of it for an accepted draft).
                        new = item.text[len(step_text):] if item.text.startswith(step_text) else ""
                        info = {"step": item.index, "author": item.author, "step_end": True}
                        step_text = ""
                    if first_token_s is None and new:
                        first_token_s = time.perf_counter() - job.submitted
                    full += new
                    cut, stopped = cut_at_stop(full, stops)
                    if stopped:
                        full = cut
                    chunk = emit(end=len(full) if stopped else None, info=info)
                    if chunk is not None:
                        yield chunk
                    if stopped:
                        job.cancel("a stop string was reached")
                        break
                    continue
                result = item
                assert isinstance(result, RunResult)
                if full[sent:]:
                    yield env.chunk(text=full[sent:])
                use = usage(prompt_tokens=job.prompt_tokens, result=result)
                metrics.observe_run(result=result, prompt_tokens=use["prompt_tokens"],
                                    completion_tokens=use["completion_tokens"], queue_s=job.queue_seconds,
                                    first_token_s=first_token_s)
                request.state.tokens = use["total_tokens"]
                yield env.chunk(finish=finish_reason(result, stopped=False),
                                specreason={**summary(result, trace=req.trace), **extra})
                if req.stream_options is not None and req.stream_options.include_usage:
                    yield env.chunk(usage=use, no_choices=True)
            if stopped:
                yield env.chunk(finish="stop")
        except Exception as e:  # noqa: BLE001 - headers are sent: the error travels as an SSE event
            yield sse(run_error(e).body())
        yield sse("[DONE]")

    async def chat_completions(request: Request) -> Response:
        return await completion(request, chat=True)

    async def completions(request: Request) -> Response:
        return await completion(request, chat=False)

    async def models(request: Request) -> Response:
        check_auth(request)
        return JSONResponse({"object": "list", "data": [
            {"id": model_name, "object": "model", "created": 0, "owned_by": "specreason"}]})

    async def health(request: Request) -> Response:
        alive = pool.alive
        status = "shutting_down" if pool.closed else "ok" if alive == pool.workers else "degraded"
        return JSONResponse({"status": status, "workers": pool.workers, "workers_alive": alive,
                             "worker_restarts": pool.worker_restarts, "queue_depth": pool.queue_depth,
                             "queue_size": pool.queue_size, "running": pool.running},
                            status_code=200 if status == "ok" else 503)

    async def metrics_route(request: Request) -> Response:
        return Response(metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")

    routes = [Route("/v1/chat/completions", chat_completions, methods=["POST"]),
              Route("/v1/completions", completions, methods=["POST"]),
              Route("/v1/models", models, methods=["GET"]),
              Route("/health", health, methods=["GET"]),
              Route("/metrics", metrics_route, methods=["GET"])]

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        if close_pool:  # the runner has already closed it (see runner.py); this covers other ASGI servers
            await asyncio.to_thread(pool.close, grace=shutdown_grace_s)

    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.pool, app.state.metrics, app.state.shutdown_grace_s = pool, metrics, shutdown_grace_s

    paths = {r.path for r in routes}

    class Measure:
        """Pure ASGI middleware (no body buffering): counts and times requests, writes the access log."""

        def __init__(self, inner: Any) -> None:
            self.inner = inner

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] != "http":
                return await self.inner(scope, receive, send)
            start, status = time.perf_counter(), [500]
            scope.setdefault("state", {})

            async def send_and_note(message: Any) -> None:
                if message["type"] == "http.response.start":
                    status[0] = message["status"]
                await send(message)

            try:
                await self.inner(scope, receive, send_and_note)
            finally:
                # A streamed response is timed to its last byte: inner returns once the body is sent.
                seconds = time.perf_counter() - start
                endpoint = scope["path"] if scope["path"] in paths else "other"
                metrics.requests.labels(endpoint=endpoint, status=str(status[0])).inc()
                metrics.latency.labels(endpoint=endpoint).observe(seconds)
                client = scope.get("client") or ("-", 0)
                access_log.info("%s %s %s %d %.1f ms tokens=%s", client[0], scope["method"], scope["path"],
                                status[0], seconds * 1e3, scope["state"].get("tokens", "-"),
                                extra={"client": client[0], "method": scope["method"], "path": scope["path"],
                                       "status": status[0], "latency_ms": round(seconds * 1e3, 3),
                                       "tokens": scope["state"].get("tokens")})

    def internal(request: Request, e: Exception) -> Response:
        log.error("unhandled error on %s: %s: %s", request.url.path, type(e).__name__, e, exc_info=e)
        return ApiError(500, f"internal error: {type(e).__name__}: {e}", code="internal_error").response()

    app.add_middleware(Measure)
    app.add_exception_handler(ApiError, lambda request, e: e.response())
    app.add_exception_handler(404, lambda request, e: ApiError(404, f"no route {request.url.path}").response())
    app.add_exception_handler(405, lambda request, e: ApiError(
        405, f"{request.method} is not allowed on {request.url.path}").response())
    app.add_exception_handler(Exception, internal)
    return app
