"""The server's queues in-process, on asyncio directly (no HTTP): the dynamic batcher and the bounded decode queue."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

from ecanfnet.serving.batcher import DynamicBatcher, QueueFull
from ecanfnet.serving.workers import DecodeBusy, DecodeQueue


class FakeModel:
    """run_batch stand-in: records each batch, can be held (gate) or made to fail; returns the batch times 2."""

    def __init__(self, fail_first: int = 0) -> None:
        self.batches: list[list[float]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.running = threading.Event()
        self.fail_first = fail_first

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        self.running.set()
        self.gate.wait(10)
        self.batches.append(batch[:, 0, 0, 0].tolist())
        if len(self.batches) <= self.fail_first:
            raise RuntimeError("model exploded")
        return batch * 2


def image(value: float) -> torch.Tensor:
    return torch.full((1, 2, 2), float(value))


def run(coro_fn, model: FakeModel, **kwargs):
    """Run coro_fn(batcher) on a fresh event loop with a started batcher, then stop it."""
    async def main():
        batcher = DynamicBatcher(model, **kwargs)
        batcher.start()
        try:
            return await coro_fn(batcher)
        finally:
            model.gate.set()
            await batcher.stop()
    return asyncio.run(main())


async def wait_until_running(model: FakeModel) -> None:
    while not model.running.is_set():
        await asyncio.sleep(0.005)


def test_concurrent_requests_are_grouped_up_to_max_batch_and_each_gets_its_row():
    model = FakeModel()

    async def scenario(batcher):
        return await asyncio.gather(*(batcher.submit(image(v)) for v in range(10)))

    answers = run(scenario, model, max_batch=4, max_wait_ms=200, max_queue=16)
    assert [len(b) for b in model.batches] == [4, 4, 2]
    assert sorted(v for b in model.batches for v in b) == list(range(10))
    for value, (output, row) in enumerate(answers):
        assert output[row, 0, 0, 0].item() == 2 * value


def test_a_request_that_timed_out_is_dropped_before_its_batch_runs():
    model = FakeModel()
    model.gate.clear()

    async def scenario(batcher):
        first = asyncio.ensure_future(batcher.submit(image(1)))
        await wait_until_running(model)             # batch [1] is in the model, held by the gate
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(batcher.submit(image(2)), 0.05)
        later = asyncio.ensure_future(batcher.submit(image(3)))
        await asyncio.sleep(0.05)
        model.gate.set()
        return await first, await later

    (out1, row1), (out3, row3) = run(scenario, model, max_batch=4, max_wait_ms=0, max_queue=8)
    assert out1[row1, 0, 0, 0].item() == 2 and out3[row3, 0, 0, 0].item() == 6
    assert [v for b in model.batches for v in b] == [1, 3], "the timed-out image 2 reached the model"


def test_a_full_queue_raises_queue_full_and_queued_requests_still_finish():
    model = FakeModel()
    model.gate.clear()

    async def scenario(batcher):
        running = asyncio.ensure_future(batcher.submit(image(0)))
        await wait_until_running(model)             # image 0 left the queue for the model
        queued = [asyncio.ensure_future(batcher.submit(image(v))) for v in (1, 2)]
        await asyncio.sleep(0)
        assert batcher.depth() == 2
        with pytest.raises(QueueFull):
            await batcher.submit(image(3))
        model.gate.set()
        return await asyncio.gather(running, *queued)

    answers = run(scenario, model, max_batch=1, max_wait_ms=0, max_queue=2)
    assert [out[row, 0, 0, 0].item() for out, row in answers] == [0, 2, 4]
    assert model.batches == [[0], [1], [2]]


def test_a_model_exception_reaches_every_waiting_request_and_the_loop_serves_the_next_batch():
    model = FakeModel(fail_first=1)

    async def scenario(batcher):
        failed = await asyncio.gather(*(batcher.submit(image(v)) for v in range(3)), return_exceptions=True)
        after = await batcher.submit(image(7))
        return failed, after

    failed, (output, row) = run(scenario, model, max_batch=4, max_wait_ms=100, max_queue=8)
    assert [type(e) for e in failed] == [RuntimeError] * 3 and all("exploded" in str(e) for e in failed)
    assert model.batches[0] == [0, 1, 2]
    assert output[row, 0, 0, 0].item() == 14


def test_decode_queue_bounds_its_backlog_and_never_works_for_requests_that_cannot_be_answered():
    started: list[int] = []
    gate = threading.Event()

    def job(i: int) -> int:
        started.append(i)
        gate.wait(10)
        return i

    async def settle(decoder: DecodeQueue) -> None:
        for _ in range(200):
            if decoder.backlog == 0:
                return
            await asyncio.sleep(0.01)

    async def scenario():
        decoder = DecodeQueue(workers=1, slack=1)
        start_by = time.monotonic() + 0.3
        callers = [asyncio.ensure_future(decoder.run(start_by, job, i)) for i in range(20)]
        await asyncio.sleep(0.1)
        peak = decoder.backlog                      # job 0 running, job 1 queued, 18 waiting for a slot
        await asyncio.sleep(0.4)                    # past start_by: the 18 waiting give up
        gate.set()                                  # job 0 ends; job 1 reaches the worker too late: skipped
        results = await asyncio.gather(*callers, return_exceptions=True)
        await settle(decoder)
        after_overload = decoder.backlog

        gate.clear()
        held = asyncio.ensure_future(decoder.run(time.monotonic() + 60, job, 50))
        with pytest.raises(asyncio.TimeoutError):   # its caller gives up while the job waits: cancelled
            await asyncio.wait_for(decoder.run(time.monotonic() + 60, job, 51), 0.1)
        gate.set()
        await held
        await settle(decoder)
        fresh = await decoder.run(time.monotonic() + 60, job, 99)
        decoder.shutdown()
        return peak, results, after_overload, decoder.backlog, fresh

    peak, results, after_overload, backlog, fresh = asyncio.run(scenario())
    assert peak == 2
    assert results[0] == 0 and all(isinstance(r, DecodeBusy) for r in results[1:]), results
    assert after_overload == 0 and backlog == 0
    assert fresh == 99 and started == [0, 50, 99], started


def test_submit_many_queues_all_images_or_none_and_a_caller_that_gives_up_takes_its_images_back():
    model = FakeModel()
    model.gate.clear()

    async def scenario(batcher):
        running = asyncio.ensure_future(batcher.submit(image(0)))
        await wait_until_running(model)             # image 0 left the queue for the model
        with pytest.raises(QueueFull):
            await batcher.submit_many([image(v) for v in (1, 2, 3, 4, 5, 6)])
        assert batcher.depth() == 0                 # none of the four was queued
        group = asyncio.ensure_future(batcher.submit_many([image(v) for v in (5, 6, 7)]))
        await asyncio.sleep(0.01)
        assert batcher.depth() == 3
        given_up = asyncio.ensure_future(batcher.submit_many([image(v) for v in (8, 9)]))
        await asyncio.sleep(0.01)
        given_up.cancel()
        model.gate.set()
        answers = await running, await group
        return (*answers, await batcher.submit(image(10)))

    (out0, row0), group, (out10, row10) = run(scenario, model, max_batch=2, max_wait_ms=0, max_queue=5)
    assert out0[row0, 0, 0, 0].item() == 0 and out10[row10, 0, 0, 0].item() == 20
    assert [out[row, 0, 0, 0].item() for out, row in group] == [10, 12, 14]  # in order, over two batches
    assert sorted(v for b in model.batches for v in b) == [0, 5, 6, 7, 10], model.batches


def test_warm_up_runs_one_batch_on_the_model_thread_outside_the_queue():
    model = FakeModel()

    async def scenario(batcher):
        return await batcher.warm_up(torch.stack([image(3)]))

    output = run(scenario, model, max_batch=2, max_wait_ms=0, max_queue=1)
    assert output[0, 0, 0, 0].item() == 6 and model.batches == [[3]]
