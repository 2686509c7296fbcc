"""Write a bundle: export, quantize, validate and describe each model, then publish atomically.

Everything is written into a temporary sibling directory of the output and renamed into place only when
every model has passed validation, so an interrupted or failed export never leaves a partial bundle
(the rules for --out, --force, concurrent exports and clean-up are in export/publish.py).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import errno
import json
import shutil
from importlib import metadata
from pathlib import Path
from typing import Any

from specreason_rt.manifest import (
    MANIFEST_NAME,
    PRECISIONS,
    ROLES,
    Architecture,
    Generation,
    Manifest,
    ModelEntry,
    sha256_file,
)

from .errors import ExportError
from .families import architecture_facts
from .graph import ATTENTION_VARIANTS
from .onnx_export import EXTERNAL_DATA_BYTES, GQA_HEAD_DIM_MULTIPLE, KV_NAMES, export_onnx
from .progress import Progress
from .publish import TEMP_MARK, OutputSlot
from .quantize import quantize
from .sources import HubOptions, Source, SourceRef, load_source, peek_family, resolve_source
from .trt import TrtOptions, build_engines, require_tensorrt
from .validate import DEFAULT_TOLERANCES, Tolerance, validate

# Generic prompts of different lengths for validating models trained on natural text.
TEXT_PROMPTS = (
    "The capital of France is",
    "Question: Tom has 3 apples and buys 4 more. How many apples does he have?\nAnswer:",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
)


@dataclasses.dataclass(frozen=True)
class ExportOptions:
    speculator: str = "speculator"
    verifier: str = "verifier"
    out: Path = Path("specreason-bundle")
    precision: str = "fp32"
    force: bool = False
    step_delimiter: str = "\n\n"
    decode_steps: int = 8
    attention: str = "auto"  # "gqa" | "plain" | "auto" (gqa where the head size allows it)
    max_logit_diff: float | None = None  # None: the precision's default tolerance
    min_agreement: float | None = None
    show_progress: bool = True
    value_head: str = "auto"  # a head file for the verifier, "none", or "auto": the built-in verifier's own head
    trt: TrtOptions | None = None  # also build TensorRT engines (export/trt.py); forces plain attention
    hub: HubOptions = HubOptions()  # --revision, --cache-dir, --token for hub ids

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ExportError(f"unknown precision {self.precision!r}: choose one of {', '.join(PRECISIONS)}")
        if self.decode_steps < 8:
            raise ExportError(f"--decode-steps must be >= 8 (got {self.decode_steps})")
        if not self.step_delimiter:
            raise ExportError("--step-delimiter must not be empty")
        if self.attention not in ("auto", *ATTENTION_VARIANTS):
            raise ExportError(f"unknown attention {self.attention!r}: choose auto, {', '.join(ATTENTION_VARIANTS)}")
        if self.trt is not None:
            if self.precision != "fp32":
                raise ExportError(f"--trt builds engines from the fp32 graph; {self.precision} graphs use ONNX Runtime "
                                  "quantized operators TensorRT cannot parse. Use --precision fp16 for GPU engines")
            if self.attention == "gqa":
                raise ExportError("--trt needs plain attention (GroupQueryAttention is an ONNX Runtime contrib op); "
                                  "drop --attention gqa")
            if self.attention == "prefix":
                raise ExportError("--trt needs plain attention (the engines are built for the plain graph's inputs, "
                                  "not the shared prefix segment); drop --attention prefix")
            object.__setattr__(self, "attention", "plain")

    def tolerance(self) -> Tolerance:
        base = DEFAULT_TOLERANCES[self.precision]
        return Tolerance(
            max_abs_logit_diff=self.max_logit_diff if self.max_logit_diff is not None else base.max_abs_logit_diff,
            min_greedy_agreement=self.min_agreement if self.min_agreement is not None else base.min_greedy_agreement,
            max_abs_value_diff=base.max_abs_value_diff,
        )


def _tool_versions() -> dict[str, str]:
    out = {}
    for dist in ("specreason-rt", "torch", "transformers", "onnx", "onnxruntime", "gguf", "tokenizers"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def _validation_prompts(src: Source) -> list[list[int]]:
    if src.kind == "builtin":
        from specreason_models.task import format_prompt, heldout_split

        # Built-in models only know the task's alphabet: held-out prompts cut into their solutions.
        problems = heldout_split(n=3)
        texts = [format_prompt(p.question) + p.solution[:cut] for p, cut in zip(problems, (0, 9, 23), strict=True)]
    else:
        texts = list(TEXT_PROMPTS)
    prompts = [src.tokenizer(t)["input_ids"] for t in texts]
    if len({len(p) for p in prompts}) < 2:
        raise ExportError("validation prompts tokenize to equal lengths; cannot check ragged batches")
    return prompts


def _generation(src: Source, step_delimiter: str) -> Generation:
    tok, gen_cfg = src.tokenizer, getattr(src.model, "generation_config", None)
    eos = getattr(gen_cfg, "eos_token_id", None) if gen_cfg is not None else None
    if eos is None:
        eos = tok.eos_token_id
    eos_ids = tuple(int(e) for e in (eos if isinstance(eos, list | tuple) else [eos]) if e is not None)
    if not eos_ids:
        raise ExportError(f"{src.ident}: the model defines no end-of-sequence token; the runtime needs one")
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos_ids[0]
    return Generation(bos_id=tok.bos_token_id, eos_ids=eos_ids, pad_id=int(pad),
                      chat_template=getattr(tok, "chat_template", None), step_delimiter=step_delimiter)


def _architecture(model: Any) -> Architecture:
    cfg = model.config
    return Architecture(
        family=cfg.model_type, layers=cfg.num_hidden_layers, hidden=cfg.hidden_size,
        heads=cfg.num_attention_heads,
        kv_heads=getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,  # gpt_neox has no field
        head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads,
        vocab_size=cfg.vocab_size, max_context=cfg.max_position_embeddings,
        parameters=sum(p.numel() for p in model.parameters()),
        **architecture_facts(cfg),  # per-layer windows and the math features the graph implements
    )


def _tokenizer_signature(tokenizer_json: Path) -> str:
    """What decides token ids: the model (vocab, merges), added tokens, normalizer and pre-tokenizer."""
    data = json.loads(tokenizer_json.read_text())
    keys = ("model", "added_tokens", "normalizer", "pre_tokenizer")
    return json.dumps({k: data.get(k) for k in keys}, sort_keys=True)


KV_OUTPUTS = {
    "plain": "new tokens only; the runtime writes them into its cache",
    "gqa": "present is the past buffer itself: bind both to the runtime's cache (IO binding), updated in place",
    "prefix": "new tokens only, as plain; prefix_key/value [1, kv_heads, prefix_tokens, head_dim] is one segment "
              "every branch attends to (a forked prompt, held once), past the tokens each branch added after it",
}


def _attention_for(*, role: str, arch: Architecture, requested: str) -> str:
    fits_gqa = arch.head_dim % GQA_HEAD_DIM_MULTIPLE == 0
    if requested == "auto":
        return "gqa" if fits_gqa else "plain"
    if requested == "gqa" and not fits_gqa:
        raise ExportError(f"{role}: --attention gqa needs a head size that is a multiple of "
                          f"{GQA_HEAD_DIM_MULTIPLE} (ONNX Runtime's kernel), this model has {arch.head_dim}; "
                          "use --attention plain")
    return requested


def _value_head(spec: str, src: Source) -> tuple[Any, dict[str, Any]] | None:
    """The head to put in the verifier's graph (module, manifest facts), or None; checked against the model."""
    from specreason_models import builtin_path
    from specreason_models.value_head import FILE_NAME, load_value_head

    if spec == "none":
        return None
    if spec == "auto":
        path = builtin_path("verifier") / FILE_NAME
        if src.kind != "builtin" or src.ident != "verifier" or not path.is_file():
            return None
    else:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise ExportError(f"--value-head {spec}: no such file; pass a head written by "
                              "python -m specreason_models.value_head, or none")
    try:
        head, report = load_value_head(path)
    except ValueError as e:
        raise ExportError(f"--value-head {e}") from e
    hidden = src.model.config.hidden_size
    if head.d_model != hidden:
        raise ExportError(f"--value-head {path}: the head takes hidden states of size {head.d_model}, the verifier "
                          f"{src.ident!r} has hidden size {hidden}; train a head for this verifier "
                          "(python -m specreason_models.value_head) or pass --value-head none")
    facts = {"input_size": head.d_model, "hidden": head.hidden, "file": path.name, "sha256": sha256_file(path),
             "metrics": {k: v for k, v in report.items() if k.startswith("heldout")},
             "recipe": report.get("recipe", {})}
    return head, facts


def _export_role(*, role: str, src: Source, tmp: Path, opts: ExportOptions, progress: Progress,
                 value_head: tuple[Any, dict[str, Any]] | None = None) -> ModelEntry:
    role_dir = tmp / role
    role_dir.mkdir()
    arch = _architecture(src.model)
    external = arch.parameters * 4 > EXTERNAL_DATA_BYTES
    fp32_path = role_dir / "model.onnx" if opts.precision == "fp32" else tmp / f".{role}-fp32" / "model.onnx"
    fp32_path.parent.mkdir(exist_ok=True)
    attention = _attention_for(role=role, arch=arch, requested=opts.attention)
    with progress.stage(f"{role}: export ONNX graph ({arch.family}, {arch.layers} layers, "
                        f"{arch.parameters / 1e6:.1f}M parameters, {attention} attention)"):
        io = export_onnx(model=src.model, out_path=fp32_path, attention=attention,
                         value_head=value_head[0] if value_head else None)
    quantization: dict[str, Any] | None = None
    if opts.precision != "fp32":
        with progress.stage(f"{role}: quantize weights to {opts.precision}"):
            quantization = quantize(src=fp32_path, dst=role_dir / "model.onnx", precision=opts.precision,
                                    external_data=external)
        shutil.rmtree(fp32_path.parent)
    with progress.stage(f"{role}: validate against PyTorch ({opts.decode_steps} decode steps, ragged batch)"):
        report = validate(model=src.model, onnx_path=role_dir / "model.onnx", attention=attention,
                          prompts=_validation_prompts(src),
                          precision=opts.precision, decode_steps=opts.decode_steps, tolerance=opts.tolerance(),
                          value_head=value_head[0] if value_head else None)
        progress.info(f"max |logit diff| {report['max_abs_logit_diff']:.2e}, greedy agreement "
                      f"{report['greedy_agreement']:.0%} over {report['greedy_positions_checked']} positions")
    if quantization is not None:
        report["quantization"] = quantization  # the format the agreement above was measured on
    if not report["passed"]:
        tol = report["tolerance"]
        value_note = f", max |value diff| {report['max_abs_value_diff']:.3g}" if value_head else ""
        raise ExportError(
            f"{role} failed validation: max |logit diff| {report['max_abs_logit_diff']:.3g}{value_note} "
            f"(limit {tol['max_abs_logit_diff']}), greedy agreement {report['greedy_agreement']:.1%} "
            f"(minimum {tol['min_greedy_agreement']:.0%}); no bundle written. "
            + ("At fp32 this means the export is wrong for this model (a bug: please report it with the source); "
               "loosening the limits would publish a wrong bundle" if opts.precision == "fp32" else
               "Try a higher precision, or loosen --max-logit-diff / --min-agreement if the quantization loss "
               "is expected"))
    src.tokenizer.save_pretrained(str(role_dir))
    return ModelEntry(
        role=role, file=f"{role}/model.onnx", precision=opts.precision, architecture=arch, io=io,
        kv_cache={"attention": attention, "layout": ["branches", "kv_heads", "tokens", "head_dim"],
                  "dtype": "float32", "outputs": KV_OUTPUTS[attention], **KV_NAMES[attention]},
        tokenizer=f"{role}/tokenizer.json", generation=_generation(src, opts.step_delimiter),
        source={"kind": src.kind, "id": src.ident, "files": src.file_hashes}, validation=report,
        value_head=value_head[1] if value_head else None,
    )


def _check_free_space(parent: Path, sources: list[Source], precision: str) -> None:
    # The fp32 graph is written first even for quantized bundles, so count it fully.
    need = sum(sum(p.numel() for p in s.model.parameters()) * 4 for s in sources)
    need = int(need * (1.5 if precision != "fp32" else 1.1)) + (16 << 20)
    free = shutil.disk_usage(parent).free
    if free < need:
        raise ExportError(f"not enough disk space in {parent}: the bundle needs about {need >> 20} MiB, "
                          f"{free >> 20} MiB are free; free some space or pass another --out")


def _record_files(tmp: Path) -> tuple[dict[str, str], dict[str, int]]:
    """Hash and size of every file of the finished bundle (the manifest is written after)."""
    paths = [p for p in sorted(tmp.rglob("*")) if p.is_file() and p.name != TEMP_MARK]
    files = {p.relative_to(tmp).as_posix(): sha256_file(p) for p in paths}
    sizes = {p.relative_to(tmp).as_posix(): p.stat().st_size for p in paths}
    return files, sizes


def write_bundle(opts: ExportOptions) -> Manifest:
    """Export both roles into opts.out; raise ExportError (leaving nothing behind) on any problem.

    Order (fail fast): both source arguments and their families (config.json / GGUF header only), TensorRT
    when asked, then --out (lock, --force rules, writability: export/publish.py), and only then the models.
    """
    refs = {role: resolve_source(getattr(opts, role)) for role in ROLES}
    for ref in dict.fromkeys(refs.values()):
        peek_family(ref, hub=opts.hub)
    if opts.trt is not None:
        require_tensorrt()  # before minutes of export: without TensorRT, --trt fails here with the install line
    with OutputSlot(out=opts.out, force=opts.force) as slot:
        return _write(opts=opts, refs=refs, slot=slot)


def _write(*, opts: ExportOptions, refs: dict[str, SourceRef], slot: OutputSlot) -> Manifest:
    # One source in both roles is loaded, exported and validated once; both roles name the one graph
    # (unless the verifier carries a value head, which makes its graph differ).
    # Stage count: the graph is exported once when one source fills both roles and no value head makes the
    # verifier's graph differ (a head comes from --value-head FILE or, by default, the built-in verifier).
    verifier = refs["verifier"]
    builtin_head = verifier.kind == "builtin" and verifier.ident == "verifier"
    expect_shared = refs["speculator"] == verifier and (opts.value_head == "none"
                                                        or (opts.value_head == "auto" and not builtin_head))
    per_role = 3 if opts.precision != "fp32" else 2
    progress = Progress(total=2 + per_role * (1 if expect_shared else 2) + 1 + (2 if opts.trt else 0),
                        enabled=opts.show_progress)
    sources: dict[str, Source] = {}
    for role in ROLES:
        with progress.stage(f"{role}: load {refs[role].ident}"):
            same = [sources[r] for r in sources if refs[r] == refs[role]]
            sources[role] = same[0] if same else load_source(refs[role], hub=opts.hub, progress=progress)
    unique = list({id(s): s for s in sources.values()}.values())
    _check_free_space(slot.out.parent, unique, opts.precision)
    head = _value_head(opts.value_head, sources["verifier"])  # checked before anything is written
    shared_graph = refs["speculator"] == refs["verifier"] and head is None
    progress.total += per_role * (int(expect_shared) - int(shared_graph))  # 0 unless the guess above was wrong
    tmp = slot.tmp
    try:
        entries: dict[str, ModelEntry] = {}
        for role in ("verifier", "speculator"):
            if role == "speculator" and shared_graph:
                progress.info("speculator: the same source as the verifier; the verifier's graph is stored once")
                (tmp / role).mkdir()
                sources[role].tokenizer.save_pretrained(str(tmp / role))
                entries[role] = dataclasses.replace(entries["verifier"], role=role, tokenizer=f"{role}/tokenizer.json")
                continue
            entries[role] = _export_role(role=role, src=sources[role], tmp=tmp, opts=opts, progress=progress,
                                         value_head=head if role == "verifier" else None)
        entries = {role: entries[role] for role in ROLES}
        engines = ({} if opts.trt is None else
                   build_engines(bundle_dir=tmp, entries=entries, options=opts.trt, progress=progress))
        with progress.stage("write manifest and publish the bundle"):
            shared = (_tokenizer_signature(tmp / entries["speculator"].tokenizer)
                      == _tokenizer_signature(tmp / entries["verifier"].tokenizer))
            if not shared:
                progress.info("speculator and verifier tokenize differently: the runtime will hand text across")
            files, sizes = _record_files(tmp)
            manifest = Manifest(
                created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                precision=opts.precision, tokenizers_shared=shared, tools=_tool_versions(), files=files,
                models=entries, engines=engines, sizes=sizes,
            )
            (tmp / MANIFEST_NAME).write_text(json.dumps(manifest.to_json(), indent=2) + "\n")
            slot.publish()
        return manifest
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise ExportError(f"no space left on the device while writing the bundle under {slot.out.parent}; "
                              "free some space or pass another --out (nothing was written)") from e
        raise
