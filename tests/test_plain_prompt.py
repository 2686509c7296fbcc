"""Models without a chat template (base models such as the Gemma-3-270M GGUF): the prompt is the plain text,
with the tokenizer's own special tokens, and the user is told so once per model, not once per prompt."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from specreason_rt.manifest import Generation
from specreason_rt.tokenizer import Tokenizer

from .test_cli import run

NOTICE = "no chat template; prompts are passed as plain text"


@pytest.fixture(scope="module")
def builtin_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from specreason_models.tokenizer import save_tokenizer

    out = tmp_path_factory.mktemp("plain") / "verifier"
    out.mkdir()
    save_tokenizer(out)
    return out


def _tokenizer(builtin_dir: Path, chat_template: str | None) -> Tokenizer:
    from specreason_models.tokenizer import BOS_ID, EOS_ID, PAD_ID

    generation = Generation(bos_id=BOS_ID, eos_ids=(EOS_ID,), pad_id=PAD_ID, chat_template=chat_template,
                            step_delimiter="\n\n")
    return Tokenizer(path=builtin_dir / "tokenizer.json", generation=generation)


def test_without_a_template_the_prompt_is_the_plain_text_said_once(builtin_dir: Path,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    tok = _tokenizer(builtin_dir, None)
    assert not tok.has_chat_template
    with caplog.at_level(logging.WARNING, logger="specreason_rt.tokenizer"):
        first = tok.encode_prompt("37+45*3")
        second = tok.encode_prompt("12-5")
    assert first == tok.encode("37+45*3") and second == tok.encode("12-5")
    notes = [r.getMessage() for r in caplog.records if NOTICE in r.getMessage()]
    assert notes == [f"verifier: the model has {NOTICE}"]


def test_with_a_template_the_prompt_is_the_rendered_chat_and_nothing_is_said(
        builtin_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    template = json.loads((builtin_dir / "tokenizer_config.json").read_text())["chat_template"]
    tok = _tokenizer(builtin_dir, template)
    with caplog.at_level(logging.WARNING, logger="specreason_rt.tokenizer"):
        ids = tok.encode_prompt("37+45*3")
    assert ids == tok.encode_chat([{"role": "user", "content": "37+45*3"}]) != tok.encode("37+45*3")
    assert not caplog.records


def test_cli_run_on_a_bundle_without_templates_says_it_once_per_model(builtin_bundle: Path, tmp_path: Path) -> None:
    bundle = tmp_path / "no-template"
    shutil.copytree(builtin_bundle, bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    for entry in manifest["models"].values():
        entry["generation"]["chat_template"] = None
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    res = run("run", "--bundle", str(bundle), "--strategy", "stepwise", "--preset", "efficient", "37+45*3")
    assert res.returncode == 0, res.stderr
    notes = [line for line in res.stderr.splitlines() if NOTICE in line]
    assert notes == [f"speculator: the model has {NOTICE}", f"verifier: the model has {NOTICE}"]
