"""Scale-out on Ray Serve: two replicas of the server on loopback, driven by the openai client."""

from __future__ import annotations

import importlib.util
import socket
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_two_replicas_answer_like_one_server(builtin_bundle: Path) -> None:
    ray = pytest.importorskip("ray")
    import httpx
    import openai
    from ray import cloudpickle, serve

    from specreason_rt.config import make_config
    from specreason_rt.reasoner import Reasoner

    spec = importlib.util.spec_from_file_location("specreason_ray_deployment",
                                                  ROOT / "runtime" / "ray_serve" / "deployment.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    cloudpickle.register_pickle_by_value(module)  # the replicas cannot import runtime/ by name
    port = _free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(module.build(bundle=str(builtin_bundle), replicas=2, num_cpus=1), route_prefix="/")
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        alone = Reasoner(builtin_bundle)
        replicas = set()
        for seed in range(16):
            raw = client.chat.completions.with_raw_response.create(
                model="specreason", messages=[{"role": "user", "content": "37+45*3"}], seed=seed)
            replicas.add(raw.headers["x-specreason-replica"])
            assert raw.parse().choices[0].message.content == alone.run("37+45*3", make_config(seed=seed)).text
        stream = client.chat.completions.create(model="specreason", messages=[{"role": "user", "content": "12+34"}],
                                                seed=0, stream=True)
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert text == alone.run("12+34", make_config(seed=0)).text
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model="specreason", messages=[{"role": "user", "content": "1"}],
                                           extra_body={"threshold": -1})
        assert httpx.get(f"http://127.0.0.1:{port}/health").json()["status"] == "ok"
        assert len(replicas) == 2, replicas  # Ray's proxy spread the requests over both replicas
    finally:
        serve.shutdown()
        ray.shutdown()
