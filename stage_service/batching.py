"""Dynamic batching: merge concurrent requests into one onnxruntime run (off by default).

Requests queue; the batcher takes the first, then keeps taking more until it holds `max_batch_size`
samples or `max_queue_delay_ms` has passed since the first arrived, concatenates them along the batch
axis, runs once, and hands each caller its own rows back. While one batch runs on the inference thread,
the next one forms in the queue. Requests whose non-batch dimensions differ cannot share a run: they go
in separate runs of the same round. Inputs are validated before they queue, so one bad request never
fails the others it would have shared a batch with.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

Tensors = Mapping[str, np.ndarray]
RunFn = Callable[[dict[str, np.ndarray]], Awaitable[tuple[dict[str, np.ndarray], float]]]


@dataclass
class _Pending:
    tensors: Tensors
    size: int
    future: asyncio.Future[tuple[dict[str, np.ndarray], float]] = field(repr=False)

    def signature(self) -> tuple[tuple[str, tuple[int, ...], str], ...]:
        return tuple((n, a.shape[1:], a.dtype.str) for n, a in sorted(self.tensors.items()))


class DynamicBatcher:
    def __init__(self, run: RunFn, max_batch_size: int, max_queue_delay_ms: float) -> None:
        self._run = run
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_queue_delay_ms / 1000.0
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self._carry: _Pending | None = None
        self._task: asyncio.Task[None] | None = None

    async def submit(self, tensors: Tensors) -> tuple[dict[str, np.ndarray], float]:
        """This request's outputs and the milliseconds of the run it shared."""
        if self._task is None:
            self._task = asyncio.create_task(self._loop())
        size = next(iter(tensors.values())).shape[0] if tensors else 1
        future: asyncio.Future[tuple[dict[str, np.ndarray], float]] = asyncio.get_running_loop().create_future()
        await self._queue.put(_Pending(tensors, size, future))
        return await future

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _collect(self) -> list[_Pending]:
        first = self._carry or await self._queue.get()
        self._carry = None
        items, size = [first], first.size
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_delay_s
        while size < self.max_batch_size:
            remaining = deadline - loop.time()
            try:
                item = self._queue.get_nowait() if remaining <= 0 else await asyncio.wait_for(
                    self._queue.get(), remaining)
            except (asyncio.QueueEmpty, TimeoutError):
                break
            if size + item.size > self.max_batch_size:
                self._carry = item  # first of the next batch
                break
            items.append(item)
            size += item.size
        return items

    async def _loop(self) -> None:
        while True:
            items = await self._collect()
            groups: dict[tuple[tuple[str, tuple[int, ...], str], ...], list[_Pending]] = {}
            for item in items:
                groups.setdefault(item.signature(), []).append(item)
            for group in groups.values():
                await self._run_group(group)

    async def _run_group(self, group: list[_Pending]) -> None:
        live = [p for p in group if not p.future.done()]  # a caller that went away needs no rows
        if not live:
            return
        names = list(live[0].tensors)
        merged = {n: np.concatenate([p.tensors[n] for p in live]) if len(live) > 1 else live[0].tensors[n]
                  for n in names}
        try:
            outputs, ms = await self._run(dict(merged))
        except Exception as exc:  # the run itself failed: every caller of this run gets the error
            for p in live:
                if not p.future.done():
                    p.future.set_exception(exc)
            return
        offset = 0
        for p in live:
            rows = {n: a[offset:offset + p.size] for n, a in outputs.items()}
            offset += p.size
            if not p.future.done():
                p.future.set_result((rows, ms))
