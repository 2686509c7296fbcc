"""What differs between the transformers versions the export supports (4.57 and the newest 5.x), in one place.

The export reads three things from transformers: config fields (to refuse what the decoder does not implement),
modules and their weights, and the reference forward validation compares against. The differences found by
running the export tests under both (.ci/transformers5):

  * config fields renamed in 5.x: `rope_parameters` holds what 4.x kept in `rope_theta` and `rope_scaling`
    (the old names stay readable as properties, and the decoder reads the rotary module itself); qwen3_moe's
    `num_experts` became `num_local_experts`. A new name is understood exactly when all its old names are.
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


def understood_renames(understood: frozenset[str] | set[str]) -> set[str]:
    """The 5.x names whose 4.x fields are all in `understood`."""
    return {new for new, old in RENAMED_FIELDS.items() if old <= understood}


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
