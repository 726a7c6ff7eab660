"""Export: int8 / 2:4 quantization (quantize), ONNX with ONNX Runtime verification (onnx), GGUF for llama.cpp
(gguf; loaded on first use as prunekit.export.gguf / pk.export_gguf).
"""
from prunekit.export.onnx import export_onnx
from prunekit.export.quantize import quantize_int8, semi_structured_2to4

__all__ = ["export_onnx", "quantize_int8", "semi_structured_2to4"]
