"""The file names inside a model package folder (shared by the package and its fetcher)."""

__all__ = ["SPEC_FILE", "WEIGHTS_FILE"]

SPEC_FILE = "model.json"
WEIGHTS_FILE = "weights.safetensors"
