"""ONNX Runtime engine: one InferenceSession per model, driven through the manifest's IO names."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from .errors import BundleError, ConfigError
from .manifest import ModelEntry

# CLI names -> ONNX Runtime execution providers. Later entries in a list are fallbacks for unsupported ops.
PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}


def resolve_providers(name: str) -> list[str]:
    """Execution providers for a CLI/API name; refuse one this onnxruntime build lacks."""
    if name not in PROVIDERS:
        raise ConfigError(f"unknown provider {name!r}: choose one of {', '.join(PROVIDERS)}")
    wanted = PROVIDERS[name][0]
    if wanted not in ort.get_available_providers():
        raise ConfigError(f"{wanted} is not available in this onnxruntime build "
                          f"(available: {', '.join(ort.get_available_providers())}); "
                          "install onnxruntime-gpu (pip install 'specreason-rt[gpu]') on an NVIDIA machine")
    return PROVIDERS[name]


class OrtEngine:
    """Runs one forward of a bundle model. The manifest, not the graph, names every tensor."""

    def __init__(self, *, model_path: str | Path, layers: int, kv_names: dict[str, str],
                 expected_inputs: list[str] | None = None, providers: list[str] | None = None,
                 intra_op_threads: int = 0) -> None:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = intra_op_threads
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(str(model_path), opts,
                                            providers=providers or ["CPUExecutionProvider"])
        if expected_inputs is not None:
            expected, actual = set(expected_inputs), {i.name for i in self.session.get_inputs()}
            if expected != actual:
                raise BundleError(f"{model_path}: graph inputs {sorted(actual - expected)} are not in the manifest "
                                  f"and manifest inputs {sorted(expected - actual)} are not in the graph; "
                                  "re-export the bundle")
        self.layers = layers
        self.past_key_names = [kv_names["past_key"].format(i) for i in range(layers)]
        self.past_value_names = [kv_names["past_value"].format(i) for i in range(layers)]
        self.output_names = ["logits"]
        self.output_names += [kv_names["new_key"].format(i) for i in range(layers)]
        self.output_names += [kv_names["new_value"].format(i) for i in range(layers)]

    @classmethod
    def from_bundle(cls, *, bundle_dir: str | Path, entry: ModelEntry, providers: list[str] | None = None,
                    intra_op_threads: int = 0) -> OrtEngine:
        return cls(model_path=Path(bundle_dir) / entry.file, layers=entry.architecture.layers,
                   kv_names=entry.kv_cache, expected_inputs=[t["name"] for t in entry.io["inputs"]],
                   providers=providers, intra_op_threads=intra_op_threads)

    def forward(self, *, input_ids: np.ndarray, position_ids: np.ndarray, attention_mask: np.ndarray,
                logits_index: np.ndarray, past_keys: list[np.ndarray], past_values: list[np.ndarray]
                ) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
        """One forward over the new tokens of every branch.

        input_ids, position_ids: [branches, new]; attention_mask: [branches, past + new];
        logits_index: [branches, k]; past_*: [branches, kv_heads, past, head_dim]
        returns logits [branches, k, vocab], new keys / values [branches, kv_heads, new, head_dim]
        """
        feed = {"input_ids": input_ids, "position_ids": position_ids, "attention_mask": attention_mask,
                "logits_index": logits_index}
        feed.update(zip(self.past_key_names, past_keys, strict=True))
        feed.update(zip(self.past_value_names, past_values, strict=True))
        out = self.session.run(self.output_names, feed)
        return out[0], out[1:1 + self.layers], out[1 + self.layers:]
