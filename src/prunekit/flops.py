"""Parameter and MAC counts, from the same tracer the dependency graph uses (one forward pass)."""
from __future__ import annotations

import torch.nn as nn

from .graph.tracer import trace


def count_params(model: nn.Module) -> int:
    """Number of parameters, each tied tensor counted once."""
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, example_inputs) -> int:
    """Multiply-accumulates of one forward pass on `example_inputs` (conv, linear, matmul, attention)."""
    was = model.training
    model.eval()
    try:
        tr = trace(model, example_inputs)
    finally:
        model.train(was)
    return int(sum(c.base for c in tr.costs))
