"""Model-family knowledge the graph cannot trace (Hugging Face attention attributes and configs).
"""


__all__ = []
