"""Continuous micro-batching: one model forward at a time over everything that queued meanwhile.

Ray Serve's ``@serve.batch`` closes a batch ``batch_wait_timeout_s`` after its first item
even while the previous batch still runs on the model, so under load it queues many
tiny batches behind one another (measured: 16 concurrent one-window clients gave a mean
batch of 1.4 windows).  Here a single consumer takes *all* items that arrived while the
last forward ran (up to ``max_batch_size``): when the model was idle, a batch takes what
the event loop has already received (one loop turn), plus whatever arrives within
``idle_wait_s`` if that is set (default 0: a lone request does not wait); under load
batches grow by themselves.  ``ServeConfig.batching``
picks this (``continuous``, the default) or Ray's decorator (``ray``); the benchmark
measures both in the same run.

A batch mixes windows of unrelated requests, so one bad window must not fail the others:
when a batched forward raises, :func:`forward_isolated` runs the batch again one item at
a time, and only the items that fail on their own get the error (both batching paths
use it).

    batcher = ContinuousBatcher(forward, max_batch_size=64, idle_wait_s=0.0)
    results = await batcher.submit_many([item1, item2])    # inside an asyncio event loop
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Awaitable, Callable

log = logging.getLogger(__name__)


async def forward_isolated(forward: Callable[[list], Awaitable[list]], items: list) -> list:
    """``forward(items)``; if that raises, each item alone: its result, or the exception it raised.

    Failures are expected to be rare (the API validates windows before they are queued), so
    the item-by-item retry costs nothing in the normal case and only slows the batch that
    carried the bad item.
    """
    try:
        return _checked(await forward(items), len(items))
    except Exception as exc:  # noqa: BLE001 - which item caused it is found below
        if len(items) == 1:
            return [exc]
        log.warning("a batch of %d windows failed (%s: %s); retrying them one by one",
                    len(items), type(exc).__name__, exc)
    out: list = []
    for item in items:
        try:
            out.extend(_checked(await forward([item]), 1))
        except Exception as exc:  # noqa: BLE001 - this item fails alone; the others are answered
            out.append(exc)
    return out


def _checked(results: list, n: int) -> list:
    # A result list of the wrong length would silently pair results with the wrong requests.
    results = list(results)
    if len(results) != n:
        raise RuntimeError(f"the model returned {len(results)} results for {n} windows")
    return results


class ContinuousBatcher:
    def __init__(self, forward: Callable[[list], Awaitable[list]], max_batch_size: int = 64,
                 idle_wait_s: float = 0.0):
        self.forward = forward
        self.max_batch_size = max_batch_size
        self.idle_wait_s = idle_wait_s
        self._queue: list[tuple[Any, asyncio.Future]] = []
        self._ready: asyncio.Event | None = None
        self._task: asyncio.Task | None = None

    async def submit_many(self, items: list, return_exceptions: bool = False) -> list:
        """Queue ``items`` (one request's windows stay together) and wait for their results, in order.

        An item whose forward failed raises its exception here, or, with
        ``return_exceptions``, stands in the result list as the exception (so the caller can
        say which item failed).
        """
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done():
            self._ready = asyncio.Event()
            self._task = loop.create_task(self._run())
        futures = [loop.create_future() for _ in items]
        self._queue.extend(zip(items, futures))
        self._ready.set()
        return list(await asyncio.gather(*futures, return_exceptions=return_exceptions))

    async def _run(self) -> None:
        while True:
            await self._ready.wait()
            if len(self._queue) < self.max_batch_size:
                # The model was idle: requests the loop has already received join this batch
                # (sleep(0) is one loop turn, microseconds); idle_wait_s > 0 also waits for later ones.
                await asyncio.sleep(self.idle_wait_s)
            batch = self._queue[:self.max_batch_size]
            del self._queue[:self.max_batch_size]
            if not self._queue:
                self._ready.clear()
            batch = [(item, fut) for item, fut in batch if not fut.done()]   # drop cancelled requests
            if not batch:
                continue
            try:
                results = await forward_isolated(self.forward, [item for item, _ in batch])
            except asyncio.CancelledError:
                for _, fut in batch:     # the replica is stopping: nobody may wait forever
                    fut.cancel()
                raise
            for (_, fut), result in zip(batch, results):
                if fut.done():
                    continue
                if isinstance(result, Exception):
                    fut.set_exception(result)
                else:
                    fut.set_result(result)
