"""Packaging: import names, the no-torch runtime, console scripts."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Runs in a fresh interpreter in which importing torch, transformers or optimum raises.
NO_TORCH = textwrap.dedent("""
    import importlib, pkgutil, sys
    import numpy as np

    BLOCKED = ("torch", "transformers", "optimum")

    class Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{name} must not be imported by the runtime")
            return None

    sys.meta_path.insert(0, Block())
    import specreason_rt
    for mod in pkgutil.walk_packages(specreason_rt.__path__, "specreason_rt."):
        importlib.import_module(mod.name)

    from specreason_rt.bundle import Bundle
    from specreason_rt.decode import generate
    from specreason_rt.sampling import SamplingParams

    bundle = Bundle(sys.argv[1])  # both roles: manifest checks, engines, tokenizers
    model, tok = bundle.models["verifier"], bundle.tokenizers["verifier"]
    outs = generate(model=model, tokenizer=tok, prompts=[tok.encode_chat([{"role": "user", "content": "1+2"}])],
                    params=SamplingParams(temperature=0.8), rng=np.random.default_rng(0), max_tokens=6,
                    branches_per_prompt=2)
    assert [len(o.tokens) for o in outs] == [6, 6] or any(o.finish == "eos" for o in outs)
    assert not any(m.split(".")[0] in BLOCKED for m in sys.modules), "a blocked module was imported"
    print("ok", len(outs))
""")


def test_runtime_never_imports_torch(tiny_bundle: Path) -> None:
    res = subprocess.run([sys.executable, "-c", NO_TORCH, str(tiny_bundle)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["ok", "2"]


def test_blocker_really_blocks() -> None:
    """The no-torch check would catch an import: importing the export side (which needs torch) fails."""
    script = NO_TORCH.split("import specreason_rt")[0] + "import specreason_export.graph\n"
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert res.returncode != 0 and "must not be imported by the runtime" in res.stderr


def test_wheel_installs_only_specreason_names(tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    (wheel,) = tmp_path.glob("specreason_rt-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"specreason_rt", "specreason_export", "specreason_models"}
    assert any(n.startswith("specreason_models/builtin/verifier/") for n in names), "weights not packaged"
    # Every source module is in the wheel (a subpackage missing from pyproject's list would not be).
    for folder, package in (("specreason_rt", "specreason_rt"), ("export", "specreason_export"),
                            ("models", "specreason_models")):
        for module in (ROOT / folder).rglob("*.py"):
            installed = f"{package}/{module.relative_to(ROOT / folder).as_posix()}"
            assert installed in names, f"{installed} is not in the wheel: add its package to pyproject.toml"
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "specreason-export = specreason_export.cli:main" in text
