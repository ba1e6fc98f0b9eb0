"""Distributed data parallel training under torchrun, detected from its environment.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK (and MASTER_ADDR/PORT). Without them training
runs in one process. Backend: nccl on CUDA, gloo on CPU. Only rank 0 writes files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn


@dataclass(frozen=True)
class Distributed:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup() -> Distributed:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    if cuda and local_rank >= torch.cuda.device_count():
        raise RuntimeError(
            f"LOCAL_RANK {local_rank}, but this machine shows {torch.cuda.device_count()} GPU(s): start one process "
            "per GPU (torchrun --nproc_per_node <GPUs>), or run on the CPU with CUDA_VISIBLE_DEVICES=''"
        )
    device = torch.device(f"cuda:{local_rank}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        # device_id: NCCL binds this rank to its GPU now, instead of guessing it from the rank at the
        # first collective (a warning on every run, and a hang where ranks map to GPUs otherwise)
        dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world_size, device_id=device if cuda else None)
    return Distributed(rank, world_size, local_rank, device)


def cleanup(env: Distributed) -> None:
    if env.enabled and dist.is_initialized():
        dist.destroy_process_group()


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's tensor along dim 0 (rank order); gradients flow back to each
    rank's own part, so gathered in-batch negatives are trained everywhere."""
    return torch.cat(dist_fn.all_gather(x), dim=0)


def gather(x: torch.Tensor) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x)
    return torch.cat(parts, dim=0)


def mean_over_ranks(values: dict[str, float], env: Distributed) -> dict[str, float]:
    if not env.enabled or not values:
        return values
    tensor = torch.tensor(list(values.values()), dtype=torch.float64, device=env.device)
    dist.all_reduce(tensor)
    return dict(zip(values, (tensor / env.world_size).tolist()))


def all_ranks(flag: bool, env: Distributed) -> bool:
    """Whether ``flag`` holds on every rank (one small all-reduce under DDP)."""
    if not env.enabled:
        return flag
    tensor = torch.tensor([int(flag)], device=env.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return bool(tensor.item())
