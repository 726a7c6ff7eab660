"""Step 1, trace: which parameter slices must be removed together.

labels   element ids and probe tensors (data movement needs no rules)
ops      op-name tables: which generic rule an op without its own rule falls under
tracer   one eager forward under a TorchFunctionMode; op rules add union edges
rules/   the op rules by kind; `rules.RULES` / `rules.register` is the extension point for new ops
groups   connected components -> pruning units -> groups; analytic MACs/params of a plan
"""
from prunekit.graph.groups import DependencyGraph, Group, Member
from prunekit.graph.tracer import trace

__all__ = ["DependencyGraph", "Group", "Member", "trace"]
