"""Trace BranchDecoder (export/graph.py) to ONNX and describe its IO for the manifest."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from .graph import BranchDecoder, Disabled

OPSET = 17
# ONNX protobuf files cannot exceed 2 GiB; past this size the weights go to an external data file.
EXTERNAL_DATA_BYTES = 1 << 30
# Per attention variant: the names of the cache inputs and outputs (formatted with the layer index).
KV_NAMES = {
    "plain": {"past_key": "past_key.{}", "past_value": "past_value.{}",
              "new_key": "new_key.{}", "new_value": "new_value.{}"},
    "gqa": {"past_key": "past_key.{}", "past_value": "past_value.{}",
            "present_key": "present_key.{}", "present_value": "present_value.{}"},
    "prefix": {"past_key": "past_key.{}", "past_value": "past_value.{}",
               "new_key": "new_key.{}", "new_value": "new_value.{}",
               "prefix_key": "prefix_key.{}", "prefix_value": "prefix_value.{}"},
}
GQA_HEAD_DIM_MULTIPLE = 16  # ONNX Runtime's CPU GroupQueryAttention kernel requires it


def io_spec(*, attention: str, layers: int, kv_heads: int, head_dim: int, vocab: int, value_head: bool = False
            ) -> dict[str, list[dict[str, Any]]]:
    """The graph's inputs and outputs with symbolic dims, exactly as recorded in the manifest."""
    names = KV_NAMES[attention]
    inputs: list[dict[str, Any]] = [{"name": "input_ids", "dtype": "int64", "shape": ["branches", "new_tokens"]}]
    if attention in ("plain", "prefix"):
        kv_in = ["branches", kv_heads, "past_tokens", head_dim]
        kv_out = ["branches", kv_heads, "new_tokens", head_dim]
        out_key, out_value = names["new_key"], names["new_value"]
        inputs += [
            {"name": "position_ids", "dtype": "int64", "shape": ["branches", "new_tokens"]},
            {"name": "attention_mask", "dtype": "int64", "shape": ["branches", "total_tokens"]},
        ]
    else:
        kv_in = kv_out = ["branches", kv_heads, "capacity", head_dim]
        out_key, out_value = names["present_key"], names["present_value"]
        inputs += [
            {"name": "seqlens_k", "dtype": "int32", "shape": ["branches"]},
            {"name": "total_sequence_length", "dtype": "int32", "shape": []},
        ]
    inputs.append({"name": "logits_index", "dtype": "int64", "shape": ["branches", "logit_positions"]})
    inputs += [{"name": names["past_key"].format(i), "dtype": "float32", "shape": kv_in} for i in range(layers)]
    inputs += [{"name": names["past_value"].format(i), "dtype": "float32", "shape": kv_in} for i in range(layers)]
    if attention == "prefix":
        # One shared segment for every branch (batch dim 1): the prompt the branches were forked from.
        prefix_in = [1, kv_heads, "prefix_tokens", head_dim]
        inputs += [{"name": names[key].format(i), "dtype": "float32", "shape": prefix_in}
                   for key in ("prefix_key", "prefix_value") for i in range(layers)]
    outputs = [{"name": "logits", "dtype": "float32", "shape": ["branches", "logit_positions", vocab]}]
    if value_head:
        outputs.append({"name": "value", "dtype": "float32", "shape": ["branches", "logit_positions"]})
    outputs += [{"name": out_key.format(i), "dtype": "float32", "shape": kv_out} for i in range(layers)]
    outputs += [{"name": out_value.format(i), "dtype": "float32", "shape": kv_out} for i in range(layers)]
    return {"inputs": inputs, "outputs": outputs}


def export_onnx(*, model: Any, out_path: Path, attention: str, value_head: Any = None,
                disabled: Disabled | None = None) -> dict[str, list[dict[str, Any]]]:
    """Write `model` (a transformers CausalLM of a family in export/families.py) as an fp32 ONNX graph; return its
    IO spec.

    value_head: an optional torch module [..., hidden] -> [...] exported as the extra output `value`.
    disabled: features left out of the graph (tests only: proves validation sees them).
    """
    import torch

    decoder = BranchDecoder(model, attention=attention, value_head=value_head, disabled=disabled).eval()
    cfg = model.config
    layers = cfg.num_hidden_layers
    spec = io_spec(attention=attention, layers=layers, kv_heads=decoder.kv_heads, head_dim=decoder.head_dim,
                   vocab=cfg.vocab_size, value_head=value_head is not None)

    # Trace with past > 0 and new > 1 so no dimension is specialised to 0 or 1.
    branches, new, past = 2, 3, 2
    ids = torch.zeros((branches, new), dtype=torch.int64)
    index = torch.zeros((branches, 1), dtype=torch.int64)
    prefix_kv: list[torch.Tensor] = []
    if attention in ("plain", "prefix"):
        prefix = 4 if attention == "prefix" else 0  # != past, new, branches: no dimension is tied to another
        pos = torch.arange(prefix + past, prefix + past + new).repeat(branches, 1)
        mask = torch.ones((branches, past + new), dtype=torch.int64)
        extra: tuple[torch.Tensor, ...] = (pos, mask)
        kv_len = past
        if attention == "prefix":
            prefix_kv = [torch.zeros((1, decoder.kv_heads, prefix, decoder.head_dim)) for _ in range(2 * layers)]
    else:
        seqlens = torch.full((branches,), past + new - 1, dtype=torch.int32)
        extra = (seqlens, torch.tensor(past + new, dtype=torch.int32))
        kv_len = past + new + 3  # a capacity larger than needed, as at run time
    kv = [torch.zeros((branches, decoder.kv_heads, kv_len, decoder.head_dim)) for _ in range(2 * layers)]

    dynamic_axes: dict[str, dict[int, str]] = {}
    for tensor in spec["inputs"] + spec["outputs"]:
        dynamic_axes[tensor["name"]] = {axis: d for axis, d in enumerate(tensor["shape"]) if isinstance(d, str)}

    n_params = sum(p.numel() for p in model.parameters())
    with torch.no_grad(), warnings.catch_warnings():
        # The legacy (TorchScript) exporter is deliberate: it traces our explicit forward with plain ops and
        # dynamic axes; the tracer warnings about Python ints in shapes are expected and harmless here.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            decoder, (ids, *extra, index, *kv, *prefix_kv), str(out_path), dynamo=False, opset_version=OPSET,
            custom_opsets={"com.microsoft": 1} if attention == "gqa" else None,
            input_names=[t["name"] for t in spec["inputs"]],
            output_names=[t["name"] for t in spec["outputs"]],
            dynamic_axes=dynamic_axes, do_constant_folding=True,
        )
    if n_params * 4 > EXTERNAL_DATA_BYTES:
        move_to_external_data(out_path)
    return spec


def move_to_external_data(path: Path) -> None:
    """Re-save an ONNX file with its weights in `<name>.data` beside it."""
    import onnx

    model = onnx.load(str(path))
    data_name = path.name + ".data"
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data_name, size_threshold=1024)
