"""Backends: where a model's forward runs. `base.Engine` is the interface; `ort` (ONNX Runtime, any execution
provider chosen in `providers`) and `trt` (native TensorRT with a device KV cache) implement it."""
