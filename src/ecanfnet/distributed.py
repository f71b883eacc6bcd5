"""Where a process stands in a run (DistContext: rank, world size, device), joining a torchrun launch, a barrier.

Library functions that can run on several processes (train, embed_files) take a DistContext; without
one they run as a lone process on the device asked for. Whoever makes a context that joins a process
group leaves it: `with distributed_context(device) as ctx:` does both.

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
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Iterator

import torch

log = logging.getLogger("ecanfnet")
_groups_joined = 0  # process groups this process has joined so far: part of each one's store key prefix


@dataclass(frozen=True)
class DistContext:
    """One process's place in a run: global rank, number of processes, rank on its machine, and its device."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))


def default_device() -> torch.device:
    """The first GPU when CUDA is available, else the CPU."""
    return torch.device("cuda:0") if torch.cuda.is_available() else torch.device("cpu")


def resolve_device(asked: str | torch.device | None, own: torch.device) -> torch.device:
    """The device asked for; none, or a plain "cuda" where own is a GPU, means own (e.g. a torchrun rank's GPU)."""
    if asked is None:
        return own
    asked = torch.device(asked)
    return own if asked.type == own.type == "cuda" and asked.index is None else asked


def single_process(device: str | torch.device | None = None) -> DistContext:
    """The context of a lone process (rank 0 of 1, no process group) on device (default: default_device())."""
    return DistContext(device=resolve_device(device, default_device()))


def context_from_environment(device: str | torch.device | None = None) -> DistContext:
    """This process's context under torchrun (joining the process group when WORLD_SIZE > 1), else a lone process.

    device: None or "cuda" is the rank's own device. The caller leaves the group (leave_process_group);
    distributed_context does that for it."""
    rank, world, own = distributed_setup()
    return DistContext(rank, world, int(os.environ.get("LOCAL_RANK", "0")), resolve_device(device, own))


@contextmanager
def distributed_context(device: str | torch.device | None = None) -> Iterator[DistContext]:
    """context_from_environment for the length of a with block; a process group it joined is always left at its end."""
    import torch.distributed as dist

    had_group = dist.is_available() and dist.is_initialized()  # someone else's: theirs to leave
    try:
        yield context_from_environment(device)
    finally:
        if not had_group:
            leave_process_group()  # here, not at interpreter exit (see the module's docstring)


@contextmanager
def context_or_own(context: DistContext | None, device: str | torch.device | None = None) -> Iterator[DistContext]:
    """The caller's context (on device, when one is asked for), or, for context None, a lone process on device."""
    if context is not None:
        yield replace(context, device=resolve_device(device, context.device))
    elif int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Each rank would otherwise do the whole job alone, all writing the same output.
        raise ValueError(f"launched by torchrun with {os.environ['WORLD_SIZE']} processes but given no context: "
                         "pass context= from `with ecanfnet.distributed.distributed_context() as context:`")
    else:
        yield single_process(device)


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
