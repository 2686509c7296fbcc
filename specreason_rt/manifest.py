"""The bundle manifest: the contract between `specreason-export` and the runtime.

A *bundle* is a directory::

    manifest.json
    speculator/model.onnx   (+ model.onnx.data when the weights are stored externally)
    speculator/tokenizer.json, tokenizer_config.json
    verifier/...            (same layout)

`manifest.json` (schema "specreason-bundle", `schema_version` 1) holds everything the runtime must not
guess. Its JSON Schema is `manifest_schema.MANIFEST_SCHEMA`; facts relating fields to each other are checked
in manifest_checks.py, paths and files in bundle_files.py (relative, inside the bundle, every file listed).
Several roles may name the same file (one graph stored once when both roles come from one source). Top level:

    schema, schema_version   "specreason-bundle", 1
    created                  UTC ISO-8601 time of the export
    precision                "fp32" | "int8" | "int4" (all models of a bundle share it)
    tokenizers_shared        true when speculator and verifier tokenize identically; false means the
                             runtime must hand text (not token ids) from one model to the other
    tools                    versions of the tools that wrote the bundle
    files                    {relative path: "sha256:<hex>"} for every file in the bundle but the manifest
    sizes                    {relative path: bytes} for the same files (optional: older bundles lack it, their
                             files are re-hashed at load); the cheap integrity check at load (bundle_files.py)
    models                   {"speculator": ModelEntry, "verifier": ModelEntry}
    engines                  optional (absent in bundles without TensorRT engines): {role: EngineFacts}

EngineFacts (written by `specreason-export --trt`, see export/trt.py; terms in specreason_rt/backends/trt/plan.py):

    file                     relative path of the serialized TensorRT engine (e.g. speculator/model.engine)
    onnx                     the bundle ONNX it was built from (always the plain-attention graph)
    tensorrt_version         TensorRT that built it; an engine only loads in that exact version
    compute_capability       "major.minor" of the GPU it was built on (8.7 Orin, 9.0 H100); engines are not
                             portable across GPU architectures
    device                   that GPU's name
    precision                "fp32" | "fp16"
    typing                   "weak" (TensorRT 10: fp16 via the builder flag) | "strong" (TensorRT 11: the network
                             is built from an fp16 ONNX, its types are obeyed)
    max_branches, max_prompt_tokens, max_step_tokens, max_context   the limits the profiles were built for
    profiles                 [{name: "decode" | "verify" | "prefill", shapes: {input: {min, opt, max}}}], in the
                             engine's profile order
    timing_cache             relative path of the builder's timing cache (reused by the next build)
    kv_dtype                 dtype of the past/new key and value tensors the engine takes and returns

ModelEntry:

    role                     "speculator" | "verifier"
    file                     relative path of the ONNX model
    precision                as above
    architecture             family, layers, hidden, heads, kv_heads, head_dim, vocab_size, max_context,
                             parameters; optional (absent in older bundles, read as null):
                             attention_windows  per layer the sliding window (a query at position i sees
                                                keys at positions i - window + 1 .. i) or null for full
                                                attention; the graph masks by it itself
                             features           names of the math features the graph implements beyond a
                                                Llama block (export/families.py: "qk_norm", "sliding_window",
                                                "attn_softcap", "final_softcap", "sandwich_norm", "parallel",
                                                "partial_rotary", "rope_longrope", "local_rope", ...)
    io                       inputs / outputs: [{name, dtype, shape}] with symbolic dims "branches",
                             "new_tokens", "past_tokens", "total_tokens", "logit_positions"
    kv_cache                 layout and names: past inputs `past_key.{i}` / `past_value.{i}`
                             [branches, kv_heads, past_tokens, head_dim]; outputs `new_key.{i}` /
                             `new_value.{i}` [branches, kv_heads, new_tokens, head_dim] hold ONLY the new
                             tokens' entries: the runtime owns the cache and writes them in place.
                             `attention`: "plain" | "gqa" (present_key / present_value: the past buffers,
                             updated in place) | "prefix" (plain, plus the inputs `prefix_key.{i}` /
                             `prefix_value.{i}` [1, kv_heads, prefix_tokens, head_dim]: tokens 0 ..
                             prefix_tokens - 1, one segment every branch attends to; the past, attention_mask
                             and the slots below then cover only the tokens after it; prefix_tokens may be 0)
    tokenizer                relative path of tokenizer.json
    generation               bos_id, eos_ids, pad_id, chat_template, step_delimiter
    source                   kind ("builtin" | "hf" | "gguf"), id, {file: sha256}
    validation               the export's self-check against the PyTorch source (see export/validate.py); with
                             a value head also max_abs_value_diff (ONNX `value` vs the torch head); optional
                             `quality` (quantized bundles, written by `specreason bench quality --record`:
                             greedy agreement and perplexity vs the fp32 export, specreason_rt/bench_quality.py)
                             and `quantization` (quantized bundles: the format the agreement was measured on,
                             export/quantize.py)
    value_head               optional (absent or null = no head): a value head inside this graph, the extra
                             output `value`. {input_size (= architecture.hidden), hidden, file (the source file
                             name), sha256 (of that file), metrics (the head's own held-out measurements, e.g.
                             heldout_synthetic / heldout_speculator: {n, positives, accuracy, auc}), recipe}

Graph semantics (one call = one forward over `new_tokens` positions for every branch):

    input_ids      [branches, new_tokens] int64    right-padded new tokens
    position_ids   [branches, new_tokens] int64    absolute positions of the new tokens
    attention_mask [branches, total_tokens] int64  1 = key slot holds a real token; total = past + new
    logits_index   [branches, logit_positions] int64  which of the new positions get logits
    logits         [branches, logit_positions, vocab] float32
    value          [branches, logit_positions] float32 in [0, 1], only with a value head: sigmoid(head(h)) on the
                   same final-norm hidden states h as `logits`; the belief that the step ending there is correct

A new token at slot past_tokens + j attends to key slot t when attention_mask[b, t] == 1 and
t <= past_tokens + j, so branches of different lengths share a batch (holes are masked out).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from .bundle_files import MANIFEST_NAME, Integrity, check_files, confined, sha256_file
from .errors import BundleError
from .manifest_checks import check_consistency
from .manifest_schema import parse_manifest

__all__ = ["MANIFEST_NAME", "Architecture", "EngineFacts", "Generation", "Integrity", "Manifest", "ModelEntry",
           "load_manifest", "sha256_file"]

SCHEMA = "specreason-bundle"
SCHEMA_VERSION = 1
ROLES = ("speculator", "verifier")
PRECISIONS = ("fp32", "int8", "int4")
ENGINE_PRECISIONS = ("fp32", "fp16")  # TensorRT engines (the ONNX beside them stays fp32)


@dataclasses.dataclass(frozen=True)
class Architecture:
    family: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab_size: int
    max_context: int
    parameters: int
    attention_windows: list[int | None] | None = None  # per layer; None: not recorded (older bundles)
    features: list[str] | None = None

    def kv_bytes_per_token(self, *, dtype_bytes: int = 4) -> int:
        """Bytes of KV cache one token of one branch needs (keys and values, all layers)."""
        return 2 * self.layers * self.kv_heads * self.head_dim * dtype_bytes


@dataclasses.dataclass(frozen=True)
class Generation:
    bos_id: int | None
    eos_ids: tuple[int, ...]
    pad_id: int
    chat_template: str | None
    step_delimiter: str


@dataclasses.dataclass(frozen=True)
class ModelEntry:
    role: str
    file: str
    precision: str
    architecture: Architecture
    io: dict[str, list[dict[str, Any]]]
    kv_cache: dict[str, Any]
    tokenizer: str
    generation: Generation
    source: dict[str, Any]
    validation: dict[str, Any]
    value_head: dict[str, Any] | None = None  # bundles written before value heads have none

    @property
    def shares_prefix(self) -> bool:
        """Whether branches forked from one prompt hold its keys/values once (the "prefix" attention variant)."""
        return self.kv_cache.get("attention") == "prefix"

    def kv_cache_bytes(self, *, branches: int, tokens: int, prompt_tokens: int = 0) -> int:
        """The KV cache of `branches` branches of `tokens` tokens each (fp32), the first `prompt_tokens` of them
        one prompt the branches were forked from: held once when this graph shares prefixes and the prompt is
        long enough to be shared (kv_cache.py), else once per branch."""
        from .kv_cache import SHARED_PREFIX_MIN_TOKENS

        per_token = self.architecture.kv_bytes_per_token()
        prompt = min(prompt_tokens, tokens)
        if branches > 1 and self.shares_prefix and prompt >= SHARED_PREFIX_MIN_TOKENS:
            return (prompt + branches * (tokens - prompt)) * per_token
        return branches * tokens * per_token

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["generation"]["eos_ids"] = list(self.generation.eos_ids)
        for key in ("attention_windows", "features"):  # optional facts: absent rather than null when not recorded
            if out["architecture"][key] is None:
                del out["architecture"][key]
        return out

    @staticmethod
    def from_json(data: dict[str, Any]) -> ModelEntry:
        data = dict(data)
        # Optional architecture facts this runtime has no field for yet are checked by the schema, then left.
        known = {f.name for f in dataclasses.fields(Architecture)}
        data["architecture"] = Architecture(**{k: v for k, v in data["architecture"].items() if k in known})
        gen = dict(data["generation"])
        gen["eos_ids"] = tuple(gen["eos_ids"])
        data["generation"] = Generation(**gen)
        return ModelEntry(**data)


@dataclasses.dataclass(frozen=True)
class EngineFacts:
    file: str
    onnx: str
    tensorrt_version: str
    compute_capability: str
    device: str
    precision: str
    typing: str
    max_branches: int
    max_prompt_tokens: int
    max_step_tokens: int
    max_context: int
    profiles: list[dict[str, Any]]
    timing_cache: str
    kv_dtype: str

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @staticmethod
    def from_json(data: dict[str, Any]) -> EngineFacts:
        facts = EngineFacts(**data)
        if facts.precision not in ENGINE_PRECISIONS:
            raise TypeError(f"engine precision {facts.precision!r} is not one of {ENGINE_PRECISIONS}")
        return facts


@dataclasses.dataclass(frozen=True)
class Manifest:
    created: str
    precision: str
    tokenizers_shared: bool
    tools: dict[str, str]
    files: dict[str, str]
    models: dict[str, ModelEntry]
    engines: dict[str, EngineFacts] = dataclasses.field(default_factory=dict)
    sizes: dict[str, int] = dataclasses.field(default_factory=dict)  # {relative path: bytes}; older bundles: {}

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "schema_version": SCHEMA_VERSION,
            "created": self.created,
            "precision": self.precision,
            "tokenizers_shared": self.tokenizers_shared,
            "tools": self.tools,
            "files": self.files,
            "models": {role: entry.to_json() for role, entry in self.models.items()},
            **({"sizes": self.sizes} if self.sizes else {}),
            **({"engines": {role: f.to_json() for role, f in self.engines.items()}} if self.engines else {}),
        }


def load_manifest(bundle_dir: str | Path, *, integrity: Integrity = "sizes") -> Manifest:
    """Read and check a bundle's manifest; raise BundleError naming the first problem found.

    Order matters: the manifest is parsed with bounds and checked against its schema and against itself,
    and every path in it is confined to the bundle, before any other file is opened. `integrity` is how
    hard the listed files are checked: "sizes" (cheap, the default) or "full" (re-hash; bundle_files.py).
    """
    bundle = Path(bundle_dir)
    if not bundle.is_dir():
        raise BundleError(f"{bundle} is not a directory: pass the folder written by specreason-export")
    path = bundle / MANIFEST_NAME
    if not path.is_file():
        raise BundleError(f"{bundle} has no {MANIFEST_NAME}: is it a bundle written by specreason-export?")
    confined(bundle, MANIFEST_NAME, what="the manifest")
    data = parse_manifest(path)
    models = {role: ModelEntry.from_json(data["models"][role]) for role in ROLES}
    manifest = Manifest(
        created=data["created"], precision=data["precision"], tokenizers_shared=data["tokenizers_shared"],
        tools=dict(data["tools"]), files=dict(data["files"]), models=models,
        engines={role: EngineFacts.from_json(f) for role, f in data.get("engines", {}).items()},
        sizes=dict(data.get("sizes", {})),
    )
    # Every path the manifest names, confined first, so that a bad one is reported as such.
    for rel in [*manifest.files, *(e.file for e in models.values()), *(e.tokenizer for e in models.values()),
                *(getattr(f, k) for f in manifest.engines.values() for k in ("file", "onnx", "timing_cache"))]:
        confined(bundle, rel, what="path")
    problem = check_consistency(manifest, raw=data)
    if problem:
        raise BundleError(f"{path}: {problem}; fix it or re-export the bundle")
    check_files(bundle, files=manifest.files, sizes=manifest.sizes, integrity=integrity)
    return manifest
