"""Facts of a manifest that relate fields to each other, checked after the schema (manifest_schema.py).

The schema fixes each field's type and range; here the fields must agree: the IO names are exactly what
the attention variant and the layer count imply, the KV and logits shapes carry the architecture's numbers,
token ids lie inside the vocabulary, and every file a model or engine names is listed (and hashed) in
`files`. The graphs' own IO is compared with the manifest when they are opened (model.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .manifest import Manifest, ModelEntry

# Inputs besides the KV cache, per attention variant (export/onnx_export.py writes exactly these).
STEP_INPUTS = {
    "plain": ("input_ids", "position_ids", "attention_mask", "logits_index"),
    "gqa": ("input_ids", "seqlens_k", "total_sequence_length", "logits_index"),
    "prefix": ("input_ids", "position_ids", "attention_mask", "logits_index"),
}
KV_OUTPUT_KEYS = {"plain": ("new_key", "new_value"), "gqa": ("present_key", "present_value"),
                  "prefix": ("new_key", "new_value")}
# Cache inputs per attention variant: the per-branch past, and for "prefix" the shared segment too.
KV_INPUT_KEYS = {"plain": ("past_key", "past_value"), "gqa": ("past_key", "past_value"),
                 "prefix": ("past_key", "past_value", "prefix_key", "prefix_value")}


def _names(tensors: list[dict[str, Any]]) -> list[str]:
    return [t["name"] for t in tensors]


def _io_problem(entry: ModelEntry) -> str | None:
    arch, kv = entry.architecture, entry.kv_cache
    attention = kv["attention"]
    inputs, outputs = entry.io["inputs"], entry.io["outputs"]
    for side, tensors in (("inputs", inputs), ("outputs", outputs)):
        names = _names(tensors)
        if len(set(names)) != len(names):
            return f"io.{side} names a tensor twice"
    kv_in = [kv[k].format(i) for k in KV_INPUT_KEYS[attention] for i in range(arch.layers)]
    kv_out = [kv[k].format(i) for k in KV_OUTPUT_KEYS[attention] for i in range(arch.layers)]
    want_in = {*STEP_INPUTS[attention], *kv_in}
    want_out = {"logits", *kv_out} | ({"value"} if entry.value_head is not None else set())
    for side, tensors, want in (("inputs", inputs, want_in), ("outputs", outputs, want_out)):
        have = set(_names(tensors))
        if have != want:
            extra, missing = sorted(have - want)[:4], sorted(want - have)[:4]
            return (f"io.{side} do not fit {attention} attention with {arch.layers} layers"
                    f"{' and a value head' if entry.value_head is not None and side == 'outputs' else ''}"
                    f" (unexpected {extra}, missing {missing})")
    by_name = {t["name"]: t for t in inputs + outputs}
    for name in kv_in + kv_out:
        shape = by_name[name]["shape"]
        if len(shape) != 4 or shape[1] != arch.kv_heads or shape[3] != arch.head_dim:
            return (f"{name} has shape {shape}, the architecture says [branches, {arch.kv_heads} kv_heads, tokens, "
                    f"{arch.head_dim} head_dim]")
    logits = by_name["logits"]["shape"]
    if len(logits) != 3 or logits[2] != arch.vocab_size:
        return f"logits has shape {logits}, the architecture says [branches, positions, {arch.vocab_size} vocab]"
    return None


def _entry_problem(role: str, entry: ModelEntry, manifest: Manifest, raw_architecture: dict[str, Any]
                   ) -> str | None:
    arch, gen = entry.architecture, entry.generation
    if entry.role != role:
        return f"models.{role}.role is {entry.role!r}"
    if entry.precision != manifest.precision:
        return f"models.{role}.precision {entry.precision} differs from the bundle's {manifest.precision}"
    if arch.kv_heads > arch.heads or arch.heads % arch.kv_heads:
        return f"models.{role}.architecture: kv_heads {arch.kv_heads} does not divide heads {arch.heads}"
    ids = [gen.pad_id, *gen.eos_ids] + ([gen.bos_id] if gen.bos_id is not None else [])
    if max(ids) >= arch.vocab_size:
        return f"models.{role}.generation: token id {max(ids)} is outside the vocabulary of {arch.vocab_size}"
    windows = raw_architecture.get("attention_windows")  # an optional fact (written by newer exports)
    if windows is not None and len(windows) != arch.layers:
        return f"models.{role}.architecture: {len(windows)} attention_windows for {arch.layers} layers"
    if entry.value_head is not None and entry.value_head.get("input_size", arch.hidden) != arch.hidden:
        return f"models.{role}.value_head.input_size {entry.value_head['input_size']} is not hidden {arch.hidden}"
    problem = _io_problem(entry)
    if problem:
        return f"models.{role}: {problem}"
    for field, rel in (("file", entry.file), ("tokenizer", entry.tokenizer)):
        if rel not in manifest.files:
            return f"models.{role}.{field} {rel!r} is not listed (with its hash) in files"
    return None


def check_consistency(manifest: Manifest, *, raw: dict[str, Any]) -> str | None:
    """The first disagreement between a schema-valid manifest's fields, or None. `raw` is the parsed JSON
    (optional facts the dataclasses may not carry yet)."""
    for role, entry in manifest.models.items():
        problem = _entry_problem(role, entry, manifest, raw["models"][role]["architecture"])
        if problem:
            return problem
    for role, facts in manifest.engines.items():
        for field in ("file", "onnx"):  # the timing cache is the builder's, never loaded by the runtime
            rel = getattr(facts, field)
            if rel not in manifest.files:
                return (f"engines.{role}.{field} {rel!r} is not listed (with its hash) in files; rebuild the engines "
                        "with specreason-export --engines-only")
    unknown = sorted(set(manifest.sizes) - set(manifest.files))[:3]
    if unknown:
        return f"sizes lists files that files does not: {unknown}"
    return None
