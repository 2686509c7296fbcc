"""Architecture presets of the built-in pair, by name (like gpt-fast's ``ModelArgs.from_name``).

Why these sizes: at this scale a decode step costs roughly (ops per layer x layers) of per-op overhead plus
small matmuls, so the verifier (8 layers x 96) is 4x deeper and 1.5x wider than the speculator (2 layers x 64),
which makes it >= 5x slower per token in ONNX Runtime, as a 32B verifier is next to a 1.5B speculator.
The speculator has two layers because one-layer models could not even copy operands in pilots (an
induction-style lookup needs two); its small width is what leaves it making arithmetic mistakes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from transformers import LlamaConfig

from .tokenizer import BOS_ID, EOS_ID, PAD_ID, build_tokenizer


@dataclass(frozen=True)
class ModelPreset:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    lr: float  # peak AdamW learning rate used by the training recipe
    steps: int  # default training steps
    batch: int  # problems per step

    def __post_init__(self) -> None:
        if self.hidden % self.heads:
            raise ValueError(f"hidden {self.hidden} must be divisible by heads {self.heads}")
        if self.heads % self.kv_heads:
            raise ValueError(f"heads {self.heads} must be divisible by kv_heads {self.kv_heads}")


PRESETS: dict[str, ModelPreset] = {
    "speculator": ModelPreset(
        layers=2, hidden=64, heads=4, kv_heads=4, intermediate=192, lr=3e-3, steps=3000, batch=64
    ),
    "verifier": ModelPreset(layers=8, hidden=96, heads=4, kv_heads=2, intermediate=256, lr=2e-3, steps=4000, batch=64),
    # For tests of the recipe only: trains in seconds.
    "tiny": ModelPreset(layers=1, hidden=32, heads=2, kv_heads=1, intermediate=64, lr=3e-3, steps=80, batch=16),
}

MAX_POSITIONS = 512  # longest v2 prompt + solution is ~215 tokens; the runtime may add a judge prompt


def preset(name: str) -> ModelPreset:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; valid: {sorted(PRESETS)}")
    return PRESETS[name]


def llama_config(p: ModelPreset) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=build_tokenizer().get_vocab_size(),
        hidden_size=p.hidden,
        intermediate_size=p.intermediate,
        num_hidden_layers=p.layers,
        num_attention_heads=p.heads,
        num_key_value_heads=p.kv_heads,
        max_position_embeddings=MAX_POSITIONS,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,  # the vocabulary is tiny; the tied head costs nothing here
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        torch_dtype="float32",
    )


def preset_dict(p: ModelPreset) -> dict:
    return asdict(p)
