"""Contractions: linear, conv, matmul/bmm/mm, einsum, attention, baddbmm/addmm. The contracted dim couples
both operands; output channels come from the weight's rows; each op adds its MACs as a cost term."""
from __future__ import annotations

import math

import torch

from prunekit.graph.labels import align, tracked
from prunekit.graph.ops import arg, tensors
from prunekit.graph.rules.elementwise import elementwise
from prunekit.graph.rules.indexing import fix_dims


def rule_linear(tr, args, kwargs, out):
    x, w = args[0], arg(args, kwargs, 1, "weight")
    b = arg(args, kwargs, 2, "bias")
    tr.couple(x, [-1], w, [1])
    rows = tr.rep_vec(w, 0)
    if b is not None:
        tr.couple(b, [0], w, [0])
    blocks = []
    if rows is not None:
        shape = [1] * out.dim()
        shape[-1] = out.shape[-1]
        blocks.append(rows.view(shape))
    for blk in tr.blocks(x):
        if out.dim() - 1 not in tracked(blk, x.shape) and x.dim() == out.dim():
            blocks.append(blk)
    tr.set(out, blocks)
    tr.cost(out.numel() * w.shape[1], [tr.dim_ids(w, 0), tr.dim_ids(w, 1)], "linear")


def rule_conv(tr, args, kwargs, out, transpose=False):
    x, w = args[0], arg(args, kwargs, 1, "weight")
    b = arg(args, kwargs, 2, "bias")
    g = arg(args, kwargs, 6 if not transpose else 7, "groups", 1)
    if transpose:
        g = arg(args, kwargs, 6, "groups", 1)
    if not isinstance(g, int):
        g = 1
    out_dim, in_dim = (1, 0) if transpose else (0, 1)
    C = x.shape[1]
    rows = tr.rep_vec(w, out_dim)
    cols = tr.rep_vec(w, in_dim)
    xr = tr.rep_vec(x, 1)
    if g == 1:
        tr.couple(x, [1], w, [in_dim])
    elif transpose:
        tr.pin_tensor(x)
        tr.pin_tensor(w)
        rows = None
    else:
        mod = tr.module_stack[-1]
        tr.conv_groups[mod] = g
        O = w.shape[0]
        per_in, per_out = C // g, O // g
        if xr is None:
            if rows is not None:
                tr.space.pin(rows)
        elif per_in == 1:
            # depthwise (channel multiplier per_out): input channel c feeds outputs c*m .. c*m+m-1
            tr.space.union(xr.view(g, 1), rows.view(g, per_out) if rows is not None else torch.full((g, 1), -1))
        else:
            # grouped: keep groups; remove the same local positions in every group
            xg = xr.view(g, per_in)
            tr.space.union(xg[:1].expand_as(xg), xg)
            if cols is not None:
                tr.space.union(cols.view(1, per_in), xg[:1])
            if rows is not None:
                rg = rows.view(g, per_out)
                tr.space.union(rg[:1].expand_as(rg), rg)
    if b is not None:
        tr.couple(b, [0], w, [out_dim])
    for d in range(2, w.dim()):          # kernel taps are not channels
        kid = tr.rep_vec(w, d)
        if kid is not None:
            tr.space.pin(kid)
    blocks = []
    if rows is not None:
        shape = [1] * out.dim()
        shape[1] = out.shape[1]
        blocks.append(rows.view(shape))
    tr.set(out, blocks)
    k = math.prod(w.shape[2:])
    tr.cost(out.numel() * (C // g) * k, [tr.dim_ids(out, 1), tr.dim_ids(x, 1) if g == 1 or (C // g) > 1 else None],
            "conv")


def rule_matmul(tr, args, kwargs, out):
    a, b = args[0], args[1]
    if a.dim() < 2 or b.dim() < 2:
        tr.pin_tensor(a)
        tr.pin_tensor(b)
        tr.set(out, [])
        return
    nd = out.dim()
    nb = nd - 2
    # batch dims (right-aligned) + contraction dim are the same positions in both operands
    da = [d for d in range(a.dim() - 2) if a.dim() - 2 - d <= nb]
    db = [d for d in range(b.dim() - 2) if b.dim() - 2 - d <= nb]
    pa = list(range(a.dim() - 2))[-min(len(da), len(db)):] if min(len(da), len(db)) else []
    pb = list(range(b.dim() - 2))[-min(len(da), len(db)):] if min(len(da), len(db)) else []
    pairs_a, pairs_b = [], []
    for x_, y_ in zip(pa, pb):
        if a.shape[x_] == b.shape[y_]:
            pairs_a.append(x_)
            pairs_b.append(y_)
    tr.couple(a, pairs_a + [a.dim() - 1], b, pairs_b + [b.dim() - 2])
    blocks = []
    ra = tr.rep(a, [d for d in range(a.dim()) if d != a.dim() - 1 and d in tr.tracked_dims(a)])
    rb = tr.rep(b, [d for d in range(b.dim()) if d != b.dim() - 2 and d in tr.tracked_dims(b)])
    if rb is not None:
        blocks.append(align(rb, nd))
    if ra is not None:
        ra = align(ra, nd)
        if rb is None or not any(ra.shape[d] > 1 and align(rb, nd).shape[d] > 1 for d in range(nd)):
            blocks.append(ra)
    tr.set(out, blocks)
    # MACs scale with every kept output position and the kept contraction length
    factors = [tr.dim_ids(out, d) for d in range(out.dim())] + [tr.dim_ids(a, a.dim() - 1)]
    tr.cost(out.numel() * a.shape[-1], factors, "matmul")


def rule_sdpa(tr, args, kwargs, out):
    q, k, v = args[0], args[1], args[2]
    gqa = bool(kwargs.get("enable_gqa", False))
    hq = q.shape[-3] if q.dim() >= 3 else 1
    hk = k.shape[-3] if k.dim() >= 3 else 1
    if gqa and hq != hk and hk > 0 and tr.gqa == "query_heads":
        rep = hq // hk
        # kv heads stay; query head j of every group goes together, so each group keeps the same count
        for t in (k, v):
            tr.pin_tensor(t)
        rq = tr.rep(q, [q.dim() - 3])
        blocks = []
        if rq is not None:
            g = rq.reshape(hk, rep)
            tr.space.union(g[:1].expand_as(g), g)
            shape = [1] * out.dim()
            shape[-3] = hq
            blocks.append(rq.reshape(shape))      # o_proj columns of head i go with query head i
        tr.set(out, blocks)
    elif gqa and hq != hk and hk > 0:
        rep = hq // hk
        # query head i uses kv head i // rep: tie each query head group to its kv head
        for t in (k, v):
            rk = tr.rep(t, [t.dim() - 3])
            rq = tr.rep(q, [q.dim() - 3])
            if rk is not None and rq is not None:
                tr.space.union(rq.reshape(hk, rep), rk.reshape(hk, 1))
            elif rq is not None or rk is not None:
                tr.pin_tensor(q)
                tr.pin_tensor(t)
        qd = [q.dim() - 3]
        tr.couple(q, [q.dim() - 1], k, [k.dim() - 1])
        qb = tr.rep(q, qd)
        blocks = []
        vb = tr.rep(v, [v.dim() - 3, v.dim() - 1])
        if vb is not None:
            vv = vb.reshape(hk, 1, v.shape[-1]).expand(hk, rep, v.shape[-1]).reshape(hq, v.shape[-1])
            shape = [1] * out.dim()
            shape[-3], shape[-1] = hq, v.shape[-1]
            blocks.append(vv.reshape(shape))
        tr.set(out, blocks)
    else:
        kt = k.transpose(-2, -1)
        tr.set(kt, [b.transpose(-2, -1) if b.dim() >= 2 else b for b in tr.blocks(k)])
        scores = torch.empty(q.shape[:-1] + (k.shape[-2],))
        rule_matmul(tr, (q, kt), {}, scores)
        mask = arg(args, kwargs, 3, "attn_mask")
        if isinstance(mask, torch.Tensor):
            elementwise(tr, (scores, mask), {}, scores)
        rule_matmul(tr, (scores, v), {}, out)
    if gqa and hq != hk:
        tr.cost(q.numel() * k.shape[-2] * 2, [tr.dim_ids(q, q.dim() - 3)], "sdpa")


def rule_mha(tr, args, kwargs, out):
    # nn.MultiheadAttention requires its inner width to equal embed_dim: leave it untouched for now
    for t in tensors((args, kwargs)):
        tr.pin_tensor(t)
    outs = tensors(out)
    for o in outs:
        tr.set(o, [])
    q = args[0]
    E = q.shape[-1]
    tr.cost(q.numel() * E * 4 + q.numel() * q.shape[0] * 2, [], "mha")


def rule_einsum(tr, args, kwargs, out):
    eq = args[0].replace(" ", "")
    ops = args[1:] if not (len(args) == 2 and isinstance(args[1], (list, tuple))) else list(args[1])
    lhs, rhs = eq.split("->") if "->" in eq else (eq, None)
    terms = lhs.split(",")
    if "..." in eq or len(terms) != len(ops):
        for t in ops:
            tr.pin_tensor(t)
        tr.set(out, [])
        return
    if rhs is None:
        rhs = "".join(sorted(c for c in set(lhs) - {","} if lhs.count(c) == 1))
    # letters shared by two operands are coupled
    for i in range(len(ops)):
        for j in range(i + 1, len(ops)):
            shared = [c for c in terms[i] if c in terms[j]]
            if shared:
                tr.couple(ops[i], [terms[i].index(c) for c in shared], ops[j], [terms[j].index(c) for c in shared])
    blocks = []
    covered = set()
    for i, t in enumerate(ops):
        dims = [terms[i].index(c) for c in rhs if c in terms[i]]
        dims = [d for d in dims if d in tr.tracked_dims(t)]
        if not dims:
            continue
        r = tr.rep(t, dims)
        letters = [terms[i][d] for d in sorted(dims)]
        if covered & set(letters):
            continue
        covered |= set(letters)
        grid = r.reshape([t.shape[d] for d in sorted(dims)])
        # place into output order
        order = sorted(range(len(letters)), key=lambda k: rhs.index(letters[k]))
        grid = grid.permute(order)
        shape = [1] * out.dim()
        for k in order:
            shape[rhs.index(letters[k])] = t.shape[sorted(dims)[k]]
        blocks.append(grid.reshape(shape))
    tr.set(out, blocks)
    # MACs: every output element sums over the letters that appear in no output position
    summed = [c for c in dict.fromkeys(lhs.replace(",", "")) if c not in rhs]
    size = {}
    for t, term in zip(ops, terms):
        for d, c in enumerate(term):
            size[c] = max(size.get(c, 1), t.shape[d])
    factors = [tr.dim_ids(out, d) for d in range(out.dim())]
    for c in summed:
        for t, term in zip(ops, terms):
            if c in term:
                factors.append(tr.dim_ids(t, term.index(c)))
                break
    tr.cost(out.numel() * math.prod(size[c] for c in summed), factors, "einsum")


def rule_baddbmm(tr, args, kwargs, out):
    """baddbmm(input, batch1, batch2): `args` holds keyword-passed batch1/batch2 too (BLOOM's alibi)."""
    inp, b1, b2 = args[0], args[1], args[2]
    tmp = torch.empty(out.shape)
    rule_matmul(tr, (b1, b2), {}, tmp)
    elementwise(tr, (tmp, inp), {}, out)


def rule_addmm(tr, args, kwargs, out):
    # addmm(bias, x, w_t) is how some code writes a Linear
    inp, m1, m2 = args[0], args[1], args[2]
    tmp = torch.empty(out.shape)
    rule_matmul(tr, (m1, m2), {}, tmp)
    elementwise(tr, (tmp, inp), {}, out)


def rule_grouped_mm(tr, args, kwargs, out):
    """torch._grouped_mm(a, b, offs, bias): mixture-of-experts matmul over 3-D expert weights. 3-D x 3-D is a
    batched matmul; 2-D tokens x (experts, K, N) sends the token rows given by `offs` to each expert, so the
    expert dim stays and K/N prune across all experts alike."""
    a, b = args[0], args[1]
    bias = args[3] if len(args) > 3 else None
    if a.dim() == 3 and b.dim() == 3:
        rule_matmul(tr, (a, b), {}, out)
    elif a.dim() == 2 and b.dim() == 3:
        experts = tr.rep_vec(b, 0)
        if experts is not None:
            tr.space.pin(experts)           # tokens are routed to experts by `offs`
        fix_dims(tr, a, [0])
        tr.couple(a, [1], b, [1])
        cols = tr.rep_vec(b, 2)
        tr.set(out, [cols.view(1, -1)] if cols is not None else [])
        tr.cost(out.numel() * a.shape[1], [tr.dim_ids(out, 1), tr.dim_ids(a, 1)], "grouped_mm")
    else:
        for t in (a, b):
            tr.pin_tensor(t)
        tr.set(out, [])
    if isinstance(bias, torch.Tensor) and isinstance(out, torch.Tensor) and tr.blocks(out):
        tr.couple(bias, [-1], out, [-1])
