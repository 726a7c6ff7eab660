"""Pure tensor functions for one-shot weight sparsity: magnitude, Wanda and SparseGPT.

Every function takes a weight matrix `W` laid out as (out_features, in_features) -- one row per output
neuron, one column per input feature, as in `nn.Linear.weight` -- and returns a boolean *keep* mask of the
same shape (True = weight survives). Nothing here knows about modules, hooks or models, so each function can
be checked by hand on a 2x4 matrix (see tests/test_sparse.py).

Patterns
--------
"unstructured"  any `floor(sparsity * n)` weights of a group (a row, or the whole matrix) are zeroed.
"N:M"           in every group of M consecutive input columns of a row, N weights are kept (M - N zeroed):
                the layout that sparse tensor cores accelerate for "2:4".

References: Wanda (Sun et al. 2023, arXiv:2306.11695), SparseGPT (Frantar & Alistarh 2023, arXiv:2301.00774).
"""
from __future__ import annotations

import math
import re
from typing import Optional, Tuple

import torch

from prunekit.errors import ConfigError

__all__ = ["parse_pattern", "pattern_sparsity", "mask_from_scores", "magnitude_mask", "wanda_scores",
           "wanda_mask", "sparsegpt_prune", "InputStats", "owl_block_sparsity", "outlier_ratio"]

_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def parse_pattern(pattern: str) -> Optional[Tuple[int, int]]:
    """"unstructured" -> None; "n:m" -> (n, m) with 0 < n < m (n weights *kept* per group of m).

    Raises ValueError naming the pattern otherwise (e.g. "3:2" would keep more weights than the group has)."""
    if not isinstance(pattern, str):
        raise ConfigError(f"pattern must be a string ('unstructured' or 'N:M' such as '2:4'), got {pattern!r}")
    if pattern.strip().lower() == "unstructured":
        return None
    hit = _NM.match(pattern)
    if not hit:
        raise ConfigError(f"pattern {pattern!r} is neither 'unstructured' nor 'N:M' (e.g. '2:4': keep 2 of every 4)")
    n, m = int(hit.group(1)), int(hit.group(2))
    if not 0 < n < m:
        hint = f"; did you mean '{m}:{n}'?" if n > m > 0 else ""
        raise ConfigError(f"pattern {pattern!r}: N:M keeps N of every M consecutive input weights, so it needs "
                          f"0 < N < M (got N={n}, M={m}){hint}")
    return n, m


def pattern_sparsity(pattern: str) -> Optional[float]:
    """Fraction of zeros an N:M pattern implies (1 - N/M), or None for unstructured."""
    nm = parse_pattern(pattern)
    return None if nm is None else 1.0 - nm[0] / nm[1]


def _check_matrix(W: torch.Tensor, what: str = "W") -> None:
    if not isinstance(W, torch.Tensor) or W.dim() != 2:
        raise ConfigError(f"{what} must be a 2-D (out_features, in_features) tensor, got "
                          f"{tuple(W.shape) if isinstance(W, torch.Tensor) else type(W).__name__}")


def _check_sparsity(sparsity: float) -> None:
    if not (isinstance(sparsity, (int, float)) and not isinstance(sparsity, bool) and 0.0 <= sparsity < 1.0):
        raise ConfigError(f"sparsity must be a float in [0, 1), got {sparsity!r}")


def mask_from_scores(scores: torch.Tensor, sparsity: float, pattern: str = "unstructured",
                     per_row: bool = True) -> torch.Tensor:
    """Keep mask that zeroes the lowest-scoring weights.

    scores: (out, in), higher = more important.
    unstructured: exactly floor(sparsity * in) zeros per row (per_row=True, Wanda's comparison group) or
                  floor(sparsity * out * in) zeros in the whole matrix (per_row=False, layer-wise magnitude).
    N:M:          N kept of each M consecutive columns in every row; `sparsity` is ignored (implied 1 - N/M);
                  in_features must be divisible by M.
    Ties are broken by position (stable sort), so the result is deterministic.
    """
    _check_matrix(scores, "scores")
    nm = parse_pattern(pattern)
    rows, cols = scores.shape
    if nm is not None:
        n, m = nm
        if cols % m:
            raise ConfigError(f"pattern {pattern!r} groups input columns by {m}, but the matrix has {cols} columns "
                              f"(not divisible by {m}); exclude this layer or use pattern='unstructured'")
        groups = scores.reshape(rows, cols // m, m)                          # (out, in/M, M)
        keep_idx = groups.topk(n, dim=-1, largest=True, sorted=False).indices  # (out, in/M, N)
        keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep_idx, True)
        return keep.reshape(rows, cols)
    _check_sparsity(sparsity)
    flat = scores.reshape(rows, cols) if per_row else scores.reshape(1, -1)    # (groups, group_size)
    k = int(flat.shape[1] * sparsity)                                        # zeros per group (floor)
    keep = torch.ones_like(flat, dtype=torch.bool)
    if k:
        drop = torch.sort(flat, dim=1, stable=True).indices[:, :k]          # (groups, k) lowest scores
        keep.scatter_(1, drop, False)
    return keep.reshape(rows, cols)


def magnitude_mask(W: torch.Tensor, sparsity: float, pattern: str = "unstructured",
                   per_row: bool = False) -> torch.Tensor:
    """Keep mask of the largest |W|. Unstructured compares the whole layer (the classic magnitude baseline
    used by the Wanda and SparseGPT papers); N:M compares within each group of M. Returns bool (out, in)."""
    _check_matrix(W)
    return mask_from_scores(W.detach().abs().float(), sparsity, pattern, per_row=per_row)


def wanda_scores(W: torch.Tensor, act_sq_norm: torch.Tensor) -> torch.Tensor:
    """Wanda importance |W_ij| * ||X_j||_2, i.e. |W| * sqrt(scaler_row).

    W: (out, in); act_sq_norm: (in,) = sum (or mean; the scale does not change per-row rankings) of squared
    input activations per input feature. Returns (out, in) float32 scores."""
    _check_matrix(W)
    if act_sq_norm.dim() != 1 or act_sq_norm.shape[0] != W.shape[1]:
        raise ConfigError(f"act_sq_norm must have shape ({W.shape[1]},) to match W's in_features, "
                          f"got {tuple(act_sq_norm.shape)}")
    return W.detach().abs().float() * act_sq_norm.detach().float().clamp_min(0).sqrt().unsqueeze(0)


def wanda_mask(W: torch.Tensor, act_sq_norm: torch.Tensor, sparsity: float,
               pattern: str = "unstructured") -> torch.Tensor:
    """Wanda keep mask: per output row (unstructured) or per N:M group, keep the highest |W|*||X||."""
    return mask_from_scores(wanda_scores(W, act_sq_norm), sparsity, pattern, per_row=True)


def sparsegpt_prune(W: torch.Tensor, H: torch.Tensor, sparsity: float, pattern: str = "unstructured",
                    blocksize: int = 128, percdamp: float = 0.01,
                    mask: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT: choose a mask and update the kept weights so the layer's outputs on the calibration inputs
    change as little as possible (approximate OBS, solved column by column with a Cholesky factor of H^-1).

    W: (out, in) weights; H: (in, in) = 2/N * X^T X from the calibration inputs (see `InputStats`).
    sparsity/pattern: as in `mask_from_scores`; unstructured masks are chosen per block of `blocksize`
        columns over all rows (SparseGPT's adaptive mask selection), N:M per group of M columns.
    percdamp: dampening added to H's diagonal as a fraction of its mean diagonal (keeps H invertible).
    mask: optional fixed keep mask (out, in); then only the weight update is computed (used by tests to
        compare against the least-squares optimum for that mask).
    Returns (new_W with zeros where pruned, in W's dtype; keep mask bool (out, in)).

    Why blocked lazy updates: the error of pruning column i must be propagated to all later columns; doing it
    for the current block only, and for the rest once per block, turns many rank-1 updates into one matmul.
    """
    _check_matrix(W)
    rows, cols = W.shape
    if H.shape != (cols, cols):
        raise ConfigError(f"H must be ({cols}, {cols}) to match W's in_features, got {tuple(H.shape)}")
    nm = parse_pattern(pattern)
    if nm is None:
        _check_sparsity(sparsity)
    elif cols % nm[1]:
        raise ConfigError(f"pattern {pattern!r} needs in_features divisible by {nm[1]}, got {cols}")
    if mask is not None and mask.shape != W.shape:
        raise ConfigError(f"mask must have W's shape {tuple(W.shape)}, got {tuple(mask.shape)}")
    if mask is None and nm is None and sparsity == 0:
        return W.clone(), torch.ones_like(W, dtype=torch.bool)              # nothing to prune: bit-identical
    if not isinstance(blocksize, int) or blocksize < 1:
        raise ConfigError(f"blocksize must be a positive int, got {blocksize!r}")
    if nm is not None:                                                       # groups must not straddle blocks
        blocksize = max(nm[1], blocksize - blocksize % nm[1])

    dtype = torch.float64 if W.dtype == torch.float64 else torch.float32
    Wf = W.detach().to(dtype).clone()                                        # (out, in)
    Hf = H.detach().to(dtype=dtype, device=W.device).clone()                 # (in, in)
    dead = torch.diag(Hf) == 0                                               # inputs never active
    Hf[dead, dead] = 1
    Wf[:, dead] = 0
    damp = percdamp * torch.mean(torch.diag(Hf))
    idx = torch.arange(cols, device=W.device)
    Hf[idx, idx] += damp
    try:
        L = torch.linalg.cholesky(Hf)
        Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)  # (in, in) upper Cholesky of H^-1
    except RuntimeError as e:  # torch.linalg.LinAlgError subclasses RuntimeError
        raise ConfigError(f"SparseGPT: the input Hessian is not positive definite even with dampening "
                          f"{percdamp}; increase `dampening` (e.g. 0.1) or use more calibration data") from e

    keep = torch.ones_like(Wf, dtype=torch.bool) if mask is None else mask.to(torch.bool).clone()
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = Wf[:, i1:i2].clone()                                            # (out, b)
        Err1 = torch.zeros_like(W1)                                          # (out, b) scaled errors
        Hinv1 = Hinv[i1:i2, i1:i2]                                           # (b, b)
        d1 = torch.diag(Hinv1)                                               # (b,)
        if mask is None and nm is None:                                      # adaptive mask for this block
            score = W1 ** 2 / d1.unsqueeze(0) ** 2                           # OBS saliency w^2 / [H^-1]_ii^2
            keep[:, i1:i2] = mask_from_scores(score, sparsity, per_row=False)
        for i in range(i2 - i1):
            if mask is None and nm is not None and i % nm[1] == 0:
                n, m = nm
                score = W1[:, i:i + m] ** 2 / d1[i:i + m].unsqueeze(0) ** 2  # (out, M)
                keep[:, i1 + i:i1 + i + m] = mask_from_scores(score, 0.0, f"{n}:{m}")
            w = W1[:, i]                                                     # (out,)
            q = torch.where(keep[:, i1 + i], w, torch.zeros_like(w))
            err = (w - q) / d1[i]                                            # (out,)
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)        # update the rest of the block
            W1[:, i] = q
            Err1[:, i] = err
        Wf[:, i1:i2] = W1
        Wf[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]                                # lazy update of later blocks
    Wf = torch.where(keep, Wf, torch.zeros_like(Wf))
    return Wf.to(W.dtype), keep


class InputStats:
    """Streaming statistics of a linear layer's inputs, fed one batch at a time by a forward hook.

    H       (in, in) = 2/N * sum_t x_t x_t^T   -- SparseGPT's layer Hessian (running mean, so the scale does
                                                 not grow with the amount of data and float32 stays exact enough)
    sq_norm (in,)    = 1/N * sum_t x_t^2      -- Wanda's scaler_row up to a constant
    N counts tokens (every row of the flattened input). Accumulated in float32 on `device`.
    """

    def __init__(self, columns: int, *, hessian: bool = True, norms: bool = True,
                 device: Optional[torch.device] = None, dtype: torch.dtype = torch.float32):
        self.columns, self.nsamples = columns, 0
        self.H = torch.zeros(columns, columns, device=device, dtype=dtype) if hessian else None
        self.sq_norm = torch.zeros(columns, device=device, dtype=dtype) if norms else None

    @torch.no_grad()
    def add_batch(self, inp: torch.Tensor) -> None:
        """inp: (..., in) activations entering the layer (any leading batch/sequence dims)."""
        if inp.shape[-1] != self.columns:
            raise ConfigError(f"InputStats expected inputs with last dim {self.columns}, got {tuple(inp.shape)}")
        ref = self.H if self.H is not None else self.sq_norm
        x = inp.detach().reshape(-1, self.columns).to(device=ref.device, dtype=ref.dtype)  # (n, in)
        n = x.shape[0]
        if n == 0:
            return
        total = self.nsamples + n
        if self.H is not None:
            self.H.mul_(self.nsamples / total).addmm_(x.T, x, alpha=2.0 / total)
        if self.sq_norm is not None:
            self.sq_norm.mul_(self.nsamples / total).add_(x.pow(2).sum(0), alpha=1.0 / total)
        self.nsamples = total

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.H, self.sq_norm) if t is not None)


def owl_block_sparsity(outlier_ratios, sparsity: float, lam: float):
    """OWL layer-wise sparsities: map outlier ratios linearly onto densities spanning 2*lam (more outliers ->
    denser), then shift so the mean sparsity equals `sparsity` exactly (Yin et al. 2023, arXiv:2310.05175,
    as in their code). Returns a list of floats, one per block, clipped to [0, 1)."""
    r = torch.as_tensor(list(outlier_ratios), dtype=torch.float64)
    if r.numel() == 0:
        return []
    span = r.max() - r.min()
    dens = (r - r.min()) / span * (2 * lam) if span > 0 else torch.zeros_like(r)
    dens = dens - dens.mean() + (1.0 - sparsity)
    return [float(min(max(1.0 - d, 0.0), math.nextafter(1.0, 0.0))) for d in dens]


def outlier_ratio(scores: torch.Tensor, m: float) -> float:
    """Fraction of entries above m times the mean (OWL's "layerwise outlier distribution")."""
    s = scores.float().flatten()
    return float((s > m * s.mean()).float().mean()) if s.numel() else 0.0
