"""Shared-prefix KV (issue 15, point 3): branches forked from one prompt hold its keys/values once.

The "prefix" attention variant reads the prompt as one segment [1, kv_heads, P, head_dim] beside every branch's
own past. Each test compares the shared layout with the unshared one (every branch its own copy: the path before
sharing, same graph) and with the GroupQueryAttention bundle of the same weights (the default path): logits
within 1e-4, greedy tokens identical.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from specreason_rt.bundle import Bundle
from specreason_rt.config import make_config
from specreason_rt.context import Context
from specreason_rt.decode import generate
from specreason_rt.errors import CacheLimitError
from specreason_rt.kv_cache import KVCache
from specreason_rt.model import RoleModel
from specreason_rt.reasoner import Reasoner
from specreason_rt.sampling import SamplingParams

UNSHARED = 10**9  # a shared_prefix_min_tokens no prompt reaches: every fork copies (the path before sharing)


@pytest.fixture(scope="session")
def tiny_prefix_bundle(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> Path:
    from tests.conftest import _tiny_bundle

    return _tiny_bundle(tmp_path_factory, tiny_llama_dir, "prefix")


@pytest.fixture(scope="session")
def builtin_prefix_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from specreason_export.bundle import ExportOptions, write_bundle

    out = tmp_path_factory.mktemp("bundles") / "builtin-fp32-prefix"
    write_bundle(ExportOptions(out=out, attention="prefix", show_progress=False))
    return out


def _sharing(bundle: Bundle, min_tokens: int) -> Bundle:
    for model in bundle.models.values():
        model.shared_prefix_min_tokens = min_tokens
    return bundle


# -- the cache alone (numpy) ------------------------------------------------------------------------------------

def _cache(*, share: bool, branches: int = 1, capacity: int = 8, max_bytes: int | None = None) -> KVCache:
    return KVCache(layers=2, kv_heads=2, head_dim=4, branches=branches, max_context=256, capacity=capacity,
                   max_bytes=max_bytes, share_prefix=share, min_prefix=1)


def _append(cache: KVCache, rng: np.random.Generator, n_new: list[int]) -> None:
    n = np.array(n_new, np.int64)
    width = max(int(n.max()), 1)
    shape = (cache.branches, cache.kv_heads, width, cache.head_dim)
    cache.append([rng.standard_normal(shape).astype(np.float32) for _ in range(cache.layers)],
                 [rng.standard_normal(shape).astype(np.float32) for _ in range(cache.layers)], n)


def _tokens(cache: KVCache, b: int) -> list[np.ndarray]:
    """Branch b's keys then values per layer over all its tokens: [kv_heads, length, head_dim] each."""
    own = int(cache.lengths[b]) - cache.prefix_len
    out = []
    for shared, mine in ((cache.prefix_keys, cache.keys), (cache.prefix_values, cache.values)):
        for layer in range(cache.layers):
            parts = [shared[layer][0]] if cache.prefix_len else []
            out.append(np.concatenate([*parts, mine[layer][b, :, :own]], axis=1))
    return out


def _same_branches(a: KVCache, b: KVCache) -> None:
    assert a.lengths.tolist() == b.lengths.tolist()
    for i in range(a.branches):
        for x, y in zip(_tokens(a, i), _tokens(b, i), strict=True):
            np.testing.assert_array_equal(x, y)


def test_fork_holds_the_prompt_once_and_every_operation_matches_the_copies() -> None:
    shared, copies = _cache(share=True), _cache(share=False)
    for cache in (shared, copies):
        _append(cache, np.random.default_rng(0), [20])
        cache.fork(4)
    assert shared.prefix_len == 20 and copies.prefix_len == 0
    assert shared.resident_bytes < copies.resident_bytes
    steps: list[tuple[str, object]] = [("append", [3, 1, 0, 2]), ("gather", [2, 0, 0, 3]), ("rewind", (1, 21)),
                                       ("append", [5, 5, 1, 2]), ("gather", [3, 1]), ("append", [40, 2])]
    for op, arg in steps:  # the same operations with the same data on both layouts
        for cache in (shared, copies):
            if op == "append":
                _append(cache, np.random.default_rng(len(str(arg))), list(arg))  # type: ignore[arg-type]
            elif op == "gather":
                cache.gather(list(arg))  # type: ignore[arg-type]
            else:
                cache.rewind(*arg)  # type: ignore[misc]
        _same_branches(shared, copies)
    assert shared.prefix_len == 20  # nothing above needed a branch's own copy of the prompt


def test_rewind_into_the_prefix_gives_each_branch_its_copy() -> None:
    shared, copies = _cache(share=True), _cache(share=False)
    for cache in (shared, copies):
        _append(cache, np.random.default_rng(1), [10])
        cache.fork(3)
        _append(cache, np.random.default_rng(2), [2, 2, 2])
        cache.rewind(1, 4)  # below the 10-token prompt
    assert shared.prefix_len == 0
    _same_branches(shared, copies)


def test_concat_of_different_prompts_unshares_both() -> None:
    a, b, ref_a, ref_b = _cache(share=True), _cache(share=True), _cache(share=False), _cache(share=False)
    for seed, pair in enumerate(((a, ref_a), (b, ref_b))):
        for cache in pair:
            _append(cache, np.random.default_rng(seed), [6 + seed])
            cache.fork(2)
    a.concat(b)
    ref_a.concat(ref_b)
    assert a.prefix_len == 0
    _same_branches(a, ref_a)


def test_a_fork_of_a_forked_branch_extends_the_prefix_only_when_its_tokens_outnumber_it() -> None:
    cache = _cache(share=True)
    _append(cache, np.random.default_rng(0), [8])
    cache.fork(2)
    cache.gather([1])
    _append(cache, np.random.default_rng(1), [3])
    cache.fork(2)  # 3 own tokens < 8 shared: copied per branch, the prefix stays
    assert cache.prefix_len == 8
    ref = _cache(share=False)
    _append(ref, np.random.default_rng(0), [8])
    _append(ref, np.random.default_rng(1), [3])
    ref.fork(2)
    _same_branches(cache, ref)
    cache.gather([0])
    ref.gather([0])
    for c in (cache, ref):
        _append(c, np.random.default_rng(2), [9])
    cache.fork(3)  # 12 own tokens >= 8: they join the prefix (one copy)
    ref.fork(3)
    assert cache.prefix_len == 20
    _same_branches(cache, ref)


def test_one_branch_folds_its_tokens_into_the_prefix_and_a_rewind_cuts_it() -> None:
    shared, copies = _cache(share=True), _cache(share=False)
    shared.min_prefix = 4
    seen = []
    for n in [3, 2, 1, 1, 1, 6, 1]:  # folds at 5 tokens, then whenever its own reach max(4, sqrt(2 * prefix))
        for cache in (shared, copies):
            cache.maybe_fold()  # what every forward does first (step_inputs)
            _append(cache, np.random.default_rng(n), [n])
        seen.append(shared.prefix_len)
        _same_branches(shared, copies)
    assert seen == [0, 0, 5, 5, 5, 5, 14]  # folded before the forward after the one that made it due
    for cache in (shared, copies):
        cache.rewind(0, 9)
    assert shared.prefix_len == 9 and shared.prefix_keys[0].flags.c_contiguous
    _same_branches(shared, copies)
    for cache in (shared, copies):
        _append(cache, np.random.default_rng(9), [2])
    _same_branches(shared, copies)


def test_short_prompts_and_the_memory_limit() -> None:
    cache = KVCache(layers=1, kv_heads=1, head_dim=4, branches=1, max_context=64, capacity=8, share_prefix=True,
                    min_prefix=16)
    _append(cache, np.random.default_rng(0), [8])
    cache.fork(2)
    assert cache.prefix_len == 0  # under min_prefix: copied, as before
    per_token = 2 * 4 * 4  # keys + values of one token
    # 8 branches over a 40-token prompt fit a limit that 8 copies would not.
    limited = KVCache(layers=1, kv_heads=1, head_dim=4, branches=1, max_context=64, capacity=44, share_prefix=True,
                      min_prefix=1, max_bytes=(40 + 8 * 4) * per_token)
    _append(limited, np.random.default_rng(0), [40])
    limited.fork(8)
    assert limited.resident_bytes <= (40 + 8 * 4) * per_token
    with pytest.raises(CacheLimitError, match="own copy of the 40-token shared prefix"):
        limited.rewind(0, 10)


# -- the model: logits and tokens against the unshared and the gqa paths ----------------------------------------

def _forked_run(model: RoleModel, prompt: list[int], feeds: list[list[int]], steps: int) -> tuple[np.ndarray, ...]:
    """Prefill the prompt, fork 4 branches, append a ragged span per branch, decode `steps` greedy tokens (all
    branches fed their own argmax); return every logit row seen."""
    cache = model.new_cache(branches=1, capacity=len(prompt) + 40)
    rows = [model.forward(cache=cache, tokens=[prompt])]
    cache.fork(len(feeds))
    logits = model.forward(cache=cache, tokens=feeds, all_logits=True)  # [branches, width, vocab]
    rows.append(logits)
    last = np.array([logits[b, len(f) - 1] for b, f in enumerate(feeds)])
    for _ in range(steps):
        last = model.forward(cache=cache, tokens=[[int(t)] for t in last.argmax(-1)])
        rows.append(last)
    if model.shared_prefix_min_tokens <= len(prompt) and model.entry.kv_cache["attention"] == "prefix":
        assert cache.prefix_len == len(prompt)
    return tuple(rows)


def test_forked_logits_match_unshared_and_gqa(tiny_prefix_bundle: Path, tiny_bundle: Path) -> None:
    prompt = [5, 9, 11, 3, 7, 21, 4, 8, 30, 12, 6]
    feeds = [[3, 4, 5], [9], [10, 11, 12, 13, 14], [7, 7]]
    runs = []
    for path, min_tokens in ((tiny_prefix_bundle, 1), (tiny_prefix_bundle, UNSHARED), (tiny_bundle, 1)):
        model = _sharing(Bundle(path, roles=["speculator"]), min_tokens).models["speculator"]
        runs.append(_forked_run(model, prompt, feeds, steps=12))
    shared = runs[0]
    for other in runs[1:]:
        for a, b in zip(shared, other, strict=True):
            if a.ndim == 3:  # ragged rows: only each branch's real positions
                for i, f in enumerate(feeds):
                    np.testing.assert_allclose(a[i, :len(f)], b[i, :len(f)], atol=1e-4)
            else:
                np.testing.assert_allclose(a, b, atol=1e-4)
                assert (a.argmax(-1) == b.argmax(-1)).all()


def test_generate_branches_identical_to_gqa(tiny_prefix_bundle: Path, tiny_bundle: Path) -> None:
    outs = []
    for path in (tiny_prefix_bundle, tiny_bundle):
        bundle = _sharing(Bundle(path, roles=["speculator"]), 1)
        model, tok = bundle.models["speculator"], bundle.tokenizers["speculator"]
        outs.append(generate(model=model, tokenizer=tok, prompts=[list(range(3, 20))], params=SamplingParams(),
                             rng=np.random.default_rng(0), max_tokens=24, branches_per_prompt=4))
    assert [o.tokens for o in outs[0]] == [o.tokens for o in outs[1]]


# -- every fork user on the built-in pair: the same run, token for token ----------------------------------------

GREEDY = {"speculator.temperature": 0.0}
RUNS = [
    ("best_of_n", {"search.n_specs": 4}),
    ("tree", {"search.beam_width": 3, "search.tree_depth": 2}),
    ("majority", {"search.n_specs": 5}),
    ("stepwise", {"stepwise.candidates": 3, "stepwise.threshold": 8.9}),
]


@pytest.fixture(scope="module")
def reasoners(builtin_prefix_bundle: Path, builtin_bundle: Path) -> dict[str, Reasoner]:
    return {"shared": Reasoner(_sharing(Bundle(builtin_prefix_bundle), 1)),
            "unshared": Reasoner(_sharing(Bundle(builtin_prefix_bundle), UNSHARED)),
            "gqa": Reasoner(builtin_bundle)}


@pytest.mark.parametrize("greedy", [True, False], ids=["greedy", "sampled"])
@pytest.mark.parametrize(("strategy", "fields"), RUNS, ids=[r[0] for r in RUNS])
def test_fork_users_produce_the_same_run(reasoners: dict[str, Reasoner], strategy: str, fields: dict,
                                         greedy: bool) -> None:
    for seed, q in enumerate(["37+45*3", "76-24*4+11"]):
        config = make_config(strategy=strategy, **{"seed": seed, **fields, **(GREEDY if greedy else {})})
        texts = {name: r.run(q, config) for name, r in reasoners.items()}
        ref = texts["gqa"]
        for name in ("shared", "unshared"):
            got = texts[name]
            assert got.text == ref.text and got.answer == ref.answer, (name, strategy, q)
            assert [c.text for c in got.candidates] == [c.text for c in ref.candidates], (name, strategy, q)


@pytest.mark.parametrize(("strategy", "fields"), RUNS, ids=[r[0] for r in RUNS])
def test_fork_users_on_the_tiny_llama(tiny_prefix_bundle: Path, tiny_bundle: Path, strategy: str,
                                      fields: dict) -> None:
    """The same on the tiny random Llama (built-in tokenizer): greedy runs on the prefix bundle, sharing from 1
    token, against the gqa bundle of the same weights."""
    shared = Reasoner(_sharing(Bundle(tiny_prefix_bundle), 1))
    gqa = Reasoner(tiny_bundle)
    config = make_config(strategy=strategy, **{"seed": 1, **fields, **GREEDY, "limits.max_tokens": 40,
                                               "limits.max_step_tokens": 12})
    for q in ["37+45*3", "76-24*4+11"]:
        got, ref = shared.run(q, config), gqa.run(q, config)
        assert got.text == ref.text and [c.text for c in got.candidates] == [c.text for c in ref.candidates]


def test_the_shared_run_held_the_prompt_once(builtin_prefix_bundle: Path) -> None:
    bundle = _sharing(Bundle(builtin_prefix_bundle, roles=["speculator"]), 1)
    model, tok = bundle.models["speculator"], bundle.tokenizers["speculator"]
    prompt = tok.encode("Q: 37+45*3\n", add_special_tokens=False)
    ctx = Context(model=model, tokenizer=tok, prompt=prompt, room=32)
    ctx.gather([0] * 4)
    assert ctx.cache.prefix_len == len(prompt) and ctx.cache.prefix_keys[0].shape[0] == 1


# -- what info and the bench report -----------------------------------------------------------------------------

def test_info_says_what_forked_branches_cost(tiny_prefix_bundle: Path, tiny_bundle: Path) -> None:
    from specreason_rt.manifest import load_manifest
    from tests.test_cli import run

    entry = load_manifest(tiny_prefix_bundle).models["speculator"]
    per_token = entry.architecture.kv_bytes_per_token()
    assert entry.kv_cache_bytes(branches=8, tokens=128, prompt_tokens=100) == (100 + 8 * 28) * per_token
    assert entry.kv_cache_bytes(branches=8, tokens=128, prompt_tokens=10) == 8 * 128 * per_token  # under the minimum
    shared = run("info", "--bundle", str(tiny_prefix_bundle), "--branches", "8", "--context", "128",
                 "--prompt-tokens", "100")
    assert shared.returncode == 0, shared.stderr
    mib = (100 + 8 * 28) * per_token / 2**20
    assert shared.stdout.count(f"forked from one 100-token prompt: {mib:.1f} MiB, the prompt held once") == 2
    copies = run("info", "--bundle", str(tiny_bundle), "--branches", "8", "--context", "128", "--prompt-tokens", "100")
    assert copies.stdout.count(f"every branch copies the prompt (a bundle exported with --attention prefix holds "
                               f"it once: {mib:.1f} MiB)") == 2
    bad = run("info", "--bundle", str(tiny_bundle), "--prompt-tokens", "-3")
    assert bad.returncode != 0 and bad.stderr.strip().splitlines() == ["specreason: error: --prompt-tokens must be "
                                                                       ">= 0, got -3"]


def test_bench_decode_fork_reports_the_kv_held(tiny_prefix_bundle: Path, tiny_bundle: Path) -> None:
    import json

    from tests.test_cli import run

    res = run("bench", "decode", "--bundle", str(tiny_prefix_bundle), "--fork", "--peer", "specreason-rt:gqa",
              str(tiny_bundle), "--branches", "4", "--contexts", "100", "--steps", "2", "--windows", "2", "--warmup",
              "1", "--no-floor", "--threads", "1", "--json")
    assert res.returncode == 0, res.stderr
    systems = json.loads(res.stdout)["cells"][0]["systems"]
    assert set(systems) == {"specreason-rt", "specreason-rt:copies", "specreason-rt:gqa"}
    per_token = 2 * 2 * 2 * 16 * 4  # keys + values, 2 layers, 2 kv heads, head size 16, fp32
    held = {name: s["kv_bytes"] for name, s in systems.items()}
    assert systems["specreason-rt"]["shared_prefix_tokens"] == 100
    assert held["specreason-rt"] < 2 * 100 * per_token  # the prompt once, plus each branch's few tokens
    assert held["specreason-rt:copies"] >= 4 * 100 * per_token and held["specreason-rt:gqa"] >= 4 * 100 * per_token


def test_the_serving_batch_on_a_prefix_bundle_reproduces_runs_alone(builtin_prefix_bundle: Path,
                                                                     builtin_bundle: Path) -> None:
    """Lanes join (concat: caches with different prefixes are unshared first), leave (gather) and fall back to
    one lane (folded into its prefix) in the pool's batch; best_of_n and tree run alone on the same worker. Default
    sharing threshold: some prompts are shorter than it, most are not."""
    from concurrent.futures import ThreadPoolExecutor

    from specreason_models.task import heldout_split
    from specreason_rt.pool import ReasonerPool

    problems = [p.question for p in heldout_split(n=8)]
    jobs = [(q, make_config(strategy="stepwise", seed=i, **{"stepwise.threshold": [5, 8.9][i % 2],
                                                             "stepwise.lookahead": [1, 3][i % 2]}))
            for i, q in enumerate(problems)]
    jobs += [(problems[0], make_config(strategy="best_of_n", seed=3)),
             (problems[1], make_config(strategy="tree", seed=4, **{"search.beam_width": 2}))]
    alone = Reasoner(builtin_bundle)
    expected = [alone.run(q, c).text for q, c in jobs]
    pool = ReasonerPool(builtin_prefix_bundle, workers=1, queue_size=64, max_batch=4)
    try:
        with ThreadPoolExecutor(len(jobs)) as ex:
            got = [f.result(timeout=300).text for f in [ex.submit(pool.run, q, c) for q, c in jobs]]
    finally:
        pool.close()
    assert got == expected


# -- every family's prefix graph against transformers, forked contexts past the sliding windows -----------------

@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gemma2", "gemma3_text", "phi3"])
def test_family_prefix_graph_matches_transformers_when_forked(family: str, tmp_path: Path) -> None:
    """A tiny sharp model of each family (tests/test_families.py): the prefix export validates (no prefix), and a
    30-token prompt held as the shared segment, forked into 3 branches that add 5 / 12 / 20 tokens in one ragged
    forward and then decode 3 tokens each, gives transformers' logits on each branch's whole sequence (contexts
    past every window, so the segment's window mask, soft-caps and per-layer rope tables are all exercised)."""
    torch = pytest.importorskip("torch")
    from specreason_export.onnx_export import KV_NAMES
    from specreason_rt.backends.ort import OrtEngine
    from tests.test_families import export_and_validate, tiny_model

    model = tiny_model(family)
    report = export_and_validate(model, tmp_path, "prefix")
    assert report["passed"], report
    assert report["shared_prefix"]["max_abs_logit_diff"] < 1e-4 and report["shared_prefix"]["prefix_tokens"] == 20
    cfg = model.config
    engine = OrtEngine(model_path=tmp_path / "prefix.onnx", layers=cfg.num_hidden_layers, kv_names=KV_NAMES["prefix"],
                       attention="prefix")
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    cache = KVCache(layers=cfg.num_hidden_layers, kv_heads=cfg.num_key_value_heads, head_dim=head_dim, branches=1,
                    max_context=cfg.max_position_embeddings, share_prefix=True, min_prefix=1)
    g = torch.Generator().manual_seed(5)
    prompt = torch.randint(3, cfg.vocab_size, (30,), generator=g).tolist()
    engine.step(cache=cache, input_ids=np.array([prompt]), n_new=np.array([30]),
                logits_index=np.zeros((1, 1), np.int64))
    cache.fork(3)
    assert cache.prefix_len == 30
    own = [torch.randint(3, cfg.vocab_size, (n,), generator=g).tolist() for n in (5, 12, 20)]
    ids = np.zeros((3, 20), np.int64)
    for b, t in enumerate(own):
        ids[b, :len(t)] = t
    index = np.tile(np.arange(20), (3, 1))
    rows = [list(r) for r in engine.step(cache=cache, input_ids=ids, n_new=np.array([5, 12, 20]), logits_index=index)]
    rows = [r[:len(t)] for r, t in zip(rows, own, strict=True)]
    for _ in range(3):
        nxt = [int(r[-1].argmax()) for r in rows]
        for b, t in enumerate(own):
            t.append(nxt[b])
        out = engine.step(cache=cache, input_ids=np.array(nxt)[:, None], n_new=np.ones(3, np.int64),
                          logits_index=np.zeros((3, 1), np.int64))
        for b in range(3):
            rows[b].append(out[b, 0])
    assert cache.prefix_len == 30  # shared throughout
    for b, t in enumerate(own):
        with torch.no_grad():
            ref = model(torch.tensor([prompt + t])).logits[0, 30:].numpy()  # [own, vocab]
        np.testing.assert_allclose(np.stack(rows[b]), ref, atol=1e-4)


def test_export_validation_sees_a_wrong_shared_prefix(tmp_path: Path) -> None:
    """A prefix graph that forgets the sliding window on the shared segment computes the unshared path right (so
    the comparison with transformers passes) but not the shared one: the export's own shared-prefix check refuses
    it."""
    pytest.importorskip("torch")
    from specreason_export.errors import ExportError
    from specreason_export.graph import Disabled
    from tests.test_families import export_and_validate, tiny_model

    with pytest.raises(ExportError, match="prompt shared differ from those with the prompt copied"):
        export_and_validate(tiny_model("mistral"), tmp_path, "prefix", disabled=Disabled(prefix_windows=True))


def test_gpt_oss_prefix_graph_with_sinks_and_windows(tmp_path: Path) -> None:
    """Attention sinks join the one softmax over the shared segment and the branch's own keys: the prefix export
    of a tiny sharp gpt_oss (window 8, sinks) matches transformers unshared and itself shared."""
    pytest.importorskip("torch")
    from tests.test_families import export_and_validate
    from tests.test_moe import sharp_moe_model

    report = export_and_validate(sharp_moe_model("gpt_oss"), tmp_path, "prefix")
    assert report["passed"] and report["max_abs_logit_diff"] < 1e-4, report
    assert report["shared_prefix"]["max_abs_logit_diff"] < 1e-4


def test_trt_refuses_a_prefix_export() -> None:
    from specreason_export.bundle import ExportOptions
    from specreason_export.errors import ExportError
    from specreason_export.trt import TrtOptions

    with pytest.raises(ExportError, match="drop --attention prefix"):
        ExportOptions(attention="prefix", trt=TrtOptions())


def test_bench_verify_on_a_prefix_bundle(tiny_prefix_bundle: Path) -> None:
    """Drafts on a shared 40-token context: one forward at B=3 vs one per draft at B=1. The single branch's 20
    draft tokens would be due to join its prefix at its next forward; the bench drops them before that (a cache
    that folded right after the forward held them in its prefix and broke)."""
    import json

    from tests.test_cli import run

    res = run("bench", "verify", "--bundle", str(tiny_prefix_bundle), "--context", "40", "--drafts", "3",
              "--draft-tokens", "20", "--repeats", "2", "--threads", "1", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["max_abs_logit_difference"] < 1e-4
