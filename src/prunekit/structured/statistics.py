"""Calibration statistics the data-aware criteria need, gathered by running the model on calibration batches.

Each collector runs in eval mode (BatchNorm statistics untouched), removes every hook it added, and returns
plain tensors keyed by tensor or module *name*, so a re-traced graph still finds them:

    accumulate_taylor       (param, dim) -> sum over batches of |w * dL/dw| per channel       (Taylor)
    collect_activations     module -> per-channel mean |output| and APoZ                        (Activation)
    collect_input_moments   Linear module -> per-input-channel mean and variance               (Fluctuation)
"""
from __future__ import annotations

from typing import Callable, Dict, Iterable, Optional, Tuple

import torch
import torch.nn as nn

from prunekit.batch import call_model, eval_mode, progress, split_batch
from prunekit.errors import ConfigError
from prunekit.objective import batch_loss
from prunekit.structured import criteria as S
from prunekit.structured.criteria import ChannelValues


def channel_dim(module: nn.Module, out: torch.Tensor) -> int:
    """Which dim of a producer module's output holds its channels: dim 1 for conv/batch-norm style modules
    on (B, C, ...) tensors, the last dim for linear/layer-norm/embedding style modules."""
    if isinstance(module, (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm, nn.GroupNorm,
                           nn.modules.instancenorm._InstanceNorm)) and out.dim() >= 2:
        return 1
    return out.dim() - 1


def activation_stats(out: torch.Tensor, dim: int) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """(sum |a|, count of a <= 0, number of values) per channel of one output tensor along `dim`."""
    a = out.detach().float().movedim(dim, -1).reshape(-1, out.shape[dim])
    return a.abs().sum(0).double(), (a <= 0).sum(0).double(), a.shape[0]


def accumulate_taylor(model: nn.Module, batches: list, wanted: Iterable[Tuple[str, int]],
                      loss_fn: Optional[Callable] = None, quiet: bool = True) -> ChannelValues:
    """Sum over batches of |sum over each channel slice of w * dL/dw| for every (param name, dim) wanted.

    Runs in eval mode (BatchNorm uses and keeps its running statistics: calibration must not change the
    model) with gradients on; parameter .grad fields are restored to what they were."""
    params = dict(model.named_parameters())
    wanted = [(n, d) for n, d in dict.fromkeys(wanted) if n in params]
    saved = {n: p.grad for n, p in params.items()}
    req = {n: p.requires_grad for n, p in params.items()}
    acc: ChannelValues = {}
    try:
        with eval_mode(model):
            for n, p in params.items():
                p.grad = None
                p.requires_grad_(True)
            for b in progress(batches, "taylor calibration", quiet):
                model.zero_grad(set_to_none=True)
                with torch.enable_grad():
                    loss = batch_loss(model, b, loss_fn)
                    if not torch.isfinite(loss):
                        raise ConfigError(f"Taylor importance: the calibration loss is {float(loss)}; check the data")
                    loss.backward()
                for n, d in wanted:
                    g = params[n].grad
                    if g is None:
                        continue
                    v = S.taylor(params[n], g, d).double()
                    acc[(n, d)] = acc[(n, d)] + v if (n, d) in acc else v
    finally:
        for n, p in params.items():
            p.grad = saved[n]
            p.requires_grad_(req[n])
    return acc


def run_hooked(model: nn.Module, batches: list, hooks: list, desc: str, quiet: bool) -> None:
    """Run the calibration batches in eval mode without gradients so `hooks` see them; always remove the
    hooks and restore the training mode."""
    try:
        with eval_mode(model), torch.no_grad():
            for b in progress(batches, desc, quiet):
                call_model(model, split_batch(b)[0])
    finally:
        for h in hooks:
            h.remove()


def collect_activations(model: nn.Module, batches: list, modules: Iterable[str], quiet: bool = True
                        ) -> Dict[str, Dict[str, torch.Tensor]]:
    """{module name: {"mean_abs": per-channel mean |output|, "apoz": per-channel fraction of outputs <= 0}}
    from forward hooks, in eval mode without gradients."""
    sums: Dict[str, list] = {}
    hooks = []

    def hook_for(name):
        def hook(mod, args, out):
            if not isinstance(out, torch.Tensor):
                return
            s_abs, s_zero, n = activation_stats(out, channel_dim(mod, out))
            if name in sums:
                sums[name][0] += s_abs
                sums[name][1] += s_zero
                sums[name][2] += n
            else:
                sums[name] = [s_abs, s_zero, n]
        return hook

    mods = dict(model.named_modules())
    for name in dict.fromkeys(modules):
        if name in mods:
            hooks.append(mods[name].register_forward_hook(hook_for(name)))
    run_hooked(model, batches, hooks, "activation calibration", quiet)
    return {k: {"mean_abs": a / n, "apoz": z / n} for k, (a, z, n) in sums.items()}


def collect_input_moments(model: nn.Module, batches: list, modules: Iterable[str], quiet: bool = True
                          ) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
    """{module: (mean, variance)} of every input channel (last dim) of the named Linear modules."""
    acc: Dict[str, list] = {}
    hooks = []

    def hook_for(name):
        def hook(mod, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()       # (tokens, in_features)
            s = acc.setdefault(name, [0, torch.zeros(x.shape[1], dtype=torch.float64),
                                      torch.zeros(x.shape[1], dtype=torch.float64)])
            s[0] += x.shape[0]
            s[1] += x.sum(0)
            s[2] += x.pow(2).sum(0)
        return hook

    mods = dict(model.named_modules())
    for name in dict.fromkeys(modules):
        if isinstance(mods.get(name), nn.Linear):
            hooks.append(mods[name].register_forward_pre_hook(hook_for(name)))
    run_hooked(model, batches, hooks, "fluctuation calibration", quiet)
    out = {}
    for k, (n, s1, s2) in acc.items():
        mean = s1 / max(n, 1)
        out[k] = (mean.float(), (s2 / max(n, 1) - mean.pow(2)).clamp_min(0).float())
    return out
