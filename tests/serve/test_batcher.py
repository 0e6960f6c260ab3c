"""The continuous micro-batcher (pure asyncio, no Ray): batches grow while the model is busy."""

from __future__ import annotations

import asyncio

import pytest

from serve.batcher import ContinuousBatcher


def test_items_queued_during_a_forward_go_together_and_results_keep_their_order():
    sizes: list[int] = []

    async def forward(items):
        sizes.append(len(items))
        await asyncio.sleep(0.05)           # a slow model: others queue meanwhile
        return [x * 10 for x in items]

    async def main():
        b = ContinuousBatcher(forward, max_batch_size=8, idle_wait_s=0.0)
        first = asyncio.create_task(b.submit_many([0]))
        await asyncio.sleep(0.01)           # the first forward is running now
        rest = await asyncio.gather(*[b.submit_many([i, i + 100]) for i in range(1, 7)])
        return await first, rest

    first, rest = asyncio.run(main())
    assert first == [0]
    assert rest == [[i * 10, (i + 100) * 10] for i in range(1, 7)]
    assert sizes[0] == 1 and sizes[1] == 8 and sum(sizes) == 13   # 12 queued items: a full batch, then 4


def test_a_failing_forward_fails_its_requests_and_the_batcher_goes_on():
    calls = []

    async def forward(items):
        calls.append(list(items))
        if "bad" in items:
            raise RuntimeError("model exploded")
        return items

    async def main():
        b = ContinuousBatcher(forward, max_batch_size=4, idle_wait_s=0.0)
        with pytest.raises(RuntimeError, match="exploded"):
            await b.submit_many(["bad"])
        return await b.submit_many(["good"])

    assert asyncio.run(main()) == ["good"]


def test_an_idle_model_takes_requests_already_received_in_one_batch_without_waiting():
    sizes: list[int] = []

    async def forward(items):
        sizes.append(len(items))
        return items

    async def main():
        b = ContinuousBatcher(forward, max_batch_size=8)      # default: no idle wait
        # Three requests handed to the loop together (as the HTTP server does for requests whose
        # bodies arrived in the same turn): one forward, not three.
        together = await asyncio.gather(b.submit_many(["a"]), b.submit_many(["b", "c"]), b.submit_many(["d"]))
        alone = await b.submit_many(["e"])
        return together, alone

    together, alone = asyncio.run(main())
    assert together == [["a"], ["b", "c"], ["d"]] and alone == ["e"]
    assert sizes == [4, 1]
