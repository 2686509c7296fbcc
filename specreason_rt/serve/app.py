"""The ASGI app: OpenAI-compatible routes over a ReasonerPool.

    POST /v1/chat/completions, /v1/completions   (JSON, or SSE with "stream": true)
    GET  /v1/models, /health, /metrics           (/health and /metrics need no API key)

Request path: 1. auth  2. read the body (bounded)  3. validate (schema.py)  4. submit to the pool (bounded queue:
429 + Retry-After when full, 503 while shutting down)  5. await the run (it is cancelled if the client goes
away or the timeout passes)  6. answer, or stream one SSE chunk per committed step. Every error is an OpenAI
error body; nothing a client sends makes the server stop serving.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..cancel import Cancelled, RunTimeout
from ..errors import CacheLimitError, ConfigError
from ..pool import Job, Overloaded, PoolClosed, ReasonerPool
from ..trace import RunResult, StepTrace
from .errors import ApiError
from .metrics import Metrics
from .responses import Envelope, cut_at_stop, finish_reason, sse, summary, usage
from .schema import ChatRequest, CompletionRequest, Limits, _Common, parse

RETRY_AFTER_S = 1  # a full queue drains in about one run time; clients back off and retry


def _reject_constant(name: str) -> None:
    """NaN and Infinity are not JSON (Python's parser accepts them by default)."""
    raise ValueError(f"{name} is not a JSON number")


def create_app(*, pool: ReasonerPool, model_name: str = "specreason", api_key: str | None = None,
               limits: Limits | None = None, close_pool: bool = True, shutdown_grace_s: float = 30.0) -> Starlette:
    """The app over `pool`; on shutdown it closes the pool (running runs get shutdown_grace_s to finish)."""
    limits = limits or Limits()
    metrics = Metrics(queue_depth=lambda: pool.queue_depth, running=lambda: pool.running)

    def check_auth(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'", code="invalid_api_key")

    async def read_json(request: Request) -> Any:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limits.max_body_bytes:
            raise ApiError(413, f"the body is over {limits.max_body_bytes} bytes", code="body_too_large")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limits.max_body_bytes:
                raise ApiError(413, f"the body is over {limits.max_body_bytes} bytes", code="body_too_large")
        try:
            return json.loads(body, parse_constant=_reject_constant)
        except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as e:
            raise ApiError(400, f"the body is not valid JSON: {e}", code="invalid_json") from None

    def submit(req: _Common, problem: str, *, stream: bool) -> Job:
        if req.model != model_name:
            raise ApiError(404, f"the model {req.model!r} does not exist: this server serves {model_name!r}",
                           param="model", code="model_not_found")
        if not problem.strip():
            raise ApiError(400, "the problem is empty", param="messages" if isinstance(req, ChatRequest) else "prompt")
        if len(problem) > limits.max_prompt_chars:
            raise ApiError(400, f"the prompt has {len(problem)} characters; this server takes at most "
                           f"{limits.max_prompt_chars}", code="context_length_exceeded")
        config = req.to_config(limits=limits)
        try:
            if stream:
                return pool.submit_stream(problem, config, timeout=limits.timeout_s)
            return pool.submit(problem, config, timeout=limits.timeout_s)
        except Overloaded as e:
            metrics.rejected.labels(reason="overloaded").inc()
            raise ApiError(429, str(e), code="queue_full", retry_after=RETRY_AFTER_S) from None
        except PoolClosed as e:
            metrics.rejected.labels(reason="closed").inc()
            raise ApiError(503, str(e), code="shutting_down", retry_after=RETRY_AFTER_S) from None

    def run_error(e: BaseException) -> ApiError:
        """A run's failure as an API error."""
        if isinstance(e, CacheLimitError):
            return ApiError(400, str(e), code="context_length_exceeded")
        if isinstance(e, ConfigError):
            return ApiError(400, str(e), code="invalid_value")
        if isinstance(e, RunTimeout):
            return ApiError(504, f"{e} of {limits.timeout_s:g} s", code="timeout")
        if isinstance(e, Cancelled):
            return ApiError(503, str(e), code="cancelled", retry_after=RETRY_AFTER_S)
        return ApiError(500, f"internal error: {type(e).__name__}: {e}", code="internal_error")

    def account(job: Job, result: RunResult, text_usage: dict[str, int]) -> None:
        metrics.observe_run(result=result, prompt_tokens=text_usage["prompt_tokens"],
                            completion_tokens=text_usage["completion_tokens"], queue_s=job.queue_seconds)

    async def wait(job: Job, request: Request) -> RunResult:
        """Await the run; cancel it if the client disconnects meanwhile."""
        done = asyncio.wrap_future(job.future)
        while True:
            finished, _ = await asyncio.wait({done}, timeout=0.5)
            if finished:
                return done.result()
            if await request.is_disconnected():
                job.cancel("the client disconnected")

    async def completion(request: Request, *, chat: bool) -> Response:
        check_auth(request)
        req = parse(ChatRequest if chat else CompletionRequest, await read_json(request))
        assert isinstance(req, ChatRequest | CompletionRequest)
        job = submit(req, req.problem(), stream=req.stream)
        env = Envelope(chat=chat, model=model_name)
        if req.stream:
            return StreamingResponse(stream(job, req, env), media_type="text/event-stream",
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
        account(job, result, use)
        return JSONResponse(env.full(text=text, finish=finish_reason(result, stopped=stopped), usage=use,
                                     specreason=summary(result, trace=req.trace)))

    async def stream(job: Job, req: _Common, env: Envelope) -> AsyncIterator[str]:
        """SSE: a role chunk, one chunk per committed step, a finish chunk (+ usage chunk), then [DONE].

        A stop string may straddle two steps: the last (longest stop - 1) characters are held back until the
        next step shows they are not the start of one.
        """
        stops = req.stops()
        hold = max((len(s) for s in stops), default=1) - 1
        full, sent, stopped = "", 0, False
        yield env.chunk(first=True)
        try:
            async for item in pool.iterate(job):
                if isinstance(item, StepTrace):
                    full += item.text
                    cut, stopped = cut_at_stop(full, stops)
                    end = len(cut) if stopped else max(len(full) - hold, sent)
                    if end > sent:
                        yield env.chunk(text=full[sent:end])
                        sent = end
                    if stopped:
                        job.cancel("a stop string was reached")
                        break
                    continue
                result = item
                if full[sent:]:
                    yield env.chunk(text=full[sent:])
                use = usage(prompt_tokens=job.prompt_tokens, result=result)
                account(job, result, use)
                yield env.chunk(finish=finish_reason(result, stopped=False),
                                specreason=summary(result, trace=req.trace))
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
        status = 503 if pool.closed else 200
        return JSONResponse({"status": "shutting_down" if pool.closed else "ok", "workers": pool.workers,
                             "queue_depth": pool.queue_depth, "queue_size": pool.queue_size,
                             "running": pool.running}, status_code=status)

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
        if close_pool:  # uvicorn has let in-flight requests finish (or cancelled them) before this
            await asyncio.to_thread(pool.close, grace=shutdown_grace_s)

    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.pool, app.state.metrics = pool, metrics

    paths = {r.path for r in routes}

    class Measure:
        """Pure ASGI middleware (no body buffering): counts requests by status and times them."""

        def __init__(self, inner: Any) -> None:
            self.inner = inner

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] != "http":
                return await self.inner(scope, receive, send)
            start, status = time.perf_counter(), [500]

            async def send_and_note(message: Any) -> None:
                if message["type"] == "http.response.start":
                    status[0] = message["status"]
                await send(message)

            try:
                await self.inner(scope, receive, send_and_note)
            finally:
                # A streamed response is timed to its last byte: inner returns once the body is sent.
                endpoint = scope["path"] if scope["path"] in paths else "other"
                metrics.requests.labels(endpoint=endpoint, status=str(status[0])).inc()
                metrics.latency.labels(endpoint=endpoint).observe(time.perf_counter() - start)

    app.add_middleware(Measure)
    app.add_exception_handler(ApiError, lambda request, e: e.response())
    app.add_exception_handler(404, lambda request, e: ApiError(404, f"no route {request.url.path}").response())
    app.add_exception_handler(405, lambda request, e: ApiError(
        405, f"{request.method} is not allowed on {request.url.path}").response())
    app.add_exception_handler(Exception, lambda request, e: ApiError(
        500, f"internal error: {type(e).__name__}: {e}", code="internal_error").response())
    return app
