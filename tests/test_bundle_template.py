"""Issue 11, finding 8 (templates): a bundle's chat template is input; rendering it is bounded in time and size."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

from specreason_rt.bundle import Bundle
from specreason_rt.cli import main as cli_main
from specreason_rt.manifest import load_manifest
from specreason_rt.tokenizer import MAX_TEMPLATE_OUTPUT_CHARS, Tokenizer, TokenizerError

HOSTILE = {
    "huge repetition": "{{ 'x' * 10**10 }}",
    "nested loops that print nothing": "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}",
    "endless output": "{% for i in range(99999) %}{% for j in range(99999) %}{{ j }}{% endfor %}{% endfor %}",
    "doubling with ~": "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}"
                       "{% endfor %}{{ ns.s|length }}",
    "doubling with +": "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}"
                       "{% endfor %}",
    "doubling with a filter": "{% set ns = namespace(s='x') %}{% for i in range(64) %}"
                              "{% set ns.s = ns.s|replace('x', 'xx') %}{% endfor %}",
    "doubling with a method": "{% set ns = namespace(s='x') %}{% for i in range(64) %}"
                              "{% set ns.s = ns.s.replace('x', 'xx') %}{% endfor %}",
    "a huge width": "{{ 'x'|center(10**9) }}",
    "a huge padding method": "{{ 'x'.ljust(10**9) }}",
    "a huge power": "{{ 7 ** 99999999 }}",
}
MESSAGES = [{"role": "user", "content": "37+45*3"}]


def tokenizer_with(bundle: Path, template: str) -> Tokenizer:
    entry = load_manifest(bundle).models["verifier"]
    return Tokenizer(path=bundle / entry.tokenizer,
                     generation=dataclasses.replace(entry.generation, chat_template=template))


@pytest.mark.parametrize("template", HOSTILE.values(), ids=HOSTILE.keys())
def test_hostile_templates_are_one_tokenizer_error(tiny_bundle: Path, template: str) -> None:
    with pytest.raises(TokenizerError, match="went past its bounds"):
        tokenizer_with(tiny_bundle, template).render_chat(MESSAGES)


def test_real_templates_render_as_before(tiny_bundle: Path) -> None:
    template = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] | trim }}"
                "{{ '\\n' ~ (m | tojson) }}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
    text = tokenizer_with(tiny_bundle, template).render_chat(MESSAGES * 3)
    assert text.count("<|user|>37+45*3") == 3 and text.endswith("<|assistant|>")
    big = "y" * (MAX_TEMPLATE_OUTPUT_CHARS // 2)
    assert len(tokenizer_with(tiny_bundle, "{{ messages[0].content }}").render_chat([{"role": "user",
                                                                                      "content": big}])) == len(big)


def test_a_bundle_with_a_hostile_template_fails_one_request_in_one_line(tmp_path: Path, tiny_bundle: Path,
                                                                        capsys) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    data = json.loads((bundle / "manifest.json").read_text())
    for entry in data["models"].values():
        entry["generation"]["chat_template"] = HOSTILE["nested loops that print nothing"]
    (bundle / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(TokenizerError, match="went past its bounds"):
        Bundle(bundle, roles=["verifier"]).tokenizers["verifier"].encode_chat(MESSAGES)
    assert cli_main(["generate", "--bundle", str(bundle), "--max-tokens", "2", "37+45*3"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("specreason: error: ") and len(err.strip().splitlines()) == 1
