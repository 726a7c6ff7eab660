"""The op-rule registry: the extension point for new op kinds.

A rule is `rule(tr, args, kwargs, out)`: it reads the labels of the op's tensor inputs (`tr.blocks`, `tr.rep`),
unions the ids that must be removed together (`tr.couple`, `tr.space.union`), pins what must keep its size
(`tr.pin_tensor`), labels the outputs (`tr.set`) and may add a MAC cost term (`tr.cost`). `RULES` maps an op
name (`torch.nn.functional.linear` and `Tensor.__matmul__` are "linear" and "__matmul__") to its rule; ops
without an entry fall back to the generic tables in prunekit.graph.ops. Add a rule for a new op with

    @register("my_op")
    def rule_my_op(tr, args, kwargs, out): ...

Modules by kind: contraction (linear, conv, matmul, einsum, attention), norms, elementwise, movement (shape
ops, split, cat), reduce (reductions, pooling), indexing (embedding, item assignment).
"""
from __future__ import annotations

from typing import Callable, Dict

from prunekit.errors import GraphError
from prunekit.graph.ops import CREATION, ELEMENTWISE, MOVEMENT, REDUCE, SPATIAL, UNARY, tensors
from prunekit.graph.rules.contraction import (rule_addmm, rule_baddbmm, rule_conv, rule_einsum, rule_linear,
                                              rule_matmul, rule_mha, rule_sdpa)
from prunekit.graph.rules.elementwise import elementwise, rule_prelu, unary
from prunekit.graph.rules.indexing import rule_embedding, rule_setitem
from prunekit.graph.rules.movement import movement
from prunekit.graph.rules.norms import (rule_batch_norm, rule_group_norm, rule_layer_norm, rule_normalize,
                                        rule_rms_norm)
from prunekit.graph.rules.reduce import reduce, spatial


def rule_conv_transpose(tr, args, kwargs, out):
    rule_conv(tr, args, kwargs, out, transpose=True)


RULES: Dict[str, Callable] = {
    "linear": rule_linear,
    "conv1d": rule_conv, "conv2d": rule_conv, "conv3d": rule_conv,
    "conv_transpose1d": rule_conv_transpose, "conv_transpose2d": rule_conv_transpose,
    "conv_transpose3d": rule_conv_transpose,
    "batch_norm": rule_batch_norm, "instance_norm": rule_batch_norm,   # same per-channel parameters
    "layer_norm": rule_layer_norm, "rms_norm": rule_rms_norm, "group_norm": rule_group_norm,
    "embedding": rule_embedding, "prelu": rule_prelu,
    "matmul": rule_matmul, "__matmul__": rule_matmul, "bmm": rule_matmul, "mm": rule_matmul,
    "scaled_dot_product_attention": rule_sdpa,
    "multi_head_attention_forward": rule_mha,
    "__setitem__": rule_setitem, "normalize": rule_normalize, "einsum": rule_einsum,
    "baddbmm": rule_baddbmm, "addmm": rule_addmm,
}


def register(*names: str):
    """Decorator: use the decorated function as the rule of every op in `names` (replacing any earlier one)."""
    def add(rule: Callable) -> Callable:
        for n in names:
            RULES[n] = rule
        return rule
    return add


def apply(tr, name, func, args, kwargs, out, has_blocks):
    """Run the rule of op `name`: its RULES entry, else the generic rule of its table in prunekit.graph.ops."""
    rule = RULES.get(name)
    if rule is not None:
        rule(tr, args, kwargs, out)
        return
    if name in CREATION:
        for o in tensors(out):
            tr.set(o, [])
        return
    if name in UNARY:
        return unary(tr, name, args, kwargs, out)
    if name in ELEMENTWISE:
        return elementwise(tr, args, kwargs, out)
    if name in MOVEMENT:
        return movement(tr, name, func, args, kwargs, out)
    if name in REDUCE:
        return reduce(tr, name, args, kwargs, out)
    if name in SPATIAL:
        return spatial(tr, args, out)
    if not has_blocks:
        for o in tensors(out):
            tr.set(o, [])
        return
    raise GraphError(tr.where(name) + ": prunekit has no channel rule for this op and its inputs carry "
                     "prunable channels. " + tr.hint())
