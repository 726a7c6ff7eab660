"""The op-rule registry: the extension point for new op kinds.

A rule is `rule(tr, args, kwargs, out)` (`args` also holds every keyword argument the op takes by position,
in signature order, so `args[1]` is `batch1` however the caller wrote it): it reads the labels of the op's tensor inputs (`tr.blocks`, `tr.rep`),
unions the ids that must be removed together (`tr.couple`, `tr.space.union`), pins what must keep its size
(`tr.pin_tensor`), labels the outputs (`tr.set`) and may add a MAC cost term (`tr.cost`). `RULES` maps an op
name (`torch.nn.functional.linear` and `Tensor.__matmul__` are "linear" and "__matmul__") to its rule; ops
without an entry fall back to the generic tables in prunekit.graph.ops. Add a rule for a new op with

    @register("my_op")
    def rule_my_op(tr, args, kwargs, out): ...

Modules by kind: contraction (linear, conv, matmul, einsum, attention, grouped expert matmul), norms,
elementwise, movement (shape ops, split, cat), reduce (reductions, pooling), indexing (embedding, item
assignment, in-place index writes), selection (data-dependent: sort/topk, nms, roi_align/roi_pool), positions (values that are positions:
nonzero, argmax, boolean-mask indexing).
"""
from __future__ import annotations

from typing import Callable, Dict

from prunekit.errors import GraphError
from prunekit.graph.ops import (CREATION, ELEMENTWISE, MOVEMENT, REDUCE, SPATIAL, UNARY, UNIFORM, positional,
                               tensors)
from prunekit.graph.rules.contraction import (rule_addmm, rule_baddbmm, rule_conv, rule_einsum, rule_grouped_mm,
                                              rule_linear, rule_matmul, rule_mha, rule_sdpa)
from prunekit.graph.rules.elementwise import elementwise, rule_prelu, unary
from prunekit.graph.rules.indexing import (out_of_place, rule_copy_, rule_embedding, rule_index_write,
                                           rule_scatter_, rule_setitem)
from prunekit.graph.rules.movement import movement
from prunekit.graph.rules.norms import (rule_batch_norm, rule_group_norm, rule_layer_norm, rule_normalize,
                                        rule_rms_norm, rule_weight_norm)
from prunekit.graph.rules.positions import (rule_arg_extreme, rule_getitem, rule_masked_select, rule_max_min,
                                            rule_nonzero, rule_where)
from prunekit.graph.rules.reduce import reduce, spatial
from prunekit.graph.rules.selection import (rule_argsort, rule_cum, rule_kthvalue, rule_msort, rule_nms,
                                            rule_ps_roi, rule_roi, rule_sort, rule_topk)


def rule_conv_transpose(tr, args, kwargs, out):
    rule_conv(tr, args, kwargs, out, transpose=True)


RULES: Dict[str, Callable] = {
    "linear": rule_linear,
    "conv1d": rule_conv, "conv2d": rule_conv, "conv3d": rule_conv,
    "conv_transpose1d": rule_conv_transpose, "conv_transpose2d": rule_conv_transpose,
    "conv_transpose3d": rule_conv_transpose,
    "batch_norm": rule_batch_norm, "instance_norm": rule_batch_norm,   # same per-channel parameters
    "layer_norm": rule_layer_norm, "rms_norm": rule_rms_norm, "group_norm": rule_group_norm,
    "_weight_norm": rule_weight_norm,
    "embedding": rule_embedding, "prelu": rule_prelu,
    "matmul": rule_matmul, "__matmul__": rule_matmul, "bmm": rule_matmul, "mm": rule_matmul,
    "scaled_dot_product_attention": rule_sdpa,
    "multi_head_attention_forward": rule_mha,
    "__setitem__": rule_setitem, "normalize": rule_normalize, "einsum": rule_einsum,
    "baddbmm": rule_baddbmm, "addmm": rule_addmm, "_grouped_mm": rule_grouped_mm,
    # data-dependent ops (selection.py)
    "topk": rule_topk, "kthvalue": rule_kthvalue, "sort": rule_sort, "argsort": rule_argsort,
    "cummax": rule_cum, "cummin": rule_cum, "msort": rule_msort,
    "nms": rule_nms, "roi_align": rule_roi, "roi_pool": rule_roi, "ps_roi_align": rule_ps_roi,
    "ps_roi_pool": rule_ps_roi,
    # values that are positions (positions.py)
    "nonzero": rule_nonzero, "argwhere": rule_nonzero, "where": rule_where, "argmax": rule_arg_extreme,
    "argmin": rule_arg_extreme, "max": rule_max_min, "min": rule_max_min, "__getitem__": rule_getitem,
    "masked_select": rule_masked_select,
    # in-place writes (indexing.py)
    "copy_": rule_copy_, "index_add_": rule_index_write, "index_copy_": rule_index_write,
    "scatter_": rule_scatter_, "scatter_add_": rule_scatter_,
    "scatter": out_of_place(rule_scatter_), "scatter_add": out_of_place(rule_scatter_),
    "index_add": out_of_place(rule_index_write), "index_copy": out_of_place(rule_index_write),
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
        rule(tr, positional(func, args, kwargs), kwargs, out)   # keyword arguments also readable by position
        return
    if name in CREATION:
        for o in tensors(out):
            tr.set(o, [])
            if name in UNIFORM:
                tr.uniform.add(id(o))
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
