"""specreason_models: the built-in reasoning task and the small speculator/verifier pair.

`builtin_path(name)` gives the Hugging Face directory of a committed model; the export side calls it.
Importing this package does not import torch; only the training and evaluation modules do.
"""

from __future__ import annotations

from pathlib import Path

BUILTIN_NAMES = ("speculator", "verifier")
BUILTIN_DIR = Path(__file__).resolve().parent / "builtin"


def builtin_path(name: str) -> Path:
    """Directory of a committed built-in model (config.json, model.safetensors, tokenizer files)."""
    if name not in BUILTIN_NAMES:
        raise ValueError(f"unknown built-in model {name!r}; valid names: {', '.join(BUILTIN_NAMES)}")
    return BUILTIN_DIR / name


__all__ = ["BUILTIN_DIR", "BUILTIN_NAMES", "builtin_path"]
