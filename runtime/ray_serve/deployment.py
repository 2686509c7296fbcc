"""Scale-out with Ray Serve: replicas of the specreason server behind Ray's HTTP proxy, with autoscaling.

    python runtime/ray_serve/deployment.py --bundle DIR [--replicas 2 | --autoscale 1 4] [--port 8000]

Each replica is a Ray actor holding one ReasonerPool and the same OpenAI-compatible app as `specreason serve`
(specreason_rt/serve/app.py): Ray's proxy spreads requests over the replicas, and every route, error body,
streaming response and limit behaves as on a single server. Ray does the cluster work (placement, health
checks, restarts, autoscaling on ongoing requests); nothing here is a home-made cluster.

Needs `pip install 'specreason-rt[serve]' 'ray[serve]'` on every node; the bundle path must exist on each node.
"""

from __future__ import annotations

import argparse
import asyncio
import os
from typing import Any

from ray import serve
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from specreason_rt.pool import ReasonerPool
from specreason_rt.serve.app import create_app
from specreason_rt.serve.schema import Limits


class SpecReasonReplica:
    """One replica: the app over its own pool, driven through a small ASGI bridge (Ray hands it a Request)."""

    def __init__(self, *, bundle: str, workers: int = 1, queue_size: int = 64, max_batch: int = 16,
                 model_name: str = "specreason", api_key: str | None = None,
                 limits: dict[str, Any] | None = None) -> None:
        self.pool = ReasonerPool(bundle, workers=workers, queue_size=queue_size, max_batch=max_batch)
        self.app = create_app(pool=self.pool, model_name=model_name, api_key=api_key,
                              limits=Limits(**(limits or {})), close_pool=False)
        self.replica = f"{os.getpid()}"

    async def __call__(self, request: Request) -> Response:
        body = await request.body()
        sent = False

        async def receive() -> dict[str, Any]:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await asyncio.Event().wait()  # the client stays connected as far as the app can tell
            return {"type": "http.disconnect"}

        start: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        chunks: asyncio.Queue[bytes | None] = asyncio.Queue()

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                start.set_result(message)
            elif message["type"] == "http.response.body":
                chunks.put_nowait(message.get("body", b""))
                if not message.get("more_body", False):
                    chunks.put_nowait(None)

        scope = {**request.scope, "type": "http"}
        task = asyncio.ensure_future(self.app(scope, receive, send))
        head = await start
        headers = {k.decode(): v.decode() for k, v in head["headers"] if k.lower() != b"content-length"}
        headers["x-specreason-replica"] = self.replica

        async def body_iter() -> Any:
            try:
                while (chunk := await chunks.get()) is not None:
                    yield chunk
            finally:
                if not task.done():
                    task.cancel()

        return StreamingResponse(body_iter(), status_code=head["status"], headers=headers)


def build(*, bundle: str, replicas: int | None = 2, autoscale: tuple[int, int] | None = None, workers: int = 1,
          queue_size: int = 64, max_batch: int = 16, num_cpus: float = 1.0, **kwargs: Any) -> Any:
    """The bound Ray Serve application: fixed replicas, or autoscaling between min and max replicas."""
    options: dict[str, Any] = {"ray_actor_options": {"num_cpus": num_cpus},
                               # Requests a replica takes before Ray queues at the proxy: the pool's own bound.
                               "max_ongoing_requests": workers + queue_size}
    if autoscale is not None:
        options["autoscaling_config"] = {"min_replicas": autoscale[0], "max_replicas": autoscale[1],
                                         # Each worker batches up to max_batch stepwise runs: scale out once
                                         # a replica holds about half of what its batches take.
                                         "target_ongoing_requests": max(workers * max_batch // 2, 1)}
    else:
        options["num_replicas"] = replicas
    deployment = serve.deployment(SpecReasonReplica, name="specreason").options(**options)
    return deployment.bind(bundle=bundle, workers=workers, queue_size=queue_size, max_batch=max_batch, **kwargs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", required=True)
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--autoscale", type=int, nargs=2, metavar=("MIN", "MAX"))
    p.add_argument("--workers", type=int, default=1, help="runs in parallel per replica")
    p.add_argument("--max-batch", type=int, default=16, help="stepwise runs batched per worker (1 = off)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    args = p.parse_args()
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(build(bundle=os.path.abspath(args.bundle), replicas=args.replicas,
                    autoscale=tuple(args.autoscale) if args.autoscale else None, workers=args.workers,
                    max_batch=args.max_batch),
              route_prefix="/", blocking=True)


if __name__ == "__main__":
    main()
