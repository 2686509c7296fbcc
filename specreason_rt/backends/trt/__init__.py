"""The native TensorRT backend: `plan` (pure shape/profile/copy logic, tested on numpy), `kv` (the device KV
cache), `engine` (the TensorRT + cuda-python calls). tensorrt and cuda-python are imported only in `engine`."""
