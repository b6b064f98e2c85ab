"""Deterministic synthetic regions for demos, tests and benchmarks."""

from segpipe.synth.scene import SCENE_CLASSES, SceneSpec
from segpipe.synth.write import SynthRegion, synthesize

__all__ = ["SCENE_CLASSES", "SceneSpec", "SynthRegion", "synthesize"]
