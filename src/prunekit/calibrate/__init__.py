"""Calibration: run data through the model whole or one block at a time, with statistics hooks.
"""
from prunekit.calibrate.layerwise import ActivationBuffer, capture_block_inputs, find_blocks, run_layerwise, run_whole

__all__ = ["ActivationBuffer", "capture_block_inputs", "find_blocks", "run_layerwise", "run_whole"]
