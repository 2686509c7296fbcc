"""Every decoder family (export/families.py): a tiny seeded model with sharp weights, exported with both attention
variants, validated against transformers over contexts longer than every window, and each math feature proven
visible: the same export with the feature left out must fail validation.

Sharp weights: random tiny models attend almost uniformly, so a missing window or rope detail barely moves their
logits. Scaling the query/key projections makes attention peaky, so such a bug moves logits far past the fp32
limit (1e-3).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from specreason_export.errors import ExportError  # noqa: E402
from specreason_export.families import check_config  # noqa: E402
from specreason_export.graph import Disabled  # noqa: E402
from specreason_export.hf_compat import no_init_weights  # noqa: E402
from specreason_export.onnx_export import export_onnx  # noqa: E402
from specreason_export.validate import reference_continuations, validate  # noqa: E402

VOCAB = 256
TINY = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
            pad_token_id=0)
WINDOW = 16  # shorter than the validation contexts (prompts up to 41 tokens + 8 decode steps)
# family: (config class, config fields beyond TINY, the features a feature-off export must fail on)
CASES: dict[str, tuple[str, dict[str, Any], list[str]]] = {
    "llama": ("LlamaConfig", {}, ["rope"]),
    "mistral": ("MistralConfig", {"sliding_window": WINDOW}, ["windows"]),
    "qwen2": ("Qwen2Config", {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 1},
              ["windows"]),
    "qwen3": ("Qwen3Config", {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 1},
              ["qk_norm", "windows"]),
    # soft-caps low enough that the tiny model's logits and scores reach them
    "gemma2": ("Gemma2Config", {"sliding_window": WINDOW, "attn_logit_softcapping": 5.0,
                                "final_logit_softcapping": 0.3, "query_pre_attn_scalar": 64},
               ["windows", "attn_softcap", "final_softcap", "embed_scale"]),
    "gemma3_text": ("Gemma3TextConfig", {"sliding_window": WINDOW, "layer_types": ["sliding_attention",
                                                                                 "full_attention"],
                                         "rope_local_base_freq": 100.0, "final_logit_softcapping": 0.3},
                    ["windows", "qk_norm", "rope_tables", "final_softcap"]),
    # longrope switches to its long factors past 24 tokens: the 41- and 30-token prompts use them, the 12-token
    # one (up to 20 tokens) the short ones
    "phi3": ("Phi3Config", {"partial_rotary_factor": 0.5, "sliding_window": 32, "original_max_position_embeddings": 24,
                            "rope_scaling": {"type": "longrope", "short_factor": [1.0, 1.5, 2.0, 4.0],
                                             "long_factor": [3.0, 5.0, 9.0, 17.0]}},
             ["windows", "rope_tables"]),
    "smollm3": ("SmolLM3Config", {"no_rope_layers": [1, 0], "use_sliding_window": False}, ["rope_tables"]),
    "olmo2": ("Olmo2Config", {}, ["qk_norm"]),
    "granite": ("GraniteConfig", {"embedding_multiplier": 6.0, "residual_multiplier": 0.5,
                                  "attention_multiplier": 0.1, "logits_scaling": 2.0}, ["embed_scale"]),
    "stablelm": ("StableLmConfig", {"partial_rotary_factor": 0.5, "qk_layernorm": True,
                                    "use_parallel_residual": True}, ["qk_norm", "rope"]),
    "gpt_neox": ("GPTNeoXConfig", {"rotary_pct": 0.5, "partial_rotary_factor": 0.5, "use_parallel_residual": True,
                                   "num_key_value_heads": None}, ["rope"]),
    "phi": ("PhiConfig", {"partial_rotary_factor": 0.5, "qk_layernorm": True}, ["qk_norm", "rope"]),
}
# Per family, config changes for the gqa export only. phi3: GroupQueryAttention's inputs do not say which tokens of
# a ragged batched prefill are padding, so longrope's switch is tested there with every row past it.
GQA_OVERRIDES: dict[str, dict[str, Any]] = {"phi3": {"original_max_position_embeddings": 8}}
@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny matmuls on a shared machine: torch's thread pool costs far more than it saves (15 ms per linear)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


SHARP = ("q_proj.weight", "k_proj.weight", "qkv_proj.weight", "query_key_value.weight")


def tiny_model(family: str, *, seed: int = 0, **overrides: Any) -> Any:
    """A seeded random 2-layer model of `family`, eager attention (the reference), query/key weights sharpened."""
    cls_name, extra, _ = CASES[family]
    torch.manual_seed(seed)
    cfg = getattr(transformers, cls_name)(**{**TINY, **extra, **overrides})
    # Our own init (transformers' stablelm init fails on its bias-free per-head norms): normal weights, norms and
    # biases random around their neutral values so that reusing the wrong norm module shows.
    with no_init_weights():
        model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.02 * (20.0 if name.endswith(SHARP) else 1.0))
            elif "norm" in name and name.endswith("weight"):
                p.normal_(1.0 if "gemma" not in family else 0.0, 0.1)  # gemma norms compute (1 + w)
            else:
                p.normal_(0.0, 0.02)
        model.tie_weights()
    return model


def prompts(seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (41, 30, 12)]


def export_and_validate(model: Any, tmp: Path, attention: str, *, disabled: Disabled | None = None,
                        precision: str = "fp32") -> dict[str, Any]:
    path = tmp / f"{attention}.onnx"
    export_onnx(model=model, out_path=path, attention=attention, disabled=disabled)
    # An explicit tolerance: a failing fp32 report comes back instead of raising (the feature-off tests read it).
    from specreason_export.validate import DEFAULT_TOLERANCES

    return validate(model=model, onnx_path=path, attention=attention, prompts=prompts(), precision=precision,
                    tolerance=DEFAULT_TOLERANCES[precision])


@pytest.mark.parametrize("family", list(CASES))
def test_family_exports_and_validates(family: str, tmp_path: Path) -> None:
    model = tiny_model(family)
    check_config(config=model.config, where=family)
    for attention in ("plain", "gqa"):
        if attention == "gqa" and family in GQA_OVERRIDES:
            model = tiny_model(family, **GQA_OVERRIDES[family])
        report = export_and_validate(model, tmp_path, attention)
        assert report["passed"], (attention, report)
        assert report["max_abs_logit_diff"] < 1e-4 and report["greedy_agreement"] == 1.0
        if report["smallest_window"] is not None:
            assert report["longest_context"] > report["smallest_window"]
    # The reference the validation compares with is transformers' own generate (its cache path, windows included).
    prompt = prompts()[0]
    ours = reference_continuations(model=model, prompts=[prompt], tokens=9)[0]
    out = model.generate(torch.tensor([prompt]), max_new_tokens=9, do_sample=False, min_new_tokens=9)
    assert out[0, len(prompt):].tolist() == ours


@pytest.mark.parametrize("family,feature", [(f, x) for f, (_, _, xs) in CASES.items() for x in xs])
def test_feature_left_out_fails_validation(family: str, feature: str, tmp_path: Path) -> None:
    """Each feature is visible to validation: the export without it misses the fp32 limit by far."""
    model = tiny_model(family)
    report = export_and_validate(model, tmp_path, "plain", disabled=Disabled(**{feature: True}))
    assert not report["passed"] and report["max_abs_logit_diff"] > 0.1, report


def test_sliding_window_mistral_reproduction(tmp_path: Path) -> None:
    """The issue's case: MistralConfig(sliding_window=32), a 41-token prompt. Both variants match transformers;
    without the window the export is wrong (the old behaviour), and fp32 validation says so as a bug."""
    model = tiny_model("mistral", sliding_window=32)
    for attention in ("plain", "gqa"):
        report = export_and_validate(model, tmp_path, attention)
        assert report["passed"] and report["longest_context"] == 41 + 8, report
    path = tmp_path / "nowindow.onnx"
    export_onnx(model=model, out_path=path, attention="gqa", disabled=Disabled(windows=True))
    with pytest.raises(ExportError, match="the export is wrong"):
        validate(model=model, onnx_path=path, attention="gqa", prompts=prompts(), precision="fp32")


def test_validation_reaches_past_the_window(tmp_path: Path) -> None:
    """Short prompts are extended so that the context passes the smallest window."""
    model = tiny_model("mistral", sliding_window=60)
    path = tmp_path / "m.onnx"
    export_onnx(model=model, out_path=path, attention="plain")
    report = validate(model=model, onnx_path=path, attention="plain", prompts=prompts(), precision="fp32")
    assert report["passed"] and report["longest_context"] > 60 and report["smallest_window"] == 60


@pytest.mark.parametrize("field,value,needle", [
    ("rope_scaling", {"rope_type": "dynamic", "factor": 2.0}, "'rope_scaling' has type 'dynamic'"),
    ("layer_types", ["full_attention", "chunked_attention"], "'layer_types'"),
])
def test_unimplemented_value_is_refused(field: str, value: Any, needle: str) -> None:
    model = tiny_model("qwen3")
    setattr(model.config, field, value)
    with pytest.raises(ExportError, match=needle):
        check_config(config=model.config, where="src")


def test_unknown_math_field_is_refused() -> None:
    """A field transformers' config class defines (here: as a newer transformers would add one) that the family's
    list does not name is refused by name, in one line; keys the class does not define are never read by
    transformers and are ignored."""

    class NewerQwen3Config(transformers.Qwen3Config):
        def __init__(self, attn_temperature: float = 1.0, **kwargs: Any) -> None:
            self.attn_temperature = attn_temperature
            super().__init__(**kwargs)

    with pytest.raises(ExportError, match="config field 'attn_temperature'") as e:
        check_config(config=NewerQwen3Config(**TINY), where="src")
    assert "\n" not in str(e.value)
    check_config(config=transformers.LlamaConfig(**TINY, sliding_window=8), where="src")  # llama's code never reads it


def test_cli_refuses_unimplemented_field(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                         tiny_llama_dir: Path) -> None:
    from .test_export_cli import assert_nothing_written, assert_one_line_error, run_export

    src = tmp_path / "src"
    shutil.copytree(tiny_llama_dir, src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["rope_scaling"] = {"rope_type": "dynamic", "factor": 2.0}
    (src / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "b"
    code, err = run_export(capsys, "--speculator", str(src), "--verifier", str(src), "--out", str(out))
    assert_one_line_error(code, err, "'rope_scaling'", "dynamic")
    assert_nothing_written(out)


@pytest.mark.parametrize("family", ["qwen3", "gemma3_text"])
def test_int4_export_validates_by_agreement(family: str, tmp_path: Path) -> None:
    """int4 weights (MatMulNBits) change logits by design: the export is judged by greedy agreement with the fp32
    source over the same ragged, past-the-window contexts (the bar catches a broken graph, which agrees on almost
    nothing)."""
    from specreason_export.quantize import quantize
    from specreason_export.validate import DEFAULT_TOLERANCES

    model = tiny_model(family)
    fp32, int4 = tmp_path / "fp32.onnx", tmp_path / "int4.onnx"
    export_onnx(model=model, out_path=fp32, attention="gqa")
    quantize(src=fp32, dst=int4, precision="int4", external_data=False)
    report = validate(model=model, onnx_path=int4, attention="gqa", prompts=prompts(), precision="int4")
    assert report["passed"], report
    assert report["greedy_agreement"] >= DEFAULT_TOLERANCES["int4"].min_greedy_agreement
    assert report["longest_context"] > report["smallest_window"]


@pytest.mark.parametrize("attention", ["plain", "gqa"])
@pytest.mark.parametrize("family", ["mistral", "gemma3_text"])
def test_multi_token_extend_past_the_window(family: str, attention: str, tmp_path: Path) -> None:
    """The runtime's other call shape (verifying a drafted step): many new tokens on top of a cache, two branches
    of different lengths, contexts past the window: logits equal transformers' on each branch alone."""
    import numpy as np

    from specreason_export.onnx_export import KV_NAMES
    from specreason_rt.backends.ort import OrtEngine
    from specreason_rt.kv_cache import KVCache

    model = tiny_model(family)
    path = tmp_path / "m.onnx"
    export_onnx(model=model, out_path=path, attention=attention)
    cfg = model.config
    engine = OrtEngine(model_path=path, layers=cfg.num_hidden_layers, kv_names=KV_NAMES[attention], attention=attention)
    cache = KVCache(layers=cfg.num_hidden_layers, kv_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim,
                    branches=2, max_context=cfg.max_position_embeddings)
    seqs = prompts()[:2]  # 41 and 30 tokens
    first = np.array([12, 7])
    ids = np.zeros((2, int(first.max())), np.int64)  # [branches, new], right-padded
    for b, n in enumerate(first):
        ids[b, :n] = seqs[b][:n]
    engine.step(cache=cache, input_ids=ids, n_new=first, logits_index=np.zeros((2, 1), np.int64))
    rest = np.array([len(s) for s in seqs]) - first  # 29 and 23 new tokens in one call
    ids = np.zeros((2, int(rest.max())), np.int64)
    for b in range(2):
        ids[b, :rest[b]] = seqs[b][first[b]:]
    index = np.tile(np.arange(int(rest.max())), (2, 1))  # [branches, new]
    logits = engine.step(cache=cache, input_ids=ids, n_new=rest, logits_index=index)  # [branches, new, vocab]
    for b, seq in enumerate(seqs):
        with torch.no_grad():
            ref = model(torch.tensor([seq])).logits[0, first[b]:].numpy()  # [rest, vocab]
        assert np.abs(logits[b, :rest[b]] - ref).max() < 1e-4


def test_gguf_architecture_names_map_to_families() -> None:
    """GGUF calls Gemma 3 'gemma3'; transformers loads it as gemma3_text: the source check must accept it."""
    from specreason_export.families import architecture_facts, family_of
    from specreason_export.sources import _check_family

    assert family_of("gemma3") is not None and family_of("gemma3").name == "gemma3_text"  # type: ignore[union-attr]
    _check_family("gemma3", None, "model.gguf")
    with pytest.raises(ExportError, match="unsupported architecture 'mamba'"):
        _check_family("mamba", None, "model.gguf")
    facts = architecture_facts(tiny_model("gemma3_text").config)
    assert facts["attention_windows"] == [WINDOW, None]
    assert {"sliding_window", "qk_norm", "local_rope", "sandwich_norm"} <= set(facts["features"])
