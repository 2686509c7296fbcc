"""What differs between the transformers versions the export supports (4.57 and the newest 5.x), in one place.

The export reads three things from transformers: config fields (to refuse what the decoder does not implement),
modules and their weights, and the reference forward validation compares against. The differences found by
running the export tests under both (.ci/transformers5):

  * config fields renamed in 5.x: `rope_parameters` holds what 4.x kept in `rope_theta` and `rope_scaling`
    (the old names stay readable as properties, and the decoder reads the rotary module itself); qwen3_moe's
    `num_experts` became `num_local_experts`. A new name is understood exactly when all its old names are.
  * config fields 5.x adds to some classes that the export already handles: `use_bidirectional_attention`
    (gemma2; check_config refuses it when true, for every family) and `is_decoder` (gpt_neox; a base-class field
    in 4.x, inert for a causal LM).
  * rotary modules: 4.x keeps `inv_freq` / `attention_scaling` (and gemma3 a second module, rotary_emb_local);
    5.x gemma3 keeps one module with `{layer_type}_inv_freq` per layer type, and longrope modules lost
    `rope_init_fn` (the function is ROPE_INIT_FUNCTIONS[rope_type]) (`rope_state`, `rope_modules`).
  * embeddings: 5.x gemma2 scales inside its embedding module, as gemma3 does in both (`embedding_scale`).
  * module names: gpt_neox's `embed_out` is `lm_head` in 5.x (`submodule`).
  * where things live: `no_init_weights` moved from modeling_utils to transformers.initialization.
  * weight layouts: qwen3_moe's experts are a ModuleList of MLPs in 4.x and fused 3-D tensors in 5.x
    (`qwen3_moe_expert_weights`).
"""

from __future__ import annotations

from typing import Any

import torch

# 5.x field name -> the 4.x fields it replaces
RENAMED_FIELDS: dict[str, frozenset[str]] = {
    "rope_parameters": frozenset({"rope_theta", "rope_scaling"}),
    "num_local_experts": frozenset({"num_experts"}),
}


# 5.x adds these to some config classes; the export handles them for every family (see the module docstring).
ADDED_FIELDS = frozenset({"use_bidirectional_attention", "is_decoder"})
# module attribute names 4.x -> 5.x
RENAMED_MODULES = {"embed_out": "lm_head"}


def understood_renames(understood: frozenset[str] | set[str]) -> set[str]:
    """The 5.x names whose 4.x fields are all in `understood`, and the fields 5.x added that are handled."""
    return {new for new, old in RENAMED_FIELDS.items() if old <= understood} | ADDED_FIELDS


def submodule(owner: Any, name: str) -> Any:
    """owner.<name>, or its 5.x name."""
    if not hasattr(owner, name) and name in RENAMED_MODULES:
        return getattr(owner, RENAMED_MODULES[name])
    return getattr(owner, name)


def embedding_scale(embed: Any) -> float | None:
    """The factor a scaled embedding module (gemma3; gemma2 in 5.x) multiplies by itself, or None for a plain one."""
    scale = getattr(embed, "embed_scale", None)
    if scale is None:
        return None
    return float(scale) if not isinstance(scale, torch.Tensor) else float(scale.item())


def rope_modules(*, rotary: Any, base: Any, local: str | None) -> list[tuple[Any, str | None]]:
    """The rotary module (and layer type) of full-attention layers, then that of sliding layers when the family
    has a local rope (`local`: the 4.x attribute of `base`, e.g. gemma3's rotary_emb_local)."""
    typed = not hasattr(rotary, "inv_freq") and hasattr(rotary, "full_attention_inv_freq")  # 5.x per layer type
    out: list[tuple[Any, str | None]] = [(rotary, "full_attention" if typed else None)]
    if local:
        out.append((rotary, "sliding_attention") if typed else (getattr(base, local), None))
    return out


def rope_state(rotary: Any, layer_type: str | None = None
               ) -> tuple[torch.Tensor, float, torch.Tensor | None, int]:
    """(inv_freq [rotary_dim / 2], attention scaling, longrope's long inv_freq or None, original max positions)."""
    prefix = f"{layer_type}_" if layer_type else ""
    rope_type = rotary.rope_type[layer_type] if isinstance(rotary.rope_type, dict) else rotary.rope_type
    scale = float(getattr(rotary, f"{prefix}attention_scaling"))
    if "longrope" not in str(rope_type):
        # inv_freq and attention_scaling already include static rope scaling (linear, llama3, yarn) of the source.
        return getattr(rotary, f"{prefix}inv_freq").detach().clone().float(), scale, None, 0
    cfg = rotary.config
    params = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    if layer_type and isinstance(params.get(layer_type), dict):
        params = params[layer_type]
    original = int(getattr(cfg, "original_max_position_embeddings", None) or params.get(
        "original_max_position_embeddings") or rotary.original_max_seq_len)
    init = getattr(rotary, "rope_init_fn", None)
    if init is None:  # 5.x
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        init = ROPE_INIT_FUNCTIONS[str(rope_type)]
    extra = {"layer_type": layer_type} if layer_type else {}
    long_inv, _ = init(cfg, None, seq_len=original + 1, **extra)
    return (getattr(rotary, f"{prefix}original_inv_freq").detach().clone().float(), scale,
            long_inv.detach().clone().float(), original)


def num_experts(config: Any) -> int:
    return int(getattr(config, "num_experts", None) or config.num_local_experts)


def qwen3_moe_expert_weights(experts: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """A qwen3_moe block's experts as w_in [experts, 2, inter, hidden] (gate, up) and w_out [experts, inter, hidden]."""
    if isinstance(experts, torch.nn.ModuleList):  # 4.x: one Qwen3MoeMLP (Linear layers) per expert
        w_in = torch.stack([torch.stack([e.gate_proj.weight, e.up_proj.weight]) for e in experts])
        w_out = torch.stack([e.down_proj.weight.t() for e in experts])
        return w_in, w_out
    # 5.x: gate_up_proj [experts, 2 * inter, hidden] (gate rows first), down_proj [experts, hidden, inter]
    return experts.gate_up_proj.unflatten(1, (2, -1)), experts.down_proj.transpose(1, 2)


def no_init_weights() -> Any:
    """transformers' context manager that skips weight initialisation (tests build models and set weights
    themselves): in modeling_utils in 4.x, in transformers.initialization in 5.x."""
    try:
        from transformers.initialization import no_init_weights as skip
    except ImportError:
        from transformers.modeling_utils import no_init_weights as skip
    return skip()
