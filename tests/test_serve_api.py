"""The HTTP server through the official openai client and raw HTTP: every route, every bad input, a schema fuzz."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from specreason_rt.config import make_config
from specreason_rt.pool import ReasonerPool
from specreason_rt.prompt import Prompt
from specreason_rt.reasoner import Reasoner
from specreason_rt.serve.app import create_app
from specreason_rt.serve.runner import ServerThread
from specreason_rt.serve.schema import Limits

KEY = "sk-test-key"
LIMITS = Limits(max_body_bytes=4096, max_prompt_chars=200, max_tokens=128, max_branches=8, timeout_s=60)


@pytest.fixture(scope="module")
def server(builtin_bundle: Path) -> Iterator[str]:
    pool = ReasonerPool(builtin_bundle, workers=2, queue_size=64)
    srv = ServerThread(create_app(pool=pool, api_key=KEY, limits=LIMITS)).start()
    yield srv.url
    srv.stop()


@pytest.fixture(scope="module")
def client(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def http(server: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as c:
        yield c


def test_chat_matches_the_in_process_api(client: openai.OpenAI, builtin_bundle: Path) -> None:
    alone = Reasoner(builtin_bundle).run("37+45*3", make_config(strategy="stepwise", seed=4))
    out = client.chat.completions.create(model="specreason", messages=[{"role": "user", "content": "37+45*3"}],
                                         seed=4, extra_body={"strategy": "stepwise", "trace": True})
    assert out.choices[0].message.content == alone.text
    assert out.choices[0].finish_reason == "stop"
    assert out.usage is not None and out.usage.completion_tokens == sum(s.tokens for s in alone.steps)
    assert out.usage.prompt_tokens > 0
    extra = out.model_extra or {}
    assert extra["specreason"]["answer"] == alone.answer
    assert extra["specreason"]["trace"]["steps"][0]["text"] == alone.steps[0].text


def test_completions_and_options(client: openai.OpenAI, builtin_bundle: Path) -> None:
    # A completion continues the raw prompt (no chat template); without the "Q: " prompt the built-in pair writes
    # until the budget, so both runs get the same one.
    alone = Reasoner(builtin_bundle).run(Prompt.text("76-24*4"), make_config(
        strategy="best_of_n", preset="efficient", seed=2,
        **{"search.n_specs": 3, "search.stop_after": 2, "limits.max_tokens": 64}))
    out = client.completions.create(model="specreason", prompt="76-24*4", seed=2, max_tokens=64,
                                    extra_body={"strategy": "best_of_n", "preset": "efficient", "n_specs": 3,
                                                "stop_after": 2})
    assert out.choices[0].text == alone.text
    assert (out.model_extra or {})["specreason"]["strategy"] == "best_of_n"


def test_budget_reports_length(client: openai.OpenAI) -> None:
    out = client.completions.create(model="specreason", prompt="76-24*4", max_tokens=3,
                                    extra_body={"strategy": "verifier"})
    assert out.choices[0].finish_reason == "length"
    assert out.usage is not None and out.usage.completion_tokens <= 3


def test_stop_cuts_the_text(client: openai.OpenAI) -> None:
    full = client.completions.create(model="specreason", prompt="37+45*3", seed=1).choices[0].text
    cut = client.completions.create(model="specreason", prompt="37+45*3", seed=1, stop="\n\n")
    assert cut.choices[0].text == full.split("\n\n")[0] and cut.choices[0].finish_reason == "stop"


def test_chat_stream(client: openai.OpenAI, builtin_bundle: Path) -> None:
    alone = Reasoner(builtin_bundle).run("94-26-59", make_config(seed=5))
    stream = client.chat.completions.create(model="specreason", messages=[{"role": "user", "content": "94-26-59"}],
                                            seed=5, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(deltas) == alone.text
    ends = [(c.model_extra or {})["specreason"] for c in chunks
            if c.choices and ((c.model_extra or {}).get("specreason") or {}).get("step_end")]
    assert [e["step"] for e in ends] == list(range(len(alone.steps)))  # step boundaries are visible
    assert [e["author"] for e in ends] == [s.author for s in alone.steps]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == sum(s.tokens for s in alone.steps)


def test_completion_stream_with_a_stop_across_steps(client: openai.OpenAI) -> None:
    full = client.completions.create(model="specreason", prompt="37+45*3", seed=1).choices[0].text
    stop = full[full.index("\n\n") - 1:full.index("\n\n") + 3]  # straddles the end of the first step
    text = "".join(c.choices[0].text for c in client.completions.create(
        model="specreason", prompt="37+45*3", seed=1, stop=[stop], stream=True) if c.choices)
    assert text == full[:full.index(stop)]


def test_models_and_health_and_metrics(client: openai.OpenAI, http: httpx.Client) -> None:
    assert [m.id for m in client.models.list()] == ["specreason"]
    health = http.get("/health").json()
    assert health["status"] == "ok" and health["workers"] == 2
    text = http.get("/metrics").text
    for name in ("specreason_requests_total", "specreason_request_latency_seconds_bucket",
                 "specreason_generation_tokens_total", "specreason_drafted_steps_total", "specreason_queue_depth",
                 "specreason_running", "process_resident_memory_bytes"):
        assert name in text


def test_client_errors(client: openai.OpenAI, server: str) -> None:
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "1+2"}])
    with pytest.raises(openai.BadRequestError, match="unknown strategy|strategy"):
        client.chat.completions.create(model="specreason", messages=[{"role": "user", "content": "1+2"}],
                                       extra_body={"strategy": "beam"})
    with pytest.raises(openai.BadRequestError, match="n=1"):
        client.chat.completions.create(model="specreason", messages=[{"role": "user", "content": "1+2"}], n=2)
    bad_key = openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad_key.models.list()


CHAT = {"model": "specreason", "messages": [{"role": "user", "content": "1+2"}]}

BAD = {
    "malformed json": (b'{"model": "specreason", ', 400, "invalid_json"),
    "not an object": (b"[1, 2]", 400, None),
    "not utf-8": (b"\xff\xfe", 400, "invalid_json"),
    "missing messages": ({"model": "specreason"}, 400, None),
    "empty messages": ({**CHAT, "messages": []}, 400, None),
    "wrong type max_tokens": ({**CHAT, "max_tokens": "5"}, 400, None),
    "bool as int": ({**CHAT, "max_tokens": True}, 400, None),
    "wrong type stream": ({**CHAT, "stream": "yes"}, 400, None),
    "malformed ignored field": ({**CHAT, "logit_bias": "x"}, 400, None),
    "malformed penalty": ({**CHAT, "presence_penalty": 3}, 400, None),
    "unknown strategy": ({**CHAT, "strategy": "beam"}, 400, None),
    "unknown preset": ({**CHAT, "preset": "fast"}, 400, None),
    "threshold out of range": ({**CHAT, "threshold": 11}, 400, None),
    "negative temperature": ({**CHAT, "temperature": -1}, 400, None),
    "zero n_specs": ({**CHAT, "n_specs": 0}, 400, None),
    "stop_after past n_specs": ({**CHAT, "strategy": "best_of_n", "n_specs": 2, "stop_after": 3}, 400, None),
    "too many branches": ({**CHAT, "strategy": "best_of_n", "n_specs": 9}, 400, None),
    "max_tokens over the limit": ({**CHAT, "max_tokens": 129}, 400, None),
    "n > 1": ({**CHAT, "n": 3}, 400, None),
    "last message not user": ({**CHAT, "messages": [CHAT["messages"][0], {"role": "assistant", "content": "x"}]},
                              400, None),
    "lone surrogate": (b'{"model": "specreason", "messages": [{"role": "user", "content": "1+1\\ud800"}]}', 400,
                       None),
    "deep nesting": (b'{"model": "specreason", "x": ' + b"[" * 1000 + b"]" * 1000 + b"}", 400, "invalid_json"),
    "bad role": ({**CHAT, "messages": [{"role": "robot", "content": "x"}]}, 400, None),
    "empty problem": ({**CHAT, "messages": [{"role": "user", "content": "  "}]}, 400, None),
    "over-long prompt": ({**CHAT, "messages": [{"role": "user", "content": "1+" * 150}]}, 400,
                         "context_length_exceeded"),
    "unknown model": ({**CHAT, "model": "nope"}, 404, "model_not_found"),
    "body too large": ({**CHAT, "user": "x" * 5000}, 413, "body_too_large"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_is_a_4xx_with_an_openai_error_body(http: httpx.Client, name: str) -> None:
    body, status, code = BAD[name]
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    res = http.post("/v1/chat/completions", content=content, headers={"Content-Type": "application/json"})
    assert res.status_code == status, res.text
    err = res.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if code is not None:
        assert err["code"] == code
    assert http.get("/health").status_code == 200  # still serving


def test_bad_completion_prompt_and_routes(http: httpx.Client) -> None:
    assert http.post("/v1/completions", json={"model": "specreason", "prompt": ["a", "b"]}).status_code == 400
    assert http.post("/v1/completions", json={"model": "specreason", "prompt": 5}).status_code == 400
    assert http.get("/v1/chat/completions").status_code == 405
    res = http.get("/v1/nothing")
    assert res.status_code == 404 and "error" in res.json()
    assert httpx.get(f"{http.base_url}/v1/models").status_code == 401  # no key


# -- fuzz: random bodies over the request schema never make a 5xx ------------------------------------------------
_json = st.recursive(st.none() | st.booleans() | st.integers(-10**20, 10**20) | st.floats()
                     | st.text(max_size=20), lambda inner: st.lists(inner, max_size=3)
                     | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=6)
_problems = st.sampled_from(["37+45*3", "12+34", "5*6-11"]) | st.text(max_size=30)
_good = {
    "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "x"]),
                                                "content": _problems}), min_size=0, max_size=2),
    "prompt": _problems, "max_tokens": st.integers(-2, 300), "temperature": st.floats(-1, 3),
    "top_p": st.floats(-0.5, 1.5), "seed": st.integers(-5, 2**70), "stream": st.booleans(), "n": st.integers(0, 3),
    "stop": st.text(max_size=3) | st.lists(st.text(max_size=3), max_size=5),
    "strategy": st.sampled_from(["stepwise", "best_of_n", "tree", "speculator", "verifier", "majority", "x"]),
    "preset": st.sampled_from(["default", "efficient", "quality", "x"]), "n_specs": st.integers(-1, 12),
    "threshold": st.floats(-1, 12), "score_mode": st.sampled_from(["likelihood", "judge", "head", "x"]),
    "candidates": st.integers(0, 4), "max_depth": st.integers(0, 70), "beam_width": st.integers(0, 4),
    "tree_depth": st.integers(0, 3), "trace": st.booleans(), "stream_options": st.just({"include_usage": True}),
}


@st.composite
def _bodies(draw: st.DrawFn) -> dict:
    keys = draw(st.lists(st.sampled_from(sorted(_good)), unique=True, max_size=6))
    body = {"model": draw(st.sampled_from(["specreason", "other"]))}
    for k in keys:
        body[k] = draw(_good[k] | _json) if draw(st.integers(0, 4)) == 0 else draw(_good[k])
    if draw(st.booleans()):
        body[draw(st.text(max_size=6))] = draw(_json)
    return body


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=_bodies(), chat=st.booleans())
def test_fuzz_request_schema_never_5xx(http: httpx.Client, body: dict, chat: bool) -> None:
    # Serialised by Python's json, which writes NaN / Infinity literals: the server must refuse those too.
    res = http.post("/v1/chat/completions" if chat else "/v1/completions", content=json.dumps(body),
                    headers={"Content-Type": "application/json"})
    assert res.status_code < 500, res.text
    if res.status_code >= 400:
        assert set(res.json()["error"]) == {"message", "type", "param", "code"}
    elif body.get("stream") is True:
        assert res.text.rstrip().endswith("data: [DONE]") and '"error"' not in res.text, res.text


def test_nan_and_infinity_are_not_json(http: httpx.Client) -> None:
    for literal in ("NaN", "Infinity", "-Infinity"):
        res = http.post("/v1/completions", content='{"model": "specreason", "prompt": "1+1", "temperature": '
                        + literal + "}", headers={"Content-Type": "application/json"})
        assert res.status_code == 400 and res.json()["error"]["code"] == "invalid_json", res.text
