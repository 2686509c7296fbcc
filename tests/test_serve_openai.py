"""Issue 12's OpenAI compatibility and operations, through the official openai client: multi-turn chat, ignored
standard fields, raw completions, token-level streaming, server-wide defaults, a chat-template override,
/metrics, logging and the start-up banner."""

from __future__ import annotations

import json
import logging
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from specreason_rt.cli import build_parser
from specreason_rt.cli.serve import _defaults
from specreason_rt.config import make_config
from specreason_rt.errors import ConfigError
from specreason_rt.pool import ReasonerPool
from specreason_rt.prompt import Prompt
from specreason_rt.reasoner import Reasoner
from specreason_rt.serve.app import create_app
from specreason_rt.serve.logs import JsonFormatter
from specreason_rt.serve.runner import ServerThread
from specreason_rt.serve.schema import Defaults, Limits

CONVERSATION = [{"role": "system", "content": "You add and multiply left to right."},
                {"role": "user", "content": "12+34"}, {"role": "assistant", "content": "Answer: 46"},
                {"role": "user", "content": "37+45*3"}]


@pytest.fixture(scope="module")
def server(builtin_bundle: Path) -> Iterator[str]:
    pool = ReasonerPool(builtin_bundle, workers=1, max_batch=16)
    srv = ServerThread(create_app(pool=pool, limits=Limits(keepalive_s=0.001))).start()
    yield srv.url
    srv.stop()


@pytest.fixture(scope="module")
def client(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key="none", max_retries=0)


@pytest.fixture(scope="module")
def reasoner(builtin_bundle: Path) -> Reasoner:
    return Reasoner(builtin_bundle)


def test_system_and_multi_turn_chat_through_the_template(client: openai.OpenAI, reasoner: Reasoner) -> None:
    alone = reasoner.run(Prompt.chat(CONVERSATION), make_config(seed=3))
    out = client.chat.completions.create(model="specreason", messages=CONVERSATION, seed=3)  # type: ignore[arg-type]
    assert out.choices[0].message.content == alone.text
    tok = reasoner.bundle.tokenizers["verifier"]
    assert out.usage is not None and out.usage.prompt_tokens == len(tok.encode_chat(CONVERSATION))
    # Earlier turns are context: the prompt differs from the last turn alone.
    assert out.usage.prompt_tokens > len(tok.encode_chat([CONVERSATION[-1]]))


def test_unknown_standard_fields_are_ignored_with_a_note(client: openai.OpenAI,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    with caplog.at_level(logging.WARNING, logger="specreason_rt.serve"):
        out = client.chat.completions.create(model="specreason", messages=[{"role": "user", "content": "12+34"}],
                                             presence_penalty=0.5, frequency_penalty=0.1, logprobs=True,
                                             logit_bias={"5": 1.0}, tools=tools,  # type: ignore[list-item]
                                             extra_body={"my_vendor_field": 1})
    ignored = (out.model_extra or {})["specreason"]["ignored"]
    assert ignored == ["presence_penalty", "frequency_penalty", "logprobs", "logit_bias", "tools", "my_vendor_field"]
    assert out.choices[0].message.content
    assert any("ignoring field(s)" in r.getMessage() and "tools" in r.getMessage() for r in caplog.records)
    with pytest.raises(openai.BadRequestError, match="presence_penalty"):
        client.chat.completions.create(model="specreason", messages=[{"role": "user", "content": "1+2"}],
                                       presence_penalty=5)


def test_completions_continue_the_raw_prompt(client: openai.OpenAI, reasoner: Reasoner) -> None:
    alone = reasoner.run(Prompt.text("37+45*3=82"), make_config(seed=1))
    out = client.completions.create(model="specreason", prompt="37+45*3=82", seed=1)
    assert out.choices[0].text == alone.text
    tok = reasoner.bundle.tokenizers["verifier"]
    assert out.usage is not None and out.usage.prompt_tokens == len(tok.encode("37+45*3=82"))
    assert out.usage.prompt_tokens < len(tok.encode_chat([{"role": "user", "content": "37+45*3=82"}]))


def test_token_level_streaming_with_step_boundaries(client: openai.OpenAI, reasoner: Reasoner,
                                                    server: str) -> None:
    # threshold above 9 rejects every draft: the verifier writes every step, token by token after the draft prefix
    # it agrees with (the speculator gets step 4 of this problem wrong, so that step has tokens of its own).
    config = make_config(seed=2, **{"stepwise.threshold": 10})
    alone = reasoner.run("52-29+93+11+16*2", config)
    chunks = list(client.chat.completions.create(
        model="specreason", messages=[{"role": "user", "content": "52-29+93+11+16*2"}], seed=2, stream=True,
        extra_body={"threshold": 10}))
    text = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(c.choices[0].delta.content or "" for c in text) == alone.text
    info = [(c.model_extra or {}).get("specreason") or {} for c in text]
    per_step = [sum(1 for i in info if i.get("step") == s) for s in range(len(alone.steps))]
    assert max(per_step) >= 2, per_step  # several chunks within one step
    ends = [(c.model_extra or {})["specreason"] for c in chunks
            if ((c.model_extra or {}).get("specreason") or {}).get("step_end")]
    assert [e["step"] for e in ends] == list(range(len(alone.steps)))
    # An accepted draft arrives once accepted, as the chunk that ends its step.
    accepted = list(client.chat.completions.create(
        model="specreason", messages=[{"role": "user", "content": "52-29+93+11+16*2"}], seed=2, stream=True,
        extra_body={"threshold": 0}))
    drafted = [(c.model_extra or {})["specreason"] for c in accepted
               if c.choices and c.choices[0].delta.content and (c.model_extra or {}).get("specreason")]
    assert drafted and all(d["author"] == "speculator" and d["step_end"] for d in drafted)
    # SSE keep-alive comments while nothing is written (this server sends one after 1 ms of silence).
    with httpx.stream("POST", f"{server}/v1/chat/completions", json={
            "model": "specreason", "messages": [{"role": "user", "content": "94-26-59"}], "stream": True}) as res:
        lines = list(res.iter_lines())
    assert ": keep-alive" in lines and "data: [DONE]" in lines


def test_server_wide_defaults_and_request_fields_win(builtin_bundle: Path, reasoner: Reasoner) -> None:
    pool = ReasonerPool(builtin_bundle, workers=1)
    defaults = Defaults(strategy="best_of_n", overrides={"search.n_specs": 3})
    srv = ServerThread(create_app(pool=pool, defaults=defaults)).start()
    try:
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="none", max_retries=0)
        out = client.chat.completions.create(model="specreason", messages=[{"role": "user", "content": "12+34"}],
                                             seed=4)
        alone = reasoner.run("12+34", make_config(strategy="best_of_n", seed=4, **{"search.n_specs": 3}))
        assert (out.model_extra or {})["specreason"]["strategy"] == "best_of_n"
        assert out.choices[0].message.content == alone.text
        mine = client.chat.completions.create(model="specreason", messages=[{"role": "user", "content": "12+34"}],
                                              extra_body={"strategy": "verifier"})
        assert (mine.model_extra or {})["specreason"]["strategy"] == "verifier"
    finally:
        srv.stop()
    with pytest.raises(ConfigError):
        Defaults(strategy="beam")


def test_defaults_from_flags_and_a_config_file(tmp_path: Path) -> None:
    toml = tmp_path / "serve.toml"
    toml.write_text('strategy = "best_of_n"\npreset = "efficient"\n[search]\nn_specs = 3\n[stepwise]\nthreshold = 5\n')
    args = build_parser().parse_args(["serve", "--bundle", "b", "--config", str(toml), "--threshold", "6",
                                      "--set", "search.n_specs=2"])
    d = _defaults(args)
    assert (d.strategy, d.preset) == ("best_of_n", "efficient")
    assert d.overrides == {"search.n_specs": 2, "stepwise.threshold": 6.0}  # flags win over the file
    yaml = tmp_path / "serve.yaml"
    yaml.write_text("strategy: tree\nsearch:\n  beam_width: 2\n")
    d = _defaults(build_parser().parse_args(["serve", "--bundle", "b", "--config", str(yaml), "--strategy",
                                             "stepwise"]))
    assert d.strategy == "stepwise" and d.overrides == {"search.beam_width": 2}
    toml.write_text("[search]\nbeam_width = 9999\n")
    with pytest.raises(ConfigError, match="beam_width"):
        _defaults(build_parser().parse_args(["serve", "--bundle", "b", "--config", str(toml)]))


def test_chat_template_override(builtin_bundle: Path, reasoner: Reasoner) -> None:
    template = "{{ bos_token }}{% for m in messages %}{{ m['role'] }} says: {{ m['content'] }}\n{% endfor %}"
    pool = ReasonerPool(builtin_bundle, workers=1)
    for tok in pool.bundle.tokenizers.values():
        tok.set_chat_template(template)
    srv = ServerThread(create_app(pool=pool)).start()
    try:
        out = httpx.post(f"{srv.url}/v1/chat/completions", json={
            "model": "specreason", "messages": [{"role": "user", "content": "12+34"}]}, timeout=60).json()
    finally:
        srv.stop()
    tok = reasoner.bundle.tokenizers["verifier"]
    bos = tok.token_string(tok.generation.bos_id) if tok.generation.bos_id is not None else ""
    assert out["usage"]["prompt_tokens"] == len(tok.encode(f"{bos}user says: 12+34\n", add_special_tokens=False))


def test_metrics_after_requests(client: openai.OpenAI, server: str) -> None:
    uses = []
    for stream in (True, False):
        if stream:
            chunks = list(client.chat.completions.create(
                model="specreason", messages=[{"role": "user", "content": "5*6-11"}], stream=True,
                stream_options={"include_usage": True}, extra_body={"threshold": 10}))
            uses.append(chunks[-1].usage)
        else:
            uses.append(client.completions.create(model="specreason", prompt="5*6-11").usage)
    text = httpx.get(f"{server}/metrics").text
    for name in ("specreason_time_to_first_token_seconds_bucket", "specreason_time_per_output_token_seconds_bucket",
                 "specreason_drafted_steps_total", "specreason_accepted_steps_total"):
        assert re.search(rf'^{name}\{{.*model="specreason"', text, re.M), name
    assert re.search(r"^process_resident_memory_bytes \d", text, re.M)
    count = float(re.search(r'^specreason_time_to_first_token_seconds_count\{model="specreason"\} (\S+)', text,
                            re.M).group(1))  # type: ignore[union-attr]
    assert count >= 1
    generated = float(re.search(r'^specreason_generation_tokens_total\{model="specreason"\} (\S+)', text,
                                re.M).group(1))  # type: ignore[union-attr]
    assert generated >= sum(u.completion_tokens for u in uses if u is not None)
    assert "role=" not in "".join(line for line in text.splitlines() if "generation_tokens" in line)


def test_json_log_lines() -> None:
    record = logging.LogRecord("specreason_rt.serve.access", logging.INFO, __file__, 1, "GET /health 200", (), None)
    record.status, record.path = 200, "/health"
    line = json.loads(JsonFormatter().format(record))
    assert line["status"] == 200 and line["path"] == "/health" and line["level"] == "info"


def test_banner_only_after_the_port_is_bound(builtin_bundle: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "specreason_rt.cli", "serve", "--bundle", str(builtin_bundle),
                               "--port", str(port)], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "on http://" not in proc.stdout, proc.stdout
    assert "Traceback" not in proc.stderr and "address already in use" in proc.stderr.lower(), proc.stderr
