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


def test_an_item_whose_forward_fails_fails_alone_and_the_rest_of_its_batch_is_answered():
    sizes: list[int] = []

    async def forward(items):
        sizes.append(len(items))
        await asyncio.sleep(0.01)
        if "poison" in items:
            raise ValueError("cannot encode")
        return [f"ok:{x}" for x in items]

    async def main():
        b = ContinuousBatcher(forward, max_batch_size=64)
        goods = [b.submit_many([f"g{i}"]) for i in range(20)]
        bad = b.submit_many(["poison"])
        mixed = b.submit_many(["m1", "poison", "m2"], return_exceptions=True)
        return await asyncio.gather(*goods, bad, mixed, return_exceptions=True)

    *goods, bad, mixed = asyncio.run(main())
    assert goods == [[f"ok:g{i}"] for i in range(20)]           # every good request answered
    assert isinstance(bad, ValueError) and "cannot encode" in str(bad)
    assert mixed[0] == "ok:m1" and isinstance(mixed[1], ValueError) and mixed[2] == "ok:m2"
    assert sizes[0] == 24 and sizes[1:] == [1] * 24               # one batch, then each item alone


def test_a_forward_returning_the_wrong_number_of_results_fails_instead_of_mismatching():
    async def forward(items):
        return items[:-1]

    async def main():
        b = ContinuousBatcher(forward, max_batch_size=8)
        return await asyncio.gather(b.submit_many(["a"]), b.submit_many(["b"]), return_exceptions=True)

    for r in asyncio.run(main()):
        assert isinstance(r, RuntimeError) and "results for 1 windows" in str(r)


def test_rays_serve_batch_path_isolates_a_failing_item_too(ray_local):
    # The app's @serve.batch method returns forward_isolated's per-item list (Ray would hand an
    # exception raised by the method to every request in the batch).  Checked on a real Ray
    # Serve deployment, since @serve.batch only runs inside a replica.
    from ray import serve as ray_serve

    from serve.config import ServeConfig
    from serve.handle import _ensure_serve_http, delete_app

    @ray_serve.deployment(ray_actor_options={"num_cpus": 0})
    class Model:
        def __init__(self):
            self.sizes = []

        @ray_serve.batch(max_batch_size=16, batch_wait_timeout_s=0.5)
        async def infer(self, items):
            from serve.batcher import forward_isolated

            async def forward(batch):
                self.sizes.append(len(batch))
                if "poison" in batch:
                    raise ValueError("cannot encode")
                return [x.upper() for x in batch]

            return await forward_isolated(forward, items)

        async def __call__(self, item):
            result = await self.infer(item)
            if isinstance(result, Exception):
                raise result
            return result

        def batch_sizes(self):
            return self.sizes

    _ensure_serve_http(ServeConfig())        # Serve on a free port, not Ray's default 8000
    handle = ray_serve.run(Model.bind(), name="batch-isolation", route_prefix=None)
    try:
        responses = [handle.remote(x) for x in ["a", "poison", "b", "c"]]
        assert [responses[i].result(timeout_s=60) for i in (0, 2, 3)] == ["A", "B", "C"]
        with pytest.raises(ValueError, match="cannot encode"):
            responses[1].result(timeout_s=60)
        assert handle.batch_sizes.remote().result(timeout_s=60)[0] == 4   # they did share a batch
    finally:
        delete_app("batch-isolation")
