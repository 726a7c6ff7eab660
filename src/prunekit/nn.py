"""Plain modules that can hold pruned shapes where torch's own cannot.

`nn.MultiheadAttention` packs q/k/v into one `in_proj_weight` and requires its inner width to equal
`embed_dim` (the residual width), so heads cannot be removed from it. `MultiheadAttention` below computes
the same function with separate q/k/v/out projections and an inner width of `num_heads * head_dim`, so
whole heads can go while the residual width stays. `from_torch` converts a module exactly (same weights);
structured pruning converts only when it is going to cut something, and records the conversion in the plan
so `pk.load` repeats it.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F


class MultiheadAttention(nn.Module):
    """Drop-in for `torch.nn.MultiheadAttention` (same forward signature and return value)."""

    def __init__(self, embed_dim: int, num_heads: int, head_dim: Optional[int] = None, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, device=None, dtype=None):
        super().__init__()
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.head_dim = head_dim or embed_dim // num_heads
        self.batch_first, self.dropout = batch_first, dropout
        inner = self.num_heads * self.head_dim
        kw = {"device": device, "dtype": dtype}
        self.q_proj = nn.Linear(embed_dim, inner, bias=bias, **kw)
        self.k_proj = nn.Linear(embed_dim, inner, bias=bias, **kw)
        self.v_proj = nn.Linear(embed_dim, inner, bias=bias, **kw)
        self.out_proj = nn.Linear(inner, embed_dim, bias=bias, **kw)

    @staticmethod
    def convertible(m: nn.MultiheadAttention) -> bool:
        return (isinstance(m, nn.MultiheadAttention) and m._qkv_same_embed_dim and m.bias_k is None
                and not m.add_zero_attn)

    @classmethod
    def from_torch(cls, m: nn.MultiheadAttention) -> "MultiheadAttention":
        w = m.in_proj_weight
        new = cls(m.embed_dim, m.num_heads, bias=m.in_proj_bias is not None, batch_first=m.batch_first,
                  dropout=m.dropout, device=w.device, dtype=w.dtype)
        E = m.embed_dim
        with torch.no_grad():
            for i, proj in enumerate((new.q_proj, new.k_proj, new.v_proj)):
                proj.weight.copy_(w[i * E:(i + 1) * E])
                if m.in_proj_bias is not None:
                    proj.bias.copy_(m.in_proj_bias[i * E:(i + 1) * E])
            new.out_proj.weight.copy_(m.out_proj.weight)
            if m.out_proj.bias is not None:
                new.out_proj.bias.copy_(m.out_proj.bias)
        for p_new, p_old in ((new.q_proj.weight, w), (new.out_proj.weight, m.out_proj.weight)):
            p_new.requires_grad_(p_old.requires_grad)
        new.train(m.training)
        return new

    def _mask(self, attn_mask, key_padding_mask, B, T, S, dtype):
        """Additive float mask broadcastable to (B, heads, T, S), or None."""
        mask = None
        if attn_mask is not None:
            am = attn_mask
            if am.dtype == torch.bool:
                am = torch.zeros(am.shape, dtype=dtype, device=am.device).masked_fill(am, float("-inf"))
            am = am.to(dtype)
            mask = am.view(B, -1, T, S) if am.dim() == 3 else am
        if key_padding_mask is not None:
            kp = key_padding_mask
            if kp.dtype == torch.bool:
                kp = torch.zeros(kp.shape, dtype=dtype, device=kp.device).masked_fill(kp, float("-inf"))
            kp = kp.to(dtype).view(B, 1, 1, S)
            mask = kp if mask is None else mask + kp
        return mask

    def forward(self, query, key, value, key_padding_mask=None, need_weights: bool = True, attn_mask=None,
                average_attn_weights: bool = True, is_causal: bool = False) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        B, T, _ = query.shape
        S = key.shape[1]
        q = self.q_proj(query).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)   # (B, nh, T, hs)
        k = self.k_proj(key).view(B, S, self.num_heads, self.head_dim).transpose(1, 2)     # (B, nh, S, hs)
        v = self.v_proj(value).view(B, S, self.num_heads, self.head_dim).transpose(1, 2)
        mask = self._mask(attn_mask, key_padding_mask, B, T, S, q.dtype)
        p = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            att = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)                      # (B, nh, T, S)
            if mask is not None:
                att = att + mask
            elif is_causal:
                att = att.masked_fill(torch.ones(T, S, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
            att = att.softmax(-1)
            weights = att.mean(1) if average_attn_weights else att
            y = F.dropout(att, p) @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p,
                                               is_causal=is_causal and mask is None)
        y = self.out_proj(y.transpose(1, 2).reshape(B, T, -1))                              # (B, T, C)
        if not self.batch_first:
            y = y.transpose(0, 1)
        return y, weights


def convert_mha(model: nn.Module, names=None):
    """Replace convertible `nn.MultiheadAttention` modules (all, or those in `names`) in place; returns names."""
    done = []
    for name, m in list(model.named_modules()):
        if (names is None and MultiheadAttention.convertible(m)) or (names is not None and name in names):
            parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
            setattr(parent, name.rpartition(".")[2], MultiheadAttention.from_torch(m))
            done.append(name)
    return done
