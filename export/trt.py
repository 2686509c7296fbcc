"""TensorRT engines from a bundle's ONNX: `specreason-export --trt` (inside the export) and `--engines-only`.

One engine per model, built from the bundle's plain-attention ONNX (the GroupQueryAttention variant is an ONNX
Runtime contrib op the TensorRT parser does not know), with one optimization profile per shape regime —
decode, verify, prefill; each for branches 1..max_branches (specreason_rt/backends/trt/plan.py) — and a timing cache
shared by both builds and kept in the bundle. Precision:

  fp32  the ONNX as it is, with TF32 off (the builder enables it by default; it rounds matmul inputs to 10-bit
        mantissas, which moved the built-in verifier's logits by 3.4e-2 when its weights were so rounded on CPU).
  fp16  TensorRT 10: the builder flag FP16 on the fp32 network (weak typing; JetPack 6.2's TensorRT 10.3), with
        the layers of fp32_tensors() (RMSNorm's Pow/ReduceMean/Sqrt, softmax, the rotary angle chain) constrained
        to fp32 under OBEY_PRECISION_CONSTRAINTS: without constraints TensorRT may run them in fp16 and overflow.
        TensorRT 11 has no weak typing: the network is parsed strongly typed from an fp16 copy of the ONNX
        (ONNX Runtime's float16 converter, converting from the path so that models over 2 GB work; the same
        nodes kept fp32; ids, masks and logits fp32, the KV cache fp16).

Before any build the graph is checked against the TensorRT ONNX parser's documented support matrix, pinned in
trt_onnx_support.py. What was built is recorded in the manifest's `engines` section (EngineFacts). Engines are
not portable: they load only in the TensorRT version and on the GPU architecture that built them.

Only tensorrt and onnx are imported here (no torch): `--engines-only` runs on a machine with just the runtime,
onnx and the trt extra, such as a Jetson.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from specreason_rt.backends.trt.plan import EngineLimits, plan_profiles
from specreason_rt.manifest import MANIFEST_NAME, EngineFacts, Manifest, ModelEntry, load_manifest, sha256_file

from .errors import ExportError
from .progress import Progress
from .trt_onnx_support import CONSTANT_INPUTS, ONNX_TYPE_NAMES, OPSET_RANGE, SOURCE, SUPPORTED

TRT_MISSING = ("TensorRT is not installed: --trt and --engines-only need its Python package and cuda-python on a "
               "machine with an NVIDIA GPU. Install them with pip install 'specreason-rt[trt-cu12]' "
               "([trt-cu13] for CUDA 13; TensorRT wheels come from NVIDIA's package index; on Jetson, TensorRT "
               "ships with JetPack): see runtime/README.md")
TIMING_CACHE = "trt/timing.cache"
ENGINE_PRECISIONS = ("fp32", "fp16")
# Kept in fp32 inside an fp16 network: the RMSNorm reduction and the attention softmax (by operator), and the
# rotary angle chain (by position in the graph, rotary_nodes()): in fp16, position x frequency has a spacing of
# 0.25 at 500, so cos/sin are off by 0.08 at position 500 and 0.21 at 2000 (head size 64).
FP32_OPS = ["Pow", "ReduceMean", "Sqrt", "Softmax"]
OUTPUT_TYPED = ("Cast", "Constant", "ConstantOfShape")  # operators whose output type is an attribute


@dataclasses.dataclass(frozen=True)
class TrtOptions:
    precision: str = "fp32"  # engine precision: fp32 | fp16
    limits: EngineLimits = EngineLimits()
    workspace_mib: int = 4096
    timing_cache: Path | None = None  # a timing cache to start from (default: the bundle's own, when compatible)
    device_id: int = 0

    def __post_init__(self) -> None:
        if self.precision not in ENGINE_PRECISIONS:
            raise ExportError(f"engine precision must be fp32 or fp16, got {self.precision!r}")
        if self.workspace_mib < 64:
            raise ExportError(f"--trt-workspace-mib must be >= 64, got {self.workspace_mib}")


def require_tensorrt() -> tuple[Any, Any]:
    """(tensorrt, cuda runtime bindings), or ExportError naming the extra to install."""
    try:
        import tensorrt
    except ImportError as e:
        raise ExportError(TRT_MISSING) from e
    from specreason_rt.backends.trt.engine import import_cudart
    from specreason_rt.errors import ConfigError

    try:
        return tensorrt, import_cudart()
    except ConfigError as e:
        raise ExportError(TRT_MISSING) from e


# ---- the parser support check ---------------------------------------------------------------------------------


def onnx_op_problems(model: Any) -> list[str]:
    """Every node of `model` (an onnx.ModelProto) that the pinned TensorRT parser matrix does not support:
    unknown domain or operator, a tensor type the operator's row does not list, a non-constant input where
    the matrix requires an initializer, an opset outside the parser's range. Empty when TensorRT can parse it."""
    import onnx

    problems = []
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx") and not OPSET_RANGE[0] <= imp.version <= OPSET_RANGE[1]:
            problems.append(f"opset {imp.version} is outside the parser's range {OPSET_RANGE}")
        elif imp.domain not in ("", "ai.onnx"):
            problems.append(f"operator domain {imp.domain!r} (opset {imp.version}) is not parsed by TensorRT")
    inferred = onnx.shape_inference.infer_shapes(model)
    graph = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.value_info, *graph.input, *graph.output]}
    types.update({t.name: t.data_type for t in graph.initializer})
    constants = {t.name for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            constants.update(node.output)
            for attr in node.attribute:
                if attr.name == "value":
                    types[node.output[0]] = attr.t.data_type
    for node in graph.node:
        where = f"{node.op_type} node {node.name or '(unnamed)'}"
        if node.domain not in ("", "ai.onnx"):
            problems.append(f"{where}: domain {node.domain!r} is not parsed by TensorRT")
            continue
        if node.op_type not in SUPPORTED:
            problems.append(f"{where}: {node.op_type} is not in the TensorRT parser's support matrix")
            continue
        allowed = set(SUPPORTED[node.op_type])
        # The matrix's types are what an operator takes; outputs count where the node chooses their type.
        checked = [*node.input, *(node.output if node.op_type in OUTPUT_TYPED else [])]
        for name in checked:
            if not name or name not in types or types[name] == 0:
                continue
            onnx_name = onnx.TensorProto.DataType.Name(types[name])
            if ONNX_TYPE_NAMES.get(onnx_name, onnx_name) not in allowed:
                problems.append(f"{where}: tensor {name} is {onnx_name}, the matrix lists {sorted(allowed)}")
        for position in CONSTANT_INPUTS.get(node.op_type, ()):
            if position < len(node.input) and node.input[position] and node.input[position] not in constants:
                problems.append(f"{where}: input {position} ({node.input[position]}) must be an initializer "
                                "or a constant")
    return problems


def check_onnx_for_trt(path: Path) -> None:
    import onnx

    problems = onnx_op_problems(onnx.load(str(path), load_external_data=False))
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise ExportError(f"{path.name}: the graph uses what the TensorRT ONNX parser does not support ({SOURCE}): "
                          f"{shown}. Export with --attention plain at fp32")


def rotary_nodes(graph: Any) -> list[str]:
    """Names of the nodes that compute rotary angles and their cos/sin: those on a path from the position_ids
    input to a Cos or Sin node, the Constant nodes they read (the inverse frequencies: rounded to fp16 they
    move the angles as much as the product does), and the Cos/Sin nodes themselves."""
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    producer = {out: node for node in graph.node for out in node.output}
    downstream, todo = set(), ["position_ids"]  # tensors reachable from the positions
    while todo:
        for node in consumers.get(todo.pop(), []):
            for out in node.output:
                if out not in downstream:
                    downstream.add(out)
                    todo.append(out)
    trig = [n for n in graph.node if n.op_type in ("Cos", "Sin") and set(n.input) & (downstream | {"position_ids"})]
    chain, todo = {n.name for n in trig}, [i for n in trig for i in n.input]
    seen: set[str] = set()
    while todo:
        tensor = todo.pop()
        node = producer.get(tensor)
        if tensor in seen or node is None:
            continue
        if tensor not in downstream:  # not computed from the positions: only the constants (inv_freq, scales)
            if node.op_type == "Constant":
                chain.add(node.name)
            continue
        seen.add(tensor)
        chain.add(node.name)
        todo.extend(node.input)
    return [n.name for n in graph.node if n.name in chain]


def fp32_nodes(graph: Any) -> list[str]:
    """The nodes an fp16 engine keeps in fp32: FP32_OPS by operator and the rotary chain."""
    rotary = set(rotary_nodes(graph))
    return [n.name for n in graph.node if n.op_type in FP32_OPS or n.name in rotary]


def fp32_tensors(graph: Any) -> set[str]:
    """Output tensor names of fp32_nodes: TensorRT's ONNX parser names each node's output tensors after the ONNX
    outputs, so these find the layers to constrain in a weakly typed network."""
    keep = set(fp32_nodes(graph))
    return {out for n in graph.node if n.name in keep for out in n.output}


def kv_cache_io(entry_kv: dict[str, str], layers: int) -> list[str]:
    """The graph inputs/outputs that carry the KV cache (kept fp16 in an fp16 network: half the memory)."""
    return [entry_kv[k].format(i) for k in ("past_key", "past_value", "new_key", "new_value") for i in range(layers)]


def fold_fp16_round_trips(graph: Any, *, fp32_nodes: set[str]) -> int:
    """Remove Cast(fp32 -> fp16) -> Cast(fp16 -> fp32) pairs: consumers of the second read the fp32 tensor itself.

    The float16 converter casts every blocked node's output to fp16 and back before the next blocked node, so a
    chain kept in fp32 (the rotary angles) would still be rounded to fp16 between its nodes. A pair is folded only
    where the first Cast's input is known to be fp32: an output of one of `fp32_nodes` (the blocked nodes, which
    compute in fp32), of a Cast to fp32, or an fp32 graph input. Returns how many round trips were folded."""
    import onnx

    def cast_to(node: Any) -> int | None:
        if node.op_type != "Cast":
            return None
        return next((a.i for a in node.attribute if a.name == "to"), None)

    f16, f32 = onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT
    graph_outputs = {o.name for o in graph.output}
    producer = {out: node for node in graph.node for out in node.output}
    fp32_inputs = {i.name for i in graph.input if i.type.tensor_type.elem_type == f32}

    def is_fp32(tensor: str) -> bool:
        node = producer.get(tensor)
        if node is None:
            return tensor in fp32_inputs
        return cast_to(node) == f32 if node.op_type == "Cast" else node.name in fp32_nodes

    folded, dropped = 0, set()
    for node in graph.node:  # node: Cast(fp16 -> fp32) whose input comes from a Cast(fp32 -> fp16)
        if cast_to(node) != f32 or node.output[0] in graph_outputs:
            continue
        first = producer.get(node.input[0])
        if first is None or cast_to(first) != f16 or not is_fp32(first.input[0]):
            continue
        for other in graph.node:
            for i, name in enumerate(other.input):
                if name == node.output[0]:
                    other.input[i] = first.input[0]
        dropped.add(id(node))
        folded += 1
    kept = [n for n in graph.node if id(n) not in dropped]
    used = {name for n in kept for name in n.input} | graph_outputs
    kept = [n for n in kept if cast_to(n) != f16 or n.output[0] in used]  # first casts nobody reads any more
    del graph.node[:]
    graph.node.extend(kept)
    return folded


def to_fp16_onnx(src: Path, dst: Path, *, kv_names: list[str] | None = None, external_over: int = 1 << 30) -> None:
    """An fp16 copy of an fp32 graph for a strongly typed build: fp32_nodes kept fp32; every float input/output
    kept fp32 except `kv_names` (the KV cache), which become fp16.

    Converted from the path: the converter then runs shape inference with infer_shapes_path, which works past
    protobuf's 2 GB limit (in-memory infer_shapes does not). Weights go to external data past `external_over`."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    skeleton = onnx.load(str(src), load_external_data=False)  # names and types only, no weights in memory
    graph = skeleton.graph
    kv = set(kv_names or [])
    keep_fp32 = [v.name for v in [*graph.input, *graph.output] if v.name not in kv]
    # Every blocked node keeps fp32 inputs and outputs; the converter does not bound node names by operator, so
    # the norm / softmax operators are blocked by type and the rotary chain by name.
    half = convert_float_to_float16(str(src), keep_io_types=keep_fp32, op_block_list=FP32_OPS,
                                    node_block_list=rotary_nodes(graph))
    fold_fp16_round_trips(half.graph, fp32_nodes=set(fp32_nodes(graph)))
    _sort_nodes(half.graph)  # the converter appends its Cast nodes; the TensorRT parser reads nodes in order
    weights = sum(len(t.raw_data) for t in half.graph.initializer)  # ByteSize() itself fails past 2 GB
    external = weights > external_over
    onnx.save_model(half, str(dst), save_as_external_data=external, all_tensors_to_one_file=True,
                    location=dst.name + ".data" if external else None)


def _sort_nodes(graph: Any) -> None:
    """Reorder graph.node topologically (stable: ready nodes keep their relative order)."""
    ready = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        rest = []
        for node in pending:
            if all(name in ready for name in node.input):
                ordered.append(node)
                ready.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            raise ExportError(f"the fp16 graph has a cycle or an undefined input at {rest[0].op_type} {rest[0].name}")
        pending = rest
    del graph.node[:]
    graph.node.extend(ordered)


# ---- building -------------------------------------------------------------------------------------------------


def _trt_major(trt: Any) -> int:
    return int(str(trt.__version__).split(".")[0])


def constrain_fp32(*, trt: Any, network: Any, tensors: set[str]) -> int:
    """Keep in fp32 every layer of a weakly typed network that produces one of `tensors`; return how many.

    Float outputs are typed fp32; the layer's precision is set only where all its inputs are floats too (a
    Cast from int64 positions has no float precision to set) and the layer computes something (not a constant)."""
    floats = (trt.DataType.FLOAT, trt.DataType.HALF)
    count = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        outputs = [layer.get_output(j) for j in range(layer.num_outputs)]
        if not any(t is not None and t.name in tensors for t in outputs):
            continue
        inputs = [layer.get_input(j) for j in range(layer.num_inputs)]
        if layer.type != trt.LayerType.CONSTANT and all(t is None or t.dtype in floats for t in inputs):
            layer.precision = trt.DataType.FLOAT  # a constant's output type is all it has
        for j, tensor in enumerate(outputs):
            if tensor is not None and tensor.dtype in floats:
                layer.set_output_type(j, trt.DataType.FLOAT)
        count += 1
    return count


def attach_timing_cache(*, config: Any, data: bytes) -> None:
    """Give the builder a timing cache from `data`, or an empty one when TensorRT refuses it (a cache from
    another TensorRT version or GPU: create_timing_cache returns None or set_timing_cache returns False, and
    the serialize() after the build would then fail on None)."""
    cache = config.create_timing_cache(data) if data else None
    # ignore_mismatch=False: a cache from another GPU is not reused
    if cache is None or not config.set_timing_cache(cache, False):
        cache = config.create_timing_cache(b"")
        if cache is None or not config.set_timing_cache(cache, False):
            raise ExportError("TensorRT refused even an empty timing cache (see its log above)")


def build_engine(*, trt: Any, onnx_path: Path, engine_path: Path, entry: ModelEntry, options: TrtOptions,
                 timing_cache: Path, limits: EngineLimits, work_dir: Path) -> tuple[str, list[dict[str, Any]], str]:
    """Parse, configure and build one engine into engine_path; update timing_cache.

    Returns (typing, profiles as recorded in the manifest, kv dtype name)."""
    strong = _trt_major(trt) >= 11
    source = onnx_path
    if options.precision == "fp16" and strong:
        source = work_dir / f"{entry.role}-fp16.onnx"
        to_fp16_onnx(onnx_path, source, kv_names=kv_cache_io(entry.kv_cache, entry.architecture.layers))
        check_onnx_for_trt(source)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # TensorRT 10: explicit batch is implied, so no flag for fp32/weak fp16. TensorRT 11 is always strongly typed.
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strong else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(source)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise ExportError(f"{entry.role}: TensorRT {trt.__version__} could not parse {onnx_path.name}: "
                          + "; ".join(errors[:5]))
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_mib << 20)
    if options.precision == "fp32":
        config.clear_flag(trt.BuilderFlag.TF32)  # on by default: fp32 engines would not be fp32-exact
    if options.precision == "fp16" and not strong:
        import onnx

        config.set_flag(trt.BuilderFlag.FP16)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        keep = fp32_tensors(onnx.load(str(onnx_path), load_external_data=False).graph)
        constrained = constrain_fp32(trt=trt, network=network, tensors=keep)
        if not constrained:
            raise ExportError(f"{entry.role}: none of the norm / softmax / rotary layers were found in the TensorRT "
                              "network to keep in fp32; refusing an unconstrained fp16 engine")
    attach_timing_cache(config=config, data=timing_cache.read_bytes() if timing_cache.is_file() else b"")
    profiles = plan_profiles(limits=limits, inputs=entry.io["inputs"], min_past=1)
    for profile in profiles:
        p = builder.create_optimization_profile()
        for name, (lo, opt, hi) in profile.shapes.items():
            p.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(p)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f"{entry.role}: TensorRT could not build the engine (see its log above); try a larger "
                          "--trt-workspace-mib or smaller limits (--max-branches, --max-prompt-tokens, "
                          "--trt-max-context)")
    engine_path.write_bytes(bytes(serialized))
    timing_cache.parent.mkdir(parents=True, exist_ok=True)
    written = config.get_timing_cache()
    if written is not None:
        timing_cache.write_bytes(bytes(written.serialize()))
    kv_dtype = "float32"
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        if tensor.name == entry.kv_cache["past_key"].format(0):
            kv_dtype = "float16" if tensor.dtype == trt.DataType.HALF else "float32"
    return ("strong" if strong else "weak"), [p.to_json() for p in profiles], kv_dtype


def build_engines(*, bundle_dir: Path, entries: dict[str, ModelEntry], options: TrtOptions, progress: Progress,
                  previous: dict[str, EngineFacts] | None = None) -> dict[str, EngineFacts]:
    """Build an engine for every role into bundle_dir (the export's temporary directory, or a bundle for
    --engines-only); return the facts for the manifest."""
    trt, cudart = require_tensorrt()
    from specreason_rt.backends.trt.engine import CudaMemory, device_facts

    CudaMemory(cudart=cudart, stream=0).check(cudart.cudaSetDevice(options.device_id))
    capability, device = device_facts(cudart=cudart, device_id=options.device_id)
    timing_cache = bundle_dir / TIMING_CACHE
    reusable = [f for f in (previous or {}).values()
                if f.tensorrt_version == trt.__version__ and f.compute_capability == capability]
    if options.timing_cache is not None:
        timing_cache.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(options.timing_cache, timing_cache)
    elif timing_cache.is_file() and not reusable:
        timing_cache.unlink()  # built by another TensorRT or GPU: start afresh rather than fail the build
    facts = {}
    with tempfile.TemporaryDirectory(prefix=".trt-build-", dir=bundle_dir) as work:
        for role, entry in entries.items():
            if entry.kv_cache.get("attention", "plain") != "plain":
                raise ExportError(f"{role}: TensorRT needs the plain-attention graph; re-export with --trt "
                                  "(or --attention plain)")
            onnx_path = bundle_dir / entry.file
            check_onnx_for_trt(onnx_path)
            limits = options.limits.clamp_context(entry.architecture.max_context)
            engine_rel = str(Path(entry.file).with_suffix(".engine"))
            with progress.stage(f"{role}: build TensorRT {trt.__version__} engine ({options.precision}, {device}, "
                                f"compute capability {capability}, branches <= {limits.max_branches}, "
                                f"context <= {limits.max_context})"):
                typing, profiles, kv_dtype = build_engine(
                    trt=trt, onnx_path=onnx_path, engine_path=bundle_dir / engine_rel, entry=entry, options=options,
                    timing_cache=timing_cache, limits=limits, work_dir=Path(work))
            facts[role] = EngineFacts(
                file=engine_rel, onnx=entry.file, tensorrt_version=str(trt.__version__),
                compute_capability=capability, device=device, precision=options.precision, typing=typing,
                max_branches=limits.max_branches, max_prompt_tokens=limits.max_prompt_tokens,
                max_step_tokens=limits.max_step_tokens, max_context=limits.max_context, profiles=profiles,
                timing_cache=TIMING_CACHE, kv_dtype=kv_dtype)
    return facts


def rebuild_engines(*, bundle: Path, options: TrtOptions, show_progress: bool = True) -> Manifest:
    """--engines-only: (re)build the engines of an existing bundle on this machine and rewrite its manifest.

    Engines are written beside the ONNX and the new manifest replaces the old one by an atomic rename, so an
    interrupted build leaves the old manifest (and the ONNX) intact."""
    from specreason_rt.errors import BundleError

    try:
        manifest = load_manifest(bundle)
    except BundleError as e:
        raise ExportError(str(e)) from e
    require_tensorrt()  # fail before anything is written
    progress = Progress(total=len(manifest.models), enabled=show_progress)
    engines = build_engines(bundle_dir=bundle, entries=manifest.models, options=options, progress=progress,
                            previous=manifest.engines)
    files, sizes = dict(manifest.files), dict(manifest.sizes)
    for facts in engines.values():
        for rel in (facts.file, facts.timing_cache):
            files[rel], sizes[rel] = sha256_file(bundle / rel), (bundle / rel).stat().st_size
    updated = dataclasses.replace(manifest, files=files, sizes=sizes, engines=engines)
    tmp = bundle / f".{MANIFEST_NAME}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(updated.to_json(), indent=2) + "\n")
    os.replace(tmp, bundle / MANIFEST_NAME)
    return updated
