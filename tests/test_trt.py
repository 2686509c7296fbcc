"""The TensorRT path's pure logic, on CPU: profiles, the portability refusal, manifest engine facts, the device KV
cache's copy plans (executed on numpy), the capacity-as-past step, and the parser support check of the graphs."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from specreason_export.trt import fp32_tensors, kv_cache_io, onnx_op_problems, rotary_nodes, to_fp16_onnx
from specreason_export.trt_onnx_support import ONNX_TYPE_NAMES, SOURCE, SUPPORTED
from specreason_rt.backends.ort import OrtEngine
from specreason_rt.backends.trt.kv import BlockPool, DeviceKVCache, DeviceMemory
from specreason_rt.backends.trt.plan import (
    REGIMES,
    Copy3D,
    EngineLimits,
    Layout,
    check_engine_compatible,
    plan_profiles,
    select_profile,
    step_dims,
    step_mask_positions,
)
from specreason_rt.errors import BundleError, CacheLimitError, ConfigError
from specreason_rt.kv_cache import KVCache
from specreason_rt.manifest import load_manifest, sha256_file

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None
LIMITS = EngineLimits(max_branches=8, max_prompt_tokens=64, max_step_tokens=16, max_context=128)


def plain_inputs(bundle: Path) -> list[dict]:
    return load_manifest(bundle).models["verifier"].io["inputs"]


# ---- profiles -------------------------------------------------------------------------------------------------


def test_one_profile_per_regime_covers_every_input(tiny_plain_bundle: Path) -> None:
    inputs = plain_inputs(tiny_plain_bundle)
    profiles = plan_profiles(limits=LIMITS, inputs=inputs)
    assert [p.name for p in profiles] == list(REGIMES) == ["decode", "verify", "prefill"]
    names = {t["name"] for t in inputs}
    decode, verify, prefill = profiles
    for p in profiles:
        assert set(p.shapes) == names
    # decode: one new token, branches 1..8 tuned at 8, past (the cache capacity) 1..128.
    assert decode.shapes["input_ids"] == ((1, 1), (8, 1), (8, 1))
    assert decode.shapes["logits_index"] == ((1, 1), (8, 1), (8, 1))
    assert decode.shapes["attention_mask"] == ((1, 2), (8, 65), (8, 129))
    assert decode.shapes["past_key.0"] == ((1, 2, 1, 16), (8, 2, 64, 16), (8, 2, 128, 16))
    # verify: a step of up to 16 tokens, logits at every one of them.
    assert verify.shapes["input_ids"] == ((1, 1), (8, 16), (8, 16))
    assert verify.shapes["logits_index"] == ((1, 1), (8, 16), (8, 16))
    # prefill: one prompt of up to 64 tokens, tuned for a single branch (it is forked afterwards).
    assert prefill.shapes["position_ids"] == ((1, 1), (1, 64), (8, 64))
    assert prefill.shapes["logits_index"] == ((1, 1), (1, 1), (8, 16))
    assert prefill.shapes["attention_mask"][2] == (8, 128 + 64)


def test_profiles_for_the_tensorrt_ep_start_past_at_zero(tiny_plain_bundle: Path) -> None:
    profiles = plan_profiles(limits=LIMITS, inputs=plain_inputs(tiny_plain_bundle), min_past=0)
    assert all(p.shapes["past_value.1"][0] == (1, 2, 0, 16) for p in profiles)
    assert all(p.shapes["attention_mask"][0] == (1, 1) for p in profiles)


def test_profiles_refuse_a_gqa_graph(tiny_bundle: Path) -> None:
    with pytest.raises(BundleError, match="plain-attention bundle"):
        plan_profiles(limits=LIMITS, inputs=plain_inputs(tiny_bundle))


def test_calls_pick_the_first_profile_that_holds_them(tiny_plain_bundle: Path) -> None:
    inputs = plain_inputs(tiny_plain_bundle)
    profiles = plan_profiles(limits=LIMITS, inputs=inputs)

    def pick(branches: int, new: int, past: int, k: int) -> str:
        dims = step_dims(inputs=inputs, branches=branches, new_tokens=new, past_tokens=past, logit_positions=k)
        return profiles[select_profile(profiles, dims, limits=LIMITS)].name

    assert pick(8, 1, 128, 1) == "decode"
    assert pick(3, 7, 40, 7) == "verify"
    assert pick(1, 16, 64, 16) == "verify"
    assert pick(1, 17, 64, 1) == "prefill"
    assert pick(8, 64, 128, 16) == "prefill"
    for branches, new, past, k, limit in ((9, 1, 64, 1, "--max-branches"), (1, 65, 64, 1, "--max-prompt-tokens"),
                                          (1, 1, 129, 1, "--trt-max-context"), (1, 40, 64, 40, "logit positions")):
        with pytest.raises(ConfigError, match="outside the engine's profiles") as e:
            pick(branches, new, past, k)
        assert limit in str(e.value)


def test_limits_are_validated_and_clamped_to_the_model() -> None:
    with pytest.raises(ConfigError, match="max_step_tokens"):
        EngineLimits(max_prompt_tokens=16, max_step_tokens=32)
    with pytest.raises(ConfigError, match="max_branches"):
        EngineLimits(max_branches=0)
    with pytest.raises(ConfigError, match="below max_context"):
        EngineLimits(max_prompt_tokens=512, max_context=512)
    clamped = EngineLimits(max_prompt_tokens=512, max_step_tokens=128, max_context=2048).clamp_context(128)
    assert clamped == EngineLimits(max_branches=8, max_prompt_tokens=127, max_step_tokens=127, max_context=128)


# ---- the portability refusal ----------------------------------------------------------------------------------


def test_an_engine_from_another_tensorrt_or_gpu_is_refused_with_one_message() -> None:
    check_engine_compatible(engine_file="verifier/model.engine", built_trt="10.3.0", built_cc="8.7",
                            runtime_trt="10.3.0", runtime_cc="8.7")
    with pytest.raises(BundleError) as e:
        check_engine_compatible(engine_file="verifier/model.engine", built_trt="10.3.0", built_cc="8.7",
                                runtime_trt="10.13.3", runtime_cc="9.0")
    message = str(e.value)
    assert message.startswith("verifier/model.engine: TensorRT 10.3.0 built it, this machine has TensorRT 10.13.3; "
                              "it targets compute capability 8.7, this GPU is 9.0.")
    assert "not portable" in message and "rebuild" in message and "--engines-only" in message
    with pytest.raises(BundleError, match="compute capability 8.7, this GPU is 8.6"):
        check_engine_compatible(engine_file="e", built_trt="10.3.0", built_cc="8.7", runtime_trt="10.3.0",
                                runtime_cc="8.6")


# ---- manifest engine facts ------------------------------------------------------------------------------------


def engine_facts(bundle: Path, role: str) -> dict:
    entry = json.loads((bundle / "manifest.json").read_text())["models"][role]
    inputs = entry["io"]["inputs"]
    return {"file": f"{role}/model.engine", "onnx": entry["file"], "tensorrt_version": "10.3.0",
            "compute_capability": "8.7", "device": "Orin", "precision": "fp16", "typing": "weak",
            "max_branches": 8, "max_prompt_tokens": 64, "max_step_tokens": 16, "max_context": 128,
            "profiles": [p.to_json() for p in plan_profiles(limits=LIMITS, inputs=inputs)],
            "timing_cache": "trt/timing.cache", "kv_dtype": "float32"}


@pytest.fixture()
def plain_copy(tmp_path: Path, tiny_plain_bundle: Path) -> Path:
    dst = tmp_path / "bundle"
    shutil.copytree(tiny_plain_bundle, dst)
    return dst


def add_engines(bundle: Path, *, precision: str = "fp16", list_files: bool = True) -> None:
    """Write the engines section a --trt export writes; the engine files are placeholders, since nothing here
    opens them (load_manifest only checks that they exist and match their hashes)."""
    path = bundle / "manifest.json"
    data = json.loads(path.read_text())
    data["engines"] = {}
    for role in ("speculator", "verifier"):
        (bundle / role / "model.engine").write_bytes(role.encode())
        data["engines"][role] = {**engine_facts(bundle, role), "precision": precision}
        data["files"].pop(f"{role}/model.engine", None)
        if list_files:
            data["files"][f"{role}/model.engine"] = sha256_file(bundle / role / "model.engine")
    path.write_text(json.dumps(data))


def test_bundles_without_engines_load_and_write_no_engines_key(tiny_plain_bundle: Path) -> None:
    manifest = load_manifest(tiny_plain_bundle)
    assert manifest.engines == {}
    assert "engines" not in manifest.to_json()
    assert "engines" not in json.loads((tiny_plain_bundle / "manifest.json").read_text())


def test_engine_facts_round_trip_through_the_manifest(plain_copy: Path) -> None:
    add_engines(plain_copy)
    manifest = load_manifest(plain_copy)
    facts = manifest.engines["verifier"]
    assert (facts.tensorrt_version, facts.compute_capability, facts.precision) == ("10.3.0", "8.7", "fp16")
    assert (facts.max_branches, facts.max_context) == (8, 128)
    assert [p["name"] for p in facts.profiles] == ["decode", "verify", "prefill"]
    assert manifest.to_json()["engines"]["verifier"] == engine_facts(plain_copy, "verifier")


def test_bad_engine_facts_are_refused(plain_copy: Path) -> None:
    add_engines(plain_copy, precision="int8")
    with pytest.raises(BundleError, match="engines/(speculator|verifier)/precision: 'int8' is not one of"):
        load_manifest(plain_copy)
    add_engines(plain_copy, list_files=False)
    with pytest.raises(BundleError, match="model.engine' is not listed"):
        load_manifest(plain_copy)


# ---- the device KV cache, its copies executed on numpy ---------------------------------------------------------


class NumpyMemory:
    """Host bytes standing in for device memory; copy3d follows cudaMemcpy3D's documented addressing for pitched
    linear memory: byte (x, y, z) of a region is base + ((pos.z + z) * rows + pos.y + y) * pitch + pos.x + x.
    Allocations are 256-byte aligned, as cudaMalloc's are; every copy is checked against its buffers' bounds."""

    def __init__(self) -> None:
        self.buffers: dict[int, np.ndarray] = {}
        self.next = 256
        self.allocs = 0

    def alloc(self, nbytes: int) -> int:
        address = self.next
        self.buffers[address] = np.full(nbytes, 0xAB, np.uint8)  # garbage until zeroed, as cudaMalloc gives
        self.next += (nbytes + 2 * 256) // 256 * 256
        self.allocs += 1
        return address

    def free(self, address: int) -> None:
        del self.buffers[address]

    def zero(self, address: int, nbytes: int) -> None:
        assert nbytes <= self.buffers[address].size
        self.buffers[address][:nbytes] = 0

    def copy3d(self, *, src: int, dst: int, copy: Copy3D) -> None:
        s, d = self.buffers[src], self.buffers[dst]
        width, height, depth = copy.extent
        for z in range(depth):
            for y in range(height):
                so = ((copy.src_pos[2] + z) * copy.src_rows + copy.src_pos[1] + y) * copy.src_pitch + copy.src_pos[0]
                do = ((copy.dst_pos[2] + z) * copy.dst_rows + copy.dst_pos[1] + y) * copy.dst_pitch + copy.dst_pos[0]
                assert so + width <= s.size and do + width <= d.size, "copy out of bounds"
                d[do:do + width] = s[so:so + width]

    def put(self, array: np.ndarray, layout: Layout | None = None) -> int:
        """A device copy of `array` ([2 * layers, branches, kv_heads, slots, head_dim]), laid out as `layout`."""
        if layout is None:
            address = self.alloc(array.nbytes)
            self.buffers[address][:] = np.frombuffer(array.tobytes(), np.uint8)
            return address
        address = self.alloc(layout.nbytes)
        for z, part in enumerate(array):
            raw = np.frombuffer(np.ascontiguousarray(part).tobytes(), np.uint8)
            self.buffers[address][z * layout.slice_bytes: z * layout.slice_bytes + raw.size] = raw
        return address


def device_view(memory: NumpyMemory, cache: DeviceKVCache, layer: int, values: bool) -> np.ndarray:
    """[branches, kv_heads, capacity, head_dim] float32 view of what the engine binds as past_key/value.{layer}."""
    address = cache.value_address(layer) if values else cache.key_address(layer)
    shape = (cache.branches, cache.kv_heads, cache.capacity, cache.head_dim)
    raw = memory.buffers[cache.address][address - cache.address:][:int(np.prod(shape)) * 4]
    return raw.view(np.float32).reshape(shape)


def assert_same_cache(memory: NumpyMemory, device: DeviceKVCache, host: KVCache) -> None:
    assert np.array_equal(device.lengths, host.lengths)
    for layer in range(host.layers):
        keys, values = device_view(memory, device, layer, False), device_view(memory, device, layer, True)
        assert device.key_address(layer) % 256 == 0 and device.value_address(layer) % 256 == 0
        for b, n in enumerate(host.lengths):
            assert keys[b, :, :n].tobytes() == host.keys[layer][b, :, :n].tobytes()
            assert values[b, :, :n].tobytes() == host.values[layer][b, :, :n].tobytes()


class Pair:
    """A host KVCache and a DeviceKVCache driven through the same operations."""

    def __init__(self, memory: DeviceMemory, *, staging: NumpyMemory | None = None, layers: int = 3,
                 kv_heads: int = 2, head_dim: int = 4, capacity: int = 4, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.staging = staging or memory  # where the engine's outputs land (its own scratch buffer)
        assert isinstance(self.staging, NumpyMemory)
        self.host = KVCache(layers=layers, kv_heads=kv_heads, head_dim=head_dim, branches=1, max_context=64,
                            capacity=capacity)
        self.device = DeviceKVCache(memory=memory, layers=layers, kv_heads=kv_heads, head_dim=head_dim, branches=1,
                                    max_context=64, capacity=capacity)

    def append(self, n_new: list[int]) -> None:
        host, memory = self.host, self.staging
        n = np.array(n_new, np.int64)
        new = max(int(n.max()), 1)
        shape = (host.branches, host.kv_heads, new, host.head_dim)
        keys = [self.rng.standard_normal(shape).astype(np.float32) for _ in range(host.layers)]
        values = [self.rng.standard_normal(shape).astype(np.float32) for _ in range(host.layers)]
        # The engine's staging layout: new_key.{i}, new_value.{i} in (layer, keys|values) order, aligned slices.
        layout = self.device.staging_layout(new)
        staging = memory.put(np.stack([x for pair in zip(keys, values, strict=True) for x in pair]), layout)
        host.append(keys, values, n)
        self.device.append_from(staging=staging, new_tokens=new, n_new=n)
        memory.free(staging)

    def check(self, memory: NumpyMemory) -> None:
        assert_same_cache(memory, self.device, self.host)


def test_device_cache_matches_the_host_cache_through_every_operation() -> None:
    memory = NumpyMemory()
    pair = Pair(memory)
    host, device = pair.host, pair.device
    pair.append([5])  # prefill a prompt past the initial capacity: grows 4 -> 8
    pair.check(memory)
    assert device.capacity == host.capacity == 8
    host.fork(4)
    device.fork(4)
    pair.check(memory)
    pair.append([1, 1, 0, 1])  # decode, one branch finished
    pair.append([3, 0, 2, 1])  # ragged verify: 9 tokens, grows again
    assert device.capacity == 16
    host.rewind(0, 6)
    device.rewind(0, 6)
    pair.append([2, 1, 1, 1])  # the rewound branch is overwritten from slot 6
    host.gather([3, 0, 0])
    device.gather([3, 0, 0])
    pair.check(memory)
    pair.append([1, 4, 1])
    pair.check(memory)
    assert len(memory.buffers) == 1, "old buffers are freed"
    device.close()
    assert memory.buffers == {}


def test_concat_joins_a_running_batch_on_the_device() -> None:
    """A request joining a running batch (serve's batching worker) concatenates caches. DeviceKVCache used to
    inherit the host concat, which left the device buffer as it was: with 3 + 2 branches the bound layout
    outgrew the buffer. Now it is two device copies, byte-identical to the host cache's concat."""
    memory = NumpyMemory()
    running, joining = Pair(memory, seed=1), Pair(memory, capacity=16, seed=2)
    running.append([6])
    running.host.fork(3)
    running.device.fork(3)
    running.append([1, 2, 0])
    joining.append([11])  # a longer prompt, a larger capacity: the joined cache takes the larger one
    joining.host.fork(2)
    joining.device.fork(2)
    running.host.concat(joining.host)
    running.device.concat(joining.device)
    assert running.device.capacity == running.host.capacity == 16 and running.device.branches == 5
    running.check(memory)
    layout = running.device.layout()
    assert memory.buffers[running.device.address].size >= layout.nbytes
    running.append([1, 1, 1, 2, 1])  # and the batch goes on
    running.check(memory)
    joining.check(memory)  # the joining cache is left as it was
    with pytest.raises(ConfigError, match="only another device cache"):
        running.device.concat(running.host)


@pytest.mark.parametrize("head_dim, kv_heads, capacity, itemsize", [
    (24, 4, 5, 4),  # the built-in verifier's 96-byte slot, an odd capacity
    (16, 2, 3, 4), (64, 8, 7, 2), (24, 3, 1, 4), (80, 5, 13, 2)])
def test_every_bound_address_is_256_byte_aligned(head_dim: int, kv_heads: int, capacity: int, itemsize: int) -> None:
    """setTensorAddress needs 256-byte aligned pointers; one slot is 96 bytes in the built-in verifier, so slices
    of [branches, kv_heads, capacity, head_dim] packed back to back start anywhere. Slices are padded to 256."""
    memory = NumpyMemory()
    cache = DeviceKVCache(memory=memory, layers=3, kv_heads=kv_heads, head_dim=head_dim, branches=3,
                          max_context=64, capacity=capacity, itemsize=itemsize)
    for _ in range(3):
        for layer in range(3):
            assert cache.key_address(layer) % 256 == 0 and cache.value_address(layer) % 256 == 0
        for new in (1, 3, 7):
            staging = cache.staging_layout(new)
            assert all(staging.slice_offset(layer=i, values=v) % 256 == 0 for i in range(3) for v in (False, True))
            assert staging.rows >= 3 * kv_heads
        cache.reserve(cache.capacity + 1)
        cache.gather([0, 1, 2, 2])
    layout = cache.layout()
    assert layout.rows * layout.pitch == layout.slice_bytes and layout.slice_bytes % 256 == 0
    assert layout.rows - cache.branches * kv_heads < 256, "padding stays under one alignment unit of rows"


def test_the_block_pool_stops_allocating_once_shapes_repeat() -> None:
    """cudaFree synchronises the device: a cache that reallocates per grow / gather must not reach the device
    allocator on every request. After a first request, the same workload allocates nothing."""
    memory = NumpyMemory()
    pool = BlockPool(memory)

    def request() -> None:
        pair = Pair(pool, staging=memory)
        pair.append([5])
        pair.device.fork(4)
        pair.host.fork(4)
        pair.append([1, 1, 1, 1])
        pair.device.gather([2, 2, 0])
        pair.host.gather([2, 2, 0])
        pair.append([3, 1, 1])
        pair.check(memory)
        pair.device.close()

    request()
    first = pool.device_allocs
    for _ in range(3):
        request()
    assert pool.device_allocs == first
    assert pool.kept_bytes > 0
    pool.close()
    assert memory.buffers == {}, "close returns every block to the device"


def test_device_cache_keeps_the_host_limits() -> None:
    memory = NumpyMemory()
    cache = DeviceKVCache(memory=memory, layers=1, kv_heads=1, head_dim=4, branches=2, max_context=16, capacity=4,
                          max_bytes=2 * 16 * 2 * 4 * 4)
    with pytest.raises(CacheLimitError, match="max context is 16.*--trt-max-context"):
        cache.reserve(17)
    cache.reserve(16)
    with pytest.raises(CacheLimitError, match="over the limit"):
        cache.gather([0, 1, 1])
    with pytest.raises(ConfigError, match="no host arrays"):
        cache.step_inputs(np.ones(2, np.int64), 1)


def test_feeding_the_whole_capacity_as_past_gives_the_same_logits(tiny_plain_bundle: Path) -> None:
    """The native backend binds the cache buffer itself (capacity slots, holes masked) instead of copying out the
    longest branch's slots: check on ONNX Runtime CPU that the plain graph gives the same logits that way."""
    entry = load_manifest(tiny_plain_bundle).models["verifier"]
    engine = OrtEngine.from_bundle(bundle_dir=tiny_plain_bundle, entry=entry)
    arch = entry.architecture
    cache = KVCache(layers=arch.layers, kv_heads=arch.kv_heads, head_dim=arch.head_dim, branches=3,
                    max_context=arch.max_context, capacity=32)
    rng = np.random.default_rng(1)
    ids = rng.integers(3, arch.vocab_size, size=(3, 6))
    n_new = np.array([6, 2, 4])
    engine.step(cache=cache, input_ids=ids, n_new=n_new, logits_index=np.maximum(n_new - 1, 0)[:, None])
    for new, n in ((1, np.array([1, 1, 0])), (3, np.array([3, 1, 2]))):
        step_ids = rng.integers(3, arch.vocab_size, size=(3, new))
        index = np.tile(np.arange(new), (3, 1))
        mask, positions = step_mask_positions(lengths=cache.lengths, n_new=n, past=cache.capacity, new_tokens=new)
        via_capacity, _, _ = engine.forward(input_ids=step_ids, position_ids=positions, attention_mask=mask,
                                            logits_index=index, past_keys=cache.keys, past_values=cache.values)
        expected = engine.step(cache=cache, input_ids=step_ids, n_new=n, logits_index=index)
        for b in range(3):
            assert np.allclose(via_capacity[b, :n[b]], expected[b, :n[b]], atol=1e-5)


# ---- the TensorRT ONNX parser support check ------------------------------------------------------------------


def test_the_pinned_support_matrix_names_its_source() -> None:
    assert "onnx/onnx-tensorrt" in SOURCE and "10.1" in SOURCE
    known = set(ONNX_TYPE_NAMES.values()) | {"FP8", "INT4"}
    assert all(set(types) <= known for types in SUPPORTED.values())
    assert "GroupQueryAttention" not in SUPPORTED and "MatMulInteger" not in SUPPORTED


def fp16_copy(bundle: Path, role: str, dst: Path, **kwargs: int) -> Path:
    entry = load_manifest(bundle).models[role]
    to_fp16_onnx(bundle / entry.file, dst, kv_names=kv_cache_io(entry.kv_cache, entry.architecture.layers),
                 **kwargs)
    return dst


def test_plain_graphs_use_only_what_the_tensorrt_parser_supports(tiny_plain_bundle: Path, tmp_path: Path) -> None:
    for role in ("speculator", "verifier"):
        path = tiny_plain_bundle / load_manifest(tiny_plain_bundle).models[role].file  # one graph for one source
        assert onnx_op_problems(onnx.load(str(path))) == []
        model = onnx.load(str(fp16_copy(tiny_plain_bundle, role, tmp_path / f"{role}-fp16.onnx")))  # TensorRT 11
        onnx.checker.check_model(model)
        assert any(t.data_type == TensorProto.FLOAT16 for t in model.graph.initializer)
        assert onnx_op_problems(model) == []


def test_fp16_networks_keep_norms_softmax_and_the_rotary_chain_in_fp32(tiny_plain_bundle: Path) -> None:
    graph = onnx.load(str(tiny_plain_bundle / "verifier" / "model.onnx"), load_external_data=False).graph
    by_name = {n.name: n for n in graph.node}
    rotary = rotary_nodes(graph)
    ops = sorted({by_name[n].op_type for n in rotary})
    assert {"Cos", "Sin", "Mul", "Cast", "Constant"} <= set(ops) and "MatMul" not in ops
    # Every node on a path from position_ids to cos/sin is in; nothing computed from the hidden states is.
    assert all("layers" not in n and "attn" not in n for n in rotary), rotary
    kept = fp32_tensors(graph)
    for node in graph.node:
        if node.op_type in ("Pow", "ReduceMean", "Softmax", "Cos", "Sin"):
            assert set(node.output) <= kept
        if node.op_type == "MatMul":
            assert not set(node.output) & kept


def test_the_fp16_graph_keeps_fp32_angles_and_an_fp16_kv_cache(tiny_plain_bundle: Path, tmp_path: Path) -> None:
    """TensorRT 11 builds fp16 engines from this graph. Its KV cache inputs/outputs are fp16 (keep_io_types=True
    kept them fp32: double the memory and a cast per layer); ids, mask and logits keep their types; no node of
    the rotary chain reads an fp16 round trip (the converter casts between blocked nodes: folded); and the graph
    runs on ONNX Runtime CPU close to the fp32 one."""
    import onnxruntime as ort

    entry = load_manifest(tiny_plain_bundle).models["verifier"]
    arch = entry.architecture
    half = fp16_copy(tiny_plain_bundle, "verifier", tmp_path / "v16.onnx")
    model = onnx.load(str(half))
    types = {v.name: v.type.tensor_type.elem_type for v in [*model.graph.input, *model.graph.output]}
    for name in kv_cache_io(entry.kv_cache, arch.layers):
        assert types[name] == TensorProto.FLOAT16, name
    assert types["input_ids"] == TensorProto.INT64 and types["logits"] == TensorProto.FLOAT
    producer = {out: n for n in model.graph.node for out in n.output}
    chain = set(rotary_nodes(onnx.load(str(tiny_plain_bundle / "verifier" / "model.onnx")).graph))
    for node in model.graph.node:
        if node.name in chain:
            for name in node.input:
                src = producer.get(name)
                to = [a.i for a in src.attribute if a.name == "to"] if src is not None and src.op_type == "Cast" else []
                assert to != [TensorProto.FLOAT16], f"{node.name} reads an fp16 value: {name}"
    rng = np.random.default_rng(0)
    n = arch.max_context - 1
    feed = {"input_ids": rng.integers(3, arch.vocab_size, (2, n)), "position_ids": np.tile(np.arange(n), (2, 1)),
            "attention_mask": np.ones((2, n), np.int64), "logits_index": np.array([[n - 1], [n - 1]])}
    empty = np.zeros((2, arch.kv_heads, 0, arch.head_dim), np.float32)
    for i in range(arch.layers):
        feed.update({entry.kv_cache["past_key"].format(i): empty, entry.kv_cache["past_value"].format(i): empty})
    full = ort.InferenceSession(str(tiny_plain_bundle / "verifier" / "model.onnx")).run(["logits"], feed)[0]
    feed16 = {k: (v.astype(np.float16) if k.startswith("past") else v) for k, v in feed.items()}
    halved = ort.InferenceSession(str(half)).run(["logits"], feed16)[0]
    assert np.abs(full - halved).max() < 2e-2


def test_the_fp16_conversion_works_from_paths_and_writes_external_data(tiny_plain_bundle: Path,
                                                                      tmp_path: Path) -> None:
    """Over 2 GB, an in-memory ModelProto cannot be shape-inferred or serialized: the conversion reads the model
    by path (shape inference through infer_shapes_path) and writes weights as external data past a threshold
    (here forced with a threshold of 0, on the tiny model; a real > 2 GB model was not run here)."""
    half = fp16_copy(tiny_plain_bundle, "verifier", tmp_path / "big.onnx", external_over=0)
    assert (tmp_path / "big.onnx.data").stat().st_size > 0
    model = onnx.load(str(half))
    assert onnx_op_problems(model) == []


def test_the_gqa_graph_is_not_for_tensorrt(tiny_bundle: Path) -> None:
    problems = onnx_op_problems(onnx.load(str(tiny_bundle / "verifier" / "model.onnx")))
    assert any("com.microsoft" in p for p in problems)


def test_the_support_check_catches_operators_types_and_constant_inputs() -> None:
    x = helper.make_tensor_value_info("x", TensorProto.DOUBLE, [2, 3])
    axes = helper.make_tensor_value_info("axes", TensorProto.INT64, [1])
    y = helper.make_tensor_value_info("y", TensorProto.DOUBLE, None)
    nodes = [
        helper.make_node("Add", ["x", "x"], ["a"], name="add"),
        helper.make_node("Unique", ["a"], ["u"], name="unique"),
        helper.make_node("Slice", ["a", "starts", "ends", "axes"], ["y"], name="slice"),
    ]
    inits = [helper.make_tensor("starts", TensorProto.INT64, [1], [0]),
             helper.make_tensor("ends", TensorProto.INT64, [1], [1])]
    model = helper.make_model(helper.make_graph(nodes, "g", [x, axes], [y], inits),
                              opset_imports=[helper.make_opsetid("", 21)])
    problems = "\n".join(onnx_op_problems(model))
    assert "opset 21 is outside" in problems
    assert "Add node add: tensor x is DOUBLE" in problems
    assert "Unique is not in the TensorRT parser's support matrix" in problems
    assert "Slice node slice: input 3 (axes) must be an initializer" in problems


# ---- the missing-TensorRT messages ----------------------------------------------------------------------------


@pytest.mark.skipif(HAS_TENSORRT, reason="tensorrt is installed: the missing-package message cannot show")
def test_export_trt_without_tensorrt_says_what_to_install(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from specreason_export.cli import main

    assert main(["--trt", "--out", str(tmp_path / "b"), "-q"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "TensorRT is not installed" in err
    assert "pip install 'specreason-rt[trt-cu12]'" in err
    assert not (tmp_path / "b").exists()


@pytest.mark.skipif(HAS_TENSORRT, reason="tensorrt is installed: the missing-package message cannot show")
def test_runtime_trt_backend_without_tensorrt_says_what_to_install(tiny_plain_bundle: Path) -> None:
    from specreason_rt.backends.providers import ProviderConfig
    from specreason_rt.bundle import Bundle

    with pytest.raises(ConfigError, match=r"tensorrt Python package.*pip install 'specreason-rt\[trt-cu12\]'"):
        Bundle(tiny_plain_bundle, roles=["verifier"], providers=ProviderConfig(name="trt"))


@pytest.mark.parametrize("argv, message", [
    (["--precision", "fp16"], "--precision fp16 is for TensorRT engines: add --trt"),
    (["--trt", "--precision", "int4"], "--trt builds fp32 or fp16 engines, not int4"),
    (["--trt", "--max-branches", "0"], "max_branches must be >= 1"),
])
def test_export_refuses_bad_trt_options(argv: list[str], message: str, tmp_path: Path,
                                        capsys: pytest.CaptureFixture) -> None:
    from specreason_export.cli import main

    assert main([*argv, "--out", str(tmp_path / "b"), "-q"]) == 1
    assert message in capsys.readouterr().err


def test_trt_export_forces_plain_attention_and_refuses_gqa() -> None:
    from specreason_export.bundle import ExportOptions
    from specreason_export.errors import ExportError
    from specreason_export.trt import TrtOptions

    assert ExportOptions(trt=TrtOptions()).attention == "plain"
    with pytest.raises(ExportError, match="--trt needs plain attention"):
        ExportOptions(trt=TrtOptions(), attention="gqa")
    with pytest.raises(ExportError, match="engine precision must be fp32 or fp16"):
        TrtOptions(precision="int8")


def test_the_spanning_profile_holds_every_regime(tiny_plain_bundle: Path) -> None:
    from specreason_rt.backends.trt.plan import spanning_profile

    inputs = plain_inputs(tiny_plain_bundle)
    profiles = plan_profiles(limits=LIMITS, inputs=inputs, min_past=0)
    one = spanning_profile(profiles)
    for branches, new, past, k in ((8, 1, 128, 1), (3, 7, 40, 7), (1, 64, 0, 1), (8, 64, 128, 16), (5, 1, 0, 1)):
        dims = step_dims(inputs=inputs, branches=branches, new_tokens=new, past_tokens=past, logit_positions=k)
        assert one.holds(dims)
    assert not one.holds(step_dims(inputs=inputs, branches=9, new_tokens=1, past_tokens=1, logit_positions=1))
    assert one.shapes["input_ids"] == ((1, 1), (8, 1), (8, 64))  # opt: decode's


def test_each_thread_that_touches_cuda_sets_the_engine_device() -> None:
    """cudaSetDevice is per host thread: a pool or server worker that never called it works on GPU 0. The guard
    sets the engine's device once in every thread, and again after another engine's guard switched it."""
    import threading

    from specreason_rt.backends.trt.engine import DeviceGuard

    calls: list[tuple[str, int]] = []

    def set_device(device: int) -> None:
        calls.append((threading.current_thread().name, device))

    gpu1, gpu0 = DeviceGuard(device_id=1, set_device=set_device), DeviceGuard(device_id=0, set_device=set_device)

    def worker() -> None:
        gpu1.use()
        gpu1.use()  # no second call: this thread is on GPU 1 already

    threads = [threading.Thread(target=worker, name=f"w{i}") for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(calls) == [("w0", 1), ("w1", 1), ("w2", 1)]
    calls.clear()
    gpu1.use()
    gpu0.use()
    gpu1.use()
    name = threading.current_thread().name
    assert calls == [(name, 1), (name, 0), (name, 1)]


def test_engine_scratch_buffers_are_freed_on_close() -> None:
    """TrtEngine.close frees its scratch buffers (the logits one is ~0.6 GB for a 152k vocabulary at 8 branches x
    128 positions) and its pool; here the buffer classes it closes, on the fake device memory."""
    from specreason_rt.backends.trt.engine import _Scratch

    memory = NumpyMemory()
    pool = BlockPool(memory)
    scratch = _Scratch(pool)
    first = scratch.ensure(1000)
    assert scratch.ensure(900) == first, "reused while it fits"
    scratch.ensure(3000)  # grows: the old block goes back to the pool
    cache = DeviceKVCache(memory=pool, layers=1, kv_heads=1, head_dim=4, branches=2, max_context=16)
    scratch.close()
    scratch.close()  # idempotent
    assert cache.address in memory.buffers
    pool.close()
    assert memory.buffers == {}


def test_both_backends_meet_the_engine_interface(tiny_plain_bundle: Path) -> None:
    import inspect

    from specreason_rt.backends.base import Engine
    from specreason_rt.backends.trt.engine import TrtEngine

    entry = load_manifest(tiny_plain_bundle).models["verifier"]
    ort_engine = OrtEngine.from_bundle(bundle_dir=tiny_plain_bundle, entry=entry)
    assert isinstance(ort_engine, Engine)
    cache = ort_engine.new_cache(branches=2, capacity=8, max_bytes=None)
    assert (cache.branches, cache.capacity, cache.kv_heads) == (2, 8, entry.architecture.kv_heads)
    ort_engine.close()
    members = [m for m in dir(Engine) if not m.startswith("_")]
    assert set(members) >= {"new_cache", "step", "step_with_values", "close"}
    assert issubclass(TrtEngine, Engine) and issubclass(OrtEngine, Engine)
    for name in ("new_cache", "_step", "step", "step_with_values", "close"):
        expected = inspect.signature(getattr(Engine, name)).parameters.keys()
        assert inspect.signature(getattr(TrtEngine, name)).parameters.keys() == expected, name
    init = inspect.getsource(TrtEngine.__init__)
    assert "self.has_value =" in init and "self.ort_seconds =" in init
