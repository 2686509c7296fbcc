"""The runtime side of the bundle contract: manifest checks, the ORT engine and the KV cache."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from specreason_rt.backends.ort import OrtEngine
from specreason_rt.errors import BundleError, CacheLimitError
from specreason_rt.kv_cache import KVCache
from specreason_rt.manifest import load_manifest


@pytest.fixture()
def bundle_copy(tmp_path: Path, tiny_bundle: Path) -> Path:
    dst = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, dst)
    return dst


def edit_manifest(bundle: Path, edit) -> None:
    path = bundle / "manifest.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def test_missing_manifest(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="has no manifest.json"):
        load_manifest(tmp_path)


def test_not_a_directory(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="is not a directory"):
        load_manifest(tmp_path / "nope")


def test_bad_json(bundle_copy: Path) -> None:
    (bundle_copy / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        load_manifest(bundle_copy)


def test_wrong_schema_version(bundle_copy: Path) -> None:
    edit_manifest(bundle_copy, lambda d: d.update(schema_version=99))
    with pytest.raises(BundleError, match="schema_version 99 is not supported"):
        load_manifest(bundle_copy)


def test_missing_file(bundle_copy: Path) -> None:
    (bundle_copy / "verifier" / "tokenizer.json").unlink()
    with pytest.raises(BundleError, match="verifier/tokenizer.json .* is missing"):
        load_manifest(bundle_copy)


def test_hash_mismatch(bundle_copy: Path) -> None:
    path = bundle_copy / "verifier" / "model.onnx"
    with open(path, "ab") as f:
        f.write(b"\0")
    with pytest.raises(BundleError, match="verifier/model.onnx has .* bytes, the manifest records"):
        load_manifest(bundle_copy)  # the cheap check at every load: sizes
    data = bytearray(path.read_bytes()[:-1])
    data[-1] ^= 1
    path.write_bytes(bytes(data))  # same size, one bit flipped
    with pytest.raises(BundleError, match="verifier/model.onnx does not match its hash"):
        load_manifest(bundle_copy, integrity="full")


def test_io_names_must_match_the_graph(bundle_copy: Path) -> None:
    """A renamed input no longer fits the attention variant: refused when the manifest loads, before any graph."""
    def rename(d: dict) -> None:
        d["models"]["speculator"]["io"]["inputs"][0]["name"] = "tokens"

    edit_manifest(bundle_copy, rename)
    with pytest.raises(BundleError, match=r"io.inputs do not fit .*unexpected \['tokens'\]"):
        load_manifest(bundle_copy)


class Runner:
    """Drives one engine + cache the way the runtime does, for exact comparisons."""

    def __init__(self, bundle: Path) -> None:
        self.entry = load_manifest(bundle).models["speculator"]
        self.engine = OrtEngine.from_bundle(bundle_dir=bundle, entry=self.entry)

    def cache(self, branches: int = 1) -> KVCache:
        a = self.entry.architecture
        return KVCache(layers=a.layers, kv_heads=a.kv_heads, head_dim=a.head_dim, branches=branches,
                       max_context=a.max_context, capacity=4)

    def step(self, cache: KVCache, tokens: list[list[int]]) -> np.ndarray:
        """Feed tokens[b] to branch b; return logits at each branch's last new token [branches, vocab]."""
        n_new = np.array([len(t) for t in tokens], np.int64)
        width = int(n_new.max())
        ids = np.zeros((cache.branches, width), np.int64)
        for b, t in enumerate(tokens):
            ids[b, :len(t)] = t
        logits = self.engine.step(cache=cache, input_ids=ids, n_new=n_new, logits_index=(n_new - 1)[:, None])
        return logits[:, 0]

    def fresh(self, tokens: list[int]) -> np.ndarray:
        return self.step(self.cache(), [tokens])[0]


def test_fork_gather_rewind_continue_like_fresh_branches(any_tiny_bundle: Path) -> None:
    r = Runner(any_tiny_bundle)
    prompt = [1, 40, 41, 42, 43, 44]
    cache = r.cache()
    r.step(cache, [prompt])
    cache.fork(3)  # prompt -> 3 branches, no recompute
    out = r.step(cache, [[50, 51], [60], [70, 71, 72]])  # ragged continuations
    for b, cont in enumerate([[50, 51], [60], [70, 71, 72]]):
        np.testing.assert_allclose(out[b], r.fresh(prompt + cont), atol=1e-5)

    cache.gather([2, 0, 0])  # reorder and duplicate
    out = r.step(cache, [[80], [81], [82]])
    for b, seq in enumerate([[70, 71, 72, 80], [50, 51, 81], [50, 51, 82]]):
        np.testing.assert_allclose(out[b], r.fresh(prompt + seq), atol=1e-5)

    cache.rewind(0, len(prompt) + 1)  # drop "71 72 80" from branch 0: a rejected step
    out = r.step(cache, [[90], [91], [92]])
    np.testing.assert_allclose(out[0], r.fresh(prompt + [70, 90]), atol=1e-5)
    np.testing.assert_allclose(out[1], r.fresh(prompt + [50, 51, 81, 91]), atol=1e-5)


def test_logits_only_where_asked(any_tiny_bundle: Path) -> None:
    r = Runner(any_tiny_bundle)
    cache = r.cache()
    ids = np.arange(10, 17, dtype=np.int64)[None]
    every = r.engine.step(cache=cache, input_ids=ids, n_new=np.array([7]), logits_index=np.arange(7)[None])
    cache = r.cache()
    last = r.engine.step(cache=cache, input_ids=ids, n_new=np.array([7]), logits_index=np.array([[6]]))
    assert every.shape == (1, 7, r.entry.architecture.vocab_size) and last.shape == (1, 1, every.shape[2])
    np.testing.assert_allclose(last[0, 0], every[0, 6], atol=1e-6)


def test_cache_refuses_past_max_context(tiny_bundle: Path) -> None:
    r = Runner(tiny_bundle)
    cache = r.cache()
    too_long = r.entry.architecture.max_context + 1
    with pytest.raises(CacheLimitError, match="max context"):
        cache.append([np.zeros((1, r.entry.architecture.kv_heads, too_long, r.entry.architecture.head_dim),
                               np.float32)] * r.entry.architecture.layers,
                     [np.zeros((1, r.entry.architecture.kv_heads, too_long, r.entry.architecture.head_dim),
                               np.float32)] * r.entry.architecture.layers, np.array([too_long]))


@pytest.mark.parametrize("branches", [1, 2])
def test_chunked_prefill_equals_one_forward(any_tiny_bundle: Path, branches: int) -> None:
    """A long span runs as chunks of RoleModel.prefill_chunk new tokens: same logits, same cache afterwards."""
    from specreason_rt.model import RoleModel

    entry = load_manifest(any_tiny_bundle).models["speculator"]
    model = RoleModel(bundle_dir=any_tiny_bundle, entry=entry)
    rng = np.random.default_rng(0)
    rows = [rng.integers(4, entry.architecture.vocab_size, size=n).tolist() for n in (37, 20)[:branches]]
    results = {}
    for chunk in (1000, 8):  # one call, then chunks of 8 (37 tokens: 5 chunks, the last ragged)
        model.prefill_chunk = chunk
        cache = model.new_cache(branches=branches, capacity=64)
        last = model.forward(cache=cache, tokens=rows)  # [branches, vocab]
        lengths = cache.lengths.copy()
        nxt = model.forward(cache=cache, tokens=[[5, 6]] * branches)  # the cache continues like one call's
        every = model.forward(cache=model.new_cache(branches=branches, capacity=64), tokens=rows, all_logits=True)
        results[chunk] = (last, lengths, nxt, every)
    one, chunked = results[1000], results[8]
    np.testing.assert_array_equal(one[1], chunked[1])
    np.testing.assert_allclose(chunked[0], one[0], atol=1e-5)
    np.testing.assert_allclose(chunked[2], one[2], atol=1e-5)
    for b, row in enumerate(rows):
        np.testing.assert_allclose(chunked[3][b, :len(row)], one[3][b, :len(row)], atol=1e-5)


def test_chunked_prefill_keeps_the_value_head(builtin_bundle: Path) -> None:
    """values=True through chunks: the head's outputs at every position and at the last equal one call's."""
    from specreason_rt.model import RoleModel

    entry = load_manifest(builtin_bundle).models["verifier"]
    model = RoleModel(bundle_dir=builtin_bundle, entry=entry)
    assert model.has_value_head
    row = np.random.default_rng(1).integers(4, entry.architecture.vocab_size, size=21).tolist()
    out = {}
    for chunk in (1000, 6):
        model.prefill_chunk = chunk
        last = model.forward(cache=model.new_cache(), tokens=[row], values=True)
        every = model.forward(cache=model.new_cache(), tokens=[row], all_logits=True, values=True)
        out[chunk] = (last, every)
    for (a, b) in zip(out[1000], out[6], strict=True):
        for x, y in zip(a, b, strict=True):
            assert x.shape == y.shape
            np.testing.assert_allclose(y, x, atol=1e-5)
