"""Dynamic batching: requests that arrive within `max_wait_ms` of each other are decoded together.

Beam search costs about the same for one query as for a few dozen (the work is per step, vectorised
over queries), so collecting concurrent requests for a few milliseconds raises throughput at a small
latency cost. One worker thread runs the batches one after another, off the event loop, which keeps
accepting requests meanwhile: while a batch decodes, the next one fills.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class BatchStats:
    requests: int = 0
    batches: int = 0
    largest: int = 0
    busy_s: float = 0.0     # time spent running batches (the rest of a request's latency is waiting or HTTP)

    def as_dict(self) -> dict:
        n = max(self.batches, 1)
        return {"requests": self.requests, "batches": self.batches, "largest_batch": self.largest,
                "mean_batch": round(self.requests / n, 3), "busy_s": round(self.busy_s, 3),
                "mean_batch_ms": round(1000 * self.busy_s / n, 2)}


@dataclass
class _Pending(Generic[T]):
    item: T
    future: asyncio.Future = field(repr=False)


class DynamicBatcher(Generic[T, R]):
    """`await submit(item)` returns `run_batch(items)[i]` for this item (raised when it is an exception)."""

    def __init__(self, run_batch: Callable[[list[T]], list[R | Exception]], max_batch: int, max_wait_ms: float):
        self.run_batch, self.max_batch, self.max_wait = run_batch, max_batch, max_wait_ms / 1000.0
        self.stats = BatchStats()
        self._queue: asyncio.Queue[_Pending[T]] | None = None
        self._task: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode")

    def start(self) -> None:
        """Start the collecting loop on the running event loop."""
        self._queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._executor.shutdown(wait=True)

    async def submit(self, item: T) -> R:
        if self._queue is None:
            raise RuntimeError("the batcher is not started")
        future = asyncio.get_running_loop().create_future()
        await self._queue.put(_Pending(item, future))
        return await future

    async def _collect(self) -> list[_Pending[T]]:
        """The first waiting request, then whatever arrives before max_wait_ms or max_batch."""
        queue, loop = self._queue, asyncio.get_running_loop()
        batch = [await queue.get()]
        deadline = loop.time() + self.max_wait
        while len(batch) < self.max_batch:
            if not queue.empty():
                batch.append(queue.get_nowait())
                continue
            left = deadline - loop.time()
            if left <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(queue.get(), left))
            except TimeoutError:
                break
        return batch

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [p for p in await self._collect() if not p.future.done()]   # drop requests whose client left
            if not batch:
                continue
            start = time.perf_counter()
            try:
                results = await loop.run_in_executor(self._executor, self.run_batch, [p.item for p in batch])
            except Exception as exc:       # noqa: BLE001 - a failing batch fails its requests, never the loop
                results = [exc] * len(batch)
            self.stats.busy_s += time.perf_counter() - start
            self.stats.requests += len(batch)
            self.stats.batches += 1
            self.stats.largest = max(self.stats.largest, len(batch))
            for pending, result in zip(batch, results):
                if pending.future.done():
                    continue
                if isinstance(result, Exception):
                    pending.future.set_exception(result)
                else:
                    pending.future.set_result(result)
