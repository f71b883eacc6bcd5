"""A bounded pool of decode threads: work never piles up behind requests that already gave up."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, TypeVar

T = TypeVar("T")


class DecodeBusy(Exception):
    """No worker could start the job by its start_by time: it was not run (the server is overloaded)."""


class DecodeQueue:
    """Runs blocking jobs in `workers` threads with at most `workers + slack` jobs queued or running.

    Every job has a time by which it must start. A caller waits (asynchronously) for a slot until
    then; a job that reaches a worker later is skipped: both raise DecodeBusy, so no thread works for
    a request that will have timed out before the work ends (under overload a FIFO queue otherwise
    spends all its time on requests about to time out). A caller that gives up (cancelled) cancels
    its job if no worker has started it; a running job keeps its slot until it ends, so the backlog
    never outgrows the bound, whatever the clients send.
    """

    def __init__(self, workers: int, slack: int | None = None) -> None:
        self.workers = workers
        self.capacity = workers + (workers if slack is None else slack)
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ecanfnet-decode")
        self.slots = asyncio.Semaphore(self.capacity)
        self.backlog = 0  # jobs holding a slot: queued in the pool or running

    async def run(self, start_by: float, fn: Callable[..., T], *args: Any) -> T:
        """fn(*args) in a worker thread if one starts it before time.monotonic() reaches start_by, else DecodeBusy."""
        try:
            await asyncio.wait_for(self.slots.acquire(), max(0.0, start_by - time.monotonic()))
        except asyncio.TimeoutError:
            raise DecodeBusy from None
        loop = asyncio.get_running_loop()
        try:
            job = self.pool.submit(_unless_late, start_by, fn, *args)
        except BaseException:
            self.slots.release()
            raise
        self.backlog += 1
        job.add_done_callback(lambda _: _call_in_loop(loop, self._release))
        return await asyncio.wrap_future(job, loop=loop)  # cancelling this cancels a job not yet started

    def _release(self) -> None:
        self.backlog -= 1
        self.slots.release()

    def shutdown(self) -> None:
        """Stop the threads once the jobs already running end."""
        self.pool.shutdown(wait=True, cancel_futures=True)


def _unless_late(start_by: float, fn: Callable[..., T], *args: Any) -> T:
    if time.monotonic() > start_by:
        raise DecodeBusy
    return fn(*args)


def _call_in_loop(loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> None:
    try:
        loop.call_soon_threadsafe(callback)
    except RuntimeError:  # the loop has closed (shutdown): nobody waits for the slot any more
        pass
