"""Dynamic batching for one variant, like Triton's `dynamic_batching`.

Concurrent `submit` calls are gathered into one model call of at most `max_batch_size`
samples. A batch is sent when it is full, or when the oldest request has waited
`max_queue_delay_us`, or — with a delay of 0 — as soon as an instance is free. Requests keep
queueing while all `instances` are busy, so under load batches grow on their own even with
no delay; the delay only matters for bursts that arrive while the variant is idle. Note
that asyncio's timers wake with about 1 ms granularity, so any positive delay costs ~1 ms.

The model call runs in a thread pool, off the event loop. A request whose caller gave up
(its future was cancelled by the gateway's deadline) is dropped before it is computed.

`inline_max_batch` (0 = off): batches of at most this many samples are computed on the event
loop itself, as a plain server computes every request, instead of in the pool; and a request
that finds the model idle and the gateway otherwise quiet (`contended()` false) is computed at
once, without waiting a loop turn. Handing a small batch to a pool thread and its answer back
costs two thread wake-ups, and on a virtual machine waking an idle vCPU is expensive: about 3×
the wall time of the call itself for an INT8 batch of one (docs/results/). Large batches, the ones that
form under load, still go to the pool, so the loop keeps reading requests while they compute.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)


@dataclass
class _Pending:
    x: np.ndarray  # (n, ...) one request's chunk
    future: asyncio.Future


class DynamicBatcher:
    """Gathers requests for one model; start() inside a running event loop."""

    def __init__(
        self,
        run: Callable[[np.ndarray], np.ndarray],
        executor: Executor,
        max_batch_size: int = 32,
        max_queue_delay_us: int = 0,
        instances: int = 1,
        name: str = "",
        inline_max_batch: int = 0,
        contended: Callable[[], bool] = lambda: False,
    ) -> None:
        if max_batch_size < 1 or max_queue_delay_us < 0 or instances < 1 or inline_max_batch < 0:
            raise ValueError("max_batch_size and instances must be >= 1, max_queue_delay_us and inline_max_batch >= 0")
        self._run = run
        self._executor = executor
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max_queue_delay_us / 1e6
        self.instances = instances
        self.name = name
        self.inline_max_batch = inline_max_batch if max_queue_delay_us == 0 else 0
        self._contended = contended  # other requests are in the gateway: computing inline would stall them
        self._active = 0  # batches running in the pool
        self._queue: deque[_Pending] = deque()
        self._queued_samples = 0
        self._wakeup: asyncio.Event | None = None
        self._slots: asyncio.Semaphore | None = None
        self._task: asyncio.Task | None = None
        self._running: set[asyncio.Task] = set()
        # statistics (for /v1/status and tests)
        self.batches = 0
        self.samples = 0
        self.largest_batch = 0
        self.inline_batches = 0  # of `batches`, computed on the event loop (the model was idle)

    def start(self) -> None:
        self._wakeup = asyncio.Event()
        self._slots = asyncio.Semaphore(self.instances)
        self._task = asyncio.get_running_loop().create_task(self._loop(), name=f"batcher-{self.name}")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        await asyncio.gather(*self._running, return_exceptions=True)
        while self._queue:
            p = self._queue.popleft()
            if not p.future.done():
                p.future.set_exception(RuntimeError(f"batcher {self.name} closed"))
        self._queued_samples = 0

    async def submit(self, x: np.ndarray) -> np.ndarray:
        """x (n, ...) → the model's output for x, (n, ...); split into ≤ max_batch_size chunks."""
        if self._task is None or self._wakeup is None:
            raise RuntimeError(f"batcher {self.name} is not started")
        if x.shape[0] <= self.inline_max_batch and not self._active and not self._queue and not self._contended():
            y = self._run(x)  # the one request in the gateway: no loop turn, no thread; errors reach the caller
            self._count(x.shape[0], inline=True)
            return y
        loop = asyncio.get_running_loop()
        futures = []
        for start in range(0, x.shape[0], self.max_batch_size):
            chunk = x[start : start + self.max_batch_size]
            fut: asyncio.Future = loop.create_future()
            self._queue.append(_Pending(chunk, fut))
            self._queued_samples += chunk.shape[0]
            futures.append(fut)
        self._wakeup.set()
        results = await asyncio.gather(*futures)
        return results[0] if len(results) == 1 else np.concatenate(results)

    @property
    def queued_samples(self) -> int:
        return self._queued_samples

    # ------------------------------------------------------------------ internals

    def _drop_abandoned(self) -> None:
        while self._queue and self._queue[0].future.done():
            self._queued_samples -= self._queue.popleft().x.shape[0]

    async def _loop(self) -> None:
        assert self._wakeup is not None and self._slots is not None
        loop = asyncio.get_running_loop()
        while True:
            await self._slots.acquire()  # an instance is free: form the next batch
            self._drop_abandoned()
            while not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
                self._drop_abandoned()
            if self.max_queue_delay_s > 0:
                deadline = loop.time() + self.max_queue_delay_s
                while self._queued_samples < self.max_batch_size and (remaining := deadline - loop.time()) > 0:
                    self._wakeup.clear()
                    try:
                        await asyncio.wait_for(self._wakeup.wait(), remaining)
                    except TimeoutError:
                        break
            else:
                await asyncio.sleep(0)  # one loop turn: let requests submitted together join
            batch: list[_Pending] = []
            size = 0
            while self._queue:
                p = self._queue[0]
                if p.future.done():  # abandoned by its caller
                    self._queued_samples -= self._queue.popleft().x.shape[0]
                    continue
                if batch and size + p.x.shape[0] > self.max_batch_size:
                    break
                self._queue.popleft()
                self._queued_samples -= p.x.shape[0]
                batch.append(p)
                size += p.x.shape[0]
            if not batch:
                self._slots.release()
                continue
            if size <= self.inline_max_batch:  # small: cheaper here than a round trip through a thread
                self._slots.release()
                self._run_inline(batch, size)
                continue
            self._active += 1  # from here: the model is busy, callers queue instead of running inline
            task = loop.create_task(self._execute(batch, size))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    def _run_inline(self, batch: list[_Pending], size: int) -> None:
        x = batch[0].x if len(batch) == 1 else np.concatenate([p.x for p in batch])
        try:
            y = self._run(x)
        except Exception as exc:  # deliver the model's error to every waiting request
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(exc)
            return
        self._count(size, inline=True)
        self._deliver(batch, y)

    def _deliver(self, batch: list[_Pending], y: np.ndarray) -> None:
        offset = 0
        for p in batch:
            n = p.x.shape[0]
            if not p.future.done():
                p.future.set_result(y[offset : offset + n])
            offset += n

    def _count(self, size: int, inline: bool = False) -> None:
        self.inline_batches += inline
        self.batches += 1
        self.samples += size
        self.largest_batch = max(self.largest_batch, size)

    async def _execute(self, batch: list[_Pending], size: int) -> None:
        assert self._slots is not None
        try:
            x = batch[0].x if len(batch) == 1 else np.concatenate([p.x for p in batch])
            try:
                y = await asyncio.get_running_loop().run_in_executor(self._executor, self._run, x)
            except Exception as exc:  # deliver the model's error to every waiting request
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(exc)
                return
            self._count(size)
            self._deliver(batch, y)
        finally:
            self._active -= 1
            self._slots.release()
