"""Decoder families as data: what each family changes, declared once, next to the config fields it understands.

One decoder (export/graph.py, `BranchDecoder`) serves every family. A family differs from Llama only in the
facts below; everything else (attention, rope, masking, windows, soft-caps, the cache contract) is shared code.
The family's own transformers submodules are reused for the parts that are plain functions of one tensor (norms,
the MLP, per-head q/k norms), so their epsilons, activations and gemma's (1 + w) weights are the source's own.

Field by field (`Family`):
    name            transformers `model_type` (the GGUF architecture name maps through GGUF_ARCHITECTURES)
    fields          config fields this family's math depends on and the decoder implements, beyond COMMON_FIELDS;
                    any other field transformers' config class defines is refused by name unless it is in
                    INERT_FIELDS (no effect on a forward pass in eval mode). Keep this list honest: a field goes
                    here only when the decoder implements it and a test in tests/test_families.py would fail
                    without it.
    block           residual wiring of one layer, in terms of the norms in `norms`:
                      "pre"       h += attn(input(h)); h += mlp(post_attn(h))                (llama)
                      "sandwich"  h += post_attn(attn(input(h))); h += post_ff(mlp(pre_ff(h))) (gemma2/3)
                      "post"      h += post_attn(attn(h)); h += post_ff(mlp(h))              (olmo2)
                      "parallel"  h += attn(input(h)) + mlp(post_attn(h) or input(h))        (gpt_neox, phi)
    parallel_field  config field that switches a "pre" family to "parallel" (gpt_neox use_parallel_residual)
    paths           attribute names: base (decoder body), embed, final_norm, lm_head, layers, attn, o_proj
    qkv             "split" (q_proj, k_proj, v_proj) | "fused" (phi3 qkv_proj: q, k, v concatenated) |
                    "interleaved" (gpt_neox query_key_value: per head [q | k | v])
    norms           {"input", "post_attn", "pre_ff", "post_ff"} -> layer attribute names (absent = no such norm)
    qk_norm         None | "head" (a norm over head_dim, per head: qwen3, gemma3, phi) | "head_first" (the same,
                    a module that takes [branches, heads, new, head_dim] with weights per head: stablelm) |
                    "whole" (a norm over the whole projected q / k: olmo2)
    qk_norm_modules attention attributes holding the q and k norms; qk_norm_field: config flag that turns the
                    qk-norm on (stablelm, phi qk_layernorm), None: always on
    embed_scale     config -> factor on the embeddings (gemma2: sqrt(hidden); gemma3's embedding module
                    scales by itself, so 1); residual_scale, logit_divisor likewise (granite)
    windows         "none" | "all" (config.sliding_window on every layer: mistral, phi3) | "layer_types"
                    (config.layer_types names "sliding_attention" layers: qwen2/3, gemma2/3, smollm3)
    local_rope      attribute of the base holding the rope module for sliding layers (gemma3's rotary_emb_local)
    no_rope_field   config field listing per layer 1 = rope, 0 = no rope (smollm3 no_rope_layers)
    mlp             (layer) -> the module applied as the layer's feed-forward: the pluggable slot, e.g. an MoE block
                    (export/moe.py: every expert computed, weighted by the scattered top-k routing)
    sinks           attention sinks (gpt_oss attn.sinks [heads]): a per-head logit in the softmax denominator

How to add a family:
    1. Add a `Family(...)` to FAMILIES: usually a copy of the nearest one with its differences set. List in
       `fields` exactly the config fields the decoder now implements for it.
    2. If the family needs math the decoder lacks, add it to BranchDecoder as a new datum here (not as an
       `if name == ...` in the decoder), and a value check in `check_config` for values it does not implement.
    3. Add a tiny seeded model to tests/test_families.py (TINY): it exports both attention variants, validates,
       compares greedy tokens with transformers past every window, and a feature-off test for the new math.
    4. Add the row to README's "Model families" table.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from .errors import ExportError
from .hf_compat import understood_renames
from .moe import gpt_oss_block, qwen3_moe_block

# Understood by every family: shapes, the rope (inverse frequencies and attention scaling are read from the
# source's own rotary module, so default / linear / llama3 / yarn scaling is exact; see ROPE_TYPES), tied
# embeddings (the lm_head module is used as is), and the fields of modules reused whole (norm eps, MLP activation
# and biases, attention biases).
COMMON_FIELDS = frozenset({
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "max_position_embeddings", "rope_theta", "rope_scaling",
    "tie_word_embeddings", "hidden_act", "hidden_activation", "rms_norm_eps", "layer_norm_eps", "attention_bias",
    "mlp_bias",
})
# No effect on an eval-mode forward pass: dropout, initialisation, cache flags, token ids, bookkeeping. Fields of
# transformers' PretrainedConfig base (generation defaults and the like) are inert too (see `_base_fields`).
INERT_FIELDS = frozenset({
    "initializer_range", "attention_dropout", "use_cache", "embd_pdrop", "resid_pdrop", "hidden_dropout",
    "classifier_dropout", "bos_token_id", "eos_token_id", "pad_token_id", "model_type", "architectures",
    "transformers_version", "_name_or_path", "dtype", "torch_dtype", "pretraining_tp",
    # folded by the config classes into the fields that are read (layer_types, partial_rotary_factor, rope_theta)
    "use_sliding_window", "max_window_layers", "_sliding_window_pattern", "sliding_window_pattern",
    "no_rope_layer_interval", "rotary_pct", "rotary_emb_base",
    # mixture of experts: the router's auxiliary loss and logits output exist for training only
    "output_router_logits", "router_aux_loss_coef",
})
# Rope types whose inverse frequencies do not depend on the sequence: read once from the source. "longrope"
# switches to its long factors past original_max_position_embeddings, selected per forward in the graph.
ROPE_TYPES = ("default", "linear", "llama3", "yarn", "longrope")
# GGUF `general.architecture` names that differ from transformers' model_type.
GGUF_ARCHITECTURES = {"gemma3": "gemma3_text"}
_DEFAULT_NORMS = {"input": "input_layernorm", "post_attn": "post_attention_layernorm"}
_SANDWICH_NORMS = {"input": "input_layernorm", "post_attn": "post_attention_layernorm",
                   "pre_ff": "pre_feedforward_layernorm", "post_ff": "post_feedforward_layernorm"}


def _one(config: Any) -> float:
    return 1.0


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    fields: frozenset[str] = frozenset()
    block: str = "pre"
    parallel_field: str | None = None
    paths: dict[str, str] = dataclasses.field(default_factory=lambda: dict(PATHS))
    qkv: str = "split"
    norms: dict[str, str] = dataclasses.field(default_factory=lambda: dict(_DEFAULT_NORMS))
    qk_norm: str | None = None
    qk_norm_modules: tuple[str, str] = ("q_norm", "k_norm")
    qk_norm_field: str | None = None
    embed_scale: Callable[[Any], float] = _one
    residual_scale: Callable[[Any], float] = _one
    logit_divisor: Callable[[Any], float] = _one
    windows: str = "none"
    local_rope: str | None = None
    no_rope_field: str | None = None
    mlp: Callable[[Any], Any] = lambda layer: layer.mlp
    sinks: bool = False

    def features(self, config: Any) -> list[str]:
        """Names of the math features this config turns on (recorded as architecture.features)."""
        out = []
        if self.qk_norm_in(config):
            out.append("qk_norm_whole" if self.qk_norm == "whole" else "qk_norm")
        if self.is_parallel(config):
            out.append("parallel")
        elif self.block != "pre":
            out.append(f"{self.block}_norm")
        if any(w is not None for w in layer_windows(family=self, config=config)):
            out.append("sliding_window")
        if getattr(config, "attn_logit_softcapping", None):
            out.append("attn_softcap")
        if getattr(config, "final_logit_softcapping", None):
            out.append("final_softcap")
        if self.embed_scale(config) != 1.0:
            out.append("embed_scale")
        if self.residual_scale(config) != 1.0 or self.logit_divisor(config) != 1.0:
            out.append("multipliers")
        if self.local_rope:
            out.append("local_rope")
        if self.no_rope_field:
            out.append("no_rope_layers")
        if float(getattr(config, "partial_rotary_factor", 1.0) or 1.0) < 1.0:
            out.append("partial_rotary")
        if getattr(config, "num_experts_per_tok", None):
            out.append("moe")
        if self.sinks:
            out.append("attention_sinks")
        rope = _rope_type(config)
        if rope != "default":
            out.append(f"rope_{rope}")
        if self.qkv != "split":
            out.append(f"{self.qkv}_qkv")
        return out

    def qk_norm_in(self, config: Any) -> str | None:
        """The qk-norm kind this config uses (None: none)."""
        if self.qk_norm_field and not getattr(config, self.qk_norm_field, False):
            return None
        return self.qk_norm

    def is_parallel(self, config: Any) -> bool:
        return self.block == "parallel" or bool(self.parallel_field and getattr(config, self.parallel_field, False))


PATHS = {"base": "model", "embed": "embed_tokens", "final_norm": "norm", "lm_head": "lm_head", "layers": "layers",
         "attn": "self_attn", "o_proj": "o_proj"}
_WINDOW = frozenset({"sliding_window", "layer_types"})

_GEMMA = frozenset({"query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping"}) | _WINDOW
_PARTIAL = frozenset({"partial_rotary_factor"})

FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("llama"),
    Family("mistral", fields=frozenset({"sliding_window"}), windows="all"),
    Family("qwen2", fields=_WINDOW, windows="layer_types"),
    Family("qwen3", fields=_WINDOW, windows="layer_types", qk_norm="head"),
    # gemma: (1 + w) RMSNorms are the source's own modules; attention scaling query_pre_attn_scalar**-0.5 is read
    # from the attention module (attn.scaling).
    Family("gemma2", fields=_GEMMA, block="sandwich", norms=_SANDWICH_NORMS, windows="layer_types",
           embed_scale=lambda c: c.hidden_size ** 0.5),  # Gemma2Model multiplies the embeddings itself
    # gemma3: its embedding module scales by itself; use_bidirectional_attention is understood as false only
    Family("gemma3_text", fields=_GEMMA | {"rope_local_base_freq", "use_bidirectional_attention"}, block="sandwich",
           norms=_SANDWICH_NORMS, windows="layer_types", qk_norm="head", local_rope="rotary_emb_local"),
    Family("phi3", fields=_PARTIAL | {"sliding_window", "original_max_position_embeddings"}, qkv="fused",
           windows="all"),
    Family("smollm3", fields=_WINDOW | {"no_rope_layers"}, windows="layer_types", no_rope_field="no_rope_layers"),
    Family("olmo2", block="post", norms={"post_attn": "post_attention_layernorm",
                                         "post_ff": "post_feedforward_layernorm"}, qk_norm="whole"),
    Family("granite", fields=frozenset({"embedding_multiplier", "residual_multiplier", "attention_multiplier",
                                        "logits_scaling"}),  # attention_multiplier is attn.scaling
           embed_scale=lambda c: c.embedding_multiplier, residual_scale=lambda c: c.residual_multiplier,
           logit_divisor=lambda c: c.logits_scaling),
    Family("stablelm", fields=_PARTIAL | {"use_parallel_residual", "qk_layernorm", "use_qkv_bias"},
           parallel_field="use_parallel_residual", qk_norm="head_first",
           qk_norm_modules=("q_layernorm", "k_layernorm"), qk_norm_field="qk_layernorm",
           norms={"input": "input_layernorm", "post_attn": "post_attention_layernorm"}),
    Family("gpt_neox", fields=_PARTIAL | {"use_parallel_residual"}, parallel_field="use_parallel_residual",
           qkv="interleaved", paths={**PATHS, "base": "gpt_neox", "embed": "embed_in", "final_norm": "final_layer_norm",
                                     "lm_head": "embed_out", "attn": "attention", "o_proj": "dense"}),
    Family("phi", fields=_PARTIAL | {"qk_layernorm"}, block="parallel", norms={"input": "input_layernorm"},
           qk_norm="head", qk_norm_modules=("q_layernorm", "k_layernorm"), qk_norm_field="qk_layernorm",
           paths={**PATHS, "final_norm": "final_layernorm", "o_proj": "dense"}),
    # mixture of experts (export/moe.py)
    Family("qwen3_moe", fields=frozenset({"sliding_window", "num_experts", "num_experts_per_tok", "norm_topk_prob",
                                          "moe_intermediate_size", "decoder_sparse_step", "mlp_only_layers"}),
           windows="all", qk_norm="head", mlp=lambda layer: qwen3_moe_block(layer.mlp)),
    Family("gpt_oss", fields=_WINDOW | {"num_local_experts", "num_experts_per_tok", "swiglu_alpha", "swiglu_limit"},
           windows="layer_types", sinks=True, mlp=lambda layer: gpt_oss_block(layer.mlp)),
)}
SUPPORTED_FAMILIES = tuple(FAMILIES)


def _rope_type(config: Any) -> str:
    scaling = getattr(config, "rope_scaling", None) or {}
    return str(scaling.get("rope_type", scaling.get("type", "default")))


def layer_windows(*, family: Family, config: Any) -> list[int | None]:
    """Per layer: the sliding window (a query at position i sees keys at positions i - window + 1 .. i, as in
    transformers' masks) or None for full attention."""
    layers = config.num_hidden_layers
    window = getattr(config, "sliding_window", None)
    if family.windows == "none" or not window:
        return [None] * layers
    if family.windows == "all":
        return [int(window)] * layers
    types = getattr(config, "layer_types", None) or ["full_attention"] * layers
    return [int(window) if t == "sliding_attention" else None for t in types]


def _base_fields() -> frozenset[str]:
    from transformers import PretrainedConfig

    return frozenset(PretrainedConfig().to_dict()) - COMMON_FIELDS


def family_of(model_type: str | None) -> Family | None:
    return FAMILIES.get(GGUF_ARCHITECTURES.get(model_type or "", model_type or ""))


def check_config(*, config: Any, where: str) -> Family:
    """The family of `config`, or ExportError naming the first field (or value) the decoder does not implement."""
    family = family_of(getattr(config, "model_type", None))
    if family is None:
        raise ExportError(f"{where}: unsupported architecture {getattr(config, 'model_type', None)!r}; "
                          f"specreason-export supports {', '.join(SUPPORTED_FAMILIES)}")
    # Only fields transformers' config class defines can change its forward; extra keys of a config.json are
    # never read by transformers' code (and so not by the reference validation compares against either).
    known = set(type(config)().to_dict())
    understood = COMMON_FIELDS | family.fields | INERT_FIELDS | _base_fields()
    understood |= understood_renames(understood)  # transformers 5.x names of understood fields (hf_compat.py)
    for name in sorted(known - understood):
        raise ExportError(f"{where}: config field {name!r} ({family.name}) changes the math and "
                          "specreason-export does not implement it; no bundle written")
    rope = _rope_type(config)
    if rope not in ROPE_TYPES:
        raise ExportError(f"{where}: config field 'rope_scaling' has type {rope!r}, which specreason-export does not "
                          f"implement (it does {', '.join(ROPE_TYPES)})")
    types = set(getattr(config, "layer_types", None) or [])
    if types - {"full_attention", "sliding_attention"}:
        raise ExportError(f"{where}: config field 'layer_types' names {sorted(types)}; specreason-export implements "
                          "full_attention and sliding_attention")
    if family.windows == "none" and getattr(config, "sliding_window", None) and "sliding_window" in known:
        raise ExportError(f"{where}: config field 'sliding_window' is not implemented for {family.name}")
    if getattr(config, "use_bidirectional_attention", False):
        raise ExportError(f"{where}: config field 'use_bidirectional_attention' is true; the runtime decodes "
                          "causally")
    return family


def architecture_facts(config: Any) -> dict[str, Any]:
    """The optional manifest facts of specreason_rt.manifest.Architecture: attention_windows, features."""
    family = family_of(getattr(config, "model_type", None))
    if family is None:
        return {}
    return {"attention_windows": layer_windows(family=family, config=config), "features": family.features(config)}
