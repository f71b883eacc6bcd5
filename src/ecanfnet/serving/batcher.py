"""Dynamic batching: concurrent requests are grouped (up to max_batch, waiting at most max_wait) and run together."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import torch


class QueueFull(Exception):
    """The batch queue is at capacity; the caller should retry later."""


class DynamicBatcher:
    """Collects single images from many coroutines into batches and runs them, one batch at a time, in a worker thread."""

    def __init__(self, run_batch: Callable[[torch.Tensor], object], max_batch: int = 16, max_wait_ms: float = 10.0,
                 max_queue: int = 64, on_batch: Callable[[int], None] | None = None) -> None:
        self.run_batch, self.max_batch, self.max_wait = run_batch, max_batch, max_wait_ms / 1000
        self.on_batch = on_batch
        self.queue: asyncio.Queue[tuple[torch.Tensor, asyncio.Future]] = asyncio.Queue(maxsize=max_queue)
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ecanfnet-model")
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        """Start the batching loop on the running event loop."""
        self.task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        """Finish what is queued, then stop the loop and the worker thread."""
        while not self.queue.empty():
            await asyncio.sleep(self.max_wait)
        if self.task is not None:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass
        self.worker.shutdown(wait=True)

    def depth(self) -> int:
        """Images waiting for a batch."""
        return self.queue.qsize()

    async def submit(self, image: torch.Tensor):
        """Queue one preprocessed image; resolves to (batch output, row index). Raises QueueFull at capacity."""
        (answer,) = await self.submit_many([image])
        return answer

    async def submit_many(self, images: list[torch.Tensor]) -> list:
        """Queue images all together or none (QueueFull); resolves to one (batch output, row index) per image.

        They may land in different batches. If the caller gives up (or one image fails), the images not yet
        run are cancelled, so the batcher skips them.
        """
        if self.queue.maxsize and self.queue.maxsize - self.queue.qsize() < len(images):
            raise QueueFull
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in images]
        for image, future in zip(images, futures):
            self.queue.put_nowait((image, future))
        try:
            return [await future for future in futures]
        finally:
            for future in futures:
                future.cancel()  # no-op for those answered

    async def warm_up(self, batch: torch.Tensor) -> object:
        """Run one batch on the model thread, outside the queue (at start-up: first-call costs before readiness)."""
        return await asyncio.get_running_loop().run_in_executor(self.worker, self.run_batch, batch)

    async def _collect(self) -> list[tuple[torch.Tensor, asyncio.Future]]:
        items = [await self.queue.get()]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait
        while len(items) < self.max_batch:
            try:
                items.append(self.queue.get_nowait())
                continue
            except asyncio.QueueEmpty:
                pass
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                items.append(await asyncio.wait_for(self.queue.get(), remaining))
            except asyncio.TimeoutError:
                break
        return [(img, fut) for img, fut in items if not fut.done()]  # requests that timed out are dropped

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            items = await self._collect()
            if not items:
                continue
            if self.on_batch is not None:
                self.on_batch(len(items))
            try:
                output = await loop.run_in_executor(self.worker, self.run_batch, torch.stack([i for i, _ in items]))
            except Exception as exc:  # noqa: BLE001 - the failure goes to each waiting request, the loop lives on
                for _, fut in items:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            for row, (_, fut) in enumerate(items):
                if not fut.done():
                    fut.set_result((output, row))
