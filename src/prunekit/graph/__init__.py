"""Step 1, trace: which parameter slices must be removed together.

labels   element ids and probe tensors (data movement needs no rules)
tracer   one eager forward under a TorchFunctionMode; op rules add union edges
groups   connected components -> pruning units -> groups; analytic MACs/params of a plan
"""
from prunekit.graph.groups import DependencyGraph, Group, Member
from prunekit.graph.tracer import trace

__all__ = ["DependencyGraph", "Group", "Member", "trace"]
