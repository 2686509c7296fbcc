"""Pure logic of the TensorRT backend: engine limits, optimization profiles, the portability check and the
device KV cache's copy plans. No tensorrt, no CUDA: everything here runs (and is tested) on numpy.

Terms (used by export/trt.py, backends/trt/engine.py, backends/providers.py and the manifest's `engines` section):

  regime    one of the three shape regimes the runtime drives a model in:
              decode   one new token per branch                     (new_tokens = 1)
              verify   a drafted step scored in one pass            (new_tokens 1..max_step_tokens)
              prefill  a prompt                                     (new_tokens 1..max_prompt_tokens)
            each for branches 1..max_branches.
  profile   a TensorRT optimization profile: per dynamic graph input a (min, opt, max) shape. One profile per
            regime, in the order of REGIMES; the engine picks the first whose ranges hold a call's shapes.
  past      the `past_tokens` axis of the past_key/past_value inputs. The native backend feeds its whole cache
            *capacity* (slots past a branch's length are holes, masked out by attention_mask), so a step copies
            no cache; past therefore runs 1..max_context. ONNX Runtime's TensorRT EP is fed the host cache's
            longest branch, which is 0 before the first prefill: its profiles start past at 0.
  logit positions  the `logit_positions` axis of logits_index: 1 in decode, up to max_step_tokens otherwise
            (a prefill asks for its last position; verify may ask for every position of the step).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from ...errors import BundleError, ConfigError

REGIMES = ("decode", "verify", "prefill")


@dataclasses.dataclass(frozen=True)
class EngineLimits:
    """The shapes an engine is built for; a call outside them is refused with the limit to raise."""

    max_branches: int = 8
    max_prompt_tokens: int = 512
    max_step_tokens: int = 128
    max_context: int = 2048

    def __post_init__(self) -> None:
        for name in ("max_branches", "max_prompt_tokens", "max_step_tokens", "max_context"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_step_tokens > self.max_prompt_tokens:
            raise ConfigError(f"max_step_tokens ({self.max_step_tokens}) must not exceed max_prompt_tokens "
                              f"({self.max_prompt_tokens}): a prefill must take at least a step")
        if self.max_prompt_tokens >= self.max_context:
            raise ConfigError(f"max_prompt_tokens ({self.max_prompt_tokens}) must be below max_context "
                              f"({self.max_context}) to leave room for reasoning")

    def clamp_context(self, model_max_context: int) -> EngineLimits:
        """These limits with max_context no larger than the model's (prompt and step shrunk to fit)."""
        context = min(self.max_context, model_max_context)
        prompt = min(self.max_prompt_tokens, context - 1)
        return EngineLimits(max_branches=self.max_branches, max_prompt_tokens=prompt,
                            max_step_tokens=min(self.max_step_tokens, prompt), max_context=context)


@dataclasses.dataclass(frozen=True)
class Profile:
    """One optimization profile: shapes[input name] = (min, opt, max), each a tuple of ints."""

    name: str
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]

    def to_json(self) -> dict[str, Any]:
        shapes = {k: {"min": list(v[0]), "opt": list(v[1]), "max": list(v[2])} for k, v in self.shapes.items()}
        return {"name": self.name, "shapes": shapes}

    @staticmethod
    def from_json(data: dict[str, Any]) -> Profile:
        shapes = {k: (tuple(v["min"]), tuple(v["opt"]), tuple(v["max"])) for k, v in data["shapes"].items()}
        return Profile(name=data["name"], shapes=shapes)

    def holds(self, dims: dict[str, tuple[int, ...]]) -> bool:
        """Whether every input shape in dims lies within this profile's [min, max], axis by axis."""
        for name, shape in dims.items():
            lo, _, hi = self.shapes[name]
            if len(shape) != len(lo) or any(not a <= s <= b for s, a, b in zip(shape, lo, hi, strict=True)):
                return False
        return True


def regime_ranges(limits: EngineLimits, *, min_past: int) -> dict[str, dict[str, tuple[int, int, int]]]:
    """Per regime, (min, opt, max) of the symbolic axes: branches, new_tokens, past_tokens, logit_positions.

    Opt shapes say what TensorRT tunes kernels for: decode and verify run the speculation fan-out (all branches),
    a prompt is prefilled once and then forked (one branch); past sits mid-context.
    """
    b, p, s, c = limits.max_branches, limits.max_prompt_tokens, limits.max_step_tokens, limits.max_context
    past = (min_past, max(min_past, c // 2), c)
    return {
        "decode": {"branches": (1, b, b), "new_tokens": (1, 1, 1), "past_tokens": past, "logit_positions": (1, 1, 1)},
        "verify": {"branches": (1, b, b), "new_tokens": (1, s, s), "past_tokens": past,
                   "logit_positions": (1, s, s)},
        "prefill": {"branches": (1, 1, b), "new_tokens": (1, p, p), "past_tokens": past,
                    "logit_positions": (1, 1, s)},
    }


def plan_profiles(*, limits: EngineLimits, inputs: list[dict[str, Any]], min_past: int = 1) -> list[Profile]:
    """One profile per regime (REGIMES order) for every dynamic input of a plain-attention graph.

    inputs: the manifest's io["inputs"] ({name, dtype, shape} with symbolic dims). "total_tokens" is
    past_tokens + new_tokens (attention_mask). Fixed dims (kv_heads, head_dim) are copied as they are.
    """
    profiles = []
    for regime, axes in regime_ranges(limits, min_past=min_past).items():
        total = tuple(axes["past_tokens"][i] + axes["new_tokens"][i] for i in range(3))
        ranges = {**axes, "total_tokens": total}
        shapes = {}
        for tensor in inputs:
            dims = tensor["shape"]
            unknown = [d for d in dims if isinstance(d, str) and d not in ranges]
            if unknown:
                raise BundleError(f"input {tensor['name']} has axes {unknown} that no TensorRT profile covers; "
                                  "TensorRT needs a plain-attention bundle (specreason-export --attention plain)")
            shapes[tensor["name"]] = tuple(
                tuple(ranges[d][i] if isinstance(d, str) else int(d) for d in dims) for i in range(3))
        profiles.append(Profile(name=regime, shapes=shapes))  # type: ignore[arg-type]
    return profiles


def spanning_profile(profiles: list[Profile], *, name: str = "all") -> Profile:
    """One profile whose ranges hold every shape any of `profiles` holds: axis by axis, min of the mins and max of
    the maxes; opt from the first profile (decode: the regime that runs most often), clamped into the range.

    For ONNX Runtime's TensorRT EP, whose execution context stays on optimization profile 0 (the EP parses and
    builds several, but does not switch: microsoft/onnxruntime PR #31624, open): a ragged prefill outside the
    decode profile would fail. The native backend keeps one profile per regime and switches itself.
    """
    shapes = {}
    for tensor, (_, opt, _) in profiles[0].shapes.items():
        lo = tuple(min(dims) for dims in zip(*(p.shapes[tensor][0] for p in profiles), strict=True))
        hi = tuple(max(dims) for dims in zip(*(p.shapes[tensor][2] for p in profiles), strict=True))
        shapes[tensor] = (lo, tuple(min(max(o, a), b) for o, a, b in zip(opt, lo, hi, strict=True)), hi)
    return Profile(name=name, shapes=shapes)


def step_dims(*, inputs: list[dict[str, Any]], branches: int, new_tokens: int, past_tokens: int,
              logit_positions: int) -> dict[str, tuple[int, ...]]:
    """The concrete shape of every graph input for one call."""
    axes = {"branches": branches, "new_tokens": new_tokens, "past_tokens": past_tokens,
            "total_tokens": past_tokens + new_tokens, "logit_positions": logit_positions}
    return {t["name"]: tuple(axes[d] if isinstance(d, str) else int(d) for d in t["shape"]) for t in inputs}


def select_profile(profiles: list[Profile], dims: dict[str, tuple[int, ...]], *, limits: EngineLimits) -> int:
    """Index of the first profile (decode, verify, prefill) that holds these input shapes.

    Raises ConfigError naming the limit the call exceeds: engines cannot run shapes outside their profiles.
    """
    for i, profile in enumerate(profiles):
        if profile.holds(dims):
            return i
    branches, new = dims["input_ids"]
    total = dims["attention_mask"][1]
    raise ConfigError(
        f"a call with {branches} branches, {new} new tokens and {total} key slots is outside the engine's profiles "
        f"(branches <= {limits.max_branches}, new tokens <= {limits.max_prompt_tokens}, logit positions <= "
        f"{limits.max_step_tokens}, context <= {limits.max_context}); "
        "rebuild the engines with larger --max-branches / --max-prompt-tokens / --max-step-tokens / --trt-max-context")


def check_engine_compatible(*, engine_file: str, built_trt: str, built_cc: str, runtime_trt: str,
                            runtime_cc: str) -> None:
    """Refuse an engine built by another TensorRT version or for another GPU architecture, in one message.

    TensorRT engines are not portable: a serialized engine only loads in the TensorRT version that built it and
    runs on GPUs of the compute capability it was built for.
    """
    problems = []
    if built_trt != runtime_trt:
        problems.append(f"TensorRT {built_trt} built it, this machine has TensorRT {runtime_trt}")
    if built_cc != runtime_cc:
        problems.append(f"it targets compute capability {built_cc}, this GPU is {runtime_cc}")
    if problems:
        raise BundleError(f"{engine_file}: {'; '.join(problems)}. TensorRT engines are not portable across "
                          "TensorRT versions or GPU architectures: rebuild them on this machine with "
                          "`specreason-export --engines-only --out BUNDLE` (needs pip install 'specreason-rt[trt]')")


def step_mask_positions(*, lengths: np.ndarray, n_new: np.ndarray, past: int, new_tokens: int
                        ) -> tuple[np.ndarray, np.ndarray]:
    """attention_mask [branches, past + new_tokens] and position_ids [branches, new_tokens] for a step that
    feeds the whole cache (past = capacity): slot t < past is real when t < lengths[b]; new slot past + j is
    real when j < n_new[b]. Positions are the branches' own (lengths + j), not slot numbers."""
    slots = np.arange(past + new_tokens)
    mask = np.where(slots[None, :] < past, slots[None, :] < lengths[:, None],
                    (slots[None, :] - past) < n_new[:, None]).astype(np.int64)
    positions = (lengths[:, None] + np.arange(new_tokens)[None, :]).astype(np.int64)
    return mask, positions


# ---- device KV cache copy plans -------------------------------------------------------------------------------
#
# The device cache is one allocation of 2 * layers slices, z = 2 * layer + (0 keys | 1 values); a slice is
# `rows` rows of `pitch` bytes, row y = branch * kv_heads + head holding that head's slots (x = slot * row_bytes).
# The first branches * kv_heads rows are [branches, kv_heads, slots, head_dim]: what the engine binds as
# past_key.{i} / past_value.{i}. `rows` is padded past branches * kv_heads so that every slice starts on a
# 256-byte boundary (setTensorAddress needs 256-byte aligned addresses; a slot is 96 bytes in the built-in
# verifier, so unpadded slices would start anywhere). The graph's new_key.{i} / new_value.{i} outputs are bound
# in a staging buffer with the same layout, new_tokens in place of the capacity. Every cache operation is then a
# few 3D copies (cudaMemcpy3DAsync on pitched linear memory, whose slice stride is pitch * ysize = pitch * rows):
#   byte (x, y, z) of a region = base + ((pos.z + z) * rows + pos.y + y) * pitch + pos.x + x

ALIGN = 256  # bytes: what setTensorAddress requires of every bound address, and what cudaMalloc returns


def padded_rows(rows: int, pitch: int) -> int:
    """The fewest rows >= `rows` whose total size (rows * pitch) is a multiple of ALIGN."""
    step = ALIGN // math.gcd(pitch, ALIGN)
    return -(-rows // step) * step


@dataclasses.dataclass(frozen=True)
class Layout:
    """The device layout of a KV cache (slots = capacity) or of the staging buffer (slots = new tokens)."""

    layers: int
    branches: int
    kv_heads: int
    slots: int
    row_bytes: int  # one slot of one head: head_dim * itemsize

    @property
    def pitch(self) -> int:
        return self.slots * self.row_bytes

    @property
    def rows(self) -> int:
        return padded_rows(self.branches * self.kv_heads, self.pitch)

    @property
    def slice_bytes(self) -> int:
        """Bytes from one (layer, keys|values) slice to the next: a multiple of ALIGN."""
        return self.rows * self.pitch

    @property
    def nbytes(self) -> int:
        return 2 * self.layers * self.slice_bytes

    def slice_offset(self, *, layer: int, values: bool) -> int:
        return (2 * layer + int(values)) * self.slice_bytes


@dataclasses.dataclass(frozen=True)
class Copy3D:
    """One cudaMemcpy3D between two pitched regions; positions and width are in bytes / rows / slices."""

    src_pitch: int
    src_rows: int
    src_pos: tuple[int, int, int]
    dst_pitch: int
    dst_rows: int
    dst_pos: tuple[int, int, int]
    extent: tuple[int, int, int]  # (width bytes, height rows, depth slices)


def _copy(*, src: Layout, dst: Layout, src_row: int, dst_row: int, dst_x: int, width: int, height: int) -> Copy3D:
    return Copy3D(src_pitch=src.pitch, src_rows=src.rows, src_pos=(0, src_row, 0), dst_pitch=dst.pitch,
                  dst_rows=dst.rows, dst_pos=(dst_x, dst_row, 0), extent=(width, height, 2 * src.layers))


def append_copies(*, lengths: np.ndarray, n_new: np.ndarray, staging: Layout, cache: Layout) -> list[Copy3D]:
    """Staging -> cache: the first n_new[b] new entries of branch b go to its slots lengths[b]..; one copy per
    branch that grows (all layers, keys and values, all heads at once)."""
    h, rb = cache.kv_heads, cache.row_bytes
    return [_copy(src=staging, dst=cache, src_row=b * h, dst_row=b * h, dst_x=int(lengths[b]) * rb,
                  width=int(n_new[b]) * rb, height=h)
            for b in range(len(lengths)) if n_new[b] > 0]


def grow_copies(*, lengths: np.ndarray, old: Layout, new: Layout) -> list[Copy3D]:
    """Old cache -> a larger one: every branch's filled slots, in one copy."""
    longest = int(lengths.max()) if len(lengths) else 0
    if longest == 0:
        return []
    return [_copy(src=old, dst=new, src_row=0, dst_row=0, dst_x=0, width=longest * old.row_bytes,
                  height=old.branches * old.kv_heads)]


def gather_copies(*, lengths: np.ndarray, rows: np.ndarray, old: Layout, new: Layout) -> list[Copy3D]:
    """Old cache -> a new one of len(rows) branches where new branch j is old branch rows[j]."""
    h = old.kv_heads
    return [_copy(src=old, dst=new, src_row=int(r) * h, dst_row=j * h, dst_x=0,
                  width=int(lengths[r]) * old.row_bytes, height=h)
            for j, r in enumerate(rows) if lengths[r] > 0]


def concat_copies(*, lengths: np.ndarray, other_lengths: np.ndarray, ours: Layout, theirs: Layout,
                  joined: Layout) -> tuple[list[Copy3D], list[Copy3D]]:
    """Two caches -> one of ours.branches + theirs.branches branches (ours first), each branch's filled slots:
    (copies from ours, copies from theirs), one copy per source at most."""
    h, rb = joined.kv_heads, joined.row_bytes
    first = [_copy(src=ours, dst=joined, src_row=0, dst_row=0, dst_x=0, width=int(lengths.max()) * rb,
                   height=ours.branches * h)] if len(lengths) and lengths.max() > 0 else []
    second = [_copy(src=theirs, dst=joined, src_row=0, dst_row=ours.branches * h, dst_x=0,
                    width=int(other_lengths.max()) * rb, height=theirs.branches * h)
              ] if len(other_lengths) and other_lengths.max() > 0 else []
    return first, second
