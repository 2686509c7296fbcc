"""TensorRT engines from a bundle's ONNX: `specreason-export --trt` (inside the export) and `--engines-only`.

One engine per model, built from the bundle's plain-attention ONNX (the GroupQueryAttention variant is an ONNX
Runtime contrib op the TensorRT parser does not know), with one optimization profile per shape regime —
decode, verify, prefill; each for branches 1..max_branches (specreason_rt/trt_plan.py) — and a timing cache
shared by both builds and kept in the bundle. Precision:

  fp32  the ONNX as it is.
  fp16  TensorRT 10: the builder flag FP16 on the fp32 network (weak typing; JetPack 6.2's TensorRT 10.3).
        TensorRT 11 has no weak typing: the network is parsed strongly typed from an fp16 copy of the ONNX
        (ONNX Runtime's float16 converter, inputs/outputs kept fp32, norms and softmax kept fp32).

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

from specreason_rt.manifest import MANIFEST_NAME, EngineFacts, Manifest, ModelEntry, load_manifest, sha256_file
from specreason_rt.trt_plan import EngineLimits, plan_profiles

from .errors import ExportError
from .progress import Progress
from .trt_onnx_support import CONSTANT_INPUTS, ONNX_TYPE_NAMES, OPSET_RANGE, SOURCE, SUPPORTED

TRT_MISSING = ("TensorRT is not installed: --trt and --engines-only need its Python package and cuda-python on a "
               "machine with an NVIDIA GPU. Install them with pip install 'specreason-rt[trt-cu12]' "
               "([trt-cu13] for CUDA 13; TensorRT wheels come from NVIDIA's package index; on Jetson, TensorRT "
               "ships with JetPack): see runtime/README.md")
TIMING_CACHE = "trt/timing.cache"
ENGINE_PRECISIONS = ("fp32", "fp16")
# Kept in fp32 inside an fp16 network (strong typing): the RMSNorm reduction and the attention softmax.
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
    from specreason_rt.errors import ConfigError
    from specreason_rt.trt_engine import import_cudart

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


def to_fp16_onnx(src: Path, dst: Path) -> None:
    """An fp16 copy of an fp32 graph for a strongly typed build: fp32 inputs/outputs, FP32_OPS kept fp32."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(src))
    half = convert_float_to_float16(model, keep_io_types=True, op_block_list=FP32_OPS)
    _sort_nodes(half.graph)  # the converter appends its Cast nodes; the TensorRT parser reads nodes in order
    external = half.ByteSize() > (1 << 30)
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


def build_engine(*, trt: Any, onnx_path: Path, engine_path: Path, entry: ModelEntry, options: TrtOptions,
                 timing_cache: Path, limits: EngineLimits, work_dir: Path) -> tuple[str, list[dict[str, Any]], str]:
    """Parse, configure and build one engine into engine_path; update timing_cache.

    Returns (typing, profiles as recorded in the manifest, kv dtype name)."""
    strong = _trt_major(trt) >= 11
    source = onnx_path
    if options.precision == "fp16" and strong:
        source = work_dir / f"{entry.role}-fp16.onnx"
        to_fp16_onnx(onnx_path, source)
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
    if options.precision == "fp16" and not strong:
        config.set_flag(trt.BuilderFlag.FP16)
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
    config.set_timing_cache(cache, False)  # ignore_mismatch=False: a cache from another GPU is not reused
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
    timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))
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
    from specreason_rt.trt_engine import CudaMemory, device_facts

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
    files = dict(manifest.files)
    for facts in engines.values():
        for rel in (facts.file, facts.timing_cache):
            files[rel] = sha256_file(bundle / rel)
    updated = dataclasses.replace(manifest, files=files, engines=engines)
    tmp = bundle / f".{MANIFEST_NAME}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(updated.to_json(), indent=2) + "\n")
    os.replace(tmp, bundle / MANIFEST_NAME)
    return updated
