"""Files: atomic writes, the pruned-model format (safetensors + plan.json), Hugging Face directories.
"""
from prunekit.io.format import load, save

__all__ = ["load", "save"]
