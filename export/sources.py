"""Resolve a `--speculator` / `--verifier` argument to a PyTorch model, its tokenizer and provenance.

A source is one of:
  * a built-in name from specreason_models ("speculator", "verifier");
  * a path to a `.gguf` file (transformers dequantizes it to fp32; needs `gguf`);
  * a local Hugging Face model directory (config.json + weights + tokenizer);
  * a Hugging Face hub id "org/name" (downloaded by transformers; needs network access).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any

from specreason_rt.manifest import sha256_file

from .errors import ExportError
from .families import check_config, family_of
from .graph import SUPPORTED_FAMILIES


@dataclasses.dataclass
class Source:
    kind: str  # "builtin" | "gguf" | "hf"
    ident: str  # what the user passed, normalised
    model: Any  # transformers PreTrainedModel, fp32, eval mode
    tokenizer: Any  # transformers PreTrainedTokenizerFast
    file_hashes: dict[str, str]  # {file name: "sha256:..."} of the source weights
    step_delimiter: str = "\n\n"


def _check_family(model_type: str | None, architectures: Any, where: str, config: Any = None) -> None:
    """Refuse an unsupported family, and with `config` any field or value its decoder does not implement
    (export/families.py), in one line naming it."""
    if family_of(model_type) is None:
        arch = ", ".join(architectures or []) or "unknown class"
        raise ExportError(f"{where}: unsupported architecture {model_type!r} ({arch}); "
                          f"specreason-export supports {', '.join(SUPPORTED_FAMILIES)}")
    if config is not None:
        check_config(config, where)


def _quiet_transformers() -> None:
    # transformers and huggingface_hub print warnings and retries to stderr; the CLI prints one line.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for name in ("transformers", "huggingface_hub", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def _load_hf_dir(location: str, *, kind: str, ident: str, local_dir: Path | None) -> Source:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(location)
    except (OSError, ValueError, json.JSONDecodeError) as e:
        if local_dir is None:
            raise ExportError(f"cannot load {ident!r} from the Hugging Face hub ({_first_line(e)}); "
                              "check the id and network access, or pass a local directory or .gguf file") from e
        raise ExportError(f"{local_dir}: not a readable model directory ({_first_line(e)})") from e
    _check_family(getattr(config, "model_type", None), getattr(config, "architectures", None), ident, config)
    try:
        model = AutoModelForCausalLM.from_pretrained(location, torch_dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(location)
    except Exception as e:  # noqa: BLE001 - transformers/safetensors raise many types for bad files
        raise ExportError(f"{ident}: cannot load weights or tokenizer ({_first_line(e)})") from e
    if not getattr(tokenizer, "is_fast", False):
        raise ExportError(f"{ident}: the tokenizer has no tokenizer.json (fast tokenizer); the runtime needs one")
    hashes: dict[str, str] = {}
    if local_dir is not None:
        for f in sorted(local_dir.iterdir()):
            if f.suffix in (".safetensors", ".bin") and f.is_file():
                hashes[f.name] = sha256_file(f)
    return Source(kind=kind, ident=ident, model=model.eval(), tokenizer=tokenizer, file_hashes=hashes)


def _load_gguf(path: Path) -> Source:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        from gguf import GGUFReader
    except ImportError as e:
        raise ExportError("reading .gguf files needs the `gguf` package: pip install 'specreason-rt[export]'") from e
    try:
        reader = GGUFReader(str(path))
        field = reader.fields.get("general.architecture")
        arch = bytes(field.parts[field.data[0]]).decode() if field is not None else None
    except Exception as e:  # noqa: BLE001 - gguf's reader raises many types for corrupt files
        raise ExportError(f"{path}: not a valid GGUF file ({_first_line(e)})") from e
    _check_family(arch, None, str(path))
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                     torch_dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as e:  # noqa: BLE001 - the GGUF loader raises many types for unsupported files
        raise ExportError(f"{path}: transformers cannot load this GGUF file ({_first_line(e)})") from e
    _check_family(arch, None, str(path), model.config)
    return Source(kind="gguf", ident=str(path), model=model.eval(), tokenizer=tokenizer,
                  file_hashes={path.name: sha256_file(path)})


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def load_source(spec: str) -> Source:
    """Load the model named by `spec` (see module docstring); raise ExportError with one clear line."""
    _quiet_transformers()
    from specreason_models import BUILTIN_NAMES, builtin_path

    if spec in BUILTIN_NAMES:
        src = _load_hf_dir(str(builtin_path(spec)), kind="builtin", ident=spec, local_dir=builtin_path(spec))
        return src
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise ExportError(f"{spec}: no such .gguf file")
        return _load_gguf(path.resolve())
    if path.exists():
        if not path.is_dir():
            raise ExportError(f"{spec}: expected a model directory or a .gguf file")
        if not (path / "config.json").is_file():
            raise ExportError(f"{spec}: no config.json in this directory; is it a Hugging Face model folder?")
        return _load_hf_dir(str(path.resolve()), kind="hf", ident=str(path.resolve()), local_dir=path.resolve())
    looks_like_hub_id = spec.count("/") == 1 and not spec.startswith((".", "/", "~"))
    if looks_like_hub_id:
        return _load_hf_dir(spec, kind="hf", ident=spec, local_dir=None)
    raise ExportError(f"unknown source {spec!r}: pass a built-in name ({', '.join(BUILTIN_NAMES)}), "
                      "a model directory, a .gguf file or a hub id like org/name")
