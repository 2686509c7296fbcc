"""The manifest's JSON Schema (Draft 2020-12) and the parse that runs before any field is trusted.

`parse_manifest(path)` reads manifest.json with bounds (size, nesting depth, number length, no NaN), then
validates it against `MANIFEST_SCHEMA` with the `jsonschema` library. The schema fixes types, ranges and
which keys exist; facts that relate fields to each other (a layer count and the IO names, ids and the
vocabulary) are checked in manifest.py, and facts about the graphs (IO shapes) where the graph is opened
(model.py). Every problem is one BundleError that names the field.

Bounds are generous for real models and small enough that nothing sized from the manifest can ask for
absurd memory before the graph itself is checked: layers <= 1024, heads <= 4096, head_dim <= 4096,
vocabulary <= 2^24, context <= 2^24 tokens.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import jsonschema
import jsonschema.exceptions

from .errors import BundleError

MAX_MANIFEST_BYTES = 64 << 20  # a manifest is ~20 KB; past this it is not one
MAX_DEPTH = 32  # the deepest real manifest nests 7 levels; JSON parsers recurse per level
MAX_NUMBER_CHARS = 40  # no manifest number needs more digits; huge ones cost time to convert

ROLE_NAMES = ("speculator", "verifier")
PRECISION_NAMES = ("fp32", "int8", "int4")
DTYPES = ("float32", "float16", "bfloat16", "int64", "int32", "int8", "uint8", "bool")


def _int(lo: int, hi: int) -> dict[str, Any]:
    return {"type": "integer", "minimum": lo, "maximum": hi}


_STR = {"type": "string", "maxLength": 4096}
_PATH = {"type": "string", "minLength": 1, "maxLength": 1024}  # confinement is checked in bundle_files.py
_DIM = {"oneOf": [_int(0, 1 << 24), {"type": "string", "pattern": "^[a-z_]{1,32}$"}]}
_TENSOR = {
    "type": "object", "additionalProperties": False, "required": ["name", "dtype", "shape"],
    "properties": {"name": {"type": "string", "minLength": 1, "maxLength": 256},
                   "dtype": {"enum": list(DTYPES)},
                   "shape": {"type": "array", "maxItems": 8, "items": _DIM}},
}
_ARCHITECTURE = {
    "type": "object", "additionalProperties": False,
    "required": ["family", "layers", "hidden", "heads", "kv_heads", "head_dim", "vocab_size", "max_context",
                 "parameters"],
    "properties": {
        # New families are added by the export side: any lower-case identifier is a family name.
        "family": {"type": "string", "pattern": "^[a-z][a-z0-9_]{0,63}$"},
        "layers": _int(1, 1024), "hidden": _int(1, 1 << 20), "heads": _int(1, 4096), "kv_heads": _int(1, 4096),
        "head_dim": _int(1, 4096), "vocab_size": _int(1, 1 << 24), "max_context": _int(1, 1 << 24),
        "parameters": _int(1, 1 << 42),
        # Optional per-model facts: a sliding window per layer (null = full attention), named math features.
        "attention_windows": {"type": "array", "maxItems": 1024,
                              "items": {"oneOf": [_int(1, 1 << 24), {"type": "null"}]}},
        "features": {"type": "array", "maxItems": 64, "items": {"type": "string", "minLength": 1, "maxLength": 64}},
    },
}
_GENERATION = {
    "type": "object", "additionalProperties": False,
    "required": ["bos_id", "eos_ids", "pad_id", "chat_template", "step_delimiter"],
    "properties": {
        "bos_id": {"oneOf": [_int(0, 1 << 24), {"type": "null"}]},
        "eos_ids": {"type": "array", "minItems": 1, "maxItems": 64, "items": _int(0, 1 << 24)},
        "pad_id": _int(0, 1 << 24),
        "chat_template": {"oneOf": [{"type": "string", "maxLength": 1 << 20}, {"type": "null"}]},
        "step_delimiter": {"type": "string", "minLength": 1, "maxLength": 64},
    },
}
# A layer name template: exactly one "{}" for the layer index and no other braces (no format tricks).
_KV_NAME = {"type": "string", "maxLength": 256, "pattern": r"^[^{}]*\{\}[^{}]*$"}
_KV_CACHE = {
    "type": "object", "required": ["attention", "past_key", "past_value"],
    "properties": {
        "attention": {"enum": ["plain", "gqa", "prefix"]},
        "past_key": _KV_NAME, "past_value": _KV_NAME, "new_key": _KV_NAME, "new_value": _KV_NAME,
        "present_key": _KV_NAME, "present_value": _KV_NAME, "prefix_key": _KV_NAME, "prefix_value": _KV_NAME,
        "layout": {"type": "array", "maxItems": 8, "items": _STR}, "dtype": {"enum": list(DTYPES)}, "outputs": _STR,
    },
    # plain graphs return the new entries, gqa graphs the updated buffers: each needs its own output names;
    # prefix graphs are plain graphs that also read the shared segment.
    "allOf": [
        {"if": {"properties": {"attention": {"const": "gqa"}}}, "then": {"required": ["present_key", "present_value"]}},
        {"if": {"properties": {"attention": {"enum": ["plain", "prefix"]}}},
         "then": {"required": ["new_key", "new_value"]}},
        {"if": {"properties": {"attention": {"const": "prefix"}}},
         "then": {"required": ["prefix_key", "prefix_value"]}},
    ],
    "additionalProperties": False,
}
_MODEL = {
    "type": "object", "additionalProperties": False,
    "required": ["role", "file", "precision", "architecture", "io", "kv_cache", "tokenizer", "generation", "source",
                 "validation"],
    "properties": {
        "role": {"enum": list(ROLE_NAMES)},
        "file": _PATH,
        "precision": {"enum": list(PRECISION_NAMES)},
        "architecture": _ARCHITECTURE,
        "io": {"type": "object", "additionalProperties": False, "required": ["inputs", "outputs"],
               "properties": {"inputs": {"type": "array", "minItems": 1, "maxItems": 4200, "items": _TENSOR},
                              "outputs": {"type": "array", "minItems": 1, "maxItems": 4200, "items": _TENSOR}}},
        "kv_cache": _KV_CACHE,
        "tokenizer": _PATH,
        "generation": _GENERATION,
        "source": {"type": "object", "required": ["kind", "id", "files"],
                   "properties": {"kind": {"enum": ["builtin", "hf", "gguf"]}, "id": _STR,
                                  "files": {"type": "object", "maxProperties": 4096, "additionalProperties": _STR}}},
        "validation": {"type": "object", "required": ["max_abs_logit_diff", "greedy_agreement"],
                       "properties": {"max_abs_logit_diff": {"type": "number", "minimum": 0},
                                      "greedy_agreement": {"type": "number", "minimum": 0, "maximum": 1},
                                      "passed": {"type": "boolean"}}},
        "value_head": {"oneOf": [{"type": "null"},
                                 {"type": "object", "required": ["input_size"],
                                  "properties": {"input_size": _int(1, 1 << 20), "hidden": _int(1, 1 << 20),
                                                 "file": _STR, "sha256": _STR}}]},
    },
}
_PROFILE_DIMS = {"type": "array", "maxItems": 8, "items": _int(0, 1 << 24)}
_ENGINE = {
    "type": "object", "additionalProperties": False,
    "required": ["file", "onnx", "tensorrt_version", "compute_capability", "device", "precision", "typing",
                 "max_branches", "max_prompt_tokens", "max_step_tokens", "max_context", "profiles", "timing_cache",
                 "kv_dtype"],
    "properties": {
        "file": _PATH, "onnx": _PATH, "timing_cache": _PATH,
        "tensorrt_version": _STR, "compute_capability": {"type": "string", "pattern": r"^\d{1,3}\.\d{1,3}$"},
        "device": _STR, "precision": {"enum": ["fp32", "fp16"]}, "typing": {"enum": ["weak", "strong"]},
        "max_branches": _int(1, 1 << 16), "max_prompt_tokens": _int(1, 1 << 24), "max_step_tokens": _int(1, 1 << 24),
        "max_context": _int(1, 1 << 24), "kv_dtype": {"enum": list(DTYPES)},
        "profiles": {"type": "array", "maxItems": 16, "items": {
            "type": "object", "additionalProperties": False, "required": ["name", "shapes"],
            "properties": {"name": {"enum": ["decode", "verify", "prefill"]},
                           "shapes": {"type": "object", "maxProperties": 4200, "additionalProperties": {
                               "type": "object", "additionalProperties": False, "required": ["min", "opt", "max"],
                               "properties": {"min": _PROFILE_DIMS, "opt": _PROFILE_DIMS, "max": _PROFILE_DIMS}}}}}},
    },
}
MANIFEST_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "specreason bundle manifest, schema_version 1",
    "type": "object", "additionalProperties": False,
    "required": ["schema", "schema_version", "created", "precision", "tokenizers_shared", "tools", "files", "models"],
    "properties": {
        "schema": {"const": "specreason-bundle"},
        "schema_version": {"const": 1},
        "created": {"type": "string", "maxLength": 64},
        "precision": {"enum": list(PRECISION_NAMES)},
        "tokenizers_shared": {"type": "boolean"},
        "tools": {"type": "object", "maxProperties": 64, "additionalProperties": {"type": "string", "maxLength": 256}},
        # Every file of the bundle but the manifest: its hash, and (bundles since sizes were recorded) its size.
        "files": {"type": "object", "minProperties": 1, "maxProperties": 10000,
                  "propertyNames": {"maxLength": 1024},
                  "additionalProperties": {"type": "string", "pattern": "^sha256:[0-9a-f]{64}$"}},
        "sizes": {"type": "object", "maxProperties": 10000, "propertyNames": {"maxLength": 1024},
                  "additionalProperties": _int(0, 1 << 50)},
        "models": {"type": "object", "additionalProperties": False, "required": list(ROLE_NAMES),
                   "properties": {role: _MODEL for role in ROLE_NAMES}},
        "engines": {"type": "object", "additionalProperties": False,
                    "properties": {role: _ENGINE for role in ROLE_NAMES}},
    },
}


def _strict_integer(checker: Any, instance: Any) -> bool:
    # JSON Schema counts 256.0 as an integer; a manifest integer must be written as one (no 256.0, no true).
    return isinstance(instance, int) and not isinstance(instance, bool)


_Validator = jsonschema.validators.extend(
    jsonschema.Draft202012Validator,
    type_checker=jsonschema.Draft202012Validator.TYPE_CHECKER.redefine("integer", _strict_integer),
)
_VALIDATOR = _Validator(MANIFEST_SCHEMA)


def _bounded_number(text: str) -> int | float:
    if len(text) > MAX_NUMBER_CHARS:
        raise ValueError(f"a number of {len(text)} characters (at most {MAX_NUMBER_CHARS})")
    if not any(c in text for c in ".eE"):
        return int(text)
    number = float(text)
    if not math.isfinite(number):
        raise ValueError(f"{text} overflows a float")
    return number


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _depth(data: Any) -> int:
    """Nesting depth of parsed JSON, without recursion."""
    deepest, stack = 0, [(data, 1)]
    while stack:
        node, depth = stack.pop()
        deepest = max(deepest, depth)
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for v in node.values())
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node)
    return deepest


def _where(error: jsonschema.exceptions.ValidationError) -> str:
    return "/".join(str(p) for p in error.absolute_path) or "(top level)"


def _short(text: str, limit: int = 160) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def parse_manifest(path: Path) -> dict[str, Any]:
    """The manifest at `path` as JSON that satisfies MANIFEST_SCHEMA; BundleError naming the first problem."""
    size = path.stat().st_size
    if size > MAX_MANIFEST_BYTES:
        raise BundleError(f"{path} is {size >> 20} MiB, far larger than any manifest (limit "
                          f"{MAX_MANIFEST_BYTES >> 20} MiB); re-export the bundle")
    try:
        text = path.read_bytes().decode("utf-8")
        data = json.loads(text, parse_int=_bounded_number, parse_float=_bounded_number, parse_constant=_no_constant)
    except RecursionError as e:
        raise BundleError(f"{path} nests too deeply to be a manifest (limit {MAX_DEPTH} levels); "
                          "re-export the bundle") from e
    except (ValueError, UnicodeDecodeError) as e:  # json.JSONDecodeError is a ValueError
        raise BundleError(f"{path} is not valid JSON ({_short(str(e))}); re-export the bundle") from e
    if _depth(data) > MAX_DEPTH:
        raise BundleError(f"{path} nests too deeply to be a manifest (limit {MAX_DEPTH} levels); "
                          "re-export the bundle")
    if not isinstance(data, dict):
        raise BundleError(f"{path} holds a JSON {type(data).__name__}, not a manifest object; re-export the bundle")
    if data.get("schema") != "specreason-bundle":
        raise BundleError(f"{path}: schema is {_short(repr(data.get('schema')))}, expected 'specreason-bundle': "
                          "is it a bundle written by specreason-export?")
    if data.get("schema_version") != 1:
        raise BundleError(f"{path}: schema_version {_short(repr(data.get('schema_version')))} is not supported by "
                          "this runtime (it reads version 1); re-export the bundle with a matching specreason-export")
    error = jsonschema.exceptions.best_match(_VALIDATOR.iter_errors(data))
    if error is not None:
        raise BundleError(f"{path}: field {_where(error)}: {_short(error.message)}; fix it or re-export the bundle")
    return data
