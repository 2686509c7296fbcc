"""The runtime's third-party imports are exactly the allowed ones (numpy, onnxruntime, tokenizers, jinja2 and
jsonschema for the manifest schema, with what those import themselves); torch & co. are never among them."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

# Top-level modules the runtime may bring in. jsonschema (and its own dependencies attrs, referencing, rpds,
# jsonschema_specifications) was added deliberately for the manifest schema (specreason_rt/manifest_schema.py).
ALLOWED = {
    "numpy", "onnxruntime", "tokenizers", "jinja2", "markupsafe",  # the design's runtime dependencies
    "jsonschema", "jsonschema_specifications", "referencing", "rpds", "attrs", "attr", "idna",  # manifest schema
    "typing_extensions", "coloredlogs", "humanfriendly", "flatbuffers", "packaging", "google", "sympy", "mpmath",
}  # (the last line: what some versions of jsonschema and onnxruntime import at start)

SCRIPT = textwrap.dedent("""
    import sys
    before = set(sys.modules)
    from specreason_rt.bundle import Bundle
    from specreason_rt.cli import main
    bundle = Bundle(sys.argv[1])
    bundle.tokenizers["verifier"].encode_chat([{"role": "user", "content": "1+2"}])
    stdlib = set(sys.stdlib_module_names)
    third = sorted({m.split(".")[0] for m in set(sys.modules) - before} - stdlib - {"specreason_rt", "_distutils_hack"})
    print(" ".join(m for m in third if not m.startswith("_")))
""")


def test_runtime_imports_only_allowed_packages(tiny_bundle: Path) -> None:
    res = subprocess.run([sys.executable, "-c", SCRIPT, str(tiny_bundle)], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    imported = set(res.stdout.split())
    assert "jsonschema" in imported and "numpy" in imported  # the check sees real imports
    assert imported <= ALLOWED, f"not allowed in the runtime: {sorted(imported - ALLOWED)}"
