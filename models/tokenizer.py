"""A character-level tokenizer for the built-in task, readable by `tokenizers` and by `transformers`.

Vocabulary: four special tokens, every printable ASCII character and "\\n" (so any judge prompt the runtime
builds is representable), plus one merged token for the step delimiter "\\n\\n", so that a step boundary is a
single token id the runtime can stop on. It is a BPE model with one merge ("\\n" + "\\n"); with no
pre-tokenizer the whole text is one word, which is fine for the short texts of this task.

No post-processor: encoding never adds BOS by itself, in either library. The chat template writes the BOS
token, and :func:`encode_prompt` prepends it, so `encode(text)` gives the same ids with or without
``add_special_tokens``.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders
from tokenizers.models import BPE

from .task import STEP_DELIMITER, format_prompt

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)  # ids 0, 1, 2, 3
PAD_ID, BOS_ID, EOS_ID, UNK_ID = range(4)

# Renders the last user message exactly as task.format_prompt does (checked by a test).
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}Q: {{ m['content'] }}\n{% endif %}{% endfor %}"
)


def _vocab() -> dict[str, int]:
    chars = ["\n"] + [chr(c) for c in range(32, 127)]
    tokens = [*SPECIAL_TOKENS, *chars, STEP_DELIMITER]
    return {tok: i for i, tok in enumerate(tokens)}


def build_tokenizer() -> Tokenizer:
    tok = Tokenizer(BPE(vocab=_vocab(), merges=[("\n", "\n")], unk_token=UNK))
    tok.decoder = decoders.Fuse()  # concatenate pieces; no spaces between characters
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return tok


def tokenizer_config() -> dict:
    """tokenizer_config.json for transformers' AutoTokenizer (PreTrainedTokenizerFast)."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "unk_token": UNK,
        "padding_side": "left",  # batched greedy generation needs left padding
        "model_max_length": 256,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
        "step_delimiter": STEP_DELIMITER,
    }


def save_tokenizer(out_dir: str | Path) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    build_tokenizer().save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(), indent=2) + "\n")
    special = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "unk_token": UNK}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def encode_prompt(tok: Tokenizer, question: str) -> list[int]:
    """Token ids of BOS + format_prompt(question); the model's input before the solution."""
    return [BOS_ID, *tok.encode(format_prompt(question)).ids]
