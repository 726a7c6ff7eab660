"""torch.distributed support: join a torchrun job, shard each global batch, keep the gradient a global mean.

Sharding splits every global batch along its first dimension (rank r gets the r-th contiguous slice) instead
of dealing whole batches to ranks. Each rank scales its mean loss by world * n_local / n_global, so DDP's
gradient average equals the gradient of the global-batch mean: an N-process run takes the same optimizer
steps as a 1-process run on the same batches (up to float summation order).
"""
from __future__ import annotations

import os
from typing import Tuple

import torch
import torch.distributed as dist
import torch.nn as nn

from prunekit.errors import ConfigError


def maybe_init_process_group() -> bool:
    """True when this process is part of a multi-process job, initializing the default group from
    torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) if nobody did yet."""
    if not dist.is_available():
        return False
    if dist.is_initialized():
        return dist.get_world_size() > 1
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and "MASTER_ADDR" in os.environ:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
        return dist.get_world_size() > 1
    return False


def shard_bounds(n: int, rank: int, world: int) -> Tuple[int, int]:
    """Contiguous split of n examples, the first n % world ranks getting one more (like numpy.array_split)."""
    if n < world:
        raise ConfigError(f"a global batch of {n} examples cannot be split across {world} processes; "
                          f"use batches of at least {world} examples")
    base, extra = divmod(n, world)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)


def all_reduce_max(flag: float, device) -> float:
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([flag], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def all_reduce_sum(value: float, device) -> float:
    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t.item())


def shard_fsdp(module: nn.Module, device: torch.device) -> None:
    """FSDP2: shard every leaf module that owns parameters, then the root, over all ranks (in place)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for m in list(module.modules()):
        if m is not module and any(True for _ in m.parameters(recurse=False)):
            fully_shard(m, mesh=mesh)
    fully_shard(module, mesh=mesh)


def full_state_dict(module: nn.Module) -> dict:
    """Gather a (possibly FSDP-sharded) module's state into plain tensors on every rank."""
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
            for k, v in module.state_dict().items()}
