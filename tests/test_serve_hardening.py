"""Issue 11's server and run-loop findings, each reproduced as a test, and a fuzz of hostile requests."""

from __future__ import annotations

import dataclasses
import json
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from specreason_rt.cancel import RunTimeout
from specreason_rt.config import make_config
from specreason_rt.errors import CacheLimitError, ConfigError
from specreason_rt.pool import ReasonerPool
from specreason_rt.reasoner import ConcurrentUse, Reasoner, default_kv_limit_bytes, machine_memory_bytes
from specreason_rt.serve.app import create_app
from specreason_rt.serve.runner import ServerThread
from specreason_rt.serve.schema import Limits
from specreason_rt.tokenizer import TokenizerError

KEY = "sk-hardening"
CHAT = {"model": "specreason", "messages": [{"role": "user", "content": "12+34"}]}
# The built-in template, plus a refusal of one word: a template error raised while rendering a request.
POISON_TEMPLATE = ("{% for m in messages %}{% if 'poison' in m['content'] %}{{ raise_exception('no poison') }}"
                   "{% endif %}{% endfor %}{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}"
                   "Q: {{ m['content'] }}\n{% endif %}{% endfor %}")


@pytest.fixture(scope="module")
def server(builtin_bundle: Path) -> Iterator[tuple[str, ReasonerPool]]:
    """The server with the CLI's defaults (one batching worker, max_batch 16), short connection timeouts."""
    pool = ReasonerPool(builtin_bundle, workers=1, max_batch=16, queue_size=64)
    for tok in pool.bundle.tokenizers.values():
        tok.set_chat_template(POISON_TEMPLATE)
    limits = Limits(max_tokens=128, timeout_s=60, body_timeout_s=1.0)
    srv = ServerThread(create_app(pool=pool, api_key=KEY, limits=limits), header_timeout_s=1.0,
                       max_connections=64).start()
    yield srv.url, pool
    srv.stop()


@pytest.fixture(scope="module")
def http(server: tuple[str, ReasonerPool]) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server[0], headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as c:
        yield c


def _valid(http: httpx.Client) -> None:
    """The server still answers a valid request, and its worker lives."""
    res = http.post("/v1/chat/completions", json=CHAT)
    assert res.status_code == 200, res.text
    health = http.get("/health").json()
    assert health["status"] == "ok" and health["workers_alive"] == health["workers"], health


# -- 1. invalid Unicode and template errors fail the request only ---------------------------------------------
@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/completions"])
def test_lone_surrogate_is_a_400_and_the_worker_lives(http: httpx.Client, route: str, stream: bool) -> None:
    text = '"1+1\\ud800"'
    body = (f'{{"model": "specreason", "stream": {str(stream).lower()}, '
            + (f'"messages": [{{"role": "user", "content": {text}}}]}}' if "chat" in route else f'"prompt": {text}}}'))
    res = http.post(route, content=body, headers={"Content-Type": "application/json"})
    assert res.status_code == 400 and "not valid Unicode" in res.json()["error"]["message"], res.text
    _valid(http)


def test_a_template_error_fails_that_request_only(http: httpx.Client) -> None:
    for stream in (False, True):
        res = http.post("/v1/chat/completions", json={**CHAT, "stream": stream,
                                                      "messages": [{"role": "user", "content": "poison 1+1"}]})
        if stream:  # refused while the run starts: the error arrives as an SSE event, then [DONE]
            assert res.status_code == 200 and "no poison" in res.text and res.text.rstrip().endswith("[DONE]")
        else:
            assert res.status_code == 400 and "no poison" in res.json()["error"]["message"], res.text
        _valid(http)


def test_a_template_that_does_not_compile_stops_the_start(builtin_bundle: Path) -> None:
    pool = ReasonerPool(builtin_bundle, workers=1)
    try:
        tok = pool.bundle.tokenizers["verifier"]
        tok.generation = dataclasses.replace(tok.generation, chat_template="{% if %}")
        with pytest.raises(TokenizerError, match="does not compile"):
            create_app(pool=pool)
    finally:
        pool.close(grace=0)


def test_the_problem_check_is_typed_in_the_runtime(builtin_bundle: Path) -> None:
    """The cause of the CLI traceback for `specreason run $'37+\\xff'` (argv decodes it to a lone surrogate)."""
    with pytest.raises(ConfigError, match="not valid Unicode"):
        Reasoner(builtin_bundle).run("37+\udcff")


def test_a_stuck_worker_cannot_hold_a_waiter_past_the_deadline(builtin_bundle: Path) -> None:
    pool = ReasonerPool(builtin_bundle, workers=1, deadline_slack_s=0.5)
    release = threading.Event()
    try:
        job = pool.submit("12+34", make_config(seed=0), on_step=lambda step: release.wait(30), timeout=0.5)
        start = time.monotonic()
        with pytest.raises(RunTimeout):
            job.result()
        assert time.monotonic() - start < 10
    finally:
        release.set()
        pool.close(grace=5)


# -- 2. trace through the server with its defaults ----------------------------------------------------------------
def test_trace_true_with_the_batching_defaults(http: httpx.Client) -> None:
    res = http.post("/v1/chat/completions", json={**CHAT, "trace": True})
    assert res.status_code == 200, res.text
    trace = res.json()["specreason"]["trace"]
    assert all(isinstance(c["accepted"], bool) for s in trace["steps"] for c in s["candidates"])
    res = http.post("/v1/chat/completions", json={**CHAT, "trace": True, "stream": True})
    assert res.status_code == 200 and '"trace"' in res.text and '"error"' not in res.text


# -- 5. stalled connections are closed ---------------------------------------------------------------------------
def _connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def _closed_by_server(sock: socket.socket, *, within: float) -> bytes | None:
    """What the server sent before closing the socket, or None if it is still open after `within` s."""
    sock.settimeout(within)
    got = b""
    try:
        while chunk := sock.recv(4096):
            got += chunk
    except TimeoutError:
        return None
    except ConnectionResetError:
        pass
    return got


def test_stalled_headers_and_bodies_are_closed(server: tuple[str, ReasonerPool], http: httpx.Client) -> None:
    url = server[0]
    silent = [_connect(url) for _ in range(10)]  # connect, send nothing
    partial = [_connect(url) for _ in range(10)]  # half a request line
    for s in partial:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-")
    body = _connect(url)  # headers, then a body that stops short
    body.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                 "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"model\"".encode())
    _valid(http)  # served while they stall
    for s in silent + partial:
        assert _closed_by_server(s, within=5) is not None
    answer = _closed_by_server(body, within=5)
    assert answer is not None and b" 408 " in answer.split(b"\r\n")[0], answer
    _valid(http)


def test_past_max_connections_a_503(builtin_bundle: Path) -> None:
    pool = ReasonerPool(builtin_bundle, workers=1)
    srv = ServerThread(create_app(pool=pool), max_connections=3, header_timeout_s=30).start()
    held = [_connect(srv.url) for _ in range(3)]
    try:
        time.sleep(0.2)
        assert httpx.get(f"{srv.url}/health").status_code == 503
        for s in held:
            s.close()
        time.sleep(0.2)
        assert httpx.get(f"{srv.url}/health").status_code == 200
    finally:
        srv.stop()


# -- 6. shutdown under load: 503 with an OpenAI body and Retry-After ---------------------------------------------
def _post_or_error(url: str, body: dict) -> httpx.Response | httpx.TransportError:
    try:
        return httpx.post(url, json=body, timeout=60)
    except httpx.TransportError as e:
        return e


def test_shutdown_under_load_answers_503_with_retry_after(builtin_bundle: Path) -> None:
    pool = ReasonerPool(builtin_bundle, workers=1, queue_size=64)
    admitted: set[str] = set()  # the prompts the server took in: each of these must get an HTTP answer
    submit = pool.submit

    def recording_submit(prompt, config, **kw):  # type: ignore[no-untyped-def]
        admitted.add(prompt.raw)
        return submit(prompt, config, **kw)

    pool.submit = recording_submit  # type: ignore[method-assign]
    srv = ServerThread(create_app(pool=pool), graceful_s=0.5).start()
    body = {"model": "specreason", "strategy": "majority", "n_specs": 32, "max_tokens": 512}
    n = 48  # enough queued runs that the 0.5 s grace cannot finish them all, even for the fast built-in pair
    prompts = [f"{i}+{i}*3-7" for i in range(n)]
    with ThreadPoolExecutor(n) as ex:
        futures = [ex.submit(_post_or_error, f"{srv.url}/v1/completions", {**body, "prompt": p}) for p in prompts]
        # Most requests are in (the first ones may already be done: wait with a deadline, never for all of them).
        deadline = time.monotonic() + 30
        while len(admitted) < n - 8 and time.monotonic() < deadline:
            time.sleep(0.005)
        srv.stop()
        outcomes = dict(zip(prompts, (f.result() for f in futures), strict=True))
    # A client the server had not yet taken in when it closed its socket sees the connection refused or reset:
    # that is a fine answer. Every request the server did take in must get an HTTP answer.
    assert len(admitted) >= n // 2, f"only {len(admitted)} of {n} requests reached the pool"
    lost = {p: repr(outcomes[p]) for p in admitted if not isinstance(outcomes[p], httpx.Response)}
    assert not lost, f"admitted requests without an answer: {lost}"
    responses = [r for r in outcomes.values() if isinstance(r, httpx.Response)]
    refused = [r for r in responses if r.status_code != 200]
    assert refused, "every request finished within the grace: make them longer"
    for r in refused:
        assert r.status_code == 503 and r.headers["Retry-After"] == "1", (r.status_code, r.text)
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}


# -- 8. memory: a KV limit by default, bounded config values --------------------------------------------------------
def test_kv_memory_limit_and_config_bounds(builtin_bundle: Path) -> None:
    assert 0 < default_kv_limit_bytes() <= machine_memory_bytes() // 4
    assert default_kv_limit_bytes(share=2) == default_kv_limit_bytes() // 2
    with pytest.raises(ConfigError, match=r"candidates must be an integer in \[1, 1024\]"):
        make_config(**{"stepwise.candidates": 1_000_000})
    with pytest.raises(ConfigError, match="n_specs"):
        make_config(strategy="best_of_n", **{"search.n_specs": 1_000_000})
    with pytest.raises(ConfigError, match="beam_width"):
        make_config(strategy="tree", **{"search.beam_width": 1000})
    small = Reasoner(builtin_bundle, kv_limit_bytes=2**21)  # 2 MiB per cache (one 512-token branch needs 1.5)
    with pytest.raises(CacheLimitError, match="over the limit"):
        small.run("12+34", make_config(**{"stepwise.candidates": 1000}))
    assert small.run("12+34").text  # the Reasoner is still usable
    with pytest.raises(ConfigError):
        Reasoner(builtin_bundle, kv_limit_bytes=0)


# -- 12. tiny temperatures are greedy -------------------------------------------------------------------------------
def test_tiny_temperature_is_greedy_through_the_server(http: httpx.Client) -> None:
    greedy = http.post("/v1/completions", json={"model": "specreason", "prompt": "12+34", "temperature": 0,
                                                "strategy": "speculator"}).json()
    tiny = http.post("/v1/completions", json={"model": "specreason", "prompt": "12+34", "temperature": 1e-39,
                                              "strategy": "speculator"}).json()
    assert tiny["choices"][0]["text"] == greedy["choices"][0]["text"] and tiny["choices"][0]["text"].strip()


# -- 13. auth scheme -------------------------------------------------------------------------------------------------
def test_bearer_scheme_is_case_insensitive(server: tuple[str, ReasonerPool]) -> None:
    for scheme in ("Bearer", "bearer", "BEARER"):
        assert httpx.get(f"{server[0]}/v1/models", headers={"Authorization": f"{scheme} {KEY}"}).status_code == 200
    assert httpx.get(f"{server[0]}/v1/models", headers={"Authorization": f"Basic {KEY}"}).status_code == 401
    with pytest.raises(ConfigError):
        create_app(pool=server[1], api_key="")
    with pytest.raises(ConfigError):
        create_app(pool=server[1], api_key="clé")
    with pytest.raises(ConfigError):
        Limits(timeout_s=0)
    with pytest.raises(ConfigError):
        Limits(max_branches=0)


# -- 14. one Reasoner used by two threads at once --------------------------------------------------------------------
def test_concurrent_use_of_one_reasoner_raises(builtin_bundle: Path) -> None:
    reasoner = Reasoner(builtin_bundle)
    inside, release = threading.Event(), threading.Event()

    def hold(step: object) -> None:
        inside.set()
        release.wait(30)

    with ThreadPoolExecutor(1) as ex:
        first = ex.submit(reasoner.run, "12+34", make_config(seed=0), on_step=hold)
        assert inside.wait(30)
        with pytest.raises(ConcurrentUse, match="one problem at a time"):
            reasoner.run("5*6-11", make_config(strategy="best_of_n"))
        release.set()
        assert first.result().text
    assert reasoner.run("12+34", make_config(seed=0)).text == first.result().text  # usable again


# -- fuzz: hostile requests; after each one a valid request is still answered ---------------------------------------
_text = st.text(alphabet=st.characters(codec=None, categories=None), max_size=12)  # surrogates included


@st.composite
def _hostile(draw: st.DrawFn) -> tuple[str, bytes]:
    kind = draw(st.sampled_from(["unicode", "nesting", "garbage", "stall"]))
    if kind == "unicode":
        content = draw(_text)
        field = json.dumps(content, ensure_ascii=True)  # a lone surrogate becomes an escape JSON allows
        msgs = f'[{{"role": "user", "content": {field}}}]'
        stream = draw(st.booleans())
        return kind, f'{{"model": "specreason", "stream": {str(stream).lower()}, "messages": {msgs}}}'.encode()
    if kind == "nesting":
        depth = draw(st.integers(30, 3000))
        opener, closer = draw(st.sampled_from([("[", "]"), ('{"a":', "}")]))
        inner = opener * depth + "1" + closer * depth
        return kind, f'{{"model": "specreason", "messages": {inner}}}'.encode()
    if kind == "garbage":
        return kind, draw(st.binary(max_size=64))
    return kind, draw(st.sampled_from([b"POST /v1/chat/completions HTTP/1.1\r\nHost:", b"GET / HTTP/1.1\r\n", b"P"]))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=_hostile())
def test_fuzz_hostile_requests_never_stop_the_server(server: tuple[str, ReasonerPool], http: httpx.Client,
                                                     case: tuple[str, bytes]) -> None:
    kind, payload = case
    if kind == "stall":
        sock = _connect(server[0])
        sock.sendall(payload)  # left open: the server closes it after its header timeout
    else:
        res = http.post("/v1/chat/completions", content=payload, headers={"Content-Type": "application/json"})
        assert res.status_code < 500, res.text
        if res.status_code >= 400:
            assert set(res.json()["error"]) == {"message", "type", "param", "code"}
    res = http.post("/v1/chat/completions", json={**CHAT, "max_tokens": 8})
    assert res.status_code == 200, res.text

