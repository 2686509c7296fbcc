"""Open a bundle: check its manifest, then load the engine and tokenizer of each requested role."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .backends.base import usable_cores
from .backends.providers import ProviderConfig, ProviderSpec
from .bundle_files import Integrity, confined
from .errors import BundleError
from .manifest import ROLES, Manifest, load_manifest
from .model import RoleModel
from .tokenizer import Tokenizer


class Bundle:
    def __init__(self, path: str | Path, *, roles: Sequence[str] = ROLES,
                 providers: Sequence[ProviderSpec] | ProviderConfig | None = None,
                 intra_op_threads: int = 0, kv_limit_bytes: int | None = None, spin: bool = True,
                 integrity: Integrity = "sizes") -> None:
        """spin=False stops ONNX Runtime's idle threads from spinning: use it when the models take turns.

        integrity: "sizes" (default: every file present with its recorded size, a stat per file) or "full"
        (re-hash every file first: seconds per GB); see specreason_rt/bundle_files.py.
        """
        self.path = Path(path)
        unknown = [r for r in roles if r not in ROLES]
        if unknown:
            raise BundleError(f"unknown role(s) {unknown}: choose from {', '.join(ROLES)}")
        self.manifest: Manifest = load_manifest(self.path, integrity=integrity)
        self.models: dict[str, RoleModel] = {}
        self.tokenizers: dict[str, Tokenizer] = {}
        for role in roles:
            entry = self.manifest.models[role]
            self.models[role] = RoleModel(bundle_dir=self.path, entry=entry, providers=providers,
                                          intra_op_threads=intra_op_threads, kv_limit_bytes=kv_limit_bytes,
                                          engine_facts=self.manifest.engines.get(role), spin=spin)
            # Paths were confined when the manifest loaded; resolving again reads exactly the checked file.
            self.tokenizers[role] = Tokenizer(path=confined(self.path, entry.tokenizer, what="tokenizer"),
                                              generation=entry.generation)

    def own_cores(self) -> bool:
        """Whether the two models can run at once without taking cores from each other: both on the CPU, their
        intra-op threads together within the usable cores (what stepwise.overlap needs to pay off)."""
        threads = [model.engine.cpu_threads for model in self.models.values()]
        if len(threads) != 2 or None in threads:
            return False
        return sum(t or 0 for t in threads) <= usable_cores()
