"""Micro-batching for the service: concurrent requests share one forward pass, behind a bounded queue.

A request's images are decoded and preprocessed in a thread pool (:mod:`defectscope.serve.app`),
then handed to the model's :class:`MicroBatcher`. Its one worker task takes the first waiting
image, then gathers more until it holds ``max_batch`` of them or ``max_wait_ms`` has passed since
the first, and runs them through the model as one batch in a thread of its own (the forward pass
never blocks the event loop). While a batch runs, newly arrived images wait; the next batch takes
them at once, so under load the batches fill up by themselves and the wait costs nothing.

Admission is bounded per model by :class:`Admission`: at most ``queue_size`` images may be held at
once (being read, waiting for the forward pass, in it, or being encoded). A request beyond that
is refused at once (HTTP 503 with ``Retry-After``) before its body is decoded, so memory stays
bounded however many clients send at once.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

import torch

__all__ = ["Admission", "MicroBatcher", "QueueFull"]


class QueueFull(Exception):
    """The model's queue is full: the caller answers 503 with Retry-After."""


class Admission:
    """A counter of the images a model holds, refusing beyond ``limit`` (thread-safe, never blocks)."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"queue size must be >= 1, got {limit}")
        self.limit = limit
        self.held = 0
        self._lock = threading.Lock()

    def acquire(self, n: int = 1) -> None:
        """Hold ``n`` more images, or raise :class:`QueueFull` (nothing is held then)."""
        with self._lock:
            if self.held + n > self.limit:
                raise QueueFull(f"the queue is full ({self.held} of {self.limit} images held)")
            self.held += n

    def release(self, n: int = 1) -> None:
        with self._lock:
            self.held = max(0, self.held - n)


class _Item:
    __slots__ = ("tensor", "future", "t_enqueued")

    def __init__(self, tensor: torch.Tensor, future: asyncio.Future) -> None:
        self.tensor = tensor
        self.future = future
        self.t_enqueued = time.perf_counter()


class MicroBatcher:
    """Gather single images from concurrent requests into batches for ``forward``.

    Args:
        forward: ``[B, C, H, W]`` tensor -> a sequence of ``B`` results, in order (here
            :meth:`Inferencer.predict_tensor`); runs in the batcher's own thread.
        max_batch: the most images in one forward pass (1: no batching).
        max_wait_ms: how long the first image of a batch waits for others (0: take what is there).

    Counters (read by ``/metrics`` and the tests): ``forward_calls``, ``images``, ``last_batch``,
    ``batch_sizes`` (how many batches of each size ran).
    Create and use it inside a running event loop; :meth:`close` stops the worker.
    """

    def __init__(self, forward: Callable[[torch.Tensor], Sequence], max_batch: int = 8,
                 max_wait_ms: float = 5.0) -> None:
        if max_batch < 1:
            raise ValueError(f"max batch must be >= 1, got {max_batch}")
        if max_wait_ms < 0:
            raise ValueError(f"max wait must be >= 0 ms, got {max_wait_ms}")
        self.forward = forward
        self.max_batch = int(max_batch)
        self.max_wait = float(max_wait_ms) / 1000.0
        self.forward_calls = 0
        self.images = 0
        self.last_batch = 0
        self.batch_sizes: collections.Counter = collections.Counter()
        self.forward_seconds = 0.0
        self._pending: collections.deque[_Item] = collections.deque()
        self._arrived = asyncio.Event()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="defectscope-forward")
        self._task: asyncio.Task | None = None
        self._closed = False

    @property
    def waiting(self) -> int:
        """Images waiting for a forward pass."""
        return len(self._pending)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="defectscope-batcher")

    async def submit(self, tensor: torch.Tensor):
        """Score one preprocessed image ``[C, H, W]``; returns its result when its batch has run."""
        if self._closed:
            raise RuntimeError("the batcher is closed")
        self.start()
        fut = asyncio.get_running_loop().create_future()
        self._pending.append(_Item(tensor, fut))
        self._arrived.set()
        return await fut

    def _take(self, batch: list) -> None:
        while self._pending and len(batch) < self.max_batch:
            item = self._pending.popleft()
            if not item.future.cancelled():  # its client went away: skip it
                batch.append(item)

    async def _gather(self) -> list:
        while not self._pending:
            self._arrived.clear()
            await self._arrived.wait()
        batch: list = []
        self._take(batch)
        deadline = batch[0].t_enqueued + self.max_wait if batch else time.perf_counter()
        while len(batch) < self.max_batch:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                break
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except TimeoutError:
                pass
            self._take(batch)
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._gather()
            if not batch:
                continue
            x = torch.stack([item.tensor for item in batch])
            t0 = time.perf_counter()
            try:
                results = await loop.run_in_executor(self._pool, self.forward, x)
            except Exception as e:  # a failure of the model itself: every request of the batch gets it
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(e)
                continue
            finally:
                self.forward_seconds += time.perf_counter() - t0
            self.forward_calls += 1
            self.images += len(batch)
            self.last_batch = len(batch)
            self.batch_sizes[len(batch)] += 1
            for item, r in zip(batch, results):
                if not item.future.done():
                    item.future.set_result(r)

    async def close(self) -> None:
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        for item in self._pending:
            if not item.future.done():
                item.future.set_exception(RuntimeError("the service is shutting down"))
        self._pending.clear()
        self._pool.shutdown(wait=True)
