"""The file names inside a model package folder (shared by the package and its fetcher)."""

__all__ = ["ONNX_FILE", "SPEC_FILE", "WEIGHTS_FILE"]

SPEC_FILE = "model.json"
WEIGHTS_FILE = "weights.safetensors"
# The weights of an ONNX package (model.json's weights_format "onnx"), run by onnxruntime.
ONNX_FILE = "model.onnx"
