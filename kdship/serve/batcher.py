"""Server-side dynamic batching: requests that arrive within `max_wait` are merged into one model call while the
total stays within `max_batch` texts (a single larger request runs alone). The model runs in a worker thread, so
the event loop keeps accepting requests meanwhile."""

from __future__ import annotations

import asyncio
from typing import Any, Callable


class DynamicBatcher:
    def __init__(self, predict: Callable[[list[str]], list[Any]], max_batch: int, max_wait_s: float,
                 on_batch: Callable[[int], None] = lambda n: None):
        self.predict = predict
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.on_batch = on_batch
        self.queue: asyncio.Queue[tuple[list[str], asyncio.Future]] = asyncio.Queue()
        self._held: tuple[list[str], asyncio.Future] | None = None  # did not fit the last batch: goes first next
        self._worker: asyncio.Task | None = None

    def start(self) -> None:
        self._worker = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """Finish what is queued, then stop (graceful shutdown)."""
        await self.queue.join()
        if self._worker:
            self._worker.cancel()

    async def submit(self, texts: list[str]) -> list[Any]:
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((texts, future))
        return await future

    async def _collect(self) -> list[tuple[list[str], asyncio.Future]]:
        first, self._held = (self._held, None) if self._held else (await self.queue.get(), None)
        items = [first]
        count = len(first[0])
        deadline = asyncio.get_running_loop().time() + self.max_wait_s
        while count < self.max_batch:
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                break
            try:
                item = await asyncio.wait_for(self.queue.get(), remaining)
            except asyncio.TimeoutError:
                break
            if count + len(item[0]) > self.max_batch:
                self._held = item
                break
            items.append(item)
            count += len(item[0])
        return items

    async def _run(self) -> None:
        while True:
            items = await self._collect()
            texts = [t for request, _ in items for t in request]
            try:
                results = await asyncio.to_thread(self.predict, texts)
                self.on_batch(len(texts))
                start = 0
                for request, future in items:
                    if not future.done():
                        future.set_result(results[start:start + len(request)])
                    start += len(request)
            except Exception as e:  # a model failure answers every waiting request, and the server lives on
                for _, future in items:
                    if not future.done():
                        future.set_exception(e)
            finally:
                for _ in items:
                    self.queue.task_done()
