"""Data-dependent ops: which element lands where is decided by the values, not by the shapes.

`topk`/`sort`/`argsort`/`kthvalue`/`cummax`/`cummin` reorder along one dim: the other dims keep their
channels (the values output carries them), the reordered dim cannot be pruned, and indices carry no
parameter ids. Detection ops: `nms`/`batched_nms` select boxes (nothing prunable passes through);
`roi_align`/`roi_pool` (also inside `MultiScaleRoIAlign`) keep the feature channels of their input,
position-sensitive `ps_roi_align`/`ps_roi_pool` map channels to bins and keep them all."""
from __future__ import annotations


from prunekit.graph.labels import align, reduce_to, tracked
from prunekit.graph.ops import arg, tensors
from prunekit.graph.rules.indexing import fix_dims


def _reorder(dim_pos: int, default, values: bool = True):
    """Rule of an op that reorders its input along the dim given at `dim_pos` (or `default`); with `values`
    its first output holds the reordered values, every other output holds indices."""
    def rule(tr, args, kwargs, out):
        x = args[0]
        dim = arg(args, kwargs, dim_pos, "dim", default)
        outs = tensors(out)
        if not isinstance(dim, int) or x.dim() == 0:
            tr.pin_tensor(x)
            for o in outs:
                tr.set(o, [])
            return
        blocks = [align(b, x.dim()) for b in fix_dims(tr, x, [dim])]
        for i, o in enumerate(outs):
            tr.set(o, blocks if values and i == 0 and o.dim() == x.dim() else [])
    return rule


rule_topk = _reorder(2, -1)                  # topk(input, k, dim=-1) -> (values, indices)
rule_kthvalue = _reorder(2, -1)              # kthvalue(input, k, dim=-1, keepdim) -> (values, indices)
rule_sort = _reorder(1, -1)                  # sort(input, dim=-1) -> (values, indices)
rule_argsort = _reorder(1, -1, values=False)  # argsort(input, dim=-1) -> indices
rule_cum = _reorder(1, None)                 # cummax/cummin(input, dim) -> (values, indices)
rule_msort = _reorder(99, 0)                 # msort(input) sorts dim 0


def rule_nms(tr, args, kwargs, out):
    """nms(boxes, scores, iou): box coordinates and scores stay; the kept indices carry no ids."""
    for t in tensors((args, kwargs)):
        tr.pin_tensor(t)
    for o in tensors(out):
        tr.set(o, [])


def rule_roi(tr, args, kwargs, out):
    """roi_align/roi_pool(input (N, C, H, W), rois, ...) -> (K, C, h, w): channel c of every box is input
    channel c; which batch image and which pixels feed a box depend on the boxes."""
    x, rois = args[0], args[1]
    for t in tensors(rois):
        tr.pin_tensor(t)
    blocks = []
    for b in tr.blocks(x):
        b = align(b, x.dim())
        if 1 in tracked(b, x.shape):
            blocks.append(reduce_to(tr.space, b, [1]))
        else:
            tr.space.pin(b)      # ids along batch or pixels: where they land depends on the boxes
    for o in tensors(out):
        tr.set(o, blocks if o.dim() == x.dim() and o.shape[1] == x.shape[1] else [])


def rule_ps_roi(tr, args, kwargs, out):
    """ps_roi_align/ps_roi_pool: output channel c reads input channel c * bins + bin, so channels stay."""
    for t in tensors((args, kwargs)):
        tr.pin_tensor(t)
    for o in tensors(out):
        tr.set(o, [])
