"""Resolve a `--speculator` / `--verifier` argument to a PyTorch model, its tokenizer and provenance.

A source is one of:
  * a built-in name from specreason_models ("speculator", "verifier");
  * a path to a `.gguf` file (transformers dequantizes it to fp32; needs `gguf`);
  * a local Hugging Face model directory (config.json + weights + tokenizer);
  * a Hugging Face hub id "org/name" (downloaded by transformers; `HubOptions`: revision, cache dir, token).

Fail fast: `resolve_source` checks the argument's shape and `peek_family` reads only config.json or the
GGUF header, so both sources, and their families, are checked before either model is loaded (seconds, not
minutes). A hub id is first looked up with one short connection attempt: without network it fails in one
line (or uses the local cache), not after the hub client's retries.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from specreason_rt.manifest import sha256_file

from .errors import ExportError
from .progress import Progress


@dataclasses.dataclass
class Source:
    kind: str  # "builtin" | "gguf" | "hf"
    ident: str  # what the user passed, normalised
    model: Any  # transformers PreTrainedModel, fp32, eval mode
    tokenizer: Any  # transformers PreTrainedTokenizerFast
    file_hashes: dict[str, str]  # {file name: "sha256:..."} of the source weights
    step_delimiter: str = "\n\n"


@dataclasses.dataclass(frozen=True)
class HubOptions:
    """How hub ids are fetched (the names optimum and the hub client use)."""

    revision: str | None = None  # a branch, tag or commit
    cache_dir: Path | None = None  # default: the hub client's cache
    token: str | None = None  # default: the hub client's stored token or $HF_TOKEN
    connect_timeout: float = 5.0  # seconds for the one reachability check


@dataclasses.dataclass(frozen=True)
class SourceRef:
    """A source argument resolved without loading anything: what to load, from where."""

    kind: str  # "builtin" | "gguf" | "hf"
    ident: str  # what the user passed, normalised (the manifest's source id)
    location: str  # what transformers loads: a directory or a hub id
    local_dir: Path | None  # the directory holding the weights (None for hub ids)
    gguf_file: str | None = None  # the .gguf file name inside local_dir


def _check_family(model_type: str | None, architectures: Any, where: str, config: Any = None) -> None:
    """Refuse an unsupported family, and with `config` any field or value its decoder does not implement
    (export/families.py), in one line naming it."""
    # Imported here: the family table reads transformers' modules (torch), and the source checks that run
    # before torch is imported (preflight) must stay fast.
    from .families import SUPPORTED_FAMILIES, check_config, family_of

    if family_of(model_type) is None:
        arch = ", ".join(architectures or []) or "unknown class"
        raise ExportError(f"{where}: unsupported architecture {model_type!r} ({arch}); "
                          f"specreason-export supports {', '.join(SUPPORTED_FAMILIES)}")
    if config is not None:
        check_config(config=config, where=where)


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



def resolve_source(spec: str) -> SourceRef:
    """What `spec` names (see the module docstring), checked on disk but not loaded; ExportError otherwise."""
    from specreason_models import BUILTIN_NAMES, builtin_path

    if spec in BUILTIN_NAMES:
        path = builtin_path(spec)
        return SourceRef(kind="builtin", ident=spec, location=str(path), local_dir=path)
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise ExportError(f"{spec}: no such .gguf file")
        path = path.resolve()
        return SourceRef(kind="gguf", ident=str(path), location=str(path.parent), local_dir=path.parent,
                         gguf_file=path.name)
    if path.exists():
        if not path.is_dir():
            raise ExportError(f"{spec}: expected a model directory or a .gguf file")
        if not (path / "config.json").is_file():
            raise ExportError(f"{spec}: no config.json in this directory; is it a Hugging Face model folder?")
        path = path.resolve()
        return SourceRef(kind="hf", ident=str(path), location=str(path), local_dir=path)
    looks_like_hub_id = spec.count("/") == 1 and not spec.startswith((".", "/", "~")) and " " not in spec
    if looks_like_hub_id:
        return SourceRef(kind="hf", ident=spec, location=spec, local_dir=None)
    raise ExportError(f"unknown source {spec!r}: pass a built-in name ({', '.join(BUILTIN_NAMES)}), "
                      "a model directory, a .gguf file or a hub id like org/name")


def _hub_unreachable(timeout: float) -> str | None:
    """Why the hub cannot be reached (one DNS lookup and one TCP connect), or None when it can."""
    from huggingface_hub import constants

    # The hub client reads HF_HUB_OFFLINE once at import; honour a value set later in this process too.
    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        return "HF_HUB_OFFLINE is set"
    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname or "", url.port or 443), timeout=timeout):
            return None
    except OSError as e:
        return f"{constants.ENDPOINT} is unreachable: {e.strerror or e}"


def _hub_config(ref: SourceRef, hub: HubOptions) -> tuple[Path, bool]:
    """config.json of a hub id (downloaded alone, or from the cache when offline) and whether we are offline."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    offline_reason = _hub_unreachable(hub.connect_timeout)
    args = {"repo_id": ref.location, "filename": "config.json", "revision": hub.revision, "token": hub.token,
            "cache_dir": str(hub.cache_dir) if hub.cache_dir else None}
    try:
        if offline_reason:
            return Path(hf_hub_download(**args, local_files_only=True)), True
        return Path(hf_hub_download(**args, etag_timeout=hub.connect_timeout)), False
    except LocalEntryNotFoundError as e:
        raise ExportError(f"{ref.ident}: not in the local hub cache and the hub cannot be used ({offline_reason}); "
                          "connect to the network, pass --cache-dir where it is cached, or pass a local "
                          "directory or .gguf file") from e
    except GatedRepoError as e:
        raise ExportError(f"{ref.ident}: a gated repository; accept its terms on the hub and pass --token") from e
    except RevisionNotFoundError as e:
        raise ExportError(f"{ref.ident}: no revision {hub.revision!r}; check --revision") from e
    except RepositoryNotFoundError as e:
        raise ExportError(f"{ref.ident}: no such repository on the hub (or it is private: pass --token)") from e
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise ExportError(f"{ref.ident}: cannot fetch config.json from the hub ({_first_line(e)})") from e


def preflight(specs: list[str], *, hub: HubOptions = HubOptions()) -> list[SourceRef]:
    """The checks that need no torch, run before the export stack is imported (seconds on a loaded machine):
    each argument's shape, and each hub id's config.json from the hub or the local cache."""
    refs = [resolve_source(spec) for spec in specs]
    for ref in dict.fromkeys(refs):
        if ref.local_dir is None:
            _hub_config(ref, hub)
    return refs


def _gguf_family(path: Path) -> str | None:
    try:
        from gguf import GGUFReader
    except ImportError as e:
        raise ExportError("reading .gguf files needs the `gguf` package: pip install 'specreason-rt[export]'") from e
    try:
        reader = GGUFReader(str(path))
        field = reader.fields.get("general.architecture")
        return bytes(field.parts[field.data[0]]).decode() if field is not None else None
    except Exception as e:  # noqa: BLE001 - gguf's reader raises many types for corrupt files
        raise ExportError(f"{path}: not a valid GGUF file ({_first_line(e)})") from e


def peek_family(ref: SourceRef, *, hub: HubOptions = HubOptions()) -> str:
    """The source's family from config.json or the GGUF header alone; ExportError if unsupported or unreadable."""
    if ref.gguf_file is not None:
        assert ref.local_dir is not None
        family = _gguf_family(ref.local_dir / ref.gguf_file)
        _check_family(family, None, ref.ident)
        return str(family)
    config_path = ref.local_dir / "config.json" if ref.local_dir is not None else _hub_config(ref, hub)[0]
    try:
        config = json.loads(config_path.read_text())
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ExportError(f"{ref.ident}: config.json is not readable JSON ({_first_line(e)})") from e
    _check_family(config.get("model_type"), config.get("architectures"), ref.ident)
    return str(config.get("model_type"))


def _load_hf(ref: SourceRef, hub: HubOptions) -> Source:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {}
    if ref.local_dir is None:  # a hub id: peek_family fetched (or found) its config already
        offline = _hub_config(ref, hub)[1]
        kwargs = {"revision": hub.revision, "token": hub.token, "local_files_only": offline,
                  "cache_dir": str(hub.cache_dir) if hub.cache_dir else None}
    try:
        config = AutoConfig.from_pretrained(ref.location, **kwargs)
    except (OSError, ValueError, json.JSONDecodeError) as e:
        raise ExportError(f"{ref.ident}: not a readable model ({_first_line(e)})") from e
    _check_family(getattr(config, "model_type", None), getattr(config, "architectures", None), ref.ident, config)
    try:
        model = AutoModelForCausalLM.from_pretrained(ref.location, torch_dtype=torch.float32, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(ref.location, **kwargs)
    except Exception as e:  # noqa: BLE001 - transformers/safetensors raise many types for bad files
        raise ExportError(f"{ref.ident}: cannot load weights or tokenizer ({_first_line(e)})") from e
    if not getattr(tokenizer, "is_fast", False):
        raise ExportError(f"{ref.ident}: the tokenizer has no tokenizer.json (fast tokenizer); the runtime needs one")
    hashes: dict[str, str] = {}
    if ref.local_dir is not None:
        for f in sorted(ref.local_dir.iterdir()):
            if f.suffix in (".safetensors", ".bin") and f.is_file():
                hashes[f.name] = sha256_file(f)
    return Source(kind=ref.kind, ident=ref.ident, model=model.eval(), tokenizer=tokenizer, file_hashes=hashes)


def _load_gguf(ref: SourceRef) -> Source:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert ref.local_dir is not None and ref.gguf_file is not None
    path = ref.local_dir / ref.gguf_file
    _check_family(_gguf_family(path), None, str(path))
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                     torch_dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as e:  # noqa: BLE001 - the GGUF loader raises many types for unsupported files
        raise ExportError(f"{path}: transformers cannot load this GGUF file ({_first_line(e)})") from e
    _check_family(getattr(model.config, "model_type", None), None, str(path), model.config)
    return Source(kind="gguf", ident=str(path), model=model.eval(), tokenizer=tokenizer,
                  file_hashes={path.name: sha256_file(path)})


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__


@contextlib.contextmanager
def _bars_through(progress: Progress | None) -> Iterator[None]:
    """transformers' GGUF loader draws its own tqdm bar (not covered by disable_progress_bar): unless stderr
    is a terminal, route it through our progress (a few lines, no carriage-return flood in logs)."""
    if progress is not None and progress.bars_inline():
        yield
        return
    try:
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:
        yield
        return
    original = getattr(gguf_utils, "tqdm", None)
    gguf_utils.tqdm = (progress or Progress(total=0, enabled=False)).tqdm_class()  # type: ignore[attr-defined]
    try:
        yield
    finally:
        gguf_utils.tqdm = original  # type: ignore[attr-defined]


def load_source(spec: str | SourceRef, *, hub: HubOptions = HubOptions(), progress: Progress | None = None) -> Source:
    """Load the model named by `spec` (see module docstring); raise ExportError with one clear line."""
    _quiet_transformers()
    ref = spec if isinstance(spec, SourceRef) else resolve_source(spec)
    with _bars_through(progress):
        return _load_gguf(ref) if ref.gguf_file is not None else _load_hf(ref, hub)
