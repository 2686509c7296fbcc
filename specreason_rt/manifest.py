"""The bundle manifest: the contract between `specreason-export` and the runtime.

A *bundle* is a directory::

    manifest.json
    speculator/model.onnx   (+ model.onnx.data when the weights are stored externally)
    speculator/tokenizer.json, tokenizer_config.json
    verifier/...            (same layout)

`manifest.json` (schema "specreason-bundle", `schema_version` 1) holds everything the runtime must not
guess. Top level:

    schema, schema_version   "specreason-bundle", 1
    created                  UTC ISO-8601 time of the export
    precision                "fp32" | "int8" | "int4" (all models of a bundle share it)
    tokenizers_shared        true when speculator and verifier tokenize identically; false means the
                             runtime must hand text (not token ids) from one model to the other
    tools                    versions of the tools that wrote the bundle
    files                    {relative path: "sha256:<hex>"} for every file in the bundle but the manifest
    models                   {"speculator": ModelEntry, "verifier": ModelEntry}
    engines                  optional (absent in bundles without TensorRT engines): {role: EngineFacts}

EngineFacts (written by `specreason-export --trt`, see export/trt.py; terms in specreason_rt/trt_plan.py):

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
                             parameters
    io                       inputs / outputs: [{name, dtype, shape}] with symbolic dims "branches",
                             "new_tokens", "past_tokens", "total_tokens", "logit_positions"
    kv_cache                 layout and names: past inputs `past_key.{i}` / `past_value.{i}`
                             [branches, kv_heads, past_tokens, head_dim]; outputs `new_key.{i}` /
                             `new_value.{i}` [branches, kv_heads, new_tokens, head_dim] hold ONLY the new
                             tokens' entries: the runtime owns the cache and writes them in place.
    tokenizer                relative path of tokenizer.json
    generation               bos_id, eos_ids, pad_id, chat_template, step_delimiter
    source                   kind ("builtin" | "hf" | "gguf"), id, {file: sha256}
    validation               the export's self-check against the PyTorch source (see export/validate.py); with
                             a value head also max_abs_value_diff (ONNX `value` vs the torch head); optional
                             `quality` (quantized bundles, written by `specreason bench quality --record`:
                             greedy agreement and perplexity vs the fp32 export, specreason_rt/bench_quality.py)
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
import hashlib
import json
from pathlib import Path
from typing import Any

from .errors import BundleError

SCHEMA = "specreason-bundle"
SCHEMA_VERSION = 1
ROLES = ("speculator", "verifier")
PRECISIONS = ("fp32", "int8", "int4")
ENGINE_PRECISIONS = ("fp32", "fp16")  # TensorRT engines (the ONNX beside them stays fp32)
MANIFEST_NAME = "manifest.json"


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

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["generation"]["eos_ids"] = list(self.generation.eos_ids)
        return out

    @staticmethod
    def from_json(data: dict[str, Any]) -> ModelEntry:
        data = dict(data)
        data["architecture"] = Architecture(**data["architecture"])
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
            **({"engines": {role: f.to_json() for role, f in self.engines.items()}} if self.engines else {}),
        }


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def load_manifest(bundle_dir: str | Path, *, check_hashes: bool = True) -> Manifest:
    """Read and check a bundle's manifest; raise BundleError naming the first problem found."""
    bundle = Path(bundle_dir)
    path = bundle / MANIFEST_NAME
    if not bundle.is_dir():
        raise BundleError(f"{bundle} is not a directory: pass the folder written by specreason-export")
    if not path.is_file():
        raise BundleError(f"{bundle} has no {MANIFEST_NAME}: is it a bundle written by specreason-export?")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{path} is not valid JSON ({e}); re-export the bundle") from e
    if data.get("schema") != SCHEMA:
        raise BundleError(f"{path}: schema is {data.get('schema')!r}, expected {SCHEMA!r}")
    if data.get("schema_version") != SCHEMA_VERSION:
        raise BundleError(
            f"{path}: schema_version {data.get('schema_version')!r} is not supported by this runtime "
            f"(it reads version {SCHEMA_VERSION}); re-export the bundle with a matching specreason-export"
        )
    try:
        models = {role: ModelEntry.from_json(entry) for role, entry in data["models"].items()}
        manifest = Manifest(
            created=data["created"],
            precision=data["precision"],
            tokenizers_shared=bool(data["tokenizers_shared"]),
            tools=dict(data["tools"]),
            files=dict(data["files"]),
            models=models,
            engines={role: EngineFacts.from_json(f) for role, f in data.get("engines", {}).items()},
        )
    except (KeyError, TypeError) as e:
        raise BundleError(f"{path}: malformed manifest ({type(e).__name__}: {e}); re-export the bundle") from e
    missing_roles = [r for r in ROLES if r not in models]
    if missing_roles:
        raise BundleError(f"{path}: no entry for {', '.join(missing_roles)}")
    for role, facts in manifest.engines.items():
        if role not in models or facts.file not in manifest.files:
            raise BundleError(f"{path}: the engine for {role!r} ({facts.file}) has no model entry or no file hash; "
                              "rebuild the engines with specreason-export --engines-only")
    for rel, digest in manifest.files.items():
        f = bundle / rel
        if not f.is_file():
            raise BundleError(f"bundle file {rel} listed in the manifest is missing from {bundle}")
        if check_hashes and sha256_file(f) != digest:
            raise BundleError(f"bundle file {rel} does not match its hash in the manifest: it was changed "
                              "or corrupted after export; re-export the bundle")
    return manifest
