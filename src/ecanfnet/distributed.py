"""Joining a torchrun launch: rank, world size and device of this process, and a barrier.

A process group joined here survives torchrun's elastic restarts (`--max-restarts`): torchrun's agent
keeps ONE rendezvous store (MASTER_ADDR:MASTER_PORT) for the whole launch and hands it to every
restarted worker group, and torch's `env://` rendezvous adds no per-attempt prefix to its keys. The
keys a failed attempt wrote (gloo's listening addresses of each rank, barrier counters) are still in
the store when the next group starts, so a restarted rank that is quicker than its peer reads the
peer's dead address and fails with "Gloo connectFullMesh failed ... Connection refused", or connects
to the wrong one and waits forever. `distributed_setup` therefore scopes its keys to the attempt (and
to the group: a process that leaves a group and joins another must not read the first one's keys).

The group is left explicitly where the work ends (`leave_process_group`): destroying it in an atexit
hook, during interpreter shutdown, can hang with NCCL when a peer has died.
"""

from __future__ import annotations

import atexit
import logging
import os

import torch

log = logging.getLogger("ecanfnet")
_groups_joined = 0  # process groups this process has joined so far: part of each one's store key prefix


def launch_rank() -> int:
    """This process's global rank under torchrun (RANK), 0 outside it."""
    return int(os.environ.get("RANK", "0"))


def restart_attempt() -> int:
    """How many times torchrun has restarted this worker group (TORCHELASTIC_RESTART_COUNT), 0 outside it."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def distributed_setup() -> tuple[int, int, torch.device]:
    """(rank, world size, device) of this process; joins the process group (NCCL on CUDA, else gloo) under torchrun."""
    global _groups_joined
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = launch_rank()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{local_rank}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if cuda else "gloo", store=_attempt_store(rank, world), rank=rank,
                                    world_size=world)
            _groups_joined += 1
            if _groups_joined == 1:  # a fallback only: the callers leave the group where their work ends
                atexit.register(leave_process_group)
    return rank, world, device


def attempt_key_prefix(world: int) -> str:
    """Store key prefix unique to this torchrun launch, restart attempt, world size and the process's next group."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "")
    return f"ecanfnet/run-{run_id}/attempt-{restart_attempt()}/world-{world}/group-{_groups_joined}/"


def _attempt_store(rank: int, world: int):
    """The launch's env:// rendezvous store (MASTER_ADDR, MASTER_PORT), its keys prefixed per restart attempt."""
    import torch.distributed as dist
    from torch.distributed.constants import default_pg_timeout

    store, _, _ = next(dist.rendezvous("env://", rank, world, timeout=default_pg_timeout))
    return dist.PrefixStore(attempt_key_prefix(world), store)


def leave_process_group() -> None:
    """Destroy the group joined by distributed_setup, if any (sockets closed, no NCCL leak warning)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - the process is exiting; a peer that is already gone is not an error
            pass


def barrier() -> None:
    """Wait for every rank (no-op outside a process group)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def say(message: str, rank: int = 0) -> None:
    """Log a status line (INFO on the "ecanfnet" logger), from rank 0 only."""
    if rank == 0:
        log.info(message)
