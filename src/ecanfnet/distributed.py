"""Joining a torchrun launch: rank, world size and device of this process, and a barrier."""

from __future__ import annotations

import os
import sys

import torch


def distributed_setup() -> tuple[int, int, torch.device]:
    """(rank, world size, device) of this process; joins the process group (NCCL on CUDA, else gloo) under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{local_rank}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if cuda else "gloo")
    return rank, world, device


def barrier() -> None:
    """Wait for every rank (no-op outside a process group)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def say(message: str, rank: int = 0) -> None:
    """Print an `ecanfnet: ...` status line on stderr, from rank 0 only."""
    if rank == 0:
        print(f"ecanfnet: {message}", file=sys.stderr)
